//! Warren's own endpoints for warm pools (`/warren/v1/...`) and the Prometheus `/metrics`.
//!
//! The objects are the declarative SandboxSet and PoolingAutoScaler (see
//! `warren_core::objects`); `PUT` creates or replaces one by name, like `kubectl apply`.

use crate::error::ApiError;
use crate::extract::{Auth, JsonBody};
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use warren_core::objects::{PoolingAutoScaler, SandboxSet};
use warren_core::orchestrator::pools::{AutoscalerView, SandboxSetView};
use warren_core::pool::PoolStatus;

type ApiResult<T> = Result<T, ApiError>;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/warren/v1/pools", get(list_pools))
        .route("/warren/v1/sandboxsets", get(list_sets))
        .route(
            "/warren/v1/sandboxsets/{name}",
            get(get_set).put(put_set).delete(delete_set),
        )
        .route("/warren/v1/poolingautoscalers", get(list_scalers))
        .route(
            "/warren/v1/poolingautoscalers/{name}",
            get(get_scaler).put(put_scaler).delete(delete_scaler),
        )
}

/// Prometheus scrape endpoint. Unauthenticated, as scrapers usually are: it shows counts and
/// pool names, never sandbox ids, tokens or metadata.
async fn metrics(State(st): State<AppState>) -> ApiResult<Response> {
    let text = st.warren.metrics_text().await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// Parses an object body and checks that it names the object of the URL.
fn object<T: DeserializeOwned>(
    value: serde_json::Value,
    path_name: &str,
    kind: &str,
) -> ApiResult<T> {
    let body_kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
    if body_kind != kind {
        return Err(ApiError::bad_request(format!(
            "kind is {body_kind:?}, expected {kind:?} on this endpoint"
        )));
    }
    let body_name = value
        .pointer("/metadata/name")
        .and_then(|k| k.as_str())
        .unwrap_or("");
    if body_name != path_name {
        return Err(ApiError::bad_request(format!(
            "metadata.name {body_name:?} does not match the URL's {path_name:?}"
        )));
    }
    serde_json::from_value(value).map_err(|e| ApiError::bad_request(format!("invalid {kind}: {e}")))
}

async fn list_pools(State(st): State<AppState>, Auth(_): Auth) -> ApiResult<Json<Vec<PoolStatus>>> {
    Ok(Json(st.warren.pool_statuses().await?))
}

async fn list_sets(
    State(st): State<AppState>,
    Auth(_): Auth,
) -> ApiResult<Json<Vec<SandboxSetView>>> {
    Ok(Json(st.warren.list_sandbox_sets().await?))
}

async fn get_set(
    State(st): State<AppState>,
    Auth(_): Auth,
    Path(name): Path<String>,
) -> ApiResult<Json<SandboxSetView>> {
    Ok(Json(st.warren.get_sandbox_set(&name).await?))
}

async fn put_set(
    State(st): State<AppState>,
    Auth(_): Auth,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<serde_json::Value>,
) -> ApiResult<Json<SandboxSetView>> {
    let set: SandboxSet = object(body, &name, "SandboxSet")?;
    Ok(Json(st.warren.apply_sandbox_set(set).await?))
}

async fn delete_set(
    State(st): State<AppState>,
    Auth(_): Auth,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    st.warren.delete_sandbox_set(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_scalers(State(st): State<AppState>, Auth(_): Auth) -> Json<Vec<AutoscalerView>> {
    Json(st.warren.list_autoscalers())
}

async fn get_scaler(
    State(st): State<AppState>,
    Auth(_): Auth,
    Path(name): Path<String>,
) -> ApiResult<Json<AutoscalerView>> {
    Ok(Json(st.warren.get_autoscaler(&name)?))
}

async fn put_scaler(
    State(st): State<AppState>,
    Auth(_): Auth,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<serde_json::Value>,
) -> ApiResult<Json<AutoscalerView>> {
    let obj: PoolingAutoScaler = object(body, &name, "PoolingAutoScaler")?;
    Ok(Json(st.warren.apply_autoscaler(obj).await?))
}

async fn delete_scaler(
    State(st): State<AppState>,
    Auth(_): Auth,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    st.warren.delete_autoscaler(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests;
