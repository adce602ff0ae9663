//! SPO (Liang et al., "Aesthetic Post-Training Diffusion Models from Generic Preferences with
//! Step-by-step Preference Optimization", CVPR 2025): preferences between the *steps* of a chain
//! rather than between whole images. At each step from `divert_start_step` on, several
//! candidates x_{t-1} are sampled from the same x_t; a step-aware preference model scores each,
//! the best and the worst form a pair when their softmax gap exceeds `threshold`, and the chain
//! continues from a candidate chosen at random. Every pair trains the DPO loss of that one step:
//!
//! ```text
//! rho_w = clamp(pi_theta(x_w | x_t) / pi_ref(x_w | x_t), 1 - eps, 1 + eps)   (likewise rho_l)
//! L     = -log sigmoid(beta log rho_w - beta log rho_l)
//! ```
//!
//! with pi_ref the frozen starting model, log-probabilities means over dimensions, and guidance in
//! the training passes as in sampling (`train.cfg = True`).
//!
//! Read from `RockeyCoss/SPO` (`train_scripts/train_spo.py`,
//! `spo/custom_diffusers/multi_sample_pipeline.py`, `spo/preference_models/compare_funcs.py`,
//! `configs/basic_config.py` and the SD 1.5 config): defaults `num_sample_each_step = 4` (SD 1.5;
//! 2 for SDXL), `threshold = 0.3`, `divert_start_step = 4`, `beta = 10`, `eps = 0.1`; sampling DDIM
//! eta 1, 20 steps, guidance 5; LoRA rank 4, lr 6e-5. A candidate of step i is scored on the
//! model's estimate of x_0 at its own next step (the clean sample itself after the last step),
//! as the pipeline scores `pred_original_sample` decoded.
//!
//! Where this file differs, and why:
//! - **The preference model.** SPO's is step-aware: PickScore fine-tuned to rank noisy
//!   intermediate images, conditioned on the timestep (released only for SD 1.5 and SDXL). Here
//!   the run's reward scores each candidate's x_0 estimate, without the timestep; its scores
//!   enter the softmax as they are (PickScore's are logits scaled by about 100, so `threshold`
//!   asks a reward on another scale for a different gap).
//! - **The loss's normaliser.** The reference averages the loss over the valid pairs of each
//!   training batch; here it is the sum over valid pairs divided by (examples x compared steps),
//!   a pair that is not valid counting as zero, so that an accumulated update equals one big
//!   batch (Adam divides out the difference of scale, which is the valid fraction).
//! - The pairs of one batch are trained in the update that sampled them (one pass, as the script's
//!   one pass over its shuffled pairs per sampling round).

use crate::batch::{Batch, Collect, Starts};
use crate::config::AlignConfig;
use crate::methods::ddpo::to_f32;
use crate::methods::draft_k::finite_rewards;
use crate::methods::{Fields, MethodSpec};
use crate::{Algorithm, Context, MicroStep, PolicyModel};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::Tensor;
use burn::tensor::activation::log_sigmoid;
use serde::{Deserialize, Serialize};
use tiller_core::{Error, Result, SeededRng};
use tiller_diffusion::LogProbReduction;
use tiller_diffusion::sampling::NoiseSource;
use tiller_reward::tensor_to_images;

/// `[method.spo]`: `RockeyCoss/SPO`'s SD 1.5 defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoConfig {
    /// Candidates x_{t-1} sampled from each x_t (`num_sample_each_step`).
    pub candidates: usize,
    /// The softmax gap between the best and the worst candidate's scores above which they form a
    /// pair (`compare_func_cfg.threshold`).
    pub threshold: f64,
    /// Steps of the chain before the first compared one (`divert_start_step`).
    pub divert_start_step: usize,
    /// beta (`train.beta`).
    pub beta: f64,
    /// eps: the likelihood ratios are clamped to [1 - eps, 1 + eps] (`train.eps`).
    pub clip_range: f64,
}

impl Default for SpoConfig {
    fn default() -> Self {
        Self {
            candidates: 4,
            threshold: 0.3,
            divert_start_step: 4,
            beta: 10.0,
            clip_range: 0.1,
        }
    }
}

