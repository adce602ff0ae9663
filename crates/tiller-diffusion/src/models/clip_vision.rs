//! transformers' `CLIPVisionModel` and `CLIPVisionModelWithProjection` (Radford et al. 2021): a
//! ViT over `patch_size` patches with a class token, a LayerNorm before the encoder
//! (transformers spells it `pre_layrnorm`), the text tower's encoder layers without a mask, and
//! the pooled output = `post_layernorm` of the class token; the projection (no bias) maps it to
//! the joint embedding space. Also CLIP's image preprocessing as differentiable tensor operations.
//!
//! transformers 5 saves `CLIPVisionModel` without the `vision_model.` prefix (as it saves
//! `CLIPTextModel` without `text_model.`); both layouts load.

use crate::models::clip::{ClipEncoder, HiddenAct, act_default, eps_default, proj_default, twelve};
use crate::models::layers::{layer_norm, linear};
use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, Linear};

use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tiller_core::{Error, Result};

/// CLIP's image normalisation (OpenAI CLIP; open_clip's ViT-H/14 used by PickScore and HPSv2 has
/// the same): per-channel mean and std of RGB in [0, 1].
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// The prefix transformers 4 gives every `CLIPVisionModel` tensor.
pub const VISION_MODEL_PREFIX: &str = "vision_model.";

/// transformers' `CLIPVisionConfig` as written in config.json (top level, or `vision_config` of a
/// `CLIPConfig`). Generic keys that do not affect the forward pass are accepted; unknown keys are
/// an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipVisionConfig {
    #[serde(default = "hidden_default")]
    pub hidden_size: usize,
    #[serde(default = "inter_default")]
    pub intermediate_size: usize,
    #[serde(default = "proj_default")]
    pub projection_dim: usize,
    #[serde(default = "twelve")]
    pub num_hidden_layers: usize,
    #[serde(default = "twelve")]
    pub num_attention_heads: usize,
    #[serde(default = "three")]
    pub num_channels: usize,
    #[serde(default = "image_default")]
    pub image_size: usize,
    #[serde(default = "patch_default")]
    pub patch_size: usize,
    #[serde(default = "act_default")]
    pub hidden_act: HiddenAct,
    #[serde(default = "eps_default")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub attention_dropout: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initializer_range: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initializer_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transformers_version: Option<String>,
    #[serde(rename = "_name_or_path", default, skip_serializing)]
    pub name_or_path: Option<String>,
}

fn hidden_default() -> usize {
    768
}
fn inter_default() -> usize {
    3072
}
fn three() -> usize {
    3
}
fn image_default() -> usize {
    224
}
fn patch_default() -> usize {
    32
}

/// Keys of transformers' `PretrainedConfig` that nested sub-configs of older files repeat
/// (generation and task settings): none changes the forward pass of a CLIP tower.
pub(crate) const GENERIC_CONFIG_KEYS: &[&str] = &[
    "add_cross_attention",
    "bad_words_ids",
    "begin_suppress_tokens",
    "bos_token_id",
    "chunk_size_feed_forward",
    "cross_attention_hidden_size",
    "decoder_start_token_id",
    "diversity_penalty",
    "do_sample",
    "early_stopping",
    "encoder_no_repeat_ngram_size",
    "eos_token_id",
    "exponential_decay_length_penalty",
    "finetuning_task",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "id2label",
    "is_decoder",
    "is_encoder_decoder",
    "label2id",
    "length_penalty",
    "max_length",
    "min_length",
    "no_repeat_ngram_size",
    "num_beam_groups",
    "num_beams",
    "num_return_sequences",
    "output_attentions",
    "output_hidden_states",
    "output_scores",
    "pad_token_id",
    "prefix",
    "problem_type",
    "pruned_heads",
    "remove_invalid_values",
    "repetition_penalty",
    "return_dict",
    "return_dict_in_generate",
    "sep_token_id",
    "suppress_tokens",
    "task_specific_params",
    "temperature",
    "tf_legacy_loss",
    "tie_encoder_decoder",
    "tie_word_embeddings",
    "tokenizer_class",
    "top_k",
    "top_p",
    "torchscript",
    "typical_p",
    "use_bfloat16",
];

