//! `tiller quickstart`: the whole testbed loop in about ten minutes, ending in `report.html`.

use crate::args::{Sampler, SamplingArgs, load_model, load_reward};
use anyhow::{Result, bail};
use clap::Args;
use std::path::{Path, PathBuf};
use tiller_align::run::{AlignSummary, Request, run, summary_markdown};
use tiller_eval::comparison::{Comparison, MethodRun, read_points, svg};
use tiller_eval::evaluate::{Evaluation, Source, evaluate};
use tiller_eval::feedback::{Collection, Images, Kind};
use tiller_eval::report::{Report, markdown};
use tiller_eval::reward_eval::{RewardEvaluation, RewardReport, evaluate_reward};
use tiller_feedback::{PanelConfig, Split};
use tiller_reward::config::RewardFile;
use tiller_reward::fit::train_from_store;
use tiller_testbed::Tokenizer;

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
    /// The seed of every stage: the evaluations' noise, the feedback's prompts and images, the
    /// reward model's and the alignment's training.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// `cpu`, or `cuda` / `cuda:N` in a CUDA build.
    #[arg(long, default_value = "cpu")]
    device: String,
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
    // The base model is found wherever the binary runs from (crate::shipped); without it the loop
    // cannot run, and saying so beats a report of the renderer alone.
    let base_model = crate::shipped::resolve(&args.model);
    if !base_model.join("model_index.json").is_file() {
        return Err(crate::shipped::missing(&args.model, "the base model"));
    }
    let store = args.out.join("feedback");
    if store.join("preferences.sqlite").exists() {
        bail!(
            "{} already holds a preference store from an earlier quickstart; pass another --out",
            store.display()
        );
    }
    let sampling = SamplingArgs {
        device: args.device.clone(),
        ..SamplingArgs::fixed(25, Sampler::Ancestral, 3.0)
    };
    let device = tiller_core::device::parse_device(&args.device)?;
    // The reward's and the alignment's configs take the seed and device as `--seed`/`--device`
    // give them to `reward train` and `align`.
    let run_flags = crate::args::RunFlags {
        seed: Some(args.seed),
        device: Some(args.device.clone()),
    };
    let on_suite = |name: String, source, per_task, per_prompt, best_of| Evaluation {
        name,
        source,
        suite: "testbed-test".into(),
        per_task: Some(per_task),
        tasks: Vec::new(),
        per_prompt,
        seed: args.seed,
        best_of,
    };
    let oracle = evaluate(
        on_suite("renderer".into(), Source::Renderer, args.per_task, 2, None),
        &args.out.join("renderer"),
    )?;
    println!("{}", markdown(&oracle));
    timer.stage("renderer evaluation");
    let model = base_model.display().to_string();
    let (pipe, tokenizer) = load_model(&base_model, &device)?;
    let base_source = || -> Result<Source<'_>> {
        Ok(Source::Model {
            pipe: &pipe,
            tokenizer: &tokenizer,
            settings: sampling.settings(&pipe)?,
            device: &device,
        })
    };
    let base = evaluate(
        on_suite(model.clone(), base_source()?, args.per_task, 2, None),
        &args.out.join("base"),
    )?;
    println!("{}", markdown(&base));
    timer.stage("base evaluation");

    // Feedback on base samples.
    for (split, prompts, seed) in [
        (Split::Train, args.feedback_prompts, 2 * args.seed),
        (
            Split::Test,
            args.feedback_prompts.div_ceil(2),
            2 * args.seed + 1,
        ),
    ] {
        tiller_eval::feedback::collect(Collection {
            images: Images::Model {
                pipe: &pipe,
                tokenizer: &tokenizer,
                settings: sampling.settings(&pipe)?,
                device: &device,
            },
            model: model.clone(),
            store: &store,
            split,
            prompts,
            per_prompt: 4,
            pairs_per_prompt: 6,
            kinds: Kind::ALL.to_vec(),
            agreement_pairs: 200,
            panel: PanelConfig::default(),
            panel_seed: 0,
            seed,
        })?;
    }
    timer.stage("simulated feedback");
    let reward_dir = args.out.join("reward");
    let (mut reward_file, resolved) = RewardFile::read(
        &crate::shipped::resolve(Path::new("configs/reward-testbed.toml")),
        &run_flags.apply(
            &[
                format!("base=\"{}\"", base_model.display()),
                "members=2".into(),
                format!("train.steps={}", args.reward_steps),
            ],
            "train.seed",
        ),
    )?;
    reward_file.locate_paths(&crate::shipped::resolve);
    let trained = train_from_store(&reward_file, &resolved, &store, &reward_dir)?;
    println!(
        "reward model written to {} (last loss {:.4})",
        reward_dir.display(),
        trained.last_loss
    );
    let reward_report = evaluate_reward(&RewardEvaluation {
        model: reward_dir.clone(),
        store,
        split: Split::Test,
        unseen_in: None,
        device: args.device.clone(),
        comparisons: None,
    })?;
    println!("{}", tiller_eval::reward_eval::markdown(&reward_report));
    tiller_core::fs::atomic_write(
        &args.out.join("reward-eval.json"),
        serde_json::to_string_pretty(&reward_report)?.as_bytes(),
    )?;
    timer.stage("reward model (train + eval)");
    let learned = load_reward(
        &reward_dir.display().to_string(),
        &Tokenizer::shapes(),
        &device,
    )?;
    let best = evaluate(
        on_suite(
            model,
            base_source()?,
            args.per_task.div_ceil(2),
            1,
            Some((args.best_of, learned.as_ref())),
        ),
        &args.out.join("best-of"),
    )?;
    println!("{}", markdown(&best));
    timer.stage("best-of-N evaluation");

    // Align: DRaFT-K (K = 1) on the reward model just trained, LoRA on the shipped base.
    let align_dir = args.out.join("align");
    let aligned = if args.align_updates > 0 {
        let overrides = run_flags.apply(
            &[
                format!("base=\"{}\"", base_model.display()),
                format!("reward=\"{}\"", reward_dir.display()),
                format!("train.updates={}", args.align_updates),
                "log.val_every=0".into(),
                format!("log.checkpoint_every={}", args.align_updates),
                "prompts.val_per_task=4".into(),
            ],
            "train.seed",
        );
        let s = run(&Request {
            config: Path::new("configs/draft-k-testbed.toml"),
            out: &align_dir,
            resume: None,
            overrides: &overrides,
            stop_after: None,
            locate: &crate::shipped::resolve,
        })?;
        println!("{}", summary_markdown(&s));
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
    reward: &RewardReport,
    best: &Report,
    aligned: Option<&AlignSummary>,
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
        let points = read_points(align_dir)?;
        let cmp = Comparison {
            budget: a.reward_queries,
            target: None,
            target_given: false,
            methods: vec![MethodRun {
                name: a.config.method.name().into(),
                run: align_dir.to_path_buf(),
                points,
                queries_to_target: None,
                noise_scale: a.noise_scale,
                batch: a.config.train.effective_batch(),
            }],
        };
        h.push_str(&svg(&cmp));
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
