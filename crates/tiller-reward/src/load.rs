//! A reward by name, as every command's `--reward` and every config's `reward` key give it.

use crate::clip_rewards::{Aesthetic, ClipSimilarity, SafetyMargin, SimilarityScale};
use crate::fusion::Fusion;
use crate::rewards::{CaptionMatch, FactorReward, SoftMarks};
use crate::{GoldReward, JpegCompressibility, LearnedReward, Reward};
use burn::tensor::Device;
use std::path::Path;
use tiller_core::{Error, Result};
use tiller_testbed::Tokenizer;

/// The spellings [`load`] accepts besides a folder.
pub const NAMED: [&str; 3] = ["gold", "jpeg", "soft-marks"];

/// `gold` (the testbed's gold evaluator), `jpeg` (JPEG compressibility), `soft-marks` (the
/// testbed's differentiable safety reward, [`SoftMarks`]), the CLIP rewards on
/// real weights (`clip-score:<CLIPModel folder>`, `pickscore:<CLIPModel folder>`,
/// `hpsv2:<open_clip folder>`,
/// `aesthetic:<CLIP folder with aesthetic_mlp.safetensors>`, `safety-checker:<folder>`; see
/// [`crate::clip_rewards`]), `factor:<name>:<folder>` (one factor of a reward model folder,
/// e.g. `no_mark`, a safety reward), `caption-match:<folder>`
/// (the caption match of a folder's towers, e.g. `tiller reward pretrain`'s), a fusion folder
/// (`tiller reward fuse`) or a reward-model folder (`tiller reward train`). Folders are read
/// with `tokenizer` for their text tower, on `device`.
pub fn load(spec: &str, tokenizer: &Tokenizer, device: &Device) -> Result<Box<dyn Reward>> {
    let wrap = |what: &str, e: Error| Error::invalid(format!("reward `{spec}`: {what}: {e}"));
    if let Some(reward) = load_clip_reward(spec, device).map_err(|e| {
        wrap(
            "a CLIP reward whose folder does not load (see tiller_reward::clip_rewards)",
            e,
        )
    })? {
        return Ok(reward);
    }
    Ok(match spec {
        "gold" => Box::new(GoldReward::default()),
        "jpeg" => Box::new(JpegCompressibility),
        "soft-marks" => Box::new(SoftMarks::default()),
        _ if spec.starts_with(FACTOR_PREFIX) => {
            let (factor, path) = factor_spec(spec)?;
            let learned = LearnedReward::load(Path::new(path), tokenizer.clone(), device)
                .map_err(|e| wrap(&format!("{path} is not a reward model folder"), e))?;
            Box::new(FactorReward::new(learned, factor)?)
        }
        _ if spec.starts_with("caption-match:") => {
            let path = &spec["caption-match:".len()..];
            Box::new(
                CaptionMatch::load(Path::new(path), tokenizer.clone(), device)
                    .map_err(|e| wrap(&format!("{path} is not a reward model folder"), e))?,
            )
        }
        path if Fusion::is_fusion(Path::new(path)) => Box::new(
            Fusion::load(Path::new(path), tokenizer.clone(), device)
                .map_err(|e| wrap("a fusion folder that does not load", e))?,
        ),
        path => Box::new(
            LearnedReward::load(Path::new(path), tokenizer.clone(), device).map_err(|e| {
                wrap(
                    "not `gold`, `jpeg`, `caption-match:<folder>` or a reward model folder",
                    e,
                )
            })?,
        ),
    })
}

/// `factor:<name>:<folder>`: one factor of a reward model folder as the reward.
pub const FACTOR_PREFIX: &str = "factor:";

/// The factor's name and the folder of a `factor:<name>:<folder>` spec.
pub fn factor_spec(spec: &str) -> Result<(&str, &str)> {
    spec.strip_prefix(FACTOR_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .filter(|(name, path)| !name.is_empty() && !path.is_empty())
        .ok_or_else(|| {
            Error::invalid(format!(
                "reward `{spec}`: a factor reward is `factor:<name>:<reward model folder>`, e.g. `factor:no_mark:assets/testbed-reward`"
            ))
        })
}

/// The prefixes of specs that name a folder after them (`<prefix>:<folder>`).
pub const FOLDER_PREFIXES: [&str; 6] = [
    "caption-match",
    "clip-score",
    "pickscore",
    "hpsv2",
    "aesthetic",
    "safety-checker",
];

/// `clip-score:`, `pickscore:`, `hpsv2:`, `aesthetic:` or `safety-checker:` followed by a folder; `None`
/// for any other spec.
fn load_clip_reward(spec: &str, device: &Device) -> Result<Option<Box<dyn Reward>>> {
    let Some((kind, path)) = spec.split_once(':') else {
        return Ok(None);
    };
    let path = Path::new(path);
    Ok(Some(match kind {
        "clip-score" => Box::new(ClipSimilarity::load(path, SimilarityScale::Cosine, device)?),
        "pickscore" => Box::new(ClipSimilarity::load(path, SimilarityScale::Logit, device)?),
        "hpsv2" => Box::new(ClipSimilarity::hpsv2(path, device)?),
        "aesthetic" => Box::new(Aesthetic::load(path, device)?),
        "safety-checker" => Box::new(SafetyMargin::load(path, device)?),
        _ => return Ok(None),
    }))
}
