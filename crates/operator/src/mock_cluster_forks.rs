//! E2B forks and restores in cluster mode (`cluster_forks.rs`), and deletes of snapshots that
//! forks still use, against the mock API server; the operator's side of the latter (the node
//! agent refusing) against the fake agent.

use crate::checkpoint::REASON_IN_USE;
use crate::crd::{
    Checkpoint, CheckpointPhase, CheckpointSpec, CheckpointStatus, Condition, SandboxPhase,
    SandboxStatus,
};
use crate::mock::{list, ready, sandbox, ApiServer, SANDBOXES};
use crate::mock_cluster_api::{api, call, CHECKPOINTS};
use http::StatusCode;
use serde_json::{json, Value};

fn checkpoint(name: &str, phase: CheckpointPhase) -> Value {
    let mut c = Checkpoint::new(
        name,
        CheckpointSpec {
            sandbox_name: "sb1".into(),
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
        checkpoint_id: Some("0123456789abcdef0123456789abcdef".into()),
        node_name: Some("node-a".into()),
        message: (phase == CheckpointPhase::Failed).then(|| "CRIU refused".into()),
        ..Default::default()
    });
    serde_json::to_value(c).unwrap()
}

/// The source sandbox, with E2B metadata and env vars that its forks inherit.
fn source() -> Value {
    let mut s = serde_json::to_value(sandbox("sb1")).unwrap();
    s["metadata"]["annotations"] = json!({"metadata.warren.dev/user": "alice"});
    s["spec"]["envVars"] = json!({"LANG": "C.UTF-8"});
    s
}

/// A created Sandbox as the API server answers it (with a uid).
fn created(body: &Value) -> Value {
    let mut s = body.clone();
    let name = s["metadata"]["name"].as_str().unwrap().to_string();
    s["metadata"]["uid"] = json!(format!("uid-{name}"));
    s
}

fn with_status(s: &Value, st: SandboxStatus) -> Value {
    let mut s = s.clone();
    s["status"] = serde_json::to_value(st).unwrap();
    s
}

fn running(s: &Value) -> Value {
    with_status(
        s,
        SandboxStatus {
            phase: SandboxPhase::Running,
            conditions: vec![ready()],
            sandbox_ip: Some("10.1.2.9".into()),
            ..Default::default()
        },
    )
}

fn lost(s: &Value) -> Value {
    with_status(
        s,
        SandboxStatus {
            phase: SandboxPhase::Failed,
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "False".into(),
                reason: "CheckpointLost".into(),
                message: "checkpoint's images were on node node-a: gone".into(),
                observed_generation: None,
                last_transition_time: "2026-01-01T00:00:00Z".into(),
            }],
            ..Default::default()
        },
    )
}

/// The fork's Checkpoint is taken (Pending, then Succeeded); returns its name.
async fn expect_fork_checkpoint(server: &mut ApiServer) -> String {
    server
        .expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .ok(source());
    let c = server.expect("POST", CHECKPOINTS).await;
    let name = c.body["metadata"]["name"].as_str().unwrap().to_string();
    assert!(name.starts_with("fork-sb1-"), "{name}");
    assert_eq!(c.body["metadata"]["labels"]["warren.dev/fork-of"], "sb1");
    assert!(
        c.body["metadata"].get("annotations").is_none(),
        "{}",
        c.body
    );
    assert_eq!(
        c.body["spec"],
        json!({"sandboxName": "sb1", "keepRunning": true,
               "persistentContents": ["memory", "filesystem"]})
    );
    c.reply(201, checkpoint(&name, CheckpointPhase::Pending));
    server
        .expect("GET", &format!("{CHECKPOINTS}/{name}"))
        .await
        .ok(checkpoint(&name, CheckpointPhase::Creating));
    server
        .expect("GET", &format!("{CHECKPOINTS}/{name}"))
        .await
        .ok(checkpoint(&name, CheckpointPhase::Succeeded));
    name
}

