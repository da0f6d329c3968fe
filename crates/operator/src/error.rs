//! The operator's errors. Reconcilers return them; `controller` turns them into backoff and status
//! conditions.

/// What went wrong in a reconcile. Every variant names the object and the operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} {kind} {name}: {source}")]
    Kube {
        op: &'static str,
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("{kind} has no {field}; objects from the API server always have one")]
    MissingField {
        kind: &'static str,
        field: &'static str,
    },
    /// Not a failure: the Sandbox is being deleted and its Pod (and the node state behind it) is
    /// not gone yet. The finalizer stays until it is.
    #[error("sandbox {0}: waiting for its pod to be deleted and its node state cleaned")]
    WaitingForCleanup(String),
    #[error("{kind} {name}: {message}")]
    Reconcile {
        kind: &'static str,
        name: String,
        message: String,
    },
    #[error("finalizer of {name}: {source}")]
    Finalizer {
        name: String,
        #[source]
        source: Box<kube::runtime::finalizer::Error<Error>>,
    },
}

impl Error {
    pub(crate) fn kube(
        op: &'static str,
        kind: &'static str,
        name: impl Into<String>,
    ) -> impl FnOnce(kube::Error) -> Error {
        let name = name.into();
        move |source| Error::Kube {
            op,
            kind,
            name,
            source,
        }
    }

    /// The API server answered 409 Conflict (a stale resourceVersion, or a precondition that no
    /// longer holds).
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Kube { source: kube::Error::Api(s), .. } if s.is_conflict())
    }
}

/// True when a kube error is the API server's 404.
pub(crate) fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_not_found())
}

/// True when a kube error is the API server's 409 (conflict or already exists).
pub(crate) fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409 || s.is_conflict() || s.is_already_exists())
}
