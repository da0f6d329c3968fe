//! Importing images from files: an OCI image layout directory, an `oci-archive` tarball (an OCI
//! layout in a tar) or a `docker-archive` tarball (`docker save`: `manifest.json`, a config and
//! one tar per layer).
//!
//! Every blob is hashed on the way in and refused if it does not match its descriptor; every
//! layer is unpacked and its diffID checked against the config; only then is the image named in
//! the index. A failure at any step removes what the import added, so the store is as it was.

use crate::error::{ImageError, Result};
use crate::store::{
    digest_hex, pick_platform, Descriptor, Image, ImageStore, Index, Manifest, MEDIA_DOCKER_LIST,
    MEDIA_OCI_CONFIG, MEDIA_OCI_INDEX, MEDIA_OCI_LAYER, MEDIA_OCI_LAYER_GZIP, MEDIA_OCI_LAYER_ZSTD,
    MEDIA_OCI_MANIFEST,
};
use crate::unpack::{sniff, Compression};
use crate::{Phase, Progress, ProgressEvent};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

/// What a finished import or pull made.
#[derive(Debug, Clone)]
pub struct Imported {
    pub image: Image,
    /// The manifest descriptor now named in the index.
    pub descriptor: Descriptor,
    /// Unpacked layer dirs, topmost first.
    pub layer_dirs: Vec<std::path::PathBuf>,
}

/// Tracks what an operation added, so that a failure (or the end of the operation, for spooled
/// files that turned out not to be blobs of the image) removes exactly that.
#[derive(Default)]
pub(crate) struct Added {
    pub blobs: Vec<String>,
}

impl Added {
    pub(crate) fn note(&mut self, info: &crate::store::BlobInfo) {
        if info.added {
            self.blobs.push(info.digest.clone());
        }
    }
}

/// Where the blobs of an OCI layout come from.
enum Source<'a> {
    Dir(&'a Path),
    /// Members of an archive already spooled into the store, by digest hex.
    Spooled(&'a BTreeMap<String, u64>),
}

impl Source<'_> {
    fn fetch(&self, store: &ImageStore, desc: &Descriptor, added: &mut Added) -> Result<()> {
        let hex = digest_hex(&desc.digest)?;
        let size = match self {
            Source::Spooled(blobs) => *blobs.get(hex).ok_or_else(|| {
                ImageError::MissingBlob(format!("{} (not in the archive)", desc.digest))
            })?,
            Source::Dir(dir) => {
                let p = dir.join("blobs/sha256").join(hex);
                if store.has_blob(&desc.digest) {
                    std::fs::metadata(store.blob_path(&desc.digest)?)
                        .map(|m| m.len())
                        .unwrap_or(desc.size)
                } else {
                    let mut f = std::fs::File::open(&p).map_err(|e| match e.kind() {
                        std::io::ErrorKind::NotFound => {
                            ImageError::MissingBlob(format!("{} (no {})", desc.digest, p.display()))
                        }
                        _ => ImageError::io("open", &p, e),
                    })?;
                    let info = store
                        .add_blob(&mut f, Some(&desc.digest))
                        .map_err(|e| match e {
                            ImageError::DigestMismatch {
                                expected, actual, ..
                            } => ImageError::DigestMismatch {
                                what: p.display().to_string(),
                                expected,
                                actual,
                            },
                            e => e,
                        })?;
                    added.note(&info);
                    info.size
                }
            }
        };
        if size != desc.size {
            return Err(ImageError::SizeMismatch {
                what: desc.digest.clone(),
                expected: desc.size,
                actual: size,
            });
        }
        Ok(())
    }
}

