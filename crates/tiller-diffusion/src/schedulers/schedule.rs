//! The math the discrete-time schedulers (DDPM, DDIM) share: beta schedules, the cumulative
//! product ᾱ_t = Π_{s<=t} (1 - β_s), the spacing of inference timesteps, the forward process
//! q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I) and the conversions between what a network
//! predicts (ε, v or x_0) and the pair (x̂_0, ε̂).
//!
//! Everything is computed in f64 on the host. diffusers keeps β and ᾱ in float32, where 1 - ᾱ_t
//! near t = 0 (1 - 0.9999) keeps only ~4 significant digits: enough to move a late step's
//! log-probability by 1e-4. Sampling is unaffected at float32 precision; the goldens therefore
//! run diffusers' step code on a float64 schedule (`scripts/fixtures/schedulers.py`).

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};
use tiller_core::{Error, Result};

use super::{check_same_shape, per_sample};

/// How β_t grows over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BetaSchedule {
    /// β evenly spaced from `beta_start` to `beta_end` (Ho et al. 2020).
    #[serde(rename = "linear")]
    Linear,
    /// sqrt(β) evenly spaced, then squared: Stable Diffusion's schedule.
    #[serde(rename = "scaled_linear")]
    ScaledLinear,
    /// The cosine schedule of Nichol & Dhariwal 2021, ᾱ(t) = cos²((t + 0.008)/1.008 · π/2), with
    /// β capped at 0.999; `beta_start` and `beta_end` are unused.
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
}

/// What the network predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PredictionType {
    /// The noise ε that was added (Ho et al. 2020).
    #[serde(rename = "epsilon")]
    Epsilon,
    /// v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x_0 (Salimans & Ho 2022, "Progressive Distillation").
    #[serde(rename = "v_prediction")]
    VPrediction,
    /// The clean sample x_0 itself.
    #[serde(rename = "sample")]
    Sample,
}

/// How the inference timesteps are picked from the training ones (Lin et al. 2024, "Common
/// Diffusion Noise Schedules and Sample Steps are Flawed", table 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimestepSpacing {
    /// k · (N div n) for k = n-1 .. 0, plus `steps_offset`: never reaches t = N-1.
    #[serde(rename = "leading")]
    Leading,
    /// round(N - k · N/n) - 1 for k = 0 .. n-1: starts at t = N-1.
    #[serde(rename = "trailing")]
    Trailing,
    /// round(linspace(0, N-1, n)), descending: both ends included.
    #[serde(rename = "linspace")]
    Linspace,
}

/// The largest β of the cosine schedule, as in Nichol & Dhariwal 2021 (avoids β = 1 at t = N-1).
const COSINE_MAX_BETA: f64 = 0.999;

/// β_0 .. β_{N-1} for `schedule`.
pub fn betas(schedule: BetaSchedule, beta_start: f64, beta_end: f64, n: usize) -> Vec<f64> {
    match schedule {
        BetaSchedule::Linear => linspace(beta_start, beta_end, n),
        BetaSchedule::ScaledLinear => linspace(beta_start.sqrt(), beta_end.sqrt(), n)
            .into_iter()
            .map(|b| b * b)
            .collect(),
        BetaSchedule::SquaredcosCapV2 => {
            let alpha_bar = |t: f64| {
                ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                    .cos()
                    .powi(2)
            };
            (0..n)
                .map(|i| {
                    let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                    (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(COSINE_MAX_BETA)
                })
                .collect()
        }
    }
}

/// Rescales β so that ᾱ_{N-1} = 0 while ᾱ_0 is kept: zero terminal SNR, algorithm 1 of Lin et
/// al. 2024. sqrt(ᾱ) is shifted so its last value is 0, then scaled so its first is unchanged.
pub fn rescale_zero_terminal_snr(betas: &[f64]) -> Vec<f64> {
    let sqrt_alpha_bars: Vec<f64> = cumulative_alphas(betas).iter().map(|a| a.sqrt()).collect();
    let (first, last) = (
        sqrt_alpha_bars[0],
        sqrt_alpha_bars[sqrt_alpha_bars.len() - 1],
    );
    let alpha_bars: Vec<f64> = sqrt_alpha_bars
        .iter()
        .map(|s| ((s - last) * first / (first - last)).powi(2))
        .collect();
    // Undo the cumulative product: α_0 = ᾱ_0, α_t = ᾱ_t / ᾱ_{t-1}.
    let mut alphas = vec![alpha_bars[0]];
    alphas.extend(alpha_bars.windows(2).map(|w| w[1] / w[0]));
    alphas.iter().map(|a| 1.0 - a).collect()
}

/// ᾱ_t = Π_{s<=t} (1 - β_s).
pub fn cumulative_alphas(betas: &[f64]) -> Vec<f64> {
    betas
        .iter()
        .scan(1.0, |product, beta| {
            *product *= 1.0 - beta;
            Some(*product)
        })
        .collect()
}

/// `num` values from `start` to `stop` inclusive, computed as numpy's `linspace` does
/// (start + k · ((stop - start) / (num - 1)), last value exactly `stop`), so that rounding the
/// result agrees with numpy bit for bit.
pub fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut values: Vec<f64> = (0..num).map(|k| start + k as f64 * step).collect();
    if let Some(last) = values.last_mut() {
        *last = stop;
    }
    values
}

