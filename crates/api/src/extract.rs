//! Request extractors whose failures are E2B-shaped JSON errors instead of axum's plain text.

use crate::error::ApiError;
use crate::AppState;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use warren_core::Principal;

/// The caller, from the `X-API-Key` header (header names are case-insensitive).
pub struct Auth(pub Principal);

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // Already authenticated by the audit middleware (clients cannot set extensions).
        if let Some(p) = parts.extensions.get::<Principal>() {
            return Ok(Auth(p.clone()));
        }
        let key = match parts.headers.get("x-api-key") {
            None => None,
            Some(v) => Some(v.to_str().map_err(|_| {
                ApiError::from(warren_core::CoreError::Unauthorized(
                    "invalid API key".into(),
                ))
            })?),
        };
        Ok(Auth(state.warren.authenticate(key)?))
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
