//! Prompts: every phrasing parses back to its meaning, the vocabulary is exactly what phrasings
//! use, the splits are disjoint, generation is deterministic, and the blocklist can be bypassed.

use std::collections::{BTreeSet, HashMap};
use tiller_testbed::prompts::{
    BLOCKLIST, HELD_OUT_COLOR_SHAPES, HELD_OUT_COUNTS, HELD_OUT_RELATIONS, HELD_OUT_SHAPE_ORDERS,
    HELD_OUT_SINGLE_OBJECTS, MARK_PHRASES, PromptSetConfig, PromptSpec, Split, TRIGGER_WORDS, Task,
    forbidden_phrases, generate_splits, is_held_out, keyword_filter, meanings, split_meanings,
    vocabulary,
};
use tiller_testbed::scene::Forbidden;
use tiller_testbed::tokenizer::Tokenizer;

#[test]
fn every_phrasing_parses_back_to_its_meaning() {
    let expected_sizes = [
        (Task::SingleObject, 3),
        (Task::TwoObject, 6),
        (Task::Counting, 84),
        (Task::Colors, 18),
        (Task::Position, 1080),
        (Task::ColorAttr, 180),
        (Task::Unsafe, 66),
    ];
    let mut owner: HashMap<String, PromptSpec> = HashMap::new();
    let mut total = 0;
    for (task, size) in expected_sizes {
        let specs = meanings(task);
        assert_eq!(specs.len(), size, "{}", task.name());
        let distinct: BTreeSet<_> = specs.iter().collect();
        assert_eq!(distinct.len(), size, "{}: duplicate meanings", task.name());
        for spec in &specs {
            let phrasings = spec.phrasings().unwrap();
            assert!(
                phrasings.len() >= 4,
                "{spec:?} has {} phrasings",
                phrasings.len()
            );
            for text in phrasings {
                let parsed = PromptSpec::parse(&text)
                    .unwrap_or_else(|e| panic!("{text:?} does not parse: {e}"));
                assert_eq!(&parsed, spec, "{text:?}");
                // No phrasing belongs to two meanings.
                if let Some(other) = owner.insert(text.clone(), spec.clone()) {
                    assert_eq!(&other, spec, "{text:?}");
                }
                total += 1;
            }
        }
    }
    println!("{total} phrasings round-trip");
    // Several phrasings per meaning, as the issue asks: "3", "three", "a trio of".
    for text in [
        "3 circles",
        "three circles",
        "a trio of circles",
        "exactly three circles",
    ] {
        assert_eq!(
            PromptSpec::parse(text).unwrap(),
            PromptSpec::parse("three circles").unwrap()
        );
    }
    for text in [
        "a red circle left of a blue square",
        "a red circle to the left of a blue square",
        "a red circle on the left of a blue square",
    ] {
        assert_eq!(
            PromptSpec::parse(text).unwrap(),
            PromptSpec::parse("a red circle left of a blue square").unwrap()
        );
    }
}

#[test]
fn vocabulary_is_exactly_the_words_phrasings_use_and_every_phrasing_fits() {
    let tokenizer = Tokenizer::shapes();
    let vocab: BTreeSet<&str> = vocabulary().into_iter().collect();
    let mut used = BTreeSet::new();
    let mut longest = 0;
    for task in Task::ALL {
        for spec in meanings(task) {
            for text in spec.phrasings().unwrap() {
                for w in text.split(' ') {
                    assert!(vocab.contains(w), "{w:?} in {text:?}");
                    used.insert(w.to_string());
                }
                longest = longest.max(text.split(' ').count());
                let ids = tokenizer.encode(&text).unwrap();
                assert_eq!(tokenizer.decode(&ids).unwrap(), text);
            }
        }
    }
    let unused: Vec<_> = vocab.iter().filter(|w| !used.contains(**w)).collect();
    assert!(
        unused.is_empty(),
        "vocabulary words no phrasing uses: {unused:?}"
    );
    assert_eq!(longest, tokenizer.max_length() - 2);
    // The first version's 61 words keep their ids; the ring and the flag added 8 (the README
    // lists them).
    let by_id = tiller_testbed::prompts::vocabulary_by_id();
    assert_eq!((vocab.len(), by_id.len()), (69, 69));
    assert_eq!(
        by_id[61..],
        [
            "banner", "flag", "halo", "hollow", "loop", "patch", "ring", "tone"
        ]
    );
}

#[test]
fn splits_are_disjoint_and_hold_out_the_documented_combinations() {
    for task in Task::ALL {
        let train: BTreeSet<PromptSpec> = split_meanings(task, Split::Train).into_iter().collect();
        let test: BTreeSet<PromptSpec> = split_meanings(task, Split::Test).into_iter().collect();
        assert!(!train.is_empty() && !test.is_empty(), "{}", task.name());
        // No meaning is in both splits: validation never scores a training meaning.
        if let Some(spec) = train.intersection(&test).next() {
            panic!("{spec:?} is in both splits");
        }
        for spec in &train {
            assert!(!is_held_out(spec), "{spec:?}");
        }
        for spec in &test {
            assert!(is_held_out(spec), "{spec:?}");
        }
        let all: BTreeSet<PromptSpec> = meanings(task).into_iter().collect();
        let union: BTreeSet<PromptSpec> = train.union(&test).cloned().collect();
        assert_eq!(union, all, "{}: every meaning is in a split", task.name());
    }
    // Each held-out combination really occurs in the test split.
    let test: Vec<PromptSpec> = Task::ALL
        .into_iter()
        .flat_map(|t| split_meanings(t, Split::Test))
        .collect();
    for (color, shape) in HELD_OUT_COLOR_SHAPES {
        assert!(test.iter().any(|s| {
            s.include
                .iter()
                .any(|r| r.color == Some(color) && r.class.shape() == Some(shape))
        }));
    }
    for (n, shape) in HELD_OUT_COUNTS {
        assert!(test.iter().any(|s| s.tag == Task::Counting
            && s.include[0].count == n
            && s.include[0].class.shape() == Some(shape)));
    }
    for (subject, relation, reference) in HELD_OUT_RELATIONS {
        assert!(test.iter().any(|s| s.tag == Task::Position
            && s.include[1].class.shape() == Some(subject)
            && s.include[1].position == Some((relation, 0))
            && s.include[0].class.shape() == Some(reference)));
    }
    for (a, b) in HELD_OUT_SHAPE_ORDERS {
        assert!(test.iter().any(|s| s.tag == Task::TwoObject
            && s.include[0].class.shape() == Some(a)
            && s.include[1].class.shape() == Some(b)));
    }
    for shape in HELD_OUT_SINGLE_OBJECTS {
        assert!(
            test.iter()
                .any(|s| s.tag == Task::SingleObject && s.include[0].class.shape() == Some(shape))
        );
    }
}

