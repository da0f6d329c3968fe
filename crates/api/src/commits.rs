//! Warren's endpoints for commits and registry secrets (`/warren/v1/commits`,
//! `/warren/v1/secrets`). A commit is a job: `POST` (or `PUT` by name, like `kubectl apply`)
//! starts it and answers 202 with the object in phase `Pending`; clients poll `GET` until the
//! phase is `Succeeded` or `Failed`.

use crate::error::ApiError;
use crate::extract::{Auth, JsonBody};
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use warren_core::commit::{Commit, RegistrySecret};
use warren_core::CoreError;

type ApiResult<T> = Result<T, ApiError>;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(get_one, apply, delete))
        .routes(routes!(list_secrets))
        .routes(routes!(get_secret, put_secret, delete_secret))
}

/// Request body of the commit endpoints (the object the operator's `Commit` CRD holds).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // documentation only: the handlers parse warren_core's Commit
#[schema(as = Commit)]
pub struct CommitDoc {
    /// `warren.dev/v1alpha1`.
    #[schema(rename = "apiVersion")]
    api_version: Option<String>,
    /// `Commit` (the default).
    kind: Option<String>,
    metadata: crate::pools::ObjectMetaDoc,
    /// `{"sandbox": "<id>", "image": "<reference>", "pushSecret": "<secret name>", ...}`
    spec: serde_json::Value,
}

fn parse(value: serde_json::Value) -> ApiResult<Commit> {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or("Commit");
    if kind != "Commit" {
        return Err(ApiError::bad_request(format!(
            "kind is {kind:?}, expected \"Commit\" on this endpoint"
        )));
    }
    serde_json::from_value(value).map_err(|e| ApiError::bad_request(format!("invalid Commit: {e}")))
}

#[utoipa::path(get, path = "/warren/v1/commits", operation_id = "list_commits", tag = "commits",
    responses((status = 200, description = "Every commit", body = Vec<Object>)))]
async fn list(State(st): State<AppState>, _who: Auth) -> ApiResult<Json<Vec<Commit>>> {
    Ok(Json(st.warren.list_commits().await?))
}

/// Starts a commit; poll `GET /warren/v1/commits/{name}` until its phase is final.
#[utoipa::path(post, path = "/warren/v1/commits", operation_id = "create_commit", tag = "commits",
    request_body = CommitDoc,
    responses((status = 202, description = "Started, phase `Pending`", body = Object)))]
async fn create(
    State(st): State<AppState>,
    Auth(who): Auth,
    JsonBody(body): JsonBody<serde_json::Value>,
) -> ApiResult<(StatusCode, Json<Commit>)> {
    let c = parse(body)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(st.warren.create_commit(&who, c).await?),
    ))
}

/// Apply by name: an existing commit with the same spec is returned as it is (apply is
/// idempotent); another spec under the same name is a conflict, since a commit is a one-off job.
#[utoipa::path(put, path = "/warren/v1/commits/{name}", operation_id = "apply_commit", tag = "commits", params(("name" = String, Path)),
    request_body = CommitDoc,
    responses((status = 200, description = "Exists with this spec", body = Object),
        (status = 202, description = "Started", body = Object)))]
async fn apply(
    State(st): State<AppState>,
    Auth(who): Auth,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<serde_json::Value>,
) -> ApiResult<(StatusCode, Json<Commit>)> {
    let c = parse(body)?;
    if c.metadata.name != name {
        return Err(ApiError::bad_request(format!(
            "metadata.name {:?} does not match the URL's {name:?}",
            c.metadata.name
        )));
    }
    match st.warren.get_commit(&name).await {
        Ok(existing) if existing.spec == c.spec => return Ok((StatusCode::OK, Json(existing))),
        Ok(_) => {
            return Err(CoreError::Conflict(format!(
                "commit {name} exists with another spec; delete it first"
            ))
            .into())
        }
        Err(CoreError::NotFound(_)) => {}
        Err(e) => return Err(e.into()),
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(st.warren.create_commit(&who, c).await?),
    ))
}

#[utoipa::path(get, path = "/warren/v1/commits/{name}", operation_id = "get_commit", tag = "commits", params(("name" = String, Path)),
    responses((status = 200, description = "The commit and its status", body = Object)))]
async fn get_one(
    State(st): State<AppState>,
    _who: Auth,
    Path(name): Path<String>,
) -> ApiResult<Json<Commit>> {
    Ok(Json(st.warren.get_commit(&name).await?))
}

#[utoipa::path(delete, path = "/warren/v1/commits/{name}", operation_id = "delete_commit", tag = "commits", params(("name" = String, Path)),
    responses((status = 204, description = "Deleted")))]
async fn delete(
    State(st): State<AppState>,
    _who: Auth,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    st.warren.delete_commit(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct SecretBody {
    #[schema(min_length = 1)]
    username: String,
    #[schema(min_length = 1)]
    password: String,
}

#[utoipa::path(get, path = "/warren/v1/secrets", tag = "commits",
    responses((status = 200, description = "Every registry secret, without its password", body = Vec<Object>)))]
async fn list_secrets(
    State(st): State<AppState>,
    _who: Auth,
) -> ApiResult<Json<Vec<RegistrySecret>>> {
    Ok(Json(st.warren.list_secrets().await?))
}

#[utoipa::path(get, path = "/warren/v1/secrets/{name}", tag = "commits", params(("name" = String, Path)),
    responses((status = 200, description = "The secret, without its password", body = Object)))]
async fn get_secret(
    State(st): State<AppState>,
    _who: Auth,
    Path(name): Path<String>,
) -> ApiResult<Json<RegistrySecret>> {
    Ok(Json(st.warren.get_secret(&name).await?))
}

/// Stores registry credentials (basic auth) under a name, for commits to push with.
#[utoipa::path(put, path = "/warren/v1/secrets/{name}", tag = "commits", params(("name" = String, Path)),
    request_body = SecretBody,
    responses((status = 200, description = "Stored, without its password", body = Object)))]
async fn put_secret(
    State(st): State<AppState>,
    _who: Auth,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<SecretBody>,
) -> ApiResult<Json<RegistrySecret>> {
    let s = RegistrySecret {
        name,
        username: body.username,
        password: body.password,
        created_at: Utc::now(),
    };
    Ok(Json(st.warren.put_secret(s).await?))
}

#[utoipa::path(delete, path = "/warren/v1/secrets/{name}", tag = "commits", params(("name" = String, Path)),
    responses((status = 204, description = "Deleted")))]
async fn delete_secret(
    State(st): State<AppState>,
    _who: Auth,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    st.warren.delete_secret(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}
