//! Forks on a node: [`LocalAgent`] creates a sandbox from a checkpoint it holds
//! (`CreateRequest::restore_from`), into the new sandbox's own Pod.
//!
//! With process images, [`PodRuntime::restore`] restores the tree (the single-host fork code)
//! into a child of the new Pod's cgroup and into its network namespace: the fork has the Pod's
//! address, and established TCP connections are not cloned. The restored envd still holds the
//! source's tokens and env vars, so the agent re-keys it with envd's `POST /init`, as single-host
//! mode does, authenticated with the source's admin token. The agent keeps that token for each
//! sandbox it runs and each checkpoint it takes (`<data>/envd-admin/`, root only): the same secret
//! is in the checkpoint's memory images already, and the operator, which could derive it, may no
//! longer have the source Sandbox. A filesystem-only checkpoint boots a fresh sandbox on the
//! checkpoint's files instead.
//!
//! [`PodRuntime::restore`]: warren_runtime::linux::pod::PodRuntime::restore

use super::local::{runtime_error, LocalAgent};
use super::*;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use warren_core::envd_client::{EnvdClient, HttpEnvdClient, InitRequest};
use warren_runtime::{EnvdSettings, NetworkPolicy, SandboxSpec};

/// Where the admin tokens are kept, under the agent's data dir.
pub(super) const TOKENS_DIR: &str = "envd-admin";

fn failed(node: &str, code: u16, message: String) -> AgentError {
    AgentError::Failed {
        node: node.into(),
        code,
        message,
    }
}

/// Token files: `sandbox-<id>` and `checkpoint-<id>`. Both ids are checked by their users
/// (`[a-z0-9]` sandbox ids; checkpoint ids are valid checkpoint names before anything is kept).
fn token_file(dir: &Path, kind: &str, id: &str) -> Option<PathBuf> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with(['.', '-'])
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    ok.then(|| dir.join(format!("{kind}-{id}")))
}

pub(super) fn read_token(dir: &Path, kind: &str, id: &str) -> Option<String> {
    let path = token_file(dir, kind, id)?;
    std::fs::read_to_string(path).ok().filter(|t| !t.is_empty())
}

/// Keeps `token` (or forgets any with `None`), readable by root only.
pub(super) fn write_token(dir: &Path, kind: &str, id: &str, token: Option<&str>) {
    let Some(path) = token_file(dir, kind, id) else {
        return;
    };
    let Some(token) = token else {
        let _ = std::fs::remove_file(&path);
        return;
    };
    let tmp = dir.join(format!(".{kind}-{id}.tmp"));
    let written = std::fs::create_dir_all(dir).and_then(|()| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        std::io::Write::write_all(&mut f, token.as_bytes())?;
        std::fs::rename(&tmp, &path)
    });
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "keeping an envd admin token");
    }
}

impl LocalAgent {
    /// Creates `req.id` in its Pod from checkpoint `checkpoint` on this node (see the module
    /// docs). The caller has checked that no sandbox of that id runs.
    pub(super) async fn create_fork(
        &self,
        node: &str,
        req: &CreateRequest,
        checkpoint: &str,
    ) -> Result<SandboxInfo, AgentError> {
        let rt = &self.rt;
        let memory = rt.has_checkpoint_images(checkpoint);
        let root = rt.checkpoint_root(checkpoint);
        if !memory && root.is_none() {
            return Err(AgentError::NotFound {
                node: node.into(),
                message: format!(
                    "checkpoint {checkpoint} is not on this node (deleted, or taken on another \
                     node)"
                ),
            });
        }
        let target = self.target(node, req)?;
        let spec = SandboxSpec {
            id: req.id.clone(),
            // A memory fork's root comes from the checkpoint's record (see `PodRuntime::restore`).
            rootfs: root.unwrap_or(warren_runtime::RootfsSpec {
                lower_dirs: vec![],
                ro_binds: vec![],
            }),
            resources: self.resources(req),
            network: NetworkPolicy::default(),
            envd: EnvdSettings {
                env_vars: req.env_vars.clone(),
                access_token: req.access_token.clone(),
                admin_token: req.admin_token.clone(),
                default_user: "user".into(),
                ..Default::default()
            },
        };
        // The fork's policy is in force before its tree is booted or restored.
        self.install_egress(node, req, &target.netns, &spec.rootfs.lower_dirs)?;
        let tokens = &self.tokens_dir;
        if !memory {
            // Files only: a fresh boot on the checkpoint's files, with the fork's own tokens.
            let p = rt
                .create(&spec, &target)
                .await
                .map_err(|e| runtime_error(node, e))?;
            write_token(tokens, "sandbox", &req.id, req.admin_token.as_deref());
            return Ok(SandboxInfo {
                id: req.id.clone(),
                state: SandboxState::Running,
                init_pid: Some(p.init_pid),
            });
        }
        let source_admin = read_token(tokens, "checkpoint", checkpoint);
        if req.access_token.is_some() && source_admin.is_none() {
            return Err(failed(
                node,
                409,
                format!(
                    "checkpoint {checkpoint} is of a sandbox whose envd has no admin token, so \
                     its fork cannot be given its own access token; take the checkpoint of a \
                     sandbox created with the envd key"
                ),
            ));
        }
        let p = rt
            .restore(checkpoint, &spec, &target)
            .await
            .map_err(|e| runtime_error(node, e))?;
        // The restored envd's admin token is the source's: a checkpoint of the fork needs it.
        write_token(tokens, "sandbox", &req.id, source_admin.as_deref());
        if let Some(admin) = &source_admin {
            let init = InitRequest {
                env_vars: req.env_vars.clone(),
                access_token: req.access_token.clone().unwrap_or_default(),
                default_user: "user".into(),
            };
            let addr = std::net::SocketAddr::new(p.ip.into(), warren_runtime::ENVD_PORT);
            if let Err(e) = HttpEnvdClient::default().init(addr, admin, &init).await {
                // A fork nobody can reach with its own token is of no use: do not leave it.
                let _ = rt.destroy(&req.id).await;
                write_token(tokens, "sandbox", &req.id, None);
                return Err(failed(
                    node,
                    500,
                    format!("the restored sandbox's envd could not be re-keyed at {addr}: {e}"),
                ));
            }
        }
        tracing::info!(sandbox = %req.id, %checkpoint, pod = %req.pod.name, pid = p.init_pid, "sandbox forked in pod");
        Ok(SandboxInfo {
            id: req.id.clone(),
            state: SandboxState::Running,
            init_pid: Some(p.init_pid),
        })
    }
}
