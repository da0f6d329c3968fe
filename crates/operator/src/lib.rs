//! Warren's Kubernetes operator: the talk's custom resources (see [`crd`]) reconciled on a
//! cluster with kube-rs's controller runtime. The design is `docs/design/kubernetes.md`.
//!
//! Each reconciler is split in two: a pure part that decides from the object and what was observed
//! (unit-tested without HTTP), and a thin part that talks to the API server (tested against a mock
//! API server in `tests`).

pub mod agent;
pub mod autoscaler;
pub mod checkpoint;
pub mod claim;
pub mod cluster_api;
pub mod cluster_network;
pub mod commit;
pub mod conditions;
pub mod controller;
pub mod crd;
pub mod disk;
pub mod error;
pub mod fork;
pub mod jobs;
pub mod jobstatus;
pub mod leader;
pub mod node_images;
pub mod nodeloss;
pub mod podfinalizer;
pub mod registry_auth;
pub mod sandbox;
pub mod sandbox_agent;
pub mod sandbox_network;
pub mod sandboxset;

#[cfg(test)]
mod mock;
#[cfg(test)]
mod mock_agent;
#[cfg(test)]
mod mock_autoscaler;
#[cfg(test)]
mod mock_cluster_api;
#[cfg(test)]
mod mock_cluster_forks;
#[cfg(test)]
mod mock_cluster_jobs;
#[cfg(test)]
mod mock_cluster_snapshots;
#[cfg(test)]
mod mock_fork;
#[cfg(test)]
mod mock_network;
#[cfg(test)]
mod mock_nodeloss;
#[cfg(test)]
mod mock_podfinalizer;

pub use error::Error;

/// Field manager of everything the operator writes with server-side apply.
pub const FIELD_MANAGER: &str = "warren-operator";

/// Label on a Sandbox created by a SandboxSet: the set's name.
pub const LABEL_SANDBOX_SET: &str = "warren.dev/sandboxset";
/// Label on a claimed Sandbox (`"true"`); unclaimed members lack it.
pub const LABEL_CLAIMED: &str = "warren.dev/claimed";
/// Label on a SandboxSet member: the hash of the member template it was made from.
pub const LABEL_TEMPLATE_HASH: &str = "warren.dev/template-hash";
/// Label on a sandbox's Pod: the Sandbox's name.
pub const LABEL_SANDBOX: &str = "warren.dev/sandbox";
