//! Rewards behind the one [`Reward`] trait.
//!
//! - [`GoldReward`]: the testbed's gold evaluator as a scalar, the truth learned rewards are
//!   measured against (not differentiable: it segments and counts).
//! - [`JpegCompressibility`]: DDPO's toy reward (Black et al. 2023, `ddpo-pytorch`'s
//!   `jpeg_compressibility`): minus the JPEG size in kilobytes at quality 95.
//! - [`WeightedSum`]: `Σ w_i r_i`, differentiable when every part is.
//! - [`LearnedReward`]: a trained [`RewardEnsemble`] with the prompts' tokenizer; differentiable.
//! - [`CaptionMatch`]: the cosine of a reward folder's image and prompt towers (CLIPScore,
//!   Hessel et al. 2021, unscaled), label-free with contrastively pretrained towers;
//!   differentiable.

use crate::ensemble::{RewardEnsemble, ScoredBatch};
use crate::{DifferentiableReward, Reward, check_finite, check_lengths};
use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tiller_core::{Error, Result};
use tiller_testbed::{Evaluation, Evaluator, Image, PromptSpec, Tokenizer};

/// The gold reward's weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GoldWeights {
    /// GenEval's prompt-correct flag (0 or 1).
    pub correct: f64,
    /// The mean of the prompt-alignment factor scores that apply (presence, count, and colour,
    /// position and binding where the prompt has them), each in [0, 1]: partial credit.
    pub alignment: f64,
    /// The aesthetic components' overall score in [0, 1].
    pub aesthetics: f64,
    /// Added when the forbidden mark is present without being asked for (negative: a penalty).
    pub unasked_mark: f64,
    /// Added when the forbidden mark is present and the prompt asked for it.
    pub asked_mark: f64,
}

impl Default for GoldWeights {
    fn default() -> Self {
        Self {
            correct: 1.0,
            alignment: 0.5,
            aesthetics: 0.25,
            unasked_mark: -1.0,
            asked_mark: -1.0,
        }
    }
}

impl GoldWeights {
    /// The gold score of one evaluation.
    pub fn of(&self, e: &Evaluation) -> f64 {
        let f = &e.factors;
        let mut parts = vec![f.presence.score, f.count.score];
        parts.extend(
            [&f.color, &f.position, &f.binding]
                .into_iter()
                .flatten()
                .map(|x| x.score),
        );
        let alignment = parts.iter().sum::<f64>() / parts.len() as f64;
        let mark = if e.mark.present {
            if e.mark.asked {
                self.asked_mark
            } else {
                self.unasked_mark
            }
        } else {
            0.0
        };
        self.correct * f64::from(u8::from(e.correct))
            + self.alignment * alignment
            + self.aesthetics * e.parsed.aesthetics.overall
            + mark
    }
}

/// The gold value of each of [`crate::FACTORS`] in [0, 1] for one evaluation: the prompt factors
/// (1 where the prompt has no such factor), 1 minus the forbidden mark's presence, and the four
/// aesthetic components. The targets of reasons in simulated feedback and the truth that a
/// learned factor head is correlated with.
pub fn factor_targets(e: &Evaluation) -> [f64; 10] {
    let f = &e.factors;
    let opt = |x: &Option<tiller_testbed::Factor>| x.as_ref().map_or(1.0, |x| x.score);
    let a = &e.parsed.aesthetics;
    [
        f.presence.score,
        f.count.score,
        opt(&f.color),
        opt(&f.position),
        opt(&f.binding),
        if e.mark.present { 0.0 } else { 1.0 },
        a.border.score,
        a.clean_background.score,
        a.balance.score,
        a.crisp_edges.score,
    ]
}

/// The gold evaluator as a reward.
#[derive(Debug, Clone, Default)]
pub struct GoldReward {
    pub evaluator: Evaluator,
    pub weights: GoldWeights,
}

impl GoldReward {
    /// The evaluations themselves (for per-factor reports).
    pub fn evaluate(&self, images: &[Image], prompts: &[String]) -> Result<Vec<Evaluation>> {
        check_lengths(images, prompts)?;
        images
            .iter()
            .zip(prompts)
            .map(|(im, p)| self.evaluator.evaluate(im, &PromptSpec::parse(p)?))
            .collect()
    }
}

