//! Simulated feedback on a model's samples, into a preference store: for each drawn prompt the
//! model samples `per_prompt` images (fixed seeds, one noise stream each); the panel compares
//! `pairs_per_prompt` distinct pairs of them (one annotator per query, in turn) and gives each
//! image the per-image kinds asked (a rating, a like or dislike, reasons, region marks). On
//! `agreement_pairs` of the pairs every annotator is asked, and the inter-annotator agreement (the
//! ceiling a reward model can be expected to reach) is written to `<store>/agreement-<split>.json`.
//! Everything of one collection is written in one transaction. `tiller feedback collect` and the
//! quickstart call [`collect`].

use crate::sampling::{SampleSettings, sample_prompts};
use burn::tensor::Device;
use serde::Serialize;
use std::path::Path;
use tiller_core::{Error, Result, SeededRng};
use tiller_diffusion::pipeline::TextToImage;
use tiller_feedback::{
    Batch, Candidate, Feedback, ImageId, Panel, PanelConfig, PreferenceStore, PromptId,
    PromptRecord, Split, SqliteStore,
};
use tiller_testbed::image::encode_png;
use tiller_testbed::{
    Evaluation, Evaluator, Image, Prompt, PromptSetConfig, RenderConfig, Tokenizer, prompts,
    render_prompt,
};

/// A per-image feedback kind asked besides comparisons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Rating,
    Label,
    Reason,
    RegionMark,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Rating, Kind::Label, Kind::Reason, Kind::RegionMark];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Rating => "rating",
            Kind::Label => "label",
            Kind::Reason => "reason",
            Kind::RegionMark => "region_mark",
        }
    }

    /// A comma-separated list (`none` for comparisons only).
    pub fn parse_list(text: &str) -> Result<Vec<Kind>> {
        let mut out = Vec::new();
        for k in text.split(',').map(str::trim).filter(|k| !k.is_empty()) {
            if k == "none" {
                continue;
            }
            let kind = Kind::ALL.into_iter().find(|x| x.name() == k).ok_or_else(|| {
                Error::invalid(format!(
                    "unknown feedback kind `{k}`; valid: rating, label, reason, region_mark, none"
                ))
            })?;
            out.push(kind);
        }
        Ok(out)
    }
}

/// Where the images come from.
pub enum Images<'a> {
    /// Each prompt's own renderings alternated with renderings of other prompts of the same task
    /// (plausible mistakes), for feedback without a model.
    Renderer,
    /// A pipeline's samples.
    Model {
        pipe: &'a TextToImage,
        tokenizer: &'a Tokenizer,
        settings: SampleSettings,
        device: &'a Device,
    },
}

/// One collection.
pub struct Collection<'a> {
    pub images: Images<'a>,
    /// The model's name in messages.
    pub model: String,
    /// The store folder (created if missing; new records are appended).
    pub store: &'a Path,
    /// `train` or `test` prompts of the testbed.
    pub split: Split,
    /// Prompts drawn from the split (seeded shuffle).
    pub prompts: usize,
    /// Images per prompt (at least 2).
    pub per_prompt: usize,
    pub pairs_per_prompt: usize,
    pub kinds: Vec<Kind>,
    pub agreement_pairs: usize,
    pub panel: PanelConfig,
    /// Seed of the panel's tastes.
    pub panel_seed: u64,
    /// Seed of this collection: prompts drawn, images, pairs, the answers' noise.
    pub seed: u64,
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
    rng.shuffle(&mut v);
    v
}

/// The images of each prompt: sampled from a pipeline, or contrast renderings.
fn candidate_images(
    images: &Images<'_>,
    prompts: &[Prompt],
    pool: &[Prompt],
    per_prompt: usize,
    seed: u64,
) -> Result<Vec<Vec<Image>>> {
    match images {
        Images::Renderer => {
            let cfg = RenderConfig::default();
            let mut rng = SeededRng::new(seed ^ 0x5eed);
            prompts
                .iter()
                .map(|p| {
                    let same_task: Vec<&Prompt> = pool
                        .iter()
                        .filter(|q| q.spec.tag == p.spec.tag && q.spec != p.spec)
                        .collect();
                    (0..per_prompt)
                        .map(|j| {
                            let subject = if j % 2 == 0 || same_task.is_empty() {
                                p
                            } else {
                                same_task[rng.below(same_task.len())]
                            };
                            Ok(render_prompt(subject, &cfg, rng.below(1 << 40) as u64)?.image)
                        })
                        .collect::<Result<Vec<_>>>()
                })
                .collect()
        }
        Images::Model {
            pipe,
            tokenizer,
            settings,
            device,
        } => {
            let seeds: Vec<u64> = (0..per_prompt as u64)
                .map(|j| seed.wrapping_mul(1_000_003).wrapping_add(j))
                .collect();
            let texts: Vec<String> = prompts.iter().map(|p| p.text.clone()).collect();
            sample_prompts(pipe, tokenizer, &texts, &seeds, settings, device)
        }
    }
}

/// Samples, annotates and stores one collection; returns what it did.
pub fn collect(req: Collection<'_>) -> Result<CollectSummary> {
    let split = req.split;
    let all = prompts::generate_splits(&PromptSetConfig::default())?;
    let pool = match split {
        Split::Train => all.train,
        Split::Test => all.test,
        other => {
            return Err(Error::invalid(format!(
                "split {}: the testbed has train and test prompts",
                other.name()
            )));
        }
    };
    if req.per_prompt < 2 {
        return Err(Error::invalid(
            "per_prompt must be at least 2 to compare images",
        ));
    }
    let mut panel = Panel::new(&req.panel, req.panel_seed)?;
    panel.reseed(req.seed);
    let mut rng = SeededRng::new(req.seed);
    let chosen: Vec<Prompt> = shuffled(&pool, &mut rng)
        .into_iter()
        .take(req.prompts)
        .collect();
    eprintln!(
        "feedback collect: {} prompts x {} images from {}",
        chosen.len(),
        req.per_prompt,
        req.model
    );
    let images = candidate_images(&req.images, &chosen, &pool, req.per_prompt, req.seed)?;

    let mut store = SqliteStore::open(req.store)?;
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
        for &(a, b) in pairs.iter().take(req.pairs_per_prompt) {
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
            if agreement_set.len() < req.agreement_pairs {
                agreement_set.push((pi, a, b));
            }
        }
        for (id, e) in row {
            let c = Candidate {
                image: id,
                evaluation: e,
            };
            for k in &req.kinds {
                match k {
                    Kind::Rating => {
                        batch
                            .feedback
                            .push(Feedback::Rating(panel.rate(next(), pid, c)?));
                        other += 1;
                    }
                    Kind::Label => {
                        batch
                            .feedback
                            .push(Feedback::Label(panel.label(next(), pid, c)?));
                        other += 1;
                    }
                    Kind::Reason => {
                        batch
                            .feedback
                            .push(Feedback::Reason(panel.reason(next(), pid, c)?));
                        other += 1;
                    }
                    Kind::RegionMark => {
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
        let text =
            serde_json::to_string_pretty(&json).map_err(|e| Error::invalid(e.to_string()))?;
        tiller_core::fs::atomic_write(
            &req.store.join(format!("agreement-{}.json", summary.split)),
            text.as_bytes(),
        )?;
    }
    Ok(summary)
}
