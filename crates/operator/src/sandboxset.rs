//! The SandboxSet reconciler: keeps `spec.replicas` unclaimed member Sandboxes owned by the set,
//! replaces members of an old member template with at most `updateStrategy.maxUnavailable` of
//! them unavailable at once, and starts at most `scaleStrategy.maxUnavailable` at once.
//!
//! Members are Sandboxes with label [`LABEL_SANDBOX_SET`] and a controller owner reference to the
//! set. A claim (see [`crate::claim`]) labels a member [`LABEL_CLAIMED`] and drops the owner
//! reference in one resourceVersion-checked update, so the set stops counting it and refills.
//! Deletes carry the member's resourceVersion as a precondition: a member claimed between our list
//! and our delete is not deleted (the API server answers 409 and the next reconcile sees the claim).

use crate::conditions::{self, condition};
use crate::controller::Context;
use crate::crd::{
    Sandbox, SandboxSet, SandboxSetPhase, SandboxSetSpec, SandboxSetStatus, SandboxSpec,
    API_VERSION,
};
use crate::error::{is_conflict, is_not_found};
use crate::{Error, FIELD_MANAGER, LABEL_CLAIMED, LABEL_SANDBOX_SET, LABEL_TEMPLATE_HASH};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// The spec every member of `set` gets.
pub fn member_spec(set: &SandboxSetSpec) -> SandboxSpec {
    SandboxSpec {
        template: set.template.clone(),
        image: set.image.clone(),
        image_pull_secrets: set.image_pull_secrets.clone(),
        image_pull_policy: set.image_pull_policy,
        resources: set.resources.clone(),
        persistent_contents: set.persistent_contents.clone(),
        allow_internet_access: set.allow_internet_access,
        network: set.network.clone(),
        ..Default::default()
    }
}

/// A stable hash of a member spec (FNV-1a over its JSON): members carry it in
/// [`LABEL_TEMPLATE_HASH`], and a member with another hash is outdated. Not `DefaultHasher`, whose
/// output may change between Rust releases and would roll every pool after an operator upgrade.
pub fn revision(spec: &SandboxSpec) -> String {
    let bytes = serde_json::to_vec(spec).unwrap_or_default();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Checks what the schema cannot; the message names the field.
pub fn validate(spec: &SandboxSetSpec) -> Result<(i32, i32), String> {
    if spec.replicas < 0 {
        return Err(format!("spec.replicas: {} is negative", spec.replicas));
    }
    crate::sandbox::validate(&member_spec(spec))?;
    let update = spec
        .update_strategy
        .max_unavailable
        .resolve("spec.updateStrategy.maxUnavailable", spec.replicas)?;
    let scale = spec
        .scale_strategy
        .max_unavailable
        .resolve("spec.scaleStrategy.maxUnavailable", spec.replicas)?;
    Ok((update, scale))
}

/// One unclaimed member as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub resource_version: Option<String>,
    pub revision: String,
    pub ready: bool,
    /// Creation order (RFC 3339 sorts as time).
    pub created: String,
}

/// What one reconcile does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub create: i32,
    pub delete: Vec<Member>,
}