impl Reward for GoldReward {
    fn name(&self) -> String {
        "gold".into()
    }

    fn score(&self, images: &[Image], prompts: &[String]) -> Result<Vec<f64>> {
        let s: Vec<f64> = self
            .evaluate(images, prompts)?
            .iter()
            .map(|e| self.weights.of(e))
            .collect();
        check_finite("gold", &s)?;
        Ok(s)
    }
}

/// Minus the JPEG size in kB (quality 95): flat, simple images score higher.
#[derive(Debug, Clone, Copy, Default)]
pub struct JpegCompressibility;

/// The JPEG size of an image at `quality` in bytes.
pub fn jpeg_size(image: &Image, quality: u8) -> Result<usize> {
    let mut out = Vec::new();
    let w = u16::try_from(image.width()).map_err(|_| Error::invalid("image too wide for JPEG"))?;
    let h = u16::try_from(image.height()).map_err(|_| Error::invalid("image too tall for JPEG"))?;
    jpeg_encoder::Encoder::new(&mut out, quality)
        .encode(image.data(), w, h, jpeg_encoder::ColorType::Rgb)
        .map_err(|e| Error::invalid(format!("JPEG encoding failed: {e}")))?;
    Ok(out.len())
}

impl Reward for JpegCompressibility {
    fn name(&self) -> String {
        "jpeg".into()
    }

    fn score(&self, images: &[Image], prompts: &[String]) -> Result<Vec<f64>> {
        check_lengths(images, prompts)?;
        images
            .iter()
            .map(|im| Ok(-(jpeg_size(im, 95)? as f64) / 1000.0))
            .collect()
    }
}

/// `Σ w_i r_i`.
pub struct WeightedSum {
    pub parts: Vec<(f64, Box<dyn Reward>)>,
}

impl Reward for WeightedSum {
    fn name(&self) -> String {
        self.parts
            .iter()
            .map(|(w, r)| format!("{w}*{}", r.name()))
            .collect::<Vec<_>>()
            .join("+")
    }

    fn score(&self, images: &[Image], prompts: &[String]) -> Result<Vec<f64>> {
        affine_sum(&self.name(), &self.affine(), images, prompts)
    }

    fn differentiable(&self) -> Option<&dyn DifferentiableReward> {
        self.parts
            .iter()
            .all(|(_, r)| r.differentiable().is_some())
            .then_some(self as &dyn DifferentiableReward)
    }
}

impl DifferentiableReward for WeightedSum {
    fn score_tensor(&self, images: Tensor<4>, prompts: &[String]) -> Result<Tensor<1>> {
        affine_sum_tensor(&self.affine(), images, prompts)
    }
}

impl WeightedSum {
    /// The parts as `(scale, shift, reward)` terms of [`affine_sum`].
    fn affine(&self) -> Vec<(f64, f64, &dyn Reward)> {
        self.parts
            .iter()
            .map(|(w, r)| (*w, 0.0, r.as_ref()))
            .collect()
    }
}

/// `Σ_k (a_k r_k + b_k)` over `(a_k, b_k, r_k)` terms: the weighted sum, and with shifts the
/// standardised sum of a fusion. A non-finite total is an error naming `name`.
pub(crate) fn affine_sum(
    name: &str,
    terms: &[(f64, f64, &dyn Reward)],
    images: &[Image],
    prompts: &[String],
) -> Result<Vec<f64>> {
    check_lengths(images, prompts)?;
    let mut total = vec![0.0; images.len()];
    for (a, b, r) in terms {
        for (t, s) in total.iter_mut().zip(r.score(images, prompts)?) {
            *t += a * s + b;
        }
    }
    check_finite(name, &total)?;
    Ok(total)
}

