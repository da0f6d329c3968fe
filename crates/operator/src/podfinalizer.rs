//! The node agent's finalizer on sandbox Pods, held by the operator on the agent's behalf (the
//! agent has no Kubernetes credentials).
//!
//! Every sandbox Pod is created with [`POD_FINALIZER`]. Whoever deletes the Pod (the operator
//! for a deleted Sandbox, an eviction, a node drain, `kubectl delete pod`), the Pod object stays
//! until the operator has asked the node agent to stop the sandbox and remove its node state
//! (idempotent) and then removed the finalizer. So "Pod gone" means "node clean", whoever deleted
//! it. A Pod whose node is lost (its Node object gone, or `NotReady` past `--node-lost-after`)
//! has no node state left to clean: its finalizer is removed without a call. An unreachable
//! agent on a live node keeps the finalizer; the reconcile fails, is retried with the Sandbox
//! controller's backoff, and each failure is told as a Warning event [`NODE_CLEANUP_FAILED`].
//!
//! A Sandbox whose Pod is deleted under it (not by its own deletion) is lost like one whose node
//! died: `Failed` with reason [`EVICTED`] or [`POD_DELETED`] (and what Kubernetes recorded about
//! who and why), or [`crate::nodeloss::NODE_LOST`] when its node is gone too.

use crate::agent::node_id;
use crate::conditions;
use crate::controller::Context;
use crate::crd::Sandbox;
use crate::error::is_not_found;
use crate::nodeloss::{self, NodeHealth, NODE_LOST};
use crate::sandbox::{node_health, patch_status, status_changed};
use crate::Error;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// The finalizer every sandbox Pod is created with.
pub const POD_FINALIZER: &str = "warren.dev/node-agent";
/// `Ready` reason (final): the sandbox's Pod was deleted (by a user or a controller) while its
/// node lives.
pub const POD_DELETED: &str = "PodDeleted";
/// `Ready` reason (final): the sandbox's Pod was evicted (eviction API, node pressure, drain).
pub const EVICTED: &str = "Evicted";
/// Warning event reason: the node agent could not clean a deleted Pod's sandbox; its finalizer
/// stays and the operator retries.
pub const NODE_CLEANUP_FAILED: &str = "NodeCleanupFailed";

/// The position of [`POD_FINALIZER`] in the Pod's finalizers, if it has it.
pub fn finalizer_index(pod: &Pod) -> Option<usize> {
    pod.finalizers().iter().position(|f| f == POD_FINALIZER)
}

/// True when the Pod is being deleted and still waits for the node agent's cleanup.
pub fn awaits_release(pod: &Pod) -> bool {
    pod.meta().deletion_timestamp.is_some() && finalizer_index(pod).is_some()
}

/// Why a Pod is being deleted, as far as Kubernetes recorded it: the reason and a message.
/// `DisruptionTarget` (set by the eviction API, the taint manager, preemption, pod GC and the
/// kubelet) names the actor; without it, Kubernetes keeps no record of who deleted a Pod.
pub fn deletion_cause(pod: &Pod) -> (&'static str, String) {
    let name = pod.name_any();
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .unwrap_or("?");
    let status = pod.status.clone().unwrap_or_default();
    let disruption = status
        .conditions
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == "DisruptionTarget" && c.status == "True");
    let evicted = status.reason.as_deref() == Some("Evicted")
        || disruption
            .as_ref()
            .and_then(|c| c.reason.as_deref())
            .is_some_and(|r| r.starts_with("Eviction") || r.contains("Eviction"));
    let by = match &disruption {
        Some(c) => {
            let why = [c.reason.clone(), c.message.clone()]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(": ");
            format!("by Kubernetes ({why})")
        }
        None if status.reason.as_deref() == Some("Evicted") => format!(
            "by the kubelet ({})",
            status.message.as_deref().unwrap_or("node pressure")
        ),
        None => "by a user or a controller (Kubernetes records no cause)".into(),
    };
    if evicted {
        (
            EVICTED,
            format!("pod {name} on node {node} was evicted {by}"),
        )
    } else {
        (
            POD_DELETED,
            format!("pod {name} on node {node} was deleted {by}"),
        )
    }
}

/// The Pod's controller: the Sandbox it was made for.
fn owner(pod: &Pod) -> Option<&OwnerReference> {
    pod.owner_references()
        .iter()
        .find(|o| o.controller == Some(true) && o.kind == "Sandbox")
}

