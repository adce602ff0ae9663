//! The reward network: an image encoder and a CLIP-style text encoder (as in ImageReward and
//! PickScore, which fine-tune BLIP/CLIP towers), joined by a small MLP into an **interpretable
//! factor head**: one logit f_k per named factor (`σ(f_k)` is the probability that the factor is
//! fine), and the reward `r = Σ_k softplus(w_k) f_k + b`. The weights are non-negative, so each
//! factor's contribution `softplus(w_k) f_k` to a score is readable off the model, and the factor
//! logits can be trained directly from reasons ("wrong count", "forbidden mark", ...) when they
//! are given. Combining logits rather than probabilities keeps the reward unbounded, so
//! Bradley–Terry gradients do not vanish when a factor saturates.
//!
//! The image encoder (FiLM-conditioned on the prompt) is a four-layer strided CNN ending in a 4x4
//! adaptive average pool, which keeps coarse positions (needed for "left of"/"above") and accepts
//! 32x32 and 64x64 images alike. With `cross_attention`, the last level's positions also attend
//! over the prompt's token states before pooling.

use burn::module::{Module, Param};
use burn::nn::conv::Conv2d;
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, Linear};
use burn::tensor::activation::{silu, softplus};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use tiller_core::{Error, Result};
use tiller_diffusion::models::clip::{ClipTextConfig, ClipTextModel};
use tiller_diffusion::models::layers::{conv1x1, conv2d, linear, multi_head_attention};

/// The factors of the testbed's gold evaluator, in the head's order: the prompt-alignment factors,
/// the absence of the forbidden mark, and the four aesthetic components.
pub const FACTORS: [&str; 10] = [
    "presence",
    "count",
    "color",
    "position",
    "binding",
    "no_mark",
    "border",
    "clean_background",
    "balance",
    "crisp_edges",
];

/// The network's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardNetConfig {
    /// The text tower (a transformers `CLIPTextConfig`).
    pub text_encoder: ClipTextConfig,
    /// Channels of the first image convolution (then 2x, 2x, 4x).
    #[serde(default = "default_channels")]
    pub image_channels: usize,
    /// Width of the joint MLP.
    #[serde(default = "default_hidden")]
    pub hidden: usize,
    /// Names of the factor head's outputs.
    #[serde(default = "default_factors")]
    pub factors: Vec<String>,
    /// Add a cross-attention layer at the last (quarter-resolution) image level, each position
    /// attending over the prompt's token states, as the UNet conditions on text; without it the
    /// image tower sees the prompt only through FiLM of the pooled state.
    #[serde(default)]
    pub cross_attention: bool,
    /// How the prompt is summarised for FiLM and the joint MLP: `eos`, the end-of-text token's
    /// state (CLIP's pooler output), or `mean`, the mean of the states up to and including it.
    #[serde(default)]
    pub text_pool: TextPool,
    /// A region head: a 1x1 convolution of the quarter-resolution (prompt-conditioned) features
    /// giving one logit per factor and cell, the probability that the cell shows that factor's
    /// problem; trained from region marks as RichHF (Liang et al. 2024) trains its heatmaps, so
    /// that the image tower learns where a flaw is and not only that there is one.
    #[serde(default)]
    pub region_head: bool,
    /// Add the towers' caption match to the reward: `exp(s) · cos(image, prompt)` with the image
    /// embedded without the prompt (FiLM off) and a learned logit scale `s` starting at
    /// ln(1/0.07), CLIP's; this is PickScore's whole reward (Kirstain et al. 2023), here beside
    /// the factor head. Useful with contrastively pretrained towers (`init`), whose caption
    /// match already ranks images of one prompt.
    #[serde(default)]
    pub caption_match: bool,
}

/// The prompt summary the reward network conditions on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TextPool {
    /// CLIP's pooled output: the end-of-text token's final state.
    #[default]
    Eos,
    /// The mean of the final states of the prompt's tokens (start token to end-of-text), which
    /// varies more additively with the words than the single end-of-text state.
    Mean,
}

fn default_channels() -> usize {
    16
}
fn default_hidden() -> usize {
    128
}
fn default_factors() -> Vec<String> {
    FACTORS.iter().map(|s| s.to_string()).collect()
}

