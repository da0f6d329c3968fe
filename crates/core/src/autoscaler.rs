//! PoolingAutoScaler: sizes a SandboxSet from what its pool has been observed doing. Pure logic
//! over samples and an explicit `now`, so every rule is unit-tested without a clock or a runtime.
//!
//! Rules, in order:
//! 1. **Bounds.** `minReplicas`/`maxReplicas`, replaced while a `schedule` entry is in its
//!    `[startTime, endTime)` window and one of its `bounds` has a cron matching the current minute
//!    (the first such bound wins). A pool outside the bounds is moved inside at once.
//! 2. **Scale up fast.** When the latest sample has available / (available + claimed) below
//!    `minAvailableRatio`, or a create missed the pool since the previous sample, the pool grows to
//!    what keeps the ratio at the middle of the two watermarks for the peak demand of the window
//!    (claimed + misses), at least by one.
//! 3. **Never beyond members still starting.** No scale-up while any member is starting or the
//!    pool has not filled up to its current size: members that never become ready (a broken
//!    template, a full host) then cannot drive the pool up forever, which is the runaway of the
//!    Kubernetes implementation.
//! 4. **Scale down slowly.** Only when every sample of a full `observeWindowSeconds` is above
//!    `maxAvailableRatio` with no miss, and `cooldownSeconds` passed since the last scaling; down
//!    to the same middle-watermark size for the window's peak demand.

use crate::objects::AutoscalerPolicy;
use chrono::{DateTime, Timelike, Utc};
use serde::Serialize;
use std::collections::VecDeque;

/// What the pool looked like at one instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub at: DateTime<Utc>,
    /// Ready, unclaimed members.
    pub available: u32,
    /// Members handed to clients and still alive.
    pub claimed: u32,
    /// Members being created.
    pub starting: u32,
    /// Creates for the pool's template that found it empty, cumulative.
    pub misses: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Decision {
    ScaleUp,
    ScaleDown,
    Hold,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::ScaleUp => "scale_up",
            Decision::ScaleDown => "scale_down",
            Decision::Hold => "hold",
        }
    }
}

/// The autoscaler's status, as the API reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalerStatus {
    pub current_replicas: u32,
    pub desired_replicas: u32,
    pub last_decision: Decision,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<DateTime<Utc>>,
    /// The schedule bound in force (its cron), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_schedule: Option<String>,
    pub min_replicas: u32,
    pub max_replicas: u32,
}

/// The memory of one autoscaler between observations.
#[derive(Debug, Clone)]
pub struct Autoscaler {
    samples: VecDeque<Sample>,
    desired: u32,
    last_scale: Option<DateTime<Utc>>,
    pub status: AutoscalerStatus,
}

/// The bounds in force at `now`, and the cron of the schedule bound that set them.
pub fn bounds_at(policy: &AutoscalerPolicy, now: DateTime<Utc>) -> (u32, u32, Option<String>) {
    // Cron matches by the minute.
    let minute = now
        .with_second(0)
        .and_then(|t| t.with_nanosecond(0))
        .unwrap_or(now);
    for entry in &policy.schedule {
        if entry.start.is_some_and(|s| now < s) || entry.end.is_some_and(|e| now >= e) {
            continue;
        }
        for b in &entry.bounds {
            if b.cron.is_time_matching(&minute).unwrap_or(false) {
                return (b.min_replicas, b.max_replicas, Some(b.cron_text.clone()));
            }
        }
    }
    (policy.min_replicas, policy.max_replicas, None)
}

/// Available members that keep `available / (available + demand)` at `ratio`.
fn needed(ratio: f64, demand: u32, hi: u32) -> u32 {
    if ratio >= 1.0 {
        return if demand == 0 { 0 } else { hi };
    }
    (ratio * demand as f64 / (1.0 - ratio)).ceil() as u32
}

impl Autoscaler {
    /// Starts from the SandboxSet's own `replicas`, moved inside the bounds on first observation.
    pub fn new(initial: u32) -> Self {
        Autoscaler {
            samples: VecDeque::new(),
            desired: initial,
            last_scale: None,
            status: AutoscalerStatus {
                current_replicas: initial,
                desired_replicas: initial,
                last_decision: Decision::Hold,
                reason: "no observation yet".into(),
                last_scale_time: None,
                active_schedule: None,
                min_replicas: 0,
                max_replicas: 0,
            },
        }
    }

