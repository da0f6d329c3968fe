//! The cluster API's metrics, checkpoints and commits (`cluster_metrics.rs`, `cluster_jobs.rs`)
//! against the mock API server and the fake node agent: single-host's JSON shapes, status codes
//! and messages.

use crate::agent::fake::FakeAgent;
use crate::agent::{node_id, AgentError, NodeAgent};
use crate::cluster_api::ClusterApi;
use crate::crd::{Condition, SandboxPhase, SandboxStatus};
use crate::mock::{list, mock, ready, sandbox, ApiServer, NS, SANDBOXES};
use crate::mock_cluster_api::call;
use http::StatusCode;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

const KEY: &str = "warren_testkey";
const CHECKPOINTS: &str = "/apis/warren.dev/v1alpha1/namespaces/testns/checkpoints";
const COMMITS: &str = "/apis/warren.dev/v1alpha1/namespaces/testns/commits";

fn api() -> (Arc<ClusterApi>, ApiServer, Arc<FakeAgent>) {
    let (ctx, server) = mock();
    let fake = Arc::new(FakeAgent::default());
    let mut a = ClusterApi::new(ctx.client.clone(), NS, KEY.into());
    a.poll = Duration::from_millis(10);
    a.ready_timeout = Duration::from_secs(2);
    let agent: Arc<dyn NodeAgent> = fake.clone();
    a.agent = Some(agent);
    (Arc::new(a), server, fake)
}

/// A running sandbox the client created, started by its agent `started_ago` seconds ago.
fn running(name: &str, started_ago: i64) -> Value {
    let mut s = sandbox(name);
    let since = chrono::Utc::now() - chrono::Duration::seconds(started_ago);
    s.status = Some(SandboxStatus {
        observed_generation: Some(1),
        phase: SandboxPhase::Running,
        conditions: vec![
            ready(),
            Condition {
                type_: "Started".into(),
                status: "True".into(),
                reason: "Started".into(),
                message: String::new(),
                last_transition_time: since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                observed_generation: Some(1),
            },
        ],
        node_name: Some("node-a".into()),
        sandbox_ip: Some("10.0.0.5".into()),
        message: None,
    });
    serde_json::to_value(s).unwrap()
}

fn assert_error(status: StatusCode, body: &Value, code: u16, text: &str) {
    assert_eq!(status.as_u16(), code, "{body}");
    assert_eq!(body["code"], code, "{body}");
    let msg = body["message"].as_str().unwrap();
    assert!(msg.contains(text), "{msg:?} lacks {text:?}");
}

#[tokio::test]
async fn metrics_have_the_e2b_shape_from_the_node_agent() {
    let (api, mut server, fake) = api();
    let task = call(&api, "GET", "/sandboxes/sb1/metrics", Value::Null).await;
    server
        .expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .ok(running("sb1", 10));
    let (status, body) = task.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    let points = body.as_array().unwrap();
    assert_eq!(points.len(), 1, "{body}");
    let p = &points[0];
    let mut keys: Vec<&str> = p.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "cpuCount",
            "cpuUsedPct",
            "diskTotal",
            "diskUsed",
            "memCache",
            "memTotal",
            "memUsed",
            "timestamp",
            "timestampUnix"
        ]
    );
    // The sandbox's resources (cpu 1, memory limit 512Mi) and the agent's sample: 3 s of CPU
    // in about 10 s of life on 1 vCPU.
    assert_eq!(p["cpuCount"], 1);
    assert_eq!(p["memTotal"], 512u64 << 20);
    assert_eq!(p["memUsed"], 64u64 << 20);
    assert_eq!(p["memCache"], 32u64 << 20);
    assert_eq!(p["diskUsed"], 4u64 << 20);
    let pct = p["cpuUsedPct"].as_f64().unwrap();
    assert!((25.0..=31.0).contains(&pct), "{pct}");
    assert!(p["timestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        fake.calls(),
        [format!("metrics node-a {}", node_id("uid-sb1"))]
    );

    // A range that ends before now has no point; a reversed one is refused before any call.
    let task = call(
        &api,
        "GET",
        "/sandboxes/sb1/metrics?start=0&end=1",
        Value::Null,
    )
    .await;
    server
        .expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .ok(running("sb1", 10));
    assert_eq!(task.await.unwrap().1, json!([]));
    let (status, body) = call(
        &api,
        "GET",
        "/sandboxes/sb1/metrics?start=9&end=2",
        Value::Null,
    )
    .await
    .await
    .unwrap();
    assert_error(status, &body, 400, "start (9) is after end (2)");
    let (status, body) = call(
        &api,
        "GET",
        "/sandboxes/sb1/metrics?start=yesterday",
        Value::Null,
    )
    .await
    .await
    .unwrap();
    assert_error(
        status,
        &body,
        400,
        "invalid start \"yesterday\": expected unix seconds",
    );
}