/// The inference timesteps, descending, as training-timestep indices.
///
/// Rounding is half-to-even, as numpy's: with 7 steps `linspace` gives 166.5 -> 166, not 167.
/// `trailing` always gives exactly `num_inference_steps` values; diffusers' `np.arange` gives one
/// more for some counts (61 of 1000, for instance), ending at timestep -1.
pub fn discrete_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: usize,
) -> Result<Vec<usize>> {
    let (big_n, n) = (num_train_timesteps, num_inference_steps);
    if n == 0 || n > big_n {
        return Err(Error::invalid(format!(
            "num_inference_steps must be in 1..={big_n} (num_train_timesteps), got {n}"
        )));
    }
    let timesteps: Vec<usize> = match spacing {
        TimestepSpacing::Leading => {
            let ratio = big_n / n;
            (0..n).rev().map(|k| k * ratio + steps_offset).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = big_n as f64 / n as f64;
            // round(N - k·ratio) >= round(ratio) >= 1 for k < n, so the -1 cannot underflow.
            (0..n)
                .map(|k| (big_n as f64 - k as f64 * ratio).round_ties_even() as usize - 1)
                .collect()
        }
        TimestepSpacing::Linspace => linspace(0.0, (big_n - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|t| t.round_ties_even() as usize)
            .collect(),
    };
    if let Some(&first) = timesteps.first()
        && first >= big_n
    {
        return Err(Error::config(
            "steps_offset",
            format!(
                "{steps_offset} pushes the first timestep to {first}, past the last training \
                 timestep {}",
                big_n - 1
            ),
        ));
    }
    Ok(timesteps)
}

/// ᾱ_t over the training timesteps, and the forward process it defines.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    /// ᾱ_0 .. ᾱ_{N-1}.
    pub alphas_cumprod: Vec<f64>,
}

impl NoiseSchedule {
    /// The schedule for `schedule` over `num_train_timesteps` steps, optionally rescaled to zero
    /// terminal SNR.
    pub fn new(
        schedule: BetaSchedule,
        beta_start: f64,
        beta_end: f64,
        num_train_timesteps: usize,
        rescale_zero_snr: bool,
    ) -> Result<Self> {
        if num_train_timesteps < 2 {
            return Err(Error::config(
                "num_train_timesteps",
                format!("must be at least 2, got {num_train_timesteps}"),
            ));
        }
        if schedule != BetaSchedule::SquaredcosCapV2 {
            for (field, value) in [("beta_start", beta_start), ("beta_end", beta_end)] {
                if !(value > 0.0 && value < 1.0) {
                    return Err(Error::config(
                        field,
                        format!("must be in (0, 1), got {value}"),
                    ));
                }
            }
        }
        let mut betas = betas(schedule, beta_start, beta_end, num_train_timesteps);
        if rescale_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        Ok(Self {
            alphas_cumprod: cumulative_alphas(&betas),
        })
    }

