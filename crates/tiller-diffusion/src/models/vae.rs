//! `AutoencoderKL` as diffusers defines it (Kingma & Welling 2014; the KL-regularised
//! autoencoder of Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
//! Models", §3): the encoder maps an image in [-1, 1] to a diagonal Gaussian over latents, the
//! decoder maps latents back to an image. Every Stable Diffusion model (1.x, 2.x, SDXL, SD3, Flux)
//! diffuses in this latent space. Parameter paths and config.json fields are diffusers'
//! (`models/autoencoders/autoencoder_kl.py`, `vae.py`), so `vae/` folders load as they are.
//!
//! The diffusion model sees `scale_latents(z)`: `(z - shift_factor) * scaling_factor`, or with
//! per-channel `latents_mean`/`latents_std` `(z - mean) * scaling_factor / std`, as diffusers'
//! pipelines apply them; `unscale_latents` is its inverse before decoding.

use crate::models::layers::{
    Downsample2D, ResnetBlock2D, Upsample2D, conv1x1, conv2d, group_norm, linear,
    multi_head_attention,
};
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, Linear};
use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};
use tiller_core::{Error, Result};

/// The encoder block type Tiller implements (the only one `AutoencoderKL` checkpoints use).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DownEncoderBlockType {
    DownEncoderBlock2D,
}

/// The decoder block type Tiller implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpDecoderBlockType {
    UpDecoderBlock2D,
}

/// `sample_size`: one side, or height and width.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SampleSize {
    Square(usize),
    HeightWidth([usize; 2]),
}

/// diffusers' `AutoencoderKL` config.json, with diffusers' names and defaults. Unknown fields are
/// an error naming the field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoencoderKLConfig {
    #[serde(rename = "_class_name", default = "vae_class_name")]
    pub class_name: String,
    #[serde(
        rename = "_diffusers_version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub diffusers_version: Option<String>,
    #[serde(rename = "_name_or_path", default, skip_serializing)]
    pub name_or_path: Option<String>,
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    #[serde(default = "down_default")]
    pub down_block_types: Vec<DownEncoderBlockType>,
    #[serde(default = "up_default")]
    pub up_block_types: Vec<UpDecoderBlockType>,
    /// Channels of each resolution level; the image is downsampled 2x between levels.
    #[serde(default = "channels_default")]
    pub block_out_channels: Vec<usize>,
    /// ResNet layers per encoder block (decoder blocks have one more).
    #[serde(default = "one")]
    pub layers_per_block: usize,
    /// Only `silu` is supported.
    #[serde(default = "silu_name")]
    pub act_fn: String,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    /// The image size the VAE was trained on (informational: any size divisible by the
    /// downsampling factor works).
    #[serde(default)]
    pub sample_size: Option<SampleSize>,
    #[serde(default = "scaling_default")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    /// diffusers runs this VAE in f32 even in an f16 pipeline; Tiller always computes in f32.
    #[serde(default = "yes")]
    pub force_upcast: bool,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
}

