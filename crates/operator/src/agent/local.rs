//! The node agent's work on its node: sandboxes in Pods, with the single-host runtime's
//! [`PodRuntime`] (same init, overlay root and isolation as `warren serve`), in the Pod's cgroup
//! and network namespace. Found from the Pod's uid (its processes' cgroup paths carry
//! `pod<uid>`), or handed in explicitly.
//!
//! `image:` sandboxes run on the image's layers, pulled into the node's store once
//! ([`super::images`]); a pull that fails answers [`IMAGE_PULL_FAILED`].
//!
//! Hibernate, wake and checkpoint use CRIU as single-host mode does (a node without a working
//! CRIU answers 501 with the reason). Commits use the single-host commit code into the node's
//! image store (`<data>/images`) and push with the credentials the operator read from the
//! Commit's `registryAuth.secrets` and passed in the request (the agent reads no Secrets).
//!
//! The sandbox's egress policy ([`EgressSpec`]) is installed in the Pod's network namespace
//! before the sandbox's first process starts, and replaced live by `update_network`; the cluster's
//! ranges given to [`LocalAgent::with_cluster_ranges`] and the node's own addresses are closed
//! to it (see `warren_runtime::linux::podnet`).

use super::*;
use crate::disk::DEFAULT_SANDBOX_DISK_MB;
use std::net::Ipv4Addr;
use std::path::Path;
use warren_runtime::linux::pod::{PodRuntime, PodTarget};
use warren_runtime::linux::podnet::{self, PodEgress};
use warren_runtime::linux::prepare_base_template;
use warren_runtime::{
    CheckpointOptions, Cidr, EnvdSettings, NetworkPolicy, Resources, RootfsSpec, RuntimeError,
    SandboxSpec,
};

pub struct LocalAgent {
    pub(super) rt: PodRuntime,
    /// `<data>/envd-admin`: the envd admin tokens forks are re-keyed with (see `local_fork`).
    pub(super) tokens_dir: PathBuf,
    /// The node's OCI image store (`<data>/images`), where commits go.
    committer: std::sync::Arc<warren_image::commit::Committer>,
    /// `<data>/commits/<commit id>.json`: finished commits, so a repeat returns the first.
    commits_dir: PathBuf,
    /// Templates this node can start: `base` (the host's `/usr` under a minimal root).
    templates: BTreeMap<String, RootfsSpec>,
    /// The cluster's Pod and Service networks (`--cluster-cidr`, `--service-cidr`), closed to
    /// sandboxes unless their `allowOut` names them; the node's own addresses are added at
    /// each apply.
    cluster_ranges: Vec<Cidr>,
    /// `<data>/egress/<id>.json`: the resolvers a sandbox's policy opens, fixed at create from
    /// its template (not from its own, writable resolv.conf), for live updates.
    egress_dir: PathBuf,
    /// Disk cap of a sandbox whose request names none (`--sandbox-disk-mb`); 0: no cap.
    default_disk_mb: u64,
    /// Images pulled for `image:` sandboxes, in the same store as commits.
    images: super::images::NodeImages,
}

fn failed(node: &str, code: u16, message: String) -> AgentError {
    AgentError::Failed {
        node: node.into(),
        code,
        message,
    }
}

