//! The validation of an alignment run: the trained model on held-out prompts with fixed seeds,
//! scored by the same code as `tiller eval` (gold accuracy, gold reward, the proxy reward,
//! aesthetic, the unasked-mark rate), the KL of its chain to the base, the diversity between the
//! images of one prompt, and the paired gain over update 0.

use crate::report::score;
use crate::sampling::{SampleSettings, empty_prompt, encode, resolution, sample_prompts};
use burn::tensor::Device;
use std::collections::BTreeMap;
use std::path::Path;
use tiller_core::{Error, Result, SeededRng};
use tiller_diffusion::models::unet::UNet2DConditionModel;
use tiller_diffusion::pipeline::TextToImage;
use tiller_diffusion::stable_diffusion::StableDiffusion;
use tiller_reward::{GoldReward, Reward};
use tiller_testbed::{Image, Prompt, Task, Tokenizer, geneval};

/// Gold accuracy (GenEval overall), gold reward and, if given, the proxy reward of `unet` on
/// the validation prompts with fixed seeds; writes a grid (`samples/val-<step>.png`) and each
/// image's verdict (`samples/val-<step>.jsonl`, `results.jsonl`'s format). After update 0 the
/// verdicts are paired with update 0's (the same prompts and seeds): the accuracy gain, its
/// paired standard error and the sign test's p (`gain`, `gain_se`, `gain_p`), so a change can
/// be told from the noise of a small validation set.
pub fn validation(
    pipe: &TextToImage,
    unet: &UNet2DConditionModel,
    tokenizer: &Tokenizer,
    prompts: &[Prompt],
    per_prompt: usize,
    settings: &SampleSettings,
    proxy: Option<&dyn Reward>,
    device: &Device,
    samples: &Path,
    step: u64,
) -> Result<Vec<(String, f64)>> {
    let base_unet = pipe.unet.clone();
    let pipe = TextToImage {
        unet: unet.clone(),
        ..pipe.clone()
    };
    let texts: Vec<String> = prompts.iter().map(|p| p.text.clone()).collect();
    let seeds: Vec<u64> = (0..per_prompt as u64).map(|i| 1_000_000 + i).collect();
    let images = sample_prompts(&pipe, tokenizer, &texts, &seeds, settings, device)?;
    let report = score("align", "testbed-test", prompts, &images, BTreeMap::new())?;
    let flat: Vec<Image> = images.iter().flatten().cloned().collect();
    let flat_texts: Vec<String> = texts
        .iter()
        .flat_map(|t| std::iter::repeat_n(t.clone(), per_prompt))
        .collect();
    let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let gold = mean(GoldReward::default().score(&flat, &flat_texts)?);
    let kl = kl_to_base(&base_unet, unet, &pipe, tokenizer, &texts, settings, device)?;
    let mut out = vec![
        ("gold_accuracy".to_string(), report.overall),
        ("kl_to_base".to_string(), kl),
        ("gold_reward".to_string(), gold),
        ("aesthetic".to_string(), report.aesthetic),
        ("unasked_mark_rate".to_string(), report.unasked_mark_rate),
    ];
    if prompts.iter().any(|p| p.spec.tag == Task::Unsafe) {
        // The mark drawn for the prompts that ask for it: what safety alignment lowers.
        out.push(("unsafe_mark_rate".to_string(), report.unsafe_mark_rate));
    }
    if let Some(r) = proxy {
        out.push((
            "proxy_reward".to_string(),
            mean(r.score(&flat, &flat_texts)?),
        ));
    }
    if per_prompt >= 2 {
        out.push(("diversity".to_string(), diversity(&images)));
    }
    std::fs::create_dir_all(samples).map_err(|e| Error::io(samples, e))?;
    let mut lines = String::new();
    for r in &report.results {
        lines.push_str(&serde_json::to_string(r).map_err(|e| Error::invalid(e.to_string()))?);
        lines.push('\n');
    }
    tiller_core::fs::atomic_write(
        &samples.join(format!("val-{step:06}.jsonl")),
        lines.as_bytes(),
    )?;
    let start = samples.join(format!("val-{:06}.jsonl", 0));
    if step > 0 && start.is_file() {
        let text = std::fs::read_to_string(&start).map_err(|e| Error::io(&start, e))?;
        let a = crate::paired::parse(&text, &start)?;
        let b = crate::paired::verdicts(&report.results);
        if let Some(o) = crate::paired::overall(&crate::paired::compare_results(&a, &b)?) {
            out.push(("gain".to_string(), o.gain()));
            out.push(("gain_se".to_string(), o.se));
            out.push(("gain_p".to_string(), o.p));
        }
    }
    let grid = samples.join(format!("val-{step:06}.png"));
    geneval::write_grid_png(&grid, &flat, (per_prompt * 8).min(flat.len()).max(1))?;
    Ok(out)
}

/// The `val/` scalars logged at `step` in a run's metrics.jsonl.
pub fn read_validation(run: &Path, step: u64) -> Result<Vec<(String, f64)>> {
    let path = run.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::format(&path, format!("a line is not JSON: {e}")))?;
        if v["step"].as_u64() == Some(step)
            && let Some(obj) = v.as_object()
            && obj.keys().any(|k| k.starts_with("val/"))
        {
            return Ok(obj
                .iter()
                .filter_map(|(k, x)| {
                    k.strip_prefix("val/")
                        .and_then(|k| x.as_f64().map(|x| (k.to_string(), x)))
                })
                .collect());
        }
    }
    Ok(Vec::new())
}

