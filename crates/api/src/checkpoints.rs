//! Checkpoints, on Warren's API (`/warren/v1/checkpoints`) and as E2B's snapshots and forks:
//!
//! * `POST /sandboxes/{id}/snapshots` `{"name"?, "memory"?}` → 201 `{"snapshotID", "names"}`: a
//!   checkpoint with the sandbox running on (`memory: false` keeps only the filesystem);
//! * `GET /snapshots?sandboxID=&name=&limit=&nextToken=` → the team's snapshots, paged with
//!   `x-next-token`;
//! * `DELETE /templates/{id}` (the SDK's `delete_snapshot`) deletes a checkpoint, or else the
//!   template of that name;
//! * `POST /sandboxes/{id}/fork` `{"count"?, "timeout"?}` → 201 with one `{"sandbox"}` or
//!   `{"error": {"code", "message"}}` per fork;
//! * `POST /warren/v1/checkpoints/{name}/restore` `{"count"?, "timeout"?, "metadata"?, "envVars"?}`:
//!   the same per-item answer, from an existing checkpoint.
//!
//! `Sandbox.create(template=<snapshot id>)` restores through the ordinary create.

use crate::error::ApiError;
use crate::extract::{Auth, JsonBody};
use crate::AppState;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use warren_core::checkpoint::Checkpoint;
use warren_core::orchestrator::checkpoints::RestoreRequest;
use warren_core::{CoreError, SandboxRecord};

type ApiResult<T> = Result<T, ApiError>;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/warren/v1/checkpoints", get(list).post(create))
        .route(
            "/warren/v1/checkpoints/{name}",
            get(get_one).put(apply).delete(delete),
        )
        .route("/warren/v1/checkpoints/{name}/restore", post(restore))
        .route("/sandboxes/{id}/snapshots", post(create_snapshot))
        .route("/snapshots", get(list_snapshots))
        .route("/templates/{id}", axum::routing::delete(delete_snapshot))
        .route("/sandboxes/{id}/fork", post(fork))
}

fn parse(value: serde_json::Value) -> ApiResult<Checkpoint> {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or("Checkpoint");
    if kind != "Checkpoint" {
        return Err(ApiError::bad_request(format!(
            "kind is {kind:?}, expected \"Checkpoint\" on this endpoint"
        )));
    }
    serde_json::from_value(value)
        .map_err(|e| ApiError::bad_request(format!("invalid Checkpoint: {e}")))
}

async fn list(State(st): State<AppState>, Auth(who): Auth) -> ApiResult<Json<Vec<Checkpoint>>> {
    Ok(Json(st.warren.list_checkpoints(&who).await?))
}

async fn create(
    State(st): State<AppState>,
    Auth(who): Auth,
    JsonBody(body): JsonBody<serde_json::Value>,
) -> ApiResult<(StatusCode, Json<Checkpoint>)> {
    let c = parse(body)?;
    Ok((
        StatusCode::CREATED,
        Json(st.warren.create_checkpoint(&who, c).await?),
    ))
}

/// Apply by name: an existing checkpoint with the same spec is returned as it is; another spec
/// under the same name is a conflict, since a checkpoint is a one-off snapshot.
async fn apply(
    State(st): State<AppState>,
    Auth(who): Auth,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<serde_json::Value>,
) -> ApiResult<(StatusCode, Json<Checkpoint>)> {
    let c = parse(body)?;
    if c.metadata.name != name {
        return Err(ApiError::bad_request(format!(
            "metadata.name {:?} does not match the URL's {name:?}",
            c.metadata.name
        )));
    }
    match st.warren.get_checkpoint(&who, &name).await {
        Ok(existing) if existing.spec == c.spec => return Ok((StatusCode::OK, Json(existing))),
        Ok(_) => {
            return Err(CoreError::Conflict(format!(
                "checkpoint {name} exists with another spec; delete it first"
            ))
            .into())
        }
        Err(CoreError::NotFound(_)) => {}
        Err(e) => return Err(e.into()),
    }
    Ok((
        StatusCode::CREATED,
        Json(st.warren.create_checkpoint(&who, c).await?),
    ))
}

async fn get_one(
    State(st): State<AppState>,
    Auth(who): Auth,
    Path(name): Path<String>,
) -> ApiResult<Json<Checkpoint>> {
    Ok(Json(st.warren.get_checkpoint(&who, &name).await?))
}

