//! The per-sandbox disk cap: a sandbox's overlay upper and work dirs live on a file system of
//! their own, an ext4 made in a sparse image file (`<sandbox dir>/disk.img`) and loop-mounted at
//! `<sandbox dir>/disk`. A sandbox that fills it gets `ENOSPC` ("No space left on device") from
//! its own file system, `df /` inside shows the cap, and the host spends at most the cap on it
//! (the image is sparse and mounted with `discard`, so deleted files give their blocks back).
//!
//! Why not one shared file system with project quotas, one project id per sandbox: this kernel is
//! built without `CONFIG_XFS_QUOTA` (XFS accepts no `prjquota` mount) and without
//! `CONFIG_QFMT_V2`, without which ext4 refuses to mount a file system with its `quota` feature
//! (`dmesg`: "The kernel was not built with CONFIG_QUOTA and CONFIG_QFMT_V2"). btrfs qgroups would
//! work but answer `EDQUOT`, not `ENOSPC`, and need btrfs-progs. Besides, ext4 project quotas
//! answer `EDQUOT` too and are ignored by holders of CAP_SYS_RESOURCE; a file system per sandbox
//! holds against anyone, needs only e2fsprogs (in every Debian), and costs a few milliseconds
//! of create time (mkfs of a sparse image writes under 1 MiB; see BENCHMARKS.md).
//!
//! The mount lives in the daemon's mount namespace, not the sandbox's, so it outlives the
//! daemon's process: after a daemon restart running and hibernated sandboxes still find their
//! files, and [`ensure_mounted`] mounts the image again if the mount went away (a wake after the
//! host unmounted it). [`release`] detaches it; the loop device frees itself with the last
//! reference (`LO_FLAGS_AUTOCLEAR`).

use crate::RuntimeError;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The image file, in the sandbox dir.
pub const IMAGE: &str = "disk.img";
/// Where the image is mounted, in the sandbox dir.
pub const MOUNT: &str = "disk";

/// The smallest cap: ext4 needs room for its journal and metadata.
pub const MIN_MB: u64 = 16;

