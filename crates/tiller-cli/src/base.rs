//! `tiller base train`: the testbed's base model (a tiny CLIP-style text encoder and a pixel-space
//! UNet) trained from scratch on the Shapes world with the epsilon objective, on the one engine.

use anyhow::{Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use tiller_core::SeededRng;
use tiller_diffusion::models::clip::ClipTextConfig;
use tiller_diffusion::models::unet::UNet2DConditionConfig;
use tiller_diffusion::pipeline::{RecommendedSampling, TextToImage};
use tiller_diffusion::schedulers::{DdimConfig, SchedulerConfig};
use tiller_engine::checkpoint::Resume;
use tiller_engine::denoiser::DenoiserData;
use tiller_engine::denoiser::{
    CheckpointWeights, DiffusionObjective, LogSection, TextToImageModules, TrainSection,
    load_checkpoint_weights, train_denoiser,
};
use tiller_engine::distill::{DistillSection, ProgressiveDistillation, student_scheduler};
use tiller_engine::run_dir::RunDir;
use tiller_eval::sampling::{SampleSettings, empty_prompt, sample_prompts, save_pipeline};
use tiller_testbed::{Prompt, render_prompt};
use tiller_testbed::{PromptSetConfig, RenderConfig, Tokenizer, geneval, prompts};

/// The model: diffusers/transformers config fields of each part.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub unet: UNet2DConditionConfig,
    pub text_encoder: ClipTextConfig,
}

/// The training data: which prompts, drawn how.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    pub prompts: PromptSetConfig,
    pub render: RenderConfig,
    /// Relative weight of each task's training prompts, by task name (`unsafe = 4.0`); tasks
    /// not named weigh 1. Empty (the default): every training prompt is equally likely, as the
    /// shipped base was trained.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub task_weights: BTreeMap<String, f64>,
}

/// The fixed-seed sample grids written while training.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SampleSection {
    /// Prompts of the grid (one row each).
    pub prompts: Vec<String>,
    /// Images per prompt.
    pub per_prompt: usize,
    pub steps: usize,
    pub guidance: f64,
    pub seed: u64,
}

impl Default for SampleSection {
    fn default() -> Self {
        Self {
            prompts: vec![
                "a red circle".into(),
                "three green squares".into(),
                "a blue triangle left of a yellow circle".into(),
                "a purple square and an orange circle".into(),
            ],
            per_prompt: 4,
            steps: 25,
            guidance: 3.0,
            seed: 0,
        }
    }
}

/// `configs/testbed-base.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseConfig {
    /// `cpu`, or `cuda[:N]` in a CUDA build.
    #[serde(default = "cpu")]
    pub device: String,
    pub model: ModelSection,
    /// Start from this pipeline folder's weights instead of random ones (a fine-tune, e.g. of
    /// the shipped base on a grown world); its UNet and text encoder configs must equal
    /// `model`'s. The run keeps the path as found, so `--resume` finds it from anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
    /// The noise schedule and the sampler saved with the model.
    pub scheduler: SchedulerConfig,
    #[serde(default)]
    pub data: DataSection,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub sample: SampleSection,
    /// Written with the pipeline as its `tiller_sampling.json`: how every command samples the
    /// model unless told otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recommended_sampling: Option<RecommendedSampling>,
}

fn cpu() -> String {
    "cpu".into()
}

#[derive(Args)]
pub struct TrainArgs {
    /// The training config (TOML).
    #[arg(long, default_value = "configs/testbed-base.toml")]
    config: PathBuf,
    /// The run directory (config, metrics, checkpoints, samples, the final pipeline).
    #[arg(long, default_value = "runs/base")]
    out: PathBuf,
    /// Continue a run: `latest` or a checkpoint folder.
    #[arg(long)]
    resume: Option<Resume>,
    /// Override a config value, e.g. `--set train.steps=100` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// `--seed` sets `train.seed`, `--device` sets `device`.
    #[command(flatten)]
    run: crate::args::RunFlags,
}

