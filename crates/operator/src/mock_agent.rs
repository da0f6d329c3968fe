//! The reconcilers that call the node agent (Sandbox pause/hibernate, Checkpoint, Commit)
//! against the mock API server and the fake agent.

use crate::agent::fake::FakeAgent;
use crate::agent::{node_id, AgentError, NodeAgent};
use crate::controller::{reconcile_checkpoint, reconcile_commit, reconcile_sandbox, Context};
use crate::crd::{
    Checkpoint, CheckpointContent, CheckpointPhase, CheckpointSpec, CheckpointStatus, Commit,
    CommitSpec, Condition, PersistentContent, RegistryAuth, SandboxPhase, SandboxStatus,
};
use crate::mock::{ready, run, sandbox, with_finalizer, ApiServer, EVENTS, NS, PODS, SANDBOXES};
use crate::sandbox::{build_pod, PodConfig};
use http::{Request, Response};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::Client;
use serde_json::{json, Value};
use std::sync::Arc;

const CHECKPOINTS: &str = "/apis/warren.dev/v1alpha1/namespaces/testns/checkpoints";
const COMMITS: &str = "/apis/warren.dev/v1alpha1/namespaces/testns/commits";

pub(crate) fn mock_with_agent() -> (Arc<Context>, ApiServer, Arc<FakeAgent>) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, NS);
    let fake = Arc::new(FakeAgent::default());
    let agent: Arc<dyn NodeAgent> = fake.clone();
    (
        Context::with_agent(
            client,
            PodConfig {
                envd_key: Some("envd-key".into()),
                ..PodConfig::default()
            },
            Some(agent),
        ),
        ApiServer(handle),
        fake,
    )
}

fn cond(t: &str, ok: bool, reason: &str) -> Condition {
    crate::conditions::condition(&[], t, ok, reason, "", Some(1), "2026-01-01T00:00:00Z")
}

/// A Sandbox whose status is exactly what the operator computes for a running sandbox (so the
/// reconcile writes no operator status), with the agent's conditions.
fn started(agent_conds: Vec<Condition>) -> crate::crd::Sandbox {
    let mut s = with_finalizer(sandbox("sb1"));
    let mut conds = vec![ready()];
    conds.extend(agent_conds);
    s.status = Some(SandboxStatus {
        observed_generation: Some(1),
        phase: SandboxPhase::Running,
        conditions: conds,
        node_name: Some("node-a".into()),
        sandbox_ip: Some("10.0.0.5".into()),
        message: None,
    });
    s
}

pub(crate) fn running_pod(s: &crate::crd::Sandbox) -> Value {
    let mut pod = serde_json::to_value(build_pod(s, &PodConfig::default()).unwrap()).unwrap();
    pod["metadata"]["uid"] = "pod-uid".into();
    pod["spec"]["nodeName"] = "node-a".into();
    pod["status"] = json!({"phase": "Running", "podIP": "10.0.0.5",
                           "conditions": [{"type": "Ready", "status": "True"}]});
    pod
}

/// The agent's conditions patch: server-side apply under the agent's field manager.
pub(crate) async fn expect_agent_conditions(api: &mut ApiServer) -> Vec<Value> {
    let call = api
        .expect("PATCH", &format!("{SANDBOXES}/sb1/status"))
        .await;
    assert!(
        call.query.contains("fieldManager=warren-node-agent"),
        "{}",
        call.query
    );
    let conds = call.body["status"]["conditions"]
        .as_array()
        .unwrap()
        .clone();
    call.ok(serde_json::to_value(sandbox("sb1")).unwrap());
    conds
}

pub(crate) fn find<'a>(conds: &'a [Value], t: &str) -> &'a Value {
    conds
        .iter()
        .find(|c| c["type"] == t)
        .unwrap_or_else(|| panic!("no {t} in {conds:?}"))
}

