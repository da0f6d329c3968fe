//! An in-memory [`SandboxRuntime`] for unit tests of the control plane and the API: it keeps the
//! state a real runtime would have (which sandboxes exist, which are frozen) without touching the
//! kernel, and can be told to fail, so error paths are testable without root.

use crate::{
    CheckpointInfo, CheckpointOptions, CheckpointStats, NetworkPolicy, Placement, RuntimeError,
    SandboxRuntime, SandboxSpec, SandboxStats,
};
use async_trait::async_trait;
use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;

#[derive(Debug, Clone, PartialEq)]
pub struct FakeSandbox {
    pub spec: SandboxSpec,
    pub placement: Placement,
    pub frozen: bool,
    pub alive: bool,
    /// Dumped to "disk": no process runs, the placement's address is kept.
    pub hibernated: bool,
    /// What [`SandboxRuntime::stats`] answers; tests set it with [`FakeRuntime::set_stats`].
    pub stats: SandboxStats,
}

#[derive(Default)]
pub struct FakeRuntime {
    sandboxes: Mutex<HashMap<String, FakeSandbox>>,
    next_pid: AtomicU32,
    fail_next_create: AtomicBool,
    /// Why hibernation is unavailable, when a test says so (a host without a working CRIU).
    no_hibernate: Mutex<Option<String>>,
    /// Checkpoints taken (by name).
    checkpoints: Mutex<HashSet<String>>,
    /// Sandbox id → the checkpoint it was restored from.
    restored: Mutex<HashMap<String, String>>,
}

impl FakeRuntime {
    pub fn new() -> Self {
        FakeRuntime {
            next_pid: AtomicU32::new(1000),
            ..Default::default()
        }
    }

    /// Makes the next `create` fail, as a real runtime does when the kernel refuses.
    pub fn fail_next_create(&self) {
        self.fail_next_create.store(true, Ordering::SeqCst);
    }

    /// Makes hibernation unavailable, as on a host where CRIU does not work.
    pub fn disable_hibernate(&self, reason: &str) {
        *self.no_hibernate.lock().unwrap() = Some(reason.to_string());
    }

    /// Simulates the sandbox's init dying on its own.
    pub fn crash(&self, id: &str) {
        if let Some(s) = self.sandboxes.lock().unwrap().get_mut(id) {
            s.alive = false;
        }
    }

    /// The checkpoint sandbox `id` was restored from, if it was.
    pub fn restored_from(&self, id: &str) -> Option<String> {
        self.restored.lock().unwrap().get(id).cloned()
    }

    pub fn get(&self, id: &str) -> Option<FakeSandbox> {
        self.sandboxes.lock().unwrap().get(id).cloned()
    }

    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.sandboxes.lock().unwrap().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Sets the usage the sandbox reports from now on.
    pub fn set_stats(&self, id: &str, stats: SandboxStats) {
        if let Some(s) = self.sandboxes.lock().unwrap().get_mut(id) {
            s.stats = stats;
        }
    }

    /// Pretends a sandbox survived a daemon restart (it exists in the kernel, not yet adopted).
    pub fn insert_leftover(&self, spec: SandboxSpec, placement: Placement) {
        self.sandboxes.lock().unwrap().insert(
            spec.id.clone(),
            FakeSandbox {
                spec,
                placement,
                frozen: false,
                alive: true,
                hibernated: false,
                stats: SandboxStats::default(),
            },
        );
    }
}

#[async_trait]
impl SandboxRuntime for FakeRuntime {
    async fn create(&self, spec: &SandboxSpec) -> Result<Placement, RuntimeError> {
        if self.fail_next_create.swap(false, Ordering::SeqCst) {
            return Err(RuntimeError::StartFailed {
                id: spec.id.clone(),
                reason: "injected failure".into(),
            });
        }
        let pid = self.next_pid.fetch_add(1, Ordering::SeqCst);
        let placement = Placement {
            init_pid: pid,
            init_start_ticks: pid as u64,
            ip: Ipv4Addr::new(10, 0, (pid >> 8) as u8, pid as u8),
            veth: format!("fake{pid}"),
            userns: None,
        };
        let mut map = self.sandboxes.lock().unwrap();
        if map.contains_key(&spec.id) {
            return Err(RuntimeError::StartFailed {
                id: spec.id.clone(),
                reason: "id already in use".into(),
            });
        }
        map.insert(
            spec.id.clone(),
            FakeSandbox {
                spec: spec.clone(),
                placement: placement.clone(),
                frozen: false,
                alive: true,
                hibernated: false,
                stats: SandboxStats::default(),
            },
        );
        Ok(placement)
    }

    async fn freeze(&self, id: &str) -> Result<(), RuntimeError> {
        let mut map = self.sandboxes.lock().unwrap();
        let s = map
            .get_mut(id)
            .ok_or_else(|| RuntimeError::UnknownSandbox(id.into()))?;
        s.frozen = true;
        Ok(())
    }

    async fn thaw(&self, id: &str) -> Result<(), RuntimeError> {
        let mut map = self.sandboxes.lock().unwrap();
        let s = map
            .get_mut(id)
            .ok_or_else(|| RuntimeError::UnknownSandbox(id.into()))?;
        s.frozen = false;
        Ok(())
    }

