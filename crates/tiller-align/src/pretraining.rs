//! The base model's own training data, for the methods that regularise with it (ReFL's
//! pre-training loss, reward-weighted likelihood's): the source `[pretrain]` names
//! ([`crate::config::PretrainSection`]).
//!
//! - `testbed`: renderings of the training prompts, what the shipped base was trained on.
//! - `folder`: an image folder in the Hugging Face `imagefolder` layout, the one diffusers'
//!   `examples/text_to_image/train_text_to_image.py` trains on: image files (PNG or JPEG) beside a
//!   `metadata.jsonl` with one JSON object per line, `file_name` (relative to the folder) and the
//!   caption column (`text` unless `caption_column` says otherwise; a list of captions gives one at
//!   random per example, as that script does in training).
//! - `store`: every image a preference store holds feedback on in `split`, with the prompt it was
//!   made for (a dataset imported with `tiller feedback import`, or collected samples).
//!
//! Images are preprocessed as that script does: resized so the shorter side is the model's
//! resolution (PIL's bilinear filter, antialiased when shrinking: what torchvision's `Resize`
//! calls on PIL images), centre-cropped to a square (torchvision's `CenterCrop` offsets), scaled to
//! [-1, 1] (no flip: `--random_flip` is off by default). The resize runs in floating point, so
//! values differ from PIL's 8-bit output by under one level.
//!
//! Example `i` of a run is an entry drawn by stream `i` of the run's seed, the same whatever the
//! batch; every entry is checked when the source opens, images are decoded when drawn.

use crate::config::{PretrainData, PretrainSection};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use tiller_core::{Error, Result, SeededRng};
use tiller_feedback::images::decode_rgb;
use tiller_feedback::{ImageId, PreferenceStore, Query, Split, SqliteStore};
use tiller_testbed::{Image, Prompt, RenderConfig};

/// Salt of the per-example streams that draw pre-training examples.
const SALT: u64 = 0x7072_6574_7261_696e;

/// The metadata file of an image folder.
pub const METADATA: &str = "metadata.jsonl";

/// A run's pre-training examples: example index -> (prompt, pixels CHW in [-1, 1]).
pub enum Pretraining<'a> {
    /// Renderings of these prompts.
    Testbed {
        prompts: &'a [Prompt],
        render: RenderConfig,
        seed: u64,
    },
    /// An image folder's files or a store's images, each with its captions (a store's: its
    /// prompt).
    Images {
        entries: Vec<(Entry, Vec<String>)>,
        /// The store the entries are in (none for a folder).
        store: Option<Box<SqliteStore>>,
        /// The folder or the store, for errors.
        root: PathBuf,
        resolution: usize,
        seed: u64,
    },
}

/// Where a pre-training image's bytes are.
pub enum Entry {
    File(PathBuf),
    Stored(ImageId),
}

impl<'a> Pretraining<'a> {
    /// The source `section` names, for a model of `resolution` (square) trained on `prompts`
    /// (used by `testbed`); `path` is the section's path as the caller located it.
    pub fn open(
        section: &PretrainSection,
        path: &Path,
        prompts: &'a [Prompt],
        resolution: usize,
        seed: u64,
    ) -> Result<Self> {
        let (entries, store) = match section.source {
            PretrainData::Testbed => {
                return Ok(Pretraining::Testbed {
                    prompts,
                    render: RenderConfig {
                        resolution,
                        ..Default::default()
                    },
                    seed,
                });
            }
            PretrainData::Folder => {
                let files = read_folder(path, &section.caption_column)?;
                let entries = files
                    .into_iter()
                    .map(|(file, captions)| (Entry::File(file), captions))
                    .collect();
                (entries, None)
            }
            PretrainData::Store => {
                let (store, images) = read_store(path, &section.split)?;
                let entries = images
                    .into_iter()
                    .map(|(id, prompt)| (Entry::Stored(id), vec![prompt]))
                    .collect();
                (entries, Some(Box::new(store)))
            }
        };
        Ok(Pretraining::Images {
            entries,
            store,
            root: path.to_path_buf(),
            resolution,
            seed,
        })
    }

