//! Template lifecycle decisions: building a template from an image (in the background, with
//! progress), listing, and deleting (refused while a sandbox or a pool uses it).

use super::Warren;
use crate::error::CoreError;
use crate::image_templates::{self as it, BuildStatus, ImageTemplate, TemplateSource};
use crate::state::SandboxState;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use warren_image::pull::Credentials;
use warren_image::{ImageError, ImageStore};

/// One template as the API lists it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateView {
    pub name: String,
    /// `builtin` (given by the daemon or its templates dir), `image` or `rootfs`.
    pub kind: String,
    /// `ready`, `building` or `failed`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<ImageTemplate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildStatus>,
}

impl From<ImageError> for CoreError {
    fn from(e: ImageError) -> Self {
        if e.is_not_found() {
            CoreError::NotFound(e.to_string())
        } else if e.is_bad_input() {
            CoreError::InvalidArgument(e.to_string())
        } else {
            CoreError::Image(e.to_string())
        }
    }
}

fn kind_of(t: &ImageTemplate) -> &'static str {
    match t.source {
        TemplateSource::Rootfs { .. } => "rootfs",
        TemplateSource::Checkpoint { .. } => "checkpoint",
        _ => "image",
    }
}

impl Warren {
    fn image_store(&self) -> Result<ImageStore, CoreError> {
        self.templates
            .images
            .image_store()
            .ok_or_else(|| CoreError::InvalidArgument("this daemon has no image store".into()))
    }

    /// Loads the image templates of the database (at daemon start).
    pub async fn load_image_templates(&self) -> Result<usize, CoreError> {
        let all = it::load_all(&self.store).await?;
        let n = all.len();
        for t in all {
            if let Some(missing) = t.layers.iter().find(|l| !l.is_dir()) {
                tracing::warn!(template = %t.name, layer = %missing.display(), "template layer missing; recreate the template");
            }
            self.templates
                .images
                .ready
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(t.name.clone(), t);
        }
        // Whatever a crash or an interrupted build left unreferenced in the store goes now.
        self.collect_image_garbage("at start").await;
        Ok(n)
    }

    /// The lower dirs that live sandboxes (hibernated ones too) and checkpoints stack: their
    /// layers stay in the image store even after their template was rebuilt or deleted.
    async fn lower_dirs_in_use(&self) -> Result<Vec<PathBuf>, CoreError> {
        let mut dirs: Vec<PathBuf> = self
            .store
            .list_all()
            .await?
            .into_iter()
            .filter(|r| !matches!(r.state, SandboxState::Killed | SandboxState::Failed))
            .flat_map(|r| r.spec.rootfs.lower_dirs)
            .collect();
        for (c, _) in self.store.list_checkpoints().await? {
            if let Some((_, source)) = self.store.get_checkpoint(&c.metadata.name).await? {
                dirs.extend(source.spec.rootfs.lower_dirs);
            }
        }
        dirs.sort();
        dirs.dedup();
        Ok(dirs)
    }

    /// Every layer in use, read while no create sits between reading its template's layers
    /// and recording its sandbox (see [`LayerClaims`]); `None` when creates never paused long
    /// enough.
    async fn layers_in_use_between_creates(&self) -> Result<Option<Vec<PathBuf>>, CoreError> {
        for _ in 0..GC_QUIET_TRIES {
            let Some(started) = self.layer_claims.quiet() else {
                tokio::time::sleep(GC_QUIET_WAIT).await;
                continue;
            };
            let mut dirs = self.lower_dirs_in_use().await?;
            // A create that starts from now on reads these templates, or newer ones.
            dirs.extend(
                self.templates
                    .images
                    .ready
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .values()
                    .flat_map(|t| t.layers.iter().cloned()),
            );
            if self.layer_claims.quiet() == Some(started) {
                return Ok(Some(dirs));
            }
        }
        Ok(None)
    }

