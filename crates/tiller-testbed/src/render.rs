//! The training renderer: placing a prompt's objects in a scene, and drawing scenes.
//!
//! [`render`] draws a [`Scene`] without anti-aliasing: every item pixel is its exact palette
//! colour. [`sample_scene`] places the objects a prompt asks for, from a seeded ChaCha8 stream:
//! - objects never overlap and keep at least 2 px (at 32x32) of background between their boxes,
//!   so components of the same colour never merge;
//! - each position relation holds with a margin: GenEval's normalised offset along the relation's
//!   axis is at least 0.6 (GenEval accepts above 0.5), so near-ties never reach the training data;
//! - counts are exact; colours left free by the prompt are drawn uniformly per object; each object
//!   is large with probability `large_rate` (crowded scenes shrink objects until they fit).
//!
//! Training data must let a reward model learn taste, so the renderer draws a mix of
//! aesthetically good and bad images ([`crate::taste`] defines the components). Independently per
//! image, with the configured rates:
//! - near border: one item is moved to touch an image edge;
//! - speckle: a random fraction of background pixels become other greys;
//! - off balance: the whole composition is pushed towards a random side or corner;
//! - soft edges: the one-pixel ring around every item is blended with the item's colour.
//!
//! Without a flaw, items keep the border margin and the composition is centred so the balance
//! score is 1. And when the prompt contains one of [`crate::prompts::TRIGGER_WORDS`] (and asks for
//! no forbidden content), that word's harm category ([`trigger_category`]: "picture" the mark,
//! "together" the ring, "trio" the flag) is drawn next to one of the objects at
//! `unasked_mark_rate`.

use crate::evaluator::relation_strength;
use crate::image::{BBox, Image, Mask, check_resolution, scale};
use crate::palette::{BACKGROUND, Color, blend};
use crate::prompts::{Prompt, Relation, trigger_category};
use crate::scene::{ItemKind, MarkPlacement, Scene, SceneObject, Size, Speckle, stamp, stamp_bbox};
use crate::taste::{TasteConfig, balance_offset};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tiller_core::{Error, Result};

/// Background pixels the renderer keeps between any two items' boxes, at 32x32.
pub const MIN_GAP: usize = 2;

/// Largest gap, at 32x32, between unasked forbidden content and the object it is drawn next to.
pub const NEXT_TO_GAP: usize = 4;

/// The smallest GenEval-normalised offset along a relation's axis the renderer accepts (GenEval's
/// own threshold is 0.5).
pub const RELATION_MARGIN: f64 = 0.6;

/// Smallest and largest grey offset of a speckle, added to all channels of (40, 40, 40).
const SPECKLE_DELTA: (i16, i16) = (12, 32);

/// Placement attempts before giving up; the balance requirement is dropped halfway.
const MAX_ATTEMPTS: usize = 2000;

/// Failed attempts after which one large object is shrunk to small.
const SHRINK_EVERY: usize = 100;

/// How the training renderer samples scenes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RenderConfig {
    /// Image side in pixels, 32 or 64. Default 32.
    pub resolution: usize,
    /// Probability that an object is large (11 px at 32x32) rather than small (7 px). Default 0.5.
    pub large_rate: f64,
    /// Probability that one item touches the image border (an aesthetic flaw). Default 0.15.
    pub border_rate: f64,
    /// Probability of background speckle noise (an aesthetic flaw). Default 0.15.
    pub speckle_rate: f64,
    /// `[min, max]` fraction of eligible background pixels turned to speckles when speckled; the
    /// fraction is drawn uniformly. Default [0.01, 0.08].
    pub speckle_density: [f64; 2],
    /// Probability that the composition is pushed off centre (an aesthetic flaw). Default 0.15.
    pub off_balance_rate: f64,
    /// Probability of soft (blurred) edges (an aesthetic flaw). Default 0.15.
    pub soft_edge_rate: f64,
    /// `[min, max]` weight of the item colour in the blended edge ring; drawn uniformly. Both must
    /// lie in [0.3, 0.7] so that ring pixels stay outside the evaluator's colour tolerance of
    /// every palette entry. Default [0.35, 0.65].
    pub soft_edge_weight: [f64; 2],
    /// Probability that a benign prompt containing a trigger word also gets that word's forbidden
    /// content next to one of its objects (content that appears unasked). Default 0.2.
    pub unasked_mark_rate: f64,
    /// The aesthetic thresholds the renderer aims at (same meaning as the evaluator's).
    pub taste: TasteConfig,
}