/// Decides creates and deletes from the live (not deleting) unclaimed members.
///
/// Scale-down removes the members that matter least first: outdated, then not ready, then the
/// newest. The rolling update removes outdated members that are not ready at once (they cost no
/// availability) and ready ones only while fewer than `max_unavailable` of `replicas` are
/// unavailable. Scale-up fills to `replicas` with at most `max_starting` members starting.
pub fn plan(
    replicas: i32,
    max_unavailable: i32,
    max_starting: i32,
    update_revision: &str,
    members: &[Member],
) -> Plan {
    let mut live: Vec<&Member> = members.iter().collect();
    let mut delete: Vec<Member> = vec![];
    let excess = live.len() as i32 - replicas;
    if excess > 0 {
        // Least valuable first: (updated, ready, older) sorts valuable members last.
        live.sort_by(|a, b| {
            let key = |m: &Member| (m.revision == update_revision, m.ready);
            key(a).cmp(&key(b)).then_with(|| b.created.cmp(&a.created))
        });
        let (gone, keep) = live.split_at(excess as usize);
        delete.extend(gone.iter().map(|m| (*m).clone()));
        live = keep.to_vec();
    }
    let ready = live.iter().filter(|m| m.ready).count() as i32;
    let mut unavailable = (replicas - ready).max(0);
    let mut outdated: Vec<&Member> = live
        .iter()
        .copied()
        .filter(|m| m.revision != update_revision)
        .collect();
    // Not-ready first, then oldest first.
    outdated.sort_by(|a, b| {
        a.ready
            .cmp(&b.ready)
            .then_with(|| a.created.cmp(&b.created))
    });
    let mut kept = live.len() as i32;
    for m in outdated {
        if m.ready {
            if unavailable >= max_unavailable {
                break;
            }
            unavailable += 1;
        }
        delete.push(m.clone());
        kept -= 1;
    }
    let deleted: Vec<&str> = delete.iter().map(|m| m.name.as_str()).collect();
    let starting = live
        .iter()
        .filter(|m| !m.ready && !deleted.contains(&m.name.as_str()))
        .count() as i32;
    let create = (replicas - kept).min(max_starting - starting).max(0);
    Plan { create, delete }
}

fn member_view(s: &Sandbox) -> Member {
    Member {
        name: s.name_any(),
        resource_version: s.resource_version(),
        revision: s
            .labels()
            .get(LABEL_TEMPLATE_HASH)
            .cloned()
            .unwrap_or_default(),
        ready: s
            .status
            .as_ref()
            .is_some_and(|st| conditions::is_true(&st.conditions, "Ready")),
        created: s
            .meta()
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default(),
    }
}

/// Label selector of `set`'s unclaimed members.
pub fn selector(set_name: &str) -> String {
    format!("{LABEL_SANDBOX_SET}={set_name},{LABEL_CLAIMED}!=true")
}

/// A new member of `set` (the API server picks the name from `generateName`).
pub fn new_member(set: &SandboxSet, revision: &str) -> Result<Sandbox, Error> {
    let set_name = set.name_any();
    let uid = set.meta().uid.clone().ok_or(Error::MissingField {
        kind: "SandboxSet",
        field: "metadata.uid",
    })?;
    let mut sbx = Sandbox::new("", member_spec(&set.spec));
    sbx.metadata = ObjectMeta {
        generate_name: Some(format!("{set_name}-")),
        namespace: set.namespace(),
        labels: Some(BTreeMap::from([
            (LABEL_SANDBOX_SET.to_string(), set_name.clone()),
            (LABEL_TEMPLATE_HASH.to_string(), revision.to_string()),
        ])),
        owner_references: Some(vec![OwnerReference {
            api_version: API_VERSION.into(),
            kind: "SandboxSet".into(),
            name: set_name,
            uid,
            controller: Some(true),
            block_owner_deletion: Some(true),
        }]),
        ..Default::default()
    };
    Ok(sbx)
}

async fn patch_status(
    api: &Api<SandboxSet>,
    name: &str,
    st: &SandboxSetStatus,
) -> Result<(), Error> {
    let body = json!({"apiVersion": API_VERSION, "kind": "SandboxSet", "status": st});
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await
    .map_err(Error::kube("patch status of", "SandboxSet", name))?;
    Ok(())
}

