//! The node agent's finalizer on sandbox Pods (`podfinalizer.rs`) against the mock API server
//! and the fake agent.

use crate::agent::fake::FakeAgent;
use crate::agent::{node_id, AgentError, NodeAgent};
use crate::controller::{reconcile_sandbox, sandbox_error_policy, Context};
use crate::crd::{SandboxPhase, SandboxStatus};
use crate::mock::{ready, run, sandbox, with_finalizer, ApiServer, EVENTS, NS, PODS, SANDBOXES};
use crate::podfinalizer::POD_FINALIZER;
use crate::sandbox::{build_pod, PodConfig};
use http::{Request, Response};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::Client;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

const NODES: &str = "/api/v1/nodes";

fn mock_with_agent() -> (Arc<Context>, ApiServer, Arc<FakeAgent>) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, NS);
    let fake = Arc::new(FakeAgent::default());
    let agent: Arc<dyn NodeAgent> = fake.clone();
    (
        Context::with_agent(client, PodConfig::default(), Some(agent)),
        ApiServer(handle),
        fake,
    )
}

fn running() -> crate::crd::Sandbox {
    let mut s = with_finalizer(sandbox("sb1"));
    let started = crate::conditions::condition(
        &[],
        "Started",
        true,
        "Started",
        "",
        Some(1),
        "2026-01-01T00:00:00Z",
    );
    s.status = Some(SandboxStatus {
        observed_generation: Some(1),
        phase: SandboxPhase::Running,
        conditions: vec![ready(), started],
        node_name: Some("node-a".into()),
        sandbox_ip: Some("10.0.0.5".into()),
        message: None,
    });
    s
}

/// The sandbox's Pod, placed on node-a, being deleted, with `conditions` in its status.
fn deleting_pod(s: &crate::crd::Sandbox, conditions: Value) -> Value {
    let mut pod = serde_json::to_value(build_pod(s, &PodConfig::default()).unwrap()).unwrap();
    pod["metadata"]["uid"] = "pod-uid".into();
    pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:05:00Z".into();
    pod["spec"]["nodeName"] = "node-a".into();
    pod["status"] = json!({"phase": "Running", "podIP": "10.0.0.5", "conditions": conditions});
    pod
}

