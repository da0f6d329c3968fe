//! The Sandbox reconciler: a Pod of the same name per Sandbox (placement, IP, accounting), the
//! Sandbox's status from that Pod and from the node agent's conditions, `shutdownTime` and
//! `pauseTime`, and finalizer [`FINALIZER`] so that a deleted Sandbox stays visible
//! (`Terminating`) until its Pod, and the node state behind it, are gone.
//!
//! Conditions: the operator owns `Ready`; the node agent owns `Started` (the sandbox runs in the
//! Pod), `Paused` (it is frozen). Both write with server-side apply under their own field manager,
//! and `conditions` is a list-map keyed by `type`, so neither overwrites the other's.

use crate::conditions::{self, condition};
use crate::controller::Context;
use crate::crd::{Sandbox, SandboxPhase, SandboxSpec, SandboxStatus, API_VERSION};
use crate::error::{is_conflict, is_not_found};
use crate::nodeloss::{self, NodeHealth, NODE_LOST, NODE_UNREACHABLE, POD_LOST};
use crate::{Error, FIELD_MANAGER, LABEL_SANDBOX};
use k8s_openapi::api::core::v1::{Container, Node, Pod, PodSpec, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// The agent condition `Started`'s reason for a create whose image could not be pulled.
pub const IMAGE_PULL_FAILED: &str = "ImagePullFailed";
/// `Ready`'s reason while such a create is retried with backoff (the Sandbox stays `Pending`).
pub const IMAGE_PULL_BACK_OFF: &str = "ImagePullBackOff";

/// Removed only when the Sandbox's Pod is gone (see [`cleanup`]).
pub const FINALIZER: &str = "warren.dev/node-cleanup";
/// Taint key of nodes dedicated to sandboxes; sandbox Pods tolerate it.
pub const TAINT_KEY: &str = "warren.dev/sandboxes";
/// How long to wait between checks while a Pod is being deleted.
pub const CLEANUP_POLL: Duration = Duration::from_secs(2);

/// How the operator builds sandbox Pods.
#[derive(Debug, Clone)]
pub struct PodConfig {
    /// The Pod's only container: it holds the cgroup, the network namespace and the requests;
    /// the node agent runs the sandbox itself beside it.
    pub placeholder_image: String,
    /// Where sandboxes may run (nodes with the node agent).
    pub node_selector: BTreeMap<String, String>,
    /// A sandbox whose node has been `NotReady` this long is lost (see [`crate::nodeloss`]).
    pub node_lost_after: Duration,
    /// Key of sandboxes' envd access tokens ([`crate::agent::envd_access_token`]); the API
    /// replicas hold the same. Unset: envd runs without a token.
    pub envd_key: Option<String>,
    /// Disk cap (MiB) of a Sandbox whose resources name no `ephemeral-storage`: the Pod gets it
    /// as its ephemeral-storage request and limit (see [`crate::disk`]). 0: none.
    pub sandbox_disk_mb: u64,
}

impl Default for PodConfig {
    fn default() -> Self {
        PodConfig {
            placeholder_image: "registry.k8s.io/pause:3.10".into(),
            node_selector: BTreeMap::from([("warren.dev/node-agent".into(), "true".into())]),
            // Kubelet's default node-monitor grace period is 40 s: a node is NotReady after it,
            // and lost 20 s later.
            node_lost_after: Duration::from_secs(60),
            envd_key: None,
            sandbox_disk_mb: crate::disk::DEFAULT_SANDBOX_DISK_MB,
        }
    }
}

/// The times in a valid spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Times {
    pub shutdown: Option<Timestamp>,
    pub pause: Option<Timestamp>,
}

fn parse_time(field: &str, s: &str) -> Result<Timestamp, String> {
    s.parse::<Timestamp>().map_err(|e| {
        format!("{field}: {s:?} is not an RFC 3339 time like 2026-01-02T15:04:05Z ({e})")
    })
}

