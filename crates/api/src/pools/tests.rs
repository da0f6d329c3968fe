//! The pool endpoints over FakeRuntime: objects in, statuses and clear 400s out.

use crate::{app, ApiOptions};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::sync::Arc;
use tower::ServiceExt;
use warren_core::{ApiKey, ApiKeys, Store, TemplateRegistry, Warren, WarrenConfig};
use warren_runtime::fake::FakeRuntime;
use warren_runtime::RootfsSpec;

fn test_app() -> axum::Router {
    let templates = TemplateRegistry::new(None);
    templates.register(
        "base",
        RootfsSpec {
            lower_dirs: vec!["/nonexistent".into()],
            ro_binds: vec![],
        },
    );
    let warren = Warren::new(
        Arc::new(FakeRuntime::new()),
        Store::open_in_memory().unwrap(),
        templates,
        ApiKeys::new(vec![ApiKey {
            id: "k".into(),
            team: "t".into(),
            key: "key".into(),
        }]),
        WarrenConfig::default(),
    );
    app(Arc::new(warren), ApiOptions::default())
}

async fn call(
    app: &axum::Router,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("x-api-key", "key")
        .body(body.map(|b| Body::from(b.to_string())).unwrap_or_default())
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, v)
}

fn set(name: &str, template: &str) -> Value {
    json!({"apiVersion": "warren.dev/v1alpha1", "kind": "SandboxSet",
           "metadata": {"name": name}, "spec": {"replicas": 2, "template": template}})
}

fn scaler(spec: Value) -> Value {
    json!({"apiVersion": "warren.dev/v1alpha1", "kind": "PoolingAutoScaler",
           "metadata": {"name": "a"}, "spec": spec})
}

#[tokio::test]
async fn objects_round_trip_and_bad_input_is_a_clear_400() {
    let app = test_app();
    let (s, v) = call(
        &app,
        "PUT",
        "/warren/v1/sandboxsets/p",
        Some(set("p", "base")),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"]["replicas"], 2);
    assert_eq!(v["spec"]["template"], "base");
    let (s, v) = call(&app, "GET", "/warren/v1/sandboxsets", None).await;
    assert_eq!((s, v.as_array().unwrap().len()), (StatusCode::OK, 1));
    let (s, v) = call(&app, "GET", "/warren/v1/pools", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v[0]["name"], "p");

    let bad = |v: &Value| v["message"].as_str().unwrap_or_default().to_string();
    let (s, v) = call(
        &app,
        "PUT",
        "/warren/v1/sandboxsets/q",
        Some(set("q", "nope")),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(bad(&v).contains("template 'nope' not found"), "{v}");
    let (s, v) = call(
        &app,
        "PUT",
        "/warren/v1/sandboxsets/x",
        Some(set("q", "base")),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(bad(&v).contains("does not match"), "{v}");
    let (s, v) = call(
        &app,
        "PUT",
        "/warren/v1/sandboxsets/a",
        Some(scaler(json!({}))),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(bad(&v).contains("expected \"SandboxSet\""), "{v}");

    let target = json!({"kind": "SandboxSet", "name": "p"});
    for (spec, want) in [
        (
            json!({"scaleTargetRef": target, "minReplicas": 5, "maxReplicas": 1}),
            "minReplicas (5) is greater than maxReplicas (1)",
        ),
        (
            json!({"scaleTargetRef": target, "maxReplicas": 5, "minAvailableRatio": "120%"}),
            "outside 0%–100%",
        ),
        (
            json!({"scaleTargetRef": target, "maxReplicas": 5, "schedule": [{"bounds": [{"cron": "nope", "minReplicas": 1, "maxReplicas": 2}]}]}),
            "cron \"nope\" is invalid",
        ),
        (
            json!({"scaleTargetRef": target}),
            "missing field `maxReplicas`",
        ),
    ] {
        let (s, v) = call(
            &app,
            "PUT",
            "/warren/v1/poolingautoscalers/a",
            Some(scaler(spec)),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(bad(&v).contains(want), "{v} should say {want}");
    }
    let (s, v) = call(
        &app,
        "PUT",
        "/warren/v1/poolingautoscalers/a",
        Some(scaler(
            json!({"scaleTargetRef": target, "minReplicas": 1, "maxReplicas": 4}),
        )),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"]["desiredReplicas"], 2);

    let (s, v) = call(&app, "GET", "/metrics", None).await;
    assert_eq!(s, StatusCode::OK);
    let text = v.as_str().unwrap();
    assert!(
        text.contains("warren_pool_desired_replicas{pool=\"p\"} 2"),
        "{text}"
    );
    assert!(text.contains("# TYPE warren_sandboxes gauge"), "{text}");

    let (s, _) = call(&app, "DELETE", "/warren/v1/poolingautoscalers/a", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = call(&app, "DELETE", "/warren/v1/sandboxsets/p", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = call(&app, "GET", "/warren/v1/sandboxsets/p", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}
