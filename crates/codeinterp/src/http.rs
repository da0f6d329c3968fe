//! The HTTP API (E2B's code-interpreter server contract): `/execute`, `/contexts`, `/health`.
//! Errors are plain text, which the SDK puts into its exceptions as they are.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::contexts::{ContextError, Contexts};

/// Largest request body: code can carry data inline (upstream sets no limit; axum's default of
/// 2 MiB refused a cell with a 3 MB string literal).
pub const MAX_REQUEST_BYTES: usize = 32 << 20;

/// Lines handed to the response body at once; the rest waits in the execution's own bounded
/// queue (see [`crate::execute`]).
const BODY_CHANNEL_LINES: usize = 16;

impl IntoResponse for ContextError {
    fn into_response(self) -> Response {
        let status = match &self {
            ContextError::NotFound(_) => StatusCode::NOT_FOUND,
            ContextError::UnsupportedLanguage(..) | ContextError::BadCwd(_) => {
                StatusCode::BAD_REQUEST
            }
            ContextError::Kernel(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, self.to_string()).into_response()
    }
}

fn bad_request(msg: impl Into<String>) -> Response {
    (StatusCode::BAD_REQUEST, msg.into()).into_response()
}

pub fn router(contexts: Arc<Contexts>) -> Router {
    Router::new()
        .route("/health", get(|| async { Json("OK") }))
        .route("/execute", post(execute))
        .route("/contexts", post(create_context).get(list_contexts))
        .route("/contexts/{id}", delete(remove_context))
        .route("/contexts/{id}/restart", post(restart_context))
        .with_state(contexts)
}

#[derive(Debug, Deserialize)]
struct ExecuteBody {
    code: String,
    #[serde(default)]
    context_id: Option<String>,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    env_vars: Option<BTreeMap<String, String>>,
}

/// Parses a JSON body, answering 400 with serde's reason when it does not fit.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Box<Response>> {
    serde_json::from_slice(body)
        .map_err(|e| Box::new(bad_request(format!("invalid request body: {e}"))))
}

/// Reads a whole request body, up to [`MAX_REQUEST_BYTES`]. A bigger one is read to its end
/// all the same (and thrown away): answering before the client has sent it all would break the
/// connection under the router's feet, which then reports a 502 instead of this 413.
async fn read_body(mut body: Body) -> Result<axum::body::Bytes, Box<Response>> {
    use http_body_util::BodyExt;
    let mut buf = Vec::new();
    let mut over = false;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| Box::new(bad_request(format!("reading the request body: {e}"))))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if over || buf.len() + data.len() > MAX_REQUEST_BYTES {
            over = true;
            buf = Vec::new();
            continue;
        }
        buf.extend_from_slice(&data);
    }
    if over {
        return Err(Box::new(
            (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body is over {} MiB: pass big data as a file (sandbox.files.write)",
                    MAX_REQUEST_BYTES >> 20
                ),
            )
                .into_response(),
        ));
    }
    Ok(buf.into())
}

async fn execute(State(contexts): State<Arc<Contexts>>, body: Body) -> Response {
    let body = match read_body(body).await {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    let req: ExecuteBody = match parse(&body) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let ctx = match (&req.context_id, &req.language) {
        (Some(_), Some(l)) if !l.is_empty() => {
            return bad_request("provide context_id or language, not both")
        }
        (Some(id), _) => match contexts.get(id) {
            Some(c) => c,
            None => return ContextError::NotFound(id.clone()).into_response(),
        },
        (None, lang) => match contexts.parse_language(lang.as_deref()) {
            Ok(l) => contexts.default_for(l),
            Err(e) => return e.into_response(),
        },
    };
    let envs = req.env_vars.unwrap_or_default();
    if let Err(e) = crate::execute::validate_envs(ctx.language, &envs) {
        return bad_request(e);
    }
    let (tx, mut rx) = mpsc::channel::<bytes::Bytes>(BODY_CHANNEL_LINES);
    tokio::spawn(crate::execute::run(ctx, req.code, envs, tx));
    let body = Body::from_stream(futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|o| o.map(Ok::<_, std::convert::Infallible>))
    }));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/x-ndjson")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[derive(Debug, Default, Deserialize)]
struct CreateContextBody {
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    cwd: Option<String>,
}

async fn create_context(
    State(contexts): State<Arc<Contexts>>,
    body: axum::body::Bytes,
) -> Response {
    let req: CreateContextBody = if body.is_empty() {
        CreateContextBody::default()
    } else {
        match parse(&body) {
            Ok(r) => r,
            Err(resp) => return *resp,
        }
    };
    match contexts
        .create(req.language.as_deref(), req.cwd.as_deref())
        .await
    {
        Ok(ctx) => Json(ctx.info()).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn list_contexts(State(contexts): State<Arc<Contexts>>) -> Response {
    Json(contexts.list()).into_response()
}

async fn remove_context(State(contexts): State<Arc<Contexts>>, Path(id): Path<String>) -> Response {
    if contexts.remove(&id) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        ContextError::NotFound(id).into_response()
    }
}

async fn restart_context(
    State(contexts): State<Arc<Contexts>>,
    Path(id): Path<String>,
) -> Response {
    let Some(ctx) = contexts.get(&id) else {
        return ContextError::NotFound(id).into_response();
    };
    match ctx.restart().await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => ContextError::Kernel(e).into_response(),
    }
}
