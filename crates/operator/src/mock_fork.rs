//! Forks (`spec.restoreFrom`) against the mock API server (see `mock.rs` and `fork.rs`).

use crate::agent::node_id;
use crate::controller::reconcile_sandbox;
use crate::crd::{Checkpoint, CheckpointPhase, CheckpointSpec, CheckpointStatus, SandboxSpec};
use crate::mock::{mock, run, sandbox, with_finalizer, ApiServer, EVENTS, PODS, SANDBOXES};
use crate::mock_agent::{expect_agent_conditions, mock_with_agent, running_pod};
use kube::runtime::controller::Action;
use serde_json::{json, Value};
use std::sync::Arc;

const CHECKPOINTS: &str = "/apis/warren.dev/v1alpha1/namespaces/testns/checkpoints";
const NODES: &str = "/api/v1/nodes";

fn fork(name: &str) -> crate::crd::Sandbox {
    let mut s = with_finalizer(sandbox(name));
    s.spec = SandboxSpec {
        template: None,
        restore_from: Some("cp1".into()),
        ..s.spec
    };
    s
}

fn checkpoint(phase: CheckpointPhase) -> Value {
    let mut c = Checkpoint::new(
        "cp1",
        CheckpointSpec {
            sandbox_name: "src".into(),
            pod_name: None,
            keep_running: true,
            persistent_contents: vec![],
            ttl_after_finished: None,
        },
    );
    c.metadata.namespace = Some("testns".into());
    c.status = Some(CheckpointStatus {
        phase,
        checkpoint_id: Some("uid-cp1".into()),
        node_name: Some("node-a".into()),
        ..Default::default()
    });
    serde_json::to_value(c).unwrap()
}

