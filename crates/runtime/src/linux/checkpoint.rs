//! Hibernation with CRIU: dump a sandbox's whole process tree (PID 1 = the sandbox init) to disk
//! and restore it later into the same cgroups, overlay root and network namespace.
//!
//! We drive the `criu` binary rather than its RPC (`rust-criu`): the command line is what the
//! machine notes verified on this kernel, the restore needs a custom pre-exec step (join the
//! sandbox's cgroups, mount its overlay root in a private mount namespace) that the RPC's
//! `criu swrk` child cannot take, and it spares a pinned `protobuf` dependency.
//!
//! What a dump needs from the sandbox (provided by [`crate::init`]): no host file descriptor
//! inside, PID 1 a session leader, and every mapped file resolvable in the sandbox's mount
//! namespace (so init runs from [`crate::init::IN_SANDBOX_BINARY`], not from a host path).
//!
//! Layout under `<data>/sandboxes/<id>/`:
//! * `rootfs.json`: the overlay layers and read-only binds, to mount the same root on wake;
//! * `netns`: a bind mount of the sandbox's network namespace while no process holds it, so the
//!   veth, address and firewall state survive the hibernation (and a daemon restart);
//! * `checkpoint/`: the CRIU images and logs.

use crate::{BindMount, CheckpointStats, IdRange, RuntimeError};
use serde::{Deserialize, Serialize};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a dump or restore may take before it is abandoned.
const CRIU_TIMEOUT: Duration = Duration::from_secs(120);
/// CRIU's key for the sandbox's network namespace, which stays outside the images.
const NETNS_KEY: &str = "warren-netns";
/// The fd number the network namespace gets in the restoring `criu` process.
const NETNS_FD: i32 = 100;

/// How a sandbox's root filesystem is assembled, recorded at create for restores.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RootfsRecord {
    pub lower_dirs: Vec<PathBuf>,
    pub upper_dir: PathBuf,
    pub work_dir: PathBuf,
    pub rootfs_dir: PathBuf,
    pub ro_binds: Vec<BindMount>,
}

impl RootfsRecord {
    pub fn path(sandbox_dir: &Path) -> PathBuf {
        sandbox_dir.join("rootfs.json")
    }

    pub fn save(&self, sandbox_dir: &Path) -> Result<(), RuntimeError> {
        let path = Self::path(sandbox_dir);
        let json = serde_json::to_vec_pretty(self).expect("rootfs record serializes");
        std::fs::write(&path, json).map_err(|e| RuntimeError::io("write", &path, e))
    }

    pub fn load(sandbox_dir: &Path) -> Result<Self, RuntimeError> {
        let path = Self::path(sandbox_dir);
        let bytes = std::fs::read(&path).map_err(|e| RuntimeError::io("read", &path, e))?;
        serde_json::from_slice(&bytes).map_err(|e| {
            RuntimeError::io(
                "parse",
                &path,
                std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            )
        })
    }
}

/// The `criu` binary this host can use, or why there is none.
#[derive(Debug, Clone)]
pub enum CriuSupport {
    Available(PathBuf),
    Unavailable(String),
}

impl CriuSupport {
    /// Finds `criu` (`$WARREN_CRIU`, /usr/local/sbin/criu, then `$PATH`) and runs `criu check`.
    pub fn detect() -> CriuSupport {
        let candidates: Vec<PathBuf> = std::env::var_os("WARREN_CRIU")
            .map(PathBuf::from)
            .into_iter()
            .chain([PathBuf::from("/usr/local/sbin/criu")])
            .chain(
                std::env::var_os("PATH")
                    .map(|p| {
                        std::env::split_paths(&p)
                            .map(|d| d.join("criu"))
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default(),
            )
            .collect();
        let Some(bin) = candidates.into_iter().find(|p| p.is_file()) else {
            return CriuSupport::Unavailable(
                "criu is not installed (scripts/install-criu.sh builds CRIU 4.1.1)".into(),
            );
        };
        keep_kdat_cache();
        match std::process::Command::new(&bin).arg("check").output() {
            Ok(out) if out.status.success() => {
                warn_if_unpatched(&bin);
                CriuSupport::Available(bin)
            }
            Ok(out) => {
                let text = String::from_utf8_lossy(&out.stderr).to_string()
                    + &String::from_utf8_lossy(&out.stdout);
                let errors: Vec<&str> = text.lines().filter(|l| l.contains("Error")).collect();
                CriuSupport::Unavailable(format!(
                    "`{} check` fails on this kernel: {}",
                    bin.display(),
                    if errors.is_empty() {
                        text.trim().to_string()
                    } else {
                        errors.join("; ")
                    }
                ))
            }
            Err(e) => CriuSupport::Unavailable(format!("cannot run {}: {e}", bin.display())),
        }
    }

    pub fn binary(&self) -> Result<&Path, RuntimeError> {
        match self {
            CriuSupport::Available(p) => Ok(p),
            CriuSupport::Unavailable(why) => Err(RuntimeError::CheckpointUnavailable(why.clone())),
        }
    }
}

/// Where our CRIU build keeps its kernel-feature cache (`make RUNDIR=`, scripts/install-criu.sh).
const KDAT_DIR: &str = "/run/criu";

/// The patches `scripts/install-criu.sh` builds CRIU with, in its order (file names sorted).
const CRIU_PATCHES: &[&str] = &[
    include_str!("../../../../scripts/criu-patches/0001-sockets-so-passcred-eopnotsupp.patch"),
    include_str!(
        "../../../../scripts/criu-patches/0002-rlimits-from-proc-without-cap-sys-resource.patch"
    ),
    include_str!(
        "../../../../scripts/criu-patches/0003-userns-check-opens-namespaces-in-the-parent.patch"
    ),
];

/// Warns when the CRIU that `scripts/install-criu.sh` installed was built from another patch set
/// (its stamp holds the sha256 of the patches, concatenated): an older build dumps sandboxes in
/// user namespaces once, but not again after a wake or a fork (patch 0003). Nothing to compare
/// for a CRIU from elsewhere (`$WARREN_CRIU`, `$PATH`).
fn warn_if_unpatched(bin: &Path) {
    use sha2::Digest;
    if bin != Path::new("/usr/local/sbin/criu") {
        return;
    }
    let Ok(stamp) = std::fs::read_to_string("/usr/local/share/warren/criu.stamp") else {
        return;
    };
    let mut h = sha2::Sha256::new();
    for p in CRIU_PATCHES {
        h.update(p.as_bytes());
    }
    let want: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if stamp.split_whitespace().last() != Some(want.as_str()) {
        tracing::warn!(
            "{} was built from other patches than this warren's scripts/criu-patches: run \
             scripts/install-criu.sh (without them a woken or forked sandbox in a user namespace \
             cannot be hibernated or checkpointed again)",
            bin.display()
        );
    }
}

/// CRIU probes the kernel's features on every run (about 100 ms, paid by every dump and restore)
/// unless it can cache them on a tmpfs, which `/run` is not on every host. Mounts a 1 MiB tmpfs,
/// root-only, at [`KDAT_DIR`] when it is not one yet. Best effort: without it CRIU only runs
/// slower.
fn keep_kdat_cache() {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let dir = Path::new(KDAT_DIR);
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let c = cstr(dir);
    // SAFETY: statfs and mount with valid C strings and a zeroed out-parameter.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        if libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == TMPFS_MAGIC {
            return;
        }
        if libc::mount(
            c"criu-kdat".as_ptr(),
            c.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            c"size=1m,mode=0700".as_ptr().cast(),
        ) != 0
        {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "no tmpfs for CRIU's feature cache; dumps and restores probe the kernel each time"
            );
        }
    }
}

