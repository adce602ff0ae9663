//! The public CLIP-based rewards (`../shared/reference/methods.md` §5), differentiable in the
//! pixels through [`ClipImagePreprocess`]:
//!
//! - **CLIPScore**: the cosine of CLIP's image and prompt embeddings (flow_grpo's and
//!   DiffusionNFT's `clip_scorer`: `logits_per_image.diagonal() / 100` with OpenAI CLIP's
//!   temperature 100; Hessel et al. 2021's CLIP-S is `2.5 max(cos, 0)` of the same cosine).
//! - **PickScore** (Kirstain et al. 2023): `exp(logit_scale) cos` of a fine-tuned `CLIPModel`.
//! - **HPSv2 / v2.1** (Wu et al. 2023): the cosine of a fine-tuned open_clip ViT-H-14.
//! - **LAION aesthetic predictor v2**: an MLP of five linears with no activations on the L2-normalised
//!   CLIP image embedding (ddpo-pytorch's `aesthetic_scorer.py`).
//! - **SD safety checker** as a reward: minus the largest concept score, so positive is the
//!   margin below every concept's threshold and an image the checker flags scores below 0.
//!
//! Every model is frozen: its copy on the images' device computes without parameter gradients.

use crate::{DifferentiableReward, Reward, check_finite, check_lengths, images_to_tensor, to_vec};
use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;
use tiller_core::{Error, Result};
use tiller_diffusion::clip_tokenizer::ClipTokenizer;
use tiller_diffusion::models::clip_model::{ClipModel, SafetyChecker, l2_normalize};
use tiller_diffusion::models::clip_vision::{ClipImagePreprocess, ClipVisionModel};
use tiller_diffusion::models::layers::linear;
use tiller_diffusion::models::weights::{load_into, read_safetensors};
use tiller_diffusion::models::{ModelKind, detect_kind, load_clip_vision};
use tiller_testbed::Image;

/// The file beside a CLIP folder's weights holding the aesthetic MLP.
pub const AESTHETIC_MLP_FILE: &str = "aesthetic_mlp.safetensors";

/// How [`ClipSimilarity`] scales the cosine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SimilarityScale {
    /// The cosine itself (CLIPScore).
    Cosine,
    /// `exp(logit_scale)` times the cosine: the model's logit (PickScore).
    Logit,
}

/// A `CLIPModel`'s prompt-image similarity: CLIPScore or PickScore.
pub struct ClipSimilarity {
    name: String,
    model: ClipModel,
    tokenizer: ClipTokenizer,
    preprocess: ClipImagePreprocess,
    scale: f64,
    device: Device,
}

impl ClipSimilarity {
    /// A transformers `CLIPModel` folder with its tokenizer files beside the weights (as the
    /// Hugging Face repositories `openai/clip-vit-large-patch14` and PickScore's processor ship
    /// them) or in a `tokenizer/` subfolder.
    pub fn load(folder: &Path, scale: SimilarityScale, device: &Device) -> Result<Self> {
        let model = ClipModel::load(folder, device)?;
        let tok_folder = if folder.join("tokenizer").is_dir() {
            folder.join("tokenizer")
        } else {
            folder.to_path_buf()
        };
        let tokenizer = ClipTokenizer::from_folder(&tok_folder)?;
        if tokenizer.max_length() > model.config.text.max_position_embeddings {
            return Err(Error::format(
                tok_folder.join("tokenizer_config.json"),
                format!(
                    "model_max_length {} exceeds the text tower's max_position_embeddings {}",
                    tokenizer.max_length(),
                    model.config.text.max_position_embeddings
                ),
            ));
        }
        let (kind, factor) = match scale {
            SimilarityScale::Cosine => ("clip-score", 1.0),
            SimilarityScale::Logit => ("pickscore", model.logit_scale.exp()),
        };
        Ok(Self {
            name: format!("{kind}:{}", folder.display()),
            preprocess: ClipImagePreprocess {
                size: model.config.vision.image_size,
                mean: model.mean,
                std: model.std,
            },
            model,
            tokenizer,
            scale: factor,
            device: device.clone(),
        })
    }

    /// HPSv2 / HPSv2.1 (Wu et al. 2023): the cosine of an open_clip ViT-H-14 fine-tuned on HPD v2,
    /// from an open_clip folder ([`tiller_diffusion::models::open_clip`]) holding the converted
    /// checkpoint and the SD 2.x / open_clip tokenizer files.
    pub fn hpsv2(folder: &Path, device: &Device) -> Result<Self> {
        let mut r = Self::load(folder, SimilarityScale::Cosine, device)?;
        r.name = format!("hpsv2:{}", folder.display());
        Ok(r)
    }

    /// The normalised prompt embeddings [B, P] (no gradient: prompts are not optimised).
    fn text(&self, prompts: &[String]) -> Result<Tensor<2>> {
        let ids = self.tokenizer.encode_ids(prompts)?;
        Ok(l2_normalize(self.model.text_embeds(&ids, &self.device)?))
    }
}

impl Reward for ClipSimilarity {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn score(&self, images: &[Image], prompts: &[String]) -> Result<Vec<f64>> {
        score_images(self, &self.name, images, prompts, &self.device)
    }