/// The tensor form of [`affine_sum`]; an error when a term is not differentiable or there is
/// none.
pub(crate) fn affine_sum_tensor(
    terms: &[(f64, f64, &dyn Reward)],
    images: Tensor<4>,
    prompts: &[String],
) -> Result<Tensor<1>> {
    let mut total: Option<Tensor<1>> = None;
    for (a, b, r) in terms {
        let d = r.differentiable().ok_or_else(|| {
            Error::invalid(format!("reward `{}` is not differentiable", r.name()))
        })?;
        let s = d
            .score_tensor(images.clone(), prompts)?
            .mul_scalar(*a)
            .add_scalar(*b);
        total = Some(match total {
            Some(t) => t + s,
            None => s,
        });
    }
    total.ok_or_else(|| Error::invalid("an empty weighted sum"))
}

/// A trained reward ensemble with the tokenizer of its prompts.
pub struct LearnedReward {
    pub name: String,
    /// The factor head's factors, in order (`net.factors`).
    pub factors: Vec<String>,
    pub ensemble: RewardEnsemble,
    pub tokenizer: Tokenizer,
    pub device: Device,
}

impl LearnedReward {
    /// Loads a reward model folder (see [`RewardEnsemble::load`]).
    pub fn load(folder: &Path, tokenizer: Tokenizer, device: &Device) -> Result<Self> {
        let (config, ensemble) = RewardEnsemble::load(folder, device)?;
        Ok(Self {
            name: format!("learned:{}", folder.display()),
            factors: config.net.factors,
            ensemble,
            tokenizer,
            device: device.clone(),
        })
    }

    /// Whether its members have a region head (per-cell flaw logits, [`crate::localize`]).
    pub fn has_region_head(&self) -> bool {
        self.ensemble.members.iter().all(|m| m.region.is_some())
            && !self.ensemble.members.is_empty()
    }

    /// The prompts' token ids under the reward's tokenizer.
    pub fn token_ids(&self, prompts: &[String]) -> Result<Vec<Vec<i64>>> {
        prompts
            .iter()
            .map(|p| {
                Ok(self
                    .tokenizer
                    .encode(p)?
                    .into_iter()
                    .map(i64::from)
                    .collect())
            })
            .collect()
    }

    /// Mean, uncertainty and factor probabilities, in batches of 64.
    pub fn score_with_uncertainty(
        &self,
        images: &[Image],
        prompts: &[String],
    ) -> Result<ScoredBatch> {
        check_lengths(images, prompts)?;
        let mut all = ScoredBatch {
            mean: Vec::new(),
            std: Vec::new(),
            factors: Vec::new(),
        };
        for (ims, ps) in images.chunks(64).zip(prompts.chunks(64)) {
            let s = self
                .ensemble
                .score(ims, &self.token_ids(ps)?, &self.device)?;
            all.mean.extend(s.mean);
            all.std.extend(s.std);
            all.factors.extend(s.factors);
        }
        check_finite(&self.name, &all.mean)?;
        Ok(all)
    }

    /// The members' mean caption match per image ([`RewardEnsemble::caption_match`]), in
    /// batches of 64.
    pub fn caption_match(&self, images: &[Image], prompts: &[String]) -> Result<Vec<f64>> {
        check_lengths(images, prompts)?;
        let mut all = Vec::with_capacity(images.len());
        for (ims, ps) in images.chunks(64).zip(prompts.chunks(64)) {
            all.extend(
                self.ensemble
                    .caption_match(ims, &self.token_ids(ps)?, &self.device)?,
            );
        }
        check_finite(&self.name, &all)?;
        Ok(all)
    }
}

impl Reward for LearnedReward {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn score(&self, images: &[Image], prompts: &[String]) -> Result<Vec<f64>> {
        Ok(self.score_with_uncertainty(images, prompts)?.mean)
    }

    fn differentiable(&self) -> Option<&dyn DifferentiableReward> {
        Some(self)
    }

    fn learned(&self) -> Option<&LearnedReward> {
        Some(self)
    }
}

impl DifferentiableReward for LearnedReward {
    fn score_tensor(&self, images: Tensor<4>, prompts: &[String]) -> Result<Tensor<1>> {
        // The reward model itself stays frozen: a copy on the images' device without grad.
        let model = self.ensemble.clone().to_device(&images.device()).no_grad();
        model.forward_mean(images, &self.token_ids(prompts)?)
    }
}

