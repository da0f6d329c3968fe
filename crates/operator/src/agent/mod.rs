//! The node agent interface: what the operator asks of the Warren node agent on a sandbox's node
//! (create the sandbox in its Pod's cgroup and network namespace, pause, resume, hibernate, wake,
//! checkpoint, commit, delete). The Sandbox, Checkpoint and Commit reconcilers call it through
//! [`NodeAgent`]; [`http::HttpNodeAgent`] is the client that talks to the agent on a node,
//! [`server`] is the agent's HTTP edge, and [`local::LocalAgent`] does the work on the node with
//! the single-host runtime (`warren-runtime`).
//!
//! Every operation is idempotent where a reconciler may repeat it after a crash: create of an id
//! that runs returns it, delete of a gone sandbox succeeds, a checkpoint or commit names its own
//! id (the custom resource's uid) so a repeat returns the first result.

#[cfg(test)]
pub mod fake;
pub mod http;
#[cfg(target_os = "linux")]
pub mod images;
#[cfg(target_os = "linux")]
pub mod local;
#[cfg(target_os = "linux")]
mod local_fork;
pub mod network;
pub mod server;
pub mod tls;

pub use network::{EgressSpec, NetworkUpdateRequest};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The agent's port on each node (the DaemonSet's `hostPort`).
pub const DEFAULT_PORT: u16 = 7070;

/// The sandbox's Pod, which carries it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The Pod's IP (the sandbox's address: it lives in the Pod's network namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
}

/// Makes a sandbox on the node, inside its Pod.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateRequest {
    /// The sandbox's id on the node: `[a-z0-9]{1,64}` (the Sandbox's uid without dashes).
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default)]
    pub vcpus: u32,
    #[serde(default)]
    pub memory_mb: u64,
    /// The sandbox's disk cap in MiB (its Pod's ephemeral-storage); 0: the agent's
    /// `--sandbox-disk-mb`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub disk_mb: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env_vars: BTreeMap<String, String>,
    pub pod: PodRef,
    /// The Pod's network namespace (e.g. `/proc/<pause pid>/ns/net`); unset: the agent finds it
    /// from the Pod's uid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// The Pod's cgroup, relative to the cgroup root of each hierarchy (e.g.
    /// `kubepods/burstable/pod<uid>`); the sandbox gets a child of it. Unset: found from the uid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_parent: Option<String>,
    /// The token envd requires (`X-Access-Token`), from [`envd_access_token`]; unset: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    /// The token of envd's `POST /init` (`X-Admin-Token`), from [`envd_admin_token`]: the API
    /// gives a claimed pool member its client's env vars with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<String>,
    /// The egress policy, applied in the Pod's network namespace before the sandbox starts.
    #[serde(default, skip_serializing_if = "EgressSpec::is_default")]
    pub network: EgressSpec,
    /// A fork: the id on this node of the checkpoint (its images and files) to restore the
    /// sandbox from, instead of booting the template. A checkpoint the node does not hold
    /// answers NotFound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_from: Option<String>,
    /// Credentials for pulling `image`, which the operator read from the Sandbox's
    /// `imagePullSecrets` (the agent reads no Secrets); unset: an anonymous pull. Redacted in
    /// `Debug`, never logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_credentials: Option<crate::registry_auth::RegistryCredentials>,
    /// When to ask the registry for `image`; unset: `IfNotPresent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<crate::crd::ImagePullPolicy>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What a sandbox on the node looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SandboxState {
    Running,
    Paused,
    Hibernated,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxInfo {
    pub id: String,
    pub state: SandboxState,
    /// Host pid of the sandbox's init (envd).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_pid: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointRequest {
    /// Names the images on the node (the Checkpoint's uid): a repeat returns the first result.
    pub checkpoint_id: String,
    pub keep_running: bool,
    /// `memory`, `filesystem` (default both).
    #[serde(default)]
    pub contents: Vec<crate::crd::CheckpointContent>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointInfo {
    pub checkpoint_id: String,
    pub size_bytes: u64,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommitRequest {
    /// Names the commit (the Commit's uid): a repeat returns the first result.
    pub commit_id: String,
    /// `[registry/]repository[:tag]`.
    pub image: String,
    pub push: bool,
    /// `kubernetes.io/dockerconfigjson` Secrets in the sandbox's namespace, for the push.
    #[serde(default)]
    pub registry_secrets: Vec<String>,
    /// The push's credentials, which the operator read from those Secrets (the agent reads
    /// none). Never logged: their `Debug` is redacted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_credentials: Option<crate::registry_auth::RegistryCredentials>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommitInfo {
    /// Manifest digest, `sha256:…`.
    pub digest: String,
    pub size_bytes: u64,
    pub duration_ms: u64,
}

/// The agent's answer to a failed call, as it travels on the wire: `{"code":N,"message":"..."}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: u16,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AgentError {
    /// The agent on `node` could not be reached (no address, connection refused, timeout).
    #[error("node agent on {node} is unreachable: {message}")]
    Unreachable { node: String, message: String },
    /// No such sandbox or checkpoint on the node.
    #[error("node agent on {node}: {message}")]
    NotFound { node: String, message: String },
    /// The agent refused or failed the operation; `code` is its HTTP status.
    #[error("node agent on {node} answered {code}: {message}")]
    Failed {
        node: String,
        code: u16,
        message: String,
    },
}

/// The agent's status code for a create whose image could not be pulled (bad reference,
/// unreachable registry, no such image, refused credentials): 424 Failed Dependency. The operator
/// reports it as `ImagePullFailed`.
pub const IMAGE_PULL_FAILED: u16 = 424;

impl AgentError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, AgentError::NotFound { .. })
    }

    /// The sandbox's image could not be pulled (see [`IMAGE_PULL_FAILED`]).
    pub fn is_image_pull_failure(&self) -> bool {
        matches!(
            self,
            AgentError::Failed {
                code: IMAGE_PULL_FAILED,
                ..
            }
        )
    }
}

