//! Reconcilers against a mock API server (kube-rs's controller-rs pattern): the client's requests
//! arrive on a `tower_test` handle, each test asserts the exact method, path and body the
//! reconciler sends and answers like the API server would. An unexpected request fails the
//! assertion; a missing one leaves the reconciler waiting and the test times out.

use crate::claim::{claim, ClaimRequest};
use crate::controller::{reconcile_sandbox, reconcile_sandbox_set, sandbox_error_policy, Context};
use crate::crd::{
    Condition, IntOrPercent, Resources, Sandbox, SandboxSet, SandboxSetSpec, SandboxSpec,
    SandboxStatus, Strategy,
};
use crate::sandbox::{PodConfig, FINALIZER};
use crate::sandboxset::{member_spec, revision};
use crate::{Error, LABEL_CLAIMED, LABEL_SANDBOX_SET, LABEL_TEMPLATE_HASH};
use http::{Request, Response};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::Client;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tower_test::mock::{Handle, SendResponse};

pub(crate) const NS: &str = "testns";

pub(crate) struct ApiServer(pub Handle<Request<Body>, Response<Body>>);

/// One request the reconciler sent, and the means to answer it.
pub(crate) struct Call {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Value,
    send: SendResponse<Response<Body>>,
}

impl Call {
    pub fn reply(self, code: u16, body: Value) {
        let resp = Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap();
        self.send.send_response(resp);
    }

    pub fn ok(self, body: Value) {
        self.reply(200, body)
    }

    pub fn status_error(self, code: u16, reason: &str, message: &str) {
        self.reply(
            code,
            json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                   "reason": reason, "message": message, "code": code}),
        )
    }
}

impl ApiServer {
    /// The next request, which must be `method` on `path`.
    pub async fn expect(&mut self, method: &str, path: &str) -> Call {
        let (req, send) = tokio::time::timeout(Duration::from_secs(5), self.0.next_request())
            .await
            .unwrap_or_else(|_| panic!("no request came; expected {method} {path}"))
            .expect("the client went away");
        let (parts, body) = req.into_parts();
        let bytes = body.collect_bytes().await.unwrap();
        // JSON, also for server-side apply (sent as application/apply-patch+yaml; JSON is YAML).
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        let call = Call {
            method: parts.method.to_string(),
            path: parts.uri.path().to_string(),
            query: parts.uri.query().unwrap_or_default().to_string(),
            content_type: parts
                .headers
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default(),
            body,
            send,
        };
        assert_eq!(
            (call.method.as_str(), call.path.as_str()),
            (method, path),
            "unexpected request (query {:?}, body {})",
            call.query,
            call.body
        );
        call
    }
}

pub(crate) fn mock() -> (Arc<Context>, ApiServer) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, NS);
    (
        Context::new(client, PodConfig::default()),
        ApiServer(handle),
    )
}

/// Runs the reconcile on its own task while the test plays the API server.
pub(crate) async fn run<F, T>(fut: F) -> tokio::task::JoinHandle<T>
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    tokio::spawn(async move {
        tokio::time::timeout(Duration::from_secs(5), fut)
            .await
            .expect("reconcile did not finish (a request it waits for was never answered)")
    })
}

pub(crate) fn sandbox(name: &str) -> Sandbox {
    let mut s = Sandbox::new(
        name,
        SandboxSpec {
            template: Some("base".into()),
            resources: Resources {
                requests: BTreeMap::from([("cpu".into(), "1".into())]),
                limits: BTreeMap::from([("memory".into(), "512Mi".into())]),
            },
            ..Default::default()
        },
    );
    s.metadata.namespace = Some(NS.into());
    s.metadata.uid = Some(format!("uid-{name}"));
    s.metadata.generation = Some(1);
    s.metadata.resource_version = Some("100".into());
    s
}

pub(crate) fn with_finalizer(mut s: Sandbox) -> Sandbox {
    s.metadata.finalizers = Some(vec![FINALIZER.into()]);
    s
}

pub(crate) fn ready() -> Condition {
    Condition {
        type_: "Ready".into(),
        status: "True".into(),
        reason: "SandboxRunning".into(),
        message: String::new(),
        last_transition_time: "2026-01-01T00:00:00Z".into(),
        observed_generation: Some(1),
    }
}

