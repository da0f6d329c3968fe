//! The `Checkpoint` object (a named snapshot of a sandbox's memory and filesystem): its shape,
//! validation and SQLite persistence. The work itself is in `orchestrator/checkpoints.rs`.
//!
//! The shape is the talk's: `apiVersion`, `kind: Checkpoint`, `metadata.name`, `spec.sandbox`
//! (the talk's `podName`, accepted as an alias), `spec.keepRunning`, `spec.ttlAfterFinished`,
//! `spec.persistentContents` (`memory`, `filesystem`, `ip`); `status` carries the phase, sizes,
//! durations and a message.
//!
//! Beside the object the store keeps what a restore needs of the source sandbox
//! ([`CheckpointSource`]: its spec, env vars, owner), which clients never see.

use crate::commit::{parse_duration, valid_object_name};
use crate::objects::{ObjectError, ObjectMeta, API_VERSION};
use crate::store::{Store, StoreError};
use chrono::{DateTime, Utc};
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use warren_runtime::SandboxSpec;

pub const KIND_CHECKPOINT: &str = "Checkpoint";

/// Label of the checkpoints `POST /sandboxes/{id}/fork` makes: collected once no fork uses them.
pub const FORK_LABEL: &str = "warren.dev/fork-of";

pub(crate) const MIGRATION_CHECKPOINTS: &str = "
    CREATE TABLE checkpoints (
        name TEXT PRIMARY KEY,
        team TEXT NOT NULL,
        object TEXT NOT NULL,
        source TEXT NOT NULL,
        created_at TEXT NOT NULL
    );";