/// Checks what the CRD schema cannot; the message names the field.
pub fn validate(spec: &SandboxSpec) -> Result<Times, String> {
    match (&spec.template, &spec.image) {
        (Some(_), Some(_)) => return Err("spec.template and spec.image are exclusive".into()),
        // A fork's root and memory come from its checkpoint.
        (None, None) if spec.restore_from.is_some() => {}
        (None, None) => return Err("one of spec.template and spec.image is required".into()),
        (Some(t), None) if t.is_empty() => return Err("spec.template is empty".into()),
        (None, Some(i)) if i.is_empty() => return Err("spec.image is empty".into()),
        _ => {}
    }
    crate::node_images::validate(spec)?;
    if spec.restore_from.as_deref().is_some_and(str::is_empty) {
        return Err("spec.restoreFrom is empty: name a Checkpoint".into());
    }
    crate::sandbox_network::validate(spec)?;
    let quantities = spec.resources.requests.iter().chain(&spec.resources.limits);
    for (k, v) in quantities {
        if v.trim().is_empty() {
            return Err(format!("spec.resources: {k} has an empty quantity"));
        }
    }
    crate::disk::validate(&spec.resources)?;
    Ok(Times {
        shutdown: spec
            .shutdown_time
            .as_deref()
            .map(|s| parse_time("spec.shutdownTime", s))
            .transpose()?,
        pause: spec
            .pause_time
            .as_deref()
            .map(|s| parse_time("spec.pauseTime", s))
            .transpose()?,
    })
}

/// What `shutdownTime` and `pauseTime` ask for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deadline {
    /// Delete the Sandbox.
    Shutdown,
    /// Set `spec.paused`.
    Pause,
    /// Nothing yet; look again after this long (if anything is scheduled).
    Wait(Option<Duration>),
}

pub fn deadline(spec: &SandboxSpec, times: Times, now: Timestamp) -> Deadline {
    if times.shutdown.is_some_and(|t| t <= now) {
        return Deadline::Shutdown;
    }
    if !spec.paused && times.pause.is_some_and(|t| t <= now) {
        return Deadline::Pause;
    }
    let next = [times.shutdown, times.pause.filter(|_| !spec.paused)]
        .into_iter()
        .flatten()
        .min()
        .map(|t| Duration::try_from(t.duration_since(now)).unwrap_or(Duration::ZERO));
    Deadline::Wait(next)
}

/// The Pod that carries `sbx`.
pub fn build_pod(sbx: &Sandbox, config: &PodConfig) -> Result<Pod, Error> {
    let name = sbx.meta().name.clone().ok_or(Error::MissingField {
        kind: "Sandbox",
        field: "metadata.name",
    })?;
    let uid = sbx.meta().uid.clone().ok_or(Error::MissingField {
        kind: "Sandbox",
        field: "metadata.uid",
    })?;
    let quantities = |m: &BTreeMap<String, String>| {
        (!m.is_empty()).then(|| {
            m.iter()
                .map(|(k, v)| (k.clone(), Quantity(v.clone())))
                .collect::<BTreeMap<_, _>>()
        })
    };
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: sbx.meta().namespace.clone(),
            labels: Some(BTreeMap::from([(LABEL_SANDBOX.to_string(), name)])),
            // Held for the node agent (see crate::podfinalizer): whoever deletes the Pod, it
            // stays until the sandbox's node state is cleaned.
            finalizers: Some(vec![crate::podfinalizer::POD_FINALIZER.into()]),
            owner_references: Some(vec![OwnerReference {
                api_version: API_VERSION.into(),
                kind: "Sandbox".into(),
                name: sbx.name_any(),
                uid,
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "sandbox".into(),
                image: Some(config.placeholder_image.clone()),
                resources: Some({
                    let res = crate::disk::with_disk(&sbx.spec.resources, config.sandbox_disk_mb);
                    ResourceRequirements {
                        requests: quantities(&res.requests),
                        limits: quantities(&res.limits),
                        ..Default::default()
                    }
                }),
                ..Default::default()
            }],
            node_selector: (!config.node_selector.is_empty()).then(|| config.node_selector.clone()),
            tolerations: Some(vec![Toleration {
                key: Some(TAINT_KEY.into()),
                operator: Some("Exists".into()),
                effect: Some("NoSchedule".into()),
                ..Default::default()
            }]),
            // The sandbox talks to nothing in the cluster on its own behalf.
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            termination_grace_period_seconds: Some(5),
            ..Default::default()
        }),
        status: None,
    })
}

