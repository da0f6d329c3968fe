//! The egress policy of a sandbox on the wire between the operator and the node agent, and its
//! checks. The agent enforces it inside the Pod's network namespace
//! (`warren_runtime::linux::podnet`): besides these rules it always drops the cloud metadata
//! range and the cluster's ranges (Pod and Service networks, the node's addresses) unless an
//! `allowOut` block inside them names them.
//!
//! The semantics are single-host mode's (`warren_runtime::egress`): `allowOut` entries are
//! exceptions to `denyOut` and to `allowInternet: false`. Domain names in `allowOut` are refused,
//! since they need the single-host daemon's DNS filter.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use warren_runtime::EgressRules;

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// A sandbox's egress policy as the operator asks for it. The default (internet allowed, no
/// rules) still closes the metadata service and the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressSpec {
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub allow_internet: bool,
    /// IPv4 addresses or CIDR blocks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_out: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_out: Vec<String>,
}

impl Default for EgressSpec {
    fn default() -> Self {
        EgressSpec {
            allow_internet: true,
            allow_out: Vec::new(),
            deny_out: Vec::new(),
        }
    }
}

impl EgressSpec {
    pub fn is_default(&self) -> bool {
        *self == EgressSpec::default()
    }

    /// The parsed rules, or the reason they cannot be enforced in a Pod (the message names
    /// the entry, as single-host mode's does).
    pub fn rules(&self) -> Result<EgressRules, String> {
        let rules =
            EgressRules::parse(&self.allow_out, &self.deny_out).map_err(|e| e.to_string())?;
        rules.refuse_domains().map_err(|e| e.to_string())?;
        Ok(rules)
    }

    /// A canonical one-line description (blocks normalised, sorted, deduplicated): two specs
    /// that enforce the same describe the same, so the reconciler compares descriptions to know
    /// whether the agent applied the current one.
    pub fn describe(&self) -> String {
        let (allow, deny) = match self.rules() {
            Ok(r) => {
                let mut a: Vec<String> = r.allow_out.iter().map(|c| c.to_string()).collect();
                let mut d: Vec<String> = r.deny_out.iter().map(|c| c.to_string()).collect();
                for l in [&mut a, &mut d] {
                    l.sort();
                    l.dedup();
                }
                (a, d)
            }
            Err(_) => (self.allow_out.clone(), self.deny_out.clone()),
        };
        format!(
            "allowInternet={} allowOut=[{}] denyOut=[{}]",
            self.allow_internet,
            allow.join(","),
            deny.join(",")
        )
    }
}

/// Replaces a sandbox's policy live (`POST /v1/sandboxes/{id}/network`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkUpdateRequest {
    #[serde(default)]
    pub network: EgressSpec,
    /// The sandbox's Pod, to find its network namespace when no process of the sandbox runs
    /// (hibernated).
    #[serde(default)]
    pub pod: super::PodRef,
    /// The Pod's network namespace, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_open_internet_and_skipped_on_the_wire() {
        let d = EgressSpec::default();
        assert!(d.is_default() && d.allow_internet);
        assert_eq!(serde_json::to_string(&d).unwrap(), "{}");
        assert_eq!(serde_json::from_str::<EgressSpec>("{}").unwrap(), d);
        let closed = EgressSpec {
            allow_internet: false,
            allow_out: vec!["10.0.0.1".into()],
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&closed).unwrap(),
            r#"{"allowInternet":false,"allowOut":["10.0.0.1"]}"#
        );
    }

    #[test]
    fn domains_and_bad_entries_are_refused_with_the_entry_named() {
        let names = EgressSpec {
            allow_out: vec!["pypi.org".into()],
            ..Default::default()
        };
        let e = names.rules().unwrap_err();
        assert!(e.contains("pypi.org") && e.contains("Pods"), "{e}");
        let bad = EgressSpec {
            deny_out: vec!["1.2.3.4/40".into()],
            ..Default::default()
        };
        assert!(bad.rules().unwrap_err().contains("1.2.3.4/40"));
    }

    #[test]
    fn descriptions_are_canonical() {
        let a = EgressSpec {
            allow_internet: false,
            allow_out: vec!["10.1.2.3/8".into(), "1.1.1.1".into(), "1.1.1.1/32".into()],
            deny_out: vec![],
        };
        let b = EgressSpec {
            allow_internet: false,
            allow_out: vec!["1.1.1.1/32".into(), "10.0.0.0/8".into()],
            deny_out: vec![],
        };
        assert_eq!(a.describe(), b.describe());
        assert_eq!(
            a.describe(),
            "allowInternet=false allowOut=[1.1.1.1/32,10.0.0.0/8] denyOut=[]"
        );
        assert_ne!(a.describe(), EgressSpec::default().describe());
    }

    /// The live update travels over the agent's HTTP edge like every other call: body, errors
    /// and the 400 for a malformed body.
    #[tokio::test]
    async fn update_network_over_http() {
        use crate::agent::fake::FakeAgent;
        use crate::agent::http::{AgentAddress, HttpNodeAgent};
        use crate::agent::{AgentError, NodeAgent, PodRef};
        use std::sync::Arc;
        let fake = Arc::new(FakeAgent::default());
        let app = crate::agent::server::router(fake.clone(), "node-a".into(), Some("t".into()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let client = HttpNodeAgent::new(
            AgentAddress::Fixed(format!("http://{addr}")),
            Some("t".into()),
        );
        let req = NetworkUpdateRequest {
            network: EgressSpec {
                allow_internet: false,
                allow_out: vec!["10.0.0.7".into()],
                deny_out: vec!["10.0.0.0/8".into()],
            },
            pod: PodRef {
                uid: "pod-uid".into(),
                ..Default::default()
            },
            netns: None,
        };
        client.update_network("x", "abc", &req).await.unwrap();
        assert_eq!(fake.calls(), ["update_network node-a abc"]);
        assert_eq!(fake.network_updates.lock().unwrap()[0], req);
        fake.fail(
            "update_network",
            AgentError::Failed {
                node: "node-a".into(),
                code: 400,
                message: "allow_out domain names".into(),
            },
        );
        let e = client.update_network("x", "abc", &req).await.unwrap_err();
        assert!(matches!(e, AgentError::Failed { code: 400, .. }), "{e}");
        fake.fail(
            "update_network",
            AgentError::NotFound {
                node: "node-a".into(),
                message: "no sandbox abc".into(),
            },
        );
        assert!(client
            .update_network("x", "abc", &req)
            .await
            .unwrap_err()
            .is_not_found());
        // The create request carries the policy only when it is not the default.
        let create = crate::agent::CreateRequest {
            network: req.network.clone(),
            ..Default::default()
        };
        let v = serde_json::to_value(&create).unwrap();
        assert_eq!(v["network"]["allowInternet"], false);
        let v = serde_json::to_value(crate::agent::CreateRequest::default()).unwrap();
        assert!(v.get("network").is_none(), "{v}");
    }
}
