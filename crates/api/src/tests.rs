//! API and router tests over FakeRuntime, driven with `oneshot`.

use super::*;
use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::collections::HashSet;
use tower::ServiceExt;
use warren_core::{ApiKey, ApiKeys, Store, TemplateRegistry, WarrenConfig};
use warren_runtime::fake::FakeRuntime;
use warren_runtime::{Placement, RootfsSpec, RuntimeError, SandboxRuntime, SandboxSpec};

/// FakeRuntime whose sandboxes live on 127.0.0.1, so the router can reach test servers.
struct LoopbackRuntime(FakeRuntime);

#[async_trait]
impl SandboxRuntime for LoopbackRuntime {
    async fn create(&self, spec: &SandboxSpec) -> Result<Placement, RuntimeError> {
        let mut p = self.0.create(spec).await?;
        p.ip = "127.0.0.1".parse().unwrap();
        Ok(p)
    }
    async fn freeze(&self, id: &str) -> Result<(), RuntimeError> {
        self.0.freeze(id).await
    }
    async fn thaw(&self, id: &str) -> Result<(), RuntimeError> {
        self.0.thaw(id).await
    }
    async fn destroy(&self, id: &str) -> Result<(), RuntimeError> {
        self.0.destroy(id).await
    }
    async fn adopt(&self, id: &str, p: &Placement) -> Result<bool, RuntimeError> {
        self.0.adopt(id, p).await
    }
    async fn sweep(&self, keep: &HashSet<String>) -> Result<Vec<String>, RuntimeError> {
        self.0.sweep(keep).await
    }
    fn is_alive(&self, id: &str) -> bool {
        self.0.is_alive(id)
    }
    async fn set_network(
        &self,
        id: &str,
        policy: &warren_runtime::NetworkPolicy,
    ) -> Result<(), RuntimeError> {
        self.0.set_network(id, policy).await
    }
    async fn stats(&self, id: &str) -> Result<warren_runtime::SandboxStats, RuntimeError> {
        self.0.stats(id).await
    }
    fn hibernate_support(&self) -> Result<(), String> {
        self.0.hibernate_support()
    }
    async fn hibernate(&self, id: &str) -> Result<warren_runtime::CheckpointStats, RuntimeError> {
        self.0.hibernate(id).await
    }
    async fn wake(&self, id: &str) -> Result<Placement, RuntimeError> {
        let mut p = self.0.wake(id).await?;
        p.ip = "127.0.0.1".parse().unwrap();
        Ok(p)
    }
    async fn adopt_hibernated(&self, id: &str, p: &Placement) -> Result<bool, RuntimeError> {
        self.0.adopt_hibernated(id, p).await
    }
}

const KEY1: &str = "key-team-1";
const KEY2: &str = "key-team-2";

fn test_app(domain: Option<&str>) -> Router {
    let keys = ApiKeys::new(vec![
        ApiKey {
            id: "k1".into(),
            team: "t1".into(),
            key: KEY1.into(),
        },
        ApiKey {
            id: "k2".into(),
            team: "t2".into(),
            key: KEY2.into(),
        },
    ]);
    let templates = TemplateRegistry::new(None);
    templates.register(
        "base",
        RootfsSpec {
            lower_dirs: vec!["/nonexistent".into()],
            ro_binds: vec![],
        },
    );
    let warren = Warren::new(
        Arc::new(LoopbackRuntime(FakeRuntime::new())),
        Store::open_in_memory().unwrap(),
        templates,
        keys,
        WarrenConfig::default(),
    );
    app(
        Arc::new(warren),
        ApiOptions {
            domain: domain.map(Into::into),
        },
    )
}

async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    key: Option<&str>,
    body: Option<&str>,
    extra: &[(&str, &str)],
) -> (StatusCode, Value, Response<()>) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(k) = key {
        req = req.header("X-API-KEY", k);
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let req = req
        .body(body.map(|b| Body::from(b.to_string())).unwrap_or_default())
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
    };
    (parts.status, value, Response::from_parts(parts, ()))
}

