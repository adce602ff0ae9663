//! open_clip's `CLIP` (Ilharco et al., the LAION models; HPSv2 and HPSv2.1 ship open_clip
//! ViT-H-14 checkpoints) read into [`ClipModel`]: the architectures are the same, only the names
//! and two layouts differ. open_clip keeps each attention's q, k and v projections in one
//! `in_proj_weight` [3D, D] (split here), and its projections `visual.proj`, `text_projection`
//! as [D, P] matrices applied as `x @ proj` (transposed here into Linear weights). Its text tower
//! pools at the highest token id (`argmax`), transformers' legacy rule, selected by giving the
//! converted config eos id 2.
//!
//! A folder in the layout of Hugging Face's open_clip repositories: `open_clip_config.json`
//! (`{"model_cfg": {...}, "preprocess_cfg": {...}}`) and `open_clip_model.safetensors`, plus the
//! tokenizer files.

use crate::models::clip::ClipTextConfig;
use crate::models::clip_model::ClipModelConfig;
use crate::models::clip_vision::{CLIP_MEAN, CLIP_STD, ClipVisionConfig};
use crate::models::weights::{HostTensor, read_safetensors, refuse_pickle};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tiller_core::{Error, Result};

/// The config file of an open_clip folder.
pub const OPEN_CLIP_CONFIG: &str = "open_clip_config.json";
/// The weights file of an open_clip folder.
pub const OPEN_CLIP_WEIGHTS: &str = "open_clip_model.safetensors";

/// Whether `folder` is an open_clip folder.
pub fn is_open_clip(folder: &Path) -> bool {
    folder.join(OPEN_CLIP_CONFIG).is_file()
}

/// Keys of a tower config Tiller reads, and keys it accepts only at their default (the value
/// that keeps the architecture CLIP's).
const VISION_KEYS: &[&str] = &[
    "image_size",
    "layers",
    "width",
    "head_width",
    "mlp_ratio",
    "patch_size",
    "patch_dropout",
];
const TEXT_KEYS: &[&str] = &[
    "context_length",
    "vocab_size",
    "width",
    "heads",
    "layers",
    "mlp_ratio",
    "pad_id",
    "eos_id",
    "hf_tokenizer_name",
    "tokenizer_kwargs",
    "tokenizer_mode",
];

/// `(key, default)` pairs of both towers' configs that select architectures other than CLIP's
/// when changed: the block's options and layer scale.
fn block_defaults() -> Vec<(&'static str, Value)> {
    let off = |k| (k, Value::Bool(false));
    vec![
        ("ls_init_value", Value::Null),
        ("final_ln_after_pool", Value::Bool(false)),
        ("output_tokens", Value::Bool(false)),
        off("qk_norm"),
        off("scaled_cosine_attn"),
        off("scale_heads"),
        off("scale_attn_inner"),
        off("scale_attn"),
        off("scale_fc"),
        ("block_type", Value::Null),
        ("act_kwargs", Value::Null),
        ("norm_kwargs", Value::Null),
    ]
}

/// [`block_defaults`] and the image tower's own: class-token pooling, learned positions, a
/// LayerNorm before the encoder, no attention pooler, no timm trunk.
fn vision_defaults() -> Vec<(&'static str, Value)> {
    let mut d = block_defaults();
    d.extend([
        ("attentional_pool", Value::Bool(false)),
        ("no_ln_pre", Value::Bool(false)),
        ("pos_embed_type", Value::from("learnable")),
        ("pool_type", Value::from("tok")),
        ("timm_model_name", Value::Null),
    ]);
    d
}

/// [`block_defaults`] and the text tower's own: causal, argmax pooling, a linear projection
/// without bias, no Hugging Face trunk.
fn text_defaults() -> Vec<(&'static str, Value)> {
    let mut d = block_defaults();
    d.extend([
        ("embed_cls", Value::Bool(false)),
        ("no_causal_mask", Value::Bool(false)),
        ("pool_type", Value::from("argmax")),
        ("proj_bias", Value::Bool(false)),
        ("proj_type", Value::from("linear")),
        ("hf_model_name", Value::Null),
    ]);
    d
}

