//! Diffusion-DPO (Wallace et al., "Diffusion Model Alignment Using Direct Preference
//! Optimization", CVPR 2024), as in SalesforceAIResearch/DiffusionDPO `train.py` l.1119-1145.
//!
//! Both images of a pair are noised with the same noise and the same timestep t ~ U{0..T-1}.
//! With `d(x) = ||eps - eps_theta(x_t, t, c)||^2` (mean over pixels) for the policy and `d_ref`
//! for the frozen reference:
//!
//! ```text
//! inside = -beta/2 * ((d(x_w) - d(x_l)) - (d_ref(x_w) - d_ref(x_l)))
//! L      = -log sigmoid(inside)
//! ```
//!
//! beta = 5000 in this (Salesforce) convention; diffusers' `train_diffusion_dpo.py` writes
//! `-log sigmoid(beta_dpo * (d_ref_diff - d_diff))` with `beta_dpo = 2500`: the same objective.
//! `implicit_acc = mean(inside > 0)` is logged (the fraction of pairs the policy ranks right,
//! relative to the reference).

use crate::batch::{Batch, Collect};
use crate::config::AlignConfig;
use crate::methods::{MethodSpec, StoreData, StoreRead};
use crate::{Algorithm, Context, MicroStep, PolicyModel};
use burn::optim::GradientsParams;
use burn::tensor::activation::log_sigmoid;
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};
use tiller_core::{Error, Result, SeededRng};
use tiller_diffusion::sampling::{Conditioning, Denoiser};

/// `[method.diffusion-dpo]`: Diffusion-DPO (SalesforceAIResearch/DiffusionDPO `train.py`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DpoConfig {
    /// beta in Salesforce's convention `L = -log sigmoid(-beta/2 * (d_theta - d_ref))`, 5000 for
    /// SD1.5 (diffusers' `beta_dpo = 2500` without the 1/2 is the same objective).
    pub beta: f64,
    /// The preference store the pairs come from.
    pub store: String,
    /// Its split: `train` (the test split holds the held-out feedback that reward models and
    /// validation are measured on, and is refused).
    pub split: String,
    /// Train on at most this many comparisons (the first in the store; 0: all). `tiller compare`
    /// sets it to the reward-query budget: each comparison is one query to an annotator.
    pub max_comparisons: usize,
}

impl Default for DpoConfig {
    fn default() -> Self {
        Self {
            beta: 5000.0,
            store: "runs/prefs".into(),
            split: "train".into(),
            max_comparisons: 0,
        }
    }
}

impl MethodSpec for DpoConfig {
    fn name(&self) -> &'static str {
        "diffusion-dpo"
    }

    fn paper(&self) -> &'static str {
        "Wallace et al., Diffusion Model Alignment Using Direct Preference Optimization, CVPR 2024"
    }

    fn validate(&self, _config: &AlignConfig) -> Result<()> {
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            return Err(Error::config(
                "method.diffusion-dpo.beta",
                format!("must be positive, got {}", self.beta),
            ));
        }
        train_split("method.diffusion-dpo.split", &self.split)?;
        Ok(())
    }

    fn build<M: PolicyModel>(&self) -> Box<dyn Algorithm<M>> {
        Box::new(DiffusionDpo { beta: self.beta })
    }

    /// Regularised by beta, not a per-step KL.
    fn takes_kl(&self) -> bool {
        false
    }

    /// Trains on the store's pairs; samples nothing.
    fn samples(&self) -> bool {
        false
    }

    fn store(&self) -> Option<StoreRead> {
        Some(StoreRead {
            data: StoreData::Comparisons,
            store: self.store.clone(),
            split: self.split.clone(),
            limit: self.max_comparisons,
            field: "method.diffusion-dpo.store",
            category: None,
        })
    }

    /// Each comparison is one query to an annotator: the budget caps the comparisons read; the
    /// run's updates stay as configured.
    fn size_to_budget(&self, config: &AlignConfig, budget: u64) -> (Vec<String>, u64) {
        let train = &config.train;
        (
            vec![format!("method.diffusion-dpo.max_comparisons={budget}")],
            train.updates,
        )
    }
}

pub struct DiffusionDpo {
    /// beta (Salesforce convention).
    pub beta: f64,
}

/// Per-example squared error [B] of `model` on noised `x0` (mean over C, H, W), conditioned on
/// `cond`'s context (and SDXL's added conditioning; guidance is not applied: the conditional
/// model, as trained).
pub fn denoising_error<M: Denoiser>(
    model: &M,
    x_t: Tensor<4>,
    target: Tensor<4>,
    timesteps: &[f64],
    cond: &Conditioning,
) -> Tensor<1> {
    let b = timesteps.len();
    let device = x_t.device();
    let t = Tensor::<1>::from_data(
        TensorData::new(timesteps.iter().map(|&v| v as f32).collect(), [b]),
        &device,
    );
    let cond = cond.to_device(&device);
    let pred = match &cond.added {
        None => model.predict(x_t, t, cond.context),
        Some((added, _)) => model.predict_added(x_t, t, cond.context, added),
    };
    (pred - target)
        .powi_scalar(2)
        .reshape([b as i64, -1])
        .mean_dim(1)
        .reshape([b])
}

