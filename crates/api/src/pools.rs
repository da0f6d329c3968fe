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
use axum::Json;
use serde::de::DeserializeOwned;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use warren_core::objects::{PoolingAutoScaler, SandboxSet};
use warren_core::orchestrator::pools::{AutoscalerView, SandboxSetView};
use warren_core::pool::PoolStatus;

type ApiResult<T> = Result<T, ApiError>;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(metrics))
        .routes(routes!(list_pools))
        .routes(routes!(list_sets))
        .routes(routes!(get_set, put_set, delete_set))
        .routes(routes!(list_scalers))
        .routes(routes!(get_scaler, put_scaler, delete_scaler))
}

/// Request body of `PUT /warren/v1/sandboxsets/{name}` and `.../poolingautoscalers/{name}`: a
/// Kubernetes-shaped object (see the README for the `spec` of each kind).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // documentation only: the handlers parse the kind's own type
#[schema(as = KubeObject)]
pub struct KubeObjectDoc {
    /// `warren.dev/v1alpha1` (`agents.kruise.io/v1alpha1` is accepted too).
    #[schema(rename = "apiVersion")]
    api_version: Option<String>,
    /// `SandboxSet` or `PoolingAutoScaler`, as the URL says.
    kind: String,
    metadata: ObjectMetaDoc,
    spec: serde_json::Value,
}

#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
#[schema(as = ObjectMeta)]
pub struct ObjectMetaDoc {
    /// The name in the URL.
    name: String,
}

/// Prometheus scrape endpoint. Unauthenticated, as scrapers usually are: it shows counts and
/// pool names, never sandbox ids, tokens or metadata.
#[utoipa::path(get, path = "/metrics", operation_id = "prometheus_metrics", tag = "meta", security(()),
    responses((status = 200, description = "OpenMetrics text",
        content_type = "application/openmetrics-text", body = String)))]
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

/// Every pool's status.
#[utoipa::path(get, path = "/warren/v1/pools", tag = "pools",
    responses((status = 200, description = "One status per SandboxSet", body = Vec<Object>)))]
async fn list_pools(State(st): State<AppState>, _who: Auth) -> ApiResult<Json<Vec<PoolStatus>>> {
    Ok(Json(st.warren.pool_statuses().await?))
}

#[utoipa::path(get, path = "/warren/v1/sandboxsets", tag = "pools",
    responses((status = 200, description = "Every SandboxSet with its status", body = Vec<Object>)))]
async fn list_sets(State(st): State<AppState>, _who: Auth) -> ApiResult<Json<Vec<SandboxSetView>>> {
    Ok(Json(st.warren.list_sandbox_sets().await?))
}

#[utoipa::path(get, path = "/warren/v1/sandboxsets/{name}", tag = "pools", params(("name" = String, Path)),
    responses((status = 200, description = "The SandboxSet with its status", body = Object)))]
async fn get_set(
    State(st): State<AppState>,
    _who: Auth,
    Path(name): Path<String>,
) -> ApiResult<Json<SandboxSetView>> {
    Ok(Json(st.warren.get_sandbox_set(&name).await?))
}

/// Creates or replaces a SandboxSet (like `kubectl apply`).
#[utoipa::path(put, path = "/warren/v1/sandboxsets/{name}", tag = "pools", params(("name" = String, Path)),
    request_body = KubeObjectDoc,
    responses((status = 200, description = "The SandboxSet with its status", body = Object)))]
async fn put_set(
    State(st): State<AppState>,
    _who: Auth,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<serde_json::Value>,
) -> ApiResult<Json<SandboxSetView>> {
    let set: SandboxSet = object(body, &name, "SandboxSet")?;
    Ok(Json(st.warren.apply_sandbox_set(set).await?))
}

/// Deletes a SandboxSet and its unclaimed members.
#[utoipa::path(delete, path = "/warren/v1/sandboxsets/{name}", tag = "pools", params(("name" = String, Path)),
    responses((status = 204, description = "Deleted")))]
async fn delete_set(
    State(st): State<AppState>,
    _who: Auth,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    st.warren.delete_sandbox_set(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/warren/v1/poolingautoscalers", tag = "pools",
    responses((status = 200, description = "Every PoolingAutoScaler with its status", body = Vec<Object>)))]
async fn list_scalers(State(st): State<AppState>, _who: Auth) -> Json<Vec<AutoscalerView>> {
    Json(st.warren.list_autoscalers())
}

#[utoipa::path(get, path = "/warren/v1/poolingautoscalers/{name}", tag = "pools", params(("name" = String, Path)),
    responses((status = 200, description = "The PoolingAutoScaler with its status", body = Object)))]
async fn get_scaler(
    State(st): State<AppState>,
    _who: Auth,
    Path(name): Path<String>,
) -> ApiResult<Json<AutoscalerView>> {
    Ok(Json(st.warren.get_autoscaler(&name)?))
}

/// Creates or replaces a PoolingAutoScaler.
#[utoipa::path(put, path = "/warren/v1/poolingautoscalers/{name}", tag = "pools", params(("name" = String, Path)),
    request_body = KubeObjectDoc,
    responses((status = 200, description = "The PoolingAutoScaler with its status", body = Object)))]
async fn put_scaler(
    State(st): State<AppState>,
    _who: Auth,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<serde_json::Value>,
) -> ApiResult<Json<AutoscalerView>> {
    let obj: PoolingAutoScaler = object(body, &name, "PoolingAutoScaler")?;
    Ok(Json(st.warren.apply_autoscaler(obj).await?))
}

#[utoipa::path(delete, path = "/warren/v1/poolingautoscalers/{name}", tag = "pools", params(("name" = String, Path)),
    responses((status = 204, description = "Deleted")))]
async fn delete_scaler(
    State(st): State<AppState>,
    _who: Auth,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    st.warren.delete_autoscaler(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests;
