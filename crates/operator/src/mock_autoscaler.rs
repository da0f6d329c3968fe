//! PoolingAutoScaler reconciler against the mock API server (see `mock.rs`).

use crate::autoscaler::{reconcile_at, SAMPLE_PERIOD};
use crate::controller::autoscaler_error_policy;
use crate::crd::{PoolingAutoScaler, PoolingAutoScalerSpec, SandboxSetStatus, ScaleTargetRef};
use crate::mock::{mock, run, sandbox, set, ApiServer, EVENTS, NS, SANDBOXES};
use crate::Error;
use chrono::{DateTime, Utc};
use kube::runtime::controller::Action;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

const SETS: &str = "/apis/warren.dev/v1alpha1/namespaces/testns/sandboxsets";
const SCALERS: &str = "/apis/warren.dev/v1alpha1/namespaces/testns/poolingautoscalers";

fn pas(min: i32, max: i32) -> Arc<PoolingAutoScaler> {
    let mut p = PoolingAutoScaler::new(
        "auto",
        PoolingAutoScalerSpec {
            scale_target_ref: ScaleTargetRef {
                api_version: None,
                kind: "SandboxSet".into(),
                name: "pool".into(),
            },
            observe_window_seconds: 60,
            min_replicas: min,
            max_replicas: max,
            min_available_ratio: "20%".into(),
            max_available_ratio: "90%".into(),
            cooldown_seconds: 60,
            schedule: vec![],
        },
    );
    p.metadata.namespace = Some(NS.into());
    p.metadata.uid = Some("uid-auto".into());
    p.metadata.generation = Some(2);
    Arc::new(p)
}

fn target(replicas: i32, ready: i32, available: i32) -> Value {
    let mut s = set(replicas, 1);
    s.status = Some(SandboxSetStatus {
        replicas: ready,
        available_replicas: available,
        ..Default::default()
    });
    serde_json::to_value(s).unwrap()
}

fn t(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

fn scale_obj(replicas: i32, rv: &str) -> Value {
    json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
           "metadata": {"name": "pool", "namespace": NS, "resourceVersion": rv},
           "spec": {"replicas": replicas}, "status": {"replicas": replicas}})
}

/// The two reads of every reconcile: the target set and its claimed members.
async fn expect_sample(api: &mut ApiServer, set: Value, claimed: usize) {
    api.expect("GET", &format!("{SETS}/pool")).await.ok(set);
    let call = api.expect("GET", SANDBOXES).await;
    assert!(
        call.query
            .contains("labelSelector=warren.dev%2Fsandboxset%3Dpool%2Cwarren.dev%2Fclaimed%3Dtrue"),
        "{}",
        call.query
    );
    let items: Vec<Value> = (0..claimed)
        .map(|i| serde_json::to_value(sandbox(&format!("c{i}"))).unwrap())
        .collect();
    call.ok(
        json!({"apiVersion": "warren.dev/v1alpha1", "kind": "SandboxList",
                   "metadata": {"resourceVersion": "1"}, "items": items}),
    );
}

/// Expects the scale write of `to`, answering the read with `rv`.
async fn expect_scale(api: &mut ApiServer, from: i32, to: i32, rv: &str) -> crate::mock::Call {
    api.expect("GET", &format!("{SETS}/pool/scale"))
        .await
        .ok(scale_obj(from, rv));
    let call = api.expect("PUT", &format!("{SETS}/pool/scale")).await;
    assert_eq!(call.body["spec"]["replicas"], to, "{}", call.body);
    assert_eq!(call.body["metadata"]["resourceVersion"], rv);
    call
}

async fn expect_status(api: &mut ApiServer) -> Value {
    let call = api.expect("PATCH", &format!("{SCALERS}/auto/status")).await;
    assert_eq!(call.content_type, "application/apply-patch+yaml");
    let st = call.body["status"].clone();
    call.ok(serde_json::to_value(&*pas(0, 1)).unwrap());
    st
}

#[tokio::test]
async fn scales_up_when_the_available_ratio_is_low_and_retries_a_conflict() {
    let (ctx, mut api) = mock();
    let task = run({
        let ctx = ctx.clone();
        async move { reconcile_at(pas(1, 10), &ctx, t("2026-01-01T00:00:00Z")).await }
    })
    .await;
    // 2 ready of 2, 10 claimed: 17% available, below 20%.
    expect_sample(&mut api, target(2, 2, 2), 10).await;
    // Someone changed the set between our read and our write: read again, write again.
    expect_scale(&mut api, 2, 10, "7").await.status_error(
        409,
        "Conflict",
        "Operation cannot be fulfilled on sandboxsets.warren.dev \"pool\": the object has been modified",
    );
    let call = expect_scale(&mut api, 2, 10, "8").await;
    call.ok(scale_obj(10, "9"));
    let st = expect_status(&mut api).await;
    assert_eq!(st["phase"], "Active");
    assert_eq!(st["observedGeneration"], 2);
    assert_eq!(
        (st["currentReplicas"].clone(), st["desiredReplicas"].clone()),
        (json!(2), json!(10))
    );
    assert_eq!(st["lastScaleTime"], "2026-01-01T00:00:00Z");
    let c = &st["conditions"][0];
    assert_eq!(
        (
            c["type"].as_str(),
            c["status"].as_str(),
            c["reason"].as_str()
        ),
        (Some("Ready"), Some("True"), Some("ScaledUp"))
    );
    assert!(c["message"].as_str().unwrap().contains("below 20%"), "{c}");
    assert_eq!(task.await.unwrap().unwrap(), Action::requeue(SAMPLE_PERIOD));
}

