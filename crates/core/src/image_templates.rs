//! Templates made from OCI images (or from a plain rootfs directory): their durable records, the
//! in-progress builds with their progress, and how an image's config becomes sandbox settings.
//!
//! An image template's sandboxes get the image's unpacked layers (from the shared
//! [`warren_image::ImageStore`]) as overlay lower dirs, under one small Warren layer with the
//! sandbox's `/etc/hosts`, `/etc/resolv.conf` and `/etc/hostname` (as the `base` template has).
//! The layers are never copied: every sandbox and pool member of every template that uses a
//! layer stacks the same directory.
//!
//! The image's `Env` becomes the sandbox's env vars (a create's own env vars win), `WorkingDir`
//! the default cwd of processes, `User` the default user, and `Entrypoint` + `Cmd` the start
//! command envd runs at boot, like an E2B template's start command.

use crate::store::{Store, StoreError};
use chrono::{DateTime, Utc};
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use warren_image::store::RunConfig;

/// Schema migration: one row per image template, its record as JSON.
pub(crate) const MIGRATION_IMAGE_TEMPLATES: &str = "CREATE TABLE image_templates (
        name TEXT PRIMARY KEY,
        record TEXT NOT NULL,
        created_at TEXT NOT NULL
    );";

/// Where a template's filesystem comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum TemplateSource {
    /// An image reference: the local store if it has that name, else its registry.
    Image { reference: String },
    /// An OCI image layout directory on the daemon's host (`name` picks one of its images).
    OciDir {
        path: PathBuf,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    OciArchive {
        path: PathBuf,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    DockerArchive {
        path: PathBuf,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// A directory used as the single read-only layer, as is.
    Rootfs { path: PathBuf },
    /// A memory checkpoint (or a filesystem-only one): every sandbox of the template is a
    /// restore of it, e.g. a code interpreter whose kernel already imported heavy modules.
    Checkpoint { checkpoint: String },
}

impl TemplateSource {
    pub fn describe(&self) -> String {
        match self {
            TemplateSource::Image { reference } => format!("image {reference}"),
            TemplateSource::OciDir { path, .. } => format!("oci-dir {}", path.display()),
            TemplateSource::OciArchive { path, .. } => format!("oci-archive {}", path.display()),
            TemplateSource::DockerArchive { path, .. } => {
                format!("docker-archive {}", path.display())
            }
            TemplateSource::Rootfs { path } => format!("rootfs {}", path.display()),
            TemplateSource::Checkpoint { checkpoint } => format!("checkpoint {checkpoint}"),
        }
    }

    /// The checkpoint a template restores, when it is made from one.
    pub fn checkpoint(&self) -> Option<&str> {
        match self {
            TemplateSource::Checkpoint { checkpoint } => Some(checkpoint),
            _ => None,
        }
    }
}

/// A finished template, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageTemplate {
    pub name: String,
    pub source: TemplateSource,
    /// The name of its image in the store's index (`warren-template/<name>`); `None` for rootfs
    /// templates.
    pub store_ref: Option<String>,
    pub manifest_digest: Option<String>,
    /// Read-only layers, topmost first, without Warren's own `/etc` layer.
    pub layers: Vec<PathBuf>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub start_command: Option<String>,
    /// Compressed size of the image's blobs (0 for rootfs templates).
    pub size_bytes: u64,
    /// Read-only host bind mounts (source, target) the image needs but does not contain: images
    /// committed from the `base` template show the host's `/usr` this way (see
    /// [`warren_image::commit::HOST_BINDS_LABEL`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_binds: Vec<(PathBuf, PathBuf)>,
    /// The port its start command listens on: a create returns once it accepts connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_port: Option<u16>,
    /// A command that exits 0 once its start command is ready (E2B's `readyCmd`): a create
    /// returns once it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_cmd: Option<String>,
    /// The vCPUs of its sandboxes (E2B's `cpuCount`); unset: the daemon's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// The memory of its sandboxes in MiB (E2B's `memoryMB`); unset: the daemon's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    pub created_at: DateTime<Utc>,
}

/// The store ref under which a template keeps its image (and so its layers) alive.
pub fn store_ref(template: &str) -> String {
    format!("warren-template/{template}")
}

/// What a template build is doing, for the API and the CLI's progress bars.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildStatus {
    pub name: String,
    pub source: TemplateSource,
    /// `building`, then the template is ready (and listed as such) or `failed`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<warren_image::ProgressEvent>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub started_at: DateTime<Utc>,
}

