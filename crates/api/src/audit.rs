//! The edges' part of the audit log: every API call, and what the router sees of envd traffic
//! (processes started and how they ended, files written, moved or removed), recorded in the
//! control plane's [`AuditLog`]; and `GET /warren/v1/audit` to read it back.
//!
//! The router records from what passes through it, not from what envd reports: code inside a
//! sandbox controls envd's process (it runs as root there) but not the daemon.

use crate::error::ApiError;
use crate::extract::Auth;
use crate::AppState;
use axum::body::Body;
use axum::extract::{MatchedPath, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Instant;
use warren_core::{AuditEvent, AuditKind, AuditLog, AuditQuery};

/// Middleware on the API routes: one `api` entry per call, with the caller (when its key is
/// valid), the route, the sandbox it names, the status and the duration.
pub async fn record_api(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let Some(log) = st.warren.audit().cloned() else {
        return next.run(req).await;
    };
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let started = Instant::now();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| req.uri().path().to_string());
    let sandbox = sandbox_in_path(req.uri().path());
    let who = req
        .headers()
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .and_then(|k| st.warren.authenticate(Some(k)).ok());
    if let Some(p) = &who {
        // The handler's `Auth` extractor takes it from here instead of checking the key again.
        req.extensions_mut().insert(p.clone());
    }
    let resp = next.run(req).await;
    let (team, key) = match &who {
        Some(p) => (p.team.as_str(), p.key_id.as_str()),
        None => ("", "unauthenticated"),
    };
    let mut event = AuditEvent::new(AuditKind::Api, team, key, format!("{method} {route}"))
        .result(resp.status().as_u16().to_string())
        .duration(started.elapsed());
    if let Some(id) = sandbox {
        event = event.sandbox(&id);
    }
    log.record(event);
    resp
}

/// The sandbox id in `/sandboxes/{id}...` and `/v2/sandboxes/{id}...`.
fn sandbox_in_path(path: &str) -> Option<String> {
    let rest = path
        .strip_prefix("/v2/sandboxes/")
        .or_else(|| path.strip_prefix("/sandboxes/"))?;
    let id = rest.split('/').next()?;
    (!id.is_empty()).then(|| id.to_string())
}

/// What the router records of one envd request, decided before it is forwarded.
pub(crate) struct EnvdObservation {
    log: AuditLog,
    event: AuditEvent,
    started: Instant,
    /// A `Start`: the entry is written when its event stream ends, with the exit status.
    process: bool,
}

/// Largest request body read for its details; bigger ones are recorded without them.
const DETAIL_LIMIT: usize = 64 * 1024;

/// Looks at a request to envd and, when it is one the audit log wants, returns what to record
/// (and the request, whose small body may have been read and put back).
pub(crate) async fn observe_envd(
    st: &AppState,
    id: &str,
    req: Request,
) -> (Request, Option<EnvdObservation>) {
    let Some(log) = st.warren.audit().cloned() else {
        return (req, None);
    };
    let path = req.uri().path().to_string();
    let (kind, action) = match (req.method().as_str(), path.as_str()) {
        ("POST", "/process.Process/Start") => (AuditKind::Process, "start"),
        ("POST", "/files") => (AuditKind::File, "write"),
        ("POST", "/filesystem.Filesystem/Remove") => (AuditKind::File, "remove"),
        ("POST", "/filesystem.Filesystem/Move") => (AuditKind::File, "move"),
        ("POST", "/filesystem.Filesystem/MakeDir") => (AuditKind::File, "mkdir"),
        _ => return (req, None),
    };
    let (team, key) = st.warren.owner(id).unwrap_or_default();
    let user = basic_user(req.headers());
    let mut detail = json!({ "user": user });
    let (parts, body) = req.into_parts();
    let body = if kind == AuditKind::File && action == "write" {
        // Uploads stream; their target is in the query.
        for (k, v) in url::form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes()) {
            if k == "path" {
                detail["path"] = Value::String(v.into_owned());
            } else if k == "username" && detail["user"].is_null() {
                detail["user"] = Value::String(v.into_owned());
            }
        }
        body
    } else {
        match read_small(body).await {
            Ok((bytes, body)) => {
                if let Some(fields) = bytes.as_deref().and_then(request_fields) {
                    merge(&mut detail, fields);
                }
                body
            }
            Err(body) => body,
        }
    };
    let event = AuditEvent::new(kind, &team, &key, action)
        .sandbox(id)
        .detail(detail);
    let obs = EnvdObservation {
        log,
        event,
        started: Instant::now(),
        process: kind == AuditKind::Process,
    };
    (Request::from_parts(parts, body), Some(obs))
}

