//! The on-disk image store: an OCI image layout plus one unpacked directory per layer.
//!
//! Layout under the store root (`<data-dir>/images`):
//!
//! ```text
//! oci/oci-layout                 {"imageLayoutVersion":"1.0.0"}
//! oci/index.json                 every image, named by an org.opencontainers.image.ref.name annotation
//! oci/blobs/sha256/<hex>         manifests, configs and (compressed) layers, content-addressed
//! layers/<diffid-hex>/           a layer unpacked in overlay format (see unpack.rs)
//! tmp/                           work in progress; emptied at open
//! ```
//!
//! Everything that appears under `oci/blobs` or `layers` got there by a rename from `tmp/` after
//! its digest was checked, and `index.json` is replaced by a rename: a crash or a failed pull
//! leaves either the old state or the new one, never half of a blob or layer. Because `skopeo`
//! and `umoci` read `oci/` directly, the store is also how images leave Warren.
//!
//! Layers are reference-counted by the images of the index that use them ([`ImageStore::layer_refs`]);
//! [`ImageStore::gc`] removes blobs and layer dirs no image references.

use crate::error::{ImageError, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const MEDIA_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MEDIA_OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// The annotation that names an image in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Checks `sha256:<64 hex>` and returns the hex part.
pub fn digest_hex(digest: &str) -> Result<&str> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| ImageError::BadDigest(digest.to_string()))?;
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(ImageError::BadDigest(digest.to_string()));
    }
    Ok(hex)
}

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A content descriptor as in the OCI image spec (fields this crate does not know are kept).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

impl Descriptor {
    pub fn new(media_type: &str, digest: String, size: u64) -> Self {
        Descriptor {
            media_type: media_type.to_string(),
            digest,
            size,
            annotations: BTreeMap::new(),
            platform: None,
            other: serde_json::Map::new(),
        }
    }

