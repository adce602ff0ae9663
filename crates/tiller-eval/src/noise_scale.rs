//! The gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch
//! Training"): from the per-update signal and noise terms an alignment run logs when it
//! accumulates micro-batches, how many examples a step needs before its signal outweighs its
//! noise.

use std::path::Path;
use tiller_core::{Error, Result};

/// The gradient noise scale `B_simple = mean tr Sigma / mean |G|^2` (McCandlish et al. 2018)
/// from the terms a run logged at each update (`grad_noise_trace`, `grad_signal_sq`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct NoiseScale {
    /// Examples per batch at which a step's noise equals its signal (negative when the mean
    /// signal estimate is not positive: no signal measurable over the run).
    pub b_simple: f64,
    /// The smallest `B_simple` the run is consistent with: the mean noise over the mean signal
    /// plus two standard errors of it (the signal's estimate varies from update to update);
    /// infinite when there is a single update.
    pub b_lower: f64,
    /// The largest: the mean noise over the mean signal minus two standard errors (infinite
    /// when that is not positive).
    pub b_upper: f64,
    pub signal_sq: f64,
    /// Standard error of `signal_sq` over the updates.
    pub signal_se: f64,
    pub noise_trace: f64,
    /// Updates averaged.
    pub updates: usize,
}

/// [`NoiseScale`] from a run's metrics.jsonl (`None` when no update logged its terms).
pub fn read_noise_scale(run: &Path) -> Result<Option<NoiseScale>> {
    let path = run.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let (mut signals, mut traces) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::format(&path, format!("a line is not JSON: {e}")))?;
        if let (Some(s), Some(t)) = (v["grad_signal_sq"].as_f64(), v["grad_noise_trace"].as_f64()) {
            signals.push(s);
            traces.push(t);
        }
    }
    Ok(noise_scale(&signals, &traces))
}

/// [`NoiseScale`] from per-update signal and noise estimates.
pub fn noise_scale(signals: &[f64], traces: &[f64]) -> Option<NoiseScale> {
    let n = signals.len();
    if n == 0 || traces.len() != n {
        return None;
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / n as f64;
    let (signal, trace) = (mean(signals), mean(traces));
    let se = if n > 1 {
        let var = signals.iter().map(|x| (x - signal).powi(2)).sum::<f64>() / (n - 1) as f64;
        (var / n as f64).sqrt()
    } else {
        f64::INFINITY
    };
    let (upper, lower) = (signal + 2.0 * se, signal - 2.0 * se);
    let ratio = |s: f64| {
        if s > 0.0 && s.is_finite() {
            trace / s
        } else {
            f64::INFINITY
        }
    };
    Some(NoiseScale {
        b_simple: trace / signal,
        b_lower: ratio(upper),
        b_upper: ratio(lower),
        signal_sq: signal,
        signal_se: se,
        noise_trace: trace,
        updates: n,
    })
}

/// One line on a run's noise scale and what it means at its batch of `batch` examples.
pub fn describe_noise(ns: &NoiseScale, batch: usize) -> String {
    let b = batch as f64;
    // E|g_B|^2 = |G|^2 (1 + B_simple / B): the share of a step's squared norm that is signal.
    let share = |scale: f64| 100.0 / (1.0 + scale / b);
    if ns.signal_sq > 2.0 * ns.signal_se {
        format!(
            "gradient noise scale B_simple = {:.0} examples (at least {:.0}, 95%) over {} updates; at this run's batch of {batch}, {:.0}% of a step's squared norm is signal",
            ns.b_simple,
            ns.b_lower,
            ns.updates,
            share(ns.b_simple)
        )
    } else if ns.b_lower.is_finite() {
        format!(
            "no gradient signal measurable over {} updates: B_simple is at least {:.0} examples (95%); at this run's batch of {batch}, at most {:.1}% of a step's squared norm is signal",
            ns.updates,
            ns.b_lower,
            share(ns.b_lower)
        )
    } else {
        format!(
            "no gradient signal measurable over {} update(s)",
            ns.updates
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_scale_and_its_bound_by_hand() {
        // A steady signal of 2 with noise 100: B_simple = 50, and the signal is significant.
        let ns = noise_scale(&[2.0; 4], &[100.0; 4]).unwrap();
        assert_eq!((ns.b_simple, ns.signal_se, ns.updates), (50.0, 0.0, 4));
        assert_eq!((ns.b_lower, ns.b_upper), (50.0, 50.0));
        let line = describe_noise(&ns, 50);
        assert!(
            line.contains("B_simple = 50 ") && line.contains("50% of a step"),
            "{line}"
        );
        // Signals 1, -1, 1, -1: mean 0, sample sd sqrt(4/3), se sqrt(1/3); upper bound
        // 2 sqrt(1/3) = 1.1547, so B_simple >= 100 / 1.1547 = 86.6.
        let ns = noise_scale(&[1.0, -1.0, 1.0, -1.0], &[100.0; 4]).unwrap();
        assert!((ns.signal_se - (1.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert!((ns.b_lower - 86.6025).abs() < 1e-3, "{}", ns.b_lower);
        assert!(ns.b_upper.is_infinite());
        let line = describe_noise(&ns, 32);
        assert!(line.contains("at least 87 examples"), "{line}");
        // One update has no standard error: nothing can be bounded.
        let ns = noise_scale(&[-1.0], &[100.0]).unwrap();
        assert!(ns.b_lower.is_infinite());
        assert!(noise_scale(&[], &[]).is_none());
    }
}
