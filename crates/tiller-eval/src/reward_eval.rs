//! Reward-model evaluation against the annotators and the truth (`tiller reward eval`): held-out
//! pairwise accuracy next to the annotators' agreement and to the gold reward's own accuracy,
//! calibration, rank correlation with the gold reward, the factor head's correlation with the
//! gold factors, the ensemble's spread on held-out prompt types, and the same by task and by what
//! separates the two images.

use serde::Serialize;
use std::collections::HashSet;
use std::path::PathBuf;
use tiller_core::error::Context;
use tiller_core::{Error, Result};
use tiller_feedback::annotator::{TasteWeights, utility};
use tiller_feedback::{PreferenceStore, Split};
use tiller_reward::fusion::{Fusion, PartScore};
use tiller_reward::metrics::{calibration, pairwise_accuracy, pearson, spearman};
use tiller_reward::rewards::factor_targets;
use tiller_reward::store::{open_existing, read_feedback};
use tiller_reward::{FACTORS, GoldReward, LearnedReward, PairLabel, Reward};
use tiller_testbed::prompts::{is_held_out, mirror_prompt};
use tiller_testbed::{Image, PromptSpec, Tokenizer};

/// One reward evaluation: a model (or fusion) folder on a store's split.
#[derive(Debug, Clone)]
pub struct RewardEvaluation {
    pub model: PathBuf,
    pub store: PathBuf,
    pub split: Split,
    /// Keep only the comparisons whose prompt, and its mirror image, never occurs in this store
    /// (the reward's training store).
    pub unseen_in: Option<PathBuf>,
    pub device: String,
    /// Also write one JSON line per comparison here.
    pub comparisons: Option<PathBuf>,
}

/// What `reward eval` reports.
#[derive(Debug, Clone, Serialize)]
pub struct RewardReport {
    pub model: String,
    pub split: String,
    pub comparisons: usize,
    /// With `--unseen-in`: that store, and how many of the split's comparisons it removed (their
    /// prompt or its mirror image occurs there).
    pub unseen_in: Option<String>,
    pub seen_comparisons_removed: usize,
    /// Held-out pairwise accuracy on the annotators' non-tie comparisons.
    pub pairwise_accuracy: Option<f64>,
    /// Inter-annotator agreement measured when the split was collected (the ceiling).
    pub annotator_agreement: Option<f64>,
    /// References on the same comparisons: the pairwise accuracy of the gold reward and of the
    /// median annotator's utility used as rewards (what knowing the truth would give).
    pub gold_pairwise_accuracy: Option<f64>,
    pub utility_pairwise_accuracy: Option<f64>,
    /// Expected calibration error and Brier score of σ(r_a - r_b).
    pub ece: f64,
    pub brier: f64,
    pub images: usize,
    /// Spearman correlation of the reward with the gold reward and with the median annotator's
    /// utility, over the split's images.
    pub spearman_gold: Option<f64>,
    pub spearman_utility: Option<f64>,
    /// Pearson correlation of each factor's probability with the gold factor score.
    pub factor_correlation: Vec<(String, Option<f64>)>,
    /// The ensemble's mean standard deviation over the split's images.
    pub mean_uncertainty: f64,
    /// The same over the images whose prompt's meaning is a held-out combination (only the test
    /// split has them) and over the rest (meanings the training split has): the issue's
    /// uncertainty check compares the first on `--split test` with the second on fresh
    /// training-split images.
    pub mean_uncertainty_held_out_types: Option<f64>,
    pub mean_uncertainty_training_types: Option<f64>,
    /// The pairwise accuracies by the compared prompt's task: where the reward fails.
    pub per_task: Vec<TaskPairwise>,
    /// The same by what separates the two images in the gold evaluator: `content differs`
    /// (the median annotator's prompt and mark factors score them differently) or `looks only`
    /// (only border, background, edges and balance do).
    pub per_difference: Vec<TaskPairwise>,
    /// The towers' caption match (cosine of image and prompt embeddings, the contrastive
    /// pretraining objective; not the reward) used as the reward: its pairwise accuracy on the
    /// same comparisons and its Spearman correlation with the gold reward.
    pub caption_match_pairwise_accuracy: Option<f64>,
    pub caption_match_spearman_gold: Option<f64>,
}

/// Pairwise accuracy (non-tie) of the reward and the two references on one task's comparisons.
#[derive(Debug, Clone, Serialize)]
pub struct TaskPairwise {
    pub task: String,
    pub comparisons: usize,
    pub pairwise_accuracy: Option<f64>,
    pub gold_pairwise_accuracy: Option<f64>,
    pub utility_pairwise_accuracy: Option<f64>,
    pub caption_match_pairwise_accuracy: Option<f64>,
}

