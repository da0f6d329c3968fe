//! The status writing that the Checkpoint and Commit reconcilers share: a status of a phase with
//! its `Ready` condition ([`status`]), and its write with server-side apply ([`write`]), which is
//! skipped when nothing but timestamps changed, and which tells a new failure as a Warning event.
//!
//! One semantics for both kinds: the status is compared whole, except the conditions'
//! `lastTransitionTime` (a reconcile that computes the same status at another instant writes
//! nothing, and publishes no second event); any other change (phase, message, reason, sizes,
//! ids) is written.

use crate::conditions::{self, condition};
use crate::controller::Context;
use crate::crd::{
    Checkpoint, CheckpointPhase, CheckpointStatus, Commit, CommitStatus, Condition, JobPhase,
    API_VERSION,
};
use crate::{Error, FIELD_MANAGER};
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde_json::json;
use std::ops::Deref;

/// A job-like resource whose status has a phase, a message and a `Ready` condition.
pub trait JobResource:
    Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned
{
    type Status: Clone + Default + PartialEq + Serialize;
    type Phase: Copy + PartialEq;
    const KIND: &'static str;
    /// The phase in which `Ready` is true.
    const SUCCEEDED: Self::Phase;

    fn current(&self) -> Option<&Self::Status>;
    /// `old` with these fields replaced.
    fn with(
        old: Self::Status,
        generation: Option<i64>,
        phase: Self::Phase,
        message: Option<String>,
        conditions: Vec<Condition>,
    ) -> Self::Status;
    fn conditions(st: &Self::Status) -> &[Condition];
    fn conditions_mut(st: &mut Self::Status) -> &mut Vec<Condition>;
}

impl JobResource for Checkpoint {
    type Status = CheckpointStatus;
    type Phase = CheckpointPhase;
    const KIND: &'static str = "Checkpoint";
    const SUCCEEDED: CheckpointPhase = CheckpointPhase::Succeeded;

    fn current(&self) -> Option<&CheckpointStatus> {
        self.status.as_ref()
    }
    fn with(
        old: CheckpointStatus,
        observed_generation: Option<i64>,
        phase: CheckpointPhase,
        message: Option<String>,
        conditions: Vec<Condition>,
    ) -> CheckpointStatus {
        CheckpointStatus {
            observed_generation,
            phase,
            message,
            conditions,
            ..old
        }
    }
    fn conditions(st: &CheckpointStatus) -> &[Condition] {
        &st.conditions
    }
    fn conditions_mut(st: &mut CheckpointStatus) -> &mut Vec<Condition> {
        &mut st.conditions
    }
}

impl JobResource for Commit {
    type Status = CommitStatus;
    type Phase = JobPhase;
    const KIND: &'static str = "Commit";
    const SUCCEEDED: JobPhase = JobPhase::Succeeded;

    fn current(&self) -> Option<&CommitStatus> {
        self.status.as_ref()
    }
    fn with(
        old: CommitStatus,
        observed_generation: Option<i64>,
        phase: JobPhase,
        message: Option<String>,
        conditions: Vec<Condition>,
    ) -> CommitStatus {
        CommitStatus {
            observed_generation,
            phase,
            message,
            conditions,
            ..old
        }
    }
    fn conditions(st: &CommitStatus) -> &[Condition] {
        &st.conditions
    }
    fn conditions_mut(st: &mut CommitStatus) -> &mut Vec<Condition> {
        &mut st.conditions
    }
}

/// The object's status in `phase`, with `Ready` (true only when succeeded) of `reason` and
/// `msg`; the other fields are kept. `obj` is the reconciler's `Arc` of the object.
pub fn status<O, J>(obj: &O, phase: J::Phase, reason: &str, msg: String) -> J::Status
where
    O: Deref<Target = J>,
    J: JobResource,
{
    let old = obj.current().cloned().unwrap_or_default();
    let gen = obj.meta().generation;
    let ready = condition(
        J::conditions(&old),
        "Ready",
        phase == J::SUCCEEDED,
        reason,
        msg.clone(),
        gen,
        &conditions::now(),
    );
    J::with(
        old,
        gen,
        phase,
        Some(msg).filter(|m| !m.is_empty()),
        vec![ready],
    )
}

