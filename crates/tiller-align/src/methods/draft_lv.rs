//! DRaFT-LV (Clark et al., "Directly Fine-Tuning Diffusion Models on Differentiable Rewards",
//! ICLR 2024, section 4): DRaFT-1 with a lower-variance gradient. The chain is sampled without a
//! graph; at its last step the reward gradient of the sample is taken as in DRaFT-1, and `n`
//! more examples are made by re-noising the (detached) final sample back to the last step's
//! timestep and denoising it once, with the reward gradients of all `n + 1` averaged:
//!
//! ```text
//! x_1 = the chain's input to its last step;  x0 = step(x_1) (no graph)
//! x_1^j = sqrt(abar_t1) sg(x0) + sqrt(1 - abar_t1) eps_j,   j = 1..n     (re-noised)
//! L = -mean over {x_1, x_1^1, ..., x_1^n} and the batch of r(step_theta(x_1^.), c)
//! ```
//!
//! The paper's code is not public; this is our reading of its description ("generate n
//! additional examples at the last step by noising and denoising the final sample"), with
//! `n = 2` as the paper's choice (marked unverified in `methods.md` §2.6). The `n + 1` examples
//! share one batched model call with a graph; each example's re-noising noise comes from its own
//! stream after its chain's draws, so a chain's extra examples do not depend on its micro-batch.
//! Every reward gradient is one reward query: an update spends `(n + 1) x batch`. With
//! `train.kl_weight > 0` the per-step KL to the reference at the last step is added.

use crate::batch::{Batch, Collect};
use crate::config::AlignConfig;
use crate::methods::MethodSpec;
use crate::methods::draft_k::{check_last_steps, differentiable, reward_values, run_prefix};
use crate::{Algorithm, Context, MicroStep, PolicyModel};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};
use tiller_core::{Error, Result, SeededRng};
use tiller_diffusion::sampling::NoiseSource;
use tiller_diffusion::schedulers::Scheduler;

/// `[method.draft-lv]`: DRaFT-LV.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DraftLvConfig {
    /// Extra re-noised examples per chain at the last step.
    pub extra: usize,
}

impl Default for DraftLvConfig {
    fn default() -> Self {
        Self { extra: 2 }
    }
}

impl MethodSpec for DraftLvConfig {
    fn name(&self) -> &'static str {
        "draft-lv"
    }

    fn paper(&self) -> &'static str {
        "Clark et al., Directly Fine-Tuning Diffusion Models on Differentiable Rewards (DRaFT-LV), ICLR 2024"
    }

    fn validate(&self, _config: &AlignConfig) -> Result<()> {
        Ok(())
    }

    fn build<M: PolicyModel>(&self) -> Box<dyn Algorithm<M>> {
        Box::new(DraftLv { extra: self.extra })
    }

    /// The last step must depend on the model's prediction.
    fn check_sampler(&self, sampler: &dyn Scheduler, device: &Device) -> Result<()> {
        check_last_steps(sampler, 1, device, "method.draft-lv")
    }

    /// Each update spends `(extra + 1) x batch` reward gradients.
    fn size_to_budget(&self, config: &AlignConfig, budget: u64) -> (Vec<String>, u64) {
        let train = &config.train;
        let per_update = (train.effective_batch().max(1) * (self.extra + 1)) as u64;
        (
            vec![format!("train.reward_budget={budget}")],
            budget.div_ceil(per_update),
        )
    }
}

pub struct DraftLv {
    pub extra: usize,
}

impl<M: PolicyModel> Algorithm<M> for DraftLv {
    fn name(&self) -> &'static str {
        "draft-lv"
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
            return Err(Error::invalid("draft-lv needs chain starts"));
        };
        let reward = differentiable(cx.reward, "draft-lv")?;
        let policy = cx.policy;
        let device = &policy.device;
        let sampler = policy.sampler.as_ref();
        let timesteps = sampler.timesteps().to_vec();
        let last = timesteps.len() - 1;
        let shape: [usize; 4] = s.x_t.dims();
        let b = shape[0];

        // The chain to its last step's input, without a graph.
        let (x, mut noise) = run_prefix(policy, s, last)?;
        let z = noise.draw(shape, device)?;
        let t = timesteps[last];
        let pred = policy
            .conditioning(&s.prompts, device)
            .predict(&policy.current(), x.clone(), t);
        let x0 = sampler
            .step(pred, last, x.clone())?
            .distribution
            .sample(z.clone());

        // The extra examples: x0 re-noised to the last step's timestep.
        let mut inputs = vec![x];
        let mut step_noise = vec![z];
        for _ in 0..self.extra {
            let eps = noise.draw(shape, device)?;
            inputs.push(policy.noise.add_noise(x0.clone(), eps, &vec![t; b])?);
            step_noise.push(noise.draw(shape, device)?);
        }
        let parts = self.extra + 1;
        let x_in = Tensor::cat(inputs, 0).autodiff();
        let z = Tensor::cat(step_noise, 0).autodiff();
        let all = s.prompts.repeat(parts);
        let ad = policy.autodiff_device();
        let cond_all = policy.conditioning(&all, &ad);
        let pred = cond_all.predict(&policy.model, x_in.clone(), t);
        let dist = sampler.step(pred, last, x_in.clone())?.distribution;
        let out = dist.sample(z);
        let mut rewards = Vec::new();
        let mut loss = policy.reward_loss(out, |images| {
            let r = reward.score_tensor(images, &all.texts)?;
            rewards = reward_values(cx.reward, &r)?;
            Ok(r.mean().neg())
        })?;
        let mut metrics = Vec::new();
        if cx.kl_weight > 0.0 && !dist.is_deterministic() {
            let kl = policy
                .kl_to_reference(&cond_all, &dist, &x_in, last)?
                .mean();
            metrics.push(("kl", kl.clone().into_scalar::<f64>()));
            loss = loss + kl * cx.kl_weight;
        }
        let value = loss.clone().into_scalar::<f64>();
        let grads = GradientsParams::from_grads((loss * scale).backward(), &policy.model);
        // The spread of the extra examples' rewards around the chain's own sample's.
        let own = &rewards[..b];
        let spread = rewards[b..]
            .iter()
            .enumerate()
            .map(|(j, v)| (v - own[j % b]).abs())
            .sum::<f64>()
            / (rewards.len() - b).max(1) as f64;
        if self.extra > 0 {
            metrics.push(("extra_reward_gap", spread));
        }
        Ok(MicroStep {
            grads,
            loss: value,
            metrics,
            rewards,
        })
    }
}