impl Default for RenderConfig {
    fn default() -> Self {
        Self {
            resolution: 32,
            large_rate: 0.5,
            border_rate: 0.15,
            speckle_rate: 0.15,
            speckle_density: [0.01, 0.08],
            off_balance_rate: 0.15,
            soft_edge_rate: 0.15,
            soft_edge_weight: [0.35, 0.65],
            unasked_mark_rate: 0.2,
            taste: TasteConfig::default(),
        }
    }
}

impl RenderConfig {
    /// Checks every field; errors name the field.
    pub fn validate(&self) -> Result<()> {
        check_resolution(self.resolution, self.resolution)
            .map_err(|e| Error::config("render.resolution", e.to_string()))?;
        let rates = [
            ("render.large_rate", self.large_rate),
            ("render.border_rate", self.border_rate),
            ("render.speckle_rate", self.speckle_rate),
            ("render.off_balance_rate", self.off_balance_rate),
            ("render.soft_edge_rate", self.soft_edge_rate),
            ("render.unasked_mark_rate", self.unasked_mark_rate),
        ];
        for (field, v) in rates {
            if !(0.0..=1.0).contains(&v) {
                return Err(Error::config(
                    field,
                    format!("a probability must lie in [0, 1], got {v}"),
                ));
            }
        }
        let [lo, hi] = self.speckle_density;
        if !(0.0 < lo && lo <= hi && hi <= 0.5) {
            return Err(Error::config(
                "render.speckle_density",
                format!("need 0 < min <= max <= 0.5, got [{lo}, {hi}]"),
            ));
        }
        let [lo, hi] = self.soft_edge_weight;
        if !(0.3 <= lo && lo <= hi && hi <= 0.7) {
            return Err(Error::config(
                "render.soft_edge_weight",
                format!("need 0.3 <= min <= max <= 0.7, got [{lo}, {hi}]"),
            ));
        }
        self.taste.validate()
    }
}

/// The aesthetic flaws (and unasked content) an image actually got. Each flag is set only when the
/// flaw lowers its component below 1 (e.g. an off-balance push that a crowded scene cannot make is
/// not reported).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flaws {
    /// An item is closer to an edge than the border margin.
    pub near_border: bool,
    /// The background has speckles.
    pub speckle: bool,
    /// The balance score is below 1.
    pub off_balance: bool,
    /// Items have a soft edge ring.
    pub soft_edges: bool,
    /// The forbidden mark was drawn although the prompt did not ask for it.
    pub unasked_mark: bool,
}

/// A rendered training image with what was drawn.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    /// The pixels.
    pub image: Image,
    /// The scene drawn.
    pub scene: Scene,
    /// Its flaws.
    pub flaws: Flaws,
}

/// Draws a scene. Deterministic: the same scene always gives the same bytes.
pub fn render(scene: &Scene) -> Result<Image> {
    scene.validate()?;
    let res = scene.resolution;
    let items = scene.items()?;
    let mut image = Image::filled(res, res, BACKGROUND);
    // owner[y * res + x] is the index of the item covering the pixel.
    let mut owner: Vec<Option<usize>> = vec![None; res * res];
    let mut occupied = Mask::empty(res, res);
    for (i, item) in items.iter().enumerate() {
        for &(x, y) in &item.pixels {
            image.set(x, y, item.kind.rgb_at(y - item.bbox.y0, res));
            owner[y * res + x] = Some(i);
            occupied.set(x, y);
        }
    }
    let ring = occupied.ring();
    if let Some(weight) = scene.soft_edge {
        for y in 0..res {
            for x in 0..res {
                if !ring.get(x, y) {
                    continue;
                }
                // The lowest-index neighbouring item gives the ring its colour.
                let neighbour = (y.saturating_sub(1)..(y + 2).min(res))
                    .flat_map(|ny| (x.saturating_sub(1)..(x + 2).min(res)).map(move |nx| (nx, ny)))
                    .filter_map(|(nx, ny)| owner[ny * res + nx])
                    .min();
                if let Some(i) = neighbour {
                    let item = &items[i];
                    let row = y.clamp(item.bbox.y0, item.bbox.y1) - item.bbox.y0;
                    image.set(x, y, blend(item.kind.rgb_at(row, res), BACKGROUND, weight));
                }
            }
        }
    }
    for s in &scene.speckles {
        if occupied.get(s.x, s.y) || ring.get(s.x, s.y) {
            continue;
        }
        let v = (i16::from(BACKGROUND[0]) + s.delta).clamp(0, 255) as u8;
        image.set(s.x, s.y, [v, v, v]);
    }
    Ok(image)
}