/// True when `new` differs from `old` in more than the conditions' timestamps.
pub fn changed<J: JobResource>(old: &J::Status, new: &J::Status) -> bool {
    let strip = |s: &J::Status| {
        let mut s = s.clone();
        for c in J::conditions_mut(&mut s) {
            c.last_transition_time.clear();
        }
        s
    };
    strip(old) != strip(new)
}

/// Writes `st` as the object's status (server-side apply, the operator's field manager) unless
/// only timestamps changed, and tells a new failure as a Warning event.
pub async fn write<O, J>(ctx: &Context, api: &Api<J>, obj: &O, st: J::Status) -> Result<(), Error>
where
    O: Deref<Target = J>,
    J: JobResource,
{
    let obj: &J = obj;
    let old = obj.current().cloned().unwrap_or_default();
    if !changed::<J>(&old, &st) {
        return Ok(());
    }
    let name = obj.name_any();
    let body = json!({"apiVersion": API_VERSION, "kind": J::KIND, "status": st});
    api.patch_status(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await
    .map_err(Error::kube("patch status of", J::KIND, &name))?;
    ctx.publish_failure(obj, J::conditions(&old), J::conditions(&st))
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{CheckpointSpec, CommitSpec};
    use std::sync::Arc;

    fn cond(reason: &str, message: &str, at: &str) -> Condition {
        Condition {
            type_: "Ready".into(),
            status: "False".into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: at.into(),
            observed_generation: Some(1),
        }
    }

    #[test]
    fn only_timestamps_changing_is_no_change_for_either_kind() {
        let cp = CheckpointStatus {
            phase: CheckpointPhase::Pending,
            message: Some("waiting".into()),
            conditions: vec![cond("WaitingForSandbox", "waiting", "t1")],
            ..Default::default()
        };
        let mut later = cp.clone();
        later.conditions[0].last_transition_time = "t2".into();
        assert!(!changed::<Checkpoint>(&cp, &later));
        // Anything else is a change, the fields the old checkpoint write ignored too.
        let mut sized = later.clone();
        sized.size_bytes = Some(5);
        assert!(changed::<Checkpoint>(&cp, &sized));
        let mut other_msg = later.clone();
        other_msg.conditions[0].message = "still waiting".into();
        assert!(changed::<Checkpoint>(&cp, &other_msg));

        let c = CommitStatus {
            phase: JobPhase::Running,
            conditions: vec![cond("Committing", "", "t1")],
            ..Default::default()
        };
        let mut later = c.clone();
        later.conditions[0].last_transition_time = "t9".into();
        assert!(!changed::<Commit>(&c, &later));
        later.phase = JobPhase::Failed;
        assert!(changed::<Commit>(&c, &later));
    }

    #[test]
    fn status_sets_phase_message_and_ready_and_keeps_the_rest() {
        let mut cp = Checkpoint::new(
            "cp",
            CheckpointSpec {
                sandbox_name: "s".into(),
                pod_name: None,
                keep_running: true,
                persistent_contents: vec![],
                ttl_after_finished: None,
            },
        );
        cp.metadata.generation = Some(3);
        cp.status = Some(CheckpointStatus {
            checkpoint_id: Some("id".into()),
            ..Default::default()
        });
        let st = status(
            &Arc::new(cp),
            CheckpointPhase::Succeeded,
            "Succeeded",
            String::new(),
        );
        assert_eq!(st.phase, CheckpointPhase::Succeeded);
        assert_eq!(st.message, None);
        assert_eq!(st.observed_generation, Some(3));
        assert_eq!(st.checkpoint_id.as_deref(), Some("id"));
        assert_eq!(st.conditions[0].status, "True");

        let c = Commit::new(
            "c",
            CommitSpec {
                pod_name: "s".into(),
                container_name: None,
                image: "i".into(),
                timeout_seconds: None,
                ttl: None,
                registry_auth: None,
                push: None,
            },
        );
        let st = status(
            &Arc::new(c),
            JobPhase::Failed,
            "CommitFailed",
            "boom".into(),
        );
        assert_eq!(st.message.as_deref(), Some("boom"));
        assert_eq!(
            (
                st.conditions[0].status.as_str(),
                st.conditions[0].reason.as_str()
            ),
            ("False", "CommitFailed")
        );
    }
}
