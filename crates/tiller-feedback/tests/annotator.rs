//! Simulated annotators: Bradley–Terry properties, ties and lapses at their configured rates,
//! ratings, likes, marks and reasons from the evaluator, determinism from one seed, the budget,
//! and inter-annotator agreement on hand-computed and simulated cases.

mod common;

use tiller_feedback::annotator::{factor_score, utility};
use tiller_feedback::{
    AnnotatorConfig, Candidate, Choice, FactorLabel, ImageId, Panel, PanelConfig, PromptId,
    TasteWeights, agreement, bradley_terry,
};
use tiller_testbed::Evaluation;

/// One annotator, identical to the population's median taste, with no noise unless overridden.
fn exact(annotator: AnnotatorConfig) -> PanelConfig {
    PanelConfig {
        annotators: 1,
        budget: None,
        annotator,
    }
}

fn quiet() -> AnnotatorConfig {
    AnnotatorConfig {
        spread: 0.0,
        tie_margin: 0.0,
        flip_rate: 0.0,
        rating_noise: 0.0,
        miss_rate: 0.0,
        ..AnnotatorConfig::default()
    }
}

/// A flawless evaluation and a copy with `clean_background` at 0: at the default weights (sum 13)
/// their utilities are 1 and 1 - 0.5/13 = 0.9615385.
fn good_and_noisy() -> (Evaluation, Evaluation) {
    let (_, _, good) = common::flawless(&common::prompt("a red circle"), 3);
    for f in FactorLabel::ALL {
        assert_eq!(factor_score(&good, f), 1.0, "{f:?}");
    }
    let mut noisy = good.clone();
    noisy.parsed.aesthetics.clean_background.score = 0.0;
    (good, noisy)
}

fn ids() -> (PromptId, ImageId, ImageId) {
    (
        PromptId("p".into()),
        ImageId("a".repeat(64)),
        ImageId("b".repeat(64)),
    )
}

#[test]
fn bradley_terry_is_antisymmetric_and_half_at_equal_utility() {
    for (a, b) in [(0.3, 0.3), (0.0, 1.0), (0.7, 0.2), (-3.0, 5.0)] {
        for t in [0.01, 0.05, 1.0] {
            let p = bradley_terry(a, b, t);
            let q = bradley_terry(b, a, t);
            assert!((p + q - 1.0).abs() < 1e-15, "{a} {b} {t}: {p} + {q}");
        }
    }
    assert_eq!(bradley_terry(0.42, 0.42, 0.05), 0.5);
    // sigmoid(1) = 1 / (1 + e^-1).
    assert!((bradley_terry(1.0, 0.0, 1.0) - 0.731_058_578_630_004_9).abs() < 1e-15);
    // Far apart: saturates to exactly 1 and 0 without overflow or NaN.
    assert_eq!(bradley_terry(1000.0, 0.0, 0.001), 1.0);
    assert_eq!(bradley_terry(0.0, 1000.0, 0.001), 0.0);
}

#[test]
fn choices_follow_bradley_terry_frequencies() {
    let (good, noisy) = good_and_noisy();
    let w = TasteWeights::default();
    let (u_good, u_noisy) = (utility(&w, &good).unwrap(), utility(&w, &noisy).unwrap());
    assert!((u_good - 1.0).abs() < 1e-12);
    assert!((u_noisy - (1.0 - 0.5 / 13.0)).abs() < 1e-12);
    // p = sigmoid((0.5/13) / 0.05) = sigmoid(0.7692308) = 1 / (1 + 0.4633694) = 0.6833545.
    let p = bradley_terry(u_good, u_noisy, 0.05);
    assert!((p - 0.683_354_5).abs() < 1e-7, "{p}");

    let mut panel = Panel::new(&exact(quiet()), 11).unwrap();
    let (prompt, a, b) = ids();
    let n = 4000;
    let mut wins = 0;
    for _ in 0..n {
        let c = panel
            .compare(
                0,
                &prompt,
                Candidate {
                    image: &a,
                    evaluation: &good,
                },
                Candidate {
                    image: &b,
                    evaluation: &noisy,
                },
            )
            .unwrap();
        wins += (c.choice == Choice::A) as usize;
    }
    let freq = wins as f64 / n as f64;
    let sd = (p * (1.0 - p) / n as f64).sqrt();
    assert!(
        (freq - p).abs() < 4.0 * sd,
        "frequency {freq}, p {p}, 4 sd {}",
        4.0 * sd
    );
    assert_eq!(panel.budget().asked, n as u64);

    // Swapping the pair swaps the frequency: A is now the noisy image.
    let mut wins_swapped = 0;
    for _ in 0..n {
        let c = panel
            .compare(
                0,
                &prompt,
                Candidate {
                    image: &b,
                    evaluation: &noisy,
                },
                Candidate {
                    image: &a,
                    evaluation: &good,
                },
            )
            .unwrap();
        wins_swapped += (c.choice == Choice::A) as usize;
    }
    let freq = wins_swapped as f64 / n as f64;
    assert!(
        (freq - (1.0 - p)).abs() < 4.0 * sd,
        "swapped frequency {freq}"
    );
}

