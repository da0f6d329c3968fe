//! E2B forks in cluster mode, and restores of a Checkpoint (a child module of [`super`], whose
//! routes add these handlers):
//!
//! * `POST /sandboxes/{id}/fork` `{"count"?, "timeout"?}` → 201 with one `{"sandbox": ...}` or
//!   `{"error": {"code", "message"}}` per fork (single-host mode's answer and limits): a
//!   Checkpoint of the sandbox (memory and filesystem, running on), answered once it has
//!   succeeded, then `count` Sandboxes with `restoreFrom` naming it, each answered once `Ready` or
//!   failed (a failed fork is deleted, as a failed create is);
//! * `POST /warren/v1/checkpoints/{name}/restore` `{"count"?, "timeout"?, "metadata"?,
//!   "envVars"?}`: the same per-item answer, from an existing Checkpoint.
//!
//! Lifetime of a fork's Checkpoint: single-host mode collects it once no sandbox uses its files.
//! Here the forks own it: once they are created, the Checkpoint's `ownerReferences` name every
//! fork, so Kubernetes' garbage collector deletes it when the last fork is gone (a fork's Sandbox
//! is gone only after its finalizer removed it from the node, so the node agent, which refuses to
//! delete files a sandbox still stacks, then lets the images go). A fork request whose forks all
//! failed deletes it at once. It carries label [`LABEL_FORK_OF`] (the source sandbox), so that
//! `GET /snapshots` does not list it, as single-host mode does not; should the API replica die
//! between the Checkpoint and the owner references, that label finds the leftover.
//!
//! Deleting a snapshot that forks still use answers 409 (single-host mode's message), see
//! [`ClusterApi::refuse_if_in_use`].

use super::{
    check_key, kube_error, new_id, rfc3339, timeout_secs, ApiError, ClusterApi, SandboxJson,
    Shared, ANNOTATION_STARTED, ANNOTATION_TEMPLATE, METADATA_PREFIX,
};
use crate::checkpoint::REASON_IN_USE;
use crate::claim::ANNOTATION_CLAIMED_BY;
use crate::conditions;
use crate::crd::{
    Checkpoint, CheckpointContent, CheckpointPhase, CheckpointSpec, Sandbox, SandboxPhase,
    SandboxSpec, API_VERSION,
};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{Duration as ChronoDuration, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;

/// Label on a fork's Checkpoint: the sandbox it was taken of.
pub const LABEL_FORK_OF: &str = "warren.dev/fork-of";
/// Annotation on a Checkpoint of a fork (a Sandbox with `restoreFrom`): the Checkpoint whose
/// files its own stack on, which the node keeps while this one exists.
pub const ANNOTATION_STACKS: &str = "warren.dev/stacks-on";
/// Most forks (or restores) of one request, as single-host mode allows.
pub const MAX_FORKS: i64 = 100;

#[derive(Debug, Default, Deserialize)]
pub struct ForkBody {
    /// How many forks (1 by default).
    pub count: Option<i64>,
    /// Seconds each fork lives.
    pub timeout: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreBody {
    pub count: Option<i64>,
    pub timeout: Option<i64>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub env_vars: BTreeMap<String, String>,
}

/// One fork's outcome, as E2B's `SandboxForkResult`: `sandbox` or `error`.
#[derive(Debug, Serialize)]
pub struct ForkResult {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<SandboxJson>,
    /// `{"code": <HTTP status>, "message": "..."}`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<serde_json::Value>,
}

impl From<Result<SandboxJson, ApiError>> for ForkResult {
    fn from(r: Result<SandboxJson, ApiError>) -> Self {
        match r {
            Ok(s) => ForkResult {
                sandbox: Some(s),
                error: None,
            },
            Err(e) => ForkResult {
                sandbox: None,
                error: Some(json!({"code": e.code, "message": e.message})),
            },
        }
    }
}

fn count_of(count: Option<i64>) -> Result<usize, ApiError> {
    let n = count.unwrap_or(1);
    if !(1..=MAX_FORKS).contains(&n) {
        return Err(ApiError::new(
            400,
            format!("count must be between 1 and {MAX_FORKS} (got {n})"),
        ));
    }
    Ok(n as usize)
}

fn parse_body<T: for<'de> Deserialize<'de> + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::new(400, format!("invalid request body: {e}")))
}

