//! What the loop collects for a method: rollouts with per-step log-probs (policy gradient),
//! preference pairs with shared noise (DPO), or chain starts for differentiable sampling (reward
//! backpropagation). Every tensor lives on the plain (non-autodiff) device; a batch is collected
//! once per update for the whole effective batch and cut into micro-batches with [`Batch::slice`],
//! so batch 8 x accumulation 1 and batch 1 x accumulation 8 see the same examples.

use burn::tensor::{Int, Tensor, TensorData};
use std::ops::Range;
use tiller_core::{Error, Result};
use tiller_diffusion::models::unet::AddedConditions;
use tiller_diffusion::sampling::ExampleNoise;

/// Prompts with their text-encoder states.
#[derive(Debug, Clone)]
pub struct Prompts {
    pub texts: Vec<String>,
    /// [N, L, D]
    pub context: Tensor<3>,
    /// The empty prompt's states [N, L, D] (classifier-free guidance).
    pub uncond: Tensor<3>,
    /// SDXL's added conditioning (pooled text embedding and time ids), for the prompts and for
    /// guidance's unconditional half; `None` for models without it.
    pub added: Option<(AddedConditions, AddedConditions)>,
}

/// Rows `r` of both added conditionings.
fn map_added(
    added: &Option<(AddedConditions, AddedConditions)>,
    f: impl Fn(&Tensor<2>) -> Tensor<2>,
) -> Option<(AddedConditions, AddedConditions)> {
    let one = |a: &AddedConditions| AddedConditions {
        text_embeds: f(&a.text_embeds),
        time_ids: f(&a.time_ids),
    };
    added.as_ref().map(|(c, u)| (one(c), one(u)))
}

impl Prompts {
    pub fn len(&self) -> usize {
        self.texts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }

    pub fn slice(&self, r: Range<usize>) -> Self {
        Self {
            texts: self.texts[r.clone()].to_vec(),
            context: narrow3(&self.context, &r),
            uncond: narrow3(&self.uncond, &r),
            added: map_added(&self.added, |t| t.clone().narrow(0, r.start, r.len())),
        }
    }

    /// The prompts of `rows`, in that order.
    pub fn select(&self, rows: &[usize]) -> Self {
        let idx = Tensor::<1, Int>::from_data(
            TensorData::new(rows.iter().map(|&r| r as i64).collect(), [rows.len()]),
            &self.context.device(),
        );
        Self {
            texts: rows.iter().map(|&r| self.texts[r].clone()).collect(),
            context: self.context.clone().select(0, idx.clone()),
            uncond: self.uncond.clone().select(0, idx.clone()),
            added: map_added(&self.added, |t| t.clone().select(0, idx.clone())),
        }
    }

    /// `parts` copies one after another.
    pub fn repeat(&self, parts: usize) -> Self {
        Self {
            texts: (0..parts)
                .flat_map(|_| self.texts.iter().cloned())
                .collect(),
            context: Tensor::cat(vec![self.context.clone(); parts], 0),
            uncond: Tensor::cat(vec![self.uncond.clone(); parts], 0),
            added: map_added(&self.added, |t| Tensor::cat(vec![t.clone(); parts], 0)),
        }
    }
}

/// Sampled chains with the log-probability of every step taken (DDPO, DPOK, GRPO).
#[derive(Debug, Clone)]
pub struct Rollouts {
    pub prompts: Prompts,
    /// x_T, ..., x_0: `steps + 1` tensors [N, C, H, W].
    pub latents: Vec<Tensor<4>>,
    /// The model timestep of each chain step (`steps`).
    pub timesteps: Vec<f64>,
    /// log pi_old(x_{t-1} | x_t) of each step [N] (mean over dimensions, ddpo-pytorch's
    /// convention); `None` for a deterministic step (DDIM's last step with alpha_prev = 1).
    pub log_probs: Vec<Option<Tensor<1>>>,
    /// The model's estimate of x_0 at each chain step, from x_t (`steps` tensors [N, C, H, W]):
    /// what a critic of intermediate states sees (TDPO-R).
    pub predicted: Vec<Tensor<4>>,
    /// The reward of each final sample.
    pub rewards: Vec<f64>,
    /// Filled by the method before training (normalised, clipped rewards).
    pub advantages: Vec<f64>,
    /// Per-step advantages `[rollout][step]`, when a method gives each step its own (TDPO-R's
    /// temporal rewards); empty otherwise, and then every step takes the rollout's advantage.
    pub step_advantages: Vec<Vec<f64>>,
    /// The chain steps each rollout trains on in this update (filled by the method; ddpo-pytorch
    /// draws them per sample and per inner epoch).
    pub train_steps: Vec<Vec<usize>>,
    /// Rollouts per drawn prompt, side by side (`train.images_per_prompt`; the pairs of PRDP and
    /// D3PO, the ranked lists of dense DPO).
    pub group: usize,
}

