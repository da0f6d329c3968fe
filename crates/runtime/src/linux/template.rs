//! The embedded `base` template: the host's own `/usr` (read-only) under a small private layer,
//! so a fresh machine has a useful sandbox without downloading an image.
//!
//! The layer holds a private `/etc` made for sandboxes (its own passwd/group with `user`, uid
//! 1000, and copies of the host files that bash, python3 and TLS clients read), the merged-/usr
//! symlinks (`/bin` → `usr/bin`...) and empty mount points. Nothing else of the host is visible: no
//! `/etc/shadow`, ssh keys, `/root`, `/home` or the daemon's own state.

use crate::{BindMount, RootfsSpec, RuntimeError};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

/// Bumped whenever the layer's content changes, so daemons rebuild it.
const LAYOUT_VERSION: &str = "base-v2";

/// Host `/etc` entries copied into the template: configuration that programs read and that holds
/// no secret. Anything else of the host's `/etc` (shadow, ssh, ssl/private, sudoers...) stays out.
const ETC_ALLOWLIST: &[&str] = &[
    "alternatives",
    "bash.bashrc",
    "ca-certificates.conf",
    "debian_version",
    "environment",
    "gai.conf",
    "host.conf",
    "inputrc",
    "issue",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "locale.alias",
    "localtime",
    "login.defs",
    "mime.types",
    "networks",
    "nsswitch.conf",
    "os-release",
    "profile.d",
    "protocols",
    "python3",
    "python3.11",
    "services",
    "shells",
    "skel",
    "timezone",
    "ethertypes",
    "magic",
    "magic.mime",
];

/// `/etc/profile`, Debian's in substance, but without its `$(id -u)`: that fork and exec costs
/// about a millisecond of CPU in every login shell, and the SDK runs each command with
/// `bash -l -c`. bash knows `$EUID`; other shells still ask `id`.
const PROFILE: &str = r#"# /etc/profile: system-wide .profile for Bourne-compatible shells (written by Warren).
if [ "${EUID:-$(id -u)}" -eq 0 ]; then
  PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
else
  PATH="/usr/local/bin:/usr/bin:/bin:/usr/local/games:/usr/games"
fi
export PATH

if [ "${PS1-}" ]; then
  if [ "${BASH-}" ] && [ "$BASH" != "/bin/sh" ]; then
    if [ -f /etc/bash.bashrc ]; then
      . /etc/bash.bashrc
    fi
  else
    if [ "${EUID:-$(id -u)}" -eq 0 ]; then
      PS1='# '
    else
      PS1='$ '
    fi
  fi
fi

