//! E2B's template build protocol (the e2b SDKs' `Template.build`) on top of Warren's template
//! builds: a build is requested by name (`POST /v3/templates`), the files of each COPY are
//! uploaded by content hash (`GET /templates/{id}/files/{hash}` hands out a one-use upload URL),
//! the definition is sent (`POST /v2/templates/{id}/builds/{build}`, translated by
//! [`crate::e2b_template`]) and the client polls the status with its log entries. The template
//! id is the template's name, so `Sandbox.create(name)` and `Sandbox.create(templateId)` both
//! work once it is ready.
//!
//! Uploaded files are kept per team (one team's upload never answers another's "present?") and
//! are untrusted: they become the build context, which the builder reads as a stream and never
//! unpacks on the host.

use super::builds::ContextFile;
use super::Warren;
use crate::auth::{random_hex, Principal};
use crate::dockerfile::{Instr, Step};
use crate::e2b_tags;
use crate::e2b_template::{self, E2bBase, E2bTemplateSpec};
use crate::error::CoreError;
use crate::image_templates::TemplateSource;
use crate::templates::TemplateSettings;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long an upload URL works.
const UPLOAD_TTL: Duration = Duration::from_secs(3600);
/// Uploaded files not used by a build for this long are removed (at the team's next request).
const UPLOAD_KEEP: Duration = Duration::from_secs(7 * 24 * 3600);
/// The resources a template may ask for its sandboxes.
const MAX_VCPUS: u32 = 64;
const MIN_MEMORY_MB: u64 = 128;
const MAX_MEMORY_MB: u64 = 256 * 1024;
/// Most log entries one status answer carries (the SDK keeps asking until it gets none).
const ENTRIES_PER_ANSWER: usize = 100;

#[derive(Default)]
pub(crate) struct E2bBuildState {
    /// By template name.
    builds: Mutex<HashMap<String, Arc<Mutex<E2bBuild>>>>,
    /// Upload URL tokens.
    uploads: Mutex<HashMap<String, Upload>>,
}

struct Upload {
    team: String,
    hash: String,
    expires: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
enum Phase {
    /// Requested; waiting for the definition.
    Waiting,
    /// Pulling the base image or preparing the context.
    Preparing,
    /// Warren's build job runs.
    Building,
    Ready,
    Failed,
}

/// Written to `<image store>/e2b-builds/` whenever it changes, so a restart keeps it (see
/// [`Warren::load_e2b_builds`]).
#[derive(Serialize, Deserialize)]
struct E2bBuild {
    /// The template (without a tag) the build is of.
    name: String,
    team: String,
    build_id: String,
    /// The Warren template the build makes (its first tag's), and those of its other tags.
    template: String,
    also_as: Vec<String>,
    phase: Phase,
    entries: Vec<E2bLogEntry>,
    /// Bytes of the build job's output already turned into entries.
    consumed: u64,
    /// An incomplete last line of that output.
    #[serde(default)]
    partial: String,
    /// E2B step name of each step of the build job (index 0 is the FROM).
    step_names: Vec<String>,
    failure: Option<E2bFailure>,
    /// The template's resources asked for by the build request (`cpuCount`, `memoryMB`).
    vcpus: Option<u32>,
    memory_mb: Option<u64>,
}

/// One log line as the SDK shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct E2bLogEntry {
    pub timestamp: DateTime<Utc>,
    /// `info` or `error`.
    pub level: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct E2bFailure {
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

/// A registered build: its template (the name without a tag), id and the tags it will give.
#[derive(Debug, Clone, PartialEq)]
pub struct E2bBuildRequested {
    pub template_id: String,
    pub build_id: String,
    pub tags: Vec<String>,
}

/// `TemplateBuildInfo`.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct E2bBuildStatus {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    /// `waiting`, `building`, `ready` or `error`.
    pub status: String,
    pub log_entries: Vec<E2bLogEntry>,
    pub logs: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<E2bFailure>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn valid_hash(h: &str) -> bool {
    h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit())
}

impl E2bBuild {
    fn log(&mut self, level: &str, message: impl Into<String>, step: Option<String>) {
        self.entries.push(E2bLogEntry {
            timestamp: Utc::now(),
            level: level.into(),
            message: message.into(),
            step,
        });
    }

