//! The cluster-mode E2B API (`cluster_api`) against a mock API server: creates claim a warm
//! member or make a Sandbox and wait for it, errors keep the E2B shape, and pool members that
//! nobody claimed stay invisible.

use crate::cluster_api::{router, sandbox_target, ClusterApi};
use crate::crd::{Condition, SandboxPhase, SandboxStatus};
use crate::mock::{list, member, mock, ready, sandbox, set, ApiServer, NS, SANDBOXES};
use axum::body::Body;
use http::{HeaderMap, Request, StatusCode};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;
use warren_core::envd_client::{EnvdClient, InitRequest};

const KEY: &str = "warren_testkey";
pub(crate) const CHECKPOINTS: &str = "/apis/warren.dev/v1alpha1/namespaces/testns/checkpoints";

/// envd's `/init` as the API calls it: recorded, refused for the addresses in `refuse`.
#[derive(Default)]
struct FakeEnvd {
    calls: std::sync::Mutex<Vec<(std::net::SocketAddr, String, InitRequest)>>,
    refuse: Vec<std::net::SocketAddr>,
}

#[async_trait::async_trait]
impl EnvdClient for FakeEnvd {
    async fn init(
        &self,
        addr: std::net::SocketAddr,
        admin_token: &str,
        req: &InitRequest,
    ) -> Result<(), String> {
        self.calls
            .lock()
            .unwrap()
            .push((addr, admin_token.to_string(), req.clone()));
        if self.refuse.contains(&addr) {
            return Err("connection refused".into());
        }
        Ok(())
    }
}

fn api_with(envd: Arc<FakeEnvd>) -> (Arc<ClusterApi>, ApiServer) {
    let (ctx, server) = mock();
    let mut a = ClusterApi::new(ctx.client.clone(), NS, KEY.into());
    a.poll = Duration::from_millis(10);
    a.ready_timeout = Duration::from_secs(2);
    a.envd_key = Some("envd-key".into());
    a.envd = envd;
    (Arc::new(a), server)
}

pub(crate) fn api() -> (Arc<ClusterApi>, ApiServer) {
    api_with(Arc::new(FakeEnvd::default()))
}

/// A ready pool member with an address.
fn addressed_member(name: &str, ip: &str) -> Value {
    let mut m = member(&set(2, 1), name, "r", "2026-01-01T00:00:00Z");
    m["status"]["sandboxIP"] = json!(ip);
    m
}

pub(crate) async fn call(
    api: &Arc<ClusterApi>,
    method: &str,
    path: &str,
    body: Value,
) -> tokio::task::JoinHandle<(StatusCode, Value)> {
    let app = router(api.clone(), Some("sbx.test".into()));
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("x-api-key", KEY)
        .header("content-type", "application/json")
        .body(Body::from(if body.is_null() {
            vec![]
        } else {
            serde_json::to_vec(&body).unwrap()
        }))
        .unwrap();
    tokio::spawn(async move {
        let resp = tokio::time::timeout(Duration::from_secs(5), app.oneshot(req))
            .await
            .expect("the API answered")
            .unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (status, v)
    })
}

fn no_members_query(q: &str, pool: &str) -> bool {
    q.contains(&format!("labelSelector=warren.dev%2Fsandboxset%3D{pool}"))
}

