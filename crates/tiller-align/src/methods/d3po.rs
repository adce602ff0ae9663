//! D3PO (Yang et al., "Using Human Feedback to Fine-tune Diffusion Models without Any Reward
//! Model", CVPR 2024): DPO on the denoising MDP. Each step of the chain is an action, so a
//! preference between two final images becomes a preference between the two trajectories' steps,
//! and the DPO loss is applied step by step with no reward model in between. The paper's
//! preferences come from people choosing between the two images (`scripts/sample.py`, then
//! `scripts/train.py` on a JSON of their choices); here they come from comparing the run's reward
//! on the pair (`train_with_rm.py`), as online sampling needs. Training from people's choices on
//! stored trajectories is not offered yet.
//!
//! For each drawn prompt two trajectories are sampled from the **same initial latent**
//! (`yk7333/d3po` `scripts/train_with_rm.py`: `latents = latents1[:, 0]` for the second
//! pipeline call), each with its own step noise. Their rewards decide the preference
//! `h = (+1, -1)` for the first, `(-1, +1)` for the second, `(0, 0)` on a tie (`compare()`:
//! Pareto dominance, which for Tiller's one reward is the order of the two values). Then at each
//! trained step j (the same script's training loop):
//!
//! ```text
//! rho_i = clamp(exp(log pi_theta(x^i_{j-1} | x^i_j) - log pi_ref(x^i_{j-1} | x^i_j)), 1 - eps, 1 + eps)
//! L     = mean over pairs of -log sigmoid(beta h_0 log rho_0 + beta h_1 log rho_1)
//! ```
//!
//! with `pi_ref` the frozen starting model (the script's `ref = copy.deepcopy(pipeline.unet)`
//! before the LoRA layers), log-probabilities means over dimensions (ddpo-pytorch's
//! `ddim_step_with_logprob`), one backward per step accumulated over the trained steps (the loss
//! is their mean), and guidance in the training passes as in sampling (`train.cfg = True`).
//! The clamp bounds how far a step's likelihood may move from the reference's (the paper's
//! "restricting the Q-values"; the authors' issue #4: it must be 0.9-1.1, not 0.8-1.2). Both
//! trajectories of a pair train the same steps: the script permutes the timesteps per pair,
//! keeping `timestep_fraction` of them, per inner epoch.
//!
//! Defaults: `config/base.py` (`train.beta = 0.1`, `train.eps = 0.1`, `timestep_fraction = 1.0`,
//! `num_inner_epochs = 1`; sampling DDIM eta 1, 20 steps, guidance 5).

use crate::batch::{Batch, Collect, Rollouts};
use crate::config::AlignConfig;
use crate::methods::ddpo::{
    draw_group_train_steps, for_each_trained_step, log_prob_under, step_log_prob, to_f32,
};
use crate::methods::{Fields, MethodSpec};
use crate::{Algorithm, Context, MicroStep, PolicyModel};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::activation::log_sigmoid;
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};
use tiller_core::{Error, Result, SeededRng};

/// `[method.d3po]`: `yk7333/d3po` `config/base.py` defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct D3poConfig {
    /// beta, the DPO temperature (`train.beta`).
    pub beta: f64,
    /// eps: each step's likelihood ratio to the reference is clamped to [1 - eps, 1 + eps]
    /// (`train.eps`).
    pub clip_range: f64,
    /// Fraction of the chain's steps trained per pass (a random subset per pair, drawn per update).
    pub timestep_fraction: f64,
    /// Optimizer passes over each collected batch (`train.num_inner_epochs`).
    pub inner_epochs: usize,
}

impl Default for D3poConfig {
    fn default() -> Self {
        Self {
            beta: 0.1,
            clip_range: 0.1,
            timestep_fraction: 1.0,
            inner_epochs: 1,
        }
    }
}

impl MethodSpec for D3poConfig {
    fn name(&self) -> &'static str {
        "d3po"
    }

    fn paper(&self) -> &'static str {
        "Yang et al., Using Human Feedback to Fine-tune Diffusion Models without Any Reward Model, CVPR 2024"
    }

    fn validate(&self, config: &AlignConfig) -> Result<()> {
        let f = Fields("d3po");
        f.stochastic_steps(config)?;
        f.whole_pairs(config)?;
        f.positive(&[("beta", self.beta)])?;
        // The ratio is clamped to [1 - eps, 1 + eps].
        f.open_unit_interval(&[("clip_range", self.clip_range)])?;
        f.unit_interval(&[("timestep_fraction", self.timestep_fraction)])?;
        f.at_least_one(&[("inner_epochs", self.inner_epochs)])
    }

    fn build<M: PolicyModel>(&self) -> Box<dyn Algorithm<M>> {
        Box::new(D3po::new(self.clone()))
    }

    /// Regularised by its clamp and beta, against the reference itself.
    fn takes_kl(&self) -> bool {
        false
    }

    fn size_to_budget(&self, config: &AlignConfig, budget: u64) -> (Vec<String>, u64) {
        super::rollout_budget(config, budget, self.inner_epochs)
    }
}

