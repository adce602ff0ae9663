//! Building blocks shared by the UNet and the text encoder, named as diffusers names them so that
//! parameter paths match checkpoints (`resnets.0.conv1.weight`, `attn2.to_k.weight`, ...).
//!
//! Every projection is a burn `Linear`, so `Module::apply_lora` can attach adapters to attention and
//! feed-forward layers without rewriting the models.

use super::probe;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{
    GroupNorm, GroupNormConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig, PaddingConfig2d,
};
use burn::tensor::activation::{gelu, sigmoid, silu, softmax};
use burn::tensor::module::{attention, interpolate, linear as linear_op};
use burn::tensor::ops::{AttentionModuleOptions, InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, Tensor};

/// A `k x k` convolution with "same" padding and the given stride, as `nn.Conv2d(..., padding=k//2)`.
pub fn conv2d(c_in: usize, c_out: usize, k: usize, stride: usize, device: &Device) -> Conv2d {
    let p = k / 2;
    Conv2dConfig::new([c_in, c_out], [k, k])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
        .init(device)
}

/// A 1x1, stride-1 convolution computed as a batched matmul: `W [out, in] @ x [B, in, H*W]`.
/// Same result as `conv.forward(x)` up to summation order, but flex's conv2d backward for 1x1
/// kernels is about 6x its forward, while a matmul's backward is two matmuls (see
/// docs/design/performance.md). The gradient reaches `conv.weight` through the reshape.
/// x: [B, C_in, H, W] -> [B, C_out, H, W]
pub fn conv1x1(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let [b, c_in, h, w] = x.dims();
    let [c_out, ..] = conv.weight.val().dims();
    let weight = conv.weight.val().reshape([1, c_out, c_in]);
    let out = weight.matmul(x.reshape([b, c_in, h * w]));
    let out = match &conv.bias {
        Some(bias) => out + bias.val().reshape([1, c_out, 1]),
        None => out,
    };
    out.reshape([b, c_out, h, w])
}

/// A 1x1 convolution applied to tokens: `x [B, N, C_in] -> [B, N, C_out]`, i.e. a linear layer
/// whose weight is the kernel's `[C_out, C_in]` transposed. Used for `Transformer2DModel`'s conv
/// projections so that the NCHW <-> tokens permute is done once, on the narrow side.
pub fn conv1x1_tokens(conv: &Conv2d, x: Tensor<3>) -> Tensor<3> {
    let [c_out, c_in, ..] = conv.weight.val().dims();
    let weight = conv.weight.val().reshape([c_out, c_in]).transpose();
    linear_op(x, weight, conv.bias.as_ref().map(|b| b.val()))
}

/// `nn.Linear(d_in, d_out, bias)`.
pub fn linear(d_in: usize, d_out: usize, bias: bool, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out).with_bias(bias).init(device)
}

/// `nn.GroupNorm(groups, channels, eps, affine=True)`.
pub fn group_norm(groups: usize, channels: usize, eps: f64, device: &Device) -> GroupNorm {
    GroupNormConfig::new(groups, channels)
        .with_epsilon(eps)
        .init(device)
}

/// `nn.LayerNorm(d, eps)`.
pub fn layer_norm(d: usize, eps: f64, device: &Device) -> LayerNorm {
    LayerNormConfig::new(d).with_epsilon(eps).init(device)
}

