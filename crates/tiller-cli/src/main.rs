//! `tiller`: the command-line shell over Tiller's libraries. Parse flags, resolve, call the library.

mod align;
mod args;
mod base;
mod bench;
mod compare;
mod eval;
mod feedback;
mod model_check;
mod paired;
mod quickstart;
mod reward;
mod shipped;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Align text-to-image diffusion models with human preferences and safety constraints.
#[derive(Parser)]
#[command(name = "tiller", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect diffusers/transformers model folders.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Measure the UNet's forward, train-step and differentiable-sampling speed and memory, and
    /// compare with a PyTorch baseline from scripts/bench/pytorch_unet.py.
    Bench(bench::BenchArgs),
    /// Sample a grid of images from a text-to-image model folder.
    Sample(eval::SampleArgs),
    /// Evaluate a model (or the training renderer) on a testbed prompt suite with the gold evaluator.
    Eval(eval::EvalArgs),
    /// The whole testbed loop in about ten minutes: the renderer's bound, the shipped base,
    /// simulated feedback, a reward model, best-of-N and DRaFT-K, ending in `report.html`.
    Quickstart(quickstart::QuickstartArgs),
    /// The testbed's base model.
    Base {
        #[command(subcommand)]
        command: BaseCommand,
    },
    /// Human (or simulated) feedback in the preference store.
    Feedback {
        #[command(subcommand)]
        command: FeedbackCommand,
    },
    /// Reward models trained on the preference store.
    Reward {
        #[command(subcommand)]
        command: RewardCommand,
    },
    /// Align a model with one method on the testbed (`tiller methods` lists them).
    Align(align::AlignArgs),
    /// List the alignment methods: name, paper, preset.
    Methods,
    /// Run several methods under one reward-query budget and compare them.
    Compare(compare::CompareArgs),
    /// Merge an alignment run's LoRA into its base and write a diffusers-layout pipeline.
    Merge(align::MergeArgs),
    /// Compare two `tiller eval` folders image by image (same prompts and seeds): each task's
    /// accuracy difference with a paired standard error, and a sign test on the discordant images.
    Paired(paired::PairedArgs),
}

#[derive(Subcommand)]
enum FeedbackCommand {
    /// Simulated annotators label model samples into the preference store.
    Collect(feedback::CollectArgs),
    /// Safe/unsafe pairs for SafetyDPO in CoProV2's form: each unsafe prompt and its minimally
    /// different safe twin drawn by the model from the same noise, the safe image preferred.
    SafetyPairs(feedback::SafetyPairsArgs),
}

#[derive(Subcommand)]
enum RewardCommand {
    /// Contrastive (CLIP-style) pretraining of the reward network's towers on captioned renderer
    /// drawings; `init = <folder>` in a reward config starts training from them.
    Pretrain(reward::PretrainArgs),
    /// Train a reward ensemble on the store's training-split feedback.
    Train(reward::TrainArgs),
    /// Held-out accuracy against the annotator ceiling, calibration and correlation with the truth.
    Eval(reward::EvalArgs),
    /// Late fusion: reward folders and caption matches standardised over a store's images
    /// (label-free) and summed, written as one folder that `--reward` and `reward eval` load.
    Fuse(reward::FuseArgs),
    /// Score PNG images listed in a JSONL manifest with any reward (`gold`, `jpeg`, a reward
    /// folder), e.g. another program's rollouts.
    Score(reward::ScoreArgs),
}

