//! TDPO-R (Zhang et al., "Confronting Reward Overoptimization for Diffusion Models: A Perspective
//! of Inductive and Primacy Biases", ICML 2024), as ZiyiZhang27/tdpo writes it
//! (`scripts/train_tdpo.py`, `tdpo_pytorch/critic_model.py`, `tdpo_pytorch/neuron_recycler.py`,
//! `config/base_tdpo.py`): PPO over the denoising chain with a per-step (temporal) advantage from a
//! critic of the intermediate states, one update per timestep, and periodic reset of the critic's
//! neurons against primacy bias. `neuron_reset = false` is TDPO.
//!
//! For a rollout whose final reward, normalised per prompt, is `r`, at each step `t` of its chain
//! (state x_t, its image embedding `e_t`):
//!
//! ```text
//! R_t = r_T + gamma * R_{t+1}     (the reward comes at the end: R_t = gamma^(T-1-t) r)
//! A_t = R_t - V_old(e_t)          normalised over the batch's (rollout, step) pairs
//! L_pi = mean(max(-A_t * rho, -A_t * clip(rho, 1 - eps, 1 + eps)))
//! L_V  = cf * 1/2 mean(max((V - R_t)^2, (clip(V, V_old - c, V_old + c) - R_t)^2))
//! ```
//!
//! `V_old` is the critic when the batch was sampled. The critic is TDPO's MLP
//! (`in -> 1024 -> 128 -> 64 -> 16 -> 1`, no activations, dropout 0.2, 0.2, 0.1; weights drawn from
//! N(0, 1/(in + 1)), biases 0), with its own AdamW (lr `1e-4`, weight decay `1e-4`, gradient norm
//! clipped to 1). TDPO embeds x_t decoded by the VAE with CLIP ViT-L/14; on the testbed (pixel
//! space, no CLIP) the embedding is the model's estimate of the clean image at that step, clamped
//! to [-1, 1], average-pooled to `embed_grid` x `embed_grid` and L2-normalised: what the issue
//! asks for ("the predicted clean image's embedding") with no weights of its own.
//!
//! As in the reference's training loop (`for j in range(num_train_timesteps)` outside the batch
//! loop), each collected batch gives one optimizer update per trained step: update `j` of an inner
//! epoch trains step `perm_s[j]` of every rollout `s`, where `perm_s` is a random permutation of
//! the rollout's stochastic steps (`shuffle_timestep`), truncated to `timestep_fraction` of them;
//! the critic takes one step on the same (rollout, step) pairs. So a batch gives `inner_epochs x
//! round(timestep_fraction x stochastic steps)` updates.
//!
//! Neuron reset (ReDo's statistics): after each inner epoch the critic is run on the last update's
//! embeddings; a hidden neuron's score is the batch mean of its ReLU'd output divided by its
//! layer's mean score, and it is dormant when that is at most `dormant_threshold` (0). Every
//! `reset_every` collected batches (10 epochs) the neurons chosen by `reset` have their incoming
//! weights redrawn (biases zeroed), their outgoing weights redrawn, and the Adam moments of both
//! zeroed. The reference resets the *active* neurons (`masks = ~dormant`, to fight primacy bias,
//! `reset = "active"`, the default); ReDo resets the dormant ones (`reset = "dormant"`).
//!
//! Deviations: the reference takes the neuron statistics on the first `sample.batch_size` rollouts
//! of the epoch; here they are the whole batch's. Its optional KL penalty in the returns
//! (`kl_penalty_coef`, 0 by default) is not offered: the loop's `train.kl_weight` adds the per-step
//! KL to the reference to the loss instead. Without per-prompt statistics the rewards are
//! normalised by the batch, not by running moments.

use crate::batch::{Batch, Collect};
use crate::config::AlignConfig;
use crate::methods::ddpo::{PerPromptStats, clipped_surrogate, draw_train_steps, mean_std};
use crate::methods::mlp::{Adam, Init, Mlp, embed};
use crate::methods::{Fields, MethodSpec};
use crate::{Algorithm, Context, MicroStep, Policy, PolicyModel};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tiller_core::{Error, Result, SeededRng};

/// Which critic neurons a reset redraws.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResetNeurons {
    /// Those whose score is above the threshold (the reference: `masks = ~dormant`).
    Active,
    /// Those whose score is at most the threshold (ReDo).
    Dormant,
}