pub(crate) const SANDBOXES: &str = "/apis/warren.dev/v1alpha1/namespaces/testns/sandboxes";
pub(crate) const PODS: &str = "/api/v1/namespaces/testns/pods";
pub(crate) const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/testns/events";

#[tokio::test]
async fn new_sandbox_gets_the_finalizer_first() {
    let (ctx, mut api) = mock();
    let task = run(reconcile_sandbox(Arc::new(sandbox("sb1")), ctx)).await;
    let call = api.expect("PATCH", &format!("{SANDBOXES}/sb1")).await;
    assert_eq!(call.content_type, "application/json-patch+json");
    assert_eq!(
        call.body,
        json!([{"op": "test", "path": "/metadata/finalizers", "value": null},
               {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}])
    );
    call.ok(serde_json::to_value(with_finalizer(sandbox("sb1"))).unwrap());
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
}

#[tokio::test]
async fn sandbox_create_makes_its_pod_and_reports_pending() {
    let (ctx, mut api) = mock();
    let task = run(reconcile_sandbox(
        Arc::new(with_finalizer(sandbox("sb1"))),
        ctx,
    ))
    .await;

    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .status_error(404, "NotFound", "pods \"sb1\" not found");

    let call = api.expect("POST", PODS).await;
    let pod = call.body.clone();
    assert_eq!(pod["metadata"]["name"], "sb1");
    assert_eq!(pod["metadata"]["labels"]["warren.dev/sandbox"], "sb1");
    assert_eq!(
        pod["metadata"]["ownerReferences"],
        json!([{"apiVersion": "warren.dev/v1alpha1", "kind": "Sandbox", "name": "sb1",
                "uid": "uid-sb1", "controller": true, "blockOwnerDeletion": true}])
    );
    let c = &pod["spec"]["containers"][0];
    assert_eq!(c["image"], "registry.k8s.io/pause:3.10");
    assert_eq!(
        c["resources"],
        // The sandbox's disk cap (the operator's default) as its ephemeral storage, so the
        // scheduler reserves the node disk the sandbox may fill.
        json!({"requests": {"cpu": "1", "ephemeral-storage": "1024Mi"},
               "limits": {"memory": "512Mi", "ephemeral-storage": "1024Mi"}})
    );
    assert_eq!(
        pod["spec"]["nodeSelector"],
        json!({"warren.dev/node-agent": "true"})
    );
    let mut created = pod.clone();
    created["metadata"]["uid"] = "pod-uid".into();
    created["status"] = json!({"phase": "Pending"});
    call.reply(201, created);

    let call = api
        .expect("PATCH", &format!("{SANDBOXES}/sb1/status"))
        .await;
    assert_eq!(call.content_type, "application/apply-patch+yaml");
    assert!(
        call.query.contains("fieldManager=warren-operator"),
        "{}",
        call.query
    );
    assert!(call.query.contains("force=true"), "{}", call.query);
    let st = &call.body["status"];
    assert_eq!(call.body["kind"], "Sandbox");
    assert_eq!(st["phase"], "Pending");
    assert_eq!(st["observedGeneration"], 1);
    assert_eq!(st["conditions"][0]["type"], "Ready");
    assert_eq!(st["conditions"][0]["status"], "False");
    assert_eq!(st["conditions"][0]["reason"], "PodPending");
    call.ok(serde_json::to_value(with_finalizer(sandbox("sb1"))).unwrap());

    let action = task.await.unwrap().unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
}

