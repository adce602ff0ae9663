//! `tiller model check` end to end: it loads the fixture folders, reports the parameter count, and
//! its forward outputs on diffusers-named inputs equal the diffusers/transformers goldens.

mod common;
use common::tiller;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tiller_diffusion::models::weights::{HostTensor, read_safetensors, write_safetensors};

fn fixtures() -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
        .join("../tiller-diffusion/tests/fixtures")
}

fn max_abs_diff(a: &HostTensor, b: &HostTensor) -> f32 {
    assert_eq!(a.shape, b.shape);
    a.data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn unet_forward_through_the_cli_matches_diffusers() {
    unet_forward_through_the_cli("tiny-unet-sd1", &[]);
}

#[test]
fn sdxl_unet_forward_through_the_cli_takes_its_added_conditions() {
    unet_forward_through_the_cli("tiny-unet-sdxl", &["text_embeds", "time_ids"]);
}

fn unet_forward_through_the_cli(name: &str, added: &[&str]) {
    let dir = std::env::temp_dir().join(format!("tiller-cli-check-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let folder = fixtures().join(name);
    let io = read_safetensors(&folder.join("io.safetensors")).unwrap();
    let mut inputs: BTreeMap<String, HostTensor> = ["sample", "timestep", "encoder_hidden_states"]
        .iter()
        .chain(added)
        .map(|k| (k.to_string(), io[*k].clone()))
        .collect();
    write_safetensors(&dir.join("in.safetensors"), &inputs, Default::default()).unwrap();
    let out = dir.join("out.safetensors");
    let (ok, text) = tiller(&[
        "model",
        "check",
        folder.to_str().unwrap(),
        "--inputs",
        dir.join("in.safetensors").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("UNet2DConditionModel") && text.contains("parameters:"),
        "{text}"
    );
    let got = read_safetensors(&out).unwrap();
    assert!(max_abs_diff(&got["sample"], &io["out_sample"]) < 1e-4);
    // --compare against diffusers' output under the CLI's name: within 1e-4, and a perturbed
    // reference fails.
    let reference = dir.join("reference.safetensors");
    let mut want = io["out_sample"].clone();
    let compare = |want: &HostTensor, out_name: &str| {
        write_safetensors(
            &reference,
            &BTreeMap::from([("sample".to_string(), want.clone())]),
            Default::default(),
        )
        .unwrap();
        tiller(&[
            "model",
            "check",
            folder.to_str().unwrap(),
            "--inputs",
            dir.join("in.safetensors").to_str().unwrap(),
            "--out",
            dir.join(out_name).to_str().unwrap(),
            "--compare",
            reference.to_str().unwrap(),
            "--tolerance",
            "1e-4",
        ])
    };
    let (ok, text) = compare(&want, "cmp1.safetensors");
    assert!(ok && text.contains("compare sample: max |diff|"), "{text}");
    want.data[3] += 0.5;
    let (ok, text) = compare(&want, "cmp2.safetensors");
    assert!(!ok && text.contains("above --tolerance"), "{text}");
    if let Some(first) = added.first() {
        // Without its added conditions the SDXL UNet is refused, naming the missing input.
        inputs.remove(*first);
        write_safetensors(&dir.join("in.safetensors"), &inputs, Default::default()).unwrap();
        let (ok, text) = tiller(&[
            "model",
            "check",
            folder.to_str().unwrap(),
            "--inputs",
            dir.join("in.safetensors").to_str().unwrap(),
            "--out",
            dir.join("out2.safetensors").to_str().unwrap(),
        ]);
        assert!(!ok && text.contains(first), "{text}");
    }
}

#[test]
fn clip_forward_through_the_cli_matches_transformers() {
    let dir = std::env::temp_dir().join(format!("tiller-cli-clip-{}", std::process::id()));
    let folder = fixtures().join("tiny-clip");
    let io = read_safetensors(&folder.join("io.safetensors")).unwrap();
    let inputs = BTreeMap::from([("input_ids".to_string(), io["input_ids"].clone())]);
    write_safetensors(&dir.join("in.safetensors"), &inputs, Default::default()).unwrap();
    // The same weights as transformers 5's `save_pretrained` writes them: no `text_model.` prefix.
    let unprefixed = dir.join("transformers5");
    std::fs::create_dir_all(&unprefixed).unwrap();
    std::fs::copy(folder.join("config.json"), unprefixed.join("config.json")).unwrap();
    let weights: BTreeMap<String, HostTensor> = read_safetensors(&folder.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("text_model.").unwrap().to_string(), v))
        .collect();
    write_safetensors(
        &unprefixed.join("model.safetensors"),
        &weights,
        Default::default(),
    )
    .unwrap();
    for model in [&folder, &unprefixed] {
        let out = dir.join("out.safetensors");
        let (ok, text) = tiller(&[
            "model",
            "check",
            model.to_str().unwrap(),
            "--inputs",
            dir.join("in.safetensors").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{}: {text}", model.display());
        let got = read_safetensors(&out).unwrap();
        assert!(max_abs_diff(&got["last_hidden_state"], &io["last_hidden_state"]) < 1e-4);
        assert!(max_abs_diff(&got["pooler_output"], &io["pooler_output"]) < 1e-4);
        std::fs::remove_file(&out).unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn vae_encode_and_decode_through_the_cli_match_diffusers() {
    let dir = std::env::temp_dir().join(format!("tiller-cli-vae-{}", std::process::id()));
    let folder = fixtures().join("tiny-vae");
    let io = read_safetensors(&folder.join("io.safetensors")).unwrap();
    let inputs = BTreeMap::from([
        ("sample".to_string(), io["sample"].clone()),
        ("latents".to_string(), io["latents"].clone()),
    ]);
    write_safetensors(&dir.join("in.safetensors"), &inputs, Default::default()).unwrap();
    let out = dir.join("out.safetensors");
    let (ok, text) = tiller(&[
        "model",
        "check",
        folder.to_str().unwrap(),
        "--inputs",
        dir.join("in.safetensors").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok && text.contains("AutoencoderKL"), "{text}");
    let got = read_safetensors(&out).unwrap();
    for key in ["latent_mean", "latent_logvar", "decoded", "reconstruction"] {
        assert!(max_abs_diff(&got[key], &io[key]) < 1e-4, "{key}");
    }
    // An image whose sides the VAE cannot halve is refused with the factor it needs.
    let odd = BTreeMap::from([(
        "sample".to_string(),
        HostTensor {
            shape: vec![1, 3, 6, 7],
            data: vec![0.0; 126],
        },
    )]);
    write_safetensors(&dir.join("odd.safetensors"), &odd, Default::default()).unwrap();
    let (ok, text) = tiller(&[
        "model",
        "check",
        folder.to_str().unwrap(),
        "--inputs",
        dir.join("odd.safetensors").to_str().unwrap(),
        "--out",
        dir.join("odd-out.safetensors").to_str().unwrap(),
    ]);
    assert!(!ok && text.contains("divisible by 2"), "{text}");
    assert!(!dir.join("odd-out.safetensors").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_folders_and_inputs_fail_with_a_named_cause() {
    let (ok, text) = tiller(&["model", "check", "/nonexistent/folder"]);
    assert!(
        !ok && text.contains("/nonexistent/folder/config.json"),
        "{text}"
    );

    let dir = std::env::temp_dir().join(format!("tiller-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let inputs = BTreeMap::from([(
        "sample".to_string(),
        HostTensor {
            shape: vec![1, 4, 8, 8],
            data: vec![0.0; 256],
        },
    )]);
    write_safetensors(&dir.join("in.safetensors"), &inputs, Default::default()).unwrap();
    let folder = fixtures().join("tiny-unet-sd1");
    let (ok, text) = tiller(&[
        "model",
        "check",
        folder.to_str().unwrap(),
        "--inputs",
        dir.join("in.safetensors").to_str().unwrap(),
        "--out",
        dir.join("out.safetensors").to_str().unwrap(),
    ]);
    assert!(!ok && text.contains("no input tensor `timestep`"), "{text}");
    assert!(
        !dir.join("out.safetensors").exists(),
        "nothing is written on failure"
    );

    let (ok, text) = tiller(&[
        "model",
        "check",
        folder.to_str().unwrap(),
        "--device",
        "tpu",
    ]);
    assert!(!ok && text.contains("unknown device `tpu`"), "{text}");
}

#[test]
fn sample_draws_from_a_stable_diffusion_folder_independently_of_the_batch() {
    let dir = std::env::temp_dir().join(format!("tiller-cli-sd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let folder = fixtures().join("tiny-sd-pipeline");
    let run = |batch: &str, out: &Path| {
        tiller(&[
            "sample",
            "--model",
            folder.to_str().unwrap(),
            "--prompt",
            "a photo of a red cube",
            "--prompt",
            "an astronaut riding a horse",
            "--n",
            "3",
            "--steps",
            "3",
            "--batch",
            batch,
            "--out",
            out.to_str().unwrap(),
        ])
    };
    let (a, b) = (dir.join("a.png"), dir.join("b.png"));
    let (ok, text) = run("1", &a);
    assert!(ok && text.contains("wrote 6 images"), "{text}");
    let (ok, text) = run("4", &b);
    assert!(ok, "{text}");
    let grid = std::fs::read(&a).unwrap();
    assert_eq!(
        grid,
        std::fs::read(&b).unwrap(),
        "the batch changed the images"
    );
    // The grid is 3 images of 16x16 across and 2 down with one-pixel gaps (IHDR width, height).
    assert_eq!(&grid[16..24], &[0, 0, 0, 50, 0, 0, 0, 33]);
    // An existing output is not overwritten.
    let (ok, text) = run("4", &b);
    assert!(!ok && text.contains("--out"), "{text}");
}

#[test]
fn clip_vision_forward_through_the_cli_matches_transformers() {
    let dir = std::env::temp_dir().join(format!("tiller-cli-clipv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let folder = fixtures().join("tiny-clip-vision");
    let io = read_safetensors(&folder.join("io.safetensors")).unwrap();
    let inputs = BTreeMap::from([("pixel_values".to_string(), io["pixel_values"].clone())]);
    write_safetensors(&dir.join("in.safetensors"), &inputs, Default::default()).unwrap();
    let out = dir.join("out.safetensors");
    let (ok, text) = tiller(&[
        "model",
        "check",
        folder.to_str().unwrap(),
        "--inputs",
        dir.join("in.safetensors").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        ok && text.contains("CLIPVisionModelWithProjection"),
        "{text}"
    );
    let got = read_safetensors(&out).unwrap();
    assert!(max_abs_diff(&got["image_embeds"], &io["image_embeds"]) < 1e-4);
    assert!(max_abs_diff(&got["pooler_output"], &io["pooler_output"]) < 1e-4);
    // A CLIPModel folder is recognised and reports its temperature.
    let (ok, text) = tiller(&[
        "model",
        "check",
        fixtures().join("tiny-clip-model").to_str().unwrap(),
    ]);
    assert!(
        ok && text.contains("CLIPModel") && text.contains("logit_scale"),
        "{text}"
    );
}

#[test]
fn model_check_loads_a_whole_sdxl_pipeline_folder() {
    let folder = fixtures().join("tiny-sdxl-pipeline");
    let (ok, text) = tiller(&["model", "check", folder.to_str().unwrap()]);
    assert!(ok, "{text}");
    assert!(
        text.contains("StableDiffusionXLPipeline")
            && text.contains("text_encoder_2")
            && text.contains("16x16"),
        "{text}"
    );
}

#[test]
fn model_check_loads_an_sd3_pipeline_and_runs_its_transformer() {
    let folder = fixtures().join("tiny-sd3-pipeline");
    let (ok, text) = tiller(&["model", "check", folder.to_str().unwrap()]);
    assert!(ok, "{text}");
    assert!(
        text.contains("StableDiffusion3Pipeline")
            && text.contains("transformer")
            && text.contains("text_encoder_3  (none)"),
        "{text}"
    );

    let name = "tiny-sd35-transformer";
    let dir = std::env::temp_dir().join(format!("tiller-cli-check-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let folder = fixtures().join(name);
    let io = read_safetensors(&folder.join("io.safetensors")).unwrap();
    let mut inputs: BTreeMap<String, HostTensor> = [
        "sample",
        "timestep",
        "encoder_hidden_states",
        "pooled_projections",
    ]
    .iter()
    .map(|k| (k.to_string(), io[*k].clone()))
    .collect();
    write_safetensors(&dir.join("in.safetensors"), &inputs, Default::default()).unwrap();
    let out = dir.join("out.safetensors");
    let args = |input: &Path| {
        vec![
            "model".to_string(),
            "check".into(),
            folder.to_str().unwrap().into(),
            "--inputs".into(),
            input.to_str().unwrap().into(),
            "--out".into(),
            out.to_str().unwrap().into(),
        ]
    };
    let run = |a: Vec<String>| tiller(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let (ok, text) = run(args(&dir.join("in.safetensors")));
    assert!(ok && text.contains("SD3Transformer2DModel"), "{text}");
    let got = read_safetensors(&out).unwrap();
    let diff = max_abs_diff(&got["sample"], &io["out_sample"]);
    assert!(diff < 1e-4, "max |diff| {diff}");

    // A pooled input of the wrong width is named, and nothing is written.
    std::fs::remove_file(&out).unwrap();
    inputs.insert(
        "pooled_projections".into(),
        HostTensor {
            shape: vec![2, 3],
            data: vec![0.0; 6],
        },
    );
    write_safetensors(&dir.join("bad.safetensors"), &inputs, Default::default()).unwrap();
    let (ok, text) = run(args(&dir.join("bad.safetensors")));
    assert!(!ok && text.contains("pooled_projections"), "{text}");
    assert!(!out.exists());
}

#[test]
fn sample_picks_the_best_of_n_stable_diffusion_images_by_a_clip_reward() {
    let dir = std::env::temp_dir().join(format!("tiller-cli-sd-bo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let folder = fixtures().join("tiny-sd-pipeline");
    let reward = format!(
        "clip-score:{}",
        fixtures().join("tiny-clip-model").display()
    );
    let run = |extra: &[&str], out: &str| {
        let out = dir.join(out);
        let mut args = vec![
            "sample",
            "--model",
            folder.to_str().unwrap(),
            "--prompt",
            "a photo of a red cube",
            "--n",
            "2",
            "--steps",
            "2",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (ok, text) = tiller(&args);
        (ok, text, out)
    };
    let (ok, text, best) = run(&["--best-of", "3", "--reward", &reward], "best.png");
    assert!(ok && text.contains("wrote 2 images"), "{text}");
    let (ok, text, plain) = run(&[], "plain.png");
    assert!(ok, "{text}");
    assert_ne!(std::fs::read(best).unwrap(), std::fs::read(plain).unwrap());
    let (ok, text, neg) = run(&["--negative-prompt", "a blue sphere"], "neg.png");
    assert!(ok, "{text}");
    assert_ne!(
        std::fs::read(neg).unwrap(),
        std::fs::read(dir.join("plain.png")).unwrap()
    );
}

#[test]
fn sample_draws_sd3_images_that_do_not_depend_on_the_batch() {
    let dir = std::env::temp_dir().join(format!("tiller-cli-sd3-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let folder = fixtures().join("tiny-sd3-pipeline");
    let run = |extra: &[&str], out: &str| {
        let out = dir.join(out);
        let mut args = vec![
            "sample",
            "--model",
            folder.to_str().unwrap(),
            "--prompt",
            "a photo of a red cube",
            "--prompt",
            "an astronaut riding a horse",
            "--n",
            "2",
            "--steps",
            "3",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (ok, text) = tiller(&args);
        (ok, text, out)
    };
    let (ok, text, all) = run(&[], "all.png");
    assert!(ok && text.contains("wrote 4 images"), "{text}");
    let (ok, text, one) = run(&["--batch", "1"], "one.png");
    assert!(ok, "{text}");
    let (all, one) = (tiles(&all, 16, 2), tiles(&one, 16, 2));
    assert_eq!(
        all, one,
        "an image depends on its prompt and seed, not the batch"
    );
    assert_ne!(all[0], all[1], "two seeds, two images");
    let (ok, text, _) = run(&["--sampler", "ancestral"], "bad.png");
    assert!(!ok && text.contains("--sampler"), "{text}");
    assert!(!dir.join("bad.png").exists());
}

/// The tiles of a grid `tiller sample` wrote: `n` images of `side` x `side` per row, 1-pixel gaps.
fn tiles(path: &Path, side: usize, n: usize) -> Vec<Vec<[u8; 3]>> {
    let grid = tiller_testbed::image::decode_png(&std::fs::read(path).unwrap(), path).unwrap();
    (0..n)
        .map(|k| {
            let ox = k * (side + 1);
            (0..side)
                .flat_map(|y| (0..side).map(move |x| (x, y)))
                .map(|(x, y)| grid.get(ox + x, y))
                .collect()
        })
        .collect()
}

#[test]
fn sample_filters_with_a_safety_checker_as_diffusers_does() {
    let dir = std::env::temp_dir().join(format!("tiller-cli-safety-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let pipeline = fixtures().join("tiny-sd-pipeline");
    let checker = fixtures().join("tiny-safety-checker");
    let sample = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "sample",
            "--model",
            pipeline.to_str().unwrap(),
            "--prompt",
            "a photo of a red cube",
            "--n",
            "6",
            "--steps",
            "4",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (ok, text) = tiller(&args);
        assert!(ok, "{text}");
        text
    };
    let plain = dir.join("plain.png");
    let text = sample(&plain, &[]);
    // The tiny pipeline lists no safety checker ([null, null]): nothing runs by default.
    assert!(!text.contains("safety checker"), "{text}");
    let filtered = dir.join("filtered.png");
    let text = sample(&filtered, &["--safety-checker", checker.to_str().unwrap()]);
    let line = text
        .lines()
        .find(|l| l.starts_with("safety checker"))
        .unwrap_or_else(|| panic!("{text}"));
    let flagged: usize = line
        .split(": ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|k| k.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    // Flagged images are black, the others untouched.
    let (a, b) = (tiles(&plain, 16, 6), tiles(&filtered, 16, 6));
    let black = b
        .iter()
        .filter(|t| t.iter().all(|p| *p == [0, 0, 0]))
        .count();
    assert_eq!(black, flagged, "{line}");
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    assert_eq!(same, 6 - flagged, "{line}");
    // A missing checker folder is named.
    let (ok, text) = tiller(&[
        "sample",
        "--model",
        pipeline.to_str().unwrap(),
        "--prompt",
        "a cat",
        "--safety-checker",
        dir.join("nope").to_str().unwrap(),
        "--out",
        dir.join("x.png").to_str().unwrap(),
    ]);
    assert!(!ok && text.contains("nope"), "{text}");
    assert!(!dir.join("x.png").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
