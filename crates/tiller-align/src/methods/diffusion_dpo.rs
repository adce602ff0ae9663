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
//!
//! **The winner-preserving safeguard** (`safeguard = true`; Diffusion-SDPO,
//! arXiv 2511.03317, `AIDC-AI/Diffusion-SDPO` `train.py::get_adaptive_lose_l_scale`): plain DPO can
//! raise the chosen image's error as long as the rejected one's rises faster. SDPO scales the
//! gradient through the rejected image's error by one coefficient per micro-batch,
//!
//! ```text
//! e_w, e_l = eps_theta - target on the chosen and rejected halves (detached)
//! lambda   = clamp((1 - mu) ||e_w||^2 / (<e_l, e_w> + 1e-9), 0, 1)   if <e_l, e_w> > 0, else 1
//! d_l      -> sg(d_l) + lambda (d_l - sg(d_l))
//! ```
//!
//! so that to first order in output space the step does not increase the chosen image's error;
//! the loss value is unchanged (the straight-through form of the reference). mu = 0.9 is its SD1.5
//! launch script's `--winner_preserving_mu`; like the reference, lambda is computed per
//! micro-batch (with the safeguard on, accumulation is not exactly one big batch).

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
    /// Diffusion-SDPO's winner-preserving scale of the rejected image's gradient (`--use_winner_
    /// preserving`).
    pub safeguard: bool,
    /// Its mu (`--winner_preserving_mu 0.9`, the SD1.5 script's), in [0, 1].
    pub safeguard_mu: f64,
}

