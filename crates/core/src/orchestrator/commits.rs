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
//! The committed image lives in the one image store (`warren_image::store::ImageStore`, shared
//! with image templates) and becomes an image template named by its reference, exactly as if it
//! had been imported: its config's Env, WorkingDir, User and Cmd are the new sandboxes' defaults.
//!
//! TTL: the background tick deletes expired commits, drops their image names (unless a later
//! commit took the name) and their templates (unless a sandbox or pool still uses them), then the
//! store's gc collects blobs and layer dirs that no image references any more.

use super::Warren;
use crate::auth::Principal;
use crate::commit::{Commit, CommitPhase, RegistrySecret};
use crate::error::CoreError;
use crate::image_templates::{self as it, ImageTemplate, TemplateSource};
use crate::state::SandboxState;
use chrono::Utc;
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use warren_image::commit::{Base, Committer};
use warren_image::store::{Descriptor, MEDIA_OCI_MANIFEST};
use warren_image::ImageStore;

/// The orchestrator's commit machinery.
#[derive(Default)]
pub struct CommitState {
    images: OnceLock<Arc<Committer>>,
    pusher: OnceLock<Arc<dyn Pusher>>,
}

/// Pushes an image of the local store to its registry (implemented over oci-client by the edge
/// that owns the HTTP stack; the orchestrator only decides when).
#[async_trait::async_trait]
pub trait Pusher: Send + Sync + 'static {
    async fn push(
        &self,
        store: ImageStore,
        image: &str,
        auth: Option<(String, String)>,
    ) -> Result<(), String>;
}

/// Running (frozen briefly), paused (frozen already) and hibernated (no process left; its upper
/// dir is on disk) sandboxes can be committed; the states in between are moments of a transition
/// that holds the sandbox's lock.
fn committable(state: SandboxState) -> bool {
    matches!(
        state,
        SandboxState::Running | SandboxState::Paused | SandboxState::Hibernated
    )
}

fn not_committable(id: &str, state: SandboxState) -> CoreError {
    CoreError::Conflict(format!(
        "sandbox {id} is {state}: only running, paused or hibernated sandboxes can be committed{}",
        if matches!(
            state,
            SandboxState::Pausing
                | SandboxState::Resuming
                | SandboxState::Hibernating
                | SandboxState::Waking
        ) {
            "; try again in a moment"
        } else {
            ""
        }
    ))
}

fn image_err(e: impl std::fmt::Display) -> CoreError {
    CoreError::InvalidArgument(e.to_string())
}

