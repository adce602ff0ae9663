//! `tiller align`: one alignment run of any method on the testbed, and loading its result.
//!
//! Glue only: resolve the config, load the base pipeline, the reward, the prompts (the testbed's
//! train split) and, for Diffusion-DPO, the preference pairs from the store; validate on the
//! held-out test split with fixed seeds (gold accuracy, gold reward, proxy reward, a grid); call
//! `tiller_align::align`; export the adapters (or the UNet) to `<run>/final/`.

use crate::eval::{load_pipeline, score};
use crate::reward::load_reward;
use crate::testbed::{SampleSettings, sample_prompts};
use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Tensor};
use clap::Args;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tiller_align::config::{AdapterKind, MethodName};
use tiller_align::policy::{LORA_PEFT_FILE, sampler_config};
use tiller_align::trainer::{AlignData, MODEL_FILE, PreferencePair};
use tiller_align::{AlignConfig, Policy};
use tiller_core::SeededRng;
use tiller_diffusion::models::lora::{attach_lora, load_lora, merge_lora};
use tiller_diffusion::models::unet::UNet2DConditionModel;
use tiller_diffusion::pipeline::TextToImage;
use tiller_engine::checkpoint::load_module;
use tiller_engine::{Resume, RunDir};
use tiller_feedback::{Choice, PreferenceStore, Query, Split, SqliteStore};
use tiller_reward::{GoldReward, Reward};
use tiller_testbed::image::decode_png;
use tiller_testbed::{Image, Prompt, PromptSetConfig, Task, Tokenizer, geneval, prompts};

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
    /// Stop after this many updates in this process (the run can be resumed).
    #[arg(long, hide = true)]
    pub stop_after: Option<u64>,
}

/// What a finished `align` reports.
pub struct AlignSummary {
    pub config: AlignConfig,
    pub before: Vec<(String, f64)>,
    pub after: Vec<(String, f64)>,
    pub reward_queries: u64,
    pub wall_s: f64,
    pub updates: u64,
    /// The gradient noise scale over the run's updates, when it used `grad_accum > 1`.
    pub noise_scale: Option<NoiseScale>,
}

/// The gradient noise scale `B_simple = mean tr Sigma / mean |G|^2` (McCandlish et al. 2018)
/// from the terms a run logged at each update (`grad_noise_trace`, `grad_signal_sq`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct NoiseScale {
    /// Examples per batch at which a step's noise equals its signal (negative when the mean
    /// signal estimate is not positive: no signal measurable over the run).
    pub b_simple: f64,
    /// The smallest `B_simple` the run is consistent with: the mean noise over the mean signal
    /// plus two standard errors of it (the signal's estimate varies from update to update);
    /// infinite when there is a single update.
    pub b_lower: f64,
    /// The largest: the mean noise over the mean signal minus two standard errors (infinite
    /// when that is not positive).
    pub b_upper: f64,
    pub signal_sq: f64,
    /// Standard error of `signal_sq` over the updates.
    pub signal_se: f64,
    pub noise_trace: f64,
    /// Updates averaged.
    pub updates: usize,
}

/// [`NoiseScale`] from a run's metrics.jsonl (`None` when no update logged its terms).
pub fn read_noise_scale(run: &Path) -> Result<Option<NoiseScale>> {
    let path = run.join("metrics.jsonl");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let (mut signals, mut traces) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}: a line is not JSON", path.display()))?;
        if let (Some(s), Some(t)) = (v["grad_signal_sq"].as_f64(), v["grad_noise_trace"].as_f64()) {
            signals.push(s);
            traces.push(t);
        }
    }
    Ok(noise_scale(&signals, &traces))
}