/// Releases a deleted Pod of `sbx`: asks the node agent to stop the sandbox and remove its node
/// state (unless `node_lost`, the Pod was never placed, or no agent is configured), then removes
/// [`POD_FINALIZER`]. `Ok(false)`: nothing to do (not deleting, or not held). An agent failure
/// keeps the finalizer, publishes a Warning event and returns the error (the caller's backoff
/// retries).
pub async fn release(
    pod: &Pod,
    sbx: &Sandbox,
    ctx: &Context,
    node_lost: bool,
) -> Result<bool, Error> {
    let uid = owner(pod)
        .map(|o| o.uid.clone())
        .or_else(|| sbx.meta().uid.clone());
    release_as(pod, uid.as_deref(), sbx, ctx, node_lost).await
}

/// [`release`] for the sandbox of Sandbox uid `sandbox_uid` (`None`: unknown, so no call),
/// telling failures on `about`.
async fn release_as<K: Resource<DynamicType = ()>>(
    pod: &Pod,
    sandbox_uid: Option<&str>,
    about: &K,
    ctx: &Context,
    node_lost: bool,
) -> Result<bool, Error> {
    let Some(index) = finalizer_index(pod).filter(|_| pod.meta().deletion_timestamp.is_some())
    else {
        return Ok(false);
    };
    let name = pod.name_any();
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    if let (Some(agent), Some(node), Some(uid), false) = (&ctx.agent, &node, sandbox_uid, node_lost)
    {
        match agent.delete(node, &node_id(uid)).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                let msg = format!(
                    "pod {name} is being deleted, but its node state could not be cleaned: {e}; \
                     the pod keeps finalizer {POD_FINALIZER} and the operator retries"
                );
                ctx.warn(about, NODE_CLEANUP_FAILED, msg.clone()).await;
                return Err(Error::Reconcile {
                    kind: "Pod",
                    name,
                    message: msg,
                });
            }
        }
    }
    remove_finalizer(pod, index, ctx).await?;
    Ok(true)
}

/// Removes [`POD_FINALIZER`] at `index` with a JSON patch whose `test` op fails (409/422, and
/// the reconcile is retried) if the finalizers changed since the Pod was read.
async fn remove_finalizer(pod: &Pod, index: usize, ctx: &Context) -> Result<(), Error> {
    let name = pod.name_any();
    let ns = pod.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let path = format!("/metadata/finalizers/{index}");
    let ops = json!([{"op": "test", "path": path, "value": POD_FINALIZER},
                     {"op": "remove", "path": path}]);
    let patch = serde_json::from_value(ops).map_err(|e| Error::Reconcile {
        kind: "Pod",
        name: name.clone(),
        message: format!("cannot build the finalizer patch: {e}"),
    })?;
    match pods
        .patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
    {
        Ok(_) => Ok(()),
        // Gone already: nothing holds it any more.
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(Error::kube("remove node-agent finalizer of", "Pod", &name)(
            e,
        )),
    }
}

/// The live Sandbox's Pod is being deleted by someone else: the Sandbox is lost (`Failed`, with
/// the cause), then the Pod is released. A Pod never placed on a node carried no sandbox: it is
/// released and the next reconcile makes a new one.
pub async fn pod_deleted(
    sbx: &Sandbox,
    pod: &Pod,
    ctx: &Context,
    api: &Api<Sandbox>,
    requeue: Action,
) -> Result<Action, Error> {
    let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
        release(pod, sbx, ctx, false).await?;
        return Ok(Action::requeue(Duration::from_secs(1)));
    };
    let health = node_health(ctx, &node).await?;
    let lost = matches!(health, NodeHealth::Lost(_));
    let (reason, msg) = match health {
        NodeHealth::Lost(m) => (
            NODE_LOST,
            format!("pod {} is being deleted: {m}", pod.name_any()),
        ),
        _ => deletion_cause(pod),
    };
    let old = sbx.status.clone().unwrap_or_default();
    let st = nodeloss::lost_status(sbx, reason, msg, &conditions::now());
    // Recorded before the release: once the Pod is gone, nothing else tells why.
    if status_changed(sbx.status.as_ref(), &st) {
        patch_status(api, &sbx.name_any(), &st).await?;
        ctx.publish_failure(sbx, &old.conditions, &st.conditions)
            .await;
    }
    release(pod, sbx, ctx, lost).await?;
    Ok(requeue)
}

