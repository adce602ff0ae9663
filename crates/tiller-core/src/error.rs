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

/// Adds what was being done to a failure's message, as `anyhow`'s `Context` does for binaries:
/// `read(path).context(format!("--store {}", path.display()))?`.
pub trait Context<T> {
    /// The failure as an [`Error::Invalid`] whose message starts with `what`.
    fn context(self, what: impl std::fmt::Display) -> Result<T>;
    /// [`Context::context`] with the message built only on failure.
    fn with_context<D: std::fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T>;
}

impl<T, E: std::fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl std::fmt::Display) -> Result<T> {
        self.map_err(|e| Error::Invalid(format!("{what}: {e}")))
    }
    fn with_context<D: std::fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T> {
        self.map_err(|e| Error::Invalid(format!("{}: {e}", what())))
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, what: impl std::fmt::Display) -> Result<T> {
        self.ok_or_else(|| Error::Invalid(what.to_string()))
    }
    fn with_context<D: std::fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T> {
        self.ok_or_else(|| Error::Invalid(what().to_string()))
    }
}