impl Warren {
    /// Gives the orchestrator its committer (over the image store that image templates use;
    /// committed images are image templates, loaded with them at start).
    pub async fn set_image_store(&self, committer: Arc<Committer>) -> Result<(), CoreError> {
        let _ = self.commits.images.set(committer);
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

    pub(super) fn images(&self) -> Result<Arc<Committer>, CoreError> {
        self.commits
            .images
            .get()
            .cloned()
            .ok_or_else(|| CoreError::Conflict("this daemon has no image store".into()))
    }

    /// Makes the committed image `image` (manifest `digest`) an image template of that name,
    /// with a `warren-template/<name>` ref of its own (as an imported template has), so that the
    /// template outlives the commit's own name until it is deleted.
    pub(super) async fn register_committed_template(
        &self,
        committer: &Committer,
        image: &str,
        digest: &str,
        manifest_size: u64,
        fallback_start: Option<String>,
    ) -> Result<(), CoreError> {
        let store = committer.store().clone();
        let (digest_s, image_s) = (digest.to_string(), image.to_string());
        let (img, layers) = tokio::task::spawn_blocking(move || {
            let _op = store.begin_operation();
            let resolved = store.resolve(&digest_s)?;
            let layers = store.layer_dirs(&resolved, &*warren_image::no_progress())?;
            store.set_ref(
                &it::store_ref(&image_s),
                Descriptor::new(MEDIA_OCI_MANIFEST, digest_s, manifest_size),
            )?;
            Ok::<_, warren_image::ImageError>((resolved, layers))
        })
        .await
        .map_err(|e| CoreError::InvalidArgument(format!("commit task failed: {e}")))??;
        let (env, workdir, user, start_command) = it::from_run_config(img.config.config.as_ref());
        let t = ImageTemplate {
            name: image.to_string(),
            source: TemplateSource::Image {
                reference: image.to_string(),
            },
            store_ref: Some(it::store_ref(image)),
            manifest_digest: Some(digest.to_string()),
            layers,
            env,
            workdir,
            user,
            start_command: start_command.or(fallback_start),
            size_bytes: img.size(),
            host_binds: warren_image::commit::host_binds(&img.config_raw),
            ready_port: None,
            ready_cmd: None,
            vcpus: None,
            memory_mb: None,
            created_at: self.clock.now(),
        };
        it::save(&self.store, &t).await?;
        self.templates
            .images
            .ready
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(image.to_string(), t);
        Ok(())
    }

    /// The committed (or built) image becomes the template of its name: refused when that name
    /// is built in or a template of another kind. A template sandboxes or pools still use may be
    /// replaced.
    pub(super) async fn check_image_name_free(&self, image: &str) -> Result<(), CoreError> {
        if self.templates.is_builtin(image) {
            return Err(CoreError::Conflict(format!(
                "{image} is a built-in template; commit under another image name"
            )));
        }
        let Some(t) = self.templates.images.get(image) else {
            return Ok(());
        };
        if t.source
            != (TemplateSource::Image {
                reference: image.to_string(),
            })
        {
            return Err(CoreError::Conflict(format!(
                "template {image} exists ({}); delete it or commit under another image name",
                t.source.describe()
            )));
        }
        // Sandboxes and pool members of the template keep the layers they started on (image gc
        // spares the lower dirs in use); pools roll to the new image as their revision changes.
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
        if !committable(rec.state) {
            return Err(not_committable(&rec.id, rec.state));
        }
        self.check_image_name_free(&commit.spec.image).await?;
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
        let (staged, rec, frozen_ms) = self.stage_sandbox(&store, &id).await?;
        commit.status.freeze_duration_ms = Some(frozen_ms);
        let base = self.commit_base(&store, &rec)?;
        let image = commit.spec.image.clone();
        let created_by = format!("warren commit {} of sandbox {id}", commit.metadata.name);
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
        self.register_committed_template(
            &store,
            &image,
            &done.digest,
            done.manifest_size,
            self.templates.start_command(&rec.template_id),
        )
        .await?;
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
                .push(store.store().clone(), &image, auth)
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

    /// Copies a sandbox's upper dir to a staged layer tar, holding its operation lock: a full
    /// pre-copy with the sandbox running, then, frozen, a rescan that copies only what changed
    /// since. A paused sandbox is not frozen again, and a hibernated one has no process left
    /// to freeze (its upper dir is on disk, unmounted): both are read as they are, and stay
    /// paused or hibernated. Returns the staged tar, the sandbox's record and how long it was
    /// frozen (ms).
    pub(super) async fn stage_sandbox(
        &self,
        store: &Arc<Committer>,
        id: &str,
    ) -> Result<
        (
            warren_image::commit::StagedLayer,
            crate::store::SandboxRecord,
            f64,
        ),
        CoreError,
    > {
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let rec = match self.store.get(id).await? {
            Some(r) if committable(r.state) => r,
            Some(r) => return Err(not_committable(id, r.state)),
            None => return Err(CoreError::NotFound(format!("sandbox {id} not found"))),
        };
        let upper = self.runtime.upper_dir(id).ok_or_else(|| {
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
            self.runtime.freeze(id).await?;
        }
        let s2 = store.clone();
        let res = tokio::task::spawn_blocking(move || {
            let copied = s2.frozen_pass(&upper, &mut pre);
            (copied, pre)
        })
        .await;
        let thawed = if freeze {
            self.runtime.thaw(id).await
        } else {
            Ok(())
        };
        let frozen_for = t0.elapsed();
        if let Err(e) = thawed {
            // A sandbox left frozen would hang every request: make it visible.
            tracing::error!(sandbox = %id, error = %e, "thaw after commit failed");
            return Err(e.into());
        }
        let frozen_ms = if freeze {
            frozen_for.as_secs_f64() * 1000.0
        } else {
            0.0
        };
        let (copied, pre) =
            res.map_err(|e| CoreError::InvalidArgument(format!("commit task failed: {e}")))?;
        let copied = copied.map_err(image_err)?;
        tracing::debug!(sandbox = %id, copied_while_frozen = copied, state = %rec.state, "frozen pass done");
        let s2 = store.clone();
        let staged = tokio::task::spawn_blocking(move || s2.finish_staging(pre))
            .await
            .map_err(|e| CoreError::InvalidArgument(format!("commit task failed: {e}")))?
            .map_err(image_err)?;
        Ok((staged, rec, frozen_ms))
    }

    /// The base a commit of `rec` builds on: the template's image if the sandbox's template is
    /// an image template and the sandbox runs on exactly its layers, else the sandbox's own
    /// lower dirs.
    pub(super) fn commit_base(
        &self,
        store: &Committer,
        rec: &crate::store::SandboxRecord,
    ) -> Result<Base, CoreError> {
        let rootfs = &rec.spec.rootfs;
        let images = &self.templates.images;
        Ok(match images.get(&rec.template_id) {
            Some(t)
                if t.manifest_digest.is_some() && images.lower_dirs(&t) == rootfs.lower_dirs =>
            {
                let digest = t.manifest_digest.clone().unwrap_or_default();
                Base::Image(Box::new(store.store().resolve(&digest)?))
            }
            _ => Base::Dirs {
                lower_dirs: rootfs.lower_dirs.iter().rev().cloned().collect(),
                host_binds: rootfs
                    .ro_binds
                    .iter()
                    .map(|b| (b.source.clone(), b.target.clone()))
                    .collect(),
                user: Some(rec.spec.envd.default_user.clone()).filter(|u| !u.is_empty()),
                start_command: self.templates.start_command(&rec.template_id),
            },
        })
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
        if let (Some(committer), Some(digest)) = (self.commits.images.get(), &c.status.digest) {
            let store = committer.store();
            // Only if the name still names this commit's image: a later commit may reuse it.
            let current = store.resolve(&c.spec.image).ok();
            if current.map(|i| i.manifest_digest) == Some(digest.clone()) {
                store.remove_ref(&c.spec.image)?;
            }
            let ours = self.templates.images.get(&c.spec.image).is_some_and(|t| {
                t.manifest_digest.as_deref() == Some(digest.as_str())
                    && t.source
                        == TemplateSource::Image {
                            reference: c.spec.image.clone(),
                        }
            });
            if ours {
                // A pool's template stays until it is deleted by hand; sandboxes on it keep
                // their layers either way.
                if let Err(e) = self.delete_template(&c.spec.image).await {
                    tracing::warn!(commit = %c.metadata.name, error = %e, "template of the commit kept");
                }
            }
        }
        self.collect_image_garbage("commit deleted").await;
        tracing::info!(commit = %c.metadata.name, "commit deleted");
        Ok(())
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
