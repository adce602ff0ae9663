//! Stable Diffusion pipelines saved by diffusers, sampled in Tiller from the same initial latents
//! and DDIM settings as diffusers' `StableDiffusionPipeline.__call__`
//! (`scripts/fixtures/sd_pipelines.py`): the SD 1.x layout with f32 weights and epsilon
//! prediction, the SD 2.x layout with f16 weights and v-prediction, SDXL with bf16 weights (two
//! text encoders, the UNet's added conditioning, zeroed negative embeddings). The prompt
//! embeddings match within 1e-4 of scale, final latents and decoded images within 1e-3, with and
//! without classifier-free guidance; and SD3 without T5 (two CLIP encoders with projections, the
//! MMDiT, the flow-matching Euler sampler). Malformed folders are refused with errors naming the file.

use burn::tensor::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tiller_core::SeededRng;
use tiller_diffusion::models::weights::{HostTensor, read_safetensors, to_device};
use tiller_diffusion::stable_diffusion::{ModelIndex, StableDiffusion, is_stable_diffusion};
use tiller_testkit::assert_close;

const PROMPTS: [&str; 2] = [
    "a photo of a red cube",
    "an astronaut riding a horse, highly detailed",
];
const STEPS: usize = 4;
const GUIDANCE: f64 = 5.0;

fn fixture(name: &str) -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
        .join("tests/fixtures")
        .join(name)
}

fn goldens(name: &str) -> BTreeMap<String, HostTensor> {
    let path = fixture(name).join("goldens.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().as_ref().expect("metadata");
    let prompts: Vec<String> = serde_json::from_str(&meta["prompts"]).unwrap();
    assert_eq!(prompts, PROMPTS, "the fixture's prompts");
    assert_eq!(meta["steps"], STEPS.to_string());
    assert_eq!(meta["guidance"].parse::<f64>().unwrap(), GUIDANCE);
    read_safetensors(&path).unwrap()
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

/// Within `rtol` of the golden's largest magnitude.
fn assert_matches<const D: usize>(actual: Tensor<D>, golden: &HostTensor, rtol: f64, what: &str) {
    assert_eq!(actual.dims().to_vec(), golden.shape, "{what}: shape");
    let scale = golden.data.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    assert!(scale > 1e-3, "{what}: golden is all ~0");
    let a = values(actual);
    let worst = a
        .iter()
        .zip(&golden.data)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs() as f64));
    println!("{what}: max |diff| {worst:.3e} (scale {scale:.3})");
    assert_close(a, golden.data.clone(), 0.0, rtol * scale);
}

