//! The local OCI image layout (`<data-dir>/images/oci`): `oci-layout`, `index.json` and
//! `blobs/sha256/<hex>`, with image names as `org.opencontainers.image.ref.name` annotations of
//! index.json's manifests. This is the layout `skopeo`, `umoci` and `oci:` transports read.
//!
//! Every write is atomic: blobs are written to a temp file in `<data-dir>/images/tmp` (same file
//! system), synced and renamed to their digest; index.json is rewritten through a temp file and a
//! rename. A crash leaves at worst an orphan temp file, never a half blob or a half index.
//!
//! Manifests and configs are handled as JSON values rather than typed structs so that every field
//! of a base image's config (including ones this crate does not know) survives a commit unchanged.

use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const REF_ANNOTATION: &str = "org.opencontainers.image.ref.name";

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid digest '{0}': expected sha256:<64 hex digits>")]
    BadDigest(String),
    #[error("blob {0} is not in the local image store")]
    MissingBlob(String),
    #[error("blob {digest}: {reason}")]
    Corrupt { digest: String, reason: String },
    #[error("image '{0}' is not in the local image store")]
    UnknownRef(String),
}

pub(crate) fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> LayoutError + 'a {
    move |source| LayoutError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// A descriptor as written in manifests and index.json.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

impl Blob {
    pub fn descriptor(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
    }
}

/// An image of the layout: its manifest's descriptor, the manifest and the config.
#[derive(Debug, Clone)]
pub struct ImageRef {
    pub manifest_blob: Blob,
    pub manifest: Value,
    pub config: Value,
}

