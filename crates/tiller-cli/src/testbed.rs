//! Glue between the Shapes world (tiller-testbed: images as RGB bytes, prompts as text) and the
//! tensor side (tiller-diffusion, tiller-engine).

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Tensor};
use tiller_core::SeededRng;
use tiller_diffusion::pipeline::TextToImage;
use tiller_diffusion::sampling::{Conditioning, Record, initial_noise, sample};
use tiller_diffusion::schedulers::SchedulerConfig;
use tiller_engine::denoiser::DenoiserData;
use tiller_testbed::{Image, Prompt, RenderConfig, Tokenizer, render_prompt};

/// Token ids as the text encoder takes them.
pub fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<i64>> {
    Ok(tokenizer.encode(text)?.into_iter().map(i64::from).collect())
}

/// The empty prompt (`[bos, eos, eos, ...]`), the unconditional input of guidance.
pub fn empty_prompt(tokenizer: &Tokenizer) -> Vec<i64> {
    encode(tokenizer, "").expect("the empty prompt always encodes")
}

/// Training batches rendered on the fly from a fixed list of training prompts.
pub struct TestbedData {
    pub prompts: Vec<Prompt>,
    pub tokenizer: Tokenizer,
    pub render: RenderConfig,
}

impl DenoiserData for TestbedData {
    fn batch(
        &mut self,
        n: usize,
        rng: &mut SeededRng,
    ) -> tiller_core::Result<(Vec<Vec<i64>>, Vec<f32>)> {
        let mut ids = Vec::with_capacity(n);
        let mut pixels = Vec::with_capacity(n * 3 * self.render.resolution.pow(2));
        for _ in 0..n {
            let prompt = &self.prompts[rng.below(self.prompts.len())];
            let seed = rng.below(usize::MAX) as u64;
            let rendered = render_prompt(prompt, &self.render, seed)?;
            rendered.image.to_chw_floats(&mut pixels);
            ids.push(
                self.tokenizer
                    .encode(&prompt.text)?
                    .into_iter()
                    .map(i64::from)
                    .collect(),
            );
        }
        Ok((ids, pixels))
    }

    fn empty_prompt(&self) -> Vec<i64> {
        empty_prompt(&self.tokenizer)
    }

    fn image_shape(&self) -> [usize; 3] {
        [3, self.render.resolution, self.render.resolution]
    }
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

/// Samples `seeds.len()` images per prompt text, each from its own seed (so any image can be
/// reproduced alone). Prompts are sampled in batches of `settings.batch`.
pub fn sample_prompts(
    pipe: &TextToImage,
    tokenizer: &Tokenizer,
    texts: &[String],
    seeds: &[u64],
    settings: &SampleSettings,
    device: &Device,
) -> Result<Vec<Vec<Image>>> {
    let res = pipe
        .resolution()
        .context("the UNet config has no sample_size")?;
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
        // One stream per image: its initial noise and step noises depend on its seed alone.
        let mut noises = Vec::with_capacity(b);
        for (_, seed) in chunk {
            let mut rng = SeededRng::new(*seed);
            noises.push(initial_noise(
                scheduler.as_ref(),
                [1, channels, res, res],
                &mut rng,
                device,
            ));
        }
        let x_t = Tensor::cat(noises, 0);
        // Step noise for the batch comes from the first image's seed mixed with the batch layout;
        // images are reproducible for the same (prompts, seeds, batch) request.
        let mut rng = SeededRng::new(chunk[0].1 ^ 0x9e37_79b9_7f4a_7c15);
        let s = sample(
            &pipe.unet,
            scheduler.as_ref(),
            &cond,
            x_t,
            &mut rng,
            Record::Nothing,
        )?;
        for ((p, _), img) in chunk.iter().zip(tiller_reward::tensor_to_images(s.images)?) {
            out[*p].push(img);
        }
    }
    Ok(out)
}

/// Checks that an image size matches the model's resolution.
pub fn check_resolution(pipe: &TextToImage, requested: Option<usize>) -> Result<usize> {
    let res = pipe
        .resolution()
        .context("the UNet config has no sample_size")?;
    if let Some(r) = requested
        && r != res
    {
        bail!(
            "resolution {r} requested, but this model was trained at {res}x{res}; sample at --resolution {res}"
        );
    }
    Ok(res)
}