fn matches_diffusers(name: &str) {
    let device = Device::flex();
    let folder = fixture(name);
    assert!(is_stable_diffusion(&folder));
    let sd = StableDiffusion::load(&folder, &device).unwrap();
    let g = goldens(name);
    let side = sd.default_resolution().unwrap();
    assert_eq!(side, g["images"].shape[2]);
    let size = (side, side);

    let cond = sd
        .conditioning(&PROMPTS, None, GUIDANCE, size, &device)
        .unwrap();
    assert_matches(
        cond.context.clone(),
        &g["prompt_embeds"],
        1e-4,
        "prompt_embeds",
    );
    let (uncond, scale) = cond.guidance.clone().expect("guided");
    assert_eq!(scale, GUIDANCE);
    if sd.xl.is_some() {
        // force_zeros_for_empty_prompt: the unconditional half is zeros, pooled output too.
        assert!(values(uncond).iter().all(|v| *v == 0.0));
        let (added, added_uncond) = cond.added.clone().expect("SDXL's added conditioning");
        let added_uncond = added_uncond.expect("under guidance");
        assert_matches(
            added.text_embeds,
            &g["pooled_prompt_embeds"],
            1e-4,
            "pooled",
        );
        assert!(values(added_uncond.text_embeds).iter().all(|v| *v == 0.0));
        let ids = values(added.time_ids);
        assert_eq!(ids.len(), 12);
        assert_eq!(ids[..6], g["add_time_ids"].data[..], "add_time_ids");
        assert_eq!(ids[6..], g["add_time_ids"].data[..], "add_time_ids");
    } else {
        assert!(cond.added.is_none());
        assert_matches(
            uncond,
            &g["negative_prompt_embeds"],
            1e-4,
            "negative_prompt_embeds",
        );
    }

    let latents = to_device::<4>(&g["latents"], &device).unwrap();
    // eta = 0: the chain draws step noise (in a fixed order) but never uses it.
    let mut noise = SeededRng::new(0);
    let (images, final_latents) = sd
        .generate(&cond, latents.clone(), STEPS, &mut noise)
        .unwrap();
    assert_matches(final_latents, &g["final_latents"], 1e-3, "final latents");
    assert_matches(images, &g["images"], 1e-3, "images");

    let plain = sd.conditioning(&PROMPTS, None, 1.0, size, &device).unwrap();
    assert!(
        plain.guidance.is_none(),
        "guidance 1 runs the conditional model alone"
    );
    let (images, _) = sd
        .generate(&plain, latents.clone(), STEPS, &mut noise)
        .unwrap();
    assert_matches(images, &g["images_no_cfg"], 1e-3, "images without guidance");

    // Encoding images as preference training does.
    let encoded = sd
        .encode_images(to_device::<4>(&g["encode_pixels"], &device).unwrap(), None)
        .unwrap();
    assert_matches(encoded, &g["encode_latents"], 1e-4, "encoded latents");

    if let Some(golden) = g.get("images_empty_negative") {
        // An explicit empty negative prompt is encoded, not zeroed.
        let empty = sd
            .conditioning(&PROMPTS, Some(&["", ""]), GUIDANCE, size, &device)
            .unwrap();
        let (images, _) = sd.generate(&empty, latents, STEPS, &mut noise).unwrap();
        assert_matches(images, golden, 1e-3, "images with an empty negative prompt");
    }
}

#[test]
fn sd1_pipeline_samples_as_diffusers() {
    matches_diffusers("tiny-sd-pipeline");
}

#[test]
fn sd2_pipeline_with_f16_weights_and_v_prediction_samples_as_diffusers() {
    matches_diffusers("tiny-sd2-pipeline");
}

#[test]
fn sdxl_pipeline_with_bf16_weights_samples_as_diffusers() {
    matches_diffusers("tiny-sdxl-pipeline");
}

/// A copy of the SD 1.x fixture to break.
fn copy_pipeline(tag: &str) -> PathBuf {
    copy_fixture("tiny-sd-pipeline", tag)
}

