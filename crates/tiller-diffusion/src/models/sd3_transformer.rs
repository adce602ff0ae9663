//! `SD3Transformer2DModel` as diffusers defines it: the MMDiT of Stable Diffusion 3 (Esser et
//! al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis") and 3.5.
//!
//! The latent is cut into `patch_size` x `patch_size` patches (a strided convolution) and given a
//! 2-D sin-cos position embedding cropped from the centre of a `pos_embed_max_size` square
//! table. Text tokens (`encoder_hidden_states`, projected by `context_embedder`) and image
//! tokens keep separate weights but attend jointly: each block concatenates both streams'
//! queries, keys and values into one attention. Every block is modulated by adaLN-zero from one
//! conditioning vector, the timestep's sinusoidal embedding plus the pooled text projection
//! (`CombinedTimestepTextProjEmbeddings`). The last block only reads the text stream
//! (`context_pre_only`). SD3.5 adds RMS-normed queries and keys (`qk_norm = "rms_norm"`) and,
//! in `dual_attention_layers`, a second image-only attention in the same block
//! (`SD35AdaLayerNormZeroX`'s nine modulation vectors).
//!
//! Parameter paths and `config.json` fields are diffusers' (`transformers/transformer_sd3.py`,
//! `attention.py`'s `JointTransformerBlock`, `attention_processor.py`'s `JointAttnProcessor2_0`),
//! so checkpoints load as they are. The prediction is the flow-matching velocity at the
//! scheduler's timestep `t = 1000 sigma`.

use crate::models::layers::{linear, multi_head_attention};
use crate::models::unet::{TimestepEmbedding, timestep_embedding};
use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, PaddingConfig2d};
use burn::tensor::activation::{gelu_approximate, silu};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use tiller_core::{Error, Result};

/// diffusers' `SD3Transformer2DModel` config.json; field names and defaults are diffusers'
/// (SD3-medium's values).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SD3Transformer2DConfig {
    #[serde(rename = "_class_name", default = "class_name")]
    pub class_name: String,
    #[serde(
        rename = "_diffusers_version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub diffusers_version: Option<String>,
    #[serde(rename = "_name_or_path", default, skip_serializing)]
    pub name_or_path: Option<String>,
    /// Height and width of the latent the model was trained on.
    #[serde(default = "d_128")]
    pub sample_size: usize,
    #[serde(default = "d_2")]
    pub patch_size: usize,
    #[serde(default = "d_16")]
    pub in_channels: usize,
    #[serde(default = "d_18")]
    pub num_layers: usize,
    #[serde(default = "d_64")]
    pub attention_head_dim: usize,
    #[serde(default = "d_18")]
    pub num_attention_heads: usize,
    /// Width of the text encoders' concatenated hidden states (CLIP-L + CLIP-G padded, and T5).
    #[serde(default = "d_4096")]
    pub joint_attention_dim: usize,
    /// Width of the projected text tokens; must equal heads x head dim.
    #[serde(default = "d_1152")]
    pub caption_projection_dim: usize,
    /// Width of the pooled text embedding (CLIP-L's and CLIP-G's projections concatenated).
    #[serde(default = "d_2048")]
    pub pooled_projection_dim: usize,
    #[serde(default = "d_16")]
    pub out_channels: usize,
    /// Side of the square position-embedding table, in patches. diffusers' SD3 always has one.
    #[serde(default = "d_96")]
    pub pos_embed_max_size: Option<usize>,
    /// Blocks with SD3.5's second, image-only attention.
    #[serde(default)]
    pub dual_attention_layers: Vec<usize>,
    /// `null` (SD3) or `"rms_norm"` (SD3.5) on each head's queries and keys.
    #[serde(default)]
    pub qk_norm: Option<String>,
}

fn class_name() -> String {
    "SD3Transformer2DModel".to_string()
}
fn d_2() -> usize {
    2
}
fn d_16() -> usize {
    16
}
fn d_18() -> usize {
    18
}
fn d_64() -> usize {
    64
}
fn d_96() -> Option<usize> {
    Some(96)
}
fn d_128() -> usize {
    128
}
fn d_1152() -> usize {
    1152
}
fn d_2048() -> usize {
    2048
}
fn d_4096() -> usize {
    4096
}

