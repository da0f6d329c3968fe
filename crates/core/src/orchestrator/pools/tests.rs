//! Warm pools end to end in the control plane, over FakeRuntime and a fake envd.

use super::*;
use crate::auth::{ApiKey, ApiKeys};
use crate::orchestrator::{ListQuery, ManualClock, WarrenConfig};
use crate::store::Store;
use crate::templates::TemplateRegistry;
use async_trait::async_trait;
use chrono::Utc;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use warren_runtime::fake::FakeRuntime;
use warren_runtime::RootfsSpec;

#[derive(Default)]
struct FakeEnvd {
    calls: Mutex<Vec<(SocketAddr, String, InitRequest)>>,
    refuse: AtomicBool,
}

#[async_trait]
impl EnvdClient for FakeEnvd {
    async fn init(&self, addr: SocketAddr, admin: &str, req: &InitRequest) -> Result<(), String> {
        if self.refuse.load(Ordering::SeqCst) {
            return Err("refused".into());
        }
        self.calls
            .lock()
            .unwrap()
            .push((addr, admin.to_string(), req.clone()));
        Ok(())
    }
}

struct Fx {
    warren: Arc<Warren>,
    rt: Arc<FakeRuntime>,
    envd: Arc<FakeEnvd>,
    store: Store,
}

fn fixture() -> Fx {
    let templates = TemplateRegistry::new(None);
    for (name, dir) in [("base", "/tmp/base"), ("other", "/tmp/other")] {
        templates.register(
            name,
            RootfsSpec {
                lower_dirs: vec![dir.into()],
                ro_binds: vec![],
            },
        );
    }
    let keys = ApiKeys::new(vec![ApiKey {
        id: "k1".into(),
        team: "t1".into(),
        key: "key1".into(),
    }]);
    let store = Store::open_in_memory().unwrap();
    let rt = Arc::new(FakeRuntime::new());
    let warren = Arc::new(Warren::with_clock(
        rt.clone(),
        store.clone(),
        templates,
        keys,
        WarrenConfig::default(),
        Arc::new(ManualClock::new(Utc::now())),
    ));
    let envd = Arc::new(FakeEnvd::default());
    warren.set_envd_client(envd.clone());
    Fx {
        warren,
        rt,
        envd,
        store,
    }
}

fn who() -> Principal {
    Principal {
        key_id: "k1".into(),
        team: "t1".into(),
    }
}

fn set(name: &str, template: &str, replicas: u32) -> SandboxSet {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "warren.dev/v1alpha1", "kind": "SandboxSet",
        "metadata": {"name": name},
        "spec": {"replicas": replicas, "template": template,
                 "updateStrategy": {"maxUnavailable": 1}},
    }))
    .unwrap()
}

fn create_req(template: &str) -> CreateRequest {
    CreateRequest {
        template_id: template.into(),
        ..Default::default()
    }
}

impl Fx {
    /// Reconciles until the pools stop changing.
    async fn settle(&self) {
        for _ in 0..30 {
            self.warren.reconcile_pools().await;
            self.warren.settle_pools().await;
        }
    }

    async fn status(&self, name: &str) -> PoolStatus {
        self.warren.get_sandbox_set(name).await.unwrap().status
    }
}

