//! Push an image of the local store to a registry with `oci-client`: every layer and the config
//! as blobs (skipped when the registry has them), streamed from the blob files, then the manifest
//! with its exact bytes (so its digest is the local one).
//!
//! Registries on loopback (`localhost`, `127.*`, `[::1]`) are spoken to over plain http, every
//! other over https (rustls; the binary installs the ring provider).

use crate::error::ImageError;
use crate::store::{ImageStore, MEDIA_OCI_MANIFEST};
use futures::stream::Stream;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use std::path::PathBuf;
use tokio::io::AsyncReadExt;

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("invalid image reference '{0}': {1}")]
    BadReference(String, String),
    #[error(transparent)]
    Store(#[from] ImageError),
    #[error("registry {registry} refused the credentials: {detail}")]
    Unauthorized { registry: String, detail: String },
    #[error("registry {registry} is unreachable: {detail}")]
    Unreachable { registry: String, detail: String },
    #[error("push to {registry} failed: {detail}")]
    Registry { registry: String, detail: String },
}

/// Whether a registry host (with optional port) is on loopback, where plain http is fine.
pub fn is_loopback(registry: &str) -> bool {
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

fn classify(registry: &str, e: oci_client::errors::OciDistributionError) -> PushError {
    use oci_client::errors::OciDistributionError as E;
    let detail = e.to_string();
    let registry = registry.to_string();
    match &e {
        E::AuthenticationFailure(_) | E::UnauthorizedError { .. } => {
            PushError::Unauthorized { registry, detail }
        }
        E::ServerError {
            code: 401 | 403, ..
        } => PushError::Unauthorized { registry, detail },
        E::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|x| {
                format!("{:?}", x.code).contains("Unauthorized")
                    || format!("{:?}", x.code).contains("Denied")
            }) =>
        {
            PushError::Unauthorized { registry, detail }
        }
        E::RequestError(r) if matches!(r.status().map(|s| s.as_u16()), Some(401 | 403)) => {
            PushError::Unauthorized { registry, detail }
        }
        E::RequestError(r) if r.is_connect() || r.is_timeout() => {
            let mut detail = detail;
            let mut src: Option<&dyn std::error::Error> = std::error::Error::source(r);
            while let Some(s) = src {
                detail = format!("{detail}: {s}");
                src = s.source();
            }
            PushError::Unreachable { registry, detail }
        }
        _ => PushError::Registry { registry, detail },
    }
}

fn file_stream(path: PathBuf) -> impl Stream<Item = oci_client::errors::Result<bytes::Bytes>> {
    futures::stream::unfold(None, move |file: Option<tokio::fs::File>| {
        let path = path.clone();
        async move {
            let mut file = match file {
                Some(f) => f,
                None => match tokio::fs::File::open(&path).await {
                    Ok(f) => f,
                    Err(e) => return Some((Err(e.into()), None)),
                },
            };
            let mut buf = vec![0u8; 4 << 20];
            let mut n = 0;
            // Fill the chunk: the registry gets one PATCH per item.
            while n < buf.len() {
                match file.read(&mut buf[n..]).await {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) => return Some((Err(e.into()), None)),
                }
            }
            if n == 0 {
                return None;
            }
            buf.truncate(n);
            Some((Ok(bytes::Bytes::from(buf)), Some(file)))
        }
    })
}

/// oci-client is built without a rustls crypto provider (to avoid building aws-lc next to
/// ring): install ring for the process, once. Losing the race to another installer is fine.
/// rustls 0.23.48 deprecates ring's provider for its lack of post-quantum key exchange; the
/// project's stack standardises on ring (rust-stack.md), and pushes do not need PQ.
#[allow(deprecated)]
fn ensure_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Pushes image `name` of `layout` to the registry its name points at.
pub async fn push_image(
    store: &ImageStore,
    name: &str,
    credentials: Option<(String, String)>,
) -> Result<(), PushError> {
    ensure_crypto_provider();
    let reference: Reference = name
        .parse()
        .map_err(|e: oci_client::ParseError| PushError::BadReference(name.into(), e.to_string()))?;
    let image = store.resolve(name)?;
    let registry = reference.resolve_registry().to_string();
    let protocol = if is_loopback(&registry) {
        ClientProtocol::Http
    } else {
        ClientProtocol::Https
    };
    let client = Client::new(ClientConfig {
        protocol,
        ..Default::default()
    });
    let auth = match credentials {
        Some((u, p)) => RegistryAuth::Basic(u, p),
        None => RegistryAuth::Anonymous,
    };
    client
        .auth(&reference, &auth, RegistryOperation::Push)
        .await
        .map_err(|e| classify(&registry, e))?;
    let blobs: Vec<(String, u64)> = image
        .manifest
        .layers
        .iter()
        .chain(std::iter::once(&image.manifest.config))
        .map(|l| (l.digest.clone(), l.size))
        .collect();
    for (digest, size) in blobs {
        if client
            .blob_exists(&reference, &digest)
            .await
            .map_err(|e| classify(&registry, e))?
        {
            continue;
        }
        let path = store.blob_path(&digest)?;
        client
            .push_blob_stream(&reference, file_stream(path), &digest, Some(size))
            .await
            .map_err(|e| classify(&registry, e))?;
    }
    let bytes = store.read_blob(&image.manifest_digest)?;
    client
        .push_manifest_raw(
            &reference,
            bytes,
            http::HeaderValue::from_str(&image.manifest_media_type)
                .unwrap_or(http::HeaderValue::from_static(MEDIA_OCI_MANIFEST)),
        )
        .await
        .map_err(|e| classify(&registry, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries() {
        for yes in [
            "localhost:5000",
            "127.0.0.1:5000",
            "127.1.2.3",
            "[::1]:5000",
            "localhost",
        ] {
            assert!(is_loopback(yes), "{yes}");
        }
        for no in [
            "registry.example:5000",
            "10.0.0.1:5000",
            "docker.io",
            "ghcr.io",
        ] {
            assert!(!is_loopback(no), "{no}");
        }
    }
}