impl ImageRef {
    /// (blob digest, media type, size) of each layer, lowest first.
    pub fn layers(&self) -> Vec<Blob> {
        self.manifest["layers"]
            .as_array()
            .map(|ls| {
                ls.iter()
                    .map(|l| Blob {
                        media_type: l["mediaType"].as_str().unwrap_or_default().to_string(),
                        digest: l["digest"].as_str().unwrap_or_default().to_string(),
                        size: l["size"].as_u64().unwrap_or_default(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The config's `rootfs.diff_ids`, lowest first.
    pub fn diff_ids(&self) -> Vec<String> {
        self.config["rootfs"]["diff_ids"]
            .as_array()
            .map(|d| {
                d.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }
}

pub struct OciLayout {
    root: PathBuf,
    tmp: PathBuf,
    /// Serialises read-modify-write cycles of index.json within this process.
    index_lock: Mutex<()>,
}

/// `sha256:<hex>` → `<hex>`, refusing anything that is not a sha256 digest (the hex becomes a
/// file name).
pub fn digest_hex(digest: &str) -> Result<&str, LayoutError> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| LayoutError::BadDigest(digest.into()))?;
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(LayoutError::BadDigest(digest.into()));
    }
    Ok(hex)
}

pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

impl OciLayout {
    /// Opens (creating if needed) the layout at `root`, with temp files in `tmp` (which must be on
    /// the same file system).
    pub fn open(root: &Path, tmp: &Path) -> Result<OciLayout, LayoutError> {
        let blobs = root.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).map_err(io_err("mkdir", &blobs))?;
        std::fs::create_dir_all(tmp).map_err(io_err("mkdir", tmp))?;
        let layout = OciLayout {
            root: root.to_path_buf(),
            tmp: tmp.to_path_buf(),
            index_lock: Mutex::new(()),
        };
        let marker = root.join("oci-layout");
        if !marker.exists() {
            layout.write_atomic(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        let index = root.join("index.json");
        if !index.exists() {
            let empty = json!({"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": []});
            layout.write_atomic(&index, empty.to_string().as_bytes())?;
        }
        Ok(layout)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, LayoutError> {
        Ok(self.root.join("blobs/sha256").join(digest_hex(digest)?))
    }

    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).map(|p| p.exists()).unwrap_or(false)
    }

    /// A new temp file path in the layout's temp dir.
    pub fn temp_path(&self, what: &str) -> PathBuf {
        let n: u64 = rand_u64();
        self.tmp
            .join(format!("{what}.{}.{n:016x}", std::process::id()))
    }

    fn write_atomic(&self, dst: &Path, bytes: &[u8]) -> Result<(), LayoutError> {
        let tmp = self.temp_path("write");
        let res = (|| {
            let mut f = std::fs::File::create(&tmp).map_err(io_err("create", &tmp))?;
            f.write_all(bytes).map_err(io_err("write", &tmp))?;
            f.sync_all().map_err(io_err("sync", &tmp))?;
            std::fs::rename(&tmp, dst).map_err(io_err("rename", &tmp))
        })();
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res
    }

    /// Moves the finished temp file `tmp` (whose sha256 the caller computed while writing it)
    /// into the store as blob `digest`.
    pub fn put_blob_file(&self, tmp: &Path, digest: &str) -> Result<PathBuf, LayoutError> {
        let dst = self.blob_path(digest)?;
        let f = std::fs::File::open(tmp).map_err(io_err("open", tmp))?;
        f.sync_all().map_err(io_err("sync", tmp))?;
        std::fs::rename(tmp, &dst).map_err(io_err("rename", tmp))?;
        Ok(dst)
    }

    pub fn put_blob_bytes(&self, bytes: &[u8], media_type: &str) -> Result<Blob, LayoutError> {
        let digest = sha256_digest(bytes);
        let dst = self.blob_path(&digest)?;
        if !dst.exists() {
            self.write_atomic(&dst, bytes)?;
        }
        Ok(Blob {
            media_type: media_type.to_string(),
            digest,
            size: bytes.len() as u64,
        })
    }

    /// Reads a blob and checks its digest.
    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>, LayoutError> {
        let path = self.blob_path(digest)?;
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(LayoutError::MissingBlob(digest.into()))
            }
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        if sha256_digest(&bytes) != digest {
            return Err(LayoutError::Corrupt {
                digest: digest.into(),
                reason: "content does not match its digest".into(),
            });
        }
        Ok(bytes)
    }

    fn read_json(&self, digest: &str) -> Result<Value, LayoutError> {
        let bytes = self.read_blob(digest)?;
        serde_json::from_slice(&bytes).map_err(|e| LayoutError::Corrupt {
            digest: digest.into(),
            reason: format!("not JSON: {e}"),
        })
    }

    fn index(&self) -> Result<Value, LayoutError> {
        let path = self.root.join("index.json");
        let bytes = std::fs::read(&path).map_err(io_err("read", &path))?;
        serde_json::from_slice(&bytes).map_err(|e| LayoutError::Corrupt {
            digest: "index.json".into(),
            reason: format!("not JSON: {e}"),
        })
    }

    /// Names the manifest `manifest` as `name` (replacing what the name named before).
    pub fn set_ref(&self, name: &str, manifest: &Blob) -> Result<(), LayoutError> {
        let _guard = self.index_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut index = self.index()?;
        let list = index["manifests"]
            .as_array_mut()
            .ok_or_else(|| LayoutError::Corrupt {
                digest: "index.json".into(),
                reason: "no manifests array".into(),
            })?;
        list.retain(|m| m["annotations"][REF_ANNOTATION].as_str() != Some(name));
        let mut desc = manifest.descriptor();
        desc["annotations"] = json!({ REF_ANNOTATION: name });
        list.push(desc);
        self.write_atomic(
            &self.root.join("index.json"),
            serde_json::to_vec_pretty(&index)
                .unwrap_or_default()
                .as_slice(),
        )
    }

    /// Forgets a name. Returns whether it existed.
    pub fn remove_ref(&self, name: &str) -> Result<bool, LayoutError> {
        let _guard = self.index_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut index = self.index()?;
        let Some(list) = index["manifests"].as_array_mut() else {
            return Ok(false);
        };
        let before = list.len();
        list.retain(|m| m["annotations"][REF_ANNOTATION].as_str() != Some(name));
        if list.len() == before {
            return Ok(false);
        }
        self.write_atomic(
            &self.root.join("index.json"),
            serde_json::to_vec_pretty(&index)
                .unwrap_or_default()
                .as_slice(),
        )?;
        Ok(true)
    }

    /// The image named `name`.
    pub fn resolve(&self, name: &str) -> Result<ImageRef, LayoutError> {
        let index = self.index()?;
        let desc = index["manifests"]
            .as_array()
            .and_then(|l| {
                l.iter()
                    .find(|m| m["annotations"][REF_ANNOTATION].as_str() == Some(name))
            })
            .ok_or_else(|| LayoutError::UnknownRef(name.into()))?;
        let digest = desc["digest"].as_str().unwrap_or_default().to_string();
        self.image_by_digest(&digest)
    }

    pub fn image_by_digest(&self, digest: &str) -> Result<ImageRef, LayoutError> {
        let manifest = self.read_json(digest)?;
        let config_digest = manifest["config"]["digest"]
            .as_str()
            .ok_or_else(|| LayoutError::Corrupt {
                digest: digest.into(),
                reason: "manifest has no config digest".into(),
            })?
            .to_string();
        let config = self.read_json(&config_digest)?;
        let size = std::fs::metadata(self.blob_path(digest)?)
            .map(|m| m.len())
            .unwrap_or_default();
        Ok(ImageRef {
            manifest_blob: Blob {
                media_type: MEDIA_MANIFEST.into(),
                digest: digest.into(),
                size,
            },
            manifest,
            config,
        })
    }

    /// Every (name, manifest digest) of index.json.
    pub fn refs(&self) -> Result<Vec<(String, String)>, LayoutError> {
        let index = self.index()?;
        Ok(index["manifests"]
            .as_array()
            .map(|l| {
                l.iter()
                    .filter_map(|m| {
                        Some((
                            m["annotations"][REF_ANNOTATION].as_str()?.to_string(),
                            m["digest"].as_str()?.to_string(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Removes every blob that no manifest of index.json (nor `keep`) reaches. Returns the removed
    /// digests. Blobs of images being written concurrently must be in `keep`.
    pub fn gc(&self, keep: &HashSet<String>) -> Result<Vec<String>, LayoutError> {
        let _guard = self.index_lock.lock().unwrap_or_else(|e| e.into_inner());
        let index = self.index()?;
        let mut live: HashSet<String> = keep.clone();
        for m in index["manifests"].as_array().into_iter().flatten() {
            let Some(d) = m["digest"].as_str() else {
                continue;
            };
            live.insert(d.to_string());
            // A manifest we cannot read keeps only itself alive: GC never guesses.
            if let Ok(img) = self.image_by_digest(d) {
                live.insert(
                    img.manifest["config"]["digest"]
                        .as_str()
                        .unwrap_or_default()
                        .into(),
                );
                for l in img.layers() {
                    live.insert(l.digest);
                }
            }
        }
        let dir = self.root.join("blobs/sha256");
        let mut removed = Vec::new();
        for e in std::fs::read_dir(&dir)
            .map_err(io_err("read dir", &dir))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let digest = format!("sha256:{name}");
            if !live.contains(&digest) {
                let p = e.path();
                std::fs::remove_file(&p).map_err(io_err("remove", &p))?;
                removed.push(digest);
            }
        }
        Ok(removed)
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded per instance from the OS: enough for unique temp names.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
}