#[tokio::test]
async fn claim_hands_out_a_member_reconfigured_for_the_request() {
    let f = fixture();
    f.warren
        .apply_sandbox_set(set("p", "base", 3))
        .await
        .unwrap();
    f.settle().await;
    let st = f.status("p").await;
    assert_eq!(
        (
            st.available_replicas,
            st.starting_replicas,
            st.claimed_replicas
        ),
        (3, 0, 0)
    );
    // Members are invisible until claimed.
    let listed = f.warren.list(&who(), &ListQuery::default()).await.unwrap();
    assert!(listed.sandboxes.is_empty());
    let members: Vec<String> = f
        .store
        .members()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.sandbox.id)
        .collect();
    assert!(f.warren.get(&who(), &members[0]).await.is_err());

    let mut req = create_req("base");
    req.env_vars.insert("X".into(), "from-request".into());
    req.metadata.insert("owner".into(), "me".into());
    req.timeout_secs = Some(60);
    let rec = f.warren.create(&who(), req).await.unwrap();
    assert!(members.contains(&rec.id), "served from the pool");
    assert_eq!(rec.state, SandboxState::Running);
    assert_eq!(rec.team_id, "t1");
    assert_eq!(rec.metadata.get("owner").map(String::as_str), Some("me"));
    assert_eq!(rec.end_at - rec.started_at, chrono::Duration::seconds(60));

    // envd got the request's env vars and the new token, authenticated by the admin token.
    let calls = f.envd.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1);
    let fake = f.rt.get(&rec.id).unwrap();
    assert_eq!(calls[0].0, fake.placement.envd_addr());
    assert_eq!(
        Some(calls[0].1.as_str()),
        fake.spec.envd.admin_token.as_deref()
    );
    assert_eq!(
        calls[0].2.env_vars.get("X").map(String::as_str),
        Some("from-request")
    );
    assert_eq!(calls[0].2.access_token, rec.envd_access_token);
    assert_ne!(
        fake.spec.envd.access_token.as_deref(),
        Some(rec.envd_access_token.as_str()),
        "fresh token"
    );
    assert_eq!(f.warren.route(&rec.id), Some(fake.placement.ip));
    assert_eq!(f.warren.get(&who(), &rec.id).await.unwrap().id, rec.id);

    // The pool refills.
    let st = f.status("p").await;
    assert_eq!((st.available_replicas, st.claimed_replicas), (2, 1));
    f.settle().await;
    assert_eq!(f.status("p").await.available_replicas, 3);

    // Killing the claimed sandbox leaves nothing of it.
    f.warren.kill(&who(), &rec.id).await.unwrap();
    assert!(f.rt.get(&rec.id).is_none());
    assert!(f.store.get(&rec.id).await.unwrap().is_none());
    assert_eq!(f.status("p").await.claimed_replicas, 0);

    let text = f.warren.metrics_text().await.unwrap();
    assert!(
        text.contains("warren_pool_claims_total{pool=\"p\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("warren_pool_members{pool=\"p\",state=\"ready\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("warren_pool_claim_seconds_count{pool=\"p\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("warren_sandboxes{state=\"pooled\"} 3"),
        "{text}"
    );
}

#[tokio::test]
async fn empty_pool_falls_back_to_a_cold_create_and_counts_a_miss() {
    let f = fixture();
    f.warren
        .apply_sandbox_set(set("p", "base", 0))
        .await
        .unwrap();
    let rec = f.warren.create(&who(), create_req("base")).await.unwrap();
    assert_eq!(rec.state, SandboxState::Running);
    assert!(
        f.envd.calls.lock().unwrap().is_empty(),
        "cold create needs no /init"
    );
    let text = f.warren.metrics_text().await.unwrap();
    assert!(
        text.contains("warren_pool_misses_total{template=\"base\"} 1"),
        "{text}"
    );
    // A request the pool cannot serve (other network settings) is a miss too, not a wrong claim.
    f.warren
        .apply_sandbox_set(set("p", "base", 1))
        .await
        .unwrap();
    f.settle().await;
    let mut req = create_req("base");
    req.allow_internet = Some(false);
    let cold = f.warren.create(&who(), req).await.unwrap();
    assert!(!cold.allow_internet);
    assert_eq!(f.status("p").await.available_replicas, 1);
}

#[tokio::test]
async fn fifty_concurrent_creates_never_share_a_member() {
    let f = fixture();
    f.warren
        .apply_sandbox_set(set("p", "base", 20))
        .await
        .unwrap();
    f.settle().await;
    let members: Vec<String> = f
        .store
        .members()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.sandbox.id)
        .collect();
    assert_eq!(members.len(), 20);
    let mut tasks = vec![];
    for _ in 0..50 {
        let w = f.warren.clone();
        tasks.push(tokio::spawn(async move {
            w.create(&who(), create_req("base")).await.unwrap().id
        }));
    }
    let mut ids = vec![];
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    let from_pool = ids.iter().filter(|id| members.contains(id)).count();
    assert_eq!(from_pool, 20, "every member was claimed once");
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 50, "no two creates got the same sandbox");
    assert_eq!(f.envd.calls.lock().unwrap().len(), 20);
}

