//! The operator's client of the node agents: HTTP/1.1 with JSON bodies to the agent on the
//! sandbox's node, authenticated with a shared bearer token, over TLS once a CA is configured
//! ([`HttpNodeAgent::with_ca_file`], see [`super::tls`]). The agent's address is the node's
//! `InternalIP` and the agent's host port (the DaemonSet uses `hostNetwork`), read from the Node
//! object, or one fixed URL (one node, tests).

use super::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Node;
use serde::de::DeserializeOwned;
use std::time::Duration;

/// The environment variable naming the node agents' CA file, for callers configured by
/// environment (the API's metrics reads; the operator's `--node-agent-ca-file`).
pub const CA_FILE_ENV: &str = "WARREN_NODE_AGENT_CA_FILE";

/// Where the agent of a node listens.
#[derive(Clone)]
pub enum AgentAddress {
    /// Every node's agent at this base URL (`http://127.0.0.1:7070`): a one-node setup, tests.
    Fixed(String),
    /// `http://<node InternalIP>:<port>`, from the Node object.
    NodeInternalIp { client: kube::Client, port: u16 },
}

pub struct HttpNodeAgent {
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// `https` once a CA is configured.
    scheme: &'static str,
    address: AgentAddress,
    token: Option<String>,
    /// Limit of one call; creates wait for envd, dumps for CRIU.
    pub timeout: Duration,
}

impl HttpNodeAgent {
    pub fn new(address: AgentAddress, token: Option<String>) -> Self {
        HttpNodeAgent {
            http: Client::builder(TokioExecutor::new()).build(super::tls::plain_connector()),
            scheme: "http",
            address,
            token,
            timeout: Duration::from_secs(120),
        }
    }

    /// Speaks only https to the agents, trusting only the CA in the PEM file `ca` (a fixed URL
    /// must then be `https://`).
    pub fn with_ca_file(mut self, ca: &std::path::Path) -> Result<Self, super::tls::TlsError> {
        self.http = Client::builder(TokioExecutor::new()).build(super::tls::client_connector(ca)?);
        self.scheme = "https";
        Ok(self)
    }

    /// [`with_ca_file`](Self::with_ca_file) with `WARREN_NODE_AGENT_CA_FILE` when it is set.
    pub fn with_ca_from_env(self) -> Result<Self, super::tls::TlsError> {
        match std::env::var_os(CA_FILE_ENV) {
            Some(ca) if !ca.is_empty() => self.with_ca_file(std::path::Path::new(&ca)),
            _ => Ok(self),
        }
    }