#[tokio::test]
async fn pod_create_failure_is_explained_in_status_and_backs_off() {
    let (ctx, mut api) = mock();
    let sbx = Arc::new(with_finalizer(sandbox("sb1")));
    let task = run(reconcile_sandbox(sbx.clone(), ctx.clone())).await;
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .status_error(404, "NotFound", "not found");
    api.expect("POST", PODS).await.status_error(
        403,
        "Forbidden",
        "pods \"sb1\" is forbidden: exceeded quota: compute, requested: cpu=1",
    );
    let call = api
        .expect("PATCH", &format!("{SANDBOXES}/sb1/status"))
        .await;
    let cond = &call.body["status"]["conditions"][0];
    assert_eq!(cond["reason"], "PodCreateFailed");
    assert!(
        cond["message"].as_str().unwrap().contains("exceeded quota"),
        "{cond}"
    );
    call.ok(serde_json::to_value(&*sbx).unwrap());
    let ev = api.expect("POST", EVENTS).await;
    assert_eq!(ev.body["type"], "Warning");
    assert_eq!(ev.body["reason"], "PodCreateFailed");
    assert_eq!(ev.body["regarding"]["kind"], "Sandbox");
    assert_eq!(ev.body["regarding"]["name"], "sb1");
    assert!(ev.body["note"].as_str().unwrap().contains("exceeded quota"));
    let reply = ev.body.clone();
    ev.reply(201, reply);
    let err = task.await.unwrap().unwrap_err();
    assert!(
        err.to_string().contains("create pod of Sandbox sb1"),
        "{err}"
    );
    // Consecutive failures of one object back off exponentially.
    let first = sandbox_error_policy(sbx.clone(), &err, ctx.clone());
    let second = sandbox_error_policy(sbx, &err, ctx);
    assert_eq!(first, Action::requeue(Duration::from_secs(1)));
    assert_eq!(second, Action::requeue(Duration::from_secs(2)));
}

#[tokio::test]
async fn expired_sandbox_is_deleted() {
    let (ctx, mut api) = mock();
    let mut s = with_finalizer(sandbox("sb1"));
    s.spec.shutdown_time = Some("2020-01-01T00:00:00Z".into());
    let task = run(reconcile_sandbox(Arc::new(s), ctx)).await;
    let call = api.expect("DELETE", &format!("{SANDBOXES}/sb1")).await;
    assert_eq!(call.body["preconditions"]["uid"], "uid-sb1");
    call.ok(json!({"apiVersion": "v1", "kind": "Status", "status": "Success", "code": 200}));
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
}

#[tokio::test]
async fn deleting_a_sandbox_waits_for_its_pod_then_drops_the_finalizer() {
    let (ctx, mut api) = mock();
    let mut s = with_finalizer(sandbox("sb1"));
    s.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        "2026-01-01T00:00:00Z".parse().unwrap(),
    ));
    s.status = Some(SandboxStatus {
        conditions: vec![ready()],
        ..Default::default()
    });
    let s = Arc::new(s);
    let pod = serde_json::to_value(crate::sandbox::build_pod(&s, &PodConfig::default()).unwrap())
        .unwrap();
    let mut live_pod = pod.clone();
    live_pod["metadata"]["uid"] = "pod-uid".into();

    // First pass: the pod is still there; delete it, show Terminating, keep the finalizer.
    let task = run(reconcile_sandbox(s.clone(), ctx.clone())).await;
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .ok(live_pod.clone());
    let call = api.expect("DELETE", &format!("{PODS}/sb1")).await;
    assert_eq!(call.body["preconditions"]["uid"], "pod-uid");
    let mut deleting = live_pod.clone();
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:01Z".into();
    call.ok(deleting.clone());
    let call = api
        .expect("PATCH", &format!("{SANDBOXES}/sb1/status"))
        .await;
    assert_eq!(call.body["status"]["phase"], "Terminating");
    call.ok(serde_json::to_value(&*s).unwrap());
    let err = task.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::WaitingForCleanup(_)), "{err}");
    assert_eq!(
        sandbox_error_policy(s.clone(), &err, ctx.clone()),
        Action::requeue(crate::sandbox::CLEANUP_POLL)
    );

    // The node agent has released the pod: it is gone, so the finalizer goes.
    let task = run(reconcile_sandbox(s.clone(), ctx)).await;
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .status_error(404, "NotFound", "not found");
    let call = api.expect("PATCH", &format!("{SANDBOXES}/sb1")).await;
    assert_eq!(
        call.body,
        json!([{"op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER},
               {"op": "remove", "path": "/metadata/finalizers/0"}])
    );
    call.ok(serde_json::to_value(&*s).unwrap());
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
}

