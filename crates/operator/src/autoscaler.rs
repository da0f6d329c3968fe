//! The PoolingAutoScaler reconciler: samples its target SandboxSet (available and starting members
//! from the set's status, claimed members by label, pool misses from an annotation) every
//! [`SAMPLE_PERIOD`], runs the single-host daemon's decision (`warren_core::autoscaler`, the same
//! code, not a copy) and writes the result through the set's `/scale` subresource.
//!
//! The decision's memory (the samples of the observation window, the time of the last scaling)
//! lives in the operator's memory, per autoscaler. A new leader starts with an empty window: it
//! scales up at once if needed but waits a full window before scaling down, which is the safe side.
//! When someone else changes the set's `replicas` (kubectl scale, another controller) the memory is
//! dropped and restarts from the new size, so the autoscaler does not fight with a stale value.

use crate::conditions::{self, condition};
use crate::controller::Context;
use crate::crd::{
    AutoScalerPhase, PoolingAutoScaler, PoolingAutoScalerStatus, Sandbox, SandboxSet, API_VERSION,
};
use crate::error::is_conflict;
use crate::{Error, FIELD_MANAGER, LABEL_CLAIMED, LABEL_SANDBOX_SET};
use chrono::{DateTime, Utc};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use warren_core::autoscaler::{Autoscaler, Decision, Sample};
use warren_core::objects::AutoscalerPolicy;

/// How often an autoscaler samples its pool (the daemon's pool loop ticks at the same order).
pub const SAMPLE_PERIOD: Duration = Duration::from_secs(5);
/// Annotation on a SandboxSet: cumulative count of creates that found it empty, written by
/// `warren serve --cluster` when a claim finds no member (a scale-up signal like the daemon's).
pub const ANNOTATION_MISSES: &str = "warren.dev/pool-misses";
/// Attempts of a scale write that meets a conflicting update of the set.
pub const SCALE_ATTEMPTS: usize = 3;

/// The operator's memory of one autoscaler.
pub struct ScalerState {
    /// The autoscaler's uid: a recreated object starts afresh.
    uid: String,
    state: Autoscaler,
}

/// Compiles the CRD's spec with the daemon's own validation (`objects::PoolingAutoScaler`), so
/// both modes accept and refuse the same YAML with the same messages.
pub fn policy(pas: &PoolingAutoScaler) -> Result<AutoscalerPolicy, String> {
    let obj = json!({
        "apiVersion": API_VERSION,
        "kind": "PoolingAutoScaler",
        "metadata": {"name": pas.name_any()},
        "spec": pas.spec,
    });
    let obj: warren_core::objects::PoolingAutoScaler =
        serde_json::from_value(obj).map_err(|e| format!("spec: {e}"))?;
    obj.compile().map_err(|e| e.0)
}

/// What the pool looks like now, from the set and its claimed members.
pub fn sample(set: &SandboxSet, claimed: u32, now: DateTime<Utc>) -> Sample {
    let st = set.status.clone().unwrap_or_default();
    let available = st.available_replicas.max(0) as u32;
    Sample {
        at: now,
        available,
        claimed,
        starting: (st.replicas - st.available_replicas).max(0) as u32,
        misses: set
            .annotations()
            .get(ANNOTATION_MISSES)
            .and_then(|m| m.parse().ok())
            .unwrap_or(0),
    }
}

fn key(pas: &PoolingAutoScaler) -> String {
    format!("{}/{}", pas.namespace().unwrap_or_default(), pas.name_any())
}

async fn patch_status(
    api: &Api<PoolingAutoScaler>,
    name: &str,
    st: &PoolingAutoScalerStatus,
) -> Result<(), Error> {
    let body = json!({"apiVersion": API_VERSION, "kind": "PoolingAutoScaler", "status": st});
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await
    .map_err(Error::kube("patch status of", "PoolingAutoScaler", name))?;
    Ok(())
}