/// Width of the sinusoidal timestep projection (`Timesteps(num_channels=256)`).
const TIME_PROJ_DIM: usize = 256;
/// The epsilon of every norm in the model (layer norms, RMS qk-norms).
const EPS: f64 = 1e-6;

impl SD3Transformer2DConfig {
    /// Width of the token streams.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Rejects configurations Tiller does not implement or that cannot work, naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.class_name != "SD3Transformer2DModel" {
            return Err(Error::config(
                "_class_name",
                format!("is `{}`, expected `SD3Transformer2DModel`", self.class_name),
            ));
        }
        let positive = [
            ("sample_size", self.sample_size),
            ("patch_size", self.patch_size),
            ("in_channels", self.in_channels),
            ("num_layers", self.num_layers),
            ("attention_head_dim", self.attention_head_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("joint_attention_dim", self.joint_attention_dim),
            ("pooled_projection_dim", self.pooled_projection_dim),
            ("out_channels", self.out_channels),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(Error::config(field, "must be positive"));
            }
        }
        if self.caption_projection_dim != self.inner_dim() {
            return Err(Error::config(
                "caption_projection_dim",
                format!(
                    "is {} but the blocks are num_attention_heads x attention_head_dim = {} wide",
                    self.caption_projection_dim,
                    self.inner_dim()
                ),
            ));
        }
        if !self.inner_dim().is_multiple_of(4) {
            return Err(Error::config(
                "attention_head_dim",
                format!(
                    "gives blocks {} wide; the 2-D sin-cos position embedding needs a multiple of 4",
                    self.inner_dim()
                ),
            ));
        }
        match self.pos_embed_max_size {
            None => {
                return Err(Error::config(
                    "pos_embed_max_size",
                    "is null; SD3 checkpoints have a position table and Tiller needs one",
                ));
            }
            Some(0) => return Err(Error::config("pos_embed_max_size", "must be positive")),
            Some(_) => {}
        }
        if let Some(&i) = self
            .dual_attention_layers
            .iter()
            .find(|&&i| i >= self.num_layers)
        {
            return Err(Error::config(
                "dual_attention_layers",
                format!("names block {i} but there are {} blocks", self.num_layers),
            ));
        }
        match self.qk_norm.as_deref() {
            None | Some("rms_norm") => Ok(()),
            Some(other) => Err(Error::config(
                "qk_norm",
                format!(
                    "`{other}` is not implemented; Tiller has null (SD3) and `rms_norm` (SD3.5)"
                ),
            )),
        }
    }

    /// A model with burn's default initialisation (the position table computed as diffusers
    /// computes it).
    pub fn init(&self, device: &Device) -> Result<SD3Transformer2DModel> {
        self.validate()?;
        let d = self.inner_dim();
        let p = self.patch_size;
        let max = self.pos_embed_max_size.expect("validated");
        let table = sincos_pos_embed_2d(d, max, self.sample_size / p);
        let blocks = (0..self.num_layers)
            .map(|i| {
                let context_pre_only = i == self.num_layers - 1;
                let dual = self.dual_attention_layers.contains(&i);
                let qk = self.qk_norm.is_some();
                JointTransformerBlock {
                    norm1: AdaNorm::new(d, if dual { 9 } else { 6 }, device),
                    norm1_context: AdaNorm::new(d, if context_pre_only { 2 } else { 6 }, device),
                    attn: JointAttention::new(
                        d,
                        self.num_attention_heads,
                        true,
                        context_pre_only,
                        qk,
                        device,
                    ),
                    attn2: dual.then(|| {
                        JointAttention::new(d, self.num_attention_heads, false, true, qk, device)
                    }),
                    ff: GeluFeedForward::new(d, device),
                    ff_context: (!context_pre_only).then(|| GeluFeedForward::new(d, device)),
                    context_pre_only,
                }
            })
            .collect();
        Ok(SD3Transformer2DModel {
            pos_embed: PatchEmbed {
                proj: Conv2dConfig::new([self.in_channels, d], [p, p])
                    .with_stride([p, p])
                    .with_padding(PaddingConfig2d::Valid)
                    .init(device),
                pos_embed: Param::from_tensor(Tensor::from_data(
                    TensorData::new(table, [1, max * max, d]),
                    device,
                )),
                patch_size: p,
                max_size: max,
            },
            time_text_embed: CombinedTimestepTextProjEmbeddings {
                timestep_embedder: TimestepEmbedding {
                    linear_1: linear(TIME_PROJ_DIM, d, true, device),
                    linear_2: linear(d, d, true, device),
                },
                text_embedder: TextProjection {
                    linear_1: linear(self.pooled_projection_dim, d, true, device),
                    linear_2: linear(d, d, true, device),
                },
            },
            context_embedder: linear(self.joint_attention_dim, d, true, device),
            transformer_blocks: blocks,
            norm_out: AdaNorm::new(d, 2, device),
            proj_out: linear(d, p * p * self.out_channels, true, device),
            out_channels: self.out_channels,
        })
    }
}

