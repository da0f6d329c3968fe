//! Handlers of the E2B control-plane endpoints: parse, call the orchestrator, shape the answer.

use crate::error::ApiError;
use crate::extract::{Auth, JsonBody};
use crate::models::*;
use crate::AppState;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use percent_encoding::percent_decode_str;
use warren_core::{ConnectOutcome, CreateRequest, ListOrder, ListQuery, PublicState};

type ApiResult<T> = Result<T, ApiError>;

/// Creates a sandbox (or claims one from a warm pool of its template).
#[utoipa::path(post, path = "/v2/sandboxes", tag = "sandboxes",
    params(("Idempotency-Key" = Option<String>, Header, pattern = "^[a-z0-9-]{1,255}$",
        description = "Retries with the same key get the same sandbox")),
    request_body = NewSandbox,
    responses((status = 201, description = "Created", body = SandboxJson)))]
pub async fn create_v2(
    st: State<AppState>,
    who: Auth,
    headers: axum::http::HeaderMap,
    body: JsonBody<NewSandbox>,
) -> ApiResult<(StatusCode, Json<SandboxJson>)> {
    create(st, who, headers, body).await
}

/// v1 create: the same body and answer as v2.
#[utoipa::path(post, path = "/sandboxes", tag = "sandboxes",
    params(("Idempotency-Key" = Option<String>, Header, pattern = "^[a-z0-9-]{1,255}$",
        description = "Retries with the same key get the same sandbox")),
    request_body = NewSandbox,
    responses((status = 201, description = "Created", body = SandboxJson)))]
pub async fn create_v1(
    st: State<AppState>,
    who: Auth,
    headers: axum::http::HeaderMap,
    body: JsonBody<NewSandbox>,
) -> ApiResult<(StatusCode, Json<SandboxJson>)> {
    create(st, who, headers, body).await
}

async fn create(
    State(st): State<AppState>,
    Auth(who): Auth,
    headers: axum::http::HeaderMap,
    JsonBody(body): JsonBody<NewSandbox>,
) -> ApiResult<(StatusCode, Json<SandboxJson>)> {
    if let Some(msg) = body.unsupported() {
        return Err(ApiError::bad_request(msg));
    }
    let key = headers
        .get("idempotency-key")
        .map(|v| v.to_str().unwrap_or(""));
    let req = CreateRequest {
        template_id: body.template_id,
        timeout_secs: body.timeout,
        metadata: body.metadata.unwrap_or_default(),
        env_vars: body.env_vars.unwrap_or_default(),
        allow_internet: body.allow_internet_access,
        auto_pause: body.auto_pause.unwrap_or(false),
        auto_resume: body.auto_resume.is_some_and(|a| a.enabled),
        network: body.network.unwrap_or_default().into_request(),
    };
    let rec = st.warren.create_idempotent(&who, req, key).await?;
    Ok((StatusCode::CREATED, Json(st.sandbox_json(&rec))))
}

#[utoipa::path(get, path = "/sandboxes/{id}", tag = "sandboxes", params(("id" = String, Path, description = "Sandbox ID")),
    responses((status = 200, description = "The sandbox", body = SandboxDetailJson)))]
pub async fn get(
    State(st): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<SandboxDetailJson>> {
    let rec = st.warren.get(&who, &id).await?;
    Ok(Json(SandboxDetailJson::new(
        &rec,
        &st.warren.config().envd_version,
        st.domain.as_deref(),
    )))
}

/// One page of the caller's sandboxes; `X-Next-Token` in the answer asks for the next.
#[utoipa::path(get, path = "/v2/sandboxes", tag = "sandboxes",
    params(("metadata" = Option<String>, Query,
            description = "Metadata filter, itself a query string: `k1=v1&k2=v2`, each part percent-quoted"),
        ("state" = Option<String>, Query, pattern = "^(|running|paused)(,(|running|paused))*$",
            description = "Comma-separated: `running`, `paused`"),
        ("template" = Option<String>, Query, description = "Only sandboxes of this template"),
        ("startedAfter" = Option<String>, Query, format = DateTime, description = "RFC 3339 time"),
        ("order" = Option<String>, Query, pattern = "^(asc|desc)$", description = "`asc` or `desc` by start time"),
        ("limit" = Option<i64>, Query, minimum = 1, description = "Page size (at most 4294967295)"),
        ("nextToken" = Option<String>, Query, description = "`X-Next-Token` of the previous page")),
    responses((status = 200, description = "The page", body = Vec<ListedSandboxJson>,
        headers(("X-Next-Token" = String, description = "Present when there are more")))))]
