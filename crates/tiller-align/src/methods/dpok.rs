//! DPOK (Fan et al., "DPOK: Reinforcement Learning for Fine-tuning Text-to-Image Diffusion
//! Models", NeurIPS 2023), as google-research/google-research `dpok/train_online_pg.py` writes it
//! (`_train_value_func`, `_train_policy_func`): online policy gradient over the denoising chain,
//! regularised by the KL to the pretrained model at every step, with a learned value baseline.
//!
//! For each trained step of a rollout, with the pretrained (frozen) model `pi_pre`:
//!
//! ```text
//! rho = clamp(exp(log pi_theta(x_{t-1} | x_t) - log pi_old(x_{t-1} | x_t)), 1 - eps, 1 + eps)
//! A   = r - V(x_t, c, t)                         (A = r without the value baseline)
//! L   = mean( -reward_weight * A * rho  +  kl_weight * KL(pi_theta(. | x_t) || pi_pre(. | x_t)) )
//! ```
//!
//! The baseline of a batch's advantages is the value network as it was before training on that
//! batch (trained on the batches before it): a baseline fitted to a rollout's own reward would
//! cancel it. The ratio is clamped, not PPO's min/max: outside `[1 - eps, 1 + eps]` it carries no gradient.
//! The KL is the closed-form Gaussian KL of the two step distributions (mean over dimensions,
//! Tiller's one normalisation; DPOK's `kl_weight` is on its per-step sum). `V` is a small network
//! on (x_t, the prompt's text states, t) trained by MSE to the final reward: `value_steps` AdamW
//! steps (lr `value_lr`) on minibatches of `value_batch` transitions of the collected batch, before
//! the batch's policy updates (DPOK: `v_step 5`, `v_lr 1e-4`, `v_batch_size 256`). Defaults are the
//! README's single-prompt settings (`reward_weight 10`, `kl_weight 0.01`, `ratio_clip 1e-4`,
//! `p_step 5` policy updates per sampling step).
//!
//! One deviation: DPOK keeps a replay buffer of the last 1000 transitions and draws each policy
//! minibatch from it; here every update trains on the batch just collected (the loop's one data
//! path), on a random `timestep_fraction` of each rollout's steps (all by default), drawn per
//! update as for DDPO.

use crate::batch::{Batch, Collect, Rollouts};
use crate::config::AlignConfig;
use crate::methods::ddpo::{draw_train_steps, for_each_trained_step, step_log_prob, to_f32};
use crate::methods::{Fields, MethodSpec};
use crate::{Algorithm, Context, MicroStep, PolicyModel};
use burn::module::Module;
use burn::nn::Linear;
use burn::nn::conv::Conv2d;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::activation::silu;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tiller_core::{Error, Result, SeededRng};
use tiller_diffusion::models::layers::{conv2d, linear};
use tiller_engine::checkpoint::{load_module, load_optimizer, save_module, save_optimizer};
use tiller_engine::optim::ClipScope;

/// `[method.dpok]`: DPOK's README (single prompt) and `train_online_pg.py` defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DpokConfig {
    /// alpha, the weight of the policy-gradient term (`--reward_weight 10`).
    pub reward_weight: f64,
    /// beta, the weight of the per-step KL to the pretrained model (`--kl_weight 0.01`).
    pub kl_weight: f64,
    /// The ratio's clamp (`--ratio_clip 1e-4`; the log-prob is a mean over dimensions).
    pub ratio_clip: f64,
    /// Subtract the learned value V(x_t, c, t) from the reward (`--v_flag 1`).
    pub value_baseline: bool,
    /// The value network's AdamW learning rate (`--v_lr 1e-4`).
    pub value_lr: f64,
    /// Value updates per collected batch (`--v_step 5`).
    pub value_steps: usize,
    /// Transitions per value update (`--v_batch_size 256`; fewer if the batch has fewer).
    pub value_batch: usize,
    /// Policy updates per collected batch (`--p_step 5`).
    pub policy_steps: usize,
    /// The fraction of each rollout's steps trained per update.
    pub timestep_fraction: f64,
}