/// Image templates in memory (for the create path) plus running and failed builds.
#[derive(Default)]
pub struct ImageTemplates {
    pub(crate) ready: RwLock<HashMap<String, ImageTemplate>>,
    /// Shared with the progress callbacks of running builds.
    pub(crate) builds: std::sync::Arc<RwLock<HashMap<String, BuildStatus>>>,
    /// Warren's `/etc` layer stacked on top of every image template.
    pub(crate) etc_layer: RwLock<Option<PathBuf>>,
    /// The image store; `None` until the daemon enables image templates.
    pub(crate) store: RwLock<Option<warren_image::ImageStore>>,
}

impl ImageTemplates {
    /// Turns image templates on: `store` holds their images, `etc_layer` (see
    /// [`prepare_etc_layer`]) goes on top of their layers.
    pub fn enable(&self, store: warren_image::ImageStore, etc_layer: PathBuf) {
        *self.store.write().unwrap_or_else(|e| e.into_inner()) = Some(store);
        *self.etc_layer.write().unwrap_or_else(|e| e.into_inner()) = Some(etc_layer);
    }

    pub fn image_store(&self) -> Option<warren_image::ImageStore> {
        self.store.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn get(&self, name: &str) -> Option<ImageTemplate> {
        self.ready
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    pub(crate) fn lower_dirs(&self, t: &ImageTemplate) -> Vec<PathBuf> {
        // A checkpoint's layers are exactly those its processes had: the source's own `/etc`
        // layer is among them.
        if t.source.checkpoint().is_some() {
            return t.layers.clone();
        }
        let etc = self
            .etc_layer
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        etc.into_iter().chain(t.layers.iter().cloned()).collect()
    }

    /// The checkpoint template `name` restores, if it is a checkpoint template.
    pub fn checkpoint_of(&self, name: &str) -> Option<String> {
        self.get(name)
            .and_then(|t| t.source.checkpoint().map(str::to_string))
    }

    /// The checkpoint templates that restore checkpoint `checkpoint`, sorted.
    pub fn using_checkpoint(&self, checkpoint: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .ready
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|t| t.source.checkpoint() == Some(checkpoint))
            .map(|t| t.name.clone())
            .collect();
        names.sort();
        names
    }

    pub fn build(&self, name: &str) -> Option<BuildStatus> {
        self.builds
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }
}

/// Writes Warren's small layer for image templates (`/etc` hosts, resolv.conf, hostname, and
/// the mount points proc, sys, dev, run, tmp) under
/// `<data_dir>/templates/image-etc/rootfs` and returns it. The sandbox's init rewrites
/// `/etc/hostname` in its upper dir; the others are the same for every sandbox.
pub fn prepare_etc_layer(data_dir: &Path) -> std::io::Result<PathBuf> {
    let root = data_dir.join("templates/image-etc/rootfs");
    let etc = root.join("etc");
    std::fs::create_dir_all(&etc)?;
    std::fs::write(
        etc.join("hosts"),
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    )?;
    std::fs::write(
        etc.join("resolv.conf"),
        warren_runtime::linux::sandbox_resolv_conf(),
    )?;
    std::fs::write(etc.join("hostname"), "sandbox\n")?;
    // The mount points the sandbox's init needs: present here, they cost no mkdir (and no
    // copy-up of `/`) in each sandbox's upper dir when the image lacks them.
    use std::os::unix::fs::PermissionsExt;
    for (dir, mode) in [
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("run", 0o755),
        ("tmp", 0o1777),
    ] {
        let p = root.join(dir);
        std::fs::create_dir_all(&p)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(root)
}

/// Sandbox settings from an image's config: env (`KEY=VALUE` list), cwd, user, start command.
pub fn from_run_config(
    cfg: Option<&RunConfig>,
) -> (
    BTreeMap<String, String>,
    Option<String>,
    Option<String>,
    Option<String>,
) {
    let Some(cfg) = cfg else {
        return (BTreeMap::new(), None, None, None);
    };
    let env = cfg
        .env
        .iter()
        .flatten()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .filter(|(k, _)| !k.is_empty())
        .collect();
    let workdir = cfg.working_dir.clone().filter(|w| !w.is_empty());
    let user = cfg.user.clone().filter(|u| !u.is_empty());
    let argv: Vec<String> = cfg
        .entrypoint
        .iter()
        .flatten()
        .chain(cfg.cmd.iter().flatten())
        .cloned()
        .collect();
    let start = (!argv.is_empty()).then(|| {
        argv.iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    });
    (env, workdir, user, start)
}

/// Quotes one argument for `/bin/sh -c` (envd runs the start command through the shell).
fn shell_quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', "'\\''"))
    }
}

