//! Warm pools driven by the orchestrator: the claim on create, the reconcile loop (refill,
//! rolling update, scale-down, autoscalers), the declarative objects and the metrics exposition.
//! The decisions themselves are pure functions in [`crate::pool`] and [`crate::autoscaler`].

use super::{new_sandbox_id, CreateRequest, Warren};
use crate::auth::{generate_access_token, Principal};
use crate::autoscaler::{Autoscaler, AutoscalerStatus, Sample};
use crate::envd_client::{EnvdClient, InitRequest};
use crate::error::CoreError;
use crate::objects::{PoolingAutoScaler, SandboxSet};
use crate::pool::{plan, revision, PoolCounts, PoolStatus, ScalerEntry, SetEntry};
use crate::pool_store::{MemberRecord, ObjectTable};
use crate::state::{Event, SandboxState};
use crate::store::SandboxRecord;
use crate::telemetry::{DecisionLabel, PoolLabel, PoolStateLabel, ResultLabel, StateLabel};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use warren_runtime::{EnvdSettings, NetworkPolicy, SandboxSpec};

/// How often the reconcile loop runs when nothing wakes it.
const RECONCILE_EVERY: Duration = Duration::from_millis(500);
/// Claim attempts before falling back to a cold create (a member whose envd refuses `/init` is
/// killed and the next one tried).
const CLAIM_ATTEMPTS: usize = 3;

/// A SandboxSet with its status, as the API returns it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SandboxSetView {
    #[serde(flatten)]
    pub object: SandboxSet,
    pub status: PoolStatus,
}