    async fn base(&self, node: &str) -> Result<String, AgentError> {
        let unreachable = |message: String| AgentError::Unreachable {
            node: node.into(),
            message,
        };
        match &self.address {
            AgentAddress::Fixed(url) => Ok(url.trim_end_matches('/').to_string()),
            AgentAddress::NodeInternalIp { client, port } => {
                let nodes: kube::Api<Node> = kube::Api::all(client.clone());
                let n = nodes
                    .get(node)
                    .await
                    .map_err(|e| unreachable(format!("cannot read node {node}: {e}")))?;
                let ip = n
                    .status
                    .and_then(|s| s.addresses)
                    .unwrap_or_default()
                    .into_iter()
                    .find(|a| a.type_ == "InternalIP")
                    .map(|a| a.address)
                    .ok_or_else(|| unreachable(format!("node {node} has no InternalIP")))?;
                let host = if ip.contains(':') {
                    format!("[{ip}]")
                } else {
                    ip
                };
                Ok(format!("{}://{host}:{port}", self.scheme))
            }
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        node: &str,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, AgentError> {
        let unreachable = |message: String| AgentError::Unreachable {
            node: node.into(),
            message,
        };
        let url = format!("{}{path}", self.base(node).await?);
        let mut req = Request::builder()
            .method(method.clone())
            .uri(&url)
            .header("content-type", "application/json");
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| unreachable(format!("bad request {method} {url}: {e}")))?;
        let exchange = async {
            let resp = self.http.request(req).await.map_err(|e| {
                unreachable(format!("{method} {url}: {}", warren_image::pull::chain(&e)))
            })?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| unreachable(format!("{method} {url}: reading the answer: {e}")))?
                .to_bytes();
            Ok::<_, AgentError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| {
                unreachable(format!("{method} {url}: no answer in {:?}", self.timeout))
            })??;
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(if status.as_u16() == 404 {
                AgentError::NotFound {
                    node: node.into(),
                    message,
                }
            } else {
                AgentError::Failed {
                    node: node.into(),
                    code: status.as_u16(),
                    message,
                }
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| AgentError::Failed {
            node: node.into(),
            code: status.as_u16(),
            message: format!("{method} {url}: malformed answer: {e}"),
        })
    }
}

fn enc(id: &str) -> String {
    percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[async_trait]
impl NodeAgent for HttpNodeAgent {
    async fn create(&self, node: &str, req: &CreateRequest) -> Result<SandboxInfo, AgentError> {
        self.call(
            node,
            Method::POST,
            "/v1/sandboxes",
            Some(serde_json::to_value(req).unwrap_or_default()),
        )
        .await
    }
    async fn pause(&self, node: &str, id: &str) -> Result<(), AgentError> {
        let _: serde_json::Value = self
            .call(
                node,
                Method::POST,
                &format!("/v1/sandboxes/{}/pause", enc(id)),
                None,
            )
            .await?;
        Ok(())
    }
    async fn resume(&self, node: &str, id: &str) -> Result<(), AgentError> {
        let _: serde_json::Value = self
            .call(
                node,
                Method::POST,
                &format!("/v1/sandboxes/{}/resume", enc(id)),
                None,
            )
            .await?;
        Ok(())
    }
    async fn hibernate(&self, node: &str, id: &str) -> Result<CheckpointInfo, AgentError> {
        self.call(
            node,
            Method::POST,
            &format!("/v1/sandboxes/{}/hibernate", enc(id)),
            None,
        )
        .await
    }
    async fn wake(&self, node: &str, id: &str) -> Result<(), AgentError> {
        let _: serde_json::Value = self
            .call(
                node,
                Method::POST,
                &format!("/v1/sandboxes/{}/wake", enc(id)),
                None,
            )
            .await?;
        Ok(())
    }
    async fn checkpoint(
        &self,
        node: &str,
        id: &str,
        req: &CheckpointRequest,
    ) -> Result<CheckpointInfo, AgentError> {
        self.call(
            node,
            Method::POST,
            &format!("/v1/sandboxes/{}/checkpoints", enc(id)),
            Some(serde_json::to_value(req).unwrap_or_default()),
        )
        .await
    }
    async fn delete_checkpoint(&self, node: &str, checkpoint_id: &str) -> Result<(), AgentError> {
        let _: serde_json::Value = self
            .call(
                node,
                Method::DELETE,
                &format!("/v1/checkpoints/{}", enc(checkpoint_id)),
                None,
            )
            .await?;
        Ok(())
    }
    async fn commit(
        &self,
        node: &str,
        id: &str,
        req: &CommitRequest,
    ) -> Result<CommitInfo, AgentError> {
        self.call(
            node,
            Method::POST,
            &format!("/v1/sandboxes/{}/commits", enc(id)),
            Some(serde_json::to_value(req).unwrap_or_default()),
        )
        .await
    }
    async fn delete(&self, node: &str, id: &str) -> Result<(), AgentError> {
        let _: serde_json::Value = self
            .call(
                node,
                Method::DELETE,
                &format!("/v1/sandboxes/{}", enc(id)),
                None,
            )
            .await?;
        Ok(())
    }
    async fn metrics(
        &self,
        node: &str,
        id: &str,
    ) -> Result<warren_runtime::SandboxStats, AgentError> {
        self.call(
            node,
            Method::GET,
            &format!("/v1/sandboxes/{}/metrics", enc(id)),
            None,
        )
        .await
    }
    async fn update_network(
        &self,
        node: &str,
        id: &str,
        req: &NetworkUpdateRequest,
    ) -> Result<(), AgentError> {
        let _: serde_json::Value = self
            .call(
                node,
                Method::POST,
                &format!("/v1/sandboxes/{}/network", enc(id)),
                Some(serde_json::to_value(req).unwrap_or_default()),
            )
            .await?;
        Ok(())
    }
}
