//! `/warren/v1/checkpoints` and `/warren/v1/commits` in cluster mode: list, get, create and delete
//! over the `Checkpoint` and `Commit` resources, with the JSON shapes, status codes and error
//! messages of single-host mode (`crates/api/src/{checkpoints,commits}.rs`), so `warren
//! checkpoint ...` and `warren commit ...` work the same against a cluster API.
//!
//! The bodies are single-host's objects ([`warren_core::checkpoint::Checkpoint`],
//! [`warren_core::commit::Commit`]), parsed and validated with single-host's code, translated
//! into the custom resources the operator reconciles, and translated back on the way out:
//!
//! * a checkpoint is synchronous, as in single-host mode: `POST` answers 201 once the operator
//!   reports it `Succeeded`; a failed one is deleted (single-host mode stores nothing) and its
//!   reason is the error;
//! * a commit is a job: `POST` answers 202 with phase `Pending`; clients poll `GET`.
//!
//! Objects being deleted are gone for the API (404, not listed).

use super::{check_key, ApiError, ClusterApi, Shared};
use crate::conditions;
use crate::crd::{self, CheckpointContent, CheckpointPhase, JobPhase, SandboxPhase};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::Resource;
use warren_core::checkpoint::{
    Checkpoint, CheckpointPhase as HostCheckpointPhase, CheckpointSpec, CheckpointStatus,
};
use warren_core::commit::{Commit, CommitPhase, CommitSpec, CommitStatus, RegistryAuth, SecretRef};
use warren_core::objects::ObjectMeta;

fn time(s: &str) -> Option<DateTime<Utc>> {
    s.parse().ok()
}

fn created_at<K: Resource>(obj: &K) -> Option<DateTime<Utc>> {
    obj.meta()
        .creation_timestamp
        .as_ref()
        .and_then(|t| time(&t.0.to_string()))
}

fn meta<K: Resource>(obj: &K) -> ObjectMeta {
    ObjectMeta {
        name: obj.meta().name.clone().unwrap_or_default(),
        labels: obj.meta().labels.clone().unwrap_or_default(),
        annotations: obj.meta().annotations.clone().unwrap_or_default(),
        // Single-host objects name no namespace unless given; the API's is implied.
        namespace: None,
    }
}

/// When a finished job with `ttl` that completed at `done` is collected.
fn expires(ttl: Option<&str>, done: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    let ttl = crate::jobs::parse_ttl("ttl", ttl?).ok()?;
    Some(done? + chrono::Duration::from_std(ttl).ok()?)
}

/// The single-host shape of a `Checkpoint` resource.
pub fn checkpoint_json(c: &crd::Checkpoint) -> Checkpoint {
    let st = c.status.clone().unwrap_or_default();
    let contents = if c.spec.persistent_contents.is_empty() {
        vec!["memory".into(), "filesystem".into()]
    } else {
        c.spec
            .persistent_contents
            .iter()
            .map(|k| {
                match k {
                    CheckpointContent::Memory => "memory",
                    CheckpointContent::Filesystem => "filesystem",
                    CheckpointContent::PodInfo => "podInfo",
                }
                .to_string()
            })
            .collect()
    };
    let completed = st.completion_time.as_deref().and_then(time);
    Checkpoint {
        api_version: warren_core::objects::API_VERSION.into(),
        kind: "Checkpoint".into(),
        metadata: meta(c),
        spec: CheckpointSpec {
            sandbox: c.spec.sandbox_name.clone(),
            container_name: None,
            keep_running: c.spec.keep_running,
            ttl_after_finished: c.spec.ttl_after_finished.clone(),
            persistent_contents: contents,
        },
        status: CheckpointStatus {
            phase: match st.phase {
                CheckpointPhase::Pending => HostCheckpointPhase::Pending,
                CheckpointPhase::Creating | CheckpointPhase::Terminating => {
                    HostCheckpointPhase::Running
                }
                CheckpointPhase::Succeeded => HostCheckpointPhase::Succeeded,
                CheckpointPhase::Failed => HostCheckpointPhase::Failed,
            },
            size: st.size_bytes.map(|b| b.max(0) as u64),
            duration_ms: st.duration_ms.map(|d| d as f64),
            message: st.message.clone(),
            created_at: created_at(c),
            completed_at: completed,
            expires_at: expires(c.spec.ttl_after_finished.as_deref(), completed),
            ..Default::default()
        },
    }
}

