//! The inside half of sandbox creation, run by `warren-envd init` as the first process of a new
//! sandbox, before envd starts serving.
//!
//! The daemon starts `warren-envd init` with the mount, uts, ipc, net, cgroup and pid namespaces
//! already unshared (so the process itself is still in the host pid namespace) and with its cgroups
//! joined. The handshake over stdio is:
//!
//! 1. [`fork_into_pid_namespace`]: the process forks once. The child is PID 1 of the new pid
//!    namespace and carries on; the parent writes `pid <host pid of the child>` on stdout and exits.
//! 2. The daemon moves the sandbox's veth into the namespace, then writes an [`InitSpec`] as JSON
//!    on stdin and closes it. [`read_spec`] reads it.
//! 3. [`setup_sandbox`] mounts the root filesystem (overlay, binds, /proc, /dev, /sys), pivots into
//!    it, names the host, configures the network and detaches from every host file descriptor.
//! 4. envd binds its listener, then [`ReadyPipe::ready`] writes `ready` on stdout (or
//!    [`ReadyPipe::fail`] writes `error <message>`), and [`lock_down`] drops capabilities and
//!    installs the seccomp filter before any request is served.
//!
//! Everything here runs while the process is single-threaded, so plain blocking syscalls are used.

use crate::spec::EnvdSettings;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::path::PathBuf;

/// What the sandbox's init needs to know, written by the daemon on the init's stdin.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InitSpec {
    pub id: String,
    /// Overlay lower dirs (host paths), topmost first.
    pub lower_dirs: Vec<PathBuf>,
    pub upper_dir: PathBuf,
    pub work_dir: PathBuf,
    /// Host path where the merged root is mounted (inside the sandbox's own mount namespace).
    pub rootfs_dir: PathBuf,
    pub ro_binds: Vec<crate::BindMount>,
    pub net: Option<InitNet>,
    pub envd: EnvdSettings,
    /// Set when the sandbox runs in its own user namespace: the detached mounts the daemon made
    /// (see [`crate::linux::userns`]), inherited as these descriptors, take the place of the
    /// mounts init would make itself. `rootfs_dir` is then relative to the init's working
    /// directory (the sandbox dir, entered while the process was still host root: the data
    /// dir's ancestors need not be searchable by the sandbox's unprivileged host ids).
    #[serde(default)]
    pub mounts: Option<InitMounts>,
}

/// Descriptors of detached mounts the init attaches (`move_mount`) instead of mounting.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InitMounts {
    /// The overlay root, already idmapped.
    pub rootfs_fd: i32,
    /// A sysfs of the sandbox's network namespace, read-only, made by the daemon inside that
    /// namespace (see [`crate::linux::userns::sysfs_of`]).
    pub sysfs_fd: i32,
    /// One per `ro_binds` entry: an idmapped read-only bind, or `None` to bind the source plainly.
    pub bind_fds: Vec<Option<i32>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InitNet {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
}

/// An error of the init side; the message is sent to the daemon verbatim.
#[derive(Debug, thiserror::Error)]
#[error("{op} {what}: {source}")]
pub struct InitError {
    pub op: &'static str,
    pub what: String,
    #[source]
    pub source: std::io::Error,
}

fn err(op: &'static str, what: impl Into<String>) -> InitError {
    InitError {
        op,
        what: what.into(),
        source: std::io::Error::last_os_error(),
    }
}

fn check(rc: libc::c_int, op: &'static str, what: impl Into<String>) -> Result<(), InitError> {
    if rc < 0 {
        Err(err(op, what))
    } else {
        Ok(())
    }
}

fn cstr(p: impl AsRef<std::ffi::OsStr>) -> std::ffi::CString {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_ref().as_bytes()).unwrap_or_default()
}

