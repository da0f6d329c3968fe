//! Wiring of the reconcilers into kube-rs controllers: the shared context, the finalizer around
//! the Sandbox reconciler, and the error policy (exponential backoff per object).

use crate::conditions;
use crate::crd::{Checkpoint, Commit, Condition, PoolingAutoScaler, Sandbox, SandboxSet};
use crate::sandbox::{self, PodConfig, CLEANUP_POLL, FINALIZER};
use crate::{autoscaler, sandboxset, Error, LABEL_SANDBOX};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What every reconcile gets.
pub struct Context {
    pub client: Client,
    pub pods: PodConfig,
    /// The node agents (`None`: Sandboxes get their Pods but nothing runs in them, and
    /// Checkpoints and Commits wait).
    pub agent: Option<Arc<dyn crate::agent::NodeAgent>>,
    recorder: Recorder,
    /// Consecutive failures per object (`kind/namespace/name`), for the backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Each PoolingAutoScaler's observation window (`namespace/name`).
    scalers: Mutex<HashMap<String, autoscaler::ScalerState>>,
}

impl Context {
    pub fn new(client: Client, pods: PodConfig) -> Arc<Context> {
        Self::with_agent(client, pods, None)
    }

    pub fn with_agent(
        client: Client,
        pods: PodConfig,
        agent: Option<Arc<dyn crate::agent::NodeAgent>>,
    ) -> Arc<Context> {
        let reporter = Reporter {
            controller: crate::FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Arc::new(Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            pods,
            agent,
            failures: Mutex::default(),
            scalers: Mutex::default(),
        })
    }

    /// Runs `f` on the memory of autoscaler `key` (`None` if it has none yet).
    pub(crate) fn with_scaler<T>(
        &self,
        key: &str,
        f: impl FnOnce(&mut Option<autoscaler::ScalerState>) -> T,
    ) -> T {
        let mut m = self.scalers.lock().unwrap_or_else(|p| p.into_inner());
        let mut slot = m.remove(key);
        let out = f(&mut slot);
        if let Some(s) = slot {
            m.insert(key.to_string(), s);
        }
        out
    }

    pub(crate) fn forget_scaler(&self, key: &str) {
        self.scalers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// Publishes a Warning event when the `Ready` condition turns to a failure reason it did not
    /// have before (so a failure is told once, not at every reconcile). Best effort: an event that
    /// cannot be written is logged, the status already says it.
    pub(crate) async fn publish_failure<K>(&self, obj: &K, old: &[Condition], new: &[Condition])
    where
        K: Resource<DynamicType = ()>,
    {
        let Some(c) = conditions::find(new, "Ready") else {
            return;
        };
        if c.status == "True" || !FAILURE_REASONS.contains(&c.reason.as_str()) {
            return;
        }
        if conditions::find(old, "Ready").is_some_and(|o| o.reason == c.reason) {
            return;
        }
        self.warn(obj, &c.reason, c.message.clone()).await;
    }

    /// Publishes a Warning event with `reason` and `note` on `obj`. Best effort, like
    /// [`Context::publish_failure`].
    pub(crate) async fn warn<K>(&self, obj: &K, reason: &str, note: String)
    where
        K: Resource<DynamicType = ()>,
    {
        let mut note = note;
        // events.k8s.io/v1 refuses notes over 1 kB.
        if note.len() > 1024 {
            let mut cut = 1024;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
        }
        let ev = KubeEvent {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, reason = %reason, "cannot publish event");
        }
    }

    fn key(kind: &str, obj: &impl ResourceExt) -> String {
        format!(
            "{kind}/{}/{}",
            obj.namespace().unwrap_or_default(),
            obj.name_any()
        )
    }

    fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// 1 s, 2 s, 4 s … up to 5 min after consecutive failures of the same object.
    fn backoff(&self, key: String) -> Duration {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = f.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        backoff_for(*n)
    }
}

