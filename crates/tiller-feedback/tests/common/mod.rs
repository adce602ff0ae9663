//! Fixtures shared by the integration tests: Shapes-world images rendered without flaws, and their
//! gold evaluations.
#![allow(dead_code)]

use tiller_testbed::{Evaluation, Evaluator, Image, Prompt, RenderConfig, render_prompt};

/// A Shapes-world prompt from its text.
pub fn prompt(text: &str) -> Prompt {
    Prompt::parse(text).unwrap()
}

/// The renderer with every flaw switched off: images that meet every factor.
pub fn flawless_config() -> RenderConfig {
    RenderConfig {
        border_rate: 0.0,
        speckle_rate: 0.0,
        off_balance_rate: 0.0,
        soft_edge_rate: 0.0,
        unasked_mark_rate: 0.0,
        ..RenderConfig::default()
    }
}

/// A flawless render of `prompt` (seed `seed`), its PNG bytes and its gold evaluation.
pub fn flawless(prompt: &Prompt, seed: u64) -> (Image, Vec<u8>, Evaluation) {
    let image = render_prompt(prompt, &flawless_config(), seed)
        .unwrap()
        .image;
    let png = tiller_testbed::image::encode_png(&image).unwrap();
    let evaluation = Evaluator::default().evaluate(&image, &prompt.spec).unwrap();
    (image, png, evaluation)
}

/// A render with the given config (flaws possible).
pub fn rendered(prompt: &Prompt, config: &RenderConfig, seed: u64) -> (Vec<u8>, Evaluation) {
    let image = render_prompt(prompt, config, seed).unwrap().image;
    let png = tiller_testbed::image::encode_png(&image).unwrap();
    let evaluation = Evaluator::default().evaluate(&image, &prompt.spec).unwrap();
    (png, evaluation)
}

/// A fresh temporary folder.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}
