//! Training a reward ensemble from any mix of feedback: pairwise comparisons (with ties), binary
//! likes, 1–5 ratings and reasons (per-factor labels). Every update of a member draws one
//! minibatch of each kind present and sums their losses ([`crate::losses`]), the reasons' factor
//! cross-entropy weighted by `factor_loss_weight`. Each member starts from its own initialisation
//! (the device generator seeded with `seed + member`) and, with `bootstrap`, sees its own
//! resample (with replacement) of every label list: the ensemble's spread is then an estimate of
//! how much the feedback pins the reward down.

use crate::ensemble::{RewardEnsemble, RewardModelConfig};
use crate::images_to_tensor;
use crate::losses::{bradley_terry, factor_bce, logistic, ordinal};
use crate::net::RewardNet;
use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use tiller_core::{Error, Result, SeededRng};
use tiller_diffusion::models::clip::ClipTextModel;
use tiller_engine::optim::{ClipScope, adamw, clip_gradients};
use tiller_testbed::Image;

/// One labelled image with its prompt's token ids.
#[derive(Debug, Clone)]
pub struct FeedbackItem {
    pub ids: Vec<i64>,
    pub image: Image,
    /// Token ids of the prompt that describes the left-right mirrored image equally well (on the
    /// testbed: "left" and "right" swapped, `tiller_testbed::prompts::mirror_prompt`); `None`
    /// when the item must not be mirrored.
    pub mirror_ids: Option<Vec<i64>>,
}

/// `items[a]` versus `items[b]`: `target` is 1 when a is preferred, 0 when b is, 0.5 for a tie.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairLabel {
    pub a: usize,
    pub b: usize,
    pub target: f64,
}

/// All feedback, as indices into `items`.
#[derive(Debug, Clone, Default)]
pub struct FeedbackSet {
    pub items: Vec<FeedbackItem>,
    pub pairs: Vec<PairLabel>,
    /// (item, like).
    pub likes: Vec<(usize, bool)>,
    /// (item, stars in 1..=5).
    pub ratings: Vec<(usize, u8)>,
    /// (item, [(factor index, target in [0, 1])]): 1 when the factor is fine, 0 when a reason says
    /// it is wrong.
    pub reasons: Vec<(usize, Vec<(usize, f64)>)>,
    /// Region marks: the pixels of an item's image that show a factor's problem.
    pub regions: Vec<RegionLabel>,
}

/// One region mark: `mask[y * width + x]` is true where `items[item]`'s image shows the
/// problem of factor `factor` (the item image's size).
#[derive(Debug, Clone, PartialEq)]
pub struct RegionLabel {
    pub item: usize,
    pub factor: usize,
    pub mask: Vec<bool>,
}

impl FeedbackSet {
    /// Checks every index, target and rating; errors name the record.
    pub fn validate(&self, factors: usize) -> Result<()> {
        let n = self.items.len();
        let item = |i: usize, what: &str| -> Result<()> {
            if i >= n {
                return Err(Error::invalid(format!(
                    "{what} names item {i}, but there are {n} items"
                )));
            }
            Ok(())
        };
        for (k, p) in self.pairs.iter().enumerate() {
            item(p.a, &format!("pair {k}"))?;
            item(p.b, &format!("pair {k}"))?;
            if !(0.0..=1.0).contains(&p.target) {
                return Err(Error::invalid(format!(
                    "pair {k} has target {}; expected 0, 0.5 or 1",
                    p.target
                )));
            }
        }
        for (k, (i, _)) in self.likes.iter().enumerate() {
            item(*i, &format!("like {k}"))?;
        }
        for (k, (i, s)) in self.ratings.iter().enumerate() {
            item(*i, &format!("rating {k}"))?;
            if !(1..=5).contains(s) {
                return Err(Error::invalid(format!(
                    "rating {k} has {s} stars; expected 1 to 5"
                )));
            }
        }
        for (k, (i, labels)) in self.reasons.iter().enumerate() {
            item(*i, &format!("reason {k}"))?;
            for (f, t) in labels {
                if *f >= factors || !(0.0..=1.0).contains(t) {
                    return Err(Error::invalid(format!(
                        "reason {k} labels factor {f} with {t}; the head has {factors} factors and targets are in [0, 1]"
                    )));
                }
            }
        }
        for (k, r) in self.regions.iter().enumerate() {
            item(r.item, &format!("region mark {k}"))?;
            let im = &self.items[r.item].image;
            if r.factor >= factors || r.mask.len() != im.width() * im.height() {
                return Err(Error::invalid(format!(
                    "region mark {k} marks factor {} with {} pixels; the head has {factors} factors and the image {}x{} pixels",
                    r.factor,
                    r.mask.len(),
                    im.width(),
                    im.height()
                )));
            }
        }
        let total = self.pairs.len()
            + self.likes.len()
            + self.ratings.len()
            + self.reasons.len()
            + self.regions.len();
        if total == 0 {
            return Err(Error::invalid("no feedback to train on"));
        }
        Ok(())
    }
}