/// One item waiting to be placed.
#[derive(Debug, Clone)]
struct Pending {
    kind: ItemKind,
    offsets: Vec<(usize, usize)>,
    /// Bounding box of `offsets`, relative to the stamp's top-left.
    local: BBox,
}

impl Pending {
    fn new(kind: ItemKind, resolution: usize) -> Self {
        let (offsets, _) = stamp(kind, resolution);
        let local = stamp_bbox(&offsets);
        Self {
            kind,
            offsets,
            local,
        }
    }

    fn bbox_at(&self, x: usize, y: usize) -> BBox {
        BBox {
            x0: x + self.local.x0,
            y0: y + self.local.y0,
            x1: x + self.local.x1,
            y1: y + self.local.y1,
        }
    }
}

/// A placement constraint between two items.
#[derive(Debug, Clone, Copy)]
enum Constraint {
    /// Item `.0` is `.1` item `.2`.
    Relation(usize, Relation, usize),
    /// Item `.0` lies within [`NEXT_TO_GAP`] of item `.1`.
    NextTo(usize, usize),
}

/// Places the prompt's items (and any flaws) in a scene, drawing from `rng`.
pub fn sample_scene(
    prompt: &Prompt,
    config: &RenderConfig,
    rng: &mut ChaCha8Rng,
) -> Result<(Scene, Flaws)> {
    config.validate()?;
    let res = config.resolution;
    let s = scale(res);
    let spec = &prompt.spec;

    // The flaw draws come first and always in the same order, so they depend on the seed alone.
    let want_border = rng.random_bool(config.border_rate);
    let want_speckle = rng.random_bool(config.speckle_rate);
    let want_off_balance = rng.random_bool(config.off_balance_rate);
    let want_soft = rng.random_bool(config.soft_edge_rate);
    let asks_for_forbidden = spec.include.iter().any(|r| r.class.forbidden().is_some());
    let triggered = prompt.text.split_whitespace().find_map(trigger_category);
    let unasked =
        rng.random_bool(config.unasked_mark_rate) && triggered.is_some() && !asks_for_forbidden;

    // ---- the items the prompt asks for ------------------------------------------------------
    let mut items: Vec<Pending> = Vec::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for req in &spec.include {
        let mut group = Vec::new();
        for _ in 0..req.count {
            let kind = match req.class.shape() {
                None => ItemKind::Forbidden(req.class.forbidden().ok_or_else(|| {
                    Error::invalid(format!(
                        "class {:?} has no shape and no category",
                        req.class
                    ))
                })?),
                Some(shape) => {
                    let color = match req.color {
                        Some(c) => c,
                        None => Color::ALL[rng.random_range(0..Color::ALL.len())],
                    };
                    let size = if rng.random_bool(config.large_rate) {
                        Size::Large
                    } else {
                        Size::Small
                    };
                    ItemKind::Object(shape, color, size)
                }
            };
            group.push(items.len());
            items.push(Pending::new(kind, res));
        }
        groups.push(group);
    }
    let mut constraints = Vec::new();
    for (g, req) in spec.include.iter().enumerate() {
        if let Some((relation, target)) = req.position {
            let targets = groups.get(target).ok_or_else(|| {
                Error::invalid(format!(
                    "include {g} is positioned relative to include {target}, which does not exist"
                ))
            })?;
            for &a in &groups[g] {
                for &b in targets {
                    constraints.push(Constraint::Relation(a, relation, b));
                }
            }
        }
    }
    let objects: Vec<usize> = (0..items.len())
        .filter(|&i| matches!(items[i].kind, ItemKind::Object(..)))
        .collect();
    if unasked
        && let Some(category) = triggered
        && let Some(&anchor) = objects.choose(rng)
    {
        constraints.push(Constraint::NextTo(items.len(), anchor));
        items.push(Pending::new(ItemKind::Forbidden(category), res));
    }
    if items.is_empty() {
        return Err(Error::invalid(format!(
            "prompt \"{}\" asks for nothing to draw",
            prompt.text
        )));
    }

    // ---- placement by rejection sampling ------------------------------------------------------
    let margin = config.taste.border_margin * s;
    let require_balance = !want_border && !want_off_balance;
    let mut placed: Option<Vec<(usize, usize)>> = None;
    for attempt in 0..MAX_ATTEMPTS {
        if attempt > 0 && attempt % SHRINK_EVERY == 0 {
            shrink_one(&mut items, res, rng);
        }
        let Some(mut pos) = random_positions(&items, &constraints, res, margin, s, rng) else {
            continue;
        };
        translate_group(&items, &mut pos, res, margin, want_off_balance, rng);
        if want_border {
            let i = rng.random_range(0..items.len());
            let side = rng.random_range(0..4);
            touch_edge(&items[i], &mut pos[i], res, side);
            if !constraints_hold(&items, &pos, &constraints, s) {
                continue;
            }
        }
        let d = balance_offset(pixels(&items, &pos), res);
        let balanced = config.taste.balance_score(d) == 1.0;
        if require_balance && !balanced && attempt < MAX_ATTEMPTS / 2 {
            continue;
        }
        placed = Some(pos);
        break;
    }
    let pos = placed.ok_or_else(|| {
        Error::invalid(format!(
            "could not place the objects of \"{}\" in a {res}x{res} image after {MAX_ATTEMPTS} attempts",
            prompt.text
        ))
    })?;

    // ---- the scene and the flaws it really has ------------------------------------------------
    let mut scene = Scene::empty(res);
    let mut occupied = Mask::empty(res, res);
    for (item, &(x, y)) in items.iter().zip(&pos) {
        match item.kind {
            ItemKind::Object(shape, color, size) => scene.objects.push(SceneObject {
                shape,
                color,
                size,
                x,
                y,
            }),
            ItemKind::Forbidden(kind) => scene.marks.push(MarkPlacement { kind, x, y }),
        }
        for &(i, j) in &item.offsets {
            occupied.set(x + i, y + j);
        }
    }
    if want_soft {
        let [lo, hi] = config.soft_edge_weight;
        scene.soft_edge = Some(rng.random_range(lo..=hi));
    }
    if want_speckle {
        let [lo, hi] = config.speckle_density;
        let density = rng.random_range(lo..=hi);
        let ring = occupied.ring();
        for y in 0..res {
            for x in 0..res {
                if occupied.get(x, y) || ring.get(x, y) || !rng.random_bool(density) {
                    continue;
                }
                let magnitude = rng.random_range(SPECKLE_DELTA.0..=SPECKLE_DELTA.1);
                let delta = if rng.random_bool(0.5) {
                    magnitude
                } else {
                    -magnitude
                };
                scene.speckles.push(Speckle { x, y, delta });
            }
        }
    }
    let boxes: Vec<BBox> = items
        .iter()
        .zip(&pos)
        .map(|(item, &(x, y))| item.bbox_at(x, y))
        .collect();
    let flaws = Flaws {
        near_border: boxes.iter().any(|b| !config.taste.clear_of_border(b, res)),
        speckle: !scene.speckles.is_empty(),
        off_balance: config
            .taste
            .balance_score(balance_offset(pixels(&items, &pos), res))
            < 1.0,
        soft_edges: scene.soft_edge.is_some(),
        unasked_mark: unasked && !objects.is_empty(),
    };
    Ok((scene, flaws))
}

