//! The custom resources, in Warren's own group (`warren.dev/v1alpha1`) so that they install beside
//! OpenKruise Agents' `agents.kruise.io` kinds. Field names are the talk's and the single-host
//! daemon's (`crates/core/src/objects.rs`, `commit.rs`), so one YAML file means the same in both
//! modes. The CRD schemas are derived from these types (`warren-operator crds`, checked in under
//! `deploy/crds/`).

// clippy reads every `printcolumn(type_ = ...)` of a `#[kube(...)]` as a repeated attribute.
#![allow(clippy::duplicated_attributes)]

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const GROUP: &str = "warren.dev";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "warren.dev/v1alpha1";

/// A Kubernetes IntOrString (`3` or `"20%"`): a count, or a share of a total.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IntOrPercent {
    Int(i32),
    Percent(String),
}

impl JsonSchema for IntOrPercent {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "IntOrPercent".into()
    }

    // An untagged enum would derive `anyOf: [integer, string]`, which is not a structural schema;
    // the API server wants Kubernetes' own marker for this shape.
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "x-kubernetes-int-or-string": true })
    }

    fn inline_schema() -> bool {
        true
    }
}

impl IntOrPercent {
    /// Resolves against `total`. Percentages round down; the result is at least 1 so an update or
    /// a scale-up always makes progress. The error names `field`.
    pub fn resolve(&self, field: &str, total: i32) -> Result<i32, String> {
        match self {
            IntOrPercent::Int(n) if *n < 0 => Err(format!("{field}: {n} is negative")),
            IntOrPercent::Int(n) => Ok((*n).max(1)),
            IntOrPercent::Percent(s) => {
                let p = parse_percent(field, s)?;
                Ok(((f64::from(total.max(0)) * p).floor() as i32).max(1))
            }
        }
    }
}

/// Parses `"20%"` into 0.2; the error names `field`.
pub fn parse_percent(field: &str, s: &str) -> Result<f64, String> {
    let bad = || format!("{field}: {s:?} is not a percentage like \"20%\"");
    let n: f64 = s
        .trim()
        .strip_suffix('%')
        .ok_or_else(bad)?
        .trim()
        .parse()
        .map_err(|_| bad())?;
    if !(0.0..=100.0).contains(&n) {
        return Err(format!("{field}: {s} is outside 0%–100%"));
    }
    Ok(n / 100.0)
}

/// A status condition with the fields and meaning of Kubernetes' `metav1.Condition`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// CamelCase condition type, e.g. `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// CamelCase reason for the last transition, e.g. `PodPending`.
    pub reason: String,
    /// Human-readable details: for a failure, what failed and what to do.
    #[serde(default)]
    pub message: String,
    /// RFC 3339 time of the last change of `status`.
    pub last_transition_time: String,
    /// The `metadata.generation` the condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Schema of a condition list: a map keyed by `type`, so that the operator and the node agent can
/// each own their conditions under server-side apply without overwriting the other's.
fn conditions_schema(gen: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut s = gen.subschema_for::<Vec<Condition>>();
    s.insert("x-kubernetes-list-type".into(), "map".into());
    s.insert(
        "x-kubernetes-list-map-keys".into(),
        serde_json::json!(["type"]),
    );
    s
}

/// CPU and memory of a sandbox, as Kubernetes quantities (`"2"`, `"500m"`, `"512Mi"`). They
/// become the requests and limits of the sandbox's Pod, so the scheduler places and accounts for it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, String>,
}

/// What of a sandbox survives a pause (the talk's `persistentContents`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum PersistentContent {
    Memory,
    Filesystem,
    Ip,
}

