//! The real runtime on Linux.
//!
//! Creating a sandbox (see [`crate::init`] for the half that runs inside):
//! 1. an address, a cgroup per hierarchy (with limits), a veth pair on the host bridge and, with a
//!    disk cap, the sandbox's own file system for its upper dir ([`disk`]);
//! 2. `warren-envd init` is spawned with its cgroups joined and new mount, uts, ipc, net, cgroup
//!    and pid namespaces (`pre_exec`, async-signal-safe syscalls only); it forks PID 1 of the new
//!    pid namespace and reports its host pid;
//! 3. the veth's sandbox end is moved into the namespace, the [`InitSpec`] is written;
//! 4. init mounts the overlay root, pivots, configures `eth0`, starts envd and answers `ready`.
//!
//! The overlay and every other mount exist only in the sandbox's mount namespace, so they vanish
//! with its last process: destroying a sandbox is killing its cgroup, then deleting the veth, the
//! nftables element, the upper dir (and its file system) and the cgroups.

pub mod cgroup;
pub mod checkpoint;
pub mod disk;
pub mod dns;
pub mod net;
pub mod pod;
pub mod podnet;
mod snapshots;
pub mod template;
pub mod userns;

pub use template::{prepare_base_template, sandbox_resolv_conf};

use crate::init::InitSpec;
use crate::{
    CheckpointInfo, CheckpointOptions, CheckpointStats, NetworkPolicy, Placement, RuntimeError,
    SandboxRuntime, SandboxSpec, SandboxStats,
};
use async_trait::async_trait;
use cgroup::CgroupManager;
use checkpoint::{CriuSupport, RootfsRecord};
use net::HostNetwork;
use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// How long a sandbox may take from spawn to `ready` before the create fails.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Configuration of one daemon's runtime. Several daemons can share a host when their data dirs,
/// subnets and name prefixes differ; [`LinuxRuntimeConfig::derived`] derives the names from the
/// data dir so that this holds by default.
#[derive(Debug, Clone)]
pub struct LinuxRuntimeConfig {
    /// Where sandbox upper dirs and runtime state live (`<data_dir>/sandboxes/<id>`).
    pub data_dir: PathBuf,
    /// Path of the `warren-envd` binary on the host.
    pub envd_binary: PathBuf,
    /// Sandbox subnet: network address and prefix length. Unless `subnet_fixed`, this is only a
    /// preference: the first start probes from here for a subnet no host interface uses and
    /// records it in the data dir.
    pub subnet: (Ipv4Addr, u8),
    /// The operator chose `subnet` (`warren serve --subnet`): use exactly it.
    pub subnet_fixed: bool,
    /// Host bridge name (at most 15 bytes).
    pub bridge: String,
    /// Prefix for host veth names, the nftables table and the cgroup directory (`w` + 3 chars).
    pub name_prefix: String,
    /// How many network namespaces to keep prepared ahead of creates.
    pub prepared_networks: usize,
    /// Where the DNS filter (domain names in egress rules) sends the questions it allows;
    /// empty means the host's resolvers from `/etc/resolv.conf`.
    pub dns_upstreams: Vec<std::net::SocketAddr>,
    /// Runs every sandbox in its own user namespace (see [`userns`]): root inside is an
    /// unprivileged host uid range of its own. On by default (`warren serve
    /// --user-namespaces=false` turns it off).
    pub user_namespaces: bool,
    /// First host uid/gid of the pool sandboxes' user namespaces are mapped onto, and how many
    /// ranges of [`userns::IdRange::COUNT`] ids it holds (so at most that many sandboxes).
    pub uid_base: u32,
    pub uid_ranges: u32,
}

impl LinuxRuntimeConfig {
    /// Derives subnet, bridge name and prefixes from a hash of the (absolute) data dir: a /20 in
    /// 10.200.0.0/13 and a 3-character tag, so daemons with different data dirs do not clash.
    pub fn derived(data_dir: PathBuf, envd_binary: PathBuf) -> Self {
        let abs = std::path::absolute(&data_dir).unwrap_or_else(|_| data_dir.clone());
        // FNV-1a: stable across builds and platforms, unlike std's hasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in abs.as_os_str().as_bytes() {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let tag: String = (0..3)
            .map(|i| ALPHABET[((h >> (i * 8)) % 36) as usize] as char)
            .collect();
        let slot = ((h >> 32) % 128) as u32; // 128 /20 subnets in 10.200.0.0/13
                                             // 30 pools of 1024 uid ranges (2^26 ids) from 2^31, far above any distribution's users.
        let uid_slot = ((h >> 40) % userns::POOLS as u64) as u32;
        let network = u32::from(Ipv4Addr::new(10, 200, 0, 0)) + (slot << 12);
        LinuxRuntimeConfig {
            data_dir,
            envd_binary,
            subnet: (Ipv4Addr::from(network), 20),
            subnet_fixed: false,
            bridge: format!("w{tag}br"),
            name_prefix: format!("w{tag}"),
            prepared_networks: 4,
            dns_upstreams: Vec::new(),
            user_namespaces: true,
            uid_base: userns::POOL_FIRST
                + uid_slot * (userns::POOL_RANGES * userns::IdRange::COUNT),
            uid_ranges: userns::POOL_RANGES,
        }
    }
}

/// The sandbox's egress rules as last installed, in its dir.
const EGRESS_FILE: &str = "egress.json";