    /// N, the number of training timesteps.
    pub fn len(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// Never true: a schedule has at least two timesteps.
    pub fn is_empty(&self) -> bool {
        self.alphas_cumprod.is_empty()
    }

    /// ᾱ_t.
    pub fn alpha_bar(&self, t: usize) -> f64 {
        self.alphas_cumprod[t]
    }

    /// The training timestep index of `t`, which must be an integer in 0..N.
    pub fn train_index(&self, t: f64) -> Result<usize> {
        let n = self.len();
        if t.fract() != 0.0 || !(0.0..n as f64).contains(&t) {
            return Err(Error::invalid(format!(
                "timestep {t} is not an integer training timestep in 0..{n}"
            )));
        }
        Ok(t as usize)
    }

    /// ᾱ at each of the per-sample `timesteps`, checked to be one per sample of `like` ([B, ...]).
    fn per_sample_alpha_bars(&self, timesteps: &[f64], like: &Tensor<4>) -> Result<Vec<f64>> {
        let batch = like.dims()[0];
        if timesteps.len() != batch {
            return Err(Error::invalid(format!(
                "{} timesteps given for a batch of {batch}: pass one per sample",
                timesteps.len()
            )));
        }
        timesteps
            .iter()
            .map(|&t| self.train_index(t).map(|i| self.alpha_bar(i)))
            .collect()
    }

    /// x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε.
    ///
    /// original, noise: [B, C, H, W]; timesteps: [B] integer training timesteps.
    pub fn add_noise(
        &self,
        original: Tensor<4>,
        noise: Tensor<4>,
        timesteps: &[f64],
    ) -> Result<Tensor<4>> {
        check_same_shape("original", &original, "noise", &noise)?;
        let alpha_bars = self.per_sample_alpha_bars(timesteps, &original)?;
        let (signal, sigma) = signal_and_noise_scales(&alpha_bars, &original);
        Ok(original * signal + noise * sigma)
    }

    /// The regression target of a network with `prediction_type` at `timesteps`:
    /// ε, v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x_0, or x_0.
    ///
    /// original, noise: [B, C, H, W]; timesteps: [B] integer training timesteps.
    pub fn training_target(
        &self,
        prediction_type: PredictionType,
        original: Tensor<4>,
        noise: Tensor<4>,
        timesteps: &[f64],
    ) -> Result<Tensor<4>> {
        check_same_shape("original", &original, "noise", &noise)?;
        let alpha_bars = self.per_sample_alpha_bars(timesteps, &original)?;
        Ok(match prediction_type {
            PredictionType::Epsilon => noise,
            PredictionType::Sample => original,
            PredictionType::VPrediction => {
                let (signal, sigma) = signal_and_noise_scales(&alpha_bars, &original);
                noise * signal - original * sigma
            }
        })
    }
}

/// sqrt(ᾱ) and sqrt(1 - ᾱ) per sample, as [B, 1, 1, 1] tensors like `like`.
fn signal_and_noise_scales(alpha_bars: &[f64], like: &Tensor<4>) -> (Tensor<4>, Tensor<4>) {
    let signal = alpha_bars.iter().map(|a| a.sqrt()).collect();
    let sigma = alpha_bars.iter().map(|a| (1.0 - a).sqrt()).collect();
    (per_sample(signal, like), per_sample(sigma, like))
}

/// x̂_0 and ε̂ from a network output at a timestep with cumulative alpha `alpha_bar`:
///
/// - ε:   x̂_0 = (x_t - sqrt(1-ᾱ) ε̂) / sqrt(ᾱ)
/// - x_0: ε̂ = (x_t - sqrt(ᾱ) x̂_0) / sqrt(1-ᾱ)
/// - v:   x̂_0 = sqrt(ᾱ) x_t - sqrt(1-ᾱ) v̂,  ε̂ = sqrt(ᾱ) v̂ + sqrt(1-ᾱ) x_t
///
/// (the last pair follows from x_t = sqrt(ᾱ) x_0 + sqrt(1-ᾱ) ε and v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x_0,
/// a rotation by the angle whose cosine is sqrt(ᾱ)). No clipping here.
///
/// model_output, sample: [B, C, H, W]. Returns (x̂_0, ε̂), both [B, C, H, W].
pub fn original_and_noise(
    prediction_type: PredictionType,
    model_output: Tensor<4>,
    sample: Tensor<4>,
    alpha_bar: f64,
) -> (Tensor<4>, Tensor<4>) {
    let (signal, sigma) = (alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt());
    match prediction_type {
        PredictionType::Epsilon => {
            let original = (sample - model_output.clone() * sigma) / signal;
            (original, model_output)
        }
        PredictionType::Sample => {
            let noise = (sample - model_output.clone() * signal) / sigma;
            (model_output, noise)
        }
        PredictionType::VPrediction => {
            let original = sample.clone() * signal - model_output.clone() * sigma;
            let noise = model_output * signal + sample * sigma;
            (original, noise)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_numpy_including_the_tie_that_rounds_to_even() {
        // np.linspace(0, 999, 7) = [0, 166.5, 333, 499.5, 666, 832.5, 999]; numpy rounds the
        // halves to even: 166, 500, 832.
        let t = discrete_timesteps(TimestepSpacing::Linspace, 1000, 7, 0).unwrap();
        assert_eq!(t, vec![999, 832, 666, 500, 333, 166, 0]);
    }

    #[test]
    fn trailing_gives_exactly_n_timesteps_where_numpy_arange_gives_n_plus_one() {
        // 1000 / 61 = 16.39...; k = 60 gives round(16.39) - 1 = 15. np.arange(1000, 0, -16.39)
        // has a 62nd element near 1e-13 that diffusers turns into timestep -1.
        let t = discrete_timesteps(TimestepSpacing::Trailing, 1000, 61, 0).unwrap();
        assert_eq!(t.len(), 61);
        assert_eq!((t[0], t[59], t[60]), (999, 32, 15));
    }

    #[test]
    fn leading_adds_the_offset() {
        // N div n = 100; k·100 + 1 for k = 9..0.
        let t = discrete_timesteps(TimestepSpacing::Leading, 1000, 10, 1).unwrap();
        assert_eq!(t, vec![901, 801, 701, 601, 501, 401, 301, 201, 101, 1]);
    }

    #[test]
    fn zero_snr_rescale_ends_at_zero_and_keeps_the_start() {
        let b = betas(BetaSchedule::ScaledLinear, 0.00085, 0.012, 1000);
        let before = cumulative_alphas(&b);
        let after = cumulative_alphas(&rescale_zero_terminal_snr(&b));
        assert!(after[999].abs() < 1e-12, "{}", after[999]);
        assert!((after[0] - before[0]).abs() < 1e-12);
    }
}
