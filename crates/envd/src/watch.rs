//! Directory watchers (`WatchDir`, `CreateWatcher`, `GetWatcherEvents`,
//! `RemoveWatcher`) on raw inotify.
//!
//! Event kinds follow fsnotify (what upstream envd uses): `IN_MOVED_TO` is a
//! create and `IN_MOVED_FROM` a rename. Event names are relative to the watched
//! directory.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::http::HeaderMap;
use axum::response::Response;
use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use serde_json::json;
use tokio::io::unix::AsyncFd;

use crate::connect::{stream_channel, Code, RpcError};
use crate::filesystem::{entry_info, io_error, resolve_path, run_as};
use crate::proto::{WatchRequest, WatcherIdRequest};
use crate::server::AppState;
use crate::users::{User, UserDb};

/// Events kept for a polling watcher between two `GetWatcherEvents` calls;
/// beyond this the newest are dropped rather than growing without bound.
const MAX_PENDING_EVENTS: usize = 10_000;
const KEEPALIVE: Duration = Duration::from_secs(50);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Create,
    Write,
    Remove,
    Rename,
    Chmod,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Create => "EVENT_TYPE_CREATE",
            EventType::Write => "EVENT_TYPE_WRITE",
            EventType::Remove => "EVENT_TYPE_REMOVE",
            EventType::Rename => "EVENT_TYPE_RENAME",
            EventType::Chmod => "EVENT_TYPE_CHMOD",
        }
    }

    fn from_flags(flags: ReadFlags) -> Option<Self> {
        if flags.intersects(ReadFlags::CREATE | ReadFlags::MOVED_TO) {
            Some(EventType::Create)
        } else if flags.intersects(ReadFlags::DELETE | ReadFlags::DELETE_SELF) {
            Some(EventType::Remove)
        } else if flags.intersects(ReadFlags::MOVED_FROM | ReadFlags::MOVE_SELF) {
            Some(EventType::Rename)
        } else if flags.contains(ReadFlags::MODIFY) {
            Some(EventType::Write)
        } else if flags.contains(ReadFlags::ATTRIB) {
            Some(EventType::Chmod)
        } else {
            None
        }
    }
}

#[derive(Debug, Clone)]
pub struct FsEvent {
    /// Path relative to the watched directory.
    pub name: String,
    pub kind: EventType,
    pub absolute: PathBuf,
}

fn watch_flags() -> WatchFlags {
    WatchFlags::CREATE
        | WatchFlags::DELETE
        | WatchFlags::DELETE_SELF
        | WatchFlags::MODIFY
        | WatchFlags::MOVED_FROM
        | WatchFlags::MOVED_TO
        | WatchFlags::MOVE_SELF
        | WatchFlags::ATTRIB
        | WatchFlags::ONLYDIR
}

/// Watches `relative` (below `root`) and, when recursive, every directory under it.
fn add_tree(
    fd: &OwnedFd,
    root: &Path,
    recursive: bool,
    dirs: &mut HashMap<i32, PathBuf>,
    relative: PathBuf,
) -> io::Result<()> {
    let absolute = root.join(&relative);
    let wd = inotify::add_watch(fd, &absolute, watch_flags())?;
    dirs.insert(wd, relative.clone());
    if recursive {
        for entry in std::fs::read_dir(&absolute)?.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                // A subdirectory that vanished or is unreadable is skipped.
                let _ = add_tree(fd, root, recursive, dirs, relative.join(entry.file_name()));
            }
        }
    }
    Ok(())
}

/// Creates the inotify instance and its watches (blocking; runs as the user).
fn open_watches(root: &Path, recursive: bool) -> io::Result<(OwnedFd, HashMap<i32, PathBuf>)> {
    let meta = std::fs::metadata(root)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotADirectory,
            "path is not a directory",
        ));
    }
    let fd = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)?;
    let mut dirs = HashMap::new();
    add_tree(&fd, root, recursive, &mut dirs, PathBuf::new())?;
    Ok((fd, dirs))
}

/// A live directory watch that yields batches of events.
pub struct DirWatch {
    fd: AsyncFd<OwnedFd>,
    root: PathBuf,
    recursive: bool,
    /// Watch descriptor → directory relative to `root`.
    dirs: HashMap<i32, PathBuf>,
    buffer: Vec<MaybeUninit<u8>>,
}

