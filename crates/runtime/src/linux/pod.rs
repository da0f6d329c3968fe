//! Sandboxes inside someone else's cgroup and network namespace: what Warren's Kubernetes node
//! agent needs to run a sandbox inside a Pod (the Pod's cgroup gives Kubernetes' limits and
//! accounting, its network namespace the CNI's address and policies).
//!
//! [`PodRuntime`] is additive beside [`super::LinuxRuntime`]: it sets up no bridge, no nftables
//! table, no address pool and no DNS filter (the Pod's network is the CNI's business), and puts the
//! sandbox's cgroups under a given parent instead of the daemon's own. Everything inside the
//! sandbox is the single-host code: the same init (`warren-envd init`) with the same overlay root,
//! init layer, namespaces, dropped capabilities and seccomp. The start sequence mirrors
//! `LinuxRuntime::create_inner`, kept separate so that the single-host path is not touched.

use super::cgroup::CgroupManager;
use super::checkpoint::{self, prepare_init_layer, CriuSupport, DumpTarget, RootfsRecord};
use super::disk;
use super::snapshots;
use super::{remove_sandbox_dir, spawn_init, start_ticks, valid_id, watch_exit, START_TIMEOUT};
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
use std::time::Instant;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

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
    pub fn adopt_existing(&self) -> Vec<String> {
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
        let started = match self.start(spec, target, &cgroups, &netns).await {
            Ok((placement, alive)) => PodRecord {
                cgroup_parent: parent.to_string(),
                placement: placement.clone(),
            }
            .save(&self.sandbox_dir(id))
            .map(|()| (placement, alive)),
            Err(e) => Err(e),
        };
        match started {
            Ok((placement, alive)) => {
                self.sandboxes.lock().unwrap().insert(
                    id.clone(),
                    PodSandbox {
                        cgroups,
                        parent: parent.to_string(),
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

    async fn start(
        &self,
        spec: &SandboxSpec,
        target: &PodTarget,
        cgroups: &CgroupManager,
        netns: &std::fs::File,
    ) -> Result<(Placement, Arc<AtomicBool>), RuntimeError> {
        let id = &spec.id;
        let dir = self.sandbox_dir(id);
        let rootfs = dir.join("rootfs");
        std::fs::create_dir_all(&rootfs).map_err(|e| RuntimeError::io("mkdir", &rootfs, e))?;
        // The single-host disk cap: the upper and work dirs on a loop-mounted ext4 of
        // `disk_mb`, so a sandbox that fills it gets ENOSPC and the node spends at most that
        // (the Pod's ephemeral-storage request says so to the scheduler). 0: no cap.
        let (upper, work) = if spec.resources.disk_mb > 0 {
            disk::create(&dir, spec.resources.disk_mb).await?
        } else {
            let (upper, work) = disk::overlay_dirs(&dir);
            for d in [&upper, &work] {
                std::fs::create_dir_all(d).map_err(|e| RuntimeError::io("mkdir", d, e))?;
            }
            (upper, work)
        };
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
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
        let failed = |status: &str| start_failure(id, &log_path, status);
        let pid = tokio::time::timeout(START_TIMEOUT, async {
            let first = lines.next_line().await.ok().flatten().unwrap_or_default();
            let pid: u32 = first
                .strip_prefix("pid ")
                .and_then(|p| p.trim().parse().ok())
                .ok_or_else(|| failed(&first))?;
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
            let json = serde_json::to_vec(&init_spec).expect("init spec serializes");
            stdin
                .write_all(&json)
                .await
                .map_err(|e| RuntimeError::sys("write init spec", id, e))?;
            drop(stdin);
            let status = lines.next_line().await.ok().flatten().unwrap_or_default();
            if status != "ready" {
                return Err(failed(&status));
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
        let _ = child.wait().await;
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
        if let Err(e) = placement.save(&dir) {
            tracing::warn!(sandbox = %id, error = %e, "recording the woken sandbox");
        }
        checkpoint::unpin_netns(&dir);
        let spent = dir.join(format!("checkpoint.spent.{pid}"));
        if std::fs::rename(checkpoint::images_dir(&dir), &spent).is_ok() {
            tokio::task::spawn_blocking(move || {
                let _ = std::fs::remove_dir_all(spent);
            });
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
        let dir = self.checkpoints_dir().join(name);
        if dir.exists() {
            return Err(err(format!("checkpoint {name} exists already")));
        }
        let partial = self.checkpoints_dir().join(format!(".{name}.partial"));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial).map_err(|e| RuntimeError::io("mkdir", &partial, e))?;
        let record = RootfsRecord::load(&self.sandbox_dir(id))?;
        let freezer = cg.v2_dir(id);
        let was_frozen = self.is_frozen(id)?;
        let t0 = Instant::now();
        let result = async {
            if !was_frozen {
                self.freeze(id).await?;
            }
            snapshots::copy_tree(id, &record.upper_dir, &partial.join(snapshots::FS_DIR)).await?;
            let image_bytes = match &criu {
                Some(criu) => {
                    checkpoint::dump_into(DumpTarget {
                        criu,
                        id,
                        init_pid: pid,
                        record: &record,
                        images: &partial.join(snapshots::IMAGES_DIR),
                        failed_log: &self
                            .checkpoints_dir()
                            .join(format!(".{name}.dump-failed.log")),
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
        let thawed = if was_frozen || !opts.keep_running {
            Ok(())
        } else {
            self.thaw(id).await
        };
        let frozen = t0.elapsed();
        let image_bytes = match result {
            Ok(b) => b,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&partial);
                if !opts.keep_running && !was_frozen {
                    let _ = self.thaw(id).await;
                }
                return Err(e);
            }
        };
        thawed?;
        if !opts.keep_running {
            let id_owned = id.to_string();
            let cg2 = cg.clone();
            tokio::task::spawn_blocking(move || cg2.kill_all(&id_owned))
                .await
                .expect("kill task does not panic")?;
            let _ = self.thaw(id).await;
        }
        std::fs::rename(&partial, &dir).map_err(|e| RuntimeError::io("rename", &partial, e))?;
        Ok(CheckpointInfo {
            image_bytes,
            fs_bytes: super::disk_usage(&dir.join(snapshots::FS_DIR)),
            duration,
            frozen,
        })
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

    /// Removes a checkpoint's files. Idempotent.
    pub async fn delete_checkpoint(&self, name: &str) -> Result<(), RuntimeError> {
        if !snapshots::valid_name(name) {
            return Ok(());
        }
        let dir = self.checkpoints_dir().join(name);
        tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(RuntimeError::io("remove", &dir, e))
            }
            _ => Ok(()),
        })
        .await
        .expect("remove task does not panic")
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

fn start_failure(id: &str, log: &Path, status: &str) -> RuntimeError {
    let reason = match status.strip_prefix("error ") {
        Some(msg) => msg.to_string(),
        None => {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            match log.trim() {
                "" => "sandbox init exited without reporting".to_string(),
                l => format!("sandbox init failed: {l}"),
            }
        }
    };
    RuntimeError::StartFailed {
        id: id.to_string(),
        reason,
    }
}
