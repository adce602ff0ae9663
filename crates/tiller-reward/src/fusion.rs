//! Late fusion: rewards on different scales summed after standardising each.
//!
//! A fused reward is `Σ_k w_k (s_k - μ_k) / σ_k`, where `s_k` is part `k`'s score (a reward
//! ensemble's reward, or its towers' caption match) and `μ_k`, `σ_k` are that score's mean and
//! standard deviation over a reference set of images and prompts. The statistics need no label:
//! `tiller reward fuse` takes them over a store's training-split images, so a label-free caption
//! match (CLIPScore on contrastively pretrained towers) can be added to a preference-trained
//! reward without fitting anything to held-out data. Standardising before summing is the usual
//! way to combine scores of different scales, as multi-reward setups normalise each reward
//! (e.g. per-reward advantage normalisation in multi-objective GRPO).
//!
//! On disk a fusion is a folder holding `fusion.json` ([`FusionConfig`]) and one reward model
//! folder per part (copied in, so the fusion is self-contained).

use crate::rewards::{CaptionMatch, LearnedReward, affine_sum, affine_sum_tensor};
use crate::{DifferentiableReward, Reward};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tiller_core::error::Context;
use tiller_core::{Error, Result};
use tiller_testbed::{Image, Tokenizer};

/// `kind` in `fusion.json`.
pub const FUSION_KIND: &str = "tiller-reward-fusion";
/// The file that makes a folder a fusion.
pub const FUSION_FILE: &str = "fusion.json";

/// Which score of a reward model folder a part uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartScore {
    /// The ensemble's reward (its members' mean).
    Reward,
    /// The towers' caption match ([`CaptionMatch`]).
    CaptionMatch,
}

/// One standardised part.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FusionPart {
    /// The part's reward model folder, a name inside the fusion folder.
    pub folder: String,
    pub score: PartScore,
    pub weight: f64,
    /// The score's mean and standard deviation over the reference images.
    pub mean: f64,
    pub std: f64,
}

/// `fusion.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FusionConfig {
    pub kind: String,
    pub parts: Vec<FusionPart>,
    /// Where the statistics were taken (for the record), e.g. `runs/prefs, train split, 3600
    /// images`.
    pub standardised_on: String,
}

impl FusionConfig {
    /// Checks the kind, that there is a part, and that every weight and statistic is usable;
    /// errors name the part and field.
    pub fn validate(&self) -> Result<()> {
        if self.kind != FUSION_KIND {
            return Err(Error::invalid(format!(
                "kind is \"{}\", expected \"{FUSION_KIND}\"",
                self.kind
            )));
        }
        if self.parts.is_empty() {
            return Err(Error::invalid("parts is empty"));
        }
        for (k, p) in self.parts.iter().enumerate() {
            if p.folder.is_empty() || p.folder.contains(['/', '\\']) || p.folder.starts_with('.') {
                return Err(Error::invalid(format!(
                    "parts[{k}].folder \"{}\" is not a folder name inside the fusion",
                    p.folder
                )));
            }
            for (name, v) in [("weight", p.weight), ("mean", p.mean)] {
                if !v.is_finite() {
                    return Err(Error::invalid(format!("parts[{k}].{name} is {v}")));
                }
            }
            if !(p.std.is_finite() && p.std > 0.0) {
                return Err(Error::invalid(format!(
                    "parts[{k}].std is {}, expected a positive number",
                    p.std
                )));
            }
        }
        Ok(())
    }
}

/// The mean and (population) standard deviation of a part's scores over the reference images;
/// an error when they are constant or not finite, as no scale can be taken from them.
pub fn part_statistics(scores: &[f64]) -> Result<(f64, f64)> {
    if scores.len() < 2 {
        return Err(Error::invalid(format!(
            "standardising needs at least 2 scores, got {}",
            scores.len()
        )));
    }
    let n = scores.len() as f64;
    let mean = scores.iter().sum::<f64>() / n;
    let std = (scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / n).sqrt();
    if !(mean.is_finite() && std.is_finite() && std > 0.0) {
        return Err(Error::invalid(format!(
            "the scores have mean {mean} and standard deviation {std}: nothing to standardise by"
        )));
    }
    Ok((mean, std))
}

/// A part's scorer: the ensemble's reward or its caption match.
pub enum PartScorer {
    Reward(LearnedReward),
    CaptionMatch(CaptionMatch),
}

impl PartScorer {
    /// Loads `folder` as a part scoring `score`.
    pub fn load(
        folder: &Path,
        score: PartScore,
        tokenizer: Tokenizer,
        device: &Device,
    ) -> Result<Self> {
        Ok(match score {
            PartScore::Reward => Self::Reward(LearnedReward::load(folder, tokenizer, device)?),
            PartScore::CaptionMatch => {
                Self::CaptionMatch(CaptionMatch::load(folder, tokenizer, device)?)
            }
        })
    }

    /// The reward this part scores with.
    pub fn reward(&self) -> &dyn Reward {
        match self {
            Self::Reward(r) => r,
            Self::CaptionMatch(c) => c,
        }
    }

    /// The reward model folder's ensemble behind either score.
    pub fn learned(&self) -> &LearnedReward {
        match self {
            Self::Reward(r) => r,
            Self::CaptionMatch(c) => &c.0,
        }
    }
}

/// A loaded fusion folder.
pub struct Fusion {
    pub name: String,
    pub config: FusionConfig,
    pub parts: Vec<PartScorer>,
}