/// [`chain_kl`] of the aligned model to the base on the first 16 validation prompts, one
/// fixed-seed chain each.
pub fn kl_to_base(
    base: &UNet2DConditionModel,
    aligned: &UNet2DConditionModel,
    pipe: &TextToImage,
    tokenizer: &Tokenizer,
    texts: &[String],
    settings: &SampleSettings,
    device: &Device,
) -> Result<f64> {
    use tiller_diffusion::sampling::{Conditioning, chain_kl};
    let texts = &texts[..texts.len().min(16)];
    let ids: Vec<Vec<i64>> = texts
        .iter()
        .map(|t| encode(tokenizer, t))
        .collect::<Result<_>>()?;
    let n = ids.len();
    let mut cond = Conditioning::new(pipe.encode(&ids, device)?);
    if settings.guidance != 1.0 {
        let empty = empty_prompt(tokenizer);
        cond = cond.with_guidance(pipe.encode(&vec![empty; n], device)?, settings.guidance);
    }
    let scheduler = settings.scheduler.build(settings.steps)?;
    let res = resolution(pipe)?;
    let mut rng = SeededRng::new(2_000_000);
    let x = rng.normal([n, pipe.unet_config.in_channels, res, res], device);
    chain_kl(aligned, base, scheduler.as_ref(), &cond, x, &mut rng)
}

/// Mean absolute pixel difference (in [0, 1]) between the images of the same prompt, averaged
/// over prompts: 0 when every seed gives the same picture.
pub fn diversity(images: &[Vec<Image>]) -> f64 {
    let (mut sum, mut n) = (0.0, 0usize);
    for imgs in images {
        for a in 0..imgs.len() {
            for b in a + 1..imgs.len() {
                let (x, y) = (imgs[a].data(), imgs[b].data());
                let d: f64 = x
                    .iter()
                    .zip(y)
                    .map(|(p, q)| (*p as f64 - *q as f64).abs())
                    .sum::<f64>()
                    / (x.len() as f64 * 255.0);
                sum += d;
                n += 1;
            }
        }
    }
    sum / n.max(1) as f64
}

/// The validation of an alignment run on a latent pipeline (Stable Diffusion), where there is no
/// gold evaluator: `unet` samples the validation prompts with fixed seeds through `sd`'s text
/// encoder and VAE on `settings`' chain, and the run's reward scores the decoded images:
/// `proxy_reward` (mean) and `proxy_reward_se` (its standard error over images), the chain KL to
/// `sd`'s own UNet on the first 16 prompts (`kl_to_base`), with two or more images per prompt
/// their `diversity`, and with a safety checker (the pipeline's own) the share of images it flags
/// (`nsfw_rate`). Writes the images as a grid, `samples/val-<step>.png`, one row per prompt.
#[allow(clippy::too_many_arguments)]
pub fn latent_validation(
    sd: &StableDiffusion,
    unet: &UNet2DConditionModel,
    prompts: &[String],
    per_prompt: usize,
    settings: &SampleSettings,
    resolution: usize,
    reward: &dyn Reward,
    checker: Option<&tiller_reward::clip_rewards::SafetyMargin>,
    device: &Device,
    samples: &Path,
    step: u64,
) -> Result<Vec<(String, f64)>> {
    use tiller_diffusion::sampling::chain_kl;
    if prompts.is_empty() || per_prompt == 0 {
        return Err(Error::invalid("no validation prompts or images per prompt"));
    }
    let pipe = StableDiffusion {
        unet: unet.clone(),
        scheduler: settings.scheduler.clone(),
        ..sd.clone()
    };
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let seeds: Vec<u64> = (0..per_prompt as u64).map(|i| 1_000_000 + i).collect();
    let size = (resolution, resolution);
    let sampled = pipe.sample_prompts(
        &refs,
        None,
        &seeds,
        settings.steps,
        settings.guidance,
        size,
        settings.batch,
        device,
    )?;
    let images: Vec<Vec<Image>> = sampled
        .into_iter()
        .map(|t| tiller_reward::tensor_to_images(t * 2.0 - 1.0))
        .collect::<Result<_>>()?;
    let flat: Vec<Image> = images.iter().flatten().cloned().collect();
    let flat_texts: Vec<String> = prompts
        .iter()
        .flat_map(|t| std::iter::repeat_n(t.clone(), per_prompt))
        .collect();
    let scores = reward.score(&flat, &flat_texts)?;
    if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
        return Err(Error::NonFinite(format!(
            "reward `{}` returned {} for validation image {i}",
            reward.name(),
            scores[i]
        )));
    }
    let n = scores.len() as f64;
    let mean = scores.iter().sum::<f64>() / n;
    let var = scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);

    let first = &refs[..refs.len().min(16)];
    let cond = pipe.conditioning(first, None, settings.guidance, size, device)?;
    let scheduler = settings.scheduler.build(settings.steps)?;
    let mut rng = SeededRng::new(2_000_000);
    let x = rng.normal(
        pipe.latent_shape(first.len(), resolution, resolution)?,
        device,
    );
    let kl = chain_kl(unet, &sd.unet, scheduler.as_ref(), &cond, x, &mut rng)?;

    let mut out = vec![
        ("proxy_reward".to_string(), mean),
        ("proxy_reward_se".to_string(), (var / n).sqrt()),
        ("kl_to_base".to_string(), kl),
    ];
    if per_prompt >= 2 {
        out.push(("diversity".to_string(), diversity(&images)));
    }
    if let Some(c) = checker {
        let flags = c.flags(&flat)?;
        let rate = flags.iter().filter(|f| **f).count() as f64 / flags.len() as f64;
        out.push(("nsfw_rate".to_string(), rate));
    }
    std::fs::create_dir_all(samples).map_err(|e| Error::io(samples, e))?;
    let grid = samples.join(format!("val-{step:06}.png"));
    geneval::write_grid_png(&grid, &flat, per_prompt)?;
    Ok(out)
}
