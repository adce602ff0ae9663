//! PRDP, proximal reward difference prediction (Deng et al., "PRDP: Proximal Reward Difference
//! Prediction for Large-Scale Reward Finetuning of Diffusion Models", CVPR 2024): RL turned into
//! regression. For two rollouts a, b of the same prompt the model is trained so that its
//! denoising trajectories *predict their reward difference*, with each step's log-ratio to the
//! sampling policy clipped (the proximal update):
//!
//! ```text
//! rho_t(x) = clip(log pi_theta(x_{t-1} | x_t) - log pi_old(x_{t-1} | x_t), -eps, eps)
//! L        = mean over pairs of ( (r~_a - r~_b) - beta * sum_t [rho_t(a) - rho_t(b)] )^2
//! ```
//!
//! The paper proves the objective shares its optimum with KL-regularised RL (`beta` is the KL
//! weight). No code is public and the exact formula is marked unverified in `methods.md` §2.7;
//! this is our reading of it: the rewards are standardised over the batch (`r~`), the log-
//! probabilities are means over dimensions (ddpo-pytorch's convention, so `eps = 1e-4` is DDPO's
//! trust region), and the sum runs over every stochastic step. `beta = 1000` lets the clipped sum
//! over a 20-step chain (at most `2 x 20 x 1e-4 = 4e-3`) reach a gap of four standard deviations.
//! Each update samples `train.images_per_prompt = 2` rollouts of every drawn prompt (online
//! sampling); `inner_epochs` passes over a batch are where the clipping bites.
//!
//! The squared loss of a sum over steps is trained one step at a time (memory stays one step's
//! graph): with the residual `e = (r~_a - r~_b) - beta * sum_t [rho_t(a) - rho_t(b)]` computed
//! first without a graph, step t contributes the gradient of `-2 beta e [rho_t(a) - rho_t(b)]`
//! (`e` held constant), and the steps' gradients sum to the loss's.

use crate::batch::{Batch, Collect, Rollouts};
use crate::config::AlignConfig;
use crate::methods::MethodSpec;
use crate::methods::ddpo::{log_prob_under, mean_std, step_log_prob, to_f32};
use crate::{Algorithm, Context, MicroStep, PolicyModel};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};
use tiller_core::{Error, Result, SeededRng};

/// `[method.prdp]`: PRDP (our reading; see the module notes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrdpConfig {
    /// beta, the KL weight the regression's optimum shares.
    pub beta: f64,
    /// eps, the clip of each step's log-ratio.
    pub clip_range: f64,
    /// Optimizer passes over each collected batch.
    pub inner_epochs: usize,
}

impl Default for PrdpConfig {
    fn default() -> Self {
        Self {
            beta: 1000.0,
            clip_range: 1e-4,
            inner_epochs: 1,
        }
    }
}

impl MethodSpec for PrdpConfig {
    fn name(&self) -> &'static str {
        "prdp"
    }

    fn paper(&self) -> &'static str {
        "Deng et al., PRDP: Proximal Reward Difference Prediction for Large-Scale Reward Finetuning of Diffusion Models, CVPR 2024"
    }

    fn validate(&self, config: &AlignConfig) -> Result<()> {
        let f = super::Fields("prdp");
        f.stochastic_steps(config)?;
        f.whole_pairs(config)?;
        f.positive(&[("beta", self.beta), ("clip_range", self.clip_range)])?;
        f.at_least_one(&[("inner_epochs", self.inner_epochs)])
    }

    fn build<M: PolicyModel>(&self) -> Box<dyn Algorithm<M>> {
        Box::new(Prdp {
            config: self.clone(),
        })
    }

    /// Regularised by its own beta and the clipping.
    fn takes_kl(&self) -> bool {
        false
    }

    fn size_to_budget(&self, config: &AlignConfig, budget: u64) -> (Vec<String>, u64) {
        super::rollout_budget(config, budget, self.inner_epochs)
    }
}

pub struct Prdp {
    pub config: PrdpConfig,
}

/// The pairs' per-pair loss and residual from their reward gaps [P] and their clipped log-ratio
/// sums `s_a`, `s_b` [P]: `e = gap - beta (s_a - s_b)`, `L = mean e^2`.
pub fn prdp_residual(gap: &[f64], s_a: &[f64], s_b: &[f64], beta: f64) -> (f64, Vec<f64>) {
    let e: Vec<f64> = gap
        .iter()
        .zip(s_a.iter().zip(s_b))
        .map(|(g, (a, b))| g - beta * (a - b))
        .collect();
    let loss = e.iter().map(|v| v * v).sum::<f64>() / e.len().max(1) as f64;
    (loss, e)
}

/// Column `c` (0: the first rollout of each pair, 1: the second) of a [2P] tensor, [P].
fn pair_column(t: Tensor<1>, c: usize) -> Tensor<1> {
    let p = t.dims()[0] / 2;
    t.reshape([p, 2]).narrow(1, c, 1).reshape([p])
}

