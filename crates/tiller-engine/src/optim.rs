//! The optimizer every Tiller loop uses.

use burn::grad_clipping::GradientClippingConfig;
use burn::optim::{AdamWConfig, ModuleOptimizer};

/// AdamW (Loshchilov & Hutter 2019) with global gradient-norm clipping when `max_grad_norm > 0`.
pub fn adamw(
    beta1: f64,
    beta2: f64,
    epsilon: f64,
    weight_decay: f64,
    max_grad_norm: f64,
) -> ModuleOptimizer {
    let mut c = AdamWConfig::new()
        .with_beta_1(beta1 as f32)
        .with_beta_2(beta2 as f32)
        .with_epsilon(epsilon as f32)
        .with_weight_decay(weight_decay as f32);
    if max_grad_norm > 0.0 {
        c = c.with_grad_clipping(Some(GradientClippingConfig::Norm(max_grad_norm as f32)));
    }
    c.init()
}
