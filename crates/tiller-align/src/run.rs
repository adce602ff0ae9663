//! One alignment run from a preset, end to end ([`run`], what `tiller align`, `tiller compare`
//! and the quickstart call); a finished (or checkpointed) run as a model; and the preference
//! pairs a run reads from a store.

use crate::batch::Prompts;
use crate::config::{AdapterKind, PretrainData};
use crate::methods::StoreData;
use crate::policy::{LORA_PEFT_FILE, sampler_config};
use crate::pretraining::Pretraining;
use crate::trainer::PromptEncoder;
use crate::trainer::{AlignData, LabeledImage, MODEL_FILE, PreferencePair};
use crate::{AlignConfig, Policy};
use burn::tensor::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tiller_core::{Error, Result, SeededRng};
use tiller_diffusion::models::lora::{attach_lora, load_lora, merge_lora};
use tiller_diffusion::models::unet::{
    AddedConditions, UNet2DConditionConfig, UNet2DConditionModel,
};
use tiller_diffusion::pipeline::TextToImage;
use tiller_diffusion::schedulers::SchedulerConfig;
use tiller_diffusion::stable_diffusion::{StableDiffusion, is_stable_diffusion};
use tiller_engine::checkpoint::load_module;
use tiller_engine::{Resume, RunDir};
use tiller_eval::noise_scale::{NoiseScale, describe_noise, read_noise_scale};
use tiller_eval::sampling::{SampleSettings, load_pipeline};
use tiller_eval::suite::first_per_task;
use tiller_eval::validation::{latent_validation, read_validation, validation};
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

/// The config of the alignment run `folder` (or of the run one of its checkpoints belongs to),
/// and whether `folder` is a checkpoint.
pub(crate) fn run_config(folder: &Path) -> Result<(AlignConfig, bool)> {
    let checkpoint = checkpoint_run(folder);
    let run = checkpoint.as_deref().unwrap_or(folder);
    let path = run.join("config.toml");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let config: AlignConfig = toml::from_str(&text)
        .map_err(|e| Error::format(&path, format!("not an alignment run config: {e}")))?;
    Ok((config, checkpoint.is_some()))
}

/// The base model folder of the alignment run `folder` (or of one of its checkpoints), located.
pub fn run_base(folder: &Path, locate: &dyn Fn(&Path) -> PathBuf) -> Result<PathBuf> {
    Ok(locate(Path::new(&run_config(folder)?.0.base)))
}

/// `unet` (the run's base UNet) with the weights of run `folder`: its final LoRA merged or its
/// fully fine-tuned UNet, or a checkpoint's weights.
fn aligned_unet(
    folder: &Path,
    config: &AlignConfig,
    checkpoint: bool,
    unet: UNet2DConditionModel,
    device: &Device,
) -> Result<UNet2DConditionModel> {
    if config.adapter.kind == AdapterKind::Lora {
        return Ok(merge_lora(adapted_unet(folder, config, checkpoint, unet)?));
    }
    if checkpoint {
        // The trainer saves the whole policy module: every weight for a full fine-tune.
        return load_module(&folder.join(MODEL_FILE), unet);
    }
    tiller_diffusion::models::load_unet(&folder.join("final").join("unet"), None, device)
        .map(|(_, unet)| unet)
}

/// `unet` (the run's base UNet) with the LoRA adapters of run `folder` (config `config`; a
/// checkpoint when `checkpoint`) attached, not merged.
pub(crate) fn adapted_unet(
    folder: &Path,
    config: &AlignConfig,
    checkpoint: bool,
    unet: UNet2DConditionModel,
) -> Result<UNet2DConditionModel> {
    if config.adapter.kind != AdapterKind::Lora {
        return Err(Error::invalid(format!(
            "{} fine-tuned every weight (`adapter.kind = \"full\"`): it has no LoRA adapters",
            folder.display()
        )));
    }
    if checkpoint {
        // The trainer saves the whole policy module: the base with its adapters attached (their
        // initial values are overwritten by the load).
        let module = attach_lora(unet, &config.adapter.lora(), &mut SeededRng::new(0))?;
        return load_module(&folder.join(MODEL_FILE), module);
    }
    Ok(load_lora(unet, &folder.join("final").join(LORA_PEFT_FILE))?.0)
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
    let (config, checkpoint) = run_config(folder)?;
    let base = locate(Path::new(&config.base));
    if is_stable_diffusion(&base) {
        return Err(Error::invalid(format!(
            "{} is a run on the Stable Diffusion pipeline {}: it loads as one \
             (`load_aligned_latent`; `tiller sample` and `tiller merge` read it), not as a \
             testbed pipeline",
            folder.display(),
            base.display()
        )));
    }
    let (mut pipe, tokenizer) = load_pipeline(&base, device).map_err(|e| {
        Error::format(
            folder.join("config.toml"),
            format!("the run's base model `base = {}`: {e}", base.display()),
        )
    })?;
    pipe.unet = aligned_unet(folder, &config, checkpoint, pipe.unet, device)?;
    Ok((pipe, tokenizer))
}