/// diffusers' `get_2d_sincos_pos_embed(dim, grid, base_size)` as a `[grid * grid, dim]` row-major
/// table: for the patch in row `i`, column `j` (both scaled by `base_size / grid`), the first half
/// is the 1-D embedding of the column, the second of the row; each 1-D embedding is
/// `[sin(pos w_k), cos(pos w_k)]` with `w_k = 10000^(-k / (dim / 4))`.
pub fn sincos_pos_embed_2d(dim: usize, grid: usize, base_size: usize) -> Vec<f32> {
    let quarter = dim / 4;
    let scale = base_size as f64 / grid as f64;
    let omega: Vec<f64> = (0..quarter)
        .map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64))
        .collect();
    let mut out = Vec::with_capacity(grid * grid * dim);
    for i in 0..grid {
        for j in 0..grid {
            // As diffusers: positions are computed in f32, the embedding in f64.
            for pos in [
                (j as f32 * scale as f32) as f64,
                (i as f32 * scale as f32) as f64,
            ] {
                out.extend(omega.iter().map(|w| (pos * w).sin() as f32));
                out.extend(omega.iter().map(|w| (pos * w).cos() as f32));
            }
        }
    }
    out
}

/// `pos_embed`: the patchifying convolution and the position table (a buffer in diffusers,
/// saved with the weights; here a parameter that no gradient reaches).
#[derive(Module, Debug)]
pub struct PatchEmbed {
    pub proj: Conv2d,
    /// [1, max * max, dim]
    pub pos_embed: Param<Tensor<3>>,
    pub patch_size: usize,
    pub max_size: usize,
}

impl PatchEmbed {
    /// x: [B, C, H, W] -> tokens [B, (H/p)(W/p), dim], with the centre crop of the table added.
    fn forward(&self, x: Tensor<4>) -> Result<Tensor<3>> {
        let [_, _, h, w] = x.dims();
        let (gh, gw) = (h / self.patch_size, w / self.patch_size);
        if gh > self.max_size || gw > self.max_size {
            return Err(Error::invalid(format!(
                "the latent is {h}x{w}, {gh}x{gw} patches; the model's position table \
                 (pos_embed_max_size) has {} per side",
                self.max_size
            )));
        }
        let tokens = self.proj.forward(x);
        let [b, d, ..] = tokens.dims();
        let tokens = tokens.reshape([b, d, gh * gw]).swap_dims(1, 2);
        let (top, left) = ((self.max_size - gh) / 2, (self.max_size - gw) / 2);
        let table = self
            .pos_embed
            .val()
            .detach()
            .reshape([self.max_size, self.max_size, d])
            .slice([top..top + gh, left..left + gw])
            .reshape([1, gh * gw, d]);
        Ok(tokens + table)
    }
}

