//! RAFT, reward-ranked fine-tuning (Dong et al., "RAFT: Reward rAnked FineTuning for Generative
//! Foundation Model Alignment", TMLR 2023; the "sparse" RWR of the DDPO paper): sample several
//! images per prompt from the current model, keep the best of each prompt's group by reward, and
//! fine-tune on the kept ones with the plain denoising loss:
//!
//! ```text
//! kept = the top ceil(keep_fraction * K) of each prompt's K samples     (K = train.images_per_prompt)
//! L    = mean over kept b of ||eps - eps_theta(x_t(x0_b), t, c_b)||^2
//! ```
//!
//! The paper's acceptance ratio is 1/K (the best of K per prompt); the preset samples K = 4 per
//! prompt and keeps one. With `train.images_per_prompt = 1` there are no groups and the whole
//! batch is ranked instead (the DDPO paper's quantile filter). The paper collects a large batch,
//! filters it and then runs several SFT epochs on it; here each update collects, filters and
//! takes one step, so the model the samples come from is always the current one (RAFT's online
//! limit). Ties at the cut are broken by the sample's position in its group.

use crate::batch::{Batch, Collect};
use crate::config::AlignConfig;
use crate::methods::MethodSpec;
use crate::methods::rwr::fit_samples;
use crate::{Algorithm, Context, MicroStep, PolicyModel};
use serde::{Deserialize, Serialize};
use tiller_core::{Error, Result, SeededRng};

/// `[method.raft]`: reward-ranked fine-tuning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    /// Fraction of each prompt's samples kept (at least one); 1/K is the paper's best-of-K.
    pub keep_fraction: f64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            keep_fraction: 0.25,
        }
    }
}

impl MethodSpec for RaftConfig {
    fn name(&self) -> &'static str {
        "raft"
    }

    fn paper(&self) -> &'static str {
        "Dong et al., RAFT: Reward rAnked FineTuning for Generative Foundation Model Alignment, TMLR 2023"
    }

    fn validate(&self, _config: &AlignConfig) -> Result<()> {
        if !(self.keep_fraction > 0.0 && self.keep_fraction <= 1.0) {
            return Err(Error::config(
                "method.raft.keep_fraction",
                format!("must be in (0, 1], got {}", self.keep_fraction),
            ));
        }
        Ok(())
    }

    fn build<M: PolicyModel>(&self) -> Box<dyn Algorithm<M>> {
        Box::new(Raft {
            keep_fraction: self.keep_fraction,
        })
    }

    fn takes_kl(&self) -> bool {
        false
    }
}

pub struct Raft {
    pub keep_fraction: f64,
}

/// Weights that keep the top `ceil(keep * group)` of each group of `group` consecutive samples
/// (the loop lays a prompt's images side by side), normalised to mean 1 over the batch;
/// `group = 1` ranks the whole batch as one group.
pub fn rank_weights(rewards: &[f64], group: usize, keep: f64) -> Vec<f64> {
    let n = rewards.len();
    let group = if group <= 1 { n.max(1) } else { group };
    let mut w = vec![0.0; n];
    for start in (0..n).step_by(group) {
        let g = start..(start + group).min(n);
        let mut order: Vec<usize> = g.clone().collect();
        // Best first; equal rewards keep their order (a stable sort).
        order.sort_by(|&a, &b| rewards[b].total_cmp(&rewards[a]));
        let kept = ((keep * g.len() as f64).ceil() as usize).clamp(1, g.len());
        for &i in &order[..kept] {
            w[i] = 1.0;
        }
    }
    let mean = w.iter().sum::<f64>() / n.max(1) as f64;
    w.into_iter().map(|v| v / mean).collect()
}

impl<M: PolicyModel> Algorithm<M> for Raft {
    fn name(&self) -> &'static str {
        "raft"
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
            return Err(Error::invalid("raft needs scored samples"));
        };
        s.weights = rank_weights(&s.rewards, s.group, self.keep_fraction);
        let kept: Vec<f64> = s
            .rewards
            .iter()
            .zip(&s.weights)
            .filter(|(_, w)| **w > 0.0)
            .map(|(r, _)| *r)
            .collect();
        Ok(vec![(
            "kept_reward_mean",
            kept.iter().sum::<f64>() / kept.len().max(1) as f64,
        )])
    }

    fn gradients(
        &mut self,
        cx: &Context<'_, M>,
        batch: &Batch,
        scale: f64,
        _rng: &mut SeededRng,
    ) -> Result<MicroStep> {
        fit_samples(cx, batch, scale, "raft")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_best_of_each_prompt() {
        // Two prompts x 4 images, keep 1 of 4: the best of each, weight 8 / 2 = 4.
        let rewards = [0.1, 0.9, 0.3, 0.2, -1.0, -3.0, -0.5, -2.0];
        let w = rank_weights(&rewards, 4, 0.25);
        assert_eq!(w, vec![0.0, 4.0, 0.0, 0.0, 0.0, 0.0, 4.0, 0.0]);
        // Keep half: the top two of each.
        let w = rank_weights(&rewards, 4, 0.5);
        assert_eq!(w, vec![0.0, 2.0, 2.0, 0.0, 2.0, 0.0, 2.0, 0.0]);
        // No groups: the batch is ranked as one.
        let w = rank_weights(&[0.4, 0.1, 0.3, 0.2], 1, 0.5);
        assert_eq!(w, vec![2.0, 0.0, 2.0, 0.0]);
        // Ties keep the earlier sample.
        assert_eq!(rank_weights(&[1.0, 1.0], 2, 0.5), vec![2.0, 0.0]);
    }
}