    /// Checks every caption or prompt with `check` (the model's tokenizer) before training, so a
    /// word the model cannot read is an error naming its file or image, not a failure mid-run.
    pub fn check_texts(&self, check: &dyn Fn(&str) -> Result<()>) -> Result<()> {
        let Pretraining::Images { entries, root, .. } = self else {
            return Ok(());
        };
        for (entry, captions) in entries {
            for c in captions {
                check(c).map_err(|e| {
                    Error::format(name(root, entry), format!("its caption {c:?}: {e}"))
                })?;
            }
        }
        Ok(())
    }

    /// Example `i`: its prompt and its image (CHW floats in [-1, 1]).
    pub fn example(&self, i: u64) -> Result<(String, Vec<f32>)> {
        let mut rng = SeededRng::for_example(self.seed() ^ SALT, i);
        match self {
            Pretraining::Testbed {
                prompts, render, ..
            } => {
                if prompts.is_empty() {
                    return Err(Error::invalid("no training prompts to render"));
                }
                let prompt = &prompts[rng.below(prompts.len())];
                let rendered =
                    tiller_testbed::render_prompt(prompt, render, rng.below(usize::MAX) as u64)?;
                let mut pixels = Vec::new();
                rendered.image.to_chw_floats(&mut pixels);
                Ok((prompt.text.clone(), pixels))
            }
            Pretraining::Images {
                entries,
                store,
                root,
                resolution,
                ..
            } => {
                let (entry, captions) = &entries[rng.below(entries.len())];
                let caption = &captions[rng.below(captions.len())];
                let bytes = match (entry, store) {
                    (Entry::File(path), _) => {
                        std::fs::read(path).map_err(|e| Error::io(path, e))?
                    }
                    (Entry::Stored(id), Some(store)) => store.image_bytes(id)?,
                    (Entry::Stored(id), None) => {
                        return Err(Error::invalid(format!(
                            "pre-training image {} names no open store",
                            id.0
                        )));
                    }
                };
                let image = decode_rgb(&bytes, &name(root, entry))?;
                Ok((caption.clone(), preprocess(&image, *resolution)))
            }
        }
    }

    fn seed(&self) -> u64 {
        match self {
            Pretraining::Testbed { seed, .. } | Pretraining::Images { seed, .. } => *seed,
        }
    }
}

/// An entry as errors name it: its file, or its image in the store.
fn name(root: &Path, entry: &Entry) -> PathBuf {
    match entry {
        Entry::File(path) => path.clone(),
        Entry::Stored(id) => root.join(format!("image {}", id.0)),
    }
}

/// The files and captions `metadata.jsonl` of `dir` lists; every error names the folder or the
/// line.
pub fn read_folder(dir: &Path, caption_column: &str) -> Result<Vec<(PathBuf, Vec<String>)>> {
    let meta = dir.join(METADATA);
    if !dir.is_dir() {
        return Err(Error::config(
            "pretrain.path",
            format!("{} is not a folder", dir.display()),
        ));
    }
    if !meta.is_file() {
        let csv = if dir.join("metadata.csv").is_file() {
            " (metadata.csv is not read: write it as metadata.jsonl)"
        } else {
            ""
        };
        return Err(Error::format(
            dir,
            format!(
                "no {METADATA}{csv}: an image folder lists its images one JSON object per line, \
                 {{\"file_name\": \"0001.png\", \"{caption_column}\": \"a caption\"}}"
            ),
        ));
    }
    let text = std::fs::read_to_string(&meta).map_err(|e| Error::io(&meta, e))?;
    let mut files = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |msg: String| Error::format(&meta, format!("line {line_no}: {msg}"));
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
        let row = value
            .as_object()
            .ok_or_else(|| bad("not a JSON object".into()))?;
        let keys = || row.keys().cloned().collect::<Vec<_>>().join(", ");
        let name = row
            .get("file_name")
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad(format!("no string `file_name` (keys: {})", keys())))?;
        let captions: Vec<String> = match row.get(caption_column) {
            Some(serde_json::Value::String(s)) => vec![s.clone()],
            Some(serde_json::Value::Array(list)) if !list.is_empty() => list
                .iter()
                .map(|c| c.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| bad(format!("`{caption_column}` is a list with a non-string")))?,
            _ => {
                return Err(bad(format!(
                    "no caption `{caption_column}` (a string or a non-empty list of strings; keys: {}); \
                     `pretrain.caption_column` names the key",
                    keys()
                )));
            }
        };
        let path = dir.join(name);
        if !path.is_file() {
            return Err(bad(format!("{} does not exist", path.display())));
        }
        files.push((path, captions));
    }
    if files.is_empty() {
        return Err(Error::format(&meta, "lists no images"));
    }
    Ok(files)
}

