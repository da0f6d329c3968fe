//! HTTP routing: `/health`, `/files` and the Connect services.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::de::DeserializeOwned;

use crate::connect::{self, EnvelopeReader, RpcError};
use crate::files_http::{self, http_error};
use crate::process::ProcessManager;
use crate::users::{User, UserDb};
use crate::watch::Watchers;
use crate::{auth, filesystem_service, process_service, EnvdConfig};

pub struct AppState {
    /// The settings envd started with; the access token, env vars and default user among them
    /// may be replaced by `POST /init`, so read those through [`AppState::live`].
    pub config: EnvdConfig,
    pub live: std::sync::RwLock<crate::init::LiveSettings>,
    pub processes: Arc<ProcessManager>,
    pub watchers: Arc<Watchers>,
}

impl AppState {
    /// The current access token, env vars and default user.
    pub fn live(&self) -> crate::init::LiveSettings {
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

pub fn router(config: EnvdConfig) -> Router {
    let state = Arc::new(AppState {
        live: std::sync::RwLock::new(crate::init::LiveSettings::from(&config)),
        config,
        processes: Arc::new(ProcessManager::new()),
        watchers: Arc::new(Watchers::default()),
    });
    if let Some(command) = state.config.start_command.clone() {
        crate::start_command::spawn(state.clone(), command);
    }
    Router::new()
        .route("/health", get(health))
        .route("/init", axum::routing::post(crate::init::init))
        .route(
            "/files",
            get(files_http::download)
                .post(files_http::upload)
                .layer(DefaultBodyLimit::disable()),
        )
        .fallback(connect_dispatch)
        .with_state(state)
}

async fn health() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// The user an RPC acts as: `Authorization: Basic base64("user:")`, else the default.
pub fn rpc_user(state: &AppState, headers: &HeaderMap) -> Result<User, RpcError> {
    let name = auth::basic_auth_user(headers).unwrap_or_else(|| state.live().default_user);
    UserDb::load().user(&name).ok_or_else(|| {
        RpcError::new(
            connect::Code::Unauthenticated,
            format!("invalid username: '{name}'"),
        )
    })
}

/// Decodes a unary request body.
pub async fn unary_request<T: DeserializeOwned>(body: Body) -> Result<T, RpcError> {
    let bytes = connect::read_unary_body(body).await?;
    connect::decode(&bytes)
}

/// Decodes the single enveloped request of a server-streaming call.
pub async fn stream_request<T: DeserializeOwned>(body: Body) -> Result<T, RpcError> {
    let mut reader = EnvelopeReader::new(body.into_data_stream());
    let payload = reader
        .next_message()
        .await?
        .ok_or_else(|| RpcError::invalid_argument("protocol error: missing request message"))?;
    // Read the body to its end (the chunked terminator follows the one message at once): a body
    // left unread makes the HTTP server close the connection after the response, and a proxy that
    // pooled the connection then fails its next request on it. A client that keeps the body open
    // longer is not waited for.
    let _ = tokio::time::timeout(std::time::Duration::from_millis(200), async {
        while let Ok(Some(_)) = reader.next_message().await {}
    })
    .await;
    connect::decode(&payload)
}

pub fn unary_result(result: Result<serde_json::Value, RpcError>) -> Response {
    match result {
        Ok(message) => connect::unary_ok(&message),
        Err(err) => err.unary_response(),
    }
}

async fn connect_dispatch(State(state): State<Arc<AppState>>, request: Request) -> Response {
    if !auth::header_token_valid(state.live().access_token.as_deref(), request.headers()) {
        return http_error(StatusCode::UNAUTHORIZED, auth::UNAUTHORIZED_MESSAGE).into_response();
    }
    let path = request.uri().path().to_string();
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return http_error(StatusCode::NOT_FOUND, format!("path '{path}' not found"))
            .into_response();
    };
    if request.method() != Method::POST {
        let mut response = http_error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {} not allowed", request.method()),
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::ALLOW, "POST".parse().expect("static header"));
        return response;
    }
    let response = match service {
        "process.Process" => process_service::dispatch(&state, method, request).await,
        "filesystem.Filesystem" => filesystem_service::dispatch(&state, method, request).await,
        _ => None,
    };
    response.unwrap_or_else(|| {
        // connect-go answers unknown procedures with 404; the Connect body keeps
        // the reason readable for clients that parse it.
        RpcError::unimplemented(format!("{path} is not implemented"))
            .unary_response_with_status(StatusCode::NOT_FOUND)
    })
}
