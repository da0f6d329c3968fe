//! Directory watchers (`WatchDir`, `CreateWatcher`, `GetWatcherEvents`, `RemoveWatcher`).

use std::sync::Arc;

use axum::http::HeaderMap;
use axum::response::Response;

use crate::connect::RpcError;
use crate::proto::{WatchRequest, WatcherIdRequest};
use crate::server::AppState;
use crate::users::User;

/// Registry of polling watchers created with `CreateWatcher`.
#[derive(Default)]
pub struct Watchers {}

fn not_supported() -> RpcError {
    RpcError::unimplemented("directory watching is not supported yet")
}

pub async fn watch_dir(
    _state: &Arc<AppState>,
    _user: &User,
    _headers: &HeaderMap,
    _req: WatchRequest,
) -> Response {
    not_supported().stream_response()
}

pub async fn create_watcher(
    _state: &Arc<AppState>,
    _user: &User,
    _req: WatchRequest,
) -> Result<serde_json::Value, RpcError> {
    Err(not_supported())
}

pub fn get_watcher_events(
    _state: &Arc<AppState>,
    _req: WatcherIdRequest,
) -> Result<serde_json::Value, RpcError> {
    Err(not_supported())
}

pub fn remove_watcher(
    _state: &Arc<AppState>,
    _req: WatcherIdRequest,
) -> Result<serde_json::Value, RpcError> {
    Err(not_supported())
}
