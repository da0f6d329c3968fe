//! The audit log: an append-only record of what was done, to which sandbox, by whom.
//!
//! It lives in its own SQLite database (`<data_dir>/audit.db`), apart from the sandbox store, so
//! that a busy log never holds the store's lock and the two evolve separately. Triggers make the
//! table append-only: SQLite refuses any `UPDATE` or `DELETE` of it.
//!
//! Writers never wait for the disk: [`AuditLog::record`] hands the event to a bounded channel and
//! one writer thread inserts events in batches (one transaction per batch). Only when the writer
//! is [`QUEUE`] events behind does a caller wait for room, so that nothing is dropped.

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Events that may wait in memory for the writer.
const QUEUE: usize = 65_536;
/// Events per insert transaction at most.
const BATCH: usize = 1_024;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ts TEXT NOT NULL,
    kind TEXT NOT NULL,
    team TEXT NOT NULL,
    key_id TEXT NOT NULL,
    sandbox TEXT,
    action TEXT NOT NULL,
    detail TEXT NOT NULL,
    result TEXT NOT NULL,
    duration_ms REAL
);
CREATE INDEX IF NOT EXISTS audit_sandbox ON audit(sandbox, seq);
CREATE INDEX IF NOT EXISTS audit_key ON audit(key_id, seq);
CREATE INDEX IF NOT EXISTS audit_ts ON audit(ts);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
";

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("audit database {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
}

/// What kind of thing happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditKind {
    /// A call on the REST API.
    Api,
    /// A process started in a sandbox through envd (and how it ended).
    Process,
    /// A file written, moved or removed through envd.
    File,
    /// A change of a sandbox's network rules.
    Network,
    /// A state change of a sandbox.
    Lifecycle,
}

impl AuditKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::Api => "api",
            AuditKind::Process => "process",
            AuditKind::File => "file",
            AuditKind::Network => "network",
            AuditKind::Lifecycle => "lifecycle",
        }
    }

    pub fn parse(s: &str) -> Option<AuditKind> {
        Some(match s {
            "api" => AuditKind::Api,
            "process" => AuditKind::Process,
            "file" => AuditKind::File,
            "network" => AuditKind::Network,
            "lifecycle" => AuditKind::Lifecycle,
            _ => return None,
        })
    }
}

/// One entry. `seq` is assigned by the log (0 before it is written).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub seq: i64,
    pub ts: DateTime<Utc>,
    pub kind: AuditKind,
    pub team: String,
    pub key_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// What was done: `POST /v2/sandboxes`, `start`, `write`, `Running -> Paused`...
    pub action: String,
    /// Details as JSON (a command and its user, a path, the new rules...).
    pub detail: serde_json::Value,
    /// `ok`, an HTTP status, an exit code...
    pub result: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<f64>,
}

impl AuditEvent {
    pub fn new(kind: AuditKind, team: &str, key_id: &str, action: impl Into<String>) -> Self {
        AuditEvent {
            seq: 0,
            ts: Utc::now(),
            kind,
            team: team.to_string(),
            key_id: key_id.to_string(),
            sandbox: None,
            action: action.into(),
            detail: serde_json::Value::Null,
            result: "ok".into(),
            duration_ms: None,
        }
    }

    pub fn sandbox(mut self, id: &str) -> Self {
        self.sandbox = Some(id.to_string());
        self
    }

    pub fn detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = detail;
        self
    }

    pub fn result(mut self, result: impl Into<String>) -> Self {
        self.result = result.into();
        self
    }

    pub fn duration(mut self, d: Duration) -> Self {
        self.duration_ms = Some(d.as_secs_f64() * 1000.0);
        self
    }
}

/// A query; every set field must match. Results are in `seq` order, oldest first.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Only this team's events (the API always sets it to the caller's team).
    pub team: Option<String>,
    pub sandbox: Option<String>,
    pub key_id: Option<String>,
    pub kind: Option<AuditKind>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Events after this sequence number (paging).
    pub after: Option<i64>,
    pub limit: Option<u32>,
}

