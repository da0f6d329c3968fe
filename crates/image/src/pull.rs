//! Pulling an image from a registry (OCI distribution API, through `oci-client`).
//!
//! Plain http is used only for registries on a loopback address (a local test or mirror
//! registry); every other registry is spoken to over https. Each blob is hashed while it streams
//! to `tmp/` and renamed into the store only if its digest matches the manifest; the layers are
//! then unpacked, and the image is named last. A failure anywhere (bad credentials, a registry
//! that goes away mid-pull, a corrupt blob) removes what the pull added.

use crate::error::{ImageError, Result};
use crate::import::{complete, Added, Imported};
use crate::store::{
    digest_hex, pick_platform, sha256_digest, short, Descriptor, ImageStore, Index, Manifest,
    MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST,
};
use crate::{Phase, Progress, ProgressEvent};
use futures::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

/// Registry credentials (HTTP basic auth, or the token exchange a registry asks for with them).
/// Serializable: the operator hands them to a node agent in a request body.
#[derive(Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({:?}, <hidden>)", self.username)
    }
}

/// Parses an image reference (`registry/repo:tag`, `repo@sha256:...`; Docker Hub names get
/// `docker.io/library/`).
pub fn parse_reference(reference: &str) -> Result<Reference> {
    reference
        .parse::<Reference>()
        .map_err(|e| ImageError::BadReference {
            reference: reference.to_string(),
            reason: e.to_string(),
        })
}

/// Whether the registry host is this machine: the only case where plain http is allowed.
pub fn is_loopback_registry(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        registry
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(registry)
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

fn client_for(reference: &Reference) -> Client {
    let registry = reference.resolve_registry().to_string();
    let protocol = if is_loopback_registry(&registry) {
        ClientProtocol::HttpsExcept(vec![registry])
    } else {
        ClientProtocol::Https
    };
    Client::new(ClientConfig {
        protocol,
        connect_timeout: Some(Duration::from_secs(10)),
        read_timeout: Some(Duration::from_secs(60)),
        ..Default::default()
    })
}

/// The error message of `e` with its causes (reqwest hides "connection refused" two levels down,
/// hyper a TLS verification failure).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let s_msg = s.to_string();
        if !msg.contains(&s_msg) {
            msg.push_str(": ");
            msg.push_str(&s_msg);
        }
        src = s.source();
    }
    msg
}

pub(crate) fn registry_error(registry: &str, e: OciDistributionError) -> ImageError {
    match &e {
        OciDistributionError::AuthenticationFailure(_)
        | OciDistributionError::UnauthorizedError { .. } => ImageError::Unauthorized {
            registry: registry.to_string(),
            message: chain(&e),
        },
        OciDistributionError::ServerError { code: 401, .. } => ImageError::Unauthorized {
            registry: registry.to_string(),
            message: chain(&e),
        },
        OciDistributionError::ImageManifestNotFoundError(_) => ImageError::NotFound(chain(&e)),
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|x| {
                matches!(
                    x.code,
                    oci_client::errors::OciErrorCode::Unauthorized
                        | oci_client::errors::OciErrorCode::Denied
                )
            }) =>
        {
            ImageError::Unauthorized {
                registry: registry.to_string(),
                message: chain(&e),
            }
        }
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|x| {
                matches!(
                    x.code,
                    oci_client::errors::OciErrorCode::ManifestUnknown
                        | oci_client::errors::OciErrorCode::NameUnknown
                        | oci_client::errors::OciErrorCode::NotFound
                )
            }) =>
        {
            ImageError::NotFound(chain(&e))
        }
        _ => ImageError::Registry {
            registry: registry.to_string(),
            message: chain(&e),
        },
    }
}

const ACCEPTED: &[&str] = &[
    MEDIA_OCI_MANIFEST,
    MEDIA_OCI_INDEX,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_DOCKER_LIST,
];

/// The digest of `reference`'s manifest (or index) in its registry, as the registry serves it to
/// these credentials: checks access, and tells whether an earlier pull is still current.
pub async fn resolve_digest(reference: &str, credentials: Option<&Credentials>) -> Result<String> {
    let image_ref = parse_reference(reference)?;
    let registry = image_ref.resolve_registry().to_string();
    let auth = match credentials {
        Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
        None => RegistryAuth::Anonymous,
    };
    let (bytes, _) = client_for(&image_ref)
        .pull_manifest_raw(&image_ref, &auth, ACCEPTED)
        .await
        .map_err(|e| registry_error(&registry, e))?;
    Ok(sha256_digest(&bytes))
}

/// Pulls `reference` into the store and names it `as_ref`.
pub async fn pull(
    store: &ImageStore,
    reference: &str,
    credentials: Option<&Credentials>,
    as_ref: &str,
    progress: Arc<Progress>,
) -> Result<Imported> {
    let image_ref = parse_reference(reference)?;
    let _op = store.begin_operation();
    let mut added = Added::default();
    let res = pull_inner(store, &image_ref, credentials, as_ref, progress, &mut added).await;
    store.rollback(&added.blobs, &[]);
    res
}

