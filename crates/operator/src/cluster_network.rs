//! Network settings in cluster mode of the E2B API: `allow_internet_access` and `network` in a
//! create body, and `PUT /sandboxes/{id}/network`, as single-host mode takes them (the same
//! parser, `warren_core::NetworkRequest`, so the same entries are refused with the same
//! messages). They become the Sandbox's `spec.allowInternetAccess` and `spec.network`, which the
//! operator hands to the node agent; the API answers once the agent reports the policy applied
//! (condition `NetworkPolicy`), so a client never holds a sandbox whose policy is not yet in
//! force.
//!
//! What a Pod cannot enforce is refused rather than ignored: domain names in `allowOut` (they
//! need the single-host DNS filter) and `allowPublicTraffic: false` (the cluster router does not
//! check traffic tokens yet).

use crate::agent::EgressSpec;
use crate::cluster_api::{check_key, kube_error, ApiError, ClusterApi, NewSandbox};
use crate::crd::{Sandbox, SandboxNetwork, SandboxPhase};
use crate::sandbox_network::{egress_of, CONDITION};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use kube::api::{Patch, PatchParams};
use kube::Resource;
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

/// E2B's `SandboxNetworkConfig` in a create body. What Warren lacks (`egressProxy`, `rules`,
/// ...) was refused before, by `warren_core::e2b_features`, as in single-host mode.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkConfigJson {
    #[serde(default, alias = "allow_public_traffic")]
    pub allow_public_traffic: Option<bool>,
    #[serde(default, alias = "allow_out")]
    pub allow_out: Option<Vec<String>>,
    #[serde(default, alias = "deny_out")]
    pub deny_out: Option<Vec<String>>,
}

/// `SandboxNetworkUpdateConfig`: replaces the whole egress configuration (an omitted field is
/// reset: no rules, internet allowed), as single-host mode does.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkUpdateJson {
    #[serde(default, alias = "allow_out")]
    pub allow_out: Option<Vec<String>>,
    #[serde(default, alias = "deny_out")]
    pub deny_out: Option<Vec<String>>,
    #[serde(rename = "allow_internet_access", alias = "allowInternetAccess")]
    pub allow_internet_access: Option<bool>,
}

/// Checks entries as single-host mode does, then what a Pod cannot enforce.
fn checked(
    allow_internet: Option<bool>,
    allow_out: Vec<String>,
    deny_out: Vec<String>,
) -> Result<EgressSpec, ApiError> {
    let req = warren_core::NetworkRequest {
        allow_out: allow_out.clone(),
        deny_out: deny_out.clone(),
        allow_public_traffic: None,
    };
    req.policy(allow_internet)
        .map_err(|e| ApiError::new(400, e.to_string()))?;
    let spec = EgressSpec {
        allow_internet: allow_internet.unwrap_or(true),
        allow_out,
        deny_out,
    };
    spec.rules().map_err(|m| ApiError::new(400, m))?;
    Ok(spec)
}

/// The egress policy a create body asks for (the default when it asks for none).
pub fn requested(req: &NewSandbox) -> Result<EgressSpec, ApiError> {
    let net = req.network.clone().unwrap_or_default();
    if net.allow_public_traffic == Some(false) {
        return Err(ApiError::new(
            400,
            "network.allowPublicTraffic: false is not supported in cluster mode yet (the \
             cluster router does not check traffic access tokens); leave it unset or true",
        ));
    }
    checked(
        req.allow_internet_access,
        net.allow_out.unwrap_or_default(),
        net.deny_out.unwrap_or_default(),
    )
}

/// The spec fields of a policy, as a JSON merge patch (`null` removes a field: the default).
pub fn spec_patch(e: &EgressSpec) -> serde_json::Value {
    let network = (!e.allow_out.is_empty() || !e.deny_out.is_empty()).then(|| SandboxNetwork {
        allow_out: e.allow_out.clone(),
        deny_out: e.deny_out.clone(),
    });
    json!({
        "allowInternetAccess": if e.allow_internet { serde_json::Value::Null } else { json!(false) },
        "network": network,
    })
}

