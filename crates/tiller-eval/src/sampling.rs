//! Sampling a pipeline on text prompts, one noise stream per image: the bridge between the
//! Shapes world (tiller-testbed: images as RGB bytes, prompts as text, its tokenizer) and the
//! tensor side (tiller-diffusion).

use burn::tensor::Device;
use std::path::Path;
use tiller_core::{Error, Result, SeededRng};
use tiller_diffusion::pipeline::TextToImage;
use tiller_diffusion::sampling::{Conditioning, ExampleNoise, Record, initial_noise, sample};
use tiller_diffusion::schedulers::SchedulerConfig;
use tiller_testbed::{Image, Tokenizer};

/// A pipeline folder and its tokenizer (`tokenizer/tokenizer.json`).
pub fn load_pipeline(folder: &Path, device: &Device) -> Result<(TextToImage, Tokenizer)> {
    let (pipe, tok_json) = TextToImage::load(folder, device)?;
    let tokenizer = Tokenizer::from_json(&tok_json, &folder.join("tokenizer/tokenizer.json"))?;
    Ok((pipe, tokenizer))
}

/// Token ids as the text encoder takes them.
pub fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<i64>> {
    Ok(tokenizer.encode(text)?.into_iter().map(i64::from).collect())
}

/// The empty prompt (`[bos, eos, eos, ...]`), the unconditional input of guidance.
pub fn empty_prompt(tokenizer: &Tokenizer) -> Vec<i64> {
    encode(tokenizer, "").expect("the empty prompt always encodes")
}

/// How to sample from a pipeline.
#[derive(Debug, Clone)]
pub struct SampleSettings {
    pub scheduler: SchedulerConfig,
    pub steps: usize,
    /// Classifier-free guidance scale; 1 samples the conditional model alone (one pass).
    pub guidance: f64,
    pub batch: usize,
}

impl SampleSettings {
    /// DDIM's eta (1 for the DDPM scheduler, which is ancestral by definition; for a
    /// flow-matching scheduler 0 for the Euler ODE, 1 for the SDE).
    pub fn eta(&self) -> f64 {
        match &self.scheduler {
            SchedulerConfig::Ddim(c) => c.eta,
            SchedulerConfig::Ddpm(_) => 1.0,
            SchedulerConfig::FlowMatch(c) => match c.sde {
                None => 0.0,
                Some(_) => 1.0,
            },
        }
    }

    /// `ddim` (eta 0: deterministic given the initial noise) or `ancestral` (fresh noise at every
    /// step); `ddim(eta=x)` in between; `flow-ode` or `flow-sde(a=...)` for a flow-matching
    /// scheduler.
    pub fn sampler_name(&self) -> String {
        if let SchedulerConfig::FlowMatch(c) = &self.scheduler {
            return match &c.sde {
                None => "flow-ode".into(),
                Some(sde) => format!("flow-sde(a={})", sde.noise_level),
            };
        }
        match self.eta() {
            0.0 => "ddim".into(),
            1.0 => "ancestral".into(),
            eta => format!("ddim(eta={eta})"),
        }
    }
}