#[tokio::test]
async fn create_claims_a_warm_member_of_the_templates_pool() {
    let envd = Arc::new(FakeEnvd::default());
    let (api, mut server) = api_with(envd.clone());
    let task = call(
        &api,
        "POST",
        "/sandboxes",
        json!({"templateID": "pool", "timeout": 60, "metadata": {"user": "ann"},
               "envVars": {"FOO": "bar"}}),
    )
    .await;
    let c = server.expect("GET", SANDBOXES).await;
    assert!(no_members_query(&c.query, "pool"), "{}", c.query);
    c.ok(list(vec![addressed_member("m0", "10.9.0.5")]));
    let c = server.expect("PUT", &format!("{SANDBOXES}/m0")).await;
    let b = c.body.clone();
    assert_eq!(b["metadata"]["resourceVersion"], "rv-m0", "a guarded claim");
    assert_eq!(
        b["metadata"]["annotations"]["metadata.warren.dev/user"],
        "ann"
    );
    assert_eq!(b["spec"]["envVars"]["FOO"], "bar");
    assert!(b["spec"]["shutdownTime"].as_str().unwrap().ends_with('Z'));
    c.ok(b.clone());
    let c = server.expect("PATCH", &format!("{SANDBOXES}/m0")).await;
    assert_eq!(
        c.body["metadata"]["annotations"]["warren.dev/template-id"],
        "pool"
    );
    let mut got = b;
    got["metadata"]["annotations"]["warren.dev/template-id"] = json!("pool");
    c.ok(got);
    let (status, body) = task.await.unwrap();
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(body["sandboxID"], "m0");
    assert_eq!(body["templateID"], "pool");
    // The member's token, as the operator derived it for its node agent.
    assert_eq!(
        body["envdAccessToken"],
        crate::agent::envd_access_token("envd-key", "uid-m0")
    );
    // Its envd got the client's env vars through /init, with the admin token.
    let calls = envd.calls.lock().unwrap();
    assert_eq!(calls.len(), 1);
    let (addr, admin, init) = &calls[0];
    assert_eq!(addr.to_string(), "10.9.0.5:49983");
    assert_eq!(admin, &crate::agent::envd_admin_token("envd-key", "uid-m0"));
    assert_eq!(init.env_vars.get("FOO").map(String::as_str), Some("bar"));
    assert_eq!(init.access_token, body["envdAccessToken"]);
}

#[tokio::test]
async fn a_claimed_member_whose_envd_refuses_is_discarded_and_the_next_one_taken() {
    let envd = Arc::new(FakeEnvd {
        refuse: vec!["10.9.0.5:49983".parse().unwrap()],
        ..Default::default()
    });
    let (api, mut server) = api_with(envd.clone());
    let task = call(&api, "POST", "/sandboxes", json!({"templateID": "pool"})).await;
    server.expect("GET", SANDBOXES).await.ok(list(vec![
        addressed_member("m0", "10.9.0.5"),
        addressed_member("m1", "10.9.0.6"),
    ]));
    let c = server.expect("PUT", &format!("{SANDBOXES}/m0")).await;
    let b = c.body.clone();
    c.ok(b.clone());
    server
        .expect("DELETE", &format!("{SANDBOXES}/m0"))
        .await
        .ok(b);
    server
        .expect("GET", SANDBOXES)
        .await
        .ok(list(vec![addressed_member("m1", "10.9.0.6")]));
    let c = server.expect("PUT", &format!("{SANDBOXES}/m1")).await;
    let b = c.body.clone();
    c.ok(b.clone());
    server
        .expect("PATCH", &format!("{SANDBOXES}/m1"))
        .await
        .ok(b);
    let (status, body) = task.await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["sandboxID"], "m1");
    assert_eq!(envd.calls.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn create_without_a_member_makes_a_sandbox_and_waits_until_ready() {
    let (api, mut server) = api();
    let task = call(&api, "POST", "/v2/sandboxes", json!({"templateID": "base"})).await;
    server.expect("GET", SANDBOXES).await.ok(list(vec![]));
    // No Checkpoint of that name: not a fork.
    server
        .expect("GET", &format!("{CHECKPOINTS}/base"))
        .await
        .status_error(404, "NotFound", "not found");
    let c = server.expect("POST", SANDBOXES).await;
    let created = c.body.clone();
    let name = created["metadata"]["name"].as_str().unwrap().to_string();
    assert!(name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
    assert_eq!(created["spec"]["template"], "base");
    c.reply(201, created.clone());
    // Not ready yet, then ready.
    server
        .expect("GET", &format!("{SANDBOXES}/{name}"))
        .await
        .ok(created.clone());
    let mut ready_sbx = created.clone();
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
    assert_eq!(body["sandboxID"], json!(name));
}

/// A cold start that failed, or whose image pull failed (which the operator retries, pending,
/// but a create waits for no retry), answers the reason, and its Sandbox is removed.
#[tokio::test]
async fn a_failed_cold_start_is_explained_and_removed() {
    for (phase, reason, message) in [
        (
            SandboxPhase::Failed,
            "Unschedulable",
            "0/3 nodes are available",
        ),
        (
            SandboxPhase::Pending,
            "ImagePullBackOff",
            "pulling image r.example/x:1: registry r.example: connection refused",
        ),
    ] {
        let (api, mut server) = api();
        let task = call(&api, "POST", "/sandboxes", json!({"templateID": "base"})).await;
        server.expect("GET", SANDBOXES).await.ok(list(vec![]));
        server
            .expect("GET", &format!("{CHECKPOINTS}/base"))
            .await
            .status_error(404, "NotFound", "not found");
        let c = server.expect("POST", SANDBOXES).await;
        let mut created = c.body.clone();
        let name = created["metadata"]["name"].as_str().unwrap().to_string();
        c.reply(201, created.clone());
        created["status"] = serde_json::to_value(SandboxStatus {
            phase,
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "False".into(),
                reason: reason.into(),
                message: message.into(),
                ..ready()
            }],
            ..Default::default()
        })
        .unwrap();
        server
            .expect("GET", &format!("{SANDBOXES}/{name}"))
            .await
            .ok(created.clone());
        server
            .expect("DELETE", &format!("{SANDBOXES}/{name}"))
            .await
            .ok(created);
        let (status, body) = task.await.unwrap();
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body["code"], 500);
        let msg = body["message"].as_str().unwrap();
        assert!(msg.contains(reason) && msg.contains(message), "{msg}");
    }
}