/// Every (image, prompt text) that feedback of `split` in the store at `dir` names, in the
/// store's order, each once.
fn read_store(dir: &Path, split: &str) -> Result<(SqliteStore, Vec<(ImageId, String)>)> {
    if !dir.join("preferences.sqlite").is_file() {
        return Err(Error::config(
            "pretrain.path",
            format!(
                "{} is not a preference store (no preferences.sqlite)",
                dir.display()
            ),
        ));
    }
    let store = SqliteStore::open(dir)?;
    let split_value = if split == "train" {
        Split::Train
    } else {
        Split::Test
    };
    let mut seen = BTreeSet::new();
    let mut images = Vec::new();
    for f in store.feedback(&Query::default().in_split(split_value))? {
        let prompt = store.prompt(f.prompt())?.ok_or_else(|| {
            Error::format(
                dir,
                format!("feedback names prompt {} which is not stored", f.prompt().0),
            )
        })?;
        for id in f.images() {
            if seen.insert((id.0.clone(), prompt.id.0.clone())) {
                images.push((id.clone(), prompt.text.clone()));
            }
        }
    }
    if images.is_empty() {
        return Err(Error::config(
            "pretrain.split",
            format!(
                "{} holds no feedback on images in the {split:?} split",
                dir.display()
            ),
        ));
    }
    Ok((store, images))
}

/// `image` as diffusers' training script feeds it: resized so the shorter side is `resolution`
/// (bilinear, antialiased), centre-cropped to `resolution` x `resolution`, CHW floats in [-1, 1].
pub fn preprocess(image: &Image, resolution: usize) -> Vec<f32> {
    let (w, h) = (image.width(), image.height());
    // torchvision's `Resize(size)`: the shorter side becomes `size`, the longer
    // `int(size * long / short)`.
    let (ow, oh) = if w <= h {
        (resolution, resolution * h / w)
    } else {
        (resolution * w / h, resolution)
    };
    let rgb: Vec<f32> = image.data().iter().map(|&v| v as f32).collect();
    let resized = resize_bilinear(&rgb, (w, h), (ow, oh));
    let (left, top) = (crop_offset(ow, resolution), crop_offset(oh, resolution));
    let mut out = Vec::with_capacity(3 * resolution * resolution);
    for c in 0..3 {
        for y in 0..resolution {
            for x in 0..resolution {
                out.push(resized[((y + top) * ow + x + left) * 3 + c] / 127.5 - 1.0);
            }
        }
    }
    out
}

/// torchvision's `CenterCrop` offset: `int(round((size - crop) / 2))`, Python's rounding (half to
/// even).
fn crop_offset(size: usize, crop: usize) -> usize {
    let d = size - crop;
    let half = d / 2;
    if d % 2 == 1 && half % 2 == 1 {
        half + 1
    } else {
        half
    }
}

