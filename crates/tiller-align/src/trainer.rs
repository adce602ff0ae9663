//! The one alignment loop: collect -> score -> loss -> accumulate -> step -> log -> checkpoint.
//!
//! Each update collects the method's data for the whole effective batch (`batch_size x
//! grad_accum`) from the run's one random stream, lets the method prepare it (advantages), then
//! cuts it into `grad_accum` micro-batches whose gradients (of the loss scaled by
//! `1 / grad_accum`) are summed, so an accumulated update equals one big batch. AdamW steps with
//! the scheduled learning rate and gradient-norm clipping (global, as torch's `clip_grad_norm_`,
//! unless `train.grad_clip = "per_tensor"`). Every update logs loss, the gradient norm before
//! clipping, learning rate, reward mean/std (and a TensorBoard histogram), the method's scalars,
//! the reward queries spent and wall time; with `grad_accum > 1` also the gradient noise scale's
//! two terms (`grad_signal_sq`, `grad_noise_trace`: McCandlish et al. 2018, from the micro-batch
//! and the accumulated gradients), whose ratio says how many examples a step needs before its
//! signal outweighs its noise. Validation (held-out prompts, fixed seeds: the caller's hook) runs at the start,
//! every `log.val_every` updates and at the end. Checkpoints hold the trainable weights with their
//! parameter ids, the optimizer moments, the random stream and the method's state, written
//! atomically: `--resume latest` continues exactly as an uninterrupted run. A non-finite loss or
//! reward stops the run with the update number.

use crate::batch::{
    Batch, Collect, Labeled, Pairs, Prompts, Rollouts, Samples, Starts, Supervised,
};
use crate::config::{AlignConfig, AlignTrainSection};
use crate::policy::{Policy, PolicyModel};
use crate::{Algorithm, Context};
use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use std::time::Instant;
use tiller_core::rng::RngState;
use tiller_core::{Error, Result, SeededRng};
use tiller_diffusion::LogProbReduction;
use tiller_diffusion::sampling::{ExampleNoise, Record, initial_noise, sample};
use tiller_engine::checkpoint::{
    CheckpointStore, Resume, load_module, load_optimizer, load_state, save_module, save_optimizer,
    save_state,
};
use tiller_engine::schedule::LrSchedule;
use tiller_engine::{MetricsLog, Progress, RunDir};
use tiller_reward::{Reward, tensor_to_images};

/// One preference pair: the prompt and both images as CHW floats in [-1, 1].
#[derive(Debug, Clone)]
pub struct PreferencePair {
    pub prompt: String,
    pub chosen: Vec<f32>,
    pub rejected: Vec<f32>,
}

/// One image with a like or a dislike (pixels CHW in [-1, 1]).
#[derive(Debug, Clone)]
pub struct LabeledImage {
    pub prompt: String,
    pub pixels: Vec<f32>,
    pub like: bool,
}

/// What the loop trains on.
pub struct AlignData<'a> {
    /// Training prompts; each update draws its prompts uniformly from them.
    pub prompts: Vec<String>,
    /// Preference pairs (Diffusion-DPO).
    pub pairs: Vec<PreferencePair>,
    /// Liked and disliked images (Diffusion-KTO).
    pub labels: Vec<LabeledImage>,
    /// Reward queries spent before training starts (the labels behind `pairs` or `labels`).
    pub upfront_queries: u64,
    /// The base model's own training data, for methods that regularise with it (ReFL,
    /// reward-weighted likelihood): example index -> (prompt, pixels CHW in [-1, 1]), the same
    /// for the same index. The testbed renders its training prompts.
    pub pretrain: Option<&'a PretrainSource<'a>>,
    /// Texts -> their conditioning ([`PromptEncoder`]); a closure of the text encoder's hidden
    /// states [N, L, D] is one.
    pub encode: &'a dyn PromptEncoder,
    /// The images' shape [C, H, W] (stored and pre-training images, what rewards see); the
    /// model's samples have [`Policy::sample_shape`] of it (latents for a latent pipeline).
    pub image_shape: [usize; 3],
}

/// Texts -> their [`Prompts`] on the plain device: the context, guidance's unconditional half and
/// any added conditioning (SDXL's pooled embedding and time ids).
pub trait PromptEncoder {
    fn encode(&self, texts: &[String]) -> Result<Prompts>;
}

/// A text encoder's hidden states of texts [N, L, D]: the prompts' context, and the empty
/// prompt's as guidance's unconditional half (SD 1.x/2.x and the testbed).
impl<F: Fn(&[String]) -> Result<Tensor<3>>> PromptEncoder for F {
    fn encode(&self, texts: &[String]) -> Result<Prompts> {
        Ok(Prompts {
            texts: texts.to_vec(),
            context: self(texts)?,
            uncond: self(&vec![String::new(); texts.len()])?,
            added: None,
        })
    }
}