/// For a Sandbox already lost: its Pod may be deleted later (pod GC, the taint manager); release
/// it then, so a lost Sandbox never leaves a Pod stuck in `Terminating`.
pub async fn release_if_deleting(sbx: &Sandbox, ctx: &Context) -> Result<(), Error> {
    let ns = sbx.namespace().unwrap_or_default();
    let name = sbx.name_any();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pod =
        pods.get_opt(&name)
            .await
            .map_err(Error::kube("get pod of lost", "Sandbox", &name))?;
    let Some(pod) = pod.filter(|p| crate::sandbox::owned_by(p, sbx) && awaits_release(p)) else {
        return Ok(());
    };
    let lost = match pod.spec.as_ref().and_then(|s| s.node_name.clone()) {
        Some(node) => matches!(node_health(ctx, &node).await?, NodeHealth::Lost(_)),
        None => false,
    };
    release(&pod, sbx, ctx, lost).await?;
    Ok(())
}

/// The Pod controller's reconcile, for Pods whose Sandbox is gone (its finalizer removed by
/// hand, or the Sandbox deleted with `--cascade=orphan` and the Pod later): nobody else would
/// release them. A Pod whose Sandbox exists is left to the Sandbox reconciler.
pub async fn reconcile_pod(pod: Arc<Pod>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !awaits_release(&pod) {
        return Ok(Action::await_change());
    }
    let ns = pod.namespace().unwrap_or_default();
    let owner = owner(&pod).cloned();
    if let Some(o) = &owner {
        let api: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &ns);
        let sbx = api.get_opt(&o.name).await.map_err(Error::kube(
            "get owner of",
            "Pod",
            pod.name_any(),
        ))?;
        if sbx.is_some_and(|s| s.meta().uid.as_deref() == Some(o.uid.as_str())) {
            return Ok(Action::await_change());
        }
    }
    let lost = match pod.spec.as_ref().and_then(|s| s.node_name.clone()) {
        Some(node) => matches!(node_health(&ctx, &node).await?, NodeHealth::Lost(_)),
        None => false,
    };
    if owner.is_none() {
        tracing::warn!(pod = %pod.name_any(), "a sandbox pod without its Sandbox owner: releasing it without a node cleanup (its sandbox id is unknown)");
    }
    release_as(
        &pod,
        owner.as_ref().map(|o| o.uid.as_str()),
        &*pod,
        &ctx,
        lost,
    )
    .await?;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_cause_of_a_deletion_names_who_when_kubernetes_knows() {
        let spec = json!({"nodeName": "n1", "containers": [{"name": "c"}]});
        let evicted = pod(json!({"metadata": {"name": "p"}, "spec": spec, "status": {
            "conditions": [{"type": "DisruptionTarget", "status": "True",
                            "reason": "EvictionByEvictionAPI", "message": "Eviction API: evicting"}]}}));
        let (r, m) = deletion_cause(&evicted);
        assert_eq!(r, EVICTED);
        assert!(
            m.contains("EvictionByEvictionAPI: Eviction API: evicting"),
            "{m}"
        );
        let tainted = pod(json!({"metadata": {"name": "p"}, "spec": spec, "status": {
            "conditions": [{"type": "DisruptionTarget", "status": "True",
                            "reason": "DeletionByTaintManager", "message": "Taint manager: deleting due to NoExecute taint"}]}}));
        let (r, m) = deletion_cause(&tainted);
        assert_eq!(r, POD_DELETED);
        assert!(m.contains("DeletionByTaintManager"), "{m}");
        let by_hand = pod(json!({"metadata": {"name": "p"}, "spec": spec}));
        let (r, m) = deletion_cause(&by_hand);
        assert_eq!(r, POD_DELETED);
        assert!(m.contains("by a user or a controller"), "{m}");
        let kubelet = pod(json!({"metadata": {"name": "p"}, "spec": spec,
            "status": {"phase": "Failed", "reason": "Evicted", "message": "low on memory"}}));
        assert_eq!(deletion_cause(&kubelet).0, EVICTED);
    }

    #[test]
    fn only_a_deleting_pod_with_the_finalizer_awaits_release() {
        let held = json!({"metadata": {"name": "p", "finalizers": ["other", POD_FINALIZER]}});
        assert_eq!(finalizer_index(&pod(held.clone())), Some(1));
        assert!(!awaits_release(&pod(held.clone())));
        let mut deleting = held;
        deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z".into();
        assert!(awaits_release(&pod(deleting)));
        assert!(!awaits_release(&pod(
            json!({"metadata": {"name": "p", "deletionTimestamp": "2026-01-01T00:00:00Z"}})
        )));
    }
}
