//! Safe/unsafe preference pairs from a model, in CoProV2's form (SafetyDPO, Liu et al. 2024):
//! for each unsafe testbed prompt that asks for an object and forbidden content, its minimally
//! different safe twin is the same text without the forbidden phrase
//! ([`tiller_testbed::prompts::safe_twin`]); the model draws both from the same noise (the unsafe
//! prompt and its twin are image `j` of prompt `i` in two otherwise identical sampling calls), and
//! the twin's image is preferred, recorded under the unsafe prompt, so Diffusion-DPO learns to draw
//! the safe version when asked for the unsafe one. The label is given by construction, not by an
//! annotator: each pair is recorded as annotator `safe-twin/<category>` (source
//! `dataset: safe-twin`), which is how a SafetyDPO expert selects its category.
//!
//! CoProV2 keeps every generated pair. On the testbed the gold evaluator can check them:
//! with `check` a pair is kept only when the unsafe image shows the forbidden content of its
//! category and the safe one shows none (a pair without the content teaches nothing about it). Everything of one
//! collection is written in one transaction.

use crate::sampling::{SampleSettings, sample_prompts};
use burn::tensor::Device;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use tiller_core::{Error, Result, SeededRng};
use tiller_diffusion::pipeline::TextToImage;
use tiller_feedback::{
    AnnotatorId, AnnotatorRecord, Batch, Choice, Comparison, Feedback, PreferenceStore,
    PromptRecord, Provenance, Source, Split, SqliteStore,
};
use tiller_testbed::image::encode_png;
use tiller_testbed::prompts::{safe_twin, unsafe_category};
use tiller_testbed::scene::Forbidden;
use tiller_testbed::{Evaluator, Prompt, PromptSetConfig, Task, Tokenizer, prompts};

/// The dataset name of constructed pairs.
pub const DATASET: &str = "safe-twin";

/// One collection of safe/unsafe pairs.
pub struct SafetyPairs<'a> {
    pub pipe: &'a TextToImage,
    pub tokenizer: &'a Tokenizer,
    pub settings: SampleSettings,
    pub device: &'a Device,
    /// The store folder (created if missing; records are appended).
    pub store: &'a Path,
    /// `train` or `test` prompts of the testbed.
    pub split: Split,
    /// Unsafe prompts drawn (seeded shuffle of those with a safe twin; 0: all).
    pub prompts: usize,
    /// Pairs sampled per prompt (seeds).
    pub per_prompt: usize,
    /// Keep only pairs whose unsafe image shows the forbidden content and whose safe image does
    /// not (the gold evaluator's detection).
    pub check: bool,
    /// Seed of the prompt draw, the images and the sides.
    pub seed: u64,
}

/// What a collection did.
#[derive(Debug, Clone, Serialize)]
pub struct SafetyPairsSummary {
    pub split: String,
    pub prompts: usize,
    /// Pairs sampled.
    pub sampled: usize,
    /// Pairs written, by category.
    pub kept: BTreeMap<String, usize>,
    /// Pairs dropped by the check because the unsafe image lacked the forbidden content.
    pub dropped_unsafe_clean: usize,
    /// Pairs dropped because the safe twin's image showed it.
    pub dropped_safe_marked: usize,
}

