//! `UNet2DConditionModel` as diffusers defines it (Rombach et al. 2022, "High-Resolution Image
//! Synthesis with Latent Diffusion Models"), restricted to the block types of Stable Diffusion 1.x
//! and 2.x: `DownBlock2D`, `CrossAttnDownBlock2D`, `UNetMidBlock2DCrossAttn`, `UpBlock2D`,
//! `CrossAttnUpBlock2D`. Parameter paths and `config.json` fields are diffusers', so checkpoints
//! load as they are and what Tiller saves loads in diffusers.

use crate::models::layers::{
    Downsample2D, ResnetBlock2D, Transformer2DModel, Upsample2D, conv2d, group_norm, linear,
};
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, Linear};
use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};
use tiller_core::{Error, Result};

/// A value that diffusers allows either once for all blocks or once per block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// The value for each of `n` blocks; `field` names the config key for errors.
    pub fn expand(&self, n: usize, field: &str) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::Each(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Each(v) => Err(Error::config(
                field,
                format!("has {} entries but there are {n} blocks", v.len()),
            )),
        }
    }
}

/// The down block types Tiller implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DownBlockType {
    DownBlock2D,
    CrossAttnDownBlock2D,
}

/// The up block types Tiller implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpBlockType {
    UpBlock2D,
    CrossAttnUpBlock2D,
}

/// The mid block types Tiller implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MidBlockType {
    #[serde(rename = "UNetMidBlock2DCrossAttn")]
    UNetMidBlock2DCrossAttn,
}

/// diffusers' `UNet2DConditionModel` config.json. Field names and defaults are diffusers'
/// (`unets/unet_2d_condition.py`). Fields diffusers has that select architectures Tiller does not
/// implement are accepted only at their default value; anything else is an error naming the field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UNet2DConditionConfig {
    #[serde(rename = "_class_name", default = "unet_class_name")]
    pub class_name: String,
    #[serde(
        rename = "_diffusers_version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub diffusers_version: Option<String>,
    #[serde(rename = "_name_or_path", default, skip_serializing)]
    pub name_or_path: Option<String>,
    /// Height and width of the (latent) image the model was trained on.
    #[serde(default)]
    pub sample_size: Option<usize>,
    /// Channels of the input (4 for SD latents, 3 for pixel space).
    #[serde(default = "four")]
    pub in_channels: usize,
    /// Channels of the prediction.
    #[serde(default = "four")]
    pub out_channels: usize,
    /// Whether the input is mapped from [0, 1] to [-1, 1] first (2x - 1).
    #[serde(default)]
    pub center_input_sample: bool,
    /// Sinusoidal timestep embedding order: cos first when true.
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    /// Shift of the embedding's frequency denominator (half_dim - freq_shift).
    #[serde(default)]
    pub freq_shift: usize,
    pub down_block_types: Vec<DownBlockType>,
    #[serde(default = "mid_default")]
    pub mid_block_type: Option<MidBlockType>,
    pub up_block_types: Vec<UpBlockType>,
    /// Only `false` is supported.
    #[serde(default)]
    pub only_cross_attention: PerBlock<bool>,
    /// Channels of each resolution level.
    pub block_out_channels: Vec<usize>,
    /// ResNet layers per down block (up blocks have one more).
    #[serde(default = "two_per_block")]
    pub layers_per_block: PerBlock<usize>,
    /// Padding of the stride-2 downsampling convolution.
    #[serde(default = "one")]
    pub downsample_padding: usize,
    #[serde(default = "one_f")]
    pub mid_block_scale_factor: f64,
    /// Dropout (inactive in Tiller's deterministic forward; kept for round-tripping).
    #[serde(default)]
    pub dropout: f64,
    /// Only `silu` is supported.
    #[serde(default = "silu_name")]
    pub act_fn: String,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "eps_default")]
    pub norm_eps: f64,
    /// Width of the text encoder's hidden states.
    #[serde(default = "cross_default")]
    pub cross_attention_dim: usize,
    #[serde(default = "one_per_block")]
    pub transformer_layers_per_block: PerBlock<usize>,
    /// diffusers' legacy name: this is the number of attention heads per block when
    /// `num_attention_heads` is not given (SD 1.x: 8; SD 2.x: [5, 10, 20, 20]).
    #[serde(default = "heads_default")]
    pub attention_head_dim: PerBlock<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    /// Linear instead of 1x1-conv projections in and out of the transformers (SD 2.x).
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Compute attention in f32 (SD 2.1); Tiller always computes in the model dtype, f32.
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default = "sixty_four")]
    pub addition_embed_type_num_heads: usize,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub class_embeddings_concat: bool,
    #[serde(default = "default_name")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default = "one_f")]
    pub resnet_out_scale_factor: f64,
    #[serde(default = "positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "three")]
    pub conv_in_kernel: usize,
    #[serde(default = "three")]
    pub conv_out_kernel: usize,
    #[serde(default = "default_name")]
    pub attention_type: String,
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
}