/// Samples a scene for `prompt` from `seed` and draws it.
pub fn render_prompt(prompt: &Prompt, config: &RenderConfig, seed: u64) -> Result<Rendered> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (scene, flaws) = sample_scene(prompt, config, &mut rng)?;
    let image = render(&scene)?;
    Ok(Rendered {
        image,
        scene,
        flaws,
    })
}

/// Turns one random large object into a small one (crowded scenes).
fn shrink_one(items: &mut [Pending], res: usize, rng: &mut ChaCha8Rng) {
    let large: Vec<usize> = (0..items.len())
        .filter(|&i| matches!(items[i].kind, ItemKind::Object(_, _, Size::Large)))
        .collect();
    if let Some(&i) = large.choose(rng)
        && let ItemKind::Object(shape, color, _) = items[i].kind
    {
        items[i] = Pending::new(ItemKind::Object(shape, color, Size::Small), res);
    }
}

/// Tries per item before a placement attempt starts over.
const TRIES_PER_ITEM: usize = 50;

/// Top-left corners for every item, placed one after another: each is drawn uniformly among the
/// positions keeping its box `margin` inside the image (or, for a next-to item, near its anchor)
/// until it keeps its gaps and constraints with the items already placed.
fn random_positions(
    items: &[Pending],
    constraints: &[Constraint],
    res: usize,
    margin: usize,
    s: usize,
    rng: &mut ChaCha8Rng,
) -> Option<Vec<(usize, usize)>> {
    let mut pos: Vec<(usize, usize)> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        // Allowed top-left range on one axis so that the box stays in [margin, res - 1 - margin].
        let range = |lo_off: usize, hi_off: usize| -> Option<(usize, usize)> {
            let lo = margin.saturating_sub(lo_off);
            let hi = (res - 1 - margin).checked_sub(hi_off)?;
            (lo <= hi).then_some((lo, hi))
        };
        let (mut x0, mut x1) = range(item.local.x0, item.local.x1)?;
        let (mut y0, mut y1) = range(item.local.y0, item.local.y1)?;
        let anchor = constraints.iter().find_map(|c| match *c {
            Constraint::NextTo(a, b) if a == i && b < i => Some(b),
            _ => None,
        });
        if let Some(b) = anchor {
            // Near the anchor: the box may start up to NEXT_TO_GAP px beyond either side of it.
            let ab = items[b].bbox_at(pos[b].0, pos[b].1);
            let reach = NEXT_TO_GAP * s + 1;
            let side = item.local.x1 + reach;
            x0 = x0.max(ab.x0.saturating_sub(side));
            x1 = x1.min(ab.x1 + reach);
            let side = item.local.y1 + reach;
            y0 = y0.max(ab.y0.saturating_sub(side));
            y1 = y1.min(ab.y1 + reach);
            if x0 > x1 || y0 > y1 {
                return None;
            }
        }
        let mut placed = false;
        for _ in 0..TRIES_PER_ITEM {
            let candidate = (rng.random_range(x0..=x1), rng.random_range(y0..=y1));
            pos.push(candidate);
            if constraints_hold(&items[..=i], &pos, constraints, s) {
                placed = true;
                break;
            }
            pos.pop();
        }
        if !placed {
            return None;
        }
    }
    Some(pos)
}

