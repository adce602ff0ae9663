//! Aesthetic taste: the stand-in for human aesthetic preference, hidden from the generator.
//!
//! Four components, each a score in [0, 1] computed from an image's parsed items (objects and
//! marks, as connected components) and its remaining pixels:
//! - **border**: every item keeps at least `border_margin` background pixels between its box and
//!   each image edge. Score = fraction of items that do (1 with no items).
//! - **clean background**: the background is the exact background colour. A pixel outside every
//!   item and outside the one-pixel ring around them is noise when it lies more than
//!   `clean_tolerance` from (40, 40, 40). Score = `1 - noise_fraction / noise_zero`, clipped.
//! - **balance**: the composition's centre of mass (all item pixels, equally weighted) sits near
//!   the image centre. With `d` the distance between them as a fraction of the side, the score is
//!   1 for `d <= balance_full`, 0 for `d >= balance_zero`, linear between.
//! - **crisp edges**: items end in a hard edge. A ring pixel (8-adjacent to an item, not in one)
//!   is soft when it lies more than `clean_tolerance` from the background colour. Score =
//!   `1 - soft / ring`.
//!
//! The renderer ([`mod@crate::render`]) aims at these same definitions, so an image it draws without
//! a flaw scores exactly 1 on every component, and each flaw it draws lowers its component.

use crate::image::{BBox, scale};
use serde::{Deserialize, Serialize};
use tiller_core::{Error, Result};

/// Thresholds of the aesthetic components; lengths are in pixels at 32x32 and scale with the
/// resolution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TasteConfig {
    /// Background pixels an item needs between its box and every image edge to count as clear of
    /// the border, at 32x32. Default 2.
    pub border_margin: usize,
    /// Centre-of-mass offset, as a fraction of the image side, at or below which balance scores 1.
    /// Default 0.12.
    pub balance_full: f64,
    /// Centre-of-mass offset, as a fraction of the image side, at or above which balance scores 0.
    /// Default 0.32.
    pub balance_zero: f64,
    /// RGB distance from the background colour beyond which a non-item pixel is noise (or, in the
    /// ring around an item, a soft edge). Default 8.
    pub clean_tolerance: f64,
    /// Fraction of background pixels that are noise at which the clean-background score reaches 0.
    /// Default 0.05.
    pub noise_zero: f64,
}

impl Default for TasteConfig {
    fn default() -> Self {
        Self {
            border_margin: 2,
            balance_full: 0.12,
            balance_zero: 0.32,
            clean_tolerance: 8.0,
            noise_zero: 0.05,
        }
    }
}

impl TasteConfig {
    /// Checks the thresholds are ordered and positive.
    pub fn validate(&self) -> Result<()> {
        if !(0.0 <= self.balance_full && self.balance_full < self.balance_zero) {
            return Err(Error::config(
                "taste.balance_full",
                format!(
                    "must be >= 0 and below taste.balance_zero ({}), got {}",
                    self.balance_zero, self.balance_full
                ),
            ));
        }
        if self.clean_tolerance.is_nan() || self.clean_tolerance <= 0.0 {
            return Err(Error::config(
                "taste.clean_tolerance",
                format!("must be positive, got {}", self.clean_tolerance),
            ));
        }
        if !(self.noise_zero > 0.0 && self.noise_zero <= 1.0) {
            return Err(Error::config(
                "taste.noise_zero",
                format!("must lie in (0, 1], got {}", self.noise_zero),
            ));
        }
        Ok(())
    }

    /// Whether an item with box `bbox` is clear of the border of a `resolution` image.
    pub fn clear_of_border(&self, bbox: &BBox, resolution: usize) -> bool {
        bbox.border_distance(resolution) >= self.border_margin * scale(resolution)
    }

    /// Balance score for a centre-of-mass offset `d` (fraction of the side).
    pub fn balance_score(&self, d: f64) -> f64 {
        ((self.balance_zero - d) / (self.balance_zero - self.balance_full)).clamp(0.0, 1.0)
    }

    /// Clean-background score for a noise fraction.
    pub fn clean_score(&self, noise_fraction: f64) -> f64 {
        (1.0 - noise_fraction / self.noise_zero).clamp(0.0, 1.0)
    }
}

/// Distance of the centre of mass of `pixels` from the image centre, as a fraction of the side
/// (0 when there are no pixels). Pixel `(x, y)` has its centre at `(x + 0.5, y + 0.5)`.
pub fn balance_offset(pixels: impl IntoIterator<Item = (usize, usize)>, resolution: usize) -> f64 {
    let (mut sx, mut sy, mut n) = (0.0, 0.0, 0usize);
    for (x, y) in pixels {
        sx += x as f64 + 0.5;
        sy += y as f64 + 0.5;
        n += 1;
    }
    if n == 0 {
        return 0.0;
    }
    let c = resolution as f64 / 2.0;
    let (dx, dy) = (sx / n as f64 - c, sy / n as f64 - c);
    (dx * dx + dy * dy).sqrt() / resolution as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_follow_the_documented_ramps() {
        let t = TasteConfig::default();
        t.validate().unwrap();
        assert_eq!(t.balance_score(0.0), 1.0);
        assert_eq!(t.balance_score(0.12), 1.0);
        // Halfway between 0.12 and 0.32.
        assert!((t.balance_score(0.22) - 0.5).abs() < 1e-12);
        assert_eq!(t.balance_score(0.4), 0.0);
        assert_eq!(t.clean_score(0.0), 1.0);
        assert!((t.clean_score(0.01) - 0.8).abs() < 1e-12);
        assert_eq!(t.clean_score(0.2), 0.0);
        // A single pixel at (0, 0) of a 32x32 image: centre (0.5, 0.5), offset 15.5 * sqrt(2) / 32.
        let d = balance_offset([(0, 0)], 32);
        assert!((d - 15.5 * 2f64.sqrt() / 32.0).abs() < 1e-12);
        // Two pixels symmetric about the centre balance exactly.
        assert_eq!(balance_offset([(10, 10), (21, 21)], 32), 0.0);
        let bad = TasteConfig {
            balance_full: 0.5,
            ..TasteConfig::default()
        };
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("taste.balance_full"), "{e}");
    }

    #[test]
    fn border_margin_scales_with_resolution() {
        let t = TasteConfig::default();
        let b = BBox {
            x0: 2,
            y0: 3,
            x1: 10,
            y1: 10,
        };
        assert!(t.clear_of_border(&b, 32));
        // At 64x64 the margin is 4 px.
        assert!(!t.clear_of_border(&b, 64));
    }
}
