//! `tiller compare`: several methods from the same base, prompts, reward and reward-query
//! budget; a table and plots of gold and proxy reward against reward queries and wall time, KL to
//! the base model and diversity, and how many queries each method needs to reach the gold
//! accuracy DDPO reaches.

use anyhow::{Context, Result, bail};
use clap::Args;
use std::path::PathBuf;
use tiller_align::{AlignConfig, Method};
use tiller_eval::comparison::{Comparison, MethodRun, ddpo_target, markdown, read_points, svg};
use tiller_eval::noise_scale::read_noise_scale;

#[derive(Args)]
pub struct CompareArgs {
    /// Comma-separated methods (each runs `<configs>/<method>-testbed.toml`; `tiller methods`
    /// lists them).
    #[arg(long, default_value_t = tiller_align::Method::NAMES.join(","))]
    pub methods: String,
    /// Reward queries each method may spend: rollout and sample scores (DDPO, DPOK, TDPO-R, PRDP,
    /// RWR, RAFT, reward-weighted likelihood), reward gradients (DRaFT-K, DRaFT-LV's extra examples
    /// included, AlignProp, ReFL), true-reward queries on SEIKO's query batches (its surrogate
    /// costs none), annotator labels (Diffusion-DPO's comparisons, Diffusion-KTO's likes: each
    /// trains on at most this many).
    #[arg(long)]
    pub budget: u64,
    /// Also run every method that takes `train.kl_weight` with this KL-to-base weight
    /// (`<method>+kl` rows).
    #[arg(long)]
    pub kl: Option<f64>,
    /// The folder of method presets.
    #[arg(long, default_value = "configs")]
    pub configs: PathBuf,
    /// Override a value in every method's config (repeatable); `method.<name>.<key>` applies to
    /// that method's runs only.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// `--seed` sets every run's `train.seed`, `--device` its `device`.
    #[command(flatten)]
    pub run: crate::args::RunFlags,
    /// Output folder: one run per method, compare.json, compare.md, compare.svg.
    #[arg(long, default_value = "runs/compare")]
    pub out: PathBuf,
    /// The gold accuracy every method is timed to (default: the best DDPO validation whose gain
    /// over its start exceeds twice its paired standard error).
    #[arg(long)]
    pub target: Option<f64>,
    /// Cut each method's batch into this many accumulated micro-batches, so that every run
    /// measures its gradient noise scale (McCandlish et al. 2018) from the micro-batch and the
    /// whole-batch gradients. The updates are those of the uncut batch (accumulation equals one
    /// big batch; tested). 0 or 1, or a preset that already accumulates: its micro-batches as
    /// they are.
    #[arg(long, default_value_t = 0)]
    pub micro_batches: usize,
}

