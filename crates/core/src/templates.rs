//! Template registry: maps a template name (the API's `templateID`) to the root filesystem of its
//! sandboxes.
//!
//! Two sources: templates registered by the daemon at start (`base`, prepared by the runtime), and
//! directories of an optional templates dir, looked up on each create so that an operator can add
//! a template without restarting: `<dir>/<name>/rootfs` is a template with that single read-only
//! layer and no bind mounts, and the optional file `<dir>/<name>/start_command` holds its start
//! command (see [`warren_runtime::EnvdSettings::start_command`]). Templates made from OCI images
//! ([`crate::image_templates`]) are a third source, created and deleted through the API.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::RwLock;
use warren_runtime::{Resources, RootfsSpec};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TemplateError {
    #[error("template '{0}' not found")]
    NotFound(String),
}

#[derive(Default)]
pub struct TemplateRegistry {
    registered: RwLock<HashMap<String, RootfsSpec>>,
    start_commands: RwLock<HashMap<String, String>>,
    ready_ports: RwLock<HashMap<String, u16>>,
    dir: Option<PathBuf>,
    /// Templates made from images; see [`crate::image_templates`].
    pub images: crate::image_templates::ImageTemplates,
}

/// Per-template defaults for envd that come from an image's config.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EnvdDefaults {
    pub env: std::collections::BTreeMap<String, String>,
    pub user: Option<String>,
    pub cwd: Option<String>,
}

impl TemplateRegistry {
    pub fn new(dir: Option<PathBuf>) -> Self {
        TemplateRegistry {
            registered: RwLock::default(),
            start_commands: RwLock::default(),
            ready_ports: RwLock::default(),
            dir,
            images: Default::default(),
        }
    }

