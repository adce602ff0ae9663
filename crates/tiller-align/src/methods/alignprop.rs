//! AlignProp (Prabhudesai et al., "Aligning Text-to-Image Diffusion Models with Reward
//! Backpropagation", 2023; `mihirp1998/AlignProp`): the reward of the final sample backpropagated
//! through the whole DDIM chain (eta = 1) into LoRA weights, with gradient checkpointing on every
//! model call and *randomised truncation*: each update draws the step `b` from which the model's
//! outputs keep their gradient (`sd_pipeline.py`: at steps `i < b` the UNet output is detached; the
//! latent chain itself stays differentiable):
//!
//! ```text
//! gaussian: b = floor(N(mean, std))   uniform: b ~ U[min, max)   fixed: b = value
//!           (redrawn until 1 <= b < steps)
//! L = loss_coeff * mean(|r(x_0) - target|)      (loss = "l1_to_target", the aesthetic recipe)
//!   = loss_coeff * mean(-r(x_0))                (loss = "negative_reward", HPSv2's 1 - r)
//! ```
//!
//! Detaching the model's output at the early steps stops every path from the reward to the
//! weights through those steps (x_T is not trained), so the parameter gradient is exactly that of
//! backpropagating through the last `K = steps - b` steps: the same computation as DRaFT-K with a
//! K drawn per update (`draft_k::backprop_reward`, step-level recomputation standing in for
//! `torch.utils.checkpoint`). The positions are fractions of the chain here, so that the
//! reference's 50-step defaults carry to any chain length: gaussian mean 42/50 = 0.84, std
//! 5/50 = 0.1 (the last 9 of 50 steps differentiated on average); uniform [0, 1); fixed 49/50 = 0.98
//! ("AlignProp K = 1"). `loss_coeff` 0.01, the aesthetic target 10 and lr 1e-3 are the reference's
//! `aesthetic.sh`; the testbed's reward is a Bradley–Terry score, so its preset optimises
//! `negative_reward`.

use crate::batch::{Batch, Collect};
use crate::config::AlignConfig;
use crate::methods::MethodSpec;
use crate::methods::draft_k::{backprop_reward, check_last_steps};
use crate::{Algorithm, Context, MicroStep, PolicyModel};
use burn::tensor::Device;
use serde::{Deserialize, Serialize};
use tiller_core::{Error, Result, SeededRng};
use tiller_diffusion::schedulers::Scheduler;

/// How the first differentiated step is drawn (`backprop_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    Gaussian,
    Uniform,
    Fixed,
}

/// What is minimised of the final sample's reward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlignPropLoss {
    /// `|r - target|`.
    L1ToTarget,
    /// `-r`.
    NegativeReward,
}

/// `[method.alignprop]`: AlignProp's `aesthetic.sh` defaults, positions as fractions of the chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlignPropConfig {
    pub truncation: Truncation,
    /// Gaussian truncation: the mean and standard deviation of the first differentiated step.
    pub mean: f64,
    pub std: f64,
    /// Uniform truncation: its range [min, max).
    pub min: f64,
    pub max: f64,
    /// Fixed truncation: the first differentiated step.
    pub value: f64,
    pub loss: AlignPropLoss,
    /// The reward the L1 loss pulls towards.
    pub target: f64,
    /// The loss's scale (`loss_coeff`).
    pub loss_coeff: f64,
}

impl Default for AlignPropConfig {
    fn default() -> Self {
        Self {
            truncation: Truncation::Gaussian,
            mean: 0.84,
            std: 0.1,
            min: 0.0,
            max: 1.0,
            value: 0.98,
            loss: AlignPropLoss::L1ToTarget,
            target: 10.0,
            loss_coeff: 0.01,
        }
    }
}

impl AlignPropConfig {
    /// One candidate first step of an `n`-step chain, before the check that it lies inside.
    fn candidate(&self, n: f64, rng: &mut SeededRng) -> f64 {
        match self.truncation {
            Truncation::Gaussian => {
                (n * (self.mean + self.std * f64::from(rng.normal_vec(1)[0]))).floor()
            }
            Truncation::Uniform => {
                let (lo, hi) = ((self.min * n).floor(), (self.max * n).floor());
                lo + rng.below(((hi - lo) as usize).max(1)) as f64
            }
            Truncation::Fixed => (self.value * n).floor(),
        }
    }