fn unet_class_name() -> String {
    "UNet2DConditionModel".into()
}
fn four() -> usize {
    4
}
fn yes() -> bool {
    true
}
fn mid_default() -> Option<MidBlockType> {
    Some(MidBlockType::UNetMidBlock2DCrossAttn)
}
fn two_per_block() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn one_per_block() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn heads_default() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn one() -> usize {
    1
}
fn three() -> usize {
    3
}
fn one_f() -> f64 {
    1.0
}
fn silu_name() -> String {
    "silu".into()
}
fn thirty_two() -> usize {
    32
}
fn sixty_four() -> usize {
    64
}
fn eps_default() -> f64 {
    1e-5
}
fn cross_default() -> usize {
    1280
}
fn default_name() -> String {
    "default".into()
}
fn positional() -> String {
    "positional".into()
}

impl Default for PerBlock<bool> {
    fn default() -> Self {
        PerBlock::One(false)
    }
}

/// The resolved shape of each block, computed once from the config.
#[derive(Debug, Clone)]
struct Plan {
    layers: Vec<usize>,
    heads: Vec<usize>,
    transformer_layers: Vec<usize>,
}

impl UNet2DConditionConfig {
    /// A config with diffusers' defaults and the given block layout.
    pub fn new(
        block_out_channels: Vec<usize>,
        down_block_types: Vec<DownBlockType>,
        up_block_types: Vec<UpBlockType>,
    ) -> Self {
        let json = serde_json::json!({
            "block_out_channels": block_out_channels,
            "down_block_types": down_block_types,
            "up_block_types": up_block_types,
        });
        serde_json::from_value(json).expect("defaults deserialize")
    }

