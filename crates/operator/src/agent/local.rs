//! The node agent's work on its node: sandboxes in Pods, with the single-host runtime's
//! [`PodRuntime`] (same init, overlay root and isolation as `warren serve`), in the Pod's cgroup
//! and network namespace. Found from the Pod's uid (its processes' cgroup paths carry
//! `pod<uid>`), or handed in explicitly.
//!
//! Hibernate, wake and checkpoint use CRIU as single-host mode does (a node without a working
//! CRIU answers 501 with the reason). Commit is not wired to pod sandboxes yet: the agent answers
//! 501 saying so, and the operator shows it in the Commit's status.

use super::*;
use std::net::Ipv4Addr;
use std::path::Path;
use warren_runtime::linux::pod::{PodRuntime, PodTarget};
use warren_runtime::linux::prepare_base_template;
use warren_runtime::{
    CheckpointOptions, EnvdSettings, NetworkPolicy, Resources, RootfsSpec, RuntimeError,
    SandboxSpec,
};

pub struct LocalAgent {
    rt: PodRuntime,
    /// Templates this node can start: `base` (the host's `/usr` under a minimal root).
    templates: BTreeMap<String, RootfsSpec>,
}

fn failed(node: &str, code: u16, message: String) -> AgentError {
    AgentError::Failed {
        node: node.into(),
        code,
        message,
    }
}

fn runtime_error(node: &str, e: RuntimeError) -> AgentError {
    match e {
        RuntimeError::UnknownSandbox(id) => AgentError::NotFound {
            node: node.into(),
            message: format!("no sandbox {id} on this node"),
        },
        RuntimeError::Config(m) => failed(node, 400, m),
        RuntimeError::CheckpointUnavailable(m) => failed(node, 501, m),
        // The sandbox is in the wrong state for the operation, or CRIU refused it.
        e @ RuntimeError::Checkpoint { .. } => failed(node, 409, e.to_string()),
        other => failed(node, 500, other.to_string()),
    }
}

/// The Pod's cgroup (relative to the cgroup2 root) and a process in it, from `/proc`: the line of
/// a process's `/proc/<pid>/cgroup` that names `pod<uid>` (kubelet writes the uid with `-`, or `_`
/// under the systemd driver).
pub fn find_pod(proc_root: &Path, uid: &str) -> Option<(String, u32)> {
    let wanted = [format!("pod{uid}"), format!("pod{}", uid.replace('-', "_"))];
    for entry in std::fs::read_dir(proc_root).ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(entry.path().join("cgroup")) else {
            continue;
        };
        for line in text.lines() {
            // `0::/kubepods/burstable/pod<uid>/<container>` (cgroup2 line).
            let Some(path) = line.strip_prefix("0::") else {
                continue;
            };
            let comps: Vec<&str> = path.trim_matches('/').split('/').collect();
            if let Some(i) = comps.iter().position(|c| {
                wanted
                    .iter()
                    .any(|w| c.trim_end_matches(".slice").ends_with(w.as_str()))
            }) {
                return Some((comps[..=i].join("/"), pid));
            }
        }
    }
    None
}

impl LocalAgent {
    /// Needs a tokio runtime (it adopts the sandboxes a previous agent left running).
    pub fn new(data_dir: PathBuf, envd_binary: PathBuf) -> Result<Self, RuntimeError> {
        let rt = PodRuntime::new(data_dir.clone(), envd_binary)?;
        // Sandboxes started before a restart of the agent are ours again.
        let adopted = rt.adopt_existing();
        if !adopted.is_empty() {
            tracing::info!(
                count = adopted.len(),
                "adopted the sandboxes of the previous agent"
            );
        }
        let base = prepare_base_template(&data_dir)?;
        Ok(LocalAgent {
            rt,
            templates: BTreeMap::from([("base".to_string(), base)]),
        })
    }

    fn target(&self, node: &str, req: &CreateRequest) -> Result<PodTarget, AgentError> {
        let ip: Ipv4Addr = match &req.pod.ip {
            Some(ip) => ip
                .parse()
                .map_err(|_| failed(node, 400, format!("pod.ip {ip:?} is not an IPv4 address")))?,
            None => Ipv4Addr::UNSPECIFIED,
        };
        let found = || {
            find_pod(Path::new("/proc"), &req.pod.uid).ok_or_else(|| {
                failed(
                    node,
                    409,
                    format!(
                        "pod {}/{} (uid {}) has no process on this node yet",
                        req.pod.namespace, req.pod.name, req.pod.uid
                    ),
                )
            })
        };
        let (netns, cgroup_parent) = match (&req.netns, &req.cgroup_parent) {
            (Some(n), Some(c)) => (n.clone(), c.clone()),
            (n, c) => {
                let (cg, pid) = found()?;
                (
                    n.clone()
                        .unwrap_or_else(|| PathBuf::from(format!("/proc/{pid}/ns/net"))),
                    c.clone().unwrap_or(cg),
                )
            }
        };
        Ok(PodTarget {
            netns,
            cgroup_parent,
            ip,
        })
    }

    fn not_yet(node: &str, what: &str) -> AgentError {
        failed(
            node,
            501,
            format!("{what} of sandboxes in pods is not implemented by this node agent yet (the image layer store is not wired to pod sandboxes)"),
        )
    }
}