/// What the runtime tracks of each live sandbox.
struct Tracked {
    placement: Placement,
    internet_denied: bool,
    /// Whether the sandbox has an egress chain in nftables.
    egress: bool,
    alive: Arc<AtomicBool>,
    /// Dumped by CRIU: no process runs; cgroups, upper dir, network namespace and address stay.
    hibernated: bool,
}

pub struct LinuxRuntime {
    config: LinuxRuntimeConfig,
    cgroups: CgroupManager,
    net: Arc<HostNetwork>,
    refilling: Arc<AtomicBool>,
    sandboxes: Mutex<HashMap<String, Tracked>>,
    /// The layer that shows the init binary inside every sandbox (see [`checkpoint`]).
    init_layer: PathBuf,
    criu: CriuSupport,
    /// Host id ranges of the sandboxes' user namespaces.
    ids: Arc<userns::IdPool>,
    /// Holds this daemon's id pool against other daemons on the host.
    _uid_pool_lock: Option<OwnedFd>,
}

impl LinuxRuntime {
    /// Prepares host state shared by all sandboxes (cgroup parents, bridge, nft table, sysctls).
    pub async fn new(config: LinuxRuntimeConfig) -> Result<Self, RuntimeError> {
        if !config.envd_binary.is_file() {
            return Err(RuntimeError::Config(format!(
                "envd binary {} not found",
                config.envd_binary.display()
            )));
        }
        let sandboxes_dir = config.data_dir.join("sandboxes");
        std::fs::create_dir_all(&sandboxes_dir)
            .map_err(|e| RuntimeError::io("mkdir", &sandboxes_dir, e))?;
        // Sandbox inits re-parent to the daemon when their short-lived parent exits, so the
        // daemon can reap them (and see them die) instead of the host's init.
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        // The derived pool, unless another daemon on this host holds it (see
        // [`userns::reserve_pool`]).
        let mut config = config;
        let uid_pool_lock = if config.user_namespaces {
            let (base, lock) =
                userns::reserve_pool(&config.data_dir, config.uid_base, config.uid_ranges)?;
            config.uid_base = base;
            lock
        } else {
            None
        };
        let ids = Arc::new(userns::IdPool::new(config.uid_base, config.uid_ranges)?);
        let cgroups = CgroupManager::new(&format!("warren-{}", config.name_prefix))?;
        let init_layer = checkpoint::prepare_init_layer(&config.data_dir, &config.envd_binary)?;
        let criu = CriuSupport::detect();
        if let CriuSupport::Unavailable(why) = &criu {
            tracing::warn!("hibernation and checkpoints are disabled: {why}");
        }
        config.subnet = net::choose_subnet(
            &config.data_dir.join("subnet"),
            &config.bridge,
            config.subnet,
            config.subnet_fixed,
        )
        .await?;
        let net = HostNetwork::setup(
            &config.bridge,
            &config.name_prefix,
            config.subnet.0,
            config.subnet.1,
            config.user_namespaces.then(|| ids.clone()),
        )
        .await?;
        let net = Arc::new(net);
        let upstreams = match &config.dns_upstreams {
            u if u.is_empty() => dns::host_upstreams(),
            u => u.clone(),
        };
        dns::DnsFilter::start(net.clone(), upstreams).await?;
        let rt = LinuxRuntime {
            config,
            cgroups,
            net,
            refilling: Arc::new(AtomicBool::new(false)),
            sandboxes: Mutex::new(HashMap::new()),
            init_layer,
            criu,
            ids,
            _uid_pool_lock: uid_pool_lock,
        };
        // Network namespaces are prepared only after recovery (the end of `sweep`, or the first
        // create): until the surviving sandboxes are adopted, their addresses look free.
        Ok(rt)
    }

    /// Tops up the prepared network namespaces in the background (one refill at a time).
    fn refill_networks(&self) {
        if self.refilling.swap(true, Ordering::SeqCst) {
            return;
        }
        let (net, flag, target) = (
            self.net.clone(),
            self.refilling.clone(),
            self.config.prepared_networks,
        );
        tokio::spawn(async move {
            if let Err(e) = net.refill(target).await {
                tracing::warn!(error = %e, "preparing sandbox network namespaces");
            }
            flag.store(false, Ordering::SeqCst);
        });
    }

    pub fn config(&self) -> &LinuxRuntimeConfig {
        &self.config
    }

    pub fn cgroups(&self) -> &CgroupManager {
        &self.cgroups
    }

    /// Removes the host state shared by sandboxes: bridge, nftables tables and parent cgroups
    /// (for tests and uninstalling). Call after every sandbox is destroyed.
    pub async fn teardown_host(&self) -> Result<(), RuntimeError> {
        self.net.teardown().await?;
        self.cgroups.remove_parents();
        Ok(())
    }

    /// Called when the daemon stops: with no sandbox left, the host is given back its bridge,
    /// nftables tables and cgroup parents (a restart recreates them); with sandboxes still
    /// running, everything stays so they keep working and can be re-adopted.
    pub async fn shutdown(&self) -> Result<(), RuntimeError> {
        let live = self
            .sandboxes
            .lock()
            .unwrap()
            .values()
            .any(|t| t.alive.load(Ordering::SeqCst));
        if live || !self.cgroups.list().is_empty() {
            return Ok(());
        }
        self.teardown_host().await
    }

