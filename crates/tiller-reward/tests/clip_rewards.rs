//! CLIPScore, PickScore, the aesthetic predictor and the safety margin on tiny random CLIP weights
//! (`scripts/fixtures/clip_rewards.py`): scores of raw images in [-1, 1] match the PyTorch
//! reference through the differentiable preprocessing within 1e-4 of scale, their gradients in
//! the pixels within 1e-3, a central finite difference through preprocessing agrees with the
//! autodiff gradient, and `--reward` specs load them.

use burn::tensor::{Device, Tensor, TensorData};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tiller_diffusion::models::weights::{HostTensor, read_safetensors, to_device};
use tiller_reward::DifferentiableReward;
use tiller_reward::clip_rewards::{Aesthetic, ClipSimilarity, SafetyMargin, SimilarityScale};
use tiller_testbed::Tokenizer;
use tiller_testkit::assert_close;

const PROMPTS: [&str; 2] = ["a photo of a red cube", "an astronaut riding a horse"];

fn fixture(name: &str) -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
        .join("../tiller-diffusion/tests/fixtures")
        .join(name)
}

fn io() -> BTreeMap<String, HostTensor> {
    read_safetensors(&fixture("tiny-clip-model").join("io.safetensors")).unwrap()
}

fn prompts() -> Vec<String> {
    PROMPTS.iter().map(|p| p.to_string()).collect()
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

fn assert_matches(actual: &[f32], golden: &HostTensor, rtol: f64, what: &str) {
    let scale = golden.data.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    assert!(scale > 1e-8, "{what}: golden is all ~0");
    assert_close(actual.to_vec(), golden.data.clone(), 0.0, rtol * scale);
}

/// Score and pixel gradient of `reward` against the goldens `key`, `grad_images.<key>`.
fn matches_reference(reward: &dyn DifferentiableReward, key: &str) {
    let io = io();
    let device = Device::flex().autodiff();
    let images = to_device::<4>(&io["images"], &device)
        .unwrap()
        .require_grad();
    let scores = reward.score_tensor(images.clone(), &prompts()).unwrap();
    assert_matches(&values(scores.clone()), &io[key], 1e-4, key);
    let grads = scores.sum().backward();
    let grad = values(images.grad(&grads).unwrap());
    assert_matches(&grad, &io[&format!("grad_images.{key}")], 1e-3, "gradient");
}

/// A central difference of the summed score along pixel `i` agrees with the autodiff gradient.
fn finite_difference_agrees(reward: &dyn DifferentiableReward) {
    let io = io();
    let base = io["images"].clone();
    let device = Device::flex().autodiff();
    let images = to_device::<4>(&base, &device).unwrap().require_grad();
    let grads = reward
        .score_tensor(images.clone(), &prompts())
        .unwrap()
        .sum()
        .backward();
    let grad = values(images.grad(&grads).unwrap());
    let plain = Device::flex();
    let total = |delta: f32, i: usize| -> f64 {
        let mut data = base.data.clone();
        data[i] += delta;
        let x = Tensor::<4>::from_data(TensorData::new(data, base.shape.clone()), &plain);
        values(reward.score_tensor(x, &prompts()).unwrap())
            .iter()
            .map(|v| *v as f64)
            .sum()
    };
    // The pixels with the largest gradients, away from the clamp at -1 and 1.
    let mut order: Vec<usize> = (0..grad.len())
        .filter(|&i| base.data[i].abs() < 0.9)
        .collect();
    order.sort_by(|a, b| grad[*b].abs().total_cmp(&grad[*a].abs()));
    assert!(
        grad[order[0]].abs() > 1e-4,
        "the largest gradient {} is too small to check",
        grad[order[0]]
    );
    let h = 1e-2f32;
    for &i in order.iter().take(4) {
        let fd = (total(h, i) - total(-h, i)) / (2.0 * h as f64);
        let g = grad[i] as f64;
        assert!(
            (fd - g).abs() <= 0.05 * g.abs() + 1e-5,
            "pixel {i}: finite difference {fd:.6e}, autodiff {g:.6e}"
        );
    }
}

#[test]
fn clip_score_is_the_cosine_and_differentiable() {
    let r = ClipSimilarity::load(
        &fixture("tiny-clip-model"),
        SimilarityScale::Cosine,
        &Device::flex(),
    )
    .unwrap();
    matches_reference(&r, "clip_score");
    finite_difference_agrees(&r);
}

#[test]
fn pickscore_is_the_scaled_logit_and_differentiable() {
    let r = ClipSimilarity::load(
        &fixture("tiny-clip-model"),
        SimilarityScale::Logit,
        &Device::flex(),
    )
    .unwrap();
    matches_reference(&r, "pick_score");
    finite_difference_agrees(&r);
}

#[test]
fn the_aesthetic_predictor_matches_and_is_differentiable() {
    let r = Aesthetic::load(&fixture("tiny-clip-model"), &Device::flex()).unwrap();
    matches_reference(&r, "aesthetic");
    finite_difference_agrees(&r);
}

#[test]
fn the_safety_margin_is_negative_exactly_for_flagged_images() {
    let device = Device::flex();
    let r = SafetyMargin::load(&fixture("tiny-safety-checker"), &device).unwrap();
    let io = read_safetensors(&fixture("tiny-safety-checker").join("io.safetensors")).unwrap();
    // The checker's own input is already preprocessed; score it through the checker directly.
    let scores = r
        .checker()
        .check(to_device(&io["pixel_values"], &device).unwrap())
        .unwrap();
    let margin: Vec<f32> = values(scores.concept_scores.max_dim(1))
        .into_iter()
        .map(|m| -m)
        .collect();
    for (m, flagged) in margin.iter().zip(&io["has_nsfw"].data) {
        assert_eq!(*m < 0.0, *flagged > 0.5, "margin {m}");
    }
    // And through the reward's own path on raw images.
    let raw = self::io()["images"].clone();
    let images = Tensor::<4>::from_data(TensorData::new(raw.data, raw.shape), &device);
    let prompts = prompts();
    let s = r.score_tensor(images, &prompts).unwrap();
    assert!(values(s).iter().all(|v| v.is_finite()));
    finite_difference_agrees(&r);
}

#[test]
fn reward_specs_load_the_clip_rewards_and_name_bad_folders() {
    let device = Device::flex();
    let tok = Tokenizer::shapes();
    let model = fixture("tiny-clip-model");
    for (spec, name) in [
        (format!("clip-score:{}", model.display()), "clip-score:"),
        (format!("pickscore:{}", model.display()), "pickscore:"),
        (format!("aesthetic:{}", model.display()), "aesthetic:"),
        (
            format!(
                "safety-checker:{}",
                fixture("tiny-safety-checker").display()
            ),
            "safety-checker:",
        ),
    ] {
        let r = tiller_reward::load::load(&spec, &tok, &device).unwrap();
        assert!(r.name().starts_with(name), "{}", r.name());
        assert!(r.differentiable().is_some());
    }
    let e = tiller_reward::load::load(
        &format!("aesthetic:{}", fixture("tiny-clip-vision").display()),
        &tok,
        &device,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("aesthetic_mlp.safetensors"), "{e}");
    let e = tiller_reward::load::load("pickscore:/no/such/folder", &tok, &device)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("/no/such/folder"), "{e}");
}