pub struct D3po {
    pub config: D3poConfig,
    /// The method's name in errors and logs (`d3po`, or `pso` for PSO's online form).
    pub name: &'static str,
    /// Whether a pair's two trajectories start from one initial latent (D3PO) or each from its
    /// own (PSO's online pairs).
    pub shared_start: bool,
}

impl D3po {
    /// D3PO itself: pairs from one initial latent.
    pub fn new(config: D3poConfig) -> Self {
        Self {
            config,
            name: "d3po",
            shared_start: true,
        }
    }
}

/// The preference of each pair from its rewards, as `compare()` gives it for one reward:
/// `(+1, -1)` when the first is higher, `(-1, +1)` when the second is, `(0, 0)` on a tie; laid
/// out like the rollouts, [2P].
pub fn preferences(rewards: &[f64]) -> Vec<f64> {
    rewards
        .chunks(2)
        .flat_map(|p| match p[0].partial_cmp(&p[1]) {
            Some(std::cmp::Ordering::Greater) => [1.0, -1.0],
            Some(std::cmp::Ordering::Less) => [-1.0, 1.0],
            _ => [0.0, 0.0],
        })
        .collect()
}

/// D3PO's loss of each pair at one step, [P], and the DPO logit `z` inside it, [P]: from each
/// trajectory's log-ratio to the reference `log pi_theta - log pi_ref` and its preference `h`
/// (both [2P], pairs side by side), `-log sigmoid(beta sum_i h_i log clamp(exp(log-ratio_i),
/// 1 - eps, 1 + eps))`.
pub fn d3po_loss(
    log_ratio: Tensor<1>,
    h: Tensor<1>,
    beta: f64,
    eps: f64,
) -> (Tensor<1>, Tensor<1>) {
    let p = log_ratio.dims()[0] / 2;
    let log_rho = log_ratio.exp().clamp(1.0 - eps, 1.0 + eps).log();
    let z = (log_rho * h * beta).reshape([p, 2]).sum_dim(1).reshape([p]);
    (log_sigmoid(z.clone()).neg(), z)
}

/// Checks that the rollouts are whole pairs of one prompt and one initial latent (the whole
/// collected batch, once).
fn check_pairs(r: &Rollouts, method: &str) -> Result<()> {
    r.check_groups(method, Some(2))?;
    let n = r.prompts.len();
    let [_, c, h, w] = r.latents[0].dims();
    let starts = r.latents[0].clone().reshape([n / 2, 2, c * h * w]);
    let gap = (starts.clone().narrow(1, 0, 1) - starts.narrow(1, 1, 1))
        .abs()
        .max()
        .into_scalar::<f64>();
    if gap != 0.0 {
        return Err(Error::invalid(format!(
            "{method}: a pair's two trajectories start from different latents (max |difference| \
             {gap:.3e}); they must share the initial latent"
        )));
    }
    Ok(())
}

