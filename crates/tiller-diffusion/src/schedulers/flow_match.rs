//! Rectified flow: Liu, Gong & Liu 2023, "Flow Straight and Fast" (ICLR), as used by Stable
//! Diffusion 3 (Esser et al. 2024); and the Flow-GRPO SDE of Liu et al. 2025, "Flow-GRPO:
//! Training Flow Matching Models via Online RL".
//!
//! The forward process interpolates linearly, x_σ = (1 - σ) x_0 + σ ε, and the network predicts
//! the velocity v = ε - x_0. With σ' < σ the next sigma and dt = σ' - σ < 0:
//!
//! ```text
//! ODE (Euler):  x' = x + dt · v̂                                   (std 0)
//! SDE:          σ_t = a · sqrt(σ / (1 - σ))
//!               μ   = x + [v̂ + σ_t² / (2σ) · (x + (1 - σ) v̂)] · dt
//!               x' ~ N(μ, σ_t² |dt| I)
//! ```
//!
//! The SDE has the ODE's marginals: its drift is v̂ - (σ_t²/2) ∇log p, and for this interpolation
//! ∇log p = -(x - (1 - σ) x̂_0) / σ² = -(x + (1 - σ) v̂) / σ with x̂_0 = x - σ v̂ (Flow-GRPO
//! eq. 7-9; code `flow_grpo/diffusers_patch/sd3_sde_with_logprob.py`). a is the noise level.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};
use tiller_core::{Error, Result};

use super::{Scheduler, StepOutput, check_same_shape, check_step_index, per_sample};
use crate::Gaussian;

/// Flow-matching Euler settings. Defaults are diffusers' `FlowMatchEulerDiscreteScheduler`
/// defaults (diffusers 0.42, `scheduling_flow_match_euler_discrete.py`); `sde` is ours.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlowMatchConfig {
    /// N: timesteps fed to the model are σ · N. Default 1000.
    pub num_train_timesteps: usize,
    /// The timestep shift s: σ ↦ s σ / (1 + (s - 1) σ), which spends more steps at high noise
    /// (Esser et al. 2024, section 5.3.2). Default 1.0 (Stable Diffusion 3: 3.0).
    pub shift: f64,
    /// Sample with the Flow-GRPO SDE instead of the deterministic Euler ODE. Default none (the
    /// ODE, as diffusers).
    pub sde: Option<FlowSde>,
}

impl Default for FlowMatchConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            shift: 1.0,
            sde: None,
        }
    }
}

/// The Flow-GRPO SDE's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlowSde {
    /// a in σ_t = a · sqrt(σ / (1 - σ)). Default 0.7, Flow-GRPO's default
    /// (`sde_step_with_logprob(noise_level=0.7)`, the paper's SD3.5 configs).
    pub noise_level: f64,
}

impl Default for FlowSde {
    fn default() -> Self {
        Self { noise_level: 0.7 }
    }
}

/// Flow-matching sampling over a fixed number of steps, by the ODE or the Flow-GRPO SDE.
#[derive(Debug, Clone)]
pub struct FlowMatchScheduler {
    config: FlowMatchConfig,
    /// σ_0 > σ_1 > ... > σ_{n-1} > σ_n = 0.
    sigmas: Vec<f64>,
    /// σ_i · N for i < n.
    timesteps: Vec<f64>,
}

impl FlowMatchScheduler {
    /// A sampler with `num_inference_steps` steps.
    ///
    /// The sigmas are diffusers': n values evenly spaced in σ·N from σ_max = shift(1) = 1 down to
    /// σ_min = shift(1/N), then shifted *again*, then a final 0. (diffusers shifts its
    /// training sigmas in the constructor and the inference ones in `set_timesteps`, so σ_min is
    /// shifted twice; we match it.)
    pub fn new(config: FlowMatchConfig, num_inference_steps: usize) -> Result<Self> {
        let (big_n, n) = (config.num_train_timesteps, num_inference_steps);
        if big_n == 0 {
            return Err(Error::config(
                "num_train_timesteps",
                "must be at least 1, got 0",
            ));
        }
        if n == 0 {
            return Err(Error::invalid(
                "num_inference_steps must be at least 1, got 0",
            ));
        }
        if !(config.shift > 0.0 && config.shift.is_finite()) {
            return Err(Error::config(
                "shift",
                format!("must be positive and finite, got {}", config.shift),
            ));
        }
        if let Some(sde) = &config.sde
            && !(sde.noise_level > 0.0 && sde.noise_level.is_finite())
        {
            return Err(Error::config(
                "sde.noise_level",
                format!(
                    "must be positive and finite, got {}; for a deterministic sampler leave \
                     `sde` unset",
                    sde.noise_level
                ),
            ));
        }
        let shift = |sigma: f64| config.shift * sigma / (1.0 + (config.shift - 1.0) * sigma);
        let (sigma_max, sigma_min) = (shift(1.0), shift(1.0 / big_n as f64));
        let scale = big_n as f64;
        let mut sigmas: Vec<f64> =
            super::schedule::linspace(sigma_max * scale, sigma_min * scale, n)
                .into_iter()
                .map(|t| shift(t / scale))
                .collect();
        let timesteps = sigmas.iter().map(|s| s * scale).collect();
        sigmas.push(0.0);
        Ok(Self {
            config,
            sigmas,
            timesteps,
        })
    }

