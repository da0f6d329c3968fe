//! The Checkpoint reconciler: asks the node agent on the sandbox's node to dump its memory and/or
//! filesystem (CRIU, `keepRunning` as the spec says), records id, node, size and duration in the
//! status, deletes the Checkpoint `ttlAfterFinished` after it finished, and holds finalizer
//! [`FINALIZER`] until the agent has removed the images from the node.
//!
//! The agent names the images after the Checkpoint's uid, so a reconcile repeated after a crash
//! between the dump and the status write gets the first dump back instead of a second one.

use crate::agent::{node_id, AgentError, CheckpointRequest};
use crate::conditions;
use crate::controller::Context;
use crate::crd::{Checkpoint, CheckpointPhase, CheckpointStatus, Sandbox};
use crate::jobs::{self, Target};
use crate::jobstatus::{status, write};
use crate::Error;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{finalizer, Event};
use kube::{Resource, ResourceExt};
use std::sync::Arc;
use std::time::Duration;

/// Removed once the node agent has deleted the checkpoint's images (or their node is gone).
pub const FINALIZER: &str = "warren.dev/checkpoint-images";
/// How often a Checkpoint waiting for its sandbox looks again.
pub const WAIT_POLL: Duration = Duration::from_secs(5);
/// `Ready` reason of a Terminating Checkpoint whose images the node agent refuses to delete, as
/// sandboxes or checkpoints on the node still stack them; the message is the agent's.
pub const REASON_IN_USE: &str = "InUse";

