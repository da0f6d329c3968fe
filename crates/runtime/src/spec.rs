//! Plain data exchanged between the control plane and the runtime, and between the runtime and the
//! sandbox's init.

use crate::egress::EgressRules;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

/// The port envd serves on inside every sandbox (the E2B convention).
pub const ENVD_PORT: u16 = 49983;

/// Everything the runtime needs to make one sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SandboxSpec {
    /// Sandbox id: `[a-z0-9]+`, also the hostname inside.
    pub id: String,
    pub rootfs: RootfsSpec,
    pub resources: Resources,
    pub network: NetworkPolicy,
    pub envd: EnvdSettings,
}

/// How the sandbox's root filesystem is assembled: an overlay of read-only template layers under a
/// fresh per-sandbox upper dir, plus read-only bind mounts of host directories (the `base` template
/// shows the host's `/usr` this way).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RootfsSpec {
    /// Read-only lower layers, topmost first.
    pub lower_dirs: Vec<PathBuf>,
    /// Read-only bind mounts applied on top of the overlay.
    pub ro_binds: Vec<BindMount>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BindMount {
    /// Path on the host.
    pub source: PathBuf,
    /// Absolute path inside the sandbox.
    pub target: PathBuf,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Resources {
    /// CPU quota in whole vCPUs (CFS quota = vcpus × period).
    pub vcpus: u32,
    pub memory_mb: u64,
    pub pids_max: u64,
    /// Size of the sandbox's own file system for its overlay upper dir, in MiB: writing past it
    /// fails with `ENOSPC`. 0 means no cap (the upper dir sits on the host's file system);
    /// records from before caps existed read as 0.
    #[serde(default)]
    pub disk_mb: u64,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            vcpus: 2,
            memory_mb: 512,
            pids_max: 1024,
            disk_mb: 1024,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NetworkPolicy {
    /// NAT egress to anything outside the sandbox subnet. Traffic between sandboxes is always dropped.
    pub allow_internet: bool,
    /// Per-destination exceptions on top of `allow_internet` (see [`crate::egress`]).
    #[serde(default)]
    pub egress: EgressRules,
    /// Whether the router forwards traffic to the sandbox's ports (other than envd's) without
    /// the sandbox's traffic access token. Enforced by the router, not the kernel; kept here so
    /// it lives and survives restarts with the rest of the network settings.
    #[serde(default = "yes")]
    pub allow_public_traffic: bool,
}

fn yes() -> bool {
    true
}

impl Default for NetworkPolicy {
    fn default() -> Self {
        NetworkPolicy {
            allow_internet: true,
            egress: EgressRules::default(),
            allow_public_traffic: true,
        }
    }
}

/// Cumulative resource usage of a sandbox at one instant, read from its cgroup and upper dir.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SandboxStats {
    /// CPU time used by every process of the sandbox since it started, in nanoseconds.
    pub cpu_usage_ns: u64,
    /// Memory charged to the sandbox (including page cache), in bytes.
    pub memory_bytes: u64,
    /// The page-cache part of `memory_bytes`.
    pub memory_cache_bytes: u64,
    /// Bytes the sandbox wrote to its root filesystem (its overlay upper dir).
    pub disk_bytes: u64,
    /// Size of the sandbox's disk (its cap), when it has one; 0 when uncapped.
    #[serde(default)]
    pub disk_total_bytes: u64,
}

/// Settings handed to envd when the sandbox starts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct EnvdSettings {
    /// When set, every envd request but `/health` and signed `/files` must carry it as `X-Access-Token`.
    pub access_token: Option<String>,
    /// Sandbox-wide environment variables, given to every process started in the sandbox.
    pub env_vars: BTreeMap<String, String>,
    /// The user processes run as when a request names none (`user`).
    pub default_user: String,
    /// The daemon's secret for envd's `POST /init`, which replaces the access token and env vars
    /// when a warm-pool member is claimed. `None` disables `/init`.
    #[serde(default)]
    pub admin_token: Option<String>,
    /// The template's start command (`/bin/sh -c`), which envd starts as root once it serves,
    /// like the start command of an E2B template: the server a template exists for (the code
    /// interpreter of `code-interpreter-v1`). `None` starts nothing.
    #[serde(default)]
    pub start_command: Option<String>,
    /// The cwd of processes whose request names none (an image template's `WorkingDir`);
    /// `None` is the user's home.
    #[serde(default)]
    pub default_cwd: Option<String>,
}

/// Where a running sandbox lives, as the runtime placed it. Stored by the control plane so that a
/// restarted daemon can find and re-adopt (or clean up) the sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Placement {
    /// Host pid of the sandbox's init (envd).
    pub init_pid: u32,
    /// Start time of that pid in clock ticks since boot (field 22 of /proc/PID/stat), so a reused
    /// pid is never mistaken for the sandbox.
    pub init_start_ticks: u64,
    /// The sandbox's address on the host bridge.
    pub ip: Ipv4Addr,
    /// Host-side veth name.
    pub veth: String,
}

impl Placement {
    pub fn envd_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from((self.ip, ENVD_PORT))
    }
}

/// What a CRIU dump produced.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CheckpointStats {
    /// Size of the images on disk.
    pub bytes: u64,
    /// Wall time of the dump (including freezing the tree and writing the images).
    pub duration: std::time::Duration,
}

/// What a checkpoint keeps of a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointOptions {
    /// Dump the process tree with CRIU; without it only the filesystem is kept.
    pub memory: bool,
    /// The sandbox's processes carry on after the checkpoint; without it they end.
    pub keep_running: bool,
}

/// What a checkpoint took.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    /// CRIU images on disk (0 for a filesystem-only checkpoint).
    pub image_bytes: u64,
    /// The copy of the sandbox's upper dir on disk.
    pub fs_bytes: u64,
    /// From the freeze to the end of the dump and copy.
    pub duration: std::time::Duration,
    /// How long the sandbox's processes were stopped.
    pub frozen: std::time::Duration,
}