/// [`NoiseScale`] from per-update signal and noise estimates.
pub fn noise_scale(signals: &[f64], traces: &[f64]) -> Option<NoiseScale> {
    let n = signals.len();
    if n == 0 || traces.len() != n {
        return None;
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / n as f64;
    let (signal, trace) = (mean(signals), mean(traces));
    let se = if n > 1 {
        let var = signals.iter().map(|x| (x - signal).powi(2)).sum::<f64>() / (n - 1) as f64;
        (var / n as f64).sqrt()
    } else {
        f64::INFINITY
    };
    let (upper, lower) = (signal + 2.0 * se, signal - 2.0 * se);
    let ratio = |s: f64| {
        if s > 0.0 && s.is_finite() {
            trace / s
        } else {
            f64::INFINITY
        }
    };
    Some(NoiseScale {
        b_simple: trace / signal,
        b_lower: ratio(upper),
        b_upper: ratio(lower),
        signal_sq: signal,
        signal_se: se,
        noise_trace: trace,
        updates: n,
    })
}

/// One line on a run's noise scale and what it means at its batch of `batch` examples.
pub fn describe_noise(ns: &NoiseScale, batch: usize) -> String {
    let b = batch as f64;
    // E|g_B|^2 = |G|^2 (1 + B_simple / B): the share of a step's squared norm that is signal.
    let share = |scale: f64| 100.0 / (1.0 + scale / b);
    if ns.signal_sq > 2.0 * ns.signal_se {
        format!(
            "gradient noise scale B_simple = {:.0} examples (at least {:.0}, 95%) over {} updates; at this run's batch of {batch}, {:.0}% of a step's squared norm is signal",
            ns.b_simple,
            ns.b_lower,
            ns.updates,
            share(ns.b_simple)
        )
    } else if ns.b_lower.is_finite() {
        format!(
            "no gradient signal measurable over {} updates: B_simple is at least {:.0} examples (95%); at this run's batch of {batch}, at most {:.1}% of a step's squared norm is signal",
            ns.updates,
            ns.b_lower,
            share(ns.b_lower)
        )
    } else {
        format!(
            "no gradient signal measurable over {} update(s)",
            ns.updates
        )
    }
}

pub fn align(args: AlignArgs) -> Result<AlignSummary> {
    // A new run's folder is created only once every input has loaded, so a bad input leaves
    // nothing behind.
    let (opened, config, resolved) = match &args.resume {
        Some(_) => {
            // `--set train.updates=N` extends a run; anything that would change what its
            // finished updates meant is refused.
            let (run, config, text) = RunDir::open_with_overrides::<AlignConfig>(
                &args.out,
                &args.overrides,
                &["train.updates", "log."],
            )?;
            (Some(run), config, text)
        }
        None => {
            if args.out.join("config.toml").exists() {
                bail!(
                    "{} already holds a run; pass `--resume latest` to continue it or choose another --out",
                    args.out.display()
                );
            }
            let (config, resolved): (AlignConfig, String) =
                tiller_core::config::from_toml_file_with_overrides(&args.config, &args.overrides)?;
            (None, config, resolved)
        }
    };
    config.validate()?;
    let device = tiller_core::device::parse_device(&config.device)?;
    let (pipe, tokenizer) = load_pipeline(Path::new(&config.base), &device)?;
    let reward = load_reward(&config.reward, &tokenizer, &device)?;
    let splits = prompts::generate_splits(&PromptSetConfig::default())?;
    let train_prompts = first_per_task(
        &splits.train,
        &config.prompts.tasks,
        config.prompts.train_per_task,
    );
    let val_prompts = first_per_task(
        &splits.test,
        &config.prompts.tasks,
        config.prompts.val_per_task,
    );
    let (pairs, upfront) = if config.method == MethodName::DiffusionDpo {
        read_pairs(
            Path::new(&config.dpo.store),
            &config.dpo.split,
            config.dpo.max_comparisons,
        )?
    } else {
        (Vec::new(), 0)
    };

    let sampler = sampler_config(&pipe.scheduler, config.sampling.eta)?;
    let mut init_rng = SeededRng::new(config.train.seed ^ 0x10a4_5eed);
    let policy = Policy::new(
        pipe.unet.clone(),
        pipe.unet_config.clone(),
        sampler.build(config.sampling.steps)?,
        pipe.scheduler.build(config.sampling.steps)?,
        config.sampling.guidance,
        &config.adapter,
        &mut init_rng,
        &device,
    )?;
    let encode = |texts: &[String]| -> tiller_core::Result<Tensor<3>> {
        let ids: Vec<Vec<i64>> = texts
            .iter()
            .map(|t| Ok(tokenizer.encode(t)?.into_iter().map(i64::from).collect()))
            .collect::<tiller_core::Result<_>>()?;
        pipe.encode(&ids, &device)
    };
    let res = pipe
        .resolution()
        .context("the UNet config has no sample_size")?;
    let data = AlignData {
        prompts: train_prompts.iter().map(|p| p.text.clone()).collect(),
        pairs,
        upfront_queries: upfront,
        encode: &encode,
        image_shape: [pipe.unet_config.in_channels, res, res],
    };
    let settings = SampleSettings {
        scheduler: sampler.clone(),
        steps: config.sampling.steps,
        guidance: config.sampling.guidance,
        batch: 32,
    };
    let samples_dir = args.out.join("samples");
    let proxy_is_gold = config.reward == "gold";
    let mut validate = |step: u64, unet: &UNet2DConditionModel| {
        let v = validation(
            &pipe,
            unet,
            &tokenizer,
            &val_prompts,
            config.prompts.val_per_prompt,
            &settings,
            (!proxy_is_gold).then_some(reward.as_ref()),
            &device,
            &samples_dir,
            step,
        )
        .map_err(|e| tiller_core::Error::invalid(format!("validation at update {step}: {e:#}")))?;
        let line: Vec<String> = v.iter().map(|(k, x)| format!("{k} {x:.3}")).collect();
        eprintln!("validation @ {step}: {}", line.join(", "));
        Ok(v)
    };
    let run = match opened {
        Some(run) => run,
        None => RunDir::create(&args.out, &resolved)?,
    };
    let mut algorithm = tiller_align::methods::build(&config);
    let out = tiller_align::align(
        &run,
        &config,
        policy,
        algorithm.as_mut(),
        reward.as_ref(),
        &data,
        args.resume.as_ref(),
        args.stop_after,
        &mut validate,
    )?;
    let finished = out.updates >= config.train.updates
        || (config.train.reward_budget > 0
            && out.reward_queries.saturating_sub(upfront) >= config.train.reward_budget);
    if finished {
        let final_dir = run.root().join("final");
        let tmp = run.root().join(".final.tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        out.policy.export(&tmp)?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir)?;
        }
        std::fs::rename(&tmp, &final_dir)?;
        eprintln!(
            "aligned weights in {} ({} updates, {} reward queries, {:.0} s); evaluate with `tiller eval --model {}`",
            final_dir.display(),
            out.updates,
            out.reward_queries,
            out.wall_s,
            run.root().display()
        );
    }
    let before = read_validation(run.root(), 0)?;
    let noise_scale = read_noise_scale(run.root())?;
    if let Some(ns) = &noise_scale {
        eprintln!("{}", describe_noise(ns, config.train.effective_batch()));
    }
    Ok(AlignSummary {
        config,
        before,
        after: out.last_validation,
        reward_queries: out.reward_queries,
        wall_s: out.wall_s,
        updates: out.updates,
        noise_scale,
    })
}

/// The first `n` prompts of each task in `tasks` (lists are grouped by task).
fn first_per_task(list: &[Prompt], tasks: &[Task], n: usize) -> Vec<Prompt> {
    let mut count: BTreeMap<Task, usize> = BTreeMap::new();
    list.iter()
        .filter(|p| tasks.contains(&p.spec.tag))
        .filter(|p| {
            let c = count.entry(p.spec.tag).or_default();
            *c += 1;
            *c <= n
        })
        .cloned()
        .collect()
}

/// Non-tie comparisons of `split` as (prompt, chosen, rejected) pixel pairs; also returns how
/// many comparisons (labels) the store holds for that split, the queries they cost.
fn read_pairs(
    store_dir: &Path,
    split: &str,
    max_comparisons: usize,
) -> Result<(Vec<PreferencePair>, u64)> {
    if !store_dir.join("preferences.sqlite").is_file() {
        bail!(
            "dpo.store: {} is not a preference store (no preferences.sqlite); run `tiller feedback collect --store {}` first",
            store_dir.display(),
            store_dir.display()
        );
    }
    let store = SqliteStore::open(store_dir).with_context(|| {
        format!(
            "dpo.store: opening the preference store {}",
            store_dir.display()
        )
    })?;
    let split = match split {
        "train" => Split::Train,
        _ => Split::Test,
    };
    let mut comparisons = store.comparisons(&Query::default().in_split(split))?;
    if max_comparisons > 0 {
        comparisons.truncate(max_comparisons);
    }
    let mut cache: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    let mut pixels = |id: &tiller_feedback::ImageId| -> Result<Vec<f32>> {
        if let Some(v) = cache.get(&id.0) {
            return Ok(v.clone());
        }
        let bytes = store.image_bytes(id)?;
        let image = decode_png(&bytes, Path::new(&id.0))?;
        let mut v = Vec::new();
        image.to_chw_floats(&mut v);
        cache.insert(id.0.clone(), v.clone());
        Ok(v)
    };
    let mut pairs = Vec::new();
    for c in &comparisons {
        let (w, l) = match c.choice {
            Choice::A => (&c.image_a, &c.image_b),
            Choice::B => (&c.image_b, &c.image_a),
            Choice::Tie => continue, // Diffusion-DPO drops ties (Salesforce train.py)
        };
        let prompt = store.prompt(&c.prompt)?.with_context(|| {
            format!(
                "a comparison names prompt {} which is not stored",
                c.prompt.0
            )
        })?;
        pairs.push(PreferencePair {
            prompt: prompt.text,
            chosen: pixels(w)?,
            rejected: pixels(l)?,
        });
    }
    if pairs.is_empty() {
        bail!(
            "dpo.store: {} has no non-tie comparisons in the {split:?} split; run `tiller feedback collect` first",
            store_dir.display()
        );
    }
    Ok((pairs, comparisons.len() as u64))
}

/// Gold accuracy (GenEval overall), gold reward and, if given, the proxy reward of `unet` on
/// the validation prompts with fixed seeds; writes a grid (`samples/val-<step>.png`) and each
/// image's verdict (`samples/val-<step>.jsonl`, `results.jsonl`'s format). After update 0 the
/// verdicts are paired with update 0's (the same prompts and seeds): the accuracy gain, its
/// paired standard error and the sign test's p (`gain`, `gain_se`, `gain_p`), so a change can
/// be told from the noise of a small validation set.
#[allow(clippy::too_many_arguments)]
fn validation(
    pipe: &TextToImage,
    unet: &UNet2DConditionModel,
    tokenizer: &Tokenizer,
    prompts: &[Prompt],
    per_prompt: usize,
    settings: &SampleSettings,
    proxy: Option<&dyn Reward>,
    device: &Device,
    samples: &Path,
    step: u64,
) -> Result<Vec<(String, f64)>> {
    let base_unet = pipe.unet.clone();
    let pipe = TextToImage {
        unet: unet.clone(),
        ..pipe.clone()
    };
    let texts: Vec<String> = prompts.iter().map(|p| p.text.clone()).collect();
    let seeds: Vec<u64> = (0..per_prompt as u64).map(|i| 1_000_000 + i).collect();
    let images = sample_prompts(&pipe, tokenizer, &texts, &seeds, settings, device)?;
    let report = score("align", "testbed-test", prompts, &images, BTreeMap::new())?;
    let flat: Vec<Image> = images.iter().flatten().cloned().collect();
    let flat_texts: Vec<String> = texts
        .iter()
        .flat_map(|t| std::iter::repeat_n(t.clone(), per_prompt))
        .collect();
    let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let gold = mean(GoldReward::default().score(&flat, &flat_texts)?);
    let kl = kl_to_base(&base_unet, unet, &pipe, tokenizer, &texts, settings, device)?;
    let mut out = vec![
        ("gold_accuracy".to_string(), report.overall),
        ("kl_to_base".to_string(), kl),
        ("gold_reward".to_string(), gold),
        ("aesthetic".to_string(), report.aesthetic),
        ("unasked_mark_rate".to_string(), report.unasked_mark_rate),
    ];
    if let Some(r) = proxy {
        out.push((
            "proxy_reward".to_string(),
            mean(r.score(&flat, &flat_texts)?),
        ));
    }
    if per_prompt >= 2 {
        out.push(("diversity".to_string(), diversity(&images)));
    }
    std::fs::create_dir_all(samples).with_context(|| format!("creating {}", samples.display()))?;
    let mut lines = String::new();
    for r in &report.results {
        lines.push_str(&serde_json::to_string(r)?);
        lines.push('\n');
    }
    tiller_core::fs::atomic_write(
        &samples.join(format!("val-{step:06}.jsonl")),
        lines.as_bytes(),
    )?;
    let start = samples.join(format!("val-{:06}.jsonl", 0));
    if step > 0 && start.is_file() {
        let text = std::fs::read_to_string(&start)
            .with_context(|| format!("reading {}", start.display()))?;
        let a = crate::paired::parse(&text, &start)?;
        let b = crate::paired::verdicts(&report.results);
        if let Some(o) = crate::paired::overall(&crate::paired::compare_results(&a, &b)?) {
            out.push(("gain".to_string(), o.gain()));
            out.push(("gain_se".to_string(), o.se));
            out.push(("gain_p".to_string(), o.p));
        }
    }
    let grid = samples.join(format!("val-{step:06}.png"));
    geneval::write_grid_png(&grid, &flat, (per_prompt * 8).min(flat.len()).max(1))?;
    Ok(out)
}

/// The `val/` scalars logged at `step` in a run's metrics.jsonl.
pub fn read_validation(run: &Path, step: u64) -> Result<Vec<(String, f64)>> {
    let path = run.join("metrics.jsonl");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if v["step"].as_u64() == Some(step)
            && let Some(obj) = v.as_object()
            && obj.keys().any(|k| k.starts_with("val/"))
        {
            return Ok(obj
                .iter()
                .filter_map(|(k, x)| {
                    k.strip_prefix("val/")
                        .and_then(|k| x.as_f64().map(|x| (k.to_string(), x)))
                })
                .collect());
        }
    }
    Ok(Vec::new())
}

