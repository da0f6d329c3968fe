//! Features of E2B's create and network-update bodies that Warren does not have. Both edges
//! (single-host and cluster mode) refuse them with a 400 naming the field, rather than make a
//! sandbox that quietly does less than asked (no proxy, no volume, no gateway).

use serde_json::Value;

/// Whether a JSON value asks for something (not null, not an empty list, object or string).
fn given(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    }
}

/// The first part of a create body (`NewSandboxV2`) asking for what Warren lacks, as the message
/// of a 400.
pub fn refused_create_features(body: &Value) -> Option<String> {
    if given(body.get("mcp")) {
        return Some("mcp: Warren has no MCP gateway; leave `mcp` out".into());
    }
    if given(body.get("iam")) {
        return Some("iam: Warren has no workload identity; leave `iam` out".into());
    }
    if given(body.get("volumeMounts")) {
        return Some("volumeMounts: Warren has no volumes; leave `volumeMounts` out".into());
    }
    body.get("network").and_then(refused_network_features)
}

/// The first part of a `network` object (of a create or an update) asking for what Warren
/// lacks, as the message of a 400. Both spellings the SDKs use are read.
pub fn refused_network_features(network: &Value) -> Option<String> {
    let field = |camel: &str, snake: &str| given(network.get(camel)) || given(network.get(snake));
    if field("egressProxy", "egress_proxy") {
        return Some(
            "network.egressProxy: Warren does not tunnel egress through a proxy; leave it out"
                .into(),
        );
    }
    if field("rules", "rules") {
        return Some(
            "network.rules: Warren does not transform egress requests; leave them out".into(),
        );
    }
    if field("maskRequestHost", "mask_request_host") {
        return Some(
            "network.maskRequestHost: Warren's router keeps the request's host; leave it out"
                .into(),
        );
    }
    if field("httpsPorts", "https_ports") {
        return Some(
            "network.httpsPorts: Warren's router speaks plain HTTP to the sandbox; leave it out"
                .into(),
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn what_is_asked_for_is_refused_and_empty_values_are_not() {
        assert!(refused_create_features(&json!({"templateID": "base"})).is_none());
        assert!(
            refused_create_features(&json!({"mcp": null, "volumeMounts": [], "iam": {}})).is_none()
        );
        assert!(refused_create_features(
            &json!({"network": {"allowOut": ["1.1.1.1"], "dnsServers": ["1.1.1.1"]}})
        )
        .is_none());
        for (body, named) in [
            (json!({"mcp": {"x": {}}}), "mcp"),
            (json!({"iam": {"aws": {}}}), "iam"),
            (json!({"volumeMounts": [{"name": "v"}]}), "volumeMounts"),
            (
                json!({"network": {"egressProxy": {"address": "p:1080"}}}),
                "egressProxy",
            ),
            (
                json!({"network": {"egress_proxy": {"address": "p:1080"}}}),
                "egressProxy",
            ),
            (json!({"network": {"rules": {"a.com": []}}}), "rules"),
            (
                json!({"network": {"maskRequestHost": "x"}}),
                "maskRequestHost",
            ),
            (json!({"network": {"httpsPorts": [443]}}), "httpsPorts"),
        ] {
            let msg = refused_create_features(&body).unwrap_or_default();
            assert!(msg.contains(named), "{body}: {msg}");
        }
    }
}
