//! The diffusion core: schedulers whose step returns the step's Gaussian (so sampling, per-step
//! log-probabilities and KL all read one object), diffusers-compatible `UNet2DConditionModel`,
//! `AutoencoderKL` and `CLIPTextModel`, CLIP's BPE tokenizer, and sampling that records
//! trajectories or differentiates through the chain.

pub mod clip_tokenizer;
pub mod distribution;
pub mod models;
pub mod pipeline;
pub mod sampling;
pub mod schedulers;
pub mod stable_diffusion;
pub mod stable_diffusion3;

pub use distribution::{Gaussian, LogProbReduction};
pub use schedulers::{Scheduler, SchedulerConfig, StepOutput};
