//! Node loss: a sandbox's memory, processes and upper dir live on one node, so when that node is
//! gone (its Node object deleted, or `NotReady` for longer than `PodConfig::node_lost_after`) or
//! the sandbox's Pod disappears under it (evicted, drained, deleted by hand), the sandbox is lost.
//! It turns `Failed` with reason [`NODE_LOST`] or [`POD_LOST`], and stays so: the operator never
//! re-creates the Pod of a sandbox that had one, because a new Pod would be a new, empty sandbox
//! under the same E2B id (the claimant would silently lose its state). An unclaimed pool member
//! in that state is deleted by its SandboxSet, which makes a fresh one; a claimed one stays
//! `Failed` until its user kills it or its `shutdownTime` passes.

use crate::conditions::{self, condition};
use crate::crd::{Sandbox, SandboxPhase, SandboxStatus};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::{Resource, ResourceExt};
use std::time::Duration;

/// `Ready` reason: the sandbox's node is gone or has been unreachable too long.
pub const NODE_LOST: &str = "NodeLost";
/// `Ready` reason: the sandbox's Pod was deleted or evicted while its node lives.
pub const POD_LOST: &str = "PodLost";
/// `Ready` reason, not final: the node stopped reporting, not yet for `node_lost_after`.
pub const NODE_UNREACHABLE: &str = "NodeUnreachable";

/// True when `status` says the sandbox was lost with its node or Pod (a final state).
pub fn is_lost(status: Option<&SandboxStatus>) -> bool {
    status.is_some_and(|s| {
        s.phase == SandboxPhase::Failed
            && conditions::find(&s.conditions, "Ready").is_some_and(|c| {
                [
                    NODE_LOST,
                    POD_LOST,
                    crate::podfinalizer::POD_DELETED,
                    crate::podfinalizer::EVICTED,
                ]
                .contains(&c.reason.as_str())
            })
    })
}

/// How long a pool member whose sandbox could not start is kept (its conditions and Warning
/// event say why) before its set replaces it; with a set's 30 s recheck, also the pace of
/// replacements when every start fails.
pub const FAILED_START_KEPT_FOR: Duration = Duration::from_secs(30);

/// True when an unclaimed pool member can never become ready again and should be replaced: lost
/// with its node or Pod, its Pod ended (evicted), or its sandbox failed to start at least
/// [`FAILED_START_KEPT_FOR`] before `now` (a failed start is final for a Sandbox; a pull that
/// failed is not, it is retried).
pub fn is_replaceable(status: Option<&SandboxStatus>, now: Timestamp) -> bool {
    let Some(s) = status else {
        return false;
    };
    if is_lost(status) {
        return true;
    }
    if s.phase != SandboxPhase::Failed {
        return false;
    }
    match conditions::find(&s.conditions, "Ready") {
        Some(c) if c.reason == "PodFailed" => true,
        Some(c) if c.reason == "SandboxStartFailed" => c
            .last_transition_time
            .parse::<Timestamp>()
            .is_ok_and(|since| {
                now.duration_since(since).as_secs_f64() >= FAILED_START_KEPT_FOR.as_secs_f64()
            }),
        _ => false,
    }
}

/// Whether the Pod's state is worth a look at its Node: it is placed, and either its phase is
/// `Unknown`, it is being deleted, or it runs but is not ready (what the node lifecycle controller
/// does to the Pods of a `NotReady` node).
pub fn needs_node_check(pod: &Pod) -> bool {
    let Some(_) = pod.spec.as_ref().and_then(|s| s.node_name.as_ref()) else {
        return false;
    };
    let st = pod.status.clone().unwrap_or_default();
    let phase = st.phase.as_deref().unwrap_or("Pending");
    let not_ready = st
        .conditions
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "False");
    phase == "Unknown"
        || pod.meta().deletion_timestamp.is_some()
        || (phase == "Running" && not_ready)
}

/// What a node's state means for the sandboxes on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeHealth {
    Ready,
    /// Not ready, for less than the limit: look again after this long.
    Unreachable {
        message: String,
        recheck: Duration,
    },
    Lost(String),
}

/// Judges `node` (`None`: the Node object does not exist) named `name` at `now`.
pub fn node_health(name: &str, node: Option<&Node>, now: Timestamp, after: Duration) -> NodeHealth {
    let Some(node) = node else {
        return NodeHealth::Lost(format!("node {name} no longer exists"));
    };
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
    let Some(ready) = ready else {
        // A node that never reported is not a lost one yet.
        return NodeHealth::Unreachable {
            message: format!("node {name} has not reported readiness"),
            recheck: after,
        };
    };
    if ready.status == "True" {
        return NodeHealth::Ready;
    }
    let since = ready.last_transition_time.as_ref().map(|t| t.0);
    let why = [ready.reason.clone(), ready.message.clone()]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(": ");
    let elapsed = since
        .map(|t| Duration::try_from(now.duration_since(t)).unwrap_or(Duration::ZERO))
        .unwrap_or(Duration::ZERO);
    let since_txt = since.map(|t| t.to_string()).unwrap_or_else(|| "?".into());
    if elapsed >= after {
        NodeHealth::Lost(format!(
            "node {name} has been NotReady since {since_txt} ({why})"
        ))
    } else {
        NodeHealth::Unreachable {
            message: format!("node {name} is NotReady since {since_txt} ({why})"),
            // Whole seconds, rounded up: a recheck never comes before the limit.
            recheck: Duration::from_secs((after - elapsed).as_secs_f64().ceil() as u64),
        }
    }
}

