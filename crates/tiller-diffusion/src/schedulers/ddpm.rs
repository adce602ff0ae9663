//! Ancestral sampling: Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models"
//! (eq. 6-7), generalised to skip timesteps as diffusers does.
//!
//! With t' the next inference timestep (or "before 0" at the last step, where ᾱ_t' = 1),
//! α_t = ᾱ_t / ᾱ_t' and β_t = 1 - α_t the effective one-jump values:
//!
//! ```text
//! μ   = sqrt(ᾱ_t') β_t / (1 - ᾱ_t) · x̂_0 + sqrt(α_t) (1 - ᾱ_t') / (1 - ᾱ_t) · x_t
//! σ²  = (1 - ᾱ_t') / (1 - ᾱ_t) · β_t     (fixed_small: the true posterior variance β̃_t)
//!     = β_t                               (fixed_large)
//! ```
//!
//! Ho et al. found both variances give similar samples; β̃ is the default.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};
use tiller_core::{Error, Result};

use super::schedule::{
    BetaSchedule, NoiseSchedule, PredictionType, TimestepSpacing, discrete_timesteps,
    original_and_noise,
};
use super::{Scheduler, StepOutput, check_same_shape, check_step_index};
use crate::Gaussian;

/// diffusers floors β̃ at this value before the square root (`torch.clamp(variance, min=1e-20)`),
/// so a stochastic last step whose β̃ is 0 gets std 1e-10 rather than 0.
const MIN_POSTERIOR_VARIANCE: f64 = 1e-20;

/// The variance of the reverse step. diffusers' `fixed_small_log`, `fixed_large_log`, `learned`
/// and `learned_range` are not implemented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VarianceType {
    /// σ² = β̃_t = (1 - ᾱ_t') / (1 - ᾱ_t) · β_t, the posterior q(x_t' | x_t, x_0)'s variance.
    #[serde(rename = "fixed_small")]
    FixedSmall,
    /// σ² = β_t, the forward step's variance (an upper bound on the reverse one).
    #[serde(rename = "fixed_large")]
    FixedLarge,
}

/// DDPM settings. Defaults are diffusers' `DDPMScheduler` defaults (diffusers 0.42,
/// `scheduling_ddpm.py`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DdpmConfig {
    /// N, the number of training timesteps. Default 1000.
    pub num_train_timesteps: usize,
    /// β_0 of the linear and scaled-linear schedules. Default 0.0001.
    pub beta_start: f64,
    /// β_{N-1} of the linear and scaled-linear schedules. Default 0.02.
    pub beta_end: f64,
    /// How β grows. Default `linear`.
    pub beta_schedule: BetaSchedule,
    /// What the network predicts. Default `epsilon`.
    pub prediction_type: PredictionType,
    /// How the inference timesteps are chosen. Default `leading`.
    pub timestep_spacing: TimestepSpacing,
    /// Added to every `leading` timestep. Default 0.
    pub steps_offset: usize,
    /// Clamp x̂_0 to [-clip_sample_range, clip_sample_range]. Default true.
    pub clip_sample: bool,
    /// The clamp bound when `clip_sample` is on. Default 1.0.
    pub clip_sample_range: f64,
    /// The reverse step's variance. Default `fixed_small`.
    pub variance_type: VarianceType,
    /// Rescale β to zero terminal SNR (Lin et al. 2024). Default false.
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdpmConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 0,
            clip_sample: true,
            clip_sample_range: 1.0,
            variance_type: VarianceType::FixedSmall,
            rescale_betas_zero_snr: false,
        }
    }
}

/// DDPM ancestral sampling over a fixed number of inference steps.
#[derive(Debug, Clone)]
pub struct DdpmScheduler {
    config: DdpmConfig,
    schedule: NoiseSchedule,
    /// Training-timestep indices, descending.
    train_steps: Vec<usize>,
    /// The same as f64, for [`Scheduler::timesteps`].
    timesteps: Vec<f64>,
}