/// The single-host shape of a `Commit` resource.
pub fn commit_json(c: &crd::Commit) -> Commit {
    let st = c.status.clone().unwrap_or_default();
    let completed = st.completion_time.as_deref().and_then(time);
    let push = c.spec.push;
    Commit {
        api_version: warren_core::objects::API_VERSION.into(),
        kind: "Commit".into(),
        metadata: meta(c),
        spec: CommitSpec {
            sandbox: c.spec.pod_name.clone(),
            container_name: c.spec.container_name.clone(),
            image: c.spec.image.clone(),
            ttl: c.spec.ttl.clone(),
            registry_auth: c.spec.registry_auth.as_ref().map(|a| RegistryAuth {
                secrets: a.secrets.iter().cloned().map(SecretRef::Name).collect(),
            }),
            push,
        },
        status: CommitStatus {
            phase: match st.phase {
                JobPhase::Pending => CommitPhase::Pending,
                JobPhase::Running => CommitPhase::Running,
                JobPhase::Succeeded => CommitPhase::Succeeded,
                JobPhase::Failed => CommitPhase::Failed,
            },
            digest: st.commit_id.clone(),
            size: st.size_bytes.map(|b| b.max(0) as u64),
            message: st.message.clone(),
            total_duration_ms: st.duration_ms.map(|d| d as f64),
            pushed: (st.phase == JobPhase::Succeeded).then(|| {
                push.unwrap_or(
                    c.spec
                        .registry_auth
                        .as_ref()
                        .is_some_and(|a| !a.secrets.is_empty()),
                )
            }),
            created_at: st
                .start_time
                .as_deref()
                .and_then(time)
                .or_else(|| created_at(c)),
            completed_at: completed,
            expires_at: expires(c.spec.ttl.as_deref(), completed),
            ..Default::default()
        },
    }
}

/// Parses a request body as single-host mode does: `kind` must be `want` (the default).
fn parse<T: serde::de::DeserializeOwned>(body: &[u8], want: &str) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::new(400, format!("invalid request body: {e}")))?;
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or(want);
    if kind != want {
        return Err(ApiError::new(
            400,
            format!("kind is {kind:?}, expected \"{want}\" on this endpoint"),
        ));
    }
    serde_json::from_value(value).map_err(|e| ApiError::new(400, format!("invalid {want}: {e}")))
}

fn random_suffix() -> String {
    use std::io::Read;
    let mut b = [0u8; 4];
    // A name clash is a 409, never a wrong object: urandom failing only makes clashes likelier.
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    format!("{:08x}", u32::from_be_bytes(b))
}

/// The resource for a single-host checkpoint object.
fn checkpoint_resource(ck: &Checkpoint) -> crd::Checkpoint {
    let contents = ck
        .spec
        .persistent_contents
        .iter()
        .filter_map(|c| match c.as_str() {
            "memory" => Some(CheckpointContent::Memory),
            "filesystem" => Some(CheckpointContent::Filesystem),
            // `ip` is accepted and means nothing more here, as in single-host mode.
            _ => None,
        })
        .collect();
    let mut cr = crd::Checkpoint::new(
        &ck.metadata.name,
        crd::CheckpointSpec {
            sandbox_name: ck.spec.sandbox.clone(),
            pod_name: None,
            keep_running: ck.spec.keep_running,
            persistent_contents: contents,
            ttl_after_finished: ck.spec.ttl_after_finished.clone(),
        },
    );
    cr.metadata.labels = Some(ck.metadata.labels.clone()).filter(|l| !l.is_empty());
    cr.metadata.annotations = Some(ck.metadata.annotations.clone()).filter(|a| !a.is_empty());
    cr
}

