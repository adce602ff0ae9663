//! Bootstrap ensembles of reward networks (Lakshminarayanan et al. 2017, "Simple and Scalable
//! Predictive Uncertainty Estimation using Deep Ensembles"): each member is trained from its own
//! initialisation on its own bootstrap resample of the feedback, the reward is the members' mean
//! and the uncertainty their standard deviation. Members disagree most where the feedback says
//! least, e.g. on prompt types no annotator saw, which is what active learning and
//! uncertainty-penalised optimisation use.
//!
//! On disk a model is a folder: `config.json` ([`RewardModelConfig`]) and `model.safetensors`
//! (`members.<i>.<parameter>`), written atomically.

use crate::net::{RewardNet, RewardNetConfig};
use crate::{images_to_tensor, to_vec};
use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tiller_core::{Error, Result};
use tiller_diffusion::models::weights::load_into;
use tiller_diffusion::models::{read_folder_weights, save_folder};
use tiller_testbed::Image;

/// The weights file's stem inside a reward model folder.
pub const WEIGHTS_STEM: &str = "model";
/// The `kind` written in every reward model's `config.json`.
pub const KIND: &str = "tiller-reward-ensemble";

/// `config.json` of a reward model folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardModelConfig {
    /// Always [`KIND`]; guards against loading another model's folder.
    pub kind: String,
    /// Ensemble members.
    pub members: usize,
    pub net: RewardNetConfig,
}

/// Scores with their uncertainty.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredBatch {
    /// Members' mean reward per image.
    pub mean: Vec<f64>,
    /// Members' standard deviation per image (0 for a one-member ensemble).
    pub std: Vec<f64>,
    /// Members' mean factor probabilities σ(f_k) per image [B][F].
    pub factors: Vec<Vec<f64>>,
}

#[derive(Module, Debug)]
pub struct RewardEnsemble {
    pub members: Vec<RewardNet>,
}

impl RewardEnsemble {
    /// `config.members` fresh members.
    pub fn init(config: &RewardModelConfig, device: &Device) -> Result<Self> {
        if config.members == 0 {
            return Err(Error::config("members", "must be at least 1"));
        }
        let members = (0..config.members)
            .map(|_| config.net.init(device))
            .collect::<Result<_>>()?;
        Ok(Self { members })
    }

    /// The members' mean reward as a tensor [B] (differentiable in `images`).
    pub fn forward_mean(&self, images: Tensor<4>, ids: &[Vec<i64>]) -> Result<Tensor<1>> {
        self.member_mean(|m| Ok(m.forward(images.clone(), ids)?.reward))
    }

    /// The members' mean caption match ([`RewardNet::caption_match`]) as a tensor [B]
    /// (differentiable in `images`).
    pub fn caption_match_mean(&self, images: Tensor<4>, ids: &[Vec<i64>]) -> Result<Tensor<1>> {
        self.member_mean(|m| m.caption_match(images.clone(), ids))
    }

    /// The mean over members of `per_member`.
    fn member_mean(
        &self,
        per_member: impl Fn(&RewardNet) -> Result<Tensor<1>>,
    ) -> Result<Tensor<1>> {
        let n = self.members.len() as f64;
        let mut sum: Option<Tensor<1>> = None;
        for m in &self.members {
            let r = per_member(m)?;
            sum = Some(match sum {
                Some(s) => s + r,
                None => r,
            });
        }
        Ok(sum.ok_or_else(|| Error::invalid("an ensemble without members"))? / n)
    }

    /// Mean, spread and factor probabilities for images and their prompts' token ids.
    pub fn score(
        &self,
        images: &[Image],
        ids: &[Vec<i64>],
        device: &Device,
    ) -> Result<ScoredBatch> {
        let x = images_to_tensor(images, device)?;
        let b = images.len();
        let mut per_member = Vec::with_capacity(self.members.len());
        let mut factors: Vec<Vec<f64>> = Vec::new();
        for m in &self.members {
            let out = m.forward(x.clone(), ids)?;
            per_member.push(to_vec(out.reward));
            let probs = to_vec(burn::tensor::activation::sigmoid(out.factor_logits));
            let f = probs.len() / b.max(1);
            if factors.is_empty() {
                factors = vec![vec![0.0; f]; b];
            }
            for i in 0..b {
                for k in 0..f {
                    factors[i][k] += probs[i * f + k] / self.members.len() as f64;
                }
            }
        }
        let n = per_member.len() as f64;
        let mean: Vec<f64> = (0..b)
            .map(|i| per_member.iter().map(|m| m[i]).sum::<f64>() / n)
            .collect();
        let std = (0..b)
            .map(|i| {
                let var = per_member
                    .iter()
                    .map(|m| (m[i] - mean[i]).powi(2))
                    .sum::<f64>()
                    / n;
                var.sqrt()
            })
            .collect();
        Ok(ScoredBatch { mean, std, factors })
    }

    /// The members' mean caption match ([`RewardNet::caption_match`]) per image.
    pub fn caption_match(
        &self,
        images: &[Image],
        ids: &[Vec<i64>],
        device: &Device,
    ) -> Result<Vec<f64>> {
        let x = images_to_tensor(images, device)?;
        Ok(to_vec(self.caption_match_mean(x, ids)?))
    }

    /// Writes `config.json` and `model.safetensors` into `folder` (each atomically).
    pub fn save(&self, folder: &Path, config: &RewardModelConfig) -> Result<()> {
        save_folder(folder, config, self, WEIGHTS_STEM)
    }

    /// Loads a reward model folder; strict (every tensor present with its shape, no extras).
    pub fn load(folder: &Path, device: &Device) -> Result<(RewardModelConfig, Self)> {
        let path = folder.join("config.json");
        if !path.is_file() {
            return Err(Error::format(
                folder,
                "not a reward model folder: no config.json (expected config.json and model.safetensors)",
            ));
        }
        let config: RewardModelConfig = tiller_core::config::from_json_file(&path)?;
        if config.kind != KIND {
            return Err(Error::format(
                &path,
                format!("kind is \"{}\", expected \"{KIND}\"", config.kind),
            ));
        }
        config
            .net
            .validate()
            .map_err(|e| Error::format(&path, e.to_string()))?;
        let (source, tensors) = read_folder_weights(folder, WEIGHTS_STEM, None)?;
        let model = load_into(Self::init(&config, device)?, &tensors, &source)?;
        Ok((config, model))
    }
}
