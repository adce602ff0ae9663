//! `tiller model check`: load a model folder, print what it is, optionally run one forward pass.

use anyhow::{Context, Result, bail};
use burn::tensor::Tensor;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tiller_diffusion::models::clip_model::ClipModel;
use tiller_diffusion::models::unet::AddedConditions;
use tiller_diffusion::models::weights::{
    HostTensor, parameter_shapes, read_safetensors, to_device, write_safetensors,
};
use tiller_diffusion::models::{
    ModelKind, detect_kind, load_clip_text, load_clip_vision, load_sd3_transformer, load_unet,
    load_vae,
};
use tiller_diffusion::stable_diffusion::{StableDiffusion, is_stable_diffusion};
use tiller_diffusion::stable_diffusion3::{StableDiffusion3, is_stable_diffusion3};

fn host<const D: usize>(t: Tensor<D>) -> HostTensor {
    let shape = t.dims().to_vec();
    let data = t
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32");
    HostTensor { shape, data }
}

/// Token ids [B, L] as rows.
fn id_rows(ids: &HostTensor) -> Result<Vec<Vec<i64>>> {
    let [b, l] = ids.shape[..] else {
        bail!("`input_ids` has shape {:?}; expected [B, L]", ids.shape)
    };
    Ok((0..b)
        .map(|i| {
            ids.data[i * l..(i + 1) * l]
                .iter()
                .map(|&v| v as i64)
                .collect()
        })
        .collect())
}

/// The number of parameters in a module's shape list.
fn count(shapes: Vec<(String, Vec<usize>)>) -> usize {
    shapes
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum()
}

/// Loads a Stable Diffusion 3 pipeline folder and prints its components and their sizes.
fn check_sd3_pipeline(folder: &Path, device: &burn::tensor::Device) -> Result<()> {
    let sd = StableDiffusion3::load(folder, device)?;
    println!("{} from {}", sd.index.class_name, folder.display());
    let parts = [
        ("text_encoder", count(parameter_shapes(&sd.text_encoder))),
        (
            "text_encoder_2",
            count(parameter_shapes(&sd.text_encoder_2)),
        ),
        ("transformer", count(parameter_shapes(&sd.transformer))),
        ("vae", count(parameter_shapes(&sd.vae))),
    ];
    for (name, n) in &parts {
        println!("  {name:<15} {n} parameters");
    }
    println!(
        "  tokenizers      {} and {} ids, max length {}; {} zero tokens in T5's place",
        sd.tokenizer.vocab_size(),
        sd.tokenizer_2.vocab_size(),
        sd.tokenizer.max_length(),
        sd.t5_tokens
    );
    println!(
        "  latents         /{} (patch size {})",
        sd.vae_scale_factor(),
        sd.transformer_config.patch_size
    );
    for (name, class) in &sd.index.components {
        if class.is_none() {
            println!("  {name:<15} (none)");
        }
    }
    Ok(())
}

/// Loads a Stable Diffusion pipeline folder and prints its components and their sizes.
fn check_pipeline(folder: &Path, device: &burn::tensor::Device) -> Result<()> {
    let sd = StableDiffusion::load(folder, device)?;
    let index = &sd.index;
    println!("{} from {}", index.class_name, folder.display());
    let mut parts = vec![
        ("text_encoder", count(parameter_shapes(&sd.text_encoder))),
        ("unet", count(parameter_shapes(&sd.unet))),
        ("vae", count(parameter_shapes(&sd.vae))),
    ];
    if let Some(xl) = &sd.xl {
        parts.push((
            "text_encoder_2",
            count(parameter_shapes(&xl.text_encoder_2)),
        ));
    }
    for (name, n) in &parts {
        println!("  {name:<15} {n} parameters");
    }
    println!(
        "  tokenizer       {} ids, max length {}",
        sd.tokenizer.vocab_size(),
        sd.tokenizer.max_length()
    );
    println!(
        "  default image   {0}x{0} (latents /{1})",
        sd.default_resolution()?,
        sd.vae_scale_factor()
    );
    for (name, class) in &index.components {
        if class.is_none() {
            println!("  {name:<15} (none)");
        }
    }
    Ok(())
}

