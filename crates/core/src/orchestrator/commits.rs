//! Commits: a sandbox's filesystem changes become an OCI image in the local store (and, if asked,
//! in a registry), usable at once as a template named by the image.
//!
//! A commit runs in the background; `POST` returns the object in phase `Pending` and clients poll
//! it. The sandbox's operation lock is held while its upper dir is copied to staging files: first
//! a full pre-copy with the sandbox running, then, frozen (not at all if it is paused already), a
//! rescan that copies only what changed since. Assembling the layer tar, compressing, hashing,
//! writing the image, unpacking the layer and pushing run afterwards, with the sandbox running. The freeze is not a state change of the sandbox (it stays `running` and
//! routed): requests arriving during the copy wait for it instead of failing.
//!
//! TTL: the background tick deletes expired commits, drops their image names (unless a later
//! commit took the name) and templates, then collects blobs and layer dirs that nothing else
//! references (no other image, no live sandbox, no registered template).

use super::Warren;
use crate::auth::Principal;
use crate::commit::{Commit, CommitPhase, RegistrySecret};
use crate::error::CoreError;
use crate::state::SandboxState;
use chrono::Utc;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use warren_image::commit::{Base, ImageStore};
use warren_runtime::{BindMount, RootfsSpec};

/// The orchestrator's commit machinery.
#[derive(Default)]
pub struct CommitState {
    images: OnceLock<Arc<ImageStore>>,
    /// Commits between their first blob write and their image name: GC must wait for them.
    in_flight: AtomicUsize,
    pusher: OnceLock<Arc<dyn Pusher>>,
}

/// Pushes an image of the local store to its registry (implemented over oci-client by the edge
/// that owns the HTTP stack; the orchestrator only decides when).
#[async_trait::async_trait]
pub trait Pusher: Send + Sync + 'static {
    async fn push(
        &self,
        store: Arc<ImageStore>,
        image: &str,
        auth: Option<(String, String)>,
    ) -> Result<(), String>;
}

struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn image_err(e: impl std::fmt::Display) -> CoreError {
    CoreError::InvalidArgument(e.to_string())
}