#[tokio::test]
async fn a_fork_checkpoints_then_restores_count_times_answering_per_fork() {
    let (api, mut server) = api();
    let task = call(
        &api,
        "POST",
        "/sandboxes/sb1/fork",
        json!({"count": 2, "timeout": 60}),
    )
    .await;
    let ck = expect_fork_checkpoint(&mut server).await;
    let mut forks = Vec::new();
    for _ in 0..2 {
        let c = server.expect("POST", SANDBOXES).await;
        let b = &c.body;
        assert_eq!(b["spec"]["restoreFrom"], ck.as_str(), "{b}");
        assert!(b["spec"].get("template").is_none(), "{b}");
        assert_eq!(b["spec"]["envVars"], json!({"LANG": "C.UTF-8"}));
        let ann = &b["metadata"]["annotations"];
        assert_eq!(ann["metadata.warren.dev/user"], "alice");
        assert_eq!(ann["warren.dev/template-id"], ck.as_str());
        assert!(b["spec"]["shutdownTime"].is_string());
        let s = created(b);
        c.reply(201, s.clone());
        forks.push(s);
    }
    // The forks own their Checkpoint: it goes when the last of them does.
    let p = server.expect("PATCH", &format!("{CHECKPOINTS}/{ck}")).await;
    let owners = p.body["metadata"]["ownerReferences"].clone();
    let names: Vec<&str> = forks
        .iter()
        .map(|f| f["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        owners,
        json!([
            {"apiVersion": "warren.dev/v1alpha1", "kind": "Sandbox", "name": names[0],
             "uid": format!("uid-{}", names[0])},
            {"apiVersion": "warren.dev/v1alpha1", "kind": "Sandbox", "name": names[1],
             "uid": format!("uid-{}", names[1])},
        ])
    );
    p.ok(checkpoint(&ck, CheckpointPhase::Succeeded));
    // The first is ready at once; the second is still starting, then fails and is deleted.
    server
        .expect("GET", &format!("{SANDBOXES}/{}", names[0]))
        .await
        .ok(running(&forks[0]));
    server
        .expect("GET", &format!("{SANDBOXES}/{}", names[1]))
        .await
        .ok(forks[1].clone());
    server
        .expect("GET", &format!("{SANDBOXES}/{}", names[1]))
        .await
        .ok(lost(&forks[1]));
    server
        .expect("DELETE", &format!("{SANDBOXES}/{}", names[1]))
        .await
        .ok(forks[1].clone());
    let (status, body) = task.await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let items = body.as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["sandbox"]["sandboxID"], names[0]);
    assert_eq!(items[0]["sandbox"]["templateID"], ck.as_str());
    assert!(!items[0]["sandbox"]["envdAccessToken"]
        .as_str()
        .unwrap()
        .is_empty());
    assert!(items[0].get("error").is_none());
    assert!(items[1].get("sandbox").is_none());
    assert_eq!(items[1]["error"]["code"], 500);
    assert!(
        items[1]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("CheckpointLost"),
        "{body}"
    );
}

#[tokio::test]
async fn a_fork_with_bad_input_or_a_failed_checkpoint_is_one_clear_error() {
    let (api, mut server) = api();
    // Single-host mode's limits and words, before any API call.
    for (body, msg) in [
        (
            json!({"count": 0}),
            "count must be between 1 and 100 (got 0)",
        ),
        (
            json!({"count": 101}),
            "count must be between 1 and 100 (got 101)",
        ),
        (
            json!({"count": -3}),
            "count must be between 1 and 100 (got -3)",
        ),
    ] {
        let (status, b) = call(&api, "POST", "/sandboxes/sb1/fork", body)
            .await
            .await
            .unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(b, json!({"code": 400, "message": msg}));
    }
    let (status, b) = call(&api, "POST", "/sandboxes/sb1/fork", json!({"timeout": -1}))
        .await
        .await
        .unwrap();
    assert_eq!(
        (status, b["code"].clone()),
        (StatusCode::BAD_REQUEST, json!(400))
    );
    let (status, _) = call(&api, "POST", "/sandboxes/sb1/fork", json!("nope"))
        .await
        .await
        .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // No such sandbox.
    let task = call(&api, "POST", "/sandboxes/nope/fork", Value::Null).await;
    server
        .expect("GET", &format!("{SANDBOXES}/nope"))
        .await
        .status_error(404, "NotFound", "not found");
    let (status, b) = task.await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(b["message"], "sandbox nope not found");

    // The checkpoint (of a fork itself: it says what it stacks on) fails: the request fails,
    // and the Checkpoint goes.
    let task = call(&api, "POST", "/sandboxes/sb1/fork", Value::Null).await;
    let mut src = source();
    src["spec"]["restoreFrom"] = json!("snap0");
    server
        .expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .ok(src);
    let c = server.expect("POST", CHECKPOINTS).await;
    assert_eq!(
        c.body["metadata"]["annotations"]["warren.dev/stacks-on"],
        "snap0"
    );
    let name = c.body["metadata"]["name"].as_str().unwrap().to_string();
    c.reply(201, checkpoint(&name, CheckpointPhase::Pending));
    server
        .expect("GET", &format!("{CHECKPOINTS}/{name}"))
        .await
        .ok(checkpoint(&name, CheckpointPhase::Failed));
    server
        .expect("DELETE", &format!("{CHECKPOINTS}/{name}"))
        .await
        .ok(checkpoint(&name, CheckpointPhase::Failed));
    let (status, b) = task.await.unwrap();
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        b["message"].as_str().unwrap().contains("CRIU refused"),
        "{b}"
    );
}

