use std::path::PathBuf;

/// Errors of the runtime. Every variant names the operation and the object it was applied to.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} for sandbox {id}: {source}")]
    Sys {
        op: &'static str,
        id: String,
        #[source]
        source: std::io::Error,
    },
    #[error("netlink {op} on {object}: {message}")]
    Netlink {
        op: &'static str,
        object: String,
        message: String,
    },
    #[error("nftables: {0}")]
    Nft(String),
    #[error("sandbox {0} is not known to the runtime")]
    UnknownSandbox(String),
    #[error("no free address left in {0}")]
    AddressPoolExhausted(String),
    #[error("sandbox {id} failed to start: {reason}")]
    StartFailed { id: String, reason: String },
    #[error("hibernate and checkpoint are unavailable on this host: {0}")]
    CheckpointUnavailable(String),
    #[error("{op} of sandbox {id}: {reason}")]
    Checkpoint {
        op: &'static str,
        id: String,
        reason: String,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl RuntimeError {
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        RuntimeError::Io {
            op,
            path: path.into(),
            source,
        }
    }
    pub fn sys(op: &'static str, id: &str, source: std::io::Error) -> Self {
        RuntimeError::Sys {
            op,
            id: id.to_string(),
            source,
        }
    }
}
