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

/// Parses a TOML config file, applies `key.path=value` overrides (as `--set` gives them), and
/// returns the typed config with its resolved TOML text (to save next to the run's artifacts).
///
/// Values are TOML literals (`3`, `1e-4`, `true`, `"text"`, `[1, 2]`); anything that does not
/// parse as one is taken as a string. An override of a key the config does not have is caught by
/// the config's `deny_unknown_fields`, naming the valid keys.
pub fn from_toml_file_with_overrides<T: DeserializeOwned + serde::Serialize>(
    path: &Path,
    overrides: &[String],
) -> Result<(T, String)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    from_toml_str_with_overrides(&text, path, overrides)
}

/// [`from_toml_file_with_overrides`] on text already read from `path` (a run's saved config,
/// say); `path` names it in errors.
pub fn from_toml_str_with_overrides<T: DeserializeOwned + serde::Serialize>(
    text: &str,
    path: &Path,
    overrides: &[String],
) -> Result<(T, String)> {
    let mut value: toml::Table =
        toml::from_str(text).map_err(|e| Error::format(path, e.to_string()))?;
    for o in overrides {
        apply_override(&mut value, o)?;
    }
    let typed: T = value.try_into().map_err(|e: toml::de::Error| {
        Error::format(path, format!("{e} (after --set overrides)"))
    })?;
    let resolved = toml::to_string(&typed).map_err(|e| Error::invalid(e.to_string()))?;
    Ok((typed, resolved))
}

/// The key of a `key.path=value` override.
pub fn override_key(o: &str) -> Result<&str> {
    split_override(o).map(|(k, _)| k)
}

/// `key.path=value` as (trimmed key, raw value).
fn split_override(o: &str) -> Result<(&str, &str)> {
    o.split_once('=')
        .map(|(k, v)| (k.trim(), v))
        .ok_or_else(|| Error::config(o, "expected key.path=value"))
}

fn apply_override(table: &mut toml::Table, o: &str) -> Result<()> {
    let (key, raw) = split_override(o)?;
    let value = parse_literal(raw.trim());
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts
        .pop()
        .filter(|k| !k.is_empty())
        .ok_or_else(|| Error::config(key, "empty key"))?;
    let mut node = table;
    for (i, p) in parts.iter().enumerate() {
        let entry = node
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = entry.as_table_mut().ok_or_else(|| {
            Error::config(
                parts[..=i].join("."),
                "is a value, not a section; cannot set a key inside it",
            )
        })?;
    }
    node.insert(last.to_string(), value);
    Ok(())
}

fn parse_literal(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, serde::Serialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Demo {
        learning_rate: f64,
        steps: usize,
    }

    #[derive(Debug, Deserialize, serde::Serialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        name: String,
        train: Demo,
    }

    #[test]
    fn overrides_apply_and_typos_in_them_are_caught() {
        let dir = std::env::temp_dir().join(format!("tiller-core-ovr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("o.toml");
        std::fs::write(
            &p,
            "name = \"a\"\n[train]\nlearning_rate = 1.0\nsteps = 2\n",
        )
        .unwrap();
        let (o, resolved): (Outer, String) = from_toml_file_with_overrides(
            &p,
            &[
                "train.steps=7".into(),
                "train.learning_rate=1e-4".into(),
                "name=run two".into(),
            ],
        )
        .unwrap();
        assert_eq!(
            o.train,
            Demo {
                learning_rate: 1e-4,
                steps: 7
            }
        );
        assert_eq!(o.name, "run two");
        assert!(resolved.contains("steps = 7"), "{resolved}");
        let e = from_toml_file_with_overrides::<Outer>(&p, &["train.stpes=3".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("stpes") && e.contains("steps"), "{e}");
        let e = from_toml_file_with_overrides::<Outer>(&p, &["name.x=3".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("name") && e.contains("not a section"), "{e}");
        let e = from_toml_file_with_overrides::<Outer>(&p, &["novalue".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("key.path=value"), "{e}");
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
