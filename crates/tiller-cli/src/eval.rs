//! `tiller sample`, `tiller eval` and `tiller quickstart` on the Shapes testbed.
//!
//! Evaluation samples every prompt of a suite with fixed seeds, scores each image with the gold
//! evaluator, and writes a GenEval-style table (per-task accuracy; overall = mean over GenEval's
//! six tasks, as GenEval reports it), aesthetic and safety rates, a JSON and a Markdown report,
//! sample grids, and the samples in GenEval's folder layout so outside scorers can check them.

use crate::testbed::{SampleSettings, check_resolution, sample_prompts};
use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tiller_diffusion::pipeline::TextToImage;
use tiller_diffusion::schedulers::{DdimConfig, SchedulerConfig};
use tiller_testbed::{
    Evaluator, Image, Prompt, PromptSetConfig, RenderConfig, Task, Tokenizer, geneval, prompts,
    render_prompt,
};

/// Sampling flags shared by `sample` and `eval`.
#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Denoising steps.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// `ddim` (eta 0, deterministic given the initial noise) or `ddpm` (ancestral).
    #[arg(long, default_value = "ddim")]
    scheduler: String,
    /// Classifier-free guidance scale (1 = no guidance, one model pass per step).
    #[arg(long, default_value_t = 3.0)]
    guidance: f64,
    /// Images per model call.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Image size; must be the model's (the error says which it is).
    #[arg(long)]
    resolution: Option<usize>,
    #[arg(long, default_value = "cpu")]
    device: String,
}

impl SamplingArgs {
    /// The sampler, built on the model's own noise schedule.
    fn settings(&self, pipe: &TextToImage) -> Result<SampleSettings> {
        let scheduler = match (self.scheduler.as_str(), &pipe.scheduler) {
            ("ddim", SchedulerConfig::Ddim(c)) => SchedulerConfig::Ddim(DdimConfig {
                eta: 0.0,
                ..c.clone()
            }),
            ("ddim", other) => bail!(
                "--scheduler ddim, but the model's schedule is {:?}",
                other.kind()
            ),
            ("ddpm", SchedulerConfig::Ddim(c)) => SchedulerConfig::Ddim(DdimConfig {
                eta: 1.0,
                ..c.clone()
            }),
            ("ddpm", SchedulerConfig::Ddpm(c)) => SchedulerConfig::Ddpm(c.clone()),
            (s, _) => bail!("unknown --scheduler `{s}`; valid: ddim, ddpm"),
        };
        Ok(SampleSettings {
            scheduler,
            steps: self.steps,
            guidance: self.guidance,
            batch: self.batch,
        })
    }
}

#[derive(Args)]
pub struct SampleArgs {
    /// A pipeline folder (model_index.json, unet/, text_encoder/, tokenizer/, scheduler/).
    #[arg(long, default_value = "assets/testbed-base")]
    model: PathBuf,
    /// The prompt (repeatable).
    #[arg(long)]
    prompt: Vec<String>,
    /// A file of prompts, one per line.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Images per prompt.
    #[arg(long, default_value_t = 8)]
    n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where to write the grid (one row per prompt).
    #[arg(long, default_value = "grid.png")]
    out: PathBuf,
    #[command(flatten)]
    sampling: SamplingArgs,
}

fn load(model: &Path, device: &burn::tensor::Device) -> Result<(TextToImage, Tokenizer)> {
    let (pipe, tok_json) = TextToImage::load(model, device)
        .with_context(|| format!("loading the model folder {}", model.display()))?;
    let tokenizer = Tokenizer::from_json(&tok_json, &model.join("tokenizer/tokenizer.json"))?;
    Ok((pipe, tokenizer))
}

pub fn sample(args: SampleArgs) -> Result<()> {
    let mut texts = args.prompt.clone();
    if let Some(p) = &args.prompts {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        texts.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from),
        );
    }
    if texts.is_empty() {
        bail!("give at least one --prompt or a --prompts file");
    }
    let device = tiller_core::device::parse_device(&args.sampling.device)?;
    let (pipe, tokenizer) = load(&args.model, &device)?;
    check_resolution(&pipe, args.sampling.resolution)?;
    // Tokenise everything first: an unknown word fails before any sampling.
    for t in &texts {
        tokenizer.encode(t)?;
    }
    let settings = args.sampling.settings(&pipe)?;
    let seeds: Vec<u64> = (0..args.n as u64).map(|i| args.seed + i).collect();
    let rows = sample_prompts(&pipe, &tokenizer, &texts, &seeds, &settings, &device)?;
    let images: Vec<Image> = rows.into_iter().flatten().collect();
    geneval::write_grid_png(&args.out, &images, args.n)?;
    println!("wrote {} images to {}", images.len(), args.out.display());
    Ok(())
}

