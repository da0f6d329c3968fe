//! Status conditions with Kubernetes' semantics: `lastTransitionTime` changes only when `status`
//! does.

use crate::crd::Condition;

/// Builds a condition of `type_`, keeping `lastTransitionTime` from `old` (the object's current
/// conditions) when the status has not changed.
pub fn condition(
    old: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: &str,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let last_transition_time = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.to_string());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time,
        observed_generation: generation,
    }
}

/// The condition of `type_`, if any.
pub fn find<'a>(conds: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conds.iter().find(|c| c.type_ == type_)
}

/// True when `type_` is present with status `True`.
pub fn is_true(conds: &[Condition], type_: &str) -> bool {
    find(conds, type_).is_some_and(|c| c.status == "True")
}

/// Now, as the RFC 3339 string conditions carry.
pub fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_with_status() {
        let old = vec![condition(
            &[],
            "Ready",
            false,
            "PodPending",
            "",
            Some(1),
            "t0",
        )];
        let same = condition(
            &old,
            "Ready",
            false,
            "WaitingForNodeAgent",
            "x",
            Some(2),
            "t1",
        );
        assert_eq!(same.last_transition_time, "t0");
        assert_eq!(same.reason, "WaitingForNodeAgent");
        let flipped = condition(&old, "Ready", true, "SandboxRunning", "", Some(2), "t2");
        assert_eq!(flipped.last_transition_time, "t2");
        assert!(is_true(&[flipped], "Ready"));
        assert!(!is_true(&old, "Ready"));
    }
}
