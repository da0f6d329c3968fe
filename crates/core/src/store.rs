//! Durable sandbox records in an embedded SQLite database (`<data_dir>/warren.db`).
//!
//! The database is what lets a restarted daemon find its sandboxes again, so it runs in WAL mode
//! with `synchronous=FULL`: a state change that was acknowledged survives a power cut. Every state
//! change is one transaction that re-reads the current state and applies [`crate::state::transition`],
//! so the state machine is enforced against what is on disk, not against a stale copy.
//!
//! SQLite calls block, so they run on tokio's blocking pool behind one `Mutex<Connection>`; the
//! async threads never wait on disk.

use crate::audit::{AuditEvent, AuditKind, AuditLog};
use crate::state::{transition, Event, IllegalTransition, SandboxState};
use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension, Row};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use warren_runtime::{Placement, SandboxSpec};

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    // 1: the sandboxes table.
    "CREATE TABLE sandboxes (
        id TEXT PRIMARY KEY,
        template_id TEXT NOT NULL,
        team_id TEXT NOT NULL,
        api_key_id TEXT NOT NULL,
        state TEXT NOT NULL,
        metadata TEXT NOT NULL,
        env_vars TEXT NOT NULL,
        envd_access_token TEXT NOT NULL,
        cpu_count INTEGER NOT NULL,
        memory_mb INTEGER NOT NULL,
        disk_mb INTEGER NOT NULL,
        allow_internet INTEGER NOT NULL,
        auto_pause INTEGER NOT NULL,
        started_at TEXT NOT NULL,
        end_at TEXT NOT NULL,
        placement TEXT,
        spec TEXT NOT NULL
    );
    CREATE INDEX sandboxes_team ON sandboxes(team_id, started_at);",
    // 2: warm pools (see pool_store.rs).
    crate::pool_store::MIGRATION_POOLS,
    // 3: E2B's lifecycle.autoResume: traffic to a paused sandbox resumes it for this many seconds.
    "ALTER TABLE sandboxes ADD COLUMN auto_resume_secs INTEGER;",
    // 4: templates made from OCI images (see image_templates.rs).
    crate::image_templates::MIGRATION_IMAGE_TEMPLATES,
    // 5: commits and registry secrets (see commit.rs).
    crate::commit::MIGRATION_COMMITS,
    // 6: when a sandbox was frozen, the idle clock of auto-hibernation, so that a restart
    // neither resets it (a sandbox paused for hours would wait again) nor loses it.
    "ALTER TABLE sandboxes ADD COLUMN paused_at TEXT;",
    // 7: checkpoints (see checkpoint.rs).
    crate::checkpoint::MIGRATION_CHECKPOINTS,
];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("corrupt record {id}: {reason}")]
    Corrupt { id: String, reason: String },
    #[error("sandbox {0} has no record")]
    Missing(String),
    #[error("sandbox {id}: {source}")]
    Illegal {
        id: String,
        #[source]
        source: IllegalTransition,
    },
    #[error("database worker failed: {0}")]
    Worker(String),
    #[error("database schema version {found} is newer than this daemon knows ({known})")]
    TooNew { found: i64, known: usize },
}

/// One sandbox as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxRecord {
    pub id: String,
    pub template_id: String,
    pub team_id: String,
    pub api_key_id: String,
    pub state: SandboxState,
    pub metadata: BTreeMap<String, String>,
    pub env_vars: BTreeMap<String, String>,
    pub envd_access_token: String,
    pub cpu_count: u32,
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub allow_internet: bool,
    pub auto_pause: bool,
    /// When set, traffic for the sandbox while it is paused resumes it with this timeout
    /// (E2B's `lifecycle.auto_resume`, which resumes with the timeout given at create).
    pub auto_resume_secs: Option<u32>,
    pub started_at: DateTime<Utc>,
    pub end_at: DateTime<Utc>,
    pub placement: Option<Placement>,
    pub spec: SandboxSpec,
}

#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    /// Where state changes are recorded, when the daemon keeps an audit log.
    audit: Option<AuditLog>,
}

