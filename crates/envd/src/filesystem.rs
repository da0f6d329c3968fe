//! `filesystem.Filesystem` operations, performed with the requesting user's
//! file-system identity.
//!
//! Each operation runs on a short-lived thread that first switches its
//! fsuid/fsgid and supplementary groups with raw per-thread syscalls. The kernel
//! then checks permissions exactly as for that user (dropping root's
//! CAP_DAC_OVERRIDE and friends) and new files and directories are owned by the
//! user. The thread exits afterwards, so no identity can leak into other work.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::connect::{Code, RpcError};
use crate::process::can_act_as;
use crate::proto::{EntryInfo, FileType};
use crate::users::{User, UserDb};

/// Turns a client path into an absolute, lexically normalized one: `~` and
/// relative paths are taken from the user's home directory.
pub fn resolve_path(raw: &str, user: &User) -> Result<PathBuf, RpcError> {
    if raw.is_empty() {
        return Err(RpcError::invalid_argument("path is required"));
    }
    if raw.contains('\0') {
        return Err(RpcError::invalid_argument("path contains a NUL byte"));
    }
    let joined = if raw == "~" {
        user.home.clone()
    } else if let Some(rest) = raw.strip_prefix("~/") {
        user.home.join(rest)
    } else if raw.starts_with('/') {
        PathBuf::from(raw)
    } else {
        user.home.join(raw)
    };
    let mut normalized = PathBuf::from("/");
    for component in joined.components() {
        match component {
            Component::Normal(part) => normalized.push(part),
            Component::ParentDir => {
                normalized.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Ok(normalized)
}

/// Switches the calling thread's file-system identity. Only for threads that
/// exit right after their work (see [`run_as`]).
fn assume_fs_identity(user: &User) -> io::Result<()> {
    // SAFETY: the raw syscalls change credentials of the calling thread only
    // (glibc's wrappers would broadcast to every thread in the process, which
    // must not happen); `groups` outlives the call.
    unsafe {
        if libc::syscall(libc::SYS_setgroups, user.groups.len(), user.groups.as_ptr()) < 0 {
            return Err(io::Error::last_os_error());
        }
        libc::syscall(libc::SYS_setfsgid, user.gid);
        libc::syscall(libc::SYS_setfsuid, user.uid);
        // setfsuid reports the previous value instead of errors; a second call
        // returns the current one, which tells whether the switch happened.
        let current_fsuid = libc::syscall(libc::SYS_setfsuid, user.uid);
        if current_fsuid != user.uid as libc::c_long {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "could not switch file-system uid",
            ));
        }
    }
    Ok(())
}

/// Runs `work` on a dedicated thread with `user`'s file-system identity.
pub async fn run_as<R, F>(user: &User, work: F) -> Result<R, RpcError>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    can_act_as(user)?;
    let switch = rustix::process::geteuid().as_raw() != user.uid;
    let user = user.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("envd-fs".into())
        .spawn(move || {
            if switch {
                if let Err(err) = assume_fs_identity(&user) {
                    let _ = tx.send(Err(RpcError::permission_denied(format!(
                        "cannot act as user '{}': {err}",
                        user.name
                    ))));
                    return;
                }
            }
            let _ = tx.send(Ok(work()));
        })
        .map_err(|err| RpcError::internal(format!("failed to start a worker thread: {err}")))?;
    rx.await
        .map_err(|_| RpcError::internal("file-system worker thread died"))?
}

/// Maps an I/O error about `path` to the Connect code the SDKs expect.
pub fn io_error(err: io::Error, path: &Path) -> RpcError {
    let display = path.display();
    match err.kind() {
        io::ErrorKind::NotFound => RpcError::not_found(format!("path '{display}' does not exist")),
        io::ErrorKind::PermissionDenied => {
            RpcError::permission_denied(format!("permission denied for path '{display}': {err}"))
        }
        io::ErrorKind::AlreadyExists => RpcError::new(
            Code::AlreadyExists,
            format!("path '{display}' already exists"),
        ),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => RpcError::new(
            Code::ResourceExhausted,
            format!("not enough disk space for '{display}': {err}"),
        ),
        _ => RpcError::internal(format!("error accessing '{display}': {err}")),
    }
}

/// `ls -l` style permission string.
pub fn permissions_string(file_type: char, mode: u32) -> String {
    let mut out = String::with_capacity(10);
    out.push(file_type);
    let triplets = [(6, 0o4000, 's'), (3, 0o2000, 's'), (0, 0o1000, 't')];
    for (shift, special_bit, special_char) in triplets {
        let bits = (mode >> shift) & 0o7;
        out.push(if bits & 4 != 0 { 'r' } else { '-' });
        out.push(if bits & 2 != 0 { 'w' } else { '-' });
        let exec = bits & 1 != 0;
        let special = mode & special_bit != 0;
        out.push(match (exec, special) {
            (true, false) => 'x',
            (false, false) => '-',
            (true, true) => special_char,
            (false, true) => special_char.to_ascii_uppercase(),
        });
    }
    out
}

