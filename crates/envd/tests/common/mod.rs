//! Small helpers shared by the integration tests: an in-process envd and a
//! hyper client that speaks just enough Connect.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;

use base64::Engine;
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::sync::mpsc;
use warren_envd::EnvdConfig;

pub type Body = BoxBody<Bytes, std::io::Error>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub struct Envd {
    pub addr: SocketAddr,
    client: Client<HttpConnector, Body>,
    pub token: Option<String>,
}

pub async fn start_envd(config: EnvdConfig) -> Envd {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let token = config.access_token.clone();
    tokio::spawn(warren_envd::serve(config, listener));
    Envd {
        addr,
        client: Client::builder(TokioExecutor::new()).build_http(),
        token,
    }
}

pub fn root_config() -> EnvdConfig {
    EnvdConfig {
        access_token: None,
        env_vars: BTreeMap::new(),
        default_user: "root".to_string(),
        admin_token: None,
        start_command: None,
        default_cwd: None,
    }
}

pub fn basic_user(user: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:"))
    )
}

pub fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

pub fn unb64(text: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}

pub fn envelope(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![flags];
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

impl Envd {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn request(&self, method: &str, path: &str) -> hyper::http::request::Builder {
        let mut builder = Request::builder().method(method).uri(self.url(path));
        if let Some(token) = &self.token {
            builder = builder.header("x-access-token", token);
        }
        builder
    }

    pub async fn send(&self, request: Request<Body>) -> Response<Incoming> {
        self.client.request(request).await.unwrap()
    }

    /// A unary Connect call; returns the status and the decoded JSON body.
    pub async fn unary(&self, path: &str, body: Value, user: Option<&str>) -> (StatusCode, Value) {
        let mut builder = self
            .request("POST", path)
            .header("content-type", "application/json");
        if let Some(user) = user {
            builder = builder.header("authorization", basic_user(user));
        }
        let response = self
            .send(builder.body(full(body.to_string())).unwrap())
            .await;
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, json)
    }

    /// Opens a server-streaming call with one enveloped request message.
    pub async fn stream(&self, path: &str, body: Value, user: Option<&str>) -> ConnectStream {
        self.stream_raw(path, envelope(0, body.to_string().as_bytes()), user)
            .await
    }

    pub async fn stream_raw(&self, path: &str, raw: Vec<u8>, user: Option<&str>) -> ConnectStream {
        let mut builder = self
            .request("POST", path)
            .header("content-type", "application/connect+json")
            .header("connect-protocol-version", "1");
        if let Some(user) = user {
            builder = builder.header("authorization", basic_user(user));
        }
        let response = self.send(builder.body(full(raw)).unwrap()).await;
        ConnectStream::new(response)
    }

    /// Opens a client-streaming call whose envelopes are sent through the returned sender.
    pub async fn client_stream(
        &self,
        path: &str,
        user: Option<&str>,
    ) -> (mpsc::Sender<Value>, tokio::task::JoinHandle<ConnectStream>) {
        let (tx, mut rx) = mpsc::channel::<Value>(8);
        let (body_tx, body_rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(8);
        tokio::spawn(async move {
            while let Some(message) = rx.recv().await {
                let frame = Frame::data(Bytes::from(envelope(0, message.to_string().as_bytes())));
                if body_tx.send(Ok(frame)).await.is_err() {
                    break;
                }
            }
        });
        let body_stream = futures::stream::unfold(body_rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let body = StreamBody::new(body_stream).boxed();
        let mut builder = self
            .request("POST", path)
            .header("content-type", "application/connect+json");
        if let Some(user) = user {
            builder = builder.header("authorization", basic_user(user));
        }
        let request = builder.body(body).unwrap();
        let client = self.client.clone();
        let handle =
            tokio::spawn(async move { ConnectStream::new(client.request(request).await.unwrap()) });
        (tx, handle)
    }

    /// Runs a command through `Start` and collects everything until `end`.
    pub async fn run(&self, start: Value, user: Option<&str>) -> CommandResult {
        let mut stream = self.stream("/process.Process/Start", start, user).await;
        assert_eq!(stream.status, StatusCode::OK);
        let mut result = CommandResult::default();
        while let Some((flags, message)) = stream.next().await {
            if flags & 0x02 != 0 {
                result.trailer = Some(message);
                break;
            }
            let event = &message["event"];
            if let Some(start) = event.get("start") {
                result.pid = start["pid"].as_u64();
            } else if let Some(data) = event.get("data") {
                if let Some(out) = data.get("stdout") {
                    result.stdout.extend(unb64(out.as_str().unwrap()));
                }
                if let Some(err) = data.get("stderr") {
                    result.stderr.extend(unb64(err.as_str().unwrap()));
                }
            } else if let Some(end) = event.get("end") {
                result.end = Some(end.clone());
            }
            result.events.push(message);
        }
        result
    }
}

#[derive(Debug, Default)]
pub struct CommandResult {
    pub pid: Option<u64>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub end: Option<Value>,
    pub trailer: Option<Value>,
    pub events: Vec<Value>,
}

impl CommandResult {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn exit_code(&self) -> i64 {
        let end = self.end.as_ref().expect("no end event");
        end.get("exitCode").and_then(Value::as_i64).unwrap_or(0)
    }
}

pub fn start_request(script: &str) -> Value {
    serde_json::json!({
        "process": { "cmd": "/bin/bash", "args": ["-l", "-c", script] },
        "stdin": false,
    })
}

/// Reads envelopes from a streaming Connect response as they arrive.
pub struct ConnectStream {
    pub status: StatusCode,
    pub content_type: String,
    body: Incoming,
    buffer: BytesMut,
}

impl ConnectStream {
    fn new(response: Response<Incoming>) -> Self {
        ConnectStream {
            status: response.status(),
            content_type: response
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default(),
            body: response.into_body(),
            buffer: BytesMut::new(),
        }
    }

    /// The next `(flags, message)`, or `None` when the body ends.
    pub async fn next(&mut self) -> Option<(u8, Value)> {
        loop {
            if self.buffer.len() >= 5 {
                let len = u32::from_be_bytes(self.buffer[1..5].try_into().unwrap()) as usize;
                if self.buffer.len() >= 5 + len {
                    let flags = self.buffer[0];
                    self.buffer.advance(5);
                    let payload = self.buffer.split_to(len);
                    return Some((flags, serde_json::from_slice(&payload).unwrap()));
                }
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
                _ => return None,
            }
        }
    }

    /// Reads messages until one matches `predicate`.
    pub async fn next_matching(&mut self, predicate: impl Fn(&Value) -> bool) -> Value {
        loop {
            let (_, message) = self.next().await.expect("stream ended");
            if predicate(&message) {
                return message;
            }
        }
    }

    pub async fn body_text(mut self) -> String {
        let mut bytes = self.buffer.to_vec();
        while let Some(Ok(frame)) = self.body.frame().await {
            if let Ok(data) = frame.into_data() {
                bytes.extend_from_slice(&data);
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}