    /// The first differentiated step of a chain of `steps` (1 <= b < steps, redrawn until it is,
    /// as the reference does; a one-step chain differentiates its one step). Validation refuses a
    /// distribution with no mass inside the chain, so the draws that all miss are an error, not a
    /// fallback.
    pub fn draw_start(&self, steps: usize, rng: &mut SeededRng) -> Result<usize> {
        if steps <= 1 {
            return Ok(0);
        }
        let n = steps as f64;
        for _ in 0..1_000_000 {
            let b = self.candidate(n, rng);
            if b >= 1.0 && b < n {
                return Ok(b as usize);
            }
        }
        Err(Error::config(
            format!("method.alignprop.{}", self.field()),
            format!(
                "a million draws of the {:?} truncation all fell outside steps 1..{steps}",
                self.truncation
            ),
        ))
    }

    /// Why the truncation cannot start inside a chain of `steps`, if it cannot: a distribution
    /// with (almost) no mass there would redraw forever, so 10,000 draws from a fixed stream must
    /// land inside at least once.
    pub fn misses_the_chain(&self, steps: usize) -> Option<String> {
        let n = steps as f64;
        if steps <= 1 {
            return None;
        }
        let mut rng = SeededRng::new(0);
        let inside = (0..10_000)
            .filter(|_| in_chain_step(self.candidate(n, &mut rng), n))
            .count();
        (inside == 0).then(|| {
            format!(
                "the {:?} truncation puts no mass on steps 1..{} of the {steps}-step chain (none of 10000 draws)",
                self.truncation,
                steps - 1
            )
        })
    }

    /// The setting that places the truncation, for errors.
    fn field(&self) -> &'static str {
        match self.truncation {
            Truncation::Gaussian => "mean",
            Truncation::Uniform => "min",
            Truncation::Fixed => "value",
        }
    }
}

impl MethodSpec for AlignPropConfig {
    fn name(&self) -> &'static str {
        "alignprop"
    }

    fn paper(&self) -> &'static str {
        "Prabhudesai et al., Aligning Text-to-Image Diffusion Models with Reward Backpropagation, 2023"
    }

    fn validate(&self, config: &AlignConfig) -> Result<()> {
        let bad =
            |field: &str, msg: String| Err(Error::config(format!("method.alignprop.{field}"), msg));
        let steps = config.sampling.steps as f64;
        match self.truncation {
            Truncation::Gaussian if !(self.std >= 0.0 && self.std.is_finite()) => {
                return bad("std", format!("must be >= 0, got {}", self.std));
            }
            Truncation::Gaussian if self.std == 0.0 && !in_chain(self.mean, steps) => {
                return bad(
                    "mean",
                    format!("{} never falls inside the chain", self.mean),
                );
            }
            Truncation::Uniform if !(0.0..1.0).contains(&self.min) || self.max <= self.min => {
                return bad(
                    "min",
                    format!("need 0 <= min < max <= 1, got [{}, {})", self.min, self.max),
                );
            }
            Truncation::Uniform if self.max > 1.0 => {
                return bad("max", format!("must be <= 1, got {}", self.max));
            }
            Truncation::Fixed if steps > 1.0 && !in_chain(self.value, steps) => {
                return bad(
                    "value",
                    format!(
                        "must fall on steps 1..{} of the {steps}-step chain (as a fraction), got {}",
                        steps - 1.0,
                        self.value
                    ),
                );
            }
            _ => {}
        }
        if let Some(msg) = self.misses_the_chain(config.sampling.steps) {
            return bad(self.field(), msg);
        }
        if !(self.loss_coeff > 0.0 && self.loss_coeff.is_finite()) {
            return bad(
                "loss_coeff",
                format!("must be positive, got {}", self.loss_coeff),
            );
        }
        Ok(())
    }

    fn build<M: PolicyModel>(&self) -> Box<dyn Algorithm<M>> {
        Box::new(AlignProp {
            config: self.clone(),
            steps: 0,
            start: None,
        })
    }

    /// A fixed truncation must reach a step that depends on the model.
    fn check_sampler(&self, sampler: &dyn Scheduler, device: &Device) -> Result<()> {
        if self.truncation != Truncation::Fixed {
            return Ok(());
        }
        let steps = sampler.timesteps().len();
        let b = self.draw_start(steps, &mut SeededRng::new(0))?;
        check_last_steps(sampler, steps - b, device, "method.alignprop.value")
    }
}

fn in_chain(fraction: f64, steps: f64) -> bool {
    in_chain_step((fraction * steps).floor(), steps)
}