impl Default for DpokConfig {
    fn default() -> Self {
        Self {
            reward_weight: 10.0,
            kl_weight: 0.01,
            ratio_clip: 1e-4,
            value_baseline: true,
            value_lr: 1e-4,
            value_steps: 5,
            value_batch: 256,
            policy_steps: 5,
            timestep_fraction: 1.0,
        }
    }
}

impl MethodSpec for DpokConfig {
    fn name(&self) -> &'static str {
        "dpok"
    }

    fn paper(&self) -> &'static str {
        "Fan et al., DPOK: Reinforcement Learning for Fine-tuning Text-to-Image Diffusion Models, NeurIPS 2023"
    }

    fn validate(&self, config: &AlignConfig) -> Result<()> {
        let f = Fields("dpok");
        f.stochastic_steps(config)?;
        f.positive(&[
            ("reward_weight", self.reward_weight),
            ("ratio_clip", self.ratio_clip),
            ("value_lr", self.value_lr),
        ])?;
        f.non_negative(&[("kl_weight", self.kl_weight)])?;
        f.unit_interval(&[("timestep_fraction", self.timestep_fraction)])?;
        f.at_least_one(&[
            ("policy_steps", self.policy_steps),
            ("value_batch", self.value_batch),
        ])
    }

    fn build<M: PolicyModel>(&self) -> Box<dyn Algorithm<M>> {
        Box::new(Dpok::new(self.clone()))
    }

    /// DPOK's KL is its own term (`method.dpok.kl_weight`), not the loop's `train.kl_weight`.
    fn takes_kl(&self) -> bool {
        false
    }

    fn size_to_budget(&self, config: &AlignConfig, budget: u64) -> (Vec<String>, u64) {
        let train = &config.train;
        let batch = train.effective_batch().max(1) as u64;
        (
            vec![format!("train.reward_budget={budget}")],
            budget.div_ceil(batch) * self.policy_steps as u64,
        )
    }
}

/// V(x_t, c, t): two strided convolutions over x_t, the prompt's mean text state and sinusoidal
/// features of t, joined by a two-layer MLP (DPOK's `ValueMulti` at the testbed's scale).
#[derive(Module, Debug)]
pub struct ValueNet {
    conv1: Conv2d,
    conv2: Conv2d,
    text: Linear,
    time: Linear,
    hidden: Linear,
    out: Linear,
}

const VALUE_WIDTH: usize = 32;
const TIME_FEATURES: usize = 16;

impl ValueNet {
    fn new(channels: usize, text_dim: usize, device: &Device) -> Self {
        let w = VALUE_WIDTH;
        Self {
            conv1: conv2d(channels, w / 2, 3, 2, device),
            conv2: conv2d(w / 2, w, 3, 2, device),
            text: linear(text_dim, w, true, device),
            time: linear(TIME_FEATURES, w, true, device),
            hidden: linear(3 * w, 2 * w, true, device),
            out: linear(2 * w, 1, true, device),
        }
    }

    /// x_t [B, C, H, W], t: model timesteps, context [B, L, D] -> V [B].
    pub fn forward(&self, x_t: Tensor<4>, t: &[f64], context: Tensor<3>) -> Tensor<1> {
        let [b, _, _, _] = x_t.dims();
        let device = x_t.device();
        let x = silu(self.conv1.forward(x_t));
        let x = silu(self.conv2.forward(x));
        let x = x.mean_dim(3).mean_dim(2).reshape([b, VALUE_WIDTH]);
        let [_, _, d] = context.dims();
        let text = self.text.forward(context.mean_dim(1).reshape([b, d]));
        let mut feats = Vec::with_capacity(b * TIME_FEATURES);
        for &ti in t {
            for k in 0..TIME_FEATURES / 2 {
                let f = ti / 1000f64.powf(2.0 * k as f64 / TIME_FEATURES as f64);
                feats.push(f.sin() as f32);
                feats.push(f.cos() as f32);
            }
        }
        let time = self.time.forward(Tensor::<2>::from_data(
            TensorData::new(feats, [b, TIME_FEATURES]),
            &device,
        ));
        let h = silu(self.hidden.forward(Tensor::cat(vec![x, text, time], 1)));
        self.out.forward(h).reshape([b])
    }
}

struct Value {
    /// On the autodiff device.
    net: ValueNet,
    optim: burn::optim::ModuleOptimizer,
    /// (image channels, text dimension), to rebuild the network on resume.
    dims: (usize, usize),
}

