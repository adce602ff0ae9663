//! `tiller feedback collect`: simulated annotators label model samples into the preference store
//! (`tiller_eval::feedback`).
//!
//! For each drawn prompt the model samples `--per-prompt` images (fixed seeds); the panel compares
//! `--pairs-per-prompt` distinct pairs of them (one annotator per query, in turn) and gives each
//! image a rating, a like/dislike, reasons and region marks (each kind optional). On
//! `--agreement-pairs` of the pairs every annotator is asked, and the inter-annotator agreement
//! (the ceiling a reward model can be expected to reach) is written to
//! `<store>/agreement-<split>.json`. Everything of one collection is written in one transaction.

use crate::args::{SamplingArgs, load_model};
use anyhow::Result;
use clap::Args;
use std::path::{Path, PathBuf};
use tiller_eval::feedback::{CollectSummary, Collection, Images, Kind, collect as run};
use tiller_eval::sampling::check_resolution;
use tiller_feedback::{PanelConfig, Split};

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
    #[arg(long, default_value = "train", value_parser = ["train", "test"])]
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

pub fn collect(args: CollectArgs) -> Result<CollectSummary> {
    let mut panel: PanelConfig = match &args.panel {
        Some(p) => tiller_core::config::from_toml_file(p)?,
        None => PanelConfig::default(),
    };
    if args.budget.is_some() {
        panel.budget = args.budget;
    }
    let device = tiller_core::device::parse_device(&args.sampling.device)?;
    let loaded;
    let images = if args.model == "renderer" {
        Images::Renderer
    } else {
        loaded = load_model(Path::new(&args.model), &device)?;
        check_resolution(&loaded.0, args.sampling.resolution)?;
        Images::Model {
            pipe: &loaded.0,
            tokenizer: &loaded.1,
            settings: args.sampling.settings(&loaded.0)?,
            device: &device,
        }
    };
    let summary = run(Collection {
        images,
        model: args.model.clone(),
        store: &args.store,
        split: Split::parse(&args.split)?,
        prompts: args.prompts,
        per_prompt: args.per_prompt,
        pairs_per_prompt: args.pairs_per_prompt,
        kinds: Kind::parse_list(&args.kinds)?,
        agreement_pairs: args.agreement_pairs,
        panel,
        panel_seed: args.panel_seed,
        seed: args.seed,
    })?;
    let agreement = summary.agreement;
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

/// `tiller feedback safety-pairs`: safe/unsafe pairs in CoProV2's form for SafetyDPO
/// (`tiller_eval::safety_pairs`).
#[derive(Args)]
pub struct SafetyPairsArgs {
    /// The pipeline folder that draws both images of a pair (the model to be made safe).
    #[arg(long, default_value = "assets/testbed-base")]
    pub model: PathBuf,
    /// The preference store folder (created if missing; new records are appended).
    #[arg(long)]
    pub store: PathBuf,
    /// Which unsafe prompts: `train` or `test`.
    #[arg(long, default_value = "train", value_parser = ["train", "test"])]
    pub split: String,
    /// Unsafe prompts with a safe twin to draw (seeded shuffle; 0: all).
    #[arg(long, default_value_t = 0)]
    pub prompts: usize,
    /// Pairs sampled per prompt (one seed each).
    #[arg(long, default_value_t = 4)]
    pub per_prompt: usize,
    /// Keep every sampled pair, as CoProV2 does; by default a pair is kept only when the gold
    /// evaluator sees the forbidden content in the unsafe image and not in the safe one.
    #[arg(long)]
    pub keep_all: bool,
    /// Seed of the prompt draw, the images and the sides.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

pub fn safety_pairs(args: SafetyPairsArgs) -> Result<()> {
    let device = tiller_core::device::parse_device(&args.sampling.device)?;
    let (pipe, tokenizer) = load_model(&args.model, &device)?;
    check_resolution(&pipe, args.sampling.resolution)?;
    let s =
        tiller_eval::safety_pairs::collect_safety_pairs(tiller_eval::safety_pairs::SafetyPairs {
            pipe: &pipe,
            tokenizer: &tokenizer,
            settings: args.sampling.settings(&pipe)?,
            device: &device,
            store: &args.store,
            split: Split::parse(&args.split)?,
            prompts: args.prompts,
            per_prompt: args.per_prompt,
            check: !args.keep_all,
            seed: args.seed,
        })?;
    let kept: Vec<String> = s.kept.iter().map(|(c, n)| format!("{c}: {n}")).collect();
    println!(
        "stored {} safe/unsafe pairs ({}) of {} sampled on {} {} prompts in {}; dropped {} whose \
         unsafe image lacked the forbidden content and {} whose safe image showed it",
        s.kept.values().sum::<usize>(),
        if kept.is_empty() {
            "none".to_string()
        } else {
            kept.join(", ")
        },
        s.sampled,
        s.prompts,
        s.split,
        args.store.display(),
        s.dropped_unsafe_clean,
        s.dropped_safe_marked
    );
    Ok(())
}