#[tokio::test]
async fn a_running_pod_gets_its_sandbox_from_the_node_agent() {
    let (ctx, mut api, fake) = mock_with_agent();
    let s = with_finalizer(sandbox("sb1"));
    let task = run(reconcile_sandbox(Arc::new(s.clone()), ctx)).await;
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .ok(running_pod(&s));
    let call = api
        .expect("PATCH", &format!("{SANDBOXES}/sb1/status"))
        .await;
    assert!(call.query.contains("fieldManager=warren-operator"));
    assert_eq!(
        call.body["status"]["conditions"][0]["reason"],
        "WaitingForNodeAgent"
    );
    call.ok(serde_json::to_value(&s).unwrap());
    let conds = expect_agent_conditions(&mut api).await;
    assert_eq!(find(&conds, "Started")["status"], "True");
    assert_eq!(find(&conds, "Paused")["status"], "False");
    task.await.unwrap().unwrap();
    let id = node_id("uid-sb1");
    assert_eq!(fake.calls(), [format!("create node-a {id}")]);
    let req = fake.creates.lock().unwrap()[0].clone();
    assert_eq!((req.vcpus, req.memory_mb), (1, 512));
    // The disk cap the Pod was scheduled with.
    assert_eq!(req.disk_mb, 1024);
    assert_eq!(req.template.as_deref(), Some("base"));
    assert_eq!(
        (req.pod.uid.as_str(), req.pod.ip.as_deref()),
        ("pod-uid", Some("10.0.0.5"))
    );
    // envd's tokens, derived from the shared key and the Sandbox's uid (what the API hands out).
    assert_eq!(
        req.access_token,
        Some(crate::agent::envd_access_token("envd-key", "uid-sb1"))
    );
    assert_eq!(
        req.admin_token,
        Some(crate::agent::envd_admin_token("envd-key", "uid-sb1"))
    );
}

#[tokio::test]
async fn a_failed_start_is_reported_by_the_started_condition() {
    let (ctx, mut api, fake) = mock_with_agent();
    fake.fail(
        "create",
        AgentError::Failed {
            node: "node-a".into(),
            code: 500,
            message: "template base not found".into(),
        },
    );
    let s = with_finalizer(sandbox("sb1"));
    let task = run(reconcile_sandbox(Arc::new(s.clone()), ctx)).await;
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .ok(running_pod(&s));
    api.expect("PATCH", &format!("{SANDBOXES}/sb1/status"))
        .await
        .ok(serde_json::to_value(&s).unwrap());
    let conds = expect_agent_conditions(&mut api).await;
    let st = find(&conds, "Started");
    assert_eq!(
        (st["status"].as_str(), st["reason"].as_str()),
        (Some("False"), Some("StartFailed"))
    );
    assert!(st["message"]
        .as_str()
        .unwrap()
        .contains("template base not found"));
    task.await.unwrap().unwrap();
}

