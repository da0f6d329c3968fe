//! The Commit reconciler: asks the node agent on the sandbox's node to turn the sandbox's
//! filesystem changes into an OCI image (frozen for the copy) and push it with the Secrets named
//! in `registryAuth`, records digest, size and duration, and deletes the Commit `ttl` after it
//! finished. The image lives in the registry (and the node's layer store), not in the Commit:
//! deleting the Commit does not delete the image, as with OpenKruise Agents' commits, so no
//! finalizer is needed.

use crate::agent::{node_id, AgentError, CommitRequest};
use crate::conditions;
use crate::controller::Context;
use crate::crd::{Commit, CommitStatus, JobPhase, Sandbox};
use crate::jobs::{self, Target};
use crate::jobstatus::{status, write};
use crate::Error;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use std::sync::Arc;
use std::time::Duration;

/// Checks what the schema cannot; the message names the field.
pub fn validate(spec: &crate::crd::CommitSpec) -> Result<Option<Duration>, String> {
    if spec.pod_name.is_empty() {
        return Err("spec.podName is empty".into());
    }
    let image = spec.image.trim();
    if image.is_empty() || image.contains(char::is_whitespace) || image.starts_with('/') {
        return Err(format!(
            "spec.image: {:?} is not an image reference like registry/repo:tag",
            spec.image
        ));
    }
    if spec.timeout_seconds.is_some_and(|t| t <= 0) {
        return Err("spec.timeoutSeconds must be positive".into());
    }
    spec.ttl
        .as_deref()
        .map(|t| jobs::parse_ttl("spec.ttl", t))
        .transpose()
}

pub async fn reconcile(c: Arc<Commit>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = c.namespace().ok_or(Error::MissingField {
        kind: "Commit",
        field: "metadata.namespace",
    })?;
    let api: Api<Commit> = Api::namespaced(ctx.client.clone(), &ns);
    let name = c.name_any();
    let old = c.status.clone().unwrap_or_default();
    let ttl = match validate(&c.spec) {
        Ok(t) => t,
        Err(msg) => {
            write(
                &ctx,
                &api,
                &c,
                status(&c, JobPhase::Failed, "InvalidSpec", msg),
            )
            .await?;
            return Ok(Action::await_change());
        }
    };
    if matches!(old.phase, JobPhase::Succeeded | JobPhase::Failed) {
        return jobs::finished(&api, "Commit", &name, ttl, old.completion_time.as_deref()).await;
    }
    let Some(agent) = ctx.agent.clone() else {
        return Err(Error::Reconcile {
            kind: "Commit",
            name,
            message: "the operator runs without node agents".into(),
        });
    };
    let sandboxes: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &ns);
    let sbx_name = c.spec.pod_name.clone();
    let fail = |reason: &str, msg: String| {
        let mut st = status(&c, JobPhase::Failed, reason, msg);
        st.completion_time = Some(conditions::now());
        st
    };
    let Some(sbx) = sandboxes.get_opt(&sbx_name).await.map_err(Error::kube(
        "get sandbox of",
        "Commit",
        &name,
    ))?
    else {
        let st = fail(
            "SandboxNotFound",
            format!("sandbox {sbx_name} (spec.podName) does not exist in namespace {ns}"),
        );
        let done = st.completion_time.clone();
        write(&ctx, &api, &c, st).await?;
        return jobs::finished(&api, "Commit", &name, ttl, done.as_deref()).await;
    };
    let (node, id) = match jobs::target(&sbx) {
        Target::Ready { node, id } => (node, id),
        Target::Wait(msg) => {
            write(
                &ctx,
                &api,
                &c,
                status(&c, JobPhase::Pending, "WaitingForSandbox", msg),
            )
            .await?;
            return Ok(Action::requeue(crate::checkpoint::WAIT_POLL));
        }
        Target::Gone(msg) => {
            let st = fail("SandboxFailed", msg);
            let done = st.completion_time.clone();
            write(&ctx, &api, &c, st).await?;
            return jobs::finished(&api, "Commit", &name, ttl, done.as_deref()).await;
        }
    };
    let started = old.start_time.clone().unwrap_or_else(conditions::now);
    if old.phase != JobPhase::Running {
        let mut st = status(
            &c,
            JobPhase::Running,
            "Committing",
            format!(
                "the node agent on {node} is committing sandbox {sbx_name} to {}",
                c.spec.image
            ),
        );
        st.node_name = Some(node.clone());
        st.start_time = Some(started.clone());
        write(&ctx, &api, &c, st).await?;
    }
    let secrets = c.spec.registry_auth.clone().unwrap_or_default().secrets;
    let push = c.spec.push.unwrap_or(!secrets.is_empty());
    // The agent reads no Secrets: the operator hands it the one entry the push needs.
    let registry_credentials = if push && !secrets.is_empty() {
        let secrets_api: Api<k8s_openapi::api::core::v1::Secret> =
            Api::namespaced(ctx.client.clone(), &ns);
        match crate::registry_auth::credentials_for(&secrets_api, &secrets, &c.spec.image).await {
            Ok(creds) => Some(creds),
            Err(msg) => {
                let st = fail("RegistryAuthFailed", msg);
                let done = st.completion_time.clone();
                write(&ctx, &api, &c, st).await?;
                return jobs::finished(&api, "Commit", &name, ttl, done.as_deref()).await;
            }
        }
    } else {
        None
    };
    let req = CommitRequest {
        commit_id: node_id(c.meta().uid.as_deref().unwrap_or_default()),
        image: c.spec.image.clone(),
        push,
        registry_secrets: secrets,
        registry_credentials,
        timeout_seconds: c.spec.timeout_seconds,
    };
    let st = match agent.commit(&node, &id, &req).await {
        Ok(info) => {
            let mut st = status(
                &c,
                JobPhase::Succeeded,
                "Succeeded",
                format!(
                    "{} as {} ({} bytes, {} ms)",
                    c.spec.image, info.digest, info.size_bytes, info.duration_ms
                ),
            );
            st.commit_id = Some(info.digest);
            st.size_bytes = Some(info.size_bytes as i64);
            st.duration_ms = Some(info.duration_ms as i64);
            st
        }
        Err(e @ AgentError::Unreachable { .. }) => {
            return Err(Error::Reconcile {
                kind: "Commit",
                name,
                message: e.to_string(),
            })
        }
        Err(e) => status(
            &c,
            JobPhase::Failed,
            "CommitFailed",
            format!("sandbox {sbx_name}: {e}"),
        ),
    };
    let done = conditions::now();
    let st = CommitStatus {
        node_name: Some(node),
        start_time: Some(started),
        completion_time: Some(done.clone()),
        ..st
    };
    write(&ctx, &api, &c, st).await?;
    jobs::finished(&api, "Commit", &name, ttl, Some(&done)).await
}
