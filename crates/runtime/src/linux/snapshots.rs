//! Checkpoints of live sandboxes and sandboxes restored from them (forks).
//!
//! Layout under `<data>/checkpoints/<name>/`:
//! * `rootfs.json`: the source's overlay layers and binds ([`RootfsRecord`]), so a restore
//!   mounts the files the dumped processes had open and mapped (the same init layer, too);
//! * `fs/`: a copy of the source's upper dir, taken while it was frozen. Forks stack it,
//!   read-only, on top of the source's lower dirs with a fresh empty upper each: copy-on-write,
//!   nothing is copied per fork;
//! * `images/`: the CRIU images (absent for a filesystem-only checkpoint).
//!
//! The network namespace is not in the images (as for hibernation): each fork gets a new one,
//! with its own address. Listening sockets bound to the wildcard address carry over; connections
//! do not (`--tcp-close`).

use super::cgroup::CgroupManager;
use super::checkpoint::{self, DumpTarget, RestoreInto, RootfsRecord};
use super::{start_ticks, valid_id, watch_exit, LinuxRuntime, Tracked};
use crate::{CheckpointInfo, CheckpointOptions, Placement, RuntimeError, SandboxSpec};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

pub(super) const FS_DIR: &str = "fs";
pub(super) const IMAGES_DIR: &str = "images";

/// Checkpoint names become directory names: the same rule as object names, and never `.` files.
pub(super) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

fn ckpt_err(id: &str, op: &'static str, reason: impl Into<String>) -> RuntimeError {
    RuntimeError::Checkpoint {
        id: id.to_string(),
        op,
        reason: reason.into(),
    }
}

/// Copies a directory tree with owners, modes, times, xattrs (overlay's opaque markers),
/// hard links and device nodes (overlay's whiteouts): `cp -a` does all of that correctly, and
/// reflinks where the file system can.
pub(super) async fn copy_tree(id: &str, from: &Path, to: &Path) -> Result<(), RuntimeError> {
    let out = tokio::process::Command::new("cp")
        .arg("-a")
        .arg("--reflink=auto")
        .arg("--")
        .arg(from)
        .arg(to)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| RuntimeError::sys("run cp -a", id, e))?;
    if !out.status.success() {
        return Err(ckpt_err(
            id,
            "checkpoint",
            format!(
                "copying {} failed: {}",
                from.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(())
}

/// What [`take_checkpoint`] needs of a live sandbox; each runtime finds these its own way.
pub(super) struct CheckpointJob<'a> {
    /// `<data>/checkpoints`.
    pub checkpoints_dir: &'a Path,
    pub id: &'a str,
    /// Already checked with [`valid_name`].
    pub name: &'a str,
    pub opts: &'a CheckpointOptions,
    /// CRIU, for a checkpoint with memory.
    pub criu: Option<&'a Path>,
    pub init_pid: u32,
    /// The sandbox's dir (its `rootfs.json`).
    pub sandbox_dir: &'a Path,
    pub cgroups: &'a CgroupManager,
}

/// Saves the live sandbox as checkpoint `name` under `<checkpoints_dir>/<name>`, frozen for the
/// copy and the dump so that files and memory are of one instant. The single-host and the Pod
/// runtime both call this.
pub(super) async fn take_checkpoint(
    job: CheckpointJob<'_>,
) -> Result<CheckpointInfo, RuntimeError> {
    let CheckpointJob {
        checkpoints_dir,
        id,
        name,
        opts,
        criu,
        init_pid,
        sandbox_dir,
        cgroups,
    } = job;
    let dir = checkpoints_dir.join(name);
    if dir.exists() {
        return Err(ckpt_err(
            id,
            "checkpoint",
            format!("checkpoint {name} exists already"),
        ));
    }
    let partial = checkpoints_dir.join(format!(".{name}.partial"));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(|e| RuntimeError::io("mkdir", &partial, e))?;
    let record = RootfsRecord::load(sandbox_dir)?;
    let freezer = cgroups.v2_dir(id);
    let was_frozen = std::fs::read_to_string(freezer.join("cgroup.freeze"))
        .map(|s| s.trim() == "1")
        .unwrap_or(false);
    let freeze = |on: bool| {
        let (cg, id) = (cgroups.clone(), id.to_string());
        async move {
            tokio::task::spawn_blocking(move || if on { cg.freeze(&id) } else { cg.thaw(&id) })
                .await
                .expect("freezer task does not panic")
        }
    };

    let t0 = Instant::now();
    let result = async {
        // Frozen before the copy and through the dump: files and memory are of one instant.
        if !was_frozen {
            freeze(true).await?;
        }
        copy_tree(id, &record.upper_dir, &partial.join(FS_DIR)).await?;
        let image_bytes = match criu {
            Some(criu) => {
                checkpoint::dump_into(DumpTarget {
                    criu,
                    id,
                    init_pid,
                    record: &record,
                    images: &partial.join(IMAGES_DIR),
                    failed_log: &checkpoints_dir.join(format!(".{name}.dump-failed.log")),
                    freezer: Some(&freezer),
                    leave_running: opts.keep_running,
                })
                .await?
                .bytes
            }
            None => 0,
        };
        record.save(&partial)?;
        Ok::<_, RuntimeError>(image_bytes)
    }
    .await;
    let duration = t0.elapsed();
    // CRIU leaves the cgroup as it found it (frozen): thaw what we froze.
    let thawed = if was_frozen || !opts.keep_running {
        Ok(())
    } else {
        freeze(false).await
    };
    let frozen = t0.elapsed();
    let image_bytes = match result {
        Ok(b) => b,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            if !opts.keep_running && !was_frozen {
                let _ = freeze(false).await;
            }
            return Err(e);
        }
    };
    thawed?;
    if !opts.keep_running {
        // The dump ended the tree (or, filesystem-only, nothing did yet): end every process.
        let cg = cgroups.clone();
        let id_owned = id.to_string();
        tokio::task::spawn_blocking(move || cg.kill_all(&id_owned))
            .await
            .expect("kill task does not panic")?;
        let _ = freeze(false).await;
    }
    std::fs::rename(&partial, &dir).map_err(|e| RuntimeError::io("rename", &partial, e))?;
    Ok(CheckpointInfo {
        image_bytes,
        fs_bytes: super::disk_usage(&dir.join(FS_DIR)),
        duration,
        frozen,
    })
}

/// Removes checkpoint `name` (already checked with [`valid_name`]) and what an interrupted dump
/// left of it. Idempotent.
pub(super) async fn delete_checkpoint_files(
    checkpoints_dir: &Path,
    name: &str,
) -> Result<(), RuntimeError> {
    let dir = checkpoints_dir.join(name);
    // What a dump a crash interrupted left.
    let _ = std::fs::remove_dir_all(checkpoints_dir.join(format!(".{name}.partial")));
    // Renamed first so that a half-removed checkpoint never looks usable.
    let doomed = checkpoints_dir.join(format!(".{name}.deleted.{}", std::process::id()));
    match std::fs::rename(&dir, &doomed) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(RuntimeError::io("rename", &dir, e)),
    }
    tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&doomed).map(|_| doomed))
        .await
        .expect("remove task does not panic")
        .map(|_| ())
        .map_err(|e| RuntimeError::io("remove", &dir, e))
}

