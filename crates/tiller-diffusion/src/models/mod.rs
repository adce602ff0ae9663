//! Diffusers-compatible models and their folders on disk.
//!
//! A model folder is what diffusers' / transformers' `save_pretrained` writes: `config.json` plus
//! one safetensors file (or shards listed in `*.safetensors.index.json`). Tiller reads f32, f16
//! and bf16 weights (computing in f32) and writes f32.

pub mod clip;
pub mod clip_model;
pub mod clip_vision;
pub mod layers;
pub mod lora;
pub mod open_clip;
pub mod probe;
pub mod sd3_transformer;
pub mod unet;
pub mod vae;
pub mod weights;

use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::clip_vision::{ClipVisionConfig, ClipVisionModel};
use crate::models::sd3_transformer::{SD3Transformer2DConfig, SD3Transformer2DModel};
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::models::weights::{
    HostTensor, collect_tensors, load_into, read_safetensors, refuse_pickle,
};
use burn::module::Module;
use burn::tensor::Device;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tiller_core::{Error, Result};

/// diffusers' weight file name for models (`UNet2DConditionModel`, ...).
pub const DIFFUSERS_WEIGHTS: &str = "diffusion_pytorch_model";
/// transformers' weight file name.
pub const TRANSFORMERS_WEIGHTS: &str = "model";

/// Which kind of model a folder holds, read from its config.json.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    UNet2DCondition,
    ClipText,
    AutoencoderKL,
    /// `CLIPVisionModel` or `CLIPVisionModelWithProjection`.
    ClipVision,
    /// `CLIPModel`: both towers.
    Clip,
    /// `SD3Transformer2DModel`.
    SD3Transformer,
}

/// Reads config.json's class to tell a UNet, VAE or CLIP text-encoder folder apart.
pub fn detect_kind(folder: &Path) -> Result<ModelKind> {
    let path = folder.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::format(&path, e.to_string()))?;
    let class = v.get("_class_name").and_then(|c| c.as_str());
    let arch = v
        .get("architectures")
        .and_then(|a| a.as_array())
        .and_then(|a| a.first())
        .and_then(|a| a.as_str());
    let model_type = v.get("model_type").and_then(|c| c.as_str());
    match (class, arch, model_type) {
        (Some("UNet2DConditionModel"), _, _) => Ok(ModelKind::UNet2DCondition),
        (Some("AutoencoderKL"), _, _) => Ok(ModelKind::AutoencoderKL),
        (Some("SD3Transformer2DModel"), _, _) => Ok(ModelKind::SD3Transformer),
        (_, Some("CLIPTextModel" | "CLIPTextModelWithProjection"), _)
        | (_, _, Some("clip_text_model")) => Ok(ModelKind::ClipText),
        (_, Some("CLIPVisionModel" | "CLIPVisionModelWithProjection"), _)
        | (_, _, Some("clip_vision_model")) => Ok(ModelKind::ClipVision),
        (_, Some("CLIPModel"), _) => Ok(ModelKind::Clip),
        _ => Err(Error::format(
            &path,
            format!(
                "unsupported model (_class_name {class:?}, architectures[0] {arch:?}, model_type \
                 {model_type:?}); supported: UNet2DConditionModel, SD3Transformer2DModel, \
                 AutoencoderKL, CLIPTextModel(WithProjection), CLIPVisionModel(WithProjection), \
                 CLIPModel"
            ),
        )),
    }
}

