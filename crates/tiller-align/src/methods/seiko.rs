//! SEIKO (Uehara et al., "Feedback Efficient Online Fine-Tuning of Diffusion Models", ICML 2024),
//! as zhaoyl18/SEIKO writes it (`online/online_main.py`, `online/dataset.py::D_explored`,
//! `aesthetic_scorer.py::online_AestheticScorerDiff`, `config/{UCB,Bootstrap,TS,Greedy,
//! Non-adaptive}.py`): the true reward is queried only on batches of fresh samples, a surrogate
//! with an uncertainty bonus is fitted to everything queried so far, and the model is fine-tuned by
//! backpropagating the surrogate through sampling with a KL to the previous round's model.
//!
//! Round `i` (of `query_batches.len()`):
//!
//! ```text
//! 1. x ~ p_i (query_batches[i] batches of the current model's samples); y = r(x)   (true queries)
//! 2. D_i = D_{i-1} + (e(x), y); fit r_hat on D_i (MSE, Adam lr 1e-3, 300 epochs, batch 512)
//!    ucb:       f(x) = r_hat(x) + min(alpha sqrt(phi(x)^T (Cov(phi(D_i)) + lambda I)^-1 phi(x)), clip)
//!    bootstrap: f(x) = max_h r_hat_h(x)   (heads fitted on bootstrap resamples of D_i)
//!    thompson:  f(x) = r_hat(x), fitted with SGLD noise sgld sqrt(lr / batch) on its gradients
//!    none:      f(x) = r_hat(x)   (greedy; one round with every query first: non-adaptive)
//! 3. updates_per_round updates: chains from fresh noise and prompts, gradient of
//!    loss_coeff * mean(|f(x_0) - target|)  (or -f(x_0)) + kl_weight * KL(p_theta || p_i)
//!    through the last K steps
//! ```
//!
//! `phi` is the surrogate's 16-wide penultimate layer; the surrogate is the LAION aesthetic head's
//! shape (`mlp.rs`) on an image embedding: CLIP ViT-L/14 in the reference, on the testbed the
//! pooled, normalised final sample (`mlp::embed`). The query budget is the run's reward queries: a
//! query batch is the loop's scored samples (logged and counted as every method's are) and takes
//! no update; a fine-tuning update queries nothing (the surrogate's mean on its chains is logged as
//! `surrogate_mean`). Defaults are the `aesthetic` configs: rounds of 1024, 2048, 4096 and 8192
//! samples (here batches 1, 2, 4, 8 of `train.batch_size x grad_accum`), 5 epochs of 2 updates per
//! round, UCB alpha 1e-2, lambda 1e-3, clip 10, 4 bootstrap heads, SGLD 1e-5, `kl_weight 0.01`,
//! `loss_coeff 0.01`, the L1 loss to the aesthetic target 10 and lr 1e-3 (the preset's).
//!
//! Readings and deviations: the reference keeps the "best validation" surrogate with
//! `best_model = self.model.state_dict()`, which aliases the live weights, so it ends with the
//! last epoch's weights: so does this (the last 5 % of the data, the newest, is still held out
//! and its MAE logged). Its truncated backprop draws, at every step, whether that step's model
//! output keeps its gradient; here the gradient flows through the last `K` steps with the first
//! differentiated step uniform in [`truncation_min`, `truncation_max`) of the chain (AlignProp's
//! uniform truncation). Tiller's KL is the mean over the differentiated steps (the reference sums
//! it over the chain's 50 steps). The bootstrap heads are fitted one after another with their
//! joint loss's 1/heads scale, which the reference's joint update equals. The surrogate restarts
//! its Adam moments at every fit, as the reference creates a new optimizer.

use crate::batch::{Batch, Collect};
use crate::config::AlignConfig;
use crate::methods::alignprop::{AlignPropConfig, AlignPropLoss, Truncation};
use crate::methods::draft_k::backprop_reward_to;
use crate::methods::mlp::{Adam, Init, Mlp, WIDTHS, embed, host};
use crate::methods::{Fields, MethodSpec};
use crate::{Algorithm, Context, MicroStep, Policy, PolicyModel};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tiller_core::{Error, Result, SeededRng};
use tiller_diffusion::models::weights::{HostTensor, read_safetensors, write_safetensors};
use tiller_engine::checkpoint::{load_module, save_module};
use tiller_reward::{DifferentiableReward, Reward, images_to_tensor};
use tiller_testbed::Image;

/// The surrogate's optimism.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Optimism {
    /// SEIKO-UCB: the linear bonus on the penultimate features.
    Ucb,
    /// SEIKO-Bootstrap: the most optimistic of the bootstrapped heads.
    Bootstrap,
    /// SEIKO-TS: one surrogate fitted with SGLD noise, a posterior draw.
    Thompson,
    /// No bonus: greedy (or, with one round, non-adaptive).
    None,
}

