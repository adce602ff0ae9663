//! Flags shared by several commands (sampling, best-of-N), and where the models and rewards they
//! name are opened: shipped paths resolved (crate::shipped), alignment runs accepted wherever a
//! model is, errors with the flag's context.

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use clap::Args;
use std::path::Path;
use tiller_diffusion::pipeline::TextToImage;
use tiller_diffusion::schedulers::{DdimConfig, FlowMatchConfig, SchedulerConfig};
use tiller_eval::SampleSettings;
use tiller_reward::Reward;
use tiller_testbed::Tokenizer;

/// How the chain steps: deterministically or with fresh noise at every step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Sampler {
    /// DDIM with eta = 0: deterministic given the initial noise.
    Ddim,
    /// Ancestral: DDIM with eta = 1 (DDPM's posterior variance), or the DDPM scheduler itself;
    /// for a flow-matching model, the Flow-GRPO SDE (the ODE's marginals, fresh noise each step).
    #[value(alias = "ddpm")]
    Ancestral,
}

/// Sampling flags shared by `sample`, `eval` and `feedback collect`. Unset flags take the model
/// folder's recommendation (`tiller_sampling.json`), else 50 steps of DDIM at guidance 3.
#[derive(Args, Clone, Default)]
pub struct SamplingArgs {
    /// Denoising steps [default: the model's recommendation, else 50].
    #[arg(long)]
    pub steps: Option<usize>,
    /// The sampler [default: the model's recommendation, else ddim].
    #[arg(long, visible_alias = "scheduler", value_enum)]
    pub sampler: Option<Sampler>,
    /// Classifier-free guidance scale, 1 = no guidance [default: the model's recommendation,
    /// else 3].
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Images per model call (speed only: every image has its own noise stream).
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Image size; must be the model's (the error says which it is).
    #[arg(long)]
    pub resolution: Option<usize>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl SamplingArgs {
    /// Fixed settings (what `quickstart` uses for every stage).
    pub fn fixed(steps: usize, sampler: Sampler, guidance: f64) -> Self {
        Self {
            steps: Some(steps),
            sampler: Some(sampler),
            guidance: Some(guidance),
            batch: 32,
            resolution: None,
            device: "cpu".into(),
        }
    }

    /// The sampler, built on the model's own noise schedule: the flags, else the model folder's
    /// recommendation, else the defaults.
    pub fn settings(&self, pipe: &TextToImage) -> Result<SampleSettings> {
        let rec = pipe.recommended;
        let eta = match self.sampler {
            Some(Sampler::Ddim) => 0.0,
            Some(Sampler::Ancestral) => 1.0,
            None => rec.map_or(0.0, |r| r.eta),
        };
        let scheduler = match &pipe.scheduler {
            SchedulerConfig::Ddim(c) => SchedulerConfig::Ddim(DdimConfig { eta, ..c.clone() }),
            SchedulerConfig::Ddpm(c) if eta == 1.0 => SchedulerConfig::Ddpm(c.clone()),
            // A flow-matching model: the Euler ODE (eta 0), or with --sampler ancestral (eta 1)
            // the Flow-GRPO SDE, which has the ODE's marginals, at the config's noise level or
            // its default.
            SchedulerConfig::FlowMatch(c) if eta == 0.0 || eta == 1.0 => {
                SchedulerConfig::FlowMatch(FlowMatchConfig {
                    sde: (eta == 1.0).then(|| c.sde.clone().unwrap_or_default()),
                    ..c.clone()
                })
            }
            other => bail!(
                "--sampler with eta {eta}: the model's scheduler is {:?}; a DDIM schedule samples \
                 either way, a DDPM schedule only with --sampler ancestral",
                other.kind()
            ),
        };
        Ok(SampleSettings {
            scheduler,
            steps: self.steps.or(rec.map(|r| r.steps)).unwrap_or(50),
            guidance: self.guidance.or(rec.map(|r| r.guidance)).unwrap_or(3.0),
            batch: self.batch,
        })
    }
}

/// `--seed` and `--device` for the commands configured by a TOML file (`align`, `compare`,
/// `reward train | pretrain`, `base train`): each becomes an override of the config's own key,
/// applied after every `--set`, so the flag wins.
#[derive(Args, Clone, Default)]
pub struct RunFlags {
    /// The run's seed [default: the config's].
    #[arg(long)]
    pub seed: Option<u64>,
    /// `cpu`, or `cuda` / `cuda:N` in a CUDA build [default: the config's].
    #[arg(long)]
    pub device: Option<String>,
}

impl RunFlags {
    /// `overrides` followed by the flags as `seed_key=N` and `device="..."`.
    pub fn apply(&self, overrides: &[String], seed_key: &str) -> Vec<String> {
        let mut out = overrides.to_vec();
        if let Some(seed) = self.seed {
            out.push(format!("{seed_key}={seed}"));
        }
        if let Some(device) = &self.device {
            out.push(format!("device={}", toml::Value::String(device.clone())));
        }
        out
    }
}

/// Best-of-N flags shared by `sample` and `eval`.
#[derive(Args, Clone)]
pub struct BestOfArgs {
    /// Best-of-N: sample N candidates per image and keep the one `--reward` scores highest.
    #[arg(long, default_value_t = 1)]
    pub best_of: usize,
    /// The reward that picks among the candidates: `gold`, `jpeg` or a reward model folder.
    #[arg(long, default_value = "gold")]
    pub reward: String,
}

/// A model as every command takes it: a pipeline folder, an alignment run (`runs/<id>`) or one
/// of its checkpoints; shipped paths (`assets/...`) are found from any directory.
pub fn load_model(model: &Path, device: &Device) -> Result<(TextToImage, Tokenizer)> {
    let located = crate::shipped::resolve(model);
    if !located.exists() {
        return Err(crate::shipped::missing(&located, "the model folder"));
    }
    tiller_align::run::load_model(&located, device, &crate::shipped::resolve)
        .with_context(|| format!("loading the model {}", located.display()))
}

/// A reward as `--reward` names it (`tiller_reward::load::load`); shipped paths are found from
/// any directory.
pub fn load_reward(spec: &str, tokenizer: &Tokenizer, device: &Device) -> Result<Box<dyn Reward>> {
    let located = tiller_align::run::locate_spec(spec, &crate::shipped::resolve);
    tiller_reward::load::load(&located, tokenizer, device)
        .with_context(|| format!("--reward {spec}"))
}
