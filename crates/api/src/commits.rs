//! Warren's endpoints for commits and registry secrets (`/warren/v1/commits`,
//! `/warren/v1/secrets`). A commit is a job: `POST` (or `PUT` by name, like `kubectl apply`)
//! starts it and answers 202 with the object in phase `Pending`; clients poll `GET` until the
//! phase is `Succeeded` or `Failed`.

use crate::error::ApiError;
use crate::extract::{Auth, JsonBody};
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use chrono::Utc;
use serde::Deserialize;
use warren_core::commit::{Commit, RegistrySecret};
use warren_core::CoreError;

type ApiResult<T> = Result<T, ApiError>;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/warren/v1/commits", get(list).post(create))
        .route(
            "/warren/v1/commits/{name}",
            get(get_one).put(apply).delete(delete),
        )
        .route("/warren/v1/secrets", get(list_secrets))
        .route(
            "/warren/v1/secrets/{name}",
            get(get_secret).put(put_secret).delete(delete_secret),
        )
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

async fn list(State(st): State<AppState>, Auth(_): Auth) -> ApiResult<Json<Vec<Commit>>> {
    Ok(Json(st.warren.list_commits().await?))
}

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

async fn get_one(
    State(st): State<AppState>,
    Auth(_): Auth,
    Path(name): Path<String>,
) -> ApiResult<Json<Commit>> {
    Ok(Json(st.warren.get_commit(&name).await?))
}

async fn delete(
    State(st): State<AppState>,
    Auth(_): Auth,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    st.warren.delete_commit(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretBody {
    username: String,
    password: String,
}

async fn list_secrets(
    State(st): State<AppState>,
    Auth(_): Auth,
) -> ApiResult<Json<Vec<RegistrySecret>>> {
    Ok(Json(st.warren.list_secrets().await?))
}

async fn get_secret(
    State(st): State<AppState>,
    Auth(_): Auth,
    Path(name): Path<String>,
) -> ApiResult<Json<RegistrySecret>> {
    Ok(Json(st.warren.get_secret(&name).await?))
}

async fn put_secret(
    State(st): State<AppState>,
    Auth(_): Auth,
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

async fn delete_secret(
    State(st): State<AppState>,
    Auth(_): Auth,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    st.warren.delete_secret(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}