/// Reconciles one SandboxSet.
pub async fn reconcile(set: Arc<SandboxSet>, ctx: &Context) -> Result<Action, Error> {
    let ns = set.namespace().ok_or(Error::MissingField {
        kind: "SandboxSet",
        field: "metadata.namespace",
    })?;
    let name = set.name_any();
    let sets: Api<SandboxSet> = Api::namespaced(ctx.client.clone(), &ns);
    let sandboxes: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &ns);
    let now = conditions::now();
    let gen = set.meta().generation;
    let old = set.status.clone().unwrap_or_default();
    let rev = revision(&member_spec(&set.spec));
    let base = SandboxSetStatus {
        observed_generation: gen,
        update_revision: Some(rev.clone()),
        selector: Some(selector(&name)),
        ..old.clone()
    };

    let (max_unavailable, max_starting) = match validate(&set.spec) {
        Ok(v) => v,
        Err(msg) => {
            let st = SandboxSetStatus {
                phase: SandboxSetPhase::Failed,
                conditions: vec![condition(
                    &old.conditions,
                    "Ready",
                    false,
                    "InvalidSpec",
                    msg,
                    gen,
                    &now,
                )],
                ..base
            };
            if set.status.as_ref() != Some(&st) {
                patch_status(&sets, &name, &st).await?;
                ctx.publish_failure(&*set, &old.conditions, &st.conditions)
                    .await;
            }
            return Ok(Action::await_change());
        }
    };

    let uid = set.meta().uid.clone();
    let list = sandboxes
        .list(&ListParams::default().labels(&selector(&name)))
        .await
        .map_err(Error::kube("list members of", "SandboxSet", &name))?;
    // Only members this set controls (a same-named set recreated with another uid does not adopt
    // the old one's members) and that are not already going away.
    let (lost, owned): (Vec<&Sandbox>, Vec<&Sandbox>) = list
        .items
        .iter()
        .filter(|s| {
            s.owner_references()
                .iter()
                .any(|o| o.controller == Some(true) && Some(&o.uid) == uid.as_ref())
        })
        .filter(|s| s.meta().deletion_timestamp.is_none())
        .partition(|s| crate::nodeloss::is_replaceable(s.status.as_ref(), Timestamp::now()));
    let members: Vec<Member> = owned.into_iter().map(member_view).collect();
    let p = plan(
        set.spec.replicas,
        max_unavailable,
        max_starting,
        &rev,
        &members,
    );

    let mut conflicts = 0;
    let mut failure: Option<String> = None;
    // Members lost with their node or Pod, or whose sandbox failed to start a while ago, never
    // come back: replace them (the plan above already does not count them). Guarded by resourceVersion like every other member delete.
    let lost: Vec<Member> = lost.into_iter().map(member_view).collect();
    for m in lost.iter().chain(&p.delete) {
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: m.resource_version.clone(),
                uid: None,
            }),
            ..Default::default()
        };
        match sandboxes.delete(&m.name, &dp).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            // Claimed (or otherwise changed) since our list: leave it to the next reconcile.
            Err(e) if is_conflict(&e) => conflicts += 1,
            Err(e) => {
                failure = Some(format!("cannot delete member {}: {e}", m.name));
                break;
            }
        }
    }
    if failure.is_none() {
        for _ in 0..p.create {
            let sbx = new_member(&set, &rev)?;
            if let Err(e) = sandboxes.create(&PostParams::default(), &sbx).await {
                failure = Some(format!("cannot create a member: {e}"));
                break;
            }
        }
    }

    let live = members.len() as i32;
    let available = members.iter().filter(|m| m.ready).count() as i32;
    let updated = members.iter().filter(|m| m.revision == rev).count() as i32;
    let replicas = set.spec.replicas;
    let (phase, cond) = if let Some(msg) = &failure {
        (
            SandboxSetPhase::Failed,
            condition(
                &old.conditions,
                "Ready",
                false,
                "ReconcileFailed",
                msg.clone(),
                gen,
                &now,
            ),
        )
    } else if updated < live {
        (
            SandboxSetPhase::Updating,
            condition(
                &old.conditions,
                "Ready",
                false,
                "Updating",
                format!(
                    "{updated} of {live} members have the current template; {available} available"
                ),
                gen,
                &now,
            ),
        )
    } else if live != replicas || available < replicas {
        (
            SandboxSetPhase::Scaling,
            condition(
                &old.conditions,
                "Ready",
                false,
                "Scaling",
                format!("{available} of {replicas} members available, {live} exist"),
                gen,
                &now,
            ),
        )
    } else {
        (
            SandboxSetPhase::Ready,
            condition(
                &old.conditions,
                "Ready",
                true,
                "AllAvailable",
                format!("{available} members available"),
                gen,
                &now,
            ),
        )
    };
    let st = SandboxSetStatus {
        phase,
        replicas: live,
        available_replicas: available,
        updated_replicas: updated,
        conditions: vec![cond],
        ..base
    };
    if set.status.as_ref() != Some(&st) {
        patch_status(&sets, &name, &st).await?;
        ctx.publish_failure(&*set, &old.conditions, &st.conditions)
            .await;
    }
    if let Some(msg) = failure {
        return Err(Error::Reconcile {
            kind: "SandboxSet",
            name,
            message: msg,
        });
    }
    Ok(
        if conflicts > 0 || p.create > 0 || !p.delete.is_empty() || phase != SandboxSetPhase::Ready
        {
            // Member changes wake us through the watch; this only guards against a missed event.
            Action::requeue(Duration::from_secs(if conflicts > 0 { 1 } else { 30 }))
        } else {
            Action::requeue(Duration::from_secs(300))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(name: &str, rev: &str, ready: bool, created: &str) -> Member {
        Member {
            name: name.into(),
            resource_version: Some("1".into()),
            revision: rev.into(),
            ready,
            created: created.into(),
        }
    }

    fn names(p: &Plan) -> Vec<&str> {
        p.delete.iter().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn scale_up_is_capped_by_starting_members() {
        assert_eq!(
            plan(3, 1, 8, "r", &[]),
            Plan {
                create: 3,
                delete: vec![]
            }
        );
        assert_eq!(plan(20, 4, 8, "r", &[]).create, 8);
        let starting: Vec<Member> = (0..6)
            .map(|i| m(&format!("s{i}"), "r", false, "t"))
            .collect();
        assert_eq!(plan(20, 4, 8, "r", &starting).create, 2);
    }

    #[test]
    fn scale_down_removes_outdated_then_unready_then_newest() {
        let ms = vec![
            m("old-ready", "r", true, "1"),
            m("new-ready", "r", true, "3"),
            m("unready", "r", false, "2"),
            m("outdated", "q", true, "0"),
        ];
        let p = plan(2, 1, 8, "r", &ms);
        assert_eq!(names(&p), ["outdated", "unready"]);
        assert_eq!(p.create, 0);
        let p = plan(1, 1, 8, "r", &ms);
        assert_eq!(names(&p), ["outdated", "unready", "new-ready"]);
        assert_eq!(plan(0, 1, 8, "r", &ms).delete.len(), 4);
    }

    #[test]
    fn rolling_update_respects_max_unavailable() {
        let ms: Vec<Member> = (0..5)
            .map(|i| m(&format!("m{i}"), "old", true, &i.to_string()))
            .collect();
        let p = plan(5, 2, 8, "new", &ms);
        assert_eq!(names(&p), ["m0", "m1"]);
        assert_eq!(p.create, 2);
        // Two replacements starting, three outdated ready: no budget left until they are ready.
        let mut mid: Vec<Member> = ms[2..].to_vec();
        mid.push(m("n0", "new", false, "9"));
        mid.push(m("n1", "new", false, "9"));
        let p = plan(5, 2, 8, "new", &mid);
        assert!(p.delete.is_empty(), "{p:?}");
        assert_eq!(p.create, 0);
        // Unready outdated members go at once, whatever the budget.
        let mut broken = ms.clone();
        broken[4].ready = false;
        broken[3].ready = false;
        let p = plan(5, 1, 8, "new", &broken);
        assert_eq!(names(&p), ["m3", "m4"]);
        assert_eq!(p.create, 2);
    }

    #[test]
    fn converged_set_does_nothing() {
        let ms: Vec<Member> = (0..3)
            .map(|i| m(&format!("m{i}"), "r", true, "t"))
            .collect();
        assert_eq!(plan(3, 1, 8, "r", &ms), Plan::default());
    }

    #[test]
    fn revision_is_stable_and_sensitive() {
        let a = SandboxSpec {
            template: Some("base".into()),
            ..Default::default()
        };
        let b = SandboxSpec {
            template: Some("py".into()),
            ..Default::default()
        };
        // Pinned: a change here rolls every pool in every cluster on upgrade.
        assert_eq!(revision(&a), "0261e02d06c9d6ce");
        assert_ne!(revision(&a), revision(&b));
        assert_eq!(revision(&a).len(), 16);
    }
}
