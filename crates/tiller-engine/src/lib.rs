//! The one training engine's building blocks, shared by every trainer (the testbed base model,
//! and later every alignment method): a run directory holding the resolved config, metrics and
//! checkpoints; checkpoints written atomically with a retention limit and `--resume latest`;
//! metrics as JSONL and TensorBoard event files; a progress line with ETA; EMA of parameters; and
//! learning-rate schedules.

pub mod checkpoint;
pub mod denoiser;
pub mod distill;
pub mod ema;
pub mod metrics;
pub mod optim;
pub mod progress;
pub mod run_dir;
pub mod schedule;
pub mod tensorboard;

pub use checkpoint::{CheckpointStore, Resume};
pub use ema::Ema;
pub use metrics::MetricsLog;
pub use progress::Progress;
pub use run_dir::RunDir;
pub use schedule::LrSchedule;
