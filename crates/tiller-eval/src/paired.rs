//! Paired comparison: is model B better than model A on the same prompts and seeds? Two
//! evaluations' `results.jsonl` are matched image by image (same prompt index, same seed
//! index), and each task's accuracy difference gets a paired standard error, `sd(d) / sqrt(n)`
//! of the per-image differences `d = correct_B - correct_A`, which is smaller than the unpaired
//! one whenever the two models tend to fail on the same prompts. Over the six GenEval tasks the
//! discordant images (right in one run only) also give an exact two-sided sign test (McNemar's
//! exact test).

use crate::report::ImageResult;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tiller_core::{Error, Result};
use tiller_testbed::prompts::Task;

/// One run's verdicts: (prompt index, seed index) -> (task, prompt, correct).
pub type Verdicts = BTreeMap<(usize, usize), (String, String, bool)>;

#[derive(Debug, Deserialize)]
struct Line {
    tag: String,
    prompt: String,
    prompt_index: usize,
    image_index: usize,
    correct: bool,
}

/// A `tiller eval` folder's `results.jsonl`; an image listed twice is an error.
pub fn read(dir: &Path) -> Result<Verdicts> {
    let (path, text) = results_text(dir)?;
    parse(&text, &path)
}

/// A mean over images and its standard error, `sd / sqrt(n)` (0 for fewer than two).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mean {
    pub n: usize,
    pub mean: f64,
    pub se: f64,
}

impl Mean {
    pub fn of(v: &[f64]) -> Self {
        let n = v.len();
        if n == 0 {
            return Self {
                n,
                mean: 0.0,
                se: 0.0,
            };
        }
        let mean = v.iter().sum::<f64>() / n as f64;
        let var = if n > 1 {
            v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64
        } else {
            0.0
        };
        Self {
            n,
            mean,
            se: (var / n as f64).sqrt(),
        }
    }
}

/// Where an image of a results file is: (prompt index, seed index).
pub type ImageKey = (usize, usize);

/// The path and text of `dir`'s `results.jsonl`.
pub(crate) fn results_text(dir: &Path) -> Result<(PathBuf, String)> {
    let path = dir.join("results.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Error::io(
            &path,
            std::io::Error::new(
                e.kind(),
                format!(
                    "{e} (written by `tiller eval`; re-run it if the folder predates results.jsonl)"
                ),
            ),
        )
    })?;
    Ok((path, text))
}

/// The lines of a results file as `T`s by their image; a line that does not parse or repeats an
/// image is an error naming `path` and the line.
pub(crate) fn parse_keyed<T: DeserializeOwned>(
    text: &str,
    path: &Path,
    key: impl Fn(&T) -> ImageKey,
) -> Result<BTreeMap<ImageKey, T>> {
    let mut out = BTreeMap::new();
    for (i, l) in text.lines().enumerate() {
        let line: T = serde_json::from_str(l)
            .map_err(|e| Error::format(path, format!("line {}: {e}", i + 1)))?;
        let k = key(&line);
        if out.insert(k, line).is_some() {
            return Err(Error::format(
                path,
                format!("line {} repeats image {k:?}", i + 1),
            ));
        }
    }
    Ok(out)
}

/// The images of run `a` beside the same images of run `b`, in `a`'s order; errors unless both
/// hold the same images of the same prompts (`prompt` reads an image's prompt).
pub(crate) fn pair_up<'a, T>(
    a: &'a BTreeMap<ImageKey, T>,
    b: &'a BTreeMap<ImageKey, T>,
    prompt: impl Fn(&T) -> &str,
) -> Result<Vec<(&'a ImageKey, &'a T, &'a T)>> {
    if a.len() != b.len() {
        return Err(Error::invalid(format!(
            "the runs have {} and {} images; evaluate both on the same suite, --tasks, --per-task, --per-prompt and --seed",
            a.len(),
            b.len()
        )));
    }
    a.iter()
        .map(|(key, x)| {
            let y = b.get(key).ok_or_else(|| {
                Error::invalid(format!(
                    "image {key:?} of the first run is missing from the second"
                ))
            })?;
            if prompt(x) != prompt(y) {
                return Err(Error::invalid(format!(
                    "prompt {} differs (\"{}\" vs \"{}\"); the runs used different suites",
                    key.0,
                    prompt(x),
                    prompt(y)
                )));
            }
            Ok((key, x, y))
        })
        .collect()
}

