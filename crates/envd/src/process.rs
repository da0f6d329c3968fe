//! The process table behind `process.Process`.
//!
//! Processes are spawned with `std::process::Command` (never `tokio::process`,
//! whose own SIGCHLD reaping would fight envd's `waitpid(-1)` duties as PID 1)
//! and their exit statuses arrive from [`crate::reaper`].
//!
//! Output flows through one pump task per process that fans events out to the
//! subscribed streams over bounded channels: a slow client stalls the pump, which
//! stops reading the pipe, which blocks the child's writes. Memory stays bounded
//! and no subscriber silently loses output.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot, watch};

use crate::connect::{Code, RpcError};
use crate::reaper::{self, WaitStatus};
use crate::spawn::{self, ChildStdio, SpawnRequest};
use crate::users::User;

const READ_CHUNK_BYTES: usize = 32 * 1024;
/// Events buffered per subscriber before the pump waits for it.
const SUBSCRIBER_BUFFER: usize = 32;
/// After the process exits, output is drained until the pipe has been idle
/// this long: a background grandchild may hold the pipe open forever, and the
/// command must still end (Go's envd behaves the same way).
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(100);

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndInfo {
    pub exit_code: i32,
    pub exited: bool,
    pub status: String,
    pub error: Option<String>,
}

impl EndInfo {
    fn from_status(status: WaitStatus) -> Self {
        let text = status.describe();
        match status.exit_code() {
            Some(code) => EndInfo {
                exit_code: code,
                exited: true,
                error: (code != 0).then(|| text.clone()),
                status: text,
            },
            None => EndInfo {
                exit_code: -1,
                exited: false,
                error: Some(text.clone()),
                status: text,
            },
        }
    }

    fn lost() -> Self {
        let text = "exit status unknown: the process was reaped elsewhere".to_string();
        EndInfo {
            exit_code: -1,
            exited: false,
            error: Some(text.clone()),
            status: text,
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut end = serde_json::Map::new();
        if self.exit_code != 0 {
            end.insert("exitCode".into(), self.exit_code.into());
        }
        if self.exited {
            end.insert("exited".into(), true.into());
        }
        if !self.status.is_empty() {
            end.insert("status".into(), self.status.clone().into());
        }
        if let Some(error) = &self.error {
            end.insert("error".into(), error.clone().into());
        }
        serde_json::Value::Object(end)
    }
}

#[derive(Debug, Clone)]
pub enum ProcessEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    Pty(Bytes),
    End(EndInfo),
}

/// What `List` reports about a process.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    pub cmd: String,
    pub args: Vec<String>,
    pub envs: BTreeMap<String, String>,
    pub cwd: PathBuf,
    pub tag: Option<String>,
}

#[derive(Default)]
struct Hub {
    subscribers: Vec<mpsc::Sender<ProcessEvent>>,
    end: Option<EndInfo>,
}

pub struct ManagedProcess {
    pub pid: u32,
    pub spec: ProcessSpec,
    stdin: tokio::sync::Mutex<Option<pipe::Sender>>,
    stdin_enabled: bool,
    pty: Option<PtyMaster>,
    hub: Mutex<Hub>,
}

/// Result of attaching to a process that may have ended in the meantime.
pub enum Subscription {
    Live(mpsc::Receiver<ProcessEvent>),
    Ended(EndInfo),
}

impl ManagedProcess {
    fn hub(&self) -> MutexGuard<'_, Hub> {
        self.hub.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn subscribe(&self) -> Subscription {
        let mut hub = self.hub();
        if let Some(end) = &hub.end {
            return Subscription::Ended(end.clone());
        }
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        hub.subscribers.push(tx);
        Subscription::Live(rx)
    }

    async fn fan_out(&self, event: ProcessEvent) {
        let subscribers = self.hub().subscribers.clone();
        let mut any_closed = false;
        for subscriber in subscribers {
            if subscriber.send(event.clone()).await.is_err() {
                any_closed = true;
            }
        }
        if any_closed {
            self.hub().subscribers.retain(|s| !s.is_closed());
        }
    }

