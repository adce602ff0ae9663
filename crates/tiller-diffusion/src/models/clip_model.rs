//! transformers' `CLIPModel` (both towers, both projections and the learned temperature: the
//! architecture of OpenAI CLIP, of CLIPScore's ViT-L/14 and of PickScore) and diffusers'
//! `StableDiffusionSafetyChecker` (a CLIP image tower compared with 17 concept and 3
//! special-care embeddings, Rando et al. 2022 describe it), from the folders transformers and
//! diffusers save.

use crate::models::clip::{ClipTextConfig, ClipTextModel, TEXT_MODEL_PREFIX};
use crate::models::clip_vision::{
    CLIP_MEAN, CLIP_STD, ClipVisionConfig, ClipVisionModel, GENERIC_CONFIG_KEYS,
    VISION_MODEL_PREFIX, strip_generic_keys,
};
use crate::models::layers::linear;
use crate::models::open_clip;
use crate::models::weights::{HostTensor, load_into, to_device};
use crate::models::{TRANSFORMERS_WEIGHTS, read_folder_weights};
use burn::tensor::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;
use tiller_core::{Error, Result};

/// Top-level keys of a `CLIPConfig` besides the sub-configs: kept or ignored, none changes the
/// forward pass.
const CLIP_CONFIG_KEYS: &[&str] = &[
    "architectures",
    "model_type",
    "projection_dim",
    "logit_scale_init_value",
    "initializer_factor",
    "initializer_range",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "text_config_dict",
    "vision_config_dict",
    "text_config",
    "vision_config",
    "_name_or_path",
    "_commit_hash",
];

/// A `CLIPConfig` config.json: both towers' configs and the joint projection width.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipModelConfig {
    /// `architectures[0]` (`CLIPModel`, `StableDiffusionSafetyChecker`, ...).
    pub class: String,
    pub text: ClipTextConfig,
    pub vision: ClipVisionConfig,
    pub projection_dim: usize,
}

impl ClipModelConfig {
    /// Reads a `CLIPConfig` config.json. Generic `PretrainedConfig` keys that older files repeat
    /// in the sub-configs are dropped; any other unknown key is an error naming it.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        let m = v
            .as_object()
            .ok_or_else(|| Error::format(path, "expected a JSON object"))?;
        if let Some(k) = m.keys().find(|k| {
            !CLIP_CONFIG_KEYS.contains(&k.as_str()) && !GENERIC_CONFIG_KEYS.contains(&k.as_str())
        }) {
            return Err(Error::format(path, format!("unknown CLIPConfig key `{k}`")));
        }
        let class = m
            .get("architectures")
            .and_then(|a| a.as_array())
            .and_then(|a| a.first())
            .and_then(|a| a.as_str())
            .unwrap_or("CLIPModel")
            .to_string();
        let sub = |key: &str, keep: &[&str]| {
            m.get(key)
                .map(|c| strip_generic_keys(c, keep))
                .ok_or_else(|| Error::format(path, format!("no `{key}` object")))
        };
        let text: ClipTextConfig = serde_json::from_value(sub(
            "text_config",
            &["bos_token_id", "eos_token_id", "pad_token_id"],
        )?)
        .map_err(|e| Error::format(path, format!("text_config: {e}")))?;
        let vision: ClipVisionConfig = serde_json::from_value(sub("vision_config", &[])?)
            .map_err(|e| Error::format(path, format!("vision_config: {e}")))?;
        text.validate()
            .map_err(|e| Error::format(path, format!("text_config: {e}")))?;
        vision
            .validate()
            .map_err(|e| Error::format(path, format!("vision_config: {e}")))?;
        let projection_dim =
            match m.get("projection_dim") {
                None => 512,
                Some(p) => p.as_u64().filter(|&p| p > 0).ok_or_else(|| {
                    Error::format(path, "`projection_dim` must be a positive integer")
                })? as usize,
            };
        Ok(Self {
            class,
            text,
            vision,
            projection_dim,
        })
    }
}

/// Splits a CLIP file's tensors into those under `prefixes` and the rest.
fn take_prefixed(
    tensors: &mut BTreeMap<String, HostTensor>,
    prefixes: &[&str],
) -> BTreeMap<String, HostTensor> {
    let names: Vec<String> = tensors
        .keys()
        .filter(|k| prefixes.iter().any(|p| k.starts_with(p)))
        .cloned()
        .collect();
    names
        .into_iter()
        .map(|k| {
            let v = tensors.remove(&k).expect("listed");
            (k, v)
        })
        .collect()
}

/// Errors on tensors no part of the model took, naming them.
fn no_leftovers(tensors: &BTreeMap<String, HostTensor>, source: &Path) -> Result<()> {
    if tensors.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = tensors
        .iter()
        .take(20)
        .map(|(k, v)| format!("unexpected tensor `{k}` (shape {:?})", v.shape))
        .collect();
    Err(Error::format(source, names.join("\n  ")))
}