/// Reads a request body of up to [`DETAIL_LIMIT`] bytes (these requests are one small message,
/// sized or chunked). A larger one is given back whole, unread part included, without details.
async fn read_small(body: Body) -> Result<(Option<Bytes>, Body), Body> {
    let mut stream = body.into_data_stream();
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => buf.extend_from_slice(&c),
            // The client broke off; forward what came so that envd reports it.
            Err(_) => return Ok((None, Body::from(buf.freeze()))),
        }
        if buf.len() > DETAIL_LIMIT {
            let head = futures::stream::once(async move { Ok::<_, axum::Error>(buf.freeze()) });
            return Err(Body::from_stream(head.chain(stream)));
        }
    }
    let bytes = buf.freeze();
    Ok((Some(bytes.clone()), Body::from(bytes)))
}

/// The fields worth recording of a Connect request (a unary JSON body or one envelope).
fn request_fields(body: &[u8]) -> Option<Value> {
    let json: Value = serde_json::from_slice(body)
        .ok()
        .or_else(|| serde_json::from_slice(body.get(5..)?).ok())?;
    let mut out = json!({});
    if let Some(p) = json.get("process") {
        for k in ["cmd", "args", "cwd"] {
            if let Some(v) = p.get(k) {
                out[k] = v.clone();
            }
        }
        // Names only: values may be secrets.
        if let Some(envs) = p.get("envs").and_then(Value::as_object) {
            out["env_names"] = Value::from(envs.keys().cloned().collect::<Vec<_>>());
        }
        out["pty"] = Value::Bool(json.get("pty").is_some());
        if let Some(tag) = json.get("tag") {
            out["tag"] = tag.clone();
        }
    }
    for k in ["path", "source", "destination"] {
        if let Some(v) = json.get(k) {
            out[k] = v.clone();
        }
    }
    Some(out)
}

fn merge(into: &mut Value, from: Value) {
    if let (Some(a), Value::Object(b)) = (into.as_object_mut(), from) {
        a.extend(b);
    }
}

/// The user of envd's `Authorization: Basic base64(user:)`.
fn basic_user(headers: &HeaderMap) -> Value {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.split(':').next().map(str::to_string))
        .filter(|u| !u.is_empty())
        .map(Value::String)
        .unwrap_or(Value::Null)
}

impl EnvdObservation {
    /// Records the entry: at once for file operations, at the end of the event stream for a
    /// process (with its pid and exit status).
    pub(crate) fn finish(self, resp: Response) -> Response {
        let status = resp.status();
        if !self.process || !status.is_success() {
            let event = self
                .event
                .result(status.as_u16().to_string())
                .duration(self.started.elapsed());
            self.log.record(event);
            return resp;
        }
        let (parts, body) = resp.into_parts();
        let mut watch = ProcessWatch {
            obs: Some(self),
            scanner: EnvelopeScanner::default(),
            pid: None,
            outcome: None,
        };
        let stream = body.into_data_stream().map(move |chunk| {
            if let Ok(bytes) = &chunk {
                for msg in watch.scanner.feed(bytes) {
                    watch.note(msg);
                }
            }
            chunk
        });
        Response::from_parts(parts, Body::from_stream(stream))
    }
}

/// Follows a `Start` event stream; writes the entry when the stream ends or is dropped.
struct ProcessWatch {
    obs: Option<EnvdObservation>,
    scanner: EnvelopeScanner,
    pid: Option<u64>,
    outcome: Option<String>,
}

