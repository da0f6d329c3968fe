//! Unpacking an OCI layer tarball into a directory in overlayfs format.
//!
//! Every layer becomes its own directory (`layers/<diffid>`), stacked by the runtime as an
//! overlay lower dir, so the OCI whiteouts are translated to what overlayfs understands instead
//! of being applied as deletions:
//!
//! - `dir/.wh.NAME` → a character device 0:0 named `dir/NAME` (an overlay whiteout);
//! - `dir/.wh..wh..opq` → the xattr `trusted.overlay.opaque=y` on `dir`.
//!
//! Layer tarballs come from anywhere, so nothing here trusts a path. Every parent directory is
//! opened with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` relative to the layer root: a
//! `..` or an absolute symlink met while resolving stays inside the layer (the kernel treats the
//! layer root as `/`, as a chroot would), and the final component is always created with `*at`
//! calls that do not follow symlinks. Entries whose own path climbs out with `..` are refused.
//! `trusted.overlay.*` xattrs of the tarball are dropped, so a layer cannot smuggle overlay
//! metadata (redirects, metacopy) in.

use crate::error::{ImageError, Result};
use crate::store::{hex, short, ImageStore};
use crate::{Phase, Progress, ProgressEvent};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;
use sha2::{Digest as _, Sha256};
use std::io::{BufRead, BufReader, Read};
use std::os::fd::OwnedFd;
use std::path::Path;

const OPAQUE_MARKER: &str = ".wh..wh..opq";
const WHITEOUT_PREFIX: &str = ".wh.";

/// Layer compression, as sniffed from the first bytes (media types lie more often than magic).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

pub fn sniff(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    }
}

/// Hashes what passes through (the diffID is the digest of the uncompressed tar).
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Counts compressed bytes for progress reports.
struct CountingReader<'a, R> {
    inner: R,
    done: u64,
    total: u64,
    last: u64,
    item: String,
    progress: &'a Progress,
}

impl<R: Read> Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        if self.done - self.last >= 4 << 20 || (n == 0 && self.done != self.last) {
            self.last = self.done;
            (self.progress)(ProgressEvent {
                phase: Phase::Unpack,
                item: self.item.clone(),
                done: self.done,
                total: self.total,
            });
        }
        Ok(n)
    }
}

/// Unpacks the blob of `layer` (already verified in the store) into `layers/<diff_id>`, checking
/// that its uncompressed content has that digest. Crash-safe: the work happens in `tmp/` and
/// the finished dir is renamed into place.
pub(crate) fn unpack_layer(
    store: &ImageStore,
    layer: &crate::store::Descriptor,
    diff_id: &str,
    progress: &Progress,
) -> Result<()> {
    let target = store.layer_dir(diff_id)?;
    if target.is_dir() {
        return Ok(());
    }
    let blob = store.blob_path(&layer.digest)?;
    let file = match std::fs::File::open(&blob) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ImageError::MissingBlob(layer.digest.clone()))
        }
        Err(e) => return Err(ImageError::io("open", blob, e)),
    };
    let counting = CountingReader {
        inner: file,
        done: 0,
        total: layer.size,
        last: 0,
        item: format!("layer {}", short(&layer.digest)),
        progress,
    };
    let tmp = store.temp_path("layer");
    let res = unpack_stream(counting, &tmp, &layer.digest).and_then(|actual| {
        if actual != diff_id {
            return Err(ImageError::DigestMismatch {
                what: format!("uncompressed layer {}", layer.digest),
                expected: diff_id.to_string(),
                actual,
            });
        }
        sync_dir(&tmp)?;
        crate::store::rename_into_place(&tmp, &target)
    });
    if res.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    res
}