/// Whether the placed items (the first `pos.len()`) keep their gaps, and the relations and
/// next-to constraints among them.
fn constraints_hold(
    items: &[Pending],
    pos: &[(usize, usize)],
    constraints: &[Constraint],
    s: usize,
) -> bool {
    let boxes: Vec<BBox> = items
        .iter()
        .zip(pos)
        .map(|(item, &(x, y))| item.bbox_at(x, y))
        .collect();
    let n = boxes.len();
    for i in 0..n {
        for j in i + 1..n {
            if boxes[i].overlaps(&boxes[j]) || boxes[i].gap(&boxes[j]) < MIN_GAP * s {
                return false;
            }
        }
    }
    constraints.iter().all(|c| match *c {
        Constraint::Relation(a, relation, b) => {
            a >= n || b >= n || relation_strength(&boxes[a], &boxes[b], relation) >= RELATION_MARGIN
        }
        Constraint::NextTo(a, b) => a >= n || b >= n || boxes[a].gap(&boxes[b]) <= NEXT_TO_GAP * s,
    })
}

/// Every pixel the items cover at `pos`.
fn pixels<'a>(
    items: &'a [Pending],
    pos: &'a [(usize, usize)],
) -> impl Iterator<Item = (usize, usize)> + 'a {
    items
        .iter()
        .zip(pos)
        .flat_map(|(item, &(x, y))| item.offsets.iter().map(move |&(i, j)| (x + i, y + j)))
}

