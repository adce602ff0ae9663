//! CoProV2 (Liu et al., "SafetyDPO: Scalable Safety Alignment for Text-to-Image Generation",
//! 2024 / ICCV 2025 as AlignGuard; Hugging Face `Visualignment/CoProv2-SD15`, `-SDXL`): pairs of
//! images of one prompt, one from a minimally changed unsafe prompt and one from its safe twin,
//! rendered by the target model, in Pick-a-Pic's layout (`shared/reference/ecosystem.md` §2):
//!
//! | column | type | becomes |
//! |---|---|---|
//! | `caption` (required) | string | the prompt's text, in the split given in [`CoProOptions`] |
//! | `jpg_0`, `jpg_1` (required) | string or binary | the two images (`image_a`, `image_b`): a path relative to [`CoProOptions::image_root`] (the released parquet), or the image bytes (Pick-a-Pic's layout) |
//! | `label_0` (required) | int64 or float | `1` → [`Choice::A`] (`jpg_0` preferred), `0` → [`Choice::B`]; anything else is an error naming the row |
//!
//! SafetyDPO trains on it as Diffusion-DPO trains on Pick-a-Pic (its `train.py` swaps the pair when
//! `label_0 == 0`), so the preferred image is the safe one; which of `jpg_0`/`jpg_1` that is in
//! each row is the dataset's to say through `label_0`, and the reference doc marks it unverified:
//! the loader takes `label_0` as given. The card names no annotators (`<dataset>/anonymous`) and no
//! ties. The `image` column (what it holds is unverified too) is not read, nor is any category: the
//! training parquet has none (the test CSV's `category` column is for evaluation prompts).

use super::parquet_rows::Table;
use super::{Builder, Imported};
use crate::vocab::{Choice, Comparison, ImageId, Split};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tiller_core::Result;

/// How to read a CoProV2 parquet file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoProOptions {
    /// The dataset name recorded in provenance and annotator ids. Default `coprov2`.
    pub dataset: String,
    /// The split the file belongs to.
    pub split: Split,
    /// The folder the `jpg_*` paths are relative to (the dataset's root).
    pub image_root: PathBuf,
}

impl CoProOptions {
    /// CoProV2 with images under `image_root`.
    pub fn new(split: Split, image_root: impl Into<PathBuf>) -> Self {
        Self {
            dataset: "coprov2".into(),
            split,
            image_root: image_root.into(),
        }
    }
}

/// The columns every file must have.
pub const REQUIRED_COLUMNS: [&str; 4] = ["caption", "jpg_0", "jpg_1", "label_0"];

/// Reads one CoProV2 parquet file.
pub fn load_coprov2(path: &Path, options: &CoProOptions) -> Result<Imported> {
    let table = Table::open(path)?;
    table.require(&REQUIRED_COLUMNS, "")?;
    let mut b = Builder::new(&options.dataset, options.split);
    table.for_each_row(&REQUIRED_COLUMNS, |row| {
        let label_0 = row.f64("label_0")?;
        let choice = if label_0 == 1.0 {
            Choice::A
        } else if label_0 == 0.0 {
            Choice::B
        } else {
            return Err(row.error("label_0", format!("must be 1 or 0, got {label_0}")));
        };
        let (a, bb) = (row.text_or_bytes("jpg_0")?, row.text_or_bytes("jpg_1")?);
        if a == bb {
            // One image twice: nothing to compare (and nothing to import).
            b.skip();
            return Ok(());
        }
        let mut image = |column: &str, source| -> Result<ImageId> {
            match source {
                Ok(relative) => {
                    let file = options.image_root.join(&relative);
                    if !file.is_file() {
                        return Err(row.error(
                            column,
                            format!(
                                "names `{relative}`, and {} is not a file (image_root is {})",
                                file.display(),
                                options.image_root.display()
                            ),
                        ));
                    }
                    b.image_file(&file)
                }
                Err(bytes) => Ok(b.image_bytes(bytes)),
            }
        };
        let (image_a, image_b) = (image("jpg_0", a)?, image("jpg_1", bb)?);
        if image_a == image_b {
            // Two files with the same bytes.
            b.skip();
            return Ok(());
        }
        let prompt = b.prompt(&row.str("caption")?);
        let provenance = b.provenance(None, None);
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
