//! `tiller`: the command-line shell over Tiller's libraries. Parse flags, resolve, call the library.

mod bench;
mod model_check;

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
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Load a model folder (config.json + safetensors), print its config and parameter count, and
    /// optionally run one forward pass on named input tensors.
    Check {
        /// A diffusers `UNet2DConditionModel` or transformers `CLIPTextModel` folder.
        folder: PathBuf,
        /// Weight variant, e.g. `fp16` for `diffusion_pytorch_model.fp16.safetensors`.
        #[arg(long)]
        variant: Option<String>,
        /// Input tensors named as diffusers/transformers name the forward arguments: `sample`,
        /// `timestep`, `encoder_hidden_states` (UNet) or `input_ids` (CLIP).
        #[arg(long, requires = "out")]
        inputs: Option<PathBuf>,
        /// Where to write the outputs (`sample`; or `last_hidden_state`, `pooler_output`).
        #[arg(long, requires = "inputs")]
        out: Option<PathBuf>,
        /// `cpu`, or `cuda[:N]` in a build with the `cuda` feature.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
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
                },
        } => model_check::run(&folder, variant.as_deref(), inputs.zip(out), &device),
        Command::Bench(args) => bench::run(args),
    }
}
