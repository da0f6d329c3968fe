//! `warren sandbox exec`: runs a command in a sandbox through the daemon's router, speaking
//! Connect `process.Process/Start` (JSON codec, server streaming) to envd, as the SDK does.

use crate::client::{get_info, ApiClient};
use anyhow::{anyhow, bail, Context};
use base64::Engine;
use bytes::{Buf, Bytes, BytesMut};
use clap::Args;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;

/// envd's port inside every sandbox.
const ENVD_PORT: u16 = warren_runtime::ENVD_PORT;

#[derive(Args)]
pub struct ExecArgs {
    pub(crate) id: String,
    /// User to run as (default: the sandbox's default user).
    #[arg(long, short = 'u')]
    pub(crate) user: Option<String>,
    /// Working directory (default: the user's home).
    #[arg(long)]
    pub(crate) cwd: Option<String>,
    /// Environment variable `KEY=VALUE` for this command (repeatable).
    #[arg(long = "env", short = 'e')]
    pub(crate) env: Vec<String>,
    /// The command; a single argument is a shell command line, several are quoted as words.
    #[arg(last = true, required = true)]
    pub(crate) command: Vec<String>,
}

/// Quotes a word for bash.
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn command_line(words: &[String]) -> String {
    if words.len() == 1 {
        words[0].clone()
    } else {
        words
            .iter()
            .map(|w| shell_quote(w))
            .collect::<Vec<_>>()
            .join(" ")
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

/// What the stream has told us so far.
enum Step {
    Continue,
    Exit(u8),
}

fn handle_message(msg: &Value) -> anyhow::Result<Step> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let event = &msg["event"];
    if let Some(data) = event.get("data") {
        for (key, is_err) in [("stdout", false), ("stderr", true), ("pty", false)] {
            if let Some(s) = data.get(key).and_then(Value::as_str) {
                let bytes = b64
                    .decode(s)
                    .with_context(|| format!("bad base64 in {key} data"))?;
                // Written and flushed per message so interactive output appears as it comes.
                if is_err {
                    let mut e = std::io::stderr().lock();
                    e.write_all(&bytes)?;
                    e.flush()?;
                } else {
                    let mut o = std::io::stdout().lock();
                    o.write_all(&bytes)?;
                    o.flush()?;
                }
            }
        }
    } else if let Some(end) = event.get("end") {
        let code = end.get("exitCode").and_then(Value::as_i64).unwrap_or(0);
        let exited = end.get("exited").and_then(Value::as_bool).unwrap_or(true);
        if !exited {
            let status = end.get("status").and_then(Value::as_str).unwrap_or("");
            eprintln!("warren: command did not exit normally: {status}");
        }
        let code = match code {
            0 if !exited => 1,
            c if (0..=255).contains(&c) => c as u8,
            _ => 1,
        };
        return Ok(Step::Exit(code));
    }
    Ok(Step::Continue)
}

pub async fn run(api: &ApiClient, a: ExecArgs) -> anyhow::Result<u8> {
    let info = get_info(api, &a.id).await?;
    if info["state"] == "paused" {
        bail!(
            "sandbox {} is paused; resume it first (warren sandbox resume {})",
            a.id,
            a.id
        );
    }
    let token = info["envdAccessToken"].as_str().map(str::to_string);

    let envs: BTreeMap<String, String> = a
        .env
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow!("env {p:?} must be KEY=VALUE"))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut process = json!({
        "cmd": "/bin/bash",
        "args": ["-l", "-c", command_line(&a.command)],
        "envs": envs,
    });
    if let Some(cwd) = &a.cwd {
        process["cwd"] = json!(cwd);
    }
    let start = json!({ "process": process, "stdin": false });
    let body = envelope(0, start.to_string().as_bytes());

    let mut req = Request::builder()
        .method(Method::POST)
        .uri(format!("{}/process.Process/Start", api.base))
        .header("e2b-sandbox-id", &a.id)
        .header("e2b-sandbox-port", ENVD_PORT.to_string())
        .header("content-type", "application/connect+json")
        .header("connect-protocol-version", "1")
        .header("connect-content-encoding", "identity")
        .header("connect-accept-encoding", "identity");
    if let Some(t) = &token {
        req = req.header("x-access-token", t);
    }
    if let Some(u) = &a.user {
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{u}:"));
        req = req.header("authorization", format!("Basic {basic}"));
    }
    let resp = api
        .http
        .request(req.body(Full::new(body))?)
        .await
        .with_context(|| format!("cannot reach the daemon at {}", api.base))?;

    let status = resp.status();
    if !status.is_success() {
        let bytes = resp.into_body().collect().await?.to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let msg = v["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        bail!("{msg} (HTTP {})", status.as_u16());
    }

    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("reading the command's output stream")?;
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
            let msg: Value =
                serde_json::from_slice(&payload).context("malformed message from envd")?;
            if flags & 0x02 != 0 {
                // End of stream: carries an error, or nothing.
                if let Some(err) = msg.get("error") {
                    let code = err["code"].as_str().unwrap_or("unknown");
                    let message = err["message"].as_str().unwrap_or("");
                    bail!("{code}: {message}");
                }
                bail!("the command's stream ended without an exit status");
            }
            if let Step::Exit(code) = handle_message(&msg)? {
                return Ok(code);
            }
        }
    }
    bail!("the command's stream ended without an exit status")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(command_line(&["echo hi | wc".into()]), "echo hi | wc");
        assert_eq!(
            command_line(&["echo".into(), "a b".into(), "it's".into(), "".into()]),
            r"echo 'a b' 'it'\''s' ''"
        );
    }

    #[test]
    fn envelopes() {
        let e = envelope(2, b"{}");
        assert_eq!(&e[..], &[2, 0, 0, 0, 2, b'{', b'}']);
    }

    #[test]
    fn end_event_sets_exit_code() {
        let m = json!({"event": {"end": {"exitCode": 3, "exited": true}}});
        assert!(matches!(handle_message(&m).unwrap(), Step::Exit(3)));
        let m = json!({"event": {"end": {"exited": true}}});
        assert!(matches!(handle_message(&m).unwrap(), Step::Exit(0)));
        let m = json!({"event": {"start": {"pid": 7}}});
        assert!(matches!(handle_message(&m).unwrap(), Step::Continue));
    }
}