/// [`load_aligned`] for a run on a Stable Diffusion base: the base pipeline with the run's UNet.
pub fn load_aligned_latent(
    folder: &Path,
    device: &Device,
    locate: &dyn Fn(&Path) -> PathBuf,
) -> Result<StableDiffusion> {
    let (config, checkpoint) = run_config(folder)?;
    let base = locate(Path::new(&config.base));
    let mut sd = StableDiffusion::load(&base, device).map_err(|e| {
        Error::format(
            folder.join("config.toml"),
            format!("the run's base model `base = {}`: {e}", base.display()),
        )
    })?;
    sd.unet = aligned_unet(folder, &config, checkpoint, sd.unet, device)?;
    Ok(sd)
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
    category: Option<&str>,
) -> Result<(Vec<PreferencePair>, u64)> {
    let mut images = StoreImages::open(store_dir, field)?;
    let split = split_of(split);
    let mut comparisons = images
        .store
        .comparisons(&Query::default().in_split(split))?;
    if let Some(category) = category {
        comparisons.retain(|c| {
            crate::methods::safety_dpo::in_category(&c.provenance.annotator.0, category)
        });
    }
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
                "{} has no non-tie comparisons{} in the {split:?} split; run `tiller feedback collect` \
                 (or `safety-pairs`) first",
                store_dir.display(),
                category
                    .map(|c| format!(" of category `{c}`"))
                    .unwrap_or_default()
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
    let base = (args.locate)(Path::new(&config.base));
    if is_stable_diffusion(&base) {
        return run_latent(args, opened, config, &resolved, &base, &device);
    }
    if !config.prompts.file.is_empty() {
        return Err(Error::config(
            "prompts.file",
            "applies to a Stable Diffusion base; the testbed trains on its own prompt splits \
             (prompts.tasks), which its gold evaluator reads",
        ));
    }
    let (pipe, tokenizer) = load_model(Path::new(&config.base), &device, args.locate)?;
    let reward = tiller_reward::load::load(
        &locate_spec(&config.reward, args.locate),
        &tokenizer,
        &device,
    )?;
    // A reward model the method trains beside the policy (LaSRO's surrogate), on the base's
    // tokenizer.
    let trained_reward = match config.method.spec().reward_model() {
        None => None,
        Some((field, folder)) => Some(
            tiller_reward::LearnedReward::load(
                &(args.locate)(Path::new(&folder)),
                tokenizer.clone(),
                &device,
            )
            .map_err(|e| Error::config(field, e.to_string()))?,
        ),
    };
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
    let res = tiller_eval::sampling::check_resolution(
        &pipe,
        (config.sampling.resolution > 0).then_some(config.sampling.resolution),
    )
    .map_err(|e| Error::config("sampling.resolution", e.to_string()))?;
    let image_shape = [pipe.unet_config.in_channels, res, res];
    let (pairs, labels, upfront) = store_data(&config, args.locate, image_shape)?;

    let sampler = sampler_config(&pipe.scheduler, config.sampling.eta)?;
    let policy = new_policy(
        &config,
        &pipe.unet,
        &pipe.unet_config,
        &pipe.scheduler,
        &device,
    )?;
    let encode = |texts: &[String]| -> tiller_core::Result<Tensor<3>> {
        let ids: Vec<Vec<i64>> = texts
            .iter()
            .map(|t| Ok(tokenizer.encode(t)?.into_iter().map(i64::from).collect()))
            .collect::<tiller_core::Result<_>>()?;
        pipe.encode(&ids, &device)
    };
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
        image_shape,
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
        );
        report_validation(step, v)
    };
    train_and_export(
        args,
        opened,
        &config,
        &resolved,
        policy,
        reward.as_ref(),
        trained_reward,
        &data,
        &mut validate,
    )
}