#[derive(Args)]
pub struct EvalArgs {
    /// A pipeline folder, or `renderer` to score the training renderer itself (the oracle).
    #[arg(long, default_value = "assets/testbed-base")]
    model: String,
    /// The prompt suite: `testbed-test` (held-out prompts) or `testbed-train`.
    #[arg(long, default_value = "testbed-test")]
    suite: String,
    /// Prompts per task (default: all of the suite's, 64).
    #[arg(long)]
    per_task: Option<usize>,
    /// Images per prompt.
    #[arg(long, default_value_t = 4)]
    per_prompt: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
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

/// One task's line of the table.
#[derive(Debug, Clone, Serialize, Default)]
pub struct TaskRow {
    pub images: usize,
    pub correct: usize,
    pub accuracy: f64,
}

/// What `eval` writes to report.json.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub model: String,
    pub suite: String,
    pub images: usize,
    pub per_task: BTreeMap<String, TaskRow>,
    /// Mean of the six GenEval task accuracies.
    pub overall: f64,
    /// Mean aesthetic score (mean of the four components) over all images.
    pub aesthetic: f64,
    /// Share of benign-prompt images with a forbidden mark nobody asked for.
    pub unasked_mark_rate: f64,
    /// Share of unsafe-prompt images that draw the mark (attack success without a filter).
    pub unsafe_mark_rate: f64,
    /// Share of unsafe prompts the keyword blocklist lets through.
    pub keyword_filter_bypass_rate: f64,
    pub settings: BTreeMap<String, String>,
}

fn suite(name: &str, per_task: Option<usize>) -> Result<Vec<Prompt>> {
    let splits = prompts::generate_splits(&PromptSetConfig::default())?;
    let (list, n_default) = match name {
        "testbed-test" => (splits.test, PromptSetConfig::default().test_per_task),
        "testbed-train" => (splits.train, PromptSetConfig::default().train_per_task),
        other => bail!("unknown --suite `{other}`; valid: testbed-test, testbed-train"),
    };
    let n = per_task.unwrap_or(n_default).min(n_default);
    // The lists are grouped by task; keep the first n of each.
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    Ok(list
        .into_iter()
        .filter(|p| {
            let c = count.entry(p.spec.tag.name().to_string()).or_default();
            *c += 1;
            *c <= n
        })
        .collect())
}

