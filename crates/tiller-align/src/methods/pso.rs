//! PSO, pairwise sample optimisation (Miao et al., "Tuning Timestep-Distilled Diffusion Model
//! Using Pairwise Sample Optimization", ICLR 2025), as the authors' code
//! (`ZichenMiao/Pairwise_Sample_Optimization`, built on D3PO's) writes it. A timestep-distilled
//! model fine-tuned with the plain denoising loss loses its few-step sampling; PSO instead raises
//! the likelihood of target images *relative to reference images sampled from the current
//! distilled model on the same prompt*, and only at the distilled model's own timesteps, so the
//! model keeps generating in few steps while its output distribution moves. Two forms:
//!
//! **Online** (`pairs = "online"`, `train_online_pso_sdxl_{turbo,dmd2}.py`): two trajectories of
//! each prompt from the current few-step sampler, each from its own initial noise; the one the
//! reward ranks higher is the target, the other the reference. The loss is D3PO's on the
//! few-step chain's stochastic steps (the last, deterministic step is not trained, as the scripts
//! drop it), against the frozen starting model (the scripts' LoRA-disabled UNet):
//!
//! ```text
//! rho_i = clamp(exp(log pi_theta(x^i_{j-1} | x^i_j) - log pi_ref(x^i_{j-1} | x^i_j)), 1 - eps, 1 + eps)
//! L     = mean over pairs and trained steps of -log sigmoid(beta (log rho_target - log rho_reference))
//! ```
//!
//! with log-probabilities means over dimensions. This is [`crate::methods::d3po`]'s algorithm
//! with independent starts (`shared_start = true` gives D3PO's shared ones); it needs a stochastic sampler (`sampling.eta > 0`). Defaults: beta
//! 50, eps 0.1 (both scripts' `train.beta`, `train.eps`).
//!
//! **Offline** (`pairs = "offline"`): the target is a stored image (the chosen image of each of
//! the store's comparisons: the paper's offline preference tuning on Pick-a-Pic winners, or a
//! subject's photos in its personalisation script); the reference is the current model's own
//! sample of the same prompt, drawn afresh for every pair. Both are noised with the same noise at
//! the same timestep, drawn from the distilled model's grid (the sampler's timesteps; the
//! personalisation script's "4 timestep schedule"), and with `d(x)` the epsilon error (mean over
//! pixels; the script's sigma^-2-weighted x_0 error of an EDM model is the same quantity):
//!
//! ```text
//! m      = d_theta(target) - gamma d_theta(reference)
//! hinge:   L = relu(1 + beta m)                                     (`loss_type pso_db`)
//! sigmoid: L = -log sigmoid(-beta (m - (d_ref(target) - gamma d_ref(reference))))   (`pso`)
//! L     += prior_weight d_theta(reference)
//! ```
//!
//! `gamma` (`neg_defactor 0.1`) down-weights the reference's error; the prior term (`prior_loss_
//! weight 0.5`) keeps the model fitting its own samples, "to avoid forgetting" its few-step
//! generation. The released script's loss is the hinge, beta 5 (`beta_pso`). The paper's offline
//! preference setting (Pick-a-Pic, how its pairs are formed) is not in the released code: this
//! reading takes the stored winner as the target and ignores the stored loser.
//!
//! Readings: the paper's equations were not available here (`methods.md` §2.13 has its abstract
//! only); both forms follow the code. On Tiller's few-step students (DDIM, eta 0), the online
//! form samples its pairs with `sampling.eta` (the DMD2 script's re-noising step is DDIM's step
//! with more noise than eta 1 gives); the offline form samples its references with the run's
//! sampler as configured.

use crate::batch::{Batch, Collect};
use crate::config::AlignConfig;
use crate::methods::d3po::{D3po, D3poConfig};
use crate::methods::diffusion_dpo::{denoising_error, noised_pairs, train_split};
use crate::methods::{Fields, MethodSpec, StoreData, StoreRead};
use crate::{Algorithm, Context, MicroStep, PolicyModel};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use burn::tensor::activation::{log_sigmoid, relu};
use serde::{Deserialize, Serialize};
use tiller_core::{Error, Result, SeededRng};

/// Where PSO's pairs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PsoPairs {
    /// Two samples of the current model per prompt, ranked by the run's reward.
    Online,
    /// The store's chosen images against the current model's own samples.
    Offline,
}

