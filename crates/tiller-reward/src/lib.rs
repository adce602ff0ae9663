//! Reward models, the survey's second pillar: almost every alignment method optimises one, and
//! reward hacking is the gap between a learned reward and what people want.
//!
//! - [`Reward`]: images + prompts -> one score each; [`DifferentiableReward`] when the score is a
//!   tensor function of the pixels (what reward backpropagation needs).
//! - [`net::RewardNet`]: an image encoder, the CLIP-style text encoder and an **interpretable
//!   factor head** (one score per named factor, combined by learned non-negative weights into the
//!   reward), trained by any mix of the feedback kinds with the losses of [`losses`]:
//!   Bradley–Terry with ties (pairwise), logistic (binary likes, KTO-style), cumulative-logit
//!   ordinal (1–5 ratings), and per-factor cross-entropy from reasons.
//! - [`ensemble::RewardEnsemble`]: bootstrap ensembles (Lakshminarayanan et al. 2017) whose member
//!   spread is the reward's uncertainty; saved as one safetensors file with a `config.json`.
//! - [`rewards`]: the gold evaluator as a reward, JPEG compressibility (DDPO's toy reward), weighted
//!   sums, and the learned ensemble behind the same trait.
//! - [`clip_rewards`]: CLIPScore, PickScore, the LAION aesthetic predictor and the SD safety
//!   checker on transformers/diffusers CLIP weights, differentiable through CLIP's preprocessing.
//! - [`fusion::Fusion`]: late fusion, a weighted sum of rewards each standardised by label-free
//!   statistics over reference images (e.g. a learned reward plus a caption match).
//! - [`localize`]: where in an image a problem is (gold regions, a region head, a box), for
//!   region-aware fine-tuning.
//! - [`metrics`]: held-out pairwise accuracy, calibration, Spearman and Pearson correlations.
//! - [`config::RewardFile`] (a reward config file), [`store`] (a preference store's feedback as
//!   training examples) and [`fit`] (pretraining and training from a config into a model folder):
//!   what `tiller reward pretrain` and `tiller reward train` run.

pub mod clip_rewards;
pub mod config;
pub mod ensemble;
pub mod fit;
pub mod fusion;
pub mod load;
pub mod localize;
pub mod losses;
pub mod metrics;
pub mod net;
pub mod pretrain;
pub mod rewards;
pub mod store;
pub mod train;

use burn::tensor::{Device, Tensor, TensorData};
use tiller_core::{Error, Result};
use tiller_testbed::Image;

pub use ensemble::{RewardEnsemble, RewardModelConfig};
pub use net::{FACTORS, RewardNet, RewardNetConfig, TextPool};
pub use pretrain::{Captioned, PretrainConfig, pretrain, renderer_captions};
pub use rewards::{GoldReward, GoldWeights, JpegCompressibility, LearnedReward, WeightedSum};
pub use train::{
    FeedbackItem, FeedbackSet, PairLabel, RegionLabel, RewardTrainConfig, train_ensemble,
    train_ensemble_from,
};

/// A reward: one score per (image, prompt), higher is better.
pub trait Reward {
    /// A short name for reports (`gold`, `jpeg`, `learned:<path>`, ...).
    fn name(&self) -> String;
    /// Scores `images[i]` against `prompts[i]`; the lengths must match. A non-finite score is an
    /// error naming the image.
    fn score(&self, images: &[Image], prompts: &[String]) -> Result<Vec<f64>>;
    /// The same reward as a differentiable function of the pixels, when it is one.
    fn differentiable(&self) -> Option<&dyn DifferentiableReward> {
        None
    }
    /// The learned ensemble this reward is, when it is one (its region head, if trained,
    /// localises flaws: [`localize::RegionHead`]).
    fn learned(&self) -> Option<&LearnedReward> {
        None
    }
}

/// A reward whose score is a tensor function of the pixels, for reward backpropagation.
pub trait DifferentiableReward {
    /// `images` [B, 3, H, W] in [-1, 1] (on any device, autodiff or not) -> scores [B].
    fn score_tensor(&self, images: Tensor<4>, prompts: &[String]) -> Result<Tensor<1>>;
}

/// Images as a [B, 3, H, W] tensor in [-1, 1]; all must have the same size.
/// Samples [B, 3, H, W] in [-1, 1] back to images (clamped, rounded): the inverse of
/// [`images_to_tensor`] up to quantisation.
pub fn tensor_to_images(t: Tensor<4>) -> Result<Vec<Image>> {
    let [b, c, h, w] = t.dims();
    if c != 3 {
        return Err(Error::invalid(format!(
            "expected 3 channels, the model produced {c}"
        )));
    }
    let v = t
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| Error::invalid(format!("{e:?}")))?;
    (0..b)
        .map(|i| {
            let mut rgb = vec![0u8; h * w * 3];
            for ch in 0..3 {
                for p in 0..h * w {
                    let x = v[((i * 3 + ch) * h * w) + p];
                    rgb[p * 3 + ch] = ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8;
                }
            }
            Image::from_rgb(w, h, rgb)
        })
        .collect()
}

pub fn images_to_tensor(images: &[Image], device: &Device) -> Result<Tensor<4>> {
    let first = images
        .first()
        .ok_or_else(|| Error::invalid("no images to score"))?;
    let (w, h) = (first.width(), first.height());
    let mut v = Vec::with_capacity(images.len() * 3 * w * h);
    for (i, im) in images.iter().enumerate() {
        if (im.width(), im.height()) != (w, h) {
            return Err(Error::invalid(format!(
                "image {i} is {}x{}, image 0 is {w}x{h}",
                im.width(),
                im.height()
            )));
        }
        im.to_chw_floats(&mut v);
    }
    Ok(Tensor::from_data(
        TensorData::new(v, [images.len(), 3, h, w]),
        device,
    ))
}

/// A tensor's values as f64.
pub(crate) fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data()
        .convert::<f64>()
        .try_into_vec::<f64>()
        .expect("a float tensor converts to f64")
}

/// Errors on the first non-finite score, naming it.
pub(crate) fn check_finite(name: &str, scores: &[f64]) -> Result<()> {
    match scores.iter().position(|s| !s.is_finite()) {
        Some(i) => Err(Error::NonFinite(format!(
            "reward `{name}` gave {} for image {i}",
            scores[i]
        ))),
        None => Ok(()),
    }
}

/// Checks that images and prompts pair up.
pub(crate) fn check_lengths(images: &[Image], prompts: &[String]) -> Result<()> {
    if images.len() != prompts.len() {
        return Err(Error::invalid(format!(
            "{} images but {} prompts",
            images.len(),
            prompts.len()
        )));
    }
    Ok(())
}