#[tokio::test]
async fn a_fork_none_of_whose_sandboxes_could_be_made_deletes_its_checkpoint() {
    let (api, mut server) = api();
    let task = call(&api, "POST", "/sandboxes/sb1/fork", json!({"count": 1})).await;
    let ck = expect_fork_checkpoint(&mut server).await;
    server
        .expect("POST", SANDBOXES)
        .await
        .status_error(403, "Forbidden", "quota exceeded");
    server
        .expect("DELETE", &format!("{CHECKPOINTS}/{ck}"))
        .await
        .ok(checkpoint(&ck, CheckpointPhase::Succeeded));
    let (status, body) = task.await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body[0]["error"]["code"], 502, "{body}");
    assert!(
        body[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("quota exceeded"),
        "{body}"
    );
}

#[tokio::test]
async fn a_checkpoint_is_restored_count_times_with_the_clients_metadata_and_env() {
    let (api, mut server) = api();
    let task = call(
        &api,
        "POST",
        "/warren/v1/checkpoints/snap1/restore",
        json!({"count": 1, "metadata": {"run": "7"}, "envVars": {"X": "1"}}),
    )
    .await;
    server
        .expect("GET", &format!("{CHECKPOINTS}/snap1"))
        .await
        .ok(checkpoint("snap1", CheckpointPhase::Succeeded));
    // The source's egress policy goes with its restores, as single-host mode keeps it.
    let mut source = crate::mock::sandbox("sb1");
    source.spec.allow_internet_access = Some(false);
    server
        .expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .ok(serde_json::to_value(&source).unwrap());
    let c = server.expect("POST", SANDBOXES).await;
    assert_eq!(c.body["spec"]["restoreFrom"], "snap1");
    assert_eq!(c.body["spec"]["allowInternetAccess"], false);
    assert_eq!(c.body["spec"]["envVars"], json!({"X": "1"}));
    assert_eq!(
        c.body["metadata"]["annotations"]["metadata.warren.dev/run"],
        "7"
    );
    let s = created(&c.body);
    c.reply(201, s.clone());
    // A user's Checkpoint: no owners are set, its lifetime stays the user's.
    let name = s["metadata"]["name"].as_str().unwrap().to_string();
    server
        .expect("GET", &format!("{SANDBOXES}/{name}"))
        .await
        .ok(running(&s));
    let (status, body) = task.await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body[0]["sandbox"]["sandboxID"], name.as_str());
    assert_eq!(body[0]["sandbox"]["templateID"], "snap1");

    // Missing, or not usable: one error for the request.
    let task = call(
        &api,
        "POST",
        "/warren/v1/checkpoints/gone/restore",
        Value::Null,
    )
    .await;
    server
        .expect("GET", &format!("{CHECKPOINTS}/gone"))
        .await
        .status_error(404, "NotFound", "not found");
    let (status, body) = task.await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["message"], "checkpoint gone not found");
    let task = call(
        &api,
        "POST",
        "/warren/v1/checkpoints/bad/restore",
        Value::Null,
    )
    .await;
    server
        .expect("GET", &format!("{CHECKPOINTS}/bad"))
        .await
        .ok(checkpoint("bad", CheckpointPhase::Failed));
    let (status, body) = task.await.unwrap();
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["message"], "checkpoint bad is Failed, not usable");
    let (status, _) = call(
        &api,
        "POST",
        "/warren/v1/checkpoints/snap1/restore",
        json!({"envVars": {"A=B": "1"}}),
    )
    .await
    .await
    .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn deleting_a_snapshot_that_forks_use_is_refused_as_on_one_host() {
    let (api, mut server) = api();
    let mut fork = serde_json::to_value(sandbox("f1")).unwrap();
    fork["spec"]["restoreFrom"] = json!("snap1");
    let mut going = serde_json::to_value(sandbox("f2")).unwrap();
    going["spec"]["restoreFrom"] = json!("snap1");
    going["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    let other = serde_json::to_value(sandbox("sb9")).unwrap();
    let task = call(&api, "DELETE", "/snapshots/snap1", Value::Null).await;
    server
        .expect("GET", &format!("{CHECKPOINTS}/snap1"))
        .await
        .ok(checkpoint("snap1", CheckpointPhase::Succeeded));
    server
        .expect("GET", SANDBOXES)
        .await
        .ok(list(vec![fork, going.clone(), other.clone()]));
    let (status, body) = task.await.unwrap();
    assert_eq!(status, StatusCode::CONFLICT);
    // Single-host mode's words; a fork already being deleted does not count.
    assert_eq!(
        body,
        json!({"code": 409, "message":
            "checkpoint snap1 holds the files of sandboxes f1: kill them first"})
    );

    // No fork left in the API, but the node agent refused (a checkpoint of a fork there still
    // stacks the files): the operator wrote so on the Terminating Checkpoint.
    let task = call(&api, "DELETE", "/templates/snap1", Value::Null).await;
    server
        .expect("GET", &format!("{CHECKPOINTS}/snap1"))
        .await
        .ok(checkpoint("snap1", CheckpointPhase::Terminating));
    server
        .expect("GET", SANDBOXES)
        .await
        .ok(list(vec![going.clone(), other.clone()]));
    server
        .expect("GET", CHECKPOINTS)
        .await
        .ok(checkpoint_list(vec![checkpoint(
            "snap1",
            CheckpointPhase::Terminating,
        )]));
    let mut kept = checkpoint("snap1", CheckpointPhase::Terminating);
    kept["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    let words = "checkpoint 0123 holds the files of checkpoint 4567: delete them first";
    kept["status"]["conditions"] = json!([{"type": "Ready", "status": "False",
        "reason": REASON_IN_USE, "message": words,
        "lastTransitionTime": "2026-01-01T00:00:00Z"}]);
    server
        .expect("DELETE", &format!("{CHECKPOINTS}/snap1"))
        .await
        .ok(kept);
    let (status, body) = task.await.unwrap();
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body, json!({"code": 409, "message": words}));

    // A snapshot of a fork that is gone stacks on it: known from its annotation, refused first.
    let task = call(&api, "DELETE", "/snapshots/snap1", Value::Null).await;
    server
        .expect("GET", &format!("{CHECKPOINTS}/snap1"))
        .await
        .ok(checkpoint("snap1", CheckpointPhase::Succeeded));
    server
        .expect("GET", SANDBOXES)
        .await
        .ok(list(vec![going, other]));
    let mut child = checkpoint("snap2", CheckpointPhase::Succeeded);
    child["metadata"]["annotations"] = json!({"warren.dev/stacks-on": "snap1"});
    let mut unrelated = checkpoint("snap3", CheckpointPhase::Succeeded);
    unrelated["metadata"]["annotations"] = json!({"warren.dev/stacks-on": "snap0"});
    server
        .expect("GET", CHECKPOINTS)
        .await
        .ok(checkpoint_list(vec![child, unrelated]));
    let (status, body) = task.await.unwrap();
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(
        body["message"],
        "checkpoint snap1 holds the files of checkpoints snap2: delete them first"
    );
}

fn checkpoint_list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "warren.dev/v1alpha1", "kind": "CheckpointList",
           "metadata": {"resourceVersion": "7"}, "items": items})
}

