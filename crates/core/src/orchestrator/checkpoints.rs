//! Checkpoints, restores and forks.
//!
//! A checkpoint is taken synchronously under the sandbox's operation lock: the runtime freezes
//! the sandbox, copies its upper dir and (for `memory`) dumps its tree with CRIU, then thaws it
//! (`keepRunning: true`) or ends it (`false`, after which the sandbox is removed). The sandbox's
//! state does not change meanwhile: requests arriving during the freeze wait for it.
//!
//! A restore creates a new sandbox (own id, address, access token, copy-on-write root over the
//! checkpoint's files). With `memory` the runtime restores the tree and the daemon re-keys the
//! restored envd through its `POST /init` (new access token and env vars) with the admin token
//! the source was created with; filesystem-only, the sandbox boots fresh on the checkpoint's files.
//!
//! A fork (`POST /sandboxes/{id}/fork`) is a checkpoint with the source running on, labelled
//! [`FORK_LABEL`], and N restores of it; such checkpoints are collected once no sandbox uses them.
//! Any checkpoint whose files a live sandbox still stacks is kept until that sandbox is gone: a
//! delete answers 409, the TTL waits.

use super::{new_sandbox_id, Warren};
use crate::auth::{generate_access_token, Principal};
use crate::checkpoint::{Checkpoint, CheckpointPhase, CheckpointSource, FORK_LABEL};
use crate::envd_client::InitRequest;
use crate::error::CoreError;
use crate::state::{Event, SandboxState};
use crate::store::SandboxRecord;
use chrono::Utc;
use std::collections::BTreeMap;
use std::sync::Arc;
use warren_runtime::{CheckpointOptions, RuntimeError};

/// Most forks one request may ask for.
pub const MAX_FORKS: u32 = 100;
/// Restores of one fork request that run at once.
const FORK_PARALLELISM: usize = 10;
/// A fork's checkpoint younger than this is kept even if no sandbox uses it yet: its forks are
/// being created.
const FORK_CHECKPOINT_GRACE: chrono::Duration = chrono::Duration::seconds(120);

/// What a restore is asked for.
#[derive(Debug, Clone, Default)]
pub struct RestoreRequest {
    pub timeout_secs: Option<i64>,
    pub metadata: BTreeMap<String, String>,
    /// Added to (and overriding) the source's env vars.
    pub env_vars: BTreeMap<String, String>,
}

fn unavailable(e: RuntimeError) -> CoreError {
    match e {
        RuntimeError::CheckpointUnavailable(why) => {
            CoreError::Unavailable(format!("checkpoints are not available on this host: {why}"))
        }
        e => e.into(),
    }
}

fn random_suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