/// What the restores of one request get.
struct Restore<'a> {
    checkpoint: &'a str,
    count: usize,
    timeout: i64,
    metadata: BTreeMap<String, String>,
    env_vars: BTreeMap<String, String>,
    /// A fork's own Checkpoint: the forks become its owners (or it goes, if none was made).
    owned: bool,
    /// The egress policy of the forks: their source's, as single-host forks keep it.
    network: crate::agent::EgressSpec,
}

/// Where a fork is: `None` while it is starting.
fn outcome(id: &str, s: &Sandbox) -> Option<Result<(), ApiError>> {
    let st = s.status.as_ref()?;
    if conditions::is_true(&st.conditions, "Ready") && !s.spec.paused {
        return Some(Ok(()));
    }
    if st.phase == SandboxPhase::Failed {
        let why = conditions::find(&st.conditions, "Ready")
            .map(|c| format!("{}: {}", c.reason, c.message))
            .or_else(|| st.message.clone())
            .unwrap_or_else(|| "failed".into());
        return Some(Err(ApiError::new(
            500,
            format!("sandbox {id} failed: {why}"),
        )));
    }
    None
}

impl ClusterApi {
    /// E2B's `sbx.fork(count)`: checkpoints sandbox `id` (which runs on) and restores it `count`
    /// times.
    pub async fn fork(&self, id: &str, body: ForkBody) -> Result<Vec<ForkResult>, ApiError> {
        let count = count_of(body.count)?;
        let timeout = timeout_secs(body.timeout)?;
        let src = self.get_visible(id).await?;
        let suffix: String = new_id()?.chars().skip(1).take(8).collect();
        let name = format!("fork-{id}-{suffix}");
        let mut c = Checkpoint::new(
            &name,
            CheckpointSpec {
                sandbox_name: id.to_string(),
                pod_name: None,
                keep_running: true,
                persistent_contents: vec![CheckpointContent::Memory, CheckpointContent::Filesystem],
                ttl_after_finished: None,
            },
        );
        c.metadata.namespace = self.sandboxes.namespace().map(str::to_string);
        // A label value holds at most 63 characters; the label's presence is what counts.
        let of: String = id.chars().take(63).collect();
        let of = of.trim_end_matches(['-', '.']).to_string();
        c.labels_mut().insert(LABEL_FORK_OF.into(), of);
        note_stacking(&mut c, &src);
        let api = self.namespaced::<Checkpoint>();
        api.create(&PostParams::default(), &c)
            .await
            .map_err(|e| fork_error("create checkpoint for", id, e))?;
        if let Err(e) = self.wait_checkpoint(&name, id).await {
            // Nothing forks from it, and nobody else knows its name.
            let _ = api.delete(&name, &DeleteParams::default()).await;
            return Err(e);
        }
        let restore = Restore {
            checkpoint: &name,
            count,
            timeout,
            // The forks are the source's: its E2B metadata and env vars go with them.
            metadata: super::metadata_of(&src),
            env_vars: src.spec.env_vars.clone(),
            owned: true,
            network: crate::sandbox_network::egress_of(&src.spec),
        };
        self.restore_many(restore).await
    }

