//! DRaFT-K (Clark et al., "Directly Fine-Tuning Diffusion Models on Differentiable Rewards",
//! ICLR 2024): sample a chain, then backpropagate the reward of the final sample through the last
//! K denoising steps into the trainable weights (LoRA in the paper), maximising
//!
//! ```text
//! J(theta) = E_c E_{x_T}[ r(sample_theta(x_T, c), c) ]      (gradient stopped before step T-K)
//! ```
//!
//! K = 1 is the paper's recommended setting ("DRaFT-1"); K = all is DRaFT/AlignProp-style full
//! backpropagation, with memory bounded by step-level recomputation
//! (`tiller_diffusion::sampling::backprop_through_sampling_with`). The reward must be
//! differentiable (a reward model); the gold evaluator is not. With `train.kl_weight > 0` the
//! per-step Gaussian KL to the reference model is added at every differentiated stochastic step.

use crate::batch::{Batch, Collect};
use crate::config::AlignConfig;
use crate::methods::MethodSpec;
use crate::{Algorithm, Context, MicroStep, PolicyModel};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use tiller_core::{Error, Result, SeededRng};
use tiller_diffusion::Gaussian;
use tiller_diffusion::sampling::{
    ExampleNoise, NoiseSource, StepPenalty, backprop_through_sampling_with,
};
use tiller_diffusion::schedulers::Scheduler;

/// `[method.draft-k]`: DRaFT-K.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DraftConfig {
    /// Steps differentiated, counted from the end of the chain; K = 1 is the paper's best; 0 means
    /// all (memory stays one step's graph: step-level recomputation).
    pub k: usize,
}

impl Default for DraftConfig {
    fn default() -> Self {
        Self { k: 1 }
    }
}

impl MethodSpec for DraftConfig {
    fn name(&self) -> &'static str {
        "draft-k"
    }

    fn paper(&self) -> &'static str {
        "Clark et al., Directly Fine-Tuning Diffusion Models on Differentiable Rewards, ICLR 2024"
    }

    fn validate(&self, _config: &AlignConfig) -> Result<()> {
        Ok(())
    }

    fn build<M: PolicyModel>(&self) -> Box<dyn Algorithm<M>> {
        Box::new(DraftK { k: self.k })
    }

    /// Refuses a K whose differentiated steps all ignore the model's prediction (DDIM's last
    /// step from timestep 0 with `alpha_prev = alpha_0` returns its input whatever the model
    /// says): no reward gradient would reach the weights.
    fn check_sampler(&self, sampler: &dyn Scheduler, device: &Device) -> Result<()> {
        check_last_steps(sampler, self.k, device, "method.draft-k.k")
    }
}

/// Refuses `k` differentiated steps from the end of the chain (0: all) when none of them depends
/// on the model's prediction; `field` names the setting in the error.
pub(crate) fn check_last_steps(
    sampler: &dyn Scheduler,
    k: usize,
    device: &Device,
    field: &str,
) -> Result<()> {
    let steps = sampler.timesteps().len();
    let k = if k == 0 { steps } else { k.min(steps) };
    let x = Tensor::<4>::zeros([1, 1, 2, 2], device);
    for i in steps - k..steps {
        let mean = |p: f32| -> Result<Vec<f32>> {
            let pred = Tensor::<4>::full([1, 1, 2, 2], p, device);
            let m = sampler.step(pred, i, x.clone())?.distribution.mean;
            crate::methods::ddpo::to_f32(m.reshape([4]))
        };
        let (a, b) = (mean(0.0)?, mean(1.0)?);
        // A unit change of the prediction moves the step's mean by more than rounding.
        if a.iter().zip(&b).any(|(u, v)| (u - v).abs() > 1e-4) {
            return Ok(());
        }
    }
    Err(Error::config(
        field,
        format!(
            "the last {k} of this sampler's {steps} steps do not depend on the model's \
             prediction (e.g. DDIM's last step from timestep 0 is the identity when \
             steps_offset = 0), so no reward gradient reaches the weights; differentiate more steps"
        ),
    ))
}

