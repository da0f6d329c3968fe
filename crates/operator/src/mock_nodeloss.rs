//! Node loss against the mock API server (see `mock.rs` and `nodeloss.rs`).

use crate::controller::{reconcile_sandbox, reconcile_sandbox_set};
use crate::crd::{Condition, SandboxPhase, SandboxStatus};
use crate::mock::{
    member, mock, ready, run, sandbox, set, with_finalizer, ApiServer, EVENTS, PODS, SANDBOXES,
};
use crate::sandbox::{build_pod, PodConfig};
use crate::sandboxset::{member_spec, revision};
use kube::runtime::controller::Action;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

const NODES: &str = "/api/v1/nodes";

fn running(name: &str) -> crate::crd::Sandbox {
    let mut s = with_finalizer(sandbox(name));
    s.status = Some(SandboxStatus {
        observed_generation: Some(1),
        phase: SandboxPhase::Running,
        conditions: vec![ready()],
        node_name: Some("node-a".into()),
        sandbox_ip: Some("10.0.0.5".into()),
        ..Default::default()
    });
    s
}

fn pod_of(s: &crate::crd::Sandbox, status: Value) -> Value {
    let mut pod = serde_json::to_value(build_pod(s, &PodConfig::default()).unwrap()).unwrap();
    pod["metadata"]["uid"] = "pod-uid".into();
    pod["spec"]["nodeName"] = "node-a".into();
    pod["status"] = status;
    pod
}

fn node(ready: &str, since: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
           "status": {"conditions": [{"type": "Ready", "status": ready, "reason": "NodeStatusUnknown",
           "message": "Kubelet stopped posting node status.", "lastTransitionTime": since}]}})
}

async fn expect_event(api: &mut ApiServer, reason: &str) {
    let ev = api.expect("POST", EVENTS).await;
    assert_eq!(ev.body["reason"], reason, "{}", ev.body);
    let b = ev.body.clone();
    ev.reply(201, b);
}

#[tokio::test]
async fn a_sandbox_on_a_deleted_node_fails_with_node_lost() {
    let (ctx, mut api) = mock();
    let s = running("sb1");
    let task = run(reconcile_sandbox(Arc::new(s.clone()), ctx)).await;
    // What the node lifecycle controller leaves: the pod still Running, but not ready.
    let pod = pod_of(
        &s,
        json!({"phase": "Running", "podIP": "10.0.0.5",
               "conditions": [{"type": "Ready", "status": "False"}]}),
    );
    api.expect("GET", &format!("{PODS}/sb1")).await.ok(pod);
    api.expect("GET", &format!("{NODES}/node-a"))
        .await
        .status_error(404, "NotFound", "nodes \"node-a\" not found");
    let call = api
        .expect("PATCH", &format!("{SANDBOXES}/sb1/status"))
        .await;
    let st = &call.body["status"];
    assert_eq!(st["phase"], "Failed");
    assert_eq!(st["conditions"][0]["reason"], "NodeLost");
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("node node-a no longer exists"),
        "{st}"
    );
    call.ok(serde_json::to_value(&s).unwrap());
    expect_event(&mut api, "NodeLost").await;
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
}

#[tokio::test]
async fn a_briefly_unreachable_node_is_only_reported_and_rechecked() {
    let (ctx, mut api) = mock();
    let s = running("sb1");
    let task = run(reconcile_sandbox(Arc::new(s.clone()), ctx)).await;
    let pod = pod_of(&s, json!({"phase": "Unknown", "podIP": "10.0.0.5"}));
    api.expect("GET", &format!("{PODS}/sb1")).await.ok(pod);
    // NotReady for 50 s of the allowed 60 s.
    let since =
        k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(50);
    api.expect("GET", &format!("{NODES}/node-a"))
        .await
        .ok(node("Unknown", &since.to_string()));
    let call = api
        .expect("PATCH", &format!("{SANDBOXES}/sb1/status"))
        .await;
    assert_eq!(
        call.body["status"]["conditions"][0]["reason"],
        "NodeUnreachable"
    );
    assert_ne!(call.body["status"]["phase"], "Failed");
    call.ok(serde_json::to_value(&s).unwrap());
    expect_event(&mut api, "NodeUnreachable").await;
    assert_eq!(
        task.await.unwrap().unwrap(),
        Action::requeue(Duration::from_secs(10))
    );
}

