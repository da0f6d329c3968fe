//! The store's part of warm pools: pool membership, the atomic claim, and the declarative objects.
//!
//! A pool member is an ordinary row of `sandboxes` (state `pooled` while it waits) plus a row of
//! `pool_members` naming its pool and the template revision it was made from. The membership row
//! goes away with the sandbox row (`ON DELETE CASCADE`), so counts never include dead members.

use crate::state::{transition, Event, SandboxState};
use crate::store::{read_row, row_to_record, write_row, SandboxRecord, Store, StoreError};
use rusqlite::{params, OptionalExtension};

pub(crate) const MIGRATION_POOLS: &str = "
    CREATE TABLE pool_members (
        sandbox_id TEXT PRIMARY KEY REFERENCES sandboxes(id) ON DELETE CASCADE,
        pool TEXT NOT NULL,
        revision TEXT NOT NULL,
        claimed INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX pool_members_pool ON pool_members(pool, claimed);
    CREATE TABLE sandbox_sets (name TEXT PRIMARY KEY, object TEXT NOT NULL);
    CREATE TABLE pooling_autoscalers (name TEXT PRIMARY KEY, object TEXT NOT NULL, status TEXT);";

/// One member of a pool as stored.
#[derive(Debug, Clone)]
pub struct MemberRecord {
    pub sandbox: SandboxRecord,
    pub pool: String,
    pub revision: String,
    pub claimed: bool,
}

/// Tables of declarative objects.
#[derive(Debug, Clone, Copy)]
pub enum ObjectTable {
    SandboxSets,
    Autoscalers,
}

impl ObjectTable {
    fn name(self) -> &'static str {
        match self {
            ObjectTable::SandboxSets => "sandbox_sets",
            ObjectTable::Autoscalers => "pooling_autoscalers",
        }
    }
}

impl Store {
    /// Records a new pool member (state `creating`) and its membership in one transaction.
    pub async fn insert_member(
        &self,
        rec: SandboxRecord,
        pool: &str,
        revision: &str,
    ) -> Result<(), StoreError> {
        let (pool, revision) = (pool.to_string(), revision.to_string());
        let store = self.clone();
        self.with(move |c| {
            let tx = c.transaction()?;
            write_row(&tx, &rec, true)?;
            tx.execute(
                "INSERT INTO pool_members (sandbox_id, pool, revision) VALUES (?1, ?2, ?3)",
                params![rec.id, pool, revision],
            )?;
            tx.commit()?;
            store.audit_transition(&rec, None, "InsertMember");
            Ok(())
        })
        .await
    }

