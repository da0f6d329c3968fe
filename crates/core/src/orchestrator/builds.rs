//! Template builds from a Dockerfile subset (see [`crate::dockerfile`]), run by the daemon as one
//! background job per template: `POST /warren/v1/templates/{name}/build` starts it, `GET` on the
//! same path follows it (step, cache hits, the RUN output), and the CLI only uploads and shows.
//!
//! Each `RUN`, `COPY` and `WORKDIR` runs in a fresh sandbox of the previous step's image (fresh,
//! so the committed layer holds exactly that step's changes), is committed as one layer (the
//! sandbox commit path: pre-copy, short freeze, staged tar) and killed. `ENV`, `WORKDIR` and
//! `USER` go into every later step's image config, so each step image is a complete image; `CMD`
//! and `ENTRYPOINT` only into the result, so that step sandboxes do not start the command. RUN
//! runs as root unless the file says `USER` (Docker's rule for a `FROM` without `User`).
//!
//! Cache: a step's key is the previous image's digest (or `template:<name>` for a built-in
//! `FROM`), the instruction, the ENV/WORKDIR/USER so far and, for COPY, the hash of the copied
//! content. A step whose key names an image template (`warren-build/cache:<key>`) whose image is
//! still in the store is taken as is. The result is a new manifest over the last step's layers
//! with the final config (no empty layer), named NAME: an image and an image template, exactly
//! like a commit's.

use super::Warren;
use crate::auth::Principal;
use crate::build_context;
use crate::dockerfile::{self, Instr, Step};
use crate::error::CoreError;
use crate::orchestrator::CreateRequest;
use crate::templates::TemplateSettings;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;
use warren_image::commit::{Base, ConfigPatch};

/// How much RUN output a build keeps (the tail).
const LOG_KEEP: usize = 256 * 1024;

/// A command for a step sandbox's envd.
#[derive(Debug, Clone, PartialEq)]
pub struct StepCommand {
    /// A command line for `/bin/sh -c`.
    pub cmd: String,
    pub user: String,
    pub cwd: Option<String>,
    pub env: BTreeMap<String, String>,
}

/// Where a step's output goes (a type of its own: `async_trait` would otherwise name the slice's
/// lifetime and the callback could not take any slice).
pub type StepOutput = dyn Fn(&[u8]) + Send + Sync;

/// Runs commands in, and uploads files to, a sandbox's envd (implemented over HTTP by the edge
/// that owns the HTTP stack; the orchestrator decides what runs).
#[async_trait::async_trait]
pub trait StepRunner: Send + Sync + 'static {
    /// Runs `cmd` to its end, passing its stdout and stderr to `output`; returns its exit code.
    async fn run(
        &self,
        envd: SocketAddr,
        token: &str,
        cmd: &StepCommand,
        output: &StepOutput,
    ) -> Result<i32, String>;

    /// Writes `data` to `path` in the sandbox, as root.
    async fn upload(
        &self,
        envd: SocketAddr,
        token: &str,
        path: &str,
        data: Vec<u8>,
    ) -> Result<(), String>;
}

/// One step as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StepView {
    pub line: usize,
    pub instruction: String,
    /// `pending`, `running`, `done`, `cached`, `failed`; `config` for steps that only change
    /// the image config.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<f64>,
}

/// A build job, as `GET /warren/v1/templates/{name}/build` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildJob {
    pub name: String,
    /// `building`, `ready` or `failed`.
    pub status: String,
    pub steps: Vec<StepView>,
    /// Index into `steps` of the step running (or that failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current: Option<usize>,
    pub cache_hits: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub started_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// The RUN output from byte `log_start` of the whole output (older bytes are dropped).
    pub log: String,
    pub log_start: u64,
    /// Bytes of output so far: a client that has seen up to here asks `?logFrom=` this.
    pub log_end: u64,
    #[serde(skip)]
    log_bytes: Vec<u8>,
}

/// Where a build's record is kept, so that its outcome outlives a daemon restart.
fn job_file(dir: &std::path::Path, name: &str) -> PathBuf {
    let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
    dir.join(format!("{hex}.json"))
}