pub async fn list_v2(
    State(st): State<AppState>,
    Auth(who): Auth,
    RawQuery(query): RawQuery,
) -> ApiResult<Response> {
    let q = parse_list_query(query.as_deref().unwrap_or(""))?;
    let page = st.warren.list(&who, &q).await?;
    let items: Vec<ListedSandboxJson> = page
        .sandboxes
        .iter()
        .map(|r| ListedSandboxJson::new(r, &st.warren.config().envd_version))
        .collect();
    let mut resp = Json(items).into_response();
    if let Some(token) = page.next_token {
        let v = HeaderValue::from_str(&token).expect("tokens are base64");
        resp.headers_mut().insert("x-next-token", v);
    }
    Ok(resp)
}

/// v1 list: same filters, one page with everything.
#[utoipa::path(get, path = "/sandboxes", tag = "sandboxes",
    params(("metadata" = Option<String>, Query,
            description = "Metadata filter, itself a query string: `k1=v1&k2=v2`, each part percent-quoted"),
        ("state" = Option<String>, Query, pattern = "^(|running|paused)(,(|running|paused))*$",
            description = "Comma-separated: `running`, `paused`"),
        ("template" = Option<String>, Query, description = "Only sandboxes of this template"),
        ("startedAfter" = Option<String>, Query, format = DateTime, description = "RFC 3339 time"),
        ("order" = Option<String>, Query, pattern = "^(asc|desc)$", description = "`asc` or `desc` by start time")),
    responses((status = 200, description = "Every matching sandbox", body = Vec<ListedSandboxJson>)))]
pub async fn list_v1(
    State(st): State<AppState>,
    Auth(who): Auth,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<Vec<ListedSandboxJson>>> {
    let mut q = parse_list_query(query.as_deref().unwrap_or(""))?;
    q.limit = None;
    q.next_token = None;
    let page = st.warren.list(&who, &q).await?;
    Ok(Json(
        page.sandboxes
            .iter()
            .map(|r| ListedSandboxJson::new(r, &st.warren.config().envd_version))
            .collect(),
    ))
}

#[utoipa::path(delete, path = "/sandboxes/{id}", tag = "sandboxes", params(("id" = String, Path, description = "Sandbox ID")),
    responses((status = 204, description = "Killed")))]
pub async fn kill(
    State(st): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    st.warren.kill(&who, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Sets the sandbox to end `timeout` seconds from now.
#[utoipa::path(post, path = "/sandboxes/{id}/timeout", tag = "sandboxes", params(("id" = String, Path, description = "Sandbox ID")),
    request_body = TimeoutBody,
    responses((status = 204, description = "Timeout set")))]
pub async fn set_timeout(
    State(st): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<TimeoutBody>,
) -> ApiResult<StatusCode> {
    st.warren.set_timeout(&who, &id, body.timeout).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/sandboxes/{id}/pause", tag = "sandboxes", params(("id" = String, Path, description = "Sandbox ID")),
    request_body(content = PauseBody, description = "`{}`; other options are accepted and ignored"),
    responses((status = 204, description = "Paused")))]
pub async fn pause(
    State(st): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    _body: JsonBody<PauseBody>,
) -> ApiResult<StatusCode> {
    st.warren.pause(&who, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Connects to a sandbox, resuming it if paused: 201 when it was resumed, 200 when it was
/// running.
#[utoipa::path(post, path = "/v2/sandboxes/{id}/connect", tag = "sandboxes", params(("id" = String, Path, description = "Sandbox ID")),
    request_body(content = ConnectBody),
    responses((status = 200, description = "Was running", body = SandboxJson),
        (status = 201, description = "Resumed", body = SandboxJson)))]
pub async fn connect_v2(
    st: State<AppState>,
    who: Auth,
    id: Path<String>,
    body: JsonBody<ConnectBody>,
) -> ApiResult<(StatusCode, Json<SandboxJson>)> {
    connect(st, who, id, body).await
}

/// v1 alias of v2 connect.
#[utoipa::path(post, path = "/sandboxes/{id}/connect", tag = "sandboxes", params(("id" = String, Path, description = "Sandbox ID")),
    request_body(content = ConnectBody),
    responses((status = 200, description = "Was running", body = SandboxJson),
        (status = 201, description = "Resumed", body = SandboxJson)))]