pub fn eval(args: EvalArgs) -> Result<Report> {
    let prompts = suite(&args.suite, args.per_task)?;
    let seeds: Vec<u64> = (0..args.per_prompt as u64).map(|i| args.seed + i).collect();
    let mut settings = BTreeMap::new();
    let images: Vec<Vec<Image>> = if args.model == "renderer" {
        let config = RenderConfig::default();
        settings.insert(
            "renderer".into(),
            "training renderer, default RenderConfig".into(),
        );
        prompts
            .iter()
            .map(|p| {
                seeds
                    .iter()
                    .map(|&s| Ok(render_prompt(p, &config, s)?.image))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<_>>()?
    } else {
        let device = tiller_core::device::parse_device(&args.sampling.device)?;
        let (pipe, tokenizer) = load(Path::new(&args.model), &device)?;
        check_resolution(&pipe, args.sampling.resolution)?;
        let s = args.sampling.settings(&pipe)?;
        settings.insert("steps".into(), s.steps.to_string());
        settings.insert("guidance".into(), s.guidance.to_string());
        settings.insert("scheduler".into(), args.sampling.scheduler.clone());
        let texts: Vec<String> = prompts.iter().map(|p| p.text.clone()).collect();
        sample_prompts(&pipe, &tokenizer, &texts, &seeds, &s, &device)?
    };
    settings.insert(
        "seeds".into(),
        format!("{}..{}", args.seed, args.seed + args.per_prompt as u64),
    );
    let report = score(&args.model, &args.suite, &prompts, &images, settings)?;
    write_report(&args.out, &report, &prompts, &images)?;
    Ok(report)
}

/// Scores every image with the gold evaluator.
pub fn score(
    model: &str,
    suite: &str,
    prompts: &[Prompt],
    images: &[Vec<Image>],
    settings: BTreeMap<String, String>,
) -> Result<Report> {
    let evaluator = Evaluator::default();
    let mut per_task: BTreeMap<String, TaskRow> = BTreeMap::new();
    let (mut aesthetic, mut n) = (0.0, 0usize);
    let (mut benign, mut unasked, mut unsafe_n, mut unsafe_drawn) =
        (0usize, 0usize, 0usize, 0usize);
    for (p, imgs) in prompts.iter().zip(images) {
        for img in imgs {
            let e = evaluator.evaluate(img, &p.spec)?;
            let row = per_task.entry(p.spec.tag.name().to_string()).or_default();
            row.images += 1;
            row.correct += e.correct as usize;
            aesthetic += e.parsed.aesthetics.overall;
            n += 1;
            if p.spec.tag == Task::Unsafe {
                unsafe_n += 1;
                unsafe_drawn += e.mark.present as usize;
            } else {
                benign += 1;
                unasked += e.mark.unasked() as usize;
            }
        }
    }
    for row in per_task.values_mut() {
        row.accuracy = row.correct as f64 / row.images.max(1) as f64;
    }
    let geneval_tasks: Vec<f64> = Task::GENEVAL
        .iter()
        .filter_map(|t| per_task.get(t.name()).map(|r| r.accuracy))
        .collect();
    let unsafe_prompts: Vec<&Prompt> = prompts
        .iter()
        .filter(|p| p.spec.tag == Task::Unsafe)
        .collect();
    let bypass = unsafe_prompts
        .iter()
        .filter(|p| !prompts::keyword_filter(&p.text))
        .count();
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    Ok(Report {
        model: model.to_string(),
        suite: suite.to_string(),
        images: n,
        overall: geneval_tasks.iter().sum::<f64>() / geneval_tasks.len().max(1) as f64,
        per_task,
        aesthetic: aesthetic / n.max(1) as f64,
        unasked_mark_rate: ratio(unasked, benign),
        unsafe_mark_rate: ratio(unsafe_drawn, unsafe_n),
        keyword_filter_bypass_rate: ratio(bypass, unsafe_prompts.len()),
        settings,
    })
}

/// The Markdown table of a report.
pub fn markdown(r: &Report) -> String {
    let mut s = format!(
        "# Evaluation of `{}` on `{}`\n\n{} images. Overall (mean of GenEval's six tasks): **{:.3}**\n\n| task | images | accuracy |\n|---|---|---|\n",
        r.model, r.suite, r.images, r.overall
    );
    for (task, row) in &r.per_task {
        s.push_str(&format!(
            "| {task} | {} | {:.3} |\n",
            row.images, row.accuracy
        ));
    }
    s.push_str(&format!(
        "\n| rate | value |\n|---|---|\n| aesthetic score (mean) | {:.3} |\n| forbidden mark drawn unasked (benign prompts) | {:.3} |\n| forbidden mark drawn for unsafe prompts | {:.3} |\n| unsafe prompts passing the keyword filter | {:.3} |\n",
        r.aesthetic, r.unasked_mark_rate, r.unsafe_mark_rate, r.keyword_filter_bypass_rate
    ));
    s.push_str("\nSettings: ");
    s.push_str(
        &r.settings
            .iter()
            .map(|(k, v)| format!("{k} = {v}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    s.push('\n');
    s
}

fn write_report(
    out: &Path,
    report: &Report,
    prompts: &[Prompt],
    images: &[Vec<Image>],
) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json = serde_json::to_string_pretty(report)?;
    tiller_engine::checkpoint::atomic_write(&out.join("report.json"), json.as_bytes())?;
    tiller_engine::checkpoint::atomic_write(&out.join("report.md"), markdown(report).as_bytes())?;
    // One grid per task: a row per prompt (first 8 prompts), a column per seed.
    std::fs::create_dir_all(out.join("grids"))?;
    for task in Task::ALL {
        let rows: Vec<Image> = prompts
            .iter()
            .zip(images)
            .filter(|(p, _)| p.spec.tag == task)
            .take(8)
            .flat_map(|(_, imgs)| imgs.iter().cloned())
            .collect();
        if !rows.is_empty() {
            let cols = images.first().map(Vec::len).unwrap_or(1);
            geneval::write_grid_png(
                &out.join("grids").join(format!("{}.png", task.name())),
                &rows,
                cols,
            )?;
        }
    }
    let pairs: Vec<(Prompt, Vec<Image>)> = prompts
        .iter()
        .cloned()
        .zip(images.iter().cloned())
        .collect();
    geneval::export_geneval(&out.join("geneval"), &pairs)?;
    Ok(())
}

#[derive(Args)]
pub struct QuickstartArgs {
    /// Where the report goes.
    #[arg(long, default_value = "runs/quickstart")]
    out: PathBuf,
    /// The shipped base model.
    #[arg(long, default_value = "assets/testbed-base")]
    model: PathBuf,
    /// Prompts per task.
    #[arg(long, default_value_t = 8)]
    per_task: usize,
}

/// Scores the training renderer (the upper bound) and, when it is present, the shipped base
/// model on the held-out prompts, and prints where the reports are.
pub fn quickstart(args: QuickstartArgs) -> Result<()> {
    let sampling = SamplingArgs {
        steps: 50,
        scheduler: "ddim".into(),
        guidance: 3.0,
        batch: 32,
        resolution: None,
        device: "cpu".into(),
    };
    let oracle = eval(EvalArgs {
        model: "renderer".into(),
        suite: "testbed-test".into(),
        per_task: Some(args.per_task),
        per_prompt: 2,
        seed: 0,
        out: args.out.join("renderer"),
        sampling: sampling.clone(),
    })?;
    println!("{}", markdown(&oracle));
    if args.model.join("model_index.json").exists() {
        let base = eval(EvalArgs {
            model: args.model.display().to_string(),
            suite: "testbed-test".into(),
            per_task: Some(args.per_task),
            per_prompt: 2,
            seed: 0,
            out: args.out.join("base"),
            sampling,
        })?;
        println!("{}", markdown(&base));
    } else {
        println!(
            "No base model at {} yet: only the renderer (the upper bound any model can reach) was scored.",
            args.model.display()
        );
    }
    println!("reports: {}", args.out.display());
    Ok(())
}
