//! The orchestrator: one [`Warren`] decides everything about sandboxes and drives the runtime.
//!
//! Operations on one sandbox are serialised by a per-sandbox async lock, held across the runtime
//! call, so a kill cannot interleave with a pause of the same sandbox; the store additionally
//! refuses any state change the state machine does not allow. Operations on different sandboxes
//! run in parallel.
//!
//! Deadlines: a running sandbox whose `end_at` passed is killed (or paused, with auto-pause) by the
//! background loop. A paused sandbox has no deadline: it stays until it is resumed or killed, as
//! E2B's paused sandboxes do.

use crate::auth::{generate_access_token, ApiKeys, Principal};
use crate::error::CoreError;
use crate::state::{Event, PublicState, SandboxState};
use crate::store::{SandboxRecord, Store};
use crate::templates::TemplateRegistry;
use base64::Engine;
use chrono::{DateTime, Utc};
use network::NetworkRequest;
use rand::Rng;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use warren_runtime::{EnvdSettings, Resources, SandboxRuntime, SandboxSpec};

/// Source of "now", injectable so deadline logic is testable without sleeping.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that only moves when told to.
pub struct ManualClock(Mutex<DateTime<Utc>>);

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> Self {
        ManualClock(Mutex::new(start))
    }
    pub fn advance(&self, by: Duration) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *t += chrono::Duration::from_std(by).expect("small duration");
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, Clone)]
pub struct WarrenConfig {
    /// Lifetime of a sandbox created or resumed without a timeout.
    pub default_timeout: Duration,
    /// Longest timeout a client may ask for.
    pub max_timeout: Duration,
    /// Limits of every sandbox; `disk_mb` is also the disk size reported to clients.
    pub default_resources: Resources,
    /// The envd version reported to SDKs; it gates SDK features, so it must match what
    /// warren-envd implements.
    pub envd_version: String,
    /// The user processes run as when a request names none.
    pub default_user: String,
    /// A paused sandbox idle this long is hibernated (its memory dumped to disk with CRIU);
    /// `None` never hibernates automatically.
    pub hibernate_after: Option<Duration>,
}

