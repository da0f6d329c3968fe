//! Egress policies in cluster mode against the mock API server and the fake agent: the Sandbox
//! reconciler hands the spec's policy to the agent at create and live on change, refuses what a
//! Pod cannot enforce as an invalid spec; the cluster API takes `allow_internet_access` and
//! `network` in create and serves `PUT /sandboxes/{id}/network`, answering once the agent
//! reports the policy in force.

use crate::agent::fake::FakeAgent;
use crate::agent::{node_id, AgentError, EgressSpec, NodeAgent};
use crate::cluster_api::ClusterApi;
use crate::controller::{reconcile_sandbox, Context};
use crate::crd::{Condition, SandboxNetwork, SandboxPhase, SandboxStatus};
use crate::mock::{
    list, member, ready, run, sandbox, set, with_finalizer, ApiServer, EVENTS, NS, PODS, SANDBOXES,
};
use crate::mock_agent::{expect_agent_conditions, find};
use crate::mock_cluster_api::{call, CHECKPOINTS};
use crate::sandbox::{build_pod, PodConfig};
use crate::sandbox_network::CONDITION;
use http::{Request, Response, StatusCode};
use kube::Client;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

const KEY: &str = "warren_testkey";

fn mock_with_agent() -> (Arc<Context>, ApiServer, Arc<FakeAgent>) {
    let (svc, handle) =
        tower_test::mock::pair::<Request<kube::client::Body>, Response<kube::client::Body>>();
    let client = Client::new(svc, NS);
    let fake = Arc::new(FakeAgent::default());
    let agent: Arc<dyn NodeAgent> = fake.clone();
    (
        Context::with_agent(client, PodConfig::default(), Some(agent)),
        ApiServer(handle),
        fake,
    )
}

fn cond(t: &str, ok: bool, reason: &str, message: &str) -> Condition {
    crate::conditions::condition(&[], t, ok, reason, message, Some(1), "2026-01-01T00:00:00Z")
}

/// A running sandbox whose operator status is what the reconcile computes (it writes none).
fn started(agent_conds: Vec<Condition>) -> crate::crd::Sandbox {
    let mut s = with_finalizer(sandbox("sb1"));
    let mut conds = vec![ready()];
    conds.extend(agent_conds);
    s.status = Some(SandboxStatus {
        observed_generation: Some(1),
        phase: SandboxPhase::Running,
        conditions: conds,
        node_name: Some("node-a".into()),
        sandbox_ip: Some("10.0.0.5".into()),
        message: None,
    });
    s
}

fn running_pod(s: &crate::crd::Sandbox) -> Value {
    let mut pod = serde_json::to_value(build_pod(s, &PodConfig::default()).unwrap()).unwrap();
    pod["metadata"]["uid"] = "pod-uid".into();
    pod["spec"]["nodeName"] = "node-a".into();
    pod["status"] = json!({"phase": "Running", "podIP": "10.0.0.5",
                           "conditions": [{"type": "Ready", "status": "True"}]});
    pod
}

fn closed() -> EgressSpec {
    EgressSpec {
        allow_internet: false,
        allow_out: vec!["10.0.0.7".into()],
        deny_out: vec![],
    }
}

fn closed_spec(s: &mut crate::crd::Sandbox) {
    s.spec.allow_internet_access = Some(false);
    s.spec.network = Some(SandboxNetwork {
        allow_out: vec!["10.0.0.7".into()],
        deny_out: vec![],
    });
}

#[tokio::test]
async fn the_create_carries_the_policy_and_records_it() {
    let (ctx, mut api, fake) = mock_with_agent();
    let mut s = with_finalizer(sandbox("sb1"));
    closed_spec(&mut s);
    let task = run(reconcile_sandbox(Arc::new(s.clone()), ctx)).await;
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .ok(running_pod(&s));
    api.expect("PATCH", &format!("{SANDBOXES}/sb1/status"))
        .await
        .ok(serde_json::to_value(&s).unwrap());
    let conds = expect_agent_conditions(&mut api).await;
    assert_eq!(find(&conds, "Started")["status"], "True");
    let n = find(&conds, CONDITION);
    assert_eq!(
        (n["status"].as_str(), n["reason"].as_str()),
        (Some("True"), Some("Applied"))
    );
    assert_eq!(n["message"], closed().describe());
    task.await.unwrap().unwrap();
    assert_eq!(fake.creates.lock().unwrap()[0].network, closed());
    assert!(
        fake.network_updates.lock().unwrap().is_empty(),
        "the create applied it"
    );
}

