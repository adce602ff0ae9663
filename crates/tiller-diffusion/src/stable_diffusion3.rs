//! Stable Diffusion 3 and 3.5 (Esser et al. 2024) from a folder saved by diffusers'
//! `StableDiffusion3Pipeline.save_pretrained`, without its T5 encoder:
//!
//! ```text
//! <folder>/model_index.json        "_class_name": "StableDiffusion3Pipeline"
//! <folder>/tokenizer/, tokenizer_2/        CLIPTokenizer (CLIP-L, CLIP-G)
//! <folder>/text_encoder/, text_encoder_2/  CLIPTextModelWithProjection
//! <folder>/transformer/            SD3Transformer2DModel
//! <folder>/vae/                    AutoencoderKL (16 latent channels, shift_factor)
//! <folder>/scheduler/              FlowMatchEulerDiscreteScheduler
//! ```
//!
//! `text_encoder_3` and `tokenizer_3` (T5) must be `[null, null]`: Tiller has no T5 yet. Without
//! it the pipeline conditions as diffusers' does when loaded with `text_encoder_3=None`
//! (`encode_prompt`, `clip_skip=None`): both CLIP encoders' penultimate hidden states side by
//! side, zero-padded to the transformer's `joint_attention_dim`, followed by
//! `max_sequence_length` (256) zero tokens where T5's would be; the pooled input is both
//! encoders' projected outputs side by side. Guidance is against the empty prompt encoded the
//! same way. The chain is the flow-matching Euler sampler from the given latents, then
//! `vae.decode(latents / scaling_factor + shift_factor)` mapped to [0, 1].

use crate::clip_tokenizer::ClipTokenizer;
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::sd3_transformer::{SD3Transformer2DConfig, SD3Transformer2DModel};
use crate::models::unet::AddedConditions;
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::models::{load_clip_text, load_sd3_transformer, load_vae};
use crate::sampling::{Conditioning, Denoiser, NoiseSource, Record, initial_noise, sample};
use crate::schedulers::SchedulerConfig;
use crate::stable_diffusion::{
    ModelIndex, PromptEmbeds, check_components, component_mismatch, per_example_batches,
};
use burn::tensor::{Device, Tensor};
use std::path::Path;
use tiller_core::{Error, Result};

/// diffusers' class name of SD3 pipelines.
pub const SD3_PIPELINE_CLASS: &str = "StableDiffusion3Pipeline";
/// diffusers' default `max_sequence_length`: the T5 stream's tokens.
pub const T5_TOKENS: usize = 256;

/// The components an SD3 pipeline must have, with the class each must be.
const REQUIRED: &[(&str, &[&str])] = &[
    ("tokenizer", &["CLIPTokenizer", "CLIPTokenizerFast"]),
    ("tokenizer_2", &["CLIPTokenizer", "CLIPTokenizerFast"]),
    ("text_encoder", &["CLIPTextModelWithProjection"]),
    ("text_encoder_2", &["CLIPTextModelWithProjection"]),
    ("transformer", &["SD3Transformer2DModel"]),
    ("vae", &["AutoencoderKL"]),
    ("scheduler", &["FlowMatchEulerDiscreteScheduler"]),
];

/// Whether `folder` holds a `StableDiffusion3Pipeline` (by its `model_index.json`).
pub fn is_stable_diffusion3(folder: &Path) -> bool {
    ModelIndex::read(folder).is_ok_and(|i| i.class_name == SD3_PIPELINE_CLASS)
}

/// A Stable Diffusion 3 pipeline without T5.
#[derive(Debug, Clone)]
pub struct StableDiffusion3 {
    pub tokenizer: ClipTokenizer,
    pub text_config: ClipTextConfig,
    pub text_encoder: ClipTextModel,
    pub tokenizer_2: ClipTokenizer,
    pub text_config_2: ClipTextConfig,
    pub text_encoder_2: ClipTextModel,
    pub transformer_config: SD3Transformer2DConfig,
    pub transformer: SD3Transformer2DModel,
    pub vae_config: AutoencoderKLConfig,
    pub vae: AutoencoderKL,
    /// The folder's flow-matching scheduler config.
    pub scheduler: SchedulerConfig,
    /// Zero tokens in T5's place after the CLIP tokens (diffusers' `max_sequence_length`).
    pub t5_tokens: usize,
    pub index: ModelIndex,
}