impl Default for WarrenConfig {
    fn default() -> Self {
        WarrenConfig {
            default_timeout: Duration::from_secs(300),
            max_timeout: Duration::from_secs(24 * 3600),
            default_resources: Resources::default(),
            envd_version: "0.6.4".into(),
            default_user: "user".into(),
            hibernate_after: Some(Duration::from_secs(600)),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    pub template_id: String,
    /// Seconds; `None` means the default.
    pub timeout_secs: Option<i64>,
    pub metadata: BTreeMap<String, String>,
    pub env_vars: BTreeMap<String, String>,
    /// `None` means allowed.
    pub allow_internet: Option<bool>,
    /// Pause instead of kill when the timeout expires.
    pub auto_pause: bool,
    /// Resume the sandbox when traffic reaches it while it is paused (E2B's
    /// `lifecycle.auto_resume`); it then runs for this request's timeout again.
    pub auto_resume: bool,
    /// Egress rules and private traffic.
    pub network: NetworkRequest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ListOrder {
    Asc,
    /// Newest first.
    #[default]
    Desc,
}

#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Every pair must match (AND).
    pub metadata: BTreeMap<String, String>,
    /// `None` means running and paused.
    pub states: Option<Vec<PublicState>>,
    pub template: Option<String>,
    pub started_after: Option<DateTime<Utc>>,
    pub order: ListOrder,
    /// Page size; `None` means all.
    pub limit: Option<u32>,
    /// Opaque token from a previous page.
    pub next_token: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ListPage {
    pub sandboxes: Vec<SandboxRecord>,
    /// Present when more results follow.
    pub next_token: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectOutcome {
    /// The sandbox was paused and has been resumed.
    Resumed,
    /// The sandbox was already running.
    AlreadyRunning,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecoveryReport {
    pub adopted: Vec<String>,
    pub killed: Vec<String>,
    pub swept: Vec<String>,
}

/// Largest page the list returns, whatever the client asks.
const MAX_PAGE: u32 = 100;

pub struct Warren {
    runtime: Arc<dyn SandboxRuntime>,
    store: Store,
    templates: TemplateRegistry,
    keys: ApiKeys,
    config: WarrenConfig,
    clock: Arc<dyn Clock>,
    /// Per-sandbox operation locks.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Address and envd token of every sandbox in state `Running`, kept in memory because the
    /// router asks on every proxied request.
    routes: RwLock<HashMap<String, Route>>,
    /// Traffic token of every routed sandbox whose ports are private (`allowPublicTraffic: false`).
    private_traffic: RwLock<HashMap<String, String>>,
    metrics: metrics::MetricsBook,
    /// Warm pools and their autoscalers (see `pools.rs`).
    pools: crate::pool::Pools,
    /// Creates by `Idempotency-Key`: (team, key) → sandbox id and when it was made. Held across a
    /// keyed create, so two concurrent retries of one create make one sandbox.
    idempotency: tokio::sync::Mutex<HashMap<(String, String), (String, std::time::Instant)>>,
    /// Commits of sandboxes to images (see `commits.rs`).
    commits: commits::CommitState,
    /// Template builds from Dockerfiles (see `builds.rs`).
    builds: builds::BuildState,
    /// E2B's template build protocol over those builds (see `e2b_builds.rs`).
    e2b_builds: e2b_builds::E2bBuildState,
    /// Creates between reading their template's layers and recording them (see
    /// `templates.rs`, `LayerClaims`).
    layer_claims: templates::LayerClaims,
}

/// What the router needs of a running sandbox, kept in memory.
struct Route {
    ip: Ipv4Addr,
    /// envd's access token (signed file URLs are matched against it).
    token: String,
    team: String,
    key_id: String,
}

/// How long an `Idempotency-Key` names the sandbox its create made.
const IDEMPOTENCY_TTL: Duration = Duration::from_secs(3600);

impl Warren {
    pub fn new(
        runtime: Arc<dyn SandboxRuntime>,
        store: Store,
        templates: TemplateRegistry,
        keys: ApiKeys,
        config: WarrenConfig,
    ) -> Self {
        Self::with_clock(
            runtime,
            store,
            templates,
            keys,
            config,
            Arc::new(SystemClock),
        )
    }

    pub fn with_clock(
        runtime: Arc<dyn SandboxRuntime>,
        store: Store,
        templates: TemplateRegistry,
        keys: ApiKeys,
        config: WarrenConfig,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Warren {
            runtime,
            store,
            templates,
            keys,
            config,
            clock,
            locks: Mutex::default(),
            routes: RwLock::default(),
            private_traffic: RwLock::default(),
            metrics: metrics::MetricsBook::default(),
            pools: crate::pool::Pools::default(),
            idempotency: tokio::sync::Mutex::default(),
            commits: commits::CommitState::default(),
            builds: builds::BuildState::default(),
            e2b_builds: e2b_builds::E2bBuildState::default(),
            layer_claims: templates::LayerClaims::default(),
        }
    }

    pub fn config(&self) -> &WarrenConfig {
        &self.config
    }

    pub fn templates(&self) -> &TemplateRegistry {
        &self.templates
    }

    /// Resolves an API key. `None` means the request carried none.
    pub fn authenticate(&self, key: Option<&str>) -> Result<Principal, CoreError> {
        let key = key.ok_or_else(|| {
            CoreError::Unauthorized("missing API key: send it in the X-API-Key header".into())
        })?;
        self.keys
            .authenticate(key)
            .ok_or_else(|| CoreError::Unauthorized("invalid API key".into()))
    }

    /// Where to send traffic for a sandbox: its address while it is running, else `None`.
    /// Deliberately team-blind: envd's access token protects the sandbox itself.
    pub fn route(&self, id: &str) -> Option<Ipv4Addr> {
        self.routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .map(|r| r.ip)
    }

    /// Team and API key id of a running sandbox's owner: whom the router's audit entries for
    /// its envd traffic name.
    pub fn owner(&self, id: &str) -> Option<(String, String)> {
        self.routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .map(|r| (r.team.clone(), r.key_id.clone()))
    }

    /// The audit log, when the daemon keeps one.
    pub fn audit(&self) -> Option<&crate::audit::AuditLog> {
        self.store.audit()
    }

    /// Audit entries matching `q`, of the caller's team only.
    pub async fn query_audit(
        &self,
        who: &Principal,
        mut q: crate::audit::AuditQuery,
    ) -> Result<Vec<crate::audit::AuditEvent>, CoreError> {
        let Some(audit) = self.store.audit().cloned() else {
            return Err(CoreError::InvalidArgument(
                "this daemon keeps no audit log".into(),
            ));
        };
        q.team = Some(who.team.clone());
        tokio::task::spawn_blocking(move || audit.query(&q))
            .await
            .map_err(|e| CoreError::Internal(format!("audit query task: {e}")))?
            .map_err(CoreError::from)
    }

    /// Like [`Self::route`], but traffic for a paused sandbox created with auto-resume wakes it
    /// first (E2B's `lifecycle.auto_resume`), for the timeout it was created with. Team-blind
    /// like `route`: whoever may reach a sandbox's ports may wake it, as on E2B.
    pub async fn route_or_wake(&self, id: &str) -> Option<Ipv4Addr> {
        if let Some(ip) = self.route(id) {
            return Some(ip);
        }
        // Checked before taking the per-sandbox lock so that traffic for ids that match nothing
        // creates no lock entries.
        let wakeable = |r: &SandboxRecord| {
            matches!(r.state, SandboxState::Paused | SandboxState::Hibernated)
                && r.auto_resume_secs.is_some()
        };
        let rec = self.store.get(id).await.ok().flatten()?;
        if !wakeable(&rec) {
            return None;
        }
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        // Another request may have woken it while this one waited for the lock.
        let rec = self.store.get(id).await.ok().flatten()?;
        if wakeable(&rec) {
            let secs = chrono::Duration::seconds(rec.auto_resume_secs.unwrap_or(0).into());
            let woken = if rec.state == SandboxState::Hibernated {
                self.wake_locked(id, secs).await.map(|_| ())
            } else {
                self.resume_locked(id, secs).await.map(|_| ())
            };
            if let Err(e) = woken {
                tracing::warn!(sandbox = %id, error = %e, "auto-resume failed");
                return None;
            }
            tracing::info!(sandbox = %id, "sandbox auto-resumed by traffic");
        }
        self.route(id)
    }

    /// For requests that carry no sandbox address but are signed with a sandbox's envd token
    /// (the SDK's signed file URLs): the running sandbox whose token `signed_by` accepts.
    pub fn route_by_token(&self, signed_by: impl Fn(&str) -> bool) -> Option<(String, Ipv4Addr)> {
        self.routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(_, r)| signed_by(&r.token))
            .map(|(id, r)| (id.clone(), r.ip))
    }

    /// The token the router must see on traffic to the sandbox's ports other than envd's, when
    /// the sandbox was created with private traffic; `None` when its ports are public.
    pub fn traffic_token(&self, id: &str) -> Option<String> {
        self.private_traffic
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    fn set_route(&self, rec: &SandboxRecord) {
        {
            let mut private = self
                .private_traffic
                .write()
                .unwrap_or_else(|e| e.into_inner());
            match network::private_traffic_token(rec) {
                Some(t) if rec.state == SandboxState::Running => {
                    private.insert(rec.id.clone(), t);
                }
                _ => {
                    private.remove(&rec.id);
                }
            }
        }
        let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
        match (&rec.placement, rec.state) {
            (Some(p), SandboxState::Running) => {
                let route = Route {
                    ip: p.ip,
                    token: rec.envd_access_token.clone(),
                    team: rec.team_id.clone(),
                    key_id: rec.api_key_id.clone(),
                };
                routes.insert(rec.id.clone(), route);
            }
            _ => {
                routes.remove(&rec.id);
            }
        }
    }

    fn lock_for(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    fn forget_lock(&self, id: &str) {
        self.locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    fn timeout(&self, secs: Option<i64>) -> Result<chrono::Duration, CoreError> {
        let d = match secs {
            None => self.config.default_timeout,
            Some(s) if s < 0 => {
                return Err(CoreError::InvalidArgument(format!(
                    "timeout must not be negative (got {s})"
                )))
            }
            Some(s) => Duration::from_secs(s as u64),
        };
        if d > self.config.max_timeout {
            return Err(CoreError::InvalidArgument(format!(
                "timeout {} s exceeds the maximum of {} s",
                d.as_secs(),
                self.config.max_timeout.as_secs()
            )));
        }
        Ok(chrono::Duration::from_std(d).expect("bounded by max_timeout"))
    }

    /// A sandbox the principal may see, in a visible state.
    async fn visible(&self, who: &Principal, id: &str) -> Result<SandboxRecord, CoreError> {
        match self.store.get(id).await? {
            Some(rec) if rec.team_id == who.team && rec.state.public().is_some() => Ok(rec),
            _ => Err(CoreError::NotFound(format!("sandbox {id} not found"))),
        }
    }

    /// [`Self::create`] with E2B's `Idempotency-Key`: a create repeated with the same key (an SDK
    /// retry after a lost answer) gets the sandbox the first one made, while it exists.
    pub async fn create_idempotent(
        &self,
        who: &Principal,
        req: CreateRequest,
        key: Option<&str>,
    ) -> Result<SandboxRecord, CoreError> {
        let Some(key) = key else {
            return self.create(who, req).await;
        };
        let valid = !key.is_empty()
            && key.len() <= 255
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid {
            return Err(CoreError::InvalidArgument(
                "Idempotency-Key must be 1-255 characters of [a-z0-9-]".into(),
            ));
        }
        // A bad request is refused even when its key was seen: a retry must not turn it into a 201.
        self.timeout(req.timeout_secs)?;
        let mut seen = self.idempotency.lock().await;
        seen.retain(|_, (_, at)| at.elapsed() < IDEMPOTENCY_TTL);
        let slot = (who.team.clone(), key.to_string());
        if let Some((id, _)) = seen.get(&slot) {
            if let Ok(rec) = self.get(who, id).await {
                return Ok(rec);
            }
        }
        let rec = self.create(who, req).await?;
        seen.insert(slot, (rec.id.clone(), std::time::Instant::now()));
        Ok(rec)
    }

    pub async fn create(
        &self,
        who: &Principal,
        mut req: CreateRequest,
    ) -> Result<SandboxRecord, CoreError> {
        let timeout = self.timeout(req.timeout_secs)?;
        if req.template_id.is_empty() {
            return Err(CoreError::InvalidArgument("templateID is required".into()));
        }
        // E2B's `name:default` is the template `name` (see `e2b_tags`).
        let canonical = crate::e2b_tags::canonical(&req.template_id);
        if canonical != req.template_id && self.templates.resolve(&req.template_id).is_err() {
            req.template_id = canonical.to_string();
        }
        // E2B's `Sandbox.create(template=<snapshot id>)`: a checkpoint restores.
        if let Err(e) = self.templates.resolve(&req.template_id) {
            if !self.is_checkpoint(who, &req.template_id).await {
                return Err(e.into());
            }
            let restore = checkpoints::RestoreRequest {
                timeout_secs: req.timeout_secs,
                metadata: req.metadata,
                env_vars: req.env_vars,
                auto_pause: req.auto_pause,
                auto_resume: req.auto_resume,
            };
            return self
                .restore_checkpoint(who, &req.template_id, restore)
                .await;
        }
        let settings = self.templates.settings(&req.template_id);
        for (k, v) in &req.env_vars {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(CoreError::InvalidArgument(format!(
                    "invalid environment variable name {k:?}"
                )));
            }
            // The kernel's environment is NUL-terminated strings: such a value could never reach
            // a process, and every later command would fail.
            if v.contains('\0') {
                return Err(CoreError::InvalidArgument(format!(
                    "environment variable {k:?} has a NUL byte in its value"
                )));
            }
        }
        // A warm pool of this template hands out a ready member instead of a cold start.
        if let Some(rec) = self.claim_from_pool(who, &req, timeout).await? {
            return Ok(rec);
        }
        if let Some(ck) = self.templates.images.checkpoint_of(&req.template_id) {
            return self.create_from_checkpoint_template(who, &ck, req).await;
        }
        // Held until the sandbox's record names its layers, so no image gc removes them first
        // (the template may have been rebuilt since the check above).
        let layer_claim = self.layer_claims.claim();
        let rootfs = self.templates.resolve(&req.template_id)?;
        let id = new_sandbox_id();
        let token = generate_access_token();
        let ready_token = token.clone();
        let network = req.network.policy(req.allow_internet)?;
        let allow_internet = network.allow_internet;
        let resources = settings.resources(self.config.default_resources);
        let mut spec = SandboxSpec {
            id: id.clone(),
            rootfs,
            resources,
            network,
            envd: EnvdSettings {
                access_token: Some(token.clone()),
                env_vars: req.env_vars.clone(),
                default_user: self.config.default_user.clone(),
                // Lets the daemon re-key envd in sandboxes restored from a checkpoint of this one.
                admin_token: Some(generate_access_token()),
                start_command: self.templates.start_command(&req.template_id),
                default_cwd: None,
            },
        };
        self.templates
            .apply_defaults(&req.template_id, &mut spec.envd);
        let now = self.clock.now();
        let rec = SandboxRecord {
            id: id.clone(),
            template_id: req.template_id,
            team_id: who.team.clone(),
            api_key_id: who.key_id.clone(),
            state: SandboxState::Creating,
            metadata: req.metadata,
            env_vars: req.env_vars,
            envd_access_token: token,
            cpu_count: resources.vcpus,
            memory_mb: resources.memory_mb,
            disk_mb: resources.disk_mb,
            allow_internet,
            auto_pause: req.auto_pause,
            auto_resume_secs: req.auto_resume.then_some(timeout.num_seconds() as u32),
            started_at: now,
            end_at: now + timeout,
            placement: None,
            spec: spec.clone(),
        };
        // Recorded before the runtime acts, so a crash mid-create leaves a `Creating` row that
        // recovery cleans up instead of an untracked sandbox.
        self.store.insert(rec).await?;
        drop(layer_claim);
        let lock = self.lock_for(&id);
        let _guard = lock.lock().await;

        let placement = match self.runtime.create(&spec).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(sandbox = %id, error = %e, "create failed");
                self.abandon_create(&id).await;
                return Err(e.into());
            }
        };
        if let Some(port) = settings.ready_port {
            wait_for_port(&id, std::net::SocketAddr::from((placement.ip, port))).await;
        }
        if let Some(cmd) = settings.ready_cmd {
            let envd = std::net::SocketAddr::from((placement.ip, warren_runtime::ENVD_PORT));
            self.wait_for_ready_command(&id, envd, &ready_token, &cmd)
                .await;
        }
        let started = self.clock.now();
        let applied = self
            .store
            .apply(&id, Event::Started, move |r| {
                r.placement = Some(placement);
                r.started_at = started;
                r.end_at = started + timeout;
            })
            .await;
        match applied {
            Ok(rec) => {
                self.set_route(&rec);
                tracing::info!(sandbox = %id, template = %rec.template_id, "sandbox created");
                Ok(rec)
            }
            Err(e) => {
                self.abandon_create(&id).await;
                Err(e.into())
            }
        }
    }

    /// Removes every trace of a sandbox whose creation failed.
    async fn abandon_create(&self, id: &str) {
        if let Err(e) = self.runtime.destroy(id).await {
            // The row stays `Creating`: the next recovery retries the cleanup.
            tracing::error!(sandbox = %id, error = %e, "cleanup after failed create failed");
            return;
        }
        if let Err(e) = self.store.apply(id, Event::CreateFailed, |_| {}).await {
            tracing::error!(sandbox = %id, error = %e, "could not drop record of failed create");
        }
        self.forget_lock(id);
    }

    pub async fn get(&self, who: &Principal, id: &str) -> Result<SandboxRecord, CoreError> {
        self.visible(who, id).await
    }

    pub async fn list(&self, who: &Principal, q: &ListQuery) -> Result<ListPage, CoreError> {
        let limit = match q.limit {
            Some(0) => return Err(CoreError::InvalidArgument("limit must be positive".into())),
            Some(n) => n.min(MAX_PAGE) as usize,
            None => usize::MAX,
        };
        let after = q.next_token.as_deref().map(decode_token).transpose()?;
        let mut all: Vec<SandboxRecord> = self
            .store
            .list_team(&who.team)
            .await?
            .into_iter()
            .filter(|r| {
                let Some(public) = r.state.public() else {
                    return false;
                };
                q.states.as_ref().is_none_or(|s| s.contains(&public))
                    && q.template.as_ref().is_none_or(|t| &r.template_id == t)
                    && q.started_after.is_none_or(|t| r.started_at > t)
                    && q.metadata.iter().all(|(k, v)| r.metadata.get(k) == Some(v))
            })
            .collect();
        // (started_at, id) is a total order, so a page boundary is exact even when several
        // sandboxes started in the same instant.
        all.sort_by(|a, b| (a.started_at, &a.id).cmp(&(b.started_at, &b.id)));
        if q.order == ListOrder::Desc {
            all.reverse();
        }
        let start = match &after {
            None => 0,
            Some((t, id)) => all
                .iter()
                .position(|r| {
                    let key = (r.started_at, &r.id);
                    match q.order {
                        ListOrder::Asc => key > (*t, id),
                        ListOrder::Desc => key < (*t, id),
                    }
                })
                .unwrap_or(all.len()),
        };
        let rest = &all[start..];
        let page: Vec<SandboxRecord> = rest.iter().take(limit).cloned().collect();
        let next_token = (rest.len() > page.len())
            .then(|| page.last().map(|r| encode_token(r.started_at, &r.id)))
            .flatten();
        Ok(ListPage {
            sandboxes: page,
            next_token,
        })
    }

    pub async fn kill(&self, who: &Principal, id: &str) -> Result<(), CoreError> {
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        self.visible(who, id).await?;
        self.kill_locked(id).await
    }

    /// Kills a sandbox whose lock the caller holds. Leaves the row in `Killing` when the runtime
    /// fails, so that the background loop retries.
    async fn kill_locked(&self, id: &str) -> Result<(), CoreError> {
        let rec = self.store.apply(id, Event::Kill, |_| {}).await?;
        self.set_route(&rec);
        self.finish_kill(id).await
    }

    async fn finish_kill(&self, id: &str) -> Result<(), CoreError> {
        self.runtime.destroy(id).await?;
        let rec = self.store.apply(id, Event::Destroyed, |_| {}).await?;
        self.forget_lock(id);
        tracing::info!(sandbox = %id, "sandbox killed");
        self.release_stale_layers(&rec.spec.rootfs.lower_dirs).await;
        Ok(())
    }

    /// Sets a new deadline `timeout` seconds from now; may shorten.
    pub async fn set_timeout(
        &self,
        who: &Principal,
        id: &str,
        timeout_secs: i64,
    ) -> Result<(), CoreError> {
        let timeout = self.timeout(Some(timeout_secs))?;
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        self.visible(who, id).await?;
        self.store
            .set_end_at(id, self.clock.now() + timeout, false)
            .await?;
        Ok(())
    }

    pub async fn pause(&self, who: &Principal, id: &str) -> Result<(), CoreError> {
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let rec = self.visible(who, id).await?;
        if rec.state != SandboxState::Running {
            return Err(CoreError::Conflict(format!(
                "sandbox {id} is already paused"
            )));
        }
        self.pause_locked(id).await
    }

    async fn pause_locked(&self, id: &str) -> Result<(), CoreError> {
        // Unroute first: a request reaching a frozen sandbox would hang instead of failing fast.
        let rec = self.store.apply(id, Event::Pause, |_| {}).await?;
        self.set_route(&rec);
        self.finish_pause(id).await
    }

    async fn finish_pause(&self, id: &str) -> Result<(), CoreError> {
        match self.runtime.freeze(id).await {
            Ok(()) => {
                self.store.apply(id, Event::PauseDone, |_| {}).await?;
                self.note_paused(id, Some(self.clock.now())).await;
                tracing::info!(sandbox = %id, "sandbox paused");
                Ok(())
            }
            Err(e) => {
                let rec = self.store.apply(id, Event::PauseFailed, |_| {}).await?;
                self.set_route(&rec);
                Err(e.into())
            }
        }
    }

    /// Resumes a paused sandbox (deadline: now + timeout) or, for a running one, extends its
    /// deadline to now + timeout if that is later (never shortens).
    pub async fn connect(
        &self,
        who: &Principal,
        id: &str,
        timeout_secs: Option<i64>,
    ) -> Result<(SandboxRecord, ConnectOutcome), CoreError> {
        let timeout = self.timeout(timeout_secs)?;
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let rec = self.visible(who, id).await?;
        match rec.state {
            SandboxState::Running => {
                let rec = self
                    .store
                    .set_end_at(id, self.clock.now() + timeout, true)
                    .await?;
                Ok((rec, ConnectOutcome::AlreadyRunning))
            }
            SandboxState::Paused => {
                let rec = self.resume_locked(id, timeout).await?;
                Ok((rec, ConnectOutcome::Resumed))
            }
            SandboxState::Hibernated => self.wake_locked(id, timeout).await,
            other => Err(CoreError::Conflict(format!(
                "sandbox {id} is {other}, try again"
            ))),
        }
    }

    async fn resume_locked(
        &self,
        id: &str,
        timeout: chrono::Duration,
    ) -> Result<SandboxRecord, CoreError> {
        self.store.apply(id, Event::Resume, |_| {}).await?;
        self.finish_resume(id, timeout).await
    }

    async fn finish_resume(
        &self,
        id: &str,
        timeout: chrono::Duration,
    ) -> Result<SandboxRecord, CoreError> {
        match self.runtime.thaw(id).await {
            Ok(()) => {
                let end_at = self.clock.now() + timeout;
                let rec = self
                    .store
                    .apply(id, Event::ResumeDone, move |r| r.end_at = end_at)
                    .await?;
                self.set_route(&rec);
                self.note_paused(id, None).await;
                tracing::info!(sandbox = %id, "sandbox resumed");
                Ok(rec)
            }
            Err(e) => {
                self.store.apply(id, Event::ResumeFailed, |_| {}).await?;
                Err(e.into())
            }
        }
    }

    /// One pass of the background loop: expires deadlines, reaps sandboxes whose init died and
    /// retries unfinished kills.
    pub async fn tick(&self) {
        let records = match self.store.list_all().await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "tick: cannot list sandboxes");
                return;
            }
        };
        let now = self.clock.now();
        for rec in records {
            let id = rec.id.clone();
            let lock = self.lock_for(&id);
            // Skip sandboxes another operation is busy with; the next tick sees them again.
            let Ok(_guard) = lock.try_lock() else {
                continue;
            };
            // Re-read under the lock: the listing may be stale.
            let rec = match self.store.get(&id).await {
                Ok(Some(r)) => r,
                _ => continue,
            };
            let result = match rec.state {
                SandboxState::Running | SandboxState::Paused | SandboxState::Pooled
                    if !self.runtime.is_alive(&id) =>
                {
                    tracing::warn!(sandbox = %id, "sandbox init died; removing it");
                    self.kill_locked(&id).await
                }
                SandboxState::Paused if self.due_for_hibernation(&id, now).await => {
                    tracing::info!(sandbox = %id, "idle while paused: hibernating");
                    self.hibernate_locked(&id).await.map(|_| ())
                }
                SandboxState::Running if rec.end_at <= now && rec.auto_pause => {
                    tracing::info!(sandbox = %id, "timeout: auto-pausing");
                    self.pause_locked(&id).await
                }
                SandboxState::Running if rec.end_at <= now => {
                    tracing::info!(sandbox = %id, "timeout: killing");
                    self.kill_locked(&id).await
                }
                SandboxState::Killing => self.finish_kill(&id).await,
                _ => Ok(()),
            };
            if let Err(e) = result {
                tracing::error!(sandbox = %id, error = %e, "background action failed");
            }
        }
        self.expire_commits().await;
        self.expire_checkpoints().await;
    }

    /// Runs [`Warren::tick`] about once a second until the returned task is aborted.
    pub fn spawn_background(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                me.tick().await;
                me.sample_metrics().await;
            }
        })
    }

    /// At daemon start: re-adopts every stored sandbox that still runs, finishes operations a
    /// crash interrupted, removes the records of sandboxes that are gone, then sweeps every
    /// runtime artefact that no record claims.
    pub async fn recover(&self) -> Result<RecoveryReport, CoreError> {
        let mut report = RecoveryReport::default();
        let mut keep = HashSet::new();
        for rec in self.store.list_all().await? {
            let id = rec.id.clone();
            let lock = self.lock_for(&id);
            let _guard = lock.lock().await;
            let outcome = self.recover_one(&rec).await;
            match outcome {
                Ok(true) => {
                    keep.insert(id.clone());
                    report.adopted.push(id);
                }
                Ok(false) => report.killed.push(id),
                Err(e) => {
                    // Keep whatever is left so a later tick or restart can retry; never sweep it.
                    tracing::error!(sandbox = %id, error = %e, "recovery failed");
                    keep.insert(id);
                }
            }
        }
        self.recover_checkpoints().await?;
        report.swept = self.runtime.sweep(&keep).await?;
        self.load_pools().await?;
        if !report.swept.is_empty() {
            tracing::info!(swept = ?report.swept, "removed leftover sandboxes");
        }
        Ok(report)
    }

    /// Returns whether the sandbox lives on.
    async fn recover_one(&self, rec: &SandboxRecord) -> Result<bool, CoreError> {
        let id = &rec.id;
        match rec.state {
            SandboxState::Creating => {
                self.runtime.destroy(id).await?;
                self.store.apply(id, Event::CreateFailed, |_| {}).await?;
                return Ok(false);
            }
            SandboxState::Killing => {
                self.finish_kill(id).await?;
                return Ok(false);
            }
            // The client never got this sandbox (its create failed or timed out).
            SandboxState::Claiming => {
                self.kill_locked(id).await?;
                return Ok(false);
            }
            SandboxState::Hibernating | SandboxState::Hibernated | SandboxState::Waking => {
                return self.recover_hibernation(rec).await;
            }
            _ => {}
        }
        let adopted = match &rec.placement {
            Some(p) => match self.runtime.adopt(id, p).await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(sandbox = %id, error = %e, "adopt failed; removing sandbox");
                    false
                }
            },
            None => false,
        };
        if !adopted {
            tracing::info!(sandbox = %id, "sandbox did not survive the restart");
            self.kill_locked(id).await?;
            return Ok(false);
        }
        // A wake recorded just before the crash may not have dropped its images yet.
        self.runtime.release_wake_images(id).await;
        // Finish what a crash interrupted: a pause completes, a resume completes. The store
        // decides whether the tree runs: a commit's short freeze the crash cut off must not
        // leave a running sandbox frozen, nor may anything have thawed a paused one.
        match rec.state {
            SandboxState::Pausing => self.finish_pause(id).await?,
            SandboxState::Resuming => {
                self.finish_resume(id, self.timeout(None)?).await?;
            }
            SandboxState::Running | SandboxState::Pooled => self.runtime.thaw(id).await?,
            SandboxState::Paused => self.runtime.freeze(id).await?,
            _ => {}
        }
        if let Some(rec) = self.store.get(id).await? {
            self.set_route(&rec);
        }
        tracing::info!(sandbox = %id, "sandbox re-adopted");
        Ok(true)
    }
}