impl Rollouts {
    /// Checks that the rollouts are whole groups of [`Self::group`] (of `size` when given, else of
    /// two or more) side by side, each of one prompt: what a method comparing a prompt's rollouts
    /// with each other reads (PRDP's and D3PO's pairs, dense DPO's rankings). Returns the group
    /// size; errors name `method`.
    pub fn check_groups(&self, method: &str, size: Option<usize>) -> Result<usize> {
        let (n, k) = (self.prompts.len(), self.group);
        if let Some(size) = size
            && k != size
        {
            return Err(Error::invalid(format!(
                "{method} compares {size} rollouts of each prompt, and these come {k} per prompt \
                 (train.images_per_prompt)"
            )));
        }
        if k < 2 || !n.is_multiple_of(k) {
            return Err(Error::invalid(format!(
                "{method}: {n} rollouts are not whole groups of {k} rollouts of one prompt \
                 (train.images_per_prompt >= 2)"
            )));
        }
        if self
            .prompts
            .texts
            .chunks(k)
            .any(|g| g.iter().any(|t| *t != g[0]))
        {
            return Err(Error::invalid(format!(
                "{method}: the rollouts of one group have different prompts"
            )));
        }
        Ok(k)
    }

    /// Rollouts `rows` (in that order), with their advantages; the trained steps are dropped,
    /// the group size kept (rows that keep whole groups keep it meaningful).
    pub fn select_rows(&self, rows: &[usize]) -> Rollouts {
        let device = self.prompts.context.device();
        let idx = Tensor::<1, Int>::from_data(
            TensorData::new(rows.iter().map(|&r| r as i64).collect(), [rows.len()]),
            &device,
        );
        let pick = |v: &[f64]| -> Vec<f64> {
            if v.is_empty() {
                Vec::new()
            } else {
                rows.iter().map(|&r| v[r]).collect()
            }
        };
        Rollouts {
            prompts: self.prompts.select(rows),
            latents: self
                .latents
                .iter()
                .map(|t| t.clone().select(0, idx.clone()))
                .collect(),
            timesteps: self.timesteps.clone(),
            log_probs: self
                .log_probs
                .iter()
                .map(|t| t.as_ref().map(|t| t.clone().select(0, idx.clone())))
                .collect(),
            predicted: self
                .predicted
                .iter()
                .map(|t| t.clone().select(0, idx.clone()))
                .collect(),
            rewards: pick(&self.rewards),
            advantages: pick(&self.advantages),
            step_advantages: if self.step_advantages.is_empty() {
                Vec::new()
            } else {
                rows.iter()
                    .map(|&r| self.step_advantages[r].clone())
                    .collect()
            },
            train_steps: Vec::new(),
            group: self.group,
        }
    }
}

/// Preference pairs as images in [-1, 1], with the noise and training timestep each pair shares.
#[derive(Debug, Clone)]
pub struct Pairs {
    pub prompts: Prompts,
    /// [N, C, H, W]
    pub chosen: Tensor<4>,
    /// [N, C, H, W]
    pub rejected: Tensor<4>,
    /// [N, C, H, W], shared by both images of a pair (Diffusion-DPO).
    pub noise: Tensor<4>,
    /// One training timestep per pair.
    pub timesteps: Vec<f64>,
}

/// Images each liked or disliked (a per-image label), with the noise and training timestep of each
/// (Diffusion-KTO).
#[derive(Debug, Clone)]
pub struct Labeled {
    pub prompts: Prompts,
    /// [N, C, H, W] in [-1, 1]
    pub images: Tensor<4>,
    /// Desirable (liked) or not, per image.
    pub likes: Vec<bool>,
    /// [N, C, H, W]
    pub noise: Tensor<4>,
    pub timesteps: Vec<f64>,
}

/// Starts of differentiable chains: prompts, the initial noise, and each chain's own stream for
/// its step noise (so a chain is the same in any micro-batch).
#[derive(Debug, Clone)]
pub struct Starts {
    pub prompts: Prompts,
    /// x_T [N, C, H, W]
    pub x_t: Tensor<4>,
    pub noise: ExampleNoise,
    /// Pre-training images, one per chain, when the method asks for them (ReFL).
    pub pretrain: Option<Supervised>,
}

/// Images to train the denoising objective on, each with its own noise and training timestep.
#[derive(Debug, Clone)]
pub struct Supervised {
    pub prompts: Prompts,
    /// [N, C, H, W] in [-1, 1]
    pub images: Tensor<4>,
    /// [N, C, H, W]
    pub noise: Tensor<4>,
    pub timesteps: Vec<f64>,
}

impl Supervised {
    pub fn slice(&self, r: Range<usize>) -> Self {
        Self {
            prompts: self.prompts.slice(r.clone()),
            images: narrow4(&self.images, &r),
            noise: narrow4(&self.noise, &r),
            timesteps: self.timesteps[r].to_vec(),
        }
    }
}