impl Warren {
    /// Gives the orchestrator its image store (`<data-dir>/images`) and registers every image
    /// committed before as a template again.
    pub async fn set_image_store(&self, store: Arc<ImageStore>) -> Result<(), CoreError> {
        let _ = self.commits.images.set(store.clone());
        for c in self.store.list_commits().await? {
            if c.status.phase != CommitPhase::Succeeded {
                continue;
            }
            match self.register_image_template(&store, &c.spec.image) {
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(commit = %c.metadata.name, error = %e, "committed image is not usable as a template")
                }
            }
        }
        // Commits a crash interrupted cannot resume: their staging files are gone with the
        // process that wrote them.
        for mut c in self.store.list_commits().await? {
            if !c.status.phase.done() {
                c.status.phase = CommitPhase::Failed;
                c.status.message = Some("the daemon restarted during the commit".into());
                self.store.update_commit(&c).await?;
            }
        }
        Ok(())
    }

    pub fn set_pusher(&self, pusher: Arc<dyn Pusher>) {
        let _ = self.commits.pusher.set(pusher);
    }

    fn images(&self) -> Result<Arc<ImageStore>, CoreError> {
        self.commits
            .images
            .get()
            .cloned()
            .ok_or_else(|| CoreError::Conflict("this daemon has no image store".into()))
    }

    fn register_image_template(&self, store: &ImageStore, image: &str) -> Result<(), CoreError> {
        let rootfs = store.image_rootfs(image).map_err(image_err)?;
        self.templates.register(
            image,
            RootfsSpec {
                lower_dirs: rootfs.lower_dirs,
                ro_binds: rootfs
                    .host_binds
                    .into_iter()
                    .map(|(source, target)| BindMount { source, target })
                    .collect(),
            },
        );
        Ok(())
    }

    /// Starts a commit. Returns the stored object (phase `Pending`); the work runs in the
    /// background.
    pub async fn create_commit(
        self: &Arc<Self>,
        who: &Principal,
        mut commit: Commit,
    ) -> Result<Commit, CoreError> {
        if commit.metadata.name.is_empty() {
            let n: u32 = rand::random();
            commit.metadata.name = format!("commit-{n:08x}");
        }
        let ttl = commit
            .validate()
            .map_err(|e| CoreError::InvalidArgument(e.to_string()))?;
        self.images()?;
        let rec = self.visible(who, &commit.spec.sandbox).await?;
        if !matches!(rec.state, SandboxState::Running | SandboxState::Paused) {
            return Err(CoreError::Conflict(format!(
                "sandbox {} is {}: only running or paused sandboxes can be committed",
                rec.id, rec.state
            )));
        }
        if commit.push() && self.commits.pusher.get().is_none() {
            return Err(CoreError::Conflict("this daemon cannot push images".into()));
        }
        for s in commit.secrets() {
            if self.store.get_secret(s).await?.is_none() {
                return Err(CoreError::NotFound(format!(
                    "registry secret {s:?} not found (create it with `warren secret create {s} --username USER --password-stdin`)"
                )));
            }
        }
        let now = Utc::now();
        commit.status = crate::commit::CommitStatus {
            created_at: Some(now),
            ..Default::default()
        };
        if !self.store.insert_commit(&commit).await? {
            return Err(CoreError::Conflict(format!(
                "commit {} already exists",
                commit.metadata.name
            )));
        }
        let me = self.clone();
        let c = commit.clone();
        tokio::spawn(async move { me.run_commit(c, ttl).await });
        Ok(commit)
    }

    async fn run_commit(self: Arc<Self>, mut commit: Commit, ttl: Option<chrono::Duration>) {
        let started = Instant::now();
        commit.status.phase = CommitPhase::Running;
        if let Err(e) = self.store.update_commit(&commit).await {
            tracing::error!(commit = %commit.metadata.name, error = %e, "cannot record commit");
        }
        let result = self.do_commit(&mut commit, started).await;
        let now = Utc::now();
        commit.status.completed_at = Some(now);
        commit.status.total_duration_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
        match result {
            Ok(()) => {
                commit.status.phase = CommitPhase::Succeeded;
                commit.status.expires_at = ttl.map(|t| now + t);
                tracing::info!(
                    commit = %commit.metadata.name,
                    image = %commit.spec.image,
                    freeze_ms = commit.status.freeze_duration_ms.unwrap_or_default(),
                    total_ms = commit.status.total_duration_ms.unwrap_or_default(),
                    "commit done"
                );
            }
            Err(e) => {
                commit.status.phase = CommitPhase::Failed;
                commit.status.message = Some(e.to_string());
                tracing::warn!(commit = %commit.metadata.name, error = %e, "commit failed");
            }
        }
        if let Err(e) = self.store.update_commit(&commit).await {
            tracing::error!(commit = %commit.metadata.name, error = %e, "cannot record commit");
        }
    }

    async fn do_commit(&self, commit: &mut Commit, started: Instant) -> Result<(), CoreError> {
        let store = self.images()?;
        let id = commit.spec.sandbox.clone();
        let staged;
        let rec;
        {
            let lock = self.lock_for(&id);
            let _guard = lock.lock().await;
            rec = match self.store.get(&id).await? {
                Some(r) if matches!(r.state, SandboxState::Running | SandboxState::Paused) => r,
                Some(r) => {
                    return Err(CoreError::Conflict(format!(
                        "sandbox {id} is {}: only running or paused sandboxes can be committed",
                        r.state
                    )))
                }
                None => return Err(CoreError::NotFound(format!("sandbox {id} not found"))),
            };
            let upper = self.runtime.upper_dir(&id).ok_or_else(|| {
                CoreError::Conflict(format!("sandbox {id} has no upper dir to commit"))
            })?;
            let freeze = rec.state == SandboxState::Running;
            // Pre-copy with the sandbox running, then freeze only to rescan and copy what changed
            // meanwhile: the freeze lasts as long as the metadata walk plus the recent writes,
            // not as long as a copy of the whole upper dir.
            let s2 = store.clone();
            let up = upper.clone();
            let mut pre = tokio::task::spawn_blocking(move || s2.pre_copy(&up))
                .await
                .map_err(|e| CoreError::InvalidArgument(format!("commit task failed: {e}")))?
                .map_err(image_err)?;
            // From the freeze request to the end of the thaw: the whole time the sandbox's
            // processes may be stopped.
            let t0 = Instant::now();
            if freeze {
                self.runtime.freeze(&id).await?;
            }
            let s2 = store.clone();
            let res = tokio::task::spawn_blocking(move || {
                let copied = s2.frozen_pass(&upper, &mut pre);
                (copied, pre)
            })
            .await;
            let thawed = if freeze {
                self.runtime.thaw(&id).await
            } else {
                Ok(())
            };
            let frozen_for = t0.elapsed();
            if let Err(e) = thawed {
                // A sandbox left frozen would hang every request: make it visible.
                tracing::error!(sandbox = %id, error = %e, "thaw after commit failed");
                return Err(e.into());
            }
            commit.status.freeze_duration_ms = Some(if freeze {
                frozen_for.as_secs_f64() * 1000.0
            } else {
                0.0
            });
            let (copied, pre) =
                res.map_err(|e| CoreError::InvalidArgument(format!("commit task failed: {e}")))?;
            let copied = copied.map_err(image_err)?;
            tracing::debug!(sandbox = %id, copied_while_frozen = copied, "frozen pass done");
            let s2 = store.clone();
            staged = tokio::task::spawn_blocking(move || s2.finish_staging(pre))
                .await
                .map_err(|e| CoreError::InvalidArgument(format!("commit task failed: {e}")))?
                .map_err(image_err)?;
        }

        // The base: the template's image if the template is an image of the store and the
        // sandbox runs on exactly its layers, else the sandbox's own lower dirs.
        let rootfs = &rec.spec.rootfs;
        let base = match store.image_rootfs(&rec.template_id) {
            Ok(r) if r.lower_dirs == rootfs.lower_dirs => Base::Image(
                store
                    .layout()
                    .resolve(&rec.template_id)
                    .map_err(image_err)?,
            ),
            _ => Base::Dirs {
                lower_dirs: rootfs.lower_dirs.iter().rev().cloned().collect(),
                host_binds: rootfs
                    .ro_binds
                    .iter()
                    .map(|b| (b.source.clone(), b.target.clone()))
                    .collect(),
            },
        };
        let image = commit.spec.image.clone();
        let created_by = format!("warren commit {} of sandbox {id}", commit.metadata.name);
        self.commits.in_flight.fetch_add(1, Ordering::SeqCst);
        let _in_flight = InFlight(&self.commits.in_flight);
        let s2 = store.clone();
        let img = image.clone();
        let done =
            tokio::task::spawn_blocking(move || s2.finish_commit(staged, &base, &img, &created_by))
                .await
                .map_err(|e| CoreError::InvalidArgument(format!("commit task failed: {e}")))?
                .map_err(image_err)?;
        commit.status.digest = Some(done.digest.clone());
        commit.status.size = Some(done.layer.size);
        commit.status.image_size = Some(done.image_size);
        self.register_image_template(&store, &image)?;
        if let Some(cmd) = self.templates.start_command(&rec.template_id) {
            self.templates.set_start_command(image.clone(), cmd);
        }
        if let Some(port) = self.templates.ready_port(&rec.template_id) {
            self.templates.set_ready_port(image.clone(), port);
        }
        tracing::debug!(image = %image, ms = started.elapsed().as_millis() as u64, "image stored");

        if commit.push() {
            let pusher = self
                .commits
                .pusher
                .get()
                .cloned()
                .ok_or_else(|| CoreError::Conflict("this daemon cannot push images".into()))?;
            let auth = match commit.secrets().first() {
                Some(name) => {
                    let s: RegistrySecret =
                        self.store.get_secret(name).await?.ok_or_else(|| {
                            CoreError::NotFound(format!("registry secret {name:?} not found"))
                        })?;
                    Some((s.username, s.password))
                }
                None => None,
            };
            commit.status.pushed = Some(false);
            pusher
                .push(store.clone(), &image, auth)
                .await
                .map_err(|e| {
                    CoreError::InvalidArgument(format!(
                        "image {image} is in the local store, but the push failed: {e}"
                    ))
                })?;
            commit.status.pushed = Some(true);
        }
        Ok(())
    }

    pub async fn get_commit(&self, name: &str) -> Result<Commit, CoreError> {
        self.store
            .get_commit(name)
            .await?
            .ok_or_else(|| CoreError::NotFound(format!("commit {name} not found")))
    }

    pub async fn list_commits(&self) -> Result<Vec<Commit>, CoreError> {
        Ok(self.store.list_commits().await?)
    }

    /// Deletes a finished commit, its image name and template, and the blobs and layer dirs
    /// nothing else uses. A commit still running cannot be deleted.
    pub async fn delete_commit(&self, name: &str) -> Result<(), CoreError> {
        let c = self.get_commit(name).await?;
        if !c.status.phase.done() {
            return Err(CoreError::Conflict(format!(
                "commit {name} is {:?}; delete it once it has finished",
                c.status.phase
            )));
        }
        self.remove_commit(c).await
    }

    async fn remove_commit(&self, c: Commit) -> Result<(), CoreError> {
        self.store.delete_commit(&c.metadata.name).await?;
        if let (Some(store), Some(digest)) = (self.commits.images.get(), &c.status.digest) {
            // Only if the name still names this commit's image: a later commit may reuse it.
            let current = store.layout().resolve(&c.spec.image).ok();
            if current.map(|i| i.manifest_blob.digest) == Some(digest.clone()) {
                store
                    .layout()
                    .remove_ref(&c.spec.image)
                    .map_err(image_err)?;
                self.templates.unregister(&c.spec.image);
            }
        }
        self.collect_image_garbage().await;
        tracing::info!(commit = %c.metadata.name, "commit deleted");
        Ok(())
    }

    /// Removes blobs and layer dirs nothing references. Skipped while a commit is writing.
    async fn collect_image_garbage(&self) {
        let Some(store) = self.commits.images.get().cloned() else {
            return;
        };
        if self.commits.in_flight.load(Ordering::SeqCst) > 0 {
            return;
        }
        let mut in_use: HashSet<PathBuf> = HashSet::new();
        if let Ok(recs) = self.store.list_all().await {
            for r in recs {
                in_use.extend(r.spec.rootfs.lower_dirs.iter().cloned());
            }
        }
        for name in self.templates.names() {
            if let Ok(spec) = self.templates.resolve(&name) {
                in_use.extend(spec.lower_dirs);
            }
        }
        let res = tokio::task::spawn_blocking(move || {
            let blobs = store.layout().gc(&HashSet::new()).map_err(image_err)?;
            let dirs = store.gc_layer_dirs(&in_use).map_err(image_err)?;
            Ok::<_, CoreError>((blobs.len(), dirs.len()))
        })
        .await;
        match res {
            Ok(Ok((b, d))) if b + d > 0 => {
                tracing::info!(blobs = b, layer_dirs = d, "image garbage collected")
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "image garbage collection failed"),
            _ => {}
        }
    }

    /// Part of the background tick: deletes commits whose TTL passed.
    pub(super) async fn expire_commits(&self) {
        let Ok(commits) = self.store.list_commits().await else {
            return;
        };
        let now = self.clock.now();
        for c in commits {
            if c.status.expires_at.is_some_and(|t| t <= now) {
                let name = c.metadata.name.clone();
                if let Err(e) = self.remove_commit(c).await {
                    tracing::warn!(commit = %name, error = %e, "expiring commit failed");
                }
            }
        }
    }
}

impl Warren {
    pub async fn put_secret(&self, s: RegistrySecret) -> Result<RegistrySecret, CoreError> {
        if !crate::commit::valid_object_name(&s.name) {
            return Err(CoreError::InvalidArgument(format!(
                "secret name {:?}: use 1-63 lower-case letters, digits, '-' and '.'",
                s.name
            )));
        }
        if s.username.is_empty() || s.password.is_empty() {
            return Err(CoreError::InvalidArgument(
                "a registry secret needs a username and a password".into(),
            ));
        }
        self.store.put_secret(&s).await?;
        Ok(s)
    }

    pub async fn get_secret(&self, name: &str) -> Result<RegistrySecret, CoreError> {
        self.store
            .get_secret(name)
            .await?
            .ok_or_else(|| CoreError::NotFound(format!("registry secret {name} not found")))
    }

    pub async fn list_secrets(&self) -> Result<Vec<RegistrySecret>, CoreError> {
        Ok(self.store.list_secrets().await?)
    }

    pub async fn delete_secret(&self, name: &str) -> Result<(), CoreError> {
        if self.store.delete_secret(name).await? {
            Ok(())
        } else {
            Err(CoreError::NotFound(format!(
                "registry secret {name} not found"
            )))
        }
    }
}
