//! One Jupyter kernel process and this server's ZeroMQ connection to it.
//!
//! The kernel binds its sockets (ports chosen here and written in its connection file); the server
//! connects a DEALER to shell and control and a SUB to iopub. stdin is not connected: executions
//! are sent with `allow_stdin: false`, so `input()` fails at once instead of hanging, and hb is not
//! needed because the server owns the kernel process and sees it exit. Replies and iopub messages
//! are routed to whoever sent the request, by the `msg_id` in their parent header.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::wire::{Message, Session};

/// How long a kernel may take to answer its first `kernel_info_request`.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Messages buffered per request before the socket reader waits for the request's consumer
/// (a stream message of endless output can be tens of MB).
const ROUTE_CAPACITY: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Language {
    Python,
    Bash,
    /// JavaScript and TypeScript both run in Deno's kernel (`deno jupyter`), which takes either;
    /// they are separate languages only so that each has its own default context, as upstream.
    JavaScript,
    TypeScript,
}

impl Language {
    /// The languages of the SDK's `language` argument that this server knows.
    pub fn parse(s: &str) -> Option<Language> {
        match s.trim().to_ascii_lowercase().as_str() {
            "python" | "python3" | "py" => Some(Language::Python),
            "bash" | "sh" | "shell" => Some(Language::Bash),
            "javascript" | "js" | "deno" => Some(Language::JavaScript),
            "typescript" | "ts" => Some(Language::TypeScript),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::Bash => "bash",
            Language::JavaScript => "javascript",
            Language::TypeScript => "typescript",
        }
    }

    /// Whether the kernel is Deno's rather than one of the Python (ipykernel-based) ones.
    pub fn is_deno(self) -> bool {
        matches!(self, Language::JavaScript | Language::TypeScript)
    }

    /// The Python module that runs this language's kernel (the ipykernel-based ones).
    fn module(self) -> &'static str {
        match self {
            Language::Python => "ipykernel_launcher",
            Language::Bash => "bash_kernel",
            Language::JavaScript | Language::TypeScript => "",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot start the {language} kernel: {detail}")]
    Start {
        language: &'static str,
        detail: String,
    },
    #[error("the kernel is not running: {0}")]
    Dead(String),
    #[error("cannot talk to the kernel: {0}")]
    Zmq(#[from] zeromq::ZmqError),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        source: std::io::Error,
    },
}

/// Where and how kernels run.
#[derive(Debug, Clone)]
pub struct KernelConfig {
    /// The Python with ipykernel (and bash_kernel) installed.
    pub python: PathBuf,
    /// Holds the connection files (with the signing keys): root-only.
    pub runtime_dir: PathBuf,
    /// Added to every kernel's environment (on top of the server's own).
    pub env: Vec<(String, String)>,
    /// The `deno` executable for JavaScript and TypeScript, if the template has it.
    pub deno: Option<PathBuf>,
}

type Routes = Arc<Mutex<HashMap<String, mpsc::Sender<Message>>>>;

/// The server's sockets to one kernel: replaced whole when the connection is lost while the
/// kernel lives on (see [`Link::reconnect`]).
struct Conn {
    shell: zeromq::DealerSendHalf,
    control: zeromq::DealerSendHalf,
    readers: Vec<JoinHandle<()>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.readers.iter().for_each(JoinHandle::abort);
    }
}

/// Everything needed to (re)connect to a kernel, shared with the task that reconnects.
struct Link {
    session: Session,
    routes: Routes,
    shell_port: u16,
    iopub_port: u16,
    control_port: u16,
    exit: watch::Receiver<Option<String>>,
    conn: tokio::sync::Mutex<Option<Conn>>,
    /// Bumped at each (re)connection: a reader of an older connection that ends is no news.
    generation: std::sync::atomic::AtomicU64,
    /// A reader of the current connection saw its socket end.
    lost: tokio::sync::Notify,
}