    fn differentiable(&self) -> Option<&dyn DifferentiableReward> {
        Some(self)
    }
}

impl DifferentiableReward for ClipSimilarity {
    fn score_tensor(&self, images: Tensor<4>, prompts: &[String]) -> Result<Tensor<1>> {
        let b = images.dims()[0];
        check_batch(b, prompts)?;
        let device = images.device();
        let pixels = self.preprocess.apply(images)?;
        let image = l2_normalize(image_embeds(&self.model.vision, pixels, &device)?);
        let text = self.text(prompts)?.to_device(&device);
        Ok((image * text).sum_dim(1).reshape([b]) * self.scale)
    }
}

/// The frozen tower's projected embeddings of `pixels`, computed on `device`.
fn image_embeds(tower: &ClipVisionModel, pixels: Tensor<4>, device: &Device) -> Result<Tensor<2>> {
    tower
        .clone()
        .to_device(device)
        .no_grad()
        .forward(pixels)?
        .image_embeds
        .ok_or_else(|| Error::invalid("the image tower has no visual_projection"))
}

/// Scores decoded images through the differentiable path on `device`.
fn score_images(
    reward: &dyn DifferentiableReward,
    name: &str,
    images: &[Image],
    prompts: &[String],
    device: &Device,
) -> Result<Vec<f64>> {
    check_lengths(images, prompts)?;
    let x = images_to_tensor(images, device)?;
    let scores = to_vec(reward.score_tensor(x, prompts)?);
    check_finite(name, &scores)?;
    Ok(scores)
}

fn check_batch(b: usize, prompts: &[String]) -> Result<()> {
    if b != prompts.len() {
        return Err(Error::invalid(format!(
            "{b} images but {} prompts",
            prompts.len()
        )));
    }
    Ok(())
}

/// The LAION aesthetic predictor's MLP: linears applied in order with no activations
/// (`layers.{0,2,4,6,7}` in the original, its dropouts in between inactive at inference).
#[derive(Module, Debug)]
pub struct AestheticMlp {
    pub layers: Vec<Linear>,
}

impl AestheticMlp {
    /// Reads `layers.<i>.weight` / `.bias` pairs, in the order of `i`, from a safetensors file
    /// (the original `.pth` converted with
    /// `safetensors.torch.save_file(torch.load(path), "aesthetic_mlp.safetensors")`).
    pub fn load(path: &Path, input: usize, device: &Device) -> Result<Self> {
        let tensors = read_safetensors(path)?;
        let mut indices: Vec<usize> = tensors
            .keys()
            .filter_map(|k| k.strip_prefix("layers.")?.split('.').next()?.parse().ok())
            .collect();
        indices.sort_unstable();
        indices.dedup();
        if indices.is_empty() {
            return Err(Error::format(
                path,
                "no `layers.<i>.weight` tensors: not the aesthetic predictor's MLP",
            ));
        }
        let mut layers = Vec::new();
        let mut renamed = BTreeMap::new();
        let mut width = input;
        for (j, i) in indices.iter().enumerate() {
            let weight = tensors.get(&format!("layers.{i}.weight")).ok_or_else(|| {
                Error::format(path, format!("missing tensor `layers.{i}.weight`"))
            })?;
            let [out, inp] = weight.shape[..] else {
                return Err(Error::format(
                    path,
                    format!(
                        "`layers.{i}.weight` has shape {:?}, expected [out, in]",
                        weight.shape
                    ),
                ));
            };
            if inp != width {
                return Err(Error::format(
                    path,
                    format!(
                        "`layers.{i}.weight` takes {inp} inputs where {width} arrive (the first \
                         layer takes the CLIP projection_dim)"
                    ),
                ));
            }
            layers.push(linear(inp, out, true, device));
            for part in ["weight", "bias"] {
                let t = tensors.get(&format!("layers.{i}.{part}")).ok_or_else(|| {
                    Error::format(path, format!("missing tensor `layers.{i}.{part}`"))
                })?;
                renamed.insert(format!("layers.{j}.{part}"), t.clone());
            }
            width = out;
        }
        if width != 1 {
            return Err(Error::format(
                path,
                format!("the last layer has {width} outputs; the predictor has one"),
            ));
        }
        load_into(Self { layers }, &renamed, path)
    }

    /// x: [B, D] -> [B]
    pub fn forward(&self, x: Tensor<2>) -> Tensor<1> {
        let b = x.dims()[0];
        self.layers.iter().fold(x, |h, l| l.forward(h)).reshape([b])
    }
}

/// The LAION aesthetic predictor v2 on a CLIP image tower.
pub struct Aesthetic {
    name: String,
    vision: ClipVisionModel,
    mlp: AestheticMlp,
    preprocess: ClipImagePreprocess,
    device: Device,
}

