//! The model being aligned, its frozen reference, and the sampler both are read through.
//!
//! The loop and the methods see the model only through [`PolicyModel`]: a burn module the
//! samplers read through [`Denoiser`] (x_t, t, context -> prediction), which exports itself. The
//! diffusers UNet is one; a flow transformer is trained by implementing it, without touching the
//! loop.

use crate::batch::Prompts;
use crate::config::{AdapterKind, AdapterSection};
use burn::module::Module;
use burn::tensor::{Device, Tensor};
use std::path::Path;
use tiller_core::{Error, Result, SeededRng};
use tiller_diffusion::models::lora::{LoraFormat, attach_lora, merge_lora, save_lora};
use tiller_diffusion::models::save_unet;
use tiller_diffusion::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use tiller_diffusion::models::vae::LatentSpace;
use tiller_diffusion::sampling::{Conditioning, Denoiser};
use tiller_diffusion::schedulers::{Scheduler, SchedulerConfig};
use tiller_diffusion::{Gaussian, LogProbReduction};

/// A denoiser the loop can train: a burn module (LoRA attaches to its linear layers, the
/// optimizer and checkpoints see its parameters) that predicts through [`Denoiser`] and writes
/// its full weights in its ecosystem's layout.
pub trait PolicyModel: Denoiser + Module + 'static {
    /// The architecture config the full weights are written with.
    type Config: Clone;

    /// Writes every weight into `folder` (the UNet: a diffusers `unet/` subfolder).
    fn export_full(&self, config: &Self::Config, folder: &Path) -> Result<()>;
}

impl PolicyModel for UNet2DConditionModel {
    type Config = UNet2DConditionConfig;

    fn export_full(&self, config: &UNet2DConditionConfig, folder: &Path) -> Result<()> {
        save_unet(&folder.join("unet"), config, self)
    }
}

/// The trainable model on the autodiff device, a frozen copy of the starting weights (the
/// reference of DPO and of the KL regulariser), and the sampling chain.
pub struct Policy<M: PolicyModel = UNet2DConditionModel> {
    /// Trainable (LoRA adapters only, or every weight), on `device.autodiff()`.
    pub model: M,
    /// The starting weights, frozen, on the plain device.
    pub reference: M,
    pub model_config: M::Config,
    /// The chain of rollouts and differentiable samples (DDIM with the configured eta).
    pub sampler: Box<dyn Scheduler>,
    /// The training noise schedule (add_noise / training targets: Diffusion-DPO).
    pub noise: Box<dyn Scheduler>,
    pub guidance: f64,
    pub adapter: AdapterKind,
    /// The plain device.
    pub device: Device,
    /// A latent pipeline's VAE: samples are latents, decoded to images for rewards and encoded
    /// from stored images for the preference methods. `None`: the model samples pixels.
    pub latents: Option<LatentSpace>,
}

impl<M: PolicyModel> Policy<M> {
    /// Wraps `base` (on `device`): LoRA adapters attached (initialised from `rng`) or every
    /// parameter made trainable, then moved to the autodiff device.
    pub fn new(
        base: M,
        model_config: M::Config,
        sampler: Box<dyn Scheduler>,
        noise: Box<dyn Scheduler>,
        guidance: f64,
        adapter: &AdapterSection,
        rng: &mut SeededRng,
        device: &Device,
    ) -> Result<Self> {
        let reference = base.clone();
        let trainable = match adapter.kind {
            AdapterKind::Lora => attach_lora(base, &adapter.lora(), rng)?,
            AdapterKind::Full => base.set_require_grad(true),
        };
        // burn 0.22: moving to the autodiff device keeps tensors plain; `train()` puts the
        // trainable parameters on the graph (adapter factors only, for LoRA).
        let model = trainable.to_device(&device.clone().autodiff()).train();
        Ok(Self {
            model,
            reference,
            model_config,
            sampler,
            noise,
            guidance,
            adapter: adapter.kind,
            device: device.clone(),
            latents: None,
        })
    }

    /// The policy of a latent pipeline: its samples are `latents.vae`'s latents.
    pub fn with_latents(mut self, latents: LatentSpace) -> Self {
        self.latents = Some(latents);
        self
    }

    /// The shape [C, h, w] of the model's samples for images of `image` [C, H, W]: the image's
    /// own for a pixel model, the VAE's latents for a latent pipeline.
    pub fn sample_shape(&self, image: [usize; 3]) -> Result<[usize; 3]> {
        match &self.latents {
            None => Ok(image),
            Some(l) => l.latent_shape(image),
        }
    }

    /// The images [B, 3, H, W] in [-1, 1] (not clamped) of the model's samples `x0`: `x0` itself
    /// for a pixel model, the VAE's decode for a latent pipeline, differentiable in `x0` on the
    /// autodiff device (the VAE is frozen). What every reward sees.
    pub fn images(&self, x0: Tensor<4>) -> Tensor<4> {
        match &self.latents {
            None => x0,
            Some(l) => l.decode_for_reward(x0),
        }
    }

    /// `objective` (images [B, 3, H, W] -> a loss [1]) of the images of the samples `x0`, for
    /// reward backpropagation: for a latent pipeline its gradient reaches `x0` through the VAE
    /// decoder with one decoder segment's graph held at a time
    /// ([`LatentSpace::decoded_loss`]); for a pixel model it is `objective(x0)`.
    pub fn reward_loss(
        &self,
        x0: Tensor<4>,
        objective: impl FnOnce(Tensor<4>) -> Result<Tensor<1>>,
    ) -> Result<Tensor<1>> {
        match &self.latents {
            None => objective(x0),
            Some(l) => l.decoded_loss(x0, objective),
        }
    }

