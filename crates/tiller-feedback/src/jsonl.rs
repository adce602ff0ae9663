//! JSONL export and import: one [`Record`] per line, tagged by `kind` (prompts, then images, then
//! annotators, then feedback in insertion order), the interchange format between stores, backends
//! and tools outside Tiller. Image bytes are not in the file; they travel as the image folder.

use crate::images::ImageDir;
use crate::store::{Batch, PreferenceStore, Query};
use crate::vocab::{Feedback, Record};
use std::io::{BufRead, BufReader};
use std::path::Path;
use tiller_core::{Error, Result};

/// Writes every record of `store` to `path` (atomically: a reader never sees half a file).
/// Returns the number of lines.
pub fn export_jsonl(store: &(impl PreferenceStore + ?Sized), path: &Path) -> Result<usize> {
    let mut records: Vec<Record> = Vec::new();
    records.extend(store.prompts(None)?.into_iter().map(Record::Prompt));
    records.extend(store.images()?.into_iter().map(Record::Image));
    records.extend(store.annotators()?.into_iter().map(Record::Annotator));
    records.extend(
        store
            .feedback(&Query::default())?
            .into_iter()
            .map(Record::from),
    );
    let mut out = String::new();
    for r in &records {
        out.push_str(
            &serde_json::to_string(r)
                .map_err(|e| Error::invalid(format!("serialising a record: {e}")))?,
        );
        out.push('\n');
    }
    tiller_core::fs::atomic_write(path, out.as_bytes())?;
    Ok(records.len())
}

/// Reads a JSONL file into records. Errors name the file and line; blank lines are skipped.
pub fn read_jsonl(path: &Path) -> Result<Vec<Record>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut records = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| Error::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let record: Record = serde_json::from_str(&line)
            .map_err(|e| Error::format(path, format!("line {}: {e}", i + 1)))?;
        let feedback = match &record {
            Record::Comparison(r) => Some(Feedback::Comparison(r.clone())),
            Record::Label(r) => Some(Feedback::Label(r.clone())),
            Record::Rating(r) => Some(Feedback::Rating(r.clone())),
            Record::RegionMark(r) => Some(Feedback::RegionMark(r.clone())),
            Record::Reason(r) => Some(Feedback::Reason(r.clone())),
            Record::Annotator(a) => {
                a.validate()
                    .map_err(|e| Error::format(path, format!("line {}: {e}", i + 1)))?;
                None
            }
            Record::Prompt(_) | Record::Image(_) => None,
        };
        if let Some(f) = feedback {
            f.validate()
                .map_err(|e| Error::format(path, format!("line {}: {e}", i + 1)))?;
        }
        records.push(record);
    }
    Ok(records)
}

/// Imports a JSONL file into `store` in one transaction, copying each image's bytes from `images`
/// (the exporting store's image folder; every file is checked against its hash). Returns the number
/// of records imported.
pub fn import_jsonl(
    store: &mut (impl PreferenceStore + ?Sized),
    path: &Path,
    images: &ImageDir,
) -> Result<usize> {
    let records = read_jsonl(path)?;
    let mut batch = Batch::default();
    for record in &records {
        match record {
            Record::Prompt(p) => batch.prompts.push(p.clone()),
            Record::Image(image) => {
                let bytes = images.get(image)?;
                let stored = store.put_image_file(&bytes)?;
                if stored != *image {
                    return Err(Error::format(
                        path,
                        format!(
                            "image {}: the file says {:?} {}x{}, the record {:?} {}x{}",
                            image.id,
                            stored.format,
                            stored.width,
                            stored.height,
                            image.format,
                            image.width,
                            image.height
                        ),
                    ));
                }
                batch.images.push(stored);
            }
            Record::Annotator(a) => batch.annotators.push(a.clone()),
            Record::Comparison(r) => batch.feedback.push(r.clone().into()),
            Record::Label(r) => batch.feedback.push(r.clone().into()),
            Record::Rating(r) => batch.feedback.push(r.clone().into()),
            Record::RegionMark(r) => batch.feedback.push(r.clone().into()),
            Record::Reason(r) => batch.feedback.push(r.clone().into()),
        }
    }
    store.write(&batch)?;
    Ok(records.len())
}
