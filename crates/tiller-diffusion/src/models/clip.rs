//! transformers' `CLIPTextModel` (Radford et al. 2021, "Learning Transferable Visual Models From
//! Natural Language Supervision"): token and position embeddings, a pre-LayerNorm causal
//! transformer, a final LayerNorm, and the pooled output at the end-of-text token. Parameter paths
//! (`text_model.encoder.layers.0.self_attn.q_proj.weight`, ...) and config.json fields are
//! transformers', so Stable Diffusion's `text_encoder/` folders load as they are. transformers 5
//! saves `CLIPTextModel` without the `text_model.` prefix (its `conversion_mapping.py` declares
//! `PrefixChange(prefix_to_remove="text_model")` for the class); such files load too
//! ([`with_text_model_prefix`]), and Tiller writes the prefixed names both versions read.

use crate::models::layers::{layer_norm, linear, multi_head_attention, quick_gelu};
use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, Linear};
use burn::tensor::activation::gelu;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use tiller_core::{Error, Result};

/// The MLP activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenAct {
    /// x * sigmoid(1.702 x): OpenAI CLIP (SD 1.x).
    QuickGelu,
    /// exact erf GELU: OpenCLIP (SD 2.x).
    Gelu,
}

/// transformers' `CLIPTextConfig` as written in config.json. Generic `PretrainedConfig` keys that
/// do not affect the forward pass are accepted and kept; unknown keys are an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipTextConfig {
    #[serde(default = "vocab_default")]
    pub vocab_size: usize,
    #[serde(default = "hidden_default")]
    pub hidden_size: usize,
    #[serde(default = "inter_default")]
    pub intermediate_size: usize,
    #[serde(default = "proj_default")]
    pub projection_dim: usize,
    #[serde(default = "twelve")]
    pub num_hidden_layers: usize,
    #[serde(default = "eight")]
    pub num_attention_heads: usize,
    #[serde(default = "seventy_seven")]
    pub max_position_embeddings: usize,
    #[serde(default = "act_default")]
    pub hidden_act: HiddenAct,
    #[serde(default = "eps_default")]
    pub layer_norm_eps: f64,
    /// Token id whose first occurrence gives the pooled output. With the legacy value 2, pooling is
    /// at the largest token id instead (transformers' behaviour for old configs).
    #[serde(default = "eos_default")]
    pub eos_token_id: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<i64>,
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

fn vocab_default() -> usize {
    49408
}
fn hidden_default() -> usize {
    512
}
fn inter_default() -> usize {
    2048
}
pub(crate) fn proj_default() -> usize {
    512
}
pub(crate) fn twelve() -> usize {
    12
}
fn eight() -> usize {
    8
}
fn seventy_seven() -> usize {
    77
}
pub(crate) fn act_default() -> HiddenAct {
    HiddenAct::QuickGelu
}
pub(crate) fn eps_default() -> f64 {
    1e-5
}
fn eos_default() -> i64 {
    49407
}

impl ClipTextConfig {
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
        for (f, v) in [
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("num_hidden_layers", self.num_hidden_layers),
        ] {
            if v == 0 {
                return Err(Error::config(f, "must be positive"));
            }
        }
        Ok(())
    }

    /// Whether `architectures` names `CLIPTextModelWithProjection` (SDXL's `text_encoder_2`),
    /// which adds `text_projection` to `projection_dim` on the pooled output.
    pub fn with_projection(&self) -> bool {
        self.architectures
            .as_ref()
            .is_some_and(|a| a.iter().any(|c| c == "CLIPTextModelWithProjection"))
    }

    /// A randomly initialised model on `device`.
    pub fn init(&self, device: &Device) -> Result<ClipTextModel> {
        self.validate()?;
        let d = self.hidden_size;
        let eps = self.layer_norm_eps;
        Ok(ClipTextModel {
            text_model: ClipTextTransformer {
                embeddings: ClipEmbeddings {
                    token_embedding: EmbeddingConfig::new(self.vocab_size, d).init(device),
                    position_embedding: EmbeddingConfig::new(self.max_position_embeddings, d)
                        .init(device),
                },
                encoder: ClipEncoder::new(
                    d,
                    self.intermediate_size,
                    self.num_hidden_layers,
                    self.num_attention_heads,
                    self.hidden_act,
                    eps,
                    device,
                ),
                final_layer_norm: layer_norm(d, eps, device),
            },
            text_projection: self
                .with_projection()
                .then(|| linear(d, self.projection_dim, false, device)),
            eos_token_id: self.eos_token_id,
            max_positions: self.max_position_embeddings,
            vocab_size: self.vocab_size,
        })
    }
}

#[derive(Module, Debug)]
pub struct ClipAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub heads: usize,
}

#[derive(Module, Debug)]
pub struct ClipMlp {
    pub fc1: Linear,
    pub fc2: Linear,
    pub quick_gelu: bool,
}

