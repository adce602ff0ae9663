//! The Shapes world: Tiller's built-in text-to-image testbed with ground truth for every
//! phenomenon alignment methods target.
//!
//! - [`palette`]: the fixed colours.
//! - [`scene`] and [`mod@render`]: what an image contains and the training renderer (placement from a
//!   seed, relations respected, a documented mix of aesthetic flaws, forbidden content of three
//!   harm categories (the mark, the ring, the flag) appearing unasked after trigger words).
//! - [`prompts`]: GenEval-style tasks, phrasings, the parser, splits with held-out combinations,
//!   unsafe prompts and the keyword blocklist.
//! - [`taste`]: the aesthetic components.
//! - [`evaluator`]: the gold evaluator (segmentation, components, shapes, GenEval's rules,
//!   per-factor scores with region masks).
//! - [`tokenizer`]: the word-level tokenizer in Hugging Face's `tokenizer.json` format.
//! - [`geneval`]: export in GenEval's folder layout, and sample grids.
//!
//! Pure Rust on plain RGB buffers: no tensors. The crate's README is the reference for the world.

pub mod evaluator;
pub mod geneval;
pub mod image;
pub mod palette;
pub mod prompts;
pub mod render;
pub mod scene;
pub mod taste;
pub mod tokenizer;

pub use evaluator::{Evaluation, Evaluator, EvaluatorConfig, Factor, ParsedImage};
pub use image::{BBox, Image, Mask};
pub use palette::Color;
pub use prompts::{
    Class, Exclusion, Prompt, PromptGenerator, PromptSetConfig, PromptSpec, Relation, Requirement,
    Split, Task,
};
pub use render::{Flaws, RenderConfig, Rendered, render, render_prompt};
pub use scene::{Forbidden, Scene, Shape, Size};
pub use taste::TasteConfig;
pub use tokenizer::Tokenizer;