/// The final status of a lost sandbox.
pub fn lost_status(sbx: &Sandbox, reason: &str, message: String, now: &str) -> SandboxStatus {
    let old = sbx.status.clone().unwrap_or_default();
    let gen = sbx.meta().generation;
    let message = format!(
        "{message}; sandbox {} and its memory and files on that node are lost (kill it, or create a new one)",
        sbx.name_any()
    );
    SandboxStatus {
        observed_generation: gen,
        phase: SandboxPhase::Failed,
        message: Some(message.clone()),
        conditions: vec![condition(
            &old.conditions,
            "Ready",
            false,
            reason,
            message,
            gen,
            now,
        )],
        node_name: old.node_name.clone(),
        sandbox_ip: old.sandbox_ip.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(ready: &str, since: &str) -> Node {
        serde_json::from_value(
            json!({"metadata": {"name": "n1"}, "status": {"conditions": [
            {"type": "Ready", "status": ready, "reason": "NodeStatusUnknown",
             "message": "Kubelet stopped posting node status.", "lastTransitionTime": since}]}}),
        )
        .unwrap()
    }

    #[test]
    fn a_node_is_lost_after_the_limit_or_when_gone() {
        let now: Timestamp = "2026-01-01T00:10:00Z".parse().unwrap();
        let after = Duration::from_secs(60);
        assert_eq!(
            node_health(
                "n1",
                Some(&node("True", "2026-01-01T00:00:00Z")),
                now,
                after
            ),
            NodeHealth::Ready
        );
        match node_health(
            "n1",
            Some(&node("Unknown", "2026-01-01T00:09:30Z")),
            now,
            after,
        ) {
            NodeHealth::Unreachable { recheck, message } => {
                assert_eq!(recheck, Duration::from_secs(30));
                assert!(message.contains("Kubelet stopped posting"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            node_health("n1", Some(&node("Unknown", "2026-01-01T00:09:00Z")), now, after),
            NodeHealth::Lost(m) if m.contains("NotReady since 2026-01-01T00:09:00Z")
        ));
        assert!(
            matches!(node_health("n1", None, now, after), NodeHealth::Lost(m) if m.contains("no longer exists"))
        );
    }

    #[test]
    fn a_failed_start_is_replaced_once_it_was_kept_a_while() {
        let status = |reason: &str, since: &str| SandboxStatus {
            phase: SandboxPhase::Failed,
            conditions: vec![conditions::condition(
                &[],
                "Ready",
                false,
                reason,
                "why",
                Some(1),
                since,
            )],
            ..Default::default()
        };
        let now: Timestamp = "2026-01-01T00:10:00Z".parse().unwrap();
        let young = status("SandboxStartFailed", "2026-01-01T00:09:45Z");
        let old = status("SandboxStartFailed", "2026-01-01T00:09:30Z");
        assert!(!is_replaceable(Some(&young), now), "kept to be seen");
        assert!(is_replaceable(Some(&old), now));
        assert!(is_replaceable(
            Some(&status("PodFailed", "2026-01-01T00:09:59Z")),
            now
        ));
        assert!(is_replaceable(
            Some(&status(NODE_LOST, "2026-01-01T00:09:59Z")),
            now
        ));
        // Not final: an invalid spec waits for a fix, a pull is retried.
        assert!(!is_replaceable(
            Some(&status("InvalidSpec", "2026-01-01T00:00:00Z")),
            now
        ));
        let mut pulling = status("ImagePullBackOff", "2026-01-01T00:00:00Z");
        pulling.phase = SandboxPhase::Pending;
        assert!(!is_replaceable(Some(&pulling), now));
        assert!(!is_replaceable(None, now));
    }

    #[test]
    fn only_suspicious_pods_cost_a_node_lookup() {
        let pod = |v: serde_json::Value| -> Pod { serde_json::from_value(v).unwrap() };
        let placed = json!({"nodeName": "n1", "containers": [{"name": "c"}]});
        assert!(!needs_node_check(&pod(
            json!({"spec": {"containers": [{"name": "c"}]}, "status": {"phase": "Unknown"}})
        )));
        assert!(!needs_node_check(&pod(
            json!({"spec": placed, "status": {"phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}]}})
        )));
        assert!(needs_node_check(&pod(
            json!({"spec": placed, "status": {"phase": "Running",
            "conditions": [{"type": "Ready", "status": "False"}]}})
        )));
        assert!(needs_node_check(&pod(
            json!({"spec": placed, "status": {"phase": "Unknown"}})
        )));
        assert!(needs_node_check(&pod(
            json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"},
            "spec": placed, "status": {"phase": "Running"}})
        )));
    }
}