impl Fusion {
    /// Whether `folder` holds a fusion (a `fusion.json`).
    pub fn is_fusion(folder: &Path) -> bool {
        folder.join(FUSION_FILE).is_file()
    }

    /// Loads `folder/fusion.json` and every part's reward model folder.
    pub fn load(folder: &Path, tokenizer: Tokenizer, device: &Device) -> Result<Self> {
        let path = folder.join(FUSION_FILE);
        let config: FusionConfig = tiller_core::config::from_json_file(&path)?;
        config
            .validate()
            .map_err(|e| Error::format(&path, e.to_string()))?;
        let parts = config
            .parts
            .iter()
            .map(|p| PartScorer::load(&folder.join(&p.folder), p.score, tokenizer.clone(), device))
            .collect::<Result<_>>()?;
        Ok(Self {
            name: format!("fusion:{}", folder.display()),
            config,
            parts,
        })
    }

    /// The first part scoring an ensemble's reward, else the first part: the one whose spread and
    /// factors `reward eval` reports for the fusion.
    pub fn main_part(&self) -> (&FusionPart, &PartScorer) {
        let k = self
            .config
            .parts
            .iter()
            .position(|p| p.score == PartScore::Reward)
            .unwrap_or(0);
        (&self.config.parts[k], &self.parts[k])
    }

    /// The first caption-match part, if any.
    pub fn caption_match_part(&self) -> Option<&PartScorer> {
        self.config
            .parts
            .iter()
            .position(|p| p.score == PartScore::CaptionMatch)
            .map(|k| &self.parts[k])
    }
}

impl Fusion {
    /// Each part as the `(w / σ, -w μ / σ, score)` term of the standardised sum.
    fn affine(&self) -> Vec<(f64, f64, &dyn Reward)> {
        self.config
            .parts
            .iter()
            .zip(&self.parts)
            .map(|(p, scorer)| {
                (
                    p.weight / p.std,
                    -p.weight * p.mean / p.std,
                    scorer.reward(),
                )
            })
            .collect()
    }
}

impl Reward for Fusion {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn score(&self, images: &[Image], prompts: &[String]) -> Result<Vec<f64>> {
        affine_sum(&self.name, &self.affine(), images, prompts)
    }

    fn differentiable(&self) -> Option<&dyn DifferentiableReward> {
        Some(self)
    }
}

impl DifferentiableReward for Fusion {
    fn score_tensor(&self, images: Tensor<4>, prompts: &[String]) -> Result<Tensor<1>> {
        affine_sum_tensor(&self.affine(), images, prompts)
    }
}

/// One part of a fusion to build: a model folder, which of its scores and its weight.
#[derive(Debug, Clone)]
pub struct PartSpec {
    pub folder: PathBuf,
    pub score: PartScore,
    pub weight: f64,
}

impl PartSpec {
    /// `caption-match:<folder>` (the towers' caption match) or a folder (its reward).
    pub fn parse(spec: &str, weight: f64) -> PartSpec {
        let (folder, score) = match spec.strip_prefix("caption-match:") {
            Some(f) => (f, PartScore::CaptionMatch),
            None => (spec, PartScore::Reward),
        };
        PartSpec {
            folder: PathBuf::from(folder),
            score,
            weight,
        }
    }
}

/// Builds a fusion folder at the new path `out`: each part scored on `images` (with their
/// prompts `texts`; no label is read) for its mean and standard deviation, its folder copied in
/// so that the fusion stands alone, and `fusion.json` written, all in a temporary sibling renamed
/// into place. `standardised_on` says where the images came from.
pub fn build(
    parts: &[PartSpec],
    (images, texts): (&[Image], &[String]),
    standardised_on: String,
    out: &Path,
    tokenizer: &Tokenizer,
    device: &Device,
) -> Result<FusionConfig> {
    tiller_core::fs::ensure_new(out)?;
    if images.len() < 2 {
        return Err(Error::invalid(format!(
            "{} images are too few to standardise by ({standardised_on})",
            images.len()
        )));
    }
    if let Some(p) = parts.iter().find(|p| !p.weight.is_finite()) {
        return Err(Error::invalid(format!(
            "the weight {} of part {} is not a finite number",
            p.weight,
            p.folder.display()
        )));
    }
    tiller_core::fs::build_folder(out, |tmp| {
        let mut fused = Vec::new();
        for (k, part) in parts.iter().enumerate() {
            let what = || format!("part {k} ({})", part.folder.display());
            let scorer = PartScorer::load(&part.folder, part.score, tokenizer.clone(), device)
                .with_context(what)?;
            let raw = scorer.reward().score(images, texts)?;
            let (mean, std) = part_statistics(&raw).with_context(what)?;
            let name = format!("part-{k}");
            copy_files(&part.folder, &tmp.join(&name)).with_context(what)?;
            fused.push(FusionPart {
                folder: name,
                score: part.score,
                weight: part.weight,
                mean,
                std,
            });
        }
        let config = FusionConfig {
            kind: FUSION_KIND.into(),
            parts: fused,
            standardised_on,
        };
        config.validate()?;
        let json = serde_json::to_string_pretty(&config).context(FUSION_FILE)?;
        tiller_core::fs::atomic_write(&tmp.join(FUSION_FILE), json.as_bytes())?;
        Ok(config)
    })
}

/// Copies the regular files of `from` into a new folder `to`.
fn copy_files(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let path = entry.map_err(|e| Error::io(from, e))?.path();
        if path.is_file() {
            let target = to.join(path.file_name().expect("a file has a name"));
            std::fs::copy(&path, &target).map_err(|e| Error::io(&target, e))?;
        }
    }
    Ok(())
}
