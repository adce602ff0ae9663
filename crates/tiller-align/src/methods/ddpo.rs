//! DDPO (Black et al., "Training Diffusion Models with Reinforcement Learning", ICLR 2024),
//! DDPO_IS: PPO's clipped surrogate over the denoising chain.
//!
//! Rollouts are sampled with DDIM at eta = 1 and the log-probability of every step taken is kept
//! (a mean over dimensions: ddpo-pytorch's convention, which is why the clip range is 1e-4).
//! Rewards become advantages per prompt (ddpo-pytorch `stat_tracking.py`: a buffer of the last
//! `stat_buffer` rewards per prompt; below `stat_min_count` the batch statistics are used),
//! `A = (r - mean) / (std + 1e-6)`, clipped to +-`adv_clip_max`. ddpo-pytorch's prompt sets are
//! small (45 animals), so every prompt soon has its 16 values; with the testbed's 1200 training
//! prompts a prompt rarely repeats, the batch statistics stand in, and the advantage then mostly
//! says which *prompt* was easy rather than which *image* was good. Sampling
//! `train.images_per_prompt` images of each drawn prompt side by side with `stat_min_count` set
//! to that group size gives every rollout a comparison within its own prompt (flow_grpo's
//! grouping, `num_image_per_prompt`). Then for each trained step
//! (`scripts/train.py` l.539-551):
//!
//! ```text
//! rho = exp(log pi_theta(x_{t-1} | x_t) - log pi_old(x_{t-1} | x_t))
//! L   = mean(max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)))
//! ```
//!
//! with one backward per step, accumulated over the steps (the loss is divided by their number,
//! as accelerate's accumulation does), and `approx_kl = 1/2 mean((log rho)^2)` and the clip
//! fraction logged. Defaults: `config/base.py` (see `DdpoConfig`).
//!
//! As in ddpo-pytorch (`scripts/train.py` l.493-500), the trained steps are drawn per sample and
//! per inner epoch: a random permutation of the chain's stochastic steps, truncated to
//! `timestep_fraction` of them. The loss is the mean over all (sample, trained step) pairs, which
//! is what ddpo-pytorch's accumulation over `num_train_timesteps` computes; samples that train
//! the same step share one UNet call.

use crate::batch::{Batch, Collect, Rollouts};
use crate::config::AlignConfig;
use crate::methods::MethodSpec;
use crate::{Algorithm, Context, MicroStep, PolicyModel};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use tiller_core::{Error, Result, SeededRng};
use tiller_diffusion::LogProbReduction;

/// `[method.ddpo]`: ddpo-pytorch `config/base.py` defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DdpoConfig {
    /// PPO ratio clip epsilon (1e-4: the log-prob is a mean over dimensions).
    pub clip_range: f64,
    /// Advantages are clipped to +-this.
    pub adv_clip_max: f64,
    /// Optimizer passes over each collected batch.
    pub inner_epochs: usize,
    /// Fraction of the chain's steps trained on per pass (a random subset per rollout, drawn
    /// per update).
    pub timestep_fraction: f64,
    /// Normalise rewards per prompt (ddpo-pytorch's `PerPromptStatTracker`) instead of per batch.
    pub per_prompt_stat_tracking: bool,
    pub stat_buffer: usize,
    pub stat_min_count: usize,
}

impl Default for DdpoConfig {
    fn default() -> Self {
        Self {
            clip_range: 1e-4,
            adv_clip_max: 5.0,
            inner_epochs: 1,
            timestep_fraction: 1.0,
            per_prompt_stat_tracking: true,
            stat_buffer: 16,
            stat_min_count: 16,
        }
    }
}