    pub async fn write_stdin(&self, data: &[u8]) -> Result<(), RpcError> {
        if !self.stdin_enabled {
            return Err(RpcError::new(
                Code::FailedPrecondition,
                format!("stdin is not enabled for process {}", self.pid),
            ));
        }
        let mut stdin = self.stdin.lock().await;
        let Some(pipe) = stdin.as_mut() else {
            return Err(RpcError::new(
                Code::FailedPrecondition,
                format!("stdin of process {} is closed", self.pid),
            ));
        };
        pipe.write_all(data).await.map_err(|err| {
            RpcError::internal(format!(
                "failed to write to stdin of process {}: {err}",
                self.pid
            ))
        })
    }

    pub async fn write_pty(&self, data: &[u8]) -> Result<(), RpcError> {
        let pty = self.pty.as_ref().ok_or_else(|| {
            RpcError::new(
                Code::FailedPrecondition,
                format!("process {} has no PTY", self.pid),
            )
        })?;
        pty.write_all(data).await.map_err(|err| {
            RpcError::internal(format!(
                "failed to write to the PTY of process {}: {err}",
                self.pid
            ))
        })
    }

    pub fn resize_pty(&self, cols: u16, rows: u16) -> Result<(), RpcError> {
        let pty = self.pty.as_ref().ok_or_else(|| {
            RpcError::new(
                Code::FailedPrecondition,
                format!("process {} has no PTY", self.pid),
            )
        })?;
        set_window_size(pty.writer.get_ref(), cols, rows)
            .map_err(|err| RpcError::internal(format!("failed to resize the PTY: {err}")))
    }

    pub async fn close_stdin(&self) -> Result<(), RpcError> {
        if !self.stdin_enabled {
            return Err(RpcError::new(
                Code::FailedPrecondition,
                format!("stdin is not enabled for process {}", self.pid),
            ));
        }
        self.stdin.lock().await.take();
        Ok(())
    }

    /// Signals the whole process group: the child is a session leader, and
    /// killing only `bash -c` would leave its children holding the output pipes.
    pub fn signal(&self, signal: i32) -> Result<(), RpcError> {
        let pid = self.pid as libc::pid_t;
        // SAFETY: kill has no memory-safety preconditions.
        let rc = unsafe { libc::kill(-pid, signal) };
        if rc == 0 {
            return Ok(());
        }
        // SAFETY: as above; falls back to the process alone if it left its group.
        let rc = unsafe { libc::kill(pid, signal) };
        if rc == 0 {
            return Ok(());
        }
        Err(RpcError::internal(format!(
            "failed to signal process {}: {}",
            self.pid,
            io::Error::last_os_error()
        )))
    }
}

/// Everything needed to start a process; built by the RPC layer.
pub struct StartOptions {
    pub cmd: String,
    pub args: Vec<String>,
    /// Request `envs`, overlaid on top of `base_env`.
    pub envs: BTreeMap<String, String>,
    /// Sandbox-wide variables from the envd configuration.
    pub base_env: BTreeMap<String, String>,
    pub cwd: PathBuf,
    pub user: User,
    pub tag: Option<String>,
    pub stdin: bool,
    /// Terminal size `(cols, rows)` when the process gets a PTY instead of pipes.
    pub pty: Option<(u16, u16)>,
}

#[derive(Default)]
pub struct ProcessManager {
    table: Mutex<HashMap<u32, Arc<ManagedProcess>>>,
}

