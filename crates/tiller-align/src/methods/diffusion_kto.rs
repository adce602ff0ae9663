//! Diffusion-KTO (Li et al., "Aligning Diffusion Models by Optimizing Human Utility", NeurIPS
//! 2024), as `jacklishufan/diffusion-kto` `train_kto_sd_v1.5.py` l.1446-1500 writes it: alignment
//! from per-image likes and dislikes, no pairs needed.
//!
//! Each image is noised with its own noise at its own timestep t ~ U{0..T-1}. With the per-image
//! denoising errors `d(x) = ||eps - eps_theta(x_t, t, c)||^2` (mean over pixels) of the policy and
//! `d_ref` of the frozen reference, the implicit reward and the loss are
//!
//! ```text
//! g  = -(d(x) - d_ref(x))
//! z0 = mean of g over the batch, detached              (the reference point)
//! h  = sigmoid(sign(y) * beta * (g - z0))               (sign(y) = +1 liked, -1 disliked)
//! L  = mean( w_y * (1 - h) )                            (w = lambda_desirable or lambda_undesirable)
//! ```
//!
//! Defaults: `beta` 1000 (`--beta_dpo`), both lambdas 1, and the batch-mean reference point (the
//! script's first option). The reference point is the mean over the whole collected batch under
//! the weights before its update (computed in `prepare`), so micro-batching does not change it.

use crate::batch::{Batch, Collect};
use crate::config::AlignConfig;
use crate::methods::diffusion_dpo::denoising_error;
use crate::methods::{MethodSpec, StoreData, StoreRead};
use crate::{Algorithm, Context, MicroStep, PolicyModel};
use burn::optim::GradientsParams;
use burn::tensor::activation::sigmoid;
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};
use tiller_core::{Error, Result, SeededRng};

/// `[method.diffusion-kto]`: `train_kto_sd_v1.5.py`'s defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KtoConfig {
    /// beta, the implicit reward's scale (`--beta_dpo 1000`).
    pub beta: f64,
    /// w for liked images (lambda_D, 1).
    pub lambda_desirable: f64,
    /// w for disliked images (lambda_U, 1).
    pub lambda_undesirable: f64,
    /// The preference store the likes come from.
    pub store: String,
    /// Its split: `train` (the held-out test split is refused).
    pub split: String,
    /// Train on at most this many labels (the first in the store; 0: all). `tiller compare` sets
    /// it to the reward-query budget: each label is one query to an annotator.
    pub max_labels: usize,
}

impl Default for KtoConfig {
    fn default() -> Self {
        Self {
            beta: 1000.0,
            lambda_desirable: 1.0,
            lambda_undesirable: 1.0,
            store: "runs/prefs".into(),
            split: "train".into(),
            max_labels: 0,
        }
    }
}

impl MethodSpec for KtoConfig {
    fn name(&self) -> &'static str {
        "diffusion-kto"
    }

    fn paper(&self) -> &'static str {
        "Li et al., Aligning Diffusion Models by Optimizing Human Utility, NeurIPS 2024"
    }

    fn validate(&self, _config: &AlignConfig) -> Result<()> {
        for (field, v) in [
            ("beta", self.beta),
            ("lambda_desirable", self.lambda_desirable),
            ("lambda_undesirable", self.lambda_undesirable),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(Error::config(
                    format!("method.diffusion-kto.{field}"),
                    format!("must be positive, got {v}"),
                ));
            }
        }
        crate::methods::diffusion_dpo::train_split("method.diffusion-kto.split", &self.split)
    }

    fn build<M: PolicyModel>(&self) -> Box<dyn Algorithm<M>> {
        Box::new(DiffusionKto {
            config: self.clone(),
            z0: None,
        })
    }

    /// Regularised by beta and the reference point, not a per-step KL.
    fn takes_kl(&self) -> bool {
        false
    }

    /// Trains on the store's labelled images; samples nothing.
    fn samples(&self) -> bool {
        false
    }

    fn store(&self) -> Option<StoreRead> {
        Some(StoreRead {
            data: StoreData::Labels,
            store: self.store.clone(),
            split: self.split.clone(),
            limit: self.max_labels,
            field: "method.diffusion-kto.store",
            category: None,
        })
    }

    /// Each label is one query to an annotator: the budget caps the labels read.
    fn size_to_budget(&self, config: &AlignConfig, budget: u64) -> (Vec<String>, u64) {
        let train = &config.train;
        (
            vec![format!("method.diffusion-kto.max_labels={budget}")],
            train.updates,
        )
    }
}

pub struct DiffusionKto {
    pub config: KtoConfig,
    /// The batch's reference point, set by `prepare`.
    z0: Option<f64>,
}

/// The loss on implicit rewards `g` [B] with labels `likes` and reference point `z0`.
pub fn kto_loss(g: Tensor<1>, likes: &[bool], z0: f64, config: &KtoConfig) -> Tensor<1> {
    let b = likes.len();
    let device = g.device();
    let column = |f: &dyn Fn(bool) -> f64| {
        Tensor::<1>::from_data(
            TensorData::new(likes.iter().map(|&l| f(l) as f32).collect(), [b]),
            &device,
        )
    };
    let sign = column(&|l| if l { 1.0 } else { -1.0 });
    let weight = column(&|l| {
        if l {
            config.lambda_desirable
        } else {
            config.lambda_undesirable
        }
    });
    let h = sigmoid((g - z0) * sign * config.beta);
    (weight * (h.neg() + 1.0)).mean()
}