#[tokio::test]
async fn a_spec_change_is_applied_live_and_a_refusal_is_reported() {
    let (ctx, mut api, fake) = mock_with_agent();
    let id = node_id("uid-sb1");
    let base = vec![
        cond("Started", true, "Started", ""),
        cond("Paused", false, "Running", ""),
        cond(
            CONDITION,
            true,
            "Applied",
            &EgressSpec::default().describe(),
        ),
    ];
    let mut s = started(base.clone());
    closed_spec(&mut s);
    let task = run(reconcile_sandbox(Arc::new(s.clone()), ctx.clone())).await;
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .ok(running_pod(&s));
    let conds = expect_agent_conditions(&mut api).await;
    assert_eq!(find(&conds, CONDITION)["message"], closed().describe());
    // The other agent-owned conditions stay in the set, or server-side apply would drop them.
    assert_eq!(find(&conds, "Started")["status"], "True");
    assert_eq!(find(&conds, "Paused")["status"], "False");
    task.await.unwrap().unwrap();
    assert_eq!(fake.calls(), [format!("update_network node-a {id}")]);
    let req = fake.network_updates.lock().unwrap()[0].clone();
    assert_eq!(req.network, closed());
    assert_eq!(
        req.pod.uid, "pod-uid",
        "a hibernated sandbox's netns is found from its Pod"
    );

    // In force: nothing more to do (only the Pod is read).
    let mut s = started(vec![
        cond("Started", true, "Started", ""),
        cond("Paused", false, "Running", ""),
        cond(CONDITION, true, "Applied", &closed().describe()),
    ]);
    closed_spec(&mut s);
    let task = run(reconcile_sandbox(Arc::new(s.clone()), ctx.clone())).await;
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .ok(running_pod(&s));
    task.await.unwrap().unwrap();
    assert_eq!(fake.calls().len(), 1);

    // The agent refuses: the condition says why, and it is not retried in this generation.
    fake.fail(
        "update_network",
        AgentError::Failed {
            node: "node-a".into(),
            code: 500,
            message: "nftables: no such table".into(),
        },
    );
    let mut s = started(base.clone());
    closed_spec(&mut s);
    let task = run(reconcile_sandbox(Arc::new(s.clone()), ctx.clone())).await;
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .ok(running_pod(&s));
    let conds = expect_agent_conditions(&mut api).await;
    let n = find(&conds, CONDITION);
    assert_eq!(
        (n["status"].as_str(), n["reason"].as_str()),
        (Some("False"), Some("NetworkPolicyFailed"))
    );
    assert!(
        n["message"].as_str().unwrap().contains("no such table"),
        "{n}"
    );
    task.await.unwrap().unwrap();

    // An unreachable agent is retried with backoff: an error, no condition written.
    fake.fail(
        "update_network",
        AgentError::Unreachable {
            node: "node-a".into(),
            message: "connection refused".into(),
        },
    );
    let task = run(reconcile_sandbox(Arc::new(s.clone()), ctx)).await;
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .ok(running_pod(&s));
    assert!(task.await.unwrap().is_err());
}

#[tokio::test]
async fn domain_names_are_an_invalid_spec() {
    let (ctx, mut api, fake) = mock_with_agent();
    let mut s = with_finalizer(sandbox("sb1"));
    s.spec.network = Some(SandboxNetwork {
        allow_out: vec!["pypi.org".into()],
        deny_out: vec![],
    });
    let task = run(reconcile_sandbox(Arc::new(s.clone()), ctx)).await;
    let c = api
        .expect("PATCH", &format!("{SANDBOXES}/sb1/status"))
        .await;
    let st = &c.body["status"];
    assert_eq!(st["phase"], "Failed");
    assert_eq!(st["conditions"][0]["reason"], "InvalidSpec");
    let msg = st["message"].as_str().unwrap().to_string();
    assert!(
        msg.starts_with("spec.network: ") && msg.contains("pypi.org") && msg.contains("DNS filter"),
        "{msg}"
    );
    c.ok(serde_json::to_value(&s).unwrap());
    api.expect("POST", EVENTS).await.ok(json!({}));
    task.await.unwrap().unwrap();
    assert!(fake.calls().is_empty(), "no sandbox without its policy");
}