if [ -d /etc/profile.d ]; then
  for i in /etc/profile.d/*.sh; do
    if [ -r "$i" ]; then
      . "$i"
    fi
  done
  unset i
fi
"#;

const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
user:x:1000:1000:user:/home/user:/bin/bash
";

const GROUP: &str = "root:x:0:
daemon:x:1:
tty:x:5:
users:x:100:user
nogroup:x:65534:
user:x:1000:
";

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RuntimeError + 'a {
    move |e| RuntimeError::io(op, path, e)
}

/// Prepares `<data_dir>/templates/base/rootfs` (once per layout version) and returns the spec of
/// sandboxes of the `base` template.
pub fn prepare_base_template(data_dir: &Path) -> Result<RootfsSpec, RuntimeError> {
    let dir = data_dir.join("templates").join("base");
    let rootfs = dir.join("rootfs");
    let marker = dir.join("layout-version");
    let current = std::fs::read_to_string(&marker).unwrap_or_default();
    if current.trim() != LAYOUT_VERSION || !rootfs.is_dir() {
        std::fs::create_dir_all(&dir).map_err(io("mkdir", &dir))?;
        let tmp = dir.join("rootfs.tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io("remove", &tmp))?;
        }
        build_layer(&tmp)?;
        if rootfs.exists() {
            // Running sandboxes may still use the old layer as a lower dir: keep it under another
            // name rather than changing it in place (overlayfs forbids that).
            let old = dir.join(format!("rootfs.old.{}", std::process::id()));
            std::fs::rename(&rootfs, &old).map_err(io("rename", &rootfs))?;
        }
        std::fs::rename(&tmp, &rootfs).map_err(io("rename", &tmp))?;
        std::fs::write(&marker, LAYOUT_VERSION).map_err(io("write", &marker))?;
    }
    Ok(RootfsSpec {
        lower_dirs: vec![rootfs],
        ro_binds: vec![BindMount {
            source: PathBuf::from("/usr"),
            target: PathBuf::from("/usr"),
        }],
    })
}

fn mkdir_mode(path: &Path, mode: u32, owner: Option<u32>) -> Result<(), RuntimeError> {
    std::fs::create_dir_all(path).map_err(io("mkdir", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io("chmod", path))?;
    if let Some(uid) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(uid)).map_err(io("chown", path))?;
    }
    Ok(())
}

fn build_layer(root: &Path) -> Result<(), RuntimeError> {
    mkdir_mode(root, 0o755, None)?;
    for (dir, mode) in [
        ("usr", 0o755),
        ("etc", 0o755),
        ("home", 0o755),
        ("root", 0o700),
        ("tmp", 0o1777),
        ("var", 0o755),
        ("var/tmp", 0o1777),
        ("var/log", 0o755),
        ("var/lib", 0o755),
        ("var/cache", 0o755),
        ("opt", 0o755),
        ("mnt", 0o755),
        ("srv", 0o755),
        ("media", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("run", 0o755),
    ] {
        mkdir_mode(&root.join(dir), mode, None)?;
    }
    mkdir_mode(&root.join("home/user"), 0o755, Some(1000))?;
    // Debian merged /usr: the top-level binary and library dirs are symlinks into /usr.
    for name in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
        let host = Path::new("/").join(name);
        match std::fs::read_link(&host) {
            Ok(target) => symlink(&target, root.join(name)).map_err(io("symlink", &host))?,
            Err(_) if host.is_dir() => {
                // A host without merged /usr: point at /usr anyway if the dir exists there.
                if Path::new("/usr").join(name).is_dir() {
                    symlink(format!("usr/{name}"), root.join(name))
                        .map_err(io("symlink", &host))?;
                }
            }
            Err(_) => {}
        }
    }

    let etc = root.join("etc");
    for name in ETC_ALLOWLIST {
        let src = Path::new("/etc").join(name);
        if std::fs::symlink_metadata(&src).is_ok() {
            copy_tree(&src, &etc.join(name))?;
        }
    }
    // TLS roots: the public certificate bundle and its hashed links, never ssl/private.
    let certs = Path::new("/etc/ssl/certs");
    if certs.is_dir() {
        mkdir_mode(&etc.join("ssl"), 0o755, None)?;
        copy_tree(certs, &etc.join("ssl/certs"))?;
    }
    let write = |name: &str, content: &str, mode: u32| -> Result<(), RuntimeError> {
        let p = etc.join(name);
        std::fs::write(&p, content).map_err(io("write", &p))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).map_err(io("chmod", &p))
    };
    write("profile", PROFILE, 0o644)?;
    write("passwd", PASSWD, 0o644)?;
    write("group", GROUP, 0o644)?;
    write(
        "hosts",
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        0o644,
    )?;
    write("resolv.conf", &sandbox_resolv_conf(), 0o644)?;
    write("hostname", "sandbox\n", 0o644)?;
    Ok(())
}

/// The host's resolvers, unless they listen on the host's loopback, which a sandbox cannot reach.
pub fn sandbox_resolv_conf() -> String {
    let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let usable: Vec<&str> = host
        .lines()
        .filter(|l| {
            let l = l.trim();
            !(l.starts_with("nameserver") && (l.contains(" 127.") || l.contains(" ::1")))
        })
        .collect();
    if usable.iter().any(|l| l.trim().starts_with("nameserver")) {
        usable.join("\n") + "\n"
    } else {
        "nameserver 1.1.1.1\nnameserver 8.8.8.8\n".to_string()
    }
}

/// Copies files, directories and symlinks (as symlinks), keeping modes; skips sockets, devices and
/// anything unreadable.
fn copy_tree(src: &Path, dst: &Path) -> Result<(), RuntimeError> {
    let meta = std::fs::symlink_metadata(src).map_err(io("stat", src))?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = std::fs::read_link(src).map_err(io("readlink", src))?;
        symlink(&target, dst).map_err(io("symlink", dst))?;
    } else if ft.is_dir() {
        std::fs::create_dir_all(dst).map_err(io("mkdir", dst))?;
        std::fs::set_permissions(
            dst,
            std::fs::Permissions::from_mode(meta.permissions().mode()),
        )
        .map_err(io("chmod", dst))?;
        for entry in std::fs::read_dir(src)
            .map_err(io("read dir", src))?
            .flatten()
        {
            copy_tree(&entry.path(), &dst.join(entry.file_name()))?;
        }
    } else if ft.is_file() && std::fs::copy(src, dst).is_err() {
        // Unreadable files are simply not part of the template.
        let _ = std::fs::remove_file(dst);
    }
    Ok(())
}
