//! `AutoencoderKL` against diffusers goldens made by `scripts/fixtures/models.py` (`tiny-vae`:
//! the SD 1.x/2.x/SDXL layout; `tiny-vae-sd3`: no quant convs, a shift factor, no mid-block
//! attention): posterior moments, decode and reconstruction within 1e-4 relative to the golden's
//! scale, parameter and input gradients of a scalar loss within 1e-3, deprecated attention names,
//! the pipelines' latent scaling, save round-trips and bad configs.

use burn::tensor::{Device, Distribution, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tiller_diffusion::models::vae::{AutoencoderKLConfig, DiagonalGaussian};
use tiller_diffusion::models::weights::{
    HostTensor, collect_gradients, read_safetensors, to_device, write_safetensors,
};
use tiller_diffusion::models::{self, ModelKind, load_vae};
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

/// Relative to the golden's largest magnitude (outputs of random networks cross zero).
fn assert_matches(actual: &[f32], golden: &HostTensor, rtol: f64, what: &str) {
    let scale = golden.data.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    assert!(scale > 1e-3, "{what}: golden is all ~0");
    assert_eq!(actual.len(), golden.data.len(), "{what}: length");
    assert_close(actual.to_vec(), golden.data.clone(), 0.0, rtol * scale);
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tiller-vae-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn forward_matches(folder: &Path, golden: &str) {
    let device = Device::flex();
    let (_, vae) = load_vae(folder, None, &device).unwrap();
    let io = io(golden);
    let sample = to_device::<4>(&io["sample"], &device).unwrap();
    let posterior = vae.encode(sample.clone());
    assert_matches(&values(posterior.mean), &io["latent_mean"], 1e-4, "mean");
    assert_matches(
        &values(posterior.logvar),
        &io["latent_logvar"],
        1e-4,
        "logvar",
    );
    let decoded = vae.decode(to_device(&io["latents"], &device).unwrap());
    assert_matches(&values(decoded), &io["decoded"], 1e-4, "decoded");
    assert_matches(
        &values(vae.reconstruct(sample)),
        &io["reconstruction"],
        1e-4,
        "reconstruction",
    );
}

#[test]
fn vae_encode_and_decode_match_diffusers() {
    for name in ["tiny-vae", "tiny-vae-sd3"] {
        assert_eq!(
            models::detect_kind(&fixture(name)).unwrap(),
            ModelKind::AutoencoderKL
        );
        forward_matches(&fixture(name), name);
    }
}

#[test]
fn vae_gradients_match_diffusers() {
    let device = Device::flex().autodiff();
    let (_, vae) = load_vae(&fixture("tiny-vae"), None, &device).unwrap();
    let io = io("tiny-vae");
    let sample = to_device::<4>(&io["sample"], &device)
        .unwrap()
        .require_grad();
    let latents = to_device::<4>(&io["latents"], &device)
        .unwrap()
        .require_grad();
    let posterior = vae.encode(sample.clone());
    let decoded = vae.decode(latents.clone());
    let w = |k: &str| to_device::<4>(&io[k], &device).unwrap();
    let loss = (decoded * w("loss_weights_decoded")).sum()
        + (posterior.mean * w("loss_weights_mean")).sum()
        + (posterior.logvar * w("loss_weights_logvar")).sum();
    let grads = loss.backward();
    let params = collect_gradients(&vae, &grads);
    let mut checked = 0;
    for (key, golden) in io.iter().filter(|(k, _)| k.starts_with("grad.")) {
        let name = &key["grad.".len()..];
        let actual = match name {
            "sample" => values(sample.grad(&grads).unwrap()),
            "latents" => values(latents.grad(&grads).unwrap()),
            _ => params
                .get(name)
                .unwrap_or_else(|| panic!("no gradient for `{name}`"))
                .data
                .clone(),
        };
        assert_matches(&actual, golden, 1e-3, key);
        checked += 1;
    }
    assert_eq!(checked, 20, "every gradient in the fixture is compared");
}

#[test]
fn deprecated_attention_names_load_and_saving_writes_current_ones() {
    let src = fixture("tiny-vae");
    let dir = scratch("deprecated");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let weights = read_safetensors(&src.join("diffusion_pytorch_model.safetensors")).unwrap();
    let old: BTreeMap<String, HostTensor> = weights
        .into_iter()
        .map(|(k, v)| {
            let k = k
                .replace("attentions.0.to_q.", "attentions.0.query.")
                .replace("attentions.0.to_k.", "attentions.0.key.")
                .replace("attentions.0.to_v.", "attentions.0.value.")
                .replace("attentions.0.to_out.0.", "attentions.0.proj_attn.");
            (k, v)
        })
        .collect();
    assert!(old.contains_key("decoder.mid_block.attentions.0.proj_attn.weight"));
    write_safetensors(
        &dir.join("diffusion_pytorch_model.safetensors"),
        &old,
        Default::default(),
    )
    .unwrap();
    forward_matches(&dir, "tiny-vae");

    let device = Device::flex();
    let (config, vae) = load_vae(&dir, None, &device).unwrap();
    let saved = dir.join("saved");
    models::save_vae(&saved, &config, &vae).unwrap();
    let names = read_safetensors(&saved.join("diffusion_pytorch_model.safetensors")).unwrap();
    assert!(names.contains_key("encoder.mid_block.attentions.0.to_out.0.weight"));
    assert!(!names.keys().any(|k| k.contains("proj_attn")));
    forward_matches(&saved, "tiny-vae");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn latents_are_scaled_as_diffusers_pipelines_scale_them() {
    let device = Device::flex();
    let z = Tensor::<4>::random([2, 6, 3, 3], Distribution::Normal(0.0, 1.0), &device);
    let z_values = values(z.clone());

    // SD3/Flux: (z - shift) * scale.
    let (sd3, _) = load_vae(&fixture("tiny-vae-sd3"), None, &device).unwrap();
    assert_eq!(
        (sd3.scaling_factor, sd3.shift_factor),
        (1.5305, Some(0.0609))
    );
    let want: Vec<f32> = z_values
        .iter()
        .map(|v| ((*v as f64 - 0.0609) * 1.5305) as f32)
        .collect();
    assert_close(values(sd3.scale_latents(z.clone())), want, 1e-6, 1e-6);
    assert_close(
        values(sd3.unscale_latents(sd3.scale_latents(z.clone()))),
        z_values.clone(),
        1e-6,
        1e-6,
    );

    // Per-channel mean and std: (z - mean_c) * scale / std_c.
    let mut per_channel = AutoencoderKLConfig::new(vec![32, 64]);
    per_channel.latent_channels = 6;
    per_channel.scaling_factor = 0.5;
    per_channel.latents_mean = Some(vec![0.1, -0.2, 0.3, 0.0, 1.0, -1.0]);
    per_channel.latents_std = Some(vec![1.0, 2.0, 0.5, 4.0, 1.5, 0.25]);
    per_channel.validate().unwrap();
    let got = values(per_channel.scale_latents(z.clone()));
    let (mean, std) = (
        per_channel.latents_mean.clone().unwrap(),
        per_channel.latents_std.clone().unwrap(),
    );
    for (i, (g, v)) in got.iter().zip(&z_values).enumerate() {
        let c = (i / 9) % 6;
        let want = (*v as f64 - mean[c]) * 0.5 / std[c];
        assert!(
            (*g as f64 - want).abs() < 1e-5,
            "element {i}: {g} vs {want}"
        );
    }
    assert_close(
        values(per_channel.unscale_latents(per_channel.scale_latents(z))),
        z_values,
        1e-5,
        1e-5,
    );
}

#[test]
fn the_posterior_samples_with_the_given_noise_and_clamps_logvar() {
    let device = Device::flex();
    let moments = Tensor::<4>::random([1, 4, 2, 2], Distribution::Normal(0.0, 1.0), &device);
    // One extreme log-variance on each side of the clamp.
    let moments = moments.slice_assign(
        [0..1, 2..3, 0..1, 0..2],
        Tensor::<1>::from_floats([-50.0, 40.0], &device).reshape([1, 1, 1, 2]),
    );
    let post = DiagonalGaussian::from_moments(moments.clone());
    let logvar = values(post.logvar.clone());
    assert_eq!((logvar[0], logvar[1]), (-30.0, 20.0));
    let noise = Tensor::<4>::random([1, 2, 2, 2], Distribution::Normal(0.0, 1.0), &device);
    let got = values(post.sample(noise.clone()));
    let (m, lv, n) = (values(post.mean.clone()), logvar, values(noise));
    for i in 0..8 {
        let want = m[i] + (0.5 * lv[i]).exp() * n[i];
        assert!((got[i] - want).abs() <= 1e-5 * want.abs().max(1.0), "{i}");
    }
    assert_eq!(values(post.mode()), m);
}

#[test]
fn bad_vae_configs_name_the_field() {
    let device = Device::flex();
    let src = fixture("tiny-vae");
    let weights = src.join("diffusion_pytorch_model.safetensors");
    let case = |tag: &str, edit: &dyn Fn(&mut serde_json::Value)| -> String {
        let dir = scratch(tag);
        std::fs::copy(&weights, dir.join("diffusion_pytorch_model.safetensors")).unwrap();
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap())
                .unwrap();
        edit(&mut config);
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let e = load_vae(&dir, None, &device).unwrap_err().to_string();
        let _ = std::fs::remove_dir_all(&dir);
        e
    };
    let e = case("unknown", &|c| c["latent_chanels"] = 4.into());
    assert!(e.contains("latent_chanels"), "{e}");
    let e = case("mean", &|c| {
        c["latents_mean"] = serde_json::json!([0.0, 0.0]);
        c["latents_std"] = serde_json::json!([1.0, 1.0]);
    });
    assert!(
        e.contains("latents_mean") && e.contains("latent_channels is 4"),
        "{e}"
    );
    let e = case("groups", &|c| c["norm_num_groups"] = 3.into());
    assert!(e.contains("norm_num_groups"), "{e}");
    let e = case("blocks", &|c| {
        c["up_block_types"] = serde_json::json!(["UpDecoderBlock2D"])
    });
    assert!(e.contains("up_block_types"), "{e}");
    // Weights that do not fit the config name the tensor and its expected shape.
    let e = case("shape", &|c| c["latent_channels"] = 8.into());
    assert!(
        e.contains("decoder.conv_in.weight") && e.contains("[16, 8, 3, 3]"),
        "{e}"
    );
}
