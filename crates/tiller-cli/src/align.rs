//! `tiller align` and `tiller merge`: flags to `tiller_align::run` (one run from a preset, with
//! shipped assets found from any directory), and a run merged into a pipeline folder.

use anyhow::{Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use tiller_align::methods::safety_dpo::MergeStrategy;
use tiller_align::policy::LORA_PEFT_FILE;
use tiller_align::run::{
    AlignSummary, Request, is_run, load_aligned, load_aligned_latent, run, run_base,
};
use tiller_diffusion::models::lora::{merge_lora, save_lora};
use tiller_diffusion::stable_diffusion::{StableDiffusion, is_stable_diffusion};
use tiller_engine::Resume;
use tiller_eval::sampling::{sample_prompts, save_pipeline};

#[derive(Args, Clone)]
pub struct AlignArgs {
    /// The method preset (TOML; overrides of the defaults only).
    #[arg(long, default_value = "configs/ddpo-testbed.toml")]
    pub config: PathBuf,
    /// The run directory.
    #[arg(long, default_value = "runs/align")]
    pub out: PathBuf,
    /// Continue a run: `latest` or a checkpoint folder.
    #[arg(long)]
    pub resume: Option<Resume>,
    /// Override a config value, e.g. `--set train.updates=10` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// `--seed` sets `train.seed`, `--device` sets `device`.
    #[command(flatten)]
    pub run: crate::args::RunFlags,
    /// Stop after this many updates in this process (the run can be resumed).
    #[arg(long, hide = true)]
    pub stop_after: Option<u64>,
}

pub fn align(args: AlignArgs) -> Result<AlignSummary> {
    Ok(run(&Request {
        config: &args.config,
        out: &args.out,
        resume: args.resume.as_ref(),
        overrides: &args.run.apply(&args.overrides, "train.seed"),
        stop_after: args.stop_after,
        locate: &crate::shipped::resolve,
    })?)
}

/// Every method of the registry as a Markdown table: name, paper, its testbed preset.
pub fn methods_table() -> String {
    let mut s = String::from("| method | paper | preset |\n|---|---|---|\n");
    for m in tiller_align::Method::all() {
        let preset = format!("configs/{}-testbed.toml", m.name());
        let shown = if crate::shipped::resolve(std::path::Path::new(&preset)).is_file() {
            format!("`{preset}`")
        } else {
            "-".into()
        };
        s.push_str(&format!(
            "| {} | {} | {shown} |\n",
            m.name(),
            m.spec().paper()
        ));
    }
    s
}

#[derive(Args)]
pub struct MergeArgs {
    /// The alignment run (`runs/<id>`, with `final/` written at its end), or one of its
    /// checkpoints (`runs/<id>/checkpoints/step-N`). Repeat it to merge several LoRA runs on one
    /// base (SafetyDPO's experts) into one adapter by `--strategy`.
    #[arg(long, required = true)]
    pub run: Vec<PathBuf>,
    /// The pipeline folder to write; must not exist.
    #[arg(long)]
    pub out: PathBuf,
    /// How several runs' adapters become one: `co-merge` (per output unit, the expert most
    /// active on the calibration prompts) or `average`.
    #[arg(long, default_value = "co-merge", value_parser = ["co-merge", "average"])]
    pub strategy: String,
    /// Co-Merge's calibration prompts: how many, drawn (seeded) from the testbed's training split.
    #[arg(long, default_value_t = 32)]
    pub calibration_prompts: usize,
    /// The tasks they are drawn from (comma-separated).
    #[arg(long, default_value = "unsafe", value_delimiter = ',', value_parser = crate::eval::parse_task)]
    pub calibration_tasks: Vec<tiller_testbed::Task>,
    /// Seed of the calibration prompts and their images.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The calibration's sampler (default: as the base's `tiller_sampling.json` says).
    #[command(flatten)]
    pub sampling: crate::args::SamplingArgs,
}

/// `tiller merge`: the run's base with its final LoRA merged into the UNet (or its fully
/// fine-tuned UNet; or a checkpoint's weights), written as a diffusers-layout pipeline that
/// `sample`, `eval`, `align --set base=...` and diffusers itself load like any base model. With
/// several runs, their adapters are first merged into one (`tiller_align::experts`), which is
/// written beside the pipeline as `pytorch_lora_weights.safetensors` with `merge.json`.
pub fn merge(args: MergeArgs) -> Result<()> {
    crate::ensure_new_out(&args.out)?;
    for run in &args.run {
        anyhow::ensure!(
            is_run(run),
            "--run {}: neither a finished alignment run (config.toml and final/) nor one of its \
             checkpoints (runs/<id>/checkpoints/step-N)",
            run.display()
        );
    }
    if args.run.len() > 1 {
        return merge_experts(&args);
    }
    let run = &args.run[0];
    let device = tiller_core::device::parse_device("cpu")?;
    let base = run_base(run, &crate::shipped::resolve)?;
    if is_stable_diffusion(&base) {
        let sd = load_aligned_latent(run, &device, &crate::shipped::resolve)?;
        save_latent_pipeline(&base, &sd, &args.out)?;
    } else {
        let (pipe, tokenizer) = load_aligned(run, &device, &crate::shipped::resolve)?;
        save_pipeline(&pipe, &args.out, &tokenizer)?;
    }
    println!(
        "{} merged into its base, written to {}",
        run.display(),
        args.out.display()
    );
    Ok(())
}

/// Several runs' adapters merged into one, then into the base.
fn merge_experts(args: &MergeArgs) -> Result<()> {
    use tiller_testbed::{PromptSetConfig, prompts};
    let device = tiller_core::device::parse_device(&args.sampling.device)?;
    let strategy: MergeStrategy = args.strategy.parse()?;
    let pool = prompts::generate_splits(&PromptSetConfig {
        tasks: args.calibration_tasks.clone(),
        ..PromptSetConfig::default()
    })?
    .train;
    let mut rng = tiller_core::SeededRng::new(args.seed);
    let mut texts: Vec<String> = pool.into_iter().map(|p| p.text).collect();
    texts.sort();
    texts.dedup();
    rng.shuffle(&mut texts);
    texts.truncate(args.calibration_prompts.max(1));
    let mut calibrate = |pipe: &tiller_diffusion::pipeline::TextToImage,
                         tokenizer: &tiller_testbed::Tokenizer|
     -> tiller_core::Result<usize> {
        let settings = args
            .sampling
            .settings(pipe)
            .map_err(|e| tiller_core::Error::invalid(e.to_string()))?;
        let images = sample_prompts(pipe, tokenizer, &texts, &[args.seed], &settings, &device)?;
        Ok(images.iter().map(Vec::len).sum())
    };
    let merged = tiller_align::experts::merge_experts(
        &args.run,
        strategy,
        &device,
        &crate::shipped::resolve,
        &mut calibrate,
    )?;
    let report = serde_json::to_string_pretty(&merged.report)?;
    tiller_core::fs::build_folder(&args.out, |dir| {
        save_lora(
            &merged.pipe.unet,
            &dir.join(LORA_PEFT_FILE),
            tiller_diffusion::models::lora::LoraFormat::Peft,
        )?;
        let mut pipe = merged.pipe.clone();
        pipe.unet = merge_lora(pipe.unet);
        save_pipeline(&pipe, dir, &merged.tokenizer)?;
        tiller_core::fs::atomic_write(&dir.join("merge.json"), report.as_bytes())
    })?;
    let kept: Vec<String> = merged
        .report
        .units_kept
        .iter()
        .map(|k| format!("{k}/{}", merged.report.units))
        .collect();
    println!(
        "{} experts merged by {} into one adapter of rank {} on {} modules (units kept per \
         expert: {}), written with the merged pipeline to {}",
        args.run.len(),
        args.strategy,
        merged.report.rank,
        merged.report.modules,
        kept.join(", "),
        args.out.display()
    );
    Ok(())
}

/// A Stable Diffusion run merged: the base folder's files with `unet/` replaced by the run's
/// UNet, written to a temporary folder beside `out` and renamed, so a failure leaves no `out`.
fn save_latent_pipeline(base: &Path, sd: &StableDiffusion, out: &Path) -> Result<()> {
    let name = out
        .file_name()
        .with_context(|| format!("--out {} has no folder name", out.display()))?;
    let tmp = out.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    copy_tree(base, &tmp, &|rel| rel == Path::new("unet"))?;
    tiller_diffusion::models::save_unet(&tmp.join("unet"), &sd.unet_config, &sd.unet)?;
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// Copies the folder `from` to `to` (created), skipping the entries whose path relative to
/// `from` satisfies `skip`.
fn copy_tree(from: &Path, to: &Path, skip: &dyn Fn(&Path) -> bool) -> Result<()> {
    fn walk(root: &Path, dir: &Path, to: &Path, skip: &dyn Fn(&Path) -> bool) -> Result<()> {
        std::fs::create_dir_all(to.join(dir.strip_prefix(root)?))
            .with_context(|| format!("creating a folder in {}", to.display()))?;
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            let rel = path.strip_prefix(root)?;
            if skip(rel) {
                continue;
            }
            if path.is_dir() {
                walk(root, &path, to, skip)?;
            } else {
                std::fs::copy(&path, to.join(rel))
                    .with_context(|| format!("copying {}", path.display()))?;
            }
        }
        Ok(())
    }
    walk(from, from, to, skip)
}
