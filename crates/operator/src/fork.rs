//! Forks: a Sandbox with `spec.restoreFrom: <Checkpoint name>` (same namespace) is restored from
//! that Checkpoint's images instead of booted from its template.
//!
//! The images are node-local, so before the Sandbox's Pod is created the Checkpoint must be
//! `Succeeded` on a node that still exists: the Pod then gets required node affinity on that
//! node's `kubernetes.io/hostname` (not `nodeName`, so that the scheduler still checks and
//! accounts its resources) and annotation [`ANNOTATION_RESTORE_FROM`] with the checkpoint's id
//! on the node, which the node agent's create gets as `restore_from`. A Checkpoint still being
//! taken keeps the Sandbox `Pending` (no Pod, looked at again shortly); a missing one, a failed
//! one or one whose node is gone fails the Sandbox for good (`CheckpointLost`,
//! `CheckpointNotReady`), with a Warning event.

use crate::conditions::{self, condition};
use crate::controller::Context;
use crate::crd::{Checkpoint, CheckpointPhase, Sandbox, SandboxPhase, SandboxStatus};
use crate::nodeloss::{self, NodeHealth};
use crate::sandbox::{patch_status, status_changed};
use crate::Error;
use k8s_openapi::api::core::v1::{
    Affinity, Node, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod,
};
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use std::time::Duration;

/// On a fork's Pod: the id on the node of the checkpoint to restore.
pub const ANNOTATION_RESTORE_FROM: &str = "warren.dev/restore-from";
/// `Ready` reason: the Checkpoint, or its node and so its images, is gone.
pub const CHECKPOINT_LOST: &str = "CheckpointLost";
/// `Ready` reason: the Checkpoint failed.
pub const CHECKPOINT_NOT_READY: &str = "CheckpointNotReady";
/// `Ready` reason while the Checkpoint is being taken.
pub const WAITING_FOR_CHECKPOINT: &str = "WaitingForCheckpoint";
/// How soon a fork waiting for its Checkpoint looks again (Checkpoints do not wake Sandboxes).
pub const CHECKPOINT_POLL: Duration = Duration::from_secs(2);
/// The node label the affinity names.
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

/// What a fork's Checkpoint allows now.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// Restore checkpoint `checkpoint_id` on node `node`, whose hostname label is `hostname`.
    Ready {
        checkpoint_id: String,
        node: String,
        hostname: String,
    },
    /// Not yet: the message says why.
    Wait(String),
    /// Never: `Ready` reason and message.
    Failed(&'static str, String),
}

/// Judges the Checkpoint named `name` (`None`: it does not exist).
pub fn judge_checkpoint(name: &str, ck: Option<&Checkpoint>) -> Result<(String, String), Source> {
    let Some(ck) = ck else {
        return Err(Source::Failed(
            CHECKPOINT_LOST,
            format!("checkpoint {name} does not exist in this namespace"),
        ));
    };
    if ck.meta().deletion_timestamp.is_some() {
        return Err(Source::Failed(
            CHECKPOINT_LOST,
            format!("checkpoint {name} is being deleted"),
        ));
    }
    let st = ck.status.clone().unwrap_or_default();
    match st.phase {
        CheckpointPhase::Succeeded => match (st.checkpoint_id, st.node_name) {
            (Some(id), Some(node)) if !id.is_empty() && !node.is_empty() => Ok((id, node)),
            _ => Err(Source::Failed(
                CHECKPOINT_LOST,
                format!("checkpoint {name} succeeded but names no checkpoint id and node"),
            )),
        },
        CheckpointPhase::Failed => Err(Source::Failed(
            CHECKPOINT_NOT_READY,
            format!(
                "checkpoint {name} failed: {}",
                st.message.as_deref().unwrap_or("no reason given")
            ),
        )),
        CheckpointPhase::Terminating => Err(Source::Failed(
            CHECKPOINT_LOST,
            format!("checkpoint {name} is being deleted"),
        )),
        CheckpointPhase::Pending | CheckpointPhase::Creating => Err(Source::Wait(format!(
            "waiting for checkpoint {name} to succeed (it is {:?})",
            st.phase
        ))),
    }
}

/// Judges the checkpoint's node (`None`: the Node object does not exist).
pub fn judge_node(
    name: &str,
    checkpoint_id: String,
    node_name: String,
    node: Option<&Node>,
    now: Timestamp,
    lost_after: Duration,
) -> Source {
    match nodeloss::node_health(&node_name, node, now, lost_after) {
        NodeHealth::Lost(m) => Source::Failed(
            CHECKPOINT_LOST,
            format!("checkpoint {name}'s images were on node {node_name}: {m}"),
        ),
        // A node that is only unreachable may come back; the Pod waits for it to schedule.
        NodeHealth::Ready | NodeHealth::Unreachable { .. } => Source::Ready {
            hostname: node
                .and_then(|n| n.labels().get(HOSTNAME_LABEL).cloned())
                .unwrap_or_else(|| node_name.clone()),
            checkpoint_id,
            node: node_name,
        },
    }
}

/// Pins `pod` to the checkpoint's node and tells the agent what to restore.
pub fn pin(pod: &mut Pod, checkpoint_id: &str, hostname: &str) {
    pod.annotations_mut().insert(
        ANNOTATION_RESTORE_FROM.to_string(),
        checkpoint_id.to_string(),
    );
    let spec = pod.spec.get_or_insert_with(Default::default);
    spec.affinity = Some(Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_expressions: Some(vec![NodeSelectorRequirement {
                        key: HOSTNAME_LABEL.into(),
                        operator: "In".into(),
                        values: Some(vec![hostname.to_string()]),
                    }]),
                    ..Default::default()
                }],
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
}