/// The resource for a single-host commit object.
fn commit_resource(commit: &Commit) -> crd::Commit {
    let secrets: Vec<String> = commit.secrets().into_iter().map(String::from).collect();
    let mut cr = crd::Commit::new(
        &commit.metadata.name,
        crd::CommitSpec {
            pod_name: commit.spec.sandbox.clone(),
            container_name: commit.spec.container_name.clone(),
            image: commit.spec.image.clone(),
            timeout_seconds: None,
            ttl: commit.spec.ttl.clone(),
            registry_auth: (!secrets.is_empty()).then_some(crd::RegistryAuth { secrets }),
            push: commit.spec.push,
        },
    );
    cr.metadata.labels = Some(commit.metadata.labels.clone()).filter(|l| !l.is_empty());
    cr.metadata.annotations = Some(commit.metadata.annotations.clone()).filter(|a| !a.is_empty());
    cr
}

fn name_matches(url: &str, body: &str) -> Result<(), ApiError> {
    if url != body {
        return Err(ApiError::new(
            400,
            format!("metadata.name {body:?} does not match the URL's {url:?}"),
        ));
    }
    Ok(())
}

fn phase_word(p: SandboxPhase) -> String {
    format!("{p:?}").to_lowercase()
}

impl ClusterApi {
    fn job_error(&self, kind: &str, name: &str, e: kube::Error) -> ApiError {
        if crate::error::is_not_found(&e) {
            return ApiError::new(404, format!("{kind} {name} not found"));
        }
        if crate::error::is_conflict(&e) {
            return ApiError::new(409, format!("{kind} {name} already exists"));
        }
        ApiError::new(502, format!("{kind} {name}: Kubernetes API error: {e}"))
    }

    pub async fn list_checkpoints(&self) -> Result<Vec<Checkpoint>, ApiError> {
        let all = self
            .namespaced::<crd::Checkpoint>()
            .list(&ListParams::default())
            .await
            .map_err(|e| ApiError::new(502, format!("listing checkpoints: {e}")))?;
        Ok(all
            .items
            .iter()
            .filter(|c| c.meta().deletion_timestamp.is_none())
            .map(checkpoint_json)
            .collect())
    }

    pub async fn get_checkpoint(&self, name: &str) -> Result<Checkpoint, ApiError> {
        let c = self
            .namespaced::<crd::Checkpoint>()
            .get(name)
            .await
            .map_err(|e| self.job_error("checkpoint", name, e))?;
        if c.meta().deletion_timestamp.is_some() {
            return Err(ApiError::new(404, format!("checkpoint {name} not found")));
        }
        Ok(checkpoint_json(&c))
    }

    /// Deletes a checkpoint; as for a snapshot, 409 while forks (or their checkpoints) stack on
    /// its files, as single-host mode refuses.
    pub async fn delete_checkpoint(&self, name: &str) -> Result<(), ApiError> {
        self.get_checkpoint(name).await?;
        self.refuse_if_in_use(name).await?;
        match self
            .namespaced::<crd::Checkpoint>()
            .delete(name, &DeleteParams::default())
            .await
        {
            // Kept by its finalizer: the operator may have found its images in use on the node.
            Ok(kept) => kept
                .left()
                .map_or(Ok(()), |c| super::forks::in_use_after_delete(&c)),
            Err(e) => Err(self.job_error("checkpoint", name, e)),
        }
    }