impl Warren {
    /// Takes a checkpoint. Returns the stored object in phase `Succeeded`; on failure nothing is
    /// stored and the source runs as before.
    pub async fn create_checkpoint(
        &self,
        who: &Principal,
        mut ck: Checkpoint,
    ) -> Result<Checkpoint, CoreError> {
        if ck.metadata.name.is_empty() {
            ck.metadata.name = format!("checkpoint-{}", random_suffix());
        }
        let ttl = ck
            .validate()
            .map_err(|e| CoreError::InvalidArgument(e.to_string()))?;
        let id = ck.spec.sandbox.clone();
        self.visible(who, &id).await?;
        if ck.memory() {
            self.runtime.hibernate_support().map_err(|why| {
                CoreError::Unavailable(format!(
                    "memory checkpoints are not available on this host: {why}"
                ))
            })?;
        }
        let lock = self.lock_for(&id);
        let _guard = lock.lock().await;
        let rec = self.visible(who, &id).await?;
        match rec.state {
            SandboxState::Running | SandboxState::Paused => {}
            SandboxState::Hibernated => {
                return Err(CoreError::Conflict(format!(
                    "sandbox {id} is hibernated: connect to it (which wakes it) before a checkpoint"
                )))
            }
            other => {
                return Err(CoreError::Conflict(format!(
                    "sandbox {id} is {other}: only running or paused sandboxes can be checkpointed"
                )))
            }
        }
        let source = CheckpointSource {
            team_id: rec.team_id.clone(),
            template_id: rec.template_id.clone(),
            env_vars: rec.env_vars.clone(),
            spec: rec.spec.clone(),
            cpu_count: rec.cpu_count,
            memory_mb: rec.memory_mb,
            disk_mb: rec.disk_mb,
            allow_internet: rec.allow_internet,
        };
        let name = ck.metadata.name.clone();
        ck.status = crate::checkpoint::CheckpointStatus {
            phase: CheckpointPhase::Running,
            template: Some(rec.template_id.clone()),
            created_at: Some(Utc::now()),
            ..Default::default()
        };
        if !self.store.insert_checkpoint(&ck, &source).await? {
            return Err(CoreError::Conflict(format!(
                "checkpoint {name} already exists"
            )));
        }
        let opts = CheckpointOptions {
            memory: ck.memory(),
            keep_running: ck.spec.keep_running,
        };
        let info = match self.runtime.checkpoint(&id, &name, &opts).await {
            Ok(info) => info,
            Err(e) => {
                tracing::warn!(sandbox = %id, checkpoint = %name, error = %e, "checkpoint failed");
                let _ = self.runtime.delete_checkpoint(&name).await;
                self.store.delete_checkpoint(&name).await?;
                if !opts.keep_running && !self.runtime.is_alive(&id) {
                    self.kill_locked(&id).await?;
                }
                return Err(unavailable(e));
            }
        };
        let now = Utc::now();
        let s = &mut ck.status;
        s.phase = CheckpointPhase::Succeeded;
        s.memory_size = Some(info.image_bytes);
        s.filesystem_size = Some(info.fs_bytes);
        s.size = Some(info.image_bytes + info.fs_bytes);
        s.duration_ms = Some(info.duration.as_secs_f64() * 1000.0);
        s.freeze_duration_ms = Some(info.frozen.as_secs_f64() * 1000.0);
        s.completed_at = Some(now);
        s.expires_at = ttl.map(|t| now + t);
        self.store.update_checkpoint(&ck).await?;
        tracing::info!(
            sandbox = %id,
            checkpoint = %name,
            bytes = info.image_bytes + info.fs_bytes,
            frozen_ms = info.frozen.as_millis() as u64,
            "checkpoint taken"
        );
        if !opts.keep_running {
            self.kill_locked(&id).await?;
        }
        Ok(ck)
    }

    /// A checkpoint the principal may see.
    pub async fn get_checkpoint(
        &self,
        who: &Principal,
        name: &str,
    ) -> Result<Checkpoint, CoreError> {
        Ok(self.checkpoint_with_source(who, name).await?.0)
    }

    async fn checkpoint_with_source(
        &self,
        who: &Principal,
        name: &str,
    ) -> Result<(Checkpoint, CheckpointSource), CoreError> {
        match self.store.get_checkpoint(name).await? {
            Some((c, s)) if s.team_id == who.team => Ok((c, s)),
            _ => Err(CoreError::NotFound(format!("checkpoint {name} not found"))),
        }
    }

    /// Whether `name` names a checkpoint of the principal's team (a create's templateID may).
    pub async fn is_checkpoint(&self, who: &Principal, name: &str) -> bool {
        self.checkpoint_with_source(who, name).await.is_ok()
    }

    /// The team's checkpoints, oldest first.
    pub async fn list_checkpoints(&self, who: &Principal) -> Result<Vec<Checkpoint>, CoreError> {
        Ok(self
            .store
            .list_checkpoints()
            .await?
            .into_iter()
            .filter(|(_, team)| *team == who.team)
            .map(|(c, _)| c)
            .collect())
    }

    /// Live sandboxes that stack the checkpoint's files.
    async fn checkpoint_users(&self, name: &str) -> Result<Vec<String>, CoreError> {
        let Some(layer) = self.runtime.checkpoint_layer(name) else {
            return Ok(Vec::new());
        };
        Ok(self
            .store
            .list_all()
            .await?
            .into_iter()
            .filter(|r| !matches!(r.state, SandboxState::Killed | SandboxState::Failed))
            .filter(|r| r.spec.rootfs.lower_dirs.contains(&layer))
            .map(|r| r.id)
            .collect())
    }

    pub async fn delete_checkpoint(&self, who: &Principal, name: &str) -> Result<(), CoreError> {
        let (c, _) = self.checkpoint_with_source(who, name).await?;
        if c.status.phase == CheckpointPhase::Running {
            return Err(CoreError::Conflict(format!(
                "checkpoint {name} is being taken; delete it once it has finished"
            )));
        }
        let users = self.checkpoint_users(name).await?;
        if !users.is_empty() {
            return Err(CoreError::Conflict(format!(
                "checkpoint {name} holds the files of sandboxes {}: kill them first",
                users.join(", ")
            )));
        }
        self.remove_checkpoint(name).await
    }