fn cluster_api() -> (Arc<ClusterApi>, ApiServer) {
    let (ctx, server) = crate::mock::mock();
    let mut a = ClusterApi::new(ctx.client.clone(), NS, KEY.into());
    a.poll = Duration::from_millis(10);
    a.ready_timeout = Duration::from_secs(2);
    (Arc::new(a), server)
}

#[tokio::test]
async fn create_takes_the_network_fields_into_the_sandbox_spec() {
    let (api, mut server) = cluster_api();
    let task = call(
        &api,
        "POST",
        "/sandboxes",
        json!({"templateID": "base", "allow_internet_access": false,
               "network": {"allowOut": ["10.0.0.7"], "denyOut": ["0.0.0.0/0"]}}),
    )
    .await;
    server.expect("GET", SANDBOXES).await.ok(list(vec![]));
    // No Checkpoint of that name: not a fork.
    server
        .expect("GET", &format!("{CHECKPOINTS}/base"))
        .await
        .status_error(404, "NotFound", "not found");
    let c = server.expect("POST", SANDBOXES).await;
    let created = c.body.clone();
    assert_eq!(created["spec"]["allowInternetAccess"], false);
    assert_eq!(
        created["spec"]["network"],
        json!({"allowOut": ["10.0.0.7"], "denyOut": ["0.0.0.0/0"]})
    );
    let name = created["metadata"]["name"].as_str().unwrap().to_string();
    c.reply(201, created.clone());
    let mut ready_sbx = created;
    ready_sbx["status"] = serde_json::to_value(SandboxStatus {
        phase: SandboxPhase::Running,
        conditions: vec![ready()],
        sandbox_ip: Some("10.1.2.3".into()),
        ..Default::default()
    })
    .unwrap();
    server
        .expect("GET", &format!("{SANDBOXES}/{name}"))
        .await
        .ok(ready_sbx);
    let (status, body) = task.await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

#[tokio::test]
async fn what_a_pod_cannot_enforce_is_refused_without_api_calls() {
    let (api, _server) = cluster_api();
    for (body, needle) in [
        (
            json!({"network": {"allowOut": ["api.example.com"]}}),
            "api.example.com",
        ),
        (
            json!({"network": {"allowPublicTraffic": false}}),
            "allowPublicTraffic",
        ),
        (
            json!({"network": {"denyOut": ["1.2.3.4/40"]}}),
            "prefix length must be between 0 and 32",
        ),
        (
            json!({"network": {"denyOut": ["evil.test"]}}),
            "domain names belong in allow_out",
        ),
    ] {
        let (status, resp) = call(&api, "POST", "/sandboxes", body.clone())
            .await
            .await
            .unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {resp}");
        assert_eq!(resp["code"], 400);
        let msg = resp["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{body}: {msg}");
    }
    let (status, resp) = call(
        &api,
        "PUT",
        "/sandboxes/abc/network",
        json!({"allowOut": ["*.pypi.org"]}),
    )
    .await
    .await
    .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST, "{resp}");
    assert!(resp["message"].as_str().unwrap().contains("*.pypi.org"));
    let (status, resp) = call(
        &api,
        "PUT",
        "/sandboxes/abc/network",
        json!({"allowOut": "10.0.0.1"}),
    )
    .await
    .await
    .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST, "{resp}");
    assert!(resp["message"]
        .as_str()
        .unwrap()
        .contains("invalid request body"));
}

fn with_condition(mut v: Value, c: Condition, gen: i64) -> Value {
    v["metadata"]["generation"] = json!(gen);
    let mut st: SandboxStatus = serde_json::from_value(v["status"].clone()).unwrap_or_default();
    st.conditions.retain(|x| x.type_ != CONDITION);
    st.conditions.push(c);
    v["status"] = serde_json::to_value(st).unwrap();
    v
}