#[tokio::test]
async fn the_operator_says_when_the_node_keeps_a_checkpoints_images_in_use() {
    use crate::agent::AgentError;
    use crate::controller::reconcile_checkpoint;
    use crate::mock::{run, EVENTS};
    use crate::mock_agent::mock_with_agent;
    use std::sync::Arc;

    let (ctx, mut server, fake) = mock_with_agent();
    let words = "checkpoint cpuid1 holds the files of sandbox f1: delete them first";
    fake.fail(
        "delete_checkpoint",
        AgentError::Failed {
            node: "node-a".into(),
            code: 409,
            message: words.into(),
        },
    );
    let mut c: Checkpoint =
        serde_json::from_value(checkpoint("cp1", CheckpointPhase::Succeeded)).unwrap();
    c.metadata.generation = Some(1);
    c.metadata.finalizers = Some(vec![crate::checkpoint::FINALIZER.into()]);
    c.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        "2026-01-01T00:00:00Z".parse().unwrap(),
    ));
    c.status.as_mut().unwrap().checkpoint_id = Some("cpuid1".into());
    let task = run(reconcile_checkpoint(Arc::new(c.clone()), ctx)).await;
    let p = server
        .expect("PATCH", &format!("{CHECKPOINTS}/cp1/status"))
        .await;
    let st = p.body["status"].clone();
    p.ok(serde_json::to_value(&c).unwrap());
    assert_eq!(st["phase"], "Terminating");
    assert_eq!(st["conditions"][0]["reason"], REASON_IN_USE);
    assert_eq!(st["conditions"][0]["message"], words);
    let ev = server.expect("POST", EVENTS).await;
    assert_eq!(ev.body["reason"], REASON_IN_USE, "{}", ev.body);
    let b = ev.body.clone();
    ev.reply(201, b);
    // The finalizer stays (no PATCH of it), and the reconcile is retried with backoff.
    let err = task.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("in use"), "{err}");
    assert_eq!(fake.calls(), ["delete_checkpoint node-a cpuid1"]);
}