/// Decompresses (gzip, zstd or none, by magic) and unpacks a layer stream into `dir` (created;
/// must not exist). Returns the diffID (`sha256:` of the uncompressed tar).
pub fn unpack_stream(reader: impl Read, dir: &Path, layer_name: &str) -> Result<String> {
    let mut buffered = BufReader::with_capacity(256 * 1024, reader);
    let head = buffered
        .fill_buf()
        .map_err(|e| ImageError::io("read", layer_name, e))?;
    let decompressed: Box<dyn Read> = match sniff(head) {
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(buffered)),
        Compression::Zstd => {
            Box::new(zstd::Decoder::with_buffer(buffered).map_err(|e| layer_err(layer_name, e))?)
        }
        Compression::None => Box::new(buffered),
    };
    let mut hashing = HashingReader {
        inner: decompressed,
        hasher: Sha256::new(),
    };
    std::fs::create_dir(dir).map_err(|e| ImageError::io("mkdir", dir, e))?;
    unpack_tar(&mut hashing, dir, layer_name)?;
    // The diffID covers the whole stream, including the padding after the end-of-archive blocks.
    std::io::copy(&mut hashing, &mut std::io::sink()).map_err(|e| layer_err(layer_name, e))?;
    Ok(format!("sha256:{}", hex(&hashing.hasher.finalize())))
}