pub(super) fn runtime_error(node: &str, e: RuntimeError) -> AgentError {
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
    /// The node's images (for tests and metrics: how many pulls it made).
    pub fn images(&self) -> &super::images::NodeImages {
        &self.images
    }

    /// Needs a tokio runtime (it adopts the sandboxes a previous agent left running).
    pub async fn new(data_dir: PathBuf, envd_binary: PathBuf) -> Result<Self, RuntimeError> {
        let rt = PodRuntime::new(data_dir.clone(), envd_binary)?;
        // Sandboxes started before a restart of the agent are ours again.
        let adopted = rt.adopt_existing().await;
        if !adopted.is_empty() {
            tracing::info!(
                count = adopted.len(),
                "adopted the sandboxes of the previous agent"
            );
        }
        let base = prepare_base_template(&data_dir)?;
        let committer = warren_image::commit::Committer::open(&data_dir.join("images"))
            .map_err(|e| RuntimeError::Config(format!("the node's image store: {e}")))?;
        let images = super::images::NodeImages::new(committer.store().clone(), &data_dir)
            .map_err(|e| RuntimeError::io("prepare the /etc layer of images in", &data_dir, e))?;
        let commits_dir = data_dir.join("commits");
        std::fs::create_dir_all(&commits_dir)
            .map_err(|e| RuntimeError::io("mkdir", &commits_dir, e))?;
        let egress_dir = data_dir.join("egress");
        std::fs::create_dir_all(&egress_dir)
            .map_err(|e| RuntimeError::io("mkdir", &egress_dir, e))?;
        Ok(LocalAgent {
            rt,
            tokens_dir: data_dir.join(super::local_fork::TOKENS_DIR),
            committer: std::sync::Arc::new(committer),
            commits_dir,
            templates: BTreeMap::from([("base".to_string(), base)]),
            default_disk_mb: DEFAULT_SANDBOX_DISK_MB,
            images,
            cluster_ranges: Vec::new(),
            egress_dir,
        })
    }

    /// The disk cap of sandboxes whose create names none, in MiB (`--sandbox-disk-mb`; 0: no
    /// cap, upper dirs directly in the data dir).
    pub fn with_sandbox_disk_mb(mut self, mb: u64) -> Self {
        self.default_disk_mb = mb;
        self
    }

    /// The sandbox's resources from a request (0: the defaults). Its disk is the single-host
    /// cap (a loop-mounted ext4 under the sandbox dir); the operator puts the same figure on the
    /// Pod as its ephemeral-storage, for the scheduler.
    pub(super) fn resources(&self, req: &CreateRequest) -> Resources {
        let defaults = Resources::default();
        let or = |v: u64, d: u64| if v == 0 { d } else { v };
        Resources {
            vcpus: if req.vcpus == 0 {
                defaults.vcpus
            } else {
                req.vcpus
            },
            memory_mb: or(req.memory_mb, defaults.memory_mb),
            disk_mb: or(req.disk_mb, self.default_disk_mb),
            pids_max: defaults.pids_max,
        }
    }

    /// The cluster's Pod and Service networks, which sandboxes may not reach unless named.
    pub fn with_cluster_ranges(mut self, ranges: Vec<Cidr>) -> Self {
        self.cluster_ranges = ranges;
        self
    }

    /// The policy to install for `spec` with `resolvers` open.
    fn pod_egress(
        &self,
        node: &str,
        spec: &EgressSpec,
        resolvers: Vec<Ipv4Addr>,
    ) -> Result<PodEgress, AgentError> {
        let egress = spec.rules().map_err(|m| failed(node, 400, m))?;
        let mut east_west = self.cluster_ranges.clone();
        let own = podnet::node_addresses().map_err(|e| runtime_error(node, e))?;
        east_west.extend(own.into_iter().filter_map(|a| Cidr::new(a, 32)));
        Ok(PodEgress {
            allow_internet: spec.allow_internet,
            egress,
            resolvers,
            east_west,
        })
    }

    fn egress_record(&self, id: &str) -> PathBuf {
        self.egress_dir.join(format!("{id}.json"))
    }

    /// Installs the request's policy in the Pod's namespace, before any process of the
    /// sandbox exists, and records it for live updates. Resolvers come from the root's lower
    /// layers (the template's), not from a file the sandbox can write.
    pub(super) fn install_egress(
        &self,
        node: &str,
        req: &CreateRequest,
        netns: &Path,
        lower_dirs: &[PathBuf],
    ) -> Result<(), AgentError> {
        let resolvers = lower_dirs
            .iter()
            .chain(
                self.templates
                    .get("base")
                    .map(|b| &b.lower_dirs)
                    .into_iter()
                    .flatten(),
            )
            .find_map(|d| std::fs::read_to_string(d.join("etc/resolv.conf")).ok())
            .map(|conf| podnet::resolvers_in(&conf))
            .unwrap_or_default();
        let egress = self.pod_egress(node, &req.network, resolvers)?;
        podnet::apply_pod_egress(netns, &egress).map_err(|e| runtime_error(node, e))?;
        let record = self.egress_record(&req.id);
        std::fs::write(
            &record,
            serde_json::to_vec(&egress).expect("policy serializes"),
        )
        .map_err(|e| failed(node, 500, format!("recording the egress policy: {e}")))
    }

    pub(super) fn target(&self, node: &str, req: &CreateRequest) -> Result<PodTarget, AgentError> {
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
        if let Some(checkpoint) = &req.restore_from {
            return self.create_fork(node, req, checkpoint).await;
        }
        let image = match &req.image {
            Some(reference) => Some(
                self.images
                    .get(
                        reference,
                        req.registry_credentials.as_ref(),
                        req.image_pull_policy.unwrap_or_default(),
                    )
                    .await
                    .map_err(|e| failed(node, IMAGE_PULL_FAILED, e.to_string()))?,
            ),
            None => None,
        };
        let template = req.template.as_deref().unwrap_or("base");
        let rootfs = match &image {
            Some(i) => Some(i.rootfs.clone()),
            None => self.templates.get(template).cloned(),
        };
        let rootfs = rootfs.ok_or_else(|| {
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
        // The policy is in force before the sandbox's first process exists: no moment runs
        // unfiltered.
        self.install_egress(node, req, &target.netns, &rootfs.lower_dirs)?;
        let spec = SandboxSpec {
            id: req.id.clone(),
            rootfs,
            resources: self.resources(req),
            network: NetworkPolicy::default(),
            envd: match &image {
                // As single-host image templates: the image's config, the request's env vars
                // winning over the image's.
                Some(i) => EnvdSettings {
                    env_vars: i
                        .env
                        .clone()
                        .into_iter()
                        .chain(req.env_vars.clone())
                        .collect(),
                    access_token: req.access_token.clone(),
                    admin_token: req.admin_token.clone(),
                    default_user: i.user.clone(),
                    start_command: i.start_command.clone(),
                    default_cwd: i.workdir.clone(),
                },
                None => EnvdSettings {
                    env_vars: req.env_vars.clone(),
                    access_token: req.access_token.clone(),
                    admin_token: req.admin_token.clone(),
                    default_user: "user".into(),
                    ..Default::default()
                },
            },
        };
        let p = self
            .rt
            .create(&spec, &target)
            .await
            .map_err(|e| runtime_error(node, e))?;
        super::local_fork::write_token(
            &self.tokens_dir,
            "sandbox",
            &req.id,
            req.admin_token.as_deref(),
        );
        tracing::info!(sandbox = %req.id, pod = %req.pod.name, pid = p.init_pid, image = ?image.as_ref().map(|i| &i.digest), "sandbox started in pod");
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
        // Its forks' envd is re-keyed with the source's admin token.
        let admin = super::local_fork::read_token(&self.tokens_dir, "sandbox", id);
        super::local_fork::write_token(
            &self.tokens_dir,
            "checkpoint",
            &req.checkpoint_id,
            admin.as_deref(),
        );
        Ok(CheckpointInfo {
            checkpoint_id: req.checkpoint_id.clone(),
            size_bytes: info.image_bytes + info.fs_bytes,
            duration_ms: info.duration.as_millis() as u64,
        })
    }

    async fn delete_checkpoint(&self, node: &str, checkpoint_id: &str) -> Result<(), AgentError> {
        super::local_fork::write_token(&self.tokens_dir, "checkpoint", checkpoint_id, None);
        self.rt
            .delete_checkpoint(checkpoint_id)
            .await
            .map_err(|e| runtime_error(node, e))
    }

    async fn commit(
        &self,
        node: &str,
        id: &str,
        req: &CommitRequest,
    ) -> Result<CommitInfo, AgentError> {
        let bad = |m: String| failed(node, 400, m);
        if req.commit_id.is_empty()
            || !req
                .commit_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(bad(format!("invalid commit id {:?}", req.commit_id)));
        }
        warren_image::commit::validate_image_name(&req.image).map_err(|e| bad(e.to_string()))?;
        if req.push && !req.registry_secrets.is_empty() && req.registry_credentials.is_none() {
            // The agent holds no Kubernetes credentials: the operator reads the Secrets.
            return Err(failed(
                node,
                400,
                format!(
                    "registryAuth.secrets {} came without their credentials (the operator \
                     reads the Secrets and passes the registry's entry; the node agent reads \
                     none)",
                    req.registry_secrets.join(", ")
                ),
            ));
        }
        let record = self.commits_dir.join(format!("{}.json", req.commit_id));
        if let Some(done) = std::fs::read(&record)
            .ok()
            .and_then(|b| serde_json::from_slice::<CommitInfo>(&b).ok())
        {
            return Ok(done);
        }
        let (upper, lowers, binds) = self
            .rt
            .commit_source(id)
            .map_err(|e| runtime_error(node, e))?;
        let image_err = |e: warren_image::commit::CommitError| failed(node, 500, e.to_string());
        let join_err = |e: tokio::task::JoinError| failed(node, 500, format!("commit task: {e}"));
        let t0 = std::time::Instant::now();
        // As single-host commits: copy while running, then freeze only for the rescan.
        let (c, up) = (self.committer.clone(), upper.clone());
        let mut pre = tokio::task::spawn_blocking(move || c.pre_copy(&up))
            .await
            .map_err(join_err)?
            .map_err(image_err)?;
        self.rt
            .freeze(id)
            .await
            .map_err(|e| runtime_error(node, e))?;
        let (c, up) = (self.committer.clone(), upper.clone());
        let res = tokio::task::spawn_blocking(move || {
            let copied = c.frozen_pass(&up, &mut pre);
            (copied, pre)
        })
        .await;
        // A sandbox left frozen would hang every call: thaw before looking at the result.
        self.rt.thaw(id).await.map_err(|e| runtime_error(node, e))?;
        let (copied, pre) = res.map_err(join_err)?;
        copied.map_err(image_err)?;
        let base = warren_image::commit::Base::Dirs {
            lower_dirs: lowers.into_iter().rev().collect(),
            host_binds: binds.into_iter().map(|b| (b.source, b.target)).collect(),
            user: Some("user".into()),
            start_command: None,
        };
        let (c, image) = (self.committer.clone(), req.image.clone());
        let created_by = format!("warren commit {} of sandbox {id}", req.commit_id);
        let done = tokio::task::spawn_blocking(move || {
            let staged = c.finish_staging(pre)?;
            c.finish_commit(staged, &base, &image, &created_by)
        })
        .await
        .map_err(join_err)?
        .map_err(image_err)?;
        if req.push {
            let creds = req
                .registry_credentials
                .as_ref()
                .map(|c| (c.username.clone(), c.password.clone()));
            warren_image::push::push_image(self.committer.store(), &req.image, creds)
                .await
                .map_err(|e| {
                    failed(
                        node,
                        502,
                        format!(
                            "image {} is in the node's store, but the push failed: {e}",
                            req.image
                        ),
                    )
                })?;
        }
        let info = CommitInfo {
            digest: done.digest,
            size_bytes: done.image_size,
            duration_ms: t0.elapsed().as_millis() as u64,
        };
        let tmp = self.commits_dir.join(format!(".{}.tmp", req.commit_id));
        let json = serde_json::to_vec(&info).expect("commit info serializes");
        std::fs::write(&tmp, json)
            .and_then(|()| std::fs::rename(&tmp, &record))
            .map_err(|e| failed(node, 500, format!("recording commit: {e}")))?;
        Ok(info)
    }

    async fn delete(&self, node: &str, id: &str) -> Result<(), AgentError> {
        super::local_fork::write_token(&self.tokens_dir, "sandbox", id, None);
        self.rt
            .destroy(id)
            .await
            .map_err(|e| runtime_error(node, e))?;
        // The table goes with the Pod's namespace; only our record of it is left to remove.
        match std::fs::remove_file(self.egress_record(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(failed(
                node,
                500,
                format!("removing the egress record of {id}: {e}"),
            )),
            _ => Ok(()),
        }
    }

    async fn update_network(
        &self,
        node: &str,
        id: &str,
        req: &NetworkUpdateRequest,
    ) -> Result<(), AgentError> {
        let Some(placement) = self.rt.placement(id) else {
            return Err(AgentError::NotFound {
                node: node.into(),
                message: format!("no sandbox {id} on this node"),
            });
        };
        let record = self.egress_record(id);
        let resolvers = std::fs::read(&record)
            .ok()
            .and_then(|b| serde_json::from_slice::<PodEgress>(&b).ok())
            .map(|p| p.resolvers)
            .unwrap_or_default();
        let egress = self.pod_egress(node, &req.network, resolvers)?;
        // The Pod's namespace: given, or the one the sandbox's init lives in, or (hibernated:
        // no process) the one of a process of the Pod.
        let netns = match &req.netns {
            Some(n) => n.clone(),
            None if self.rt.is_alive(id) && !self.rt.is_hibernated(id) => {
                PathBuf::from(format!("/proc/{}/ns/net", placement.init_pid))
            }
            None => {
                let (_, pid) = find_pod(Path::new("/proc"), &req.pod.uid).ok_or_else(|| {
                    failed(
                        node,
                        409,
                        format!(
                            "sandbox {id} runs no process and pod uid {:?} has none on this node",
                            req.pod.uid
                        ),
                    )
                })?;
                PathBuf::from(format!("/proc/{pid}/ns/net"))
            }
        };
        podnet::apply_pod_egress(&netns, &egress).map_err(|e| runtime_error(node, e))?;
        std::fs::write(
            &record,
            serde_json::to_vec(&egress).expect("policy serializes"),
        )
        .map_err(|e| failed(node, 500, format!("recording the egress policy: {e}")))?;
        tracing::info!(sandbox = %id, policy = %req.network.describe(), "egress policy replaced");
        Ok(())
    }

    async fn metrics(
        &self,
        node: &str,
        id: &str,
    ) -> Result<warren_runtime::SandboxStats, AgentError> {
        self.rt.stats(id).await.map_err(|e| runtime_error(node, e))
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
