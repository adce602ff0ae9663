//! The typed configuration of an alignment run (`tiller align --config <toml>`).
//!
//! Every section has defaults; a preset file writes only what differs (overrides only), and
//! `--set section.key=value` overrides a preset. Unknown keys are errors that list the valid ones.
//! Method defaults cite the paper or reference code they come from.

use crate::methods::Method;
use serde::{Deserialize, Serialize};
use tiller_diffusion::models::lora::LoraConfig;
use tiller_engine::optim::ClipScope;
use tiller_engine::schedule::LrShape;
use tiller_testbed::Task;

/// One alignment run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlignConfig {
    /// `[method.<name>]` with the method's settings (`crate::methods`), or `method = "<name>"`
    /// for its defaults.
    pub method: Method,
    /// The starting pipeline folder (diffusers layout).
    #[serde(default = "default_base")]
    pub base: String,
    /// The reward the method optimises: `gold`, `jpeg` or a reward-model folder. DRaFT-K needs a
    /// differentiable one (a reward model); Diffusion-DPO reads pairs instead.
    #[serde(default = "default_reward")]
    pub reward: String,
    #[serde(default = "default_device")]
    pub device: String,
    #[serde(default)]
    pub adapter: AdapterSection,
    #[serde(default)]
    pub train: AlignTrainSection,
    #[serde(default)]
    pub sampling: SamplingSection,
    #[serde(default)]
    pub prompts: PromptsSection,
    #[serde(default)]
    pub log: AlignLogSection,
    #[serde(default, skip_serializing_if = "PretrainSection::is_default")]
    pub pretrain: PretrainSection,
}

fn default_base() -> String {
    "assets/testbed-base".into()
}
fn default_reward() -> String {
    "assets/testbed-reward".into()
}
fn default_device() -> String {
    "cpu".into()
}

/// What is trained: LoRA adapters on the UNet's attention projections, or the whole UNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterKind {
    Lora,
    Full,
}

/// `[adapter]`: LoRA rank 4 on `to_q, to_k, to_v, to_out.0`, as DDPO's and diffusers' DPO scripts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdapterSection {
    pub kind: AdapterKind,
    pub rank: usize,
    pub alpha: f64,
    pub target_modules: Vec<String>,
}

impl Default for AdapterSection {
    fn default() -> Self {
        let l = LoraConfig::default();
        Self {
            kind: AdapterKind::Lora,
            rank: l.rank,
            alpha: l.alpha,
            target_modules: l.target_modules,
        }
    }
}

impl AdapterSection {
    pub fn lora(&self) -> LoraConfig {
        LoraConfig {
            rank: self.rank,
            alpha: self.alpha,
            target_modules: self.target_modules.clone(),
        }
    }
}

/// `[train]`: the optimiser and the batch. Effective batch = `batch_size * grad_accum`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlignTrainSection {
    /// Optimizer updates in the run.
    pub updates: u64,
    /// Examples per micro-batch (rollouts, pairs or chains).
    pub batch_size: usize,
    /// Micro-batches accumulated into one update.
    pub grad_accum: usize,
    /// Rollouts (or DRaFT chains) per drawn prompt: each update draws `effective batch /
    /// images_per_prompt` prompts and samples each this many times, side by side (flow_grpo's
    /// `num_image_per_prompt`, TRL GRPO's `num_generations`). 1 (ddpo-pytorch) draws every
    /// rollout's prompt independently. With groups, DDPO's per-prompt statistics compare images
    /// of one prompt even when prompts rarely repeat across updates (set `method.ddpo.stat_min_count`
    /// to the group size). Must divide the effective batch; refused for Diffusion-DPO, which
    /// samples nothing.
    pub images_per_prompt: usize,
    /// Stop once the loop has spent this many reward queries (rollout scores, reward gradients;
    /// 0: no budget). Labels bought before training (Diffusion-DPO's comparisons) are capped by
    /// `method.diffusion-dpo.max_comparisons` instead.
    pub reward_budget: u64,
    pub learning_rate: f64,
    pub warmup_steps: u64,
    pub lr_schedule: LrShape,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub weight_decay: f64,
    /// Gradient-norm clip (DDPO: 1.0); 0 disables.
    pub max_grad_norm: f64,
    /// `global` (torch's `clip_grad_norm_`, as accelerate applies it; the default) or
    /// `per_tensor` (burn's optimizer clipping, this loop's behaviour before 2026-11-29).
    pub grad_clip: ClipScope,
    /// Weight of the per-step Gaussian KL to the reference model (DPOK / Flow-GRPO style);
    /// 0 disables. Applies to DDPO (every trained step) and DRaFT-K (every differentiated step);
    /// Diffusion-DPO is regularised by its own beta.
    pub kl_weight: f64,
    /// The run's one seed.
    pub seed: u64,
}