/// Writes a failure into the status (once) and tells it as an event.
async fn fail(
    ctx: &Context,
    pas: &PoolingAutoScaler,
    reason: &str,
    msg: String,
) -> Result<(), Error> {
    let api: Api<PoolingAutoScaler> =
        Api::namespaced(ctx.client.clone(), &pas.namespace().unwrap_or_default());
    let old = pas.status.clone().unwrap_or_default();
    let gen = pas.meta().generation;
    let st = PoolingAutoScalerStatus {
        observed_generation: gen,
        phase: AutoScalerPhase::Failed,
        conditions: vec![condition(
            &old.conditions,
            "Ready",
            false,
            reason,
            msg,
            gen,
            &conditions::now(),
        )],
        ..old.clone()
    };
    if pas.status.as_ref() != Some(&st) {
        patch_status(&api, &pas.name_any(), &st).await?;
        ctx.publish_failure(pas, &old.conditions, &st.conditions)
            .await;
    }
    Ok(())
}

/// Sets the set's replicas through `/scale`, with the resourceVersion read just before: a
/// concurrent change of the set makes the API server answer 409, and we read and try again.
pub async fn scale(sets: &Api<SandboxSet>, name: &str, replicas: i32) -> Result<(), Error> {
    let mut last = None;
    for _ in 0..SCALE_ATTEMPTS {
        let mut s =
            sets.get_scale(name)
                .await
                .map_err(Error::kube("read scale of", "SandboxSet", name))?;
        s.spec.get_or_insert_with(Default::default).replicas = Some(replicas);
        match sets.replace_scale(name, &PostParams::default(), &s).await {
            Ok(_) => return Ok(()),
            Err(e) if is_conflict(&e) => last = Some(e),
            Err(e) => return Err(Error::kube("write scale of", "SandboxSet", name)(e)),
        }
    }
    Err(Error::kube(
        "write scale (conflicts every time) of",
        "SandboxSet",
        name,
    )(last.expect("at least one attempt")))
}

/// Reconciles one PoolingAutoScaler now.
pub async fn reconcile(pas: Arc<PoolingAutoScaler>, ctx: &Context) -> Result<Action, Error> {
    reconcile_at(pas, ctx, Utc::now()).await
}

