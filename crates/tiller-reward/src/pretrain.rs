//! Contrastive image-text pretraining of a reward network's towers, as CLIP (Radford et al. 2021)
//! is pretrained before PickScore, HPSv2 and ImageReward's BLIP are fine-tuned on preferences.
//!
//! Every published reward model starts from towers that have seen far more captioned images than
//! there are preference labels; trained from scratch on a few thousand comparisons, ours had to
//! learn what a "green triangle" looks like from the comparisons alone. Here the image tower
//! (the convolutions and `image_proj`, with FiLM off: CLIP's towers see only their own input) and
//! the text tower (`text_encoder` and `text_proj`) are trained with CLIP's symmetric InfoNCE loss
//! on captioned images supplied by the caller. On the testbed these are the training renderer's
//! drawings of training-split prompts, the world's "web alt-text": no annotator, no gold evaluator.
//!
//! Loss (the pseudocode of CLIP's Figure 3): with L2-normalised embeddings `u_i` (image) and
//! `v_j` (text) and temperature τ, logits `s_ij = u_i · v_j / τ`; the loss is the mean of the
//! row-wise (image → text) and column-wise (text → image) cross-entropies. CLIP's targets are the
//! diagonal; here items of one batch may share a meaning (two drawings of "a red circle"), so each
//! row's target is uniform over the columns of its meaning (and likewise for columns), which is
//! the diagonal when meanings are distinct. The temperature is a fixed setting (CLIP learns it,
//! starting from 0.07, the default here); a learned temperature is not implemented.
//!
//! After pretraining, [`RewardNet::adopt_towers`] copies the towers into a fresh reward network
//! (heads initialised anew, FiLM zeroed so it starts as the identity), and preference training
//! proceeds as before.

use crate::images_to_tensor;
use crate::net::RewardNet;
use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use tiller_core::{Error, Result, SeededRng};
use tiller_engine::optim::{ClipScope, adamw, clip_gradients};
use tiller_testbed::{Image, Prompt, PromptGenerator, RenderConfig, Split, Task, Tokenizer};

/// One captioned image.
#[derive(Debug, Clone)]
pub struct Captioned {
    pub image: Image,
    /// The caption's token ids.
    pub ids: Vec<i64>,
    /// The caption's meaning: items of a batch with equal meanings are positives of each other.
    pub meaning: String,
}

/// `n` captioned drawings on the testbed: each a random prompt of a random task of `tasks` from
/// `split`, drawn by the training renderer and captioned with its own prompt (meaning: the
/// prompt's spec as JSON). With `hard_negatives`, items come in pairs: a prompt and a minimal
/// edit of it from the same split ([`tiller_testbed::prompts::minimal_edits`]: one colour,
/// shape, count or relation changed, or two swapped), each drawn, so that every batch holds
/// captions that differ in one binding and the loss must tell them apart (NegCLIP's hard
/// negatives, Yuksekgonul et al. 2023, here on both the text and the image side). Everything is
/// drawn from `rng`.
pub fn renderer_captions(
    tasks: &[Task],
    split: Split,
    n: usize,
    hard_negatives: bool,
    rng: &mut SeededRng,
    tokenizer: &Tokenizer,
    render: &RenderConfig,
) -> Result<Vec<Captioned>> {
    if tasks.is_empty() {
        return Err(Error::invalid("no tasks to draw captioned images from"));
    }
    if hard_negatives {
        let mut out: Vec<Captioned> = caption_pairs(tasks, split, n / 2, rng, tokenizer, render)?
            .into_iter()
            .flat_map(|(a, b)| [a, b])
            .collect();
        if n % 2 == 1 {
            out.extend(renderer_captions(
                tasks, split, 1, false, rng, tokenizer, render,
            )?);
        }
        return Ok(out);
    }
    let mut prompts = PromptGenerator::new(rng.below(usize::MAX) as u64);
    (0..n)
        .map(|_| {
            let task = tasks[rng.below(tasks.len())];
            let prompt = prompts.prompt(task, split)?;
            draw_captioned(&prompt, rng, tokenizer, render)
        })
        .collect()
}

