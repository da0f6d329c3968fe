//! E2B snapshots and forks in cluster mode, over `Checkpoint` resources (a child module of
//! [`super`], whose routes add these handlers):
//!
//! * `POST /sandboxes/{id}/snapshots` `{"name"?, "memory"?}` → 201 `{"snapshotID", "names"}`
//!   (single-host mode's shape): a Checkpoint of the sandbox with it running on (`memory: false`
//!   keeps only the filesystem), answered once it has `Succeeded`;
//! * `GET /snapshots?sandboxID=&name=&limit=&nextToken=` → the namespace's snapshots, paged with
//!   `x-next-token`;
//! * `DELETE /snapshots/{id}`, and `DELETE /templates/{id}` (the SDK's `delete_snapshot`),
//!   delete the Checkpoint;
//! * a create whose `templateID` names a Checkpoint (by name, or by its `status.checkpointId`)
//!   makes a Sandbox with `restoreFrom` (a fork, see [`crate::fork`]), answered once `Ready`.

use super::{check_key, new_id, ApiError, ClusterApi, Shared};
use crate::crd::{Checkpoint, CheckpointContent, CheckpointSpec};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kube::api::{DeleteParams, ListParams, PostParams};
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Deserialize)]
pub struct SnapshotBody {
    /// The snapshot's name (generated when absent).
    pub name: Option<String>,
    /// `false` keeps only the filesystem.
    pub memory: Option<bool>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct SnapshotInfo {
    #[serde(rename = "snapshotID")]
    pub snapshot_id: String,
    pub names: Vec<String>,
}

fn info(c: &Checkpoint) -> SnapshotInfo {
    let name = c.metadata.name.clone().unwrap_or_default();
    SnapshotInfo {
        snapshot_id: name.clone(),
        names: vec![name],
    }
}

/// A checkpoint id on a node: the Checkpoint's uid without dashes (see `crate::agent::node_id`).
fn looks_like_checkpoint_id(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// An object name Kubernetes takes (RFC 1123 subdomain, as Checkpoint names are).
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

fn ck_error(what: &str, name: &str, e: kube::Error) -> ApiError {
    if crate::error::is_not_found(&e) {
        return ApiError::new(404, format!("snapshot {name} not found"));
    }
    if crate::error::is_conflict(&e) {
        return ApiError::new(409, format!("snapshot {name} exists already"));
    }
    ApiError::new(
        502,
        format!("{what} snapshot {name}: Kubernetes API error: {e}"),
    )
}

impl ClusterApi {
    /// The Checkpoint a create's `templateID` names, by name or by checkpoint id; `None`: it
    /// names none (a pool or a template).
    pub(super) async fn checkpoint_named(
        &self,
        template: &str,
    ) -> Result<Option<String>, ApiError> {
        if !valid_name(template) {
            return Ok(None);
        }
        let api = self.namespaced::<Checkpoint>();
        if let Some(c) = api
            .get_opt(template)
            .await
            .map_err(|e| ck_error("look up", template, e))?
        {
            return Ok(c.metadata.name);
        }
        if !looks_like_checkpoint_id(template) {
            return Ok(None);
        }
        let all = api
            .list(&ListParams::default())
            .await
            .map_err(|e| ck_error("list for", template, e))?;
        Ok(all
            .items
            .into_iter()
            .find(|c| c.status.as_ref().and_then(|s| s.checkpoint_id.as_deref()) == Some(template))
            .and_then(|c| c.metadata.name))
    }

    /// Takes a Checkpoint of sandbox `id`, running on, and waits until it has succeeded.
    pub async fn create_snapshot(
        &self,
        id: &str,
        body: SnapshotBody,
    ) -> Result<SnapshotInfo, ApiError> {
        let name = match body.name.filter(|n| !n.is_empty()) {
            Some(n) if valid_name(&n) => n,
            Some(n) => {
                return Err(ApiError::new(
                    400,
                    format!(
                        "snapshot name {n:?} must be lowercase letters, digits, '-' and '.' \
                         (at most 253)"
                    ),
                ))
            }
            None => format!("snap-{}", new_id()?),
        };
        let src = self.get_visible(id).await?;
        let mut contents = vec![CheckpointContent::Filesystem];
        if body.memory.unwrap_or(true) {
            contents.insert(0, CheckpointContent::Memory);
        }
        let mut c = Checkpoint::new(
            &name,
            CheckpointSpec {
                sandbox_name: id.to_string(),
                pod_name: None,
                keep_running: true,
                persistent_contents: contents,
                ttl_after_finished: None,
            },
        );
        c.metadata.namespace = self.sandboxes.namespace().map(str::to_string);
        super::forks::note_stacking(&mut c, &src);
        let api = self.namespaced::<Checkpoint>();
        api.create(&PostParams::default(), &c)
            .await
            .map_err(|e| ck_error("create", &name, e))?;
        match self
            .checkpoint_outcome(&name, |e| ck_error("wait for", &name, e))
            .await?
        {
            Some(Ok(c)) => Ok(info(&c)),
            Some(Err(c)) => {
                // Nothing to fork from: do not leave it under the client's name.
                let _ = api.delete(&name, &DeleteParams::default()).await;
                Err(ApiError::new(
                    500,
                    format!(
                        "snapshot of sandbox {id} failed: {}",
                        c.status
                            .and_then(|s| s.message)
                            .as_deref()
                            .unwrap_or("no reason given")
                    ),
                ))
            }
            None => Err(ApiError::new(
                504,
                format!(
                    "snapshot {name} of sandbox {id} did not succeed within {}s",
                    self.ready_timeout.as_secs()
                ),
            )),
        }
    }

    /// The snapshots (Checkpoints not being deleted, oldest first by name), filtered and paged as
    /// single-host mode does; the second value is the next page's token.
    pub async fn list_snapshots(
        &self,
        query: Option<&str>,
    ) -> Result<(Vec<SnapshotInfo>, Option<String>), ApiError> {
        let (mut sandbox, mut name, mut limit, mut after) = (None, None, 100usize, None);
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_encoding::percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned();
            match k {
                "sandboxID" => sandbox = Some(v),
                "name" => name = Some(v),
                "limit" => {
                    limit = v
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=100).contains(n))
                        .ok_or_else(|| ApiError::new(400, format!("invalid limit {v:?}")))?
                }
                "nextToken" => after = Some(v),
                _ => {}
            }
        }
        let mut all: Vec<Checkpoint> = self
            .namespaced::<Checkpoint>()
            .list(&ListParams::default())
            .await
            .map_err(|e| ApiError::new(502, format!("listing snapshots: {e}")))?
            .items
            .into_iter()
            .filter(|c| c.metadata.deletion_timestamp.is_none())
            // A fork's own Checkpoint is no snapshot, as in single-host mode.
            .filter(|c| {
                !c.metadata
                    .labels
                    .as_ref()
                    .is_some_and(|l| l.contains_key(super::forks::LABEL_FORK_OF))
            })
            .filter(|c| sandbox.as_ref().is_none_or(|s| &c.spec.sandbox_name == s))
            .filter(|c| {
                name.as_ref().is_none_or(|n| {
                    let n = n.split(':').next().unwrap_or(n);
                    let n = n.rsplit('/').next().unwrap_or(n);
                    c.metadata.name.as_deref() == Some(n)
                })
            })
            .collect();
        all.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        let start = match &after {
            Some(a) => all
                .iter()
                .position(|c| c.metadata.name.as_ref() == Some(a))
                .map(|i| i + 1)
                .ok_or_else(|| ApiError::new(400, format!("invalid nextToken {a:?}")))?,
            None => 0,
        };
        let page: Vec<&Checkpoint> = all[start..].iter().take(limit).collect();
        let more = all.len() > start + page.len();
        let next = page
            .last()
            .filter(|_| more)
            .and_then(|c| c.metadata.name.clone());
        Ok((page.into_iter().map(info).collect(), next))
    }

    /// Deletes the snapshot named `id` (or whose checkpoint id is `id`); the operator and the
    /// node agent remove its images.
    pub async fn delete_snapshot(&self, id: &str) -> Result<(), ApiError> {
        let name = self
            .checkpoint_named(id)
            .await?
            .ok_or_else(|| ApiError::new(404, format!("snapshot {id} not found")))?;
        // Forks still using it: single-host mode's 409 (see `super::forks`).
        self.refuse_if_in_use(&name).await?;
        match self
            .namespaced::<Checkpoint>()
            .delete(&name, &DeleteParams::default())
            .await
        {
            // Kept by its finalizer: the operator may have found its images in use on the node.
            Ok(kept) => kept
                .left()
                .map_or(Ok(()), |c| super::forks::in_use_after_delete(&c)),
            Err(e) => Err(ck_error("delete", &name, e)),
        }
    }
}