impl MethodSpec for DdpoConfig {
    fn name(&self) -> &'static str {
        "ddpo"
    }

    fn paper(&self) -> &'static str {
        "Black et al., Training Diffusion Models with Reinforcement Learning, ICLR 2024"
    }

    fn validate(&self, config: &AlignConfig) -> Result<()> {
        let f = super::Fields("ddpo");
        f.stochastic_steps(config)?;
        f.unit_interval(&[("timestep_fraction", self.timestep_fraction)])?;
        f.at_least_one(&[("inner_epochs", self.inner_epochs)])
    }

    fn build<M: PolicyModel>(&self) -> Box<dyn Algorithm<M>> {
        Box::new(Ddpo::new(self.clone()))
    }

    fn size_to_budget(&self, config: &AlignConfig, budget: u64) -> (Vec<String>, u64) {
        super::rollout_budget(config, budget, self.inner_epochs)
    }
}

pub struct Ddpo {
    pub config: DdpoConfig,
    tracker: PerPromptStats,
}

impl Ddpo {
    pub fn new(config: DdpoConfig) -> Self {
        let tracker = PerPromptStats::new(config.stat_buffer, config.stat_min_count);
        Self { config, tracker }
    }
}

/// ddpo-pytorch's `PerPromptStatTracker`: per-prompt buffers of recent rewards.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PerPromptStats {
    buffer: usize,
    min_count: usize,
    history: BTreeMap<String, VecDeque<f64>>,
}

impl PerPromptStats {
    pub fn new(buffer: usize, min_count: usize) -> Self {
        Self {
            buffer,
            min_count,
            history: BTreeMap::new(),
        }
    }

    /// Adds the batch's rewards and returns each one normalised by its prompt's statistics
    /// (or the batch's when the prompt has fewer than `min_count` values).
    pub fn update(&mut self, prompts: &[String], rewards: &[f64]) -> Vec<f64> {
        let (batch_mean, batch_std) = mean_std(rewards);
        let mut out = vec![0.0; rewards.len()];
        let mut by_prompt: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, p) in prompts.iter().enumerate() {
            by_prompt.entry(p).or_default().push(i);
        }
        for (p, idx) in by_prompt {
            let h = self.history.entry(p.to_string()).or_default();
            for &i in &idx {
                h.push_back(rewards[i]);
                while h.len() > self.buffer.max(1) {
                    h.pop_front();
                }
            }
            let (m, s) = if h.len() < self.min_count {
                (batch_mean, batch_std)
            } else {
                let v: Vec<f64> = h.iter().copied().collect();
                mean_std(&v)
            };
            for &i in &idx {
                out[i] = (rewards[i] - m) / (s + 1e-6);
            }
        }
        out
    }
}

impl PerPromptStats {
    /// The buffers as JSON, each reward as Rust's shortest round-trip text: serde_json's default
    /// float parsing is not exact, and a resumed run must normalise with exactly the same
    /// statistics.
    pub fn to_json(&self) -> serde_json::Value {
        let history: BTreeMap<&String, Vec<String>> = self
            .history
            .iter()
            .map(|(k, v)| (k, v.iter().map(|x| format!("{x:?}")).collect()))
            .collect();
        serde_json::json!(history)
    }

    /// Replaces the buffers with those [`Self::to_json`] wrote; errors name `method`'s state.
    pub fn restore(&mut self, json: &serde_json::Value, method: &str) -> Result<()> {
        let bad = |what: &str| Error::invalid(format!("{method} state in the checkpoint: {what}"));
        let map = json
            .as_object()
            .ok_or_else(|| bad("per_prompt_rewards is not a table"))?;
        let mut history = BTreeMap::new();
        for (prompt, values) in map {
            let values = values
                .as_array()
                .ok_or_else(|| bad("rewards are not a list"))?;
            let parsed = values
                .iter()
                .map(|v| {
                    v.as_str()
                        .and_then(|t| t.parse::<f64>().ok())
                        .ok_or_else(|| bad(&format!("reward {v} of `{prompt}`")))
                })
                .collect::<Result<VecDeque<f64>>>()?;
            history.insert(prompt.clone(), parsed);
        }
        self.history = history;
        Ok(())
    }
}

