//! The losses that turn each kind of feedback into a reward-model gradient. Each returns the mean
//! over the batch; scores are the reward model's raw outputs (logits).
//!
//! - **Bradley–Terry with ties** (Bradley & Terry 1952; the pairwise loss of ImageReward, HPSv2 and
//!   PickScore): with `d = r_a - r_b` and target `y` (1: a preferred, 0: b preferred, 0.5: tie),
//!   `-[y log σ(d) + (1 - y) log σ(-d)]`. A tie as the soft label 0.5 is PickScore's convention for
//!   Pick-a-Pic's ties (`../shared/reference/ecosystem.md`).
//! - **Logistic** (binary like/dislike, the feedback KTO learns from): `-[y log σ(r) + (1 - y) log σ(-r)]`.
//! - **Ordinal, cumulative logit** (McCullagh 1980, "proportional odds"): for K = 5 stars and ordered
//!   cut points θ_1 < ... < θ_4, `P(stars > k) = σ(r - θ_k)`, so `P(stars = k) = σ(r - θ_{k-1}) -
//!   σ(r - θ_k)` (with σ(r - θ_0) = 1, σ(r - θ_5) = 0), and the loss is `-log P(stars = observed)`.
//! - **Factor cross-entropy** (reasons): per named factor, binary cross-entropy of the factor's
//!   logit against a target in [0, 1], over the factors labelled for each image.

use burn::tensor::Tensor;
use burn::tensor::activation::{log_sigmoid, sigmoid};

/// Bradley–Terry loss with ties: `r_a`, `r_b` [B], `target` [B] in {0, 0.5, 1} (any value in [0, 1]).
pub fn bradley_terry(r_a: Tensor<1>, r_b: Tensor<1>, target: Tensor<1>) -> Tensor<1> {
    let d = r_a - r_b;
    logistic(d, target)
}

/// Logistic (binary cross-entropy with logits): `r` [B], `target` [B] in [0, 1].
pub fn logistic(r: Tensor<1>, target: Tensor<1>) -> Tensor<1> {
    let pos = log_sigmoid(r.clone());
    let neg = log_sigmoid(r.neg());
    let one_minus = target.clone().neg().add_scalar(1.0);
    (target * pos + one_minus * neg).neg().mean()
}

/// The probability that `a` is preferred under Bradley–Terry: σ(r_a - r_b).
pub fn preference_probability(r_a: f64, r_b: f64) -> f64 {
    1.0 / (1.0 + (-(r_a - r_b)).exp())
}

/// Cumulative-logit ordinal loss: `r` [B], `cuts` [K-1] ordered increasing, `stars` the observed
/// class in 1..=K for each row. Probabilities are floored at 1e-7 before the log.
pub fn ordinal(r: Tensor<1>, cuts: Tensor<1>, stars: &[u8]) -> Tensor<1> {
    let [b] = r.dims();
    let [k1] = cuts.dims();
    let device = r.device();
    // P(stars > k) for k = 1..K-1: [B, K-1]; pad with 1 (k = 0) and 0 (k = K).
    let above = sigmoid(r.reshape([b, 1]) - cuts.reshape([1, k1]));
    let ones = Tensor::<2>::ones([b, 1], &device);
    let zeros = Tensor::<2>::zeros([b, 1], &device);
    let upper = Tensor::cat(vec![ones, above.clone()], 1); // P(stars > k - 1), k = 1..K
    let lower = Tensor::cat(vec![above, zeros], 1); // P(stars > k), k = 1..K
    let probs = upper - lower; // [B, K]
    let mut onehot = vec![0f32; b * (k1 + 1)];
    for (i, &s) in stars.iter().enumerate() {
        let k = (s as usize).clamp(1, k1 + 1) - 1;
        onehot[i * (k1 + 1) + k] = 1.0;
    }
    let onehot =
        Tensor::<2>::from_data(burn::tensor::TensorData::new(onehot, [b, k1 + 1]), &device);
    let p = (probs * onehot).sum_dim(1).reshape([b]).clamp_min(1e-7);
    p.log().neg().mean()
}

/// Factor cross-entropy: `logits` [B, F], `targets` [B, F] in [0, 1], `mask` [B, F] with 1 where
/// a factor is labelled. The mean over labelled entries (0 when none is).
pub fn factor_bce(logits: Tensor<2>, targets: Tensor<2>, mask: Tensor<2>) -> Tensor<1> {
    let pos = log_sigmoid(logits.clone());
    let neg = log_sigmoid(logits.neg());
    let one_minus = targets.clone().neg().add_scalar(1.0);
    let per = (targets * pos + one_minus * neg).neg() * mask.clone();
    let n = mask.sum().clamp_min(1.0);
    per.sum() / n
}