/// The verdicts of a report's images (what its `results.jsonl` holds).
pub fn verdicts(results: &[ImageResult]) -> Verdicts {
    results
        .iter()
        .map(|r| {
            (
                (r.prompt_index, r.image_index),
                (r.tag.clone(), r.prompt.clone(), r.correct),
            )
        })
        .collect()
}

/// Per-image verdicts in `results.jsonl`'s format (also an alignment run's
/// `samples/val-<update>.jsonl`); `path` names the source in errors.
pub fn parse(text: &str, path: &Path) -> Result<Verdicts> {
    Ok(
        parse_keyed(text, path, |l: &Line| (l.prompt_index, l.image_index))?
            .into_iter()
            .map(|(k, l)| (k, (l.tag, l.prompt, l.correct)))
            .collect(),
    )
}

/// One task's paired comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct PairedRow {
    pub task: String,
    pub n: usize,
    pub acc_a: f64,
    pub acc_b: f64,
    /// Standard error of `acc_b - acc_a` from the per-image differences.
    pub se: f64,
    /// Images only B got right, and only A.
    pub only_b: usize,
    pub only_a: usize,
}

/// Matches two runs' verdicts; errors if they are not the same prompts and seeds.
pub fn compare_results(a: &Verdicts, b: &Verdicts) -> Result<Vec<PairedRow>> {
    let mut by_task: BTreeMap<String, Vec<(bool, bool)>> = BTreeMap::new();
    for (_, (tag, _, ca), (_, _, cb)) in pair_up(a, b, |v| v.1.as_str())? {
        by_task.entry(tag.clone()).or_default().push((*ca, *cb));
    }
    Ok(by_task
        .into_iter()
        .map(|(task, v)| {
            let n = v.len();
            let d: Vec<f64> = v
                .iter()
                .map(|&(x, y)| y as u8 as f64 - x as u8 as f64)
                .collect();
            PairedRow {
                n,
                acc_a: v.iter().filter(|p| p.0).count() as f64 / n as f64,
                acc_b: v.iter().filter(|p| p.1).count() as f64 / n as f64,
                se: Mean::of(&d).se,
                only_b: v.iter().filter(|p| p.1 && !p.0).count(),
                only_a: v.iter().filter(|p| p.0 && !p.1).count(),
                task,
            }
        })
        .collect())
}

