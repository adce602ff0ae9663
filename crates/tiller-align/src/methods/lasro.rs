//! LaSRO (Jia et al., "Reward Fine-Tuning Two-Step Diffusion Models via Learning Differentiable
//! Latent-Space Surrogate Reward", CVPR 2025): for models that sample in one to four steps, where
//! policy-gradient and DPO objectives degenerate (one noise injection, a deterministic last step,
//! a map from noise to image with a huge Lipschitz constant), turn the reward, which need not be
//! differentiable, into a differentiable surrogate in the model's own sample space, and fine-tune
//! the few-step model by the surrogate's gradient through its whole short chain. The surrogate is
//! kept honest by adapting it online to the generator's new samples.
//!
//! Rounds of `1 + updates_per_query` batches:
//!
//! ```text
//! 1. query: K = train.images_per_prompt samples of each drawn prompt from the current model,
//!    scored by the run's reward r (the true reward queries; the loop counts and logs them);
//!    the groups join a replay buffer of the last `buffer` samples
//! 2. surrogate adaptation: surrogate_steps Adam steps of the Bradley-Terry ranking loss
//!    -log sigmoid(R(x_w, c) - R(x_l, c)) over pairs drawn from every within-group pair of the
//!    buffer that r ranks (x_w preferred; ties dropped)
//! 3. updates_per_query generator updates: chains from fresh noise, gradient of
//!    -loss_coeff * S[R(x_0, c)] through the last k steps (0: the whole chain)
//!    + train.kl_weight * KL to the base,   S[R] = clamp((R - mu) / sigma, -clip, clip)
//! ```
//!
//! with `mu`, `sigma` the surrogate's mean and standard deviation on the latest query samples
//! (refreshed at every adaptation).
//!
//! Readings. LaSRO's code is not released and its paper body was not available here
//! (`methods.md` §2.14 holds the abstract); what follows is built from the abstract and
//! secondary summaries, and each choice is ours:
//! - The surrogate is a Tiller reward network (`method.lasro.surrogate`, a reward-model folder
//!   whose architecture and weights it starts from); the paper's is a pre-trained SDXL UNet
//!   encoder with a convolutional head on latents. On the pixel testbed the sample space is the
//!   image; latent pipelines are refused until a latent reward network exists.
//! - The normalisation `S` ("tracking moving averages and maximum values") is the standardisation
//!   by the surrogate's statistics on the latest query batch, clipped.
//! - The paper regularises with the LCM distillation loss; here `train.kl_weight`, the KL to the
//!   starting model, is the regulariser (0 by default).
//! - "Off-policy exploration" is the replay buffer: the surrogate is fitted on samples of the
//!   earlier generators as well as the current one.
//! - The alternation's ratio (the summaries give 1-10 generator steps per 1-50 surrogate steps):
//!   4 generator updates per query batch, 20 surrogate steps.

use crate::batch::{Batch, Collect};
use crate::config::AlignConfig;
use crate::methods::draft_k::backprop_reward_to;
use crate::methods::{Fields, MethodSpec};
use crate::{Algorithm, Context, MicroStep, PolicyModel};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::activation::log_sigmoid;
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tiller_core::{Error, Result, SeededRng};
use tiller_diffusion::models::weights::{HostTensor, read_safetensors, write_safetensors};
use tiller_engine::checkpoint::{load_module, load_optimizer, save_module, save_optimizer};
use tiller_engine::optim::ClipScope;
use tiller_reward::LearnedReward;

/// `[method.lasro]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LasroConfig {
    /// The reward-model folder the surrogate starts from (its network and weights).
    pub surrogate: String,
    /// Generator updates after each query batch.
    pub updates_per_query: usize,
    /// Surrogate Adam steps after each query batch.
    pub surrogate_steps: usize,
    /// Ranked pairs per surrogate step.
    pub surrogate_batch: usize,
    pub surrogate_lr: f64,
    /// Samples kept for the surrogate (whole groups, the newest).
    pub buffer: usize,
    /// Differentiated steps at the end of the chain (0: all; a two-step model: both).
    pub k: usize,
    /// Scale of the normalised surrogate reward in the generator's loss.
    pub loss_coeff: f64,
    /// The normalised reward is clamped to [-clip, clip].
    pub clip: f64,
}