fn vae_class_name() -> String {
    "AutoencoderKL".into()
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn one() -> usize {
    1
}
fn thirty_two() -> usize {
    32
}
fn yes() -> bool {
    true
}
fn silu_name() -> String {
    "silu".into()
}
fn scaling_default() -> f64 {
    0.18215
}
fn down_default() -> Vec<DownEncoderBlockType> {
    vec![DownEncoderBlockType::DownEncoderBlock2D]
}
fn up_default() -> Vec<UpDecoderBlockType> {
    vec![UpDecoderBlockType::UpDecoderBlock2D]
}
fn channels_default() -> Vec<usize> {
    vec![64]
}

/// diffusers fixes every norm's eps in the VAE at 1e-6.
const EPS: f64 = 1e-6;

impl AutoencoderKLConfig {
    /// A config with diffusers' defaults and the given channels per level.
    pub fn new(block_out_channels: Vec<usize>) -> Self {
        let n = block_out_channels.len();
        let json = serde_json::json!({
            "block_out_channels": block_out_channels,
            "down_block_types": vec!["DownEncoderBlock2D"; n],
            "up_block_types": vec!["UpDecoderBlock2D"; n],
        });
        serde_json::from_value(json).expect("defaults deserialize")
    }

    /// Checks the config describes a model Tiller can build, naming the first bad field.
    pub fn validate(&self) -> Result<()> {
        if self.class_name != "AutoencoderKL" {
            return Err(Error::config(
                "_class_name",
                format!("expected AutoencoderKL, found {}", self.class_name),
            ));
        }
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(Error::config("block_out_channels", "must not be empty"));
        }
        for (field, len) in [
            ("down_block_types", self.down_block_types.len()),
            ("up_block_types", self.up_block_types.len()),
        ] {
            if len != n {
                return Err(Error::config(
                    field,
                    format!("has {len} entries, block_out_channels has {n}"),
                ));
            }
        }
        if self.act_fn != "silu" {
            return Err(Error::config(
                "act_fn",
                format!("{:?} is not supported (only \"silu\")", self.act_fn),
            ));
        }
        let g = self.norm_num_groups;
        if g == 0 || self.block_out_channels.iter().any(|c| c % g != 0) {
            return Err(Error::config(
                "norm_num_groups",
                format!(
                    "{g} does not divide every entry of block_out_channels {:?}",
                    self.block_out_channels
                ),
            ));
        }
        if self.layers_per_block == 0 || self.latent_channels == 0 {
            return Err(Error::config(
                "layers_per_block",
                "layers_per_block and latent_channels must be positive",
            ));
        }
        if !self.scaling_factor.is_finite() || self.scaling_factor == 0.0 {
            return Err(Error::config(
                "scaling_factor",
                format!("{} is not a finite non-zero number", self.scaling_factor),
            ));
        }
        match (&self.latents_mean, &self.latents_std) {
            (None, None) => {}
            (Some(mean), Some(std)) => {
                for (field, v) in [("latents_mean", mean), ("latents_std", std)] {
                    if v.len() != self.latent_channels {
                        return Err(Error::config(
                            field,
                            format!(
                                "has {} entries, latent_channels is {}",
                                v.len(),
                                self.latent_channels
                            ),
                        ));
                    }
                }
                if std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
                    return Err(Error::config("latents_std", "entries must be positive"));
                }
            }
            (Some(_), None) => {
                return Err(Error::config("latents_std", "is needed with latents_mean"));
            }
            (None, Some(_)) => {
                return Err(Error::config("latents_mean", "is needed with latents_std"));
            }
        }
        Ok(())
    }

    /// How many times smaller the latents are than the image on each side.
    pub fn downsampling_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    /// The diffusion model's latents from VAE latents `z` [B, C, h, w], as diffusers' pipelines
    /// compute them after `encode`.
    pub fn scale_latents(&self, z: Tensor<4>) -> Tensor<4> {
        match (&self.latents_mean, &self.latents_std) {
            (Some(mean), Some(std)) => {
                let (mean, std) = self.per_channel(mean, std, &z.device());
                (z - mean) * self.scaling_factor / std
            }
            _ => (z - self.shift_factor.unwrap_or(0.0)) * self.scaling_factor,
        }
    }

    /// VAE latents from the diffusion model's latents: the inverse of `scale_latents`, as
    /// diffusers' pipelines compute it before `decode`.
    pub fn unscale_latents(&self, latents: Tensor<4>) -> Tensor<4> {
        match (&self.latents_mean, &self.latents_std) {
            (Some(mean), Some(std)) => {
                let (mean, std) = self.per_channel(mean, std, &latents.device());
                latents * std / self.scaling_factor + mean
            }
            _ => latents / self.scaling_factor + self.shift_factor.unwrap_or(0.0),
        }
    }

    fn per_channel(&self, mean: &[f64], std: &[f64], device: &Device) -> (Tensor<4>, Tensor<4>) {
        let column = |v: &[f64]| {
            let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            Tensor::<1>::from_floats(v.as_slice(), device).reshape([1, v.len(), 1, 1])
        };
        (column(mean), column(std))
    }

    /// Builds the model with burn's default initialisation.
    pub fn init(&self, device: &Device) -> Result<AutoencoderKL> {
        self.validate()?;
        let boc = &self.block_out_channels;
        let g = self.norm_num_groups;
        let n = boc.len();
        let resnets = |c_in: usize, c_out: usize, count: usize| -> Vec<ResnetBlock2D> {
            (0..count)
                .map(|i| {
                    let cin = if i == 0 { c_in } else { c_out };
                    ResnetBlock2D::new(cin, c_out, None, g, EPS, 1.0, device)
                })
                .collect()
        };
        let mid_block = |c: usize| MidBlock2D {
            resnets: resnets(c, c, 2),
            attentions: if self.mid_block_add_attention {
                vec![SpatialSelfAttention::new(c, g, device)]
            } else {
                vec![]
            },
        };
        let mut down_blocks = Vec::with_capacity(n);
        let mut c_prev = boc[0];
        for (i, &c) in boc.iter().enumerate() {
            down_blocks.push(DownEncoderBlock2D {
                resnets: resnets(c_prev, c, self.layers_per_block),
                downsamplers: if i + 1 < n {
                    vec![Downsample2D::new(c, 0, device)]
                } else {
                    vec![]
                },
            });
            c_prev = c;
        }
        let encoder = Encoder {
            conv_in: conv2d(self.in_channels, boc[0], 3, 1, device),
            down_blocks,
            mid_block: mid_block(boc[n - 1]),
            conv_norm_out: group_norm(g, boc[n - 1], EPS, device),
            conv_out: conv2d(boc[n - 1], 2 * self.latent_channels, 3, 1, device),
        };
        let mut up_blocks = Vec::with_capacity(n);
        let mut c_prev = boc[n - 1];
        for (i, &c) in boc.iter().rev().enumerate() {
            up_blocks.push(UpDecoderBlock2D {
                resnets: resnets(c_prev, c, self.layers_per_block + 1),
                upsamplers: if i + 1 < n {
                    vec![Upsample2D::new(c, device)]
                } else {
                    vec![]
                },
            });
            c_prev = c;
        }
        let decoder = Decoder {
            conv_in: conv2d(self.latent_channels, boc[n - 1], 3, 1, device),
            mid_block: mid_block(boc[n - 1]),
            up_blocks,
            conv_norm_out: group_norm(g, boc[0], EPS, device),
            conv_out: conv2d(boc[0], self.out_channels, 3, 1, device),
        };
        let l = self.latent_channels;
        Ok(AutoencoderKL {
            encoder,
            decoder,
            quant_conv: self
                .use_quant_conv
                .then(|| conv2d(2 * l, 2 * l, 1, 1, device)),
            post_quant_conv: self.use_post_quant_conv.then(|| conv2d(l, l, 1, 1, device)),
        })
    }
}

