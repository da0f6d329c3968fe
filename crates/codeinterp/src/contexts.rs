//! Contexts: each is one kernel with its language and working directory. The default context of
//! a language is the one `run_code` uses when it names neither context nor context id.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use crate::kernel::{Kernel, KernelConfig, KernelError, Language};

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("Context {0} not found")]
    NotFound(String),
    #[error("unsupported language '{0}': this template has kernels for {1}")]
    UnsupportedLanguage(String, String),
    #[error("cwd '{0}' is not an existing directory")]
    BadCwd(String),
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

/// A context as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ContextInfo {
    pub id: String,
    pub language: String,
    pub cwd: String,
}

pub struct Context {
    pub id: String,
    pub language: Language,
    pub cwd: PathBuf,
    config: KernelConfig,
    /// The running kernel. Held across a start so that concurrent users wait for one kernel
    /// instead of starting several.
    kernel: tokio::sync::Mutex<Option<Arc<Kernel>>>,
    /// Held for the whole of an execution: a kernel runs one cell at a time, and the iopub
    /// output of interleaved cells could not be told apart by a client anyway.
    pub exec: tokio::sync::Mutex<()>,
    removed: AtomicBool,
}

impl Context {
    pub fn info(&self) -> ContextInfo {
        ContextInfo {
            id: self.id.clone(),
            language: self.language.name().into(),
            cwd: self.cwd.display().to_string(),
        }
    }

    /// The running kernel, starting a new one if there is none or the last one died.
    pub async fn kernel(&self) -> Result<Arc<Kernel>, KernelError> {
        let mut slot = self.kernel.lock().await;
        if let Some(k) = slot.as_ref().filter(|k| k.is_alive()) {
            return Ok(k.clone());
        }
        *slot = None;
        if self.removed.load(Ordering::SeqCst) {
            return Err(KernelError::Dead("the context was removed".into()));
        }
        let started = Instant::now();
        let k = Arc::new(Kernel::start(&self.config, self.language, &self.cwd).await?);
        tracing::info!(context = %self.id, language = self.language.name(), pid = k.pid(),
            ms = started.elapsed().as_millis() as u64, "kernel started");
        *slot = Some(k.clone());
        Ok(k)
    }

    /// Starts the kernel in the background, so that the next execution finds it ready.
    pub fn prestart(self: &Arc<Self>) {
        let ctx = self.clone();
        tokio::spawn(async move {
            if let Err(e) = ctx.kernel().await {
                tracing::warn!(context = %ctx.id, error = %e, "starting the kernel");
            }
        });
    }

    /// Kills the kernel (a running execution ends with an error) and starts a fresh one.
    pub async fn restart(&self) -> Result<(), KernelError> {
        let old = self.kernel.lock().await.take();
        if let Some(k) = old {
            k.kill();
        }
        self.kernel().await.map(drop)
    }

    /// Kills the kernel for good: the context was removed.
    fn kill(self: &Arc<Self>) {
        self.removed.store(true, Ordering::SeqCst);
        let ctx = self.clone();
        // Waits for a start in progress, so its kernel is killed too.
        tokio::spawn(async move {
            if let Some(k) = ctx.kernel.lock().await.take() {
                k.kill();
            }
        });
    }
}

pub struct Contexts {
    config: KernelConfig,
    default_cwd: PathBuf,
    map: Mutex<HashMap<String, Arc<Context>>>,
    defaults: Mutex<HashMap<Language, String>>,
}

impl Contexts {
    pub fn new(config: KernelConfig, default_cwd: PathBuf) -> Arc<Contexts> {
        Arc::new(Contexts {
            config,
            default_cwd,
            map: Mutex::default(),
            defaults: Mutex::default(),
        })
    }

