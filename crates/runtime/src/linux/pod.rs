//! Sandboxes inside someone else's cgroup and network namespace: what Warren's Kubernetes node
//! agent needs to run a sandbox inside a Pod (the Pod's cgroup gives Kubernetes' limits and
//! accounting, its network namespace the CNI's address and policies).
//!
//! [`PodRuntime`] is additive beside [`super::LinuxRuntime`]: it sets up no bridge, no nftables
//! table, no address pool and no DNS filter (the Pod's network is the CNI's business), and puts the
//! sandbox's cgroups under a given parent instead of the daemon's own. Everything inside the
//! sandbox is the single-host code: the same init (`warren-envd init`) with the same overlay root,
//! init layer, namespaces, dropped capabilities and seccomp. The start sequence mirrors
//! `LinuxRuntime::create_inner`; the init handshake, checkpoints and forks (restores of a
//! checkpoint) call the same functions as the single-host runtime.

use super::cgroup::CgroupManager;
use super::checkpoint::{self, prepare_init_layer, CriuSupport, RootfsRecord};
use super::disk;
use super::snapshots;
use super::{init_handshake, remove_sandbox_dir, spawn_init, start_ticks, valid_id, watch_exit};
use crate::init::InitSpec;
use crate::{
    CheckpointInfo, CheckpointOptions, CheckpointStats, Placement, RuntimeError, SandboxSpec,
};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Where a sandbox goes: an existing network namespace and cgroup.
#[derive(Debug, Clone, PartialEq)]
pub struct PodTarget {
    /// A network namespace file (`/proc/<pid>/ns/net`, `/var/run/netns/<name>`), already
    /// configured (the CNI's interface and address).
    pub netns: PathBuf,
    /// The parent cgroup, relative to the root of each hierarchy (`kubepods/pod<uid>`); the
    /// sandbox gets the child `<parent>/<id>` in every hierarchy Warren uses.
    pub cgroup_parent: String,
    /// The address the sandbox has in that namespace (the Pod IP), for [`Placement::ip`].
    pub ip: Ipv4Addr,
}

/// What a restarted agent needs to find a sandbox again: `<dir>/pod.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct PodRecord {
    cgroup_parent: String,
    placement: Placement,
}

const POD_RECORD: &str = "pod.json";

impl PodRecord {
    fn save(&self, dir: &Path) -> Result<(), RuntimeError> {
        let path = dir.join(POD_RECORD);
        let tmp = dir.join(".pod.json.tmp");
        let json = serde_json::to_vec(self).expect("pod record serializes");
        std::fs::write(&tmp, json).map_err(|e| RuntimeError::io("write", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| RuntimeError::io("rename", &tmp, e))
    }
}

struct PodSandbox {
    cgroups: CgroupManager,
    /// The Pod's cgroup, relative to each hierarchy's root.
    parent: String,
    placement: Placement,
    alive: Arc<AtomicBool>,
    /// Its tree is dumped to `<dir>/checkpoint` and no process runs.
    hibernated: bool,
}

/// Runs sandboxes in given cgroups and network namespaces (see the module docs).
pub struct PodRuntime {
    data_dir: PathBuf,
    envd_binary: PathBuf,
    init_layer: PathBuf,
    criu: CriuSupport,
    sandboxes: Mutex<HashMap<String, PodSandbox>>,
}

impl PodRuntime {
    pub fn new(data_dir: PathBuf, envd_binary: PathBuf) -> Result<Self, RuntimeError> {
        if !envd_binary.is_file() {
            return Err(RuntimeError::Config(format!(
                "envd binary {} not found",
                envd_binary.display()
            )));
        }
        let dir = data_dir.join("sandboxes");
        std::fs::create_dir_all(&dir).map_err(|e| RuntimeError::io("mkdir", &dir, e))?;
        // As in LinuxRuntime::new: sandbox inits re-parent to us, so we reap them.
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        let init_layer = prepare_init_layer(&data_dir, &envd_binary)?;
        let criu = CriuSupport::detect();
        if let CriuSupport::Unavailable(why) = &criu {
            tracing::warn!(%why, "hibernation and checkpoints are unavailable on this node");
        }
        Ok(PodRuntime {
            data_dir,
            envd_binary,
            init_layer,
            criu,
            sandboxes: Mutex::new(HashMap::new()),
        })
    }

    fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("sandboxes").join(id)
    }

    /// After an agent restart: tracks again every sandbox recorded under the data dir, running
    /// (its init still the recorded process), hibernated (complete images) or dead (so that a
    /// delete still cleans it). Returns the ids. Needs a tokio runtime (exit watchers).
    ///
    /// A hibernation or wake the restart cut short is settled first, as single-host recovery
    /// does: a CRIU still dumping or restoring is waited for; a tree restored by a wake whose
    /// record was never written is killed, so the sandbox is hibernated again on its complete
    /// images; the images of a recorded wake are dropped.
    pub async fn adopt_existing(&self) -> Vec<String> {
        let mut adopted = vec![];
        let Ok(rd) = std::fs::read_dir(self.data_dir.join("sandboxes")) else {
            return adopted;
        };
        for e in rd.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if !valid_id(&id) || self.sandboxes.lock().unwrap().contains_key(&id) {
                continue;
            }
            let dir = e.path();
            let Some(rec) = std::fs::read(dir.join(POD_RECORD))
                .ok()
                .and_then(|b| serde_json::from_slice::<PodRecord>(&b).ok())
            else {
                continue;
            };
            let cgroups = match CgroupManager::new(&rec.cgroup_parent) {
                Ok(c) => c,
                Err(err) => {
                    tracing::warn!(sandbox = %id, error = %err, "cannot adopt: its cgroup parent");
                    continue;
                }
            };
            if let Err(err) = settle_interrupted(&cgroups, &id, &dir, &rec.placement).await {
                tracing::warn!(sandbox = %id, error = %err, "settling an interrupted hibernation or wake");
            }
            let pid = rec.placement.init_pid;
            let running = start_ticks(pid) == Some(rec.placement.init_start_ticks);
            let hibernated = !running && checkpoint::has_images(&dir);
            let alive = if running {
                match watch_exit(pid, id.clone()) {
                    Ok(a) => a,
                    Err(err) => {
                        tracing::warn!(sandbox = %id, error = %err, "cannot watch adopted init");
                        Arc::new(AtomicBool::new(false))
                    }
                }
            } else {
                Arc::new(AtomicBool::new(false))
            };
            tracing::info!(sandbox = %id, running, hibernated, "adopted sandbox");
            self.sandboxes.lock().unwrap().insert(
                id.clone(),
                PodSandbox {
                    cgroups,
                    parent: rec.cgroup_parent,
                    placement: rec.placement,
                    alive,
                    hibernated,
                },
            );
            adopted.push(id);
        }
        adopted
    }

    /// Creates and starts the sandbox in `target`; returns once envd serves. The spec's
    /// `network` is ignored: the namespace's own configuration applies.
    pub async fn create(
        &self,
        spec: &SandboxSpec,
        target: &PodTarget,
    ) -> Result<Placement, RuntimeError> {
        let id = &spec.id;
        if !valid_id(id) {
            return Err(RuntimeError::Config(format!(
                "sandbox id {id:?} must be 1-64 characters of [a-z0-9]"
            )));
        }
        if self.sandboxes.lock().unwrap().contains_key(id) {
            return Err(RuntimeError::StartFailed {
                id: id.clone(),
                reason: "a sandbox with this id exists".into(),
            });
        }
        let (parent, netns, cgroups) = self.prepare(target)?;
        let started = self.start(spec, target, &cgroups, &netns).await;
        self.register(id, parent, cgroups, started).await
    }

    /// Checks and opens `target`, before anything is made for a sandbox.
    fn prepare(
        &self,
        target: &PodTarget,
    ) -> Result<(String, std::fs::File, CgroupManager), RuntimeError> {
        let netns = std::fs::File::open(&target.netns)
            .map_err(|e| RuntimeError::io("open network namespace", &target.netns, e))?;
        let parent = target.cgroup_parent.trim_matches('/');
        if parent.is_empty() || parent.split('/').any(|c| c == ".." || c == ".") {
            return Err(RuntimeError::Config(format!(
                "cgroup parent {:?} must be a relative path below the cgroup root",
                target.cgroup_parent
            )));
        }
        let cgroups = CgroupManager::new(parent)?;
        Ok((parent.to_string(), netns, cgroups))
    }

    /// Records and tracks a sandbox that started, or removes what a failed start left.
    async fn register(
        &self,
        id: &str,
        parent: String,
        cgroups: CgroupManager,
        started: Result<(Placement, Arc<AtomicBool>), RuntimeError>,
    ) -> Result<Placement, RuntimeError> {
        let started = match started {
            Ok((placement, alive)) => PodRecord {
                cgroup_parent: parent.clone(),
                placement: placement.clone(),
            }
            .save(&self.sandbox_dir(id))
            .map(|()| (placement, alive)),
            Err(e) => Err(e),
        };
        match started {
            Ok((placement, alive)) => {
                self.sandboxes.lock().unwrap().insert(
                    id.to_string(),
                    PodSandbox {
                        cgroups,
                        parent,
                        placement: placement.clone(),
                        alive,
                        hibernated: false,
                    },
                );
                Ok(placement)
            }
            Err(e) => {
                if let Err(c) = cleanup(&cgroups, id, &self.sandbox_dir(id)).await {
                    tracing::error!(sandbox = %id, error = %c, "cleanup after failed create");
                }
                Err(e)
            }
        }
    }

    /// Whether checkpoint `name` holds process images on this node (a fork can restore it).
    pub fn has_checkpoint_images(&self, name: &str) -> bool {
        snapshots::valid_name(name)
            && self
                .checkpoints_dir()
                .join(name)
                .join(snapshots::IMAGES_DIR)
                .join("inventory.img")
                .is_file()
    }

    /// The root of a fork of checkpoint `name` that boots fresh (a filesystem-only checkpoint):
    /// its files over the source's lower dirs (without Warren's init layer, which create puts on
    /// top), with the source's binds. `None` when the node does not hold it.
    pub fn checkpoint_root(&self, name: &str) -> Option<crate::RootfsSpec> {
        if !snapshots::valid_name(name) {
            return None;
        }
        let dir = self.checkpoints_dir().join(name);
        let fs = dir.join(snapshots::FS_DIR);
        let source = RootfsRecord::load(&dir).ok().filter(|_| fs.is_dir())?;
        Some(crate::RootfsSpec {
            lower_dirs: std::iter::once(fs)
                .chain(source.lower_dirs.into_iter().skip(1))
                .collect(),
            ro_binds: source.ro_binds,
        })
    }

    /// Creates sandbox `spec.id` in `target` by restoring checkpoint `name` (a fork), with the
    /// single-host fork code: CRIU restores the tree into a child of the Pod's cgroup and into the
    /// Pod's network namespace, so the fork has the Pod's address; established TCP connections
    /// are closed (listening sockets carry over). Its root is the checkpoint's files over the
    /// source's lower dirs with a fresh upper, so `spec.rootfs` is not used; `spec.envd` is not
    /// either: the restored envd keeps the source's settings until it is re-keyed (`POST /init`).
    pub async fn restore(
        &self,
        name: &str,
        spec: &SandboxSpec,
        target: &PodTarget,
    ) -> Result<Placement, RuntimeError> {
        let id = &spec.id;
        if !valid_id(id) {
            return Err(RuntimeError::Config(format!(
                "sandbox id {id:?} must be 1-64 characters of [a-z0-9]"
            )));
        }
        if self.sandboxes.lock().unwrap().contains_key(id) {
            return Err(RuntimeError::StartFailed {
                id: id.clone(),
                reason: "a sandbox with this id exists".into(),
            });
        }
        let criu = self.criu.binary()?.to_path_buf();
        let (images, source) = snapshots::checkpoint_source(&self.checkpoints_dir(), name, id)?;
        if checkpoint::images_have_userns(&images) {
            return Err(RuntimeError::Checkpoint {
                op: "restore",
                id: id.clone(),
                reason: format!(
                    "checkpoint {name} was taken in a user namespace of Warren's (single-host \
                     mode); a Pod's sandbox runs without one"
                ),
            });
        }
        let (parent, netns, cgroups) = self.prepare(target)?;
        let dir = self.sandbox_dir(id);
        let started = async {
            // The checkpoint's files over the source's own lower dirs; `fork_record` puts the
            // source's init layer (its first lower dir) on top again.
            let lowers: Vec<PathBuf> =
                std::iter::once(self.checkpoints_dir().join(name).join(snapshots::FS_DIR))
                    .chain(source.lower_dirs.iter().skip(1).cloned())
                    .collect();
            let record =
                snapshots::fork_record(&dir, &source, &lowers, spec.resources.disk_mb).await?;
            let procs = cgroups.create(id, &spec.resources)?;
            let (pid, ticks, alive) = snapshots::restore_fork(snapshots::ForkRestore {
                criu: &criu,
                id,
                images: &images,
                dir: &dir,
                record: &record,
                netns: netns.as_raw_fd(),
                cgroup_procs: &procs,
                userns: None,
            })
            .await?;
            Ok((
                Placement {
                    init_pid: pid,
                    init_start_ticks: ticks,
                    ip: target.ip,
                    veth: String::new(),
                    userns: None,
                },
                alive,
            ))
        }
        .await;
        if started.is_err() {
            snapshots::keep_restore_log(&self.checkpoints_dir(), name, id, &dir);
        }
        self.register(id, parent, cgroups, started).await
    }

    async fn start(
        &self,
        spec: &SandboxSpec,
        target: &PodTarget,
        cgroups: &CgroupManager,
        netns: &std::fs::File,
    ) -> Result<(Placement, Arc<AtomicBool>), RuntimeError> {
        let id = &spec.id;
        let dir = self.sandbox_dir(id);
        // The single-host disk cap: the upper and work dirs on a loop-mounted ext4 of
        // `disk_mb`, so a sandbox that fills it gets ENOSPC and the node spends at most that
        // (the Pod's ephemeral-storage request says so to the scheduler). 0: no cap.
        let (rootfs, upper, work) = disk::sandbox_dirs(&dir, spec.resources.disk_mb).await?;
        let procs = cgroups.create(id, &spec.resources)?;
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
        let log_path = dir.join("init.log");
        let log = std::fs::File::create(&log_path)
            .map_err(|e| RuntimeError::io("create", &log_path, e))?;
        let mut child = spawn_init(&self.envd_binary, &procs, netns.as_raw_fd(), log, None)
            .map_err(|e| RuntimeError::sys("spawn sandbox init in pod", id, e))?;
        let init_spec = InitSpec {
            id: id.clone(),
            lower_dirs,
            upper_dir: upper.clone(),
            work_dir: work.clone(),
            rootfs_dir: rootfs.clone(),
            ro_binds: spec.rootfs.ro_binds.clone(),
            // The Pod's namespace is configured by its CNI already.
            net: None,
            envd: spec.envd.clone(),
            // The Pod is the isolation boundary here: no user namespace of Warren's inside it.
            mounts: None,
        };
        let pid = init_handshake(&mut child, &init_spec, &log_path).await?;
        let init_start_ticks = start_ticks(pid).ok_or_else(|| RuntimeError::StartFailed {
            id: id.clone(),
            reason: "sandbox init exited right after starting".into(),
        })?;
        let alive = watch_exit(pid, id.clone())?;
        Ok((
            Placement {
                init_pid: pid,
                init_start_ticks,
                ip: target.ip,
                veth: String::new(),
                userns: None,
            },
            alive,
        ))
    }

    fn cgroups_of(&self, id: &str) -> Result<CgroupManager, RuntimeError> {
        self.sandboxes
            .lock()
            .unwrap()
            .get(id)
            .map(|s| s.cgroups.clone())
            .ok_or_else(|| RuntimeError::UnknownSandbox(id.to_string()))
    }

    /// The placement of a sandbox this runtime runs.
    pub fn placement(&self, id: &str) -> Option<Placement> {
        self.sandboxes
            .lock()
            .unwrap()
            .get(id)
            .map(|s| s.placement.clone())
    }

    pub fn is_alive(&self, id: &str) -> bool {
        self.sandboxes
            .lock()
            .unwrap()
            .get(id)
            .is_some_and(|s| s.alive.load(Ordering::SeqCst))
    }

    /// The sandbox's cumulative usage (CPU, memory, disk), read as single-host mode reads it.
    pub async fn stats(&self, id: &str) -> Result<crate::SandboxStats, RuntimeError> {
        let cg = self.cgroups_of(id)?;
        super::read_stats(cg, self.sandbox_dir(id), id).await
    }

    /// The sandbox's cgroup2 directory (freezer state, events).
    pub fn v2_dir(&self, id: &str) -> Result<PathBuf, RuntimeError> {
        Ok(self.cgroups_of(id)?.v2_dir(id))
    }

    pub async fn freeze(&self, id: &str) -> Result<(), RuntimeError> {
        let cg = self.cgroups_of(id)?;
        let id = id.to_string();
        tokio::task::spawn_blocking(move || cg.freeze(&id))
            .await
            .expect("freeze task does not panic")
    }

    pub async fn thaw(&self, id: &str) -> Result<(), RuntimeError> {
        let cg = self.cgroups_of(id)?;
        let id = id.to_string();
        tokio::task::spawn_blocking(move || cg.thaw(&id))
            .await
            .expect("thaw task does not panic")
    }

    fn hibernated(&self, id: &str) -> Result<bool, RuntimeError> {
        self.sandboxes
            .lock()
            .unwrap()
            .get(id)
            .map(|s| s.hibernated)
            .ok_or_else(|| RuntimeError::UnknownSandbox(id.to_string()))
    }

    /// Whether the sandbox is hibernated (its tree on disk, no process running).
    pub fn is_hibernated(&self, id: &str) -> bool {
        self.hibernated(id).unwrap_or(false)
    }

    /// Whether CRIU works on this node; the reason when not.
    pub fn hibernate_support(&self) -> Result<(), String> {
        match &self.criu {
            CriuSupport::Available(_) => Ok(()),
            CriuSupport::Unavailable(why) => Err(why.clone()),
        }
    }

    fn live_pid(&self, id: &str, op: &'static str) -> Result<u32, RuntimeError> {
        let map = self.sandboxes.lock().unwrap();
        let s = map
            .get(id)
            .ok_or_else(|| RuntimeError::UnknownSandbox(id.to_string()))?;
        if s.hibernated || !s.alive.load(Ordering::SeqCst) {
            return Err(RuntimeError::Checkpoint {
                op,
                id: id.to_string(),
                reason: if s.hibernated {
                    "the sandbox is hibernated".into()
                } else {
                    "the sandbox has no running process".into()
                },
            });
        }
        Ok(s.placement.init_pid)
    }

    fn is_frozen(&self, id: &str) -> Result<bool, RuntimeError> {
        let dir = self.v2_dir(id)?;
        Ok(std::fs::read_to_string(dir.join("cgroup.freeze"))
            .map(|s| s.trim() == "1")
            .unwrap_or(false))
    }

    /// Dumps the sandbox's tree with CRIU and ends it: its memory is freed; the Pod keeps the
    /// network namespace (pinned under the sandbox dir too) and the cgroup stays. As
    /// `LinuxRuntime::hibernate`.
    pub async fn hibernate(&self, id: &str) -> Result<CheckpointStats, RuntimeError> {
        let criu = self.criu.binary()?.to_path_buf();
        let pid = self.live_pid(id, "dump")?;
        let cg = self.cgroups_of(id)?;
        let dir = self.sandbox_dir(id);
        let freezer = cg.v2_dir(id);
        let was_frozen = self.is_frozen(id)?;
        let stats = match checkpoint::dump(&criu, id, pid, &dir, Some(&freezer), false).await {
            Ok(s) => s,
            Err(e) => {
                checkpoint::unpin_netns(&dir);
                // CRIU thaws what it froze; a paused sandbox stays paused.
                if was_frozen {
                    let _ = self.freeze(id).await;
                }
                return Err(e);
            }
        };
        // CRIU killed the tree; nothing may be left, and the cgroup must not stay frozen or the
        // restored tree would start frozen.
        let id_owned = id.to_string();
        let cg2 = cg.clone();
        tokio::task::spawn_blocking(move || cg2.kill_all(&id_owned))
            .await
            .expect("kill task does not panic")?;
        if let Some(s) = self.sandboxes.lock().unwrap().get_mut(id) {
            s.hibernated = true;
            s.alive.store(false, Ordering::SeqCst);
        }
        Ok(stats)
    }

    /// Restores a hibernated sandbox into the same cgroup, root and network namespace.
    pub async fn wake(&self, id: &str) -> Result<Placement, RuntimeError> {
        let criu = self.criu.binary()?.to_path_buf();
        if !self.hibernated(id)? {
            return Err(RuntimeError::Checkpoint {
                op: "restore",
                id: id.to_string(),
                reason: "the sandbox is not hibernated".into(),
            });
        }
        let cg = self.cgroups_of(id)?;
        let dir = self.sandbox_dir(id);
        // The disk's mount is the agent's: a restarted agent (a new mount namespace in its
        // DaemonSet's container) mounts it again before the tree comes back onto it.
        disk::ensure_mounted(&dir)?;
        let procs: Vec<PathBuf> = cg
            .dirs(id)
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect();
        let pid = checkpoint::restore(checkpoint::RestoreTarget {
            criu: &criu,
            id,
            dir: &dir,
            cgroup_procs: &procs,
            userns: None,
        })
        .await?;
        let ticks = start_ticks(pid).ok_or_else(|| RuntimeError::Checkpoint {
            op: "restore",
            id: id.to_string(),
            reason: format!("restored init {pid} exited at once"),
        })?;
        let alive = watch_exit(pid, id.to_string())?;
        let placement = {
            let mut map = self.sandboxes.lock().unwrap();
            let s = map
                .get_mut(id)
                .ok_or_else(|| RuntimeError::UnknownSandbox(id.to_string()))?;
            s.placement.init_pid = pid;
            s.placement.init_start_ticks = ticks;
            s.alive = alive;
            s.hibernated = false;
            PodRecord {
                cgroup_parent: s.parent.clone(),
                placement: s.placement.clone(),
            }
        };
        // The images are spent only once the record names the restored init: until then a
        // restarted agent finds the sandbox hibernated on them (and ends the unrecorded tree).
        match placement.save(&dir) {
            Ok(()) => checkpoint::release_spent_images(&dir),
            Err(e) => tracing::warn!(sandbox = %id, error = %e, "recording the woken sandbox"),
        }
        Ok(placement.placement)
    }

    fn checkpoints_dir(&self) -> PathBuf {
        self.data_dir.join("checkpoints")
    }

    /// Saves the live sandbox as checkpoint `name` under `<data>/checkpoints/<name>` (the
    /// single-host layout: `fs/` a copy of the upper dir, `images/` the CRIU dump,
    /// `rootfs.json`), frozen for the copy and the dump so that they agree.
    pub async fn checkpoint(
        &self,
        id: &str,
        name: &str,
        opts: &CheckpointOptions,
    ) -> Result<CheckpointInfo, RuntimeError> {
        let err = |reason: String| RuntimeError::Checkpoint {
            id: id.to_string(),
            op: "checkpoint",
            reason,
        };
        if !snapshots::valid_name(name) {
            return Err(err(format!("invalid checkpoint name {name:?}")));
        }
        let criu = if opts.memory {
            Some(self.criu.binary()?.to_path_buf())
        } else {
            None
        };
        let pid = self.live_pid(id, "checkpoint")?;
        let cg = self.cgroups_of(id)?;
        snapshots::take_checkpoint(snapshots::CheckpointJob {
            checkpoints_dir: &self.checkpoints_dir(),
            id,
            name,
            opts,
            criu: criu.as_deref(),
            init_pid: pid,
            sandbox_dir: &self.sandbox_dir(id),
            cgroups: &cg,
        })
        .await
    }

    /// What a commit of the sandbox needs: its upper dir, the template's lower dirs (topmost
    /// first, without Warren's init layer) and its read-only binds.
    pub fn commit_source(
        &self,
        id: &str,
    ) -> Result<(PathBuf, Vec<PathBuf>, Vec<crate::BindMount>), RuntimeError> {
        self.cgroups_of(id)?;
        let record = RootfsRecord::load(&self.sandbox_dir(id))?;
        let lowers = record
            .lower_dirs
            .into_iter()
            .filter(|d| *d != self.init_layer)
            .collect();
        Ok((record.upper_dir, lowers, record.ro_binds))
    }

    /// Removes a checkpoint's files. Idempotent. Refused while a sandbox (a fork, running or
    /// hibernated) or another checkpoint (of a fork) on this node stacks its files in its root:
    /// removing them would pull the files from under a mounted overlay, as single-host mode
    /// refuses too.
    pub async fn delete_checkpoint(&self, name: &str) -> Result<(), RuntimeError> {
        if !snapshots::valid_name(name) {
            return Ok(());
        }
        let users = self.checkpoint_users(name);
        if !users.is_empty() {
            return Err(RuntimeError::Checkpoint {
                op: "delete",
                id: name.to_string(),
                reason: format!(
                    "checkpoint {name} holds the files of {}: delete them first",
                    users.join(", ")
                ),
            });
        }
        snapshots::delete_checkpoint_files(&self.checkpoints_dir(), name).await
    }

    /// The sandboxes and other checkpoints on this node whose root stacks checkpoint `name`'s
    /// files.
    fn checkpoint_users(&self, name: &str) -> Vec<String> {
        let fs = self.checkpoints_dir().join(name).join(snapshots::FS_DIR);
        let uses = |dir: &Path| {
            RootfsRecord::load(dir)
                .map(|r| r.lower_dirs.contains(&fs))
                .unwrap_or(false)
        };
        let ids: Vec<String> = self.sandboxes.lock().unwrap().keys().cloned().collect();
        let mut users: Vec<String> = ids
            .into_iter()
            .filter(|id| uses(&self.sandbox_dir(id)))
            .map(|id| format!("sandbox {id}"))
            .collect();
        if let Ok(rd) = std::fs::read_dir(self.checkpoints_dir()) {
            for e in rd.flatten() {
                let other = e.file_name().to_string_lossy().into_owned();
                if other != name && !other.starts_with('.') && uses(&e.path()) {
                    users.push(format!("checkpoint {other}"));
                }
            }
        }
        users.sort();
        users
    }

    /// Kills the sandbox and removes its cgroups and dir; the Pod's cgroup and namespace stay.
    /// Idempotent: a sandbox this runtime does not know is already gone.
    pub async fn destroy(&self, id: &str) -> Result<(), RuntimeError> {
        let Some(s) = self.sandboxes.lock().unwrap().remove(id) else {
            return Ok(());
        };
        cleanup(&s.cgroups, id, &self.sandbox_dir(id)).await
    }
}