/// Mean and population standard deviation (numpy's default, as ddpo-pytorch uses).
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n;
    (m, var.sqrt())
}

/// Step `i` of rollout chain `r` re-scored under the current (autodiff) weights: the step's
/// Gaussian and log pi_theta(x_{t-1} | x_t) of the recorded x_{t-1}, [B] (mean over dimensions).
/// `cond` is the rollouts' conditioning on the autodiff device.
pub fn step_log_prob<M: PolicyModel>(
    policy: &crate::Policy<M>,
    cond: &tiller_diffusion::sampling::Conditioning,
    r: &crate::batch::Rollouts,
    i: usize,
) -> Result<(tiller_diffusion::Gaussian, Tensor<1>)> {
    let t = policy.sampler.timesteps()[i];
    let x_t = r.latents[i].clone().autodiff();
    let next = r.latents[i + 1].clone().autodiff();
    let pred = cond.predict(&policy.model, x_t.clone(), t);
    let step = policy.sampler.step(pred, i, x_t)?.distribution;
    let log_prob = step.log_prob(next, LogProbReduction::Mean)?;
    Ok((step, log_prob))
}

/// log pi(x_{t-1} | x_t) of the recorded x_{t-1} at chain step `i` of rollouts `r` under `model`
/// (the current weights without a graph, or the frozen reference), [B] (mean over dimensions).
/// `cond` is the rollouts' conditioning on the plain device.
pub fn log_prob_under<M: PolicyModel>(
    policy: &crate::Policy<M>,
    model: &M,
    cond: &tiller_diffusion::sampling::Conditioning,
    r: &Rollouts,
    i: usize,
) -> Result<Tensor<1>> {
    let t = policy.sampler.timesteps()[i];
    let pred = cond.predict(model, r.latents[i].clone(), t);
    policy
        .sampler
        .step(pred, i, r.latents[i].clone())?
        .distribution
        .log_prob(r.latents[i + 1].clone(), LogProbReduction::Mean)
}

/// Which steps each rollout trains on in this update: a random `fraction` of its chain's
/// stochastic steps (a deterministic step, DDIM's last, has no log-probability), drawn per
/// rollout, as ddpo-pytorch draws them per sample and per inner epoch.
pub fn draw_train_steps(r: &mut Rollouts, fraction: f64, rng: &mut SeededRng) {
    draw_group_train_steps(r, fraction, 1, rng)
}

/// [`draw_train_steps`] with one draw per `group` rollouts side by side, shared by all of them
/// (D3PO trains both trajectories of a pair at the same steps).
pub fn draw_group_train_steps(r: &mut Rollouts, fraction: f64, group: usize, rng: &mut SeededRng) {
    let stochastic: Vec<usize> = (0..r.log_probs.len())
        .filter(|&i| r.log_probs[i].is_some())
        .collect();
    let steps = stochastic.len();
    let n = ((steps as f64 * fraction).round() as usize).clamp(1, steps.max(1));
    let group = group.max(1);
    let b = r.prompts.len();
    let mut drawn = Vec::with_capacity(b);
    while drawn.len() < b {
        let mut order = stochastic.clone();
        for i in (1..steps).rev() {
            order.swap(i, rng.below(i + 1));
        }
        order.truncate(n);
        for _ in 0..group.min(b - drawn.len()) {
            drawn.push(order.clone());
        }
    }
    r.train_steps = drawn;
}