type RawEvent = (i32, ReadFlags, Option<PathBuf>);

impl DirWatch {
    /// Sets up the watch with `user`'s permissions on the directory tree.
    pub async fn open(user: &User, root: PathBuf, recursive: bool) -> Result<Self, RpcError> {
        let path = root.clone();
        let (fd, dirs) = run_as(user, move || open_watches(&path, recursive))
            .await?
            .map_err(|err| match err.kind() {
                io::ErrorKind::NotADirectory => RpcError::invalid_argument(format!(
                    "path '{}' is not a directory",
                    root.display()
                )),
                _ => io_error(err, &root),
            })?;
        // SAFETY: the OwnedFd moves into the AsyncFd, stays open for its whole
        // lifetime and always reports the same descriptor.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|err| RpcError::internal(format!("failed to register inotify: {err}")))?;
        Ok(DirWatch {
            fd,
            root,
            recursive,
            dirs,
            buffer: vec![MaybeUninit::uninit(); 64 * 1024],
        })
    }

    /// Waits for the next events; a batch may be empty when only bookkeeping
    /// events (like a removed watch) arrived.
    pub async fn next_batch(&mut self) -> io::Result<Vec<FsEvent>> {
        let mut raw: Vec<RawEvent> = Vec::new();
        loop {
            let mut guard = self.fd.readable().await?;
            let mut reader = inotify::Reader::new(guard.get_inner(), &mut self.buffer);
            loop {
                match reader.next() {
                    Ok(event) => raw.push((
                        event.wd(),
                        event.events(),
                        event
                            .file_name()
                            .map(|n| PathBuf::from(std::ffi::OsStr::from_bytes(n.to_bytes()))),
                    )),
                    Err(rustix::io::Errno::AGAIN) => {
                        guard.clear_ready();
                        break;
                    }
                    Err(err) => return Err(err.into()),
                }
                if reader.is_buffer_empty() {
                    break;
                }
            }
            if !raw.is_empty() {
                break;
            }
        }
        Ok(self.translate(raw))
    }

    fn translate(&mut self, raw: Vec<RawEvent>) -> Vec<FsEvent> {
        let mut events = Vec::new();
        for (wd, flags, name) in raw {
            if flags.contains(ReadFlags::IGNORED) {
                self.dirs.remove(&wd);
                continue;
            }
            let Some(dir) = self.dirs.get(&wd).cloned() else {
                continue;
            };
            let relative = match name {
                Some(name) => dir.join(name),
                None => dir,
            };
            if self.recursive
                && flags.contains(ReadFlags::ISDIR)
                && flags.intersects(ReadFlags::CREATE | ReadFlags::MOVED_TO)
            {
                let _ = add_tree(
                    self.fd.get_ref(),
                    &self.root,
                    true,
                    &mut self.dirs,
                    relative.clone(),
                );
            }
            if let Some(kind) = EventType::from_flags(flags) {
                events.push(FsEvent {
                    name: relative.to_string_lossy().into_owned(),
                    kind,
                    absolute: self.root.join(&relative),
                });
            }
        }
        events
    }
}

fn event_json(event: &FsEvent, include_entry: bool, db: Option<&UserDb>) -> serde_json::Value {
    let mut value = json!({ "name": event.name, "type": event.kind.as_str() });
    if include_entry && event.kind != EventType::Remove && event.kind != EventType::Rename {
        if let Some(entry) = db.and_then(|db| entry_info(&event.absolute, db).ok()) {
            value["entry"] = serde_json::to_value(entry).unwrap_or_default();
        }
    }
    value
}

fn watch_root(user: &User, req: &WatchRequest) -> Result<PathBuf, RpcError> {
    resolve_path(req.path.as_deref().unwrap_or_default(), user)
}

