//! The Gaussian of one denoising step, π(x_{t-1} | x_t) = N(mean, std² I).
//!
//! Everything the RL methods need is derived here, once: drawing x_{t-1}, its log-probability and
//! the closed-form KL between two policies' steps.
//!
//! Per element, with μ the mean and σ the sample's std:
//!
//! ```text
//! log N(x; μ, σ²) = -(x - μ)² / (2σ²) - log σ - log sqrt(2π)
//! KL(N(μ_p, σ_p²) || N(μ_q, σ_q²)) = log(σ_q/σ_p) + (σ_p² + (μ_p - μ_q)²) / (2σ_q²) - 1/2
//! ```
//!
//! and both are reduced over C·H·W by [`LogProbReduction`]. ddpo-pytorch and Flow-GRPO use the
//! mean (see `shared/reference/methods.md` section 1.1).

use burn::tensor::Tensor;
use tiller_core::{Error, Result};

/// log sqrt(2π), the normalising constant of a unit Gaussian's log-density.
const LOG_SQRT_2PI: f64 = 0.918_938_533_204_672_8;

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

impl Gaussian {
    /// A Gaussian with one `std` for every sample.
    ///
    /// mean: [B, C, H, W]. The std tensor gets the mean's dtype and device.
    pub fn with_scalar_std(mean: Tensor<4>, std: f64) -> Self {
        let batch = mean.dims()[0];
        let std = Tensor::full([batch, 1, 1, 1], std, (&mean.device(), mean.dtype()));
        Self { mean, std }
    }

    /// A point mass at `mean` (std = 0): the step of DDIM with eta = 0 or of an ODE solver.
    ///
    /// mean: [B, C, H, W].
    pub fn deterministic(mean: Tensor<4>) -> Self {
        Self::with_scalar_std(mean, 0.0)
    }

    /// mean + std · noise.
    ///
    /// noise: [B, C, H, W] standard normal. Returns [B, C, H, W].
    pub fn sample(&self, noise: Tensor<4>) -> Tensor<4> {
        self.mean.clone() + self.std.clone() * noise
    }

    /// Whether every sample's std is zero, so [`Self::sample`] ignores the noise.
    ///
    /// Reads the std back to the host (a device sync).
    pub fn is_deterministic(&self) -> bool {
        self.std.clone().detach().abs().max().into_scalar::<f64>() == 0.0
    }

    /// log π(x) per sample, reduced over C·H·W as `reduction` says.
    ///
    /// x: [B, C, H, W]. Returns [B]. Gradients flow into `x` as well as the mean and std: to score
    /// a sampled x_{t-1}, detach it first, as ddpo-pytorch does (`prev_sample.detach()`).
    ///
    /// Errors if any std is not positive (a deterministic step has no density) or if the shapes
    /// do not fit.
    pub fn log_prob(&self, x: Tensor<4>, reduction: LogProbReduction) -> Result<Tensor<1>> {
        self.check_shapes("x", &x)?;
        self.check_positive_std("log_prob")?;
        let variance = self.std.clone().powi_scalar(2);
        let squared_error = (x - self.mean.clone()).powi_scalar(2);
        let log_density =
            (squared_error / (variance * 2.0)).neg() - self.std.clone().log() - LOG_SQRT_2PI;
        Ok(reduce(log_density, reduction))
    }

    /// KL(self || other) per sample, reduced over C·H·W as `reduction` says. Returns [B].
    ///
    /// Both Gaussians must have positive std and the same shapes. With equal stds this is
    /// (μ_p - μ_q)² / (2σ²), the form Flow-GRPO's KL penalty takes.
    pub fn kl(&self, other: &Gaussian, reduction: LogProbReduction) -> Result<Tensor<1>> {
        self.check_shapes("other.mean", &other.mean)?;
        other.check_shapes("mean", &self.mean)?;
        self.check_positive_std("kl (self)")?;
        other.check_positive_std("kl (other)")?;
        let (var_p, var_q) = (
            self.std.clone().powi_scalar(2),
            other.std.clone().powi_scalar(2),
        );
        let log_ratio = other.std.clone().log() - self.std.clone().log();
        let squared_gap = (self.mean.clone() - other.mean.clone()).powi_scalar(2);
        let kl = log_ratio + (squared_gap + var_p) / (var_q * 2.0) - 0.5;
        Ok(reduce(kl, reduction))
    }

    fn check_shapes(&self, what: &str, x: &Tensor<4>) -> Result<()> {
        let (mean, std) = (self.mean.dims(), self.std.dims());
        if std != [mean[0], 1, 1, 1] {
            return Err(Error::invalid(format!(
                "Gaussian std has shape {std:?}; it must be [B, 1, 1, 1] = {:?} for mean {mean:?}",
                [mean[0], 1, 1, 1]
            )));
        }
        if x.dims() != mean {
            return Err(Error::invalid(format!(
                "{what} has shape {:?} but the Gaussian's mean has shape {mean:?}",
                x.dims()
            )));
        }
        Ok(())
    }

    fn check_positive_std(&self, what: &str) -> Result<()> {
        let smallest = self.std.clone().detach().min().into_scalar::<f64>();
        if smallest > 0.0 {
            return Ok(());
        }
        Err(Error::invalid(format!(
            "{what}: the Gaussian's std is {smallest} for some sample, so the step has no \
             density; deterministic steps (DDIM with eta = 0, the Euler ODE, DDIM's last step \
             with set_alpha_to_one) cannot be scored: sample with noise (eta > 0 or the flow SDE) \
             or skip those steps"
        )))
    }
}

/// Mean or sum of `values` ([B, C, H, W]) over C, H, W. Returns [B].
fn reduce(values: Tensor<4>, reduction: LogProbReduction) -> Tensor<1> {
    let flat: Tensor<2> = values.flatten(1, 3);
    let reduced = match reduction {
        LogProbReduction::Mean => flat.mean_dim(1),
        LogProbReduction::Sum => flat.sum_dim(1),
    };
    reduced.flatten(0, 1)
}