/// The rollouts' trained (sample, step) pairs grouped by chain step: calls `f` with each step
/// some rollout trains, those rollouts (the batch itself when all of them do), and their share
/// of all pairs (the weight of their mean loss in the update's mean over pairs).
pub fn for_each_trained_step(
    r: &Rollouts,
    method: &str,
    mut f: impl FnMut(usize, &Rollouts, f64) -> Result<()>,
) -> Result<()> {
    let b = r.prompts.len();
    if r.train_steps.len() != b {
        return Err(Error::invalid(format!(
            "{method}: the trained steps were not drawn for this batch (begin_update)"
        )));
    }
    let pairs = r.train_steps.iter().map(Vec::len).sum::<usize>().max(1) as f64;
    for i in 0..r.log_probs.len() {
        let rows: Vec<usize> = (0..b).filter(|&s| r.train_steps[s].contains(&i)).collect();
        if rows.is_empty() {
            continue;
        }
        let weight = rows.len() as f64 / pairs;
        if rows.len() == b {
            f(i, r, weight)?;
        } else {
            f(i, &r.select_rows(&rows), weight)?;
        }
    }
    Ok(())
}

/// The advantage of rollout `s` at step `i`: the step's own when the method gave each step one
/// (TDPO-R's temporal rewards), otherwise the rollout's.
pub fn advantage_at(r: &Rollouts, s: usize, i: usize) -> f64 {
    match r.step_advantages.get(s) {
        Some(steps) => steps[i],
        None => r.advantages[s],
    }
}

/// PPO's clipped surrogate over the rollouts' trained steps, `mean(max(-A * rho, -A * clip(rho,
/// 1 - eps, 1 + eps)))` over (rollout, step) pairs with one backward per step, plus the loop's KL
/// to the reference when `cx.kl_weight > 0`: the gradients of `scale *` it, the loss, and
/// `approx_kl`, the clip fraction and the mean ratio (DDPO; TDPO-R with per-step advantages).
pub fn clipped_surrogate<M: PolicyModel>(
    cx: &Context<'_, M>,
    r: &Rollouts,
    eps: f64,
    scale: f64,
    method: &str,
) -> Result<MicroStep> {
    let policy = cx.policy;
    let ad = policy.autodiff_device();
    let mut acc = GradientsAccumulator::<M>::new();
    let (mut loss_sum, mut kl_sum, mut approx_kl, mut clipfrac, mut ratio_sum) =
        (0.0, 0.0, 0.0, 0.0, 0.0);
    for_each_trained_step(r, method, |i, part, weight| {
        let m = part.prompts.len();
        let cond = policy.conditioning(&part.prompts, &ad);
        let adv: Vec<f32> = (0..m).map(|s| advantage_at(part, s, i) as f32).collect();
        let adv = Tensor::<1>::from_data(TensorData::new(adv, [m]), &ad);
        let x_t = part.latents[i].clone().autodiff();
        let (step, log_prob) = step_log_prob(policy, &cond, part, i)?;
        let old = part.log_probs[i]
            .clone()
            .ok_or_else(|| Error::invalid(format!("step {i} has no log-probability")))?
            .autodiff();
        let log_ratio = log_prob - old;
        let ratio = log_ratio.clone().exp();
        let unclipped = adv.clone().neg() * ratio.clone();
        let clipped = adv.clone().neg() * ratio.clone().clamp(1.0 - eps, 1.0 + eps);
        let mut loss = unclipped.max_pair(clipped).mean();
        let value = loss.clone().into_scalar::<f64>();
        if cx.kl_weight > 0.0 {
            let kl = policy.kl_to_reference(&cond, &step, &x_t, i)?.mean();
            kl_sum += kl.clone().into_scalar::<f64>() * weight;
            loss = loss + kl * cx.kl_weight;
        }
        let lr = to_f32(log_ratio.inner())?;
        // Means over this step's rollouts, weighted into means over all pairs.
        let w = weight / m as f64;
        approx_kl += lr.iter().map(|x| 0.5 * (*x as f64).powi(2)).sum::<f64>() * w;
        clipfrac += lr
            .iter()
            .filter(|x| ((x.exp() as f64) - 1.0).abs() > eps)
            .count() as f64
            * w;
        ratio_sum += lr.iter().map(|x| x.exp() as f64).sum::<f64>() * w;
        loss_sum += value * weight;
        let scaled = loss * (scale * weight);
        let g = GradientsParams::from_grads(scaled.backward(), &policy.model);
        acc.accumulate(&policy.model, g);
        Ok(())
    })?;
    let mut metrics = vec![
        ("approx_kl", approx_kl),
        ("clipfrac", clipfrac),
        ("ratio_mean", ratio_sum),
    ];
    if cx.kl_weight > 0.0 {
        metrics.push(("kl", kl_sum));
    }
    Ok(MicroStep {
        grads: acc.grads(),
        loss: loss_sum,
        metrics,
        rewards: Vec::new(),
    })
}