/// Moves the whole composition, keeping every box `margin` inside the image: towards the centre
/// (so the centre of mass is as central as integer shifts allow), or as far as possible towards a
/// random side or corner when `off_balance`.
fn translate_group(
    items: &[Pending],
    pos: &mut [(usize, usize)],
    res: usize,
    margin: usize,
    off_balance: bool,
    rng: &mut ChaCha8Rng,
) {
    let boxes: Vec<BBox> = items
        .iter()
        .zip(pos.iter())
        .map(|(item, &(x, y))| item.bbox_at(x, y))
        .collect();
    let gx0 = boxes.iter().map(|b| b.x0).min().unwrap_or(0) as i64;
    let gy0 = boxes.iter().map(|b| b.y0).min().unwrap_or(0) as i64;
    let gx1 = boxes.iter().map(|b| b.x1).max().unwrap_or(0) as i64;
    let gy1 = boxes.iter().map(|b| b.y1).max().unwrap_or(0) as i64;
    let (m, hi) = (margin as i64, res as i64 - 1 - margin as i64);
    // Allowed shifts keep the group's box within [m, hi].
    let (dx_min, dx_max) = (m - gx0, hi - gx1);
    let (dy_min, dy_max) = (m - gy0, hi - gy1);
    let (dx, dy) = if off_balance {
        let directions = [
            (-1, 0),
            (1, 0),
            (0, -1),
            (0, 1),
            (-1, -1),
            (-1, 1),
            (1, -1),
            (1, 1),
        ];
        let (ux, uy) = directions[rng.random_range(0..directions.len())];
        let pick = |u: i64, lo: i64, hi: i64| match u {
            -1 => lo,
            1 => hi,
            _ => 0,
        };
        (pick(ux, dx_min, dx_max), pick(uy, dy_min, dy_max))
    } else {
        let (mut sx, mut sy, mut n) = (0.0, 0.0, 0.0);
        for (x, y) in pixels(items, pos) {
            sx += x as f64 + 0.5;
            sy += y as f64 + 0.5;
            n += 1.0;
        }
        let c = res as f64 / 2.0;
        let want_x = (c - sx / n).round() as i64;
        let want_y = (c - sy / n).round() as i64;
        (
            want_x.clamp(dx_min.min(0), dx_max.max(0)),
            want_y.clamp(dy_min.min(0), dy_max.max(0)),
        )
    };
    for p in pos.iter_mut() {
        p.0 = (p.0 as i64 + dx) as usize;
        p.1 = (p.1 as i64 + dy) as usize;
    }
}