/// diffusers' `Attention` as the VAE's mid block builds it (`_from_deprecated_attn_block`): a
/// GroupNorm, one head over all channels of the H*W positions, a residual connection.
#[derive(Module, Debug)]
pub struct SpatialSelfAttention {
    pub group_norm: GroupNorm,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    /// diffusers stores `[Linear, Dropout]`; only index 0 has parameters.
    pub to_out: Vec<Linear>,
}

impl SpatialSelfAttention {
    pub fn new(channels: usize, groups: usize, device: &Device) -> Self {
        Self {
            group_norm: group_norm(groups, channels, EPS, device),
            to_q: linear(channels, channels, true, device),
            to_k: linear(channels, channels, true, device),
            to_v: linear(channels, channels, true, device),
            to_out: vec![linear(channels, channels, true, device)],
        }
    }

    /// x: [B, C, H, W] -> [B, C, H, W]
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let tokens = self
            .group_norm
            .forward(x.clone())
            .reshape([b, c, h * w])
            .swap_dims(1, 2);
        let q = self.to_q.forward(tokens.clone());
        let k = self.to_k.forward(tokens.clone());
        let v = self.to_v.forward(tokens);
        let out = self.to_out[0].forward(multi_head_attention(q, k, v, 1, None));
        out.swap_dims(1, 2).reshape([b, c, h, w]) + x
    }
}

/// diffusers' `UNetMidBlock2D` without a time embedding: resnet, (attention, resnet).
#[derive(Module, Debug)]
pub struct MidBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    /// Empty when `mid_block_add_attention` is false.
    pub attentions: Vec<SpatialSelfAttention>,
}

