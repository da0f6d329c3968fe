//! `GET /sandboxes/{id}/metrics` in cluster mode: the E2B `SandboxMetric` list that single-host
//! mode answers (`crates/api/src/network.rs::metrics`), from the node agent on the sandbox's node.
//!
//! The agent reads the sandbox's cumulative usage from its cgroup and upper dir with the
//! single-host runtime's code; the point is computed by the single-host function
//! ([`warren_core::orchestrator::metrics::metric_point`]). An API replica keeps no series (it
//! runs no sampler, and replicas share nothing but the CRDs), so the answer is one point, now,
//! with CPU averaged since the sandbox started, as single-host mode's first point of a sandbox
//! is. A sandbox that is not running has no point (single-host mode samples running ones only).

use super::{check_key, ApiError, ClusterApi, Shared};
use crate::agent::{node_id, AgentError, NodeAgent};
use crate::conditions;
use crate::crd::SandboxPhase;
use crate::sandbox_agent::{mebibytes, vcpus};
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, SecondsFormat, Utc};
use kube::ResourceExt;
use serde::Serialize;
use std::sync::Arc;
use warren_core::orchestrator::metrics::{metric_point, SandboxSize};
use warren_core::MetricPoint;

/// E2B's `SandboxMetric`, field for field as single-host mode serializes it.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
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

/// `?start=<unix>&end=<unix>`, both optional, as single-host mode reads them.
fn range(query: Option<&str>) -> Result<(Option<i64>, Option<i64>), ApiError> {
    let (mut start, mut end) = (None, None);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match k {
            "start" => &mut start,
            "end" => &mut end,
            _ => continue,
        };
        *slot = Some(v.parse::<i64>().map_err(|_| {
            ApiError::new(400, format!("invalid {k} {v:?}: expected unix seconds"))
        })?);
    }
    if let (Some(s), Some(e)) = (start, end) {
        if s > e {
            return Err(ApiError::new(
                400,
                format!("start ({s}) is after end ({e})"),
            ));
        }
    }
    Ok((start, end))
}

fn agent_error(id: &str, e: AgentError) -> ApiError {
    match e {
        AgentError::NotFound { node, .. } => ApiError::new(
            404,
            format!("sandbox {id} is not running on its node {node}"),
        ),
        AgentError::Unreachable { .. } => ApiError::new(502, format!("sandbox {id}: {e}")),
        // The agent refused this replica's token: not the client's fault.
        AgentError::Failed { code: 401, .. } => ApiError::new(502, format!("sandbox {id}: {e}")),
        AgentError::Failed { code, .. } => ApiError::new(code, format!("sandbox {id}: {e}")),
    }
}

impl ClusterApi {
    /// The sandbox's metric points with `start <= timestamp <= end` (unix seconds).
    pub async fn metrics(
        &self,
        id: &str,
        start: Option<i64>,
        end: Option<i64>,
    ) -> Result<Vec<MetricJson>, ApiError> {
        let s = self.get_visible(id).await?;
        let st = s.status.clone().unwrap_or_default();
        if st.phase != SandboxPhase::Running || s.spec.paused {
            return Ok(Vec::new());
        }
        let agent: &Arc<dyn NodeAgent> = self.agent.as_ref().ok_or_else(|| {
            ApiError::new(
                501,
                "metrics need the node agents: this API replica has no node agent token \
                 (WARREN_NODE_AGENT_METRICS_TOKEN_FILE: create the chart's metrics token Secret)",
            )
        })?;
        let node = st
            .node_name
            .clone()
            .ok_or_else(|| ApiError::new(502, format!("sandbox {id} has no node yet")))?;
        let now = Utc::now();
        // The agent started the sandbox when `Started` turned true.
        let started = conditions::find(&st.conditions, "Started")
            .filter(|c| c.status == "True")
            .and_then(|c| c.last_transition_time.parse::<DateTime<Utc>>().ok())
            .or_else(|| {
                s.metadata
                    .creation_timestamp
                    .as_ref()
                    .and_then(|t| t.0.to_string().parse().ok())
            })
            .unwrap_or(now);
        let stats = agent
            .metrics(&node, &node_id(&s.uid().unwrap_or_default()))
            .await
            .map_err(|e| agent_error(id, e))?;
        let res = &s.spec.resources;
        let pick = |k: &str| res.limits.get(k).or_else(|| res.requests.get(k));
        let size = SandboxSize {
            cpu_count: pick("cpu").and_then(|q| vcpus(q)).unwrap_or(1),
            memory_mb: pick("memory").and_then(|q| mebibytes(q)).unwrap_or(0),
            // A capped sandbox reports its disk's size itself (`disk_total_bytes`, from the
            // cap's statfs, as in single-host mode); this is only the fallback.
            disk_mb: 0,
        };
        let p = metric_point(now, (started, 0), size, &stats);
        let t = p.timestamp.timestamp();
        let within = start.is_none_or(|s| t >= s) && end.is_none_or(|e| t <= e);
        Ok(if within { vec![p.into()] } else { Vec::new() })
    }
}

pub(super) async fn h_metrics(
    State(api): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    check_key(&api, &headers)?;
    let (start, end) = range(query.as_deref())?;
    Ok(Json(api.metrics(&id, start, end).await?).into_response())
}

/// The client of the node agents for an API replica: the same as the operator's (the node's
/// `InternalIP` and the agents' port), with the agents' read-only metrics token from the file
/// named by `WARREN_NODE_AGENT_METRICS_TOKEN_FILE` (the chart mounts an optional Secret there),
/// or else their full token from `WARREN_NODE_AGENT_TOKEN_FILE`. Neither: none (metrics answer
/// 501, saying why).
pub(super) fn agent_from_env(client: kube::Client) -> anyhow::Result<Option<Arc<dyn NodeAgent>>> {
    use anyhow::Context as _;
    let file = [
        "WARREN_NODE_AGENT_METRICS_TOKEN_FILE",
        "WARREN_NODE_AGENT_TOKEN_FILE",
    ]
    .iter()
    .filter_map(std::env::var_os)
    .map(std::path::PathBuf::from)
    .find(|p| p.exists());
    let Some(p) = file else {
        return Ok(None);
    };
    let token = std::fs::read_to_string(&p)
        .with_context(|| format!("reading the node agent token {}", p.display()))?
        .trim()
        .to_string();
    let port = match std::env::var("WARREN_NODE_AGENT_PORT") {
        Ok(p) => p
            .parse()
            .with_context(|| format!("WARREN_NODE_AGENT_PORT={p:?} is not a port"))?,
        Err(_) => crate::agent::DEFAULT_PORT,
    };
    let mut agent = crate::agent::http::HttpNodeAgent::new(
        crate::agent::http::AgentAddress::NodeInternalIp { client, port },
        Some(token),
    )
    .with_ca_from_env()
    .context("the node agents' CA (WARREN_NODE_AGENT_CA_FILE)")?;
    // A metrics read, not a dump: answer or fail fast.
    agent.timeout = std::time::Duration::from_secs(10);
    Ok(Some(Arc::new(agent)))
}