    /// Takes a checkpoint; answers once the operator reports it taken (single-host semantics).
    pub async fn create_checkpoint(&self, mut ck: Checkpoint) -> Result<Checkpoint, ApiError> {
        if ck.metadata.name.is_empty() {
            ck.metadata.name = format!("checkpoint-{}", random_suffix());
        }
        ck.validate()
            .map_err(|e| ApiError::new(400, e.to_string()))?;
        let id = ck.spec.sandbox.clone();
        let s = self.get_visible(&id).await?;
        let st = s.status.clone().unwrap_or_default();
        let hibernated = conditions::find(&st.conditions, "Paused")
            .is_some_and(|c| c.status == "True" && c.reason == "Hibernated");
        if hibernated {
            return Err(ApiError::new(
                409,
                format!(
                    "sandbox {id} is hibernated: connect to it (which wakes it) before a checkpoint"
                ),
            ));
        }
        if !matches!(st.phase, SandboxPhase::Running | SandboxPhase::Paused) {
            return Err(ApiError::new(
                409,
                format!(
                    "sandbox {id} is {}: only running or paused sandboxes can be checkpointed",
                    phase_word(st.phase)
                ),
            ));
        }
        let name = ck.metadata.name.clone();
        let mut cr = checkpoint_resource(&ck);
        // A checkpoint of a fork stacks on its parent's files (the parent may not go first).
        super::forks::note_stacking(&mut cr, &s);
        let api = self.namespaced::<crd::Checkpoint>();
        api.create(&PostParams::default(), &cr)
            .await
            .map_err(|e| self.job_error("checkpoint", &name, e))?;
        match self
            .checkpoint_outcome(&name, |e| self.job_error("checkpoint", &name, e))
            .await?
        {
            Some(Ok(c)) => Ok(checkpoint_json(&c)),
            Some(Err(c)) => {
                // Single-host mode keeps no failed checkpoint: the error is the answer.
                let _ = api.delete(&name, &DeleteParams::default()).await;
                let st = c.status.unwrap_or_default();
                let reason = conditions::find(&st.conditions, "Ready")
                    .map(|c| c.reason.clone())
                    .unwrap_or_default();
                let code = match reason.as_str() {
                    "InvalidSpec" => 400,
                    "SandboxNotFound" => 404,
                    "SandboxFailed" => 409,
                    _ => 500,
                };
                let why = st.message.unwrap_or_else(|| "failed".into());
                Err(ApiError::new(
                    code,
                    format!("checkpoint {name} of sandbox {id} failed: {why}"),
                ))
            }
            None => Err(ApiError::new(
                504,
                format!(
                    "checkpoint {name} was not taken within {}s; follow it with GET /warren/v1/checkpoints/{name}",
                    self.ready_timeout.as_secs()
                ),
            )),
        }
    }

    /// Apply by name (`warren apply -f`): the same spec returns the existing checkpoint (200),
    /// another spec under the name is a conflict (a checkpoint is a one-off snapshot), a new
    /// name is taken (201).
    pub async fn apply_checkpoint(
        &self,
        name: &str,
        ck: Checkpoint,
    ) -> Result<(StatusCode, Checkpoint), ApiError> {
        name_matches(name, &ck.metadata.name)?;
        match self.namespaced::<crd::Checkpoint>().get_opt(name).await {
            Ok(Some(existing)) => {
                // Compared as stored: what the resource can hold of the submitted spec.
                let want = checkpoint_json(&checkpoint_resource(&ck)).spec;
                if existing.meta().deletion_timestamp.is_none()
                    && checkpoint_json(&existing).spec == want
                {
                    return Ok((StatusCode::OK, checkpoint_json(&existing)));
                }
                Err(ApiError::new(
                    409,
                    format!("checkpoint {name} exists with another spec; delete it first"),
                ))
            }
            Ok(None) => Ok((StatusCode::CREATED, self.create_checkpoint(ck).await?)),
            Err(e) => Err(self.job_error("checkpoint", name, e)),
        }
    }

    /// Apply by name: as [`ClusterApi::apply_checkpoint`], a new commit is started (202).
    pub async fn apply_commit(
        &self,
        name: &str,
        commit: Commit,
    ) -> Result<(StatusCode, Commit), ApiError> {
        name_matches(name, &commit.metadata.name)?;
        match self.namespaced::<crd::Commit>().get_opt(name).await {
            Ok(Some(existing)) => {
                let want = commit_json(&commit_resource(&commit)).spec;
                if existing.meta().deletion_timestamp.is_none()
                    && commit_json(&existing).spec == want
                {
                    return Ok((StatusCode::OK, commit_json(&existing)));
                }
                Err(ApiError::new(
                    409,
                    format!("commit {name} exists with another spec; delete it first"),
                ))
            }
            Ok(None) => Ok((StatusCode::ACCEPTED, self.create_commit(commit).await?)),
            Err(e) => Err(self.job_error("commit", name, e)),
        }
    }

    pub async fn list_commits(&self) -> Result<Vec<Commit>, ApiError> {
        let all = self
            .namespaced::<crd::Commit>()
            .list(&ListParams::default())
            .await
            .map_err(|e| ApiError::new(502, format!("listing commits: {e}")))?;
        Ok(all
            .items
            .iter()
            .filter(|c| c.meta().deletion_timestamp.is_none())
            .map(commit_json)
            .collect())
    }

