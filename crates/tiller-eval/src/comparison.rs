//! A comparison of alignment runs under one reward-query budget: each run's validation points
//! (from its metrics.jsonl), the reward queries each method needed to reach a target accuracy,
//! and the report as Markdown and as an SVG of the curves.

use crate::noise_scale::{NoiseScale, describe_noise};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use tiller_core::{Error, Result};

/// One validation point of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub update: u64,
    pub reward_queries: f64,
    pub wall_s: f64,
    pub gold_accuracy: f64,
    pub gold_reward: f64,
    pub proxy_reward: Option<f64>,
    pub kl_to_base: Option<f64>,
    pub diversity: Option<f64>,
    /// Gold accuracy gain over update 0 on the same images' prompts and seeds, its paired
    /// standard error and the sign test's p (absent at update 0).
    pub gain: Option<f64>,
    pub gain_se: Option<f64>,
    pub gain_p: Option<f64>,
}

impl Point {
    /// Whether the gain over the start exceeds twice its paired standard error.
    pub fn significant_gain(&self) -> bool {
        matches!((self.gain, self.gain_se), (Some(g), Some(se)) if g > 2.0 * se)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct MethodRun {
    pub name: String,
    pub run: PathBuf,
    pub points: Vec<Point>,
    /// Reward queries at the first validation reaching the target (None: never).
    pub queries_to_target: Option<f64>,
    /// The run's gradient noise scale (runs with accumulated micro-batches).
    pub noise_scale: Option<NoiseScale>,
    /// Examples per update.
    pub batch: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub budget: u64,
    /// The gold accuracy each method is timed to: `--target`, or the best DDPO validation with
    /// a significant gain (None: neither).
    pub target: Option<f64>,
    /// Whether the target came from `--target`.
    pub target_given: bool,
    pub methods: Vec<MethodRun>,
}

/// DDPO's best validation accuracy among the points whose gain over its start is significant
/// (more than twice the paired standard error): a target that is not the noise of a small
/// validation set.
pub fn ddpo_target(methods: &[MethodRun]) -> Option<f64> {
    methods
        .iter()
        .find(|m| m.name == "ddpo")?
        .points
        .iter()
        .filter(|p| p.significant_gain())
        .map(|p| p.gold_accuracy)
        .reduce(f64::max)
}

/// The validation rows of a run's metrics.jsonl.
pub fn read_points(run: &Path) -> Result<Vec<Point>> {
    let path = run.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::format(&path, format!("a line is not JSON: {e}")))?;
        let Some(gold) = v.get("val/gold_accuracy").and_then(|x| x.as_f64()) else {
            continue;
        };
        let f = |k: &str| v.get(k).and_then(|x| x.as_f64());
        out.push(Point {
            update: v["step"].as_u64().unwrap_or(0),
            reward_queries: f("val/reward_queries").unwrap_or(0.0),
            wall_s: f("val/wall_s").unwrap_or(0.0),
            gold_accuracy: gold,
            gold_reward: f("val/gold_reward").unwrap_or(f64::NAN),
            proxy_reward: f("val/proxy_reward"),
            kl_to_base: f("val/kl_to_base"),
            diversity: f("val/diversity"),
            gain: f("val/gain"),
            gain_se: f("val/gain_se"),
            gain_p: f("val/gain_p"),
        });
    }
    Ok(out)
}

fn opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into())
}