/// Asserts an E2B error body: integer `code` equal to the status, string `message`.
fn assert_error(status: StatusCode, body: &Value, expect: StatusCode) {
    assert_eq!(status, expect, "{body}");
    assert_eq!(body["code"], json!(expect.as_u16()), "{body}");
    assert!(body["message"].is_string(), "{body}");
}

async fn create(app: &Router, key: &str, body: &str) -> Value {
    let (s, v, _) = call(app, "POST", "/v2/sandboxes", Some(key), Some(body), &[]).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    v
}

#[tokio::test]
async fn create_returns_the_sandbox_shape() {
    let app = test_app(None);
    let v = create(
        &app,
        KEY1,
        r#"{"templateID":"base","timeout":60,"metadata":{"a":"b"},"envVars":{"X":"1"},"allow_internet_access":false,"autoPause":true}"#,
    )
    .await;
    let id = v["sandboxID"].as_str().unwrap();
    assert_eq!(id.len(), 20);
    assert_eq!(v["templateID"], "base");
    assert!(v["clientID"].is_string());
    assert_eq!(v["envdVersion"], "0.6.4");
    assert!(v["envdAccessToken"].as_str().unwrap().len() >= 32);
    assert!(v.get("domain").is_none());

    let (s, d, _) = call(
        &app,
        "GET",
        &format!("/sandboxes/{id}"),
        Some(KEY1),
        None,
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    for field in [
        "templateID",
        "sandboxID",
        "clientID",
        "startedAt",
        "endAt",
        "envdVersion",
        "cpuCount",
        "memoryMB",
        "diskSizeMB",
        "state",
    ] {
        assert!(!d[field].is_null(), "missing {field} in {d}");
    }
    assert_eq!(d["state"], "running");
    assert_eq!(d["metadata"], json!({"a": "b"}));
    assert_eq!(d["allowInternetAccess"], false);
    assert_eq!(
        d["lifecycle"],
        json!({"autoResume": false, "onTimeout": "pause"})
    );
    assert_eq!(d["envdAccessToken"], v["envdAccessToken"]);
    let started = chrono::DateTime::parse_from_rfc3339(d["startedAt"].as_str().unwrap()).unwrap();
    let end = chrono::DateTime::parse_from_rfc3339(d["endAt"].as_str().unwrap()).unwrap();
    assert_eq!((end - started).num_seconds(), 60);

    // The v1 endpoint creates too, and the domain is reported when configured.
    let app = test_app(Some("sbx.test"));
    let (s, v, _) = call(
        &app,
        "POST",
        "/sandboxes",
        Some(KEY1),
        Some(r#"{"templateID":"base"}"#),
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(v["domain"], "sbx.test");
}

#[tokio::test]
async fn auth_errors_are_401_json() {
    let app = test_app(None);
    for (key, path, method) in [
        (None, "/v2/sandboxes", "GET"),
        (Some("wrong"), "/v2/sandboxes", "GET"),
        (None, "/v2/sandboxes", "POST"),
        (Some("wrong"), "/sandboxes/abc", "DELETE"),
    ] {
        let (s, v, _) = call(&app, method, path, key, Some("{}"), &[]).await;
        assert_error(s, &v, StatusCode::UNAUTHORIZED);
    }
    // Header names are case-insensitive.
    let (s, _, _) = call(
        &app,
        "GET",
        "/v2/sandboxes",
        None,
        None,
        &[("x-api-key", KEY1)],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn bearer_keys_and_their_errors() {
    let app = test_app(None);
    let bearer = format!("Bearer {KEY1}");
    let (s, v, _) = call(
        &app,
        "GET",
        "/v2/sandboxes",
        None,
        None,
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    for auth in ["Bearer wrong", "Basic a2V5Og==", "Bearer", ""] {
        let (s, v, _) = call(
            &app,
            "GET",
            "/v2/sandboxes",
            None,
            None,
            &[("authorization", auth)],
        )
        .await;
        assert_error(s, &v, StatusCode::UNAUTHORIZED);
    }
    // X-API-Key is checked first, as upstream does.
    let (s, v, _) = call(
        &app,
        "GET",
        "/v2/sandboxes",
        Some("wrong"),
        None,
        &[("authorization", &bearer)],
    )
    .await;
    assert_error(s, &v, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn openapi_document_is_served_without_a_key() {
    let app = test_app(None);
    let (s, v, resp) = call(&app, "GET", "/openapi.json", None, None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(v["openapi"], "3.1.0");
    assert_eq!(
        v,
        serde_json::from_str::<Value>(crate::openapi::document_json()).unwrap()
    );
    // Every documented operation is routed: none falls through to the 404/405 fallbacks.
    for (path, item) in v["paths"].as_object().unwrap() {
        let uri = path
            .replace("{id}", "nosuchsandbox")
            .replace("{name}", "nosuch");
        for method in item.as_object().unwrap().keys() {
            let (s, body, _) =
                call(&app, &method.to_uppercase(), &uri, Some(KEY1), None, &[]).await;
            let msg = body["message"].as_str().unwrap_or("");
            assert!(
                !msg.starts_with("no such endpoint") && s != StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}: {s} {body}"
            );
        }
    }
}

#[tokio::test]
async fn bad_inputs_are_400_or_404_json() {
    {
        let app = test_app(None);
        for q in [
            "limit=0",
            "limit=x",
            "after=z",
            "since=yesterday",
            "kind=nope",
        ] {
            let (s, v, _) = call(
                &app,
                "GET",
                &format!("/warren/v1/audit?{q}"),
                Some(KEY1),
                None,
                &[],
            )
            .await;
            assert_error(s, &v, StatusCode::BAD_REQUEST);
        }
    }
    let app = test_app(None);
    for body in [
        "{not json",
        r#"{"templateID":"base","timeout":-5}"#,
        r#"{"templateID":"base","timeout":"x"}"#,
        r#"{"timeout":5}"#,
        r#"{"templateID":"base","metadata":{"a":1}}"#,
    ] {
        let (s, v, _) = call(&app, "POST", "/v2/sandboxes", Some(KEY1), Some(body), &[]).await;
        assert_error(s, &v, StatusCode::BAD_REQUEST);
    }
    let (s, v, _) = call(
        &app,
        "POST",
        "/v2/sandboxes",
        Some(KEY1),
        Some(r#"{"templateID":"nope"}"#),
        &[],
    )
    .await;
    assert_error(s, &v, StatusCode::NOT_FOUND);
    assert!(v["message"]
        .as_str()
        .unwrap()
        .contains("template 'nope' not found"));

    let id = create(&app, KEY1, r#"{"templateID":"base"}"#).await["sandboxID"]
        .as_str()
        .unwrap()
        .to_string();
    for body in [r#"{"timeout":-1}"#, "{}", "[", r#"{"timeout":1.5}"#] {
        let (s, v, _) = call(
            &app,
            "POST",
            &format!("/sandboxes/{id}/timeout"),
            Some(KEY1),
            Some(body),
            &[],
        )
        .await;
        assert_error(s, &v, StatusCode::BAD_REQUEST);
    }
    for q in [
        "state=bogus",
        "limit=abc",
        "limit=0",
        "nextToken=%%%",
        "order=up",
        "startedAfter=yesterday",
    ] {
        let (s, v, _) = call(
            &app,
            "GET",
            &format!("/v2/sandboxes?{q}"),
            Some(KEY1),
            None,
            &[],
        )
        .await;
        assert_error(s, &v, StatusCode::BAD_REQUEST);
    }
    let (s, v, _) = call(&app, "GET", "/no/such/path", Some(KEY1), None, &[]).await;
    assert_error(s, &v, StatusCode::NOT_FOUND);
    let (s, v, _) = call(&app, "PUT", "/v2/sandboxes", Some(KEY1), None, &[]).await;
    assert_error(s, &v, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn unknown_ids_are_404_json() {
    let app = test_app(None);
    for (method, path, body) in [
        ("GET", "/sandboxes/nope", None),
        ("DELETE", "/sandboxes/nope", None),
        ("POST", "/sandboxes/nope/timeout", Some(r#"{"timeout":5}"#)),
        ("POST", "/sandboxes/nope/pause", Some("{}")),
        ("POST", "/v2/sandboxes/nope/connect", Some("{}")),
        ("POST", "/sandboxes/nope/connect", Some(r#"{"timeout":5}"#)),
        ("POST", "/sandboxes/nope/resume", Some("{}")),
        ("GET", "/sandboxes/nope/metrics", None),
    ] {
        let (s, v, _) = call(&app, method, path, Some(KEY1), body, &[]).await;
        assert_error(s, &v, StatusCode::NOT_FOUND);
    }
}

#[tokio::test]
async fn lifecycle_kill_timeout_pause_connect() {
    let app = test_app(None);
    let created = create(&app, KEY1, r#"{"templateID":"base","timeout":100}"#).await;
    let id = created["sandboxID"].as_str().unwrap().to_string();
    let token = created["envdAccessToken"].clone();
    let path = |p: &str| format!("/sandboxes/{id}{p}");

    let (s, v, _) = call(
        &app,
        "POST",
        &path("/timeout"),
        Some(KEY1),
        Some(r#"{"timeout":10}"#),
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    assert_eq!(v, Value::Null);

    // Connect to a running sandbox: 200, extends only.
    let (s, v, _) = call(
        &app,
        "POST",
        &format!("/v2/sandboxes/{id}/connect"),
        Some(KEY1),
        Some(r#"{"timeout":1000}"#),
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["sandboxID"], json!(id));
    assert_eq!(v["envdAccessToken"], token);
    let (_, d, _) = call(&app, "GET", &path(""), Some(KEY1), None, &[]).await;
    let end1 = d["endAt"].as_str().unwrap().to_string();
    let (s, _, _) = call(
        &app,
        "POST",
        &format!("/v2/sandboxes/{id}/connect"),
        Some(KEY1),
        Some(r#"{"timeout":5}"#),
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (_, d, _) = call(&app, "GET", &path(""), Some(KEY1), None, &[]).await;
    assert_eq!(d["endAt"].as_str().unwrap(), end1);

    // v1 resume of a running sandbox is a conflict.
    let (s, v, _) = call(&app, "POST", &path("/resume"), Some(KEY1), Some("{}"), &[]).await;
    assert_error(s, &v, StatusCode::CONFLICT);

    // Pause; pausing again is 409.
    let (s, _, _) = call(&app, "POST", &path("/pause"), Some(KEY1), Some("{}"), &[]).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v, _) = call(
        &app,
        "POST",
        &path("/pause"),
        Some(KEY1),
        Some(r#"{"memory":false}"#),
        &[],
    )
    .await;
    assert_error(s, &v, StatusCode::CONFLICT);
    let (_, d, _) = call(&app, "GET", &path(""), Some(KEY1), None, &[]).await;
    assert_eq!(d["state"], "paused");

    // Paused sandboxes are unreachable through the router.
    let (s, v, _) = call(
        &app,
        "GET",
        "/health",
        None,
        None,
        &[("E2b-Sandbox-Id", &id), ("E2b-Sandbox-Port", "49983")],
    )
    .await;
    assert_eq!(s, StatusCode::BAD_GATEWAY);
    assert!(v["message"].as_str().unwrap().contains("was not found"));

    // Connect resumes: 201.
    let (s, v, _) = call(
        &app,
        "POST",
        &format!("/v2/sandboxes/{id}/connect"),
        Some(KEY1),
        Some("{}"),
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["envdAccessToken"], token);
    let (_, d, _) = call(&app, "GET", &path(""), Some(KEY1), None, &[]).await;
    assert_eq!(d["state"], "running");

    // v1 resume of a paused sandbox: 201.
    call(&app, "POST", &path("/pause"), Some(KEY1), None, &[]).await;
    let (s, _, _) = call(&app, "POST", &path("/resume"), Some(KEY1), None, &[]).await;
    assert_eq!(s, StatusCode::CREATED);

    let (s, v, _) = call(&app, "GET", &path("/metrics"), Some(KEY1), None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        v.as_array().map(Vec::len),
        Some(1),
        "sampled on demand: {v}"
    );

    // Kill: 204, then 404.
    let (s, v, _) = call(&app, "DELETE", &path(""), Some(KEY1), None, &[]).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let (s, v, _) = call(&app, "DELETE", &path(""), Some(KEY1), None, &[]).await;
    assert_error(s, &v, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn team_isolation() {
    let app = test_app(None);
    let id = create(&app, KEY1, r#"{"templateID":"base"}"#).await["sandboxID"]
        .as_str()
        .unwrap()
        .to_string();
    for (method, p, body) in [
        ("GET", "", None),
        ("POST", "/timeout", Some(r#"{"timeout":5}"#)),
        ("POST", "/pause", None),
        ("DELETE", "", None),
    ] {
        let (s, v, _) = call(
            &app,
            method,
            &format!("/sandboxes/{id}{p}"),
            Some(KEY2),
            body,
            &[],
        )
        .await;
        assert_error(s, &v, StatusCode::NOT_FOUND);
    }
    let (s, v, _) = call(
        &app,
        "POST",
        &format!("/v2/sandboxes/{id}/connect"),
        Some(KEY2),
        None,
        &[],
    )
    .await;
    assert_error(s, &v, StatusCode::NOT_FOUND);
    let (_, v, _) = call(&app, "GET", "/v2/sandboxes", Some(KEY2), None, &[]).await;
    assert_eq!(v, json!([]));
    let (_, v, _) = call(&app, "GET", "/v2/sandboxes", Some(KEY1), None, &[]).await;
    assert_eq!(v.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn list_filters_and_pages() {
    let app = test_app(None);
    let a = create(
        &app,
        KEY1,
        r#"{"templateID":"base","metadata":{"user":"a b&c=d","k":"1"}}"#,
    )
    .await;
    let b = create(
        &app,
        KEY1,
        r#"{"templateID":"base","metadata":{"user":"other","k":"1"}}"#,
    )
    .await;
    let c = create(&app, KEY1, r#"{"templateID":"base","metadata":{}}"#).await;
    let id = |v: &Value| v["sandboxID"].as_str().unwrap().to_string();
    call(
        &app,
        "POST",
        &format!("/sandboxes/{}/pause", id(&c)),
        Some(KEY1),
        None,
        &[],
    )
    .await;

    let ids_of = |v: &Value| {
        let mut ids: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["sandboxID"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };

    // Exactly as the SDK encodes {"user": "a b&c=d"}: quote() each part, urlencode() the pairs,
    // then the HTTP client encodes the parameter once more.
    let inner = "user=a%2520b%2526c%253Dd";
    let q = format!(
        "/v2/sandboxes?metadata={}",
        inner.replace('%', "%25").replace('=', "%3D")
    );
    let (s, v, _) = call(&app, "GET", &q, Some(KEY1), None, &[]).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(ids_of(&v), vec![id(&a)]);
    let listed = &v[0];
    for field in [
        "templateID",
        "sandboxID",
        "clientID",
        "startedAt",
        "endAt",
        "cpuCount",
        "memoryMB",
        "diskSizeMB",
        "state",
        "envdVersion",
    ] {
        assert!(!listed[field].is_null(), "missing {field}");
    }

    let (_, v, _) = call(
        &app,
        "GET",
        "/v2/sandboxes?metadata=k%3D1",
        Some(KEY1),
        None,
        &[],
    )
    .await;
    assert_eq!(ids_of(&v), sorted(vec![id(&a), id(&b)]));
    let (_, v, _) = call(
        &app,
        "GET",
        "/v2/sandboxes?metadata=k%3D1%26user%3Dother",
        Some(KEY1),
        None,
        &[],
    )
    .await;
    assert_eq!(ids_of(&v), vec![id(&b)]);

    let (_, v, _) = call(
        &app,
        "GET",
        "/v2/sandboxes?state=paused",
        Some(KEY1),
        None,
        &[],
    )
    .await;
    assert_eq!(ids_of(&v), vec![id(&c)]);
    assert_eq!(v[0]["state"], "paused");
    let (_, v, _) = call(
        &app,
        "GET",
        "/v2/sandboxes?state=running,paused",
        Some(KEY1),
        None,
        &[],
    )
    .await;
    assert_eq!(v.as_array().unwrap().len(), 3);
    let (_, v, _) = call(
        &app,
        "GET",
        "/v2/sandboxes?state=running",
        Some(KEY1),
        None,
        &[],
    )
    .await;
    assert_eq!(ids_of(&v), sorted(vec![id(&a), id(&b)]));
    let (_, v, _) = call(
        &app,
        "GET",
        "/v2/sandboxes?template=other",
        Some(KEY1),
        None,
        &[],
    )
    .await;
    assert_eq!(v, json!([]));
    let (_, v, _) = call(&app, "GET", "/sandboxes", Some(KEY1), None, &[]).await;
    assert_eq!(v.as_array().unwrap().len(), 3);

    // Paging with limit + x-next-token.
    let mut seen = vec![];
    let mut uri = "/v2/sandboxes?limit=2".to_string();
    loop {
        let (s, v, resp) = call(&app, "GET", &uri, Some(KEY1), None, &[]).await;
        assert_eq!(s, StatusCode::OK);
        assert!(v.as_array().unwrap().len() <= 2);
        seen.extend(ids_of(&v));
        match resp.headers().get("x-next-token") {
            Some(t) => uri = format!("/v2/sandboxes?limit=2&nextToken={}", t.to_str().unwrap()),
            None => break,
        }
    }
    assert_eq!(sorted(seen), sorted(vec![id(&a), id(&b), id(&c)]));
}

#[tokio::test]
async fn health_without_sandbox_headers() {
    let app = test_app(None);
    let (s, v, _) = call(&app, "GET", "/health", None, None, &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["status"], "ok");
}

#[tokio::test]
async fn router_errors() {
    let app = test_app(None);
    let (s, v, _) = call(
        &app,
        "GET",
        "/health",
        None,
        None,
        &[("E2b-Sandbox-Id", "abc")],
    )
    .await;
    assert_error(s, &v, StatusCode::BAD_REQUEST);
    assert_eq!(v["message"], "Missing header: E2b-Sandbox-Port");
    let (s, v, _) = call(
        &app,
        "GET",
        "/health",
        None,
        None,
        &[("E2b-Sandbox-Port", "49983")],
    )
    .await;
    assert_error(s, &v, StatusCode::BAD_REQUEST);
    assert_eq!(v["message"], "Missing header: E2b-Sandbox-Id");
    for port in ["abc", "70000", "0"] {
        let (s, v, _) = call(
            &app,
            "GET",
            "/health",
            None,
            None,
            &[("E2b-Sandbox-Id", "abc"), ("E2b-Sandbox-Port", port)],
        )
        .await;
        assert_error(s, &v, StatusCode::BAD_REQUEST);
    }
    let (s, v, resp) = call(
        &app,
        "GET",
        "/health",
        None,
        None,
        &[
            ("E2b-Sandbox-Id", "unknown1"),
            ("E2b-Sandbox-Port", "49983"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::BAD_GATEWAY);
    assert_eq!(
        v,
        json!({"sandboxId": "unknown1", "message": "The sandbox was not found", "code": 502})
    );
    assert_eq!(resp.headers().get("should-retry").unwrap(), "false");

    // A killed sandbox is not found either.
    let id = create(&app, KEY1, r#"{"templateID":"base"}"#).await["sandboxID"]
        .as_str()
        .unwrap()
        .to_string();
    call(
        &app,
        "DELETE",
        &format!("/sandboxes/{id}"),
        Some(KEY1),
        None,
        &[],
    )
    .await;
    let (s, v, _) = call(
        &app,
        "POST",
        "/process.Process/Start",
        None,
        Some("x"),
        &[("E2b-Sandbox-Id", &id), ("E2b-Sandbox-Port", "49983")],
    )
    .await;
    assert_eq!(s, StatusCode::BAD_GATEWAY);
    assert_eq!(v["message"], "The sandbox was not found");
}

/// A local server standing in for a process inside the sandbox: echoes the request body back
/// and reports which headers arrived.
async fn upstream() -> u16 {
    use axum::routing::post;
    let app = Router::new().route(
        "/echo",
        post(|headers: axum::http::HeaderMap, body: Body| async move {
            let mut resp = axum::response::Response::new(body);
            let token = headers.get("x-access-token").cloned();
            if let Some(t) = token {
                resp.headers_mut().insert("x-saw-token", t);
            }
            resp.headers_mut().insert(
                "x-saw-connection",
                axum::http::HeaderValue::from_str(&headers.get("x-hop").is_some().to_string())
                    .unwrap(),
            );
            resp
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

#[tokio::test]
async fn router_forwards_streams_and_reports_closed_ports() {
    let app = test_app(Some("sbx.test"));
    let id = create(&app, KEY1, r#"{"templateID":"base"}"#).await["sandboxID"]
        .as_str()
        .unwrap()
        .to_string();
    let port = upstream().await;

    // A streamed (chunked, unknown-length) request body arrives whole; hop-by-hop headers do not.
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = vec![
        Ok("hello ".into()),
        Ok("streamed ".into()),
        Ok("world".into()),
    ];
    let body = Body::from_stream(futures::stream::iter(chunks));
    let req = Request::post("/echo")
        .header("E2b-Sandbox-Id", &id)
        .header("E2b-Sandbox-Port", port.to_string())
        .header("X-Access-Token", "tok")
        .header("Connection", "x-hop")
        .header("x-hop", "1")
        .body(body)
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers().get("x-saw-token").unwrap(), "tok");
    assert_eq!(resp.headers().get("x-saw-connection").unwrap(), "false");
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&got[..], b"hello streamed world");

    // Host routing.
    let req = Request::post("/echo")
        .header("Host", format!("{port}-{id}.sbx.test"))
        .body(Body::from("by host"))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        &resp.into_body().collect().await.unwrap().to_bytes()[..],
        b"by host"
    );

    // A port nobody listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (s, v, _) = call(
        &app,
        "GET",
        "/",
        None,
        None,
        &[
            ("E2b-Sandbox-Id", &id),
            ("E2b-Sandbox-Port", &closed.to_string()),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::BAD_GATEWAY);
    assert_eq!(v["code"], 502);
    assert_eq!(v["sandboxId"], json!(id));
    assert!(
        v["message"].as_str().unwrap().contains("port is not open"),
        "{v}"
    );
}

#[tokio::test]
async fn signed_file_urls_route_without_headers() {
    use base64::Engine;
    use sha2::Digest;
    let app = test_app(None);
    let created = create(&app, KEY1, r#"{"templateID":"base"}"#).await;
    let id = created["sandboxID"].as_str().unwrap().to_string();
    let token = created["envdAccessToken"].as_str().unwrap().to_string();
    let sign = |text: String| {
        let d = sha2::Sha256::digest(text.as_bytes());
        format!(
            "v1_{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(d)
        )
    };
    let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let sig = sign(format!("/home/user/a.txt:read::{token}:1999999999"));
    let uri = format!(
        "/files?path=%2Fhome%2Fuser%2Fa.txt&signature={}&signature_expiration=1999999999",
        enc(&sig)
    );
    // Routed to the sandbox's envd port on 127.0.0.1: usually nothing listens there (502 naming
    // the sandbox), but an envd run by someone else on this host may answer; never the API.
    let (s, v, _) = call(&app, "GET", &uri, None, None, &[]).await;
    assert_ne!(v["message"], "no such endpoint: /files", "{v}");
    if s == StatusCode::BAD_GATEWAY {
        assert_eq!(v["sandboxId"], json!(id));
    }

    // A signature no sandbox made is not routed anywhere.
    let uri = "/files?path=%2Fhome%2Fuser%2Fa.txt&signature=v1_bogus";
    let (s, v, _) = call(&app, "GET", uri, None, None, &[]).await;
    assert_error(s, &v, StatusCode::NOT_FOUND);
    assert_eq!(v["message"], "no such endpoint: /files");
}

/// Reads until the end of an HTTP head.
async fn read_head(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = vec![];
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).await.unwrap(), 1, "eof in head");
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

#[tokio::test]
async fn router_splices_upgraded_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Upstream: answers any request with 101 and then echoes bytes.
    let up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_port = up.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = up.accept().await.unwrap();
        let head = read_head(&mut s).await.to_ascii_lowercase();
        assert!(head.contains("upgrade: echo"), "{head}");
        s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
        let (mut r, mut w) = s.into_split();
        tokio::io::copy(&mut r, &mut w).await.unwrap();
    });

    let app = test_app(None);
    let id = create(&app, KEY1, r#"{"templateID":"base"}"#).await["sandboxID"]
        .as_str()
        .unwrap()
        .to_string();
    let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_addr = front.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(front, app).await.unwrap() });

    let mut c = tokio::net::TcpStream::connect(front_addr).await.unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\nE2b-Sandbox-Id: {id}\r\nE2b-Sandbox-Port: {up_port}\r\n\r\n"
    );
    c.write_all(req.as_bytes()).await.unwrap();
    let head = read_head(&mut c).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    c.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
}

mod network;

#[tokio::test]
async fn hibernate_endpoint_and_connect_wakes() {
    let app = test_app(None);
    let created = create(&app, KEY1, r#"{"templateID":"base"}"#).await;
    let id = created["sandboxID"].as_str().unwrap().to_string();
    let hib = format!("/warren/v1/sandboxes/{id}/hibernate");

    let (s, v, _) = call(&app, "POST", &hib, Some(KEY1), None, &[]).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "paused");
    assert_eq!(v["memoryLocation"], "disk");
    assert_eq!(
        v["persistentContents"],
        json!(["memory", "filesystem", "ip"])
    );
    let (_, d, _) = call(
        &app,
        "GET",
        &format!("/sandboxes/{id}"),
        Some(KEY1),
        None,
        &[],
    )
    .await;
    assert_eq!(d["state"], "paused");
    assert_eq!(d["memoryLocation"], "disk");

    // Another team's or an unknown sandbox: 404 in E2B's error shape.
    let (s, v, _) = call(&app, "POST", &hib, Some(KEY2), None, &[]).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["code"], 404);
    let (s, _, _) = call(
        &app,
        "POST",
        "/warren/v1/sandboxes/nope/hibernate",
        Some(KEY1),
        None,
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let (s, v, _) = call(
        &app,
        "POST",
        &format!("/sandboxes/{id}/connect"),
        Some(KEY1),
        Some("{}"),
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (_, d, _) = call(
        &app,
        "GET",
        &format!("/sandboxes/{id}"),
        Some(KEY1),
        None,
        &[],
    )
    .await;
    assert_eq!(d["state"], "running");
    assert!(d.get("memoryLocation").is_none(), "{d}");
}