    pub async fn get_commit(&self, name: &str) -> Result<Commit, ApiError> {
        let c = self
            .namespaced::<crd::Commit>()
            .get(name)
            .await
            .map_err(|e| self.job_error("commit", name, e))?;
        if c.meta().deletion_timestamp.is_some() {
            return Err(ApiError::new(404, format!("commit {name} not found")));
        }
        Ok(commit_json(&c))
    }

    pub async fn delete_commit(&self, name: &str) -> Result<(), ApiError> {
        self.get_commit(name).await?;
        self.namespaced::<crd::Commit>()
            .delete(name, &DeleteParams::default())
            .await
            .map_err(|e| self.job_error("commit", name, e))?;
        Ok(())
    }

    /// Starts a commit; answers with it in phase `Pending` (poll `GET` for the outcome).
    pub async fn create_commit(&self, mut commit: Commit) -> Result<Commit, ApiError> {
        if commit.metadata.name.is_empty() {
            commit.metadata.name = format!("commit-{}", random_suffix());
        }
        commit
            .validate()
            .map_err(|e| ApiError::new(400, e.to_string()))?;
        let id = commit.spec.sandbox.clone();
        let s = self.get_visible(&id).await?;
        let phase = s.status.as_ref().map(|st| st.phase).unwrap_or_default();
        if !matches!(phase, SandboxPhase::Running | SandboxPhase::Paused) {
            return Err(ApiError::new(
                409,
                format!(
                    "sandbox {id} is {}: only running, paused or hibernated sandboxes can be committed",
                    phase_word(phase)
                ),
            ));
        }
        let name = commit.metadata.name.clone();
        let cr = commit_resource(&commit);
        let created = self
            .namespaced::<crd::Commit>()
            .create(&PostParams::default(), &cr)
            .await
            .map_err(|e| self.job_error("commit", &name, e))?;
        Ok(commit_json(&created))
    }
}

pub(super) async fn h_list_checkpoints(
    State(api): State<Shared>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_key(&api, &headers)?;
    Ok(Json(api.list_checkpoints().await?).into_response())
}

pub(super) async fn h_create_checkpoint(
    State(api): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_key(&api, &headers)?;
    let c: Checkpoint = parse(&body, "Checkpoint")?;
    Ok((StatusCode::CREATED, Json(api.create_checkpoint(c).await?)).into_response())
}

pub(super) async fn h_get_checkpoint(
    State(api): State<Shared>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    check_key(&api, &headers)?;
    Ok(Json(api.get_checkpoint(&name).await?).into_response())
}

pub(super) async fn h_delete_checkpoint(
    State(api): State<Shared>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    check_key(&api, &headers)?;
    api.delete_checkpoint(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(super) async fn h_apply_checkpoint(
    State(api): State<Shared>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_key(&api, &headers)?;
    let c: Checkpoint = parse(&body, "Checkpoint")?;
    let (code, c) = api.apply_checkpoint(&name, c).await?;
    Ok((code, Json(c)).into_response())
}

pub(super) async fn h_apply_commit(
    State(api): State<Shared>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_key(&api, &headers)?;
    let c: Commit = parse(&body, "Commit")?;
    let (code, c) = api.apply_commit(&name, c).await?;
    Ok((code, Json(c)).into_response())
}

pub(super) async fn h_list_commits(
    State(api): State<Shared>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_key(&api, &headers)?;
    Ok(Json(api.list_commits().await?).into_response())
}

pub(super) async fn h_create_commit(
    State(api): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_key(&api, &headers)?;
    let c: Commit = parse(&body, "Commit")?;
    Ok((StatusCode::ACCEPTED, Json(api.create_commit(c).await?)).into_response())
}

pub(super) async fn h_get_commit(
    State(api): State<Shared>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    check_key(&api, &headers)?;
    Ok(Json(api.get_commit(&name).await?).into_response())
}

pub(super) async fn h_delete_commit(
    State(api): State<Shared>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    check_key(&api, &headers)?;
    api.delete_commit(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
