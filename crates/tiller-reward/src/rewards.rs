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
    pub ensemble: RewardEnsemble,
    pub tokenizer: Tokenizer,
    pub device: Device,
}

impl LearnedReward {
    /// Loads a reward model folder (see [`RewardEnsemble::load`]).
    pub fn load(folder: &Path, tokenizer: Tokenizer, device: &Device) -> Result<Self> {
        let (_, ensemble) = RewardEnsemble::load(folder, device)?;
        Ok(Self {
            name: format!("learned:{}", folder.display()),
            ensemble,
            tokenizer,
            device: device.clone(),
        })
    }

    fn ids(&self, prompts: &[String]) -> Result<Vec<Vec<i64>>> {
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
            let s = self.ensemble.score(ims, &self.ids(ps)?, &self.device)?;
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
                    .caption_match(ims, &self.ids(ps)?, &self.device)?,
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
}

impl DifferentiableReward for LearnedReward {
    fn score_tensor(&self, images: Tensor<4>, prompts: &[String]) -> Result<Tensor<1>> {
        // The reward model itself stays frozen: a copy on the images' device without grad.
        let model = self.ensemble.clone().to_device(&images.device()).no_grad();
        model.forward_mean(images, &self.ids(prompts)?)
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
        model.caption_match_mean(images, &self.0.ids(prompts)?)
    }
}