/// A nested sub-config (`text_config`, `vision_config`) without the generic keys of
/// [`GENERIC_CONFIG_KEYS`] that `keep` does not name (the text config keeps its token ids).
pub(crate) fn strip_generic_keys(value: &serde_json::Value, keep: &[&str]) -> serde_json::Value {
    match value {
        serde_json::Value::Object(m) => serde_json::Value::Object(
            m.iter()
                .filter(|(k, _)| {
                    keep.contains(&k.as_str()) || !GENERIC_CONFIG_KEYS.contains(&k.as_str())
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        other => other.clone(),
    }
}

impl ClipVisionConfig {
    /// Checks sizes, naming the field at fault.
    pub fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(Error::config(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            ));
        }
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return Err(Error::config(
                "patch_size",
                format!(
                    "{} does not divide image_size {}",
                    self.patch_size, self.image_size
                ),
            ));
        }
        if self.num_hidden_layers == 0 {
            return Err(Error::config("num_hidden_layers", "must be positive"));
        }
        Ok(())
    }

    /// Whether `architectures` names `CLIPVisionModelWithProjection`.
    pub fn with_projection(&self) -> bool {
        self.architectures
            .as_ref()
            .is_some_and(|a| a.iter().any(|c| c == "CLIPVisionModelWithProjection"))
    }

    /// Patches plus the class token.
    pub fn num_positions(&self) -> usize {
        (self.image_size / self.patch_size).pow(2) + 1
    }

    /// A randomly initialised tower on `device`, with `visual_projection` to `projection` when
    /// given.
    pub fn init(&self, projection: Option<usize>, device: &Device) -> Result<ClipVisionModel> {
        self.validate()?;
        let d = self.hidden_size;
        let eps = self.layer_norm_eps;
        let p = self.patch_size;
        Ok(ClipVisionModel {
            vision_model: ClipVisionTransformer {
                embeddings: ClipVisionEmbeddings {
                    class_embedding: Param::from_tensor(Tensor::zeros([d], device)),
                    patch_embedding: Conv2dConfig::new([self.num_channels, d], [p, p])
                        .with_stride([p, p])
                        .with_bias(false)
                        .init(device),
                    position_embedding: EmbeddingConfig::new(self.num_positions(), d).init(device),
                },
                pre_layrnorm: layer_norm(d, eps, device),
                encoder: ClipEncoder::new(
                    d,
                    self.intermediate_size,
                    self.num_hidden_layers,
                    self.num_attention_heads,
                    self.hidden_act,
                    eps,
                    device,
                ),
                post_layernorm: layer_norm(d, eps, device),
            },
            visual_projection: projection.map(|n| linear(d, n, false, device)),
            image_size: self.image_size,
            num_channels: self.num_channels,
        })
    }
}

#[derive(Module, Debug)]
pub struct ClipVisionEmbeddings {
    /// [D]: the class token.
    pub class_embedding: Param<Tensor<1>>,
    /// `num_channels -> D`, kernel and stride `patch_size`, no bias.
    pub patch_embedding: Conv2d,
    /// One per patch and the class token.
    pub position_embedding: Embedding,
}

#[derive(Module, Debug)]
pub struct ClipVisionTransformer {
    pub embeddings: ClipVisionEmbeddings,
    pub pre_layrnorm: LayerNorm,
    pub encoder: ClipEncoder,
    pub post_layernorm: LayerNorm,
}

/// transformers' `CLIPVisionModel`, or `CLIPVisionModelWithProjection` with `visual_projection`
/// (names `vision_model.*`, `visual_projection.weight`).
#[derive(Module, Debug)]
pub struct ClipVisionModel {
    pub vision_model: ClipVisionTransformer,
    /// `hidden_size -> projection_dim`, no bias.
    pub visual_projection: Option<Linear>,
    pub image_size: usize,
    pub num_channels: usize,
}

/// What the image tower returns.
#[derive(Debug, Clone)]
pub struct ClipVisionOutput {
    /// [B, 1 + patches, D]: the encoder's output (no final LayerNorm).
    pub last_hidden_state: Tensor<3>,
    /// [B, D]: `post_layernorm` of the class token.
    pub pooler_output: Tensor<2>,
    /// [B, projection_dim]: `visual_projection(pooler_output)`, with a projection.
    pub image_embeds: Option<Tensor<2>>,
}

impl ClipVisionModel {
    /// pixel_values: [B, C, S, S] normalised ([`ClipImagePreprocess`]), S = `image_size`.
    pub fn forward(&self, pixel_values: Tensor<4>) -> Result<ClipVisionOutput> {
        let [b, c, h, w] = pixel_values.dims();
        if c != self.num_channels || h != self.image_size || w != self.image_size {
            return Err(Error::invalid(format!(
                "pixel_values are [{b}, {c}, {h}, {w}]; this image tower takes [B, {}, {s}, {s}] \
                 (preprocess images to image_size {s} first)",
                self.num_channels,
                s = self.image_size
            )));
        }
        let vm = &self.vision_model;
        let patches = vm.embeddings.patch_embedding.forward(pixel_values);
        let [_, d, gh, gw] = patches.dims();
        let patches = patches.reshape([b, d, gh * gw]).swap_dims(1, 2);
        let class = vm
            .embeddings
            .class_embedding
            .val()
            .reshape([1, 1, d])
            .repeat_dim(0, b);
        let positions = vm
            .embeddings
            .position_embedding
            .weight
            .val()
            .unsqueeze_dim::<3>(0);
        let mut x = vm
            .pre_layrnorm
            .forward(Tensor::cat(vec![class, patches], 1) + positions);
        for layer in &vm.encoder.layers {
            x = layer.forward(x, None);
        }
        let class_out = x.clone().slice([0..b, 0..1, 0..d]).reshape([b, d]);
        let pooler_output = vm.post_layernorm.forward(class_out);
        let image_embeds = self
            .visual_projection
            .as_ref()
            .map(|p| p.forward(pooler_output.clone()));
        Ok(ClipVisionOutput {
            last_hidden_state: x,
            pooler_output,
            image_embeds,
        })
    }
}