    /// The settings this scheduler was built from.
    pub fn config(&self) -> &FlowMatchConfig {
        &self.config
    }

    /// σ_0 .. σ_n, the last being 0.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// The SDE's σ_t at step `i`, before the sqrt(|dt|) factor: a · sqrt(σ / (1 - σ)).
    ///
    /// At σ = 1 the ratio is infinite; Flow-GRPO then uses σ_1 in the denominator instead, and so
    /// do we.
    pub fn sde_sigma(&self, noise_level: f64, i: usize) -> f64 {
        let sigma = self.sigmas[i];
        let denominator_sigma = if sigma == 1.0 { self.sigmas[1] } else { sigma };
        noise_level * (sigma / (1.0 - denominator_sigma)).sqrt()
    }

    /// σ for a timestep given as σ · N, checked to lie in [0, 1].
    fn sigma_of(&self, t: f64) -> Result<f64> {
        let sigma = t / self.config.num_train_timesteps as f64;
        if (0.0..=1.0).contains(&sigma) {
            return Ok(sigma);
        }
        Err(Error::invalid(format!(
            "timestep {t} is outside 0..={} (flow timesteps are sigma * num_train_timesteps)",
            self.config.num_train_timesteps
        )))
    }

    fn per_sample_sigmas(&self, timesteps: &[f64], like: &Tensor<4>) -> Result<Vec<f64>> {
        let batch = like.dims()[0];
        if timesteps.len() != batch {
            return Err(Error::invalid(format!(
                "{} timesteps given for a batch of {batch}: pass one per sample",
                timesteps.len()
            )));
        }
        timesteps.iter().map(|&t| self.sigma_of(t)).collect()
    }
}

impl Scheduler for FlowMatchScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&self, model_output: Tensor<4>, i: usize, sample: Tensor<4>) -> Result<StepOutput> {
        check_step_index(i, self.timesteps.len())?;
        check_same_shape("model_output", &model_output, "sample", &sample)?;
        let (sigma, sigma_next) = (self.sigmas[i], self.sigmas[i + 1]);
        let dt = sigma_next - sigma;
        let original = sample.clone() - model_output.clone() * sigma;

        let distribution = match &self.config.sde {
            None => Gaussian::deterministic(sample + model_output * dt),
            Some(sde) => {
                let sde_sigma = self.sde_sigma(sde.noise_level, i);
                let drift_gain = sde_sigma * sde_sigma / (2.0 * sigma);
                // x (1 + σ_t²/(2σ) dt) + v̂ (1 + σ_t² (1-σ)/(2σ)) dt: the same terms as the module
                // docs, grouped as Flow-GRPO's code groups them.
                let mean = sample * (1.0 + drift_gain * dt)
                    + model_output * ((1.0 + drift_gain * (1.0 - sigma)) * dt);
                Gaussian::with_scalar_std(mean, sde_sigma * (-dt).sqrt())
            }
        };
        Ok(StepOutput {
            distribution,
            pred_original_sample: original,
        })
    }

    /// x_σ = σ ε + (1 - σ) x_0 with σ = t / N per sample. Any σ in [0, 1] is allowed, not only
    /// those of the inference schedule.
    fn add_noise(
        &self,
        original: Tensor<4>,
        noise: Tensor<4>,
        timesteps: &[f64],
    ) -> Result<Tensor<4>> {
        check_same_shape("original", &original, "noise", &noise)?;
        let sigmas = self.per_sample_sigmas(timesteps, &original)?;
        let keep = sigmas.iter().map(|s| 1.0 - s).collect();
        let (sigma, keep) = (per_sample(sigmas, &original), per_sample(keep, &original));
        Ok(noise * sigma + original * keep)
    }

    /// The velocity ε - x_0 (diffusers' SD3 training scripts: `target = noise - model_input`).
    fn training_target(
        &self,
        original: Tensor<4>,
        noise: Tensor<4>,
        timesteps: &[f64],
    ) -> Result<Tensor<4>> {
        check_same_shape("original", &original, "noise", &noise)?;
        self.per_sample_sigmas(timesteps, &original)?;
        Ok(noise - original)
    }

    fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }
}