/// How long a reconnection to a live kernel may take.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Link {
    /// Connects fresh sockets to the kernel's shell, control and iopub ports and starts their
    /// readers. Returns once the kernel answers on shell and publishes on iopub (as at start).
    async fn connect(self: &Arc<Self>) -> Result<Conn, KernelError> {
        let shell = connect(zeromq::DealerSocket::new(), self.shell_port).await?;
        let control = connect(zeromq::DealerSocket::new(), self.control_port).await?;
        let mut iopub = connect(zeromq::SubSocket::new(), self.iopub_port).await?;
        iopub.subscribe("").await?;
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        let (shell, shell_rx) = shell.split();
        let (control, control_rx) = control.split();
        let readers = vec![
            spawn_reader(iopub, self.clone(), generation, "iopub"),
            spawn_reader(shell_rx, self.clone(), generation, "shell"),
            spawn_reader(control_rx, self.clone(), generation, "control"),
        ];
        let mut conn = Conn {
            shell,
            control,
            readers,
        };
        self.handshake(&mut conn).await?;
        Ok(conn)
    }

    /// Sends a `kernel_info_request` until there is a `kernel_info_reply` on shell and a status
    /// message on iopub for the same request: only then is the SUB socket surely subscribed (a
    /// PUB drops what it publishes before that), so no output of the next execution is lost.
    async fn handshake(&self, conn: &mut Conn) -> Result<(), KernelError> {
        loop {
            let msg = self.session.request("kernel_info_request", json!({}));
            let mut rx = self.route_to(&msg);
            let sent = conn.shell.send(self.frames(&msg)?).await;
            if let Err(e) = sent {
                self.unroute(&msg.header.msg_id);
                return Err(e.into());
            }
            let (mut replied, mut published) = (false, false);
            let deadline = tokio::time::sleep(Duration::from_millis(500));
            tokio::pin!(deadline);
            let mut exit = self.exit.clone();
            while !(replied && published) {
                tokio::select! {
                    m = rx.recv() => match m {
                        Some(m) if m.msg_type() == "kernel_info_reply" => replied = true,
                        Some(m) if m.msg_type() == "status" => published = true,
                        Some(_) => {}
                        None => break,
                    },
                    _ = exit.wait_for(Option::is_some) => {
                        self.unroute(&msg.header.msg_id);
                        return Err(KernelError::Dead(self.exit.borrow().clone().unwrap_or_default()));
                    }
                    _ = &mut deadline => break,
                }
            }
            self.unroute(&msg.header.msg_id);
            if replied && published {
                return Ok(());
            }
        }
    }

    /// Replaces the connection to a kernel that still runs: CRIU closes TCP connections, loopback
    /// ones too, when a sandbox is restored from a checkpoint or woken from hibernation, and the
    /// kernel (still listening) must not be taken for dead then, or its state is lost.
    async fn reconnect(self: &Arc<Self>, slot: &mut Option<Conn>) -> Result<(), KernelError> {
        *slot = None;
        let mut exit = self.exit.clone();
        let conn = tokio::select! {
            r = tokio::time::timeout(RECONNECT_TIMEOUT, self.connect()) => match r {
                Ok(r) => r?,
                Err(_) => return Err(KernelError::Dead("cannot reconnect to the kernel".into())),
            },
            _ = exit.wait_for(Option::is_some) => {
                return Err(KernelError::Dead(self.exit.borrow().clone().unwrap_or_default()));
            }
        };
        *slot = Some(conn);
        Ok(())
    }

    fn frames(&self, msg: &Message) -> Result<ZmqMessage, KernelError> {
        ZmqMessage::try_from(self.session.encode(msg))
            .map_err(|_| KernelError::Dead("empty message".into()))
    }

    fn route_to(&self, msg: &Message) -> mpsc::Receiver<Message> {
        let (tx, rx) = mpsc::channel(ROUTE_CAPACITY);
        self.routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(msg.header.msg_id.clone(), tx);
        rx
    }

    fn unroute(&self, msg_id: &str) {
        self.routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(msg_id);
    }
}

pub struct Kernel {
    pub language: Language,
    pid: i32,
    session: Session,
    link: Arc<Link>,
    /// `Some(reason)` once the process has ended.
    exit: watch::Receiver<Option<String>>,
    connection_file: PathBuf,
    pid_file: PathBuf,
    tasks: Vec<JoinHandle<()>>,
}

