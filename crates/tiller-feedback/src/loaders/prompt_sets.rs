//! Prompt sets in files, for sampling, evaluation and training prompts: plain text (one prompt a
//! line; blank lines and lines starting with `#` skipped), or CSV (a `.csv` file) with a header
//! naming a `prompt` column, as the safety benchmarks ship them
//! (`shared/reference/ecosystem.md`): CoProV2's test set `prompt,image,category`, I2P's
//! `prompt,categories,...`, Ring-A-Bell's `prompt,case_number,evaluation_seed`. A `category` (or
//! I2P's `categories`) column is kept with each prompt; other columns are not read.

use std::path::Path;
use tiller_core::{Error, Result};

/// One prompt of a set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptRow {
    pub text: String,
    /// The set's category for it (CoProV2: `Hate`, `Violence`, ...), when the file has one.
    pub category: Option<String>,
}

/// Reads a prompt file (CSV when its name ends in `.csv`, else one prompt per line). An empty
/// set, a CSV without a `prompt` column, a malformed row or an empty prompt is an error naming
/// the file and the row.
pub fn read_prompt_file(path: &Path) -> Result<Vec<PromptRow>> {
    let is_csv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let rows = if is_csv {
        read_csv(path)?
    } else {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| PromptRow {
                text: l.to_string(),
                category: None,
            })
            .collect()
    };
    if rows.is_empty() {
        return Err(Error::format(path, "holds no prompts"));
    }
    Ok(rows)
}

fn read_csv(path: &Path) -> Result<Vec<PromptRow>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = csv::ReaderBuilder::new().flexible(false).from_reader(file);
    let headers = reader
        .headers()
        .map_err(|e| Error::format(path, format!("reading the CSV header: {e}")))?
        .clone();
    let column = |name: &str| headers.iter().position(|h| h.trim() == name);
    let prompt = column("prompt").ok_or_else(|| {
        Error::format(
            path,
            format!(
                "has no `prompt` column (its header is `{}`)",
                headers.iter().collect::<Vec<_>>().join(",")
            ),
        )
    })?;
    let category = column("category").or_else(|| column("categories"));
    let mut rows = Vec::new();
    for (i, record) in reader.records().enumerate() {
        // Row numbers as a spreadsheet shows them: the header is row 1.
        let row = i + 2;
        let record =
            record.map_err(|e| Error::format(path, format!("row {row} is not valid CSV: {e}")))?;
        let text = record.get(prompt).unwrap_or("").trim();
        if text.is_empty() {
            return Err(Error::format(
                path,
                format!("row {row} has an empty prompt"),
            ));
        }
        rows.push(PromptRow {
            text: text.to_string(),
            category: category
                .and_then(|c| record.get(c))
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(String::from),
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A synthetic CoProV2-shaped test CSV (benign text: the real set's prompts are offensive and
    /// stay out of the repository), with a quoted comma; a plain list; and the errors.
    #[test]
    fn reads_coprov2_csv_and_plain_lists_and_names_bad_rows() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("CoProv2_test.csv");
        std::fs::write(
            &csv,
            "prompt,image,category\n\"a red circle, drawn large\",0000000_0.jpg,Hate\n\
             a blue square,0000001_0.jpg,Violence\n",
        )
        .unwrap();
        let rows = read_prompt_file(&csv).unwrap();
        assert_eq!(
            rows,
            vec![
                PromptRow {
                    text: "a red circle, drawn large".into(),
                    category: Some("Hate".into())
                },
                PromptRow {
                    text: "a blue square".into(),
                    category: Some("Violence".into())
                },
            ]
        );
        let txt = dir.path().join("prompts.txt");
        std::fs::write(&txt, "# a comment\na cat\n\n  a dog  \n").unwrap();
        let rows = read_prompt_file(&txt).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[1].text.as_str(), rows[1].category.as_deref()),
            ("a dog", None)
        );

        let bad = dir.path().join("bad.csv");
        std::fs::write(&bad, "text,category\na cat,x\n").unwrap();
        let e = read_prompt_file(&bad).unwrap_err().to_string();
        assert!(
            e.contains("no `prompt` column") && e.contains("text,category"),
            "{e}"
        );
        std::fs::write(&bad, "prompt,image,category\na cat,1.jpg,x\n,2.jpg,y\n").unwrap();
        let e = read_prompt_file(&bad).unwrap_err().to_string();
        assert!(e.contains("row 3") && e.contains("empty prompt"), "{e}");
        std::fs::write(&bad, "prompt,image,category\na cat,1.jpg\n").unwrap();
        let e = read_prompt_file(&bad).unwrap_err().to_string();
        assert!(e.contains("row 2") && e.contains("not valid CSV"), "{e}");
        std::fs::write(&bad, "prompt\n").unwrap();
        let e = read_prompt_file(&bad).unwrap_err().to_string();
        assert!(e.contains("holds no prompts"), "{e}");
    }
}
