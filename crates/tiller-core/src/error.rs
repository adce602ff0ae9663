//! The one error type of Tiller's library crates. Binaries wrap it with `anyhow` context.
//!
//! Messages name the file, field or value at fault and, where there is one, the fix.

use std::path::{Path, PathBuf};

/// Result alias used across Tiller's library crates.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every error a Tiller library can return, in a few categories.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its content is not what was expected (corrupt, wrong format, missing entry).
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    /// A configuration value or key is invalid; `field` is its dotted path.
    #[error("config field `{field}`: {message}")]
    Config { field: String, message: String },
    /// An argument to a library call is invalid (wrong shape, out of range, unsupported request).
    #[error("{0}")]
    Invalid(String),
    /// A NaN or infinite value where a finite one is required.
    #[error("non-finite value: {0}")]
    NonFinite(String),
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// A malformed-file error for `path`.
    pub fn format(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Self::Format {
            path: path.as_ref().to_path_buf(),
            message: message.into(),
        }
    }

    /// An invalid-config error for the dotted `field`.
    pub fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Config {
            field: field.into(),
            message: message.into(),
        }
    }

    /// An invalid-argument error.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::Invalid(message.into())
    }
}
