//! The daemon's own envd client for build steps: runs a command through envd's Connect
//! `process.Process/Start` (JSON codec, server streaming, as the SDKs speak it) and uploads files
//! through `POST /files`, straight to the sandbox's address (not through the router: the daemon
//! is not a tenant).

use base64::Engine;
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;
use warren_core::orchestrator::builds::{StepCommand, StepOutput, StepRunner};

/// How often a refused connection is tried again (envd may still be binding its port).
const CONNECT_TRIES: u32 = 20;

pub struct EnvdStepRunner {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for EnvdStepRunner {
    fn default() -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        EnvdStepRunner {
            client: Client::builder(TokioExecutor::new()).build(http),
        }
    }
}

/// A Connect envelope: flags, big-endian length, payload.
fn envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.extend_from_slice(&[flags]);
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b.freeze()
}

/// The Start request of a step: `/bin/sh -c CMD` (images without bash work too).
fn start_request(cmd: &StepCommand) -> Value {
    let mut process = json!({
        "cmd": "/bin/sh",
        "args": ["-c", cmd.cmd],
        "envs": cmd.env,
    });
    if let Some(cwd) = &cmd.cwd {
        process["cwd"] = json!(cwd);
    }
    json!({ "process": process, "stdin": false })
}

/// What one stream message says: output, the exit code, or nothing of interest.
fn handle(msg: &Value, output: &StepOutput) -> Result<Option<i32>, String> {
    let event = &msg["event"];
    if let Some(data) = event.get("data") {
        for key in ["stdout", "stderr", "pty"] {
            if let Some(s) = data.get(key).and_then(Value::as_str) {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map_err(|e| format!("bad base64 in {key}: {e}"))?;
                output(&bytes);
            }
        }
    } else if let Some(end) = event.get("end") {
        let exited = end.get("exited").and_then(Value::as_bool).unwrap_or(true);
        let code = end.get("exitCode").and_then(Value::as_i64).unwrap_or(0);
        if !exited {
            let status = end
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("killed");
            return Err(format!("the command did not exit normally: {status}"));
        }
        return Ok(Some(code as i32));
    }
    Ok(None)
}

impl EnvdStepRunner {
    async fn send(
        &self,
        build: impl Fn() -> Result<http::Request<Full<Bytes>>, String>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, String> {
        let mut tries = 0;
        loop {
            match self.client.request(build()?).await {
                Err(e) if e.is_connect() && tries < CONNECT_TRIES => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(format!("cannot reach the sandbox's envd: {e}")),
                Ok(r) => return Ok(r),
            }
        }
    }
}

async fn error_text(resp: hyper::Response<hyper::body::Incoming>) -> String {
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let msg = v["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    format!("envd answered HTTP {}: {msg}", status.as_u16())
}

#[async_trait::async_trait]
impl StepRunner for EnvdStepRunner {
    async fn run(
        &self,
        envd: SocketAddr,
        token: &str,
        cmd: &StepCommand,
        output: &StepOutput,
    ) -> Result<i32, String> {
        let body = envelope(0, start_request(cmd).to_string().as_bytes());
        let user = base64::engine::general_purpose::STANDARD.encode(format!("{}:", cmd.user));
        let resp = self
            .send(|| {
                http::Request::builder()
                    .method(http::Method::POST)
                    .uri(format!("http://{envd}/process.Process/Start"))
                    .header("content-type", "application/connect+json")
                    .header("connect-protocol-version", "1")
                    .header("x-access-token", token)
                    .header("authorization", format!("Basic {user}"))
                    .body(Full::new(body.clone()))
                    .map_err(|e| e.to_string())
            })
            .await?;
        if !resp.status().is_success() {
            return Err(error_text(resp).await);
        }
        let mut body = resp.into_body();
        let mut buf = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("reading the command's output: {e}"))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while buf.len() >= 5 {
                let flags = buf[0];
                let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                if buf.len() < 5 + len {
                    break;
                }
                buf.advance(5);
                let payload = buf.split_to(len);
                let msg: Value = serde_json::from_slice(&payload)
                    .map_err(|e| format!("malformed message from envd: {e}"))?;
                if flags & 0x02 != 0 {
                    if let Some(err) = msg.get("error") {
                        return Err(format!(
                            "{}: {}",
                            err["code"].as_str().unwrap_or("unknown"),
                            err["message"].as_str().unwrap_or("")
                        ));
                    }
                    return Err("the command's stream ended without an exit status".into());
                }
                if let Some(code) = handle(&msg, output)? {
                    return Ok(code);
                }
            }
        }
        Err("the command's stream ended without an exit status".into())
    }

    async fn upload(
        &self,
        envd: SocketAddr,
        token: &str,
        path: &str,
        data: Vec<u8>,
    ) -> Result<(), String> {
        let data = Bytes::from(data);
        let q: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("path", path)
            .append_pair("username", "root")
            .finish();
        let resp = self
            .send(|| {
                http::Request::builder()
                    .method(http::Method::POST)
                    .uri(format!("http://{envd}/files?{q}"))
                    .header("content-type", "application/octet-stream")
                    .header("x-access-token", token)
                    .body(Full::new(data.clone()))
                    .map_err(|e| e.to_string())
            })
            .await?;
        if !resp.status().is_success() {
            return Err(error_text(resp).await);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_request_and_events() {
        let cmd = StepCommand {
            cmd: "echo hi".into(),
            user: "root".into(),
            cwd: Some("/srv".into()),
            env: [("A".to_string(), "1".to_string())].into_iter().collect(),
        };
        let r = start_request(&cmd);
        assert_eq!(r["process"]["cmd"], "/bin/sh");
        assert_eq!(r["process"]["args"], json!(["-c", "echo hi"]));
        assert_eq!(r["process"]["cwd"], "/srv");
        assert_eq!(r["process"]["envs"]["A"], "1");
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let out = move |b: &[u8]| s2.lock().unwrap().extend_from_slice(b);
        let data = json!({"event": {"data": {"stdout": "aGk="}}});
        assert_eq!(handle(&data, &out).unwrap(), None);
        assert_eq!(&*seen.lock().unwrap(), b"hi");
        let end = json!({"event": {"end": {"exitCode": 3, "exited": true}}});
        assert_eq!(handle(&end, &out).unwrap(), Some(3));
        let killed = json!({"event": {"end": {"exited": false, "status": "signal: killed"}}});
        assert!(handle(&killed, &out).unwrap_err().contains("killed"));
        assert_eq!(&envelope(0, b"{}")[..], &[0, 0, 0, 0, 2, b'{', b'}']);
    }
}
