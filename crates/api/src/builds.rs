//! Template builds (`/warren/v1/templates/{name}/build`): `POST` starts one and answers `202` with
//! the job; `GET` follows it (`?logFrom=N` returns the RUN output from byte N on).
//!
//! The body is either the build context as a tar (`Content-Type: application/x-tar`; the
//! Dockerfile is the context's file named by `?dockerfile=`, default `Dockerfile`), streamed to a
//! file in the daemon's image store, or JSON `{"dockerfile": "FROM ..."}` for builds without COPY.

use crate::error::ApiError;
use crate::extract::{Auth, QueryParams};
use crate::AppState;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

type ApiResult<T> = Result<T, ApiError>;

/// Largest build context accepted.
const MAX_CONTEXT: u64 = 2 << 30;
/// Largest JSON body (a Dockerfile).
const MAX_JSON: usize = 1 << 20;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(start, status))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StartQuery {
    dockerfile: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonBuild {
    dockerfile: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StatusQuery {
    log_from: Option<u64>,
}

/// Starts a build of the template from a Dockerfile (a tar build context or JSON).
#[utoipa::path(post, path = "/warren/v1/templates/{name}/build", operation_id = "build_template", tag = "templates",
    params(("name" = String, Path), ("dockerfile" = Option<String>, Query, description = "The Dockerfile's path in a tar context")),
    request_body(content = Object, description = "`{\"dockerfile\": \"FROM ...\"}`, or a tar build context as `application/x-tar`"),
    responses((status = 202, description = "Build started", body = Object)))]
async fn start(
    State(st): State<AppState>,
    Auth(who): Auth,
    Path(name): Path<String>,
    QueryParams(q): QueryParams<StartQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let ctype = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let job = if ctype.starts_with("application/json") {
        if q.dockerfile.is_some() {
            return Err(ApiError::bad_request(
                "?dockerfile= names a file of a tar context; a JSON body gives the text",
            ));
        }
        let bytes = axum::body::to_bytes(body, MAX_JSON)
            .await
            .map_err(|e| ApiError::bad_request(format!("cannot read request body: {e}")))?;
        let req: JsonBuild = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
        st.warren
            .start_build(&who, &name, Some(req.dockerfile), "Dockerfile", None)
            .await?
    } else if ctype.starts_with("application/x-tar")
        || ctype.starts_with("application/octet-stream")
    {
        let path = st.warren.build_context_path()?;
        if let Err(e) = receive(body, &path).await {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(e);
        }
        let dockerfile = q.dockerfile.as_deref().unwrap_or("Dockerfile");
        // From here the build owns the file (and removes it when it ends or is refused).
        st.warren
            .start_build(&who, &name, None, dockerfile, Some(path))
            .await?
    } else {
        return Err(ApiError::bad_request(
            "send the build context as application/x-tar, or {\"dockerfile\": ...} as application/json",
        ));
    };
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

/// Streams the request body to `path`, up to [`MAX_CONTEXT`] bytes.
async fn receive(body: Body, path: &std::path::Path) -> ApiResult<()> {
    receive_file(body, path, MAX_CONTEXT, "the build context").await
}

/// Streams a request body to the file `path`, refusing (413) more than `max` bytes; `what` names
/// it in errors.
pub(crate) async fn receive_file(
    body: Body,
    path: &std::path::Path,
    max: u64,
    what: &str,
) -> ApiResult<()> {
    let internal = |e: std::io::Error| {
        ApiError::from(warren_core::CoreError::Internal(format!(
            "writing {what} to {}: {e}",
            path.display()
        )))
    };
    let mut file = tokio::fs::File::create(path).await.map_err(internal)?;
    let mut stream = body.into_data_stream();
    let mut n = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::bad_request(format!("cannot read request body: {e}")))?;
        n += chunk.len() as u64;
        if n > max {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("{what} is larger than {} GiB", max >> 30),
            ));
        }
        file.write_all(&chunk).await.map_err(internal)?;
    }
    file.flush().await.map_err(internal)?;
    Ok(())
}

/// A build's steps, progress and RUN output from byte `logFrom` on.
#[utoipa::path(get, path = "/warren/v1/templates/{name}/build", operation_id = "get_template_build", tag = "templates",
    params(("name" = String, Path), ("logFrom" = Option<u64>, Query)),
    responses((status = 200, description = "The build job", body = Object)))]
async fn status(
    State(st): State<AppState>,
    Auth(_who): Auth,
    Path(name): Path<String>,
    QueryParams(q): QueryParams<StatusQuery>,
) -> ApiResult<Response> {
    Ok(Json(st.warren.build_job(&name, q.log_from.unwrap_or(0))?).into_response())
}
