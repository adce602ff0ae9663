//! Stable Diffusion 1.x and 2.x (Rombach et al. 2022) and SDXL (Podell et al. 2023) from a folder
//! saved by diffusers' `StableDiffusionPipeline` / `StableDiffusionXLPipeline.save_pretrained`:
//!
//! ```text
//! <folder>/model_index.json        "_class_name": "StableDiffusionPipeline" and its components
//! <folder>/tokenizer/              CLIPTokenizer (tokenizer.json, or vocab.json + merges.txt)
//! <folder>/text_encoder/           CLIPTextModel (transformers 4 or 5 names)
//! <folder>/unet/                   UNet2DConditionModel
//! <folder>/vae/                    AutoencoderKL
//! <folder>/scheduler/              scheduler_config.json
//! <folder>/tokenizer_2/            SDXL: the second CLIPTokenizer
//! <folder>/text_encoder_2/         SDXL: CLIPTextModelWithProjection
//! ```
//!
//! `safety_checker`, `feature_extractor` and `image_encoder` may be listed (as `[null, null]` when
//! the pipeline was saved without them, or as classes Tiller does not load); they are not read.
//! Sampling follows the pipeline's `__call__` for the default arguments: prompts tokenised to
//! `model_max_length`, the text encoder's last hidden state as the UNet's context, the empty
//! prompt as the negative one, classifier-free guidance when the scale is above 1, the chain in
//! latent space from the given latents, then `vae.decode(latents / scaling_factor)` mapped from
//! [-1, 1] to [0, 1] and clamped (`VaeImageProcessor.postprocess`).
//!
//! SDXL differs where its pipeline does: the context is both encoders' penultimate hidden states
//! side by side, the UNet's added conditioning is the second encoder's projected pooled output
//! and the time ids `(height, width, 0, 0, height, width)` (original size, crop top-left, target
//! size at their defaults), and with `force_zeros_for_empty_prompt` (the default) the
//! unconditional half is zeros rather than the encoded empty prompt.

use crate::clip_tokenizer::ClipTokenizer;
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::unet::{AddedConditions, UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig, LatentSpace};
use crate::models::{load_clip_text, load_unet, load_vae};
use crate::sampling::{Conditioning, ExampleNoise, NoiseSource, Record, initial_noise, sample};
use crate::schedulers::{Scheduler, SchedulerConfig};
use burn::tensor::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;
use tiller_core::{Error, Result, SeededRng};

/// diffusers' class name of SD 1.x/2.x pipelines.
pub const SD_PIPELINE_CLASS: &str = "StableDiffusionPipeline";
/// diffusers' class name of SDXL pipelines.
pub const SDXL_PIPELINE_CLASS: &str = "StableDiffusionXLPipeline";

/// The components a `StableDiffusionPipeline` must have, with the class each must be.
const REQUIRED: &[(&str, &[&str])] = &[
    ("tokenizer", &["CLIPTokenizer", "CLIPTokenizerFast"]),
    ("text_encoder", &["CLIPTextModel"]),
    ("unet", &["UNet2DConditionModel"]),
    ("vae", &["AutoencoderKL"]),
    // Read as DDIM's config whichever of these it is (`DDIMScheduler.from_config`): the noise
    // schedule is theirs, the sampler DDIM.
    (
        "scheduler",
        &[
            "DDIMScheduler",
            "PNDMScheduler",
            "DDPMScheduler",
            "EulerDiscreteScheduler",
            "EulerAncestralDiscreteScheduler",
        ],
    ),
];

/// What an SDXL pipeline needs besides [`REQUIRED`].
const REQUIRED_XL: &[(&str, &[&str])] = &[
    ("tokenizer_2", &["CLIPTokenizer", "CLIPTokenizerFast"]),
    ("text_encoder_2", &["CLIPTextModelWithProjection"]),
];

/// A diffusers `model_index.json`: the pipeline class and each component's `[library, class]`
/// (`None` for components saved as `[null, null]`).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelIndex {
    pub class_name: String,
    pub components: BTreeMap<String, Option<(String, String)>>,
    /// The pipeline's options (`requires_safety_checker`, `force_zeros_for_empty_prompt`).
    pub options: BTreeMap<String, serde_json::Value>,
}