    /// After a failed wake of a sandbox in a user namespace: its kept network namespace gets its
    /// `eth0` back if the restore took it (see [`HostNetwork::replug`]), so a later wake works.
    async fn replug_kept_netns(&self, dir: &Path, placement: &Placement) {
        let path = dir.join("netns");
        let replugged = match std::fs::File::open(&path) {
            Ok(f) => {
                self.net
                    .replug(&OwnedFd::from(f), placement.ip, &placement.veth)
                    .await
            }
            Err(e) => Err(RuntimeError::io("open", &path, e)),
        };
        if let Err(e) = replugged {
            tracing::warn!(path = %path.display(), error = %e, "giving a hibernated sandbox its network back");
        }
    }

    /// The address, prefix and gateway of the sandbox at `ip`, as its eth0 is configured.
    fn net_config(&self, ip: Ipv4Addr) -> crate::init::InitNet {
        crate::init::InitNet {
            address: ip,
            prefix_len: self.net.ipam.prefix_len(),
            gateway: self.net.ipam.gateway(),
        }
    }

    fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.config.data_dir.join("sandboxes").join(id)
    }

    /// Installs a sandbox's egress rules and records them in its dir, where a restarted daemon
    /// finds them again ([`SandboxRuntime::adopt`] gets no spec, and the DNS filter keeps its
    /// domain rules in memory).
    fn set_egress(
        &self,
        id: &str,
        ip: Ipv4Addr,
        rules: &crate::egress::EgressRules,
    ) -> Result<(), RuntimeError> {
        self.net.set_egress(id, ip, rules)?;
        let path = self.sandbox_dir(id).join(EGRESS_FILE);
        let json = serde_json::to_vec(rules).expect("plain data serializes");
        std::fs::write(&path, json).map_err(|e| RuntimeError::io("write", &path, e))
    }

    async fn create_inner(
        &self,
        spec: &SandboxSpec,
        slot: &net::NetSlot,
        ids: Option<userns::IdRange>,
    ) -> Result<(Placement, Arc<AtomicBool>), RuntimeError> {
        let t0 = std::time::Instant::now();
        let id = &spec.id;
        let dir = self.sandbox_dir(id);
        let (rootfs, upper, work) = disk::sandbox_dirs(&dir, spec.resources.disk_mb).await?;
        prof("disk", &t0);
        let procs = self.cgroups.create(id, &spec.resources)?;
        if !spec.network.allow_internet {
            self.net.deny_internet(slot.ip)?;
        }
        if !spec.network.egress.is_empty() {
            self.set_egress(id, slot.ip, &spec.network.egress)?;
        }
        // The init layer goes on top so no template can shadow the init binary.
        let lower_dirs: Vec<PathBuf> = std::iter::once(self.init_layer.clone())
            .chain(spec.rootfs.lower_dirs.iter().cloned())
            .collect();
        RootfsRecord {
            lower_dirs: lower_dirs.clone(),
            upper_dir: upper.clone(),
            work_dir: work.clone(),
            rootfs_dir: rootfs.clone(),
            ro_binds: spec.rootfs.ro_binds.clone(),
        }
        .save(&dir)?;
        prof("prepared", &t0);
        let mounts = match (ids, &slot.userns) {
            (Some(ids), Some((_, userns_fd))) => {
                let userns_fd = userns_fd
                    .try_clone()
                    .map_err(|e| RuntimeError::sys("dup user namespace", id, e))?;
                let (lower, upper, work) = (lower_dirs.clone(), upper.clone(), work.clone());
                let binds = spec.rootfs.ro_binds.clone();
                let netns = slot.netns.as_raw_fd();
                // The slot (and so its namespace descriptor) outlives this blocking call.
                let m = tokio::task::spawn_blocking(move || {
                    userns::prepare_mounts(&ids, userns_fd, netns, &lower, &upper, &work, &binds)
                })
                .await
                .expect("mount preparation does not panic")?;
                prof("mounts prepared", &t0);
                Some(m)
            }
            _ => None,
        };

        let log_path = dir.join("init.log");
        let log = std::fs::File::create(&log_path)
            .map_err(|e| RuntimeError::io("create", &log_path, e))?;
        let mut child = spawn_init(
            &self.config.envd_binary,
            &procs,
            slot.netns.as_raw_fd(),
            log,
            mounts.as_ref().map(|m| UserNs {
                fd: m.userns.as_raw_fd(),
                inherit: m.inherited_fds(),
                cwd: CString::new(dir.as_os_str().as_bytes()).unwrap_or_default(),
            }),
        )
        .map_err(|e| RuntimeError::sys("spawn sandbox init", id, e))?;
        prof("spawned", &t0);
        let init_spec = InitSpec {
            id: id.clone(),
            lower_dirs,
            upper_dir: upper.clone(),
            work_dir: work.clone(),
            // In a user namespace, relative to the sandbox dir (the init's working dir).
            rootfs_dir: match &mounts {
                Some(_) => PathBuf::from("rootfs"),
                None => rootfs.clone(),
            },
            ro_binds: spec.rootfs.ro_binds.clone(),
            // The prepared namespace is configured already.
            net: None,
            envd: spec.envd.clone(),
            mounts: mounts.as_ref().map(|m| m.init_mounts()),
        };
        let started = init_handshake(&mut child, &init_spec, &log_path).await?;
        prof("ready", &t0);
        // PID 1 has attached its mounts; the daemon's descriptors of them can go.
        drop(mounts);

        let init_start_ticks = start_ticks(started).ok_or_else(|| RuntimeError::StartFailed {
            id: id.clone(),
            reason: "sandbox init exited right after starting".into(),
        })?;
        let placement = Placement {
            init_pid: started,
            init_start_ticks,
            ip: slot.ip,
            veth: slot.veth.clone(),
            userns: ids,
        };
        let alive = watch_exit(started, id.clone())?;
        Ok((placement, alive))
    }

    /// Removes everything of a sandbox, known or leftover. Idempotent.
    async fn cleanup(
        &self,
        id: &str,
        ip: Option<Ipv4Addr>,
        veth: Option<&str>,
        deny_rule: bool,
        egress: bool,
    ) -> Result<(), RuntimeError> {
        let cg = self.cgroups.clone();
        let id_owned = id.to_string();
        tokio::task::spawn_blocking(move || cg.kill_all(&id_owned))
            .await
            .expect("kill task does not panic")?;
        if let Some(veth) = veth {
            self.net.delete_veth(veth).await?;
        }
        if let Some(ip) = ip {
            if deny_rule {
                self.net.allow_internet(ip)?;
            }
        }
        if egress {
            self.net.clear_egress(id, ip)?;
        }
        let dir = self.sandbox_dir(id);
        let cg = self.cgroups.clone();
        let id_owned = id.to_string();
        tokio::task::spawn_blocking(move || -> Result<(), RuntimeError> {
            remove_sandbox_dir(&dir)?;
            cg.remove(&id_owned)
        })
        .await
        .expect("cleanup task does not panic")?;
        if let Some(ip) = ip {
            self.net.ipam.release(ip);
        }
        Ok(())
    }
}

