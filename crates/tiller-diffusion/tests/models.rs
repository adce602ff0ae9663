//! The UNet (SD 1.x, 2.x and SDXL layouts), the SD3 transformer and the CLIP text encoder against diffusers/transformers goldens made by
//! `scripts/fixtures/models.py`: forward outputs within 1e-4 relative, parameter and input
//! gradients of a scalar loss within 1e-3 relative, f16/bf16 weight loading, save round-trips and
//! the errors for bad folders.

use burn::tensor::{Device, Int, Tensor, TensorData};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tiller_diffusion::models::unet::AddedConditions;
use tiller_diffusion::models::weights::{
    HostTensor, collect_gradients, read_safetensors, to_device,
};
use tiller_diffusion::models::{self, load_clip_text, load_unet};
use tiller_testkit::assert_close;

fn fixture(name: &str) -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
        .join("tests/fixtures")
        .join(name)
}

fn io(name: &str) -> BTreeMap<String, HostTensor> {
    read_safetensors(&fixture(name).join("io.safetensors")).unwrap()
}

/// Input ids are stored as int64, which `read_safetensors` (floats only) refuses; read them here.
fn input_ids(name: &str) -> Vec<Vec<i64>> {
    let bytes = std::fs::read(fixture(name).join("io.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let v = st.tensor("input_ids").unwrap();
    let (b, l) = (v.shape()[0], v.shape()[1]);
    let flat: Vec<i64> = v
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (0..b).map(|i| flat[i * l..(i + 1) * l].to_vec()).collect()
}

/// Compares an f32 tensor with a golden, relative to the golden's largest magnitude: outputs of
/// random networks cross zero, where a per-element relative bound is meaningless.
fn assert_matches(actual: &[f32], golden: &HostTensor, rtol: f64, what: &str) {
    let scale = golden.data.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    assert!(
        scale > 1e-3,
        "{what}: golden is all ~0, the fixture cannot catch bugs"
    );
    assert_eq!(actual.len(), golden.data.len(), "{what}: length");
    println!("{what}: scale {scale:.3e}");
    assert_close(actual.to_vec(), golden.data.clone(), 0.0, rtol * scale);
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

/// SDXL's `text_embeds` and `time_ids` when the fixture has them.
fn added(io: &BTreeMap<String, HostTensor>, device: &Device) -> Option<AddedConditions> {
    Some(AddedConditions {
        text_embeds: to_device(io.get("text_embeds")?, device).unwrap(),
        time_ids: to_device(&io["time_ids"], device).unwrap(),
    })
}

fn unet_forward_matches(name: &str, variant: Option<&str>, golden_key: &str) {
    let device = Device::flex();
    let (_, unet) = load_unet(&fixture(name), variant, &device).unwrap();
    let io = io(name);
    let added = added(&io, &device);
    assert_eq!(unet.takes_added_conditions(), added.is_some());
    let out = unet.forward_with(
        to_device(&io["sample"], &device).unwrap(),
        to_device(&io["timestep"], &device).unwrap(),
        to_device(&io["encoder_hidden_states"], &device).unwrap(),
        added.as_ref(),
    );
    assert_matches(
        &values(out),
        &io[golden_key],
        1e-4,
        &format!("{name} {golden_key}"),
    );
}

#[test]
fn unet_sd1_forward_matches_diffusers() {
    unet_forward_matches("tiny-unet-sd1", None, "out_sample");
}

#[test]
fn unet_sd2_forward_matches_diffusers() {
    unet_forward_matches("tiny-unet-sd2", None, "out_sample");
}

#[test]
fn unet_sdxl_with_text_time_conditioning_matches_diffusers() {
    unet_forward_matches("tiny-unet-sdxl", None, "out_sample");
    unet_forward_matches("tiny-unet-sdxl", Some("fp16"), "out_sample_fp16_weights");
}

#[test]
fn unet_sdxl_gradients_match_pytorch() {
    unet_gradients_match("tiny-unet-sdxl");
}

#[test]
fn unet_fp16_weights_load_and_match() {
    unet_forward_matches("tiny-unet-sd1", Some("fp16"), "out_sample_fp16_weights");
}

fn unet_gradients_match(name: &str) {
    let device = Device::flex().autodiff();
    let (_, unet) = load_unet(&fixture(name), None, &device).unwrap();
    let io = io(name);
    let sample = to_device::<4>(&io["sample"], &device)
        .unwrap()
        .require_grad();
    let context = to_device::<3>(&io["encoder_hidden_states"], &device)
        .unwrap()
        .require_grad();
    let added = added(&io, &device).map(|a| AddedConditions {
        text_embeds: a.text_embeds.require_grad(),
        ..a
    });
    let out = unet.forward_with(
        sample.clone(),
        to_device(&io["timestep"], &device).unwrap(),
        context.clone(),
        added.as_ref(),
    );
    let loss = (out * to_device::<4>(&io["loss_weights"], &device).unwrap()).sum();
    let grads = loss.backward();
    let params = collect_gradients(&unet, &grads);
    let mut checked = 0;
    for (key, golden) in io.iter().filter(|(k, _)| k.starts_with("grad.")) {
        let name = &key["grad.".len()..];
        let actual = match name {
            "sample" => values(sample.grad(&grads).unwrap()),
            "encoder_hidden_states" => values(context.grad(&grads).unwrap()),
            "text_embeds" => values(
                added
                    .as_ref()
                    .expect("SDXL inputs")
                    .text_embeds
                    .grad(&grads)
                    .unwrap(),
            ),
            _ => params
                .get(name)
                .unwrap_or_else(|| panic!("no gradient for `{name}`"))
                .data
                .clone(),
        };
        assert_matches(&actual, golden, 1e-3, key);
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} gradients in the fixture");
}

#[test]
fn unet_sd1_gradients_match_pytorch() {
    unet_gradients_match("tiny-unet-sd1");
}

#[test]
fn unet_sd2_gradients_match_pytorch() {
    unet_gradients_match("tiny-unet-sd2");
}

fn clip_forward_matches(name: &str, variant: Option<&str>, rtol: f64) {
    clip_folder_matches(&fixture(name), name, variant, rtol);
}

/// The CLIP model in `folder` reproduces the goldens of fixture `name`.
fn clip_folder_matches(folder: &Path, name: &str, variant: Option<&str>, rtol: f64) {
    let device = Device::flex();
    let (_, clip) = load_clip_text(folder, variant, &device).unwrap();
    let io = io(name);
    let out = clip.forward_ids(&input_ids(name), &device).unwrap();
    assert_matches(
        &values(out.last_hidden_state),
        &io["last_hidden_state"],
        rtol,
        "last_hidden_state",
    );
    if let Some(pooled) = io.get("pooler_output") {
        assert_matches(&values(out.pooler_output), pooled, rtol, "pooler_output");
    }
    if let Some(pen) = io.get("hidden_states_penultimate") {
        let n = out.hidden_states.len();
        assert_matches(
            &values(out.hidden_states[n - 2].clone()),
            pen,
            rtol,
            "penultimate",
        );
    }
}

#[test]
fn clip_quick_gelu_forward_matches_transformers() {
    clip_forward_matches("tiny-clip", None, 1e-4);
}

#[test]
fn clip_gelu_forward_matches_transformers() {
    clip_forward_matches("tiny-clip-gelu", None, 1e-4);
}

#[test]
fn clip_bf16_weights_load() {
    // bf16 keeps 8 bits of mantissa: outputs move by ~1e-2 of their scale, not more.
    clip_forward_matches("tiny-clip", Some("bf16"), 5e-2);
}

#[test]
fn clip_gradients_match_pytorch() {
    let name = "tiny-clip";
    let device = Device::flex().autodiff();
    let (_, clip) = load_clip_text(&fixture(name), None, &device).unwrap();
    let io = io(name);
    let ids = input_ids(name);
    let out = clip.forward_ids(&ids, &device).unwrap();
    let loss = (out.last_hidden_state * to_device::<3>(&io["loss_weights"], &device).unwrap())
        .sum()
        + (out.pooler_output * to_device::<2>(&io["loss_weights_pooled"], &device).unwrap()).sum();
    let grads = loss.backward();
    let params = collect_gradients(&clip, &grads);
    let mut checked = 0;
    for (key, golden) in io.iter().filter(|(k, _)| k.starts_with("grad.")) {
        let name = &key["grad.".len()..];
        let actual = &params
            .get(name)
            .unwrap_or_else(|| panic!("no gradient for `{name}`"))
            .data;
        assert_matches(actual, golden, 1e-3, key);
        checked += 1;
    }
    assert!(checked >= 5);
}

/// SDXL's `text_encoder_2`: the pooled `text_embeds` through `text_projection`, and the
/// penultimate hidden states it conditions on, in value and gradient; saved and reloaded as the
/// same class.
#[test]
fn clip_with_projection_matches_transformers() {
    let name = "tiny-clip-projection";
    clip_folder_matches(&fixture(name), name, None, 1e-4);
    let device = Device::flex().autodiff();
    let (cfg, clip) = load_clip_text(&fixture(name), None, &device).unwrap();
    assert!(cfg.with_projection());
    let io = io(name);
    let out = clip.forward_ids(&input_ids(name), &device).unwrap();
    let embeds = out
        .text_embeds
        .expect("a projection model returns text_embeds");
    assert_matches(
        &values(embeds.clone()),
        &io["text_embeds"],
        1e-4,
        "text_embeds",
    );
    let n = out.hidden_states.len();
    let loss = (embeds * to_device::<2>(&io["loss_weights_embeds"], &device).unwrap()).sum()
        + (out.hidden_states[n - 2].clone()
            * to_device::<3>(&io["loss_weights"], &device).unwrap())
        .sum();
    let grads = loss.backward();
    let params = collect_gradients(&clip, &grads);
    let mut checked = 0;
    for (key, golden) in io.iter().filter(|(k, _)| k.starts_with("grad.")) {
        let actual = &params[&key["grad.".len()..]].data;
        assert_matches(actual, golden, 1e-3, key);
        checked += 1;
    }
    assert_eq!(checked, 4);
    let dir = std::env::temp_dir().join(format!("tiller-clip-proj-{}", std::process::id()));
    models::save_clip_text(&dir, &cfg, &clip).unwrap();
    assert_eq!(
        models::detect_kind(&dir).unwrap(),
        models::ModelKind::ClipText
    );
    let saved = read_safetensors(&dir.join("model.safetensors")).unwrap();
    assert!(saved.contains_key("text_projection.weight"));
    clip_folder_matches(&dir, name, None, 1e-4);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn save_then_load_round_trips_exactly() {
    let device = Device::flex();
    let dir = std::env::temp_dir().join(format!("tiller-roundtrip-{}", std::process::id()));
    let (cfg, unet) = load_unet(&fixture("tiny-unet-sd2"), None, &device).unwrap();
    models::save_unet(&dir.join("unet"), &cfg, &unet).unwrap();
    let (cfg2, unet2) = load_unet(&dir.join("unet"), None, &device).unwrap();
    assert_eq!(cfg.block_out_channels, cfg2.block_out_channels);
    let a = models::weights::collect_tensors(&unet);
    let b = models::weights::collect_tensors(&unet2);
    assert_eq!(a.len(), b.len());
    for (k, v) in &a {
        assert_eq!(v.data, b[k].data, "{k}");
    }
    // The saved file holds exactly the original checkpoint's tensors, in torch layout.
    let original =
        read_safetensors(&fixture("tiny-unet-sd2").join("diffusion_pytorch_model.safetensors"))
            .unwrap();
    assert_eq!(
        original.keys().collect::<Vec<_>>(),
        a.keys().collect::<Vec<_>>()
    );
    for (k, v) in &original {
        assert_eq!(v.shape, a[k].shape, "{k}");
        assert_eq!(v.data, a[k].data, "{k}");
    }

    let (ccfg, clip) = load_clip_text(&fixture("tiny-clip"), None, &device).unwrap();
    models::save_clip_text(&dir.join("te"), &ccfg, &clip).unwrap();
    load_clip_text(&dir.join("te"), None, &device).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `fixture`'s CLIP folder as transformers 5's `save_pretrained` writes it: the same tensors
/// without the `text_model.` prefix (its `conversion_mapping.py` removes it for `CLIPTextModel`;
/// `scripts/fixtures/models.py` adds it back for the canonical fixture). `edit` changes the
/// unprefixed tensors first.
fn transformers5_folder(
    fixture_name: &str,
    tag: &str,
    edit: impl FnOnce(&mut BTreeMap<String, HostTensor>),
) -> PathBuf {
    let src = fixture(fixture_name);
    let dir = scratch(tag);
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut t: BTreeMap<String, HostTensor> = read_safetensors(&src.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("text_model.").unwrap().to_string(), v))
        .collect();
    edit(&mut t);
    models::weights::write_safetensors(&dir.join("model.safetensors"), &t, Default::default())
        .unwrap();
    dir
}

#[test]
fn clip_saved_by_transformers_5_without_the_prefix_loads_and_matches() {
    let dir = transformers5_folder("tiny-clip", "tf5", |t| {
        assert!(t.contains_key("final_layer_norm.weight"));
    });
    clip_folder_matches(&dir, "tiny-clip", None, 1e-4);
    // Saving writes the prefixed names transformers 4 and 5 both read.
    let device = Device::flex();
    let (cfg, clip) = load_clip_text(&dir, None, &device).unwrap();
    models::save_clip_text(&dir.join("saved"), &cfg, &clip).unwrap();
    let saved = read_safetensors(&dir.join("saved/model.safetensors")).unwrap();
    assert!(
        saved.keys().all(|k| k.starts_with("text_model.")),
        "{:?}",
        saved.keys()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unprefixed_clip_file_with_a_bad_tensor_says_how_its_names_were_read() {
    let device = Device::flex();
    let dir = transformers5_folder("tiny-clip", "tf5-bad", |t| {
        t.remove("final_layer_norm.bias");
    });
    let e = load_clip_text(&dir, None, &device).unwrap_err().to_string();
    assert!(
        e.contains("missing tensor `text_model.final_layer_norm.bias`"),
        "{e}"
    );
    assert!(
        e.contains("no `text_model.` prefix, as transformers 5"),
        "{e}"
    );
    // A file mixing both layouts is not renamed: its names are reported as they are in the file.
    let mixed = transformers5_folder("tiny-clip", "tf5-mixed", |t| {
        let w = t.remove("final_layer_norm.weight").unwrap();
        t.insert("text_model.final_layer_norm.weight".into(), w);
    });
    let e = load_clip_text(&mixed, None, &device)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("missing tensor `text_model.embeddings.token_embedding.weight`"),
        "{e}"
    );
    assert!(
        !e.contains("missing tensor `text_model.final_layer_norm.weight`"),
        "{e}"
    );
    assert!(!e.contains("transformers 5"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&mixed);
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tiller-bad-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn missing_and_misshapen_tensors_are_named_with_expected_shapes() {
    let device = Device::flex();
    let src = fixture("tiny-clip");
    let dir = scratch("shapes");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut t = read_safetensors(&src.join("model.safetensors")).unwrap();
    t.remove("text_model.final_layer_norm.weight");
    let w = t
        .get_mut("text_model.encoder.layers.0.mlp.fc1.weight")
        .unwrap();
    w.shape = vec![w.shape[1], w.shape[0]];
    t.insert(
        "text_model.extra.weight".into(),
        HostTensor {
            shape: vec![1],
            data: vec![0.0],
        },
    );
    models::weights::write_safetensors(&dir.join("model.safetensors"), &t, Default::default())
        .unwrap();
    let e = load_clip_text(&dir, None, &device).unwrap_err().to_string();
    assert!(
        e.contains("missing tensor `text_model.final_layer_norm.weight` (expected shape [32])"),
        "{e}"
    );
    assert!(
        e.contains(
            "`text_model.encoder.layers.0.mlp.fc1.weight` has shape [32, 37], expected [37, 32]"
        ),
        "{e}"
    );
    assert!(
        e.contains("unexpected tensor `text_model.extra.weight`"),
        "{e}"
    );
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn pickle_checkpoints_are_refused_with_conversion_advice() {
    let device = Device::flex();
    let dir = scratch("pickle");
    std::fs::copy(
        fixture("tiny-clip").join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    std::fs::write(dir.join("pytorch_model.bin"), b"not really a pickle").unwrap();
    std::fs::write(dir.join("model.bin"), b"not really a pickle").unwrap();
    let e = load_clip_text(&dir, None, &device).unwrap_err().to_string();
    assert!(e.contains("model.bin") && e.contains("safetensors"), "{e}");
    let e = models::weights::read_safetensors(&dir.join("pytorch_model.bin"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("pickle"), "{e}");
}

#[test]
fn corrupt_weights_and_configs_are_errors_naming_the_file() {
    let device = Device::flex();
    let dir = scratch("corrupt");
    std::fs::copy(
        fixture("tiny-clip").join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    std::fs::write(
        dir.join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":",
    )
    .unwrap();
    let e = load_clip_text(&dir, None, &device).unwrap_err().to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );

    let unet_dir = scratch("unet-config");
    let cfg = std::fs::read_to_string(fixture("tiny-unet-sd1").join("config.json")).unwrap();
    std::fs::write(
        unet_dir.join("config.json"),
        cfg.replace("\"sample_size\"", "\"sampel_size\""),
    )
    .unwrap();
    let e = load_unet(&unet_dir, None, &device).unwrap_err().to_string();
    assert!(
        e.contains("sampel_size") && e.contains("sample_size") && e.contains("config.json"),
        "{e}"
    );

    std::fs::write(
        unet_dir.join("config.json"),
        cfg.replace(
            "\"use_linear_projection\": false",
            "\"use_linear_projection\": false, \"class_embed_type\": \"timestep\"",
        ),
    )
    .unwrap();
    let e = load_unet(&unet_dir, None, &device).unwrap_err().to_string();
    assert!(e.contains("class_embed_type"), "{e}");

    let e = load_unet(&scratch("empty"), None, &device)
        .unwrap_err()
        .to_string();
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn clip_rejects_out_of_vocabulary_ids_and_overlong_inputs() {
    let device = Device::flex();
    let (_, clip) = load_clip_text(&fixture("tiny-clip"), None, &device).unwrap();
    let e = clip
        .forward_ids(&[vec![0, 5, 120]], &device)
        .unwrap_err()
        .to_string();
    assert!(e.contains("120"), "{e}");
    let e = clip
        .forward_ids(&[vec![1; 17]], &device)
        .unwrap_err()
        .to_string();
    assert!(e.contains("17") && e.contains("16"), "{e}");
    // Raw forward with explicit pooling positions agrees with forward_ids.
    let ids = vec![vec![0i64, 5, 7, 98, 98]];
    let a = clip.forward_ids(&ids, &device).unwrap();
    let t = Tensor::<2, Int>::from_data(TensorData::new(ids[0].clone(), [1, 5]), &device);
    let b = clip.forward(t, &[3]);
    assert_close(values(a.pooler_output), values(b.pooler_output), 0.0, 0.0);
}

#[test]
fn lora_attaches_to_the_unet_without_changing_its_output() {
    use burn::module::{Lora, Module};
    // Every projection is a burn Linear, so burn's LoRA reparameterisation applies as it is:
    // B starts at zero, so the adapted model computes the same function, and only the adapter
    // factors train (base weights, convolutions and norms are frozen).
    let device = Device::flex().autodiff();
    let (_, unet) = load_unet(&fixture("tiny-unet-sd2"), None, &device).unwrap();
    let io = io("tiny-unet-sd2");
    let run = |m: &tiller_diffusion::models::unet::UNet2DConditionModel| {
        m.forward(
            to_device(&io["sample"], &device).unwrap(),
            to_device(&io["timestep"], &device).unwrap(),
            to_device(&io["encoder_hidden_states"], &device).unwrap(),
        )
    };
    let before = values(run(&unet));
    let adapted = unet.clone().apply_lora(Lora::new(2, 4.0));
    let out = run(&adapted);
    assert_close(values(out.clone()), before, 1e-6, 1e-6);
    let grads = out.sum().backward();
    let trained = collect_gradients(&adapted, &grads);
    assert!(
        trained.contains_key(
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight.lora.a"
        )
    );
    let frozen: Vec<_> = trained
        .keys()
        .filter(|k| !k.ends_with(".lora.a") && !k.ends_with(".lora.b"))
        .collect();
    assert!(
        frozen.is_empty(),
        "base parameters must be frozen, got gradients for {frozen:?}"
    );
    let base_params = unet.num_params();
    assert!(
        adapted.num_params() > base_params,
        "adapters add parameters"
    );
}

/// The tiny SD3 transformer's f32 forward on the fixture's inputs (leaves that require grad on
/// an autodiff device): (model, io, sample, encoder_hidden_states, pooled_projections, output).
fn sd3_forward(
    name: &str,
    device: &Device,
) -> (
    tiller_diffusion::models::sd3_transformer::SD3Transformer2DModel,
    BTreeMap<String, HostTensor>,
    Tensor<4>,
    Tensor<3>,
    Tensor<2>,
    Tensor<4>,
) {
    let (_, model) = models::load_sd3_transformer(&fixture(name), None, device).unwrap();
    let io = io(name);
    let autodiff = device.is_autodiff();
    let grad = |t: Tensor<4>| if autodiff { t.require_grad() } else { t };
    let sample = grad(to_device::<4>(&io["sample"], device).unwrap());
    let mut context = to_device::<3>(&io["encoder_hidden_states"], device).unwrap();
    let mut pooled = to_device::<2>(&io["pooled_projections"], device).unwrap();
    if autodiff {
        context = context.require_grad();
        pooled = pooled.require_grad();
    }
    let out = model
        .forward(
            sample.clone(),
            to_device(&io["timestep"], device).unwrap(),
            context.clone(),
            pooled.clone(),
        )
        .unwrap();
    (model, io, sample, context, pooled, out)
}

#[test]
fn sd3_transformer_forward_matches_diffusers() {
    for name in ["tiny-sd3-transformer", "tiny-sd35-transformer"] {
        let (.., out) = sd3_forward(name, &Device::flex());
        let io = io(name);
        assert_eq!(out.dims().to_vec(), io["out_sample"].shape);
        assert_matches(&values(out), &io["out_sample"], 1e-4, name);
    }
}

#[test]
fn sd3_transformer_gradients_match_pytorch() {
    for name in ["tiny-sd3-transformer", "tiny-sd35-transformer"] {
        let device = Device::flex().autodiff();
        let (model, io, sample, context, pooled, out) = sd3_forward(name, &device);
        let loss = (out * to_device::<4>(&io["loss_weights"], &device).unwrap()).sum();
        let grads = loss.backward();
        let params = collect_gradients(&model, &grads);
        let mut checked = 0;
        for (key, golden) in io.iter().filter(|(k, _)| k.starts_with("grad.")) {
            let actual = match &key["grad.".len()..] {
                "sample" => values(sample.grad(&grads).unwrap()),
                "encoder_hidden_states" => values(context.grad(&grads).unwrap()),
                "pooled_projections" => values(pooled.grad(&grads).unwrap()),
                p => params
                    .get(p)
                    .unwrap_or_else(|| panic!("no gradient for `{p}`"))
                    .data
                    .clone(),
            };
            assert_matches(&actual, golden, 1e-3, &format!("{name} {key}"));
            checked += 1;
        }
        assert!(checked >= 15, "{name}: only {checked} gradients");
        // The position table is a buffer in diffusers: no gradient reaches it.
        assert!(!params.contains_key("pos_embed.pos_embed"));
    }
}

#[test]
fn sd3_transformer_position_table_and_names_round_trip() {
    use tiller_diffusion::models::sd3_transformer::SD3Transformer2DConfig;
    use tiller_diffusion::models::weights::collect_tensors;
    let device = Device::flex();
    for name in ["tiny-sd3-transformer", "tiny-sd35-transformer"] {
        let folder = fixture(name);
        let file = read_safetensors(&folder.join("diffusion_pytorch_model.safetensors")).unwrap();
        let (config, model) = models::load_sd3_transformer(&folder, None, &device).unwrap();
        let saved = collect_tensors(&model);
        assert_eq!(
            saved.keys().collect::<Vec<_>>(),
            file.keys().collect::<Vec<_>>()
        );
        for (k, t) in &file {
            assert_eq!(saved[k].data, t.data, "{k}");
        }
        // A fresh model computes the table diffusers saved.
        let fresh: SD3Transformer2DConfig = config.clone();
        let fresh = collect_tensors(&fresh.init(&device).unwrap());
        let key = "pos_embed.pos_embed";
        assert_eq!(fresh[key].shape, file[key].shape);
        assert_close(fresh[key].data.clone(), file[key].data.clone(), 1e-6, 1e-6);
    }
}

#[test]
fn sd3_transformer_bad_configs_and_inputs_name_the_problem() {
    use tiller_diffusion::models::sd3_transformer::SD3Transformer2DConfig;
    let base: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tiny-sd35-transformer").join("config.json")).unwrap(),
    )
    .unwrap();
    let cases = [
        (
            "caption_projection_dim",
            serde_json::json!(12),
            "caption_projection_dim",
        ),
        ("qk_norm", serde_json::json!("l2"), "qk_norm"),
        (
            "dual_attention_layers",
            serde_json::json!([3]),
            "dual_attention_layers",
        ),
        (
            "pos_embed_max_size",
            serde_json::Value::Null,
            "pos_embed_max_size",
        ),
    ];
    for (field, value, named) in cases {
        let mut v = base.clone();
        v[field] = value;
        let config: SD3Transformer2DConfig = serde_json::from_value(v).unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains(named), "{field}: {err}");
    }
    let mut v = base.clone();
    v["use_pooled_projections"] = serde_json::json!(true);
    let err = serde_json::from_value::<SD3Transformer2DConfig>(v)
        .unwrap_err()
        .to_string();
    assert!(err.contains("use_pooled_projections"), "{err}");

    let device = Device::flex();
    let (_, model) =
        models::load_sd3_transformer(&fixture("tiny-sd3-transformer"), None, &device).unwrap();
    let forward = |h: usize, w: usize| {
        model.forward(
            Tensor::zeros([1, 4, h, w], &device),
            Tensor::zeros([1], &device),
            Tensor::zeros([1, 3, 24], &device),
            Tensor::zeros([1, 20], &device),
        )
    };
    let err = forward(14, 8).unwrap_err().to_string();
    assert!(err.contains("pos_embed_max_size"), "{err}");
    let err = forward(7, 8).unwrap_err().to_string();
    assert!(err.contains("patch_size"), "{err}");
    assert!(forward(12, 2).is_ok());
}