impl ModelIndex {
    /// Reads `<folder>/model_index.json`.
    pub fn read(folder: &Path) -> Result<Self> {
        let path = folder.join("model_index.json");
        if !path.exists() {
            return Err(Error::format(
                folder,
                "not a diffusers pipeline folder: no model_index.json (save one with \
                 `pipe.save_pretrained(folder)` in diffusers)",
            ));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(&path, format!("not valid JSON: {e}")))?;
        let object = value
            .as_object()
            .ok_or_else(|| Error::format(&path, "expected a JSON object"))?;
        let class_name = object
            .get("_class_name")
            .and_then(|c| c.as_str())
            .ok_or_else(|| Error::format(&path, "no `_class_name` string"))?
            .to_string();
        let mut components = BTreeMap::new();
        let mut options = BTreeMap::new();
        for (key, v) in object {
            if key.starts_with('_') {
                continue;
            }
            // Options are scalars; components are [library, class] pairs.
            let Some(pair) = v.as_array() else {
                options.insert(key.clone(), v.clone());
                continue;
            };
            let entry = match pair.as_slice() {
                [serde_json::Value::Null, serde_json::Value::Null] => None,
                [
                    serde_json::Value::String(lib),
                    serde_json::Value::String(class),
                ] => Some((lib.clone(), class.clone())),
                _ => {
                    return Err(Error::format(
                        &path,
                        format!("`{key}` should be [library, class] or [null, null], found {v}"),
                    ));
                }
            };
            components.insert(key.clone(), entry);
        }
        Ok(Self {
            class_name,
            components,
            options,
        })
    }

    /// The class of component `name`, if it is listed and not null.
    pub fn class_of(&self, name: &str) -> Option<&str> {
        self.components
            .get(name)
            .and_then(|c| c.as_ref())
            .map(|(_, class)| class.as_str())
    }
}

/// True when `folder` holds a `StableDiffusionPipeline` or `StableDiffusionXLPipeline` (by its
/// `model_index.json`).
pub fn is_stable_diffusion(folder: &Path) -> bool {
    ModelIndex::read(folder)
        .is_ok_and(|i| [SD_PIPELINE_CLASS, SDXL_PIPELINE_CLASS].contains(&i.class_name.as_str()))
}

/// SDXL's second tokenizer and text encoder, and its negative-prompt option.
#[derive(Debug, Clone)]
pub struct XlParts {
    pub tokenizer_2: ClipTokenizer,
    pub text_config_2: ClipTextConfig,
    pub text_encoder_2: ClipTextModel,
    /// `force_zeros_for_empty_prompt` of `model_index.json` (diffusers' default true): without a
    /// negative prompt, guidance's unconditional half is zeros.
    pub force_zeros_for_empty_prompt: bool,
}

/// A prompt batch encoded for the UNet.
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    /// [B, L, D]: the UNet's context.
    pub context: Tensor<3>,
    /// [B, P]: SDXL's pooled embedding (`text_embeds` of the second encoder).
    pub pooled: Option<Tensor<2>>,
}

/// A Stable Diffusion pipeline: tokenizer, text encoder, UNet, VAE and scheduler, and for SDXL
/// the second tokenizer and text encoder.
#[derive(Debug, Clone)]
pub struct StableDiffusion {
    pub tokenizer: ClipTokenizer,
    pub text_config: ClipTextConfig,
    pub text_encoder: ClipTextModel,
    pub unet_config: UNet2DConditionConfig,
    pub unet: UNet2DConditionModel,
    pub vae_config: AutoencoderKLConfig,
    pub vae: AutoencoderKL,
    /// The folder's scheduler config, read as DDIM (as DDPO and diffusers' `from_config` swap
    /// SD 1.x's PNDM for DDIM); sample with another by replacing it.
    pub scheduler: SchedulerConfig,
    /// SDXL's parts; `None` for SD 1.x/2.x.
    pub xl: Option<XlParts>,
    /// The folder's `model_index.json`.
    pub index: ModelIndex,
}

