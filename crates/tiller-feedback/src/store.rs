//! The preference store: one narrow trait over prompts, images, annotators and feedback, so the
//! trainers, the labelling UI and the loaders never depend on a database.
//!
//! [`SqliteStore`](crate::sqlite::SqliteStore) is the implementation; a Postgres backend (for many
//! annotators writing at once) would implement the same trait: every method is either one
//! transaction ([`PreferenceStore::write`]) or a read, ids are strings, and records travel as the
//! vocabulary's serde types, so no SQLite specifics leak through it.
//!
//! Invariants every backend keeps:
//! - **All or nothing**: [`PreferenceStore::write`] applies a [`Batch`] in one transaction; a record
//!   naming an unknown prompt, image or annotator, or failing validation (NaN score, rating outside
//!   1–5), is an error naming it, and nothing of the batch is written.
//! - **No dangling rows**: an image row is inserted only after its file is complete on disk, so a
//!   crash between the two leaves at most an orphan file, which [`PreferenceStore::gc`] removes.

use crate::vocab::{
    AnnotatorId, AnnotatorRecord, Comparison, Feedback, FeedbackKind, ImageId, ImageRecord, Label,
    PromptId, PromptRecord, Rating, Reason, RegionMark, Split,
};
use serde::{Deserialize, Serialize};
use tiller_core::Result;

/// Records written together, in one transaction. Feedback may refer to prompts, images and
/// annotators in the same batch or already stored; image files must already be in the store
/// ([`PreferenceStore::put_image_file`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// Prompts (re-adding an identical prompt is a no-op; a different one under the same id is an
    /// error).
    pub prompts: Vec<PromptRecord>,
    /// Image rows.
    pub images: Vec<ImageRecord>,
    /// Annotators (same rule as prompts).
    pub annotators: Vec<AnnotatorRecord>,
    /// Feedback, appended in order.
    pub feedback: Vec<Feedback>,
}

impl Batch {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
            && self.images.is_empty()
            && self.annotators.is_empty()
            && self.feedback.is_empty()
    }
}

/// Which feedback to read; every `None` matches everything. Results come in insertion order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// Only this kind.
    pub kind: Option<FeedbackKind>,
    /// Only feedback on prompts of this split.
    pub split: Option<Split>,
    /// Only feedback on this prompt.
    pub prompt: Option<PromptId>,
    /// Only this annotator's.
    pub annotator: Option<AnnotatorId>,
}

impl Query {
    /// Everything of one kind.
    pub fn kind(kind: FeedbackKind) -> Self {
        Self {
            kind: Some(kind),
            ..Self::default()
        }
    }

    /// Restricts to a split.
    pub fn in_split(mut self, split: Split) -> Self {
        self.split = Some(split);
        self
    }

    /// Restricts to a prompt.
    pub fn for_prompt(mut self, prompt: PromptId) -> Self {
        self.prompt = Some(prompt);
        self
    }
}

/// How many of each thing a store holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Prompts.
    pub prompts: u64,
    /// Image rows.
    pub images: u64,
    /// Annotators.
    pub annotators: u64,
    /// Comparisons.
    pub comparisons: u64,
    /// Labels.
    pub labels: u64,
    /// Ratings.
    pub ratings: u64,
    /// Region marks.
    pub region_marks: u64,
    /// Reasons.
    pub reasons: u64,
}

/// A preference store. Required: the transactional [`write`](Self::write), the image files, and a
/// few reads; everything else has a default built on them.
pub trait PreferenceStore {
    /// Applies `batch` in one transaction: all of it or, on any error, none of it.
    fn write(&mut self, batch: &Batch) -> Result<()>;

    /// Stores image bytes content-addressed on disk (no row yet) and returns their record, to be
    /// written in a [`Batch`]. Idempotent.
    fn put_image_file(&self, bytes: &[u8]) -> Result<ImageRecord>;

    /// The bytes of a stored image; an unknown id is an error.
    fn image_bytes(&self, id: &ImageId) -> Result<Vec<u8>>;

    /// A prompt by id.
    fn prompt(&self, id: &PromptId) -> Result<Option<PromptRecord>>;

    /// Every prompt, or those of one split, in id order.
    fn prompts(&self, split: Option<Split>) -> Result<Vec<PromptRecord>>;

    /// An image row by id.
    fn image(&self, id: &ImageId) -> Result<Option<ImageRecord>>;

    /// Every image row, in id order.
    fn images(&self) -> Result<Vec<ImageRecord>>;

    /// Every annotator, in id order.
    fn annotators(&self) -> Result<Vec<AnnotatorRecord>>;

