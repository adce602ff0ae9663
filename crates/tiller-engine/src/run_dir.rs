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

    /// Opens a run to resume it with `--set` overrides, which may only touch the `extendable`
    /// keys: those that extend or re-log a run without changing what its finished steps meant
    /// (the step count, logging intervals). An entry ending in `.` allows a whole section. The
    /// updated config is written back (atomically) before training goes on, so the folder keeps
    /// describing the run; any other key is refused, naming it and the keys that may change.
    pub fn open_with_overrides<T: serde::de::DeserializeOwned + serde::Serialize>(
        root: &Path,
        overrides: &[String],
        extendable: &[&str],
    ) -> Result<(Self, T, String)> {
        let (dir, text) = Self::open(root).map_err(|e| {
            Error::invalid(format!(
                "--resume needs an existing run in {}: {e}",
                root.display()
            ))
        })?;
        let path = root.join(CONFIG_FILE);
        for o in overrides {
            let key = tiller_core::config::override_key(o)?;
            let allowed = extendable.iter().any(|a| match a.strip_suffix('.') {
                Some(section) => key
                    .strip_prefix(section)
                    .is_some_and(|r| r.starts_with('.')),
                None => key == *a,
            });
            if !allowed {
                return Err(Error::config(
                    key,
                    format!(
                        "cannot change on --resume (it would change what the finished steps of {} meant); \
                         on resume --set may change only: {}",
                        root.display(),
                        extendable.join(", ")
                    ),
                ));
            }
        }
        let (config, resolved): (T, String) =
            tiller_core::config::from_toml_str_with_overrides(&text, &path, overrides)?;
        if !overrides.is_empty() {
            crate::checkpoint::atomic_write(&path, resolved.as_bytes())?;
        }
        Ok((dir, config, resolved))
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Train {
        steps: u64,
        learning_rate: f64,
    }
    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Log {
        every: u64,
    }
    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        train: Train,
        log: Log,
    }

    #[test]
    fn resume_overrides_extend_a_run_and_refuse_anything_else() {
        let root = std::env::temp_dir().join(format!("tiller-run-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let cfg = Cfg {
            train: Train {
                steps: 100,
                learning_rate: 1e-3,
            },
            log: Log { every: 10 },
        };
        RunDir::create(&root, &toml::to_string(&cfg).unwrap()).unwrap();
        let ext = &["train.steps", "log."];

        // No overrides: the saved config as it is, the file untouched.
        let before = std::fs::read_to_string(root.join(CONFIG_FILE)).unwrap();
        let (_, c, _) = RunDir::open_with_overrides::<Cfg>(&root, &[], ext).unwrap();
        assert_eq!(c, cfg);

        // Refused keys name themselves and what may change, and leave the file as it was.
        for bad in ["train.learning_rate=1.0", "logx.every=3", "train=3"] {
            let e = RunDir::open_with_overrides::<Cfg>(&root, &[bad.into()], ext)
                .unwrap_err()
                .to_string();
            let key = bad.split('=').next().unwrap();
            assert!(e.contains(key) && e.contains("train.steps, log."), "{e}");
        }
        assert_eq!(
            std::fs::read_to_string(root.join(CONFIG_FILE)).unwrap(),
            before
        );

        // Extending the step count and re-logging: applied and written back.
        let (_, c, resolved) = RunDir::open_with_overrides::<Cfg>(
            &root,
            &["train.steps=250".into(), "log.every=5".into()],
            ext,
        )
        .unwrap();
        assert_eq!(
            (c.train.steps, c.log.every, c.train.learning_rate),
            (250, 5, 1e-3)
        );
        assert_eq!(
            std::fs::read_to_string(root.join(CONFIG_FILE)).unwrap(),
            resolved
        );
        let (_, again, _) = RunDir::open_with_overrides::<Cfg>(&root, &[], ext).unwrap();
        assert_eq!(again, c);
        // A typo inside an extendable section is still caught by the config's own checks.
        let e = RunDir::open_with_overrides::<Cfg>(&root, &["log.evry=5".into()], ext)
            .unwrap_err()
            .to_string();
        assert!(e.contains("evry"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
