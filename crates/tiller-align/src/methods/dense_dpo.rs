//! Dense-reward DPO (Yang, Chen and Zhou, "A Dense Reward View on Aligning Text-to-Image
//! Diffusion with Preference", ICML 2024): DPO over whole denoising trajectories with a
//! *temporally discounted* per-step reward, so that the early steps, which decide the image's
//! layout, weigh most.
//!
//! The K trajectories of one prompt are ranked by their reward and trained with the
//! Plackett-Luce (listMLE) likelihood of that ranking over trajectory logits
//! (`Shentao-YANG/Dense_Reward_T2I` `preference_based_policy_learner.py::get_pl_loss_logit`,
//! `reward_loss.py::listMLELoss`):
//!
//! ```text
//! l_k = C (1/M) sum_{t in S_k} [ clip(log pi_theta - log pi_init) + clip(log pi_theta - log pi_old) ](x^k_{t-1} | x^k_t)
//! L   = mean over prompts of sum_j [ log sum_{l >= j} exp(l_(l)) - l_(j) ]   (ranked best first)
//! ```
//!
//! where the M = `steps_per_logit` steps S_k of trajectory k are drawn with replacement with
//! probability proportional to gamma^i (i counts the chain's steps from the first, noisiest one:
//! `pl_weights_name = "gamma"`), clip is a hard clamp of the log-ratio to +-`log_ratio_clip`
//! (the authors' "soft clip on the log space"), and each term is on (`reg_to_init`, to the frozen
//! starting model) or off (`reg_to_old`, to the sampling policy). Log-probabilities are means over
//! dimensions (the repository's DDIM extension, as ddpo-pytorch's). For K = 2 the loss is DPO's
//! `-log sigmoid(l_w - l_l)`. Ties are ranked at random (listMLE shuffles before sorting).
//!
//! Defaults: `parse_args.py`'s single-prompt settings (`pl_loss_temp = 10`, `pl_gamma = 0.9`,
//! `num_steps_est_logits = 3`, `log_ratio_clip = 1e-4`, `reg_to_pi_init = 1`,
//! `reg_to_pi_old = 0`, `pl_loss_num_traj = 2`); the multi-prompt ones are `temperature = 12.5`,
//! `steps_per_logit = 1`, `log_ratio_clip = 5e-4`.
//!
//! How this differs from the repository: the authors keep a replay buffer of 1000 prompts' rollouts
//! and take 2500 updates per collection (`p_step`); here each update trains on the batch it just
//! sampled (`inner_epochs` passes over it), as the loop's other online methods. One tuple per
//! prompt: the whole group of `train.images_per_prompt` trajectories (the repository draws
//! `pl_loss_num_tuples = 1` tuple of `pl_loss_num_traj` from its `num_traj_for_pref_comp`). The
//! optional no-regularisation warm-up (`no_reg_warmup_ratio`, off by default) is not offered.
//!
//! The listMLE loss is not a sum over steps, so it is trained in two passes (memory stays one
//! step's graph): the logits under the current weights without a graph, the loss's gradient with
//! respect to each logit from them, then one backward per drawn step of `sum_k dL/dl_k * (that
//! step's part of l_k)`; the steps' gradients sum to the loss's.

use crate::batch::{Batch, Collect};
use crate::config::AlignConfig;
use crate::methods::ddpo::{log_prob_under, step_log_prob, to_f32};
use crate::methods::{Fields, MethodSpec};
use crate::{Algorithm, Context, MicroStep, PolicyModel};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};
use tiller_core::{Error, Result, SeededRng};

/// `[method.dense-dpo]`: `Dense_Reward_T2I` `parse_args.py` single-prompt defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DenseDpoConfig {
    /// C, the logits' scale (`pl_loss_temp`; the KL weight of the paper's objective).
    pub temperature: f64,
    /// gamma, the discount: step i of the chain is drawn with probability proportional to
    /// gamma^i (`pl_gamma`).
    pub gamma: f64,
    /// M, the steps drawn (with replacement) to estimate each trajectory's logit
    /// (`num_steps_est_logits`).
    pub steps_per_logit: usize,
    /// Each log-ratio is clamped to +-this (`log_ratio_clip`).
    pub log_ratio_clip: f64,
    /// The log-ratio to the frozen starting model (`reg_to_pi_init`).
    pub reg_to_init: bool,
    /// The log-ratio to the sampling policy (`reg_to_pi_old`).
    pub reg_to_old: bool,
    /// Optimizer passes over each collected batch (the steps' draws are renewed each pass).
    pub inner_epochs: usize,
}

