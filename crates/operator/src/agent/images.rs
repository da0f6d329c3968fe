//! Images on a node: a Sandbox with `image: <ref>` runs on the image's layers, pulled into the
//! node's image store (`<data>/images`, the one commits go to) with the same `warren-image` code
//! as single-host `warren template create --image`, and stacked the same way (Warren's `/etc`
//! layer on top, the image's config as the sandbox's env, user, cwd and start command).
//!
//! The store names a pulled image by its reference, so the next create of that reference on the
//! node uses it without asking the registry (as kubelet's `IfNotPresent`; an image committed on
//! the node under that name is used as it is), and layers are stored and unpacked once per
//! digest, whatever the tags that share them. Creates of one reference pull once: they queue on
//! a per-reference lock and find the image in the store after the first.
//!
//! A private image (pulled with a Sandbox's `imagePullSecrets`) is marked as such on the node,
//! and a later create of that reference is served from the store only once the registry has
//! answered its manifest to *that* create's credentials: a Sandbox that could not pull the image
//! itself never runs it because another tenant's Sandbox brought it to the node (what kubelet
//! only does with the `AlwaysPullImages` admission plugin).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use warren_image::{ImageError, ImageStore};
use warren_runtime::{BindMount, RootfsSpec};

use crate::crd::ImagePullPolicy;
use crate::registry_auth::RegistryCredentials;

/// What a sandbox of an image gets: its root and the image's config.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeImage {
    /// Manifest digest, `sha256:…`.
    pub digest: String,
    pub rootfs: RootfsSpec,
    /// The image's `Env` (a create's own env vars win over it).
    pub env: BTreeMap<String, String>,
    /// The user envd defaults to (the image's `User`, by name; root without one).
    pub user: String,
    pub workdir: Option<String>,
    /// `Entrypoint` + `Cmd`, which envd starts once it serves.
    pub start_command: Option<String>,
}

/// Why an image could not be had; the message names the reference and the cause.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("pulling image {reference}: {}", describe(.source))]
    Pull {
        reference: String,
        #[source]
        source: ImageError,
    },
    #[error("image {reference} is not on this node, and its imagePullPolicy is Never")]
    NotPresent { reference: String },
}

fn describe(e: &ImageError) -> String {
    match e {
        // The store's wording ("not found in the store") would mislead: it is the registry's.
        ImageError::NotFound(m) => format!("the registry has no such image ({m})"),
        other => other.to_string(),
    }
}

/// The node's images (see the module docs).
pub struct NodeImages {
    store: ImageStore,
    /// Warren's `/etc` layer, on top of every image's layers.
    etc_layer: PathBuf,
    /// One lock per reference being resolved: concurrent creates of an image pull once.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// One file per reference pulled with credentials (named by the reference's sha256).
    private_marks: PathBuf,
    pulls: AtomicU64,
}

impl NodeImages {
    pub fn new(store: ImageStore, data_dir: &std::path::Path) -> std::io::Result<NodeImages> {
        // oci-client is built without a rustls crypto provider; the agent speaks https to
        // registries with ring, as the rest of Warren. Losing the race to another installer is
        // fine.
        #[allow(deprecated)]
        let _ = rustls::crypto::ring::default_provider().install_default();
        Ok(NodeImages {
            store,
            etc_layer: warren_core::image_templates::prepare_etc_layer(data_dir)?,
            locks: Mutex::new(HashMap::new()),
            private_marks: data_dir.join("private-images"),
            pulls: AtomicU64::new(0),
        })
    }

    /// How many pulls from a registry this agent started, failed ones included (each one a
    /// reference that was not in the store).
    pub fn pulls(&self) -> u64 {
        self.pulls.load(Ordering::SeqCst)
    }