/// diffusers' `ResnetBlock2D` with the default time-embedding shift ("default": added, not
/// scale-shift). The VAE's blocks have no time embedding (`temb_channels=None`): no
/// `time_emb_proj`.
#[derive(Module, Debug)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_emb_proj: Option<Linear>,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    /// 1x1 projection of the input when input and output channels differ.
    pub conv_shortcut: Option<Conv2d>,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    /// `temb`: width of the time embedding, `None` for a block without one.
    pub fn new(
        c_in: usize,
        c_out: usize,
        temb: Option<usize>,
        groups: usize,
        eps: f64,
        output_scale_factor: f64,
        device: &Device,
    ) -> Self {
        Self {
            norm1: group_norm(groups, c_in, eps, device),
            conv1: conv2d(c_in, c_out, 3, 1, device),
            time_emb_proj: temb.map(|t| linear(t, c_out, true, device)),
            norm2: group_norm(groups, c_out, eps, device),
            conv2: conv2d(c_out, c_out, 3, 1, device),
            conv_shortcut: (c_in != c_out).then(|| conv2d(c_in, c_out, 1, 1, device)),
            output_scale_factor,
        }
    }

    /// x: [B, C_in, H, W], temb: [B, T] (ignored by a block without `time_emb_proj`)
    /// -> [B, C_out, H, W]
    pub fn forward(&self, x: Tensor<4>, temb: Tensor<2>) -> Tensor<4> {
        self.forward_with(x, Some(temb))
    }

    /// The block without a time embedding, as the VAE runs it. x: [B, C_in, H, W] -> [B, C_out, H, W]
    pub fn forward_unconditional(&self, x: Tensor<4>) -> Tensor<4> {
        self.forward_with(x, None)
    }

    fn forward_with(&self, x: Tensor<4>, temb: Option<Tensor<2>>) -> Tensor<4> {
        let h = self.conv1.forward(silu(self.norm1.forward(x.clone())));
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => h + proj.forward(silu(temb)).unsqueeze_dims::<4>(&[2, 3]),
            _ => h,
        };
        let h = self.conv2.forward(silu(self.norm2.forward(h)));
        let skip = match &self.conv_shortcut {
            Some(c) => conv1x1(c, x),
            None => x,
        };
        let out = skip + h;
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out / self.output_scale_factor
        }
    }
}

/// diffusers' `Downsample2D` with a stride-2 3x3 convolution (`downsamplers.0.conv`).
#[derive(Module, Debug)]
pub struct Downsample2D {
    pub conv: Conv2d,
}

impl Downsample2D {
    /// `padding` as diffusers' `downsample_padding`: pixels on every side, except that 0 means
    /// one pixel on the bottom and right only (diffusers pads `(0, 1, 0, 1)` before the
    /// convolution; the VAE's encoder uses this).
    pub fn new(channels: usize, padding: usize, device: &Device) -> Self {
        let pad = match padding {
            0 => PaddingConfig2d::Explicit(0, 0, 1, 1),
            p => PaddingConfig2d::Explicit(p, p, p, p),
        };
        let conv = Conv2dConfig::new([channels, channels], [3, 3])
            .with_stride([2, 2])
            .with_padding(pad)
            .init(device);
        Self { conv }
    }

    /// x: [B, C, H, W] -> [B, C, H/2, W/2]
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.conv.forward(x)
    }
}

/// diffusers' `Upsample2D`: nearest-neighbour upsampling then a 3x3 convolution (`upsamplers.0.conv`).
#[derive(Module, Debug)]
pub struct Upsample2D {
    pub conv: Conv2d,
}

impl Upsample2D {
    pub fn new(channels: usize, device: &Device) -> Self {
        Self {
            conv: conv2d(channels, channels, 3, 1, device),
        }
    }

    /// x: [B, C, H, W] -> [B, C, size] where `size` is the next skip connection's spatial size
    /// (2H x 2W unless the input size was odd somewhere on the way down).
    pub fn forward(&self, x: Tensor<4>, size: [usize; 2]) -> Tensor<4> {
        let up = interpolate(
            x,
            InterpolateOptions::new(InterpolateMode::Nearest).with_output_size(size),
        );
        self.conv.forward(up)
    }
}

/// Multi-head attention as diffusers' `Attention` (and CLIP's, with biases on q/k/v):
/// `to_q`, `to_k`, `to_v`, `to_out.0`.
#[derive(Module, Debug)]
pub struct Attention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    /// diffusers stores `[Linear, Dropout]`; only index 0 has parameters.
    pub to_out: Vec<Linear>,
    pub heads: usize,
}