/// Samples `seeds.len()` images per prompt text, each from its own stream (stream `p` of its
/// seed for prompt `p`): its initial noise and every step's noise come from it, so any image can
/// be reproduced alone, two prompts never share noise, and the batch size (`settings.batch`
/// images per model call) changes nothing but speed.
pub fn sample_prompts(
    pipe: &TextToImage,
    tokenizer: &Tokenizer,
    texts: &[String],
    seeds: &[u64],
    settings: &SampleSettings,
    device: &Device,
) -> Result<Vec<Vec<Image>>> {
    let res = resolution(pipe)?;
    let channels = pipe.unet_config.in_channels;
    let scheduler = settings.scheduler.build(settings.steps)?;
    let uncond = empty_prompt(tokenizer);
    // (prompt index, seed) for every image, in order.
    let jobs: Vec<(usize, u64)> = (0..texts.len())
        .flat_map(|p| seeds.iter().map(move |&s| (p, s)))
        .collect();
    let ids: Vec<Vec<i64>> = texts
        .iter()
        .map(|t| encode(tokenizer, t))
        .collect::<Result<_>>()?;
    let mut out: Vec<Vec<Image>> = vec![Vec::new(); texts.len()];
    for chunk in jobs.chunks(settings.batch.max(1)) {
        let b = chunk.len();
        let batch_ids: Vec<Vec<i64>> = chunk.iter().map(|(p, _)| ids[*p].clone()).collect();
        let context = pipe.encode(&batch_ids, device)?;
        let mut cond = Conditioning::new(context);
        if settings.guidance != 1.0 {
            let u = pipe.encode(&vec![uncond.clone(); b], device)?;
            cond = cond.with_guidance(u, settings.guidance);
        }
        // One stream per image, for its initial noise and then its step noise: image (prompt p,
        // seed s) draws from stream p of seed s, so it depends on its prompt's index and its seed
        // alone, never on the batch it is sampled in, and no two prompts share a chain's noise.
        let mut noise = ExampleNoise::new(
            chunk
                .iter()
                .map(|(p, seed)| SeededRng::for_example(*seed, *p as u64))
                .collect(),
        );
        let x_t = initial_noise(
            scheduler.as_ref(),
            [b, channels, res, res],
            &mut noise,
            device,
        )?;
        let s = sample(
            &pipe.unet,
            scheduler.as_ref(),
            &cond,
            x_t,
            &mut noise,
            Record::Nothing,
        )?;
        for ((p, _), img) in chunk.iter().zip(tiller_reward::tensor_to_images(s.images)?) {
            out[*p].push(img);
        }
    }
    Ok(out)
}

/// The model's image size (its UNet's `sample_size`).
pub fn resolution(pipe: &TextToImage) -> Result<usize> {
    pipe.resolution()
        .ok_or_else(|| Error::config("unet.sample_size", "the UNet config has no sample_size"))
}

/// Checks that an image size matches the model's resolution.
pub fn check_resolution(pipe: &TextToImage, requested: Option<usize>) -> Result<usize> {
    let res = resolution(pipe)?;
    if let Some(r) = requested
        && r != res
    {
        return Err(Error::invalid(format!(
            "resolution {r} requested, but this model was trained at {res}x{res}; sample at --resolution {res}"
        )));
    }
    Ok(res)
}

/// Writes `pipe` as a pipeline folder with its tokenizer (`tokenizer.json` and the
/// `tokenizer_config.json` transformers' `AutoTokenizer` reads).
pub fn save_pipeline(pipe: &TextToImage, out: &Path, tokenizer: &Tokenizer) -> Result<()> {
    pipe.save(out, &tokenizer.to_json())?;
    tiller_core::fs::atomic_write(
        &out.join("tokenizer/tokenizer_config.json"),
        tokenizer.to_config_json().as_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tiller_diffusion::schedulers::{DdimConfig, FlowMatchConfig, FlowSde};

    fn settings(scheduler: SchedulerConfig) -> SampleSettings {
        SampleSettings {
            scheduler,
            steps: 10,
            guidance: 3.0,
            batch: 4,
        }
    }

    #[test]
    fn the_sampler_is_named_by_its_scheduler() {
        let ddim = |eta| {
            settings(SchedulerConfig::Ddim(DdimConfig {
                eta,
                ..DdimConfig::default()
            }))
        };
        assert_eq!(ddim(0.0).sampler_name(), "ddim");
        assert_eq!(ddim(1.0).sampler_name(), "ancestral");
        assert_eq!(ddim(0.5).sampler_name(), "ddim(eta=0.5)");
        let ode = settings(SchedulerConfig::FlowMatch(FlowMatchConfig::default()));
        assert_eq!((ode.eta(), ode.sampler_name().as_str()), (0.0, "flow-ode"));
        let sde = settings(SchedulerConfig::FlowMatch(FlowMatchConfig {
            sde: Some(FlowSde::default()),
            ..FlowMatchConfig::default()
        }));
        assert_eq!(
            (sde.eta(), sde.sampler_name().as_str()),
            (1.0, "flow-sde(a=0.7)")
        );
    }
}
