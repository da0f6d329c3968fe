//! Every error the API returns, as the JSON body the E2B SDK parses: `{"code":<int>,"message":..}`.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use warren_core::CoreError;

/// The body of every error answer, as the E2B SDK parses it.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[schema(as = Error)]
pub struct ErrorJson {
    /// The HTTP status code again.
    pub code: u16,
    pub message: String,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        let status = match &e {
            CoreError::NotFound(_) => StatusCode::NOT_FOUND,
            CoreError::Conflict(_) => StatusCode::CONFLICT,
            CoreError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            CoreError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            CoreError::Unavailable(_) => StatusCode::NOT_IMPLEMENTED,
            CoreError::Runtime(_)
            | CoreError::Store(_)
            | CoreError::Audit(_)
            | CoreError::Internal(_)
            | CoreError::Image(_) => {
                tracing::error!(error = %e, "internal error");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError::new(status, e.to_string())
    }
}

/// Adds `Should-Retry: false` where the SDK would otherwise retry on its own: our 429/502/503/504
/// are not transient.
pub(crate) fn no_retry(status: StatusCode, resp: &mut Response) {
    if matches!(status.as_u16(), 429 | 502 | 503 | 504) {
        resp.headers_mut()
            .insert("should-retry", HeaderValue::from_static("false"));
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorJson {
            code: self.status.as_u16(),
            message: self.message,
        };
        let mut resp = (self.status, Json(body)).into_response();
        no_retry(self.status, &mut resp);
        resp
    }
}
