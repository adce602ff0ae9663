//! `tiller align` and `tiller merge`: flags to `tiller_align::run` (one run from a preset, with
//! shipped assets found from any directory), and a run merged into a pipeline folder.

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use tiller_align::run::{AlignSummary, Request, is_run, load_aligned, run};
use tiller_engine::Resume;
use tiller_eval::sampling::save_pipeline;

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
    /// checkpoints (`runs/<id>/checkpoints/step-N`).
    #[arg(long)]
    pub run: PathBuf,
    /// The pipeline folder to write; must not exist.
    #[arg(long)]
    pub out: PathBuf,
}

/// `tiller merge`: the run's base with its final LoRA merged into the UNet (or its fully
/// fine-tuned UNet; or a checkpoint's weights), written as a diffusers-layout pipeline that `sample`, `eval`, `align --set
/// base=...` and diffusers itself load like any base model.
pub fn merge(args: MergeArgs) -> Result<()> {
    crate::ensure_new_out(&args.out)?;
    anyhow::ensure!(
        is_run(&args.run),
        "--run {}: neither a finished alignment run (config.toml and final/) nor one of its \
         checkpoints (runs/<id>/checkpoints/step-N)",
        args.run.display()
    );
    let device = tiller_core::device::parse_device("cpu")?;
    let (pipe, tokenizer) = load_aligned(&args.run, &device, &crate::shipped::resolve)?;
    save_pipeline(&pipe, &args.out, &tokenizer)?;
    println!(
        "{} merged into its base, written to {}",
        args.run.display(),
        args.out.display()
    );
    Ok(())
}
