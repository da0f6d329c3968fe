//! What the real-kernel test binaries of the runtime share: the root check, the test init, a
//! runtime over a data dir of the test's own, and running shell commands inside a sandbox.
//! Each test binary uses a part of it.
#![allow(dead_code)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use warren_runtime::linux::{prepare_base_template, LinuxRuntime, LinuxRuntimeConfig};
use warren_runtime::{
    EnvdSettings, NetworkPolicy, Resources, RootfsSpec, SandboxRuntime, SandboxSpec,
};

/// Fails the test, saying what needs root, unless it runs as root (CI does).
pub fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "{what} need root");
}

/// The minimal init example, which `cargo test` builds beside the test binaries.
pub fn init_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target = exe.parent().unwrap().parent().unwrap();
    let bin = target.join("examples").join("minimal_init");
    assert!(
        bin.is_file(),
        "{} missing: cargo test builds examples",
        bin.display()
    );
    bin
}

/// A sandbox of the base template with default resources, run as `user`.
pub fn sandbox_spec(rootfs: &RootfsSpec, id: &str) -> SandboxSpec {
    SandboxSpec {
        id: id.to_string(),
        rootfs: rootfs.clone(),
        resources: Resources::default(),
        network: NetworkPolicy::default(),
        envd: EnvdSettings {
            default_user: "user".into(),
            ..Default::default()
        },
    }
}

/// A runtime over a data dir of the test's own, with the base template prepared.
pub struct Harness {
    pub rt: LinuxRuntime,
    pub data: PathBuf,
    pub rootfs: RootfsSpec,
}

impl Harness {
    /// Starts a runtime over a fresh `data` dir, configured by `configure`, after sweeping what an
    /// aborted earlier run left under it (processes, frozen cgroups, mounts).
    pub async fn start(data: PathBuf, configure: impl FnOnce(&mut LinuxRuntimeConfig)) -> Harness {
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data).unwrap();
        let mut config = LinuxRuntimeConfig::derived(data.clone(), init_binary());
        configure(&mut config);
        let rt = LinuxRuntime::new(config).await.expect("runtime starts");
        rt.sweep(&HashSet::new()).await.expect("sweep leftovers");
        let rootfs = prepare_base_template(&data).expect("base template");
        Harness { rt, data, rootfs }
    }

    /// A second runtime over the same data dir, as after a daemon restart.
    pub async fn restarted(data: &Path) -> LinuxRuntime {
        let config = LinuxRuntimeConfig::derived(data.to_path_buf(), init_binary());
        LinuxRuntime::new(config).await.expect("runtime starts")
    }

    pub fn spec(&self, id: &str) -> SandboxSpec {
        sandbox_spec(&self.rootfs, id)
    }

    pub async fn finish(self) {
        self.rt.sweep(&HashSet::new()).await.unwrap();
        self.rt.teardown_host().await.unwrap();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// Runs a shell command in every namespace of the sandbox whose init is `pid` (its user
/// namespace too, so as the sandbox's root), in its root directory.
pub fn run_in_sandbox(pid: u32, cmd: &str) -> Output {
    Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-a", "/bin/sh", "-c", cmd])
        .output()
        .expect("nsenter runs")
}

/// [`run_in_sandbox`], answering whether it succeeded and its stdout followed by its stderr.
pub fn in_sandbox(pid: u32, cmd: &str) -> (bool, String) {
    let out = run_in_sandbox(pid, cmd);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}