impl Default for DenseDpoConfig {
    fn default() -> Self {
        Self {
            temperature: 10.0,
            gamma: 0.9,
            steps_per_logit: 3,
            log_ratio_clip: 1e-4,
            reg_to_init: true,
            reg_to_old: false,
            inner_epochs: 1,
        }
    }
}

impl MethodSpec for DenseDpoConfig {
    fn name(&self) -> &'static str {
        "dense-dpo"
    }

    fn paper(&self) -> &'static str {
        "Yang, Chen and Zhou, A Dense Reward View on Aligning Text-to-Image Diffusion with Preference, ICML 2024"
    }

    fn validate(&self, config: &AlignConfig) -> Result<()> {
        let f = Fields("dense-dpo");
        f.stochastic_steps(config)?;
        let k = config.train.images_per_prompt;
        if k < 2 {
            return Err(Error::config(
                "train.images_per_prompt",
                format!(
                    "dense-dpo ranks the trajectories of each prompt: set it to 2 or more, got {k}"
                ),
            ));
        }
        if !config.train.batch_size.is_multiple_of(k) {
            return Err(Error::config(
                "train.batch_size",
                format!(
                    "must be a multiple of train.images_per_prompt ({k}) for dense-dpo (a micro-batch \
                     holds whole rankings), got {}",
                    config.train.batch_size
                ),
            ));
        }
        f.positive(&[
            ("temperature", self.temperature),
            ("log_ratio_clip", self.log_ratio_clip),
        ])?;
        f.unit_interval(&[("gamma", self.gamma)])?;
        if !(self.reg_to_init || self.reg_to_old) {
            return Err(f.error(
                "reg_to_init",
                "reg_to_init and reg_to_old are both off: the logits would have no reference",
            ));
        }
        f.at_least_one(&[
            ("steps_per_logit", self.steps_per_logit),
            ("inner_epochs", self.inner_epochs),
        ])
    }

    fn build<M: PolicyModel>(&self) -> Box<dyn Algorithm<M>> {
        Box::new(DenseDpo {
            config: self.clone(),
        })
    }

    /// Regularised by its clipped log-ratios and C.
    fn takes_kl(&self) -> bool {
        false
    }

    fn size_to_budget(&self, config: &AlignConfig, budget: u64) -> (Vec<String>, u64) {
        super::rollout_budget(config, budget, self.inner_epochs)
    }
}

pub struct DenseDpo {
    pub config: DenseDpoConfig,
}

/// listMLE of one ranking: `logits` in rank order (best first), the loss
/// `sum_j [log(sum_{l >= j} exp(p_l - max) + 1e-10) - (p_j - max)]` (`listMLELoss`, its 1e-10
/// included) and its gradient with respect to each logit (the 1e-10's share through the max,
/// below 1e-9, left out).
pub fn list_mle(logits: &[f64]) -> (f64, Vec<f64>) {
    const EPS: f64 = 1e-10;
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = logits.iter().map(|p| (p - max).exp()).collect();
    // Tail sums S_j = sum_{l >= j} e_l.
    let mut tails = vec![0.0; e.len()];
    let mut acc = 0.0;
    for j in (0..e.len()).rev() {
        acc += e[j];
        tails[j] = acc;
    }
    let loss = (0..e.len())
        .map(|j| (tails[j] + EPS).ln() - (logits[j] - max))
        .sum();
    let grad = (0..e.len())
        .map(|l| (0..=l).map(|j| e[l] / (tails[j] + EPS)).sum::<f64>() - 1.0)
        .collect();
    (loss, grad)
}

/// Each chain step's probability of being drawn, proportional to gamma^i over the stochastic
/// steps (i: the step's place in the chain, 0 the first); 0 for a deterministic step.
pub fn step_weights(stochastic: &[bool], gamma: f64) -> Vec<f64> {
    let w: Vec<f64> = stochastic
        .iter()
        .enumerate()
        .map(|(i, s)| if *s { gamma.powi(i as i32) } else { 0.0 })
        .collect();
    let total: f64 = w.iter().sum();
    w.into_iter()
        .map(|x| x / total.max(f64::MIN_POSITIVE))
        .collect()
}

/// One draw from the categorical distribution `p` (summing to 1).
fn draw(p: &[f64], rng: &mut SeededRng) -> usize {
    let u = rng.uniform();
    let mut acc = 0.0;
    for (i, x) in p.iter().enumerate() {
        acc += x;
        if u < acc {
            return i;
        }
    }
    p.iter().rposition(|x| *x > 0.0).unwrap_or(0)
}

/// One drawn step's share of the logits: the clamped log-ratios of the rollouts that drew it.
struct StepTerms {
    /// The chain step.
    step: usize,
    /// The rollouts that drew it, and how many times each did.
    rows: Vec<usize>,
    counts: Vec<f64>,
    /// log pi_init of the rows' recorded x_{t-1} (when `reg_to_init`), without a graph.
    reference: Option<Tensor<1>>,
}

