//! The SQLite preference store: one folder holding `preferences.sqlite` and the content-addressed
//! `images/` ([`crate::images`]).
//!
//! ```text
//! <store>/preferences.sqlite        prompts, images, annotators, feedback (schema below)
//! <store>/images/ab/cdef….png       image bytes, named by their SHA-256
//! ```
//!
//! The database runs in WAL mode (readers never block the writer; a crash rolls back to the last
//! commit) with foreign keys on. The schema version is SQLite's `user_version`; a store written by a
//! newer schema is refused rather than misread. Feedback rows keep the columns queries filter on
//! (kind, prompt, images, annotator, time) and the whole record as JSON in `body`, so a new field
//! needs no migration; a Postgres backend would use the same layout with `jsonb`.

use crate::images::ImageDir;
use crate::store::{Batch, Counts, PreferenceStore, Query};
use crate::vocab::{
    AnnotatorId, AnnotatorRecord, Feedback, ImageFormat, ImageId, ImageRecord, PromptId,
    PromptRecord, Split,
};
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use tiller_core::{Error, Result};

/// The schema version this build reads and writes.
pub const SCHEMA_VERSION: i64 = 1;

const SCHEMA_V1: &str = "
CREATE TABLE prompts (
    id    TEXT PRIMARY KEY,
    text  TEXT NOT NULL,
    split TEXT NOT NULL CHECK (split IN ('train', 'validation', 'test')),
    spec  TEXT
);
CREATE TABLE images (
    id     TEXT PRIMARY KEY,
    format TEXT NOT NULL CHECK (format IN ('png', 'jpeg', 'webp')),
    width  INTEGER NOT NULL,
    height INTEGER NOT NULL
);
CREATE TABLE annotators (
    id     TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    taste  TEXT
);
CREATE TABLE feedback (
    seq       INTEGER PRIMARY KEY,
    kind      TEXT NOT NULL,
    prompt    TEXT NOT NULL REFERENCES prompts(id),
    image     TEXT NOT NULL REFERENCES images(id),
    image_b   TEXT REFERENCES images(id),
    annotator TEXT NOT NULL REFERENCES annotators(id),
    time_ms   INTEGER,
    body      TEXT NOT NULL
);
CREATE INDEX feedback_by_prompt ON feedback(prompt);
CREATE INDEX feedback_by_kind ON feedback(kind);
CREATE INDEX feedback_by_annotator ON feedback(annotator);
";

/// A preference store in a folder: SQLite for records, files for images.
#[derive(Debug)]
pub struct SqliteStore {
    root: PathBuf,
    db_path: PathBuf,
    conn: Connection,
    images: ImageDir,
}