impl StableDiffusion {
    /// Loads a `StableDiffusionPipeline` or `StableDiffusionXLPipeline` folder. Errors name the
    /// file at fault and how to fix it.
    pub fn load(folder: &Path, device: &Device) -> Result<Self> {
        let index = ModelIndex::read(folder)?;
        let index_path = folder.join("model_index.json");
        let is_xl = match index.class_name.as_str() {
            SD_PIPELINE_CLASS => false,
            SDXL_PIPELINE_CLASS => true,
            other => {
                return Err(Error::format(
                    &index_path,
                    format!(
                        "`_class_name` is {other}; this loader reads {SD_PIPELINE_CLASS} (SD 1.x \
                         and 2.x) and {SDXL_PIPELINE_CLASS}"
                    ),
                ));
            }
        };
        let required = REQUIRED.iter().chain(if is_xl { REQUIRED_XL } else { &[] });
        check_components(
            folder,
            &index,
            required,
            " (it samples with DDIM on the config's noise schedule: save a DDIMScheduler config \
             in scheduler/)",
        )?;
        let tokenizer = ClipTokenizer::from_folder(&folder.join("tokenizer"))?;
        let (text_config, text_encoder) =
            load_clip_text(&folder.join("text_encoder"), None, device)?;
        let (unet_config, unet) = load_unet(&folder.join("unet"), None, device)?;
        let (vae_config, vae) = load_vae(&folder.join("vae"), None, device)?;
        let scheduler_path = folder.join("scheduler/scheduler_config.json");
        let mut scheduler = SchedulerConfig::from_diffusers_json_as(
            &scheduler_path,
            crate::schedulers::SchedulerKind::Ddim,
        )?;
        // DDIM's default `clip_sample: true` clamps x̂_0 to [-1, 1], which is wrong for latents;
        // the Euler and PNDM samplers never clip. A config of theirs that does not say is read
        // unclipped. (`SchedulerConfig::from_diffusers_json_as` keeps `from_config`'s DDIM default,
        // which DDPO's parity with ddpo-pytorch relies on; latent pipelines must not clip.)
        if let SchedulerConfig::Ddim(c) = &mut scheduler
            && matches!(
                index.class_of("scheduler"),
                Some(
                    "PNDMScheduler" | "EulerDiscreteScheduler" | "EulerAncestralDiscreteScheduler"
                )
            )
            && !config_has_key(&scheduler_path, "clip_sample")?
        {
            c.clip_sample = false;
        }
        let xl = if is_xl {
            let (text_config_2, text_encoder_2) =
                load_clip_text(&folder.join("text_encoder_2"), None, device)?;
            let force_zeros = match index.options.get("force_zeros_for_empty_prompt") {
                None => true,
                Some(serde_json::Value::Bool(b)) => *b,
                Some(other) => {
                    return Err(Error::format(
                        &index_path,
                        format!(
                            "`force_zeros_for_empty_prompt` should be true or false, found {other}"
                        ),
                    ));
                }
            };
            Some(XlParts {
                tokenizer_2: ClipTokenizer::from_folder(&folder.join("tokenizer_2"))?,
                text_config_2,
                text_encoder_2,
                force_zeros_for_empty_prompt: force_zeros,
            })
        } else {
            None
        };
        let sd = Self {
            tokenizer,
            text_config,
            text_encoder,
            unet_config,
            unet,
            vae_config,
            vae,
            scheduler,
            xl,
            index,
        };
        sd.check_consistency(folder)?;
        Ok(sd)
    }