/// [`run`] on a Stable Diffusion 1.x/2.x or SDXL folder: the chain runs in the VAE's latent space, the
/// reward scores decoded images (differentiably for reward backpropagation), stored images are
/// encoded to latents (the posterior's mode, diffusers' training scripts), prompts come from
/// `prompts.file` (or the testbed's prompt texts), and validation is the reward on held-out
/// prompts ([`latent_validation`]).
fn run_latent(
    args: &Request<'_>,
    opened: Option<RunDir>,
    config: AlignConfig,
    resolved: &str,
    base: &Path,
    device: &Device,
) -> Result<AlignSummary> {
    if let Some((field, _)) = config.method.spec().reward_model() {
        return Err(Error::config(
            field,
            format!(
                "{} trains a reward network on the model's samples, and Tiller has none for a \
                 Stable Diffusion pipeline's latents yet: run it on the testbed",
                config.method.name()
            ),
        ));
    }
    let sd = StableDiffusion::load(base, device)?;
    let res = match config.sampling.resolution {
        0 => sd.default_resolution()?,
        r => r,
    };
    sd.latent_shape(1, res, res)
        .map_err(|e| Error::config("sampling.resolution", e.to_string()))?;
    // Rewards that read the testbed's vocabulary take its tokenizer; the CLIP rewards carry their own.
    let reward = tiller_reward::load::load(
        &locate_spec(&config.reward, args.locate),
        &Tokenizer::shapes(),
        device,
    )?;
    let (train_prompts, val_prompts) = prompt_texts(&config, args.locate)?;
    for p in train_prompts.iter().chain(&val_prompts) {
        sd.tokenizer
            .encode_ids(&[p.as_str()])
            .map_err(|e| Error::config("prompts", format!("prompt {p:?}: {e}")))?;
    }
    let image_shape = [sd.vae_config.in_channels, res, res];
    let (pairs, labels, upfront) = store_data(&config, args.locate, image_shape)?;
    let sampler = sampler_config(&sd.scheduler, config.sampling.eta)?;
    let policy = new_policy(&config, &sd.unet, &sd.unet_config, &sd.scheduler, device)?
        .with_latents(sd.latent_space());
    let encode = LatentPrompts {
        sd: &sd,
        size: (res, res),
        device,
    };
    let testbed_pretraining = config.pretrain.source == PretrainData::Testbed;
    if testbed_pretraining && crate::methods::build::<UNet2DConditionModel>(&config).pretrain() {
        return Err(Error::config(
            "pretrain.source",
            format!(
                "{} trains on the base model's own training data as well, and a Stable \
                 Diffusion base has no testbed renderer; name its training images with \
                 `source = \"folder\"` (an imagefolder with metadata.jsonl) or `\"store\"` and \
                 `path`",
                config.method.name()
            ),
        ));
    }
    let pretraining = match config.pretrain.source {
        PretrainData::Testbed => None,
        _ => Some(Pretraining::open(
            &config.pretrain,
            &(args.locate)(Path::new(&config.pretrain.path)),
            &[],
            res,
            config.train.seed,
        )?),
    };
    if let Some(p) = &pretraining {
        p.check_texts(&|text| sd.tokenizer.encode_ids(&[text]).map(|_| ()))?;
    }
    let pretrain = |i: u64| match &pretraining {
        Some(p) => p.example(i),
        None => Err(Error::config(
            "pretrain.source",
            "a Stable Diffusion base has no testbed renderer; name its training images with \
             `source = \"folder\"` or `\"store\"` and `path`",
        )),
    };
    let data = AlignData {
        prompts: train_prompts,
        pairs,
        labels,
        upfront_queries: upfront,
        pretrain: Some(&pretrain),
        encode: &encode,
        image_shape,
    };
    let settings = SampleSettings {
        scheduler: sampler,
        steps: config.sampling.steps,
        guidance: config.sampling.guidance,
        batch: config.train.batch_size.max(1),
    };
    let checker = tiller_diffusion::stable_diffusion::safety_checker_of(base)?
        .map(|folder| tiller_reward::clip_rewards::SafetyMargin::load(&folder, device))
        .transpose()?;
    let samples_dir = args.out.join("samples");
    let mut validate = |step: u64, unet: &UNet2DConditionModel| {
        let v = latent_validation(
            &sd,
            unet,
            &val_prompts,
            config.prompts.val_per_prompt,
            &settings,
            res,
            reward.as_ref(),
            checker.as_ref(),
            device,
            &samples_dir,
            step,
        );
        report_validation(step, v)
    };
    train_and_export(
        args,
        opened,
        &config,
        resolved,
        policy,
        reward.as_ref(),
        None,
        &data,
        &mut validate,
    )
}