impl SqliteStore {
    /// Opens the store in `root`, creating the folder and schema when absent.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
        let db_path = root.join("preferences.sqlite");
        let conn = Connection::open(&db_path)
            .map_err(|e| Error::format(&db_path, format!("cannot open: {e}")))?;
        let store = Self {
            images: ImageDir::new(root.join("images")),
            root,
            db_path,
            conn,
        };
        store.init()?;
        Ok(store)
    }

    /// The store's folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The image folder.
    pub fn image_dir(&self) -> &ImageDir {
        &self.images
    }

    fn err(&self, context: &str, e: rusqlite::Error) -> Error {
        Error::format(&self.db_path, format!("{context}: {e}"))
    }

    fn init(&self) -> Result<()> {
        let mode: String = self
            .conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|e| self.err("enabling WAL", e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::format(
                &self.db_path,
                format!("could not enable WAL mode (got {mode})"),
            ));
        }
        self.conn
            .execute_batch("PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;")
            .map_err(|e| self.err("setting pragmas", e))?;
        let version: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| self.err("reading the schema version", e))?;
        match version {
            0 => self
                .conn
                .execute_batch(&format!(
                    "BEGIN; {SCHEMA_V1} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                ))
                .map_err(|e| self.err("creating the schema", e)),
            SCHEMA_VERSION => Ok(()),
            newer => Err(Error::format(
                &self.db_path,
                format!(
                    "schema version {newer} is newer than this build's {SCHEMA_VERSION}; \
                     open the store with a newer Tiller"
                ),
            )),
        }
    }

    fn insert_prompt(&self, tx: &Transaction<'_>, p: &PromptRecord) -> Result<()> {
        if p.text.trim().is_empty() {
            return Err(Error::invalid(format!("prompt {}: empty text", p.id)));
        }
        if let Some(existing) =
            read_prompt(tx, &p.id).map_err(|e| self.err("reading a prompt", e))?
        {
            let existing = existing.map_err(|m| Error::format(&self.db_path, m))?;
            if &existing != p {
                return Err(Error::invalid(format!(
                    "prompt {} is already stored with different content ({:?}, {}); \
                     prompts are immutable, give the new one another id",
                    p.id,
                    existing.text,
                    existing.split.name()
                )));
            }
            return Ok(());
        }
        let spec = p
            .spec
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| Error::invalid(format!("prompt {}: {e}", p.id)))?;
        tx.execute(
            "INSERT INTO prompts (id, text, split, spec) VALUES (?1, ?2, ?3, ?4)",
            params![p.id.0, p.text, p.split.name(), spec],
        )
        .map_err(|e| self.err(&format!("inserting prompt {}", p.id), e))?;
        Ok(())
    }

    fn insert_annotator(&self, tx: &Transaction<'_>, a: &AnnotatorRecord) -> Result<()> {
        a.validate()?;
        let existing = tx
            .query_row(
                "SELECT source, taste FROM annotators WHERE id = ?1",
                [&a.id.0],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?)),
            )
            .optional()
            .map_err(|e| self.err("reading an annotator", e))?;
        let source = json(&a.source)?;
        let taste = a.taste.as_ref().map(json).transpose()?;
        if let Some((s, t)) = existing {
            // Compare the stored text, not re-parsed values: serde_json's float parsing may differ
            // from the printed value in the last bit, while printing the same value is exact.
            annotator_from_row(a.id.clone(), &s, t.as_deref())
                .map_err(|m| Error::format(&self.db_path, m))?;
            if s != source || t != taste {
                return Err(Error::invalid(format!(
                    "annotator {} is already stored with a different source or taste",
                    a.id
                )));
            }
            return Ok(());
        }
        tx.execute(
            "INSERT INTO annotators (id, source, taste) VALUES (?1, ?2, ?3)",
            params![a.id.0, source, taste],
        )
        .map_err(|e| self.err(&format!("inserting annotator {}", a.id), e))?;
        Ok(())
    }

    fn insert_feedback(&self, tx: &Transaction<'_>, index: usize, f: &Feedback) -> Result<()> {
        let name = || format!("feedback #{index}: {}", f.describe());
        f.validate()
            .map_err(|e| Error::invalid(format!("feedback #{index}: {e}")))?;
        let exists = |table: &str, id: &str| -> Result<bool> {
            tx.query_row(
                &format!("SELECT 1 FROM {table} WHERE id = ?1"),
                [id],
                |_| Ok(()),
            )
            .optional()
            .map(|o| o.is_some())
            .map_err(|e| self.err(&format!("looking up {table}"), e))
        };
        if !exists("prompts", &f.prompt().0)? {
            return Err(Error::invalid(format!(
                "{}: unknown prompt {}; add the prompt first",
                name(),
                f.prompt()
            )));
        }
        for image in f.images() {
            if !exists("images", &image.0)? {
                return Err(Error::invalid(format!(
                    "{}: unknown image {image}; add the image first",
                    name()
                )));
            }
        }
        let annotator = &f.provenance().annotator;
        if !exists("annotators", &annotator.0)? {
            return Err(Error::invalid(format!(
                "{}: unknown annotator {annotator}; add the annotator first",
                name()
            )));
        }
        let images = f.images();
        tx.execute(
            "INSERT INTO feedback (kind, prompt, image, image_b, annotator, time_ms, body) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                f.kind().name(),
                f.prompt().0,
                images[0].0,
                images.get(1).map(|i| i.0.as_str()),
                annotator.0,
                f.provenance().time_ms,
                json(f)?,
            ],
        )
        .map_err(|e| self.err(&format!("inserting {}", name()), e))?;
        Ok(())
    }

    fn count(&self, sql: &str) -> Result<u64> {
        self.conn
            .query_row(sql, [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(|e| self.err("counting", e))
    }
}

fn json<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| Error::invalid(format!("serialising: {e}")))
}