/// One sandbox: a Pod of the same name (placement, IP, accounting) in which the node agent runs the
/// sandbox with Warren's runtime.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "warren.dev",
    version = "v1alpha1",
    kind = "Sandbox",
    namespaced,
    status = "SandboxStatus",
    shortname = "wsbx",
    category = "warren",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Node", type_ = "string", json_path = ".status.nodeName"),
    printcolumn(name = "IP", type_ = "string", json_path = ".status.sandboxIP"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    doc = "A Warren sandbox, carried by a Pod of the same name"
)]
#[serde(rename_all = "camelCase")]
pub struct SandboxSpec {
    /// The Warren template (the E2B `templateID`). Exactly one of `template` and `image`, unless
    /// `restoreFrom` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// An OCI image reference to run instead of a template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default)]
    pub resources: Resources,
    /// Frozen: no CPU, memory and IP kept (the Pod stays). Resume by setting it back to false.
    #[serde(default)]
    pub paused: bool,
    /// What survives a pause: `memory` (freeze, or hibernate to disk), `filesystem`, `ip`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub persistent_contents: Vec<PersistentContent>,
    /// RFC 3339; the operator deletes the Sandbox then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_time: Option<String>,
    /// RFC 3339; the operator sets `paused` then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_time: Option<String>,
    /// Outbound internet access (default true). The cloud metadata range and the cluster (other
    /// Pods, Services, the node) are closed either way unless `network.allowOut` names them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_internet_access: Option<bool>,
    /// Egress rules, E2B's `network` shape; changes apply to the running sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<SandboxNetwork>,
    /// Environment of the sandbox's processes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env_vars: BTreeMap<String, String>,
    /// A Checkpoint (in this namespace) to restore: a fork. It must have succeeded; the Pod is
    /// pinned to the checkpoint's node, and `template`/`image` may be left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_from: Option<String>,
    /// Secrets in this namespace (type `kubernetes.io/dockerconfigjson`, as a Pod's
    /// `imagePullSecrets`) with credentials for pulling `image`; the first with an entry for its
    /// registry is used, none with one: an anonymous pull. A Secret that is missing or of
    /// another type fails the pull (`ImagePullBackOff`, retried).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalSecretReference>,
    /// When the node asks the registry for `image`: `IfNotPresent` (the default: a reference
    /// already on the node is used as it is), `Always` (the registry's current digest is looked
    /// up each create and pulled when it moved; what is unchanged is not downloaded again) or
    /// `Never` (only what is on the node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<ImagePullPolicy>,
}

/// As a Pod container's `imagePullPolicy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ImagePullPolicy {
    Always,
    #[default]
    IfNotPresent,
    Never,
}

/// A Secret in the object's namespace, by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LocalSecretReference {
    pub name: String,
}

/// A sandbox's egress rules, as E2B's `network` carries them and with single-host semantics:
/// `allowOut` entries are exceptions to `denyOut` and to `allowInternetAccess: false`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxNetwork {
    /// IPv4 addresses or CIDR blocks the sandbox may reach (domain names need the single-host
    /// DNS filter and are refused here). A block inside the cluster's ranges opens it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_out: Vec<String>,
    /// IPv4 addresses or CIDR blocks it may not reach (`0.0.0.0/0`: everything not allowed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_out: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SandboxPhase {
    #[default]
    Pending,
    Running,
    Paused,
    Terminating,
    Failed,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub phase: SandboxPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The Pod's IP, where the router sends the sandbox's traffic.
    #[serde(default, rename = "sandboxIP", skip_serializing_if = "Option::is_none")]
    pub sandbox_ip: Option<String>,
}

/// Rolling-update and scale-up limits, as in the single-host daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
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

/// What happens to a claimed member when its owner kills it (the daemon's `reusePolicy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ReusePolicy {
    #[default]
    Never,
    Recycle,
}

