//! A text-to-image model as one folder in diffusers' pipeline layout:
//!
//! ```text
//! <folder>/model_index.json                 components and their classes
//! <folder>/unet/config.json + diffusion_pytorch_model.safetensors
//! <folder>/text_encoder/config.json + model.safetensors
//! <folder>/tokenizer/tokenizer.json         Hugging Face tokenizers format
//! <folder>/scheduler/scheduler_config.json
//! <folder>/tiller_sampling.json             optional: the recommended sampler (Tiller's; diffusers
//!                                           ignores it)
//! ```
//!
//! Each part loads in Python as it is (`UNet2DConditionModel.from_pretrained(f, subfolder="unet")`,
//! `CLIPTextModel.from_pretrained(f, subfolder="text_encoder")`, `Tokenizer.from_file(...)`). There
//! is no VAE: Tiller's testbed models work in pixel space. Tokenisation is the caller's (the
//! tokenizer file is stored and returned as text), so this crate stays independent of any one
//! vocabulary.

use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::{load_clip_text, load_unet, save_clip_text, save_unet, weights::atomic_write};
use crate::schedulers::SchedulerConfig;
use burn::tensor::{Device, Tensor};
use std::path::Path;
use tiller_core::{Error, Result};

/// The pipeline class name written to `model_index.json`.
pub const PIPELINE_CLASS: &str = "TillerPixelPipeline";

/// The file holding a pipeline's [`RecommendedSampling`].
pub const SAMPLING_FILE: &str = "tiller_sampling.json";

/// How a pipeline's author recommends sampling it: the step count, DDIM's eta (0 deterministic,
/// 1 ancestral) and the classifier-free guidance scale. Commands use it unless told otherwise,
/// so a model's documented numbers come back from its folder alone.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecommendedSampling {
    pub steps: usize,
    pub eta: f64,
    pub guidance: f64,
}

impl RecommendedSampling {
    /// The folder's recommendation, if it has one.
    pub fn read(folder: &Path) -> Result<Option<Self>> {
        let path = folder.join(SAMPLING_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let r: Self = tiller_core::config::from_json_file(&path)?;
        if r.steps == 0 || !(0.0..=1.0).contains(&r.eta) || !r.guidance.is_finite() {
            return Err(Error::format(
                &path,
                format!("steps must be >= 1, eta in [0, 1], guidance finite; got {r:?}"),
            ));
        }
        Ok(Some(r))
    }
}

/// Text encoder, UNet and scheduler of one text-to-image model.
#[derive(Debug, Clone)]
pub struct TextToImage {
    pub text_config: ClipTextConfig,
    pub text_encoder: ClipTextModel,
    pub unet_config: UNet2DConditionConfig,
    pub unet: UNet2DConditionModel,
    pub scheduler: SchedulerConfig,
    /// From the folder's `tiller_sampling.json`; `None` when it has none.
    pub recommended: Option<RecommendedSampling>,
}

impl TextToImage {
    /// Loads a pipeline folder; returns the model and the tokenizer file's text.
    pub fn load(folder: &Path, device: &Device) -> Result<(Self, String)> {
        let index = folder.join("model_index.json");
        if !index.exists() {
            return Err(Error::format(
                folder,
                "not a pipeline folder: no model_index.json (expected unet/, text_encoder/, tokenizer/, scheduler/)",
            ));
        }
        let (unet_config, unet) = load_unet(&folder.join("unet"), None, device)?;
        let (text_config, text_encoder) =
            load_clip_text(&folder.join("text_encoder"), None, device)?;
        let scheduler =
            SchedulerConfig::from_diffusers_json(folder.join("scheduler/scheduler_config.json"))?;
        let tok_path = folder.join("tokenizer/tokenizer.json");
        let tokenizer = std::fs::read_to_string(&tok_path).map_err(|e| Error::io(&tok_path, e))?;
        let recommended = RecommendedSampling::read(folder)?;
        Ok((
            Self {
                text_config,
                text_encoder,
                unet_config,
                unet,
                scheduler,
                recommended,
            },
            tokenizer,
        ))
    }

    /// Writes the pipeline folder (every file atomically).
    pub fn save(&self, folder: &Path, tokenizer_json: &str) -> Result<()> {
        save_unet(&folder.join("unet"), &self.unet_config, &self.unet)?;
        save_clip_text(
            &folder.join("text_encoder"),
            &self.text_config,
            &self.text_encoder,
        )?;
        atomic_write(
            &folder.join("tokenizer/tokenizer.json"),
            tokenizer_json.as_bytes(),
        )?;
        let sched = serde_json::to_string_pretty(&self.scheduler.to_diffusers_json())
            .map_err(|e| Error::invalid(e.to_string()))?;
        atomic_write(
            &folder.join("scheduler/scheduler_config.json"),
            sched.as_bytes(),
        )?;
        let scheduler_class = self
            .scheduler
            .to_diffusers_json()
            .get("_class_name")
            .and_then(|c| c.as_str())
            .unwrap_or("DDIMScheduler")
            .to_string();
        let index = serde_json::json!({
            "_class_name": PIPELINE_CLASS,
            "unet": ["diffusers", "UNet2DConditionModel"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
            "scheduler": ["diffusers", scheduler_class],
        });
        if let Some(r) = &self.recommended {
            let text =
                serde_json::to_string_pretty(r).map_err(|e| Error::invalid(e.to_string()))?;
            atomic_write(&folder.join(SAMPLING_FILE), text.as_bytes())?;
        }
        let text =
            serde_json::to_string_pretty(&index).map_err(|e| Error::invalid(e.to_string()))?;
        atomic_write(&folder.join("model_index.json"), text.as_bytes())
    }

    /// The UNet's conditioning for token ids: the text encoder's last hidden state [B, L, D].
    pub fn encode(&self, input_ids: &[Vec<i64>], device: &Device) -> Result<Tensor<3>> {
        Ok(self
            .text_encoder
            .forward_ids(input_ids, device)?
            .last_hidden_state)
    }

    /// The image size the UNet was configured for (`sample_size`).
    pub fn resolution(&self) -> Option<usize> {
        self.unet_config.sample_size
    }
}