/// Settles, for [`PodRuntime::adopt_existing`], what an agent restart interrupted: a dump (its
/// CRIU outlives the agent; its images are kept if it finished), a restore (waited for), the
/// tree of a wake the record does not name (killed: the images are still complete) and the
/// images of a wake it does name (spent).
async fn settle_interrupted(
    cg: &CgroupManager,
    id: &str,
    dir: &Path,
    recorded: &Placement,
) -> Result<(), RuntimeError> {
    checkpoint::settle_interrupted_dump(id, dir).await?;
    if !checkpoint::has_images(dir) {
        return Ok(());
    }
    if start_ticks(recorded.init_pid) == Some(recorded.init_start_ticks) {
        checkpoint::release_spent_images(dir);
        tracing::info!(sandbox = %id, "dropped the spent images of a wake the agent's restart interrupted");
        return Ok(());
    }
    if checkpoint::end_unrecorded_wake(cg, id, dir).await? {
        tracing::info!(sandbox = %id, "removed the tree of a wake the agent's restart interrupted");
    }
    Ok(())
}

async fn cleanup(cg: &CgroupManager, id: &str, dir: &Path) -> Result<(), RuntimeError> {
    let (cg, id, dir) = (cg.clone(), id.to_string(), dir.to_path_buf());
    tokio::task::spawn_blocking(move || -> Result<(), RuntimeError> {
        cg.kill_all(&id)?;
        remove_sandbox_dir(&dir)?;
        cg.remove(&id)
    })
    .await
    .expect("cleanup task does not panic")
}
