//! The tokenizer against Python's `tokenizers`: the committed `tokenizer.json` is what Rust
//! writes, and Python's `Tokenizer.from_file` on it gives the ids Rust gives.
//!
//! `tests/fixtures/tokenizer-v1.json` is the world's first tokenizer (one harm category), as
//! the first shipped base wrote it; it is never regenerated.
//!
//! Fixtures (regenerate in this order):
//! 1. `TILLER_UPDATE_FIXTURES=1 cargo test -p tiller-testbed --test tokenizer` rewrites
//!    `tests/fixtures/tokenizer.json`;
//! 2. `/work/venv/bin/python scripts/fixtures/testbed_tokenizer.py` rewrites
//!    `tests/fixtures/tokenizer_ids.json` from it.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use tiller_testbed::tokenizer::Tokenizer;

fn fixture(name: &str) -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
        .join("tests/fixtures")
        .join(name)
}

#[test]
fn committed_tokenizer_json_is_what_rust_writes() {
    let path = fixture("tokenizer.json");
    let written = Tokenizer::shapes().to_json();
    if std::env::var_os("TILLER_UPDATE_FIXTURES").is_some() {
        std::fs::write(&path, &written).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap();
    assert!(
        committed == written,
        "{} is stale; regenerate it (see this file's header)",
        path.display()
    );
    assert_eq!(Tokenizer::load(&path).unwrap(), Tokenizer::shapes());
}

#[test]
fn words_keep_the_ids_the_first_base_was_trained_with() {
    // `tokenizer-v1.json` is the tokenizer the base was first trained with, before the ring and
    // the flag (the shipped few-step models were distilled with it): each of its words keeps its
    // id, and the new words come after them.
    let shipped = fixture("tokenizer-v1.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&shipped).unwrap()).unwrap();
    let vocab = json["model"]["vocab"].as_object().unwrap();
    let now = Tokenizer::shapes();
    let mut oldest_new = u32::MAX;
    for (word, id) in vocab {
        let prompt_id = now.encode(word);
        if word.starts_with("<|") {
            continue;
        }
        let ids = prompt_id.unwrap_or_else(|e| panic!("{word}: {e}"));
        assert_eq!(u64::from(ids[1]), id.as_u64().unwrap(), "{word}");
    }
    for word in ["ring", "halo", "flag", "banner"] {
        oldest_new = oldest_new.min(now.encode(word).unwrap()[1]);
    }
    assert!(oldest_new as usize >= vocab.len(), "{oldest_new}");
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct IdsFixture {
    tokenizers_version: String,
    cases: Vec<Case>,
    unknown_word_cases: Vec<Case>,
}

#[test]
fn python_tokenizers_gives_the_same_ids() {
    let text = std::fs::read_to_string(fixture("tokenizer_ids.json")).unwrap();
    let f: IdsFixture = serde_json::from_str(&text).unwrap();
    assert!(!f.tokenizers_version.is_empty());
    let t = Tokenizer::shapes();
    assert!(f.cases.len() >= 10);
    for case in &f.cases {
        assert_eq!(
            t.encode(&case.prompt).unwrap(),
            case.ids,
            "{:?}",
            case.prompt
        );
    }
    // Python maps an unknown word to <|unk|> (id 2); Rust refuses and names it.
    for case in &f.unknown_word_cases {
        assert!(case.ids.contains(&2), "{:?}", case.prompt);
        let e = t.encode(&case.prompt).unwrap_err().to_string();
        assert!(e.contains("unknown word"), "{e}");
    }
}
