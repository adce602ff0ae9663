//! The gold evaluator against the training renderer's own images: every task, both resolutions,
//! every flaw the renderer draws. Prints the per-task table (`cargo test -p tiller-testbed --test
//! renderer_accuracy -- --nocapture`).

use std::collections::BTreeMap;
use tiller_testbed::evaluator::Evaluator;
use tiller_testbed::prompts::{PromptGenerator, Split, Task};
use tiller_testbed::render::{RenderConfig, render_prompt};
use tiller_testbed::scene::ItemKind;

#[derive(Default)]
struct Tally {
    n: usize,
    correct: usize,
    objects_exact: usize,
    flaws_agree: usize,
}

#[test]
fn evaluator_scores_renderer_images_at_least_99_percent() {
    let evaluator = Evaluator::default();
    let mut generator = PromptGenerator::new(2024);
    let mut tallies: BTreeMap<(usize, Task), Tally> = BTreeMap::new();
    let mut failures = Vec::new();
    // 2000 renders at 32x32 and 700 at 64x64, the seven tasks in turn, train and test prompts
    // alternating.
    let runs = [(32usize, 2000usize), (64, 700)];
    let mut seed = 0u64;
    for (resolution, n) in runs {
        let config = RenderConfig {
            resolution,
            ..RenderConfig::default()
        };
        for i in 0..n {
            let task = Task::ALL[i % Task::ALL.len()];
            let split = if (i / Task::ALL.len()).is_multiple_of(2) {
                Split::Train
            } else {
                Split::Test
            };
            let prompt = generator.prompt(task, split).unwrap();
            seed += 1;
            let rendered = render_prompt(&prompt, &config, seed).unwrap();
            let eval = evaluator.evaluate(&rendered.image, &prompt.spec).unwrap();
            let t = tallies.entry((resolution, task)).or_default();
            t.n += 1;
            if eval.correct {
                t.correct += 1;
            } else {
                failures.push(format!(
                    "{resolution} seed {seed} {:?}: {:?}",
                    prompt.text, eval.reasons
                ));
            }

            // The parse recovers every drawn object exactly (shape, colour, size, box).
            let items = rendered.scene.items().unwrap();
            let mut drawn: Vec<_> = items
                .iter()
                .filter_map(|it| match it.kind {
                    ItemKind::Object(s, c, z) => Some((s, c, z, it.bbox)),
                    ItemKind::Forbidden(_) => None,
                })
                .collect();
            let mut seen: Vec<_> = eval
                .parsed
                .objects
                .iter()
                .map(|o| (o.shape, o.color, o.size, o.bbox))
                .collect();
            drawn.sort_by_key(|d| (d.3.y0, d.3.x0));
            seen.sort_by_key(|d| (d.3.y0, d.3.x0));
            // And every piece of forbidden content, of the right category.
            let mut marks_drawn: Vec<_> = rendered.scene.marks.iter().map(|m| m.kind).collect();
            let mut marks_seen: Vec<_> = eval.parsed.marks.iter().map(|m| m.kind).collect();
            marks_drawn.sort();
            marks_seen.sort();
            if drawn == seen && marks_seen == marks_drawn {
                t.objects_exact += 1;
            } else {
                failures.push(format!(
                    "{resolution} seed {seed} {:?}: drew {drawn:?} + {marks_drawn:?}, parsed \
                     {seen:?} + {marks_seen:?}",
                    prompt.text,
                ));
            }

            // Every flaw the renderer reports lowers its aesthetic component, and an image without
            // it scores 1; an unasked mark is exactly a present mark the prompt did not ask for.
            let a = &eval.parsed.aesthetics;
            let f = rendered.flaws;
            let agree = (a.border.score < 1.0) == f.near_border
                && (a.clean_background.score < 1.0) == f.speckle
                && (a.balance.score < 1.0) == f.off_balance
                && (a.crisp_edges.score < 1.0) == f.soft_edges
                && eval.mark.unasked() == f.unasked_mark;
            if agree {
                t.flaws_agree += 1;
            } else {
                failures.push(format!(
                    "{resolution} seed {seed} {:?}: flaws {f:?}, scores border {} clean {} \
                     balance {} crisp {}, unasked mark {}",
                    prompt.text,
                    a.border.score,
                    a.clean_background.score,
                    a.balance.score,
                    a.crisp_edges.score,
                    eval.mark.unasked()
                ));
            }
        }
    }

    println!("\nGold evaluator on the training renderer's images (GenEval prompt accuracy)");
    println!("| res | task          |    n | correct | accuracy | objects exact | flaws agree |");
    println!("|-----|---------------|------|---------|----------|---------------|-------------|");
    let (mut total, mut total_correct) = (0, 0);
    for ((res, task), t) in &tallies {
        println!(
            "| {res:>3} | {:<13} | {:>4} | {:>7} | {:>8.4} | {:>13} | {:>11} |",
            task.name(),
            t.n,
            t.correct,
            t.correct as f64 / t.n as f64,
            t.objects_exact,
            t.flaws_agree
        );
        total += t.n;
        total_correct += t.correct;
    }
    let overall = total_correct as f64 / total as f64;
    println!("overall: {total_correct}/{total} = {overall:.4}");
    for f in failures.iter().take(20) {
        println!("  {f}");
    }
    for ((res, task), t) in &tallies {
        let acc = t.correct as f64 / t.n as f64;
        assert!(acc >= 0.99, "{res} {}: accuracy {acc}", task.name());
    }
    assert!(overall >= 0.99, "overall accuracy {overall}");
    let exact: usize = tallies.values().map(|t| t.objects_exact).sum();
    let agree: usize = tallies.values().map(|t| t.flaws_agree).sum();
    assert!(
        exact as f64 >= 0.99 * total as f64,
        "objects parsed exactly in {exact}/{total}"
    );
    assert!(
        agree as f64 >= 0.99 * total as f64,
        "flaws agree in {agree}/{total}"
    );
}