    /// Removes the blobs and layer dirs that no image references and no sandbox or checkpoint
    /// stacks (skipped while an import, a build or a commit writes to the store). `when` says
    /// what led to it, for the log.
    pub(super) async fn collect_image_garbage(&self, when: &str) {
        let Some(store) = self.templates.images.image_store() else {
            return;
        };
        let in_use = match self.layers_in_use_between_creates().await {
            Ok(Some(dirs)) => dirs,
            Ok(None) => {
                tracing::info!(when, "image gc skipped: creates never paused");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, when, "image gc skipped: the sandboxes in use are unknown");
                return;
            }
        };
        match blocking(move || store.gc_keeping(&in_use)).await {
            Ok(Some(r)) if r.blobs + r.layers > 0 => tracing::info!(
                blobs = r.blobs,
                layers = r.layers,
                bytes = r.bytes,
                when,
                "image garbage collected"
            ),
            Ok(Some(_)) => {}
            Ok(None) => tracing::info!(when, "image gc skipped: the store is being written"),
            Err(e) => tracing::warn!(error = %e, when, "image garbage collection failed"),
        }
    }

    /// After sandbox `lower_dirs` ended: collects image garbage when it stacked a layer that no
    /// template has any more (its template was rebuilt or deleted while it ran).
    pub(super) async fn release_stale_layers(&self, lower_dirs: &[PathBuf]) {
        let Some(store) = self.templates.images.image_store() else {
            return;
        };
        let layers = store.layers_dir();
        let current: std::collections::HashSet<PathBuf> = self
            .templates
            .images
            .ready
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .flat_map(|t| t.layers.iter().cloned())
            .collect();
        if lower_dirs
            .iter()
            .any(|d| d.starts_with(&layers) && !current.contains(d))
        {
            self.collect_image_garbage("a sandbox on an old template ended")
                .await;
        }
    }

    /// Starts building template `name` from `source` and returns at once; progress and the
    /// outcome are in [`Warren::template`].
    pub fn create_template(
        self: &Arc<Self>,
        name: &str,
        source: TemplateSource,
        credentials: Option<Credentials>,
    ) -> Result<BuildStatus, CoreError> {
        if !crate::templates::safe_name(name) || name.len() > 128 {
            return Err(CoreError::InvalidArgument(format!(
                "invalid template name {name:?}: use letters, digits, '-', '_' and '.'"
            )));
        }
        match &source {
            TemplateSource::Image { reference } => {
                warren_image::pull::parse_reference(reference)?;
            }
            TemplateSource::OciDir { path, .. } | TemplateSource::Rootfs { path } => {
                if !path.is_absolute() || !path.is_dir() {
                    return Err(CoreError::InvalidArgument(format!(
                        "{} is not a directory (give an absolute path on the daemon's host)",
                        path.display()
                    )));
                }
            }
            TemplateSource::OciArchive { path, .. }
            | TemplateSource::DockerArchive { path, .. } => {
                if !path.is_absolute() || !path.is_file() {
                    return Err(CoreError::InvalidArgument(format!(
                        "{} is not a file (give an absolute path on the daemon's host)",
                        path.display()
                    )));
                }
            }
            // Made at once by `create_checkpoint_template`, which knows whose checkpoint it is.
            TemplateSource::Checkpoint { .. } => {
                return Err(CoreError::InvalidArgument(
                    "a template from a checkpoint is not built: use create_checkpoint_template"
                        .into(),
                ))
            }
        }
        if !matches!(source, TemplateSource::Rootfs { .. }) {
            self.image_store()?;
        }
        let status = {
            let mut builds = self
                .templates
                .images
                .builds
                .write()
                .unwrap_or_else(|e| e.into_inner());
            if self.templates.is_builtin(name) || self.templates.images.get(name).is_some() {
                return Err(CoreError::Conflict(format!(
                    "template {name} exists; delete it first"
                )));
            }
            if builds.get(name).is_some_and(|b| b.status == "building") {
                return Err(CoreError::Conflict(format!(
                    "template {name} is being built"
                )));
            }
            let status = BuildStatus {
                name: name.to_string(),
                source: source.clone(),
                status: "building".into(),
                progress: None,
                error: None,
                started_at: self.clock.now(),
            };
            builds.insert(name.to_string(), status.clone());
            status
        };
        let me = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let began = std::time::Instant::now();
            let res = me.build_template(&name, source, credentials).await;
            let mut builds = me
                .templates
                .images
                .builds
                .write()
                .unwrap_or_else(|e| e.into_inner());
            match res {
                Ok(t) => {
                    tracing::info!(template = %name, layers = t.layers.len(), secs = began.elapsed().as_secs_f64(), "template ready");
                    builds.remove(&name);
                }
                Err(e) => {
                    tracing::warn!(template = %name, error = %e, "template build failed");
                    if let Some(b) = builds.get_mut(&name) {
                        b.status = "failed".into();
                        b.error = Some(e.to_string());
                    }
                }
            }
        });
        Ok(status)
    }

    async fn build_template(
        &self,
        name: &str,
        source: TemplateSource,
        credentials: Option<Credentials>,
    ) -> Result<ImageTemplate, CoreError> {
        let images = &self.templates.images;
        let report: Arc<warren_image::Progress> = {
            let name = name.to_string();
            let builds = images.builds.clone();
            Arc::new(move |ev| {
                let mut b = builds.write().unwrap_or_else(|e| e.into_inner());
                if let Some(s) = b.get_mut(&name) {
                    s.progress = Some(ev);
                }
            })
        };
        let store_ref = it::store_ref(name);
        let (layers, image) = match &source {
            TemplateSource::Rootfs { path } => (vec![path.clone()], None),
            other => {
                let store = self.image_store()?;
                let imported = match other.clone() {
                    TemplateSource::Image { reference } => {
                        match store.resolve(&reference) {
                            // An image of the store (a commit, an earlier pull): no registry.
                            Ok(image) => {
                                let desc = warren_image::store::Descriptor::new(
                                    &image.manifest_media_type,
                                    image.manifest_digest.clone(),
                                    std::fs::metadata(store.blob_path(&image.manifest_digest)?)
                                        .map(|m| m.len())
                                        .unwrap_or(0),
                                );
                                let (store, report, sref) =
                                    (store.clone(), report.clone(), store_ref.clone());
                                blocking(move || {
                                    let _op = store.begin_operation();
                                    let dirs = store.layer_dirs(&image, &*report)?;
                                    store.set_ref(&sref, desc.clone())?;
                                    Ok(warren_image::Imported {
                                        image,
                                        descriptor: desc,
                                        layer_dirs: dirs,
                                    })
                                })
                                .await?
                            }
                            Err(ImageError::NotFound(_)) => {
                                warren_image::pull::pull(
                                    &store,
                                    &reference,
                                    credentials.as_ref(),
                                    &store_ref,
                                    report.clone(),
                                )
                                .await?
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    TemplateSource::OciDir { path, name: n }
                    | TemplateSource::OciArchive { path, name: n }
                    | TemplateSource::DockerArchive { path, name: n } => {
                        let import = match &source {
                            TemplateSource::OciDir { .. } => warren_image::import::import_oci_dir,
                            TemplateSource::OciArchive { .. } => {
                                warren_image::import::import_oci_archive
                            }
                            _ => warren_image::import::import_docker_archive,
                        };
                        let (store, report, sref) =
                            (store.clone(), report.clone(), store_ref.clone());
                        blocking(move || import(&store, &path, n.as_deref(), &sref, &*report))
                            .await?
                    }
                    TemplateSource::Rootfs { .. } | TemplateSource::Checkpoint { .. } => {
                        unreachable!("rootfs handled above, checkpoints refused by create_template")
                    }
                };
                (imported.layer_dirs.clone(), Some(imported))
            }
        };
        let (env, workdir, user, start_command) =
            it::from_run_config(image.as_ref().and_then(|i| i.image.config.config.as_ref()));
        let t = ImageTemplate {
            name: name.to_string(),
            source,
            store_ref: image.as_ref().map(|_| store_ref.clone()),
            manifest_digest: image.as_ref().map(|i| i.image.manifest_digest.clone()),
            layers,
            env,
            workdir,
            user,
            start_command,
            size_bytes: image.as_ref().map(|i| i.image.size()).unwrap_or(0),
            host_binds: image
                .as_ref()
                .map(|i| warren_image::commit::host_binds(&i.image.config_raw))
                .unwrap_or_default(),
            ready_port: None,
            ready_cmd: None,
            vcpus: None,
            memory_mb: None,
            created_at: self.clock.now(),
        };
        if let Err(e) = it::save(&self.store, &t).await {
            if let Some(store) = images.image_store() {
                let _ = store.remove_ref(&store_ref);
            }
            return Err(e.into());
        }
        images
            .ready
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), t.clone());
        Ok(t)
    }

    /// Makes template `name` from checkpoint `checkpoint` (of the principal's team): every
    /// sandbox of the template, and every member of a pool on it, is a restore of the
    /// checkpoint. Ready at once (nothing is copied); like any template it is usable by every
    /// team of the daemon. The checkpoint cannot be deleted while the template exists.
    pub async fn create_checkpoint_template(
        &self,
        who: &crate::auth::Principal,
        name: &str,
        checkpoint: &str,
    ) -> Result<TemplateView, CoreError> {
        if !crate::templates::safe_name(name) || name.len() > 128 {
            return Err(CoreError::InvalidArgument(format!(
                "invalid template name {name:?}: use letters, digits, '-', '_' and '.'"
            )));
        }
        let ck = self.get_checkpoint(who, checkpoint).await?;
        if ck.status.phase != crate::checkpoint::CheckpointPhase::Succeeded {
            return Err(CoreError::Conflict(format!(
                "checkpoint {checkpoint} is {:?}: only a finished checkpoint can be a template",
                ck.status.phase
            )));
        }
        if ck.fork_of().is_some() {
            return Err(CoreError::InvalidArgument(format!(
                "checkpoint {checkpoint} was made by a fork and is collected with its forks; \
                 take a named checkpoint of the sandbox for a template"
            )));
        }
        let (_, source) = self
            .store
            .get_checkpoint(checkpoint)
            .await?
            .ok_or_else(|| CoreError::NotFound(format!("checkpoint {checkpoint} not found")))?;
        let layer = self.runtime.checkpoint_layer(checkpoint).ok_or_else(|| {
            CoreError::NotFound(format!("the files of checkpoint {checkpoint} are gone"))
        })?;
        let envd = &source.spec.envd;
        let t = ImageTemplate {
            name: name.to_string(),
            source: TemplateSource::Checkpoint {
                checkpoint: checkpoint.to_string(),
            },
            store_ref: None,
            manifest_digest: None,
            // Exactly what a restore stacks: the checkpoint's files over the source's layers.
            layers: std::iter::once(layer)
                .chain(source.spec.rootfs.lower_dirs.iter().cloned())
                .collect(),
            env: envd.env_vars.clone(),
            workdir: envd.default_cwd.clone(),
            user: Some(envd.default_user.clone()),
            start_command: envd.start_command.clone(),
            size_bytes: ck.status.size.unwrap_or(0),
            host_binds: source
                .spec
                .rootfs
                .ro_binds
                .iter()
                .map(|b| (b.source.clone(), b.target.clone()))
                .collect(),
            ready_port: None,
            ready_cmd: None,
            vcpus: None,
            memory_mb: None,
            created_at: self.clock.now(),
        };
        {
            // The check and the insert under one lock: two creates of one name make one template.
            let builds = self
                .templates
                .images
                .builds
                .read()
                .unwrap_or_else(|e| e.into_inner());
            let mut ready = self
                .templates
                .images
                .ready
                .write()
                .unwrap_or_else(|e| e.into_inner());
            if self.templates.is_builtin(name)
                || ready.contains_key(name)
                || builds.get(name).is_some_and(|b| b.status == "building")
            {
                return Err(CoreError::Conflict(format!(
                    "template {name} exists; delete it first"
                )));
            }
            ready.insert(name.to_string(), t.clone());
        }
        if let Err(e) = it::save(&self.store, &t).await {
            self.templates
                .images
                .ready
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(name);
            return Err(e.into());
        }
        tracing::info!(template = %name, checkpoint = %checkpoint, "checkpoint template ready");
        self.template(name)
    }

    /// One template: ready, building or failed.
    pub fn template(&self, name: &str) -> Result<TemplateView, CoreError> {
        if let Some(t) = self.templates.images.get(name) {
            return Ok(TemplateView {
                name: name.to_string(),
                kind: kind_of(&t).into(),
                status: "ready".into(),
                template: Some(t),
                build: None,
            });
        }
        if let Some(b) = self.templates.images.build(name) {
            return Ok(TemplateView {
                name: name.to_string(),
                kind: match b.source {
                    TemplateSource::Rootfs { .. } => "rootfs".into(),
                    TemplateSource::Checkpoint { .. } => "checkpoint".into(),
                    _ => "image".into(),
                },
                status: b.status.clone(),
                template: None,
                build: Some(b),
            });
        }
        if self.templates.resolve(name).is_ok() {
            return Ok(TemplateView {
                name: name.to_string(),
                kind: "builtin".into(),
                status: "ready".into(),
                template: None,
                build: None,
            });
        }
        Err(CoreError::NotFound(format!("template {name} not found")))
    }

    /// Every template, with builds in progress and failed ones, sorted by name.
    pub fn list_templates(&self) -> Vec<TemplateView> {
        let mut names = self.templates.names();
        names.extend(
            self.templates
                .images
                .builds
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .keys()
                .cloned(),
        );
        names.sort();
        names.dedup();
        names.iter().filter_map(|n| self.template(n).ok()).collect()
    }

    /// Records what image template `name` sets for its sandboxes (readiness, resources), with
    /// the template, so it survives restarts.
    pub async fn set_template_settings(
        &self,
        name: &str,
        settings: crate::templates::TemplateSettings,
    ) -> Result<(), CoreError> {
        let t = {
            let mut ready = self
                .templates
                .images
                .ready
                .write()
                .unwrap_or_else(|e| e.into_inner());
            let t = ready
                .get_mut(name)
                .ok_or_else(|| CoreError::NotFound(format!("template {name} not found")))?;
            t.ready_port = settings.ready_port;
            t.ready_cmd = settings.ready_cmd;
            t.vcpus = settings.vcpus;
            t.memory_mb = settings.memory_mb;
            t.clone()
        };
        Ok(it::save(&self.store, &t).await?)
    }

    /// Gives the image of template `source` a second name, `name` (an E2B tag): a template of its
    /// own over the same image and layers, with the same settings. An existing template `name`
    /// of the same kind is replaced, as a build over it would (its sandboxes keep their layers).
    pub async fn tag_template(&self, source: &str, name: &str) -> Result<(), CoreError> {
        let images = &self.templates.images;
        let src = images
            .get(source)
            .ok_or_else(|| CoreError::NotFound(format!("template {source} not found")))?;
        let (Some(src_ref), Some(_)) = (src.store_ref.clone(), src.manifest_digest.as_ref()) else {
            return Err(CoreError::InvalidArgument(format!(
                "template {source} is not an image: only built, imported or committed templates take tags"
            )));
        };
        if name == source {
            return Ok(());
        }
        warren_image::commit::validate_image_name(name)
            .map_err(|e| CoreError::InvalidArgument(format!("template name: {e}")))?;
        self.check_image_name_free(name).await?;
        let store = self.image_store()?;
        let new_ref = it::store_ref(name);
        let set = new_ref.clone();
        blocking(move || {
            let manifest = store
                .refs()?
                .into_iter()
                .find(|(r, _)| *r == src_ref)
                .map(|(_, d)| d)
                .ok_or_else(|| ImageError::NotFound(format!("image {src_ref}")))?;
            store.set_ref(&set, manifest)
        })
        .await?;
        let t = ImageTemplate {
            name: name.to_string(),
            source: TemplateSource::Image {
                reference: name.to_string(),
            },
            store_ref: Some(new_ref),
            created_at: self.clock.now(),
            ..src
        };
        it::save(&self.store, &t).await?;
        images
            .ready
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), t);
        Ok(())
    }

    /// Deletes an image or rootfs template (or forgets a failed build), refused while a pool
    /// makes members of it. Sandboxes that run on it (also paused, hibernated, or stacked by a
    /// checkpoint) keep their layers, as after a rebuild: image gc spares the layers in use, and
    /// they go when the last of those ends. Its image leaves the store index and unreferenced
    /// layers are collected.
    pub async fn delete_template(&self, name: &str) -> Result<(), CoreError> {
        let images = &self.templates.images;
        if images.get(name).is_none() {
            let mut builds = images.builds.write().unwrap_or_else(|e| e.into_inner());
            return match builds.get(name).map(|b| b.status.clone()) {
                Some(s) if s == "building" => Err(CoreError::Conflict(format!(
                    "template {name} is being built; delete it when the build ends"
                ))),
                Some(_) => {
                    builds.remove(name);
                    Ok(())
                }
                None if self.templates.is_builtin(name) => Err(CoreError::Conflict(format!(
                    "template {name} is built into the daemon and cannot be deleted"
                ))),
                None => Err(CoreError::NotFound(format!("template {name} not found"))),
            };
        }
        let pools: Vec<String> = self
            .pools
            .sets()
            .iter()
            .filter(|(_, e)| e.object.spec.template == name)
            .map(|(n, _)| n.clone())
            .collect();
        if !pools.is_empty() {
            return Err(CoreError::Conflict(format!(
                "template {name} is used by pool(s) {}; delete them first",
                pools.join(", ")
            )));
        }
        let removed = images
            .ready
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        it::remove(&self.store, name).await?;
        if let (Some(t), Some(store)) = (removed, images.image_store()) {
            if t.store_ref.is_some() {
                blocking(move || store.remove_ref(&it::store_ref(&t.name))).await?;
                self.collect_image_garbage("template deleted").await;
            }
        }
        Ok(())
    }
}

