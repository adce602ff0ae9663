//! `tiller bench --ops`: where the UNet's time goes, per layer type, in forward and in backward.
//!
//! The model is walked exactly as `UNet2DConditionModel::forward` walks it, calling the same layer
//! methods, and every call is timed on its own. flex is an eager backend, so the time a call takes
//! to return is its cost. Three walks are made:
//!
//! - **inference forward**: plain device, as sampling runs;
//! - **autodiff forward** and **backward**: autodiff device. Each call's inputs are detached and
//!   marked as requiring gradients, the call runs (its forward time, bookkeeping included), then
//!   the sum of its output is differentiated and that backward pass is timed. The walk continues
//!   from the detached output, so the graph never spans more than one call. Weight gradients are
//!   computed as in training. The backward time includes the gradient of the `sum`, a broadcast of
//!   ones the size of the call's output; [`run`] measures it and prints it.
//!
//! The walk's output is checked against `model.forward`, so a walk that drifts from the model fails
//! instead of reporting wrong numbers. Sums over calls are compared with whole-model timings to
//! show what the per-call view leaves out (allocator reuse, the graph traversal of one big backward).

use anyhow::{Result, ensure};
use burn::nn::conv::Conv2d;
use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor};
use std::collections::BTreeMap;
use std::time::Instant;
use tiller_diffusion::models::layers::{
    Attention, BasicTransformerBlock, FeedForward, Projection, ResnetBlock2D, Transformer2DModel,
    conv1x1, conv1x1_tokens, multi_head_attention,
};
use tiller_diffusion::models::unet::{UNet2DConditionModel, timestep_embedding};

/// The layer types the table reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Conv3x3,
    Conv3x3Stride2,
    Conv1x1,
    GroupNorm,
    Silu,
    Linear,
    LayerNorm,
    /// softmax(Q K^T / sqrt(d)) V with the head split and merge (`multi_head_attention`).
    AttentionCore,
    /// GEGLU's split, gelu and product (its two Linears are `Linear`).
    Geglu,
    /// Nearest-neighbour x2 upsampling.
    Interpolate,
    /// Skip-connection concatenation.
    Cat,
    /// Residual adds and the time-embedding broadcast add.
    Add,
    /// [B, C, H, W] <-> [B, H*W, C] around the transformers.
    Permute,
    /// Sinusoidal projection + the two Linears of `time_embedding` (once per forward).
    TimeEmbedding,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Conv3x3 => "conv2d 3x3",
            Kind::Conv3x3Stride2 => "conv2d 3x3 stride 2",
            Kind::Conv1x1 => "conv2d 1x1 (as matmul)",
            Kind::GroupNorm => "group norm",
            Kind::Silu => "silu",
            Kind::Linear => "linear",
            Kind::LayerNorm => "layer norm",
            Kind::AttentionCore => "attention core (QK^T, softmax, PV)",
            Kind::Geglu => "geglu (split, gelu, mul)",
            Kind::Interpolate => "interpolate nearest x2",
            Kind::Cat => "cat (skips)",
            Kind::Add => "add (residual, temb)",
            Kind::Permute => "permute NCHW <-> tokens",
            Kind::TimeEmbedding => "time embedding",
        }
    }
}

/// Inputs of one timed call: a tensor or a tuple of tensors.
trait Inputs {
    /// Detaches and marks as requiring gradients (autodiff walk only).
    fn prep(self) -> Self;
    fn describe(&self) -> String;
}

impl<const D: usize> Inputs for Tensor<D> {
    fn prep(self) -> Self {
        self.detach().require_grad()
    }
    fn describe(&self) -> String {
        format!("{:?}", self.dims())
    }
}

impl<A: Inputs, B: Inputs> Inputs for (A, B) {
    fn prep(self) -> Self {
        (self.0.prep(), self.1.prep())
    }
    fn describe(&self) -> String {
        format!("{} {}", self.0.describe(), self.1.describe())
    }
}

impl<A: Inputs, B: Inputs, C: Inputs> Inputs for (A, B, C) {
    fn prep(self) -> Self {
        (self.0.prep(), self.1.prep(), self.2.prep())
    }
    fn describe(&self) -> String {
        format!(
            "{} {} {}",
            self.0.describe(),
            self.1.describe(),
            self.2.describe()
        )
    }
}