impl RewardNetConfig {
    /// Defaults around a given text tower.
    pub fn new(text_encoder: ClipTextConfig) -> Self {
        Self {
            text_encoder,
            image_channels: default_channels(),
            hidden: default_hidden(),
            factors: default_factors(),
            cross_attention: false,
            text_pool: TextPool::Eos,
            region_head: false,
            caption_match: false,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.text_encoder.validate()?;
        if self.image_channels == 0 {
            return Err(Error::config("image_channels", "must be at least 1"));
        }
        if self.hidden == 0 {
            return Err(Error::config("hidden", "must be at least 1"));
        }
        if self.factors.is_empty() {
            return Err(Error::config("factors", "needs at least one factor"));
        }
        Ok(())
    }

    /// A freshly initialised network (weights from the device's generator).
    pub fn init(&self, device: &Device) -> Result<RewardNet> {
        self.validate()?;
        let c = self.image_channels;
        let d = self.text_encoder.hidden_size;
        let h = self.hidden;
        let f = self.factors.len();
        Ok(RewardNet {
            conv1: conv2d(3, c, 3, 1, device),
            conv2: conv2d(c, 2 * c, 3, 2, device),
            conv3: conv2d(2 * c, 2 * c, 3, 1, device),
            conv4: conv2d(2 * c, 4 * c, 3, 2, device),
            pool: AdaptiveAvgPool2dConfig::new([4, 4]).init(),
            film2: linear(d, 4 * c, true, device),
            film4: linear(d, 8 * c, true, device),
            cross: self.cross_attention.then(|| TokenAttention {
                norm: GroupNormConfig::new(1, 4 * c).init(device),
                q: linear(4 * c, 4 * c, false, device),
                k: linear(d, 4 * c, false, device),
                v: linear(d, 4 * c, false, device),
                out: linear(4 * c, 4 * c, true, device),
            }),
            region: self.region_head.then(|| conv2d(4 * c, f, 1, 1, device)),
            image_proj: linear(4 * c * 16, h, true, device),
            text_encoder: self.text_encoder.init(device)?,
            text_pool: self.text_pool,
            text_proj: linear(d, h, true, device),
            joint1: linear(3 * h, h, true, device),
            joint2: linear(h, h, true, device),
            factor_head: linear(h, f, true, device),
            factor_weights: Param::from_tensor(Tensor::zeros([f], device)),
            bias: Param::from_tensor(Tensor::zeros([1], device)),
            cut_first: Param::from_tensor(Tensor::from_floats([-1.5f32], device)),
            cut_gaps: Param::from_tensor(Tensor::zeros([3], device)),
            match_scale: self
                .caption_match
                .then(|| Param::from_tensor(Tensor::from_floats([(1.0f32 / 0.07).ln()], device))),
        })
    }
}

/// What one forward pass gives.
#[derive(Debug, Clone)]
pub struct RewardOutput {
    /// The reward r [B].
    pub reward: Tensor<1>,
    /// Factor logits f [B, F].
    pub factor_logits: Tensor<2>,
    /// With a region head: per-cell factor logits [B, F, H/4, W/4] (a flaw of factor k in the
    /// cell).
    pub region_logits: Option<Tensor<4>>,
}

#[derive(Module, Debug)]
pub struct RewardNet {
    pub conv1: Conv2d,
    pub conv2: Conv2d,
    pub conv3: Conv2d,
    pub conv4: Conv2d,
    pub pool: AdaptiveAvgPool2d,
    /// FiLM (Perez et al. 2018): the pooled text gives a per-channel scale and shift of the
    /// image features after the second and fourth convolutions, so that what the image encoder
    /// looks for depends on the prompt.
    pub film2: Linear,
    pub film4: Linear,
    /// Optional cross-attention of the quarter-resolution features over the prompt's tokens.
    pub cross: Option<TokenAttention>,
    /// Optional per-cell factor logits of the quarter-resolution features (region marks).
    pub region: Option<Conv2d>,
    pub image_proj: Linear,
    pub text_encoder: ClipTextModel,
    /// The prompt summary (not a parameter).
    #[module(skip)]
    pub text_pool: TextPool,
    pub text_proj: Linear,
    pub joint1: Linear,
    pub joint2: Linear,
    pub factor_head: Linear,
    /// Raw combination weights; the reward uses softplus(w) >= 0.
    pub factor_weights: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
    /// The ordinal head's first cut point and the raw gaps to the next ones (softplus > 0 keeps
    /// them ordered).
    pub cut_first: Param<Tensor<1>>,
    pub cut_gaps: Param<Tensor<1>>,
    /// With `caption_match`: the log of the caption match's scale in the reward.
    pub match_scale: Option<Param<Tensor<1>>>,
}

/// A pre-norm residual cross-attention block (4 heads): image positions are the queries, the
/// prompt's token states the keys and values.
#[derive(Module, Debug)]
pub struct TokenAttention {
    pub norm: GroupNorm,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub out: Linear,
}

impl TokenAttention {
    /// `x` [B, C, H, W], `tokens` [B, L, D] -> [B, C, H, W].
    pub fn forward(&self, x: Tensor<4>, tokens: Tensor<3>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let seq = self
            .norm
            .forward(x.clone())
            .reshape([b, c, h * w])
            .swap_dims(1, 2);
        let a = multi_head_attention(
            self.q.forward(seq),
            self.k.forward(tokens.clone()),
            self.v.forward(tokens),
            4,
            None,
        );
        let a = self.out.forward(a).swap_dims(1, 2).reshape([b, c, h, w]);
        x + a
    }
}

impl RewardNet {
    /// The prompt summary [B, D] (`text_pool`) and the token states [B, L, D].
    fn encode_text(&self, ids: &[Vec<i64>], device: &Device) -> Result<(Tensor<2>, Tensor<3>)> {
        let b = ids.len();
        let text = self.text_encoder.forward_ids(ids, device)?;
        let pooled = match self.text_pool {
            TextPool::Eos => text.pooler_output,
            TextPool::Mean => {
                let [_, l, d] = text.last_hidden_state.dims();
                let ends = self.text_encoder.pool_positions(ids);
                let weights: Vec<f32> = ends
                    .iter()
                    .flat_map(|&e| {
                        (0..l).map(move |i| if i <= e { 1.0 / (e + 1) as f32 } else { 0.0 })
                    })
                    .collect();
                let w = Tensor::<3>::from_data(TensorData::new(weights, [b, l, 1]), device);
                (text.last_hidden_state.clone() * w)
                    .sum_dim(1)
                    .reshape([b, d])
            }
        };
        Ok((pooled, text.last_hidden_state))
    }

