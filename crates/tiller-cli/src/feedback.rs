//! `tiller feedback collect`: simulated annotators label model samples into the preference store.
//!
//! For each drawn prompt the model samples `--per-prompt` images (fixed seeds); the panel compares
//! `--pairs-per-prompt` distinct pairs of them (one annotator per query, in turn) and gives each
//! image a rating, a like/dislike, reasons and region marks (each kind optional). On
//! `--agreement-pairs` of the pairs every annotator is asked, and the inter-annotator agreement
//! (the ceiling a reward model can be expected to reach) is written to
//! `<store>/agreement-<split>.json`. Everything of one collection is written in one transaction.

use crate::args::{SamplingArgs, load_model};
use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;
use std::path::{Path, PathBuf};
use tiller_core::SeededRng;
use tiller_eval::sampling::{check_resolution, sample_prompts};
use tiller_feedback::{
    Batch, Candidate, Feedback, ImageId, Panel, PanelConfig, PreferenceStore, PromptId,
    PromptRecord, Split, SqliteStore,
};
use tiller_testbed::image::encode_png;
use tiller_testbed::{
    Evaluation, Evaluator, Image, Prompt, PromptSetConfig, RenderConfig, prompts, render_prompt,
};

#[derive(Args)]
pub struct CollectArgs {
    /// A pipeline folder, or `renderer`: each prompt's own renderings alternated with renderings
    /// of other prompts of the same task (plausible mistakes), for feedback without a model.
    #[arg(long, default_value = "assets/testbed-base")]
    pub model: String,
    /// The preference store folder (created if missing; new records are appended).
    #[arg(long)]
    pub store: PathBuf,
    /// Which prompts: `train` (the training split) or `test` (held-out prompts).
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Prompts to draw from the split (seeded shuffle).
    #[arg(long, default_value_t = 64)]
    pub prompts: usize,
    /// Images sampled per prompt.
    #[arg(long, default_value_t = 4)]
    pub per_prompt: usize,
    /// Distinct image pairs compared per prompt.
    #[arg(long, default_value_t = 6)]
    pub pairs_per_prompt: usize,
    /// Per-image feedback kinds to ask besides comparisons (comma-separated: rating, label,
    /// reason, region_mark; `none` for comparisons only).
    #[arg(long, default_value = "rating,label,reason,region_mark")]
    pub kinds: String,
    /// Pairs on which every annotator answers, to measure their agreement.
    #[arg(long, default_value_t = 200)]
    pub agreement_pairs: usize,
    /// The annotator panel (TOML of `PanelConfig`; default: 5 annotators, documented tastes).
    #[arg(long)]
    pub panel: Option<PathBuf>,
    /// Most queries the panel may answer (agreement queries included).
    #[arg(long)]
    pub budget: Option<u64>,
    /// Seed of the panel's tastes: keep it to label more data with the same annotators.
    #[arg(long, default_value_t = 0)]
    pub panel_seed: u64,
    /// Seed of this collection: prompts drawn, images, pairs and the annotators' answer noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// What a collection did (printed, and returned for the quickstart).
#[derive(Debug, Clone, Serialize)]
pub struct CollectSummary {
    pub split: String,
    pub prompts: usize,
    pub images: usize,
    pub comparisons: usize,
    pub other_feedback: usize,
    /// Queries the panel answered (agreement queries included).
    pub queries: u64,
    /// Inter-annotator agreement on the agreement pairs (None when not measured).
    pub agreement: Option<f64>,
    pub agreement_pairs: usize,
}

fn shuffled<T: Clone>(list: &[T], rng: &mut SeededRng) -> Vec<T> {
    let mut v = list.to_vec();
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i + 1));
    }
    v
}