fn criu_failed(id: &str, op: &'static str, log: &Path, what: &str) -> RuntimeError {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    // The RLIMIT_NOFILE line is logged on every run where CAP_SYS_RESOURCE is missing, and
    // is harmless; the first other errors say what went wrong.
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error") && !l.contains("RLIMIT_NOFILE"))
        .take(4)
        .collect();
    RuntimeError::Checkpoint {
        id: id.to_string(),
        op,
        reason: if errors.is_empty() {
            format!("{what} (log: {})", log.display())
        } else {
            format!("{what}: {} (log: {})", errors.join(" | "), log.display())
        },
    }
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

/// Keeps the network namespace of `pid` alive at `<dir>/netns` (a bind mount). Idempotent.
pub fn pin_netns(id: &str, pid: u32, dir: &Path) -> Result<PathBuf, RuntimeError> {
    let target = dir.join("netns");
    if is_nsfs(&target) {
        return Ok(target);
    }
    std::fs::File::create(&target).map_err(|e| RuntimeError::io("create", &target, e))?;
    let source = PathBuf::from(format!("/proc/{pid}/ns/net"));
    let (s, t) = (cstr(&source), cstr(&target));
    // SAFETY: valid C strings; a plain bind mount.
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(RuntimeError::sys(
            "bind-mount network namespace",
            id,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(target)
}

/// Releases the bind mount made by [`pin_netns`]. Idempotent.
pub fn unpin_netns(dir: &Path) {
    let target = dir.join("netns");
    let t = cstr(&target);
    // SAFETY: valid C string; EINVAL/ENOENT (not mounted) are fine.
    unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
    let _ = std::fs::remove_file(&target);
}

/// Drops the images (and the network namespace pin) of a sandbox whose tree runs again: they
/// are spent. Unlinking a large image takes longer than a restore, so it happens in the
/// background, after a rename.
pub fn release_spent_images(sandbox_dir: &Path) {
    unpin_netns(sandbox_dir);
    let images = images_dir(sandbox_dir);
    if !images.exists() {
        return;
    }
    static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let spent = sandbox_dir.join(format!("checkpoint.spent.{}.{n}", std::process::id()));
    if std::fs::rename(&images, &spent).is_ok() {
        std::thread::spawn(move || {
            let _ = std::fs::remove_dir_all(spent);
        });
    }
}

/// Whether `path` is a pinned namespace (nsfs), not the empty file under it.
pub fn is_nsfs(path: &Path) -> bool {
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    let c = cstr(path);
    // SAFETY: statfs on a valid C string into a zeroed out-parameter.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == NSFS_MAGIC
    }
}

/// Where a sandbox's images are.
pub fn images_dir(sandbox_dir: &Path) -> PathBuf {
    sandbox_dir.join("checkpoint")
}

/// Whether a complete hibernation image exists for the sandbox.
pub fn has_images(sandbox_dir: &Path) -> bool {
    images_dir(sandbox_dir).join("inventory.img").is_file()
}

/// Dumps the process tree of `init_pid` to `<dir>/checkpoint`. With `leave_running` the tree
/// carries on afterwards; otherwise CRIU kills it once the images are complete. On failure the
/// tree is left running as before and no image directory is left.
pub async fn dump(
    criu: &Path,
    id: &str,
    init_pid: u32,
    dir: &Path,
    freezer: Option<&Path>,
    leave_running: bool,
) -> Result<CheckpointStats, RuntimeError> {
    let record = RootfsRecord::load(dir)?;
    pin_netns(id, init_pid, dir)?;
    dump_into(DumpTarget {
        criu,
        id,
        init_pid,
        record: &record,
        images: &images_dir(dir),
        failed_log: &dir.join("dump-failed.log"),
        freezer,
        leave_running,
    })
    .await
}

/// What [`dump_into`] dumps, and where.
pub struct DumpTarget<'a> {
    pub criu: &'a Path,
    pub id: &'a str,
    pub init_pid: u32,
    /// The sandbox's root, for its external bind mounts.
    pub record: &'a RootfsRecord,
    /// Where the images go; written as `<images>.partial` and renamed when complete.
    pub images: &'a Path,
    /// Where the log of a failed dump is kept.
    pub failed_log: &'a Path,
    pub freezer: Option<&'a Path>,
    pub leave_running: bool,
}

/// Dumps a sandbox's tree to `t.images`, its network namespace kept outside the images (the
/// restore hands it one). Nothing is left at `t.images` on failure.
pub async fn dump_into(t: DumpTarget<'_>) -> Result<CheckpointStats, RuntimeError> {
    let DumpTarget {
        criu,
        id,
        init_pid,
        record,
        images,
        failed_log,
        freezer,
        leave_running,
    } = t;
    let t0 = Instant::now();
    let partial = images.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(|e| RuntimeError::io("mkdir", &partial, e))?;
    let netns = PathBuf::from(format!("/proc/{init_pid}/ns/net"));
    let netns_ino = std::fs::metadata(&netns)
        .map_err(|e| RuntimeError::io("stat", &netns, e))?
        .ino();

    // A sandbox in a user namespace of its own: its network namespace belongs to that user
    // namespace, which a restore makes anew, and a namespace made anew cannot enter one owned by
    // another. So its network namespace is not kept as an external one, but dumped empty
    // (`--empty-ns net`: no interfaces, addresses or firewall are recorded) and made anew by the
    // restore, which then moves the sandbox's eth0 into it (see [`restore_into`]).
    let in_userns = {
        let f = std::fs::File::open(&netns).map_err(|e| RuntimeError::io("open", &netns, e))?;
        owning_userns(f.as_raw_fd())
            .map_err(|e| RuntimeError::io("NS_GET_USERNS", &netns, e))?
            .is_some()
    };

    let mut cmd = tokio::process::Command::new(criu);
    cmd.arg("dump")
        .arg("--tree")
        .arg(init_pid.to_string())
        .arg("--images-dir")
        .arg(&partial)
        .args(["--log-file", "dump.log", "-v2"])
        // Connections (e.g. the daemon's keep-alive ones to envd) end with the hibernation;
        // listening sockets are kept.
        .arg("--tcp-close")
        // Nothing to lock: connections are closed, not carried over, and no process runs in
        // the namespace while it is hibernated. CRIU's lock runs iptables (~50 ms each way).
        .args(["--network-lock", "skip"])
        .arg("--manage-cgroups=ignore");
    if in_userns {
        cmd.args(["--empty-ns", "net"]);
    } else {
        cmd.arg("--external")
            .arg(format!("net[{netns_ino}]:{NETNS_KEY}"));
    }
    for (i, bind) in record.ro_binds.iter().enumerate() {
        cmd.arg("--external")
            .arg(format!("mnt[{}]:bind{i}", bind.target.display()));
    }
    for (mountpoint, key) in host_device_binds(init_pid) {
        cmd.arg("--external")
            .arg(format!("mnt[{mountpoint}]:{key}"));
    }
    if let Some(f) = freezer {
        cmd.arg("--freeze-cgroup").arg(f);
    }
    if leave_running {
        cmd.arg("--leave-running");
    }
    let status = run(&mut cmd, id, "dump").await;
    match status {
        Ok(true) => {}
        Ok(false) => {
            // The log outlives the partial images, for whoever reads the error.
            let _ = std::fs::rename(partial.join("dump.log"), failed_log);
            let e = criu_failed(id, "dump", failed_log, "criu dump failed");
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e);
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e);
        }
    }
    let _ = std::fs::remove_dir_all(images);
    std::fs::rename(&partial, images).map_err(|e| RuntimeError::io("rename", &partial, e))?;
    Ok(CheckpointStats {
        bytes: dir_size(images),
        duration: t0.elapsed(),
    })
}