/// Finds and reads the weights of `folder`: `<stem>[.<variant>].safetensors` or its sharded index.
pub fn read_folder_weights(
    folder: &Path,
    stem: &str,
    variant: Option<&str>,
) -> Result<(PathBuf, BTreeMap<String, HostTensor>)> {
    let base = match variant {
        Some(v) => format!("{stem}.{v}"),
        None => stem.to_string(),
    };
    let single = folder.join(format!("{base}.safetensors"));
    if single.exists() {
        let t = read_safetensors(&single)?;
        return Ok((single, t));
    }
    let index = folder.join(format!("{base}.safetensors.index.json"));
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::format(&index, e.to_string()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::format(&index, "no `weight_map` object"))?;
        let mut shards: Vec<&str> = map.values().filter_map(|s| s.as_str()).collect();
        shards.sort_unstable();
        shards.dedup();
        let mut all = BTreeMap::new();
        for shard in shards {
            all.extend(read_safetensors(&folder.join(shard))?);
        }
        return Ok((index, all));
    }
    for ext in ["bin", "ckpt", "pt", "pth"] {
        let pickle = folder.join(format!("{base}.{ext}"));
        if pickle.exists() {
            refuse_pickle(&pickle)?;
        }
    }
    Err(Error::format(
        folder,
        format!(
            "no weights found: expected {base}.safetensors (or a sharded {base}.safetensors.index.json)"
        ),
    ))
}

/// Loads a diffusers `UNet2DConditionModel` folder (config.json + diffusion_pytorch_model.safetensors).
pub fn load_unet(
    folder: &Path,
    variant: Option<&str>,
    device: &Device,
) -> Result<(UNet2DConditionConfig, UNet2DConditionModel)> {
    load_diffusers_folder(
        folder,
        variant,
        UNet2DConditionConfig::validate,
        |c: &UNet2DConditionConfig| c.init(device),
    )
}

/// Loads a diffusers `SD3Transformer2DModel` folder (config.json +
/// diffusion_pytorch_model.safetensors), e.g. a `StableDiffusion3Pipeline`'s `transformer/`.
pub fn load_sd3_transformer(
    folder: &Path,
    variant: Option<&str>,
    device: &Device,
) -> Result<(SD3Transformer2DConfig, SD3Transformer2DModel)> {
    load_diffusers_folder(
        folder,
        variant,
        SD3Transformer2DConfig::validate,
        |c: &SD3Transformer2DConfig| c.init(device),
    )
}

/// A diffusers model folder: `config.json` read as `C` and validated (errors name the file),
/// then `diffusion_pytorch_model[.variant].safetensors` loaded strictly into `init(config)`.
fn load_diffusers_folder<C: serde::de::DeserializeOwned, M: Module>(
    folder: &Path,
    variant: Option<&str>,
    validate: impl Fn(&C) -> Result<()>,
    init: impl Fn(&C) -> Result<M>,
) -> Result<(C, M)> {
    let config: C = tiller_core::config::from_json_file(&folder.join("config.json"))?;
    validate(&config).map_err(|e| Error::format(folder.join("config.json"), e.to_string()))?;
    let (source, tensors) = read_folder_weights(folder, DIFFUSERS_WEIGHTS, variant)?;
    let model = load_into(init(&config)?, &tensors, &source)?;
    Ok((config, model))
}

/// Loads a diffusers `AutoencoderKL` folder (config.json + diffusion_pytorch_model.safetensors),
/// with the mid-block attention under its current names or diffusers' deprecated ones.
pub fn load_vae(
    folder: &Path,
    variant: Option<&str>,
    device: &Device,
) -> Result<(AutoencoderKLConfig, AutoencoderKL)> {
    let config: AutoencoderKLConfig =
        tiller_core::config::from_json_file(&folder.join("config.json"))?;
    config
        .validate()
        .map_err(|e| Error::format(folder.join("config.json"), e.to_string()))?;
    let (source, mut tensors) = read_folder_weights(folder, DIFFUSERS_WEIGHTS, variant)?;
    vae::rename_deprecated_attention(&mut tensors);
    let model = load_into(config.init(device)?, &tensors, &source)?;
    Ok((config, model))
}

