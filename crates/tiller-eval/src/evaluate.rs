//! One evaluation end to end: a suite's prompts, each sampled with fixed seeds (or rendered by
//! the training renderer, the oracle), optionally best-of-N, scored and written as a report
//! folder. `tiller eval` and the quickstart call this.

use crate::report::{BestOfSummary, Report, best_of, score, write_report};
use crate::sampling::{SampleSettings, sample_prompts};
use crate::suite::suite;
use burn::tensor::Device;
use std::collections::BTreeMap;
use std::path::Path;
use tiller_core::Result;
use tiller_diffusion::pipeline::TextToImage;
use tiller_reward::{GoldReward, Reward};
use tiller_testbed::{Image, RenderConfig, Task, Tokenizer, render_prompt};

/// Where the images come from.
pub enum Source<'a> {
    /// The training renderer itself: the upper bound any model can reach.
    Renderer,
    /// A pipeline, sampled with `settings`.
    Model {
        pipe: &'a TextToImage,
        tokenizer: &'a Tokenizer,
        settings: SampleSettings,
        device: &'a Device,
    },
}

/// What to evaluate and how much.
pub struct Evaluation<'a> {
    /// The model's name in the report.
    pub name: String,
    pub source: Source<'a>,
    /// A suite name ([`crate::suite::SUITES`]).
    pub suite: String,
    /// Prompts per task (`None`: all of the suite's).
    pub per_task: Option<usize>,
    /// Only these tasks' prompts (empty: every task's).
    pub tasks: Vec<Task>,
    /// Images per prompt; image `j` of a prompt has seed `seed + j` (times N with best-of-N).
    pub per_prompt: usize,
    pub seed: u64,
    /// Best-of-N: N candidates per image and the reward that picks among them.
    pub best_of: Option<(usize, &'a dyn Reward)>,
}

/// Samples, scores and writes the report folder `out`; returns the report.
pub fn evaluate(e: Evaluation<'_>, out: &Path) -> Result<Report> {
    let prompts: Vec<_> = suite(&e.suite, e.per_task)?
        .into_iter()
        .filter(|p| e.tasks.is_empty() || e.tasks.contains(&p.spec.tag))
        .collect();
    if prompts.is_empty() {
        return Err(tiller_core::Error::invalid(format!(
            "suite `{}` has no prompts of the tasks asked for",
            e.suite
        )));
    }
    let n = e.best_of.map_or(1, |(n, _)| n.max(1));
    let seeds: Vec<u64> = (0..(e.per_prompt * n) as u64).map(|i| e.seed + i).collect();
    let mut settings = BTreeMap::new();
    let texts: Vec<String> = prompts.iter().map(|p| p.text.clone()).collect();
    let images: Vec<Vec<Image>> = match &e.source {
        Source::Renderer => {
            let config = RenderConfig::default();
            settings.insert(
                "renderer".into(),
                "training renderer, default RenderConfig".into(),
            );
            prompts
                .iter()
                .map(|p| {
                    seeds
                        .iter()
                        .map(|&s| Ok(render_prompt(p, &config, s)?.image))
                        .collect::<Result<Vec<_>>>()
                })
                .collect::<Result<_>>()?
        }
        Source::Model {
            pipe,
            tokenizer,
            settings: s,
            device,
        } => {
            settings.insert("steps".into(), s.steps.to_string());
            settings.insert("guidance".into(), s.guidance.to_string());
            settings.insert("eta".into(), s.eta().to_string());
            settings.insert("sampler".into(), s.sampler_name());
            sample_prompts(pipe, tokenizer, &texts, &seeds, s, device)?
        }
    };
    settings.insert(
        "seeds".into(),
        format!("{}..{}", e.seed, e.seed + seeds.len() as u64),
    );
    let (images, summary) = match e.best_of {
        Some((_, reward)) if n > 1 => {
            // One candidate set gives three answers: plain sampling (each group's first
            // candidate), best-of-N by the chosen reward, and best-of-N by the gold reward (the
            // upper bound).
            settings.insert("best_of".into(), format!("{n} by {}", reward.name()));
            let plain: Vec<Vec<Image>> = images
                .iter()
                .map(|c| c.chunks(n).map(|g| g[0].clone()).collect())
                .collect();
            let by_gold = best_of(images.clone(), &texts, n, &GoldReward::default())?;
            let by_reward = best_of(images, &texts, n, reward)?;
            let overall = |imgs: &[Vec<Image>]| -> Result<f64> {
                Ok(score(&e.name, &e.suite, &prompts, imgs, BTreeMap::new())?.overall)
            };
            let summary = BestOfSummary {
                n,
                reward: reward.name(),
                plain_overall: overall(&plain)?,
                reward_overall: overall(&by_reward)?,
                gold_overall: overall(&by_gold)?,
            };
            (by_reward, Some(summary))
        }
        _ => (images, None),
    };
    let mut report = score(&e.name, &e.suite, &prompts, &images, settings)?;
    report.best_of = summary;
    write_report(out, &report, &prompts, &images)?;
    Ok(report)
}