/// Forks once so that the caller continues as PID 1 of the pid namespace unshared before exec.
/// Only the child returns; the parent reports the child's host pid on stdout and exits.
pub fn fork_into_pid_namespace() -> Result<(), InitError> {
    // SAFETY: the process is single-threaded here (called first thing in main, before any runtime
    // or thread is started), so fork cannot leave locks held in the child.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(err("fork", "into the sandbox pid namespace"));
    }
    if pid > 0 {
        let line = format!("pid {pid}\n");
        // SAFETY: writing a valid buffer to fd 1, then exiting without running destructors, which
        // belong to the child now.
        unsafe {
            libc::write(1, line.as_ptr().cast(), line.len());
            libc::_exit(0);
        }
    }
    Ok(())
}

/// Reads the [`InitSpec`] the daemon writes on stdin (until end of file).
pub fn read_spec() -> Result<InitSpec, InitError> {
    use std::io::Read;
    let mut buf = Vec::new();
    std::io::stdin()
        .lock()
        .read_to_end(&mut buf)
        .map_err(|e| InitError {
            op: "read",
            what: "init spec from stdin".into(),
            source: e,
        })?;
    serde_json::from_slice(&buf).map_err(|e| InitError {
        op: "parse",
        what: "init spec".into(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })
}

/// The write end of the status pipe to the daemon, held until envd is ready to serve.
pub struct ReadyPipe {
    fd: libc::c_int,
}

impl ReadyPipe {
    /// Tells the daemon that envd listens, then points fd 1 at the sandbox's own `/dev/null` so no
    /// host file descriptor stays open inside the sandbox (checkpointing relies on that).
    pub fn ready(self) {
        self.finish("ready\n");
    }

    /// Reports a setup failure to the daemon.
    pub fn fail(self, message: &str) {
        let one_line = message.replace('\n', " ");
        self.finish(&format!("error {one_line}\n"));
    }

    fn finish(self, line: &str) {
        // SAFETY: fd is our status pipe; the buffer is valid for its length. Afterwards fd 1 is
        // replaced with /dev/null from the sandbox's own /dev (mounted by setup_sandbox).
        unsafe {
            libc::write(self.fd, line.as_ptr().cast(), line.len());
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
            if null >= 0 {
                libc::dup2(null, self.fd);
                libc::close(null);
            }
        }
    }
}

/// Builds the sandbox around the calling process (PID 1 of its namespaces): see the module docs.
pub fn setup_sandbox(spec: &InitSpec) -> Result<ReadyPipe, InitError> {
    // A session leader inside its own namespaces: CRIU refuses to dump a tree whose session
    // leader is outside the pid namespace.
    // SAFETY: setsid has no memory-safety preconditions.
    unsafe { libc::setsid() };
    mount_rootfs(spec)?;
    pivot_into(&spec.rootfs_dir)?;
    let host = cstr(&spec.id);
    // SAFETY: host is a valid C string of the given length.
    check(
        unsafe { libc::sethostname(host.as_ptr(), spec.id.len()) },
        "sethostname",
        &spec.id,
    )?;
    configure_network(spec.net.as_ref())?;
    detach_host_fds()
}

fn mount_raw(
    source: &str,
    target: &std::path::Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), InitError> {
    let (s, t, f) = (cstr(source), cstr(target), cstr(fstype));
    let d = data.map(cstr);
    // SAFETY: all pointers are valid NUL-terminated strings (or null for data) for the call.
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            if fstype.is_empty() {
                std::ptr::null()
            } else {
                f.as_ptr()
            },
            flags,
            d.as_ref()
                .map(|d| d.as_ptr().cast())
                .unwrap_or(std::ptr::null()),
        )
    };
    check(
        rc,
        "mount",
        format!("{fstype} {source} on {}", target.display()),
    )
}

