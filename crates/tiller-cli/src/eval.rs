//! `tiller sample` and `tiller eval` on the Shapes testbed (glue over `tiller_eval`).
//!
//! Evaluation samples every prompt of a suite with fixed seeds, scores each image with the gold
//! evaluator, and writes a GenEval-style table (per-task accuracy; overall = mean over GenEval's
//! six tasks, as GenEval reports it), aesthetic and safety rates, a JSON and a Markdown report,
//! sample grids, and the samples in GenEval's folder layout so outside scorers can check them.

use crate::args::{BestOfArgs, SamplingArgs, load_model, load_reward};
use anyhow::{Context, Result, bail};
use clap::Args;
use std::path::{Path, PathBuf};
use tiller_diffusion::stable_diffusion::{StableDiffusion, is_stable_diffusion, safety_checker_of};
use tiller_diffusion::stable_diffusion3::{StableDiffusion3, is_stable_diffusion3};
use tiller_eval::evaluate::{Evaluation, Source, evaluate};
use tiller_eval::report::{Report, best_of};
use tiller_eval::sampling::{check_resolution, sample_prompts};
use tiller_reward::clip_rewards::SafetyMargin;
use tiller_testbed::{Image, Task, Tokenizer, geneval};

#[derive(Args)]
pub struct SampleArgs {
    /// A pipeline folder (model_index.json, unet/, text_encoder/, tokenizer/, scheduler/), an
    /// alignment run or one of its checkpoints, or a diffusers StableDiffusionPipeline folder
    /// (SD 1.x/2.x; default 50 steps at guidance 7.5, as diffusers).
    #[arg(long, default_value = "assets/testbed-base")]
    model: PathBuf,
    /// The prompt (repeatable).
    #[arg(long)]
    prompt: Vec<String>,
    /// A file of prompts: one per line, or a CSV with a `prompt` column (CoProV2's test set,
    /// I2P).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Images per prompt.
    #[arg(long, default_value_t = 8)]
    n: usize,
    /// The negative prompt of classifier-free guidance (Stable Diffusion folders; default: the
    /// empty prompt, or zeros for SDXL as diffusers).
    #[arg(long)]
    negative_prompt: Option<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    pub selection: BestOfArgs,
    /// Filter the images with this Stable Diffusion safety checker folder (a pipeline's
    /// `safety_checker/`): flagged images come out black, as diffusers' pipelines return them.
    /// Default: the pipeline's own, when its model_index.json lists one.
    #[arg(long)]
    safety_checker: Option<PathBuf>,
    /// Do not run the pipeline's safety checker.
    #[arg(long, conflicts_with = "safety_checker")]
    no_safety_checker: bool,
    /// Where to write the grid (one row per prompt).
    #[arg(long, default_value = "grid.png")]
    out: PathBuf,
    #[command(flatten)]
    sampling: SamplingArgs,
}

pub fn sample(args: SampleArgs) -> Result<()> {
    let mut texts = args.prompt.clone();
    if let Some(p) = &args.prompts {
        let rows = tiller_feedback::loaders::prompt_sets::read_prompt_file(p)?;
        texts.extend(rows.into_iter().map(|r| r.text));
    }
    if texts.is_empty() {
        bail!("give at least one --prompt or a --prompts file");
    }
    crate::ensure_new_out(&args.out)?;
    let device = tiller_core::device::parse_device(&args.sampling.device)?;
    let located = crate::shipped::resolve(&args.model);
    if is_stable_diffusion(&located) {
        let sd = StableDiffusion::load(&located, &device)
            .with_context(|| format!("loading the model {}", located.display()))?;
        let own = safety_checker_of(&located)?;
        return sample_stable_diffusion(&args, Latent::Sd(Box::new(sd)), own, &texts, &device);
    }
    if is_stable_diffusion3(&located) {
        let sd = StableDiffusion3::load(&located, &device)
            .with_context(|| format!("loading the model {}", located.display()))?;
        return sample_stable_diffusion(&args, Latent::Sd3(Box::new(sd)), None, &texts, &device);
    }
    if tiller_align::run::is_run(&located) {
        let base = tiller_align::run::run_base(&located, &crate::shipped::resolve)?;
        if is_stable_diffusion(&base) {
            let sd =
                tiller_align::run::load_aligned_latent(&located, &device, &crate::shipped::resolve)
                    .with_context(|| format!("loading the run {}", located.display()))?;
            let own = safety_checker_of(&base)?;
            return sample_stable_diffusion(&args, Latent::Sd(Box::new(sd)), own, &texts, &device);
        }
    }
    if args.negative_prompt.is_some() {
        bail!(
            "--negative-prompt is read for Stable Diffusion folders only; Tiller's pipelines guide against the empty prompt"
        );
    }
    let (pipe, tokenizer) = load_model(&args.model, &device)?;
    check_resolution(&pipe, args.sampling.resolution)?;
    let checker = safety_checker(&args, None, &device)?;
    // Tokenise everything first: an unknown word fails before any sampling.
    for t in &texts {
        tokenizer.encode(t)?;
    }
    let settings = args.sampling.settings(&pipe)?;
    let n = args.selection.best_of.max(1);
    let reward = (n > 1)
        .then(|| load_reward(&args.selection.reward, &tokenizer, &device))
        .transpose()?;
    let seeds: Vec<u64> = (0..(args.n * n) as u64).map(|i| args.seed + i).collect();
    let mut rows = sample_prompts(&pipe, &tokenizer, &texts, &seeds, &settings, &device)?;
    if let Some(r) = &reward {
        rows = best_of(rows, &texts, n, r.as_ref())?;
    }
    let images: Vec<Image> = rows.into_iter().flatten().collect();
    let images = safety_filter(checker.as_ref(), images)?;
    geneval::write_grid_png(&args.out, &images, args.n)?;
    println!("wrote {} images to {}", images.len(), args.out.display());
    Ok(())
}