const VALUE_FILE: &str = "value.bpk";
const VALUE_OPTIM_FILE: &str = "value_optim.bpk";

pub struct Dpok {
    pub config: DpokConfig,
    value: Option<Value>,
    /// The value network's shape read from a checkpoint's state, until its files are loaded.
    restored: Option<(usize, usize)>,
    /// The value network as it was before training on the current batch: the baseline of the
    /// batch's advantages, so that no rollout's baseline has seen its own reward.
    baseline: Option<ValueNet>,
}

/// The value network's AdamW (DPOK: `torch.optim.AdamW` with its defaults but no weight decay).
fn value_optimizer() -> burn::optim::ModuleOptimizer {
    tiller_engine::optim::adamw(0.9, 0.999, 1e-8, 0.0, 0.0, ClipScope::Global)
}

/// A fresh value network on `device`'s autodiff twin, trainable.
fn value_net(dims: (usize, usize), device: &Device) -> ValueNet {
    ValueNet::new(dims.0, dims.1, device)
        .to_device(&device.clone().autodiff())
        .train()
}

impl Dpok {
    pub fn new(config: DpokConfig) -> Self {
        Self {
            config,
            value: None,
            restored: None,
            baseline: None,
        }
    }

    fn value_for(&mut self, dims: (usize, usize), device: &Device, seed: u64) -> &mut Value {
        self.value.get_or_insert_with(|| {
            // burn's initialisers draw from the device's generator: seed it from the run.
            device.seed(seed);
            Value {
                net: value_net(dims, device),
                optim: value_optimizer(),
                dims,
            }
        })
    }

    /// The baseline value of every rollout at step `i` [B], without a graph (0 without one).
    fn values(&self, r: &Rollouts, i: usize, t: f64) -> Result<Vec<f32>> {
        let b = r.prompts.len();
        match &self.baseline {
            Some(net) => {
                to_f32(net.forward(r.latents[i].clone(), &vec![t; b], r.prompts.context.clone()))
            }
            None => Ok(vec![0.0; b]),
        }
    }
}

/// DPOK's per-transition objective, averaged: `-reward_weight * A * clamp(exp(log_ratio), 1 - eps,
/// 1 + eps) + kl_weight * kl`. All [B]; returns a one-element tensor.
pub fn dpok_loss(
    advantages: Tensor<1>,
    log_ratio: Tensor<1>,
    kl: Tensor<1>,
    config: &DpokConfig,
) -> Tensor<1> {
    let eps = config.ratio_clip;
    let rho = log_ratio.exp().clamp(1.0 - eps, 1.0 + eps);
    (advantages * rho * (-config.reward_weight) + kl * config.kl_weight).mean()
}

