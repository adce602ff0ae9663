//! `tiller reward pretrain | train | fuse | eval | score`: argument parsing around
//! `tiller_reward::fit`, `tiller_reward::fusion::build` and `tiller_eval::reward_eval`.

use crate::args::load_reward;
use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use tiller_eval::reward_eval::{RewardEvaluation, RewardReport, evaluate_reward, markdown};
use tiller_feedback::Split;
use tiller_reward::config::RewardFile;
use tiller_reward::fusion::{PartSpec, build};
use tiller_reward::store::{open_existing, read_feedback};
use tiller_testbed::{Image, Tokenizer};

#[derive(Args)]
pub struct TrainArgs {
    #[arg(long, default_value = "configs/reward-testbed.toml")]
    pub config: PathBuf,
    /// The preference store (its train split is used).
    #[arg(long)]
    pub store: PathBuf,
    /// The reward model folder to write; must not exist.
    #[arg(long)]
    pub out: PathBuf,
    /// Override a config value, e.g. `--set train.steps=100` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// `--seed` sets `train.seed`, `--device` sets `device`.
    #[command(flatten)]
    pub run: crate::args::RunFlags,
}

#[derive(Args)]
pub struct PretrainArgs {
    #[arg(long, default_value = "configs/reward-testbed.toml")]
    pub config: PathBuf,
    /// The folder to write (a one-member reward model holding the pretrained towers); must not
    /// exist.
    #[arg(long)]
    pub out: PathBuf,
    /// Override a config value, e.g. `--set pretrain.steps=100` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// `--seed` sets `pretrain.seed`, `--device` sets `device`.
    #[command(flatten)]
    pub run: crate::args::RunFlags,
}

/// The config at `path` (found like every shipped file) with its paths located.
fn read_config(path: &Path, overrides: &[String]) -> Result<(RewardFile, String)> {
    let (mut file, resolved) = RewardFile::read(&crate::shipped::resolve(path), overrides)
        .with_context(|| format!("--config {}", path.display()))?;
    file.locate_paths(&crate::shipped::resolve);
    Ok((file, resolved))
}

/// `tiller reward pretrain`: contrastive towers that `init` in a reward config starts from.
pub fn pretrain(args: PretrainArgs) -> Result<()> {
    crate::ensure_new_out(&args.out)?;
    let overrides = args.run.apply(&args.overrides, "pretrain.seed");
    let (file, resolved) = read_config(&args.config, &overrides)?;
    let s = tiller_reward::fit::pretrain_towers(&file, &resolved, &args.out)?;
    println!(
        "pretrained towers written to {} (training loss {:.4}); in-batch retrieval accuracy on {} fresh drawings: {:.3} for training prompts, {:.3} for held-out (test-split) prompts; minimal pairs (512 each, image / text side): {:.3} / {:.3} for training prompts, {:.3} / {:.3} for held-out prompts",
        args.out.display(),
        s.final_loss,
        8 * s.batch_size,
        s.retrieval_train_prompts,
        s.retrieval_test_prompts,
        s.minimal_pairs_image_train_prompts,
        s.minimal_pairs_text_train_prompts,
        s.minimal_pairs_image_test_prompts,
        s.minimal_pairs_text_test_prompts,
    );
    Ok(())
}

/// `tiller reward train`: an ensemble on the store's training feedback.
pub fn train(args: TrainArgs) -> Result<()> {
    crate::ensure_new_out(&args.out)?;
    let overrides = args.run.apply(&args.overrides, "train.seed");
    let (file, resolved) = read_config(&args.config, &overrides)?;
    // Its errors name the store or the config field at fault.
    let s = tiller_reward::fit::train_from_store(&file, &resolved, &args.store, &args.out)?;
    println!(
        "reward model written to {} (last loss {:.4})",
        args.out.display(),
        s.last_loss
    );
    Ok(())
}

#[derive(Args)]
pub struct FuseArgs {
    /// A part: a reward model folder (its reward) or `caption-match:<folder>` (its towers'
    /// caption match). Repeat for each part.
    #[arg(long = "part", required = true)]
    pub parts: Vec<String>,
    /// Each part's weight, in the parts' order (default 1 each).
    #[arg(long = "weight")]
    pub weights: Vec<f64>,
    /// The store whose images and prompts the statistics are taken over (no label is read).
    #[arg(long)]
    pub store: PathBuf,
    /// The store's split to take them over.
    #[arg(long, default_value = "train", value_parser = ["train", "test"])]
    pub split: String,
    /// The fusion folder to write (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// `tiller reward fuse`: a fusion folder whose parts are standardised by their mean and standard
/// deviation over a store's images, label-free, then summed with weights; `--reward` and
/// `reward eval` load it like a reward model folder.
pub fn fuse(args: FuseArgs) -> Result<()> {
    crate::ensure_new_out(&args.out)?;
    let weights = if args.weights.is_empty() {
        vec![1.0; args.parts.len()]
    } else {
        args.weights.clone()
    };
    if weights.len() != args.parts.len() {
        bail!(
            "--weight given {} times for {} --part: give one per part or none",
            weights.len(),
            args.parts.len()
        );
    }
    if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
        bail!("--weight {w} is not a finite number");
    }
    let split = Split::parse(&args.split)?;
    let device = tiller_core::device::parse_device(&args.device)?;
    let tokenizer = Tokenizer::shapes();
    let data = read_feedback(&open_existing(&args.store, "--store")?, split, &tokenizer)?;
    let images: Vec<Image> = data.set.items.iter().map(|i| i.image.clone()).collect();
    let texts: Vec<String> = data.prompts.iter().map(|(t, _)| t.clone()).collect();
    let parts: Vec<PartSpec> = args
        .parts
        .iter()
        .zip(&weights)
        .map(|(spec, w)| PartSpec::parse(spec, *w))
        .collect();
    let on = format!(
        "{}, {} split, {} images",
        args.store.display(),
        args.split,
        images.len()
    );
    let config = build(
        &parts,
        (&images, &texts),
        on,
        &args.out,
        &tokenizer,
        &device,
    )
    // Its errors name the part ("part 2 (<folder>)") at fault.
    .context("--part")?;
    for (spec, p) in args.parts.iter().zip(&config.parts) {
        println!(
            "{spec}: mean {:.4}, std {:.4}, weight {}",
            p.mean, p.std, p.weight
        );
    }
    println!(
        "fusion of {} parts written to {} (standardised on {})",
        config.parts.len(),
        args.out.display(),
        config.standardised_on
    );
    Ok(())
}

