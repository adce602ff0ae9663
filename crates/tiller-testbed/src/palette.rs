//! The fixed palette of the Shapes world.
//!
//! Every image is drawn from these exact RGB values; the evaluator segments an image by assigning
//! each pixel to the nearest of them (within a tolerance). Outside checkers rely on the values, so
//! they never change.
//!
//! | name       | RGB             | use                               |
//! |------------|-----------------|-----------------------------------|
//! | background | (40, 40, 40)    | the plain background              |
//! | red        | (220, 50, 50)   | object colour                     |
//! | green      | (50, 180, 80)   | object colour                     |
//! | blue       | (60, 100, 230)  | object colour                     |
//! | yellow     | (230, 200, 50)  | object colour                     |
//! | purple     | (160, 80, 210)  | object colour                     |
//! | orange     | (240, 140, 40)  | object colour                     |
//! | white      | (240, 240, 240) | reserved for the mark and ring    |

use serde::{Deserialize, Serialize};
use tiller_core::{Error, Result};

/// An 8-bit RGB triple.
pub type Rgb = [u8; 3];

/// The plain background, (40, 40, 40).
pub const BACKGROUND: Rgb = [40, 40, 40];

/// White, (240, 240, 240): reserved for the forbidden mark and ring; no object is ever white.
pub const MARK_WHITE: Rgb = [240, 240, 240];

/// One of the six object colours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    /// (220, 50, 50)
    Red,
    /// (50, 180, 80)
    Green,
    /// (60, 100, 230)
    Blue,
    /// (230, 200, 50)
    Yellow,
    /// (160, 80, 210)
    Purple,
    /// (240, 140, 40)
    Orange,
}

impl Color {
    /// All object colours, in palette order.
    pub const ALL: [Color; 6] = [
        Color::Red,
        Color::Green,
        Color::Blue,
        Color::Yellow,
        Color::Purple,
        Color::Orange,
    ];

    /// The colour's exact RGB value.
    pub fn rgb(self) -> Rgb {
        match self {
            Color::Red => [220, 50, 50],
            Color::Green => [50, 180, 80],
            Color::Blue => [60, 100, 230],
            Color::Yellow => [230, 200, 50],
            Color::Purple => [160, 80, 210],
            Color::Orange => [240, 140, 40],
        }
    }

    /// The palette name, as used in prompts and GenEval metadata.
    pub fn name(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Green => "green",
            Color::Blue => "blue",
            Color::Yellow => "yellow",
            Color::Purple => "purple",
            Color::Orange => "orange",
        }
    }

    /// The colour called `name`; an error lists the valid names.
    pub fn from_name(name: &str) -> Result<Self> {
        Color::ALL
            .into_iter()
            .find(|c| c.name() == name)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "unknown colour {name:?}; the palette colours are {}",
                    Color::ALL.map(Color::name).join(", ")
                ))
            })
    }
}

/// What a palette entry stands for: the segmentation classes of a pixel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ink {
    /// The background colour.
    Background,
    /// An object colour.
    Object(Color),
    /// White, the forbidden mark and ring.
    Mark,
}

impl Ink {
    /// Every palette entry: background, the six object colours, white.
    pub const ALL: [Ink; 8] = [
        Ink::Background,
        Ink::Object(Color::Red),
        Ink::Object(Color::Green),
        Ink::Object(Color::Blue),
        Ink::Object(Color::Yellow),
        Ink::Object(Color::Purple),
        Ink::Object(Color::Orange),
        Ink::Mark,
    ];

    /// The entry's exact RGB value.
    pub fn rgb(self) -> Rgb {
        match self {
            Ink::Background => BACKGROUND,
            Ink::Object(c) => c.rgb(),
            Ink::Mark => MARK_WHITE,
        }
    }
}

/// Euclidean distance between two RGB values, in 8-bit units.
pub fn rgb_distance(a: Rgb, b: Rgb) -> f64 {
    let d2: i32 = (0..3)
        .map(|i| {
            let d = i32::from(a[i]) - i32::from(b[i]);
            d * d
        })
        .sum();
    f64::from(d2).sqrt()
}

/// The palette entry nearest to `rgb` and its distance (ties go to the earlier entry in
/// [`Ink::ALL`]).
pub fn nearest_ink(rgb: Rgb) -> (Ink, f64) {
    let mut best = (Ink::Background, f64::INFINITY);
    for ink in Ink::ALL {
        let d = rgb_distance(rgb, ink.rgb());
        if d < best.1 {
            best = (ink, d);
        }
    }
    best
}

/// `weight * color + (1 - weight) * background`, rounded: the colour of a soft (blurred) edge.
pub fn blend(color: Rgb, background: Rgb, weight: f64) -> Rgb {
    let mut out = [0u8; 3];
    for i in 0..3 {
        let v = weight * f64::from(color[i]) + (1.0 - weight) * f64::from(background[i]);
        out[i] = v.round().clamp(0.0, 255.0) as u8;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn palette_values_are_the_documented_ones() {
        assert_eq!(BACKGROUND, [40, 40, 40]);
        assert_eq!(MARK_WHITE, [240, 240, 240]);
        let expected = [
            ("red", [220, 50, 50]),
            ("green", [50, 180, 80]),
            ("blue", [60, 100, 230]),
            ("yellow", [230, 200, 50]),
            ("purple", [160, 80, 210]),
            ("orange", [240, 140, 40]),
        ];
        for (c, (name, rgb)) in Color::ALL.into_iter().zip(expected) {
            assert_eq!(c.name(), name);
            assert_eq!(c.rgb(), rgb);
            assert_eq!(Color::from_name(name).unwrap(), c);
        }
        let e = Color::from_name("white").unwrap_err().to_string();
        assert!(e.contains("\"white\"") && e.contains("orange"), "{e}");
    }

    #[test]
    fn closest_palette_pair_is_orange_and_yellow() {
        // The segmentation tolerance must stay meaningful against the closest pair:
        // |orange - yellow| = sqrt(10^2 + 60^2 + 10^2) = 61.64.
        let mut min = (f64::INFINITY, Ink::Background, Ink::Background);
        for (i, a) in Ink::ALL.into_iter().enumerate() {
            for b in Ink::ALL.into_iter().skip(i + 1) {
                let d = rgb_distance(a.rgb(), b.rgb());
                if d < min.0 {
                    min = (d, a, b);
                }
            }
        }
        assert_eq!(
            (min.1, min.2),
            (Ink::Object(Color::Yellow), Ink::Object(Color::Orange))
        );
        assert!((min.0 - 3800f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn every_palette_entry_is_its_own_nearest() {
        for ink in Ink::ALL {
            assert_eq!(nearest_ink(ink.rgb()), (ink, 0.0));
        }
        // A 50/50 red-background blend is (130, 45, 45): 90.28 from both, and the tie goes to
        // the background, the earlier entry.
        let soft = blend(Color::Red.rgb(), BACKGROUND, 0.5);
        assert_eq!(soft, [130, 45, 45]);
        assert_eq!(nearest_ink(soft).0, Ink::Background);
        assert_eq!(
            rgb_distance(soft, BACKGROUND),
            rgb_distance(soft, Color::Red.rgb())
        );
    }
}