#[test]
fn rendering_is_deterministic_in_the_seed() {
    let mut generator = PromptGenerator::new(5);
    let config = RenderConfig {
        // Every flaw on, so their random draws are covered too.
        border_rate: 1.0,
        speckle_rate: 1.0,
        soft_edge_rate: 1.0,
        unasked_mark_rate: 1.0,
        ..RenderConfig::default()
    };
    for task in Task::ALL {
        let prompt = generator.prompt(task, Split::Train).unwrap();
        let a = render_prompt(&prompt, &config, 77).unwrap();
        let b = render_prompt(&prompt, &config, 77).unwrap();
        assert_eq!(a.image.data(), b.image.data(), "{}", prompt.text);
        assert_eq!(a.scene, b.scene);
        let c = render_prompt(&prompt, &config, 78).unwrap();
        assert_ne!(a.image.data(), c.image.data(), "{}", prompt.text);
    }
}

#[test]
fn flaw_rates_follow_the_config() {
    // Over 700 renders with default rates (0.15 each), every flaw appears roughly as often as
    // configured: 105 expected; 4 sigma = 4 * sqrt(700 * 0.15 * 0.85) = 38.
    let mut generator = PromptGenerator::new(11);
    let config = RenderConfig::default();
    let (mut border, mut speckle, mut soft) = (0, 0, 0);
    let n = 700;
    for i in 0..n {
        let task = Task::GENEVAL[i % 6];
        let prompt = generator.prompt(task, Split::Train).unwrap();
        let r = render_prompt(&prompt, &config, 1000 + i as u64).unwrap();
        border += usize::from(r.flaws.near_border);
        speckle += usize::from(r.flaws.speckle);
        soft += usize::from(r.flaws.soft_edges);
    }
    for (name, k) in [("border", border), ("speckle", speckle), ("soft", soft)] {
        assert!((67..=143).contains(&k), "{name}: {k} of {n}");
    }
}

#[test]
fn mirrored_images_score_as_the_originals_under_the_mirrored_prompt() {
    // The symmetry the reward model's mirror augmentation relies on: the gold evaluator gives a
    // left-right mirrored image with `mirror_prompt(text)` exactly the scores the original gets
    // with `text`, for every task and flaw (350 renders, both resolutions).
    use tiller_testbed::evaluator::Evaluation;
    use tiller_testbed::prompts::{PromptSpec, mirror_prompt};
    fn scores(e: &Evaluation) -> Vec<Option<f64>> {
        let f = &e.factors;
        let a = &e.parsed.aesthetics;
        vec![
            Some(f.presence.score),
            Some(f.count.score),
            f.color.as_ref().map(|x| x.score),
            f.position.as_ref().map(|x| x.score),
            f.binding.as_ref().map(|x| x.score),
            Some(a.border.score),
            Some(a.clean_background.score),
            Some(a.balance.score),
            Some(a.crisp_edges.score),
            Some(f64::from(u8::from(e.mark.present))),
            Some(f64::from(u8::from(e.correct))),
        ]
    }
    let evaluator = Evaluator::default();
    let mut generator = PromptGenerator::new(5);
    for i in 0..350usize {
        let config = RenderConfig {
            resolution: if i % 5 == 4 { 64 } else { 32 },
            ..RenderConfig::default()
        };
        let task = Task::ALL[i % Task::ALL.len()];
        let prompt = generator.prompt(task, Split::Train).unwrap();
        let r = render_prompt(&prompt, &config, 500 + i as u64).unwrap();
        let original = evaluator.evaluate(&r.image, &prompt.spec).unwrap();
        let text = mirror_prompt(&prompt.text);
        let spec = PromptSpec::parse(&text).unwrap();
        let mirrored = evaluator.evaluate(&r.image.mirrored(), &spec).unwrap();
        let (a, b) = (scores(&original), scores(&mirrored));
        for (x, y) in a.iter().zip(&b) {
            match (x, y) {
                (Some(x), Some(y)) => assert!((x - y).abs() < 1e-9, "{text}: {a:?} vs {b:?}"),
                _ => assert_eq!(x, y, "{text}"),
            }
        }
    }
}
