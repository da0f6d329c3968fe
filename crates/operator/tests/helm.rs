//! Renders the Helm chart (`deploy/helm/warren`) with its default values, without helm (not
//! packaged in Debian 12): the templates may use only plain substitutions, which this renderer
//! implements exactly and refuses anything else. Every manifest is parsed into its Kubernetes
//! type; the operator's flags are checked against the real binary, the RBAC against the calls the
//! operator makes, and the chart's CRDs against `deploy/crds`.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use serde_json::Value;
use std::path::{Path, PathBuf};

const RELEASE: &str = "warren";
const NAMESPACE: &str = "warren-system";

fn chart() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/helm/warren")
}

fn lookup(values: &Value, expr: &str, file: &str) -> String {
    match expr {
        ".Release.Name" => return RELEASE.into(),
        ".Release.Namespace" => return NAMESPACE.into(),
        _ => {}
    }
    let path = expr.strip_prefix(".Values.").unwrap_or_else(|| {
        panic!(
            "{file}: `{{{{ {expr} }}}}` is not a plain substitution; this test renders only \
             .Values.x, .Release.Name and .Release.Namespace (use `helm template` in CI for more)"
        )
    });
    let mut v = values;
    for key in path.split('.') {
        v = v
            .get(key)
            .unwrap_or_else(|| panic!("{file}: {expr}: values.yaml has no {key:?}"));
    }
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("{file}: {expr} is {other}, not a scalar"),
    }
}

fn render(template: &str, values: &Value, file: &str) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find("}}")
            .unwrap_or_else(|| panic!("{file}: unclosed {{{{"))
            + start;
        let expr = rest[start + 2..end].trim();
        out.push_str(&lookup(values, expr, file));
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Every rendered manifest, as (source file, JSON).
fn rendered() -> Vec<(String, Value)> {
    let values: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(chart().join("values.yaml")).unwrap())
            .expect("values.yaml parses");
    let mut docs = vec![];
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart().join("templates"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for path in files {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = render(&std::fs::read_to_string(&path).unwrap(), &values, &file);
        for doc in text.split("\n---\n") {
            let v: Value = serde_saphyr::from_str(doc)
                .unwrap_or_else(|e| panic!("{file}: rendered YAML does not parse: {e}\n{doc}"));
            docs.push((file.clone(), v));
        }
    }
    docs
}

fn one<T: serde::de::DeserializeOwned>(docs: &[(String, Value)], kind: &str) -> Vec<T> {
    docs.iter()
        .filter(|(_, v)| v["kind"] == kind)
        .map(|(f, v)| {
            serde_json::from_value(v.clone())
                .unwrap_or_else(|e| panic!("{f}: not a valid {kind}: {e}"))
        })
        .collect()
}

fn named<
    T: serde::de::DeserializeOwned
        + k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