/// The config keys `--set` may change when resuming a base run. `--set train.steps=N` extends a
/// finished run (diffusers' scripts allow a larger `max_train_steps` on resume): the cosine
/// schedule is recomputed over the new total.
const RESUME_EXTENDABLE: &[&str] = &["train.steps", "log."];

/// The run folder and config of a `base` command: with `--resume` the run in `out` reopened
/// (`--set` may only extend it); otherwise `config_path` read with the overrides, handed to
/// `prepare` with its resolved text (to check or complete it; it returns the text to save),
/// and a new run created in `out`.
fn open_or_create<T: serde::de::DeserializeOwned + Serialize>(
    out: &std::path::Path,
    config_path: &std::path::Path,
    resume: bool,
    overrides: &[String],
    prepare: impl FnOnce(&mut T, String) -> Result<String>,
) -> Result<(RunDir, T)> {
    if resume {
        let (run, config, _) = RunDir::open_with_overrides::<T>(out, overrides, RESUME_EXTENDABLE)?;
        return Ok((run, config));
    }
    let (mut config, resolved): (T, String) = tiller_core::config::from_toml_file_with_overrides(
        &crate::shipped::resolve(config_path),
        overrides,
    )?;
    let text = prepare(&mut config, resolved)?;
    Ok((RunDir::create(out, &text)?, config))
}

pub fn train(args: TrainArgs) -> Result<()> {
    let overrides = args.run.apply(&args.overrides, "train.seed");
    // The `init` weights, loaded once when the run is created (before its folder exists, so a bad
    // folder is refused first); a resumed run takes every weight from its checkpoint instead.
    let mut initial = None;
    let (run, config) = open_or_create(
        &args.out,
        &args.config,
        args.resume.is_some(),
        &overrides,
        |config: &mut BaseConfig, resolved| {
            config.model.unet.validate()?;
            config.model.text_encoder.validate()?;
            match &config.init {
                None => Ok(resolved),
                Some(init) => {
                    let init = std::fs::canonicalize(crate::shipped::resolve(init))
                        .with_context(|| format!("init = {}", init.display()))?;
                    let device = tiller_core::device::parse_device(&config.device)?;
                    initial = Some(initial_weights(&init, &config.model, &device)?);
                    config.init = Some(init);
                    toml::to_string(config).context("the resolved config")
                }
            }
        },
    )?;
    let device = tiller_core::device::parse_device(&config.device)?;
    let tokenizer = Tokenizer::shapes();
    check_compatible(&config, &tokenizer)?;
    let splits = prompts::generate_splits(&config.data.prompts)?;
    let mut data = TestbedData {
        weights: prompt_weights(&splits.train, &config.data.task_weights)?,
        prompts: splits.train,
        tokenizer: tokenizer.clone(),
        render: config.data.render.clone(),
    };
    let scheduler = config.scheduler.build(config.sample.steps.max(1))?;
    eprintln!(
        "base train: {} steps x batch {} ({} images), {} training prompts, run {}",
        config.train.steps,
        config.train.batch_size,
        config.train.steps * config.train.batch_size as u64,
        data.prompts.len(),
        run.root().display()
    );
    // Weights are initialised by burn's initialisers, which draw from the device's generator:
    // seed it from the run's seed so the same seed gives the same initial model.
    device.seed(config.train.seed);
    let model = match (initial, &config.init) {
        (Some(modules), Some(init)) => {
            eprintln!(
                "base train: starting from the weights of {}",
                init.display()
            );
            modules
        }
        _ => TextToImageModules {
            text_encoder: config.model.text_encoder.init(&device)?,
            unet: config.model.unet.init(&device)?,
        },
    };
    let samples_dir = run.samples();
    let sample_cfg = config.sample.clone();
    let pipe_of = |m: &TextToImageModules| TextToImage {
        text_config: config.model.text_encoder.clone(),
        text_encoder: m.text_encoder.clone(),
        unet_config: config.model.unet.clone(),
        unet: m.unet.clone(),
        scheduler: config.scheduler.clone(),
        recommended: config.recommended_sampling,
    };
    let settings = SampleSettings {
        scheduler: config.scheduler.clone(),
        steps: sample_cfg.steps,
        guidance: sample_cfg.guidance,
        batch: 16,
    };
    let grid = SampleGrid {
        prompts: &sample_cfg.prompts,
        per_prompt: sample_cfg.per_prompt,
        seed: sample_cfg.seed,
        settings: &settings,
        dir: &samples_dir,
    };
    let mut hook = |step: u64, m: &TextToImageModules| -> tiller_core::Result<()> {
        grid.write(step, &pipe_of(m), &tokenizer, &device)
    };
    let trained = train_denoiser(
        &run,
        model,
        &DiffusionObjective(scheduler.as_ref()),
        &mut data,
        &config.train,
        &config.log,
        &device,
        args.resume.as_ref(),
        None,
        &mut hook,
    )?;
    let final_modules = trained.ema.unwrap_or(trained.model);
    let pipe = pipe_of(&final_modules);
    let out = run.root().join("pipeline");
    save_pipeline(&pipe, &out, &tokenizer)?;
    println!("trained pipeline written to {}", out.display());
    Ok(())
}

