//! Sampling: the denoising chain, recording what the RL methods need, or differentiating through it.
//!
//! - [`sample`] runs the chain without a graph and can record every x_t, each step's Gaussian and
//!   the log-probability of the step taken (DDPO, DPOK, GRPO read these).
//! - [`backprop_through_sampling`] computes the gradient of a loss on the final sample with respect
//!   to the model's parameters through the last K steps (DRaFT-K, AlignProp; K = all allowed).
//!   Memory is bounded by step-level recomputation: the chain runs once without a graph keeping only
//!   each step's input; then, from the last step back, one step at a time is recomputed with a graph
//!   and the vector-Jacobian product is pushed through it. Peak memory is that of one step's graph,
//!   whatever K is; the cost is one extra forward per differentiated step.
//!
//! All noise comes from the caller's [`NoiseSource`], drawn in a fixed order (initial noise first,
//! then one draw per step, also for deterministic steps), so the same seed gives the same chain
//! whatever is recorded or differentiated. [`ExampleNoise`] gives every example its own stream, so
//! an image depends on (seed, its index) and never on the batch it was sampled in.

use crate::distribution::{Gaussian, LogProbReduction};
use crate::models::unet::{AddedConditions, UNet2DConditionModel};
use crate::schedulers::Scheduler;
use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Tensor, TensorData};
use std::ops::Range;
use tiller_core::{Error, Result, SeededRng};

/// Where a chain's noise comes from: each call draws one standard-normal tensor [B, C, H, W].
pub trait NoiseSource {
    fn draw(&mut self, shape: [usize; 4], device: &Device) -> Result<Tensor<4>>;
}

/// One stream for the whole batch: what each example gets depends on the batch's layout.
impl NoiseSource for SeededRng {
    fn draw(&mut self, shape: [usize; 4], device: &Device) -> Result<Tensor<4>> {
        Ok(self.normal(shape, device))
    }
}

/// One stream per example: example `b` of every draw comes from stream `b` alone, so a chain is
/// the same whether its example is sampled alone, in a batch of 4 or of 7.
#[derive(Debug, Clone)]
pub struct ExampleNoise {
    streams: Vec<SeededRng>,
}

impl ExampleNoise {
    pub fn new(streams: Vec<SeededRng>) -> Self {
        Self { streams }
    }

    /// The streams of examples `indices` under `seed` ([`SeededRng::for_example`]).
    pub fn for_examples(seed: u64, indices: impl IntoIterator<Item = u64>) -> Self {
        Self::new(
            indices
                .into_iter()
                .map(|i| SeededRng::for_example(seed, i))
                .collect(),
        )
    }

    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// The streams of examples `r` (a micro-batch), at their current positions.
    pub fn slice(&self, r: Range<usize>) -> Self {
        Self::new(self.streams[r].to_vec())
    }

    /// The streams of several parts, in order.
    pub fn concat(parts: impl IntoIterator<Item = ExampleNoise>) -> Self {
        Self::new(parts.into_iter().flat_map(|p| p.streams).collect())
    }

    /// One uniform draw in `0..n` per example, each from its own stream.
    pub fn below(&mut self, n: usize) -> Vec<usize> {
        self.streams.iter_mut().map(|s| s.below(n)).collect()
    }
}

impl NoiseSource for ExampleNoise {
    fn draw(&mut self, shape: [usize; 4], device: &Device) -> Result<Tensor<4>> {
        let [b, c, h, w] = shape;
        if b != self.streams.len() {
            return Err(Error::invalid(format!(
                "a batch of {b} examples drew noise from {} per-example streams",
                self.streams.len()
            )));
        }
        let mut v = Vec::with_capacity(b * c * h * w);
        for s in &mut self.streams {
            v.extend(s.normal_vec(c * h * w));
        }
        Ok(Tensor::from_data(TensorData::new(v, shape), device))
    }
}