/// The first `steps` steps of the chains of `s` under the policy's current weights, without a
/// graph: x after them, and the chains' noise streams positioned after their draws.
pub(crate) fn run_prefix<M: PolicyModel>(
    policy: &crate::Policy<M>,
    s: &crate::batch::Starts,
    steps: usize,
) -> Result<(Tensor<4>, ExampleNoise)> {
    run_prefix_with(policy, &policy.current(), s, steps)
}

/// [`run_prefix`] under the weights `frozen` (a plain-device model: the reference, say).
pub(crate) fn run_prefix_with<M: PolicyModel>(
    policy: &crate::Policy<M>,
    frozen: &M,
    s: &crate::batch::Starts,
    steps: usize,
) -> Result<(Tensor<4>, ExampleNoise)> {
    let device = &policy.device;
    let sampler = policy.sampler.as_ref();
    let shape: [usize; 4] = s.x_t.dims();
    let cond = policy.conditioning(&s.prompts, device);
    let mut noise = s.noise.clone();
    let mut x = s.x_t.clone();
    for (i, &t) in sampler.timesteps().iter().enumerate().take(steps) {
        let z = noise.draw(shape, device)?;
        let pred = cond.predict(frozen, x.clone(), t);
        x = sampler.step(pred, i, x)?.distribution.sample(z);
    }
    Ok((x, noise))
}

/// A reward tensor's values; a non-finite one is an error naming the reward and the example.
pub(crate) fn reward_values(reward: &dyn tiller_reward::Reward, r: &Tensor<1>) -> Result<Vec<f64>> {
    let values: Vec<f64> = crate::methods::ddpo::to_f32(r.clone().inner())?
        .into_iter()
        .map(f64::from)
        .collect();
    finite_rewards(reward, values)
}

/// `values`, the scores of `reward`; a non-finite one is an error naming the reward and the
/// example.
pub(crate) fn finite_rewards(
    reward: &dyn tiller_reward::Reward,
    values: Vec<f64>,
) -> Result<Vec<f64>> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(Error::NonFinite(format!(
            "reward `{}` returned {} for example {i}",
            reward.name(),
            values[i]
        ))),
        None => Ok(values),
    }
}

/// The differentiable form of the run's reward, or an error naming `method`.
pub(crate) fn differentiable<'a>(
    reward: &'a dyn tiller_reward::Reward,
    method: &str,
) -> Result<&'a dyn tiller_reward::DifferentiableReward> {
    reward.differentiable().ok_or_else(|| {
        Error::config(
            "reward",
            format!(
                "{method} backpropagates the reward, but `{}` is not differentiable; use a reward model folder",
                reward.name()
            ),
        )
    })
}

pub struct DraftK {
    /// Differentiated steps from the end of the chain (0: all).
    pub k: usize,
}

impl<M: PolicyModel> Algorithm<M> for DraftK {
    fn name(&self) -> &'static str {
        "draft-k"
    }

    fn collects(&self) -> Collect {
        Collect::Starts
    }

    fn gradients(
        &mut self,
        cx: &Context<'_, M>,
        batch: &Batch,
        scale: f64,
        _rng: &mut SeededRng,
    ) -> Result<MicroStep> {
        let Batch::Starts(s) = batch else {
            return Err(Error::invalid("draft-k needs chain starts"));
        };
        // Maximise the mean reward: minimise its negative.
        backprop_reward(cx, s, scale, self.k, "draft-k", &|r, _| r.neg())
    }
}

/// The reward-backpropagation update shared by DRaFT-K and AlignProp: the chains of `s` sampled
/// to the end, and the gradient of `scale * mean(objective(r(x_0)))` (plus the per-step KL to the
/// reference at every differentiated step when `train.kl_weight > 0`) through the last `k` steps
/// (0: all; memory stays one step's graph by step-level recomputation). `objective` maps the
/// rewards [B] and the images they score [B, 3, H, W] (differentiable) to per-sample losses [B].
pub(crate) fn backprop_reward<M: PolicyModel>(
    cx: &Context<'_, M>,
    s: &crate::batch::Starts,
    scale: f64,
    k: usize,
    method: &str,
    objective: &dyn Fn(Tensor<1>, Tensor<4>) -> Tensor<1>,
) -> Result<MicroStep> {
    backprop_reward_to(cx, s, scale, k, method, objective, None)
}