/// Checks a tower config's keys: read ones, default-only ones at their default, nothing else.
fn check_keys(
    cfg: &serde_json::Map<String, Value>,
    read: &[&str],
    defaults: &[(&str, Value)],
    section: &str,
    path: &Path,
) -> Result<()> {
    for (k, v) in cfg {
        if read.contains(&k.as_str()) {
            continue;
        }
        match defaults.iter().find(|(d, _)| d == k) {
            Some((_, default)) if v == default => {}
            Some((_, default)) => {
                return Err(Error::format(
                    path,
                    format!(
                        "`model_cfg.{section}.{k}` is {v}; Tiller implements only {default} (the \
                         CLIP architecture)"
                    ),
                ));
            }
            None => {
                return Err(Error::format(
                    path,
                    format!("unknown key `model_cfg.{section}.{k}`"),
                ));
            }
        }
    }
    Ok(())
}

fn usize_of(
    cfg: &serde_json::Map<String, Value>,
    key: &str,
    default: Option<usize>,
    section: &str,
    path: &Path,
) -> Result<usize> {
    let bad = || {
        Error::format(
            path,
            format!("`model_cfg.{section}.{key}` must be a positive integer"),
        )
    };
    match cfg.get(key) {
        None => default.ok_or_else(bad),
        // open_clip allows `image_size` as [h, w]; square only here.
        Some(Value::Array(a)) if a.len() == 2 && a[0] == a[1] => a[0]
            .as_u64()
            .filter(|v| *v > 0)
            .map(|v| v as usize)
            .ok_or_else(bad),
        Some(v) => v
            .as_u64()
            .filter(|v| *v > 0)
            .map(|v| v as usize)
            .ok_or_else(bad),
    }
}

fn ratio_of(
    cfg: &serde_json::Map<String, Value>,
    width: usize,
    section: &str,
    path: &Path,
) -> Result<usize> {
    let r = cfg.get("mlp_ratio").and_then(Value::as_f64).unwrap_or(4.0);
    let inter = width as f64 * r;
    if inter.fract() != 0.0 || inter <= 0.0 {
        return Err(Error::format(
            path,
            format!("`model_cfg.{section}.mlp_ratio` {r} does not give a whole MLP width"),
        ));
    }
    Ok(inter as usize)
}