impl Aesthetic {
    /// A CLIP folder (`CLIPModel`, as `openai/clip-vit-large-patch14` ships, or
    /// `CLIPVisionModelWithProjection`) holding `aesthetic_mlp.safetensors` beside its weights.
    pub fn load(folder: &Path, device: &Device) -> Result<Self> {
        let mlp_path = folder.join(AESTHETIC_MLP_FILE);
        if !mlp_path.exists() {
            return Err(Error::format(
                folder,
                format!(
                    "no {AESTHETIC_MLP_FILE}: convert the predictor (sac+logos+ava1-l14-linearMSE.pth) \
                     with `safetensors.torch.save_file(torch.load(path), \"{AESTHETIC_MLP_FILE}\")` \
                     and put it beside the CLIP weights"
                ),
            ));
        }
        let (vision, image_size) = match detect_kind(folder) {
            Ok(ModelKind::ClipVision) => {
                let (config, tower) = load_clip_vision(folder, None, device)?;
                (tower, config.image_size)
            }
            _ => {
                let model = ClipModel::load(folder, device)?;
                let size = model.config.vision.image_size;
                (model.vision, size)
            }
        };
        // The predictor was fitted on OpenAI CLIP ViT-L/14 embeddings, normalised with CLIP's
        // statistics.
        let proj = vision
            .visual_projection
            .as_ref()
            .map(|p| p.weight.dims()[1])
            .ok_or_else(|| {
                Error::format(
                    folder.join("config.json"),
                    "the image tower has no visual_projection (use CLIPModel or \
                     CLIPVisionModelWithProjection)",
                )
            })?;
        Ok(Self {
            name: format!("aesthetic:{}", folder.display()),
            mlp: AestheticMlp::load(&mlp_path, proj, device)?,
            vision,
            preprocess: ClipImagePreprocess::new(image_size),
            device: device.clone(),
        })
    }
}

impl Reward for Aesthetic {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn score(&self, images: &[Image], prompts: &[String]) -> Result<Vec<f64>> {
        score_images(self, &self.name, images, prompts, &self.device)
    }

    fn differentiable(&self) -> Option<&dyn DifferentiableReward> {
        Some(self)
    }
}

impl DifferentiableReward for Aesthetic {
    fn score_tensor(&self, images: Tensor<4>, prompts: &[String]) -> Result<Tensor<1>> {
        check_batch(images.dims()[0], prompts)?;
        let device = images.device();
        let pixels = self.preprocess.apply(images)?;
        let embeds = l2_normalize(image_embeds(&self.vision, pixels, &device)?);
        Ok(self
            .mlp
            .clone()
            .to_device(&device)
            .no_grad()
            .forward(embeds))
    }
}

/// The SD safety checker as a reward: `-max_j concept_score_j`.
pub struct SafetyMargin {
    name: String,
    checker: SafetyChecker,
    preprocess: ClipImagePreprocess,
    device: Device,
}

impl SafetyMargin {
    /// A `safety_checker/` folder of a Stable Diffusion pipeline.
    pub fn load(folder: &Path, device: &Device) -> Result<Self> {
        let checker = SafetyChecker::load(folder, device)?;
        Ok(Self {
            name: format!("safety-checker:{}", folder.display()),
            preprocess: ClipImagePreprocess::new(checker.vision.image_size),
            checker,
            device: device.clone(),
        })
    }

    /// The checker itself.
    pub fn checker(&self) -> &SafetyChecker {
        &self.checker
    }

    /// Which of `images` the checker flags (diffusers' `has_nsfw_concept`), 8 at a time.
    pub fn flags(&self, images: &[Image]) -> Result<Vec<bool>> {
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(8) {
            let x = images_to_tensor(chunk, &self.device)?;
            out.extend(self.checker.check(self.preprocess.apply(x)?)?.has_nsfw);
        }
        Ok(out)
    }

    /// `images` with the flagged ones black, as diffusers' pipelines return them, and the flags.
    pub fn filter(&self, images: Vec<Image>) -> Result<(Vec<Image>, Vec<bool>)> {
        let flags = self.flags(&images)?;
        let images = images
            .into_iter()
            .zip(&flags)
            .map(|(image, &flagged)| match flagged {
                false => Ok(image),
                true => Image::from_rgb(
                    image.width(),
                    image.height(),
                    vec![0; image.width() * image.height() * 3],
                ),
            })
            .collect::<Result<_>>()?;
        Ok((images, flags))
    }
}

impl Reward for SafetyMargin {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn score(&self, images: &[Image], prompts: &[String]) -> Result<Vec<f64>> {
        score_images(self, &self.name, images, prompts, &self.device)
    }

    fn differentiable(&self) -> Option<&dyn DifferentiableReward> {
        Some(self)
    }
}

impl DifferentiableReward for SafetyMargin {
    fn score_tensor(&self, images: Tensor<4>, prompts: &[String]) -> Result<Tensor<1>> {
        let b = images.dims()[0];
        check_batch(b, prompts)?;
        let device = images.device();
        let pixels = self.preprocess.apply(images)?;
        let c = &self.checker;
        let frozen = SafetyChecker {
            vision: c.vision.clone().to_device(&device).no_grad(),
            ..c.clone()
        };
        let scores = frozen.check(pixels)?.concept_scores;
        Ok(-scores.max_dim(1).reshape([b]))
    }
}