/// How often, and how long apart, an image gc looks for a moment with no create in flight.
const GC_QUIET_TRIES: usize = 100;
const GC_QUIET_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

/// Creates in flight between reading their template's layers and recording the sandbox that
/// stacks them. Image gc runs only on a reading of the sandboxes taken while none was (and
/// none began): otherwise a template rebuilt meanwhile could lose the old layers a create has
/// just chosen.
#[derive(Default)]
pub(super) struct LayerClaims {
    started: AtomicU64,
    in_flight: AtomicUsize,
}

/// One create's claim; released when dropped.
pub(super) struct LayerClaim<'a>(&'a LayerClaims);

impl LayerClaims {
    pub(super) fn claim(&self) -> LayerClaim<'_> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.started.fetch_add(1, Ordering::SeqCst);
        LayerClaim(self)
    }

    /// How many claims were ever made, when none is held now.
    fn quiet(&self) -> Option<u64> {
        let started = self.started.load(Ordering::SeqCst);
        (self.in_flight.load(Ordering::SeqCst) == 0).then_some(started)
    }
}

impl Drop for LayerClaim<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> Result<T, CoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CoreError::Conflict(format!("image task failed: {e}")))?
        .map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::LayerClaims;

    #[test]
    fn a_gc_reading_is_usable_only_with_no_claim_held_or_begun_meanwhile() {
        let claims = LayerClaims::default();
        let before = claims.quiet().expect("no claim yet");
        let claim = claims.claim();
        assert_eq!(
            claims.quiet(),
            None,
            "a create is between resolve and record"
        );
        drop(claim);
        let after = claims.quiet().expect("the create recorded its sandbox");
        assert_ne!(before, after, "a reading from before that create is stale");
        let (a, b) = (claims.claim(), claims.claim());
        drop(a);
        assert_eq!(claims.quiet(), None);
        drop(b);
        assert!(claims.quiet().is_some());
    }
}