/// Two-sided exact sign test: the probability, with k ~ Binomial(n, 1/2), of a split at least
/// as uneven as (x, n - x).
pub fn sign_test(x: usize, n: usize) -> f64 {
    if n == 0 {
        return 1.0;
    }
    let k = x.min(n - x);
    // ln C(n, i) accumulated in f64: exact enough for the few thousand images an eval holds.
    let mut ln_c = 0.0f64;
    let mut tail = 0.0f64;
    for i in 0..=k {
        if i > 0 {
            ln_c += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        tail += (ln_c - n as f64 * std::f64::consts::LN_2).exp();
    }
    (2.0 * tail).min(1.0)
}

/// The paired comparison of GenEval's overall accuracy (the mean of its task accuracies).
#[derive(Debug, Clone, PartialEq)]
pub struct Overall {
    pub tasks: usize,
    pub images: usize,
    pub acc_a: f64,
    pub acc_b: f64,
    /// Standard error of `acc_b - acc_a`: the tasks' paired errors combined, divided by the count.
    pub se: f64,
    pub only_b: usize,
    pub only_a: usize,
    /// The exact sign test on the discordant images.
    pub p: f64,
}

impl Overall {
    pub fn gain(&self) -> f64 {
        self.acc_b - self.acc_a
    }
}

/// The overall row over the GenEval tasks among `rows` (None if there are none).
pub fn overall(rows: &[PairedRow]) -> Option<Overall> {
    let geneval: Vec<&PairedRow> = rows
        .iter()
        .filter(|r| Task::GENEVAL.iter().any(|t| t.name() == r.task))
        .collect();
    if geneval.is_empty() {
        return None;
    }
    let k = geneval.len() as f64;
    let mean = |f: &dyn Fn(&PairedRow) -> f64| geneval.iter().map(|r| f(r)).sum::<f64>() / k;
    let only_b: usize = geneval.iter().map(|r| r.only_b).sum();
    let only_a: usize = geneval.iter().map(|r| r.only_a).sum();
    Some(Overall {
        tasks: geneval.len(),
        images: geneval.iter().map(|r| r.n).sum(),
        acc_a: mean(&|r| r.acc_a),
        acc_b: mean(&|r| r.acc_b),
        se: geneval.iter().map(|r| r.se * r.se).sum::<f64>().sqrt() / k,
        only_b,
        only_a,
        p: sign_test(only_b, only_a + only_b),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_of(v: &[(&str, &str, bool)]) -> Verdicts {
        v.iter()
            .enumerate()
            .map(|(i, (t, p, c))| ((i, 0), (t.to_string(), p.to_string(), *c)))
            .collect()
    }

    #[test]
    fn paired_rows_count_discordant_images_and_their_spread() {
        let a = run_of(&[
            ("colors", "a red circle", true),
            ("colors", "a blue square", false),
            ("colors", "a green circle", false),
            ("colors", "a red square", true),
        ]);
        let b = run_of(&[
            ("colors", "a red circle", true),
            ("colors", "a blue square", true),
            ("colors", "a green circle", true),
            ("colors", "a red square", false),
        ]);
        let rows = compare_results(&a, &b).unwrap();
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!((r.n, r.only_b, r.only_a), (4, 2, 1));
        assert_eq!((r.acc_a, r.acc_b), (0.5, 0.75));
        // d = [0, 1, 1, -1]: mean 0.25, sample variance (0.0625 + 2 * 0.5625 + 1.5625) / 3.
        let var: f64 = (0.0625 + 2.0 * 0.5625 + 1.5625) / 3.0;
        assert!((r.se - (var / 4.0).sqrt()).abs() < 1e-12, "{}", r.se);
        // Different prompts at the same index are refused, naming the index.
        let mut c = b.clone();
        c.insert((1, 0), ("colors".into(), "a purple square".into(), true));
        let e = compare_results(&a, &c).unwrap_err().to_string();
        assert!(e.contains("prompt 1") && e.contains("purple"), "{e}");
        let e = compare_results(&a, &run_of(&[("colors", "x", true)]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("4 and 1 images"), "{e}");
    }

    #[test]
    fn results_files_that_are_missing_or_repeat_an_image_are_errors() {
        let dir = std::env::temp_dir().join(format!("tiller-paired-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = read(&dir).unwrap_err().to_string();
        assert!(
            e.contains("results.jsonl") && e.contains("tiller eval"),
            "{e}"
        );
        let line = r#"{"filename":"f","tag":"colors","prompt":"a red circle","prompt_index":0,"image_index":0,"correct":true,"aesthetic":0.5,"mark":false}"#;
        std::fs::write(dir.join("results.jsonl"), format!("{line}\n")).unwrap();
        assert_eq!(read(&dir).unwrap().len(), 1);
        std::fs::write(dir.join("results.jsonl"), format!("{line}\n{line}\n")).unwrap();
        let e = read(&dir).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("repeats"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn overall_averages_the_geneval_tasks_and_combines_their_errors() {
        let row = |task: &str, n, acc_a, acc_b, se, only_b, only_a| PairedRow {
            task: task.into(),
            n,
            acc_a,
            acc_b,
            se,
            only_b,
            only_a,
        };
        let rows = [
            row("colors", 4, 0.5, 0.75, 0.3, 2, 1),
            row("counting", 2, 0.0, 0.5, 0.5, 1, 0),
            // Not a GenEval task: left out of the overall.
            row("unsafe", 8, 0.0, 1.0, 0.0, 8, 0),
        ];
        let o = overall(&rows).unwrap();
        assert_eq!((o.tasks, o.images, o.only_b, o.only_a), (2, 6, 3, 1));
        assert!((o.acc_a - 0.25).abs() < 1e-12 && (o.acc_b - 0.625).abs() < 1e-12);
        assert!(
            (o.se - (0.09f64 + 0.25).sqrt() / 2.0).abs() < 1e-12,
            "{}",
            o.se
        );
        // 3 of 4 discordant images one way: 2 * (1 + 4) / 16.
        assert!((o.p - 0.625).abs() < 1e-12, "{}", o.p);
        assert!(overall(&rows[2..]).is_none());
    }

    #[test]
    fn sign_test_matches_the_binomial_tails() {
        // n = 10, x = 2: 2 * (1 + 10 + 45) / 1024.
        assert!((sign_test(2, 10) - 112.0 / 1024.0).abs() < 1e-12);
        assert!((sign_test(8, 10) - 112.0 / 1024.0).abs() < 1e-12);
        assert_eq!(sign_test(5, 10), 1.0);
        assert_eq!(sign_test(0, 0), 1.0);
        // n = 1: one discordant image proves nothing.
        assert_eq!(sign_test(1, 1), 1.0);
    }
}