/// A Stable Diffusion pipeline's prompt encoding for alignment, as its `encode_prompt`: the
/// context, the empty prompt's (SDXL with `force_zeros_for_empty_prompt`: zeros) for guidance,
/// and SDXL's pooled embedding with the time ids of `size` images.
struct LatentPrompts<'a> {
    sd: &'a StableDiffusion,
    size: (usize, usize),
    device: &'a Device,
}

impl PromptEncoder for LatentPrompts<'_> {
    fn encode(&self, texts: &[String]) -> Result<Prompts> {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let (cond, uncond) = self.sd.encode_with_negative(&refs, None, self.device)?;
        let added = match (cond.pooled, uncond.pooled) {
            (Some(c), Some(u)) => {
                let time_ids = self.sd.add_time_ids(texts.len(), self.size, self.device);
                Some((
                    AddedConditions {
                        text_embeds: c,
                        time_ids: time_ids.clone(),
                    },
                    AddedConditions {
                        text_embeds: u,
                        time_ids,
                    },
                ))
            }
            _ => None,
        };
        Ok(Prompts {
            texts: texts.to_vec(),
            context: cond.context,
            uncond: uncond.context,
            added,
        })
    }
}

/// The training and validation prompts of a run on a Stable Diffusion base: `prompts.file` (and
/// `prompts.val_file`, or the file's last `val_per_task` lines held out), or the testbed's prompt
/// texts of `prompts.tasks`.
fn prompt_texts(
    config: &AlignConfig,
    locate: &dyn Fn(&Path) -> PathBuf,
) -> Result<(Vec<String>, Vec<String>)> {
    let p = &config.prompts;
    if p.file.is_empty() {
        let splits = prompts::generate_splits(&PromptSetConfig::default())?;
        let texts = |v: Vec<tiller_testbed::Prompt>| v.into_iter().map(|p| p.text).collect();
        return Ok((
            texts(first_per_task(&splits.train, &p.tasks, p.train_per_task)),
            texts(first_per_task(&splits.test, &p.tasks, p.val_per_task)),
        ));
    }
    let read = |field: &str, path: &str| -> Result<Vec<String>> {
        let path = locate(Path::new(path));
        let rows = tiller_feedback::loaders::prompt_sets::read_prompt_file(&path)
            .map_err(|e| Error::config(field, e.to_string()))?;
        if p.categories.is_empty() {
            return Ok(rows.into_iter().map(|r| r.text).collect());
        }
        let kept: Vec<String> = rows
            .iter()
            .filter(|r| {
                r.category
                    .as_ref()
                    .is_some_and(|c| p.categories.contains(c))
            })
            .map(|r| r.text.clone())
            .collect();
        if kept.is_empty() {
            let mut have: Vec<&str> = rows.iter().filter_map(|r| r.category.as_deref()).collect();
            have.sort_unstable();
            have.dedup();
            return Err(Error::config(
                "prompts.categories",
                format!(
                    "{} has no prompts of {:?}; its categories: {}",
                    path.display(),
                    p.categories,
                    if have.is_empty() {
                        "none (not a CSV with a category column)".to_string()
                    } else {
                        have.join(", ")
                    }
                ),
            ));
        }
        Ok(kept)
    };
    let mut train = read("prompts.file", &p.file)?;
    let val = if p.val_file.is_empty() {
        if train.len() <= p.val_per_task {
            return Err(Error::config(
                "prompts.val_per_task",
                format!(
                    "holds out the last {} of {} prompts of prompts.file for validation, which \
                     leaves none to train on; name them in prompts.val_file or lower it",
                    p.val_per_task,
                    train.len()
                ),
            ));
        }
        train.split_off(train.len() - p.val_per_task)
    } else {
        read("prompts.val_file", &p.val_file)?
    };
    Ok((train, val))
}