    pub fn ref_name(&self) -> Option<&str> {
        self.annotations.get(REF_NAME).map(String::as_str)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// `index.json` of an OCI layout, or an image index / Docker manifest list blob.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

impl Default for Index {
    fn default() -> Self {
        Index {
            schema_version: 2,
            media_type: Some(MEDIA_OCI_INDEX.to_string()),
            manifests: vec![],
            other: serde_json::Map::new(),
        }
    }
}

/// An image manifest (OCI, or Docker schema 2, which has the same shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// The parts of an image config that Warren uses; the whole document stays available as
/// [`Image::config_raw`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub config: Option<RunConfig>,
    pub rootfs: RootFs,
}

/// The `config` section: how a container of the image runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// An image of the store, resolved from a reference.
#[derive(Debug, Clone)]
pub struct Image {
    pub manifest_digest: String,
    pub manifest_media_type: String,
    pub manifest: Manifest,
    pub config: ImageConfig,
    /// The config blob as stored (commit copies it and changes only what it must).
    pub config_raw: Vec<u8>,
}

impl Image {
    /// Total size of the image's blobs (compressed layers, config, manifest).
    pub fn size(&self) -> u64 {
        self.manifest.config.size + self.manifest.layers.iter().map(|l| l.size).sum::<u64>()
    }
}

/// A blob that is in the store.
#[derive(Debug, Clone, PartialEq)]
pub struct BlobInfo {
    pub digest: String,
    pub size: u64,
    /// Whether this call put it there (it was not in the store before).
    pub added: bool,
}

/// Keeps [`ImageStore::gc`] from deleting what a running operation has written but not yet
/// referenced from the index.
pub struct OperationGuard {
    active: Arc<AtomicUsize>,
}

impl Drop for OperationGuard {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The image store. Cheap to clone; all clones share the locks.
#[derive(Clone)]
pub struct ImageStore {
    root: PathBuf,
    /// Serialises read-modify-write of index.json.
    index_lock: Arc<Mutex<()>>,
    /// Held by gc for its whole run, and briefly by an operation starting (see [`OperationGuard`]).
    gc_lock: Arc<Mutex<()>>,
    active: Arc<AtomicUsize>,
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore")
            .field("root", &self.root)
            .finish()
    }
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ImageError + 'a {
    move |e| ImageError::io(op, path, e)
}

impl ImageStore {
    /// Opens (creating if needed) the store at `root` (conventionally `<data-dir>/images`) and
    /// removes the leftovers of interrupted work from `tmp/`.
    pub fn open(root: impl Into<PathBuf>) -> Result<ImageStore> {
        let store = ImageStore {
            root: root.into(),
            index_lock: Arc::default(),
            gc_lock: Arc::default(),
            active: Arc::default(),
        };
        for dir in [
            store.oci_dir().join("blobs/sha256"),
            store.layers_dir(),
            store.tmp_dir(),
        ] {
            std::fs::create_dir_all(&dir).map_err(io("mkdir", &dir))?;
        }
        let layout = store.oci_dir().join("oci-layout");
        if !layout.exists() {
            write_atomic(&store, &layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        let index = store.oci_dir().join("index.json");
        if !index.exists() {
            let body = serde_json::to_vec(&Index::default()).expect("index serializes");
            write_atomic(&store, &index, &body)?;
        }
        store.clean_tmp()?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The OCI image layout directory (`skopeo inspect oci:<this>:<ref>` reads it).
    pub fn oci_dir(&self) -> PathBuf {
        self.root.join("oci")
    }

    pub fn layers_dir(&self) -> PathBuf {
        self.root.join("layers")
    }

    /// Scratch space on the store's filesystem, so finished work is renamed into place.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn clean_tmp(&self) -> Result<()> {
        let tmp = self.tmp_dir();
        for entry in std::fs::read_dir(&tmp)
            .map_err(io("read dir", &tmp))?
            .flatten()
        {
            let p = entry.path();
            let res = if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            res.map_err(io("remove", &p))?;
        }
        Ok(())
    }

    /// Marks an operation that writes to the store as running, so that gc leaves its blobs alone
    /// until they are referenced (or the operation ends and its leftovers become garbage).
    pub fn begin_operation(&self) -> OperationGuard {
        let _gc = self.gc_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.active.fetch_add(1, Ordering::SeqCst);
        OperationGuard {
            active: self.active.clone(),
        }
    }

    /// A fresh, unique scratch path under `tmp/`.
    pub fn temp_path(&self, what: &str) -> PathBuf {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        self.tmp_dir()
            .join(format!("{what}-{}-{n}", std::process::id()))
    }

    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self
            .oci_dir()
            .join("blobs/sha256")
            .join(digest_hex(digest)?))
    }

    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).map(|p| p.is_file()).unwrap_or(false)
    }

    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let p = self.blob_path(digest)?;
        match std::fs::read(&p) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(ImageError::MissingBlob(digest.to_string()))
            }
            Err(e) => Err(ImageError::io("read", p, e)),
        }
    }

    /// A writer for a new blob: bytes are hashed while written to `tmp/`, and
    /// [`BlobWriter::finish`] checks the digest and renames the file into `blobs/`.
    pub fn blob_writer(&self) -> Result<BlobWriter> {
        let tmp = self.temp_path("blob");
        let file = File::create(&tmp).map_err(io("create", &tmp))?;
        Ok(BlobWriter {
            store: self.clone(),
            file: Some(std::io::BufWriter::with_capacity(256 * 1024, file)),
            tmp,
            hasher: Sha256::new(),
            size: 0,
        })
    }

    /// Adds a blob read from `reader`; with `expected` set, a blob of another digest is refused
    /// and nothing is added.
    pub fn add_blob(&self, reader: &mut dyn Read, expected: Option<&str>) -> Result<BlobInfo> {
        if let Some(d) = expected {
            digest_hex(d)?;
        }
        let mut w = self.blob_writer()?;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ImageError::io("read", "blob source", e)),
            };
            w.write_all(&buf[..n])
                .map_err(|e| ImageError::io("write", w.tmp.clone(), e))?;
        }
        w.finish(expected)
    }

    pub fn add_blob_bytes(&self, bytes: &[u8], expected: Option<&str>) -> Result<BlobInfo> {
        self.add_blob(&mut &bytes[..], expected)
    }

    /// Reads `index.json`.
    pub fn index(&self) -> Result<Index> {
        let p = self.oci_dir().join("index.json");
        let bytes = std::fs::read(&p).map_err(io("read", &p))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ImageError::invalid(p.display().to_string(), e.to_string()))
    }

    fn update_index(&self, f: impl FnOnce(&mut Index)) -> Result<()> {
        let _g = self.index_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut index = self.index()?;
        f(&mut index);
        let body = serde_json::to_vec_pretty(&index).expect("index serializes");
        write_atomic(self, &self.oci_dir().join("index.json"), &body)
    }

    /// Names the manifest (already a blob of the store) `reference` in the index, replacing what
    /// the name meant before.
    pub fn set_ref(&self, reference: &str, manifest: Descriptor) -> Result<()> {
        check_ref_name(reference)?;
        if !self.has_blob(&manifest.digest) {
            return Err(ImageError::MissingBlob(manifest.digest));
        }
        let mut desc = manifest;
        desc.annotations
            .insert(REF_NAME.to_string(), reference.to_string());
        self.update_index(|index| {
            index.manifests.retain(|d| d.ref_name() != Some(reference));
            index.manifests.push(desc);
        })
    }

    /// Stores a manifest (serialized as given) and names it `reference`. Its config and layers
    /// must already be blobs of the store. Returns the manifest's descriptor.
    pub fn add_manifest(&self, reference: &str, manifest: &Manifest) -> Result<Descriptor> {
        check_ref_name(reference)?;
        for d in std::iter::once(&manifest.config).chain(&manifest.layers) {
            if !self.has_blob(&d.digest) {
                return Err(ImageError::MissingBlob(d.digest.clone()));
            }
        }
        let bytes = serde_json::to_vec(manifest).expect("manifest serializes");
        let info = self.add_blob_bytes(&bytes, None)?;
        let media = manifest
            .media_type
            .clone()
            .unwrap_or_else(|| MEDIA_OCI_MANIFEST.to_string());
        let desc = Descriptor::new(&media, info.digest, info.size);
        self.set_ref(reference, desc.clone())?;
        Ok(desc)
    }

    /// Removes the name `reference` (its blobs and layers go at the next [`Self::gc`]).
    pub fn remove_ref(&self, reference: &str) -> Result<bool> {
        let mut found = false;
        self.update_index(|index| {
            let before = index.manifests.len();
            index.manifests.retain(|d| d.ref_name() != Some(reference));
            found = index.manifests.len() != before;
        })?;
        Ok(found)
    }

    /// Every named image: (reference, manifest descriptor).
    pub fn refs(&self) -> Result<Vec<(String, Descriptor)>> {
        Ok(self
            .index()?
            .manifests
            .into_iter()
            .filter_map(|d| d.ref_name().map(|r| (r.to_string(), d.clone())))
            .collect())
    }

    /// Resolves a name of the index, or a manifest digest, to the image.
    pub fn resolve(&self, reference: &str) -> Result<Image> {
        let desc = if reference.starts_with("sha256:") {
            digest_hex(reference)?;
            Descriptor::new(MEDIA_OCI_MANIFEST, reference.to_string(), 0)
        } else {
            self.index()?
                .manifests
                .into_iter()
                .find(|d| d.ref_name() == Some(reference))
                .ok_or_else(|| ImageError::NotFound(reference.to_string()))?
        };
        self.image_from_descriptor(&desc)
    }

    /// Loads the image a manifest (or an index, by the current platform) descriptor points at.
    pub fn image_from_descriptor(&self, desc: &Descriptor) -> Result<Image> {
        let bytes = match self.read_blob(&desc.digest) {
            Err(ImageError::MissingBlob(_)) if desc.size == 0 => {
                return Err(ImageError::NotFound(desc.digest.clone()))
            }
            r => r?,
        };
        let value: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| ImageError::invalid(format!("manifest {}", desc.digest), e.to_string()))?;
        let media = value
            .get("mediaType")
            .and_then(|m| m.as_str())
            .unwrap_or(&desc.media_type)
            .to_string();
        if media == MEDIA_OCI_INDEX
            || media == MEDIA_DOCKER_LIST
            || value.get("manifests").is_some()
        {
            let index: Index = serde_json::from_value(value).map_err(|e| {
                ImageError::invalid(format!("index {}", desc.digest), e.to_string())
            })?;
            let child = pick_platform(&index.manifests).ok_or_else(|| {
                ImageError::invalid(
                    format!("index {}", desc.digest),
                    format!("no image for {}/{}", "linux", host_arch()),
                )
            })?;
            return self.image_from_descriptor(child);
        }
        let manifest: Manifest = serde_json::from_value(value)
            .map_err(|e| ImageError::invalid(format!("manifest {}", desc.digest), e.to_string()))?;
        let config_raw = self.read_blob(&manifest.config.digest)?;
        let config: ImageConfig = serde_json::from_slice(&config_raw).map_err(|e| {
            ImageError::invalid(
                format!("image config {}", manifest.config.digest),
                e.to_string(),
            )
        })?;
        if config.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(ImageError::invalid(
                format!("image {}", desc.digest),
                format!(
                    "{} layers but {} diff_ids in the config",
                    manifest.layers.len(),
                    config.rootfs.diff_ids.len()
                ),
            ));
        }
        for d in &config.rootfs.diff_ids {
            digest_hex(d)?;
        }
        Ok(Image {
            manifest_digest: desc.digest.clone(),
            manifest_media_type: media,
            manifest,
            config,
            config_raw,
        })
    }

    /// The unpacked directory of the layer with this diffID (it may not exist yet).
    pub fn layer_dir(&self, diff_id: &str) -> Result<PathBuf> {
        Ok(self.layers_dir().join(digest_hex(diff_id)?))
    }

    /// The unpacked layer dirs of an image, **topmost first** (the order of overlayfs'
    /// `lowerdir=`), unpacking the layers that are not yet. Layers shared with other images are
    /// unpacked once and used by all.
    pub fn layer_dirs(&self, image: &Image, progress: &crate::Progress) -> Result<Vec<PathBuf>> {
        let _op = self.begin_operation();
        let mut dirs = Vec::with_capacity(image.manifest.layers.len());
        let total = image.manifest.layers.len();
        for (i, (layer, diff_id)) in image
            .manifest
            .layers
            .iter()
            .zip(&image.config.rootfs.diff_ids)
            .enumerate()
        {
            let dir = self.layer_dir(diff_id)?;
            if !dir.is_dir() {
                progress(crate::ProgressEvent {
                    phase: crate::Phase::Unpack,
                    item: format!("layer {}/{} {}", i + 1, total, short(&layer.digest)),
                    done: 0,
                    total: layer.size,
                });
                crate::unpack::unpack_layer(self, layer, diff_id, progress)?;
            }
            dirs.push(dir);
        }
        dirs.reverse();
        Ok(dirs)
    }

    /// Moves a directory already in overlay format (on the store's filesystem, e.g. a frozen
    /// upper dir) into the store as the layer `diff_id`. An existing layer of that diffID wins.
    pub fn add_layer_dir(&self, diff_id: &str, dir: &Path) -> Result<PathBuf> {
        let target = self.layer_dir(diff_id)?;
        rename_into_place(dir, &target)?;
        Ok(target)
    }

    /// How many images of the index use each unpackable layer (by diffID).
    pub fn layer_refs(&self) -> Result<BTreeMap<String, usize>> {
        let mut refs = BTreeMap::new();
        for image in self.images()? {
            for d in &image.config.rootfs.diff_ids {
                *refs.entry(d.clone()).or_default() += 1;
            }
        }
        Ok(refs)
    }

    /// Every image the index names (unreadable ones are skipped with a warning).
    fn images(&self) -> Result<Vec<Image>> {
        let mut out = vec![];
        for desc in self.index()?.manifests {
            match self.image_from_descriptor(&desc) {
                Ok(i) => out.push(i),
                Err(e) => {
                    tracing::warn!(digest = %desc.digest, error = %e, "unreadable image in the index")
                }
            }
        }
        Ok(out)
    }

    /// Blobs and layer dirs referenced by the index, with every manifest of nested indexes.
    fn referenced(&self) -> Result<(BTreeSet<String>, BTreeSet<String>)> {
        let mut blobs = BTreeSet::new();
        let mut layers = BTreeSet::new();
        let mut todo: Vec<Descriptor> = self.index()?.manifests;
        while let Some(desc) = todo.pop() {
            let Ok(hex) = digest_hex(&desc.digest) else {
                continue;
            };
            if !blobs.insert(hex.to_string()) {
                continue;
            }
            let Ok(bytes) = self.read_blob(&desc.digest) else {
                continue;
            };
            let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
                continue;
            };
            if value.get("manifests").is_some() {
                if let Ok(index) = serde_json::from_value::<Index>(value) {
                    todo.extend(index.manifests);
                }
                continue;
            }
            let Ok(manifest) = serde_json::from_value::<Manifest>(value) else {
                continue;
            };
            for d in std::iter::once(&manifest.config).chain(&manifest.layers) {
                if let Ok(h) = digest_hex(&d.digest) {
                    blobs.insert(h.to_string());
                }
            }
            if let Ok(cfg) = self.read_blob(&manifest.config.digest).and_then(|b| {
                serde_json::from_slice::<ImageConfig>(&b)
                    .map_err(|e| ImageError::invalid("config", e.to_string()))
            }) {
                for d in cfg.rootfs.diff_ids {
                    if let Ok(h) = digest_hex(&d) {
                        layers.insert(h.to_string());
                    }
                }
            }
        }
        Ok((blobs, layers))
    }

    /// Removes every blob and layer dir that no image of the index references. Skipped (returns
    /// `None`) while an operation is writing to the store, since its new blobs are not
    /// referenced yet.
    pub fn gc(&self) -> Result<Option<GcReport>> {
        self.gc_keeping(&[])
    }

    /// [`gc`](Self::gc), but a layer dir that is, or contains, one of `in_use` (the lower dirs
    /// of sandboxes and checkpoints) stays even when no image references it any more: a
    /// sandbox keeps the layers it started on when its template is rebuilt.
    pub fn gc_keeping(&self, in_use: &[PathBuf]) -> Result<Option<GcReport>> {
        let _gc = self.gc_lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.active.load(Ordering::SeqCst) > 0 {
            return Ok(None);
        }
        let (blobs, layers) = self.referenced()?;
        let mut report = GcReport::default();
        let blob_dir = self.oci_dir().join("blobs/sha256");
        for entry in std::fs::read_dir(&blob_dir)
            .map_err(io("read dir", &blob_dir))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !blobs.contains(&name) {
                let p = entry.path();
                report.bytes += entry.metadata().map(|m| m.len()).unwrap_or(0);
                std::fs::remove_file(&p).map_err(io("remove", &p))?;
                report.blobs += 1;
            }
        }
        let layer_dir = self.layers_dir();
        for entry in std::fs::read_dir(&layer_dir)
            .map_err(io("read dir", &layer_dir))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if !layers.contains(&name) && !in_use.iter().any(|d| d.starts_with(&path)) {
                remove_layer(&path)?;
                report.layers += 1;
            }
        }
        Ok(Some(report))
    }

    /// Removes what a failed operation added (`blobs` digests and `layers` diffIDs), unless the
    /// index references it by now (another operation added the same content meanwhile).
    pub fn rollback(&self, blobs: &[String], layers: &[String]) {
        let Ok((ref_blobs, ref_layers)) = self.referenced() else {
            return;
        };
        for d in blobs {
            if let Ok(hex) = digest_hex(d) {
                if !ref_blobs.contains(hex) {
                    let _ = std::fs::remove_file(self.oci_dir().join("blobs/sha256").join(hex));
                }
            }
        }
        for d in layers {
            if let Ok(hex) = digest_hex(d) {
                if !ref_layers.contains(hex) {
                    let _ = remove_layer(&self.layers_dir().join(hex));
                }
            }
        }
    }
}