    /// Checks that the config selects only what Tiller implements, naming the first field that
    /// does not.
    pub fn validate(&self) -> Result<()> {
        let unsupported = |field: &str, value: &dyn std::fmt::Debug| {
            Err(Error::config(
                field,
                format!("value {value:?} selects an architecture Tiller does not implement"),
            ))
        };
        if self.class_name != "UNet2DConditionModel" {
            return Err(Error::config(
                "_class_name",
                format!("expected UNet2DConditionModel, found {}", self.class_name),
            ));
        }
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(Error::config("block_out_channels", "must not be empty"));
        }
        if self.down_block_types.len() != n {
            return Err(Error::config(
                "down_block_types",
                format!(
                    "has {} entries, block_out_channels has {n}",
                    self.down_block_types.len()
                ),
            ));
        }
        if self.up_block_types.len() != n {
            return Err(Error::config(
                "up_block_types",
                format!(
                    "has {} entries, block_out_channels has {n}",
                    self.up_block_types.len()
                ),
            ));
        }
        if self
            .only_cross_attention
            .expand(n, "only_cross_attention")?
            .iter()
            .any(|b| *b)
        {
            return unsupported("only_cross_attention", &self.only_cross_attention);
        }
        if self.mid_block_type.is_none() {
            return unsupported("mid_block_type", &self.mid_block_type);
        }
        if self.act_fn != "silu" {
            return unsupported("act_fn", &self.act_fn);
        }
        if self.dual_cross_attention {
            return unsupported("dual_cross_attention", &true);
        }
        if self.encoder_hid_dim.is_some() {
            return unsupported("encoder_hid_dim", &self.encoder_hid_dim);
        }
        if self.encoder_hid_dim_type.is_some() {
            return unsupported("encoder_hid_dim_type", &self.encoder_hid_dim_type);
        }
        if self.class_embed_type.is_some() {
            return unsupported("class_embed_type", &self.class_embed_type);
        }
        if self.num_class_embeds.is_some() {
            return unsupported("num_class_embeds", &self.num_class_embeds);
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time") => {
                self.text_time_dims()?;
            }
            Some(_) => return unsupported("addition_embed_type", &self.addition_embed_type),
        }
        if self.resnet_time_scale_shift != "default" {
            return unsupported("resnet_time_scale_shift", &self.resnet_time_scale_shift);
        }
        if self.resnet_skip_time_act {
            return unsupported("resnet_skip_time_act", &true);
        }
        if self.time_embedding_type != "positional" {
            return unsupported("time_embedding_type", &self.time_embedding_type);
        }
        if self.time_embedding_dim.is_some() {
            return unsupported("time_embedding_dim", &self.time_embedding_dim);
        }
        if self.time_embedding_act_fn.is_some() {
            return unsupported("time_embedding_act_fn", &self.time_embedding_act_fn);
        }
        if self.timestep_post_act.is_some() {
            return unsupported("timestep_post_act", &self.timestep_post_act);
        }
        if self.time_cond_proj_dim.is_some() {
            return unsupported("time_cond_proj_dim", &self.time_cond_proj_dim);
        }
        if self.conv_in_kernel != 3 {
            return unsupported("conv_in_kernel", &self.conv_in_kernel);
        }
        if self.conv_out_kernel != 3 {
            return unsupported("conv_out_kernel", &self.conv_out_kernel);
        }
        if self.attention_type != "default" {
            return unsupported("attention_type", &self.attention_type);
        }
        if self.cross_attention_norm.is_some() {
            return unsupported("cross_attention_norm", &self.cross_attention_norm);
        }
        if self.reverse_transformer_layers_per_block.is_some() {
            return unsupported(
                "reverse_transformer_layers_per_block",
                &self.reverse_transformer_layers_per_block,
            );
        }
        if self.mid_block_only_cross_attention == Some(true) {
            return unsupported("mid_block_only_cross_attention", &true);
        }
        let plan = self.plan()?;
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c % self.norm_num_groups != 0 {
                return Err(Error::config(
                    "norm_num_groups",
                    format!(
                        "{} does not divide block_out_channels[{i}] = {c}",
                        self.norm_num_groups
                    ),
                ));
            }
            if c % plan.heads[i] != 0 {
                return Err(Error::config(
                    "attention_head_dim",
                    format!(
                        "{} heads do not divide block_out_channels[{i}] = {c}",
                        plan.heads[i]
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `addition_time_embed_dim` and `projection_class_embeddings_input_dim` of SDXL's
    /// `text_time` added conditioning; `None` without it.
    pub fn text_time_dims(&self) -> Result<Option<(usize, usize)>> {
        if self.addition_embed_type.as_deref() != Some("text_time") {
            return Ok(None);
        }
        let need = |v: Option<usize>, field: &str| {
            v.filter(|&d| d > 0).ok_or_else(|| {
                Error::config(
                    field,
                    "must be a positive integer with addition_embed_type \"text_time\"",
                )
            })
        };
        let time = need(self.addition_time_embed_dim, "addition_time_embed_dim")?;
        let input = need(
            self.projection_class_embeddings_input_dim,
            "projection_class_embeddings_input_dim",
        )?;
        if input <= 6 * time {
            return Err(Error::config(
                "projection_class_embeddings_input_dim",
                format!(
                    "{input} leaves no room for the pooled text embedding after the six time ids \
                     of {time} each"
                ),
            ));
        }
        Ok(Some((time, input)))
    }

    /// Width of the pooled text embedding SDXL's UNet takes (`text_embeds`), if it takes one.
    pub fn pooled_text_dim(&self) -> Option<usize> {
        self.text_time_dims()
            .ok()
            .flatten()
            .map(|(time, input)| input - 6 * time)
    }

    fn plan(&self) -> Result<Plan> {
        let n = self.block_out_channels.len();
        let heads = match &self.num_attention_heads {
            Some(h) => h.expand(n, "num_attention_heads")?,
            None => self.attention_head_dim.expand(n, "attention_head_dim")?,
        };
        Ok(Plan {
            layers: self.layers_per_block.expand(n, "layers_per_block")?,
            heads,
            transformer_layers: self
                .transformer_layers_per_block
                .expand(n, "transformer_layers_per_block")?,
        })
    }

    /// Builds a randomly initialised model (burn's default initialisers) on `device`.
    pub fn init(&self, device: &Device) -> Result<UNet2DConditionModel> {
        self.validate()?;
        let plan = self.plan()?;
        let boc = &self.block_out_channels;
        let n = boc.len();
        let temb = boc[0] * 4;
        let groups = self.norm_num_groups;
        let eps = self.norm_eps;
        let cross = self.cross_attention_dim;
        let lin = self.use_linear_projection;

        let mut down_blocks = Vec::with_capacity(n);
        let mut c_out = boc[0];
        for (i, kind) in self.down_block_types.iter().enumerate() {
            let c_in = c_out;
            c_out = boc[i];
            let resnets = (0..plan.layers[i])
                .map(|j| {
                    let cin = if j == 0 { c_in } else { c_out };
                    ResnetBlock2D::new(cin, c_out, Some(temb), groups, eps, 1.0, device)
                })
                .collect();
            let attentions = match kind {
                DownBlockType::DownBlock2D => Vec::new(),
                DownBlockType::CrossAttnDownBlock2D => (0..plan.layers[i])
                    .map(|_| {
                        Transformer2DModel::new(
                            c_out,
                            plan.heads[i],
                            plan.transformer_layers[i],
                            cross,
                            groups,
                            lin,
                            device,
                        )
                    })
                    .collect(),
            };
            let downsamplers = if i + 1 < n {
                vec![Downsample2D::new(c_out, self.downsample_padding, device)]
            } else {
                Vec::new()
            };
            down_blocks.push(DownBlock {
                resnets,
                attentions,
                downsamplers,
            });
        }

        let c_mid = boc[n - 1];
        let mid_block = MidBlock {
            resnets: (0..2)
                .map(|_| {
                    ResnetBlock2D::new(
                        c_mid,
                        c_mid,
                        Some(temb),
                        groups,
                        eps,
                        self.mid_block_scale_factor,
                        device,
                    )
                })
                .collect(),
            attentions: vec![Transformer2DModel::new(
                c_mid,
                plan.heads[n - 1],
                plan.transformer_layers[n - 1],
                cross,
                groups,
                lin,
                device,
            )],
        };

        let rev: Vec<usize> = boc.iter().rev().copied().collect();
        let rev_heads: Vec<usize> = plan.heads.iter().rev().copied().collect();
        let rev_layers: Vec<usize> = plan.layers.iter().rev().copied().collect();
        let rev_tl: Vec<usize> = plan.transformer_layers.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut c_out = rev[0];
        for (i, kind) in self.up_block_types.iter().enumerate() {
            let prev_out = c_out;
            c_out = rev[i];
            let c_in = rev[(i + 1).min(n - 1)];
            let num_layers = rev_layers[i] + 1;
            let resnets = (0..num_layers)
                .map(|j| {
                    let skip = if j == num_layers - 1 { c_in } else { c_out };
                    let res_in = if j == 0 { prev_out } else { c_out };
                    ResnetBlock2D::new(res_in + skip, c_out, Some(temb), groups, eps, 1.0, device)
                })
                .collect();
            let attentions = match kind {
                UpBlockType::UpBlock2D => Vec::new(),
                UpBlockType::CrossAttnUpBlock2D => (0..num_layers)
                    .map(|_| {
                        Transformer2DModel::new(
                            c_out,
                            rev_heads[i],
                            rev_tl[i],
                            cross,
                            groups,
                            lin,
                            device,
                        )
                    })
                    .collect(),
            };
            let upsamplers = if i + 1 < n {
                vec![Upsample2D::new(c_out, device)]
            } else {
                Vec::new()
            };
            up_blocks.push(UpBlock {
                resnets,
                attentions,
                upsamplers,
            });
        }

        let text_time = self.text_time_dims()?;
        Ok(UNet2DConditionModel {
            conv_in: conv2d(self.in_channels, boc[0], 3, 1, device),
            time_embedding: TimestepEmbedding {
                linear_1: linear(boc[0], temb, true, device),
                linear_2: linear(temb, temb, true, device),
            },
            add_embedding: text_time.map(|(_, input)| TimestepEmbedding {
                linear_1: linear(input, temb, true, device),
                linear_2: linear(temb, temb, true, device),
            }),
            add_time_proj_dim: text_time.map_or(0, |(time, _)| time),
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(groups, boc[0], eps, device),
            conv_out: conv2d(boc[0], self.out_channels, 3, 1, device),
            time_proj_dim: boc[0],
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift as f64,
            center_input_sample: self.center_input_sample,
        })
    }
}

/// `time_embedding`: Linear, SiLU, Linear on the sinusoidal projection of the timestep.
#[derive(Module, Debug)]
pub struct TimestepEmbedding {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

/// A down block; `attentions` is empty for `DownBlock2D`.
#[derive(Module, Debug)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub downsamplers: Vec<Downsample2D>,
}

/// `UNetMidBlock2DCrossAttn`: resnet, transformer, resnet.
#[derive(Module, Debug)]
pub struct MidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
}

/// An up block; `attentions` is empty for `UpBlock2D`.
#[derive(Module, Debug)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub upsamplers: Vec<Upsample2D>,
}

/// SDXL's added conditioning, diffusers' `added_cond_kwargs`.
#[derive(Debug, Clone)]
pub struct AddedConditions {
    /// [B, P]: the pooled output of the second text encoder (`text_embeds`).
    pub text_embeds: Tensor<2>,
    /// [B, 6]: original height and width, crop top and left, target height and width.
    pub time_ids: Tensor<2>,
}

impl AddedConditions {
    /// Both halves stacked along the batch, `self` first.
    pub fn cat(&self, other: &Self) -> Self {
        Self {
            text_embeds: Tensor::cat(vec![self.text_embeds.clone(), other.text_embeds.clone()], 0),
            time_ids: Tensor::cat(vec![self.time_ids.clone(), other.time_ids.clone()], 0),
        }
    }

    /// The same on `device`.
    pub fn to_device(&self, device: &Device) -> Self {
        Self {
            text_embeds: self.text_embeds.clone().to_device(device),
            time_ids: self.time_ids.clone().to_device(device),
        }
    }
}

/// diffusers' `UNet2DConditionModel` (SD 1.x / 2.x / SDXL block types).
#[derive(Module, Debug)]
pub struct UNet2DConditionModel {
    pub conv_in: Conv2d,
    pub time_embedding: TimestepEmbedding,
    /// SDXL's `add_embedding` (`addition_embed_type: "text_time"`): Linear, SiLU, Linear on the
    /// pooled text embedding concatenated with the sinusoidal projections of the six time ids.
    pub add_embedding: Option<TimestepEmbedding>,
    /// Width of each time id's sinusoidal projection (`add_time_proj`); 0 without it.
    pub add_time_proj_dim: usize,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: MidBlock,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    pub time_proj_dim: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub center_input_sample: bool,
}

/// Sinusoidal timestep embedding as diffusers' `get_timestep_embedding` (max period 10000).
/// timesteps: [B] -> [B, dim]
pub fn timestep_embedding(
    timesteps: Tensor<1>,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Tensor<2> {
    let half = dim / 2;
    let device = timesteps.device();
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10000f64.ln()) * i as f64 / (half as f64 - freq_shift)).exp() as f32)
        .collect();
    let freqs = Tensor::<1>::from_floats(freqs.as_slice(), &device).unsqueeze_dim::<2>(0);
    let args = timesteps.unsqueeze_dim::<2>(1) * freqs;
    let (sin, cos) = (args.clone().sin(), args.cos());
    let emb = if flip_sin_to_cos {
        Tensor::cat(vec![cos, sin], 1)
    } else {
        Tensor::cat(vec![sin, cos], 1)
    };
    if dim % 2 == 1 {
        let b = emb.dims()[0];
        Tensor::cat(vec![emb, Tensor::zeros([b, 1], &device)], 1)
    } else {
        emb
    }
}

