//! One alignment run from a preset, end to end ([`run`], what `tiller align`, `tiller compare`
//! and the quickstart call); a finished (or checkpointed) run as a model; and the preference
//! pairs a run reads from a store.

use crate::config::AdapterKind;
use crate::methods::StoreData;
use crate::policy::{LORA_PEFT_FILE, sampler_config};
use crate::pretraining::Pretraining;
use crate::trainer::{AlignData, LabeledImage, MODEL_FILE, PreferencePair};
use crate::{AlignConfig, Policy};
use burn::tensor::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tiller_core::{Error, Result, SeededRng};
use tiller_diffusion::models::lora::{attach_lora, load_lora, merge_lora};
use tiller_diffusion::models::unet::UNet2DConditionModel;
use tiller_diffusion::pipeline::TextToImage;
use tiller_engine::checkpoint::load_module;
use tiller_engine::{Resume, RunDir};
use tiller_eval::noise_scale::{NoiseScale, describe_noise, read_noise_scale};
use tiller_eval::sampling::{SampleSettings, load_pipeline};
use tiller_eval::suite::first_per_task;
use tiller_eval::validation::{read_validation, validation};
use tiller_feedback::{Choice, PreferenceStore, Query, Split, SqliteStore};
use tiller_testbed::Tokenizer;
use tiller_testbed::image::decode_png;
use tiller_testbed::{PromptSetConfig, prompts};

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
///
/// `locate` maps the `base` path written in the run's config to where it is now (the CLI looks
/// up shipped assets with it; identity otherwise).
pub fn load_aligned(
    folder: &Path,
    device: &Device,
    locate: &dyn Fn(&Path) -> PathBuf,
) -> Result<(TextToImage, Tokenizer)> {
    let checkpoint = checkpoint_run(folder);
    let run = checkpoint.as_deref().unwrap_or(folder);
    let path = run.join("config.toml");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let config: AlignConfig = toml::from_str(&text)
        .map_err(|e| Error::format(&path, format!("not an alignment run config: {e}")))?;
    let base = locate(Path::new(&config.base));
    let (mut pipe, tokenizer) = load_pipeline(&base, device).map_err(|e| {
        Error::format(
            &path,
            format!("the run's base model `base = {}`: {e}", base.display()),
        )
    })?;
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
        let loaded = load_module(&file, module)?;
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

/// A preference store opened for a method's `field`, with an image cache: pixels CHW in [-1, 1].
struct StoreImages {
    store: SqliteStore,
    dir: PathBuf,
    cache: BTreeMap<String, Vec<f32>>,
}

impl StoreImages {
    fn open(dir: &Path, field: &str) -> Result<Self> {
        if !dir.join("preferences.sqlite").is_file() {
            return Err(Error::config(
                field,
                format!(
                    "{} is not a preference store (no preferences.sqlite); run `tiller feedback collect --store {}` first",
                    dir.display(),
                    dir.display()
                ),
            ));
        }
        Ok(Self {
            store: SqliteStore::open(dir)?,
            dir: dir.to_path_buf(),
            cache: BTreeMap::new(),
        })
    }

    fn pixels(&mut self, id: &tiller_feedback::ImageId) -> Result<Vec<f32>> {
        if let Some(v) = self.cache.get(&id.0) {
            return Ok(v.clone());
        }
        let bytes = self.store.image_bytes(id)?;
        let image = decode_png(&bytes, Path::new(&id.0))?;
        let mut v = Vec::new();
        image.to_chw_floats(&mut v);
        self.cache.insert(id.0.clone(), v.clone());
        Ok(v)
    }

    fn prompt(&self, id: &tiller_feedback::PromptId, what: &str) -> Result<String> {
        Ok(self
            .store
            .prompt(id)?
            .ok_or_else(|| {
                Error::format(
                    &self.dir,
                    format!("{what} names prompt {} which is not stored", id.0),
                )
            })?
            .text)
    }
}

fn split_of(split: &str) -> Split {
    match split {
        "train" => Split::Train,
        _ => Split::Test,
    }
}

/// Non-tie comparisons of `split` as (prompt, chosen, rejected) pixel pairs; also returns how
/// many comparisons (labels) the store holds for that split, the queries they cost. `field`
/// names the config key of the store in errors.
pub fn read_pairs(
    store_dir: &Path,
    split: &str,
    max_comparisons: usize,
    field: &str,
) -> Result<(Vec<PreferencePair>, u64)> {
    let mut images = StoreImages::open(store_dir, field)?;
    let split = split_of(split);
    let mut comparisons = images
        .store
        .comparisons(&Query::default().in_split(split))?;
    if max_comparisons > 0 {
        comparisons.truncate(max_comparisons);
    }
    let mut pairs = Vec::new();
    for c in &comparisons {
        let (w, l) = match c.choice {
            Choice::A => (&c.image_a, &c.image_b),
            Choice::B => (&c.image_b, &c.image_a),
            Choice::Tie => continue, // Diffusion-DPO drops ties (Salesforce train.py)
        };
        pairs.push(PreferencePair {
            prompt: images.prompt(&c.prompt, "a comparison")?,
            chosen: images.pixels(w)?,
            rejected: images.pixels(l)?,
        });
    }
    if pairs.is_empty() {
        return Err(Error::config(
            field,
            format!(
                "{} has no non-tie comparisons in the {split:?} split; run `tiller feedback collect` first",
                store_dir.display()
            ),
        ));
    }
    Ok((pairs, comparisons.len() as u64))
}

/// The likes and dislikes of `split` as labelled images (at most `max_labels`, the first in the
/// store; 0: all); also returns how many there are, the queries they cost.
pub fn read_labels(
    store_dir: &Path,
    split: &str,
    max_labels: usize,
    field: &str,
) -> Result<(Vec<LabeledImage>, u64)> {
    let mut images = StoreImages::open(store_dir, field)?;
    let split = split_of(split);
    let mut labels = images.store.labels(&Query::default().in_split(split))?;
    if max_labels > 0 {
        labels.truncate(max_labels);
    }
    let mut out = Vec::with_capacity(labels.len());
    for l in &labels {
        out.push(LabeledImage {
            prompt: images.prompt(&l.prompt, "a like")?,
            pixels: images.pixels(&l.image)?,
            like: l.like,
        });
    }
    if out.is_empty() {
        return Err(Error::config(
            field,
            format!(
                "{} has no likes or dislikes in the {split:?} split; run `tiller feedback collect --kinds label` first",
                store_dir.display()
            ),
        ));
    }
    Ok((out, labels.len() as u64))
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

/// One alignment run from a preset: what `tiller align` does.
pub struct Request<'a> {
    /// The preset (TOML, overrides of the defaults only); read for a new run.
    pub config: &'a Path,
    /// The run folder: created for a new run, never overwritten.
    pub out: &'a Path,
    /// Continue the run in `out` from this checkpoint.
    pub resume: Option<&'a Resume>,
    /// `key=value` overrides; on resume only `train.updates` and `log.*` may change.
    pub overrides: &'a [String],
    /// Stop after this many updates in this process (the run can be resumed).
    pub stop_after: Option<u64>,
    /// Maps a path named in the config (`base`, `reward`, `dpo.store`) to where it is (the CLI
    /// finds shipped assets with it).
    pub locate: &'a dyn Fn(&Path) -> PathBuf,
}

/// Runs (or resumes) one alignment: loads the base, the reward, the prompts (the testbed's train
/// split) and, for Diffusion-DPO, the store's pairs; validates on held-out prompts with fixed
/// seeds (`tiller_eval::validation`); trains; exports the adapters (or the UNet) to
/// `<out>/final/` when the run is finished.
pub fn run(args: &Request<'_>) -> Result<AlignSummary> {
    // A new run's folder is created only once every input has loaded, so a bad input leaves
    // nothing behind.
    let (opened, config, resolved) = match &args.resume {
        Some(_) => {
            // `--set train.updates=N` extends a run; anything that would change what its
            // finished updates meant is refused.
            let (run, config, text) = RunDir::open_with_overrides::<AlignConfig>(
                args.out,
                args.overrides,
                &["train.updates", "log."],
            )?;
            (Some(run), config, text)
        }
        None => {
            if args.out.join("config.toml").exists() {
                return Err(Error::invalid(format!(
                    "{} already holds a run; pass `--resume latest` to continue it or choose another --out",
                    args.out.display()
                )));
            }
            let (config, resolved): (AlignConfig, String) =
                tiller_core::config::from_toml_file_with_overrides(
                    &(args.locate)(args.config),
                    args.overrides,
                )?;
            (None, config, resolved)
        }
    };
    config.validate()?;
    let device = tiller_core::device::parse_device(&config.device)?;
    let (pipe, tokenizer) = load_model(Path::new(&config.base), &device, args.locate)?;
    let reward = tiller_reward::load::load(
        &locate_spec(&config.reward, args.locate),
        &tokenizer,
        &device,
    )?;
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
    let (mut pairs, mut labels, mut upfront) = (Vec::new(), Vec::new(), 0);
    if let Some(s) = config.method.spec().store() {
        let store = (args.locate)(Path::new(&s.store));
        match s.data {
            StoreData::Comparisons => {
                (pairs, upfront) = read_pairs(&store, &s.split, s.limit, s.field)?;
            }
            StoreData::Labels => {
                (labels, upfront) = read_labels(&store, &s.split, s.limit, s.field)?;
            }
        }
    }

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
    let res = tiller_eval::sampling::resolution(&pipe)?;
    let pretraining = Pretraining::open(
        &config.pretrain,
        &(args.locate)(Path::new(&config.pretrain.path)),
        &train_prompts,
        res,
        config.train.seed,
    )?;
    pretraining.check_texts(&|text| tokenizer.encode(text).map(|_| ()))?;
    let pretrain = |i: u64| pretraining.example(i);
    let data = AlignData {
        prompts: train_prompts.iter().map(|p| p.text.clone()).collect(),
        pairs,
        labels,
        upfront_queries: upfront,
        pretrain: Some(&pretrain),
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
        .map_err(|e| Error::invalid(format!("validation at update {step}: {e}")))?;
        let line: Vec<String> = v.iter().map(|(k, x)| format!("{k} {x:.3}")).collect();
        eprintln!("validation @ {step}: {}", line.join(", "));
        Ok(v)
    };
    let run = match opened {
        Some(run) => run,
        None => RunDir::create(args.out, &resolved)?,
    };
    let mut algorithm = crate::methods::build(&config);
    let out = crate::align(
        &run,
        &config,
        policy,
        algorithm.as_mut(),
        reward.as_ref(),
        &data,
        args.resume,
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
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        out.policy.export(&tmp)?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
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

/// A model as commands name it: an alignment run, one of its checkpoints, or a pipeline folder;
/// paths go through `locate` first.
pub fn load_model(
    path: &Path,
    device: &Device,
    locate: &dyn Fn(&Path) -> PathBuf,
) -> Result<(TextToImage, Tokenizer)> {
    let path = locate(path);
    if is_run(&path) {
        return load_aligned(&path, device, locate);
    }
    load_pipeline(&path, device)
}

/// A reward spec (`tiller_reward::load::load`) with its folder, if it names one, located.
pub fn locate_spec(spec: &str, locate: &dyn Fn(&Path) -> PathBuf) -> String {
    match spec.strip_prefix("caption-match:") {
        Some(path) => format!("caption-match:{}", locate(Path::new(path)).display()),
        None if tiller_reward::load::NAMED.contains(&spec) => spec.to_string(),
        None => locate(Path::new(spec)).display().to_string(),
    }
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
