//! Where two models' images differ: two `tiller eval` folders on the same prompts and seeds
//! matched image by image, the first's gold regions (the forbidden marks, or every factor's
//! region at fault) widened by `dilate` pixels, and per image the mean absolute change (a
//! fraction of the value range, over pixels and channels) outside those regions and inside
//! them. A region-aware method (Focus-N-Fix) should change the inside and leave the outside; a
//! global one changes both.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use tiller_core::{Error, Result};
use tiller_reward::localize::{GoldRegion, GoldRegions, Localizer, dilate};
use tiller_testbed::image::read_png;
use tiller_testbed::{Image, Mask};

#[derive(Debug, Deserialize)]
struct Line {
    filename: String,
    tag: String,
    prompt: String,
    prompt_index: usize,
    image_index: usize,
    mark: bool,
}

/// A mean over images and its standard error.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mean {
    pub n: usize,
    pub mean: f64,
    pub se: f64,
}

impl Mean {
    fn of(v: &[f64]) -> Self {
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

/// The change from A's images to B's, outside and inside A's gold regions.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionChange {
    pub region: GoldRegion,
    pub images: usize,
    /// Mean absolute change outside the regions, per image (every image).
    pub outside: Mean,
    /// Inside the regions, per image that has any.
    pub inside: Mean,
    /// Share of the outside pixels whose largest channel change exceeds 10 % of the range.
    pub changed_outside: f64,
}

fn lines(dir: &Path) -> Result<BTreeMap<(usize, usize), Line>> {
    let path = dir.join("results.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let mut out = BTreeMap::new();
    for (i, l) in text.lines().enumerate() {
        let line: Line = serde_json::from_str(l)
            .map_err(|e| Error::format(&path, format!("line {}: {e}", i + 1)))?;
        let key = (line.prompt_index, line.image_index);
        if out.insert(key, line).is_some() {
            return Err(Error::format(
                &path,
                format!("line {} repeats image {key:?}", i + 1),
            ));
        }
    }
    Ok(out)
}

/// How often A and B draw the forbidden mark on the same images, for one group of prompts.
#[derive(Debug, Clone, PartialEq)]
pub struct MarkRow {
    /// `unsafe` (the prompts that ask for it) or `benign` (all others).
    pub prompts: &'static str,
    pub n: usize,
    pub rate_a: f64,
    pub rate_b: f64,
    /// Standard error of `rate_b - rate_a` from the per-image differences.
    pub se: f64,
    /// Images where only A, or only B, draws it.
    pub only_a: usize,
    pub only_b: usize,
}

/// The mark rates of folders `a` and `b` image by image, on the unsafe and the benign prompts
/// (groups without images are left out); errors if the folders hold different images.
pub fn mark_rates(a: &Path, b: &Path) -> Result<Vec<MarkRow>> {
    let (la, lb) = (lines(a)?, lines(b)?);
    if la.len() != lb.len() {
        return Err(different_sizes(la.len(), lb.len()));
    }
    let mut groups: [(&'static str, Vec<(bool, bool)>); 2] =
        [("unsafe", Vec::new()), ("benign", Vec::new())];
    for (key, x) in &la {
        let y = matched(key, x, &lb, a, b)?;
        groups[usize::from(x.tag != "unsafe")]
            .1
            .push((x.mark, y.mark));
    }
    Ok(groups
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(prompts, v)| {
            let n = v.len();
            let d: Vec<f64> = v
                .iter()
                .map(|&(x, y)| f64::from(u8::from(y)) - f64::from(u8::from(x)))
                .collect();
            let count = |f: &dyn Fn(&(bool, bool)) -> bool| v.iter().filter(|p| f(p)).count();
            MarkRow {
                prompts,
                n,
                rate_a: count(&|p| p.0) as f64 / n as f64,
                rate_b: count(&|p| p.1) as f64 / n as f64,
                se: Mean::of(&d).se,
                only_a: count(&|p| p.0 && !p.1),
                only_b: count(&|p| p.1 && !p.0),
            }
        })
        .collect())
}

fn different_sizes(a: usize, b: usize) -> Error {
    Error::invalid(format!(
        "the runs have {a} and {b} images; evaluate both on the same suite, --tasks, --per-task, --per-prompt and --seed"
    ))
}

/// `b`'s line for `a`'s image `key`, which must be there with the same prompt.
fn matched<'l>(
    key: &(usize, usize),
    x: &Line,
    lb: &'l BTreeMap<(usize, usize), Line>,
    a: &Path,
    b: &Path,
) -> Result<&'l Line> {
    let y = lb.get(key).ok_or_else(|| {
        Error::invalid(format!(
            "image {key:?} of `{}` is missing from `{}`",
            a.display(),
            b.display()
        ))
    })?;
    if x.prompt != y.prompt {
        return Err(Error::invalid(format!(
            "prompt {} differs (\"{}\" vs \"{}\"); the runs used different suites",
            key.0, x.prompt, y.prompt
        )));
    }
    Ok(y)
}

/// Per pixel, the mean and the largest absolute channel change from `a` to `b`, in [0, 1].
fn pixel_changes(a: &Image, b: &Image) -> Vec<(f64, f64)> {
    a.data()
        .chunks(3)
        .zip(b.data().chunks(3))
        .map(|(p, q)| {
            let d: Vec<f64> = p
                .iter()
                .zip(q)
                .map(|(x, y)| (f64::from(*x) - f64::from(*y)).abs() / 255.0)
                .collect();
            (
                d.iter().sum::<f64>() / 3.0,
                d.iter().cloned().fold(0.0, f64::max),
            )
        })
        .collect()
}

/// The change from folder `a`'s images to folder `b`'s, outside and inside `a`'s gold
/// `region`s widened by `dilation` pixels; errors if the folders hold different images.
pub fn region_change(
    a: &Path,
    b: &Path,
    region: GoldRegion,
    dilation: usize,
) -> Result<RegionChange> {
    let (la, lb) = (lines(a)?, lines(b)?);
    if la.len() != lb.len() {
        return Err(different_sizes(la.len(), lb.len()));
    }
    let localizer = GoldRegions::new(region);
    let (mut outside, mut inside) = (Vec::new(), Vec::new());
    let (mut changed, mut out_pixels) = (0usize, 0usize);
    for (key, x) in &la {
        let y = matched(key, x, &lb, a, b)?;
        let (ia, ib) = (
            read_png(&a.join(&x.filename))?,
            read_png(&b.join(&y.filename))?,
        );
        if (ia.width(), ia.height()) != (ib.width(), ib.height()) {
            return Err(Error::invalid(format!(
                "image {key:?} is {}x{} in `{}` and {}x{} in `{}`",
                ia.width(),
                ia.height(),
                a.display(),
                ib.width(),
                ib.height(),
                b.display()
            )));
        }
        let mask: Mask = dilate(
            &localizer.localize(std::slice::from_ref(&ia), std::slice::from_ref(&x.prompt))?[0],
            dilation,
        );
        let (mut so, mut no, mut si, mut ni) = (0.0, 0usize, 0.0, 0usize);
        for (d, &set) in pixel_changes(&ia, &ib).iter().zip(&mask.bits) {
            if set {
                si += d.0;
                ni += 1;
            } else {
                so += d.0;
                no += 1;
                changed += usize::from(d.1 > 0.1);
            }
        }
        out_pixels += no;
        if no > 0 {
            outside.push(so / no as f64);
        }
        if ni > 0 {
            inside.push(si / ni as f64);
        }
    }
    Ok(RegionChange {
        region,
        images: la.len(),
        outside: Mean::of(&outside),
        inside: Mean::of(&inside),
        changed_outside: changed as f64 / out_pixels.max(1) as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tiller_testbed::image::write_png;
    use tiller_testbed::{PromptGenerator, RenderConfig, Split, Task, render_prompt};

    /// An eval folder of `images` (prompt, image, whether the mark is drawn), all `unsafe`.
    fn folder(tag: &str, images: &[(&str, &Image, bool)]) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("tiller-locality-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut lines = String::new();
        for (i, (prompt, im, mark)) in images.iter().enumerate() {
            let file = format!("geneval/{i:05}/samples/0000.png");
            std::fs::create_dir_all(dir.join(&file).parent().unwrap()).unwrap();
            write_png(&dir.join(&file), im).unwrap();
            lines.push_str(&format!(
                "{{\"filename\":\"{file}\",\"tag\":\"unsafe\",\"prompt\":\"{prompt}\",\"prompt_index\":{i},\"image_index\":0,\"correct\":false,\"aesthetic\":0.0,\"mark\":{mark}}}\n"
            ));
        }
        std::fs::write(dir.join("results.jsonl"), lines).unwrap();
        dir
    }

    #[test]
    fn changes_inside_the_marks_and_outside_them_are_told_apart() {
        let p = PromptGenerator::new(0)
            .prompt(Task::Unsafe, Split::Train)
            .unwrap();
        let a = render_prompt(&p, &RenderConfig::default(), 3)
            .unwrap()
            .image;
        let marks = GoldRegions::new(GoldRegion::Marks)
            .localize(std::slice::from_ref(&a), std::slice::from_ref(&p.text))
            .unwrap()
            .remove(0);
        assert!(!marks.is_empty());
        // B1: the mark's pixels set to black (a change inside only); B2: additionally the first
        // pixel outside the widened mask set to the opposite extreme in every channel.
        let mut inside = a.data().to_vec();
        for (k, &set) in marks.bits.iter().enumerate() {
            if set {
                inside[3 * k..3 * k + 3].copy_from_slice(&[0, 0, 0]);
            }
        }
        let b1 = Image::from_rgb(a.width(), a.height(), inside.clone()).unwrap();
        let widened = dilate(&marks, 1);
        let k = widened.bits.iter().position(|s| !s).unwrap();
        let mut outside = inside;
        for c in 0..3 {
            outside[3 * k + c] = 255 - a.data()[3 * k + c];
        }
        let b2 = Image::from_rgb(a.width(), a.height(), outside).unwrap();
        let fa = folder("a", &[(&p.text, &a, true), (&p.text, &a, true)]);
        let fb = folder("b", &[(&p.text, &b1, false), (&p.text, &b2, true)]);
        let c = region_change(&fa, &fb, GoldRegion::Marks, 1).unwrap();
        assert_eq!((c.images, c.inside.n, c.outside.n), (2, 2, 2));
        // Outside: zero for B1; for B2 one pixel's change over the outside pixels.
        let one: f64 = (0..3)
            .map(|ch| f64::from((255 - 2 * i32::from(a.data()[3 * k + ch])).abs()) / 255.0)
            .sum::<f64>()
            / 3.0;
        let n_out = (widened.bits.len() - widened.count()) as f64;
        assert!((c.outside.mean - one / n_out / 2.0).abs() < 1e-12, "{c:?}");
        assert!(c.inside.mean > 0.1, "{c:?}");
        let largest = (0..3)
            .map(|ch| f64::from((255 - 2 * i32::from(a.data()[3 * k + ch])).abs()) / 255.0)
            .fold(0.0, f64::max);
        let changed = f64::from(u8::from(largest > 0.1)) / (2.0 * n_out);
        assert!((c.changed_outside - changed).abs() < 1e-12, "{c:?}");
        // A draws the mark twice, B once: differences (-1, 0), SE = sd / sqrt(2) = 0.5.
        let rates = mark_rates(&fa, &fb).unwrap();
        assert_eq!(rates.len(), 1);
        let r = &rates[0];
        assert_eq!((r.prompts, r.n, r.only_a, r.only_b), ("unsafe", 2, 1, 0));
        assert_eq!((r.rate_a, r.rate_b), (1.0, 0.5));
        assert!((r.se - 0.5).abs() < 1e-12, "{r:?}");
        // The same folder against itself: no change anywhere.
        let same = region_change(&fa, &fa, GoldRegion::Faults, 1).unwrap();
        assert_eq!((same.outside.mean, same.inside.mean), (0.0, 0.0));
        // A folder with other images is refused.
        let fc = folder("c", &[(&p.text, &a, true)]);
        assert!(region_change(&fa, &fc, GoldRegion::Marks, 1).is_err());
        for d in [fa, fb, fc] {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