/// What the operator asks of the node agent on `node`.
#[async_trait]
pub trait NodeAgent: Send + Sync + 'static {
    /// Creates and starts the sandbox in its Pod; returns once envd serves. Idempotent: a
    /// running sandbox of that id is returned as it is.
    async fn create(&self, node: &str, req: &CreateRequest) -> Result<SandboxInfo, AgentError>;
    /// Freezes the sandbox's processes (memory, address and connections kept).
    async fn pause(&self, node: &str, id: &str) -> Result<(), AgentError>;
    async fn resume(&self, node: &str, id: &str) -> Result<(), AgentError>;
    /// Dumps the sandbox's memory to the node's disk and frees it (CRIU).
    async fn hibernate(&self, node: &str, id: &str) -> Result<CheckpointInfo, AgentError>;
    async fn wake(&self, node: &str, id: &str) -> Result<(), AgentError>;
    async fn checkpoint(
        &self,
        node: &str,
        id: &str,
        req: &CheckpointRequest,
    ) -> Result<CheckpointInfo, AgentError>;
    /// Removes a checkpoint's images. Idempotent.
    async fn delete_checkpoint(&self, node: &str, checkpoint_id: &str) -> Result<(), AgentError>;
    async fn commit(
        &self,
        node: &str,
        id: &str,
        req: &CommitRequest,
    ) -> Result<CommitInfo, AgentError>;
    /// Stops the sandbox and removes its node state. Idempotent.
    async fn delete(&self, node: &str, id: &str) -> Result<(), AgentError>;
    /// The sandbox's cumulative usage (CPU time, memory, disk), read from its cgroup and
    /// directory with the single-host runtime's code (E2B's `GET /sandboxes/{id}/metrics`).
    async fn metrics(
        &self,
        node: &str,
        id: &str,
    ) -> Result<warren_runtime::SandboxStats, AgentError>;
    /// Replaces the sandbox's egress policy, live (running, paused or hibernated).
    async fn update_network(
        &self,
        node: &str,
        id: &str,
        req: &NetworkUpdateRequest,
    ) -> Result<(), AgentError> {
        let _ = (id, req);
        Err(AgentError::Failed {
            node: node.into(),
            code: 501,
            message: "this node agent cannot update a sandbox's network policy".into(),
        })
    }
}

/// The envd access token of the Sandbox with `uid`: derived from a key that only the operator
/// and the API replicas hold (a Secret), so it is stored nowhere, not even in the Sandbox that
/// anyone allowed to read Sandboxes could see, and the API can hand it to the one client that
/// creates or claims the sandbox. 64 hex characters.
pub fn envd_access_token(key: &str, uid: &str) -> String {
    derive("warren-envd-token-v1", key, uid)
}

/// The envd admin token (for `POST /init`) of the Sandbox with `uid`, derived like
/// [`envd_access_token`] but never the same.
pub fn envd_admin_token(key: &str, uid: &str) -> String {
    derive("warren-envd-admin-v1", key, uid)
}

fn derive(purpose: &str, key: &str, uid: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    // Length-prefixed parts: no two (key, uid) pairs hash the same input.
    for part in [purpose, key, uid] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The sandbox's id on its node, from the Sandbox's uid: valid for the runtime (`[a-z0-9]`),
/// unique, and never reused by a Sandbox of the same name created later.
pub fn node_id(uid: &str) -> String {
    uid.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect()
}