#[tokio::test]
async fn a_member_whose_envd_refuses_init_is_discarded() {
    let f = fixture();
    f.warren
        .apply_sandbox_set(set("p", "base", 2))
        .await
        .unwrap();
    f.settle().await;
    f.envd.refuse.store(true, Ordering::SeqCst);
    let rec = f.warren.create(&who(), create_req("base")).await.unwrap();
    // Both members were tried and discarded, then a cold create served the request.
    let members = f.store.members().await.unwrap();
    assert!(members.iter().all(|m| m.sandbox.id != rec.id));
    assert_eq!(
        f.rt.ids().len(),
        1,
        "only the cold sandbox exists: {:?}",
        f.rt.ids()
    );
}

#[tokio::test]
async fn template_change_rolls_every_unclaimed_member() {
    let f = fixture();
    f.warren
        .apply_sandbox_set(set("p", "base", 4))
        .await
        .unwrap();
    f.settle().await;
    let claimed = f.warren.create(&who(), create_req("base")).await.unwrap();
    f.settle().await;
    let before: Vec<String> = f
        .store
        .members()
        .await
        .unwrap()
        .into_iter()
        .filter(|m| !m.claimed)
        .map(|m| m.sandbox.id)
        .collect();
    assert_eq!(before.len(), 4);

    f.warren
        .apply_sandbox_set(set("p", "other", 4))
        .await
        .unwrap();
    // One pass: with maxUnavailable 1, exactly one old member goes.
    f.warren.reconcile_pools().await;
    let st = f.status("p").await;
    assert_eq!(st.stale_replicas, 3, "{st:?}");
    f.settle().await;
    let after = f.store.members().await.unwrap();
    let unclaimed: Vec<_> = after.iter().filter(|m| !m.claimed).collect();
    assert_eq!(unclaimed.len(), 4);
    for m in &unclaimed {
        assert!(
            !before.contains(&m.sandbox.id),
            "old member {} survived",
            m.sandbox.id
        );
        assert_eq!(m.sandbox.template_id, "other");
    }
    // The claimed sandbox is its owner's: untouched.
    assert_eq!(
        f.warren.get(&who(), &claimed.id).await.unwrap().template_id,
        "base"
    );
    // Creates for the new template are served from the pool; the old template now cold-starts.
    let rec = f.warren.create(&who(), create_req("other")).await.unwrap();
    assert!(unclaimed.iter().any(|m| m.sandbox.id == rec.id));
}

#[tokio::test]
async fn deleting_a_set_removes_unclaimed_members_only() {
    let f = fixture();
    f.warren
        .apply_sandbox_set(set("p", "base", 2))
        .await
        .unwrap();
    f.settle().await;
    let claimed = f.warren.create(&who(), create_req("base")).await.unwrap();
    f.warren.delete_sandbox_set("p").await.unwrap();
    f.settle().await;
    assert_eq!(f.rt.ids(), vec![claimed.id.clone()]);
    assert!(f.store.members().await.unwrap().is_empty());
    assert!(matches!(
        f.warren.delete_sandbox_set("p").await,
        Err(CoreError::NotFound(_))
    ));
}