type Row<T> = std::result::Result<T, String>;

fn read_prompt(conn: &Connection, id: &PromptId) -> rusqlite::Result<Option<Row<PromptRecord>>> {
    conn.query_row(
        "SELECT id, text, split, spec FROM prompts WHERE id = ?1",
        [&id.0],
        prompt_from_row,
    )
    .optional()
}

fn prompt_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row<PromptRecord>> {
    let id: String = r.get(0)?;
    let text: String = r.get(1)?;
    let split: String = r.get(2)?;
    let spec: Option<String> = r.get(3)?;
    Ok((|| {
        let split = Split::parse(&split).map_err(|e| format!("prompt {id}: {e}"))?;
        let spec = spec
            .map(|s| serde_json::from_str(&s))
            .transpose()
            .map_err(|e| format!("prompt {id}: spec: {e}"))?;
        Ok(PromptRecord {
            id: PromptId(id.clone()),
            text,
            split,
            spec,
        })
    })())
}

fn annotator_from_row(id: AnnotatorId, source: &str, taste: Option<&str>) -> Row<AnnotatorRecord> {
    Ok(AnnotatorRecord {
        source: serde_json::from_str(source).map_err(|e| format!("annotator {id}: {e}"))?,
        taste: taste
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| format!("annotator {id}: taste: {e}"))?,
        id,
    })
}

fn image_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row<ImageRecord>> {
    let id: String = r.get(0)?;
    let format: String = r.get(1)?;
    let (width, height): (i64, i64) = (r.get(2)?, r.get(3)?);
    Ok(ImageFormat::parse(&format)
        .map_err(|e| format!("image {id}: {e}"))
        .map(|format| ImageRecord {
            id: ImageId(id),
            format,
            width: width as u32,
            height: height as u32,
        }))
}

impl PreferenceStore for SqliteStore {
    fn write(&mut self, batch: &Batch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        // Checks that need no database run first, so a bad batch fails before the transaction.
        for image in &batch.images {
            if !self.images.contains(image)? {
                return Err(Error::invalid(format!(
                    "image {}: its file is not in {}; store the bytes with put_image_file first",
                    image.id,
                    self.images.root().display()
                )));
            }
        }
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(|e| Error::format(&self.db_path, format!("starting a transaction: {e}")))?;
        for p in &batch.prompts {
            self.insert_prompt(&tx, p)?;
        }
        for image in &batch.images {
            tx.execute(
                "INSERT OR IGNORE INTO images (id, format, width, height) VALUES (?1, ?2, ?3, ?4)",
                params![
                    image.id.0,
                    image.format.name(),
                    image.width as i64,
                    image.height as i64
                ],
            )
            .map_err(|e| self.err(&format!("inserting image {}", image.id), e))?;
        }
        for a in &batch.annotators {
            self.insert_annotator(&tx, a)?;
        }
        for (i, f) in batch.feedback.iter().enumerate() {
            self.insert_feedback(&tx, i, f)?;
        }
        // Dropping `tx` on any error above rolls everything back.
        tx.commit()
            .map_err(|e| Error::format(&self.db_path, format!("committing: {e}")))
    }

    fn put_image_file(&self, bytes: &[u8]) -> Result<ImageRecord> {
        self.images.put(bytes)
    }

    fn image_bytes(&self, id: &ImageId) -> Result<Vec<u8>> {
        let record = self
            .image(id)?
            .ok_or_else(|| Error::invalid(format!("unknown image {id}")))?;
        self.images.get(&record)
    }

    fn prompt(&self, id: &PromptId) -> Result<Option<PromptRecord>> {
        read_prompt(&self.conn, id)
            .map_err(|e| self.err("reading a prompt", e))?
            .map(|r| r.map_err(|m| Error::format(&self.db_path, m)))
            .transpose()
    }

