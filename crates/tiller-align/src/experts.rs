//! Several alignment runs' LoRA adapters merged into one adapter: SafetyDPO's experts, one per
//! harm category, become one model (`tiller merge --run A --run B ...`). The strategies and our
//! reading of the paper's Co-Merge are in [`crate::methods::safety_dpo`]; this file loads the
//! experts, records what their models' projections see on the calibration prompts, and attaches
//! the combination to the base.

use crate::methods::safety_dpo::{MergeStrategy, Winners, co_merge_gates, gates};
use crate::run::{adapted_unet, run_config};
use burn::tensor::Device;
use serde::Serialize;
use std::path::{Path, PathBuf};
use tiller_core::{Error, Result};
use tiller_diffusion::models::lora::{AdapterSet, adapter_set, attach_combination};
use tiller_diffusion::models::probe;
use tiller_diffusion::pipeline::TextToImage;
use tiller_diffusion::stable_diffusion::is_stable_diffusion;
use tiller_eval::sampling::load_pipeline;
use tiller_testbed::Tokenizer;

/// What a merge did, written beside the merged model as `merge.json`.
#[derive(Debug, Clone, Serialize)]
pub struct MergeReport {
    pub strategy: MergeStrategy,
    /// The expert runs, in order.
    pub experts: Vec<String>,
    /// The merged adapter's rank (the experts' ranks side by side) and its module count.
    pub rank: usize,
    pub modules: usize,
    /// Output units over all modules, and how many each expert kept (Co-Merge; the average keeps
    /// every unit of every expert, scaled by 1/N).
    pub units: usize,
    pub units_kept: Vec<usize>,
    /// Images the calibration sampled per expert (Co-Merge; 0 for the average).
    pub calibration_images: usize,
}

/// The base pipeline with the experts' merged adapter attached (not merged into the weights, so
/// it can be saved as one LoRA file), its tokenizer, and the report.
pub struct MergedExperts {
    pub pipe: TextToImage,
    pub tokenizer: Tokenizer,
    pub report: MergeReport,
}

/// Merges the LoRA adapters of `runs` (finished runs or checkpoints on one testbed-format base)
/// by `strategy`. For Co-Merge, `calibrate` samples the calibration prompts with the pipeline it is
/// given (each expert's own model in turn) and returns how many images it drew; every projection's
/// inputs are recorded meanwhile.
pub fn merge_experts(
    runs: &[PathBuf],
    strategy: MergeStrategy,
    device: &Device,
    locate: &dyn Fn(&Path) -> PathBuf,
    calibrate: &mut dyn FnMut(&TextToImage, &Tokenizer) -> Result<usize>,
) -> Result<MergedExperts> {
    if runs.len() < 2 {
        return Err(Error::invalid(format!(
            "merging experts needs at least two runs, got {}",
            runs.len()
        )));
    }
    let (first, _) = run_config(&runs[0])?;
    let folder = locate(Path::new(&first.base));
    if is_stable_diffusion(&folder) {
        return Err(Error::invalid(format!(
            "{}: merging experts of Stable Diffusion runs is not supported yet; testbed-format \
             pipelines only",
            runs[0].display()
        )));
    }
    // One base for every expert: each attaches its adapters to a copy.
    let (base, tokenizer) = load_pipeline(&folder, device)?;
    let mut sets: Vec<AdapterSet> = Vec::new();
    let mut moments = Vec::new();
    let mut calibration_images = 0;
    for run in runs {
        let (config, checkpoint) = run_config(run)?;
        let own = locate(Path::new(&config.base));
        if own != folder {
            return Err(Error::invalid(format!(
                "{} was trained from {}, {} from {}: experts must share one base",
                runs[0].display(),
                folder.display(),
                run.display(),
                own.display()
            )));
        }
        let mut pipe = base.clone();
        pipe.unet = adapted_unet(run, &config, checkpoint, pipe.unet)?;
        sets.push(
            adapter_set(&pipe.unet)
                .map_err(|e| Error::invalid(format!("{}: {e}", run.display())))?,
        );
        if strategy == MergeStrategy::CoMerge {
            let (images, seen) = probe::record(|| calibrate(&pipe, &tokenizer))?;
            calibration_images = images?;
            moments.push(seen);
        }
    }
    let winners: Option<Winners> = match strategy {
        MergeStrategy::CoMerge => Some(co_merge_gates(&sets, &moments)?),
        MergeStrategy::Average => None,
    };
    let mut pipe = base;
    let n = sets.len();
    let d_out = |m: &str| sets[0].modules[m].1.d_out;
    pipe.unet = attach_combination(pipe.unet, &sets, &|e, m| {
        gates(winners.as_ref(), n, e, m, d_out(m))
    })?;
    let units: usize = sets[0].modules.values().map(|(_, u)| u.d_out).sum();
    let units_kept = (0..n)
        .map(|e| match &winners {
            Some(w) => w.values().flatten().filter(|&&k| k == e).count(),
            None => units,
        })
        .collect();
    let rank = sets
        .iter()
        .map(|s| s.modules.values().next().map_or(0, |(_, u)| u.rank))
        .sum();
    Ok(MergedExperts {
        pipe,
        tokenizer,
        report: MergeReport {
            strategy,
            experts: runs.iter().map(|r| r.display().to_string()).collect(),
            rank,
            modules: sets[0].modules.len(),
            units,
            units_kept,
            calibration_images,
        },
    })
}
