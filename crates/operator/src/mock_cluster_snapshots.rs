//! E2B snapshots and forks in cluster mode (`cluster_snapshots.rs`) against the mock API server.

use crate::crd::{
    Checkpoint, CheckpointPhase, CheckpointSpec, CheckpointStatus, SandboxPhase, SandboxStatus,
};
use crate::mock::{list, ready, sandbox, ApiServer, SANDBOXES};
use crate::mock_cluster_api::{api, call, CHECKPOINTS};
use http::StatusCode;
use serde_json::{json, Value};

/// A checkpoint id as the operator makes them (32 hex digits), distinct per name.
fn ck_id(name: &str) -> String {
    let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
    format!("{hex:0>32}")
}

fn checkpoint(name: &str, sandbox: &str, phase: CheckpointPhase) -> Value {
    let mut c = Checkpoint::new(
        name,
        CheckpointSpec {
            sandbox_name: sandbox.into(),
            pod_name: None,
            keep_running: true,
            persistent_contents: vec![],
            ttl_after_finished: None,
        },
    );
    c.metadata.namespace = Some("testns".into());
    c.metadata.uid = Some(format!("uid-{name}"));
    c.status = Some(CheckpointStatus {
        phase,
        checkpoint_id: Some(ck_id(name)),
        node_name: Some("node-a".into()),
        message: (phase == CheckpointPhase::Failed).then(|| "CRIU refused".into()),
        ..Default::default()
    });
    serde_json::to_value(c).unwrap()
}

fn checkpoint_list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "warren.dev/v1alpha1", "kind": "CheckpointList",
           "metadata": {"resourceVersion": "7"}, "items": items})
}

/// The fork's Sandbox is created with `restoreFrom` and answered once Ready.
async fn expect_fork(server: &mut ApiServer, checkpoint: &str, template_id: &str) -> Value {
    let c = server.expect("POST", SANDBOXES).await;
    let created = c.body.clone();
    assert_eq!(created["spec"]["restoreFrom"], checkpoint, "{created}");
    assert!(created["spec"].get("template").is_none(), "{created}");
    assert_eq!(
        created["metadata"]["annotations"]["warren.dev/template-id"],
        template_id
    );
    c.reply(201, created.clone());
    let name = created["metadata"]["name"].as_str().unwrap().to_string();
    let mut ready_sbx = created.clone();
    ready_sbx["status"] = serde_json::to_value(SandboxStatus {
        phase: SandboxPhase::Running,
        conditions: vec![ready()],
        sandbox_ip: Some("10.1.2.9".into()),
        ..Default::default()
    })
    .unwrap();
    server
        .expect("GET", &format!("{SANDBOXES}/{name}"))
        .await
        .ok(ready_sbx);
    created
}

#[tokio::test]
async fn a_create_whose_template_names_a_checkpoint_forks_it() {
    let (api, mut server) = api();
    let task = call(&api, "POST", "/sandboxes", json!({"templateID": "snap1"})).await;
    // No pool of that name, then the Checkpoint.
    server.expect("GET", SANDBOXES).await.ok(list(vec![]));
    server
        .expect("GET", &format!("{CHECKPOINTS}/snap1"))
        .await
        .ok(checkpoint("snap1", "sb1", CheckpointPhase::Succeeded));
    expect_fork(&mut server, "snap1", "snap1").await;
    let (status, body) = task.await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["templateID"], "snap1");
    assert!(!body["envdAccessToken"].as_str().unwrap().is_empty());

    // By the checkpoint id on the node (what a Checkpoint's status shows).
    let id = ck_id("snap1");
    let task = call(&api, "POST", "/sandboxes", json!({"templateID": id})).await;
    server.expect("GET", SANDBOXES).await.ok(list(vec![]));
    server
        .expect("GET", &format!("{CHECKPOINTS}/{id}"))
        .await
        .status_error(404, "NotFound", "not found");
    server
        .expect("GET", CHECKPOINTS)
        .await
        .ok(checkpoint_list(vec![
            checkpoint("other", "sb2", CheckpointPhase::Succeeded),
            checkpoint("snap1", "sb1", CheckpointPhase::Succeeded),
        ]));
    expect_fork(&mut server, "snap1", &id).await;
    assert_eq!(task.await.unwrap().0, StatusCode::CREATED);
}