>(
    docs: &[(String, Value)],
    kind: &str,
    name: &str,
) -> T {
    one::<T>(docs, kind)
        .into_iter()
        .find(|o| o.metadata().name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn allows(rules: &[PolicyRule], group: &str, resource: &str, verb: &str) -> bool {
    rules.iter().any(|r| {
        r.api_groups
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|g| g == group)
            && r.resources
                .as_deref()
                .unwrap_or_default()
                .iter()
                .any(|x| x == resource)
            && r.verbs.iter().any(|v| v == verb)
    })
}

#[test]
fn chart_renders_to_valid_manifests() {
    let docs = rendered();
    let kinds: Vec<&str> = docs
        .iter()
        .map(|(_, v)| v["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "Deployment",
            "Service",
            "ServiceAccount",
            "Role",
            "RoleBinding",
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet",
            "Deployment",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "ServiceAccount"
        ]
    );
    let sa: ServiceAccount = named(&docs, "ServiceAccount", "warren-operator");
    let sa_name = sa.metadata.name.clone().unwrap();

    let deploy: Deployment = named(&docs, "Deployment", "warren-operator");
    let spec = deploy.spec.clone().unwrap();
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some(sa_name.as_str()));
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("warren-operator:0.1.0"));
    let args = c.args.clone().unwrap();
    assert!(args.contains(&"--node-selector=warren.dev/node-agent=true".to_string()));

    // The flags exist: the real binary parses them (a typo would be an error before --help).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_warren-operator"))
        .args(&args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the chart's args are not the operator's flags: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let env: Vec<String> = c.env.clone().unwrap().into_iter().map(|e| e.name).collect();
    assert!(env.contains(&"POD_NAME".into()) && env.contains(&"POD_NAMESPACE".into()));
    // The operator and the agents share one token, from one Secret.
    let op_secret = pod.volumes.clone().unwrap()[0].secret.clone().unwrap();
    let op_envd_key = pod.volumes.clone().unwrap()[1].secret.clone().unwrap();
    assert!(args.contains(&"--envd-key-file=/run/secrets/warren-envd/key".to_string()));
    assert!(args.contains(&"--node-agent-token-file=/run/secrets/warren/token".to_string()));
    // It calls the agents over https, holding only their CA.
    assert!(args.contains(&"--node-agent-ca-file=/run/secrets/warren-tls/ca.crt".to_string()));
    assert_only_the_ca(&pod.volumes.clone().unwrap(), "node-agent-ca");

    // The node agent: privileged, in the host's pid namespace (Pods' processes in /proc), on the
    // host network at the port the operator calls, its data dir on the node, no API token.
    let ds: Vec<DaemonSet> = one(&docs, "DaemonSet");
    let pod = ds[0].spec.clone().unwrap().template.spec.unwrap();
    assert_eq!(pod.host_pid, Some(true));
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.automount_service_account_token, Some(false));
    assert_eq!(
        pod.node_selector
            .clone()
            .unwrap()
            .get("warren.dev/node-agent"),
        Some(&"true".to_string()),
        "agents run where the operator places sandbox Pods"
    );
    let c = &pod.containers[0];
    assert_eq!(c.security_context.clone().unwrap().privileged, Some(true));
    let port = c.ports.clone().unwrap()[0].clone();
    assert_eq!(port.host_port, Some(7070));
    assert!(args.contains(&format!("--node-agent-port={}", port.container_port)));
    let volumes = pod.volumes.clone().unwrap();
    let data = volumes.iter().find(|v| v.name == "data").unwrap();
    assert_eq!(
        data.host_path.as_ref().map(|h| h.path.as_str()),
        Some("/var/lib/warren")
    );
    assert_eq!(op_envd_key.secret_name.as_deref(), Some("warren-envd-key"));
    // The agents get tokens per create; they never hold the key.
    assert!(volumes.iter().all(|v| v
        .secret
        .as_ref()
        .is_none_or(|s| s.secret_name.as_deref() != Some("warren-envd-key"))));
    let token = volumes.iter().find(|v| v.name == "token").unwrap();
    assert_eq!(
        token.secret.clone().unwrap().secret_name,
        op_secret.secret_name
    );
    let agent_args = c.args.clone().unwrap();
    assert_eq!(agent_args[0], "node-agent");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_warren-operator"))
        .args(&agent_args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the chart's node-agent args are not the binary's flags: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let env: Vec<String> = c.env.clone().unwrap().into_iter().map(|e| e.name).collect();
    assert!(env.contains(&"NODE_NAME".into()));
    // The agent serves https with the whole TLS Secret (certificate and key), and is probed so.
    for flag in [
        "--tls-cert-file=/run/secrets/warren-tls/tls.crt",
        "--tls-key-file=/run/secrets/warren-tls/tls.key",
    ] {
        assert!(agent_args.contains(&flag.to_string()), "{flag}");
    }
    let tls = volumes.iter().find(|v| v.name == "tls").unwrap();
    let tls = tls.secret.clone().unwrap();
    assert_eq!(tls.secret_name.as_deref(), Some("warren-node-agent-tls"));
    assert!(tls.items.is_none(), "the agent gets its key");
    let probe = c.readiness_probe.clone().unwrap().http_get.unwrap();
    assert_eq!(probe.scheme.as_deref(), Some("HTTPS"));
}