fn node_ready() -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
           "status": {"conditions": [{"type": "Ready", "status": "True",
           "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})
}

async fn expect_event(api: &mut ApiServer, reason: &str) -> Value {
    let ev = api.expect("POST", EVENTS).await;
    assert_eq!(ev.body["reason"], reason, "{}", ev.body);
    let b = ev.body.clone();
    ev.reply(201, b.clone());
    b
}

/// The finalizer's removal: a JSON patch whose test op guards the index.
async fn expect_finalizer_removed(api: &mut ApiServer, pod: &Value) {
    let call = api.expect("PATCH", &format!("{PODS}/sb1")).await;
    assert_eq!(call.content_type, "application/json-patch+json");
    assert_eq!(
        call.body,
        json!([{"op": "test", "path": "/metadata/finalizers/0", "value": POD_FINALIZER},
               {"op": "remove", "path": "/metadata/finalizers/0"}])
    );
    let mut released = pod.clone();
    released["metadata"]["finalizers"] = json!([]);
    call.ok(released);
}

#[tokio::test]
async fn a_sandbox_pod_is_created_with_the_node_agent_finalizer() {
    let (ctx, mut api, _fake) = mock_with_agent();
    let task = run(reconcile_sandbox(
        Arc::new(with_finalizer(sandbox("sb1"))),
        ctx,
    ))
    .await;
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .status_error(404, "NotFound", "not found");
    let call = api.expect("POST", PODS).await;
    assert_eq!(
        call.body["metadata"]["finalizers"],
        json!(["warren.dev/node-agent"])
    );
    let mut created = call.body.clone();
    created["metadata"]["uid"] = "pod-uid".into();
    call.reply(201, created);
    api.expect("PATCH", &format!("{SANDBOXES}/sb1/status"))
        .await
        .ok(serde_json::to_value(sandbox("sb1")).unwrap());
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_evicted_pod_is_cleaned_on_its_node_released_and_its_sandbox_fails() {
    let (ctx, mut api, fake) = mock_with_agent();
    let s = running();
    let task = run(reconcile_sandbox(Arc::new(s.clone()), ctx)).await;
    let pod = deleting_pod(
        &s,
        json!([{"type": "DisruptionTarget", "status": "True",
                "reason": "EvictionByEvictionAPI", "message": "Eviction API: evicting"}]),
    );
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .ok(pod.clone());
    api.expect("GET", &format!("{NODES}/node-a"))
        .await
        .ok(node_ready());
    // The cause is recorded first: once the Pod is gone nothing else tells it.
    let call = api
        .expect("PATCH", &format!("{SANDBOXES}/sb1/status"))
        .await;
    let st = call.body["status"].clone();
    assert_eq!(st["phase"], "Failed");
    assert_eq!(st["conditions"][0]["reason"], "Evicted");
    let msg = st["message"].as_str().unwrap();
    assert!(
        msg.contains("was evicted by Kubernetes (EvictionByEvictionAPI: Eviction API: evicting)"),
        "{msg}"
    );
    call.ok(serde_json::to_value(&s).unwrap());
    expect_event(&mut api, "Evicted").await;
    expect_finalizer_removed(&mut api, &pod).await;
    assert_eq!(
        task.await.unwrap().unwrap(),
        Action::requeue(Duration::from_secs(300))
    );
    assert_eq!(
        fake.calls(),
        [format!("delete node-a {}", node_id("uid-sb1"))]
    );
}

#[tokio::test]
async fn a_pod_deleted_by_hand_fails_its_sandbox_with_pod_deleted() {
    let (ctx, mut api, fake) = mock_with_agent();
    let s = running();
    let task = run(reconcile_sandbox(Arc::new(s.clone()), ctx)).await;
    let pod = deleting_pod(&s, json!([{"type": "Ready", "status": "True"}]));
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .ok(pod.clone());
    api.expect("GET", &format!("{NODES}/node-a"))
        .await
        .ok(node_ready());
    let call = api
        .expect("PATCH", &format!("{SANDBOXES}/sb1/status"))
        .await;
    assert_eq!(call.body["status"]["conditions"][0]["reason"], "PodDeleted");
    assert!(call.body["status"]["message"]
        .as_str()
        .unwrap()
        .contains("was deleted by a user or a controller"));
    call.ok(serde_json::to_value(&s).unwrap());
    expect_event(&mut api, "PodDeleted").await;
    expect_finalizer_removed(&mut api, &pod).await;
    task.await.unwrap().unwrap();
    assert_eq!(fake.calls().len(), 1);
}

#[tokio::test]
async fn a_pod_of_a_lost_node_is_released_without_calling_its_agent() {
    let (ctx, mut api, fake) = mock_with_agent();
    let s = running();
    let task = run(reconcile_sandbox(Arc::new(s.clone()), ctx)).await;
    let pod = deleting_pod(&s, json!([{"type": "Ready", "status": "False"}]));
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .ok(pod.clone());
    api.expect("GET", &format!("{NODES}/node-a"))
        .await
        .status_error(404, "NotFound", "nodes \"node-a\" not found");
    let call = api
        .expect("PATCH", &format!("{SANDBOXES}/sb1/status"))
        .await;
    assert_eq!(call.body["status"]["conditions"][0]["reason"], "NodeLost");
    call.ok(serde_json::to_value(&s).unwrap());
    expect_event(&mut api, "NodeLost").await;
    expect_finalizer_removed(&mut api, &pod).await;
    task.await.unwrap().unwrap();
    assert!(fake.calls().is_empty(), "{:?}", fake.calls());
}

#[tokio::test]
async fn an_unreachable_agent_keeps_the_finalizer_and_is_retried_with_backoff() {
    let (ctx, mut api, fake) = mock_with_agent();
    fake.fail(
        "delete",
        AgentError::Unreachable {
            node: "node-a".into(),
            message: "connection refused".into(),
        },
    );
    let s = Arc::new(running());
    let task = run(reconcile_sandbox(s.clone(), ctx.clone())).await;
    let pod = deleting_pod(&s, json!([]));
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .ok(pod.clone());
    api.expect("GET", &format!("{NODES}/node-a"))
        .await
        .ok(node_ready());
    let call = api
        .expect("PATCH", &format!("{SANDBOXES}/sb1/status"))
        .await;
    let st = call.body["status"].clone();
    assert_eq!(st["conditions"][0]["reason"], "PodDeleted");
    call.ok(serde_json::to_value(&*s).unwrap());
    expect_event(&mut api, "PodDeleted").await;
    let ev = expect_event(&mut api, "NodeCleanupFailed").await;
    assert_eq!(ev["type"], "Warning");
    let note = ev["note"].as_str().unwrap();
    assert!(note.contains("connection refused"), "{note}");
    assert!(
        note.contains("keeps finalizer warren.dev/node-agent"),
        "{note}"
    );
    // No PATCH of the Pod: the finalizer stays.
    let err = task.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("unreachable"), "{err}");
    assert_eq!(
        sandbox_error_policy(s.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(1))
    );
    assert_eq!(
        sandbox_error_policy(s.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(2))
    );

    // The retry: the Sandbox is lost now (final), its Pod still waits; the agent is back.
    fake.failures.lock().unwrap().clear();
    let mut lost = (*s).clone();
    lost.status = Some(serde_json::from_value(st).unwrap());
    let task = run(reconcile_sandbox(Arc::new(lost), ctx)).await;
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .ok(pod.clone());
    api.expect("GET", &format!("{NODES}/node-a"))
        .await
        .ok(node_ready());
    expect_finalizer_removed(&mut api, &pod).await;
    assert_eq!(
        task.await.unwrap().unwrap(),
        Action::requeue(Duration::from_secs(300))
    );
    assert_eq!(
        fake.calls(),
        vec![format!("delete node-a {}", node_id("uid-sb1")); 2]
    );
}

#[tokio::test]
async fn deleting_a_sandbox_releases_its_terminating_pod_after_the_agent_cleaned() {
    let (ctx, mut api, fake) = mock_with_agent();
    let mut s = running();
    s.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        "2026-01-01T00:00:00Z".parse().unwrap(),
    ));
    let task = run(reconcile_sandbox(Arc::new(s.clone()), ctx)).await;
    let pod = deleting_pod(&s, json!([]));
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .ok(pod.clone());
    api.expect("GET", &format!("{NODES}/node-a"))
        .await
        .ok(node_ready());
    expect_finalizer_removed(&mut api, &pod).await;
    // The Sandbox shows Terminating (not Failed) until the Pod is gone.
    let call = api
        .expect("PATCH", &format!("{SANDBOXES}/sb1/status"))
        .await;
    assert_eq!(call.body["status"]["phase"], "Terminating");
    call.ok(serde_json::to_value(&s).unwrap());
    assert!(matches!(
        task.await.unwrap().unwrap_err(),
        crate::Error::WaitingForCleanup(_)
    ));
    assert_eq!(
        fake.calls(),
        [format!("delete node-a {}", node_id("uid-sb1"))]
    );
}