#[async_trait]
impl NodeAgent for LocalAgent {
    async fn create(&self, node: &str, req: &CreateRequest) -> Result<SandboxInfo, AgentError> {
        if let Some(p) = self.rt.placement(&req.id) {
            if self.rt.is_hibernated(&req.id) {
                return Ok(SandboxInfo {
                    id: req.id.clone(),
                    state: SandboxState::Hibernated,
                    init_pid: None,
                });
            }
            if self.rt.is_alive(&req.id) {
                return Ok(SandboxInfo {
                    id: req.id.clone(),
                    state: SandboxState::Running,
                    init_pid: Some(p.init_pid),
                });
            }
            // Dead: clear it and start again.
            self.rt
                .destroy(&req.id)
                .await
                .map_err(|e| runtime_error(node, e))?;
        }
        if req.image.is_some() {
            return Err(failed(
                node,
                501,
                "image sandboxes are not supported by this node agent yet; use a template".into(),
            ));
        }
        let template = req.template.as_deref().unwrap_or("base");
        let rootfs = self.templates.get(template).cloned().ok_or_else(|| {
            failed(
                node,
                404,
                format!(
                    "template {template:?} is not on this node (it has: {})",
                    self.templates
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })?;
        let target = self.target(node, req)?;
        let defaults = Resources::default();
        let spec = SandboxSpec {
            id: req.id.clone(),
            rootfs,
            resources: Resources {
                vcpus: if req.vcpus == 0 {
                    defaults.vcpus
                } else {
                    req.vcpus
                },
                memory_mb: if req.memory_mb == 0 {
                    defaults.memory_mb
                } else {
                    req.memory_mb
                },
                // Pod sandboxes have no disk of their own (yet): the upper dir is on the node's
                // data dir, and the Pod's ephemeral-storage accounting does not see it.
                disk_mb: 0,
                pids_max: defaults.pids_max,
            },
            network: NetworkPolicy::default(),
            envd: EnvdSettings {
                env_vars: req.env_vars.clone(),
                access_token: req.access_token.clone(),
                admin_token: req.admin_token.clone(),
                default_user: "user".into(),
                ..Default::default()
            },
        };
        let p = self
            .rt
            .create(&spec, &target)
            .await
            .map_err(|e| runtime_error(node, e))?;
        tracing::info!(sandbox = %req.id, pod = %req.pod.name, pid = p.init_pid, "sandbox started in pod");
        Ok(SandboxInfo {
            id: req.id.clone(),
            state: SandboxState::Running,
            init_pid: Some(p.init_pid),
        })
    }

    async fn pause(&self, node: &str, id: &str) -> Result<(), AgentError> {
        self.rt.freeze(id).await.map_err(|e| runtime_error(node, e))
    }

    async fn resume(&self, node: &str, id: &str) -> Result<(), AgentError> {
        self.rt.thaw(id).await.map_err(|e| runtime_error(node, e))
    }

    async fn hibernate(&self, node: &str, id: &str) -> Result<CheckpointInfo, AgentError> {
        let stats = self
            .rt
            .hibernate(id)
            .await
            .map_err(|e| runtime_error(node, e))?;
        Ok(CheckpointInfo {
            checkpoint_id: id.to_string(),
            size_bytes: stats.bytes,
            duration_ms: stats.duration.as_millis() as u64,
        })
    }

    async fn wake(&self, node: &str, id: &str) -> Result<(), AgentError> {
        self.rt
            .wake(id)
            .await
            .map(|_| ())
            .map_err(|e| runtime_error(node, e))
    }

    async fn checkpoint(
        &self,
        node: &str,
        id: &str,
        req: &CheckpointRequest,
    ) -> Result<CheckpointInfo, AgentError> {
        use crate::crd::CheckpointContent;
        let memory = req.contents.is_empty() || req.contents.contains(&CheckpointContent::Memory);
        let info = self
            .rt
            .checkpoint(
                id,
                &req.checkpoint_id,
                &CheckpointOptions {
                    memory,
                    keep_running: req.keep_running,
                },
            )
            .await
            .map_err(|e| runtime_error(node, e))?;
        Ok(CheckpointInfo {
            checkpoint_id: req.checkpoint_id.clone(),
            size_bytes: info.image_bytes + info.fs_bytes,
            duration_ms: info.duration.as_millis() as u64,
        })
    }

    async fn delete_checkpoint(&self, node: &str, checkpoint_id: &str) -> Result<(), AgentError> {
        self.rt
            .delete_checkpoint(checkpoint_id)
            .await
            .map_err(|e| runtime_error(node, e))
    }

    async fn commit(
        &self,
        node: &str,
        _id: &str,
        _req: &CommitRequest,
    ) -> Result<CommitInfo, AgentError> {
        Err(Self::not_yet(node, "committing"))
    }

    async fn delete(&self, node: &str, id: &str) -> Result<(), AgentError> {
        self.rt
            .destroy(id)
            .await
            .map_err(|e| runtime_error(node, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_are_found_by_uid_in_proc() {
        let dir = std::env::temp_dir().join(format!("warren-findpod-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (pid, cg) in [
            ("1", "0::/init.scope\n"),
            (
                "77",
                "12:memory:/x\n0::/kubepods/burstable/podab12-cd34/0123abcd\n",
            ),
            (
                "88",
                "0::/kubepods.slice/kubepods-pod11_22.slice/cri-containerd-9.scope\n",
            ),
        ] {
            std::fs::create_dir_all(dir.join(pid)).unwrap();
            std::fs::write(dir.join(pid).join("cgroup"), cg).unwrap();
        }
        std::fs::create_dir_all(dir.join("self")).unwrap();
        assert_eq!(
            find_pod(&dir, "ab12-cd34"),
            Some(("kubepods/burstable/podab12-cd34".into(), 77))
        );
        assert_eq!(
            find_pod(&dir, "11-22"),
            Some(("kubepods.slice/kubepods-pod11_22.slice".into(), 88))
        );
        assert_eq!(find_pod(&dir, "nope"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