impl MidBlock2D {
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut h = self.resnets[0].forward_unconditional(x);
        for attn in &self.attentions {
            h = attn.forward(h);
        }
        for resnet in &self.resnets[1..] {
            h = resnet.forward_unconditional(h);
        }
        h
    }
}

/// diffusers' `DownEncoderBlock2D`.
#[derive(Module, Debug)]
pub struct DownEncoderBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub downsamplers: Vec<Downsample2D>,
}

/// diffusers' `UpDecoderBlock2D`.
#[derive(Module, Debug)]
pub struct UpDecoderBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub upsamplers: Vec<Upsample2D>,
}

/// diffusers' `Encoder` (`double_z = True`): image -> posterior moments.
#[derive(Module, Debug)]
pub struct Encoder {
    pub conv_in: Conv2d,
    pub down_blocks: Vec<DownEncoderBlock2D>,
    pub mid_block: MidBlock2D,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl Encoder {
    /// x: [B, in_channels, H, W] -> [B, 2 * latent_channels, H/f, W/f]
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut h = self.conv_in.forward(x);
        for block in &self.down_blocks {
            for resnet in &block.resnets {
                h = resnet.forward_unconditional(h);
            }
            for down in &block.downsamplers {
                h = down.forward(h);
            }
        }
        let h = self.mid_block.forward(h);
        self.conv_out.forward(silu(self.conv_norm_out.forward(h)))
    }
}

/// diffusers' `Decoder` with group norms (`norm_type = "group"`): latents -> image.
#[derive(Module, Debug)]
pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid_block: MidBlock2D,
    pub up_blocks: Vec<UpDecoderBlock2D>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl Decoder {
    /// z: [B, latent_channels, h, w] -> [B, out_channels, h*f, w*f]
    pub fn forward(&self, z: Tensor<4>) -> Tensor<4> {
        (0..self.segments()).fold(z, |h, i| self.segment(i, h))
    }

    /// The decoder as a chain of segments, for recomputation in backward: `conv_in` and the mid
    /// block, each up block, then the output head.
    pub fn segments(&self) -> usize {
        self.up_blocks.len() + 2
    }

    /// Segment `i` of [`Self::segments`] applied to `h`.
    pub fn segment(&self, i: usize, h: Tensor<4>) -> Tensor<4> {
        if i == 0 {
            return self.mid_block.forward(self.conv_in.forward(h));
        }
        match self.up_blocks.get(i - 1) {
            Some(block) => {
                let mut h = h;
                for resnet in &block.resnets {
                    h = resnet.forward_unconditional(h);
                }
                for up in &block.upsamplers {
                    let [_, _, height, width] = h.dims();
                    h = up.forward(h, [2 * height, 2 * width]);
                }
                h
            }
            None => self.conv_out.forward(silu(self.conv_norm_out.forward(h))),
        }
    }
}

/// The encoder's posterior: a diagonal Gaussian with `logvar` clamped to [-30, 20] as diffusers'
/// `DiagonalGaussianDistribution` does.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    pub mean: Tensor<4>,
    pub logvar: Tensor<4>,
}

impl DiagonalGaussian {
    /// Splits `[B, 2C, h, w]` moments into mean and log-variance.
    pub fn from_moments(moments: Tensor<4>) -> Self {
        let c = moments.dims()[1] / 2;
        let mut halves = moments.split(c, 1);
        let logvar = halves.pop().expect("two halves").clamp(-30.0, 20.0);
        let mean = halves.pop().expect("two halves");
        Self { mean, logvar }
    }

    pub fn std(&self) -> Tensor<4> {
        (self.logvar.clone() * 0.5).exp()
    }

    /// `mean + std * noise`, with `noise` ~ N(0, I) drawn by the caller (from the example's
    /// seed stream, so a latent does not depend on the batch it was encoded in).
    pub fn sample(&self, noise: Tensor<4>) -> Tensor<4> {
        self.mean.clone() + self.std() * noise
    }

    /// The posterior's mode (its mean), as `latent_dist.mode()`.
    pub fn mode(&self) -> Tensor<4> {
        self.mean.clone()
    }
}