impl Attention {
    /// query_dim: width of the queries; context_dim: width of keys/values (= query_dim for
    /// self-attention); inner = heads * head_dim.
    pub fn new(
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        qkv_bias: bool,
        device: &Device,
    ) -> Self {
        let inner = heads * head_dim;
        Self {
            to_q: linear(query_dim, inner, qkv_bias, device),
            to_k: linear(context_dim, inner, qkv_bias, device),
            to_v: linear(context_dim, inner, qkv_bias, device),
            to_out: vec![linear(inner, query_dim, true, device)],
            heads,
        }
    }

    /// x: [B, N, query_dim], context: [B, M, context_dim] (None = self-attention),
    /// mask: additive [N, M] (e.g. causal, -inf above the diagonal) -> [B, N, query_dim]
    pub fn forward(
        &self,
        x: Tensor<3>,
        context: Option<Tensor<3>>,
        mask: Option<Tensor<2>>,
    ) -> Tensor<3> {
        let ctx = context.unwrap_or_else(|| x.clone());
        probe::observe(&self.to_q, &x);
        probe::observe(&self.to_k, &ctx);
        probe::observe(&self.to_v, &ctx);
        let q = self.to_q.forward(x);
        let k = self.to_k.forward(ctx.clone());
        let v = self.to_v.forward(ctx);
        let out = multi_head_attention(q, k, v, self.heads, mask);
        probe::observe(&self.to_out[0], &out);
        self.to_out[0].forward(out)
    }
}

/// softmax(Q K^T / sqrt(d) + mask) V over `heads` heads.
/// q: [B, N, H*d], k and v: [B, M, H*d], mask: additive [N, M] -> [B, N, H*d]
///
/// Without a mask and outside autodiff this is burn's fused `attention` (on flex: per-head
/// score tiles that stay in cache instead of a `[B, H, N, M]` tensor). Under autodiff burn's
/// fused op falls back to a composition with more passes than ours, so training keeps the
/// explicit form, with the scale applied to Q (`[B, H, N, d]`) rather than to the larger scores
/// when M >= d.
pub fn multi_head_attention(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    heads: usize,
    mask: Option<Tensor<2>>,
) -> Tensor<3> {
    let [b, n, inner] = q.dims();
    let m = k.dims()[1];
    let d = inner / heads;
    let split = |t: Tensor<3>, len: usize| t.reshape([b, len, heads, d]).swap_dims(1, 2);
    let (q, k, v) = (split(q, n), split(k, m), split(v, m));
    let scale = (d as f64).powf(-0.5);
    let out = match mask {
        None if !q.device().is_autodiff() => {
            let options = AttentionModuleOptions {
                scale: Some(scale),
                ..Default::default()
            };
            attention(q, k, v, None, None, options)
        }
        mask => {
            // Batch slices whose scores stay under SCORE_CHUNK elements (diffusers' "sliced
            // attention"): rows are independent, so the result is the same, and buffers this
            // size are recycled by the allocator instead of being mapped and zero-filled afresh
            // for each of the softmax's passes (see docs/design/performance.md).
            let per_item = heads * n * m;
            let items = (SCORE_CHUNK / per_item).max(1);
            if items >= b {
                scores_softmax_v(q, k, v, scale, m >= d, mask)
            } else {
                let outs = q
                    .split(items, 0)
                    .into_iter()
                    .zip(k.split(items, 0))
                    .zip(v.split(items, 0))
                    .map(|((q, k), v)| scores_softmax_v(q, k, v, scale, m >= d, mask.clone()))
                    .collect();
                Tensor::cat(outs, 0)
            }
        }
    };
    out.swap_dims(1, 2).reshape([b, n, inner])
}

/// Largest `[b, H, N, M]` score tensor the differentiable attention builds at once (4 MiB of f32).
const SCORE_CHUNK: usize = 1 << 20;