impl StableDiffusion3 {
    /// Loads a `StableDiffusion3Pipeline` folder saved without T5. Errors name the file at fault.
    pub fn load(folder: &Path, device: &Device) -> Result<Self> {
        let index = ModelIndex::read(folder)?;
        let index_path = folder.join("model_index.json");
        if index.class_name != SD3_PIPELINE_CLASS {
            return Err(Error::format(
                &index_path,
                format!(
                    "`_class_name` is {}; this loader reads {SD3_PIPELINE_CLASS}",
                    index.class_name
                ),
            ));
        }
        for t5 in ["text_encoder_3", "tokenizer_3"] {
            if let Some(class) = index.class_of(t5) {
                return Err(Error::format(
                    &index_path,
                    format!(
                        "`{t5}` is a {class}: Tiller has no T5 encoder yet. Set `{t5}` to \
                         [null, null] to condition without it, as diffusers does with \
                         `StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, \
                         tokenizer_3=None)`"
                    ),
                ));
            }
        }
        check_components(folder, &index, REQUIRED.iter(), "")?;
        let (text_config, text_encoder) =
            load_clip_text(&folder.join("text_encoder"), None, device)?;
        let (text_config_2, text_encoder_2) =
            load_clip_text(&folder.join("text_encoder_2"), None, device)?;
        let (transformer_config, transformer) =
            load_sd3_transformer(&folder.join("transformer"), None, device)?;
        let (vae_config, vae) = load_vae(&folder.join("vae"), None, device)?;
        let scheduler =
            SchedulerConfig::from_diffusers_json(folder.join("scheduler/scheduler_config.json"))?;
        let sd = Self {
            tokenizer: ClipTokenizer::from_folder(&folder.join("tokenizer"))?,
            text_config,
            text_encoder,
            tokenizer_2: ClipTokenizer::from_folder(&folder.join("tokenizer_2"))?,
            text_config_2,
            text_encoder_2,
            transformer_config,
            transformer,
            vae_config,
            vae,
            scheduler,
            t5_tokens: T5_TOKENS,
            index,
        };
        sd.check_consistency(folder)?;
        Ok(sd)
    }

    /// Checks that the components fit together, naming the two files that disagree.
    fn check_consistency(&self, folder: &Path) -> Result<()> {
        let mismatch = |a: &str, b: &str, what: String| -> Result<()> {
            Err(component_mismatch(folder, a, b, what))
        };
        let t = &self.transformer_config;
        let clip_width = self.text_config.hidden_size + self.text_config_2.hidden_size;
        if t.joint_attention_dim < clip_width {
            return mismatch(
                "transformer",
                "text_encoder_2",
                format!(
                    "joint_attention_dim {} is below the two text encoders' hidden width {clip_width}",
                    t.joint_attention_dim
                ),
            );
        }
        let pooled = self.text_config.projection_dim + self.text_config_2.projection_dim;
        if t.pooled_projection_dim != pooled {
            return mismatch(
                "transformer",
                "text_encoder_2",
                format!(
                    "pooled_projection_dim {} differs from the text encoders' projection_dim sum {pooled}",
                    t.pooled_projection_dim
                ),
            );
        }
        if t.in_channels != self.vae_config.latent_channels {
            return mismatch(
                "transformer",
                "vae",
                format!(
                    "in_channels {} differs from the VAE's latent_channels {}",
                    t.in_channels, self.vae_config.latent_channels
                ),
            );
        }
        for (tokenizer, encoder, config) in [
            (&self.tokenizer, "text_encoder", &self.text_config),
            (&self.tokenizer_2, "text_encoder_2", &self.text_config_2),
        ] {
            if tokenizer.max_length() > config.max_position_embeddings {
                return mismatch(
                    encoder,
                    "tokenizer",
                    format!(
                        "max_position_embeddings {} is below the tokenizer's model_max_length {}",
                        config.max_position_embeddings,
                        tokenizer.max_length()
                    ),
                );
            }
        }
        if self.tokenizer.max_length() != self.tokenizer_2.max_length() {
            return Err(Error::format(
                folder.join("tokenizer_2/tokenizer_config.json"),
                format!(
                    "model_max_length {} differs from tokenizer/'s {}; the two encoders' states \
                     are concatenated position by position",
                    self.tokenizer_2.max_length(),
                    self.tokenizer.max_length()
                ),
            ));
        }
        Ok(())
    }