/// The process images and the source's root of checkpoint `name`, for a restore as sandbox `id`;
/// a clear error when the checkpoint has no images (unknown, filesystem-only or deleted).
pub(super) fn checkpoint_source(
    checkpoints_dir: &Path,
    name: &str,
    id: &str,
) -> Result<(PathBuf, RootfsRecord), RuntimeError> {
    let cdir = checkpoints_dir.join(name);
    let images = cdir.join(IMAGES_DIR);
    if !valid_name(name) || !images.join("inventory.img").is_file() {
        return Err(ckpt_err(
            id,
            "restore",
            format!(
                "checkpoint {name} has no process images (at {})",
                images.display()
            ),
        ));
    }
    let source = RootfsRecord::load(&cdir)?;
    Ok((images, source))
}

/// Makes a fork's dirs under `dir` and records its root: the source's init layer (the restored
/// init maps that very file), then `lower_dirs` (the checkpoint's files over the source's lower
/// dirs, as the caller chose), a fresh upper, the source's binds.
pub(super) async fn fork_record(
    dir: &Path,
    source: &RootfsRecord,
    lower_dirs: &[PathBuf],
    disk_mb: u64,
) -> Result<RootfsRecord, RuntimeError> {
    // A fork gets a capped disk of its own like any new sandbox.
    let (rootfs, upper, work) = super::disk::sandbox_dirs(dir, disk_mb).await?;
    let record = RootfsRecord {
        lower_dirs: source
            .lower_dirs
            .first()
            .cloned()
            .into_iter()
            .chain(lower_dirs.iter().cloned())
            .collect(),
        upper_dir: upper,
        work_dir: work,
        rootfs_dir: rootfs,
        ro_binds: source.ro_binds.clone(),
    };
    record.save(dir)?;
    Ok(record)
}