    /// Checks that the components fit together, naming the two files that disagree.
    fn check_consistency(&self, folder: &Path) -> Result<()> {
        let file = |c: &str| folder.join(c).join("config.json");
        let mismatch = |a: &str, b: &str, what: String| -> Result<()> {
            Err(component_mismatch(folder, a, b, what))
        };
        let (context_width, encoders) = match &self.xl {
            None => (self.text_config.hidden_size, "text_encoder"),
            Some(xl) => (
                self.text_config.hidden_size + xl.text_config_2.hidden_size,
                "text_encoder_2",
            ),
        };
        if self.unet_config.cross_attention_dim != context_width {
            return mismatch(
                "unet",
                encoders,
                format!(
                    "cross_attention_dim {} differs from the text encoders' hidden width {}",
                    self.unet_config.cross_attention_dim, context_width
                ),
            );
        }
        match (&self.xl, self.unet_config.pooled_text_dim()) {
            (None, None) => {}
            (None, Some(_)) => {
                return Err(Error::format(
                    file("unet"),
                    "this UNet takes SDXL's text_time conditioning; load it in a \
                     StableDiffusionXLPipeline folder",
                ));
            }
            (Some(_), None) => {
                return Err(Error::format(
                    file("unet"),
                    "an SDXL pipeline's UNet needs addition_embed_type \"text_time\"",
                ));
            }
            (Some(xl), Some(pooled)) if pooled != xl.text_config_2.projection_dim => {
                return mismatch(
                    "unet",
                    "text_encoder_2",
                    format!(
                        "projection_class_embeddings_input_dim leaves {pooled} for the pooled \
                         embedding, the second text encoder's projection_dim is {}",
                        xl.text_config_2.projection_dim
                    ),
                );
            }
            (Some(_), Some(_)) => {}
        }
        if let Some(xl) = &self.xl
            && xl.tokenizer_2.max_length() != self.tokenizer.max_length()
        {
            return Err(Error::format(
                folder.join("tokenizer_2/tokenizer_config.json"),
                format!(
                    "model_max_length {} differs from tokenizer/'s {}; the two encoders' states \
                     are concatenated position by position",
                    xl.tokenizer_2.max_length(),
                    self.tokenizer.max_length()
                ),
            ));
        }
        if self.unet_config.in_channels != self.vae_config.latent_channels {
            return mismatch(
                "unet",
                "vae",
                format!(
                    "in_channels {} differs from the VAE's latent_channels {}",
                    self.unet_config.in_channels, self.vae_config.latent_channels
                ),
            );
        }
        if self.tokenizer.max_length() > self.text_config.max_position_embeddings {
            return mismatch(
                "text_encoder",
                "tokenizer",
                format!(
                    "max_position_embeddings {} is below the tokenizer's model_max_length {}",
                    self.text_config.max_position_embeddings,
                    self.tokenizer.max_length()
                ),
            );
        }
        if self.tokenizer.vocab_size() > self.text_config.vocab_size {
            return mismatch(
                "text_encoder",
                "tokenizer",
                format!(
                    "vocab_size {} is below the tokenizer's {} ids",
                    self.text_config.vocab_size,
                    self.tokenizer.vocab_size()
                ),
            );
        }
        Ok(())
    }

