//! TLS between the node agents and their callers (the operator, the API's metrics reads). A
//! create carries envd tokens and pull credentials and a commit push credentials, so on a cluster
//! network they travel encrypted, to an agent that proves itself with a certificate of the
//! cluster's own CA.
//!
//! One certificate serves every node: callers reach agents at node IPs but verify the name
//! [`AGENT_TLS_NAME`], which the certificate must carry as a DNS subject alternative name (so a
//! node's IP need not be known when it is issued). With a CA configured, a caller speaks only
//! https: nothing falls back to plain HTTP.

use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::Path;
use std::sync::Arc;

/// The name callers verify in the agents' certificate.
pub const AGENT_TLS_NAME: &str = "warren-node-agent";

/// Why TLS could not be set up; names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what} {path}: {reason}")]
    Pem {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("{0}")]
    Config(String),
}

fn pem_error(what: &'static str, path: &Path) -> impl Fn(String) -> TlsError {
    let path = path.display().to_string();
    move |reason| TlsError::Pem {
        what,
        path: path.clone(),
        reason,
    }
}

fn install_ring() {
    // The process-wide provider: ring, as the rest of Warren; losing the race to another
    // installer is fine.
    #[allow(deprecated)]
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let fail = pem_error(what, path);
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| fail(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(e.to_string()))?;
    if certs.is_empty() {
        return Err(fail("no PEM certificate in it".into()));
    }
    Ok(certs)
}

/// The agent's server config from its certificate chain and key (PEM files, a mounted
/// `kubernetes.io/tls` Secret's `tls.crt` and `tls.key`).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    install_ring();
    let chain = certificates("the node agent's certificate", cert)?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| pem_error("the node agent's key", key)(e.to_string()))?;
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(format!("the node agent's certificate and key: {e}")))?;
    Ok(Arc::new(config))
}

/// A connector that speaks only https, trusts only the CA in `ca` (PEM) and verifies
/// [`AGENT_TLS_NAME`] whatever the address.
pub fn client_connector(ca: &Path) -> Result<HttpsConnector<HttpConnector>, TlsError> {
    install_ring();
    let mut roots = rustls::RootCertStore::empty();
    for c in certificates("the node agents' CA", ca)? {
        roots
            .add(c)
            .map_err(|e| pem_error("the node agents' CA", ca)(e.to_string()))?;
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(AGENT_TLS_NAME).expect("a valid DNS name");
    Ok(HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .with_server_name_resolver(FixedServerNameResolver::new(name))
        .enable_http1()
        .build())
}

/// A connector for plain-HTTP agents (no CA configured): http only.
pub fn plain_connector() -> HttpsConnector<HttpConnector> {
    install_ring();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_http1()
        .build()
}