fn invalid(msg: impl Into<String>) -> ObjectError {
    ObjectError(msg.into())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Checkpoint {
    #[serde(default = "default_api_version")]
    pub api_version: String,
    #[serde(default = "default_kind")]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: CheckpointSpec,
    #[serde(default)]
    pub status: CheckpointStatus,
}

fn default_api_version() -> String {
    API_VERSION.into()
}

fn default_kind() -> String {
    KIND_CHECKPOINT.into()
}

fn yes() -> bool {
    true
}

fn default_contents() -> Vec<String> {
    vec!["memory".into(), "filesystem".into()]
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CheckpointSpec {
    /// The sandbox to checkpoint (the talk's `podName`).
    #[serde(alias = "podName")]
    pub sandbox: String,
    /// Accepted for compatibility: a Warren sandbox has one container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
    /// The sandbox runs on after the checkpoint (frozen only for it); `false` ends it.
    #[serde(default = "yes")]
    pub keep_running: bool,
    /// How long the checkpoint is kept once taken, e.g. `30m`, `1h`, `7d`. None: until deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_after_finished: Option<String>,
    /// What is kept: `memory` (the process tree, with CRIU), `filesystem` (always), `ip`
    /// (accepted; a restored sandbox always gets an address of its own).
    #[serde(default = "default_contents")]
    pub persistent_contents: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckpointPhase {
    #[default]
    Pending,
    Running,
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointStatus {
    #[serde(default)]
    pub phase: CheckpointPhase,
    /// Bytes on disk: images plus the filesystem copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Bytes of the CRIU images (memory, process state).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_size: Option<u64>,
    /// Bytes of the copy of the sandbox's changed files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystem_size: Option<u64>,
    /// From the freeze to the checkpoint on disk, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<f64>,
    /// How long the sandbox's processes were stopped, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_duration_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The template of the source sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<DateTime<Utc>>,
    /// When the TTL collects the checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

impl Checkpoint {
    /// Checks a checkpoint as submitted; returns its TTL.
    pub fn validate(&self) -> Result<Option<chrono::Duration>, ObjectError> {
        crate::objects::check_kind_and_version(&self.api_version, &self.kind, KIND_CHECKPOINT)?;
        if !valid_object_name(&self.metadata.name) {
            return Err(invalid(format!(
                "metadata.name {:?}: use 1-63 lower-case letters, digits, '-' and '.'",
                self.metadata.name
            )));
        }
        if self.spec.sandbox.trim().is_empty() {
            return Err(invalid(
                "spec.sandbox: the sandbox to checkpoint is required",
            ));
        }
        for c in &self.spec.persistent_contents {
            if !matches!(c.as_str(), "memory" | "filesystem" | "ip") {
                return Err(invalid(format!(
                    "spec.persistentContents: {c:?} is not one of memory, filesystem, ip"
                )));
            }
        }
        if !self.has("filesystem") {
            return Err(invalid(
                "spec.persistentContents must include filesystem: processes restored without \
                 their files cannot run",
            ));
        }
        match &self.spec.ttl_after_finished {
            None => Ok(None),
            Some(t) => {
                Ok(Some(parse_duration(t).map_err(|e| {
                    invalid(format!("spec.ttlAfterFinished: {e}"))
                })?))
            }
        }
    }

    fn has(&self, what: &str) -> bool {
        self.spec.persistent_contents.iter().any(|c| c == what)
    }

    /// Whether the process tree (memory) is kept; otherwise only the filesystem is.
    pub fn memory(&self) -> bool {
        self.has("memory")
    }

    /// The source sandbox of a checkpoint made by a fork, if it is one.
    pub fn fork_of(&self) -> Option<&str> {
        self.metadata.labels.get(FORK_LABEL).map(String::as_str)
    }
}

/// What a restore needs of the source sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointSource {
    pub team_id: String,
    pub template_id: String,
    pub env_vars: BTreeMap<String, String>,
    pub spec: SandboxSpec,
    pub cpu_count: u32,
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub allow_internet: bool,
}

fn ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

fn corrupt(name: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        id: name.into(),
        reason: e.to_string(),
    }
}

impl Store {
    /// Inserts a new checkpoint; `false` if the name is taken.
    pub async fn insert_checkpoint(
        &self,
        c: &Checkpoint,
        source: &CheckpointSource,
    ) -> Result<bool, StoreError> {
        let name = c.metadata.name.clone();
        let obj = serde_json::to_string(c).map_err(|e| corrupt(&name, e))?;
        let src = serde_json::to_string(source).map_err(|e| corrupt(&name, e))?;
        let team = source.team_id.clone();
        let now = ts(&Utc::now());
        self.with(move |conn| {
            let n = conn.execute(
                "INSERT OR IGNORE INTO checkpoints (name, team, object, source, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![name, team, obj, src, now],
            )?;
            Ok(n == 1)
        })
        .await
    }

    pub async fn update_checkpoint(&self, c: &Checkpoint) -> Result<(), StoreError> {
        let name = c.metadata.name.clone();
        let obj = serde_json::to_string(c).map_err(|e| corrupt(&name, e))?;
        self.with(move |conn| {
            conn.execute(
                "UPDATE checkpoints SET object = ?2 WHERE name = ?1",
                params![name, obj],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn get_checkpoint(
        &self,
        name: &str,
    ) -> Result<Option<(Checkpoint, CheckpointSource)>, StoreError> {
        let name = name.to_string();
        self.with(move |conn| {
            let row: Option<(String, String)> = conn
                .query_row(
                    "SELECT object, source FROM checkpoints WHERE name = ?1",
                    params![name],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            row.map(|(o, s)| {
                Ok((
                    serde_json::from_str(&o).map_err(|e| corrupt(&name, e))?,
                    serde_json::from_str(&s).map_err(|e| corrupt(&name, e))?,
                ))
            })
            .transpose()
        })
        .await
    }

    /// Every checkpoint with its owning team, oldest first.
    pub async fn list_checkpoints(&self) -> Result<Vec<(Checkpoint, String)>, StoreError> {
        self.with(|conn| {
            let mut stmt = conn
                .prepare("SELECT name, object, team FROM checkpoints ORDER BY created_at, name")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (name, obj, team) = row?;
                out.push((
                    serde_json::from_str(&obj).map_err(|e| corrupt(&name, e))?,
                    team,
                ));
            }
            Ok(out)
        })
        .await
    }

    pub async fn delete_checkpoint(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_string();
        self.with(move |conn| {
            Ok(conn.execute("DELETE FROM checkpoints WHERE name = ?1", params![name])? == 1)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: serde_json::Value) -> Checkpoint {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn the_talks_fields_parse_with_defaults() {
        let c = parse(serde_json::json!({
            "apiVersion": "agents.kruise.io/v1alpha1", "kind": "Checkpoint",
            "metadata": {"name": "ck"}, "spec": {"podName": "abc", "ttlAfterFinished": "1h"}
        }));
        assert_eq!(c.spec.sandbox, "abc");
        assert!(c.spec.keep_running);
        assert!(c.memory());
        assert_eq!(c.validate().unwrap(), Some(chrono::Duration::hours(1)));
    }

    #[test]
    fn bad_fields_are_named() {
        let mut c = parse(serde_json::json!({
            "kind": "Checkpoint", "metadata": {"name": "ck"}, "spec": {"sandbox": "abc"}
        }));
        c.spec.persistent_contents = vec!["memory".into()];
        assert!(c.validate().unwrap_err().0.contains("filesystem"));
        c.spec.persistent_contents = vec!["filesystem".into(), "disk".into()];
        assert!(c.validate().unwrap_err().0.contains("\"disk\""));
        c.spec.persistent_contents = vec!["filesystem".into()];
        assert!(!c.memory());
        c.spec.ttl_after_finished = Some("soon".into());
        assert!(c.validate().unwrap_err().0.contains("ttlAfterFinished"));
        c.spec.ttl_after_finished = None;
        c.metadata.name = "Bad_Name".into();
        assert!(c.validate().unwrap_err().0.contains("metadata.name"));
        assert!(serde_json::from_value::<Checkpoint>(serde_json::json!({
            "kind": "Checkpoint", "metadata": {"name": "ck"},
            "spec": {"sandbox": "a", "keepRuning": true}
        }))
        .is_err());
    }
}
