//! Scenes: what an image of the Shapes world contains, exactly enough to draw it.
//!
//! A scene is a list of objects (shape, colour, size, position), optional forbidden content of
//! the three harm categories ([`Forbidden`]: the mark, a white X; the ring, a white hollow
//! circle; the flag, a yellow-over-purple patch), and the two image-level flaws the aesthetic components look for (a soft edge ring
//! and background speckles). [`crate::render::render`] turns a scene into pixels; placing objects
//! for a prompt is [`crate::render::sample_scene`]'s job.
//!
//! Geometry, at 32x32 (every length doubles at 64x64):
//! - small objects are 7 px across, large ones 11 px; the forbidden mark is a 7 px X;
//! - a circle covers the pixels whose centre lies within the inscribed circle of its box, a square
//!   its whole box, a triangle (apex up, base along the bottom) the pixels whose centre lies inside
//!   the triangle with corners at the top-middle and the two bottom corners of its box;
//! - the mark's two strokes are the box diagonals, 1 px thick (3 px at 64x64);
//! - the ring covers the pixels whose centre lies at a distance in (r - 1, r] from the centre of
//!   its 7 px box, r = 3.5 (scaled at 64x64): a 1 px circle with an empty middle;
//! - the flag is 7 px wide and 6 px tall, its top 3 rows yellow and its bottom 3 rows purple:
//!   two colours each allowed alone, forbidden together.

use crate::image::{BBox, check_resolution, scale};
use crate::palette::{Color, MARK_WHITE, Rgb};
use serde::{Deserialize, Serialize};
use tiller_core::{Error, Result};

/// An object's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    /// A filled disc.
    Circle,
    /// A filled axis-aligned square.
    Square,
    /// A filled isosceles triangle, apex up.
    Triangle,
}

impl Shape {
    /// All shapes.
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    /// The singular noun ("circle").
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }

    /// The plural noun ("circles").
    pub fn plural(self) -> &'static str {
        match self {
            Shape::Circle => "circles",
            Shape::Square => "squares",
            Shape::Triangle => "triangles",
        }
    }
}

/// An object's size class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    /// 7 px across at 32x32.
    Small,
    /// 11 px across at 32x32.
    Large,
}

impl Size {
    /// Both sizes.
    pub const ALL: [Size; 2] = [Size::Small, Size::Large];

    /// The side of the object's box in pixels at `resolution`.
    pub fn side(self, resolution: usize) -> usize {
        let at_32 = match self {
            Size::Small => 7,
            Size::Large => 11,
        };
        at_32 * scale(resolution)
    }
}

/// The side of the forbidden mark's box at 32x32, in pixels (the ring's and the flag's too).
pub const MARK_SIDE_AT_32: usize = 7;

/// The flag's height at 32x32, in pixels: two stripes of 3.
pub const FLAG_HEIGHT_AT_32: usize = 6;

/// The flag's colours, top stripe then bottom stripe.
pub const FLAG_COLORS: (Color, Color) = (Color::Yellow, Color::Purple);

/// A harm category of the testbed: a kind of forbidden content the base model can be asked (or
/// tricked) into drawing. Each has its own phrasings and trigger word
/// ([`crate::prompts::forbidden_phrases`], [`crate::prompts::trigger_category`]) and its own
/// detector in the gold evaluator.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Forbidden {
    /// The forbidden mark: a white X (a glyph).
    #[default]
    Mark,
    /// The forbidden symbol: a white ring (a second glyph, hollow where the mark is crossed).
    Ring,
    /// The forbidden colour combination: a yellow stripe over a purple one.
    Flag,
}

impl Forbidden {
    /// Every category, in the order reports list them.
    pub const ALL: [Forbidden; 3] = [Forbidden::Mark, Forbidden::Ring, Forbidden::Flag];

    /// The category's name, as prompts' metadata and reports write it.
    pub fn name(self) -> &'static str {
        match self {
            Forbidden::Mark => "mark",
            Forbidden::Ring => "ring",
            Forbidden::Flag => "flag",
        }
    }

    /// The category named `name`, or an error listing the names.
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == name)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "unknown harm category \"{name}\"; the testbed's are: {}",
                    Self::ALL.map(Forbidden::name).join(", ")
                ))
            })
    }
}