pub(super) async fn h_create_snapshot(
    State(api): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check_key(&api, &headers)?;
    let body: SnapshotBody = if body.is_empty() {
        SnapshotBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(400, format!("invalid request body: {e}")))?
    };
    let s = api.create_snapshot(&id, body).await?;
    Ok((StatusCode::CREATED, Json(s)).into_response())
}

pub(super) async fn h_list_snapshots(
    State(api): State<Shared>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    check_key(&api, &headers)?;
    let (items, next) = api.list_snapshots(query.as_deref()).await?;
    let mut resp = Json(items).into_response();
    if let Some(v) = next.and_then(|n| HeaderValue::from_str(&n).ok()) {
        resp.headers_mut().insert("x-next-token", v);
    }
    Ok(resp)
}

pub(super) async fn h_delete_snapshot(
    State(api): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_key(&api, &headers)?;
    api.delete_snapshot(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ids_are_told_apart() {
        assert!(valid_name("snap-1.a"));
        assert!(!valid_name("Bad Name") && !valid_name("-x") && !valid_name("a..b"));
        assert!(looks_like_checkpoint_id("0123456789abcdef0123456789abcdef"));
        assert!(!looks_like_checkpoint_id("base"));
        assert!(!looks_like_checkpoint_id(
            "0123456789ABCDEF0123456789abcdef"
        ));
    }
}