/// A restore of a checkpoint's images as a new sandbox, into a network namespace and cgroups the
/// caller made.
pub(super) struct ForkRestore<'a> {
    pub criu: &'a Path,
    pub id: &'a str,
    pub images: &'a Path,
    /// The new sandbox's dir (CRIU's log and pidfile go there).
    pub dir: &'a Path,
    /// From [`fork_record`].
    pub record: &'a RootfsRecord,
    pub netns: std::os::fd::RawFd,
    pub cgroup_procs: &'a [PathBuf],
    pub userns: Option<(super::userns::IdRange, crate::init::InitNet)>,
}

/// Restores the tree, gives it the new sandbox's hostname and watches its init; returns the init's
/// pid, its start time and its liveness flag. The single-host and the Pod runtime both call this.
pub(super) async fn restore_fork(
    f: ForkRestore<'_>,
) -> Result<(u32, u64, std::sync::Arc<std::sync::atomic::AtomicBool>), RuntimeError> {
    let id = f.id;
    let pid = checkpoint::restore_into(RestoreInto {
        criu: f.criu,
        id,
        images: f.images,
        work_dir: Some(f.dir),
        record: f.record,
        netns: f.netns,
        cgroup_procs: f.cgroup_procs,
        pidfile: &f.dir.join("restore.pid"),
        userns: f.userns,
    })
    .await?;
    let ticks = start_ticks(pid)
        .ok_or_else(|| ckpt_err(id, "restore", format!("restored init {pid} exited at once")))?;
    let alive = watch_exit(pid, id.to_string())?;
    set_hostname(id, pid)?;
    Ok((pid, ticks, alive))
}

/// After a failed restore: keeps the sandbox's CRIU log beside the checkpoint (the sandbox dir
/// goes with the cleanup) for whoever reads the error.
pub(super) fn keep_restore_log(checkpoints_dir: &Path, name: &str, id: &str, sandbox_dir: &Path) {
    let kept = checkpoints_dir.join(format!(".{name}.restore-{id}-failed.log"));
    if std::fs::rename(sandbox_dir.join("restore.log"), &kept).is_ok() {
        tracing::warn!(sandbox = %id, log = %kept.display(), "restore failed");
    }
}

impl LinuxRuntime {
    fn checkpoints_dir(&self) -> PathBuf {
        self.config.data_dir.join("checkpoints")
    }

    fn checkpoint_dir(&self, name: &str) -> PathBuf {
        self.checkpoints_dir().join(name)
    }

    pub(super) async fn checkpoint_impl(
        &self,
        id: &str,
        name: &str,
        opts: &CheckpointOptions,
    ) -> Result<CheckpointInfo, RuntimeError> {
        if !valid_name(name) {
            return Err(ckpt_err(
                id,
                "checkpoint",
                format!("invalid checkpoint name {name:?}"),
            ));
        }
        let criu = if opts.memory {
            Some(self.criu.binary()?.to_path_buf())
        } else {
            None
        };
        let pid = {
            let map = self.sandboxes.lock().unwrap();
            let t = map
                .get(id)
                .ok_or_else(|| RuntimeError::UnknownSandbox(id.to_string()))?;
            if t.hibernated || !t.alive.load(Ordering::SeqCst) {
                return Err(ckpt_err(
                    id,
                    "checkpoint",
                    if t.hibernated {
                        "the sandbox is hibernated"
                    } else {
                        "the sandbox has no running process"
                    },
                ));
            }
            t.placement.init_pid
        };
        take_checkpoint(CheckpointJob {
            checkpoints_dir: &self.checkpoints_dir(),
            id,
            name,
            opts,
            criu: criu.as_deref(),
            init_pid: pid,
            sandbox_dir: &self.sandbox_dir(id),
            cgroups: &self.cgroups,
        })
        .await
    }

    pub(super) fn checkpoint_layer_impl(&self, name: &str) -> Option<PathBuf> {
        if !valid_name(name) {
            return None;
        }
        let fs = self.checkpoint_dir(name).join(FS_DIR);
        fs.is_dir().then_some(fs)
    }

    pub(super) async fn delete_checkpoint_impl(&self, name: &str) -> Result<(), RuntimeError> {
        if !valid_name(name) {
            return Ok(());
        }
        delete_checkpoint_files(&self.checkpoints_dir(), name).await
    }