/// diffusers' `AutoencoderKL`.
#[derive(Module, Debug)]
pub struct AutoencoderKL {
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub quant_conv: Option<Conv2d>,
    pub post_quant_conv: Option<Conv2d>,
}

impl AutoencoderKL {
    /// Images in [-1, 1], [B, in_channels, H, W], to the posterior over VAE latents (H and W
    /// divisible by the downsampling factor).
    pub fn encode(&self, x: Tensor<4>) -> DiagonalGaussian {
        let h = self.encoder.forward(x);
        let moments = match &self.quant_conv {
            Some(conv) => conv1x1(conv, h),
            None => h,
        };
        DiagonalGaussian::from_moments(moments)
    }

    /// VAE latents [B, latent_channels, h, w] to images (nominally in [-1, 1]).
    pub fn decode(&self, z: Tensor<4>) -> Tensor<4> {
        let z = match &self.post_quant_conv {
            Some(conv) => conv1x1(conv, z),
            None => z,
        };
        self.decoder.forward(z)
    }

    /// `decode(encode(x).mode())`, diffusers' `forward` with `sample_posterior=False`.
    pub fn reconstruct(&self, x: Tensor<4>) -> Tensor<4> {
        self.decode(self.encode(x).mode())
    }
}

/// A latent pipeline's VAE with its config: the map between the latents a UNet denoises and the
/// images rewards and people see.
#[derive(Debug, Clone)]
pub struct LatentSpace {
    pub config: AutoencoderKLConfig,
    pub vae: AutoencoderKL,
}

impl LatentSpace {
    /// The latents' [C, h, w] for images of [C_img, H, W]; an error unless the sides divide by the
    /// downsampling factor.
    pub fn latent_shape(&self, [c, h, w]: [usize; 3]) -> Result<[usize; 3]> {
        let f = self.config.downsampling_factor();
        if c != self.config.in_channels
            || h == 0
            || w == 0
            || !h.is_multiple_of(f)
            || !w.is_multiple_of(f)
        {
            return Err(Error::invalid(format!(
                "images are {c}x{h}x{w}; this VAE encodes {} channels with sides divisible by {f}",
                self.config.in_channels
            )));
        }
        Ok([self.config.latent_channels, h / f, w / f])
    }

    /// The images' [C, H, W] of latents [C, h, w].
    pub fn image_shape(&self, [_, h, w]: [usize; 3]) -> [usize; 3] {
        let f = self.config.downsampling_factor();
        [self.config.out_channels, h * f, w * f]
    }

    /// Latents [B, C, h, w] to the images rewards take, [B, 3, H, W] in [-1, 1] (the VAE's output,
    /// not clamped: rewards clamp), differentiable in the latents: the VAE is a frozen copy on the
    /// latents' device, so reward backpropagation (DRaFT, AlignProp) reaches the chain through
    /// the decoder and no VAE weight is trained.
    pub fn decode_for_reward(&self, latents: Tensor<4>) -> Tensor<4> {
        let vae = self.vae.clone().to_device(&latents.device()).no_grad();
        vae.decode(self.config.unscale_latents(latents))
    }

