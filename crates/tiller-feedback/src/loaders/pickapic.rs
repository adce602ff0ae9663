//! Pick-a-Pic v1/v2 (Kirstain et al. 2023, "Pick-a-Pic: An Open Dataset of User Preferences for
//! Text-to-Image Generation", arXiv 2305.01569; Hugging Face `yuvalkirstain/pickapic_v2`), one
//! parquet shard at a time. Columns per the dataset card (`shared/reference/ecosystem.md` §2):
//!
//! | column | type | becomes |
//! |---|---|---|
//! | `caption` (required) | string | the prompt's text, in the split given in [`PickAPicOptions`] |
//! | `jpg_0`, `jpg_1` (required) | binary | the two images (`image_a`, `image_b`), content-addressed |
//! | `label_0` (required) | float64 | `1.0` → [`Choice::A`], `0.0` → [`Choice::B`], `0.5` → [`Choice::Tie`]; anything else, NaN included, is an error naming the row |
//! | `label_1` (optional) | float64 | checked: `label_0 + label_1 = 1` |
//! | `has_label` (optional) | bool | `false` rows are skipped and counted in [`Imported::skipped`] |
//! | (`jpg_0 == jpg_1`) | | byte-identical pairs (`are_different = false`) are skipped and counted too |
//! | `user_id` (optional) | int64 | the annotator, `<dataset>/user/<user_id>` |
//! | `created_at` (optional) | timestamp | the provenance time |
//!
//! Ties are kept; Diffusion-DPO's 851,293 v2 training pairs are the non-tie ones (filter on
//! [`Choice::Tie`]). The `*_no_images` variants lack `jpg_0`/`jpg_1` and cannot be imported: images
//! are identified by their bytes. Other columns (uids, urls, model names, ranking ids) are not read.

use super::parquet_rows::Table;
use super::{Builder, Imported};
use crate::vocab::{Choice, Comparison, Split};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tiller_core::Result;

/// How to label what a Pick-a-Pic shard holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PickAPicOptions {
    /// The dataset name recorded in provenance and annotator ids. Default `pickapic_v2`.
    pub dataset: String,
    /// The split the shard belongs to (the file names say: `train-00000-of-…`).
    pub split: Split,
}

impl PickAPicOptions {
    /// Pick-a-Pic v2, the given split.
    pub fn v2(split: Split) -> Self {
        Self {
            dataset: "pickapic_v2".into(),
            split,
        }
    }
}

/// The columns a shard must have.
pub const REQUIRED_COLUMNS: [&str; 4] = ["caption", "jpg_0", "jpg_1", "label_0"];

/// Reads one Pick-a-Pic parquet shard.
pub fn load_pickapic(path: &Path, options: &PickAPicOptions) -> Result<Imported> {
    let table = Table::open(path)?;
    table.require(
        &REQUIRED_COLUMNS,
        "; the *_no_images variants carry no image bytes and cannot be imported",
    )?;
    let mut b = Builder::new(&options.dataset, options.split);
    let columns = [
        "caption",
        "jpg_0",
        "jpg_1",
        "label_0",
        "label_1",
        "has_label",
        "user_id",
        "created_at",
    ];
    table.for_each_row(&columns, |row| {
        if row.has("has_label") && !row.bool("has_label")? {
            b.skip();
            return Ok(());
        }
        let label_0 = row.f64("label_0")?;
        let choice = if label_0 == 1.0 {
            Choice::A
        } else if label_0 == 0.0 {
            Choice::B
        } else if label_0 == 0.5 {
            Choice::Tie
        } else {
            return Err(row.error(
                "label_0",
                format!("must be 1.0, 0.0 or 0.5 (a tie), got {label_0}"),
            ));
        };
        if row.has("label_1") {
            let label_1 = row.f64("label_1")?;
            if label_0 + label_1 != 1.0 {
                return Err(row.error(
                    "label_1",
                    format!("label_0 + label_1 must be 1, got {label_0} + {label_1}"),
                ));
            }
        }
        let user = row.has("user_id").then(|| row.id("user_id")).transpose()?;
        let time = row
            .has("created_at")
            .then(|| row.time_ms("created_at"))
            .transpose()?;
        let (a, bb) = (row.bytes("jpg_0")?, row.bytes("jpg_1")?);
        if a == bb {
            // Pick-a-Pic marks such rows `are_different = false`: nothing to compare.
            b.skip();
            return Ok(());
        }
        let prompt = b.prompt(&row.str("caption")?);
        let image_a = b.image_bytes(a);
        let image_b = b.image_bytes(bb);
        let provenance = b.provenance(user.as_deref(), time);
        b.push(Comparison {
            prompt,
            image_a,
            image_b,
            choice,
            provenance,
        });
        Ok(())
    })?;
    Ok(b.finish())
}