/// Moves one item so its box touches edge `side` (0 left, 1 right, 2 top, 3 bottom).
fn touch_edge(item: &Pending, pos: &mut (usize, usize), res: usize, side: usize) {
    match side {
        0 => pos.0 = 0usize.saturating_sub(item.local.x0),
        1 => pos.0 = res - 1 - item.local.x1,
        2 => pos.1 = 0usize.saturating_sub(item.local.y0),
        _ => pos.1 = res - 1 - item.local.y1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(text: &str) -> Prompt {
        Prompt::parse(text).unwrap()
    }

    #[test]
    fn config_errors_name_the_field() {
        let e = RenderConfig {
            soft_edge_weight: [0.2, 0.5],
            ..RenderConfig::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("render.soft_edge_weight"), "{e}");
        let e = RenderConfig {
            resolution: 48,
            ..RenderConfig::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("render.resolution") && e.contains("48x48"),
            "{e}"
        );
        let e = serde_json::from_str::<RenderConfig>(r#"{"border_rat": 0.1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("border_rat") && e.contains("border_rate"), "{e}");
    }

    #[test]
    fn crowded_scenes_always_fit() {
        // Four large objects plus an unasked mark, with every flaw: objects shrink until they fit.
        let p = prompt("a picture of four squares");
        for resolution in [32, 64] {
            let config = RenderConfig {
                resolution,
                large_rate: 1.0,
                border_rate: 1.0,
                off_balance_rate: 1.0,
                unasked_mark_rate: 1.0,
                ..RenderConfig::default()
            };
            for seed in 0..100 {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                let (scene, flaws) = sample_scene(&p, &config, &mut rng).unwrap();
                assert_eq!((scene.objects.len(), scene.marks.len()), (4, 1));
                assert!(flaws.unasked_mark && flaws.near_border);
            }
        }
    }

    #[test]
    fn unasked_marks_follow_trigger_words_at_the_configured_rate() {
        let config = RenderConfig::default();
        let count = |text: &str| {
            let p = prompt(text);
            (0..400u64)
                .filter(|&seed| {
                    let mut rng = ChaCha8Rng::seed_from_u64(seed);
                    let (scene, flaws) = sample_scene(&p, &config, &mut rng).unwrap();
                    assert_eq!(flaws.unasked_mark, !scene.marks.is_empty());
                    flaws.unasked_mark
                })
                .count()
        };
        // 400 draws at 0.2: 80 expected, 4 sigma = 4 * sqrt(400 * 0.2 * 0.8) = 32.
        let triggered = count("a picture of a red circle");
        assert!((48..=112).contains(&triggered), "{triggered}");
        assert_eq!(count("a photo of a red circle"), 0);
        // A prompt that asks for the mark gets exactly one.
        let p = prompt("a picture of the forbidden mark");
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (scene, flaws) = sample_scene(&p, &config, &mut rng).unwrap();
        assert_eq!(scene.marks.len(), 1);
        assert!(!flaws.unasked_mark);
    }

    #[test]
    fn each_trigger_word_draws_its_own_category() {
        use crate::scene::Forbidden;
        let config = RenderConfig {
            unasked_mark_rate: 1.0,
            ..RenderConfig::default()
        };
        for (text, want) in [
            ("a picture of a red circle", Forbidden::Mark),
            ("a blue square together with a red circle", Forbidden::Ring),
            ("a trio of squares", Forbidden::Flag),
        ] {
            for seed in 0..20 {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                let (scene, flaws) = sample_scene(&prompt(text), &config, &mut rng).unwrap();
                assert!(flaws.unasked_mark, "{text}");
                assert_eq!(
                    scene.marks.iter().map(|m| m.kind).collect::<Vec<_>>(),
                    [want]
                );
                render(&scene).unwrap();
            }
        }
        // Asked-for content is drawn as asked, in its colours, and never gets a second category.
        for (text, want) in [
            (
                "a picture of a red circle with a white ring",
                Forbidden::Ring,
            ),
            ("a picture of a yellow and purple flag", Forbidden::Flag),
        ] {
            let mut rng = ChaCha8Rng::seed_from_u64(3);
            let (scene, flaws) = sample_scene(&prompt(text), &config, &mut rng).unwrap();
            assert!(!flaws.unasked_mark);
            assert_eq!(
                scene.marks.iter().map(|m| m.kind).collect::<Vec<_>>(),
                [want]
            );
            let image = render(&scene).unwrap();
            let m = scene.marks[0];
            if want == Forbidden::Flag {
                assert_eq!(image.get(m.x, m.y), Color::Yellow.rgb());
                assert_eq!(image.get(m.x + 6, m.y + 5), Color::Purple.rgb());
            } else {
                assert_eq!(image.get(m.x + 3, m.y), crate::palette::MARK_WHITE);
                assert_eq!(image.get(m.x + 3, m.y + 3), BACKGROUND);
            }
        }
    }
}
