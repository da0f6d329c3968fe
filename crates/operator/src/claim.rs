//! Claiming a warm member of a SandboxSet, conflict-safe: the claim is one `replace` (PUT) of the
//! member carrying the resourceVersion we read, so the API server accepts exactly one of two
//! concurrent claims of the same member and answers the other 409 Conflict; the loser tries the
//! next candidate. This is what `warren serve --cluster` calls for `POST /sandboxes` with a
//! `templateID` that names a pool.

use crate::conditions;
use crate::crd::Sandbox;
use crate::error::is_conflict;
use crate::sandboxset::selector;
use crate::{Error, LABEL_CLAIMED};
use kube::api::{Api, ListParams, PostParams};
use kube::{Resource, ResourceExt};
use std::collections::BTreeMap;

/// Annotation on a claimed Sandbox: who claimed it (the API key's team, the claim request id).
pub const ANNOTATION_CLAIMED_BY: &str = "warren.dev/claimed-by";

/// What the claimant gives the sandbox it gets.
#[derive(Debug, Clone, Default)]
pub struct ClaimRequest {
    pub claimant: String,
    pub env_vars: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    /// RFC 3339.
    pub shutdown_time: Option<String>,
}

/// The member turned into a claimed sandbox: out of the pool (label, no owner reference to the
/// set, so the set refills and its garbage collection no longer deletes it) and given the request.
fn claimed(mut sbx: Sandbox, req: &ClaimRequest) -> Sandbox {
    sbx.labels_mut().insert(LABEL_CLAIMED.into(), "true".into());
    sbx.annotations_mut()
        .insert(ANNOTATION_CLAIMED_BY.into(), req.claimant.clone());
    for (k, v) in &req.metadata {
        sbx.annotations_mut()
            .insert(format!("metadata.warren.dev/{k}"), v.clone());
    }
    sbx.meta_mut().owner_references = None;
    sbx.spec.env_vars.extend(req.env_vars.clone());
    if req.shutdown_time.is_some() {
        sbx.spec.shutdown_time = req.shutdown_time.clone();
    }
    sbx
}

/// Claims one ready, unclaimed member of SandboxSet `set`. `Ok(None)` when there is none (the
/// caller makes a cold Sandbox instead).
pub async fn claim(
    api: &Api<Sandbox>,
    set: &str,
    req: &ClaimRequest,
) -> Result<Option<Sandbox>, Error> {
    let list = api
        .list(&ListParams::default().labels(&selector(set)))
        .await
        .map_err(Error::kube("list members of", "SandboxSet", set))?;
    let candidates = list.items.into_iter().filter(|s| {
        s.meta().deletion_timestamp.is_none()
            && s.meta().resource_version.is_some()
            && s.status
                .as_ref()
                .is_some_and(|st| conditions::is_true(&st.conditions, "Ready"))
    });
    for sbx in candidates {
        let name = sbx.name_any();
        match api
            .replace(&name, &PostParams::default(), &claimed(sbx, req))
            .await
        {
            Ok(s) => return Ok(Some(s)),
            // Someone else claimed (or the set deleted) it since our list: next one.
            Err(e) if is_conflict(&e) || crate::error::is_not_found(&e) => continue,
            Err(e) => return Err(Error::kube("claim", "Sandbox", name)(e)),
        }
    }
    Ok(None)
}