/// `Ready` reasons that are failures worth an event.
pub const FAILURE_REASONS: &[&str] = &[
    "InvalidSpec",
    "PodCreateFailed",
    "Unschedulable",
    "PodFailed",
    "SandboxStartFailed",
    crate::sandbox::IMAGE_PULL_BACK_OFF,
    "PodConflict",
    "NodeUnreachable",
    "ReconcileFailed",
    "NodeLost",
    "PodLost",
    "PodDeleted",
    "Evicted",
    "SandboxNotFound",
    "SandboxFailed",
    "CheckpointFailed",
    "CommitFailed",
    "RegistryAuthFailed",
    "PauseFailed",
    "TargetNotFound",
    "ScaleFailed",
    crate::fork::CHECKPOINT_LOST,
    crate::fork::CHECKPOINT_NOT_READY,
    crate::checkpoint::REASON_IN_USE,
];

/// Delay after the `n`th consecutive failure (n ≥ 1).
pub fn backoff_for(n: u32) -> Duration {
    Duration::from_secs(1u64 << n.saturating_sub(1).min(9)).min(Duration::from_secs(300))
}

/// The Sandbox reconciler, inside finalizer [`FINALIZER`].
pub async fn reconcile_sandbox(sbx: Arc<Sandbox>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = sbx.namespace().ok_or(Error::MissingField {
        kind: "Sandbox",
        field: "metadata.namespace",
    })?;
    let api: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &ns);
    let name = sbx.name_any();
    let res = finalizer(&api, FINALIZER, sbx.clone(), |ev| async {
        match ev {
            Event::Apply(s) => sandbox::apply(s, &ctx).await,
            Event::Cleanup(s) => sandbox::cleanup(s, &ctx).await,
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
    });
    if res.is_ok() {
        ctx.succeeded(&Context::key("Sandbox", &*sbx));
    }
    res
}

pub fn sandbox_error_policy(sbx: Arc<Sandbox>, err: &Error, ctx: Arc<Context>) -> Action {
    if let Error::WaitingForCleanup(_) = err {
        return Action::requeue(CLEANUP_POLL);
    }
    let delay = ctx.backoff(Context::key("Sandbox", &*sbx));
    tracing::warn!(sandbox = %sbx.name_any(), error = %err, ?delay, "reconcile failed");
    Action::requeue(delay)
}

pub async fn reconcile_sandbox_set(
    set: Arc<SandboxSet>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let res = sandboxset::reconcile(set.clone(), &ctx).await;
    if res.is_ok() {
        ctx.succeeded(&Context::key("SandboxSet", &*set));
    }
    res
}

pub fn sandbox_set_error_policy(set: Arc<SandboxSet>, err: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.backoff(Context::key("SandboxSet", &*set));
    tracing::warn!(sandboxset = %set.name_any(), error = %err, ?delay, "reconcile failed");
    Action::requeue(delay)
}

pub async fn reconcile_autoscaler(
    pas: Arc<PoolingAutoScaler>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let res = autoscaler::reconcile(pas.clone(), &ctx).await;
    if res.is_ok() {
        ctx.succeeded(&Context::key("PoolingAutoScaler", &*pas));
    }
    res
}

pub fn autoscaler_error_policy(
    pas: Arc<PoolingAutoScaler>,
    err: &Error,
    ctx: Arc<Context>,
) -> Action {
    let delay = ctx.backoff(Context::key("PoolingAutoScaler", &*pas));
    tracing::warn!(autoscaler = %pas.name_any(), error = %err, ?delay, "reconcile failed");
    Action::requeue(delay)
}

pub async fn reconcile_checkpoint(cp: Arc<Checkpoint>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key = Context::key("Checkpoint", &*cp);
    let res = crate::checkpoint::reconcile(cp, ctx.clone()).await;
    if res.is_ok() {
        ctx.succeeded(&key);
    }
    res
}