    pub(super) async fn restore_checkpoint_impl(
        &self,
        name: &str,
        spec: &SandboxSpec,
    ) -> Result<Placement, RuntimeError> {
        let id = &spec.id;
        if !valid_id(id) {
            return Err(RuntimeError::Config(format!(
                "sandbox id {id:?} must be 1-64 characters of [a-z0-9]"
            )));
        }
        let criu = self.criu.binary()?.to_path_buf();
        let (images, source) = checkpoint_source(&self.checkpoints_dir(), name, id)?;
        if self.sandboxes.lock().unwrap().contains_key(id) {
            return Err(RuntimeError::StartFailed {
                id: id.clone(),
                reason: "a sandbox with this id exists".into(),
            });
        }
        let slot = self.net.take_slot().await?;
        self.refill_networks();
        let result = self
            .restore_inner(&criu, &images, &source, spec, &slot)
            .await;
        match result {
            Ok((placement, alive)) => {
                self.sandboxes.lock().unwrap().insert(
                    id.clone(),
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
                // The sandbox dir goes with the cleanup; its CRIU log is kept for whoever reads
                // the error.
                keep_restore_log(&self.checkpoints_dir(), name, id, &self.sandbox_dir(id));
                if let Err(cleanup) = self
                    .cleanup(
                        id,
                        Some(slot.ip),
                        Some(&slot.veth),
                        !spec.network.allow_internet,
                        !spec.network.egress.is_empty(),
                    )
                    .await
                {
                    tracing::error!(sandbox = %id, error = %cleanup, "cleanup after failed restore");
                }
                self.net.release_ids(&slot);
                Err(e)
            }
        }
    }

    async fn restore_inner(
        &self,
        criu: &Path,
        images: &Path,
        source: &RootfsRecord,
        spec: &SandboxSpec,
        slot: &super::net::NetSlot,
    ) -> Result<(Placement, std::sync::Arc<std::sync::atomic::AtomicBool>), RuntimeError> {
        let id = &spec.id;
        let dir = self.sandbox_dir(id);
        let record = fork_record(
            &dir,
            source,
            &spec.rootfs.lower_dirs,
            spec.resources.disk_mb,
        )
        .await?;
        let procs = self.cgroups.create(id, &spec.resources)?;
        if !spec.network.allow_internet {
            self.net.deny_internet(slot.ip)?;
        }
        if !spec.network.egress.is_empty() {
            self.set_egress(id, slot.ip, &spec.network.egress)?;
        }
        // The restored tree's user namespace follows the checkpoint: one taken in a user
        // namespace is restored into one of its own range (the slot's, or a fresh one from a
        // daemon started without user namespaces); one taken without is restored without (a
        // checkpoint from before user namespaces), and the slot's range goes back to the pool.
        let slot_range = slot.userns.as_ref().map(|(range, _)| *range);
        let (range, extra) = match (checkpoint::images_have_userns(images), slot_range) {
            (true, Some(r)) => (Some(r), false),
            (true, None) => (Some(self.ids.allocate()?), true),
            (false, _) => (None, false),
        };
        let started = restore_fork(ForkRestore {
            criu,
            id,
            images,
            dir: &dir,
            record: &record,
            netns: slot.netns.as_raw_fd(),
            cgroup_procs: &procs,
            userns: range.map(|r| (r, self.net_config(slot.ip))),
        })
        .await;
        let (pid, ticks, alive) = match started {
            Ok(started) => started,
            Err(e) => {
                // The slot's range is released by the caller.
                if let (true, Some(r)) = (extra, &range) {
                    self.ids.release(r);
                }
                return Err(e);
            }
        };
        if range.is_none() {
            self.net.release_ids(slot);
        }
        Ok((
            Placement {
                init_pid: pid,
                init_start_ticks: ticks,
                ip: slot.ip,
                veth: slot.veth.clone(),
                userns: range,
            },
            alive,
        ))
    }
}

/// Gives a restored sandbox its own hostname (its id, as at create; the image holds the
/// source's). A short-lived thread joins the sandbox's UTS namespace: that is per thread, and
/// the namespace it leaves behind when it ends is the thread's own, so the daemon is unaffected.
fn set_hostname(id: &str, pid: u32) -> Result<(), RuntimeError> {
    let path = PathBuf::from(format!("/proc/{pid}/ns/uts"));
    let ns = std::fs::File::open(&path).map_err(|e| RuntimeError::io("open", &path, e))?;
    let name = id.to_string();
    std::thread::spawn(move || -> std::io::Result<()> {
        // SAFETY: setns on an open namespace descriptor and sethostname with a buffer of the
        // given length; both affect only this thread, which ends right after.
        unsafe {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWUTS) != 0
                || libc::sethostname(name.as_ptr().cast(), name.len()) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    })
    .join()
    .map_err(|_| RuntimeError::sys("set hostname", id, std::io::Error::other("thread panicked")))?
    .map_err(|e| RuntimeError::sys("set hostname of restored sandbox", id, e))
}