/// `n` minimal pairs: a random prompt of a random task of `tasks` from `split` that has a
/// minimal edit in the split, and one such edit, each drawn by the training renderer.
pub fn caption_pairs(
    tasks: &[Task],
    split: Split,
    n: usize,
    rng: &mut SeededRng,
    tokenizer: &Tokenizer,
    render: &RenderConfig,
) -> Result<Vec<(Captioned, Captioned)>> {
    if tasks.is_empty() {
        return Err(Error::invalid("no tasks to draw captioned images from"));
    }
    let mut prompts = PromptGenerator::new(rng.below(usize::MAX) as u64);
    let mut out = Vec::with_capacity(n);
    let mut misses = 0;
    while out.len() < n {
        let task = tasks[rng.below(tasks.len())];
        let prompt = prompts.prompt(task, split)?;
        match prompts.minimal_edit(&prompt.spec, split)? {
            Some(edit) => out.push((
                draw_captioned(&prompt, rng, tokenizer, render)?,
                draw_captioned(&edit, rng, tokenizer, render)?,
            )),
            None => {
                misses += 1;
                if misses > 1000 + 100 * n {
                    return Err(Error::invalid(format!(
                        "no prompt of {tasks:?} in the {split:?} split has a minimal edit"
                    )));
                }
            }
        }
    }
    Ok(out)
}

/// `prompt` drawn by the renderer, captioned with its text (meaning: its spec as JSON).
fn draw_captioned(
    prompt: &Prompt,
    rng: &mut SeededRng,
    tokenizer: &Tokenizer,
    render: &RenderConfig,
) -> Result<Captioned> {
    let drawn = tiller_testbed::render_prompt(prompt, render, rng.below(usize::MAX) as u64)?;
    let ids = tokenizer
        .encode(&prompt.text)?
        .into_iter()
        .map(i64::from)
        .collect();
    let meaning = serde_json::to_string(&prompt.spec).map_err(|e| Error::invalid(e.to_string()))?;
    Ok(Captioned {
        image: drawn.image,
        ids,
        meaning,
    })
}

/// `[pretrain]` of a reward model config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainConfig {
    /// Optimizer updates.
    pub steps: usize,
    /// Captioned images per update (CLIP: 32 768; the in-batch negatives).
    pub batch_size: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// Gradient-norm clip (0: off).
    pub max_grad_norm: f64,
    pub grad_clip: ClipScope,
    /// The softmax temperature τ (CLIP's initial value, 0.07).
    pub temperature: f64,
    /// Half of every batch are minimal edits of the other half's captions, each drawn
    /// ([`renderer_captions`]; NegCLIP's hard negatives). Off in CLIP.
    pub hard_negatives: bool,
    /// How the training drawings are rendered (`[pretrain.render]`, the testbed renderer's
    /// settings; default: the renderer's own, as the base model was trained on). Raising the flaw
    /// rates (soft edges, speckle) shows the towers images closer to an imperfect model's.
    pub render: RenderConfig,
    pub seed: u64,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            steps: 2000,
            batch_size: 96,
            learning_rate: 1e-3,
            weight_decay: 1e-4,
            max_grad_norm: 1.0,
            grad_clip: ClipScope::Global,
            temperature: 0.07,
            hard_negatives: false,
            render: RenderConfig::default(),
            seed: 0,
        }
    }
}

impl PretrainConfig {
    /// Checks every field; errors name the field.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(Error::config("pretrain.steps", "must be at least 1"));
        }
        if self.batch_size < 2 {
            return Err(Error::config(
                "pretrain.batch_size",
                "needs at least 2 (the other items of a batch are the negatives)",
            ));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(Error::config(
                "pretrain.temperature",
                format!("must be positive, got {}", self.temperature),
            ));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(Error::config(
                "pretrain.learning_rate",
                format!("must be positive, got {}", self.learning_rate),
            ));
        }
        self.render.validate().map_err(|e| match e {
            Error::Config { field, message } => Error::config(format!("pretrain.{field}"), message),
            other => other,
        })
    }
}