pub(crate) fn set(replicas: i32, max_unavailable: i32) -> SandboxSet {
    let mut s = SandboxSet::new(
        "pool",
        SandboxSetSpec {
            replicas,
            template: Some("base".into()),
            image: None,
            image_pull_secrets: vec![],
            image_pull_policy: None,
            resources: Resources::default(),
            persistent_contents: vec![],
            allow_internet_access: None,
            network: None,
            reuse_policy: Default::default(),
            update_strategy: Strategy {
                max_unavailable: IntOrPercent::Int(max_unavailable),
            },
            scale_strategy: Strategy {
                max_unavailable: IntOrPercent::Int(8),
            },
        },
    );
    s.metadata.namespace = Some(NS.into());
    s.metadata.uid = Some("uid-pool".into());
    s.metadata.generation = Some(3);
    s
}

pub(crate) fn member(set: &SandboxSet, name: &str, rev: &str, created: &str) -> Value {
    let mut s = sandbox(name);
    s.spec = member_spec(&set.spec);
    s.metadata.labels = Some(BTreeMap::from([
        (LABEL_SANDBOX_SET.into(), "pool".into()),
        (LABEL_TEMPLATE_HASH.into(), rev.into()),
    ]));
    s.metadata.owner_references = Some(vec![
        k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: "warren.dev/v1alpha1".into(),
            kind: "SandboxSet".into(),
            name: "pool".into(),
            uid: "uid-pool".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        },
    ]);
    s.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        created.parse().unwrap(),
    ));
    s.metadata.resource_version = Some(format!("rv-{name}"));
    s.status = Some(SandboxStatus {
        conditions: vec![ready()],
        ..Default::default()
    });
    serde_json::to_value(s).unwrap()
}

pub(crate) fn list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "warren.dev/v1alpha1", "kind": "SandboxList",
           "metadata": {"resourceVersion": "500"}, "items": items})
}

async fn expect_member_list(api: &mut ApiServer, items: Vec<Value>) {
    let call = api.expect("GET", SANDBOXES).await;
    assert!(
        call.query.contains(
            "labelSelector=warren.dev%2Fsandboxset%3Dpool%2Cwarren.dev%2Fclaimed%21%3Dtrue"
        ),
        "{}",
        call.query
    );
    call.ok(list(items));
}

#[tokio::test]
async fn sandbox_set_creates_owned_members() {
    let (ctx, mut api) = mock();
    let s = set(2, 1);
    let rev = revision(&member_spec(&s.spec));
    let task = run(reconcile_sandbox_set(Arc::new(s), ctx)).await;
    expect_member_list(&mut api, vec![]).await;
    for i in 0..2 {
        let call = api.expect("POST", SANDBOXES).await;
        let b = call.body.clone();
        assert_eq!(b["metadata"]["generateName"], "pool-");
        assert_eq!(b["metadata"]["labels"][LABEL_SANDBOX_SET], "pool");
        assert_eq!(b["metadata"]["labels"][LABEL_TEMPLATE_HASH], rev.as_str());
        assert_eq!(b["metadata"]["ownerReferences"][0]["uid"], "uid-pool");
        assert_eq!(b["metadata"]["ownerReferences"][0]["controller"], true);
        assert_eq!(b["spec"]["template"], "base");
        let mut created = b.clone();
        created["metadata"]["name"] = format!("pool-{i}").into();
        call.reply(201, created);
    }
    let call = api
        .expect(
            "PATCH",
            "/apis/warren.dev/v1alpha1/namespaces/testns/sandboxsets/pool/status",
        )
        .await;
    let st = &call.body["status"];
    assert_eq!(st["phase"], "Scaling");
    assert_eq!(st["replicas"], 0);
    assert_eq!(st["observedGeneration"], 3);
    assert_eq!(st["updateRevision"], rev.as_str());
    assert_eq!(
        st["selector"],
        "warren.dev/sandboxset=pool,warren.dev/claimed!=true"
    );
    assert!(st["conditions"][0]["message"]
        .as_str()
        .unwrap()
        .contains("0 of 2 members available"));
    call.ok(serde_json::to_value(set(2, 1)).unwrap());
    assert_eq!(
        task.await.unwrap().unwrap(),
        Action::requeue(Duration::from_secs(30))
    );
}