// <linux/loop.h>; stable kernel ABI, not in the libc crate.
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Whether this host can make sandbox disks (loop devices, mkfs.ext4 ≥ 1.47); why not otherwise.
/// For the daemon's start, so a missing piece shows once, not as failed creates.
pub fn check_support() -> Result<(), String> {
    if !Path::new("/dev/loop-control").exists() {
        return Err("no /dev/loop-control (the kernel needs CONFIG_BLK_DEV_LOOP)".into());
    }
    let out = std::process::Command::new("mkfs.ext4")
        .arg("-V")
        .output()
        .map_err(|e| format!("cannot run mkfs.ext4 (install e2fsprogs): {e}"))?;
    // "mke2fs 1.47.0 (5-Feb-2023)" on stderr.
    let text = String::from_utf8_lossy(&out.stderr);
    let version = text
        .split_whitespace()
        .nth(1)
        .and_then(|v| {
            let mut it = v.split('.').map(|n| n.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .ok_or_else(|| format!("unexpected mkfs.ext4 -V output: {}", text.trim()))?;
    if version < (1, 47) {
        return Err(format!(
            "mkfs.ext4 {}.{} is too old: assume_storage_prezeroed needs e2fsprogs 1.47",
            version.0, version.1
        ));
    }
    Ok(())
}

/// The upper and work dirs of a sandbox whose dir is `dir`: on its own file system when it has
/// an image, else directly in `dir` (a sandbox made without a cap).
pub fn overlay_dirs(dir: &Path) -> (PathBuf, PathBuf) {
    if dir.join(IMAGE).exists() {
        let m = dir.join(MOUNT);
        (m.join("upper"), m.join("work"))
    } else {
        (dir.join("upper"), dir.join("work"))
    }
}

/// Makes the root, upper and work dirs of a new sandbox whose dir is `dir`: the upper and work
/// dirs on a `disk_mb` MiB file system of its own ([`create`]), or directly in `dir` when
/// `disk_mb` is 0 (no cap). Every sandbox is made through here (create, and the restore of a
/// checkpoint as a fork), so none escapes its cap.
pub async fn sandbox_dirs(
    dir: &Path,
    disk_mb: u64,
) -> Result<(PathBuf, PathBuf, PathBuf), RuntimeError> {
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(&rootfs).map_err(|e| RuntimeError::io("mkdir", &rootfs, e))?;
    let (upper, work) = if disk_mb > 0 {
        create(dir, disk_mb).await?
    } else {
        let (upper, work) = overlay_dirs(dir);
        for d in [&upper, &work] {
            std::fs::create_dir_all(d).map_err(|e| RuntimeError::io("mkdir", d, e))?;
        }
        (upper, work)
    };
    Ok((rootfs, upper, work))
}

/// Makes a `size_mb` MiB file system for the sandbox whose dir is `dir` (which exists), mounts it
/// and creates the upper and work dirs on it. Fails on a host without `mkfs.ext4` or loop
/// devices, naming what is missing. On error, [`release`] and removing `dir` undo it.
pub async fn create(dir: &Path, size_mb: u64) -> Result<(PathBuf, PathBuf), RuntimeError> {
    if size_mb < MIN_MB {
        return Err(RuntimeError::Config(format!(
            "a sandbox disk of {size_mb} MiB is too small: the least is {MIN_MB} MiB"
        )));
    }
    let image = dir.join(IMAGE);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&image)
        .map_err(|e| RuntimeError::io("create", &image, e))?;
    // Sparse: the host spends blocks only for what the sandbox writes.
    file.set_len(size_mb << 20)
        .map_err(|e| RuntimeError::io("truncate", &image, e))?;
    drop(file);
    // assume_storage_prezeroed: the fresh sparse file reads as zeros, so mkfs neither writes the
    // inode tables nor leaves them to the kernel's background zeroing thread; nodiscard: nothing
    // to discard in a new file. -m 0: no blocks reserved for root, the cap is the cap.
    // No journal: a sandbox's disk never has to survive a host crash (its sandbox does not: the
    // restart sweep removes it), and without one the sandbox gets 3 % more of its cap, the host
    // is spared the journal writes and each mount its jbd2 thread.
    let out = tokio::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-O", "^has_journal"])
        .args(["-E", "assume_storage_prezeroed=1,nodiscard"])
        .arg(&image)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| {
            RuntimeError::io(
                "run mkfs.ext4 (from e2fsprogs, needed for sandbox disk caps) on",
                &image,
                e,
            )
        })?;
    if !out.status.success() {
        return Err(RuntimeError::io(
            "mkfs.ext4",
            &image,
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        ));
    }
    mount(dir)?;
    let (upper, work) = overlay_dirs(dir);
    for d in [&upper, &work] {
        std::fs::create_dir(d).map_err(|e| RuntimeError::io("mkdir", d, e))?;
    }
    Ok((upper, work))
}

/// Whether the sandbox's disk is mounted (its mount point is on another device than its dir).
pub fn is_mounted(dir: &Path) -> bool {
    match (
        std::fs::symlink_metadata(dir),
        std::fs::symlink_metadata(dir.join(MOUNT)),
    ) {
        (Ok(d), Ok(m)) => d.dev() != m.dev(),
        _ => false,
    }
}

/// Mounts the sandbox's image again if it has one and it is not mounted. Idempotent.
pub fn ensure_mounted(dir: &Path) -> Result<(), RuntimeError> {
    if !dir.join(IMAGE).exists() || is_mounted(dir) {
        return Ok(());
    }
    mount(dir)
}

/// Detaches the sandbox's disk from the daemon's mount namespace, if mounted. Idempotent. The
/// file system (and the loop device) go away once no mount namespace holds it any more.
pub fn release(dir: &Path) {
    let target = dir.join(MOUNT);
    if !is_mounted(dir) {
        return;
    }
    if let Err(e) = rustix::mount::unmount(&target, rustix::mount::UnmountFlags::DETACH) {
        tracing::warn!(path = %target.display(), error = %e, "unmount sandbox disk");
    }
}

/// Bytes used and total of the sandbox's disk (what `df` shows), when it has one mounted.
pub fn usage(dir: &Path) -> Option<(u64, u64)> {
    if !is_mounted(dir) {
        return None;
    }
    let st = rustix::fs::statvfs(dir.join(MOUNT)).ok()?;
    let total = st.f_blocks * st.f_frsize;
    let used = (st.f_blocks - st.f_bfree) * st.f_frsize;
    Some((used, total))
}

fn mount(dir: &Path) -> Result<(), RuntimeError> {
    let image = dir.join(IMAGE);
    let target = dir.join(MOUNT);
    std::fs::create_dir_all(&target).map_err(|e| RuntimeError::io("mkdir", &target, e))?;
    let (n, loop_dev) = attach_loop(&image)?;
    let dev = format!("/dev/loop{n}");
    // nosuid/nodev: files a sandbox writes never act as set-uid programs or devices through the
    // host's view of its disk (the sandbox's own overlay mount has its own flags). discard hands
    // the blocks of deleted files back to the host (the loop device punches holes in the image).
    let mounted = rustix::mount::mount(
        dev.as_str(),
        &target,
        "ext4",
        rustix::mount::MountFlags::NOSUID | rustix::mount::MountFlags::NODEV,
        c"discard",
    );
    // With LO_FLAGS_AUTOCLEAR the loop device lets go of the image once the mount is gone and this
    // descriptor closed (or at once here, when the mount failed).
    drop(loop_dev);
    mounted.map_err(|e| {
        RuntimeError::io(
            "mount sandbox disk",
            &target,
            std::io::Error::from_raw_os_error(e.raw_os_error()),
        )
    })
}

/// Binds a free loop device to `image`. Returns its number and an open descriptor of it.
fn attach_loop(image: &Path) -> Result<(u32, OwnedFd), RuntimeError> {
    let ctl = open_rw(Path::new("/dev/loop-control"))?;
    let backing = open_rw(image)?;
    let mut name = [0u8; 64];
    let bytes = image.as_os_str().as_bytes();
    let keep = bytes.len().min(63);
    name[..keep].copy_from_slice(&bytes[bytes.len() - keep..]);
    let mut flags = LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO;
    // Another process may take the device LOOP_CTL_GET_FREE offered between the two calls.
    for _ in 0..32 {
        // SAFETY: ioctl without argument on an open loop-control descriptor.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(RuntimeError::io(
                "get a free loop device from",
                "/dev/loop-control",
                std::io::Error::last_os_error(),
            ));
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let dev = open_rw(&path)?;
        // SAFETY: LoopConfig is plain data; all-zero is its "unset" value.
        let mut config: LoopConfig = unsafe { std::mem::zeroed() };
        config.fd = backing.as_raw_fd() as u32;
        config.info.lo_flags = flags;
        config.info.lo_file_name = name;
        // SAFETY: LOOP_CONFIGURE reads a struct loop_config, which `config` is laid out as.
        let rc = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &config) };
        if rc == 0 {
            return Ok((n as u32, dev));
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EBUSY) => continue,
            // Kernels that refuse direct I/O for this backing file: fall back to buffered.
            Some(libc::EINVAL) if flags & LO_FLAGS_DIRECT_IO != 0 => {
                flags &= !LO_FLAGS_DIRECT_IO;
                continue;
            }
            _ => return Err(RuntimeError::io("attach loop device to", image, err)),
        }
    }
    Err(RuntimeError::io(
        "attach loop device to",
        image,
        std::io::Error::other("every free loop device was taken by others, 32 times"),
    ))
}

fn open_rw(path: &Path) -> Result<OwnedFd, RuntimeError> {
    // std opens with O_CLOEXEC, so sandbox inits spawned meanwhile inherit nothing.
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map(OwnedFd::from)
        .map_err(|e| RuntimeError::io("open", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_config_has_the_kernel_layout() {
        // struct loop_info64 is 232 bytes, struct loop_config 304 (linux/loop.h).
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }

    #[test]
    fn this_host_supports_disks() {
        check_support().expect("loop devices and mkfs.ext4 1.47 (e2fsprogs)");
    }

    #[test]
    fn dirs_without_an_image_are_the_plain_ones() {
        let (u, w) = overlay_dirs(Path::new("/nonexistent/sb"));
        assert_eq!(u, Path::new("/nonexistent/sb/upper"));
        assert_eq!(w, Path::new("/nonexistent/sb/work"));
    }
}