#[tokio::test]
async fn a_pod_deleted_before_placement_is_released_and_replaced() {
    let (ctx, mut api, fake) = mock_with_agent();
    let s = with_finalizer(sandbox("sb1"));
    let task = run(reconcile_sandbox(Arc::new(s.clone()), ctx.clone())).await;
    let mut pod = deleting_pod(&s, json!([]));
    pod["spec"]
        .as_object_mut()
        .unwrap()
        .remove("nodeName")
        .unwrap();
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .ok(pod.clone());
    // Nothing ran: no node lookup, no agent call, no Failed status.
    expect_finalizer_removed(&mut api, &pod).await;
    assert_eq!(
        task.await.unwrap().unwrap(),
        Action::requeue(Duration::from_secs(1))
    );
    assert!(fake.calls().is_empty());

    // Gone now: the next reconcile makes a new Pod.
    let task = run(reconcile_sandbox(Arc::new(s), ctx)).await;
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .status_error(404, "NotFound", "not found");
    let call = api.expect("POST", PODS).await;
    let b = call.body.clone();
    call.reply(201, b);
    api.expect("PATCH", &format!("{SANDBOXES}/sb1/status"))
        .await
        .ok(serde_json::to_value(sandbox("sb1")).unwrap());
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_pod_whose_sandbox_is_gone_is_released_by_the_pod_controller() {
    let (ctx, mut api, fake) = mock_with_agent();
    let s = running();
    let pod: k8s_openapi::api::core::v1::Pod =
        serde_json::from_value(deleting_pod(&s, json!([]))).unwrap();
    let pod_json = serde_json::to_value(&pod).unwrap();

    // Its Sandbox exists: the Sandbox reconciler's business, nothing done here.
    let task = run(crate::podfinalizer::reconcile_pod(
        Arc::new(pod.clone()),
        ctx.clone(),
    ))
    .await;
    api.expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .ok(serde_json::to_value(&s).unwrap());
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
    assert!(fake.calls().is_empty());

    // Its Sandbox is gone: cleaned on the node, then released.
    let task = run(crate::podfinalizer::reconcile_pod(Arc::new(pod), ctx)).await;
    api.expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .status_error(404, "NotFound", "not found");
    api.expect("GET", &format!("{NODES}/node-a"))
        .await
        .ok(node_ready());
    expect_finalizer_removed(&mut api, &pod_json).await;
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
    assert_eq!(
        fake.calls(),
        [format!("delete node-a {}", node_id("uid-sb1"))]
    );
}