#[tokio::test]
/// A failed pull is reported (`Started=False`, `ImagePullFailed`), the reconcile answers an error
/// so that the next attempt waits for the backoff, the Sandbox stays `Pending` with `Ready`'s
/// reason `ImagePullBackOff` (not `Failed`: a registry may come back), and the next reconcile
/// pulls again.
async fn a_failed_image_pull_backs_off_and_is_retried() {
    let (ctx, mut api, fake) = mock_with_agent();
    fake.fail(
        "create",
        AgentError::Failed {
            node: "node-a".into(),
            code: crate::agent::IMAGE_PULL_FAILED,
            message: "pulling image 127.0.0.1:1/none:v1: registry 127.0.0.1:1: connection refused"
                .into(),
        },
    );
    let mut s = with_finalizer(sandbox("sb1"));
    s.spec.template = None;
    s.spec.image = Some("127.0.0.1:1/none:v1".into());
    let task = run(reconcile_sandbox(Arc::new(s.clone()), ctx.clone())).await;
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .ok(running_pod(&s));
    api.expect("PATCH", &format!("{SANDBOXES}/sb1/status"))
        .await
        .ok(serde_json::to_value(&s).unwrap());
    let conds = expect_agent_conditions(&mut api).await;
    let st = find(&conds, "Started");
    assert_eq!(
        (st["status"].as_str(), st["reason"].as_str()),
        (Some("False"), Some("ImagePullFailed"))
    );
    assert!(st["message"]
        .as_str()
        .unwrap()
        .contains("connection refused"));
    let e = task.await.unwrap().unwrap_err();
    assert!(e.to_string().contains("retried with backoff"), "{e}");

    // What the next reconcile shows: Ready=False, ImagePullBackOff, phase Pending.
    let mut failed = s.clone();
    failed.status = Some(SandboxStatus {
        conditions: serde_json::from_value(Value::Array(conds)).unwrap(),
        ..Default::default()
    });
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(running_pod(&s)).unwrap();
    let st = crate::sandbox::observe(&failed, Some(&pod), "t");
    assert_eq!(st.phase, SandboxPhase::Pending);
    let ready = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "ImagePullBackOff")
    );
    assert!(ready.message.contains("connection refused"), "{ready:?}");
    assert!(crate::controller::FAILURE_REASONS.contains(&"ImagePullBackOff"));

    // The registry is back: the next reconcile pulls again and the sandbox starts.
    fake.failures.lock().unwrap().clear();
    failed.status = Some(st);
    let task = run(reconcile_sandbox(Arc::new(failed.clone()), ctx)).await;
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .ok(running_pod(&failed));
    // The operator's own status (the observation's timestamps) is written first.
    api.expect("PATCH", &format!("{SANDBOXES}/sb1/status"))
        .await
        .ok(serde_json::to_value(&failed).unwrap());
    let conds = expect_agent_conditions(&mut api).await;
    let started = find(&conds, "Started");
    assert_eq!(started["status"], "True", "{started}");
    task.await.unwrap().unwrap();
    let creates = fake
        .calls()
        .iter()
        .filter(|c| c.starts_with("create "))
        .count();
    assert_eq!(creates, 2, "created again");
}

/// Starts reconciling a Sandbox of a private image on a running Pod, with `secrets` as its
/// `imagePullSecrets`, and answers the reconcile up to its status write: the Secret reads and
/// the agent's conditions are left to the test.
async fn reconcile_private_image(
    secrets: &[&str],
) -> (
    tokio::task::JoinHandle<Result<Action, crate::Error>>,
    ApiServer,
    Arc<FakeAgent>,
) {
    let (ctx, mut api, fake) = mock_with_agent();
    let mut s = with_finalizer(sandbox("sb1"));
    s.spec.template = None;
    s.spec.image = Some("registry.example/team/py:v1".into());
    s.spec.image_pull_policy = Some(crate::crd::ImagePullPolicy::Always);
    s.spec.image_pull_secrets = secrets
        .iter()
        .map(|n| crate::crd::LocalSecretReference {
            name: n.to_string(),
        })
        .collect();
    let task = run(reconcile_sandbox(Arc::new(s.clone()), ctx.clone())).await;
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .ok(running_pod(&s));
    api.expect("PATCH", &format!("{SANDBOXES}/sb1/status"))
        .await
        .ok(serde_json::to_value(&s).unwrap());
    (task, api, fake)
}

/// A Sandbox of a private image: the operator reads its `imagePullSecrets` and hands the
/// agent the entry of the image's registry; one with no entry for it is skipped.
#[tokio::test]
async fn a_private_image_is_pulled_with_the_sandboxs_image_pull_secrets() {
    let (task, mut api, fake) = reconcile_private_image(&["other", "regcred"]).await;
    api.expect("GET", &format!("{SECRETS}/other"))
        .await
        .ok(docker_secret("other", "ghcr.io", "x", "y"));
    api.expect("GET", &format!("{SECRETS}/regcred"))
        .await
        .ok(docker_secret(
            "regcred",
            "registry.example",
            "team",
            "s3cret",
        ));
    let conds = expect_agent_conditions(&mut api).await;
    assert_eq!(find(&conds, "Started")["status"], "True");
    task.await.unwrap().unwrap();
    let creates = fake.creates.lock().unwrap().clone();
    assert_eq!(creates.len(), 1);
    let c = creates[0]
        .registry_credentials
        .as_ref()
        .expect("credentials");
    assert_eq!(
        (c.username.as_str(), c.password.as_str()),
        ("team", "s3cret")
    );
    assert!(!format!("{:?}", creates[0]).contains("s3cret"));
    assert_eq!(
        creates[0].image_pull_policy,
        Some(crate::crd::ImagePullPolicy::Always)
    );
}