/// `text_embedder` (`PixArtAlphaTextProjection` with SiLU): Linear, SiLU, Linear.
#[derive(Module, Debug)]
pub struct TextProjection {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

/// `time_text_embed`: the timestep's embedding plus the pooled text's projection.
#[derive(Module, Debug)]
pub struct CombinedTimestepTextProjEmbeddings {
    pub timestep_embedder: TimestepEmbedding,
    pub text_embedder: TextProjection,
}

impl CombinedTimestepTextProjEmbeddings {
    /// timesteps: [B], pooled: [B, P] -> [B, dim]
    fn forward(&self, timesteps: Tensor<1>, pooled: Tensor<2>) -> Tensor<2> {
        let t = timestep_embedding(timesteps, TIME_PROJ_DIM, true, 0.0);
        let t = self.timestep_embedder.linear_1.forward(t);
        let t = self.timestep_embedder.linear_2.forward(silu(t));
        let p = self.text_embedder.linear_1.forward(pooled);
        let p = self.text_embedder.linear_2.forward(silu(p));
        t + p
    }
}

/// The adaptive norms (`AdaLayerNormZero`, `SD35AdaLayerNormZeroX`, `AdaLayerNormContinuous`):
/// `linear(silu(temb))` split into `chunks` modulation vectors, applied to a LayerNorm without
/// affine parameters. Which norm it is follows from the width of `linear` (6, 9 or 2 x dim).
#[derive(Module, Debug)]
pub struct AdaNorm {
    pub linear: Linear,
}

impl AdaNorm {
    fn new(dim: usize, chunks: usize, device: &Device) -> Self {
        Self {
            linear: linear(dim, chunks * dim, true, device),
        }
    }

    /// The modulation vectors, each [B, 1, dim] (broadcast over tokens).
    fn chunks(&self, temb: Tensor<2>) -> Vec<Tensor<3>> {
        let emb = self.linear.forward(silu(temb));
        // burn's Linear weight is [in, out]: `in` is the model width.
        let d = self.linear.weight.dims()[0];
        emb.split(d, 1)
            .into_iter()
            .map(|c| c.unsqueeze_dim(1))
            .collect()
    }

    /// `AdaLayerNormContinuous`: `norm(x) (1 + scale) + shift`, the scale first in `linear`.
    fn continuous(&self, x: Tensor<3>, temb: Tensor<2>) -> Tensor<3> {
        let mut c = self.chunks(temb).into_iter();
        let (scale, shift) = (c.next().expect("2 chunks"), c.next().expect("2 chunks"));
        modulate(layer_norm(x), shift, scale)
    }
}

/// `x (1 + scale) + shift`
fn modulate(x: Tensor<3>, shift: Tensor<3>, scale: Tensor<3>) -> Tensor<3> {
    x * (scale + 1.0) + shift
}

/// LayerNorm over the last axis without affine parameters (`elementwise_affine=False`, eps 1e-6).
fn layer_norm(x: Tensor<3>) -> Tensor<3> {
    let mean = x.clone().mean_dim(2);
    let centred = x - mean;
    let var = centred.clone().powf_scalar(2.0).mean_dim(2);
    centred / (var + EPS).sqrt()
}

/// diffusers' `RMSNorm(dim_head, eps=1e-6)` with its weight: `x / sqrt(mean(x^2) + eps) * weight`.
#[derive(Module, Debug)]
pub struct RmsNorm {
    pub weight: Param<Tensor<1>>,
}

impl RmsNorm {
    fn new(dim: usize, device: &Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([dim], device)),
        }
    }

    /// x: [B, N, H, d], normalised over d.
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let rms = (x.clone().powf_scalar(2.0).mean_dim(3) + EPS).sqrt();
        x / rms * self.weight.val().unsqueeze_dims::<4>(&[0, 1, 2])
    }
}

/// `Attention` with `JointAttnProcessor2_0`: the image stream's `to_q/k/v`, and for a joint
/// attention the text stream's `add_q/k/v_proj`; both streams attend over their concatenation.
/// `to_add_out` projects the text stream's output except in a `context_pre_only` block. An
/// image-only attention (SD3.5's `attn2`) has no `add_*` projections.
#[derive(Module, Debug)]
pub struct JointAttention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    /// diffusers stores `[Linear, Dropout]`; only index 0 has parameters.
    pub to_out: Vec<Linear>,
    pub add_q_proj: Option<Linear>,
    pub add_k_proj: Option<Linear>,
    pub add_v_proj: Option<Linear>,
    pub to_add_out: Option<Linear>,
    pub norm_q: Option<RmsNorm>,
    pub norm_k: Option<RmsNorm>,
    pub norm_added_q: Option<RmsNorm>,
    pub norm_added_k: Option<RmsNorm>,
    pub heads: usize,
}

