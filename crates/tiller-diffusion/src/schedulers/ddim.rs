//! DDIM with η: Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models" (eq. 12 and 16).
//!
//! With t' the previous timestep, x̂_0 and ε̂ the model's estimates:
//!
//! ```text
//! σ_t = η · sqrt((1 - ᾱ_t') / (1 - ᾱ_t)) · sqrt(1 - ᾱ_t / ᾱ_t')
//! μ   = sqrt(ᾱ_t') x̂_0 + sqrt(1 - ᾱ_t' - σ_t²) ε̂
//! x_t' ~ N(μ, σ_t² I)
//! ```
//!
//! η = 0 is the deterministic DDIM sampler; η = 1 gives DDPM's posterior variance and is the
//! policy DDPO, DPOK and their descendants optimise (ddpo-pytorch `ddim_with_logprob.py`).

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};
use tiller_core::{Error, Result};

use super::schedule::{
    BetaSchedule, NoiseSchedule, PredictionType, TimestepSpacing, discrete_timesteps,
    original_and_noise,
};
use super::{Scheduler, StepOutput, check_same_shape, check_step_index};
use crate::Gaussian;

/// DDIM settings. Defaults are diffusers' `DDIMScheduler` defaults (diffusers 0.42,
/// `scheduling_ddim.py`), except `eta`, which diffusers takes as an argument of `step()`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DdimConfig {
    /// N, the number of training timesteps. Default 1000.
    pub num_train_timesteps: usize,
    /// β_0 of the linear and scaled-linear schedules. Default 0.0001 (Stable Diffusion: 0.00085).
    pub beta_start: f64,
    /// β_{N-1} of the linear and scaled-linear schedules. Default 0.02 (Stable Diffusion: 0.012).
    pub beta_end: f64,
    /// How β grows. Default `linear` (Stable Diffusion: `scaled_linear`).
    pub beta_schedule: BetaSchedule,
    /// What the network predicts. Default `epsilon`.
    pub prediction_type: PredictionType,
    /// How the inference timesteps are chosen. Default `leading`.
    pub timestep_spacing: TimestepSpacing,
    /// Added to every `leading` timestep. Default 0 (Stable Diffusion: 1).
    pub steps_offset: usize,
    /// Clamp x̂_0 to [-clip_sample_range, clip_sample_range]. Default true (Stable Diffusion:
    /// false; keep it false for latent diffusion).
    pub clip_sample: bool,
    /// The clamp bound when `clip_sample` is on. Default 1.0.
    pub clip_sample_range: f64,
    /// At the last step, whose previous timestep is below 0, use ᾱ = 1 (true) or ᾱ_0 (false).
    /// With true the last step is deterministic whatever η. Default true (Stable Diffusion:
    /// false).
    pub set_alpha_to_one: bool,
    /// Rescale β to zero terminal SNR (Lin et al. 2024); pair it with `v_prediction` and
    /// `trailing`. Default false.
    pub rescale_betas_zero_snr: bool,
    /// η in [0, 1]: 0 is deterministic DDIM, 1 is DDPM-like and what DDPO trains with. Default
    /// 0.0, diffusers' default for `DDIMScheduler.step(eta=...)`.
    pub eta: f64,
}

impl Default for DdimConfig {
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
            set_alpha_to_one: true,
            rescale_betas_zero_snr: false,
            eta: 0.0,
        }
    }
}

/// DDIM over a fixed number of inference steps.
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    config: DdimConfig,
    schedule: NoiseSchedule,
    /// Training-timestep indices, descending.
    train_steps: Vec<usize>,
    /// The same as f64, for [`Scheduler::timesteps`].
    timesteps: Vec<f64>,
    /// N div n: how far back the "previous" timestep is (see [`DdimScheduler::previous_timestep`]).
    step_ratio: usize,
}

impl DdimScheduler {
    /// A DDIM sampler with `num_inference_steps` steps.
    pub fn new(config: DdimConfig, num_inference_steps: usize) -> Result<Self> {
        if !(0.0..=1.0).contains(&config.eta) {
            return Err(Error::config(
                "eta",
                format!(
                    "must be in [0, 1], got {}; above 1 the mean's noise coefficient \
                     sqrt(1 - ᾱ' - σ²) can be the root of a negative number",
                    config.eta
                ),
            ));
        }
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
            step_ratio: config.num_train_timesteps / num_inference_steps,
            timesteps: train_steps.iter().map(|&t| t as f64).collect(),
            train_steps,
            schedule,
            config,
        })
    }

    /// The settings this scheduler was built from.
    pub fn config(&self) -> &DdimConfig {
        &self.config
    }

    /// t - N div n, which may be negative at the last step.
    ///
    /// Like diffusers and ddpo-pytorch, this is *not* the next entry of [`Scheduler::timesteps`]
    /// for `trailing` and `linspace` spacing, whose gaps differ from N div n.
    pub fn previous_timestep(&self, i: usize) -> i64 {
        self.train_steps[i] as i64 - self.step_ratio as i64
    }

    /// (ᾱ_t, ᾱ_{t'}) of step `i`: at its timestep and at its previous one (see
    /// [`Self::previous_timestep`]; below 0, 1 or ᾱ_0 as `set_alpha_to_one` says).
    pub fn step_alpha_bars(&self, i: usize) -> Result<(f64, f64)> {
        check_step_index(i, self.train_steps.len())?;
        Ok((
            self.schedule.alpha_bar(self.train_steps[i]),
            self.previous_alpha_bar(i),
        ))
    }

    /// ᾱ at the previous timestep: ᾱ_{t'} for t' >= 0, else 1 or ᾱ_0 (`set_alpha_to_one`).
    fn previous_alpha_bar(&self, i: usize) -> f64 {
        match usize::try_from(self.previous_timestep(i)) {
            Ok(t) => self.schedule.alpha_bar(t),
            Err(_) if self.config.set_alpha_to_one => 1.0,
            Err(_) => self.schedule.alpha_bar(0),
        }
    }

    /// σ_t of step `i` (before multiplying by η):
    /// sqrt((1 - ᾱ_t') / (1 - ᾱ_t) · (1 - ᾱ_t / ᾱ_t')), DDPM's posterior std.
    fn posterior_std(&self, i: usize) -> f64 {
        let alpha_bar = self.schedule.alpha_bar(self.train_steps[i]);
        let alpha_bar_prev = self.previous_alpha_bar(i);
        ((1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * (1.0 - alpha_bar / alpha_bar_prev)).sqrt()
    }
}

impl Scheduler for DdimScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&self, model_output: Tensor<4>, i: usize, sample: Tensor<4>) -> Result<StepOutput> {
        check_step_index(i, self.train_steps.len())?;
        check_same_shape("model_output", &model_output, "sample", &sample)?;
        let alpha_bar = self.schedule.alpha_bar(self.train_steps[i]);
        let alpha_bar_prev = self.previous_alpha_bar(i);

        // ε̂ comes from the unclipped x̂_0, as in diffusers (use_clipped_model_output = false).
        let (mut original, noise) =
            original_and_noise(self.config.prediction_type, model_output, sample, alpha_bar);
        if self.config.clip_sample {
            let range = self.config.clip_sample_range;
            original = original.clamp(-range, range);
        }

        let std = self.config.eta * self.posterior_std(i);
        let direction = (1.0 - alpha_bar_prev - std * std).sqrt();
        let mean = original.clone() * alpha_bar_prev.sqrt() + noise * direction;
        Ok(StepOutput {
            distribution: Gaussian::with_scalar_std(mean, std),
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