#[tokio::test]
async fn scale_down_skips_a_member_claimed_meanwhile() {
    let (ctx, mut api) = mock();
    let s = set(1, 1);
    let rev = revision(&member_spec(&s.spec));
    let task = run(reconcile_sandbox_set(Arc::new(s.clone()), ctx)).await;
    expect_member_list(
        &mut api,
        vec![
            member(&s, "m0", &rev, "2026-01-01T00:00:00Z"),
            member(&s, "m1", &rev, "2026-01-01T00:01:00Z"),
            member(&s, "m2", &rev, "2026-01-01T00:02:00Z"),
        ],
    )
    .await;
    // Newest first; each delete is conditional on the resourceVersion we listed.
    let call = api.expect("DELETE", &format!("{SANDBOXES}/m2")).await;
    assert_eq!(call.body["preconditions"]["resourceVersion"], "rv-m2");
    call.status_error(
        409,
        "Conflict",
        "Precondition failed: ResourceVersion: rv-m2",
    );
    let call = api.expect("DELETE", &format!("{SANDBOXES}/m1")).await;
    assert_eq!(call.body["preconditions"]["resourceVersion"], "rv-m1");
    call.ok(member(&s, "m1", &rev, "2026-01-01T00:01:00Z"));
    let call = api
        .expect(
            "PATCH",
            "/apis/warren.dev/v1alpha1/namespaces/testns/sandboxsets/pool/status",
        )
        .await;
    assert_eq!(call.body["status"]["replicas"], 3);
    assert_eq!(call.body["status"]["phase"], "Scaling");
    call.ok(serde_json::to_value(&s).unwrap());
    // The conflict makes us look again soon rather than in 30 s.
    assert_eq!(
        task.await.unwrap().unwrap(),
        Action::requeue(Duration::from_secs(1))
    );
}

