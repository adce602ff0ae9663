//! RWR, reward-weighted regression over the policy's own samples: the baseline the DDPO paper
//! compares against (Black et al., "Training Diffusion Models with Reinforcement Learning", ICLR
//! 2024, section 4.2, after Peters & Schaal 2007 and Lee et al. 2023). Each update samples a
//! batch from the current model, scores it, and fits the samples back with the denoising loss,
//! each weighted by its exponentiated reward:
//!
//! ```text
//! z_b = (r_b - mean r) / (std r + 1e-6)                 (the batch's standardised rewards)
//! w_b = exp(beta * z_b) / mean_b' exp(beta * z_b')      (mean weight 1)
//! L   = mean_b w_b * ||eps - eps_theta(sqrt(abar_t) x0_b + sqrt(1 - abar_t) eps, t, c_b)||^2
//! ```
//!
//! The denoising loss stands in for the sample's log-likelihood (the ELBO, as the DDPO paper
//! does), with t ~ U{0..T-1} and eps drawn per sample. The paper's code is not public; this
//! reading is ours: the rewards are standardised over the batch so that `beta` (the inverse
//! temperature) means the same whatever the reward's scale, and the weights are normalised to
//! mean 1, so `beta = 0` is plain online fine-tuning on the model's own samples. The paper's
//! "sparse" variant, which keeps only samples above a reward quantile, is RAFT (`raft.rs`).
//! The effective sample size of the weights, `(sum w)^2 / (N sum w^2)`, is logged as `ess`.

use crate::batch::{Batch, Collect};
use crate::config::AlignConfig;
use crate::methods::{MethodSpec, denoising};
use crate::{Algorithm, Context, MicroStep, PolicyModel};
use burn::optim::GradientsParams;
use serde::{Deserialize, Serialize};
use tiller_core::{Error, Result, SeededRng};

/// `[method.rwr]`: reward-weighted regression.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RwrConfig {
    /// Inverse temperature of the exponential weights on standardised rewards (0: every sample
    /// weighs 1).
    pub beta: f64,
}

impl Default for RwrConfig {
    fn default() -> Self {
        Self { beta: 1.0 }
    }
}

impl MethodSpec for RwrConfig {
    fn name(&self) -> &'static str {
        "rwr"
    }

    fn paper(&self) -> &'static str {
        "Black et al., Training Diffusion Models with Reinforcement Learning (the RWR baseline), ICLR 2024"
    }

    fn validate(&self, _config: &AlignConfig) -> Result<()> {
        if !(self.beta >= 0.0 && self.beta.is_finite()) {
            return Err(Error::config(
                "method.rwr.beta",
                format!("must be >= 0, got {}", self.beta),
            ));
        }
        Ok(())
    }

    fn build<M: PolicyModel>(&self) -> Box<dyn Algorithm<M>> {
        Box::new(Rwr { beta: self.beta })
    }

    /// A fit of samples, not a chain's log-probabilities: no per-step KL applies.
    fn takes_kl(&self) -> bool {
        false
    }
}

pub struct Rwr {
    pub beta: f64,
}

/// The exponential weights of `rewards` at inverse temperature `beta`, mean 1.
pub fn exponential_weights(rewards: &[f64], beta: f64) -> Vec<f64> {
    let (m, s) = crate::methods::ddpo::mean_std(rewards);
    let z: Vec<f64> = rewards
        .iter()
        .map(|r| beta * (r - m) / (s + 1e-6))
        .collect();
    // Shifted by the largest exponent before exponentiating (the normalisation cancels it).
    let top = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|v| (v - top).exp()).collect();
    let mean = e.iter().sum::<f64>() / e.len().max(1) as f64;
    e.into_iter().map(|v| v / mean).collect()
}

/// The effective sample size of weights, as a fraction of their number: 1 when all are equal.
pub fn effective_fraction(weights: &[f64]) -> f64 {
    let sum: f64 = weights.iter().sum();
    let sq: f64 = weights.iter().map(|w| w * w).sum();
    if sq == 0.0 {
        return 0.0;
    }
    sum * sum / (sq * weights.len() as f64)
}

/// The shared update of the sample-fitting methods: gradients of `scale * mean(w * d)` on a
/// micro-batch of weighted samples.
pub(crate) fn fit_samples<M: PolicyModel>(
    cx: &Context<'_, M>,
    batch: &Batch,
    scale: f64,
    method: &str,
) -> Result<MicroStep> {
    let Batch::Samples(s) = batch else {
        return Err(Error::invalid(format!("{method} needs scored samples")));
    };
    let loss = denoising::weighted_loss(cx.policy, &s.samples, Some(&s.weights))?;
    let value = loss.clone().into_scalar::<f64>();
    let grads = GradientsParams::from_grads((loss * scale).backward(), &cx.policy.model);
    Ok(MicroStep {
        grads,
        loss: value,
        metrics: Vec::new(),
        rewards: Vec::new(),
    })
}

impl<M: PolicyModel> Algorithm<M> for Rwr {
    fn name(&self) -> &'static str {
        "rwr"
    }

    fn collects(&self) -> Collect {
        Collect::Samples
    }

    fn prepare(
        &mut self,
        _cx: &Context<'_, M>,
        batch: &mut Batch,
        _rng: &mut SeededRng,
    ) -> Result<Vec<(&'static str, f64)>> {
        let Batch::Samples(s) = batch else {
            return Err(Error::invalid("rwr needs scored samples"));
        };
        s.weights = exponential_weights(&s.rewards, self.beta);
        Ok(vec![("ess", effective_fraction(&s.weights))])
    }

    fn gradients(
        &mut self,
        cx: &Context<'_, M>,
        batch: &Batch,
        scale: f64,
        _rng: &mut SeededRng,
    ) -> Result<MicroStep> {
        fit_samples(cx, batch, scale, "rwr")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Weights worked by hand: rewards [0, 1] standardise to [-1, 1]; at beta = 1 the weights are
    /// proportional to [e^-1, e^1], mean 1: [2 / (1 + e^2), 2 e^2 / (1 + e^2)].
    #[test]
    fn weights_by_hand() {
        let w = exponential_weights(&[0.0, 1.0], 1.0);
        let e2 = std::f64::consts::E.powi(2);
        assert!((w[0] - 2.0 / (1.0 + e2)).abs() < 1e-6, "{w:?}");
        assert!((w[1] - 2.0 * e2 / (1.0 + e2)).abs() < 1e-6, "{w:?}");
        // beta = 0: plain fine-tuning on the samples.
        assert_eq!(exponential_weights(&[0.0, 5.0, -3.0], 0.0), vec![1.0; 3]);
        // The reward's scale does not matter (up to the 1e-6 in the denominator); its order does.
        let a = exponential_weights(&[0.1, 0.2, 0.4], 2.0);
        let b = exponential_weights(&[10.0, 20.0, 40.0], 2.0);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-4, "{a:?} {b:?}");
        }
        assert!(a[2] > a[1] && a[1] > a[0]);
        assert!((effective_fraction(&[1.0, 1.0]) - 1.0).abs() < 1e-12);
        assert!((effective_fraction(&[2.0, 0.0]) - 0.5).abs() < 1e-12);
    }
}