/// `[method.seiko]`: the reference's `config/UCB.py::aesthetic`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SeikoConfig {
    pub optimism: Optimism,
    /// Batches of true-reward queries in each round (`num_samples` [1024, 2048, 4096, 8192] in
    /// batches; non-adaptive: one round with all of them).
    pub query_batches: Vec<usize>,
    /// Fine-tuning updates after each round's queries (`num_epochs 5` x 2 updates an epoch).
    pub updates_per_round: usize,
    /// The UCB bonus's scale, ridge and cap (`osm_alpha 1e-2`, `osm_lambda 1e-3`, `osm_clipping
    /// 10`).
    pub ucb_alpha: f64,
    pub ucb_lambda: f64,
    pub ucb_clip: f64,
    /// Bootstrapped heads (`num_heads 4`).
    pub bootstrap_heads: usize,
    /// Thompson sampling's SGLD base noise (`config/TS.py`: `SGLD 1e-5`).
    pub sgld: f64,
    /// The surrogate's fit: epochs, minibatch, Adam learning rate, held-out fraction
    /// (`train_MLP`: 300, 512, 1e-3, 0.05).
    pub surrogate_epochs: usize,
    pub surrogate_batch: usize,
    pub surrogate_lr: f64,
    pub val_fraction: f64,
    /// The KL to the round's starting model (`train.kl_weight 0.01`).
    pub kl_weight: f64,
    /// What is minimised of the surrogate (`aesthetic_target 10`: the L1 loss to it).
    pub loss: AlignPropLoss,
    pub target: f64,
    /// The loss's scale (`loss_coeff 0.01`).
    pub loss_coeff: f64,
    /// The first differentiated step, uniform in [min, max) of the chain
    /// (`truncated_backprop_minmax (0, 50)` of 50).
    pub truncation_min: f64,
    pub truncation_max: f64,
    /// The embedding's pooling grid (`mlp::embed`).
    pub embed_grid: usize,
}

impl Default for SeikoConfig {
    fn default() -> Self {
        Self {
            optimism: Optimism::Ucb,
            query_batches: vec![1, 2, 4, 8],
            updates_per_round: 10,
            ucb_alpha: 1e-2,
            ucb_lambda: 1e-3,
            ucb_clip: 10.0,
            bootstrap_heads: 4,
            sgld: 1e-5,
            surrogate_epochs: 300,
            surrogate_batch: 512,
            surrogate_lr: 1e-3,
            val_fraction: 0.05,
            kl_weight: 0.01,
            loss: AlignPropLoss::L1ToTarget,
            target: 10.0,
            loss_coeff: 0.01,
            truncation_min: 0.0,
            truncation_max: 1.0,
            embed_grid: 8,
        }
    }
}

impl SeikoConfig {
    /// Where collected batch `b` falls: its round, and whether it is a query batch (and the
    /// round's last). Past the last round the run keeps fine-tuning on the last surrogate.
    fn phase(&self, mut b: u64) -> Phase {
        for (round, &q) in self.query_batches.iter().enumerate() {
            let q = q as u64;
            if b < q {
                return Phase::Query {
                    round,
                    last: b + 1 == q,
                };
            }
            b -= q;
            if b < self.updates_per_round as u64 {
                return Phase::Finetune;
            }
            b -= self.updates_per_round as u64;
        }
        Phase::Finetune
    }

    fn backprop(&self) -> AlignPropConfig {
        AlignPropConfig {
            truncation: Truncation::Uniform,
            min: self.truncation_min,
            max: self.truncation_max,
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Query { round: usize, last: bool },
    Finetune,
}

/// `total` query batches shared out over the rounds in proportion to `weights` (each round at
/// least one; fewer rounds when there are fewer batches than rounds).
pub fn share_batches(weights: &[usize], total: usize) -> Vec<usize> {
    let rounds = weights.len().min(total).max(1);
    let w = &weights[weights.len() - rounds..];
    let sum: usize = w.iter().sum::<usize>().max(1);
    let mut out: Vec<usize> = w.iter().map(|&x| (total * x / sum).max(1)).collect();
    // What rounding left over (or took too much) goes to (or comes from) the last rounds.
    while out.iter().sum::<usize>() < total {
        *out.last_mut().expect("at least one round") += 1;
    }
    while out.iter().sum::<usize>() > total {
        let k = out.iter().rposition(|&x| x > 1).expect("total >= rounds");
        out[k] -= 1;
    }
    out
}

impl MethodSpec for SeikoConfig {
    fn name(&self) -> &'static str {
        "seiko"
    }

    fn paper(&self) -> &'static str {
        "Uehara et al., Feedback Efficient Online Fine-Tuning of Diffusion Models, ICML 2024"
    }

