//! The sandbox lifecycle as an explicit state machine.
//!
//! Every state change of a sandbox, in the orchestrator and in recovery, goes through
//! [`transition`]; the store applies the result in the same transaction that checks the current
//! state, so two concurrent operations can never both act on the same old state.
//!
//! | From       | Event           | To        | Meaning                                                    |
//! |------------|-----------------|-----------|------------------------------------------------------------|
//! | `Creating` | `Started`       | `Running` | the runtime reported the sandbox up (envd listening)       |
//! | `Creating` | `CreateFailed`  | `Failed`  | the runtime refused; its leftovers were destroyed          |
//! | `Running`  | `Pause`         | `Pausing` | a pause (API or auto-pause on timeout) began               |
//! | `Pausing`  | `PauseDone`     | `Paused`  | every process is frozen                                    |
//! | `Pausing`  | `PauseFailed`   | `Running` | the freeze failed; the sandbox keeps running               |
//! | `Paused`   | `Resume`        | `Resuming`| a connect/resume began                                     |
//! | `Resuming` | `ResumeDone`    | `Running` | thawed                                                     |
//! | `Resuming` | `ResumeFailed`  | `Paused`  | the thaw failed; the sandbox stays paused                  |
//! | `Running`, `Paused`, `Pausing`, `Resuming` | `Kill` | `Killing` | kill requested, timeout expired, init died, or not re-adoptable after a restart |
//! | `Killing`  | `Destroyed`     | `Killed`  | the runtime removed everything                             |
//! | `Creating` | `Warmed`        | `Pooled`  | a warm-pool member is up and waits, unclaimed              |
//! | `Pooled`   | `Claim`         | `Claiming`| a create request took this member (exactly one request can)|
//! | `Claiming` | `Claimed`       | `Running` | envd took the claimant's env vars and access token         |
//! | `Pooled`, `Claiming` | `Kill` | `Killing` | scale-down, rolling update, a failed claim, init died, or not re-adoptable |
//! | `Paused`   | `Hibernate`     | `Hibernating` | frozen longer than `--hibernate-after` (or asked): CRIU dump began |
//! | `Hibernating` | `HibernateDone` | `Hibernated` | the images are on disk, the processes ended, memory freed |
//! | `Hibernating` | `HibernateFailed` | `Paused` | the dump failed; the tree is frozen in memory as before |
//! | `Hibernated` | `Wake`        | `Waking`  | a connect/resume began: CRIU restore                       |
//! | `Waking`   | `WakeDone`      | `Running` | the restored tree runs (new init pid, same address)        |
//! | `Waking`   | `WakeFailed`    | `Hibernated` | the restore failed; the images stay for another try     |
//! | `Hibernating`, `Hibernated`, `Waking` | `Kill` | `Killing` | kill requested, or not re-adoptable after a restart |
//!
//! `Killed` and `Failed` are terminal: the store deletes the row in the transaction that reaches
//! them, so the database only ever holds sandboxes that exist (or are being made or removed).
//! `Pausing`, `Resuming` and `Killing` are only seen in the store while an operation runs, or after
//! a crash in the middle of one, which is why recovery knows how to finish each of them.
//!
//! What clients see ([`SandboxState::public`]): `Running` and `Pausing` show as `running`,
//! `Paused`, `Resuming`, `Hibernating`, `Hibernated` and `Waking` as `paused` (E2B knows one
//! paused state; where the memory lives is Warren's business); `Creating`, `Killing`, the pool states `Pooled` and
//! `Claiming`, and the terminal states are invisible (the sandbox is "not found"). A pool member
//! becomes visible only to the team that claimed it, once the claim completed.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Creating,
    Running,
    Pausing,
    Paused,
    Resuming,
    Killing,
    Killed,
    Failed,
    /// A warm-pool member nobody owns yet.
    Pooled,
    /// A pool member being handed to a create request.
    Claiming,
    /// A paused sandbox whose process tree CRIU is dumping to disk.
    Hibernating,
    /// Processes dumped to disk and ended; filesystem, address and network namespace kept.
    Hibernated,
    /// A hibernated sandbox being restored.
    Waking,
}