fn visible(name: &str) -> Value {
    let mut s = started(vec![cond("Started", true, "Started", "")]);
    s.metadata.name = Some(name.into());
    serde_json::to_value(s).unwrap()
}

#[tokio::test]
async fn put_network_patches_the_spec_and_answers_once_in_force() {
    let (api, mut server) = cluster_api();
    let task = call(
        &api,
        "PUT",
        "/sandboxes/sb1/network",
        json!({"allow_internet_access": false, "allowOut": ["10.0.0.7"]}),
    )
    .await;
    server
        .expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .ok(visible("sb1"));
    let c = server.expect("PATCH", &format!("{SANDBOXES}/sb1")).await;
    assert_eq!(
        c.body,
        json!({"spec": {"allowInternetAccess": false, "network": {"allowOut": ["10.0.0.7"]}}})
    );
    c.ok(visible("sb1"));
    // Not applied yet (the old policy), then applied.
    let old = cond(
        CONDITION,
        true,
        "Applied",
        &EgressSpec::default().describe(),
    );
    server
        .expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .ok(with_condition(visible("sb1"), old, 2));
    let now = cond(CONDITION, true, "Applied", &closed().describe());
    server
        .expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .ok(with_condition(visible("sb1"), now, 2));
    let (status, body) = task.await.unwrap();
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");

    // An empty body resets to the default (fields removed); the node's refusal is the answer.
    let task = call(&api, "PUT", "/sandboxes/sb1/network", Value::Null).await;
    server
        .expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .ok(visible("sb1"));
    let c = server.expect("PATCH", &format!("{SANDBOXES}/sb1")).await;
    assert_eq!(
        c.body,
        json!({"spec": {"allowInternetAccess": null, "network": null}})
    );
    c.ok(visible("sb1"));
    let mut failed = cond(
        CONDITION,
        false,
        "NetworkPolicyFailed",
        "nftables: permission denied",
    );
    failed.observed_generation = Some(3);
    server
        .expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .ok(with_condition(visible("sb1"), failed, 3));
    let (status, body) = task.await.unwrap();
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("permission denied"),
        "{body}"
    );

    // Unknown sandboxes are 404 in the E2B shape.
    let task = call(&api, "PUT", "/sandboxes/nope/network", json!({})).await;
    server
        .expect("GET", &format!("{SANDBOXES}/nope"))
        .await
        .status_error(404, "NotFound", "sandboxes.warren.dev \"nope\" not found");
    let (status, body) = task.await.unwrap();
    assert_eq!(
        (status, body["code"].clone()),
        (StatusCode::NOT_FOUND, json!(404))
    );
}

#[tokio::test]
async fn a_claimed_member_gets_the_clients_policy_before_it_is_handed_out() {
    let (api, mut server) = cluster_api();
    let task = call(
        &api,
        "POST",
        "/sandboxes",
        json!({"templateID": "pool", "allow_internet_access": false,
               "network": {"allowOut": ["10.0.0.7"]}}),
    )
    .await;
    let mut m = member(&set(2, 1), "m0", "r", "2026-01-01T00:00:00Z");
    m["status"]["sandboxIP"] = json!("10.9.0.5");
    m["status"]["conditions"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::to_value(cond("Started", true, "Started", "")).unwrap());
    server.expect("GET", SANDBOXES).await.ok(list(vec![m]));
    let c = server.expect("PUT", &format!("{SANDBOXES}/m0")).await;
    let claimed = c.body.clone();
    c.ok(claimed.clone());
    let c = server.expect("PATCH", &format!("{SANDBOXES}/m0")).await;
    assert_eq!(c.body["spec"]["allowInternetAccess"], false);
    c.ok(claimed.clone());
    let applied = cond(CONDITION, true, "Applied", &closed().describe());
    server
        .expect("GET", &format!("{SANDBOXES}/m0"))
        .await
        .ok(with_condition(claimed.clone(), applied, 2));
    // Only then the annotations that hand it to the client.
    server
        .expect("PATCH", &format!("{SANDBOXES}/m0"))
        .await
        .ok(claimed);
    let (status, body) = task.await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["sandboxID"], "m0");
}