impl<M: PolicyModel> Algorithm<M> for Dpok {
    fn name(&self) -> &'static str {
        "dpok"
    }

    fn collects(&self) -> Collect {
        Collect::Rollouts
    }

    fn updates_per_batch(&self) -> usize {
        self.config.policy_steps
    }

    /// Trains the value network on the batch's transitions (DPOK's `_train_value_func`).
    fn prepare(
        &mut self,
        _cx: &Context<'_, M>,
        batch: &mut Batch,
        rng: &mut SeededRng,
    ) -> Result<Vec<(&'static str, f64)>> {
        let Batch::Rollouts(r) = batch else {
            return Err(Error::invalid("dpok needs rollouts"));
        };
        if !self.config.value_baseline {
            return Ok(Vec::new());
        }
        let b = r.prompts.len();
        let plain = r.prompts.context.device();
        let ad = plain.clone().autodiff();
        let dims = (r.latents[0].dims()[1], r.prompts.context.dims()[2]);
        let seed = rng.below(usize::MAX) as u64;
        let stochastic: Vec<usize> = (0..r.log_probs.len())
            .filter(|&i| r.log_probs[i].is_some())
            .collect();
        // Every transition (rollout s, step i) of the batch, with its final reward as target.
        let transitions: Vec<(usize, usize)> = stochastic
            .iter()
            .flat_map(|&i| (0..b).map(move |s| (s, i)))
            .collect();
        let timesteps = r.timesteps.clone();
        if timesteps.len() != r.log_probs.len() {
            return Err(Error::invalid("dpok: the rollouts carry no timesteps"));
        }
        let (lr, steps, per_step) = (
            self.config.value_lr,
            self.config.value_steps,
            self.config.value_batch.min(transitions.len()),
        );
        let value = self.value_for(dims, &plain, seed);
        // The advantages of this batch use the network before it sees the batch's rewards;
        // trained on them, it would fit them (late steps nearly fix the image) and A would be ~0.
        let baseline = value.net.valid();
        let mut last_loss = 0.0;
        for _ in 0..steps {
            // A minibatch of distinct transitions (a partial Fisher-Yates shuffle).
            let mut order: Vec<usize> = (0..transitions.len()).collect();
            for k in 0..per_step {
                let j = k + rng.below(order.len() - k);
                order.swap(k, j);
            }
            let pick: Vec<(usize, usize)> =
                order[..per_step].iter().map(|&k| transitions[k]).collect();
            let idx = |f: &dyn Fn(&(usize, usize)) -> usize| {
                Tensor::<1, Int>::from_data(
                    TensorData::new(pick.iter().map(|p| f(p) as i64).collect(), [per_step]),
                    &plain,
                )
            };
            let x = pick
                .iter()
                .map(|&(s, i)| r.latents[i].clone().narrow(0, s, 1))
                .collect::<Vec<_>>();
            let x = Tensor::cat(x, 0).autodiff();
            let ctx = r
                .prompts
                .context
                .clone()
                .select(0, idx(&|p| p.0))
                .autodiff();
            let t: Vec<f64> = pick.iter().map(|&(_, i)| timesteps[i]).collect();
            let target = Tensor::<1>::from_data(
                TensorData::new(
                    pick.iter().map(|&(s, _)| r.rewards[s] as f32).collect(),
                    [per_step],
                ),
                &ad,
            );
            let pred = value.net.forward(x, &t, ctx);
            let loss = (pred - target).powi_scalar(2).mean();
            last_loss = loss.clone().into_scalar::<f64>();
            if !last_loss.is_finite() {
                return Err(Error::NonFinite(format!("dpok value loss {last_loss}")));
            }
            let grads = GradientsParams::from_grads(loss.backward(), &value.net);
            value.net = value.optim.step(lr, value.net.clone(), grads);
        }
        self.baseline = Some(baseline);
        Ok(vec![("value_loss", last_loss)])
    }

    fn begin_update(
        &mut self,
        batch: &mut Batch,
        _epoch: usize,
        rng: &mut SeededRng,
    ) -> Result<()> {
        let Batch::Rollouts(r) = batch else {
            return Err(Error::invalid("dpok needs rollouts"));
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
            return Err(Error::invalid("dpok needs rollouts"));
        };
        let policy = cx.policy;
        let ad = policy.autodiff_device();
        let eps = self.config.ratio_clip;
        let mut acc = GradientsAccumulator::<M>::new();
        let (mut loss_sum, mut kl_sum, mut adv_sum, mut clipfrac) = (0.0, 0.0, 0.0, 0.0);
        for_each_trained_step(r, "dpok", |i, part, weight| {
            let m = part.prompts.len();
            let t = policy.sampler.timesteps()[i];
            let values = self.values(part, i, t)?;
            let adv: Vec<f32> = part
                .rewards
                .iter()
                .zip(&values)
                .map(|(r, v)| *r as f32 - v)
                .collect();
            let cond = policy.conditioning(&part.prompts, &ad);
            let (step, log_prob) = step_log_prob(policy, &cond, part, i)?;
            let old = part.log_probs[i]
                .clone()
                .ok_or_else(|| Error::invalid(format!("step {i} has no log-probability")))?
                .autodiff();
            let log_ratio = log_prob - old;
            let x_t = part.latents[i].clone().autodiff();
            let kl = policy.kl_to_reference(&cond, &step, &x_t, i)?;
            let w = weight / m as f64;
            kl_sum += to_f32(kl.clone().inner())?
                .iter()
                .map(|&k| k as f64)
                .sum::<f64>()
                * w;
            adv_sum += adv.iter().map(|&a| a as f64).sum::<f64>() * w;
            clipfrac += to_f32(log_ratio.clone().inner())?
                .iter()
                .filter(|x| ((x.exp() as f64) - 1.0).abs() > eps)
                .count() as f64
                * w;
            let adv = Tensor::<1>::from_data(TensorData::new(adv, [m]), &ad);
            let loss = dpok_loss(adv, log_ratio, kl, &self.config);
            loss_sum += loss.clone().into_scalar::<f64>() * weight;
            let g =
                GradientsParams::from_grads((loss * (scale * weight)).backward(), &policy.model);
            acc.accumulate(&policy.model, g);
            Ok(())
        })?;
        Ok(MicroStep {
            grads: acc.grads(),
            loss: loss_sum,
            metrics: vec![
                ("kl", kl_sum),
                ("advantage_mean", adv_sum),
                ("clipfrac", clipfrac),
            ],
            rewards: Vec::new(),
        })
    }

    fn state(&self) -> serde_json::Value {
        match &self.value {
            Some(v) => serde_json::json!({ "value_dims": [v.dims.0, v.dims.1] }),
            None => serde_json::Value::Null,
        }
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        self.value = None;
        self.restored = None;
        if let Some(d) = state.get("value_dims").and_then(|d| d.as_array()) {
            let get = |k: usize| {
                d.get(k)
                    .and_then(|x| x.as_u64())
                    .ok_or_else(|| Error::invalid(format!("dpok state: bad value_dims {d:?}")))
            };
            self.restored = Some((get(0)? as usize, get(1)? as usize));
        }
        Ok(())
    }

    fn save_files(&self, dir: &Path) -> Result<()> {
        if let Some(v) = &self.value {
            save_module(&dir.join(VALUE_FILE), &v.net)?;
            save_optimizer(&dir.join(VALUE_OPTIM_FILE), &v.optim)?;
        }
        Ok(())
    }

    fn load_files(&mut self, dir: &Path, device: &Device) -> Result<()> {
        if let Some(dims) = self.restored.take() {
            // As at the start of a run: load into the plain module, then put it on the autodiff
            // device (loading restores parameter ids, which the optimizer state is keyed by).
            let plain = ValueNet::new(dims.0, dims.1, device);
            let net = load_module(&dir.join(VALUE_FILE), plain)?
                .to_device(&device.clone().autodiff())
                .train();
            let optim = load_optimizer(&dir.join(VALUE_OPTIM_FILE), value_optimizer())?;
            self.value = Some(Value { net, optim, dims });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The objective on numbers worked by hand: rho = clamp(exp(lr), 0.8, 1.2).
    #[test]
    fn loss_by_hand_and_no_gradient_outside_the_clamp() {
        let device = Device::default().autodiff();
        let config = DpokConfig {
            reward_weight: 10.0,
            kl_weight: 0.01,
            ratio_clip: 0.2,
            ..Default::default()
        };
        let t = |v: &[f32]| Tensor::<1>::from_data(TensorData::new(v.to_vec(), [v.len()]), &device);
        let log_ratio = t(&[0.0, 1.5f32.ln()]).require_grad();
        let loss = dpok_loss(t(&[1.0, -2.0]), log_ratio.clone(), t(&[0.1, 0.3]), &config);
        // (-10 * 1 * 1 + 0.01 * 0.1 + -10 * -2 * 1.2 + 0.01 * 0.3) / 2 = (-9.999 + 24.003) / 2.
        let value = loss.clone().into_scalar::<f64>();
        assert!((value - 7.002).abs() < 1e-5, "{value}");
        let mut grads = loss.backward();
        let g = to_f32(log_ratio.grad_remove(&mut grads).unwrap()).unwrap();
        // d/d lr of -10 * 1 * exp(lr) / 2 at lr = 0 is -5; the clamped element has none.
        assert!((g[0] + 5.0).abs() < 1e-5 && g[1] == 0.0, "{g:?}");
        // A sign flip of the advantage flips the policy term.
        let flipped = dpok_loss(
            t(&[-1.0, 2.0]),
            t(&[0.0, 1.5f32.ln()]),
            t(&[0.1, 0.3]),
            &config,
        );
        assert!((flipped.into_scalar::<f64>() + 6.998).abs() < 1e-5);
    }
}