#[derive(Args)]
pub struct ExportArgs {
    /// The run directory of `tiller base train`.
    #[arg(long)]
    run: PathBuf,
    /// `latest` or a checkpoint folder (`<run>/checkpoints/step-NNNNNNNN`).
    #[arg(long, default_value = "latest")]
    checkpoint: Resume,
    /// Export the optimised weights instead of their EMA.
    #[arg(long)]
    raw: bool,
    /// The pipeline folder to write; must not exist.
    #[arg(long)]
    out: PathBuf,
}

/// `tiller base export`: a checkpoint's weights (EMA by default, as `base train` exports at its
/// end) as a pipeline folder, e.g. to ship or evaluate a run before its last step.
pub fn export(args: ExportArgs) -> Result<()> {
    crate::ensure_new_out(&args.out)?;
    let (run, text) = RunDir::open(&args.run)
        .with_context(|| format!("--run {} is not a training run", args.run.display()))?;
    let config: BaseConfig = toml::from_str(&text).with_context(|| {
        format!(
            "{}: the saved config",
            args.run.join("config.toml").display()
        )
    })?;
    let device = tiller_core::device::parse_device("cpu")?;
    let model = TextToImageModules {
        text_encoder: config.model.text_encoder.init(&device)?,
        unet: config.model.unet.init(&device)?,
    };
    let weights = if args.raw {
        CheckpointWeights::Model
    } else {
        CheckpointWeights::Ema
    };
    let (step, m) = load_checkpoint_weights(&run.checkpoints(), &args.checkpoint, weights, model)?;
    let pipe = TextToImage {
        text_config: config.model.text_encoder.clone(),
        text_encoder: m.text_encoder,
        unet_config: config.model.unet.clone(),
        unet: m.unet,
        scheduler: config.scheduler.clone(),
        recommended: config.recommended_sampling,
    };
    save_pipeline(&pipe, &args.out, &Tokenizer::shapes())?;
    println!(
        "step {step} ({} weights) written to {}",
        if args.raw { "raw" } else { "EMA" },
        args.out.display()
    );
    Ok(())
}

/// The fixed-seed sample grid a training run writes as `samples/step-N.png`.
struct SampleGrid<'a> {
    prompts: &'a [String],
    per_prompt: usize,
    seed: u64,
    settings: &'a SampleSettings,
    dir: &'a std::path::Path,
}

