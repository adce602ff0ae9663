//! Training a reward model from a config file, end to end: `tiller reward pretrain` (contrastive
//! towers on renderer drawings) and `tiller reward train` (an ensemble on a store's feedback),
//! each written as a model folder atomically.

use crate::config::RewardFile;
use crate::ensemble::KIND;
use crate::pretrain::{batch_retrieval, caption_pairs, minimal_pair_accuracy};
use crate::store::{StoreFeedback, open_existing, read_feedback};
use crate::{RewardEnsemble, RewardModelConfig, renderer_captions, train_ensemble_from};
use serde::Serialize;
use std::path::Path;
use tiller_core::error::Context;
use tiller_core::{Result, SeededRng};
use tiller_engine::progress::Progress;
use tiller_feedback::Split;
use tiller_testbed::{RenderConfig, Task, Tokenizer};

/// What [`train_from_store`] trained on and where it ended.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub members: usize,
    pub steps: usize,
    pub comparisons: usize,
    pub likes: usize,
    pub ratings: usize,
    pub reasons: usize,
    pub region_marks: usize,
    pub images: usize,
    /// The last member's last loss.
    pub last_loss: f64,
}

/// Trains the ensemble `file` describes on the train split of the store at `store` and writes it
/// to the new folder `out` (with `resolved`, the config as read, as `train.toml`). `file`'s paths
/// must already be located ([`RewardFile::locate_paths`]).
pub fn train_from_store(
    file: &RewardFile,
    resolved: &str,
    store: &Path,
    out: &Path,
) -> Result<TrainSummary> {
    tiller_core::fs::ensure_new(out)?;
    let device = tiller_core::device::parse_device(&file.device)?;
    let (net, text_init) = file.network(&device)?;
    let towers = file.towers(&net, &device)?;
    let config = RewardModelConfig {
        kind: KIND.into(),
        members: file.members,
        net,
    };
    let tokenizer = Tokenizer::shapes();
    let StoreFeedback { set, .. } =
        read_feedback(&open_existing(store, "store")?, Split::Train, &tokenizer)?;
    eprintln!(
        "reward train: {} members x {} steps on {} comparisons, {} likes, {} ratings, {} reasons, {} region marks{} ({} images)",
        config.members,
        file.train.steps,
        set.pairs.len(),
        set.likes.len(),
        set.ratings.len(),
        set.reasons.len(),
        set.regions.len(),
        if config.net.region_head || set.regions.is_empty() {
            ""
        } else {
            " (unused: no net.region_head)"
        },
        set.items.len()
    );
    let steps = file.train.steps;
    let mut progress = Progress::new("reward", 0, (steps * config.members) as u64);
    let mut last = f64::NAN;
    let model = train_ensemble_from(
        &config,
        &file.train,
        &set,
        text_init.as_ref(),
        &towers,
        &device,
        &mut |m, s, l| {
            last = l;
            progress.update((m * steps + s) as u64, &format!("member {m} loss {l:.4}"));
        },
    )?;
    write_model_folder(out, &model, &config, &[("train.toml", resolved.as_bytes())])?;
    Ok(TrainSummary {
        members: config.members,
        steps,
        comparisons: set.pairs.len(),
        likes: set.likes.len(),
        ratings: set.ratings.len(),
        reasons: set.reasons.len(),
        region_marks: set.regions.len(),
        images: set.items.len(),
        last_loss: last,
    })
}

/// What [`pretrain_towers`] measured on fresh drawings (also written as `pretrain.json`).
#[derive(Debug, Clone, Serialize)]
pub struct PretrainSummary {
    pub steps: usize,
    pub batch_size: usize,
    pub hard_negatives: bool,
    /// The moving average of the training loss at the end.
    pub final_loss: f64,
    /// In-batch retrieval accuracy (batches of the training size, 8 of them) on training-split
    /// and on held-out (test-split) meanings.
    pub retrieval_train_prompts: f64,
    pub retrieval_test_prompts: f64,
    /// Minimal pairs (a prompt and a one-binding edit, each drawn; 512 each): does each image
    /// prefer its own caption, and each caption its own image?
    pub minimal_pairs_image_train_prompts: f64,
    pub minimal_pairs_text_train_prompts: f64,
    pub minimal_pairs_image_test_prompts: f64,
    pub minimal_pairs_text_test_prompts: f64,
}

