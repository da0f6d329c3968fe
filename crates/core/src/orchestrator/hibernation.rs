//! Hibernation: a paused (frozen) sandbox idle longer than `hibernate_after` has its process tree
//! dumped to disk with CRIU, so its memory goes back to the host; a connect wakes it again
//! transparently. To E2B clients both forms are `paused`: `pause()` freezes (the fastest resume),
//! the daemon decides when memory is worth giving back.
//!
//! The `persistentContents` of a paused sandbox say what it keeps: a frozen one keeps `memory`
//! (in RAM), `filesystem` and `ip`; a hibernated one the same, with its memory on disk.

use super::{ConnectOutcome, Warren};
use crate::auth::Principal;
use crate::error::CoreError;
use crate::state::{Event, SandboxState};
use crate::store::SandboxRecord;
use chrono::{DateTime, Utc};
use warren_runtime::RuntimeError;

/// What a sandbox keeps while it is paused (the talk's `persistentContents`).
pub fn persistent_contents(state: SandboxState) -> &'static [&'static str] {
    match state {
        SandboxState::Paused
        | SandboxState::Resuming
        | SandboxState::Pausing
        | SandboxState::Hibernating
        | SandboxState::Hibernated
        | SandboxState::Waking => &["memory", "filesystem", "ip"],
        _ => &[],
    }
}

/// Where a paused sandbox's memory is, for clients that care (`warren sandbox list`).
pub fn memory_location(state: SandboxState) -> Option<&'static str> {
    match state {
        SandboxState::Paused | SandboxState::Pausing | SandboxState::Resuming => Some("ram"),
        SandboxState::Hibernating | SandboxState::Hibernated | SandboxState::Waking => Some("disk"),
        _ => None,
    }
}

fn unavailable(e: RuntimeError) -> CoreError {
    match e {
        RuntimeError::CheckpointUnavailable(why) => {
            CoreError::Unavailable(format!("hibernation is not available on this host: {why}"))
        }
        e => e.into(),
    }
}

impl Warren {
    /// Why hibernation cannot work on this host, if it cannot (reported at start and on the API).
    pub fn hibernate_support(&self) -> Result<(), String> {
        self.runtime.hibernate_support()
    }

    /// Records when a sandbox was frozen, for the idle clock of auto-hibernation. Kept in the
    /// store so that a daemon restart neither restarts nor loses the clock.
    pub(super) async fn note_paused(&self, id: &str, at: Option<DateTime<Utc>>) {
        if let Err(e) = self.store.set_paused_at(id, at).await {
            // Only the hibernation clock suffers: it starts again at the next tick.
            tracing::warn!(sandbox = %id, error = %e, "cannot record the pause time");
        }
    }

    /// Whether a paused sandbox has been idle long enough to hibernate. A paused sandbox with
    /// no recorded pause time (stored by an older daemon) starts its idle clock now.
    pub(super) async fn due_for_hibernation(&self, id: &str, now: DateTime<Utc>) -> bool {
        let Some(after) = self.config.hibernate_after else {
            return false;
        };
        if self.runtime.hibernate_support().is_err() {
            return false;
        }
        let since = match self.store.paused_at(id).await {
            Ok(Some(t)) => t,
            Ok(None) => {
                self.note_paused(id, Some(now)).await;
                now
            }
            Err(e) => {
                tracing::warn!(sandbox = %id, error = %e, "cannot read the pause time");
                return false;
            }
        };
        let after = chrono::Duration::from_std(after).unwrap_or(chrono::Duration::MAX);
        now - since >= after
    }

    /// Hibernates a sandbox now (`POST /warren/v1/sandboxes/{id}/hibernate`, `warren sandbox
    /// hibernate`): a running one is paused first. Idempotent for a hibernated one.
    pub async fn hibernate(&self, who: &Principal, id: &str) -> Result<SandboxRecord, CoreError> {
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let rec = self.visible(who, id).await?;
        self.runtime.hibernate_support().map_err(|why| {
            CoreError::Unavailable(format!("hibernation is not available on this host: {why}"))
        })?;
        match rec.state {
            SandboxState::Hibernated => return Ok(rec),
            SandboxState::Running => self.pause_locked(id).await?,
            SandboxState::Paused => {}
            other => {
                return Err(CoreError::Conflict(format!(
                    "sandbox {id} is {other}, try again"
                )))
            }
        }
        self.hibernate_locked(id).await
    }