/// A tensor's values as f32s.
pub fn to_f32(t: Tensor<1>) -> Result<Vec<f32>> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| Error::invalid(format!("{e:?}")))
}

impl<M: PolicyModel> Algorithm<M> for Ddpo {
    fn name(&self) -> &'static str {
        "ddpo"
    }

    fn collects(&self) -> Collect {
        Collect::Rollouts
    }

    fn updates_per_batch(&self) -> usize {
        self.config.inner_epochs
    }

    fn prepare(
        &mut self,
        _cx: &Context<'_, M>,
        batch: &mut Batch,
        _rng: &mut SeededRng,
    ) -> Result<Vec<(&'static str, f64)>> {
        let Batch::Rollouts(r) = batch else {
            return Err(Error::invalid("ddpo needs rollouts"));
        };
        let adv = if self.config.per_prompt_stat_tracking {
            self.tracker.update(&r.prompts.texts, &r.rewards)
        } else {
            let (m, s) = mean_std(&r.rewards);
            r.rewards.iter().map(|x| (x - m) / (s + 1e-6)).collect()
        };
        let c = self.config.adv_clip_max;
        r.advantages = adv.into_iter().map(|a| a.clamp(-c, c)).collect();
        let (am, _) = mean_std(&r.advantages);
        Ok(vec![("advantage_mean", am)])
    }

    fn begin_update(
        &mut self,
        batch: &mut Batch,
        _epoch: usize,
        rng: &mut SeededRng,
    ) -> Result<()> {
        let Batch::Rollouts(r) = batch else {
            return Err(Error::invalid("ddpo needs rollouts"));
        };
        draw_train_steps(r, self.config.timestep_fraction, rng);
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
            return Err(Error::invalid("ddpo needs rollouts"));
        };
        clipped_surrogate(cx, r, self.config.clip_range, scale, "ddpo")
    }

    fn state(&self) -> serde_json::Value {
        serde_json::json!({ "per_prompt_rewards": self.tracker.to_json() })
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        let history = state
            .get("per_prompt_rewards")
            .ok_or_else(|| Error::invalid("ddpo state in the checkpoint: no per_prompt_rewards"))?;
        self.tracker.restore(history, "ddpo")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_tracker_uses_batch_statistics_until_min_count() {
        let mut t = PerPromptStats::new(4, 2);
        let p = vec!["a".to_string(), "b".to_string()];
        // One value each: batch mean 2, std 1.
        let a = t.update(&p, &[1.0, 3.0]);
        assert!((a[0] + 1.0).abs() < 1e-5 && (a[1] - 1.0).abs() < 1e-5);
        // Now "a" has [1, 5]: mean 3, std 2 -> (5 - 3) / 2 = 1.
        let a = t.update(&p[..1], &[5.0]);
        assert!((a[0] - 1.0).abs() < 1e-5, "{a:?}");
    }

    #[test]
    fn buffer_keeps_the_newest_values() {
        let mut t = PerPromptStats::new(2, 1);
        let p = vec!["a".to_string()];
        t.update(&p, &[100.0]);
        t.update(&p, &[1.0]);
        // Buffer now [1, 3]: mean 2, std 1.
        let a = t.update(&p, &[3.0]);
        assert!((a[0] - 1.0).abs() < 1e-5, "{a:?}");
    }
}
