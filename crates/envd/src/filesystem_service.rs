//! RPC handlers of `filesystem.Filesystem`.

use std::sync::Arc;

use axum::extract::Request;
use axum::response::Response;
use serde_json::json;

use crate::connect::RpcError;
use crate::filesystem::{self, resolve_path};
use crate::proto::{ListDirRequest, MoveRequest, PathRequest, WatchRequest, WatcherIdRequest};
use crate::server::{rpc_user, stream_request, unary_request, unary_result, AppState};
use crate::users::User;
use crate::watch;

pub async fn dispatch(state: &Arc<AppState>, method: &str, request: Request) -> Option<Response> {
    let (parts, body) = request.into_parts();
    let user = rpc_user(state, &parts.headers);
    if method == "WatchDir" {
        let response = match (user, stream_request::<WatchRequest>(body).await) {
            (Ok(user), Ok(req)) => watch::watch_dir(state, &user, &parts.headers, req).await,
            (Err(err), _) | (_, Err(err)) => err.stream_response(),
        };
        return Some(response);
    }
    let result = match method {
        "Stat" => {
            with_user(
                user,
                unary_request::<PathRequest>(body).await,
                |user, req| async move {
                    let path = required_path(req.path.as_deref(), &user)?;
                    let entry = filesystem::stat(&user, path).await?;
                    Ok(json!({ "entry": entry }))
                },
            )
            .await
        }
        "ListDir" => {
            with_user(
                user,
                unary_request::<ListDirRequest>(body).await,
                |user, req| async move {
                    let path = required_path(req.path.as_deref(), &user)?;
                    let entries = filesystem::list_dir(&user, path, req.depth.unwrap_or(1)).await?;
                    Ok(json!({ "entries": entries }))
                },
            )
            .await
        }
        "MakeDir" => {
            with_user(
                user,
                unary_request::<PathRequest>(body).await,
                |user, req| async move {
                    let path = required_path(req.path.as_deref(), &user)?;
                    let entry = filesystem::make_dir(&user, path).await?;
                    Ok(json!({ "entry": entry }))
                },
            )
            .await
        }
        "Move" => {
            with_user(
                user,
                unary_request::<MoveRequest>(body).await,
                |user, req| async move {
                    let source = required_path(req.source.as_deref(), &user)?;
                    let destination = required_path(req.destination.as_deref(), &user)?;
                    let entry = filesystem::move_entry(&user, source, destination).await?;
                    Ok(json!({ "entry": entry }))
                },
            )
            .await
        }
        "Remove" => {
            with_user(
                user,
                unary_request::<PathRequest>(body).await,
                |user, req| async move {
                    let path = required_path(req.path.as_deref(), &user)?;
                    filesystem::remove(&user, path).await?;
                    Ok(json!({}))
                },
            )
            .await
        }
        "CreateWatcher" => {
            with_user(
                user,
                unary_request::<WatchRequest>(body).await,
                |user, req| {
                    let state = state.clone();
                    async move { watch::create_watcher(&state, &user, req).await }
                },
            )
            .await
        }
        "GetWatcherEvents" => match unary_request::<WatcherIdRequest>(body).await {
            Ok(req) => watch::get_watcher_events(state, req),
            Err(err) => Err(err),
        },
        "RemoveWatcher" => match unary_request::<WatcherIdRequest>(body).await {
            Ok(req) => watch::remove_watcher(state, req),
            Err(err) => Err(err),
        },
        _ => return None,
    };
    Some(unary_result(result))
}

fn required_path(raw: Option<&str>, user: &User) -> Result<std::path::PathBuf, RpcError> {
    resolve_path(raw.unwrap_or_default(), user)
}

async fn with_user<Req, F, Fut>(
    user: Result<User, RpcError>,
    request: Result<Req, RpcError>,
    handler: F,
) -> Result<serde_json::Value, RpcError>
where
    F: FnOnce(User, Req) -> Fut,
    Fut: std::future::Future<Output = Result<serde_json::Value, RpcError>>,
{
    let request = request?;
    handler(user?, request).await
}