    /// The pool size the autoscaler currently wants.
    pub fn desired(&self) -> u32 {
        self.desired
    }

    /// Records a sample and decides. Returns the decision (also kept in [`Autoscaler::status`]).
    pub fn observe(&mut self, policy: &AutoscalerPolicy, s: Sample) -> Decision {
        let now = s.at;
        let previous_misses = self.samples.back().map(|p| p.misses);
        self.samples.push_back(s);
        while self
            .samples
            .front()
            .is_some_and(|f| f.at < now - policy.window)
        {
            self.samples.pop_front();
        }
        let current = self.desired;
        let (lo, hi, active) = bounds_at(policy, now);
        let (decision, desired, reason) = self.decide(policy, s, previous_misses, current, lo, hi);
        if desired != current {
            self.desired = desired;
            self.last_scale = Some(now);
        }
        self.status = AutoscalerStatus {
            current_replicas: current,
            desired_replicas: desired,
            last_decision: decision,
            reason,
            last_scale_time: self.last_scale,
            active_schedule: active,
            min_replicas: lo,
            max_replicas: hi,
        };
        decision
    }

    fn decide(
        &self,
        policy: &AutoscalerPolicy,
        s: Sample,
        previous_misses: Option<u64>,
        current: u32,
        lo: u32,
        hi: u32,
    ) -> (Decision, u32, String) {
        use Decision::*;
        if current < lo {
            return (ScaleUp, lo, format!("raised to minReplicas {lo}"));
        }
        if current > hi {
            return (ScaleDown, hi, format!("lowered to maxReplicas {hi}"));
        }
        let first = self.samples.front().copied().unwrap_or(s);
        let window_misses = s.misses.saturating_sub(first.misses) as u32;
        let peak_claimed = self.samples.iter().map(|x| x.claimed).max().unwrap_or(0);
        let demand = peak_claimed.saturating_add(window_misses);
        let mid = (policy.min_ratio + policy.max_ratio) / 2.0;
        let target = needed(mid, demand, hi).clamp(lo, hi);
        let ratio = |x: &Sample| {
            let total = x.available + x.claimed;
            if total == 0 {
                1.0
            } else {
                x.available as f64 / total as f64
            }
        };

        let new_misses = previous_misses.is_some_and(|p| s.misses > p);
        let low = ratio(&s) < policy.min_ratio;
        if low || new_misses {
            let why = if new_misses {
                format!(
                    "{} create(s) found the pool empty",
                    s.misses - previous_misses.unwrap_or(0)
                )
            } else {
                format!(
                    "available ratio {:.0}% is below {:.0}%",
                    ratio(&s) * 100.0,
                    policy.min_ratio * 100.0
                )
            };
            if s.starting > 0 || s.available < current {
                return (
                    Hold,
                    current,
                    format!(
                        "{why}, but the pool has not filled up yet ({} of {current} ready, {} still starting)",
                        s.available, s.starting
                    ),
                );
            }
            if current >= hi {
                return (
                    Hold,
                    current,
                    format!("{why}, but already at maxReplicas {hi}"),
                );
            }
            let up = target.max(current + 1).min(hi);
            return (ScaleUp, up, why);
        }

        let window_full = s.at - first.at >= policy.window;
        let all_high = self.samples.iter().all(|x| ratio(x) > policy.max_ratio);
        if all_high && window_full && window_misses == 0 && target < current {
            if self.last_scale.is_some_and(|t| s.at - t < policy.cooldown) {
                return (
                    Hold,
                    current,
                    "above maxAvailableRatio, cooling down".into(),
                );
            }
            return (
                ScaleDown,
                target,
                format!(
                    "available ratio above {:.0}% for the whole window",
                    policy.max_ratio * 100.0
                ),
            );
        }
        (Hold, current, "within watermarks".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::{PoolingAutoScaler, API_VERSION};
    use chrono::TimeZone;

    fn policy(extra: serde_json::Value) -> AutoscalerPolicy {
        let mut spec = serde_json::json!({
            "scaleTargetRef": {"kind": "SandboxSet", "name": "p"},
            "observeWindowSeconds": 60, "minReplicas": 2, "maxReplicas": 50,
            "minAvailableRatio": "20%", "maxAvailableRatio": "60%", "cooldownSeconds": 30,
        });
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        let obj: PoolingAutoScaler = serde_json::from_value(serde_json::json!({
            "apiVersion": API_VERSION, "kind": "PoolingAutoScaler",
            "metadata": {"name": "a"}, "spec": spec,
        }))
        .unwrap();
        obj.compile().unwrap()
    }

    /// A Monday, 10:00 UTC.
    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 23, 10, 0, 0).unwrap()
    }