impl Default for LasroConfig {
    fn default() -> Self {
        Self {
            surrogate: "assets/testbed-reward".into(),
            updates_per_query: 4,
            surrogate_steps: 20,
            surrogate_batch: 32,
            surrogate_lr: 1e-4,
            buffer: 1024,
            k: 0,
            loss_coeff: 1.0,
            clip: 3.0,
        }
    }
}

impl MethodSpec for LasroConfig {
    fn name(&self) -> &'static str {
        "lasro"
    }

    fn paper(&self) -> &'static str {
        "Jia et al., Reward Fine-Tuning Two-Step Diffusion Models via Learning Differentiable Latent-Space Surrogate Reward, CVPR 2025"
    }

    fn validate(&self, config: &AlignConfig) -> Result<()> {
        let f = Fields("lasro");
        if self.surrogate.is_empty() {
            return Err(f.error("surrogate", "must name a reward-model folder"));
        }
        f.at_least_one(&[
            ("updates_per_query", self.updates_per_query),
            ("surrogate_steps", self.surrogate_steps),
            ("surrogate_batch", self.surrogate_batch),
            ("buffer", self.buffer),
        ])?;
        f.positive(&[
            ("surrogate_lr", self.surrogate_lr),
            ("loss_coeff", self.loss_coeff),
            ("clip", self.clip),
        ])?;
        let k = config.train.images_per_prompt;
        if k < 2 {
            return Err(Error::config(
                "train.images_per_prompt",
                format!(
                    "lasro ranks samples of one prompt against each other: set it to 2 or more, got {k}"
                ),
            ));
        }
        if self.buffer < config.train.effective_batch() {
            return Err(f.error(
                "buffer",
                format!(
                    "must hold at least one query batch ({} samples), got {}",
                    config.train.effective_batch(),
                    self.buffer
                ),
            ));
        }
        Ok(())
    }

    fn build<M: PolicyModel>(&self) -> Box<dyn Algorithm<M>> {
        Box::new(Lasro::new(self.clone()))
    }

    fn reward_model(&self) -> Option<(&'static str, String)> {
        Some(("method.lasro.surrogate", self.surrogate.clone()))
    }

    /// Each query batch costs its samples' rewards and gives `updates_per_query` updates: the
    /// run is sized by its updates (as SEIKO's), so that the last query batch's updates are taken
    /// (a reward budget would stop the loop right after that batch, its queries unused).
    fn size_to_budget(&self, config: &AlignConfig, budget: u64) -> (Vec<String>, u64) {
        let batch = config.train.effective_batch().max(1) as u64;
        (
            Vec::new(),
            budget.div_ceil(batch).max(1) * self.updates_per_query as u64,
        )
    }
}

/// One query group: `K` samples of one prompt with their true rewards.
#[derive(Debug, Clone, PartialEq)]
struct Group {
    prompt: String,
    /// `K` images, CHW each, in the reward's [-1, 1].
    images: Vec<f32>,
    rewards: Vec<f64>,
}

/// The surrogate on the autodiff device with its optimizer.
struct Surrogate {
    model: LearnedReward,
    optim: burn::optim::ModuleOptimizer,
    /// The adopted weights on the plain device: what a checkpoint's weights load into.
    template: tiller_reward::ensemble::RewardEnsemble,
}

fn surrogate_optimizer() -> burn::optim::ModuleOptimizer {
    tiller_engine::optim::adamw(0.9, 0.999, 1e-8, 0.0, 1.0, ClipScope::Global)
}

