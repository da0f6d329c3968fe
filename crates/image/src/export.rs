//! Overlay upper dir → OCI layer tar.
//!
//! The upper dir of a sandbox is already a diff against its lower layers, in overlayfs' format; an
//! OCI layer is the same diff in the image spec's format. The differences are the deletions:
//!
//! - a whiteout (a 0:0 char device, or since Linux 6.7 an empty file with the
//!   `trusted.overlay.whiteout` xattr) becomes an empty regular file `.wh.<name>`;
//! - an opaque dir (`trusted.overlay.opaque=y`) is written, then `<dir>/.wh..wh..opq`, then its
//!   children.
//!
//! The kernel creates every whiteout as a hard link to one shared inode, so whiteouts never take
//! part in hard-link detection (they would otherwise become tar hard links to each other, which
//! unpackers turn into links to a regular file). Real hard links within the upper dir become tar
//! hard links to the first path in walk order.
//!
//! The walk is sorted by name bytes and every header field comes from the file, so exporting the
//! same tree twice gives the same bytes and the same diffID. `trusted.overlay.*` xattrs are
//! overlay bookkeeping and are never exported; a `redirect` or `metacopy` xattr means the upper
//! dir is not a plain diff (those mount options must be off) and the export is refused.

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path}: overlay xattr {xattr} means the upper dir is not a plain diff \
         (mount overlays with redirect_dir=off,metacopy=off to commit them)"
    )]
    NotPlainDiff { path: PathBuf, xattr: String },
    #[error("write layer tar: {0}")]
    Write(#[source] io::Error),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ExportError + 'a {
    move |source| ExportError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarSummary {
    /// `sha256:<hex>` of the uncompressed tar: the layer's diffID.
    pub diff_id: String,
    /// Bytes of the uncompressed tar.
    pub size: u64,
    /// Entries written (whiteouts and opaque markers included).
    pub entries: u64,
}

/// A writer that hashes and counts what passes through.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// The inner writer, the `sha256:<hex>` digest and the byte count.
    pub fn finish(self) -> (W, String, u64) {
        let digest = format!("sha256:{:x}", self.hasher.finalize());
        (self.inner, digest, self.count)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

const OVERLAY_XATTR_PREFIX: &[u8] = b"trusted.overlay.";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const WHITEOUT_XATTR: &str = "trusted.overlay.whiteout";

/// Writes the OCI layer tar of `upper` (uncompressed) to `out` and returns its summary. `out` is
/// flushed but not synced.
pub fn export_upper_dir<W: Write>(upper: &Path, out: W) -> Result<TarSummary, ExportError> {
    let items = scan(upper)?;
    let (summary, _) = write_items(&items, out, &[])?;
    Ok(summary)
}

/// Where an entry's content comes from when the tar is written.
#[derive(Debug, Clone)]
enum Data {
    None,
    /// The live file (read while writing).
    Live(PathBuf),
    /// `len` bytes at `offset` of source file number `source` (see [`write_items`]).
    At {
        source: usize,
        offset: u64,
    },
}

/// What identifies a regular file's content without reading it: if none of these changed, the
/// content did not either (every write updates ctime, which userspace cannot set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileKey {
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileKey {
    fn of(meta: &std::fs::Metadata) -> FileKey {
        FileKey {
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
        }
    }
}

/// One tar entry, scanned but not written.
#[derive(Debug, Clone)]
struct Item {
    rel: PathBuf,
    header: tar::Header,
    pax: Vec<(String, Vec<u8>)>,
    link: Option<PathBuf>,
    data: Data,
    key: Option<FileKey>,
}

fn scan(upper: &Path) -> Result<Vec<Item>, ExportError> {
    let meta = std::fs::symlink_metadata(upper).map_err(io_err("stat", upper))?;
    if !meta.is_dir() {
        return Err(ExportError::Io {
            op: "open upper dir",
            path: upper.to_path_buf(),
            source: io::Error::from(io::ErrorKind::NotADirectory),
        });
    }
    let mut walker = Walker {
        items: Vec::new(),
        links: HashMap::new(),
    };
    walker.walk_children(upper, Path::new(""))?;
    Ok(walker.items)
}

/// Writes `items` as a tar to `out`, reading `Data::At` content from `sources`. Returns the
/// summary and, for each `Data::Live` regular file, where its content starts in the output.
fn write_items<W: Write>(
    items: &[Item],
    out: W,
    sources: &[&Path],
) -> Result<(TarSummary, HashMap<PathBuf, u64>), ExportError> {
    use std::io::{Seek, SeekFrom};
    let mut files: Vec<File> = Vec::new();
    for p in sources {
        files.push(File::open(p).map_err(io_err("open", p))?);
    }
    let mut tar = tar::Builder::new(CountingWriter {
        inner: HashingWriter::new(out),
        pos: 0,
    });
    tar.mode(tar::HeaderMode::Complete);
    let mut offsets = HashMap::new();
    for item in items {
        if !item.pax.is_empty() {
            tar.append_pax_extensions(item.pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .map_err(ExportError::Write)?;
        }
        let mut h = item.header.clone();
        if let Some(link) = &item.link {
            tar.append_link(&mut h, &item.rel, link)
                .map_err(ExportError::Write)?;
            continue;
        }
        let size = h.size().map_err(ExportError::Write)?;
        match &item.data {
            Data::None => tar.append_data(&mut h, &item.rel, io::empty()),
            Data::Live(path) => {
                let file = File::open(path).map_err(io_err("open", path))?;
                // The size in the header is a promise: a file that changes length under us
                // (it should not, the sandbox is frozen or the result is only a pre-copy) must
                // not corrupt the archive.
                let mut reader = ExactReader {
                    inner: file,
                    left: size,
                    path,
                };
                let r = tar.append_data(&mut h, &item.rel, &mut reader);
                // Content starts at the end minus the padded data.
                let end = tar.get_ref().pos;
                offsets.insert(item.rel.clone(), end - size.div_ceil(512) * 512);
                r
            }
            Data::At { source, offset } => {
                let f = files.get_mut(*source).ok_or_else(|| {
                    ExportError::Write(io::Error::other("missing staged content source"))
                })?;
                f.seek(SeekFrom::Start(*offset))
                    .map_err(ExportError::Write)?;
                let path = sources[*source];
                let mut reader = ExactReader {
                    inner: f.try_clone().map_err(ExportError::Write)?,
                    left: size,
                    path,
                };
                tar.append_data(&mut h, &item.rel, &mut reader)
            }
        }
        .map_err(ExportError::Write)?;
    }
    let counting = tar.into_inner().map_err(ExportError::Write)?;
    let (mut out, diff_id, size) = counting.inner.finish();
    out.flush().map_err(ExportError::Write)?;
    Ok((
        TarSummary {
            diff_id,
            size,
            entries: items.len() as u64,
        },
        offsets,
    ))
}

struct CountingWriter<W> {
    inner: W,
    pos: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Files whose ctime is this close to the pre-copy's start are copied again while frozen:
/// timestamps come from the coarse clock (up to one tick, 10 ms at HZ=100, behind), so a write
/// right after the pre-copy read a file could leave its ctime unchanged. 50 ms is five ticks.
const PRECOPY_GUARD_NS: i128 = 50_000_000;

/// The first, unfrozen half of a commit: the whole upper dir copied while the sandbox runs.
#[derive(Debug)]
pub struct PreCopy {
    tar: PathBuf,
    /// Regular files of the pre-copy: path → (identity, content offset in `tar`).
    files: HashMap<PathBuf, (FileKey, u64)>,
    /// Wall-clock nanoseconds when the pre-copy started.
    started_ns: i128,
}

impl PreCopy {
    pub fn path(&self) -> &Path {
        &self.tar
    }
}

fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or_default()
}

/// Copies `upper` into the tar file `tar` (while the sandbox runs; the copy may be inconsistent,
/// [`frozen_pass`] fixes what changed).
pub fn pre_copy(upper: &Path, tar: &Path) -> Result<PreCopy, ExportError> {
    let started_ns = now_ns();
    let items = scan(upper)?;
    let file = File::create(tar).map_err(io_err("create", tar))?;
    let (_, offsets) = write_items(&items, io::BufWriter::with_capacity(1 << 20, file), &[])?;
    let files = items
        .iter()
        .filter_map(|i| Some((i.rel.clone(), (i.key?, *offsets.get(&i.rel)?))))
        .collect();
    Ok(PreCopy {
        tar: tar.to_path_buf(),
        files,
        started_ns,
    })
}

/// The frozen half: scans `upper` again and copies into `delta` only the content of files that
/// are new or changed since the pre-copy. What it returns is written out by [`finish_staging`]
/// once the sandbox runs again.
pub struct FrozenScan {
    items: Vec<Item>,
    delta: PathBuf,
    /// Bytes of file content copied while frozen.
    pub copied_bytes: u64,
}

pub fn frozen_pass(upper: &Path, pre: &PreCopy, delta: &Path) -> Result<FrozenScan, ExportError> {
    let mut items = scan(upper)?;
    let mut out = io::BufWriter::with_capacity(
        1 << 20,
        File::create(delta).map_err(io_err("create", delta))?,
    );
    let mut pos = 0u64;
    for item in &mut items {
        let (Data::Live(path), Some(key)) = (&item.data, item.key) else {
            continue;
        };
        let unchanged = pre
            .files
            .get(&item.rel)
            .filter(|(k, _)| *k == key && key.ctime_ns < pre.started_ns - PRECOPY_GUARD_NS);
        if let Some((_, offset)) = unchanged {
            item.data = Data::At {
                source: 0,
                offset: *offset,
            };
            continue;
        }
        let mut reader = ExactReader {
            inner: File::open(path).map_err(io_err("open", path))?,
            left: key.size,
            path,
        };
        let n = io::copy(&mut reader, &mut out).map_err(ExportError::Write)?;
        item.data = Data::At {
            source: 1,
            offset: pos,
        };
        pos += n;
    }
    out.flush().map_err(ExportError::Write)?;
    Ok(FrozenScan {
        items,
        delta: delta.to_path_buf(),
        copied_bytes: pos,
    })
}

/// Writes the layer tar of a frozen scan (content from the pre-copy and the delta) to `out`.
pub fn finish_staging<W: Write>(
    scan: &FrozenScan,
    pre: &PreCopy,
    out: W,
) -> Result<TarSummary, ExportError> {
    let (summary, _) = write_items(&scan.items, out, &[&pre.tar, &scan.delta])?;
    Ok(summary)
}

struct Walker {
    items: Vec<Item>,
    /// (dev, ino) of every multiply-linked non-whiteout file seen so far → its tar path.
    links: HashMap<(u64, u64), PathBuf>,
}

fn pax_records(attrs: &[(OsString, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
    attrs
        .iter()
        .filter(|(n, _)| !is_overlay_xattr(n))
        .map(|(n, v)| (format!("SCHILY.xattr.{}", n.to_string_lossy()), v.clone()))
        .collect()
}

impl Walker {
    fn walk_children(&mut self, dir: &Path, rel: &Path) -> Result<(), ExportError> {
        let mut names: Vec<OsString> = std::fs::read_dir(dir)
            .map_err(io_err("read dir", dir))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io_err("read dir", dir))?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            self.entry(&dir.join(&name), &rel.join(&name), &name)?;
        }
        Ok(())
    }

    fn push(&mut self, rel: PathBuf, header: tar::Header) -> &mut Item {
        self.items.push(Item {
            rel,
            header,
            pax: Vec::new(),
            link: None,
            data: Data::None,
            key: None,
        });
        let last = self.items.len() - 1;
        &mut self.items[last]
    }

    fn whiteout(&mut self, meta: &std::fs::Metadata, rel: &Path, name: &OsStr) {
        let mut h = header_from(meta, tar::EntryType::Regular);
        h.set_mode(0);
        h.set_uid(0);
        h.set_gid(0);
        let mut wh = OsString::from(".wh.");
        wh.push(name);
        self.push(rel.with_file_name(wh), h);
    }

    fn entry(&mut self, path: &Path, rel: &Path, name: &OsStr) -> Result<(), ExportError> {
        let meta = std::fs::symlink_metadata(path).map_err(io_err("stat", path))?;
        let ft = meta.file_type();
        if ft.is_char_device() && meta.rdev() == 0 {
            self.whiteout(&meta, rel, name);
            return Ok(());
        }
        if ft.is_socket() {
            // Sockets cannot be carried by a layer (the image spec has no type for them).
            return Ok(());
        }
        let attrs = xattrs(path)?;
        for (n, _) in &attrs {
            if n == "trusted.overlay.redirect" || n == "trusted.overlay.metacopy" {
                return Err(ExportError::NotPlainDiff {
                    path: path.to_path_buf(),
                    xattr: n.to_string_lossy().into_owned(),
                });
            }
        }
        let has = |x: &str| attrs.iter().any(|(n, _)| n == x);
        if ft.is_file() && has(WHITEOUT_XATTR) {
            self.whiteout(&meta, rel, name);
            return Ok(());
        }
        if ft.is_dir() {
            let h = header_from(&meta, tar::EntryType::Directory);
            self.push(rel.to_path_buf(), h).pax = pax_records(&attrs);
            let opaque = attrs
                .iter()
                .any(|(n, v)| n == OPAQUE_XATTR && v.as_slice() == b"y");
            if opaque {
                let mut h = header_from(&meta, tar::EntryType::Regular);
                h.set_mode(0);
                h.set_uid(0);
                h.set_gid(0);
                self.push(rel.join(".wh..wh..opq"), h);
            }
            return self.walk_children(path, rel);
        }
        if meta.nlink() > 1 {
            let key = (meta.dev(), meta.ino());
            if let Some(first) = self.links.get(&key).cloned() {
                let h = header_from(&meta, tar::EntryType::Link);
                self.push(rel.to_path_buf(), h).link = Some(first);
                return Ok(());
            }
            self.links.insert(key, rel.to_path_buf());
        }
        let pax = pax_records(&attrs);
        if ft.is_symlink() {
            let target = std::fs::read_link(path).map_err(io_err("read link", path))?;
            let h = header_from(&meta, tar::EntryType::Symlink);
            let item = self.push(rel.to_path_buf(), h);
            item.link = Some(target);
            item.pax = pax;
        } else if ft.is_file() {
            let mut h = header_from(&meta, tar::EntryType::Regular);
            h.set_size(meta.len());
            let item = self.push(rel.to_path_buf(), h);
            item.data = Data::Live(path.to_path_buf());
            item.key = Some(FileKey::of(&meta));
            item.pax = pax;
        } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
            let kind = if ft.is_char_device() {
                tar::EntryType::Char
            } else if ft.is_block_device() {
                tar::EntryType::Block
            } else {
                tar::EntryType::Fifo
            };
            let mut h = header_from(&meta, kind);
            if !ft.is_fifo() {
                let rdev = meta.rdev();
                h.set_device_major(libc_major(rdev))
                    .map_err(ExportError::Write)?;
                h.set_device_minor(libc_minor(rdev))
                    .map_err(ExportError::Write)?;
            }
            self.push(rel.to_path_buf(), h).pax = pax;
        }
        Ok(())
    }
}

/// The xattrs of `path` (not following symlinks), name → value, sorted by name.
fn xattrs(path: &Path) -> Result<Vec<(OsString, Vec<u8>)>, ExportError> {
    let mut names = Vec::new();
    loop {
        let size = rustix::fs::llistxattr_query(path)
            .map_err(|e| io_err("list xattrs of", path)(e.into()))?;
        if size == 0 {
            return Ok(Vec::new());
        }
        names.clear();
        names.reserve(size);
        match rustix::fs::llistxattr(path, rustix::buffer::spare_capacity(&mut names)) {
            Ok(_) => break,
            // The list grew between the two calls: ask again.
            Err(rustix::io::Errno::RANGE) => continue,
            Err(e) => return Err(io_err("list xattrs of", path)(e.into())),
        }
    }
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = OsStr::from_bytes(name);
        let value = get_xattr(path, name)?.unwrap_or_default();
        out.push((name.to_os_string(), value));
    }
    out.sort();
    Ok(out)
}

fn get_xattr(path: &Path, name: &OsStr) -> Result<Option<Vec<u8>>, ExportError> {
    loop {
        let size = match rustix::fs::lgetxattr_query(path, name) {
            Ok(n) => n,
            Err(rustix::io::Errno::NODATA) => return Ok(None),
            Err(e) => return Err(io_err("read xattr of", path)(e.into())),
        };
        if size == 0 {
            return Ok(Some(Vec::new()));
        }
        let mut value = Vec::with_capacity(size);
        match rustix::fs::lgetxattr(path, name, rustix::buffer::spare_capacity(&mut value)) {
            Ok(_) => return Ok(Some(value)),
            Err(rustix::io::Errno::RANGE) => continue,
            Err(rustix::io::Errno::NODATA) => return Ok(None),
            Err(e) => return Err(io_err("read xattr of", path)(e.into())),
        }
    }
}

fn is_overlay_xattr(name: &OsStr) -> bool {
    name.as_bytes().starts_with(OVERLAY_XATTR_PREFIX)
}

fn header_from(meta: &std::fs::Metadata, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(meta.mode() & 0o7777);
    h.set_uid(meta.uid().into());
    h.set_gid(meta.gid().into());
    // Negative mtimes (before 1970) are clamped: tar's field is unsigned.
    h.set_mtime(meta.mtime().max(0) as u64);
    h.set_size(0);
    h
}

fn libc_major(dev: u64) -> u32 {
    (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)) as u32
}

fn libc_minor(dev: u64) -> u32 {
    (((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)) as u32
}

/// Reads exactly `left` bytes: a file that shrank is padded with zeros, one that grew is cut.
struct ExactReader<'a> {
    inner: File,
    left: u64,
    path: &'a Path,
}

impl Read for ExactReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(self.left as usize);
        let n = self
            .inner
            .read(&mut buf[..want])
            .map_err(|e| io::Error::new(e.kind(), format!("read {}: {e}", self.path.display())))?;
        let n = if n == 0 {
            buf[..want].fill(0);
            want
        } else {
            n
        };
        self.left -= n as u64;
        Ok(n)
    }
}

/// Gzips `tar` into `out`, returning the `sha256:<hex>` digest and size of the compressed bytes.
pub fn gzip_layer<R: Read, W: Write>(mut tar: R, out: W) -> io::Result<(W, String, u64)> {
    let hashing = HashingWriter::new(out);
    let mut gz = flate2::write::GzEncoder::new(hashing, flate2::Compression::fast());
    io::copy(&mut tar, &mut gz)?;
    let hashing = gz.finish()?;
    let (mut out, digest, size) = hashing.finish();
    out.flush()?;
    Ok((out, digest, size))
}

#[cfg(test)]
mod tests;
