//! User namespaces: root inside a sandbox is an unprivileged uid range on the host.
//!
//! Every sandbox gets its own range of [`IdRange::COUNT`] host uids and gids, allocated from the
//! daemon's pool ([`IdPool`]) and recorded in its [`crate::Placement`], so a restarted daemon and
//! a wake from hibernation keep it. The sandbox's user namespace maps ids `0..COUNT` onto it.
//!
//! Files stay stored with plain ids (0 for root, 1000 for `user`) on disk: the overlay's layers and
//! upper dir, and the read-only binds, reach the sandbox through *idmapped mounts*
//! (`open_tree(OPEN_TREE_CLONE)` + `mount_setattr(MOUNT_ATTR_IDMAP)`) that shift on-disk id `n` to
//! host id `base + n`. Image layers shared by every sandbox, commit exports of the upper dir and
//! CRIU's checks therefore see the same files as without a user namespace.
//!
//! The overlay itself is made here, by the daemon, as a detached mount (`fsopen`/`fsmount`): its
//! superblock belongs to the initial user namespace, so it keeps the `trusted.overlay.*` xattrs
//! that image layers use for opaque dirs (an overlay mounted inside the user namespace would read
//! `user.overlay.*` instead). Its creator credentials carry the sandbox root's host uid as fsuid,
//! so that the work dir and copy-ups it creates map back to on-disk id 0. The sandbox's init only
//! attaches the detached mounts it inherits (`move_mount`).
//!
//! The network namespace is made inside the user namespace, so it belongs to it (CRIU dumps a tree
//! only when all its namespaces belong to its user namespace); each prepared network namespace
//! comes with its user namespace and id range (`super::net::NetSlot::userns`). Root in the
//! sandbox still cannot reconfigure its interface, addresses, routes or firewall: envd drops
//! `CAP_NET_ADMIN` from the bounding set, and seccomp denies making a new user namespace to
//! regain it.
//!
//! Hibernation and checkpoints: the tree is dumped with its network namespace empty
//! (`--empty-ns net`); CRIU's restore makes the user namespace anew from the mapping in the
//! images (rewritten for a fork, which gets a range of its own) and a network namespace inside
//! it, into which its action script moves the sandbox's `eth0` (see `super::checkpoint`).

pub use crate::spec::IdRange;
use crate::RuntimeError;
use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The daemon's pool of id ranges: `ranges` consecutive ranges of [`IdRange::COUNT`] ids from
/// `base`.
#[derive(Debug)]
pub struct IdPool {
    base: u32,
    ranges: u32,
    used: Mutex<BTreeSet<u32>>,
}

impl IdPool {
    pub fn new(base: u32, ranges: u32) -> Result<IdPool, RuntimeError> {
        let end = base as u64 + ranges as u64 * IdRange::COUNT as u64;
        // Host id 0 must never be in a sandbox's range, and (uid_t)-1 is "no id".
        if base == 0 || ranges == 0 || end > u32::MAX as u64 {
            return Err(RuntimeError::Config(format!(
                "uid range pool {base} + {ranges} x {} does not fit between 1 and {}",
                IdRange::COUNT,
                u32::MAX - 1
            )));
        }
        Ok(IdPool {
            base,
            ranges,
            used: Mutex::new(BTreeSet::new()),
        })
    }

    /// The lowest free range.
    pub fn allocate(&self) -> Result<IdRange, RuntimeError> {
        let mut used = self.used.lock().unwrap();
        let slot = (0..self.ranges)
            .find(|s| !used.contains(s))
            .ok_or_else(|| {
                RuntimeError::Config(format!(
                    "all {} uid ranges from {} are in use",
                    self.ranges, self.base
                ))
            })?;
        used.insert(slot);
        Ok(self.range(slot))
    }

    /// Marks a recorded range as taken (a sandbox adopted after a restart). Ranges outside this
    /// pool (a different configuration before the restart) are kept by their sandbox but not
    /// tracked here.
    pub fn claim(&self, range: &IdRange) {
        if let Some(slot) = self.slot_of(range) {
            self.used.lock().unwrap().insert(slot);
        }
    }

    pub fn release(&self, range: &IdRange) {
        if let Some(slot) = self.slot_of(range) {
            self.used.lock().unwrap().remove(&slot);
        }
    }

    fn range(&self, slot: u32) -> IdRange {
        IdRange {
            host_base: self.base + slot * IdRange::COUNT,
            count: IdRange::COUNT,
        }
    }