/// What a gc removed.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GcReport {
    pub blobs: usize,
    pub bytes: u64,
    pub layers: usize,
}

/// Removes a layer dir by first renaming it into `tmp/` (so a crash midway leaves no
/// half-deleted layer under its real name, and `tmp/` is emptied at the next open).
fn remove_layer(dir: &Path) -> Result<()> {
    let Some(layers) = dir.parent() else {
        return Ok(());
    };
    let Some(root) = layers.parent() else {
        return Ok(());
    };
    let doomed = root.join("tmp").join(format!(
        "gc-{}-{}",
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    match std::fs::rename(dir, &doomed) {
        Ok(()) => std::fs::remove_dir_all(&doomed).map_err(io("remove", &doomed)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ImageError::io("rename", dir, e)),
    }
}

/// Renames `from` to `to` unless `to` exists already (then `from` is removed): content-addressed
/// targets with the same name have the same content.
pub(crate) fn rename_into_place(from: &Path, to: &Path) -> Result<()> {
    if to.exists() {
        let _ = if from.is_dir() {
            std::fs::remove_dir_all(from)
        } else {
            std::fs::remove_file(from)
        };
        return Ok(());
    }
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        // Another operation renamed the same content into place first.
        Err(_) if to.exists() => {
            let _ = if from.is_dir() {
                std::fs::remove_dir_all(from)
            } else {
                std::fs::remove_file(from)
            };
            Ok(())
        }
        Err(e) => Err(ImageError::io("rename", from, e)),
    }
}

fn write_atomic(store: &ImageStore, path: &Path, body: &[u8]) -> Result<()> {
    let tmp = store.temp_path("write");
    let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(body).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("fsync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename", &tmp))
}