fn input<'a>(
    inputs: &'a BTreeMap<String, HostTensor>,
    name: &str,
    path: &Path,
) -> Result<&'a HostTensor> {
    inputs.get(name).with_context(|| {
        format!(
            "{}: no input tensor `{name}` (found: {})",
            path.display(),
            inputs.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    })
}

/// A denoiser's inputs under diffusers' argument names: `sample` [B, C, H, W], `timestep` ([] or
/// [1], broadcast over the batch, or [B]) and `encoder_hidden_states` [B, L, D].
fn denoiser_inputs(
    inputs: &BTreeMap<String, HostTensor>,
    path: &Path,
    device: &burn::tensor::Device,
) -> Result<(Tensor<4>, Tensor<1>, Tensor<3>)> {
    let sample = to_device::<4>(input(inputs, "sample", path)?, device)
        .context("`sample` must be [B, C, H, W]")?;
    let b = sample.dims()[0];
    let t = input(inputs, "timestep", path)?;
    let timestep = match t.shape.as_slice() {
        [] | [1] => Tensor::<1>::from_floats(vec![t.data[0]; b].as_slice(), device),
        [n] if *n == b => to_device::<1>(t, device)?,
        s => bail!("`timestep` has shape {s:?}; expected [] or [{b}]"),
    };
    let ctx = to_device::<3>(input(inputs, "encoder_hidden_states", path)?, device)
        .context("`encoder_hidden_states` must be [B, L, D]")?;
    Ok((sample, timestep, ctx))
}

