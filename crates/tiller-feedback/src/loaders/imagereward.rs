//! ImageRewardDB (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for
//! Text-to-Image Generation", arXiv 2304.05977; Hugging Face `THUDM/ImageRewardDB`): the per-image
//! metadata, as a shard's JSON array or as `metadata-{train,validation,test}.parquet`, both with the
//! dataset card's columns (`shared/reference/ecosystem.md` §2):
//!
//! | column | becomes |
//! |---|---|
//! | `image_path` | the image, a file under [`ImageRewardOptions::image_root`] (the dataset's root: paths read `images/train/train_1/<uuid>.webp`) |
//! | `prompt_id`, `prompt` | the prompt (rows are grouped by `prompt_id`; its rows must share one text) |
//! | `rank` | within a prompt, every pair `i < j` in row order: the lower rank wins, equal ranks tie |
//! | `overall_rating` | a [`Rating`]: the raw value in `score`, stars = round(1 + (r − 1) · 4 / 6), so the 1–7 scale maps onto 1–5 |
//!
//! The card gives no annotator ids, so every judgement is `<dataset>/anonymous`. The reference doc
//! marks the 1–7 rating scale as unverified; a rating outside [1, 7] is an error, as is a NaN in any
//! numeric column. `image_text_alignment_rating`, `fidelity_rating`, `classification` and
//! `image_amount_in_total` are not read (the vocabulary has one overall rating per image).

use super::hpdv2::ranked_pairs;
use super::parquet_rows::Table;
use super::{Builder, Imported};
use crate::vocab::{Rating, Split, Stars};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tiller_core::{Error, Result};

/// How to read ImageRewardDB metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRewardOptions {
    /// The dataset name recorded in provenance and annotator ids. Default `imagerewarddb`.
    pub dataset: String,
    /// The split the file belongs to.
    pub split: Split,
    /// The folder `image_path` is relative to (the dataset's root).
    pub image_root: PathBuf,
}

impl ImageRewardOptions {
    /// ImageRewardDB with images under `image_root`.
    pub fn new(split: Split, image_root: impl Into<PathBuf>) -> Self {
        Self {
            dataset: "imagerewarddb".into(),
            split,
            image_root: image_root.into(),
        }
    }
}

/// The columns every row must have.
pub const REQUIRED_COLUMNS: [&str; 5] = [
    "image_path",
    "prompt_id",
    "prompt",
    "rank",
    "overall_rating",
];

/// One per-image row.
#[derive(Debug, Clone, Deserialize)]
struct Row {
    image_path: String,
    #[serde(deserialize_with = "string_or_number")]
    prompt_id: String,
    prompt: String,
    rank: f64,
    overall_rating: f64,
}

fn string_or_number<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<String, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Ok(s),
        serde_json::Value::Number(n) => Ok(n.to_string()),
        other => Err(serde::de::Error::custom(format!(
            "expected a string or a number, found {other}"
        ))),
    }
}

/// Reads a shard's JSON array of per-image records.
pub fn load_imagereward_json(path: &Path, options: &ImageRewardOptions) -> Result<Imported> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let rows: Vec<serde_json::Value> = serde_json::from_str(&text)
        .map_err(|e| Error::format(path, format!("not a JSON array: {e}")))?;
    let rows = rows
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            serde_json::from_value::<Row>(v)
                .map_err(|e| Error::format(path, format!("record {i}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    build(path, rows, options)
}

/// Reads `metadata-<split>.parquet`.
pub fn load_imagereward_parquet(path: &Path, options: &ImageRewardOptions) -> Result<Imported> {
    let table = Table::open(path)?;
    table.require(&REQUIRED_COLUMNS, "")?;
    let mut rows = Vec::new();
    table.for_each_row(&REQUIRED_COLUMNS, |v| {
        rows.push(Row {
            image_path: v.str("image_path")?,
            prompt_id: v.id("prompt_id")?,
            prompt: v.str("prompt")?,
            rank: v.f64("rank")?,
            overall_rating: v.f64("overall_rating")?,
        });
        Ok(())
    })?;
    build(path, rows, options)
}

fn build(path: &Path, rows: Vec<Row>, options: &ImageRewardOptions) -> Result<Imported> {
    let mut b = Builder::new(&options.dataset, options.split);
    // Group rows by prompt id, keeping first-seen order.
    let mut order: Vec<String> = Vec::new();
    let mut groups: std::collections::HashMap<String, Vec<(usize, Row)>> = Default::default();
    for (i, row) in rows.into_iter().enumerate() {
        if !groups.contains_key(&row.prompt_id) {
            order.push(row.prompt_id.clone());
        }
        groups
            .entry(row.prompt_id.clone())
            .or_default()
            .push((i, row));
    }
    for prompt_id in order {
        let group = &groups[&prompt_id];
        let text = &group[0].1.prompt;
        if let Some((i, r)) = group.iter().find(|(_, r)| &r.prompt != text) {
            return Err(Error::format(
                path,
                format!(
                    "row {i}: prompt_id {prompt_id} has text {:?}, but an earlier row has {text:?}",
                    r.prompt
                ),
            ));
        }
        let prompt = b.prompt(text);
        let provenance = b.provenance(None, None);
        let mut images = Vec::new();
        let mut ranks = Vec::new();
        for (i, r) in group {
            for (name, v) in [("rank", r.rank), ("overall_rating", r.overall_rating)] {
                if !v.is_finite() {
                    return Err(Error::NonFinite(format!(
                        "{}: row {i}, column `{name}` is {v}",
                        path.display()
                    )));
                }
            }
            if !(1.0..=7.0).contains(&r.overall_rating) {
                return Err(Error::format(
                    path,
                    format!(
                        "row {i}, column `overall_rating`: must be in [1, 7], got {}",
                        r.overall_rating
                    ),
                ));
            }
            let image = b.image_file(&options.image_root.join(&r.image_path))?;
            let stars = (1.0 + (r.overall_rating - 1.0) * 4.0 / 6.0).round() as u8;
            b.push(Rating {
                prompt: prompt.clone(),
                image: image.clone(),
                stars: Stars::new(stars)?,
                score: Some(r.overall_rating),
                provenance: provenance.clone(),
            });
            images.push(image);
            ranks.push(r.rank);
        }
        ranked_pairs(&mut b, &prompt, &images, &ranks, &provenance)
            .map_err(|m| Error::format(path, format!("prompt_id {prompt_id}: {m}")))?;
    }
    Ok(b.finish())
}