impl DenseDpo {
    /// `clip(lp - ref) + clip(lp - old)` for log-probs `lp` (the terms that are on).
    fn terms(
        &self,
        lp: Tensor<1>,
        reference: Option<&Tensor<1>>,
        old: Option<Tensor<1>>,
    ) -> Tensor<1> {
        let c = self.config.log_ratio_clip;
        // Constants beside a graph's log-probs are lifted onto the autodiff device.
        let graph = lp.is_autodiff();
        let lift = |t: Tensor<1>| if graph { t.autodiff() } else { t };
        let mut out = lp.zeros_like();
        if let Some(reference) = reference {
            out = out + (lp.clone() - lift(reference.clone())).clamp(-c, c);
        }
        if let Some(old) = old {
            out = out + (lp - lift(old)).clamp(-c, c);
        }
        out
    }
}

impl<M: PolicyModel> Algorithm<M> for DenseDpo {
    fn name(&self) -> &'static str {
        "dense-dpo"
    }

    fn collects(&self) -> Collect {
        Collect::Rollouts
    }

    fn updates_per_batch(&self) -> usize {
        self.config.inner_epochs
    }

    /// Each group's ranking by reward, ties in random order (kept as the rollouts' advantages:
    /// 0 for the best of its group), and each rollout's M drawn steps.
    fn begin_update(
        &mut self,
        batch: &mut Batch,
        _epoch: usize,
        rng: &mut SeededRng,
    ) -> Result<()> {
        let Batch::Rollouts(r) = batch else {
            return Err(Error::invalid("dense-dpo needs rollouts"));
        };
        let k = r.check_groups("dense-dpo", None)?;
        let mut ranks = vec![0.0; r.prompts.len()];
        for (g, rewards) in r.rewards.chunks(k).enumerate() {
            let mut order: Vec<usize> = (0..k).collect();
            for i in (1..k).rev() {
                order.swap(i, rng.below(i + 1));
            }
            order.sort_by(|a, b| rewards[*b].total_cmp(&rewards[*a]));
            for (rank, i) in order.into_iter().enumerate() {
                ranks[g * k + i] = rank as f64;
            }
        }
        r.advantages = ranks;
        let stochastic: Vec<bool> = r.log_probs.iter().map(Option::is_some).collect();
        let p = step_weights(&stochastic, self.config.gamma);
        r.train_steps = (0..r.prompts.len())
            .map(|_| {
                (0..self.config.steps_per_logit)
                    .map(|_| draw(&p, rng))
                    .collect()
            })
            .collect();
        Ok(())
    }

    fn gradients(
        &mut self,
        cx: &Context<'_, M>,
        batch: &Batch,
        scale: f64,
        _rng: &mut SeededRng,
    ) -> Result<MicroStep> {
        let Batch::Rollouts(r) = batch else {
            return Err(Error::invalid("dense-dpo needs rollouts"));
        };
        let k = r.check_groups("dense-dpo", None)?;
        let n = r.prompts.len();
        if r.train_steps.len() != n || r.advantages.len() != n {
            return Err(Error::invalid(
                "dense-dpo: the rankings and steps were not drawn for this batch (begin_update)",
            ));
        }
        let policy = cx.policy;
        let per_step = self.config.temperature / self.config.steps_per_logit as f64;
        // ---- pass 1: the logits under the current weights, without a graph
        let current = policy.current();
        let mut logits = vec![0.0; n];
        let (mut clipped, mut terms_total) = (0usize, 0usize);
        let mut drawn = Vec::new();
        for i in 0..r.log_probs.len() {
            let (rows, counts): (Vec<usize>, Vec<f64>) = (0..n)
                .filter_map(|s| {
                    let c = r.train_steps[s].iter().filter(|&&t| t == i).count();
                    (c > 0).then_some((s, c as f64))
                })
                .unzip();
            if rows.is_empty() {
                continue;
            }
            let part = r.select_rows(&rows);
            let old = part.log_probs[i]
                .clone()
                .ok_or_else(|| Error::invalid(format!("step {i} has no log-probability")))?;
            let cond = policy.conditioning(&part.prompts, &policy.device);
            let lp = log_prob_under(policy, &current, &cond, &part, i)?;
            let reference = match self.config.reg_to_init {
                true => Some(log_prob_under(policy, &policy.reference, &cond, &part, i)?),
                false => None,
            };
            let c = self.config.log_ratio_clip;
            let mut ratios = Vec::new();
            if let Some(reference) = &reference {
                ratios.extend(to_f32(lp.clone() - reference.clone())?);
            }
            if self.config.reg_to_old {
                ratios.extend(to_f32(lp.clone() - old.clone())?);
            }
            clipped += ratios.iter().filter(|v| (**v as f64).abs() > c).count();
            terms_total += ratios.len();
            let values = to_f32(self.terms(
                lp,
                reference.as_ref(),
                self.config.reg_to_old.then_some(old),
            ))?;
            for ((s, count), v) in rows.iter().zip(&counts).zip(values) {
                logits[*s] += per_step * count * v as f64;
            }
            drawn.push(StepTerms {
                step: i,
                rows,
                counts,
                reference,
            });
        }
        // ---- the listMLE loss of each group's ranking, and dL/dl_k
        let groups = n / k;
        let (mut loss, mut agree) = (0.0, 0.0);
        let mut d_logits = vec![0.0; n];
        for g in 0..groups {
            let mut by_rank: Vec<usize> = (g * k..(g + 1) * k).collect();
            by_rank.sort_by(|a, b| r.advantages[*a].total_cmp(&r.advantages[*b]));
            let ranked: Vec<f64> = by_rank.iter().map(|&s| logits[s]).collect();
            let (l, grad) = list_mle(&ranked);
            loss += l / groups as f64;
            for (s, d) in by_rank.iter().zip(grad) {
                d_logits[*s] = d / groups as f64;
            }
            let top = ranked.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            agree += (ranked[0] == top && ranked[1..].iter().all(|x| *x < top)) as u8 as f64;
        }
        // ---- pass 2: per drawn step, the gradient of sum_k dL/dl_k (step's share of l_k)
        let ad = policy.autodiff_device();
        let mut acc = GradientsAccumulator::<M>::new();
        for d in drawn {
            let part = r.select_rows(&d.rows);
            let cond = policy.conditioning(&part.prompts, &ad);
            let (_, lp) = step_log_prob(policy, &cond, &part, d.step)?;
            let old = part.log_probs[d.step]
                .clone()
                .expect("a drawn step is stochastic");
            let terms = self.terms(
                lp,
                d.reference.as_ref(),
                self.config.reg_to_old.then_some(old),
            );
            let coef: Vec<f32> = d
                .rows
                .iter()
                .zip(&d.counts)
                .map(|(s, c)| (d_logits[*s] * per_step * c * scale) as f32)
                .collect();
            let coef = Tensor::<1>::from_data(TensorData::new(coef, [d.rows.len()]), &ad);
            let surrogate = (terms * coef).sum();
            acc.accumulate(
                &policy.model,
                GradientsParams::from_grads(surrogate.backward(), &policy.model),
            );
        }
        Ok(MicroStep {
            grads: acc.grads(),
            loss,
            metrics: vec![
                ("clipfrac", clipped as f64 / terms_total.max(1) as f64),
                ("implicit_acc", agree / groups.max(1) as f64),
            ],
            rewards: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_mle_of_two_is_dpo() {
        // K = 2: -log sigmoid(l_w - l_l), gradient -+ sigmoid(l_l - l_w).
        let (loss, grad) = list_mle(&[0.3, -0.2]);
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        assert!((loss + sig(0.5).ln()).abs() < 1e-9, "{loss}");
        assert!((grad[0] + sig(-0.5)).abs() < 1e-9 && (grad[1] - sig(-0.5)).abs() < 1e-9);
    }

    #[test]
    fn list_mle_gradient_is_its_derivative() {
        let p = [0.4, -1.1, 0.7, 0.05];
        let (_, grad) = list_mle(&p);
        for i in 0..p.len() {
            let h = 1e-6;
            let (mut a, mut b) = (p, p);
            a[i] += h;
            b[i] -= h;
            let fd = (list_mle(&a).0 - list_mle(&b).0) / (2.0 * h);
            assert!(
                (fd - grad[i]).abs() < 1e-6,
                "logit {i}: {fd} vs {}",
                grad[i]
            );
        }
    }

    #[test]
    fn steps_are_weighted_by_the_discount() {
        let p = step_weights(&[true, true, true, false], 0.5);
        let z = 1.0 + 0.5 + 0.25;
        assert!((p[0] - 1.0 / z).abs() < 1e-12 && (p[2] - 0.25 / z).abs() < 1e-12);
        assert_eq!(p[3], 0.0);
        let mut rng = SeededRng::new(3);
        let mut counts = [0usize; 4];
        for _ in 0..20_000 {
            counts[draw(&p, &mut rng)] += 1;
        }
        // Binomial standard error at 20 000 draws: below 0.004.
        for i in 0..4 {
            assert!(
                (counts[i] as f64 / 20_000.0 - p[i]).abs() < 0.015,
                "{counts:?}"
            );
        }
    }
}
