//! Warren's image layer: OCI images in, OCI images out, with no container engine involved.
//!
//! This crate holds no HTTP server and no sandbox logic. It owns the on-disk image store (an OCI
//! image layout of blobs plus one unpacked directory per layer, stacked by the runtime as overlay
//! lower dirs) and the conversion of a sandbox's overlay upper dir into an OCI layer.
//!
//! The store API ([`store::ImageStore`]): open it, add blobs (streamed, digest-checked, renamed
//! into place), add a manifest under a reference, resolve a reference to its manifest and config,
//! and get the unpacked layer dirs of an image (topmost first, the overlay `lowerdir` order).
//! Images arrive by [`pull::pull`] from a registry or by the importers of [`import`].

pub mod commit;
pub mod error;
pub mod export;
pub mod import;
pub mod pull;
pub mod push;
pub mod store;
pub mod unpack;

pub use error::{ImageError, Result};
pub use import::Imported;
pub use store::{Image, ImageStore};

/// What a long operation is doing, for progress bars (CLI) and job status (API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Downloading blobs from a registry.
    Pull,
    /// Copying blobs from a layout or archive into the store.
    Import,
    /// Unpacking a layer into its directory.
    Unpack,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ProgressEvent {
    pub phase: Phase,
    /// What is being worked on (`layer 2/5 3f2a...`).
    pub item: String,
    /// Bytes done of `total` (0 when unknown).
    pub done: u64,
    pub total: u64,
}

/// A progress callback; called often, so it must be cheap.
pub type Progress = dyn Fn(ProgressEvent) + Send + Sync;

/// A progress callback that ignores everything.
pub fn no_progress() -> std::sync::Arc<Progress> {
    std::sync::Arc::new(|_| {})
}
