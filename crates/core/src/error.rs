use crate::store::StoreError;
use crate::templates::TemplateError;
use warren_runtime::RuntimeError;

/// Errors of the control plane, typed by what the caller did wrong (or what broke), so each edge
/// can map them to its own vocabulary (HTTP statuses, exit codes).
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unauthorized(String),
    /// The host cannot do this at all (e.g. hibernation without a working CRIU).
    #[error("{0}")]
    Unavailable(String),
    #[error("runtime: {0}")]
    Runtime(#[from] RuntimeError),
    #[error("store: {0}")]
    Store(StoreError),
    #[error("{0}")]
    Audit(#[from] crate::audit::AuditError),
    #[error("{0}")]
    Internal(String),
    /// A fault of the image store on this host (disk, permissions), not of the caller's input.
    #[error("image store: {0}")]
    Image(String),
}

impl From<StoreError> for CoreError {
    fn from(e: StoreError) -> Self {
        match e {
            // The row vanished between our read and our write: another operation removed it.
            StoreError::Missing(id) => CoreError::NotFound(format!("sandbox {id} not found")),
            // Another operation changed the state first.
            StoreError::Illegal { id, source } => CoreError::Conflict(format!(
                "sandbox {id} is {} and cannot do that now",
                source.from
            )),
            e => CoreError::Store(e),
        }
    }
}

impl From<TemplateError> for CoreError {
    fn from(e: TemplateError) -> Self {
        CoreError::NotFound(e.to_string())
    }
}