/// One object in a scene.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SceneObject {
    /// The shape drawn.
    pub shape: Shape,
    /// The palette colour it is filled with.
    pub color: Color,
    /// Its size class (sets the box side).
    pub size: Size,
    /// Column of the box's left edge, in pixels.
    pub x: usize,
    /// Row of the box's top edge, in pixels.
    pub y: usize,
}

/// One piece of forbidden content in a scene.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MarkPlacement {
    /// Its category; scenes written before there were several read as the mark.
    #[serde(default)]
    pub kind: Forbidden,
    /// Column of the box's left edge, in pixels.
    pub x: usize,
    /// Row of the box's top edge, in pixels.
    pub y: usize,
}

/// A background pixel shifted to a grey other than the background (a speckle of noise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Speckle {
    /// Column, in pixels.
    pub x: usize,
    /// Row, in pixels.
    pub y: usize,
    /// Added to all three channels of the background (40, 40, 40); non-zero.
    pub delta: i16,
}

/// Everything needed to draw one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scene {
    /// Side of the square image in pixels: 32 or 64.
    pub resolution: usize,
    /// Objects, drawn in order.
    pub objects: Vec<SceneObject>,
    /// Forbidden content, drawn after the objects.
    pub marks: Vec<MarkPlacement>,
    /// When set, every background pixel 8-adjacent to an object or mark is blended towards that
    /// item's colour with this weight in (0, 1): a soft, blurred edge instead of a crisp one.
    pub soft_edge: Option<f64>,
    /// Background pixels shifted to another grey; speckles over an item or its edge ring are not
    /// drawn.
    pub speckles: Vec<Speckle>,
}

/// What an item of a scene is: an object or forbidden content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemKind {
    /// An object of this shape, colour and size.
    Object(Shape, Color, Size),
    /// Forbidden content of this category.
    Forbidden(Forbidden),
}

impl ItemKind {
    /// The colour of the item's pixel at row `j` of its box (0 at the top), at `resolution`.
    pub fn rgb_at(self, j: usize, resolution: usize) -> Rgb {
        match self {
            ItemKind::Object(_, color, _) => color.rgb(),
            ItemKind::Forbidden(Forbidden::Mark | Forbidden::Ring) => MARK_WHITE,
            ItemKind::Forbidden(Forbidden::Flag) => {
                if j < FLAG_HEIGHT_AT_32 / 2 * scale(resolution) {
                    FLAG_COLORS.0.rgb()
                } else {
                    FLAG_COLORS.1.rgb()
                }
            }
        }
    }
}

/// The pixel offsets, relative to the top-left of its box, that an item covers at `resolution`,
/// and the side of its box.
pub fn stamp(kind: ItemKind, resolution: usize) -> (Vec<(usize, usize)>, usize) {
    let s = scale(resolution);
    match kind {
        ItemKind::Object(shape, _, size) => {
            let d = size.side(resolution);
            let half = d as f64 / 2.0;
            let mut px = Vec::new();
            for j in 0..d {
                for i in 0..d {
                    let (xc, yc) = (i as f64 + 0.5, j as f64 + 0.5);
                    let inside = match shape {
                        Shape::Square => true,
                        Shape::Circle => (xc - half).powi(2) + (yc - half).powi(2) <= half * half,
                        // The half-width grows linearly from 0 at the top edge to d/2 at the bottom.
                        Shape::Triangle => (xc - half).abs() <= yc / 2.0,
                    };
                    if inside {
                        px.push((i, j));
                    }
                }
            }
            (px, d)
        }
        ItemKind::Forbidden(Forbidden::Ring) => {
            let m = MARK_SIDE_AT_32 * s;
            let r = m as f64 / 2.0;
            let mut px = Vec::new();
            for j in 0..m {
                for i in 0..m {
                    let d = ((i as f64 + 0.5 - r).powi(2) + (j as f64 + 0.5 - r).powi(2)).sqrt();
                    if d <= r && d > r - s as f64 {
                        px.push((i, j));
                    }
                }
            }
            (px, m)
        }
        ItemKind::Forbidden(Forbidden::Flag) => {
            let (w, h) = (MARK_SIDE_AT_32 * s, FLAG_HEIGHT_AT_32 * s);
            let px = (0..h).flat_map(|j| (0..w).map(move |i| (i, j))).collect();
            (px, w)
        }
        ItemKind::Forbidden(Forbidden::Mark) => {
            let m = MARK_SIDE_AT_32 * s;
            let mut px = Vec::new();
            for j in 0..m {
                for i in 0..m {
                    let on_main = i.abs_diff(j) < s;
                    let on_anti = (i + j).abs_diff(m - 1) < s;
                    if on_main || on_anti {
                        px.push((i, j));
                    }
                }
            }
            (px, m)
        }
    }
}

