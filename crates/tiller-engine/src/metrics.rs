//! Metrics: one JSON object per logged step in `metrics.jsonl`, mirrored to TensorBoard.

use crate::tensorboard::{EventWriter, Histogram};
use std::io::Write;
use std::path::{Path, PathBuf};
use tiller_core::{Error, Result};

/// The run's metrics sink.
pub struct MetricsLog {
    path: PathBuf,
    jsonl: std::fs::File,
    tensorboard: EventWriter,
}

/// Rewrites the JSONL file at `path` (if it exists) keeping only the lines whose integer field
/// `key` is at most `step`: what a resumed run does to the lines its interrupted predecessor
/// logged after its last checkpoint. Written atomically.
pub fn drop_lines_after(path: &Path, key: &str, step: u64) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get(key).and_then(|s| s.as_u64()))
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::checkpoint::atomic_write(path, kept.as_bytes())
}

impl MetricsLog {
    /// Opens `metrics.jsonl` (appending) and a new TensorBoard event file in `dir`.
    ///
    /// When resuming from `resume_step`, lines of steps after it (logged by the interrupted run
    /// after its last checkpoint, and about to be logged again) are dropped first, so the file
    /// reads as one uninterrupted run.
    pub fn open(dir: &Path, resume_step: Option<u64>) -> Result<Self> {
        let path = dir.join("metrics.jsonl");
        if let Some(step) = resume_step {
            drop_lines_after(&path, "step", step)?;
        }
        let jsonl = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(Self {
            path,
            jsonl,
            tensorboard: EventWriter::create(dir)?,
        })
    }

    /// Logs scalars for `step`. A non-finite value is an error naming it and the step.
    pub fn log(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        let mut obj = serde_json::Map::new();
        obj.insert("step".into(), step.into());
        for (name, v) in values {
            if !v.is_finite() {
                return Err(Error::NonFinite(format!("{name} = {v} at step {step}")));
            }
            obj.insert((*name).into(), (*v).into());
            self.tensorboard.scalar(name, step, *v)?;
        }
        let line = serde_json::Value::Object(obj).to_string();
        writeln!(self.jsonl, "{line}").map_err(|e| Error::io(&self.path, e))?;
        self.tensorboard.flush()
    }

    /// Logs a histogram of `values` (TensorBoard only).
    pub fn histogram(&mut self, name: &str, step: u64, values: &[f64]) -> Result<()> {
        match Histogram::from_values(values, 30) {
            Some(h) => self.tensorboard.histogram(name, step, &h),
            None => Ok(()),
        }
    }

    /// Forces everything to disk.
    pub fn flush(&mut self) -> Result<()> {
        self.jsonl
            .sync_data()
            .map_err(|e| Error::io(&self.path, e))?;
        self.tensorboard.flush()
    }
}