fn current_euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Whether envd can act as `user` at all (it can always act as itself, and as
/// anyone when it is root).
pub fn can_act_as(user: &User) -> Result<(), RpcError> {
    let euid = current_euid();
    if euid == 0 || euid == user.uid {
        Ok(())
    } else {
        Err(RpcError::permission_denied(format!(
            "envd runs as uid {euid} and cannot act as user '{}' (uid {})",
            user.name, user.uid
        )))
    }
}

fn process_env(options: &StartOptions) -> BTreeMap<String, String> {
    let user = &options.user;
    let mut env = BTreeMap::new();
    env.insert("PATH".to_string(), DEFAULT_PATH.to_string());
    env.insert("HOME".to_string(), user.home.to_string_lossy().into_owned());
    env.insert("USER".to_string(), user.name.clone());
    env.insert("LOGNAME".to_string(), user.name.clone());
    if !user.shell.is_empty() {
        env.insert("SHELL".to_string(), user.shell.clone());
    }
    env.extend(options.base_env.clone());
    env.extend(options.envs.clone());
    env
}

fn into_receiver(fd: impl Into<OwnedFd>) -> io::Result<pipe::Receiver> {
    pipe::Receiver::from_owned_fd(fd.into())
}

impl ProcessManager {
    pub fn new() -> Self {
        Self::default()
    }

    fn table(&self) -> MutexGuard<'_, HashMap<u32, Arc<ManagedProcess>>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn list(&self) -> Vec<Arc<ManagedProcess>> {
        let mut processes: Vec<_> = self.table().values().cloned().collect();
        processes.sort_by_key(|p| p.pid);
        processes
    }

    pub fn find(
        &self,
        pid: Option<u32>,
        tag: Option<&str>,
    ) -> Result<Arc<ManagedProcess>, RpcError> {
        let table = self.table();
        let found = match (pid, tag) {
            (Some(pid), _) => table.get(&pid).cloned(),
            (None, Some(tag)) => table
                .values()
                .find(|p| p.spec.tag.as_deref() == Some(tag))
                .cloned(),
            (None, None) => {
                return Err(RpcError::invalid_argument(
                    "process selector needs a pid or a tag",
                ))
            }
        };
        found.ok_or_else(|| match (pid, tag) {
            (Some(pid), _) => RpcError::not_found(format!("process with pid {pid} not found")),
            (_, tag) => RpcError::not_found(format!(
                "process with tag {} not found",
                tag.unwrap_or_default()
            )),
        })
    }

    /// Starts a process. The returned receiver is subscribed before any output
    /// is read, so it sees everything the process writes.
    pub async fn start(
        self: &Arc<Self>,
        options: StartOptions,
    ) -> Result<(Arc<ManagedProcess>, mpsc::Receiver<ProcessEvent>), RpcError> {
        can_act_as(&options.user)?;
        match std::fs::metadata(&options.cwd) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(RpcError::invalid_argument(format!(
                    "cwd '{}' is not a directory",
                    options.cwd.display()
                )))
            }
            Err(_) => {
                return Err(RpcError::invalid_argument(format!(
                    "cwd '{}' does not exist",
                    options.cwd.display()
                )))
            }
        }

        let pty = options
            .pty
            .map(|(cols, rows)| open_pty(cols, rows))
            .transpose()
            .map_err(|err| RpcError::internal(format!("failed to allocate a PTY: {err}")))?;
        let stdio =
            match &pty {
                Some((_, slave)) => ChildStdio::Pty(slave.try_clone().map_err(|err| {
                    RpcError::internal(format!("failed to set up the PTY: {err}"))
                })?),
                None => ChildStdio::Pipes {
                    stdin: options.stdin,
                },
            };
        let request = SpawnRequest {
            program: options.cmd.clone(),
            args: options.args.clone(),
            env: process_env(&options).into_iter().collect(),
            cwd: options.cwd.clone(),
            credentials: (current_euid() == 0).then(|| {
                (
                    options.user.uid,
                    options.user.gid,
                    options.user.groups.clone(),
                )
            }),
            stdio,
        };

        // The calling thread waits until the child has exec'd; keep it off the async workers.
        let spawned = tokio::task::spawn_blocking(move || {
            reaper::spawn_tracked_with(|| spawn::spawn(request).map(|s| (s.pid as i32, s)))
        })
        .await
        .map_err(|err| RpcError::internal(format!("spawn task failed: {err}")))?;
        let (child, exit) = spawned.map_err(|err| {
            let code = match err.kind() {
                io::ErrorKind::NotFound => Code::NotFound,
                io::ErrorKind::PermissionDenied => Code::PermissionDenied,
                io::ErrorKind::InvalidInput => Code::InvalidArgument,
                _ => Code::Internal,
            };
            RpcError::new(
                code,
                format!("failed to start process '{}': {err}", options.cmd),
            )
        })?;
        let pid = child.pid;
        // Only the child may hold the slave, or the master never sees EOF/EIO.
        let pty_master = pty.map(|(master, _slave)| master);

        let pipes = (|| -> io::Result<_> {
            let stdout = child.stdout.map(into_receiver).transpose()?;
            let stderr = child.stderr.map(into_receiver).transpose()?;
            let stdin = child.stdin.map(pipe::Sender::from_owned_fd).transpose()?;
            let pty = match pty_master {
                Some(master) => Some(PtyMaster::new(master)?),
                None => None,
            };
            Ok((stdout, stderr, stdin, pty))
        })();
        let (stdout, stderr, stdin, pty) = match pipes {
            Ok(pipes) => pipes,
            Err(err) => {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                return Err(RpcError::internal(format!(
                    "failed to set up pipes for process {pid}: {err}"
                )));
            }
        };

        let (owner_tx, owner_rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        let process = Arc::new(ManagedProcess {
            pid,
            spec: ProcessSpec {
                cmd: options.cmd,
                args: options.args,
                envs: options.envs,
                cwd: options.cwd,
                tag: options.tag,
            },
            stdin: tokio::sync::Mutex::new(stdin),
            stdin_enabled: options.stdin && pty.is_none(),
            pty: pty.as_ref().map(|(writer, _)| writer.clone_handle()),
            hub: Mutex::new(Hub {
                subscribers: vec![owner_tx],
                end: None,
            }),
        });
        self.table().insert(pid, process.clone());
        let pty_reader = pty.map(|(_, reader)| reader);
        tokio::spawn(pump(
            self.clone(),
            process.clone(),
            stdout,
            stderr,
            pty_reader,
            exit,
        ));
        Ok((process, owner_rx))
    }

    fn remove(&self, pid: u32) {
        self.table().remove(&pid);
    }
}