/// The target matrix [B, B] (rows sum to 1): row i is uniform over the items sharing i's meaning.
/// Symmetric, so it serves the text → image direction too.
pub fn meaning_targets(meanings: &[&str]) -> Vec<f32> {
    let b = meanings.len();
    let mut t = vec![0f32; b * b];
    for i in 0..b {
        let same: Vec<usize> = (0..b).filter(|&j| meanings[j] == meanings[i]).collect();
        for &j in &same {
            t[i * b + j] = 1.0 / same.len() as f32;
        }
    }
    t
}

/// CLIP's symmetric InfoNCE loss: `image` and `text` [B, D] embeddings (normalised here),
/// `targets` [B, B] from [`meaning_targets`], temperature `tau`.
pub fn clip_loss(image: Tensor<2>, text: Tensor<2>, targets: Tensor<2>, tau: f64) -> Tensor<1> {
    let u = l2_normalize(image);
    let v = l2_normalize(text);
    let logits = u.matmul(v.transpose()).div_scalar(tau);
    let [b, _] = logits.dims();
    let rows = (log_softmax(logits.clone(), 1) * targets.clone())
        .sum()
        .neg();
    let cols = (log_softmax(logits, 0) * targets).sum().neg();
    (rows + cols).div_scalar(2.0 * b as f64)
}

pub(crate) fn l2_normalize(x: Tensor<2>) -> Tensor<2> {
    let norm = x.clone().powf_scalar(2.0).sum_dim(1).sqrt().clamp_min(1e-6);
    x / norm
}

/// The fraction of images whose most similar caption in the batch has their meaning
/// (retrieval top-1 accuracy, in-batch).
pub fn retrieval_accuracy(image: Tensor<2>, text: Tensor<2>, meanings: &[&str]) -> Result<f64> {
    let sim = l2_normalize(image).matmul(l2_normalize(text).transpose());
    let [b, _] = sim.dims();
    let v = sim
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| Error::invalid(format!("{e:?}")))?;
    let hits = (0..b)
        .filter(|&i| {
            let row = &v[i * b..(i + 1) * b];
            let best = (0..b)
                .max_by(|&x, &y| row[x].total_cmp(&row[y]))
                .expect("b >= 1");
            meanings[best] == meanings[i]
        })
        .count();
    Ok(hits as f64 / b as f64)
}

/// A batch as the towers take it: images [B, 3, H, W], token ids, meanings.
type Unpacked<'a> = (Tensor<4>, Vec<Vec<i64>>, Vec<&'a str>);

/// The images (on `device`), token ids and meanings of `items`.
fn unpack<'a>(items: &'a [Captioned], device: &Device) -> Result<Unpacked<'a>> {
    let images: Vec<Image> = items.iter().map(|c| c.image.clone()).collect();
    let ids = items.iter().map(|c| c.ids.clone()).collect();
    let meanings = items.iter().map(|c| c.meaning.as_str()).collect();
    Ok((images_to_tensor(&images, device)?, ids, meanings))
}

/// `net`'s in-batch retrieval accuracy ([`retrieval_accuracy`]) on `items`.
pub fn batch_retrieval(net: &RewardNet, items: &[Captioned], device: &Device) -> Result<f64> {
    let (x, ids, meanings) = unpack(items, device)?;
    let u = net.image_embedding(x);
    let v = net.text_embedding(&ids, device)?;
    retrieval_accuracy(u, v, &meanings)
}