#[tokio::test]
async fn a_conflict_every_time_is_an_error_with_backoff() {
    let (ctx, mut api) = mock();
    let p = pas(1, 10);
    let task = run({
        let (ctx, p) = (ctx.clone(), p.clone());
        async move { reconcile_at(p, &ctx, t("2026-01-01T00:00:00Z")).await }
    })
    .await;
    expect_sample(&mut api, target(2, 2, 2), 10).await;
    for rv in ["1", "2", "3"] {
        expect_scale(&mut api, 2, 10, rv).await.status_error(
            409,
            "Conflict",
            "the object has been modified",
        );
    }
    let st = expect_status(&mut api).await;
    assert_eq!(st["phase"], "Failed");
    assert_eq!(st["conditions"][0]["reason"], "ScaleFailed");
    let ev = api.expect("POST", EVENTS).await;
    assert_eq!(ev.body["reason"], "ScaleFailed");
    let b = ev.body.clone();
    ev.reply(201, b);
    let err = task.await.unwrap().unwrap_err();
    assert!(err.is_conflict(), "{err}");
    assert_eq!(
        autoscaler_error_policy(p, &err, ctx),
        Action::requeue(Duration::from_secs(1))
    );
}

#[tokio::test]
async fn scales_down_only_after_a_full_window_above_the_high_watermark() {
    let (ctx, mut api) = mock();
    for (at, scaled) in [
        ("2026-01-01T00:00:00Z", false),
        ("2026-01-01T00:00:30Z", false),
        ("2026-01-01T00:01:00Z", true),
    ] {
        let task = run({
            let ctx = ctx.clone();
            async move { reconcile_at(pas(1, 10), &ctx, t(at)).await }
        })
        .await;
        // 10 ready and nobody claims: 100% available.
        expect_sample(&mut api, target(10, 10, 10), 0).await;
        if scaled {
            expect_scale(&mut api, 10, 1, "5")
                .await
                .ok(scale_obj(1, "6"));
        }
        let st = expect_status(&mut api).await;
        let c = &st["conditions"][0];
        if scaled {
            assert_eq!(c["reason"], "ScaledDown", "{st}");
            assert_eq!(st["desiredReplicas"], 1);
        } else {
            assert_eq!(c["reason"], "Holding", "{st}");
            assert_eq!(st["desiredReplicas"], 10);
        }
        task.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn bounds_move_the_set_inside_at_once() {
    let (ctx, mut api) = mock();
    for (replicas, want, reason) in [(20, 10, "ScaledDown"), (0, 3, "ScaledUp")] {
        let task = run({
            let ctx = ctx.clone();
            async move { reconcile_at(pas(3, 10), &ctx, t("2026-01-01T00:00:00Z")).await }
        })
        .await;
        expect_sample(&mut api, target(replicas, replicas, replicas), 0).await;
        expect_scale(&mut api, replicas, want, "5")
            .await
            .ok(scale_obj(want, "6"));
        let st = expect_status(&mut api).await;
        assert_eq!(st["conditions"][0]["reason"], reason);
        assert!(st["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .contains(&want.to_string()));
        task.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn a_missing_target_is_explained_and_backs_off() {
    let (ctx, mut api) = mock();
    let p = pas(1, 10);
    let task = run({
        let (ctx, p) = (ctx.clone(), p.clone());
        async move { reconcile_at(p, &ctx, t("2026-01-01T00:00:00Z")).await }
    })
    .await;
    api.expect("GET", &format!("{SETS}/pool"))
        .await
        .status_error(404, "NotFound", "sandboxsets.warren.dev \"pool\" not found");
    let st = expect_status(&mut api).await;
    assert_eq!(st["phase"], "Failed");
    let c = &st["conditions"][0];
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("False"), Some("TargetNotFound"))
    );
    assert!(
        c["message"].as_str().unwrap().contains("SandboxSet pool"),
        "{c}"
    );
    let ev = api.expect("POST", EVENTS).await;
    assert_eq!(ev.body["type"], "Warning");
    assert_eq!(ev.body["regarding"]["kind"], "PoolingAutoScaler");
    let b = ev.body.clone();
    ev.reply(201, b);
    let err = task.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Reconcile { .. }), "{err}");
    assert_eq!(
        autoscaler_error_policy(p.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(1))
    );
    assert_eq!(
        autoscaler_error_policy(p, &err, ctx),
        Action::requeue(Duration::from_secs(2))
    );
}

#[tokio::test]
async fn an_invalid_spec_waits_for_a_change() {
    let (ctx, mut api) = mock();
    let task = run({
        let ctx = ctx.clone();
        async move { reconcile_at(pas(5, 2), &ctx, t("2026-01-01T00:00:00Z")).await }
    })
    .await;
    let st = expect_status(&mut api).await;
    assert_eq!(st["conditions"][0]["reason"], "InvalidSpec");
    assert!(st["conditions"][0]["message"]
        .as_str()
        .unwrap()
        .contains("minReplicas (5) is greater than maxReplicas (2)"));
    let ev = api.expect("POST", EVENTS).await;
    let b = ev.body.clone();
    ev.reply(201, b);
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
}
