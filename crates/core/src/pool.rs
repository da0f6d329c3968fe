//! Warm pools (SandboxSet): the in-memory side of pools and the refresher's planning logic.
//!
//! A pool keeps `replicas` unclaimed members (ready or starting) of one template. Members are
//! sandboxes in state `pooled`, invisible to every client until a create for the template claims
//! one (see [`crate::pool_store`] for the atomic claim and `orchestrator/pools.rs` for the claim
//! and the reconcile loop that drive this module).
//!
//! **Refresher.** Each member records the *revision* it was made from: a hash of the template's
//! resolved root filesystem (its layer paths and each layer directory's inode and mtime, so a
//! template directory replaced on disk counts as a change) and of the member-shaping fields of the
//! SandboxSet. When the revision changes, unclaimed members of the old revision are no longer
//! claimed and are replaced by a rolling update that keeps at most `updateStrategy.maxUnavailable`
//! of `replicas` missing at any time ([`plan`]).
//!
//! **Reuse.** A claimed member is never put back into the pool as is. Warren's honest "reset" is
//! a new sandbox: killing a claimed member destroys it (processes, upper dir, network namespace and
//! rules, tokens), and the pool refills with a fresh member, so nothing of the previous owner can
//! leak to the next one. `reusePolicy: Recycle` asks for that replacement at once (it is what the
//! refill does anyway), `Never` leaves sizing to the refill and the autoscaler.

use crate::autoscaler::Autoscaler;
use crate::envd_client::{EnvdClient, HttpEnvdClient};
use crate::objects::{AutoscalerPolicy, PoolingAutoScaler, SandboxSet};
use crate::telemetry::Metrics;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use warren_runtime::RootfsSpec;

/// What the pool holds right now, unclaimed members only.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolCounts {
    /// Ready members of the current revision (claimable), oldest first.
    pub ready_current: Vec<String>,
    /// Ready members of an older revision, oldest first.
    pub ready_stale: Vec<String>,
    /// Members being created (any revision).
    pub starting: u32,
}

/// What one reconcile pass does to a pool.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub create: u32,
    pub remove: Vec<String>,
}

/// The refresher and refill in one decision.
///
/// * Surplus (ready + starting above `replicas`): remove ready members, stale ones first.
/// * Rolling update: stale members are removed only while fewer than `max_unavailable` of the
///   `replicas` slots are without a ready member (a starting replacement counts as unavailable).
/// * Refill: create what is missing, with at most `max_starting` members starting at once.
pub fn plan(replicas: u32, max_unavailable: u32, max_starting: u32, c: &PoolCounts) -> Plan {
    let mut stale: Vec<String> = c.ready_stale.clone();
    let mut current: Vec<String> = c.ready_current.clone();
    let mut remove = vec![];
    let total = |stale: &Vec<String>, current: &Vec<String>| {
        (stale.len() + current.len()) as u32 + c.starting
    };
    // Surplus: stale first, then the newest current members (the oldest stay, they are claimed
    // first).
    while total(&stale, &current) > replicas {
        if let Some(id) = stale.pop() {
            remove.push(id);
        } else if let Some(id) = current.pop() {
            remove.push(id);
        } else {
            break;
        }
    }
    // Rolling update within the unavailability budget.
    let ready = (stale.len() + current.len()) as u32;
    let unavailable = replicas.saturating_sub(ready);
    let budget = max_unavailable.saturating_sub(unavailable) as usize;
    let n = budget.min(stale.len());
    // Oldest stale members go first.
    remove.extend(stale.drain(..n));
    let have = total(&stale, &current);
    let missing = replicas.saturating_sub(have);
    let create = missing.min(max_starting.saturating_sub(c.starting));
    Plan { create, remove }
}

