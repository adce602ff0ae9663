//! Training a text-to-image denoiser from scratch or fine-tuning it with the plain diffusion
//! objective (Ho et al. 2020): x_t = add_noise(x_0, eps, t) with t ~ U{0, ..., T-1}, and the loss
//! is the mean squared error between the UNet's prediction and the scheduler's training target
//! (eps, v or x_0). The text encoder trains jointly. Prompts are dropped to the empty prompt with
//! probability `cond_dropout` so the model also learns the unconditional prediction that
//! classifier-free guidance needs (Ho & Salimans 2022).
//!
//! The loop has what users of diffusers' training scripts expect: AdamW, gradient-norm clipping,
//! learning-rate warm-up, EMA, JSONL + TensorBoard metrics, fixed-seed sample hooks, atomic
//! checkpoints with retention, and `--resume` that continues exactly: the checkpoint holds the
//! weights (with their parameter ids), the optimizer moments, the EMA and the random stream, so a
//! resumed run computes the same updates as an uninterrupted one.

use crate::checkpoint::{
    CheckpointStore, Resume, load_module, load_optimizer, load_state, save_module, save_optimizer,
    save_state,
};
use crate::ema::Ema;
use crate::metrics::MetricsLog;
use crate::progress::Progress;
use crate::run_dir::RunDir;
use crate::schedule::{LrSchedule, LrShape};
use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tiller_core::{Error, Result, SeededRng, rng::RngState};
use tiller_diffusion::models::clip::ClipTextModel;
use tiller_diffusion::models::unet::UNet2DConditionModel;
use tiller_diffusion::schedulers::Scheduler;

/// The trainable parts of a text-to-image model, as one module so one optimizer and one EMA
/// cover both.
#[derive(Module, Debug)]
pub struct TextToImageModules {
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
}

impl TextToImageModules {
    /// The UNet's prediction for noisy images: x_t [B, C, H, W], t [B], ids [B][L].
    pub fn predict(&self, x_t: Tensor<4>, t: Tensor<1>, ids: &[Vec<i64>]) -> Result<Tensor<4>> {
        let device = x_t.device();
        let ctx = self
            .text_encoder
            .forward_ids(ids, &device)?
            .last_hidden_state;
        Ok(self.unet.forward(x_t, t, ctx))
    }
}

/// Where training batches come from.
pub trait DenoiserData {
    /// `n` training examples: token ids (each row of the text encoder's length) and images
    /// [n, C, H, W] in [-1, 1], row-major. All randomness must come from `rng`.
    fn batch(&mut self, n: usize, rng: &mut SeededRng) -> Result<(Vec<Vec<i64>>, Vec<f32>)>;
    /// The empty prompt's token ids (used for conditioning dropout).
    fn empty_prompt(&self) -> Vec<i64>;
    /// [C, H, W] of the images.
    fn image_shape(&self) -> [usize; 3];
}

/// What one batch regresses onto: the noisy inputs at their timesteps, the targets of the
/// network's output, and optional per-example loss weights (the loss is the mean over examples of
/// `weight x mean squared error`; no weights means weight 1).
pub struct Regression {
    /// Training timesteps [B], as fed to the UNet.
    pub timesteps: Vec<f64>,
    /// [B, C, H, W].
    pub x_t: Tensor<4>,
    /// [B, C, H, W].
    pub target: Tensor<4>,
    pub weights: Option<Vec<f64>>,
}

/// The objective [`train_denoiser`] trains: the diffusion loss ([`DiffusionObjective`]) or, for
/// instance, a distillation target (`crate::distill`).
pub trait Objective {
    /// The regression for clean images `x0` [B, C, H, W] (in [-1, 1], on `device`, no graph)
    /// and their prompts' token ids (after conditioning dropout). All randomness must come from
    /// `rng`, so a resumed run draws what an uninterrupted one does.
    fn regression(
        &self,
        x0: Tensor<4>,
        ids: &[Vec<i64>],
        rng: &mut SeededRng,
        device: &Device,
    ) -> Result<Regression>;
}