/// Runs `args`; the report is returned (and the comparisons written when asked for).
pub fn evaluate_reward(args: &RewardEvaluation) -> Result<RewardReport> {
    let split = args.split;
    let device = tiller_core::device::parse_device(&args.device)?;
    let tokenizer = Tokenizer::shapes();
    let fusion = if Fusion::is_fusion(&args.model) {
        Some(
            Fusion::load(&args.model, tokenizer.clone(), &device)
                .with_context(|| format!("model {}", args.model.display()))?,
        )
    } else {
        None
    };
    let single;
    // A fusion's spread and factor columns are its main part's (the first learned reward), its
    // caption-match column its first caption-match part's.
    let (reward, matcher) = match &fusion {
        Some(f) => {
            let main = f.main_part().1;
            (
                main.learned(),
                f.caption_match_part().unwrap_or(main).learned(),
            )
        }
        None => {
            single = LearnedReward::load(&args.model, tokenizer.clone(), &device)
                .with_context(|| format!("model {}", args.model.display()))?;
            (&single, &single)
        }
    };
    let store = open_existing(&args.store, "store")?;
    let mut data = read_feedback(&store, split, &tokenizer)?;
    let total = data.set.pairs.len();
    if let Some(path) = &args.unseen_in {
        let seen: HashSet<String> = open_existing(path, "unseen_in")?
            .prompts(None)?
            .into_iter()
            .flat_map(|p| [mirror_prompt(&p.text), p.text])
            .collect();
        data = data.retain_prompts(|text| !seen.contains(text));
        if data.set.pairs.is_empty() {
            return Err(Error::invalid(format!(
                "unseen_in {}: every one of the {total} {} comparisons in {} is on a prompt that store holds",
                path.display(),
                split.name(),
                args.store.display()
            )));
        }
    }
    if data.set.items.is_empty() {
        return Err(Error::invalid(format!(
            "the store {} has no feedback on {} prompts; collect some with `tiller feedback collect --split {}`",
            args.store.display(),
            split.name(),
            split.name()
        )));
    }
    let images: Vec<Image> = data.set.items.iter().map(|i| i.image.clone()).collect();
    let texts: Vec<String> = data.prompts.iter().map(|(t, _)| t.clone()).collect();
    let mut scored = reward.score_with_uncertainty(&images, &texts)?;
    let matched = matcher.caption_match(&images, &texts)?;
    if let Some(f) = &fusion {
        scored.mean = f.score(&images, &texts)?;
        // The main part's spread on the fused scale.
        let (part, _) = f.main_part();
        if part.score == PartScore::Reward {
            for s in &mut scored.std {
                *s *= part.weight.abs() / part.std;
            }
        }
    }
    // Each comparison as (score of a, score of b, target) under a per-image score.
    let labelled_by = |score: &[f64]| -> Vec<(f64, f64, f64)> {
        data.set
            .pairs
            .iter()
            .map(|p| (score[p.a], score[p.b], p.target))
            .collect()
    };
    let labelled = labelled_by(&scored.mean);
    let cal = calibration(&labelled, 10);
    let gold = GoldReward::default();
    let median = TasteWeights::default();
    let content_only = TasteWeights {
        border: 0.0,
        clean_background: 0.0,
        balance: 0.0,
        crisp_edges: 0.0,
        ..median.clone()
    };
    let (mut g, mut u, mut targets, mut tasks) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut content = Vec::new();
    let (mut std_held_out, mut std_training) = (Vec::new(), Vec::new());
    for (img, (text, spec)) in images.iter().zip(&data.prompts) {
        let spec = match spec {
            Some(s) => s.clone(),
            None => PromptSpec::parse(text)?,
        };
        tasks.push(spec.tag.name());
        let std = scored.std[tasks.len() - 1];
        if is_held_out(&spec) {
            std_held_out.push(std);
        } else {
            std_training.push(std);
        }
        let e = gold.evaluator.evaluate(img, &spec)?;
        g.push(gold.weights.of(&e));
        u.push(utility(&median, &e)?);
        content.push(utility(&content_only, &e)?);
        targets.push(factor_targets(&e));
    }
    let factor_correlation = FACTORS
        .iter()
        .enumerate()
        .map(|(k, name)| {
            let pred: Vec<f64> = scored.factors.iter().map(|f| f[k]).collect();
            let truth: Vec<f64> = targets.iter().map(|t| t[k]).collect();
            (name.to_string(), pearson(&pred, &truth))
        })
        .collect();
    let mut task_names: Vec<&str> = tasks.clone();
    task_names.sort_unstable();
    task_names.dedup();
    // Pairwise accuracies of the reward, the two references and the caption match on the
    // comparisons that `keep` selects.
    let subset = |name: &str, keep: &dyn Fn(&PairLabel) -> bool| {
        let of = |score: &[f64]| -> Vec<(f64, f64, f64)> {
            data.set
                .pairs
                .iter()
                .filter(|p| keep(p))
                .map(|p| (score[p.a], score[p.b], p.target))
                .collect()
        };
        let mine = of(&scored.mean);
        TaskPairwise {
            task: name.to_string(),
            comparisons: mine.len(),
            pairwise_accuracy: pairwise_accuracy(&mine),
            gold_pairwise_accuracy: pairwise_accuracy(&of(&g)),
            utility_pairwise_accuracy: pairwise_accuracy(&of(&u)),
            caption_match_pairwise_accuracy: pairwise_accuracy(&of(&matched)),
        }
    };
    let per_task = task_names
        .into_iter()
        .map(|task| subset(task, &|p: &PairLabel| tasks[p.a] == task))
        .collect();
    let differs = |p: &PairLabel| (content[p.a] - content[p.b]).abs() > 1e-9;
    let per_difference = vec![
        subset("content differs", &differs),
        subset("looks only", &|p: &PairLabel| !differs(p)),
    ];
    let agreement_path = args.store.join(format!("agreement-{}.json", split.name()));
    let annotator_agreement = std::fs::read_to_string(&agreement_path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("agreement").and_then(|a| a.as_f64()));
    let report = RewardReport {
        model: args.model.display().to_string(),
        split: split.name().to_string(),
        comparisons: labelled.len(),
        unseen_in: args.unseen_in.as_ref().map(|p| p.display().to_string()),
        seen_comparisons_removed: total - labelled.len(),
        pairwise_accuracy: pairwise_accuracy(&labelled),
        annotator_agreement,
        gold_pairwise_accuracy: pairwise_accuracy(&labelled_by(&g)),
        utility_pairwise_accuracy: pairwise_accuracy(&labelled_by(&u)),
        ece: cal.ece,
        brier: cal.brier,
        images: images.len(),
        spearman_gold: spearman(&scored.mean, &g),
        spearman_utility: spearman(&scored.mean, &u),
        factor_correlation,
        mean_uncertainty: scored.std.iter().sum::<f64>() / scored.std.len().max(1) as f64,
        mean_uncertainty_held_out_types: mean_of(&std_held_out),
        mean_uncertainty_training_types: mean_of(&std_training),
        per_task,
        per_difference,
        caption_match_pairwise_accuracy: pairwise_accuracy(&labelled_by(&matched)),
        caption_match_spearman_gold: spearman(&matched, &g),
    };
    if let Some(path) = &args.comparisons {
        let mut lines = String::new();
        for p in &data.set.pairs {
            let side = |i: usize| {
                serde_json::json!({
                    "reward": scored.mean[i],
                    "std": scored.std[i],
                    "caption_match": matched[i],
                    "gold": g[i],
                    "utility": u[i],
                })
            };
            let line = serde_json::json!({
                "prompt": texts[p.a],
                "task": tasks[p.a],
                "a": side(p.a),
                "b": side(p.b),
                "target": p.target,
                "content_differs": differs(p),
            });
            lines.push_str(&line.to_string());
            lines.push('\n');
        }
        tiller_core::fs::atomic_write(path, lines.as_bytes())?;
    }
    Ok(report)
}