impl SampleGrid<'_> {
    fn write(
        &self,
        step: u64,
        pipe: &TextToImage,
        tokenizer: &Tokenizer,
        device: &burn::tensor::Device,
    ) -> tiller_core::Result<()> {
        let seeds: Vec<u64> = (0..self.per_prompt as u64).map(|i| self.seed + i).collect();
        let rows = sample_prompts(pipe, tokenizer, self.prompts, &seeds, self.settings, device)
            .map_err(|e| tiller_core::Error::invalid(e.to_string()))?;
        let images: Vec<_> = rows.into_iter().flatten().collect();
        std::fs::create_dir_all(self.dir).map_err(|e| tiller_core::Error::io(self.dir, e))?;
        geneval::write_grid_png(
            &self.dir.join(format!("step-{step:08}.png")),
            &images,
            self.per_prompt,
        )
    }
}

/// `configs/testbed-distill.toml`: one stage of progressive distillation of a testbed model.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
    /// `cpu`, or `cuda[:N]` in a CUDA build.
    #[serde(default = "cpu")]
    pub device: String,
    /// The teacher pipeline folder: the shipped base, or the `pipeline` of an earlier stage.
    pub teacher: PathBuf,
    #[serde(default)]
    pub distill: DistillSection,
    /// The clean images the noisy inputs are made from (the base's training prompts).
    #[serde(default)]
    pub data: DataSection,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub sample: DistillSampleSection,
}

/// The fixed-seed sample grids of a distillation run, drawn as the student is sampled (its N
/// steps, DDIM eta 0, no guidance).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistillSampleSection {
    pub prompts: Vec<String>,
    pub per_prompt: usize,
    pub seed: u64,
}

impl Default for DistillSampleSection {
    fn default() -> Self {
        let s = SampleSection::default();
        Self {
            prompts: s.prompts,
            per_prompt: s.per_prompt,
            seed: s.seed,
        }
    }
}

#[derive(Args)]
pub struct DistillArgs {
    /// The distillation config (TOML).
    #[arg(long, default_value = "configs/testbed-distill.toml")]
    config: PathBuf,
    /// The run directory (config, metrics, checkpoints, samples, the student's pipeline).
    #[arg(long)]
    out: PathBuf,
    /// Continue a run: `latest` or a checkpoint folder.
    #[arg(long)]
    resume: Option<Resume>,
    /// Override a config value, e.g. `--set teacher=runs/distill-4/pipeline` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// `--seed` sets `train.seed`, `--device` sets `device`.
    #[command(flatten)]
    run: crate::args::RunFlags,
    /// Stop after this many updates in this process (the run can be resumed).
    #[arg(long, hide = true)]
    stop_after: Option<u64>,
}

/// The DDIM settings of the teacher pipeline in `folder` (its scheduler config alone); an error
/// naming the folder when its scheduler is not DDIM.
fn teacher_ddim(folder: &std::path::Path) -> Result<DdimConfig> {
    let path = folder.join("scheduler/scheduler_config.json");
    match SchedulerConfig::from_diffusers_json(&path)
        .with_context(|| format!("teacher = {}", folder.display()))?
    {
        SchedulerConfig::Ddim(c) => Ok(c),
        _ => anyhow::bail!(
            "teacher = {}: {} is not a DDIMScheduler; progressive distillation follows the \
             teacher's DDIM steps",
            folder.display(),
            path.display()
        ),
    }
}