/// Whether `folder` is an alignment run (what `tiller eval --model runs/<id>` accepts).
pub fn is_run(folder: &Path) -> bool {
    (folder.join("config.toml").is_file() && folder.join("final").is_dir())
        || checkpoint_run(folder).is_some()
}

/// The run folder of `folder` when `folder` is one of its checkpoints
/// (`runs/<id>/checkpoints/step-N`, holding the trainer's `model.bpk`).
fn checkpoint_run(folder: &Path) -> Option<PathBuf> {
    let parent = folder.parent()?;
    let run = parent.parent()?;
    (parent.file_name()? == "checkpoints"
        && folder.join(MODEL_FILE).is_file()
        && run.join("config.toml").is_file())
    .then(|| run.to_path_buf())
}

/// The base pipeline of an alignment run with the run's final weights (LoRA merged), or, given
/// one of its checkpoints (`runs/<id>/checkpoints/step-N`), with that checkpoint's weights.
pub fn load_aligned(folder: &Path, device: &Device) -> Result<(TextToImage, Tokenizer)> {
    let checkpoint = checkpoint_run(folder);
    let run = checkpoint.as_deref().unwrap_or(folder);
    let path = run.join("config.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let config: AlignConfig = toml::from_str(&text)
        .with_context(|| format!("{}: not an alignment run config", path.display()))?;
    let (mut pipe, tokenizer) = load_pipeline(Path::new(&config.base), device)
        .with_context(|| format!("the run's base model (`base` in {})", path.display()))?;
    if checkpoint.is_some() {
        // The trainer saves the whole policy module: the base with its adapters attached (their
        // initial values are overwritten by the load), or every weight for a full fine-tune.
        let module = match config.adapter.kind {
            AdapterKind::Lora => {
                attach_lora(pipe.unet, &config.adapter.lora(), &mut SeededRng::new(0))?
            }
            AdapterKind::Full => pipe.unet,
        };
        let file = folder.join(MODEL_FILE);
        let loaded = load_module(&file, module)
            .with_context(|| format!("loading the checkpoint {}", file.display()))?;
        pipe.unet = merge_lora(loaded);
        return Ok((pipe, tokenizer));
    }
    let final_dir = run.join("final");
    pipe.unet = match config.adapter.kind {
        AdapterKind::Lora => {
            let (unet, _, _) = load_lora(pipe.unet, &final_dir.join(LORA_PEFT_FILE))?;
            merge_lora(unet)
        }
        AdapterKind::Full => {
            tiller_diffusion::models::load_unet(&final_dir.join("unet"), None, device)?.1
        }
    };
    Ok((pipe, tokenizer))
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
    let (pipe, tokenizer) = load_aligned(&args.run, &device)?;
    crate::base::save_pipeline(&pipe, &args.out, &tokenizer)?;
    println!(
        "{} merged into its base, written to {}",
        args.run.display(),
        args.out.display()
    );
    Ok(())
}

/// Before/after validation of a run as a Markdown table.
pub fn summary_markdown(s: &AlignSummary) -> String {
    let mut out = format!(
        "# {} on the testbed\n\n{} updates, {} reward queries, {:.0} s\n\n| validation (held-out prompts) | before | after |\n|---|---|---|\n",
        s.config.method.name(),
        s.updates,
        s.reward_queries,
        s.wall_s
    );
    for (k, after) in &s.after {
        let before = s
            .before
            .iter()
            .find(|(b, _)| b == k)
            .map(|(_, v)| format!("{v:.3}"))
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!("| {k} | {before} | {after:.3} |\n"));
    }
    if let Some(ns) = &s.noise_scale {
        out.push_str(&format!(
            "\n{} (McCandlish et al. 2018).\n",
            describe_noise(ns, s.config.train.effective_batch())
        ));
    }
    out
}

