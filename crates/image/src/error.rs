//! The errors of the image store, one enum for the crate: every variant names what failed (the
//! path, digest or reference) so a CLI or API user can act on the message alone.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid digest {0:?}: expected sha256:<64 lowercase hex digits>")]
    BadDigest(String),
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("size mismatch for {what}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    #[error("invalid image reference {reference:?}: {reason}")]
    BadReference { reference: String, reason: String },
    #[error("image {0:?} not found in the store")]
    NotFound(String),
    #[error("blob {0} is missing from the store")]
    MissingBlob(String),
    #[error("invalid {what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error("layer {layer}: entry {entry:?}: {reason}")]
    UnsafeEntry {
        layer: String,
        entry: String,
        reason: String,
    },
    #[error("layer {layer}: {reason}")]
    Layer { layer: String, reason: String },
    #[error("registry {registry}: {message}")]
    Registry { registry: String, message: String },
    #[error("registry {registry}: authentication failed: {message}")]
    Unauthorized { registry: String, message: String },
}

impl ImageError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ImageError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        ImageError::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// Whether the caller asked for something that is not there (a 404 rather than a 500).
    pub fn is_not_found(&self) -> bool {
        matches!(self, ImageError::NotFound(_))
    }

    /// Whether the error is the caller's input (a bad reference, archive or credentials) rather
    /// than a fault of the host.
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, ImageError::Io { .. })
    }
}

pub type Result<T, E = ImageError> = std::result::Result<T, E>;