/// Attaches the detached mount `fd` at `target` and closes the descriptor.
fn attach(fd: i32, target: &std::path::Path) -> Result<(), InitError> {
    let t = cstr(target);
    // SAFETY: move_mount of a descriptor we inherited onto a valid C string path; the empty
    // source path with MOVE_MOUNT_F_EMPTY_PATH names the descriptor itself.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            fd,
            c"".as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    } as libc::c_int;
    let result = check(rc, "move_mount", format!("fd {fd} on {}", target.display()));
    // SAFETY: the descriptor was handed to us for this mount alone.
    unsafe { libc::close(fd) };
    result
}

/// The flags of the mount holding `path` that a remount inside a user namespace must keep (the
/// kernel locks them on mounts inherited from a more privileged namespace).
fn locked_flags(path: &std::path::Path) -> libc::c_ulong {
    let c = cstr(path);
    // SAFETY: statvfs on a valid C string into a zeroed out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    let mut flags = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if st.f_flag & st_flag != 0 {
            flags |= ms_flag;
        }
    }
    flags
}

/// The mount options of a sandbox's overlay root (also used to mount it again for a restore).
pub fn overlay_options(
    lower_dirs: &[PathBuf],
    upper: &std::path::Path,
    work: &std::path::Path,
) -> String {
    let lower = lower_dirs
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    // index/redirect_dir/metacopy off keep the upper dir a plain diff that a commit can read.
    format!(
        "lowerdir={lower},upperdir={},workdir={},index=off,redirect_dir=off,metacopy=off",
        upper.display(),
        work.display()
    )
}