#[derive(Module, Debug)]
pub struct ClipEncoderLayer {
    pub self_attn: ClipAttention,
    pub layer_norm1: LayerNorm,
    pub mlp: ClipMlp,
    pub layer_norm2: LayerNorm,
}

#[derive(Module, Debug)]
pub struct ClipEncoder {
    pub layers: Vec<ClipEncoderLayer>,
}

impl ClipEncoder {
    /// `n` pre-LayerNorm transformer layers of width `d` (the text and image towers' encoder).
    pub(crate) fn new(
        d: usize,
        intermediate: usize,
        n: usize,
        heads: usize,
        act: HiddenAct,
        eps: f64,
        device: &Device,
    ) -> Self {
        let layers = (0..n)
            .map(|_| ClipEncoderLayer {
                self_attn: ClipAttention {
                    q_proj: linear(d, d, true, device),
                    k_proj: linear(d, d, true, device),
                    v_proj: linear(d, d, true, device),
                    out_proj: linear(d, d, true, device),
                    heads,
                },
                layer_norm1: layer_norm(d, eps, device),
                mlp: ClipMlp {
                    fc1: linear(d, intermediate, true, device),
                    fc2: linear(intermediate, d, true, device),
                    quick_gelu: act == HiddenAct::QuickGelu,
                },
                layer_norm2: layer_norm(d, eps, device),
            })
            .collect();
        Self { layers }
    }
}

#[derive(Module, Debug)]
pub struct ClipEmbeddings {
    pub token_embedding: Embedding,
    pub position_embedding: Embedding,
}

#[derive(Module, Debug)]
pub struct ClipTextTransformer {
    pub embeddings: ClipEmbeddings,
    pub encoder: ClipEncoder,
    pub final_layer_norm: LayerNorm,
}

/// The prefix transformers 4 gives every `CLIPTextModel` tensor (`text_model.final_layer_norm.weight`).
pub const TEXT_MODEL_PREFIX: &str = "text_model.";

/// Names a `CLIPTextModel` file's tensors as this module does: a file where no tensor has the
/// `text_model.` prefix (transformers 5's layout) gets it on every name but `text_projection.*`;
/// any other file is returned as it is, so a file mixing the layouts fails loading with each
/// stray tensor named.
/// The flag says whether names were changed, for error messages.
pub fn with_text_model_prefix<T>(
    tensors: std::collections::BTreeMap<String, T>,
) -> (std::collections::BTreeMap<String, T>, bool) {
    with_tower_prefix(tensors, TEXT_MODEL_PREFIX, "text_projection.")
}

/// A file where no tensor has `prefix` gets it on every name but those starting with `except`
/// (the tower's projection, outside the tower); any other file is returned as it is. The flag
/// says whether names were changed.
pub(crate) fn with_tower_prefix<T>(
    tensors: std::collections::BTreeMap<String, T>,
    prefix: &str,
    except: &str,
) -> (std::collections::BTreeMap<String, T>, bool) {
    if tensors.is_empty() || tensors.keys().any(|k| k.starts_with(prefix)) {
        return (tensors, false);
    }
    let renamed = tensors
        .into_iter()
        .map(|(k, v)| match k.starts_with(except) {
            true => (k, v),
            false => (format!("{prefix}{k}"), v),
        })
        .collect();
    (renamed, true)
}

/// transformers' `CLIPTextModel`, or `CLIPTextModelWithProjection` when `text_projection` is
/// present (same names: `text_model.*`, `text_projection.weight`).
#[derive(Module, Debug)]
pub struct ClipTextModel {
    pub text_model: ClipTextTransformer,
    /// `hidden_size -> projection_dim`, no bias.
    pub text_projection: Option<Linear>,
    pub eos_token_id: i64,
    pub max_positions: usize,
    pub vocab_size: usize,
}

/// What the text encoder returns.
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// [B, L, D]: after the final LayerNorm (what SD 1.x conditions on).
    pub last_hidden_state: Tensor<3>,
    /// [B, D]: last_hidden_state at each sequence's end-of-text token.
    pub pooler_output: Tensor<2>,
    /// The embeddings and each layer's output, before the final LayerNorm: `num_hidden_layers + 1`
    /// tensors [B, L, D]; `hidden_states[len - 2]` is the "penultimate layer" of clip-skip.
    pub hidden_states: Vec<Tensor<3>>,
    /// [B, projection_dim]: `text_projection(pooler_output)`, for `CLIPTextModelWithProjection`
    /// (the pooled embedding SDXL adds to the UNet's time embedding).
    pub text_embeds: Option<Tensor<2>>,
}

