//! envd: the agent that runs as PID 1 inside each Warren sandbox and serves the
//! E2B envd API (Connect `process.Process` and `filesystem.Filesystem` services
//! plus the `/files` and `/health` HTTP endpoints) on port 49983.

use std::collections::BTreeMap;

pub mod auth;
pub mod connect;
pub mod file_metadata;
pub mod files_http;
pub mod filesystem;
mod filesystem_service;
mod gzip;
pub mod init;
pub mod process;
mod process_service;
pub mod proto;
pub mod reaper;
pub mod server;
pub mod spawn;
pub mod start_command;
pub mod users;
pub mod watch;

pub use reaper::start_reaper;

/// How envd serves a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvdConfig {
    /// When set, every request except `GET /health` must present it
    /// (`X-Access-Token`, or a signed URL for `/files`).
    pub access_token: Option<String>,
    /// Sandbox-wide environment variables given to every process.
    pub env_vars: BTreeMap<String, String>,
    /// The user for requests that do not name one.
    pub default_user: String,
    /// Secret of the Warren daemon for `POST /init` (claim-time reconfiguration). `None`
    /// disables `/init`. Never given to sandbox users.
    pub admin_token: Option<String>,
    /// Started once at boot (see [`start_command`]); `None` starts nothing.
    pub start_command: Option<String>,
    /// Where processes start when a request names no cwd (an image's `WorkingDir`); `None`
    /// means the user's home.
    pub default_cwd: Option<std::path::PathBuf>,
}

impl Default for EnvdConfig {
    fn default() -> Self {
        EnvdConfig {
            access_token: None,
            env_vars: BTreeMap::new(),
            default_user: "user".to_string(),
            admin_token: None,
            start_command: None,
            default_cwd: None,
        }
    }
}

/// Serves the envd API on `listener` until the process ends. Starts the
/// reaper if it is not running yet.
pub async fn serve(config: EnvdConfig, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    use axum::serve::ListenerExt;

    start_reaper();
    // Stream envelopes are small writes that must reach the client at once.
    let listener = listener.tap_io(|stream| {
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!("failed to set TCP_NODELAY: {err}");
        }
    });
    axum::serve(listener, server::router(config)).await
}
