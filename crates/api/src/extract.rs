//! Request extractors whose failures are E2B-shaped JSON errors instead of axum's plain text.

use crate::error::ApiError;
use crate::AppState;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use warren_core::Principal;

/// The caller, from the `X-API-Key` header or, as E2B's access-token scheme sends it,
/// `Authorization: Bearer <key>` (header names are case-insensitive).
pub struct Auth(pub Principal);

fn unauthorized(msg: &str) -> ApiError {
    ApiError::from(warren_core::CoreError::Unauthorized(msg.into()))
}

/// The key a request presents, if any. `X-API-Key` wins when both are sent, as upstream checks
/// it first.
pub fn presented_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    if let Some(v) = headers.get("x-api-key") {
        return v
            .to_str()
            .map(Some)
            .map_err(|_| unauthorized("invalid API key"));
    }
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let v = v
        .to_str()
        .map_err(|_| unauthorized("invalid Authorization header"))?;
    match v.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Ok(Some(token.trim())),
        _ => Err(unauthorized(
            "Authorization must be `Bearer <API key>`, or send X-API-Key",
        )),
    }
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // Already authenticated by the audit middleware (clients cannot set extensions).
        if let Some(p) = parts.extensions.get::<Principal>() {
            return Ok(Auth(p.clone()));
        }
        let key = presented_key(&parts.headers)?;
        Ok(Auth(state.warren.authenticate(key)?))
    }
}

/// A query string parsed into `T`, whose failures are E2B-shaped 400s (axum's `Query` answers
/// plain text).
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|axum::extract::Query(t)| QueryParams(t))
            .map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))
    }
}

/// A JSON body. An empty body reads as `{}`, since the SDK sends none on some v1 calls and
/// curl users often omit it; the content type is not checked for the same reason.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::bad_request(format!("cannot read request body: {e}")))?;
        let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        serde_json::from_slice(text)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}