fn rfc3339(seconds: i64, nanos: i64) -> String {
    chrono::DateTime::from_timestamp(seconds, nanos.clamp(0, 999_999_999) as u32)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// Describes `path` without following a final symlink.
pub fn entry_info(path: &Path, db: &UserDb) -> io::Result<EntryInfo> {
    let meta = std::fs::symlink_metadata(path)?;
    let file_type = meta.file_type();
    let mode = meta.permissions().mode();
    let (kind, type_char) = if file_type.is_symlink() {
        (FileType::Symlink, 'l')
    } else if file_type.is_dir() {
        (FileType::Directory, 'd')
    } else {
        (FileType::File, '-')
    };
    let symlink_target = file_type.is_symlink().then(|| {
        std::fs::canonicalize(path).unwrap_or_else(|_| {
            // Dangling link: report where it points, made absolute.
            let target = std::fs::read_link(path).unwrap_or_default();
            let parent = path.parent().unwrap_or(Path::new("/"));
            let user = User {
                name: String::new(),
                uid: 0,
                gid: 0,
                home: parent.to_path_buf(),
                shell: String::new(),
                groups: Vec::new(),
            };
            resolve_path(&target.to_string_lossy(), &user).unwrap_or(target)
        })
    });
    Ok(EntryInfo {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".to_string()),
        file_type: kind,
        path: path.to_string_lossy().into_owned(),
        size: meta.size() as i64,
        mode: mode & 0o777,
        permissions: permissions_string(type_char, mode & 0o7777),
        owner: db.user_name(meta.uid()),
        group: db.group_name(meta.gid()),
        modified_time: rfc3339(meta.mtime(), meta.mtime_nsec()),
        symlink_target: symlink_target.map(|t| t.to_string_lossy().into_owned()),
        is_symlink: file_type.is_symlink(),
        metadata: crate::file_metadata::read(path),
    })
}

pub async fn stat(user: &User, path: PathBuf) -> Result<EntryInfo, RpcError> {
    run_as(user, move || {
        let db = UserDb::load();
        entry_info(&path, &db).map_err(|err| io_error(err, &path))
    })
    .await?
}

pub async fn list_dir(user: &User, path: PathBuf, depth: u32) -> Result<Vec<EntryInfo>, RpcError> {
    let depth = depth.max(1);
    run_as(user, move || {
        let db = UserDb::load();
        let meta = std::fs::metadata(&path).map_err(|err| io_error(err, &path))?;
        if !meta.is_dir() {
            return Err(RpcError::invalid_argument(format!(
                "path '{}' is not a directory",
                path.display()
            )));
        }
        let mut entries = Vec::new();
        walk(&path, depth, &db, &mut entries).map_err(|err| io_error(err, &path))?;
        Ok(entries)
    })
    .await?
}

fn walk(dir: &Path, depth: u32, db: &UserDb, out: &mut Vec<EntryInfo>) -> io::Result<()> {
    let mut children: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .collect();
    children.sort();
    for child in children {
        // Entries can vanish between readdir and lstat; skip them.
        let Ok(info) = entry_info(&child, db) else {
            continue;
        };
        let descend = depth > 1 && info.file_type == FileType::Directory;
        out.push(info);
        if descend {
            // An unreadable subdirectory should not hide its readable siblings.
            let _ = walk(&child, depth - 1, db, out);
        }
    }
    Ok(())
}

pub async fn make_dir(user: &User, path: PathBuf) -> Result<EntryInfo, RpcError> {
    run_as(user, move || {
        let db = UserDb::load();
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => {
                return Err(RpcError::new(
                    Code::AlreadyExists,
                    format!("directory '{}' already exists", path.display()),
                ))
            }
            Ok(_) => {
                return Err(RpcError::invalid_argument(format!(
                    "path '{}' already exists and is not a directory",
                    path.display()
                )))
            }
            Err(_) => {}
        }
        std::fs::create_dir_all(&path).map_err(|err| io_error(err, &path))?;
        entry_info(&path, &db).map_err(|err| io_error(err, &path))
    })
    .await?
}

pub async fn move_entry(
    user: &User,
    source: PathBuf,
    destination: PathBuf,
) -> Result<EntryInfo, RpcError> {
    run_as(user, move || {
        let db = UserDb::load();
        std::fs::symlink_metadata(&source).map_err(|err| io_error(err, &source))?;
        if let Some(parent) = destination.parent() {
            std::fs::create_dir_all(parent).map_err(|err| io_error(err, parent))?;
        }
        std::fs::rename(&source, &destination).map_err(|err| io_error(err, &source))?;
        entry_info(&destination, &db).map_err(|err| io_error(err, &destination))
    })
    .await?
}

pub async fn remove(user: &User, path: PathBuf) -> Result<(), RpcError> {
    run_as(user, move || {
        let meta = std::fs::symlink_metadata(&path).map_err(|err| io_error(err, &path))?;
        let removed = if meta.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(|err| io_error(err, &path))
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> User {
        User {
            name: "user".into(),
            uid: 1000,
            gid: 1000,
            home: PathBuf::from("/home/user"),
            shell: "/bin/bash".into(),
            groups: vec![1000],
        }
    }

    #[test]
    fn resolves_relative_and_home_paths() {
        let u = user();
        let resolve = |p| resolve_path(p, &u).unwrap();
        assert_eq!(resolve("a.txt"), PathBuf::from("/home/user/a.txt"));
        assert_eq!(resolve("~"), PathBuf::from("/home/user"));
        assert_eq!(resolve("~/x/../y"), PathBuf::from("/home/user/y"));
        assert_eq!(resolve("/tmp/./a/"), PathBuf::from("/tmp/a"));
        assert_eq!(resolve("/../.."), PathBuf::from("/"));
        assert!(resolve_path("", &u).is_err());
    }

    #[test]
    fn formats_permissions_like_ls() {
        assert_eq!(permissions_string('-', 0o644), "-rw-r--r--");
        assert_eq!(permissions_string('d', 0o755), "drwxr-xr-x");
        assert_eq!(permissions_string('l', 0o777), "lrwxrwxrwx");
        assert_eq!(permissions_string('d', 0o1777), "drwxrwxrwt");
        assert_eq!(permissions_string('-', 0o4644), "-rwSr--r--");
    }
}