/// A scratch copy of the fixture folder `name`, to edit.
fn copy_fixture(name: &str, tag: &str) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("tiller-sd-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    copy_dir(&fixture(name), &dst);
    dst
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

fn load_error(folder: &Path) -> String {
    let err = StableDiffusion::load(folder, &Device::flex()).unwrap_err();
    err.to_string()
}

fn edit_index(folder: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = folder.join("model_index.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn the_model_index_lists_components_and_null_ones() {
    let index = ModelIndex::read(&fixture("tiny-sd-pipeline")).unwrap();
    assert_eq!(index.class_name, "StableDiffusionPipeline");
    assert_eq!(index.class_of("vae"), Some("AutoencoderKL"));
    assert_eq!(index.class_of("safety_checker"), None);
    assert!(index.components.contains_key("safety_checker"));
    assert!(!index.components.contains_key("requires_safety_checker"));
    assert_eq!(index.options["requires_safety_checker"], false);
}

#[test]
fn malformed_pipeline_folders_are_refused_naming_the_file() {
    // No model_index.json.
    let d = copy_pipeline("noindex");
    std::fs::remove_file(d.join("model_index.json")).unwrap();
    let e = load_error(&d);
    assert!(e.contains("no model_index.json"), "{e}");
    assert!(!is_stable_diffusion(&d));

    // A component missing from the index.
    let d = copy_pipeline("novae");
    edit_index(&d, |m| {
        m.remove("vae");
    });
    let e = load_error(&d);
    assert!(
        e.contains("model_index.json") && e.contains("no `vae` component"),
        "{e}"
    );

    // Listed but its folder is gone.
    let d = copy_pipeline("nofolder");
    std::fs::remove_dir_all(d.join("vae")).unwrap();
    let e = load_error(&d);
    assert!(e.contains("vae") && e.contains("folder is missing"), "{e}");

    // Another pipeline class.
    let d = copy_pipeline("other");
    edit_index(&d, |m| {
        m.insert("_class_name".into(), "KandinskyPipeline".into());
    });
    let e = load_error(&d);
    assert!(
        e.contains("KandinskyPipeline") && e.contains("StableDiffusionXLPipeline"),
        "{e}"
    );

    // Called SDXL but without its second text encoder.
    let d = copy_pipeline("xl");
    edit_index(&d, |m| {
        m.insert("_class_name".into(), "StableDiffusionXLPipeline".into());
    });
    let e = load_error(&d);
    assert!(e.contains("no `tokenizer_2` component"), "{e}");

    // A scheduler Tiller does not read.
    let d = copy_pipeline("lms");
    edit_index(&d, |m| {
        m.insert(
            "scheduler".into(),
            serde_json::json!(["diffusers", "LMSDiscreteScheduler"]),
        );
    });
    let e = load_error(&d);
    assert!(
        e.contains("LMSDiscreteScheduler") && e.contains("DDIM"),
        "{e}"
    );

    // An Euler config with continuous timesteps cannot be read as DDIM's.
    let d = copy_pipeline("continuous");
    write_euler_scheduler(&d, "continuous");
    let e = load_error(&d);
    assert!(
        e.contains("timestep_type") && e.contains("scheduler_config.json"),
        "{e}"
    );

    // Pickle-only weights.
    let d = copy_pipeline("pickle");
    let unet = d.join("unet");
    std::fs::rename(
        unet.join("diffusion_pytorch_model.safetensors"),
        unet.join("diffusion_pytorch_model.bin"),
    )
    .unwrap();
    let e = load_error(&d);
    assert!(
        e.contains("diffusion_pytorch_model.bin") && e.contains("safetensors"),
        "{e}"
    );

    // Components that do not fit together: a tokenizer longer than the text encoder's positions.
    let d = copy_pipeline("mismatch");
    let cfg = d.join("tokenizer/tokenizer_config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("\"model_max_length\": 16", "\"model_max_length\": 77"),
    )
    .unwrap();
    let e = load_error(&d);
    assert!(
        e.contains("text_encoder") && e.contains("max_position_embeddings 16") && e.contains("77"),
        "{e}"
    );
}

/// Replaces the folder's scheduler by an `EulerDiscreteScheduler` config on the same noise
/// schedule, as SDXL base 1.0 ships it (with the keys it kept from SD's PNDM config).
fn write_euler_scheduler(folder: &Path, timestep_type: &str) {
    write_euler_scheduler_with(folder, timestep_type, true);
}

fn write_euler_scheduler_with(folder: &Path, timestep_type: &str, legacy_keys: bool) {
    edit_index(folder, |m| {
        m.insert(
            "scheduler".into(),
            serde_json::json!(["diffusers", "EulerDiscreteScheduler"]),
        );
    });
    let config = serde_json::json!({
        "_class_name": "EulerDiscreteScheduler",
        "_diffusers_version": "0.42.1",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "final_sigmas_type": "zero",
        "interpolation_type": "linear",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "rescale_betas_zero_snr": false,
        "sigma_max": null,
        "sigma_min": null,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "timestep_type": timestep_type,
        "use_beta_sigmas": false,
        "use_exponential_sigmas": false,
        "use_karras_sigmas": false
    });
    let mut config = config.as_object().unwrap().clone();
    if legacy_keys {
        for (k, v) in [
            ("clip_sample", serde_json::json!(false)),
            ("set_alpha_to_one", serde_json::json!(false)),
            ("skip_prk_steps", serde_json::json!(true)),
            ("sample_max_value", serde_json::json!(1.0)),
            ("trained_betas", serde_json::Value::Null),
        ] {
            config.insert(k.into(), v);
        }
    }
    std::fs::write(
        folder.join("scheduler/scheduler_config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
}

#[test]
fn an_sdxl_folder_with_its_euler_scheduler_samples_with_ddim_on_the_same_schedule() {
    let device = Device::flex();
    let d = std::env::temp_dir().join(format!("tiller-sd-euler-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    copy_dir(&fixture("tiny-sdxl-pipeline"), &d);
    write_euler_scheduler(&d, "discrete");
    let euler = StableDiffusion::load(&d, &device).unwrap();
    let ddim = StableDiffusion::load(&fixture("tiny-sdxl-pipeline"), &device).unwrap();
    assert_eq!(euler.scheduler, ddim.scheduler);
    // Without `clip_sample` the latents are still not clipped (DDIM's own default would clip).
    write_euler_scheduler_with(&d, "discrete", false);
    let bare = StableDiffusion::load(&d, &device).unwrap();
    match &bare.scheduler {
        tiller_diffusion::SchedulerConfig::Ddim(c) => assert!(!c.clip_sample),
        other => panic!("{other:?}"),
    }
}

/// The decoder's backward recomputed one segment at a time gives the value and the gradient in
/// the latents of plain autodiff through the whole decoder (here of a nonlinear objective of
/// the images, with the latents themselves a function of a leaf, as a chain's output is).
#[test]
fn the_decoder_recomputed_by_segment_differentiates_as_the_whole_graph() {
    let device = Device::flex();
    let ad = device.clone().autodiff();
    for name in ["tiny-sd-pipeline", "tiny-sd2-pipeline"] {
        let sd = StableDiffusion::load(&fixture(name), &device).unwrap();
        let space = sd.latent_space();
        assert!(space.vae.decoder.segments() >= 3);
        let z = SeededRng::new(5).normal(sd.latent_shape(2, 16, 16).unwrap(), &device);
        let target = SeededRng::new(6).normal([2, 3, 16, 16], &device);
        let objective = |images: Tensor<4>| -> tiller_core::Result<Tensor<1>> {
            let t = target.clone().to_device(&images.device());
            Ok(((images.tanh() - t).powf_scalar(2.0)).mean() * 3.0)
        };
        let grad_of = |recompute: bool| {
            let leaf = Tensor::<4>::from_data(z.to_data(), &ad).require_grad();
            let latents = leaf.clone() * 0.5 + leaf.clone().sin() * 0.1;
            let loss = if recompute {
                space.decoded_loss(latents, objective).unwrap()
            } else {
                objective(space.decode_for_reward(latents)).unwrap()
            };
            let value = loss.clone().into_scalar::<f64>();
            let grads = loss.backward();
            let g: Vec<f32> = leaf
                .grad(&grads)
                .unwrap()
                .into_data()
                .try_into_vec()
                .unwrap();
            (value, g)
        };
        let (v_full, g_full) = grad_of(false);
        let (v_seg, g_seg) = grad_of(true);
        assert!((v_full - v_seg).abs() < 1e-6, "{name}: {v_full} vs {v_seg}");
        let scale = g_full.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        assert!(scale > 1e-6, "{name}: gradient {scale}");
        let worst = g_full
            .iter()
            .zip(&g_seg)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            worst <= 1e-5 * scale.max(1.0),
            "{name}: max |diff| {worst} (scale {scale})"
        );
        // On a plain device it is the objective of the decoded images.
        let plain = space.decoded_loss(z.clone(), objective).unwrap();
        let direct = objective(space.decode_for_reward(z.clone())).unwrap();
        assert_eq!(
            plain.into_scalar::<f64>(),
            direct.into_scalar::<f64>(),
            "{name}"
        );
    }
}

#[test]
fn sd3_pipeline_without_t5_samples_as_diffusers() {
    use tiller_diffusion::stable_diffusion3::StableDiffusion3;
    let device = Device::flex();
    let name = "tiny-sd3-pipeline";
    let sd = StableDiffusion3::load(&fixture(name), &device).unwrap();
    let g = goldens(name);
    let cond = sd.conditioning(&PROMPTS, None, GUIDANCE, &device).unwrap();
    assert_matches(
        cond.context.clone(),
        &g["prompt_embeds"],
        1e-4,
        "prompt_embeds",
    );
    let (uncond, _) = cond.guidance.clone().expect("guided");
    assert_matches(
        uncond,
        &g["negative_prompt_embeds"],
        1e-4,
        "negative_prompt_embeds",
    );
    let (added, added_uncond) = cond.added.clone().expect("pooled projections");
    assert_matches(
        added.text_embeds,
        &g["pooled_prompt_embeds"],
        1e-4,
        "pooled",
    );
    assert_matches(
        added_uncond.expect("under guidance").text_embeds,
        &g["negative_pooled_prompt_embeds"],
        1e-4,
        "negative pooled",
    );

    let latents = to_device::<4>(&g["latents"], &device).unwrap();
    // The Euler ODE draws step noise (in a fixed order) but never uses it.
    let mut noise = SeededRng::new(0);
    let (images, final_latents) = sd
        .generate(&cond, latents.clone(), STEPS, &mut noise)
        .unwrap();
    assert_matches(final_latents, &g["final_latents"], 1e-3, "final latents");
    assert_matches(images, &g["images"], 1e-3, "images");
    let plain = sd.conditioning(&PROMPTS, None, 1.0, &device).unwrap();
    assert!(plain.guidance.is_none());
    let (images, _) = sd.generate(&plain, latents, STEPS, &mut noise).unwrap();
    assert_matches(images, &g["images_no_cfg"], 1e-3, "images without guidance");
}

#[test]
fn sd3_folders_with_t5_or_mismatched_parts_are_refused_naming_the_file() {
    use tiller_diffusion::stable_diffusion3::StableDiffusion3;
    let device = Device::flex();
    let copy = |tag: &str| copy_fixture("tiny-sd3-pipeline", &format!("sd3-{tag}"));
    let err = |d: &Path| StableDiffusion3::load(d, &device).unwrap_err().to_string();

    let d = copy("t5");
    edit_index(&d, |m| {
        m.insert(
            "text_encoder_3".into(),
            serde_json::json!(["transformers", "T5EncoderModel"]),
        );
    });
    let e = err(&d);
    assert!(
        e.contains("text_encoder_3") && e.contains("[null, null]"),
        "{e}"
    );

    let d = copy("sched");
    edit_index(&d, |m| {
        m.insert(
            "scheduler".into(),
            serde_json::json!(["diffusers", "DDIMScheduler"]),
        );
    });
    let e = err(&d);
    assert!(e.contains("FlowMatchEulerDiscreteScheduler"), "{e}");

    let d = copy("pooled");
    let path = d.join("transformer/config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["pooled_projection_dim"] = serde_json::json!(32);
    std::fs::write(&path, v.to_string()).unwrap();
    let e = err(&d);
    assert!(e.contains("transformer") && e.contains("weight"), "{e}");

    // The SD 1.x loader names the class it reads.
    let e = StableDiffusion::load(&fixture("tiny-sd3-pipeline"), &device)
        .unwrap_err()
        .to_string();
    assert!(e.contains("StableDiffusion3Pipeline"), "{e}");
}