/// [`chain_kl`] of the aligned model to the base on the first 16 validation prompts, one
/// fixed-seed chain each.
fn kl_to_base(
    base: &UNet2DConditionModel,
    aligned: &UNet2DConditionModel,
    pipe: &TextToImage,
    tokenizer: &Tokenizer,
    texts: &[String],
    settings: &SampleSettings,
    device: &Device,
) -> Result<f64> {
    use tiller_diffusion::sampling::{Conditioning, chain_kl};
    let texts = &texts[..texts.len().min(16)];
    let ids: Vec<Vec<i64>> = texts
        .iter()
        .map(|t| crate::testbed::encode(tokenizer, t))
        .collect::<Result<_>>()?;
    let n = ids.len();
    let mut cond = Conditioning::new(pipe.encode(&ids, device)?);
    if settings.guidance != 1.0 {
        let empty = crate::testbed::empty_prompt(tokenizer);
        cond = cond.with_guidance(pipe.encode(&vec![empty; n], device)?, settings.guidance);
    }
    let scheduler = settings.scheduler.build(settings.steps)?;
    let res = pipe
        .resolution()
        .context("the UNet config has no sample_size")?;
    let mut rng = SeededRng::new(2_000_000);
    let x = rng.normal([n, pipe.unet_config.in_channels, res, res], device);
    Ok(chain_kl(
        aligned,
        base,
        scheduler.as_ref(),
        &cond,
        x,
        &mut rng,
    )?)
}

