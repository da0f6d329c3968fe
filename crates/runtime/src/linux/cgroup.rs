//! Per-sandbox cgroups on both layouts Warren meets:
//!
//! * **hybrid** (this project's machines): resource controllers (cpu, cpuacct, memory, pids,
//!   freezer, devices) are cgroup v1 hierarchies under `/sys/fs/cgroup/<controller>`, and a
//!   controller-less cgroup2 is mounted at `/sys/fs/cgroup/unified`;
//! * **unified** (pure v2): one hierarchy at `/sys/fs/cgroup` with `cpu`, `memory` and `pids`
//!   enabled in the parent's `cgroup.subtree_control`.
//!
//! In both, the cgroup2 directory provides `cgroup.freeze`, `cgroup.kill` and `cgroup.events`,
//! which freeze, kill and watch the whole process tree atomically. Limits go to v1 files in hybrid
//! mode and to v2 files in unified mode.

use crate::{Resources, RuntimeError};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const V1_CONTROLLERS: &[&str] = &["cpu", "cpuacct", "memory", "pids", "freezer", "devices"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Hybrid,
    Unified,
}

#[derive(Debug, Clone)]
pub struct CgroupManager {
    layout: Layout,
    /// Name of the directory that holds this daemon's sandboxes in every hierarchy.
    parent: String,
    /// The cgroup2 mount (unified dir in hybrid mode).
    v2_root: PathBuf,
    /// The v1 controllers actually mounted (hybrid mode only).
    v1: Vec<&'static str>,
}

fn write(path: &Path, value: &str) -> Result<(), RuntimeError> {
    std::fs::write(path, value).map_err(|e| RuntimeError::io("write cgroup file", path, e))
}

impl CgroupManager {
    /// Detects the layout and creates this daemon's parent cgroups.
    pub fn new(parent: &str) -> Result<Self, RuntimeError> {
        let root = Path::new(CGROUP_ROOT);
        let layout = if root.join("cgroup.controllers").exists() {
            Layout::Unified
        } else if root.join("unified/cgroup.procs").exists() {
            Layout::Hybrid
        } else {
            return Err(RuntimeError::Config(format!(
                "no cgroup2 hierarchy found at {CGROUP_ROOT} or {CGROUP_ROOT}/unified: Warren needs \
                 cgroup2 for freezing and killing sandboxes"
            )));
        };
        let v2_root = match layout {
            Layout::Unified => root.to_path_buf(),
            Layout::Hybrid => root.join("unified"),
        };
        let v1 = match layout {
            Layout::Unified => vec![],
            Layout::Hybrid => V1_CONTROLLERS
                .iter()
                .copied()
                .filter(|c| root.join(c).join("cgroup.procs").exists())
                .collect(),
        };
        if layout == Layout::Hybrid {
            for needed in ["memory", "pids", "cpu"] {
                if !v1.contains(&needed) {
                    return Err(RuntimeError::Config(format!(
                        "hybrid cgroup layout without the v1 {needed} controller at {CGROUP_ROOT}/{needed}"
                    )));
                }
            }
        }
        favor_dynamic_modifications(&v2_root);
        let mgr = CgroupManager {
            layout,
            parent: parent.to_string(),
            v2_root,
            v1,
        };
        mgr.create_parents()?;
        Ok(mgr)
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    fn create_parents(&self) -> Result<(), RuntimeError> {
        let v2 = self.v2_root.join(&self.parent);
        std::fs::create_dir_all(&v2).map_err(|e| RuntimeError::io("mkdir cgroup", &v2, e))?;
        match self.layout {
            Layout::Unified => {
                // Controllers must be enabled from the root down to our parent, at every level
                // (a Pod's parent is several levels deep, e.g. `kubepods/burstable/pod<uid>`).
                let enable = "+cpu +memory +pids";
                let _ = std::fs::write(self.v2_root.join("cgroup.subtree_control"), enable);
                let mut dir = self.v2_root.clone();
                let comps: Vec<&str> = self.parent.split('/').filter(|c| !c.is_empty()).collect();
                for (i, c) in comps.iter().enumerate() {
                    dir.push(c);
                    let control = dir.join("cgroup.subtree_control");
                    if i + 1 == comps.len() {
                        write(&control, enable)?;
                    } else {
                        // Already enabled above a Pod's cgroup by kubelet; best effort for ours.
                        let _ = std::fs::write(&control, enable);
                    }
                }
            }
            Layout::Hybrid => {
                for c in &self.v1 {
                    let dir = Path::new(CGROUP_ROOT).join(c).join(&self.parent);
                    std::fs::create_dir_all(&dir)
                        .map_err(|e| RuntimeError::io("mkdir cgroup", &dir, e))?;
                }
            }
        }
        Ok(())
    }

    /// The cgroup2 directory of a sandbox (freeze, kill, events).
    pub fn v2_dir(&self, id: &str) -> PathBuf {
        self.v2_root.join(&self.parent).join(id)
    }

    fn v1_dir(&self, controller: &str, id: &str) -> PathBuf {
        Path::new(CGROUP_ROOT)
            .join(controller)
            .join(&self.parent)
            .join(id)
    }

    /// Every directory of the sandbox, v2 last... reversed for removal order irrelevance.
    pub fn dirs(&self, id: &str) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = self.v1.iter().map(|c| self.v1_dir(c, id)).collect();
        dirs.push(self.v2_dir(id));
        dirs
    }