    /// A loss of the decoded images of `latents` whose backward holds one decoder segment's
    /// graph at a time instead of the whole decoder's (gradient checkpointing, as
    /// `vae.enable_gradient_checkpointing()` does in diffusers): the decode runs without a graph
    /// keeping each segment's input, `objective` (images on the autodiff device -> a loss [1])
    /// is differentiated at the images, and the gradient is carried back through the decoder one
    /// recomputed segment at a time. Returns a loss [1] on `latents`' device whose value is
    /// `objective`'s and whose gradient in `latents` (and through it in whatever `latents` depends
    /// on) is `objective`'s through the decoder. `latents` on a plain device: `objective` of the
    /// decoded images.
    pub fn decoded_loss(
        &self,
        latents: Tensor<4>,
        objective: impl FnOnce(Tensor<4>) -> Result<Tensor<1>>,
    ) -> Result<Tensor<1>> {
        if !latents.is_autodiff() {
            return objective(self.decode_for_reward(latents));
        }
        let ad = latents.device();
        let plain = latents.clone().inner();
        let vae = self.vae.clone().to_device(&plain.device()).no_grad();
        let decoder = &vae.decoder;
        // Forward without a graph, keeping each segment's input.
        let mut h = self.config.unscale_latents(plain);
        h = match &vae.post_quant_conv {
            Some(conv) => conv1x1(conv, h),
            None => h,
        };
        let mut inputs = Vec::with_capacity(decoder.segments());
        for i in 0..decoder.segments() {
            inputs.push(h.clone());
            h = decoder.segment(i, h);
        }
        // The objective and its gradient at the images.
        let images = h.autodiff().require_grad();
        let loss = objective(images.clone())?;
        let value = loss.clone().inner();
        let mut grads = loss.backward();
        let mut upstream = images
            .grad_remove(&mut grads)
            .ok_or_else(|| Error::invalid("the objective does not depend on the images"))?;
        // Back through the segments, last first, each recomputed with a graph.
        let ad_vae = vae.clone().to_device(&ad).no_grad();
        for (i, input) in inputs.into_iter().enumerate().rev() {
            let input = input.autodiff().require_grad();
            let out = ad_vae.decoder.segment(i, input.clone());
            let mut g = (out * upstream.autodiff()).sum().backward();
            upstream = input
                .grad_remove(&mut g)
                .ok_or_else(|| Error::invalid("a decoder segment does not depend on its input"))?;
        }
        // The post-quant conv and the unscaling, with a graph from the latents themselves.
        let z = self.config.unscale_latents(latents);
        let z = match &ad_vae.post_quant_conv {
            Some(conv) => conv1x1(conv, z),
            None => z,
        };
        // Value: the objective's; gradient: <upstream, d z / d latents>.
        let linear = (z * upstream.autodiff()).sum();
        Ok(linear.clone() - linear.detach() + value.autodiff())
    }

    /// Images [B, 3, H, W] in [-1, 1] to the latents the UNet is trained on, [B, C, H/f, W/f]:
    /// the posterior's mode, or a sample of it with `noise` (standard normal, the latents' shape),
    /// scaled as the pipelines scale (diffusers' training scripts: `vae.encode(x).latent_dist`
    /// times `scaling_factor`). How preference methods (Diffusion-DPO, KTO) read stored images.
    pub fn encode_images(&self, images: Tensor<4>, noise: Option<Tensor<4>>) -> Result<Tensor<4>> {
        let [b, c, h, w] = images.dims();
        self.latent_shape([c, h, w])
            .map_err(|e| Error::invalid(format!("a batch of {b}: {e}")))?;
        let posterior = self.vae.encode(images);
        let z = match noise {
            None => posterior.mode(),
            Some(n) => posterior.sample(n),
        };
        Ok(self.config.scale_latents(z))
    }
}

/// diffusers' pre-0.14 names of the mid-block attention's projections (`query`, `key`, `value`,
/// `proj_attn`), which many `vae/` folders still carry; diffusers renames them on load
/// (`_convert_deprecated_attention_blocks`) and so does Tiller. Returns how many were renamed.
pub fn rename_deprecated_attention<T>(
    tensors: &mut std::collections::BTreeMap<String, T>,
) -> usize {
    const OLD_NEW: [(&str, &str); 4] = [
        ("query", "to_q"),
        ("key", "to_k"),
        ("value", "to_v"),
        ("proj_attn", "to_out.0"),
    ];
    let renames: Vec<(String, String)> = tensors
        .keys()
        .filter_map(|k| {
            let (path, leaf) = k.rsplit_once('.')?;
            let (block, old) = path.rsplit_once('.')?;
            if !block.contains("mid_block.attentions.") {
                return None;
            }
            let new = OLD_NEW.iter().find(|(o, _)| *o == old)?.1;
            Some((k.clone(), format!("{block}.{new}.{leaf}")))
        })
        .collect();
    let mut renamed = 0;
    for (old, new) in renames {
        // A file holding both names keeps both, so loading names the stray one.
        if !tensors.contains_key(&new) {
            let t = tensors.remove(&old).expect("listed above");
            tensors.insert(new, t);
            renamed += 1;
        }
    }
    renamed
}
