//! Cluster mode of the E2B API (`warren serve --cluster`): the sandbox calls of the E2B REST API
//! and the sandbox router, with all state in the `Sandbox` custom resources instead of SQLite,
//! so any number of replicas behind one Service agree without a shared store of their own.
//!
//! What is swapped against single-host mode is the control plane, not only the store: an API
//! replica runs no sandbox itself. A create claims a ready member of the SandboxSet named by
//! `templateID` (conflict-safe, [`crate::claim`]) or creates a Sandbox (a cold start that the
//! operator and the node agent carry out), and answers once the Sandbox is `Ready`. Pause,
//! resume, timeout and kill are changes of the Sandbox's spec or its deletion. The router sends
//! a sandbox's traffic to `status.sandboxIP` (the Pod's IP, on the Pod network).
//!
//! Errors have the E2B shape `{"code":N,"message":"..."}`.

use crate::claim::{claim, ClaimRequest, ANNOTATION_CLAIMED_BY};
use crate::conditions;
use crate::crd::{Sandbox, SandboxPhase, SandboxSpec};
use crate::{LABEL_CLAIMED, LABEL_SANDBOX_SET};
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Duration as ChronoDuration, SecondsFormat, Utc};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

// Checkpoints, commits and metrics (their own files; children, so they share this module's
// private helpers).
#[path = "cluster_jobs.rs"]
mod jobs;
#[path = "cluster_metrics.rs"]
mod metrics;
pub use jobs::{checkpoint_json, commit_json};
pub use metrics::MetricJson;
// E2B snapshots, and forks of them (`templateID` naming a Checkpoint).
#[path = "cluster_snapshots.rs"]
pub mod snapshots;
// E2B forks (`POST /sandboxes/{id}/fork`) and restores of a Checkpoint.
#[path = "cluster_forks.rs"]
pub mod forks;

/// Annotation prefix of the E2B metadata of a sandbox (as [`crate::claim`] writes it).
const METADATA_PREFIX: &str = "metadata.warren.dev/";
/// Annotation: the E2B template id the sandbox was asked for.
const ANNOTATION_TEMPLATE: &str = "warren.dev/template-id";
/// Annotation: when the E2B client got the sandbox (RFC 3339).
const ANNOTATION_STARTED: &str = "warren.dev/started-at";
/// E2B's default and longest sandbox timeouts, in seconds.
const DEFAULT_TIMEOUT: i64 = 300;
const MAX_TIMEOUT: i64 = 24 * 3600;

pub struct ClusterApi {
    pub sandboxes: Api<Sandbox>,
    /// Read on a cold start: a `templateID` names a SandboxSet, whose member spec it takes.
    pub sets: Api<crate::crd::SandboxSet>,
    /// The one accepted `X-API-Key`.
    pub api_key: String,
    pub envd_version: String,
    /// How long a create or resume waits for the Sandbox to be `Ready`.
    pub ready_timeout: Duration,
    pub poll: Duration,
    /// Key of the sandboxes' envd tokens, shared with the operator; unset: envd has none.
    pub envd_key: Option<String>,
    /// envd's port in every sandbox (tests move it).
    pub envd_port: u16,
    /// Hands a claimed member its client's env vars (envd's `POST /init`).
    pub envd: Arc<dyn warren_core::envd_client::EnvdClient>,
    /// The node agents, for metrics; `None`: metrics answer 501.
    pub agent: Option<Arc<dyn crate::agent::NodeAgent>>,
    http: HttpClient<HttpConnector, Body>,
}

impl ClusterApi {
    pub fn new(client: kube::Client, namespace: &str, api_key: String) -> Self {
        ClusterApi {
            sets: Api::namespaced(client.clone(), namespace),
            sandboxes: Api::namespaced(client, namespace),
            api_key,
            envd_version: "0.2.0".into(),
            ready_timeout: Duration::from_secs(120),
            poll: Duration::from_millis(250),
            envd_key: None,
            envd_port: warren_runtime::ENVD_PORT,
            envd: Arc::new(warren_core::envd_client::HttpEnvdClient::default()),
            agent: None,
            http: HttpClient::builder(TokioExecutor::new()).build(HttpConnector::new()),
        }
    }
}