/// The revision of members a set makes now; see the module docs.
pub fn revision(set: &SandboxSet, rootfs: &RootfsSpec) -> String {
    let mut h = Sha256::new();
    h.update(set.spec.template.as_bytes());
    h.update([0, set.spec.allow_internet_access as u8]);
    h.update(serde_json::to_vec(rootfs).unwrap_or_default());
    for dir in &rootfs.lower_dirs {
        use std::os::unix::fs::MetadataExt;
        if let Ok(m) = std::fs::metadata(dir) {
            h.update(m.dev().to_le_bytes());
            h.update(m.ino().to_le_bytes());
            h.update(m.mtime().to_le_bytes());
            h.update(m.mtime_nsec().to_le_bytes());
        }
    }
    let digest = h.finalize();
    digest[..6].iter().map(|b| format!("{b:02x}")).collect()
}

/// One SandboxSet as the daemon holds it.
#[derive(Debug, Clone)]
pub(crate) struct SetEntry {
    pub object: SandboxSet,
    /// The revision members are made from now (recomputed each reconcile).
    pub revision: String,
}

pub(crate) struct ScalerEntry {
    pub object: PoolingAutoScaler,
    pub policy: AutoscalerPolicy,
    pub state: Autoscaler,
}

/// Status of one pool, for `warren pool list`, the SandboxSet status and the metrics.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolStatus {
    pub name: String,
    pub template: String,
    /// Unclaimed members the pool aims for (the autoscaler's choice when one targets it).
    pub replicas: u32,
    /// Ready, unclaimed members of the current revision.
    pub available_replicas: u32,
    pub starting_replicas: u32,
    /// Ready, unclaimed members of an older revision, being replaced.
    pub stale_replicas: u32,
    pub claimed_replicas: u32,
    pub update_revision: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub autoscaler: Option<String>,
}

/// Daemon-wide pool state held by [`crate::Warren`].
pub(crate) struct Pools {
    pub sets: RwLock<BTreeMap<String, SetEntry>>,
    pub scalers: Mutex<BTreeMap<String, ScalerEntry>>,
    pub envd: RwLock<Arc<dyn EnvdClient>>,
    /// Caps runtime creates of pool members across all pools (each one costs CPU on the host).
    pub starts: Arc<tokio::sync::Semaphore>,
    /// Wakes the reconcile loop early (after a claim, an apply, a failed start).
    pub wake: tokio::sync::Notify,
    /// Per pool: consecutive start failures and when starting may resume.
    pub backoff: Mutex<HashMap<String, (u32, chrono::DateTime<chrono::Utc>)>>,
    /// Per pool: cumulative misses (creates that found it empty), for the autoscaler.
    pub misses: Mutex<HashMap<String, u64>>,
    /// Background member starts and removals, so tests (and shutdown) can wait for them.
    pub inflight: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    pub metrics: Metrics,
    /// Serialises reconcile passes (the loop, tests and applies may all ask for one).
    pub reconciling: tokio::sync::Mutex<()>,
}

/// Runtime creates of pool members in flight at once, across pools. Two per core keeps a 2-core
/// host busy without starving the API.
fn start_concurrency() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() * 2)
        .unwrap_or(4)
}

impl Default for Pools {
    fn default() -> Self {
        Pools {
            sets: RwLock::default(),
            scalers: Mutex::default(),
            envd: RwLock::new(Arc::new(HttpEnvdClient::default())),
            starts: Arc::new(tokio::sync::Semaphore::new(start_concurrency())),
            wake: tokio::sync::Notify::new(),
            backoff: Mutex::default(),
            misses: Mutex::default(),
            inflight: Mutex::default(),
            metrics: Metrics::default(),
            reconciling: tokio::sync::Mutex::new(()),
        }
    }
}