/// softmax(Q K^T * scale + mask) V on split heads; the scale goes on Q when `scale_q` (cheaper
/// when M >= d). q: [b, H, N, d], k and v: [b, H, M, d], mask: additive [N, M] -> [b, H, N, d]
fn scores_softmax_v(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    scale: f64,
    scale_q: bool,
    mask: Option<Tensor<2>>,
) -> Tensor<4> {
    let mut scores = if scale_q {
        (q * scale).matmul(k.swap_dims(2, 3))
    } else {
        q.matmul(k.swap_dims(2, 3)) * scale
    };
    if let Some(mask) = mask {
        scores = scores + mask.unsqueeze_dims::<4>(&[0, 1]);
    }
    softmax(scores, 3).matmul(v)
}

/// GEGLU: `proj` to twice the width, then `hidden * gelu(gate)` (diffusers `ff.net.0`).
#[derive(Module, Debug)]
pub struct GeGlu {
    pub proj: Linear,
}

/// diffusers' `FeedForward` with GEGLU: `net.0` = GEGLU, `net.1` = dropout, `net.2` = Linear.
/// burn names vector elements by index, so `net_0`/`net_2` are renamed to `net.0`/`net.2` when
/// loading and saving (see `weights.rs`).
#[derive(Module, Debug)]
pub struct FeedForward {
    pub net_0: GeGlu,
    pub net_2: Linear,
}

impl FeedForward {
    pub fn new(dim: usize, mult: usize, device: &Device) -> Self {
        let inner = dim * mult;
        Self {
            net_0: GeGlu {
                proj: linear(dim, inner * 2, true, device),
            },
            net_2: linear(inner, dim, true, device),
        }
    }

    /// x: [B, N, dim] -> [B, N, dim]
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        probe::observe(&self.net_0.proj, &x);
        let h = self.net_0.proj.forward(x);
        let width = h.dims()[2] / 2;
        let mut halves = h.split(width, 2);
        let gate = halves.pop().expect("two halves");
        let hidden = halves.pop().expect("two halves");
        let inner = hidden * gelu(gate);
        probe::observe(&self.net_2, &inner);
        self.net_2.forward(inner)
    }
}

/// diffusers' `BasicTransformerBlock` (pre-LayerNorm self-attention, cross-attention, GEGLU).
#[derive(Module, Debug)]
pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(
        dim: usize,
        heads: usize,
        head_dim: usize,
        cross_dim: usize,
        device: &Device,
    ) -> Self {
        Self {
            norm1: layer_norm(dim, 1e-5, device),
            attn1: Attention::new(dim, dim, heads, head_dim, false, device),
            norm2: layer_norm(dim, 1e-5, device),
            attn2: Attention::new(dim, cross_dim, heads, head_dim, false, device),
            norm3: layer_norm(dim, 1e-5, device),
            ff: FeedForward::new(dim, 4, device),
        }
    }

    /// x: [B, N, dim], context: [B, M, cross_dim] -> [B, N, dim]
    pub fn forward(&self, x: Tensor<3>, context: Tensor<3>) -> Tensor<3> {
        let x = self
            .attn1
            .forward(self.norm1.forward(x.clone()), None, None)
            + x;
        let x = self
            .attn2
            .forward(self.norm2.forward(x.clone()), Some(context), None)
            + x;
        self.ff.forward(self.norm3.forward(x.clone())) + x
    }
}

/// The input/output projection of a `Transformer2DModel`: a 1x1 convolution (SD 1.x) or a linear
/// layer over channels (SD 2.x, `use_linear_projection = true`).
#[derive(Module, Debug)]
pub enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// diffusers' `Transformer2DModel` on continuous inputs: GroupNorm, `proj_in`, transformer blocks over
/// the H*W tokens, `proj_out`, residual.
#[derive(Module, Debug)]
pub struct Transformer2DModel {
    pub norm: GroupNorm,
    pub proj_in: Projection,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Projection,
}