pub(crate) fn owned_by(pod: &Pod, sbx: &Sandbox) -> bool {
    let uid = sbx.meta().uid.as_deref();
    pod.owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && Some(o.uid.as_str()) == uid)
}

/// The operator's part of the status, from the Sandbox and its Pod (`None`: not created yet).
pub fn observe(sbx: &Sandbox, pod: Option<&Pod>, now: &str) -> SandboxStatus {
    let old = sbx.status.clone().unwrap_or_default();
    let gen = sbx.meta().generation;
    let node = pod.and_then(|p| p.spec.as_ref()?.node_name.clone());
    let ip = pod.and_then(|p| p.status.as_ref()?.pod_ip.clone());
    let ready = |ok: bool, reason: &str, msg: String| {
        condition(&old.conditions, "Ready", ok, reason, msg, gen, now)
    };
    let (phase, cond) = match pod {
        None => (
            SandboxPhase::Pending,
            ready(false, "PodPending", "waiting for the scheduler to place the pod".into()),
        ),
        Some(p) if !owned_by(p, sbx) => (
            SandboxPhase::Failed,
            ready(
                false,
                "PodConflict",
                format!(
                    "pod {} exists and is not owned by this sandbox; delete it or rename the sandbox",
                    p.name_any()
                ),
            ),
        ),
        Some(p) => pod_state(sbx, p, &old, node.as_deref(), &ready),
    };
    SandboxStatus {
        observed_generation: gen,
        phase,
        message: (cond.status != "True").then(|| cond.message.clone()),
        conditions: vec![cond],
        node_name: node,
        sandbox_ip: ip,
    }
}

fn pod_state(
    sbx: &Sandbox,
    pod: &Pod,
    old: &SandboxStatus,
    node: Option<&str>,
    ready: &dyn Fn(bool, &str, String) -> crate::crd::Condition,
) -> (SandboxPhase, crate::crd::Condition) {
    let status = pod.status.clone().unwrap_or_default();
    let pod_conds = status.conditions.clone().unwrap_or_default();
    match status.phase.as_deref().unwrap_or("Pending") {
        "Pending" if node.is_none() => {
            if let Some(c) = pod_conds
                .iter()
                .find(|c| c.type_ == "PodScheduled" && c.status == "False")
            {
                let msg = c.message.clone().unwrap_or_default();
                return (
                    SandboxPhase::Pending,
                    ready(
                        false,
                        "Unschedulable",
                        format!("pod cannot be scheduled: {msg}"),
                    ),
                );
            }
            (
                SandboxPhase::Pending,
                ready(
                    false,
                    "PodPending",
                    "waiting for the scheduler to place the pod".into(),
                ),
            )
        }
        "Pending" => {
            let waiting = status
                .container_statuses
                .unwrap_or_default()
                .into_iter()
                .find_map(|c| c.state?.waiting);
            let msg = match waiting {
                Some(w) => format!(
                    "pod is starting on {}: {} {}",
                    node.unwrap_or("?"),
                    w.reason.unwrap_or_default(),
                    w.message.unwrap_or_default()
                ),
                None => format!("pod is starting on {}", node.unwrap_or("?")),
            };
            (
                SandboxPhase::Pending,
                ready(false, "PodStarting", msg.trim_end().into()),
            )
        }
        "Running" => {
            let agent = conditions::find(&old.conditions, "Started");
            match agent {
                Some(c) if c.status == "True" => {
                    if conditions::is_true(&old.conditions, "Paused") {
                        (
                            SandboxPhase::Paused,
                            ready(false, "Paused", "the sandbox is paused".into()),
                        )
                    } else {
                        (SandboxPhase::Running, ready(true, "SandboxRunning", String::new()))
                    }
                }
                // Retried with backoff by the agent step (a registry may come back), as
                // kubelet's ImagePullBackOff: pending, not failed.
                Some(c) if c.status == "False" && c.reason == IMAGE_PULL_FAILED => (
                    SandboxPhase::Pending,
                    ready(false, IMAGE_PULL_BACK_OFF, c.message.clone()),
                ),
                Some(c) if c.status == "False" => (
                    SandboxPhase::Failed,
                    ready(
                        false,
                        "SandboxStartFailed",
                        format!("the node agent could not start the sandbox: {}", c.message),
                    ),
                ),
                _ => (
                    SandboxPhase::Pending,
                    ready(
                        false,
                        "WaitingForNodeAgent",
                        format!(
                            "pod is running on {}; waiting for the Warren node agent there to start the sandbox",
                            node.unwrap_or("?")
                        ),
                    ),
                ),
            }
        }
        "Succeeded" | "Failed" => {
            let why = [status.reason, status.message]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(": ");
            (
                SandboxPhase::Failed,
                ready(
                    false,
                    "PodFailed",
                    format!("pod {} ended ({why}); the sandbox is lost", pod.name_any()),
                ),
            )
        }
        other => (
            sbx.status.as_ref().map(|s| s.phase).unwrap_or_default(),
            ready(
                false,
                "NodeUnreachable",
                format!(
                    "pod phase is {other}: node {} is not reporting",
                    node.unwrap_or("?")
                ),
            ),
        ),
    }
}