/// A PoolingAutoScaler with its status.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AutoscalerView {
    #[serde(flatten)]
    pub object: PoolingAutoScaler,
    pub status: AutoscalerStatus,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Warren {
    /// Replaces how claimed members are reconfigured (tests use a fake; the default speaks HTTP).
    pub fn set_envd_client(&self, client: Arc<dyn EnvdClient>) {
        *self.pools.envd.write().unwrap_or_else(|e| e.into_inner()) = client;
    }

    /// Called by `create` before a cold start: hands out a ready member of the template's pool,
    /// reconfigured for the request. `None` means "no pool, or nothing claimable: create cold".
    pub(super) async fn claim_from_pool(
        &self,
        who: &Principal,
        req: &CreateRequest,
        timeout: chrono::Duration,
    ) -> Result<Option<SandboxRecord>, CoreError> {
        let Some((pool, revision, allow_internet)) = self.pools.for_template(&req.template_id)
        else {
            return Ok(None);
        };
        // Members were made with the pool's network settings; a request asking for others
        // gets a sandbox made for it.
        if req.allow_internet.unwrap_or(true) != allow_internet
            || req.network != super::network::NetworkRequest::default()
        {
            self.pools.count_miss(&pool, &req.template_id);
            return Ok(None);
        }
        let began = Instant::now();
        for _ in 0..CLAIM_ATTEMPTS {
            let token = generate_access_token();
            let (team, key) = (who.team.clone(), who.key_id.clone());
            let (metadata, env_vars) = (req.metadata.clone(), req.env_vars.clone());
            let (auto_pause, tok) = (req.auto_pause, token.clone());
            let auto_resume_secs = req.auto_resume.then_some(timeout.num_seconds() as u32);
            let end_at = self.clock.now() + timeout;
            let claimed = self
                .store
                .claim_member(&pool, &revision, allow_internet, move |r| {
                    r.team_id = team;
                    r.api_key_id = key;
                    r.metadata = metadata;
                    r.spec.envd.env_vars = env_vars.clone();
                    r.env_vars = env_vars;
                    r.spec.envd.access_token = Some(tok.clone());
                    r.envd_access_token = tok;
                    r.auto_pause = auto_pause;
                    r.auto_resume_secs = auto_resume_secs;
                    r.end_at = end_at;
                })
                .await?;
            let Some(rec) = claimed else {
                self.pools.count_miss(&pool, &req.template_id);
                self.pools.wake.notify_one();
                return Ok(None);
            };
            let id = rec.id.clone();
            let t_claimed = began.elapsed();
            let lock = self.lock_for(&id);
            let _guard = lock.lock().await;
            // /init replaces envd's env vars and user: keep the image template's under the
            // request's.
            let mut defaults = warren_runtime::EnvdSettings {
                env_vars: req.env_vars.clone(),
                default_user: self.config.default_user.clone(),
                ..Default::default()
            };
            self.templates
                .apply_defaults(&req.template_id, &mut defaults);
            let init = InitRequest {
                env_vars: defaults.env_vars,
                access_token: token,
                default_user: defaults.default_user,
            };
            let envd = self
                .pools
                .envd
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let result = match (rec.placement.as_ref(), rec.spec.envd.admin_token.as_deref()) {
                (Some(p), Some(admin)) => envd.init(p.envd_addr(), admin, &init).await,
                _ => Err("member has no placement or admin token".into()),
            };
            let t_init = began.elapsed();
            if let Err(e) = result {
                tracing::warn!(sandbox = %id, pool = %pool, error = %e, "claim: envd refused /init; discarding member");
                if let Err(e) = self.kill_locked(&id).await {
                    tracing::error!(sandbox = %id, error = %e, "discarding member failed");
                }
                continue;
            }
            let now = self.clock.now();
            let rec = self
                .store
                .apply(&id, Event::Claimed, move |r| {
                    r.started_at = now;
                    r.end_at = now + timeout;
                })
                .await?;
            self.set_route(&rec);
            tracing::debug!(sandbox = %id, claim_tx = ?t_claimed, init = ?t_init, done = ?began.elapsed(), "claim timings");
            let label = PoolLabel { pool: pool.clone() };
            self.pools.metrics.claims.get_or_create(&label).inc();
            self.pools
                .metrics
                .claim_seconds
                .get_or_create(&label)
                .observe(began.elapsed().as_secs_f64());
            self.pools.wake.notify_one();
            tracing::info!(sandbox = %id, pool = %pool, "sandbox claimed from pool");
            return Ok(Some(rec));
        }
        self.pools.count_miss(&pool, &req.template_id);
        Ok(None)
    }

    /// Loads the stored SandboxSets and autoscalers (at start, after recovery).
    pub(super) async fn load_pools(&self) -> Result<(), CoreError> {
        for v in self.store.list_objects(ObjectTable::SandboxSets).await? {
            match serde_json::from_value::<SandboxSet>(v) {
                Ok(set) => self.install_set(set),
                Err(e) => tracing::error!(error = %e, "ignoring unreadable stored SandboxSet"),
            }
        }
        for v in self.store.list_objects(ObjectTable::Autoscalers).await? {
            let obj = match serde_json::from_value::<PoolingAutoScaler>(v) {
                Ok(o) => o,
                Err(e) => {
                    tracing::error!(error = %e, "ignoring unreadable stored PoolingAutoScaler");
                    continue;
                }
            };
            let name = obj.metadata.name.clone();
            let desired = self.store.autoscaler_desired(&name).await?;
            if let Err(e) = self.install_scaler(obj, desired) {
                tracing::error!(autoscaler = %name, error = %e, "ignoring invalid stored PoolingAutoScaler");
            }
        }
        Ok(())
    }

    fn install_set(&self, set: SandboxSet) {
        let rev = self
            .templates
            .resolve(&set.spec.template)
            .map(|r| revision(&set, &r))
            .unwrap_or_else(|_| "template-missing".into());
        let mut sets = self.pools.sets_mut();
        sets.insert(
            set.metadata.name.clone(),
            SetEntry {
                object: set,
                revision: rev,
            },
        );
    }

    fn install_scaler(
        &self,
        obj: PoolingAutoScaler,
        desired: Option<u32>,
    ) -> Result<(), CoreError> {
        let policy = obj
            .compile()
            .map_err(|e| CoreError::InvalidArgument(e.to_string()))?;
        let initial = desired.unwrap_or_else(|| {
            self.pools
                .sets()
                .get(&policy.target)
                .map(|s| s.object.spec.replicas)
                .unwrap_or(policy.min_replicas)
        });
        let mut scalers = lock(&self.pools.scalers);
        // Re-applying keeps the history and the current size; only the policy changes.
        let state = match scalers.remove(&obj.metadata.name) {
            Some(old) => old.state,
            None => Autoscaler::new(initial),
        };
        scalers.insert(
            obj.metadata.name.clone(),
            ScalerEntry {
                object: obj,
                policy,
                state,
            },
        );
        Ok(())
    }

    pub async fn apply_sandbox_set(&self, set: SandboxSet) -> Result<SandboxSetView, CoreError> {
        set.validate()
            .map_err(|e| CoreError::InvalidArgument(e.to_string()))?;
        if self.templates.resolve(&set.spec.template).is_err() {
            return Err(CoreError::InvalidArgument(format!(
                "spec.template: template '{}' not found",
                set.spec.template
            )));
        }
        let clash = self
            .pools
            .sets()
            .values()
            .find(|e| {
                e.object.spec.template == set.spec.template
                    && e.object.metadata.name != set.metadata.name
            })
            .map(|e| e.object.metadata.name.clone());
        if let Some(other) = clash {
            return Err(CoreError::InvalidArgument(format!(
                "spec.template: template '{}' already has the pool '{other}'",
                set.spec.template
            )));
        }
        let value = serde_json::to_value(&set).expect("plain data serializes");
        self.store
            .put_object(ObjectTable::SandboxSets, &set.metadata.name, &value)
            .await?;
        let name = set.metadata.name.clone();
        self.install_set(set);
        self.pools.wake.notify_one();
        tracing::info!(pool = %name, "SandboxSet applied");
        self.get_sandbox_set(&name).await
    }

    pub async fn delete_sandbox_set(&self, name: &str) -> Result<(), CoreError> {
        let existed = self
            .store
            .delete_object(ObjectTable::SandboxSets, name)
            .await?;
        let removed = self.pools.sets_mut().remove(name).is_some();
        if !existed && !removed {
            return Err(CoreError::NotFound(format!("SandboxSet {name} not found")));
        }
        // Claimed members now belong to their owners only; unclaimed ones are removed by the
        // next reconcile (they are members of no pool).
        self.store.release_claimed(name).await?;
        self.pools.wake.notify_one();
        tracing::info!(pool = %name, "SandboxSet deleted");
        Ok(())
    }

    pub async fn get_sandbox_set(&self, name: &str) -> Result<SandboxSetView, CoreError> {
        self.list_sandbox_sets()
            .await?
            .into_iter()
            .find(|v| v.object.metadata.name == name)
            .ok_or_else(|| CoreError::NotFound(format!("SandboxSet {name} not found")))
    }

    pub async fn list_sandbox_sets(&self) -> Result<Vec<SandboxSetView>, CoreError> {
        let statuses = self.pool_statuses().await?;
        let sets = self.pools.sets().clone();
        Ok(sets
            .into_values()
            .map(|e| {
                let status = statuses
                    .iter()
                    .find(|s| s.name == e.object.metadata.name)
                    .cloned()
                    .unwrap_or_default();
                SandboxSetView {
                    object: e.object,
                    status,
                }
            })
            .collect())
    }

    pub async fn apply_autoscaler(
        &self,
        obj: PoolingAutoScaler,
    ) -> Result<AutoscalerView, CoreError> {
        obj.compile()
            .map_err(|e| CoreError::InvalidArgument(e.to_string()))?;
        let value = serde_json::to_value(&obj).expect("plain data serializes");
        self.store
            .put_object(ObjectTable::Autoscalers, &obj.metadata.name, &value)
            .await?;
        let name = obj.metadata.name.clone();
        self.install_scaler(obj, None)?;
        self.pools.wake.notify_one();
        self.get_autoscaler(&name)
    }

    pub async fn delete_autoscaler(&self, name: &str) -> Result<(), CoreError> {
        let existed = self
            .store
            .delete_object(ObjectTable::Autoscalers, name)
            .await?;
        let removed = lock(&self.pools.scalers).remove(name).is_some();
        if !existed && !removed {
            return Err(CoreError::NotFound(format!(
                "PoolingAutoScaler {name} not found"
            )));
        }
        self.pools.wake.notify_one();
        Ok(())
    }

    pub fn get_autoscaler(&self, name: &str) -> Result<AutoscalerView, CoreError> {
        self.list_autoscalers()
            .into_iter()
            .find(|v| v.object.metadata.name == name)
            .ok_or_else(|| CoreError::NotFound(format!("PoolingAutoScaler {name} not found")))
    }

    pub fn list_autoscalers(&self) -> Vec<AutoscalerView> {
        lock(&self.pools.scalers)
            .values()
            .map(|e| AutoscalerView {
                object: e.object.clone(),
                status: e.state.status.clone(),
            })
            .collect()
    }

    /// The size each pool aims for: its autoscaler's choice, else its own `replicas`.
    fn desired_of(&self, set: &SandboxSet) -> (u32, Option<String>) {
        let scalers = lock(&self.pools.scalers);
        match scalers
            .iter()
            .find(|(_, e)| e.policy.target == set.metadata.name)
        {
            Some((name, e)) => (e.state.desired(), Some(name.clone())),
            None => (set.spec.replicas, None),
        }
    }

    /// Ready / starting / claimed per pool.
    pub async fn pool_statuses(&self) -> Result<Vec<PoolStatus>, CoreError> {
        let members = self.store.members().await?;
        let sets = self.pools.sets().clone();
        Ok(sets
            .values()
            .map(|e| {
                let (counts, claimed) = counts_of(&members, &e.object.metadata.name, &e.revision);
                let (replicas, autoscaler) = self.desired_of(&e.object);
                PoolStatus {
                    name: e.object.metadata.name.clone(),
                    template: e.object.spec.template.clone(),
                    replicas,
                    available_replicas: counts.ready_current.len() as u32,
                    starting_replicas: counts.starting,
                    stale_replicas: counts.ready_stale.len() as u32,
                    claimed_replicas: claimed,
                    update_revision: e.revision.clone(),
                    autoscaler,
                }
            })
            .collect())
    }

    /// One pass over every pool: recompute revisions, feed autoscalers, then remove and start
    /// members as [`plan`] says. Removals and starts run in background tasks; their store rows
    /// change before this returns, so the next pass never double-counts.
    pub async fn reconcile_pools(self: &Arc<Self>) {
        let _pass = self.pools.reconciling.lock().await;
        if let Err(e) = self.reconcile_pass().await {
            tracing::error!(error = %e, "pool reconcile failed");
        }
    }

    async fn reconcile_pass(self: &Arc<Self>) -> Result<(), CoreError> {
        // Template changes show up here: a replaced template directory changes the revision.
        let names: Vec<String> = {
            let sets = self.pools.sets();
            sets.keys().cloned().collect()
        };
        for name in &names {
            let set = self.pools.sets().get(name).map(|e| e.object.clone());
            if let Some(set) = set {
                self.install_set(set);
            }
        }
        let members = self.store.members().await?;
        let now = self.clock.now();
        let sets = self.pools.sets().clone();

        // Autoscalers observe their pools first, so the plan uses the size they chose.
        {
            let mut scalers = lock(&self.pools.scalers);
            for (sname, e) in scalers.iter_mut() {
                let Some(set) = sets.get(&e.policy.target) else {
                    e.state.status.reason = format!("SandboxSet {} not found", e.policy.target);
                    continue;
                };
                let (c, claimed) = counts_of(&members, &e.policy.target, &set.revision);
                let sample = Sample {
                    at: now,
                    available: c.ready_current.len() as u32,
                    claimed,
                    starting: c.starting,
                    misses: self.pools.misses_of(&e.policy.target),
                };
                let before = e.state.desired();
                let decision = e.state.observe(&e.policy, sample);
                if e.state.desired() != before {
                    tracing::info!(autoscaler = %sname, from = before, to = e.state.desired(), reason = %e.state.status.reason, "autoscaler scaled");
                    self.pools
                        .metrics
                        .decisions
                        .get_or_create(&DecisionLabel {
                            autoscaler: sname.clone(),
                            decision: decision.as_str().into(),
                        })
                        .inc();
                }
            }
        }
        let statuses: Vec<_> = lock(&self.pools.scalers)
            .iter()
            .map(|(n, e)| (n.clone(), e.state.status.clone()))
            .collect();
        for (sname, status) in statuses {
            let v = serde_json::to_value(&status).expect("plain data serializes");
            self.store.set_autoscaler_status(&sname, &v).await?;
        }

        for (name, entry) in &sets {
            let (counts, _) = counts_of(&members, name, &entry.revision);
            let (replicas, _) = self.desired_of(&entry.object);
            let spec = &entry.object.spec;
            let max_unavailable = spec
                .update_strategy
                .max_unavailable
                .resolve("", replicas)
                .unwrap_or(1);
            let max_starting = spec
                .scale_strategy
                .max_unavailable
                .resolve("", replicas)
                .unwrap_or(1);
            let mut p = plan(replicas, max_unavailable, max_starting, &counts);
            let backing_off = lock(&self.pools.backoff)
                .get(name)
                .is_some_and(|(_, until)| now < *until);
            if backing_off {
                p.create = 0;
            }
            for id in p.remove {
                self.remove_member(id).await;
            }
            for _ in 0..p.create {
                // One pool whose template cannot start members (e.g. its checkpoint's files
                // are gone) must not stop the others from filling.
                if let Err(e) = self.start_member(entry).await {
                    tracing::warn!(pool = %name, error = %e, "cannot start a pool member");
                    break;
                }
            }
        }
        // Unclaimed members of deleted pools.
        for m in &members {
            if !m.claimed && !sets.contains_key(&m.pool) && m.sandbox.state == SandboxState::Pooled
            {
                self.remove_member(m.sandbox.id.clone()).await;
            }
        }
        Ok(())
    }

    /// Takes a member out of the pool (only if still unclaimed) and destroys it in the background.
    async fn remove_member(self: &Arc<Self>, id: String) {
        match self
            .store
            .apply_if(&id, SandboxState::Pooled, Event::Kill)
            .await
        {
            Ok(Some(_)) => {}
            Ok(None) => return, // claimed meanwhile, or gone
            Err(e) => {
                tracing::error!(sandbox = %id, error = %e, "cannot remove pool member");
                return;
            }
        }
        let me = self.clone();
        self.pools.track(tokio::spawn(async move {
            let lock = me.lock_for(&id);
            let _guard = lock.lock().await;
            // On failure the row stays `Killing` and the background tick retries.
            if let Err(e) = me.finish_kill(&id).await {
                tracing::warn!(sandbox = %id, error = %e, "removing pool member failed");
            }
        }));
    }

    /// Records a new member (`creating`) now, and starts it in the background under the global
    /// start cap.
    async fn start_member(self: &Arc<Self>, entry: &SetEntry) -> Result<(), CoreError> {
        let set = &entry.object;
        // Held until the member's record names its layers, so no image gc removes them first.
        let layer_claim = self.layer_claims.claim();
        let rootfs = self.templates.resolve(&set.spec.template)?;
        let id = new_sandbox_id();
        let resources = self
            .templates
            .settings(&set.spec.template)
            .resources(self.config.default_resources);
        let network = NetworkPolicy {
            allow_internet: set.spec.allow_internet_access,
            ..Default::default()
        };
        // A template made from a checkpoint: members are restores of it (a code interpreter
        // with its imports done), re-keyed to a token of their own like any member.
        let restore = match self.templates.images.checkpoint_of(&set.spec.template) {
            Some(ck) => {
                let (c, source) = self.store.get_checkpoint(&ck).await?.ok_or_else(|| {
                    CoreError::NotFound(format!(
                        "checkpoint {ck} of template {} is gone",
                        set.spec.template
                    ))
                })?;
                let mut spec = self.restored_spec(&c, &source, &BTreeMap::new())?;
                spec.network = network.clone();
                Some((ck, c.memory(), spec))
            }
            None => None,
        };
        let (id, spec, resources) = match &restore {
            // The restored processes live in the source's limits.
            Some((_, _, spec)) => (spec.id.clone(), spec.clone(), spec.resources),
            None => {
                // Nobody ever sees this token: it only keeps the idle member closed until a
                // claim replaces it. The admin token lets the daemon, and only it, do that
                // replacement.
                let mut spec = SandboxSpec {
                    id: id.clone(),
                    rootfs,
                    resources,
                    network,
                    envd: EnvdSettings {
                        access_token: Some(generate_access_token()),
                        env_vars: BTreeMap::new(),
                        default_user: self.config.default_user.clone(),
                        admin_token: Some(generate_access_token()),
                        start_command: self.templates.start_command(&set.spec.template),
                        default_cwd: None,
                    },
                };
                self.templates
                    .apply_defaults(&set.spec.template, &mut spec.envd);
                (id, spec, resources)
            }
        };
        let token = spec.envd.access_token.clone().unwrap_or_default();
        let restore = restore.map(|(ck, memory, _)| (ck, memory));
        let now = self.clock.now();
        let rec = SandboxRecord {
            id: id.clone(),
            template_id: set.spec.template.clone(),
            team_id: String::new(),
            api_key_id: String::new(),
            state: SandboxState::Creating,
            metadata: BTreeMap::new(),
            env_vars: BTreeMap::new(),
            envd_access_token: token,
            cpu_count: resources.vcpus,
            memory_mb: resources.memory_mb,
            disk_mb: resources.disk_mb,
            allow_internet: set.spec.allow_internet_access,
            auto_pause: false,
            auto_resume_secs: None,
            started_at: now,
            end_at: now,
            placement: None,
            spec: spec.clone(),
        };
        let pool = set.metadata.name.clone();
        self.store
            .insert_member(rec, &pool, &entry.revision)
            .await?;
        drop(layer_claim);
        let me = self.clone();
        self.pools.track(tokio::spawn(async move {
            let Ok(_permit) = me.pools.starts.clone().acquire_owned().await else {
                return;
            };
            let op_lock = me.lock_for(&id);
            let _guard = op_lock.lock().await;
            let placement = match &restore {
                Some((ck, memory)) => me.start_restored(ck, *memory, &spec).await,
                None => me.runtime.create(&spec).await.map_err(CoreError::from),
            };
            let result = match placement {
                Ok(placement) => me
                    .store
                    .apply(&id, Event::Warmed, move |r| r.placement = Some(placement))
                    .await
                    .map_err(CoreError::from),
                Err(e) => Err(e),
            };
            let label = |result: &str| ResultLabel {
                pool: pool.clone(),
                result: result.into(),
            };
            match result {
                Ok(_) => {
                    lock_backoff_clear(&me, &pool);
                    me.pools.metrics.member_starts.get_or_create(&label("ok")).inc();
                }
                Err(e) => {
                    tracing::warn!(sandbox = %id, pool = %pool, error = %e, "pool member failed to start");
                    me.pools.metrics.member_starts.get_or_create(&label("failed")).inc();
                    me.abandon_create(&id).await;
                    // Exponential backoff per pool (1 s … 60 s): a broken template must not
                    // turn into a create storm.
                    let mut backoff = lock(&me.pools.backoff);
                    let entry = backoff.entry(pool.clone()).or_insert((0, me.clock.now()));
                    entry.0 = (entry.0 + 1).min(6);
                    entry.1 = me.clock.now() + chrono::Duration::seconds(1 << entry.0);
                }
            }
            me.pools.wake.notify_one();
        }));
        Ok(())
    }

    /// Waits until every background start and removal launched so far has finished.
    pub async fn settle_pools(&self) {
        loop {
            let tasks: Vec<_> = std::mem::take(&mut *lock(&self.pools.inflight));
            if tasks.is_empty() {
                return;
            }
            for t in tasks {
                let _ = t.await;
            }
        }
    }

    /// Runs [`Warren::reconcile_pools`] whenever woken, and at least every 500 ms.
    pub fn spawn_pool_loop(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                me.reconcile_pools().await;
                let _ = tokio::time::timeout(RECONCILE_EVERY, me.pools.wake.notified()).await;
            }
        })
    }

    /// The Prometheus exposition: gauges recomputed from the store, then everything encoded.
    pub async fn metrics_text(&self) -> Result<String, CoreError> {
        let m = &self.pools.metrics;
        let mut by_state: HashMap<&'static str, i64> = HashMap::new();
        for rec in self.store.list_all().await? {
            *by_state.entry(rec.state.as_str()).or_default() += 1;
        }
        for s in SandboxState::ALL {
            if s.is_terminal() {
                continue;
            }
            m.sandboxes
                .get_or_create(&StateLabel {
                    state: s.as_str().into(),
                })
                .set(by_state.get(s.as_str()).copied().unwrap_or(0));
        }
        m.pool_members.clear();
        m.pool_desired.clear();
        for p in self.pool_statuses().await? {
            for (state, n) in [
                ("ready", p.available_replicas),
                ("starting", p.starting_replicas),
                ("stale", p.stale_replicas),
                ("claimed", p.claimed_replicas),
            ] {
                m.pool_members
                    .get_or_create(&PoolStateLabel {
                        pool: p.name.clone(),
                        state: state.into(),
                    })
                    .set(n as i64);
            }
            m.pool_desired
                .get_or_create(&PoolLabel {
                    pool: p.name.clone(),
                })
                .set(p.replicas as i64);
        }
        Ok(m.encode())
    }
}

fn lock_backoff_clear(w: &Warren, pool: &str) {
    lock(&w.pools.backoff).remove(pool);
}

/// Unclaimed members of `pool` by readiness and revision, and its live claimed members.
fn counts_of(members: &[MemberRecord], pool: &str, revision: &str) -> (PoolCounts, u32) {
    let mut c = PoolCounts::default();
    let mut claimed = 0;
    for m in members.iter().filter(|m| m.pool == pool) {
        match m.sandbox.state {
            SandboxState::Pooled if m.revision == revision => {
                c.ready_current.push(m.sandbox.id.clone())
            }
            SandboxState::Pooled => c.ready_stale.push(m.sandbox.id.clone()),
            SandboxState::Creating if !m.claimed => c.starting += 1,
            s if m.claimed && s.public().is_some() => claimed += 1,
            _ => {}
        }
    }
    (c, claimed)
}

#[cfg(test)]
mod tests;
