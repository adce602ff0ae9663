//! Sampling invariants on the tiny SD 2.x-style UNet fixture: trajectories record what was
//! sampled, the seed alone fixes the chain, classifier-free guidance reduces to the conditional
//! model at scale 1, and the memory-bounded reward backprop gives the same gradients as
//! differentiating the whole unrolled chain.

use burn::module::{Module, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};
use std::path::Path;
use tiller_core::SeededRng;
use tiller_diffusion::models::load_unet;
use tiller_diffusion::models::unet::UNet2DConditionModel;
use tiller_diffusion::sampling::{
    Conditioning, ExampleNoise, Record, backprop_through_sampling, initial_noise, sample,
};
use tiller_diffusion::schedulers::{DdimConfig, SchedulerConfig};
use tiller_diffusion::{LogProbReduction, Scheduler};
use tiller_testkit::assert_close;

fn unet(device: &Device) -> UNet2DConditionModel {
    let dir = Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
        .join("tests/fixtures/tiny-unet-sd2");
    load_unet(&dir, None, device).unwrap().1
}

/// DDIM as Stable Diffusion's scheduler configs set it (`set_alpha_to_one = false`,
/// `steps_offset = 1`), so that with eta > 0 every step, the last included, has a density. (With
/// `steps_offset = 0` the last timestep is 0, whose previous alpha_bar is alpha_bar_0 itself, and
/// the step's variance (1 - abar_prev)/(1 - abar_t) * (1 - abar_t/abar_prev) is exactly 0.)
fn ddim(eta: f64, steps: usize) -> Box<dyn Scheduler> {
    SchedulerConfig::Ddim(DdimConfig {
        eta,
        set_alpha_to_one: false,
        steps_offset: 1,
        ..Default::default()
    })
    .build(steps)
    .unwrap()
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

fn context(rng: &mut SeededRng, b: usize, device: &Device) -> Tensor<3> {
    rng.normal([b, 5, 32], device)
}

#[test]
fn trajectory_records_the_chain_and_its_log_probs() {
    let device = Device::flex();
    let model = unet(&device);
    let scheduler = ddim(1.0, 4);
    let mut rng = SeededRng::new(3);
    let cond = Conditioning::new(context(&mut rng, 2, &device));
    let x_t = initial_noise(scheduler.as_ref(), [2, 3, 8, 8], &mut rng, &device).unwrap();

    let mut r1 = SeededRng::new(11);
    let plain = sample(
        &model,
        scheduler.as_ref(),
        &cond,
        x_t.clone(),
        &mut r1,
        Record::Nothing,
    )
    .unwrap();
    let mut r2 = SeededRng::new(11);
    let recorded = sample(
        &model,
        scheduler.as_ref(),
        &cond,
        x_t.clone(),
        &mut r2,
        Record::Trajectory(LogProbReduction::Mean),
    )
    .unwrap();
    // Recording does not change what is sampled.
    assert_eq!(
        values(plain.images.clone()),
        values(recorded.images.clone())
    );
    let traj = recorded.trajectory.unwrap();
    assert_eq!(traj.latents.len(), 5);
    assert_eq!(traj.timesteps, scheduler.timesteps().to_vec());
    assert_eq!(values(traj.latents[0].clone()), values(x_t));
    assert_eq!(values(traj.latents[4].clone()), values(recorded.images));
    // Each recorded log-prob is the density of the recorded next latent under the recorded step.
    for i in 0..4 {
        let lp = traj.log_probs[i]
            .clone()
            .expect("eta = 1 steps are stochastic");
        let again = traj.distributions[i]
            .log_prob(traj.latents[i + 1].clone(), LogProbReduction::Mean)
            .unwrap();
        assert_eq!(values(lp.clone()), values(again));
        assert_eq!(lp.dims(), [2]);
    }
    // Same seed, same chain; another seed, another chain.
    let mut r3 = SeededRng::new(12);
    let other = sample(
        &model,
        scheduler.as_ref(),
        &cond,
        traj.latents[0].clone(),
        &mut r3,
        Record::Nothing,
    )
    .unwrap();
    assert_ne!(values(other.images), values(plain.images));
}

/// With one noise stream per example, an example's chain is the same alone, in a batch of 3, or
/// at another position: it depends on (seed, its index), never on the batch layout.
#[test]
fn per_example_noise_makes_chains_independent_of_the_batch() {
    let device = Device::flex();
    let model = unet(&device);
    let scheduler = ddim(1.0, 3);
    let mut rng = SeededRng::new(4);
    let ctx = context(&mut rng, 3, &device);
    let chains = |indices: &[u64], rows: &[usize]| {
        let mut noise = ExampleNoise::for_examples(9, indices.iter().copied());
        let b = indices.len();
        let x_t = initial_noise(scheduler.as_ref(), [b, 3, 8, 8], &mut noise, &device).unwrap();
        let rows = Tensor::<1, burn::tensor::Int>::from_data(
            burn::tensor::TensorData::new(rows.iter().map(|&r| r as i64).collect(), [b]),
            &device,
        );
        let cond = Conditioning::new(ctx.clone().select(0, rows));
        let s = sample(
            &model,
            scheduler.as_ref(),
            &cond,
            x_t,
            &mut noise,
            Record::Nothing,
        )
        .unwrap();
        values(s.images)
    };
    let together = chains(&[0, 1, 2], &[0, 1, 2]);
    let n = together.len() / 3;
    for i in 0..3 {
        let alone = chains(&[i as u64], &[i]);
        assert_close(&alone, &together[i * n..(i + 1) * n], 1e-5, 1e-6);
    }
    // Reversed order: each example keeps its own chain.
    let reversed = chains(&[2, 1, 0], &[2, 1, 0]);
    assert_close(&reversed[..n], &together[2 * n..], 1e-5, 1e-6);
    // A stream of the wrong size is an error, not a silent reshuffle.
    let mut two = ExampleNoise::for_examples(9, [0, 1]);
    let err = initial_noise(scheduler.as_ref(), [3, 3, 8, 8], &mut two, &device).unwrap_err();
    assert!(err.to_string().contains("3 examples"), "{err}");
}

#[test]
fn deterministic_steps_record_no_log_prob() {
    let device = Device::flex();
    let model = unet(&device);
    let scheduler = ddim(0.0, 3);
    let mut rng = SeededRng::new(5);
    let cond = Conditioning::new(context(&mut rng, 1, &device));
    let x_t = initial_noise(scheduler.as_ref(), [1, 3, 8, 8], &mut rng, &device).unwrap();
    let out = sample(
        &model,
        scheduler.as_ref(),
        &cond,
        x_t,
        &mut rng,
        Record::Trajectory(LogProbReduction::Sum),
    )
    .unwrap();
    assert!(
        out.trajectory
            .unwrap()
            .log_probs
            .iter()
            .all(Option::is_none)
    );

    // With diffusers' default `set_alpha_to_one = true`, the final step of eta = 1 DDIM goes to
    // alpha_bar = 1 where sigma = eta * sqrt((1 - 1) / (1 - abar_t)) * ... = 0: deterministic.
    let scheduler = SchedulerConfig::Ddim(DdimConfig {
        eta: 1.0,
        ..Default::default()
    })
    .build(3)
    .unwrap();
    let x_t = initial_noise(scheduler.as_ref(), [1, 3, 8, 8], &mut rng, &device).unwrap();
    let cond = Conditioning::new(context(&mut rng, 1, &device));
    let lps = sample(
        &model,
        scheduler.as_ref(),
        &cond,
        x_t,
        &mut rng,
        Record::Trajectory(LogProbReduction::Mean),
    )
    .unwrap()
    .trajectory
    .unwrap()
    .log_probs;
    assert!(lps[0].is_some() && lps[1].is_some() && lps[2].is_none());
}

#[test]
fn guidance_at_scale_one_is_the_conditional_model() {
    // uncond + 1 * (cond - uncond) = cond, whatever the unconditional context is.
    let device = Device::flex();
    let model = unet(&device);
    let mut rng = SeededRng::new(8);
    let ctx = context(&mut rng, 2, &device);
    let unc = context(&mut rng, 2, &device);
    let x = rng.normal([2, 3, 8, 8], &device);
    let plain = Conditioning::new(ctx.clone()).predict(&model, x.clone(), 500.0);
    let guided = Conditioning::new(ctx.clone())
        .with_guidance(unc.clone(), 1.0)
        .predict(&model, x.clone(), 500.0);
    assert_close(values(guided), values(plain.clone()), 1e-5, 1e-5);
    // At scale 0 it is the unconditional model.
    let zero = Conditioning::new(ctx)
        .with_guidance(unc.clone(), 0.0)
        .predict(&model, x.clone(), 500.0);
    let uncond = Conditioning::new(unc).predict(&model, x, 500.0);
    assert_close(values(zero), values(uncond), 1e-5, 1e-5);
}

/// Gradients of the same loss computed by unrolling the last `k` steps in one graph.
fn unrolled_gradients(
    model: &UNet2DConditionModel,
    scheduler: &dyn Scheduler,
    cond: &Conditioning,
    x_t: Tensor<4>,
    seed: u64,
    k: usize,
) -> GradientsParams {
    let mut rng = SeededRng::new(seed);
    let device = x_t.device();
    let shape = x_t.dims();
    let n = scheduler.timesteps().len();
    let mut x = x_t;
    for (i, &t) in scheduler.timesteps().iter().enumerate() {
        let noise = rng.normal(shape, &device);
        if i == n - k {
            x = x.detach();
        }
        let pred = cond.predict(model, x.clone(), t);
        x = scheduler
            .step(pred, i, x)
            .unwrap()
            .distribution
            .sample(noise);
    }
    let loss = x.powi_scalar(2).mean();
    GradientsParams::from_grads(loss.backward(), model)
}

fn grad_of<const D: usize>(grads: &GradientsParams, p: &Param<Tensor<D>>) -> Vec<f32> {
    values(grads.get::<D>(p.id).expect("parameter has a gradient"))
}

#[test]
fn recomputed_backprop_equals_the_unrolled_chain() {
    let device = Device::flex().autodiff();
    let model = unet(&device);
    let scheduler = ddim(1.0, 4);
    let mut rng = SeededRng::new(21);
    let cond = Conditioning::new(context(&mut rng, 2, &device));
    let x_t = rng.normal([2, 3, 8, 8], &device);
    for k in [1, 2, 4] {
        let reference = unrolled_gradients(&model, scheduler.as_ref(), &cond, x_t.clone(), 99, k);
        let mut r = SeededRng::new(99);
        let out = backprop_through_sampling(
            &model,
            scheduler.as_ref(),
            &cond,
            x_t.clone(),
            &mut r,
            k,
            |x0| x0.powi_scalar(2).mean().reshape([1]),
        )
        .unwrap();
        assert!(out.loss.is_finite());
        let a = grad_of(&out.grads, &model.conv_in.weight);
        let b = grad_of(&reference, &model.conv_in.weight);
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        assert!(scale > 0.0);
        assert_close(a, b, 0.0, 1e-4 * scale);
        let a = grad_of(
            &out.grads,
            &model.up_blocks[1].attentions[0].transformer_blocks[0]
                .attn2
                .to_k
                .weight,
        );
        let b = grad_of(
            &reference,
            &model.up_blocks[1].attentions[0].transformer_blocks[0]
                .attn2
                .to_k
                .weight,
        );
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        assert_close(a, b, 0.0, 1e-4 * scale);
    }
    // K beyond the chain length means all steps.
    let mut r = SeededRng::new(99);
    let all = backprop_through_sampling(
        &model,
        scheduler.as_ref(),
        &cond,
        x_t.clone(),
        &mut r,
        usize::MAX,
        |x0| x0.powi_scalar(2).mean().reshape([1]),
    )
    .unwrap();
    let reference = unrolled_gradients(&model, scheduler.as_ref(), &cond, x_t, 99, 4);
    let b = grad_of(&reference, &model.conv_out.weight);
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    assert_close(
        grad_of(&all.grads, &model.conv_out.weight),
        b,
        0.0,
        1e-4 * scale,
    );
}

#[test]
fn backprop_needs_an_autodiff_model_and_a_finite_loss() {
    let device = Device::flex();
    let model = unet(&device);
    let scheduler = ddim(0.0, 2);
    let mut rng = SeededRng::new(1);
    let cond = Conditioning::new(context(&mut rng, 1, &device));
    let x = rng.normal([1, 3, 8, 8], &device);
    let e = backprop_through_sampling(
        &model,
        scheduler.as_ref(),
        &cond,
        x.clone(),
        &mut rng,
        1,
        |x0| x0.sum().reshape([1]),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("autodiff"), "{e}");

    let ad = Device::flex().autodiff();
    let model = unet(&ad).fork(&ad);
    let e = backprop_through_sampling(&model, scheduler.as_ref(), &cond, x, &mut rng, 1, |x0| {
        (x0.sum() / 0.0).reshape([1])
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("non-finite"), "{e}");
}