impl ClipEncoderLayer {
    /// x: [B, L, D]; `mask` [L, L] is added to the attention scores (the text tower's causal mask;
    /// the image tower has none).
    pub(crate) fn forward(&self, x: Tensor<3>, mask: Option<Tensor<2>>) -> Tensor<3> {
        let h = self.layer_norm1.forward(x.clone());
        let a = &self.self_attn;
        let attn = multi_head_attention(
            a.q_proj.forward(h.clone()),
            a.k_proj.forward(h.clone()),
            a.v_proj.forward(h),
            a.heads,
            mask,
        );
        let x = x + a.out_proj.forward(attn);
        let h = self.mlp.fc1.forward(self.layer_norm2.forward(x.clone()));
        let h = if self.mlp.quick_gelu {
            quick_gelu(h)
        } else {
            gelu(h)
        };
        x + self.mlp.fc2.forward(h)
    }
}

impl ClipTextModel {
    /// Encodes token ids.
    ///
    /// input_ids: `[B, L]` row-major, `L <= max_position_embeddings`, every id `< vocab_size`.
    pub fn forward_ids(&self, input_ids: &[Vec<i64>], device: &Device) -> Result<ClipTextOutput> {
        let b = input_ids.len();
        let l = input_ids.first().map(Vec::len).unwrap_or(0);
        if b == 0 || l == 0 {
            return Err(Error::invalid("input_ids is empty"));
        }
        if l > self.max_positions {
            return Err(Error::invalid(format!(
                "input_ids has length {l}, longer than max_position_embeddings {}",
                self.max_positions
            )));
        }
        for (i, row) in input_ids.iter().enumerate() {
            if row.len() != l {
                return Err(Error::invalid(format!(
                    "input_ids row {i} has length {}, row 0 has {l}",
                    row.len()
                )));
            }
            if let Some(bad) = row
                .iter()
                .find(|&&id| id < 0 || id as usize >= self.vocab_size)
            {
                return Err(Error::invalid(format!(
                    "input_ids row {i} has token id {bad}, outside the vocabulary of {}",
                    self.vocab_size
                )));
            }
        }
        let pool = self.pool_positions(input_ids);
        let flat: Vec<i64> = input_ids.iter().flatten().copied().collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(flat, [b, l]), device);
        Ok(self.forward(ids, &pool))
    }

    /// Each row's pooling position: its first end-of-text token, or with the legacy eos id 2 the
    /// largest id (transformers' rule for configs saved before the eos id was used); the last
    /// position when a row has none.
    pub fn pool_positions(&self, input_ids: &[Vec<i64>]) -> Vec<usize> {
        input_ids
            .iter()
            .map(|row| {
                if self.eos_token_id == 2 {
                    row.iter()
                        .enumerate()
                        .max_by_key(|(i, id)| (**id, std::cmp::Reverse(*i)))
                        .map(|(i, _)| i)
                        .unwrap_or(0)
                } else {
                    row.iter()
                        .position(|&id| id == self.eos_token_id)
                        .unwrap_or(row.len().saturating_sub(1))
                }
            })
            .collect()
    }

    /// input_ids: [B, L]; pool_positions: the index pooled for each row -> outputs.
    pub fn forward(&self, input_ids: Tensor<2, Int>, pool_positions: &[usize]) -> ClipTextOutput {
        let [b, l] = input_ids.dims();
        let device = input_ids.device();
        let tm = &self.text_model;
        let positions = Tensor::<1, Int>::arange(0..l as i64, &device)
            .unsqueeze_dim::<2>(0)
            .repeat_dim(0, b);
        let mut x = tm.embeddings.token_embedding.forward(input_ids)
            + tm.embeddings.position_embedding.forward(positions);
        let mask = causal_mask(l, &device);
        let mut hidden_states = vec![x.clone()];
        for layer in &tm.encoder.layers {
            x = layer.forward(x, Some(mask.clone()));
            hidden_states.push(x.clone());
        }
        let last = tm.final_layer_norm.forward(x);
        let d = last.dims()[2];
        let pooled: Vec<Tensor<2>> = pool_positions
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                last.clone()
                    .slice([i..i + 1, p..p + 1, 0..d])
                    .reshape([1, d])
            })
            .collect();
        let pooler_output = Tensor::cat(pooled, 0);
        let text_embeds = self
            .text_projection
            .as_ref()
            .map(|p| p.forward(pooler_output.clone()));
        ClipTextOutput {
            last_hidden_state: last,
            pooler_output,
            hidden_states,
            text_embeds,
        }
    }
}

/// Additive causal mask [L, L]: 0 on and below the diagonal, a large negative value above it.
/// (A finite value rather than -inf keeps softmax's backward free of NaN.)
fn causal_mask(l: usize, device: &Device) -> Tensor<2> {
    let data: Vec<f32> = (0..l)
        .flat_map(|i| (0..l).map(move |j| if j > i { -1e9 } else { 0.0 }))
        .collect();
    Tensor::from_data(TensorData::new(data, [l, l]), device)
}