    /// Turns the new output of its Warren build job into entries, and the job's end into the
    /// build's.
    fn advance(&mut self, job: &super::builds::BuildJob, template_id: &str) {
        self.consumed = job.log_end;
        let text = std::mem::take(&mut self.partial) + &job.log;
        let mut lines: Vec<&str> = text.split('\n').collect();
        let rest = lines.pop().unwrap_or("").to_string();
        let step = job.current.and_then(|i| self.step_names.get(i).cloned());
        for line in lines {
            self.log("info", line.to_string(), step.clone());
        }
        self.partial = rest;
        match job.status.as_str() {
            "ready" => {
                if !self.partial.is_empty() {
                    let last = std::mem::take(&mut self.partial);
                    self.log("info", last, None);
                }
                self.log("info", format!("Template {template_id} is ready"), None);
                self.phase = Phase::Ready;
            }
            "failed" => {
                let msg = job
                    .error
                    .clone()
                    .unwrap_or_else(|| "the build failed".into());
                self.fail(msg, step);
            }
            _ => {}
        }
    }

    fn fail(&mut self, message: String, step: Option<String>) {
        self.log("error", message.clone(), step.clone());
        self.phase = Phase::Failed;
        self.failure = Some(E2bFailure { message, step });
    }
}

/// Removes the uploads in `dir` that no build used for `keep` (a build touches the uploads it
/// uses), and upload temp files as old.
fn remove_unused_uploads(dir: &Path, keep: Duration) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > keep);
        if old {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Whether the upload `tar` (plain or gzip) holds `src` as a regular file.
fn upload_has_file(tar: &Path, src: &str) -> bool {
    let Ok(reader) = open_upload(tar) else {
        return false;
    };
    let mut ar = tar::Archive::new(reader);
    let Ok(entries) = ar.entries() else {
        return false;
    };
    entries.flatten().any(|e| {
        e.path()
            .map(|p| crate::dockerfile::normalize_source(&p.to_string_lossy()) == src)
            .unwrap_or(false)
            && e.header().entry_type() == tar::EntryType::Regular
    })
}

/// An uploaded tar, decompressed if the SDK gzipped it.
fn open_upload(path: &Path) -> std::io::Result<Box<dyn Read>> {
    let mut f = std::fs::File::open(path)?;
    let mut magic = [0u8; 2];
    let n = f.read(&mut magic)?;
    let f = std::fs::File::open(path)?;
    let f = std::io::BufReader::with_capacity(1 << 16, f);
    if n == 2 && magic == [0x1f, 0x8b] {
        Ok(Box::new(flate2::read::GzDecoder::new(f)))
    } else {
        Ok(Box::new(f))
    }
}

/// Writes the build context: every upload's entries under `<hash>/`, and returns their names.
fn assemble_context(out: &Path, uploads: &[(String, PathBuf)]) -> Result<Vec<String>, String> {
    let file = std::fs::File::create(out)
        .map_err(|e| format!("creating the build context {}: {e}", out.display()))?;
    let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
    for (hash, path) in uploads {
        let what = |e: std::io::Error| format!("the files uploaded for {hash}: {e}");
        let mut ar = tar::Archive::new(open_upload(path).map_err(what)?);
        for e in ar.entries().map_err(what)? {
            let mut e = e.map_err(what)?;
            let name = e.path().map_err(what)?.into_owned();
            let mut header = e.header().clone();
            let link = e.link_name().map_err(what)?.map(|l| l.into_owned());
            let new_name = Path::new(hash).join(&name);
            match link {
                // Hard links name another entry of the same upload: it moves with them.
                Some(target) if header.entry_type() == tar::EntryType::Link => {
                    builder
                        .append_link(&mut header, &new_name, Path::new(hash).join(target))
                        .map_err(what)?;
                }
                Some(target) => {
                    builder
                        .append_link(&mut header, &new_name, target)
                        .map_err(what)?;
                }
                None => {
                    builder
                        .append_data(&mut header, &new_name, &mut e)
                        .map_err(what)?;
                }
            }
        }
    }
    builder
        .into_inner()
        .and_then(|mut w| std::io::Write::flush(&mut w))
        .map_err(|e| format!("writing the build context: {e}"))?;
    crate::build_context::list(out).map_err(|e| e.to_string())
}

impl Warren {
    fn e2b_files_dir(&self, team: &str) -> Result<PathBuf, CoreError> {
        let team_dir: String = Sha256::digest(team.as_bytes())
            .iter()
            .take(12)
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(self
            .images()?
            .store()
            .root()
            .join("e2b-files")
            .join(team_dir))
    }

    fn e2b_build(
        &self,
        who: &Principal,
        template_id: &str,
    ) -> Result<Arc<Mutex<E2bBuild>>, CoreError> {
        lock(&self.e2b_builds.builds)
            .get(template_id)
            .filter(|b| lock(b).team == who.team)
            .cloned()
            .ok_or_else(|| {
                CoreError::NotFound(format!("template {template_id} has no build of yours"))
            })
    }

    /// `POST /v3/templates`: registers a build of template `reference` (`name` or `name:tag`)
    /// that gets the reference's tag and `tags` (see [`crate::e2b_tags`]), whose sandboxes get
    /// `vcpus` and `memory_mb` when given.
    pub fn e2b_request_build(
        &self,
        who: &Principal,
        reference: &str,
        tags: &[String],
        vcpus: Option<u32>,
        memory_mb: Option<u64>,
    ) -> Result<E2bBuildRequested, CoreError> {
        self.images()?;
        let (name, tags) =
            e2b_tags::build_tags(reference, tags).map_err(CoreError::InvalidArgument)?;
        let name = name.as_str();
        if let Some(n) = vcpus.filter(|n| !(1..=MAX_VCPUS).contains(n)) {
            return Err(CoreError::InvalidArgument(format!(
                "cpuCount {n}: give 1 to {MAX_VCPUS}"
            )));
        }
        if let Some(m) = memory_mb.filter(|m| !(MIN_MEMORY_MB..=MAX_MEMORY_MB).contains(m)) {
            return Err(CoreError::InvalidArgument(format!(
                "memoryMB {m}: give {MIN_MEMORY_MB} to {MAX_MEMORY_MB}"
            )));
        }
        warren_image::commit::validate_image_name(name)
            .map_err(|e| CoreError::InvalidArgument(format!("template name: {e}")))?;
        if !crate::templates::safe_name(name) {
            return Err(CoreError::InvalidArgument(format!(
                "invalid template name {name:?}: use letters, digits, '-', '_' and '.'"
            )));
        }
        if let Ok(dir) = self.e2b_files_dir(&who.team) {
            std::thread::spawn(move || remove_unused_uploads(&dir, UPLOAD_KEEP));
        }
        let mut builds = lock(&self.e2b_builds.builds);
        if let Some(b) = builds.get(name) {
            let b = lock(b);
            if matches!(b.phase, Phase::Preparing | Phase::Building) {
                return Err(CoreError::Conflict(format!(
                    "template {name} is being built"
                )));
            }
        }
        let build_id = random_hex(16);
        let mut templates = tags.iter().map(|t| e2b_tags::template_name(name, t));
        let template = templates.next().unwrap_or_else(|| name.to_string());
        let build = Arc::new(Mutex::new(E2bBuild {
            name: name.to_string(),
            team: who.team.clone(),
            build_id: build_id.clone(),
            template,
            also_as: templates.collect(),
            phase: Phase::Waiting,
            entries: Vec::new(),
            consumed: 0,
            partial: String::new(),
            step_names: Vec::new(),
            failure: None,
            vcpus,
            memory_mb,
        }));
        self.save_e2b_build(&lock(&build));
        builds.insert(name.to_string(), build);
        Ok(E2bBuildRequested {
            template_id: name.to_string(),
            build_id,
            tags,
        })
    }

    /// `GET /templates/{id}/files/{hash}`: whether the team already uploaded the files of
    /// `hash`, and a one-use upload token either way (the SDK re-uploads when told to force).
    pub fn e2b_file_upload(
        &self,
        who: &Principal,
        template_id: &str,
        hash: &str,
    ) -> Result<(bool, String), CoreError> {
        if !valid_hash(hash) {
            return Err(CoreError::InvalidArgument(format!(
                "{hash:?} is not a files hash (64 hex digits)"
            )));
        }
        self.e2b_build(who, template_id)?;
        let hash = hash.to_ascii_lowercase();
        let present = self.e2b_files_dir(&who.team)?.join(&hash).is_file();
        let token = random_hex(24);
        let mut uploads = lock(&self.e2b_builds.uploads);
        let now = Instant::now();
        uploads.retain(|_, u| u.expires > now);
        uploads.insert(
            token.clone(),
            Upload {
                team: who.team.clone(),
                hash,
                expires: now + UPLOAD_TTL,
            },
        );
        Ok((present, token))
    }

    /// Takes an upload token: where its upload goes (a temp file to write, and the final path
    /// to rename it to).
    pub fn e2b_take_upload(&self, token: &str) -> Result<(PathBuf, PathBuf), CoreError> {
        let up = lock(&self.e2b_builds.uploads)
            .remove(token)
            .filter(|u| u.expires > Instant::now())
            .ok_or_else(|| CoreError::NotFound("no such upload (or it expired)".into()))?;
        let dir = self.e2b_files_dir(&up.team)?;
        std::fs::create_dir_all(&dir)
            .map_err(|e| CoreError::Internal(format!("creating {}: {e}", dir.display())))?;
        Ok((
            dir.join(format!(".{}.{}", up.hash, random_hex(4))),
            dir.join(&up.hash),
        ))
    }

    /// `POST /v2/templates/{id}/builds/{build}`: checks and translates the definition and
    /// starts the build; the client follows it with [`Warren::e2b_build_status`].
    pub async fn e2b_start_build(
        self: &Arc<Self>,
        who: &Principal,
        template_id: &str,
        build_id: &str,
        spec: E2bTemplateSpec,
    ) -> Result<(), CoreError> {
        let build = self.e2b_build(who, template_id)?;
        let runner = self
            .builds
            .runner
            .get()
            .cloned()
            .ok_or_else(|| CoreError::Conflict("this daemon cannot run build steps".into()))?;
        let files = self.e2b_files_dir(&who.team)?;
        {
            let b = lock(&build);
            if b.build_id != build_id {
                return Err(CoreError::NotFound(format!(
                    "template {template_id} has no build {build_id}"
                )));
            }
            if b.phase != Phase::Waiting {
                return Err(CoreError::Conflict(format!(
                    "build {build_id} of {template_id} was already started"
                )));
            }
        }
        // Off the async workers: telling a copied file from a directory reads its upload.
        let f = files.clone();
        let translated = tokio::task::spawn_blocking(move || {
            e2b_template::translate(&spec, |hash, src| upload_has_file(&f.join(hash), src))
        })
        .await
        .map_err(|e| CoreError::Internal(format!("build task failed: {e}")))?
        .map_err(|e| CoreError::InvalidArgument(e.0))?;
        let mut uploads: Vec<(String, PathBuf)> = Vec::new();
        for h in &translated.file_hashes {
            let p = files.join(h);
            if !p.is_file() {
                return Err(CoreError::InvalidArgument(format!(
                    "the files of hash {h} were not uploaded (GET /templates/{template_id}/files/{h} gives the upload URL)"
                )));
            }
            if !uploads.iter().any(|(x, _)| x == h) {
                // Used now: kept for another UPLOAD_KEEP.
                let _ = std::fs::File::options()
                    .append(true)
                    .open(&p)
                    .and_then(|f| f.set_modified(std::time::SystemTime::now()));
                uploads.push((h.clone(), p));
            }
        }
        {
            let mut b = lock(&build);
            b.phase = Phase::Preparing;
            b.step_names = std::iter::once("base".to_string())
                .chain(translated.step_names.iter().cloned())
                .collect();
            b.log(
                "info",
                format!(
                    "Building template {template_id} ({} steps)",
                    translated.steps.len()
                ),
                None,
            );
            self.save_e2b_build(&b);
        }
        let me = self.clone();
        let who = who.clone();
        tokio::spawn(async move {
            if let Err(e) = me.e2b_run(&who, translated, uploads, &build, runner).await {
                me.e2b_fail(&build, e.to_string(), None);
            }
        });
        Ok(())
    }

    async fn e2b_run(
        self: &Arc<Self>,
        who: &Principal,
        translated: e2b_template::Translated,
        uploads: Vec<(String, PathBuf)>,
        build: &Arc<Mutex<E2bBuild>>,
        runner: Arc<dyn super::builds::StepRunner>,
    ) -> Result<(), CoreError> {
        let base = match &translated.base {
            E2bBase::Template(t) => {
                if self.templates.resolve(t).is_err() {
                    let msg = format!("base template {t} does not exist");
                    self.e2b_fail(build, msg, Some("base".into()));
                    return Ok(());
                }
                t.clone()
            }
            E2bBase::Image {
                reference,
                credentials,
            } => {
                let creds = credentials.clone().map(|(username, password)| {
                    warren_image::pull::Credentials { username, password }
                });
                match self.e2b_base_image(reference, creds, build).await {
                    Some(t) => t,
                    None => return Ok(()),
                }
            }
        };
        let ctx_path = self.build_context_path()?;
        let context = ContextFile(Some(ctx_path.clone()));
        let names = tokio::task::spawn_blocking(move || assemble_context(&ctx_path, &uploads))
            .await
            .map_err(|e| CoreError::Internal(format!("build task failed: {e}")))?
            .map_err(CoreError::InvalidArgument)?;
        let base_name = base.clone();
        let mut steps = vec![Step {
            line: 0,
            text: format!("FROM {base}"),
            instr: Instr::From(base),
        }];
        // A new start command brings its own readiness; without one, the base's stays. The
        // build request's resources, else the base's.
        let inherited = self.templates.settings(&base_name);
        let new_start = translated
            .steps
            .iter()
            .any(|s| matches!(s.instr, Instr::Cmd(_)));
        let (vcpus, memory_mb, template, also_as) = {
            let b = lock(build);
            (b.vcpus, b.memory_mb, b.template.clone(), b.also_as.clone())
        };
        let settings = TemplateSettings {
            ready_port: if new_start {
                translated.ready_port
            } else {
                inherited.ready_port
            },
            ready_cmd: if new_start {
                translated.ready_cmd.clone()
            } else {
                inherited.ready_cmd
            },
            vcpus: vcpus.or(inherited.vcpus),
            memory_mb: memory_mb.or(inherited.memory_mb),
        };
        steps.extend(translated.steps);
        self.start_steps(
            who,
            &template,
            steps,
            context,
            names,
            runner,
            Some(settings),
            also_as,
        )
        .await?;
        let mut b = lock(build);
        b.phase = Phase::Building;
        self.save_e2b_build(&b);
        Ok(())
    }

    fn e2b_fail(&self, build: &Mutex<E2bBuild>, message: String, step: Option<String>) {
        let mut b = lock(build);
        b.fail(message, step);
        self.save_e2b_build(&b);
    }

    fn e2b_builds_dir(&self) -> Option<PathBuf> {
        Some(self.images().ok()?.store().root().join("e2b-builds"))
    }

    /// Writes the build's record next to the image store. Best effort, as for Warren's own
    /// build records: a build does not fail because its record could not be written.
    fn save_e2b_build(&self, b: &E2bBuild) {
        if let Some(dir) = self.e2b_builds_dir() {
            super::builds::save_record(&dir, &b.name, b, "E2B build");
        }
    }

    /// After a restart (and [`Warren::load_build_jobs`]): the E2B builds of the last run. One
    /// whose Warren build job had ended takes its end; one still running, or not yet started,
    /// when the daemon stopped is failed, saying so.
    pub fn load_e2b_builds(&self) -> usize {
        let Some(dir) = self.e2b_builds_dir() else {
            return 0;
        };
        let mut n = 0;
        for mut b in super::builds::load_records::<E2bBuild>(&dir, "E2B build") {
            if b.phase == Phase::Building {
                if let Ok(job) = self.build_job(&b.template.clone(), b.consumed) {
                    let name = b.name.clone();
                    b.advance(&job, &name);
                }
            }
            if matches!(b.phase, Phase::Waiting | Phase::Preparing | Phase::Building) {
                b.fail(
                    "the daemon stopped during this build; build it again (finished steps come from the cache)".into(),
                    None,
                );
            }
            self.save_e2b_build(&b);
            lock(&self.e2b_builds.builds).insert(b.name.clone(), Arc::new(Mutex::new(b)));
            n += 1;
        }
        n
    }

    /// The image template a build from `reference` runs on: one per image digest, so every
    /// build checks the registry (its credentials, and whether the tag moved) and reuses an
    /// earlier pull of the same image. An image of the local store needs no registry. `None`
    /// when it failed (the build says why).
    async fn e2b_base_image(
        self: &Arc<Self>,
        reference: &str,
        creds: Option<warren_image::pull::Credentials>,
        build: &Arc<Mutex<E2bBuild>>,
    ) -> Option<String> {
        let base = Some("base".to_string());
        let local = self
            .images()
            .ok()
            .and_then(|c| c.store().resolve(reference).ok())
            .map(|img| img.manifest_digest);
        let digest = match local {
            Some(d) => d,
            None => match warren_image::pull::resolve_digest(reference, creds.as_ref()).await {
                Ok(d) => d,
                Err(e) => {
                    self.e2b_fail(build, format!("image {reference}: {e}"), base);
                    return None;
                }
            },
        };
        let t = image_template_name(reference, &digest);
        if self.template(&t).is_err() {
            lock(build).log("info", format!("Pulling image {reference}"), base.clone());
            let source = TemplateSource::Image {
                reference: reference.to_string(),
            };
            if let Err(e) = self.create_template(&t, source, creds) {
                self.e2b_fail(build, format!("pulling {reference}: {e}"), base);
                return None;
            }
        }
        loop {
            match self.template(&t) {
                Ok(v) if v.status == "ready" => return Some(t),
                Ok(v) if v.status == "building" => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Ok(v) => {
                    let why = v.build.and_then(|b| b.error).unwrap_or(v.status);
                    self.e2b_fail(build, format!("pulling {reference}: {why}"), base);
                    return None;
                }
                Err(e) => {
                    self.e2b_fail(build, format!("pulling {reference}: {e}"), base);
                    return None;
                }
            }
        }
    }

    /// `GET /templates/{id}/builds/{build}/status`: the build's state and its log entries from
    /// `logs_offset` on (at most 100).
    pub fn e2b_build_status(
        &self,
        who: &Principal,
        template_id: &str,
        build_id: &str,
        logs_offset: usize,
    ) -> Result<E2bBuildStatus, CoreError> {
        let build = self.e2b_build(who, template_id)?;
        let mut b = lock(&build);
        if b.build_id != build_id {
            return Err(CoreError::NotFound(format!(
                "template {template_id} has no build {build_id}"
            )));
        }
        if b.phase == Phase::Building {
            if let Ok(job) = self.build_job(&b.template.clone(), b.consumed) {
                let seen = (b.entries.len(), b.phase);
                b.advance(&job, template_id);
                if (b.entries.len(), b.phase) != seen {
                    self.save_e2b_build(&b);
                }
            }
        }
        let status = match b.phase {
            Phase::Waiting => "waiting",
            Phase::Preparing | Phase::Building => "building",
            Phase::Ready => "ready",
            Phase::Failed => "error",
        };
        let entries: Vec<E2bLogEntry> = b
            .entries
            .iter()
            .skip(logs_offset)
            .take(ENTRIES_PER_ANSWER)
            .cloned()
            .collect();
        Ok(E2bBuildStatus {
            template_id: template_id.to_string(),
            build_id: build_id.to_string(),
            status: status.into(),
            logs: entries.iter().map(|e| e.message.clone()).collect(),
            log_entries: entries,
            reason: b.failure.clone(),
        })
    }
}

/// One tag of a template (`TemplateTag`).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct E2bTag {
    pub tag: String,
    /// The same for every tag of one image (see [`e2b_tags::build_id_of_digest`]).
    #[serde(rename = "buildID")]
    pub build_id: String,
    pub created_at: DateTime<Utc>,
}