fn mount_rootfs(spec: &InitSpec) -> Result<(), InitError> {
    let root = &spec.rootfs_dir;
    // Nothing we mount may propagate back to the host.
    mount_raw(
        "none",
        std::path::Path::new("/"),
        "",
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    match &spec.mounts {
        Some(m) => attach(m.rootfs_fd, root)?,
        None => {
            let data = overlay_options(&spec.lower_dirs, &spec.upper_dir, &spec.work_dir);
            mount_raw("overlay", root, "overlay", 0, Some(&data))?;
        }
    }
    // /etc/hostname agrees with the kernel's hostname (the sandbox id). Best effort: a template
    // without /etc simply has no such file.
    let _ = std::fs::write(root.join("etc/hostname"), format!("{}\n", spec.id));

    for (i, bind) in spec.ro_binds.iter().enumerate() {
        let target = root.join(bind.target.strip_prefix("/").unwrap_or(&bind.target));
        std::fs::create_dir_all(&target).map_err(|e| InitError {
            op: "mkdir",
            what: target.display().to_string(),
            source: e,
        })?;
        if let Some(fd) = spec
            .mounts
            .as_ref()
            .and_then(|m| m.bind_fds.get(i).copied().flatten())
        {
            attach(fd, &target)?;
            continue;
        }
        let src = bind.source.display().to_string();
        mount_raw(&src, &target, "", libc::MS_BIND | libc::MS_REC, None)?;
        mount_raw(
            "none",
            &target,
            "",
            libc::MS_BIND
                | libc::MS_REMOUNT
                | libc::MS_RDONLY
                | libc::MS_NOSUID
                | libc::MS_NODEV
                | locked_flags(&bind.source),
            None,
        )?;
    }

    let sub = |p: &str| root.join(p);
    for dir in ["proc", "dev", "sys", "tmp", "run"] {
        let _ = std::fs::create_dir_all(sub(dir));
    }
    mount_raw(
        "proc",
        &sub("proc"),
        "proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;
    match &spec.mounts {
        Some(m) => attach(m.sysfs_fd, &sub("sys"))?,
        None => mount_raw(
            "sysfs",
            &sub("sys"),
            "sysfs",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY,
            None,
        )?,
    }
    mount_raw(
        "tmpfs",
        &sub("run"),
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=755,size=64m"),
    )?;
    populate_dev(&sub("dev"))?;
    restrict_kernel_files(root)?;
    Ok(())
}

/// Paths made read-only, as OCI runtimes do by default: without a user namespace, root in the
/// sandbox is root to the kernel's proc handlers, most of which check only file modes, and
/// `/proc/sys` holds the host kernel's tunables (`vm.drop_caches`, `vm.overcommit_memory`...).
const READ_ONLY_PATHS: &[&str] = &[
    "proc/sys",
    "proc/sysrq-trigger",
    "proc/irq",
    "proc/bus",
    "proc/fs",
];

/// Paths hidden: files that expose host kernel state get `/dev/null` over them, directories an
/// empty read-only tmpfs.
const MASKED_PATHS: &[&str] = &[
    "proc/asound",
    "proc/acpi",
    "proc/kcore",
    "proc/keys",
    "proc/latency_stats",
    "proc/timer_list",
    "proc/timer_stats",
    "proc/sched_debug",
    "proc/scsi",
    "sys/firmware",
    "sys/devices/virtual/powercap",
];

fn restrict_kernel_files(root: &std::path::Path) -> Result<(), InitError> {
    let locked = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    for rel in MASKED_PATHS {
        let path = root.join(rel);
        // A kernel without the file has nothing to hide.
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            mount_raw(
                "tmpfs",
                &path,
                "tmpfs",
                locked | libc::MS_RDONLY,
                Some("size=0"),
            )?;
        } else {
            mount_raw(
                &root.join("dev/null").display().to_string(),
                &path,
                "",
                libc::MS_BIND,
                None,
            )?;
        }
    }
    for rel in READ_ONLY_PATHS {
        let path = root.join(rel);
        if std::fs::symlink_metadata(&path).is_err() {
            continue;
        }
        let p = path.display().to_string();
        mount_raw(&p, &path, "", libc::MS_BIND | libc::MS_REC, None)?;
        mount_raw(
            "none",
            &path,
            "",
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | locked,
            None,
        )?;
    }
    Ok(())
}

/// A minimal /dev: the usual pseudo-devices, a private devpts, /dev/shm and the fd symlinks.
fn populate_dev(dev: &std::path::Path) -> Result<(), InitError> {
    mount_raw(
        "tmpfs",
        dev,
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=755,size=65536k"),
    )?;
    let nodes: [(&str, u32, u32); 6] = [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ];
    for (name, major, minor) in nodes {
        let target = dev.join(name);
        let path = cstr(&target);
        // SAFETY: path is a valid C string; mknod has no other preconditions.
        let made = unsafe {
            libc::mknod(
                path.as_ptr(),
                libc::S_IFCHR | 0o666,
                libc::makedev(major, minor),
            )
        };
        if made == 0 {
            // SAFETY: as above; the umask may have masked the mode.
            unsafe { libc::chmod(path.as_ptr(), 0o666) };
            continue;
        }
        // In a user namespace no device node can be made: the host's own node is bound over an
        // empty file instead (the tmpfs may hold no devices of its own either way).
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
            return Err(err("mknod", name));
        }
        std::fs::File::create(&target).map_err(|e| InitError {
            op: "create",
            what: target.display().to_string(),
            source: e,
        })?;
        mount_raw(&format!("/dev/{name}"), &target, "", libc::MS_BIND, None)?;
    }
    let pts = dev.join("pts");
    let shm = dev.join("shm");
    for d in [&pts, &shm] {
        std::fs::create_dir_all(d).map_err(|e| InitError {
            op: "mkdir",
            what: d.display().to_string(),
            source: e,
        })?;
    }
    mount_raw(
        "devpts",
        &pts,
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=620,gid=5"),
    )?;
    mount_raw(
        "shm",
        &shm,
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777,size=65536k"),
    )?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, dev.join(link));
    }
    Ok(())
}

fn pivot_into(root: &std::path::Path) -> Result<(), InitError> {
    let r = cstr(root);
    // SAFETY: valid C strings; the pivot_root(".", ".") idiom stacks the old root on top of the
    // new one so it can be detached without a helper directory.
    unsafe {
        check(libc::chdir(r.as_ptr()), "chdir", root.display().to_string())?;
        check(
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int,
            "pivot_root",
            root.display().to_string(),
        )?;
        check(
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
            "umount2",
            "old root",
        )?;
        check(libc::chdir(c"/".as_ptr()), "chdir", "/")?;
    }
    Ok(())
}