    fn sample(
        at: DateTime<Utc>,
        available: u32,
        claimed: u32,
        starting: u32,
        misses: u64,
    ) -> Sample {
        Sample {
            at,
            available,
            claimed,
            starting,
            misses,
        }
    }

    fn secs(n: i64) -> chrono::Duration {
        chrono::Duration::seconds(n)
    }

    #[test]
    fn low_watermark_scales_up_to_the_middle_ratio() {
        let p = policy(serde_json::json!({}));
        let mut a = Autoscaler::new(10);
        // 1 available, 9 claimed: 10% < 20%, but the pool has not refilled to its 10 yet.
        assert_eq!(a.observe(&p, sample(t0(), 1, 9, 0, 0)), Decision::Hold);
        // Refilled, and 50 claimed: 10 / 60 < 20%. The middle ratio (40%) for a demand of 50
        // needs ceil(0.4 * 50 / 0.6) = 34 available.
        let d = a.observe(&p, sample(t0() + secs(1), 10, 50, 0, 0));
        assert_eq!(d, Decision::ScaleUp, "{:?}", a.status);
        assert_eq!(a.desired(), 34, "{:?}", a.status);
        // Exactly at the watermark is not below it.
        let mut b = Autoscaler::new(10);
        assert_eq!(b.observe(&p, sample(t0(), 10, 40, 0, 0)), Decision::Hold);
    }

    #[test]
    fn never_scales_up_while_members_are_starting() {
        let p = policy(serde_json::json!({}));
        let mut a = Autoscaler::new(10);
        // Members that never become ready: every sample shows them starting, forever.
        for i in 0..600 {
            let d = a.observe(&p, sample(t0() + secs(i), 0, 10, 10, 0));
            assert_eq!(d, Decision::Hold);
        }
        assert_eq!(a.desired(), 10);
        assert!(
            a.status.reason.contains("10 still starting"),
            "{}",
            a.status.reason
        );
    }

    #[test]
    fn misses_scale_up_and_count_as_demand() {
        let p = policy(serde_json::json!({}));
        let mut a = Autoscaler::new(2);
        a.observe(&p, sample(t0(), 2, 0, 0, 0));
        // 20 creates found the pool empty; the pool is full again (2 of 2 ready).
        let d = a.observe(&p, sample(t0() + secs(1), 2, 0, 0, 20));
        assert_eq!(d, Decision::ScaleUp);
        assert_eq!(a.desired(), 14, "ceil(0.4*20/0.6) = 14: {:?}", a.status);
    }

    #[test]
    fn scale_down_needs_a_full_high_window_and_the_cooldown() {
        let p = policy(serde_json::json!({}));
        let mut a = Autoscaler::new(20);
        // All available: ratio 100% > 60%, but the window is not full yet.
        for i in 0..60 {
            assert_eq!(
                a.observe(&p, sample(t0() + secs(i), 20, 0, 0, 0)),
                Decision::Hold
            );
        }
        assert_eq!(
            a.observe(&p, sample(t0() + secs(60), 20, 0, 0, 0)),
            Decision::ScaleDown
        );
        assert_eq!(a.desired(), 2, "down to minReplicas: {:?}", a.status);
    }

    #[test]
    fn cooldown_blocks_a_scale_down_right_after_a_scale_up() {
        let p = policy(serde_json::json!({"observeWindowSeconds": 5, "cooldownSeconds": 30}));
        let mut a = Autoscaler::new(4);
        a.observe(&p, sample(t0(), 4, 0, 0, 0));
        assert_eq!(
            a.observe(&p, sample(t0() + secs(1), 4, 0, 0, 6)),
            Decision::ScaleUp
        );
        let up = a.desired();
        // Demand vanishes; the window (5 s) fills with high samples quickly, the cooldown holds.
        for i in 2..31 {
            let d = a.observe(&p, sample(t0() + secs(i), up, 0, 0, 6));
            assert_ne!(d, Decision::ScaleDown, "at {i}s: {:?}", a.status);
        }
        assert_eq!(
            a.observe(&p, sample(t0() + secs(31), up, 0, 0, 6)),
            Decision::ScaleDown
        );
    }

