//! Warren's sandbox runtime: everything that touches the Linux kernel to make, pause and remove a
//! sandbox (namespaces, overlayfs, cgroups, veth + nftables networking). It holds no HTTP code.
//!
//! The control plane talks to it only through the [`SandboxRuntime`] trait, so the orchestrator can be
//! unit-tested without root against [`fake::FakeRuntime`]; the real implementation is
//! [`linux::LinuxRuntime`], exercised by the real-kernel test tier.
//!
//! The crate also holds the *inside* half of sandbox creation ([`init`]): the code that `warren-envd`
//! runs as the first process of a new sandbox to mount its root filesystem, configure its network
//! interface and drop privileges before it starts serving.

pub mod egress;
pub mod error;
pub mod fake;
pub mod init;
#[cfg(target_os = "linux")]
pub mod linux;
pub mod seccomp;
pub mod spec;

pub use egress::{Cidr, EgressRules};
pub use error::RuntimeError;
pub use spec::{
    BindMount, CheckpointInfo, CheckpointOptions, CheckpointStats, EnvdSettings, IdRange,
    NetworkPolicy, Placement, Resources, RootfsSpec, SandboxSpec, SandboxStats, ENVD_PORT,
};

use async_trait::async_trait;
use std::collections::HashSet;

/// What the control plane needs from a runtime. Every method is idempotent where the docs say so,
/// because the orchestrator retries cleanups after a crash.
#[async_trait]
pub trait SandboxRuntime: Send + Sync + 'static {
    /// Creates and starts a sandbox. Returns once envd inside it listens on [`ENVD_PORT`], so the
    /// first request of a client succeeds. On error nothing of the sandbox is left behind.
    async fn create(&self, spec: &SandboxSpec) -> Result<Placement, RuntimeError>;

    /// Freezes every process of the sandbox (no CPU; memory kept).
    async fn freeze(&self, id: &str) -> Result<(), RuntimeError>;

    /// Thaws a frozen sandbox.
    async fn thaw(&self, id: &str) -> Result<(), RuntimeError>;

    /// Kills every process and removes every kernel object and directory of the sandbox.
    /// Idempotent: removing what is already gone succeeds.
    async fn destroy(&self, id: &str) -> Result<(), RuntimeError>;

    /// After a daemon restart: re-attaches to a sandbox recorded as alive. Returns `Ok(true)` when
    /// its init still runs (and the runtime tracks it again), `Ok(false)` when it is gone.
    async fn adopt(&self, id: &str, placement: &Placement) -> Result<bool, RuntimeError>;

    /// Removes every sandbox artefact (cgroups, veths, upper dirs, address leases) whose id is not
    /// in `keep`. Returns the ids it cleaned.
    async fn sweep(&self, keep: &HashSet<String>) -> Result<Vec<String>, RuntimeError>;

    /// Whether the sandbox's init process is still alive (false once it has exited).
    fn is_alive(&self, id: &str) -> bool;

    /// Replaces the egress policy of a live (running or frozen) sandbox: `allow_internet` and
    /// the allow/deny rules, atomically. `allow_public_traffic` is not the runtime's business.
    async fn set_network(&self, id: &str, policy: &NetworkPolicy) -> Result<(), RuntimeError>;

    /// Current cumulative resource usage of a live sandbox (for metrics).
    async fn stats(&self, id: &str) -> Result<SandboxStats, RuntimeError>;

    /// Whether this host can hibernate sandboxes (CRIU works here); the reason when not.
    fn hibernate_support(&self) -> Result<(), String>;

    /// Dumps the live (running or frozen) sandbox's process tree to disk and ends its processes:
    /// its memory is freed, while its filesystem, network namespace, address and firewall state
    /// stay. On error the sandbox is left as it was.
    async fn hibernate(&self, id: &str) -> Result<CheckpointStats, RuntimeError>;

    /// Restores a hibernated sandbox: the same process tree, in the same cgroups, root
    /// filesystem and network namespace, carries on where it stopped. Returns its new placement
    /// (a new init pid; the same address and veth). On error it stays hibernated.
    async fn wake(&self, id: &str) -> Result<Placement, RuntimeError>;

    /// Drops the images a live sandbox was restored from, and their network namespace pin: the
    /// control plane calls it once it has recorded the wake, and after a restart for every tree
    /// it adopted live. Until then a crash leaves them, so that recovery still finds a sandbox
    /// recorded as waking hibernated and complete. Idempotent; a no-op without such images.
    async fn release_wake_images(&self, _id: &str) {}

    /// After a daemon restart: re-attaches to a sandbox recorded as hibernated. `Ok(false)` when
    /// its image or network namespace is gone (it cannot wake any more).
    async fn adopt_hibernated(&self, id: &str, placement: &Placement)
        -> Result<bool, RuntimeError>;
    /// The host path of the sandbox's overlay upper dir (its changes against the template), for
    /// commits. `None` when this runtime has no such dir.
    fn upper_dir(&self, _id: &str) -> Option<std::path::PathBuf> {
        None
    }

    /// Saves the live sandbox as checkpoint `name`: a copy of its upper dir and, with
    /// `opts.memory`, a CRIU dump of its process tree, both taken while the sandbox is frozen so
    /// that they agree. With `opts.keep_running` the sandbox carries on (a paused one stays
    /// paused); otherwise its processes end. On error no checkpoint is left and a kept sandbox
    /// runs as before.
    async fn checkpoint(
        &self,
        id: &str,
        _name: &str,
        _opts: &CheckpointOptions,
    ) -> Result<CheckpointInfo, RuntimeError> {
        Err(RuntimeError::CheckpointUnavailable(format!(
            "this runtime cannot checkpoint sandbox {id}"
        )))
    }

    /// The read-only layer holding a checkpoint's files (its upper-dir copy): put on top of the
    /// source's lower dirs, it gives a sandbox the checkpointed filesystem copy-on-write.
    fn checkpoint_layer(&self, _name: &str) -> Option<std::path::PathBuf> {
        None
    }

    /// Creates sandbox `spec.id` by restoring checkpoint `name`'s process tree into a new
    /// cgroup, network namespace (a new address) and overlay root (`spec.rootfs`, which must
    /// show the checkpoint's files). The restored envd still holds the source's token and
    /// env vars: the caller re-keys it. On error nothing of the sandbox is left behind.
    async fn restore_checkpoint(
        &self,
        name: &str,
        spec: &SandboxSpec,
    ) -> Result<Placement, RuntimeError> {
        let _ = spec;
        Err(RuntimeError::CheckpointUnavailable(format!(
            "this runtime cannot restore checkpoint {name}"
        )))
    }

    /// Removes a checkpoint's files. Idempotent.
    async fn delete_checkpoint(&self, _name: &str) -> Result<(), RuntimeError> {
        Ok(())
    }
}