/// Closes every inherited host descriptor and points stdin and stderr at the sandbox's own
/// /dev/null. Stdout stays the status pipe until envd is ready.
fn detach_host_fds() -> Result<ReadyPipe, InitError> {
    // SAFETY: plain descriptor syscalls on descriptors this process owns.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null < 0 {
            return Err(err("open", "/dev/null"));
        }
        libc::dup2(null, 0);
        libc::dup2(null, 2);
        if null > 2 {
            libc::close(null);
        }
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        // The status pipe moves off fd 1 so that fd 1 can be /dev/null when it is released.
        let status = libc::fcntl(1, libc::F_DUPFD_CLOEXEC, 3);
        if status < 0 {
            return Err(err("dup", "status pipe"));
        }
        libc::dup2(0, 1);
        Ok(ReadyPipe { fd: status })
    }
}

// ---------------------------------------------------------------------------------------------
// Network: the daemon moved one veth end into our namespace; name it eth0, address it, bring it
// and lo up, and route through the host bridge. ioctls keep this synchronous and dependency-free.

pub(crate) fn configure_network(net: Option<&InitNet>) -> Result<(), InitError> {
    // SAFETY: socket() has no preconditions; the fd is closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(err("socket", "for network setup"));
    }
    let result = (|| {
        set_up(sock, "lo")?;
        let Some(net) = net else { return Ok(()) };
        // The daemon creates the interface as eth0; older daemons moved in a differently named
        // one. (/sys/class/net shows the namespace of whoever mounted /sys, so it is consulted
        // only when eth0 is absent, i.e. inside a sandbox with its own /sys.)
        if !link_exists(sock, "eth0") {
            let current = find_veth()?;
            rename_link(sock, &current, "eth0")?;
        }
        set_addr(sock, "eth0", libc::SIOCSIFADDR, net.address)?;
        let mask = if net.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - net.prefix_len as u32)
        };
        set_addr(sock, "eth0", libc::SIOCSIFNETMASK, Ipv4Addr::from(mask))?;
        set_up(sock, "eth0")?;
        add_default_route(sock, net.gateway)
    })();
    // SAFETY: closing our own socket.
    unsafe { libc::close(sock) };
    result
}

fn find_veth() -> Result<String, InitError> {
    let entries = std::fs::read_dir("/sys/class/net").map_err(|e| InitError {
        op: "list",
        what: "/sys/class/net".into(),
        source: e,
    })?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != "lo" {
            return Ok(name);
        }
    }
    Err(InitError {
        op: "find",
        what: "the sandbox network interface".into(),
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    })
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is a plain C struct for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes().take(15)) {
        *dst = src as libc::c_char;
    }
    req
}

fn link_exists(sock: libc::c_int, name: &str) -> bool {
    let mut req = ifreq(name);
    // SAFETY: req is a valid ifreq for SIOCGIFFLAGS.
    unsafe { libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req) == 0 }
}

fn set_up(sock: libc::c_int, name: &str) -> Result<(), InitError> {
    let mut req = ifreq(name);
    // SAFETY: req is a valid ifreq for these ioctls; the union member used matches the request.
    unsafe {
        check(
            libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req),
            "SIOCGIFFLAGS",
            name,
        )?;
        let up = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        // Already up (the daemon prepares the namespace): nothing to ask for.
        if req.ifr_ifru.ifru_flags & libc::IFF_UP as libc::c_short != 0 {
            return Ok(());
        }
        req.ifr_ifru.ifru_flags |= up;
        check(
            libc::ioctl(sock, libc::SIOCSIFFLAGS, &req),
            "SIOCSIFFLAGS",
            name,
        )
    }
}