/// Device nodes a sandbox in a user namespace has bound from the host's `/dev` (it cannot make
/// them, see `crate::init`), also over masked `/proc` files: CRIU cannot dump a bind of a file
/// system the tree has no mount of, so they are external mounts, keyed by the device's name and
/// bound again from the host's `/dev` on restore ([`HOST_DEVICES`]). `(mountpoint, key)` pairs
/// from the init's mountinfo; none for a sandbox without a user namespace (its `/dev` nodes
/// live on its own tmpfs).
fn host_device_binds(init_pid: u32) -> Vec<(String, String)> {
    let info = std::fs::read_to_string(format!("/proc/{init_pid}/mountinfo")).unwrap_or_default();
    info.lines()
        .filter_map(|line| {
            // "id parent maj:min root mountpoint opts [optional...] - fstype source superopts"
            let (left, right) = line.split_once(" - ")?;
            let fields: Vec<&str> = left.split(' ').collect();
            let (root, mountpoint) = (*fields.get(3)?, *fields.get(4)?);
            let fstype = right.split(' ').next()?;
            let name = root.strip_prefix('/')?;
            (fstype == "devtmpfs" && HOST_DEVICES.contains(&name))
                .then(|| (mountpoint.to_string(), device_key(name)))
        })
        .collect()
}

/// The host devices a sandbox in a user namespace binds (`crate::init::populate_dev`).
const HOST_DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

fn device_key(name: &str) -> String {
    format!("dev-{name}")
}

/// The user namespace owning the namespace `ns`, unless it is the daemon's own.
pub fn owning_userns(ns: i32) -> std::io::Result<Option<OwnedFd>> {
    const NS_GET_USERNS: libc::c_ulong = 0xb701; // _IO(0xb7, 0x1)
                                                 // SAFETY: the ioctl takes no argument and returns a new descriptor or -1.
    let fd = unsafe { libc::ioctl(ns, NS_GET_USERNS) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned here.
    let owner = unsafe { OwnedFd::from_raw_fd(fd) };
    let ino = |p: &Path| std::fs::metadata(p).map(|m| m.ino());
    let own = ino(Path::new("/proc/self/ns/user"))?;
    let theirs = ino(Path::new(&format!("/proc/self/fd/{fd}")))?;
    Ok((own != theirs).then_some(owner))
}

/// What a restore needs that the runtime holds.
pub struct RestoreTarget<'a> {
    pub criu: &'a Path,
    pub id: &'a str,
    pub dir: &'a Path,
    /// The sandbox's `cgroup.procs` files: criu joins them first, so the restored tree is
    /// charged to and limited by the sandbox's cgroups.
    pub cgroup_procs: &'a [PathBuf],
    /// A sandbox in a user namespace: its range and its address (see [`RestoreInto::userns`]).
    pub userns: Option<(IdRange, crate::init::InitNet)>,
}