/// Something that happened to a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Started,
    CreateFailed,
    Pause,
    PauseDone,
    PauseFailed,
    Resume,
    ResumeDone,
    ResumeFailed,
    Kill,
    Destroyed,
    Warmed,
    Claim,
    Claimed,
    Hibernate,
    HibernateDone,
    HibernateFailed,
    Wake,
    WakeDone,
    WakeFailed,
}

/// The state the E2B API reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PublicState {
    Running,
    Paused,
}

impl PublicState {
    pub fn as_str(self) -> &'static str {
        match self {
            PublicState::Running => "running",
            PublicState::Paused => "paused",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("illegal transition: {event:?} in state {from}")]
pub struct IllegalTransition {
    pub from: SandboxState,
    pub event: Event,
}

/// The only place that knows which state changes are legal.
pub fn transition(from: SandboxState, event: Event) -> Result<SandboxState, IllegalTransition> {
    use Event as E;
    use SandboxState as S;
    let to = match (from, event) {
        (S::Creating, E::Started) => S::Running,
        (S::Creating, E::CreateFailed) => S::Failed,
        (S::Running, E::Pause) => S::Pausing,
        (S::Pausing, E::PauseDone) => S::Paused,
        (S::Pausing, E::PauseFailed) => S::Running,
        (S::Paused, E::Resume) => S::Resuming,
        (S::Resuming, E::ResumeDone) => S::Running,
        (S::Resuming, E::ResumeFailed) => S::Paused,
        (S::Running | S::Paused | S::Pausing | S::Resuming, E::Kill) => S::Killing,
        (S::Killing, E::Destroyed) => S::Killed,
        (S::Creating, E::Warmed) => S::Pooled,
        (S::Pooled, E::Claim) => S::Claiming,
        (S::Claiming, E::Claimed) => S::Running,
        (S::Pooled | S::Claiming, E::Kill) => S::Killing,
        (S::Paused, E::Hibernate) => S::Hibernating,
        (S::Hibernating, E::HibernateDone) => S::Hibernated,
        (S::Hibernating, E::HibernateFailed) => S::Paused,
        (S::Hibernated, E::Wake) => S::Waking,
        (S::Waking, E::WakeDone) => S::Running,
        (S::Waking, E::WakeFailed) => S::Hibernated,
        (S::Hibernating | S::Hibernated | S::Waking, E::Kill) => S::Killing,
        _ => return Err(IllegalTransition { from, event }),
    };
    Ok(to)
}

impl SandboxState {
    pub const ALL: [SandboxState; 13] = [
        SandboxState::Creating,
        SandboxState::Running,
        SandboxState::Pausing,
        SandboxState::Paused,
        SandboxState::Resuming,
        SandboxState::Killing,
        SandboxState::Killed,
        SandboxState::Failed,
        SandboxState::Pooled,
        SandboxState::Claiming,
        SandboxState::Hibernating,
        SandboxState::Hibernated,
        SandboxState::Waking,
    ];

    /// Terminal states are never stored.
    pub fn is_terminal(self) -> bool {
        matches!(self, SandboxState::Killed | SandboxState::Failed)
    }

    /// How the sandbox appears to API clients; `None` means "not found".
    pub fn public(self) -> Option<PublicState> {
        match self {
            SandboxState::Running | SandboxState::Pausing => Some(PublicState::Running),
            SandboxState::Paused
            | SandboxState::Resuming
            | SandboxState::Hibernating
            | SandboxState::Hibernated
            | SandboxState::Waking => Some(PublicState::Paused),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Pausing => "pausing",
            SandboxState::Paused => "paused",
            SandboxState::Resuming => "resuming",
            SandboxState::Killing => "killing",
            SandboxState::Killed => "killed",
            SandboxState::Failed => "failed",
            SandboxState::Pooled => "pooled",
            SandboxState::Claiming => "claiming",
            SandboxState::Hibernating => "hibernating",
            SandboxState::Hibernated => "hibernated",
            SandboxState::Waking => "waking",
        }
    }
}

impl fmt::Display for SandboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SandboxState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SandboxState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown sandbox state {s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Event as E;
    use SandboxState as S;

