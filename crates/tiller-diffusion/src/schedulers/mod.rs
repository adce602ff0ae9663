//! Schedulers, one per file, all with the same contract: [`Scheduler::step`] returns the step's
//! [`Gaussian`], so sampling, per-step log-probabilities and KL all read one object.
//!
//! | file | scheduler | paper |
//! |---|---|---|
//! | `ddpm.rs` | ancestral sampling | Ho et al. 2020 |
//! | `ddim.rs` | DDIM with η (η = 1 is DDPO's policy) | Song et al. 2021 |
//! | `flow_match.rs` | Euler ODE, or the Flow-GRPO SDE | Liu et al. 2023 (rectified flow), Liu et al. 2025 |
//! | `schedule.rs` | β schedules, timestep spacing, the forward process | shared |
//!
//! Every scheduler matches diffusers (goldens in `tests/fixtures/schedulers/`, made by
//! `scripts/fixtures/schedulers.py`); where diffusers does something odd we follow it and say so in
//! the doc comment.

pub mod ddim;
pub mod ddpm;
mod diffusers_config;
pub mod flow_match;
pub mod schedule;

use std::path::Path;

use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};
use tiller_core::{Error, Result};

use crate::Gaussian;

pub use ddim::{DdimConfig, DdimScheduler};
pub use ddpm::{DdpmConfig, DdpmScheduler, VarianceType};
pub use flow_match::{FlowMatchConfig, FlowMatchScheduler, FlowSde};
pub use schedule::{BetaSchedule, NoiseSchedule, PredictionType, TimestepSpacing};

/// One reverse-process step, π(x_{t-1} | x_t), of a sampler with a fixed number of steps.
pub trait Scheduler: Send + Sync {
    /// Inference timesteps in sampling order, as fed to the model (DDPM/DDIM: integers as f64;
    /// flow: sigma*num_train_timesteps).
    fn timesteps(&self) -> &[f64];

    /// Multiplier for the initial noise (1.0 for all schedulers here).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// The step from inference index `i` (0-based into timesteps()): returns the Gaussian of
    /// x_prev given x_t.
    ///
    /// model_output and sample: [B, C, H, W]. Deterministic steps (DDIM eta=0, Euler ODE) return
    /// std = 0.
    fn step(&self, model_output: Tensor<4>, i: usize, sample: Tensor<4>) -> Result<StepOutput>;

    /// Forward process for training: x_t from x_0 and noise at per-sample training timesteps [B].
    ///
    /// original, noise: [B, C, H, W]. Returns [B, C, H, W].
    fn add_noise(
        &self,
        original: Tensor<4>,
        noise: Tensor<4>,
        timesteps: &[f64],
    ) -> Result<Tensor<4>>;

    /// Regression target of the model at those timesteps for the configured prediction type
    /// (epsilon: noise; v_prediction: sqrt(abar) noise - sqrt(1-abar) x0; sample: x0; flow:
    /// noise - x0).
    ///
    /// original, noise: [B, C, H, W]; timesteps: [B]. Returns [B, C, H, W].
    fn training_target(
        &self,
        original: Tensor<4>,
        noise: Tensor<4>,
        timesteps: &[f64],
    ) -> Result<Tensor<4>>;

    /// N, the number of training timesteps.
    fn num_train_timesteps(&self) -> usize;
}

/// What [`Scheduler::step`] returns.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// π(x_{t-1} | x_t): mean [B, C, H, W] and std [B, 1, 1, 1].
    pub distribution: Gaussian,
    /// The model's estimate of x_0 at this step (after clipping, if configured): [B, C, H, W].
    pub pred_original_sample: Tensor<4>,
}

impl StepOutput {
    /// x_{t-1} = mean + std · noise. noise: [B, C, H, W] standard normal.
    pub fn sample(&self, noise: Tensor<4>) -> Tensor<4> {
        self.distribution.sample(noise)
    }
}

/// Which scheduler, with its settings. Field names are diffusers' `scheduler_config.json` keys.
///
/// In TOML: `type = "ddim"` followed by the fields to override, e.g. `eta = 1.0`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SchedulerConfig {
    /// Ancestral sampling, Ho et al. 2020 (diffusers `DDPMScheduler`).
    Ddpm(DdpmConfig),
    /// DDIM with η, Song et al. 2021 (diffusers `DDIMScheduler`).
    Ddim(DdimConfig),
    /// Rectified-flow Euler sampling, optionally as the Flow-GRPO SDE (diffusers
    /// `FlowMatchEulerDiscreteScheduler`).
    FlowMatch(FlowMatchConfig),
}