fn ready_node() -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": "node-a", "labels": {"kubernetes.io/hostname": "node-a.host"}},
           "status": {"conditions": [{"type": "Ready", "status": "True",
                                      "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})
}

async fn expect_event(api: &mut ApiServer, reason: &str) {
    let ev = api.expect("POST", EVENTS).await;
    assert_eq!(ev.body["reason"], reason, "{}", ev.body);
    let b = ev.body.clone();
    ev.reply(201, b);
}

#[tokio::test]
async fn a_fork_is_pinned_to_its_checkpoints_node_and_restored_by_the_agent() {
    let (ctx, mut api) = mock();
    let s = fork("sb1");
    let task = run(reconcile_sandbox(Arc::new(s.clone()), ctx)).await;
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .status_error(404, "NotFound", "pods \"sb1\" not found");
    api.expect("GET", &format!("{CHECKPOINTS}/cp1"))
        .await
        .ok(checkpoint(CheckpointPhase::Succeeded));
    api.expect("GET", &format!("{NODES}/node-a"))
        .await
        .ok(ready_node());
    let call = api.expect("POST", PODS).await;
    let pod = call.body.clone();
    // Required affinity on the node's hostname label (the scheduler still places and accounts
    // it), not spec.nodeName.
    assert_eq!(
        pod["spec"]["affinity"],
        json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": ["node-a.host"]}]}]}}})
    );
    assert!(pod["spec"].get("nodeName").is_none(), "{pod}");
    assert_eq!(
        pod["metadata"]["annotations"]["warren.dev/restore-from"],
        "uid-cp1"
    );
    let mut created = pod.clone();
    created["metadata"]["uid"] = "pod-uid".into();
    created["status"] = json!({"phase": "Pending"});
    call.reply(201, created);
    let call = api
        .expect("PATCH", &format!("{SANDBOXES}/sb1/status"))
        .await;
    assert_eq!(call.body["status"]["phase"], "Pending");
    call.ok(serde_json::to_value(&s).unwrap());
    task.await.unwrap().unwrap();

    // Once the Pod runs, the agent on its node creates the sandbox by restoring the checkpoint.
    let (ctx, mut api, fake) = mock_with_agent();
    let task = run(reconcile_sandbox(Arc::new(s.clone()), ctx)).await;
    let mut pod = running_pod(&s);
    pod["metadata"]["annotations"] = json!({"warren.dev/restore-from": "uid-cp1"});
    api.expect("GET", &format!("{PODS}/sb1")).await.ok(pod);
    let call = api
        .expect("PATCH", &format!("{SANDBOXES}/sb1/status"))
        .await;
    assert_eq!(
        call.body["status"]["conditions"][0]["reason"],
        "WaitingForNodeAgent"
    );
    call.ok(serde_json::to_value(&s).unwrap());
    expect_agent_conditions(&mut api).await;
    task.await.unwrap().unwrap();
    let id = node_id("uid-sb1");
    assert_eq!(fake.calls(), [format!("create node-a {id}")]);
    let req = fake.creates.lock().unwrap()[0].clone();
    assert_eq!(req.restore_from.as_deref(), Some("uid-cp1"));
    assert_eq!(req.template, None);
    // The fork's own envd tokens, from its own uid (the agent re-keys the restored envd).
    assert_eq!(
        req.access_token,
        Some(crate::agent::envd_access_token("envd-key", "uid-sb1"))
    );
}

#[tokio::test]
async fn a_fork_waits_for_its_checkpoint_without_a_pod() {
    let (ctx, mut api) = mock();
    let s = fork("sb1");
    let task = run(reconcile_sandbox(Arc::new(s.clone()), ctx)).await;
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .status_error(404, "NotFound", "pods \"sb1\" not found");
    api.expect("GET", &format!("{CHECKPOINTS}/cp1"))
        .await
        .ok(checkpoint(CheckpointPhase::Creating));
    // No Pod: the status says what it waits for, and no event (nothing failed).
    let call = api
        .expect("PATCH", &format!("{SANDBOXES}/sb1/status"))
        .await;
    let st = call.body["status"].clone();
    assert_eq!(st["phase"], "Pending");
    assert_eq!(st["conditions"][0]["reason"], "WaitingForCheckpoint");
    assert!(
        st["message"].as_str().unwrap().contains("checkpoint cp1"),
        "{st}"
    );
    call.ok(serde_json::to_value(&s).unwrap());
    assert_eq!(
        task.await.unwrap().unwrap(),
        Action::requeue(crate::fork::CHECKPOINT_POLL)
    );
}

#[tokio::test]
async fn a_fork_of_a_checkpoint_whose_node_is_gone_fails() {
    let (ctx, mut api) = mock();
    let s = fork("sb1");
    let task = run(reconcile_sandbox(Arc::new(s.clone()), ctx.clone())).await;
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .status_error(404, "NotFound", "pods \"sb1\" not found");
    api.expect("GET", &format!("{CHECKPOINTS}/cp1"))
        .await
        .ok(checkpoint(CheckpointPhase::Succeeded));
    api.expect("GET", &format!("{NODES}/node-a"))
        .await
        .status_error(404, "NotFound", "nodes \"node-a\" not found");
    let call = api
        .expect("PATCH", &format!("{SANDBOXES}/sb1/status"))
        .await;
    let st = call.body["status"].clone();
    assert_eq!(st["phase"], "Failed");
    assert_eq!(st["conditions"][0]["status"], "False");
    assert_eq!(st["conditions"][0]["reason"], "CheckpointLost");
    assert!(
        st["message"].as_str().unwrap().contains("node node-a"),
        "{st}"
    );
    call.ok(serde_json::to_value(&s).unwrap());
    expect_event(&mut api, "CheckpointLost").await;
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());

    // Final: the next reconcile makes no Pod and asks nothing more about the checkpoint.
    let mut failed = s.clone();
    failed.status = Some(serde_json::from_value(st).unwrap());
    let task = run(reconcile_sandbox(Arc::new(failed), ctx)).await;
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .status_error(404, "NotFound", "pods \"sb1\" not found");
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
}

#[tokio::test]
async fn a_fork_of_a_missing_or_failed_checkpoint_fails() {
    for (answer, reason) in [
        (None, "CheckpointLost"),
        (
            Some(checkpoint(CheckpointPhase::Failed)),
            "CheckpointNotReady",
        ),
    ] {
        let (ctx, mut api) = mock();
        let s = fork("sb1");
        let task = run(reconcile_sandbox(Arc::new(s.clone()), ctx)).await;
        api.expect("GET", &format!("{PODS}/sb1"))
            .await
            .status_error(404, "NotFound", "pods \"sb1\" not found");
        let call = api.expect("GET", &format!("{CHECKPOINTS}/cp1")).await;
        match answer {
            Some(c) => call.ok(c),
            None => call.status_error(404, "NotFound", "checkpoints \"cp1\" not found"),
        }
        let call = api
            .expect("PATCH", &format!("{SANDBOXES}/sb1/status"))
            .await;
        assert_eq!(call.body["status"]["phase"], "Failed");
        assert_eq!(call.body["status"]["conditions"][0]["reason"], reason);
        call.ok(serde_json::to_value(&s).unwrap());
        expect_event(&mut api, reason).await;
        assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
    }
}