impl MethodSpec for SpoConfig {
    fn name(&self) -> &'static str {
        "spo"
    }

    fn paper(&self) -> &'static str {
        "Liang et al., Aesthetic Post-Training Diffusion Models from Generic Preferences with Step-by-step Preference Optimization, CVPR 2025"
    }

    fn validate(&self, config: &AlignConfig) -> Result<()> {
        let f = Fields("spo");
        f.stochastic_steps(config)?;
        f.positive(&[("beta", self.beta)])?;
        if self.candidates < 2 {
            return Err(f.error(
                "candidates",
                format!("needs at least 2 to compare, got {}", self.candidates),
            ));
        }
        if !(0.0..1.0).contains(&self.threshold) {
            return Err(f.error(
                "threshold",
                format!("must be in [0, 1) (a softmax gap), got {}", self.threshold),
            ));
        }
        f.open_unit_interval(&[("clip_range", self.clip_range)])?;
        if self.divert_start_step >= config.sampling.steps {
            return Err(f.error(
                "divert_start_step",
                format!(
                    "{} leaves no step of the {}-step chain to compare",
                    self.divert_start_step, config.sampling.steps
                ),
            ));
        }
        Ok(())
    }

    fn build<M: PolicyModel>(&self) -> Box<dyn Algorithm<M>> {
        Box::new(Spo {
            config: self.clone(),
        })
    }

    /// Regularised by its clamp and beta, against the reference itself.
    fn takes_kl(&self) -> bool {
        false
    }

    /// Every candidate's score is a query: (steps - divert_start_step) x candidates per chain.
    fn size_to_budget(&self, config: &AlignConfig, budget: u64) -> (Vec<String>, u64) {
        let per_chain = (config.sampling.steps.saturating_sub(self.divert_start_step)
            * self.candidates)
            .max(1) as u64;
        let per_update = config.train.effective_batch().max(1) as u64 * per_chain;
        (
            vec![format!("train.reward_budget={budget}")],
            budget.div_ceil(per_update),
        )
    }
}

/// The best and the worst of each example's candidate scores (`scores[j][e]`: candidate j of
/// example e) and whether they form a pair: `softmax(best, worst)` gap above `threshold`, i.e.
/// `tanh((best - worst) / 2) > threshold`. Ties go to the first candidate for the best and the
/// last for the worst.
pub fn compare(scores: &[Vec<f64>], threshold: f64) -> Vec<(usize, usize, bool)> {
    let n = scores.first().map_or(0, Vec::len);
    (0..n)
        .map(|e| {
            let (mut best, mut worst) = (0, 0);
            for j in 0..scores.len() {
                if scores[j][e] > scores[best][e] {
                    best = j;
                }
                if scores[j][e] <= scores[worst][e] {
                    worst = j;
                }
            }
            let gap = ((scores[best][e] - scores[worst][e]) / 2.0).tanh();
            (best, worst, gap > threshold)
        })
        .collect()
}

/// SPO's loss of each pair, [P]: `-log sigmoid(beta log clamp(exp(lr_w)) - beta log
/// clamp(exp(lr_l)))` from the winners' and losers' log-ratios to the reference.
pub fn spo_loss(log_ratio_w: Tensor<1>, log_ratio_l: Tensor<1>, beta: f64, eps: f64) -> Tensor<1> {
    let log_rho = |lr: Tensor<1>| lr.exp().clamp(1.0 - eps, 1.0 + eps).log();
    log_sigmoid((log_rho(log_ratio_w) - log_rho(log_ratio_l)) * beta).neg()
}

/// The pairs of one compared step: chain step `i`, the examples `rows` that formed one, their x_t
/// and winning and losing x_{t-1}.
struct StepPairs {
    i: usize,
    rows: Vec<usize>,
    x_t: Tensor<4>,
    win: Tensor<4>,
    lose: Tensor<4>,
}

/// Rows `rows` of the tensors `from[rows[k].0]`, row `rows[k].1`, stacked.
fn pick(from: &[Tensor<4>], rows: &[(usize, usize)]) -> Tensor<4> {
    Tensor::cat(
        rows.iter()
            .map(|&(j, e)| from[j].clone().narrow(0, e, 1))
            .collect(),
        0,
    )
}

/// One micro-batch's chains with their compared steps.
struct Sampled {
    pairs: Vec<StepPairs>,
    /// Every candidate's score (each a reward query).
    queries: Vec<f64>,
    /// The last step's scores of the candidates the chains ended on.
    finals: Vec<f64>,
    /// Steps compared per chain.
    compared: usize,
}