    /// The VAE's spatial downsampling (8 for SD3).
    pub fn vae_scale_factor(&self) -> usize {
        1 << (self.vae_config.block_out_channels.len() - 1)
    }

    /// The image side the transformer was trained at: `sample_size` times the VAE factor.
    pub fn default_resolution(&self) -> usize {
        self.transformer_config.sample_size * self.vae_scale_factor()
    }

    /// The latent shape of `batch` images of `height` x `width`, which must be multiples of the
    /// VAE factor times the patch size.
    pub fn latent_shape(&self, batch: usize, height: usize, width: usize) -> Result<[usize; 4]> {
        let f = self.vae_scale_factor() * self.transformer_config.patch_size;
        if height == 0 || width == 0 || !height.is_multiple_of(f) || !width.is_multiple_of(f) {
            return Err(Error::invalid(format!(
                "image size {height}x{width} must be a positive multiple of {f} (the VAE's \
                 factor {} times the patch size {})",
                self.vae_scale_factor(),
                self.transformer_config.patch_size
            )));
        }
        let v = self.vae_scale_factor();
        Ok([
            batch,
            self.transformer_config.in_channels,
            height / v,
            width / v,
        ])
    }

    /// The transformer's inputs for each prompt: the context [B, L + t5_tokens, joint dim] and
    /// the pooled projection [B, P] (see the module docs).
    pub fn encode_prompts(&self, prompts: &[&str], device: &Device) -> Result<PromptEmbeds> {
        let first = self
            .text_encoder
            .forward_ids(&self.tokenizer.encode_ids(prompts)?, device)?;
        let second = self
            .text_encoder_2
            .forward_ids(&self.tokenizer_2.encode_ids(prompts)?, device)?;
        let penultimate = |h: &[Tensor<3>]| h[h.len() - 2].clone();
        let clip = Tensor::cat(
            vec![
                penultimate(&first.hidden_states),
                penultimate(&second.hidden_states),
            ],
            2,
        );
        let [b, l, w] = clip.dims();
        let joint = self.transformer_config.joint_attention_dim;
        let context = Tensor::cat(
            vec![
                Tensor::cat(vec![clip, Tensor::zeros([b, l, joint - w], device)], 2),
                Tensor::zeros([b, self.t5_tokens, joint], device),
            ],
            1,
        );
        let projected = |o: Option<Tensor<2>>, which: &str| {
            o.ok_or_else(|| Error::invalid(format!("{which} has no text_projection")))
        };
        let pooled = Tensor::cat(
            vec![
                projected(first.text_embeds, "text_encoder")?,
                projected(second.text_embeds, "text_encoder_2")?,
            ],
            1,
        );
        Ok(PromptEmbeds {
            context,
            pooled: Some(pooled),
        })
    }