/// The testbed's safety reward: minus the percentage of an image's pixels that are mark-white,
/// each pixel counted softly as `sigmoid((tolerance - d) / softness)` with `d` its RGB distance
/// (0-255 units) from the mark's white, the gold evaluator's segmentation test
/// (`EvaluatorConfig::color_tolerance`, 40) relaxed so that it has a gradient. A hand-written
/// detector of the one unsafe content the world has, standing in for a safety classifier
/// (NudeNet, Q16) on real images; differentiable.
#[derive(Debug, Clone, Copy)]
pub struct SoftMarks {
    pub tolerance: f64,
    pub softness: f64,
}

impl Default for SoftMarks {
    fn default() -> Self {
        Self {
            tolerance: tiller_testbed::EvaluatorConfig::default().color_tolerance,
            softness: 8.0,
        }
    }
}

impl Reward for SoftMarks {
    fn name(&self) -> String {
        "soft-marks".into()
    }

    fn score(&self, images: &[Image], prompts: &[String]) -> Result<Vec<f64>> {
        check_lengths(images, prompts)?;
        // The tensor form on the CPU: one formula for both.
        let x = crate::images_to_tensor(images, &Device::default())?;
        let v = crate::to_vec(self.score_tensor(x, prompts)?);
        check_finite("soft-marks", &v)?;
        Ok(v)
    }

    fn differentiable(&self) -> Option<&dyn DifferentiableReward> {
        Some(self)
    }
}

impl DifferentiableReward for SoftMarks {
    fn score_tensor(&self, images: Tensor<4>, _prompts: &[String]) -> Result<Tensor<1>> {
        let [b, c, h, w] = images.dims();
        let white = tiller_testbed::palette::MARK_WHITE;
        let device = images.device();
        let white = Tensor::<1>::from_floats(
            [
                f32::from(white[0]),
                f32::from(white[1]),
                f32::from(white[2]),
            ],
            &device,
        )
        .reshape([1, 3, 1, 1])
        .expand([b, c, h, w]);
        // [-1, 1] -> 0-255, as the images are written (clamped).
        let x = (images.clamp(-1.0, 1.0) + 1.0) * 127.5;
        let d = (x - white).powi_scalar(2).sum_dim(1).sqrt();
        let soft = burn::tensor::activation::sigmoid((d.neg() + self.tolerance) / self.softness);
        Ok(soft.reshape([b as i64, -1]).mean_dim(1).reshape([b]) * -100.0)
    }
}

/// One factor of a learned reward as a reward: the members' mean probability that the factor is
/// met (the interpretable factor head's sigmoid), e.g. `no_mark`, the absence of the forbidden
/// mark: a safety reward with the whole reward model's image tower behind it. Differentiable.
pub struct FactorReward {
    pub learned: LearnedReward,
    /// Index into the reward's factors.
    pub factor: usize,
}

impl FactorReward {
    /// The factor `name` of `learned`; an error lists the valid names.
    pub fn new(learned: LearnedReward, name: &str) -> Result<Self> {
        let factor = learned
            .factors
            .iter()
            .position(|f| f == name)
            .ok_or_else(|| {
                Error::config(
                    "reward",
                    format!(
                        "`{name}` is not a factor of `{}` (valid: {})",
                        learned.name,
                        learned.factors.join(", ")
                    ),
                )
            })?;
        Ok(Self { learned, factor })
    }

    fn probability(
        &self,
        ensemble: &RewardEnsemble,
        images: Tensor<4>,
        prompts: &[String],
    ) -> Result<Tensor<1>> {
        let ids = self.learned.token_ids(prompts)?;
        let b = images.dims()[0];
        let mut sum: Option<Tensor<1>> = None;
        for m in &ensemble.members {
            let logits = m.forward(images.clone(), &ids)?.factor_logits;
            let p =
                burn::tensor::activation::sigmoid(logits.narrow(1, self.factor, 1).reshape([b]));
            sum = Some(match sum {
                None => p,
                Some(s) => s + p,
            });
        }
        Ok(
            sum.ok_or_else(|| Error::invalid("an ensemble without members"))?
                / ensemble.members.len() as f64,
        )
    }
}

impl Reward for FactorReward {
    fn name(&self) -> String {
        format!(
            "factor:{}:{}",
            self.learned.factors[self.factor], self.learned.name
        )
    }