/// A network that predicts the scheduler's target from a noisy sample.
///
/// Narrow on purpose: algorithms are written against this trait and tested on toy denoisers.
pub trait Denoiser {
    /// x_t: [B, C, H, W], timesteps: [B], context: [B, L, D] -> prediction [B, C, H, W]
    fn predict(&self, x_t: Tensor<4>, timesteps: Tensor<1>, context: Tensor<3>) -> Tensor<4>;

    /// [`Self::predict`] with SDXL's added conditioning (pooled text embeddings and time ids,
    /// batched as x_t). Only models that take it need to implement this.
    fn predict_added(
        &self,
        x_t: Tensor<4>,
        timesteps: Tensor<1>,
        context: Tensor<3>,
        added: &AddedConditions,
    ) -> Tensor<4> {
        let _ = added;
        self.predict(x_t, timesteps, context)
    }
}

impl Denoiser for UNet2DConditionModel {
    fn predict(&self, x_t: Tensor<4>, timesteps: Tensor<1>, context: Tensor<3>) -> Tensor<4> {
        self.forward(x_t, timesteps, context)
    }

    fn predict_added(
        &self,
        x_t: Tensor<4>,
        timesteps: Tensor<1>,
        context: Tensor<3>,
        added: &AddedConditions,
    ) -> Tensor<4> {
        self.forward_with(x_t, timesteps, context, Some(added))
    }
}

/// Classifier-free guidance (Ho & Salimans 2022): `uncond + scale * (cond - uncond)`.
/// uncond, cond: [B, C, H, W]
pub fn classifier_free_guidance(uncond: Tensor<4>, cond: Tensor<4>, scale: f64) -> Tensor<4> {
    uncond.clone() + (cond - uncond) * scale
}

/// The conditioning of one sampling run.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// context: [B, L, D], the text encoder's hidden states for each sample's prompt.
    pub context: Tensor<3>,
    /// The empty prompt's hidden states [B, L, D] and the guidance scale, for classifier-free
    /// guidance; `None` samples from the conditional model alone.
    pub guidance: Option<(Tensor<3>, f64)>,
    /// SDXL's added conditioning for the prompts and, under guidance, for the unconditional
    /// half: `(cond, uncond)`.
    pub added: Option<(AddedConditions, Option<AddedConditions>)>,
}

impl Conditioning {
    /// Conditioning without guidance.
    pub fn new(context: Tensor<3>) -> Self {
        Self {
            context,
            guidance: None,
            added: None,
        }
    }

    /// With SDXL's added conditioning: `cond` for the prompts, `uncond` for the unconditional
    /// half under guidance.
    pub fn with_added(mut self, cond: AddedConditions, uncond: Option<AddedConditions>) -> Self {
        self.added = Some((cond, uncond));
        self
    }

    /// With classifier-free guidance at `scale` against the unconditional `uncond` [B, L, D].
    pub fn with_guidance(mut self, uncond: Tensor<3>, scale: f64) -> Self {
        self.guidance = Some((uncond, scale));
        self
    }

    /// The model's (guided) prediction. Runs conditional and unconditional halves as one batch.
    pub fn predict<M: Denoiser>(&self, model: &M, x_t: Tensor<4>, t: f64) -> Tensor<4> {
        let b = x_t.dims()[0];
        let device = x_t.device();
        match &self.guidance {
            None => {
                let ts = Tensor::<1>::from_data(TensorData::new(vec![t as f32; b], [b]), &device);
                match &self.added {
                    None => model.predict(x_t, ts, self.context.clone()),
                    Some((added, _)) => model.predict_added(x_t, ts, self.context.clone(), added),
                }
            }
            Some((uncond, scale)) => {
                let ts = Tensor::<1>::from_data(
                    TensorData::new(vec![t as f32; 2 * b], [2 * b]),
                    &device,
                );
                let x = Tensor::cat(vec![x_t.clone(), x_t], 0);
                let ctx = Tensor::cat(vec![uncond.clone(), self.context.clone()], 0);
                let out = match &self.added {
                    None => model.predict(x, ts, ctx),
                    Some((cond, uncond)) => {
                        let uncond = uncond
                            .as_ref()
                            .expect("guided SDXL conditioning has an unconditional half");
                        model.predict_added(x, ts, ctx, &uncond.cat(cond))
                    }
                };
                let mut halves = out.chunk(2, 0);
                let cond = halves.pop().expect("two halves");
                let unc = halves.pop().expect("two halves");
                classifier_free_guidance(unc, cond, *scale)
            }
        }
    }

