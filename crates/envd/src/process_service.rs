//! RPC handlers of `process.Process`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::json;

use crate::connect::{self, stream_channel, EnvelopeReader, RpcError, StreamSender};
use crate::filesystem::resolve_path;
use crate::process::{ManagedProcess, ProcessEvent, StartOptions, Subscription};
use crate::proto::{
    encode_bytes, ProcessInput, ProcessSelector, PtySize, SelectorRequest, SendInputRequest,
    SendSignalRequest, Signal, StartRequest, StreamInputRequest, UpdateRequest,
};
use crate::server::{rpc_user, stream_request, unary_request, unary_result, AppState};

/// Keepalive interval when the client does not ask for one
/// (`keepalive-ping-interval`, seconds).
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(50);

pub async fn dispatch(state: &Arc<AppState>, method: &str, request: Request) -> Option<Response> {
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    let response = match method {
        "Start" => match stream_request::<StartRequest>(body).await {
            Ok(req) => start(state, &headers, req).await,
            Err(err) => err.stream_response(),
        },
        "Connect" => match stream_request::<SelectorRequest>(body).await {
            Ok(req) => connect(state, &headers, req),
            Err(err) => err.stream_response(),
        },
        "StreamInput" => stream_input(state, body).await,
        "List" => unary_result(match unary_request::<serde_json::Value>(body).await {
            Ok(_) => Ok(list(state)),
            Err(err) => Err(err),
        }),
        "SendSignal" => unary_result(match unary_request(body).await {
            Ok(req) => send_signal(state, req),
            Err(err) => Err(err),
        }),
        "SendInput" => unary_result(match unary_request(body).await {
            Ok(req) => send_input(state, req).await,
            Err(err) => Err(err),
        }),
        "CloseStdin" => unary_result(match unary_request::<SelectorRequest>(body).await {
            Ok(req) => match find(state, req.process.as_ref()) {
                Ok(process) => process.close_stdin().await.map(|()| json!({})),
                Err(err) => Err(err),
            },
            Err(err) => Err(err),
        }),
        "Update" => unary_result(match unary_request(body).await {
            Ok(req) => update(state, req),
            Err(err) => Err(err),
        }),
        _ => return None,
    };
    Some(response)
}

fn find(
    state: &AppState,
    selector: Option<&ProcessSelector>,
) -> Result<Arc<ManagedProcess>, RpcError> {
    let selector =
        selector.ok_or_else(|| RpcError::invalid_argument("process selector is required"))?;
    state.processes.find(selector.pid, selector.tag.as_deref())
}

fn keepalive_interval(headers: &HeaderMap) -> Duration {
    headers
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|secs| *secs > 0)
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_KEEPALIVE)
}

async fn start(state: &Arc<AppState>, headers: &HeaderMap, req: StartRequest) -> Response {
    match start_process(state, headers, req).await {
        Ok((process, events)) => {
            if let Some(limit) = connect_timeout(headers) {
                kill_after(state.clone(), process.clone(), limit);
            }
            let (sender, response) = stream_channel();
            tokio::spawn(forward_events(
                sender,
                process.pid,
                Subscription::Live(events),
                keepalive_interval(headers),
            ));
            response
        }
        Err(err) => err.stream_response(),
    }
}