fn rename_link(sock: libc::c_int, from: &str, to: &str) -> Result<(), InitError> {
    let mut req = ifreq(from);
    // SAFETY: writing the new name into the ifru_newname member, as SIOCSIFNAME expects.
    unsafe {
        for (dst, src) in req.ifr_ifru.ifru_newname.iter_mut().zip(to.bytes()) {
            *dst = src as libc::c_char;
        }
        check(
            libc::ioctl(sock, libc::SIOCSIFNAME, &req),
            "SIOCSIFNAME",
            format!("{from} -> {to}"),
        )
    }
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; this is the documented way to pass an
    // IPv4 address through the generic sockaddr fields of ifreq and rtentry.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn set_addr(
    sock: libc::c_int,
    name: &str,
    request: libc::Ioctl,
    addr: Ipv4Addr,
) -> Result<(), InitError> {
    let mut req = ifreq(name);
    req.ifr_ifru.ifru_addr = sockaddr_in(addr);
    // SAFETY: req is a valid ifreq with the address member set, as the request expects.
    check(
        unsafe { libc::ioctl(sock, request, &req) },
        "set address",
        format!("{addr} on {name}"),
    )
}

fn add_default_route(sock: libc::c_int, gateway: Ipv4Addr) -> Result<(), InitError> {
    // SAFETY: rtentry is a plain C struct for which zero bytes are valid.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr_in(gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // SAFETY: rt is fully initialised for SIOCADDRT.
    check(
        unsafe { libc::ioctl(sock, libc::SIOCADDRT, &rt) },
        "add default route",
        format!("via {gateway}"),
    )
}

// ---------------------------------------------------------------------------------------------
// Privileges

/// The capabilities root keeps inside a sandbox: what ordinary workloads need (Docker's default
/// set without MKNOD and AUDIT_WRITE). Everything else leaves the bounding set for good.
pub const KEPT_CAPABILITIES: &[u32] = &[
    0,  // CAP_CHOWN
    1,  // CAP_DAC_OVERRIDE
    3,  // CAP_FOWNER
    4,  // CAP_FSETID
    5,  // CAP_KILL
    6,  // CAP_SETGID
    7,  // CAP_SETUID
    8,  // CAP_SETPCAP
    10, // CAP_NET_BIND_SERVICE
    13, // CAP_NET_RAW
    18, // CAP_SYS_CHROOT
    31, // CAP_SETFCAP
];

/// Drops capabilities, sets no_new_privs and installs the default seccomp filter. Called by envd
/// after it is listening and before it serves; every process of the sandbox inherits the result.
pub fn lock_down() -> Result<(), InitError> {
    let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(40);
    for cap in 0..=last_cap {
        if !KEPT_CAPABILITIES.contains(&cap) {
            // SAFETY: prctl with integer arguments only.
            let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            // EINVAL: capability unknown to this kernel.
            if rc < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
                return Err(err("drop capability from bounding set", cap.to_string()));
            }
        }
    }
    let mask: u64 = KEPT_CAPABILITIES.iter().map(|c| 1u64 << c).sum();
    set_capabilities(mask)?;
    // SAFETY: prctl with integer arguments only.
    check(
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
        "prctl",
        "PR_SET_NO_NEW_PRIVS",
    )?;
    crate::seccomp::install_default_filter().map_err(|e| InitError {
        op: "install",
        what: "seccomp filter".into(),
        source: std::io::Error::other(e),
    })
}

fn set_capabilities(mask: u64) -> Result<(), InitError> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let lo = mask as u32;
    let hi = (mask >> 32) as u32;
    let data = [
        Data {
            effective: lo,
            permitted: lo,
            inheritable: 0,
        },
        Data {
            effective: hi,
            permitted: hi,
            inheritable: 0,
        },
    ];
    // SAFETY: header and data have the layout capset(2) expects for version 3 (two data words).
    check(
        unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) as libc::c_int },
        "capset",
        format!("{mask:#x}"),
    )
}