    /// The same conditioning on `device` (for example the autodiff one).
    pub fn to_device(&self, device: &Device) -> Self {
        Self {
            context: self.context.clone().to_device(device),
            guidance: self
                .guidance
                .as_ref()
                .map(|(u, s)| (u.clone().to_device(device), *s)),
            added: self
                .added
                .as_ref()
                .map(|(c, u)| (c.to_device(device), u.as_ref().map(|u| u.to_device(device)))),
        }
    }
}

/// What [`sample`] records besides the final sample.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Record {
    /// Only the final sample.
    #[default]
    Nothing,
    /// Every x_t, each step's Gaussian and the log-probability of the step taken.
    Trajectory(LogProbReduction),
}

/// The recorded chain of one [`sample`] call.
#[derive(Debug, Clone)]
pub struct Trajectory {
    /// x_T, ..., x_0: `steps + 1` tensors [B, C, H, W].
    pub latents: Vec<Tensor<4>>,
    /// The model timesteps of each step (`steps`).
    pub timesteps: Vec<f64>,
    /// Each step's Gaussian pi(x_{t-1} | x_t) (`steps`).
    pub distributions: Vec<Gaussian>,
    /// log pi(x_{t-1} | x_t) of the step taken, [B] each; `None` for deterministic steps.
    pub log_probs: Vec<Option<Tensor<1>>>,
    /// The model's estimate of x_0 at each step, from x_t (`steps`, [B, C, H, W] each).
    pub predicted: Vec<Tensor<4>>,
}

/// The result of [`sample`].
#[derive(Debug, Clone)]
pub struct Sample {
    /// x_0: [B, C, H, W]
    pub images: Tensor<4>,
    pub trajectory: Option<Trajectory>,
}

/// Draws the initial noise x_T: [B, C, H, W], scaled by the scheduler's `init_noise_sigma`.
pub fn initial_noise(
    scheduler: &dyn Scheduler,
    shape: [usize; 4],
    noise: &mut dyn NoiseSource,
    device: &Device,
) -> Result<Tensor<4>> {
    Ok(noise.draw(shape, device)? * scheduler.init_noise_sigma())
}

/// Runs the whole chain from `x_t` (usually [`initial_noise`]) without a graph.
pub fn sample<M: Denoiser>(
    model: &M,
    scheduler: &dyn Scheduler,
    cond: &Conditioning,
    x_t: Tensor<4>,
    noise: &mut dyn NoiseSource,
    record: Record,
) -> Result<Sample> {
    let shape: [usize; 4] = x_t.dims();
    let device = x_t.device();
    let mut x = x_t;
    let mut traj = match record {
        Record::Nothing => None,
        Record::Trajectory(_) => Some(Trajectory {
            latents: vec![x.clone()],
            timesteps: Vec::new(),
            distributions: Vec::new(),
            log_probs: Vec::new(),
            predicted: Vec::new(),
        }),
    };
    for (i, &t) in scheduler.timesteps().iter().enumerate() {
        let pred = cond.predict(model, x.clone(), t);
        let step = scheduler.step(pred, i, x)?;
        let next = step.distribution.sample(noise.draw(shape, &device)?);
        if let (Some(traj), Record::Trajectory(reduction)) = (traj.as_mut(), record) {
            let lp = if step.distribution.is_deterministic() {
                None
            } else {
                Some(step.distribution.log_prob(next.clone(), reduction)?)
            };
            traj.timesteps.push(t);
            traj.latents.push(next.clone());
            traj.distributions.push(step.distribution);
            traj.log_probs.push(lp);
            traj.predicted.push(step.pred_original_sample);
        }
        x = next;
    }
    Ok(Sample {
        images: x,
        trajectory: traj,
    })
}