impl Default for DpoConfig {
    fn default() -> Self {
        Self {
            beta: 5000.0,
            store: "runs/prefs".into(),
            split: "train".into(),
            max_comparisons: 0,
            safeguard: false,
            safeguard_mu: 0.9,
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
        if !(0.0..=1.0).contains(&self.safeguard_mu) {
            return Err(Error::config(
                "method.diffusion-dpo.safeguard_mu",
                format!("must be in [0, 1], got {}", self.safeguard_mu),
            ));
        }
        Ok(())
    }

    fn build<M: PolicyModel>(&self) -> Box<dyn Algorithm<M>> {
        Box::new(DiffusionDpo {
            beta: self.beta,
            safeguard: self.safeguard.then_some(self.safeguard_mu),
        })
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
    /// SDPO's safeguard with its mu; `None`: plain Diffusion-DPO.
    pub safeguard: Option<f64>,
}

impl DiffusionDpo {
    /// Plain Diffusion-DPO at `beta`.
    pub fn new(beta: f64) -> Self {
        Self {
            beta,
            safeguard: None,
        }
    }
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
    let pred = prediction(model, x_t, &t, cond);
    per_example_error(pred, target)
}

/// `model`'s prediction at `x_t` and timesteps `t` [B], conditioned on `cond` (the conditional
/// model, as trained).
fn prediction<M: Denoiser>(
    model: &M,
    x_t: Tensor<4>,
    t: &Tensor<1>,
    cond: &Conditioning,
) -> Tensor<4> {
    let cond = cond.to_device(&x_t.device());
    match &cond.added {
        None => model.predict(x_t, t.clone(), cond.context),
        Some((added, _)) => model.predict_added(x_t, t.clone(), cond.context, added),
    }
}

/// The squared error [B] of `pred` against `target`, mean over C, H, W.
fn per_example_error(pred: Tensor<4>, target: Tensor<4>) -> Tensor<1> {
    let b = pred.dims()[0];
    (pred - target)
        .powi_scalar(2)
        .reshape([b as i64, -1])
        .mean_dim(1)
        .reshape([b])
}

/// SDPO's coefficient of the rejected image's gradient from the prediction errors `e_w`, `e_l`
/// (model output minus target) of the chosen and rejected halves:
/// `clamp((1 - mu) ||e_w||^2 / (<e_l, e_w> + 1e-9), 0, 1)` when `<e_l, e_w> > 0`, else 1.
pub fn safeguard_scale(e_w: &[f32], e_l: &[f32], mu: f64) -> f64 {
    let num: f64 = e_w.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    let den: f64 = e_w
        .iter()
        .zip(e_l)
        .map(|(&w, &l)| f64::from(w) * f64::from(l))
        .sum();
    if den > 0.0 {
        ((1.0 - mu) * num / (den + 1e-9)).clamp(0.0, 1.0)
    } else {
        1.0
    }
}

/// `d_l` in the forward pass, its gradient scaled by `lambda` (the reference's straight-through
/// `sg(d_l) + lambda (d_l - sg(d_l))`).
pub fn scale_gradient(d_l: Tensor<1>, lambda: f64) -> Tensor<1> {
    let held = d_l.clone().detach();
    held.clone() + (d_l - held) * lambda
}

/// Both images of each pair of `p` noised with the pair's noise at `timesteps` (one per pair):
/// `[chosen; rejected]` as x_t and the training target, the timesteps and the prompts, each
/// twice over.
pub(crate) fn noised_pairs<M: PolicyModel>(
    policy: &crate::Policy<M>,
    p: &crate::batch::Pairs,
    timesteps: &[f64],
) -> Result<(Tensor<4>, Tensor<4>, Vec<f64>, crate::batch::Prompts)> {
    let x0 = Tensor::cat(vec![p.chosen.clone(), p.rejected.clone()], 0);
    let noise = Tensor::cat(vec![p.noise.clone(), p.noise.clone()], 0);
    let ts: Vec<f64> = timesteps.iter().chain(timesteps).copied().collect();
    let x_t = policy.noise.add_noise(x0.clone(), noise.clone(), &ts)?;
    let target = policy.noise.training_target(x0, noise, &ts)?;
    Ok((x_t, target, ts, p.prompts.repeat(2)))
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
        let (x_t, target, ts, both) = noised_pairs(policy, p, &p.timesteps)?;
        let d_ref = denoising_error(
            &policy.reference,
            x_t.clone(),
            target.clone(),
            &ts,
            &policy.conditional(&both, &policy.device),
        );
        let ad = policy.autodiff_device();
        let t = Tensor::<1>::from_data(
            TensorData::new(ts.iter().map(|&v| v as f32).collect(), [2 * b]),
            &ad,
        );
        let pred = prediction(
            &policy.model,
            x_t.autodiff(),
            &t,
            &policy.conditional(&both, &ad),
        );
        let target = target.autodiff();
        let mut metrics = Vec::new();
        let lambda = match self.safeguard {
            None => 1.0,
            Some(mu) => {
                let e = crate::methods::ddpo::to_f32(
                    (pred.clone() - target.clone()).inner().reshape([-1]),
                )?;
                let half = e.len() / 2;
                let lambda = safeguard_scale(&e[..half], &e[half..], mu);
                metrics.push(("safeguard_lambda", lambda));
                lambda
            }
        };
        let d = per_example_error(pred, target);
        let d_ref = d_ref.autodiff();
        let d_l = d.clone().narrow(0, b, b);
        let d_l = if self.safeguard.is_some() {
            scale_gradient(d_l, lambda)
        } else {
            d_l
        };
        let (loss, inside) = dpo_loss(
            d.narrow(0, 0, b),
            d_l,
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
        metrics.insert(0, ("implicit_acc", implicit_acc));
        Ok(MicroStep {
            grads,
            loss: value,
            metrics,
            rewards: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    /// SDPO's coefficient on numbers worked by hand, and its straight-through form: the value of
    /// d_l unchanged, its gradient scaled by lambda.
    #[test]
    fn safeguard_by_hand() {
        // ||e_w||^2 = 1 + 4 = 5; <e_l, e_w> = 2 + 2 = 4; (1 - 0.5) 5 / 4 = 0.625.
        assert!((safeguard_scale(&[1.0, 2.0], &[2.0, 1.0], 0.5) - 0.625).abs() < 1e-9);
        // Capped at 1; a negative alignment leaves the gradient as it is.
        assert_eq!(safeguard_scale(&[1.0, 2.0], &[0.5, 0.5], 0.0), 1.0);
        assert_eq!(safeguard_scale(&[1.0, 2.0], &[-2.0, 0.5], 0.9), 1.0);
        // mu = 1 stops the rejected image's gradient whenever the two align.
        assert_eq!(safeguard_scale(&[1.0], &[3.0], 1.0), 0.0);
        let device = Device::default().autodiff();
        let x =
            Tensor::<1>::from_data(TensorData::new(vec![0.3f32, 0.7], [2]), &device).require_grad();
        let y = scale_gradient(x.clone().powi_scalar(2), 0.25);
        let v = crate::methods::ddpo::to_f32(y.clone().inner()).unwrap();
        assert!(
            (v[0] - 0.09).abs() < 1e-6 && (v[1] - 0.49).abs() < 1e-6,
            "{v:?}"
        );
        let grads = y.sum().backward();
        let g = crate::methods::ddpo::to_f32(x.grad(&grads).unwrap()).unwrap();
        // d(x^2)/dx = 2x, times 0.25.
        assert!(
            (g[0] - 0.15).abs() < 1e-6 && (g[1] - 0.35).abs() < 1e-6,
            "{g:?}"
        );
    }

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
