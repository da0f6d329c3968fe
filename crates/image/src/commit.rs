//! Commit: a sandbox's upper dir becomes the top layer of a new image in the local store.
//!
//! The work is split so that the sandbox is frozen only while its upper dir is read:
//!
//! 1. [`ImageStore::stage_upper`] (sandbox frozen): the upper dir is written as an uncompressed
//!    layer tar to a staging file, hashing it on the way (diffID). Nothing is compressed here:
//!    a plain sequential write is the fastest consistent copy we can make.
//! 2. [`ImageStore::finish_commit`] (sandbox running again): the staged tar is gzipped into a
//!    blob, the base image's config gets the new diffID and a history entry, a manifest names
//!    config and layers, and the image gets its name in index.json. The staged tar is then
//!    unpacked into `layers/<diffid-hex>`, so the new image is at once a template whose lower
//!    dirs are layer dirs shared by every sandbox of it.
//!
//! **Base images of templates without one.** The base template (and a `<templates>/<name>/rootfs`
//! dir) is not an image. Its lower dirs are exported once each as layers (cached by the dir's
//! identity: path, device, inode and mtime, so a rebuilt template dir is exported again) and
//! unpacked into the layer store like any other layer, so the committed image is complete and
//! standalone — except for read-only host bind mounts: the `base` template shows the host's `/usr`
//! (5 GB here) by a bind mount, which cannot sensibly become a layer. Such images carry the label
//! [`HOST_BINDS_LABEL`] (`source:target` pairs); Warren re-creates the binds for sandboxes of
//! the image, and any other runtime sees an image without `/usr`.

use crate::error::ImageError;
use crate::export::{export_upper_dir, gzip_layer, ExportError, TarSummary};
use crate::store::{
    Descriptor, Image, ImageStore, Manifest, MEDIA_OCI_CONFIG, MEDIA_OCI_LAYER_GZIP,
    MEDIA_OCI_MANIFEST,
};
use serde_json::json;
use std::collections::HashMap;
use std::io::{BufReader, BufWriter};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ImageError + 'a {
    move |e| ImageError::io(op, path, e)
}

/// Config label listing host bind mounts (`source:target`, comma-separated) the image's sandboxes
/// need but the image does not contain.
pub const HOST_BINDS_LABEL: &str = "dev.warren.host-binds";

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error(transparent)]
    Store(#[from] ImageError),
    #[error("unpack layer {diff_id}: {source}")]
    Unpack {
        diff_id: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid image name '{0}': {1}")]
    BadName(String, String),
}

/// What stage 1 produced.
#[derive(Debug)]
pub struct StagedLayer {
    pub tar: PathBuf,
    pub summary: TarSummary,
}

impl Drop for StagedLayer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.tar);
    }
}

/// A pre-copy in progress; its temp files go when it is dropped.
pub struct PreCopied {
    pre: Option<crate::export::PreCopy>,
    frozen: Option<(crate::export::FrozenScan, PathBuf)>,
    path: PathBuf,
}

impl Drop for PreCopied {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        if let Some((_, delta)) = &self.frozen {
            let _ = std::fs::remove_file(delta);
        }
    }
}

/// The base a commit builds on.
pub enum Base {
    /// An image of the local store (its config and layers are kept).
    Image(Box<Image>),
    /// Plain directories in overlay format, lowest first, plus host binds (source, target).
    /// `user` and `start_command` (run by `/bin/sh -c`) are the template's defaults, written
    /// into the config (`User`, `Cmd`) so that they carry over like an image's.
    Dirs {
        lower_dirs: Vec<PathBuf>,
        host_binds: Vec<(PathBuf, PathBuf)>,
        user: Option<String>,
        start_command: Option<String>,
    },
}

/// The result of a commit.
#[derive(Debug, Clone)]
pub struct Committed {
    pub name: String,
    /// Manifest digest: the image's identity.
    pub digest: String,
    pub manifest_size: u64,
    /// The new layer's blob (compressed).
    pub layer: Descriptor,
    pub diff_id: String,
    /// Sum of the compressed sizes of all layers.
    pub image_size: u64,
}

