//! What the Checkpoint and Commit reconcilers share: finding the sandbox the job is about and
//! whether it can be worked on now, and the `ttl` / `ttlAfterFinished` of a finished job.

use crate::conditions;
use crate::crd::{Sandbox, SandboxPhase};
use k8s_openapi::jiff::Timestamp;
use std::time::Duration;

/// `30s`, `30m`, `12h`, `7d` (the talk's forms); the error names `field`.
pub fn parse_ttl(field: &str, s: &str) -> Result<Duration, String> {
    let bad = || format!("{field}: {s:?} is not a duration like 30s, 30m, 12h or 7d");
    let s2 = s.trim();
    let (num, unit) = s2.split_at(s2.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    Ok(Duration::from_secs(n.checked_mul(secs).ok_or_else(bad)?))
}

/// A finished job (a Checkpoint or Commit named `name`, of `kind`): deleted when its `ttl` has
/// passed since `completed`, else looked at again then; without a ttl it stays.
pub async fn finished<K>(
    api: &kube::Api<K>,
    kind: &'static str,
    name: &str,
    ttl: Option<Duration>,
    completed: Option<&str>,
) -> Result<kube::runtime::controller::Action, crate::error::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    use kube::runtime::controller::Action;
    let Some(ttl) = ttl else {
        return Ok(Action::await_change());
    };
    match ttl_left(ttl, completed, Timestamp::now()) {
        Some(left) if left.is_zero() => {
            match api.delete(name, &kube::api::DeleteParams::default()).await {
                Ok(_) => {}
                Err(e) if crate::error::is_not_found(&e) => {}
                Err(e) => return Err(crate::error::Error::kube("delete expired", kind, name)(e)),
            }
            Ok(Action::await_change())
        }
        Some(left) => Ok(Action::requeue(left)),
        None => Ok(Action::await_change()),
    }
}

/// What a finished job with `ttl` that finished at `completed` should do at `now`.
pub fn ttl_left(ttl: Duration, completed: Option<&str>, now: Timestamp) -> Option<Duration> {
    let done: Timestamp = completed?.parse().ok()?;
    let age = Duration::try_from(now.duration_since(done)).unwrap_or(Duration::ZERO);
    Some(ttl.saturating_sub(age))
}

/// Where a job's sandbox is, if it can be worked on now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// It runs (or is paused) on this node with this node id.
    Ready { node: String, id: String },
    /// Not yet: the message says what it waits for.
    Wait(String),
    /// Never: failed, lost or deleting.
    Gone(String),
}

pub fn target(sbx: &Sandbox) -> Target {
    let name = kube::ResourceExt::name_any(sbx);
    if sbx.metadata.deletion_timestamp.is_some() {
        return Target::Gone(format!("sandbox {name} is being deleted"));
    }
    let st = sbx.status.clone().unwrap_or_default();
    match st.phase {
        SandboxPhase::Failed | SandboxPhase::Terminating => Target::Gone(format!(
            "sandbox {name} is {:?}: {}",
            st.phase,
            st.message.unwrap_or_default()
        )),
        SandboxPhase::Running | SandboxPhase::Paused
            if conditions::is_true(&st.conditions, "Started") =>
        {
            match st.node_name {
                Some(node) => Target::Ready {
                    node,
                    id: crate::agent::node_id(sbx.metadata.uid.as_deref().unwrap_or_default()),
                },
                None => Target::Wait(format!("sandbox {name} has no node yet")),
            }
        }
        p => Target::Wait(format!("waiting for sandbox {name} to run (it is {p:?})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls() {
        assert_eq!(parse_ttl("f", "30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_ttl("f", "30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_ttl("f", "7d"), Ok(Duration::from_secs(604_800)));
        assert!(parse_ttl("spec.ttl", "soon")
            .unwrap_err()
            .contains("spec.ttl"));
        assert!(parse_ttl("f", "5w").is_err());
        assert!(parse_ttl("f", "30").is_err());
        let now: Timestamp = "2026-01-01T00:10:00Z".parse().unwrap();
        assert_eq!(
            ttl_left(Duration::from_secs(900), Some("2026-01-01T00:00:00Z"), now),
            Some(Duration::from_secs(300))
        );
        assert_eq!(
            ttl_left(Duration::from_secs(60), Some("2026-01-01T00:00:00Z"), now),
            Some(Duration::ZERO)
        );
    }
}