#[tokio::test]
async fn bad_input_and_bad_keys_get_e2b_errors_without_api_calls() {
    let (api, _server) = api();
    let (status, body) = call(&api, "POST", "/sandboxes", json!({"timeout": -1}))
        .await
        .await
        .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["message"].as_str().unwrap().contains("timeout"));
    // What Warren lacks is refused as in single-host mode, before any API call.
    for (req, named) in [
        (
            json!({"templateID": "base", "volumeMounts": [{"name": "v"}]}),
            "volumeMounts",
        ),
        (
            json!({"templateID": "base", "network": {"egressProxy": {"address": "p:1"}}}),
            "egressProxy",
        ),
    ] {
        let (status, body) = call(&api, "POST", "/sandboxes", req).await.await.unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(body["message"].as_str().unwrap().contains(named), "{body}");
    }
    let (status, body) = call(
        &api,
        "PUT",
        "/sandboxes/sb1/network",
        json!({"rules": {"a.com": []}}),
    )
    .await
    .await
    .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("rules"),
        "{body}"
    );
    let app = router(api.clone(), None);
    let resp = app
        .oneshot(
            Request::builder()
                .uri("/sandboxes")
                .header("x-api-key", "wrong")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn unclaimed_pool_members_are_invisible_and_pause_twice_conflicts() {
    let (api, mut server) = api();
    let s = set(1, 1);
    // An unclaimed member is not a client's sandbox.
    let task = call(&api, "GET", "/sandboxes/m0", Value::Null).await;
    server
        .expect("GET", &format!("{SANDBOXES}/m0"))
        .await
        .ok(member(&s, "m0", "r", "2026-01-01T00:00:00Z"));
    let (status, body) = task.await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], 404);

    // Pause patches the spec; a second pause is a 409.
    let mut sb = sandbox("sb1");
    let task = call(&api, "POST", "/sandboxes/sb1/pause", Value::Null).await;
    server
        .expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .ok(serde_json::to_value(&sb).unwrap());
    let c = server.expect("PATCH", &format!("{SANDBOXES}/sb1")).await;
    assert_eq!(c.body, json!({"spec": {"paused": true}}));
    sb.spec.paused = true;
    c.ok(serde_json::to_value(&sb).unwrap());
    assert_eq!(task.await.unwrap().0, StatusCode::NO_CONTENT);
    let task = call(&api, "POST", "/sandboxes/sb1/pause", Value::Null).await;
    server
        .expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .ok(serde_json::to_value(&sb).unwrap());
    assert_eq!(task.await.unwrap().0, StatusCode::CONFLICT);

    // Unknown: 404 in E2B's shape.
    let task = call(&api, "DELETE", "/sandboxes/nope", Value::Null).await;
    server
        .expect("GET", &format!("{SANDBOXES}/nope"))
        .await
        .status_error(404, "NotFound", "sandboxes.warren.dev \"nope\" not found");
    let (status, body) = task.await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["message"], "sandbox nope not found");
}

#[test]
fn sandbox_requests_are_recognised_by_header_or_host() {
    let mut h = HeaderMap::new();
    assert_eq!(sandbox_target(&h, Some("sbx.test")), None);
    h.insert("host", "49983-iabc.sbx.test:443".parse().unwrap());
    assert_eq!(
        sandbox_target(&h, Some("sbx.test")),
        Some(("iabc".into(), 49983))
    );
    assert_eq!(sandbox_target(&h, None), None);
    h.insert("e2b-sandbox-id", "ixyz".parse().unwrap());
    h.insert("e2b-sandbox-port", "8080".parse().unwrap());
    assert_eq!(sandbox_target(&h, None), Some(("ixyz".into(), 8080)));
}