/// An image written without a new layer ([`Committer::derive_image`]).
#[derive(Debug, Clone)]
pub struct Derived {
    pub digest: String,
    pub manifest_size: u64,
    pub image_size: u64,
}

/// Changes to an image's run config (`config.Env`, `WorkingDir`, `User`, `Cmd`, `Entrypoint`),
/// as a build's ENV, WORKDIR, USER, CMD and ENTRYPOINT make them.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ConfigPatch {
    /// Set in this order; a key the config has already is replaced in place.
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub cmd: Option<Vec<String>>,
    /// Setting it clears the base's `Cmd` unless `cmd` is set too (as Docker does).
    pub entrypoint: Option<Vec<String>>,
}

impl ConfigPatch {
    pub fn is_empty(&self) -> bool {
        *self == ConfigPatch::default()
    }

    /// Applies the patch to a whole image config (`{"config": {...}, ...}`).
    pub fn apply(&self, config: &mut serde_json::Value) {
        if self.is_empty() {
            return;
        }
        if !config["config"].is_object() {
            config["config"] = json!({});
        }
        let c = &mut config["config"];
        if !self.env.is_empty() {
            let mut env: Vec<String> = c["Env"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            for (k, v) in &self.env {
                let entry = format!("{k}={v}");
                let prefix = format!("{k}=");
                match env.iter_mut().find(|e| e.starts_with(&prefix)) {
                    Some(e) => *e = entry,
                    None => env.push(entry),
                }
            }
            c["Env"] = json!(env);
        }
        if let Some(w) = &self.working_dir {
            c["WorkingDir"] = json!(w);
        }
        if let Some(u) = &self.user {
            c["User"] = json!(u);
        }
        if let Some(e) = &self.entrypoint {
            c["Entrypoint"] = json!(e);
            if self.cmd.is_none() {
                if let Some(obj) = c.as_object_mut() {
                    obj.remove("Cmd");
                }
            }
        }
        if let Some(cmd) = &self.cmd {
            c["Cmd"] = json!(cmd);
        }
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct DirLayer {
    diff_id: String,
    digest: String,
    size: u64,
}

/// Commits into the image store ([`crate::store::ImageStore`]): the one writer of its index and
/// the one gc are the store's; this adds staging, layer export and the cache of base-dir layers.
#[derive(Debug)]
pub struct Committer {
    store: ImageStore,
    dir_cache_file: PathBuf,
    /// One base-dir export at a time: two commits of the same template must not both export it.
    dir_cache: Mutex<()>,
}

/// Checks an image name (`[registry/]repo[:tag]`), as used in index.json and for pushes.
pub fn validate_image_name(name: &str) -> Result<(), CommitError> {
    let bad = |why: &str| CommitError::BadName(name.to_string(), why.to_string());
    if name.is_empty() || name.len() > 255 {
        return Err(bad("must have 1 to 255 characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/:@".contains(c))
    {
        return Err(bad(
            "use lower-case letters, digits and . _ - / : (like registry/repo:tag)",
        ));
    }
    if name.starts_with(['/', ':', '.', '-']) || name.ends_with(['/', ':']) || name.contains("//") {
        return Err(bad("malformed reference"));
    }
    if name.contains('@') {
        return Err(bad("name the image by a tag, not a digest"));
    }
    Ok(())
}

impl Committer {
    /// Commits into `store` (which already emptied its `tmp/` at open).
    pub fn new(store: ImageStore) -> Committer {
        Committer {
            dir_cache_file: store.root().join("dir-layers.json"),
            store,
            dir_cache: Mutex::new(()),
        }
    }

    /// Opens the store under `images_dir` (`oci/`, `layers/`, `tmp/`).
    pub fn open(images_dir: &Path) -> Result<Committer, CommitError> {
        Ok(Committer::new(ImageStore::open(images_dir)?))
    }

    pub fn store(&self) -> &ImageStore {
        &self.store
    }

    pub fn layer_dir(&self, diff_id: &str) -> Result<PathBuf, ImageError> {
        self.store.layer_dir(diff_id)
    }

    /// Stage 1, while the sandbox is frozen: the upper dir as an uncompressed tar in a staging
    /// file.
    pub fn stage_upper(&self, upper: &Path) -> Result<StagedLayer, CommitError> {
        let tar = self.store.temp_path("commit.tar");
        let file = std::fs::File::create(&tar).map_err(io_err("create", &tar))?;
        let staged = StagedLayer {
            tar,
            summary: TarSummary {
                diff_id: String::new(),
                size: 0,
                entries: 0,
            },
        };
        let mut staged = staged;
        staged.summary = export_upper_dir(upper, BufWriter::with_capacity(1 << 20, file))?;
        Ok(staged)
    }

    /// Stage 1a, sandbox running: copies the whole upper dir (possibly inconsistent).
    pub fn pre_copy(&self, upper: &Path) -> Result<PreCopied, CommitError> {
        let path = self.store.temp_path("precopy.tar");
        let res = crate::export::pre_copy(upper, &path);
        let mut pre = PreCopied {
            pre: None,
            frozen: None,
            path,
        };
        pre.pre = Some(res?);
        Ok(pre)
    }

    /// Stage 1b, sandbox frozen: rescans and copies only what changed since the pre-copy.
    /// Returns the bytes copied.
    pub fn frozen_pass(&self, upper: &Path, pre: &mut PreCopied) -> Result<u64, CommitError> {
        let Some(p) = &pre.pre else {
            return Err(CommitError::Export(ExportError::Write(
                std::io::Error::other("no pre-copy"),
            )));
        };
        let delta = self.store.temp_path("delta");
        let res = crate::export::frozen_pass(upper, p, &delta);
        if res.is_err() {
            let _ = std::fs::remove_file(&delta);
        }
        let scan = res?;
        let copied = scan.copied_bytes;
        pre.frozen = Some((scan, delta));
        Ok(copied)
    }

    /// Stage 1c, sandbox running again: the consistent layer tar from the pre-copy and the
    /// frozen pass.
    pub fn finish_staging(&self, pre: PreCopied) -> Result<StagedLayer, CommitError> {
        let (Some(p), Some((scan, _))) = (&pre.pre, &pre.frozen) else {
            return Err(CommitError::Export(ExportError::Write(
                std::io::Error::other("no frozen pass"),
            )));
        };
        let tar = self.store.temp_path("commit.tar");
        let file = std::fs::File::create(&tar).map_err(io_err("create", &tar))?;
        let mut staged = StagedLayer {
            tar,
            summary: TarSummary {
                diff_id: String::new(),
                size: 0,
                entries: 0,
            },
        };
        staged.summary =
            crate::export::finish_staging(scan, p, BufWriter::with_capacity(1 << 20, file))?;
        Ok(staged)
    }

    /// Gzips a tar file into a new blob of the store; returns its descriptor.
    fn tar_to_blob(&self, tar: &Path) -> Result<Descriptor, CommitError> {
        let src = std::fs::File::open(tar).map_err(io_err("open", tar))?;
        let w = self.store.blob_writer()?;
        let (w, digest, _) = gzip_layer(BufReader::with_capacity(1 << 20, src), w)
            .map_err(io_err("compress layer", tar))?;
        let info = w.finish(Some(&digest))?;
        Ok(Descriptor::new(
            MEDIA_OCI_LAYER_GZIP,
            info.digest,
            info.size,
        ))
    }

    /// Stage 2: the staged layer on top of `base`, named `name` in the store.
    pub fn finish_commit(
        &self,
        staged: StagedLayer,
        base: &Base,
        name: &str,
        created_by: &str,
    ) -> Result<Committed, CommitError> {
        self.finish_commit_with(staged, base, name, created_by, &ConfigPatch::default())
    }

    /// [`Self::finish_commit`], with `patch` applied to the new image's config (a build step's
    /// ENV, WORKDIR, USER...).
    pub fn finish_commit_with(
        &self,
        staged: StagedLayer,
        base: &Base,
        name: &str,
        created_by: &str,
        patch: &ConfigPatch,
    ) -> Result<Committed, CommitError> {
        validate_image_name(name)?;
        // Until `name` references them, the new blobs and layer dirs are unreferenced: the
        // store's gc must wait.
        let _op = self.store.begin_operation();
        let layer = self.tar_to_blob(&staged.tar)?;
        let diff_id = staged.summary.diff_id.clone();
        self.unpack_layer(&staged.tar, &diff_id)?;
        drop(staged);
        let w = self.write_image(Some((&layer, &diff_id)), base, name, created_by, patch)?;
        Ok(Committed {
            name: name.to_string(),
            digest: w.digest,
            manifest_size: w.manifest_size,
            layer,
            diff_id,
            image_size: w.image_size,
        })
    }

    /// A new image named `name` with the layers of `base` and its config changed by `patch`
    /// (no new layer: a build's final ENV/WORKDIR/USER/CMD, like Docker's `empty_layer` steps).
    pub fn derive_image(
        &self,
        base: &Base,
        name: &str,
        created_by: &str,
        patch: &ConfigPatch,
    ) -> Result<Derived, CommitError> {
        validate_image_name(name)?;
        let _op = self.store.begin_operation();
        self.write_image(None, base, name, created_by, patch)
    }

    /// Config and manifest of `base` plus `layer` (if any), with `patch` applied, named `name`.
    fn write_image(
        &self,
        layer: Option<(&Descriptor, &str)>,
        base: &Base,
        name: &str,
        created_by: &str,
        patch: &ConfigPatch,
    ) -> Result<Derived, CommitError> {
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let (mut config, mut layers) = match base {
            Base::Image(img) => (
                serde_json::from_slice::<serde_json::Value>(&img.config_raw).map_err(|e| {
                    ImageError::invalid(
                        format!("image config {}", img.manifest.config.digest),
                        e.to_string(),
                    )
                })?,
                img.manifest.layers.clone(),
            ),
            Base::Dirs {
                lower_dirs,
                host_binds,
                user,
                start_command,
            } => {
                let mut diff_ids = Vec::new();
                let mut layers = Vec::new();
                for dir in lower_dirs {
                    let (d, blob) = self.dir_layer(dir)?;
                    diff_ids.push(json!(d));
                    layers.push(blob);
                }
                let mut cfg = json!({
                    "architecture": oci_arch(),
                    "os": "linux",
                    "config": {
                        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                    },
                    "rootfs": {"type": "layers", "diff_ids": diff_ids},
                    "history": lower_dirs.iter().map(|d| json!({
                        "created": now,
                        "created_by": format!("warren: template layer {}", d.display()),
                    })).collect::<Vec<_>>(),
                });
                if !host_binds.is_empty() {
                    let binds: Vec<String> = host_binds
                        .iter()
                        .map(|(s, t)| format!("{}:{}", s.display(), t.display()))
                        .collect();
                    cfg["config"]["Labels"] = json!({ HOST_BINDS_LABEL: binds.join(",") });
                }
                if let Some(u) = user {
                    cfg["config"]["User"] = json!(u);
                }
                if let Some(c) = start_command {
                    cfg["config"]["Cmd"] = json!(["/bin/sh", "-c", c]);
                }
                (cfg, layers)
            }
        };
        if !config["rootfs"]["diff_ids"].is_array() {
            config["rootfs"] = json!({"type": "layers", "diff_ids": []});
        }
        if let (Some((_, diff_id)), Some(d)) = (layer, config["rootfs"]["diff_ids"].as_array_mut())
        {
            d.push(json!(diff_id));
        }
        if !config["history"].is_array() {
            config["history"] = json!([]);
        }
        if let Some(h) = config["history"].as_array_mut() {
            let mut entry = json!({"created": now, "created_by": created_by});
            if layer.is_none() {
                entry["empty_layer"] = json!(true);
            }
            h.push(entry);
        }
        patch.apply(&mut config);
        config["created"] = json!(now);
        let config_bytes = serde_json::to_vec(&config)
            .map_err(|e| ImageError::invalid("image config", format!("cannot serialize: {e}")))?;
        let config_info = self.store.add_blob_bytes(&config_bytes, None)?;
        if let Some((l, _)) = layer {
            layers.push(l.clone());
        }
        let image_size = layers.iter().map(|l| l.size).sum();
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(MEDIA_OCI_MANIFEST.into()),
            config: Descriptor::new(MEDIA_OCI_CONFIG, config_info.digest, config_info.size),
            layers,
            annotations: [("org.opencontainers.image.created".to_string(), now)]
                .into_iter()
                .collect(),
            other: Default::default(),
        };
        let desc = self.store.add_manifest(name, &manifest)?;
        Ok(Derived {
            digest: desc.digest,
            manifest_size: desc.size,
            image_size,
        })
    }

    /// The layer of a plain template dir: exported and unpacked once, then cached.
    fn dir_layer(&self, dir: &Path) -> Result<(String, Descriptor), CommitError> {
        if let Some(found) = self.stored_layer(dir)? {
            return Ok(found);
        }
        let _guard = self.dir_cache.lock().unwrap_or_else(|e| e.into_inner());
        let meta = std::fs::metadata(dir).map_err(io_err("stat", dir))?;
        let key = format!(
            "{}|{}|{}|{}",
            dir.display(),
            meta.dev(),
            meta.ino(),
            meta.mtime()
        );
        let mut cache: HashMap<String, DirLayer> = std::fs::read(&self.dir_cache_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        if let Some(c) = cache.get(&key) {
            // The store's gc may have collected both once no image used them.
            if self.store.has_blob(&c.digest) && self.layer_dir(&c.diff_id)?.is_dir() {
                return Ok((
                    c.diff_id.clone(),
                    Descriptor::new(MEDIA_OCI_LAYER_GZIP, c.digest.clone(), c.size),
                ));
            }
        }
        let staged = self.stage_upper(dir)?;
        let blob = self.tar_to_blob(&staged.tar)?;
        let diff_id = staged.summary.diff_id.clone();
        self.unpack_layer(&staged.tar, &diff_id)?;
        cache.insert(
            key,
            DirLayer {
                diff_id: diff_id.clone(),
                digest: blob.digest.clone(),
                size: blob.size,
            },
        );
        let tmp = self.store.temp_path("dir-layers");
        std::fs::write(&tmp, serde_json::to_vec(&cache).unwrap_or_default())
            .map_err(io_err("write", &tmp))?;
        std::fs::rename(&tmp, &self.dir_cache_file).map_err(io_err("rename", &tmp))?;
        Ok((diff_id, blob))
    }

    /// A lower dir that is a layer dir of this store (`layers/<diffid-hex>`) already has a blob:
    /// find it through any image that uses that diffID instead of exporting the dir again.
    fn stored_layer(&self, dir: &Path) -> Result<Option<(String, Descriptor)>, CommitError> {
        let Some(hex) = dir
            .strip_prefix(self.store.layers_dir())
            .ok()
            .and_then(|rel| rel.to_str())
            .filter(|h| !h.contains('/'))
        else {
            return Ok(None);
        };
        let diff_id = format!("sha256:{hex}");
        for (_, desc) in self.store.refs()? {
            let Ok(img) = self.store.image_from_descriptor(&desc) else {
                continue;
            };
            if let Some(i) = img
                .config
                .rootfs
                .diff_ids
                .iter()
                .position(|d| *d == diff_id)
            {
                if let Some(blob) = img
                    .manifest
                    .layers
                    .get(i)
                    .filter(|b| self.store.has_blob(&b.digest))
                {
                    return Ok(Some((diff_id, blob.clone())));
                }
            }
        }
        Ok(None)
    }

    /// Unpacks one of our own layer tars into `layers/<diffid-hex>` (temp dir, then
    /// [`ImageStore::add_layer_dir`]), in overlay format. Only for tars this module wrote;
    /// untrusted layers go through the store's hardened unpacker.
    fn unpack_layer(&self, tar: &Path, diff_id: &str) -> Result<PathBuf, CommitError> {
        let dst = self.layer_dir(diff_id)?;
        if dst.is_dir() {
            return Ok(dst);
        }
        let tmp = self.store.temp_path("layer");
        if let Err(source) = unpack_overlay(tar, &tmp) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(CommitError::Unpack {
                diff_id: diff_id.into(),
                source,
            });
        }
        let res = self.store.add_layer_dir(diff_id, &tmp);
        let _ = std::fs::remove_dir_all(&tmp);
        Ok(res?)
    }
}

/// The read-only host bind mounts an image's sandboxes need (see [`HOST_BINDS_LABEL`]).
pub fn host_binds(config_raw: &[u8]) -> Vec<(PathBuf, PathBuf)> {
    serde_json::from_slice::<serde_json::Value>(config_raw)
        .ok()
        .and_then(|c| {
            c["config"]["Labels"][HOST_BINDS_LABEL]
                .as_str()
                .map(parse_binds)
        })
        .unwrap_or_default()
}

fn parse_binds(s: &str) -> Vec<(PathBuf, PathBuf)> {
    s.split(',')
        .filter_map(|b| {
            let (src, dst) = b.split_once(':')?;
            Some((PathBuf::from(src), PathBuf::from(dst)))
        })
        .collect()
}

fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Unpacks a layer tar into `dst` in overlay format: `.wh.<name>` → 0:0 char device,
/// `.wh..wh..opq` → `trusted.overlay.opaque=y` on its dir.
fn unpack_overlay(tar: &Path, dst: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    std::fs::create_dir_all(dst)?;
    let file = std::fs::File::open(tar)?;
    let mut ar = tar::Archive::new(BufReader::with_capacity(1 << 20, file));
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_preserve_mtime(true);
    ar.set_unpack_xattrs(true);
    ar.set_overwrite(true);
    for entry in ar.entries()? {
        let mut entry = entry?;
        let rel = entry.path()?.into_owned();
        let name = rel
            .file_name()
            .map(|n| n.as_bytes().to_vec())
            .unwrap_or_default();
        let parent = dst.join(rel.parent().unwrap_or(Path::new("")));
        let kind = entry.header().entry_type();
        if name == b".wh..wh..opq" {
            std::fs::create_dir_all(&parent)?;
            rustix::fs::lsetxattr(
                &parent,
                "trusted.overlay.opaque",
                b"y",
                rustix::fs::XattrFlags::empty(),
            )?;
        } else if let Some(hidden) = name.strip_prefix(b".wh.") {
            std::fs::create_dir_all(&parent)?;
            let target = parent.join(std::ffi::OsStr::from_bytes(hidden));
            rustix::fs::mknodat(
                rustix::fs::CWD,
                &target,
                rustix::fs::FileType::CharacterDevice,
                rustix::fs::Mode::empty(),
                rustix::fs::makedev(0, 0),
            )?;
        } else if matches!(
            kind,
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo
        ) {
            std::fs::create_dir_all(&parent)?;
            let h = entry.header();
            let (ft, dev) = match kind {
                tar::EntryType::Char => (
                    rustix::fs::FileType::CharacterDevice,
                    rustix::fs::makedev(
                        h.device_major()?.unwrap_or(0),
                        h.device_minor()?.unwrap_or(0),
                    ),
                ),
                tar::EntryType::Block => (
                    rustix::fs::FileType::BlockDevice,
                    rustix::fs::makedev(
                        h.device_major()?.unwrap_or(0),
                        h.device_minor()?.unwrap_or(0),
                    ),
                ),
                _ => (rustix::fs::FileType::Fifo, 0),
            };
            let target = dst.join(&rel);
            let mode = h.mode()? & 0o7777;
            rustix::fs::mknodat(
                rustix::fs::CWD,
                &target,
                ft,
                rustix::fs::Mode::from_raw_mode(mode),
                dev,
            )?;
            std::os::unix::fs::lchown(&target, Some(h.uid()? as u32), Some(h.gid()? as u32))?;
            // mknod applies the umask; the layer needs the mode as recorded.
            rustix::fs::chmod(&target, rustix::fs::Mode::from_raw_mode(mode))?;
        } else {
            entry.unpack_in(dst)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