    fn prompts(&self, split: Option<Split>) -> Result<Vec<PromptRecord>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, text, split, spec FROM prompts \
                 WHERE ?1 IS NULL OR split = ?1 ORDER BY id",
            )
            .map_err(|e| self.err("reading prompts", e))?;
        let rows = stmt
            .query_map([split.map(Split::name)], prompt_from_row)
            .map_err(|e| self.err("reading prompts", e))?;
        rows.map(|r| {
            r.map_err(|e| self.err("reading prompts", e))?
                .map_err(|m| Error::format(&self.db_path, m))
        })
        .collect()
    }

    fn image(&self, id: &ImageId) -> Result<Option<ImageRecord>> {
        self.conn
            .query_row(
                "SELECT id, format, width, height FROM images WHERE id = ?1",
                [&id.0],
                image_from_row,
            )
            .optional()
            .map_err(|e| self.err("reading an image", e))?
            .map(|r| r.map_err(|m| Error::format(&self.db_path, m)))
            .transpose()
    }

    fn images(&self) -> Result<Vec<ImageRecord>> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, format, width, height FROM images ORDER BY id")
            .map_err(|e| self.err("reading images", e))?;
        let rows = stmt
            .query_map([], image_from_row)
            .map_err(|e| self.err("reading images", e))?;
        rows.map(|r| {
            r.map_err(|e| self.err("reading images", e))?
                .map_err(|m| Error::format(&self.db_path, m))
        })
        .collect()
    }

    fn annotators(&self) -> Result<Vec<AnnotatorRecord>> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, source, taste FROM annotators ORDER BY id")
            .map_err(|e| self.err("reading annotators", e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                ))
            })
            .map_err(|e| self.err("reading annotators", e))?;
        rows.map(|r| {
            let (id, source, taste) = r.map_err(|e| self.err("reading annotators", e))?;
            annotator_from_row(AnnotatorId(id), &source, taste.as_deref())
                .map_err(|m| Error::format(&self.db_path, m))
        })
        .collect()
    }

    fn feedback(&self, query: &Query) -> Result<Vec<Feedback>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT f.seq, f.body FROM feedback f JOIN prompts p ON p.id = f.prompt \
                 WHERE (?1 IS NULL OR f.kind = ?1) AND (?2 IS NULL OR p.split = ?2) \
                 AND (?3 IS NULL OR f.prompt = ?3) AND (?4 IS NULL OR f.annotator = ?4) \
                 ORDER BY f.seq",
            )
            .map_err(|e| self.err("reading feedback", e))?;
        let rows = stmt
            .query_map(
                params![
                    query.kind.map(|k| k.name()),
                    query.split.map(Split::name),
                    query.prompt.as_ref().map(|p| p.0.as_str()),
                    query.annotator.as_ref().map(|a| a.0.as_str()),
                ],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
            )
            .map_err(|e| self.err("reading feedback", e))?;
        rows.map(|r| {
            let (seq, body) = r.map_err(|e| self.err("reading feedback", e))?;
            serde_json::from_str(&body)
                .map_err(|e| Error::format(&self.db_path, format!("feedback row {seq}: {e}")))
        })
        .collect()
    }

    fn counts(&self) -> Result<Counts> {
        let kind =
            |k: &str| self.count(&format!("SELECT COUNT(*) FROM feedback WHERE kind = '{k}'"));
        Ok(Counts {
            prompts: self.count("SELECT COUNT(*) FROM prompts")?,
            images: self.count("SELECT COUNT(*) FROM images")?,
            annotators: self.count("SELECT COUNT(*) FROM annotators")?,
            comparisons: kind("comparison")?,
            labels: kind("label")?,
            ratings: kind("rating")?,
            region_marks: kind("region_mark")?,
            reasons: kind("reason")?,
        })
    }

    /// Run it when no other process is writing: a concurrent writer's file whose row is not yet
    /// committed looks like an orphan.
    fn gc(&mut self) -> Result<usize> {
        let known: HashSet<ImageId> = self.images()?.into_iter().map(|r| r.id).collect();
        let mut removed = 0;
        for (id, path) in self.images.files()? {
            if id.is_none_or(|id| !known.contains(&id)) {
                let result = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                result.map_err(|e| Error::io(&path, e))?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}