/// `[method.tdpo-r]`: `config/base_tdpo.py` and `config/config_tdpo.py` defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TdpoConfig {
    /// PPO ratio clip epsilon (`train.clip_range 1e-4`; the log-prob is a mean over dimensions).
    pub clip_range: f64,
    /// Passes over each collected batch (`train.num_inner_epochs 1`).
    pub inner_epochs: usize,
    /// Fraction of each chain's stochastic steps trained per pass (`train.timestep_fraction 1`).
    pub timestep_fraction: f64,
    /// The discount of the returns (`sample.gamma 1`).
    pub gamma: f64,
    /// Normalise rewards per prompt (`PerPromptRunningMoments`, mode `norm`) instead of per batch.
    pub per_prompt_stat_tracking: bool,
    /// Rewards kept per prompt (`per_prompt_running_moments.buffer_size 32`).
    pub stat_buffer: usize,
    /// Below this many, the batch's statistics (`min_count 16`).
    pub stat_min_count: usize,
    /// Normalise the temporal advantages over the batch (`sample.temporal_reward_norm`).
    pub temporal_reward_norm: bool,
    /// The critic's AdamW learning rate (`train.learning_rate_critic 1e-4`).
    pub critic_lr: f64,
    /// The critic's decoupled weight decay (`train.adam_weight_decay 1e-4`).
    pub critic_weight_decay: f64,
    /// The value clip around the sampling-time value (`train.clip_range_critic 0.2`; 0: none).
    pub critic_clip_range: f64,
    /// The critic loss's weight (`train.cf_coef 1`).
    pub critic_coef: f64,
    /// The critic's gradient-norm clip (`train.max_grad_norm 1`).
    pub critic_max_grad_norm: f64,
    /// The critic MLP's dropout (0.2, 0.2, 0.1) while it trains.
    pub critic_dropout: bool,
    /// The embedding's pooling grid: the clean-image estimate is pooled to this many cells a side.
    pub embed_grid: usize,
    /// Reset critic neurons periodically (TDPO-R; off: TDPO).
    pub neuron_reset: bool,
    /// Collected batches between resets (`sample.neuron_reset_freq 10` epochs).
    pub reset_every: usize,
    /// Which neurons a reset redraws.
    pub reset: ResetNeurons,
    /// A neuron is dormant when its normalised score is at most this (`dormant_threshold 0`).
    pub dormant_threshold: f64,
}

impl Default for TdpoConfig {
    fn default() -> Self {
        Self {
            clip_range: 1e-4,
            inner_epochs: 1,
            timestep_fraction: 1.0,
            gamma: 1.0,
            per_prompt_stat_tracking: true,
            stat_buffer: 32,
            stat_min_count: 16,
            temporal_reward_norm: true,
            critic_lr: 1e-4,
            critic_weight_decay: 1e-4,
            critic_clip_range: 0.2,
            critic_coef: 1.0,
            critic_max_grad_norm: 1.0,
            critic_dropout: true,
            embed_grid: 8,
            neuron_reset: true,
            reset_every: 10,
            reset: ResetNeurons::Active,
            dormant_threshold: 0.0,
        }
    }
}

impl MethodSpec for TdpoConfig {
    fn name(&self) -> &'static str {
        "tdpo-r"
    }

    fn paper(&self) -> &'static str {
        "Zhang et al., Confronting Reward Overoptimization for Diffusion Models: A Perspective of Inductive and Primacy Biases, ICML 2024"
    }

    fn validate(&self, config: &AlignConfig) -> Result<()> {
        let f = Fields("tdpo-r");
        f.stochastic_steps(config)?;
        f.positive(&[
            ("clip_range", self.clip_range),
            ("critic_lr", self.critic_lr),
            ("critic_coef", self.critic_coef),
            ("critic_max_grad_norm", self.critic_max_grad_norm),
        ])?;
        f.non_negative(&[
            ("critic_weight_decay", self.critic_weight_decay),
            ("critic_clip_range", self.critic_clip_range),
            ("dormant_threshold", self.dormant_threshold),
        ])?;
        f.at_least_one(&[
            ("inner_epochs", self.inner_epochs),
            ("embed_grid", self.embed_grid),
            ("reset_every", self.reset_every),
        ])?;
        f.unit_interval(&[
            ("gamma", self.gamma),
            ("timestep_fraction", self.timestep_fraction),
        ])
    }

    fn build<M: PolicyModel>(&self) -> Box<dyn Algorithm<M>> {
        Box::new(Tdpo::new(self.clone()))
    }

    /// One update per trained step: `inner_epochs x round(timestep_fraction x sampling.steps)`
    /// per collected batch. A chain whose last step is deterministic trains one step fewer, so
    /// this is an upper bound there, and the reward budget ends the run.
    fn size_to_budget(&self, config: &AlignConfig, budget: u64) -> (Vec<String>, u64) {
        let batch = config.train.effective_batch().max(1) as u64;
        let steps = config.sampling.steps.max(1);
        let slots = ((steps as f64 * self.timestep_fraction).round() as u64).clamp(1, steps as u64);
        (
            vec![format!("train.reward_budget={budget}")],
            budget.div_ceil(batch) * self.inner_epochs as u64 * slots,
        )
    }
}