/// Names a `CLIPVisionModel` file's tensors as this module does: a file where no tensor has the
/// `vision_model.` prefix (transformers 5's layout) gets it on every name but
/// `visual_projection.*`. The flag says whether names were changed.
pub fn with_vision_model_prefix<T>(tensors: BTreeMap<String, T>) -> (BTreeMap<String, T>, bool) {
    crate::models::clip::with_tower_prefix(tensors, VISION_MODEL_PREFIX, "visual_projection.")
}

/// CLIP's preprocessing as tensor operations, so a reward is differentiable in the pixels:
/// images in [-1, 1] -> [0, 1] (clamped) -> resized so the shorter side is `size` (antialiased
/// bicubic, [`resize_matrix`]: `F.interpolate(mode="bicubic", antialias=True)`, what
/// transformers 5's `CLIPImageProcessor` calls through torchvision, and PIL's filter that
/// transformers 4 and open_clip use, less its 8-bit rounding) -> centre crop `size` x `size` (top
/// `(h - size) / 2`, left `(w - size) / 2`, rounded down, as `CLIPImageProcessor`) -> normalised
/// by `mean` and `std`. The resize and crop are two matrix products, so the gradient is exact.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipImagePreprocess {
    pub size: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl ClipImagePreprocess {
    /// CLIP's normalisation at `size` (the tower's `image_size`).
    pub fn new(size: usize) -> Self {
        Self {
            size,
            mean: CLIP_MEAN,
            std: CLIP_STD,
        }
    }

    /// images: [B, 3, H, W] in [-1, 1] -> pixel_values [B, 3, size, size].
    pub fn apply(&self, images: Tensor<4>) -> Result<Tensor<4>> {
        let [b, c, h, w] = images.dims();
        if c != 3 || h == 0 || w == 0 {
            return Err(Error::invalid(format!(
                "images are [{b}, {c}, {h}, {w}]; expected [B, 3, H, W] RGB"
            )));
        }
        let s = self.size;
        let device = images.device();
        let x = (images / 2.0 + 0.5).clamp(0.0, 1.0);
        let (nh, nw) = if h <= w {
            (s, (s as f64 * w as f64 / h as f64) as usize)
        } else {
            ((s as f64 * h as f64 / w as f64) as usize, s)
        };
        let (top, left) = ((nh - s) / 2, (nw - s) / 2);
        let x = if (nh, nw) == (h, w) {
            x.slice([0..b, 0..3, top..top + s, left..left + s])
        } else {
            // The crop's rows of the vertical resize, its columns of the horizontal one.
            let rows = matrix(
                &resize_matrix(h, nh)[top * h..(top + s) * h],
                [s, h],
                &device,
            );
            let cols = matrix(
                &resize_matrix(w, nw)[left * w..(left + s) * w],
                [s, w],
                &device,
            );
            let x = x.reshape([1, b * 3, h, w]);
            let x = rows.unsqueeze::<4>().matmul(x);
            x.matmul(cols.transpose().unsqueeze::<4>())
                .reshape([b, 3, s, s])
        };
        let channel = |v: [f32; 3]| {
            Tensor::<4>::from_data(TensorData::new(v.to_vec(), [1, 3, 1, 1]), &device)
        };
        Ok((x - channel(self.mean)) / channel(self.std))
    }
}

fn matrix(values: &[f32], shape: [usize; 2], device: &burn::tensor::Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

/// The [n_out, n_in] matrix (row-major) of PyTorch's antialiased bicubic resize along one axis
/// (`F.interpolate(mode="bicubic", align_corners=False, antialias=True)`, ATen's
/// `_compute_indices_weights_aa`): output `i` is centred at `scale * (i + 0.5)` with `scale =
/// n_in / n_out`; when shrinking, the cubic (a = -0.5, PIL's) is stretched by `scale`, so every
/// input pixel under the output's footprint contributes; each row's weights sum to 1.
pub fn resize_matrix(n_in: usize, n_out: usize) -> Vec<f32> {
    let cubic = |x: f64| {
        let (a, x) = (-0.5, x.abs());
        if x < 1.0 {
            ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * a
        } else {
            0.0
        }
    };
    let scale = n_in as f64 / n_out as f64;
    let (support, stretch) = if scale >= 1.0 {
        (2.0 * scale, 1.0 / scale)
    } else {
        (2.0, 1.0)
    };
    let mut m = vec![0f32; n_out * n_in];
    for i in 0..n_out {
        let centre = scale * (i as f64 + 0.5);
        // ATen truncates towards zero, then clamps to the axis.
        let lo = ((centre - support + 0.5) as i64).max(0) as usize;
        let hi = ((centre + support + 0.5) as i64).min(n_in as i64) as usize;
        let w: Vec<f64> = (lo..hi)
            .map(|j| cubic((j as f64 - centre + 0.5) * stretch))
            .collect();
        let total: f64 = w.iter().sum();
        for (k, wk) in w.iter().enumerate() {
            m[i * n_in + lo + k] = (wk / total) as f32;
        }
    }
    m
}