#[tokio::test]
async fn metrics_of_paused_missing_or_unreachable_sandboxes() {
    let (api, mut server, fake) = api();
    // Paused: no point and no agent call (single-host samples running sandboxes only).
    let task = call(&api, "GET", "/sandboxes/sb1/metrics", Value::Null).await;
    let mut paused = running("sb1", 10);
    paused["spec"]["paused"] = json!(true);
    server
        .expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .ok(paused);
    assert_eq!(task.await.unwrap(), (StatusCode::OK, json!([])));
    assert!(fake.calls().is_empty());

    let task = call(&api, "GET", "/sandboxes/nope/metrics", Value::Null).await;
    server
        .expect("GET", &format!("{SANDBOXES}/nope"))
        .await
        .status_error(404, "NotFound", "not found");
    let (status, body) = task.await.unwrap();
    assert_error(status, &body, 404, "sandbox nope not found");

    fake.fail(
        "metrics",
        AgentError::Unreachable {
            node: "node-a".into(),
            message: "connection refused".into(),
        },
    );
    let task = call(&api, "GET", "/sandboxes/sb1/metrics", Value::Null).await;
    server
        .expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .ok(running("sb1", 10));
    let (status, body) = task.await.unwrap();
    assert_error(status, &body, 502, "connection refused");
}

fn cp_resource(phase: &str, message: Option<&str>, reason: &str) -> Value {
    json!({"apiVersion": "warren.dev/v1alpha1", "kind": "Checkpoint",
           "metadata": {"name": "cp1", "namespace": NS, "uid": "uid-cp1",
                        "creationTimestamp": "2026-01-01T00:00:00Z"},
           "spec": {"sandboxName": "sb1", "keepRunning": true,
                    "persistentContents": ["memory", "filesystem"], "ttlAfterFinished": "1h"},
           "status": {"phase": phase, "message": message, "checkpointId": "uid-cp1",
                      "nodeName": "node-a", "completionTime": "2026-01-01T00:00:02Z",
                      "sizeBytes": 52428800, "durationMs": 310,
                      "conditions": [{"type": "Ready", "status": if phase == "Succeeded" {"True"} else {"False"},
                                      "reason": reason, "message": message.unwrap_or(""),
                                      "lastTransitionTime": "2026-01-01T00:00:02Z"}]}})
}

