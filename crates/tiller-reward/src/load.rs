//! A reward by name, as every command's `--reward` and every config's `reward` key give it.

use crate::clip_rewards::{Aesthetic, ClipSimilarity, SafetyMargin, SimilarityScale};
use crate::fusion::Fusion;
use crate::rewards::CaptionMatch;
use crate::{GoldReward, JpegCompressibility, LearnedReward, Reward};
use burn::tensor::Device;
use std::path::Path;
use tiller_core::{Error, Result};
use tiller_testbed::Tokenizer;

/// The spellings [`load`] accepts besides a folder.
pub const NAMED: [&str; 2] = ["gold", "jpeg"];

/// `gold` (the testbed's gold evaluator), `jpeg` (JPEG compressibility), the CLIP rewards on
/// real weights (`clip-score:<CLIPModel folder>`, `pickscore:<CLIPModel folder>`,
/// `hpsv2:<open_clip folder>`,
/// `aesthetic:<CLIP folder with aesthetic_mlp.safetensors>`, `safety-checker:<folder>`; see
/// [`crate::clip_rewards`]), `caption-match:<folder>`
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