/// 20 characters of `[a-z0-9]`, like E2B's ids, so that `<port>-<id>.<domain>` hosts parse.
fn new_sandbox_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..20)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn encode_token(t: DateTime<Utc>, id: &str) -> String {
    let nanos = t.timestamp_nanos_opt().unwrap_or(i64::MAX);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{nanos}:{id}"))
}

fn decode_token(token: &str) -> Result<(DateTime<Utc>, String), CoreError> {
    let bad = || CoreError::InvalidArgument(format!("invalid nextToken {token:?}"));
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let raw = String::from_utf8(raw).map_err(|_| bad())?;
    let (nanos, id) = raw.split_once(':').ok_or_else(bad)?;
    let nanos: i64 = nanos.parse().map_err(|_| bad())?;
    Ok((DateTime::from_timestamp_nanos(nanos), id.to_string()))
}

pub mod builds;
pub mod checkpoints;
pub mod commits;
pub mod e2b_builds;
pub mod hibernation;
pub mod metrics;
pub mod network;
pub mod pools;
pub mod templates;

/// How long a create waits for the port of its template's start command.
const READY_PORT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits until the server of a template's start command accepts connections, so a client's first
/// request to it never meets a closed port (as with E2B, whose sandboxes resume from a snapshot
/// taken once the server was ready). A server that does not come up only costs the timeout: the
/// sandbox itself works, and its port reports "not open".
async fn wait_for_port(id: &str, addr: std::net::SocketAddr) {
    let deadline = tokio::time::Instant::now() + READY_PORT_TIMEOUT;
    loop {
        let attempt = tokio::time::timeout_at(deadline, tokio::net::TcpStream::connect(addr)).await;
        match attempt {
            Ok(Ok(_)) => return,
            Err(_) => break,
            Ok(Err(_)) if tokio::time::Instant::now() >= deadline => break,
            Ok(Err(_)) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
        }
    }
    tracing::warn!(sandbox = %id, %addr, "the template's start command did not open its port in time");
}