/// The scheduler families, for reading a diffusers config as a given one
/// ([`SchedulerConfig::from_diffusers_json_as`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    /// [`DdpmScheduler`].
    Ddpm,
    /// [`DdimScheduler`].
    Ddim,
    /// [`FlowMatchScheduler`].
    FlowMatch,
}

impl SchedulerConfig {
    /// The scheduler for `num_inference_steps` sampling steps.
    pub fn build(&self, num_inference_steps: usize) -> Result<Box<dyn Scheduler>> {
        Ok(match self {
            Self::Ddpm(c) => Box::new(DdpmScheduler::new(c.clone(), num_inference_steps)?),
            Self::Ddim(c) => Box::new(DdimScheduler::new(c.clone(), num_inference_steps)?),
            Self::FlowMatch(c) => {
                Box::new(FlowMatchScheduler::new(c.clone(), num_inference_steps)?)
            }
        })
    }

    /// Which family this is.
    pub fn kind(&self) -> SchedulerKind {
        match self {
            Self::Ddpm(_) => SchedulerKind::Ddpm,
            Self::Ddim(_) => SchedulerKind::Ddim,
            Self::FlowMatch(_) => SchedulerKind::FlowMatch,
        }
    }

    /// This config as diffusers' `scheduler_config.json` (what `save_pretrained` writes), so the
    /// Python ecosystem can load it; `from_diffusers_json` reads it back.
    pub fn to_diffusers_json(&self) -> serde_json::Value {
        diffusers_config::to_json(self)
    }

    /// Reads diffusers' `scheduler_config.json`. `_class_name` picks the scheduler
    /// (`DDPMScheduler`, `DDIMScheduler`, `FlowMatchEulerDiscreteScheduler`); keys starting with
    /// `_` are ignored; a key we do not implement, or a value of a known key that would change
    /// the math in a way we do not implement (`thresholding: true`, `use_dynamic_shifting: true`,
    /// ...), is an error naming the key. Missing keys take diffusers' defaults, which are ours.
    pub fn from_diffusers_json(path: impl AsRef<Path>) -> Result<Self> {
        diffusers_config::load(path.as_ref(), None)
    }

    /// Like [`Self::from_diffusers_json`] but reads the file as the scheduler `kind` whatever its
    /// `_class_name`, as diffusers' `DDIMScheduler.from_config(other_config)` does: how DDPO reads
    /// Stable Diffusion 1.x's `PNDMScheduler` config as DDIM. Keys that only the other diffusers
    /// schedulers of this family have (`skip_prk_steps`, `set_alpha_to_one`, `variance_type`)
    /// are dropped; any other unknown key is still an error.
    pub fn from_diffusers_json_as(path: impl AsRef<Path>, kind: SchedulerKind) -> Result<Self> {
        diffusers_config::load(path.as_ref(), Some(kind))
    }
}

/// Errors unless `a` and `b` have the same shape.
pub(crate) fn check_same_shape(
    a_name: &str,
    a: &Tensor<4>,
    b_name: &str,
    b: &Tensor<4>,
) -> Result<()> {
    if a.dims() == b.dims() {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "{a_name} has shape {:?} but {b_name} has shape {:?}; they must match",
        a.dims(),
        b.dims()
    )))
}

/// Errors unless `i` indexes one of `n` inference steps.
pub(crate) fn check_step_index(i: usize, n: usize) -> Result<()> {
    if i < n {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "step index {i} is out of range: this scheduler has {n} inference steps (0..{n})"
    )))
}

/// A [B, 1, 1, 1] tensor of per-sample `values` with `like`'s dtype and device, to broadcast over
/// C, H, W.
pub fn per_sample(values: Vec<f64>, like: &Tensor<4>) -> Tensor<4> {
    let batch = values.len();
    Tensor::from_data(
        TensorData::new(values, [batch, 1, 1, 1]),
        (&like.device(), like.dtype()),
    )
}