    fn validate(&self, config: &AlignConfig) -> Result<()> {
        let f = Fields("seiko");
        if self.query_batches.is_empty() || self.query_batches.contains(&0) {
            return Err(f.error(
                "query_batches",
                format!(
                    "must list at least one round, each of at least one batch, got {:?}",
                    self.query_batches
                ),
            ));
        }
        f.at_least_one(&[
            ("updates_per_round", self.updates_per_round),
            ("bootstrap_heads", self.bootstrap_heads),
            ("surrogate_epochs", self.surrogate_epochs),
            ("surrogate_batch", self.surrogate_batch),
            ("embed_grid", self.embed_grid),
        ])?;
        f.positive(&[
            ("ucb_alpha", self.ucb_alpha),
            ("ucb_lambda", self.ucb_lambda),
            ("ucb_clip", self.ucb_clip),
            ("surrogate_lr", self.surrogate_lr),
            ("loss_coeff", self.loss_coeff),
        ])?;
        f.non_negative(&[("sgld", self.sgld), ("kl_weight", self.kl_weight)])?;
        if !(0.0..1.0).contains(&self.val_fraction) {
            return Err(f.error(
                "val_fraction",
                format!("must be in [0, 1), got {}", self.val_fraction),
            ));
        }
        if !(self.truncation_min >= 0.0 && self.truncation_min < self.truncation_max)
            || self.truncation_max > 1.0
        {
            return Err(f.error(
                "truncation_min",
                "need 0 <= truncation_min < truncation_max <= 1",
            ));
        }
        // The range must reach a step the chain can start differentiating at (AlignProp's check).
        if let Some(msg) = self.backprop().misses_the_chain(config.sampling.steps) {
            return Err(f.error("truncation_min", msg));
        }
        if self.kl_weight > 0.0 {
            // The KL is between the two models' step densities.
            f.stochastic_steps(config)?;
        }
        Ok(())
    }

    fn build<M: PolicyModel>(&self) -> Box<dyn Algorithm<M>> {
        Box::new(Seiko::<M>::new(self.clone()))
    }

    /// SEIKO's own KL (`method.seiko.kl_weight`) is to the round's model, not the base.
    fn takes_kl(&self) -> bool {
        false
    }

    /// The reference's baselines: greedy (no bonus) and non-adaptive (no bonus, every query in
    /// one first round, then as many updates as all the rounds take).
    fn variants(&self, config: &AlignConfig, budget: u64) -> Vec<(&'static str, Vec<String>)> {
        let none = "method.seiko.optimism=\"none\"".to_string();
        // The non-adaptive baseline spends every query in one round, then fine-tunes for as many
        // updates as the adaptive run takes over all its rounds at this budget.
        let (_, updates) = self.size_to_budget(config, budget);
        vec![
            ("greedy", vec![none.clone()]),
            (
                "non-adaptive",
                vec![
                    none,
                    "method.seiko.query_batches=[1]".into(),
                    format!("method.seiko.updates_per_round={updates}"),
                ],
            ),
        ]
    }

    /// The budget as query batches shared out over the rounds as `query_batches` shares them;
    /// the run takes the rounds' fine-tuning updates.
    fn size_to_budget(&self, config: &AlignConfig, budget: u64) -> (Vec<String>, u64) {
        let batch = config.train.effective_batch().max(1) as u64;
        let total = budget.div_ceil(batch).max(1) as usize;
        let shared = share_batches(&self.query_batches, total);
        let list: Vec<String> = shared.iter().map(|b| b.to_string()).collect();
        (
            vec![format!("method.seiko.query_batches=[{}]", list.join(","))],
            (shared.len() * self.updates_per_round) as u64,
        )
    }
}

/// The surrogate: one network (two with a bootstrap ensemble of more heads) and, for UCB, the
/// inverse of the ridged feature covariance.
struct Fitted {
    heads: Vec<Mlp>,
    /// (Cov(phi) + lambda I)^-1 [16, 16].
    inverse: Option<Tensor<2>>,
}

/// The surrogate as a differentiable reward of images.
struct Surrogate<'a> {
    fitted: &'a Fitted,
    config: &'a SeikoConfig,
    device: Device,
}

impl Surrogate<'_> {
    fn forward(&self, images: Tensor<4>) -> Tensor<1> {
        let ad = images.is_autodiff();
        let e = embed(images, self.config.embed_grid);
        let params = |net: &Mlp| -> Vec<Tensor<2>> {
            if ad {
                net.params.iter().map(|p| p.clone().autodiff()).collect()
            } else {
                net.params.clone()
            }
        };
        let outs: Vec<(Tensor<1>, Vec<Tensor<2>>)> = self
            .fitted
            .heads
            .iter()
            .map(|h| Mlp::forward(&params(h), e.clone(), None))
            .collect();
        match self.config.optimism {
            Optimism::Bootstrap => {
                let n = outs[0].0.dims()[0];
                let stacked = Tensor::cat(
                    outs.into_iter().map(|(v, _)| v.reshape([n, 1])).collect(),
                    1,
                );
                stacked.max_dim(1).reshape([n])
            }
            Optimism::Ucb => {
                let (value, hidden) = outs.into_iter().next().expect("one head");
                let phi = hidden.last().expect("hidden layers").clone();
                let inverse = self.fitted.inverse.clone().expect("fitted with UCB");
                let inverse = if ad { inverse.autodiff() } else { inverse };
                let n = phi.dims()[0];
                let quad = (phi.clone().matmul(inverse) * phi).sum_dim(1).reshape([n]);
                let bonus = (quad.clamp_min(1e-12).sqrt() * self.config.ucb_alpha)
                    .clamp_max(self.config.ucb_clip);
                value + bonus
            }
            Optimism::Thompson | Optimism::None => outs.into_iter().next().expect("one head").0,
        }
    }
}