/// The offline margin's loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PsoLoss {
    /// `relu(1 + beta m)`, no reference model (`pso_db`, the released script's).
    Hinge,
    /// `-log sigmoid(-beta (m - m_ref))` against the frozen starting model (`pso`).
    Sigmoid,
}

/// `[method.pso]`: the authors' scripts' defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PsoConfig {
    pub pairs: PsoPairs,
    /// Online: the DPO temperature on the per-step log-ratios (`train.beta 50`).
    pub beta: f64,
    /// Online: each step's likelihood ratio is clamped to [1 - eps, 1 + eps] (`train.eps 0.1`).
    pub clip_range: f64,
    /// Online: optimizer passes over each collected batch (`num_inner_epochs 1`).
    pub inner_epochs: usize,
    /// Online: a pair's two trajectories start from one initial latent (D3PO's pairs), not each
    /// from its own. The released script's comment says "use the same starting latents" but its
    /// second pipeline call draws new ones; the default follows the call.
    pub shared_start: bool,
    /// Offline: the margin's loss.
    pub loss: PsoLoss,
    /// Offline: the margin's scale (`beta_pso 5`).
    pub margin_beta: f64,
    /// Offline: the reference image's weight in the margin (`neg_defactor 0.1`).
    pub reference_weight: f64,
    /// Offline: the weight of the reference image's own denoising error (`prior_loss_weight 0.5`).
    pub prior_weight: f64,
    /// Offline: the preference store whose chosen images are the targets.
    pub store: String,
    /// Its split: `train`.
    pub split: String,
    /// Offline: at most this many comparisons (the first in the store; 0: all).
    pub max_comparisons: usize,
}

impl Default for PsoConfig {
    fn default() -> Self {
        Self {
            pairs: PsoPairs::Online,
            beta: 50.0,
            clip_range: 0.1,
            inner_epochs: 1,
            shared_start: false,
            loss: PsoLoss::Hinge,
            margin_beta: 5.0,
            reference_weight: 0.1,
            prior_weight: 0.5,
            store: "runs/prefs".into(),
            split: "train".into(),
            max_comparisons: 0,
        }
    }
}

impl PsoConfig {
    fn online_d3po(&self) -> D3poConfig {
        D3poConfig {
            beta: self.beta,
            clip_range: self.clip_range,
            timestep_fraction: 1.0,
            inner_epochs: self.inner_epochs,
        }
    }
}

impl MethodSpec for PsoConfig {
    fn name(&self) -> &'static str {
        "pso"
    }

    fn paper(&self) -> &'static str {
        "Miao et al., Tuning Timestep-Distilled Diffusion Model Using Pairwise Sample Optimization, ICLR 2025"
    }

    fn validate(&self, config: &AlignConfig) -> Result<()> {
        let f = Fields("pso");
        match self.pairs {
            PsoPairs::Online => {
                f.stochastic_steps(config)?;
                f.whole_pairs(config)?;
                f.positive(&[("beta", self.beta)])?;
                f.open_unit_interval(&[("clip_range", self.clip_range)])?;
                f.at_least_one(&[("inner_epochs", self.inner_epochs)])
            }
            PsoPairs::Offline => {
                f.positive(&[("margin_beta", self.margin_beta)])?;
                f.non_negative(&[
                    ("reference_weight", self.reference_weight),
                    ("prior_weight", self.prior_weight),
                ])?;
                train_split("method.pso.split", &self.split)
            }
        }
    }

    fn build<M: PolicyModel>(&self) -> Box<dyn Algorithm<M>> {
        match self.pairs {
            PsoPairs::Online => Box::new(D3po {
                config: self.online_d3po(),
                name: "pso",
                shared_start: self.shared_start,
            }),
            PsoPairs::Offline => Box::new(OfflinePso {
                config: self.clone(),
            }),
        }
    }

    /// Regularised by its margin against the reference images (and online, its clamp).
    fn takes_kl(&self) -> bool {
        false
    }

    /// Online it samples pairs per prompt; offline one reference per stored pair.
    fn samples(&self) -> bool {
        self.pairs == PsoPairs::Online
    }

    fn store(&self) -> Option<StoreRead> {
        (self.pairs == PsoPairs::Offline).then(|| StoreRead {
            data: StoreData::Comparisons,
            store: self.store.clone(),
            split: self.split.clone(),
            limit: self.max_comparisons,
            field: "method.pso.store",
            category: None,
        })
    }

    /// Beside an online run, `tiller compare` runs the offline form (row `pso-offline`): the
    /// store's targets against the model's own deterministic samples.
    fn variants(&self, _config: &AlignConfig, _budget: u64) -> Vec<(&'static str, Vec<String>)> {
        if self.pairs != PsoPairs::Online {
            return Vec::new();
        }
        vec![(
            "offline",
            vec![
                "method.pso.pairs=\"offline\"".into(),
                "train.images_per_prompt=1".into(),
                "sampling.eta=0".into(),
            ],
        )]
    }

    /// Online: each collected batch costs its rollouts' rewards. Offline: each comparison is one
    /// annotator query (as Diffusion-DPO's); the run's updates stay as configured.
    fn size_to_budget(&self, config: &AlignConfig, budget: u64) -> (Vec<String>, u64) {
        match self.pairs {
            PsoPairs::Online => super::rollout_budget(config, budget, self.inner_epochs),
            PsoPairs::Offline => (
                vec![format!("method.pso.max_comparisons={budget}")],
                config.train.updates,
            ),
        }
    }
}