fn mean_of(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn fmt(x: Option<f64>) -> String {
    x.map_or("n/a".into(), |v| format!("{v:.3}"))
}

/// The report as Markdown tables.
pub fn markdown(r: &RewardReport) -> String {
    let mut s = format!(
        "# Reward model `{}` on {} feedback\n\n| metric | value |\n|---|---|\n| comparisons | {} |\n| pairwise accuracy (non-tie) | {} |\n| annotator agreement (ceiling) | {} |\n| gold reward / median utility as the reward (references) | {} / {} |\n| calibration ECE / Brier | {:.3} / {:.3} |\n| images | {} |\n| Spearman with gold reward | {} |\n| Spearman with median annotator utility | {} |\n| mean ensemble std: all / held-out prompt types / training prompt types | {:.4} / {} / {} |\n| the towers' caption match as the reward: pairwise / Spearman with gold | {} / {} |\n\n",
        r.model,
        r.split,
        r.comparisons,
        fmt(r.pairwise_accuracy),
        fmt(r.annotator_agreement),
        fmt(r.gold_pairwise_accuracy),
        fmt(r.utility_pairwise_accuracy),
        r.ece,
        r.brier,
        r.images,
        fmt(r.spearman_gold),
        fmt(r.spearman_utility),
        r.mean_uncertainty,
        fmt(r.mean_uncertainty_held_out_types),
        fmt(r.mean_uncertainty_training_types),
        fmt(r.caption_match_pairwise_accuracy),
        fmt(r.caption_match_spearman_gold)
    );
    if let Some(store) = &r.unseen_in {
        s.push_str(&format!(
            "Only prompts unseen in {store}: {} comparisons on prompts it holds removed.\n\n",
            r.seen_comparisons_removed
        ));
    }
    s.push_str("| factor | Pearson r with gold |\n|---|---|\n");
    for (name, c) in &r.factor_correlation {
        s.push_str(&format!("| {name} | {} |\n", fmt(*c)));
    }
    s.push_str("\n| comparisons of | comparisons | pairwise accuracy | gold reward | median utility | caption match |\n|---|---|---|---|---|---|\n");
    for t in r.per_task.iter().chain(&r.per_difference) {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            t.task,
            t.comparisons,
            fmt(t.pairwise_accuracy),
            fmt(t.gold_pairwise_accuracy),
            fmt(t.utility_pairwise_accuracy),
            fmt(t.caption_match_pairwise_accuracy)
        ));
    }
    s
}