/// Removes a sandbox directory. The overlay normally vanished with the sandbox's mount namespace;
/// if the daemon's namespace still sees a mount there (it never mounts one itself), detach it.
fn remove_sandbox_dir(dir: &Path) -> Result<(), RuntimeError> {
    if !dir.exists() {
        return Ok(());
    }
    checkpoint::unpin_netns(dir);
    disk::release(dir);
    let rootfs = CString::new(dir.join("rootfs").as_os_str().as_bytes()).unwrap_or_default();
    // SAFETY: valid C string; EINVAL (not a mount point) is the normal outcome and ignored.
    unsafe { libc::umount2(rootfs.as_ptr(), libc::MNT_DETACH) };
    std::fs::remove_dir_all(dir).or_else(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Ok(())
        } else {
            Err(RuntimeError::io("remove", dir, e))
        }
    })
}

/// What the init needs to enter its user namespace.
struct UserNs {
    /// The namespace (see [`userns::new_userns`]).
    fd: std::os::fd::RawFd,
    /// Detached mounts the init inherits.
    inherit: Vec<std::os::fd::RawFd>,
    /// The sandbox dir, entered as host root before the switch.
    cwd: CString,
}

/// Spawns `warren-envd init` with its cgroups joined and its namespaces unshared: the network
/// namespace is joined first, so it stays owned by the host's user namespace; then the user
/// namespace is entered as its root, and the mount, uts, ipc, cgroup and pid namespaces are made
/// inside it (owned by it, so root in the sandbox can mount its /proc, but nothing of the host's).
fn spawn_init(
    envd: &Path,
    cgroup_procs: &[PathBuf],
    netns: std::os::fd::RawFd,
    log: std::fs::File,
    user: Option<UserNs>,
) -> std::io::Result<tokio::process::Child> {
    // Opened before fork: the child may only make async-signal-safe syscalls.
    let mut procs_fds = Vec::new();
    for p in cgroup_procs {
        let f = std::fs::OpenOptions::new().write(true).open(p)?;
        procs_fds.push(OwnedFd::from(f));
    }
    let raw: Vec<i32> = procs_fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut cmd = tokio::process::Command::new(envd);
    cmd.arg("init")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::from(log))
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .kill_on_drop(true);
    // SAFETY: the closure only makes raw syscalls (write, setns, chdir, fcntl, set*id, unshare)
    // on values prepared before fork, which are async-signal-safe; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            for fd in &raw {
                if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                    return fail();
                }
            }
            if libc::setns(netns, libc::CLONE_NEWNET) != 0 {
                return fail();
            }
            if let Some(u) = &user {
                if libc::chdir(u.cwd.as_ptr()) != 0 {
                    return fail();
                }
                for fd in &u.inherit {
                    if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                        return fail();
                    }
                }
                if libc::setns(u.fd, libc::CLONE_NEWUSER) != 0 {
                    return fail();
                }
                // Root of the namespace: host ids are the range's first. No supplementary
                // groups: the host's would be unmapped.
                if libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
                    || libc::syscall(libc::SYS_setresgid, 0, 0, 0) != 0
                    || libc::syscall(libc::SYS_setresuid, 0, 0, 0) != 0
                {
                    return fail();
                }
            }
            let flags = libc::CLONE_NEWNS
                | libc::CLONE_NEWUTS
                | libc::CLONE_NEWIPC
                | libc::CLONE_NEWCGROUP
                | libc::CLONE_NEWPID;
            if libc::unshare(flags) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn();
    drop(procs_fds);
    child
}