    /// The VAE's spatial downsampling (`vae_scale_factor`: 8 for SD).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae_config.downsampling_factor()
    }

    /// The default image side: the UNet's `sample_size` times the VAE's scale factor (512 for
    /// SD 1.5, 768 for SD 2.1).
    pub fn default_resolution(&self) -> Result<usize> {
        self.unet_config
            .sample_size
            .map(|s| s * self.vae_scale_factor())
            .ok_or_else(|| Error::config("unet.sample_size", "the UNet config has no sample_size"))
    }

    /// The latent shape [B, C, H/f, W/f] of `batch` images of `height` x `width`.
    pub fn latent_shape(&self, batch: usize, height: usize, width: usize) -> Result<[usize; 4]> {
        let f = self.vae_scale_factor();
        if !height.is_multiple_of(f) || !width.is_multiple_of(f) || height == 0 || width == 0 {
            return Err(Error::invalid(format!(
                "image size {height}x{width} must be a positive multiple of the VAE's scale \
                 factor {f}"
            )));
        }
        Ok([batch, self.unet_config.in_channels, height / f, width / f])
    }

    /// The UNet's inputs for each prompt (diffusers' `encode_prompt` with `clip_skip=None`):
    /// SD 1.x/2.x condition on the text encoder's last hidden state [B, L, D]; SDXL on both
    /// encoders' penultimate hidden states concatenated [B, L, D1 + D2], with the second
    /// encoder's `text_embeds` [B, P] pooled.
    pub fn encode_prompts(&self, prompts: &[&str], device: &Device) -> Result<PromptEmbeds> {
        let first = self
            .text_encoder
            .forward_ids(&self.tokenizer.encode_ids(prompts)?, device)?;
        let Some(xl) = &self.xl else {
            return Ok(PromptEmbeds {
                context: first.last_hidden_state,
                pooled: None,
            });
        };
        let second = xl
            .text_encoder_2
            .forward_ids(&xl.tokenizer_2.encode_ids(prompts)?, device)?;
        let penultimate = |h: &[Tensor<3>]| h[h.len() - 2].clone();
        Ok(PromptEmbeds {
            context: Tensor::cat(
                vec![
                    penultimate(&first.hidden_states),
                    penultimate(&second.hidden_states),
                ],
                2,
            ),
            pooled: Some(
                second
                    .text_embeds
                    .ok_or_else(|| Error::invalid("text_encoder_2 has no text_projection"))?,
            ),
        })
    }

    /// SDXL's time ids for images of `height` x `width` at diffusers' defaults (original size =
    /// target size = the image size, crop at the top-left corner): [B, 6].
    pub fn add_time_ids(
        &self,
        batch: usize,
        (height, width): (usize, usize),
        device: &Device,
    ) -> Tensor<2> {
        let row = [
            height as f32,
            width as f32,
            0.0,
            0.0,
            height as f32,
            width as f32,
        ];
        let v: Vec<f32> = (0..batch).flat_map(|_| row).collect();
        Tensor::from_data(burn::tensor::TensorData::new(v, [batch, 6]), device)
    }

    /// The conditioning for `prompts` of images of `size` (height, width; SDXL's time ids),
    /// with classifier-free guidance when `guidance > 1` against `negative`: when `None`, the
    /// empty prompt, or zeros for an SDXL pipeline with `force_zeros_for_empty_prompt`.
    pub fn conditioning(
        &self,
        prompts: &[&str],
        negative: Option<&[&str]>,
        guidance: f64,
        size: (usize, usize),
        device: &Device,
    ) -> Result<Conditioning> {
        if !guidance.is_finite() {
            return Err(Error::config(
                "guidance",
                format!("must be finite, got {guidance}"),
            ));
        }
        let b = prompts.len();
        let added = |pooled: Option<Tensor<2>>| {
            pooled.map(|text_embeds| AddedConditions {
                text_embeds,
                time_ids: self.add_time_ids(b, size, device),
            })
        };
        if guidance <= 1.0 {
            let embeds = self.encode_prompts(prompts, device)?;
            let mut cond = Conditioning::new(embeds.context);
            if let Some(a) = added(embeds.pooled) {
                cond = cond.with_added(a, None);
            }
            return Ok(cond);
        }
        let (embeds, uncond) = self.encode_with_negative(prompts, negative, device)?;
        let mut cond = Conditioning::new(embeds.context).with_guidance(uncond.context, guidance);
        if let (Some(c), u) = (added(embeds.pooled), added(uncond.pooled)) {
            cond = cond.with_added(c, u);
        }
        Ok(cond)
    }

    /// The prompts' embeddings and those of guidance's unconditional half: `negative` encoded,
    /// or when `None` the empty prompt, or zeros for an SDXL pipeline with
    /// `force_zeros_for_empty_prompt` (diffusers' `encode_prompt`).
    pub fn encode_with_negative(
        &self,
        prompts: &[&str],
        negative: Option<&[&str]>,
        device: &Device,
    ) -> Result<(PromptEmbeds, PromptEmbeds)> {
        let b = prompts.len();
        let embeds = self.encode_prompts(prompts, device)?;
        let zeros = negative.is_none()
            && self
                .xl
                .as_ref()
                .is_some_and(|xl| xl.force_zeros_for_empty_prompt);
        let uncond = if zeros {
            PromptEmbeds {
                context: embeds.context.zeros_like(),
                pooled: embeds.pooled.as_ref().map(|p| p.zeros_like()),
            }
        } else {
            let empty = vec![""; b];
            let negative = negative.unwrap_or(&empty);
            if negative.len() != b {
                return Err(Error::invalid(format!(
                    "{} negative prompts for {b} prompts",
                    negative.len()
                )));
            }
            self.encode_prompts(negative, device)?
        };
        Ok((embeds, uncond))
    }

    /// The VAE with its config ([`LatentSpace`]: what alignment decodes and encodes with).
    pub fn latent_space(&self) -> LatentSpace {
        LatentSpace {
            config: self.vae_config.clone(),
            vae: self.vae.clone(),
        }
    }

    /// [`LatentSpace::decode_for_reward`]: latents to images in [-1, 1], differentiable.
    pub fn decode_for_reward(&self, latents: Tensor<4>) -> Tensor<4> {
        self.latent_space().decode_for_reward(latents)
    }

    /// [`LatentSpace::encode_images`]: images in [-1, 1] to scaled latents.
    pub fn encode_images(&self, images: Tensor<4>, noise: Option<Tensor<4>>) -> Result<Tensor<4>> {
        self.latent_space().encode_images(images, noise)
    }

    /// Latents [B, C, h, w] to images [B, 3, H, W] in [0, 1].
    pub fn decode(&self, latents: Tensor<4>) -> Tensor<4> {
        let image = self.vae.decode(self.vae_config.unscale_latents(latents));
        (image / 2.0 + 0.5).clamp(0.0, 1.0)
    }

    /// Samples `steps` steps of the scheduler from `latents` (x_T, already scaled by the
    /// scheduler's `init_noise_sigma`) and decodes the result: images [B, 3, H, W] in [0, 1] and
    /// the final latents [B, C, h, w]. `noise` supplies the per-step noise of stochastic samplers
    /// (DDIM with eta > 0).
    pub fn generate(
        &self,
        cond: &Conditioning,
        latents: Tensor<4>,
        steps: usize,
        noise: &mut dyn NoiseSource,
    ) -> Result<(Tensor<4>, Tensor<4>)> {
        self.generate_with(self.scheduler.build(steps)?.as_ref(), cond, latents, noise)
    }

    /// [`Self::generate`] with a scheduler already built.
    fn generate_with(
        &self,
        scheduler: &dyn Scheduler,
        cond: &Conditioning,
        latents: Tensor<4>,
        noise: &mut dyn NoiseSource,
    ) -> Result<(Tensor<4>, Tensor<4>)> {
        let b = latents.dims()[0];
        if cond.context.dims()[0] != b {
            return Err(Error::invalid(format!(
                "{} prompts' conditioning for {b} latents",
                cond.context.dims()[0]
            )));
        }
        let out = sample(&self.unet, scheduler, cond, latents, noise, Record::Nothing)?;
        Ok((self.decode(out.images.clone()), out.images))
    }

    /// `seeds.len()` images of each prompt at `height` x `width` (guided against `negative`, see
    /// [`Self::conditioning`]): per prompt a tensor
    /// [n, 3, H, W] in [0, 1]. Image (prompt p, seed s) draws its initial latents and its step
    /// noise from stream p of seed s ([`SeededRng::for_example`]), so it depends on its prompt's
    /// index and its seed alone, never on `batch` (images per model call, speed only).
    #[allow(clippy::too_many_arguments)]
    pub fn sample_prompts(
        &self,
        prompts: &[&str],
        negative: Option<&str>,
        seeds: &[u64],
        steps: usize,
        guidance: f64,
        (height, width): (usize, usize),
        batch: usize,
        device: &Device,
    ) -> Result<Vec<Tensor<4>>> {
        let scheduler = self.scheduler.build(steps)?;
        per_example_batches(prompts, seeds, batch, |texts, mut noise| {
            let negatives = negative.map(|n| vec![n; texts.len()]);
            let cond = self.conditioning(
                texts,
                negatives.as_deref(),
                guidance,
                (height, width),
                device,
            )?;
            let shape = self.latent_shape(texts.len(), height, width)?;
            let x_t = initial_noise(scheduler.as_ref(), shape, &mut noise, device)?;
            let (images, _) = self.generate_with(scheduler.as_ref(), &cond, x_t, &mut noise)?;
            Ok(images)
        })
    }
}