/// `tiller base distill`: one stage of progressive distillation (`tiller_engine::distill`). The
/// student starts as a copy of the teacher and is written as `<out>/pipeline` with its own DDIM
/// grid and `tiller_sampling.json` (N steps, eta 0, guidance 1); the next stage names it as
/// its teacher.
pub fn distill(args: DistillArgs) -> Result<()> {
    let overrides = args.run.apply(&args.overrides, "train.seed");
    let (run, config) = open_or_create(
        &args.out,
        &args.config,
        args.resume.is_some(),
        &overrides,
        |config: &mut DistillConfig, _| {
            // The run keeps the teacher's path as found, so `--resume` finds it from anywhere.
            config.teacher = std::fs::canonicalize(crate::shipped::resolve(&config.teacher))
                .with_context(|| format!("teacher = {}", config.teacher.display()))?;
            // Refused before the run folder is created.
            config.distill.validate(&teacher_ddim(&config.teacher)?)?;
            toml::to_string(config).context("the resolved config")
        },
    )?;
    let device = tiller_core::device::parse_device(&config.device)?;
    let (teacher, _) = TextToImage::load(&config.teacher, &device)
        .with_context(|| format!("teacher = {}", config.teacher.display()))?;
    let teacher_ddim = &teacher_ddim(&config.teacher)?;
    let student_ddim = student_scheduler(teacher_ddim, config.distill.teacher_steps)?;
    let student_steps = config.distill.teacher_steps / 2;
    let tokenizer = Tokenizer::shapes();
    let splits = prompts::generate_splits(&config.data.prompts)?;
    let mut data = TestbedData {
        weights: None,
        prompts: splits.train,
        tokenizer: tokenizer.clone(),
        render: config.data.render.clone(),
    };
    let frozen = TextToImageModules {
        text_encoder: teacher.text_encoder.clone(),
        unet: teacher.unet.clone(),
    };
    let objective = ProgressiveDistillation::new(
        &frozen,
        teacher_ddim,
        &config.distill,
        empty_prompt(&tokenizer),
    )?;
    eprintln!(
        "base distill: {} -> {student_steps} steps (teacher guidance {}), {} updates x batch {}, run {}",
        config.distill.teacher_steps,
        config.distill.guidance,
        config.train.steps,
        config.train.batch_size,
        run.root().display()
    );
    let student_of = |m: &TextToImageModules| TextToImage {
        text_config: teacher.text_config.clone(),
        text_encoder: m.text_encoder.clone(),
        unet_config: teacher.unet_config.clone(),
        unet: m.unet.clone(),
        scheduler: SchedulerConfig::Ddim(student_ddim.clone()),
        recommended: Some(RecommendedSampling {
            steps: student_steps,
            eta: 0.0,
            guidance: 1.0,
        }),
    };
    let settings = SampleSettings {
        scheduler: SchedulerConfig::Ddim(student_ddim.clone()),
        steps: student_steps,
        guidance: 1.0,
        batch: 16,
    };
    let sample_cfg = config.sample.clone();
    let samples_dir = run.samples();
    let grid = SampleGrid {
        prompts: &sample_cfg.prompts,
        per_prompt: sample_cfg.per_prompt,
        seed: sample_cfg.seed,
        settings: &settings,
        dir: &samples_dir,
    };
    let mut hook = |step: u64, m: &TextToImageModules| -> tiller_core::Result<()> {
        grid.write(step, &student_of(m), &tokenizer, &device)
    };
    let student = TextToImageModules {
        text_encoder: teacher.text_encoder.clone(),
        unet: teacher.unet.clone(),
    };
    let trained = train_denoiser(
        &run,
        student,
        &objective,
        &mut data,
        &config.train,
        &config.log,
        &device,
        args.resume.as_ref(),
        args.stop_after,
        &mut hook,
    )?;
    if trained.step < config.train.steps {
        println!(
            "stopped at update {} of {}; continue with --resume latest",
            trained.step, config.train.steps
        );
        return Ok(());
    }
    let final_modules = trained.ema.unwrap_or(trained.model);
    let out = run.root().join("pipeline");
    save_pipeline(&student_of(&final_modules), &out, &tokenizer)?;
    println!(
        "{student_steps}-step student written to {} (sample it with --sampler ddim --steps {student_steps} --guidance 1, its tiller_sampling.json)",
        out.display()
    );
    Ok(())
}

