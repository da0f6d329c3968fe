//! PID-1 child reaping.
//!
//! envd is the init of its PID namespace, so every orphan in the sandbox is
//! re-parented to it and must be reaped, and the exit statuses of the processes
//! envd started must reach their streams. One reaper thread does both.
//!
//! The thread *peeks* at an exited child with `waitid(WNOWAIT)` and only reaps it
//! while holding the registry lock. [`spawn_tracked`] holds the same lock across
//! `fork`/`exec` and the registration of the new pid, which gives two guarantees:
//! a child that exits immediately is never reaped before its waiter exists, and
//! the `waitpid` that the standard library performs itself when `exec` fails
//! never races with us (a race there would make `Command::spawn` panic).
//!
//! A blocking thread is used instead of a SIGCHLD handler so that
//! [`start_reaper`] works with or without a Tokio runtime.
//!
//! Anything in the process that waits for its own children (e.g. `Command::output`)
//! would have those children reaped from under it; use [`spawn_tracked`] instead.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Condvar, Mutex, MutexGuard, Once, OnceLock};
use std::time::Duration;

use tokio::sync::oneshot;

/// A raw `wait` status, decoded the way Go's `os.ProcessState` prints it
/// (E2B clients show these strings to users).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitStatus(pub i32);

impl WaitStatus {
    pub fn exit_code(self) -> Option<i32> {
        libc::WIFEXITED(self.0).then(|| libc::WEXITSTATUS(self.0))
    }

    pub fn signal(self) -> Option<i32> {
        libc::WIFSIGNALED(self.0).then(|| libc::WTERMSIG(self.0))
    }

    /// `"exit status 1"`, `"signal: killed"`, … as Go formats them.
    pub fn describe(self) -> String {
        if let Some(code) = self.exit_code() {
            return format!("exit status {code}");
        }
        if let Some(signal) = self.signal() {
            let mut text = format!("signal: {}", signal_name(signal));
            if libc::WCOREDUMP(self.0) {
                text.push_str(" (core dumped)");
            }
            return text;
        }
        format!("unknown wait status {:#x}", self.0)
    }
}

/// Signal descriptions as in Go's `syscall` table for Linux.
pub fn signal_name(signal: i32) -> String {
    let name = match signal {
        1 => "hangup",
        2 => "interrupt",
        3 => "quit",
        4 => "illegal instruction",
        5 => "trace/breakpoint trap",
        6 => "aborted",
        7 => "bus error",
        8 => "floating point exception",
        9 => "killed",
        10 => "user defined signal 1",
        11 => "segmentation fault",
        12 => "user defined signal 2",
        13 => "broken pipe",
        14 => "alarm clock",
        15 => "terminated",
        16 => "stack fault",
        17 => "child exited",
        18 => "continued",
        19 => "stopped (signal)",
        20 => "stopped",
        21 => "stopped (tty input)",
        22 => "stopped (tty output)",
        23 => "urgent I/O condition",
        24 => "CPU time limit exceeded",
        25 => "file size limit exceeded",
        26 => "virtual timer expired",
        27 => "profiling timer expired",
        28 => "window changed",
        29 => "I/O possible",
        30 => "power failure",
        31 => "bad system call",
        other => return format!("signal {other}"),
    };
    name.to_string()
}

#[derive(Default)]
struct Registry {
    waiters: HashMap<i32, oneshot::Sender<WaitStatus>>,
    /// Bumped on every spawn so the idle reaper knows a child may exist now.
    spawn_generation: u64,
}

struct Reaper {
    registry: Mutex<Registry>,
    child_spawned: Condvar,
}

fn reaper() -> &'static Reaper {
    static REAPER: OnceLock<Reaper> = OnceLock::new();
    REAPER.get_or_init(|| Reaper {
        registry: Mutex::new(Registry::default()),
        child_spawned: Condvar::new(),
    })
}

