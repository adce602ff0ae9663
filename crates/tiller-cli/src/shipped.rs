//! Where the shipped files are found, wherever `tiller` is run from.
//!
//! The repository ships the testbed's base model and reward models under `assets/` and the
//! presets under `configs/`, and the commands' defaults name them as `assets/testbed-base`,
//! `configs/draft-k-testbed.toml` and so on. A path that begins with `assets/` or `configs/` and
//! does not exist relative to the working directory is looked up, in order, under
//!
//! 1. `$TILLER_HOME` (a folder holding `assets/` and `configs/`, e.g. a checkout of Tiller), then
//! 2. the source tree the binary was built from (what `cargo install --path crates/tiller-cli`
//!    leaves in place).
//!
//! Any other path is used as given. Nothing is downloaded; when no candidate exists, the path is
//! returned unchanged and the command's own error names it (see [`missing`]).

use std::path::{Path, PathBuf};

/// The environment variable naming a folder with `assets/` and `configs/`.
pub const HOME_VAR: &str = "TILLER_HOME";

/// The folders a shipped path is looked up under, in order.
pub fn roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Some(home) = std::env::var_os(HOME_VAR).filter(|h| !h.is_empty()) {
        roots.push(PathBuf::from(home));
    }
    // crates/tiller-cli -> the repository root.
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    roots.push(source.canonicalize().unwrap_or(source));
    roots
}

fn is_shipped(path: &Path) -> bool {
    path.is_relative()
        && matches!(
            path.components()
                .next()
                .and_then(|c| c.as_os_str().to_str()),
            Some("assets") | Some("configs")
        )
}

/// `path` itself when it exists or is not a shipped path; otherwise the first existing copy under
/// [`roots`]; otherwise `path` unchanged.
pub fn resolve(path: &Path) -> PathBuf {
    if path.exists() || !is_shipped(path) {
        return path.to_path_buf();
    }
    roots()
        .into_iter()
        .map(|r| r.join(path))
        .find(|p| p.exists())
        .unwrap_or_else(|| path.to_path_buf())
}

/// An error for a shipped path found nowhere, saying where it was looked for.
pub fn missing(path: &Path, what: &str) -> anyhow::Error {
    let mut places = vec![path.display().to_string()];
    if is_shipped(path) {
        places.extend(roots().iter().map(|r| r.join(path).display().to_string()));
    }
    anyhow::anyhow!(
        "{what} {} not found (looked in {}); run from a Tiller checkout, set {HOME_VAR} to one, \
         or pass the path explicitly",
        path.display(),
        places.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_paths_resolve_from_any_directory() {
        // The test runs in crates/tiller-cli, where `assets/` does not exist: the source tree's
        // copy is found.
        let base = resolve(Path::new("assets/testbed-base"));
        assert!(base.join("model_index.json").exists(), "{}", base.display());
        let preset = resolve(Path::new("configs/draft-k-testbed.toml"));
        assert!(preset.is_file(), "{}", preset.display());
        // Other paths are left alone, existing or not.
        assert_eq!(resolve(Path::new("runs/x")), PathBuf::from("runs/x"));
        assert_eq!(resolve(Path::new("gold")), PathBuf::from("gold"));
        // A shipped path that exists nowhere comes back unchanged, and the error says where it
        // was looked for.
        let none = Path::new("assets/no-such-model");
        assert_eq!(resolve(none), none.to_path_buf());
        let err = missing(none, "the base model").to_string();
        assert!(
            err.contains("assets/no-such-model") && err.contains(HOME_VAR),
            "{err}"
        );
    }
}