#[tokio::test]
async fn an_evicted_pod_is_not_recreated_under_a_claimed_sandbox() {
    let (ctx, mut api) = mock();
    let s = running("sb1");
    let task = run(reconcile_sandbox(Arc::new(s.clone()), ctx.clone())).await;
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .status_error(404, "NotFound", "pods \"sb1\" not found");
    // Its node is fine: the pod itself was deleted (eviction, drain, kubectl delete).
    api.expect("GET", &format!("{NODES}/node-a"))
        .await
        .ok(node("True", "2026-01-01T00:00:00Z"));
    let call = api
        .expect("PATCH", &format!("{SANDBOXES}/sb1/status"))
        .await;
    let st = call.body["status"].clone();
    assert_eq!(st["phase"], "Failed");
    assert_eq!(st["conditions"][0]["reason"], "PodLost");
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("deleted or evicted"),
        "{st}"
    );
    call.ok(serde_json::to_value(&s).unwrap());
    expect_event(&mut api, "PodLost").await;
    // No POST of a new pod: the reconcile is over.
    task.await.unwrap().unwrap();

    // Next reconcile of the lost sandbox: only a look for a Pod left to release (see
    // podfinalizer.rs), never a POST of a new one (an unanswered request times the task out).
    let mut lost = s.clone();
    lost.status = Some(serde_json::from_value(st).unwrap());
    let task = run(reconcile_sandbox(Arc::new(lost), ctx)).await;
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .status_error(404, "NotFound", "pods \"sb1\" not found");
    let res = task.await.unwrap().unwrap();
    assert_eq!(res, Action::requeue(Duration::from_secs(300)));
}

#[tokio::test]
/// A member lost with its node, or one whose sandbox failed to start (kept a while for its
/// reason to be seen), is deleted and a new one made.
async fn a_pool_replaces_a_member_lost_with_its_node_or_failed_to_start() {
    for (reason, message) in [
        ("NodeLost", "node node-a no longer exists"),
        (
            "SandboxStartFailed",
            "the node agent could not start the sandbox: no cgroup",
        ),
    ] {
        let (ctx, mut api) = mock();
        let s = set(2, 1);
        let rev = revision(&member_spec(&s.spec));
        let task = run(reconcile_sandbox_set(Arc::new(s.clone()), ctx)).await;
        let ok = member(&s, "m0", &rev, "2026-01-01T00:00:00Z");
        let mut gone = member(&s, "m1", &rev, "2026-01-01T00:00:01Z");
        gone["status"] = json!({"phase": "Failed", "conditions": [serde_json::to_value(Condition {
        type_: "Ready".into(), status: "False".into(), reason: reason.into(),
        message: message.into(),
        last_transition_time: "2026-01-01T00:01:00Z".into(), observed_generation: Some(1)}).unwrap()]});
        let call = api.expect("GET", SANDBOXES).await;
        call.ok(crate::mock::list(vec![ok, gone]));
        let call = api.expect("DELETE", &format!("{SANDBOXES}/m1")).await;
        assert_eq!(call.body["preconditions"]["resourceVersion"], "rv-m1");
        call.ok(json!({"apiVersion": "v1", "kind": "Status", "status": "Success", "code": 200}));
        let call = api.expect("POST", SANDBOXES).await;
        assert_eq!(call.body["metadata"]["generateName"], "pool-");
        let mut created = call.body.clone();
        created["metadata"]["name"] = "pool-new".into();
        call.reply(201, created);
        let call = api
            .expect(
                "PATCH",
                "/apis/warren.dev/v1alpha1/namespaces/testns/sandboxsets/pool/status",
            )
            .await;
        assert_eq!(call.body["status"]["replicas"], 1, "{}", call.body);
        call.ok(serde_json::to_value(&s).unwrap());
        task.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn deleting_a_sandbox_of_a_dead_node_force_deletes_its_stuck_pod() {
    let (ctx, mut api) = mock();
    let mut s = running("sb1");
    s.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        "2026-01-01T00:00:00Z".parse().unwrap(),
    ));
    s.status.as_mut().unwrap().phase = SandboxPhase::Terminating;
    let task = run(reconcile_sandbox(Arc::new(s.clone()), ctx)).await;
    let mut pod = pod_of(&s, json!({"phase": "Running"}));
    pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:01Z".into();
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .ok(pod.clone());
    api.expect("GET", &format!("{NODES}/node-a"))
        .await
        .ok(node("Unknown", "2025-12-31T00:00:00Z"));
    // The node agent's finalizer goes without a call: nothing is left on a dead node.
    let call = api.expect("PATCH", &format!("{PODS}/sb1")).await;
    assert_eq!(
        call.body[1],
        json!({"op": "remove", "path": "/metadata/finalizers/0"})
    );
    call.ok(pod.clone());
    let call = api.expect("DELETE", &format!("{PODS}/sb1")).await;
    assert_eq!(call.body["gracePeriodSeconds"], 0, "{}", call.body);
    assert_eq!(call.body["preconditions"]["uid"], "pod-uid");
    call.ok(pod);
    // Still waiting until the pod is really gone.
    let err = task.await.unwrap().unwrap_err();
    assert!(matches!(err, crate::Error::WaitingForCleanup(_)), "{err}");
}