pub fn run(
    folder: &Path,
    variant: Option<&str>,
    io: Option<(PathBuf, PathBuf)>,
    device: &str,
    compare: Option<(PathBuf, f64)>,
) -> Result<()> {
    let device = tiller_core::device::parse_device(device)?;
    if is_stable_diffusion(folder) || is_stable_diffusion3(folder) {
        if io.is_some() || variant.is_some() {
            bail!(
                "{} is a pipeline folder: check one component with --inputs (e.g. {}/unet), or \
                 sample it with `tiller sample --model`",
                folder.display(),
                folder.display()
            );
        }
        if is_stable_diffusion3(folder) {
            return check_sd3_pipeline(folder, &device);
        }
        return check_pipeline(folder, &device);
    }
    let kind = detect_kind(folder)?;
    let mut outputs = BTreeMap::new();
    let inputs = match &io {
        Some((path, _)) => Some(read_safetensors(path)?),
        None => None,
    };
    let params = match kind {
        ModelKind::UNet2DCondition => {
            let (config, model) = load_unet(folder, variant, &device)?;
            println!("UNet2DConditionModel from {}", folder.display());
            println!("{}", serde_json::to_string_pretty(&config)?);
            if let (Some(inputs), Some((path, _))) = (&inputs, &io) {
                let (sample, timestep, ctx) = denoiser_inputs(inputs, path, &device)?;
                let b = sample.dims()[0];
                // SDXL's added_cond_kwargs.
                let added = match model.takes_added_conditions() {
                    false => None,
                    true => Some(AddedConditions {
                        text_embeds: to_device::<2>(input(inputs, "text_embeds", path)?, &device)
                            .context("`text_embeds` must be [B, P]")?,
                        time_ids: to_device::<2>(input(inputs, "time_ids", path)?, &device)
                            .context("`time_ids` must be [B, 6]")?,
                    }),
                };
                if let Some(a) = &added {
                    let (p, ids) = (a.text_embeds.dims(), a.time_ids.dims());
                    let want = config.pooled_text_dim().unwrap_or(0);
                    if p != [b, want] || ids != [b, 6] {
                        bail!(
                            "`text_embeds` is {p:?} and `time_ids` {ids:?}; this UNet takes \
                             [{b}, {want}] and [{b}, 6]"
                        );
                    }
                }
                outputs.insert(
                    "sample".to_string(),
                    host(model.forward_with(sample, timestep, ctx, added.as_ref())),
                );
            }
            parameter_shapes(&model)
        }
        ModelKind::SD3Transformer => {
            let (config, model) = load_sd3_transformer(folder, variant, &device)?;
            println!("SD3Transformer2DModel from {}", folder.display());
            println!("{}", serde_json::to_string_pretty(&config)?);
            if let (Some(inputs), Some((path, _))) = (&inputs, &io) {
                let (sample, timestep, ctx) = denoiser_inputs(inputs, path, &device)?;
                let b = sample.dims()[0];
                let pooled = to_device::<2>(input(inputs, "pooled_projections", path)?, &device)
                    .context("`pooled_projections` must be [B, pooled_projection_dim]")?;
                let (c, p) = (ctx.dims(), pooled.dims());
                if c[0] != b || c[2] != config.joint_attention_dim {
                    bail!(
                        "`encoder_hidden_states` is {c:?}; this transformer takes [{b}, L, {}]",
                        config.joint_attention_dim
                    );
                }
                if p != [b, config.pooled_projection_dim] {
                    bail!(
                        "`pooled_projections` is {p:?}; this transformer takes [{b}, {}]",
                        config.pooled_projection_dim
                    );
                }
                let out = model.forward(sample, timestep, ctx, pooled)?;
                outputs.insert("sample".to_string(), host(out));
            }
            parameter_shapes(&model)
        }
        ModelKind::ClipText => {
            let (config, model) = load_clip_text(folder, variant, &device)?;
            let class = match config.with_projection() {
                true => "CLIPTextModelWithProjection",
                false => "CLIPTextModel",
            };
            println!("{class} from {}", folder.display());
            println!("{}", serde_json::to_string_pretty(&config)?);
            if let (Some(inputs), Some((path, _))) = (&inputs, &io) {
                let rows = id_rows(input(inputs, "input_ids", path)?)?;
                let out = model.forward_ids(&rows, &device)?;
                outputs.insert("last_hidden_state".into(), host(out.last_hidden_state));
                outputs.insert("pooler_output".into(), host(out.pooler_output));
                if let Some(embeds) = out.text_embeds {
                    outputs.insert("text_embeds".into(), host(embeds));
                }
            }
            parameter_shapes(&model)
        }
        ModelKind::AutoencoderKL => {
            let (config, model) = load_vae(folder, variant, &device)?;
            println!("AutoencoderKL from {}", folder.display());
            println!("{}", serde_json::to_string_pretty(&config)?);
            if let (Some(inputs), Some((path, _))) = (&inputs, &io) {
                // Either input, or both: images are encoded, latents (unscaled) decoded.
                let sample = inputs.get("sample");
                let latents = inputs.get("latents");
                if sample.is_none() && latents.is_none() {
                    bail!(
                        "{}: no input tensor `sample` (images) or `latents` (found: {})",
                        path.display(),
                        inputs.keys().cloned().collect::<Vec<_>>().join(", ")
                    );
                }
                if let Some(sample) = sample {
                    let sample = to_device::<4>(sample, &device)
                        .context("`sample` must be [B, C, H, W] images in [-1, 1]")?;
                    let f = config.downsampling_factor();
                    let [_, _, h, w] = sample.dims();
                    if h % f != 0 || w % f != 0 {
                        bail!("`sample` is {h}x{w}; this VAE needs sides divisible by {f}");
                    }
                    let posterior = model.encode(sample);
                    let reconstruction = model.decode(posterior.mode());
                    outputs.insert("latent_mean".into(), host(posterior.mean));
                    outputs.insert("latent_logvar".into(), host(posterior.logvar));
                    outputs.insert("reconstruction".into(), host(reconstruction));
                }
                if let Some(latents) = latents {
                    let latents = to_device::<4>(latents, &device)
                        .context("`latents` must be [B, latent_channels, h, w]")?;
                    outputs.insert("decoded".into(), host(model.decode(latents)));
                }
            }
            parameter_shapes(&model)
        }
        ModelKind::ClipVision => {
            let (config, model) = load_clip_vision(folder, variant, &device)?;
            let class = match config.with_projection() {
                true => "CLIPVisionModelWithProjection",
                false => "CLIPVisionModel",
            };
            println!("{class} from {}", folder.display());
            println!("{}", serde_json::to_string_pretty(&config)?);
            if let (Some(inputs), Some((path, _))) = (&inputs, &io) {
                let pixels = to_device::<4>(input(inputs, "pixel_values", path)?, &device)
                    .context("`pixel_values` must be [B, C, S, S]")?;
                let out = model.forward(pixels)?;
                outputs.insert("last_hidden_state".into(), host(out.last_hidden_state));
                outputs.insert("pooler_output".into(), host(out.pooler_output));
                if let Some(embeds) = out.image_embeds {
                    outputs.insert("image_embeds".into(), host(embeds));
                }
            }
            parameter_shapes(&model)
        }
        ModelKind::Clip => {
            if variant.is_some() {
                bail!("--variant is not read for CLIPModel folders (model.safetensors only)");
            }
            let model = ClipModel::load(folder, &device)?;
            println!("CLIPModel from {}", folder.display());
            println!("logit_scale: {}", model.logit_scale);
            if let (Some(inputs), Some((path, _))) = (&inputs, &io) {
                if let Some(ids) = inputs.get("input_ids") {
                    let rows = id_rows(ids)?;
                    outputs.insert(
                        "text_embeds".into(),
                        host(model.text_embeds(&rows, &device)?),
                    );
                }
                if let Some(pixels) = inputs.get("pixel_values") {
                    let pixels = to_device::<4>(pixels, &device)
                        .context("`pixel_values` must be [B, C, S, S]")?;
                    outputs.insert("image_embeds".into(), host(model.image_embeds(pixels)?));
                }
                if outputs.is_empty() {
                    bail!(
                        "{}: no input tensor `input_ids` or `pixel_values`",
                        path.display()
                    );
                }
            }
            let mut params = parameter_shapes(&model.text);
            params.extend(parameter_shapes(&model.vision));
            params.push(("logit_scale".into(), vec![]));
            params
        }
    };
    let count: usize = params
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    println!("parameters: {count} in {} tensors", params.len());
    if let Some((_, out)) = io {
        write_safetensors(&out, &outputs, HashMap::new())?;
        println!(
            "wrote {} to {}",
            outputs.keys().cloned().collect::<Vec<_>>().join(", "),
            out.display()
        );
    }
    if let Some((path, tolerance)) = compare {
        compare_outputs(&outputs, &path, tolerance)?;
    }
    Ok(())
}