/// Pull Secrets that cannot serve: a missing one or one of another type fails the start as an
/// image pull, naming the Secret, without calling the agent; none with an entry for the
/// registry is an anonymous pull.
#[tokio::test]
async fn unusable_image_pull_secrets_fail_the_start_and_a_foreign_one_pulls_anonymously() {
    type Answer = Box<dyn Fn(crate::mock::Call)>;
    let cases: Vec<(Answer, Option<&str>)> = vec![
        (
            Box::new(|call| call.status_error(404, "NotFound", "secrets \"regcred\" not found")),
            Some("Secret regcred (imagePullSecrets) does not exist"),
        ),
        (
            Box::new(|call| {
                call.ok(json!({"apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": "regcred"}, "type": "Opaque", "data": {}}))
            }),
            Some("is of type Opaque, not kubernetes.io/dockerconfigjson"),
        ),
        (
            Box::new(|call| call.ok(docker_secret("regcred", "other.example", "u", "p"))),
            None,
        ),
    ];
    for (answer, fails) in cases {
        let (task, mut api, fake) = reconcile_private_image(&["regcred"]).await;
        answer(api.expect("GET", &format!("{SECRETS}/regcred")).await);
        let conds = expect_agent_conditions(&mut api).await;
        let st = find(&conds, "Started");
        let res = task.await.unwrap();
        assert_eq!(res.is_err(), fails.is_some(), "{res:?}");
        let creates = fake.creates.lock().unwrap().clone();
        match fails {
            Some(says) => {
                assert_eq!(
                    (st["status"].as_str(), st["reason"].as_str()),
                    (Some("False"), Some("ImagePullFailed"))
                );
                let msg = st["message"].as_str().unwrap();
                assert!(
                    msg.contains(says) && msg.contains("registry.example/team/py:v1"),
                    "{msg}"
                );
                assert!(creates.is_empty(), "the agent was not called");
            }
            None => {
                assert_eq!(st["status"], "True");
                assert_eq!(creates.len(), 1);
                assert_eq!(creates[0].registry_credentials, None);
            }
        }
    }
}

#[tokio::test]
async fn paused_with_memory_hibernates_and_unpausing_wakes() {
    let (ctx, mut api, fake) = mock_with_agent();
    let id = node_id("uid-sb1");
    let mut s = started(vec![
        cond("Started", true, "Started"),
        cond("Paused", false, "Running"),
    ]);
    s.spec.paused = true;
    s.spec.persistent_contents = vec![PersistentContent::Memory];
    let task = run(reconcile_sandbox(Arc::new(s.clone()), ctx.clone())).await;
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .ok(running_pod(&s));
    let conds = expect_agent_conditions(&mut api).await;
    let p = find(&conds, "Paused");
    assert_eq!(
        (p["status"].as_str(), p["reason"].as_str()),
        (Some("True"), Some("Hibernated"))
    );
    assert!(
        p["message"].as_str().unwrap().contains("104857600 bytes"),
        "{p}"
    );
    // Started stays in the agent's set, or server-side apply would drop it.
    assert_eq!(find(&conds, "Started")["status"], "True");
    task.await.unwrap().unwrap();

    let mut s = started(vec![
        cond("Started", true, "Started"),
        cond("Paused", true, "Hibernated"),
    ]);
    s.spec.persistent_contents = vec![PersistentContent::Memory];
    let task = run(reconcile_sandbox(Arc::new(s.clone()), ctx.clone())).await;
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .ok(running_pod(&s));
    // The operator's view: Paused phase from the Paused condition.
    let call = api
        .expect("PATCH", &format!("{SANDBOXES}/sb1/status"))
        .await;
    assert_eq!(call.body["status"]["phase"], "Paused");
    call.ok(serde_json::to_value(&s).unwrap());
    let conds = expect_agent_conditions(&mut api).await;
    assert_eq!(find(&conds, "Paused")["status"], "False");
    task.await.unwrap().unwrap();

    // Without memory in persistentContents a pause is a freeze.
    let mut s = started(vec![
        cond("Started", true, "Started"),
        cond("Paused", false, "Running"),
    ]);
    s.spec.paused = true;
    let task = run(reconcile_sandbox(Arc::new(s.clone()), ctx)).await;
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .ok(running_pod(&s));
    assert_eq!(
        find(&expect_agent_conditions(&mut api).await, "Paused")["reason"],
        "Frozen"
    );
    task.await.unwrap().unwrap();
    assert_eq!(
        fake.calls(),
        [
            format!("hibernate node-a {id}"),
            format!("wake node-a {id}"),
            format!("pause node-a {id}")
        ]
    );
}

