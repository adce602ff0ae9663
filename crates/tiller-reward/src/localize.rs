//! Localisers: where in an image a problem is, as a pixel mask. Region-aware fine-tuning
//! (Focus-N-Fix, Xing et al. CVPR 2025) lets only these pixels change; the paper takes them from
//! heatmaps of artefacts, over-sexualisation or violence (RichHF-style region heads) and saliency
//! maps. Here:
//!
//! - [`GoldRegions`]: the testbed's gold evaluator: the forbidden marks' pixels, or every
//!   factor's region at fault (the truth a learned localiser is measured against);
//! - [`RegionHead`]: a reward folder's region head ([`crate::RewardNetConfig::region_head`]):
//!   the members' mean per-cell probability of the chosen factors' flaws above a threshold;
//! - [`FixedBox`]: one rectangle, the same for every image (a problem at a known place, such as a
//!   watermark corner).
//!
//! [`dilate`] widens any of them by whole pixels.

use crate::{LearnedReward, check_lengths, images_to_tensor};
use burn::tensor::activation::sigmoid;
use serde::{Deserialize, Serialize};
use tiller_core::{Error, Result};
use tiller_testbed::{Evaluation, Evaluator, Image, Mask, PromptSpec};

/// Where a problem is in each image.
pub trait Localizer {
    /// A short name for logs and errors.
    fn name(&self) -> String;
    /// One mask per image, the image's size: set where `images[i]` shows the problem for
    /// `prompts[i]` (the pixels that may change). Lengths must match.
    fn localize(&self, images: &[Image], prompts: &[String]) -> Result<Vec<Mask>>;
}

/// Which of the gold evaluator's regions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GoldRegion {
    /// The forbidden marks' pixels (the testbed's unsafe content), asked for or not.
    Marks,
    /// Every factor's region at fault: objects that should not be there or are misplaced,
    /// miscoloured or swapped, the aesthetic components' faulty pixels, and the marks.
    Faults,
}

/// The gold evaluator as a localiser (32x32 or 64x64 images of the Shapes world).
#[derive(Debug, Clone)]
pub struct GoldRegions {
    pub evaluator: Evaluator,
    pub region: GoldRegion,
}

impl GoldRegions {
    pub fn new(region: GoldRegion) -> Self {
        Self {
            evaluator: Evaluator::default(),
            region,
        }
    }
}

impl Localizer for GoldRegions {
    fn name(&self) -> String {
        match self.region {
            GoldRegion::Marks => "gold-marks".into(),
            GoldRegion::Faults => "gold-faults".into(),
        }
    }

    fn localize(&self, images: &[Image], prompts: &[String]) -> Result<Vec<Mask>> {
        check_lengths(images, prompts)?;
        images
            .iter()
            .zip(prompts)
            .map(|(im, p)| {
                let e = self.evaluator.evaluate(im, &PromptSpec::parse(p)?)?;
                Ok(self.region.mask(&e))
            })
            .collect()
    }
}

impl GoldRegion {
    /// This region of one evaluation's image.
    pub fn mask(self, e: &Evaluation) -> Mask {
        let mut m = e.mark.mask.clone();
        if self == GoldRegion::Faults {
            let f = &e.factors;
            let a = &e.parsed.aesthetics;
            let parts = [Some(&f.presence), Some(&f.count)]
                .into_iter()
                .chain([f.color.as_ref(), f.position.as_ref(), f.binding.as_ref()])
                .flatten()
                .chain([&a.border, &a.clean_background, &a.balance, &a.crisp_edges]);
            for factor in parts {
                m.union_with(&factor.mask);
            }
        }
        m
    }
}

/// A reward folder's region head as a localiser: a pixel is set when the members' mean
/// probability that its cell shows a flaw of any of `factors` is above `threshold` (cells are
/// 4x4 pixels: the head reads the quarter-resolution features).
pub struct RegionHead<'a> {
    pub reward: &'a LearnedReward,
    /// Indices into the reward's factors.
    pub factors: Vec<usize>,
    pub threshold: f64,
}