impl Store {
    /// Opens (creating if needed) `<data_dir>/warren.db` and migrates it.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        Self::from_connection(Connection::open(data_dir.join("warren.db"))?)
    }

    /// A private in-memory database, for tests.
    pub fn open_in_memory() -> Result<Store, StoreError> {
        Self::from_connection(Connection::open_in_memory()?)
    }

    fn from_connection(mut conn: Connection) -> Result<Store, StoreError> {
        // journal_mode returns a row, so it is queried rather than executed.
        let _: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut conn)?;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            audit: None,
        })
    }

    /// Records every state change from now on in `audit`.
    pub fn with_audit(mut self, audit: AuditLog) -> Store {
        self.audit = Some(audit);
        self
    }

    pub fn audit(&self) -> Option<&AuditLog> {
        self.audit.as_ref()
    }

    /// Records a state change of `rec` (already committed).
    pub(crate) fn audit_transition(
        &self,
        rec: &SandboxRecord,
        from: Option<SandboxState>,
        event: &str,
    ) {
        if let Some(audit) = &self.audit {
            let action = match from {
                Some(from) => format!("{from} -> {}", rec.state),
                None => format!("-> {}", rec.state),
            };
            audit.record(
                AuditEvent::new(AuditKind::Lifecycle, &rec.team_id, &rec.api_key_id, action)
                    .sandbox(&rec.id)
                    .detail(serde_json::json!({ "event": event, "template": rec.template_id })),
            );
        }
    }

    /// Runs `f` with the connection on the blocking pool.
    pub(crate) async fn with<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock poisons it; the connection itself is still usable
            // because every write is a transaction that rolled back.
            let mut guard = conn.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Worker(e.to_string()))?
    }

    pub async fn insert(&self, rec: SandboxRecord) -> Result<(), StoreError> {
        let store = self.clone();
        self.with(move |c| {
            let tx = c.transaction()?;
            write_row(&tx, &rec, true)?;
            tx.commit()?;
            store.audit_transition(&rec, None, "Insert");
            Ok(())
        })
        .await
    }

    pub async fn get(&self, id: &str) -> Result<Option<SandboxRecord>, StoreError> {
        let id = id.to_string();
        self.with(move |c| read_row(c, &id)).await
    }

    /// Every stored sandbox (terminal ones are never stored), oldest first.
    pub async fn list_all(&self) -> Result<Vec<SandboxRecord>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT * FROM sandboxes ORDER BY started_at, id")?;
            let rows = stmt.query_map([], row_to_record)?;
            rows.map(|r| r?).collect()
        })
        .await
    }

    /// The sandboxes of one team, oldest first.
    pub async fn list_team(&self, team_id: &str) -> Result<Vec<SandboxRecord>, StoreError> {
        let team = team_id.to_string();
        self.with(move |c| {
            let mut stmt =
                c.prepare("SELECT * FROM sandboxes WHERE team_id = ?1 ORDER BY started_at, id")?;
            let rows = stmt.query_map([team], row_to_record)?;
            rows.map(|r| r?).collect()
        })
        .await
    }

    /// Applies `event` to the stored state in one transaction and lets `update` change other fields
    /// in that same transaction. Reaching a terminal state deletes the row. Returns the record as
    /// it now is (with the terminal state, for a deleted one).
    pub async fn apply(
        &self,
        id: &str,
        event: Event,
        update: impl FnOnce(&mut SandboxRecord) + Send + 'static,
    ) -> Result<SandboxRecord, StoreError> {
        let id = id.to_string();
        let store = self.clone();
        self.with(move |c| {
            let tx = c.transaction()?;
            let mut rec = read_row(&tx, &id)?.ok_or_else(|| StoreError::Missing(id.clone()))?;
            let from = rec.state;
            rec.state = transition(rec.state, event).map_err(|source| StoreError::Illegal {
                id: id.clone(),
                source,
            })?;
            update(&mut rec);
            if rec.state.is_terminal() {
                tx.execute("DELETE FROM sandboxes WHERE id = ?1", [&id])?;
            } else {
                write_row(&tx, &rec, false)?;
            }
            tx.commit()?;
            store.audit_transition(&rec, Some(from), &format!("{event:?}"));
            Ok(rec)
        })
        .await
    }

    /// Changes fields other than the state (and the deadline) in one transaction; the record
    /// must be in a state `allowed` accepts, checked inside the transaction.
    pub async fn update(
        &self,
        id: &str,
        allowed: impl FnOnce(SandboxState) -> bool + Send + 'static,
        update: impl FnOnce(&mut SandboxRecord) + Send + 'static,
    ) -> Result<SandboxRecord, StoreError> {
        let id = id.to_string();
        self.with(move |c| {
            let tx = c.transaction()?;
            let mut rec = read_row(&tx, &id)?.ok_or_else(|| StoreError::Missing(id.clone()))?;
            if !allowed(rec.state) {
                return Err(StoreError::Missing(id));
            }
            update(&mut rec);
            write_row(&tx, &rec, false)?;
            tx.commit()?;
            Ok(rec)
        })
        .await
    }

    /// Sets or clears when the sandbox was frozen (the auto-hibernation clock). Not part of
    /// [`SandboxRecord`]: only the idle clock reads it, and record writes leave it alone.
    pub async fn set_paused_at(
        &self,
        id: &str,
        at: Option<DateTime<Utc>>,
    ) -> Result<(), StoreError> {
        let id = id.to_string();
        self.with(move |c| {
            c.execute(
                "UPDATE sandboxes SET paused_at = ?2 WHERE id = ?1",
                params![id, at.as_ref().map(ts)],
            )?;
            Ok(())
        })
        .await
    }

    /// When the sandbox was frozen, if that was recorded.
    pub async fn paused_at(&self, id: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        let id = id.to_string();
        self.with(move |c| {
            let raw: Option<Option<String>> = c
                .query_row(
                    "SELECT paused_at FROM sandboxes WHERE id = ?1",
                    [&id],
                    |r| r.get(0),
                )
                .optional()?;
            raw.flatten()
                .map(|s| {
                    DateTime::parse_from_rfc3339(&s)
                        .map(|t| t.with_timezone(&Utc))
                        .map_err(|e| StoreError::Corrupt {
                            id: id.clone(),
                            reason: format!("paused_at {s:?}: {e}"),
                        })
                })
                .transpose()
        })
        .await
    }

    /// Changes a sandbox's deadline (not a state change). `only_if_later` makes it an extension
    /// that never shortens, decided inside the transaction.
    pub async fn set_end_at(
        &self,
        id: &str,
        end_at: DateTime<Utc>,
        only_if_later: bool,
    ) -> Result<SandboxRecord, StoreError> {
        let id = id.to_string();
        self.with(move |c| {
            let tx = c.transaction()?;
            let mut rec = read_row(&tx, &id)?.ok_or_else(|| StoreError::Missing(id.clone()))?;
            if !only_if_later || end_at > rec.end_at {
                rec.end_at = end_at;
                write_row(&tx, &rec, false)?;
            }
            tx.commit()?;
            Ok(rec)
        })
        .await
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version as usize > MIGRATIONS.len() {
        return Err(StoreError::TooNew {
            found: version,
            known: MIGRATIONS.len(),
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        // user_version cannot be bound as a parameter; the value is our own integer.
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
        tx.commit()?;
    }
    Ok(())
}

fn ts(t: &DateTime<Utc>) -> String {
    // Fixed-width RFC 3339 with nanoseconds so that text order is time order.
    t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("plain data serializes")
}

pub(crate) fn write_row(
    conn: &Connection,
    r: &SandboxRecord,
    insert: bool,
) -> Result<(), StoreError> {
    let sql = if insert {
        "INSERT INTO sandboxes (id, template_id, team_id, api_key_id, state, metadata, env_vars,
            envd_access_token, cpu_count, memory_mb, disk_mb, allow_internet, auto_pause,
            started_at, end_at, placement, spec, auto_resume_secs)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)"
    } else {
        "UPDATE sandboxes SET template_id=?2, team_id=?3, api_key_id=?4, state=?5, metadata=?6,
            env_vars=?7, envd_access_token=?8, cpu_count=?9, memory_mb=?10, disk_mb=?11,
            allow_internet=?12, auto_pause=?13, started_at=?14, end_at=?15, placement=?16, spec=?17,
            auto_resume_secs=?18
         WHERE id=?1"
    };
    conn.execute(
        sql,
        params![
            r.id,
            r.template_id,
            r.team_id,
            r.api_key_id,
            r.state.as_str(),
            json(&r.metadata),
            json(&r.env_vars),
            r.envd_access_token,
            r.cpu_count,
            r.memory_mb as i64,
            r.disk_mb as i64,
            r.allow_internet,
            r.auto_pause,
            ts(&r.started_at),
            ts(&r.end_at),
            r.placement.as_ref().map(json),
            json(&r.spec),
            r.auto_resume_secs,
        ],
    )?;
    Ok(())
}