pub async fn connect_v1(
    st: State<AppState>,
    who: Auth,
    id: Path<String>,
    body: JsonBody<ConnectBody>,
) -> ApiResult<(StatusCode, Json<SandboxJson>)> {
    connect(st, who, id, body).await
}

async fn connect(
    State(st): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ConnectBody>,
) -> ApiResult<(StatusCode, Json<SandboxJson>)> {
    let (rec, outcome) = st.warren.connect(&who, &id, body.timeout).await?;
    let status = match outcome {
        ConnectOutcome::Resumed => StatusCode::CREATED,
        ConnectOutcome::AlreadyRunning => StatusCode::OK,
    };
    Ok((status, Json(st.sandbox_json(&rec))))
}

/// v1 resume: like connect, but a running sandbox is a conflict (as upstream answers it).
#[utoipa::path(post, path = "/sandboxes/{id}/resume", tag = "sandboxes", params(("id" = String, Path, description = "Sandbox ID")),
    request_body(content = ConnectBody),
    responses((status = 201, description = "Resumed", body = SandboxJson)))]
pub async fn resume(
    State(st): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ConnectBody>,
) -> ApiResult<(StatusCode, Json<SandboxJson>)> {
    let rec = st.warren.get(&who, &id).await?;
    if rec.state.public() == Some(PublicState::Running) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("sandbox {id} is already running"),
        ));
    }
    let (rec, _) = st.warren.connect(&who, &id, body.timeout).await?;
    Ok((StatusCode::CREATED, Json(st.sandbox_json(&rec))))
}

/// Liveness; needs no key.
#[utoipa::path(get, path = "/health", tag = "meta", security(()),
    responses((status = 200, description = "The daemon is up", body = Object,
        example = json!({"status": "ok"}))))]
pub async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {}", uri.path()),
    )
}

pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} not allowed on {}", uri.path()),
    )
}

/// Parses the query of `GET /v2/sandboxes`.
///
/// `metadata` is how the SDK encodes it: each key and value percent-quoted, joined as a query
/// string, sent as one parameter. So: decode the parameter (done by the outer parse), parse it as
/// a query string, then unquote each key and value.
pub fn parse_list_query(raw: &str) -> ApiResult<ListQuery> {
    let mut q = ListQuery::default();
    for (k, v) in url::form_urlencoded::parse(raw.as_bytes()) {
        match k.as_ref() {
            "metadata" => {
                for (mk, mv) in url::form_urlencoded::parse(v.as_bytes()) {
                    let unquote = |s: &str| {
                        percent_decode_str(s)
                            .decode_utf8()
                            .map(|c| c.into_owned())
                            .map_err(|_| ApiError::bad_request("metadata filter is not UTF-8"))
                    };
                    q.metadata.insert(unquote(&mk)?, unquote(&mv)?);
                }
            }
            "state" => {
                let mut states = vec![];
                for s in v.split(',').filter(|s| !s.is_empty()) {
                    states.push(match s {
                        "running" => PublicState::Running,
                        "paused" => PublicState::Paused,
                        other => {
                            return Err(ApiError::bad_request(format!(
                                "invalid state {other:?}: expected running or paused"
                            )))
                        }
                    });
                }
                q.states = Some(states);
            }
            "limit" => {
                q.limit = Some(v.parse().map_err(|_| {
                    ApiError::bad_request(format!(
                        "invalid limit {v:?}: expected a positive integer"
                    ))
                })?)
            }
            "nextToken" => q.next_token = Some(v.into_owned()).filter(|t| !t.is_empty()),
            "order" => {
                q.order = match v.as_ref() {
                    "asc" => ListOrder::Asc,
                    "desc" => ListOrder::Desc,
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "invalid order {other:?}: expected asc or desc"
                        )))
                    }
                }
            }
            "template" => q.template = Some(v.into_owned()),
            "startedAfter" => {
                let t = DateTime::parse_from_rfc3339(&v).map_err(|e| {
                    ApiError::bad_request(format!("invalid startedAfter {v:?}: {e}"))
                })?;
                q.started_after = Some(t.with_timezone(&Utc));
            }
            // Unknown parameters are ignored, like upstream.
            _ => {}
        }
    }
    Ok(q)
}