impl JointAttention {
    fn new(
        dim: usize,
        heads: usize,
        joint: bool,
        context_pre_only: bool,
        qk_norm: bool,
        device: &Device,
    ) -> Self {
        let lin = || linear(dim, dim, true, device);
        let head = dim / heads;
        let norm = |on: bool| on.then(|| RmsNorm::new(head, device));
        Self {
            to_q: lin(),
            to_k: lin(),
            to_v: lin(),
            to_out: vec![lin()],
            add_q_proj: joint.then(lin),
            add_k_proj: joint.then(lin),
            add_v_proj: joint.then(lin),
            to_add_out: (joint && !context_pre_only).then(lin),
            norm_q: norm(qk_norm),
            norm_k: norm(qk_norm),
            norm_added_q: norm(qk_norm && joint),
            norm_added_k: norm(qk_norm && joint),
            heads,
        }
    }

    /// Projects and (with qk-norm) normalises per head. x: [B, N, dim] -> [B, N, dim]
    fn project(&self, proj: &Linear, norm: &Option<RmsNorm>, x: Tensor<3>) -> Tensor<3> {
        let y = proj.forward(x);
        match norm {
            None => y,
            Some(norm) => {
                let [b, n, d] = y.dims();
                norm.forward(y.reshape([b, n, self.heads, d / self.heads]))
                    .reshape([b, n, d])
            }
        }
    }

    /// x: [B, N, dim] image tokens, context: [B, M, dim] text tokens (joint attention only) ->
    /// (image output [B, N, dim], text output [B, M, dim] when there is a text stream).
    fn forward(&self, x: Tensor<3>, context: Option<Tensor<3>>) -> (Tensor<3>, Option<Tensor<3>>) {
        let n = x.dims()[1];
        let mut q = self.project(&self.to_q, &self.norm_q, x.clone());
        let mut k = self.project(&self.to_k, &self.norm_k, x.clone());
        let mut v = self.project(&self.to_v, &None, x);
        let m = match (
            &context,
            &self.add_q_proj,
            &self.add_k_proj,
            &self.add_v_proj,
        ) {
            (Some(c), Some(aq), Some(ak), Some(av)) => {
                let cq = self.project(aq, &self.norm_added_q, c.clone());
                let ck = self.project(ak, &self.norm_added_k, c.clone());
                let cv = self.project(av, &None, c.clone());
                q = Tensor::cat(vec![q, cq], 1);
                k = Tensor::cat(vec![k, ck], 1);
                v = Tensor::cat(vec![v, cv], 1);
                c.dims()[1]
            }
            _ => 0,
        };
        let out = multi_head_attention(q, k, v, self.heads, None);
        if m == 0 {
            return (self.to_out[0].forward(out), None);
        }
        let [b, _, d] = out.dims();
        let image = out.clone().slice([0..b, 0..n, 0..d]);
        let text = out.slice([0..b, n..n + m, 0..d]);
        let text = match &self.to_add_out {
            Some(p) => p.forward(text),
            None => text,
        };
        (self.to_out[0].forward(image), Some(text))
    }
}

/// `FeedForward(activation_fn="gelu-approximate")`: `net.0` = GELU (tanh) with its `proj`,
/// `net.1` = dropout, `net.2` = Linear; 4x wide.
#[derive(Module, Debug)]
pub struct GeluFeedForward {
    pub net_0: GeluProj,
    pub net_2: Linear,
}

/// diffusers' `GELU` module: a projection then the activation.
#[derive(Module, Debug)]
pub struct GeluProj {
    pub proj: Linear,
}

impl GeluFeedForward {
    fn new(dim: usize, device: &Device) -> Self {
        Self {
            net_0: GeluProj {
                proj: linear(dim, 4 * dim, true, device),
            },
            net_2: linear(4 * dim, dim, true, device),
        }
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.net_2
            .forward(gelu_approximate(self.net_0.proj.forward(x)))
    }
}

/// `JointTransformerBlock`.
#[derive(Module, Debug)]
pub struct JointTransformerBlock {
    pub norm1: AdaNorm,
    pub norm1_context: AdaNorm,
    pub attn: JointAttention,
    pub attn2: Option<JointAttention>,
    pub ff: GeluFeedForward,
    pub ff_context: Option<GeluFeedForward>,
    pub context_pre_only: bool,
}