/// Writes `value` as the record of `name` in `dir`, through a temp file renamed into place. Best
/// effort: a build does not fail because its `what` record could not be written.
pub(super) fn save_record(dir: &std::path::Path, name: &str, value: &impl Serialize, what: &str) {
    let path = job_file(dir, name);
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(value)?)?;
        std::fs::rename(&tmp, &path)
    };
    if let Err(e) = write() {
        tracing::warn!(template = %name, path = %path.display(), error = %e, "saving the {what} record");
    }
}

/// The records [`save_record`] wrote in `dir`; unreadable ones are skipped with a warning.
pub(super) fn load_records<T: serde::de::DeserializeOwned>(
    dir: &std::path::Path,
    what: &str,
) -> Vec<T> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        match std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<T>(&b).ok())
        {
            Some(record) => out.push(record),
            None => tracing::warn!(path = %path.display(), "unreadable {what} record skipped"),
        }
    }
    out
}

impl BuildJob {
    /// The job with only the output from byte `from` on.
    pub fn view(&self, log_from: u64) -> BuildJob {
        let mut v = self.clone();
        let skip = log_from.saturating_sub(self.log_start) as usize;
        let tail = self
            .log_bytes
            .get(skip.min(self.log_bytes.len())..)
            .unwrap_or(&[]);
        v.log = String::from_utf8_lossy(tail).into_owned();
        v.log_start = self.log_start.max(log_from.min(self.log_end));
        v.log_bytes = Vec::new();
        v
    }

    /// Records how the build ended.
    fn finish(&mut self, res: Result<String, CoreError>, began: Instant) {
        let (name, j) = (self.name.clone(), self);
        match res {
            Ok(digest) => {
                tracing::info!(template = %name, digest = %digest, cache_hits = j.cache_hits, secs = began.elapsed().as_secs_f64(), "template built");
                j.status = "ready".into();
                j.digest = Some(digest);
                j.current = None;
            }
            Err(e) => {
                tracing::warn!(template = %name, error = %e, "template build failed");
                j.status = "failed".into();
                j.error = Some(e.to_string());
                if let Some(s) = j.current.and_then(|i| j.steps.get_mut(i)) {
                    s.status = "failed".into();
                }
            }
        }
    }

    fn append_log(&mut self, data: &[u8]) {
        self.log_bytes.extend_from_slice(data);
        self.log_end += data.len() as u64;
        if self.log_bytes.len() > LOG_KEEP {
            let drop = self.log_bytes.len() - LOG_KEEP;
            self.log_bytes.drain(..drop);
            self.log_start += drop as u64;
        }
    }
}

/// The orchestrator's build jobs.
#[derive(Default)]
pub struct BuildState {
    jobs: Mutex<HashMap<String, Arc<Mutex<BuildJob>>>>,
    pub(crate) runner: OnceLock<Arc<dyn StepRunner>>,
    /// When each cache image was last taken by a build (since the daemon started).
    cache_hits: Mutex<HashMap<String, DateTime<Utc>>>,
}

/// A build cache image neither made nor taken for this long is removed (when no build runs).
const CACHE_KEEP: chrono::TimeDelta = chrono::TimeDelta::days(7);
/// The name prefix of build cache images.
const CACHE_PREFIX: &str = "warren-build/cache:";

