use super::*;
use crate::auth::ApiKey;
use warren_runtime::fake::FakeRuntime;
use warren_runtime::{Placement, RootfsSpec};

struct Fixture {
    warren: Warren,
    rt: Arc<FakeRuntime>,
    clock: Arc<ManualClock>,
    store: Store,
}

fn keys() -> ApiKeys {
    ApiKeys::new(vec![
        ApiKey {
            id: "k1".into(),
            team: "t1".into(),
            key: "key1".into(),
        },
        ApiKey {
            id: "k2".into(),
            team: "t2".into(),
            key: "key2".into(),
        },
    ])
}

fn templates() -> TemplateRegistry {
    let t = TemplateRegistry::new(None);
    t.register(
        "base",
        RootfsSpec {
            lower_dirs: vec!["/tmp/base".into()],
            ro_binds: vec![],
        },
    );
    t
}

fn warren_over(store: Store, rt: Arc<FakeRuntime>, clock: Arc<ManualClock>) -> Warren {
    Warren::with_clock(
        rt,
        store,
        templates(),
        keys(),
        WarrenConfig::default(),
        clock,
    )
}

fn fixture() -> Fixture {
    let store = Store::open_in_memory().unwrap();
    let rt = Arc::new(FakeRuntime::new());
    let clock = Arc::new(ManualClock::new(Utc::now()));
    Fixture {
        warren: warren_over(store.clone(), rt.clone(), clock.clone()),
        rt,
        clock,
        store,
    }
}

fn t1() -> Principal {
    Principal {
        key_id: "k1".into(),
        team: "t1".into(),
    }
}

fn t2() -> Principal {
    Principal {
        key_id: "k2".into(),
        team: "t2".into(),
    }
}

