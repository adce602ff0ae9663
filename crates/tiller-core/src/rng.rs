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

/// The exact position of a [`SeededRng`], for checkpoints: restoring it continues the same stream.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RngState {
    /// The 256-bit ChaCha key, hex.
    pub key: String,
    /// The position in the stream, in 32-bit words (decimal; it can exceed 2^64).
    pub word_pos: String,
    /// The ChaCha stream number ([`SeededRng::for_example`]); 0 for a plain seed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub stream: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl SeededRng {
    /// A stream determined by `seed` alone.
    pub fn new(seed: u64) -> Self {
        Self {
            inner: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// The stream of example `index` under `seed` (ChaCha stream `index + 1` of the key
    /// [`Self::new`] derives from `seed`; stream 0 is `new(seed)` itself), so every example's
    /// noise depends on (seed, its index) alone, never on which batch it was drawn in. Streams of
    /// different indices are independent of each other and of `new(seed)`.
    pub fn for_example(seed: u64, index: u64) -> Self {
        let mut inner = ChaCha8Rng::seed_from_u64(seed);
        inner.set_stream(index.wrapping_add(1));
        Self { inner }
    }

    /// The stream's position, to save in a checkpoint.
    pub fn state(&self) -> RngState {
        RngState {
            key: self
                .inner
                .get_seed()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            word_pos: self.inner.get_word_pos().to_string(),
            stream: self.inner.get_stream(),
        }
    }

    /// Continues a stream saved with [`Self::state`].
    pub fn from_state(state: &RngState) -> crate::Result<Self> {
        let bad = || crate::Error::invalid(format!("invalid random-stream state {state:?}"));
        if state.key.len() != 64 {
            return Err(bad());
        }
        let mut key = [0u8; 32];
        for (i, b) in key.iter_mut().enumerate() {
            *b = u8::from_str_radix(&state.key[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        let pos: u128 = state.word_pos.parse().map_err(|_| bad())?;
        let mut inner = ChaCha8Rng::from_seed(key);
        inner.set_stream(state.stream);
        inner.set_word_pos(pos);
        Ok(Self { inner })
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

    /// Shuffles `items` in place (Fisher–Yates from the end: position `i` swaps with
    /// `below(i + 1)`).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_streams_depend_on_seed_and_index_only() {
        let a = SeededRng::for_example(3, 5).normal_vec(8);
        assert_eq!(a, SeededRng::for_example(3, 5).normal_vec(8));
        assert_ne!(a, SeededRng::for_example(3, 6).normal_vec(8));
        assert_ne!(a, SeededRng::for_example(4, 5).normal_vec(8));
        // A checkpointed example stream continues where it was.
        let mut r = SeededRng::for_example(3, 5);
        r.normal_vec(3);
        let mut resumed = SeededRng::from_state(&r.state()).unwrap();
        assert_eq!(resumed.normal_vec(5), r.normal_vec(5));
        // The run's own stream is none of the examples'.
        assert_ne!(
            SeededRng::for_example(3, 0).normal_vec(8),
            SeededRng::new(3).normal_vec(8)
        );
    }

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

    #[test]
    fn saved_state_continues_the_stream() {
        let mut a = SeededRng::new(9);
        a.normal_vec(7);
        let _ = a.uniform();
        let mut b = SeededRng::from_state(&a.state()).unwrap();
        assert_eq!(a.normal_vec(5), b.normal_vec(5));
        assert_eq!(a.below(1000), b.below(1000));
        let mut bad = a.state();
        bad.key.pop();
        assert!(SeededRng::from_state(&bad).is_err());
    }
}