const BUFFER_FILE: &str = "lasro_buffer.safetensors";
const SURROGATE_FILE: &str = "lasro_surrogate.bpk";
const SURROGATE_OPTIM_FILE: &str = "lasro_surrogate_optim.bpk";

pub struct Lasro {
    pub config: LasroConfig,
    surrogate: Option<Surrogate>,
    buffer: Vec<Group>,
    /// [C, H, W] of the buffer's images.
    shape: [usize; 3],
    /// Batches collected so far (which phase comes next).
    batches: u64,
    /// The normalisation's mean and standard deviation.
    norm: Option<(f64, f64)>,
    logged: Vec<(&'static str, f64)>,
    /// State read from a checkpoint, until its files are loaded.
    restored: Option<serde_json::Value>,
}

impl Lasro {
    pub fn new(config: LasroConfig) -> Self {
        Self {
            config,
            surrogate: None,
            buffer: Vec::new(),
            shape: [0; 3],
            batches: 0,
            norm: None,
            logged: Vec::new(),
            restored: None,
        }
    }

    fn is_query(&self, batch: u64) -> bool {
        batch.is_multiple_of(self.config.updates_per_query as u64 + 1)
    }

    /// Every within-group pair the reward ranks, as (group, winner, loser).
    fn ranked_pairs(groups: &[Group]) -> Vec<(usize, usize, usize)> {
        let mut out = Vec::new();
        for (g, group) in groups.iter().enumerate() {
            let r = &group.rewards;
            for a in 0..r.len() {
                for b in a + 1..r.len() {
                    if r[a] > r[b] {
                        out.push((g, a, b));
                    } else if r[b] > r[a] {
                        out.push((g, b, a));
                    }
                }
            }
        }
        out
    }

    /// Images `picks` (group, sample) of `groups` as [N, C, H, W] on `device`.
    fn images(&self, groups: &[Group], picks: &[(usize, usize)], device: &Device) -> Tensor<4> {
        let [c, h, w] = self.shape;
        let size = c * h * w;
        let mut v = Vec::with_capacity(picks.len() * size);
        for &(g, i) in picks {
            v.extend_from_slice(&groups[g].images[i * size..(i + 1) * size]);
        }
        Tensor::from_data(TensorData::new(v, [picks.len(), c, h, w]), device)
    }

    /// The fraction of `pairs` of `groups` the surrogate ranks as the reward does.
    fn agreement(&self, groups: &[Group], pairs: &[(usize, usize, usize)]) -> Result<f64> {
        let s = self.surrogate.as_ref().expect("adopted");
        if pairs.is_empty() {
            return Ok(f64::NAN);
        }
        let device = s.model.device.clone();
        let frozen = s.model.ensemble.valid();
        let ids = |texts: &[String]| s.model.token_ids(texts);
        let (w, l) = winners_losers(pairs);
        let texts: Vec<String> = pairs.iter().map(|p| groups[p.0].prompt.clone()).collect();
        let rw = crate::methods::ddpo::to_f32(
            frozen.forward_mean(self.images(groups, &w, &device), &ids(&texts)?)?,
        )?;
        let rl = crate::methods::ddpo::to_f32(
            frozen.forward_mean(self.images(groups, &l, &device), &ids(&texts)?)?,
        )?;
        Ok(rw.iter().zip(&rl).filter(|(a, b)| a > b).count() as f64 / pairs.len() as f64)
    }

