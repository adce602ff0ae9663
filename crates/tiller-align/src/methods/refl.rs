//! ReFL, reward feedback learning (Xu et al., "ImageReward: Learning and Evaluating Human
//! Preferences for Text-to-Image Generation", NeurIPS 2023; `THUDM/ImageReward` `ReFL.py`
//! l.714-756): the chain is sampled without a graph to a random late step, the model is called
//! once *with* a graph there, and its prediction of the clean image is scored by the
//! (differentiable) reward:
//!
//! ```text
//! mid ~ U{floor(min_step_fraction * steps) .. steps - 1}       (ReFL.py: [30, 39] of 40 steps)
//! x0_hat = pred_original_sample(eps_theta(x_mid, t_mid, c))
//! L_ReFL = grad_scale * mean(ReLU(hinge - r(x0_hat, c)))     (hinge 2, grad_scale 1e-3)
//! ```
//!
//! The paper alternates this with the **pre-training loss** (its Algorithm 1: a denoising step on
//! the pre-training data, then a ReFL step), which the released script leaves out (maintainer,
//! ImageReward #95: "you will need to add the pre-training loss") and without which users report
//! the tuned model falling behind the base (#95). With `pretrain = true` (the default) every
//! collected batch takes two optimizer updates, the pre-training one first, as in Algorithm 1;
//! the pre-training images are the base model's own training data (on the testbed, the renderer's
//! images of the training prompts). One `mid` is drawn per update for the whole batch, as
//! `ReFL.py` draws one per step.

use crate::batch::{Batch, Collect};
use crate::config::AlignConfig;
use crate::methods::draft_k::{differentiable, reward_values, run_prefix};
use crate::methods::{MethodSpec, denoising};
use crate::{Algorithm, Context, MicroStep, PolicyModel};
use burn::optim::GradientsParams;
use burn::tensor::activation::relu;
use serde::{Deserialize, Serialize};
use tiller_core::{Error, Result, SeededRng};

/// `[method.refl]`: `ReFL.py`'s defaults, the step range as a fraction of the chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReflConfig {
    /// The earliest step the gradient is taken at, as a fraction of the chain (30/40).
    pub min_step_fraction: f64,
    /// The hinge of `ReLU(hinge - r)` (2).
    pub hinge: f64,
    /// The ReFL loss's scale (`grad_scale`, 1e-3).
    pub grad_scale: f64,
    /// Alternate with the pre-training loss (the paper; not in the released script).
    pub pretrain: bool,
}

impl Default for ReflConfig {
    fn default() -> Self {
        Self {
            min_step_fraction: 0.75,
            hinge: 2.0,
            grad_scale: 1e-3,
            pretrain: true,
        }
    }
}

impl MethodSpec for ReflConfig {
    fn name(&self) -> &'static str {
        "refl"
    }

    fn paper(&self) -> &'static str {
        "Xu et al., ImageReward: Learning and Evaluating Human Preferences for Text-to-Image Generation, NeurIPS 2023"
    }

    fn validate(&self, _config: &AlignConfig) -> Result<()> {
        if !(0.0..=1.0).contains(&self.min_step_fraction) {
            return Err(Error::config(
                "method.refl.min_step_fraction",
                format!("must be in [0, 1], got {}", self.min_step_fraction),
            ));
        }
        if !(self.grad_scale > 0.0 && self.grad_scale.is_finite()) {
            return Err(Error::config(
                "method.refl.grad_scale",
                format!("must be positive, got {}", self.grad_scale),
            ));
        }
        if !self.hinge.is_finite() {
            return Err(Error::config("method.refl.hinge", "must be finite"));
        }
        Ok(())
    }

    fn build<M: PolicyModel>(&self) -> Box<dyn Algorithm<M>> {
        Box::new(Refl {
            config: self.clone(),
            steps: 0,
            phase: Phase::Reward(0),
        })
    }

    /// A one-step gradient at a predicted clean image: no chain step to regularise.
    fn takes_kl(&self) -> bool {
        false
    }

    /// Each collected batch costs its chains' rewards and gives two updates with pre-training.
    fn size_to_budget(&self, config: &AlignConfig, budget: u64) -> (Vec<String>, u64) {
        let train = &config.train;
        let batch = train.effective_batch().max(1) as u64;
        let per_batch = if self.pretrain { 2 } else { 1 };
        (
            vec![format!("train.reward_budget={budget}")],
            budget.div_ceil(batch) * per_batch,
        )
    }
}