/// How long a create runs its template's ready command before it gives up waiting.
const READY_COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// How long one run of a ready command may take.
const READY_COMMAND_RUN: std::time::Duration = std::time::Duration::from_secs(10);

impl Warren {
    /// Runs a template's ready command (E2B's `readyCmd`, e.g. a `curl` of a health URL) in the
    /// new sandbox until it exits 0, as E2B checks it before its snapshot: the client's first
    /// request finds the start command ready. Like [`wait_for_port`], one that never succeeds
    /// only costs the timeout.
    async fn wait_for_ready_command(
        &self,
        id: &str,
        envd: std::net::SocketAddr,
        token: &str,
        cmd: &str,
    ) {
        let Some(runner) = self.builds.runner.get().cloned() else {
            tracing::warn!(sandbox = %id, "no command runner: the template's ready command is not run");
            return;
        };
        let command = builds::StepCommand {
            cmd: cmd.to_string(),
            user: "root".into(),
            cwd: None,
            env: Default::default(),
        };
        let deadline = tokio::time::Instant::now() + READY_COMMAND_TIMEOUT;
        while tokio::time::Instant::now() < deadline {
            let run = runner.run(envd, token, &command, &|_: &[u8]| {});
            if let Ok(Ok(0)) = tokio::time::timeout(READY_COMMAND_RUN, run).await {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        tracing::warn!(sandbox = %id, cmd, "the template's ready command did not succeed in time");
    }
}

#[cfg(test)]
mod tests;