/// Imports the image of the OCI layout at `dir` named `name` (its `ref.name` annotation; may be
/// omitted when the layout holds one image) and names it `as_ref` in the store.
pub fn import_oci_dir(
    store: &ImageStore,
    dir: &Path,
    name: Option<&str>,
    as_ref: &str,
    progress: &Progress,
) -> Result<Imported> {
    let _op = store.begin_operation();
    let index_path = dir.join("index.json");
    let bytes = std::fs::read(&index_path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ImageError::invalid(
            dir.display().to_string(),
            "not an OCI image layout (no index.json)",
        ),
        _ => ImageError::io("read", &index_path, e),
    })?;
    let mut added = Added::default();
    let res = import_layout(
        store,
        &bytes,
        &Source::Dir(dir),
        name,
        as_ref,
        progress,
        &mut added,
    );
    finish(store, res, added)
}

/// Imports an `oci-archive` (an OCI layout as a tar, possibly gzip- or zstd-compressed).
pub fn import_oci_archive(
    store: &ImageStore,
    archive: &Path,
    name: Option<&str>,
    as_ref: &str,
    progress: &Progress,
) -> Result<Imported> {
    let _op = store.begin_operation();
    let mut added = Added::default();
    let res = spool(store, archive, progress, &mut added).and_then(|members| {
        let blobs = layout_blobs(&members)?;
        let index = members.get("index.json").ok_or_else(|| {
            ImageError::invalid(
                archive.display().to_string(),
                "not an oci-archive (no index.json)",
            )
        })?;
        let bytes = store.read_blob(&index.digest)?;
        import_layout(
            store,
            &bytes,
            &Source::Spooled(&blobs),
            name,
            as_ref,
            progress,
            &mut added,
        )
    });
    finish(store, res, added)
}

/// Imports a `docker-archive` (`docker save` output). `name` picks one of its `RepoTags` when it
/// holds several images.
pub fn import_docker_archive(
    store: &ImageStore,
    archive: &Path,
    name: Option<&str>,
    as_ref: &str,
    progress: &Progress,
) -> Result<Imported> {
    let _op = store.begin_operation();
    let mut added = Added::default();
    let res = spool(store, archive, progress, &mut added).and_then(|members| {
        let what = archive.display().to_string();
        let manifest = members
            .get("manifest.json")
            .ok_or_else(|| ImageError::invalid(&what, "not a docker-archive (no manifest.json)"))?;
        let entries: Vec<DockerEntry> = serde_json::from_slice(&store.read_blob(&manifest.digest)?)
            .map_err(|e| ImageError::invalid(format!("{what}: manifest.json"), e.to_string()))?;
        let entry = match name {
            Some(n) => entries
                .iter()
                .find(|e| e.repo_tags.iter().any(|t| t == n))
                .ok_or_else(|| ImageError::NotFound(format!("{n} in {what}")))?,
            None if entries.len() == 1 => &entries[0],
            None => {
                return Err(ImageError::invalid(
                    &what,
                    format!("{} images in the archive: name one", entries.len()),
                ))
            }
        };
        let member = |path: &str| {
            let key = normalize(path)
                .ok_or_else(|| ImageError::invalid(&what, format!("bad member name {path:?}")))?;
            members
                .get(&key)
                .cloned()
                .ok_or_else(|| ImageError::invalid(&what, format!("{path} is not in the archive")))
        };
        let config = member(&entry.config)?;
        let mut layers = vec![];
        for l in &entry.layers {
            let m = member(l)?;
            let mut head = [0u8; 4];
            let n = std::fs::File::open(store.blob_path(&m.digest)?)
                .and_then(|mut f| f.read(&mut head))
                .map_err(|e| ImageError::io("read", l, e))?;
            let media = match sniff(&head[..n]) {
                Compression::Gzip => MEDIA_OCI_LAYER_GZIP,
                Compression::Zstd => MEDIA_OCI_LAYER_ZSTD,
                Compression::None => MEDIA_OCI_LAYER,
            };
            layers.push(Descriptor::new(media, m.digest.clone(), m.size));
        }
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(MEDIA_OCI_MANIFEST.to_string()),
            config: Descriptor::new(MEDIA_OCI_CONFIG, config.digest.clone(), config.size),
            layers,
            annotations: BTreeMap::new(),
            other: serde_json::Map::new(),
        };
        let bytes = serde_json::to_vec(&manifest).expect("manifest serializes");
        let info = store.add_blob_bytes(&bytes, None)?;
        added.note(&info);
        let desc = Descriptor::new(MEDIA_OCI_MANIFEST, info.digest, info.size);
        complete(store, desc, as_ref, progress)
    });
    finish(store, res, added)
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Vec<String>,
    layers: Vec<String>,
}