#[tokio::test]
async fn rolling_update_replaces_within_max_unavailable() {
    let (ctx, mut api) = mock();
    let s = set(3, 1);
    let rev = revision(&member_spec(&s.spec));
    let task = run(reconcile_sandbox_set(Arc::new(s.clone()), ctx)).await;
    expect_member_list(
        &mut api,
        vec![
            member(&s, "m0", "old", "2026-01-01T00:00:00Z"),
            member(&s, "m1", "old", "2026-01-01T00:01:00Z"),
            member(&s, "m2", "old", "2026-01-01T00:02:00Z"),
        ],
    )
    .await;
    // One at a time, oldest first, and its replacement at the new revision.
    api.expect("DELETE", &format!("{SANDBOXES}/m0"))
        .await
        .ok(member(&s, "m0", "old", "2026-01-01T00:00:00Z"));
    let call = api.expect("POST", SANDBOXES).await;
    assert_eq!(
        call.body["metadata"]["labels"][LABEL_TEMPLATE_HASH],
        rev.as_str()
    );
    let mut created = call.body.clone();
    created["metadata"]["name"] = "pool-new".into();
    call.reply(201, created);
    let call = api
        .expect(
            "PATCH",
            "/apis/warren.dev/v1alpha1/namespaces/testns/sandboxsets/pool/status",
        )
        .await;
    assert_eq!(call.body["status"]["phase"], "Updating");
    assert_eq!(call.body["status"]["updatedReplicas"], 0);
    call.ok(serde_json::to_value(&s).unwrap());
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn invalid_set_reports_why_and_waits_for_a_fix() {
    let (ctx, mut api) = mock();
    let mut s = set(2, 1);
    s.spec.image = Some("alpine".into());
    let task = run(reconcile_sandbox_set(Arc::new(s), ctx)).await;
    let call = api
        .expect(
            "PATCH",
            "/apis/warren.dev/v1alpha1/namespaces/testns/sandboxsets/pool/status",
        )
        .await;
    assert_eq!(call.body["status"]["phase"], "Failed");
    let cond = &call.body["status"]["conditions"][0];
    assert_eq!(cond["reason"], "InvalidSpec");
    assert!(cond["message"].as_str().unwrap().contains("exclusive"));
    call.ok(serde_json::to_value(set(2, 1)).unwrap());
    let ev = api.expect("POST", EVENTS).await;
    assert_eq!(ev.body["type"], "Warning");
    assert_eq!(ev.body["reason"], "InvalidSpec");
    assert_eq!(ev.body["regarding"]["kind"], "SandboxSet");
    let reply = ev.body.clone();
    ev.reply(201, reply);
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
}

#[tokio::test]
async fn claim_loses_a_race_and_takes_the_next_member() {
    let (ctx, mut api) = mock();
    let s = set(2, 1);
    let sandboxes: kube::Api<Sandbox> = kube::Api::namespaced(ctx.client.clone(), NS);
    let req = ClaimRequest {
        claimant: "team-a".into(),
        env_vars: BTreeMap::from([("FOO".into(), "bar".into())]),
        ..Default::default()
    };
    let task = run(async move { claim(&sandboxes, "pool", &req).await }).await;
    expect_member_list(
        &mut api,
        vec![
            member(&s, "m0", "r", "2026-01-01T00:00:00Z"),
            member(&s, "m1", "r", "2026-01-01T00:01:00Z"),
        ],
    )
    .await;
    let call = api.expect("PUT", &format!("{SANDBOXES}/m0")).await;
    assert_eq!(call.body["metadata"]["resourceVersion"], "rv-m0");
    call.status_error(
        409,
        "Conflict",
        "Operation cannot be fulfilled on sandboxes.warren.dev \"m0\": the object has been modified",
    );
    let call = api.expect("PUT", &format!("{SANDBOXES}/m1")).await;
    let b = call.body.clone();
    assert_eq!(b["metadata"]["resourceVersion"], "rv-m1");
    assert_eq!(b["metadata"]["labels"][LABEL_CLAIMED], "true");
    assert_eq!(
        b["metadata"]["annotations"]["warren.dev/claimed-by"],
        "team-a"
    );
    assert!(b["metadata"].get("ownerReferences").is_none(), "{b}");
    assert_eq!(b["spec"]["envVars"]["FOO"], "bar");
    call.ok(b);
    let got = task.await.unwrap().unwrap().expect("a member");
    assert_eq!(got.metadata.name.as_deref(), Some("m1"));

    // Everything taken: no member, and the caller cold-starts.
    let sandboxes: kube::Api<Sandbox> = kube::Api::namespaced(ctx.client.clone(), NS);
    let task = run(async move { claim(&sandboxes, "pool", &ClaimRequest::default()).await }).await;
    expect_member_list(&mut api, vec![]).await;
    assert!(task.await.unwrap().unwrap().is_none());
}

#[tokio::test]
async fn a_repeated_failure_is_not_written_or_told_again() {
    let (ctx, mut api) = mock();
    let mut s = with_finalizer(sandbox("sb1"));
    // Exactly what the first failure wrote: the same API error, formatted the same way.
    let status: kube::core::Status = serde_json::from_value(json!({"apiVersion": "v1",
        "kind": "Status", "status": "Failure", "reason": "Forbidden",
        "message": "pods \"sb1\" is forbidden: quota", "code": 403}))
    .unwrap();
    let msg = &format!(
        "cannot create pod sb1: {}",
        kube::Error::Api(Box::new(status))
    );
    s.status = Some(SandboxStatus {
        observed_generation: Some(1),
        message: Some(msg.into()),
        conditions: vec![Condition {
            type_: "Ready".into(),
            status: "False".into(),
            reason: "PodCreateFailed".into(),
            message: msg.into(),
            last_transition_time: "2026-01-01T00:00:00Z".into(),
            observed_generation: Some(1),
        }],
        ..Default::default()
    });
    let task = run(reconcile_sandbox(Arc::new(s), ctx)).await;
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .status_error(404, "NotFound", "not found");
    api.expect("POST", PODS).await.status_error(
        403,
        "Forbidden",
        "pods \"sb1\" is forbidden: quota",
    );
    // No status patch and no event: the reconcile ends with the error right away.
    let err = task.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("forbidden"), "{err}");
}
