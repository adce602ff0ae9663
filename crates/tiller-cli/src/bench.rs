//! `tiller bench`: speed and memory of the UNet on this machine, against a PyTorch baseline.
//!
//! Measures, for one diffusers UNet config at a given batch: forward images/s (no graph); a train
//! step (forward + MSE + backward + AdamW) per second; and the peak memory of differentiating a loss
//! on the final sample through 1 and through N DDIM steps (step-level recomputation keeps the
//! latter near the former). Prints a table; with `--baseline` (the JSON line that
//! `scripts/bench/pytorch_unet.py` prints) adds PyTorch's figures and the ratios.
//!
//! Peak memory is the process's peak resident set (VmHWM), reset before each phase through
//! `/proc/self/clear_refs`; it includes the weights and the allocator's caches.

mod ops;

use anyhow::{Context, Result};
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Tensor};
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;
use tiller_core::SeededRng;
use tiller_diffusion::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use tiller_diffusion::sampling::{Conditioning, backprop_through_sampling};
use tiller_diffusion::schedulers::SchedulerConfig;

#[derive(Args)]
pub struct BenchArgs {
    /// A diffusers UNet config.json.
    #[arg(long, default_value = "configs/bench/unet-bench.json")]
    config: PathBuf,
    /// Images per batch.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Length of the encoder hidden states.
    #[arg(long, default_value_t = 8)]
    seq_len: usize,
    /// Timed repetitions per measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// DDIM steps for the differentiable-sampling memory check (0 skips it).
    #[arg(long, default_value_t = 50)]
    chain_steps: usize,
    /// Batch of the differentiable-sampling check.
    #[arg(long, default_value_t = 4)]
    chain_batch: usize,
    /// The JSON line printed by scripts/bench/pytorch_unet.py with the same config and batch.
    #[arg(long)]
    baseline: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Instead of the summary, time every layer call in forward and backward and print the time
    /// per layer type and per convolution shape (see `bench/ops.rs`).
    #[arg(long)]
    ops: bool,
}

/// Peak resident set size in MiB since the last [`reset_peak`], or `None` off Linux.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn reset_peak() {
    // Writing 5 resets the peak RSS counter to the current RSS (Linux >= 4.0).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite times"));
    v[v.len() / 2]
}

fn time_reps(reps: usize, device: &Device, mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    let _ = device.sync();
    let times = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            let _ = device.sync();
            t.elapsed().as_secs_f64()
        })
        .collect();
    median(times)
}

fn inputs(
    config: &UNet2DConditionConfig,
    batch: usize,
    seq_len: usize,
    rng: &mut SeededRng,
    device: &Device,
) -> (Tensor<4>, Tensor<1>, Tensor<3>) {
    let size = config.sample_size.unwrap_or(32);
    let x = rng.normal([batch, config.in_channels, size, size], device);
    let t: Vec<f32> = (0..batch).map(|i| ((i * 997) % 1000) as f32).collect();
    let t = Tensor::<1>::from_floats(t.as_slice(), device);
    let ctx = rng.normal([batch, seq_len, config.cross_attention_dim], device);
    (x, t, ctx)
}