/// CLIP-style contrastive pretraining of the image and text towers `file` describes on the
/// training renderer's drawings of training-split prompts (no feedback, no gold evaluator),
/// written to the new folder `out` as a one-member reward model that `init` in a reward config
/// starts every member from.
pub fn pretrain_towers(file: &RewardFile, resolved: &str, out: &Path) -> Result<PretrainSummary> {
    tiller_core::fs::ensure_new(out)?;
    let device = tiller_core::device::parse_device(&file.device)?;
    let (net_config, text_init) = file.network(&device)?;
    device.seed(file.pretrain.seed);
    let mut net = net_config.init(&device)?;
    if let Some(t) = text_init {
        net.text_encoder = t;
    }
    let tokenizer = Tokenizer::shapes();
    let render = RenderConfig::default();
    let p = &file.pretrain;
    // Training drawings use `[pretrain.render]`; the measurements the default renderer, so that
    // runs with different training renderings are measured alike.
    let mut batch = |n: usize, rng: &mut SeededRng| {
        renderer_captions(
            &Task::ALL,
            tiller_testbed::Split::Train,
            n,
            p.hard_negatives,
            rng,
            &tokenizer,
            &p.render,
        )
    };
    eprintln!(
        "reward pretrain: {} updates of {} captioned renderer drawings (training-split prompts{}), temperature {}",
        p.steps,
        p.batch_size,
        if p.hard_negatives {
            ", half of them minimal edits of the other half"
        } else {
            ""
        },
        p.temperature
    );
    let mut progress = Progress::new("pretrain", 0, p.steps as u64);
    let mut log = String::new();
    let (mut loss_avg, mut acc_avg) = (f64::NAN, f64::NAN);
    let net = crate::pretrain(net, p, &mut batch, &device, &mut |s, l, a| {
        // Exponential moving averages for the progress line; every step goes to the log.
        let average = |avg: f64, x: f64| {
            if avg.is_nan() {
                x
            } else {
                avg + 0.05 * (x - avg)
            }
        };
        loss_avg = average(loss_avg, l);
        acc_avg = average(acc_avg, a);
        log.push_str(&format!(
            "{{\"step\":{s},\"loss\":{l:.6},\"retrieval_accuracy\":{a:.4}}}\n"
        ));
        progress.update(
            s as u64,
            &format!("loss {loss_avg:.4} in-batch retrieval {acc_avg:.3}"),
        );
    })?;
    let retrieval = |split: tiller_testbed::Split, seed: u64| -> Result<f64> {
        let mut rng = SeededRng::new(seed);
        let batches = 8;
        let mut sum = 0.0;
        for _ in 0..batches {
            let items = renderer_captions(
                &Task::ALL,
                split,
                p.batch_size,
                false,
                &mut rng,
                &tokenizer,
                &render,
            )?;
            sum += batch_retrieval(&net, &items, &device)?;
        }
        Ok(sum / batches as f64)
    };
    let pairs = |split: tiller_testbed::Split, seed: u64| -> Result<(f64, f64)> {
        let mut rng = SeededRng::new(seed);
        let pairs = caption_pairs(&Task::ALL, split, 512, &mut rng, &tokenizer, &render)?;
        minimal_pair_accuracy(&net, &pairs, &device)
    };
    let (seen_image, seen_text) =
        pairs(tiller_testbed::Split::Train, p.seed.wrapping_add(3_000_003))?;
    let (unseen_image, unseen_text) =
        pairs(tiller_testbed::Split::Test, p.seed.wrapping_add(4_000_003))?;
    let summary = PretrainSummary {
        steps: p.steps,
        batch_size: p.batch_size,
        hard_negatives: p.hard_negatives,
        final_loss: loss_avg,
        retrieval_train_prompts: retrieval(
            tiller_testbed::Split::Train,
            p.seed.wrapping_add(1_000_003),
        )?,
        retrieval_test_prompts: retrieval(
            tiller_testbed::Split::Test,
            p.seed.wrapping_add(2_000_003),
        )?,
        minimal_pairs_image_train_prompts: seen_image,
        minimal_pairs_text_train_prompts: seen_text,
        minimal_pairs_image_test_prompts: unseen_image,
        minimal_pairs_text_test_prompts: unseen_text,
    };
    let config = RewardModelConfig {
        kind: KIND.into(),
        members: 1,
        net: net_config,
    };
    let model = RewardEnsemble { members: vec![net] };
    let json = serde_json::to_string(&summary).context("pretrain.json")?;
    write_model_folder(
        out,
        &model,
        &config,
        &[
            ("pretrain.toml", resolved.as_bytes()),
            ("pretrain.jsonl", log.as_bytes()),
            ("pretrain.json", json.as_bytes()),
        ],
    )?;
    Ok(summary)
}

/// Writes `model` into a temporary sibling of `out` with `extra` files, then renames it: a crash
/// leaves no half model at `out`.
fn write_model_folder(
    out: &Path,
    model: &RewardEnsemble,
    config: &RewardModelConfig,
    extra: &[(&str, &[u8])],
) -> Result<()> {
    tiller_core::fs::build_folder(out, |tmp| {
        model.save(tmp, config)?;
        for (name, bytes) in extra {
            tiller_core::fs::atomic_write(&tmp.join(name), bytes)?;
        }
        Ok(())
    })
}