/// The user envd should default to: the image's `User` by name. A numeric uid (`1000`,
/// `1000:1000`) is looked up in the image's `/etc/passwd` (the topmost layer that has one),
/// since envd resolves users by name. No `User` means root, as for any container.
pub fn default_user(user: Option<&str>, layers: &[PathBuf]) -> String {
    let Some(user) = user else {
        return "root".to_string();
    };
    let name = user.split(':').next().unwrap_or(user);
    let Ok(uid) = name.parse::<u32>() else {
        return name.to_string();
    };
    for layer in layers {
        if let Ok(passwd) = std::fs::read_to_string(layer.join("etc/passwd")) {
            for line in passwd.lines() {
                let f: Vec<&str> = line.split(':').collect();
                if f.len() >= 3 && f[2].parse::<u32>().ok() == Some(uid) {
                    return f[0].to_string();
                }
            }
            break;
        }
    }
    name.to_string()
}

pub(crate) async fn save(store: &Store, t: &ImageTemplate) -> Result<(), StoreError> {
    let record = serde_json::to_string(t).expect("template serializes");
    let (name, created) = (t.name.clone(), t.created_at.to_rfc3339());
    store
        .with(move |c| {
            c.execute(
                "INSERT OR REPLACE INTO image_templates (name, record, created_at) VALUES (?1, ?2, ?3)",
                params![name, record, created],
            )?;
            Ok(())
        })
        .await
}

pub(crate) async fn remove(store: &Store, name: &str) -> Result<(), StoreError> {
    let name = name.to_string();
    store
        .with(move |c| {
            c.execute("DELETE FROM image_templates WHERE name = ?1", params![name])?;
            Ok(())
        })
        .await
}

pub(crate) async fn load_all(store: &Store) -> Result<Vec<ImageTemplate>, StoreError> {
    store
        .with(|c| {
            let mut stmt = c.prepare("SELECT name, record FROM image_templates ORDER BY name")?;
            let rows =
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            let mut out = vec![];
            for row in rows {
                let (name, record) = row?;
                out.push(
                    serde_json::from_str(&record).map_err(|e| StoreError::Corrupt {
                        id: format!("template {name}"),
                        reason: e.to_string(),
                    })?,
                );
            }
            Ok(out)
        })
        .await
}

#[allow(dead_code)]
pub(crate) async fn exists(store: &Store, name: &str) -> Result<bool, StoreError> {
    let name = name.to_string();
    store
        .with(move |c| {
            Ok(c.query_row(
                "SELECT 1 FROM image_templates WHERE name = ?1",
                params![name],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_config_becomes_sandbox_settings() {
        let cfg = RunConfig {
            env: Some(vec!["PATH=/bin".into(), "A=b=c".into(), "junk".into()]),
            entrypoint: Some(vec!["/bin/server".into()]),
            cmd: Some(vec!["--name".into(), "it's here".into()]),
            working_dir: Some("/srv".into()),
            user: Some("app".into()),
        };
        let (env, wd, user, start) = from_run_config(Some(&cfg));
        assert_eq!(env["A"], "b=c");
        assert_eq!(env.len(), 2);
        assert_eq!(wd.as_deref(), Some("/srv"));
        assert_eq!(user.as_deref(), Some("app"));
        assert_eq!(start.as_deref(), Some("/bin/server --name 'it'\\''s here'"));
        assert_eq!(from_run_config(None).3, None);
    }

    #[test]
    fn numeric_users_are_named_from_the_image() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        let layers = vec![dir.path().to_path_buf()];
        assert_eq!(default_user(Some("1000:1000"), &layers), "app");
        assert_eq!(default_user(Some("svc"), &layers), "svc");
        assert_eq!(default_user(None, &layers), "root");
        assert_eq!(default_user(Some("4242"), &layers), "4242");
    }
}
