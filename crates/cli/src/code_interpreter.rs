//! The `code-interpreter-v1` template: the base template, the Python layer that
//! `scripts/build-code-interpreter-template.sh` builds (a venv with ipykernel, bash_kernel,
//! matplotlib, pandas, numpy at /opt/warren/venv), and a small layer made here holding this
//! daemon's own `warren-code-interpreter` binary, which envd starts as the template's start
//! command. The binary lives in a layer of its own so that rebuilding Warren never needs the slow
//! pip build again. One layer per binary version is made; the layers of earlier versions are
//! removed once no stored sandbox uses them (a running, paused or snapshotted sandbox keeps its
//! overlay's lower dirs), so they are replaced rather than piling up.

use anyhow::Context;
use std::collections::HashSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use warren_core::TemplateRegistry;
use warren_runtime::RootfsSpec;

pub const TEMPLATE: &str = "code-interpreter-v1";
/// Where the build script puts the Python layer by default.
pub const DEFAULT_LAYER_DIR: &str = "/var/lib/warren-templates/code-interpreter-v1";
/// Where the server binary is inside the sandbox.
const SERVER_PATH: &str = "opt/warren/bin/warren-code-interpreter";

pub fn default_server_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("warren-code-interpreter")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("/usr/local/bin/warren-code-interpreter"))
}

/// Removes the server layers under `dir` other than `keep` that no sandbox in `in_use` uses.
fn remove_old_server_layers(dir: &Path, keep: &Path, in_use: &HashSet<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // `server.tmp.*`: a copy that an interrupted daemon did not finish.
        let ours = name.starts_with("server-") || name.starts_with("server.tmp.");
        if !ours || path == keep || in_use.contains(&path) {
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {
                tracing::info!(layer = %path.display(), "removed an old code-interpreter server layer")
            }
            Err(e) => {
                tracing::warn!(layer = %path.display(), error = %e, "removing an old code-interpreter server layer")
            }
        }
    }
}

/// Makes (once per binary version) the layer with the server binary and returns its path.
fn server_layer(
    data_dir: &Path,
    binary: &Path,
    in_use: &HashSet<PathBuf>,
) -> anyhow::Result<PathBuf> {
    let meta = std::fs::metadata(binary).with_context(|| format!("{}", binary.display()))?;
    let dir = data_dir.join("templates").join(TEMPLATE);
    let layer = dir.join(format!(
        "server-{}-{}.{}",
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec()
    ));
    if layer.is_dir() {
        remove_old_server_layers(&dir, &layer, in_use);
        return Ok(layer);
    }
    let tmp = dir.join(format!("server.tmp.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let target = tmp.join(SERVER_PATH);
    std::fs::create_dir_all(target.parent().unwrap_or(&tmp))
        .with_context(|| format!("creating {}", tmp.display()))?;
    std::fs::copy(binary, &target).with_context(|| format!("copying {}", binary.display()))?;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, &layer).with_context(|| format!("creating {}", layer.display()))?;
    remove_old_server_layers(&dir, &layer, in_use);
    Ok(layer)
}

/// Registers `code-interpreter-v1` on top of `base` if its Python layer has been built. Returns
/// whether it did; a missing layer or binary only leaves the template out. `in_use`: the lower
/// dirs of the stored sandboxes, whose layers must stay.
pub fn register(
    templates: &TemplateRegistry,
    data_dir: &Path,
    layer_dir: &Path,
    binary: &Path,
    base: &RootfsSpec,
    in_use: &HashSet<PathBuf>,
) -> anyhow::Result<bool> {
    let python = layer_dir.join("rootfs");
    if !python.join("opt/warren/venv/bin/python").exists() {
        tracing::info!(
            layer = %layer_dir.display(),
            "{TEMPLATE} not available: build it with scripts/build-code-interpreter-template.sh"
        );
        return Ok(false);
    }
    if !binary.is_file() {
        tracing::warn!(binary = %binary.display(), "{TEMPLATE} not available: no server binary");
        return Ok(false);
    }
    let server = server_layer(data_dir, binary, in_use)?;
    let mut lower_dirs = vec![server, python];
    lower_dirs.extend(base.lower_dirs.iter().cloned());
    templates.register(
        TEMPLATE,
        RootfsSpec {
            lower_dirs,
            ro_binds: base.ro_binds.clone(),
        },
    );
    // Its log (kernel starts, deaths, interrupts) is kept in the sandbox for whoever debugs it.
    templates.set_start_command(
        TEMPLATE,
        format!("exec /{SERVER_PATH} 2>>/var/log/warren-code-interpreter.log"),
    );
    templates.set_ready_port(TEMPLATE, 49999);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers(data_dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(data_dir.join("templates").join(TEMPLATE))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_new_server_binary_replaces_the_old_layer_unless_a_sandbox_uses_it() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let bin = tmp.path().join("warren-code-interpreter");
        std::fs::write(&bin, "v1").unwrap();
        let none = HashSet::new();
        let first = server_layer(&data, &bin, &none).unwrap();
        assert_eq!(std::fs::read(first.join(SERVER_PATH)).unwrap(), b"v1");
        // Same binary: same layer.
        assert_eq!(server_layer(&data, &bin, &none).unwrap(), first);

        std::fs::write(&bin, "v22").unwrap();
        let second = server_layer(&data, &bin, &none).unwrap();
        assert_ne!(second, first);
        assert_eq!(std::fs::read(second.join(SERVER_PATH)).unwrap(), b"v22");
        assert!(!first.exists(), "the old layer is gone");
        assert_eq!(layers(&data).len(), 1);

        // A layer that a stored sandbox still has as a lower dir stays until it is gone.
        std::fs::write(&bin, "v333").unwrap();
        let in_use: HashSet<PathBuf> = [second.clone()].into();
        let third = server_layer(&data, &bin, &in_use).unwrap();
        assert!(second.exists() && third.exists());
        assert_eq!(server_layer(&data, &bin, &none).unwrap(), third);
        assert!(!second.exists());
        assert_eq!(layers(&data).len(), 1);
    }
}