/// Where the runtime makes the init binary visible inside every sandbox (an extra read-only overlay
/// layer holding only this file). PID 1 re-executes itself from here once it has pivoted, so that
/// its executable is a file of the sandbox's own root: CRIU must resolve every mapped file inside
/// the sandbox's mount namespace to dump it, and the host path it was started from is not there.
pub const IN_SANDBOX_BINARY: &str = "/.warren/init";

/// Beside it: the host's ELF interpreter (as `ld.so`) and the init binary's shared libraries.
/// An image without them (busybox) cannot exec the binary directly; it is run through this
/// loader instead, so that every file mapped into PID 1 is still inside the sandbox.
pub const IN_SANDBOX_LIBS: &str = "/.warren/lib";
/// The loader in [`IN_SANDBOX_LIBS`].
pub const IN_SANDBOX_LOADER: &str = "/.warren/lib/ld.so";

/// The `init` argument that marks the second stage, after the re-exec from [`IN_SANDBOX_BINARY`]:
/// `init --continue <status fd> <spec fd>`.
const CONTINUE_ARG: &str = "--continue";

/// Re-executes the init binary from [`IN_SANDBOX_BINARY`], handing over the status pipe and the
/// spec (in a memfd, as it can be larger than a pipe buffer). Returns only on failure.
fn exec_in_sandbox(spec: &InitSpec, ready: &ReadyPipe) -> InitError {
    let json = serde_json::to_vec(spec).expect("init spec serializes");
    // SAFETY: memfd_create with a valid name; the descriptor is owned by this process and handed
    // to the exec'd image on purpose (no MFD_CLOEXEC).
    let memfd = unsafe { libc::memfd_create(c"init-spec".as_ptr(), 0) };
    if memfd < 0 {
        return err("memfd_create", "init spec");
    }
    // SAFETY: writing a valid buffer to our memfd, rewinding it, and clearing FD_CLOEXEC on the
    // status pipe so it survives the exec.
    unsafe {
        if libc::write(memfd, json.as_ptr().cast(), json.len()) != json.len() as isize {
            return err("write", "init spec memfd");
        }
        libc::lseek(memfd, 0, libc::SEEK_SET);
        if libc::fcntl(ready.fd, libc::F_SETFD, 0) < 0 {
            return err("fcntl", "status pipe");
        }
    }
    let argv: Vec<std::ffi::CString> = [
        "warren-envd".to_string(),
        "init".to_string(),
        CONTINUE_ARG.to_string(),
        ready.fd.to_string(),
        memfd.to_string(),
    ]
    .iter()
    .map(cstr)
    .collect();
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let path = cstr(IN_SANDBOX_BINARY);
    // SAFETY: path and argv are valid NUL-terminated strings, argv is NULL-terminated; the
    // environment is inherited unchanged.
    unsafe { libc::execv(path.as_ptr(), ptrs.as_ptr()) };
    let mut e = err("exec", IN_SANDBOX_BINARY);
    if e.source.kind() == std::io::ErrorKind::NotFound
        && std::path::Path::new(IN_SANDBOX_LOADER).is_file()
    {
        // No ELF interpreter in this root: run the binary through the one beside it.
        let loader_argv: Vec<std::ffi::CString> = [
            IN_SANDBOX_LOADER,
            "--library-path",
            IN_SANDBOX_LIBS,
            "--argv0",
            "warren-envd",
            IN_SANDBOX_BINARY,
        ]
        .iter()
        .map(|a| cstr(*a))
        .chain(argv.iter().skip(1).cloned())
        .collect();
        let mut ptrs: Vec<*const libc::c_char> = loader_argv.iter().map(|a| a.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        let loader = cstr(IN_SANDBOX_LOADER);
        // SAFETY: as above: valid NUL-terminated strings and a NULL-terminated argv.
        unsafe { libc::execv(loader.as_ptr(), ptrs.as_ptr()) };
        e = err("exec", IN_SANDBOX_LOADER);
    }
    // SAFETY: the exec failed, so this process goes on: the memfd is ours to close, and the
    // status pipe must not leak into the processes envd starts.
    unsafe {
        libc::close(memfd);
        libc::fcntl(ready.fd, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    e
}

/// The second stage: takes over the status pipe and reads the spec from the memfd.
fn continue_after_exec(args: &[String]) -> Result<(InitSpec, ReadyPipe), InitError> {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    let fd = |i: usize| -> Result<libc::c_int, InitError> {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| InitError {
                op: "parse",
                what: format!("{CONTINUE_ARG} arguments {args:?}"),
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            })
    };
    let (status, spec_fd) = (fd(0)?, fd(1)?);
    // SAFETY: the first stage passed us this memfd and nothing else owns it; File closes it.
    let mut file = unsafe { std::fs::File::from_raw_fd(spec_fd) };
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).map_err(|e| InitError {
        op: "read",
        what: "init spec memfd".into(),
        source: e,
    })?;
    drop(file);
    // SAFETY: the status pipe is ours; it must not leak into processes envd starts.
    unsafe { libc::fcntl(status, libc::F_SETFD, libc::FD_CLOEXEC) };
    let spec = serde_json::from_slice(&buf).map_err(|e| InitError {
        op: "parse",
        what: "init spec".into(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })?;
    Ok((spec, ReadyPipe { fd: status }))
}

/// The whole init sequence of `warren-envd init`: fork into the pid namespace, read the spec,
/// build the sandbox, listen on the envd port, drop privileges, report ready, then hand the
/// listener to `serve` (which never returns). Failures are reported to the daemon and end the
/// process.
pub fn run_sandbox_init<F>(serve: F) -> !
where
    F: FnOnce(EnvdSettings, std::net::TcpListener) -> std::io::Result<()>,
{
    let fatal = |msg: String| -> ! {
        let line = format!("error {}\n", msg.replace('\n', " "));
        // SAFETY: writing a valid buffer to fd 1 (the status pipe until setup detaches it).
        unsafe {
            libc::write(1, line.as_ptr().cast(), line.len());
            libc::_exit(1)
        }
    };
    let args: Vec<String> = std::env::args().collect();
    let (spec, ready) = if args.get(2).map(String::as_str) == Some(CONTINUE_ARG) {
        continue_after_exec(&args[3..]).unwrap_or_else(|e| fatal(e.to_string()))
    } else {
        if let Err(e) = fork_into_pid_namespace() {
            fatal(e.to_string());
        }
        let spec = read_spec().unwrap_or_else(|e| fatal(e.to_string()));
        let ready = setup_sandbox(&spec).unwrap_or_else(|e| fatal(e.to_string()));
        if std::path::Path::new(IN_SANDBOX_BINARY).is_file() {
            // Never returns on success.
            let e = exec_in_sandbox(&spec, &ready);
            // ENOENT for a file that is there, and no loader beside it (a layer made without
            // ldd): the sandbox's root lacks the binary's ELF interpreter (an image without
            // glibc, e.g. busybox). Go on from the host binary as before the re-exec existed;
            // only CRIU dumps of this sandbox are lost.
            if e.source.kind() != std::io::ErrorKind::NotFound {
                ready.fail(&e.to_string());
                std::process::exit(1);
            }
        }
        (spec, ready)
    };
    let listener = match std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, crate::ENVD_PORT)) {
        Ok(l) => l,
        Err(e) => {
            ready.fail(&format!("bind envd port {}: {e}", crate::ENVD_PORT));
            std::process::exit(1);
        }
    };
    if let Err(e) = lock_down() {
        ready.fail(&e.to_string());
        std::process::exit(1);
    }
    ready.ready();
    match serve(spec.envd, listener) {
        Ok(()) => std::process::exit(0),
        Err(_) => std::process::exit(1),
    }
}