async fn pull_inner(
    store: &ImageStore,
    image_ref: &Reference,
    credentials: Option<&Credentials>,
    as_ref: &str,
    progress: Arc<Progress>,
    added: &mut Added,
) -> Result<Imported> {
    let registry = image_ref.resolve_registry().to_string();
    let client = client_for(image_ref);
    let auth = match credentials {
        Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
        None => RegistryAuth::Anonymous,
    };
    let err = |e| registry_error(&registry, e);
    progress(ProgressEvent {
        phase: Phase::Pull,
        item: format!("manifest {image_ref}"),
        done: 0,
        total: 0,
    });
    let (bytes, _) = client
        .pull_manifest_raw(image_ref, &auth, ACCEPTED)
        .await
        .map_err(err)?;
    let digest = sha256_digest(&bytes);
    if let Some(pinned) = image_ref.digest() {
        if pinned != digest {
            return Err(ImageError::DigestMismatch {
                what: format!("manifest of {image_ref}"),
                expected: pinned.to_string(),
                actual: digest,
            });
        }
    }
    let info = store.add_blob_bytes(&bytes, Some(&digest))?;
    added.note(&info);
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| ImageError::invalid(format!("manifest of {image_ref}"), e.to_string()))?;
    let media = value
        .get("mediaType")
        .and_then(|m| m.as_str())
        .unwrap_or(MEDIA_OCI_MANIFEST)
        .to_string();
    let top = Descriptor::new(&media, digest.clone(), bytes.len() as u64);
    let manifest_bytes = if value.get("manifests").is_some() {
        let index: Index = serde_json::from_value(value)
            .map_err(|e| ImageError::invalid(format!("index of {image_ref}"), e.to_string()))?;
        let child = pick_platform(&index.manifests)
            .ok_or_else(|| {
                ImageError::invalid(
                    format!("index of {image_ref}"),
                    "no image for this platform",
                )
            })?
            .clone();
        let child_ref = Reference::with_digest(
            image_ref.registry().to_string(),
            image_ref.repository().to_string(),
            child.digest.clone(),
        );
        let (bytes, _) = client
            .pull_manifest_raw(&child_ref, &auth, ACCEPTED)
            .await
            .map_err(err)?;
        let info = store.add_blob_bytes(&bytes, Some(&child.digest))?;
        added.note(&info);
        bytes.to_vec()
    } else {
        bytes.to_vec()
    };
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| ImageError::invalid(format!("manifest of {image_ref}"), e.to_string()))?;
    let total = manifest.layers.len();
    let blobs = std::iter::once((
        format!("config {}", short(&manifest.config.digest)),
        &manifest.config,
    ))
    .chain(
        manifest
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| (format!("layer {}/{} {}", i + 1, total, short(&l.digest)), l)),
    );
    for (item, desc) in blobs {
        digest_hex(&desc.digest)?;
        if store.has_blob(&desc.digest) {
            continue;
        }
        let info = pull_blob(store, &client, image_ref, desc, &item, &registry, &progress).await?;
        added.note(&info);
    }
    let store2 = store.clone();
    let as_ref = as_ref.to_string();
    tokio::task::spawn_blocking(move || complete(&store2, top, &as_ref, &*progress))
        .await
        .map_err(|e| ImageError::invalid("unpack task", e.to_string()))?
}

async fn pull_blob(
    store: &ImageStore,
    client: &Client,
    image_ref: &Reference,
    desc: &Descriptor,
    item: &str,
    registry: &str,
    progress: &Arc<Progress>,
) -> Result<crate::store::BlobInfo> {
    let mut stream = client
        .pull_blob_stream(image_ref, desc.digest.as_str())
        .await
        .map_err(|e| registry_error(registry, e))?;
    let mut w = store.blob_writer()?;
    let mut last = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ImageError::Registry {
            registry: registry.to_string(),
            message: format!("downloading {}: {}", desc.digest, chain(&e)),
        })?;
        w.write_all(&chunk)
            .map_err(|e| ImageError::io("write", store.tmp_dir(), e))?;
        if w.size() > desc.size {
            break;
        }
        if w.size() - last >= 1 << 20 {
            last = w.size();
            progress(ProgressEvent {
                phase: Phase::Pull,
                item: item.to_string(),
                done: last,
                total: desc.size,
            });
        }
    }
    if w.size() != desc.size {
        return Err(ImageError::SizeMismatch {
            what: format!("blob {} from {registry}", desc.digest),
            expected: desc.size,
            actual: w.size(),
        });
    }
    progress(ProgressEvent {
        phase: Phase::Pull,
        item: item.to_string(),
        done: desc.size,
        total: desc.size,
    });
    let expected = desc.digest.clone();
    tokio::task::spawn_blocking(move || w.finish(Some(&expected)))
        .await
        .map_err(|e| ImageError::invalid("blob task", e.to_string()))?
}