    #[test]
    fn min_and_max_are_enforced() {
        let p = policy(serde_json::json!({"maxReplicas": 8}));
        let mut a = Autoscaler::new(0);
        assert_eq!(a.observe(&p, sample(t0(), 0, 0, 0, 0)), Decision::ScaleUp);
        assert_eq!(a.desired(), 2);
        let mut a = Autoscaler::new(100);
        assert_eq!(
            a.observe(&p, sample(t0(), 100, 0, 0, 0)),
            Decision::ScaleDown
        );
        assert_eq!(a.desired(), 8);
        // At the maximum, low ratio holds instead of growing.
        a.observe(&p, sample(t0() + secs(1), 1, 7, 0, 0));
        assert_eq!(
            a.observe(&p, sample(t0() + secs(2), 8, 40, 0, 0)),
            Decision::Hold
        );
        assert!(
            a.status.reason.contains("maxReplicas"),
            "{}",
            a.status.reason
        );
    }

    #[test]
    fn cron_window_crossing_midnight_on_weekdays() {
        // 22:00–05:59 on weekday nights: hours 22-23 Monday to Friday, and 0-5 Tuesday to Saturday
        // (the part after midnight belongs to the next day).
        let p = policy(serde_json::json!({"schedule": [
            {"startTime": "2026-11-1 00:00:00", "endTime": "2026-12-31 00:00:00", "bounds": [
                {"cron": "* 22-23 * * MON-FRI", "minReplicas": 20, "maxReplicas": 100},
                {"cron": "* 0-5 * * TUE-SAT", "minReplicas": 20, "maxReplicas": 100}
            ]}
        ]}));
        let at = |d: u32, h: u32, m: u32| Utc.with_ymd_and_hms(2026, 11, d, h, m, 0).unwrap();
        // Monday 23 Nov.
        assert_eq!(bounds_at(&p, at(23, 21, 59)).0, 2);
        assert_eq!(bounds_at(&p, at(23, 22, 0)).0, 20);
        assert_eq!(bounds_at(&p, at(23, 23, 59)).0, 20);
        assert_eq!(bounds_at(&p, at(24, 0, 0)).0, 20, "Tuesday after midnight");
        assert_eq!(bounds_at(&p, at(24, 5, 59)).0, 20);
        assert_eq!(bounds_at(&p, at(24, 6, 0)).0, 2);
        // Friday night runs into Saturday morning; Saturday night does not start a window.
        assert_eq!(bounds_at(&p, at(28, 3, 0)).0, 20, "Saturday 03:00");
        assert_eq!(bounds_at(&p, at(28, 22, 30)).0, 2, "Saturday 22:30");
        assert_eq!(bounds_at(&p, at(29, 1, 0)).0, 2, "Sunday 01:00");
        assert_eq!(bounds_at(&p, at(30, 1, 0)).0, 2, "Monday 01:00");
        // Outside [startTime, endTime) the schedule does not apply.
        let late = Utc.with_ymd_and_hms(2027, 1, 5, 23, 0, 0).unwrap();
        assert_eq!(bounds_at(&p, late).0, 2);

        // The autoscaler follows: entering the window raises the pool, leaving it lowers it.
        let mut a = Autoscaler::new(2);
        assert_eq!(
            a.observe(&p, sample(at(23, 21, 59), 2, 0, 0, 0)),
            Decision::Hold
        );
        assert_eq!(
            a.observe(&p, sample(at(23, 22, 0), 2, 0, 0, 0)),
            Decision::ScaleUp
        );
        assert_eq!(a.desired(), 20);
        assert_eq!(
            a.status.active_schedule.as_deref(),
            Some("* 22-23 * * MON-FRI")
        );
    }

    #[test]
    fn talk_cron_with_question_mark() {
        let p = policy(serde_json::json!({"schedule": [
            {"bounds": [{"cron": "* 0-8 ? * MON-FRI", "minReplicas": 10, "maxReplicas": 150}]}
        ]}));
        assert_eq!(
            bounds_at(&p, Utc.with_ymd_and_hms(2026, 11, 23, 8, 59, 30).unwrap()).0,
            10
        );
        assert_eq!(
            bounds_at(&p, Utc.with_ymd_and_hms(2026, 11, 23, 9, 0, 0).unwrap()).0,
            2
        );
        assert_eq!(
            bounds_at(&p, Utc.with_ymd_and_hms(2026, 11, 22, 3, 0, 0).unwrap()).0,
            2,
            "Sunday"
        );
    }
}