const CRITIC_FILE: &str = "critic.safetensors";

/// TDPO's critic initialisation: weights from N(0, 1/(in + 1)), biases 0.
fn critic_std(input: usize) -> f32 {
    1.0 / (input as f32 + 1.0)
}

/// One critic step's scalars.
#[derive(Debug, Clone, Copy, Default)]
struct CriticStep {
    loss: f64,
    clipfrac: f64,
    grad_norm: f64,
}

/// One AdamW step of the critic on TDPO's clipped value loss over embeddings `e` [N, D].
fn critic_step(
    critic: &mut Mlp,
    e: Tensor<2>,
    returns: &[f64],
    old: &[f64],
    config: &TdpoConfig,
    rng: &mut SeededRng,
) -> Result<CriticStep> {
    let ad = e.device().autodiff();
    let n = returns.len();
    let vec1 = |v: &[f64]| {
        Tensor::<1>::from_data(
            TensorData::new(v.iter().map(|&x| x as f32).collect(), [n]),
            &ad,
        )
    };
    let leaves = critic.leaves();
    let dropout = config.critic_dropout.then_some(rng);
    let (value, _) = Mlp::forward(&leaves, e.autodiff(), dropout);
    let (loss, clipfrac) = value_loss(value, vec1(returns), vec1(old), config.critic_clip_range)?;
    let loss = loss * config.critic_coef;
    let loss_value = loss.clone().into_scalar::<f64>();
    if !loss_value.is_finite() {
        return Err(Error::NonFinite(format!("tdpo-r critic loss {loss_value}")));
    }
    let grads = Mlp::gradients(&leaves, &loss)?;
    let grad_norm = critic.step(
        grads,
        &Adam {
            lr: config.critic_lr,
            weight_decay: config.critic_weight_decay,
            max_grad_norm: Some(config.critic_max_grad_norm),
        },
    );
    Ok(CriticStep {
        loss: loss_value,
        clipfrac,
        grad_norm,
    })
}

/// TDPO's critic loss, `1/2 mean(max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2))` (`c =
/// 0`: the unclipped `1/2 mean((V - R)^2)`), and the fraction of pairs where the clipped term
/// is the larger.
pub fn value_loss(
    value: Tensor<1>,
    returns: Tensor<1>,
    old: Tensor<1>,
    clip: f64,
) -> Result<(Tensor<1>, f64)> {
    let unclipped = (value.clone() - returns.clone()).powi_scalar(2);
    if clip <= 0.0 {
        return Ok((unclipped.mean() * 0.5, 0.0));
    }
    let clipped_value = old.clone() + (value - old).clamp(-clip, clip);
    let clipped = (clipped_value - returns).powi_scalar(2);
    let larger = clipped.clone().greater(unclipped.clone()).float().mean();
    let frac = larger.into_scalar::<f64>();
    Ok((unclipped.max_pair(clipped).mean() * 0.5, frac))
}