fn base() -> CreateRequest {
    CreateRequest {
        template_id: "base".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn create_runs_and_records() {
    let f = fixture();
    let mut req = base();
    req.env_vars.insert("A".into(), "1".into());
    req.allow_internet = Some(false);
    let rec = f.warren.create(&t1(), req).await.unwrap();

    assert_eq!(rec.id.len(), 20);
    assert!(rec
        .id
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
    assert_eq!(rec.state, SandboxState::Running);
    assert!(rec.envd_access_token.len() >= 32);
    assert_eq!(rec.end_at - rec.started_at, chrono::Duration::seconds(300));
    assert_eq!((rec.cpu_count, rec.memory_mb), (2, 512));

    let fake = f.rt.get(&rec.id).expect("runtime has it");
    assert_eq!(
        fake.spec.envd.access_token.as_deref(),
        Some(rec.envd_access_token.as_str())
    );
    assert_eq!(
        fake.spec.envd.env_vars.get("A").map(String::as_str),
        Some("1")
    );
    assert!(!fake.spec.network.allow_internet);
    assert_eq!(f.warren.route(&rec.id), Some(fake.placement.ip));
    let token = rec.envd_access_token.clone();
    assert_eq!(
        f.warren.route_by_token(|t| t == token),
        Some((rec.id.clone(), fake.placement.ip))
    );
    assert_eq!(f.warren.route_by_token(|_| false), None);
    assert_eq!(f.store.get(&rec.id).await.unwrap().unwrap(), rec);
}

#[tokio::test]
async fn create_validates() {
    let f = fixture();
    let mut req = base();
    req.timeout_secs = Some(-1);
    assert!(matches!(
        f.warren.create(&t1(), req).await,
        Err(CoreError::InvalidArgument(_))
    ));
    let mut req = base();
    req.template_id = "nope".into();
    match f.warren.create(&t1(), req).await {
        Err(CoreError::NotFound(m)) => assert!(m.contains("nope"), "{m}"),
        other => panic!("{other:?}"),
    }
    let mut req = base();
    req.timeout_secs = Some(10 * 24 * 3600);
    assert!(matches!(
        f.warren.create(&t1(), req).await,
        Err(CoreError::InvalidArgument(_))
    ));
    assert!(f.store.list_all().await.unwrap().is_empty());
    assert!(f.rt.ids().is_empty());
}

#[tokio::test]
async fn failed_create_leaves_nothing_behind() {
    let f = fixture();
    f.rt.fail_next_create();
    let err = f.warren.create(&t1(), base()).await.unwrap_err();
    assert!(matches!(err, CoreError::Runtime(_)), "{err:?}");
    assert!(f.store.list_all().await.unwrap().is_empty());
    assert!(f.rt.ids().is_empty());
    // The next create works.
    f.warren.create(&t1(), base()).await.unwrap();
}

#[tokio::test]
async fn kill_removes_everything_and_second_kill_is_not_found() {
    let f = fixture();
    let rec = f.warren.create(&t1(), base()).await.unwrap();
    f.warren.kill(&t1(), &rec.id).await.unwrap();
    assert!(f.rt.get(&rec.id).is_none());
    assert!(f.store.get(&rec.id).await.unwrap().is_none());
    assert_eq!(f.warren.route(&rec.id), None);
    assert!(matches!(
        f.warren.kill(&t1(), &rec.id).await,
        Err(CoreError::NotFound(_))
    ));
    assert!(matches!(
        f.warren.get(&t1(), &rec.id).await,
        Err(CoreError::NotFound(_))
    ));
}

#[tokio::test]
async fn pause_and_connect() {
    let f = fixture();
    let rec = f.warren.create(&t1(), base()).await.unwrap();
    let id = rec.id.clone();

    f.warren.pause(&t1(), &id).await.unwrap();
    assert!(f.rt.get(&id).unwrap().frozen);
    assert_eq!(f.warren.route(&id), None);
    assert_eq!(
        f.warren.get(&t1(), &id).await.unwrap().state,
        SandboxState::Paused
    );
    assert!(matches!(
        f.warren.pause(&t1(), &id).await,
        Err(CoreError::Conflict(_))
    ));

    // Resume: a new deadline from now, default 300 s.
    f.clock.advance(Duration::from_secs(1000));
    let (rec, outcome) = f.warren.connect(&t1(), &id, None).await.unwrap();
    assert_eq!(outcome, ConnectOutcome::Resumed);
    assert_eq!(rec.state, SandboxState::Running);
    assert_eq!(rec.end_at, f.clock.now() + chrono::Duration::seconds(300));
    assert!(!f.rt.get(&id).unwrap().frozen);
    assert!(f.warren.route(&id).is_some());

    // Running: connect only ever extends.
    let (r, outcome) = f.warren.connect(&t1(), &id, Some(10)).await.unwrap();
    assert_eq!(outcome, ConnectOutcome::AlreadyRunning);
    assert_eq!(r.end_at, rec.end_at);
    let (r, _) = f.warren.connect(&t1(), &id, Some(3600)).await.unwrap();
    assert_eq!(r.end_at, f.clock.now() + chrono::Duration::seconds(3600));

    // set_timeout may shorten.
    f.warren.set_timeout(&t1(), &id, 5).await.unwrap();
    assert_eq!(
        f.warren.get(&t1(), &id).await.unwrap().end_at,
        f.clock.now() + chrono::Duration::seconds(5)
    );
    assert!(matches!(
        f.warren.set_timeout(&t1(), &id, -5).await,
        Err(CoreError::InvalidArgument(_))
    ));
}

#[tokio::test]
async fn timeouts_kill_or_auto_pause() {
    let f = fixture();
    let mut req = base();
    req.timeout_secs = Some(10);
    let killed = f.warren.create(&t1(), req.clone()).await.unwrap();
    req.auto_pause = true;
    let paused = f.warren.create(&t1(), req).await.unwrap();
    let mut long = base();
    long.timeout_secs = Some(100);
    let survivor = f.warren.create(&t1(), long).await.unwrap();

    f.clock.advance(Duration::from_secs(9));
    f.warren.tick().await;
    assert_eq!(f.rt.ids().len(), 3);

    f.clock.advance(Duration::from_secs(2));
    f.warren.tick().await;
    assert!(f.rt.get(&killed.id).is_none());
    assert!(f.store.get(&killed.id).await.unwrap().is_none());
    assert_eq!(
        f.warren.get(&t1(), &paused.id).await.unwrap().state,
        SandboxState::Paused
    );
    assert!(f.rt.get(&paused.id).unwrap().frozen);
    assert_eq!(
        f.warren.get(&t1(), &survivor.id).await.unwrap().state,
        SandboxState::Running
    );

    // Paused sandboxes have no deadline.
    f.clock.advance(Duration::from_secs(100_000));
    f.warren.tick().await;
    assert!(f.rt.get(&paused.id).is_some());
    assert!(f.rt.get(&survivor.id).is_none());
}

#[tokio::test]
async fn dead_init_is_reaped() {
    let f = fixture();
    let rec = f.warren.create(&t1(), base()).await.unwrap();
    f.rt.crash(&rec.id);
    f.warren.tick().await;
    assert!(f.store.get(&rec.id).await.unwrap().is_none());
    assert!(f.rt.get(&rec.id).is_none());
    assert_eq!(f.warren.route(&rec.id), None);
}

#[tokio::test]
async fn team_isolation() {
    let f = fixture();
    let rec = f.warren.create(&t1(), base()).await.unwrap();
    let id = &rec.id;
    assert!(matches!(
        f.warren.get(&t2(), id).await,
        Err(CoreError::NotFound(_))
    ));
    assert!(matches!(
        f.warren.kill(&t2(), id).await,
        Err(CoreError::NotFound(_))
    ));
    assert!(matches!(
        f.warren.pause(&t2(), id).await,
        Err(CoreError::NotFound(_))
    ));
    assert!(matches!(
        f.warren.connect(&t2(), id, None).await,
        Err(CoreError::NotFound(_))
    ));
    assert!(matches!(
        f.warren.set_timeout(&t2(), id, 5).await,
        Err(CoreError::NotFound(_))
    ));
    let page = f.warren.list(&t2(), &ListQuery::default()).await.unwrap();
    assert!(page.sandboxes.is_empty());
    assert!(f.rt.get(id).is_some());
}

#[tokio::test]
async fn authenticate() {
    let f = fixture();
    assert_eq!(f.warren.authenticate(Some("key2")).unwrap(), t2());
    assert!(matches!(
        f.warren.authenticate(Some("bad")),
        Err(CoreError::Unauthorized(_))
    ));
    assert!(matches!(
        f.warren.authenticate(None),
        Err(CoreError::Unauthorized(_))
    ));
}

#[tokio::test]
async fn list_filters_order_and_pages() {
    let f = fixture();
    let mut ids = vec![];
    for i in 0..5 {
        let mut req = base();
        req.metadata.insert("n".into(), i.to_string());
        req.metadata.insert("even".into(), (i % 2 == 0).to_string());
        ids.push(f.warren.create(&t1(), req).await.unwrap().id);
        f.clock.advance(Duration::from_secs(1));
    }
    f.warren.pause(&t1(), &ids[1]).await.unwrap();

    let all = f.warren.list(&t1(), &ListQuery::default()).await.unwrap();
    let got: Vec<_> = all.sandboxes.iter().map(|r| r.id.clone()).collect();
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(got, newest_first);
    assert_eq!(all.next_token, None);

    let q = ListQuery {
        metadata: BTreeMap::from([("even".into(), "true".into())]),
        order: ListOrder::Asc,
        ..Default::default()
    };
    let got: Vec<_> = f
        .warren
        .list(&t1(), &q)
        .await
        .unwrap()
        .sandboxes
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(got, vec![ids[0].clone(), ids[2].clone(), ids[4].clone()]);

    let q = ListQuery {
        metadata: BTreeMap::from([("even".into(), "true".into()), ("n".into(), "2".into())]),
        ..Default::default()
    };
    assert_eq!(f.warren.list(&t1(), &q).await.unwrap().sandboxes.len(), 1);

    let q = ListQuery {
        states: Some(vec![PublicState::Paused]),
        ..Default::default()
    };
    let page = f.warren.list(&t1(), &q).await.unwrap();
    assert_eq!(page.sandboxes.len(), 1);
    assert_eq!(page.sandboxes[0].id, ids[1]);

    let q = ListQuery {
        template: Some("other".into()),
        ..Default::default()
    };
    assert!(f.warren.list(&t1(), &q).await.unwrap().sandboxes.is_empty());

    // Paging in both orders visits every sandbox exactly once.
    for order in [ListOrder::Asc, ListOrder::Desc] {
        let mut seen = vec![];
        let mut token = None;
        loop {
            let q = ListQuery {
                limit: Some(2),
                next_token: token.clone(),
                order,
                ..Default::default()
            };
            let page = f.warren.list(&t1(), &q).await.unwrap();
            assert!(page.sandboxes.len() <= 2);
            seen.extend(page.sandboxes.into_iter().map(|r| r.id));
            match page.next_token {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        let mut expect = ids.clone();
        if order == ListOrder::Desc {
            expect.reverse();
        }
        assert_eq!(seen, expect);
    }

    let q = ListQuery {
        next_token: Some("garbage!".into()),
        ..Default::default()
    };
    assert!(matches!(
        f.warren.list(&t1(), &q).await,
        Err(CoreError::InvalidArgument(_))
    ));
    let q = ListQuery {
        limit: Some(0),
        ..Default::default()
    };
    assert!(matches!(
        f.warren.list(&t1(), &q).await,
        Err(CoreError::InvalidArgument(_))
    ));
}

#[tokio::test]
async fn recovery_after_restart() {
    let f = fixture();
    let alive = f.warren.create(&t1(), base()).await.unwrap();
    let paused = f.warren.create(&t1(), base()).await.unwrap();
    f.warren.pause(&t1(), &paused.id).await.unwrap();
    let died = f.warren.create(&t1(), base()).await.unwrap();
    drop(f.warren);

    // "Restart": a new runtime that still sees the kernel objects of two sandboxes plus one
    // sandbox no record knows; the third recorded sandbox is gone.
    let rt = Arc::new(FakeRuntime::new());
    let spec_of = |r: &SandboxRecord| r.spec.clone();
    rt.insert_leftover(spec_of(&alive), alive.placement.clone().unwrap());
    let paused_rec = f.store.get(&paused.id).await.unwrap().unwrap();
    rt.insert_leftover(spec_of(&paused_rec), paused_rec.placement.clone().unwrap());
    let mut orphan = alive.spec.clone();
    orphan.id = "orphan".into();
    rt.insert_leftover(
        orphan,
        Placement {
            init_pid: 1,
            init_start_ticks: 1,
            ip: "10.9.9.9".parse().unwrap(),
            veth: "x".into(),
        },
    );
    // A crash in the middle of a create leaves a `Creating` row.
    let mut creating = crate::store::tests::record("halfmade", "t1");
    creating.state = SandboxState::Creating;
    f.store.insert(creating).await.unwrap();

    let w = warren_over(f.store.clone(), rt.clone(), f.clock.clone());
    let report = w.recover().await.unwrap();
    let mut adopted = report.adopted.clone();
    adopted.sort();
    let mut expect = vec![alive.id.clone(), paused.id.clone()];
    expect.sort();
    assert_eq!(adopted, expect);
    let mut killed = report.killed.clone();
    killed.sort();
    let mut expect_killed = vec![died.id.clone(), "halfmade".to_string()];
    expect_killed.sort();
    assert_eq!(killed, expect_killed);
    assert_eq!(report.swept, vec!["orphan".to_string()]);

    assert_eq!(rt.ids().len(), 2);
    assert!(f.store.get(&died.id).await.unwrap().is_none());
    assert!(f.store.get("halfmade").await.unwrap().is_none());
    assert!(w.route(&alive.id).is_some());
    assert_eq!(w.route(&paused.id), None);
    assert_eq!(
        w.get(&t1(), &paused.id).await.unwrap().state,
        SandboxState::Paused
    );
    // The adopted sandboxes are fully usable.
    w.connect(&t1(), &paused.id, None).await.unwrap();
    w.kill(&t1(), &alive.id).await.unwrap();
    assert_eq!(rt.ids(), vec![paused.id.clone()]);
}

#[tokio::test]
async fn recovery_finishes_interrupted_operations() {
    let f = fixture();
    let a = f.warren.create(&t1(), base()).await.unwrap();
    let b = f.warren.create(&t1(), base()).await.unwrap();
    // Simulate crashes right after the store recorded the start of an operation.
    f.store.apply(&a.id, Event::Pause, |_| {}).await.unwrap();
    f.store.apply(&b.id, Event::Kill, |_| {}).await.unwrap();

    let w = warren_over(f.store.clone(), f.rt.clone(), f.clock.clone());
    let report = w.recover().await.unwrap();
    assert_eq!(report.adopted, vec![a.id.clone()]);
    assert_eq!(report.killed, vec![b.id.clone()]);
    assert_eq!(
        f.store.get(&a.id).await.unwrap().unwrap().state,
        SandboxState::Paused
    );
    assert!(f.rt.get(&a.id).unwrap().frozen);
    assert!(f.rt.get(&b.id).is_none());
}

mod parity;

#[tokio::test]
async fn idempotency_key_returns_the_first_sandbox_per_team() {
    let f = fixture();
    let a = f
        .warren
        .create_idempotent(&t1(), base(), Some("retry-1"))
        .await
        .unwrap();
    let b = f
        .warren
        .create_idempotent(&t1(), base(), Some("retry-1"))
        .await
        .unwrap();
    assert_eq!(a.id, b.id);
    assert_eq!(f.rt.ids().len(), 1, "the retry made no second sandbox");
    // Another team's identical key is another create.
    let c = f
        .warren
        .create_idempotent(&t2(), base(), Some("retry-1"))
        .await
        .unwrap();
    assert_ne!(c.id, a.id);
    // Once the first sandbox is gone, the key makes a new one.
    f.warren.kill(&t1(), &a.id).await.unwrap();
    let d = f
        .warren
        .create_idempotent(&t1(), base(), Some("retry-1"))
        .await
        .unwrap();
    assert_ne!(d.id, a.id);
    for bad in ["", "UPPER", "has space", &"x".repeat(256)] {
        assert!(matches!(
            f.warren.create_idempotent(&t1(), base(), Some(bad)).await,
            Err(CoreError::InvalidArgument(_))
        ));
    }
}

#[tokio::test]
async fn traffic_wakes_only_auto_resume_sandboxes_for_their_create_timeout() {
    let f = fixture();
    let mut req = base();
    req.timeout_secs = Some(60);
    req.auto_pause = true;
    let plain = f.warren.create(&t1(), req.clone()).await.unwrap();
    req.auto_resume = true;
    let waking = f.warren.create(&t1(), req).await.unwrap();
    for id in [&plain.id, &waking.id] {
        f.warren.pause(&t1(), id).await.unwrap();
        assert_eq!(f.warren.route(id), None);
    }

    assert_eq!(f.warren.route_or_wake(&plain.id).await, None);
    assert!(f.rt.get(&plain.id).unwrap().frozen);

    f.clock.advance(Duration::from_secs(1000));
    let ip = f.warren.route_or_wake(&waking.id).await;
    assert!(ip.is_some());
    assert_eq!(ip, f.warren.route(&waking.id));
    assert!(!f.rt.get(&waking.id).unwrap().frozen);
    let rec = f.warren.get(&t1(), &waking.id).await.unwrap();
    assert_eq!(rec.state, SandboxState::Running);
    assert_eq!(rec.end_at, f.clock.now() + chrono::Duration::seconds(60));

    // Unknown ids neither wake anything nor leave per-sandbox state behind.
    assert_eq!(f.warren.route_or_wake("nosuchsandbox").await, None);
}

#[tokio::test]
async fn idle_paused_sandboxes_hibernate_and_connect_wakes_them() {
    let f = fixture();
    let rec = f.warren.create(&t1(), base()).await.unwrap();
    let id = rec.id.clone();
    f.warren.pause(&t1(), &id).await.unwrap();

    // Not yet idle for the default 10 minutes: stays frozen in RAM.
    f.clock.advance(Duration::from_secs(599));
    f.warren.tick().await;
    assert_eq!(
        f.store.get(&id).await.unwrap().unwrap().state,
        SandboxState::Paused
    );
    f.clock.advance(Duration::from_secs(2));
    f.warren.tick().await;
    let stored = f.store.get(&id).await.unwrap().unwrap();
    assert_eq!(stored.state, SandboxState::Hibernated);
    assert!(f.rt.get(&id).unwrap().hibernated);
    // E2B clients see one paused state.
    let seen = f.warren.get(&t1(), &id).await.unwrap();
    assert_eq!(seen.state.public(), Some(PublicState::Paused));
    assert_eq!(f.warren.route(&id), None);
    assert!(matches!(
        f.warren.pause(&t1(), &id).await,
        Err(CoreError::Conflict(_))
    ));
    // A hibernated sandbox has no deadline either, and its init being gone is no crash.
    f.clock.advance(Duration::from_secs(100_000));
    f.warren.tick().await;
    assert!(f.rt.get(&id).is_some());

    let old_pid = rec.placement.clone().unwrap().init_pid;
    let (woken, outcome) = f.warren.connect(&t1(), &id, Some(60)).await.unwrap();
    assert_eq!(outcome, ConnectOutcome::Resumed);
    assert_eq!(woken.state, SandboxState::Running);
    assert_eq!(woken.end_at, f.clock.now() + chrono::Duration::seconds(60));
    let placement = woken.placement.clone().unwrap();
    assert_ne!(placement.init_pid, old_pid, "the new placement is stored");
    assert_eq!(placement.ip, rec.placement.unwrap().ip);
    assert!(f.warren.route(&id).is_some());

    // Explicitly: a running sandbox is paused and hibernated at once; twice is fine.
    let h = f.warren.hibernate(&t1(), &id).await.unwrap();
    assert_eq!(h.state, SandboxState::Hibernated);
    assert_eq!(
        f.warren.hibernate(&t1(), &id).await.unwrap().state,
        SandboxState::Hibernated
    );
    assert!(matches!(
        f.warren.hibernate(&t2(), &id).await,
        Err(CoreError::NotFound(_))
    ));
    f.warren.kill(&t1(), &id).await.unwrap();
    assert!(f.rt.get(&id).is_none());
}

#[tokio::test]
async fn without_criu_paused_sandboxes_stay_frozen_and_hibernate_says_why() {
    let f = fixture();
    f.rt.disable_hibernate("criu is not installed");
    let rec = f.warren.create(&t1(), base()).await.unwrap();
    f.warren.pause(&t1(), &rec.id).await.unwrap();
    f.clock.advance(Duration::from_secs(100_000));
    f.warren.tick().await;
    assert_eq!(
        f.store.get(&rec.id).await.unwrap().unwrap().state,
        SandboxState::Paused
    );
    let err = f.warren.hibernate(&t1(), &rec.id).await.unwrap_err();
    assert!(
        matches!(&err, CoreError::Unavailable(m) if m.contains("criu is not installed")),
        "{err}"
    );
    assert!(f.rt.get(&rec.id).unwrap().frozen, "untouched");
    // Everything else works.
    f.warren.connect(&t1(), &rec.id, None).await.unwrap();
}

#[tokio::test]
async fn hibernated_sandboxes_survive_a_restart() {
    let f = fixture();
    let rec = f.warren.create(&t1(), base()).await.unwrap();
    f.warren.hibernate(&t1(), &rec.id).await.unwrap();
    drop(f.warren);
    // The same runtime state (images, pinned netns) seen by a restarted daemon.
    let w = warren_over(f.store.clone(), f.rt.clone(), f.clock.clone());
    let report = w.recover().await.unwrap();
    assert_eq!(report.adopted, vec![rec.id.clone()]);
    assert_eq!(
        w.get(&t1(), &rec.id).await.unwrap().state,
        SandboxState::Hibernated
    );
    let (woken, _) = w.connect(&t1(), &rec.id, None).await.unwrap();
    assert_eq!(woken.state, SandboxState::Running);

    // One whose images are gone cannot come back: removed at recovery.
    w.hibernate(&t1(), &rec.id).await.unwrap();
    drop(w);
    let fresh = Arc::new(FakeRuntime::new());
    let w = warren_over(f.store.clone(), fresh, f.clock.clone());
    let report = w.recover().await.unwrap();
    assert_eq!(report.killed, vec![rec.id.clone()]);
    assert!(f.store.get(&rec.id).await.unwrap().is_none());
}

#[tokio::test]
async fn traffic_wakes_a_hibernated_auto_resume_sandbox() {
    let f = fixture();
    let mut req = base();
    req.auto_pause = true;
    req.auto_resume = true;
    let rec = f.warren.create(&t1(), req).await.unwrap();
    f.warren.hibernate(&t1(), &rec.id).await.unwrap();
    assert_eq!(f.warren.route(&rec.id), None);
    let ip = f.warren.route_or_wake(&rec.id).await;
    assert!(ip.is_some());
    assert!(!f.rt.get(&rec.id).unwrap().hibernated);
    assert_eq!(
        f.warren.get(&t1(), &rec.id).await.unwrap().state,
        SandboxState::Running
    );
}

#[tokio::test]
async fn the_idle_clock_of_a_paused_sandbox_survives_a_restart() {
    let f = fixture();
    let rec = f.warren.create(&t1(), base()).await.unwrap();
    f.warren.pause(&t1(), &rec.id).await.unwrap();
    f.clock.advance(Duration::from_secs(400));
    f.warren.tick().await;
    drop(f.warren);

    // The restarted daemon counts from the original pause, not from its own start.
    let w = warren_over(f.store.clone(), f.rt.clone(), f.clock.clone());
    w.recover().await.unwrap();
    f.clock.advance(Duration::from_secs(150));
    w.tick().await;
    assert_eq!(
        f.store.get(&rec.id).await.unwrap().unwrap().state,
        SandboxState::Paused
    );
    f.clock.advance(Duration::from_secs(60));
    w.tick().await;
    assert_eq!(
        f.store.get(&rec.id).await.unwrap().unwrap().state,
        SandboxState::Hibernated
    );

    // Resumed and paused again: a fresh clock.
    w.connect(&t1(), &rec.id, None).await.unwrap();
    assert_eq!(f.store.paused_at(&rec.id).await.unwrap(), None);
    w.pause(&t1(), &rec.id).await.unwrap();
    assert_eq!(
        f.store.paused_at(&rec.id).await.unwrap(),
        Some(f.clock.now())
    );
    f.clock.advance(Duration::from_secs(599));
    w.tick().await;
    assert_eq!(
        f.store.get(&rec.id).await.unwrap().unwrap().state,
        SandboxState::Paused
    );
}

#[tokio::test]
async fn recovery_makes_the_kernel_match_the_stored_state() {
    let f = fixture();
    let running = f.warren.create(&t1(), base()).await.unwrap();
    let paused = f.warren.create(&t1(), base()).await.unwrap();
    f.warren.pause(&t1(), &paused.id).await.unwrap();
    // A crash in the middle of a commit's freeze, and something thawing a paused sandbox.
    f.rt.freeze(&running.id).await.unwrap();
    f.rt.thaw(&paused.id).await.unwrap();
    drop(f.warren);

    let w = warren_over(f.store.clone(), f.rt.clone(), f.clock.clone());
    let report = w.recover().await.unwrap();
    assert_eq!(report.adopted.len(), 2);
    assert!(
        !f.rt.get(&running.id).unwrap().frozen,
        "a running sandbox runs"
    );
    assert!(
        f.rt.get(&paused.id).unwrap().frozen,
        "a paused sandbox stays frozen"
    );
}