impl<'a> RegionHead<'a> {
    /// `factors` by name (empty: all of the reward's); errors name an unknown factor, or a
    /// reward without a region head.
    pub fn new(reward: &'a LearnedReward, factors: &[String], threshold: f64) -> Result<Self> {
        if !reward.has_region_head() {
            return Err(Error::config(
                "reward",
                format!(
                    "`{}` has no region head (net.region_head); train one with region marks, or localise otherwise",
                    reward.name
                ),
            ));
        }
        let indices = if factors.is_empty() {
            (0..reward.factors.len()).collect()
        } else {
            factors
                .iter()
                .map(|f| {
                    reward.factors.iter().position(|g| g == f).ok_or_else(|| {
                        Error::config(
                            "factors",
                            format!(
                                "`{f}` is not a factor of `{}` (valid: {})",
                                reward.name,
                                reward.factors.join(", ")
                            ),
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?
        };
        Ok(Self {
            reward,
            factors: indices,
            threshold,
        })
    }
}

impl Localizer for RegionHead<'_> {
    fn name(&self) -> String {
        format!("region-head:{}", self.reward.name)
    }

    fn localize(&self, images: &[Image], prompts: &[String]) -> Result<Vec<Mask>> {
        check_lengths(images, prompts)?;
        let mut out = Vec::with_capacity(images.len());
        for (ims, ps) in images.chunks(64).zip(prompts.chunks(64)) {
            let x = images_to_tensor(ims, &self.reward.device)?;
            let ids = self.reward.token_ids(ps)?;
            let members = &self.reward.ensemble.members;
            let mut mean: Option<burn::tensor::Tensor<4>> = None;
            for m in members {
                let logits = m.forward(x.clone(), &ids)?.region_logits.ok_or_else(|| {
                    Error::invalid(format!(
                        "a member of `{}` has no region head",
                        self.reward.name
                    ))
                })?;
                let p = sigmoid(logits);
                mean = Some(match mean {
                    None => p,
                    Some(s) => s + p,
                });
            }
            let mean = mean.ok_or_else(|| Error::invalid("an ensemble without members"))?
                / members.len() as f64;
            let [b, f, ch, cw] = mean.dims();
            let probs = mean
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .map_err(|e| Error::invalid(format!("{e:?}")))?;
            for (i, im) in ims.iter().enumerate() {
                let (w, h) = (im.width(), im.height());
                let mut mask = Mask::empty(w, h);
                for y in 0..h {
                    for x in 0..w {
                        let (cy, cx) = ((y * ch / h).min(ch - 1), (x * cw / w).min(cw - 1));
                        let set = self.factors.iter().any(|&k| {
                            f64::from(probs[((i * f + k) * ch + cy) * cw + cx]) > self.threshold
                        });
                        if set {
                            mask.set(x, y);
                        }
                    }
                }
                out.push(mask);
            }
            debug_assert_eq!(b, ims.len());
        }
        Ok(out)
    }
}

/// One rectangle `[x0, y0, x1, y1]` in fractions of the image's width and height (x0 < x1,
/// y0 < y1, all in [0, 1]): pixels whose centres fall inside are set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FixedBox(pub [f64; 4]);

impl FixedBox {
    /// Checks the corners; `field` names the setting in the error.
    pub fn new(corners: [f64; 4], field: &str) -> Result<Self> {
        let [x0, y0, x1, y1] = corners;
        let unit = corners.iter().all(|v| (0.0..=1.0).contains(v));
        if !unit || x0 >= x1 || y0 >= y1 {
            return Err(Error::config(
                field,
                format!(
                    "{corners:?} is not a box [x0, y0, x1, y1] with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1"
                ),
            ));
        }
        Ok(Self(corners))
    }
}

impl Localizer for FixedBox {
    fn name(&self) -> String {
        format!("box:{:?}", self.0)
    }

    fn localize(&self, images: &[Image], prompts: &[String]) -> Result<Vec<Mask>> {
        check_lengths(images, prompts)?;
        let [x0, y0, x1, y1] = self.0;
        Ok(images
            .iter()
            .map(|im| {
                let (w, h) = (im.width(), im.height());
                let mut m = Mask::empty(w, h);
                for y in 0..h {
                    for x in 0..w {
                        let (u, v) = ((x as f64 + 0.5) / w as f64, (y as f64 + 0.5) / h as f64);
                        if u >= x0 && u < x1 && v >= y0 && v < y1 {
                            m.set(x, y);
                        }
                    }
                }
                m
            })
            .collect())
    }
}

/// `mask` widened by `radius` pixels (every pixel within Chebyshev distance `radius` of a set
/// one), e.g. to take in the soft edge around a detected region.
pub fn dilate(mask: &Mask, radius: usize) -> Mask {
    let mut out = mask.clone();
    for _ in 0..radius {
        let ring = out.ring();
        out.union_with(&ring);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tiller_testbed::{RenderConfig, render_prompt};

    #[test]
    fn gold_marks_are_the_marks_pixels_and_faults_contain_them() {
        use tiller_testbed::prompts::{PromptGenerator, Split, Task};
        let mut prompts = PromptGenerator::new(0);
        let unsafe_prompt = prompts.prompt(Task::Unsafe, Split::Train).unwrap();
        let image = render_prompt(&unsafe_prompt, &RenderConfig::default(), 3)
            .unwrap()
            .image;
        let texts = vec![unsafe_prompt.text.clone()];
        let marks = GoldRegions::new(GoldRegion::Marks)
            .localize(std::slice::from_ref(&image), &texts)
            .unwrap();
        let faults = GoldRegions::new(GoldRegion::Faults)
            .localize(std::slice::from_ref(&image), &texts)
            .unwrap();
        assert!(
            marks[0].count() > 10,
            "`{}`: the mark is drawn ({} pixels)",
            texts[0],
            marks[0].count()
        );
        assert!(
            marks[0]
                .bits
                .iter()
                .zip(&faults[0].bits)
                .all(|(m, f)| !m || *f)
        );
        // A benign prompt's render has no mark.
        let benign = prompts.prompt(Task::Colors, Split::Train).unwrap();
        let im = render_prompt(&benign, &RenderConfig::default(), 3)
            .unwrap()
            .image;
        let m = GoldRegions::new(GoldRegion::Marks)
            .localize(&[im], std::slice::from_ref(&benign.text))
            .unwrap();
        assert!(m[0].is_empty());
    }

    #[test]
    fn a_box_sets_the_pixels_whose_centres_it_holds_and_dilation_widens_it() {
        let im = Image::from_rgb(8, 4, vec![0; 8 * 4 * 3]).unwrap();
        let m = FixedBox::new([0.0, 0.0, 0.5, 0.5], "mask_box").unwrap();
        let m = &m.localize(&[im], &["x".into()]).unwrap()[0];
        assert_eq!(m.count(), 4 * 2);
        assert!(m.get(3, 1) && !m.get(4, 1) && !m.get(3, 2));
        let d = dilate(m, 1);
        assert_eq!(d.count(), 5 * 3);
        assert!(FixedBox::new([0.5, 0.0, 0.5, 1.0], "mask_box").is_err());
        assert!(FixedBox::new([0.0, 0.0, 1.5, 1.0], "mask_box").is_err());
    }

    #[test]
    fn a_region_head_sets_the_cells_whose_mean_probability_passes_the_threshold() {
        use crate::{RewardEnsemble, RewardModelConfig, RewardNetConfig};
        let device = burn::tensor::Device::default();
        let text: tiller_diffusion::models::clip::ClipTextConfig =
            serde_json::from_value(serde_json::json!({
                "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
                "projection_dim": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                "max_position_embeddings": 32, "hidden_act": "quick_gelu",
                "layer_norm_eps": 1e-5, "eos_token_id": 1, "bos_token_id": 0, "pad_token_id": 1
            }))
            .unwrap();
        let mut net = RewardNetConfig::new(text);
        net.image_channels = 4;
        net.hidden = 16;
        net.region_head = true;
        let config = RewardModelConfig {
            kind: crate::ensemble::KIND.into(),
            members: 2,
            net,
        };
        let ensemble = RewardEnsemble::init(&config, &device).unwrap();
        let reward = LearnedReward {
            name: "test".into(),
            factors: config.net.factors.clone(),
            ensemble,
            tokenizer: tiller_testbed::Tokenizer::shapes(),
            device: device.clone(),
        };
        let mut prompts = tiller_testbed::PromptGenerator::new(1);
        let p = prompts
            .prompt(tiller_testbed::Task::Unsafe, tiller_testbed::Split::Train)
            .unwrap();
        let image = render_prompt(&p, &RenderConfig::default(), 0)
            .unwrap()
            .image;
        let texts = vec![p.text.clone()];
        // The members' mean probability of factor 5 (`no_mark`) per 4x4 cell, by hand.
        let x = images_to_tensor(std::slice::from_ref(&image), &device).unwrap();
        let ids = reward.token_ids(&texts).unwrap();
        let mut mean = vec![0.0f64; 8 * 8];
        for m in &reward.ensemble.members {
            let l = m.forward(x.clone(), &ids).unwrap().region_logits.unwrap();
            let v = l
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .unwrap();
            for (c, slot) in mean.iter_mut().enumerate() {
                let z = f64::from(v[5 * 64 + c]);
                *slot += 0.5 / (1.0 + (-z).exp());
            }
        }
        let mut sorted = mean.clone();
        sorted.sort_by(f64::total_cmp);
        // Midway across the widest gap between two neighbouring cells' probabilities in the
        // middle of the range (cells of plain background tie), so that no cell lies within
        // rounding of the threshold, whatever the random initialisation.
        let j = (16..48)
            .max_by(|&a, &b| (sorted[a + 1] - sorted[a]).total_cmp(&(sorted[b + 1] - sorted[b])))
            .unwrap();
        assert!(sorted[j + 1] - sorted[j] > 1e-5, "{sorted:?}");
        let threshold = 0.5 * (sorted[j] + sorted[j + 1]);
        let head = RegionHead::new(&reward, &["no_mark".to_string()], threshold).unwrap();
        let mask = &head.localize(std::slice::from_ref(&image), &texts).unwrap()[0];
        for y in 0..32 {
            for x in 0..32 {
                assert_eq!(
                    mask.get(x, y),
                    mean[(y / 4) * 8 + x / 4] > threshold,
                    "({x}, {y})"
                );
            }
        }
        assert_eq!(mask.count(), (63 - j) * 16);
        assert!(RegionHead::new(&reward, &["nonsense".to_string()], 0.5).is_err());
    }
}