pub(crate) fn read_row(conn: &Connection, id: &str) -> Result<Option<SandboxRecord>, StoreError> {
    conn.query_row("SELECT * FROM sandboxes WHERE id = ?1", [id], row_to_record)
        .optional()?
        .transpose()
}

/// Decodes a row; the outer `Result` is SQLite's, the inner one our own decoding.
pub(crate) fn row_to_record(row: &Row<'_>) -> rusqlite::Result<Result<SandboxRecord, StoreError>> {
    let id: String = row.get("id")?;
    let state: String = row.get("state")?;
    let metadata: String = row.get("metadata")?;
    let env_vars: String = row.get("env_vars")?;
    let started_at: String = row.get("started_at")?;
    let end_at: String = row.get("end_at")?;
    let placement: Option<String> = row.get("placement")?;
    let spec: String = row.get("spec")?;
    let memory_mb: i64 = row.get("memory_mb")?;
    let disk_mb: i64 = row.get("disk_mb")?;
    let template_id = row.get("template_id")?;
    let team_id = row.get("team_id")?;
    let api_key_id = row.get("api_key_id")?;
    let envd_access_token = row.get("envd_access_token")?;
    let cpu_count = row.get("cpu_count")?;
    let allow_internet = row.get("allow_internet")?;
    let auto_pause = row.get("auto_pause")?;
    let auto_resume_secs = row.get("auto_resume_secs")?;

    let corrupt = |reason: String| StoreError::Corrupt {
        id: id.clone(),
        reason,
    };
    let decode = || -> Result<SandboxRecord, StoreError> {
        let time = |s: &str| {
            DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| corrupt(format!("timestamp {s:?}: {e}")))
        };
        Ok(SandboxRecord {
            id: id.clone(),
            template_id,
            team_id,
            api_key_id,
            state: state.parse().map_err(corrupt)?,
            metadata: serde_json::from_str(&metadata)
                .map_err(|e| corrupt(format!("metadata: {e}")))?,
            env_vars: serde_json::from_str(&env_vars)
                .map_err(|e| corrupt(format!("env_vars: {e}")))?,
            envd_access_token,
            cpu_count,
            memory_mb: memory_mb as u64,
            disk_mb: disk_mb as u64,
            allow_internet,
            auto_pause,
            auto_resume_secs,
            started_at: time(&started_at)?,
            end_at: time(&end_at)?,
            placement: placement
                .map(|p| serde_json::from_str(&p))
                .transpose()
                .map_err(|e| corrupt(format!("placement: {e}")))?,
            spec: serde_json::from_str(&spec).map_err(|e| corrupt(format!("spec: {e}")))?,
        })
    };
    Ok(decode())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use warren_runtime::{EnvdSettings, NetworkPolicy, Resources, RootfsSpec};

    pub(crate) fn record(id: &str, team: &str) -> SandboxRecord {
        let now = Utc::now();
        SandboxRecord {
            id: id.into(),
            template_id: "base".into(),
            team_id: team.into(),
            api_key_id: "k".into(),
            state: SandboxState::Creating,
            metadata: BTreeMap::from([("a".into(), "b".into())]),
            env_vars: BTreeMap::new(),
            envd_access_token: "t".repeat(32),
            cpu_count: 2,
            memory_mb: 512,
            disk_mb: 1024,
            allow_internet: true,
            auto_pause: false,
            auto_resume_secs: None,
            started_at: now,
            end_at: now + chrono::Duration::seconds(300),
            placement: None,
            spec: SandboxSpec {
                id: id.into(),
                rootfs: RootfsSpec {
                    lower_dirs: vec!["/x".into()],
                    ro_binds: vec![],
                },
                resources: Resources::default(),
                network: NetworkPolicy::default(),
                envd: EnvdSettings::default(),
            },
        }
    }

    #[tokio::test]
    async fn insert_apply_and_terminal_delete() {
        let s = Store::open_in_memory().unwrap();
        let rec = record("abc", "t1");
        s.insert(rec.clone()).await.unwrap();
        assert_eq!(s.get("abc").await.unwrap(), Some(rec));

        let placement = Placement {
            init_pid: 1,
            init_start_ticks: 2,
            ip: "10.0.0.2".parse().unwrap(),
            veth: "v".into(),
        };
        let p2 = placement.clone();
        let r = s
            .apply("abc", Event::Started, move |r| r.placement = Some(p2))
            .await
            .unwrap();
        assert_eq!(r.state, SandboxState::Running);
        let got = s.get("abc").await.unwrap().unwrap();
        assert_eq!(got.placement, Some(placement));
        assert_eq!(got.state, SandboxState::Running);

        // Illegal transitions are refused against the stored state and change nothing.
        let err = s.apply("abc", Event::Started, |_| {}).await.unwrap_err();
        assert!(matches!(err, StoreError::Illegal { .. }));

        s.apply("abc", Event::Kill, |_| {}).await.unwrap();
        let r = s.apply("abc", Event::Destroyed, |_| {}).await.unwrap();
        assert_eq!(r.state, SandboxState::Killed);
        assert_eq!(s.get("abc").await.unwrap(), None);
        assert!(matches!(
            s.apply("abc", Event::Kill, |_| {}).await,
            Err(StoreError::Missing(_))
        ));
    }

    #[tokio::test]
    async fn end_at_extension_never_shortens() {
        let s = Store::open_in_memory().unwrap();
        let rec = record("x1", "t");
        let end = rec.end_at;
        s.insert(rec).await.unwrap();
        let earlier = end - chrono::Duration::seconds(10);
        assert_eq!(s.set_end_at("x1", earlier, true).await.unwrap().end_at, end);
        assert_eq!(
            s.set_end_at("x1", earlier, false).await.unwrap().end_at,
            earlier
        );
    }

    #[tokio::test]
    async fn survives_reopen_and_lists_by_team() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.insert(record("a1", "t1")).await.unwrap();
            s.insert(record("a2", "t2")).await.unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.list_all().await.unwrap().len(), 2);
        let t1 = s.list_team("t1").await.unwrap();
        assert_eq!(t1.len(), 1);
        assert_eq!(t1[0].id, "a1");
    }
}