#[tokio::test]
async fn a_failed_pause_is_a_condition_and_a_retry() {
    let (ctx, mut api, fake) = mock_with_agent();
    fake.fail(
        "pause",
        AgentError::Failed {
            node: "node-a".into(),
            code: 500,
            message: "freezer: EBUSY".into(),
        },
    );
    let mut s = started(vec![
        cond("Started", true, "Started"),
        cond("Paused", false, "Running"),
    ]);
    s.spec.paused = true;
    let task = run(reconcile_sandbox(Arc::new(s.clone()), ctx)).await;
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .ok(running_pod(&s));
    let conds = expect_agent_conditions(&mut api).await;
    let p = find(&conds, "Paused");
    assert_eq!(
        (p["status"].as_str(), p["reason"].as_str()),
        (Some("False"), Some("PauseFailed"))
    );
    assert!(p["message"].as_str().unwrap().contains("EBUSY"));
    let err = task.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("EBUSY"), "{err}");
}

#[tokio::test]
async fn deleting_a_started_sandbox_stops_it_on_its_node_first() {
    let (ctx, mut api, fake) = mock_with_agent();
    let mut s = started(vec![cond("Started", true, "Started")]);
    s.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        "2026-01-01T00:00:00Z".parse().unwrap(),
    ));
    let task = run(reconcile_sandbox(Arc::new(s.clone()), ctx)).await;
    let pod = running_pod(&s);
    api.expect("GET", &format!("{PODS}/sb1"))
        .await
        .ok(pod.clone());
    api.expect("DELETE", &format!("{PODS}/sb1")).await.ok(pod);
    api.expect("PATCH", &format!("{SANDBOXES}/sb1/status"))
        .await
        .ok(serde_json::to_value(&s).unwrap());
    assert!(matches!(
        task.await.unwrap().unwrap_err(),
        crate::Error::WaitingForCleanup(_)
    ));
    assert_eq!(
        fake.calls(),
        [format!("delete node-a {}", node_id("uid-sb1"))]
    );
}

fn checkpoint(spec: CheckpointSpec) -> Checkpoint {
    let mut c = Checkpoint::new("cp1", spec);
    c.metadata.namespace = Some(NS.into());
    c.metadata.uid = Some("cp-uid-1".into());
    c.metadata.generation = Some(1);
    c.metadata.finalizers = Some(vec![crate::checkpoint::FINALIZER.into()]);
    c
}

fn cp_spec() -> CheckpointSpec {
    CheckpointSpec {
        sandbox_name: "sb1".into(),
        pod_name: None,
        keep_running: false,
        persistent_contents: vec![CheckpointContent::Memory],
        ttl_after_finished: None,
    }
}

async fn expect_status(api: &mut ApiServer, path: &str) -> Value {
    let call = api.expect("PATCH", &format!("{path}/status")).await;
    assert!(call.query.contains("fieldManager=warren-operator"));
    let st = call.body["status"].clone();
    call.ok(json!({"apiVersion": "warren.dev/v1alpha1", "kind": "Checkpoint", "metadata": {"name": "x"}, "spec": {"sandboxName": "sb1", "podName": "sb1", "image": "x"}}));
    st
}