/// What this update trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Pretrain,
    /// The reward step at this chain step.
    Reward(usize),
}

pub struct Refl {
    pub config: ReflConfig,
    steps: usize,
    phase: Phase,
}

impl Refl {
    /// The chain step of a ReFL update: uniform on `[floor(fraction * steps), steps - 1]`.
    pub fn draw_step(fraction: f64, steps: usize, rng: &mut SeededRng) -> usize {
        let lo = ((fraction * steps as f64).floor() as usize).min(steps.saturating_sub(1));
        lo + rng.below(steps - lo)
    }
}

impl<M: PolicyModel> Algorithm<M> for Refl {
    fn name(&self) -> &'static str {
        "refl"
    }

    fn collects(&self) -> Collect {
        Collect::Starts
    }

    fn pretrain(&self) -> bool {
        self.config.pretrain
    }

    fn updates_per_batch(&self) -> usize {
        if self.config.pretrain { 2 } else { 1 }
    }

    fn prepare(
        &mut self,
        cx: &Context<'_, M>,
        _batch: &mut Batch,
        _rng: &mut SeededRng,
    ) -> Result<Vec<(&'static str, f64)>> {
        self.steps = cx.policy.sampler.timesteps().len();
        Ok(Vec::new())
    }

    fn begin_update(
        &mut self,
        _batch: &mut Batch,
        epoch: usize,
        rng: &mut SeededRng,
    ) -> Result<()> {
        self.phase = if self.config.pretrain && epoch == 0 {
            Phase::Pretrain
        } else {
            Phase::Reward(Self::draw_step(
                self.config.min_step_fraction,
                self.steps,
                rng,
            ))
        };
        Ok(())
    }

    fn gradients(
        &mut self,
        cx: &Context<'_, M>,
        batch: &Batch,
        scale: f64,
        _rng: &mut SeededRng,
    ) -> Result<MicroStep> {
        let Batch::Starts(s) = batch else {
            return Err(Error::invalid("refl needs chain starts"));
        };
        let policy = cx.policy;
        let mid = match self.phase {
            Phase::Pretrain => {
                let images = s
                    .pretrain
                    .as_ref()
                    .ok_or_else(|| Error::invalid("refl: the batch has no pre-training images"))?;
                let loss = denoising::weighted_loss(policy, images, None)?;
                let value = loss.clone().into_scalar::<f64>();
                let grads = GradientsParams::from_grads((loss * scale).backward(), &policy.model);
                return Ok(MicroStep {
                    grads,
                    loss: value,
                    metrics: vec![("pretrain_loss", value)],
                    rewards: Vec::new(),
                });
            }
            Phase::Reward(mid) => mid,
        };
        let reward = differentiable(cx.reward, "refl")?;
        let sampler = policy.sampler.as_ref();
        // Steps [0, mid) without a graph.
        let (x, _) = run_prefix(policy, s, mid)?;
        // One model call with a graph at step `mid`; its prediction of x_0 is scored.
        let ad = policy.autodiff_device();
        let x = x.autodiff();
        let pred = policy.conditioning(&s.prompts, &ad).predict(
            &policy.model,
            x.clone(),
            sampler.timesteps()[mid],
        );
        let x0 = sampler.step(pred, mid, x)?.pred_original_sample;
        let mut rewards = Vec::new();
        let loss = policy.reward_loss(x0, |images| {
            let r = reward.score_tensor(images, &s.prompts.texts)?;
            rewards = reward_values(cx.reward, &r)?;
            Ok(relu(r.neg() + self.config.hinge).mean() * self.config.grad_scale)
        })?;
        let value = loss.clone().into_scalar::<f64>();
        let grads = GradientsParams::from_grads((loss * scale).backward(), &policy.model);
        Ok(MicroStep {
            grads,
            loss: value,
            metrics: vec![("refl_step", mid as f64)],
            rewards,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_drawn_from_the_late_range() {
        let mut rng = SeededRng::new(3);
        // ReFL.py: 40 steps, mid in [30, 39].
        let d: Vec<usize> = (0..2000)
            .map(|_| Refl::draw_step(0.75, 40, &mut rng))
            .collect();
        assert_eq!(*d.iter().min().unwrap(), 30);
        assert_eq!(*d.iter().max().unwrap(), 39);
        assert_eq!(Refl::draw_step(1.0, 20, &mut rng), 19);
        assert!((0..100).all(|_| Refl::draw_step(0.0, 4, &mut rng) < 4));
    }
}