pub async fn reconcile(cp: Arc<Checkpoint>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = cp.namespace().ok_or(Error::MissingField {
        kind: "Checkpoint",
        field: "metadata.namespace",
    })?;
    let api: Api<Checkpoint> = Api::namespaced(ctx.client.clone(), &ns);
    let name = cp.name_any();
    finalizer(&api, FINALIZER, cp, |ev| async {
        match ev {
            Event::Apply(c) => apply(c, &ctx, &api).await,
            Event::Cleanup(c) => cleanup(c, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer {
            name,
            source: Box::new(other),
        },
    })
}

async fn apply(cp: Arc<Checkpoint>, ctx: &Context, api: &Api<Checkpoint>) -> Result<Action, Error> {
    let name = cp.name_any();
    let old = cp.status.clone().unwrap_or_default();
    let ttl = match cp
        .spec
        .ttl_after_finished
        .as_deref()
        .map(|t| jobs::parse_ttl("spec.ttlAfterFinished", t))
        .transpose()
    {
        Ok(t) => t,
        Err(msg) => {
            write(
                ctx,
                api,
                &cp,
                status(&cp, CheckpointPhase::Failed, "InvalidSpec", msg),
            )
            .await?;
            return Ok(Action::await_change());
        }
    };
    match old.phase {
        CheckpointPhase::Succeeded | CheckpointPhase::Failed => {
            return jobs::finished(
                api,
                "Checkpoint",
                &name,
                ttl,
                old.completion_time.as_deref(),
            )
            .await;
        }
        CheckpointPhase::Terminating => return Ok(Action::await_change()),
        CheckpointPhase::Pending | CheckpointPhase::Creating => {}
    }
    let Some(agent) = ctx.agent.clone() else {
        return Err(Error::Reconcile {
            kind: "Checkpoint",
            name,
            message: "the operator runs without node agents".into(),
        });
    };
    let ns = cp.namespace().unwrap_or_default();
    let sandboxes: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &ns);
    let sbx_name = cp.spec.sandbox_name.clone();
    let Some(sbx) = sandboxes.get_opt(&sbx_name).await.map_err(Error::kube(
        "get sandbox of",
        "Checkpoint",
        &name,
    ))?
    else {
        let msg = format!("sandbox {sbx_name} (spec.sandboxName) does not exist in namespace {ns}");
        let mut st = status(&cp, CheckpointPhase::Failed, "SandboxNotFound", msg);
        st.completion_time = Some(conditions::now());
        write(ctx, api, &cp, st).await?;
        return jobs::finished(api, "Checkpoint", &name, ttl, Some(&conditions::now())).await;
    };
    let (node, id) = match jobs::target(&sbx) {
        Target::Ready { node, id } => (node, id),
        Target::Wait(msg) => {
            write(
                ctx,
                api,
                &cp,
                status(&cp, CheckpointPhase::Pending, "WaitingForSandbox", msg),
            )
            .await?;
            return Ok(Action::requeue(WAIT_POLL));
        }
        Target::Gone(msg) => {
            let mut st = status(&cp, CheckpointPhase::Failed, "SandboxFailed", msg);
            st.completion_time = Some(conditions::now());
            write(ctx, api, &cp, st).await?;
            return jobs::finished(api, "Checkpoint", &name, ttl, Some(&conditions::now())).await;
        }
    };
    if old.phase != CheckpointPhase::Creating {
        let mut st = status(
            &cp,
            CheckpointPhase::Creating,
            "Creating",
            format!("the node agent on {node} is dumping sandbox {sbx_name}"),
        );
        st.node_name = Some(node.clone());
        write(ctx, api, &cp, st).await?;
    }
    let req = CheckpointRequest {
        checkpoint_id: node_id(cp.meta().uid.as_deref().unwrap_or_default()),
        keep_running: cp.spec.keep_running,
        contents: cp.spec.persistent_contents.clone(),
    };
    let now = conditions::now();
    let st = match agent.checkpoint(&node, &id, &req).await {
        Ok(info) => {
            let mut st = status(
                &cp,
                CheckpointPhase::Succeeded,
                "Succeeded",
                format!(
                    "{} bytes on {node} in {} ms",
                    info.size_bytes, info.duration_ms
                ),
            );
            st.checkpoint_id = Some(info.checkpoint_id);
            st.size_bytes = Some(info.size_bytes as i64);
            st.duration_ms = Some(info.duration_ms as i64);
            st
        }
        Err(e @ AgentError::Unreachable { .. }) => {
            return Err(Error::Reconcile {
                kind: "Checkpoint",
                name,
                message: e.to_string(),
            })
        }
        Err(e) => status(
            &cp,
            CheckpointPhase::Failed,
            "CheckpointFailed",
            format!("sandbox {sbx_name}: {e}"),
        ),
    };
    let st = CheckpointStatus {
        node_name: Some(node),
        completion_time: Some(now.clone()),
        ..st
    };
    write(ctx, api, &cp, st).await?;
    jobs::finished(api, "Checkpoint", &name, ttl, Some(&now)).await
}

async fn cleanup(cp: Arc<Checkpoint>, ctx: &Context) -> Result<Action, Error> {
    let st = cp.status.clone().unwrap_or_default();
    let (Some(node), Some(id), Some(agent)) = (st.node_name, st.checkpoint_id, ctx.agent.clone())
    else {
        // Nothing was written on a node.
        return Ok(Action::await_change());
    };
    match agent.delete_checkpoint(&node, &id).await {
        Ok(()) => Ok(Action::await_change()),
        Err(e) if e.is_not_found() => Ok(Action::await_change()),
        Err(AgentError::Failed {
            code: 409, message, ..
        }) => {
            // Kept while forks (or their checkpoints) on the node stack the images: said where
            // the API server (which answers a delete with it) and `kubectl describe` see it, and
            // retried with backoff until they are gone.
            let ns = cp.namespace().unwrap_or_default();
            let api: Api<Checkpoint> = Api::namespaced(ctx.client.clone(), &ns);
            let st = status(
                &cp,
                CheckpointPhase::Terminating,
                REASON_IN_USE,
                message.clone(),
            );
            write(ctx, &api, &cp, st).await?;
            Err(Error::Reconcile {
                kind: "Checkpoint",
                name: cp.name_any(),
                message: format!("the images on {node} are in use: {message}"),
            })
        }
        Err(e) => {
            if let crate::nodeloss::NodeHealth::Lost(_) =
                crate::sandbox::node_health(ctx, &node).await?
            {
                return Ok(Action::await_change());
            }
            Err(Error::Reconcile {
                kind: "Checkpoint",
                name: cp.name_any(),
                message: format!("cannot delete the images on {node}: {e}"),
            })
        }
    }
}