/// The error for two components of the pipeline in `folder` that disagree: it names `a`'s
/// config.json and points to `b`'s.
pub(crate) fn component_mismatch(folder: &Path, a: &str, b: &str, what: String) -> Error {
    let file = |c: &str| folder.join(c).join("config.json");
    Error::format(
        file(a),
        format!(
            "{what} (see {}); the components are not from one pipeline",
            file(b).display()
        ),
    )
}

/// Runs `run` on batches of at most `batch` (prompt, seed) jobs, prompt-major, each with the
/// noise streams of its jobs (stream p of seed s for prompt p, [`SeededRng::for_example`]), and
/// regroups the images it returns ([n, 3, H, W] per batch) per prompt: [seeds, 3, H, W] each. So
/// an image depends on its prompt's index and its seed alone, never on `batch`.
pub(crate) fn per_example_batches(
    prompts: &[&str],
    seeds: &[u64],
    batch: usize,
    mut run: impl FnMut(&[&str], ExampleNoise) -> Result<Tensor<4>>,
) -> Result<Vec<Tensor<4>>> {
    if prompts.is_empty() || seeds.is_empty() {
        return Err(Error::invalid("nothing to sample: no prompts or no seeds"));
    }
    let jobs: Vec<(usize, u64)> = (0..prompts.len())
        .flat_map(|p| seeds.iter().map(move |&s| (p, s)))
        .collect();
    let mut out: Vec<Vec<Tensor<4>>> = vec![Vec::new(); prompts.len()];
    for chunk in jobs.chunks(batch.max(1)) {
        let texts: Vec<&str> = chunk.iter().map(|(p, _)| prompts[*p]).collect();
        let noise = ExampleNoise::new(
            chunk
                .iter()
                .map(|(p, seed)| SeededRng::for_example(*seed, *p as u64))
                .collect(),
        );
        let images = run(&texts, noise)?;
        for (i, (p, _)) in chunk.iter().enumerate() {
            out[*p].push(images.clone().narrow(0, i, 1));
        }
    }
    Ok(out.into_iter().map(|v| Tensor::cat(v, 0)).collect())
}