/// Reference names of the index: printable, no whitespace, bounded. They are JSON strings and
/// never paths, so this is about clear errors, not safety.
fn check_ref_name(reference: &str) -> Result<()> {
    if reference.is_empty()
        || reference.len() > 512
        || reference
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(ImageError::BadReference {
            reference: reference.to_string(),
            reason: "a reference name is 1-512 printable characters without spaces".into(),
        });
    }
    Ok(())
}

pub(crate) fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// The manifest of an index for this host (linux and our architecture).
pub(crate) fn pick_platform(manifests: &[Descriptor]) -> Option<&Descriptor> {
    manifests
        .iter()
        .find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == host_arch())
        })
        .or_else(|| {
            // An index without platforms (as single-image OCI layouts often are) means the one image.
            (manifests.len() == 1 && manifests[0].platform.is_none()).then(|| &manifests[0])
        })
}

pub(crate) fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

/// See [`ImageStore::blob_writer`].
pub struct BlobWriter {
    store: ImageStore,
    file: Option<std::io::BufWriter<File>>,
    tmp: PathBuf,
    hasher: Sha256,
    size: u64,
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| std::io::Error::other("blob already finished"))?;
        let n = f.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl BlobWriter {
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Checks the digest against `expected` (if any), then moves the blob into the store.
    pub fn finish(mut self, expected: Option<&str>) -> Result<BlobInfo> {
        let file = self.file.take().expect("finish is called once");
        let file = file
            .into_inner()
            .map_err(|e| ImageError::io("write", self.tmp.clone(), e.into_error()))?;
        let digest = format!("sha256:{}", hex(&self.hasher.clone().finalize()));
        if let Some(expected) = expected {
            if expected != digest {
                return Err(ImageError::DigestMismatch {
                    what: "blob".into(),
                    expected: expected.to_string(),
                    actual: digest,
                });
            }
        }
        file.sync_all().map_err(io("fsync", &self.tmp))?;
        drop(file);
        let target = self.store.blob_path(&digest)?;
        let added = !target.exists();
        rename_into_place(&self.tmp, &target)?;
        Ok(BlobInfo {
            digest,
            size: self.size,
            added,
        })
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // Unfinished or refused: the partial file goes.
        let _ = std::fs::remove_file(&self.tmp);
    }
}
