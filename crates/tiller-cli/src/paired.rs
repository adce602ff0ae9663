//! `tiller paired`: two `tiller eval` folders compared image by image (`tiller_eval::paired`).

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use tiller_eval::paired::{compare_results, overall, read};

#[derive(Args)]
pub struct PairedArgs {
    /// The first `tiller eval` folder (the baseline).
    pub a: PathBuf,
    /// The second, evaluated on the same suite with the same seeds.
    pub b: PathBuf,
}

pub fn run(args: PairedArgs) -> Result<()> {
    let rows = compare_results(&read(&args.a)?, &read(&args.b)?)?;
    println!(
        "# `{}` (A) vs `{}` (B), paired by prompt and seed\n",
        args.a.display(),
        args.b.display()
    );
    println!("| task | images | A | B | B - A | paired SE | only B right | only A right |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.3} | {:.3} | {:+.3} | {:.3} | {} | {} |",
            r.task,
            r.n,
            r.acc_a,
            r.acc_b,
            r.acc_b - r.acc_a,
            r.se,
            r.only_b,
            r.only_a
        );
    }
    if let Some(o) = overall(&rows) {
        println!(
            "| **overall** (mean of {} GenEval tasks) | {} | {:.3} | {:.3} | **{:+.3}** | {:.3} | {} | {} |",
            o.tasks,
            o.images,
            o.acc_a,
            o.acc_b,
            o.gain(),
            o.se,
            o.only_b,
            o.only_a
        );
        println!(
            "\nSign test on the {} discordant images of those tasks (McNemar, exact, two-sided): p = {:.3}",
            o.only_a + o.only_b,
            o.p
        );
    }
    Ok(())
}
