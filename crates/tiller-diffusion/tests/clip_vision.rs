//! CLIP's image tower, `CLIPModel` and the SD safety checker against transformers/diffusers
//! goldens made by `scripts/fixtures/clip_rewards.py`: outputs within 1e-4 of scale, parameter
//! and input gradients within 1e-3, both key layouts, the differentiable preprocessing against
//! PyTorch's bicubic `F.interpolate`.

use burn::tensor::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tiller_diffusion::models::clip_model::{ClipModel, SafetyChecker, l2_normalize};
use tiller_diffusion::models::clip_vision::ClipImagePreprocess;
use tiller_diffusion::models::weights::{
    HostTensor, collect_gradients, read_safetensors, to_device, write_safetensors,
};
use tiller_diffusion::models::{ModelKind, detect_kind, load_clip_vision};
use tiller_testkit::assert_close;

fn fixture(name: &str) -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
        .join("tests/fixtures")
        .join(name)
}

fn io(name: &str) -> BTreeMap<String, HostTensor> {
    read_safetensors(&fixture(name).join("io.safetensors")).unwrap()
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

fn assert_matches(actual: &[f32], golden: &HostTensor, rtol: f64, what: &str) {
    let scale = golden.data.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    assert!(scale > 1e-6, "{what}: golden is all ~0");
    assert_eq!(actual.len(), golden.data.len(), "{what}: length");
    assert_close(actual.to_vec(), golden.data.clone(), 0.0, rtol * scale);
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tiller-clipv-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn vision_tower_with_projection_matches_transformers() {
    let device = Device::flex();
    let folder = fixture("tiny-clip-vision");
    assert_eq!(detect_kind(&folder).unwrap(), ModelKind::ClipVision);
    let (config, tower) = load_clip_vision(&folder, None, &device).unwrap();
    assert!(config.with_projection());
    let io = io("tiny-clip-vision");
    let out = tower
        .forward(to_device(&io["pixel_values"], &device).unwrap())
        .unwrap();
    assert_matches(
        &values(out.last_hidden_state),
        &io["last_hidden_state"],
        1e-4,
        "hidden",
    );
    assert_matches(
        &values(out.pooler_output),
        &io["pooler_output"],
        1e-4,
        "pooled",
    );
    assert_matches(
        &values(out.image_embeds.unwrap()),
        &io["image_embeds"],
        1e-4,
        "embeds",
    );
    // The wrong image size is an error, not a silent resize.
    let bad = tower
        .forward(Tensor::zeros([1, 3, 8, 8], &device))
        .unwrap_err();
    assert!(bad.to_string().contains("image_size 16"), "{bad}");
}

#[test]
fn vision_tower_gradients_match_pytorch() {
    let device = Device::flex().autodiff();
    let (_, tower) = load_clip_vision(&fixture("tiny-clip-vision"), None, &device).unwrap();
    let io = io("tiny-clip-vision");
    let pixels = to_device::<4>(&io["pixel_values"], &device)
        .unwrap()
        .require_grad();
    let out = tower.forward(pixels.clone()).unwrap();
    let loss = (out.image_embeds.unwrap()
        * to_device::<2>(&io["loss_weights_embeds"], &device).unwrap())
    .sum()
        + (out.last_hidden_state * to_device::<3>(&io["loss_weights"], &device).unwrap()).sum();
    let grads = loss.backward();
    let params = collect_gradients(&tower, &grads);
    let mut checked = 0;
    for (key, golden) in io.iter().filter(|(k, _)| k.starts_with("grad.")) {
        let name = &key["grad.".len()..];
        let actual = match name {
            "pixel_values" => values(pixels.grad(&grads).unwrap()),
            _ => params
                .get(name)
                .unwrap_or_else(|| panic!("no gradient for `{name}`"))
                .data
                .clone(),
        };
        assert_matches(&actual, golden, 1e-3, key);
        checked += 1;
    }
    assert_eq!(checked, 8);
}

#[test]
fn a_clip_vision_model_saved_by_transformers_5_loads() {
    // transformers 5 saves CLIPVisionModel without the `vision_model.` prefix: the same tower
    // without its projection, written that way, gives the same pooled output.
    let device = Device::flex();
    let src = fixture("tiny-clip-vision");
    let dir = scratch("t5");
    let config = std::fs::read_to_string(src.join("config.json"))
        .unwrap()
        .replace("CLIPVisionModelWithProjection", "CLIPVisionModel");
    std::fs::write(dir.join("config.json"), config).unwrap();
    let weights: BTreeMap<String, HostTensor> = read_safetensors(&src.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("visual_projection."))
        .map(|(k, v)| (k.strip_prefix("vision_model.").unwrap().to_string(), v))
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &weights, Default::default()).unwrap();
    let (config, tower) = load_clip_vision(&dir, None, &device).unwrap();
    assert!(!config.with_projection() && tower.visual_projection.is_none());
    let io = io("tiny-clip-vision");
    let out = tower
        .forward(to_device(&io["pixel_values"], &device).unwrap())
        .unwrap();
    assert_matches(
        &values(out.pooler_output),
        &io["pooler_output"],
        1e-4,
        "pooled",
    );
    assert!(out.image_embeds.is_none());
}

#[test]
fn preprocessing_matches_clip_image_processor_antialiased_resize_crop_and_normalise() {
    let device = Device::flex();
    let io = io("tiny-clip-model");
    let images = to_device::<4>(&io["images"], &device).unwrap();
    // Not square and larger than the tower's 16: the resize shrinks, where antialiasing counts.
    assert_eq!(images.dims(), [2, 3, 20, 26]);
    let pixels = values(ClipImagePreprocess::new(16).apply(images).unwrap());
    assert_eq!(pixels.len(), 2 * 3 * 16 * 16);
    assert_matches(&pixels, &io["pixel_values"], 1e-4, "pixel_values");
    // transformers 5's CLIPImageProcessor on the same images.
    assert_matches(
        &pixels,
        &io["processor_pixel_values"],
        1e-4,
        "processor_pixel_values",
    );
}

#[test]
fn the_antialiased_resize_matrix_is_torchs_on_shrinking_and_growing() {
    use tiller_diffusion::models::clip_vision::resize_matrix;
    // Rows are convex-ish combinations: they sum to 1.
    for (n_in, n_out) in [(512, 224), (20, 16), (16, 30), (7, 7)] {
        let m = resize_matrix(n_in, n_out);
        for row in m.chunks(n_in) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
    }
    // Identity at the same size: the cubic is 1 at 0 and 0 at the other integers.
    let m = resize_matrix(7, 7);
    for i in 0..7 {
        for j in 0..7 {
            let want = if i == j { 1.0 } else { 0.0 };
            assert!(
                (m[i * 7 + j] - want).abs() < 1e-6,
                "({i}, {j}) {}",
                m[i * 7 + j]
            );
        }
    }
    // Halving: the cubic stretched over a footprint of 8 inputs, cut at the border and
    // renormalised. Row 1 of `F.interpolate(torch.eye(8, dtype=torch.float64)[None, None],
    // size=(4, 8), mode="bicubic", align_corners=False, antialias=True)`, centred between inputs
    // 2 and 3, rounded to 4 places:
    let m = resize_matrix(8, 4);
    let want = [-0.0347, 0.112, 0.4286, 0.4286, 0.112, -0.0347, -0.0116, 0.0];
    let got = &m[8..16];
    for (g, w) in got.iter().zip(want) {
        assert!((*g as f64 - w).abs() < 1e-4, "{got:?}");
    }
}

#[test]
fn clip_model_embeds_text_and_images_as_transformers() {
    let device = Device::flex();
    let folder = fixture("tiny-clip-model");
    assert_eq!(detect_kind(&folder).unwrap(), ModelKind::Clip);
    let model = ClipModel::load(&folder, &device).unwrap();
    let io = io("tiny-clip-model");
    let ids: Vec<Vec<i64>> = io["input_ids"]
        .data
        .chunks(io["input_ids"].shape[1])
        .map(|r| r.iter().map(|&v| v as i64).collect())
        .collect();
    // CLIPModel's forward returns the embeddings normalised.
    let text = l2_normalize(model.text_embeds(&ids, &device).unwrap());
    assert_matches(&values(text), &io["text_embeds"], 1e-4, "text_embeds");
    let image = model
        .image_embeds(to_device(&io["pixel_values"], &device).unwrap())
        .unwrap();
    assert_matches(
        &values(l2_normalize(image)),
        &io["image_embeds"],
        1e-4,
        "image_embeds",
    );
    assert!(model.logit_scale.is_finite() && model.logit_scale > 2.0);
}

#[test]
fn the_safety_checker_flags_what_diffusers_flags() {
    let device = Device::flex();
    let checker = SafetyChecker::load(&fixture("tiny-safety-checker"), &device).unwrap();
    let io = io("tiny-safety-checker");
    let scores = checker
        .check(to_device(&io["pixel_values"], &device).unwrap())
        .unwrap();
    assert_matches(
        &values(scores.concept_scores),
        &io["concept_scores"],
        1e-4,
        "concepts",
    );
    assert_matches(
        &values(scores.special_scores),
        &io["special_scores"],
        1e-4,
        "special",
    );
    let flagged: Vec<bool> = io["has_nsfw"].data.iter().map(|v| *v > 0.5).collect();
    assert_eq!(scores.has_nsfw, flagged);
    // The fixture flags some images and not others, one of them through the special-care
    // adjustment alone.
    assert!(flagged.iter().any(|f| *f) && !flagged.iter().all(|f| *f));
}

#[test]
fn a_safety_checker_in_the_older_nested_layout_loads() {
    // CompVis' file nests the tower: `vision_model.vision_model.*`.
    let device = Device::flex();
    let src = fixture("tiny-safety-checker");
    let dir = scratch("nested");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let weights: BTreeMap<String, HostTensor> = read_safetensors(&src.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(k, v)| match k.starts_with("vision_model.") {
            true => (format!("vision_model.{k}"), v),
            false => (k, v),
        })
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &weights, Default::default()).unwrap();
    let checker = SafetyChecker::load(&dir, &device).unwrap();
    let io = io("tiny-safety-checker");
    let scores = checker
        .check(to_device(&io["pixel_values"], &device).unwrap())
        .unwrap();
    assert_matches(
        &values(scores.concept_scores),
        &io["concept_scores"],
        1e-4,
        "concepts",
    );

    // A missing concept tensor is named.
    let mut broken = weights.clone();
    broken.remove("concept_embeds");
    write_safetensors(&dir.join("model.safetensors"), &broken, Default::default()).unwrap();
    let e = SafetyChecker::load(&dir, &device).unwrap_err().to_string();
    assert!(
        e.contains("concept_embeds") && e.contains("model.safetensors"),
        "{e}"
    );
}

#[test]
fn clip_configs_with_unknown_keys_are_refused_naming_the_key() {
    let device = Device::flex();
    let src = fixture("tiny-clip-model");
    let dir = scratch("badcfg");
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let cfg = std::fs::read_to_string(src.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        cfg.replacen(
            "\"projection_dim\"",
            "\"projection_dimm\": 3, \"projection_dim\"",
            1,
        ),
    )
    .unwrap();
    let e = ClipModel::load(&dir, &device).unwrap_err().to_string();
    assert!(
        e.contains("projection_dimm") && e.contains("config.json"),
        "{e}"
    );
    // Generic keys that older transformers repeat in the sub-configs are fine.
    let v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    let mut v = v.as_object().unwrap().clone();
    let mut vision = v["vision_config"].as_object().unwrap().clone();
    vision.insert("num_beams".into(), 1.into());
    vision.insert("output_hidden_states".into(), false.into());
    v.insert("vision_config".into(), vision.into());
    std::fs::write(dir.join("config.json"), serde_json::to_string(&v).unwrap()).unwrap();
    ClipModel::load(&dir, &device).unwrap();
}