/// Sets the fields of a Sandbox spec made for a create.
pub fn set_spec(spec: &mut crate::crd::SandboxSpec, e: &EgressSpec) {
    spec.allow_internet_access = (!e.allow_internet).then_some(false);
    spec.network = (!e.allow_out.is_empty() || !e.deny_out.is_empty()).then(|| SandboxNetwork {
        allow_out: e.allow_out.clone(),
        deny_out: e.deny_out.clone(),
    });
}

/// Whether the agent reports `want` in force for `s`; an error when it reported a failure for
/// the current generation, or the sandbox failed.
fn in_force(s: &Sandbox, want: &EgressSpec) -> Result<bool, ApiError> {
    let id = s.meta().name.clone().unwrap_or_default();
    let Some(st) = &s.status else {
        return Ok(false);
    };
    if st.phase == SandboxPhase::Failed {
        return Err(ApiError::new(
            500,
            format!(
                "sandbox {id} failed: {}",
                st.message.clone().unwrap_or_default()
            ),
        ));
    }
    match crate::conditions::find(&st.conditions, CONDITION) {
        Some(c) if c.status == "True" => Ok(c.message == want.describe()),
        Some(c) if c.observed_generation == s.meta().generation => Err(ApiError::new(
            500,
            format!(
                "sandbox {id}: the node could not apply the network policy: {}",
                c.message
            ),
        )),
        Some(_) => Ok(false),
        // Never updated: what the create applied, which is the spec's while it is unchanged.
        None => Ok(crate::conditions::is_true(&st.conditions, "Started")
            && want.is_default()
            && egress_of(&s.spec).is_default()),
    }
}

/// Patches the Sandbox's policy and waits until its node has it in force.
pub async fn apply_and_wait(api: &ClusterApi, id: &str, want: &EgressSpec) -> Result<(), ApiError> {
    api.sandboxes
        .patch(
            id,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": spec_patch(want)})),
        )
        .await
        .map_err(|e| kube_error("update network of", id, e))?;
    let deadline = tokio::time::Instant::now() + api.ready_timeout;
    loop {
        let s = api
            .sandboxes
            .get(id)
            .await
            .map_err(|e| kube_error("wait for", id, e))?;
        if in_force(&s, want)? {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError::new(
                504,
                format!(
                    "sandbox {id}: the network policy was not applied within {}s",
                    api.ready_timeout.as_secs()
                ),
            ));
        }
        tokio::time::sleep(api.poll).await;
    }
}

/// Gives a claimed pool member the client's policy, unless it has it already.
pub async fn for_claimed(api: &ClusterApi, s: &Sandbox, want: &EgressSpec) -> Result<(), ApiError> {
    if egress_of(&s.spec) == *want {
        return Ok(());
    }
    let id = s.meta().name.clone().unwrap_or_default();
    apply_and_wait(api, &id, want).await
}

/// `PUT /sandboxes/{id}/network`.
pub async fn h_update_network(
    State(api): State<Arc<ClusterApi>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check_key(&api, &headers)?;
    let body: NetworkUpdateJson = if body.is_empty() {
        NetworkUpdateJson::default()
    } else {
        let raw: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(400, format!("invalid request body: {e}")))?;
        if let Some(msg) = warren_core::e2b_features::refused_network_features(&raw) {
            return Err(ApiError::new(400, msg));
        }
        serde_json::from_value(raw)
            .map_err(|e| ApiError::new(400, format!("invalid request body: {e}")))?
    };
    let want = checked(
        body.allow_internet_access,
        body.allow_out.unwrap_or_default(),
        body.deny_out.unwrap_or_default(),
    )?;
    api.get_visible(&id).await?;
    apply_and_wait(&api, &id, &want).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