    async fn remove_checkpoint(&self, name: &str) -> Result<(), CoreError> {
        self.store.delete_checkpoint(name).await?;
        self.runtime.delete_checkpoint(name).await?;
        tracing::info!(checkpoint = %name, "checkpoint deleted");
        Ok(())
    }

    /// Creates one sandbox from a checkpoint.
    pub async fn restore_checkpoint(
        &self,
        who: &Principal,
        name: &str,
        req: RestoreRequest,
    ) -> Result<SandboxRecord, CoreError> {
        let timeout = self.timeout(req.timeout_secs)?;
        let (ck, source) = self.checkpoint_with_source(who, name).await?;
        if ck.status.phase != CheckpointPhase::Succeeded {
            return Err(CoreError::Conflict(format!(
                "checkpoint {name} is {:?}, not usable",
                ck.status.phase
            )));
        }
        for (k, v) in &req.env_vars {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return Err(CoreError::InvalidArgument(format!(
                    "invalid environment variable {k:?}"
                )));
            }
        }
        let layer = self.runtime.checkpoint_layer(name).ok_or_else(|| {
            CoreError::NotFound(format!("the files of checkpoint {name} are gone"))
        })?;
        let memory = ck.memory();
        if memory && source.spec.envd.admin_token.is_none() {
            return Err(CoreError::Conflict(format!(
                "checkpoint {name} is of a sandbox made before checkpoints could re-key envd; \
                 take a new one"
            )));
        }
        let id = new_sandbox_id();
        let token = generate_access_token();
        let mut spec = source.spec.clone();
        spec.id = id.clone();
        spec.rootfs.lower_dirs.insert(0, layer);
        spec.envd.access_token = Some(token.clone());
        let mut env_vars = source.env_vars.clone();
        env_vars.extend(req.env_vars.clone());
        spec.envd.env_vars.extend(req.env_vars);
        let now = self.clock.now();
        let rec = SandboxRecord {
            id: id.clone(),
            template_id: name.to_string(),
            team_id: who.team.clone(),
            api_key_id: who.key_id.clone(),
            state: SandboxState::Creating,
            metadata: req.metadata,
            env_vars,
            envd_access_token: token.clone(),
            cpu_count: source.cpu_count,
            memory_mb: source.memory_mb,
            disk_mb: source.disk_mb,
            allow_internet: source.allow_internet,
            auto_pause: false,
            auto_resume_secs: None,
            started_at: now,
            end_at: now + timeout,
            placement: None,
            spec: spec.clone(),
        };
        self.store.insert(rec).await?;
        let lock = self.lock_for(&id);
        let _guard = lock.lock().await;
        let started = std::time::Instant::now();
        let placement = if memory {
            self.runtime.restore_checkpoint(name, &spec).await
        } else {
            self.runtime.create(&spec).await
        };
        let placement = match placement {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(sandbox = %id, checkpoint = %name, error = %e, "restore failed");
                self.abandon_create(&id).await;
                return Err(unavailable(e));
            }
        };
        if memory {
            let init = InitRequest {
                env_vars: spec.envd.env_vars.clone(),
                access_token: token,
                default_user: spec.envd.default_user.clone(),
            };
            let envd = self
                .pools
                .envd
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let admin = spec.envd.admin_token.clone().unwrap_or_default();
            if let Err(e) = envd.init(placement.envd_addr(), &admin, &init).await {
                tracing::warn!(sandbox = %id, error = %e, "restored envd refused /init");
                self.abandon_create(&id).await;
                return Err(CoreError::Internal(format!(
                    "the restored sandbox's envd could not be re-keyed: {e}"
                )));
            }
        }
        let now = self.clock.now();
        let rec = self
            .store
            .apply(&id, Event::Started, move |r| {
                r.placement = Some(placement);
                r.started_at = now;
                r.end_at = now + timeout;
            })
            .await;
        let rec = match rec {
            Ok(r) => r,
            Err(e) => {
                self.abandon_create(&id).await;
                return Err(e.into());
            }
        };
        self.set_route(&rec);
        tracing::info!(
            sandbox = %id,
            checkpoint = %name,
            ms = started.elapsed().as_millis() as u64,
            "sandbox restored from checkpoint"
        );
        Ok(rec)
    }

    /// Creates `count` sandboxes from one checkpoint, in parallel; one result per sandbox, in
    /// order.
    pub async fn restore_many(
        self: &Arc<Self>,
        who: &Principal,
        name: &str,
        count: u32,
        req: RestoreRequest,
    ) -> Result<Vec<Result<SandboxRecord, CoreError>>, CoreError> {
        if count == 0 || count > MAX_FORKS {
            return Err(CoreError::InvalidArgument(format!(
                "count must be between 1 and {MAX_FORKS} (got {count})"
            )));
        }
        self.timeout(req.timeout_secs)?;
        // A missing checkpoint fails the request as a whole, not each item.
        self.checkpoint_with_source(who, name).await?;
        let gate = Arc::new(tokio::sync::Semaphore::new(FORK_PARALLELISM));
        let mut tasks = Vec::new();
        for _ in 0..count {
            let (me, who, name, req, gate) = (
                self.clone(),
                who.clone(),
                name.to_string(),
                req.clone(),
                gate.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let _permit = gate.acquire().await;
                me.restore_checkpoint(&who, &name, req).await
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(
                t.await
                    .unwrap_or_else(|e| Err(CoreError::Internal(format!("restore task: {e}")))),
            );
        }
        Ok(out)
    }

    /// E2B's fork: checkpoints the sandbox (which runs on) and restores it `count` times.
    pub async fn fork(
        self: &Arc<Self>,
        who: &Principal,
        id: &str,
        count: u32,
        timeout_secs: Option<i64>,
    ) -> Result<Vec<Result<SandboxRecord, CoreError>>, CoreError> {
        if count == 0 || count > MAX_FORKS {
            return Err(CoreError::InvalidArgument(format!(
                "count must be between 1 and {MAX_FORKS} (got {count})"
            )));
        }
        self.timeout(timeout_secs)?;
        let rec = self.visible(who, id).await?;
        let mut ck = Checkpoint {
            api_version: crate::objects::API_VERSION.into(),
            kind: crate::checkpoint::KIND_CHECKPOINT.into(),
            metadata: Default::default(),
            spec: crate::checkpoint::CheckpointSpec {
                sandbox: id.to_string(),
                container_name: None,
                keep_running: true,
                ttl_after_finished: None,
                persistent_contents: vec!["memory".into(), "filesystem".into()],
            },
            status: Default::default(),
        };
        ck.metadata.name = format!("fork-{id}-{}", random_suffix());
        ck.metadata
            .labels
            .insert(FORK_LABEL.to_string(), id.to_string());
        let ck = self.create_checkpoint(who, ck).await?;
        let req = RestoreRequest {
            timeout_secs,
            metadata: rec.metadata.clone(),
            env_vars: BTreeMap::new(),
        };
        self.restore_many(who, &ck.metadata.name, count, req).await
    }

    /// Part of the background tick: deletes checkpoints whose TTL passed and fork checkpoints
    /// no sandbox uses any more (each only once no live sandbox stacks its files).
    pub(super) async fn expire_checkpoints(&self) {
        let Ok(all) = self.store.list_checkpoints().await else {
            return;
        };
        let now = self.clock.now();
        for (c, _) in all {
            let name = &c.metadata.name;
            let expired = c.status.expires_at.is_some_and(|t| t <= now);
            let spent_fork = c.fork_of().is_some()
                && c.status
                    .created_at
                    .is_some_and(|t| now - t > FORK_CHECKPOINT_GRACE);
            let failed = c.status.phase == CheckpointPhase::Failed;
            if !(expired || spent_fork || failed) {
                continue;
            }
            match self.checkpoint_users(name).await {
                Ok(users) if users.is_empty() => {
                    if let Err(e) = self.remove_checkpoint(name).await {
                        tracing::warn!(checkpoint = %name, error = %e, "collecting checkpoint failed");
                    }
                }
                _ => {}
            }
        }
    }

    /// At start: checkpoints a crash interrupted are failed (their partial files are removed).
    pub(super) async fn recover_checkpoints(&self) -> Result<(), CoreError> {
        for (mut c, _) in self.store.list_checkpoints().await? {
            if c.status.phase == CheckpointPhase::Running
                || c.status.phase == CheckpointPhase::Pending
            {
                c.status.phase = CheckpointPhase::Failed;
                c.status.message = Some("the daemon restarted during the checkpoint".into());
                self.store.update_checkpoint(&c).await?;
                let _ = self.runtime.delete_checkpoint(&c.metadata.name).await;
            }
        }
        Ok(())
    }
}