#[tokio::test]
async fn a_checkpoint_is_created_and_answered_once_taken() {
    let (api, mut server, _fake) = api();
    let task = call(
        &api,
        "POST",
        "/warren/v1/checkpoints",
        json!({"kind": "Checkpoint", "metadata": {"name": "cp1"},
               "spec": {"sandbox": "sb1", "ttlAfterFinished": "1h"}}),
    )
    .await;
    server
        .expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .ok(running("sb1", 10));
    let c = server.expect("POST", CHECKPOINTS).await;
    assert_eq!(
        c.body["spec"],
        json!({"sandboxName": "sb1", "keepRunning": true,
               "persistentContents": ["memory", "filesystem"], "ttlAfterFinished": "1h"})
    );
    let mut created = c.body.clone();
    created["metadata"]["uid"] = json!("uid-cp1");
    c.reply(201, created);
    // The operator works on it; the API waits until it is taken.
    server
        .expect("GET", &format!("{CHECKPOINTS}/cp1"))
        .await
        .ok(cp_resource("Creating", None, "Creating"));
    server
        .expect("GET", &format!("{CHECKPOINTS}/cp1"))
        .await
        .ok(cp_resource("Succeeded", None, "Succeeded"));
    let (status, body) = task.await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["kind"], "Checkpoint");
    assert_eq!(body["metadata"]["name"], "cp1");
    assert_eq!(body["spec"]["sandbox"], "sb1");
    assert_eq!(
        body["spec"]["persistentContents"],
        json!(["memory", "filesystem"])
    );
    assert_eq!(body["status"]["phase"], "Succeeded");
    assert_eq!(body["status"]["size"], 52428800);
    assert_eq!(body["status"]["durationMs"], 310.0);
    assert_eq!(body["status"]["completedAt"], "2026-01-01T00:00:02Z");
    assert_eq!(body["status"]["expiresAt"], "2026-01-01T01:00:02Z");

    // Get, list (a deleting one is gone for the API) and delete.
    let task = call(&api, "GET", "/warren/v1/checkpoints/cp1", Value::Null).await;
    server
        .expect("GET", &format!("{CHECKPOINTS}/cp1"))
        .await
        .ok(cp_resource("Succeeded", None, "Succeeded"));
    let (status, got) = task.await.unwrap();
    assert_eq!((status, &got), (StatusCode::OK, &body));

    let task = call(&api, "GET", "/warren/v1/checkpoints", Value::Null).await;
    let mut deleting = cp_resource("Succeeded", None, "Succeeded");
    deleting["metadata"]["name"] = json!("cp0");
    deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:05Z");
    server.expect("GET", CHECKPOINTS).await.ok(list(vec![
        deleting,
        cp_resource("Succeeded", None, "Succeeded"),
    ]));
    let (status, all) = task.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(all, json!([body]));

    let task = call(&api, "DELETE", "/warren/v1/checkpoints/cp1", Value::Null).await;
    server
        .expect("GET", &format!("{CHECKPOINTS}/cp1"))
        .await
        .ok(cp_resource("Succeeded", None, "Succeeded"));
    // Nothing restores from it, no checkpoint stacks on it (cluster_forks.rs's check).
    server.expect("GET", SANDBOXES).await.ok(list(vec![]));
    server.expect("GET", CHECKPOINTS).await.ok(list(vec![]));
    server
        .expect("DELETE", &format!("{CHECKPOINTS}/cp1"))
        .await
        .ok(cp_resource("Succeeded", None, "Succeeded"));
    assert_eq!(task.await.unwrap(), (StatusCode::NO_CONTENT, Value::Null));

    let task = call(&api, "GET", "/warren/v1/checkpoints/cp9", Value::Null).await;
    server
        .expect("GET", &format!("{CHECKPOINTS}/cp9"))
        .await
        .status_error(404, "NotFound", "not found");
    let (status, body) = task.await.unwrap();
    assert_error(status, &body, 404, "checkpoint cp9 not found");
}

#[tokio::test]
async fn a_failed_checkpoint_is_removed_and_its_reason_is_the_error() {
    let (api, mut server, _fake) = api();
    let task = call(
        &api,
        "POST",
        "/warren/v1/checkpoints",
        json!({"metadata": {"name": "cp1"}, "spec": {"sandbox": "sb1"}}),
    )
    .await;
    server
        .expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .ok(running("sb1", 10));
    let c = server.expect("POST", CHECKPOINTS).await;
    let b = c.body.clone();
    c.reply(201, b);
    let msg = "node agent on node-a answered 500: criu dump failed";
    server
        .expect("GET", &format!("{CHECKPOINTS}/cp1"))
        .await
        .ok(cp_resource("Failed", Some(msg), "CheckpointFailed"));
    server
        .expect("DELETE", &format!("{CHECKPOINTS}/cp1"))
        .await
        .ok(cp_resource("Failed", Some(msg), "CheckpointFailed"));
    let (status, body) = task.await.unwrap();
    assert_error(status, &body, 500, "criu dump failed");
}