impl Pools {
    /// The SandboxSets, for reading. A panic while the lock was held poisons it but leaves the
    /// map consistent (every writer replaces whole entries), so poisoning is ignored.
    pub fn sets(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, SetEntry>> {
        self.sets.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The SandboxSets, for writing (see [`Pools::sets`] on poisoning).
    pub fn sets_mut(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, SetEntry>> {
        self.sets.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The pool serving creates of `template`: (name, current revision, internet access).
    pub fn for_template(&self, template: &str) -> Option<(String, String, bool)> {
        self.sets()
            .values()
            .find(|e| e.object.spec.template == template)
            .map(|e| {
                (
                    e.object.metadata.name.clone(),
                    e.revision.clone(),
                    e.object.spec.allow_internet_access,
                )
            })
    }

    pub fn count_miss(&self, pool: &str, template: &str) {
        *self
            .misses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(pool.to_string())
            .or_default() += 1;
        self.metrics
            .misses
            .get_or_create(&crate::telemetry::TemplateLabel {
                template: template.to_string(),
            })
            .inc();
    }

    pub fn misses_of(&self, pool: &str) -> u64 {
        self.misses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(pool)
            .copied()
            .unwrap_or(0)
    }

    pub fn track(&self, task: tokio::task::JoinHandle<()>) {
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        inflight.retain(|t| !t.is_finished());
        inflight.push(task);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i}")).collect()
    }

    fn counts(current: usize, stale: usize, starting: u32) -> PoolCounts {
        PoolCounts {
            ready_current: ids("c", current),
            ready_stale: ids("s", stale),
            starting,
        }
    }

    #[test]
    fn refill_is_capped_by_concurrent_starts() {
        assert_eq!(
            plan(10, 2, 4, &counts(0, 0, 0)),
            Plan {
                create: 4,
                remove: vec![]
            }
        );
        assert_eq!(
            plan(10, 2, 4, &counts(3, 0, 4)),
            Plan {
                create: 0,
                remove: vec![]
            }
        );
        assert_eq!(
            plan(10, 2, 4, &counts(3, 0, 2)),
            Plan {
                create: 2,
                remove: vec![]
            }
        );
        assert_eq!(plan(10, 2, 4, &counts(10, 0, 0)), Plan::default());
    }

    #[test]
    fn surplus_removes_stale_then_newest() {
        let p = plan(3, 1, 4, &counts(4, 2, 0));
        assert_eq!(p.remove, vec!["s1", "s0", "c3"]);
        assert_eq!(p.create, 0);
        // Starting members count toward replicas but are not removed.
        let p = plan(2, 1, 4, &counts(1, 0, 3));
        assert_eq!(p.remove, vec!["c0"]);
    }

    #[test]
    fn rolling_update_honours_max_unavailable_until_all_are_replaced() {
        // Simulate passes: removed stale members are replaced by starting ones that become ready
        // (current) on the next pass. At no time are more than 2 of 10 slots without a ready member.
        let (replicas, max_unavailable) = (10u32, 2u32);
        let mut c = counts(0, 10, 0);
        let mut next = 0;
        for _pass in 0..20 {
            let p = plan(replicas, max_unavailable, 8, &c);
            c.ready_stale.retain(|id| !p.remove.contains(id));
            c.ready_current.retain(|id| !p.remove.contains(id));
            let ready = (c.ready_stale.len() + c.ready_current.len()) as u32;
            assert!(replicas - ready <= max_unavailable, "{c:?}");
            // Starts complete before the next pass.
            for _ in 0..(c.starting + p.create) {
                c.ready_current.push(format!("n{next}"));
                next += 1;
            }
            c.starting = 0;
            if c.ready_stale.is_empty() && c.ready_current.len() == 10 {
                break;
            }
        }
        assert!(c.ready_stale.is_empty(), "every stale member was replaced");
        assert_eq!(c.ready_current.len(), 10);
        assert_eq!(next, 10, "one replacement per stale member");
    }

    #[test]
    fn stale_members_are_not_removed_while_replacements_start() {
        // 2 replacements are starting: the budget of 2 is used up.
        let p = plan(10, 2, 8, &counts(0, 8, 2));
        assert_eq!(p, Plan::default());
    }
}