pub fn markdown(c: &Comparison) -> String {
    let mut s = format!(
        "# Method comparison (budget {} reward queries)\n\nGold accuracy: GenEval-style overall on held-out prompts; proxy: the reward the method optimised. Before -> after; the gain is paired with the start (same prompts and seeds), ± its standard error.\n\n| method | gold accuracy | gain ± SE (p) | gold reward | proxy reward | KL to base | diversity | reward queries | wall s | queries to target |\n|---|---|---|---|---|---|---|---|---|---|\n",
        c.budget
    );
    for m in &c.methods {
        let (Some(a), Some(b)) = (m.points.first(), m.points.last()) else {
            continue;
        };
        let gain = match (b.gain, b.gain_se, b.gain_p) {
            (Some(g), Some(se), Some(p)) => format!("{g:+.3} ± {se:.3} ({p:.2})"),
            _ => "-".to_string(),
        };
        let _ = writeln!(
            s,
            "| {} | {:.3} -> {:.3} | {gain} | {:.3} -> {:.3} | {} -> {} | {} | {} -> {} | {:.0} | {:.0} | {} |",
            m.name,
            a.gold_accuracy,
            b.gold_accuracy,
            a.gold_reward,
            b.gold_reward,
            opt(a.proxy_reward),
            opt(b.proxy_reward),
            opt(b.kl_to_base),
            opt(a.diversity),
            opt(b.diversity),
            b.reward_queries,
            b.wall_s,
            match (c.target, m.queries_to_target) {
                (None, _) => "-".to_string(),
                (Some(_), Some(q)) => format!("{q:.0}"),
                (Some(_), None) => "not reached".to_string(),
            },
        );
    }
    match c.target {
        Some(t) => {
            let source = if c.target_given {
                "given by --target"
            } else {
                "DDPO's best validation with a gain over twice its paired standard error"
            };
            let _ = writeln!(s, "\nTarget gold accuracy {t:.3} ({source}).");
            let ddpo = c
                .methods
                .iter()
                .find(|m| m.name == "ddpo")
                .and_then(|m| m.queries_to_target);
            for m in c.methods.iter().filter(|m| m.name != "ddpo") {
                if let (Some(d), Some(q)) = (ddpo, m.queries_to_target) {
                    let _ = writeln!(
                        s,
                        "- {} reaches it with {q:.0} reward queries, DDPO with {d:.0}: queries ratio DDPO / {} = {:.2}.",
                        m.name,
                        m.name,
                        d / q.max(1.0)
                    );
                }
            }
        }
        None => {
            let best = c.methods.iter().find(|m| m.name == "ddpo").and_then(|m| {
                m.points
                    .iter()
                    .filter_map(|p| Some((p.update, p.gain?, p.gain_se?)))
                    .max_by(|x, y| x.1.total_cmp(&y.1))
            });
            s.push_str(
                "\nDDPO's validation never gained more than twice its paired standard error, so there is no target to compare queries against (set one with --target).",
            );
            if let Some((u, g, se)) = best {
                let _ = write!(s, " Its best: {g:+.3} ± {se:.3} at update {u}.");
            }
            s.push('\n');
        }
    }
    let scales: Vec<(&MethodRun, &NoiseScale)> = c
        .methods
        .iter()
        .filter_map(|m| m.noise_scale.as_ref().map(|n| (m, n)))
        .collect();
    if !scales.is_empty() {
        s.push_str("\nGradient noise scale (McCandlish et al. 2018: the examples per update at which a step's signal equals its noise), in each method's own examples (rollouts, pairs, reward gradients):\n");
        for (m, n) in &scales {
            let _ = writeln!(s, "- {}: {}.", m.name, describe_noise(n, m.batch));
        }
        let find = |name: &str| scales.iter().find(|(m, _)| m.name == name).map(|x| x.1);
        if let (Some(d), Some(k)) = (find("ddpo"), find("draft-k"))
            && d.b_lower.is_finite()
            && k.b_upper.is_finite()
        {
            let _ = writeln!(
                s,
                "- DDPO needs at least {:.1} times as many examples per update as DRaFT-K for the same share of signal (DDPO's lower bound over DRaFT-K's upper bound, 95% each){}.",
                d.b_lower / k.b_upper,
                if k.signal_sq > 2.0 * k.signal_se {
                    format!(
                        "; {:.0} times against DRaFT-K's estimate of {:.0}",
                        d.b_lower / k.b_simple,
                        k.b_simple
                    )
                } else {
                    String::new()
                }
            );
        }
    }
    s
}

/// Two panels side by side: gold accuracy and proxy reward against reward queries, one line per
/// method; a third against wall time.
pub fn svg(c: &Comparison) -> String {
    const COLORS: [&str; 6] = [
        "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
    ];
    let (w, h, pad) = (300.0, 220.0, 40.0);
    type Get = fn(&Point) -> Option<f64>;
    let panels: [(&str, &str, Get, Get); 3] = [
        (
            "gold accuracy",
            "reward queries",
            |p| Some(p.reward_queries),
            |p| Some(p.gold_accuracy),
        ),
        (
            "proxy reward",
            "reward queries",
            |p| Some(p.reward_queries),
            |p| p.proxy_reward,
        ),
        (
            "gold accuracy",
            "wall time (s)",
            |p| Some(p.wall_s),
            |p| Some(p.gold_accuracy),
        ),
    ];
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n",
        3.0 * w,
        h + 30.0
    );
    for (k, (title, xlabel, fx, fy)) in panels.iter().enumerate() {
        let ox = k as f64 * w;
        let pts: Vec<(f64, f64)> = c
            .methods
            .iter()
            .flat_map(|m| m.points.iter().filter_map(|p| Some((fx(p)?, fy(p)?))))
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        if pts.is_empty() {
            continue;
        }
        let (x0, x1) = bounds(pts.iter().map(|p| p.0));
        let (y0, y1) = bounds(pts.iter().map(|p| p.1));
        let sx = |x: f64| ox + pad + (x - x0) / (x1 - x0) * (w - 1.5 * pad);
        let sy = |y: f64| h - pad + 10.0 - (y - y0) / (y1 - y0) * (h - 1.5 * pad);
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"14\" font-weight=\"bold\">{title}</text>\n<text x=\"{}\" y=\"{}\">{xlabel}</text>\n<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#999\"/>",
            ox + pad,
            ox + pad,
            h + 20.0,
            ox + pad,
            pad / 2.0 + 10.0,
            w - 1.5 * pad,
            h - 1.5 * pad,
        );
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{y1:.3}</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{y0:.3}</text><text x=\"{}\" y=\"{}\">{x0:.0}</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{x1:.0}</text>",
            ox + pad - 2.0,
            sy(y1) + 4.0,
            ox + pad - 2.0,
            sy(y0),
            sx(x0),
            h + 6.0,
            sx(x1),
            h + 6.0,
        );
        for (i, m) in c.methods.iter().enumerate() {
            let line: Vec<String> = m
                .points
                .iter()
                .filter_map(|p| Some((fx(p)?, fy(p)?)))
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .map(|(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
                .collect();
            let color = COLORS[i % COLORS.len()];
            let _ = writeln!(
                s,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
                line.join(" ")
            );
            if k == 0 {
                let _ = writeln!(
                    s,
                    "<text x=\"{}\" y=\"{}\" fill=\"{color}\">{}</text>",
                    ox + pad + 6.0,
                    pad + 14.0 * (i as f64 + 1.0),
                    m.name
                );
            }
        }
    }
    s.push_str("</svg>\n");
    s
}