    /// Creates the sandbox's cgroups with its limits. Returns the `cgroup.procs` files a new
    /// process must write itself into.
    pub fn create(&self, id: &str, res: &Resources) -> Result<Vec<PathBuf>, RuntimeError> {
        for dir in self.dirs(id) {
            std::fs::create_dir(&dir)
                .or_else(|e| {
                    if e.kind() == std::io::ErrorKind::AlreadyExists {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(|e| RuntimeError::io("mkdir cgroup", &dir, e))?;
        }
        let period: u64 = 100_000;
        let quota = period * res.vcpus.max(1) as u64;
        let mem = res.memory_mb * 1024 * 1024;
        match self.layout {
            Layout::Unified => {
                let d = self.v2_dir(id);
                write(&d.join("cpu.max"), &format!("{quota} {period}"))?;
                write(&d.join("memory.max"), &mem.to_string())?;
                let _ = std::fs::write(d.join("memory.swap.max"), "0");
                write(&d.join("pids.max"), &res.pids_max.to_string())?;
            }
            Layout::Hybrid => {
                let cpu = self.v1_dir("cpu", id);
                write(&cpu.join("cpu.cfs_period_us"), &period.to_string())?;
                write(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
                let memory = self.v1_dir("memory", id);
                write(&memory.join("memory.limit_in_bytes"), &mem.to_string())?;
                // Without swap accounting this file is absent; with it, no swap beyond the limit.
                let _ = std::fs::write(memory.join("memory.memsw.limit_in_bytes"), mem.to_string());
                write(
                    &self.v1_dir("pids", id).join("pids.max"),
                    &res.pids_max.to_string(),
                )?;
                if self.v1.contains(&"devices") {
                    self.restrict_devices(id)?;
                }
            }
        }
        Ok(self
            .dirs(id)
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect())
    }

    /// Only the pseudo-devices of the sandbox's /dev and its pseudo-terminals are usable.
    fn restrict_devices(&self, id: &str) -> Result<(), RuntimeError> {
        let d = self.v1_dir("devices", id);
        write(&d.join("devices.deny"), "a")?;
        for rule in [
            "c 1:3 rwm",   // null
            "c 1:5 rwm",   // zero
            "c 1:7 rwm",   // full
            "c 1:8 rwm",   // random
            "c 1:9 rwm",   // urandom
            "c 5:0 rwm",   // tty
            "c 5:2 rwm",   // ptmx
            "c 136:* rwm", // pts
        ] {
            write(&d.join("devices.allow"), rule)?;
        }
        Ok(())
    }

    /// Freezes the sandbox and waits until the kernel reports every task frozen.
    pub fn freeze(&self, id: &str) -> Result<(), RuntimeError> {
        self.set_frozen(id, true)
    }

    pub fn thaw(&self, id: &str) -> Result<(), RuntimeError> {
        self.set_frozen(id, false)
    }

    fn set_frozen(&self, id: &str, frozen: bool) -> Result<(), RuntimeError> {
        let dir = self.v2_dir(id);
        if !dir.exists() {
            return Err(RuntimeError::UnknownSandbox(id.to_string()));
        }
        write(&dir.join("cgroup.freeze"), if frozen { "1" } else { "0" })?;
        let want = if frozen { "frozen 1" } else { "frozen 0" };
        self.wait_event(id, want, Duration::from_secs(10))
            .map_err(|_| RuntimeError::Sys {
                op: if frozen { "freeze" } else { "thaw" },
                id: id.to_string(),
                source: std::io::Error::from(std::io::ErrorKind::TimedOut),
            })
    }

    /// Polls `cgroup.events` until it contains `line`. Freezing a few sleeping tasks takes 1–3 ms.
    fn wait_event(&self, id: &str, line: &str, timeout: Duration) -> Result<(), ()> {
        let events = self.v2_dir(id).join("cgroup.events");
        let start = Instant::now();
        let mut pause = Duration::from_micros(50);
        loop {
            match std::fs::read_to_string(&events) {
                Ok(s) if s.lines().any(|l| l == line) => return Ok(()),
                Ok(_) => {}
                Err(_) => return Err(()),
            }
            if start.elapsed() > timeout {
                return Err(());
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }

    /// Whether any process is left in the sandbox's cgroup.
    pub fn populated(&self, id: &str) -> bool {
        std::fs::read_to_string(self.v2_dir(id).join("cgroup.events"))
            .map(|s| s.lines().any(|l| l == "populated 1"))
            .unwrap_or(false)
    }

    /// Kills every process of the sandbox (frozen ones too) and waits until none is left.
    pub fn kill_all(&self, id: &str) -> Result<(), RuntimeError> {
        let dir = self.v2_dir(id);
        if !dir.exists() {
            return Ok(());
        }
        let kill = dir.join("cgroup.kill");
        if kill.exists() {
            write(&kill, "1")?;
        } else {
            // Kernels before 5.14: signal each task, then thaw so the signal is delivered.
            if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    // SAFETY: kill with a pid and signal number only.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = std::fs::write(dir.join("cgroup.freeze"), "0");
        self.wait_event(id, "populated 0", Duration::from_secs(10))
            .map_err(|_| RuntimeError::Sys {
                op: "kill all processes",
                id: id.to_string(),
                source: std::io::Error::from(std::io::ErrorKind::TimedOut),
            })
    }

    /// Removes the sandbox's cgroup directories (after [`Self::kill_all`]). Idempotent.
    pub fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        for dir in self.dirs(id) {
            // A just-emptied cgroup can answer EBUSY for a moment.
            let mut tries = 0;
            loop {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 100 => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => return Err(RuntimeError::io("rmdir cgroup", &dir, e)),
                }
            }
        }
        Ok(())
    }

    /// Removes this daemon's (empty) parent cgroups. Idempotent.
    pub fn remove_parents(&self) {
        let _ = std::fs::remove_dir(self.v2_root.join(&self.parent));
        for c in &self.v1 {
            let _ = std::fs::remove_dir(Path::new(CGROUP_ROOT).join(c).join(&self.parent));
        }
    }

    /// Ids of every sandbox cgroup of this daemon (in any hierarchy).
    pub fn list(&self) -> Vec<String> {
        let mut ids = std::collections::BTreeSet::new();
        let mut parents = vec![self.v2_root.join(&self.parent)];
        parents.extend(
            self.v1
                .iter()
                .map(|c| Path::new(CGROUP_ROOT).join(c).join(&self.parent)),
        );
        for p in parents {
            if let Ok(rd) = std::fs::read_dir(&p) {
                for e in rd.flatten() {
                    if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        ids.insert(e.file_name().to_string_lossy().into_owned());
                    }
                }
            }
        }
        ids.into_iter().collect()
    }

    /// Memory currently charged to the sandbox, in bytes.
    pub fn memory_usage(&self, id: &str) -> Option<u64> {
        let path = match self.layout {
            Layout::Unified => self.v2_dir(id).join("memory.current"),
            Layout::Hybrid => self.v1_dir("memory", id).join("memory.usage_in_bytes"),
        };
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    /// CPU time used by the sandbox's processes since its cgroup was made, in nanoseconds.
    pub fn cpu_usage_ns(&self, id: &str) -> Option<u64> {
        match self.layout {
            Layout::Unified => {
                let stat = std::fs::read_to_string(self.v2_dir(id).join("cpu.stat")).ok()?;
                let usec: u64 = stat
                    .lines()
                    .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse().ok())?;
                Some(usec * 1000)
            }
            Layout::Hybrid => {
                // cpuacct may be co-mounted with cpu (`cpu,cpuacct`); both paths then resolve.
                let dir = if self.v1.contains(&"cpuacct") {
                    self.v1_dir("cpuacct", id)
                } else {
                    self.v1_dir("cpu", id)
                };
                std::fs::read_to_string(dir.join("cpuacct.usage"))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            }
        }
    }

    /// Page cache charged to the sandbox, in bytes.
    pub fn memory_cache(&self, id: &str) -> Option<u64> {
        let (path, key) = match self.layout {
            Layout::Unified => (self.v2_dir(id).join("memory.stat"), "file "),
            Layout::Hybrid => (
                self.v1_dir("memory", id).join("memory.stat"),
                "total_cache ",
            ),
        };
        std::fs::read_to_string(path)
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
    }

    /// How many times the kernel's OOM killer fired inside the sandbox.
    pub fn oom_kills(&self, id: &str) -> u64 {
        let (path, key) = match self.layout {
            Layout::Unified => (self.v2_dir(id).join("memory.events"), "oom_kill"),
            Layout::Hybrid => (
                self.v1_dir("memory", id).join("memory.oom_control"),
                "oom_kill",
            ),
        };
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
            })
            .unwrap_or(0)
    }
}

/// Turns on cgroup2's `favordynmods` (Linux ≥ 6.0) if it is off. Moving a task into a cgroup then
/// no longer waits for an RCU grace period, which on a busy host (sandboxes being torn down) cost
/// 10–20 ms of every sandbox start; forks and exits become slightly dearer, a good trade for a
/// sandbox host. The option is host-wide; failures (older kernels) are logged and ignored.
fn favor_dynamic_modifications(v2_root: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let target = v2_root.display().to_string();
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.get(4) != Some(&target.as_str()) || fields.get(sep + 1) != Some(&"cgroup2") {
            continue;
        }
        let super_opts = fields.get(sep + 3).copied().unwrap_or("");
        if super_opts.split(',').any(|o| o == "favordynmods") {
            return;
        }
        let mut flags: libc::c_ulong = libc::MS_REMOUNT;
        for opt in fields.get(5).copied().unwrap_or("").split(',') {
            flags |= match opt {
                "ro" => libc::MS_RDONLY,
                "nosuid" => libc::MS_NOSUID,
                "nodev" => libc::MS_NODEV,
                "noexec" => libc::MS_NOEXEC,
                "relatime" => libc::MS_RELATIME,
                "noatime" => libc::MS_NOATIME,
                _ => 0,
            };
        }
        let keep: Vec<&str> = super_opts
            .split(',')
            .filter(|o| *o != "rw" && *o != "ro" && !o.is_empty())
            .collect();
        let data = if keep.is_empty() {
            "favordynmods".to_string()
        } else {
            format!("{},favordynmods", keep.join(","))
        };
        let (t, d) = (
            std::ffi::CString::new(target.clone()).unwrap_or_default(),
            std::ffi::CString::new(data).unwrap_or_default(),
        );
        // SAFETY: valid C strings; a remount changes only the options of an existing mount.
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                t.as_ptr(),
                std::ptr::null(),
                flags,
                d.as_ptr().cast(),
            )
        };
        if rc != 0 {
            tracing::warn!(
                mount = %target,
                error = %std::io::Error::last_os_error(),
                "cannot enable cgroup2 favordynmods; sandbox starts may be slower"
            );
        } else {
            tracing::info!(mount = %target, "enabled cgroup2 favordynmods for fast cgroup moves");
        }
        return;
    }
}