pub fn compare(args: CompareArgs) -> Result<Comparison> {
    let mut plan: Vec<(String, Method, Vec<String>)> = Vec::new();
    for m in args
        .methods
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
    {
        let method: Method = m.parse().map_err(anyhow::Error::msg)?;
        plan.push((m.to_string(), method.clone(), Vec::new()));
        if let Some(w) = args.kl
            && method.spec().takes_kl()
        {
            plan.push((
                format!("{m}+kl"),
                method,
                vec![format!("train.kl_weight={w}")],
            ));
        }
    }
    if plan.is_empty() {
        bail!("--methods names no method; valid: {}", Method::names());
    }
    if args.budget == 0 {
        bail!("--budget must be at least 1 reward query");
    }
    // Every preset is read, sized to the budget and checked before anything runs or is written;
    // a method's baselines (its `variants`) are derived from its preset as read.
    let mut runs = Vec::new();
    for (name, method, extra) in plan {
        let (run, config) = sized(&args, &name, &method, extra.clone())?;
        runs.push(run);
        if !extra.is_empty() {
            continue;
        }
        for (suffix, set) in config.method.spec().variants(&config, args.budget) {
            let (run, _) = sized(&args, &format!("{name}-{suffix}"), &method, set)?;
            runs.push(run);
        }
    }
    std::fs::create_dir_all(&args.out)?;
    let mut methods = Vec::new();
    for (name, preset, overrides, updates, batch) in runs {
        let run = args.out.join(&name);
        eprintln!(
            "== compare: {name} ({updates} updates) -> {}",
            run.display()
        );
        tiller_align::run::run(&tiller_align::run::Request {
            config: &preset,
            out: &run,
            resume: None,
            overrides: &overrides,
            stop_after: None,
            locate: &crate::shipped::resolve,
        })
        .with_context(|| format!("compare: the {name} run"))?;
        methods.push(MethodRun {
            name,
            points: read_points(&run)?,
            noise_scale: read_noise_scale(&run)?,
            run,
            queries_to_target: None,
            batch,
        });
    }
    let target = args.target.or_else(|| ddpo_target(&methods));
    if let Some(t) = target {
        for m in &mut methods {
            m.queries_to_target = m
                .points
                .iter()
                .skip(1)
                .find(|p| p.gold_accuracy >= t)
                .map(|p| p.reward_queries);
        }
    }
    let cmp = Comparison {
        budget: args.budget,
        target,
        target_given: args.target.is_some(),
        methods,
    };
    tiller_core::fs::atomic_write(
        &args.out.join("compare.json"),
        serde_json::to_string_pretty(&cmp)?.as_bytes(),
    )?;
    let md = markdown(&cmp);
    tiller_core::fs::atomic_write(&args.out.join("compare.md"), md.as_bytes())?;
    tiller_core::fs::atomic_write(&args.out.join("compare.svg"), svg(&cmp).as_bytes())?;
    println!("{md}");
    println!(
        "comparison written to {} (compare.md, compare.json, compare.svg)",
        args.out.display()
    );
    Ok(cmp)
}

/// One run of `tiller compare`: (row name, preset, overrides, updates, batch), with its config.
type SizedRun = (String, PathBuf, Vec<String>, u64, usize);

/// The run of `method`'s preset with `extra` overrides, sized to the budget: its overrides
/// (the command's own, the method's, `extra`, the micro-batches and the budget's) and its config
/// before sizing.
fn sized(
    args: &CompareArgs,
    name: &str,
    method: &Method,
    extra: Vec<String>,
) -> Result<(SizedRun, AlignConfig)> {
    let preset =
        crate::shipped::resolve(&args.configs.join(format!("{}-testbed.toml", method.name())));
    // A method's own settings reach only its runs.
    let own = format!("method.{}.", method.name());
    let mut overrides: Vec<String> = args
        .run
        .apply(&args.overrides, "train.seed")
        .into_iter()
        .filter(|o| !o.starts_with("method.") || o.starts_with(&own))
        .collect();
    overrides.extend(extra);
    let (config, _): (AlignConfig, String) =
        tiller_core::config::from_toml_file_with_overrides(&preset, &overrides)?;
    if config.method.name() != method.name() {
        bail!(
            "{}: names method `{}`, but it is the preset for {}",
            preset.display(),
            config.method.name(),
            method.name()
        );
    }
    let batch = config.train.effective_batch() as u64;
    let k = args.micro_batches;
    if k > 1 && config.train.grad_accum == 1 {
        let b = config.train.batch_size;
        if !b.is_multiple_of(k) {
            bail!("--micro-batches {k}: {name}'s train.batch_size {b} is not a multiple of it");
        }
        overrides.push(format!("train.batch_size={}", b / k));
        overrides.push(format!("train.grad_accum={k}"));
    }
    // Sized by the method the preset names (its settings included).
    let (budgeted, updates) = config.method.spec().size_to_budget(&config, args.budget);
    overrides.extend(budgeted);
    overrides.push(format!("train.updates={updates}"));
    overrides.push(format!("log.val_every={}", updates.div_ceil(5).max(1)));
    overrides.push(format!("log.checkpoint_every={}", updates.max(1)));
    Ok((
        (name.to_string(), preset, overrides, updates, batch as usize),
        config,
    ))
}