/// Pre-training example `i` of a run: its prompt and its image (CHW floats in [-1, 1]).
pub type PretrainSource<'a> = dyn Fn(u64) -> Result<(String, Vec<f32>)> + 'a;

/// Called with the update number and the current weights (adapters merged, plain device);
/// returns scalars to log under `val/`.
pub type Validate<'a, M> = dyn FnMut(u64, &M) -> Result<Vec<(String, f64)>> + 'a;

/// What [`align`] returns.
pub struct Aligned<M: PolicyModel> {
    pub policy: Policy<M>,
    pub updates: u64,
    pub reward_queries: u64,
    pub wall_s: f64,
    /// The last validation's scalars.
    pub last_validation: Vec<(String, f64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AlignState {
    step: u64,
    rng: RngState,
    reward_queries: u64,
    wall_s: f64,
    method: serde_json::Value,
    /// Batches collected so far (absent in checkpoints of runs whose every batch took the same
    /// number of updates: `step / updates_per_batch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    batches: Option<u64>,
}

/// The policy module's record in each checkpoint folder (`tiller eval` loads it from a checkpoint).
pub const MODEL_FILE: &str = "model.bpk";
const OPTIM_FILE: &str = "optimizer.bpk";
const STATE_FILE: &str = "state.json";

/// Runs (or resumes) an alignment run. `stop_after` ends it after that many updates in this
/// process (tests of interruption).
#[allow(clippy::too_many_arguments)]
pub fn align<M: PolicyModel>(
    run: &RunDir,
    config: &AlignConfig,
    policy: Policy<M>,
    algorithm: &mut dyn Algorithm<M>,
    reward: &dyn Reward,
    data: &AlignData<'_>,
    resume: Option<&Resume>,
    stop_after: Option<u64>,
    validate: &mut Validate<'_, M>,
) -> Result<Aligned<M>> {
    let train = &config.train;
    config
        .method
        .spec()
        .check_sampler(policy.sampler.as_ref(), &policy.device)?;
    algorithm.bind(&policy)?;
    let store = CheckpointStore::new(run.checkpoints(), config.log.keep_checkpoints);
    let mut optim = optimizer(train);
    let mut policy = policy;
    let mut rng = SeededRng::new(train.seed);
    let mut step = 0u64;
    let mut batches = 0u64;
    let mut queries = data.upfront_queries;
    let mut wall_before = 0.0;
    if let Some(resume) = resume {
        let (s, dir) = store.resolve(resume)?;
        let state: AlignState = load_state(&dir.join(STATE_FILE), s, |t: &AlignState| t.step)?;
        // As at the start of a run: load into the plain module, then put it on the autodiff
        // device (loading restores parameter ids, which the optimizer state is keyed by).
        let ad = policy.autodiff_device();
        let model = load_module(&dir.join(MODEL_FILE), policy.model.valid())?;
        policy = Policy {
            model: model.to_device(&ad).train(),
            ..policy
        };
        optim = load_optimizer(&dir.join(OPTIM_FILE), optim)?;
        algorithm.restore(&state.method)?;
        algorithm.load_files(&dir, &policy.device)?;
        rng = SeededRng::from_state(&state.rng)?;
        let per_batch = algorithm.updates_per_batch().max(1) as u64;
        if !s.is_multiple_of(per_batch) {
            return Err(Error::config(
                "train.updates",
                format!(
                    "the checkpoint at update {s} ends inside a collected batch of {per_batch} \
                     updates ({} takes {per_batch} updates per batch), whose rollouts are not \
                     checkpointed; extend a run only from a checkpoint at a multiple of {per_batch}",
                    algorithm.name()
                ),
            ));
        }
        step = s;
        batches = state.batches.unwrap_or(s / per_batch);
        queries = state.reward_queries;
        wall_before = state.wall_s;
        eprintln!("resumed from {} (update {step})", dir.display());
    }

    let lr = LrSchedule {
        peak: train.learning_rate,
        warmup_steps: train.warmup_steps,
        total_steps: train.updates,
        shape: train.lr_schedule,
    };
    let mut metrics = MetricsLog::open(run.root(), resume.map(|_| step))?;
    let mut rollouts = RolloutLog::open(run.root(), resume.map(|_| step))?;
    let per_batch = algorithm.updates_per_batch() as u64;
    eprintln!(
        "align {}: {} updates, effective batch {} = {} per micro-batch x {} accumulation{}{}, lr {:.1e}, reward {}",
        algorithm.name(),
        train.updates,
        train.effective_batch(),
        train.batch_size,
        train.grad_accum,
        match train.images_per_prompt {
            1 => String::new(),
            k => format!(" ({} prompts x {k} images)", train.effective_batch() / k),
        },
        if per_batch > 1 {
            format!(", {per_batch} updates per collected batch")
        } else {
            String::new()
        },
        train.learning_rate,
        reward.name(),
    );
    let started = Instant::now();
    let wall = |started: &Instant| wall_before + started.elapsed().as_secs_f64();
    let mut last_validation = Vec::new();
    let mut validated_at = None;
    if resume.is_none() {
        last_validation = validate(0, &policy.merged())?;
        log_validation(&mut metrics, 0, &last_validation, queries, 0.0)?;
        validated_at = Some(0);
    }

    let mut progress = Progress::new(algorithm.name(), step, train.updates);
    let mut done_here = 0u64;
    let upfront = data.upfront_queries;
    let budget_left =
        |q: u64| train.reward_budget == 0 || q.saturating_sub(upfront) < train.reward_budget;
    while step < train.updates && budget_left(queries) && stop_after.is_none_or(|n| done_here < n) {
        // ---- collect and score the whole effective batch
        let n = train.effective_batch();
        // What the method asks of this batch (SEIKO's query batches take no update).
        let updates = algorithm.updates_per_batch();
        let draw = Draw {
            n,
            group: train.images_per_prompt,
            micro: train.batch_size,
            seed: train.seed,
            first: batches * n as u64,
        };
        let (mut batch, collected_rewards) =
            collect(algorithm.collects(), &policy, reward, data, draw, &mut rng)?;
        batches += 1;
        if algorithm.pretrain() {
            attach_pretrain(&mut batch, algorithm.name(), &policy, data, draw)?;
        }
        queries += collected_rewards.len() as u64;
        rollouts.log(step + 1, &batch.prompts().texts, &collected_rewards)?;
        let prepared = {
            let cx = Context {
                policy: &policy,
                reward,
                kl_weight: train.kl_weight,
            };
            algorithm.prepare(&cx, &mut batch, &mut rng)?
        };

        let mut checkpoint_due = false;
        let mut taken = 0;
        for epoch in 0..updates {
            if step >= train.updates || stop_after.is_some_and(|m| done_here >= m) {
                break;
            }
            taken += 1;
            algorithm.begin_update(&mut batch, epoch, &mut rng)?;
            // ---- micro-batches: gradients of loss / grad_accum, summed
            let scale = 1.0 / train.grad_accum as f64;
            let mut acc = GradientsAccumulator::<M>::new();
            let mut loss = 0.0;
            let mut sums: Vec<(&'static str, f64)> = Vec::new();
            let mut step_rewards = collected_rewards.clone();
            let mut micro_sq = 0.0;
            for m in 0..train.grad_accum {
                let micro = batch.slice(m * train.batch_size..(m + 1) * train.batch_size);
                let cx = Context {
                    policy: &policy,
                    reward,
                    kl_weight: train.kl_weight,
                };
                let out = algorithm.gradients(&cx, &micro, scale, &mut rng)?;
                if !out.loss.is_finite() {
                    return Err(Error::NonFinite(format!(
                        "{} loss {} at update {} (micro-batch {m})",
                        algorithm.name(),
                        out.loss,
                        step + 1
                    )));
                }
                loss += out.loss * scale;
                for (k, v) in out.metrics {
                    match sums.iter_mut().find(|(n, _)| *n == k) {
                        Some((_, s)) => *s += v * scale,
                        None => sums.push((k, v * scale)),
                    }
                }
                queries += out.rewards.len() as u64;
                step_rewards.extend(out.rewards);
                if train.grad_accum > 1 {
                    // The micro-batch's own mean gradient is `out.grads / scale`.
                    let norm = tiller_engine::optim::grad_norm(&policy.model, &out.grads) / scale;
                    micro_sq += norm * norm / train.grad_accum as f64;
                }
                acc.accumulate(&policy.model, out.grads);
            }
            let rate = lr.at(step);
            let (stepped, grad_norm) = optimizer_step(policy, &mut optim, acc.grads(), train, rate);
            policy = stepped;
            step += 1;
            done_here += 1;

            // ---- log
            let secs = wall(&started);
            let mut values: Vec<(&str, f64)> = vec![
                ("loss", loss),
                ("grad_norm", grad_norm),
                ("lr", rate),
                ("reward_queries", queries as f64),
                ("wall_s", secs),
                (
                    "samples_per_s",
                    (done_here as f64 * n as f64) / started.elapsed().as_secs_f64().max(1e-9),
                ),
            ];
            if !step_rewards.is_empty() {
                let (m, s) = crate::methods::ddpo::mean_std(&step_rewards);
                values.push(("reward_mean", m));
                values.push(("reward_std", s));
                metrics.histogram("reward", step, &step_rewards)?;
            }
            if train.grad_accum > 1 {
                // The gradient noise scale's two terms (McCandlish et al. 2018), in examples
                // (rollouts, pairs or samples) per batch.
                let (signal, trace) = tiller_engine::optim::noise_terms(
                    micro_sq,
                    grad_norm * grad_norm,
                    train.batch_size as f64,
                    n as f64,
                );
                values.push(("grad_signal_sq", signal));
                values.push(("grad_noise_trace", trace));
            }
            values.extend(prepared.iter().copied());
            values.extend(sums.iter().copied());
            metrics.log(step, &values)?;
            let status = match step_rewards.is_empty() {
                true => format!("loss {loss:.4}"),
                false => format!(
                    "loss {loss:.4} reward {:.3}",
                    step_rewards.iter().sum::<f64>() / step_rewards.len() as f64
                ),
            };
            progress.update(step, &status);

            // ---- validate, checkpoint
            // The run's last update: the budget ends a run only after the batch's updates.
            let last = step == train.updates || (!budget_left(queries) && epoch + 1 == updates);
            if (config.log.val_every > 0 && step.is_multiple_of(config.log.val_every)) || last {
                last_validation = validate(step, &policy.merged())?;
                log_validation(
                    &mut metrics,
                    step,
                    &last_validation,
                    queries,
                    wall(&started),
                )?;
                validated_at = Some(step);
            }
            checkpoint_due |= step.is_multiple_of(config.log.checkpoint_every.max(1)) || last;
        }
        // Checkpoints fall on batch boundaries (or the run's end): a resumed run collects its
        // next batch exactly as the uninterrupted one does.
        let last = step == train.updates || !budget_left(queries);
        if checkpoint_due && (taken == updates || last) {
            save_checkpoint(
                &store,
                Progressed {
                    step,
                    batches,
                    queries,
                    wall_s: wall(&started),
                },
                &policy,
                &optim,
                &rng,
                algorithm,
            )?;
        }
    }
    let finished = step >= train.updates || !budget_left(queries);
    if finished && validated_at != Some(step) {
        last_validation = validate(step, &policy.merged())?;
        log_validation(
            &mut metrics,
            step,
            &last_validation,
            queries,
            wall(&started),
        )?;
    }
    metrics.flush()?;
    let wall_s = wall(&started);
    Ok(Aligned {
        policy,
        updates: step,
        reward_queries: queries,
        wall_s,
        last_validation,
    })
}

/// The run's AdamW (`[train]`: betas, epsilon, decoupled weight decay, per-tensor clipping when
/// `train.grad_clip = "per_tensor"`).
pub fn optimizer(train: &AlignTrainSection) -> ModuleOptimizer {
    tiller_engine::optim::adamw(
        train.adam_beta1,
        train.adam_beta2,
        train.adam_epsilon,
        train.weight_decay,
        train.max_grad_norm,
        train.grad_clip,
    )
}

/// One optimizer update from an update's summed gradients: clipped as `train.grad_clip` says
/// (global by default, torch's `clip_grad_norm_`), then an AdamW step at learning rate `rate`.
/// Returns the stepped policy and the gradient norm before clipping.
pub fn optimizer_step<M: PolicyModel>(
    policy: Policy<M>,
    optim: &mut ModuleOptimizer,
    mut grads: GradientsParams,
    train: &AlignTrainSection,
    rate: f64,
) -> (Policy<M>, f64) {
    let grad_norm = tiller_engine::optim::clip_gradients(
        &policy.model,
        &mut grads,
        train.max_grad_norm,
        train.grad_clip,
    );
    let model = optim.step(rate, policy.model, grads);
    (Policy { model, ..policy }, grad_norm)
}

/// `rollouts.jsonl`: every scored rollout's prompt and reward, one line each, under the update it
/// trained (TRL's completions table; what a reference implementation needs to train on the same
/// prompts). On resume, lines of updates after the checkpoint are dropped, as in `metrics.jsonl`.
struct RolloutLog {
    path: std::path::PathBuf,
    file: Option<std::fs::File>,
}

impl RolloutLog {
    const FILE: &'static str = "rollouts.jsonl";

    fn open(dir: &std::path::Path, resume_step: Option<u64>) -> Result<Self> {
        let path = dir.join(Self::FILE);
        if let Some(step) = resume_step {
            tiller_engine::metrics::drop_lines_after(&path, "update", step)?;
        }
        Ok(Self { path, file: None })
    }

    fn log(&mut self, update: u64, prompts: &[String], rewards: &[f64]) -> Result<()> {
        use std::io::Write;
        if rewards.is_empty() {
            return Ok(());
        }
        if self.file.is_none() {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(|e| Error::io(&self.path, e))?;
            self.file = Some(f);
        }
        let mut text = String::new();
        for (p, r) in prompts.iter().zip(rewards) {
            let line = serde_json::json!({ "update": update, "prompt": p, "reward": r });
            text.push_str(&line.to_string());
            text.push('\n');
        }
        let file = self.file.as_mut().expect("opened above");
        file.write_all(text.as_bytes())
            .and_then(|_| file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }
}

fn log_validation(
    metrics: &mut MetricsLog,
    step: u64,
    values: &[(String, f64)],
    queries: u64,
    wall_s: f64,
) -> Result<()> {
    let mut v: Vec<(String, f64)> = values
        .iter()
        .map(|(k, x)| (format!("val/{k}"), *x))
        .collect();
    v.push(("val/reward_queries".into(), queries as f64));
    v.push(("val/wall_s".into(), wall_s));
    let refs: Vec<(&str, f64)> = v.iter().map(|(k, x)| (k.as_str(), *x)).collect();
    metrics.log(step, &refs)
}

/// Draws `n / group` prompts (uniformly, with replacement), repeats each `group` times side by
/// side, and encodes them.
fn draw_prompts(
    data: &AlignData<'_>,
    n: usize,
    group: usize,
    rng: &mut SeededRng,
) -> Result<Prompts> {
    if data.prompts.is_empty() {
        return Err(Error::invalid("no training prompts"));
    }
    let group = group.max(1);
    let texts: Vec<String> = (0..n / group)
        .flat_map(|_| {
            let p = &data.prompts[rng.below(data.prompts.len())];
            std::iter::repeat_n(p.clone(), group)
        })
        .collect();
    encode_prompts(data, texts)
}

fn encode_prompts(data: &AlignData<'_>, texts: Vec<String>) -> Result<Prompts> {
    let prompts = data.encode.encode(&texts)?;
    if prompts.len() != texts.len() || prompts.context.dims()[0] != texts.len() {
        return Err(Error::invalid(format!(
            "the prompt encoder returned {} rows for {} prompts",
            prompts.context.dims()[0],
            texts.len()
        )));
    }
    Ok(prompts)
}

/// The size and layout of one collection: `n` examples, `group` per drawn prompt side by side,
/// sampled `micro` at a time. Example `i`'s noise (initial, step, and a pair's noise and
/// timestep) is stream `first + i` of `seed` ([`SeededRng::for_example`]), so what an example
/// gets depends on (seed, its global index) and never on `micro`.
#[derive(Debug, Clone, Copy)]
pub struct Draw {
    pub n: usize,
    pub group: usize,
    pub micro: usize,
    pub seed: u64,
    pub first: u64,
}

/// Collects one update's batch (prompts and pairs drawn from `rng`, noise per example as
/// [`Draw`] says); returns it with the rewards spent on it.
pub fn collect<M: PolicyModel>(
    kind: Collect,
    policy: &Policy<M>,
    reward: &dyn Reward,
    data: &AlignData<'_>,
    draw: Draw,
    rng: &mut SeededRng,
) -> Result<(Batch, Vec<f64>)> {
    let [c, h, w] = policy.sample_shape(data.image_shape)?;
    let device = &policy.device;
    let Draw {
        n,
        group,
        micro,
        seed,
        first,
    } = draw;
    let indices = first..first + n as u64;
    match kind {
        Collect::Rollouts | Collect::SharedStartRollouts => {
            let prompts = draw_prompts(data, n, group, rng)?;
            let current = policy.current();
            let steps = policy.sampler.timesteps().len();
            let mut latents: Vec<Vec<Tensor<4>>> = vec![Vec::new(); steps + 1];
            let mut log_probs: Vec<Vec<Tensor<1>>> = vec![Vec::new(); steps];
            let mut predicted: Vec<Vec<Tensor<4>>> = vec![Vec::new(); steps];
            let mut stochastic = vec![true; steps];
            // Sampled in micro-batches: the same batch layout as training, so the first ratio
            // of an on-policy update is exactly 1.
            let mut noise = ExampleNoise::for_examples(seed, indices);
            let shared = (kind == Collect::SharedStartRollouts).then_some(group);
            let x_t = chain_starts(policy, &mut noise, [n, c, h, w], shared)?;
            let record = Record::Trajectory(LogProbReduction::Mean);
            let parts = sample_parts(policy, &current, &prompts, (&x_t, &noise), micro, record)?;
            for s in parts {
                let traj = s.trajectory.expect("recorded");
                for (i, x) in traj.latents.into_iter().enumerate() {
                    latents[i].push(x);
                }
                for (i, x0) in traj.predicted.into_iter().enumerate() {
                    predicted[i].push(x0);
                }
                for (i, lp) in traj.log_probs.into_iter().enumerate() {
                    match lp {
                        Some(lp) => log_probs[i].push(lp),
                        None => stochastic[i] = false,
                    }
                }
            }
            if !stochastic.iter().any(|s| *s) {
                return Err(Error::config(
                    "sampling.eta",
                    "rollouts need stochastic steps (eta > 0)",
                ));
            }
            let latents: Vec<Tensor<4>> = latents.into_iter().map(|v| Tensor::cat(v, 0)).collect();
            let log_probs: Vec<Option<Tensor<1>>> = log_probs
                .into_iter()
                .zip(&stochastic)
                .map(|(v, s)| s.then(|| Tensor::cat(v, 0)))
                .collect();
            let images = tensor_to_images(policy.images(latents[steps].clone()))?;
            let rewards = reward.score(&images, &prompts.texts)?;
            check_finite(&rewards, reward)?;
            Ok((
                Batch::Rollouts(Rollouts {
                    prompts,
                    latents,
                    timesteps: policy.sampler.timesteps().to_vec(),
                    log_probs,
                    predicted: predicted.into_iter().map(|v| Tensor::cat(v, 0)).collect(),
                    rewards: rewards.clone(),
                    advantages: Vec::new(),
                    step_advantages: Vec::new(),
                    train_steps: Vec::new(),
                    group,
                }),
                rewards,
            ))
        }
        Collect::Pairs | Collect::PairsWithOwnSamples => {
            if data.pairs.is_empty() {
                return Err(Error::invalid(
                    "no preference pairs (collect feedback into the store first)",
                ));
            }
            let picks: Vec<&PreferencePair> = (0..n)
                .map(|_| &data.pairs[rng.below(data.pairs.len())])
                .collect();
            let prompts = encode_prompts(data, picks.iter().map(|p| p.prompt.clone()).collect())?;
            let stack = |f: &dyn Fn(&PreferencePair) -> &Vec<f32>| {
                encode_stored(policy, picks.iter().map(|p| f(p).as_slice()), data, micro)
            };
            let chosen = stack(&|p| &p.chosen)?;
            let rejected = if kind == Collect::Pairs {
                stack(&|p| &p.rejected)?
            } else {
                // The current model's sample of each pair's prompt, its chain from the
                // example's own stream (apart from the pair's training noise).
                let current = policy.current();
                let mut noise = ExampleNoise::for_examples(seed ^ OWN_SAMPLE_SALT, indices.clone());
                let x_t = chain_starts(policy, &mut noise, [n, c, h, w], None)?;
                let parts = sample_parts(
                    policy,
                    &current,
                    &prompts,
                    (&x_t, &noise),
                    micro,
                    Record::Nothing,
                )?;
                let x0 = Tensor::cat(parts.into_iter().map(|s| s.images).collect(), 0);
                match policy.latents {
                    // As the stored images are: in the image range.
                    None => x0.clamp(-1.0, 1.0),
                    Some(_) => x0,
                }
            };
            // Each pair's shared noise and timestep from its own stream.
            let (values, timesteps) = example_noise_and_timesteps(policy, indices, seed, [c, h, w]);
            let noise = Tensor::<4>::from_data(TensorData::new(values, [n, c, h, w]), device);
            Ok((
                Batch::Pairs(Pairs {
                    prompts,
                    chosen,
                    rejected,
                    noise,
                    timesteps,
                }),
                Vec::new(),
            ))
        }
        Collect::Labeled => {
            if data.labels.is_empty() {
                return Err(Error::invalid(
                    "no liked or disliked images (collect likes into the store first)",
                ));
            }
            let picks: Vec<&LabeledImage> = (0..n)
                .map(|_| &data.labels[rng.below(data.labels.len())])
                .collect();
            let prompts = encode_prompts(data, picks.iter().map(|p| p.prompt.clone()).collect())?;
            let images = encode_stored(
                policy,
                picks.iter().map(|p| p.pixels.as_slice()),
                data,
                micro,
            )?;
            let (noise, timesteps) = example_noise_and_timesteps(policy, indices, seed, [c, h, w]);
            Ok((
                Batch::Labeled(Labeled {
                    prompts,
                    images,
                    likes: picks.iter().map(|p| p.like).collect(),
                    noise: Tensor::<4>::from_data(TensorData::new(noise, [n, c, h, w]), device),
                    timesteps,
                }),
                Vec::new(),
            ))
        }
        Collect::Starts => {
            let prompts = draw_prompts(data, n, group, rng)?;
            let mut noise = ExampleNoise::for_examples(seed, indices);
            let x_t = initial_noise(policy.sampler.as_ref(), [n, c, h, w], &mut noise, device)?;
            Ok((
                Batch::Starts(Starts {
                    prompts,
                    x_t,
                    noise,
                    pretrain: None,
                }),
                Vec::new(),
            ))
        }
        Collect::Samples => {
            let prompts = draw_prompts(data, n, group, rng)?;
            let current = policy.current();
            let mut noise = ExampleNoise::for_examples(seed, indices.clone());
            let x_t = chain_starts(policy, &mut noise, [n, c, h, w], None)?;
            let parts: Vec<Tensor<4>> = sample_parts(
                policy,
                &current,
                &prompts,
                (&x_t, &noise),
                micro,
                Record::Nothing,
            )?
            .into_iter()
            .map(|s| s.images)
            .collect();
            // Scored as the reward sees them: clipped to the image range; a pixel model is
            // trained on the clipped images too, a latent pipeline on its latents.
            let x0 = Tensor::cat(parts, 0);
            let pixels = policy.images(x0.clone()).clamp(-1.0, 1.0);
            let rewards = reward.score(&tensor_to_images(pixels.clone())?, &prompts.texts)?;
            let images = match policy.latents {
                None => pixels,
                Some(_) => x0,
            };
            check_finite(&rewards, reward)?;
            // Each sample's training noise and timestep from a stream of its own, apart from
            // the chain's.
            let (values, timesteps) =
                example_noise_and_timesteps(policy, indices, seed ^ SAMPLE_SALT, [c, h, w]);
            let noise = Tensor::<4>::from_data(TensorData::new(values, [n, c, h, w]), device);
            Ok((
                Batch::Samples(Samples {
                    samples: Supervised {
                        prompts,
                        images,
                        noise,
                        timesteps,
                    },
                    rewards: rewards.clone(),
                    weights: Vec::new(),
                    group,
                    pretrain: None,
                }),
                rewards,
            ))
        }
    }
}

/// The initial latents x_T [N, C, H, W] of `N` chains, each from its own stream in `noise` (which
/// advances past them); with `shared = Some(group)`, the chains in groups of `group` side by side
/// all take the x_T of their group's first chain. Every stream draws its own either way, so each
/// chain's step noise is what it would be with a start of its own.
fn chain_starts<M: PolicyModel>(
    policy: &Policy<M>,
    noise: &mut ExampleNoise,
    shape: [usize; 4],
    shared: Option<usize>,
) -> Result<Tensor<4>> {
    let own = initial_noise(policy.sampler.as_ref(), shape, noise, &policy.device)?;
    let Some(group) = shared else {
        return Ok(own);
    };
    let group = group.max(1);
    let leads: Vec<i64> = (0..shape[0]).map(|i| (i - i % group) as i64).collect();
    let leads = Tensor::<1, Int>::from_data(TensorData::new(leads, [shape[0]]), &policy.device);
    Ok(own.select(0, leads))
}

/// The chains of `prompts` from their starts `x_t` ([`chain_starts`]) sampled by `model` (the
/// policy's current weights) `micro` at a time, each example's step noise from its own stream in
/// `noise`: the same batch layout as training, so the first ratio of an on-policy update is
/// exactly 1.
fn sample_parts<M: PolicyModel>(
    policy: &Policy<M>,
    model: &M,
    prompts: &Prompts,
    (x_t, noise): (&Tensor<4>, &ExampleNoise),
    micro: usize,
    record: Record,
) -> Result<Vec<tiller_diffusion::sampling::Sample>> {
    let n = prompts.len();
    let device = &policy.device;
    let mut out = Vec::new();
    for start in (0..n).step_by(micro.max(1)) {
        let range = start..(start + micro).min(n);
        let part = prompts.slice(range.clone());
        let mut part_noise = noise.slice(range.clone());
        let cond = policy.conditioning(&part, device);
        out.push(sample(
            model,
            policy.sampler.as_ref(),
            &cond,
            x_t.clone().narrow(0, range.start, range.len()),
            &mut part_noise,
            record,
        )?);
    }
    Ok(out)
}

/// Salts of the per-example streams of a sample's training noise and of pre-training examples,
/// apart from the chain's stream (`seed`) of the same example.
const SAMPLE_SALT: u64 = 0x5a3b_1e00_0000_0001;
const PRETRAIN_SALT: u64 = 0x9e37_79b9_7f4a_7c15;
/// Salt of the per-example chain stream of a pair's own sample ([`Collect::PairsWithOwnSamples`]).
const OWN_SAMPLE_SALT: u64 = 0x2545_f491_4f6c_dd1d;

/// Adds one pre-training image per example (`data.pretrain` of the example's global index, with
/// its noise and timestep from the example's own pre-training stream) to a batch of chain starts
/// or samples.
pub fn attach_pretrain<M: PolicyModel>(
    batch: &mut Batch,
    method: &str,
    policy: &Policy<M>,
    data: &AlignData<'_>,
    draw: Draw,
) -> Result<()> {
    let source = data.pretrain.ok_or_else(|| {
        Error::invalid(format!(
            "{method} trains on the base model's own training data as well, and this run has none"
        ))
    })?;
    let [c, h, w] = data.image_shape;
    let indices = draw.first..draw.first + draw.n as u64;
    let mut texts = Vec::with_capacity(draw.n);
    let mut images = Vec::with_capacity(draw.n);
    for i in indices.clone() {
        let (prompt, image) = source(i)?;
        if image.len() != c * h * w {
            return Err(Error::invalid(format!(
                "pre-training image {i} has {} values; the model's images have {c}x{h}x{w}",
                image.len()
            )));
        }
        texts.push(prompt);
        images.push(image);
    }
    let device = &policy.device;
    let shape = policy.sample_shape(data.image_shape)?;
    let [sc, sh, sw] = shape;
    let (noise, timesteps) =
        example_noise_and_timesteps(policy, indices, draw.seed ^ PRETRAIN_SALT, shape);
    let supervised = Supervised {
        prompts: encode_prompts(data, texts)?,
        images: encode_stored(policy, images.iter().map(Vec::as_slice), data, draw.micro)?,
        noise: Tensor::<4>::from_data(TensorData::new(noise, [draw.n, sc, sh, sw]), device),
        timesteps,
    };
    match batch {
        Batch::Starts(s) => s.pretrain = Some(supervised),
        Batch::Samples(s) => s.pretrain = Some(supervised),
        _ => {
            return Err(Error::invalid(format!(
                "{method}: pre-training images go with chain starts or samples"
            )));
        }
    }
    Ok(())
}

/// Stored images (CHW floats in [-1, 1] of `data.image_shape`) as the model's samples [N, C, h,
/// w] on the plain device: the images for a pixel model, their latents for a latent pipeline,
/// encoded `micro` at a time (an image's latent does not depend on the batch: the posterior's
/// mode).
fn encode_stored<'a, M: PolicyModel>(
    policy: &Policy<M>,
    images: impl Iterator<Item = &'a [f32]>,
    data: &AlignData<'_>,
    micro: usize,
) -> Result<Tensor<4>> {
    let [c, h, w] = data.image_shape;
    let images: Vec<&[f32]> = images.collect();
    if let Some(bad) = images.iter().find(|p| p.len() != c * h * w) {
        return Err(Error::invalid(format!(
            "a stored image has {} values; this run's images are {c}x{h}x{w} \
             (sampling.resolution {h}): store images of the run's size",
            bad.len()
        )));
    }
    let mut parts = Vec::new();
    for chunk in images.chunks(micro.max(1)) {
        let v: Vec<f32> = chunk.iter().flat_map(|p| p.iter().copied()).collect();
        let t = Tensor::<4>::from_data(TensorData::new(v, [chunk.len(), c, h, w]), &policy.device);
        parts.push(policy.encode_images(t)?);
    }
    Ok(Tensor::cat(parts, 0))
}

/// Each example's training noise [C, H, W] and timestep, from its own stream (its pair's, its
/// labelled image's), whatever the micro-batch.
fn example_noise_and_timesteps<M: PolicyModel>(
    policy: &Policy<M>,
    indices: std::ops::Range<u64>,
    seed: u64,
    [c, h, w]: [usize; 3],
) -> (Vec<f32>, Vec<f64>) {
    let num_train = policy.noise.num_train_timesteps();
    let mut values = Vec::with_capacity(indices.clone().count() * c * h * w);
    let mut timesteps = Vec::new();
    for i in indices {
        let mut r = SeededRng::for_example(seed, i);
        values.extend(r.normal_vec(c * h * w));
        timesteps.push(r.below(num_train) as f64);
    }
    (values, timesteps)
}

fn check_finite(rewards: &[f64], reward: &dyn Reward) -> Result<()> {
    match rewards.iter().position(|r| !r.is_finite()) {
        Some(i) => Err(Error::NonFinite(format!(
            "reward `{}` returned {} for sample {i}",
            reward.name(),
            rewards[i]
        ))),
        None => Ok(()),
    }
}

/// How far a run has come: what a checkpoint records besides weights and states.
struct Progressed {
    step: u64,
    batches: u64,
    queries: u64,
    wall_s: f64,
}

fn save_checkpoint<M: PolicyModel>(
    store: &CheckpointStore,
    at: Progressed,
    policy: &Policy<M>,
    optim: &ModuleOptimizer,
    rng: &SeededRng,
    algorithm: &dyn Algorithm<M>,
) -> Result<()> {
    store.save(at.step, |dir| {
        save_module(&dir.join(MODEL_FILE), &policy.model)?;
        save_optimizer(&dir.join(OPTIM_FILE), optim)?;
        let state = AlignState {
            step: at.step,
            rng: rng.state(),
            reward_queries: at.queries,
            wall_s: at.wall_s,
            method: algorithm.state(),
            batches: Some(at.batches),
        };
        algorithm.save_files(dir)?;
        save_state(&dir.join(STATE_FILE), &state)
    })?;
    Ok(())
}