pub struct Spo {
    pub config: SpoConfig,
}

impl Spo {
    /// Samples the chains of `s` with candidates at every compared step under the current
    /// weights (no graph).
    fn sample_pairs<M: PolicyModel>(&self, cx: &Context<'_, M>, s: &Starts) -> Result<Sampled> {
        let policy = cx.policy;
        let sampler = policy.sampler.as_ref();
        let ts = sampler.timesteps();
        let steps = ts.len();
        let device = &policy.device;
        let frozen = policy.current();
        let cond = policy.conditioning(&s.prompts, device);
        let texts = &s.prompts.texts;
        let shape: [usize; 4] = s.x_t.dims();
        let b = shape[0];
        let k = self.config.candidates;
        let mut noise = s.noise.clone();
        let mut x = s.x_t.clone();
        let mut out = sampler.step(cond.predict(&frozen, x.clone(), ts[0]), 0, x.clone())?;
        let (mut pairs, mut queries, mut finals) = (Vec::new(), Vec::new(), Vec::new());
        let mut compared = 0;
        for i in 0..steps {
            if i < self.config.divert_start_step {
                x = out.sample(noise.draw(shape, device)?);
                if i + 1 < steps {
                    out = sampler.step(
                        cond.predict(&frozen, x.clone(), ts[i + 1]),
                        i + 1,
                        x.clone(),
                    )?;
                }
                continue;
            }
            compared += 1;
            let mut candidates = Vec::with_capacity(k);
            for _ in 0..k {
                candidates.push(out.sample(noise.draw(shape, device)?));
            }
            // Each candidate's score: of its x_0 estimate at the next step, or of itself at the end.
            let mut scores = Vec::with_capacity(k);
            for c in &candidates {
                let x0 = if i + 1 < steps {
                    let o = sampler.step(
                        cond.predict(&frozen, c.clone(), ts[i + 1]),
                        i + 1,
                        c.clone(),
                    )?;
                    o.pred_original_sample
                } else {
                    c.clone()
                };
                let images = tensor_to_images(policy.images(x0))?;
                let v = finite_rewards(cx.reward, cx.reward.score(&images, texts)?)?;
                queries.extend(&v);
                scores.push(v);
            }
            let verdicts = compare(&scores, self.config.threshold);
            let rows: Vec<usize> = (0..b).filter(|&e| verdicts[e].2).collect();
            if !rows.is_empty() {
                let at = |pick_of: &dyn Fn(usize) -> usize| -> Vec<(usize, usize)> {
                    rows.iter().map(|&e| (pick_of(e), e)).collect()
                };
                let (win, lose) = (at(&|e| verdicts[e].0), at(&|e| verdicts[e].1));
                pairs.push(StepPairs {
                    i,
                    x_t: pick(std::slice::from_ref(&x), &at(&|_| 0)),
                    win: pick(&candidates, &win),
                    lose: pick(&candidates, &lose),
                    rows,
                });
            }
            // Continue from a candidate drawn per example from its own stream.
            let chosen: Vec<(usize, usize)> = noise.below(k).into_iter().zip(0..b).collect();
            if i + 1 == steps {
                finals = chosen.iter().map(|&(j, e)| scores[j][e]).collect();
            } else {
                x = pick(&candidates, &chosen);
                out = sampler.step(
                    cond.predict(&frozen, x.clone(), ts[i + 1]),
                    i + 1,
                    x.clone(),
                )?;
            }
        }
        Ok(Sampled {
            pairs,
            queries,
            finals,
            compared,
        })
    }
}