/// Handle to the log; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: SyncSender<Msg>,
    reader: Arc<Mutex<Connection>>,
}

enum Msg {
    Event(Box<AuditEvent>),
    /// Answered once every event sent before it is on disk.
    Flush(SyncSender<()>),
}

fn open_connection(path: &Path) -> Result<Connection, AuditError> {
    let open = |e| AuditError::Open {
        path: path.display().to_string(),
        source: e,
    };
    let conn = Connection::open(path).map_err(open)?;
    let _: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(open)?;
    conn.execute_batch("PRAGMA synchronous=NORMAL;")
        .map_err(open)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(open)?;
    Ok(conn)
}

impl AuditLog {
    /// Opens (creating) `<data_dir>/audit.db` and starts its writer thread.
    pub fn open(data_dir: &Path) -> Result<AuditLog, AuditError> {
        let path = data_dir.join("audit.db");
        let writer = open_connection(&path)?;
        writer.execute_batch(SCHEMA)?;
        let reader = open_connection(&path)?;
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("warren-audit".into())
            .spawn(move || write_loop(writer, rx))
            .map_err(|e| AuditError::Open {
                path: path.display().to_string(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        Ok(AuditLog {
            tx,
            reader: Arc::new(Mutex::new(reader)),
        })
    }

    /// Queues an event. Returns at once unless the writer is far behind.
    pub fn record(&self, event: AuditEvent) {
        match self.tx.try_send(Msg::Event(Box::new(event))) {
            Ok(()) => {}
            Err(TrySendError::Full(msg)) => {
                // Wait for room rather than lose the event.
                let _ = self.tx.send(msg);
            }
            Err(TrySendError::Disconnected(_)) => {
                tracing::error!("audit writer is gone; event not recorded");
            }
        }
    }

    /// Waits until every event recorded before this call is on disk.
    pub fn flush(&self) {
        let (done_tx, done_rx) = sync_channel(1);
        if self.tx.send(Msg::Flush(done_tx)).is_ok() {
            let _ = done_rx.recv();
        }
    }

    /// Events matching `q` (blocking: call from a blocking task).
    pub fn query(&self, q: &AuditQuery) -> Result<Vec<AuditEvent>, AuditError> {
        let mut sql = String::from(
            "SELECT seq, ts, kind, team, key_id, sandbox, action, detail, result, duration_ms \
             FROM audit WHERE 1=1",
        );
        let mut args: Vec<Box<dyn rusqlite::ToSql>> = Vec::new();
        let mut push = |clause: &str, v: Box<dyn rusqlite::ToSql>| {
            args.push(v);
            sql.push_str(&format!(" AND {clause} ?{}", args.len()));
        };
        if let Some(t) = &q.team {
            push("team =", Box::new(t.clone()));
        }
        if let Some(s) = &q.sandbox {
            push("sandbox =", Box::new(s.clone()));
        }
        if let Some(k) = &q.key_id {
            push("key_id =", Box::new(k.clone()));
        }
        if let Some(k) = q.kind {
            push("kind =", Box::new(k.as_str()));
        }
        if let Some(t) = q.since {
            push("ts >=", Box::new(ts(&t)));
        }
        if let Some(t) = q.until {
            push("ts <", Box::new(ts(&t)));
        }
        if let Some(a) = q.after {
            push("seq >", Box::new(a));
        }
        sql.push_str(" ORDER BY seq");
        if let Some(l) = q.limit {
            sql.push_str(&format!(" LIMIT {l}"));
        }
        let conn = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(args.iter()), |r| {
            let ts: String = r.get(1)?;
            let kind: String = r.get(2)?;
            let detail: String = r.get(7)?;
            Ok(AuditEvent {
                seq: r.get(0)?,
                ts: DateTime::parse_from_rfc3339(&ts)
                    .map(|t| t.with_timezone(&Utc))
                    .unwrap_or_default(),
                kind: AuditKind::parse(&kind).unwrap_or(AuditKind::Api),
                team: r.get(3)?,
                key_id: r.get(4)?,
                sandbox: r.get(5)?,
                action: r.get(6)?,
                detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
                result: r.get(8)?,
                duration_ms: r.get(9)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}

fn ts(t: &DateTime<Utc>) -> String {
    // Fixed width, so that text order is time order.
    t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

fn write_loop(mut conn: Connection, rx: Receiver<Msg>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let mut flushes = Vec::new();
        let result = (|| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO audit (ts, kind, team, key_id, sandbox, action, detail, result, \
                     duration_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )?;
                for m in batch {
                    match m {
                        Msg::Event(e) => {
                            insert.execute(params![
                                ts(&e.ts),
                                e.kind.as_str(),
                                e.team,
                                e.key_id,
                                e.sandbox,
                                e.action,
                                e.detail.to_string(),
                                e.result,
                                e.duration_ms,
                            ])?;
                        }
                        Msg::Flush(done) => flushes.push(done),
                    }
                }
            }
            tx.commit()
        })();
        if let Err(e) = result {
            tracing::error!(error = %e, "audit: cannot write events");
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_queries_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path()).unwrap();
        log.record(
            AuditEvent::new(AuditKind::Process, "t1", "k1", "start")
                .sandbox("sb1")
                .detail(serde_json::json!({"cmd": "echo hi"}))
                .result("0")
                .duration(Duration::from_millis(5)),
        );
        log.record(AuditEvent::new(
            AuditKind::Api,
            "t2",
            "k2",
            "GET /sandboxes",
        ));
        log.record(
            AuditEvent::new(AuditKind::Lifecycle, "t1", "k1", "Running -> Paused").sandbox("sb2"),
        );
        log.flush();

        let all = log.query(&AuditQuery::default()).unwrap();
        assert_eq!(all.len(), 3);
        assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
        let q = |q: AuditQuery| log.query(&q).unwrap();
        let sb1 = q(AuditQuery {
            sandbox: Some("sb1".into()),
            ..Default::default()
        });
        assert_eq!(sb1.len(), 1);
        assert_eq!(sb1[0].detail["cmd"], "echo hi");
        assert_eq!(sb1[0].result, "0");
        assert!((sb1[0].duration_ms.unwrap() - 5.0).abs() < 0.01);
        let team1 = q(AuditQuery {
            team: Some("t1".into()),
            ..Default::default()
        });
        assert_eq!(team1.len(), 2);
        let by_kind = q(AuditQuery {
            kind: Some(AuditKind::Api),
            key_id: Some("k2".into()),
            ..Default::default()
        });
        assert_eq!(by_kind.len(), 1);
        let paged = q(AuditQuery {
            after: Some(all[0].seq),
            limit: Some(1),
            ..Default::default()
        });
        assert_eq!(paged, vec![all[1].clone()]);
        let future = q(AuditQuery {
            since: Some(Utc::now() + chrono::Duration::hours(1)),
            ..Default::default()
        });
        assert!(future.is_empty());
        drop(log);

        let again = AuditLog::open(dir.path()).unwrap();
        assert_eq!(again.query(&AuditQuery::default()).unwrap(), all);
    }

    #[test]
    fn the_table_is_append_only() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path()).unwrap();
        log.record(AuditEvent::new(AuditKind::Api, "t", "k", "x"));
        log.flush();
        let conn = open_connection(&dir.path().join("audit.db")).unwrap();
        let upd = conn.execute("UPDATE audit SET action = 'y'", []);
        assert!(upd.unwrap_err().to_string().contains("append-only"));
        let del = conn.execute("DELETE FROM audit", []);
        assert!(del.unwrap_err().to_string().contains("append-only"));
        assert_eq!(log.query(&AuditQuery::default()).unwrap().len(), 1);
    }
}
