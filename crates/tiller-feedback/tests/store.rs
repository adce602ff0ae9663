//! The SQLite preference store: round trips of every record kind, queries, content-addressed
//! images, all-or-nothing batches, a process killed between image file and row, garbage
//! collection, NaN and unknown-reference errors, schema versions, and JSONL export/import.

mod common;

use tiller_feedback::{
    AnnotatorId, AnnotatorRecord, Batch, Candidate, Choice, Comparison, Counts, Feedback,
    FeedbackKind, ImageId, Panel, PanelConfig, PreferenceStore, PromptRecord, Provenance, Query,
    Rating, Source, Split, SqliteStore, Stars, export_jsonl, import_jsonl,
};

/// A store with two prompts (train, test), four images, a 3-annotator panel and one record of
/// every kind per annotator on the train prompt, plus one comparison on the test prompt.
fn populated(dir: &std::path::Path) -> (SqliteStore, Vec<Feedback>) {
    let mut store = SqliteStore::open(dir).unwrap();
    let train = common::prompt("a red circle");
    let test = common::prompt("a green circle");
    let p_train = PromptRecord::from_testbed(&train, Split::Train);
    let p_test = PromptRecord::from_testbed(&test, Split::Test);
    let mut flawed = common::flawless_config();
    flawed.speckle_rate = 1.0;
    flawed.border_rate = 1.0;
    let renders = [
        common::rendered(&train, &common::flawless_config(), 1),
        common::rendered(&train, &flawed, 2),
        common::rendered(&test, &common::flawless_config(), 3),
        common::rendered(&test, &flawed, 4),
    ];
    let images: Vec<_> = renders
        .iter()
        .map(|(png, _)| store.add_image(png).unwrap())
        .collect();
    let mut panel = Panel::new(
        &PanelConfig {
            annotators: 3,
            ..PanelConfig::default()
        },
        42,
    )
    .unwrap();
    let c = |i: usize| Candidate {
        image: &images[i].id,
        evaluation: &renders[i].1,
    };
    let mut feedback: Vec<Feedback> = Vec::new();
    for k in 0..3 {
        feedback.push(panel.compare(k, &p_train.id, c(0), c(1)).unwrap().into());
        feedback.push(panel.label(k, &p_train.id, c(1)).unwrap().into());
        feedback.push(panel.rate(k, &p_train.id, c(1)).unwrap().into());
        for m in panel.mark(k, &p_train.id, c(1)).unwrap() {
            feedback.push(m.into());
        }
        feedback.push(panel.reason(k, &p_train.id, c(1)).unwrap().into());
    }
    feedback.push(panel.compare(0, &p_test.id, c(2), c(3)).unwrap().into());
    store
        .write(&Batch {
            prompts: vec![p_train, p_test],
            annotators: panel.records(),
            feedback: feedback.clone(),
            ..Batch::default()
        })
        .unwrap();
    (store, feedback)
}

#[test]
fn every_kind_round_trips_and_queries_filter() {
    let dir = common::tempdir();
    let (store, feedback) = populated(dir.path());
    let marks = feedback
        .iter()
        .filter(|f| f.kind() == FeedbackKind::RegionMark)
        .count() as u64;
    // The speckled, border-touching image fails at least those two factors, each with a region.
    assert!(marks >= 3, "{marks} marks");
    assert_eq!(
        store.counts().unwrap(),
        Counts {
            prompts: 2,
            images: 4,
            annotators: 3,
            comparisons: 4,
            labels: 3,
            ratings: 3,
            region_marks: marks,
            reasons: 3,
        }
    );
    assert_eq!(store.feedback(&Query::default()).unwrap(), feedback);
    let train = store
        .feedback(&Query::default().in_split(Split::Train))
        .unwrap();
    assert_eq!(train.len(), feedback.len() - 1);
    let test_cmp = store
        .comparisons(&Query::default().in_split(Split::Test))
        .unwrap();
    assert_eq!(test_cmp.len(), 1);
    let by_prompt = store
        .ratings(&Query::default().for_prompt(test_cmp[0].prompt.clone()))
        .unwrap();
    assert!(by_prompt.is_empty());
    let sim1 = store
        .feedback(&Query {
            annotator: Some(AnnotatorId("sim-1".into())),
            ..Query::default()
        })
        .unwrap();
    assert!(sim1.iter().all(|f| f.provenance().annotator.0 == "sim-1"));
    assert_eq!(store.labels(&Query::default()).unwrap().len(), 3);
    assert_eq!(store.reasons(&Query::default()).unwrap().len(), 3);
    assert_eq!(
        store.region_marks(&Query::default()).unwrap().len() as u64,
        marks
    );
    assert_eq!(store.prompts(Some(Split::Test)).unwrap().len(), 1);
    let p = store.prompt(&test_cmp[0].prompt).unwrap().unwrap();
    assert_eq!(p.text, "a green circle");
    assert!(p.spec.is_some());
    let a = store
        .annotator(&AnnotatorId("sim-2".into()))
        .unwrap()
        .unwrap();
    assert_eq!(a.source, Source::Simulated { seed: 42 });
}