fn checked_tags(tags: &[String]) -> Result<(), CoreError> {
    if tags.is_empty() {
        return Err(CoreError::InvalidArgument("tags: give at least one".into()));
    }
    tags.iter()
        .try_for_each(|t| e2b_tags::check_tag(t))
        .map_err(CoreError::InvalidArgument)
}

impl Warren {
    /// `POST /templates/tags`: the build `target` (`name:tag`, or `name` for its default tag)
    /// gets `tags` too, taking them from other builds that had them. Returns its build id.
    pub async fn e2b_assign_tags(
        &self,
        target: &str,
        tags: &[String],
    ) -> Result<String, CoreError> {
        checked_tags(tags)?;
        let (name, _) = e2b_tags::split(target);
        let source = e2b_tags::canonical(target);
        let t = self
            .templates
            .images
            .get(source)
            .ok_or_else(|| CoreError::NotFound(format!("template {target} not found")))?;
        for tag in tags {
            self.tag_template(source, &e2b_tags::template_name(name, tag))
                .await?;
        }
        Ok(e2b_tags::build_id_of_digest(
            t.manifest_digest.as_deref().unwrap_or_default(),
        ))
    }

    /// `DELETE /templates/tags`: removes `tags` of template `name`. Sandboxes running on a
    /// removed tag keep running; a pool that makes members of one refuses.
    pub async fn e2b_remove_tags(&self, name: &str, tags: &[String]) -> Result<(), CoreError> {
        checked_tags(tags)?;
        let name = e2b_tags::split(name).0;
        for tag in tags {
            let template = e2b_tags::template_name(name, tag);
            if self.templates.images.get(&template).is_none() {
                return Err(CoreError::NotFound(format!(
                    "template {name} has no tag {tag}"
                )));
            }
        }
        for tag in tags {
            self.delete_template(&e2b_tags::template_name(name, tag))
                .await?;
        }
        Ok(())
    }

