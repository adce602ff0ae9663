//! The Gaussian of one denoising step, pi(x_{t-1} | x_t) = N(mean, std^2 I).
//!
//! Everything the RL methods need is derived here, once: drawing x_{t-1}, its log-probability and
//! the closed-form KL between two policies' steps.
//!
//! HELPER: implement. Contract below is fixed; add methods if needed.

use burn::tensor::Tensor;

/// How a per-element log-density is reduced over the non-batch dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogProbReduction {
    /// Mean over C*H*W, the ddpo-pytorch convention that DDPO, DPOK, Flow-GRPO and others use
    /// (why DDPO's PPO clip range is 1e-4).
    Mean,
    /// Sum over C*H*W: the true log-density of the step.
    Sum,
}

/// An isotropic Gaussian per sample.
#[derive(Debug, Clone)]
pub struct Gaussian {
    /// mean: [B, C, H, W]
    pub mean: Tensor<4>,
    /// std: [B, 1, 1, 1], broadcast over C, H, W. All zeros for a deterministic step.
    pub std: Tensor<4>,
}