    /// Adapts the surrogate to the buffer's ranked pairs; returns the last step's loss and the
    /// number of pairs.
    fn adapt(&mut self, rng: &mut SeededRng) -> Result<(f64, usize)> {
        let pairs = Self::ranked_pairs(&self.buffer);
        if pairs.is_empty() {
            return Ok((f64::NAN, 0));
        }
        let ad = self
            .surrogate
            .as_ref()
            .expect("adopted")
            .model
            .device
            .clone()
            .autodiff();
        let mut last = f64::NAN;
        for _ in 0..self.config.surrogate_steps {
            let pick: Vec<(usize, usize, usize)> = (0..self.config.surrogate_batch)
                .map(|_| pairs[rng.below(pairs.len())])
                .collect();
            let (w, l) = winners_losers(&pick);
            let texts: Vec<String> = pick
                .iter()
                .map(|p| self.buffer[p.0].prompt.clone())
                .collect();
            let n = pick.len();
            let x = Tensor::cat(
                vec![
                    self.images(&self.buffer, &w, &ad),
                    self.images(&self.buffer, &l, &ad),
                ],
                0,
            );
            let both: Vec<String> = texts.iter().chain(&texts).cloned().collect();
            let s = self.surrogate.as_mut().expect("adopted");
            let r = s
                .model
                .ensemble
                .forward_mean(x, &s.model.token_ids(&both)?)?;
            let loss = ranking_loss(r.clone().narrow(0, 0, n), r.narrow(0, n, n));
            last = loss.clone().into_scalar::<f64>();
            if !last.is_finite() {
                return Err(Error::NonFinite(format!("lasro surrogate loss {last}")));
            }
            let grads = GradientsParams::from_grads(loss.backward(), &s.model.ensemble);
            s.model.ensemble =
                s.optim
                    .step(self.config.surrogate_lr, s.model.ensemble.clone(), grads);
        }
        Ok((last, pairs.len()))
    }

    /// The surrogate's mean and standard deviation on `groups`' samples.
    fn statistics(&self, groups: &[Group]) -> Result<(f64, f64)> {
        let s = self.surrogate.as_ref().expect("adopted");
        let device = s.model.device.clone();
        let picks: Vec<(usize, usize)> = groups
            .iter()
            .enumerate()
            .flat_map(|(g, group)| (0..group.rewards.len()).map(move |i| (g, i)))
            .collect();
        let texts: Vec<String> = picks.iter().map(|p| groups[p.0].prompt.clone()).collect();
        let r = crate::methods::ddpo::to_f32(s.model.ensemble.valid().forward_mean(
            self.images(groups, &picks, &device),
            &s.model.token_ids(&texts)?,
        )?)?;
        let n = r.len().max(1) as f64;
        let mean = r.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = r
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        Ok((mean, var.sqrt().max(1e-6)))
    }
}

/// The Bradley-Terry ranking loss of the surrogate's scores of the preferred (`r_w`) and the other
/// (`r_l`) image of each pair, both [P]: `mean(-log sigmoid(r_w - r_l))`.
pub fn ranking_loss(r_w: Tensor<1>, r_l: Tensor<1>) -> Tensor<1> {
    log_sigmoid(r_w - r_l).neg().mean()
}

/// The generator's loss per image [B] from the surrogate's scores `r` [B]:
/// `-coeff * clamp((r - mu) / sigma, -clip, clip)`.
pub fn generator_loss(r: Tensor<1>, (mu, sigma): (f64, f64), clip: f64, coeff: f64) -> Tensor<1> {
    ((r - mu) / sigma).clamp(-clip, clip).neg() * coeff
}

/// A sample of the buffer: (group, index in the group).
type Pick = (usize, usize);

/// The preferred and the other sample of each ranked pair (group, winner, loser).
fn winners_losers(pairs: &[(usize, usize, usize)]) -> (Vec<Pick>, Vec<Pick>) {
    (
        pairs.iter().map(|&(g, w, _)| (g, w)).collect(),
        pairs.iter().map(|&(g, _, l)| (g, l)).collect(),
    )
}

impl<M: PolicyModel> Algorithm<M> for Lasro {
    fn name(&self) -> &'static str {
        "lasro"
    }

    fn adopt_reward_model(&mut self, model: LearnedReward) -> Result<()> {
        // Trained on the autodiff twin of its device.
        let ad = model.device.clone().autodiff();
        let template = model.ensemble.clone();
        let ensemble = model.ensemble.clone().to_device(&ad).train();
        self.surrogate = Some(Surrogate {
            model: LearnedReward { ensemble, ..model },
            optim: surrogate_optimizer(),
            template,
        });
        Ok(())
    }