impl<M: PolicyModel> Algorithm<M> for D3po {
    fn name(&self) -> &'static str {
        self.name
    }

    fn collects(&self) -> Collect {
        if self.shared_start {
            Collect::SharedStartRollouts
        } else {
            Collect::Rollouts
        }
    }

    fn updates_per_batch(&self) -> usize {
        self.config.inner_epochs
    }

    /// Each pair's preference from its rewards (kept as the rollouts' advantages).
    fn prepare(
        &mut self,
        _cx: &Context<'_, M>,
        batch: &mut Batch,
        _rng: &mut SeededRng,
    ) -> Result<Vec<(&'static str, f64)>> {
        let Batch::Rollouts(r) = batch else {
            return Err(Error::invalid(format!("{} needs rollouts", self.name)));
        };
        if self.shared_start {
            check_pairs(r, self.name)?;
        } else {
            r.check_groups(self.name, Some(2))?;
        }
        r.advantages = preferences(&r.rewards);
        let ties = r.advantages.iter().filter(|h| **h == 0.0).count() as f64;
        Ok(vec![("ties", ties / r.advantages.len().max(1) as f64)])
    }

    fn begin_update(
        &mut self,
        batch: &mut Batch,
        _epoch: usize,
        rng: &mut SeededRng,
    ) -> Result<()> {
        let Batch::Rollouts(r) = batch else {
            return Err(Error::invalid(format!("{} needs rollouts", self.name)));
        };
        draw_group_train_steps(r, self.config.timestep_fraction, 2, rng);
        Ok(())
    }

    fn gradients(
        &mut self,
        cx: &Context<'_, M>,
        batch: &Batch,
        scale: f64,
        _rng: &mut SeededRng,
    ) -> Result<MicroStep> {
        let Batch::Rollouts(r) = batch else {
            return Err(Error::invalid(format!("{} needs rollouts", self.name)));
        };
        if r.advantages.len() != r.prompts.len() {
            return Err(Error::invalid(format!(
                "{}: the pairs' preferences were not drawn for this batch (prepare)",
                self.name
            )));
        }
        // The shared starts were checked on the whole batch (prepare).
        r.check_groups(self.name, Some(2))?;
        let policy = cx.policy;
        let ad = policy.autodiff_device();
        let (beta, eps) = (self.config.beta, self.config.clip_range);
        let mut acc = GradientsAccumulator::<M>::new();
        let (mut loss_sum, mut clipfrac, mut agree, mut decided) = (0.0, 0.0, 0.0, 0.0);
        for_each_trained_step(r, self.name, |i, part, weight| {
            // `part` holds the rollouts training step i: whole pairs, as they are drawn per pair.
            let m = part.prompts.len();
            let cond = policy.conditioning(&part.prompts, &ad);
            let (_, log_prob) = step_log_prob(policy, &cond, part, i)?;
            let plain = policy.conditioning(&part.prompts, &policy.device);
            let reference = log_prob_under(policy, &policy.reference, &plain, part, i)?.autodiff();
            let log_ratio = log_prob - reference;
            let h = Tensor::<1>::from_data(
                TensorData::new(part.advantages.iter().map(|&v| v as f32).collect(), [m]),
                &ad,
            );
            let (loss, z) = d3po_loss(log_ratio.clone(), h, beta, eps);
            let loss = loss.mean();
            loss_sum += loss.clone().into_scalar::<f64>() * weight;
            let lr = to_f32(log_ratio.inner())?;
            clipfrac += lr
                .iter()
                .filter(|x| ((x.exp() as f64) - 1.0).abs() > eps)
                .count() as f64
                * weight
                / m as f64;
            let z = to_f32(z.inner())?;
            for (j, z) in z.iter().enumerate() {
                if part.advantages[2 * j] != 0.0 {
                    decided += weight;
                    agree += weight * (*z > 0.0) as u8 as f64;
                }
            }
            let g =
                GradientsParams::from_grads((loss * (scale * weight)).backward(), &policy.model);
            acc.accumulate(&policy.model, g);
            Ok(())
        })?;
        let mut metrics = vec![("clipfrac", clipfrac)];
        if decided > 0.0 {
            metrics.push(("implicit_acc", agree / decided));
        }
        Ok(MicroStep {
            grads: acc.grads(),
            loss: loss_sum,
            metrics,
            rewards: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preferences_follow_compare() {
        assert_eq!(
            preferences(&[0.7, 0.2, 0.1, 0.5, 0.3, 0.3]),
            vec![1.0, -1.0, -1.0, 1.0, 0.0, 0.0]
        );
    }

    #[test]
    fn loss_by_hand() {
        let device = burn::tensor::Device::default();
        let t =
            |v: Vec<f32>| Tensor::<1>::from_data(TensorData::new(v.clone(), [v.len()]), &device);
        // Pair 1: log-ratios 0.05 and -0.02 inside the clamp, h = (+1, -1), beta 2:
        // z = 2 (0.05 + 0.02) = 0.14. Pair 2: ratio exp(0.3) clamped to 1.1, exp(-0.4) to 0.9,
        // h = (-1, +1): z = 2 (-ln 1.1 + ln 0.9).
        let (loss, z) = d3po_loss(
            t(vec![0.05, -0.02, 0.3, -0.4]),
            t(vec![1.0, -1.0, -1.0, 1.0]),
            2.0,
            0.1,
        );
        let z = to_f32(z).unwrap();
        let z2 = 2.0 * (-(1.1f64).ln() + (0.9f64).ln());
        assert!((z[0] as f64 - 0.14).abs() < 1e-6, "{z:?}");
        assert!((z[1] as f64 - z2).abs() < 1e-6, "{z:?}");
        let loss = to_f32(loss).unwrap();
        let nls = |z: f64| (1.0 + (-z).exp()).ln();
        assert!((loss[0] as f64 - nls(0.14)).abs() < 1e-6);
        assert!((loss[1] as f64 - nls(z2)).abs() < 1e-6);
    }
}