/// The cache images (name, made at) neither made nor taken (`hits`) within `keep` of `now`.
fn stale_cache_images(
    made: &[(String, DateTime<Utc>)],
    hits: &HashMap<String, DateTime<Utc>>,
    now: DateTime<Utc>,
    keep: chrono::TimeDelta,
) -> Vec<String> {
    made.iter()
        .filter(|(name, at)| {
            let used = hits.get(name).copied().unwrap_or(*at).max(*at);
            now - used > keep
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// Removes the uploaded context when the build ends, however it ends.
pub(crate) struct ContextFile(pub(crate) Option<PathBuf>);

impl Drop for ContextFile {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn lock(job: &Mutex<BuildJob>) -> std::sync::MutexGuard<'_, BuildJob> {
    job.lock().unwrap_or_else(|e| e.into_inner())
}

fn bad(e: impl std::fmt::Display) -> CoreError {
    CoreError::InvalidArgument(e.to_string())
}

/// What the build carries from step to step.
struct Cursor {
    /// The template the next step's sandbox starts from.
    template: String,
    /// Cache-key identity of the current image.
    parent: String,
    /// Manifest digest of the current image, once there is one.
    image: Option<String>,
    patch: ConfigPatch,
    env: BTreeMap<String, String>,
    workdir: Option<String>,
    user: Option<String>,
    cmd: Option<Vec<String>>,
    entrypoint: Option<Vec<String>>,
}

impl Cursor {
    fn key(&self, text: &str, extra: &str) -> String {
        let k = serde_json::json!([self.parent, text, extra, self.patch]).to_string();
        format!("{:x}", Sha256::digest(k.as_bytes()))
    }

    fn command(&self, cmd: String) -> StepCommand {
        StepCommand {
            cmd,
            user: self.user.clone().unwrap_or_else(|| "root".into()),
            cwd: self.workdir.clone(),
            env: self.env.clone(),
        }
    }
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Warren {
    pub fn set_step_runner(&self, runner: Arc<dyn StepRunner>) {
        let _ = self.builds.runner.set(runner);
    }

    /// A fresh path where the edge may write an uploaded build context (in the image store's
    /// temp dir, emptied at each start).
    pub fn build_context_path(&self) -> Result<PathBuf, CoreError> {
        Ok(self.images()?.store().temp_path("build-context.tar"))
    }

    /// The build job of template `name`, with its output from byte `log_from` on.
    pub fn build_job(&self, name: &str, log_from: u64) -> Result<BuildJob, CoreError> {
        let jobs = self.builds.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.get(name)
            .map(|j| lock(j).view(log_from))
            .ok_or_else(|| CoreError::NotFound(format!("no build of template {name}")))
    }

    /// Starts building template `name` from `dockerfile` (or, if `None`, the file
    /// `dockerfile_path` of the context), with COPY sources from the `context` tar (which the
    /// build removes when it ends). Checks everything it can before answering: the file, the
    /// FROM template, the COPY sources, the name.
    pub async fn start_build(
        self: &Arc<Self>,
        who: &Principal,
        name: &str,
        dockerfile: Option<String>,
        dockerfile_path: &str,
        context: Option<PathBuf>,
    ) -> Result<BuildJob, CoreError> {
        let context = ContextFile(context);
        let runner = self
            .builds
            .runner
            .get()
            .cloned()
            .ok_or_else(|| CoreError::Conflict("this daemon cannot run build steps".into()))?;
        warren_image::commit::validate_image_name(name)
            .map_err(|e| CoreError::InvalidArgument(format!("template name: {e}")))?;
        if name.starts_with("warren-build/") {
            return Err(CoreError::InvalidArgument(
                "template names under warren-build/ are the build cache's".into(),
            ));
        }
        self.images()?;
        let ctx = context.0.clone();
        let dp = dockerfile_path.to_string();
        let (text, names) = tokio::task::spawn_blocking(move || {
            let names = match &ctx {
                Some(c) => build_context::list(c)?,
                None => Vec::new(),
            };
            let text = match (dockerfile, &ctx) {
                (Some(t), _) => t,
                (None, Some(c)) => build_context::read_dockerfile(c, &dp)?,
                (None, None) => return Err(build_context::ContextError::NoDockerfile(dp)),
            };
            Ok((text, names))
        })
        .await
        .map_err(|e| CoreError::Conflict(format!("build task failed: {e}")))?
        .map_err(bad)?;
        let steps = dockerfile::parse(&text).map_err(bad)?;
        self.start_steps(who, name, steps, context, names, runner, None, Vec::new())
            .await
    }

    /// Starts building template `name` from parsed `steps` (the first one a `FROM`), with COPY
    /// sources from `context`, whose entries are `names`. Checks the FROM template, the COPY
    /// sources and the names before answering. The result's settings (readiness, resources) are
    /// `settings`, or else its FROM template's. The result is also tagged as each of `also_as`
    /// (see [`Warren::tag_template`]) before the build counts as done.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn start_steps(
        self: &Arc<Self>,
        who: &Principal,
        name: &str,
        steps: Vec<Step>,
        context: ContextFile,
        names: Vec<String>,
        runner: Arc<dyn StepRunner>,
        settings: Option<TemplateSettings>,
        also_as: Vec<String>,
    ) -> Result<BuildJob, CoreError> {
        let Some(Instr::From(from)) = steps.first().map(|s| s.instr.clone()) else {
            return Err(CoreError::InvalidArgument(
                "the first instruction must be FROM".into(),
            ));
        };
        if self.templates.resolve(&from).is_err() {
            return Err(CoreError::NotFound(format!(
                "line {}: FROM {from}: no such template (create it first, e.g. `warren template create NAME --image REF`)",
                steps[0].line
            )));
        }
        for s in &steps {
            if let Instr::Copy(srcs, _) = &s.instr {
                if context.0.is_none() {
                    return Err(CoreError::InvalidArgument(format!(
                        "line {}: COPY needs a build context (upload the context as a tar)",
                        s.line
                    )));
                }
                if let Some(missing) = srcs.iter().find(|x| !build_context::has_source(&names, x)) {
                    return Err(CoreError::InvalidArgument(format!(
                        "line {}: COPY {missing}: not found in the build context",
                        s.line
                    )));
                }
            }
        }
        for n in std::iter::once(name).chain(also_as.iter().map(String::as_str)) {
            self.check_image_name_free(n).await?;
        }
        let job = {
            let mut jobs = self.builds.jobs.lock().unwrap_or_else(|e| e.into_inner());
            if jobs.get(name).is_some_and(|j| lock(j).status == "building") {
                return Err(CoreError::Conflict(format!(
                    "template {name} is being built"
                )));
            }
            let job = BuildJob {
                name: name.to_string(),
                status: "building".into(),
                steps: steps
                    .iter()
                    .map(|s| StepView {
                        line: s.line,
                        instruction: s.text.clone(),
                        status: "pending".into(),
                        digest: None,
                        duration_ms: None,
                    })
                    .collect(),
                current: None,
                cache_hits: 0,
                digest: None,
                error: None,
                started_at: self.clock.now(),
                finished_at: None,
                log: String::new(),
                log_start: 0,
                log_end: 0,
                log_bytes: Vec::new(),
            };
            let job = Arc::new(Mutex::new(job));
            jobs.insert(name.to_string(), job.clone());
            job
        };
        self.save_build_job(&lock(&job));
        let view = lock(&job).view(0);
        let me = self.clone();
        let (who, name) = (who.clone(), name.to_string());
        tokio::spawn(async move {
            let began = Instant::now();
            let mut res = me
                .run_build(&who, &name, &from, &steps, context, &job, runner, settings)
                .await;
            if res.is_ok() {
                for tag in &also_as {
                    if let Err(e) = me.tag_template(&name, tag).await {
                        res = Err(CoreError::Conflict(format!(
                            "tagging the result as {tag}: {e}"
                        )));
                        break;
                    }
                }
            }
            {
                let mut j = lock(&job);
                j.finished_at = Some(me.clock.now());
                j.finish(res, began);
                me.save_build_job(&j);
            }
            me.prune_build_cache().await;
        });
        Ok(view)
    }

    fn build_jobs_dir(&self) -> Option<PathBuf> {
        Some(self.images().ok()?.store().root().join("build-jobs"))
    }

    /// Writes the build's record (its last output included) next to the image store. Best
    /// effort: a build does not fail because its record could not be written.
    fn save_build_job(&self, job: &BuildJob) {
        if let Some(dir) = self.build_jobs_dir() {
            save_record(&dir, &job.name, &job.view(0), "build");
        }
    }

    /// After a restart: the builds of the last run, as they ended. One that was running when
    /// the daemon stopped is failed, saying so (its steps' cache survives: build it again).
    pub fn load_build_jobs(&self) -> usize {
        let Some(dir) = self.build_jobs_dir() else {
            return 0;
        };
        let mut jobs = self.builds.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        for mut job in load_records::<BuildJob>(&dir, "build") {
            job.log_bytes = std::mem::take(&mut job.log).into_bytes();
            if job.status == "building" {
                job.status = "failed".into();
                job.error = Some(
                    "the daemon stopped during this build; start it again (finished steps come from the cache)"
                        .into(),
                );
                job.finished_at = Some(self.clock.now());
                if let Some(s) = job.current.and_then(|i| job.steps.get_mut(i)) {
                    s.status = "failed".into();
                }
                self.save_build_job(&job);
            }
            jobs.insert(job.name.clone(), Arc::new(Mutex::new(job)));
            n += 1;
        }
        n
    }

    /// Removes build cache images that no build made or took for [`CACHE_KEEP`], when no build
    /// runs (a running build may be about to start its next step on one). Their layers go with
    /// them unless a template still uses them.
    pub async fn prune_build_cache(&self) {
        let building = {
            let jobs = self.builds.jobs.lock().unwrap_or_else(|e| e.into_inner());
            jobs.values().any(|j| lock(j).status == "building")
        };
        if building {
            return;
        }
        let made: Vec<(String, DateTime<Utc>)> = self
            .templates
            .names()
            .into_iter()
            .filter(|n| n.starts_with(CACHE_PREFIX))
            .filter_map(|n| Some((n.clone(), self.templates.images.get(&n)?.created_at)))
            .collect();
        let stale = {
            let hits = self
                .builds
                .cache_hits
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            stale_cache_images(&made, &hits, self.clock.now(), CACHE_KEEP)
        };
        for name in stale {
            match self.delete_template(&name).await {
                Ok(()) => {
                    tracing::info!(template = %name, "unused build cache image removed");
                    self.builds
                        .cache_hits
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&name);
                }
                Err(e) => {
                    tracing::warn!(template = %name, error = %e, "removing a build cache image failed")
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_build(
        &self,
        who: &Principal,
        name: &str,
        from: &str,
        steps: &[Step],
        context: ContextFile,
        job: &Arc<Mutex<BuildJob>>,
        runner: Arc<dyn StepRunner>,
        settings: Option<TemplateSettings>,
    ) -> Result<String, CoreError> {
        let committer = self.images()?;
        let from_image = self.templates.images.get(from);
        let mut cur = Cursor {
            template: from.to_string(),
            parent: from_image
                .as_ref()
                .and_then(|t| t.manifest_digest.clone())
                .unwrap_or_else(|| format!("template:{from}")),
            image: from_image.as_ref().and_then(|t| t.manifest_digest.clone()),
            patch: ConfigPatch::default(),
            env: BTreeMap::new(),
            workdir: from_image.as_ref().and_then(|t| t.workdir.clone()),
            user: None,
            cmd: None,
            entrypoint: None,
        };
        let settings = settings.unwrap_or_else(|| self.templates.settings(from));
        let fallback_start = self.templates.start_command(from);
        for (i, step) in steps.iter().enumerate() {
            let t0 = Instant::now();
            {
                let mut j = lock(job);
                j.current = Some(i);
                j.steps[i].status = "running".into();
                let line = format!("step {}/{}: {}\n", i + 1, steps.len(), step.text);
                j.append_log(line.as_bytes());
                // On disk at each step, so a crash leaves the step it was at.
                self.save_build_job(&j);
            }
            let outcome = match &step.instr {
                Instr::From(_) => "done",
                Instr::Env(pairs) => {
                    for (k, v) in pairs {
                        cur.env.insert(k.clone(), v.clone());
                        cur.patch.env.retain(|(pk, _)| pk != k);
                        cur.patch.env.push((k.clone(), v.clone()));
                    }
                    "config"
                }
                Instr::User(u) => {
                    cur.user = Some(u.clone());
                    cur.patch.user = Some(u.clone());
                    "config"
                }
                Instr::Cmd(c) => {
                    cur.cmd = Some(c.clone());
                    "config"
                }
                Instr::Entrypoint(e) => {
                    cur.entrypoint = Some(e.clone());
                    // Docker: an ENTRYPOINT resets a CMD set before it.
                    cur.cmd = None;
                    "config"
                }
                Instr::Workdir(w) => {
                    let dir = dockerfile::resolve_path(cur.workdir.as_deref(), w);
                    let mut command = cur.command(format!("mkdir -p {}", sh_quote(&dir)));
                    // The directory does not exist yet in the step's sandbox.
                    command.cwd = Some("/".into());
                    command.user = "root".into();
                    cur.patch.working_dir = Some(dir.clone());
                    let hit = self
                        .layer_step(who, job, step, &mut cur, "", &runner, |_| {
                            Ok((None, command))
                        })
                        .await?;
                    cur.workdir = Some(dir);
                    hit
                }
                Instr::Run(cmd) => {
                    let command = cur.command(cmd.clone());
                    self.layer_step(who, job, step, &mut cur, "", &runner, |_| {
                        Ok((None, command))
                    })
                    .await?
                }
                Instr::Copy(srcs, dst) => {
                    let ctx = context.0.clone().ok_or_else(|| {
                        CoreError::InvalidArgument("COPY needs a build context".into())
                    })?;
                    let s2 = srcs.clone();
                    let copied =
                        tokio::task::spawn_blocking(move || build_context::copy_tar(&ctx, &s2))
                            .await
                            .map_err(|e| CoreError::Conflict(format!("build task failed: {e}")))?
                            .map_err(bad)?;
                    let dst = dockerfile::resolve_path(cur.workdir.as_deref(), dst);
                    let staging = format!("/tmp/.warren-copy-{:08x}.tar", rand::random::<u32>());
                    let tarq = sh_quote(&staging);
                    let dq = sh_quote(&dst);
                    let script = match &copied.single_file {
                        // Docker's rule: one file copied to a path that is not a directory (and
                        // does not end in `/`) becomes that path.
                        Some(file) if !dst.ends_with('/') => format!(
                            "set -e; if [ -d {dq} ]; then tar -xf {tarq} -C {dq}; else \
                             mkdir -p \"$(dirname {dq})\"; t=$(mktemp -d); tar -xf {tarq} -C \"$t\"; \
                             mv \"$t\"/{} {dq}; rmdir \"$t\"; fi; rm -f {tarq}",
                            sh_quote(file)
                        ),
                        _ => format!("set -e; mkdir -p {dq}; tar -xf {tarq} -C {dq}; rm -f {tarq}"),
                    };
                    let (tar, hash) = (copied.bytes, copied.hash);
                    let mut command = cur.command(script);
                    command.user = "root".into();
                    command.cwd = Some("/".into());
                    self.layer_step(who, job, step, &mut cur, &hash, &runner, move |_| {
                        Ok((Some((staging, tar)), command))
                    })
                    .await?
                }
            };
            let mut j = lock(job);
            j.steps[i].status = outcome.into();
            j.steps[i].duration_ms = Some(t0.elapsed().as_secs_f64() * 1000.0);
            if outcome == "cached" {
                j.cache_hits += 1;
            }
            if matches!(outcome, "cached" | "done") && step.instr.makes_layer() {
                j.steps[i].digest = cur.image.clone();
            }
        }
        {
            let mut j = lock(job);
            j.current = None;
            j.append_log(format!("writing image {name}\n").as_bytes());
        }

        // The result: the last image's layers with the final config, named `name`.
        let mut patch = cur.patch.clone();
        patch.cmd = cur.cmd.clone();
        patch.entrypoint = cur.entrypoint.clone();
        if patch.entrypoint.is_some() && patch.cmd.is_none() {
            patch.cmd = None;
        }
        // Checked again: a sandbox of the old template may have started during the build.
        self.check_image_name_free(name).await?;
        let created_by = format!("warren template build {name}");
        let (digest, manifest_size) = match &cur.image {
            Some(d) => {
                let base = Base::Image(Box::new(committer.store().resolve(d)?));
                let (c2, n2, p2) = (committer.clone(), name.to_string(), patch.clone());
                let done = tokio::task::spawn_blocking(move || {
                    c2.derive_image(&base, &n2, &created_by, &p2)
                })
                .await
                .map_err(|e| CoreError::Conflict(format!("build task failed: {e}")))?
                .map_err(bad)?;
                (done.digest, done.manifest_size)
            }
            None => {
                // A built-in FROM and no layer step: its dirs become the image's layers, through
                // one commit of a sandbox of it (whose upper dir is all but empty).
                let id = self.step_sandbox(who, name, &cur.template).await?;
                let res = async {
                    let (staged, rec, _) = self.stage_sandbox(&committer, &id).await?;
                    let base = self.commit_base(&committer, &rec)?;
                    let (c2, n2) = (committer.clone(), name.to_string());
                    tokio::task::spawn_blocking(move || {
                        c2.finish_commit_with(staged, &base, &n2, &created_by, &patch)
                    })
                    .await
                    .map_err(|e| CoreError::Conflict(format!("build task failed: {e}")))?
                    .map_err(bad)
                }
                .await;
                self.kill_step_sandbox(who, &id).await;
                let done = res?;
                (done.digest, done.manifest_size)
            }
        };
        self.register_committed_template(
            &committer,
            name,
            &digest,
            manifest_size,
            fallback_start.clone(),
        )
        .await?;
        // Given, or inherited from FROM; kept with the template so that it survives restarts.
        if !settings.is_empty() {
            self.set_template_settings(name, settings).await?;
        }
        Ok(digest)
    }

    async fn step_sandbox(
        &self,
        who: &Principal,
        build: &str,
        template: &str,
    ) -> Result<String, CoreError> {
        let req = CreateRequest {
            template_id: template.to_string(),
            timeout_secs: Some(3600),
            metadata: [("warren.dev/build".to_string(), build.to_string())]
                .into_iter()
                .collect(),
            ..Default::default()
        };
        Ok(self.create(who, req).await?.id)
    }

    async fn kill_step_sandbox(&self, who: &Principal, id: &str) {
        if let Err(e) = self.kill(who, id).await {
            tracing::warn!(sandbox = %id, error = %e, "killing a build step's sandbox failed");
        }
    }

    /// Runs one layer step, unless its key is cached, and moves the cursor onto its image.
    /// `work` gives the file to upload first (if any) and the command to run. Returns `cached`
    /// or `done`.
    #[allow(clippy::too_many_arguments)]
    async fn layer_step(
        &self,
        who: &Principal,
        job: &Arc<Mutex<BuildJob>>,
        step: &Step,
        cur: &mut Cursor,
        extra: &str,
        runner: &Arc<dyn StepRunner>,
        work: impl FnOnce(&str) -> Result<(Option<(String, Vec<u8>)>, StepCommand), CoreError>,
    ) -> Result<&'static str, CoreError> {
        let committer = self.images()?;
        let key = cur.key(&step.text, extra);
        let image = format!("{CACHE_PREFIX}{}", &key[..40]);
        if let Some(t) = self.templates.images.get(&image) {
            if let Some(d) = t
                .manifest_digest
                .clone()
                .filter(|d| committer.store().resolve(d).is_ok())
            {
                self.builds
                    .cache_hits
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(image.clone(), self.clock.now());
                lock(job).append_log(format!(" ---> CACHED {}\n", short(&d)).as_bytes());
                cur.template = image;
                cur.parent = d.clone();
                cur.image = Some(d);
                return Ok("cached");
            }
        }
        let id = self.step_sandbox(who, &image, &cur.template).await?;
        let res = async {
            let rec = self
                .store
                .get(&id)
                .await?
                .ok_or_else(|| CoreError::NotFound(format!("sandbox {id} not found")))?;
            let addr = SocketAddr::from((
                rec.placement
                    .as_ref()
                    .map(|p| p.ip)
                    .ok_or_else(|| CoreError::Conflict(format!("sandbox {id} has no address")))?,
                warren_runtime::ENVD_PORT,
            ));
            let (upload, mut command) = work(&id)?;
            // envd runs commands as a user by name: a numeric `USER 1000` (or `app:grp`) is
            // named from the step's image, whose passwd an earlier RUN may have changed.
            command.user = crate::image_templates::default_user(
                Some(&command.user),
                &rec.spec.rootfs.lower_dirs,
            );
            if let Some((path, data)) = upload {
                runner
                    .upload(addr, &rec.envd_access_token, &path, data)
                    .await
                    .map_err(|e| {
                        CoreError::Conflict(format!("line {}: uploading: {e}", step.line))
                    })?;
            }
            let out = {
                let job = job.clone();
                move |b: &[u8]| lock(&job).append_log(b)
            };
            let code = runner
                .run(addr, &rec.envd_access_token, &command, &out)
                .await
                .map_err(|e| CoreError::Conflict(format!("line {}: {e}", step.line)))?;
            if code != 0 {
                let what = step.text.split_whitespace().next().unwrap_or("step");
                return Err(CoreError::InvalidArgument(format!(
                    "line {}: {} exited with code {code}",
                    step.line,
                    what.to_ascii_uppercase()
                )));
            }
            let (staged, rec, _) = self.stage_sandbox(&committer, &id).await?;
            let base = self.commit_base(&committer, &rec)?;
            let (c2, img, patch) = (committer.clone(), image.clone(), cur.patch.clone());
            let created_by = step.text.clone();
            let done = tokio::task::spawn_blocking(move || {
                c2.finish_commit_with(staged, &base, &img, &created_by, &patch)
            })
            .await
            .map_err(|e| CoreError::Conflict(format!("build task failed: {e}")))?
            .map_err(bad)?;
            self.register_committed_template(
                &committer,
                &image,
                &done.digest,
                done.manifest_size,
                self.templates.start_command(&cur.template),
            )
            .await?;
            let settings = self.templates.settings(&cur.template);
            if !settings.is_empty() {
                self.set_template_settings(&image, settings).await?;
            }
            Ok(done.digest)
        }
        .await;
        self.kill_step_sandbox(who, &id).await;
        let digest = res?;
        lock(job).append_log(format!(" ---> {}\n", short(&digest)).as_bytes());
        cur.template = image;
        cur.parent = digest.clone();
        cur.image = Some(digest);
        Ok("done")
    }
}

fn short(digest: &str) -> &str {
    &digest[..19.min(digest.len())]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_keeps_a_tail_and_views_from_an_offset() {
        let mut j = BuildJob {
            name: "t".into(),
            status: "building".into(),
            steps: vec![],
            current: None,
            cache_hits: 0,
            digest: None,
            error: None,
            started_at: Utc::now(),
            finished_at: None,
            log: String::new(),
            log_start: 0,
            log_end: 0,
            log_bytes: vec![],
        };
        j.append_log(b"hello ");
        j.append_log(b"world");
        assert_eq!(j.view(0).log, "hello world");
        assert_eq!(j.view(6).log, "world");
        assert_eq!(j.view(6).log_start, 6);
        assert_eq!(j.view(99).log, "");
        assert_eq!(j.view(99).log_end, 11);
        j.append_log(&vec![b'x'; LOG_KEEP]);
        let v = j.view(0);
        assert_eq!(v.log.len(), LOG_KEEP);
        assert_eq!(v.log_start, 11);
        assert_eq!(v.log_end, 11 + LOG_KEEP as u64);
    }

    #[test]
    fn cache_key_follows_parent_text_content_and_config() {
        let mut c = Cursor {
            template: "base".into(),
            parent: "template:base".into(),
            image: None,
            patch: ConfigPatch::default(),
            env: BTreeMap::new(),
            workdir: None,
            user: None,
            cmd: None,
            entrypoint: None,
        };
        let k = c.key("RUN a", "");
        assert_eq!(k, c.key("RUN a", ""));
        assert_ne!(k, c.key("RUN b", ""));
        assert_ne!(k, c.key("RUN a", "hash"));
        c.patch.env.push(("A".into(), "1".into()));
        assert_ne!(k, c.key("RUN a", ""));
    }
}