    /// Feedback matching `query`, in insertion order.
    fn feedback(&self, query: &Query) -> Result<Vec<Feedback>>;

    /// How many of each thing the store holds.
    fn counts(&self) -> Result<Counts>;

    /// Deletes image files no row refers to (left by a crash between file and row) and leftover
    /// temporary files; returns how many files were removed.
    fn gc(&mut self) -> Result<usize>;

    /// Stores one image: its file, then its row.
    fn add_image(&mut self, bytes: &[u8]) -> Result<ImageRecord> {
        let record = self.put_image_file(bytes)?;
        self.write(&Batch {
            images: vec![record.clone()],
            ..Batch::default()
        })?;
        Ok(record)
    }

    /// Stores one prompt.
    fn add_prompt(&mut self, prompt: &PromptRecord) -> Result<()> {
        self.write(&Batch {
            prompts: vec![prompt.clone()],
            ..Batch::default()
        })
    }

    /// Stores one annotator.
    fn add_annotator(&mut self, annotator: &AnnotatorRecord) -> Result<()> {
        self.write(&Batch {
            annotators: vec![annotator.clone()],
            ..Batch::default()
        })
    }

    /// Appends feedback records in one transaction.
    fn add_feedback(&mut self, feedback: &[Feedback]) -> Result<()> {
        self.write(&Batch {
            feedback: feedback.to_vec(),
            ..Batch::default()
        })
    }

    /// Appends one comparison.
    fn add_comparison(&mut self, c: &Comparison) -> Result<()> {
        self.add_feedback(&[c.clone().into()])
    }

    /// Appends one label.
    fn add_label(&mut self, l: &Label) -> Result<()> {
        self.add_feedback(&[l.clone().into()])
    }

    /// Appends one rating.
    fn add_rating(&mut self, r: &Rating) -> Result<()> {
        self.add_feedback(&[r.clone().into()])
    }

    /// Appends one region mark.
    fn add_region_mark(&mut self, m: &RegionMark) -> Result<()> {
        self.add_feedback(&[m.clone().into()])
    }

    /// Appends one reason.
    fn add_reason(&mut self, r: &Reason) -> Result<()> {
        self.add_feedback(&[r.clone().into()])
    }

    /// An annotator by id.
    fn annotator(&self, id: &AnnotatorId) -> Result<Option<AnnotatorRecord>> {
        Ok(self.annotators()?.into_iter().find(|a| &a.id == id))
    }

    /// Comparisons matching `query` (its `kind` is ignored).
    fn comparisons(&self, query: &Query) -> Result<Vec<Comparison>> {
        let q = Query {
            kind: Some(FeedbackKind::Comparison),
            ..query.clone()
        };
        Ok(self
            .feedback(&q)?
            .into_iter()
            .filter_map(|f| match f {
                Feedback::Comparison(c) => Some(c),
                _ => None,
            })
            .collect())
    }

    /// Labels matching `query` (its `kind` is ignored).
    fn labels(&self, query: &Query) -> Result<Vec<Label>> {
        let q = Query {
            kind: Some(FeedbackKind::Label),
            ..query.clone()
        };
        Ok(self
            .feedback(&q)?
            .into_iter()
            .filter_map(|f| match f {
                Feedback::Label(c) => Some(c),
                _ => None,
            })
            .collect())
    }

    /// Ratings matching `query` (its `kind` is ignored).
    fn ratings(&self, query: &Query) -> Result<Vec<Rating>> {
        let q = Query {
            kind: Some(FeedbackKind::Rating),
            ..query.clone()
        };
        Ok(self
            .feedback(&q)?
            .into_iter()
            .filter_map(|f| match f {
                Feedback::Rating(c) => Some(c),
                _ => None,
            })
            .collect())
    }

    /// Region marks matching `query` (its `kind` is ignored).
    fn region_marks(&self, query: &Query) -> Result<Vec<RegionMark>> {
        let q = Query {
            kind: Some(FeedbackKind::RegionMark),
            ..query.clone()
        };
        Ok(self
            .feedback(&q)?
            .into_iter()
            .filter_map(|f| match f {
                Feedback::RegionMark(c) => Some(c),
                _ => None,
            })
            .collect())
    }

    /// Reasons matching `query` (its `kind` is ignored).
    fn reasons(&self, query: &Query) -> Result<Vec<Reason>> {
        let q = Query {
            kind: Some(FeedbackKind::Reason),
            ..query.clone()
        };
        Ok(self
            .feedback(&q)?
            .into_iter()
            .filter_map(|f| match f {
                Feedback::Reason(c) => Some(c),
                _ => None,
            })
            .collect())
    }
}
