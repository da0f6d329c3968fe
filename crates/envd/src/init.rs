//! `POST /init`: reconfigures a running envd when the Warren daemon hands a warm-pool sandbox to
//! a client. The body is E2B envd's (`{"envVars":{..},"accessToken":"..","defaultUser":".."}`);
//! present fields replace the sandbox-wide env vars, the access token and the default user, so
//! every process started afterwards sees the claimant's env vars exactly as if they had been given
//! at create, and the pool-time token stops working.
//!
//! Only the daemon may call it: the request must carry `X-Admin-Token` equal to the secret the
//! daemon gave envd at start ([`crate::EnvdConfig::admin_token`]). That secret is never handed to
//! sandbox users, so a client holding the (new) access token cannot re-init the sandbox, and the
//! access token alone is not enough (it was visible to nobody while the sandbox sat in the pool,
//! but it must not become a key to the next claim either).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::auth::constant_time_eq;
use crate::files_http::http_error;
use crate::server::AppState;
use crate::EnvdConfig;

/// The part of envd's configuration that `/init` may replace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveSettings {
    pub access_token: Option<String>,
    pub env_vars: BTreeMap<String, String>,
    pub default_user: String,
}

impl From<&EnvdConfig> for LiveSettings {
    fn from(c: &EnvdConfig) -> Self {
        LiveSettings {
            access_token: c.access_token.clone(),
            env_vars: c.env_vars.clone(),
            default_user: c.default_user.clone(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitBody {
    pub env_vars: Option<BTreeMap<String, String>>,
    pub access_token: Option<String>,
    pub default_user: Option<String>,
}

pub const ADMIN_TOKEN_HEADER: &str = "x-admin-token";

pub async fn init(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some(expected) = state.config.admin_token.as_deref() else {
        return http_error(StatusCode::FORBIDDEN, "init is disabled in this sandbox")
            .into_response();
    };
    let presented = headers.get(ADMIN_TOKEN_HEADER).map(|v| v.as_bytes());
    if !presented.is_some_and(|p| constant_time_eq(p, expected.as_bytes())) {
        return http_error(StatusCode::UNAUTHORIZED, "invalid admin token").into_response();
    }
    let body: InitBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return http_error(StatusCode::BAD_REQUEST, format!("invalid init body: {e}"))
                .into_response()
        }
    };
    if let Some(vars) = &body.env_vars {
        if let Some(bad) = vars
            .keys()
            .find(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
        {
            return http_error(
                StatusCode::BAD_REQUEST,
                format!("invalid environment variable name {bad:?}"),
            )
            .into_response();
        }
    }
    // An empty token would mean "no authentication": refuse rather than open the sandbox.
    if body.access_token.as_deref() == Some("") {
        return http_error(StatusCode::BAD_REQUEST, "accessToken must not be empty")
            .into_response();
    }
    let mut live = state.live.write().unwrap_or_else(|e| e.into_inner());
    if let Some(vars) = body.env_vars {
        live.env_vars = vars;
    }
    if let Some(token) = body.access_token {
        live.access_token = Some(token);
    }
    if let Some(user) = body.default_user.filter(|u| !u.is_empty()) {
        live.default_user = user;
    }
    StatusCode::NO_CONTENT.into_response()
}