impl Reward for Surrogate<'_> {
    fn name(&self) -> String {
        "seiko-surrogate".into()
    }

    fn score(&self, images: &[Image], _prompts: &[String]) -> Result<Vec<f64>> {
        let t = images_to_tensor(images, &self.device)?;
        Ok(crate::methods::ddpo::to_f32(self.forward(t))?
            .into_iter()
            .map(f64::from)
            .collect())
    }

    fn differentiable(&self) -> Option<&dyn DifferentiableReward> {
        Some(self)
    }
}

impl DifferentiableReward for Surrogate<'_> {
    fn score_tensor(&self, images: Tensor<4>, _prompts: &[String]) -> Result<Tensor<1>> {
        Ok(self.forward(images))
    }
}

/// The inverse of a symmetric positive definite matrix `a` [d x d] (row-major), by Gauss–Jordan
/// elimination with partial pivoting.
pub fn invert(a: &[f64], d: usize) -> Result<Vec<f64>> {
    let mut m = a.to_vec();
    let mut inv: Vec<f64> = (0..d * d)
        .map(|k| if k / d == k % d { 1.0 } else { 0.0 })
        .collect();
    for col in 0..d {
        let pivot = (col..d)
            .max_by(|&x, &y| m[x * d + col].abs().total_cmp(&m[y * d + col].abs()))
            .expect("rows left");
        if m[pivot * d + col].abs() < 1e-300 {
            return Err(Error::invalid("seiko: the feature covariance is singular"));
        }
        for k in 0..d {
            m.swap(col * d + k, pivot * d + k);
            inv.swap(col * d + k, pivot * d + k);
        }
        let p = m[col * d + col];
        for k in 0..d {
            m[col * d + k] /= p;
            inv[col * d + k] /= p;
        }
        for r in (0..d).filter(|&r| r != col) {
            let f = m[r * d + col];
            if f != 0.0 {
                for k in 0..d {
                    m[r * d + k] -= f * m[col * d + k];
                    inv[r * d + k] -= f * inv[col * d + k];
                }
            }
        }
    }
    Ok(inv)
}

/// The unbiased covariance of the rows of `x` [n x d] (`torch.cov(x.t())`).
pub fn covariance(x: &[f64], n: usize, d: usize) -> Vec<f64> {
    let mean: Vec<f64> = (0..d)
        .map(|j| (0..n).map(|i| x[i * d + j]).sum::<f64>() / n as f64)
        .collect();
    let denom = (n as f64 - 1.0).max(1.0);
    let mut c = vec![0.0; d * d];
    for a in 0..d {
        for b in 0..d {
            c[a * d + b] = (0..n)
                .map(|i| (x[i * d + a] - mean[a]) * (x[i * d + b] - mean[b]))
                .sum::<f64>()
                / denom;
        }
    }
    c
}

const FILE: &str = "seiko.safetensors";
/// The scalars of a fit, logged with the updates after it (and checkpointed with it).
const FIT_SCALARS: [&str; 4] = [
    "surrogate_train_mse",
    "surrogate_val_mae",
    "queried_samples",
    "round",
];
const ROUND_MODEL_FILE: &str = "round_model.bpk";

pub struct Seiko<M: PolicyModel> {
    pub config: SeikoConfig,
    /// Collected batches so far (the schedule's position).
    batches: u64,
    /// Every queried sample's embedding (rows of `input`) and true reward.
    x: Vec<f32>,
    y: Vec<f32>,
    input: usize,
    fitted: Option<Fitted>,
    /// The model as the current round's fine-tuning began: the KL's reference.
    round_model: Option<M>,
    /// A module of the policy's shape to load a checkpointed round model into.
    template: Option<M>,
    /// The chain's steps, and how many of the last this update differentiates.
    steps: usize,
    k: usize,
    /// Scalars of the last fit, logged with the next updates.
    logged: Vec<(&'static str, f64)>,
    /// What `restore` read, until `load_files`.
    restored: Option<serde_json::Value>,
}

impl<M: PolicyModel> Seiko<M> {
    pub fn new(config: SeikoConfig) -> Self {
        Self {
            config,
            batches: 0,
            x: Vec::new(),
            y: Vec::new(),
            input: 0,
            fitted: None,
            round_model: None,
            template: None,
            steps: 1,
            k: 1,
            logged: Vec::new(),
            restored: None,
        }
    }