/// An open_clip folder's config as a transformers `CLIPConfig`, and its mean and std.
pub fn read_config(folder: &Path) -> Result<(ClipModelConfig, [f32; 3], [f32; 3])> {
    let path = folder.join(OPEN_CLIP_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(&path, format!("not valid JSON: {e}")))?;
    let model = v
        .get("model_cfg")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::format(&path, "no `model_cfg` object"))?;
    for k in model.keys() {
        if ![
            "embed_dim",
            "vision_cfg",
            "text_cfg",
            "quick_gelu",
            "custom_text",
            "cast_dtype",
            "init_logit_scale",
            "init_logit_bias",
        ]
        .contains(&k.as_str())
        {
            return Err(Error::format(&path, format!("unknown key `model_cfg.{k}`")));
        }
    }
    if model.get("init_logit_bias").is_some_and(|b| !b.is_null()) {
        return Err(Error::format(
            &path,
            "`model_cfg.init_logit_bias` selects SigLIP's loss and a logit bias; Tiller reads CLIP models",
        ));
    }
    let sub = |k: &str| {
        model
            .get(k)
            .and_then(Value::as_object)
            .ok_or_else(|| Error::format(&path, format!("no `model_cfg.{k}` object")))
    };
    let (vision, text_cfg) = (sub("vision_cfg")?, sub("text_cfg")?);
    check_keys(vision, VISION_KEYS, &vision_defaults(), "vision_cfg", &path)?;
    check_keys(text_cfg, TEXT_KEYS, &text_defaults(), "text_cfg", &path)?;
    let act = match model
        .get("quick_gelu")
        .and_then(Value::as_bool)
        .unwrap_or(false)
    {
        true => "quick_gelu",
        false => "gelu",
    };
    let embed_dim = usize_of(model, "embed_dim", None, "", &path)?;

    let vw = usize_of(vision, "width", Some(768), "vision_cfg", &path)?;
    let head_width = usize_of(vision, "head_width", Some(64), "vision_cfg", &path)?;
    if !vw.is_multiple_of(head_width) {
        return Err(Error::format(
            &path,
            format!("`model_cfg.vision_cfg.head_width` {head_width} does not divide width {vw}"),
        ));
    }
    let vision_json = serde_json::json!({
        "hidden_size": vw,
        "intermediate_size": ratio_of(vision, vw, "vision_cfg", &path)?,
        "num_hidden_layers": usize_of(vision, "layers", Some(12), "vision_cfg", &path)?,
        "num_attention_heads": vw / head_width,
        "image_size": usize_of(vision, "image_size", Some(224), "vision_cfg", &path)?,
        "patch_size": usize_of(vision, "patch_size", Some(16), "vision_cfg", &path)?,
        "hidden_act": act,
        "projection_dim": embed_dim,
        "architectures": ["CLIPVisionModelWithProjection"],
    });
    let tw = usize_of(text_cfg, "width", Some(512), "text_cfg", &path)?;
    let text_json = serde_json::json!({
        "vocab_size": usize_of(text_cfg, "vocab_size", Some(49408), "text_cfg", &path)?,
        "hidden_size": tw,
        "intermediate_size": ratio_of(text_cfg, tw, "text_cfg", &path)?,
        "num_hidden_layers": usize_of(text_cfg, "layers", Some(12), "text_cfg", &path)?,
        "num_attention_heads": usize_of(text_cfg, "heads", Some(8), "text_cfg", &path)?,
        "max_position_embeddings": usize_of(text_cfg, "context_length", Some(77), "text_cfg", &path)?,
        "hidden_act": act,
        "projection_dim": embed_dim,
        // transformers' legacy pooling (the highest id: the end-of-text token) is open_clip's
        // `argmax` pooling.
        "eos_token_id": 2,
    });
    let vision: ClipVisionConfig = serde_json::from_value(vision_json)
        .map_err(|e| Error::format(&path, format!("vision_cfg: {e}")))?;
    let text: ClipTextConfig = serde_json::from_value(text_json)
        .map_err(|e| Error::format(&path, format!("text_cfg: {e}")))?;
    vision
        .validate()
        .map_err(|e| Error::format(&path, format!("vision_cfg: {e}")))?;
    text.validate()
        .map_err(|e| Error::format(&path, format!("text_cfg: {e}")))?;
    let triple = |key: &str, default: [f32; 3]| -> Result<[f32; 3]> {
        match v.get("preprocess_cfg").and_then(|p| p.get(key)) {
            None => Ok(default),
            Some(x) => {
                let a: Vec<f32> = serde_json::from_value(x.clone())
                    .map_err(|e| Error::format(&path, format!("preprocess_cfg.{key}: {e}")))?;
                a.try_into().map_err(|_| {
                    Error::format(&path, format!("`preprocess_cfg.{key}` must have 3 numbers"))
                })
            }
        }
    };
    let mean = triple("mean", CLIP_MEAN)?;
    let std = triple("std", CLIP_STD)?;
    Ok((
        ClipModelConfig {
            class: "open_clip.CLIP".into(),
            text,
            vision,
            projection_dim: embed_dim,
        },
        mean,
        std,
    ))
}

/// The open_clip folder's weights under transformers' `CLIPModel` names (see the module
/// documentation); `source` is the file, for messages.
pub fn read_weights(folder: &Path) -> Result<(PathBuf, BTreeMap<String, HostTensor>)> {
    let source = folder.join(OPEN_CLIP_WEIGHTS);
    if !source.exists() {
        for pickle in ["open_clip_pytorch_model.bin", "open_clip_model.pt"] {
            if folder.join(pickle).exists() {
                refuse_pickle(&folder.join(pickle))?;
            }
        }
        return Err(Error::format(
            folder,
            format!(
                "no {OPEN_CLIP_WEIGHTS}; from an open_clip or HPSv2 checkpoint: \
                 `safetensors.torch.save_file(torch.load(path)[\"state_dict\"], \"{OPEN_CLIP_WEIGHTS}\")` \
                 (HPSv2's files hold a `state_dict`; open_clip's `.bin` files are the state dict itself)"
            ),
        ));
    }
    let raw = read_safetensors(&source)?;
    let mut out = BTreeMap::new();
    for (name, t) in raw {
        // Checkpoints saved from DistributedDataParallel prefix every name.
        let name = name.strip_prefix("module.").unwrap_or(&name).to_string();
        if name == "attn_mask" || name == "visual.attn_mask" {
            continue;
        }
        for (k, v) in rename(&name, t, &source)? {
            out.insert(k, v);
        }
    }
    Ok((source, out))
}

