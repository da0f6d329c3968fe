//! Network updates and metrics sampling over FakeRuntime with a manual clock.

use super::*;
use crate::{NetworkRequest, NetworkUpdate};
use warren_runtime::SandboxStats;

#[tokio::test]
async fn network_rules_reach_the_runtime_and_the_record() {
    let f = fixture();
    let mut req = base();
    req.network = NetworkRequest {
        allow_out: vec!["1.2.3.4".into()],
        deny_out: vec!["0.0.0.0/0".into()],
        allow_public_traffic: Some(false),
    };
    let rec = f.warren.create(&t1(), req).await.unwrap();
    let net = &f.rt.get(&rec.id).unwrap().spec.network;
    assert_eq!(net.egress.allow_out[0].to_string(), "1.2.3.4/32");
    assert!(!net.allow_public_traffic);
    assert!(f.warren.traffic_token(&rec.id).is_some());

    let update = NetworkUpdate {
        allow_internet: Some(false),
        allow_out: vec!["10.0.0.0/8".into()],
        deny_out: vec![],
    };
    f.warren
        .update_network(&t1(), &rec.id, update)
        .await
        .unwrap();
    let net = f.rt.get(&rec.id).unwrap().spec.network;
    assert!(!net.allow_internet && net.egress.deny_out.is_empty());
    assert!(!net.allow_public_traffic, "an update keeps private traffic");
    let stored = f.store.get(&rec.id).await.unwrap().unwrap();
    assert_eq!(stored.spec.network, net);
    assert!(!stored.allow_internet);

    // Paused sandboxes take updates too; other teams and bad entries do not.
    f.warren.pause(&t1(), &rec.id).await.unwrap();
    f.warren
        .update_network(&t1(), &rec.id, NetworkUpdate::default())
        .await
        .unwrap();
    assert!(f.rt.get(&rec.id).unwrap().spec.network.allow_internet);
    let err = f
        .warren
        .update_network(&t2(), &rec.id, NetworkUpdate::default())
        .await;
    assert!(matches!(err, Err(CoreError::NotFound(_))));
    let bad = NetworkUpdate {
        deny_out: vec!["not-an-ip".into()],
        ..Default::default()
    };
    let err = f.warren.update_network(&t1(), &rec.id, bad).await;
    assert!(matches!(err, Err(CoreError::InvalidArgument(_))));
    assert!(
        f.warren.traffic_token(&rec.id).is_none(),
        "paused: not routed"
    );
}

#[tokio::test]
async fn metrics_are_sampled_into_a_ring_with_cpu_share() {
    let f = fixture();
    let rec = f.warren.create(&t1(), base()).await.unwrap();
    f.clock.advance(Duration::from_secs(10));
    // One vCPU-second used in 10 s on 2 vCPUs: 5 %.
    f.rt.set_stats(
        &rec.id,
        SandboxStats {
            cpu_usage_ns: 1_000_000_000,
            memory_bytes: 100 << 20,
            memory_cache_bytes: 30 << 20,
            disk_bytes: 4096,
            disk_total_bytes: 0,
        },
    );
    f.warren.sample_metrics().await;
    // Not due again within the interval.
    f.clock.advance(Duration::from_secs(1));
    f.warren.sample_metrics().await;
    f.clock.advance(metrics::SAMPLE_EVERY);
    f.rt.set_stats(
        &rec.id,
        SandboxStats {
            cpu_usage_ns: 1_000_000_000 + 12 * 100_000_000, // 1.2 s more in 6 s on 2 vCPUs
            memory_bytes: 100 << 20,
            memory_cache_bytes: 30 << 20,
            disk_bytes: 8192,
            disk_total_bytes: 1000 << 20,
        },
    );
    f.warren.sample_metrics().await;
    let points = f.warren.metrics(&t1(), &rec.id, None, None).await.unwrap();
    assert_eq!(points.len(), 2);
    assert_eq!(points[0].cpu_used_pct, 5.0);
    assert_eq!(points[1].cpu_used_pct, 10.0);
    assert_eq!(points[0].mem_used, 70 << 20);
    assert_eq!(points[0].mem_cache, 30 << 20);
    assert_eq!(points[1].disk_used, 8192);
    // Without a disk of its own the recorded size; with one, what its file system reports.
    assert_eq!(points[0].disk_total, 1024 << 20);
    assert_eq!(points[1].disk_total, 1000 << 20);
    assert_eq!(points[0].mem_total, 512 << 20);
    let t = points[1].timestamp.timestamp();
    let only_last = f
        .warren
        .metrics(&t1(), &rec.id, Some(t), Some(t))
        .await
        .unwrap();
    assert_eq!(only_last.len(), 1);

    // Killed sandboxes lose their series at the next round.
    f.warren.kill(&t1(), &rec.id).await.unwrap();
    f.clock.advance(metrics::SAMPLE_EVERY);
    f.warren.sample_metrics().await;
    assert!(f.warren.metrics.points(&rec.id).is_empty());
}