/// Mean absolute pixel difference (in [0, 1]) between the images of the same prompt, averaged
/// over prompts: 0 when every seed gives the same picture.
fn diversity(images: &[Vec<Image>]) -> f64 {
    let (mut sum, mut n) = (0.0, 0usize);
    for imgs in images {
        for a in 0..imgs.len() {
            for b in a + 1..imgs.len() {
                let (x, y) = (imgs[a].data(), imgs[b].data());
                let d: f64 = x
                    .iter()
                    .zip(y)
                    .map(|(p, q)| (*p as f64 - *q as f64).abs())
                    .sum::<f64>()
                    / (x.len() as f64 * 255.0);
                sum += d;
                n += 1;
            }
        }
    }
    sum / n.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_scale_and_its_bound_by_hand() {
        // A steady signal of 2 with noise 100: B_simple = 50, and the signal is significant.
        let ns = noise_scale(&[2.0; 4], &[100.0; 4]).unwrap();
        assert_eq!((ns.b_simple, ns.signal_se, ns.updates), (50.0, 0.0, 4));
        assert_eq!((ns.b_lower, ns.b_upper), (50.0, 50.0));
        let line = describe_noise(&ns, 50);
        assert!(
            line.contains("B_simple = 50 ") && line.contains("50% of a step"),
            "{line}"
        );
        // Signals 1, -1, 1, -1: mean 0, sample sd sqrt(4/3), se sqrt(1/3); upper bound
        // 2 sqrt(1/3) = 1.1547, so B_simple >= 100 / 1.1547 = 86.6.
        let ns = noise_scale(&[1.0, -1.0, 1.0, -1.0], &[100.0; 4]).unwrap();
        assert!((ns.signal_se - (1.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert!((ns.b_lower - 86.6025).abs() < 1e-3, "{}", ns.b_lower);
        assert!(ns.b_upper.is_infinite());
        let line = describe_noise(&ns, 32);
        assert!(line.contains("at least 87 examples"), "{line}");
        // One update has no standard error: nothing can be bounded.
        let ns = noise_scale(&[-1.0], &[100.0]).unwrap();
        assert!(ns.b_lower.is_infinite());
        assert!(noise_scale(&[], &[]).is_none());
    }
}
