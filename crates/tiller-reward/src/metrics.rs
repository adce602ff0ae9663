//! How good a reward is, measured against labels and against the truth.

use crate::losses::preference_probability;

/// Fraction of non-tie pairs `(score_a, score_b, target)` where the higher score is on the
/// preferred side (a score tie counts half). `None` when every pair is a tie.
pub fn pairwise_accuracy(pairs: &[(f64, f64, f64)]) -> Option<f64> {
    let mut n = 0.0;
    let mut right = 0.0;
    for &(a, b, y) in pairs {
        if y == 0.5 {
            continue;
        }
        n += 1.0;
        right += if a == b {
            0.5
        } else if (a > b) == (y > 0.5) {
            1.0
        } else {
            0.0
        };
    }
    (n > 0.0).then(|| right / n)
}

/// Calibration of Bradley–Terry probabilities on labelled pairs.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Calibration {
    /// Expected calibration error over `bins` equal-width probability bins.
    pub ece: f64,
    /// Mean squared error between the probability and the (soft) label.
    pub brier: f64,
    /// Per bin: (mean predicted probability, mean label, pairs).
    pub bins: Vec<(f64, f64, usize)>,
}

/// Calibration of `P(a preferred) = σ(score_a - score_b)` against the targets.
pub fn calibration(pairs: &[(f64, f64, f64)], bins: usize) -> Calibration {
    let bins = bins.max(1);
    let mut acc = vec![(0.0, 0.0, 0usize); bins];
    let mut brier = 0.0;
    for &(a, b, y) in pairs {
        let p = preference_probability(a, b);
        brier += (p - y).powi(2);
        let k = ((p * bins as f64) as usize).min(bins - 1);
        acc[k].0 += p;
        acc[k].1 += y;
        acc[k].2 += 1;
    }
    let n = pairs.len().max(1) as f64;
    let mut ece = 0.0;
    let bins = acc
        .into_iter()
        .map(|(p, y, c)| {
            if c == 0 {
                return (0.0, 0.0, 0);
            }
            let (mp, my) = (p / c as f64, y / c as f64);
            ece += (c as f64 / n) * (mp - my).abs();
            (mp, my, c)
        })
        .collect();
    Calibration {
        ece,
        brier: brier / n,
        bins,
    }
}

/// Pearson correlation; `None` when either side is constant or there are fewer than two points.
pub fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    let n = x.len().min(y.len());
    if n < 2 {
        return None;
    }
    let mx = x[..n].iter().sum::<f64>() / n as f64;
    let my = y[..n].iter().sum::<f64>() / n as f64;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let (dx, dy) = (x[i] - mx, y[i] - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
}

/// Ranks starting at 1, ties sharing their average rank.
pub fn ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut r = vec![0.0; x.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && x[order[j + 1]] == x[order[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            r[k] = avg;
        }
        i = j + 1;
    }
    r
}

/// Spearman's rank correlation (Pearson on average ranks).
pub fn spearman(x: &[f64], y: &[f64]) -> Option<f64> {
    pearson(&ranks(x), &ranks(y))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_skips_ties_and_halves_score_ties() {
        let pairs = [
            (2.0, 1.0, 1.0),
            (0.0, 1.0, 1.0),
            (1.0, 1.0, 0.0),
            (5.0, 0.0, 0.5),
        ];
        assert_eq!(pairwise_accuracy(&pairs), Some(1.5 / 3.0));
        assert_eq!(pairwise_accuracy(&[(1.0, 0.0, 0.5)]), None);
    }

    #[test]
    fn spearman_of_hand_ranked_data() {
        // Ranks x: 1 2 3 4; y: 1 3 2 4 -> d^2 = 0 1 1 0, rho = 1 - 6*2/(4*15) = 0.8.
        let rho = spearman(&[1.0, 2.0, 3.0, 4.0], &[10.0, 30.0, 20.0, 40.0]).unwrap();
        assert!((rho - 0.8).abs() < 1e-12);
        assert_eq!(ranks(&[3.0, 1.0, 3.0]), vec![2.5, 1.0, 2.5]);
        assert_eq!(pearson(&[1.0, 1.0], &[1.0, 2.0]), None);
    }

    #[test]
    fn a_perfectly_calibrated_bin_has_no_error() {
        // d = ln 3 gives p = 0.75; three of four labels are 1.
        let d = 3f64.ln();
        let pairs = [(d, 0.0, 1.0), (d, 0.0, 1.0), (d, 0.0, 1.0), (d, 0.0, 0.0)];
        let c = calibration(&pairs, 10);
        assert!(c.ece < 1e-12);
        // Brier: (3 * 0.25^2 + 0.75^2) / 4 = 0.1875.
        assert!((c.brier - 0.1875).abs() < 1e-12);
    }
}
