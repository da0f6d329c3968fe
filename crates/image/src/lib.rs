//! Warren's image layer: OCI images in, OCI images out, with no container engine involved.
//!
//! This crate holds no HTTP server and no sandbox logic. It owns the on-disk image store (an OCI
//! image layout of blobs plus one unpacked directory per layer, stacked by the runtime as overlay
//! lower dirs) and the conversion of a sandbox's overlay upper dir into an OCI layer.

pub mod commit;
pub mod export;
pub mod oci_layout;
pub mod push;