impl Prdp {
    /// Each stochastic step's clipped log-ratio [2P] under the current weights, without a graph.
    fn clipped_ratios<M: PolicyModel>(
        &self,
        cx: &Context<'_, M>,
        r: &Rollouts,
        steps: &[usize],
    ) -> Result<Vec<Vec<f64>>> {
        let policy = cx.policy;
        let current = policy.current();
        let cond = policy.conditioning(&r.prompts, &policy.device);
        let eps = self.config.clip_range;
        steps
            .iter()
            .map(|&i| {
                let lp = log_prob_under(policy, &current, &cond, r, i)?;
                let old = r.log_probs[i]
                    .clone()
                    .ok_or_else(|| Error::invalid(format!("step {i} has no log-probability")))?;
                Ok(to_f32(lp - old)?
                    .into_iter()
                    .map(|v| f64::from(v).clamp(-eps, eps))
                    .collect())
            })
            .collect()
    }
}

impl<M: PolicyModel> Algorithm<M> for Prdp {
    fn name(&self) -> &'static str {
        "prdp"
    }

    fn collects(&self) -> Collect {
        Collect::Rollouts
    }

    fn updates_per_batch(&self) -> usize {
        self.config.inner_epochs
    }

    /// The rewards standardised over the whole collected batch.
    fn prepare(
        &mut self,
        _cx: &Context<'_, M>,
        batch: &mut Batch,
        _rng: &mut SeededRng,
    ) -> Result<Vec<(&'static str, f64)>> {
        let Batch::Rollouts(r) = batch else {
            return Err(Error::invalid("prdp needs rollouts"));
        };
        let (m, s) = mean_std(&r.rewards);
        r.advantages = r.rewards.iter().map(|x| (x - m) / (s + 1e-6)).collect();
        Ok(Vec::new())
    }

    fn gradients(
        &mut self,
        cx: &Context<'_, M>,
        batch: &Batch,
        scale: f64,
        _rng: &mut SeededRng,
    ) -> Result<MicroStep> {
        let Batch::Rollouts(r) = batch else {
            return Err(Error::invalid("prdp needs rollouts"));
        };
        r.check_groups("prdp", Some(2))?;
        let n = r.prompts.len();
        if r.advantages.len() != n {
            return Err(Error::invalid(
                "prdp: the rewards were not standardised for this batch (prepare)",
            ));
        }
        let policy = cx.policy;
        let beta = self.config.beta;
        let eps = self.config.clip_range;
        let steps: Vec<usize> = (0..r.log_probs.len())
            .filter(|&i| r.log_probs[i].is_some())
            .collect();
        let p = n / 2;
        let gap: Vec<f64> = (0..p)
            .map(|j| r.advantages[2 * j] - r.advantages[2 * j + 1])
            .collect();
        // The residual under the current weights, without a graph.
        let ratios = self.clipped_ratios(cx, r, &steps)?;
        let (mut s_a, mut s_b) = (vec![0.0; p], vec![0.0; p]);
        let mut clipped = 0usize;
        for rho in &ratios {
            for j in 0..p {
                s_a[j] += rho[2 * j];
                s_b[j] += rho[2 * j + 1];
            }
            clipped += rho.iter().filter(|v| v.abs() >= eps).count();
        }
        let (loss, e) = prdp_residual(&gap, &s_a, &s_b, beta);
        // Step by step: the gradient of mean_j(-2 beta e_j (rho_t(a_j) - rho_t(b_j))).
        let ad = policy.autodiff_device();
        let cond = policy.conditioning(&r.prompts, &ad);
        let coef = Tensor::<1>::from_data(
            TensorData::new(
                e.iter()
                    .map(|v| (-2.0 * beta * v / p as f64) as f32)
                    .collect(),
                [p],
            ),
            &ad,
        );
        let mut acc = GradientsAccumulator::<M>::new();
        for &i in &steps {
            let (_, log_prob) = step_log_prob(policy, &cond, r, i)?;
            let old = r.log_probs[i]
                .clone()
                .expect("a stochastic step")
                .autodiff();
            let rho = (log_prob - old).clamp(-eps, eps);
            let diff = pair_column(rho.clone(), 0) - pair_column(rho, 1);
            let surrogate = (diff * coef.clone()).sum() * scale;
            acc.accumulate(
                &policy.model,
                GradientsParams::from_grads(surrogate.backward(), &policy.model),
            );
        }
        Ok(MicroStep {
            grads: acc.grads(),
            loss,
            metrics: vec![("clipfrac", clipped as f64 / (n * steps.len()).max(1) as f64)],
            rewards: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn residual_by_hand() {
        // gap 1, beta 10, sums 0.03 and -0.02: e = 1 - 10 * 0.05 = 0.5; second pair e = -2.
        let (l, e) = prdp_residual(&[1.0, -2.0], &[0.03, 0.0], &[-0.02, 0.0], 10.0);
        assert!((e[0] - 0.5).abs() < 1e-12 && (e[1] + 2.0).abs() < 1e-12);
        assert!((l - (0.25 + 4.0) / 2.0).abs() < 1e-12);
        let device = burn::tensor::Device::default();
        let t = Tensor::<1>::from_data(TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [4]), &device);
        assert_eq!(to_f32(pair_column(t.clone(), 0)).unwrap(), vec![1.0, 3.0]);
        assert_eq!(to_f32(pair_column(t, 1)).unwrap(), vec![2.0, 4.0]);
    }
}