impl Transformer2DModel {
    pub fn new(
        channels: usize,
        heads: usize,
        layers: usize,
        cross_dim: usize,
        groups: usize,
        use_linear_projection: bool,
        device: &Device,
    ) -> Self {
        let head_dim = channels / heads;
        let proj = || {
            if use_linear_projection {
                Projection::Linear(linear(channels, channels, true, device))
            } else {
                Projection::Conv(conv2d(channels, channels, 1, 1, device))
            }
        };
        Self {
            // diffusers fixes this GroupNorm's eps at 1e-6 regardless of the UNet's norm_eps.
            norm: group_norm(groups, channels, 1e-6, device),
            proj_in: proj(),
            transformer_blocks: (0..layers)
                .map(|_| BasicTransformerBlock::new(channels, heads, head_dim, cross_dim, device))
                .collect(),
            proj_out: proj(),
        }
    }

    /// x: [B, C, H, W], context: [B, M, cross_dim] -> [B, C, H, W]
    pub fn forward(&self, x: Tensor<4>, context: Tensor<3>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let residual = x.clone();
        let x = self.norm.forward(x);
        let tokens = x.reshape([b, c, h * w]).swap_dims(1, 2);
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => conv1x1_tokens(conv, tokens),
            Projection::Linear(lin) => {
                probe::observe(lin, &tokens);
                lin.forward(tokens)
            }
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(tokens, context.clone());
        }
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv1x1_tokens(conv, tokens),
            Projection::Linear(lin) => {
                probe::observe(lin, &tokens);
                lin.forward(tokens)
            }
        };
        out.swap_dims(1, 2).reshape([b, c, h, w]) + residual
    }
}

/// CLIP's `quick_gelu`: x * sigmoid(1.702 x).
pub fn quick_gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.clone() * sigmoid(x * 1.702)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// The batch-sliced attention (taken when the scores exceed SCORE_CHUNK) must equal the
    /// one-shot composition in value and in gradient: rows of a softmax are independent, so
    /// slicing the batch changes nothing but which buffers hold them.
    #[test]
    fn sliced_attention_equals_one_shot_in_value_and_gradient() {
        let device = Device::flex().autodiff();
        // heads * n * m = 2 * 512 * 512 = 2^19 scores per item: two items per slice of 2^20.
        let (b, heads, n, d) = (5, 2, 512, 4);
        let normal =
            |s: [usize; 3]| Tensor::<3>::random(s, Distribution::Normal(0.0, 1.0), &device);
        let (q, k, v, r) = (
            normal([b, n, heads * d]),
            normal([b, n, heads * d]),
            normal([b, n, heads * d]),
            normal([b, n, heads * d]),
        );
        assert!(
            heads * n * n * b > SCORE_CHUNK,
            "the test must take the sliced path"
        );
        let run = |sliced: bool| {
            let (q, k, v) = (
                q.clone().require_grad(),
                k.clone().require_grad(),
                v.clone().require_grad(),
            );
            let out = if sliced {
                multi_head_attention(q.clone(), k.clone(), v.clone(), heads, None)
            } else {
                let split = |t: Tensor<3>| t.reshape([b, n, heads, d]).swap_dims(1, 2);
                let scale = (d as f64).powf(-0.5);
                scores_softmax_v(
                    split(q.clone()),
                    split(k.clone()),
                    split(v.clone()),
                    scale,
                    true,
                    None,
                )
                .swap_dims(1, 2)
                .reshape([b, n, heads * d])
            };
            let grads = (out.clone() * r.clone()).sum().backward();
            let g = [&q, &k, &v].map(|t| t.grad(&grads).expect("gradient"));
            (out.inner(), g)
        };
        let (o1, g1) = run(true);
        let (o2, g2) = run(false);
        let max_abs = |t: Tensor<3>| t.abs().max().into_scalar::<f32>();
        assert!(max_abs(o1 - o2) <= 1e-6);
        for (a, b) in g1.into_iter().zip(g2) {
            let scale = max_abs(b.clone());
            assert!(max_abs(a - b) <= 1e-5 * scale);
        }
    }
}
