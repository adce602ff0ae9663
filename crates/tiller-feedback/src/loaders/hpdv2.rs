//! HPDv2 (Wu et al. 2023, "Human Preference Score v2", arXiv 2306.09341; repository
//! `tgxs002/HPSv2`, Hugging Face `zhwang/HPDv2`): `train.json` and `test.json`, arrays of records
//! (`shared/reference/ecosystem.md` §2).
//!
//! | key | becomes |
//! |---|---|
//! | `prompt` | the prompt's text, in the split given in [`HpdOptions`] |
//! | `image_path` or `file_path` (HPSv2's original spelling; either is accepted, both must agree) | the images, files under [`HpdOptions::image_root`] |
//! | `human_preference` (train) | one-hot, 1 = preferred: one comparison of the preferred image against each other image, in list order |
//! | `user_hash` (train) | the annotator, `<dataset>/user/<user_hash>` |
//! | `raw_annotation` (test) | `[{rank, user_hash}]`: per annotator, every pair `i < j` of images; the lower rank wins, equal ranks tie |
//! | `rank` (test, when `raw_annotation` is absent) | the averaged rank, same rule, annotator `<dataset>/anonymous` |
//!
//! Rank 1 is the most preferred image (HPSv2 ranks by descending preference). Unknown keys are
//! ignored; a record with none of `human_preference`, `raw_annotation` and `rank`, lists of
//! different lengths, or a `human_preference` that is not one-hot is an error naming the record.

use super::{Builder, Imported};
use crate::vocab::{Choice, Comparison, ImageId, PromptId, Provenance, Split};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tiller_core::{Error, Result};

/// How to read an HPDv2 JSON file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HpdOptions {
    /// The dataset name recorded in provenance and annotator ids. Default `hpdv2`.
    pub dataset: String,
    /// The split the file belongs to.
    pub split: Split,
    /// The folder the records' image paths are relative to (`HPD/train` for `train.json`).
    pub image_root: PathBuf,
}

impl HpdOptions {
    /// HPDv2 with images under `image_root`.
    pub fn new(split: Split, image_root: impl Into<PathBuf>) -> Self {
        Self {
            dataset: "hpdv2".into(),
            split,
            image_root: image_root.into(),
        }
    }
}

#[derive(Deserialize)]
struct HpdRecord {
    prompt: String,
    #[serde(default)]
    image_path: Option<Vec<String>>,
    #[serde(default)]
    file_path: Option<Vec<String>>,
    #[serde(default)]
    human_preference: Option<Vec<i64>>,
    #[serde(default)]
    user_hash: Option<String>,
    #[serde(default)]
    rank: Option<Vec<f64>>,
    #[serde(default)]
    raw_annotation: Option<Vec<RawAnnotation>>,
}

#[derive(Deserialize)]
struct RawAnnotation {
    rank: Vec<f64>,
    #[serde(default)]
    user_hash: Option<String>,
}

/// Reads one HPDv2 JSON file.
pub fn load_hpdv2(path: &Path, options: &HpdOptions) -> Result<Imported> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let records: Vec<HpdRecord> = serde_json::from_str(&text)
        .map_err(|e| Error::format(path, format!("not an array of HPDv2 records: {e}")))?;
    let mut b = Builder::new(&options.dataset, options.split);
    for (i, r) in records.iter().enumerate() {
        let bad = |m: String| Error::format(path, format!("record {i}: {m}"));
        let paths = match (&r.image_path, &r.file_path) {
            (Some(a), Some(f)) if a != f => {
                return Err(bad("`image_path` and `file_path` disagree".into()));
            }
            (Some(p), _) | (None, Some(p)) => p,
            (None, None) => {
                return Err(bad("has neither `image_path` nor `file_path`".into()));
            }
        };
        if paths.len() < 2 {
            return Err(bad(format!(
                "needs at least two images, has {}",
                paths.len()
            )));
        }
        let prompt = b.prompt(&r.prompt);
        let images = paths
            .iter()
            .map(|p| b.image_file(&options.image_root.join(p)))
            .collect::<Result<Vec<_>>>()?;
        if let Some(pref) = &r.human_preference {
            if pref.len() != images.len() {
                return Err(bad(format!(
                    "`human_preference` has {} entries for {} images",
                    pref.len(),
                    images.len()
                )));
            }
            let winners: Vec<usize> = (0..pref.len()).filter(|k| pref[*k] == 1).collect();
            if winners.len() != 1 || pref.iter().any(|p| *p != 0 && *p != 1) {
                return Err(bad(format!(
                    "`human_preference` must be one-hot (one 1, the rest 0), got {pref:?}"
                )));
            }
            let provenance = b.provenance(r.user_hash.as_deref(), None);
            let w = winners[0];
            for k in (0..images.len()).filter(|k| *k != w) {
                let (lo, hi) = (w.min(k), w.max(k));
                let choice = if lo == w { Choice::A } else { Choice::B };
                push(&mut b, &prompt, &images, lo, hi, choice, &provenance);
            }
        } else if let Some(raw) = r.raw_annotation.as_ref().filter(|r| !r.is_empty()) {
            for a in raw {
                let provenance = b.provenance(a.user_hash.as_deref(), None);
                ranked_pairs(&mut b, &prompt, &images, &a.rank, &provenance)
                    .map_err(|m| bad(format!("`raw_annotation`: {m}")))?;
            }
        } else if let Some(rank) = &r.rank {
            let provenance = b.provenance(None, None);
            ranked_pairs(&mut b, &prompt, &images, rank, &provenance)
                .map_err(|m| bad(format!("`rank`: {m}")))?;
        } else {
            return Err(bad(
                "has none of `human_preference`, `raw_annotation` and `rank`".into(),
            ));
        }
    }
    Ok(b.finish())
}

fn push(
    b: &mut Builder,
    prompt: &PromptId,
    images: &[ImageId],
    i: usize,
    j: usize,
    choice: Choice,
    provenance: &Provenance,
) {
    b.push(Comparison {
        prompt: prompt.clone(),
        image_a: images[i].clone(),
        image_b: images[j].clone(),
        choice,
        provenance: provenance.clone(),
    });
}

/// Every pair `i < j`: the lower rank wins, equal ranks tie.
pub(crate) fn ranked_pairs(
    b: &mut Builder,
    prompt: &PromptId,
    images: &[ImageId],
    rank: &[f64],
    provenance: &Provenance,
) -> std::result::Result<(), String> {
    if rank.len() != images.len() {
        return Err(format!("{} ranks for {} images", rank.len(), images.len()));
    }
    if let Some(r) = rank.iter().find(|r| !r.is_finite()) {
        return Err(format!("rank {r} is not finite"));
    }
    for i in 0..images.len() {
        for j in i + 1..images.len() {
            if images[i] == images[j] {
                continue;
            }
            let choice = match rank[i].partial_cmp(&rank[j]) {
                Some(std::cmp::Ordering::Less) => Choice::A,
                Some(std::cmp::Ordering::Greater) => Choice::B,
                _ => Choice::Tie,
            };
            push(b, prompt, images, i, j, choice, provenance);
        }
    }
    Ok(())
}
