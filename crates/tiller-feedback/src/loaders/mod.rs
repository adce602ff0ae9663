//! Loaders from public preference datasets into the feedback vocabulary. Each reads one file of a
//! dataset into an [`Imported`] (prompts, images, annotators, feedback), which [`ingest`] writes into
//! any [`PreferenceStore`] in one transaction.
//!
//! - [`pickapic`]: Pick-a-Pic v1/v2 parquet shards (Kirstain et al. 2023).
//! - [`coprov2`]: CoProV2's safe/unsafe image pairs, parquet (Liu et al. 2024, SafetyDPO).
//! - [`hpdv2`]: HPDv2 `train.json` / `test.json` (Wu et al. 2023).
//! - [`imagereward`]: ImageRewardDB per-image metadata, JSON or parquet (Xu et al. 2023).
//! - [`prompt_sets`]: prompt lists, plain or CSV (CoProV2's test set, I2P, Ring-A-Bell).
//!
//! Column and key meanings follow the datasets' cards as summarised in
//! `shared/reference/ecosystem.md` §2; each module's docs give its mapping. Images are identified by
//! the SHA-256 of their bytes, so a loader needs the bytes (Pick-a-Pic's `jpg_*` columns) or the
//! files (HPDv2, ImageRewardDB); variants without images cannot be imported.

pub mod coprov2;
pub mod hpdv2;
pub mod imagereward;
mod parquet_rows;
pub mod pickapic;
pub mod prompt_sets;

use crate::store::{Batch, PreferenceStore};
use crate::vocab::{
    AnnotatorId, AnnotatorRecord, Feedback, ImageId, PromptId, PromptRecord, Provenance, Source,
    Split,
};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use tiller_core::{Error, Result};

/// Where an imported image's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// In memory (read from a bytes column).
    Bytes(Vec<u8>),
    /// In a file (read again at ingest time, and checked against the id).
    File(PathBuf),
}

/// An image named by a loader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedImage {
    /// SHA-256 of the bytes.
    pub id: ImageId,
    /// Where the bytes are.
    pub source: ImageSource,
}

/// One dataset file in the feedback vocabulary, ready for [`ingest`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Imported {
    /// Distinct prompts, in first-seen order.
    pub prompts: Vec<PromptRecord>,
    /// Distinct images, in first-seen order.
    pub images: Vec<ImportedImage>,
    /// Distinct annotators, in first-seen order.
    pub annotators: Vec<AnnotatorRecord>,
    /// Feedback, in file order.
    pub feedback: Vec<Feedback>,
    /// Rows left out on purpose (e.g. Pick-a-Pic rows with `has_label = false`).
    pub skipped: usize,
}

/// Collects an [`Imported`] without duplicates.
#[derive(Debug)]
pub(crate) struct Builder {
    dataset: String,
    split: Split,
    out: Imported,
    prompts: HashSet<PromptId>,
    images: HashSet<ImageId>,
    annotators: HashSet<AnnotatorId>,
}

impl Builder {
    pub(crate) fn new(dataset: &str, split: Split) -> Self {
        Self {
            dataset: dataset.to_string(),
            split,
            out: Imported::default(),
            prompts: HashSet::new(),
            images: HashSet::new(),
            annotators: HashSet::new(),
        }
    }

    pub(crate) fn prompt(&mut self, text: &str) -> PromptId {
        let record = PromptRecord::new(text, self.split, None);
        let id = record.id.clone();
        if self.prompts.insert(id.clone()) {
            self.out.prompts.push(record);
        }
        id
    }

    pub(crate) fn image_bytes(&mut self, bytes: Vec<u8>) -> ImageId {
        let id = ImageId::of_bytes(&bytes);
        if self.images.insert(id.clone()) {
            self.out.images.push(ImportedImage {
                id: id.clone(),
                source: ImageSource::Bytes(bytes),
            });
        }
        id
    }

    /// Hashes the file now (the bytes are not kept) and records its path.
    pub(crate) fn image_file(&mut self, path: &Path) -> Result<ImageId> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let id = ImageId::of_bytes(&bytes);
        if self.images.insert(id.clone()) {
            self.out.images.push(ImportedImage {
                id: id.clone(),
                source: ImageSource::File(path.to_path_buf()),
            });
        }
        Ok(id)
    }

    /// Provenance for the dataset user `user` (`None`: the dataset names no annotator).
    pub(crate) fn provenance(&mut self, user: Option<&str>, time_ms: Option<i64>) -> Provenance {
        let id = AnnotatorId(match user {
            Some(u) => format!("{}/user/{u}", self.dataset),
            None => format!("{}/anonymous", self.dataset),
        });
        let source = Source::Dataset {
            name: self.dataset.clone(),
        };
        if self.annotators.insert(id.clone()) {
            self.out.annotators.push(AnnotatorRecord {
                id: id.clone(),
                source: source.clone(),
                taste: None,
            });
        }
        Provenance {
            annotator: id,
            source,
            time_ms,
        }
    }

    pub(crate) fn push(&mut self, feedback: impl Into<Feedback>) {
        self.out.feedback.push(feedback.into());
    }

    pub(crate) fn skip(&mut self) {
        self.out.skipped += 1;
    }

    pub(crate) fn finish(self) -> Imported {
        self.out
    }
}

/// Writes `imported` into `store`: every image file first (content-addressed, so repeats are free),
/// then all rows in one transaction. An image file whose bytes changed since loading is an error.
pub fn ingest(store: &mut (impl PreferenceStore + ?Sized), imported: &Imported) -> Result<()> {
    let mut batch = Batch {
        prompts: imported.prompts.clone(),
        annotators: imported.annotators.clone(),
        feedback: imported.feedback.clone(),
        ..Batch::default()
    };
    for image in &imported.images {
        let record = match &image.source {
            ImageSource::Bytes(bytes) => store.put_image_file(bytes)?,
            ImageSource::File(path) => {
                let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
                let record = store.put_image_file(&bytes)?;
                if record.id != image.id {
                    return Err(Error::format(
                        path,
                        "the file changed between loading and ingesting (its SHA-256 differs)",
                    ));
                }
                record
            }
        };
        batch.images.push(record);
    }
    store.write(&batch)
}