async fn delete(
    State(st): State<AppState>,
    Auth(who): Auth,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    st.warren.delete_checkpoint(&who, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// One fork's outcome, as E2B's `SandboxForkResult`.
#[derive(Serialize)]
struct ForkResult {
    #[serde(skip_serializing_if = "Option::is_none")]
    sandbox: Option<crate::models::SandboxJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<serde_json::Value>,
}

fn fork_results(
    st: &AppState,
    results: Vec<Result<SandboxRecord, CoreError>>,
) -> (StatusCode, Json<Vec<ForkResult>>) {
    let items = results
        .into_iter()
        .map(|r| match r {
            Ok(rec) => ForkResult {
                sandbox: Some(st.sandbox_json(&rec)),
                error: None,
            },
            Err(e) => {
                let e = ApiError::from(e);
                ForkResult {
                    sandbox: None,
                    error: Some(
                        serde_json::json!({"code": e.status.as_u16(), "message": e.message}),
                    ),
                }
            }
        })
        .collect();
    (StatusCode::CREATED, Json(items))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RestoreBody {
    count: Option<u32>,
    timeout: Option<i64>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    env_vars: BTreeMap<String, String>,
}

async fn restore(
    State(st): State<AppState>,
    Auth(who): Auth,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<RestoreBody>,
) -> ApiResult<Response> {
    let req = RestoreRequest {
        timeout_secs: body.timeout,
        metadata: body.metadata,
        env_vars: body.env_vars,
    };
    let results = st
        .warren
        .restore_many(&who, &name, body.count.unwrap_or(1), req)
        .await?;
    Ok(fork_results(&st, results).into_response())
}

#[derive(Deserialize)]
struct ForkBody {
    count: Option<i64>,
    timeout: Option<i64>,
}

async fn fork(
    State(st): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ForkBody>,
) -> ApiResult<Response> {
    let count = body.count.unwrap_or(1);
    let count = u32::try_from(count).map_err(|_| {
        ApiError::bad_request(format!(
            "count must be between 1 and {} (got {count})",
            warren_core::orchestrator::checkpoints::MAX_FORKS
        ))
    })?;
    let results = st.warren.fork(&who, &id, count, body.timeout).await?;
    Ok(fork_results(&st, results).into_response())
}

#[derive(Deserialize)]
struct SnapshotBody {
    name: Option<String>,
    memory: Option<bool>,
}

#[derive(Serialize)]
struct SnapshotInfo {
    #[serde(rename = "snapshotID")]
    snapshot_id: String,
    names: Vec<String>,
}

fn snapshot_info(c: &Checkpoint) -> SnapshotInfo {
    SnapshotInfo {
        snapshot_id: c.metadata.name.clone(),
        names: vec![c.metadata.name.clone()],
    }
}

async fn create_snapshot(
    State(st): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<SnapshotBody>,
) -> ApiResult<(StatusCode, Json<SnapshotInfo>)> {
    let mut contents = vec!["filesystem".to_string()];
    if body.memory.unwrap_or(true) {
        contents.insert(0, "memory".into());
    }
    let c = parse(serde_json::json!({
        "kind": "Checkpoint",
        "metadata": {"name": body.name.unwrap_or_default()},
        "spec": {"sandbox": id, "keepRunning": true, "persistentContents": contents},
    }))?;
    let c = st.warren.create_checkpoint(&who, c).await?;
    Ok((StatusCode::CREATED, Json(snapshot_info(&c))))
}

async fn list_snapshots(
    State(st): State<AppState>,
    Auth(who): Auth,
    RawQuery(query): RawQuery,
) -> ApiResult<Response> {
    let mut sandbox = None;
    let mut name = None;
    let mut limit = 100usize;
    let mut after = None;
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match k.as_ref() {
            "sandboxID" => sandbox = Some(v.into_owned()),
            "name" => name = Some(v.into_owned()),
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=100).contains(n))
                    .ok_or_else(|| ApiError::bad_request(format!("invalid limit {v:?}")))?
            }
            "nextToken" => after = Some(v.into_owned()),
            _ => {}
        }
    }
    let all: Vec<Checkpoint> = st
        .warren
        .list_checkpoints(&who)
        .await?
        .into_iter()
        .filter(|c| c.fork_of().is_none())
        .filter(|c| sandbox.as_ref().is_none_or(|s| &c.spec.sandbox == s))
        .filter(|c| {
            name.as_ref().is_none_or(|n| {
                let n = n.split(':').next().unwrap_or(n);
                c.metadata.name == n || c.metadata.name == n.rsplit('/').next().unwrap_or(n)
            })
        })
        .collect();
    let start = match &after {
        Some(a) => all
            .iter()
            .position(|c| &c.metadata.name == a)
            .map(|i| i + 1)
            .ok_or_else(|| ApiError::bad_request(format!("invalid nextToken {a:?}")))?,
        None => 0,
    };
    let page: Vec<&Checkpoint> = all[start..].iter().take(limit).collect();
    let more = all.len() > start + page.len();
    let items: Vec<SnapshotInfo> = page.iter().map(|c| snapshot_info(c)).collect();
    let mut resp = Json(items).into_response();
    if more {
        if let Some(last) = page.last() {
            if let Ok(v) = HeaderValue::from_str(&last.metadata.name) {
                resp.headers_mut().insert("x-next-token", v);
            }
        }
    }
    Ok(resp)
}

/// The SDK deletes a snapshot as a template: a checkpoint of that name goes, else the template.
async fn delete_snapshot(
    State(st): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    if st.warren.is_checkpoint(&who, &id).await {
        st.warren.delete_checkpoint(&who, &id).await?;
    } else {
        st.warren.delete_template(&id).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}