struct Row {
    name: &'static str,
    unit: &'static str,
    ours: f64,
    /// Path into the baseline JSON and whether higher is better.
    baseline: Option<f64>,
    higher_is_better: bool,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let device = tiller_core::device::parse_device(&args.device)?;
    let config: UNet2DConditionConfig =
        tiller_core::config::from_json_file(&crate::shipped::resolve(&args.config))?;
    let baseline: Option<serde_json::Value> = match &args.baseline {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let line = text
                .lines()
                .rev()
                .find(|l| l.trim_start().starts_with('{'))
                .unwrap_or("");
            Some(
                serde_json::from_str(line)
                    .with_context(|| format!("{}: no JSON line", p.display()))?,
            )
        }
        None => None,
    };
    let base = |path: &[&str]| -> Option<f64> {
        let mut v = baseline.as_ref()?;
        for k in path {
            v = v.get(k)?;
        }
        v.as_f64()
    };
    let mut rng = SeededRng::new(0);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    eprintln!(
        "bench: {} (batch {}, {} threads available)",
        args.config.display(),
        args.batch,
        threads
    );

    if args.ops {
        return run_ops(&args, &config, &mut rng, &device);
    }

    // Differentiable sampling first, while the process is small: the allocator keeps what later
    // phases free, which would hide the difference between 1 and N steps.
    let ad = device.clone().autodiff();
    let mut chain_rows = Vec::new();
    if args.chain_steps > 0 {
        let model: UNet2DConditionModel = config.init(&ad)?;
        let mut chain = |steps: usize| -> Result<(f64, f64)> {
            let scheduler = SchedulerConfig::Ddim(Default::default()).build(steps)?;
            let (x, _, ctx) = inputs(&config, args.chain_batch, args.seq_len, &mut rng, &device);
            let cond = Conditioning::new(ctx);
            reset_peak();
            let t0 = Instant::now();
            let out = backprop_through_sampling(
                &model,
                scheduler.as_ref(),
                &cond,
                x,
                &mut rng,
                steps,
                |x0| x0.powi_scalar(2).mean().reshape([1]),
            )?;
            let secs = t0.elapsed().as_secs_f64();
            anyhow::ensure!(!out.grads.is_empty(), "no gradients");
            Ok((peak_rss_mib().unwrap_or(f64::NAN), secs))
        };
        let (one, one_s) = chain(1)?;
        let (many, many_s) = chain(args.chain_steps)?;
        chain_rows.push(Row {
            name: "reward backprop, 1 step: peak RSS",
            unit: "MiB",
            ours: one,
            baseline: None,
            higher_is_better: false,
        });
        chain_rows.push(Row {
            name: "reward backprop, N steps: peak RSS",
            unit: "MiB",
            ours: many,
            baseline: None,
            higher_is_better: false,
        });
        println!(
            "differentiable sampling (batch {}): 1 step {one:.0} MiB in {one_s:.2} s; {} steps {many:.0} MiB in {many_s:.2} s; ratio {:.2}x",
            args.chain_batch,
            args.chain_steps,
            many / one
        );
    }

    // Forward, no graph.
    reset_peak();
    let model = config.init(&device)?;
    let params = model.num_params();
    let (x, t, ctx) = inputs(&config, args.batch, args.seq_len, &mut rng, &device);
    let fwd = time_reps(args.reps, &device, || {
        let _ = model.forward(x.clone(), t.clone(), ctx.clone()).into_data();
    });
    let fwd_peak = peak_rss_mib();
    drop(model);

    // Train step: forward + MSE + backward + AdamW, as the PyTorch script does.
    reset_peak();
    let mut model: UNet2DConditionModel = config.init(&ad)?;
    let mut optim = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.01)
        .init();
    let (x, t, ctx) = inputs(&config, args.batch, args.seq_len, &mut rng, &ad);
    let target = rng.normal(x.dims(), &ad);
    let train = time_reps(args.reps, &ad, || {
        let out = model.forward(x.clone(), t.clone(), ctx.clone());
        let loss = (out - target.clone()).powi_scalar(2).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-4, model.clone(), grads);
    });
    let train_peak = peak_rss_mib();
    drop(model);

    let mut rows = vec![
        Row {
            name: "forward",
            unit: "images/s",
            ours: args.batch as f64 / fwd,
            baseline: base(&["forward", "images_per_s"]),
            higher_is_better: true,
        },
        Row {
            name: "train step (fwd+bwd+AdamW)",
            unit: "steps/s",
            ours: 1.0 / train,
            baseline: base(&["train", "steps_per_s"]),
            higher_is_better: true,
        },
        Row {
            name: "peak RSS, forward",
            unit: "MiB",
            ours: fwd_peak.unwrap_or(f64::NAN),
            baseline: base(&["rss_mib", "peak_after_forward"]),
            higher_is_better: false,
        },
        Row {
            name: "peak RSS, train",
            unit: "MiB",
            ours: train_peak.unwrap_or(f64::NAN),
            baseline: base(&["rss_mib", "peak_after_train"]),
            higher_is_better: false,
        },
    ];
    rows.extend(chain_rows);

    println!(
        "\nUNet {} ({params} parameters), batch {}, seq_len {}",
        args.config.display(),
        args.batch,
        args.seq_len
    );
    println!("| measurement | unit | tiller (burn flex) | pytorch | tiller / pytorch |");
    println!("|---|---|---|---|---|");
    for r in rows {
        let (b, ratio) = match r.baseline {
            Some(b) => (
                format!("{b:.2}"),
                format!(
                    "{:.2}x{}",
                    r.ours / b,
                    if r.higher_is_better {
                        " (speed)"
                    } else {
                        " (memory)"
                    }
                ),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {} | {} | {:.2} | {} | {} |",
            r.name, r.unit, r.ours, b, ratio
        );
    }
    Ok(())
}

/// `--ops`: whole-model forward / train-forward / backward medians, then the per-call walks.
fn run_ops(
    args: &BenchArgs,
    config: &UNet2DConditionConfig,
    rng: &mut SeededRng,
    device: &Device,
) -> Result<()> {
    let ad = device.clone().autodiff();
    let model = config.init(device)?;
    let ad_model: UNet2DConditionModel = config.init(&ad)?;
    let ad_model = ad_model.load_record(model.clone().into_record());
    let (x, t, ctx) = inputs(config, args.batch, args.seq_len, rng, device);
    let (ax, at, actx) = (
        Tensor::from_data(x.to_data(), &ad),
        Tensor::from_data(t.to_data(), &ad),
        Tensor::from_data(ctx.to_data(), &ad),
    );
    let forward = time_reps(args.reps, device, || {
        let _ = model.forward(x.clone(), t.clone(), ctx.clone()).into_data();
    });
    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    for rep in 0..=args.reps {
        let t0 = Instant::now();
        let loss = ad_model
            .forward(ax.clone(), at.clone(), actx.clone())
            .powi_scalar(2)
            .mean();
        let _ = ad.sync();
        let t1 = Instant::now();
        let grads = loss.backward();
        let _ = ad.sync();
        let t2 = Instant::now();
        drop(grads);
        if rep > 0 {
            fwd.push((t1 - t0).as_secs_f64());
            bwd.push((t2 - t1).as_secs_f64());
        }
    }
    let whole = ops::Whole {
        forward,
        train_forward: median(fwd),
        train_backward: median(bwd),
    };
    ops::run(
        &args.config.display().to_string(),
        (&model, x, t, ctx),
        (&ad_model, ax, at, actx),
        args.reps,
        &whole,
    )
}
