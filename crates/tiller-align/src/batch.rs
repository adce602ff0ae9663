//! What the loop collects for a method: rollouts with per-step log-probs (policy gradient),
//! preference pairs with shared noise (DPO), or chain starts for differentiable sampling (reward
//! backpropagation). Every tensor lives on the plain (non-autodiff) device; a batch is collected
//! once per update for the whole effective batch and cut into micro-batches with [`Batch::slice`],
//! so batch 8 x accumulation 1 and batch 1 x accumulation 8 see the same examples.

use burn::tensor::Tensor;
use std::ops::Range;

/// Prompts with their text-encoder states.
#[derive(Debug, Clone)]
pub struct Prompts {
    pub texts: Vec<String>,
    /// [N, L, D]
    pub context: Tensor<3>,
    /// The empty prompt's states [N, L, D] (classifier-free guidance).
    pub uncond: Tensor<3>,
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
        }
    }
}

/// Sampled chains with the log-probability of every step taken (DDPO, DPOK, GRPO).
#[derive(Debug, Clone)]
pub struct Rollouts {
    pub prompts: Prompts,
    /// x_T, ..., x_0: `steps + 1` tensors [N, C, H, W].
    pub latents: Vec<Tensor<4>>,
    /// log pi_old(x_{t-1} | x_t) of each step [N] (mean over dimensions, ddpo-pytorch's
    /// convention); `None` for a deterministic step (DDIM's last step with alpha_prev = 1).
    pub log_probs: Vec<Option<Tensor<1>>>,
    /// The reward of each final sample.
    pub rewards: Vec<f64>,
    /// Filled by the method before training (normalised, clipped rewards).
    pub advantages: Vec<f64>,
    /// The chain steps trained on in this update (filled by the method).
    pub train_steps: Vec<usize>,
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

/// Starts of differentiable chains: prompts and the initial noise, and a seed for each chain's
/// step noise.
#[derive(Debug, Clone)]
pub struct Starts {
    pub prompts: Prompts,
    /// x_T [N, C, H, W]
    pub x_t: Tensor<4>,
    pub seed: u64,
}

/// One update's data (built once per update; its size does not matter).
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum Batch {
    Rollouts(Rollouts),
    Pairs(Pairs),
    Starts(Starts),
}

/// Which [`Batch`] a method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collect {
    Rollouts,
    Pairs,
    Starts,
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
            Batch::Starts(s) => &s.prompts,
        }
    }

    /// Examples `r` of the batch (a micro-batch).
    pub fn slice(&self, r: Range<usize>) -> Batch {
        match self {
            Batch::Rollouts(x) => Batch::Rollouts(Rollouts {
                prompts: x.prompts.slice(r.clone()),
                latents: x.latents.iter().map(|t| narrow4(t, &r)).collect(),
                log_probs: x
                    .log_probs
                    .iter()
                    .map(|t| t.as_ref().map(|t| narrow1(t, &r)))
                    .collect(),
                rewards: slice_or_empty(&x.rewards, &r),
                advantages: slice_or_empty(&x.advantages, &r),
                train_steps: x.train_steps.clone(),
            }),
            Batch::Pairs(x) => Batch::Pairs(Pairs {
                prompts: x.prompts.slice(r.clone()),
                chosen: narrow4(&x.chosen, &r),
                rejected: narrow4(&x.rejected, &r),
                noise: narrow4(&x.noise, &r),
                timesteps: x.timesteps[r].to_vec(),
            }),
            Batch::Starts(x) => Batch::Starts(Starts {
                prompts: x.prompts.slice(r.clone()),
                x_t: narrow4(&x.x_t, &r),
                // Each micro-batch's chain noise has its own stream, fixed by its position.
                seed: x.seed ^ (r.start as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            }),
        }
    }
}

fn slice_or_empty(v: &[f64], r: &Range<usize>) -> Vec<f64> {
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