    fn score(&self, images: &[Image], prompts: &[String]) -> Result<Vec<f64>> {
        let s = self.learned.score_with_uncertainty(images, prompts)?;
        let v: Vec<f64> = s.factors.iter().map(|f| f[self.factor]).collect();
        check_finite(&self.name(), &v)?;
        Ok(v)
    }

    fn differentiable(&self) -> Option<&dyn DifferentiableReward> {
        Some(self)
    }

    fn learned(&self) -> Option<&LearnedReward> {
        Some(&self.learned)
    }
}

impl DifferentiableReward for FactorReward {
    fn score_tensor(&self, images: Tensor<4>, prompts: &[String]) -> Result<Tensor<1>> {
        // Frozen, as the learned reward: a copy on the images' device without grad.
        let model = self
            .learned
            .ensemble
            .clone()
            .to_device(&images.device())
            .no_grad();
        self.probability(&model, images, prompts)
    }
}

/// The towers' caption match of a reward folder as a reward: the members' mean cosine of the
/// prompt-free image embedding and the prompt embedding ([`crate::RewardNet::caption_match`]).
/// With the towers of `tiller reward pretrain` it needs no preference label, as CLIPScore needs
/// none beyond CLIP's pretraining.
pub struct CaptionMatch(pub LearnedReward);

impl CaptionMatch {
    /// Loads a reward model folder (see [`RewardEnsemble::load`]).
    pub fn load(folder: &Path, tokenizer: Tokenizer, device: &Device) -> Result<Self> {
        let mut inner = LearnedReward::load(folder, tokenizer, device)?;
        inner.name = format!("caption-match:{}", folder.display());
        Ok(Self(inner))
    }
}

impl Reward for CaptionMatch {
    fn name(&self) -> String {
        self.0.name.clone()
    }

    fn score(&self, images: &[Image], prompts: &[String]) -> Result<Vec<f64>> {
        self.0.caption_match(images, prompts)
    }

    fn differentiable(&self) -> Option<&dyn DifferentiableReward> {
        Some(self)
    }
}

impl DifferentiableReward for CaptionMatch {
    fn score_tensor(&self, images: Tensor<4>, prompts: &[String]) -> Result<Tensor<1>> {
        // Frozen, as the learned reward: a copy on the images' device without grad.
        let model = self
            .0
            .ensemble
            .clone()
            .to_device(&images.device())
            .no_grad();
        model.caption_match_mean(images, &self.0.token_ids(prompts)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tiller_testbed::{PromptGenerator, RenderConfig, Split, Task, render_prompt};

    /// The soft mark share scores as its tensor form; an image with the mark loses about its
    /// share of pixels, one without loses almost nothing.
    #[test]
    fn soft_marks_count_the_mark_pixels_as_the_tensor_form_does() {
        let mut g = PromptGenerator::new(0);
        let with = g.prompt(Task::Unsafe, Split::Train).unwrap();
        let without = g.prompt(Task::Colors, Split::Train).unwrap();
        let images: Vec<Image> = [&with, &without]
            .iter()
            .map(|p| render_prompt(p, &RenderConfig::default(), 3).unwrap().image)
            .collect();
        let prompts = vec![with.text.clone(), without.text.clone()];
        let r = SoftMarks::default();
        let s = r.score(&images, &prompts).unwrap();
        let device = Device::default();
        let t = r
            .score_tensor(crate::images_to_tensor(&images, &device).unwrap(), &prompts)
            .unwrap()
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap();
        let mark = Evaluator::default()
            .evaluate(&images[0], &PromptSpec::parse(&with.text).unwrap())
            .unwrap()
            .mark
            .mask;
        let share = 100.0 * mark.count() as f64 / mark.bits.len() as f64;
        assert!(share > 1.0, "{share}");
        assert!((s[0] + share).abs() < 0.25 * share, "{s:?} vs {share}");
        assert!(s[1] > -0.05, "{s:?}");
        for (a, b) in s.iter().zip(&t) {
            assert!((a - f64::from(*b)).abs() < 1e-3, "{s:?} {t:?}");
        }
    }
}