/// Field 22 of /proc/PID/stat: the process start time in clock ticks since boot.
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: parse after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Watches a sandbox init with a pidfd: the flag turns false when it exits, and the zombie is
/// reaped when the daemon is its (sub)reaper.
fn watch_exit(pid: u32, id: String) -> Result<Arc<AtomicBool>, RuntimeError> {
    // SAFETY: pidfd_open takes a pid and flags; the returned descriptor is owned below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) } as i32;
    if fd < 0 {
        return Err(RuntimeError::sys(
            "pidfd_open",
            &id,
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let alive = Arc::new(AtomicBool::new(true));
    let flag = alive.clone();
    // SAFETY: `owned` is an OwnedFd moved into the AsyncFd, so the descriptor stays open and the
    // same for the AsyncFd's whole lifetime.
    let async_fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE)
    }
    .map_err(|e| RuntimeError::sys("watch sandbox init", &id, e.into()))?;
    tokio::spawn(async move {
        let _ = async_fd.readable().await;
        flag.store(false, Ordering::SeqCst);
        let fd = async_fd.into_inner();
        // A pid namespace's init can poll as exited a moment before it is reapable (its
        // namespace is still being torn down), so a WNOHANG wait could miss it and leave a
        // zombie: wait for real, off the async threads.
        let _ = tokio::task::spawn_blocking(move || {
            // SAFETY: waitid on our pidfd with a zeroed siginfo out-parameter; ECHILD (not our
            // child, e.g. adopted after a restart) returns at once and is harmless.
            unsafe {
                let mut info: libc::siginfo_t = std::mem::zeroed();
                libc::waitid(
                    libc::P_PIDFD,
                    fd.as_raw_fd() as libc::id_t,
                    &mut info,
                    libc::WEXITED,
                );
            }
        })
        .await;
        tracing::debug!(sandbox = %id, pid, "sandbox init exited");
    });
    Ok(alive)
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

#[async_trait]
impl SandboxRuntime for LinuxRuntime {
    async fn create(&self, spec: &SandboxSpec) -> Result<Placement, RuntimeError> {
        if !valid_id(&spec.id) {
            return Err(RuntimeError::Config(format!(
                "sandbox id {:?} must be 1-64 characters of [a-z0-9]",
                spec.id
            )));
        }
        if self.sandboxes.lock().unwrap().contains_key(&spec.id) {
            return Err(RuntimeError::StartFailed {
                id: spec.id.clone(),
                reason: "a sandbox with this id exists".into(),
            });
        }
        // With user namespaces on, the prepared slot comes with the sandbox's user namespace (it
        // owns the network namespace) and id range, which the sandbox keeps from here on.
        let slot = self.net.take_slot().await?;
        let ids = slot.userns.as_ref().map(|(range, _)| *range);
        self.refill_networks();
        match self.create_inner(spec, &slot, ids).await {
            Ok((placement, alive)) => {
                self.sandboxes.lock().unwrap().insert(
                    spec.id.clone(),
                    Tracked {
                        placement: placement.clone(),
                        internet_denied: !spec.network.allow_internet,
                        egress: !spec.network.egress.is_empty(),
                        alive,
                        hibernated: false,
                    },
                );
                Ok(placement)
            }
            Err(e) => {
                if let Err(cleanup) = self
                    .cleanup(
                        &spec.id,
                        Some(slot.ip),
                        Some(&slot.veth),
                        !spec.network.allow_internet,
                        !spec.network.egress.is_empty(),
                    )
                    .await
                {
                    tracing::error!(sandbox = %spec.id, error = %cleanup, "cleanup after failed create");
                }
                self.net.release_ids(&slot);
                Err(e)
            }
        }
    }

    async fn freeze(&self, id: &str) -> Result<(), RuntimeError> {
        let cg = self.cgroups.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || cg.freeze(&id))
            .await
            .expect("freeze task does not panic")
    }

    async fn thaw(&self, id: &str) -> Result<(), RuntimeError> {
        let cg = self.cgroups.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || cg.thaw(&id))
            .await
            .expect("thaw task does not panic")
    }

    async fn destroy(&self, id: &str) -> Result<(), RuntimeError> {
        let tracked = self.sandboxes.lock().unwrap().remove(id);
        match &tracked {
            Some(t) => {
                self.cleanup(
                    id,
                    Some(t.placement.ip),
                    Some(&t.placement.veth),
                    t.internet_denied,
                    t.egress,
                )
                .await?;
                // Only now: no process of the sandbox holds its ids any more.
                if let Some(ids) = &t.placement.userns {
                    self.ids.release(ids);
                }
                Ok(())
            }
            None => self.cleanup(id, None, None, false, false).await,
        }
    }

    async fn adopt(&self, id: &str, placement: &Placement) -> Result<bool, RuntimeError> {
        // A hibernation the crash interrupted ends first: its CRIU may still kill the tree.
        checkpoint::settle_interrupted_dump(id, &self.sandbox_dir(id)).await?;
        if start_ticks(placement.init_pid) != Some(placement.init_start_ticks)
            || !self.cgroups.populated(id)
        {
            return Ok(false);
        }
        let alive = watch_exit(placement.init_pid, id.to_string())?;
        self.net.ipam.claim(placement.ip);
        if let Some(ids) = &placement.userns {
            self.ids.claim(ids);
        }
        let denied = self
            .net
            .denied_addresses()
            .map(|ips| ips.contains(&placement.ip))
            .unwrap_or(false);
        let egress = self
            .net
            .egress_chains()
            .map(|ids| ids.iter().any(|c| c == id))
            .unwrap_or(false);
        if egress {
            // Re-installing is idempotent and gives the DNS filter the sandbox's domain rules.
            let path = self.sandbox_dir(id).join(EGRESS_FILE);
            if let Some(rules) = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<crate::egress::EgressRules>(&b).ok())
            {
                self.net.set_egress(id, placement.ip, &rules)?;
            }
        }
        self.sandboxes.lock().unwrap().insert(
            id.to_string(),
            Tracked {
                placement: placement.clone(),
                internet_denied: denied,
                egress,
                alive,
                hibernated: false,
            },
        );
        Ok(true)
    }

    async fn adopt_hibernated(
        &self,
        id: &str,
        placement: &Placement,
    ) -> Result<bool, RuntimeError> {
        let dir = self.sandbox_dir(id);
        if !checkpoint::has_images(&dir)
            || !checkpoint::is_nsfs(&dir.join("netns"))
            || !self.cgroups.v2_dir(id).exists()
        {
            return Ok(false);
        }
        // A wake the crash interrupted may have restored the tree after all; it was never
        // acknowledged, so it goes, and the images (still complete) restore it again on wake.
        if checkpoint::end_unrecorded_wake(&self.cgroups, id, &dir).await? {
            tracing::info!(sandbox = %id, "removed the tree of a wake the daemon's restart interrupted");
        }
        self.net.ipam.claim(placement.ip);
        if let Some(ids) = &placement.userns {
            self.ids.claim(ids);
        }
        let denied = self
            .net
            .denied_addresses()
            .map(|ips| ips.contains(&placement.ip))
            .unwrap_or(false);
        let egress = self
            .net
            .egress_chains()
            .map(|ids| ids.iter().any(|c| c == id))
            .unwrap_or(false);
        self.sandboxes.lock().unwrap().insert(
            id.to_string(),
            Tracked {
                placement: placement.clone(),
                internet_denied: denied,
                egress,
                alive: Arc::new(AtomicBool::new(false)),
                hibernated: true,
            },
        );
        Ok(true)
    }

    fn hibernate_support(&self) -> Result<(), String> {
        match &self.criu {
            CriuSupport::Available(_) => Ok(()),
            CriuSupport::Unavailable(why) => Err(why.clone()),
        }
    }

    async fn hibernate(&self, id: &str) -> Result<CheckpointStats, RuntimeError> {
        let criu = self.criu.binary()?.to_path_buf();
        let pid = {
            let map = self.sandboxes.lock().unwrap();
            let t = map
                .get(id)
                .ok_or_else(|| RuntimeError::UnknownSandbox(id.to_string()))?;
            if t.hibernated || !t.alive.load(Ordering::SeqCst) {
                return Err(RuntimeError::Checkpoint {
                    op: "dump",
                    id: id.to_string(),
                    reason: if t.hibernated {
                        "the sandbox is already hibernated".into()
                    } else {
                        "the sandbox has no running process".into()
                    },
                });
            }
            t.placement.init_pid
        };
        let dir = self.sandbox_dir(id);
        // Images of an earlier wake not yet released are spent: the tree runs.
        checkpoint::release_spent_images(&dir);
        let freezer = self.cgroups.v2_dir(id);
        let was_frozen = std::fs::read_to_string(freezer.join("cgroup.freeze"))
            .map(|s| s.trim() == "1")
            .unwrap_or(false);
        let dumped = checkpoint::dump(&criu, id, pid, &dir, Some(&freezer), false).await;
        let stats = match dumped {
            Ok(stats) => stats,
            Err(e) => {
                checkpoint::unpin_netns(&dir);
                // CRIU thaws what it froze; a sandbox that was paused stays paused.
                if was_frozen {
                    let _ = self.freeze(id).await;
                }
                return Err(e);
            }
        };
        // CRIU killed the tree; make sure nothing is left and the (empty) cgroup is thawed, so
        // the restored tree does not start frozen.
        let cg = self.cgroups.clone();
        let id_owned = id.to_string();
        tokio::task::spawn_blocking(move || cg.kill_all(&id_owned))
            .await
            .expect("kill task does not panic")?;
        if let Some(t) = self.sandboxes.lock().unwrap().get_mut(id) {
            t.hibernated = true;
            t.alive.store(false, Ordering::SeqCst);
        }
        Ok(stats)
    }

    async fn wake(&self, id: &str) -> Result<Placement, RuntimeError> {
        let criu = self.criu.binary()?.to_path_buf();
        let placement = {
            let map = self.sandboxes.lock().unwrap();
            let t = map
                .get(id)
                .ok_or_else(|| RuntimeError::UnknownSandbox(id.to_string()))?;
            if !t.hibernated {
                return Err(RuntimeError::Checkpoint {
                    op: "restore",
                    id: id.to_string(),
                    reason: "the sandbox is not hibernated".into(),
                });
            }
            t.placement.clone()
        };
        let dir = self.sandbox_dir(id);
        disk::ensure_mounted(&dir)?;
        // A wake the daemon's crash interrupted took eth0 into a tree that was then removed (see
        // `adopt_hibernated`): the kept namespace gets it back first.
        if placement.userns.is_some() {
            self.replug_kept_netns(&dir, &placement).await;
        }
        let procs: Vec<PathBuf> = self
            .cgroups
            .dirs(id)
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect();
        let pid = checkpoint::restore(checkpoint::RestoreTarget {
            criu: &criu,
            id,
            dir: &dir,
            cgroup_procs: &procs,
            userns: placement
                .userns
                .map(|range| (range, self.net_config(placement.ip))),
        })
        .await;
        let pid = match pid {
            Ok(pid) => pid,
            Err(e) => {
                if placement.userns.is_some() {
                    self.replug_kept_netns(&dir, &placement).await;
                }
                return Err(e);
            }
        };
        let ticks = start_ticks(pid).ok_or_else(|| RuntimeError::Checkpoint {
            op: "restore",
            id: id.to_string(),
            reason: format!("restored init {pid} exited at once"),
        })?;
        let alive = watch_exit(pid, id.to_string())?;
        let placement = Placement {
            init_pid: pid,
            init_start_ticks: ticks,
            ..placement
        };
        if let Some(t) = self.sandboxes.lock().unwrap().get_mut(id) {
            t.placement = placement.clone();
            t.alive = alive;
            t.hibernated = false;
        }
        // The images stay until the control plane has recorded the wake (release_wake_images).
        Ok(placement)
    }

    async fn release_wake_images(&self, id: &str) {
        let dir = self.sandbox_dir(id);
        let live = self
            .sandboxes
            .lock()
            .unwrap()
            .get(id)
            .is_some_and(|t| !t.hibernated);
        if live {
            checkpoint::release_spent_images(&dir);
        }
    }

    async fn sweep(&self, keep: &HashSet<String>) -> Result<Vec<String>, RuntimeError> {
        let mut leftovers: HashSet<String> = self.cgroups.list().into_iter().collect();
        if let Ok(rd) = std::fs::read_dir(self.config.data_dir.join("sandboxes")) {
            for e in rd.flatten() {
                leftovers.insert(e.file_name().to_string_lossy().into_owned());
            }
        }
        leftovers.retain(|id| !keep.contains(id));
        let mut cleaned: Vec<String> = leftovers.into_iter().collect();
        cleaned.sort();
        for id in &cleaned {
            self.destroy(id).await?;
        }
        // Veths of no tracked sandbox, made by an earlier daemon process.
        let mut live: HashSet<String> = self
            .sandboxes
            .lock()
            .unwrap()
            .values()
            .map(|t| t.placement.veth.clone())
            .collect();
        live.extend(self.net.ready_veths());
        for veth in self.net.list_veths().await? {
            if !live.contains(&veth) && !self.net.is_own_veth(&veth) {
                self.net.delete_veth(&veth).await?;
            }
        }
        // Egress rules of sandboxes no longer tracked.
        let tracked: HashSet<String> = self.sandboxes.lock().unwrap().keys().cloned().collect();
        for (ip, id) in self.net.egress_entries()? {
            if !tracked.contains(&id) {
                self.net.clear_egress(&id, Some(ip))?;
            }
        }
        for id in self.net.egress_chains()? {
            if !tracked.contains(&id) {
                self.net.clear_egress(&id, None)?;
            }
        }
        // No-internet entries of addresses no kept sandbox holds.
        let in_use: HashSet<Ipv4Addr> = self.net.ipam.in_use().into_iter().collect();
        for ip in self.net.denied_addresses()? {
            if !in_use.contains(&ip) {
                self.net.allow_internet(ip)?;
            }
        }
        self.refill_networks();
        Ok(cleaned)
    }

    async fn set_network(&self, id: &str, policy: &NetworkPolicy) -> Result<(), RuntimeError> {
        let (ip, denied, had_egress) = {
            let map = self.sandboxes.lock().unwrap();
            let t = map
                .get(id)
                .ok_or_else(|| RuntimeError::UnknownSandbox(id.to_string()))?;
            (t.placement.ip, t.internet_denied, t.egress)
        };
        // Rules first, then the no-internet set: a sandbox gaining exceptions while losing
        // internet access never has a moment without either.
        let egress = !policy.egress.is_empty();
        if egress {
            self.set_egress(id, ip, &policy.egress)?;
        } else if had_egress {
            self.net.clear_egress(id, Some(ip))?;
        }
        match (denied, policy.allow_internet) {
            (false, false) => self.net.deny_internet(ip)?,
            (true, true) => self.net.allow_internet(ip)?,
            _ => {}
        }
        if let Some(t) = self.sandboxes.lock().unwrap().get_mut(id) {
            t.internet_denied = !policy.allow_internet;
            t.egress = egress;
        }
        Ok(())
    }

    async fn stats(&self, id: &str) -> Result<SandboxStats, RuntimeError> {
        if !self.sandboxes.lock().unwrap().contains_key(id) {
            return Err(RuntimeError::UnknownSandbox(id.to_string()));
        }
        read_stats(self.cgroups.clone(), self.sandbox_dir(id), id).await
    }

    async fn checkpoint(
        &self,
        id: &str,
        name: &str,
        opts: &CheckpointOptions,
    ) -> Result<CheckpointInfo, RuntimeError> {
        self.checkpoint_impl(id, name, opts).await
    }

    fn checkpoint_layer(&self, name: &str) -> Option<PathBuf> {
        self.checkpoint_layer_impl(name)
    }

    async fn restore_checkpoint(
        &self,
        name: &str,
        spec: &SandboxSpec,
    ) -> Result<Placement, RuntimeError> {
        self.restore_checkpoint_impl(name, spec).await
    }

    async fn delete_checkpoint(&self, name: &str) -> Result<(), RuntimeError> {
        self.delete_checkpoint_impl(name).await
    }

    fn upper_dir(&self, id: &str) -> Option<PathBuf> {
        if !self.sandboxes.lock().unwrap().contains_key(id) {
            return None;
        }
        Some(disk::overlay_dirs(&self.sandbox_dir(id)).0)
    }

    fn is_alive(&self, id: &str) -> bool {
        self.sandboxes
            .lock()
            .unwrap()
            .get(id)
            .map(|t| t.alive.load(Ordering::SeqCst))
            .unwrap_or(false)
    }
}