/// PSO's offline form (the online one is [`D3po`] with independent starts).
pub struct OfflinePso {
    pub config: PsoConfig,
}

/// The distilled model's timestep for a training timestep `t` drawn uniformly from
/// `0..num_train`: `grid[floor(t * len / num_train)]`, so each of the grid's timesteps is drawn
/// (nearly) equally often.
pub fn grid_timestep(t: f64, grid: &[f64], num_train: usize) -> f64 {
    let k = grid.len();
    let i = ((t.max(0.0) as usize) * k / num_train.max(1)).min(k - 1);
    grid[i]
}

/// The offline loss per pair [B] and its margin `m = d_w - gamma d_l` [B], from the policy's
/// errors on the targets (`d_w`) and the references (`d_l`) and, for the sigmoid, the frozen
/// model's (`reference`).
pub fn offline_loss(
    d_w: Tensor<1>,
    d_l: Tensor<1>,
    reference: Option<(Tensor<1>, Tensor<1>)>,
    config: &PsoConfig,
) -> Result<(Tensor<1>, Tensor<1>)> {
    let (beta, gamma) = (config.margin_beta, config.reference_weight);
    let m = d_w - d_l.clone() * gamma;
    let pair = match (config.loss, reference) {
        (PsoLoss::Hinge, _) => relu(m.clone() * beta + 1.0),
        (PsoLoss::Sigmoid, Some((r_w, r_l))) => {
            let m_ref = r_w - r_l * gamma;
            log_sigmoid((m.clone() - m_ref) * (-beta)).neg()
        }
        (PsoLoss::Sigmoid, None) => {
            return Err(Error::invalid(
                "pso: the sigmoid loss needs the frozen model's errors",
            ));
        }
    };
    Ok((pair + d_l * config.prior_weight, m))
}