async fn expect_event(api: &mut ApiServer, reason: &str) {
    let ev = api.expect("POST", EVENTS).await;
    assert_eq!(ev.body["reason"], reason, "{}", ev.body);
    let b = ev.body.clone();
    ev.reply(201, b);
}

#[tokio::test]
async fn a_checkpoint_is_taken_by_the_agent_and_recorded() {
    let (ctx, mut api, fake) = mock_with_agent();
    let task = run(reconcile_checkpoint(Arc::new(checkpoint(cp_spec())), ctx)).await;
    let sbx = started(vec![cond("Started", true, "Started")]);
    api.expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .ok(serde_json::to_value(&sbx).unwrap());
    let st = expect_status(&mut api, &format!("{CHECKPOINTS}/cp1")).await;
    assert_eq!(
        (st["phase"].as_str(), st["nodeName"].as_str()),
        (Some("Creating"), Some("node-a"))
    );
    let st = expect_status(&mut api, &format!("{CHECKPOINTS}/cp1")).await;
    assert_eq!(st["phase"], "Succeeded");
    assert_eq!(st["checkpointId"], "cpuid1");
    assert_eq!(
        (st["sizeBytes"].clone(), st["durationMs"].clone()),
        (json!(52_428_800), json!(310))
    );
    assert_eq!(st["conditions"][0]["status"], "True");
    assert!(st["completionTime"].is_string());
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
    assert_eq!(
        fake.calls(),
        [format!("checkpoint node-a {}", node_id("uid-sb1"))]
    );
    let req = fake.checkpoints.lock().unwrap()[0].clone();
    assert_eq!(
        (req.checkpoint_id.as_str(), req.keep_running),
        ("cpuid1", false)
    );
}

#[tokio::test]
async fn a_checkpoint_of_a_missing_sandbox_fails_and_is_collected_after_its_ttl() {
    let (ctx, mut api, _fake) = mock_with_agent();
    let mut spec = cp_spec();
    spec.ttl_after_finished = Some("0s".into());
    let task = run(reconcile_checkpoint(
        Arc::new(checkpoint(spec.clone())),
        ctx.clone(),
    ))
    .await;
    api.expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .status_error(404, "NotFound", "not found");
    let st = expect_status(&mut api, &format!("{CHECKPOINTS}/cp1")).await;
    assert_eq!(st["phase"], "Failed");
    assert_eq!(st["conditions"][0]["reason"], "SandboxNotFound");
    expect_event(&mut api, "SandboxNotFound").await;
    // ttlAfterFinished 0s: collected at once.
    api.expect("DELETE", &format!("{CHECKPOINTS}/cp1"))
        .await
        .ok(json!({"apiVersion": "v1", "kind": "Status", "status": "Success"}));
    task.await.unwrap().unwrap();

    // A finished one with time left is looked at again when it runs out.
    let mut c = checkpoint(CheckpointSpec {
        ttl_after_finished: Some("1d".into()),
        ..spec
    });
    c.status = Some(CheckpointStatus {
        phase: CheckpointPhase::Succeeded,
        completion_time: Some(crate::conditions::now()),
        ..Default::default()
    });
    let action = reconcile_checkpoint(Arc::new(c), ctx).await.unwrap();
    assert_ne!(action, Action::await_change());
}

#[tokio::test]
async fn deleting_a_checkpoint_removes_its_images_then_the_finalizer() {
    let (ctx, mut api, fake) = mock_with_agent();
    let mut c = checkpoint(cp_spec());
    c.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        "2026-01-01T00:00:00Z".parse().unwrap(),
    ));
    c.status = Some(CheckpointStatus {
        phase: CheckpointPhase::Succeeded,
        checkpoint_id: Some("cpuid1".into()),
        node_name: Some("node-a".into()),
        ..Default::default()
    });
    let task = run(reconcile_checkpoint(Arc::new(c.clone()), ctx)).await;
    let call = api.expect("PATCH", &format!("{CHECKPOINTS}/cp1")).await;
    assert_eq!(
        call.body[1],
        json!({"op": "remove", "path": "/metadata/finalizers/0"})
    );
    call.ok(serde_json::to_value(&c).unwrap());
    task.await.unwrap().unwrap();
    assert_eq!(fake.calls(), ["delete_checkpoint node-a cpuid1"]);
}