/// `[train]` of a reward model config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardTrainConfig {
    /// Optimizer updates per member.
    pub steps: usize,
    /// Examples of each feedback kind per update.
    pub batch_size: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// Gradient-norm clip (0: off), over all gradients together or per tensor (`grad_clip`).
    pub max_grad_norm: f64,
    /// `global` (torch's `clip_grad_norm_`, the default) or `per_tensor` (burn's; how the shipped
    /// testbed reward was trained).
    pub grad_clip: ClipScope,
    /// Weight of the reasons' factor cross-entropy.
    pub factor_loss_weight: f64,
    /// Resample each member's labels with replacement.
    pub bootstrap: bool,
    /// Mirror augmentation: each drawn item that has `mirror_ids` is, with probability 1/2, seen
    /// as its left-right mirror image with that prompt (the horizontal flip of image reward and
    /// classifier training, with the prompt's left/right words swapped so the label still holds).
    pub mirror: bool,
    /// Translation augmentation: each drawn image is shifted by a whole number of pixels drawn
    /// uniformly from `[-shift, shift]` along each axis, the uncovered edge repeated (the random
    /// crop of image classifiers). Relative positions, counts and colours are unchanged; 0: off.
    pub shift: usize,
    /// Weight of the region marks' per-cell cross-entropy (used when the network has a region
    /// head, `net.region_head`).
    pub region_loss_weight: f64,
    /// Keep the text tower at its initialisation (the base model's text encoder) and train only
    /// the image tower and heads, as reward heads on frozen CLIP features do.
    pub freeze_text: bool,
    /// Keep the image tower's four convolutions at their initialisation (e.g. pretrained towers,
    /// `init`) and train the FiLM layers, projections and heads on top: the linear probe of CLIP
    /// features (Radford et al. 2021), with the prompt still modulating the frozen features.
    pub freeze_image: bool,
    pub seed: u64,
}

impl Default for RewardTrainConfig {
    fn default() -> Self {
        Self {
            steps: 600,
            batch_size: 32,
            learning_rate: 1e-3,
            weight_decay: 1e-4,
            max_grad_norm: 1.0,
            grad_clip: ClipScope::Global,
            factor_loss_weight: 1.0,
            bootstrap: true,
            mirror: false,
            shift: 0,
            region_loss_weight: 1.0,
            freeze_text: false,
            freeze_image: false,
            seed: 0,
        }
    }
}

/// Progress of one update: (member, step, loss).
pub type OnStep<'a> = dyn FnMut(usize, usize, f64) + 'a;

/// Trains `config.members` members on `data`. `text_init` (e.g. the base model's text encoder)
/// initialises every member's text tower, as ImageReward starts from a pretrained text encoder.
pub fn train_ensemble(
    config: &RewardModelConfig,
    train: &RewardTrainConfig,
    data: &FeedbackSet,
    text_init: Option<&ClipTextModel>,
    device: &Device,
    on_step: &mut OnStep,
) -> Result<RewardEnsemble> {
    train_ensemble_from(config, train, data, text_init, &[], device, on_step)
}