#[test]
fn small_differences_are_ties_and_lapses_flip_at_their_rate() {
    let (good, noisy) = good_and_noisy();
    let (prompt, a, b) = ids();
    // The difference 0.5/13 = 0.038 is below a tie margin of 0.05: always a tie, never flipped.
    let mut panel = Panel::new(
        &exact(AnnotatorConfig {
            tie_margin: 0.05,
            flip_rate: 0.5,
            ..quiet()
        }),
        1,
    )
    .unwrap();
    for _ in 0..50 {
        let c = panel
            .compare(
                0,
                &prompt,
                Candidate {
                    image: &a,
                    evaluation: &good,
                },
                Candidate {
                    image: &b,
                    evaluation: &noisy,
                },
            )
            .unwrap();
        assert_eq!(c.choice, Choice::Tie);
    }
    // A near-zero temperature makes the choice deterministic (A), so every B is a lapse.
    let mut panel = Panel::new(
        &exact(AnnotatorConfig {
            temperature: 1e-6,
            flip_rate: 0.2,
            ..quiet()
        }),
        2,
    )
    .unwrap();
    let n = 4000;
    let flips = (0..n)
        .filter(|_| {
            panel
                .compare(
                    0,
                    &prompt,
                    Candidate {
                        image: &a,
                        evaluation: &good,
                    },
                    Candidate {
                        image: &b,
                        evaluation: &noisy,
                    },
                )
                .unwrap()
                .choice
                == Choice::B
        })
        .count();
    let freq = flips as f64 / n as f64;
    let sd = (0.2f64 * 0.8 / n as f64).sqrt();
    assert!((freq - 0.2).abs() < 4.0 * sd, "flip frequency {freq}");
}

#[test]
fn ratings_labels_marks_and_reasons_come_from_the_evaluator() {
    let (good, _) = good_and_noisy();
    let mut bad = good.clone();
    // Presence 0.5 and border 0: u = 1 - (2 * 0.5 + 0.5) / 13 = 1 - 1.5/13 = 0.8846154, which is
    // in [0.85, 0.95): 4 stars; below the like threshold 0.9.
    bad.factors.presence.score = 0.5;
    bad.parsed.aesthetics.border.score = 0.0;
    let mut mask = tiller_testbed::Mask::empty(32, 32);
    mask.set(0, 5);
    mask.set(1, 5);
    bad.parsed.aesthetics.border.mask = mask.clone();
    let (prompt, a, b) = ids();
    let mut panel = Panel::new(&exact(quiet()), 5).unwrap();
    let good_c = Candidate {
        image: &a,
        evaluation: &good,
    };
    let bad_c = Candidate {
        image: &b,
        evaluation: &bad,
    };

    let r = panel.rate(0, &prompt, good_c).unwrap();
    assert_eq!((r.stars.get(), r.score), (5, Some(1.0)));
    let r = panel.rate(0, &prompt, bad_c).unwrap();
    assert_eq!(r.stars.get(), 4);
    assert!((r.score.unwrap() - (1.0 - 1.5 / 13.0)).abs() < 1e-12);
    assert!(panel.label(0, &prompt, good_c).unwrap().like);
    assert!(!panel.label(0, &prompt, bad_c).unwrap().like);

    let reason = panel.reason(0, &prompt, bad_c).unwrap();
    assert_eq!(
        reason.factors,
        vec![FactorLabel::MissingObject, FactorLabel::Border]
    );
    assert!(panel.reason(0, &prompt, good_c).unwrap().factors.is_empty());
    // Presence's mask is empty (an absence has no region), so only the border is marked.
    let marks = panel.mark(0, &prompt, bad_c).unwrap();
    assert_eq!(marks.len(), 1);
    assert_eq!(marks[0].factor, FactorLabel::Border);
    assert_eq!(marks[0].mask.to_bools(), mask.bits);
    // Two ratings, two labels, two reasons, one mark.
    assert_eq!(panel.budget().asked, 7);
}