/// The checkpoint id a fork's Pod asks the agent to restore, if it is a fork's.
pub fn restore_from(pod: &Pod) -> Option<String> {
    pod.annotations().get(ANNOTATION_RESTORE_FROM).cloned()
}

fn failed_for_good(sbx: &Sandbox) -> bool {
    let Some(st) = sbx.status.as_ref() else {
        return false;
    };
    st.phase == SandboxPhase::Failed
        && st.observed_generation == sbx.meta().generation
        && conditions::find(&st.conditions, "Ready")
            .is_some_and(|c| c.reason == CHECKPOINT_LOST || c.reason == CHECKPOINT_NOT_READY)
}

/// Before a fork's Pod is created: resolves `spec.restoreFrom` and pins `pod` (returns `None`:
/// go on and create it), or writes why not and returns what the reconcile does next.
pub async fn place(sbx: &Sandbox, ctx: &Context, pod: &mut Pod) -> Result<Option<Action>, Error> {
    let Some(name) = sbx.spec.restore_from.as_deref() else {
        return Ok(None);
    };
    // Final: the images are gone or never were; only a new Sandbox (or spec) can help.
    if failed_for_good(sbx) {
        return Ok(Some(Action::await_change()));
    }
    let ns = sbx.namespace().unwrap_or_default();
    let checkpoints: Api<Checkpoint> = Api::namespaced(ctx.client.clone(), &ns);
    let ck = checkpoints.get_opt(name).await.map_err(Error::kube(
        "get checkpoint of",
        "Sandbox",
        &sbx.name_any(),
    ))?;
    let source = match judge_checkpoint(name, ck.as_ref()) {
        Err(s) => s,
        Ok((id, node_name)) => {
            let nodes: Api<Node> = Api::all(ctx.client.clone());
            let node = nodes.get_opt(&node_name).await.map_err(Error::kube(
                "get checkpoint node of",
                "Sandbox",
                &sbx.name_any(),
            ))?;
            judge_node(
                name,
                id,
                node_name,
                node.as_ref(),
                Timestamp::now(),
                ctx.pods.node_lost_after,
            )
        }
    };
    let (phase, reason, msg, action) = match source {
        Source::Ready {
            checkpoint_id,
            hostname,
            ..
        } => {
            pin(pod, &checkpoint_id, &hostname);
            return Ok(None);
        }
        Source::Wait(m) => (
            SandboxPhase::Pending,
            WAITING_FOR_CHECKPOINT,
            m,
            Action::requeue(CHECKPOINT_POLL),
        ),
        Source::Failed(reason, m) => (SandboxPhase::Failed, reason, m, Action::await_change()),
    };
    let old = sbx.status.clone().unwrap_or_default();
    let gen = sbx.meta().generation;
    let st = SandboxStatus {
        observed_generation: gen,
        phase,
        message: Some(msg.clone()),
        conditions: vec![condition(
            &old.conditions,
            "Ready",
            false,
            reason,
            msg,
            gen,
            &conditions::now(),
        )],
        node_name: None,
        sandbox_ip: None,
    };
    if status_changed(sbx.status.as_ref(), &st) {
        let api: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &ns);
        patch_status(&api, &sbx.name_any(), &st).await?;
        ctx.publish_failure(sbx, &old.conditions, &st.conditions)
            .await;
    }
    Ok(Some(action))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{CheckpointSpec, CheckpointStatus};

    fn ck(phase: CheckpointPhase) -> Checkpoint {
        let mut c = Checkpoint::new(
            "cp",
            CheckpointSpec {
                sandbox_name: "src".into(),
                pod_name: None,
                keep_running: true,
                persistent_contents: vec![],
                ttl_after_finished: None,
            },
        );
        c.status = Some(CheckpointStatus {
            phase,
            checkpoint_id: Some("uid-cp".into()),
            node_name: Some("node-a".into()),
            message: Some("CRIU said no".into()),
            ..Default::default()
        });
        c
    }

    #[test]
    fn checkpoints_are_judged() {
        assert_eq!(
            judge_checkpoint("cp", Some(&ck(CheckpointPhase::Succeeded))),
            Ok(("uid-cp".into(), "node-a".into()))
        );
        assert!(matches!(
            judge_checkpoint("cp", Some(&ck(CheckpointPhase::Creating))),
            Err(Source::Wait(_))
        ));
        assert!(matches!(
            judge_checkpoint("cp", Some(&ck(CheckpointPhase::Failed))),
            Err(Source::Failed(CHECKPOINT_NOT_READY, m)) if m.contains("CRIU said no")
        ));
        assert!(matches!(
            judge_checkpoint("cp", None),
            Err(Source::Failed(CHECKPOINT_LOST, _))
        ));
        let lost = judge_node(
            "cp",
            "uid-cp".into(),
            "node-a".into(),
            None,
            Timestamp::now(),
            Duration::from_secs(60),
        );
        assert!(
            matches!(&lost, Source::Failed(CHECKPOINT_LOST, m) if m.contains("node-a")),
            "{lost:?}"
        );
    }
}
