//! Randomness that flows from one seed.
//!
//! All noise Tiller draws (initial latents, per-step noise, training timesteps) comes from a
//! [`SeededRng`] on the host and is then uploaded to the device. Backend RNGs are never used: they
//! differ between backends and, on some, between thread counts, while a host ChaCha stream gives
//! the same numbers for the same seed everywhere.

use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// A seeded, portable random stream (ChaCha8).
#[derive(Debug, Clone)]
pub struct SeededRng {
    inner: ChaCha8Rng,
}

impl SeededRng {
    /// A stream determined by `seed` alone.
    pub fn new(seed: u64) -> Self {
        Self {
            inner: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// An independent child stream, e.g. one per worker or per purpose, derived deterministically.
    pub fn fork(&mut self) -> Self {
        Self::new(self.inner.random())
    }

    /// `n` draws from the standard normal distribution.
    pub fn normal_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| self.inner.sample::<f32, _>(StandardNormal))
            .collect()
    }

    /// A standard-normal tensor of the given shape on `device`.
    pub fn normal<const D: usize>(&mut self, shape: [usize; D], device: &Device) -> Tensor<D> {
        let n = shape.iter().product();
        Tensor::from_data(TensorData::new(self.normal_vec(n), shape), device)
    }

    /// A uniform draw in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        self.inner.random()
    }

    /// A uniform integer in `[0, n)`.
    pub fn below(&mut self, n: usize) -> usize {
        self.inner.random_range(0..n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_forks_differ() {
        let a = SeededRng::new(7).normal_vec(16);
        let b = SeededRng::new(7).normal_vec(16);
        assert_eq!(a, b);
        let mut r = SeededRng::new(7);
        let c = r.fork().normal_vec(16);
        assert_ne!(a, c);
        // Moments of 20k draws: mean within 4 sigma/sqrt(n) of 0, variance near 1.
        let v = SeededRng::new(1).normal_vec(20_000);
        let mean = v.iter().map(|x| *x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (*x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 4.0 / (v.len() as f64).sqrt(), "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
    }
}