    /// `GET /templates/{id}/tags`: the tags of template `name`, by tag.
    pub fn e2b_template_tags(&self, name: &str) -> Result<Vec<E2bTag>, CoreError> {
        let name = e2b_tags::split(name).0;
        let ready = self
            .templates
            .images
            .ready
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let tags: Vec<E2bTag> = e2b_tags::tags_of(name, ready.keys().map(String::as_str))
            .into_iter()
            .filter_map(|(tag, template)| {
                let t = ready.get(&template)?;
                Some(E2bTag {
                    tag,
                    build_id: e2b_tags::build_id_of_digest(
                        t.manifest_digest.as_deref().unwrap_or_default(),
                    ),
                    created_at: t.created_at,
                })
            })
            .collect();
        if tags.is_empty() {
            return Err(CoreError::NotFound(format!(
                "template {name} has no tags (only built, imported or committed templates have them)"
            )));
        }
        Ok(tags)
    }
}

/// The image template of image `reference` at `digest`.
pub fn image_template_name(reference: &str, digest: &str) -> String {
    let safe: String = reference
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(80)
        .collect();
    let h: String = digest
        .trim_start_matches("sha256:")
        .chars()
        .take(16)
        .collect();
    format!("e2b-image-{safe}-{h}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_context_holds_each_upload_under_its_hash() {
        let dir = tempfile::tempdir().unwrap();
        let up = dir.path().join("up.tar.gz");
        {
            let gz = flate2::write::GzEncoder::new(
                std::fs::File::create(&up).unwrap(),
                flate2::Compression::fast(),
            );
            let mut b = tar::Builder::new(gz);
            let mut h = tar::Header::new_gnu();
            h.set_size(5);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, "conf/a.txt", &b"hello"[..]).unwrap();
            b.into_inner().unwrap().finish().unwrap();
        }
        assert!(upload_has_file(&up, "conf/a.txt"));
        assert!(!upload_has_file(&up, "conf"));
        let out = dir.path().join("ctx.tar");
        let hash = "b".repeat(64);
        let names = assemble_context(&out, &[(hash.clone(), up)]).unwrap();
        assert_eq!(names, vec![format!("{hash}/conf/a.txt")]);
    }

    #[test]
    fn unused_uploads_go_and_recent_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (dir.path().join("old"), dir.path().join("new"));
        std::fs::write(&old, b"x").unwrap();
        std::fs::write(&new, b"x").unwrap();
        let long_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options()
            .append(true)
            .open(&old)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
        remove_unused_uploads(dir.path(), Duration::from_secs(60));
        assert!(!old.exists() && new.exists());
    }

    #[test]
    fn image_template_names_are_valid_and_distinct() {
        let a = image_template_name("docker.io/library/python:3.11", "sha256:0123456789abcdef0");
        let b = image_template_name("docker.io/library/python:3.11", "sha256:1123456789abcdef0");
        assert_ne!(a, b);
        assert!(crate::templates::safe_name(&a), "{a}");
    }
}