    /// Every member of every pool, claimed or not, oldest first.
    pub async fn members(&self) -> Result<Vec<MemberRecord>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT s.*, m.pool AS m_pool, m.revision AS m_revision, m.claimed AS m_claimed
                 FROM sandboxes s JOIN pool_members m ON m.sandbox_id = s.id
                 ORDER BY s.started_at, s.id",
            )?;
            let rows = stmt.query_map([], |row| {
                let rec = row_to_record(row)?;
                Ok(rec.map(|sandbox| MemberRecord {
                    sandbox,
                    pool: row.get("m_pool").unwrap_or_default(),
                    revision: row.get("m_revision").unwrap_or_default(),
                    claimed: row.get("m_claimed").unwrap_or(false),
                }))
            })?;
            rows.map(|r| r?).collect()
        })
        .await
    }

    /// The claim: in one transaction, takes the oldest `pooled` member of `pool` made from
    /// `revision` (with the wanted internet access), moves it to `claiming`, marks it claimed and
    /// lets `update` hand it to its new owner. SQLite serialises write transactions, so two
    /// concurrent claims can never take the same member. `None` when the pool has no such member.
    pub async fn claim_member(
        &self,
        pool: &str,
        revision: &str,
        allow_internet: bool,
        update: impl FnOnce(&mut SandboxRecord) + Send + 'static,
    ) -> Result<Option<SandboxRecord>, StoreError> {
        let (pool, revision) = (pool.to_string(), revision.to_string());
        let store = self.clone();
        self.with(move |c| {
            let tx = c.transaction()?;
            let id: Option<String> = tx
                .query_row(
                    "SELECT s.id FROM sandboxes s JOIN pool_members m ON m.sandbox_id = s.id
                     WHERE m.pool = ?1 AND m.revision = ?2 AND m.claimed = 0
                       AND s.state = ?3 AND s.allow_internet = ?4
                     ORDER BY s.started_at, s.id LIMIT 1",
                    params![
                        pool,
                        revision,
                        SandboxState::Pooled.as_str(),
                        allow_internet
                    ],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(id) = id else {
                return Ok(None);
            };
            let mut rec = read_row(&tx, &id)?.ok_or_else(|| StoreError::Missing(id.clone()))?;
            rec.state =
                transition(rec.state, Event::Claim).map_err(|source| StoreError::Illegal {
                    id: id.clone(),
                    source,
                })?;
            update(&mut rec);
            write_row(&tx, &rec, false)?;
            tx.execute(
                "UPDATE pool_members SET claimed = 1 WHERE sandbox_id = ?1",
                [&id],
            )?;
            tx.commit()?;
            store.audit_transition(&rec, Some(SandboxState::Pooled), "Claim");
            Ok(Some(rec))
        })
        .await
    }

    /// Applies `event` only if the sandbox is still in state `from` (a scale-down must not kill a
    /// member that a claim took a moment ago). `None` when it is not (or is gone).
    pub async fn apply_if(
        &self,
        id: &str,
        from: SandboxState,
        event: Event,
    ) -> Result<Option<SandboxRecord>, StoreError> {
        let id = id.to_string();
        let store = self.clone();
        self.with(move |c| {
            let tx = c.transaction()?;
            let Some(mut rec) = read_row(&tx, &id)? else {
                return Ok(None);
            };
            if rec.state != from {
                return Ok(None);
            }
            rec.state = transition(rec.state, event).map_err(|source| StoreError::Illegal {
                id: id.clone(),
                source,
            })?;
            if rec.state.is_terminal() {
                tx.execute("DELETE FROM sandboxes WHERE id = ?1", [&id])?;
            } else {
                write_row(&tx, &rec, false)?;
            }
            tx.commit()?;
            store.audit_transition(&rec, Some(from), &format!("{event:?}"));
            Ok(Some(rec))
        })
        .await
    }

    /// Drops the membership of claimed members of a deleted pool: they are ordinary sandboxes now.
    pub async fn release_claimed(&self, pool: &str) -> Result<(), StoreError> {
        let pool = pool.to_string();
        self.with(move |c| {
            c.execute(
                "DELETE FROM pool_members WHERE pool = ?1 AND claimed = 1",
                [pool],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn put_object(
        &self,
        table: ObjectTable,
        name: &str,
        object: &serde_json::Value,
    ) -> Result<(), StoreError> {
        let (name, object) = (name.to_string(), object.to_string());
        let sql = format!(
            "INSERT INTO {} (name, object) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET object = excluded.object",
            table.name()
        );
        self.with(move |c| {
            c.execute(&sql, params![name, object])?;
            Ok(())
        })
        .await
    }

    /// Whether the object existed.
    pub async fn delete_object(&self, table: ObjectTable, name: &str) -> Result<bool, StoreError> {
        let name = name.to_string();
        let sql = format!("DELETE FROM {} WHERE name = ?1", table.name());
        self.with(move |c| Ok(c.execute(&sql, [name])? > 0)).await
    }

    pub async fn list_objects(
        &self,
        table: ObjectTable,
    ) -> Result<Vec<serde_json::Value>, StoreError> {
        let sql = format!("SELECT name, object FROM {} ORDER BY name", table.name());
        self.with(move |c| {
            let mut stmt = c.prepare(&sql)?;
            let rows =
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            rows.map(|r| {
                let (name, text) = r?;
                serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
                    id: name,
                    reason: e.to_string(),
                })
            })
            .collect()
        })
        .await
    }

    pub async fn set_autoscaler_status(
        &self,
        name: &str,
        status: &serde_json::Value,
    ) -> Result<(), StoreError> {
        let (name, status) = (name.to_string(), status.to_string());
        self.with(move |c| {
            c.execute(
                "UPDATE pooling_autoscalers SET status = ?2 WHERE name = ?1",
                params![name, status],
            )?;
            Ok(())
        })
        .await
    }

    /// The last persisted desired size of an autoscaler, so a restart does not reset it.
    pub async fn autoscaler_desired(&self, name: &str) -> Result<Option<u32>, StoreError> {
        let name = name.to_string();
        self.with(move |c| {
            let status: Option<Option<String>> = c
                .query_row(
                    "SELECT status FROM pooling_autoscalers WHERE name = ?1",
                    [name],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(status
                .flatten()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .and_then(|v| v["desiredReplicas"].as_u64())
                .map(|n| n as u32))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::record;
    use std::sync::Arc;

    #[tokio::test]
    async fn concurrent_claims_never_share_a_member() {
        let s = Store::open_in_memory().unwrap();
        for i in 0..20 {
            let rec = record(&format!("m{i:02}"), "");
            s.insert_member(rec, "p", "r1").await.unwrap();
            s.apply(&format!("m{i:02}"), Event::Warmed, |_| {})
                .await
                .unwrap();
        }
        let s = Arc::new(s);
        let mut tasks = vec![];
        for n in 0..50 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.claim_member("p", "r1", true, move |r| r.team_id = format!("t{n}"))
                    .await
                    .unwrap()
                    .map(|r| r.id)
            }));
        }
        let mut got = vec![];
        for t in tasks {
            if let Some(id) = t.await.unwrap() {
                got.push(id);
            }
        }
        assert_eq!(got.len(), 20, "exactly the 20 members were claimed");
        got.sort();
        got.dedup();
        assert_eq!(got.len(), 20, "no member was handed out twice");
        let members = s.members().await.unwrap();
        assert!(members
            .iter()
            .all(|m| m.claimed && m.sandbox.state == SandboxState::Claiming));
    }

    #[tokio::test]
    async fn claims_take_only_the_current_revision_and_membership_dies_with_the_row() {
        let s = Store::open_in_memory().unwrap();
        s.insert_member(record("old", ""), "p", "r1").await.unwrap();
        s.apply("old", Event::Warmed, |_| {}).await.unwrap();
        assert!(s
            .claim_member("p", "r2", true, |_| {})
            .await
            .unwrap()
            .is_none());
        assert!(s
            .claim_member("p", "r1", false, |_| {})
            .await
            .unwrap()
            .is_none());
        // A scale-down only kills a member that is still pooled.
        let killed = s
            .apply_if("old", SandboxState::Pooled, Event::Kill)
            .await
            .unwrap();
        assert_eq!(killed.unwrap().state, SandboxState::Killing);
        assert!(s
            .apply_if("old", SandboxState::Pooled, Event::Kill)
            .await
            .unwrap()
            .is_none());
        s.apply("old", Event::Destroyed, |_| {}).await.unwrap();
        assert!(s.members().await.unwrap().is_empty());
    }
}
