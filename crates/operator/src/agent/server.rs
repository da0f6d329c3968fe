//! The node agent's HTTP edge: translates requests into calls of the node's [`NodeAgent`]
//! implementation ([`super::local::LocalAgent`]) and errors into `{"code":N,"message":"..."}`.
//! Only the operator talks to it, with the shared bearer token.

use super::*;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use std::sync::Arc;

#[derive(Clone)]
struct AppState {
    agent: Arc<dyn NodeAgent>,
    node: String,
    token: Option<String>,
    /// A second token that opens only `GET .../metrics` (what the API replicas hold), so the
    /// API needs none of the powers of `token`.
    metrics_token: Option<String>,
}

fn error(code: u16, message: impl Into<String>) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        Json(ErrorBody {
            code,
            message: message.into(),
        }),
    )
        .into_response()
}

fn agent_error(e: AgentError) -> Response {
    match e {
        AgentError::NotFound { message, .. } => error(404, message),
        AgentError::Failed { code, message, .. } => error(code, message),
        AgentError::Unreachable { message, .. } => error(502, message),
    }
}

/// True when the request's bearer token is `want` (compared in constant time).
fn bearer_is(headers: &HeaderMap, want: &str) -> bool {
    let got = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    got.is_some_and(|g| {
        g.len() == want.len()
            && g.bytes()
                .zip(want.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    })
}

/// `Some(rejection)` unless the request carries the token.
fn check(state: &AppState, headers: &HeaderMap) -> Option<Response> {
    let Some(want) = &state.token else {
        return None;
    };
    let got = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Constant time: the token guards a privileged service.
    let same = got.is_some_and(|g| {
        g.len() == want.len()
            && g.bytes()
                .zip(want.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    (!same).then(|| error(401, "missing or wrong bearer token"))
}

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("invalid request body: {e}"))
}

fn ok<T: Serialize>(v: Result<T, AgentError>) -> Response {
    match v {
        Ok(v) => Json(v).into_response(),
        Err(e) => agent_error(e),
    }
}

fn done(v: Result<(), AgentError>) -> Response {
    ok(v.map(|()| serde_json::json!({})))
}

/// The agent's routes, serving `agent` as node `node`.
pub fn router(agent: Arc<dyn NodeAgent>, node: String, token: Option<String>) -> Router {
    router_with_metrics_token(agent, node, token, None)
}

/// [`router`], where `metrics_token` also opens the metrics route (and nothing else).
pub fn router_with_metrics_token(
    agent: Arc<dyn NodeAgent>,
    node: String,
    token: Option<String>,
    metrics_token: Option<String>,
) -> Router {
    let state = AppState {
        agent,
        node,
        token,
        metrics_token,
    };
    Router::new()
        .route("/v1/sandboxes", post(create))
        .route("/v1/sandboxes/{id}", delete(remove))
        .route("/v1/sandboxes/{id}/{op}", post(op))
        .route("/v1/sandboxes/{id}/metrics", axum::routing::get(metrics))
        .route("/v1/checkpoints/{id}", delete(remove_checkpoint))
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .with_state(state)
}

async fn create(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(r) = check(&s, &headers) {
        return r;
    }
    let req: CreateRequest = match parse(&body) {
        Ok(r) => r,
        Err(m) => return error(400, m),
    };
    ok(s.agent.create(&s.node, &req).await)
}

async fn remove(State(s): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Some(r) = check(&s, &headers) {
        return r;
    }
    done(s.agent.delete(&s.node, &id).await)
}

async fn metrics(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let reader = s
        .metrics_token
        .as_deref()
        .is_some_and(|t| bearer_is(&headers, t));
    if !reader {
        if let Some(r) = check(&s, &headers) {
            return r;
        }
    }
    ok(s.agent.metrics(&s.node, &id).await)
}

async fn remove_checkpoint(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = check(&s, &headers) {
        return r;
    }
    done(s.agent.delete_checkpoint(&s.node, &id).await)
}

async fn op(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path((id, op)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    if let Some(r) = check(&s, &headers) {
        return r;
    }
    let (a, n) = (&s.agent, s.node.as_str());
    match op.as_str() {
        "pause" => done(a.pause(n, &id).await),
        "resume" => done(a.resume(n, &id).await),
        "hibernate" => ok(a.hibernate(n, &id).await),
        "wake" => done(a.wake(n, &id).await),
        "checkpoints" => match parse::<CheckpointRequest>(&body) {
            Ok(req) => ok(a.checkpoint(n, &id, &req).await),
            Err(m) => error(400, m),
        },
        "commits" => match parse::<CommitRequest>(&body) {
            Ok(req) => ok(a.commit(n, &id, &req).await),
            Err(m) => error(400, m),
        },
        "network" => match parse::<NetworkUpdateRequest>(&body) {
            Ok(req) => done(a.update_network(n, &id, &req).await),
            Err(m) => error(400, m),
        },
        other => error(
            404,
            format!("no operation {other:?}; one of pause, resume, hibernate, wake, checkpoints, commits, network"),
        ),
    }
}

/// The read-only metrics token, from the file named by `WARREN_NODE_AGENT_METRICS_TOKEN_FILE`
/// (the chart mounts an optional Secret there). Unset, or the file absent (the Secret not
/// created): none, and only the main token reads metrics.
pub fn metrics_token_from_env() -> anyhow::Result<Option<String>> {
    use anyhow::Context as _;
    let Some(p) = std::env::var_os("WARREN_NODE_AGENT_METRICS_TOKEN_FILE") else {
        return Ok(None);
    };
    let p = PathBuf::from(p);
    if !p.exists() {
        tracing::warn!(path = %p.display(), "no metrics token file: only the operator's token reads metrics");
        return Ok(None);
    }
    let t = std::fs::read_to_string(&p)
        .with_context(|| format!("reading the metrics token {}", p.display()))?
        .trim()
        .to_string();
    anyhow::ensure!(!t.is_empty(), "{} is empty", p.display());
    Ok(Some(t))
}

/// How `node-agent` serves.
pub struct NodeAgentOptions {
    pub listen: String,
    pub node_name: String,
    pub data_dir: PathBuf,
    /// The sandbox init (`warren-envd`); `None`: beside the running binary.
    pub envd_binary: Option<PathBuf>,
    /// The bearer token callers must send; `None`: none (tests only: the agent is privileged).
    pub token: Option<String>,
    /// The cluster's Pod and Service networks (`--cluster-cidr`, `--service-cidr`): closed to
    /// sandboxes unless their allowOut names them.
    pub cluster_cidrs: Vec<String>,
    /// Disk cap of sandboxes whose Sandbox names no ephemeral-storage, in MiB; 0: none.
    pub sandbox_disk_mb: u64,
    /// Serve https with this certificate chain and key (PEM files); `None`: plain HTTP.
    pub tls: Option<TlsFiles>,
}

/// The node agent's TLS flags (`warren-operator node-agent`, `warren node-agent`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// PEM certificate chain the agent serves https with (a `kubernetes.io/tls` Secret's
    /// `tls.crt`; it must name `warren-node-agent`, which callers verify). Unset: plain HTTP.
    #[arg(
        long,
        env = "WARREN_NODE_AGENT_TLS_CERT_FILE",
        requires = "tls_key_file"
    )]
    pub tls_cert_file: Option<PathBuf>,
    /// Its PEM private key (`tls.key`).
    #[arg(
        long,
        env = "WARREN_NODE_AGENT_TLS_KEY_FILE",
        requires = "tls_cert_file"
    )]
    pub tls_key_file: Option<PathBuf>,
}