/// True when `new` (the operator's part) differs from what the object shows.
pub fn status_changed(old: Option<&SandboxStatus>, new: &SandboxStatus) -> bool {
    let Some(old) = old else { return true };
    let ready_old = conditions::find(&old.conditions, "Ready");
    old.phase != new.phase
        || old.message != new.message
        || old.node_name != new.node_name
        || old.sandbox_ip != new.sandbox_ip
        || old.observed_generation != new.observed_generation
        || ready_old != new.conditions.first()
}

/// Writes the operator's part of the status with server-side apply.
pub async fn patch_status(
    api: &Api<Sandbox>,
    name: &str,
    status: &SandboxStatus,
) -> Result<(), Error> {
    let body = json!({"apiVersion": API_VERSION, "kind": "Sandbox", "status": status});
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await
    .map_err(Error::kube("patch status of", "Sandbox", name))?;
    Ok(())
}

fn namespace(sbx: &Sandbox) -> Result<String, Error> {
    sbx.namespace().ok_or(Error::MissingField {
        kind: "Sandbox",
        field: "metadata.namespace",
    })
}

/// Reconciles a live (not deleting) Sandbox that has the finalizer.
pub async fn apply(sbx: Arc<Sandbox>, ctx: &Context) -> Result<Action, Error> {
    let ns = namespace(&sbx)?;
    let name = sbx.name_any();
    let api: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &ns);
    let now = conditions::now();
    let gen = sbx.meta().generation;
    let old = sbx.status.clone().unwrap_or_default();

    let times = match validate(&sbx.spec) {
        Ok(t) => t,
        Err(msg) => {
            let st = SandboxStatus {
                observed_generation: gen,
                phase: SandboxPhase::Failed,
                message: Some(msg.clone()),
                conditions: vec![condition(
                    &old.conditions,
                    "Ready",
                    false,
                    "InvalidSpec",
                    msg,
                    gen,
                    &now,
                )],
                node_name: old.node_name.clone(),
                sandbox_ip: old.sandbox_ip.clone(),
            };
            if status_changed(sbx.status.as_ref(), &st) {
                patch_status(&api, &name, &st).await?;
                ctx.publish_failure(&*sbx, &old.conditions, &st.conditions)
                    .await;
            }
            // Only a spec change can fix it.
            return Ok(Action::await_change());
        }
    };
    let next = match deadline(&sbx.spec, times, Timestamp::now()) {
        Deadline::Shutdown => {
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: sbx.meta().uid.clone(),
                    resource_version: None,
                }),
                ..Default::default()
            };
            match api.delete(&name, &dp).await {
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(Error::kube("delete expired", "Sandbox", &name)(e)),
            }
            return Ok(Action::await_change());
        }
        Deadline::Pause => {
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"paused": true}})),
            )
            .await
            .map_err(Error::kube("pause at pauseTime", "Sandbox", &name))?;
            return Ok(Action::await_change());
        }
        Deadline::Wait(next) => next,
    };
    // Pod and Sandbox changes wake us through the watches; times need a timer.
    let idle = Duration::from_secs(300);
    let requeue = Action::requeue(next.map_or(idle, |d| d.min(idle)));
    // Final: never a new Pod (a new, empty sandbox) under the id of one that was lost.
    if nodeloss::is_lost(sbx.status.as_ref()) {
        crate::podfinalizer::release_if_deleting(&sbx, ctx).await?;
        return Ok(requeue);
    }

    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pod =
        match pods
            .get_opt(&name)
            .await
            .map_err(Error::kube("get pod of", "Sandbox", &name))?
        {
            Some(p) => p,
            // It had a Pod (it was placed on a node): the Pod was deleted under it.
            None if old.node_name.is_some() => {
                let node = old.node_name.clone().unwrap_or_default();
                let (reason, msg) = match node_health(ctx, &node).await? {
                    NodeHealth::Lost(m) => (NODE_LOST, format!("pod {name} is gone: {m}")),
                    _ => (
                        POD_LOST,
                        format!("pod {name} on node {node} was deleted or evicted"),
                    ),
                };
                let st = nodeloss::lost_status(&sbx, reason, msg, &now);
                patch_status(&api, &name, &st).await?;
                ctx.publish_failure(&*sbx, &old.conditions, &st.conditions)
                    .await;
                return Ok(requeue);
            }
            None => {
                let mut pod = build_pod(&sbx, &ctx.pods)?;
                // A fork: only on its checkpoint's node, once the checkpoint is there.
                if let Some(next) = crate::fork::place(&sbx, ctx, &mut pod).await? {
                    return Ok(next);
                }
                match pods.create(&PostParams::default(), &pod).await {
                    Ok(p) => p,
                    // Created meanwhile (our previous attempt, or someone else's pod): look again.
                    Err(e) if is_conflict(&e) => {
                        return Ok(Action::requeue(Duration::from_secs(1)))
                    }
                    Err(e) => {
                        let msg = format!("cannot create pod {name}: {e}");
                        let st = SandboxStatus {
                            observed_generation: gen,
                            phase: SandboxPhase::Pending,
                            message: Some(msg.clone()),
                            conditions: vec![condition(
                                &old.conditions,
                                "Ready",
                                false,
                                "PodCreateFailed",
                                msg,
                                gen,
                                &now,
                            )],
                            node_name: None,
                            sandbox_ip: None,
                        };
                        if status_changed(sbx.status.as_ref(), &st) {
                            patch_status(&api, &name, &st).await?;
                            ctx.publish_failure(&*sbx, &old.conditions, &st.conditions)
                                .await;
                        }
                        return Err(Error::kube("create pod of", "Sandbox", &name)(e));
                    }
                }
            }
        };
    // Deleted under the Sandbox (eviction, drain, kubectl delete pod): lost, then released.
    if owned_by(&pod, &sbx) && pod.meta().deletion_timestamp.is_some() {
        return crate::podfinalizer::pod_deleted(&sbx, &pod, ctx, &api, requeue).await;
    }
    let mut st = observe(&sbx, Some(&pod), &now);
    let mut action = requeue;
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    if let Some(node) = node.filter(|_| owned_by(&pod, &sbx) && nodeloss::needs_node_check(&pod)) {
        match node_health(ctx, &node).await? {
            NodeHealth::Ready => {}
            NodeHealth::Lost(m) => {
                st = nodeloss::lost_status(&sbx, NODE_LOST, format!("pod {name}: {m}"), &now);
                action = Action::await_change();
            }
            NodeHealth::Unreachable { message, recheck } => {
                st.message = Some(message.clone());
                st.conditions = vec![condition(
                    &old.conditions,
                    "Ready",
                    false,
                    NODE_UNREACHABLE,
                    message,
                    gen,
                    &now,
                )];
                action = Action::requeue(recheck);
            }
        }
    }
    if status_changed(sbx.status.as_ref(), &st) {
        patch_status(&api, &name, &st).await?;
        ctx.publish_failure(&*sbx, &old.conditions, &st.conditions)
            .await;
    }
    // The node agent runs the sandbox once the Pod runs on a healthy node.
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    let pod_running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    let healthy = st.phase != SandboxPhase::Failed
        && conditions::find(&st.conditions, "Ready").is_none_or(|c| c.reason != NODE_UNREACHABLE);
    if let (Some(agent), Some(node)) = (&ctx.agent, node) {
        if pod_running && healthy && owned_by(&pod, &sbx) {
            crate::sandbox_agent::drive(
                &sbx,
                &pod,
                &node,
                agent.as_ref(),
                &api,
                &Api::namespaced(ctx.client.clone(), &sbx.namespace().unwrap_or_default()),
                ctx.pods.envd_key.as_deref(),
            )
            .await?;
        }
    }
    Ok(action)
}