/// One open_clip tensor as transformers tensor(s).
fn rename(name: &str, t: HostTensor, source: &Path) -> Result<Vec<(String, HostTensor)>> {
    let (tower, rest) = match name.strip_prefix("visual.") {
        Some(rest) => ("vision_model", rest),
        None => ("text_model", name),
    };
    let one = |k: String| Ok(vec![(k, t.clone())]);
    if let Some(block) = rest.strip_prefix("transformer.resblocks.") {
        let (i, part) = block
            .split_once('.')
            .ok_or_else(|| Error::format(source, format!("unexpected tensor `{name}`")))?;
        let layer = format!("{tower}.encoder.layers.{i}");
        let mapped = match part {
            "attn.in_proj_weight" | "attn.in_proj_bias" => {
                let kind = if part.ends_with("weight") {
                    "weight"
                } else {
                    "bias"
                };
                return split_qkv(&t, name, source).map(|parts| {
                    ["q_proj", "k_proj", "v_proj"]
                        .iter()
                        .zip(parts)
                        .map(|(p, t)| (format!("{layer}.self_attn.{p}.{kind}"), t))
                        .collect()
                });
            }
            _ => match part.split_once('.') {
                Some(("ln_1", x)) => format!("layer_norm1.{x}"),
                Some(("ln_2", x)) => format!("layer_norm2.{x}"),
                Some(("attn", x)) if x.starts_with("out_proj.") => format!("self_attn.{x}"),
                Some(("mlp", x)) if x.starts_with("c_fc.") => {
                    format!("mlp.fc1.{}", &x["c_fc.".len()..])
                }
                Some(("mlp", x)) if x.starts_with("c_proj.") => {
                    format!("mlp.fc2.{}", &x["c_proj.".len()..])
                }
                _ => return Err(Error::format(source, format!("unexpected tensor `{name}`"))),
            },
        };
        return one(format!("{layer}.{mapped}"));
    }
    let transposed = |k: &str| -> Result<Vec<(String, HostTensor)>> {
        let [d, p] = t.shape[..] else {
            return Err(Error::format(
                source,
                format!(
                    "tensor `{name}` has shape {:?}, expected [width, embed_dim]",
                    t.shape
                ),
            ));
        };
        let mut data = vec![0.0; d * p];
        for i in 0..d {
            for j in 0..p {
                data[j * d + i] = t.data[i * p + j];
            }
        }
        Ok(vec![(
            k.to_string(),
            HostTensor {
                shape: vec![p, d],
                data,
            },
        )])
    };
    match (tower, rest) {
        ("vision_model", "class_embedding") => {
            one("vision_model.embeddings.class_embedding".into())
        }
        ("vision_model", "positional_embedding") => {
            one("vision_model.embeddings.position_embedding.weight".into())
        }
        ("vision_model", "conv1.weight") => {
            one("vision_model.embeddings.patch_embedding.weight".into())
        }
        ("vision_model", "proj") => transposed("visual_projection.weight"),
        ("text_model", "token_embedding.weight") => {
            one("text_model.embeddings.token_embedding.weight".into())
        }
        ("text_model", "positional_embedding") => {
            one("text_model.embeddings.position_embedding.weight".into())
        }
        ("text_model", "text_projection") => transposed("text_projection.weight"),
        ("text_model", "logit_scale") => one("logit_scale".into()),
        (_, r) => {
            let (module, x) = r
                .split_once('.')
                .ok_or_else(|| Error::format(source, format!("unexpected tensor `{name}`")))?;
            let renamed = match (tower, module) {
                ("vision_model", "ln_pre") => "pre_layrnorm",
                ("vision_model", "ln_post") => "post_layernorm",
                ("text_model", "ln_final") => "final_layer_norm",
                _ => return Err(Error::format(source, format!("unexpected tensor `{name}`"))),
            };
            one(format!("{tower}.{renamed}.{x}"))
        }
    }
}

/// `in_proj_weight` [3D, D] / `in_proj_bias` [3D] as q, k and v.
fn split_qkv(t: &HostTensor, name: &str, source: &Path) -> Result<Vec<HostTensor>> {
    let rows = t.shape[0];
    if !rows.is_multiple_of(3) || t.shape.len() > 2 {
        return Err(Error::format(
            source,
            format!(
                "tensor `{name}` has shape {:?}, expected [3 * width, ...]",
                t.shape
            ),
        ));
    }
    let per = t.data.len() / 3;
    let mut shape = t.shape.clone();
    shape[0] = rows / 3;
    Ok((0..3)
        .map(|i| HostTensor {
            shape: shape.clone(),
            data: t.data[i * per..(i + 1) * per].to_vec(),
        })
        .collect())
}
