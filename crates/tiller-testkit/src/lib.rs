//! Shared test helpers for Tiller's crates: closeness assertions that name the worst element,
//! f64 finite-difference gradient checks, JSON fixture loading and tensor conversions.
//!
//! Dev-dependency only; nothing here is part of any library's API.

pub mod close;
pub mod finite_diff;
pub mod fixture;
pub mod tensors;

pub use close::{Values, assert_close, check_close};
pub use finite_diff::{assert_gradient_matches, central_difference};
pub use fixture::{fixture_files, load_json};
pub use tensors::{tensor_f32, tensor_f64, to_vec_f64};