    /// The model's samples for images [B, C, H, W] in [-1, 1] (stored preference pairs,
    /// pre-training images): the images themselves for a pixel model, the VAE posterior's mode
    /// (scaled) for a latent pipeline, as diffusers' training scripts encode.
    pub fn encode_images(&self, images: Tensor<4>) -> Result<Tensor<4>> {
        match &self.latents {
            None => Ok(images),
            Some(l) => l.encode_images(images, None),
        }
    }

    pub fn autodiff_device(&self) -> Device {
        self.device.clone().autodiff()
    }

    /// The current weights without a graph, on the plain device.
    pub fn current(&self) -> M {
        self.model.valid()
    }

    /// The current weights as a plain model (adapters merged).
    pub fn merged(&self) -> M {
        merge_lora(self.model.valid())
    }

    /// The conditioning of `prompts` on `device` (guided when `guidance != 1`).
    pub fn conditioning(&self, prompts: &Prompts, device: &Device) -> Conditioning {
        let c = Conditioning::new(prompts.context.clone().to_device(device));
        let guided = self.guidance != 1.0;
        let c = if guided {
            c.with_guidance(prompts.uncond.clone().to_device(device), self.guidance)
        } else {
            c
        };
        match &prompts.added {
            None => c,
            Some((cond, uncond)) => c.with_added(
                cond.to_device(device),
                guided.then(|| uncond.to_device(device)),
            ),
        }
    }

    /// The conditional model's conditioning of `prompts` on `device`, unguided (how the base
    /// was trained: the denoising losses of the preference and supervised methods).
    pub fn conditional(&self, prompts: &Prompts, device: &Device) -> Conditioning {
        let c = Conditioning::new(prompts.context.clone().to_device(device));
        match &prompts.added {
            None => c,
            Some((cond, _)) => c.with_added(cond.to_device(device), None),
        }
    }

    /// The per-step Gaussian KL(pi_theta || pi_ref) at `x_t` for chain step `i`, averaged over
    /// dimensions, [B] (Tiller's one normalisation; methods average it over their trained steps).
    ///
    /// The reference runs on `x_t`'s own device with constant weights: on the autodiff device
    /// `x_t` keeps its graph, so in reward backprop, where `x_t` depends on the policy's earlier
    /// steps, the KL's gradient reaches them through both models' inputs, not the policy's alone.
    pub fn kl_to_reference(
        &self,
        cond: &Conditioning,
        policy_step: &Gaussian,
        x_t: &Tensor<4>,
        i: usize,
    ) -> Result<Tensor<1>> {
        self.kl_to(&self.reference, cond, policy_step, x_t, i)
    }

    /// [`Self::kl_to_reference`] with another model as the reference (SEIKO: the model as the
    /// round began).
    pub fn kl_to(
        &self,
        reference: &M,
        cond: &Conditioning,
        policy_step: &Gaussian,
        x_t: &Tensor<4>,
        i: usize,
    ) -> Result<Tensor<1>> {
        let t = self.sampler.timesteps()[i];
        let device = x_t.device();
        // Constants on the graph: only `x_t` carries gradients through the reference.
        let reference = reference.clone().no_grad().to_device(&device);
        let pred = cond.to_device(&device).predict(&reference, x_t.clone(), t);
        let reference = self.sampler.step(pred, i, x_t.clone())?.distribution;
        policy_step.kl(&reference, LogProbReduction::Mean)
    }

    /// Writes the trained weights: LoRA as `pytorch_lora_weights.safetensors` (diffusers/PEFT
    /// keys) and `lora_kohya.safetensors` (kohya keys); a full fine-tune as the model writes
    /// itself ([`PolicyModel::export_full`]).
    pub fn export(&self, folder: &Path) -> Result<()> {
        std::fs::create_dir_all(folder).map_err(|e| Error::io(folder, e))?;
        let plain = self.current();
        match self.adapter {
            AdapterKind::Lora => {
                save_lora(&plain, &folder.join(LORA_PEFT_FILE), LoraFormat::Peft)?;
                save_lora(&plain, &folder.join(LORA_KOHYA_FILE), LoraFormat::Kohya)
            }
            AdapterKind::Full => plain.export_full(&self.model_config, folder),
        }
    }
}

/// The LoRA file in diffusers' naming (`pipe.load_lora_weights` reads it).
pub const LORA_PEFT_FILE: &str = "pytorch_lora_weights.safetensors";
/// The same adapters in kohya's naming (A1111, ComfyUI, sd-scripts).
pub const LORA_KOHYA_FILE: &str = "lora_kohya.safetensors";

/// Builds the sampler of a run on the pipeline's schedule with the configured eta.
pub fn sampler_config(pipeline: &SchedulerConfig, eta: f64) -> Result<SchedulerConfig> {
    match pipeline {
        SchedulerConfig::Ddim(c) => Ok(SchedulerConfig::Ddim(
            tiller_diffusion::schedulers::DdimConfig { eta, ..c.clone() },
        )),
        other => Err(Error::invalid(format!(
            "alignment samples with DDIM (eta = {eta}), but the pipeline's scheduler is {:?}",
            other.kind()
        ))),
    }
}