/// The image tower with its projection, loaded from `vision_model.*` and
/// `visual_projection.weight` (`nested`: the safety checker's older files put the tower under
/// `vision_model.vision_model.*`).
fn load_image_tower(
    config: &ClipVisionConfig,
    projection_dim: usize,
    tensors: &mut BTreeMap<String, HostTensor>,
    source: &Path,
    device: &Device,
) -> Result<ClipVisionModel> {
    let nested = format!("{VISION_MODEL_PREFIX}{VISION_MODEL_PREFIX}");
    let part: BTreeMap<String, HostTensor> =
        take_prefixed(tensors, &[VISION_MODEL_PREFIX, "visual_projection."])
            .into_iter()
            .map(|(k, v)| match k.strip_prefix(VISION_MODEL_PREFIX) {
                Some(rest) if k.starts_with(&nested) => (rest.to_string(), v),
                _ => (k, v),
            })
            .collect();
    load_into(config.init(Some(projection_dim), device)?, &part, source)
}

/// transformers' `CLIPModel`.
#[derive(Debug, Clone)]
pub struct ClipModel {
    pub config: ClipModelConfig,
    /// `text_model.*` and `text_projection`.
    pub text: ClipTextModel,
    /// `vision_model.*` and `visual_projection`.
    pub vision: ClipVisionModel,
    /// The learned log-temperature (`logit_scale`); logits are `exp(logit_scale) cos`.
    pub logit_scale: f64,
    /// The image normalisation the model was trained with (`preprocessor_config.json`'s
    /// `image_mean`/`image_std`, open_clip's `preprocess_cfg`; CLIP's when absent).
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl ClipModel {
    /// Loads a transformers `CLIPModel` folder (config.json + model.safetensors, and
    /// preprocessor_config.json when present) or an open_clip folder
    /// ([`crate::models::open_clip`]).
    pub fn load(folder: &Path, device: &Device) -> Result<Self> {
        if open_clip::is_open_clip(folder) {
            let (config, mean, std) = open_clip::read_config(folder)?;
            let (source, tensors) = open_clip::read_weights(folder)?;
            return Self::from_tensors(config, tensors, &source, (mean, std), device);
        }
        let config = ClipModelConfig::read(&folder.join("config.json"))?;
        let (source, tensors) = read_folder_weights(folder, TRANSFORMERS_WEIGHTS, None)?;
        let norm = read_normalisation(&folder.join("preprocessor_config.json"))?;
        Self::from_tensors(config, tensors, &source, norm, device)
    }

    /// The model from tensors under transformers' names.
    fn from_tensors(
        config: ClipModelConfig,
        mut tensors: BTreeMap<String, HostTensor>,
        source: &Path,
        (mean, std): ([f32; 3], [f32; 3]),
        device: &Device,
    ) -> Result<Self> {
        let source = source.to_path_buf();
        let scale = tensors.remove("logit_scale").ok_or_else(|| {
            Error::format(&source, "missing tensor `logit_scale` (expected shape [])")
        })?;
        if scale.data.len() != 1 {
            return Err(Error::format(
                &source,
                format!(
                    "tensor `logit_scale` has shape {:?}, expected []",
                    scale.shape
                ),
            ));
        }
        let text_part = take_prefixed(&mut tensors, &[TEXT_MODEL_PREFIX, "text_projection."]);
        let mut text = config.text.init(device)?;
        let hidden = config.text.hidden_size;
        text.text_projection = Some(linear(hidden, config.projection_dim, false, device));
        let text = load_into(text, &text_part, &source)?;
        let vision = load_image_tower(
            &config.vision,
            config.projection_dim,
            &mut tensors,
            &source,
            device,
        )?;
        no_leftovers(&tensors, &source)?;
        Ok(Self {
            config,
            text,
            vision,
            logit_scale: scale.data[0] as f64,
            mean,
            std,
        })
    }

    /// The projected text embeddings [B, P] of token ids (`get_text_features`).
    pub fn text_embeds(&self, input_ids: &[Vec<i64>], device: &Device) -> Result<Tensor<2>> {
        self.text
            .forward_ids(input_ids, device)?
            .text_embeds
            .ok_or_else(|| Error::invalid("CLIPModel's text tower has no projection"))
    }

    /// The projected image embeddings [B, P] of preprocessed pixels (`get_image_features`).
    pub fn image_embeds(&self, pixel_values: Tensor<4>) -> Result<Tensor<2>> {
        self.vision
            .forward(pixel_values)?
            .image_embeds
            .ok_or_else(|| Error::invalid("CLIPModel's image tower has no projection"))
    }
}

/// `image_mean` and `image_std` of a `CLIPImageProcessor` config, CLIP's when the file is absent.
fn read_normalisation(path: &Path) -> Result<([f32; 3], [f32; 3])> {
    if !path.exists() {
        return Ok((CLIP_MEAN, CLIP_STD));
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
    let triple = |key: &str, default: [f32; 3]| -> Result<[f32; 3]> {
        match v.get(key) {
            None => Ok(default),
            Some(x) => serde_json::from_value::<[f32; 3]>(x.clone())
                .map_err(|e| Error::format(path, format!("`{key}` must be 3 numbers: {e}"))),
        }
    };
    Ok((
        triple("image_mean", CLIP_MEAN)?,
        triple("image_std", CLIP_STD)?,
    ))
}

/// Rows scaled to unit L2 norm. x: [B, D]
pub fn l2_normalize(x: Tensor<2>) -> Tensor<2> {
    let norm = x.clone().powf_scalar(2.0).sum_dim(1).sqrt();
    x / norm
}

/// What [`SafetyChecker::check`] finds for each image.
#[derive(Debug, Clone)]
pub struct SafetyScores {
    /// [B, 17]: cosine to each concept minus its threshold, plus 0.01 where a special-care
    /// concept fired; a concept is present where its score is above 0.
    pub concept_scores: Tensor<2>,
    /// [B, 3]: cosine to each special-care concept minus its threshold.
    pub special_scores: Tensor<2>,
    /// Whether any concept score is above 0 (diffusers blacks out such images).
    pub has_nsfw: Vec<bool>,
}

/// diffusers' `StableDiffusionSafetyChecker` (the `safety_checker/` folder of SD 1.x pipelines),
/// as its `forward` computes with `adjustment = 0.0`.
#[derive(Debug, Clone)]
pub struct SafetyChecker {
    pub vision: ClipVisionModel,
    /// [17, P] and [3, P].
    pub concept_embeds: Tensor<2>,
    pub special_care_embeds: Tensor<2>,
    /// [17] and [3]: the thresholds.
    pub concept_embeds_weights: Tensor<1>,
    pub special_care_embeds_weights: Tensor<1>,
}

/// The increment to every concept score of an image where a special-care concept fired.
pub const SPECIAL_CARE_ADJUSTMENT: f64 = 0.01;

impl SafetyChecker {
    /// Loads a safety checker folder (a `CLIPConfig` config.json + model.safetensors), as
    /// transformers 5 saves it (`vision_model.*`) or as older files have it
    /// (`vision_model.vision_model.*`).
    pub fn load(folder: &Path, device: &Device) -> Result<Self> {
        let config = ClipModelConfig::read(&folder.join("config.json"))?;
        let (source, mut tensors) = read_folder_weights(folder, TRANSFORMERS_WEIGHTS, None)?;
        let p = config.projection_dim;
        let mut take = |name: &str| -> Result<HostTensor> {
            tensors
                .remove(name)
                .ok_or_else(|| Error::format(&source, format!("missing tensor `{name}`")))
        };
        let (concept, special) = (take("concept_embeds")?, take("special_care_embeds")?);
        let concept_w = take("concept_embeds_weights")?;
        let special_w = take("special_care_embeds_weights")?;
        for (embeds, weights, name) in [
            (&concept, &concept_w, "concept_embeds"),
            (&special, &special_w, "special_care_embeds"),
        ] {
            let [n, d] = embeds.shape[..] else {
                return Err(Error::format(
                    &source,
                    format!(
                        "tensor `{name}` has shape {:?}, expected [N, {p}]",
                        embeds.shape
                    ),
                ));
            };
            if d != p || weights.shape != [n] {
                return Err(Error::format(
                    &source,
                    format!(
                        "`{name}` is {:?} and `{name}_weights` {:?}; expected [N, {p}] and [N] \
                         (projection_dim {p})",
                        embeds.shape, weights.shape
                    ),
                ));
            }
        }
        let vision = load_image_tower(
            &config.vision,
            config.projection_dim,
            &mut tensors,
            &source,
            device,
        )?;
        no_leftovers(&tensors, &source)?;
        Ok(Self {
            vision,
            concept_embeds: to_device(&concept, device)?,
            special_care_embeds: to_device(&special, device)?,
            concept_embeds_weights: to_device(&concept_w, device)?,
            special_care_embeds_weights: to_device(&special_w, device)?,
        })
    }

    /// Scores preprocessed pixels [B, 3, S, S] (differentiable in them).
    pub fn check(&self, pixel_values: Tensor<4>) -> Result<SafetyScores> {
        let device = pixel_values.device();
        let embeds = self
            .vision
            .forward(pixel_values)?
            .image_embeds
            .expect("the safety checker's tower has its projection");
        let image = l2_normalize(embeds);
        let cosine = |concepts: &Tensor<2>| {
            image
                .clone()
                .matmul(l2_normalize(concepts.clone().to_device(&device)).transpose())
        };
        let special_scores = cosine(&self.special_care_embeds)
            - self
                .special_care_embeds_weights
                .clone()
                .to_device(&device)
                .unsqueeze_dim::<2>(0);
        let special_care = special_scores
            .clone()
            .greater_elem(0.0)
            .any_dim(1)
            .float()
            .detach();
        let concept_scores = cosine(&self.concept_embeds)
            - self
                .concept_embeds_weights
                .clone()
                .to_device(&device)
                .unsqueeze_dim::<2>(0)
            + special_care * SPECIAL_CARE_ADJUSTMENT;
        let has_nsfw = concept_scores
            .clone()
            .greater_elem(0.0)
            .any_dim(1)
            .into_data()
            .try_into_vec::<bool>()
            .map_err(|e| Error::invalid(format!("{e:?}")))?;
        Ok(SafetyScores {
            concept_scores,
            special_scores,
            has_nsfw,
        })
    }
}