    /// The four convolutions [B, 4C, H/4, W/4], FiLM-conditioned on `pooled` when given (the
    /// identity without it, as in contrastive pretraining).
    fn image_tower(&self, images: Tensor<4>, pooled: Option<&Tensor<2>>) -> Tensor<4> {
        let film = |layer: &Linear, x: Tensor<4>| match pooled {
            Some(p) => {
                let [b, c, _, _] = x.dims();
                let gb = layer.forward(p.clone());
                let gamma = gb.clone().slice([0..b, 0..c]).reshape([b, c, 1, 1]);
                let beta = gb.slice([0..b, c..2 * c]).reshape([b, c, 1, 1]);
                x.clone() * gamma + x + beta
            }
            None => x,
        };
        let x = silu(self.conv1.forward(images));
        let x = silu(film(&self.film2, self.conv2.forward(x)));
        let x = silu(self.conv3.forward(x));
        silu(film(&self.film4, self.conv4.forward(x)))
    }

    /// The image tower's embedding [B, hidden] without the prompt (FiLM off, no cross-attention):
    /// the image side of contrastive pretraining ([`crate::pretrain`]).
    pub fn image_embedding(&self, images: Tensor<4>) -> Tensor<2> {
        let x = self.pool.forward(self.image_tower(images, None));
        let [b, c, ph, pw] = x.dims();
        self.image_proj.forward(x.reshape([b, c * ph * pw]))
    }

    /// The text tower's embedding [B, hidden]: the text side of contrastive pretraining.
    pub fn text_embedding(&self, ids: &[Vec<i64>], device: &Device) -> Result<Tensor<2>> {
        let (pooled, _) = self.encode_text(ids, device)?;
        Ok(self.text_proj.forward(pooled))
    }

    /// The towers' caption match [B]: the cosine similarity of each image's embedding (FiLM off)
    /// with its own prompt's, the quantity contrastive pretraining trains (CLIPScore, Hessel et
    /// al. 2021, without its rescaling). Part of the reward only with `caption_match`; `reward
    /// eval` reports how well it ranks the annotators' pairs either way.
    pub fn caption_match(&self, images: Tensor<4>, ids: &[Vec<i64>]) -> Result<Tensor<1>> {
        let device = images.device();
        let text = self.text_embedding(ids, &device)?;
        Ok(self.cosine_to(images, text))
    }