/// Checks that `model_index.json` lists each `required` component with one of its classes and
/// that its folder exists; `scheduler_hint` is appended to a wrong scheduler class's error.
pub(crate) fn check_components<'a>(
    folder: &Path,
    index: &ModelIndex,
    required: impl Iterator<Item = &'a (&'a str, &'a [&'a str])>,
    scheduler_hint: &str,
) -> Result<()> {
    let index_path = folder.join("model_index.json");
    let pipeline = &index.class_name;
    for (name, classes) in required {
        let class = index.class_of(name).ok_or_else(|| {
            Error::format(
                &index_path,
                format!(
                    "the pipeline has no `{name}` component; a {pipeline} needs one ({})",
                    classes.join(" or ")
                ),
            )
        })?;
        if !classes.contains(&class) {
            return Err(Error::format(
                &index_path,
                format!(
                    "`{name}` is a {class}; Tiller loads {} there{}",
                    classes.join(" or "),
                    if *name == "scheduler" {
                        scheduler_hint
                    } else {
                        ""
                    }
                ),
            ));
        }
        let sub = folder.join(name);
        if !sub.is_dir() {
            return Err(Error::format(
                &sub,
                format!(
                    "model_index.json lists `{name}` but the folder is missing; copy the \
                     pipeline's {name}/ folder here or save the pipeline again"
                ),
            ));
        }
    }
    Ok(())
}

/// The `safety_checker/` folder of the pipeline in `folder` when its `model_index.json` lists a
/// `StableDiffusionSafetyChecker` there (not `[null, null]`) and the folder exists: what
/// diffusers' pipelines filter their output with.
pub fn safety_checker_of(folder: &Path) -> Result<Option<std::path::PathBuf>> {
    let index = ModelIndex::read(folder)?;
    let sub = folder.join("safety_checker");
    Ok(
        (index.class_of("safety_checker") == Some("StableDiffusionSafetyChecker") && sub.is_dir())
            .then_some(sub),
    )
}

/// Whether the JSON object in `path` has `key`.
fn config_has_key(path: &Path, key: &str) -> Result<bool> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
    Ok(v.get(key).is_some())
}