#[derive(Subcommand)]
enum BaseCommand {
    /// Train the base text encoder and UNet from scratch on the Shapes world.
    Train(base::TrainArgs),
    /// Write a checkpoint of a `base train` run as a pipeline folder (diffusers layout).
    Export(base::ExportArgs),
    /// One stage of progressive distillation: a student that samples in N deterministic steps
    /// what its teacher samples in 2N, without guidance.
    Distill(base::DistillArgs),
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Load a model folder (config.json + safetensors), print its config and parameter count, and
    /// optionally run one forward pass on named input tensors.
    Check {
        /// A diffusers `UNet2DConditionModel` or `AutoencoderKL` folder, a Stable Diffusion
        /// pipeline folder (`model_index.json`), or a transformers
        /// `CLIPTextModel(WithProjection)`, `CLIPVisionModel(WithProjection)` or `CLIPModel` folder.
        folder: PathBuf,
        /// Weight variant, e.g. `fp16` for `diffusion_pytorch_model.fp16.safetensors`.
        #[arg(long)]
        variant: Option<String>,
        /// Input tensors named as diffusers/transformers name the forward arguments: `sample`,
        /// `timestep`, `encoder_hidden_states` (UNet; SDXL's also `text_embeds`, `time_ids`),
        /// `input_ids` (CLIP), or `sample` and/or `latents` (VAE).
        #[arg(long, requires = "out")]
        inputs: Option<PathBuf>,
        /// Where to write the outputs (`sample`; or `last_hidden_state`, `pooler_output`).
        #[arg(long, requires = "inputs")]
        out: Option<PathBuf>,
        /// `cpu`, or `cuda[:N]` / `vulkan[:N]` in a build with that feature.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Compare the outputs with the same-named tensors of this file (e.g. another device's
        /// `--out`): prints each max |difference| relative to the reference's largest magnitude
        /// and fails above `--tolerance`.
        #[arg(long, requires = "out")]
        compare: Option<PathBuf>,
        /// The largest relative difference `--compare` accepts.
        #[arg(long, default_value_t = 1e-3)]
        tolerance: f64,
    },
}

/// Commands that write a new folder refuse an existing one, before any work and before writing.
pub(crate) fn ensure_new_out(out: &std::path::Path) -> Result<()> {
    tiller_core::fs::ensure_new(out).map_err(|e| anyhow::anyhow!("--out {e}"))
}

fn args_out(args: &eval::EvalArgs) -> PathBuf {
    args.out().to_path_buf()
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Model {
            command:
                ModelCommand::Check {
                    folder,
                    variant,
                    inputs,
                    out,
                    device,
                    compare,
                    tolerance,
                },
        } => model_check::run(
            &folder,
            variant.as_deref(),
            inputs.zip(out),
            &device,
            compare.map(|c| (c, tolerance)),
        ),
        Command::Bench(args) => bench::run(args),
        Command::Base {
            command: BaseCommand::Train(args),
        } => base::train(args),
        Command::Base {
            command: BaseCommand::Export(args),
        } => base::export(args),
        Command::Base {
            command: BaseCommand::Distill(args),
        } => base::distill(args),
        Command::Sample(args) => eval::sample(args),
        Command::Feedback {
            command: FeedbackCommand::Collect(args),
        } => feedback::collect(args).map(|_| ()),
        Command::Feedback {
            command: FeedbackCommand::SafetyPairs(args),
        } => feedback::safety_pairs(args),
        Command::Reward {
            command: RewardCommand::Pretrain(args),
        } => reward::pretrain(args),
        Command::Reward {
            command: RewardCommand::Train(args),
        } => reward::train(args),
        Command::Reward {
            command: RewardCommand::Eval(args),
        } => reward::eval(args).map(|_| ()),
        Command::Reward {
            command: RewardCommand::Fuse(args),
        } => reward::fuse(args),
        Command::Reward {
            command: RewardCommand::Score(args),
        } => reward::score(args),
        Command::Eval(args) => {
            let out = args_out(&args);
            let report = eval::eval(args)?;
            println!("{}", tiller_eval::report::markdown(&report));
            println!("report written to {}", out.display());
            Ok(())
        }
        Command::Quickstart(args) => quickstart::quickstart(args),
        Command::Compare(args) => compare::compare(args).map(|_| ()),
        Command::Merge(args) => align::merge(args),
        Command::Paired(args) => paired::run(args),
        Command::Methods => {
            println!("{}", align::methods_table());
            Ok(())
        }
        Command::Align(args) => {
            let s = align::align(args)?;
            println!("{}", tiller_align::run::summary_markdown(&s));
            Ok(())
        }
    }
}