/// The health of node `name` now, from its Node object.
pub(crate) async fn node_health(ctx: &Context, name: &str) -> Result<NodeHealth, Error> {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let node = nodes
        .get_opt(name)
        .await
        .map_err(Error::kube("get node of", "Sandbox", name))?;
    Ok(nodeloss::node_health(
        name,
        node.as_ref(),
        Timestamp::now(),
        ctx.pods.node_lost_after,
    ))
}

/// Runs while a deleted Sandbox still has [`FINALIZER`]: deletes its Pod and fails with
/// [`Error::WaitingForCleanup`] until the Pod is gone. The node agent holds its own finalizer on
/// the Pod until it has stopped the sandbox and removed its node state (upper dir, checkpoint
/// images, network rules), so "Pod gone" means "node clean".
pub async fn cleanup(sbx: Arc<Sandbox>, ctx: &Context) -> Result<Action, Error> {
    let ns = namespace(&sbx)?;
    let name = sbx.name_any();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pod =
        pods.get_opt(&name)
            .await
            .map_err(Error::kube("get pod of deleted", "Sandbox", &name))?;
    let Some(pod) = pod.filter(|p| owned_by(p, &sbx)) else {
        return Ok(Action::await_change());
    };
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    let started = sbx
        .status
        .as_ref()
        .is_some_and(|s| conditions::is_true(&s.conditions, "Started"));
    if let (Some(agent), Some(node), true, None) =
        (&ctx.agent, &node, started, &pod.meta().deletion_timestamp)
    {
        // Stop the sandbox before its Pod (and so its cgroup and netns) goes; a dead node has
        // nothing left to stop.
        if let Err(e) = crate::sandbox_agent::stop(&sbx, node, agent.as_ref()).await {
            if !matches!(node_health(ctx, node).await?, NodeHealth::Lost(_)) {
                return Err(e);
            }
        }
    }
    if let (Some(_), None) = (&pod.meta().deletion_timestamp, &node) {
        // Never placed: nothing ran, nothing to clean.
        crate::podfinalizer::release(&pod, &sbx, ctx, false).await?;
    }
    if let (Some(_), Some(node)) = (&pod.meta().deletion_timestamp, node) {
        let lost = matches!(node_health(ctx, &node).await?, NodeHealth::Lost(_));
        // The node agent's finalizer: the sandbox's node state is cleaned (unless the node is
        // lost) before the Pod may go.
        crate::podfinalizer::release(&pod, &sbx, ctx, lost).await?;
        // A Pod on a dead node stays Terminating forever (no kubelet confirms it): nothing is
        // left to clean there, so delete it for good.
        if lost {
            let dp = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: pod.meta().uid.clone(),
                    resource_version: None,
                }),
                ..Default::default()
            };
            match pods.delete(&name, &dp).await {
                Ok(_) => {}
                Err(e) if is_not_found(&e) => return Ok(Action::await_change()),
                Err(e) => {
                    return Err(Error::kube(
                        "force-delete pod (node lost) of",
                        "Sandbox",
                        &name,
                    )(e))
                }
            }
        }
    } else if pod.meta().deletion_timestamp.is_none() {
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: pod.meta().uid.clone(),
                resource_version: None,
            }),
            ..Default::default()
        };
        match pods.delete(&name, &dp).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => return Ok(Action::await_change()),
            Err(e) => return Err(Error::kube("delete pod of", "Sandbox", &name)(e)),
        }
    }
    let old = sbx.status.clone().unwrap_or_default();
    if old.phase != SandboxPhase::Terminating {
        let api: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &ns);
        let gen = sbx.meta().generation;
        let msg = format!("waiting for pod {name} and its node state to be removed");
        let st = SandboxStatus {
            observed_generation: gen,
            phase: SandboxPhase::Terminating,
            message: Some(msg.clone()),
            conditions: vec![condition(
                &old.conditions,
                "Ready",
                false,
                "Terminating",
                msg,
                gen,
                &conditions::now(),
            )],
            node_name: old.node_name.clone(),
            sandbox_ip: old.sandbox_ip.clone(),
        };
        patch_status(&api, &name, &st).await?;
    }
    Err(Error::WaitingForCleanup(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::Resources;

    fn spec() -> SandboxSpec {
        SandboxSpec {
            template: Some("base".into()),
            ..Default::default()
        }
    }

    fn sandbox(spec: SandboxSpec) -> Sandbox {
        let mut s = Sandbox::new("sb1", spec);
        s.metadata.namespace = Some("testns".into());
        s.metadata.uid = Some("uid-sb1".into());
        s.metadata.generation = Some(1);
        s
    }

    #[test]
    fn validation_names_the_field() {
        assert!(validate(&spec()).is_ok());
        let both = SandboxSpec {
            image: Some("alpine".into()),
            ..spec()
        };
        assert!(validate(&both).unwrap_err().contains("exclusive"));
        assert!(validate(&SandboxSpec::default())
            .unwrap_err()
            .contains("one of spec.template and spec.image"));
        let bad_time = SandboxSpec {
            shutdown_time: Some("tomorrow".into()),
            ..spec()
        };
        assert!(validate(&bad_time)
            .unwrap_err()
            .contains("spec.shutdownTime"));
    }

    #[test]
    fn deadlines() {
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let mut s = SandboxSpec {
            shutdown_time: Some("2026-01-01T01:00:00Z".into()),
            pause_time: Some("2026-01-01T00:10:00Z".into()),
            ..spec()
        };
        let t = validate(&s).unwrap();
        assert_eq!(
            deadline(&s, t, now),
            Deadline::Wait(Some(Duration::from_secs(600)))
        );
        let later: Timestamp = "2026-01-01T00:30:00Z".parse().unwrap();
        assert_eq!(deadline(&s, t, later), Deadline::Pause);
        s.paused = true;
        assert_eq!(
            deadline(&s, t, later),
            Deadline::Wait(Some(Duration::from_secs(1800)))
        );
        let end: Timestamp = "2026-01-01T01:00:00Z".parse().unwrap();
        assert_eq!(deadline(&s, t, end), Deadline::Shutdown);
        assert_eq!(
            deadline(&spec(), validate(&spec()).unwrap(), now),
            Deadline::Wait(None)
        );
    }

    #[test]
    fn pod_carries_resources_owner_and_placement() {
        let mut s = spec();
        s.resources = Resources {
            requests: BTreeMap::from([("cpu".into(), "500m".into())]),
            limits: BTreeMap::from([("memory".into(), "512Mi".into())]),
        };
        let pod = build_pod(&sandbox(s), &PodConfig::default()).unwrap();
        let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("Sandbox", "uid-sb1")
        );
        assert_eq!(owner.controller, Some(true));
        let spec = pod.spec.unwrap();
        let res = spec.containers[0].resources.clone().unwrap();
        assert_eq!(res.requests.unwrap()["cpu"], Quantity("500m".into()));
        assert_eq!(res.limits.unwrap()["memory"], Quantity("512Mi".into()));
        assert_eq!(spec.node_selector.unwrap()["warren.dev/node-agent"], "true");
        assert_eq!(spec.automount_service_account_token, Some(false));
    }

    fn pod_with(status: serde_json::Value) -> Pod {
        let s = sandbox(spec());
        let mut pod = build_pod(&s, &PodConfig::default()).unwrap();
        if status["phase"] != "Pending" || status.get("containerStatuses").is_some() {
            pod.spec.as_mut().unwrap().node_name = Some("node-a".into());
        }
        pod.status = Some(serde_json::from_value(status).unwrap());
        pod
    }

    #[test]
    fn status_explains_each_pod_state() {
        let s = sandbox(spec());
        let st = observe(&s, None, "t");
        assert_eq!(st.phase, SandboxPhase::Pending);

        let unsched = pod_with(
            json!({"phase": "Pending", "conditions": [{"type": "PodScheduled",
            "status": "False", "reason": "Unschedulable", "message": "0/3 nodes are available: 3 Insufficient cpu."}]}),
        );
        let st = observe(&s, Some(&unsched), "t");
        assert_eq!(st.conditions[0].reason, "Unschedulable");
        assert!(st.message.unwrap().contains("Insufficient cpu"));

        let pulling = pod_with(
            json!({"phase": "Pending", "containerStatuses": [{"name": "sandbox",
            "image": "x", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}}}]}),
        );
        let st = observe(&s, Some(&pulling), "t");
        assert!(st
            .message
            .unwrap()
            .contains("ImagePullBackOff no such image"));

        let running = pod_with(json!({"phase": "Running", "podIP": "10.1.2.3"}));
        let st = observe(&s, Some(&running), "t");
        assert_eq!(
            (st.phase, st.conditions[0].reason.as_str()),
            (SandboxPhase::Pending, "WaitingForNodeAgent")
        );
        assert_eq!(st.sandbox_ip.as_deref(), Some("10.1.2.3"));
        assert_eq!(st.node_name.as_deref(), Some("node-a"));

        let mut started = s.clone();
        started.status = Some(SandboxStatus {
            conditions: vec![condition(
                &[],
                "Started",
                true,
                "Started",
                "",
                Some(1),
                "t0",
            )],
            ..Default::default()
        });
        let st = observe(&started, Some(&running), "t");
        assert_eq!(st.phase, SandboxPhase::Running);
        assert!(conditions::is_true(&st.conditions, "Ready"));
        assert_eq!(st.message, None);

        started.status.as_mut().unwrap().conditions.push(condition(
            &[],
            "Paused",
            true,
            "Frozen",
            "",
            Some(1),
            "t0",
        ));
        assert_eq!(
            observe(&started, Some(&running), "t").phase,
            SandboxPhase::Paused
        );

        let evicted = pod_with(
            json!({"phase": "Failed", "reason": "Evicted", "message": "node low on memory"}),
        );
        let st = observe(&s, Some(&evicted), "t");
        assert_eq!(st.phase, SandboxPhase::Failed);
        assert!(st.message.unwrap().contains("Evicted: node low on memory"));

        let mut foreign = running.clone();
        foreign.metadata.owner_references = None;
        let st = observe(&s, Some(&foreign), "t");
        assert_eq!(st.conditions[0].reason, "PodConflict");
    }
}