/// How well `net` tells minimal pairs apart (Winoground's scores, Thrush et al. 2022): the
/// fraction of images more similar to their own caption than to the pair's other caption, and
/// the fraction of captions more similar to their own image than to the pair's other image.
pub fn minimal_pair_accuracy(
    net: &RewardNet,
    pairs: &[(Captioned, Captioned)],
    device: &Device,
) -> Result<(f64, f64)> {
    if pairs.is_empty() {
        return Err(Error::invalid("no minimal pairs to score"));
    }
    let items: Vec<Captioned> = pairs
        .iter()
        .flat_map(|(a, b)| [a.clone(), b.clone()])
        .collect();
    let (x, ids, _) = unpack(&items, device)?;
    let u = l2_normalize(net.image_embedding(x));
    let v = l2_normalize(net.text_embedding(&ids, device)?);
    let n = pairs.len();
    let cross = |a: Tensor<2>, b: Tensor<2>| -> Result<Vec<f32>> {
        // Per pair the 2x2 block [image i, caption j], flattened.
        let d = a.dims()[1];
        let a = a.reshape([n, 2, d]);
        let b = b.reshape([n, 2, d]).swap_dims(1, 2);
        a.matmul(b)
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| Error::invalid(format!("{e:?}")))
    };
    let s = cross(u, v)?;
    let (mut image_hits, mut text_hits) = (0usize, 0usize);
    for p in 0..n {
        let [s00, s01, s10, s11] = [s[4 * p], s[4 * p + 1], s[4 * p + 2], s[4 * p + 3]];
        image_hits += usize::from(s00 > s01) + usize::from(s11 > s10);
        text_hits += usize::from(s00 > s10) + usize::from(s11 > s01);
    }
    Ok((
        image_hits as f64 / (2 * n) as f64,
        text_hits as f64 / (2 * n) as f64,
    ))
}

/// Progress of one update: (step, loss, in-batch retrieval accuracy).
pub type OnPretrainStep<'a> = dyn FnMut(usize, f64, f64) + 'a;