/// The pipeline folder with the tokenizer's `tokenizer_config.json` beside its `tokenizer.json`.
/// Training batches rendered on the fly from a fixed list of training prompts.
pub struct TestbedData {
    pub prompts: Vec<Prompt>,
    /// Cumulative sampling weights of `prompts` (`None`: uniform).
    pub weights: Option<Vec<f64>>,
    pub tokenizer: Tokenizer,
    pub render: RenderConfig,
}

impl TestbedData {
    /// The index of the next training prompt: uniform, or by the cumulative weights.
    fn draw(&self, rng: &mut SeededRng) -> usize {
        match &self.weights {
            None => rng.below(self.prompts.len()),
            Some(cum) => {
                let u = rng.uniform() * cum.last().copied().unwrap_or(0.0);
                cum.partition_point(|&c| c <= u).min(self.prompts.len() - 1)
            }
        }
    }
}

impl DenoiserData for TestbedData {
    fn batch(
        &mut self,
        n: usize,
        rng: &mut SeededRng,
    ) -> tiller_core::Result<(Vec<Vec<i64>>, Vec<f32>)> {
        let mut ids = Vec::with_capacity(n);
        let mut pixels = Vec::with_capacity(n * 3 * self.render.resolution.pow(2));
        for _ in 0..n {
            let prompt = &self.prompts[self.draw(rng)];
            let seed = rng.below(usize::MAX) as u64;
            let rendered = render_prompt(prompt, &self.render, seed)?;
            rendered.image.to_chw_floats(&mut pixels);
            ids.push(
                self.tokenizer
                    .encode(&prompt.text)?
                    .into_iter()
                    .map(i64::from)
                    .collect(),
            );
        }
        Ok((ids, pixels))
    }

    fn empty_prompt(&self) -> Vec<i64> {
        empty_prompt(&self.tokenizer)
    }

    fn image_shape(&self) -> [usize; 3] {
        [3, self.render.resolution, self.render.resolution]
    }
}

/// The modules of the pipeline folder `init`, whose parts' configs must be `model`'s.
fn initial_weights(
    init: &std::path::Path,
    model: &ModelSection,
    device: &burn::tensor::Device,
) -> Result<TextToImageModules> {
    let (pipe, _) =
        TextToImage::load(init, device).with_context(|| format!("init = {}", init.display()))?;
    // Every field of `model`'s config must hold in the folder's (which may carry metadata such
    // as transformers' `architectures` besides).
    let same = |a: serde_json::Value, b: serde_json::Value, part: &str| {
        for (key, want) in b.as_object().into_iter().flatten() {
            let got = a.get(key).unwrap_or(&serde_json::Value::Null);
            anyhow::ensure!(
                got == want,
                "init = {}: its {part} config has {key} = {got}, model.{part}.{key} is {want}",
                init.display()
            );
        }
        Ok(())
    };
    same(
        serde_json::to_value(&pipe.unet_config)?,
        serde_json::to_value(&model.unet)?,
        "unet",
    )?;
    same(
        serde_json::to_value(&pipe.text_config)?,
        serde_json::to_value(&model.text_encoder)?,
        "text_encoder",
    )?;
    Ok(TextToImageModules {
        text_encoder: pipe.text_encoder,
        unet: pipe.unet,
    })
}

/// Cumulative per-prompt weights from `data.task_weights` (`None` when it is empty); an unknown
/// task name or a weight that is negative or not finite is an error naming the key.
fn prompt_weights(prompts: &[Prompt], weights: &BTreeMap<String, f64>) -> Result<Option<Vec<f64>>> {
    if weights.is_empty() {
        return Ok(None);
    }
    for (task, w) in weights {
        anyhow::ensure!(
            tiller_testbed::Task::ALL.iter().any(|t| t.name() == task),
            "data.task_weights.{task}: not a task; the testbed's are {}",
            tiller_testbed::Task::ALL.map(|t| t.name()).join(", ")
        );
        anyhow::ensure!(
            w.is_finite() && *w >= 0.0,
            "data.task_weights.{task} = {w}: a weight must be finite and non-negative"
        );
    }
    let mut total = 0.0;
    let cum: Vec<f64> = prompts
        .iter()
        .map(|p| {
            total += weights.get(p.spec.tag.name()).copied().unwrap_or(1.0);
            total
        })
        .collect();
    anyhow::ensure!(total > 0.0, "data.task_weights leave no prompt to draw");
    Ok(Some(cum))
}