/// The plain diffusion objective: t ~ U{0, ..., T-1}, x_t = add_noise(x0, eps, t), and the
/// scheduler's training target (eps, v or x0), every example weighted 1.
pub struct DiffusionObjective<'a>(pub &'a dyn Scheduler);

impl Objective for DiffusionObjective<'_> {
    fn regression(
        &self,
        x0: Tensor<4>,
        _ids: &[Vec<i64>],
        rng: &mut SeededRng,
        device: &Device,
    ) -> Result<Regression> {
        let scheduler = self.0;
        let shape = x0.dims();
        let timesteps: Vec<f64> = (0..shape[0])
            .map(|_| rng.below(scheduler.num_train_timesteps()) as f64)
            .collect();
        let noise = rng.normal(shape, device);
        let x_t = scheduler.add_noise(x0.clone(), noise.clone(), &timesteps)?;
        let target = scheduler.training_target(x0, noise, &timesteps)?;
        Ok(Regression {
            timesteps,
            x_t,
            target,
            weights: None,
        })
    }
}

/// The optimisation settings. Defaults follow diffusers' `train_text_to_image.py` where it has
/// one (AdamW betas 0.9/0.999, eps 1e-8, weight decay 1e-2, max grad norm 1.0, EMA decay 0.9999
/// with its warm-up), and small-model values where it does not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Optimizer updates in the whole run.
    pub steps: u64,
    /// Examples per update (per device).
    pub batch_size: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Linear warm-up, in updates.
    pub warmup_steps: u64,
    /// `constant` (after warm-up) or `cosine` (to 0 at the last step).
    pub lr_schedule: LrShape,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// Decoupled weight decay (AdamW).
    pub weight_decay: f64,
    /// Gradient-norm clip (see `grad_clip` for over what); 0 disables clipping.
    pub max_grad_norm: f64,
    /// `global` (torch's `clip_grad_norm_`, the default) or `per_tensor` (burn's optimizer
    /// clipping; how the shipped testbed base was trained).
    pub grad_clip: crate::optim::ClipScope,
    /// EMA decay (0 disables EMA).
    pub ema_decay: f64,
    /// Probability that an example's prompt is replaced by the empty prompt.
    pub cond_dropout: f64,
    /// The run's one seed.
    pub seed: u64,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            steps: 10_000,
            batch_size: 32,
            learning_rate: 3e-4,
            warmup_steps: 500,
            lr_schedule: LrShape::Cosine,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            weight_decay: 1e-2,
            max_grad_norm: 1.0,
            grad_clip: crate::optim::ClipScope::Global,
            ema_decay: 0.9999,
            cond_dropout: 0.1,
            seed: 0,
        }
    }
}

/// How often to log, sample and checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// Log metrics every this many updates.
    pub every: u64,
    /// Call the sample hook every this many updates (0: never).
    pub sample_every: u64,
    /// Write a checkpoint every this many updates (and at the end).
    pub checkpoint_every: u64,
    /// How many checkpoints to keep (the newest).
    pub keep_checkpoints: usize,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            every: 25,
            sample_every: 1000,
            checkpoint_every: 500,
            keep_checkpoints: 3,
        }
    }
}

/// The checkpoint's small state file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrainerState {
    step: u64,
    rng: RngState,
    ema_updates: u64,
}

const MODEL_FILE: &str = "model.bpk";
const EMA_FILE: &str = "ema.bpk";
const OPTIM_FILE: &str = "optimizer.bpk";
const STATE_FILE: &str = "state.json";

/// What [`train_denoiser`] returns.
pub struct Trained {
    /// The trained modules (without autodiff).
    pub model: TextToImageModules,
    /// The EMA modules, when EMA is on.
    pub ema: Option<TextToImageModules>,
    /// The last logged loss.
    pub last_loss: f64,
    /// The update the run reached (`train.steps` unless stopped early).
    pub step: u64,
}

/// Which weights of a checkpoint to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointWeights {
    /// The exponential moving average (what `base train` exports at the end).
    Ema,
    /// The optimised weights themselves.
    Model,
}