    /// The cosine of each image's prompt-free embedding with the matching row of `text` [B, h].
    fn cosine_to(&self, images: Tensor<4>, text: Tensor<2>) -> Tensor<1> {
        let [b, ..] = images.dims();
        let u = crate::pretrain::l2_normalize(self.image_embedding(images));
        let v = crate::pretrain::l2_normalize(text);
        (u * v).sum_dim(1).reshape([b])
    }

    /// This network with `pretrained`'s towers (convolutions, `image_proj`, the text encoder and
    /// `text_proj`) and its own freshly initialised heads; FiLM is zeroed so that the pretrained
    /// image features pass through unchanged until preference training learns a modulation.
    /// The two networks must have the same shape.
    pub fn adopt_towers(mut self, pretrained: &RewardNet) -> Result<Self> {
        let shapes = |n: &RewardNet| {
            (
                n.conv1.weight.val().dims(),
                n.conv4.weight.val().dims(),
                n.image_proj.weight.val().dims(),
                n.text_proj.weight.val().dims(),
            )
        };
        if shapes(&self) != shapes(pretrained) {
            return Err(Error::invalid(format!(
                "the pretrained towers have shapes {:?}, this network {:?} (image_channels and hidden must match)",
                shapes(pretrained),
                shapes(&self)
            )));
        }
        self.conv1 = pretrained.conv1.clone();
        self.conv2 = pretrained.conv2.clone();
        self.conv3 = pretrained.conv3.clone();
        self.conv4 = pretrained.conv4.clone();
        self.image_proj = pretrained.image_proj.clone();
        self.text_encoder = pretrained.text_encoder.clone();
        self.text_proj = pretrained.text_proj.clone();
        self.film2 = zeroed(self.film2);
        self.film4 = zeroed(self.film4);
        Ok(self)
    }

    /// `images` [B, 3, H, W] in [-1, 1], `ids` [B][L] token ids of the prompts.
    pub fn forward(&self, images: Tensor<4>, ids: &[Vec<i64>]) -> Result<RewardOutput> {
        let device = images.device();
        let [b, ..] = images.dims();
        if ids.len() != b {
            return Err(Error::invalid(format!(
                "{b} images but {} prompts",
                ids.len()
            )));
        }
        let (pooled, tokens) = self.encode_text(ids, &device)?;
        let txt = self.text_proj.forward(pooled.clone());
        let matched = self
            .match_scale
            .as_ref()
            .map(|scale| self.cosine_to(images.clone(), txt.clone()) * scale.val().exp());
        let x = self.image_tower(images, Some(&pooled));
        let x = match &self.cross {
            Some(attn) => attn.forward(x, tokens),
            None => x,
        };
        let region_logits = self.region.as_ref().map(|r| conv1x1(r, x.clone()));
        let x = self.pool.forward(x);
        let [_, c, ph, pw] = x.dims();
        let img = self.image_proj.forward(x.reshape([b, c * ph * pw]));
        let joint = Tensor::cat(vec![img.clone(), txt.clone(), img * txt], 1);
        let h = silu(self.joint1.forward(joint));
        let h = silu(self.joint2.forward(h));
        let factor_logits = self.factor_head.forward(h);
        let [_, f] = factor_logits.dims();
        let w = softplus(self.factor_weights.val(), 1.0).reshape([1, f]);
        let mut reward = (factor_logits.clone() * w).sum_dim(1).reshape([b]) + self.bias.val();
        if let Some(m) = matched {
            reward = reward + m;
        }
        Ok(RewardOutput {
            reward,
            factor_logits,
            region_logits,
        })
    }

    /// The ordinal head's ordered cut points θ_1 < θ_2 < θ_3 < θ_4 [4].
    pub fn cuts(&self) -> Tensor<1> {
        let first = self.cut_first.val();
        let gaps = softplus(self.cut_gaps.val(), 1.0).cumsum(0) + first.clone();
        Tensor::cat(vec![first, gaps], 0)
    }

    /// The non-negative weight of each factor in the reward [F].
    pub fn combination_weights(&self) -> Tensor<1> {
        softplus(self.factor_weights.val(), 1.0)
    }
}

/// A linear layer with every weight and bias set to zero.
fn zeroed(mut layer: Linear) -> Linear {
    let w = layer.weight.val();
    layer.weight = Param::from_tensor(w.zeros_like());
    layer.bias = layer.bias.map(|b| Param::from_tensor(b.val().zeros_like()));
    layer
}
