//! A run directory: everything one training run writes, in one folder.
//!
//! ```text
//! runs/<name>/
//!   config.toml          the resolved config (defaults + preset + --set overrides)
//!   metrics.jsonl        one JSON object per logged step
//!   events.out.tfevents.*  the same scalars for TensorBoard
//!   samples/step-XXXXXXXX.png  fixed-seed sample grids
//!   checkpoints/step-XXXXXXXX/ and checkpoints/latest
//! ```

use std::path::{Path, PathBuf};
use tiller_core::{Error, Result};

/// One training run's folder.
#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
}

/// The resolved config's file name inside a run directory.
pub const CONFIG_FILE: &str = "config.toml";

impl RunDir {
    /// Starts a new run in `root`. Refuses a folder that already holds a run, so nothing on disk
    /// is overwritten: resume it instead, or choose another folder.
    pub fn create(root: &Path, resolved_config: &str) -> Result<Self> {
        if root.join(CONFIG_FILE).exists() {
            return Err(Error::invalid(format!(
                "{} already holds a run; pass `--resume latest` to continue it or choose another --out",
                root.display()
            )));
        }
        std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
        let dir = Self {
            root: root.to_path_buf(),
        };
        crate::checkpoint::atomic_write(&dir.root.join(CONFIG_FILE), resolved_config.as_bytes())?;
        Ok(dir)
    }

    /// Opens an existing run to resume it; its config is returned as written.
    pub fn open(root: &Path) -> Result<(Self, String)> {
        let path = root.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Ok((
            Self {
                root: root.to_path_buf(),
            },
            text,
        ))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    pub fn samples(&self) -> PathBuf {
        self.root.join("samples")
    }

    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }
}