impl<M: PolicyModel> Algorithm<M> for OfflinePso {
    fn name(&self) -> &'static str {
        "pso"
    }

    fn collects(&self) -> Collect {
        Collect::PairsWithOwnSamples
    }

    fn gradients(
        &mut self,
        cx: &Context<'_, M>,
        batch: &Batch,
        scale: f64,
        _rng: &mut SeededRng,
    ) -> Result<MicroStep> {
        let Batch::Pairs(p) = batch else {
            return Err(Error::invalid(
                "pso (offline) needs target images with the model's own samples",
            ));
        };
        let policy = cx.policy;
        let b = p.prompts.len();
        let grid = policy.sampler.timesteps().to_vec();
        if grid.is_empty() {
            return Err(Error::invalid("pso: the sampler has no timesteps"));
        }
        let num_train = policy.noise.num_train_timesteps();
        let on_grid: Vec<f64> = p
            .timesteps
            .iter()
            .map(|&t| grid_timestep(t, &grid, num_train))
            .collect();
        // [targets; references], sharing each pair's noise and timestep.
        let (x_t, target, ts, both) = noised_pairs(policy, p, &on_grid)?;
        let reference = match self.config.loss {
            PsoLoss::Hinge => None,
            PsoLoss::Sigmoid => {
                let d = denoising_error(
                    &policy.reference,
                    x_t.clone(),
                    target.clone(),
                    &ts,
                    &policy.conditional(&both, &policy.device),
                )
                .autodiff();
                Some((d.clone().narrow(0, 0, b), d.narrow(0, b, b)))
            }
        };
        let d = denoising_error(
            &policy.model,
            x_t.autodiff(),
            target.autodiff(),
            &ts,
            &policy.conditional(&both, &policy.autodiff_device()),
        );
        let (loss, m) = offline_loss(
            d.clone().narrow(0, 0, b),
            d.narrow(0, b, b),
            reference,
            &self.config,
        )?;
        let loss = loss.mean();
        let value = loss.clone().into_scalar::<f64>();
        let m = crate::methods::ddpo::to_f32(m.inner())?;
        // The fraction of pairs whose target the policy already denoises better than its
        // (gamma-weighted) reference.
        let ahead = m.iter().filter(|v| **v < 0.0).count() as f64 / b.max(1) as f64;
        let grads = GradientsParams::from_grads((loss * scale).backward(), &policy.model);
        Ok(MicroStep {
            grads,
            loss: value,
            metrics: vec![("target_ahead", ahead)],
            rewards: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn t(v: Vec<f32>) -> Tensor<1> {
        let n = v.len();
        Tensor::<1>::from_data(TensorData::new(v, [n]), &Device::default())
    }

    /// Each timestep of a 4-step grid is drawn by a quarter of 0..1000.
    #[test]
    fn training_timesteps_fall_on_the_grid() {
        let grid = [876.0, 626.0, 376.0, 126.0];
        let mut counts = [0usize; 4];
        for t in 0..1000 {
            let g = grid_timestep(t as f64, &grid, 1000);
            counts[grid.iter().position(|x| *x == g).unwrap()] += 1;
        }
        assert_eq!(counts, [250; 4]);
        assert_eq!(grid_timestep(999.0, &grid, 1000), 126.0);
        assert_eq!(grid_timestep(0.0, &[500.0], 1000), 500.0);
    }

    /// The offline losses on numbers worked by hand.
    #[test]
    fn offline_loss_by_hand() {
        let mut c = PsoConfig {
            pairs: PsoPairs::Offline,
            margin_beta: 2.0,
            reference_weight: 0.5,
            prior_weight: 0.25,
            ..Default::default()
        };
        // m = 0.1 - 0.5 * 0.4 = -0.1; hinge relu(1 - 0.2) = 0.8; + 0.25 * 0.4 = 0.9.
        // Pair 2: m = 0.6 - 0.5 * 0.2 = 0.5; relu(1 + 1) = 2; + 0.05 = 2.05.
        let (l, m) = offline_loss(t(vec![0.1, 0.6]), t(vec![0.4, 0.2]), None, &c).unwrap();
        let l = crate::methods::ddpo::to_f32(l).unwrap();
        let m = crate::methods::ddpo::to_f32(m).unwrap();
        assert!(
            (m[0] + 0.1).abs() < 1e-6 && (m[1] - 0.5).abs() < 1e-6,
            "{m:?}"
        );
        assert!(
            (l[0] - 0.9).abs() < 1e-6 && (l[1] - 2.05).abs() < 1e-6,
            "{l:?}"
        );
        // A margin below -1/beta costs only the prior.
        let (l, _) = offline_loss(t(vec![0.0]), t(vec![2.0]), None, &c).unwrap();
        assert!((crate::methods::ddpo::to_f32(l).unwrap()[0] - 0.5).abs() < 1e-6);
        // Sigmoid: m_ref = 0.3 - 0.5 * 0.4 = 0.1; -log sigmoid(-2 (-0.1 - 0.1)) = ln(1 + e^-0.4)
        // = 0.513015, + 0.1.
        c.loss = PsoLoss::Sigmoid;
        let (l, _) = offline_loss(
            t(vec![0.1]),
            t(vec![0.4]),
            Some((t(vec![0.3]), t(vec![0.4]))),
            &c,
        )
        .unwrap();
        let want = (1.0 + (-0.4f64).exp()).ln() + 0.1;
        assert!((crate::methods::ddpo::to_f32(l).unwrap()[0] as f64 - want).abs() < 1e-6);
    }
}