    fn bind(&mut self, policy: &crate::Policy<M>) -> Result<()> {
        if policy.latents.is_some() {
            return Err(Error::config(
                "method",
                "lasro's surrogate scores the sample space, and Tiller has no latent reward \
                 network yet: lasro runs on pixel models (the testbed)",
            ));
        }
        if self.surrogate.is_none() {
            return Err(Error::invalid(
                "lasro: no surrogate reward model was given (method.lasro.surrogate)",
            ));
        }
        Ok(())
    }

    fn collects(&self) -> Collect {
        if self.is_query(self.batches) {
            Collect::Samples
        } else {
            Collect::Starts
        }
    }

    fn updates_per_batch(&self) -> usize {
        if self.is_query(self.batches) { 0 } else { 1 }
    }

    /// A query batch joins the buffer, the surrogate adapts to it and the normalisation is
    /// refreshed.
    fn prepare(
        &mut self,
        cx: &Context<'_, M>,
        batch: &mut Batch,
        rng: &mut SeededRng,
    ) -> Result<Vec<(&'static str, f64)>> {
        let query = self.is_query(self.batches);
        self.batches += 1;
        if !query {
            if self.norm.is_none() {
                return Err(Error::invalid("lasro: a generator batch before any query"));
            }
            return Ok(Vec::new());
        }
        let Batch::Samples(s) = batch else {
            return Err(Error::invalid("lasro: a query batch holds scored samples"));
        };
        let k = s.group;
        let images = cx.policy.images(s.samples.images.clone()).clamp(-1.0, 1.0);
        let [n, c, h, w] = images.dims();
        if k < 2 || !n.is_multiple_of(k) {
            return Err(Error::invalid(format!(
                "lasro: {n} samples are not whole groups of {k} (train.images_per_prompt >= 2)"
            )));
        }
        self.shape = [c, h, w];
        let values = crate::methods::ddpo::to_f32(images.reshape([n * c * h * w]))?;
        let size = k * c * h * w;
        let new: Vec<Group> = (0..n / k)
            .map(|g| Group {
                prompt: s.samples.prompts.texts[g * k].clone(),
                images: values[g * size..(g + 1) * size].to_vec(),
                rewards: s.rewards[g * k..(g + 1) * k].to_vec(),
            })
            .collect();
        // How well the surrogate ranks the new policy's samples before seeing them.
        let new_pairs = Self::ranked_pairs(&new);
        let before = self.agreement(&new, &new_pairs)?;
        self.buffer.extend(new.iter().cloned());
        let mut kept: usize = self.buffer.iter().map(|g| g.rewards.len()).sum();
        while kept > self.config.buffer {
            kept -= self.buffer.remove(0).rewards.len();
        }
        let (loss, pairs) = self.adapt(rng)?;
        let after = self.agreement(&new, &new_pairs)?;
        self.norm = Some(self.statistics(&new)?);
        self.logged = vec![
            ("surrogate_acc_before", before),
            ("surrogate_acc_after", after),
            ("surrogate_loss", loss),
            ("surrogate_pairs", pairs as f64),
        ];
        Ok(Vec::new())
    }

    fn gradients(
        &mut self,
        cx: &Context<'_, M>,
        batch: &Batch,
        scale: f64,
        _rng: &mut SeededRng,
    ) -> Result<MicroStep> {
        let Batch::Starts(s) = batch else {
            return Err(Error::invalid(
                "lasro: a generator batch holds chain starts",
            ));
        };
        let (Some(surrogate), Some((mu, sigma))) = (&self.surrogate, self.norm) else {
            return Err(Error::invalid("lasro: no surrogate adapted yet"));
        };
        let inner = Context {
            policy: cx.policy,
            reward: &surrogate.model,
            kl_weight: cx.kl_weight,
        };
        let (coeff, clip) = (self.config.loss_coeff, self.config.clip);
        let objective =
            move |r: Tensor<1>, _: Tensor<4>| generator_loss(r, (mu, sigma), clip, coeff);
        let mut out =
            backprop_reward_to(&inner, s, scale, self.config.k, "lasro", &objective, None)?;
        // The surrogate is not the reward: its scores are no queries.
        let scores = std::mem::take(&mut out.rewards);
        let mean = scores.iter().sum::<f64>() / scores.len().max(1) as f64;
        out.metrics.push(("surrogate_mean", mean));
        out.metrics.extend(self.logged.iter().copied());
        Ok(out)
    }