fn in_chain_step(b: f64, steps: f64) -> bool {
    b >= 1.0 && b < steps
}

pub struct AlignProp {
    pub config: AlignPropConfig,
    /// The sampler's chain length (read in `prepare`).
    steps: usize,
    /// This update's first differentiated step.
    start: Option<usize>,
}

impl<M: PolicyModel> Algorithm<M> for AlignProp {
    fn name(&self) -> &'static str {
        "alignprop"
    }

    fn collects(&self) -> Collect {
        Collect::Starts
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

    /// One truncation per update for the whole batch (every micro-batch shares it), as the
    /// reference draws one per pipeline call.
    fn begin_update(
        &mut self,
        _batch: &mut Batch,
        _epoch: usize,
        rng: &mut SeededRng,
    ) -> Result<()> {
        self.start = Some(self.config.draw_start(self.steps, rng)?);
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
            return Err(Error::invalid("alignprop needs chain starts"));
        };
        let steps = cx.policy.sampler.timesteps().len();
        let b = self
            .start
            .ok_or_else(|| Error::invalid("alignprop: no truncation drawn (begin_update)"))?;
        let (coeff, target) = (self.config.loss_coeff, self.config.target);
        let mut out = match self.config.loss {
            AlignPropLoss::L1ToTarget => {
                backprop_reward(cx, s, scale, steps - b, "alignprop", &|r, _| {
                    (r - target).abs() * coeff
                })?
            }
            AlignPropLoss::NegativeReward => {
                backprop_reward(cx, s, scale, steps - b, "alignprop", &|r, _| {
                    r.neg() * coeff
                })?
            }
        };
        out.metrics
            .push(("differentiated_steps", (steps - b) as f64));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncations_fall_inside_the_chain() {
        let mut rng = SeededRng::new(1);
        let c = AlignPropConfig::default();
        let draws: Vec<usize> = (0..2000)
            .map(|_| c.draw_start(50, &mut rng).unwrap())
            .collect();
        assert!(draws.iter().all(|&b| (1..50).contains(&b)));
        // The reference's int(N(42, 5)) on 50 steps, redrawn above 49: the last 9 differentiated
        // on average (8 from the mean, 0.5 from rounding down, 0.5 from the redrawn tail).
        let mean_k = draws.iter().map(|&b| (50 - b) as f64).sum::<f64>() / 2000.0;
        assert!((mean_k - 9.0).abs() < 0.4, "mean K {mean_k}");
        let fixed = AlignPropConfig {
            truncation: Truncation::Fixed,
            ..Default::default()
        };
        assert_eq!(fixed.draw_start(50, &mut rng).unwrap(), 49);
        assert_eq!(fixed.draw_start(20, &mut rng).unwrap(), 19);
        let uniform = AlignPropConfig {
            truncation: Truncation::Uniform,
            ..Default::default()
        };
        let u: Vec<usize> = (0..4000)
            .map(|_| uniform.draw_start(10, &mut rng).unwrap())
            .collect();
        for b in 1..10 {
            let f = u.iter().filter(|&&x| x == b).count() as f64 / 4000.0;
            assert!((f - 1.0 / 9.0).abs() < 0.03, "step {b}: {f}");
        }
    }

    #[test]
    fn a_truncation_with_no_mass_in_the_chain_is_refused_not_replaced() {
        let config = |c: AlignPropConfig| -> String {
            let mut run: AlignConfig = toml::from_str("method = \"alignprop\"").unwrap();
            run.method = crate::Method::AlignProp(c);
            run.validate()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        // N(3, 0.1) of the chain: every draw lands past the last step.
        let far = AlignPropConfig {
            mean: 3.0,
            ..Default::default()
        };
        let e = config(far.clone());
        assert!(
            e.contains("method.alignprop.mean") && e.contains("no mass"),
            "{e}"
        );
        let e = far
            .draw_start(20, &mut SeededRng::new(0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("method.alignprop.mean"), "{e}");
        // Uniform on [0, 0.04) of 20 steps is always step 0, which is never differentiated alone.
        let e = config(AlignPropConfig {
            truncation: Truncation::Uniform,
            min: 0.0,
            max: 0.04,
            ..Default::default()
        });
        assert!(
            e.contains("method.alignprop.min") && e.contains("no mass"),
            "{e}"
        );
        assert_eq!(config(AlignPropConfig::default()), "");
    }
}