fn layer_err(layer: &str, e: impl std::fmt::Display) -> ImageError {
    ImageError::Layer {
        layer: layer.to_string(),
        reason: e.to_string(),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    let f = std::fs::File::open(dir).map_err(|e| ImageError::io("open", dir, e))?;
    rustix::fs::syncfs(&f).map_err(|e| ImageError::io("syncfs", dir, e.into()))
}

/// Unpacks an uncompressed tar stream into the existing directory `dir` in overlay format.
pub fn unpack_tar(reader: &mut dyn Read, dir: &Path, layer_name: &str) -> Result<()> {
    let root = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ImageError::io("open", dir, e.into()))?;
    let mut archive = tar::Archive::new(reader);
    let mut dir_times: Vec<(Vec<String>, u64)> = vec![];
    let entries = archive.entries().map_err(|e| layer_err(layer_name, e))?;
    for entry in entries {
        let mut entry =
            entry.map_err(|e| layer_err(layer_name, format!("reading the tar: {e}")))?;
        let raw_path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let unsafe_entry = |reason: &str| ImageError::UnsafeEntry {
            layer: layer_name.to_string(),
            entry: raw_path.clone(),
            reason: reason.to_string(),
        };
        let comps = components(&raw_path).map_err(&unsafe_entry)?;
        let ctx = |op: &'static str, e: Errno| ImageError::Layer {
            layer: layer_name.to_string(),
            reason: format!("{op} {raw_path:?}: {}", std::io::Error::from(e)),
        };
        let Some((name, parents)) = comps.split_last() else {
            // The layer root itself ("./"): take its metadata.
            if entry.header().entry_type().is_dir() {
                let header = entry.header();
                let mode = Mode::from_raw_mode(header.mode().unwrap_or(0o755) & 0o7777);
                set_owner_mode(&root, header, mode).map_err(|e| ctx("chown/chmod", e))?;
                dir_times.push((vec![], entry.header().mtime().unwrap_or(0)));
            }
            continue;
        };
        let parent = ensure_dirs(&root, parents)
            .map_err(|e| ctx("create the parent dirs (resolved inside the layer) of", e))?;
        let xattrs = pax_xattrs(&mut entry).map_err(|e| layer_err(layer_name, e))?;

        if name == OPAQUE_MARKER {
            rustix::fs::fsetxattr(&parent, "trusted.overlay.opaque", b"y", XattrFlags::empty())
                .map_err(|e| ctx("set opaque xattr for", e))?;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(unsafe_entry("whiteout of an invalid name"));
            }
            remove_existing(&parent, hidden).map_err(|e| ctx("replace", e))?;
            rustix::fs::mknodat(&parent, hidden, FileType::CharacterDevice, Mode::empty(), 0)
                .map_err(|e| ctx("mknod whiteout", e))?;
            continue;
        }

        let header = entry.header().clone();
        let mode = Mode::from_raw_mode(header.mode().unwrap_or(0o644) & 0o7777);
        let kind = header.entry_type();
        use tar::EntryType as T;
        match kind {
            T::Directory => {
                match rustix::fs::statat(&parent, name.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
                    Ok(_) => {
                        remove_existing(&parent, name).map_err(|e| ctx("replace", e))?;
                        rustix::fs::mkdirat(&parent, name.as_str(), Mode::from_raw_mode(0o700))
                            .map_err(|e| ctx("mkdir", e))?;
                    }
                    Err(Errno::NOENT) => {
                        rustix::fs::mkdirat(&parent, name.as_str(), Mode::from_raw_mode(0o700))
                            .map_err(|e| ctx("mkdir", e))?
                    }
                    Err(e) => return Err(ctx("stat", e)),
                }
                let fd = rustix::fs::openat(
                    &parent,
                    name.as_str(),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| ctx("open dir", e))?;
                set_owner_mode(&fd, &header, mode).map_err(|e| ctx("chown/chmod", e))?;
                set_xattrs(&fd, &xattrs).map_err(|e| ctx("set xattrs of", e))?;
                dir_times.push((comps.clone(), header.mtime().unwrap_or(0)));
            }
            T::Regular | T::Continuous => {
                remove_existing(&parent, name).map_err(|e| ctx("replace", e))?;
                let fd = rustix::fs::openat(
                    &parent,
                    name.as_str(),
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| ctx("create", e))?;
                let mut file = std::fs::File::from(fd);
                std::io::copy(&mut entry, &mut file)
                    .map_err(|e| layer_err(layer_name, format!("writing {raw_path:?}: {e}")))?;
                let fd = OwnedFd::from(file);
                set_owner_mode(&fd, &header, mode).map_err(|e| ctx("chown/chmod", e))?;
                set_xattrs(&fd, &xattrs).map_err(|e| ctx("set xattrs of", e))?;
                set_times(&fd, header.mtime().unwrap_or(0)).map_err(|e| ctx("set times of", e))?;
            }
            T::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| unsafe_entry("symlink without a target"))?
                    .into_owned();
                remove_existing(&parent, name).map_err(|e| ctx("replace", e))?;
                // The target is stored as is: it is only ever resolved inside a sandbox's root,
                // or here with RESOLVE_IN_ROOT.
                rustix::fs::symlinkat(target.as_slice(), &parent, name.as_str())
                    .map_err(|e| ctx("symlink", e))?;
                rustix::fs::chownat(
                    &parent,
                    name.as_str(),
                    Some(rustix::fs::Uid::from_raw(header.uid().unwrap_or(0) as u32)),
                    Some(rustix::fs::Gid::from_raw(header.gid().unwrap_or(0) as u32)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(|e| ctx("lchown", e))?;
                let t = timestamp(header.mtime().unwrap_or(0));
                rustix::fs::utimensat(&parent, name.as_str(), &t, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| ctx("set times of", e))?;
            }
            T::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| unsafe_entry("hard link without a target"))?
                    .into_owned();
                let target = String::from_utf8_lossy(&target).into_owned();
                let tcomps = components(&target)
                    .map_err(|r| unsafe_entry(&format!("hard link target {target:?}: {r}")))?;
                let Some((tname, tparents)) = tcomps.split_last() else {
                    return Err(unsafe_entry("hard link to the layer root"));
                };
                let tparent = ensure_existing_dirs(&root, tparents)
                    .map_err(|e| ctx("resolve hard link target of", e))?;
                remove_existing(&parent, name).map_err(|e| ctx("replace", e))?;
                rustix::fs::linkat(
                    &tparent,
                    tname.as_str(),
                    &parent,
                    name.as_str(),
                    AtFlags::empty(),
                )
                .map_err(|e| ctx("hard link", e))?;
            }
            T::Char | T::Block | T::Fifo => {
                let ft = match kind {
                    T::Char => FileType::CharacterDevice,
                    T::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                let dev = rustix::fs::makedev(
                    header.device_major().ok().flatten().unwrap_or(0),
                    header.device_minor().ok().flatten().unwrap_or(0),
                );
                remove_existing(&parent, name).map_err(|e| ctx("replace", e))?;
                rustix::fs::mknodat(&parent, name.as_str(), ft, mode, dev)
                    .map_err(|e| ctx("mknod", e))?;
                // Opening a device node could have side effects: set its metadata by name.
                rustix::fs::chownat(
                    &parent,
                    name.as_str(),
                    Some(rustix::fs::Uid::from_raw(header.uid().unwrap_or(0) as u32)),
                    Some(rustix::fs::Gid::from_raw(header.gid().unwrap_or(0) as u32)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(|e| ctx("chown", e))?;
                rustix::fs::chmodat(&parent, name.as_str(), mode, AtFlags::empty())
                    .map_err(|e| ctx("chmod", e))?;
            }
            // Metadata records the tar crate already folded into the next entry.
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink => {}
            other => {
                return Err(unsafe_entry(&format!(
                    "unsupported tar entry type {other:?}"
                )));
            }
        }
    }
    // Directory times last: creating their children changed them.
    for (comps, mtime) in dir_times.into_iter().rev() {
        if let Ok(fd) = ensure_existing_dirs(&root, &comps) {
            let _ = set_times(&fd, mtime);
        }
    }
    Ok(())
}