/// Loads a transformers `CLIPTextModel` folder (config.json + model.safetensors), saved by
/// transformers 4 (`text_model.`-prefixed names) or 5 (unprefixed).
pub fn load_clip_text(
    folder: &Path,
    variant: Option<&str>,
    device: &Device,
) -> Result<(ClipTextConfig, ClipTextModel)> {
    let config: ClipTextConfig = tiller_core::config::from_json_file(&folder.join("config.json"))?;
    config
        .validate()
        .map_err(|e| Error::format(folder.join("config.json"), e.to_string()))?;
    let (source, tensors) = read_folder_weights(folder, TRANSFORMERS_WEIGHTS, variant)?;
    let (tensors, renamed) = clip::with_text_model_prefix(tensors);
    let model = load_into(config.init(device)?, &tensors, &source).map_err(|e| match e {
        Error::Format { path, message } if renamed => Error::Format {
            path,
            message: format!(
                "{message}\n  (the file's names have no `text_model.` prefix, as transformers 5 \
                 saves CLIPTextModel; they are shown above with it)"
            ),
        },
        e => e,
    })?;
    Ok((config, model))
}

/// Loads a transformers `CLIPVisionModel` or `CLIPVisionModelWithProjection` folder
/// (config.json + model.safetensors), with or without the `vision_model.` prefix.
pub fn load_clip_vision(
    folder: &Path,
    variant: Option<&str>,
    device: &Device,
) -> Result<(ClipVisionConfig, ClipVisionModel)> {
    let path = folder.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::format(&path, e.to_string()))?;
    let config: ClipVisionConfig =
        serde_json::from_value(clip_vision::strip_generic_keys(&value, &[]))
            .map_err(|e| Error::format(&path, e.to_string()))?;
    config
        .validate()
        .map_err(|e| Error::format(&path, e.to_string()))?;
    let (source, tensors) = read_folder_weights(folder, TRANSFORMERS_WEIGHTS, variant)?;
    let (tensors, _) = clip_vision::with_vision_model_prefix(tensors);
    let projection = config.with_projection().then_some(config.projection_dim);
    let model = load_into(config.init(projection, device)?, &tensors, &source)?;
    Ok((config, model))
}

/// Saves a model folder as diffusers/transformers do: `config.json` and `<stem>.safetensors` (f32),
/// each written atomically.
pub fn save_folder<M: Module, C: serde::Serialize>(
    folder: &Path,
    config: &C,
    model: &M,
    stem: &str,
) -> Result<()> {
    std::fs::create_dir_all(folder).map_err(|e| Error::io(folder, e))?;
    let tensors = collect_tensors(model);
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    weights::write_safetensors(
        &folder.join(format!("{stem}.safetensors")),
        &tensors,
        metadata,
    )?;
    let json = serde_json::to_string_pretty(config).map_err(|e| Error::invalid(e.to_string()))?;
    weights::atomic_write(&folder.join("config.json"), json.as_bytes())
}

/// Saves a UNet as diffusers' `save_pretrained` does.
pub fn save_unet(
    folder: &Path,
    config: &UNet2DConditionConfig,
    model: &UNet2DConditionModel,
) -> Result<()> {
    save_folder(folder, config, model, DIFFUSERS_WEIGHTS)
}

/// Saves a VAE as diffusers' `save_pretrained` does.
pub fn save_vae(folder: &Path, config: &AutoencoderKLConfig, model: &AutoencoderKL) -> Result<()> {
    save_folder(folder, config, model, DIFFUSERS_WEIGHTS)
}

/// Saves a CLIP text model as transformers 4's `save_pretrained` does: `text_model.`-prefixed
/// names, which transformers 4 and 5 both load.
pub fn save_clip_text(folder: &Path, config: &ClipTextConfig, model: &ClipTextModel) -> Result<()> {
    let mut config = config.clone();
    config
        .architectures
        .get_or_insert_with(|| vec!["CLIPTextModel".into()]);
    config
        .model_type
        .get_or_insert_with(|| "clip_text_model".into());
    save_folder(folder, &config, model, TRANSFORMERS_WEIGHTS)
}