#[derive(Debug)]
pub struct ApiError {
    code: u16,
    message: String,
}

impl ApiError {
    pub(crate) fn new(code: u16, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            Json(json!({"code": self.code, "message": self.message})),
        )
            .into_response()
    }
}

pub(crate) fn kube_error(what: &str, id: &str, e: kube::Error) -> ApiError {
    if crate::error::is_not_found(&e) {
        return ApiError::new(404, format!("sandbox {id} not found"));
    }
    if crate::error::is_conflict(&e) {
        return ApiError::new(
            409,
            format!("{what} sandbox {id}: changed concurrently, retry"),
        );
    }
    ApiError::new(
        502,
        format!("{what} sandbox {id}: Kubernetes API error: {e}"),
    )
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewSandbox {
    #[serde(rename = "templateID")]
    pub template_id: Option<String>,
    pub timeout: Option<i64>,
    pub metadata: Option<BTreeMap<String, String>>,
    pub env_vars: Option<BTreeMap<String, String>>,
    /// As the SDKs send it (snake case), like single-host mode.
    #[serde(
        default,
        rename = "allow_internet_access",
        alias = "allowInternetAccess"
    )]
    pub allow_internet_access: Option<bool>,
    #[serde(default)]
    pub network: Option<crate::cluster_network::NetworkConfigJson>,
}

#[derive(Debug, Default, Deserialize)]
pub struct TimeoutBody {
    pub timeout: Option<i64>,
}

#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SandboxJson {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    pub envd_version: String,
    pub alias: String,
    pub envd_access_token: String,
}

#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SandboxDetailJson {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    pub alias: String,
    pub started_at: String,
    pub end_at: String,
    pub state: &'static str,
    pub envd_version: String,
    pub metadata: BTreeMap<String, String>,
}

pub(crate) fn check_key(api: &ClusterApi, headers: &HeaderMap) -> Result<(), ApiError> {
    let got = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    // Constant time: the key guards every sandbox.
    let same = got.is_some_and(|g| {
        g.len() == api.api_key.len()
            && g.bytes()
                .zip(api.api_key.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if same {
        Ok(())
    } else {
        Err(ApiError::new(401, "missing or invalid X-API-Key"))
    }
}

fn timeout_secs(t: Option<i64>) -> Result<i64, ApiError> {
    let t = t.unwrap_or(DEFAULT_TIMEOUT);
    if !(0..=MAX_TIMEOUT).contains(&t) {
        return Err(ApiError::new(
            400,
            format!("timeout {t} must be between 0 and {MAX_TIMEOUT} seconds"),
        ));
    }
    Ok(t)
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A new sandbox id: 20 characters of `[a-z0-9]` (a valid object name, and a valid id for the
/// runtime and for `<port>-<id>.<domain>` hosts).
fn new_id() -> Result<String, ApiError> {
    use std::io::Read;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 20];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| ApiError::new(500, format!("no randomness for a sandbox id: {e}")))?;
    // 252 = 7 * 36: rejecting the rest keeps every character equally likely.
    let mut id = String::new();
    for b in bytes.iter().filter(|b| **b < 252) {
        id.push(ALPHABET[(*b % 36) as usize] as char);
    }
    if id.len() < 12 {
        return new_id();
    }
    // Ids start with a letter, as object names are clearer that way.
    Ok(format!("i{id}"))
}

fn template_of(s: &Sandbox) -> String {
    s.annotations()
        .get(ANNOTATION_TEMPLATE)
        .cloned()
        .or_else(|| s.labels().get(LABEL_SANDBOX_SET).cloned())
        .or_else(|| s.spec.template.clone())
        .unwrap_or_default()
}

fn state_of(s: &Sandbox) -> &'static str {
    let phase = s.status.as_ref().map(|st| st.phase);
    if s.spec.paused || matches!(phase, Some(SandboxPhase::Paused)) {
        "paused"
    } else {
        "running"
    }
}

fn metadata_of(s: &Sandbox) -> BTreeMap<String, String> {
    s.annotations()
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(METADATA_PREFIX)
                .map(|k| (k.to_string(), v.clone()))
        })
        .collect()
}