/// A store split a method may train on: `train` only; the test split is held out.
pub(crate) fn train_split(field: &str, split: &str) -> Result<()> {
    match split {
        "train" => Ok(()),
        "test" => Err(Error::config(
            field,
            "the test split is held out (reward models and validation are measured on it); train on `train`",
        )),
        other => Err(Error::config(
            field,
            format!("must be `train`, got `{other}`"),
        )),
    }
}

/// Salesforce's objective on the per-pair denoising errors of the chosen (`w`) and rejected
/// (`l`) images under the policy and the reference, all [B]: returns the mean loss and `inside`
/// [B], `-beta/2 * ((d_w - d_l) - (d_ref_w - d_ref_l))`.
pub fn dpo_loss(
    d_w: Tensor<1>,
    d_l: Tensor<1>,
    d_ref_w: Tensor<1>,
    d_ref_l: Tensor<1>,
    beta: f64,
) -> (Tensor<1>, Tensor<1>) {
    let inside = ((d_w - d_l) - (d_ref_w - d_ref_l)) * (-0.5 * beta);
    (log_sigmoid(inside.clone()).neg().mean(), inside)
}

impl<M: PolicyModel> Algorithm<M> for DiffusionDpo {
    fn name(&self) -> &'static str {
        "diffusion-dpo"
    }

    fn collects(&self) -> Collect {
        Collect::Pairs
    }

    fn gradients(
        &mut self,
        cx: &Context<'_, M>,
        batch: &Batch,
        scale: f64,
        _rng: &mut SeededRng,
    ) -> Result<MicroStep> {
        let Batch::Pairs(p) = batch else {
            return Err(Error::invalid("diffusion-dpo needs preference pairs"));
        };
        let policy = cx.policy;
        let b = p.prompts.len();
        // [winners; losers], sharing noise and t.
        let x0 = Tensor::cat(vec![p.chosen.clone(), p.rejected.clone()], 0);
        let noise = Tensor::cat(vec![p.noise.clone(), p.noise.clone()], 0);
        let ts: Vec<f64> = p.timesteps.iter().chain(&p.timesteps).copied().collect();
        let x_t = policy.noise.add_noise(x0.clone(), noise.clone(), &ts)?;
        let target = policy.noise.training_target(x0, noise, &ts)?;
        let both = p.prompts.repeat(2);
        let d_ref = denoising_error(
            &policy.reference,
            x_t.clone(),
            target.clone(),
            &ts,
            &policy.conditional(&both, &policy.device),
        );
        let d = denoising_error(
            &policy.model,
            x_t.autodiff(),
            target.autodiff(),
            &ts,
            &policy.conditional(&both, &policy.autodiff_device()),
        );
        let d_ref = d_ref.autodiff();
        let (loss, inside) = dpo_loss(
            d.clone().narrow(0, 0, b),
            d.narrow(0, b, b),
            d_ref.clone().narrow(0, 0, b),
            d_ref.narrow(0, b, b),
            self.beta,
        );
        let value = loss.clone().into_scalar::<f64>();
        let inside: Vec<f32> = inside
            .inner()
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| Error::invalid(format!("{e:?}")))?;
        let implicit_acc = inside.iter().filter(|v| **v > 0.0).count() as f64 / b as f64;
        let grads = GradientsParams::from_grads((loss * scale).backward(), &policy.model);
        Ok(MicroStep {
            grads,
            loss: value,
            metrics: vec![("implicit_acc", implicit_acc)],
            rewards: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    /// The loss on numbers worked by hand; swapping chosen and rejected must change it.
    #[test]
    fn loss_by_hand() {
        let device = Device::default();
        let t = |v: f32| Tensor::<1>::from_data(TensorData::new(vec![v], [1]), &device);
        // inside = -10/2 * ((0.1 - 0.3) - (0.2 - 0.2)) = 1: L = -log sigmoid(1) = 0.313262.
        let (l, inside) = dpo_loss(t(0.1), t(0.3), t(0.2), t(0.2), 10.0);
        assert!((inside.into_scalar::<f64>() - 1.0).abs() < 1e-6);
        assert!((l.into_scalar::<f64>() - 0.313262).abs() < 1e-5);
        let (flipped, _) = dpo_loss(t(0.3), t(0.1), t(0.2), t(0.2), 10.0);
        assert!((flipped.into_scalar::<f64>() - 1.313262).abs() < 1e-5);
        // The reference's own preference is subtracted: the same gap under both is no signal.
        let (even, _) = dpo_loss(t(0.1), t(0.3), t(0.1), t(0.3), 10.0);
        assert!((even.into_scalar::<f64>() - std::f64::consts::LN_2).abs() < 1e-6);
    }
}