pub async fn reconcile_commit(c: Arc<Commit>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key = Context::key("Commit", &*c);
    let res = crate::commit::reconcile(c, ctx.clone()).await;
    if res.is_ok() {
        ctx.succeeded(&key);
    }
    res
}

pub fn job_error_policy<K>(obj: Arc<K>, err: &Error, ctx: Arc<Context>) -> Action
where
    K: Resource<DynamicType = ()>,
{
    let kind = K::kind(&());
    let delay = ctx.backoff(Context::key(&kind, &*obj));
    tracing::warn!(kind = %kind, name = %obj.name_any(), error = %err, ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Runs the SandboxSet and Sandbox controllers until SIGTERM/SIGINT. `namespace`: watch one
/// namespace, or all of them.
pub async fn run(ctx: Arc<Context>, namespace: Option<&str>) {
    let client = ctx.client.clone();
    fn api<K>(client: &Client, ns: Option<&str>) -> Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let sets = Controller::new(
        api::<SandboxSet>(&client, namespace),
        watcher::Config::default(),
    )
    .owns(
        api::<Sandbox>(&client, namespace),
        watcher::Config::default(),
    )
    .shutdown_on_signal()
    .run(reconcile_sandbox_set, sandbox_set_error_policy, ctx.clone())
    .for_each(|r| async move {
        if let Err(e) = r {
            tracing::debug!(error = %e, "sandboxset controller");
        }
    });
    let sandboxes = Controller::new(
        api::<Sandbox>(&client, namespace),
        watcher::Config::default(),
    )
    .owns(
        api::<Pod>(&client, namespace),
        watcher::Config::default().labels(LABEL_SANDBOX),
    )
    .shutdown_on_signal()
    .run(reconcile_sandbox, sandbox_error_policy, ctx.clone())
    .for_each(|r| async move {
        if let Err(e) = r {
            tracing::debug!(error = %e, "sandbox controller");
        }
    });
    let scalers = Controller::new(
        api::<PoolingAutoScaler>(&client, namespace),
        watcher::Config::default(),
    )
    .shutdown_on_signal()
    .run(reconcile_autoscaler, autoscaler_error_policy, ctx.clone())
    .for_each(|r| async move {
        if let Err(e) = r {
            tracing::debug!(error = %e, "autoscaler controller");
        }
    });
    let checkpoints = Controller::new(
        api::<Checkpoint>(&client, namespace),
        watcher::Config::default(),
    )
    .shutdown_on_signal()
    .run(
        reconcile_checkpoint,
        job_error_policy::<Checkpoint>,
        ctx.clone(),
    )
    .for_each(|r| async move {
        if let Err(e) = r {
            tracing::debug!(error = %e, "checkpoint controller");
        }
    });
    let commits = Controller::new(
        api::<Commit>(&client, namespace),
        watcher::Config::default(),
    )
    .shutdown_on_signal()
    .run(reconcile_commit, job_error_policy::<Commit>, ctx.clone())
    .for_each(|r| async move {
        if let Err(e) = r {
            tracing::debug!(error = %e, "commit controller");
        }
    });
    // Sandbox Pods whose Sandbox is gone, so that the node-agent finalizer never sticks.
    let orphans = Controller::new(
        api::<Pod>(&client, namespace),
        watcher::Config::default().labels(LABEL_SANDBOX),
    )
    .shutdown_on_signal()
    .run(
        crate::podfinalizer::reconcile_pod,
        job_error_policy::<Pod>,
        ctx.clone(),
    )
    .for_each(|r| async move {
        if let Err(e) = r {
            tracing::debug!(error = %e, "sandbox pod controller");
        }
    });
    futures::join!(sets, sandboxes, scalers, checkpoints, commits, orphans);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff_for(1), Duration::from_secs(1));
        assert_eq!(backoff_for(2), Duration::from_secs(2));
        assert_eq!(backoff_for(5), Duration::from_secs(16));
        assert_eq!(backoff_for(30), Duration::from_secs(300));
    }
}