/// The temporal advantages of a batch: `A[s][i] = gamma^(T-1-i) r_s - V_old[s][i]` at the
/// stochastic steps `i` (0 elsewhere), normalised over all of them when `normalise`
/// (`(A - mean) / (std + 1e-8)`, population std). Also returns the returns `R[s][i]`.
pub fn temporal_advantages(
    rewards: &[f64],
    old: &[Vec<f64>],
    stochastic: &[bool],
    gamma: f64,
    normalise: bool,
) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let steps = stochastic.len();
    let returns: Vec<Vec<f64>> = rewards
        .iter()
        .map(|r| {
            (0..steps)
                .map(|i| gamma.powi((steps - 1 - i) as i32) * r)
                .collect()
        })
        .collect();
    let mut adv: Vec<Vec<f64>> = returns
        .iter()
        .zip(old)
        .map(|(r, v)| (0..steps).map(|i| r[i] - v[i]).collect())
        .collect();
    if normalise {
        let all: Vec<f64> = adv
            .iter()
            .flat_map(|a| (0..steps).filter(|&i| stochastic[i]).map(|i| a[i]))
            .collect();
        let (m, s) = mean_std(&all);
        for a in &mut adv {
            for i in 0..steps {
                a[i] = if stochastic[i] {
                    (a[i] - m) / (s + 1e-8)
                } else {
                    0.0
                };
            }
        }
    } else {
        for a in &mut adv {
            for i in (0..steps).filter(|&i| !stochastic[i]) {
                a[i] = 0.0;
            }
        }
    }
    (adv, returns)
}

/// Which neurons of each hidden layer a reset redraws, from their normalised scores.
pub fn reset_masks(scores: &[Vec<f64>], threshold: f64, which: ResetNeurons) -> Vec<Vec<bool>> {
    scores
        .iter()
        .map(|layer| {
            layer
                .iter()
                .map(|&s| {
                    let dormant = s <= threshold;
                    match which {
                        ResetNeurons::Active => !dormant,
                        ResetNeurons::Dormant => dormant,
                    }
                })
                .collect()
        })
        .collect()
}

/// What the critic trains on in a batch's updates: per chain step, the embeddings of every
/// rollout's state (`None` at deterministic steps), the returns and the sampling-time values.
struct Transitions {
    embeds: Vec<Option<Tensor<2>>>,
    returns: Vec<Vec<f64>>,
    old: Vec<Vec<f64>>,
}