#[test]
fn images_are_content_addressed_files() {
    let dir = common::tempdir();
    let mut store = SqliteStore::open(dir.path()).unwrap();
    let (_, png, _) = common::flawless(&common::prompt("a blue square"), 0);
    let record = store.add_image(&png).unwrap();
    assert_eq!(record.id, ImageId::of_bytes(&png));
    assert_eq!((record.width, record.height), (32, 32));
    let path = dir
        .path()
        .join("images")
        .join(&record.id.0[..2])
        .join(format!("{}.png", &record.id.0[2..]));
    assert_eq!(std::fs::read(&path).unwrap(), png);
    // Adding the same bytes again is a no-op.
    assert_eq!(store.add_image(&png).unwrap(), record);
    assert_eq!(store.counts().unwrap().images, 1);
    assert_eq!(store.image_bytes(&record.id).unwrap(), png);
    // A corrupted file is detected on read.
    std::fs::write(&path, b"\x89PNG\r\n\x1a\nbroken").unwrap();
    let e = store.image_bytes(&record.id).unwrap_err().to_string();
    assert!(e.contains("does not match"), "{e}");
}

#[test]
fn unknown_references_are_errors_that_write_nothing() {
    let dir = common::tempdir();
    let (mut store, feedback) = populated(dir.path());
    let before = store.counts().unwrap();
    let Feedback::Comparison(good) = feedback[0].clone() else {
        panic!()
    };
    let ghost = ImageId("0".repeat(64));
    let mut bad = good.clone();
    bad.image_b = ghost.clone();
    // A batch that fails at its fourth record, after three good inserts and a new prompt.
    let new_prompt = PromptRecord::new("a yellow circle", Split::Train, None);
    let e = store
        .write(&Batch {
            prompts: vec![new_prompt.clone()],
            feedback: vec![
                good.clone().into(),
                good.clone().into(),
                good.clone().into(),
                bad.into(),
                good.clone().into(),
            ],
            ..Batch::default()
        })
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("feedback #3") && e.contains("unknown image") && e.contains(&ghost.0),
        "{e}"
    );
    assert_eq!(store.counts().unwrap(), before);
    assert!(store.prompt(&new_prompt.id).unwrap().is_none());

    let mut bad = good.clone();
    bad.prompt = new_prompt.id.clone();
    let e = store.add_comparison(&bad).unwrap_err().to_string();
    assert!(e.contains("unknown prompt"), "{e}");
    let mut bad = good.clone();
    bad.provenance.annotator = AnnotatorId("nobody".into());
    let e = store.add_comparison(&bad).unwrap_err().to_string();
    assert!(e.contains("unknown annotator nobody"), "{e}");
    let mut bad = good;
    bad.image_b = bad.image_a.clone();
    let e = store.add_comparison(&bad).unwrap_err().to_string();
    assert!(e.contains("with itself"), "{e}");
    assert_eq!(store.counts().unwrap(), before);
}