async fn read_pipe<R: tokio::io::AsyncRead + Unpin>(
    mut pipe: R,
    wrap: fn(Bytes) -> ProcessEvent,
    events: mpsc::Sender<ProcessEvent>,
    mut exited: watch::Receiver<bool>,
) {
    let mut buffer = vec![0u8; READ_CHUNK_BYTES];
    loop {
        let read = if *exited.borrow() {
            match tokio::time::timeout(DRAIN_AFTER_EXIT, pipe.read(&mut buffer)).await {
                Ok(read) => read,
                Err(_idle) => return,
            }
        } else {
            tokio::select! {
                read = pipe.read(&mut buffer) => read,
                _ = exited.changed() => continue,
            }
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if events
                    .send(wrap(Bytes::copy_from_slice(&buffer[..n])))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

/// Orders a process's output and exit into one event sequence that ends with `End`.
async fn pump(
    manager: Arc<ProcessManager>,
    process: Arc<ManagedProcess>,
    stdout: Option<pipe::Receiver>,
    stderr: Option<pipe::Receiver>,
    pty: Option<PtyReader>,
    mut exit: oneshot::Receiver<WaitStatus>,
) {
    let (exited_tx, exited_rx) = watch::channel(false);
    let (events_tx, mut events_rx) = mpsc::channel(16);
    if let Some(stdout) = stdout {
        tokio::spawn(read_pipe(
            stdout,
            ProcessEvent::Stdout,
            events_tx.clone(),
            exited_rx.clone(),
        ));
    }
    if let Some(stderr) = stderr {
        tokio::spawn(read_pipe(
            stderr,
            ProcessEvent::Stderr,
            events_tx.clone(),
            exited_rx.clone(),
        ));
    }
    if let Some(pty) = pty {
        tokio::spawn(read_pipe(
            pty,
            ProcessEvent::Pty,
            events_tx.clone(),
            exited_rx.clone(),
        ));
    }
    drop(events_tx);

    let mut status: Option<Option<WaitStatus>> = None;
    loop {
        tokio::select! {
            event = events_rx.recv() => match event {
                Some(event) => process.fan_out(event).await,
                None => break,
            },
            result = &mut exit, if status.is_none() => {
                status = Some(result.ok());
                let _ = exited_tx.send(true);
            }
        }
    }
    let status = match status {
        Some(status) => status,
        None => exit.await.ok(),
    };
    let end = status.map_or_else(EndInfo::lost, EndInfo::from_status);

    // Leave the table first so a concurrent Connect either finds the process
    // and sees `end` on subscribing, or gets not_found.
    manager.remove(process.pid);
    process.hub().end = Some(end.clone());
    process.fan_out(ProcessEvent::End(end)).await;
    process.hub().subscribers.clear();
    // Closing stdin lets nothing hold the pipe after the process is gone.
    process.stdin.lock().await.take();
}

fn set_window_size(fd: &OwnedFd, cols: u16, rows: u16) -> io::Result<()> {
    let size = rustix::termios::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    rustix::termios::tcsetwinsize(fd, size).map_err(io::Error::from)
}

/// Allocates a PTY pair sized `cols`×`rows`; returns `(master, slave)`.
fn open_pty(cols: u16, rows: u16) -> io::Result<(OwnedFd, OwnedFd)> {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let slave_path = ptsname(&master, Vec::new())?;
    let slave = rustix::fs::open(
        slave_path.as_c_str(),
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOCTTY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    set_window_size(&master, cols, rows)?;
    Ok((master, slave))
}

fn register_nonblocking(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    let flags = rustix::fs::fcntl_getfl(&fd)?;
    rustix::fs::fcntl_setfl(&fd, flags | rustix::fs::OFlags::NONBLOCK)?;
    // SAFETY: the OwnedFd moves into the AsyncFd, stays open for its whole
    // lifetime and always reports the same descriptor.
    unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)
}

/// The writing side of a PTY master (input and resizes).
pub struct PtyMaster {
    writer: Arc<AsyncFd<OwnedFd>>,
}

/// The reading side of a PTY master: terminal output as an `AsyncRead`.
pub struct PtyReader {
    fd: AsyncFd<OwnedFd>,
}

impl PtyMaster {
    fn new(master: OwnedFd) -> io::Result<(PtyMaster, PtyReader)> {
        let reader = master.try_clone()?;
        Ok((
            PtyMaster {
                writer: Arc::new(register_nonblocking(master)?),
            },
            PtyReader {
                fd: register_nonblocking(reader)?,
            },
        ))
    }

    fn clone_handle(&self) -> PtyMaster {
        PtyMaster {
            writer: self.writer.clone(),
        }
    }

    async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.writer.writable().await?;
            match guard.try_io(|fd| rustix::io::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(Ok(written)) => data = &data[written..],
                Ok(Err(err)) => return Err(err),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}

impl tokio::io::AsyncRead for PtyReader {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::task::{ready, Poll};
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| {
                rustix::io::read(fd.get_ref(), &mut *unfilled).map_err(io::Error::from)
            }) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // Linux reports EIO on the master once every slave descriptor is
                // closed: that is the terminal's end of file.
                Ok(Err(err)) if err.raw_os_error() == Some(libc::EIO) => {
                    return Poll::Ready(Ok(()))
                }
                Ok(Err(err)) => return Poll::Ready(Err(err)),
                Err(_would_block) => continue,
            }
        }
    }
}
