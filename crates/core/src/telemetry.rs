//! Prometheus metrics of the control plane (served on `/metrics` in the text format). Counters and
//! the histogram are updated where things happen; gauges that describe current state (sandboxes
//! and pool members by state) are recomputed from the store on each scrape, so they cannot drift.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TemplateLabel {
    pub template: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolStateLabel {
    pub pool: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabel {
    pub autoscaler: String,
    pub decision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub pool: String,
    pub result: String,
}

pub struct Metrics {
    registry: Registry,
    pub claims: Family<PoolLabel, Counter>,
    pub misses: Family<TemplateLabel, Counter>,
    pub claim_seconds: Family<PoolLabel, Histogram>,
    pub decisions: Family<DecisionLabel, Counter>,
    pub member_starts: Family<ResultLabel, Counter>,
    pub pool_members: Family<PoolStateLabel, Gauge>,
    pub pool_desired: Family<PoolLabel, Gauge>,
    pub sandboxes: Family<StateLabel, Gauge>,
}

fn claim_histogram() -> Histogram {
    // 0.25 ms … ~4 s.
    Histogram::new(exponential_buckets(0.00025, 2.0, 15))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("warren");
        let claims = Family::<PoolLabel, Counter>::default();
        let misses = Family::<TemplateLabel, Counter>::default();
        let claim_seconds =
            Family::<PoolLabel, Histogram>::new_with_constructor(claim_histogram as fn() -> _);
        let decisions = Family::<DecisionLabel, Counter>::default();
        let member_starts = Family::<ResultLabel, Counter>::default();
        let pool_members = Family::<PoolStateLabel, Gauge>::default();
        let pool_desired = Family::<PoolLabel, Gauge>::default();
        let sandboxes = Family::<StateLabel, Gauge>::default();
        registry.register(
            "pool_claims",
            "Creates served from a warm pool",
            claims.clone(),
        );
        registry.register(
            "pool_misses",
            "Creates for a pooled template that found the pool empty (cold fallbacks)",
            misses.clone(),
        );
        registry.register(
            "pool_claim_seconds",
            "Time to claim a pool member and hand it over (server side)",
            claim_seconds.clone(),
        );
        registry.register(
            "autoscaler_decisions",
            "PoolingAutoScaler scaling decisions",
            decisions.clone(),
        );
        registry.register(
            "pool_member_starts",
            "Pool members started, by result",
            member_starts.clone(),
        );
        registry.register(
            "pool_members",
            "Pool members by state (ready, starting, claimed, stale)",
            pool_members.clone(),
        );
        registry.register(
            "pool_desired_replicas",
            "Unclaimed members each pool aims for",
            pool_desired.clone(),
        );
        registry.register(
            "sandboxes",
            "Sandboxes by lifecycle state",
            sandboxes.clone(),
        );
        Metrics {
            registry,
            claims,
            misses,
            claim_seconds,
            decisions,
            member_starts,
            pool_members,
            pool_desired,
            sandboxes,
        }
    }
}

impl Metrics {
    /// The exposition in the text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