    fn new_context(&self, language: Language, cwd: PathBuf) -> Arc<Context> {
        let ctx = Arc::new(Context {
            id: crate::wire::random_id(),
            language,
            cwd,
            config: self.config.clone(),
            kernel: tokio::sync::Mutex::new(None),
            exec: tokio::sync::Mutex::new(()),
            removed: AtomicBool::new(false),
        });
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ctx.id.clone(), ctx.clone());
        ctx
    }

    /// The language of a request (Python when it names none), if this template has its kernel.
    pub fn parse_language(&self, language: Option<&str>) -> Result<Language, ContextError> {
        let l = match language {
            None => return Ok(Language::Python),
            Some(l) if l.trim().is_empty() => return Ok(Language::Python),
            Some(l) => l,
        };
        match Language::parse(l) {
            Some(lang) if !lang.is_deno() || self.config.deno.is_some() => Ok(lang),
            _ => {
                let known = if self.config.deno.is_some() {
                    "python, bash, javascript (js) and typescript (ts)"
                } else {
                    "python and bash"
                };
                Err(ContextError::UnsupportedLanguage(l.into(), known.into()))
            }
        }
    }

    /// A new context with a started kernel.
    pub async fn create(
        &self,
        language: Option<&str>,
        cwd: Option<&str>,
    ) -> Result<Arc<Context>, ContextError> {
        let language = self.parse_language(language)?;
        let cwd = match cwd.filter(|c| !c.is_empty()) {
            Some(c) => PathBuf::from(c),
            None => self.default_cwd.clone(),
        };
        if !Path::new(&cwd).is_dir() {
            return Err(ContextError::BadCwd(cwd.display().to_string()));
        }
        let ctx = self.new_context(language, cwd);
        if let Err(e) = ctx.kernel().await {
            self.remove(&ctx.id);
            return Err(e.into());
        }
        Ok(ctx)
    }

    /// The default context of `language`, made (without waiting for its kernel) on first use.
    pub fn default_for(&self, language: Language) -> Arc<Context> {
        let mut defaults = self.defaults.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ctx) = defaults.get(&language).and_then(|id| self.get(id)) {
            return ctx;
        }
        let ctx = self.new_context(language, self.default_cwd.clone());
        defaults.insert(language, ctx.id.clone());
        ctx
    }

    pub fn get(&self, id: &str) -> Option<Arc<Context>> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    pub fn list(&self) -> Vec<ContextInfo> {
        let mut v: Vec<ContextInfo> = self
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|c| c.info())
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Forgets the context and kills its kernel. False if there is no such context.
    pub fn remove(&self, id: &str) -> bool {
        let removed = self
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        match removed {
            Some(ctx) => {
                self.defaults
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|_, v| v != id);
                ctx.kill();
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contexts(deno: Option<&str>) -> Arc<Contexts> {
        Contexts::new(
            KernelConfig {
                python: "/nonexistent/python".into(),
                runtime_dir: "/nonexistent".into(),
                env: vec![],
                deno: deno.map(PathBuf::from),
            },
            "/".into(),
        )
    }

    #[test]
    fn languages_by_their_sdk_names() {
        let c = contexts(Some("/opt/warren/deno/deno"));
        for (name, lang) in [
            (None, Language::Python),
            (Some(""), Language::Python),
            (Some("Python"), Language::Python),
            (Some("bash"), Language::Bash),
            (Some("js"), Language::JavaScript),
            (Some("javascript"), Language::JavaScript),
            (Some("ts"), Language::TypeScript),
            (Some("typescript"), Language::TypeScript),
        ] {
            assert_eq!(c.parse_language(name).unwrap(), lang, "{name:?}");
        }
        let e = c.parse_language(Some("cobol")).unwrap_err().to_string();
        assert_eq!(
            e,
            "unsupported language 'cobol': this template has kernels for python, bash, \
             javascript (js) and typescript (ts)"
        );
        // Without deno, JavaScript is as unknown as COBOL, and says what there is.
        let e = contexts(None).parse_language(Some("js")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unsupported language 'js': this template has kernels for python and bash"
        );
    }
}
