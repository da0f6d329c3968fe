//! Sandbox network settings as the control plane decides them: egress rules (enforced by the
//! runtime in the kernel) and private traffic (enforced by the router with a per-sandbox token).

use super::Warren;
use crate::auth::Principal;
use crate::error::CoreError;
use crate::state::SandboxState;
use crate::store::SandboxRecord;
use base64::Engine;
use sha2::Digest;
use warren_runtime::{EgressRules, NetworkPolicy};

/// Network options of a create request (E2B's `network` object; `allow_internet_access` is
/// [`crate::CreateRequest::allow_internet`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetworkRequest {
    pub allow_out: Vec<String>,
    pub deny_out: Vec<String>,
    /// `None` means public (E2B's default).
    pub allow_public_traffic: Option<bool>,
}

/// A network update (E2B's `PUT /sandboxes/{id}/network`): it replaces the whole egress
/// configuration, so an omitted field is reset (no rules, internet allowed).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetworkUpdate {
    pub allow_internet: Option<bool>,
    pub allow_out: Vec<String>,
    pub deny_out: Vec<String>,
}

fn egress_rules(allow: &[String], deny: &[String]) -> Result<EgressRules, CoreError> {
    EgressRules::parse(allow, deny).map_err(|e| CoreError::InvalidArgument(e.to_string()))
}

impl NetworkRequest {
    /// The runtime's policy for a new sandbox; rejects entries that are not IPv4 addresses,
    /// blocks or (in `allow_out` only) domain names.
    pub fn policy(&self, allow_internet: Option<bool>) -> Result<NetworkPolicy, CoreError> {
        Ok(NetworkPolicy {
            allow_internet: allow_internet.unwrap_or(true),
            egress: egress_rules(&self.allow_out, &self.deny_out)?,
            allow_public_traffic: self.allow_public_traffic.unwrap_or(true),
        })
    }
}

/// The token a client must present (`E2B-Traffic-Access-Token`) to reach the ports of a sandbox
/// created with `allowPublicTraffic: false`. Derived one-way from the envd access token, so it
/// needs no storage of its own and does not reveal the envd token.
pub fn traffic_access_token(envd_access_token: &str) -> String {
    let digest = sha2::Sha256::digest(format!("warren-traffic:{envd_access_token}").as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest[..24])
}

/// The traffic token of a record, when its traffic is private.
pub fn private_traffic_token(rec: &SandboxRecord) -> Option<String> {
    (!rec.spec.network.allow_public_traffic).then(|| traffic_access_token(&rec.envd_access_token))
}

impl Warren {
    /// Replaces the egress configuration of a running or paused sandbox: the kernel first, then
    /// the record (a failure in between leaves the record as it was; the next update or a
    /// restart re-applies the recorded policy).
    pub async fn update_network(
        &self,
        who: &Principal,
        id: &str,
        update: NetworkUpdate,
    ) -> Result<(), CoreError> {
        let egress = egress_rules(&update.allow_out, &update.deny_out)?;
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let rec = self.visible(who, id).await?;
        if !matches!(rec.state, SandboxState::Running | SandboxState::Paused) {
            return Err(CoreError::Conflict(format!(
                "sandbox {id} is {}, try again",
                rec.state
            )));
        }
        let policy = NetworkPolicy {
            allow_internet: update.allow_internet.unwrap_or(true),
            egress,
            allow_public_traffic: rec.spec.network.allow_public_traffic,
        };
        self.runtime.set_network(id, &policy).await?;
        if let Some(audit) = self.store.audit() {
            audit.record(
                crate::audit::AuditEvent::new(
                    crate::audit::AuditKind::Network,
                    &who.team,
                    &who.key_id,
                    "update network",
                )
                .sandbox(id)
                .detail(serde_json::json!({
                    "allow_internet": policy.allow_internet,
                    "allow_out": policy.egress.allow_out_strings(),
                    "deny_out": policy.egress.deny_out.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
                })),
            );
        }
        self.store
            .update(
                id,
                |s| matches!(s, SandboxState::Running | SandboxState::Paused),
                move |r| {
                    r.allow_internet = policy.allow_internet;
                    r.spec.network = policy;
                },
            )
            .await?;
        tracing::info!(sandbox = %id, "network rules updated");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traffic_tokens_are_stable_and_distinct() {
        let a = traffic_access_token("tok-a");
        assert_eq!(a, traffic_access_token("tok-a"));
        assert_ne!(a, traffic_access_token("tok-b"));
        assert_eq!(a.len(), 32);
        assert!(!a.contains("tok-a"));
    }

    #[test]
    fn request_policy_defaults_and_domains_only_in_allow_out() {
        let p = NetworkRequest::default().policy(None).unwrap();
        assert_eq!(p, NetworkPolicy::default());
        let names = NetworkRequest {
            allow_out: vec!["example.com".into()],
            ..Default::default()
        };
        assert!(names
            .policy(Some(true))
            .unwrap()
            .egress
            .allows_name("example.com"));
        let bad = NetworkRequest {
            deny_out: vec!["example.com".into()],
            ..Default::default()
        };
        assert!(
            matches!(bad.policy(Some(true)), Err(CoreError::InvalidArgument(m)) if m.contains("allow_out"))
        );
    }
}