/// [`train_ensemble`], members starting from pretrained image and text towers
/// ([`crate::pretrain`], [`RewardNet::adopt_towers`]): `towers` is empty (none), one network
/// (every member starts from it) or one per member (member `m` from `towers[m]`, e.g. towers
/// pretrained with different seeds, so that members differ where pretraining saw nothing, as a
/// deep ensemble's members differ by initialisation). The heads are each member's own.
pub fn train_ensemble_from(
    config: &RewardModelConfig,
    train: &RewardTrainConfig,
    data: &FeedbackSet,
    text_init: Option<&ClipTextModel>,
    towers: &[RewardNet],
    device: &Device,
    on_step: &mut OnStep,
) -> Result<RewardEnsemble> {
    config.net.validate()?;
    data.validate(config.net.factors.len())?;
    if train.batch_size == 0 || train.steps == 0 {
        return Err(Error::config(
            "train",
            "steps and batch_size must be at least 1",
        ));
    }
    if towers.len() > 1 && towers.len() != config.members {
        return Err(Error::config(
            "init",
            format!(
                "{} pretrained towers for {} members: give one (shared) or one per member",
                towers.len(),
                config.members
            ),
        ));
    }
    let mut rng = SeededRng::new(train.seed);
    let mut members = Vec::with_capacity(config.members);
    for m in 0..config.members {
        device.seed(train.seed.wrapping_add(m as u64));
        let mut net = config.net.init(device)?;
        if let Some(t) = text_init {
            net.text_encoder = t.clone();
        }
        let start = match towers {
            [] => None,
            [shared] => Some(shared),
            per_member => Some(&per_member[m]),
        };
        if let Some(t) = start {
            net = net.adopt_towers(t)?;
        }
        let mut member_rng = rng.fork();
        let resample = |len: usize, rng: &mut SeededRng| -> Vec<usize> {
            if train.bootstrap {
                (0..len).map(|_| rng.below(len)).collect()
            } else {
                (0..len).collect()
            }
        };
        let pools = Pools {
            pairs: resample(data.pairs.len(), &mut member_rng),
            likes: resample(data.likes.len(), &mut member_rng),
            ratings: resample(data.ratings.len(), &mut member_rng),
            reasons: resample(data.reasons.len(), &mut member_rng),
            regions: resample(data.regions.len(), &mut member_rng),
        };
        let trained = train_member(
            net,
            train,
            data,
            &pools,
            &mut member_rng,
            device,
            &mut |s, l| on_step(m, s, l),
        )?;
        members.push(trained);
    }
    Ok(RewardEnsemble { members })
}

struct Pools {
    pairs: Vec<usize>,
    likes: Vec<usize>,
    ratings: Vec<usize>,
    reasons: Vec<usize>,
    regions: Vec<usize>,
}

/// A minibatch of at most `n` (with replacement) from `pool`; empty when the pool is.
fn draw(pool: &[usize], n: usize, rng: &mut SeededRng) -> Vec<usize> {
    (0..n.min(pool.len()))
        .map(|_| pool[rng.below(pool.len())])
        .collect()
}

/// How [`gather`] augmented one image: mirrored, then shifted by (dx, dy).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Augment {
    mirrored: bool,
    dx: i64,
    dy: i64,
}

impl Augment {
    /// The same transform applied to a `w x h` mask (uncovered pixels unmarked).
    fn mask(&self, mask: &[bool], w: usize, h: usize) -> Vec<bool> {
        let mut out = vec![false; w * h];
        for y in 0..h as i64 {
            for x in 0..w as i64 {
                let (sx, sy) = (x - self.dx, y - self.dy);
                if sx < 0 || sy < 0 || sx >= w as i64 || sy >= h as i64 {
                    continue;
                }
                let sx = if self.mirrored { w as i64 - 1 - sx } else { sx };
                out[(y * w as i64 + x) as usize] = mask[(sy * w as i64 + sx) as usize];
            }
        }
        out
    }
}

/// The images and prompts of `idx`; with `mirror`, each item that can be mirrored is, with
/// probability 1/2 (one draw per position, so a pair's two images flip independently); with
/// `shift > 0`, each image is then translated by up to `shift` pixels per axis. Also returns
/// each position's transform (for region masks).
fn gather(
    data: &FeedbackSet,
    idx: &[usize],
    mut mirror: Option<&mut SeededRng>,
    shift: Option<(usize, &mut SeededRng)>,
    device: &Device,
) -> Result<(Tensor<4>, Vec<Vec<i64>>, Vec<Augment>)> {
    let mut images = Vec::with_capacity(idx.len());
    let mut ids = Vec::with_capacity(idx.len());
    let mut augments = vec![Augment::default(); idx.len()];
    for (pos, &i) in idx.iter().enumerate() {
        let item = &data.items[i];
        let flip = mirror
            .as_deref_mut()
            .zip(item.mirror_ids.as_ref())
            .and_then(|(r, m)| (r.below(2) == 1).then_some(m));
        match flip {
            Some(m) => {
                images.push(item.image.mirrored());
                ids.push(m.clone());
                augments[pos].mirrored = true;
            }
            None => {
                images.push(item.image.clone());
                ids.push(item.ids.clone());
            }
        }
    }
    if let Some((s, rng)) = shift {
        for (im, a) in images.iter_mut().zip(&mut augments) {
            let mut d = || rng.below(2 * s + 1) as i64 - s as i64;
            let (dx, dy) = (d(), d());
            *im = im.shifted(dx, dy);
            (a.dx, a.dy) = (dx, dy);
        }
    }
    Ok((images_to_tensor(&images, device)?, ids, augments))
}

