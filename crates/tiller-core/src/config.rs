//! Typed config parsing. Every config struct in Tiller derives `Deserialize` with
//! `#[serde(deny_unknown_fields)]`; these helpers turn serde's message (which already lists the
//! valid keys) into an [`Error`] naming the file.

use crate::{Error, Result};
use serde::de::DeserializeOwned;
use std::path::Path;

/// Parses a JSON config file into `T`, naming the file and the offending key on error.
pub fn from_json_file<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(path, e.to_string()))
}

/// Parses a TOML config file into `T`, naming the file and the offending key on error.
pub fn from_toml_file<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    toml::from_str(&text).map_err(|e| Error::format(path, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Demo {
        learning_rate: f64,
        steps: usize,
    }

    #[test]
    fn misspelled_key_names_the_valid_ones() {
        let dir = std::env::temp_dir().join(format!("tiller-core-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.toml");
        std::fs::write(&p, "learning_rte = 1.0\nsteps = 2\n").unwrap();
        let e = from_toml_file::<Demo>(&p).unwrap_err().to_string();
        assert!(e.contains("learning_rte"), "{e}");
        assert!(e.contains("learning_rate") && e.contains("steps"), "{e}");
        assert!(e.contains("c.toml"), "{e}");
    }
}