#[tokio::test]
async fn a_forks_own_checkpoint_is_not_listed_as_a_snapshot() {
    let (api, mut server) = api();
    let task = call(&api, "GET", "/snapshots", Value::Null).await;
    let mut own = checkpoint("fork-sb1-abc", CheckpointPhase::Succeeded);
    own["metadata"]["labels"] = json!({"warren.dev/fork-of": "sb1"});
    server
        .expect("GET", CHECKPOINTS)
        .await
        .ok(checkpoint_list(vec![
            own,
            checkpoint("snap1", CheckpointPhase::Succeeded),
        ]));
    let (status, body) = task.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!([{"snapshotID": "snap1", "names": ["snap1"]}]));
}

#[tokio::test]
async fn a_snapshot_of_a_fork_says_what_it_stacks_on() {
    let (api, mut server) = api();
    let task = call(
        &api,
        "POST",
        "/sandboxes/f1/snapshots",
        json!({"name": "snap2"}),
    )
    .await;
    let mut f1 = serde_json::to_value(sandbox("f1")).unwrap();
    f1["spec"]["restoreFrom"] = json!("snap1");
    server
        .expect("GET", &format!("{SANDBOXES}/f1"))
        .await
        .ok(f1);
    let c = server.expect("POST", CHECKPOINTS).await;
    assert_eq!(
        c.body["metadata"]["annotations"],
        json!({"warren.dev/stacks-on": "snap1"})
    );
    c.reply(201, checkpoint("snap2", CheckpointPhase::Pending));
    server
        .expect("GET", &format!("{CHECKPOINTS}/snap2"))
        .await
        .ok(checkpoint("snap2", CheckpointPhase::Succeeded));
    assert_eq!(task.await.unwrap().0, StatusCode::CREATED);
}