    fn slot_of(&self, range: &IdRange) -> Option<u32> {
        let off = range.host_base.checked_sub(self.base)?;
        (off % IdRange::COUNT == 0 && off / IdRange::COUNT < self.ranges)
            .then_some(off / IdRange::COUNT)
    }
}

/// Where daemons take their id pools: pool `n` is ids `2^31 + n * POOL_IDS ..`, for `POOLS`
/// pools of [`POOL_RANGES`] ranges each, far above any distribution's users.
pub const POOL_FIRST: u32 = 1 << 31;
pub const POOL_RANGES: u32 = 1024;
pub const POOLS: u32 = 30;

/// Takes an id pool no other daemon on this host holds, so that no two sandboxes share host ids
/// even across daemons: `preferred` (derived from the data dir) if free, else the one this data
/// dir had before (`<data_dir>/uid-pool`), else the next free one. Each pool is held by an
/// exclusive `flock` on `/run/warren-uid-pools/<n>.lock` for as long as the returned descriptor
/// lives (the daemon's life). A base off the pools' grid (set by hand) is used as is, unlocked.
pub fn reserve_pool(
    data_dir: &Path,
    preferred: u32,
    ranges: u32,
) -> Result<(u32, Option<OwnedFd>), RuntimeError> {
    let size = POOL_RANGES * IdRange::COUNT;
    let slot_of = |base: u32| {
        let off = base.checked_sub(POOL_FIRST)?;
        (ranges == POOL_RANGES && off % size == 0 && off / size < POOLS).then_some(off / size)
    };
    let Some(derived) = slot_of(preferred) else {
        return Ok((preferred, None));
    };
    let record = data_dir.join("uid-pool");
    let recorded = std::fs::read_to_string(&record)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .and_then(slot_of);
    let dir = Path::new("/run/warren-uid-pools");
    std::fs::create_dir_all(dir).map_err(|e| RuntimeError::io("mkdir", dir, e))?;
    let order = recorded
        .into_iter()
        .chain((0..POOLS).map(|k| (derived + k) % POOLS));
    for slot in order {
        let path = dir.join(format!("{slot}.lock"));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| RuntimeError::io("open", &path, e))?;
        // SAFETY: flock on a descriptor we own; non-blocking.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            continue;
        }
        let base = POOL_FIRST + slot * size;
        std::fs::write(&record, base.to_string())
            .map_err(|e| RuntimeError::io("write", &record, e))?;
        return Ok((base, Some(OwnedFd::from(f))));
    }
    Err(RuntimeError::Config(format!(
        "all {POOLS} uid pools are held by other warren daemons on this host"
    )))
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

fn last_err(op: &'static str, path: &Path) -> RuntimeError {
    RuntimeError::io(op, path, std::io::Error::last_os_error())
}

/// What the child of [`new_userns`] is given: its ends of two pipes, and whether it makes a
/// network namespace too.
struct HolderArgs {
    /// Read end: a byte once the maps are written, another when it may exit.
    go: libc::c_int,
    /// Write end: a byte once its network namespace exists (or its unshare failed: then 0).
    done: libc::c_int,
    netns: bool,
}

/// The child of [`new_userns`]: it waits for its parent's byte on the pipe (the maps are written),
/// makes a network namespace if asked (as root of the new user namespace, so the namespace is
/// owned by it), reports, and waits for the byte that lets it exit.
extern "C" fn userns_holder(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: the parent's HolderArgs outlives the child (the parent waits for it); the child
    // makes raw syscalls only, into locals, and exits without returning into shared memory.
    unsafe {
        let args = &*(arg as *const HolderArgs);
        // The clone copied the daemon's whole descriptor table (its listening socket, its lock
        // of the id pool...): none of it may outlive the daemon in a holder the daemon's death
        // left waiting, so the holder closes all but its two pipe ends, and dies with the daemon.
        let (lo, hi) = (args.go.min(args.done) as u32, args.go.max(args.done) as u32);
        for (first, last) in [
            (3, lo.wrapping_sub(1)),
            (lo + 1, hi - 1),
            (hi + 1, u32::MAX),
        ] {
            if first <= last {
                libc::syscall(libc::SYS_close_range, first, last, 0u32);
            }
        }
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
        let mut b = 0u8;
        if libc::read(args.go, (&mut b as *mut u8).cast(), 1) != 1 {
            libc::_exit(1);
        }
        let ok: u8 = if args.netns {
            (libc::unshare(libc::CLONE_NEWNET) == 0) as u8
        } else {
            1
        };
        libc::write(args.done, (&ok as *const u8).cast(), 1);
        libc::read(args.go, (&mut b as *mut u8).cast(), 1);
        libc::_exit(0)
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), RuntimeError> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 fills the two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(last_err("pipe2", Path::new("userns holder")));
    }
    // SAFETY: both descriptors are fresh and owned here.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A sandbox's user namespace and, when asked for, a network namespace owned by it.