/// The safety checker `--safety-checker` names, or the pipeline's own (`own`) unless
/// `--no-safety-checker`; loaded before sampling, so a bad folder fails first.
fn safety_checker(
    args: &SampleArgs,
    own: Option<PathBuf>,
    device: &burn::tensor::Device,
) -> Result<Option<SafetyMargin>> {
    let folder = match (&args.safety_checker, args.no_safety_checker, own) {
        (Some(f), _, _) => crate::shipped::resolve(f),
        (None, false, Some(own)) => own,
        _ => return Ok(None),
    };
    let checker = SafetyMargin::load(&folder, device)
        .with_context(|| format!("loading the safety checker {}", folder.display()))?;
    Ok(Some(checker))
}

/// `images` with those `checker` flags black, as diffusers' pipelines return them; says how many.
fn safety_filter(checker: Option<&SafetyMargin>, images: Vec<Image>) -> Result<Vec<Image>> {
    let Some(checker) = checker else {
        return Ok(images);
    };
    let (images, flags) = checker.filter(images)?;
    let flagged = flags.iter().filter(|f| **f).count();
    println!(
        "safety checker {}: {flagged} of {} images flagged{}",
        tiller_reward::Reward::name(checker).trim_start_matches("safety-checker:"),
        flags.len(),
        if flagged > 0 { " and blacked out" } else { "" }
    );
    Ok(images)
}

/// A diffusers pipeline folder that `tiller sample` reads.
enum Latent {
    Sd(Box<StableDiffusion>),
    Sd3(Box<StableDiffusion3>),
}