impl ProcessWatch {
    fn note(&mut self, msg: Message) {
        match msg {
            Message::Data(v) => {
                let event = &v["event"];
                if let Some(pid) = event["start"]["pid"].as_u64() {
                    self.pid = Some(pid);
                }
                if let Some(end) = event.get("end") {
                    self.outcome = Some(match end.get("exitCode").and_then(Value::as_i64) {
                        Some(code) => code.to_string(),
                        // proto3 JSON omits a zero exit code; a killed process has a status.
                        None => match end.get("status").and_then(Value::as_str) {
                            Some(s) if !s.starts_with("exit status") => s.to_string(),
                            _ => "0".to_string(),
                        },
                    });
                }
            }
            Message::EndOfStream(v) => {
                if let Some(code) = v["error"]["code"].as_str() {
                    self.outcome.get_or_insert_with(|| format!("error: {code}"));
                }
            }
        }
    }
}

impl Drop for ProcessWatch {
    fn drop(&mut self) {
        if let Some(obs) = self.obs.take() {
            let mut event = obs.event;
            if let Some(pid) = self.pid {
                event.detail["pid"] = Value::from(pid);
            }
            let result = self
                .outcome
                .take()
                .unwrap_or_else(|| "stream closed before the process ended".into());
            obs.log
                .record(event.result(result).duration(obs.started.elapsed()));
        }
    }
}

/// A Connect message the scanner found.
#[derive(Debug, PartialEq)]
enum Message {
    Data(Value),
    EndOfStream(Value),
}

/// Splits a Connect response stream into envelopes as bytes arrive, keeping only small
/// messages (process events are small; output chunks of any size are skipped unparsed).
#[derive(Default)]
struct EnvelopeScanner {
    header: Vec<u8>,
    /// Bytes of the current message still to come.
    remaining: usize,
    flags: u8,
    /// The current message, when it is small enough to parse.
    message: Option<Vec<u8>>,
}

/// Messages larger than this are output; they are not parsed.
const SCAN_LIMIT: usize = 16 * 1024;

impl EnvelopeScanner {
    fn feed(&mut self, mut bytes: &[u8]) -> Vec<Message> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            if self.remaining == 0 && self.message.is_none() {
                let need = 5 - self.header.len();
                let take = need.min(bytes.len());
                self.header.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                if self.header.len() < 5 {
                    break;
                }
                self.flags = self.header[0];
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                self.header.clear();
                self.remaining = len;
                self.message = (len <= SCAN_LIMIT).then(|| Vec::with_capacity(len));
                if len == 0 {
                    self.complete(&mut out);
                }
                continue;
            }
            let take = self.remaining.min(bytes.len());
            if let Some(m) = &mut self.message {
                m.extend_from_slice(&bytes[..take]);
            }
            self.remaining -= take;
            bytes = &bytes[take..];
            if self.remaining == 0 {
                self.complete(&mut out);
            }
        }
        out
    }

    fn complete(&mut self, out: &mut Vec<Message>) {
        if let Some(m) = self.message.take() {
            let v: Value = serde_json::from_slice(&m).unwrap_or(Value::Null);
            out.push(if self.flags & 0x02 != 0 {
                Message::EndOfStream(v)
            } else {
                Message::Data(v)
            });
        }
    }
}

/// Query of `GET /warren/v1/audit`.
#[derive(Debug, Deserialize)]
pub struct AuditParams {
    sandbox: Option<String>,
    key: Option<String>,
    kind: Option<String>,
    since: Option<String>,
    until: Option<String>,
    after: Option<i64>,
    limit: Option<u32>,
    /// `jsonl` for JSON lines (one entry per line), else a JSON array.
    format: Option<String>,
}

const DEFAULT_LIMIT: u32 = 1_000;
const MAX_LIMIT: u32 = 100_000;

fn time(name: &str, v: Option<String>) -> Result<Option<DateTime<Utc>>, ApiError> {
    v.map(|s| {
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| {
                ApiError::bad_request(format!("{name}: {s:?} is not an RFC 3339 time: {e}"))
            })
    })
    .transpose()
}