#[tokio::test]
async fn a_checkpoint_waits_for_its_sandbox_to_run() {
    let (ctx, mut api, fake) = mock_with_agent();
    let task = run(reconcile_checkpoint(Arc::new(checkpoint(cp_spec())), ctx)).await;
    let mut sbx = with_finalizer(sandbox("sb1"));
    sbx.status = Some(SandboxStatus {
        phase: SandboxPhase::Pending,
        ..Default::default()
    });
    api.expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .ok(serde_json::to_value(&sbx).unwrap());
    let st = expect_status(&mut api, &format!("{CHECKPOINTS}/cp1")).await;
    assert_eq!(st["phase"], "Pending");
    assert!(st["message"]
        .as_str()
        .unwrap()
        .contains("waiting for sandbox sb1"));
    assert_eq!(
        task.await.unwrap().unwrap(),
        Action::requeue(crate::checkpoint::WAIT_POLL)
    );
    assert!(fake.calls().is_empty());
}

const SECRETS: &str = "/api/v1/namespaces/testns/secrets";

/// A `kubernetes.io/dockerconfigjson` Secret with one registry's entry.
fn docker_secret(name: &str, registry: &str, user: &str, password: &str) -> Value {
    use base64::Engine as _;
    let config = json!({"auths": {registry: {"username": user, "password": password}}});
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS},
           "type": "kubernetes.io/dockerconfigjson",
           "data": {".dockerconfigjson": base64::engine::general_purpose::STANDARD
               .encode(config.to_string())}})
}

#[tokio::test]
async fn a_push_whose_secrets_do_not_serve_fails_the_commit_clearly() {
    let sbx = started(vec![cond("Started", true, "Started")]);
    // (Secret answer, what the condition must say.)
    type Answer = Box<dyn Fn(crate::mock::Call)>;
    let cases: Vec<(Answer, &str)> = vec![
        (
            Box::new(|call| call.status_error(404, "NotFound", "secrets \"regcred\" not found")),
            "Secret regcred (registryAuth.secrets) does not exist",
        ),
        (
            Box::new(|call| {
                call.ok(json!({"apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": "regcred"}, "type": "Opaque", "data": {}}))
            }),
            "is of type Opaque, not kubernetes.io/dockerconfigjson",
        ),
        (
            Box::new(|call| call.ok(docker_secret("regcred", "other.example", "u", "p"))),
            "none of the Secrets regcred has credentials for registry registry.example",
        ),
    ];
    for (answer, says) in cases {
        let (ctx, mut api, fake) = mock_with_agent();
        let task = run(reconcile_commit(
            Arc::new(commit(vec!["regcred".into()])),
            ctx,
        ))
        .await;
        api.expect("GET", &format!("{SANDBOXES}/sb1"))
            .await
            .ok(serde_json::to_value(&sbx).unwrap());
        expect_status(&mut api, &format!("{COMMITS}/c1")).await;
        answer(api.expect("GET", &format!("{SECRETS}/regcred")).await);
        let st = expect_status(&mut api, &format!("{COMMITS}/c1")).await;
        assert_eq!(st["phase"], "Failed");
        assert_eq!(st["conditions"][0]["reason"], "RegistryAuthFailed");
        let msg = st["conditions"][0]["message"].as_str().unwrap();
        assert!(msg.contains(says), "{msg}");
        assert!(st["completionTime"].is_string());
        expect_event(&mut api, "RegistryAuthFailed").await;
        task.await.unwrap().unwrap();
        assert!(
            fake.calls().is_empty(),
            "the agent is not asked: {:?}",
            fake.calls()
        );
    }
}