    fn rows(&self) -> usize {
        self.y.len()
    }

    /// Fits the surrogate (every head) to the data so far: `train_MLP` / `train_bootstrap`.
    fn fit(&mut self, device: &Device, rng: &mut SeededRng) -> Result<()> {
        let (n, d) = (self.rows(), self.input);
        let train = (((n as f64) * (1.0 - self.config.val_fraction)) as usize).clamp(1, n);
        let heads = match self.config.optimism {
            Optimism::Bootstrap => self.config.bootstrap_heads,
            _ => 1,
        };
        let mut fitted = match self.fitted.take() {
            Some(f) if f.heads.len() == heads => f,
            _ => Fitted {
                heads: (0..heads)
                    .map(|_| Mlp::new(d, Init::Torch, rng, device))
                    .collect(),
                inverse: None,
            },
        };
        // Each head's training rows: the split itself, or its bootstrap resample.
        let samples: Vec<Vec<usize>> = (0..heads)
            .map(|_| match self.config.optimism {
                Optimism::Bootstrap => (0..train).map(|_| rng.below(train)).collect(),
                _ => (0..train).collect(),
            })
            .collect();
        let adam = Adam {
            lr: self.config.surrogate_lr,
            weight_decay: 0.0,
            max_grad_norm: None,
        };
        let sgld = match self.config.optimism {
            Optimism::Thompson => {
                self.config.sgld
                    * (self.config.surrogate_lr / self.config.surrogate_batch as f64).sqrt()
            }
            _ => 0.0,
        };
        let rows = |idx: &[usize]| -> (Tensor<2>, Tensor<1>) {
            let xs: Vec<f32> = idx
                .iter()
                .flat_map(|&i| self.x[i * d..(i + 1) * d].iter().copied())
                .collect();
            let ys: Vec<f32> = idx.iter().map(|&i| self.y[i]).collect();
            (
                Tensor::from_data(TensorData::new(xs, [idx.len(), d]), device),
                Tensor::from_data(TensorData::new(ys, [idx.len()]), device),
            )
        };
        let mut train_mse = 0.0;
        for (head, data) in fitted.heads.iter_mut().zip(&samples) {
            head.reset_optimizer();
            for _ in 0..self.config.surrogate_epochs {
                let mut order = data.clone();
                for i in (1..order.len()).rev() {
                    order.swap(i, rng.below(i + 1));
                }
                let mut sum = 0.0;
                for chunk in order.chunks(self.config.surrogate_batch) {
                    let (e, y) = rows(chunk);
                    let leaves = head.leaves();
                    let (v, _) = Mlp::forward(&leaves, e.autodiff(), Some(&mut *rng));
                    let mse = (v - y.autodiff()).powi_scalar(2).mean();
                    sum += mse.clone().into_scalar::<f64>() * chunk.len() as f64;
                    let loss = mse / heads as f64;
                    let mut g = Mlp::gradients(&leaves, &loss)?;
                    if sgld > 0.0 {
                        g = g
                            .into_iter()
                            .map(|t| {
                                let [a, b] = t.dims();
                                let z = Tensor::<2>::from_data(
                                    TensorData::new(rng.normal_vec(a * b), [a, b]),
                                    device,
                                );
                                t + z * sgld
                            })
                            .collect();
                    }
                    head.step(g, &adam);
                }
                train_mse = sum / data.len() as f64;
                if !train_mse.is_finite() {
                    return Err(Error::NonFinite(format!(
                        "seiko surrogate loss {train_mse}"
                    )));
                }
            }
        }
        // The held-out MAE (the newest rows), averaged over heads.
        let val: Vec<usize> = (train..n).collect();
        let mut val_mae = f64::NAN;
        if !val.is_empty() {
            let (e, y) = rows(&val);
            let y: Vec<f32> = crate::methods::ddpo::to_f32(y)?;
            let mut total = 0.0;
            for head in &fitted.heads {
                let v = head.values(e.clone())?;
                total += v
                    .iter()
                    .zip(&y)
                    .map(|(a, b)| (a - f64::from(*b)).abs())
                    .sum::<f64>()
                    / val.len() as f64;
            }
            val_mae = total / fitted.heads.len() as f64;
        }
        fitted.inverse = None;
        if self.config.optimism == Optimism::Ucb {
            let (e, _) = rows(&(0..n).collect::<Vec<_>>());
            let (_, hidden) = Mlp::forward(&fitted.heads[0].params, e, None);
            let phi = host(hidden.last().expect("hidden layers"))?;
            let w = WIDTHS[WIDTHS.len() - 1];
            let phi: Vec<f64> = phi.into_iter().map(f64::from).collect();
            let mut c = covariance(&phi, n, w);
            for k in 0..w {
                c[k * w + k] += self.config.ucb_lambda;
            }
            let inv: Vec<f32> = invert(&c, w)?.into_iter().map(|x| x as f32).collect();
            fitted.inverse = Some(Tensor::from_data(TensorData::new(inv, [w, w]), device));
        }
        self.fitted = Some(fitted);
        self.logged = vec![
            ("surrogate_train_mse", train_mse),
            ("surrogate_val_mae", val_mae),
            ("queried_samples", n as f64),
        ];
        Ok(())
    }
}

impl<M: PolicyModel> Algorithm<M> for Seiko<M> {
    fn name(&self) -> &'static str {
        "seiko"
    }