#[tokio::test]
async fn a_snapshot_is_a_checkpoint_answered_once_it_succeeds() {
    let (api, mut server) = api();
    let task = call(
        &api,
        "POST",
        "/sandboxes/sb1/snapshots",
        json!({"name": "snap1"}),
    )
    .await;
    server
        .expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .ok(serde_json::to_value(sandbox("sb1")).unwrap());
    let c = server.expect("POST", CHECKPOINTS).await;
    assert_eq!(c.body["metadata"]["name"], "snap1");
    assert_eq!(
        c.body["spec"],
        json!({"sandboxName": "sb1", "keepRunning": true,
               "persistentContents": ["memory", "filesystem"]})
    );
    c.reply(201, checkpoint("snap1", "sb1", CheckpointPhase::Pending));
    server
        .expect("GET", &format!("{CHECKPOINTS}/snap1"))
        .await
        .ok(checkpoint("snap1", "sb1", CheckpointPhase::Creating));
    server
        .expect("GET", &format!("{CHECKPOINTS}/snap1"))
        .await
        .ok(checkpoint("snap1", "sb1", CheckpointPhase::Succeeded));
    let (status, body) = task.await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // Single-host mode's shape.
    assert_eq!(body, json!({"snapshotID": "snap1", "names": ["snap1"]}));

    // Filesystem only, with a generated name; a failed one is explained and removed.
    let task = call(
        &api,
        "POST",
        "/sandboxes/sb1/snapshots",
        json!({"memory": false}),
    )
    .await;
    server
        .expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .ok(serde_json::to_value(sandbox("sb1")).unwrap());
    let c = server.expect("POST", CHECKPOINTS).await;
    assert_eq!(c.body["spec"]["persistentContents"], json!(["filesystem"]));
    let name = c.body["metadata"]["name"].as_str().unwrap().to_string();
    assert!(name.starts_with("snap-"), "{name}");
    c.reply(201, checkpoint(&name, "sb1", CheckpointPhase::Pending));
    server
        .expect("GET", &format!("{CHECKPOINTS}/{name}"))
        .await
        .ok(checkpoint(&name, "sb1", CheckpointPhase::Failed));
    server
        .expect("DELETE", &format!("{CHECKPOINTS}/{name}"))
        .await
        .ok(checkpoint(&name, "sb1", CheckpointPhase::Failed));
    let (status, body) = task.await.unwrap();
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        body["message"].as_str().unwrap().contains("CRIU refused"),
        "{body}"
    );

    // Bad input: a clear E2B error, no API call.
    let (status, body) = call(
        &api,
        "POST",
        "/sandboxes/sb1/snapshots",
        json!({"name": "Bad Name"}),
    )
    .await
    .await
    .unwrap();
    assert_eq!(
        (status, body["code"].clone()),
        (StatusCode::BAD_REQUEST, json!(400))
    );
}

#[tokio::test]
async fn snapshots_are_listed_filtered_and_deleted() {
    let (api, mut server) = api();
    let task = call(&api, "GET", "/snapshots?sandboxID=sb1&limit=1", Value::Null).await;
    server
        .expect("GET", CHECKPOINTS)
        .await
        .ok(checkpoint_list(vec![
            checkpoint("b", "sb1", CheckpointPhase::Succeeded),
            checkpoint("a", "sb1", CheckpointPhase::Succeeded),
            checkpoint("c", "sb2", CheckpointPhase::Succeeded),
        ]));
    let (status, body) = task.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!([{"snapshotID": "a", "names": ["a"]}]));
    let (status, _) = call(&api, "GET", "/snapshots?limit=0", Value::Null)
        .await
        .await
        .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);

    for path in ["/snapshots/a", "/templates/a"] {
        let task = call(&api, "DELETE", path, Value::Null).await;
        server
            .expect("GET", &format!("{CHECKPOINTS}/a"))
            .await
            .ok(checkpoint("a", "sb1", CheckpointPhase::Succeeded));
        // No fork of it (see mock_cluster_forks.rs for those).
        server.expect("GET", SANDBOXES).await.ok(list(vec![]));
        server
            .expect("GET", CHECKPOINTS)
            .await
            .ok(checkpoint_list(vec![]));
        server
            .expect("DELETE", &format!("{CHECKPOINTS}/a"))
            .await
            .ok(checkpoint("a", "sb1", CheckpointPhase::Terminating));
        assert_eq!(task.await.unwrap().0, StatusCode::NO_CONTENT);
    }
    let task = call(&api, "DELETE", "/snapshots/nope", Value::Null).await;
    server
        .expect("GET", &format!("{CHECKPOINTS}/nope"))
        .await
        .status_error(404, "NotFound", "not found");
    let (status, body) = task.await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], 404);
}
