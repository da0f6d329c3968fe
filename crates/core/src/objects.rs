//! The declarative objects of warm pools, in the talk's Kubernetes shape (`apiVersion`, `kind`,
//! `metadata`, `spec`): what `warren apply -f` sends, what the REST API stores and returns, and what
//! a Kubernetes operator will reconcile later. Parsing is serde; [`SandboxSet::validate`] and
//! [`PoolingAutoScaler::compile`] turn a parsed object into checked values or a message that names
//! the offending field.

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::str::FromStr;

/// The API group Warren writes; the talk's group is accepted too, so its YAML applies unchanged.
pub const API_VERSION: &str = "warren.dev/v1alpha1";
const ACCEPTED_API_VERSIONS: [&str; 2] = [API_VERSION, "agents.kruise.io/v1alpha1"];

pub const KIND_SANDBOX_SET: &str = "SandboxSet";
pub const KIND_AUTOSCALER: &str = "PoolingAutoScaler";

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ObjectError(pub String);

fn invalid(msg: impl Into<String>) -> ObjectError {
    ObjectError(msg.into())
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Accepted for Kubernetes compatibility; Warren has one namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// An absolute count or a percentage of a total (`3` or `"20%"`), as Kubernetes' IntOrString.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IntOrPercent {
    Int(u32),
    Percent(String),
}

impl IntOrPercent {
    /// Resolves against `total`; percentages round down but never below 1, so an update or a
    /// scale-up always makes progress.
    pub fn resolve(&self, field: &str, total: u32) -> Result<u32, ObjectError> {
        match self {
            IntOrPercent::Int(n) => Ok((*n).max(1)),
            IntOrPercent::Percent(s) => {
                let p = parse_percent(field, s)?;
                Ok(((total as f64 * p).floor() as u32).max(1))
            }
        }
    }
}

fn parse_percent(field: &str, s: &str) -> Result<f64, ObjectError> {
    let bad = || invalid(format!("{field}: {s:?} is not a percentage like \"20%\""));
    let n: f64 = s
        .trim()
        .strip_suffix('%')
        .ok_or_else(bad)?
        .trim()
        .parse()
        .map_err(|_| bad())?;
    if !(0.0..=100.0).contains(&n) {
        return Err(invalid(format!("{field}: {s} is outside 0%–100%")));
    }
    Ok(n / 100.0)
}

/// A ratio as written in YAML: `"20%"` or a fraction `0.2`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RatioValue {
    Fraction(f64),
    Percent(String),
}

impl RatioValue {
    pub fn fraction(&self, field: &str) -> Result<f64, ObjectError> {
        match self {
            RatioValue::Percent(s) => parse_percent(field, s),
            RatioValue::Fraction(f) if (0.0..=1.0).contains(f) => Ok(*f),
            RatioValue::Fraction(f) => Err(invalid(format!(
                "{field}: {f} is outside 0–1 (write a percentage as a string, e.g. \"20%\")"
            ))),
        }
    }
}

/// What happens to a claimed member when its owner kills it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReusePolicy {
    /// The sandbox is destroyed; the pool refills with a new one.
    #[default]
    Never,
    /// The pool gets a replacement right away. The reset is a full one, honestly: the sandbox is
    /// destroyed (every process, its upper dir, its network namespace and rules, its tokens) and a
    /// fresh member takes its place, so nothing of the previous owner can survive.
    Recycle,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Strategy {
    pub max_unavailable: IntOrPercent,
}

fn default_update_strategy() -> Strategy {
    Strategy {
        max_unavailable: IntOrPercent::Percent("20%".into()),
    }
}