    fn bind(&mut self, policy: &Policy<M>) -> Result<()> {
        self.template = Some(policy.current());
        self.steps = policy.sampler.timesteps().len().max(1);
        Ok(())
    }

    fn collects(&self) -> Collect {
        match self.config.phase(self.batches) {
            Phase::Query { .. } => Collect::Samples,
            Phase::Finetune => Collect::Starts,
        }
    }

    fn updates_per_batch(&self) -> usize {
        match self.config.phase(self.batches) {
            Phase::Query { .. } => 0,
            Phase::Finetune => 1,
        }
    }

    /// A query batch joins the data; the round's last one refits the surrogate and fixes the
    /// round's model for the KL.
    fn prepare(
        &mut self,
        cx: &Context<'_, M>,
        batch: &mut Batch,
        rng: &mut SeededRng,
    ) -> Result<Vec<(&'static str, f64)>> {
        let phase = self.config.phase(self.batches);
        self.batches += 1;
        let Phase::Query { round, last } = phase else {
            if self.fitted.is_none() {
                return Err(Error::invalid(
                    "seiko: a fine-tuning batch before any query",
                ));
            }
            return Ok(Vec::new());
        };
        let Batch::Samples(s) = batch else {
            return Err(Error::invalid("seiko: a query batch holds scored samples"));
        };
        // The images the surrogate scores in fine-tuning: a latent pipeline's are decoded.
        let e = embed(
            cx.policy.images(s.samples.images.clone()).clamp(-1.0, 1.0),
            self.config.embed_grid,
        );
        let d = e.dims()[1];
        if self.input != 0 && self.input != d {
            return Err(Error::invalid(format!(
                "seiko: embeddings of {d} values after {} before",
                self.input
            )));
        }
        self.input = d;
        self.x.extend(host(&e)?);
        self.y.extend(s.rewards.iter().map(|&r| r as f32));
        if last {
            let device = s.samples.images.device();
            self.fit(&device, rng)?;
            self.round_model = Some(cx.policy.current());
            self.logged.push(("round", round as f64));
        }
        Ok(Vec::new())
    }

    fn begin_update(
        &mut self,
        _batch: &mut Batch,
        _epoch: usize,
        rng: &mut SeededRng,
    ) -> Result<()> {
        // Drawn once per update, so every micro-batch differentiates the same steps.
        let b = self.config.backprop().draw_start(self.steps, rng)?;
        self.k = (self.steps - b).max(1);
        Ok(())
    }

    fn gradients(
        &mut self,
        cx: &Context<'_, M>,
        batch: &Batch,
        scale: f64,
        _rng: &mut SeededRng,
    ) -> Result<MicroStep> {
        let Batch::Starts(s) = batch else {
            return Err(Error::invalid(
                "seiko: a fine-tuning batch holds chain starts",
            ));
        };
        let (Some(fitted), Some(round_model)) = (&self.fitted, &self.round_model) else {
            return Err(Error::invalid("seiko: no surrogate fitted yet"));
        };
        let surrogate = Surrogate {
            fitted,
            config: &self.config,
            device: cx.policy.device.clone(),
        };
        let inner = Context {
            policy: cx.policy,
            reward: &surrogate,
            kl_weight: self.config.kl_weight,
        };
        let (coeff, target) = (self.config.loss_coeff, self.config.target);
        let objective: Box<dyn Fn(Tensor<1>, Tensor<4>) -> Tensor<1>> = match self.config.loss {
            AlignPropLoss::L1ToTarget => {
                Box::new(move |r: Tensor<1>, _| (r - target).abs() * coeff)
            }
            AlignPropLoss::NegativeReward => Box::new(move |r: Tensor<1>, _| r.neg() * coeff),
        };
        let mut out = backprop_reward_to(
            &inner,
            s,
            scale,
            self.k,
            "seiko",
            objective.as_ref(),
            Some(round_model),
        )?;
        // The surrogate is not the true reward: its scores are no queries.
        let scores = std::mem::take(&mut out.rewards);
        let mean = scores.iter().sum::<f64>() / scores.len().max(1) as f64;
        out.metrics.push(("surrogate_mean", mean));
        out.metrics.push(("differentiated_steps", self.k as f64));
        out.metrics.extend(self.logged.iter().copied());
        Ok(out)
    }

