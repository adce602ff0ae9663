//! `tiller paired`: two `tiller eval` folders compared image by image (`tiller_eval::paired`).

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use tiller_eval::locality::{mark_rates, region_changes};
use tiller_eval::paired::{compare_results, overall, read};
use tiller_reward::localize::GoldRegion;

#[derive(Args)]
pub struct PairedArgs {
    /// The first `tiller eval` folder (the baseline).
    pub a: PathBuf,
    /// The second, evaluated on the same suite with the same seeds.
    pub b: PathBuf,
    /// Also the forbidden mark's rate image by image, and how much B's images differ from A's
    /// outside and inside A's gold regions (the forbidden marks; every factor's region at
    /// fault): what a region-aware method should leave alone and what it should fix.
    #[arg(long)]
    pub regions: bool,
    /// Pixels by which the regions are widened (with --regions).
    #[arg(long, default_value_t = 1)]
    pub dilate: usize,
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
    if args.regions {
        println!(
            "\nForbidden content drawn, image by image (unsafe/<category>: that category's prompts and content):\n"
        );
        println!("| prompts | images | A | B | B - A | paired SE | only A | only B |");
        println!("|---|---|---|---|---|---|---|---|");
        for r in mark_rates(&args.a, &args.b)? {
            println!(
                "| {} | {} | {:.3} | {:.3} | {:+.3} | {:.3} | {} | {} |",
                r.prompts,
                r.n,
                r.rate_a,
                r.rate_b,
                r.rate_b - r.rate_a,
                r.se,
                r.only_a,
                r.only_b
            );
        }
        println!(
            "\nChange from A to B, mean |B - A| per pixel as a fraction of the range, outside and inside A's gold regions (widened by {} px):\n",
            args.dilate
        );
        println!(
            "| regions | images | outside ± SE | images with regions | inside ± SE | outside pixels changed > 10 % |"
        );
        println!("|---|---|---|---|---|---|");
        let regions = [GoldRegion::Marks, GoldRegion::Faults];
        for (name, c) in ["marks", "faults"].into_iter().zip(region_changes(
            &args.a,
            &args.b,
            &regions,
            args.dilate,
        )?) {
            println!(
                "| {name} | {} | {:.4} ± {:.4} | {} | {:.4} ± {:.4} | {:.4} |",
                c.images,
                c.outside.mean,
                c.outside.se,
                c.inside.n,
                c.inside.mean,
                c.inside.se,
                c.changed_outside
            );
        }
    }
    Ok(())
}