/// The bounding box of a stamp's pixels, relative to its box's top-left.
pub fn stamp_bbox(pixels: &[(usize, usize)]) -> BBox {
    let mut b = BBox {
        x0: usize::MAX,
        y0: usize::MAX,
        x1: 0,
        y1: 0,
    };
    for &(x, y) in pixels {
        b.x0 = b.x0.min(x);
        b.y0 = b.y0.min(y);
        b.x1 = b.x1.max(x);
        b.y1 = b.y1.max(y);
    }
    b
}

/// One placed item: what it is and the absolute pixels it covers.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacedItem {
    /// Object or mark.
    pub kind: ItemKind,
    /// Absolute `(x, y)` pixels covered.
    pub pixels: Vec<(usize, usize)>,
    /// Bounding box of `pixels`.
    pub bbox: BBox,
}

impl Scene {
    /// An empty, clean scene at `resolution`.
    pub fn empty(resolution: usize) -> Self {
        Self {
            resolution,
            objects: Vec::new(),
            marks: Vec::new(),
            soft_edge: None,
            speckles: Vec::new(),
        }
    }

    /// Every item (objects first, then marks) with the pixels it covers; an error when the
    /// resolution is unsupported or an item sticks out of the image.
    pub fn items(&self) -> Result<Vec<PlacedItem>> {
        check_resolution(self.resolution, self.resolution)?;
        let kinds = self
            .objects
            .iter()
            .map(|o| (ItemKind::Object(o.shape, o.color, o.size), o.x, o.y))
            .chain(
                self.marks
                    .iter()
                    .map(|m| (ItemKind::Forbidden(m.kind), m.x, m.y)),
            );
        let mut out = Vec::new();
        for (kind, x, y) in kinds {
            let (offsets, side) = stamp(kind, self.resolution);
            let b = stamp_bbox(&offsets);
            if x + b.x1 >= self.resolution || y + b.y1 >= self.resolution {
                return Err(Error::invalid(format!(
                    "{kind:?} at ({x}, {y}) with side {side} does not fit in a {r}x{r} image",
                    r = self.resolution
                )));
            }
            let pixels: Vec<_> = offsets.iter().map(|&(i, j)| (x + i, y + j)).collect();
            let bbox = BBox {
                x0: x + b.x0,
                y0: y + b.y0,
                x1: x + b.x1,
                y1: y + b.y1,
            };
            out.push(PlacedItem { kind, pixels, bbox });
        }
        Ok(out)
    }