    fn state(&self) -> serde_json::Value {
        serde_json::json!({
            "batches": self.batches,
            "rows": self.rows(),
            "input": self.input,
            "heads": self.fitted.as_ref().map(|f| f.heads.len()),
            "round_model": self.round_model.is_some(),
            // In order, each value as Rust's shortest round-trip text.
            "logged": super::scalars_state(&self.logged),
        })
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        let bad = |what: &str| Error::invalid(format!("seiko state in the checkpoint: {what}"));
        self.batches = state
            .get("batches")
            .and_then(|b| b.as_u64())
            .ok_or_else(|| bad("no batches"))?;
        self.restored = Some(state.clone());
        Ok(())
    }

    fn save_files(&self, dir: &Path) -> Result<()> {
        let mut tensors = BTreeMap::new();
        let n = self.rows();
        if n > 0 {
            tensors.insert(
                "x".into(),
                HostTensor {
                    shape: vec![n, self.input],
                    data: self.x.clone(),
                },
            );
            tensors.insert(
                "y".into(),
                HostTensor {
                    shape: vec![n],
                    data: self.y.clone(),
                },
            );
        }
        if let Some(f) = &self.fitted {
            for (h, net) in f.heads.iter().enumerate() {
                net.tensors(&format!("head{h}."), &mut tensors)?;
            }
            if let Some(inv) = &f.inverse {
                let [a, b] = inv.dims();
                tensors.insert(
                    "ucb_inverse".into(),
                    HostTensor {
                        shape: vec![a, b],
                        data: host(inv)?,
                    },
                );
            }
        }
        write_safetensors(&dir.join(FILE), &tensors, HashMap::new())?;
        if let Some(m) = &self.round_model {
            save_module(&dir.join(ROUND_MODEL_FILE), m)?;
        }
        Ok(())
    }

