//! `tiller sample`, `tiller eval` and `tiller quickstart` on the Shapes testbed.
//!
//! Evaluation samples every prompt of a suite with fixed seeds, scores each image with the gold
//! evaluator, and writes a GenEval-style table (per-task accuracy; overall = mean over GenEval's
//! six tasks, as GenEval reports it), aesthetic and safety rates, a JSON and a Markdown report,
//! sample grids, and the samples in GenEval's folder layout so outside scorers can check them.

use crate::reward::load_reward;
use crate::testbed::{SampleSettings, check_resolution, sample_prompts};
use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tiller_diffusion::pipeline::TextToImage;
use tiller_diffusion::schedulers::{DdimConfig, SchedulerConfig};
use tiller_reward::{GoldReward, Reward};
use tiller_testbed::{
    Evaluator, Image, Prompt, PromptSetConfig, RenderConfig, Task, Tokenizer, geneval, prompts,
    render_prompt,
};

/// Sampling flags shared by `sample` and `eval`.
#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Denoising steps.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// `ddim` (eta 0, deterministic given the initial noise) or `ddpm` (ancestral).
    #[arg(long, default_value = "ddim")]
    pub scheduler: String,
    /// Classifier-free guidance scale (1 = no guidance, one model pass per step).
    #[arg(long, default_value_t = 3.0)]
    pub guidance: f64,
    /// Images per model call.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Image size; must be the model's (the error says which it is).
    #[arg(long)]
    pub resolution: Option<usize>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl SamplingArgs {
    /// The sampler, built on the model's own noise schedule.
    pub fn settings(&self, pipe: &TextToImage) -> Result<SampleSettings> {
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

/// Best-of-N flags shared by `sample` and `eval`.
#[derive(Args, Clone)]
pub struct BestOfArgs {
    /// Best-of-N: sample N candidates per image and keep the one `--reward` scores highest.
    #[arg(long, default_value_t = 1)]
    pub best_of: usize,
    /// The reward that picks among the candidates: `gold`, `jpeg` or a reward model folder.
    #[arg(long, default_value = "gold")]
    pub reward: String,
}

impl BestOfArgs {
    /// Plain sampling (best-of-1).
    pub fn plain() -> Self {
        Self {
            best_of: 1,
            reward: "gold".into(),
        }
    }
}

#[derive(Args)]
pub struct SampleArgs {
    /// A pipeline folder (model_index.json, unet/, text_encoder/, tokenizer/, scheduler/), an
    /// alignment run or one of its checkpoints.
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
    #[command(flatten)]
    pub selection: BestOfArgs,
    /// Where to write the grid (one row per prompt).
    #[arg(long, default_value = "grid.png")]
    out: PathBuf,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// A pipeline folder and its tokenizer.
pub fn load_pipeline(
    model: &Path,
    device: &burn::tensor::Device,
) -> Result<(TextToImage, Tokenizer)> {
    if crate::align::is_run(model) {
        return crate::align::load_aligned(model, device);
    }
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
    let (pipe, tokenizer) = load_pipeline(&args.model, &device)?;
    check_resolution(&pipe, args.sampling.resolution)?;
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
    /// With `--best-of N`: overall accuracy of plain sampling, best-of-N by `--reward` (the
    /// report's images) and best-of-N by the gold reward, on the same candidates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_of: Option<BestOfSummary>,
    /// One line per image, written to `results.jsonl` (not into report.json).
    #[serde(skip)]
    pub results: Vec<ImageResult>,
}

/// One image's verdict, as GenEval's evaluator writes it to `results.jsonl` (`filename`, `tag`,
/// `prompt`, `correct`), plus the prompt's and seed's index (two runs with the same suite and
/// seeds line up, for paired comparisons), the aesthetic score and whether the mark is drawn.
#[derive(Debug, Clone, Serialize)]
pub struct ImageResult {
    /// The sample's path inside the report folder (GenEval's layout).
    pub filename: String,
    pub tag: String,
    pub prompt: String,
    pub prompt_index: usize,
    pub image_index: usize,
    pub correct: bool,
    pub aesthetic: f64,
    pub mark: bool,
}

/// Best-of-N against its baseline and its upper bound.
#[derive(Debug, Clone, Serialize)]
pub struct BestOfSummary {
    pub n: usize,
    pub reward: String,
    pub plain_overall: f64,
    pub reward_overall: f64,
    pub gold_overall: f64,
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
    let n = args.selection.best_of.max(1);
    let seeds: Vec<u64> = (0..(args.per_prompt * n) as u64)
        .map(|i| args.seed + i)
        .collect();
    let mut settings = BTreeMap::new();
    let device = tiller_core::device::parse_device(&args.sampling.device)?;
    let texts: Vec<String> = prompts.iter().map(|p| p.text.clone()).collect();
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
        let (pipe, tokenizer) = load_pipeline(Path::new(&args.model), &device)?;
        check_resolution(&pipe, args.sampling.resolution)?;
        let s = args.sampling.settings(&pipe)?;
        settings.insert("steps".into(), s.steps.to_string());
        settings.insert("guidance".into(), s.guidance.to_string());
        settings.insert("scheduler".into(), args.sampling.scheduler.clone());
        sample_prompts(&pipe, &tokenizer, &texts, &seeds, &s, &device)?
    };
    settings.insert(
        "seeds".into(),
        format!("{}..{}", args.seed, args.seed + seeds.len() as u64),
    );
    let (images, summary) = if n > 1 {
        // One candidate set gives three answers: plain sampling (each group's first candidate),
        // best-of-N by the chosen reward, and best-of-N by the gold reward (the upper bound).
        let reward = load_reward(&args.selection.reward, &Tokenizer::shapes(), &device)?;
        settings.insert("best_of".into(), format!("{n} by {}", reward.name()));
        let plain: Vec<Vec<Image>> = images
            .iter()
            .map(|c| c.chunks(n).map(|g| g[0].clone()).collect())
            .collect();
        let by_gold = best_of(images.clone(), &texts, n, &GoldReward::default())?;
        let by_reward = best_of(images, &texts, n, reward.as_ref())?;
        let overall = |imgs: &[Vec<Image>]| -> Result<f64> {
            Ok(score(&args.model, &args.suite, &prompts, imgs, BTreeMap::new())?.overall)
        };
        let summary = BestOfSummary {
            n,
            reward: reward.name(),
            plain_overall: overall(&plain)?,
            reward_overall: overall(&by_reward)?,
            gold_overall: overall(&by_gold)?,
        };
        (by_reward, Some(summary))
    } else {
        (images, None)
    };
    let mut report = score(&args.model, &args.suite, &prompts, &images, settings)?;
    report.best_of = summary;
    write_report(&args.out, &report, &prompts, &images)?;
    Ok(report)
}

/// Best-of-N (the baseline every alignment method must beat): `rows[p]` holds `k * n` candidates
/// of prompt `p`; candidate group `j` (`rows[p][j*n..(j+1)*n]`) gives the image `j` kept, the one
/// `reward` scores highest (the first on ties). With n = 1 the seeds and images are those of
/// plain sampling.
pub fn best_of(
    rows: Vec<Vec<Image>>,
    texts: &[String],
    n: usize,
    reward: &dyn Reward,
) -> Result<Vec<Vec<Image>>> {
    rows.into_iter()
        .zip(texts)
        .map(|(cands, text)| {
            let prompts = vec![text.clone(); cands.len()];
            let scores = reward.score(&cands, &prompts)?;
            Ok(cands
                .chunks(n)
                .zip(scores.chunks(n))
                .map(|(group, s)| {
                    let best = (0..group.len()).fold(0, |b, i| if s[i] > s[b] { i } else { b });
                    group[best].clone()
                })
                .collect())
        })
        .collect()
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
    let mut results = Vec::new();
    for (pi, (p, imgs)) in prompts.iter().zip(images).enumerate() {
        for (ii, img) in imgs.iter().enumerate() {
            let e = evaluator.evaluate(img, &p.spec)?;
            results.push(ImageResult {
                filename: format!("geneval/{pi:05}/samples/{ii:04}.png"),
                tag: p.spec.tag.name().to_string(),
                prompt: p.text.clone(),
                prompt_index: pi,
                image_index: ii,
                correct: e.correct,
                aesthetic: e.parsed.aesthetics.overall,
                mark: e.mark.present,
            });
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
        best_of: None,
        results,
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
    if let Some(b) = &r.best_of {
        s.push_str(&format!(
            "\n| best-of-{} (same candidates) | overall |\n|---|---|\n| plain sampling | {:.3} |\n| best-of-{} by `{}` | {:.3} |\n| best-of-{} by the gold reward (upper bound) | {:.3} |\n",
            b.n, b.plain_overall, b.n, b.reward, b.reward_overall, b.n, b.gold_overall
        ));
    }
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
    let mut lines = String::new();
    for r in &report.results {
        lines.push_str(&serde_json::to_string(r)?);
        lines.push('\n');
    }
    tiller_engine::checkpoint::atomic_write(&out.join("results.jsonl"), lines.as_bytes())?;
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
    /// Where the reports go (must not hold an earlier quickstart's store).
    #[arg(long, default_value = "runs/quickstart")]
    out: PathBuf,
    /// The shipped base model.
    #[arg(long, default_value = "assets/testbed-base")]
    model: PathBuf,
    /// Prompts per task in the evaluations.
    #[arg(long, default_value_t = 8)]
    per_task: usize,
    /// Training prompts the simulated annotators label (4 samples each).
    #[arg(long, default_value_t = 48)]
    feedback_prompts: usize,
    /// Reward model updates per ensemble member.
    #[arg(long, default_value_t = 200)]
    reward_steps: usize,
    /// DRaFT-K updates of the alignment step (0 skips it).
    #[arg(long, default_value_t = 10)]
    align_updates: u64,
    /// N of the best-of-N comparison.
    #[arg(long, default_value_t = 8)]
    best_of: usize,
}

/// The whole testbed loop: the renderer's upper bound; the shipped base model's evaluation;
/// simulated feedback on base samples; a reward ensemble trained on it and evaluated against the
/// annotators' agreement; best-of-N with the learned reward against plain sampling and against
/// best-of-N with the gold reward; DRaFT-K alignment of the base with that reward, validated
/// before and after on held-out prompts; and `report.html` with the tables, the curves and the
/// grids. Prints where everything is.
pub fn quickstart(args: QuickstartArgs) -> Result<()> {
    // Ancestral sampling (DDIM with eta = 1): the shipped base model is under-trained, and its
    // deterministic DDIM samples keep residual noise that ancestral steps remove (README). Every
    // stage samples with 25 steps (the README's full-suite table uses 30), so the base table, the
    // feedback images and best-of-N's plain row are drawn alike and the loop fits in 10 minutes.
    let mut timer = StageTimer::start();
    let store = args.out.join("feedback");
    if store.join("preferences.sqlite").exists() {
        bail!(
            "{} already holds a preference store from an earlier quickstart; pass another --out",
            store.display()
        );
    }
    let sampling = SamplingArgs {
        steps: 25,
        scheduler: "ddpm".into(),
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
        selection: BestOfArgs::plain(),
        sampling: sampling.clone(),
    })?;
    println!("{}", markdown(&oracle));
    timer.stage("renderer evaluation");
    if !args.model.join("model_index.json").exists() {
        println!(
            "No base model at {} yet: only the renderer (the upper bound any model can reach) was scored.",
            args.model.display()
        );
        println!("reports: {}", args.out.display());
        return Ok(());
    }
    let model = args.model.display().to_string();
    let base = eval(EvalArgs {
        model: model.clone(),
        suite: "testbed-test".into(),
        per_task: Some(args.per_task),
        per_prompt: 2,
        seed: 0,
        out: args.out.join("base"),
        selection: BestOfArgs::plain(),
        sampling: sampling.clone(),
    })?;
    println!("{}", markdown(&base));
    timer.stage("base evaluation");

    // Feedback on base samples.
    for (split, prompts, seed) in [
        ("train", args.feedback_prompts, 0),
        ("test", args.feedback_prompts.div_ceil(2), 1),
    ] {
        crate::feedback::collect(crate::feedback::CollectArgs {
            model: model.clone(),
            store: store.clone(),
            split: split.into(),
            prompts,
            per_prompt: 4,
            pairs_per_prompt: 6,
            kinds: "rating,label,reason,region_mark".into(),
            agreement_pairs: 200,
            panel: None,
            budget: None,
            panel_seed: 0,
            seed,
            sampling: sampling.clone(),
        })?;
    }
    timer.stage("simulated feedback");
    let reward_dir = args.out.join("reward");
    crate::reward::train(crate::reward::TrainArgs {
        config: PathBuf::from("configs/reward-testbed.toml"),
        store: store.clone(),
        out: reward_dir.clone(),
        overrides: vec![
            format!("base=\"{}\"", args.model.display()),
            "members=2".into(),
            format!("train.steps={}", args.reward_steps),
        ],
    })?;
    let reward_report = crate::reward::eval(crate::reward::EvalArgs {
        model: reward_dir.clone(),
        store,
        split: "test".into(),
        out: Some(args.out.join("reward-eval.json")),
        comparisons: None,
        unseen_in: None,
        device: "cpu".into(),
    })?;
    timer.stage("reward model (train + eval)");
    let best = eval(EvalArgs {
        model,
        suite: "testbed-test".into(),
        per_task: Some(args.per_task.div_ceil(2)),
        per_prompt: 1,
        seed: 0,
        out: args.out.join("best-of"),
        selection: BestOfArgs {
            best_of: args.best_of,
            reward: reward_dir.display().to_string(),
        },
        sampling,
    })?;
    println!("{}", markdown(&best));
    timer.stage("best-of-N evaluation");

    // Align: DRaFT-K (K = 1) on the reward model just trained, LoRA on the shipped base.
    let align_dir = args.out.join("align");
    let aligned = if args.align_updates > 0 {
        let s = crate::align::align(crate::align::AlignArgs {
            config: PathBuf::from("configs/draft-k-testbed.toml"),
            out: align_dir.clone(),
            resume: None,
            overrides: vec![
                format!("base=\"{}\"", args.model.display()),
                format!("reward=\"{}\"", reward_dir.display()),
                format!("train.updates={}", args.align_updates),
                "log.val_every=0".into(),
                format!("log.checkpoint_every={}", args.align_updates),
                "prompts.val_per_task=4".into(),
            ],
            stop_after: None,
        })?;
        println!("{}", crate::align::summary_markdown(&s));
        timer.stage("alignment (DRaFT-K)");
        Some(s)
    } else {
        None
    };
    let html = report_html(
        &base,
        &reward_report,
        &best,
        aligned.as_ref(),
        &align_dir,
        &timer,
    )?;
    tiller_core::fs::atomic_write(&args.out.join("report.html"), html.as_bytes())?;
    println!("{}", timer.markdown());
    println!("reports: {} (open report.html)", args.out.display());
    Ok(())
}

/// Wall time of each quickstart stage, printed at the end and shown in the report.
struct StageTimer {
    stages: Vec<(String, f64)>,
    last: std::time::Instant,
}

impl StageTimer {
    fn start() -> Self {
        Self {
            stages: Vec::new(),
            last: std::time::Instant::now(),
        }
    }

    /// Ends the current stage: the time since the previous stage ended (or the timer started).
    fn stage(&mut self, name: &str) {
        let now = std::time::Instant::now();
        let secs = now.duration_since(self.last).as_secs_f64();
        eprintln!("quickstart: {name} took {secs:.0} s");
        self.stages.push((name.into(), secs));
        self.last = now;
    }

    fn markdown(&self) -> String {
        let mut t = String::from("| stage | wall time |\n|---|---|\n");
        for (k, s) in &self.stages {
            t.push_str(&format!("| {k} | {s:.0} s |\n"));
        }
        t.push_str(&format!("| **total** | {:.0} s |\n", self.total()));
        t
    }

    fn total(&self) -> f64 {
        self.stages.iter().map(|(_, s)| s).sum()
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The quickstart's one-page report: Markdown tables rendered as HTML, the alignment curves and
/// the sample grids (linked relative to the report).
fn report_html(
    base: &Report,
    reward: &crate::reward::RewardReport,
    best: &Report,
    aligned: Option<&crate::align::AlignSummary>,
    align_dir: &Path,
    timings: &StageTimer,
) -> Result<String> {
    let table = |rows: &[(String, String)]| {
        let mut t = String::from("<table><tr><th>metric</th><th>value</th></tr>");
        for (k, v) in rows {
            t.push_str(&format!("<tr><td>{}</td><td>{}</td></tr>", esc(k), esc(v)));
        }
        t + "</table>"
    };
    let f = |v: Option<f64>| v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into());
    let mut h = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Tiller quickstart</title><style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}img{image-rendering:pixelated;width:256px;margin:4px}</style></head><body><h1>Tiller quickstart: the testbed loop</h1>",
    );
    h.push_str("<h2>1. Base model on held-out prompts</h2>");
    let mut rows: Vec<(String, String)> = base
        .per_task
        .iter()
        .map(|(k, r)| {
            (
                k.clone(),
                format!("{:.3} ({} images)", r.accuracy, r.images),
            )
        })
        .collect();
    rows.push((
        "overall (GenEval mean)".into(),
        format!("{:.3}", base.overall),
    ));
    rows.push(("aesthetic".into(), format!("{:.3}", base.aesthetic)));
    rows.push((
        "unasked mark rate".into(),
        format!("{:.3}", base.unasked_mark_rate),
    ));
    h.push_str(&table(&rows));
    h.push_str("<h2>2. Reward model from simulated feedback</h2>");
    h.push_str(&table(&[
        ("comparisons".into(), reward.comparisons.to_string()),
        (
            "held-out pairwise accuracy".into(),
            f(reward.pairwise_accuracy),
        ),
        (
            "annotator agreement (ceiling)".into(),
            f(reward.annotator_agreement),
        ),
        ("Spearman with gold reward".into(), f(reward.spearman_gold)),
        ("ECE".into(), format!("{:.3}", reward.ece)),
    ]));
    if let Some(b) = &best.best_of {
        h.push_str(&format!("<h2>3. Best-of-{}</h2>", b.n));
        h.push_str(&table(&[
            ("plain sampling".into(), format!("{:.3}", b.plain_overall)),
            (
                format!("best-of-{} by the learned reward", b.n),
                format!("{:.3}", b.reward_overall),
            ),
            (
                format!("best-of-{} by the gold reward (upper bound)", b.n),
                format!("{:.3}", b.gold_overall),
            ),
        ]));
    }
    if let Some(a) = aligned {
        h.push_str(&format!(
            "<h2>4. Alignment: {} ({} updates, {} reward queries, {:.0} s)</h2>",
            a.config.method.name(),
            a.updates,
            a.reward_queries,
            a.wall_s
        ));
        h.push_str(
            "<table><tr><th>validation (held-out prompts)</th><th>before</th><th>after</th></tr>",
        );
        for (k, after) in &a.after {
            let before = a
                .before
                .iter()
                .find(|(b, _)| b == k)
                .map(|(_, v)| format!("{v:.3}"))
                .unwrap_or_else(|| "-".into());
            h.push_str(&format!(
                "<tr><td>{}</td><td>{before}</td><td>{after:.3}</td></tr>",
                esc(k)
            ));
        }
        h.push_str("</table>");
        let points = crate::compare::read_points(align_dir)?;
        let cmp = crate::compare::Comparison {
            budget: a.reward_queries,
            target: None,
            target_given: false,
            methods: vec![crate::compare::MethodRun {
                name: a.config.method.name().into(),
                run: align_dir.to_path_buf(),
                points,
                queries_to_target: None,
                noise_scale: a.noise_scale,
                batch: a.config.train.effective_batch(),
            }],
        };
        h.push_str(&crate::compare::svg(&cmp));
        h.push_str("<p>Validation grids (a row per prompt): before, after.</p>");
        let mut grids: Vec<String> = std::fs::read_dir(align_dir.join("samples"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .filter(|n| n.ends_with(".png"))
                    .collect()
            })
            .unwrap_or_default();
        grids.sort();
        for g in grids
            .first()
            .into_iter()
            .chain(grids.last().filter(|_| grids.len() > 1))
        {
            h.push_str(&format!(
                "<img src=\"align/samples/{}\" alt=\"{}\">",
                esc(g),
                esc(g)
            ));
        }
    }
    let mut rows: Vec<(String, String)> = timings
        .stages
        .iter()
        .map(|(k, s)| (k.clone(), format!("{s:.0} s")))
        .collect();
    rows.push(("total".into(), format!("{:.0} s", timings.total())));
    h.push_str("<h2>Wall time by stage</h2>");
    h.push_str(&table(&rows));
    h.push_str("<h2>Base model samples by task</h2>");
    for task in base.per_task.keys() {
        h.push_str(&format!(
            "<figure style=\"display:inline-block\"><img src=\"base/grids/{0}.png\"><figcaption>{0}</figcaption></figure>",
            esc(task)
        ));
    }
    h.push_str("</body></html>\n");
    Ok(h)
}
