//! Evaluation, one code path for every caller: `tiller eval`, the validation inside alignment
//! runs, `tiller compare` and the quickstart.
//!
//! - [`sampling`]: a pipeline folder and its tokenizer; sampling prompts with one noise stream
//!   per image (an image depends on its prompt's index and its seed, never on the batch).
//! - [`suite`]: the prompt suites.
//! - [`evaluate`]: one evaluation end to end (what `tiller eval` runs).
//! - [`feedback`]: simulated annotators' feedback on a model's samples, into a store.
//! - [`report`]: GenEval-style scoring with the gold evaluator, best-of-N, the report folder.
//! - [`paired`]: two evaluations image by image; paired standard errors and the sign test.
//! - [`validation`]: what an alignment run measures at each validation (KL to base, diversity,
//!   the paired gain over its start).
//! - [`noise_scale`]: the gradient noise scale from a run's metrics.
//! - [`comparison`]: runs compared under one budget; Markdown and SVG.
//! - [`reward_eval`]: a reward model against the annotators and the truth (`tiller reward eval`).

pub mod comparison;
pub mod evaluate;
pub mod feedback;
pub mod locality;
pub mod noise_scale;
pub mod paired;
pub mod report;
pub mod reward_eval;
pub mod safety_pairs;
pub mod sampling;
pub mod suite;
pub mod validation;

pub use report::{ImageResult, Report, score};
pub use sampling::{SampleSettings, load_pipeline, sample_prompts};