/// Loads the weights of a training checkpoint into `model` (built from the run's config):
/// `checkpoints` is the run's checkpoint folder, `which` the checkpoint (`latest` or a path).
/// Returns the checkpoint's step with the loaded modules.
pub fn load_checkpoint_weights(
    checkpoints: &Path,
    which: &Resume,
    weights: CheckpointWeights,
    model: TextToImageModules,
) -> Result<(u64, TextToImageModules)> {
    let store = CheckpointStore::new(checkpoints.to_path_buf(), usize::MAX);
    let (step, dir) = store.resolve(which)?;
    let file = match weights {
        CheckpointWeights::Ema => EMA_FILE,
        CheckpointWeights::Model => MODEL_FILE,
    };
    let path = dir.join(file);
    if !path.is_file() {
        return Err(Error::invalid(format!(
            "{} does not exist{}",
            path.display(),
            if weights == CheckpointWeights::Ema {
                " (was the run trained with ema_decay = 0? export the raw weights instead)"
            } else {
                ""
            }
        )));
    }
    Ok((step, load_module(&path, model)?))
}

/// Runs (or resumes) the training loop.
///
/// `model` is the freshly initialised or pretrained starting point on any device (it is moved to
/// the autodiff version of `device`); `sample_hook(step, ema_or_model)` is called every
/// `log.sample_every` updates and at the end. `stop_after` ends the run early after that many
/// updates in this process (for tests of interruption); `None` runs to `train.steps`.
#[allow(clippy::too_many_arguments)]
pub fn train_denoiser(
    run: &RunDir,
    model: TextToImageModules,
    objective: &dyn Objective,
    data: &mut dyn DenoiserData,
    train: &TrainSection,
    log: &LogSection,
    device: &Device,
    resume: Option<&Resume>,
    stop_after: Option<u64>,
    sample_hook: &mut dyn FnMut(u64, &TextToImageModules) -> Result<()>,
) -> Result<Trained> {
    let store = CheckpointStore::new(run.checkpoints(), log.keep_checkpoints);
    let mut optim: ModuleOptimizer = crate::optim::adamw(
        train.adam_beta1,
        train.adam_beta2,
        train.adam_epsilon,
        train.weight_decay,
        train.max_grad_norm,
        train.grad_clip,
    );
    let mut model = model;
    let mut rng = SeededRng::new(train.seed);
    let mut step = 0u64;
    let mut restored: Option<(TrainerState, std::path::PathBuf)> = None;
    if let Some(resume) = resume {
        let (s, dir) = store.resolve(resume)?;
        let state: TrainerState = load_state(&dir.join(STATE_FILE), s, |t: &TrainerState| t.step)?;
        // Records restore the saved parameter ids too, which the optimizer state is keyed by.
        model = load_module(&dir.join(MODEL_FILE), model)?;
        rng = SeededRng::from_state(&state.rng)?;
        step = s;
        eprintln!("resumed from {} (step {step})", dir.display());
        restored = Some((state, dir));
    }
    // Full fine-tuning: every parameter trains. In burn 0.22 moving a module to an autodiff device
    // keeps plain tensors plain; `train()` is what puts the parameters on the autodiff graph.
    let mut model = model.to_device(device).set_require_grad(true).train();
    let ad = device.clone().autodiff();
    let mut ema = (train.ema_decay > 0.0).then(|| Ema::new(&model, train.ema_decay));
    if let Some((state, dir)) = &restored {
        optim = load_optimizer(&dir.join(OPTIM_FILE), optim)?;
        if let Some(e) = &ema {
            let m = load_module(&dir.join(EMA_FILE), e.model().clone())?;
            ema = Some(Ema::restore(m, train.ema_decay, state.ema_updates));
        }
    }

    let lr = LrSchedule {
        peak: train.learning_rate,
        warmup_steps: train.warmup_steps,
        total_steps: train.steps,
        shape: train.lr_schedule,
    };
    let mut metrics = MetricsLog::open(run.root(), resume.map(|_| step))?;
    let [c, h, w] = data.image_shape();
    let b = train.batch_size;
    let empty = data.empty_prompt();
    let mut progress = Progress::new("train", step, train.steps);
    let mut last_loss = f64::NAN;
    let mut done_here = 0u64;
    let (mut loss_sum, mut loss_n, mut norm_sum) = (0.0, 0u64, 0.0);
    let started = std::time::Instant::now();

    while step < train.steps && stop_after.is_none_or(|n| done_here < n) {
        // ---- batch: prompts (some dropped), images, timesteps, noise: all from the one stream
        let (mut ids, pixels) = data.batch(b, &mut rng)?;
        for row in ids.iter_mut() {
            if rng.uniform() < train.cond_dropout {
                *row = empty.clone();
            }
        }
        let x0 = Tensor::<4>::from_data(TensorData::new(pixels, [b, c, h, w]), device);
        let reg = objective.regression(x0, &ids, &mut rng, device)?;
        let t = Tensor::<1>::from_data(
            TensorData::new(
                reg.timesteps.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                [b],
            ),
            &ad,
        );

        // ---- loss and update
        let pred = model.predict(reg.x_t.autodiff(), t, &ids)?;
        let squared = (pred - reg.target.autodiff()).powi_scalar(2);
        let loss = match &reg.weights {
            None => squared.mean(),
            Some(w) => {
                let w = Tensor::<1>::from_data(
                    TensorData::new(w.iter().map(|&v| v as f32).collect::<Vec<_>>(), [b]),
                    &ad,
                );
                (squared.reshape([b as i64, -1]).mean_dim(1).reshape([b]) * w).mean()
            }
        };
        let value = loss.clone().into_scalar::<f64>();
        if !value.is_finite() {
            return Err(Error::NonFinite(format!(
                "training loss {value} at step {}",
                step + 1
            )));
        }
        let mut grads = GradientsParams::from_grads(loss.backward(), &model);
        let norm =
            crate::optim::clip_gradients(&model, &mut grads, train.max_grad_norm, train.grad_clip);
        let rate = lr.at(step);
        model = optim.step(rate, model, grads);
        if let Some(e) = ema.as_mut() {
            e.update(&model);
        }
        step += 1;
        done_here += 1;
        last_loss = value;
        loss_sum += value;
        loss_n += 1;
        norm_sum += norm;

        // ---- log, sample, checkpoint
        if step.is_multiple_of(log.every.max(1)) || step == train.steps {
            let secs = started.elapsed().as_secs_f64();
            metrics.log(
                step,
                &[
                    ("loss", loss_sum / loss_n as f64),
                    ("grad_norm", norm_sum / loss_n as f64),
                    ("lr", rate),
                    (
                        "images_per_s",
                        (done_here * b as u64) as f64 / secs.max(1e-9),
                    ),
                ],
            )?;
            (loss_sum, loss_n, norm_sum) = (0.0, 0, 0.0);
        }
        progress.update(step, &format!("loss {value:.4} lr {rate:.2e}"));
        if log.sample_every > 0 && step.is_multiple_of(log.sample_every) {
            let view = ema
                .as_ref()
                .map(|e| e.model().clone())
                .unwrap_or_else(|| model.valid());
            sample_hook(step, &view)?;
        }
        if step.is_multiple_of(log.checkpoint_every.max(1)) || step == train.steps {
            save_checkpoint(&store, step, &model, &optim, ema.as_ref(), &rng)?;
        }
    }
    metrics.flush()?;
    Ok(Trained {
        model: model.valid(),
        ema: ema.map(|e| e.model().clone()),
        last_loss,
        step,
    })
}

fn save_checkpoint(
    store: &CheckpointStore,
    step: u64,
    model: &TextToImageModules,
    optim: &ModuleOptimizer,
    ema: Option<&Ema<TextToImageModules>>,
    rng: &SeededRng,
) -> Result<()> {
    store.save(step, |dir| {
        save_module(&dir.join(MODEL_FILE), model)?;
        save_optimizer(&dir.join(OPTIM_FILE), optim)?;
        if let Some(e) = ema {
            save_module(&dir.join(EMA_FILE), e.model())?;
        }
        let state = TrainerState {
            step,
            rng: rng.state(),
            ema_updates: ema.map(|e| e.updates()).unwrap_or(0),
        };
        save_state(&dir.join(STATE_FILE), &state)
    })?;
    Ok(())
}