    fn state(&self) -> serde_json::Value {
        serde_json::json!({
            "batches": self.batches,
            "norm": self.norm.map(|(m, s)| [format!("{m:?}"), format!("{s:?}")]),
            "shape": self.shape,
            "prompts": self.buffer.iter().map(|g| g.prompt.clone()).collect::<Vec<_>>(),
            "group_sizes": self.buffer.iter().map(|g| g.rewards.len()).collect::<Vec<_>>(),
            "logged": super::scalars_state(&self.logged),
        })
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        let bad = |what: &str| Error::invalid(format!("lasro state in the checkpoint: {what}"));
        self.batches = state
            .get("batches")
            .and_then(|b| b.as_u64())
            .ok_or_else(|| bad("no batches"))?;
        let float = |v: &serde_json::Value| -> Result<f64> {
            v.as_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad(&format!("bad number {v}")))
        };
        self.norm = match state.get("norm") {
            Some(serde_json::Value::Array(a)) if a.len() == 2 => {
                Some((float(&a[0])?, float(&a[1])?))
            }
            _ => None,
        };
        self.logged = super::scalars_from_state(state.get("logged"), &LOGGED);
        self.restored = Some(state.clone());
        Ok(())
    }

    fn save_files(&self, dir: &Path) -> Result<()> {
        let [c, h, w] = self.shape;
        let n: usize = self.buffer.iter().map(|g| g.rewards.len()).sum();
        let mut tensors = BTreeMap::new();
        if n > 0 {
            tensors.insert(
                "images".into(),
                HostTensor {
                    shape: vec![n, c, h, w],
                    data: self
                        .buffer
                        .iter()
                        .flat_map(|g| g.images.iter().copied())
                        .collect(),
                },
            );
            // Rewards as f32 pairs (high, low) of each f64, so they round-trip exactly.
            let split: Vec<f32> = self
                .buffer
                .iter()
                .flat_map(|g| g.rewards.iter())
                .flat_map(|&r| {
                    let hi = r as f32;
                    [hi, (r - f64::from(hi)) as f32]
                })
                .collect();
            tensors.insert(
                "rewards".into(),
                HostTensor {
                    shape: vec![n, 2],
                    data: split,
                },
            );
        }
        write_safetensors(&dir.join(BUFFER_FILE), &tensors, HashMap::new())?;
        if let Some(s) = &self.surrogate {
            save_module(&dir.join(SURROGATE_FILE), &s.model.ensemble)?;
            save_optimizer(&dir.join(SURROGATE_OPTIM_FILE), &s.optim)?;
        }
        Ok(())
    }

    fn load_files(&mut self, dir: &Path, _device: &Device) -> Result<()> {
        let Some(state) = self.restored.take() else {
            return Ok(());
        };
        let path = dir.join(BUFFER_FILE);
        let bad = |what: &str| Error::format(&path, format!("lasro state: {what}"));
        let shape: Vec<usize> = state
            .get("shape")
            .and_then(|s| s.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_u64().map(|v| v as usize))
                    .collect()
            })
            .ok_or_else(|| bad("no shape"))?;
        let [c, h, w] = shape[..] else {
            return Err(bad("shape is not [C, H, W]"));
        };
        self.shape = [c, h, w];
        let prompts: Vec<String> = state
            .get("prompts")
            .and_then(|p| p.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .ok_or_else(|| bad("no prompts"))?;
        let sizes: Vec<usize> = state
            .get("group_sizes")
            .and_then(|p| p.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_u64().map(|v| v as usize))
                    .collect()
            })
            .ok_or_else(|| bad("no group sizes"))?;
        if prompts.len() != sizes.len() {
            return Err(bad("prompts and group sizes differ in number"));
        }
        let n: usize = sizes.iter().sum();
        let mut tensors = read_safetensors(&path)?;
        self.buffer.clear();
        if n > 0 {
            let images = tensors.remove("images").ok_or_else(|| bad("no images"))?;
            let rewards = tensors.remove("rewards").ok_or_else(|| bad("no rewards"))?;
            let size = c * h * w;
            if images.data.len() != n * size || rewards.data.len() != 2 * n {
                return Err(bad("the buffer's tensors do not match its groups"));
            }
            let mut at = 0;
            for (prompt, k) in prompts.into_iter().zip(sizes) {
                self.buffer.push(Group {
                    prompt,
                    images: images.data[at * size..(at + k) * size].to_vec(),
                    rewards: (at..at + k)
                        .map(|i| {
                            f64::from(rewards.data[2 * i]) + f64::from(rewards.data[2 * i + 1])
                        })
                        .collect(),
                });
                at += k;
            }
        }
        let s = self
            .surrogate
            .as_mut()
            .ok_or_else(|| bad("no surrogate to load into (method.lasro.surrogate)"))?;
        let device = s.model.device.clone();
        // As at adoption: load into the plain module, then onto the autodiff device (loading
        // restores parameter ids, which the optimizer state is keyed by).
        s.model.ensemble = load_module(&dir.join(SURROGATE_FILE), s.template.clone())?
            .to_device(&device.clone().autodiff())
            .train();
        s.optim = load_optimizer(&dir.join(SURROGATE_OPTIM_FILE), surrogate_optimizer())?;
        Ok(())
    }
}