    /// Paused → Hibernated. On failure the sandbox stays paused (frozen in RAM).
    pub(super) async fn hibernate_locked(&self, id: &str) -> Result<SandboxRecord, CoreError> {
        self.store.apply(id, Event::Hibernate, |_| {}).await?;
        self.finish_hibernate(id).await
    }

    async fn finish_hibernate(&self, id: &str) -> Result<SandboxRecord, CoreError> {
        match self.runtime.hibernate(id).await {
            Ok(stats) => {
                let rec = self.store.apply(id, Event::HibernateDone, |_| {}).await?;
                self.note_paused(id, None).await;
                tracing::info!(
                    sandbox = %id,
                    image_bytes = stats.bytes,
                    dump_ms = stats.duration.as_millis() as u64,
                    "sandbox hibernated"
                );
                Ok(rec)
            }
            Err(e) => {
                self.store.apply(id, Event::HibernateFailed, |_| {}).await?;
                // The clock starts again, so a dump that keeps failing is retried once per
                // `hibernate_after`, not at every tick.
                self.note_paused(id, Some(self.clock.now())).await;
                tracing::warn!(sandbox = %id, error = %e, "hibernation failed; the sandbox stays frozen");
                Err(unavailable(e))
            }
        }
    }

    /// Hibernated → Running, with the deadline now + timeout.
    pub(super) async fn wake_locked(
        &self,
        id: &str,
        timeout: chrono::Duration,
    ) -> Result<(SandboxRecord, ConnectOutcome), CoreError> {
        self.store.apply(id, Event::Wake, |_| {}).await?;
        match self.runtime.wake(id).await {
            Ok(placement) => {
                let end_at = self.clock.now() + timeout;
                let rec = self
                    .store
                    .apply(id, Event::WakeDone, move |r| {
                        r.end_at = end_at;
                        r.placement = Some(placement);
                    })
                    .await?;
                self.set_route(&rec);
                self.runtime.release_wake_images(id).await;
                tracing::info!(sandbox = %id, "sandbox woken from hibernation");
                Ok((rec, ConnectOutcome::Resumed))
            }
            Err(e) => {
                self.store.apply(id, Event::WakeFailed, |_| {}).await?;
                tracing::error!(sandbox = %id, error = %e, "wake failed; the sandbox stays hibernated");
                Err(unavailable(e))
            }
        }
    }

    /// Recovery of a sandbox stored in a hibernation state. Returns whether it lives on.
    pub(super) async fn recover_hibernation(&self, rec: &SandboxRecord) -> Result<bool, CoreError> {
        let id = &rec.id;
        let Some(placement) = &rec.placement else {
            self.kill_locked(id).await?;
            return Ok(false);
        };
        match rec.state {
            // A dump a crash interrupted: if the tree still runs, it stays paused; if the
            // images were completed, it is hibernated.
            SandboxState::Hibernating => {
                if self.runtime.adopt(id, placement).await.unwrap_or(false) {
                    self.store.apply(id, Event::HibernateFailed, |_| {}).await?;
                    let _ = self.runtime.freeze(id).await;
                    // What the cut dump wrote is of no use.
                    self.runtime.release_wake_images(id).await;
                    return Ok(true);
                }
                if self.runtime.adopt_hibernated(id, placement).await? {
                    self.store.apply(id, Event::HibernateDone, |_| {}).await?;
                    return Ok(true);
                }
            }
            SandboxState::Hibernated | SandboxState::Waking => {
                if self.runtime.adopt_hibernated(id, placement).await? {
                    if rec.state == SandboxState::Waking {
                        self.store.apply(id, Event::WakeFailed, |_| {}).await?;
                    }
                    return Ok(true);
                }
            }
            _ => return Ok(true),
        }
        tracing::info!(sandbox = %id, "hibernated sandbox cannot be restored; removing it");
        self.kill_locked(id).await?;
        Ok(false)
    }
}
