//! Export of sample sets in GenEval's layout, so outside scorers can check Tiller's numbers, and
//! sample grids.
//!
//! Layout, one folder per prompt (GenEval's `generation/diffusers_generate.py` writes the same):
//!
//! ```text
//! <dir>/00000/metadata.jsonl      one line: {"tag", "include", ["exclude",] "prompt"}
//! <dir>/00000/samples/0000.png    8-bit RGB at native resolution (32x32 or 64x64)
//! <dir>/00000/samples/0001.png
//! <dir>/00001/...
//! ```
//!
//! Metadata keys are GenEval's: `tag` (task), `prompt` (text), `include` (entries with `class`
//! one of circle/square/triangle/mark, `count`, optional `color` as the palette name, optional
//! `position` as `[relation, index]`) and, for counting, `exclude` (entries with `class`, `count`).

use crate::image::{Image, read_png, write_png};
use crate::palette::Rgb;
use crate::prompts::{Exclusion, Prompt, PromptSpec, Requirement, Task};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tiller_core::{Error, Result};

/// Colour of the 1-px gaps between images in a grid: white.
pub const GRID_GAP: Rgb = [255, 255, 255];

/// One metadata line, keys in GenEval's order.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetadataLine {
    tag: Task,
    include: Vec<Requirement>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    exclude: Vec<Exclusion>,
    prompt: String,
}

/// The metadata line GenEval expects for `prompt` (no trailing newline).
pub fn metadata_line(prompt: &Prompt) -> String {
    let line = MetadataLine {
        tag: prompt.spec.tag,
        include: prompt.spec.include.clone(),
        exclude: prompt.spec.exclude.clone(),
        prompt: prompt.text.clone(),
    };
    serde_json::to_string(&line).expect("plain data serialises")
}

fn create_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))
}

/// Writes `samples` (each a prompt and its images) under `dir` in GenEval's layout. Folder `i`
/// holds the i-th prompt; existing files of the same names are overwritten.
pub fn export_geneval(dir: &Path, samples: &[(Prompt, Vec<Image>)]) -> Result<()> {
    for (i, (prompt, images)) in samples.iter().enumerate() {
        let folder = dir.join(format!("{i:05}"));
        let sample_dir = folder.join("samples");
        create_dir(&sample_dir)?;
        let meta = folder.join("metadata.jsonl");
        std::fs::write(&meta, metadata_line(prompt) + "\n").map_err(|e| Error::io(&meta, e))?;
        for (j, image) in images.iter().enumerate() {
            image.resolution()?;
            write_png(&sample_dir.join(format!("{j:04}.png")), image)?;
        }
    }
    Ok(())
}

/// Reads a sample set written in GenEval's layout: the prompt folders in name order, each with its
/// samples in name order.
pub fn read_geneval(dir: &Path) -> Result<Vec<(Prompt, Vec<Image>)>> {
    let mut folders = sorted_entries(dir)?;
    folders.retain(|p| p.is_dir());
    let mut out = Vec::new();
    for folder in folders {
        let meta = folder.join("metadata.jsonl");
        let text = std::fs::read_to_string(&meta).map_err(|e| Error::io(&meta, e))?;
        let first = text
            .lines()
            .next()
            .ok_or_else(|| Error::format(&meta, "empty metadata file"))?;
        let line: MetadataLine = serde_json::from_str(first)
            .map_err(|e| Error::format(&meta, format!("bad GenEval metadata line: {e}")))?;
        let mut images = Vec::new();
        let mut files = sorted_entries(&folder.join("samples"))?;
        files.retain(|p| p.extension().is_some_and(|e| e == "png"));
        for f in files {
            images.push(read_png(&f)?);
        }
        out.push((
            Prompt {
                spec: PromptSpec {
                    tag: line.tag,
                    include: line.include,
                    exclude: line.exclude,
                },
                text: line.prompt,
            },
            images,
        ));
    }
    Ok(out)
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        entries.push(e.map_err(|e| Error::io(dir, e))?.path());
    }
    entries.sort();
    Ok(entries)
}

/// Tiles `images` (all the same size) row by row, `columns` per row, with a 1-px [`GRID_GAP`]
/// between neighbours and none around the edge.
pub fn grid(images: &[Image], columns: usize) -> Result<Image> {
    let first = images
        .first()
        .ok_or_else(|| Error::invalid("a grid needs at least one image"))?;
    if columns == 0 {
        return Err(Error::invalid("a grid needs at least one column"));
    }
    let (w, h) = (first.width(), first.height());
    if let Some(other) = images.iter().find(|i| (i.width(), i.height()) != (w, h)) {
        return Err(Error::invalid(format!(
            "grid images must share one size: {w}x{h} and {}x{}",
            other.width(),
            other.height()
        )));
    }
    let cols = columns.min(images.len());
    let rows = images.len().div_ceil(cols);
    let mut out = Image::filled(cols * (w + 1) - 1, rows * (h + 1) - 1, GRID_GAP);
    for (k, image) in images.iter().enumerate() {
        let (ox, oy) = ((k % cols) * (w + 1), (k / cols) * (h + 1));
        for y in 0..h {
            for x in 0..w {
                out.set(ox + x, oy + y, image.get(x, y));
            }
        }
    }
    Ok(out)
}

/// Writes [`grid`] of `images` to `path` as a PNG.
pub fn write_grid_png(path: &Path, images: &[Image], columns: usize) -> Result<()> {
    write_png(path, &grid(images, columns)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_places_images_with_one_pixel_gaps() {
        let a = Image::filled(2, 2, [1, 1, 1]);
        let b = Image::filled(2, 2, [2, 2, 2]);
        let c = Image::filled(2, 2, [3, 3, 3]);
        let g = grid(&[a, b, c], 2).unwrap();
        // Two columns: 2 + 1 + 2 wide; two rows: 2 + 1 + 2 high.
        assert_eq!((g.width(), g.height()), (5, 5));
        assert_eq!(g.get(0, 0), [1, 1, 1]);
        assert_eq!(g.get(2, 0), GRID_GAP);
        assert_eq!(g.get(3, 1), [2, 2, 2]);
        assert_eq!(g.get(1, 2), GRID_GAP);
        assert_eq!(g.get(0, 3), [3, 3, 3]);
        // The empty cell stays gap-coloured.
        assert_eq!(g.get(4, 4), GRID_GAP);
        assert!(grid(&[], 2).is_err());
        let e = grid(
            &[Image::filled(2, 2, [0; 3]), Image::filled(3, 2, [0; 3])],
            2,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("2x2 and 3x2"), "{e}");
    }
}
