//! Preference feedback for Tiller: what people (or simulated people) say about images, where it is
//! kept, and how public datasets come in.
//!
//! - [`vocab`]: one vocabulary of feedback records (pairwise [`Comparison`]s, binary [`Label`]s,
//!   1–5 star [`Rating`]s, [`RegionMark`]s and [`Reason`]s), each with [`Provenance`].
//! - [`annotator`]: simulated annotators derived from the Shapes world's gold evaluator
//!   (Bradley–Terry choices, ties, lapses, ratings, likes, marks, reasons), a query [`Budget`] and
//!   inter-annotator [`agreement`].
//! - [`store`]: the narrow [`PreferenceStore`] trait; [`sqlite`]: its SQLite implementation with
//!   content-addressed image files ([`images`]); [`jsonl`]: import and export.
//! - [`loaders`]: Pick-a-Pic (parquet), HPDv2 (JSON) and ImageRewardDB (JSON or parquet) into the
//!   same vocabulary.
//!
//! No tensors and no burn code here: reward models read the store; the store never knows them.

pub mod annotator;
pub mod images;
pub mod jsonl;
pub mod loaders;
pub mod sqlite;
pub mod store;
pub mod vocab;

pub use annotator::{
    AnnotatorConfig, Budget, Candidate, Panel, PanelConfig, TasteWeights, agreement, bradley_terry,
};
pub use jsonl::{export_jsonl, import_jsonl, read_jsonl};
pub use loaders::{Imported, ingest};
pub use sqlite::SqliteStore;
pub use store::{Batch, Counts, PreferenceStore, Query};
pub use vocab::{
    AnnotatorId, AnnotatorRecord, Choice, Comparison, FactorLabel, Feedback, FeedbackKind,
    ImageFormat, ImageId, ImageRecord, Label, PromptId, PromptRecord, Provenance, Rating, Reason,
    Record, RegionMark, RegionMask, Source, Split, Stars,
};