/// Bytes allocated to the files under `dir` (like `du`), without following symlinks or
/// crossing into other file systems. Hard links count once per link: good enough for metrics.
/// A sandbox's cumulative usage from its cgroup (`cg`) and its directory `dir`: what single-host
/// metrics sample, and what the Kubernetes node agent answers for a sandbox in a Pod.
pub(crate) async fn read_stats(
    cg: CgroupManager,
    dir: PathBuf,
    id: &str,
) -> Result<SandboxStats, RuntimeError> {
    let id = id.to_string();
    tokio::task::spawn_blocking(move || {
        let memory_bytes = cg.memory_usage(&id).unwrap_or(0);
        // A sandbox with its own disk: what df shows (one statfs); else walk the upper dir.
        let (disk_bytes, disk_total_bytes) =
            disk::usage(&dir).unwrap_or_else(|| (disk_usage(&disk::overlay_dirs(&dir).0), 0));
        SandboxStats {
            cpu_usage_ns: cg.cpu_usage_ns(&id).unwrap_or(0),
            memory_bytes,
            memory_cache_bytes: cg.memory_cache(&id).unwrap_or(0).min(memory_bytes),
            disk_bytes,
            disk_total_bytes,
        }
    })
    .await
    .map_err(|e| RuntimeError::sys("read stats", "", std::io::Error::other(e)))
}

fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    let dev = std::fs::symlink_metadata(dir).map(|m| m.dev()).ok();
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            total += m.blocks() * 512;
            if m.is_dir() && Some(m.dev()) == dev {
                stack.push(e.path());
            }
        }
    }
    total
}

/// Where create time goes, at debug level (`RUST_LOG=warren_runtime=debug`).
/// The start handshake with a spawned sandbox init (`warren-envd init`): it reports the host pid
/// of the sandbox's PID 1, gets its [`InitSpec`] on stdin, and reports `ready` once envd serves
/// (or `error <why>`). Returns that pid; the intermediate process has exited. Shared by the
/// single-host and the Pod runtime so that both speak the one protocol the init implements.
pub(crate) async fn init_handshake(
    child: &mut tokio::process::Child,
    init_spec: &InitSpec,
    log_path: &Path,
) -> Result<u32, RuntimeError> {
    let id = &init_spec.id;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
    let pid = tokio::time::timeout(START_TIMEOUT, async {
        let first = lines.next_line().await.ok().flatten().unwrap_or_default();
        let pid: u32 = first
            .strip_prefix("pid ")
            .and_then(|p| p.trim().parse().ok())
            .ok_or_else(|| start_failure(id, log_path, &first))?;
        let json = serde_json::to_vec(init_spec).expect("init spec serializes");
        stdin
            .write_all(&json)
            .await
            .map_err(|e| RuntimeError::sys("write init spec", id, e))?;
        drop(stdin);
        let status = lines.next_line().await.ok().flatten().unwrap_or_default();
        if status != "ready" {
            return Err(start_failure(id, log_path, &status));
        }
        Ok(pid)
    })
    .await
    .map_err(|_| RuntimeError::StartFailed {
        id: id.clone(),
        reason: format!(
            "envd did not become ready within {}s",
            START_TIMEOUT.as_secs()
        ),
    })??;
    // The intermediate process exits right after forking PID 1.
    let _ = child.wait().await;
    Ok(pid)
}

