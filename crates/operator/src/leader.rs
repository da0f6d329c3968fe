//! Leader election for several operator replicas: one `coordination.k8s.io/v1` Lease, held and
//! renewed by `kube-lease-manager` (server-side apply on the Lease; kube-runtime 5 has no lease
//! module). Only the holder reconciles. A replica that loses the lease stops at once and exits
//! non-zero, so that Kubernetes restarts it as a fresh candidate instead of two replicas acting on
//! stale caches.

use crate::controller::{self, Context};
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use std::future::Future;
use std::sync::Arc;
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Lease name (default `warren-operator`).
    pub name: String,
    /// Namespace of the Lease: the operator's own.
    pub namespace: String,
    /// This replica's identity: its Pod name.
    pub identity: String,
    /// A lease not renewed for this long may be taken over.
    pub duration_secs: u64,
    /// Renewal happens this long before expiry.
    pub grace_secs: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lease {namespace}/{name}: {source}")]
    Lease {
        name: String,
        namespace: String,
        #[source]
        source: LeaseManagerError,
    },
    #[error("lost the lease; stopping so that only one replica reconciles")]
    Lost,
    #[error("the lease manager stopped")]
    ManagerGone,
}

/// Waits until `leader` says true, then runs `work` until it ends (`Ok`) or leadership is lost
/// (`Err(Lost)`; `work` is dropped at once).
pub async fn lead<W: Future<Output = ()>>(
    mut leader: watch::Receiver<bool>,
    work: W,
) -> Result<(), LeaderError> {
    while !*leader.borrow_and_update() {
        leader
            .changed()
            .await
            .map_err(|_| LeaderError::ManagerGone)?;
    }
    tracing::info!("holding the lease: reconciling");
    let lost = async {
        loop {
            if leader.changed().await.is_err() {
                return LeaderError::ManagerGone;
            }
            if !*leader.borrow_and_update() {
                return LeaderError::Lost;
            }
        }
    };
    tokio::select! {
        () = work => Ok(()),
        e = lost => Err(e),
    }
}

/// Runs the controllers while this replica holds the lease.
pub async fn run_as_leader(
    ctx: Arc<Context>,
    watch_namespace: Option<&str>,
    lease: &LeaseConfig,
) -> Result<(), LeaderError> {
    let err = |source| LeaderError::Lease {
        name: lease.name.clone(),
        namespace: lease.namespace.clone(),
        source,
    };
    let manager = LeaseManagerBuilder::new(ctx.client.clone(), &lease.name)
        .with_namespace(&lease.namespace)
        .with_identity(&lease.identity)
        .with_duration(lease.duration_secs)
        .with_grace(lease.grace_secs)
        .with_field_manager(crate::FIELD_MANAGER)
        .build()
        .await
        .map_err(err)?;
    tracing::info!(lease = %lease.name, identity = %lease.identity, "waiting for the lease");
    let (leader, handle) = manager.watch().await;
    let res = lead(leader, controller::run(ctx, watch_namespace)).await;
    // Dropping the receiver (inside `lead`) makes the manager release the lease, so a successor
    // need not wait for it to expire.
    let _ = handle.await;
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn works_only_while_leading() {
        let (tx, rx) = watch::channel(false);
        let started = Arc::new(AtomicBool::new(false));
        let s = started.clone();
        let task = tokio::spawn(lead(rx, async move {
            s.store(true, Ordering::SeqCst);
            std::future::pending::<()>().await
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!started.load(Ordering::SeqCst), "worked without the lease");
        tx.send(true).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            started.load(Ordering::SeqCst),
            "did not work with the lease"
        );
        tx.send(false).unwrap();
        let res = tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("kept working after losing the lease")
            .unwrap();
        assert!(matches!(res, Err(LeaderError::Lost)), "{res:?}");
    }

    #[tokio::test]
    async fn finished_work_is_ok_and_a_dead_manager_is_an_error() {
        let (tx, rx) = watch::channel(true);
        assert!(lead(rx, async {}).await.is_ok());
        drop(tx);
        let (tx, rx) = watch::channel(false);
        drop(tx);
        assert!(matches!(
            lead(rx, async {}).await,
            Err(LeaderError::ManagerGone)
        ));
    }
}