impl UNet2DConditionModel {
    /// Predicts the model target (noise, v or x0, per the scheduler's prediction type).
    ///
    /// sample: [B, C_in, H, W], timesteps: [B], encoder_hidden_states: [B, L, cross_attention_dim]
    /// -> [B, C_out, H, W]
    ///
    /// # Panics
    /// If the model has SDXL's added conditioning ([`Self::takes_added_conditions`]); use
    /// [`Self::forward_with`].
    pub fn forward(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
    ) -> Tensor<4> {
        self.forward_with(sample, timesteps, encoder_hidden_states, None)
    }

    /// Whether the model needs [`AddedConditions`] (SDXL's `text_time`).
    pub fn takes_added_conditions(&self) -> bool {
        self.add_embedding.is_some()
    }

    /// [`Self::forward`] with SDXL's added conditioning, which a `text_time` model requires
    /// and any other ignores.
    ///
    /// # Panics
    /// If the model takes added conditions and `added` is `None`, or their shapes do not fit.
    pub fn forward_with(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
        added: Option<&AddedConditions>,
    ) -> Tensor<4> {
        let sample = if self.center_input_sample {
            sample * 2.0 - 1.0
        } else {
            sample
        };
        let t = timestep_embedding(
            timesteps,
            self.time_proj_dim,
            self.flip_sin_to_cos,
            self.freq_shift,
        );
        let mut temb = self
            .time_embedding
            .linear_2
            .forward(silu(self.time_embedding.linear_1.forward(t)));
        if let Some(add) = &self.add_embedding {
            let added = added.expect(
                "this UNet has SDXL's text_time conditioning: call forward_with with the pooled \
                 text embeddings and time ids",
            );
            let [b, n] = added.time_ids.dims();
            let ids = timestep_embedding(
                added.time_ids.clone().reshape([b * n]),
                self.add_time_proj_dim,
                self.flip_sin_to_cos,
                self.freq_shift,
            )
            .reshape([b, n * self.add_time_proj_dim]);
            let x = Tensor::cat(vec![added.text_embeds.clone(), ids], 1);
            temb = temb + add.linear_2.forward(silu(add.linear_1.forward(x)));
        }

        let mut h = self.conv_in.forward(sample);
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                h = resnet.forward(h, temb.clone());
                if let Some(attn) = block.attentions.get(j) {
                    h = attn.forward(h, encoder_hidden_states.clone());
                }
                skips.push(h.clone());
            }
            for down in &block.downsamplers {
                h = down.forward(h);
                skips.push(h.clone());
            }
        }

        h = self.mid_block.resnets[0].forward(h, temb.clone());
        for (attn, resnet) in self
            .mid_block
            .attentions
            .iter()
            .zip(&self.mid_block.resnets[1..])
        {
            h = attn.forward(h, encoder_hidden_states.clone());
            h = resnet.forward(h, temb.clone());
        }

        for block in &self.up_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().expect("one skip per up-block resnet");
                h = resnet.forward(Tensor::cat(vec![h, skip], 1), temb.clone());
                if let Some(attn) = block.attentions.get(j) {
                    h = attn.forward(h, encoder_hidden_states.clone());
                }
            }
            for up in &block.upsamplers {
                // Upsample to the size of the skip the next block will concatenate.
                let [_, _, sh, sw] = skips
                    .last()
                    .expect("skips remain before the last block")
                    .dims();
                h = up.forward(h, [sh, sw]);
            }
        }

        let h = silu(self.conv_norm_out.forward(h));
        self.conv_out.forward(h)
    }
}