fn lock_registry() -> MutexGuard<'static, Registry> {
    // A panic while holding the lock leaves the map intact; keep reaping.
    reaper()
        .registry
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Starts the reaper thread once; later calls do nothing.
pub fn start_reaper() {
    static STARTED: Once = Once::new();
    STARTED.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("envd-reaper".into())
            .spawn(reap_forever);
        if let Err(err) = spawned {
            tracing::error!("failed to start the reaper thread: {err}");
        }
    });
}

/// Spawns `command` and registers it with the reaper; the receiver yields its
/// exit status. Starts the reaper if it is not running yet.
pub fn spawn_tracked(command: &mut Command) -> io::Result<(Child, oneshot::Receiver<WaitStatus>)> {
    start_reaper();
    let mut registry = lock_registry();
    let child = command.spawn()?;
    let (tx, rx) = oneshot::channel();
    registry.waiters.insert(child.id() as i32, tx);
    registry.spawn_generation += 1;
    drop(registry);
    reaper().child_spawned.notify_all();
    Ok((child, rx))
}

/// [`spawn_tracked`] for children started by other means than `Command` (see `spawn.rs`):
/// `spawn` runs under the registry lock and returns the child's pid with whatever it made.
pub fn spawn_tracked_with<T>(
    spawn: impl FnOnce() -> io::Result<(i32, T)>,
) -> io::Result<(T, oneshot::Receiver<WaitStatus>)> {
    start_reaper();
    let mut registry = lock_registry();
    let (pid, made) = spawn()?;
    let (tx, rx) = oneshot::channel();
    registry.waiters.insert(pid, tx);
    registry.spawn_generation += 1;
    drop(registry);
    reaper().child_spawned.notify_all();
    Ok((made, rx))
}

/// Blocks until some child has exited and returns its pid without reaping it.
fn peek_exited_child() -> io::Result<i32> {
    loop {
        // SAFETY: an all-zero siginfo_t is a valid value for waitid to fill in.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid, writable siginfo_t; P_ALL ignores the id argument.
        let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if rc == 0 {
            // SAFETY: waitid succeeded with WEXITED, so the kernel filled in si_pid.
            return Ok(unsafe { info.si_pid() });
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn reap_forever() {
    loop {
        let generation_before_wait = lock_registry().spawn_generation;
        match peek_exited_child() {
            Ok(pid) => reap(pid),
            Err(err) if err.raw_os_error() == Some(libc::ECHILD) => {
                // No children at all: sleep until one is spawned. Orphans can only
                // appear under our own children, so nothing is missed meanwhile; the
                // timeout covers children created by other means.
                let registry = lock_registry();
                if registry.spawn_generation == generation_before_wait {
                    let _ = reaper()
                        .child_spawned
                        .wait_timeout(registry, Duration::from_secs(1));
                }
            }
            Err(err) => {
                tracing::error!("waitid failed: {err}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn reap(pid: i32) {
    let mut registry = lock_registry();
    let mut raw_status = 0;
    // SAFETY: `raw_status` is a valid out-pointer; WNOHANG never blocks while we hold the lock.
    let reaped = unsafe { libc::waitpid(pid, &mut raw_status, libc::WNOHANG) };
    if reaped != pid {
        // Already reaped by the standard library after a failed exec.
        return;
    }
    match registry.waiters.remove(&pid) {
        Some(waiter) => {
            let _ = waiter.send(WaitStatus(raw_status));
        }
        None => tracing::debug!(
            pid,
            status = %WaitStatus(raw_status).describe(),
            "reaped orphan"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_like_go() {
        assert_eq!(WaitStatus(0).describe(), "exit status 0");
        assert_eq!(WaitStatus(1 << 8).describe(), "exit status 1");
        assert_eq!(WaitStatus(9).describe(), "signal: killed");
        assert_eq!(WaitStatus(15).signal(), Some(15));
        assert_eq!(WaitStatus(15).exit_code(), None);
    }
}
