//! The daemon's side of envd's `POST /init`: hands a claimed pool member its new env vars and
//! access token. Behind a trait so that the control plane's tests run without a sandbox.

use async_trait::async_trait;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InitRequest {
    pub env_vars: BTreeMap<String, String>,
    pub access_token: String,
    pub default_user: String,
}

#[async_trait]
pub trait EnvdClient: Send + Sync + 'static {
    /// Reconfigures the envd at `addr`, authenticated with the sandbox's admin token.
    async fn init(
        &self,
        addr: SocketAddr,
        admin_token: &str,
        req: &InitRequest,
    ) -> Result<(), String>;
}

/// Plain HTTP/1.1 over a fresh TCP connection to the sandbox's veth address: one request per
/// claim, so a connection pool would buy nothing, and no HTTP client crate is needed here.
pub struct HttpEnvdClient {
    pub timeout: Duration,
}

impl Default for HttpEnvdClient {
    fn default() -> Self {
        HttpEnvdClient {
            timeout: Duration::from_secs(5),
        }
    }
}

#[async_trait]
impl EnvdClient for HttpEnvdClient {
    async fn init(
        &self,
        addr: SocketAddr,
        admin_token: &str,
        req: &InitRequest,
    ) -> Result<(), String> {
        let body = serde_json::to_vec(req).map_err(|e| e.to_string())?;
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let head = format!(
                "POST /init HTTP/1.1\r\nHost: {addr}\r\nX-Admin-Token: {admin_token}\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let mut request = head.into_bytes();
            request.extend_from_slice(&body);
            stream.write_all(&request).await?;
            // The status line is all we need; envd closes the connection after answering.
            let mut response = Vec::with_capacity(256);
            let mut buf = [0u8; 256];
            while !response.windows(2).any(|w| w == b"\r\n") {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                response.extend_from_slice(&buf[..n]);
            }
            Ok::<_, std::io::Error>(response)
        };
        let response = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| format!("envd at {addr} did not answer /init in {:?}", self.timeout))?
            .map_err(|e| format!("envd at {addr}: {e}"))?;
        let line = String::from_utf8_lossy(&response);
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| format!("envd at {addr} sent no HTTP status"))?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(format!("envd at {addr} refused /init with status {status}"))
        }
    }
}