impl JointTransformerBlock {
    /// x: [B, N, dim], context: [B, M, dim], temb: [B, dim] -> (x, context; None after the
    /// last block, whose text stream is not used further).
    fn forward(
        &self,
        x: Tensor<3>,
        context: Tensor<3>,
        temb: Tensor<2>,
    ) -> (Tensor<3>, Option<Tensor<3>>) {
        // shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp[, shift_msa2,
        // scale_msa2, gate_msa2]
        let m = self.norm1.chunks(temb.clone());
        let normed = layer_norm(x.clone());
        let norm_x = modulate(normed.clone(), m[0].clone(), m[1].clone());
        let (norm_c, cm) = if self.context_pre_only {
            (self.norm1_context.continuous(context.clone(), temb), None)
        } else {
            let cm = self.norm1_context.chunks(temb);
            let n = modulate(layer_norm(context.clone()), cm[0].clone(), cm[1].clone());
            (n, Some(cm))
        };
        let (attn, attn_c) = self.attn.forward(norm_x, Some(norm_c));
        let mut x = x + m[2].clone() * attn;
        if let Some(attn2) = &self.attn2 {
            let norm_x2 = modulate(normed, m[6].clone(), m[7].clone());
            let (out2, _) = attn2.forward(norm_x2, None);
            x = x + m[8].clone() * out2;
        }
        let ff_in = modulate(layer_norm(x.clone()), m[3].clone(), m[4].clone());
        let x = x + m[5].clone() * self.ff.forward(ff_in);
        let context = match (cm, &self.ff_context, attn_c) {
            (Some(cm), Some(ff_c), Some(attn_c)) => {
                let c = context + cm[2].clone() * attn_c;
                let ff_in = modulate(layer_norm(c.clone()), cm[3].clone(), cm[4].clone());
                Some(c.clone() + cm[5].clone() * ff_c.forward(ff_in))
            }
            _ => None,
        };
        (x, context)
    }
}

/// diffusers' `SD3Transformer2DModel`.
#[derive(Module, Debug)]
pub struct SD3Transformer2DModel {
    pub pos_embed: PatchEmbed,
    pub time_text_embed: CombinedTimestepTextProjEmbeddings,
    pub context_embedder: Linear,
    pub transformer_blocks: Vec<JointTransformerBlock>,
    pub norm_out: AdaNorm,
    pub proj_out: Linear,
    pub out_channels: usize,
}

impl SD3Transformer2DModel {
    /// The velocity prediction.
    /// x_t: [B, C, H, W] (H and W multiples of the patch size), timesteps: [B] (1000 sigma),
    /// encoder_hidden_states: [B, M, joint_attention_dim], pooled_projections: [B, pooled dim]
    /// -> [B, out_channels, H, W]
    pub fn forward(
        &self,
        x_t: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
        pooled_projections: Tensor<2>,
    ) -> Result<Tensor<4>> {
        let [b, _, h, w] = x_t.dims();
        let p = self.pos_embed.patch_size;
        if !h.is_multiple_of(p) || !w.is_multiple_of(p) {
            return Err(Error::invalid(format!(
                "the latent is {h}x{w}; both sides must be multiples of patch_size {p}"
            )));
        }
        let mut x = self.pos_embed.forward(x_t)?;
        let temb = self.time_text_embed.forward(timesteps, pooled_projections);
        let mut context = Some(self.context_embedder.forward(encoder_hidden_states));
        for block in &self.transformer_blocks {
            let c = context
                .take()
                .expect("only the last block drops the text stream");
            let (nx, nc) = block.forward(x, c, temb.clone());
            x = nx;
            context = nc;
        }
        let x = self.norm_out.continuous(x, temb);
        let x = self.proj_out.forward(x);
        // Unpatchify: [B, (h w), (p q c)] -> [B, c, h p, w q]
        let (gh, gw, c) = (h / p, w / p, self.out_channels);
        Ok(x.reshape([b, gh, gw, p, p, c])
            .permute([0, 5, 1, 3, 2, 4])
            .reshape([b, c, h, w]))
    }
}