/// One call site of the walk; the walk visits the same sites in the same order every time.
struct Site {
    kind: Kind,
    shape: String,
    fwd: Vec<f64>,
    fwd_ad: Vec<f64>,
    bwd: Vec<f64>,
}

struct Profiler {
    device: Device,
    autodiff: bool,
    cursor: usize,
    sites: Vec<Site>,
}

impl Profiler {
    fn op<I: Inputs, const E: usize>(
        &mut self,
        kind: Kind,
        inputs: I,
        f: impl FnOnce(I) -> Tensor<E>,
    ) -> Tensor<E> {
        let shape = inputs.describe();
        let inputs = if self.autodiff { inputs.prep() } else { inputs };
        let _ = self.device.sync();
        let t0 = Instant::now();
        let out = f(inputs);
        let _ = self.device.sync();
        let fwd = t0.elapsed().as_secs_f64();
        let (out, bwd) = if self.autodiff {
            let loss = out.clone().sum();
            let t1 = Instant::now();
            let grads = loss.backward();
            let _ = self.device.sync();
            let bwd = t1.elapsed().as_secs_f64();
            drop(grads);
            (out.detach(), bwd)
        } else {
            (out, 0.0)
        };
        if self.cursor == self.sites.len() {
            self.sites.push(Site {
                kind,
                shape,
                fwd: Vec::new(),
                fwd_ad: Vec::new(),
                bwd: Vec::new(),
            });
        }
        let site = &mut self.sites[self.cursor];
        assert_eq!(site.kind, kind, "the walk visits the same sites every time");
        if self.autodiff {
            site.fwd_ad.push(fwd);
            site.bwd.push(bwd);
        } else {
            site.fwd.push(fwd);
        }
        self.cursor += 1;
        out
    }

    fn conv(&mut self, conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
        let kind = match (conv.kernel_size, conv.stride) {
            ([1, 1], _) => Kind::Conv1x1,
            (_, [1, 1]) => Kind::Conv3x3,
            _ => Kind::Conv3x3Stride2,
        };
        let out = self.op(kind, x, |x| conv.forward(x));
        self.label_weight(conv);
        out
    }

    /// `layers::conv1x1`: a 1x1 convolution as a matmul (NCHW in and out).
    fn conv1x1(&mut self, conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
        let out = self.op(Kind::Conv1x1, x, |x| conv1x1(conv, x));
        self.label_weight(conv);
        out
    }

    /// Appends the weight dims to the last site's shape (once).
    fn label_weight(&mut self, conv: &Conv2d) {
        let w = conv.weight.val().dims();
        let site = &mut self.sites[self.cursor - 1];
        if !site.shape.contains('|') {
            site.shape = format!("{} | {w:?}", site.shape);
        }
    }

    fn resnet(&mut self, r: &ResnetBlock2D, x: Tensor<4>, temb: Tensor<2>) -> Tensor<4> {
        let h = self.op(Kind::GroupNorm, x.clone(), |x| r.norm1.forward(x));
        let h = self.op(Kind::Silu, h, silu);
        let h = self.conv(&r.conv1, h);
        let t = self.op(Kind::Silu, temb, silu);
        let proj = r
            .time_emb_proj
            .as_ref()
            .expect("a UNet resnet has a time projection");
        let t = self.op(Kind::Linear, t, |t| proj.forward(t));
        let h = self.op(Kind::Add, (h, t), |(h, t)| {
            h + t.unsqueeze_dims::<4>(&[2, 3])
        });
        let h = self.op(Kind::GroupNorm, h, |h| r.norm2.forward(h));
        let h = self.op(Kind::Silu, h, silu);
        let h = self.conv(&r.conv2, h);
        let skip = match &r.conv_shortcut {
            Some(c) => self.conv1x1(c, x),
            None => x,
        };
        let out = self.op(Kind::Add, (skip, h), |(s, h)| s + h);
        if r.output_scale_factor == 1.0 {
            out
        } else {
            out / r.output_scale_factor
        }
    }

    fn attention(&mut self, a: &Attention, x: Tensor<3>, ctx: Option<Tensor<3>>) -> Tensor<3> {
        let ctx = ctx.unwrap_or_else(|| x.clone());
        let q = self.op(Kind::Linear, x, |x| a.to_q.forward(x));
        let k = self.op(Kind::Linear, ctx.clone(), |c| a.to_k.forward(c));
        let v = self.op(Kind::Linear, ctx, |c| a.to_v.forward(c));
        let heads = a.heads;
        let o = self.op(Kind::AttentionCore, (q, k, v), |(q, k, v)| {
            multi_head_attention(q, k, v, heads, None)
        });
        self.op(Kind::Linear, o, |o| a.to_out[0].forward(o))
    }