/// Pretrains `net`'s towers for `config.steps` updates; `batch(n, rng)` supplies `n` captioned
/// images per update. Returns the network with its towers trained (heads untouched).
pub fn pretrain(
    net: RewardNet,
    config: &PretrainConfig,
    batch: &mut dyn FnMut(usize, &mut SeededRng) -> Result<Vec<Captioned>>,
    device: &Device,
    on_step: &mut OnPretrainStep,
) -> Result<RewardNet> {
    config.validate()?;
    let mut rng = SeededRng::new(config.seed);
    let ad = device.clone().autodiff();
    let mut net = net.to_device(&ad).set_require_grad(true).train();
    let mut optim: ModuleOptimizer = adamw(
        0.9,
        0.999,
        1e-5,
        config.weight_decay,
        config.max_grad_norm,
        config.grad_clip,
    );
    for step in 1..=config.steps {
        let items = batch(config.batch_size, &mut rng)?;
        let b = items.len();
        if b < 2 {
            return Err(Error::invalid(format!(
                "pretraining step {step} got {b} captioned images; need at least 2"
            )));
        }
        let (x, ids, meanings) = unpack(&items, &ad)?;
        let u = net.image_embedding(x);
        let v = net.text_embedding(&ids, &ad)?;
        let targets =
            Tensor::<2>::from_data(TensorData::new(meaning_targets(&meanings), [b, b]), &ad);
        let loss = clip_loss(u.clone(), v.clone(), targets, config.temperature);
        let value = loss.clone().into_scalar::<f64>();
        if !value.is_finite() {
            return Err(Error::NonFinite(format!(
                "pretraining loss {value} at step {step}"
            )));
        }
        let acc = retrieval_accuracy(u.detach(), v.detach(), &meanings)?;
        let mut grads = GradientsParams::from_grads(loss.backward(), &net);
        clip_gradients(&net, &mut grads, config.max_grad_norm, config.grad_clip);
        net = optim.step(config.learning_rate, net, grads);
        on_step(step, value, acc);
    }
    Ok(net.valid())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t2(v: Vec<f32>, shape: [usize; 2]) -> Tensor<2> {
        Tensor::from_data(TensorData::new(v, shape), &Device::default())
    }

    #[test]
    fn targets_spread_over_items_of_one_meaning() {
        let t = meaning_targets(&["a", "b", "a"]);
        assert_eq!(t, vec![0.5, 0.0, 0.5, 0.0, 1.0, 0.0, 0.5, 0.0, 0.5]);
    }

    #[test]
    fn clip_loss_matches_the_hand_computed_value() {
        // Two items, orthonormal embeddings matched: s = [[1, 0], [0, 1]] / τ with τ = 0.5, so
        // each row and column is log-softmax([2, 0]) and the loss is -log(e² / (e² + 1)).
        let u = t2(vec![3.0, 0.0, 0.0, 2.0], [2, 2]); // normalised by the loss
        let v = t2(vec![1.0, 0.0, 0.0, 1.0], [2, 2]);
        let targets = t2(meaning_targets(&["x", "y"]), [2, 2]);
        let loss = clip_loss(u.clone(), v.clone(), targets, 0.5).into_scalar::<f64>();
        let want = -(2f64.exp() / (2f64.exp() + 1.0)).ln();
        assert!((loss - want).abs() < 1e-6, "{loss} vs {want}");
        // Swapped captions: each row's target has logit 0 against 2.
        let swapped = t2(vec![0.0, 1.0, 1.0, 0.0], [2, 2]);
        let loss = clip_loss(u, v, swapped, 0.5).into_scalar::<f64>();
        let want = -(1.0 / (2f64.exp() + 1.0)).ln();
        assert!((loss - want).abs() < 1e-6, "{loss} vs {want}");
    }

    #[test]
    fn clip_loss_with_a_shared_meaning_is_the_soft_cross_entropy() {
        // Items 0 and 2 share a meaning. Every entry of s: u_i · v_j / τ; the row target is
        // uniform over {0, 2}. Computed here in f64 from the same definition.
        let uf = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]];
        let vf = [[0.8, 0.6], [1.0, 0.0], [0.6, -0.8]];
        let tau = 0.25;
        let m = ["p", "q", "p"];
        let tgt = meaning_targets(&m);
        let s = |i: usize, j: usize| (uf[i][0] * vf[j][0] + uf[i][1] * vf[j][1]) / tau;
        let lse = |xs: Vec<f64>| {
            let mx = xs.iter().cloned().fold(f64::MIN, f64::max);
            mx + xs.iter().map(|x| (x - mx).exp()).sum::<f64>().ln()
        };
        let mut want = 0.0;
        for i in 0..3 {
            let row = lse((0..3).map(|j| s(i, j)).collect());
            let col = lse((0..3).map(|j| s(j, i)).collect());
            for j in 0..3 {
                want -= tgt[i * 3 + j] as f64 * (s(i, j) - row);
                want -= tgt[j * 3 + i] as f64 * (s(j, i) - col);
            }
        }
        want /= 6.0;
        let flat = |x: [[f64; 2]; 3]| x.iter().flatten().map(|v| *v as f32).collect::<Vec<_>>();
        let loss = clip_loss(
            t2(flat(uf), [3, 2]),
            t2(flat(vf), [3, 2]),
            t2(tgt.clone(), [3, 3]),
            tau,
        )
        .into_scalar::<f64>();
        assert!((loss - want).abs() < 1e-5, "{loss} vs {want}");
    }

    #[test]
    fn retrieval_counts_an_image_right_when_its_best_caption_shares_its_meaning() {
        let u = t2(vec![1.0, 0.0, 0.0, 1.0, 1.0, 0.0], [3, 2]);
        let v = t2(vec![1.0, 0.0, 0.0, 1.0, 1.0, 0.1], [3, 2]);
        // Images 0 and 2 are the same picture, closest to caption 0; image 1 to caption 1. With
        // meanings [a, b, a] image 2's best caption (0) shares its meaning: all right.
        let acc = retrieval_accuracy(u.clone(), v.clone(), &["a", "b", "a"]).unwrap();
        assert!((acc - 1.0).abs() < 1e-12);
        // With three meanings image 2 retrieves caption 0, another meaning: 2 of 3.
        let acc = retrieval_accuracy(u, v, &["a", "b", "c"]).unwrap();
        assert!((acc - 2.0 / 3.0).abs() < 1e-12, "{acc}");
    }
}