/// The fraction of marked pixels in each of `cw x ch` equal cells of a `w x h` mask, row-major
/// (the soft per-cell target of a region head whose features are `cw x ch`).
fn cell_fractions(mask: &[bool], w: usize, h: usize, cw: usize, ch: usize) -> Vec<f32> {
    let (sx, sy) = (w / cw, h / ch);
    let mut out = Vec::with_capacity(cw * ch);
    for cy in 0..ch {
        for cx in 0..cw {
            let mut k = 0usize;
            for y in cy * sy..(cy + 1) * sy {
                for x in cx * sx..(cx + 1) * sx {
                    k += mask[y * w + x] as usize;
                }
            }
            out.push(k as f32 / (sx * sy) as f32);
        }
    }
    out
}

fn floats(v: Vec<f32>, device: &Device) -> Tensor<1> {
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

fn train_member(
    net: RewardNet,
    train: &RewardTrainConfig,
    data: &FeedbackSet,
    pools: &Pools,
    rng: &mut SeededRng,
    device: &Device,
    on_step: &mut dyn FnMut(usize, f64),
) -> Result<RewardNet> {
    let ad = device.clone().autodiff();
    let mut net = net.to_device(&ad).set_require_grad(true).train();
    if train.freeze_text {
        net.text_encoder = net.text_encoder.no_grad();
    }
    if train.freeze_image {
        net.conv1 = net.conv1.no_grad();
        net.conv2 = net.conv2.no_grad();
        net.conv3 = net.conv3.no_grad();
        net.conv4 = net.conv4.no_grad();
    }
    // burn's AdamW defaults (betas 0.9 / 0.999, epsilon 1e-5), which the shipped reward used.
    let mut optim: ModuleOptimizer = adamw(
        0.9,
        0.999,
        1e-5,
        train.weight_decay,
        train.max_grad_norm,
        train.grad_clip,
    );
    let b = train.batch_size;
    let factors = data
        .reasons
        .first()
        .map(|_| net.factor_head.weight.val().dims()[1])
        .unwrap_or(0);
    for step in 1..=train.steps {
        // One forward pass over every image the step needs: [pairs' a | pairs' b | likes |
        // ratings | reasons], then each loss reads its slice.
        let pair_picks = draw(&pools.pairs, b, rng);
        let like_picks = draw(&pools.likes, b, rng);
        let rating_picks = draw(&pools.ratings, b, rng);
        let reason_picks = draw(&pools.reasons, b, rng);
        let mut idx: Vec<usize> = pair_picks.iter().map(|&p| data.pairs[p].a).collect();
        idx.extend(pair_picks.iter().map(|&p| data.pairs[p].b));
        idx.extend(like_picks.iter().map(|&p| data.likes[p].0));
        idx.extend(rating_picks.iter().map(|&p| data.ratings[p].0));
        idx.extend(reason_picks.iter().map(|&p| data.reasons[p].0));
        // Region marks train only a region head.
        let region_picks = if net.region.is_some() {
            draw(&pools.regions, b, rng)
        } else {
            Vec::new()
        };
        idx.extend(region_picks.iter().map(|&p| data.regions[p].item));
        let mut shift_rng = (train.shift > 0).then(|| rng.fork());
        let (x, ids, augments) = gather(
            data,
            &idx,
            train.mirror.then_some(&mut *rng),
            shift_rng.as_mut().map(|r| (train.shift, r)),
            &ad,
        )?;
        let out = net.forward(x, &ids)?;
        let mut at = 0usize;
        let mut take = |n: usize| {
            at += n;
            at - n..at
        };
        let mut loss: Option<Tensor<1>> = None;
        let mut add = |l: Tensor<1>| {
            loss = Some(match loss.take() {
                Some(s) => s + l,
                None => l,
            })
        };
        if !pair_picks.is_empty() {
            let n = pair_picks.len();
            let r_a = out.reward.clone().slice([take(n)]);
            let r_b = out.reward.clone().slice([take(n)]);
            let y = floats(
                pair_picks
                    .iter()
                    .map(|&p| data.pairs[p].target as f32)
                    .collect(),
                &ad,
            );
            add(bradley_terry(r_a, r_b, y));
        }
        if !like_picks.is_empty() {
            let r = out.reward.clone().slice([take(like_picks.len())]);
            let y = floats(
                like_picks
                    .iter()
                    .map(|&p| if data.likes[p].1 { 1.0 } else { 0.0 })
                    .collect(),
                &ad,
            );
            add(logistic(r, y));
        }
        if !rating_picks.is_empty() {
            let r = out.reward.clone().slice([take(rating_picks.len())]);
            let stars: Vec<u8> = rating_picks.iter().map(|&p| data.ratings[p].1).collect();
            add(ordinal(r, net.cuts(), &stars));
        }
        if !reason_picks.is_empty() {
            let n = reason_picks.len();
            let logits = out.factor_logits.clone().slice([take(n), 0..factors]);
            let mut targets = vec![0f32; n * factors];
            let mut mask = vec![0f32; n * factors];
            for (row, &p) in reason_picks.iter().enumerate() {
                for &(f, t) in &data.reasons[p].1 {
                    targets[row * factors + f] = t as f32;
                    mask[row * factors + f] = 1.0;
                }
            }
            let t = Tensor::<2>::from_data(TensorData::new(targets, [n, factors]), &ad);
            let m = Tensor::<2>::from_data(TensorData::new(mask, [n, factors]), &ad);
            add(factor_bce(logits, t, m).mul_scalar(train.factor_loss_weight));
        }
        if !region_picks.is_empty() {
            let n = region_picks.len();
            let rows = take(n);
            let first = rows.start;
            let logits = out
                .region_logits
                .clone()
                .expect("region picks are drawn only with a region head")
                .slice([rows]);
            let [_, f, ch, cw] = logits.dims();
            let mut onehot = vec![0f32; n * f];
            let mut cells = Vec::with_capacity(n * ch * cw);
            for (row, &p) in region_picks.iter().enumerate() {
                let r = &data.regions[p];
                onehot[row * f + r.factor] = 1.0;
                let im = &data.items[r.item].image;
                let (w, h) = (im.width(), im.height());
                let mask = augments[first + row].mask(&r.mask, w, h);
                cells.extend(cell_fractions(&mask, w, h, cw, ch));
            }
            let onehot = Tensor::<4>::from_data(TensorData::new(onehot, [n, f, 1, 1]), &ad);
            let picked = (logits * onehot).sum_dim(1).reshape([n * ch * cw]);
            let target = floats(cells, &ad);
            add(logistic(picked, target).mul_scalar(train.region_loss_weight));
        }
        let loss = loss.expect("validate() ensures some feedback");
        let value = loss.clone().into_scalar::<f64>();
        if !value.is_finite() {
            return Err(Error::NonFinite(format!(
                "reward model loss {value} at step {step}"
            )));
        }
        let mut grads = GradientsParams::from_grads(loss.backward(), &net);
        clip_gradients(&net, &mut grads, train.max_grad_norm, train.grad_clip);
        net = optim.step(train.learning_rate, net, grads);
        on_step(step, value);
    }
    Ok(net.valid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_augmentation_flips_about_half_of_the_mirrorable_items_with_their_prompts() {
        let device = Device::default();
        let mut image = Image::filled(32, 32, [40, 40, 40]);
        image.set(0, 0, [220, 50, 50]);
        let data = FeedbackSet {
            items: vec![
                FeedbackItem {
                    ids: vec![0, 5, 1],
                    image: image.clone(),
                    mirror_ids: Some(vec![0, 6, 1]),
                },
                FeedbackItem {
                    ids: vec![0, 7, 1],
                    image: image.clone(),
                    mirror_ids: None,
                },
            ],
            ..FeedbackSet::default()
        };
        let idx: Vec<usize> = (0..400).map(|i| i % 2).collect();
        let mut rng = SeededRng::new(3);
        let (x, ids, _) = gather(&data, &idx, Some(&mut rng), None, &device).unwrap();
        // The red pixel sits at column 0 of an original and column 31 of a mirror.
        let v = x.into_data().try_to_vec::<f32>().unwrap();
        let red_at = |k: usize, col: usize| v[k * 3 * 32 * 32 + col] > 0.5;
        let mut flipped = 0;
        for (k, id) in ids.iter().enumerate() {
            let mirrored = red_at(k, 31);
            assert_ne!(mirrored, red_at(k, 0), "item {k} is exactly one of the two");
            match (idx[k], mirrored) {
                (0, true) => {
                    assert_eq!(id, &vec![0, 6, 1]);
                    flipped += 1;
                }
                (0, false) => assert_eq!(id, &vec![0, 5, 1]),
                (_, m) => {
                    assert!(!m, "an item without mirror ids is never mirrored");
                    assert_eq!(id, &vec![0, 7, 1]);
                }
            }
        }
        // 200 fair coins: 4 sigma = 28.
        assert!((72..=128).contains(&flipped), "{flipped} of 200 mirrored");
        // Without augmentation nothing is mirrored.
        let (_, ids, _) = gather(&data, &idx, None, None, &device).unwrap();
        assert!(ids.iter().all(|i| i != &vec![0, 6, 1]));
    }

    #[test]
    fn masks_follow_the_mirror_and_cells_average_them() {
        // A 4x4 mask with (0, 1) marked: mirrored it is (3, 1); shifted by (-1, 1) then (2, 2).
        let mut mask = vec![false; 16];
        mask[4] = true;
        let at = |m: &[bool]| m.iter().position(|b| *b);
        let a = Augment {
            mirrored: true,
            dx: 0,
            dy: 0,
        };
        assert_eq!(at(&a.mask(&mask, 4, 4)), Some(4 + 3));
        let a = Augment {
            mirrored: true,
            dx: -1,
            dy: 1,
        };
        assert_eq!(at(&a.mask(&mask, 4, 4)), Some(2 * 4 + 2));
        // Shifted out of the frame: nothing marked.
        let a = Augment {
            mirrored: false,
            dx: -1,
            dy: 0,
        };
        assert_eq!(at(&a.mask(&mask, 4, 4)), None);
        // 2x2 cells of 2x2 pixels: (0, 1) and (1, 1) both lie in the top-left cell.
        mask[5] = true;
        assert_eq!(cell_fractions(&mask, 4, 4, 2, 2), vec![0.5, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn shift_augmentation_moves_each_image_by_at_most_the_shift() {
        let device = Device::default();
        let mut image = Image::filled(32, 32, [40, 40, 40]);
        image.set(10, 20, [220, 50, 50]);
        let data = FeedbackSet {
            items: vec![FeedbackItem {
                ids: vec![0, 5, 1],
                image,
                mirror_ids: None,
            }],
            ..FeedbackSet::default()
        };
        let idx = vec![0; 300];
        let mut rng = SeededRng::new(5);
        let (x, ids, augments) = gather(&data, &idx, None, Some((2, &mut rng)), &device).unwrap();
        assert!(ids.iter().all(|i| i == &vec![0, 5, 1]), "prompts unchanged");
        let v = x.into_data().try_to_vec::<f32>().unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for k in 0..idx.len() {
            // The red channel plane of image k: exactly one red pixel, within 2 of (10, 20).
            let plane = &v[k * 3 * 32 * 32..k * 3 * 32 * 32 + 32 * 32];
            let red: Vec<usize> = (0..32 * 32).filter(|&i| plane[i] > 0.5).collect();
            assert_eq!(red.len(), 1, "image {k}");
            let (x, y) = ((red[0] % 32) as i64, (red[0] / 32) as i64);
            assert!(
                (x - 10).abs() <= 2 && (y - 20).abs() <= 2,
                "image {k} at ({x}, {y})"
            );
            // The reported transform is the one applied, and moves a mask the same way.
            assert_eq!((augments[k].dx, augments[k].dy), (x - 10, y - 20));
            let mut mask = vec![false; 32 * 32];
            mask[20 * 32 + 10] = true;
            let moved = augments[k].mask(&mask, 32, 32);
            assert!(moved[red[0]] && moved.iter().filter(|m| **m).count() == 1);
            seen.insert((x, y));
        }
        // 300 draws of 25 equally likely offsets: every offset appears.
        assert_eq!(seen.len(), 25);
    }
}