#[test]
fn hpsv2_on_an_open_clip_checkpoint_matches_open_clip() {
    let folder = fixture("tiny-open-clip");
    let r = ClipSimilarity::hpsv2(&folder, &Device::flex()).unwrap();
    let io = read_safetensors(&folder.join("io.safetensors")).unwrap();
    let device = Device::flex().autodiff();
    let images = to_device::<4>(&io["images"], &device)
        .unwrap()
        .require_grad();
    let scores = r.score_tensor(images.clone(), &prompts()).unwrap();
    assert_matches(&values(scores.clone()), &io["hps"], 1e-4, "hps");
    let grads = scores.sum().backward();
    assert_matches(
        &values(images.grad(&grads).unwrap()),
        &io["grad_images.hps"],
        1e-3,
        "gradient",
    );
    let spec = format!("hpsv2:{}", folder.display());
    let loaded = tiller_reward::load::load(&spec, &Tokenizer::shapes(), &Device::flex()).unwrap();
    assert!(loaded.name().starts_with("hpsv2:"));
}

#[test]
fn open_clip_folders_with_other_architectures_or_pickles_are_refused() {
    let src = fixture("tiny-open-clip");
    let dir = std::env::temp_dir().join(format!("tiller-openclip-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in [
        "open_clip_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    // Weights only as a pickle.
    std::fs::write(dir.join("open_clip_pytorch_model.bin"), b"not read").unwrap();
    let e = ClipSimilarity::hpsv2(&dir, &Device::flex())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("open_clip_pytorch_model.bin") && e.contains("safetensors"),
        "{e}"
    );
    // A layer-scale model (not CLIP's block) is named.
    std::fs::copy(
        src.join("open_clip_model.safetensors"),
        dir.join("open_clip_model.safetensors"),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(src.join("open_clip_config.json")).unwrap();
    std::fs::write(
        dir.join("open_clip_config.json"),
        cfg.replacen(
            "\"patch_size\": 4",
            "\"patch_size\": 4, \"ls_init_value\": 0.1",
            1,
        ),
    )
    .unwrap();
    let e = ClipSimilarity::hpsv2(&dir, &Device::flex())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("model_cfg.vision_cfg.ls_init_value"), "{e}");
}

/// The checker as a filter: the images diffusers flags come out black, the others untouched. The
/// fixture's inputs are the tower's size, so preprocessing is only the normalisation: undone, they
/// are 8-bit images whose flags are the golden `has_nsfw` (some flagged, some not).
#[test]
fn the_safety_filter_blacks_out_exactly_the_flagged_images() {
    let device = Device::flex();
    let r = SafetyMargin::load(&fixture("tiny-safety-checker"), &device).unwrap();
    let io = read_safetensors(&fixture("tiny-safety-checker").join("io.safetensors")).unwrap();
    let pixels = to_device::<4>(&io["pixel_values"], &device).unwrap();
    let [_, _, h, w] = pixels.dims();
    let size = r.checker().vision.image_size;
    assert_eq!((h, w), (size, size), "no resize in this test");
    let mean = Tensor::<1>::from_floats([0.48145466, 0.4578275, 0.40821073], &device)
        .reshape([1, 3, 1, 1]);
    let std = Tensor::<1>::from_floats([0.26862954, 0.26130258, 0.27577711], &device)
        .reshape([1, 3, 1, 1]);
    let unit = pixels * std + mean;
    let images = tiller_reward::tensor_to_images(unit * 2.0 - 1.0).unwrap();
    let want: Vec<bool> = io["has_nsfw"].data.iter().map(|v| *v > 0.5).collect();
    assert!(
        want.iter().any(|f| *f) && want.iter().any(|f| !*f),
        "the fixture flags some images and not others: {want:?}"
    );
    let (filtered, flags) = r.filter(images.clone()).unwrap();
    assert_eq!(flags, want);
    for ((before, after), flagged) in images.iter().zip(&filtered).zip(&flags) {
        if *flagged {
            assert!(after.data().iter().all(|v| *v == 0));
        } else {
            assert_eq!(before.data(), after.data());
        }
    }
}