/// Splits a tar path into its normal components, refusing `..` (an entry that names a place
/// outside the layer is hostile, not something to reinterpret).
fn components(path: &str) -> std::result::Result<Vec<String>, &'static str> {
    let mut out = vec![];
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err("path climbs out of the layer with '..'"),
            c if c.contains('\0') => return Err("NUL byte in the path"),
            c => out.push(c.to_string()),
        }
    }
    Ok(out)
}

fn resolve_in_root(root: &OwnedFd, comps: &[String]) -> std::result::Result<OwnedFd, Errno> {
    let path = if comps.is_empty() {
        ".".to_string()
    } else {
        comps.join("/")
    };
    rustix::fs::openat2(
        root,
        path.as_str(),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
}

/// Opens the directory `comps` inside the layer, creating missing ones (0755, root-owned, as
/// other unpackers do for parents a tarball does not list).
fn ensure_dirs(root: &OwnedFd, comps: &[String]) -> std::result::Result<OwnedFd, Errno> {
    match resolve_in_root(root, comps) {
        Ok(fd) => return Ok(fd),
        Err(Errno::NOENT) => {}
        Err(e) => return Err(e),
    }
    let mut fd = resolve_in_root(root, &[])?;
    for i in 0..comps.len() {
        match resolve_in_root(root, &comps[..=i]) {
            Ok(next) => fd = next,
            Err(Errno::NOENT) => {
                match rustix::fs::mkdirat(&fd, comps[i].as_str(), Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(e),
                }
                fd = resolve_in_root(root, &comps[..=i])?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(fd)
}

fn ensure_existing_dirs(root: &OwnedFd, comps: &[String]) -> std::result::Result<OwnedFd, Errno> {
    resolve_in_root(root, comps)
}

/// Makes room for a new entry `name` in `parent`: a file, symlink or empty dir there goes.
fn remove_existing(parent: &OwnedFd, name: &str) -> std::result::Result<(), Errno> {
    match rustix::fs::unlinkat(parent, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(Errno::ISDIR) | Err(Errno::PERM) => {
            match rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR) {
                Ok(()) | Err(Errno::NOENT) => Ok(()),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

fn set_owner_mode(
    fd: &OwnedFd,
    header: &tar::Header,
    mode: Mode,
) -> std::result::Result<(), Errno> {
    rustix::fs::fchown(
        fd,
        Some(rustix::fs::Uid::from_raw(header.uid().unwrap_or(0) as u32)),
        Some(rustix::fs::Gid::from_raw(header.gid().unwrap_or(0) as u32)),
    )?;
    // After chown, which clears setuid/setgid bits.
    rustix::fs::fchmod(fd, mode)
}

fn timestamp(mtime: u64) -> Timestamps {
    let t = Timespec {
        tv_sec: mtime.min(i64::MAX as u64) as i64,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

fn set_times(fd: &OwnedFd, mtime: u64) -> std::result::Result<(), Errno> {
    rustix::fs::futimens(fd, &timestamp(mtime))
}

fn pax_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let mut out = vec![];
    if let Some(exts) = entry.pax_extensions()? {
        for ext in exts {
            let ext = ext?;
            let Ok(key) = ext.key() else { continue };
            if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                // Overlay metadata is Warren's to write (whiteouts, opaque dirs), never a layer's.
                if !name.starts_with("trusted.overlay.") {
                    out.push((name.to_string(), ext.value_bytes().to_vec()));
                }
            }
        }
    }
    Ok(out)
}

fn set_xattrs(fd: &OwnedFd, xattrs: &[(String, Vec<u8>)]) -> std::result::Result<(), Errno> {
    for (name, value) in xattrs {
        rustix::fs::fsetxattr(fd, name.as_str(), value, XattrFlags::empty())?;
    }
    Ok(())
}