fn commit(secrets: Vec<String>) -> Commit {
    let mut c = Commit::new(
        "c1",
        CommitSpec {
            pod_name: "sb1".into(),
            container_name: None,
            image: "registry.example/team/py:v2".into(),
            timeout_seconds: Some(600),
            ttl: None,
            registry_auth: Some(RegistryAuth { secrets }),
            push: None,
        },
    );
    c.metadata.namespace = Some(NS.into());
    c.metadata.uid = Some("commit-uid".into());
    c.metadata.generation = Some(1);
    c
}

#[tokio::test]
async fn a_commit_is_made_and_pushed_by_the_agent() {
    let (ctx, mut api, fake) = mock_with_agent();
    let task = run(reconcile_commit(
        Arc::new(commit(vec!["regcred".into()])),
        ctx,
    ))
    .await;
    let sbx = started(vec![cond("Started", true, "Started")]);
    api.expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .ok(serde_json::to_value(&sbx).unwrap());
    let st = expect_status(&mut api, &format!("{COMMITS}/c1")).await;
    assert_eq!(st["phase"], "Running");
    assert!(st["startTime"].is_string());
    // The operator reads the named Secret (the agent reads none) and passes its entry on.
    api.expect("GET", &format!("{SECRETS}/regcred"))
        .await
        .ok(docker_secret(
            "regcred",
            "registry.example",
            "pusher",
            "s3cret",
        ));
    let st = expect_status(&mut api, &format!("{COMMITS}/c1")).await;
    assert_eq!(st["phase"], "Succeeded");
    assert!(st["commitID"].as_str().unwrap().starts_with("sha256:0123"));
    assert_eq!(
        (st["sizeBytes"].clone(), st["durationMs"].clone()),
        (json!(4096), json!(54))
    );
    assert_eq!(st["nodeName"], "node-a");
    task.await.unwrap().unwrap();
    let req = fake.commits.lock().unwrap()[0].clone();
    assert!(req.push, "secrets given: push by default");
    assert_eq!(req.registry_secrets, ["regcred"]);
    let creds = req
        .registry_credentials
        .clone()
        .expect("credentials passed");
    assert_eq!(
        (creds.username.as_str(), creds.password.as_str()),
        ("pusher", "s3cret")
    );
    assert!(!format!("{req:?}").contains("s3cret"), "Debug redacts them");
    assert_eq!(
        (req.commit_id.as_str(), req.timeout_seconds),
        ("commituid", Some(600))
    );
}

#[tokio::test]
async fn a_failed_commit_is_explained_and_told() {
    let (ctx, mut api, fake) = mock_with_agent();
    fake.fail(
        "commit",
        AgentError::Failed {
            node: "node-a".into(),
            code: 502,
            message: "push to registry.example: 401 unauthorized".into(),
        },
    );
    let task = run(reconcile_commit(Arc::new(commit(vec![])), ctx.clone())).await;
    let sbx = started(vec![cond("Started", true, "Started")]);
    api.expect("GET", &format!("{SANDBOXES}/sb1"))
        .await
        .ok(serde_json::to_value(&sbx).unwrap());
    expect_status(&mut api, &format!("{COMMITS}/c1")).await;
    let st = expect_status(&mut api, &format!("{COMMITS}/c1")).await;
    assert_eq!(st["phase"], "Failed");
    assert_eq!(st["conditions"][0]["reason"], "CommitFailed");
    assert!(st["message"].as_str().unwrap().contains("401 unauthorized"));
    expect_event(&mut api, "CommitFailed").await;
    task.await.unwrap().unwrap();

    // Bad input never reaches the agent.
    let mut bad = commit(vec![]);
    bad.spec.image = "not an image".into();
    let task = run(reconcile_commit(Arc::new(bad), ctx)).await;
    let st = expect_status(&mut api, &format!("{COMMITS}/c1")).await;
    assert_eq!(st["conditions"][0]["reason"], "InvalidSpec");
    expect_event(&mut api, "InvalidSpec").await;
    assert_eq!(task.await.unwrap().unwrap(), Action::await_change());
    assert_eq!(fake.calls().len(), 1);
}