#[tokio::test]
async fn bad_sets_and_autoscalers_are_refused() {
    let f = fixture();
    match f.warren.apply_sandbox_set(set("p", "nope", 1)).await {
        Err(CoreError::InvalidArgument(m)) => {
            assert!(m.contains("template 'nope' not found"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    f.warren
        .apply_sandbox_set(set("p", "base", 1))
        .await
        .unwrap();
    match f.warren.apply_sandbox_set(set("q", "base", 1)).await {
        Err(CoreError::InvalidArgument(m)) => {
            assert!(m.contains("already has the pool 'p'"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    let bad: PoolingAutoScaler = serde_json::from_value(serde_json::json!({
        "apiVersion": "warren.dev/v1alpha1", "kind": "PoolingAutoScaler",
        "metadata": {"name": "a"},
        "spec": {"scaleTargetRef": {"kind": "SandboxSet", "name": "p"}, "minReplicas": 5, "maxReplicas": 2},
    }))
    .unwrap();
    assert!(matches!(
        f.warren.apply_autoscaler(bad).await,
        Err(CoreError::InvalidArgument(_))
    ));
}

#[tokio::test]
async fn autoscaler_sizes_the_pool_and_survives_restart() {
    let f = fixture();
    f.warren
        .apply_sandbox_set(set("p", "base", 1))
        .await
        .unwrap();
    let a: PoolingAutoScaler = serde_json::from_value(serde_json::json!({
        "apiVersion": "warren.dev/v1alpha1", "kind": "PoolingAutoScaler",
        "metadata": {"name": "a"},
        "spec": {"scaleTargetRef": {"kind": "SandboxSet", "name": "p"}, "minReplicas": 4, "maxReplicas": 10},
    }))
    .unwrap();
    f.warren.apply_autoscaler(a).await.unwrap();
    f.settle().await;
    let st = f.status("p").await;
    assert_eq!((st.replicas, st.available_replicas), (4, 4), "{st:?}");
    let view = f.warren.get_autoscaler("a").unwrap();
    assert_eq!(view.status.desired_replicas, 4);
    assert!(f
        .warren
        .metrics_text()
        .await
        .unwrap()
        .contains("warren_autoscaler_decisions_total{autoscaler=\"a\",decision=\"scale_up\"} 1"));

    // A restarted daemon re-adopts the members and the pool and autoscaler objects.
    let w2 = Arc::new(Warren::with_clock(
        f.rt.clone(),
        f.store.clone(),
        {
            let t = TemplateRegistry::new(None);
            t.register(
                "base",
                RootfsSpec {
                    lower_dirs: vec!["/tmp/base".into()],
                    ro_binds: vec![],
                },
            );
            t
        },
        ApiKeys::new(vec![]),
        WarrenConfig::default(),
        Arc::new(ManualClock::new(Utc::now())),
    ));
    let report = w2.recover().await.unwrap();
    assert_eq!(report.adopted.len(), 4);
    let st = w2.get_sandbox_set("p").await.unwrap().status;
    assert_eq!((st.replicas, st.available_replicas), (4, 4), "{st:?}");
}

#[tokio::test]
async fn recovery_kills_interrupted_claims_and_tick_reaps_dead_members() {
    let f = fixture();
    f.warren
        .apply_sandbox_set(set("p", "base", 2))
        .await
        .unwrap();
    f.settle().await;
    let ids: Vec<String> = f
        .store
        .members()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.sandbox.id)
        .collect();
    // A claim interrupted by a crash: the row says `claiming`.
    f.store.apply(&ids[0], Event::Claim, |_| {}).await.unwrap();
    f.rt.crash(&ids[1]);
    f.warren.tick().await;
    assert!(
        f.store.get(&ids[1]).await.unwrap().is_none(),
        "dead member reaped"
    );
    let report = f.warren.recover().await.unwrap();
    assert!(report.killed.contains(&ids[0]));
    assert!(f.rt.get(&ids[0]).is_none());
}

#[tokio::test]
async fn a_checkpoint_template_restores_on_create_and_fills_its_pool() {
    let f = fixture();
    let mut req = create_req("base");
    req.env_vars.insert("FROM_SOURCE".into(), "1".into());
    let src = f.warren.create(&who(), req).await.unwrap();
    let ck: crate::checkpoint::Checkpoint = serde_json::from_value(serde_json::json!({
        "kind": "Checkpoint", "metadata": {"name": "ck"}, "spec": {"sandbox": src.id}
    }))
    .unwrap();
    f.warren.create_checkpoint(&who(), ck).await.unwrap();
    let view = f
        .warren
        .create_checkpoint_template(&who(), "warm", "ck")
        .await
        .unwrap();
    assert_eq!(
        (view.kind.as_str(), view.status.as_str()),
        ("checkpoint", "ready")
    );
    // Bad input: unknown checkpoint, a name in use, a bad name.
    let e = f
        .warren
        .create_checkpoint_template(&who(), "x", "nope")
        .await
        .unwrap_err();
    assert!(matches!(e, CoreError::NotFound(_)), "{e}");
    for (name, conflict) in [("warm", true), ("base", true), ("../x", false)] {
        let e = f
            .warren
            .create_checkpoint_template(&who(), name, "ck")
            .await
            .unwrap_err();
        assert_eq!(matches!(e, CoreError::Conflict(_)), conflict, "{name}: {e}");
    }

    // A cold create of the template is a restore, re-keyed to its own token.
    let mut req = create_req("warm");
    req.env_vars.insert("X".into(), "a".into());
    let a = f.warren.create(&who(), req).await.unwrap();
    assert_eq!(a.template_id, "warm");
    assert_eq!(f.rt.restored_from(&a.id).as_deref(), Some("ck"));
    assert_ne!(a.envd_access_token, src.envd_access_token);
    let (_, admin, init) = f.envd.calls.lock().unwrap().last().cloned().unwrap();
    assert_eq!(Some(admin), src.spec.envd.admin_token);
    assert_eq!(init.access_token, a.envd_access_token);
    assert_eq!(init.env_vars["FROM_SOURCE"], "1");
    assert_eq!(init.env_vars["X"], "a");
    assert_eq!(
        a.spec.rootfs.lower_dirs[0],
        std::path::PathBuf::from("/fake/checkpoints/ck/fs")
    );

    // The checkpoint is held by the template.
    let e = f.warren.delete_checkpoint(&who(), "ck").await.unwrap_err();
    assert!(
        matches!(&e, CoreError::Conflict(m) if m.contains("warm")),
        "{e}"
    );

    // A pool on the template fills with restores; a create claims one.
    f.warren
        .apply_sandbox_set(set("p", "warm", 2))
        .await
        .unwrap();
    f.settle().await;
    assert_eq!(f.status("p").await.available_replicas, 2);
    let mut req = create_req("warm");
    req.env_vars.insert("X".into(), "c".into());
    let c = f.warren.create(&who(), req).await.unwrap();
    assert_eq!(f.status("p").await.claimed_replicas, 1);
    assert_eq!(f.rt.restored_from(&c.id).as_deref(), Some("ck"));
    let (_, _, init) = f.envd.calls.lock().unwrap().last().cloned().unwrap();
    assert_eq!(init.access_token, c.envd_access_token);
    assert_eq!(
        init.env_vars["FROM_SOURCE"], "1",
        "the source's env under the request's"
    );
    assert_eq!(init.env_vars["X"], "c");

    // The template is held by its pool and sandboxes; then everything goes.
    let e = f.warren.delete_template("warm").await.unwrap_err();
    assert!(
        matches!(&e, CoreError::Conflict(m) if m.contains('p')),
        "{e}"
    );
    f.warren.delete_sandbox_set("p").await.unwrap();
    for id in [&a.id, &c.id] {
        f.warren.kill(&who(), id).await.unwrap();
    }
    f.settle().await;
    f.warren.delete_template("warm").await.unwrap();
    f.warren.delete_checkpoint(&who(), "ck").await.unwrap();
    assert!(warren_runtime::SandboxRuntime::checkpoint_layer(&*f.rt, "ck").is_none());
}