    fn feed_forward(&mut self, ff: &FeedForward, x: Tensor<3>) -> Tensor<3> {
        let h = self.op(Kind::Linear, x, |x| ff.net_0.proj.forward(x));
        let h = self.op(Kind::Geglu, h, |h| {
            let width = h.dims()[2] / 2;
            let mut halves = h.split(width, 2);
            let gate = halves.pop().expect("two halves");
            let hidden = halves.pop().expect("two halves");
            hidden * burn::tensor::activation::gelu(gate)
        });
        self.op(Kind::Linear, h, |h| ff.net_2.forward(h))
    }

    fn block(&mut self, b: &BasicTransformerBlock, x: Tensor<3>, ctx: Tensor<3>) -> Tensor<3> {
        let n = self.op(Kind::LayerNorm, x.clone(), |x| b.norm1.forward(x));
        let a = self.attention(&b.attn1, n, None);
        let x = self.op(Kind::Add, (a, x), |(a, x)| a + x);
        let n = self.op(Kind::LayerNorm, x.clone(), |x| b.norm2.forward(x));
        let a = self.attention(&b.attn2, n, Some(ctx));
        let x = self.op(Kind::Add, (a, x), |(a, x)| a + x);
        let n = self.op(Kind::LayerNorm, x.clone(), |x| b.norm3.forward(x));
        let f = self.feed_forward(&b.ff, n);
        self.op(Kind::Add, (f, x), |(f, x)| f + x)
    }

    fn transformer(&mut self, t: &Transformer2DModel, x: Tensor<4>, ctx: Tensor<3>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let residual = x.clone();
        let x = self.op(Kind::GroupNorm, x, |x| t.norm.forward(x));
        let x = self.op(Kind::Permute, x, |x| {
            x.reshape([b, c, h * w]).swap_dims(1, 2)
        });
        let mut tokens = match &t.proj_in {
            Projection::Conv(conv) => {
                let out = self.op(Kind::Conv1x1, x, |x| conv1x1_tokens(conv, x));
                self.label_weight(conv);
                out
            }
            Projection::Linear(lin) => self.op(Kind::Linear, x, |x| lin.forward(x)),
        };
        for block in &t.transformer_blocks {
            tokens = self.block(block, tokens, ctx.clone());
        }
        let out = match &t.proj_out {
            Projection::Conv(conv) => {
                let out = self.op(Kind::Conv1x1, tokens, |x| conv1x1_tokens(conv, x));
                self.label_weight(conv);
                out
            }
            Projection::Linear(lin) => self.op(Kind::Linear, tokens, |x| lin.forward(x)),
        };
        let out = self.op(Kind::Permute, out, |x| {
            x.swap_dims(1, 2).reshape([b, c, h, w])
        });
        self.op(Kind::Add, (out, residual), |(o, r)| o + r)
    }