/// `tiller sample` on a diffusers pipeline folder. `StableDiffusionPipeline` and SDXL: DDIM
/// (eta 0, or 1 with `--sampler ancestral`) from the folder's noise schedule, diffusers' defaults
/// of 50 steps and guidance 7.5. `StableDiffusion3Pipeline` (without T5): the flow-matching Euler
/// ODE, diffusers' defaults of 28 steps and guidance 7. Images at the denoiser's `sample_size`
/// times the VAE's scale factor.
fn sample_stable_diffusion(
    args: &SampleArgs,
    mut sd: Latent,
    own_checker: Option<PathBuf>,
    texts: &[String],
    device: &burn::tensor::Device,
) -> Result<()> {
    let checker = safety_checker(args, own_checker, device)?;
    let s = &args.sampling;
    let (tokenizer, default_side, steps, guidance) = match &mut sd {
        Latent::Sd(sd) => {
            if let tiller_diffusion::SchedulerConfig::Ddim(c) = &mut sd.scheduler {
                c.eta = match s.sampler {
                    Some(crate::args::Sampler::Ancestral) => 1.0,
                    _ => 0.0,
                };
            }
            (sd.tokenizer.clone(), sd.default_resolution()?, 50, 7.5)
        }
        Latent::Sd3(sd) => {
            if s.sampler.is_some() {
                bail!(
                    "--sampler: an SD3 pipeline samples with its flow-matching Euler scheduler; \
                     leave --sampler out"
                );
            }
            (sd.tokenizer.clone(), sd.default_resolution(), 28, 7.0)
        }
    };
    let side = s.resolution.unwrap_or(default_side);
    let prompts: Vec<&str> = texts.iter().map(String::as_str).collect();
    for p in &prompts {
        let t = tokenizer.encode(p)?;
        if t.dropped > 0 {
            eprintln!(
                "warning: {p:?} is longer than the tokenizer's {} tokens; {} were cut",
                tokenizer.max_length(),
                t.dropped
            );
        }
    }
    let n = args.selection.best_of.max(1);
    let reward = (n > 1)
        .then(|| load_reward(&args.selection.reward, &Tokenizer::shapes(), device))
        .transpose()?;
    let seeds: Vec<u64> = (0..(args.n * n) as u64).map(|i| args.seed + i).collect();
    let (negative, steps, guidance) = (
        args.negative_prompt.as_deref(),
        s.steps.unwrap_or(steps),
        s.guidance.unwrap_or(guidance),
    );
    let rows = match &sd {
        Latent::Sd(sd) => sd.sample_prompts(
            &prompts,
            negative,
            &seeds,
            steps,
            guidance,
            (side, side),
            s.batch,
            device,
        )?,
        Latent::Sd3(sd) => sd.sample_prompts(
            &prompts,
            negative,
            &seeds,
            steps,
            guidance,
            (side, side),
            s.batch,
            device,
        )?,
    };
    let mut rows: Vec<Vec<Image>> = rows
        .into_iter()
        .map(|row| tiller_reward::tensor_to_images(row * 2.0 - 1.0))
        .collect::<tiller_core::Result<_>>()?;
    if let Some(r) = &reward {
        rows = best_of(rows, texts, n, r.as_ref())?;
    }
    let images: Vec<Image> = rows.into_iter().flatten().collect();
    let images = safety_filter(checker.as_ref(), images)?;
    geneval::write_grid_png(&args.out, &images, args.n)?;
    println!("wrote {} images to {}", images.len(), args.out.display());
    Ok(())
}

#[derive(Args)]
pub struct EvalArgs {
    /// A pipeline folder, an alignment run (`runs/<id>`) or one of its checkpoints
    /// (`runs/<id>/checkpoints/step-N`), or `renderer` to score the training renderer itself (the
    /// oracle).
    #[arg(long, default_value = "assets/testbed-base")]
    model: String,
    /// The prompt suite: `testbed-test` (held-out prompts) or `testbed-train`.
    #[arg(long, default_value = "testbed-test", value_parser = tiller_eval::suite::SUITES)]
    suite: String,
    /// Prompts per task (default: all of the suite's, 64).
    #[arg(long)]
    per_task: Option<usize>,
    /// Only these tasks, comma-separated (e.g. `unsafe`, `counting,position`; default: all).
    #[arg(long, value_delimiter = ',', value_parser = parse_task)]
    tasks: Vec<Task>,
    /// Images per prompt.
    #[arg(long, default_value_t = 4)]
    per_prompt: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    pub selection: BestOfArgs,
    /// Output folder: report.json, report.md, grids/, geneval/.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    sampling: SamplingArgs,
}

impl EvalArgs {
    /// The output folder.
    pub fn out(&self) -> &Path {
        &self.out
    }
}

/// A task by its name (GenEval's tag, or `unsafe`).
pub(crate) fn parse_task(name: &str) -> std::result::Result<Task, String> {
    Task::ALL
        .into_iter()
        .find(|t| t.name() == name)
        .ok_or_else(|| {
            let valid: Vec<&str> = Task::ALL.iter().map(|t| t.name()).collect();
            format!("unknown task `{name}`; valid: {}", valid.join(", "))
        })
}

pub fn eval(args: EvalArgs) -> Result<Report> {
    crate::ensure_new_out(&args.out)?;
    let device = tiller_core::device::parse_device(&args.sampling.device)?;
    let n = args.selection.best_of.max(1);
    let reward = (n > 1)
        .then(|| load_reward(&args.selection.reward, &Tokenizer::shapes(), &device))
        .transpose()?;
    let loaded;
    let source = if args.model == "renderer" {
        Source::Renderer
    } else {
        loaded = load_model(Path::new(&args.model), &device)?;
        check_resolution(&loaded.0, args.sampling.resolution)?;
        Source::Model {
            pipe: &loaded.0,
            tokenizer: &loaded.1,
            settings: args.sampling.settings(&loaded.0)?,
            device: &device,
        }
    };
    let evaluation = Evaluation {
        name: args.model.clone(),
        source,
        suite: args.suite.clone(),
        per_task: args.per_task,
        tasks: args.tasks.clone(),
        per_prompt: args.per_prompt,
        seed: args.seed,
        best_of: reward.as_deref().map(|r| (n, r)),
    };
    Ok(evaluate(evaluation, &args.out)?)
}