/// Restores the tree dumped in `<dir>/checkpoint` into the pinned network namespace, the
/// sandbox's cgroups and a fresh mount of its overlay root. Returns the host pid of the new init.
pub async fn restore(t: RestoreTarget<'_>) -> Result<u32, RuntimeError> {
    let RestoreTarget {
        criu,
        id,
        dir,
        cgroup_procs,
        userns,
    } = t;
    let record = RootfsRecord::load(dir)?;
    let images = images_dir(dir);
    if !has_images(dir) {
        return Err(RuntimeError::Checkpoint {
            id: id.to_string(),
            op: "restore",
            reason: format!("no complete image in {}", images.display()),
        });
    }
    let netns_path = dir.join("netns");
    if !is_nsfs(&netns_path) {
        return Err(RuntimeError::Checkpoint {
            id: id.to_string(),
            op: "restore",
            reason: format!("network namespace {} is gone", netns_path.display()),
        });
    }
    let netns = OwnedFd::from(
        std::fs::File::open(&netns_path).map_err(|e| RuntimeError::io("open", &netns_path, e))?,
    );
    drop_orphan_sockets(id, netns.as_raw_fd()).await?;
    restore_into(RestoreInto {
        criu,
        id,
        images: &images,
        work_dir: None,
        record: &record,
        netns: netns.as_raw_fd(),
        cgroup_procs,
        pidfile: &dir.join("restore.pid"),
        userns,
    })
    .await
}

/// What [`restore_into`] restores, and where to.
pub struct RestoreInto<'a> {
    pub criu: &'a Path,
    pub id: &'a str,
    pub images: &'a Path,
    /// Where CRIU writes its log; `None`: the images dir. Restores that share one images dir
    /// (forks of a checkpoint) each need their own.
    pub work_dir: Option<&'a Path>,
    /// The root to mount for the restored tree.
    pub record: &'a RootfsRecord,
    /// The network namespace the tree gets (stays open for the call). For a tree dumped in a
    /// user namespace of its own, the namespace whose `eth0` (with its veth peer on the bridge)
    /// moves into the one the restore makes.
    pub netns: i32,
    pub cgroup_procs: &'a [PathBuf],
    pub pidfile: &'a Path,
    /// For a tree dumped in a user namespace of its own: the id range of the one it is restored
    /// into, and the address `eth0` gets there. Must be `Some` exactly for such images.
    pub userns: Option<(IdRange, crate::init::InitNet)>,
}

/// The protobuf of CRIU's `userns_entry` for a one-extent mapping of `range` (uid and gid maps
/// alike): `repeated uid_gid_extent uid_map = 1, gid_map = 2`, each extent
/// `{first = 1, lower_first = 2, count = 3}`.
fn userns_entry(range: &IdRange) -> Vec<u8> {
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    let mut extent = Vec::new();
    for (tag, v) in [
        (0x08, 0u64),
        (0x10, range.host_base as u64),
        (0x18, range.count as u64),
    ] {
        extent.push(tag);
        varint(v, &mut extent);
    }
    let mut entry = Vec::new();
    for tag in [0x0a, 0x12] {
        entry.push(tag);
        varint(extent.len() as u64, &mut entry);
        entry.extend_from_slice(&extent);
    }
    entry
}

/// The images to restore with the user namespace mapping `range`: CRIU makes the restored tree's
/// user namespace from the mapping it recorded, which for a fork is the source sandbox's range,
/// and every sandbox must have a range of its own. When the mapping differs, `scratch` is made
/// a copy of `images` of hard links but for the user namespace image, written anew (two magic
/// words, then one length-prefixed entry), so that forks of one checkpoint restored at the same
/// time each get their own; `images` itself is never changed.
fn images_for_range(
    images: &Path,
    range: &IdRange,
    scratch: &Path,
) -> Result<PathBuf, RuntimeError> {
    let entries: Vec<PathBuf> = std::fs::read_dir(images)
        .map_err(|e| RuntimeError::io("read", images, e))?
        .flatten()
        .map(|e| e.path())
        .collect();
    let is_userns = |p: &Path| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("userns-"))
    };
    let Some(path) = entries.iter().find(|p| is_userns(p)) else {
        return Ok(images.to_path_buf());
    };
    let bytes = std::fs::read(path).map_err(|e| RuntimeError::io("read", path, e))?;
    let bad = || {
        RuntimeError::io(
            "parse",
            path,
            std::io::Error::other("not a CRIU user namespace image with one entry"),
        )
    };
    if bytes.len() < 12 {
        return Err(bad());
    }
    let len = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
    if bytes.len() != 12 + len {
        return Err(bad());
    }
    let entry = userns_entry(range);
    if bytes[12..] == entry[..] {
        return Ok(images.to_path_buf());
    }
    let mut out = bytes[..8].to_vec();
    out.extend_from_slice(&(entry.len() as u32).to_le_bytes());
    out.extend_from_slice(&entry);
    let _ = std::fs::remove_dir_all(scratch);
    std::fs::create_dir_all(scratch).map_err(|e| RuntimeError::io("mkdir", scratch, e))?;
    for p in &entries {
        let name = p.file_name().unwrap_or_default();
        let target = scratch.join(name);
        if is_userns(p) {
            std::fs::write(&target, &out).map_err(|e| RuntimeError::io("write", &target, e))?;
        } else {
            // Hard links (CRIU does not follow symlinked page images); a copy across file
            // systems.
            std::fs::hard_link(p, &target)
                .or_else(|_| std::fs::copy(p, &target).map(|_| ()))
                .map_err(|e| RuntimeError::io("link", &target, e))?;
        }
    }
    Ok(scratch.to_path_buf())
}

/// Where a restore of a sandbox in a user namespace attaches its idmapped binds for criu (see
/// [`restore_into`]): `<dir>/<sandbox id>/bind<i>`.
const CRIU_BINDS_DIR: &str = "/run/warren-criu-binds";