#[test]
fn nan_scores_are_rejected_naming_the_record() {
    let dir = common::tempdir();
    let (mut store, feedback) = populated(dir.path());
    let before = store.counts().unwrap();
    let rating = feedback
        .iter()
        .find_map(|f| match f {
            Feedback::Rating(r) => Some(r.clone()),
            _ => None,
        })
        .unwrap();
    let bad = Rating {
        score: Some(f64::NAN),
        ..rating
    };
    let e = store.add_rating(&bad).unwrap_err().to_string();
    assert!(e.contains("non-finite") && e.contains("NaN"), "{e}");
    assert!(
        e.contains("rating (prompt") && e.contains("annotator sim-0"),
        "{e}"
    );
    let mut taste = store.annotators().unwrap()[0].taste.clone().unwrap();
    taste.balance = f64::INFINITY;
    let e = store
        .add_annotator(&AnnotatorRecord {
            id: AnnotatorId("sim-9".into()),
            source: Source::Human,
            taste: Some(taste),
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("sim-9") && e.contains("weights.balance"), "{e}");
    assert_eq!(store.counts().unwrap(), before);
}

#[test]
fn prompts_are_immutable_and_schema_versions_are_checked() {
    let dir = common::tempdir();
    let mut store = SqliteStore::open(dir.path()).unwrap();
    let p = PromptRecord::new("a red circle", Split::Train, None);
    store.add_prompt(&p).unwrap();
    store.add_prompt(&p).unwrap();
    let changed = PromptRecord {
        text: "a blue circle".into(),
        ..p.clone()
    };
    let e = store.add_prompt(&changed).unwrap_err().to_string();
    assert!(e.contains("already stored with different content"), "{e}");
    drop(store);
    // Data survives reopening.
    let store = SqliteStore::open(dir.path()).unwrap();
    assert_eq!(store.prompts(None).unwrap(), vec![p]);
    drop(store);
    let conn = rusqlite::Connection::open(dir.path().join("preferences.sqlite")).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    conn.execute_batch("PRAGMA user_version = 99").unwrap();
    drop(conn);
    let e = SqliteStore::open(dir.path()).unwrap_err().to_string();
    assert!(e.contains("schema version 99 is newer"), "{e}");
}

/// Run by `a_process_killed_between_file_and_row_leaves_a_consistent_store` in a child process:
/// writes an image file and exits before the row is inserted, running no destructor (the store's
/// connection is never closed), as a killed process would. `exit` rather than `abort` so no core
/// file is left behind.
#[test]
fn killed_writer_child() {
    let Ok(dir) = std::env::var("TILLER_FEEDBACK_KILL_DIR") else {
        return;
    };
    let store = SqliteStore::open(&dir).unwrap();
    let (_, png, _) = common::flawless(&common::prompt("a purple square"), 9);
    store.put_image_file(&png).unwrap();
    std::process::exit(3);
}

#[test]
fn a_process_killed_between_file_and_row_leaves_a_consistent_store() {
    let dir = common::tempdir();
    let (mut store, _) = populated(dir.path());
    let before = store.counts().unwrap();
    drop(store);
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "killed_writer_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("TILLER_FEEDBACK_KILL_DIR", dir.path())
        .status()
        .unwrap();
    assert_eq!(
        status.code(),
        Some(3),
        "the child should have exited mid-write"
    );
    store = SqliteStore::open(dir.path()).unwrap();
    assert_eq!(store.counts().unwrap(), before);
    // Every row's file is there and intact; the orphan file is not referenced.
    for image in store.images().unwrap() {
        store.image_bytes(&image.id).unwrap();
    }
    let files = store.image_dir().files().unwrap();
    assert_eq!(files.len(), 5);
    // A stray temporary file (a write killed before its rename) goes too.
    let shard = files[0].1.parent().unwrap().to_path_buf();
    std::fs::write(shard.join(".x.png.tmp-123"), b"partial").unwrap();
    assert_eq!(store.gc().unwrap(), 2);
    assert_eq!(store.image_dir().files().unwrap().len(), 4);
    assert_eq!(store.counts().unwrap(), before);
    assert_eq!(store.gc().unwrap(), 0);
}

#[test]
fn jsonl_export_import_round_trips() {
    let dir = common::tempdir();
    let (store, feedback) = populated(&dir.path().join("a"));
    let file = dir.path().join("export.jsonl");
    let lines = export_jsonl(&store, &file).unwrap();
    let c = store.counts().unwrap();
    assert_eq!(
        lines as u64,
        c.prompts
            + c.images
            + c.annotators
            + c.comparisons
            + c.labels
            + c.ratings
            + c.region_marks
            + c.reasons
    );
    let mut copy = SqliteStore::open(dir.path().join("b")).unwrap();
    assert_eq!(
        import_jsonl(&mut copy, &file, store.image_dir()).unwrap(),
        lines
    );
    assert_eq!(copy.counts().unwrap(), c);
    assert_eq!(copy.feedback(&Query::default()).unwrap(), feedback);
    assert_eq!(copy.prompts(None).unwrap(), store.prompts(None).unwrap());
    assert_eq!(copy.annotators().unwrap(), store.annotators().unwrap());
    for image in store.images().unwrap() {
        assert_eq!(
            copy.image_bytes(&image.id).unwrap(),
            store.image_bytes(&image.id).unwrap()
        );
    }
    let file2 = dir.path().join("export2.jsonl");
    export_jsonl(&copy, &file2).unwrap();
    assert_eq!(
        std::fs::read(&file).unwrap(),
        std::fs::read(&file2).unwrap()
    );
}

#[test]
fn malformed_jsonl_names_the_line() {
    let dir = common::tempdir();
    let (store, _) = populated(&dir.path().join("a"));
    let good = Comparison {
        prompt: store.prompts(None).unwrap()[0].id.clone(),
        image_a: ImageId("a".repeat(64)),
        image_b: ImageId("b".repeat(64)),
        choice: Choice::Tie,
        provenance: Provenance {
            annotator: AnnotatorId("x".into()),
            source: Source::Human,
            time_ms: None,
        },
    };
    let line = serde_json::to_string(&Feedback::from(good.clone())).unwrap();
    let rating = Rating {
        prompt: good.prompt,
        image: good.image_a,
        stars: Stars::new(3).unwrap(),
        score: None,
        provenance: good.provenance,
    };
    let bad_rating = serde_json::to_string(&Feedback::from(rating))
        .unwrap()
        .replace("\"stars\":3", "\"stars\":6");
    let file = dir.path().join("bad.jsonl");
    std::fs::write(&file, format!("{line}\n\n{bad_rating}\n")).unwrap();
    let mut copy = SqliteStore::open(dir.path().join("b")).unwrap();
    let e = import_jsonl(&mut copy, &file, store.image_dir())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("bad.jsonl") && e.contains("line 3") && e.contains("1 to 5 stars, got 6"),
        "{e}"
    );
    assert_eq!(copy.counts().unwrap(), Counts::default());
}