    const EVENTS: [Event; 19] = [
        E::Started,
        E::CreateFailed,
        E::Pause,
        E::PauseDone,
        E::PauseFailed,
        E::Resume,
        E::ResumeDone,
        E::ResumeFailed,
        E::Kill,
        E::Destroyed,
        E::Warmed,
        E::Claim,
        E::Claimed,
        E::Hibernate,
        E::HibernateDone,
        E::HibernateFailed,
        E::Wake,
        E::WakeDone,
        E::WakeFailed,
    ];

    const LEGAL: [(SandboxState, Event, SandboxState); 27] = [
        (S::Creating, E::Started, S::Running),
        (S::Creating, E::CreateFailed, S::Failed),
        (S::Running, E::Pause, S::Pausing),
        (S::Pausing, E::PauseDone, S::Paused),
        (S::Pausing, E::PauseFailed, S::Running),
        (S::Paused, E::Resume, S::Resuming),
        (S::Resuming, E::ResumeDone, S::Running),
        (S::Resuming, E::ResumeFailed, S::Paused),
        (S::Running, E::Kill, S::Killing),
        (S::Paused, E::Kill, S::Killing),
        (S::Pausing, E::Kill, S::Killing),
        (S::Resuming, E::Kill, S::Killing),
        (S::Killing, E::Destroyed, S::Killed),
        (S::Creating, E::Warmed, S::Pooled),
        (S::Pooled, E::Claim, S::Claiming),
        (S::Claiming, E::Claimed, S::Running),
        (S::Pooled, E::Kill, S::Killing),
        (S::Claiming, E::Kill, S::Killing),
        (S::Paused, E::Hibernate, S::Hibernating),
        (S::Hibernating, E::HibernateDone, S::Hibernated),
        (S::Hibernating, E::HibernateFailed, S::Paused),
        (S::Hibernated, E::Wake, S::Waking),
        (S::Waking, E::WakeDone, S::Running),
        (S::Waking, E::WakeFailed, S::Hibernated),
        (S::Hibernating, E::Kill, S::Killing),
        (S::Hibernated, E::Kill, S::Killing),
        (S::Waking, E::Kill, S::Killing),
    ];

    #[test]
    fn every_legal_transition() {
        for (from, ev, to) in LEGAL {
            assert_eq!(transition(from, ev), Ok(to), "{from} --{ev:?}-->");
        }
    }

    #[test]
    fn everything_else_is_illegal() {
        for from in S::ALL {
            for ev in EVENTS {
                if LEGAL.iter().any(|(f, e, _)| *f == from && *e == ev) {
                    continue;
                }
                assert_eq!(
                    transition(from, ev),
                    Err(IllegalTransition { from, event: ev }),
                    "{from} --{ev:?}--> must be illegal"
                );
            }
        }
    }

    #[test]
    fn sample_of_illegal_transitions() {
        assert!(transition(S::Paused, E::Pause).is_err());
        assert!(transition(S::Running, E::Resume).is_err());
        assert!(transition(S::Killed, E::Kill).is_err());
        assert!(transition(S::Creating, E::Kill).is_err());
        assert!(transition(S::Failed, E::Started).is_err());
        assert!(transition(S::Killing, E::Kill).is_err());
        // Only a frozen sandbox hibernates, and only a hibernated one wakes.
        assert!(transition(S::Running, E::Hibernate).is_err());
        assert!(transition(S::Paused, E::Wake).is_err());
        assert!(transition(S::Hibernated, E::Resume).is_err());
        assert!(transition(S::Hibernated, E::Hibernate).is_err());
    }

    #[test]
    fn terminal_states_accept_nothing() {
        for from in [S::Killed, S::Failed] {
            assert!(from.is_terminal());
            for ev in EVENTS {
                assert!(transition(from, ev).is_err());
            }
        }
    }

    #[test]
    fn public_view_and_names_round_trip() {
        assert_eq!(S::Pausing.public(), Some(PublicState::Running));
        assert_eq!(S::Resuming.public(), Some(PublicState::Paused));
        assert_eq!(S::Creating.public(), None);
        assert_eq!(S::Killing.public(), None);
        assert_eq!(S::Pooled.public(), None);
        assert_eq!(S::Claiming.public(), None);
        for s in [S::Hibernating, S::Hibernated, S::Waking] {
            assert_eq!(s.public(), Some(PublicState::Paused), "{s} shows as paused");
        }
        for s in S::ALL {
            assert_eq!(s.as_str().parse::<S>(), Ok(s));
        }
    }
}