impl DiffusionKto {
    /// The implicit rewards g [B] of a batch of labelled images: `d_ref - d_theta`, on the policy's
    /// autodiff device when `grad`, else without a graph.
    fn implicit_rewards<M: PolicyModel>(
        cx: &Context<'_, M>,
        l: &crate::batch::Labeled,
        grad: bool,
    ) -> Result<Tensor<1>> {
        let policy = cx.policy;
        let ts = &l.timesteps;
        let x_t = policy
            .noise
            .add_noise(l.images.clone(), l.noise.clone(), ts)?;
        let target = policy
            .noise
            .training_target(l.images.clone(), l.noise.clone(), ts)?;
        let cond = policy.conditional(&l.prompts, &policy.device);
        let d_ref = denoising_error(&policy.reference, x_t.clone(), target.clone(), ts, &cond);
        Ok(if grad {
            let d = denoising_error(&policy.model, x_t.autodiff(), target.autodiff(), ts, &cond);
            d_ref.autodiff() - d
        } else {
            let d = denoising_error(&policy.current(), x_t, target, ts, &cond);
            d_ref - d
        })
    }
}

impl<M: PolicyModel> Algorithm<M> for DiffusionKto {
    fn name(&self) -> &'static str {
        "diffusion-kto"
    }

    fn collects(&self) -> Collect {
        Collect::Labeled
    }

    /// The reference point: the mean implicit reward of the whole batch before its update.
    fn prepare(
        &mut self,
        cx: &Context<'_, M>,
        batch: &mut Batch,
        _rng: &mut SeededRng,
    ) -> Result<Vec<(&'static str, f64)>> {
        let Batch::Labeled(l) = batch else {
            return Err(Error::invalid("diffusion-kto needs labelled images"));
        };
        let g = Self::implicit_rewards(cx, l, false)?;
        let z0 = g.mean().into_scalar::<f64>();
        if !z0.is_finite() {
            return Err(Error::NonFinite(format!(
                "diffusion-kto reference point {z0}"
            )));
        }
        self.z0 = Some(z0);
        Ok(vec![("kto_z0", z0)])
    }

    fn gradients(
        &mut self,
        cx: &Context<'_, M>,
        batch: &Batch,
        scale: f64,
        _rng: &mut SeededRng,
    ) -> Result<MicroStep> {
        let Batch::Labeled(l) = batch else {
            return Err(Error::invalid("diffusion-kto needs labelled images"));
        };
        let z0 = self
            .z0
            .ok_or_else(|| Error::invalid("diffusion-kto: no reference point (prepare)"))?;
        let g = Self::implicit_rewards(cx, l, true)?;
        let margins = crate::methods::ddpo::to_f32(g.clone().inner())?;
        let right = margins
            .iter()
            .zip(&l.likes)
            .filter(|(g, like)| (**g as f64 > z0) == **like)
            .count();
        let loss = kto_loss(g, &l.likes, z0, &self.config);
        let value = loss.clone().into_scalar::<f64>();
        let grads = GradientsParams::from_grads((loss * scale).backward(), &cx.policy.model);
        Ok(MicroStep {
            grads,
            loss: value,
            metrics: vec![("kto_accuracy", right as f64 / l.likes.len().max(1) as f64)],
            rewards: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    /// The loss on numbers worked by hand; a sign flip of the labels must change it.
    #[test]
    fn loss_by_hand() {
        let device = Device::default();
        let config = KtoConfig {
            beta: 100.0,
            ..Default::default()
        };
        let g = || Tensor::<1>::from_data(TensorData::new(vec![0.01f32, -0.02], [2]), &device);
        // h = sigmoid(100 * 0.01) = sigmoid(1) for the liked image, sigmoid(-100 * -0.02) =
        // sigmoid(2) for the disliked one: L = ((1 - 0.731059) + (1 - 0.880797)) / 2.
        let l = kto_loss(g(), &[true, false], 0.0, &config).into_scalar::<f64>();
        assert!((l - 0.194072).abs() < 1e-5, "{l}");
        let flipped = kto_loss(g(), &[false, true], 0.0, &config).into_scalar::<f64>();
        assert!((flipped - 0.805928).abs() < 1e-5, "{flipped}");
        // The reference point shifts both: z0 = 0.01 gives sigmoid(0) and sigmoid(3).
        let shifted = kto_loss(g(), &[true, false], 0.01, &config).into_scalar::<f64>();
        assert!(
            (shifted - (0.5 + (1.0 - 0.952574)) / 2.0).abs() < 1e-5,
            "{shifted}"
        );
        // Undesirable images weigh lambda_U.
        let weighted = KtoConfig {
            lambda_undesirable: 3.0,
            ..config
        };
        let w = kto_loss(g(), &[true, false], 0.0, &weighted).into_scalar::<f64>();
        assert!((w - (0.268941 + 3.0 * 0.119203) / 2.0).abs() < 1e-5, "{w}");
    }
}