/// The store's pairs or labels a run's method reads, and the queries they cost; every image
/// must have the run's `image_shape` [C, H, W].
fn store_data(
    config: &AlignConfig,
    locate: &dyn Fn(&Path) -> PathBuf,
    [c, h, w]: [usize; 3],
) -> Result<(Vec<PreferencePair>, Vec<LabeledImage>, u64)> {
    let (mut pairs, mut labels, mut upfront) = (Vec::new(), Vec::new(), 0);
    if let Some(s) = config.method.spec().store() {
        let store = locate(Path::new(&s.store));
        match s.data {
            StoreData::Comparisons => {
                (pairs, upfront) =
                    read_pairs(&store, &s.split, s.limit, s.field, s.category.as_deref())?;
            }
            StoreData::Labels => {
                (labels, upfront) = read_labels(&store, &s.split, s.limit, s.field)?;
            }
        }
        let sizes = pairs
            .iter()
            .flat_map(|p| [p.chosen.len(), p.rejected.len()])
            .chain(labels.iter().map(|l| l.pixels.len()));
        for len in sizes {
            if len != c * h * w {
                return Err(Error::config(
                    s.field,
                    format!(
                        "{} holds an image of {} values; this run's images are {c}x{h}x{w} \
                         (sampling.resolution {h}): store images of the run's size",
                        store.display(),
                        len
                    ),
                ));
            }
        }
    }
    Ok((pairs, labels, upfront))
}

/// The run's policy on `unet`: its adapters initialised from the run's seed, DDIM at the
/// configured eta on the pipeline's schedule.
fn new_policy(
    config: &AlignConfig,
    unet: &UNet2DConditionModel,
    unet_config: &UNet2DConditionConfig,
    scheduler: &SchedulerConfig,
    device: &Device,
) -> Result<Policy> {
    let sampler = sampler_config(scheduler, config.sampling.eta)?;
    let mut init_rng = SeededRng::new(config.train.seed ^ 0x10a4_5eed);
    Policy::new(
        unet.clone(),
        unet_config.clone(),
        sampler.build(config.sampling.steps)?,
        scheduler.build(config.sampling.steps)?,
        config.sampling.guidance,
        &config.adapter,
        &mut init_rng,
        device,
    )
}

/// A validation's scalars printed, or its error naming the update.
fn report_validation(step: u64, v: Result<Vec<(String, f64)>>) -> Result<Vec<(String, f64)>> {
    let v = v.map_err(|e| Error::invalid(format!("validation at update {step}: {e}")))?;
    let line: Vec<String> = v.iter().map(|(k, x)| format!("{k} {x:.3}")).collect();
    eprintln!("validation @ {step}: {}", line.join(", "));
    Ok(v)
}

/// Creates the run folder (a new run's, once every input has loaded), trains, and exports the
/// adapters (or the UNet) to `<out>/final/` when the run is finished.
#[allow(clippy::too_many_arguments)]
fn train_and_export(
    args: &Request<'_>,
    opened: Option<RunDir>,
    config: &AlignConfig,
    resolved: &str,
    policy: Policy,
    reward: &dyn tiller_reward::Reward,
    trained_reward: Option<tiller_reward::LearnedReward>,
    data: &AlignData<'_>,
    validate: &mut crate::trainer::Validate<'_, UNet2DConditionModel>,
) -> Result<AlignSummary> {
    let upfront = data.upfront_queries;
    let run = match opened {
        Some(run) => run,
        None => RunDir::create(args.out, resolved)?,
    };
    let mut algorithm = crate::methods::build(config);
    if let Some(model) = trained_reward {
        algorithm.adopt_reward_model(model)?;
    }
    let out = crate::align(
        &run,
        config,
        policy,
        algorithm.as_mut(),
        reward,
        data,
        args.resume,
        args.stop_after,
        validate,
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
        config: config.clone(),
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
    if let Ok((factor, path)) = tiller_reward::load::factor_spec(spec) {
        return format!(
            "{}{factor}:{}",
            tiller_reward::load::FACTOR_PREFIX,
            locate(Path::new(path)).display()
        );
    }
    match spec.split_once(':') {
        Some((prefix, path)) if tiller_reward::load::FOLDER_PREFIXES.contains(&prefix) => {
            format!("{prefix}:{}", locate(Path::new(path)).display())
        }
        _ if tiller_reward::load::NAMED.contains(&spec) => spec.to_string(),
        _ => locate(Path::new(spec)).display().to_string(),
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