#[tokio::test]
async fn sandbox_traffic_is_proxied_to_the_sandbox_ip() {
    // The "sandbox": a server on loopback that echoes the path it got.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let echo =
        axum::Router::new().fallback(|uri: http::Uri| async move { format!("envd saw {uri}") });
    tokio::spawn(async move { axum::serve(listener, echo).await });

    let (api, mut server) = api();
    let app = router(api.clone(), None);
    let req = Request::builder()
        .method("GET")
        .uri("/files?path=/tmp/x")
        .header("e2b-sandbox-id", "sb1")
        .header("e2b-sandbox-port", port.to_string())
        .body(Body::empty())
        .unwrap();
    let task = tokio::spawn(async move { app.oneshot(req).await.unwrap() });
    let mut sb = sandbox("sb1");
    sb.status = Some(SandboxStatus {
        phase: SandboxPhase::Running,
        conditions: vec![ready()],
        sandbox_ip: Some("127.0.0.1".into()),
        ..Default::default()
    });
    server
        .expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .ok(serde_json::to_value(&sb).unwrap());
    let resp = task.await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
        .await
        .unwrap();
    assert_eq!(&body[..], b"envd saw /files?path=/tmp/x");

    // A paused sandbox is not proxied to: a clear 409, not a hang.
    sb.spec.paused = true;
    let app = router(api.clone(), None);
    let req = Request::builder()
        .uri("/health")
        .header("e2b-sandbox-id", "sb1")
        .header("e2b-sandbox-port", "49983")
        .body(Body::empty())
        .unwrap();
    let task = tokio::spawn(async move { app.oneshot(req).await.unwrap() });
    server
        .expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .ok(serde_json::to_value(&sb).unwrap());
    assert_eq!(task.await.unwrap().status(), StatusCode::CONFLICT);
}

#[tokio::test]
async fn a_cold_start_takes_the_member_spec_of_the_templates_sandboxset() {
    const SETS: &str = "/apis/warren.dev/v1alpha1/namespaces/testns/sandboxsets";
    let (api, mut server) = api();
    let task = call(&api, "POST", "/sandboxes", json!({"templateID": "py"})).await;
    server.expect("GET", SANDBOXES).await.ok(list(vec![]));
    // Not a Checkpoint (which would make a fork).
    server
        .expect("GET", &format!("{CHECKPOINTS}/py"))
        .await
        .status_error(404, "NotFound", "checkpoints \"py\" not found");
    let mut py = set(0, 1);
    py.metadata.name = Some("py".into());
    py.spec.template = None;
    py.spec.image = Some("127.0.0.1:5000/team/py:3.12".into());
    py.spec.resources.limits = [("memory".to_string(), "1Gi".to_string())].into();
    server
        .expect("GET", &format!("{SETS}/py"))
        .await
        .ok(serde_json::to_value(&py).unwrap());
    let c = server.expect("POST", SANDBOXES).await;
    let created = c.body.clone();
    assert_eq!(created["spec"]["image"], "127.0.0.1:5000/team/py:3.12");
    assert!(created["spec"].get("template").is_none(), "{created}");
    assert_eq!(created["spec"]["resources"]["limits"]["memory"], "1Gi");
    assert!(created["spec"]["shutdownTime"].is_string());
    let name = created["metadata"]["name"].as_str().unwrap().to_string();
    c.reply(201, created.clone());
    let mut ready_sbx = created.clone();
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

    // A templateID that names no SandboxSet: a clear 404, and no Sandbox made.
    let task = call(&api, "POST", "/sandboxes", json!({"templateID": "nope"})).await;
    server.expect("GET", SANDBOXES).await.ok(list(vec![]));
    server
        .expect("GET", &format!("{CHECKPOINTS}/nope"))
        .await
        .status_error(404, "NotFound", "checkpoints \"nope\" not found");
    server
        .expect("GET", &format!("{SETS}/nope"))
        .await
        .status_error(404, "NotFound", "sandboxsets \"nope\" not found");
    let (status, body) = task.await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["code"], 404);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("names a SandboxSet"),
        "{body}"
    );
}