/// `GET /warren/v1/audit`: the caller's team's entries, oldest first.
pub async fn query(
    State(st): State<AppState>,
    Auth(who): Auth,
    Query(p): Query<AuditParams>,
) -> Result<Response, ApiError> {
    let kind = match p.kind.as_deref() {
        None => None,
        Some(k) => Some(AuditKind::parse(k).ok_or_else(|| {
            ApiError::bad_request(format!(
                "kind {k:?} is not one of api, process, file, network, lifecycle"
            ))
        })?),
    };
    let limit = p.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_LIMIT}"
        )));
    }
    let q = AuditQuery {
        team: None,
        sandbox: p.sandbox,
        key_id: p.key,
        kind,
        since: time("since", p.since)?,
        until: time("until", p.until)?,
        after: p.after,
        limit: Some(limit),
    };
    // Entries written a moment ago (this caller's previous request) are visible.
    if let Some(log) = st.warren.audit().cloned() {
        let _ = tokio::task::spawn_blocking(move || log.flush()).await;
    }
    let events = st.warren.query_audit(&who, q).await?;
    match p.format.as_deref() {
        Some("jsonl") => {
            let mut body = String::new();
            for e in &events {
                body.push_str(&serde_json::to_string(e).expect("plain data serializes"));
                body.push('\n');
            }
            let mut resp = (StatusCode::OK, body).into_response();
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/x-ndjson"),
            );
            Ok(resp)
        }
        None | Some("json") => Ok(axum::Json(events).into_response()),
        Some(f) => Err(ApiError::bad_request(format!(
            "format {f:?} is not json or jsonl"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![flags];
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn scanner_finds_events_across_any_chunking_and_skips_big_output() {
        let mut stream = Vec::new();
        stream.extend(envelope(0, br#"{"event":{"start":{"pid":42}}}"#));
        let big = format!(
            r#"{{"event":{{"data":{{"stdout":"{}"}}}}}}"#,
            "A".repeat(100_000)
        );
        stream.extend(envelope(0, big.as_bytes()));
        stream.extend(envelope(
            0,
            br#"{"event":{"end":{"exitCode":3,"exited":true}}}"#,
        ));
        stream.extend(envelope(2, b"{}"));
        for chunk in [1, 2, 5, 7, 4096, stream.len()] {
            let mut s = EnvelopeScanner::default();
            let mut got = Vec::new();
            for c in stream.chunks(chunk) {
                got.extend(s.feed(c));
            }
            assert_eq!(got.len(), 3, "chunk {chunk}");
            assert_eq!(got[0], Message::Data(json!({"event":{"start":{"pid":42}}})));
            assert_eq!(got[2], Message::EndOfStream(json!({})));
        }
    }

    #[test]
    fn request_fields_keep_env_names_not_values() {
        let body = envelope(
            0,
            br#"{"process":{"cmd":"/bin/bash","args":["-l","-c","echo hi"],"envs":{"TOKEN":"secret"}},"stdin":false}"#,
        );
        let f = request_fields(&body).unwrap();
        assert_eq!(f["cmd"], "/bin/bash");
        assert_eq!(f["args"][2], "echo hi");
        assert_eq!(f["env_names"], json!(["TOKEN"]));
        assert!(!f.to_string().contains("secret"));
        assert_eq!(
            request_fields(br#"{"path":"/tmp/x"}"#).unwrap()["path"],
            "/tmp/x"
        );
    }

    #[test]
    fn sandbox_ids_in_api_paths() {
        assert_eq!(
            sandbox_in_path("/sandboxes/abc/pause").as_deref(),
            Some("abc")
        );
        assert_eq!(
            sandbox_in_path("/v2/sandboxes/abc/connect").as_deref(),
            Some("abc")
        );
        assert_eq!(sandbox_in_path("/v2/sandboxes"), None);
        assert_eq!(sandbox_in_path("/sandboxes/"), None);
    }
}