/// Why a sandbox init did not start: its own `error` line, else its log.
fn start_failure(id: &str, log: &Path, status: &str) -> RuntimeError {
    let reason = if let Some(msg) = status.strip_prefix("error ") {
        msg.to_string()
    } else {
        let log = std::fs::read_to_string(log).unwrap_or_default();
        let log = log.trim();
        if log.is_empty() {
            "sandbox init exited without reporting".to_string()
        } else {
            format!("sandbox init failed: {log}")
        }
    };
    RuntimeError::StartFailed {
        id: id.to_string(),
        reason,
    }
}

fn prof(stage: &str, t0: &std::time::Instant) {
    tracing::debug!(
        stage,
        elapsed_us = t0.elapsed().as_micros() as u64,
        "sandbox create"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_configs_differ_per_data_dir_and_fit_interface_names() {
        let a = LinuxRuntimeConfig::derived("/var/lib/warren".into(), "/x".into());
        let b = LinuxRuntimeConfig::derived("/tmp/other".into(), "/x".into());
        assert_ne!(a.name_prefix, b.name_prefix);
        assert!(a.bridge.len() <= 15);
        assert_eq!(a.subnet.1, 20);
        let first = u32::from(Ipv4Addr::new(10, 200, 0, 0));
        let last = u32::from(Ipv4Addr::new(10, 207, 255, 255));
        assert!((first..=last).contains(&u32::from(a.subnet.0)));
        // Every derived uid pool fits above 2^31 and below (uid_t)-1.
        for c in [&a, &b] {
            assert!(c.uid_base >= 1 << 31);
            userns::IdPool::new(c.uid_base, c.uid_ranges).expect("derived uid pool is valid");
        }
        // Host veth names: prefix (4) + 'h' + 8 = 13 bytes.
        assert_eq!(format!("{}h{}", a.name_prefix, "abcdefgh").len(), 13);
    }

    #[test]
    fn start_ticks_of_self() {
        assert!(start_ticks(std::process::id()).is_some());
    }

    #[test]
    fn ids_are_validated() {
        assert!(valid_id("abc123"));
        assert!(!valid_id("ABC"));
        assert!(!valid_id("a-b"));
        assert!(!valid_id(""));
        assert!(!valid_id("../x"));
    }
}