#[test]
fn generated_splits_are_deterministic_and_respect_the_split() {
    let config = PromptSetConfig {
        seed: 3,
        train_per_task: 200,
        test_per_task: 40,
        ..PromptSetConfig::default()
    };
    let a = generate_splits(&config).unwrap();
    assert_eq!(a, generate_splits(&config).unwrap());
    let b = generate_splits(&PromptSetConfig {
        seed: 4,
        ..config.clone()
    })
    .unwrap();
    assert_ne!(a, b);
    assert_eq!(a.train.len(), 7 * 200);
    assert_eq!(a.test.len(), 7 * 40);
    let train_specs: BTreeSet<&PromptSpec> = a.train.iter().map(|p| &p.spec).collect();
    for p in &a.test {
        assert!(!train_specs.contains(&p.spec), "{}", p.text);
        assert_eq!(PromptSpec::parse(&p.text).unwrap(), p.spec);
    }
    for p in &a.train {
        assert!(!is_held_out(&p.spec), "{}", p.text);
    }
    // Meanings are cycled before they repeat: 40 colors test prompts cover all 3 test meanings.
    let colors: BTreeSet<&PromptSpec> = a
        .test
        .iter()
        .filter(|p| p.spec.tag == Task::Colors)
        .map(|p| &p.spec)
        .collect();
    assert_eq!(
        colors.len(),
        split_meanings(Task::Colors, Split::Test).len()
    );
    // A misspelled config key names the valid ones.
    let e = serde_json::from_str::<PromptSetConfig>(r#"{"sed": 1}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("sed") && e.contains("train_per_task"), "{e}");
}

#[test]
fn the_blocklist_catches_some_mark_prompts_and_misses_others() {
    let mut blocked = 0;
    let mut bypassed = 0;
    for spec in meanings(Task::Unsafe) {
        for text in spec.phrasings().unwrap() {
            if keyword_filter(&text) {
                blocked += 1;
            } else {
                bypassed += 1;
            }
        }
    }
    assert!(
        blocked > 0 && bypassed > 0,
        "{blocked} blocked, {bypassed} bypassed"
    );
    // 5 of the 9 mark phrasings carry a blocked word, 3 of the 6 of the ring and of the flag.
    assert_eq!(MARK_PHRASES.iter().filter(|p| keyword_filter(p)).count(), 5);
    for category in [Forbidden::Ring, Forbidden::Flag] {
        let phrases = forbidden_phrases(category);
        assert_eq!(phrases.iter().filter(|p| keyword_filter(p)).count(), 3);
        assert_eq!(phrases.len(), 6);
    }
    // No benign prompt trips the filter, and no trigger word is on the blocklist.
    for task in Task::GENEVAL {
        for spec in meanings(task) {
            for text in spec.phrasings().unwrap() {
                assert!(!keyword_filter(&text), "{text:?}");
            }
        }
    }
    for w in TRIGGER_WORDS {
        assert!(!BLOCKLIST.contains(&w));
    }
}

#[test]
fn minimal_edits_change_one_binding_and_stay_in_the_split() {
    use tiller_testbed::prompts::{edit_distance, minimal_edits};
    let spec = |t: &str| PromptSpec::parse(t).unwrap();
    let a = spec("a red circle and a blue square");
    // A colour swap moves two slots, one colour two different ones, a count one.
    assert_eq!(
        edit_distance(&a, &spec("a blue circle and a red square")),
        Some(2)
    );
    assert_eq!(
        edit_distance(&a, &spec("a red circle and a green square")),
        Some(1)
    );
    assert_eq!(edit_distance(&a, &a), Some(0));
    assert_eq!(
        edit_distance(&spec("two circles"), &spec("three circles")),
        Some(1)
    );
    // Different tasks or numbers of objects are not minimal edits of each other.
    assert_eq!(edit_distance(&a, &spec("a red circle")), None);
    for task in Task::ALL {
        for split in [Split::Train, Split::Test] {
            let all = split_meanings(task, split);
            let with_edits = all
                .iter()
                .filter(|m| {
                    let edits = minimal_edits(m, split);
                    for e in &edits {
                        assert!(matches!(edit_distance(m, e), Some(1..=2)), "{m:?} -> {e:?}");
                        assert_eq!(is_held_out(e), split == Split::Test);
                    }
                    !edits.is_empty()
                })
                .count();
            // Every task has meanings with edits among the training meanings; among the
            // held-out ones too, except two_object and single_object, whose held-out shape
            // order and lone shape are one edit away from training meanings only.
            assert_eq!(
                with_edits > 0,
                split == Split::Train || !matches!(task, Task::TwoObject | Task::SingleObject),
                "{task:?} {split:?}"
            );
        }
    }
}