/// Ports for a kernel, below the ephemeral range (32768-60999 by default), so that no outgoing
/// connection ever takes one: a connect to a port that is not bound yet can otherwise pick that
/// very port as its source and connect to itself.
fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let mut held = Vec::new();
    let mut ports = Vec::new();
    let mut tries = 0;
    while ports.len() < n {
        tries += 1;
        if tries > 1000 {
            return Err(std::io::Error::other("no free port in 10000-32767"));
        }
        let port = rand::random_range(10000..32768u16);
        if ports.contains(&port) {
            continue;
        }
        // Held together so that the kernel gets n distinct ports; released just before it binds.
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            held.push(l);
            ports.push(port);
        }
    }
    Ok(ports)
}

/// Waits until the kernel listens on `port`. The ZeroMQ connect retries by itself, but with an
/// exponential backoff that makes a kernel that binds after 1 s wait until the next try at 1.5 s,
/// one that binds after 3 s until 6 s.
async fn wait_bound(port: u16) {
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> KernelError + 'a {
    move |source| KernelError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

fn route(routes: &Routes, msg: Message) -> Option<(mpsc::Sender<Message>, Message)> {
    let id = msg.parent_id()?;
    let tx = routes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(id)?
        .clone();
    Some((tx, msg))
}

/// Reads one socket until it ends, handing each message to the request it answers; an end of
/// the current connection's socket is reported to the link, which reconnects.
fn spawn_reader<S: SocketRecv + Send + 'static>(
    mut socket: S,
    link: Arc<Link>,
    generation: u64,
    name: &'static str,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let frames = match socket.recv().await {
                Ok(m) => m.into_vec(),
                Err(e) => {
                    tracing::debug!(socket = name, error = %e, "kernel socket closed");
                    if link.generation.load(std::sync::atomic::Ordering::SeqCst) == generation {
                        link.lost.notify_one();
                    }
                    return;
                }
            };
            match link.session.decode(&frames) {
                Ok(msg) => {
                    tracing::trace!(
                        socket = name,
                        msg_type = msg.msg_type(),
                        parent = msg.parent_id().unwrap_or_default(),
                        "received"
                    );
                    if let Some((tx, msg)) = route(&link.routes, msg) {
                        // A gone consumer just means nobody waits for this request any more.
                        let _ = tx.send(msg).await;
                    }
                }
                Err(e) => tracing::warn!(socket = name, error = %e, "dropping kernel message"),
            }
        }
    })
}

async fn connect<S: Socket>(mut s: S, port: u16) -> Result<S, KernelError> {
    wait_bound(port).await;
    s.connect(&format!("tcp://127.0.0.1:{port}")).await?;
    Ok(s)
}