/// `volumes` mounts, of the agents' TLS Secret, only `ca.crt`, as volume `name`.
fn assert_only_the_ca(volumes: &[k8s_openapi::api::core::v1::Volume], name: &str) {
    let ca = volumes.iter().find(|v| v.name == name).expect(name);
    let secret = ca.secret.clone().unwrap();
    assert_eq!(secret.secret_name.as_deref(), Some("warren-node-agent-tls"));
    let items = secret.items.expect("only some keys");
    assert_eq!(items.len(), 1);
    assert_eq!(
        (items[0].key.as_str(), items[0].path.as_str()),
        ("ca.crt", "ca.crt")
    );
}

#[test]
fn rbac_grants_what_the_operator_calls_and_no_more() {
    let docs = rendered();
    let cr: Vec<ClusterRole> = vec![named(&docs, "ClusterRole", "warren-operator")];
    let rules = cr[0].rules.clone().unwrap();
    // Every API call in sandbox.rs, sandboxset.rs and controller.rs (watches need list+watch;
    // events are created, then patched when they repeat).
    for (group, resource, verb) in [
        ("warren.dev", "sandboxes", "get"),
        ("warren.dev", "sandboxes", "list"),
        ("warren.dev", "sandboxes", "watch"),
        ("warren.dev", "sandboxes", "create"),
        ("warren.dev", "sandboxes", "patch"),
        ("warren.dev", "sandboxes", "delete"),
        ("warren.dev", "sandboxes/status", "patch"),
        ("warren.dev", "sandboxsets", "list"),
        ("warren.dev", "sandboxsets", "watch"),
        ("warren.dev", "sandboxsets/status", "patch"),
        ("warren.dev", "sandboxsets", "get"),
        ("warren.dev", "sandboxsets/scale", "get"),
        ("warren.dev", "sandboxsets/scale", "update"),
        ("warren.dev", "poolingautoscalers", "list"),
        ("warren.dev", "poolingautoscalers", "watch"),
        ("warren.dev", "poolingautoscalers/status", "patch"),
        ("", "pods", "get"),
        ("", "pods", "list"),
        ("", "pods", "watch"),
        ("", "pods", "create"),
        ("", "pods", "delete"),
        // Removes the node agent's finalizer from deleted sandbox Pods.
        ("", "pods", "patch"),
        ("", "nodes", "get"),
        // The dockerconfigjson Secrets a Commit names, read for its push (registry_auth.rs).
        ("", "secrets", "get"),
        ("warren.dev", "checkpoints", "watch"),
        ("warren.dev", "checkpoints", "patch"),
        ("warren.dev", "checkpoints", "delete"),
        ("warren.dev", "checkpoints/status", "patch"),
        ("warren.dev", "commits", "watch"),
        ("warren.dev", "commits", "delete"),
        ("warren.dev", "commits/status", "patch"),
        ("events.k8s.io", "events", "create"),
        ("events.k8s.io", "events", "patch"),
    ] {
        assert!(
            allows(&rules, group, resource, verb),
            "missing {verb} {group}/{resource}"
        );
    }
    // Least privilege: no wildcards, Secrets only by name, nothing on nodes.
    for r in &rules {
        let all: Vec<&String> = r
            .verbs
            .iter()
            .chain(r.resources.iter().flatten())
            .chain(r.api_groups.iter().flatten())
            .collect();
        assert!(!all.iter().any(|s| s.as_str() == "*"), "wildcard in {r:?}");
        for verb in ["list", "watch", "create", "update", "patch", "delete"] {
            assert!(!allows(&rules, "", "secrets", verb), "{verb} secrets");
        }
    }
    assert!(!allows(&rules, "warren.dev", "sandboxsets", "delete"));
    // The autoscaler changes replicas through /scale, never the whole set.
    assert!(!allows(&rules, "warren.dev", "sandboxsets", "update"));
    assert!(!allows(&rules, "warren.dev", "sandboxsets", "patch"));
    assert!(!allows(&rules, "", "pods", "update"));
    for verb in ["list", "watch", "patch", "update", "delete"] {
        assert!(!allows(&rules, "", "nodes", verb), "{verb} nodes");
    }

    let role: Role = named(&docs, "Role", "warren-operator-lease");
    assert_eq!(role.metadata.namespace.as_deref(), Some(NAMESPACE));
    let lease_rules = role.rules.clone().unwrap();
    for verb in ["get", "create", "patch"] {
        assert!(allows(&lease_rules, "coordination.k8s.io", "leases", verb));
    }
    let crb: Vec<ClusterRoleBinding> = vec![named(&docs, "ClusterRoleBinding", "warren-operator")];
    let rb: RoleBinding = named(&docs, "RoleBinding", "warren-operator-lease");
    assert_eq!(crb[0].role_ref.name, cr[0].metadata.name.clone().unwrap());
    assert_eq!(rb.role_ref.name, role.metadata.name.clone().unwrap());
    let subject = &crb[0].subjects.as_ref().unwrap()[0];
    assert_eq!(subject.namespace.as_deref(), Some(NAMESPACE));
}