impl ClusterApi {
    fn json(&self, s: &Sandbox) -> SandboxJson {
        let template = template_of(s);
        SandboxJson {
            template_id: template.clone(),
            sandbox_id: s.name_any(),
            client_id: "warren".into(),
            envd_version: self.envd_version.clone(),
            alias: template,
            // Derived, as the operator derived it for the node agent: given only to the client
            // that created or claimed the sandbox.
            envd_access_token: self
                .envd_key
                .as_deref()
                .map(|k| crate::agent::envd_access_token(k, &s.uid().unwrap_or_default()))
                .unwrap_or_default(),
        }
    }

    fn detail(&self, s: &Sandbox) -> SandboxDetailJson {
        let template = template_of(s);
        SandboxDetailJson {
            template_id: template.clone(),
            sandbox_id: s.name_any(),
            client_id: "warren".into(),
            alias: template,
            started_at: s
                .annotations()
                .get(ANNOTATION_STARTED)
                .cloned()
                .or_else(|| {
                    s.metadata
                        .creation_timestamp
                        .as_ref()
                        .map(|t| t.0.to_string())
                })
                .unwrap_or_default(),
            end_at: s.spec.shutdown_time.clone().unwrap_or_default(),
            state: state_of(s),
            envd_version: self.envd_version.clone(),
            metadata: metadata_of(s),
        }
    }

    /// A sandbox the E2B client can see: claimed, or created for a client (not a pool's
    /// unclaimed member), and not being deleted.
    fn visible(s: &Sandbox) -> bool {
        let member = s.labels().contains_key(LABEL_SANDBOX_SET);
        let claimed = s.labels().get(LABEL_CLAIMED).is_some_and(|v| v == "true");
        s.metadata.deletion_timestamp.is_none() && (!member || claimed)
    }

    pub(crate) async fn get_visible(&self, id: &str) -> Result<Sandbox, ApiError> {
        let s = self
            .sandboxes
            .get(id)
            .await
            .map_err(|e| kube_error("get", id, e))?;
        if !Self::visible(&s) {
            return Err(ApiError::new(404, format!("sandbox {id} not found")));
        }
        Ok(s)
    }