/// Samples, checks and stores one collection of pairs.
pub fn collect_safety_pairs(req: SafetyPairs<'_>) -> Result<SafetyPairsSummary> {
    if req.per_prompt == 0 {
        return Err(Error::invalid("per_prompt must be at least 1"));
    }
    let splits = prompts::generate_splits(&PromptSetConfig {
        tasks: vec![Task::Unsafe],
        ..PromptSetConfig::default()
    })?;
    let pool = match req.split {
        Split::Train => splits.train,
        Split::Test => splits.test,
        other => {
            return Err(Error::invalid(format!(
                "split {}: the testbed has train and test prompts",
                other.name()
            )));
        }
    };
    // Distinct texts with a twin, in a seeded order.
    let mut seen = std::collections::BTreeSet::new();
    let mut twins: Vec<(Prompt, Prompt)> = pool
        .into_iter()
        .filter(|p| seen.insert(p.text.clone()))
        .filter_map(|p| safe_twin(&p).map(|t| (p, t)))
        .collect();
    let mut rng = SeededRng::new(req.seed);
    rng.shuffle(&mut twins);
    if req.prompts > 0 {
        twins.truncate(req.prompts);
    }
    if twins.is_empty() {
        return Err(Error::invalid(
            "no unsafe prompt with a safe twin to collect",
        ));
    }
    eprintln!(
        "safety-pairs: {} unsafe prompts and their safe twins x {} seeds",
        twins.len(),
        req.per_prompt
    );
    let seeds: Vec<u64> = (0..req.per_prompt as u64)
        .map(|j| req.seed.wrapping_mul(1_000_003).wrapping_add(j))
        .collect();
    let unsafe_texts: Vec<String> = twins.iter().map(|(p, _)| p.text.clone()).collect();
    let safe_texts: Vec<String> = twins.iter().map(|(_, t)| t.text.clone()).collect();
    // Prompt i of either list gets noise stream i: a pair shares its noise.
    let unsafe_images = sample_prompts(
        req.pipe,
        req.tokenizer,
        &unsafe_texts,
        &seeds,
        &req.settings,
        req.device,
    )?;
    let safe_images = sample_prompts(
        req.pipe,
        req.tokenizer,
        &safe_texts,
        &seeds,
        &req.settings,
        req.device,
    )?;

    let evaluator = Evaluator::default();
    let mut store = SqliteStore::open(req.store)?;
    let mut batch = Batch::default();
    let mut summary = SafetyPairsSummary {
        split: req.split.name().to_string(),
        prompts: twins.len(),
        sampled: 0,
        kept: BTreeMap::new(),
        dropped_unsafe_clean: 0,
        dropped_safe_marked: 0,
    };
    for (((p, t), bad), good) in twins.iter().zip(&unsafe_images).zip(&safe_images) {
        let category = unsafe_category(&p.spec).expect("a twin's prompt is unsafe");
        let forbidden = Forbidden::from_name(category)?;
        let annotator = AnnotatorId(format!("{DATASET}/{category}"));
        let source = Source::Dataset {
            name: DATASET.to_string(),
        };
        if !batch.annotators.iter().any(|a| a.id == annotator) {
            batch.annotators.push(AnnotatorRecord {
                id: annotator.clone(),
                source: source.clone(),
                taste: None,
            });
        }
        let record = PromptRecord::from_testbed(p, req.split);
        let mut any = false;
        for (bad, good) in bad.iter().zip(good) {
            summary.sampled += 1;
            if req.check {
                if !evaluator
                    .evaluate(bad, &p.spec)?
                    .category(forbidden)
                    .present
                {
                    summary.dropped_unsafe_clean += 1;
                    continue;
                }
                if evaluator.evaluate(good, &t.spec)?.mark.present {
                    summary.dropped_safe_marked += 1;
                    continue;
                }
            }
            let bad = store.put_image_file(&encode_png(bad)?)?;
            let good = store.put_image_file(&encode_png(good)?)?;
            if bad.id == good.id {
                continue;
            }
            // Random sides, so that position carries no signal.
            let (a, b, choice) = if rng.uniform() < 0.5 {
                (good.id.clone(), bad.id.clone(), Choice::A)
            } else {
                (bad.id.clone(), good.id.clone(), Choice::B)
            };
            for rec in [good, bad] {
                if !batch.images.iter().any(|r| r.id == rec.id) {
                    batch.images.push(rec);
                }
            }
            batch.feedback.push(Feedback::Comparison(Comparison {
                prompt: record.id.clone(),
                image_a: a,
                image_b: b,
                choice,
                provenance: Provenance {
                    annotator: annotator.clone(),
                    source: source.clone(),
                    time_ms: None,
                },
            }));
            *summary.kept.entry(category.to_string()).or_default() += 1;
            any = true;
        }
        if any {
            batch.prompts.push(record);
        }
    }
    store.write(&batch)?;
    Ok(summary)
}
