//! Checkpoints: one folder per step, written atomically, a retention limit, and `latest`.
//!
//! A checkpoint is first written into `checkpoints/.tmp-step-N/`, synced, then renamed to
//! `checkpoints/step-N/` (a rename is atomic on one file system), and only then is the
//! `checkpoints/latest` pointer replaced (also by rename). A kill at any moment leaves either the
//! previous complete checkpoint or the new one as `latest`, never a half-written one.

use burn::module::Module;
use burn::optim::{ModuleOptimizer, OptimizerRecord};
use burn::store::ModuleRecord;
use std::path::{Path, PathBuf};
use tiller_core::{Error, Result};

pub use tiller_core::fs::atomic_write;

/// What `--resume` asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The newest complete checkpoint of the run.
    Latest,
    /// A specific checkpoint folder.
    Path(PathBuf),
}

impl std::str::FromStr for Resume {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(if s == "latest" {
            Resume::Latest
        } else {
            Resume::Path(PathBuf::from(s))
        })
    }
}

/// The checkpoints of one run.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    dir: PathBuf,
    keep: usize,
}

fn step_name(step: u64) -> String {
    format!("step-{step:08}")
}

fn parse_step(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

impl CheckpointStore {
    /// Checkpoints in `dir`, keeping the newest `keep` (at least 1).
    pub fn new(dir: PathBuf, keep: usize) -> Self {
        Self {
            dir,
            keep: keep.max(1),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes checkpoint `step`: `write` fills the given (empty, temporary) folder.
    /// Returns the final folder.
    pub fn save(&self, step: u64, write: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let tmp = self.dir.join(format!(".tmp-{}", step_name(step)));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        write(&tmp)?;
        // Sync every file so the rename cannot expose unwritten data after a crash.
        for entry in std::fs::read_dir(&tmp).map_err(|e| Error::io(&tmp, e))? {
            let path = entry.map_err(|e| Error::io(&tmp, e))?.path();
            if path.is_file() {
                std::fs::File::open(&path)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| Error::io(&path, e))?;
            }
        }
        let fin = self.dir.join(step_name(step));
        if fin.exists() {
            std::fs::remove_dir_all(&fin).map_err(|e| Error::io(&fin, e))?;
        }
        std::fs::rename(&tmp, &fin).map_err(|e| Error::io(&fin, e))?;
        atomic_write(&self.dir.join("latest"), step_name(step).as_bytes())?;
        self.prune()?;
        Ok(fin)
    }

    /// Complete checkpoints, oldest first.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>> {
        if !self.dir.exists() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))? {
            let entry = entry.map_err(|e| Error::io(&self.dir, e))?;
            if let Some(step) = entry.file_name().to_str().and_then(parse_step)
                && entry.path().is_dir()
            {
                out.push((step, entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// The newest complete checkpoint: the one `latest` names, or, if a kill came between the
    /// rename and the pointer update, the newest complete folder.
    pub fn latest(&self) -> Result<Option<(u64, PathBuf)>> {
        let list = self.list()?;
        let pointer = std::fs::read_to_string(self.dir.join("latest")).ok();
        let named = pointer
            .as_deref()
            .and_then(|n| parse_step(n.trim()))
            .and_then(|s| list.iter().find(|(step, _)| *step == s).cloned());
        Ok(match (named, list.last().cloned()) {
            (Some(a), Some(b)) => Some(if b.0 > a.0 { b } else { a }),
            (a, b) => a.or(b),
        })
    }

    /// Resolves a `--resume` request to a checkpoint folder and its step.
    pub fn resolve(&self, resume: &Resume) -> Result<(u64, PathBuf)> {
        match resume {
            Resume::Latest => self.latest()?.ok_or_else(|| {
                Error::invalid(format!(
                    "--resume latest: no checkpoint in {}",
                    self.dir.display()
                ))
            }),
            Resume::Path(p) => {
                let step = p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(parse_step)
                    .ok_or_else(|| {
                        Error::invalid(format!(
                            "--resume {}: not a checkpoint folder (expected .../step-NNNNNNNN)",
                            p.display()
                        ))
                    })?;
                if !p.is_dir() {
                    return Err(Error::invalid(format!(
                        "--resume {}: no such folder",
                        p.display()
                    )));
                }
                Ok((step, p.clone()))
            }
        }
    }

    fn prune(&self) -> Result<()> {
        let list = self.list()?;
        if list.len() > self.keep {
            for (_, path) in &list[..list.len() - self.keep] {
                std::fs::remove_dir_all(path).map_err(|e| Error::io(path, e))?;
            }
        }
        Ok(())
    }
}

// ---- the files inside a checkpoint folder, shared by every training loop

fn record_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::format(path, e.to_string())
}

/// Writes a module's record (weights with their parameter ids) to `path`.
pub fn save_module<M: Module>(path: &Path, module: &M) -> Result<()> {
    module
        .clone()
        .into_record()
        .save(path)
        .map_err(|e| record_err(path, e))
}

/// Loads `path` (written by [`save_module`]) into `module`, restoring its parameter ids.
pub fn load_module<M: Module>(path: &Path, module: M) -> Result<M> {
    let record = ModuleRecord::load(path).map_err(|e| record_err(path, e))?;
    Ok(module.load_record(record))
}

/// Writes the optimizer's state (moments, keyed by parameter id) to `path`.
pub fn save_optimizer(path: &Path, optim: &ModuleOptimizer) -> Result<()> {
    optim
        .to_record()
        .save(path)
        .map_err(|e| record_err(path, e))
}

/// Loads `path` (written by [`save_optimizer`]) into `optim`.
pub fn load_optimizer(path: &Path, optim: ModuleOptimizer) -> Result<ModuleOptimizer> {
    let record = OptimizerRecord::load(path).map_err(|e| record_err(path, e))?;
    Ok(optim.load_record(record))
}

/// Writes a loop's small state file as pretty JSON, atomically.
pub fn save_state<T: serde::Serialize>(path: &Path, state: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(state).map_err(|e| Error::invalid(e.to_string()))?;
    atomic_write(path, text.as_bytes())
}

/// Reads a state file of checkpoint folder `step` and checks it says the same step.
pub fn load_state<T: serde::de::DeserializeOwned>(
    path: &Path,
    step: u64,
    step_of: impl FnOnce(&T) -> u64,
) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let state: T = serde_json::from_str(&text).map_err(|e| record_err(path, e))?;
    let saved = step_of(&state);
    if saved != step {
        return Err(Error::format(
            path,
            format!("step {saved} but the folder says {step}"),
        ));
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tiller-ckpt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn keeps_the_newest_and_points_latest_at_the_last_save() {
        let store = CheckpointStore::new(scratch("keep"), 2);
        for step in [10, 20, 30] {
            store
                .save(step, |d| {
                    atomic_write(&d.join("x"), step.to_string().as_bytes())
                })
                .unwrap();
        }
        let steps: Vec<u64> = store.list().unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![20, 30]);
        let (s, p) = store.latest().unwrap().unwrap();
        assert_eq!(s, 30);
        assert_eq!(std::fs::read_to_string(p.join("x")).unwrap(), "30");
    }

    #[test]
    fn an_interrupted_save_leaves_the_previous_checkpoint_latest() {
        let store = CheckpointStore::new(scratch("crash"), 3);
        store.save(5, |d| atomic_write(&d.join("x"), b"5")).unwrap();
        // A writer that fails half-way (as a kill would) leaves only a temporary folder.
        let err = store.save(6, |d| {
            atomic_write(&d.join("x"), b"partial")?;
            Err(Error::invalid("killed"))
        });
        assert!(err.is_err());
        assert_eq!(store.latest().unwrap().unwrap().0, 5);
        // A kill between the rename and the pointer update: the newer complete folder wins.
        std::fs::create_dir_all(store.dir().join("step-00000007")).unwrap();
        assert_eq!(store.latest().unwrap().unwrap().0, 7);
        assert!(
            store
                .resolve(&Resume::Path("/nope/step-00000001".into()))
                .unwrap_err()
                .to_string()
                .contains("no such folder")
        );
        let empty = CheckpointStore::new(scratch("empty"), 1);
        assert!(
            empty
                .resolve(&Resume::Latest)
                .unwrap_err()
                .to_string()
                .contains("no checkpoint")
        );
    }
}
