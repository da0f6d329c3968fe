//! The `Commit` object (a sandbox's filesystem changes saved as an OCI image) and registry
//! secrets: their shape, validation and SQLite persistence. The work itself is in
//! `orchestrator/commits.rs`.
//!
//! The shape is the talk's: `apiVersion`, `kind: Commit`, `metadata.name`, `spec.sandbox` (the
//! talk's `podName`, accepted as an alias), `spec.containerName`, `spec.image`, `spec.ttl`,
//! `spec.registryAuth.secrets`, plus `spec.push`; `status` carries the phase, the manifest digest,
//! sizes, a message and how long the sandbox was frozen.

use crate::objects::{ObjectError, ObjectMeta, API_VERSION};
use crate::store::{Store, StoreError};
use chrono::{DateTime, Utc};
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};

pub const KIND_COMMIT: &str = "Commit";

pub(crate) const MIGRATION_COMMITS: &str = "
    CREATE TABLE commits (name TEXT PRIMARY KEY, object TEXT NOT NULL, created_at TEXT NOT NULL);
    CREATE TABLE registry_secrets (
        name TEXT PRIMARY KEY,
        username TEXT NOT NULL,
        password TEXT NOT NULL,
        created_at TEXT NOT NULL
    );";

fn invalid(msg: impl Into<String>) -> ObjectError {
    ObjectError(msg.into())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Commit {
    #[serde(default = "default_api_version")]
    pub api_version: String,
    #[serde(default = "default_kind")]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: CommitSpec,
    #[serde(default)]
    pub status: CommitStatus,
}

fn default_api_version() -> String {
    API_VERSION.into()
}

fn default_kind() -> String {
    KIND_COMMIT.into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CommitSpec {
    /// The sandbox whose changes are committed (the talk's `podName`).
    #[serde(alias = "podName")]
    pub sandbox: String,
    /// Accepted for compatibility: a Warren sandbox has one container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
    /// The image name, `[registry/]repository[:tag]`; also the name of the new template.
    pub image: String,
    /// How long the commit (and its image, unless something else references the blobs) is kept,
    /// e.g. `30m`, `1h`, `7d`. None: until deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_auth: Option<RegistryAuth>,
    /// Push the image to its registry after the local commit. Default: true when
    /// `registryAuth.secrets` is given, else false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegistryAuth {
    #[serde(default)]
    pub secrets: Vec<SecretRef>,
}

/// A secret named by string or, Kubernetes-style, by `{name: ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SecretRef {
    Name(String),
    Object { name: String },
}

impl SecretRef {
    pub fn name(&self) -> &str {
        match self {
            SecretRef::Name(n) | SecretRef::Object { name: n } => n,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommitPhase {
    #[default]
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl CommitPhase {
    pub fn done(self) -> bool {
        matches!(self, CommitPhase::Succeeded | CommitPhase::Failed)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommitStatus {
    #[serde(default)]
    pub phase: CommitPhase,
    /// Manifest digest of the committed image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Compressed size of the new layer, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Compressed size of all layers of the image, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// How long the sandbox was frozen, milliseconds (0 when it was already paused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_duration_ms: Option<f64>,
    /// From start to the image in the store (and pushed, if asked), milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_duration_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushed: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<DateTime<Utc>>,
    /// When the TTL collects the commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

impl Commit {
    /// Checks a commit as submitted; returns its TTL.
    pub fn validate(&self) -> Result<Option<chrono::Duration>, ObjectError> {
        crate::objects::check_kind_and_version(&self.api_version, &self.kind, KIND_COMMIT)?;
        if !valid_object_name(&self.metadata.name) {
            return Err(invalid(format!(
                "metadata.name {:?}: use 1-63 lower-case letters, digits, '-' and '.'",
                self.metadata.name
            )));
        }
        if self.spec.sandbox.trim().is_empty() {
            return Err(invalid("spec.sandbox: the sandbox to commit is required"));
        }
        warren_image::commit::validate_image_name(&self.spec.image)
            .map_err(|e| invalid(format!("spec.image: {e}")))?;
        let ttl = match &self.spec.ttl {
            None => None,
            Some(t) => Some(parse_duration(t).map_err(|e| invalid(format!("spec.ttl: {e}")))?),
        };
        for s in self.secrets() {
            if !valid_object_name(s) {
                return Err(invalid(format!(
                    "spec.registryAuth.secrets: {s:?} is not a valid secret name"
                )));
            }
        }
        if self.push() && self.spec.image.split('/').count() < 2 {
            return Err(invalid(format!(
                "spec.image {:?}: a pushed image needs a registry host, like localhost:5000/{}",
                self.spec.image, self.spec.image
            )));
        }
        Ok(ttl)
    }

    pub fn secrets(&self) -> Vec<&str> {
        self.spec
            .registry_auth
            .as_ref()
            .map(|a| a.secrets.iter().map(SecretRef::name).collect())
            .unwrap_or_default()
    }

    pub fn push(&self) -> bool {
        self.spec.push.unwrap_or(!self.secrets().is_empty())
    }
}

pub fn valid_object_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && !n.starts_with(['-', '.'])
}

/// `90s`, `30m`, `1h30m`, `7d`: a sum of numbers with units s, m, h, d.
pub fn parse_duration(s: &str) -> Result<chrono::Duration, String> {
    let bad = || format!("{s:?} is not a duration like 30m, 1h or 7d");
    let mut total = 0i64;
    let mut num = String::new();
    let mut any = false;
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: i64 = num.parse().map_err(|_| bad())?;
        num.clear();
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(bad()),
        };
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
        any = true;
    }
    if !num.is_empty() || !any || total <= 0 || total > 3650 * 86400 {
        return Err(bad());
    }
    Ok(chrono::Duration::seconds(total))
}

/// Registry credentials (basic auth) stored by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistrySecret {
    pub name: String,
    pub username: String,
    /// Never serialized back to clients.
    #[serde(skip_serializing, default)]
    pub password: String,
    pub created_at: DateTime<Utc>,
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
    /// Inserts a new commit; `false` if the name is taken.
    pub async fn insert_commit(&self, c: &Commit) -> Result<bool, StoreError> {
        let (name, obj) = (c.metadata.name.clone(), serde_json::to_string(c));
        let obj = obj.map_err(|e| corrupt(&name, e))?;
        let now = ts(&Utc::now());
        self.with(move |conn| {
            let n = conn.execute(
                "INSERT OR IGNORE INTO commits (name, object, created_at) VALUES (?1, ?2, ?3)",
                params![name, obj, now],
            )?;
            Ok(n == 1)
        })
        .await
    }

    pub async fn update_commit(&self, c: &Commit) -> Result<(), StoreError> {
        let (name, obj) = (c.metadata.name.clone(), serde_json::to_string(c));
        let obj = obj.map_err(|e| corrupt(&name, e))?;
        self.with(move |conn| {
            conn.execute(
                "UPDATE commits SET object = ?2 WHERE name = ?1",
                params![name, obj],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn get_commit(&self, name: &str) -> Result<Option<Commit>, StoreError> {
        let name = name.to_string();
        self.with(move |conn| {
            let obj: Option<String> = conn
                .query_row(
                    "SELECT object FROM commits WHERE name = ?1",
                    params![name],
                    |r| r.get(0),
                )
                .optional()?;
            obj.map(|o| serde_json::from_str(&o).map_err(|e| corrupt(&name, e)))
                .transpose()
        })
        .await
    }

    /// Every commit, oldest first.
    pub async fn list_commits(&self) -> Result<Vec<Commit>, StoreError> {
        self.with(|conn| {
            let mut stmt =
                conn.prepare("SELECT name, object FROM commits ORDER BY created_at, name")?;
            let rows =
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            let mut out = Vec::new();
            for row in rows {
                let (name, obj) = row?;
                out.push(serde_json::from_str(&obj).map_err(|e| corrupt(&name, e))?);
            }
            Ok(out)
        })
        .await
    }

    pub async fn delete_commit(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_string();
        self.with(move |conn| {
            Ok(conn.execute("DELETE FROM commits WHERE name = ?1", params![name])? == 1)
        })
        .await
    }

    pub async fn put_secret(&self, s: &RegistrySecret) -> Result<(), StoreError> {
        let s = s.clone();
        self.with(move |conn| {
            conn.execute(
                "INSERT INTO registry_secrets (name, username, password, created_at)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(name) DO UPDATE SET username = ?2, password = ?3",
                params![s.name, s.username, s.password, ts(&s.created_at)],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn get_secret(&self, name: &str) -> Result<Option<RegistrySecret>, StoreError> {
        let name = name.to_string();
        self.with(move |conn| {
            conn.query_row(
                "SELECT name, username, password, created_at FROM registry_secrets WHERE name = ?1",
                params![name],
                secret_row,
            )
            .optional()
            .map_err(Into::into)
        })
        .await
    }

    pub async fn list_secrets(&self) -> Result<Vec<RegistrySecret>, StoreError> {
        self.with(|conn| {
            let mut stmt = conn.prepare(
                "SELECT name, username, password, created_at FROM registry_secrets ORDER BY name",
            )?;
            let rows = stmt.query_map([], secret_row)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(Into::into)
        })
        .await
    }

    pub async fn delete_secret(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_string();
        self.with(move |conn| {
            Ok(conn.execute(
                "DELETE FROM registry_secrets WHERE name = ?1",
                params![name],
            )? == 1)
        })
        .await
    }
}

fn secret_row(r: &rusqlite::Row) -> rusqlite::Result<RegistrySecret> {
    let created: String = r.get(3)?;
    Ok(RegistrySecret {
        name: r.get(0)?,
        username: r.get(1)?,
        password: r.get(2)?,
        created_at: DateTime::parse_from_rfc3339(&created)
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(yaml: &str) -> Commit {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn talk_shape_parses_and_validates() {
        let c = commit(
            "apiVersion: agents.kruise.io/v1alpha1
kind: Commit
metadata: {name: snap-1}
spec:
  podName: sbx-123
  containerName: sandbox
  image: localhost:5000/team/agent:v1
  ttl: 1h30m
  registryAuth:
    secrets: [reg, {name: other}]
",
        );
        assert_eq!(c.spec.sandbox, "sbx-123");
        assert_eq!(c.secrets(), vec!["reg", "other"]);
        assert!(c.push());
        assert_eq!(c.validate().unwrap(), Some(chrono::Duration::minutes(90)));
        assert_eq!(c.status.phase, CommitPhase::Pending);
    }

    #[test]
    fn bad_commits_name_the_field() {
        for (spec, field) in [
            ("{sandbox: s, image: 'x/y:1', ttl: soon}", "spec.ttl"),
            ("{sandbox: s, image: 'x/y:1', ttl: 0s}", "spec.ttl"),
            ("{sandbox: s, image: 'y:1', push: true}", "registry host"),
            ("{sandbox: '', image: 'y:1'}", "spec.sandbox"),
        ] {
            let c = commit(&format!(
                "kind: Commit\nmetadata: {{name: c}}\nspec: {spec}"
            ));
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{spec}: {err}");
        }
        let c = commit("kind: Commit\nmetadata: {name: Bad_Name}\nspec: {sandbox: s, image: x}");
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("metadata.name"));
        let c = commit("kind: Commit\nmetadata: {name: c}\nspec: {sandbox: s, image: 'Up/x'}");
        assert!(c.validate().unwrap_err().to_string().contains("spec.image"));
        assert!(serde_saphyr::from_str::<Commit>(
            "kind: Commit\nmetadata: {name: c}\nspec: {sandbox: s, image: x, bogus: 1}"
        )
        .is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s").unwrap().num_seconds(), 90);
        assert_eq!(parse_duration("1h30m").unwrap().num_seconds(), 5400);
        assert_eq!(parse_duration("7d").unwrap().num_seconds(), 7 * 86400);
        for bad in ["", "1", "h", "1x", "-1h", "99999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn store_round_trip() {
        let store = Store::open_in_memory().unwrap();
        let mut c = commit("kind: Commit\nmetadata: {name: c1}\nspec: {sandbox: s, image: x}");
        assert!(store.insert_commit(&c).await.unwrap());
        assert!(!store.insert_commit(&c).await.unwrap(), "names are unique");
        c.status.phase = CommitPhase::Succeeded;
        store.update_commit(&c).await.unwrap();
        assert_eq!(store.get_commit("c1").await.unwrap(), Some(c.clone()));
        assert_eq!(store.list_commits().await.unwrap(), vec![c]);
        assert!(store.delete_commit("c1").await.unwrap());
        assert_eq!(store.get_commit("c1").await.unwrap(), None);

        let s = RegistrySecret {
            name: "reg".into(),
            username: "u".into(),
            password: "p".into(),
            created_at: Utc::now(),
        };
        store.put_secret(&s).await.unwrap();
        assert_eq!(
            store.get_secret("reg").await.unwrap().unwrap().password,
            "p"
        );
        let json = serde_json::to_string(&store.list_secrets().await.unwrap()).unwrap();
        assert!(!json.contains("\"p\""), "passwords never serialize: {json}");
        assert!(store.delete_secret("reg").await.unwrap());
    }
}
