//! Learning-rate schedules as diffusers' training scripts name them
//! (`get_scheduler(name, num_warmup_steps, num_training_steps)`).

use serde::{Deserialize, Serialize};

/// The schedule's shape after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrShape {
    /// Linear warm-up to the peak, then constant (`constant_with_warmup`).
    Constant,
    /// Linear warm-up, then half a cosine down to 0 at the last step (`cosine`).
    Cosine,
}

/// A learning rate as a function of the step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub peak: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub shape: LrShape,
}

impl LrSchedule {
    /// The rate for the update made at `step` (0-based).
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.shape {
            LrShape::Constant => self.peak,
            LrShape::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
                self.peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_shape() {
        let s = LrSchedule {
            peak: 1.0,
            warmup_steps: 4,
            total_steps: 14,
            shape: LrShape::Cosine,
        };
        // Warm-up: (step + 1) / 4.
        assert_eq!(s.at(0), 0.25);
        assert_eq!(s.at(3), 1.0);
        // Cosine: at the middle of the remaining 10 steps, 0.5 * (1 + cos(pi/2)) = 0.5.
        assert!((s.at(9) - 0.5).abs() < 1e-12);
        assert!(s.at(14).abs() < 1e-12);
        let c = LrSchedule {
            shape: LrShape::Constant,
            ..s
        };
        assert_eq!(c.at(100), 1.0);
    }
}