impl Kernel {
    /// Starts a kernel in `cwd` and waits until it answers on shell and publishes on iopub.
    pub async fn start(
        config: &KernelConfig,
        language: Language,
        cwd: &Path,
    ) -> Result<Kernel, KernelError> {
        let fail = |detail: String| KernelError::Start {
            language: language.name(),
            detail,
        };
        let dir = &config.runtime_dir;
        std::fs::create_dir_all(dir).map_err(io_err("mkdir", dir))?;
        let key = crate::wire::random_id();
        let ports = free_ports(5).map_err(|e| fail(format!("no free port: {e}")))?;
        let connection_file = dir.join(format!("kernel-{}.json", crate::wire::random_id()));
        let conn = json!({
            "shell_port": ports[0], "iopub_port": ports[1], "stdin_port": ports[2],
            "control_port": ports[3], "hb_port": ports[4], "ip": "127.0.0.1",
            "key": key, "transport": "tcp", "signature_scheme": "hmac-sha256",
            "kernel_name": language.name(),
        });
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&connection_file)
                .map_err(io_err("create", &connection_file))?;
            f.write_all(conn.to_string().as_bytes())
                .map_err(io_err("write", &connection_file))?;
        }

        let mut cmd = if language.is_deno() {
            let Some(deno) = &config.deno else {
                let _ = std::fs::remove_file(&connection_file);
                return Err(fail("this template has no deno".into()));
            };
            let mut cmd = tokio::process::Command::new(deno);
            cmd.args(["jupyter", "--kernel", "--conn"])
                .arg(&connection_file)
                // No look for a newer deno (a network request) at each kernel start.
                .env("DENO_NO_UPDATE_CHECK", "1")
                // Results as plain text, not with terminal colour codes.
                .env("NO_COLOR", "1");
            cmd
        } else {
            let mut cmd = tokio::process::Command::new(&config.python);
            cmd.arg(write_support_file(dir, "kernel_launch.py", KERNEL_LAUNCH)?)
                .arg(language.module())
                .arg("-f")
                .arg(&connection_file);
            cmd
        };
        if language == Language::Python {
            let startup = write_support_file(dir, "kernel_startup.py", PYTHON_STARTUP)?;
            cmd.arg(format!("--IPKernelApp.exec_files={}", startup.display()))
                // IPython's on-disk history: a SQLite write per cell (by a thread of its own) to
                // a database no one reads, a context lives as long as its kernel. `In` and `Out`
                // still work (in memory).
                .arg("--HistoryManager.enabled=False");
        }
        let server_pid = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // The kernel dies with this server: a killed server must not leave kernels
                // (and their memory) behind. PDEATHSIG fires when the forking *thread* ends; the
                // tokio workers that start kernels live as long as the server.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The server may have died between fork and prctl.
                if libc::getppid() != server_pid {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        cmd.current_dir(cwd)
            .envs(config.env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            // Its own process group, so an interrupt or kill reaches whatever the kernel started.
            .process_group(0);
        let mut child = cmd.spawn().map_err(|e| {
            let _ = std::fs::remove_file(&connection_file);
            fail(format!(
                "{}: {e}",
                cmd.as_std().get_program().to_string_lossy()
            ))
        })?;
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        // Recorded so that a restarted server kills what a killed one left in the kernel's
        // process group (the kernel itself dies by PDEATHSIG, what it started does not).
        let pid_file = dir.join(format!("kernel-{pid}.pgid"));
        let _ = std::fs::write(&pid_file, pid.to_string());
        // When user code exhausts the sandbox's memory, the kernel is what should die (it is
        // reported and replaced), not this server. Raising the score needs no privilege.
        let _ = std::fs::write(format!("/proc/{pid}/oom_score_adj"), "1000");

        let stderr_tail: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let mut tasks = Vec::new();
        if let Some(stderr) = child.stderr.take() {
            let tail = stderr_tail.clone();
            tasks.push(tokio::spawn(read_stderr(stderr, pid, tail)));
        }
        let (exit_tx, exit) = watch::channel(None);
        tasks.push(tokio::spawn(async move {
            let why = match child.wait().await {
                Ok(status) => format!("kernel process exited ({status})"),
                Err(e) => format!("waiting for the kernel process: {e}"),
            };
            let _ = exit_tx.send(Some(why));
        }));

        let session = Session::new(key.into_bytes());
        let link = Arc::new(Link {
            session: session.clone(),
            routes: Arc::default(),
            shell_port: ports[0],
            iopub_port: ports[1],
            control_port: ports[3],
            exit: exit.clone(),
            conn: tokio::sync::Mutex::new(None),
            generation: Default::default(),
            lost: Default::default(),
        });
        let mut kernel_exit = exit.clone();
        let died = async {
            let _ = kernel_exit.wait_for(Option::is_some).await;
        };
        let connected = tokio::select! {
            r = tokio::time::timeout(START_TIMEOUT, link.connect()) => r,
            _ = died => Ok(Err(KernelError::Dead(String::new()))),
        };
        let conn = match connected {
            Ok(Ok(c)) => c,
            other => {
                kill_group(pid, libc::SIGKILL);
                tasks.iter().for_each(JoinHandle::abort);
                let _ = std::fs::remove_file(&connection_file);
                let _ = std::fs::remove_file(&pid_file);
                let detail = match other {
                    Err(_) => format!("no kernel_info_reply within {START_TIMEOUT:?}"),
                    Ok(Err(e)) => e.to_string(),
                    Ok(Ok(_)) => unreachable!(),
                };
                return Err(fail(format!(
                    "{detail}; its stderr ends with:\n{}",
                    tail_text(&stderr_tail)
                )));
            }
        };
        *link.conn.lock().await = Some(conn);
        tasks.push(tokio::spawn(watch_link(link.clone(), pid)));
        Ok(Kernel {
            language,
            pid,
            session,
            link,
            exit,
            connection_file,
            pid_file,
            tasks,
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Why the kernel is not running, or an empty string while it is.
    pub fn exit_reason(&self) -> String {
        self.exit.borrow().clone().unwrap_or_default()
    }

    pub fn is_alive(&self) -> bool {
        self.exit.borrow().is_none()
    }

    /// Resolves once the kernel process has ended.
    pub async fn exited(&self) {
        let mut exit = self.exit.clone();
        let _ = exit.wait_for(Option::is_some).await;
    }

    /// Sends a request; everything that names it as parent (reply, iopub output) comes out of
    /// the returned receiver until [`Kernel::unroute`]. A connection found lost while the kernel
    /// lives is replaced first.
    pub async fn send(
        &self,
        channel: Channel,
        msg: &Message,
    ) -> Result<mpsc::Receiver<Message>, KernelError> {
        if !self.is_alive() {
            return Err(KernelError::Dead(self.exit_reason()));
        }
        let link = &self.link;
        let rx = link.route_to(msg);
        let mut slot = link.conn.lock().await;
        let mut sent = match slot.as_mut() {
            Some(conn) => conn.send(channel, link.frames(msg)?).await,
            None => Err(zeromq::ZmqError::Other("not connected")),
        };
        if sent.is_err() && self.is_alive() {
            tracing::info!(
                kernel_pid = self.pid,
                "kernel connection lost: reconnecting"
            );
            if let Err(e) = link.reconnect(&mut slot).await {
                self.unroute(&msg.header.msg_id);
                return Err(e);
            }
            if let Some(conn) = slot.as_mut() {
                sent = conn.send(channel, link.frames(msg)?).await;
            }
        }
        if let Err(e) = sent {
            self.unroute(&msg.header.msg_id);
            return Err(e.into());
        }
        Ok(rx)
    }

    pub fn unroute(&self, msg_id: &str) {
        self.link.unroute(msg_id);
    }

    /// Starts executing `code`; returns the request id and its messages.
    pub async fn execute(
        &self,
        code: &str,
        silent: bool,
    ) -> Result<(String, mpsc::Receiver<Message>), KernelError> {
        let msg = self.session.request(
            "execute_request",
            json!({
                "code": code, "silent": silent, "store_history": !silent,
                "user_expressions": {}, "allow_stdin": false, "stop_on_error": true,
            }),
        );
        let rx = self.send(Channel::Shell, &msg).await?;
        Ok((msg.header.msg_id, rx))
    }

    /// Interrupts the running execution the way jupyter_client does for the kernel's
    /// `interrupt_mode`: SIGINT to the process group for ipykernel and bash_kernel (`signal`),
    /// an `interrupt_request` on control for Deno, which ignores SIGINT (`message`).
    pub async fn interrupt(&self) {
        if !self.is_alive() {
            return;
        }
        if !self.language.is_deno() {
            kill_group(self.pid, libc::SIGINT);
            return;
        }
        let msg = self.session.request("interrupt_request", json!({}));
        match self.send(Channel::Control, &msg).await {
            // The reply is of no interest: the execution's own end is what the caller waits for.
            Ok(_) => self.unroute(&msg.header.msg_id),
            Err(e) => tracing::warn!(error = %e, "sending interrupt_request"),
        }
    }

    /// Ends the kernel and everything it started, at once: contexts are thrown away whole, so
    /// there is nothing for a graceful `shutdown_request` to save.
    pub fn kill(&self) {
        // Also after the kernel itself exited: what it started may live on in its group (Linux
        // does not reuse a pid while a process group of that id exists).
        kill_group(self.pid, libc::SIGKILL);
    }
}

impl Conn {
    async fn send(&mut self, channel: Channel, frames: ZmqMessage) -> Result<(), zeromq::ZmqError> {
        match channel {
            Channel::Shell => self.shell.send(frames).await,
            Channel::Control => self.control.send(frames).await,
        }
    }
}

/// Reconnects as soon as a reader of the current connection sees its socket end while the
/// kernel lives (a restore from a checkpoint, a wake from hibernation), so that the next request
/// finds a working connection and pays nothing for it.
async fn watch_link(link: Arc<Link>, pid: i32) {
    let mut exit = link.exit.clone();
    loop {
        tokio::select! {
            _ = link.lost.notified() => {}
            _ = exit.wait_for(Option::is_some) => return,
        }
        if link.exit.borrow().is_some() {
            return;
        }
        let mut slot = link.conn.lock().await;
        tracing::info!(kernel_pid = pid, "kernel connection lost: reconnecting");
        match link.reconnect(&mut slot).await {
            Ok(()) => tracing::info!(kernel_pid = pid, "kernel connection restored"),
            Err(e) => tracing::warn!(kernel_pid = pid, error = %e, "reconnecting to the kernel"),
        }
    }
}

/// The kernel sockets a request can go to.
#[derive(Debug, Clone, Copy)]
pub enum Channel {
    Shell,
    Control,
}

impl Drop for Kernel {
    fn drop(&mut self) {
        self.kill();
        // The connection's readers hold the link: stop them now rather than when the dead
        // kernel's sockets end.
        if let Ok(mut conn) = self.link.conn.try_lock() {
            conn.take();
        }
        for t in &self.tasks {
            t.abort();
        }
        let _ = std::fs::remove_file(&self.connection_file);
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

fn tail_text(tail: &Mutex<VecDeque<String>>) -> String {
    let t = tail.lock().unwrap_or_else(|e| e.into_inner());
    t.iter().cloned().collect::<Vec<_>>().join("\n")
}

/// Sends `signal` to the kernel's process group.
fn kill_group(pid: i32, signal: i32) {
    // Never 1: kill(-1, …) would signal every process there is.
    if pid > 1 {
        // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
        unsafe {
            libc::kill(-pid, signal);
        }
    }
}

/// Runs a kernel module with its output paced (see the file for why).
const KERNEL_LAUNCH: &str = include_str!("kernel_launch.py");
/// What every Python kernel runs once its shell exists (see the file).
const PYTHON_STARTUP: &str = include_str!("kernel_startup.py");

/// Writes one of the kernels' support files into the (root-only) runtime dir, unless it is there
/// already with this content.
fn write_support_file(dir: &Path, name: &str, content: &str) -> Result<PathBuf, KernelError> {
    let path = dir.join(name);
    if std::fs::read(&path).is_ok_and(|c| c == content.as_bytes()) {
        return Ok(path);
    }
    let tmp = dir.join(format!("{name}.{}", crate::wire::random_id()));
    std::fs::write(&tmp, content).map_err(io_err("write", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err("rename", &path))?;
    Ok(path)
}

/// Longest stderr line kept for error messages; the rest of a longer line is dropped.
const STDERR_LINE_MAX: usize = 2000;

/// Drains the kernel's stderr (what it and its children write to fd 2 ends up here too, without
/// any newline if so written) and keeps the last lines, each cut to [`STDERR_LINE_MAX`] bytes, so
/// that endless stderr output costs no memory here.
async fn read_stderr(
    mut stderr: tokio::process::ChildStderr,
    pid: i32,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 16 * 1024];
    let mut line: Vec<u8> = Vec::new();
    let push = |line: &mut Vec<u8>| {
        let text = String::from_utf8_lossy(line).into_owned();
        line.clear();
        tracing::debug!(kernel_pid = pid, "kernel: {text}");
        let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
        if t.len() == 20 {
            t.pop_front();
        }
        t.push_back(text);
    };
    loop {
        let n = match stderr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for part in buf[..n].split_inclusive(|b| *b == b'\n') {
            let (body, ends) = match part.strip_suffix(b"\n") {
                Some(body) => (body, true),
                None => (part, false),
            };
            let room = STDERR_LINE_MAX.saturating_sub(line.len());
            line.extend_from_slice(&body[..body.len().min(room)]);
            if ends {
                push(&mut line);
            }
        }
    }
    if !line.is_empty() {
        push(&mut line);
    }
}

/// Kills the process groups of kernels that an earlier run of this server started (it was
/// killed: its kernels died with it, by PDEATHSIG, but not what they had started) and removes
/// their connection files. Linux does not give a pid to a new process while a process group of
/// that id still has members, so a recorded group id still names only that kernel's group.
pub fn kill_leftovers(runtime_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(runtime_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("kernel-") {
            continue;
        }
        if name.ends_with(".pgid") {
            let pgid = std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok());
            if let Some(pgid) = pgid {
                tracing::info!(pgid, "killing what a previous server's kernel left running");
                kill_group(pgid, libc::SIGKILL);
            }
        }
        if name.ends_with(".pgid") || name.ends_with(".json") {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "removing a stale kernel file");
            }
        }
    }
}