/// A warm pool: `replicas` unclaimed Sandboxes of one template, owned by the set. A claim takes a
/// member out (label `warren.dev/claimed=true`, owner reference removed) and the set refills.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "warren.dev",
    version = "v1alpha1",
    kind = "SandboxSet",
    namespaced,
    status = "SandboxSetStatus",
    shortname = "wsbs",
    category = "warren",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(
        name = "Available",
        type_ = "integer",
        json_path = ".status.availableReplicas"
    ),
    printcolumn(
        name = "Updated",
        type_ = "integer",
        json_path = ".status.updatedReplicas"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    doc = "A warm pool of unclaimed Warren sandboxes"
)]
#[serde(rename_all = "camelCase")]
pub struct SandboxSetSpec {
    /// Unclaimed members to keep, ready or starting (a PoolingAutoScaler may set it).
    pub replicas: i32,
    /// The Warren template of the members (the E2B `templateID` that creates claim from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// An OCI image for the members instead of a template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The members' `imagePullSecrets` (as Sandbox `imagePullSecrets`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalSecretReference>,
    /// The members' `imagePullPolicy` (as Sandbox `imagePullPolicy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<ImagePullPolicy>,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub persistent_contents: Vec<PersistentContent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_internet_access: Option<bool>,
    /// The members' egress rules (as Sandbox `network`); a claim with other rules replaces
    /// them on the claimed member before the client gets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<SandboxNetwork>,
    #[serde(default)]
    pub reuse_policy: ReusePolicy,
    /// Rolling update of unclaimed members when the member template changes: how many of
    /// `replicas` may be unavailable at once (default 20%).
    #[serde(default = "default_update_strategy")]
    pub update_strategy: Strategy,
    /// How many members may be starting at once (default 8).
    #[serde(default = "default_scale_strategy")]
    pub scale_strategy: Strategy,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SandboxSetPhase {
    #[default]
    Pending,
    Scaling,
    Updating,
    Ready,
    Failed,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxSetStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub phase: SandboxSetPhase,
    /// Unclaimed members, ready or starting.
    #[serde(default)]
    pub replicas: i32,
    /// Unclaimed members that are ready to be claimed.
    #[serde(default)]
    pub available_replicas: i32,
    /// Unclaimed members of `updateRevision`.
    #[serde(default)]
    pub updated_replicas: i32,
    /// Hash of the member template; members carry it in label `warren.dev/template-hash`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_revision: Option<String>,
    /// Label selector of the unclaimed members, for the scale subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaleTargetRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    pub kind: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleBound {
    /// 5-field cron (minute hour day-of-month month day-of-week; `?` allowed), in UTC.
    pub cron: String,
    pub min_replicas: i32,
    pub max_replicas: i32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleEntry {
    /// UTC, `2025-12-1 00:00:00` or RFC 3339; the entry applies from then on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// UTC; the entry applies until then (exclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<String>,
    pub bounds: Vec<ScheduleBound>,
}

fn default_window() -> i64 {
    60
}

fn default_cooldown() -> i64 {
    60
}

fn default_min_ratio() -> String {
    "20%".into()
}

fn default_max_ratio() -> String {
    "90%".into()
}

/// Sizes a SandboxSet through its scale subresource, with the daemon's algorithm
/// (`crates/core/src/autoscaler.rs`): watermarks on available / (available + claimed), scale-down
/// over an observation window, cron bounds.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "warren.dev",
    version = "v1alpha1",
    kind = "PoolingAutoScaler",
    namespaced,
    status = "PoolingAutoScalerStatus",
    shortname = "wpas",
    category = "warren",
    printcolumn(
        name = "Target",
        type_ = "string",
        json_path = ".spec.scaleTargetRef.name"
    ),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.desiredReplicas"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    doc = "Sizes a Warren SandboxSet from its claim rate and cron bounds"
)]
#[serde(rename_all = "camelCase")]
pub struct PoolingAutoScalerSpec {
    pub scale_target_ref: ScaleTargetRef,
    /// Scale-down looks at this many seconds of history (scale-up reacts at once).
    #[serde(default = "default_window")]
    pub observe_window_seconds: i64,
    #[serde(default)]
    pub min_replicas: i32,
    pub max_replicas: i32,
    /// Below this share of available among available + claimed: scale up (`"20%"`).
    #[serde(default = "default_min_ratio")]
    pub min_available_ratio: String,
    /// Above it for a whole window: scale down (`"90%"`).
    #[serde(default = "default_max_ratio")]
    pub max_available_ratio: String,
    /// Warren extension: no scale-down sooner than this after any scaling.
    #[serde(default = "default_cooldown")]
    pub cooldown_seconds: i64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedule: Vec<ScheduleEntry>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum AutoScalerPhase {
    #[default]
    Pending,
    Active,
    Failed,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolingAutoScalerStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub phase: AutoScalerPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// RFC 3339 time of the last change of the target's replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// Registry credentials for a push: names of `kubernetes.io/dockerconfigjson` Secrets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegistryAuth {
    #[serde(default)]
    pub secrets: Vec<String>,
}

/// A sandbox's filesystem changes saved as an OCI image by the node agent on its node.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "warren.dev",
    version = "v1alpha1",
    kind = "Commit",
    namespaced,
    status = "CommitStatus",
    shortname = "wcmt",
    category = "warren",
    printcolumn(name = "Pod", type_ = "string", json_path = ".spec.podName"),
    printcolumn(name = "Image", type_ = "string", json_path = ".spec.image"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    doc = "A Warren sandbox's filesystem changes committed to an OCI image"
)]
#[serde(rename_all = "camelCase")]
pub struct CommitSpec {
    /// The sandbox (its Pod has the same name).
    pub pod_name: String,
    /// Accepted for compatibility: a Warren sandbox has one container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
    /// `[registry/]repository[:tag]`.
    pub image: String,
    /// The commit (and push) fails after this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i64>,
    /// How long the finished Commit is kept, e.g. `30m`, `7d`; unset: until deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_auth: Option<RegistryAuth>,
    /// Push after the local commit. Default: true when `registryAuth.secrets` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<bool>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum JobPhase {
    #[default]
    Pending,
    Running,
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommitStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub phase: JobPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Manifest digest of the committed image (the talk's `commitID`).
    #[serde(default, rename = "commitID", skip_serializing_if = "Option::is_none")]
    pub commit_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    /// Bytes written on the node (images, or the layer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<i64>,
    /// Wall time of the node agent's work, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// What a checkpoint holds (the talk's values).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum CheckpointContent {
    PodInfo,
    Memory,
    Filesystem,
}

fn yes() -> bool {
    true
}

/// Memory and/or filesystem state of a sandbox, dumped with CRIU by the node agent on its node.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "warren.dev",
    version = "v1alpha1",
    kind = "Checkpoint",
    namespaced,
    status = "CheckpointStatus",
    shortname = "wcp",
    category = "warren",
    printcolumn(name = "Sandbox", type_ = "string", json_path = ".spec.sandboxName"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "ID", type_ = "string", json_path = ".status.checkpointId"),
    doc = "A checkpoint of a Warren sandbox's memory and filesystem"
)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointSpec {
    pub sandbox_name: String,
    /// The sandbox's Pod (same name as the sandbox unless set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// Keep the sandbox running after the dump (the talk's `keepRunning`, default true); false
    /// leaves it paused.
    #[serde(default = "yes")]
    pub keep_running: bool,
    /// Default: memory and filesystem.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub persistent_contents: Vec<CheckpointContent>,
    /// How long a finished checkpoint is kept (`30s`, `30m`, `30d`); unset: until deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_after_finished: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum CheckpointPhase {
    #[default]
    Pending,
    Creating,
    Succeeded,
    Failed,
    Terminating,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub phase: CheckpointPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// What a fork names as its E2B `templateID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_id: Option<String>,
    /// Where the images are; forks are placed there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    /// Bytes written on the node (images, or the layer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<i64>,
    /// Wall time of the node agent's work, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// Every CRD, in a stable order, as `warren-operator crds` prints them: one `(file name, yaml)`
/// per kind.
pub fn crd_documents() -> Result<Vec<(String, String)>, serde_saphyr::SerializeError> {
    use kube::CustomResourceExt;
    let crds = [
        Sandbox::crd(),
        SandboxSet::crd(),
        PoolingAutoScaler::crd(),
        Commit::crd(),
        Checkpoint::crd(),
    ];
    crds.into_iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            Ok((format!("{name}.yaml"), serde_saphyr::to_string(&crd)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn crd_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/crds")
    }

    /// CI catches CRDs that no longer match the types: regenerate with
    /// `cargo run -p warren-operator -- crds --dir deploy/crds`.
    #[test]
    fn checked_in_crds_match_the_types() {
        let docs = crd_documents().unwrap();
        let mut want: Vec<String> = docs.iter().map(|(f, _)| f.clone()).collect();
        want.sort();
        let mut have: Vec<String> = std::fs::read_dir(crd_dir())
            .expect("deploy/crds exists")
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        have.sort();
        assert_eq!(
            have, want,
            "deploy/crds has other files than the generated CRDs"
        );
        for (file, yaml) in docs {
            let on_disk = std::fs::read_to_string(crd_dir().join(&file)).unwrap();
            assert!(
                on_disk == yaml,
                "deploy/crds/{file} is stale; run `cargo run -p warren-operator -- crds --dir deploy/crds`"
            );
        }
    }

    #[test]
    fn schemas_are_structural_where_serde_is_not() {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(SandboxSet::crd()).unwrap();
        let v = &crd["spec"]["versions"][0];
        assert_eq!(v["name"], "v1alpha1");
        let spec = &v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        assert_eq!(
            spec["updateStrategy"]["properties"]["maxUnavailable"],
            serde_json::json!({"x-kubernetes-int-or-string": true})
        );
        assert_eq!(
            v["subresources"]["scale"]["specReplicasPath"],
            ".spec.replicas"
        );
        assert_eq!(
            v["subresources"]["scale"]["labelSelectorPath"],
            ".status.selector"
        );
        let conds =
            &v["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"];
        assert_eq!(conds["x-kubernetes-list-type"], "map");
        assert_eq!(
            conds["x-kubernetes-list-map-keys"],
            serde_json::json!(["type"])
        );
        assert_eq!(crd["spec"]["group"], GROUP);
        let sbx = serde_json::to_value(Sandbox::crd()).unwrap();
        let pc = &sbx["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["persistentContents"]["items"];
        assert_eq!(
            pc["enum"],
            serde_json::json!(["memory", "filesystem", "ip"])
        );
    }

    #[test]
    fn the_talks_yaml_parses() {
        let set: SandboxSet = serde_json::from_value(serde_json::json!({
            "apiVersion": API_VERSION, "kind": "SandboxSet", "metadata": {"name": "py"},
            "spec": {"replicas": 10, "template": "base", "updateStrategy": {"maxUnavailable": "20%"}}
        }))
        .unwrap();
        assert_eq!(
            set.spec.update_strategy.max_unavailable.resolve("x", 10),
            Ok(2)
        );
        assert_eq!(
            set.spec.scale_strategy.max_unavailable,
            IntOrPercent::Int(8)
        );
        let cp: Checkpoint = serde_json::from_value(serde_json::json!({
            "apiVersion": API_VERSION, "kind": "Checkpoint", "metadata": {"name": "c"},
            "spec": {"sandboxName": "sb", "persistentContents": ["memory", "filesystem"]}
        }))
        .unwrap();
        assert!(cp.spec.keep_running);
        assert!(IntOrPercent::Percent("150%".into())
            .resolve("f", 3)
            .unwrap_err()
            .contains("outside"));
        assert!(IntOrPercent::Int(-1)
            .resolve("f", 3)
            .unwrap_err()
            .contains("negative"));
    }
}