/// Whether the images hold a user namespace of their own (the tree was dumped in one).
pub fn images_have_userns(images: &Path) -> bool {
    std::fs::read_dir(images)
        .map(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("userns-"))
        })
        .unwrap_or(false)
}

/// Run by criu (`--action-script`) once the restored init is in its new namespaces: hands the
/// init's pid to the daemon, which moves the sandbox's `eth0` from the namespace that holds it
/// into the init's new network namespace and configures it there ([`serve_netns_setup`]), and
/// waits for its answer. Both ends are pipes of the daemon, reached through its `/proc/PID/fd`:
/// if the daemon is gone, opening the first fails and reading the second ends, so the script
/// (and criu) never wait for nobody. Only shell builtins: no process besides the shell.
const SETUP_NETNS_SCRIPT: &str = r#"#!/bin/sh
[ "$CRTOOLS_SCRIPT_ACTION" = setup-namespaces ] || exit 0
echo "$CRTOOLS_INIT_PID" > "$WARREN_NETNS_ASK" || exit 1
read -r answer < "$WARREN_NETNS_DONE" || exit 1
[ "$answer" = ok ]
"#;

/// How long the daemon may take to move and configure `eth0` once the action script asked.
const NETNS_SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// The daemon's ends of the handshake with [`SETUP_NETNS_SCRIPT`] for one restore.
struct NetnsHandshake {
    /// The script writes the init's pid into `ask.1`; the daemon reads it from `ask.0`.
    ask: (
        tokio::net::unix::pipe::Receiver,
        tokio::net::unix::pipe::Sender,
    ),
    /// The daemon writes its answer into `done.1`; the script reads it from `done.0`.
    done: (
        tokio::net::unix::pipe::Receiver,
        tokio::net::unix::pipe::Sender,
    ),
}

impl NetnsHandshake {
    fn new(id: &str) -> Result<Self, RuntimeError> {
        let pipe = || {
            tokio::net::unix::pipe::pipe()
                .map(|(tx, rx)| (rx, tx))
                .map_err(|e| RuntimeError::sys("make the network setup pipes", id, e))
        };
        Ok(NetnsHandshake {
            ask: pipe()?,
            done: pipe()?,
        })
    }

    /// The paths the script opens: `(ask, done)`.
    fn paths(&self) -> (String, String) {
        let me = std::process::id();
        (
            format!("/proc/{me}/fd/{}", self.ask.1.as_raw_fd()),
            format!("/proc/{me}/fd/{}", self.done.0.as_raw_fd()),
        )
    }
}

/// The daemon's side of [`SETUP_NETNS_SCRIPT`]: waits for the restored init's pid, moves `eth0`
/// from `from` into its network namespace and configures it ([`super::net::move_eth0`]), and
/// answers `ok` or `fail`. Waits for the pid as long as criu runs (the caller stops waiting when
/// it ends); the setup itself is bounded by [`NETNS_SETUP_TIMEOUT`].
async fn serve_netns_setup(
    hs: &mut NetnsHandshake,
    id: &str,
    from: i32,
    net: crate::init::InitNet,
) -> Result<(), RuntimeError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let failed = |reason: String| RuntimeError::Checkpoint {
        id: id.to_string(),
        op: "restore",
        reason,
    };
    let mut line = Vec::new();
    let mut buf = [0u8; 32];
    while !line.contains(&b'\n') {
        let n = hs.ask.0.read(&mut buf).await.map_err(|e| {
            failed(format!(
                "reading the restored init's pid from criu's script: {e}"
            ))
        })?;
        if n == 0 || line.len() > 64 {
            return Err(failed("criu's action script sent no pid".into()));
        }
        line.extend_from_slice(&buf[..n]);
    }
    let setup = async {
        let pid: u32 = std::str::from_utf8(&line)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| {
                failed(format!(
                    "criu's action script sent {:?}, not a pid",
                    String::from_utf8_lossy(&line)
                ))
            })?;
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        let to = OwnedFd::from(
            std::fs::File::open(&path).map_err(|e| RuntimeError::io("open", &path, e))?,
        );
        match tokio::time::timeout(NETNS_SETUP_TIMEOUT, super::net::move_eth0(from, to, net)).await
        {
            Ok(r) => r,
            Err(_) => Err(failed(format!(
                "moving and configuring eth0 took longer than {}s",
                NETNS_SETUP_TIMEOUT.as_secs()
            ))),
        }
    };
    let result = setup.await.map_err(|e| match e {
        e @ RuntimeError::Checkpoint { .. } => e,
        e => failed(format!("network setup of the restored tree: {e}")),
    });
    let answer: &[u8] = if result.is_ok() { b"ok\n" } else { b"fail\n" };
    // The pipe is empty and the answer far below its size: this write does not wait. If it fails
    // the script sees no `ok` and criu fails the restore.
    let _ = hs.done.1.write_all(answer).await;
    result
}

