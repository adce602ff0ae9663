//! Hand-derived values of each loss, and Bradley–Terry's properties.

use burn::tensor::{Device, Tensor};
use tiller_reward::losses::{bradley_terry, factor_bce, logistic, ordinal, preference_probability};

fn t(v: &[f32]) -> Tensor<1> {
    Tensor::from_floats(v, &Device::flex())
}

fn scalar(x: Tensor<1>) -> f64 {
    x.into_scalar::<f64>()
}

#[test]
fn bradley_terry_hand_values() {
    // d = 0, a preferred: log(1 + e^0) = ln 2.
    let l = scalar(bradley_terry(t(&[0.0]), t(&[0.0]), t(&[1.0])));
    assert!((l - std::f64::consts::LN_2).abs() < 1e-6, "{l}");
    // d = 1, tie: 0.5 ln(1 + e^-1) + 0.5 ln(1 + e^1) = 0.5 (0.313262 + 1.313262) = 0.813262.
    let l = scalar(bradley_terry(t(&[1.5]), t(&[0.5]), t(&[0.5])));
    assert!((l - 0.813_262).abs() < 1e-5, "{l}");
    // d = 2, b preferred: ln(1 + e^2) = 2.126928; the batch mean with d = -2, b preferred
    // (ln(1 + e^-2) = 0.126928) is 1.126928.
    let l = scalar(bradley_terry(
        t(&[2.0, 0.0]),
        t(&[0.0, 2.0]),
        t(&[0.0, 0.0]),
    ));
    assert!((l - 1.126_928).abs() < 1e-5, "{l}");
}

#[test]
fn swapping_a_pair_flips_the_probability_and_a_tie_is_one_half() {
    for (a, b) in [(0.3, -1.2), (2.0, 2.5), (-4.0, 1.0)] {
        let p = preference_probability(a, b);
        let q = preference_probability(b, a);
        assert!((p + q - 1.0).abs() < 1e-12);
    }
    assert_eq!(preference_probability(0.7, 0.7), 0.5);
    // The loss of (a, b, y) equals the loss of (b, a, 1 - y).
    let l1 = scalar(bradley_terry(t(&[0.3]), t(&[-1.2]), t(&[1.0])));
    let l2 = scalar(bradley_terry(t(&[-1.2]), t(&[0.3]), t(&[0.0])));
    assert!((l1 - l2).abs() < 1e-6);
}

#[test]
fn logistic_hand_values() {
    // like at r = 2: ln(1 + e^-2) = 0.126928; dislike at r = 2: ln(1 + e^2) = 2.126928.
    let l = scalar(logistic(t(&[2.0]), t(&[1.0])));
    assert!((l - 0.126_928).abs() < 1e-5, "{l}");
    let l = scalar(logistic(t(&[2.0]), t(&[0.0])));
    assert!((l - 2.126_928).abs() < 1e-5, "{l}");
}

#[test]
fn ordinal_hand_values() {
    // r = 0, cuts -1.5 -0.5 0.5 1.5. P(3) = σ(0.5) - σ(-0.5) = 0.622459 - 0.377541 = 0.244919,
    // -ln = 1.406829. P(1) = 1 - σ(1.5) = 0.182426, -ln = 1.701413.
    // P(5) = σ(-1.5) = 0.182426 as well.
    let cuts = t(&[-1.5, -0.5, 0.5, 1.5]);
    let l = scalar(ordinal(t(&[0.0]), cuts.clone(), &[3]));
    assert!((l - 1.406_829).abs() < 1e-5, "{l}");
    let l = scalar(ordinal(t(&[0.0]), cuts.clone(), &[1]));
    assert!((l - 1.701_413).abs() < 1e-5, "{l}");
    let l = scalar(ordinal(t(&[0.0, 0.0]), cuts, &[5, 3]));
    assert!((l - (1.701_413 + 1.406_829) / 2.0).abs() < 1e-5, "{l}");
}

#[test]
fn factor_bce_averages_labelled_entries_only() {
    let d = Device::flex();
    let logits = Tensor::<2>::from_floats([[0.0, 5.0], [2.0, -3.0]], &d);
    let targets = Tensor::<2>::from_floats([[1.0, 0.0], [1.0, 1.0]], &d);
    let mask = Tensor::<2>::from_floats([[1.0, 0.0], [1.0, 0.0]], &d);
    // ln 2 and ln(1 + e^-2) = 0.126928, mean 0.410003.
    let l = factor_bce(logits, targets, mask).into_scalar::<f64>();
    assert!(
        (l - (std::f64::consts::LN_2 + 0.126_928) / 2.0).abs() < 1e-5,
        "{l}"
    );
}