/// On success the import's spooled leftovers go; on failure everything it added goes.
fn finish(store: &ImageStore, res: Result<Imported>, added: Added) -> Result<Imported> {
    store.rollback(&added.blobs, &[]);
    res
}

fn import_layout(
    store: &ImageStore,
    index_bytes: &[u8],
    source: &Source<'_>,
    name: Option<&str>,
    as_ref: &str,
    progress: &Progress,
    added: &mut Added,
) -> Result<Imported> {
    let index: Index = serde_json::from_slice(index_bytes)
        .map_err(|e| ImageError::invalid("index.json", e.to_string()))?;
    let top = match name {
        Some(n) => index
            .manifests
            .iter()
            .find(|d| {
                d.ref_name()
                    .is_some_and(|r| r == n || r.rsplit_once(':').map(|(_, t)| t) == Some(n))
            })
            .ok_or_else(|| ImageError::NotFound(format!("{n} in the layout's index.json")))?,
        None if index.manifests.len() == 1 => &index.manifests[0],
        None => {
            let names: Vec<&str> = index
                .manifests
                .iter()
                .filter_map(|d| d.ref_name())
                .collect();
            return Err(ImageError::invalid(
                "index.json",
                format!(
                    "{} images in the layout ({}): name one",
                    index.manifests.len(),
                    names.join(", ")
                ),
            ));
        }
    };
    let mut desc = top.clone();
    desc.annotations.clear();
    source.fetch(store, &desc, added)?;
    // A nested index (multi-platform): fetch it, then the manifest for this host.
    let blob = store.read_blob(&desc.digest)?;
    let value: serde_json::Value = serde_json::from_slice(&blob)
        .map_err(|e| ImageError::invalid(format!("manifest {}", desc.digest), e.to_string()))?;
    let manifest_desc = if desc.media_type == MEDIA_OCI_INDEX
        || desc.media_type == MEDIA_DOCKER_LIST
        || value.get("manifests").is_some()
    {
        let nested: Index = serde_json::from_value(value)
            .map_err(|e| ImageError::invalid(format!("index {}", desc.digest), e.to_string()))?;
        let child = pick_platform(&nested.manifests)
            .ok_or_else(|| {
                ImageError::invalid(
                    format!("index {}", desc.digest),
                    "no image for this platform",
                )
            })?
            .clone();
        source.fetch(store, &child, added)?;
        child
    } else {
        desc.clone()
    };
    let manifest: Manifest = serde_json::from_slice(&store.read_blob(&manifest_desc.digest)?)
        .map_err(|e| {
            ImageError::invalid(format!("manifest {}", manifest_desc.digest), e.to_string())
        })?;
    source.fetch(store, &manifest.config, added)?;
    let total = manifest.layers.len();
    for (i, layer) in manifest.layers.iter().enumerate() {
        progress(ProgressEvent {
            phase: Phase::Import,
            item: format!("blob {}/{}", i + 1, total),
            done: 0,
            total: layer.size,
        });
        source.fetch(store, layer, added)?;
    }
    complete(store, desc, as_ref, progress)
}