#[test]
fn one_seed_gives_the_same_annotators_and_answers() {
    let (good, noisy) = good_and_noisy();
    let (prompt, a, b) = ids();
    let run = |seed: u64| {
        let mut panel = Panel::new(&PanelConfig::default(), seed).unwrap();
        let answers: Vec<Choice> = (0..5)
            .flat_map(|i| (0..20).map(move |_| i))
            .map(|i| {
                panel
                    .compare(
                        i,
                        &prompt,
                        Candidate {
                            image: &a,
                            evaluation: &good,
                        },
                        Candidate {
                            image: &b,
                            evaluation: &noisy,
                        },
                    )
                    .unwrap()
                    .choice
            })
            .collect();
        (panel.records(), answers)
    };
    let (r1, c1) = run(7);
    let (r2, c2) = run(7);
    assert_eq!(r1, r2);
    assert_eq!(c1, c2);
    let (r3, _) = run(8);
    assert_ne!(r1[0].taste, r3[0].taste);
    // Annotators differ from each other, and the spread is the configured one: weights are
    // default * exp(0.3 z), so every ratio lies within exp(+-0.3 * 6).
    assert_ne!(r1[0].taste, r1[1].taste);
    let d = TasteWeights::default();
    for r in &r1 {
        let t = r.taste.as_ref().unwrap();
        for f in FactorLabel::ALL {
            let ratio = t.get(f) / d.get(f);
            assert!(
                ratio > (-1.8f64).exp() && ratio < 1.8f64.exp(),
                "{f:?} {ratio}"
            );
        }
    }
}

#[test]
fn the_budget_stops_queries_past_its_limit() {
    let (good, _) = good_and_noisy();
    let (prompt, a, _) = ids();
    let mut panel = Panel::new(
        &PanelConfig {
            budget: Some(2),
            ..PanelConfig::default()
        },
        0,
    )
    .unwrap();
    let c = Candidate {
        image: &a,
        evaluation: &good,
    };
    panel.rate(0, &prompt, c).unwrap();
    panel.label(1, &prompt, c).unwrap();
    let e = panel.reason(2, &prompt, c).unwrap_err().to_string();
    assert!(
        e.contains("budget exhausted") && e.contains("2 of 2"),
        "{e}"
    );
    assert_eq!(panel.budget().asked, 2);
    let e = panel.rate(9, &prompt, c).unwrap_err().to_string();
    assert!(e.contains("out of range"), "{e}");
}

#[test]
fn agreement_on_hand_computed_answers() {
    use Choice::{A, B, Tie};
    // Pairs where both answered A or B, and agreement on them:
    //   annotators 0,1: pairs 0,1,2 -> agree on 0 and 2 -> 2/3
    //   annotators 0,2: pairs 0,1   -> agree on 1       -> 1/2
    //   annotators 1,2: pairs 0,1,3 -> agree on 3       -> 1/3
    // mean (2/3 + 1/2 + 1/3) / 3 = 1/2.
    let choices = vec![vec![A, A, B, Tie], vec![A, B, B, A], vec![B, A, Tie, A]];
    assert!((agreement(&choices).unwrap() - 0.5).abs() < 1e-15);
    // Two annotators always agreeing: 1; always disagreeing: 0.
    assert_eq!(agreement(&[vec![A, B], vec![A, B]]).unwrap(), 1.0);
    assert_eq!(agreement(&[vec![A, B], vec![B, A]]).unwrap(), 0.0);
    // A pair of annotators with no shared non-tie pair is left out of the mean, not counted as 0.
    assert_eq!(
        agreement(&[vec![A, Tie], vec![A, B], vec![Tie, A]]).unwrap(),
        1.0 / 2.0
    );
    assert!(agreement(&[vec![A]]).is_err());
    assert!(agreement(&[vec![Tie], vec![A]]).is_err());
    assert!(agreement(&[vec![A, B], vec![A]]).is_err());
}

#[test]
fn simulated_agreement_matches_the_lapse_rate() {
    // Deterministic choices (tiny temperature, no spread) with lapse rate e: two annotators agree
    // when both lapse or neither does, (1 - e)^2 + e^2 = 0.82 at e = 0.1.
    let (good, noisy) = good_and_noisy();
    let (prompt, a, b) = ids();
    let mut panel = Panel::new(
        &PanelConfig {
            annotators: 3,
            budget: Some(3 * 3000),
            annotator: AnnotatorConfig {
                temperature: 1e-6,
                flip_rate: 0.1,
                ..quiet()
            },
        },
        4,
    )
    .unwrap();
    let pairs: Vec<_> = (0..3000)
        .map(|_| {
            (
                Candidate {
                    image: &a,
                    evaluation: &good,
                },
                Candidate {
                    image: &b,
                    evaluation: &noisy,
                },
            )
        })
        .collect();
    let measured = panel.agreement_on(&prompt, &pairs).unwrap();
    assert!((measured - 0.82).abs() < 0.025, "{measured}");
    assert_eq!(panel.budget().asked, 9000);
    assert!(panel.agreement_on(&prompt, &pairs[..1]).is_err());
}