/// Compares each output with the same-named tensor of `path`; fails above `tolerance` (max
/// |difference| over the reference's largest magnitude).
fn compare_outputs(
    outputs: &BTreeMap<String, HostTensor>,
    path: &Path,
    tolerance: f64,
) -> Result<()> {
    let reference = read_safetensors(path)?;
    let mut worst = 0f64;
    for (name, got) in outputs {
        let want = reference
            .get(name)
            .with_context(|| format!("{}: no tensor `{name}` to compare with", path.display()))?;
        if want.shape != got.shape {
            bail!(
                "`{name}` has shape {:?} here and {:?} in {}",
                got.shape,
                want.shape,
                path.display()
            );
        }
        let scale = want.data.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
        let diff = got
            .data
            .iter()
            .zip(&want.data)
            .fold(0f64, |m, (a, b)| m.max((a - b).abs() as f64));
        let rel = diff / scale.max(f64::MIN_POSITIVE);
        println!("compare {name}: max |diff| {diff:.3e}, relative {rel:.3e} (scale {scale:.3e})");
        worst = worst.max(rel);
    }
    if worst > tolerance || worst.is_nan() {
        bail!(
            "outputs differ from {} by {worst:.3e} relative, above --tolerance {tolerance:e}",
            path.display()
        );
    }
    println!("compare: within {tolerance:e} of {}", path.display());
    Ok(())
}