/// Unpacks the layers of the image `desc` (all of whose blobs are in the store) and names it.
pub(crate) fn complete(
    store: &ImageStore,
    desc: Descriptor,
    as_ref: &str,
    progress: &Progress,
) -> Result<Imported> {
    let image = store.image_from_descriptor(&desc)?;
    let existing: Vec<bool> = image
        .config
        .rootfs
        .diff_ids
        .iter()
        .map(|d| store.layer_dir(d).map(|p| p.is_dir()).unwrap_or(false))
        .collect();
    let res = store.layer_dirs(&image, progress).and_then(|dirs| {
        store.set_ref(as_ref, desc.clone())?;
        Ok(dirs)
    });
    match res {
        Ok(layer_dirs) => Ok(Imported {
            image,
            descriptor: desc,
            layer_dirs,
        }),
        Err(e) => {
            let new_layers: Vec<String> = image
                .config
                .rootfs
                .diff_ids
                .iter()
                .zip(existing)
                .filter(|(_, was)| !was)
                .map(|(d, _)| d.clone())
                .collect();
            store.rollback(&[], &new_layers);
            Err(e)
        }
    }
}

/// A spooled archive member: now a blob of the store.
#[derive(Debug, Clone)]
struct Member {
    digest: String,
    size: u64,
}

/// Streams every regular file of the archive into the store as a blob (hashing it on the way),
/// so nothing is copied twice; returns normalized member path → blob. Members that are not
/// blobs of the image (`manifest.json`...) are removed when the import ends.
fn spool(
    store: &ImageStore,
    archive: &Path,
    progress: &Progress,
    added: &mut Added,
) -> Result<BTreeMap<String, Member>> {
    let what = archive.display().to_string();
    let file = std::fs::File::open(archive).map_err(|e| ImageError::io("open", archive, e))?;
    let total = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut buffered = std::io::BufReader::with_capacity(256 * 1024, file);
    let head = std::io::BufRead::fill_buf(&mut buffered)
        .map_err(|e| ImageError::io("read", archive, e))?;
    let reader: Box<dyn Read> = match sniff(head) {
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(buffered)),
        Compression::Zstd => Box::new(
            zstd::Decoder::with_buffer(buffered).map_err(|e| ImageError::io("read", archive, e))?,
        ),
        Compression::None => Box::new(buffered),
    };
    let mut tar = tar::Archive::new(reader);
    let mut members = BTreeMap::new();
    let mut done = 0u64;
    let entries = tar
        .entries()
        .map_err(|e| ImageError::invalid(&what, format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry =
            entry.map_err(|e| ImageError::invalid(&what, format!("reading the tar: {e}")))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let Some(key) = normalize(&raw) else {
            return Err(ImageError::UnsafeEntry {
                layer: what.clone(),
                entry: raw,
                reason: "member path climbs out of the archive".into(),
            });
        };
        let mut w = store.blob_writer()?;
        let n = std::io::copy(&mut entry, &mut w).map_err(|e| {
            ImageError::invalid(
                &what,
                format!("reading member {raw:?}: {e} (truncated archive?)"),
            )
        })?;
        let info = w.finish(None)?;
        added.note(&info);
        done += n;
        progress(ProgressEvent {
            phase: Phase::Import,
            item: raw.clone(),
            done,
            total,
        });
        members.insert(
            key,
            Member {
                digest: info.digest,
                size: info.size,
            },
        );
    }
    Ok(members)
}

/// The members under `blobs/sha256/` of an OCI layout archive, each checked against its name.
fn layout_blobs(members: &BTreeMap<String, Member>) -> Result<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for (path, m) in members {
        if let Some(hex) = path.strip_prefix("blobs/sha256/") {
            if m.digest != format!("sha256:{hex}") {
                return Err(ImageError::DigestMismatch {
                    what: path.clone(),
                    expected: format!("sha256:{hex}"),
                    actual: m.digest.clone(),
                });
            }
            out.insert(hex.to_string(), m.size);
        }
    }
    Ok(out)
}

/// `./a//b` → `a/b`; `None` for paths with `..`.
fn normalize(path: &str) -> Option<String> {
    let mut parts = vec![];
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}
