//! The CLIP tokenizer against transformers 5's `CLIPTokenizer` on the goldens that
//! `scripts/fixtures/clip_tokenizer.py` writes: SD 1.x's layout (vocab.json + merges.txt, pad =
//! eos) and a `tokenizer.json` with SD 2.x's pad token `!`. Prompts cover case and whitespace
//! normalisation, contractions, accents, digits, emoji, unmerged bytes, truncation, the empty
//! prompt and special tokens typed into the text.

use std::path::{Path, PathBuf};
use tiller_diffusion::clip_tokenizer::ClipTokenizer;

fn fixture(name: &str) -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
        .join("tests/fixtures")
        .join(name)
}

fn goldens(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("goldens.json")).unwrap())
        .unwrap()
}

fn matches_transformers(name: &str, pad: u32) {
    let tok = ClipTokenizer::from_folder(&fixture(name)).unwrap();
    assert_eq!(
        (tok.max_length(), tok.bos_id(), tok.eos_id()),
        (16, 755, 756)
    );
    assert_eq!(tok.pad_id(), pad);
    let g = goldens(name);
    let prompts = g["prompts"].as_array().unwrap();
    let mut truncated = 0;
    for (i, prompt) in prompts.iter().enumerate() {
        let prompt = prompt.as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(g["input_ids"][i].clone()).unwrap();
        let full = g["untruncated_lengths"][i].as_u64().unwrap() as usize;
        let got = tok.encode(prompt).unwrap();
        assert_eq!(got.ids, want, "{name}: {prompt:?}");
        assert_eq!(got.dropped, full.saturating_sub(16), "{name}: {prompt:?}");
        truncated += usize::from(got.dropped > 0);
    }
    assert!(prompts.len() >= 10 && truncated >= 1);
}

#[test]
fn vocab_and_merges_encode_as_transformers_clip_tokenizer() {
    matches_transformers("tiny-clip-tokenizer", 756);
}

#[test]
fn tokenizer_json_with_sd2_padding_encodes_as_transformers() {
    matches_transformers("tiny-clip-tokenizer-json", 0);
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tiller-tok-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A copy of the vocab + merges fixture with one file replaced.
fn broken(tag: &str, file: &str, content: &str) -> String {
    let src = fixture("tiny-clip-tokenizer");
    let dir = scratch(tag);
    for f in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join(file), content).unwrap();
    let e = ClipTokenizer::from_folder(&dir).unwrap_err().to_string();
    let _ = std::fs::remove_dir_all(&dir);
    e
}

#[test]
fn bad_tokenizer_folders_name_the_file_and_field() {
    let e = ClipTokenizer::from_folder(Path::new("/nonexistent/tok"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/tok/tokenizer_config.json"), "{e}");

    let e = broken(
        "len",
        "tokenizer_config.json",
        r#"{"model_max_length": 1e30}"#,
    );
    assert!(e.contains("model_max_length"), "{e}");
    let e = broken(
        "pad",
        "tokenizer_config.json",
        r#"{"model_max_length": 16, "pad_token": "<pad>"}"#,
    );
    assert!(e.contains("pad_token") && e.contains("<pad>"), "{e}");
    let e = broken("merge-line", "merges.txt", "#version: 0.2\na b c\n");
    assert!(e.contains("merges.txt") && e.contains("line 2"), "{e}");
    let e = broken("merge-vocab", "merges.txt", "#version: 0.2\nq \u{0120}zz\n");
    assert!(e.contains("merges.txt"), "{e}");
    let e = broken("vocab", "vocab.json", "[1, 2]");
    assert!(e.contains("vocab.json"), "{e}");

    let dir = scratch("empty");
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"model_max_length": 77}"#,
    )
    .unwrap();
    let e = ClipTokenizer::from_folder(&dir).unwrap_err().to_string();
    assert!(e.contains("not a tokenizer folder"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
