//! A Sandbox's egress policy: from its spec (`allowInternetAccess`, `network.allowOut`,
//! `network.denyOut`) to the node agent, at create and live when the spec changes.
//!
//! The agent's outcome is condition `NetworkPolicy` (owned by the agent's field manager, with
//! `Started` and `Paused`): `True` with the applied policy's canonical description as message,
//! or `False` (`NetworkPolicyFailed`) with the agent's reason, final for that generation. The
//! reconciler compares the message with the spec's description to know whether to update.

use crate::agent::{node_id, AgentError, EgressSpec, NetworkUpdateRequest, NodeAgent, PodRef};
use crate::conditions;
use crate::crd::{Condition, Sandbox, SandboxSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::{Resource, ResourceExt};

/// The agent's condition type.
pub const CONDITION: &str = "NetworkPolicy";

/// The egress policy a spec asks for.
pub fn egress_of(spec: &SandboxSpec) -> EgressSpec {
    let net = spec.network.clone().unwrap_or_default();
    EgressSpec {
        allow_internet: spec.allow_internet_access.unwrap_or(true),
        allow_out: net.allow_out,
        deny_out: net.deny_out,
    }
}

/// What the CRD's schema cannot check; the message names the field.
pub fn validate(spec: &SandboxSpec) -> Result<(), String> {
    egress_of(spec)
        .rules()
        .map(|_| ())
        .map_err(|e| format!("spec.network: {e}"))
}

/// The condition for a policy the agent applied.
pub fn applied(old: &[Condition], spec: &EgressSpec, gen: Option<i64>, now: &str) -> Condition {
    conditions::condition(old, CONDITION, true, "Applied", spec.describe(), gen, now)
}

/// Whether the agent must be asked to replace the running sandbox's policy: the applied one
/// differs from the spec's. No condition means the create applied the default, or an agent
/// older than egress policies made the sandbox. A failure is not retried until the spec changes.
pub fn needs_update(sbx: &Sandbox) -> bool {
    let conds = sbx
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    if !conditions::is_true(conds, "Started") {
        return false;
    }
    let want = egress_of(&sbx.spec);
    match conditions::find(conds, CONDITION) {
        None => !want.is_default(),
        Some(c) if c.status == "True" => c.message != want.describe(),
        Some(c) => c.observed_generation != sbx.meta().generation,
    }
}

/// Asks the agent on `node` to apply the spec's policy; the resulting condition, or the error
/// when the agent could not be reached (retried with backoff, nothing is final then).
pub async fn update(
    sbx: &Sandbox,
    pod: &Pod,
    node: &str,
    agent: &dyn NodeAgent,
    old: &[Condition],
    now: &str,
) -> Result<Condition, AgentError> {
    let want = egress_of(&sbx.spec);
    let gen = sbx.meta().generation;
    let req = NetworkUpdateRequest {
        network: want.clone(),
        pod: PodRef {
            namespace: pod.namespace().unwrap_or_default(),
            name: pod.name_any(),
            uid: pod.meta().uid.clone().unwrap_or_default(),
            ip: pod.status.as_ref().and_then(|s| s.pod_ip.clone()),
        },
        netns: None,
    };
    let id = node_id(sbx.meta().uid.as_deref().unwrap_or_default());
    match agent.update_network(node, &id, &req).await {
        Ok(()) => Ok(applied(old, &want, gen, now)),
        Err(e @ AgentError::Unreachable { .. }) => Err(e),
        Err(e) => Ok(conditions::condition(
            old,
            CONDITION,
            false,
            "NetworkPolicyFailed",
            e.to_string(),
            gen,
            now,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{SandboxNetwork, SandboxStatus};

    fn sbx(conds: Vec<Condition>, allow_internet: Option<bool>) -> Sandbox {
        let mut s = Sandbox::new(
            "s",
            SandboxSpec {
                template: Some("base".into()),
                allow_internet_access: allow_internet,
                ..Default::default()
            },
        );
        s.metadata.generation = Some(2);
        s.status = Some(SandboxStatus {
            conditions: conds,
            ..Default::default()
        });
        s
    }

    fn c(t: &str, ok: bool, msg: &str, gen: i64) -> Condition {
        let mut c = conditions::condition(&[], t, ok, "R", msg, Some(gen), "t");
        c.message = msg.into();
        c
    }

    #[test]
    fn spec_maps_to_the_agents_policy_and_domains_are_invalid() {
        let mut spec = SandboxSpec {
            allow_internet_access: Some(false),
            network: Some(SandboxNetwork {
                allow_out: vec!["10.0.0.1".into()],
                deny_out: vec![],
            }),
            ..Default::default()
        };
        let e = egress_of(&spec);
        assert!(!e.allow_internet && e.allow_out == ["10.0.0.1"]);
        assert!(validate(&spec).is_ok());
        spec.network
            .as_mut()
            .unwrap()
            .allow_out
            .push("pypi.org".into());
        let msg = validate(&spec).unwrap_err();
        assert!(
            msg.starts_with("spec.network: ") && msg.contains("pypi.org"),
            "{msg}"
        );
        assert!(egress_of(&SandboxSpec::default()).is_default());
    }

    #[test]
    fn updates_follow_the_applied_description() {
        let started = c("Started", true, "", 1);
        // Not started: the create will carry the policy.
        assert!(!needs_update(&sbx(vec![], Some(false))));
        // Started with the default and no record: nothing to do; with a closed spec: update.
        assert!(!needs_update(&sbx(vec![started.clone()], None)));
        assert!(needs_update(&sbx(vec![started.clone()], Some(false))));
        let closed = egress_of(&sbx(vec![], Some(false)).spec).describe();
        let applied_closed = c(CONDITION, true, &closed, 1);
        assert!(!needs_update(&sbx(
            vec![started.clone(), applied_closed.clone()],
            Some(false)
        )));
        assert!(needs_update(&sbx(
            vec![started.clone(), applied_closed],
            Some(true)
        )));
        // A failure waits for the next generation.
        let failed_now = c(CONDITION, false, "boom", 2);
        assert!(!needs_update(&sbx(
            vec![started.clone(), failed_now],
            Some(false)
        )));
        let failed_before = c(CONDITION, false, "boom", 1);
        assert!(needs_update(&sbx(
            vec![started, failed_before],
            Some(false)
        )));
    }

    #[test]
    fn a_sets_network_reaches_its_members_and_is_validated() {
        let mut set = crate::mock::set(1, 1).spec;
        set.allow_internet_access = Some(false);
        set.network = Some(SandboxNetwork {
            allow_out: vec!["10.0.0.7".into()],
            deny_out: vec![],
        });
        let member = crate::sandboxset::member_spec(&set);
        assert_eq!(egress_of(&member).allow_out, ["10.0.0.7"]);
        assert!(!egress_of(&member).allow_internet);
        assert!(crate::sandboxset::validate(&set).is_ok());
        set.network.as_mut().unwrap().allow_out = vec!["*.pypi.org".into()];
        let e = crate::sandboxset::validate(&set).unwrap_err();
        assert!(
            e.contains("spec.network") && e.contains("*.pypi.org"),
            "{e}"
        );
    }
}