/// Restores the tree of `t.images` into the network namespace `t.netns`, the cgroups of
/// `t.cgroup_procs` and a fresh mount of the overlay root `t.record`. Returns the new init's
/// host pid.
pub async fn restore_into(t: RestoreInto<'_>) -> Result<u32, RuntimeError> {
    let RestoreInto {
        criu,
        id,
        images,
        work_dir,
        record,
        netns,
        cgroup_procs,
        pidfile,
        userns,
    } = t;
    let _ = std::fs::remove_file(pidfile);
    std::fs::create_dir_all(&record.rootfs_dir)
        .map_err(|e| RuntimeError::io("mkdir", &record.rootfs_dir, e))?;
    let options =
        crate::init::overlay_options(&record.lower_dirs, &record.upper_dir, &record.work_dir);
    let here = pidfile.parent().unwrap_or(Path::new("/"));
    let scratch_images = here.join(".criu-images");
    let mut images = images.to_path_buf();
    if userns.is_some() != images_have_userns(&images) {
        return Err(RuntimeError::Checkpoint {
            id: id.to_string(),
            op: "restore",
            reason: if userns.is_some() {
                "the checkpoint was made without user namespaces; restore it with a daemon \
                 started with --user-namespaces=false"
            } else {
                "the checkpoint was made in a user namespace; restore it with a daemon that \
                 runs sandboxes in user namespaces (the default)"
            }
            .into(),
        });
    }
    // In a user namespace, the root and the read-only binds are idmapped mounts (as at create,
    // see `super::userns`), made through a namespace of the same mapping (an idmapping is its
    // mapping, whichever namespace carries it), and attached in criu's mount namespace, from
    // where criu takes them for the tree. The images get the range of the namespace to make.
    let mut bind_paths = Vec::new();
    let mounts = match &userns {
        Some((range, _)) => {
            // CRIU opens the bind sources with the restored tree's host ids, which need not be
            // able to search the data dir: the mount points are in a world-searchable dir (empty
            // on the host: the binds are attached in criu's mount namespace only).
            let top = Path::new(CRIU_BINDS_DIR).join(id);
            for i in 0..record.ro_binds.len() {
                let p = top.join(format!("bind{i}"));
                std::fs::create_dir_all(&p).map_err(|e| RuntimeError::io("mkdir", &p, e))?;
                std::fs::set_permissions(&top, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                    .map_err(|e| RuntimeError::io("chmod", &top, e))?;
                bind_paths.push(p);
            }
            images = images_for_range(&images, range, &scratch_images)?;
            let made = super::userns::new_userns(range, false)?;
            let (range, record) = (*range, record.clone());
            let m = tokio::task::spawn_blocking(move || {
                super::userns::prepare_mounts(
                    &range,
                    made.userns,
                    netns,
                    &record.lower_dirs,
                    &record.upper_dir,
                    &record.work_dir,
                    &record.ro_binds,
                )
            })
            .await
            .expect("mount preparation does not panic")?;
            Some(m)
        }
        None => None,
    };
    let root_fd = mounts.as_ref().map(|m| m.rootfs.as_raw_fd()).unwrap_or(-1);
    let bind_fds: Vec<(i32, CString)> = match &mounts {
        Some(m) => m
            .binds
            .iter()
            .zip(&bind_paths)
            .filter_map(|(fd, p)| fd.as_ref().map(|fd| (fd.as_raw_fd(), cstr(p))))
            .collect(),
        None => Vec::new(),
    };

    // Everything the child touches is prepared before fork.
    let mut procs_fds = Vec::new();
    for p in cgroup_procs {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .map_err(|e| RuntimeError::io("open", p, e))?;
        procs_fds.push(OwnedFd::from(f));
    }
    let raw_procs: Vec<i32> = procs_fds.iter().map(|f| f.as_raw_fd()).collect();
    let root_c = cstr(&record.rootfs_dir);
    let options_c = CString::new(options).unwrap_or_default();
    let netns_fd = netns;

    let mut cmd = tokio::process::Command::new(criu);
    cmd.arg("restore")
        .arg("--images-dir")
        .arg(&images)
        .args(["--log-file", "restore.log", "-v2"]);
    if let Some(w) = work_dir {
        cmd.arg("--work-dir").arg(w);
    }
    cmd.arg("--root")
        .arg(&record.rootfs_dir)
        .arg("--restore-detached")
        .arg("--pidfile")
        .arg(pidfile)
        .arg("--tcp-close")
        .arg("--manage-cgroups=ignore");
    let mut handshake = None;
    match &userns {
        Some((_, net)) => {
            let script = here.join("setup-netns.sh");
            std::fs::write(&script, SETUP_NETNS_SCRIPT)
                .and_then(|_| {
                    std::fs::set_permissions(
                        &script,
                        std::os::unix::fs::PermissionsExt::from_mode(0o700),
                    )
                })
                .map_err(|e| RuntimeError::io("write", &script, e))?;
            let hs = NetnsHandshake::new(id)?;
            let (ask, done) = hs.paths();
            cmd.args(["--empty-ns", "net"])
                .arg("--action-script")
                .arg(&script)
                .env("WARREN_NETNS_ASK", ask)
                .env("WARREN_NETNS_DONE", done);
            handshake = Some((hs, net.clone()));
        }
        None => {
            cmd.arg("--inherit-fd")
                .arg(format!("fd[{NETNS_FD}]:{NETNS_KEY}"));
        }
    }
    for (i, bind) in record.ro_binds.iter().enumerate() {
        // Idmapped in a user namespace (attached in criu's mount namespace below).
        let source = match mounts.as_ref().and_then(|m| m.binds[i].as_ref()) {
            Some(_) => bind_paths[i].clone(),
            None => bind.source.clone(),
        };
        cmd.arg("--external")
            .arg(format!("mnt[bind{i}]:{}", source.display()));
    }
    // Keys a tree without host device binds does not use are ignored.
    for name in HOST_DEVICES {
        cmd.arg("--external")
            .arg(format!("mnt[{}]:/dev/{name}", device_key(name)));
    }
    // SAFETY: the closure makes only async-signal-safe syscalls (write, unshare, mount, dup2) on
    // values prepared before fork, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            for fd in &raw_procs {
                if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // The overlay exists only in this criu's own mount namespace (and, after the
            // restore, in the sandbox's): the daemon's namespace never sees it.
            if libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWCGROUP) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if root_fd >= 0 {
                // The idmapped overlay and binds, detached mounts made by the daemon.
                for (fd, target) in std::iter::once((root_fd, &root_c))
                    .chain(bind_fds.iter().map(|(fd, p)| (*fd, p)))
                {
                    if libc::syscall(
                        libc::SYS_move_mount,
                        fd,
                        c"".as_ptr(),
                        libc::AT_FDCWD,
                        target.as_ptr(),
                        libc::MOVE_MOUNT_F_EMPTY_PATH,
                    ) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
            } else if libc::mount(
                c"overlay".as_ptr(),
                root_c.as_ptr(),
                c"overlay".as_ptr(),
                0,
                options_c.as_ptr().cast(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::dup2(netns_fd, NETNS_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let status = match handshake.as_mut() {
        Some((hs, net)) => {
            let criu_run = run(&mut cmd, id, "restore");
            tokio::pin!(criu_run);
            let serve = serve_netns_setup(hs, id, netns, net.clone());
            tokio::pin!(serve);
            tokio::select! {
                // criu ended without asking (it failed before, or was killed).
                status = &mut criu_run => status,
                served = &mut serve => {
                    let status = criu_run.await;
                    // A failed setup makes the script, and so criu, fail: its error says why.
                    served.and(status)
                }
            }
        }
        None => run(&mut cmd, id, "restore").await,
    };
    drop(handshake);
    drop(procs_fds);
    drop(mounts);
    for p in &bind_paths {
        let _ = std::fs::remove_dir(p);
    }
    if !bind_paths.is_empty() {
        let _ = std::fs::remove_dir(Path::new(CRIU_BINDS_DIR).join(id));
    }
    let log = work_dir.unwrap_or(&images).join("restore.log");
    let failed = match status {
        Ok(true) => None,
        Ok(false) => Some(criu_failed(id, "restore", &log, "criu restore failed")),
        Err(e) => Some(e),
    };
    if images == scratch_images {
        let _ = std::fs::remove_dir_all(&scratch_images);
    }
    if let Some(e) = failed {
        return Err(e);
    }
    let pid = std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .ok_or_else(|| criu_failed(id, "restore", &log, "criu wrote no pid file"))?;
    Ok(pid)
}

/// Destroys the TCP sockets left in a hibernated sandbox's network namespace. No process owns
/// them (connections closing, TIME_WAIT), but the kernel keeps them for up to a minute, and a
/// listener whose program did not set SO_REUSEADDR cannot be bound again over them: the restore
/// would fail with "Address already in use". Uses `ss -K` (SOCK_DESTROY) inside the namespace.
async fn drop_orphan_sockets(id: &str, netns: i32) -> Result<(), RuntimeError> {
    let mut cmd = tokio::process::Command::new("ss");
    cmd.args(["-K", "-t", "-a", "-n"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: setns is async-signal-safe; the descriptor stays open until the child has run.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(netns, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd
        .output()
        .await
        .map_err(|e| RuntimeError::sys("run ss -K in the sandbox network namespace", id, e))?;
    if !out.status.success() {
        return Err(RuntimeError::Checkpoint {
            op: "restore",
            id: id.to_string(),
            reason: format!(
                "ss -K failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}

/// Runs criu with its output in the images dir's log; `Ok(false)` when it exits non-zero.
async fn run(
    cmd: &mut tokio::process::Command,
    id: &str,
    op: &'static str,
) -> Result<bool, RuntimeError> {
    // Usage errors go to stderr before the log file is open: keep them beside the log.
    let stderr = cmd
        .as_std()
        .get_args()
        .skip_while(|a| *a != "--images-dir")
        .nth(1)
        .map(|d| Path::new(d).with_extension("stderr"))
        .and_then(|p| std::fs::File::create(p).ok())
        .map(std::process::Stdio::from)
        .unwrap_or_else(std::process::Stdio::null);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| RuntimeError::sys("spawn criu", id, e))?;
    match tokio::time::timeout(CRIU_TIMEOUT, child.wait()).await {
        Ok(Ok(status)) => Ok(status.success()),
        Ok(Err(e)) => Err(RuntimeError::sys("wait for criu", id, e)),
        Err(_) => {
            let _ = child.kill().await;
            Err(RuntimeError::Checkpoint {
                id: id.to_string(),
                op,
                reason: format!("criu {op} took longer than {}s", CRIU_TIMEOUT.as_secs()),
            })
        }
    }
}

/// Bytes of the files in `dir` (one level: CRIU writes a flat images directory).
pub fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Makes the init binary visible to sandboxes as [`crate::init::IN_SANDBOX_BINARY`]: a layer
/// `<data>/init-layer/<version>/` holding only that file and, in
/// [`crate::init::IN_SANDBOX_LIBS`], its ELF interpreter and shared libraries (so that it also
/// runs in images without them, e.g. busybox), added on top of every sandbox's overlay. The
/// version comes from the binary's size and mtime, so a new build gets a new layer and the
/// layers that sandboxes (running or hibernated) still use are never changed in place.
pub fn prepare_init_layer(data_dir: &Path, binary: &Path) -> Result<PathBuf, RuntimeError> {
    let meta = std::fs::metadata(binary).map_err(|e| RuntimeError::io("stat", binary, e))?;
    // `-l`: layers that carry the libraries (older ones hold only the binary).
    let version = format!(
        "{:x}-{:x}-l",
        meta.len(),
        meta.mtime() as u64 * 1_000_000_000 + meta.mtime_nsec() as u64
    );
    let layer = data_dir.join("init-layer").join(version);
    let inside = layer.join(
        crate::init::IN_SANDBOX_BINARY
            .strip_prefix('/')
            .expect("absolute path"),
    );
    if inside.is_file() {
        return Ok(layer);
    }
    let parent = inside.parent().expect("has a parent");
    std::fs::create_dir_all(parent).map_err(|e| RuntimeError::io("mkdir", parent, e))?;
    let tmp = parent.join(".init.tmp");
    let _ = std::fs::remove_file(&tmp);
    let libs = layer.join(
        crate::init::IN_SANDBOX_LIBS
            .strip_prefix('/')
            .expect("absolute path"),
    );
    std::fs::create_dir_all(&libs).map_err(|e| RuntimeError::io("mkdir", &libs, e))?;
    for (name, host) in shared_objects(binary) {
        let to = libs.join(&name);
        std::fs::copy(&host, &to).map_err(|e| RuntimeError::io("copy", &host, e))?;
    }
    // The binary last: its presence marks the layer complete. A hard link would cost nothing,
    // but a rebuild that rewrites the file in place would then change a lower layer under live
    // overlays; copy instead.
    std::fs::copy(binary, &tmp).map_err(|e| RuntimeError::io("copy", binary, e))?;
    std::fs::rename(&tmp, &inside).map_err(|e| RuntimeError::io("rename", &tmp, e))?;
    Ok(layer)
}

/// The ELF interpreter (named `ld.so`, see [`crate::init::IN_SANDBOX_LOADER`]) and the shared
/// libraries of `binary` on this host, as ldd lists them: (file name in the layer, host path).
/// Empty for a static binary, or when ldd cannot tell (then an image without the libraries
/// runs init from the host path, and cannot be dumped).
fn shared_objects(binary: &Path) -> Vec<(String, PathBuf)> {
    let out = match std::process::Command::new("ldd").arg(binary).output() {
        Ok(o) if o.status.success() => o.stdout,
        Ok(_) => return vec![],
        Err(e) => {
            tracing::warn!(binary = %binary.display(), error = %e, "ldd: the init layer gets no libraries");
            return vec![];
        }
    };
    let mut objects = vec![];
    for line in String::from_utf8_lossy(&out).lines() {
        // `libc.so.6 => /lib/.../libc.so.6 (0x…)`, or the interpreter: `/lib64/ld-….so.2 (0x…)`.
        let (library, path) = match line.trim().split_once("=>") {
            Some((_, right)) => (true, right),
            None => (false, line),
        };
        let path = path.split(" (").next().unwrap_or("").trim();
        let host = PathBuf::from(path);
        let name = match host.file_name() {
            _ if !path.starts_with('/') => continue,
            Some(file) if library => file.to_string_lossy().into_owned(),
            Some(_) => "ld.so".to_string(),
            None => continue,
        };
        objects.push((name, host));
    }
    objects
}

/// Ends a wake that a restart cut short before it was recorded: waits for a CRIU restore that
/// may still run, then kills the tree it left in sandbox `id`'s cgroup, since nothing
/// acknowledged it; the images, still complete, restore it again on the next wake. Returns
/// whether there was a tree to kill.
pub async fn end_unrecorded_wake(
    cg: &super::cgroup::CgroupManager,
    id: &str,
    dir: &Path,
) -> Result<bool, RuntimeError> {
    settle_interrupted_restore(id, dir).await?;
    if !cg.populated(id) {
        return Ok(false);
    }
    let (cg, id_owned) = (cg.clone(), id.to_string());
    tokio::task::spawn_blocking(move || cg.kill_all(&id_owned))
        .await
        .expect("kill task does not panic")?;
    Ok(true)
}

/// Settles a dump that a daemon crash interrupted. CRIU is deliberately not killed with the
/// daemon: killed mid-dump it could leave its parasite code in the sandbox's processes. So after
/// a restart a CRIU may still be dumping into `<dir>/checkpoint.partial`: wait for it, then keep
/// its images if it finished (CRIU writes `stats-dump` only after a successful dump, once the
/// tree is killed) or drop them otherwise. Returns whether complete images now exist.
pub async fn settle_interrupted_dump(id: &str, dir: &Path) -> Result<bool, RuntimeError> {
    let partial = dir.join("checkpoint.partial");
    if !partial.exists() {
        return Ok(has_images(dir));
    }
    let deadline = Instant::now() + CRIU_TIMEOUT;
    while criu_writing_to(&partial) {
        if Instant::now() >= deadline {
            return Err(RuntimeError::Checkpoint {
                id: id.to_string(),
                op: "dump",
                reason: format!(
                    "an interrupted criu dump into {} is still running after {}s",
                    partial.display(),
                    CRIU_TIMEOUT.as_secs()
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if partial.join("stats-dump").is_file() && partial.join("inventory.img").is_file() {
        let images = images_dir(dir);
        let _ = std::fs::remove_dir_all(&images);
        std::fs::rename(&partial, &images).map_err(|e| RuntimeError::io("rename", &partial, e))?;
        tracing::info!(sandbox = %id, "kept the images of a dump the daemon's restart interrupted");
    } else {
        let _ = std::fs::remove_dir_all(&partial);
    }
    Ok(has_images(dir))
}

/// Waits for a restore from `<dir>/checkpoint` that a daemon crash interrupted (its CRIU
/// outlives the daemon, like a dump's).
pub async fn settle_interrupted_restore(id: &str, dir: &Path) -> Result<(), RuntimeError> {
    let images = images_dir(dir);
    let deadline = Instant::now() + CRIU_TIMEOUT;
    while criu_writing_to(&images) {
        if Instant::now() >= deadline {
            return Err(RuntimeError::Checkpoint {
                id: id.to_string(),
                op: "restore",
                reason: format!(
                    "an interrupted criu restore from {} is still running after {}s",
                    images.display(),
                    CRIU_TIMEOUT.as_secs()
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Whether some process (a CRIU left over from before a restart) has `images` as its
/// `--images-dir`.
fn criu_writing_to(images: &Path) -> bool {
    let want = images.as_os_str().as_bytes();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|p| {
        std::fs::read(p.path().join("cmdline")).is_ok_and(|cmdline| {
            let mut args = cmdline.split(|b| *b == 0);
            args.any(|a| a == b"--images-dir") && args.next() == Some(want)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_criu_patches_are_the_scripts_ones_in_order() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/criu-patches");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "patch"))
            .collect();
        files.sort();
        let on_disk: Vec<String> = files
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect();
        assert_eq!(on_disk, CRIU_PATCHES, "list every patch in CRIU_PATCHES");
    }

    #[test]
    fn userns_entry_is_the_protobuf_criu_writes() {
        // uid_map and gid_map of one extent {0, 2^31, 65536}.
        let e = userns_entry(&IdRange {
            host_base: 1 << 31,
            count: 65536,
        });
        let extent = [
            0x08, 0x00, 0x10, 0x80, 0x80, 0x80, 0x80, 0x08, 0x18, 0x80, 0x80, 0x04,
        ];
        let mut want = vec![0x0a, extent.len() as u8];
        want.extend_from_slice(&extent);
        want.extend_from_slice(&[0x12, extent.len() as u8]);
        want.extend_from_slice(&extent);
        assert_eq!(e, want);
    }
}