/// The client's deadline (`connect-timeout-ms`), which the SDK sets from a command's `timeout`
/// (absent for `timeout=0`).
fn connect_timeout(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get("connect-timeout-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
}

/// As E2B's envd does, a started process lives at most as long as the deadline of the request
/// that started it: `commands.run("sleep 30", timeout=1)` leaves no `sleep` behind, and a
/// background server meant to outlive it is started with `timeout=0`. A client that merely
/// disconnects does not kill it (it can `connect` again).
fn kill_after(state: Arc<AppState>, process: Arc<ManagedProcess>, limit: Duration) {
    tokio::spawn(async move {
        tokio::time::sleep(limit).await;
        // Only while it is still the live process of that pid (the table forgets ended ones).
        if let Ok(current) = state.processes.find(Some(process.pid), None) {
            if Arc::ptr_eq(&current, &process) {
                tracing::info!(
                    pid = process.pid,
                    ?limit,
                    "process exceeded its request deadline; killing it"
                );
                let _ = process.signal(libc::SIGKILL);
            }
        }
    });
}

async fn start_process(
    state: &Arc<AppState>,
    headers: &HeaderMap,
    req: StartRequest,
) -> Result<
    (
        Arc<ManagedProcess>,
        tokio::sync::mpsc::Receiver<ProcessEvent>,
    ),
    RpcError,
> {
    let pty = req.pty.as_ref().map(|pty| terminal_size(pty.size));
    let config = req
        .process
        .ok_or_else(|| RpcError::invalid_argument("process config is required"))?;
    let cmd = config
        .cmd
        .filter(|c| !c.is_empty())
        .ok_or_else(|| RpcError::invalid_argument("process cmd is required"))?;
    let user = rpc_user(state, headers)?;
    let cwd = match config.cwd.as_deref().filter(|c| !c.is_empty()) {
        Some(cwd) => resolve_path(cwd, &user)?,
        None => state
            .config
            .default_cwd
            .clone()
            .unwrap_or_else(|| user.home.clone()),
    };
    let options = StartOptions {
        cmd,
        args: config.args.unwrap_or_default(),
        envs: config.envs.unwrap_or_default(),
        base_env: state.live().env_vars,
        cwd,
        user,
        tag: req.tag,
        stdin: req.stdin.unwrap_or(false),
        pty,
    };
    state.processes.start(options).await
}

fn connect(state: &Arc<AppState>, headers: &HeaderMap, req: SelectorRequest) -> Response {
    let process = match find(state, req.process.as_ref()) {
        Ok(process) => process,
        Err(err) => return err.stream_response(),
    };
    let subscription = process.subscribe();
    let (sender, response) = stream_channel();
    tokio::spawn(forward_events(
        sender,
        process.pid,
        subscription,
        keepalive_interval(headers),
    ));
    response
}

fn event(event: serde_json::Value) -> serde_json::Value {
    json!({ "event": event })
}

/// Streams a process's events to a client: `start`, output, `end`, end-stream.
async fn forward_events(
    sender: StreamSender,
    pid: u32,
    subscription: Subscription,
    keepalive: Duration,
) {
    if !sender
        .send(&event(json!({ "start": { "pid": pid } })))
        .await
    {
        return;
    }
    let mut events = match subscription {
        Subscription::Live(events) => events,
        Subscription::Ended(end) => {
            if sender.send(&event(json!({ "end": end.to_json() }))).await {
                sender.finish(None).await;
            }
            return;
        }
    };
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
    loop {
        tokio::select! {
            next = events.recv() => {
                let message = match next {
                    Some(ProcessEvent::Stdout(data)) => {
                        event(json!({ "data": { "stdout": encode_bytes(&data) } }))
                    }
                    Some(ProcessEvent::Stderr(data)) => {
                        event(json!({ "data": { "stderr": encode_bytes(&data) } }))
                    }
                    Some(ProcessEvent::Pty(data)) => {
                        event(json!({ "data": { "pty": encode_bytes(&data) } }))
                    }
                    Some(ProcessEvent::End(end)) => {
                        if sender.send(&event(json!({ "end": end.to_json() }))).await {
                            sender.finish(None).await;
                        }
                        return;
                    }
                    None => {
                        sender
                            .finish(Some(RpcError::internal("process event stream ended unexpectedly")))
                            .await;
                        return;
                    }
                };
                if !sender.send(&message).await {
                    return;
                }
            }
            _ = ticker.tick() => {
                if !sender.send(&event(json!({ "keepalive": {} }))).await {
                    return;
                }
            }
            _ = sender.closed() => return,
        }
    }
}

fn list(state: &AppState) -> serde_json::Value {
    let processes: Vec<_> = state
        .processes
        .list()
        .iter()
        .map(|process| {
            let spec = &process.spec;
            let mut config = serde_json::Map::new();
            config.insert("cmd".into(), spec.cmd.clone().into());
            if !spec.args.is_empty() {
                config.insert("args".into(), json!(spec.args));
            }
            if !spec.envs.is_empty() {
                config.insert("envs".into(), json!(spec.envs));
            }
            config.insert("cwd".into(), spec.cwd.to_string_lossy().into());
            let mut info = serde_json::Map::new();
            info.insert("config".into(), config.into());
            info.insert("pid".into(), process.pid.into());
            if let Some(tag) = &spec.tag {
                info.insert("tag".into(), tag.clone().into());
            }
            serde_json::Value::Object(info)
        })
        .collect();
    json!({ "processes": processes })
}

fn send_signal(state: &AppState, req: SendSignalRequest) -> Result<serde_json::Value, RpcError> {
    let process = find(state, req.process.as_ref())?;
    let signal = match req.signal.unwrap_or(Signal::Unspecified) {
        Signal::Term => libc::SIGTERM,
        Signal::Kill => libc::SIGKILL,
        Signal::Unspecified => return Err(RpcError::invalid_argument("signal is required")),
    };
    process.signal(signal)?;
    Ok(json!({}))
}

async fn send_input(
    state: &AppState,
    req: SendInputRequest,
) -> Result<serde_json::Value, RpcError> {
    let process = find(state, req.process.as_ref())?;
    write_input(&process, req.input.unwrap_or_default()).await?;
    Ok(json!({}))
}

async fn write_input(process: &ManagedProcess, input: ProcessInput) -> Result<(), RpcError> {
    if let Some(pty) = input.pty {
        process.write_pty(&pty).await?;
    }
    if let Some(stdin) = input.stdin {
        process.write_stdin(&stdin).await?;
    }
    Ok(())
}

/// `(cols, rows)`, with the conventional 80×24 for anything missing or zero.
fn terminal_size(size: Option<PtySize>) -> (u16, u16) {
    let size = size.unwrap_or_default();
    let clamp = |value: Option<u32>, default: u16| {
        value
            .filter(|v| *v > 0)
            .map_or(default, |v| v.min(u32::from(u16::MAX)) as u16)
    };
    (clamp(size.cols, 80), clamp(size.rows, 24))
}

fn update(state: &AppState, req: UpdateRequest) -> Result<serde_json::Value, RpcError> {
    let process = find(state, req.process.as_ref())?;
    if let Some(pty) = req.pty {
        let (cols, rows) = terminal_size(pty.size);
        process.resize_pty(cols, rows)?;
    }
    Ok(json!({}))
}

/// Client streaming: the first message selects the process, later ones carry
/// input that is written as soon as it arrives.
async fn stream_input(state: &Arc<AppState>, body: axum::body::Body) -> Response {
    let mut reader = EnvelopeReader::new(body.into_data_stream());
    let result: Result<(), RpcError> = async {
        let mut process: Option<Arc<ManagedProcess>> = None;
        while let Some(payload) = reader.next_message().await? {
            let message: StreamInputRequest = connect::decode(&payload)?;
            if let Some(start) = message.start {
                process = Some(find(state, start.process.as_ref())?);
            } else if let Some(data) = message.data {
                let process = process.as_ref().ok_or_else(|| {
                    RpcError::invalid_argument("the first StreamInput message must be start")
                })?;
                write_input(process, data.input.unwrap_or_default()).await?;
            }
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => {
            let mut body = connect::message_envelope(&json!({}));
            body.extend(connect::end_stream_envelope(None));
            let mut response = Response::new(axum::body::Body::from(body));
            response.headers_mut().insert(
                axum::http::header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static(connect::CONTENT_TYPE_STREAM),
            );
            response
        }
        Err(err) => err.stream_response(),
    }
}