    /// The conditioning for `prompts`, with classifier-free guidance when `guidance > 1` against
    /// `negative` (default: the empty prompt).
    pub fn conditioning(
        &self,
        prompts: &[&str],
        negative: Option<&[&str]>,
        guidance: f64,
        device: &Device,
    ) -> Result<Conditioning> {
        if !guidance.is_finite() {
            return Err(Error::config(
                "guidance",
                format!("must be finite, got {guidance}"),
            ));
        }
        let b = prompts.len();
        let added = |e: &PromptEmbeds| AddedConditions {
            text_embeds: e.pooled.clone().expect("SD3 embeddings are pooled"),
            // SD3 has no time ids.
            time_ids: Tensor::zeros([b, 0], device),
        };
        let embeds = self.encode_prompts(prompts, device)?;
        if guidance <= 1.0 {
            let a = added(&embeds);
            return Ok(Conditioning::new(embeds.context).with_added(a, None));
        }
        let empty = vec![""; b];
        let negative = negative.unwrap_or(&empty);
        if negative.len() != b {
            return Err(Error::invalid(format!(
                "{} negative prompts for {b} prompts",
                negative.len()
            )));
        }
        let uncond = self.encode_prompts(negative, device)?;
        let (a, u) = (added(&embeds), added(&uncond));
        Ok(Conditioning::new(embeds.context)
            .with_guidance(uncond.context, guidance)
            .with_added(a, Some(u)))
    }

    /// Latents to images [B, 3, H, W] in [0, 1].
    pub fn decode(&self, latents: Tensor<4>) -> Tensor<4> {
        let image = self.vae.decode(self.vae_config.unscale_latents(latents));
        (image / 2.0 + 0.5).clamp(0.0, 1.0)
    }

    /// Samples `steps` flow-matching steps from `latents` (x_1, standard normal) and decodes the
    /// result: images [B, 3, H, W] in [0, 1] and the final latents.
    pub fn generate(
        &self,
        cond: &Conditioning,
        latents: Tensor<4>,
        steps: usize,
        noise: &mut dyn NoiseSource,
    ) -> Result<(Tensor<4>, Tensor<4>)> {
        let [b, c, h, w] = latents.dims();
        let p = self.transformer_config.patch_size;
        if cond.context.dims()[0] != b
            || c != self.transformer_config.in_channels
            || !h.is_multiple_of(p)
            || !w.is_multiple_of(p)
        {
            return Err(Error::invalid(format!(
                "latents {:?} for {} prompts: expected [B, {}, h, w] with h and w multiples \
                 of the patch size {}",
                latents.dims(),
                cond.context.dims()[0],
                self.transformer_config.in_channels,
                p
            )));
        }
        let scheduler = self.scheduler.build(steps)?;
        let out = sample(
            &self.transformer,
            scheduler.as_ref(),
            cond,
            latents,
            noise,
            Record::Nothing,
        )?;
        Ok((self.decode(out.images.clone()), out.images))
    }
}

impl StableDiffusion3 {
    /// `seeds.len()` images of each prompt at `height` x `width` (guided against `negative`):
    /// per prompt a tensor [n, 3, H, W] in [0, 1]. Image (prompt p, seed s) draws its initial
    /// latents from stream p of seed s, so it depends on its prompt's index and its seed alone,
    /// never on `batch` (images per model call, speed only).
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
            let cond = self.conditioning(texts, negatives.as_deref(), guidance, device)?;
            let shape = self.latent_shape(texts.len(), height, width)?;
            let x_t = initial_noise(scheduler.as_ref(), shape, &mut noise, device)?;
            let out = sample(
                &self.transformer,
                scheduler.as_ref(),
                &cond,
                x_t,
                &mut noise,
                Record::Nothing,
            )?;
            Ok(self.decode(out.images))
        })
    }
}

impl Denoiser for SD3Transformer2DModel {
    /// SD3 always takes the pooled projection: sample it through a [`Conditioning`] with added
    /// conditions ([`StableDiffusion3::conditioning`]).
    fn predict(&self, _x_t: Tensor<4>, _timesteps: Tensor<1>, _context: Tensor<3>) -> Tensor<4> {
        panic!(
            "SD3Transformer2DModel needs the pooled text projection; build the conditioning \
             with StableDiffusion3::conditioning"
        )
    }

    /// `added.text_embeds` is the pooled projection; `time_ids` are not used.
    fn predict_added(
        &self,
        x_t: Tensor<4>,
        timesteps: Tensor<1>,
        context: Tensor<3>,
        added: &AddedConditions,
    ) -> Tensor<4> {
        self.forward(x_t, timesteps, context, added.text_embeds.clone())
            .expect("the pipeline checks the latent shape before sampling")
    }
}