    /// The image `reference` by `policy`: from the store, else pulled into it with
    /// `credentials` (none: anonymously). A private image in the store is only served once the
    /// registry grants `credentials` its manifest (see the module docs).
    pub async fn get(
        &self,
        reference: &str,
        credentials: Option<&RegistryCredentials>,
        policy: ImagePullPolicy,
    ) -> Result<NodeImage, PullError> {
        let fail = |source: ImageError| PullError::Pull {
            reference: reference.to_string(),
            source,
        };
        warren_image::pull::parse_reference(reference).map_err(fail)?;
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reference.to_string())
            .or_default()
            .clone();
        let _held = lock.lock().await;
        let stored = match self.store.resolve(reference) {
            Ok(image) => Some(image),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(fail(e)),
        };
        let stored = match (stored, policy) {
            (None, ImagePullPolicy::Never) => {
                return Err(PullError::NotPresent {
                    reference: reference.to_string(),
                })
            }
            (None, _) => None,
            // The registry's digest now, asked with these credentials (which checks their
            // access too): the stored image serves only while it is that one.
            (Some(image), ImagePullPolicy::Always) => {
                let current = warren_image::pull::resolve_digest(reference, credentials)
                    .await
                    .map_err(fail)?;
                (self.stored_digest(reference).as_deref() == Some(current.as_str()))
                    .then_some(image)
            }
            (Some(image), _) => {
                if self.is_private(reference) {
                    self.check_access(reference, credentials).await?;
                }
                Some(image)
            }
        };
        let (image, layers) = match stored {
            Some(image) => {
                // An image of the store (an earlier pull, a commit on this node): unpack what
                // is not unpacked yet, no registry.
                let (store, img) = (self.store.clone(), image.clone());
                let dirs = tokio::task::spawn_blocking(move || {
                    store.layer_dirs(&img, &*warren_image::no_progress())
                })
                .await
                .expect("unpack task does not panic")
                .map_err(fail)?;
                (image, dirs)
            }
            None => {
                self.pulls.fetch_add(1, Ordering::SeqCst);
                tracing::info!(image = %reference, "pulling image into the node's store");
                // Marked before the pull, so that a crash during it leaves a private image
                // marked; a pull that fails takes back a mark it made.
                let new_mark = credentials.is_some() && !self.is_private(reference);
                if new_mark {
                    self.mark_private(reference).map_err(|e| {
                        fail(ImageError::Io {
                            op: "mark as private",
                            path: self.private_marks.clone(),
                            source: e,
                        })
                    })?;
                }
                // Layers already stored (an earlier digest of the tag) are not downloaded again.
                let imported = warren_image::pull::pull(
                    &self.store,
                    reference,
                    credentials,
                    reference,
                    warren_image::no_progress(),
                )
                .await
                .map_err(|e| {
                    if new_mark {
                        let _ = std::fs::remove_file(self.private_mark(reference));
                    }
                    fail(e)
                })?;
                (imported.image, imported.layer_dirs)
            }
        };
        let (env, workdir, user, start_command) =
            warren_core::image_templates::from_run_config(image.config.config.as_ref());
        let user = warren_core::image_templates::default_user(user.as_deref(), &layers);
        let ro_binds = warren_image::commit::host_binds(&image.config_raw)
            .into_iter()
            .map(|(source, target)| BindMount { source, target })
            .collect();
        Ok(NodeImage {
            digest: image.manifest_digest.clone(),
            rootfs: RootfsSpec {
                lower_dirs: std::iter::once(self.etc_layer.clone())
                    .chain(layers)
                    .collect(),
                ro_binds,
            },
            env,
            user,
            workdir,
            start_command,
        })
    }

    /// Whether the registry answers `reference`'s manifest to `credentials`: the condition to
    /// serve a private image from the store.
    async fn check_access(
        &self,
        reference: &str,
        credentials: Option<&RegistryCredentials>,
    ) -> Result<(), PullError> {
        warren_image::pull::resolve_digest(reference, credentials)
            .await
            .map(|_| ())
            .map_err(|e| PullError::Pull {
                reference: reference.to_string(),
                source: ImageError::Registry {
                    registry: crate::registry_auth::registry_of(reference).unwrap_or_default(),
                    message: format!(
                        "the node holds this private image from another pull, and serves it \
                         only to a Sandbox whose imagePullSecrets the registry lets read it; \
                         asking the registry failed: {e}"
                    ),
                },
            })
    }

    /// The digest of what the store names `reference` (a manifest or an index, as pulled).
    fn stored_digest(&self, reference: &str) -> Option<String> {
        self.store
            .refs()
            .ok()?
            .into_iter()
            .find(|(r, _)| r == reference)
            .map(|(_, d)| d.digest)
    }

    fn private_mark(&self, reference: &str) -> PathBuf {
        use sha2::Digest as _;
        self.private_marks
            .join(format!("{:x}", sha2::Sha256::digest(reference.as_bytes())))
    }

    /// Whether `reference` was ever pulled onto this node with credentials.
    pub fn is_private(&self, reference: &str) -> bool {
        self.private_mark(reference).exists()
    }

    fn mark_private(&self, reference: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.private_marks)?;
        std::fs::write(self.private_mark(reference), reference)
    }
}