/// The text encoder must fit the tokenizer, and the UNet the text encoder and images.
fn check_compatible(config: &BaseConfig, tokenizer: &Tokenizer) -> Result<()> {
    let te = &config.model.text_encoder;
    anyhow::ensure!(
        te.vocab_size >= tokenizer.vocab_size(),
        "model.text_encoder.vocab_size = {} but the tokenizer has {} tokens",
        te.vocab_size,
        tokenizer.vocab_size()
    );
    anyhow::ensure!(
        te.max_position_embeddings >= tokenizer.max_length(),
        "model.text_encoder.max_position_embeddings = {} but prompts are {} tokens",
        te.max_position_embeddings,
        tokenizer.max_length()
    );
    anyhow::ensure!(
        te.eos_token_id == tokenizer.eos_id() as i64,
        "model.text_encoder.eos_token_id = {} but the tokenizer's eos is {}",
        te.eos_token_id,
        tokenizer.eos_id()
    );
    let unet = &config.model.unet;
    anyhow::ensure!(
        unet.cross_attention_dim == te.hidden_size,
        "model.unet.cross_attention_dim = {} must equal model.text_encoder.hidden_size = {}",
        unet.cross_attention_dim,
        te.hidden_size
    );
    anyhow::ensure!(
        unet.in_channels == 3 && unet.out_channels == 3,
        "model.unet in_channels/out_channels must be 3 (pixel space)"
    );
    anyhow::ensure!(
        unet.sample_size == Some(config.data.render.resolution),
        "model.unet.sample_size = {:?} but data.render.resolution = {}",
        unet.sample_size,
        config.data.render.resolution
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_weights_set_how_often_each_task_is_drawn() {
        let splits = prompts::generate_splits(&PromptSetConfig {
            train_per_task: 50,
            ..PromptSetConfig::default()
        })
        .unwrap();
        let weights = BTreeMap::from([("unsafe".to_string(), 4.0), ("colors".into(), 0.0)]);
        let mut data = TestbedData {
            weights: prompt_weights(&splits.train, &weights).unwrap(),
            prompts: splits.train,
            tokenizer: Tokenizer::shapes(),
            render: RenderConfig::default(),
        };
        // Expected shares: unsafe 4/9, colors 0, the five other tasks 1/9 each.
        let mut rng = SeededRng::new(0);
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for _ in 0..1800 {
            let i = data.draw(&mut rng);
            *seen.entry(data.prompts[i].spec.tag.name()).or_default() += 1;
        }
        assert_eq!(seen.get("colors"), None);
        // 1800 draws: unsafe ~800 (sd 21), each other ~200 (sd 13).
        assert!((720..=880).contains(&seen["unsafe"]), "{seen:?}");
        assert!((150..=250).contains(&seen["counting"]), "{seen:?}");
        data.batch(2, &mut rng).unwrap();
        let bad = BTreeMap::from([("unsfe".to_string(), 1.0)]);
        let e = prompt_weights(&data.prompts, &bad).unwrap_err().to_string();
        assert!(
            e.contains("data.task_weights.unsfe") && e.contains("unsafe"),
            "{e}"
        );
        let bad = BTreeMap::from([("unsafe".to_string(), -1.0)]);
        assert!(prompt_weights(&data.prompts, &bad).is_err());
        assert!(
            prompt_weights(&data.prompts, &BTreeMap::new())
                .unwrap()
                .is_none()
        );
    }
}
