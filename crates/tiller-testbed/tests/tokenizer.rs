//! The tokenizer against Python's `tokenizers`: the committed `tokenizer.json` is what Rust
//! writes, and Python's `Tokenizer.from_file` on it gives the ids Rust gives.
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