#[test]
fn chart_crds_are_the_generated_ones() {
    let dir = |p: &Path| {
        let mut v: Vec<(String, String)> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read_to_string(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let generated = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/crds");
    assert!(
        dir(&chart().join("crds")) == dir(&generated),
        "deploy/helm/warren/crds differs from deploy/crds: cp deploy/crds/*.yaml deploy/helm/warren/crds/"
    );
}

#[test]
fn the_renderer_refuses_what_it_cannot_render() {
    let values: Value = serde_json::json!({"a": {"b": 3}});
    assert_eq!(render("x: {{ .Values.a.b }}", &values, "t"), "x: 3");
    let r = std::panic::catch_unwind(|| render("{{ if .Values.a }}", &values, "t"));
    assert!(r.is_err());
    let r = std::panic::catch_unwind(|| render("{{ .Values.a.c }}", &values, "t"));
    assert!(r.is_err());
}

#[test]
fn api_deployment_serves_cluster_mode_with_namespaced_least_privilege() {
    let docs = rendered();
    let deploy: Deployment = named(&docs, "Deployment", "warren-api");
    let pod = deploy.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("warren-api"));
    let c = &pod.containers[0];
    let args = c.args.clone().unwrap();
    assert_eq!(args[0], "api");
    // The API derives envd tokens from the operator's key, and holds no node-agent token but
    // the optional read-only one that opens the agents' metrics.
    let volumes = pod.volumes.clone().unwrap();
    let secrets: Vec<String> = volumes
        .iter()
        .filter_map(|v| v.secret.as_ref().map(|s| s.secret_name.clone().unwrap()))
        .collect();
    assert_eq!(
        secrets,
        [
            "warren-api-key",
            "warren-envd-key",
            "warren-node-agent-metrics-token",
            "warren-node-agent-tls"
        ]
    );
    // Of the agents' TLS Secret, only the CA: the API calls them over https.
    assert_only_the_ca(&volumes, "node-agent-ca");
    assert!(c
        .env
        .clone()
        .unwrap()
        .iter()
        .any(|e| e.name == "WARREN_NODE_AGENT_CA_FILE"
            && e.value.as_deref() == Some("/run/secrets/warren-tls/ca.crt")));
    let metrics = volumes.iter().find(|v| v.name == "metrics-token").unwrap();
    assert_eq!(metrics.secret.as_ref().unwrap().optional, Some(true));
    let env: Vec<String> = c.env.clone().unwrap().into_iter().map(|e| e.name).collect();
    assert!(env.contains(&"WARREN_NODE_AGENT_METRICS_TOKEN_FILE".to_string()));
    // Cluster-wide only to find the agents: get on Nodes, nothing else.
    let nodes: ClusterRole = named(&docs, "ClusterRole", "warren-api-nodes");
    let node_rules = nodes.rules.unwrap();
    assert!(allows(&node_rules, "", "nodes", "get"));
    assert_eq!(node_rules.len(), 1);
    assert_eq!(node_rules[0].verbs, ["get"]);
    assert_eq!(
        node_rules[0].resources.as_deref(),
        Some(&["nodes".to_string()][..])
    );
    let nb: ClusterRoleBinding = named(&docs, "ClusterRoleBinding", "warren-api-nodes");
    assert_eq!(nb.role_ref.name, "warren-api-nodes");
    assert_eq!(nb.subjects.unwrap()[0].name, "warren-api");
    assert!(args.contains(&"--envd-key-file=/run/secrets/warren-envd/key".to_string()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_warren-operator"))
        .args(&args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the chart's api args are not the binary's flags: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let svc: k8s_openapi::api::core::v1::Service = named(&docs, "Service", "warren-api");
    let spec = svc.spec.unwrap();
    assert_eq!(
        spec.selector.unwrap().get("app.kubernetes.io/name"),
        Some(&"warren-api".to_string())
    );
    let port = spec.ports.unwrap()[0].clone();
    assert_eq!(
        port.target_port,
        Some(
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(
                c.ports.clone().unwrap()[0].container_port
            )
        )
    );

    // Namespaced, Sandboxes (and reading SandboxSets), exactly what cluster_api.rs calls.
    let role: Role = named(&docs, "Role", "warren-api");
    assert_eq!(role.metadata.namespace.as_deref(), Some("default"));
    let rules = role.rules.unwrap();
    for verb in ["get", "list", "create", "update", "patch", "delete"] {
        assert!(allows(&rules, "warren.dev", "sandboxes", verb), "{verb}");
    }
    // Snapshots and forks (cluster_snapshots.rs, cluster_forks.rs) and /warren/v1/checkpoints
    // (cluster_jobs.rs).
    for verb in ["get", "list", "create", "patch", "delete"] {
        assert!(allows(&rules, "warren.dev", "checkpoints", verb), "{verb}");
    }
    assert!(!allows(&rules, "warren.dev", "checkpoints", "update"));
    // /warren/v1/commits (cluster_jobs.rs).
    for verb in ["get", "list", "create", "delete"] {
        assert!(
            allows(&rules, "warren.dev", "commits", verb),
            "{verb} commits"
        );
    }
    for verb in ["update", "patch"] {
        assert!(
            !allows(&rules, "warren.dev", "commits", verb),
            "{verb} commits"
        );
    }
    assert!(!allows(&rules, "warren.dev", "checkpoints/status", "patch"));
    // Cold starts read the SandboxSet a templateID names, and nothing more of it.
    assert!(allows(&rules, "warren.dev", "sandboxsets", "get"));
    for verb in ["list", "watch", "create", "update", "patch", "delete"] {
        assert!(!allows(&rules, "warren.dev", "sandboxsets", verb), "{verb}");
    }
    for (group, resource) in [
        ("", "pods"),
        ("", "secrets"),
        ("warren.dev", "sandboxes/status"),
    ] {
        assert!(
            !allows(&rules, group, resource, "get"),
            "{group}/{resource}"
        );
    }
    let rb: RoleBinding = named(&docs, "RoleBinding", "warren-api");
    assert_eq!(rb.role_ref.name, "warren-api");
    assert_eq!(
        rb.subjects.unwrap()[0].namespace.as_deref(),
        Some(NAMESPACE)
    );
}