    /// Mirrors `UNet2DConditionModel::forward`.
    fn unet(
        &mut self,
        m: &UNet2DConditionModel,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        ehs: Tensor<3>,
    ) -> Tensor<4> {
        let sample = if m.center_input_sample {
            sample * 2.0 - 1.0
        } else {
            sample
        };
        let temb = self.op(Kind::TimeEmbedding, timesteps, |t| {
            let t = timestep_embedding(t, m.time_proj_dim, m.flip_sin_to_cos, m.freq_shift);
            m.time_embedding
                .linear_2
                .forward(silu(m.time_embedding.linear_1.forward(t)))
        });
        let mut h = self.conv(&m.conv_in, sample);
        let mut skips = vec![h.clone()];
        for block in &m.down_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                h = self.resnet(resnet, h, temb.clone());
                if let Some(attn) = block.attentions.get(j) {
                    h = self.transformer(attn, h, ehs.clone());
                }
                skips.push(h.clone());
            }
            for down in &block.downsamplers {
                h = self.conv(&down.conv, h);
                skips.push(h.clone());
            }
        }
        h = self.resnet(&m.mid_block.resnets[0], h, temb.clone());
        for (attn, resnet) in m.mid_block.attentions.iter().zip(&m.mid_block.resnets[1..]) {
            h = self.transformer(attn, h, ehs.clone());
            h = self.resnet(resnet, h, temb.clone());
        }
        for block in &m.up_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().expect("one skip per up-block resnet");
                let x = self.op(Kind::Cat, (h, skip), |(h, s)| Tensor::cat(vec![h, s], 1));
                h = self.resnet(resnet, x, temb.clone());
                if let Some(attn) = block.attentions.get(j) {
                    h = self.transformer(attn, h, ehs.clone());
                }
            }
            for up in &block.upsamplers {
                let [_, _, sh, sw] = skips.last().expect("skips remain").dims();
                // `Upsample2D::forward` is interpolate then conv; timed apart.
                let x = self.op(Kind::Interpolate, h, |h| {
                    burn::tensor::module::interpolate(
                        h,
                        burn::tensor::ops::InterpolateOptions::new(
                            burn::tensor::ops::InterpolateMode::Nearest,
                        )
                        .with_output_size([sh, sw]),
                    )
                });
                h = self.conv(&up.conv, x);
            }
        }
        let h = self.op(Kind::GroupNorm, h, |h| m.conv_norm_out.forward(h));
        let h = self.op(Kind::Silu, h, silu);
        self.conv(&m.conv_out, h)
    }
}

/// burn's fused `attention` against Tiller's composed `multi_head_attention` on one self-attention
/// shape, on the autodiff device: output and input-gradient agreement, and fwd+bwd time of each.
/// (Under autodiff burn 0.22.1 runs `attention_fallback`, a composition with a NaN-safe softmax.)
fn attention_check(device: &Device, b: usize, n: usize, heads: usize, d: usize, reps: usize) {
    use burn::tensor::Distribution;
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    let shape = [b, n, heads * d];
    let q = Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), device);
    let k = Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), device);
    let v = Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), device);
    let r = Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), device);
    let run = |fused: bool| {
        let (q, k, v) = (
            q.clone().require_grad(),
            k.clone().require_grad(),
            v.clone().require_grad(),
        );
        let t0 = Instant::now();
        let out = if fused {
            let split = |t: Tensor<3>| t.reshape([b, n, heads, d]).swap_dims(1, 2);
            attention(
                split(q.clone()),
                split(k.clone()),
                split(v.clone()),
                None,
                None,
                AttentionModuleOptions::default(),
            )
            .swap_dims(1, 2)
            .reshape(shape)
        } else {
            multi_head_attention(q.clone(), k.clone(), v.clone(), heads, None)
        };
        let grads = (out.clone() * r.clone()).sum().backward();
        let _ = device.sync();
        let secs = t0.elapsed().as_secs_f64();
        let g: Vec<Tensor<3>> = [&q, &k, &v]
            .iter()
            .map(|t| t.grad(&grads).expect("input gradient"))
            .collect();
        (out.inner(), g, secs)
    };
    let rel = |a: Tensor<3>, b: Tensor<3>| {
        let scale = b.clone().abs().max().into_scalar::<f32>() as f64;
        (a - b).abs().max().into_scalar::<f32>() as f64 / scale.max(1e-30)
    };
    let (mut tf, mut tc) = (Vec::new(), Vec::new());
    let mut worst = (0.0f64, 0.0f64);
    for _ in 0..=reps {
        let (of, gf, sf) = run(true);
        let (oc, gc, sc) = run(false);
        tf.push(sf);
        tc.push(sc);
        worst.0 = worst.0.max(rel(of, oc));
        for (a, b) in gf.into_iter().zip(gc) {
            worst.1 = worst.1.max(rel(a, b));
        }
    }
    // Inference: the same two formulations without a graph.
    let plain = device.clone().inner();
    let (pq, pk, pv) = (
        Tensor::<3>::from_data(q.to_data(), &plain),
        Tensor::<3>::from_data(k.to_data(), &plain),
        Tensor::<3>::from_data(v.to_data(), &plain),
    );
    let time_plain = |f: &dyn Fn() -> Tensor<3>| {
        let mut t = Vec::new();
        for _ in 0..=reps {
            let t0 = Instant::now();
            let _ = f();
            let _ = plain.sync();
            t.push(t0.elapsed().as_secs_f64());
        }
        median(&t[1..]) * 1e3
    };
    let split = |t: Tensor<3>| t.reshape([b, n, heads, d]).swap_dims(1, 2);
    let fused_ms =
        time_plain(&|| multi_head_attention(pq.clone(), pk.clone(), pv.clone(), heads, None));
    let composed_ms = time_plain(&|| {
        let scores =
            (split(pq.clone()) * (d as f64).powf(-0.5)).matmul(split(pk.clone()).swap_dims(2, 3));
        burn::tensor::activation::softmax(scores, 3)
            .matmul(split(pv.clone()))
            .swap_dims(1, 2)
            .reshape(shape)
    });
    let scores = Tensor::<4>::random([b, heads, n, n], Distribution::Normal(0.0, 1.0), &plain);
    let softmax_ms = time_plain(&|| {
        burn::tensor::activation::softmax(scores.clone(), 3).reshape([b * heads, n, n])
    });
    let exp_ms = time_plain(&|| scores.clone().exp().reshape([b * heads, n, n]));
    println!(
        "\nattention [B={b}, N={n}, heads={heads}, d={d}] inference: burn fused `attention` \
         {fused_ms:.2} ms, composed (matmul, softmax, matmul) {composed_ms:.2} ms; on the \
         [{b}, {heads}, {n}, {n}] scores alone: softmax {softmax_ms:.2} ms, exp {exp_ms:.2} ms"
    );
    println!(
        "attention [B={b}, N={n}, heads={heads}, d={d}] on autodiff: burn `attention` fwd+bwd {:.2} ms, \
         Tiller's composed {:.2} ms; max relative difference: output {:.1e}, dQ/dK/dV {:.1e}",
        median(&tf[1..]) * 1e3,
        median(&tc[1..]) * 1e3,
        worst.0,
        worst.1
    );
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite times"));
    v[v.len() / 2]
}