    /// The API of resources of kind `K` in the sandboxes' namespace.
    pub(crate) fn namespaced<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        let ns = self.sandboxes.namespace().unwrap_or("default").to_string();
        Api::namespaced(self.sandboxes.clone().into_client(), &ns)
    }

    /// Waits until Checkpoint `name`, which this API made, has an outcome: `Succeeded`, or
    /// `Failed` or being deleted (`Err` of the outcome), or neither within the ready timeout
    /// (`None`). `error` explains an API error.
    pub(crate) async fn checkpoint_outcome(
        &self,
        name: &str,
        error: impl Fn(kube::Error) -> ApiError,
    ) -> Result<Option<Result<crate::crd::Checkpoint, crate::crd::Checkpoint>>, ApiError> {
        use crate::crd::CheckpointPhase;
        let api = self.namespaced::<crate::crd::Checkpoint>();
        let deadline = tokio::time::Instant::now() + self.ready_timeout;
        loop {
            let c = api.get(name).await.map_err(&error)?;
            match c.status.as_ref().map(|s| s.phase).unwrap_or_default() {
                CheckpointPhase::Succeeded => return Ok(Some(Ok(c))),
                CheckpointPhase::Failed | CheckpointPhase::Terminating => return Ok(Some(Err(c))),
                CheckpointPhase::Pending | CheckpointPhase::Creating => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    /// Waits until the Sandbox is `Ready`; a `Failed` one, or one whose image pull failed (the
    /// operator retries it, but a client waiting for a create wants the reason now), is an error
    /// with its reason.
    async fn wait_ready(&self, id: &str) -> Result<Sandbox, ApiError> {
        let deadline = tokio::time::Instant::now() + self.ready_timeout;
        loop {
            let s = self
                .sandboxes
                .get(id)
                .await
                .map_err(|e| kube_error("wait for", id, e))?;
            if let Some(st) = &s.status {
                if conditions::is_true(&st.conditions, "Ready") && !s.spec.paused {
                    return Ok(s);
                }
                let pull_failed = conditions::find(&st.conditions, "Ready")
                    .is_some_and(|c| c.reason == crate::sandbox::IMAGE_PULL_BACK_OFF);
                if st.phase == SandboxPhase::Failed || pull_failed {
                    let why = st
                        .conditions
                        .iter()
                        .find(|c| c.type_ == "Ready")
                        .map(|c| format!("{}: {}", c.reason, c.message))
                        .or_else(|| st.message.clone())
                        .unwrap_or_else(|| "failed".into());
                    return Err(ApiError::new(500, format!("sandbox {id} failed: {why}")));
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiError::new(
                    504,
                    format!(
                        "sandbox {id} was not ready within {}s",
                        self.ready_timeout.as_secs()
                    ),
                ));
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    pub async fn create(&self, req: NewSandbox) -> Result<SandboxJson, ApiError> {
        let egress = crate::cluster_network::requested(&req)?;
        let template = req
            .template_id
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| "base".into());
        let timeout = timeout_secs(req.timeout)?;
        let now = Utc::now();
        let shutdown = rfc3339(now + ChronoDuration::seconds(timeout));
        let metadata = req.metadata.unwrap_or_default();
        let env_vars = req.env_vars.unwrap_or_default();
        let claim_req = ClaimRequest {
            claimant: "e2b-api".into(),
            env_vars: env_vars.clone(),
            metadata: metadata.clone(),
            shutdown_time: Some(shutdown.clone()),
        };
        // A warm member of the pool named by the template, if there is one whose envd takes
        // the client's env vars.
        while let Some(s) = claim(&self.sandboxes, &template, &claim_req)
            .await
            .map_err(|e| ApiError::new(502, format!("claiming from pool {template}: {e}")))?
        {
            let id = s.name_any();
            if let Err(why) = self.init_claimed(&s, &env_vars).await {
                // Ours now, and unusable: discard it, as single-host mode does, and go on.
                tracing::warn!(sandbox = %id, pool = %template, error = %why, "claimed member refused /init; discarding it");
                let _ = self.sandboxes.delete(&id, &DeleteParams::default()).await;
                continue;
            }
            if let Err(e) = crate::cluster_network::for_claimed(self, &s, &egress).await {
                // Ours now, and not as the client asked: never hand it out.
                let _ = self.sandboxes.delete(&id, &DeleteParams::default()).await;
                return Err(e);
            }
            let started = json!({"metadata": {"annotations": {
                ANNOTATION_TEMPLATE: template, ANNOTATION_STARTED: rfc3339(now)}}});
            let s = self
                .sandboxes
                .patch(&id, &PatchParams::default(), &Patch::Merge(&started))
                .await
                .map_err(|e| kube_error("annotate", &id, e))?;
            return Ok(self.json(&s));
        }
        // A fork when the template names a Checkpoint; else a cold start, with the member spec
        // of the SandboxSet the template names.
        let spec = match self.checkpoint_named(&template).await? {
            Some(checkpoint) => SandboxSpec {
                restore_from: Some(checkpoint),
                ..Default::default()
            },
            None => crate::node_images::cold_start_spec_for(&self.sets, &template)
                .await
                .map_err(|(code, msg)| ApiError::new(code, msg))?,
        };
        let id = new_id()?;
        let mut s = Sandbox::new(
            &id,
            SandboxSpec {
                shutdown_time: Some(shutdown),
                env_vars,
                ..spec
            },
        );
        crate::cluster_network::set_spec(&mut s.spec, &egress);
        let ann = s.annotations_mut();
        ann.insert(ANNOTATION_TEMPLATE.into(), template);
        ann.insert(ANNOTATION_STARTED.into(), rfc3339(now));
        ann.insert(ANNOTATION_CLAIMED_BY.into(), "e2b-api".into());
        for (k, v) in metadata {
            ann.insert(format!("{METADATA_PREFIX}{k}"), v);
        }
        self.sandboxes
            .create(&PostParams::default(), &s)
            .await
            .map_err(|e| kube_error("create", &id, e))?;
        match self.wait_ready(&id).await {
            Ok(s) => Ok(self.json(&s)),
            Err(e) => {
                // Nobody holds its id: do not leave it running.
                let _ = self.sandboxes.delete(&id, &DeleteParams::default()).await;
                Err(e)
            }
        }
    }

    /// envd's `POST /init` in a claimed member: the client's env vars, the sandbox's own
    /// (derived, never handed out before) access token. Nothing to do without an envd key:
    /// such envds take no token, and the members keep the env vars they started with.
    async fn init_claimed(
        &self,
        s: &Sandbox,
        env_vars: &BTreeMap<String, String>,
    ) -> Result<(), String> {
        let Some(key) = self.envd_key.as_deref() else {
            return Ok(());
        };
        let uid = s.uid().unwrap_or_default();
        let ip: std::net::IpAddr = s
            .status
            .as_ref()
            .and_then(|st| st.sandbox_ip.as_deref())
            .and_then(|ip| ip.parse().ok())
            .ok_or("the member has no address")?;
        let mut vars = s.spec.env_vars.clone();
        vars.extend(env_vars.clone());
        let req = warren_core::envd_client::InitRequest {
            env_vars: vars,
            access_token: crate::agent::envd_access_token(key, &uid),
            default_user: "user".into(),
        };
        self.envd
            .init(
                std::net::SocketAddr::new(ip, self.envd_port),
                &crate::agent::envd_admin_token(key, &uid),
                &req,
            )
            .await
    }

    pub async fn list(&self) -> Result<Vec<SandboxDetailJson>, ApiError> {
        let all = self
            .sandboxes
            .list(&ListParams::default())
            .await
            .map_err(|e| ApiError::new(502, format!("listing sandboxes: {e}")))?;
        Ok(all
            .items
            .iter()
            .filter(|s| Self::visible(s))
            .map(|s| self.detail(s))
            .collect())
    }

    pub async fn kill(&self, id: &str) -> Result<(), ApiError> {
        self.get_visible(id).await?;
        self.sandboxes
            .delete(id, &DeleteParams::default())
            .await
            .map_err(|e| kube_error("delete", id, e))?;
        Ok(())
    }

    pub async fn pause(&self, id: &str) -> Result<(), ApiError> {
        let s = self.get_visible(id).await?;
        if s.spec.paused {
            return Err(ApiError::new(
                409,
                format!("sandbox {id} is already paused"),
            ));
        }
        self.patch_spec(id, json!({"paused": true})).await
    }

    /// Resume (and E2B's connect): unpauses, sets the timeout if given, waits for `Ready`.
    pub async fn resume(&self, id: &str, timeout: Option<i64>) -> Result<SandboxJson, ApiError> {
        self.get_visible(id).await?;
        let mut spec = json!({"paused": false});
        if let Some(t) = timeout {
            let t = timeout_secs(Some(t))?;
            spec["shutdownTime"] = json!(rfc3339(Utc::now() + ChronoDuration::seconds(t)));
        }
        self.patch_spec(id, spec).await?;
        let s = self.wait_ready(id).await?;
        Ok(self.json(&s))
    }

    pub async fn set_timeout(&self, id: &str, timeout: Option<i64>) -> Result<(), ApiError> {
        self.get_visible(id).await?;
        let t = timeout_secs(timeout)?;
        self.patch_spec(
            id,
            json!({"shutdownTime": rfc3339(Utc::now() + ChronoDuration::seconds(t))}),
        )
        .await
    }

    async fn patch_spec(&self, id: &str, spec: serde_json::Value) -> Result<(), ApiError> {
        self.sandboxes
            .patch(
                id,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": spec})),
            )
            .await
            .map_err(|e| kube_error("update", id, e))?;
        Ok(())
    }

    /// Where a sandbox's port is: `sandboxIP:port` of a running sandbox.
    pub async fn upstream(&self, id: &str, port: u16) -> Result<String, ApiError> {
        let s = self.get_visible(id).await?;
        if s.spec.paused {
            return Err(ApiError::new(
                409,
                format!("sandbox {id} is paused; resume it first"),
            ));
        }
        let ip = s
            .status
            .as_ref()
            .and_then(|st| st.sandbox_ip.clone())
            .ok_or_else(|| ApiError::new(502, format!("sandbox {id} has no address yet")))?;
        Ok(if ip.contains(':') {
            format!("[{ip}]:{port}")
        } else {
            format!("{ip}:{port}")
        })
    }
}

/// The sandbox a request is for, from E2B's headers or a `<port>-<id>.<domain>` Host.
pub fn sandbox_target(headers: &HeaderMap, domain: Option<&str>) -> Option<(String, u16)> {
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    if let (Some(id), Some(port)) = (h("e2b-sandbox-id"), h("e2b-sandbox-port")) {
        return Some((id.to_string(), port.parse().ok()?));
    }
    let domain = domain?;
    let host = h("host")?.split(':').next()?;
    let label = host.strip_suffix(domain)?.strip_suffix('.')?;
    let (port, id) = label.split_once('-')?;
    Some((id.to_string(), port.parse().ok()?))
}

type Shared = Arc<ClusterApi>;

async fn h_create(
    State(api): State<Shared>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check_key(&api, &headers)?;
    let raw: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(400, format!("invalid request body: {e}")))?;
    if let Some(msg) = warren_core::e2b_features::refused_create_features(&raw) {
        return Err(ApiError::new(400, msg));
    }
    let req: NewSandbox = serde_json::from_value(raw)
        .map_err(|e| ApiError::new(400, format!("invalid request body: {e}")))?;
    let s = api.create(req).await?;
    Ok((StatusCode::CREATED, Json(s)).into_response())
}

async fn h_list(State(api): State<Shared>, headers: HeaderMap) -> Result<Response, ApiError> {
    check_key(&api, &headers)?;
    Ok(Json(api.list().await?).into_response())
}

async fn h_get(
    State(api): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_key(&api, &headers)?;
    let s = api.get_visible(&id).await?;
    Ok(Json(api.detail(&s)).into_response())
}

async fn h_kill(
    State(api): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_key(&api, &headers)?;
    api.kill(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn h_pause(
    State(api): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_key(&api, &headers)?;
    api.pause(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn timeout_of(body: &[u8]) -> Result<Option<i64>, ApiError> {
    if body.is_empty() {
        return Ok(None);
    }
    serde_json::from_slice::<TimeoutBody>(body)
        .map(|b| b.timeout)
        .map_err(|e| ApiError::new(400, format!("invalid request body: {e}")))
}

async fn h_resume(
    State(api): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check_key(&api, &headers)?;
    let s = api.resume(&id, timeout_of(&body)?).await?;
    Ok((StatusCode::CREATED, Json(s)).into_response())
}

async fn h_timeout(
    State(api): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check_key(&api, &headers)?;
    api.set_timeout(&id, timeout_of(&body)?).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Forwards a request for a sandbox to its address on the Pod network.
async fn forward(api: Shared, id: String, port: u16, req: Request) -> Result<Response, ApiError> {
    let upstream = api.upstream(&id, port).await?;
    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    parts.uri = format!("http://{upstream}{path}")
        .parse()
        .map_err(|e| ApiError::new(400, format!("bad request path: {e}")))?;
    let resp = api
        .http
        .request(Request::from_parts(parts, body))
        .await
        .map_err(|e| ApiError::new(502, format!("sandbox {id} port {port}: {e}")))?;
    Ok(resp.map(Body::new))
}

#[derive(Clone)]
struct RouterState {
    api: Shared,
    domain: Option<Arc<str>>,
}

/// Requests for a sandbox go to it; the rest to the API routes.
async fn route_sandboxes(
    State(st): State<RouterState>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    match sandbox_target(req.headers(), st.domain.as_deref()) {
        Some((id, port)) => forward(st.api, id, port, req)
            .await
            .unwrap_or_else(IntoResponse::into_response),
        None => next.run(req).await,
    }
}

/// The E2B API and the router for `api`; `domain` enables `<port>-<id>.<domain>` routing.
pub fn router(api: Arc<ClusterApi>, domain: Option<String>) -> Router {
    let st = RouterState {
        api: api.clone(),
        domain: domain.map(Arc::from),
    };
    Router::new()
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/sandboxes", post(h_create).get(h_list))
        .route("/v2/sandboxes", post(h_create).get(h_list))
        .route("/sandboxes/{id}", get(h_get).delete(h_kill))
        .route("/sandboxes/{id}/pause", post(h_pause))
        .route("/sandboxes/{id}/resume", post(h_resume))
        .route("/sandboxes/{id}/connect", post(h_resume))
        .route("/v2/sandboxes/{id}/connect", post(h_resume))
        .route("/sandboxes/{id}/timeout", post(h_timeout))
        .route("/sandboxes/{id}/metrics", get(metrics::h_metrics))
        .route(
            "/warren/v1/checkpoints",
            get(jobs::h_list_checkpoints).post(jobs::h_create_checkpoint),
        )
        .route(
            "/warren/v1/checkpoints/{name}",
            get(jobs::h_get_checkpoint)
                .put(jobs::h_apply_checkpoint)
                .delete(jobs::h_delete_checkpoint),
        )
        .route(
            "/warren/v1/commits",
            get(jobs::h_list_commits).post(jobs::h_create_commit),
        )
        .route(
            "/warren/v1/commits/{name}",
            get(jobs::h_get_commit)
                .put(jobs::h_apply_commit)
                .delete(jobs::h_delete_commit),
        )
        .route(
            "/sandboxes/{id}/network",
            axum::routing::put(crate::cluster_network::h_update_network),
        )
        .route(
            "/sandboxes/{id}/snapshots",
            post(snapshots::h_create_snapshot),
        )
        .route("/sandboxes/{id}/fork", post(forks::h_fork))
        .route(
            "/warren/v1/checkpoints/{name}/restore",
            post(forks::h_restore),
        )
        .route("/snapshots", get(snapshots::h_list_snapshots))
        .route(
            "/snapshots/{id}",
            axum::routing::delete(snapshots::h_delete_snapshot),
        )
        // The SDK's `delete_snapshot`; the cluster API serves no templates of its own.
        .route(
            "/templates/{id}",
            axum::routing::delete(snapshots::h_delete_snapshot),
        )
        // Before the layer, so that unknown paths of a sandbox's request are routed too.
        .fallback(|| async { ApiError::new(404, "no such API path") })
        .with_state(api)
        .layer(axum::middleware::from_fn_with_state(st, route_sandboxes))
}

/// Serves the cluster-mode API on `listen` until SIGTERM or SIGINT (`warren serve --cluster`).
pub async fn serve(
    listen: std::net::SocketAddr,
    namespace: Option<String>,
    api_key: String,
    domain: Option<String>,
    envd_key: Option<String>,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    #[allow(deprecated)] // see main.rs: ring is kube's provider here
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let ns = namespace.unwrap_or_else(|| client.default_namespace().to_string());
    if envd_key.is_none() {
        tracing::warn!("no envd key: sandboxes' envd accepts calls without an access token");
    }
    let mut api = ClusterApi::new(client.clone(), &ns, api_key);
    api.envd_key = envd_key;
    api.agent = metrics::agent_from_env(client)?;
    let api = Arc::new(api);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    tracing::info!(%listen, namespace = %ns, "warren API serving in cluster mode (state in Sandbox resources)");
    axum::serve(listener, router(api, domain))
        .with_graceful_shutdown(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        })
        .await
        .context("serving the cluster API")
}