impl Default for AlignTrainSection {
    fn default() -> Self {
        // ddpo-pytorch config/base.py: Adam lr 3e-4 (LoRA), betas 0.9/0.999, eps 1e-8, wd 1e-4,
        // max grad norm 1.0.
        Self {
            updates: 20,
            batch_size: 8,
            grad_accum: 1,
            images_per_prompt: 1,
            reward_budget: 0,
            learning_rate: 3e-4,
            warmup_steps: 0,
            lr_schedule: LrShape::Constant,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            weight_decay: 1e-4,
            max_grad_norm: 1.0,
            grad_clip: ClipScope::Global,
            kl_weight: 0.0,
            seed: 0,
        }
    }
}

impl AlignTrainSection {
    pub fn effective_batch(&self) -> usize {
        self.batch_size * self.grad_accum
    }
}

/// `[sampling]`: the chain used for rollouts, DRaFT's differentiable samples and validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingSection {
    /// DDIM steps (DDPO: 50 on SD; 20 on the testbed).
    pub steps: usize,
    /// DDIM eta; DDPO needs stochastic steps (eta = 1, ddpo-pytorch's default).
    pub eta: f64,
    /// Classifier-free guidance scale; 1 = one conditional pass per step.
    pub guidance: f64,
    /// Image side in pixels; 0 (the default) takes the base's (the testbed's 32; a Stable
    /// Diffusion folder's UNet `sample_size` times the VAE's scale factor: 512 for SD 1.5).
    #[serde(skip_serializing_if = "is_zero")]
    pub resolution: usize,
}

fn is_zero(v: &usize) -> bool {
    *v == 0
}

impl Default for SamplingSection {
    fn default() -> Self {
        Self {
            steps: 20,
            eta: 1.0,
            guidance: 3.0,
            resolution: 0,
        }
    }
}

/// `[prompts]`: the training prompts (the testbed's train split) and the validation prompts (its
/// held-out test split); or, for a Stable Diffusion base, a prompt file of the user's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PromptsSection {
    pub tasks: Vec<Task>,
    /// Training prompts per task drawn from the train split.
    pub train_per_task: usize,
    /// Validation prompts per task from the held-out test split.
    pub val_per_task: usize,
    /// Validation images per prompt (fixed seeds).
    pub val_per_prompt: usize,
    /// A file of training prompts for a Stable Diffusion base: text, one per line (blank lines
    /// and lines starting with `#` skipped), or a CSV with a `prompt` column (CoProV2's test set,
    /// I2P); empty: the testbed's prompts of `tasks`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub file: String,
    /// Only the CSV rows of these categories (its `category` or `categories` column, e.g.
    /// CoProV2's `Hate`: one SafetyDPO expert's prompts); empty: every row.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub categories: Vec<String>,
    /// Validation prompts in the same format; empty with `file`: the last `val_per_task` lines
    /// of `file` are held out of training and validated on.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub val_file: String,
}

impl Default for PromptsSection {
    fn default() -> Self {
        Self {
            tasks: Task::ALL
                .iter()
                .copied()
                .filter(|t| *t != Task::Unsafe)
                .collect(),
            train_per_task: 200,
            val_per_task: 6,
            val_per_prompt: 2,
            file: String::new(),
            categories: Vec::new(),
            val_file: String::new(),
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlignLogSection {
    /// Validate (gold and proxy reward on held-out prompts, a grid) every this many updates
    /// and at the start and the end; 0: only start and end.
    pub val_every: u64,
    pub checkpoint_every: u64,
    pub keep_checkpoints: usize,
}

impl Default for AlignLogSection {
    fn default() -> Self {
        Self {
            val_every: 10,
            checkpoint_every: 10,
            keep_checkpoints: 2,
        }
    }
}

/// Where the base model's own training data comes from (`[pretrain]`), for the methods that
/// regularise with it: ReFL's pre-training loss and reward-weighted likelihood's
/// (`crate::pretraining` reads it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PretrainData {
    /// The testbed renderer's images of the training prompts (what the shipped base learnt).
    #[default]
    Testbed,
    /// An image folder in the Hugging Face `imagefolder` layout diffusers' `train_text_to_image.py`
    /// reads: images beside `metadata.jsonl` (`file_name` and a caption column per line).
    Folder,
    /// Every image a preference store holds feedback on in `split`, with its prompt.
    Store,
}

/// `[pretrain]`: `source = "testbed"` (the default), or `source = "folder"` / `"store"` with
/// `path`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainSection {
    pub source: PretrainData,
    /// The image folder or the store (a folder with `preferences.sqlite`).
    pub path: String,
    /// The caption key in `metadata.jsonl` (diffusers' `--caption_column`, default `text`); a list
    /// of captions gives one at random per example, as diffusers does in training.
    pub caption_column: String,
    /// The store's split: `train` or `test`.
    pub split: String,
}

impl Default for PretrainSection {
    fn default() -> Self {
        Self {
            source: PretrainData::Testbed,
            path: String::new(),
            caption_column: "text".into(),
            split: "train".into(),
        }
    }
}

impl PretrainSection {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }

    fn validate(&self) -> tiller_core::Result<()> {
        use tiller_core::Error;
        match self.source {
            PretrainData::Testbed if !self.path.is_empty() => Err(Error::config(
                "pretrain.path",
                "applies to `source = \"folder\"` or `\"store\"`; the testbed renders its own",
            )),
            PretrainData::Folder | PretrainData::Store if self.path.is_empty() => Err(
                Error::config("pretrain.path", "must name the image folder or the store"),
            ),
            PretrainData::Folder if self.caption_column.is_empty() => Err(Error::config(
                "pretrain.caption_column",
                "must name the caption key of metadata.jsonl",
            )),
            PretrainData::Store if !["train", "test"].contains(&self.split.as_str()) => {
                Err(Error::config(
                    "pretrain.split",
                    format!("must be `train` or `test`, got {:?}", self.split),
                ))
            }
            _ => Ok(()),
        }
    }
}

impl AlignConfig {
    /// Checks what serde cannot; errors name the field.
    pub fn validate(&self) -> tiller_core::Result<()> {
        use tiller_core::Error;
        let t = &self.train;
        let bad = |field: &str, msg: String| Err(Error::config(field, msg));
        if t.batch_size == 0 {
            return bad("train.batch_size", "must be at least 1".into());
        }
        if t.grad_accum == 0 {
            return bad("train.grad_accum", "must be at least 1".into());
        }
        if t.images_per_prompt == 0 || !t.effective_batch().is_multiple_of(t.images_per_prompt) {
            return bad(
                "train.images_per_prompt",
                format!(
                    "must be at least 1 and divide the effective batch {} (batch_size x grad_accum), got {}",
                    t.effective_batch(),
                    t.images_per_prompt
                ),
            );
        }
        if !(t.learning_rate > 0.0 && t.learning_rate.is_finite()) {
            return bad(
                "train.learning_rate",
                format!("must be positive, got {}", t.learning_rate),
            );
        }
        if !(t.kl_weight >= 0.0 && t.kl_weight.is_finite()) {
            return bad(
                "train.kl_weight",
                format!("must be >= 0, got {}", t.kl_weight),
            );
        }
        let method = self.method.spec();
        if !method.samples() && t.images_per_prompt > 1 {
            return bad(
                "train.images_per_prompt",
                format!(
                    "applies to methods that sample; {}'s data comes from the store",
                    method.name()
                ),
            );
        }
        if !method.takes_kl() && t.kl_weight > 0.0 {
            return bad(
                "train.kl_weight",
                format!(
                    "{} has no per-step KL term (its own settings set how far it moves)",
                    method.name()
                ),
            );
        }
        if self.sampling.steps == 0 {
            return bad("sampling.steps", "must be at least 1".into());
        }
        if self.adapter.kind == AdapterKind::Lora && self.adapter.rank == 0 {
            return bad("adapter.rank", "must be at least 1".into());
        }
        if self.prompts.file.is_empty() && !self.prompts.val_file.is_empty() {
            return bad(
                "prompts.val_file",
                "goes with prompts.file (the training prompts)".into(),
            );
        }
        if self.prompts.file.is_empty() && !self.prompts.categories.is_empty() {
            return bad(
                "prompts.categories",
                "selects rows of prompts.file (a CSV with a category column)".into(),
            );
        }
        if self.prompts.tasks.is_empty() {
            return bad("prompts.tasks", "must name at least one task".into());
        }
        self.pretrain.validate()?;
        method.validate(self)
    }
}