pub struct NewUserns {
    pub userns: OwnedFd,
    pub netns: Option<OwnedFd>,
}

/// Makes a user namespace mapping `range`, owned by the daemon's (initial) user namespace, and
/// returns a descriptor of it; with `netns`, also a network namespace owned by it (CRIU dumps a
/// sandbox only when all its namespaces belong to its user namespace). A namespace needs a
/// process to be created in: a child cloned straight into it (sharing the daemon's memory, so
/// nothing is copied) holds it while the maps are written and the namespaces are opened, then
/// exits.
pub fn new_userns(range: &IdRange, netns: bool) -> Result<NewUserns, RuntimeError> {
    let (go_rd, go_wr) = pipe()?;
    let (done_rd, done_wr) = pipe()?;
    let args = HolderArgs {
        go: go_rd.as_raw_fd(),
        done: done_wr.as_raw_fd(),
        netns,
    };
    let mut stack = vec![0u8; 64 * 1024];
    // SAFETY: the stack and `args` outlive the child (it exits before `waitpid` below returns,
    // and both are dropped after that); the child runs `userns_holder` only, which makes raw
    // syscalls. CLONE_VM avoids copying the daemon's page tables.
    let pid = unsafe {
        let top = stack.as_mut_ptr().add(stack.len());
        libc::clone(
            userns_holder,
            top.cast(),
            libc::CLONE_NEWUSER | libc::CLONE_VM | libc::SIGCHLD,
            &args as *const HolderArgs as *mut libc::c_void,
        )
    };
    if pid < 0 {
        return Err(last_err("clone", Path::new("new user namespace")));
    }
    let open = |what: &str| {
        let ns = PathBuf::from(format!("/proc/{pid}/ns/{what}"));
        std::fs::File::open(&ns)
            .map(OwnedFd::from)
            .map_err(|e| RuntimeError::io("open", &ns, e))
    };
    let result = (|| {
        let line = range.map_line();
        for map in ["uid_map", "gid_map"] {
            let path = PathBuf::from(format!("/proc/{pid}/{map}"));
            std::fs::write(&path, &line).map_err(|e| RuntimeError::io("write", &path, e))?;
        }
        let userns = open("user")?;
        // SAFETY: writing one byte from a constant to our pipe; reading one into a local.
        let ok = unsafe {
            libc::write(go_wr.as_raw_fd(), b"x".as_ptr().cast(), 1);
            let mut ok = 0u8;
            let n = libc::read(done_rd.as_raw_fd(), (&mut ok as *mut u8).cast(), 1);
            n == 1 && ok == 1
        };
        if !ok {
            return Err(RuntimeError::io(
                "unshare",
                "network namespace in the sandbox's user namespace",
                std::io::Error::other("the namespace holder could not make it"),
            ));
        }
        let netns = if netns { Some(open("net")?) } else { None };
        Ok(NewUserns { userns, netns })
    })();
    // The child has its own copy of the write end, so closing ours would not wake it: a byte
    // does (two if the first never went, so it does not block on the second read).
    // SAFETY: writing bytes from a constant to our pipe.
    unsafe { libc::write(go_wr.as_raw_fd(), b"xx".as_ptr().cast(), 2) };
    drop(go_wr);
    let mut status = 0;
    // SAFETY: waiting for our own child; __WALL as it may not report as a normal child.
    unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
    drop(stack);
    drop((go_rd, done_rd, done_wr));
    result
}