/// The keys [`Lasro`] logs after each adaptation.
const LOGGED: [&str; 4] = [
    "surrogate_acc_before",
    "surrogate_acc_after",
    "surrogate_loss",
    "surrogate_pairs",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranked_pairs_skip_ties() {
        let g = |r: Vec<f64>| Group {
            prompt: String::new(),
            images: Vec::new(),
            rewards: r,
        };
        let pairs = Lasro::ranked_pairs(&[g(vec![0.2, 0.5, 0.2]), g(vec![1.0, 0.0])]);
        assert_eq!(pairs, vec![(0, 1, 0), (0, 1, 2), (1, 0, 1)]);
    }

    fn t(v: Vec<f32>) -> Tensor<1> {
        let n = v.len();
        Tensor::from_data(TensorData::new(v, [n]), &Device::default())
    }

    /// The two losses on numbers worked by hand.
    #[test]
    fn losses_by_hand() {
        // Gaps 1 and -2: (ln(1 + e^-1) + ln(1 + e^2)) / 2 = (0.313262 + 2.126928) / 2.
        let l = ranking_loss(t(vec![1.5, 0.0]), t(vec![0.5, 2.0])).into_scalar::<f64>();
        assert!((l - 1.220095).abs() < 1e-5, "{l}");
        // (r - 1) / 0.5 = [-1, 2, 10 -> clip 3], times -2.
        let g = crate::methods::ddpo::to_f32(generator_loss(
            t(vec![0.5, 2.0, 6.0]),
            (1.0, 0.5),
            3.0,
            2.0,
        ))
        .unwrap();
        assert_eq!(g, vec![2.0, -4.0, -6.0]);
    }

    #[test]
    fn phases_alternate() {
        let l = Lasro::new(LasroConfig {
            updates_per_query: 2,
            ..Default::default()
        });
        let q: Vec<bool> = (0..7).map(|b| l.is_query(b)).collect();
        assert_eq!(q, vec![true, false, false, true, false, false, true]);
    }
}