impl TlsArgs {
    pub fn files(self) -> anyhow::Result<Option<TlsFiles>> {
        match (self.tls_cert_file, self.tls_key_file) {
            (Some(cert), Some(key)) => Ok(Some(TlsFiles { cert, key })),
            (None, None) => Ok(None),
            _ => anyhow::bail!("--tls-cert-file and --tls-key-file go together"),
        }
    }
}

/// The node agent's certificate chain and key (PEM), e.g. a `kubernetes.io/tls` Secret's.
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Serves `app` over TLS on `listener` until `shutdown` completes. A client that fails the
/// handshake is dropped (logged), never answered in plain text.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    config: Arc<rustls::ServerConfig>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => accepted?,
            () = &mut shutdown => return Ok(()),
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(
                std::time::Duration::from_secs(10),
                acceptor.accept(tcp),
            )
            .await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "node agent: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::info!(%peer, "node agent: TLS handshake timed out");
                    return;
                }
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            if let Err(e) =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await
            {
                tracing::debug!(%peer, error = %e, "node agent: connection ended");
            }
        });
    }
}

/// Serves the node agent ([`super::local::LocalAgent`]) until SIGTERM or SIGINT (`warren
/// node-agent`, `warren-operator node-agent`: the DaemonSet's container).
#[cfg(target_os = "linux")]
pub async fn serve_node_agent(o: NodeAgentOptions) -> anyhow::Result<()> {
    use anyhow::Context as _;
    if o.token.is_none() {
        tracing::warn!("no token: the node agent accepts unauthenticated calls");
    }
    let envd = o.envd_binary.unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("warren-envd")))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("/usr/local/bin/warren-envd"))
    });
    std::fs::create_dir_all(&o.data_dir)
        .with_context(|| format!("creating {}", o.data_dir.display()))?;
    let ranges = o
        .cluster_cidrs
        .iter()
        .filter(|c| !c.trim().is_empty())
        .map(|c| {
            c.parse::<warren_runtime::Cidr>()
                .with_context(|| format!("--cluster-cidr/--service-cidr {c:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if ranges.is_empty() {
        tracing::warn!("no --cluster-cidr/--service-cidr: sandboxes can reach other Pods and Services (the node and the metadata service stay closed)");
    }
    if o.sandbox_disk_mb > 0 {
        anyhow::ensure!(
            o.sandbox_disk_mb >= warren_runtime::linux::disk::MIN_MB,
            "--sandbox-disk-mb {} is below the least disk, {} MiB (0 runs without caps)",
            o.sandbox_disk_mb,
            warren_runtime::linux::disk::MIN_MB
        );
        warren_runtime::linux::disk::check_support().map_err(|why| {
            anyhow::anyhow!("sandbox disk caps (--sandbox-disk-mb) cannot work on this node: {why}; --sandbox-disk-mb 0 runs without them")
        })?;
    }
    // Read before anything starts: a bad certificate is a start-up error, not a first-call one.
    let tls = match &o.tls {
        Some(f) => Some(super::tls::server_config(&f.cert, &f.key)?),
        None => {
            tracing::warn!("no --tls-cert-file: the node agent serves plain HTTP, and creates and commits carry tokens and registry credentials");
            None
        }
    };
    let agent = super::local::LocalAgent::new(o.data_dir.clone(), envd)
        .await
        .context("starting the node agent's runtime")?
        .with_sandbox_disk_mb(o.sandbox_disk_mb)
        .with_cluster_ranges(ranges);
    let listener = tokio::net::TcpListener::bind(&o.listen)
        .await
        .with_context(|| format!("listening on {}", o.listen))?;
    tracing::info!(listen = %o.listen, node = %o.node_name, data_dir = %o.data_dir.display(), tls = tls.is_some(), "warren node agent serving");
    let metrics_token = metrics_token_from_env()?;
    let app = router_with_metrics_token(Arc::new(agent), o.node_name, o.token, metrics_token);
    let shutdown = async {
        // kubelet stops the DaemonSet's container with SIGTERM.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    match tls {
        Some(config) => serve_tls(listener, app, config, shutdown).await,
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
    .context("serving the node agent")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::fake::FakeAgent;
    use crate::agent::http::{AgentAddress, HttpNodeAgent};

    /// Issues, with the openssl CLI, a CA (`<tag>-ca.pem`) and a server certificate for DNS name
    /// `name` signed by it (`<tag>.pem`, `<tag>.key`) in `dir`.
    fn issue(dir: &std::path::Path, tag: &str, name: &str) -> (PathBuf, PathBuf, PathBuf) {
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("openssl runs (scripts/install-deps.sh installs it)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let (ca, ca_key) = (format!("{tag}-ca.pem"), format!("{tag}-ca.key"));
        let (cert, key, csr) = (
            format!("{tag}.pem"),
            format!("{tag}.key"),
            format!("{tag}.csr"),
        );
        let ext = format!("{tag}.ext");
        std::fs::write(
            dir.join(&ext),
            format!("subjectAltName=DNS:{name}\nextendedKeyUsage=serverAuth\n"),
        )
        .unwrap();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        let mut a = vec!["req", "-x509"];
        a.extend(ec);
        a.extend([
            "-keyout",
            &ca_key,
            "-out",
            &ca,
            "-days",
            "1",
            "-subj",
            "/CN=test-ca",
        ]);
        run(&a);
        let mut a = vec!["req"];
        a.extend(ec);
        a.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=agent"]);
        run(&a);
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "1",
            "-extfile",
            &ext,
        ]);
        (dir.join(ca), dir.join(cert), dir.join(key))
    }

    /// Over TLS: a caller with the agents' CA reaches the agent at its IP (verifying the name
    /// `warren-node-agent`); a plain-HTTP caller, a caller of another CA, an http URL with a CA
    /// configured, and a certificate for another name all fail, and the agent never sees those
    /// calls.
    #[tokio::test]
    async fn over_tls_only_callers_of_the_agents_ca_get_through() {
        let dir = std::env::temp_dir().join(format!("warren-agent-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (ca, cert, key) = issue(&dir, "good", crate::agent::tls::AGENT_TLS_NAME);
        let (other_ca, _, _) = issue(&dir, "other", crate::agent::tls::AGENT_TLS_NAME);
        let (same_ca_wrong_name, wrong_cert, wrong_key) = issue(&dir, "misnamed", "not-the-agent");
        let serve = |cert: PathBuf, key: PathBuf| {
            let fake = Arc::new(FakeAgent::default());
            let app = router(fake.clone(), "node-a".into(), Some("s3cret".into()));
            let config = crate::agent::tls::server_config(&cert, &key).expect("server config");
            async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = listener.local_addr().unwrap();
                tokio::spawn(serve_tls(listener, app, config, std::future::pending()));
                (fake, addr)
            }
        };
        let (fake, addr) = serve(cert, key).await;
        let client =
            |url: String| HttpNodeAgent::new(AgentAddress::Fixed(url), Some("s3cret".into()));

        let good = client(format!("https://{addr}")).with_ca_file(&ca).unwrap();
        good.pause("n", "abc").await.expect("a call over TLS");
        assert_eq!(fake.calls(), vec!["pause node-a abc"]);

        let refused = [
            (
                "plain http to a TLS agent",
                client(format!("http://{addr}")),
            ),
            (
                "another CA",
                client(format!("https://{addr}"))
                    .with_ca_file(&other_ca)
                    .unwrap(),
            ),
            (
                "http with a CA configured",
                client(format!("http://{addr}")).with_ca_file(&ca).unwrap(),
            ),
        ];
        for (what, c) in refused {
            let e = c.pause("n", "abc").await.unwrap_err();
            assert!(matches!(e, AgentError::Unreachable { .. }), "{what}: {e}");
            eprintln!("{what}: {e}");
        }
        // The misnamed certificate's own CA trusts it, but the name is not the agent's.
        let (_, addr2) = serve(wrong_cert, wrong_key).await;
        let e = client(format!("https://{addr2}"))
            .with_ca_file(&same_ca_wrong_name)
            .unwrap()
            .pause("n", "abc")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("certificate"), "{e}");
        assert_eq!(fake.calls().len(), 1, "no refused call reached the agent");

        // Bad files are errors that name them.
        let e = crate::agent::tls::server_config(&dir.join("nope.pem"), &dir.join("nope.key"))
            .unwrap_err();
        assert!(e.to_string().contains("nope.pem"), "{e}");
        let e = HttpNodeAgent::new(AgentAddress::Fixed(String::new()), None)
            .with_ca_file(&dir.join("good.ext"))
            .err()
            .expect("not a CA");
        assert!(e.to_string().contains("good.ext"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The client and the server agree on every call, errors keep their kind across the wire,
    /// and the token is enforced (real HTTP on loopback).
    #[tokio::test]
    async fn client_and_server_speak_the_same_protocol() {
        let fake = Arc::new(FakeAgent::default());
        let app = router(fake.clone(), "node-a".into(), Some("s3cret".into()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let url = format!("http://{addr}");
        let client = HttpNodeAgent::new(AgentAddress::Fixed(url.clone()), Some("s3cret".into()));

        let req = CreateRequest {
            id: "abc123".into(),
            template: Some("base".into()),
            pod: PodRef {
                namespace: "ns".into(),
                name: "sb1".into(),
                uid: "u".into(),
                ip: Some("10.0.0.5".into()),
            },
            // A fork: the checkpoint id travels too.
            restore_from: Some("cp0".into()),
            ..Default::default()
        };
        let info = client.create("ignored", &req).await.unwrap();
        assert_eq!(info.state, SandboxState::Running);
        assert_eq!(fake.creates.lock().unwrap()[0], req);
        client.pause("x", "abc123").await.unwrap();
        client.resume("x", "abc123").await.unwrap();
        assert_eq!(
            client.hibernate("x", "abc123").await.unwrap().duration_ms,
            200
        );
        client.wake("x", "abc123").await.unwrap();
        let cp = CheckpointRequest {
            checkpoint_id: "cp1".into(),
            keep_running: true,
            contents: vec![],
        };
        assert_eq!(
            client
                .checkpoint("x", "abc123", &cp)
                .await
                .unwrap()
                .checkpoint_id,
            "cp1"
        );
        client.delete_checkpoint("x", "cp1").await.unwrap();
        let c = CommitRequest {
            commit_id: "c1".into(),
            image: "reg/repo:tag".into(),
            ..Default::default()
        };
        assert!(client
            .commit("x", "abc123", &c)
            .await
            .unwrap()
            .digest
            .starts_with("sha256:"));
        client.delete("x", "abc123").await.unwrap();
        let stats = client.metrics("x", "abc123").await.unwrap();
        assert_eq!(stats.memory_bytes, 96 << 20);
        assert_eq!(
            fake.calls(),
            [
                "create node-a abc123",
                "pause node-a abc123",
                "resume node-a abc123",
                "hibernate node-a abc123",
                "wake node-a abc123",
                "checkpoint node-a abc123",
                "delete_checkpoint node-a cp1",
                "commit node-a abc123",
                "delete node-a abc123",
                "metrics node-a abc123"
            ]
        );

        fake.fail(
            "pause",
            AgentError::NotFound {
                node: "node-a".into(),
                message: "no sandbox abc123".into(),
            },
        );
        let e = client.pause("n1", "abc123").await.unwrap_err();
        assert!(e.is_not_found(), "{e}");
        assert!(e.to_string().contains("no sandbox abc123"), "{e}");
        fake.fail(
            "resume",
            AgentError::Failed {
                node: "node-a".into(),
                code: 409,
                message: "not paused".into(),
            },
        );
        assert!(matches!(client.resume("n1", "abc123").await.unwrap_err(),
            AgentError::Failed { code: 409, ref message, .. } if message == "not paused"));

        let wrong = HttpNodeAgent::new(AgentAddress::Fixed(url.clone()), Some("nope".into()));
        assert!(matches!(
            wrong.delete("n1", "x").await.unwrap_err(),
            AgentError::Failed { code: 401, .. }
        ));
        let none = HttpNodeAgent::new(AgentAddress::Fixed(url), None);
        assert!(matches!(
            none.delete("n1", "x").await.unwrap_err(),
            AgentError::Failed { code: 401, .. }
        ));

        // Bad input gets a clear JSON error, not a panic.
        let raw = reqwest_like_post(addr, "/v1/sandboxes", "{\"id\": 5}").await;
        assert!(raw.starts_with("HTTP/1.1 401"), "{raw}");
        let gone = HttpNodeAgent::new(AgentAddress::Fixed("http://127.0.0.1:1".into()), None);
        assert!(
            matches!(gone.delete("n9", "x").await.unwrap_err(), AgentError::Unreachable { ref node, .. } if node == "n9")
        );
    }

    async fn reqwest_like_post(addr: std::net::SocketAddr, path: &str, body: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    /// The metrics token reads metrics and opens nothing else.
    #[tokio::test]
    async fn the_metrics_token_opens_only_metrics() {
        let fake = Arc::new(FakeAgent::default());
        let app = router_with_metrics_token(
            fake.clone(),
            "node-a".into(),
            Some("s3cret".into()),
            Some("reader".into()),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let url = format!("http://{addr}");
        let reader = HttpNodeAgent::new(AgentAddress::Fixed(url.clone()), Some("reader".into()));
        assert_eq!(
            reader.metrics("x", "abc").await.unwrap().memory_bytes,
            96 << 20
        );
        for e in [
            reader.delete("x", "abc").await.unwrap_err(),
            reader.pause("x", "abc").await.unwrap_err(),
        ] {
            assert!(matches!(e, AgentError::Failed { code: 401, .. }), "{e}");
        }
        let full = HttpNodeAgent::new(AgentAddress::Fixed(url), Some("s3cret".into()));
        full.metrics("x", "abc").await.unwrap();
        assert_eq!(fake.calls(), ["metrics node-a abc", "metrics node-a abc"]);
    }

    #[tokio::test]
    async fn malformed_bodies_get_a_json_400() {
        let app = router(Arc::new(FakeAgent::default()), "n".into(), None);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let raw = reqwest_like_post(addr, "/v1/sandboxes", "{\"id\": 5}").await;
        assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
        assert!(
            raw.contains("\"code\":400") && raw.contains("invalid request body"),
            "{raw}"
        );
        let raw = reqwest_like_post(addr, "/v1/sandboxes/x/explode", "").await;
        assert!(
            raw.starts_with("HTTP/1.1 404") && raw.contains("no operation"),
            "{raw}"
        );
    }
}
