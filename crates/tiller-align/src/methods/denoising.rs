//! The denoising objective on given images, `E ||target - model(x_t, t, c)||^2` (the base
//! model's own training loss): what RWR, RAFT and reward-weighted likelihood fit the policy's
//! own samples with, and the pre-training regulariser of ReFL and reward-weighted likelihood.

use crate::PolicyModel;
use crate::batch::Supervised;
use crate::methods::diffusion_dpo::denoising_error;
use crate::policy::Policy;
use burn::tensor::{Tensor, TensorData};
use tiller_core::{Error, Result};

/// `mean_b w_b d_b` on the autodiff device, where `d_b` is image `b`'s denoising error (mean over
/// C, H, W) at its own noise and timestep under the trainable model, with the prompt as
/// conditioning (the conditional model, as the base was trained). `weights = None` weighs every
/// image 1. Methods normalise their weights over the whole collected batch (mean 1), so that the
/// mean over a micro-batch, scaled by the loop's `1 / grad_accum`, sums to the whole batch's
/// weighted mean.
pub fn weighted_loss<M: PolicyModel>(
    policy: &Policy<M>,
    images: &Supervised,
    weights: Option<&[f64]>,
) -> Result<Tensor<1>> {
    let b = images.timesteps.len();
    let ts = &images.timesteps;
    let x_t = policy
        .noise
        .add_noise(images.images.clone(), images.noise.clone(), ts)?;
    let target = policy
        .noise
        .training_target(images.images.clone(), images.noise.clone(), ts)?;
    let d = denoising_error(
        &policy.model,
        x_t.autodiff(),
        target.autodiff(),
        ts,
        &policy.conditional(&images.prompts, &policy.autodiff_device()),
    );
    let w: Vec<f32> = match weights {
        Some(w) if w.len() != b => {
            return Err(Error::invalid(format!(
                "{} weights for {b} images",
                w.len()
            )));
        }
        Some(w) => w.iter().map(|&v| v as f32).collect(),
        None => vec![1.0; b],
    };
    let w = Tensor::<1>::from_data(TensorData::new(w, [b]), &d.device());
    Ok((d * w).mean())
}