    fn load_files(&mut self, dir: &Path, device: &Device) -> Result<()> {
        let Some(state) = self.restored.take() else {
            return Ok(());
        };
        let path = dir.join(FILE);
        let bad = |what: &str| Error::format(&path, format!("seiko state: {what}"));
        let get = |k: &str| state.get(k).and_then(|v| v.as_u64());
        let rows = get("rows").ok_or_else(|| bad("no rows"))? as usize;
        self.input = get("input").ok_or_else(|| bad("no input"))? as usize;
        let mut tensors = read_safetensors(&path)?;
        self.x.clear();
        self.y.clear();
        if rows > 0 {
            let mut take = |name: &str, len: usize| -> Result<Vec<f32>> {
                let t = tensors
                    .remove(name)
                    .ok_or_else(|| bad(&format!("no tensor `{name}`")))?;
                if t.data.len() != len {
                    return Err(bad(&format!(
                        "`{name}` holds {} values, not {len}",
                        t.data.len()
                    )));
                }
                Ok(t.data)
            };
            self.x = take("x", rows * self.input)?;
            self.y = take("y", rows)?;
        }
        self.fitted = match get("heads") {
            None => None,
            Some(h) => {
                let heads = (0..h as usize)
                    .map(|k| {
                        Mlp::from_tensors(
                            &mut tensors,
                            &format!("head{k}."),
                            &path,
                            self.input,
                            0,
                            device,
                        )
                    })
                    .collect::<Result<Vec<_>>>()?;
                let inverse = tensors.remove("ucb_inverse").map(|t| {
                    let w = t.shape[0];
                    Tensor::from_data(TensorData::new(t.data, [w, w]), device)
                });
                Some(Fitted { heads, inverse })
            }
        };
        self.logged = super::scalars_from_state(state.get("logged"), &FIT_SCALARS);
        if state.get("round_model").and_then(|v| v.as_bool()) == Some(true) {
            let template = self
                .template
                .clone()
                .ok_or_else(|| Error::invalid("seiko: load_files before bind"))?;
            self.round_model = Some(load_module(&dir.join(ROUND_MODEL_FILE), template)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2 x 2 inverse and covariance worked by hand.
    #[test]
    fn inverse_and_covariance_by_hand() {
        // [[4, 2], [2, 3]]^-1 = [[3, -2], [-2, 4]] / 8.
        let inv = invert(&[4.0, 2.0, 2.0, 3.0], 2).unwrap();
        let want = [0.375, -0.25, -0.25, 0.5];
        assert!(
            inv.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12),
            "{inv:?}"
        );
        // Rows (0, 0), (2, 1), (4, 5): means (2, 2); unbiased cov [[4, 5], [5, 7]].
        let c = covariance(&[0.0, 0.0, 2.0, 1.0, 4.0, 5.0], 3, 2);
        assert_eq!(c, vec![4.0, 5.0, 5.0, 7.0]);
        assert!(invert(&[1.0, 2.0, 2.0, 4.0], 2).is_err(), "singular");
    }

    /// Budgets shared out as the doubling schedule shares them, every round with a batch.
    #[test]
    fn query_batches_follow_the_schedule() {
        assert_eq!(share_batches(&[1, 2, 4, 8], 15), vec![1, 2, 4, 8]);
        assert_eq!(share_batches(&[1, 2, 4, 8], 30), vec![2, 4, 8, 16]);
        let s = share_batches(&[1, 2, 4, 8], 7);
        assert_eq!((s.len(), s.iter().sum::<usize>()), (4, 7));
        assert!(s.iter().all(|&b| b >= 1));
        // Fewer batches than rounds: the last rounds.
        assert_eq!(share_batches(&[1, 2, 4, 8], 2), vec![1, 1]);
        assert_eq!(share_batches(&[15], 15), vec![15]);
    }

    /// The non-adaptive baseline takes as many fine-tuning updates as the adaptive run it is
    /// compared with, sized from the preset as read (here 3 rounds of 7), not from the defaults.
    #[test]
    fn the_non_adaptive_row_matches_the_sized_runs_updates() {
        let mut config: AlignConfig = toml::from_str("method = \"seiko\"").unwrap();
        config.train.batch_size = 8;
        let seiko = SeikoConfig {
            query_batches: vec![1, 2, 4],
            updates_per_round: 7,
            ..Default::default()
        };
        config.method = crate::Method::Seiko(seiko.clone());
        // 48 queries at a batch of 8: 6 query batches over 3 rounds.
        let (set, updates) = seiko.size_to_budget(&config, 48);
        assert_eq!(set, vec!["method.seiko.query_batches=[1,1,4]".to_string()]);
        assert_eq!(updates, 21);
        let variants = seiko.variants(&config, 48);
        let (name, set) = &variants[1];
        assert_eq!(*name, "non-adaptive");
        assert!(
            set.contains(&"method.seiko.updates_per_round=21".to_string()),
            "{set:?}"
        );
        // Two query batches: two rounds, so 14 updates.
        let (_, set) = &seiko.variants(&config, 16)[1];
        assert!(
            set.contains(&"method.seiko.updates_per_round=14".to_string()),
            "{set:?}"
        );
    }

    /// The schedule: each round's query batches, then its updates; fine-tuning after the last.
    #[test]
    fn phases_of_the_rounds() {
        let c = SeikoConfig {
            query_batches: vec![1, 2],
            updates_per_round: 2,
            ..Default::default()
        };
        let phases: Vec<Phase> = (0..8).map(|b| c.phase(b)).collect();
        use Phase::*;
        assert_eq!(
            phases,
            vec![
                Query {
                    round: 0,
                    last: true
                },
                Finetune,
                Finetune,
                Query {
                    round: 1,
                    last: false
                },
                Query {
                    round: 1,
                    last: true
                },
                Finetune,
                Finetune,
                Finetune,
            ]
        );
    }

    /// The UCB reward: r_hat + min(alpha sqrt(phi^T A phi), clip), here with A the identity and
    /// the features read back from the network.
    #[test]
    fn ucb_bonus_by_hand() {
        let device = Device::default();
        let mut rng = SeededRng::new(1);
        let net = Mlp::new(4, Init::Torch, &mut rng, &device);
        let w = WIDTHS[WIDTHS.len() - 1];
        let eye: Vec<f32> = (0..w * w)
            .map(|k| if k / w == k % w { 1.0 } else { 0.0 })
            .collect();
        let fitted = Fitted {
            heads: vec![net],
            inverse: Some(Tensor::from_data(TensorData::new(eye, [w, w]), &device)),
        };
        let config = SeikoConfig {
            embed_grid: 1,
            ucb_alpha: 0.5,
            ..Default::default()
        };
        let s = Surrogate {
            fitted: &fitted,
            config: &config,
            device: device.clone(),
        };
        // 4-channel images: the embedding is the normalised channel means.
        let images = Tensor::<4>::from_data(
            TensorData::new(rng.normal_vec(2 * 4 * 3 * 3), [2, 4, 3, 3]),
            &device,
        );
        let got = crate::methods::ddpo::to_f32(s.forward(images.clone())).unwrap();
        let e = embed(images, 1);
        let (v, hidden) = Mlp::forward(&fitted.heads[0].params, e, None);
        let v = crate::methods::ddpo::to_f32(v).unwrap();
        let phi = host(&hidden[3]).unwrap();
        for i in 0..2 {
            let norm = phi[i * w..(i + 1) * w]
                .iter()
                .map(|x| f64::from(*x).powi(2))
                .sum::<f64>()
                .sqrt();
            let want = f64::from(v[i]) + (0.5 * norm).min(10.0);
            assert!(
                (f64::from(got[i]) - want).abs() < 1e-5,
                "{i}: {} vs {want}",
                got[i]
            );
        }
    }
}
