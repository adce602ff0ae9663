//! Tiller's vocabulary: the one error type every library crate returns, randomness that flows from
//! one seed, device selection, and typed config parsing that rejects unknown keys.
//!
//! This crate changes rarely; everything else depends on it.

pub mod config;
pub mod device;
pub mod error;
pub mod fs;
pub mod rng;

pub use error::{Error, Result};
pub use rng::SeededRng;
