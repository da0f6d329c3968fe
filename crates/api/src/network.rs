//! Network and metrics endpoints, and the JSON shapes they share with create and get:
//! `PUT /sandboxes/{id}/network` (E2B's `SandboxNetworkUpdateConfig`) and
//! `GET /sandboxes/{id}/metrics` (`[SandboxMetric]`).

use crate::error::ApiError;
use crate::extract::{Auth, JsonBody};
use crate::AppState;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::SecondsFormat;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use warren_core::{MetricPoint, NetworkRequest, NetworkUpdate, SandboxRecord};

/// E2B's `SandboxNetworkConfig` as a create request carries it. Fields Warren does not act on
/// (`dnsServers`, `egressProxy`, `maskRequestHost`, `rules`, …) are ignored; domain names in
/// `allowOut` go through the runtime's DNS filter (whatever server the sandbox asks, so
/// `dnsServers` needs no opening).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = SandboxNetworkConfig)]
pub struct NetworkConfigJson {
    #[serde(alias = "allow_public_traffic")]
    pub allow_public_traffic: Option<bool>,
    #[serde(default, alias = "allow_out")]
    pub allow_out: Option<Vec<String>>,
    #[serde(default, alias = "deny_out")]
    pub deny_out: Option<Vec<String>>,
    /// Not supported: refused when given.
    #[schema(value_type = Option<Object>)]
    #[serde(default, alias = "egress_proxy")]
    pub egress_proxy: Option<serde_json::Value>,
    /// Not supported: refused when given.
    #[schema(value_type = Option<Object>)]
    #[serde(default)]
    pub rules: Option<serde_json::Value>,
    /// Not supported: refused when given.
    #[schema(value_type = Option<String>)]
    #[serde(default, alias = "mask_request_host")]
    pub mask_request_host: Option<serde_json::Value>,
    /// Not supported: refused when given.
    #[schema(value_type = Option<Vec<u16>>)]
    #[serde(default, alias = "https_ports")]
    pub https_ports: Option<serde_json::Value>,
}

impl NetworkConfigJson {
    /// The fields Warren refuses, as JSON for [`warren_core::e2b_features`].
    pub fn refusable(&self) -> serde_json::Value {
        serde_json::json!({
            "egressProxy": self.egress_proxy,
            "rules": self.rules,
            "maskRequestHost": self.mask_request_host,
            "httpsPorts": self.https_ports,
        })
    }

    pub fn into_request(self) -> NetworkRequest {
        NetworkRequest {
            allow_out: self.allow_out.unwrap_or_default(),
            deny_out: self.deny_out.unwrap_or_default(),
            allow_public_traffic: self.allow_public_traffic,
        }
    }
}

/// `SandboxNetworkUpdateConfig`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = SandboxNetworkUpdateConfig)]
pub struct NetworkUpdateJson {
    #[serde(default, alias = "allow_out")]
    pub allow_out: Option<Vec<String>>,
    #[serde(default, alias = "deny_out")]
    pub deny_out: Option<Vec<String>>,
    // The SDK's snake_case key, as in create.
    #[serde(rename = "allow_internet_access", alias = "allowInternetAccess")]
    pub allow_internet_access: Option<bool>,
    /// Not supported: refused when given.
    #[schema(value_type = Option<Object>)]
    #[serde(default, alias = "egress_proxy")]
    pub egress_proxy: Option<serde_json::Value>,
    /// Not supported: refused when given.
    #[schema(value_type = Option<Object>)]
    #[serde(default)]
    pub rules: Option<serde_json::Value>,
}

/// The network part of `SandboxDetail`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = SandboxNetworkInfo)]
pub struct NetworkInfoJson {
    pub allow_public_traffic: bool,
    pub allow_out: Vec<String>,
    pub deny_out: Vec<String>,
}

impl NetworkInfoJson {
    pub fn new(r: &SandboxRecord) -> Self {
        let n = &r.spec.network;
        NetworkInfoJson {
            allow_public_traffic: n.allow_public_traffic,
            allow_out: n.egress.allow_out_strings(),
            deny_out: n.egress.deny_out.iter().map(|c| c.to_string()).collect(),
        }
    }
}

/// `SandboxMetric`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = SandboxMetric)]
pub struct MetricJson {
    pub timestamp: String,
    pub timestamp_unix: i64,
    pub cpu_count: u32,
    pub cpu_used_pct: f64,
    pub mem_used: u64,
    pub mem_total: u64,
    pub mem_cache: u64,
    pub disk_used: u64,
    pub disk_total: u64,
}

impl From<MetricPoint> for MetricJson {
    fn from(p: MetricPoint) -> Self {
        MetricJson {
            timestamp: p.timestamp.to_rfc3339_opts(SecondsFormat::Millis, true),
            timestamp_unix: p.timestamp.timestamp(),
            cpu_count: p.cpu_count,
            cpu_used_pct: p.cpu_used_pct,
            mem_used: p.mem_used,
            mem_total: p.mem_total,
            mem_cache: p.mem_cache,
            disk_used: p.disk_used,
            disk_total: p.disk_total,
        }
    }
}

/// Replaces the sandbox's egress rules.
#[utoipa::path(put, path = "/sandboxes/{id}/network", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox ID")),
    request_body = NetworkUpdateJson,
    responses((status = 204, description = "Rules applied")))]
pub async fn update_network(
    State(st): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<NetworkUpdateJson>,
) -> Result<StatusCode, ApiError> {
    let refused = warren_core::e2b_features::refused_network_features(&serde_json::json!({
        "egressProxy": body.egress_proxy,
        "rules": body.rules,
    }));
    if let Some(msg) = refused {
        return Err(ApiError::bad_request(msg));
    }
    let update = NetworkUpdate {
        allow_internet: body.allow_internet_access,
        allow_out: body.allow_out.unwrap_or_default(),
        deny_out: body.deny_out.unwrap_or_default(),
    };
    st.warren.update_network(&who, &id, update).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The sandbox's resource use over time; `?start=<unix>&end=<unix>`, both optional.
#[utoipa::path(get, path = "/sandboxes/{id}/metrics", operation_id = "sandbox_metrics", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox ID"),
        ("start" = Option<i64>, Query, description = "Unix seconds"),
        ("end" = Option<i64>, Query, description = "Unix seconds")),
    responses((status = 200, description = "Samples, oldest first", body = Vec<MetricJson>)))]
pub async fn metrics(
    State(st): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<MetricJson>>, ApiError> {
    let (mut start, mut end) = (None, None);
    for (k, v) in url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        let slot = match k.as_ref() {
            "start" => &mut start,
            "end" => &mut end,
            _ => continue,
        };
        *slot = Some(v.parse::<i64>().map_err(|_| {
            ApiError::bad_request(format!("invalid {k} {v:?}: expected unix seconds"))
        })?);
    }
    let points = st.warren.metrics(&who, &id, start, end).await?;
    Ok(Json(points.into_iter().map(MetricJson::from).collect()))
}