    async fn destroy(&self, id: &str) -> Result<(), RuntimeError> {
        self.sandboxes.lock().unwrap().remove(id);
        Ok(())
    }

    async fn adopt(&self, id: &str, placement: &Placement) -> Result<bool, RuntimeError> {
        let map = self.sandboxes.lock().unwrap();
        Ok(map
            .get(id)
            .map(|s| s.alive && &s.placement == placement)
            .unwrap_or(false))
    }

    async fn sweep(&self, keep: &HashSet<String>) -> Result<Vec<String>, RuntimeError> {
        let mut map = self.sandboxes.lock().unwrap();
        let gone: Vec<String> = map.keys().filter(|k| !keep.contains(*k)).cloned().collect();
        for id in &gone {
            map.remove(id);
        }
        Ok(gone)
    }

    async fn set_network(&self, id: &str, policy: &NetworkPolicy) -> Result<(), RuntimeError> {
        let mut map = self.sandboxes.lock().unwrap();
        let s = map
            .get_mut(id)
            .ok_or_else(|| RuntimeError::UnknownSandbox(id.into()))?;
        s.spec.network = policy.clone();
        Ok(())
    }

    async fn stats(&self, id: &str) -> Result<SandboxStats, RuntimeError> {
        self.sandboxes
            .lock()
            .unwrap()
            .get(id)
            .map(|s| s.stats)
            .ok_or_else(|| RuntimeError::UnknownSandbox(id.into()))
    }

    fn is_alive(&self, id: &str) -> bool {
        self.sandboxes
            .lock()
            .unwrap()
            .get(id)
            .map(|s| s.alive)
            .unwrap_or(false)
    }

    fn hibernate_support(&self) -> Result<(), String> {
        match self.no_hibernate.lock().unwrap().clone() {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    async fn hibernate(&self, id: &str) -> Result<CheckpointStats, RuntimeError> {
        self.hibernate_support()
            .map_err(RuntimeError::CheckpointUnavailable)?;
        let mut map = self.sandboxes.lock().unwrap();
        let s = map
            .get_mut(id)
            .ok_or_else(|| RuntimeError::UnknownSandbox(id.into()))?;
        if !s.alive || s.hibernated {
            return Err(RuntimeError::Checkpoint {
                op: "dump",
                id: id.into(),
                reason: "no process tree to dump".into(),
            });
        }
        s.alive = false;
        s.frozen = false;
        s.hibernated = true;
        Ok(CheckpointStats {
            bytes: 4096,
            duration: std::time::Duration::from_millis(1),
        })
    }

    async fn wake(&self, id: &str) -> Result<Placement, RuntimeError> {
        let pid = self.next_pid.fetch_add(1, Ordering::SeqCst);
        let mut map = self.sandboxes.lock().unwrap();
        let s = map
            .get_mut(id)
            .ok_or_else(|| RuntimeError::UnknownSandbox(id.into()))?;
        if !s.hibernated {
            return Err(RuntimeError::Checkpoint {
                op: "restore",
                id: id.into(),
                reason: "not hibernated".into(),
            });
        }
        s.hibernated = false;
        s.alive = true;
        s.placement.init_pid = pid;
        s.placement.init_start_ticks = pid as u64;
        Ok(s.placement.clone())
    }

    async fn checkpoint(
        &self,
        id: &str,
        name: &str,
        opts: &CheckpointOptions,
    ) -> Result<CheckpointInfo, RuntimeError> {
        if !self.is_alive(id) {
            return Err(RuntimeError::UnknownSandbox(id.into()));
        }
        self.checkpoints.lock().unwrap().insert(name.to_string());
        Ok(CheckpointInfo {
            image_bytes: if opts.memory { 4096 } else { 0 },
            fs_bytes: 1,
            duration: std::time::Duration::from_millis(1),
            frozen: std::time::Duration::from_millis(1),
        })
    }

    fn checkpoint_layer(&self, name: &str) -> Option<std::path::PathBuf> {
        self.checkpoints
            .lock()
            .unwrap()
            .contains(name)
            .then(|| format!("/fake/checkpoints/{name}/fs").into())
    }

    async fn restore_checkpoint(
        &self,
        name: &str,
        spec: &SandboxSpec,
    ) -> Result<Placement, RuntimeError> {
        if !self.checkpoints.lock().unwrap().contains(name) {
            return Err(RuntimeError::Checkpoint {
                op: "restore",
                id: spec.id.clone(),
                reason: format!("no checkpoint {name}"),
            });
        }
        let placement = self.create(spec).await?;
        self.restored
            .lock()
            .unwrap()
            .insert(spec.id.clone(), name.to_string());
        Ok(placement)
    }

    async fn delete_checkpoint(&self, name: &str) -> Result<(), RuntimeError> {
        self.checkpoints.lock().unwrap().remove(name);
        Ok(())
    }

    async fn adopt_hibernated(
        &self,
        id: &str,
        placement: &Placement,
    ) -> Result<bool, RuntimeError> {
        let map = self.sandboxes.lock().unwrap();
        Ok(map
            .get(id)
            .map(|s| s.hibernated && s.placement.ip == placement.ip)
            .unwrap_or(false))
    }
}