pub struct Tdpo {
    pub config: TdpoConfig,
    tracker: PerPromptStats,
    critic: Option<Mlp>,
    /// The critic's (input, Adam steps) read from a checkpoint's state, until its file is loaded.
    restored: Option<(usize, u64)>,
    /// Updates per pass over a batch: the trained steps per rollout (from the bound sampler).
    slots: usize,
    /// Collected batches so far (the reference's epochs, for the reset period).
    batches: u64,
    transitions: Option<Transitions>,
    /// Each rollout's trained steps in this pass, in order.
    perms: Vec<Vec<usize>>,
    /// The scalars of the last critic step, neuron statistics and reset, logged with the policy's.
    logged: Vec<(&'static str, f64)>,
}

impl Tdpo {
    pub fn new(config: TdpoConfig) -> Self {
        let tracker = PerPromptStats::new(config.stat_buffer, config.stat_min_count);
        Self {
            config,
            tracker,
            critic: None,
            restored: None,
            slots: 0,
            batches: 0,
            transitions: None,
            perms: Vec::new(),
            logged: Vec::new(),
        }
    }
}

/// Rows `pick[s]` = (rollout s, its step) of the per-step embeddings, as one [N, D] tensor.
fn gather(embeds: &[Option<Tensor<2>>], steps: &[usize]) -> Result<Tensor<2>> {
    let rows = steps
        .iter()
        .enumerate()
        .map(|(s, &i)| {
            embeds[i]
                .as_ref()
                .map(|e| e.clone().narrow(0, s, 1))
                .ok_or_else(|| Error::invalid(format!("tdpo-r: step {i} has no embedding")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(rows, 0))
}

impl<M: PolicyModel> Algorithm<M> for Tdpo {
    fn name(&self) -> &'static str {
        "tdpo-r"
    }

    fn collects(&self) -> Collect {
        Collect::Rollouts
    }

    /// Counts the sampler's stochastic steps: one update per trained step.
    fn bind(&mut self, policy: &Policy<M>) -> Result<()> {
        let sampler = policy.sampler.as_ref();
        let x = Tensor::<4>::zeros([1, 1, 2, 2], &policy.device);
        let mut stochastic = 0;
        for i in 0..sampler.timesteps().len() {
            if !sampler
                .step(x.clone(), i, x.clone())?
                .distribution
                .is_deterministic()
            {
                stochastic += 1;
            }
        }
        if stochastic == 0 {
            return Err(Error::config(
                "sampling.eta",
                "tdpo-r needs stochastic steps (eta > 0)",
            ));
        }
        self.slots = ((stochastic as f64 * self.config.timestep_fraction).round() as usize)
            .clamp(1, stochastic);
        Ok(())
    }

    fn updates_per_batch(&self) -> usize {
        self.config.inner_epochs * self.slots.max(1)
    }

    /// Returns, the critic's values at sampling time, and the normalised temporal advantages.
    fn prepare(
        &mut self,
        _cx: &Context<'_, M>,
        batch: &mut Batch,
        rng: &mut SeededRng,
    ) -> Result<Vec<(&'static str, f64)>> {
        let Batch::Rollouts(r) = batch else {
            return Err(Error::invalid("tdpo-r needs rollouts"));
        };
        let steps = r.log_probs.len();
        if r.predicted.len() != steps {
            return Err(Error::invalid(
                "tdpo-r: the rollouts carry no estimates of x_0 to embed",
            ));
        }
        let rewards = if self.config.per_prompt_stat_tracking {
            self.tracker.update(&r.prompts.texts, &r.rewards)
        } else {
            let (m, s) = mean_std(&r.rewards);
            r.rewards.iter().map(|x| (x - m) / (s + 1e-6)).collect()
        };
        let stochastic: Vec<bool> = r.log_probs.iter().map(Option::is_some).collect();
        let embeds: Vec<Option<Tensor<2>>> = (0..steps)
            .map(|i| stochastic[i].then(|| embed(r.predicted[i].clone(), self.config.embed_grid)))
            .collect();
        let input = embeds
            .iter()
            .flatten()
            .next()
            .map(|e| e.dims()[1])
            .ok_or_else(|| Error::invalid("tdpo-r: no stochastic step in the rollouts"))?;
        let device = r.prompts.context.device();
        let critic = match &mut self.critic {
            Some(c) => c,
            None => {
                let mut init = rng.fork();
                let std = critic_std(input);
                self.critic
                    .insert(Mlp::new(input, Init::Normal(std), &mut init, &device))
            }
        };
        if critic.input != input {
            return Err(Error::invalid(format!(
                "tdpo-r: the critic takes embeddings of {} values, these have {input}",
                critic.input
            )));
        }
        let n = r.prompts.len();
        let mut old = vec![vec![0.0; steps]; n];
        for (i, e) in embeds.iter().enumerate() {
            if let Some(e) = e {
                for (s, v) in critic.values(e.clone())?.into_iter().enumerate() {
                    old[s][i] = v;
                }
            }
        }
        let (adv, returns) = temporal_advantages(
            &rewards,
            &old,
            &stochastic,
            self.config.gamma,
            self.config.temporal_reward_norm,
        );
        let trained: Vec<f64> = old
            .iter()
            .flat_map(|v| (0..steps).filter(|&i| stochastic[i]).map(|i| v[i]))
            .collect();
        r.step_advantages = adv;
        self.transitions = Some(Transitions {
            embeds,
            returns,
            old,
        });
        self.batches += 1;
        Ok(vec![("critic_value_mean", mean_std(&trained).0)])
    }

    /// Update `epoch` of the batch trains one step of every rollout (the next of its
    /// permutation); the critic takes its step on the same pairs, and after the last step of a
    /// pass the neuron statistics (and, every `reset_every` batches, the reset).
    fn begin_update(&mut self, batch: &mut Batch, epoch: usize, rng: &mut SeededRng) -> Result<()> {
        let Batch::Rollouts(r) = batch else {
            return Err(Error::invalid("tdpo-r needs rollouts"));
        };
        let slots = self.slots.max(1);
        let slot = epoch % slots;
        if slot == 0 {
            draw_train_steps(r, self.config.timestep_fraction, rng);
            if r.train_steps.iter().any(|p| p.len() != slots) {
                return Err(Error::invalid(format!(
                    "tdpo-r: the rollouts train {} steps each, the sampler gave {slots}",
                    r.train_steps.first().map_or(0, Vec::len)
                )));
            }
            self.perms = std::mem::take(&mut r.train_steps);
        }
        let pick: Vec<usize> = self.perms.iter().map(|p| p[slot]).collect();
        r.train_steps = pick.iter().map(|&i| vec![i]).collect();
        let (Some(t), Some(critic)) = (&self.transitions, &mut self.critic) else {
            return Err(Error::invalid("tdpo-r: no prepared batch for the critic"));
        };
        let e = gather(&t.embeds, &pick)?;
        let returns: Vec<f64> = pick
            .iter()
            .enumerate()
            .map(|(s, &i)| t.returns[s][i])
            .collect();
        let old: Vec<f64> = pick.iter().enumerate().map(|(s, &i)| t.old[s][i]).collect();
        let step = critic_step(critic, e.clone(), &returns, &old, &self.config, rng)?;
        self.logged = vec![
            ("critic_loss", step.loss),
            ("critic_clipfrac", step.clipfrac),
            ("critic_grad_norm", step.grad_norm),
        ];
        if slot + 1 == slots {
            let scores = critic.scores(e)?;
            let dormant = reset_masks(
                &scores,
                self.config.dormant_threshold,
                ResetNeurons::Dormant,
            );
            let total: usize = dormant.iter().map(Vec::len).sum();
            let count = dormant.iter().flatten().filter(|d| **d).count();
            self.logged
                .push(("dormant_fraction", count as f64 / total as f64));
            if self.config.neuron_reset
                && self.batches.is_multiple_of(self.config.reset_every as u64)
            {
                let masks = reset_masks(&scores, self.config.dormant_threshold, self.config.reset);
                let reset = critic.reset(&masks, critic_std(critic.input), rng)?;
                self.logged.push(("neurons_reset", reset as f64));
            }
        }
        Ok(())
    }

    fn gradients(
        &mut self,
        cx: &Context<'_, M>,
        batch: &Batch,
        scale: f64,
        _rng: &mut SeededRng,
    ) -> Result<MicroStep> {
        let Batch::Rollouts(r) = batch else {
            return Err(Error::invalid("tdpo-r needs rollouts"));
        };
        let mut out = clipped_surrogate(cx, r, self.config.clip_range, scale, "tdpo-r")?;
        // The same per-update value from every micro-batch: the loop's mean over them is it.
        out.metrics.extend(self.logged.iter().copied());
        Ok(out)
    }

    fn state(&self) -> serde_json::Value {
        serde_json::json!({
            "per_prompt_rewards": self.tracker.to_json(),
            "batches": self.batches,
            "critic": self.critic.as_ref().map(|c| serde_json::json!({
                "input": c.input,
                "adam_step": c.t,
            })),
        })
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        let bad = |what: &str| Error::invalid(format!("tdpo-r state in the checkpoint: {what}"));
        let history = state
            .get("per_prompt_rewards")
            .ok_or_else(|| bad("no per_prompt_rewards"))?;
        self.tracker.restore(history, "tdpo-r")?;
        self.batches = state
            .get("batches")
            .and_then(|b| b.as_u64())
            .ok_or_else(|| bad("no batches"))?;
        self.critic = None;
        self.restored = match state.get("critic") {
            Some(serde_json::Value::Null) | None => None,
            Some(c) => {
                let get = |k: &str| c.get(k).and_then(|x| x.as_u64()).ok_or_else(|| bad(k));
                Some((get("input")? as usize, get("adam_step")?))
            }
        };
        Ok(())
    }

    fn save_files(&self, dir: &Path) -> Result<()> {
        match &self.critic {
            Some(c) => c.save(&dir.join(CRITIC_FILE)),
            None => Ok(()),
        }
    }

    fn load_files(&mut self, dir: &Path, device: &Device) -> Result<()> {
        if let Some((input, t)) = self.restored.take() {
            self.critic = Some(Mlp::load(&dir.join(CRITIC_FILE), input, t, device)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t1(v: &[f32], device: &Device) -> Tensor<1> {
        Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), device)
    }

    /// Returns, advantages and their normalisation on numbers worked by hand.
    #[test]
    fn temporal_advantages_by_hand() {
        // Two rollouts, three steps, the last deterministic; gamma 0.5.
        let old = vec![vec![0.5, 0.25, 9.0], vec![-1.0, 0.0, 9.0]];
        let (adv, returns) =
            temporal_advantages(&[1.0, -2.0], &old, &[true, true, false], 0.5, false);
        // R = gamma^(2 - i) r: [0.25, 0.5, 1] and [-0.5, -1, -2].
        assert_eq!(returns, vec![vec![0.25, 0.5, 1.0], vec![-0.5, -1.0, -2.0]]);
        assert_eq!(adv, vec![vec![-0.25, 0.25, 0.0], vec![0.5, -1.0, 0.0]]);
        // Normalised over the four stochastic pairs: mean -0.125, population std
        // sqrt(mean([-0.125, 0.375, 0.625, -0.875]^2)) = sqrt(1.3125 / 4).
        let (adv, _) = temporal_advantages(&[1.0, -2.0], &old, &[true, true, false], 0.5, true);
        let s = 0.328125f64.sqrt() + 1e-8;
        let want = [[-0.125 / s, 0.375 / s, 0.0], [0.625 / s, -0.875 / s, 0.0]];
        for (a, w) in adv.iter().zip(&want) {
            for (x, y) in a.iter().zip(w) {
                assert!((x - y).abs() < 1e-12, "{adv:?}");
            }
        }
    }

    /// The clipped value loss: 1/2 mean(max((V - R)^2, (clip(V, V_old +- c) - R)^2)).
    #[test]
    fn value_loss_by_hand() {
        let device = Device::default();
        // V = [1, 0.5], V_old = [0, 0.4], R = [2, 0], c = 0.2.
        // Pair 1: unclipped (1 - 2)^2 = 1, clipped V -> 0.2: (0.2 - 2)^2 = 3.24 -> 3.24.
        // Pair 2: unclipped 0.25, clipped V -> 0.5 (inside [0.2, 0.6]): 0.25 -> 0.25.
        let (loss, frac) = value_loss(
            t1(&[1.0, 0.5], &device),
            t1(&[2.0, 0.0], &device),
            t1(&[0.0, 0.4], &device),
            0.2,
        )
        .unwrap();
        let v = loss.into_scalar::<f64>();
        assert!((v - 0.5 * (3.24 + 0.25) / 2.0).abs() < 1e-6, "{v}");
        assert!((frac - 0.5).abs() < 1e-12);
        let (loss, _) = value_loss(
            t1(&[1.0, 0.5], &device),
            t1(&[2.0, 0.0], &device),
            t1(&[0.0, 0.4], &device),
            0.0,
        )
        .unwrap();
        assert!((loss.into_scalar::<f64>() - 0.5 * 1.25 / 2.0).abs() < 1e-6);
    }

    /// Scores as `neuron_recycler.py` computes them, and which neurons each reset mode picks.
    #[test]
    fn neuron_scores_and_masks() {
        use crate::methods::mlp::{WIDTHS, host};
        let device = Device::default();
        let mut rng = SeededRng::new(3);
        let critic = Mlp::new(6, Init::Normal(critic_std(6)), &mut rng, &device);
        let e = Tensor::<2>::from_data(TensorData::new(rng.normal_vec(5 * 6), [5, 6]), &device);
        let scores = critic.scores(e.clone()).unwrap();
        assert_eq!(
            scores.iter().map(Vec::len).collect::<Vec<_>>(),
            WIDTHS.to_vec()
        );
        // By hand for the first layer: mean over rows of relu(e w_0 + b_0), over its mean.
        let h = host(&(e.matmul(critic.params[0].clone()) + critic.params[1].clone())).unwrap();
        let width = WIDTHS[0];
        let raw: Vec<f64> = (0..width)
            .map(|j| {
                (0..5)
                    .map(|r| f64::from(h[r * width + j].max(0.0)))
                    .sum::<f64>()
                    / 5.0
            })
            .collect();
        let layer = raw.iter().sum::<f64>() / width as f64;
        for (j, s) in scores[0].iter().enumerate() {
            assert!(
                (s - raw[j] / (layer + 1e-9)).abs() < 1e-4 * (1.0 + s),
                "neuron {j}"
            );
        }
        let active = reset_masks(&scores, 0.0, ResetNeurons::Active);
        let dormant = reset_masks(&scores, 0.0, ResetNeurons::Dormant);
        for (a, d) in active.iter().flatten().zip(dormant.iter().flatten()) {
            assert_ne!(a, d);
        }
        // Five random inputs leave some neurons of a linear layer never positive, not all.
        let n_dormant = dormant[0].iter().filter(|d| **d).count();
        assert!(n_dormant > 0 && n_dormant < width, "{n_dormant}");
    }
}