/// The KL from `model`'s chain to `reference`'s, per dimension, summed over the chain's steps and
/// averaged over the batch: along `model`'s own chain from `x_t` (noise from `noise`, in
/// [`sample`]'s order), the Gaussian KL between its step and `reference`'s step from the same
/// x_t. Deterministic steps have no density and add nothing. 0 when the models are equal.
pub fn chain_kl<M: Denoiser, R: Denoiser>(
    model: &M,
    reference: &R,
    scheduler: &dyn Scheduler,
    cond: &Conditioning,
    x_t: Tensor<4>,
    noise: &mut dyn NoiseSource,
) -> Result<f64> {
    let shape: [usize; 4] = x_t.dims();
    let device = x_t.device();
    let mut x = x_t;
    let mut total = 0.0;
    for (i, &t) in scheduler.timesteps().iter().enumerate() {
        let p = scheduler
            .step(cond.predict(model, x.clone(), t), i, x.clone())?
            .distribution;
        let q = scheduler
            .step(cond.predict(reference, x.clone(), t), i, x.clone())?
            .distribution;
        if !p.is_deterministic() {
            total += p
                .kl(&q, LogProbReduction::Mean)?
                .mean()
                .into_scalar::<f64>();
        }
        x = p.sample(noise.draw(shape, &device)?);
    }
    Ok(total)
}

/// The result of [`backprop_through_sampling`].
pub struct ChainGradients {
    /// The loss value at the final sample.
    pub loss: f64,
    /// x_0: [B, C, H, W], without a graph.
    pub images: Tensor<4>,
    /// d loss / d parameters, accumulated over the differentiated steps.
    pub grads: GradientsParams,
    /// The sum of the per-step penalties (0 without one).
    pub penalty: f64,
}

/// A per-step term added to the objective of [`backprop_through_sampling_with`]: called with the
/// step index, its input x_t (on the autodiff device, with a graph) and the model's step
/// distribution; returns a one-element tensor (e.g. a weighted KL to a reference model).
pub type StepPenalty<'a> = dyn FnMut(usize, Tensor<4>, &Gaussian) -> Result<Tensor<1>> + 'a;

/// Gradient of `loss(x_0)` with respect to `model`'s parameters through the last `k` steps of the
/// chain started at `x_t` (`k = usize::MAX` or any `k >= steps` means all of them), with step-level
/// recomputation so that peak memory is one step's graph.
///
/// `model` lives on an autodiff device; `x_t` and the conditioning may be on either. Earlier steps
/// run without a graph (DRaFT-K stops the gradient there). `loss` maps x_0 [B, C, H, W] to a
/// one-element tensor; it may hold a graph of its own (a differentiable reward).
pub fn backprop_through_sampling<M>(
    model: &M,
    scheduler: &dyn Scheduler,
    cond: &Conditioning,
    x_t: Tensor<4>,
    noise: &mut dyn NoiseSource,
    k: usize,
    loss: impl FnOnce(Tensor<4>) -> Tensor<1>,
) -> Result<ChainGradients>
where
    M: Denoiser + Module,
{
    backprop_through_sampling_with(model, scheduler, cond, x_t, noise, k, loss, None)
}