    /// `count` Sandboxes from Checkpoint `name`, each continuing from its state.
    pub async fn restore(
        &self,
        name: &str,
        body: RestoreBody,
    ) -> Result<Vec<ForkResult>, ApiError> {
        let count = count_of(body.count)?;
        let timeout = timeout_secs(body.timeout)?;
        for k in body.env_vars.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(ApiError::new(
                    400,
                    format!("invalid environment variable {k:?}"),
                ));
            }
        }
        // A missing or unusable checkpoint fails the request as a whole, not each item.
        let c = self
            .namespaced::<Checkpoint>()
            .get_opt(name)
            .await
            .map_err(|e| ApiError::new(502, format!("get checkpoint {name}: {e}")))?
            .ok_or_else(|| ApiError::new(404, format!("checkpoint {name} not found")))?;
        let phase = c.status.as_ref().map(|s| s.phase).unwrap_or_default();
        if c.metadata.deletion_timestamp.is_some() || phase != CheckpointPhase::Succeeded {
            let phase = if c.metadata.deletion_timestamp.is_some() {
                CheckpointPhase::Terminating
            } else {
                phase
            };
            return Err(ApiError::new(
                409,
                format!("checkpoint {name} is {phase:?}, not usable"),
            ));
        }
        // The source's policy while it exists (a Checkpoint does not record it; a restore of one
        // whose source is gone gets the default policy, which still closes the cluster).
        let network = match self.sandboxes.get_opt(&c.spec.sandbox_name).await {
            Ok(Some(src)) => crate::sandbox_network::egress_of(&src.spec),
            _ => crate::agent::EgressSpec::default(),
        };
        let restore = Restore {
            checkpoint: name,
            count,
            timeout,
            metadata: body.metadata,
            env_vars: body.env_vars,
            owned: false,
            network,
        };
        self.restore_many(restore).await
    }

    /// Waits until Checkpoint `name` of sandbox `id` has succeeded.
    async fn wait_checkpoint(&self, name: &str, id: &str) -> Result<(), ApiError> {
        let outcome = self
            .checkpoint_outcome(name, |e| fork_error("wait for the checkpoint of", id, e))
            .await?;
        match outcome {
            Some(Ok(_)) => Ok(()),
            Some(Err(c)) => Err(ApiError::new(
                500,
                format!(
                    "checkpoint of sandbox {id} for the fork failed: {}",
                    c.status
                        .and_then(|s| s.message)
                        .as_deref()
                        .unwrap_or("no reason given")
                ),
            )),
            None => Err(ApiError::new(
                504,
                format!(
                    "checkpoint of sandbox {id} for the fork did not succeed within {}s",
                    self.ready_timeout.as_secs()
                ),
            )),
        }
    }

    /// Creates the Sandboxes of `r`, then waits for all of them (one deadline); one result per
    /// Sandbox, in order. Forks that failed or did not get ready in time are deleted.
    async fn restore_many(&self, r: Restore<'_>) -> Result<Vec<ForkResult>, ApiError> {
        let now = Utc::now();
        let shutdown = rfc3339(now + ChronoDuration::seconds(r.timeout));
        let mut forks: Vec<Result<(String, Option<String>), ApiError>> = Vec::new();
        for _ in 0..r.count {
            let id = match new_id() {
                Ok(id) => id,
                Err(e) => {
                    forks.push(Err(e));
                    continue;
                }
            };
            let mut s = Sandbox::new(
                &id,
                SandboxSpec {
                    restore_from: Some(r.checkpoint.to_string()),
                    shutdown_time: Some(shutdown.clone()),
                    env_vars: r.env_vars.clone(),
                    ..Default::default()
                },
            );
            crate::cluster_network::set_spec(&mut s.spec, &r.network);
            let ann = s.annotations_mut();
            // As single-host mode answers: a restore's templateID is its checkpoint.
            ann.insert(ANNOTATION_TEMPLATE.into(), r.checkpoint.to_string());
            ann.insert(ANNOTATION_STARTED.into(), rfc3339(now));
            ann.insert(ANNOTATION_CLAIMED_BY.into(), "e2b-api".into());
            for (k, v) in &r.metadata {
                ann.insert(format!("{METADATA_PREFIX}{k}"), v.clone());
            }
            forks.push(
                match self.sandboxes.create(&PostParams::default(), &s).await {
                    Ok(created) => Ok((id, created.uid())),
                    Err(e) => Err(kube_error("create", &id, e)),
                },
            );
        }
        if r.owned {
            self.own(r.checkpoint, &forks).await?;
        }
        let mut results: Vec<Option<Result<SandboxJson, ApiError>>> = Vec::new();
        let mut pending = Vec::new();
        for (i, f) in forks.into_iter().enumerate() {
            match f {
                Ok((id, _)) => {
                    results.push(None);
                    pending.push((i, id));
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        let deadline = tokio::time::Instant::now() + self.ready_timeout;
        while !pending.is_empty() {
            let mut still = Vec::new();
            for (i, id) in pending {
                let done = match self.sandboxes.get(&id).await {
                    Ok(s) => outcome(&id, &s).map(|o| o.map(|()| self.json(&s))),
                    Err(e) => Some(Err(kube_error("wait for", &id, e))),
                };
                match done {
                    Some(res) => {
                        if res.is_err() {
                            // Nobody holds its id: do not leave it (nor its hold on the
                            // checkpoint).
                            let _ = self.sandboxes.delete(&id, &DeleteParams::default()).await;
                        }
                        results[i] = Some(res);
                    }
                    None => still.push((i, id)),
                }
            }
            pending = still;
            if pending.is_empty() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                for (i, id) in pending {
                    let _ = self.sandboxes.delete(&id, &DeleteParams::default()).await;
                    results[i] = Some(Err(ApiError::new(
                        504,
                        format!(
                            "sandbox {id} was not ready within {}s",
                            self.ready_timeout.as_secs()
                        ),
                    )));
                }
                break;
            }
            tokio::time::sleep(self.poll).await;
        }
        Ok(results
            .into_iter()
            .map(|r| {
                ForkResult::from(
                    r.unwrap_or_else(|| Err(ApiError::new(500, "fork has no outcome"))),
                )
            })
            .collect())
    }

    /// Makes the forks that were created the owners of their Checkpoint (see the module's doc);
    /// deletes the Checkpoint when none was.
    async fn own(
        &self,
        checkpoint: &str,
        forks: &[Result<(String, Option<String>), ApiError>],
    ) -> Result<(), ApiError> {
        let owners: Vec<OwnerReference> = forks
            .iter()
            .filter_map(|f| f.as_ref().ok())
            .filter_map(|(id, uid)| {
                Some(OwnerReference {
                    api_version: API_VERSION.into(),
                    kind: "Sandbox".into(),
                    name: id.clone(),
                    uid: uid.clone()?,
                    ..Default::default()
                })
            })
            .collect();
        let api = self.namespaced::<Checkpoint>();
        if owners.is_empty() {
            let _ = api.delete(checkpoint, &DeleteParams::default()).await;
            return Ok(());
        }
        let patch = json!({"metadata": {"ownerReferences": owners}});
        if let Err(e) = api
            .patch(checkpoint, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            // Unowned, it would outlive the forks: undo the request instead.
            for (id, _) in forks.iter().filter_map(|f| f.as_ref().ok()) {
                let _ = self.sandboxes.delete(id, &DeleteParams::default()).await;
            }
            let _ = api.delete(checkpoint, &DeleteParams::default()).await;
            return Err(ApiError::new(
                502,
                format!("making the forks own checkpoint {checkpoint}: Kubernetes API error: {e}"),
            ));
        }
        Ok(())
    }

    /// Refuses (409, single-host mode's message) to delete Checkpoint `name` while Sandboxes
    /// restored from it, or Checkpoints of such forks, exist: deleting it would leave a
    /// Checkpoint stuck in `Terminating` (the node agent refuses to delete files that a sandbox
    /// or a checkpoint on the node stacks) and no snapshot to fork from.
    pub async fn refuse_if_in_use(&self, name: &str) -> Result<(), ApiError> {
        let users: Vec<String> = self
            .sandboxes
            .list(&ListParams::default())
            .await
            .map_err(|e| ApiError::new(502, format!("listing sandboxes: {e}")))?
            .items
            .into_iter()
            .filter(|s| s.metadata.deletion_timestamp.is_none())
            .filter(|s| s.spec.restore_from.as_deref() == Some(name))
            .map(|s| s.name_any())
            .collect();
        if !users.is_empty() {
            return Err(ApiError::new(
                409,
                format!(
                    "checkpoint {name} holds the files of sandboxes {}: kill them first",
                    users.join(", ")
                ),
            ));
        }
        // Checkpoints of its forks (the forks may be gone): their files stack on its own.
        let stacked: Vec<String> = self
            .namespaced::<Checkpoint>()
            .list(&ListParams::default())
            .await
            .map_err(|e| ApiError::new(502, format!("listing checkpoints: {e}")))?
            .items
            .into_iter()
            .filter(|c| c.metadata.deletion_timestamp.is_none())
            .filter(|c| c.annotations().get(ANNOTATION_STACKS).map(String::as_str) == Some(name))
            .map(|c| c.name_any())
            .collect();
        if stacked.is_empty() {
            return Ok(());
        }
        Err(ApiError::new(
            409,
            format!(
                "checkpoint {name} holds the files of checkpoints {}: delete them first",
                stacked.join(", ")
            ),
        ))
    }
}

/// Marks checkpoint `c` of sandbox `src` as stacking on the Checkpoint `src` was restored from.
pub fn note_stacking(c: &mut Checkpoint, src: &Sandbox) {
    if let Some(parent) = &src.spec.restore_from {
        c.annotations_mut()
            .insert(ANNOTATION_STACKS.into(), parent.clone());
    }
}

/// The answer to a delete of a Checkpoint that the API server kept (it has a finalizer): 409 with
/// the node agent's words when the operator found its images in use on the node (a sandbox or a
/// checkpoint there still stacks them, e.g. a checkpoint of a fork that is gone), so that the
/// SDK hears what single-host mode says; else the delete goes on.
pub fn in_use_after_delete(c: &Checkpoint) -> Result<(), ApiError> {
    let st = c.status.clone().unwrap_or_default();
    match conditions::find(&st.conditions, "Ready") {
        Some(r) if r.reason == REASON_IN_USE && !r.message.is_empty() => {
            Err(ApiError::new(409, r.message.clone()))
        }
        _ => Ok(()),
    }
}

fn fork_error(what: &str, id: &str, e: kube::Error) -> ApiError {
    if crate::error::is_not_found(&e) {
        return ApiError::new(404, format!("sandbox {id} not found"));
    }
    ApiError::new(
        502,
        format!("{what} sandbox {id}: Kubernetes API error: {e}"),
    )
}

pub(super) async fn h_fork(
    State(api): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check_key(&api, &headers)?;
    let items = api.fork(&id, parse_body(&body)?).await?;
    Ok((StatusCode::CREATED, Json(items)).into_response())
}

pub(super) async fn h_restore(
    State(api): State<Shared>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check_key(&api, &headers)?;
    let items = api.restore(&name, parse_body(&body)?).await?;
    Ok((StatusCode::CREATED, Json(items)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_bounded_as_on_one_host() {
        assert_eq!(count_of(None).unwrap(), 1);
        assert_eq!(count_of(Some(100)).unwrap(), 100);
        for bad in [0, -1, 101] {
            let e = count_of(Some(bad)).unwrap_err();
            assert_eq!(e.code, 400);
            assert_eq!(
                e.message,
                format!("count must be between 1 and 100 (got {bad})")
            );
        }
    }
}