impl DdpmScheduler {
    /// A DDPM sampler with `num_inference_steps` steps (N of them is the textbook sampler).
    pub fn new(config: DdpmConfig, num_inference_steps: usize) -> Result<Self> {
        if config.clip_sample
            && !(config.clip_sample_range > 0.0 && config.clip_sample_range.is_finite())
        {
            return Err(Error::config(
                "clip_sample_range",
                format!("must be positive, got {}", config.clip_sample_range),
            ));
        }
        let schedule = NoiseSchedule::new(
            config.beta_schedule,
            config.beta_start,
            config.beta_end,
            config.num_train_timesteps,
            config.rescale_betas_zero_snr,
        )?;
        let train_steps = discrete_timesteps(
            config.timestep_spacing,
            config.num_train_timesteps,
            num_inference_steps,
            config.steps_offset,
        )?;
        Ok(Self {
            timesteps: train_steps.iter().map(|&t| t as f64).collect(),
            train_steps,
            schedule,
            config,
        })
    }

    /// The settings this scheduler was built from.
    pub fn config(&self) -> &DdpmConfig {
        &self.config
    }

    /// ᾱ at the next inference timestep, or 1 after the last one.
    fn previous_alpha_bar(&self, i: usize) -> f64 {
        self.train_steps
            .get(i + 1)
            .map_or(1.0, |&t| self.schedule.alpha_bar(t))
    }

    /// σ of step `i`. Zero exactly when the timestep *value* is 0, as in diffusers (`if t > 0`):
    /// with `trailing` or `linspace` spacing, or a `steps_offset`, the last timestep is above 0
    /// and the last step adds noise (std 1e-10 for `fixed_small`, where β̃ = 0, but
    /// sqrt(1 - ᾱ_t) for `fixed_large`).
    pub fn step_std(&self, i: usize) -> f64 {
        let t = self.train_steps[i];
        if t == 0 {
            return 0.0;
        }
        let alpha_bar = self.schedule.alpha_bar(t);
        let alpha_bar_prev = self.previous_alpha_bar(i);
        let beta = 1.0 - alpha_bar / alpha_bar_prev;
        let variance = match self.config.variance_type {
            VarianceType::FixedSmall => {
                ((1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * beta).max(MIN_POSTERIOR_VARIANCE)
            }
            VarianceType::FixedLarge => beta,
        };
        variance.sqrt()
    }
}

impl Scheduler for DdpmScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&self, model_output: Tensor<4>, i: usize, sample: Tensor<4>) -> Result<StepOutput> {
        check_step_index(i, self.train_steps.len())?;
        check_same_shape("model_output", &model_output, "sample", &sample)?;
        let alpha_bar = self.schedule.alpha_bar(self.train_steps[i]);
        let alpha_bar_prev = self.previous_alpha_bar(i);
        let alpha = alpha_bar / alpha_bar_prev;
        let beta = 1.0 - alpha;

        let (mut original, _) = original_and_noise(
            self.config.prediction_type,
            model_output,
            sample.clone(),
            alpha_bar,
        );
        if self.config.clip_sample {
            let range = self.config.clip_sample_range;
            original = original.clamp(-range, range);
        }

        // The mean of the posterior q(x_t' | x_t, x_0 = x̂_0), Ho et al. eq. 7.
        let original_coeff = alpha_bar_prev.sqrt() * beta / (1.0 - alpha_bar);
        let sample_coeff = alpha.sqrt() * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar);
        let mean = original.clone() * original_coeff + sample * sample_coeff;
        Ok(StepOutput {
            distribution: Gaussian::with_scalar_std(mean, self.step_std(i)),
            pred_original_sample: original,
        })
    }

    fn add_noise(
        &self,
        original: Tensor<4>,
        noise: Tensor<4>,
        timesteps: &[f64],
    ) -> Result<Tensor<4>> {
        self.schedule.add_noise(original, noise, timesteps)
    }

    fn training_target(
        &self,
        original: Tensor<4>,
        noise: Tensor<4>,
        timesteps: &[f64],
    ) -> Result<Tensor<4>> {
        self.schedule
            .training_target(self.config.prediction_type, original, noise, timesteps)
    }

    fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }
}