fn default_scale_strategy() -> Strategy {
    Strategy {
        max_unavailable: IntOrPercent::Int(8),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SandboxSetSpec {
    /// Unclaimed members to keep, ready or starting (overridden by a PoolingAutoScaler).
    pub replicas: u32,
    /// The Warren template (the E2B `templateID`) of the members; creates for it claim from here.
    pub template: String,
    #[serde(default)]
    pub reuse_policy: ReusePolicy,
    /// Rolling update of unclaimed members when the template changes: how many of `replicas`
    /// may be missing at once (default 20%).
    #[serde(default = "default_update_strategy")]
    pub update_strategy: Strategy,
    /// How many members of this pool may be starting at once (default 8).
    #[serde(default = "default_scale_strategy")]
    pub scale_strategy: Strategy,
    /// Members' internet access; only creates asking for the same are served from the pool.
    #[serde(default = "yes")]
    pub allow_internet_access: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SandboxSet {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: SandboxSetSpec,
}

/// Whether `v` is an apiVersion Warren's objects accept.
pub fn accepted_api_version(v: &str) -> bool {
    ACCEPTED_API_VERSIONS.contains(&v)
}

/// Checks an object's `kind` (is `want`) and `apiVersion` (one Warren accepts).
pub(crate) fn check_kind_and_version(
    api_version: &str,
    kind: &str,
    want: &str,
) -> Result<(), ObjectError> {
    if kind != want {
        return Err(invalid(format!("kind is {kind:?}, expected {want:?}")));
    }
    if !accepted_api_version(api_version) {
        return Err(invalid(format!(
            "apiVersion {api_version:?} is not supported (use {API_VERSION})"
        )));
    }
    Ok(())
}

fn check_header(
    api_version: &str,
    kind: &str,
    want: &str,
    meta: &ObjectMeta,
) -> Result<(), ObjectError> {
    check_kind_and_version(api_version, kind, want)?;
    let name = &meta.name;
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !ok {
        return Err(invalid(format!(
            "metadata.name {name:?} must be 1–63 characters of a-z, 0-9 and '-'"
        )));
    }
    Ok(())
}

impl SandboxSet {
    /// Checks everything that does not need the daemon (template existence is checked there).
    pub fn validate(&self) -> Result<(), ObjectError> {
        check_header(
            &self.api_version,
            &self.kind,
            KIND_SANDBOX_SET,
            &self.metadata,
        )?;
        if self.spec.template.is_empty() {
            return Err(invalid("spec.template is required"));
        }
        self.spec
            .update_strategy
            .max_unavailable
            .resolve("spec.updateStrategy.maxUnavailable", self.spec.replicas)?;
        self.spec
            .scale_strategy
            .max_unavailable
            .resolve("spec.scaleStrategy.maxUnavailable", self.spec.replicas)?;
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScaleTargetRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    pub kind: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScheduleBound {
    /// 5-field cron (minute hour day-of-month month day-of-week; `?` allowed), evaluated in UTC.
    pub cron: String,
    pub min_replicas: u32,
    pub max_replicas: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScheduleEntry {
    /// UTC, `2025-12-1 00:00:00` or RFC 3339; the entry applies from then on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// UTC; the entry applies until then (exclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<String>,
    pub bounds: Vec<ScheduleBound>,
}

fn default_window() -> u64 {
    60
}

fn default_cooldown() -> u64 {
    60
}

fn default_min_ratio() -> RatioValue {
    RatioValue::Percent("20%".into())
}

fn default_max_ratio() -> RatioValue {
    RatioValue::Percent("90%".into())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolingAutoScalerSpec {
    pub scale_target_ref: ScaleTargetRef,
    /// Scale-down looks at this many seconds of history (scale-up reacts at once).
    #[serde(default = "default_window")]
    pub observe_window_seconds: u64,
    #[serde(default)]
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Below this share of available (unclaimed, ready) among available + claimed: scale up.
    #[serde(default = "default_min_ratio")]
    pub min_available_ratio: RatioValue,
    /// Above it for a whole window: scale down.
    #[serde(default = "default_max_ratio")]
    pub max_available_ratio: RatioValue,
    /// Warren extension: no scale-down sooner than this after any scaling.
    #[serde(default = "default_cooldown")]
    pub cooldown_seconds: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedule: Vec<ScheduleEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolingAutoScaler {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: PoolingAutoScalerSpec,
}

/// One compiled schedule bound.
#[derive(Debug, Clone)]
pub struct CompiledBound {
    pub cron: croner::Cron,
    pub cron_text: String,
    pub min_replicas: u32,
    pub max_replicas: u32,
}

#[derive(Debug, Clone)]
pub struct CompiledEntry {
    pub start: Option<DateTime<Utc>>,
    pub end: Option<DateTime<Utc>>,
    pub bounds: Vec<CompiledBound>,
}

/// A validated autoscaler spec, ready for [`crate::autoscaler`].
#[derive(Debug, Clone)]
pub struct AutoscalerPolicy {
    pub target: String,
    pub window: chrono::Duration,
    pub min_replicas: u32,
    pub max_replicas: u32,
    pub min_ratio: f64,
    pub max_ratio: f64,
    pub cooldown: chrono::Duration,
    pub schedule: Vec<CompiledEntry>,
}

/// Parses `2025-12-1 00:00:00` (the talk's format, UTC) or RFC 3339.
pub fn parse_time(field: &str, s: &str) -> Result<DateTime<Utc>, ObjectError> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    for fmt in ["%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, fmt) {
            return Ok(Utc.from_utc_datetime(&t));
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).expect("midnight")));
    }
    Err(invalid(format!(
        "{field}: {s:?} is not a time like \"2025-12-01 00:00:00\" (UTC) or RFC 3339"
    )))
}

fn check_bounds(field: &str, min: u32, max: u32) -> Result<(), ObjectError> {
    if min > max {
        return Err(invalid(format!(
            "{field}: minReplicas ({min}) is greater than maxReplicas ({max})"
        )));
    }
    Ok(())
}

impl PoolingAutoScaler {
    pub fn compile(&self) -> Result<AutoscalerPolicy, ObjectError> {
        check_header(
            &self.api_version,
            &self.kind,
            KIND_AUTOSCALER,
            &self.metadata,
        )?;
        let s = &self.spec;
        if !s
            .scale_target_ref
            .kind
            .eq_ignore_ascii_case(KIND_SANDBOX_SET)
        {
            return Err(invalid(format!(
                "spec.scaleTargetRef.kind is {:?}; only SandboxSet can be scaled",
                s.scale_target_ref.kind
            )));
        }
        if s.scale_target_ref.name.is_empty() {
            return Err(invalid("spec.scaleTargetRef.name is required"));
        }
        check_bounds("spec", s.min_replicas, s.max_replicas)?;
        let min_ratio = s.min_available_ratio.fraction("spec.minAvailableRatio")?;
        let max_ratio = s.max_available_ratio.fraction("spec.maxAvailableRatio")?;
        if min_ratio > max_ratio {
            return Err(invalid(
                "spec.minAvailableRatio is greater than spec.maxAvailableRatio",
            ));
        }
        if s.observe_window_seconds == 0 || s.observe_window_seconds > 7 * 24 * 3600 {
            return Err(invalid(
                "spec.observeWindowSeconds must be between 1 and 604800",
            ));
        }
        let mut schedule = vec![];
        for (i, e) in s.schedule.iter().enumerate() {
            let field = format!("spec.schedule[{i}]");
            let start = e
                .start_time
                .as_deref()
                .map(|t| parse_time(&format!("{field}.startTime"), t))
                .transpose()?;
            let end = e
                .end_time
                .as_deref()
                .map(|t| parse_time(&format!("{field}.endTime"), t))
                .transpose()?;
            if let (Some(a), Some(b)) = (start, end) {
                if a >= b {
                    return Err(invalid(format!("{field}: startTime is not before endTime")));
                }
            }
            if e.bounds.is_empty() {
                return Err(invalid(format!("{field}.bounds is empty")));
            }
            let mut bounds = vec![];
            for (j, b) in e.bounds.iter().enumerate() {
                let bf = format!("{field}.bounds[{j}]");
                check_bounds(&bf, b.min_replicas, b.max_replicas)?;
                let cron = croner::Cron::from_str(&b.cron)
                    .map_err(|err| invalid(format!("{bf}.cron {:?} is invalid: {err}", b.cron)))?;
                bounds.push(CompiledBound {
                    cron,
                    cron_text: b.cron.clone(),
                    min_replicas: b.min_replicas,
                    max_replicas: b.max_replicas,
                });
            }
            schedule.push(CompiledEntry { start, end, bounds });
        }
        Ok(AutoscalerPolicy {
            target: s.scale_target_ref.name.clone(),
            window: chrono::Duration::seconds(s.observe_window_seconds as i64),
            min_replicas: s.min_replicas,
            max_replicas: s.max_replicas,
            min_ratio,
            max_ratio,
            cooldown: chrono::Duration::seconds(s.cooldown_seconds.min(7 * 24 * 3600) as i64),
            schedule,
        })
    }
}

/// One document of a manifest (`warren apply -f`): the REST collection of its kind, its name and
/// the object as it was written (the daemon parses and validates it as that kind).
#[derive(Debug, Clone, PartialEq)]
pub struct ManifestObject {
    pub collection: &'static str,
    pub name: String,
    pub doc: serde_json::Value,
}

/// The REST collection (`/warren/v1/<collection>`) of each kind a manifest may hold.
pub fn manifest_collection(kind: &str) -> Option<&'static str> {
    match kind {
        KIND_SANDBOX_SET => Some("sandboxsets"),
        KIND_AUTOSCALER => Some("poolingautoscalers"),
        "Commit" => Some("commits"),
        "Checkpoint" => Some("checkpoints"),
        "Template" => Some("templates"),
        _ => None,
    }
}

/// Reads a YAML manifest (several documents separated by `---`) only as far as routing needs:
/// each document's kind and `metadata.name`. Empty documents (a trailing `---`) are skipped; a
/// manifest with no object is an error, as is any document that cannot be routed.
pub fn parse_manifest(text: &str) -> Result<Vec<ManifestObject>, ObjectError> {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(text).map_err(|e| invalid(format!("invalid YAML: {e}")))?;
    let mut out = vec![];
    for (i, doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        let n = i + 1;
        let kind = doc["kind"].as_str().unwrap_or_default();
        let collection = manifest_collection(kind).ok_or_else(|| {
            invalid(format!(
                "document {n}: unknown kind {kind:?} (expected SandboxSet, PoolingAutoScaler, \
                 Commit, Checkpoint or Template)"
            ))
        })?;
        let name = doc
            .pointer("/metadata/name")
            .and_then(serde_json::Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| invalid(format!("document {n}: metadata.name is required")))?
            .to_string();
        out.push(ManifestObject {
            collection,
            name,
            doc,
        });
    }
    if out.is_empty() {
        return Err(invalid("no objects found"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TALK_AUTOSCALER: &str = r#"{
        "apiVersion": "agents.kruise.io/v1alpha1",
        "kind": "PoolingAutoScaler",
        "metadata": {"name": "code-autoscaler"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "agents.kruise.io/v1alpha1", "kind": "sandboxset", "name": "code-interpreter"},
            "observeWindowSeconds": 600,
            "minReplicas": 3, "maxReplicas": 100,
            "minAvailableRatio": "20%", "maxAvailableRatio": "90%",
            "schedule": [{"startTime": "2025-12-1 00:00:00", "endTime": "2031-12-12 00:00:00",
                "bounds": [{"cron": "* 0-8 ? * MON-FRI", "minReplicas": 10, "maxReplicas": 150}]}]
        }
    }"#;

    fn autoscaler(
        patch: impl FnOnce(&mut serde_json::Value),
    ) -> Result<AutoscalerPolicy, ObjectError> {
        let mut v: serde_json::Value = serde_json::from_str(TALK_AUTOSCALER).unwrap();
        patch(&mut v);
        let obj: PoolingAutoScaler =
            serde_json::from_value(v).map_err(|e| ObjectError(e.to_string()))?;
        obj.compile()
    }

    #[test]
    fn the_talks_autoscaler_compiles() {
        let p = autoscaler(|_| {}).unwrap();
        assert_eq!(p.target, "code-interpreter");
        assert_eq!((p.min_replicas, p.max_replicas), (3, 100));
        assert!((p.min_ratio - 0.2).abs() < 1e-9 && (p.max_ratio - 0.9).abs() < 1e-9);
        assert_eq!(
            p.schedule[0].start,
            Some(Utc.with_ymd_and_hms(2025, 12, 1, 0, 0, 0).unwrap())
        );
        assert_eq!(p.schedule[0].bounds[0].max_replicas, 150);
    }

    #[test]
    fn bad_autoscalers_say_what_is_wrong() {
        let err = |f: fn(&mut serde_json::Value)| autoscaler(f).unwrap_err().0;
        assert!(err(|v| v["spec"]["minReplicas"] = 200.into())
            .contains("minReplicas (200) is greater than maxReplicas (100)"));
        assert!(err(|v| v["spec"]["minAvailableRatio"] = "150%".into()).contains("outside 0%–100%"));
        assert!(err(|v| v["spec"]["maxAvailableRatio"] = 1.5.into()).contains("outside 0–1"));
        assert!(err(|v| v["spec"]["minAvailableRatio"] = "95%".into()).contains("greater than"));
        assert!(
            err(|v| v["spec"]["schedule"][0]["bounds"][0]["cron"] = "61 * * * *".into())
                .contains("cron \"61 * * * *\" is invalid")
        );
        assert!(
            err(|v| v["spec"]["schedule"][0]["bounds"][0]["minReplicas"] = 500.into())
                .contains("spec.schedule[0].bounds[0]: minReplicas")
        );
        assert!(
            err(|v| v["spec"]["schedule"][0]["startTime"] = "yesterday".into())
                .contains("startTime")
        );
        assert!(
            err(|v| v["spec"]["scaleTargetRef"]["kind"] = "Deployment".into())
                .contains("only SandboxSet")
        );
        assert!(err(|v| v["kind"] = "Sandbox".into()).contains("expected \"PoolingAutoScaler\""));
        assert!(err(|v| v["metadata"]["name"] = "Bad_Name".into()).contains("metadata.name"));
        assert!(err(|v| v["spec"]["bogus"] = 1.into()).contains("unknown field `bogus`"));
    }

    #[test]
    fn sandbox_set_defaults_and_checks() {
        let set: SandboxSet = serde_json::from_value(serde_json::json!({
            "apiVersion": API_VERSION, "kind": "SandboxSet",
            "metadata": {"name": "py"}, "spec": {"replicas": 10, "template": "base"}
        }))
        .unwrap();
        set.validate().unwrap();
        assert_eq!(
            set.spec
                .update_strategy
                .max_unavailable
                .resolve("x", 10)
                .unwrap(),
            2
        );
        assert_eq!(
            set.spec
                .update_strategy
                .max_unavailable
                .resolve("x", 3)
                .unwrap(),
            1
        );
        assert_eq!(set.spec.reuse_policy, ReusePolicy::Never);
        let mut bad = set.clone();
        bad.spec.update_strategy.max_unavailable = IntOrPercent::Percent("120%".into());
        assert!(bad.validate().unwrap_err().0.contains("outside 0%–100%"));
        let mut bad = set;
        bad.spec.template = String::new();
        assert!(bad.validate().is_err());
    }

    #[test]
    fn manifest_routes_each_document_and_refuses_what_it_cannot_route() {
        let objs = parse_manifest(
            "kind: SandboxSet\nmetadata: {name: a}\nspec: {replicas: 1, template: base}\n---\n\
             kind: Checkpoint\nmetadata: {name: c}\nspec: {sandbox: x}\n---\n",
        )
        .unwrap();
        let routes: Vec<_> = objs
            .iter()
            .map(|o| (o.collection, o.name.as_str()))
            .collect();
        assert_eq!(routes, [("sandboxsets", "a"), ("checkpoints", "c")]);
        for (text, want) in [
            (
                "kind: Deployment\nmetadata: {name: x}\n",
                "unknown kind \"Deployment\"",
            ),
            (
                "kind: Commit\nmetadata: {name: \"\"}\n",
                "metadata.name is required",
            ),
            ("kind: Commit\nmetadata: 5\n", "metadata.name is required"),
            ("kind: [SandboxSet]\n", "unknown kind \"\""),
            ("---\n---\n", "no objects found"),
            ("", "no objects found"),
            ("kind: SandboxSet\nmetadata: [\n", "invalid YAML"),
        ] {
            let err = parse_manifest(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }
}