fn bounds(v: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = v.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    if hi - lo < 1e-9 {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(update: u64, acc: f64, gain: Option<(f64, f64)>) -> Point {
        Point {
            update,
            reward_queries: update as f64 * 32.0,
            wall_s: 0.0,
            gold_accuracy: acc,
            gold_reward: 0.0,
            proxy_reward: None,
            kl_to_base: None,
            diversity: None,
            gain: gain.map(|g| g.0),
            gain_se: gain.map(|g| g.1),
            gain_p: gain.map(|_| 0.5),
        }
    }

    fn run(name: &str, points: Vec<Point>) -> MethodRun {
        MethodRun {
            name: name.into(),
            run: PathBuf::from(name),
            points,
            queries_to_target: None,
            noise_scale: None,
            batch: 32,
        }
    }

    #[test]
    fn the_ddpo_target_needs_a_gain_over_twice_its_standard_error() {
        // 0.40 is DDPO's best, but within noise (0.06 < 2 x 0.04); 0.38 is the best real gain.
        let ddpo = run(
            "ddpo",
            vec![
                point(0, 0.32, None),
                point(5, 0.40, Some((0.06, 0.04))),
                point(10, 0.38, Some((0.06, 0.02))),
                point(15, 0.30, Some((-0.02, 0.001))),
            ],
        );
        let other = run(
            "draft-k",
            vec![point(0, 0.32, None), point(5, 0.5, Some((0.2, 0.01)))],
        );
        assert_eq!(ddpo_target(&[other.clone(), ddpo.clone()]), Some(0.38));
        // Noise only: no target, and the table says so with the best gain.
        let noisy = run(
            "ddpo",
            vec![point(0, 0.32, None), point(5, 0.40, Some((0.06, 0.04)))],
        );
        assert_eq!(ddpo_target(&[noisy.clone(), other.clone()]), None);
        let md = markdown(&Comparison {
            budget: 160,
            target: None,
            target_given: false,
            methods: vec![noisy, other],
        });
        assert!(
            md.contains("no target") && md.contains("+0.060 ± 0.040 at update 5"),
            "{md}"
        );
        assert!(
            md.contains("| draft-k | 0.320 -> 0.500 | +0.200 ± 0.010 (0.50) |"),
            "{md}"
        );
        assert!(!md.contains("noise scale"), "{md}");
    }

    #[test]
    fn noise_scales_are_compared_by_their_bounds() {
        use crate::noise_scale::noise_scale;
        // DRaFT-K: signal 2, 1, 2, 1 (mean 1.5, se 0.2887), noise 150: B_simple 100, upper bound
        // 150 / (1.5 - 0.5774) = 162.6. DDPO: signal 1, -1, 1, -1 (se 0.5774), noise 1000: lower
        // bound 1000 / 1.1547 = 866.0. Ratios: 866.0 / 162.6 = 5.3 and 866.0 / 100 = 8.7 -> 9.
        let mut ddpo = run("ddpo", vec![point(0, 0.32, None)]);
        ddpo.noise_scale = noise_scale(&[1.0, -1.0, 1.0, -1.0], &[1000.0; 4]);
        let mut draft = run("draft-k", vec![point(0, 0.32, None)]);
        draft.noise_scale = noise_scale(&[2.0, 1.0, 2.0, 1.0], &[150.0; 4]);
        let md = markdown(&Comparison {
            budget: 160,
            target: None,
            target_given: false,
            methods: vec![ddpo, draft],
        });
        assert!(md.contains("- ddpo: no gradient signal measurable over 4 updates: B_simple is at least 866 examples"), "{md}");
        assert!(
            md.contains("- draft-k: gradient noise scale B_simple = 100 examples"),
            "{md}"
        );
        assert!(
            md.contains("at least 5.3 times")
                && md.contains("; 9 times against DRaFT-K's estimate of 100"),
            "{md}"
        );
    }
}
