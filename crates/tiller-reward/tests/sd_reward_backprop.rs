//! Reward backpropagation on a real-architecture latent pipeline: DRaFT-1 (Clark et al. 2024)
//! on the tiny random SD 1.x pipeline saved by diffusers, with CLIPScore on a tiny random
//! CLIPModel, the gradient flowing from the reward through CLIP's preprocessing, the VAE decoder
//! (frozen) and the last DDIM step into the UNet. On a fixed prompt and fixed initial noise a few
//! AdamW steps raise the reward, and the reward's gradient in the final latents matches a finite
//! difference through decoder and reward.

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use std::path::{Path, PathBuf};
use tiller_core::SeededRng;
use tiller_diffusion::sampling::{Record, backprop_through_sampling, initial_noise, sample};
use tiller_diffusion::stable_diffusion::StableDiffusion;
use tiller_engine::optim::{ClipScope, adamw};
use tiller_reward::DifferentiableReward;
use tiller_reward::clip_rewards::{ClipSimilarity, SimilarityScale};

fn fixture(name: &str) -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
        .join("../tiller-diffusion/tests/fixtures")
        .join(name)
}

const STEPS: usize = 4;
const GUIDANCE: f64 = 3.0;

fn prompts() -> Vec<String> {
    vec!["a photo of a red cube".to_string(); 2]
}

/// The mean reward of the deterministic chain from `x_t`.
fn reward_of(
    sd: &StableDiffusion,
    unet: &tiller_diffusion::models::unet::UNet2DConditionModel,
    reward: &ClipSimilarity,
    x_t: Tensor<4>,
    device: &Device,
) -> f64 {
    let texts = prompts();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let cond = sd
        .conditioning(&refs, None, GUIDANCE, (16, 16), device)
        .unwrap();
    let scheduler = sd.scheduler.build(STEPS).unwrap();
    let out = sample(
        unet,
        scheduler.as_ref(),
        &cond,
        x_t,
        &mut SeededRng::new(1),
        Record::Nothing,
    )
    .unwrap();
    let scores = reward
        .score_tensor(sd.decode_for_reward(out.images), &texts)
        .unwrap();
    scores.mean().into_scalar::<f64>()
}

#[test]
fn draft_1_through_the_vae_decoder_raises_clip_score_on_a_fixed_prompt() {
    let device = Device::flex();
    let ad = device.clone().autodiff();
    let sd = StableDiffusion::load(&fixture("tiny-sd-pipeline"), &device).unwrap();
    let reward = ClipSimilarity::load(
        &fixture("tiny-clip-model"),
        SimilarityScale::Cosine,
        &device,
    )
    .unwrap();
    let texts = prompts();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let cond = sd
        .conditioning(&refs, None, GUIDANCE, (16, 16), &device)
        .unwrap();
    let scheduler = sd.scheduler.build(STEPS).unwrap();
    let x_t = initial_noise(
        scheduler.as_ref(),
        sd.latent_shape(2, 16, 16).unwrap(),
        &mut SeededRng::new(0),
        &device,
    )
    .unwrap();

    let before = reward_of(&sd, &sd.unet, &reward, x_t.clone(), &device);
    let mut unet = sd.unet.clone().to_device(&ad).train();
    let mut optim = adamw(0.9, 0.999, 1e-8, 0.0, 0.0, ClipScope::Global);
    let mut losses = Vec::new();
    for _ in 0..6 {
        let g = backprop_through_sampling(
            &unet,
            scheduler.as_ref(),
            &cond,
            x_t.clone(),
            &mut SeededRng::new(1),
            1,
            |x0| {
                let images = sd.decode_for_reward(x0);
                -reward
                    .score_tensor(images, &texts)
                    .unwrap()
                    .mean()
                    .reshape([1])
            },
        )
        .unwrap();
        losses.push(g.loss);
        unet = optim.step(2e-3, unet, g.grads);
    }
    let after = reward_of(&sd, &unet.valid(), &reward, x_t, &device);
    println!("CLIPScore {before:.5} -> {after:.5}; losses {losses:?}");
    assert!(
        (losses[0] + before).abs() < 1e-5,
        "the first loss is minus the starting reward"
    );
    assert!(after > before + 1e-3, "reward {before} -> {after}");
}

#[test]
fn the_reward_gradient_through_the_decoder_matches_a_finite_difference() {
    let device = Device::flex();
    let sd = StableDiffusion::load(&fixture("tiny-sd-pipeline"), &device).unwrap();
    let reward = ClipSimilarity::load(
        &fixture("tiny-clip-model"),
        SimilarityScale::Cosine,
        &device,
    )
    .unwrap();
    let texts = prompts();
    let shape = sd.latent_shape(2, 16, 16).unwrap();
    let z = SeededRng::new(3).normal(shape, &device) * 0.18215;
    let total = |z: Tensor<4>| -> f64 {
        reward
            .score_tensor(sd.decode_for_reward(z), &texts)
            .unwrap()
            .sum()
            .into_scalar::<f64>()
    };
    let ad = device.clone().autodiff();
    let z_ad = Tensor::<4>::from_data(z.to_data(), &ad).require_grad();
    let grads = reward
        .score_tensor(sd.decode_for_reward(z_ad.clone()), &texts)
        .unwrap()
        .sum()
        .backward();
    let grad: Vec<f32> = z_ad
        .grad(&grads)
        .unwrap()
        .into_data()
        .try_into_vec::<f32>()
        .unwrap();
    let base: Vec<f32> = z.into_data().try_into_vec::<f32>().unwrap();
    let mut order: Vec<usize> = (0..grad.len()).collect();
    order.sort_by(|a, b| grad[*b].abs().total_cmp(&grad[*a].abs()));
    assert!(grad[order[0]].abs() > 1e-4, "gradient {}", grad[order[0]]);
    let h = 1e-3f32;
    for &i in order.iter().take(4) {
        let at = |d: f32| {
            let mut v = base.clone();
            v[i] += d;
            total(Tensor::from_data(TensorData::new(v, shape), &device))
        };
        let fd = (at(h) - at(-h)) / (2.0 * h as f64);
        let g = grad[i] as f64;
        assert!(
            (fd - g).abs() <= 0.05 * g.abs() + 1e-5,
            "latent {i}: finite difference {fd:.6e}, autodiff {g:.6e}"
        );
    }
}