/// Interleaved RGB of `from` = (width, height) resampled to `to`, PIL's `Image.resize` with the
/// bilinear filter: separable triangle-filter convolutions, the filter stretched by the scale
/// when shrinking (antialiasing), horizontal then vertical.
pub fn resize_bilinear(rgb: &[f32], from: (usize, usize), to: (usize, usize)) -> Vec<f32> {
    let (w, h) = from;
    let (ow, oh) = to;
    let xs = coefficients(w, ow);
    let mut wide = vec![0.0f32; h * ow * 3];
    for y in 0..h {
        for (x, (first, weights)) in xs.iter().enumerate() {
            for c in 0..3 {
                let v: f32 = weights
                    .iter()
                    .enumerate()
                    .map(|(k, wt)| wt * rgb[(y * w + first + k) * 3 + c])
                    .sum();
                wide[(y * ow + x) * 3 + c] = v;
            }
        }
    }
    let ys = coefficients(h, oh);
    let mut out = vec![0.0f32; oh * ow * 3];
    for (y, (first, weights)) in ys.iter().enumerate() {
        for x in 0..ow {
            for c in 0..3 {
                out[(y * ow + x) * 3 + c] = weights
                    .iter()
                    .enumerate()
                    .map(|(k, wt)| wt * wide[((first + k) * ow + x) * 3 + c])
                    .sum();
            }
        }
    }
    out
}

/// For each output position: the first input position and the normalised weights of the inputs
/// from there (PIL's `precompute_coeffs` with the bilinear filter, support 1).
fn coefficients(input: usize, output: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = input as f64 / output as f64;
    let filter_scale = scale.max(1.0);
    let support = filter_scale;
    (0..output)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            let first = ((center - support + 0.5).trunc().max(0.0)) as usize;
            let last = ((center + support + 0.5).trunc() as usize).min(input);
            let mut weights: Vec<f64> = (first..last)
                .map(|i| {
                    let x = (i as f64 - center + 0.5) / filter_scale;
                    (1.0 - x.abs()).max(0.0)
                })
                .collect();
            let total: f64 = weights.iter().sum();
            for wt in &mut weights {
                *wt /= total;
            }
            (first, weights.into_iter().map(|v| v as f32).collect())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halving_averages_four_inputs_with_pils_triangle_weights() {
        // Scale 2: the filter spans 4 inputs at distances 1.5, 0.5, 0.5, 1.5 from the centre,
        // weights 1 - d/2 = 0.25, 0.75, 0.75, 0.25, normalised to 1/8, 3/8, 3/8, 1/8; the edges
        // keep only the inputs inside the image (0.75, 0.75, 0.25, renormalised).
        let c = coefficients(8, 4);
        assert_eq!(c[1].0, 1);
        assert_eq!(c[1].1, vec![0.125, 0.375, 0.375, 0.125]);
        assert_eq!(c[0].0, 0);
        let w: Vec<f32> = c[0].1.iter().map(|v| v * 7.0).collect();
        assert_eq!(w, vec![3.0, 3.0, 1.0]);
        // Same size: each output is its input (a neighbour at distance 1 may be listed, weight 0).
        for (o, (first, weights)) in coefficients(5, 5).into_iter().enumerate() {
            assert_eq!((first, weights[0]), (o, 1.0));
            assert!(weights[1..].iter().all(|&w| w == 0.0), "{weights:?}");
        }
    }

    #[test]
    fn a_flat_image_stays_flat_through_any_resize() {
        let rgb: Vec<f32> = (0..7 * 5).flat_map(|_| [10.0, 200.0, 97.0]).collect();
        for to in [(3, 2), (14, 11), (7, 5), (4, 9)] {
            let out = resize_bilinear(&rgb, (7, 5), to);
            assert_eq!(out.len(), to.0 * to.1 * 3);
            for p in out.chunks(3) {
                for (v, want) in p.iter().zip([10.0, 200.0, 97.0]) {
                    assert!((v - want).abs() < 1e-4, "{p:?}");
                }
            }
        }
    }

    #[test]
    fn crops_at_torchvisions_offsets() {
        // (size - crop) / 2 rounded half to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 3 -> 3.
        assert_eq!(crop_offset(9, 8), 0);
        assert_eq!(crop_offset(11, 8), 2);
        assert_eq!(crop_offset(13, 8), 2);
        assert_eq!(crop_offset(14, 8), 3);
        assert_eq!(crop_offset(8, 8), 0);
    }
}