/// `open_tree(path, OPEN_TREE_CLONE)` as an idmapped mount through `userns`, with `attrs`
/// (MOUNT_ATTR_*) set: a detached mount that only descriptors hold.
pub fn idmapped_tree(
    path: &Path,
    userns: RawFd,
    attrs: u64,
    recursive: bool,
) -> Result<OwnedFd, RuntimeError> {
    let c = cstr(path);
    let mut flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC;
    if recursive {
        flags |= libc::AT_RECURSIVE as libc::c_uint;
    }
    // SAFETY: open_tree with a valid C string; the result is a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c.as_ptr(), flags) };
    if fd < 0 {
        return Err(last_err("open_tree", path));
    }
    // SAFETY: fd is a fresh descriptor owned here.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_IDMAP | attrs,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns as u64,
    };
    let mut at = libc::AT_EMPTY_PATH;
    if recursive {
        at |= libc::AT_RECURSIVE;
    }
    // SAFETY: attr is a valid mount_attr of the size passed; the path is empty (AT_EMPTY_PATH).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            at as libc::c_uint,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if rc < 0 {
        return Err(last_err("mount_setattr MOUNT_ATTR_IDMAP", path));
    }
    Ok(tree)
}

const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;

fn fsconfig_string(fs: &OwnedFd, key: &str, value: &str) -> Result<(), RuntimeError> {
    let (k, v) = (
        CString::new(key).unwrap_or_default(),
        CString::new(value).unwrap_or_default(),
    );
    // SAFETY: valid C strings for key and value; aux is unused for strings.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_SET_STRING,
            k.as_ptr(),
            v.as_ptr(),
            0,
        )
    };
    if rc < 0 {
        return Err(RuntimeError::io(
            "fsconfig overlay",
            format!("{key}={value}"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// The kernel's own words on a failed filesystem context (overlayfs explains its refusals there).
fn fs_log(fs: &OwnedFd) -> String {
    let mut buf = [0u8; 512];
    // SAFETY: reading into a local buffer of the given length.
    let n = unsafe { libc::read(fs.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n > 0 {
        String::from_utf8_lossy(&buf[..n as usize])
            .trim()
            .to_string()
    } else {
        String::new()
    }
}

/// The detached mounts a sandbox's init attaches, all held by descriptors of the daemon until the
/// init has inherited them.
pub struct SandboxMounts {
    /// The user namespace the init enters.
    pub userns: OwnedFd,
    /// The overlay root.
    pub rootfs: OwnedFd,
    /// The sandbox network namespace's sysfs.
    pub sysfs: OwnedFd,
    /// The read-only binds, in the order of the spec's `ro_binds`; `None` where the source's file
    /// system cannot be idmapped (the init binds it plainly, its files then owned by `nobody`).
    pub binds: Vec<Option<OwnedFd>>,
    /// Kept open so the overlay's layers stay reachable while it is being created.
    _layers: Vec<OwnedFd>,
}

impl SandboxMounts {
    /// What the init is told about the descriptors it inherits.
    pub fn init_mounts(&self) -> crate::init::InitMounts {
        crate::init::InitMounts {
            rootfs_fd: self.rootfs.as_raw_fd(),
            sysfs_fd: self.sysfs.as_raw_fd(),
            bind_fds: self
                .binds
                .iter()
                .map(|b| b.as_ref().map(|f| f.as_raw_fd()))
                .collect(),
        }
    }

    /// The descriptors the init must inherit (their close-on-exec flag is cleared in the child).
    pub fn inherited_fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.rootfs.as_raw_fd(), self.sysfs.as_raw_fd()];
        fds.extend(self.binds.iter().flatten().map(|f| f.as_raw_fd()));
        fds
    }
}

/// Builds the sandbox's detached mounts, idmapped through its user namespace `userns` (of
/// `range`): the overlay root and binds, and the sysfs of its network namespace `netns`.
pub fn prepare_mounts(
    range: &IdRange,
    userns: OwnedFd,
    netns: RawFd,
    lower_dirs: &[PathBuf],
    upper: &Path,
    work: &Path,
    ro_binds: &[crate::BindMount],
) -> Result<SandboxMounts, RuntimeError> {
    let ns = userns.as_raw_fd();
    // Upper and work dir must be on one mount for overlayfs: idmap their common parent once.
    let parent = upper
        .parent()
        .filter(|p| work.parent() == Some(*p))
        .ok_or_else(|| {
            RuntimeError::Config(format!(
                "upper dir {} and work dir {} must share a parent directory",
                upper.display(),
                work.display()
            ))
        })?;
    let mut layers = Vec::with_capacity(lower_dirs.len() + 1);
    for dir in lower_dirs {
        layers.push(idmapped_tree(dir, ns, 0, false)?);
    }
    let upper_tree = idmapped_tree(parent, ns, 0, false)?;
    // SAFETY: fsopen with a constant name.
    let fs = unsafe { libc::syscall(libc::SYS_fsopen, c"overlay".as_ptr(), FSOPEN_CLOEXEC) };
    if fs < 0 {
        return Err(last_err("fsopen overlay", upper));
    }
    // SAFETY: fresh descriptor owned here.
    let fs = unsafe { OwnedFd::from_raw_fd(fs as RawFd) };
    // The layers are named through the descriptors of their idmapped mounts: the paths resolve
    // now, in this process, while the descriptors are open.
    let name = |p: &Path| p.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    for layer in &layers {
        fsconfig_string(
            &fs,
            "lowerdir+",
            &format!("/proc/self/fd/{}", layer.as_raw_fd()),
        )?;
    }
    let under = |p: &Path| {
        format!(
            "/proc/self/fd/{}/{}",
            upper_tree.as_raw_fd(),
            name(p).to_string_lossy()
        )
    };
    fsconfig_string(&fs, "upperdir", &under(upper))?;
    fsconfig_string(&fs, "workdir", &under(work))?;
    // As in crate::init::overlay_options: the upper dir stays a plain diff a commit can read.
    for (k, v) in [
        ("index", "off"),
        ("redirect_dir", "off"),
        ("metacopy", "off"),
    ] {
        fsconfig_string(&fs, k, v)?;
    }
    create_as(&fs, range.host_base).map_err(|e| RuntimeError::Io {
        op: "create overlay",
        path: upper.to_path_buf(),
        source: std::io::Error::new(
            e.kind(),
            format!("{e}{}", {
                let log = fs_log(&fs);
                if log.is_empty() {
                    String::new()
                } else {
                    format!(" ({log})")
                }
            }),
        ),
    })?;
    // SAFETY: fsmount on our filesystem context; the result is a new descriptor or -1.
    let mnt = unsafe { libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), FSMOUNT_CLOEXEC, 0) };
    if mnt < 0 {
        return Err(last_err("fsmount overlay", upper));
    }
    // SAFETY: fresh descriptor owned here.
    let rootfs = unsafe { OwnedFd::from_raw_fd(mnt as RawFd) };
    layers.push(upper_tree);

    let ro = libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
    let binds = ro_binds
        .iter()
        .map(|b| match idmapped_tree(&b.source, ns, ro, true) {
            Ok(fd) => Ok(Some(fd)),
            // A file system without idmapping support (EINVAL): plainly bound instead.
            Err(RuntimeError::Io { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                Ok(None)
            }
            Err(e) => Err(e),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(SandboxMounts {
        userns,
        rootfs,
        sysfs: sysfs_of(netns)?,
        binds,
        _layers: layers,
    })
}

/// A fresh sysfs of the network namespace `netns`, detached and read-only. Sysfs shows the
/// network devices of the namespace it is created in: a short-lived thread enters the namespace
/// (network namespaces are per thread) and makes it.
pub fn sysfs_of(netns: RawFd) -> Result<OwnedFd, RuntimeError> {
    let made = std::thread::scope(|s| {
        s.spawn(move || -> std::io::Result<RawFd> {
            // SAFETY: setns on this thread only (it ends right after); fsopen/fsconfig/fsmount on
            // descriptors created here.
            unsafe {
                if libc::setns(netns, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let fs = libc::syscall(libc::SYS_fsopen, c"sysfs".as_ptr(), FSOPEN_CLOEXEC);
                if fs < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let fs = OwnedFd::from_raw_fd(fs as RawFd);
                if libc::syscall(
                    libc::SYS_fsconfig,
                    fs.as_raw_fd(),
                    FSCONFIG_CMD_CREATE,
                    std::ptr::null::<libc::c_char>(),
                    std::ptr::null::<libc::c_void>(),
                    0,
                ) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                let attrs = libc::MOUNT_ATTR_RDONLY
                    | libc::MOUNT_ATTR_NOSUID
                    | libc::MOUNT_ATTR_NODEV
                    | libc::MOUNT_ATTR_NOEXEC;
                let mnt = libc::syscall(
                    libc::SYS_fsmount,
                    fs.as_raw_fd(),
                    FSMOUNT_CLOEXEC,
                    attrs as libc::c_uint,
                );
                if mnt < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(mnt as RawFd)
            }
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("sysfs thread panicked")))
    })
    .map_err(|e| RuntimeError::io("make sysfs for", "the sandbox network namespace", e))?;
    // SAFETY: a fresh descriptor owned here.
    Ok(unsafe { OwnedFd::from_raw_fd(made) })
}

/// Instantiates the overlay with creator credentials whose fsuid and fsgid are the sandbox root's
/// host ids (with every capability): overlayfs creates its work dir, copy-ups and whiteouts with
/// those, and the idmapped upper mount stores them as on-disk id 0. Credentials are per thread,
/// so a short-lived thread of its own does it and the daemon's threads keep theirs.
fn create_as(fs: &OwnedFd, host_root: u32) -> std::io::Result<()> {
    let fd = fs.as_raw_fd();
    std::thread::scope(|s| {
        s.spawn(move || -> std::io::Result<()> {
            // SAFETY: raw per-thread credential syscalls (the libc wrappers of setfsuid would be
            // fine too, but capset must follow on the same thread); this thread ends right after.
            unsafe {
                libc::syscall(libc::SYS_setfsgid, host_root);
                libc::syscall(libc::SYS_setfsuid, host_root);
                raise_effective_caps()?;
                if libc::syscall(
                    libc::SYS_fsconfig,
                    fd,
                    FSCONFIG_CMD_CREATE,
                    std::ptr::null::<libc::c_char>(),
                    std::ptr::null::<libc::c_void>(),
                    0,
                ) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("overlay creator thread panicked")))
    })
}

/// Changing the fsuid away from 0 clears the file-related effective capabilities; the permitted
/// set still holds them, so they are raised again.
fn raise_effective_caps() -> std::io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let header = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: header and data have the layout capget/capset expect for version 3.
    unsafe {
        if libc::syscall(libc::SYS_capget, &header, data.as_mut_ptr()) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        for d in &mut data {
            d.effective = d.permitted;
        }
        if libc::syscall(libc::SYS_capset, &header, data.as_ptr()) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_allocates_lowest_free_range_and_reuses_released_ones() {
        let pool = IdPool::new(1 << 31, 3).unwrap();
        let a = pool.allocate().unwrap();
        let b = pool.allocate().unwrap();
        assert_eq!(a.host_base, 1 << 31);
        assert_eq!(b.host_base, (1 << 31) + 65536);
        assert_eq!(a.map_line(), format!("0 {} 65536\n", 1u32 << 31));
        pool.release(&a);
        assert_eq!(pool.allocate().unwrap(), a);
        pool.allocate().unwrap();
        assert!(pool.allocate().is_err(), "three ranges only");
    }

    #[test]
    fn pool_claims_recorded_ranges_and_ignores_foreign_ones() {
        let pool = IdPool::new(1 << 31, 2).unwrap();
        pool.claim(&IdRange {
            host_base: 1 << 31,
            count: IdRange::COUNT,
        });
        pool.claim(&IdRange {
            host_base: 5,
            count: IdRange::COUNT,
        });
        assert_eq!(pool.allocate().unwrap().host_base, (1 << 31) + 65536);
    }

    #[test]
    fn daemons_on_one_host_take_different_pools_and_keep_theirs() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let preferred = POOL_FIRST + 7 * POOL_RANGES * IdRange::COUNT;
        let (base_a, lock_a) = reserve_pool(a.path(), preferred, POOL_RANGES).unwrap();
        let (base_b, lock_b) = reserve_pool(b.path(), preferred, POOL_RANGES).unwrap();
        assert!(lock_a.is_some() && lock_b.is_some());
        assert_ne!(base_a, base_b, "the second daemon moves on to a free pool");
        for base in [base_a, base_b] {
            IdPool::new(base, POOL_RANGES).expect("a valid pool");
        }
        // A restart of the second daemon (its lock gone) takes its recorded pool again.
        drop(lock_b);
        let (again, _lock) = reserve_pool(b.path(), preferred, POOL_RANGES).unwrap();
        assert_eq!(again, base_b);
        // A base set by hand is used as is.
        let (base, lock) = reserve_pool(a.path(), 5 << 16, 2).unwrap();
        assert_eq!((base, lock.is_none()), (5 << 16, true));
    }

    #[test]
    fn pool_refuses_ranges_that_include_root_or_overflow() {
        assert!(IdPool::new(0, 1).is_err());
        assert!(IdPool::new(u32::MAX - 65535, 1).is_err());
        assert!(IdPool::new(u32::MAX - 65536, 1).is_ok());
    }
}
