//! Diffusion-DPO's objective (Wallace et al. 2024) on a real-architecture latent pipeline: the
//! tiny random SD 1.x pipeline saved by diffusers encodes a chosen and a rejected image to
//! latents as diffusers' `train_diffusion_dpo.py` does, and a few AdamW steps of the UNet on
//! `dpo_loss` against the frozen starting UNet lower the loss and move the implicit reward
//! margin towards the chosen image; the reference UNet's margin stays at zero.

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use std::path::{Path, PathBuf};
use tiller_align::methods::diffusion_dpo::{denoising_error, dpo_loss};
use tiller_core::SeededRng;
use tiller_diffusion::sampling::Conditioning;
use tiller_diffusion::stable_diffusion::StableDiffusion;
use tiller_engine::optim::{ClipScope, adamw};

fn fixture(name: &str) -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
        .join("../tiller-diffusion/tests/fixtures")
        .join(name)
}

#[test]
fn diffusion_dpo_on_encoded_images_prefers_the_chosen_image() {
    let device = Device::flex();
    let ad = device.clone().autodiff();
    let sd = StableDiffusion::load(&fixture("tiny-sd-pipeline"), &device).unwrap();
    let mut rng = SeededRng::new(11);
    // One pair per example, two examples; the same prompt, noise and t for both images of a
    // pair (the objective's shared noise).
    let chosen = sd
        .encode_images(rng.normal([2, 3, 16, 16], &device).clamp(-1.0, 1.0), None)
        .unwrap();
    let rejected = sd
        .encode_images(rng.normal([2, 3, 16, 16], &device).clamp(-1.0, 1.0), None)
        .unwrap();
    assert_eq!(chosen.dims(), [2, 4, 8, 8]);
    let noise = rng.normal([2, 4, 8, 8], &device);
    let ts = [300.0, 700.0, 300.0, 700.0];
    let schedule = sd.scheduler.build(50).unwrap();
    let x0 = Tensor::cat(vec![chosen, rejected], 0);
    let eps = Tensor::cat(vec![noise.clone(), noise], 0);
    let x_t = schedule.add_noise(x0.clone(), eps.clone(), &ts).unwrap();
    let target = schedule.training_target(x0, eps, &ts).unwrap();
    let context = sd
        .encode_prompts(&["a photo of a red cube"; 4], &device)
        .unwrap()
        .context;
    let d_ref = denoising_error(
        &sd.unet,
        x_t.clone(),
        target.clone(),
        &ts,
        &Conditioning::new(context.clone()),
    );
    let beta = 5000.0;

    let mut unet = sd.unet.clone().to_device(&ad).train();
    let mut optim = adamw(0.9, 0.999, 1e-8, 0.0, 0.0, ClipScope::Global);
    let mut history = Vec::new();
    for _ in 0..5 {
        let d = denoising_error(
            &unet,
            x_t.clone().to_device(&ad),
            target.clone().to_device(&ad),
            &ts,
            &Conditioning::new(context.clone().to_device(&ad)),
        );
        let r = d_ref.clone().to_device(&ad);
        let (loss, inside) = dpo_loss(
            d.clone().narrow(0, 0, 2),
            d.narrow(0, 2, 2),
            r.clone().narrow(0, 0, 2),
            r.narrow(0, 2, 2),
            beta,
        );
        let margin = inside.mean().into_scalar::<f64>();
        history.push((loss.clone().into_scalar::<f64>(), margin));
        let grads = burn::optim::GradientsParams::from_grads(loss.backward(), &unet);
        unet = optim.step(1e-4, unet, grads);
    }
    println!("(loss, margin) per step: {history:?}");
    // At the start the policy is the reference: margin 0, loss ln 2.
    assert!(history[0].1.abs() < 1e-6, "{history:?}");
    assert!(
        (history[0].0 - std::f64::consts::LN_2).abs() < 1e-5,
        "{history:?}"
    );
    let (last_loss, last_margin) = history[history.len() - 1];
    assert!(
        last_loss < history[0].0 - 1e-3 && last_margin > 1e-3,
        "{history:?}"
    );
    // The trained UNet denoises the chosen latents better relative to the rejected ones than
    // the reference does.
    let d = denoising_error(&unet.valid(), x_t, target, &ts, &Conditioning::new(context));
    let gap = (d.clone().narrow(0, 0, 2) - d.narrow(0, 2, 2))
        .mean()
        .into_scalar::<f64>();
    let ref_gap = (d_ref.clone().narrow(0, 0, 2) - d_ref.narrow(0, 2, 2))
        .mean()
        .into_scalar::<f64>();
    assert!(
        gap < ref_gap,
        "chosen-minus-rejected error {gap} vs reference {ref_gap}"
    );
}
