//! Template registry: maps a template name (the API's `templateID`) to the root filesystem of its
//! sandboxes.
//!
//! Two sources: templates registered by the daemon at start (`base`, prepared by the runtime), and
//! directories of an optional templates dir, looked up on each create so that an operator can add
//! a template without restarting: `<dir>/<name>/rootfs` is a template with that single read-only
//! layer and no bind mounts.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::RwLock;
use warren_runtime::RootfsSpec;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TemplateError {
    #[error("template '{0}' not found")]
    NotFound(String),
}

#[derive(Default)]
pub struct TemplateRegistry {
    registered: RwLock<HashMap<String, RootfsSpec>>,
    dir: Option<PathBuf>,
}

impl TemplateRegistry {
    pub fn new(dir: Option<PathBuf>) -> Self {
        TemplateRegistry {
            registered: RwLock::default(),
            dir,
        }
    }

    pub fn register(&self, name: impl Into<String>, spec: RootfsSpec) {
        self.registered
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.into(), spec);
    }

    pub fn resolve(&self, name: &str) -> Result<RootfsSpec, TemplateError> {
        if let Some(spec) = self
            .registered
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return Ok(spec.clone());
        }
        // The name becomes a path component: refuse anything that could leave the dir.
        let safe = !name.is_empty()
            && name != "."
            && name != ".."
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if let (true, Some(dir)) = (safe, &self.dir) {
            let rootfs = dir.join(name).join("rootfs");
            if rootfs.is_dir() {
                return Ok(RootfsSpec {
                    lower_dirs: vec![rootfs],
                    ro_binds: vec![],
                });
            }
        }
        Err(TemplateError::NotFound(name.to_string()))
    }

    /// Names of all templates currently available, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .registered
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        if let Some(Ok(entries)) = self.dir.as_ref().map(std::fs::read_dir) {
            for e in entries.flatten() {
                if e.path().join("rootfs").is_dir() {
                    if let Some(n) = e.file_name().to_str() {
                        names.push(n.to_string());
                    }
                }
            }
        }
        names.sort();
        names.dedup();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_dir_and_unknown() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("py/rootfs")).unwrap();
        std::fs::create_dir_all(dir.path().join("norootfs")).unwrap();
        let reg = TemplateRegistry::new(Some(dir.path().into()));
        let base = RootfsSpec {
            lower_dirs: vec!["/b".into()],
            ro_binds: vec![],
        };
        reg.register("base", base.clone());
        assert_eq!(reg.resolve("base").unwrap(), base);
        assert_eq!(
            reg.resolve("py").unwrap().lower_dirs,
            vec![dir.path().join("py/rootfs")]
        );
        for bad in ["nope", "norootfs", "..", "../py", "", "py/rootfs"] {
            assert_eq!(
                reg.resolve(bad),
                Err(TemplateError::NotFound(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(reg.names(), vec!["base".to_string(), "py".to_string()]);
    }
}
