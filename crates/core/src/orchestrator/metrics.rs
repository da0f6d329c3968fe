//! Resource metrics of running sandboxes: the daemon samples each one's cumulative usage
//! ([`warren_runtime::SandboxStats`]) every [`SAMPLE_EVERY`] and keeps the last
//! [`KEPT_SAMPLES`] points per sandbox in memory (E2B's `GET /sandboxes/{id}/metrics`). History
//! is lost on a daemon restart, which is acceptable for a monitoring series.

use super::Warren;
use crate::auth::Principal;
use crate::error::CoreError;
use crate::state::SandboxState;
use crate::store::SandboxRecord;
use chrono::{DateTime, Utc};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;
use warren_runtime::SandboxStats;

/// How often the background loop samples every running sandbox.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Points kept per sandbox (one hour at the default interval).
pub const KEPT_SAMPLES: usize = 720;

/// One point of E2B's `SandboxMetric`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MetricPoint {
    pub timestamp: DateTime<Utc>,
    pub cpu_count: u32,
    /// Share of the sandbox's vCPUs used since the previous point, 0–100.
    pub cpu_used_pct: f64,
    /// Memory in use without the page cache, bytes.
    pub mem_used: u64,
    /// The sandbox's memory limit, bytes.
    pub mem_total: u64,
    pub mem_cache: u64,
    pub disk_used: u64,
    pub disk_total: u64,
}

/// What a sandbox was given, for [`metric_point`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SandboxSize {
    pub cpu_count: u32,
    pub memory_mb: u64,
    /// 0 when uncapped (then `disk_total` is what the sandbox's file system reports).
    pub disk_mb: u64,
}

/// The point for cumulative `stats` sampled at `now`, with CPU averaged since `previous` (the
/// time and `cpu_usage_ns` of the last sample, or the sandbox's start and 0). Also what the
/// cluster API answers from a node agent's sample.
pub fn metric_point(
    now: DateTime<Utc>,
    previous: (DateTime<Utc>, u64),
    size: SandboxSize,
    stats: &SandboxStats,
) -> MetricPoint {
    let (since, used_before) = previous;
    let wall_ns = (now - since).num_nanoseconds().unwrap_or(0).max(0) as f64;
    let cpus = size.cpu_count.max(1) as f64;
    let used_ns = stats.cpu_usage_ns.saturating_sub(used_before) as f64;
    let pct = if wall_ns > 0.0 {
        (used_ns / (wall_ns * cpus) * 100.0).clamp(0.0, 100.0)
    } else {
        0.0
    };
    MetricPoint {
        timestamp: now,
        cpu_count: size.cpu_count,
        cpu_used_pct: (pct * 100.0).round() / 100.0,
        mem_used: stats.memory_bytes.saturating_sub(stats.memory_cache_bytes),
        mem_total: size.memory_mb * 1024 * 1024,
        mem_cache: stats.memory_cache_bytes,
        disk_used: stats.disk_bytes,
        // The sandbox's file system as it reports itself (what `df /` shows inside, a bit
        // under the cap: ext4 keeps its journal and tables); the recorded size otherwise.
        disk_total: match stats.disk_total_bytes {
            0 => size.disk_mb * 1024 * 1024,
            n => n,
        },
    }
}

#[derive(Default)]
struct Series {
    last: Option<(DateTime<Utc>, SandboxStats)>,
    points: VecDeque<MetricPoint>,
}

/// The ring buffers of every sandbox.
#[derive(Default)]
pub struct MetricsBook {
    series: Mutex<HashMap<String, Series>>,
    last_round: Mutex<Option<DateTime<Utc>>>,
}

impl MetricsBook {
    /// Adds a point computed from a new cumulative sample.
    fn record(&self, rec: &SandboxRecord, now: DateTime<Utc>, stats: SandboxStats) -> MetricPoint {
        let mut all = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let s = all.entry(rec.id.clone()).or_default();
        // The first point averages over the sandbox's whole life so far.
        let previous = s
            .last
            .map(|(t, st)| (t, st.cpu_usage_ns))
            .unwrap_or((rec.started_at, 0));
        let size = SandboxSize {
            cpu_count: rec.cpu_count,
            memory_mb: rec.memory_mb,
            disk_mb: rec.disk_mb,
        };
        let point = metric_point(now, previous, size, &stats);
        s.last = Some((now, stats));
        if s.points.len() == KEPT_SAMPLES {
            s.points.pop_front();
        }
        s.points.push_back(point);
        point
    }

    pub(crate) fn points(&self, id: &str) -> Vec<MetricPoint> {
        self.series
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .map(|s| s.points.iter().copied().collect())
            .unwrap_or_default()
    }

    fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.series
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, _| keep(id));
    }
}

impl Warren {
    /// Samples every running sandbox if [`SAMPLE_EVERY`] passed since the last round (called by
    /// the background loop each second), and forgets the series of sandboxes that are gone.
    pub async fn sample_metrics(&self) {
        let now = self.clock.now();
        {
            let mut last = self
                .metrics
                .last_round
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let due = last.is_none_or(|t| {
                (now - t).to_std().unwrap_or_default() + Duration::from_millis(50) >= SAMPLE_EVERY
            });
            if !due {
                return;
            }
            *last = Some(now);
        }
        let records = match self.store.list_all().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot list sandboxes");
                return;
            }
        };
        self.metrics.retain(|id| {
            records
                .iter()
                .any(|r| r.id == id && r.state.public().is_some())
        });
        for rec in records.iter().filter(|r| r.state == SandboxState::Running) {
            if let Ok(stats) = self.runtime.stats(&rec.id).await {
                self.metrics.record(rec, self.clock.now(), stats);
            }
        }
    }

    /// The sandbox's points with `start <= timestamp <= end` (unix seconds, both optional).
    /// A running sandbox with no point yet is sampled on the spot, so a fresh sandbox has one.
    pub async fn metrics(
        &self,
        who: &Principal,
        id: &str,
        start: Option<i64>,
        end: Option<i64>,
    ) -> Result<Vec<MetricPoint>, CoreError> {
        if let (Some(s), Some(e)) = (start, end) {
            if s > e {
                return Err(CoreError::InvalidArgument(format!(
                    "start ({s}) is after end ({e})"
                )));
            }
        }
        let rec = self.visible(who, id).await?;
        let mut points = self.metrics.points(id);
        if points.is_empty() && rec.state == SandboxState::Running {
            let stats = self.runtime.stats(id).await?;
            points.push(self.metrics.record(&rec, self.clock.now(), stats));
        }
        points.retain(|p| {
            let t = p.timestamp.timestamp();
            start.is_none_or(|s| t >= s) && end.is_none_or(|e| t <= e)
        });
        Ok(points)
    }
}