#[derive(Args)]
pub struct EvalArgs {
    /// The reward model folder.
    #[arg(long)]
    pub model: PathBuf,
    /// The preference store.
    #[arg(long)]
    pub store: PathBuf,
    /// The split to evaluate on (held-out prompts: `test`).
    #[arg(long, default_value = "test", value_parser = ["train", "test"])]
    pub split: String,
    /// Also write a report folder (must not exist): report.json, report.md and comparisons.jsonl
    /// (one JSON line per comparison: prompt, task, both images' reward, spread, caption match,
    /// gold reward and median utility, the label, whether content differs), for analyses of
    /// your own.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Keep only the comparisons whose prompt, and its mirror image, never occurs in this store
    /// (the reward's training store): held-out prompts of the training distribution, where
    /// `--split test` holds out prompt types.
    #[arg(long)]
    pub unseen_in: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// `tiller reward eval`: prints the report; `--out` also writes it, with every comparison, to a
/// new report folder (built beside it and renamed into place: a failed evaluation leaves none).
pub fn eval(args: EvalArgs) -> Result<RewardReport> {
    // Missing stores are named by their flags before anything runs.
    open_existing(&args.store, "--store")?;
    if let Some(path) = &args.unseen_in {
        open_existing(path, "--unseen-in")?;
    }
    let split = Split::parse(&args.split)?;
    let evaluate = |comparisons: Option<PathBuf>| {
        evaluate_reward(&RewardEvaluation {
            model: args.model.clone(),
            store: args.store.clone(),
            split,
            unseen_in: args.unseen_in.clone(),
            device: args.device.clone(),
            comparisons,
        })
    };
    let Some(out) = &args.out else {
        let report = evaluate(None)?;
        println!("{}", markdown(&report));
        return Ok(report);
    };
    crate::ensure_new_out(out)?;
    let report = tiller_core::fs::build_folder(out, |tmp| {
        let report = evaluate(Some(tmp.join("comparisons.jsonl")))?;
        let json = serde_json::to_string_pretty(&report)
            .map_err(|e| tiller_core::Error::invalid(format!("report.json: {e}")))?;
        tiller_core::fs::atomic_write(&tmp.join("report.json"), json.as_bytes())?;
        tiller_core::fs::atomic_write(&tmp.join("report.md"), markdown(&report).as_bytes())?;
        Ok(report)
    })?;
    println!("{}", markdown(&report));
    println!("report written to {}", out.display());
    Ok(report)
}

#[derive(Args)]
pub struct ScoreArgs {
    /// A JSONL manifest, one `{"image": "<png path>", "prompt": "<text>"}` per line; relative image
    /// paths are relative to the manifest's folder.
    #[arg(long)]
    pub manifest: PathBuf,
    /// The reward: `gold`, `jpeg`, a reward model folder, a fusion folder or
    /// `caption-match:<folder>`.
    #[arg(long, default_value = "gold")]
    pub reward: String,
    /// Where to write the scores, one `{"image", "prompt", "reward"}` line per manifest line
    /// (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestLine {
    image: PathBuf,
    prompt: String,
}

/// `tiller reward score`: scores PNG images with any reward, as the alignment loop would (the
/// images of another program, e.g. a reference implementation's rollouts). A non-finite score is
/// an error naming the image.
pub fn score(args: ScoreArgs) -> Result<()> {
    crate::ensure_new_out(&args.out)?;
    let text = std::fs::read_to_string(&args.manifest)
        .with_context(|| format!("--manifest {}", args.manifest.display()))?;
    let root = args.manifest.parent().unwrap_or(Path::new("."));
    let mut lines = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let l: ManifestLine = serde_json::from_str(line).with_context(|| {
            format!(
                "--manifest {} line {}: expected {{\"image\", \"prompt\"}}",
                args.manifest.display(),
                i + 1
            )
        })?;
        lines.push(l);
    }
    let images = lines
        .iter()
        .map(|l| {
            let path = root.join(&l.image);
            tiller_testbed::image::read_png(&path)
                .with_context(|| format!("image {}", path.display()))
        })
        .collect::<Result<Vec<Image>>>()?;
    let prompts: Vec<String> = lines.iter().map(|l| l.prompt.clone()).collect();
    let device = tiller_core::device::parse_device(&args.device)?;
    let reward = load_reward(&args.reward, &Tokenizer::shapes(), &device)?;
    let scores = reward.score(&images, &prompts)?;
    let mut out = String::new();
    for (l, s) in lines.iter().zip(&scores) {
        if !s.is_finite() {
            bail!(
                "reward `{}` gave {s} for image {}",
                reward.name(),
                l.image.display()
            );
        }
        out.push_str(&serde_json::to_string(
            &serde_json::json!({ "image": l.image, "prompt": l.prompt, "reward": s }),
        )?);
        out.push('\n');
    }
    tiller_core::fs::atomic_write(&args.out, out.as_bytes())?;
    Ok(())
}