    pub fn register(&self, name: impl Into<String>, spec: RootfsSpec) {
        self.registered
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.into(), spec);
    }

    /// Forgets a registered template (its start command and ready port too).
    pub fn unregister(&self, name: &str) {
        self.registered
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        self.start_commands
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        self.ready_ports
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }

    /// Sets the command envd starts at boot in every sandbox of the registered template `name`.
    pub fn set_start_command(&self, name: impl Into<String>, command: impl Into<String>) {
        self.start_commands
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.into(), command.into());
    }

    /// Sets the port the start command of template `name` listens on: a create returns only once
    /// it accepts connections.
    pub fn set_ready_port(&self, name: impl Into<String>, port: u16) {
        self.ready_ports
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.into(), port);
    }

    pub fn ready_port(&self, name: &str) -> Option<u16> {
        if let Some(port) = self.images.get(name).and_then(|t| t.ready_port) {
            return Some(port);
        }
        self.ready_ports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .copied()
    }

    /// The ready command of template `name` (E2B's `readyCmd`), if it has one.
    pub fn ready_command(&self, name: &str) -> Option<String> {
        self.images.get(name).and_then(|t| t.ready_cmd)
    }

    /// What template `name` sets for its sandboxes beyond its files (one lookup: a create
    /// asks this once).
    pub fn settings(&self, name: &str) -> TemplateSettings {
        let image = self.images.get(name);
        let in_memory_port = || {
            self.ready_ports
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(name)
                .copied()
        };
        match image {
            Some(t) => TemplateSettings {
                ready_port: t.ready_port.or_else(in_memory_port),
                ready_cmd: t.ready_cmd,
                vcpus: t.vcpus,
                memory_mb: t.memory_mb,
            },
            None => TemplateSettings {
                ready_port: in_memory_port(),
                ..Default::default()
            },
        }
    }

    /// The start command of template `name`, if it has one.
    pub fn start_command(&self, name: &str) -> Option<String> {
        if let Some(t) = self.images.get(name) {
            return t.start_command;
        }
        if let Some(c) = self
            .start_commands
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return Some(c.clone());
        }
        if !safe_name(name) {
            return None;
        }
        let file = self.dir.as_ref()?.join(name).join("start_command");
        let command = std::fs::read_to_string(file).ok()?;
        Some(command.trim().to_string()).filter(|c| !c.is_empty())
    }

    pub fn resolve(&self, name: &str) -> Result<RootfsSpec, TemplateError> {
        if let Some(t) = self.images.get(name) {
            return Ok(RootfsSpec {
                lower_dirs: self.images.lower_dirs(&t),
                ro_binds: t
                    .host_binds
                    .iter()
                    .map(|(source, target)| warren_runtime::BindMount {
                        source: source.clone(),
                        target: target.clone(),
                    })
                    .collect(),
            });
        }
        if let Some(spec) = self
            .registered
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return Ok(spec.clone());
        }
        if let (true, Some(dir)) = (safe_name(name), &self.dir) {
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

    /// The env vars, user and cwd an image template gives its sandboxes (`None` for others).
    pub fn envd_defaults(&self, name: &str) -> Option<EnvdDefaults> {
        let t = self.images.get(name)?;
        // A plain rootfs dir has no config: its sandboxes keep the daemon's default user.
        let user = (!matches!(
            t.source,
            crate::image_templates::TemplateSource::Rootfs { .. }
        ))
        .then(|| crate::image_templates::default_user(t.user.as_deref(), &t.layers));
        Some(EnvdDefaults {
            env: t.env,
            user,
            cwd: t.workdir,
        })
    }

    /// Applies an image template's defaults to a sandbox's envd settings; the env vars already
    /// there (the create request's) win over the image's.
    pub fn apply_defaults(&self, name: &str, envd: &mut warren_runtime::EnvdSettings) {
        if let Some(d) = self.envd_defaults(name) {
            let mut env = d.env;
            env.append(&mut envd.env_vars);
            envd.env_vars = env;
            if let Some(u) = d.user {
                envd.default_user = u;
            }
            envd.default_cwd = d.cwd;
        }
    }

    /// Whether `name` is a template given by the daemon itself or the templates dir (not
    /// deletable through the API).
    pub fn is_builtin(&self, name: &str) -> bool {
        self.registered
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(name)
            || (safe_name(name)
                && self
                    .dir
                    .as_ref()
                    .is_some_and(|d| d.join(name).join("rootfs").is_dir()))
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
        names.extend(
            self.images
                .ready
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .keys()
                .cloned(),
        );
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

/// The name becomes a path component: refuse anything that could leave the dir.
pub(crate) fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// What a template sets for its sandboxes beyond its files: how a create knows its start
/// command is ready, and the sandboxes' resources. Kept with image templates, so it survives
/// restarts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TemplateSettings {
    /// A port the start command listens on.
    pub ready_port: Option<u16>,
    /// A command that exits 0 once the start command is ready.
    pub ready_cmd: Option<String>,
    pub vcpus: Option<u32>,
    pub memory_mb: Option<u64>,
}

impl TemplateSettings {
    pub fn is_empty(&self) -> bool {
        *self == TemplateSettings::default()
    }

    /// `defaults`, with these vCPUs and memory where they are set.
    pub fn resources(&self, defaults: Resources) -> Resources {
        Resources {
            vcpus: self.vcpus.unwrap_or(defaults.vcpus),
            memory_mb: self.memory_mb.unwrap_or(defaults.memory_mb),
            ..defaults
        }
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

    #[test]
    fn image_templates_resolve_to_their_layers_and_defaults() {
        use crate::image_templates::{ImageTemplate, TemplateSource};
        let reg = TemplateRegistry::new(None);
        reg.images.enable(
            warren_image::ImageStore::open(tempfile::tempdir().unwrap().keep()).unwrap(),
            "/etc-layer".into(),
        );
        let t = ImageTemplate {
            name: "img".into(),
            source: TemplateSource::Image {
                reference: "r/x:1".into(),
            },
            store_ref: Some("warren-template/img".into()),
            manifest_digest: None,
            layers: vec!["/l/top".into(), "/l/bottom".into()],
            env: [
                ("A".to_string(), "image".to_string()),
                ("B".into(), "image".into()),
            ]
            .into(),
            workdir: Some("/srv".into()),
            user: Some("app".into()),
            start_command: Some("/bin/server".into()),
            size_bytes: 1,
            host_binds: vec![],
            ready_port: None,
            ready_cmd: None,
            vcpus: None,
            memory_mb: None,
            created_at: chrono::Utc::now(),
        };
        reg.images.ready.write().unwrap().insert("img".into(), t);
        let spec = reg.resolve("img").unwrap();
        assert_eq!(
            spec.lower_dirs,
            vec![
                PathBuf::from("/etc-layer"),
                "/l/top".into(),
                "/l/bottom".into()
            ]
        );
        assert!(
            spec.ro_binds.is_empty(),
            "image templates do not see the host's /usr"
        );
        assert_eq!(reg.start_command("img").as_deref(), Some("/bin/server"));
        let mut envd = warren_runtime::EnvdSettings {
            env_vars: [("B".to_string(), "request".to_string())].into(),
            default_user: "user".into(),
            ..Default::default()
        };
        reg.apply_defaults("img", &mut envd);
        assert_eq!(envd.env_vars["A"], "image");
        assert_eq!(envd.env_vars["B"], "request", "the create's env vars win");
        assert_eq!(envd.default_user, "app");
        assert_eq!(envd.default_cwd.as_deref(), Some("/srv"));
        assert!(reg.names().contains(&"img".to_string()));
        assert!(!reg.is_builtin("img"));
        let mut other = warren_runtime::EnvdSettings::default();
        reg.apply_defaults("base", &mut other);
        assert_eq!(other, warren_runtime::EnvdSettings::default());
    }

    #[test]
    fn start_commands() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("srv/rootfs")).unwrap();
        std::fs::write(
            dir.path().join("srv/start_command"),
            "/bin/server --port 1\n",
        )
        .unwrap();
        let reg = TemplateRegistry::new(Some(dir.path().into()));
        reg.set_start_command("ci", "/opt/ci");
        assert_eq!(reg.start_command("ci").as_deref(), Some("/opt/ci"));
        assert_eq!(reg.ready_port("ci"), None);
        reg.set_ready_port("ci", 49999);
        assert_eq!(reg.ready_port("ci"), Some(49999));
        assert_eq!(
            reg.start_command("srv").as_deref(),
            Some("/bin/server --port 1")
        );
        assert_eq!(reg.start_command("base"), None);
        assert_eq!(reg.start_command("../srv"), None);
    }
}