#[tokio::test]
async fn checkpoint_requests_are_checked_like_single_host() {
    let (api, mut server, _fake) = api();
    let (status, body) = call(
        &api,
        "POST",
        "/warren/v1/checkpoints",
        json!({"kind": "Commit", "metadata": {"name": "x"}, "spec": {"sandbox": "sb1"}}),
    )
    .await
    .await
    .unwrap();
    assert_error(
        status,
        &body,
        400,
        "expected \"Checkpoint\" on this endpoint",
    );
    let (status, body) = call(
        &api,
        "POST",
        "/warren/v1/checkpoints",
        json!({"metadata": {"name": "x"}, "spec": {"sandbox": "sb1", "bogus": 1}}),
    )
    .await
    .await
    .unwrap();
    assert_error(status, &body, 400, "invalid Checkpoint");
    let (status, body) = call(
        &api,
        "POST",
        "/warren/v1/checkpoints",
        json!({"metadata": {"name": "x"}, "spec": {"sandbox": "sb1", "ttlAfterFinished": "soon"}}),
    )
    .await
    .await
    .unwrap();
    assert_error(status, &body, 400, "ttl");

    // No such sandbox: 404 before anything is created.
    let task = call(
        &api,
        "POST",
        "/warren/v1/checkpoints",
        json!({"metadata": {"name": "x"}, "spec": {"sandbox": "nope"}}),
    )
    .await;
    server
        .expect("GET", &format!("{SANDBOXES}/nope"))
        .await
        .status_error(404, "NotFound", "not found");
    let (status, body) = task.await.unwrap();
    assert_error(status, &body, 404, "sandbox nope not found");

    // A hibernated sandbox: 409 with single-host's advice.
    let task = call(
        &api,
        "POST",
        "/warren/v1/checkpoints",
        json!({"metadata": {"name": "x"}, "spec": {"sandbox": "sb1"}}),
    )
    .await;
    let mut hib = running("sb1", 10);
    hib["status"]["phase"] = json!("Paused");
    hib["status"]["conditions"].as_array_mut().unwrap().push(
        json!({"type": "Paused", "status": "True", "reason": "Hibernated",
                     "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}),
    );
    server
        .expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .ok(hib);
    let (status, body) = task.await.unwrap();
    assert_error(status, &body, 409, "is hibernated: connect to it");

    // A name taken: 409 as single-host says it.
    let task = call(
        &api,
        "POST",
        "/warren/v1/checkpoints",
        json!({"metadata": {"name": "cp1"}, "spec": {"sandbox": "sb1"}}),
    )
    .await;
    server
        .expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .ok(running("sb1", 10));
    server.expect("POST", CHECKPOINTS).await.status_error(
        409,
        "AlreadyExists",
        "checkpoints.warren.dev \"cp1\" already exists",
    );
    let (status, body) = task.await.unwrap();
    assert_error(status, &body, 409, "checkpoint cp1 already exists");
}

#[tokio::test]
async fn commits_start_as_jobs_and_read_back_in_the_single_host_shape() {
    let (api, mut server, _fake) = api();
    let task = call(
        &api,
        "POST",
        "/warren/v1/commits",
        json!({"kind": "Commit", "metadata": {"name": "c1"},
               "spec": {"sandbox": "sb1", "image": "reg.test/team/img:v1", "ttl": "7d",
                        "registryAuth": {"secrets": [{"name": "regcred"}]}}}),
    )
    .await;
    server
        .expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .ok(running("sb1", 10));
    let c = server.expect("POST", COMMITS).await;
    assert_eq!(
        c.body["spec"],
        json!({"podName": "sb1", "image": "reg.test/team/img:v1", "ttl": "7d",
               "registryAuth": {"secrets": ["regcred"]}})
    );
    let mut created = c.body.clone();
    created["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
    c.reply(201, created.clone());
    let (status, body) = task.await.unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["status"]["phase"], "Pending");
    assert_eq!(body["spec"]["sandbox"], "sb1");
    assert_eq!(body["spec"]["registryAuth"]["secrets"], json!(["regcred"]));
    assert_eq!(body["status"]["createdAt"], "2026-01-01T00:00:00Z");

    // Polled until final, as the CLI does.
    let task = call(&api, "GET", "/warren/v1/commits/c1", Value::Null).await;
    let mut done = created.clone();
    done["status"] = json!({"phase": "Succeeded", "commitID": "sha256:abc", "sizeBytes": 4096,
                            "durationMs": 54, "startTime": "2026-01-01T00:00:00Z",
                            "completionTime": "2026-01-01T00:00:01Z"});
    server
        .expect("GET", &format!("{COMMITS}/c1"))
        .await
        .ok(done.clone());
    let (status, body) = task.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"]["phase"], "Succeeded");
    assert_eq!(body["status"]["digest"], "sha256:abc");
    assert_eq!(body["status"]["size"], 4096);
    assert_eq!(body["status"]["totalDurationMs"], 54.0);
    assert_eq!(body["status"]["pushed"], true);
    assert_eq!(body["status"]["expiresAt"], "2026-01-08T00:00:01Z");

    let task = call(&api, "GET", "/warren/v1/commits", Value::Null).await;
    server.expect("GET", COMMITS).await.ok(list(vec![done]));
    let (status, all) = task.await.unwrap();
    assert_eq!((status, all.as_array().unwrap().len()), (StatusCode::OK, 1));

    let task = call(&api, "DELETE", "/warren/v1/commits/c9", Value::Null).await;
    server
        .expect("GET", &format!("{COMMITS}/c9"))
        .await
        .status_error(404, "NotFound", "not found");
    let (status, body) = task.await.unwrap();
    assert_error(status, &body, 404, "commit c9 not found");

    // A sandbox that is not running or paused cannot be committed.
    let task = call(
        &api,
        "POST",
        "/warren/v1/commits",
        json!({"metadata": {"name": "c2"}, "spec": {"sandbox": "sb1", "image": "img:v1"}}),
    )
    .await;
    let mut failed = running("sb1", 10);
    failed["status"]["phase"] = json!("Failed");
    server
        .expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .ok(failed);
    let (status, body) = task.await.unwrap();
    assert_error(status, &body, 409, "sandbox sb1 is failed");
    let (status, body) = call(
        &api,
        "POST",
        "/warren/v1/commits",
        json!({"metadata": {"name": "c3"}, "spec": {"sandbox": "sb1"}}),
    )
    .await
    .await
    .unwrap();
    assert_error(status, &body, 400, "invalid Commit");
}

#[tokio::test]
async fn metrics_without_node_agents_say_why() {
    let (ctx, mut server) = mock();
    let api = Arc::new(ClusterApi::new(ctx.client.clone(), NS, KEY.into()));
    let task = call(&api, "GET", "/sandboxes/sb1/metrics", Value::Null).await;
    server
        .expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .ok(running("sb1", 10));
    let (status, body) = task.await.unwrap();
    assert_error(status, &body, 501, "WARREN_NODE_AGENT_METRICS_TOKEN_FILE");
}

#[tokio::test]
async fn apply_by_name_is_idempotent_and_refuses_another_spec() {
    let (api, mut server, _fake) = api();
    let same = json!({"metadata": {"name": "cp1"},
                      "spec": {"sandbox": "sb1", "ttlAfterFinished": "1h"}});
    let task = call(&api, "PUT", "/warren/v1/checkpoints/cp1", same.clone()).await;
    server
        .expect("GET", &format!("{CHECKPOINTS}/cp1"))
        .await
        .ok(cp_resource("Succeeded", None, "Succeeded"));
    let (status, body) = task.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"]["phase"], "Succeeded");

    let mut other = same.clone();
    other["spec"]["keepRunning"] = json!(false);
    let task = call(&api, "PUT", "/warren/v1/checkpoints/cp1", other).await;
    server
        .expect("GET", &format!("{CHECKPOINTS}/cp1"))
        .await
        .ok(cp_resource("Succeeded", None, "Succeeded"));
    let (status, body) = task.await.unwrap();
    assert_error(
        status,
        &body,
        409,
        "checkpoint cp1 exists with another spec; delete it first",
    );

    let (status, body) = call(&api, "PUT", "/warren/v1/checkpoints/cp2", same)
        .await
        .await
        .unwrap();
    assert_error(
        status,
        &body,
        400,
        "metadata.name \"cp1\" does not match the URL's \"cp2\"",
    );

    // A new commit by apply starts like a POST (202).
    let task = call(
        &api,
        "PUT",
        "/warren/v1/commits/c1",
        json!({"kind": "Commit", "metadata": {"name": "c1"},
               "spec": {"sandbox": "sb1", "image": "img:v1"}}),
    )
    .await;
    server
        .expect("GET", &format!("{COMMITS}/c1"))
        .await
        .status_error(404, "NotFound", "not found");
    server
        .expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .ok(running("sb1", 10));
    let c = server.expect("POST", COMMITS).await;
    let b = c.body.clone();
    c.reply(201, b.clone());
    let (status, body) = task.await.unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["status"]["phase"], "Pending");

    // Applied again with the same spec: the existing commit, not a second one.
    let task = call(
        &api,
        "PUT",
        "/warren/v1/commits/c1",
        json!({"kind": "Commit", "metadata": {"name": "c1"},
               "spec": {"sandbox": "sb1", "image": "img:v1"}}),
    )
    .await;
    server.expect("GET", &format!("{COMMITS}/c1")).await.ok(b);
    let (status, _) = task.await.unwrap();
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_checkpoint_forks_still_use_is_not_deleted() {
    let (api, mut server, _fake) = api();
    let task = call(&api, "DELETE", "/warren/v1/checkpoints/cp1", Value::Null).await;
    server
        .expect("GET", &format!("{CHECKPOINTS}/cp1"))
        .await
        .ok(cp_resource("Succeeded", None, "Succeeded"));
    let mut fork = running("f1", 1);
    fork["spec"]["restoreFrom"] = json!("cp1");
    server.expect("GET", SANDBOXES).await.ok(list(vec![fork]));
    let (status, body) = task.await.unwrap();
    assert_error(
        status,
        &body,
        409,
        "checkpoint cp1 holds the files of sandboxes f1",
    );
}