/// [`reconcile`] at an explicit time (tests drive the observation window with it).
pub async fn reconcile_at(
    pas: Arc<PoolingAutoScaler>,
    ctx: &Context,
    now: DateTime<Utc>,
) -> Result<Action, Error> {
    let ns = pas.namespace().ok_or(Error::MissingField {
        kind: "PoolingAutoScaler",
        field: "metadata.namespace",
    })?;
    let name = pas.name_any();
    let policy = match policy(&pas) {
        Ok(p) => p,
        Err(msg) => {
            ctx.forget_scaler(&key(&pas));
            fail(ctx, &pas, "InvalidSpec", msg).await?;
            return Ok(Action::await_change());
        }
    };
    let target = policy.target.clone();
    let sets: Api<SandboxSet> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(set) = sets.get_opt(&target).await.map_err(Error::kube(
        "get target of",
        "PoolingAutoScaler",
        &name,
    ))?
    else {
        ctx.forget_scaler(&key(&pas));
        let msg = format!(
            "SandboxSet {target} (spec.scaleTargetRef.name) does not exist in namespace {ns}"
        );
        fail(ctx, &pas, "TargetNotFound", msg.clone()).await?;
        // Backoff through the error policy; creating the set does not wake us (no watch on it).
        return Err(Error::Reconcile {
            kind: "PoolingAutoScaler",
            name,
            message: msg,
        });
    };
    let sandboxes: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &ns);
    let claimed = sandboxes
        .list(&ListParams::default().labels(&format!(
            "{LABEL_SANDBOX_SET}={target},{LABEL_CLAIMED}=true"
        )))
        .await
        .map_err(Error::kube(
            "list claimed members for",
            "PoolingAutoScaler",
            &name,
        ))?
        .items
        .iter()
        .filter(|s| s.meta().deletion_timestamp.is_none())
        .count() as u32;

    let current = set.spec.replicas.max(0) as u32;
    let uid = pas.meta().uid.clone().unwrap_or_default();
    let (decision, desired, st) = ctx.with_scaler(&key(&pas), |slot| {
        let fresh = match slot {
            Some(s) => s.uid != uid || s.state.desired() != current,
            None => true,
        };
        if fresh {
            *slot = Some(ScalerState {
                uid: uid.clone(),
                state: Autoscaler::new(current),
            });
        }
        let s = slot.as_mut().expect("just filled");
        let d = s.state.observe(&policy, sample(&set, claimed, now));
        (d, s.state.desired(), s.state.status.clone())
    });

    if desired != current {
        if let Err(e) = scale(&sets, &target, desired as i32).await {
            // The write did not happen: restart from what the set really says next time.
            ctx.forget_scaler(&key(&pas));
            fail(
                ctx,
                &pas,
                "ScaleFailed",
                format!("cannot scale SandboxSet {target} from {current} to {desired}: {e}"),
            )
            .await?;
            return Err(e);
        }
        tracing::info!(autoscaler = %name, set = %target, from = current, to = desired, reason = %st.reason, "scaled");
    }

    let old = pas.status.clone().unwrap_or_default();
    let gen = pas.meta().generation;
    let reason = match decision {
        Decision::ScaleUp => "ScaledUp",
        Decision::ScaleDown => "ScaledDown",
        Decision::Hold => "Holding",
    };
    let mut msg = st.reason.clone();
    if let Some(cron) = &st.active_schedule {
        msg.push_str(&format!(
            " (schedule {cron:?}: {}..{} replicas)",
            st.min_replicas, st.max_replicas
        ));
    }
    let new = PoolingAutoScalerStatus {
        observed_generation: gen,
        phase: AutoScalerPhase::Active,
        current_replicas: Some(current as i32),
        desired_replicas: Some(desired as i32),
        last_scale_time: st
            .last_scale_time
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .or(old.last_scale_time.clone()),
        conditions: vec![condition(
            &old.conditions,
            "Ready",
            true,
            reason,
            msg,
            gen,
            &conditions::now(),
        )],
    };
    let same = |a: &PoolingAutoScalerStatus, b: &PoolingAutoScalerStatus| {
        let c = |s: &PoolingAutoScalerStatus| {
            conditions::find(&s.conditions, "Ready")
                .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        };
        a.observed_generation == b.observed_generation
            && a.phase == b.phase
            && a.current_replicas == b.current_replicas
            && a.desired_replicas == b.desired_replicas
            && a.last_scale_time == b.last_scale_time
            && c(a) == c(b)
    };
    if !same(&old, &new) {
        let api: Api<PoolingAutoScaler> = Api::namespaced(ctx.client.clone(), &ns);
        patch_status(&api, &name, &new).await?;
    }
    Ok(Action::requeue(SAMPLE_PERIOD))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{PoolingAutoScalerSpec, ScaleTargetRef};

    fn pas(min: i32, max: i32) -> PoolingAutoScaler {
        let mut p = PoolingAutoScaler::new(
            "auto",
            PoolingAutoScalerSpec {
                scale_target_ref: ScaleTargetRef {
                    api_version: None,
                    kind: "SandboxSet".into(),
                    name: "pool".into(),
                },
                observe_window_seconds: 60,
                min_replicas: min,
                max_replicas: max,
                min_available_ratio: "20%".into(),
                max_available_ratio: "90%".into(),
                cooldown_seconds: 60,
                schedule: vec![],
            },
        );
        p.metadata.namespace = Some("testns".into());
        p
    }

    #[test]
    fn the_daemons_validation_applies() {
        assert!(policy(&pas(1, 10)).is_ok());
        assert!(policy(&pas(5, 2))
            .unwrap_err()
            .contains("greater than maxReplicas"));
        assert!(policy(&pas(-1, 2)).unwrap_err().contains("spec"));
        let mut p = pas(1, 3);
        p.spec.min_available_ratio = "95%".into();
        assert!(policy(&p).unwrap_err().contains("minAvailableRatio"));
        let mut p = pas(1, 3);
        p.spec.scale_target_ref.kind = "Deployment".into();
        assert!(policy(&p).unwrap_err().contains("only SandboxSet"));
    }
}
