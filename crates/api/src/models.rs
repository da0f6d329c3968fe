//! The E2B JSON shapes (field names exactly as the SDK's generated models read and write them).

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;
use warren_core::SandboxRecord;

/// `NewSandboxV2` (and the v1 `NewSandbox`). Features the SDK can ask for that Warren does not
/// have (`mcp`, `iam`, `volumeMounts`, and parts of `network`) are refused with a 400 that names
/// them, rather than ignored: a sandbox without the proxy, volume or credentials its creator
/// asked for would fail later, or quietly do less than asked.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NewSandbox {
    #[serde(rename = "templateID")]
    #[schema(example = "base")]
    pub template_id: String,
    /// Seconds until the sandbox is killed (or paused, with `autoPause`); at most the daemon's
    /// maximum (24 h by default).
    #[schema(minimum = 0, maximum = 86400)]
    pub timeout: Option<i64>,
    pub auto_pause: Option<bool>,
    pub auto_resume: Option<AutoResume>,
    // The SDK's one snake_case key.
    #[serde(rename = "allow_internet_access", alias = "allowInternetAccess")]
    pub allow_internet_access: Option<bool>,
    pub metadata: Option<BTreeMap<String, String>>,
    pub env_vars: Option<BTreeMap<String, String>>,
    pub network: Option<crate::network::NetworkConfigJson>,
    /// Not supported: refused when given.
    #[schema(value_type = Option<Object>)]
    pub mcp: Option<serde_json::Value>,
    /// Not supported: refused when given.
    #[schema(value_type = Option<Object>)]
    pub iam: Option<serde_json::Value>,
    /// Not supported: refused when given.
    #[schema(value_type = Option<Vec<Object>>)]
    pub volume_mounts: Option<serde_json::Value>,
}

impl NewSandbox {
    /// The first feature asked for that Warren does not have, as the message of a 400.
    pub fn unsupported(&self) -> Option<String> {
        let network = self.network.as_ref().map(|n| n.refusable());
        warren_core::e2b_features::refused_create_features(&serde_json::json!({
            "mcp": self.mcp,
            "iam": self.iam,
            "volumeMounts": self.volume_mounts,
            "network": network,
        }))
    }
}

/// `autoResume` of `NewSandboxV2`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct AutoResume {
    #[serde(default)]
    pub enabled: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct TimeoutBody {
    /// Seconds from now; at most the daemon's maximum (24 h by default).
    #[schema(minimum = 0, maximum = 86400)]
    pub timeout: i64,
}

/// `ConnectSandboxV2`, the v1 connect body and the v1 resume body.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct ConnectBody {
    /// Seconds from now; at most the daemon's maximum (24 h by default).
    #[schema(minimum = 0, maximum = 86400)]
    pub timeout: Option<i64>,
}

/// Pause takes `{}` or options Warren does not distinguish (`memory`, `requireHealthyGuest`).
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct PauseBody {}

fn rfc3339(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// `Sandbox`: the create and connect response.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Sandbox)]
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
    /// Present when the sandbox's ports are private (`allowPublicTraffic: false`).
    pub traffic_access_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

impl SandboxJson {
    pub fn new(r: &SandboxRecord, envd_version: &str, domain: Option<&str>) -> Self {
        SandboxJson {
            template_id: r.template_id.clone(),
            sandbox_id: r.id.clone(),
            client_id: r.team_id.clone(),
            envd_version: envd_version.into(),
            alias: r.template_id.clone(),
            envd_access_token: r.envd_access_token.clone(),
            traffic_access_token: (!r.spec.network.allow_public_traffic)
                .then(|| warren_core::traffic_access_token(&r.envd_access_token)),
            domain: domain.map(Into::into),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Lifecycle {
    pub auto_resume: bool,
    /// `kill` or `pause`.
    #[schema(value_type = String)]
    pub on_timeout: &'static str,
}

/// `SandboxDetail` (GET /sandboxes/{id}).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = SandboxDetail)]
pub struct SandboxDetailJson {
    #[serde(rename = "templateID")]
    pub template_id: String,
    pub alias: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    pub started_at: String,
    pub end_at: String,
    pub envd_version: String,
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    /// `running` or `paused`.
    #[schema(value_type = String)]
    pub state: &'static str,
    pub metadata: BTreeMap<String, String>,
    pub envd_access_token: String,
    pub allow_internet_access: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    pub lifecycle: Lifecycle,
    pub network: crate::network::NetworkInfoJson,
    /// What a paused sandbox keeps (`memory`, `filesystem`, `ip`); empty while running.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    #[schema(value_type = Vec<String>)]
    pub persistent_contents: &'static [&'static str],
    /// Warren's extension: where a paused sandbox's memory is, `ram` (frozen) or `disk`
    /// (hibernated).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub memory_location: Option<&'static str>,
}

fn public_state(r: &SandboxRecord) -> &'static str {
    // Records handed to the API are visible ones; "running" is the safe reading otherwise.
    r.state.public().map(|s| s.as_str()).unwrap_or("running")
}

impl SandboxDetailJson {
    pub fn new(r: &SandboxRecord, envd_version: &str, domain: Option<&str>) -> Self {
        SandboxDetailJson {
            template_id: r.template_id.clone(),
            alias: r.template_id.clone(),
            sandbox_id: r.id.clone(),
            client_id: r.team_id.clone(),
            started_at: rfc3339(&r.started_at),
            end_at: rfc3339(&r.end_at),
            envd_version: envd_version.into(),
            cpu_count: r.cpu_count,
            memory_mb: r.memory_mb,
            disk_size_mb: r.disk_mb,
            state: public_state(r),
            metadata: r.metadata.clone(),
            envd_access_token: r.envd_access_token.clone(),
            allow_internet_access: r.allow_internet,
            domain: domain.map(Into::into),
            lifecycle: Lifecycle {
                auto_resume: r.auto_resume_secs.is_some(),
                on_timeout: if r.auto_pause { "pause" } else { "kill" },
            },
            network: crate::network::NetworkInfoJson::new(r),
            persistent_contents: warren_core::orchestrator::hibernation::persistent_contents(
                r.state,
            ),
            memory_location: warren_core::orchestrator::hibernation::memory_location(r.state),
        }
    }
}

/// `ListedSandbox` (GET /v2/sandboxes, GET /sandboxes).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = ListedSandbox)]
pub struct ListedSandboxJson {
    #[serde(rename = "templateID")]
    pub template_id: String,
    pub alias: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    pub started_at: String,
    pub end_at: String,
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    /// `running` or `paused`.
    #[schema(value_type = String)]
    pub state: &'static str,
    pub envd_version: String,
    pub metadata: BTreeMap<String, String>,
}

impl ListedSandboxJson {
    pub fn new(r: &SandboxRecord, envd_version: &str) -> Self {
        ListedSandboxJson {
            template_id: r.template_id.clone(),
            alias: r.template_id.clone(),
            sandbox_id: r.id.clone(),
            client_id: r.team_id.clone(),
            started_at: rfc3339(&r.started_at),
            end_at: rfc3339(&r.end_at),
            cpu_count: r.cpu_count,
            memory_mb: r.memory_mb,
            disk_size_mb: r.disk_mb,
            state: public_state(r),
            envd_version: envd_version.into(),
            metadata: r.metadata.clone(),
        }
    }
}