impl<M: PolicyModel> Algorithm<M> for Spo {
    fn name(&self) -> &'static str {
        "spo"
    }

    fn collects(&self) -> Collect {
        Collect::Starts
    }

    fn gradients(
        &mut self,
        cx: &Context<'_, M>,
        batch: &Batch,
        scale: f64,
        _rng: &mut SeededRng,
    ) -> Result<MicroStep> {
        let Batch::Starts(s) = batch else {
            return Err(Error::invalid("spo needs chain starts"));
        };
        let policy = cx.policy;
        let Sampled {
            pairs,
            queries,
            finals,
            compared,
        } = self.sample_pairs(cx, s)?;
        let ad = policy.autodiff_device();
        let (beta, eps) = (self.config.beta, self.config.clip_range);
        // Sum over pairs / (examples x compared steps): a step without a pair counts as zero.
        let norm = (s.prompts.len() * compared.max(1)) as f64;
        let mut acc = GradientsAccumulator::<M>::new();
        let (mut loss_sum, mut agree, mut n_pairs) = (0.0, 0.0, 0usize);
        for p in &pairs {
            let t = policy.sampler.timesteps()[p.i];
            let prompts = s.prompts.select(&p.rows);
            let log_probs =
                |model: &M, device: &burn::tensor::Device| -> Result<(Tensor<1>, Tensor<1>)> {
                    let cond = policy.conditioning(&prompts, device);
                    let x_t = Tensor::from_data(p.x_t.clone().into_data(), device);
                    let pred = cond.predict(model, x_t.clone(), t);
                    let step = policy.sampler.step(pred, p.i, x_t)?.distribution;
                    let at = |x: &Tensor<4>| {
                        step.log_prob(
                            Tensor::from_data(x.clone().into_data(), device),
                            LogProbReduction::Mean,
                        )
                    };
                    Ok((at(&p.win)?, at(&p.lose)?))
                };
            let (w, l) = log_probs(&policy.model, &ad)?;
            let (rw, rl) = log_probs(&policy.reference, &policy.device)?;
            let lr_w = w - Tensor::from_data(rw.into_data(), &ad);
            let lr_l = l - Tensor::from_data(rl.into_data(), &ad);
            let z = to_f32((lr_w.clone() - lr_l.clone()).inner())?;
            agree += z.iter().filter(|v| **v > 0.0).count() as f64;
            n_pairs += p.rows.len();
            let loss = spo_loss(lr_w, lr_l, beta, eps).sum() / norm;
            loss_sum += loss.clone().into_scalar::<f64>();
            let g = GradientsParams::from_grads((loss * scale).backward(), &policy.model);
            acc.accumulate(&policy.model, g);
        }
        let mut metrics = vec![("pair_fraction", n_pairs as f64 / norm)];
        if n_pairs > 0 {
            metrics.push(("implicit_acc", agree / n_pairs as f64));
        }
        let final_mean = finals.iter().sum::<f64>() / finals.len().max(1) as f64;
        metrics.push(("final_score", final_mean));
        Ok(MicroStep {
            grads: acc.grads(),
            loss: loss_sum,
            metrics,
            rewards: queries,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    #[test]
    fn compare_takes_the_best_and_worst_above_the_softmax_gap() {
        // Example 0: best 2 (1.5), worst 1 (-0.5): tanh(1) = 0.76 > 0.3. Example 1: scores within
        // 0.5: tanh(0.25) = 0.245 < 0.3. Example 2: a tie for the worst goes to the last.
        let scores = vec![
            vec![0.2, 1.0, 0.0],
            vec![-0.5, 1.2, 0.0],
            vec![1.5, 0.7, 1.0],
        ];
        let got = compare(&scores, 0.3);
        assert_eq!(got[0], (2, 1, true));
        assert_eq!(got[1], (1, 2, false));
        assert_eq!((got[2].0, got[2].1), (2, 1));
        let ties = compare(&[vec![1.0], vec![1.0]], 0.0);
        assert_eq!(ties[0], (0, 1, false));
    }

    #[test]
    fn loss_by_hand() {
        let device = burn::tensor::Device::default();
        let t =
            |v: Vec<f32>| Tensor::<1>::from_data(TensorData::new(v.clone(), [v.len()]), &device);
        // Pair 1 inside the clamp: z = 10 (0.03 - (-0.02)) = 0.5. Pair 2: exp(0.5) clamps to 1.1,
        // exp(-0.3) to 0.9: z = 10 (ln 1.1 - ln 0.9).
        let loss = to_f32(spo_loss(
            t(vec![0.03, 0.5]),
            t(vec![-0.02, -0.3]),
            10.0,
            0.1,
        ))
        .unwrap();
        let nls = |z: f64| (1.0 + (-z).exp()).ln();
        assert!((loss[0] as f64 - nls(0.5)).abs() < 1e-6, "{loss:?}");
        let z2 = 10.0 * ((1.1f64).ln() - (0.9f64).ln());
        assert!((loss[1] as f64 - nls(z2)).abs() < 1e-6, "{loss:?}");
    }
}