pub async fn watch_dir(
    _state: &Arc<AppState>,
    user: &User,
    _headers: &HeaderMap,
    req: WatchRequest,
) -> Response {
    let opened = match watch_root(user, &req) {
        Ok(root) => DirWatch::open(user, root, req.recursive.unwrap_or(false)).await,
        Err(err) => Err(err),
    };
    let mut watch = match opened {
        Ok(watch) => watch,
        Err(err) => return err.stream_response(),
    };
    let include_entry = req.include_entry.unwrap_or(false);
    let (sender, response) = stream_channel();
    tokio::spawn(async move {
        if !sender.send(&json!({ "start": {} })).await {
            return;
        }
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
        loop {
            tokio::select! {
                batch = watch.next_batch() => match batch {
                    Ok(events) => {
                        let db = include_entry.then(UserDb::load);
                        for event in &events {
                            let message = json!({ "filesystem": event_json(event, include_entry, db.as_ref()) });
                            if !sender.send(&message).await {
                                return;
                            }
                        }
                    }
                    Err(err) => {
                        sender.finish(Some(RpcError::internal(format!("watch failed: {err}")))).await;
                        return;
                    }
                },
                _ = ticker.tick() => {
                    if !sender.send(&json!({ "keepalive": {} })).await {
                        return;
                    }
                }
                _ = sender.closed() => return,
            }
        }
    });
    response
}

struct PollingWatcher {
    events: Mutex<VecDeque<serde_json::Value>>,
    task: tokio::task::JoinHandle<()>,
}

impl PollingWatcher {
    fn events(&self) -> MutexGuard<'_, VecDeque<serde_json::Value>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for PollingWatcher {
    fn drop(&mut self) {
        // Stopping the task drops the inotify descriptor and its watches.
        self.task.abort();
    }
}

/// Watchers created with `CreateWatcher`, polled with `GetWatcherEvents`.
#[derive(Default)]
pub struct Watchers {
    watchers: Mutex<HashMap<String, Arc<PollingWatcher>>>,
    next_id: AtomicU64,
}

impl Watchers {
    fn map(&self) -> MutexGuard<'_, HashMap<String, Arc<PollingWatcher>>> {
        self.watchers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn unknown_watcher(id: &str) -> RpcError {
    RpcError::new(Code::NotFound, format!("watcher with id '{id}' not found"))
}

pub async fn create_watcher(
    state: &Arc<AppState>,
    user: &User,
    req: WatchRequest,
) -> Result<serde_json::Value, RpcError> {
    let root = watch_root(user, &req)?;
    let mut watch = DirWatch::open(user, root, req.recursive.unwrap_or(false)).await?;
    let include_entry = req.include_entry.unwrap_or(false);
    let id = format!(
        "w{}",
        state.watchers.next_id.fetch_add(1, Ordering::Relaxed) + 1
    );
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<std::sync::Weak<PollingWatcher>>();
    let task = tokio::spawn(async move {
        let Ok(watcher) = ready_rx.await else { return };
        while let Ok(events) = watch.next_batch().await {
            let Some(watcher) = watcher.upgrade() else {
                return;
            };
            let db = include_entry.then(UserDb::load);
            let mut pending = watcher.events();
            for event in &events {
                if pending.len() >= MAX_PENDING_EVENTS {
                    tracing::warn!("watcher queue full, dropping events");
                    break;
                }
                pending.push_back(event_json(event, include_entry, db.as_ref()));
            }
        }
    });
    let watcher = Arc::new(PollingWatcher {
        events: Mutex::new(VecDeque::new()),
        task,
    });
    let _ = ready_tx.send(Arc::downgrade(&watcher));
    state.watchers.map().insert(id.clone(), watcher);
    Ok(json!({ "watcherId": id }))
}

pub fn get_watcher_events(
    state: &Arc<AppState>,
    req: WatcherIdRequest,
) -> Result<serde_json::Value, RpcError> {
    let id = req.watcher_id.unwrap_or_default();
    let watcher = state
        .watchers
        .map()
        .get(&id)
        .cloned()
        .ok_or_else(|| unknown_watcher(&id))?;
    let events: Vec<_> = watcher.events().drain(..).collect();
    Ok(json!({ "events": events }))
}

pub fn remove_watcher(
    state: &Arc<AppState>,
    req: WatcherIdRequest,
) -> Result<serde_json::Value, RpcError> {
    let id = req.watcher_id.unwrap_or_default();
    state
        .watchers
        .map()
        .remove(&id)
        .ok_or_else(|| unknown_watcher(&id))?;
    Ok(json!({}))
}