/// Whole-model timings the per-call sums are compared with (seconds, medians).
pub struct Whole {
    pub forward: f64,
    pub train_forward: f64,
    pub train_backward: f64,
}

/// Runs the three walks `reps` times each (after one warm-up) and prints the per-type table and
/// the convolution shapes.
pub fn run(
    config_name: &str,
    plain: (&UNet2DConditionModel, Tensor<4>, Tensor<1>, Tensor<3>),
    autodiff: (&UNet2DConditionModel, Tensor<4>, Tensor<1>, Tensor<3>),
    reps: usize,
    whole: &Whole,
) -> Result<()> {
    let (model, x, t, ctx) = plain;
    let device = x.device();
    let mut prof = Profiler {
        device: device.clone(),
        autodiff: false,
        cursor: 0,
        sites: Vec::new(),
    };
    let expected = model.forward(x.clone(), t.clone(), ctx.clone());
    for rep in 0..=reps {
        prof.cursor = 0;
        let out = prof.unet(model, x.clone(), t.clone(), ctx.clone());
        if rep == 0 {
            let diff = (out - expected.clone()).abs().max().into_scalar::<f32>() as f64;
            ensure!(
                diff <= 1e-5,
                "the profiling walk differs from UNet2DConditionModel::forward by {diff}: \
                 update crates/tiller-cli/src/bench/ops.rs to follow the model"
            );
            for s in &mut prof.sites {
                s.fwd.clear();
            }
        }
    }
    let (ad_model, ax, at, actx) = autodiff;
    // Inference takes burn's fused attention, autodiff the composed form: compare the two
    // (same weights, same inputs) to show the formulations agree.
    let composed = ad_model
        .forward(ax.clone(), at.clone(), actx.clone())
        .inner();
    let composed = Tensor::<4>::from_data(composed.to_data(), &device);
    let scale = composed.clone().abs().max().into_scalar::<f32>() as f64;
    let fused_vs_composed = (expected.clone() - composed)
        .abs()
        .max()
        .into_scalar::<f32>() as f64
        / scale;
    prof.device = ax.device();
    prof.autodiff = true;
    for rep in 0..=reps {
        prof.cursor = 0;
        let _ = prof.unet(ad_model, ax.clone(), at.clone(), actx.clone());
        if rep == 0 {
            for s in &mut prof.sites {
                s.fwd_ad.clear();
                s.bwd.clear();
            }
        }
    }

    // The `sum` each backward starts from costs a broadcast the size of the output; measure it
    // on the largest activation so it can be read against the backward column.
    let probe = ax.device();
    let big = Tensor::<4>::zeros([x.dims()[0], 32, 32, 32], &probe);
    let mut probe_times = Vec::new();
    for _ in 0..=reps {
        let y = big.clone().detach().require_grad();
        let t0 = Instant::now();
        let g = y.sum().backward();
        let _ = probe.sync();
        probe_times.push(t0.elapsed().as_secs_f64());
        drop(g);
    }

    let mut by_kind: BTreeMap<Kind, (usize, f64, f64, f64)> = BTreeMap::new();
    let mut convs: BTreeMap<(Kind, String), (usize, f64, f64, f64)> = BTreeMap::new();
    for s in &prof.sites {
        let (f, fa, b) = (median(&s.fwd), median(&s.fwd_ad), median(&s.bwd));
        let e = by_kind.entry(s.kind).or_default();
        *e = (e.0 + 1, e.1 + f, e.2 + fa, e.3 + b);
        if matches!(s.kind, Kind::Conv3x3 | Kind::Conv3x3Stride2 | Kind::Conv1x1) {
            let e = convs.entry((s.kind, s.shape.clone())).or_default();
            *e = (e.0 + 1, e.1 + f, e.2 + fa, e.3 + b);
        }
    }
    let tot = by_kind.values().fold((0usize, 0.0, 0.0, 0.0), |a, e| {
        (a.0 + e.0, a.1 + e.1, a.2 + e.2, a.3 + e.3)
    });
    let mut rows: Vec<_> = by_kind.into_iter().collect();
    rows.sort_by(|a, b| {
        (b.1.1 + b.1.3)
            .partial_cmp(&(a.1.1 + a.1.3))
            .expect("finite")
    });
    let ms = |s: f64| s * 1e3;
    let pct = |a: f64, b: f64| 100.0 * a / b;

    println!(
        "\nper-op breakdown, {config_name}, batch {}: medians of {reps} walks, each call timed alone",
        x.dims()[0]
    );
    println!(
        "| op type | calls | fwd ms (inference) | fwd % | fwd ms (autodiff) | bwd ms | bwd % | fwd+bwd ms (autodiff) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (kind, (n, f, fa, b)) in &rows {
        println!(
            "| {} | {n} | {:.2} | {:.1} | {:.2} | {:.2} | {:.1} | {:.2} |",
            kind.name(),
            ms(*f),
            pct(*f, tot.1),
            ms(*fa),
            ms(*b),
            pct(*b, tot.3),
            ms(fa + b)
        );
    }
    println!(
        "| **sum of calls** | {} | {:.2} | 100 | {:.2} | {:.2} | 100 | {:.2} |",
        tot.0,
        ms(tot.1),
        ms(tot.2),
        ms(tot.3),
        ms(tot.2 + tot.3)
    );
    println!(
        "| whole model (one forward / one graph) | | {:.2} | | {:.2} | {:.2} | | {:.2} |",
        ms(whole.forward),
        ms(whole.train_forward),
        ms(whole.train_backward),
        ms(whole.train_forward + whole.train_backward)
    );
    println!(
        "\nbackward of `sum` alone on a [{}, 32, 32, 32] output (included in every bwd figure above, scaled by size): {:.3} ms",
        x.dims()[0],
        ms(median(&probe_times[1..]))
    );

    println!(
        "UNet output, inference path (fused attention) vs autodiff path (composed): max |diff| / max |out| = {fused_vs_composed:.1e}"
    );
    attention_check(&probe, x.dims()[0], 256, 8, 8, reps);

    println!("\nconvolutions by shape (input dims; weight [out, in, k, k]):");
    println!("| conv | input | weight | calls | fwd ms (inference) | fwd ms (autodiff) | bwd ms |");
    println!("|---|---|---|---|---|---|---|");
    let mut conv_rows: Vec<_> = convs.into_iter().collect();
    conv_rows.sort_by(|a, b| {
        (b.1.1 + b.1.3)
            .partial_cmp(&(a.1.1 + a.1.3))
            .expect("finite")
    });
    for ((kind, shape), (n, f, fa, b)) in conv_rows {
        println!(
            "| {} | {shape} | {n} | {:.2} | {:.2} | {:.2} |",
            kind.name(),
            ms(f),
            ms(fa),
            ms(b)
        );
    }
    Ok(())
}
