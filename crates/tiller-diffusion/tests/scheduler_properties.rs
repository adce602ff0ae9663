//! Property tests against f64 oracles: the Gaussian's log-prob and KL for arbitrary shapes and
//! values, and the timestep spacings for arbitrary step counts.

use burn::tensor::Device;
use proptest::prelude::*;
use tiller_diffusion::schedulers::{TimestepSpacing, schedule};
use tiller_diffusion::{Gaussian, LogProbReduction};
use tiller_testkit::{check_close, tensor_f64};

const LOG_SQRT_2PI: f64 = 0.918_938_533_204_672_8;

/// A batch of B samples with D = C·H·W elements each: (D, means, xs, stds).
fn batch() -> impl Strategy<Value = (usize, Vec<f64>, Vec<f64>, Vec<f64>)> {
    (1usize..4, 1usize..7).prop_flat_map(|(b, d)| {
        (
            Just(d),
            prop::collection::vec(-3.0..3.0f64, b * d),
            prop::collection::vec(-3.0..3.0f64, b * d),
            prop::collection::vec(0.05..3.0f64, b),
        )
    })
}

/// Per-sample reduction of a per-element oracle.
fn oracle(
    d: usize,
    reduction: LogProbReduction,
    element: impl Fn(usize, usize) -> f64,
    b: usize,
) -> Vec<f64> {
    (0..b)
        .map(|s| {
            let total: f64 = (s * d..(s + 1) * d).map(|i| element(s, i)).sum();
            match reduction {
                LogProbReduction::Mean => total / d as f64,
                LogProbReduction::Sum => total,
            }
        })
        .collect()
}

fn gaussian(d: usize, mean: &[f64], std: &[f64]) -> Gaussian {
    let device = Device::flex();
    let b = std.len();
    Gaussian {
        mean: tensor_f64(mean, [b, 1, 1, d], &device),
        std: tensor_f64(std, [b, 1, 1, 1], &device),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn log_prob_matches_the_scalar_formula((d, mean, x, std) in batch(), sum in any::<bool>()) {
        let reduction = if sum { LogProbReduction::Sum } else { LogProbReduction::Mean };
        let b = std.len();
        let g = gaussian(d, &mean, &std);
        let ours = g.log_prob(tensor_f64(&x, [b, 1, 1, d], &Device::flex()), reduction).unwrap();
        let expected = oracle(d, reduction, |s, i| {
            -(x[i] - mean[i]).powi(2) / (2.0 * std[s] * std[s]) - std[s].ln() - LOG_SQRT_2PI
        }, b);
        prop_assert!(check_close(&ours, expected, 1e-12, 1e-12).is_ok());
    }

    #[test]
    fn kl_matches_the_scalar_formula_and_is_nonnegative(
        (d, mean_p, mean_q, std_p) in batch(),
        std_q in prop::collection::vec(0.05..3.0f64, 3),
    ) {
        let b = std_p.len();
        let std_q = &std_q[..b];
        let (p, q) = (gaussian(d, &mean_p, &std_p), gaussian(d, &mean_q, std_q));
        let ours = p.kl(&q, LogProbReduction::Sum).unwrap();
        let expected = oracle(d, LogProbReduction::Sum, |s, i| {
            (std_q[s] / std_p[s]).ln()
                + (std_p[s].powi(2) + (mean_p[i] - mean_q[i]).powi(2)) / (2.0 * std_q[s].powi(2))
                - 0.5
        }, b);
        prop_assert!(check_close(&ours, &expected, 1e-12, 1e-12).is_ok());
        prop_assert!(expected.iter().all(|&k| k >= -1e-12));
    }

    #[test]
    fn every_spacing_gives_n_distinct_descending_training_timesteps(
        big_n in 2usize..2000,
        fraction in 0.0..1.0f64,
        spacing in prop::sample::select(vec![TimestepSpacing::Leading, TimestepSpacing::Trailing, TimestepSpacing::Linspace]),
    ) {
        let n = 1 + ((big_n - 1) as f64 * fraction) as usize;
        let t = schedule::discrete_timesteps(spacing, big_n, n, 0).unwrap();
        prop_assert_eq!(t.len(), n);
        prop_assert!(t.windows(2).all(|w| w[0] > w[1]), "{:?}", t);
        prop_assert!(t[0] < big_n);
        match spacing {
            TimestepSpacing::Trailing => prop_assert_eq!(t[0], big_n - 1),
            // numpy's `linspace(0, N - 1, n)`, as diffusers computes it: one point is the start.
            TimestepSpacing::Linspace if n == 1 => prop_assert_eq!(&t, &vec![0]),
            TimestepSpacing::Linspace => prop_assert_eq!(t[0], big_n - 1),
            TimestepSpacing::Leading => {}
        }
    }
}