/// [`backprop_reward`] with the KL taken to `reference` instead of the policy's frozen base when
/// one is given (SEIKO: the model as the round began).
pub(crate) fn backprop_reward_to<M: PolicyModel>(
    cx: &Context<'_, M>,
    s: &crate::batch::Starts,
    scale: f64,
    k: usize,
    method: &str,
    objective: &dyn Fn(Tensor<1>, Tensor<4>) -> Tensor<1>,
    reference: Option<&M>,
) -> Result<MicroStep> {
    let reward = differentiable(cx.reward, method)?;
    let policy = cx.policy;
    let cond = policy.conditioning(&s.prompts, &policy.device);
    let k = if k == 0 { usize::MAX } else { k };
    let scores: RefCell<Option<Result<Vec<f64>>>> = RefCell::new(None);
    let objective_value: RefCell<f64> = RefCell::new(0.0);
    let texts = &s.prompts.texts;
    let loss = |x0: burn::tensor::Tensor<4>| {
        let out = policy.reward_loss(x0, |images| {
            let r = reward.score_tensor(images.clone(), texts)?;
            *scores.borrow_mut() = Some(to_vec(&r));
            let l = objective(r, images).mean();
            *objective_value.borrow_mut() = l.clone().into_scalar::<f64>();
            // Scaled for accumulation.
            Ok(l * scale)
        });
        match out {
            Ok(l) => l,
            Err(e) => {
                *scores.borrow_mut() = Some(Err(e));
                // A constant NaN loss: the chain code reports it as non-finite; the reward's
                // own error is returned below instead.
                burn::tensor::Tensor::<1>::from_floats([f32::NAN], &policy.autodiff_device())
            }
        }
    };
    let kl_weight = cx.kl_weight;
    // The KL term is the mean over the differentiated steps (Tiller's one normalisation, as
    // DDPO's and DPOK's over their trained steps); a deterministic step counts with KL 0.
    let differentiated = k.min(policy.sampler.timesteps().len()).max(1) as f64;
    let mut kl_sum = 0.0;
    let mut kl_steps = 0usize;
    let mut penalty = |i: usize, x_in: burn::tensor::Tensor<4>, dist: &Gaussian| {
        if dist.is_deterministic() {
            // A deterministic step (DDIM's last with alpha_prev = 1) has no density: both
            // models' steps are point masses and the KL is not defined; it adds nothing.
            return Ok(burn::tensor::Tensor::<1>::zeros([1], &x_in.device()));
        }
        let kl = policy
            .kl_to(
                reference.unwrap_or(&policy.reference),
                &cond,
                dist,
                &x_in,
                i,
            )?
            .mean();
        kl_sum += kl.clone().into_scalar::<f64>();
        kl_steps += 1;
        Ok(kl * (kl_weight * scale / differentiated))
    };
    let penalty_ref: Option<&mut StepPenalty<'_>> = if kl_weight > 0.0 {
        Some(&mut penalty)
    } else {
        None
    };
    let mut chain_noise = s.noise.clone();
    let result = backprop_through_sampling_with(
        &policy.model,
        policy.sampler.as_ref(),
        &cond,
        s.x_t.clone(),
        &mut chain_noise,
        k,
        loss,
        penalty_ref,
    );
    let rewards = match scores.into_inner() {
        Some(r) => r?,
        None => return Err(Error::invalid("the reward was never evaluated")),
    };
    let out = result?;
    // The rewards themselves are logged by the loop (reward_mean / reward_std).
    let mut metrics = Vec::new();
    if kl_steps > 0 {
        metrics.push(("kl", kl_sum / kl_steps as f64));
    }
    // The objective: its mean + kl_weight * (the KL's mean over differentiated steps).
    let kl_term = if kl_weight > 0.0 {
        out.penalty / scale
    } else {
        0.0
    };
    Ok(MicroStep {
        grads: out.grads,
        loss: objective_value.into_inner() + kl_term,
        metrics,
        rewards,
    })
}

pub(crate) fn to_vec(t: &burn::tensor::Tensor<1>) -> Result<Vec<f64>> {
    let v = t
        .clone()
        .inner()
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| Error::invalid(format!("{e:?}")))?;
    Ok(v.into_iter().map(f64::from).collect())
}