    /// Checks the scene's invariants: a supported resolution, items inside the image, a soft-edge
    /// weight in (0, 1), speckles inside the image with a non-zero delta.
    pub fn validate(&self) -> Result<()> {
        self.items()?;
        if let Some(w) = self.soft_edge
            && !(w > 0.0 && w < 1.0)
        {
            return Err(Error::invalid(format!(
                "soft-edge weight {w} must lie strictly between 0 and 1"
            )));
        }
        for s in &self.speckles {
            if s.x >= self.resolution || s.y >= self.resolution || s.delta == 0 {
                return Err(Error::invalid(format!(
                    "speckle {s:?} must lie inside the {r}x{r} image with a non-zero delta",
                    r = self.resolution
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::SUPPORTED_RESOLUTIONS;

    fn fill_ratio(kind: ItemKind, res: usize) -> f64 {
        let (px, _) = stamp(kind, res);
        let b = stamp_bbox(&px);
        px.len() as f64 / (b.width() * b.height()) as f64
    }

    #[test]
    fn stamp_areas_match_hand_counts() {
        use Color::Red;
        // Circle of diameter 7: rows |dy| = 0, 1, 2, 3 cover 7, 7, 5, 3 pixels -> 7 + 2(7 + 5 + 3) = 37.
        let (c, d) = stamp(ItemKind::Object(Shape::Circle, Red, Size::Small), 32);
        assert_eq!((c.len(), d), (37, 7));
        // Triangle of side 7: rows cover 1, 1, 3, 3, 5, 5, 7 pixels = 25.
        let (t, _) = stamp(ItemKind::Object(Shape::Triangle, Red, Size::Small), 32);
        assert_eq!(t.len(), 25);
        let (s, d) = stamp(ItemKind::Object(Shape::Square, Red, Size::Large), 32);
        assert_eq!((s.len(), d), (121, 11));
        // The X: two diagonals of 7 sharing the centre pixel.
        let (m, d) = stamp(ItemKind::Forbidden(Forbidden::Mark), 32);
        assert_eq!((m.len(), d), (13, 7));
        // The ring: rows 0..7 cover 3, 2, 2, 2, 2, 2, 3 pixels = 16, none in the middle.
        let (r, d) = stamp(ItemKind::Forbidden(Forbidden::Ring), 32);
        assert_eq!((r.len(), d), (16, 7));
        assert!(!r.contains(&(3, 3)) && r.contains(&(3, 0)) && r.contains(&(0, 3)));
        // The flag: a full 7x6 block, yellow rows 0..3, purple rows 3..6.
        let flag = ItemKind::Forbidden(Forbidden::Flag);
        let (f, d) = stamp(flag, 32);
        assert_eq!((f.len(), d, stamp_bbox(&f).height()), (42, 7, 6));
        assert_eq!(flag.rgb_at(2, 32), Color::Yellow.rgb());
        assert_eq!(flag.rgb_at(3, 32), Color::Purple.rgb());
        assert_eq!(flag.rgb_at(5, 64), Color::Yellow.rgb());
        let (f, _) = stamp(flag, 64);
        assert_eq!(f.len(), 14 * 12);
        // At 64x64 the strokes are 3 px wide: 14 + 2 * 13 per diagonal, minus the 4 shared pixels of
        // the central crossing (|i - j| < 2 and |i + j - 13| < 2 meet in a 2x2 block).
        let (m, d) = stamp(ItemKind::Forbidden(Forbidden::Mark), 64);
        assert_eq!(d, 14);
        assert_eq!(m.len(), 2 * (14 + 2 * 13) - 4);
    }

    #[test]
    fn fill_ratios_are_near_the_ideal_shapes() {
        for res in SUPPORTED_RESOLUTIONS {
            for size in Size::ALL {
                let c = fill_ratio(ItemKind::Object(Shape::Circle, Color::Red, size), res);
                let s = fill_ratio(ItemKind::Object(Shape::Square, Color::Red, size), res);
                let t = fill_ratio(ItemKind::Object(Shape::Triangle, Color::Red, size), res);
                assert!((c - std::f64::consts::FRAC_PI_4).abs() < 0.05, "circle {c}");
                assert_eq!(s, 1.0);
                assert!((t - 0.5).abs() < 0.1, "triangle {t}");
            }
        }
    }

    #[test]
    fn items_outside_the_image_are_rejected() {
        let mut scene = Scene::empty(32);
        scene.objects.push(SceneObject {
            shape: Shape::Square,
            color: Color::Blue,
            size: Size::Large,
            x: 22,
            y: 0,
        });
        let e = scene.validate().unwrap_err().to_string();
        assert!(e.contains("(22, 0)") && e.contains("32x32"), "{e}");
        scene.objects[0].x = 21;
        scene.validate().unwrap();
        scene.soft_edge = Some(1.0);
        assert!(scene.validate().is_err());
        assert!(Scene::empty(48).validate().is_err());
    }
}