/// [`backprop_through_sampling`] with a per-step `penalty` added to the objective at every
/// differentiated step: the gradient is that of `loss(x_0) + sum_i penalty_i` with respect to the
/// parameters through the last `k` steps (the penalty's dependence on x_t flows back too).
pub fn backprop_through_sampling_with<M>(
    model: &M,
    scheduler: &dyn Scheduler,
    cond: &Conditioning,
    x_t: Tensor<4>,
    noise: &mut dyn NoiseSource,
    k: usize,
    loss: impl FnOnce(Tensor<4>) -> Tensor<1>,
    mut penalty: Option<&mut StepPenalty<'_>>,
) -> Result<ChainGradients>
where
    M: Denoiser + Module,
{
    let ad_device = model
        .devices()
        .first()
        .cloned()
        .ok_or_else(|| Error::invalid("model has no parameters"))?;
    if !ad_device.is_autodiff() {
        return Err(Error::invalid(
            "backprop_through_sampling needs the model on an autodiff device (Device::autodiff())",
        ));
    }
    let plain = ad_device.clone().inner();
    let frozen = model.valid();
    let cond_plain = cond.to_device(&plain);
    let cond_ad = cond.to_device(&ad_device);
    let shape: [usize; 4] = x_t.dims();
    let timesteps = scheduler.timesteps().to_vec();
    let n = timesteps.len();
    let first_diff = n.saturating_sub(k);

    // Forward without a graph, keeping the input and the noise of each differentiated step.
    let mut x = x_t.to_device(&plain);
    let mut saved: Vec<(Tensor<4>, Tensor<4>)> = Vec::with_capacity(n - first_diff);
    for (i, &t) in timesteps.iter().enumerate() {
        let z = noise.draw(shape, &plain)?;
        if i >= first_diff {
            saved.push((x.clone(), z.clone()));
        }
        let pred = cond_plain.predict(&frozen, x.clone(), t);
        x = scheduler.step(pred, i, x)?.distribution.sample(z);
    }

    // d loss / d x_0.
    let x0 = x.clone().autodiff().require_grad();
    let l = loss(x0.clone());
    let loss_value = l.clone().into_scalar::<f32>() as f64;
    if !loss_value.is_finite() {
        return Err(Error::NonFinite(format!(
            "loss at the final sample is {loss_value}"
        )));
    }
    let mut grads = l.backward();
    let mut upstream = x0
        .grad_remove(&mut grads)
        .ok_or_else(|| Error::invalid("loss does not depend on the sample"))?;
    let mut acc = GradientsAccumulator::<M>::new();
    acc.accumulate(model, GradientsParams::from_grads(grads, model));
    let mut penalty_total = 0.0;

    // Backward through the saved steps, last first: recompute one step with a graph, push the
    // vector-Jacobian product <upstream, step(x_i)> back to x_i, keep the parameter gradients.
    for (j, (x_in, z)) in saved.into_iter().enumerate().rev() {
        let i = first_diff + j;
        let x_in = x_in.autodiff().require_grad();
        let pred = cond_ad.predict(model, x_in.clone(), timesteps[i]);
        let dist = scheduler.step(pred, i, x_in.clone())?.distribution;
        let out = dist.sample(z.autodiff());
        let mut surrogate = (out * upstream.autodiff()).sum();
        if let Some(p) = penalty.as_mut() {
            let term = p(i, x_in.clone(), &dist)?;
            let v = term.clone().into_scalar::<f32>() as f64;
            if !v.is_finite() {
                return Err(Error::NonFinite(format!("step penalty at step {i} is {v}")));
            }
            penalty_total += v;
            surrogate = surrogate + term.sum();
        }
        let mut g = surrogate.backward();
        upstream = x_in
            .grad_remove(&mut g)
            .ok_or_else(|| Error::invalid("the step does not depend on its input"))?;
        acc.accumulate(model, GradientsParams::from_grads(g, model));
    }

    Ok(ChainGradients {
        loss: loss_value,
        images: x,
        grads: acc.grads(),
        penalty: penalty_total,
    })
}
