//! Schedulers, one per file, all with the same contract: [`Scheduler::step`] returns the step's
//! [`Gaussian`](crate::Gaussian).
//!
//! HELPER: implement.