/// The policy's own final samples with their rewards, to be fitted by the denoising objective
/// (RWR, RAFT, reward-weighted likelihood).
#[derive(Debug, Clone)]
pub struct Samples {
    /// The samples x_0 with the noise and timestep each is trained at.
    pub samples: Supervised,
    /// The reward of each sample.
    pub rewards: Vec<f64>,
    /// Each sample's weight in the loss (filled by the method before training).
    pub weights: Vec<f64>,
    /// Samples per prompt, side by side (`train.images_per_prompt`).
    pub group: usize,
    /// Pre-training images, one per sample, when the method asks for them.
    pub pretrain: Option<Supervised>,
}

/// One update's data (built once per update; its size does not matter).
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum Batch {
    Rollouts(Rollouts),
    Pairs(Pairs),
    Labeled(Labeled),
    Starts(Starts),
    Samples(Samples),
}

/// Which [`Batch`] a method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collect {
    Rollouts,
    /// Rollouts whose group (the `train.images_per_prompt` rollouts of one drawn prompt, side by
    /// side) starts from one initial latent, each with its own step noise (D3PO's pairs;
    /// flow_grpo's `same_latent`).
    SharedStartRollouts,
    Pairs,
    /// Preference pairs whose `rejected` image is replaced by the policy's own current sample of
    /// the pair's prompt (PSO's offline pairs: a target image against the model's reference image).
    PairsWithOwnSamples,
    Labeled,
    Starts,
    /// Final samples only (no trajectories), scored.
    Samples,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.prompts().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn prompts(&self) -> &Prompts {
        match self {
            Batch::Rollouts(r) => &r.prompts,
            Batch::Pairs(p) => &p.prompts,
            Batch::Labeled(l) => &l.prompts,
            Batch::Starts(s) => &s.prompts,
            Batch::Samples(s) => &s.samples.prompts,
        }
    }

    /// Examples `r` of the batch (a micro-batch).
    pub fn slice(&self, r: Range<usize>) -> Batch {
        match self {
            Batch::Rollouts(x) => Batch::Rollouts(Rollouts {
                prompts: x.prompts.slice(r.clone()),
                latents: x.latents.iter().map(|t| narrow4(t, &r)).collect(),
                timesteps: x.timesteps.clone(),
                log_probs: x
                    .log_probs
                    .iter()
                    .map(|t| t.as_ref().map(|t| narrow1(t, &r)))
                    .collect(),
                predicted: x.predicted.iter().map(|t| narrow4(t, &r)).collect(),
                rewards: slice_or_empty(&x.rewards, &r),
                advantages: slice_or_empty(&x.advantages, &r),
                step_advantages: slice_or_empty(&x.step_advantages, &r),
                train_steps: slice_or_empty(&x.train_steps, &r),
                group: x.group,
            }),
            Batch::Pairs(x) => Batch::Pairs(Pairs {
                prompts: x.prompts.slice(r.clone()),
                chosen: narrow4(&x.chosen, &r),
                rejected: narrow4(&x.rejected, &r),
                noise: narrow4(&x.noise, &r),
                timesteps: x.timesteps[r].to_vec(),
            }),
            Batch::Labeled(x) => Batch::Labeled(Labeled {
                prompts: x.prompts.slice(r.clone()),
                images: narrow4(&x.images, &r),
                likes: x.likes[r.clone()].to_vec(),
                noise: narrow4(&x.noise, &r),
                timesteps: x.timesteps[r.clone()].to_vec(),
            }),
            Batch::Starts(x) => Batch::Starts(Starts {
                prompts: x.prompts.slice(r.clone()),
                x_t: narrow4(&x.x_t, &r),
                noise: x.noise.slice(r.clone()),
                pretrain: x.pretrain.as_ref().map(|p| p.slice(r)),
            }),
            Batch::Samples(x) => Batch::Samples(Samples {
                samples: x.samples.slice(r.clone()),
                rewards: slice_or_empty(&x.rewards, &r),
                weights: slice_or_empty(&x.weights, &r),
                group: x.group,
                pretrain: x.pretrain.as_ref().map(|p| p.slice(r)),
            }),
        }
    }
}

fn slice_or_empty<T: Clone>(v: &[T], r: &Range<usize>) -> Vec<T> {
    if v.is_empty() {
        Vec::new()
    } else {
        v[r.clone()].to_vec()
    }
}

fn narrow1(t: &Tensor<1>, r: &Range<usize>) -> Tensor<1> {
    t.clone().narrow(0, r.start, r.len())
}

fn narrow3(t: &Tensor<3>, r: &Range<usize>) -> Tensor<3> {
    t.clone().narrow(0, r.start, r.len())
}

fn narrow4(t: &Tensor<4>, r: &Range<usize>) -> Tensor<4> {
    t.clone().narrow(0, r.start, r.len())
}
