//! A client of the daemon's E2B API (plain HTTP/1 through hyper-util).

use crate::output;
use crate::{ClientArgs, Output};
use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use clap::Args;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;

pub struct ApiClient {
    pub base: String,
    pub key: String,
    pub http: Client<HttpConnector, Full<Bytes>>,
}

/// The daemon's data dir, for reading its generated API key.
fn default_data_dir() -> PathBuf {
    std::env::var_os("WARREN_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/warren"))
}

impl ApiClient {
    pub fn new(args: &ClientArgs) -> anyhow::Result<Self> {
        let base = args.url.trim_end_matches('/').to_string();
        if !base.starts_with("http://") {
            bail!("--url must be an http:// URL (got {base:?}); TLS is not supported by the CLI");
        }
        let key = match &args.api_key {
            Some(k) => k.clone(),
            None => {
                let path = warren_core::auth::config_path(&default_data_dir());
                let config = warren_core::auth::read_config(&path)
                    .map_err(|e| anyhow!("no API key given and {e}"))?;
                config
                    .and_then(|c| c.api_keys.into_iter().next())
                    .map(|k| k.key)
                    .ok_or_else(|| {
                        anyhow!(
                            "no API key: pass --api-key or set WARREN_API_KEY (the daemon prints \
                             its key at first start and stores it in {})",
                            path.display()
                        )
                    })?
            }
        };
        Ok(ApiClient {
            base,
            key,
            http: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    /// Sends one API request; returns the status, headers and whole body.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(StatusCode, HeaderMap, Bytes)> {
        let mut req = Request::builder()
            .method(method.clone())
            .uri(format!("{}{path}", self.base))
            .header("x-api-key", &self.key)
            .header(
                "user-agent",
                concat!("warren-cli/", env!("CARGO_PKG_VERSION")),
            );
        let body = match body {
            Some(v) => {
                req = req.header("content-type", "application/json");
                Full::new(Bytes::from(v.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let resp = self
            .http
            .request(req.body(body)?)
            .await
            .with_context(|| format!("cannot reach the daemon at {}", self.base))?;
        let status = resp.status();
        let (parts, body) = resp.into_parts();
        let bytes = body
            .collect()
            .await
            .with_context(|| format!("reading the answer to {method} {path}"))?
            .to_bytes();
        Ok((status, parts.headers, bytes))
    }

    /// Sends a request and turns an error status into a readable error.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(StatusCode, HeaderMap, Value)> {
        let (status, headers, bytes) = self.send(method, path, body).await?;
        let value: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        if !status.is_success() {
            let message = value["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            bail!("{message} (HTTP {})", status.as_u16());
        }
        Ok((status, headers, value))
    }
}

fn parse_pairs(pairs: &[String], what: &str) -> anyhow::Result<BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow!("{what} {p:?} must be KEY=VALUE"))
        })
        .collect()
}

#[derive(Args)]
pub struct CreateArgs {
    /// Template to create the sandbox from.
    #[arg(long, default_value = "base")]
    template: String,
    /// Lifetime in seconds (default: the daemon's default, 300).
    #[arg(long)]
    timeout: Option<i64>,
    /// Metadata `KEY=VALUE` (repeatable).
    #[arg(long = "metadata", short = 'm')]
    metadata: Vec<String>,
    /// Environment variable `KEY=VALUE` for every process in the sandbox (repeatable).
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    /// Cut the sandbox off from the internet.
    #[arg(long)]
    no_internet: bool,
    /// Pause instead of kill when the timeout expires.
    #[arg(long)]
    auto_pause: bool,
}

pub async fn create(api: &ApiClient, out: Output, a: CreateArgs) -> anyhow::Result<()> {
    let mut body = json!({
        "templateID": a.template,
        "metadata": parse_pairs(&a.metadata, "metadata")?,
        "envVars": parse_pairs(&a.env, "env")?,
    });
    if let Some(t) = a.timeout {
        body["timeout"] = json!(t);
    }
    if a.no_internet {
        body["allow_internet_access"] = json!(false);
    }
    if a.auto_pause {
        body["autoPause"] = json!(true);
    }
    let (_, _, v) = api.call(Method::POST, "/v2/sandboxes", Some(body)).await?;
    match out {
        Output::Json => output::json(&v),
        Output::Table => println!("{}", output::str_field(&v, "sandboxID")),
    }
    Ok(())
}

#[derive(Args)]
pub struct ListArgs {
    /// Only sandboxes with this metadata `KEY=VALUE` (repeatable; all must match).
    #[arg(long = "metadata", short = 'm')]
    metadata: Vec<String>,
    /// Only sandboxes in this state.
    #[arg(long, value_parser = ["running", "paused"])]
    state: Option<String>,
}

pub async fn list(api: &ApiClient, out: Output, a: ListArgs) -> anyhow::Result<()> {
    use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
    let enc = |s: &str| utf8_percent_encode(s, NON_ALPHANUMERIC).to_string();
    let mut base_query = vec![];
    let metadata = parse_pairs(&a.metadata, "metadata")?;
    if !metadata.is_empty() {
        // The SDK's encoding: quote each part, join as a query string, send as one parameter.
        let inner = metadata
            .iter()
            .map(|(k, v)| format!("{}={}", enc(&enc(k)), enc(&enc(v))))
            .collect::<Vec<_>>()
            .join("&");
        base_query.push(format!("metadata={}", enc(&inner)));
    }
    if let Some(s) = &a.state {
        base_query.push(format!("state={s}"));
    }
    let mut all = vec![];
    let mut token: Option<String> = None;
    loop {
        let mut q = base_query.clone();
        q.push("limit=100".into());
        if let Some(t) = &token {
            q.push(format!("nextToken={}", enc(t)));
        }
        let (_, headers, v) = api
            .call(Method::GET, &format!("/v2/sandboxes?{}", q.join("&")), None)
            .await?;
        all.extend(v.as_array().cloned().unwrap_or_default());
        token = headers
            .get("x-next-token")
            .and_then(|t| t.to_str().ok())
            .filter(|t| !t.is_empty())
            .map(str::to_string);
        if token.is_none() {
            break;
        }
    }
    match out {
        Output::Json => output::json(&Value::Array(all)),
        Output::Table => {
            let rows: Vec<Vec<String>> = all
                .iter()
                .map(|s| {
                    vec![
                        output::str_field(s, "sandboxID"),
                        output::str_field(s, "templateID"),
                        output::str_field(s, "state"),
                        output::time_field(s, "startedAt"),
                        output::time_field(s, "endAt"),
                        output::metadata_field(s),
                    ]
                })
                .collect();
            output::table(
                &[
                    "SANDBOX ID",
                    "TEMPLATE",
                    "STATE",
                    "STARTED (UTC)",
                    "ENDS (UTC)",
                    "METADATA",
                ],
                &rows,
            );
        }
    }
    Ok(())
}

pub async fn get_info(api: &ApiClient, id: &str) -> anyhow::Result<Value> {
    let (_, _, v) = api
        .call(Method::GET, &format!("/sandboxes/{id}"), None)
        .await?;
    Ok(v)
}

pub async fn get(api: &ApiClient, out: Output, id: &str) -> anyhow::Result<()> {
    let v = get_info(api, id).await?;
    match out {
        Output::Json => output::json(&v),
        Output::Table => output::fields(&[
            ("id", output::str_field(&v, "sandboxID")),
            ("template", output::str_field(&v, "templateID")),
            ("state", output::str_field(&v, "state")),
            ("memory in", output::str_field(&v, "memoryLocation")),
            ("started", output::time_field(&v, "startedAt")),
            ("ends", output::time_field(&v, "endAt")),
            ("cpus", output::str_field(&v, "cpuCount")),
            ("memory MB", output::str_field(&v, "memoryMB")),
            ("internet", output::str_field(&v, "allowInternetAccess")),
            ("metadata", output::metadata_field(&v)),
        ]),
    }
    Ok(())
}

pub async fn pause(api: &ApiClient, id: &str) -> anyhow::Result<()> {
    api.call(
        Method::POST,
        &format!("/sandboxes/{id}/pause"),
        Some(json!({})),
    )
    .await?;
    println!("paused {id}");
    Ok(())
}

pub async fn hibernate(api: &ApiClient, id: &str) -> anyhow::Result<()> {
    api.call(
        Method::POST,
        &format!("/warren/v1/sandboxes/{id}/hibernate"),
        Some(json!({})),
    )
    .await?;
    println!("hibernated {id}");
    Ok(())
}

pub async fn resume(
    api: &ApiClient,
    out: Output,
    id: &str,
    timeout: Option<i64>,
) -> anyhow::Result<()> {
    let body = match timeout {
        Some(t) => json!({ "timeout": t }),
        None => json!({}),
    };
    let (status, _, v) = api
        .call(
            Method::POST,
            &format!("/v2/sandboxes/{id}/connect"),
            Some(body),
        )
        .await?;
    match out {
        Output::Json => output::json(&v),
        Output::Table if status == StatusCode::CREATED => println!("resumed {id}"),
        Output::Table => println!("{id} was already running"),
    }
    Ok(())
}

pub async fn kill(api: &ApiClient, id: &str) -> anyhow::Result<()> {
    api.call(Method::DELETE, &format!("/sandboxes/{id}"), None)
        .await?;
    println!("killed {id}");
    Ok(())
}

pub async fn set_timeout(api: &ApiClient, id: &str, seconds: i64) -> anyhow::Result<()> {
    api.call(
        Method::POST,
        &format!("/sandboxes/{id}/timeout"),
        Some(json!({ "timeout": seconds })),
    )
    .await?;
    println!("{id} now ends in {seconds} s");
    Ok(())
}
