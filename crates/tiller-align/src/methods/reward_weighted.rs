//! Reward-weighted likelihood fine-tuning (Lee et al., "Aligning Text-to-Image Models using Human
//! Feedback", 2023): the policy's own samples fitted back with the denoising loss weighted by
//! their reward, plus the pre-training loss on the base model's own training data, which keeps
//! the model close to what it could do before:
//!
//! ```text
//! L = mean_{(x0, c) ~ model} w(r(x0, c)) * ||eps - eps_theta(x_t, t, c)||^2
//!   + beta * mean_{(x0, c) ~ pre-training data} ||eps - eps_theta(x_t, t, c)||^2
//! ```
//!
//! No code is public; this follows the paper's equation (the formula is marked unverified in
//! `methods.md` §2.1). The paper's reward model outputs the probability that an image matches
//! its prompt, so `w = r` lies in [0, 1]; Tiller's reward models output Bradley–Terry scores
//! (log-odds), whose logistic is that probability, hence `weight = "sigmoid"` (the default).
//! `weight = "reward"` uses the reward as it is and refuses a negative one. The paper's data is a
//! fixed set of labelled model samples; here every update draws fresh samples from the current
//! model (the online variant). On the testbed the pre-training data is the renderer's images of
//! the training prompts, what the base model was trained on. `beta` is not given in the paper's
//! abstract; 1 weighs both terms alike.

use crate::batch::{Batch, Collect};
use crate::config::AlignConfig;
use crate::methods::{MethodSpec, denoising};
use crate::{Algorithm, Context, MicroStep, PolicyModel};
use burn::optim::GradientsParams;
use serde::{Deserialize, Serialize};
use tiller_core::{Error, Result, SeededRng};

/// How a reward becomes a sample's weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardWeight {
    /// `w = 1 / (1 + exp(-r))`: a Bradley–Terry score as the probability the paper weighs by.
    Sigmoid,
    /// `w = r`, which must be >= 0 (a reward that is already a probability).
    Reward,
}

/// `[method.reward-weighted]`: reward-weighted likelihood.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardWeightedConfig {
    pub weight: RewardWeight,
    /// beta, the weight of the pre-training loss (0: none).
    pub pretrain_weight: f64,
}

impl Default for RewardWeightedConfig {
    fn default() -> Self {
        Self {
            weight: RewardWeight::Sigmoid,
            pretrain_weight: 1.0,
        }
    }
}

impl MethodSpec for RewardWeightedConfig {
    fn name(&self) -> &'static str {
        "reward-weighted"
    }

    fn paper(&self) -> &'static str {
        "Lee et al., Aligning Text-to-Image Models using Human Feedback, 2023"
    }

    fn validate(&self, _config: &AlignConfig) -> Result<()> {
        if !(self.pretrain_weight >= 0.0 && self.pretrain_weight.is_finite()) {
            return Err(Error::config(
                "method.reward-weighted.pretrain_weight",
                format!("must be >= 0, got {}", self.pretrain_weight),
            ));
        }
        Ok(())
    }

    fn build<M: PolicyModel>(&self) -> Box<dyn Algorithm<M>> {
        Box::new(RewardWeighted {
            config: self.clone(),
        })
    }

    fn takes_kl(&self) -> bool {
        false
    }
}

pub struct RewardWeighted {
    pub config: RewardWeightedConfig,
}

/// The weight of each reward.
pub fn reward_weights(rewards: &[f64], weight: RewardWeight) -> Result<Vec<f64>> {
    rewards
        .iter()
        .enumerate()
        .map(|(i, &r)| match weight {
            RewardWeight::Sigmoid => Ok(1.0 / (1.0 + (-r).exp())),
            RewardWeight::Reward if r >= 0.0 => Ok(r),
            RewardWeight::Reward => Err(Error::config(
                "method.reward-weighted.weight",
                format!(
                    "`reward` weighs samples by the reward itself, but sample {i} scored {r}; \
                     use `sigmoid` for a reward that can be negative (a Bradley–Terry score)"
                ),
            )),
        })
        .collect()
}

impl<M: PolicyModel> Algorithm<M> for RewardWeighted {
    fn name(&self) -> &'static str {
        "reward-weighted"
    }

    fn collects(&self) -> Collect {
        Collect::Samples
    }

    fn pretrain(&self) -> bool {
        self.config.pretrain_weight > 0.0
    }

    fn prepare(
        &mut self,
        _cx: &Context<'_, M>,
        batch: &mut Batch,
        _rng: &mut SeededRng,
    ) -> Result<Vec<(&'static str, f64)>> {
        let Batch::Samples(s) = batch else {
            return Err(Error::invalid("reward-weighted needs scored samples"));
        };
        s.weights = reward_weights(&s.rewards, self.config.weight)?;
        let mean = s.weights.iter().sum::<f64>() / s.weights.len().max(1) as f64;
        Ok(vec![("weight_mean", mean)])
    }

    fn gradients(
        &mut self,
        cx: &Context<'_, M>,
        batch: &Batch,
        scale: f64,
        _rng: &mut SeededRng,
    ) -> Result<MicroStep> {
        let Batch::Samples(s) = batch else {
            return Err(Error::invalid("reward-weighted needs scored samples"));
        };
        let mut loss = denoising::weighted_loss(cx.policy, &s.samples, Some(&s.weights))?;
        let mut metrics = Vec::new();
        if self.config.pretrain_weight > 0.0 {
            let pretrain = s.pretrain.as_ref().ok_or_else(|| {
                Error::invalid("reward-weighted: the batch has no pre-training images")
            })?;
            let pre = denoising::weighted_loss(cx.policy, pretrain, None)?;
            metrics.push(("pretrain_loss", pre.clone().into_scalar::<f64>()));
            loss = loss + pre * self.config.pretrain_weight;
        }
        let value = loss.clone().into_scalar::<f64>();
        let grads = GradientsParams::from_grads((loss * scale).backward(), &cx.policy.model);
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

    #[test]
    fn weights_by_hand() {
        let w = reward_weights(&[0.0, 2.0, -1.0], RewardWeight::Sigmoid).unwrap();
        assert!((w[0] - 0.5).abs() < 1e-12);
        assert!((w[1] - 0.880797).abs() < 1e-6);
        assert!((w[2] - 0.268941).abs() < 1e-6);
        assert_eq!(
            reward_weights(&[0.25, 1.0], RewardWeight::Reward).unwrap(),
            vec![0.25, 1.0]
        );
        let e = reward_weights(&[0.5, -0.1], RewardWeight::Reward).unwrap_err();
        assert!(
            e.to_string().contains("method.reward-weighted.weight"),
            "{e}"
        );
    }
}