/// The images of each prompt: sampled from a pipeline, or contrast renderings.
fn candidate_images(
    model: &str,
    prompts: &[Prompt],
    pool: &[Prompt],
    per_prompt: usize,
    seed: u64,
    sampling: &SamplingArgs,
) -> Result<Vec<Vec<Image>>> {
    if model == "renderer" {
        let cfg = RenderConfig::default();
        let mut rng = SeededRng::new(seed ^ 0x5eed);
        return prompts
            .iter()
            .map(|p| {
                let same_task: Vec<&Prompt> = pool
                    .iter()
                    .filter(|q| q.spec.tag == p.spec.tag && q.spec != p.spec)
                    .collect();
                (0..per_prompt)
                    .map(|j| {
                        let subject = if j % 2 == 0 {
                            p
                        } else {
                            if same_task.is_empty() {
                                p
                            } else {
                                same_task[rng.below(same_task.len())]
                            }
                        };
                        Ok(render_prompt(subject, &cfg, rng.below(1 << 40) as u64)?.image)
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect();
    }
    let device = tiller_core::device::parse_device(&sampling.device)?;
    let (pipe, tokenizer) = load_model(Path::new(model), &device)?;
    check_resolution(&pipe, sampling.resolution)?;
    let settings = sampling.settings(&pipe)?;
    let seeds: Vec<u64> = (0..per_prompt as u64)
        .map(|j| seed.wrapping_mul(1_000_003).wrapping_add(j))
        .collect();
    let texts: Vec<String> = prompts.iter().map(|p| p.text.clone()).collect();
    Ok(sample_prompts(
        &pipe, &tokenizer, &texts, &seeds, &settings, &device,
    )?)
}

pub fn collect(args: CollectArgs) -> Result<CollectSummary> {
    let split = Split::parse(&args.split)?;
    let all = prompts::generate_splits(&PromptSetConfig::default())?;
    let pool = match split {
        Split::Train => all.train,
        Split::Test => all.test,
        other => bail!(
            "--split {}: the testbed has train and test prompts",
            other.name()
        ),
    };
    if args.per_prompt < 2 {
        bail!("--per-prompt must be at least 2 to compare images");
    }
    let mut kinds = Vec::new();
    for k in args
        .kinds
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
    {
        match k {
            "rating" | "label" | "reason" | "region_mark" => kinds.push(k.to_string()),
            "none" => {}
            other => bail!(
                "--kinds: unknown kind `{other}`; valid: rating, label, reason, region_mark, none"
            ),
        }
    }
    let mut panel_cfg: PanelConfig = match &args.panel {
        Some(p) => tiller_core::config::from_toml_file(p)?,
        None => PanelConfig::default(),
    };
    if args.budget.is_some() {
        panel_cfg.budget = args.budget;
    }
    let mut panel = Panel::new(&panel_cfg, args.panel_seed)?;
    panel.reseed(args.seed);
    let mut rng = SeededRng::new(args.seed);
    let chosen: Vec<Prompt> = shuffled(&pool, &mut rng)
        .into_iter()
        .take(args.prompts)
        .collect();
    eprintln!(
        "feedback collect: {} prompts x {} images from {}",
        chosen.len(),
        args.per_prompt,
        args.model
    );
    let images = candidate_images(
        &args.model,
        &chosen,
        &pool,
        args.per_prompt,
        args.seed,
        &args.sampling,
    )?;

    let mut store = SqliteStore::open(&args.store)
        .with_context(|| format!("opening the store {}", args.store.display()))?;
    let evaluator = Evaluator::default();
    let mut batch = Batch {
        annotators: panel.records(),
        ..Batch::default()
    };
    // Per prompt: (id, [(image id, evaluation)]).
    let mut scored: Vec<(PromptId, Vec<(ImageId, Evaluation)>)> = Vec::new();
    for (p, imgs) in chosen.iter().zip(&images) {
        let record = PromptRecord::from_testbed(p, split);
        let mut row = Vec::new();
        for img in imgs {
            let rec = store.put_image_file(&encode_png(img)?)?;
            let e = evaluator.evaluate(img, &p.spec)?;
            if !batch.images.iter().any(|r| r.id == rec.id) {
                batch.images.push(rec.clone());
            }
            row.push((rec.id, e));
        }
        scored.push((record.id.clone(), row));
        batch.prompts.push(record);
    }
    let n_ann = panel.annotators().len();
    let mut turn = 0usize;
    let mut next = || {
        turn += 1;
        (turn - 1) % n_ann
    };
    let mut comparisons = 0usize;
    let mut other = 0usize;
    let mut agreement_set: Vec<(usize, usize, usize)> = Vec::new();
    for (pi, (pid, row)) in scored.iter().enumerate() {
        let mut pairs: Vec<(usize, usize)> = (0..row.len())
            .flat_map(|a| (a + 1..row.len()).map(move |b| (a, b)))
            .filter(|&(a, b)| row[a].0 != row[b].0)
            .collect();
        pairs = shuffled(&pairs, &mut rng);
        for &(a, b) in pairs.iter().take(args.pairs_per_prompt) {
            // Randomise sides so that position carries no signal.
            let (a, b) = if rng.uniform() < 0.5 { (a, b) } else { (b, a) };
            let ca = Candidate {
                image: &row[a].0,
                evaluation: &row[a].1,
            };
            let cb = Candidate {
                image: &row[b].0,
                evaluation: &row[b].1,
            };
            let c = panel.compare(next(), pid, ca, cb)?;
            batch.feedback.push(Feedback::Comparison(c));
            comparisons += 1;
            if agreement_set.len() < args.agreement_pairs {
                agreement_set.push((pi, a, b));
            }
        }
        for (id, e) in row {
            let c = Candidate {
                image: id,
                evaluation: e,
            };
            for k in &kinds {
                match k.as_str() {
                    "rating" => {
                        batch
                            .feedback
                            .push(Feedback::Rating(panel.rate(next(), pid, c)?));
                        other += 1;
                    }
                    "label" => {
                        batch
                            .feedback
                            .push(Feedback::Label(panel.label(next(), pid, c)?));
                        other += 1;
                    }
                    "reason" => {
                        batch
                            .feedback
                            .push(Feedback::Reason(panel.reason(next(), pid, c)?));
                        other += 1;
                    }
                    _ => {
                        for m in panel.mark(next(), pid, c)? {
                            batch.feedback.push(Feedback::RegionMark(m));
                            other += 1;
                        }
                    }
                }
            }
        }
    }
    let agreement = if n_ann >= 2 && !agreement_set.is_empty() {
        let pairs: Vec<(Candidate, Candidate)> = agreement_set
            .iter()
            .map(|&(pi, a, b)| {
                let row = &scored[pi].1;
                (
                    Candidate {
                        image: &row[a].0,
                        evaluation: &row[a].1,
                    },
                    Candidate {
                        image: &row[b].0,
                        evaluation: &row[b].1,
                    },
                )
            })
            .collect();
        panel.agreement_on(&scored[0].0, &pairs).ok()
    } else {
        None
    };
    store.write(&batch)?;
    let summary = CollectSummary {
        split: split.name().to_string(),
        prompts: chosen.len(),
        images: images.iter().map(Vec::len).sum(),
        comparisons,
        other_feedback: other,
        queries: panel.budget().asked,
        agreement,
        agreement_pairs: agreement_set.len(),
    };
    if let Some(a) = agreement {
        let json = serde_json::json!({
            "split": summary.split,
            "agreement": a,
            "pairs": summary.agreement_pairs,
            "annotators": n_ann,
        });
        tiller_core::fs::atomic_write(
            &args.store.join(format!("agreement-{}.json", summary.split)),
            serde_json::to_string_pretty(&json)?.as_bytes(),
        )?;
    }
    println!(
        "stored {} comparisons and {} other labels on {} images of {} {} prompts in {} ({} queries); annotator agreement {}",
        summary.comparisons,
        summary.other_feedback,
        summary.images,
        summary.prompts,
        summary.split,
        args.store.display(),
        summary.queries,
        agreement.map_or("not measured".into(), |a| format!("{a:.3}"))
    );
    Ok(summary)
}
