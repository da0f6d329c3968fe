//! The `code-interpreter-v1` template: the base template, the Python layer that
//! `scripts/build-code-interpreter-template.sh` builds (a venv with ipykernel, bash_kernel,
//! matplotlib, pandas, numpy at /opt/warren/venv), and a small layer made here holding this
//! daemon's own `warren-code-interpreter` binary, which envd starts as the template's start
//! command. The binary lives in a layer of its own so that rebuilding Warren never needs the slow
//! pip build again.

use anyhow::Context;
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

/// Makes (once per binary version) the layer with the server binary and returns its path.
fn server_layer(data_dir: &Path, binary: &Path) -> anyhow::Result<PathBuf> {
    let meta = std::fs::metadata(binary).with_context(|| format!("{}", binary.display()))?;
    let dir = data_dir.join("templates").join(TEMPLATE);
    let layer = dir.join(format!(
        "server-{}-{}.{}",
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec()
    ));
    if layer.is_dir() {
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
    Ok(layer)
}

/// Registers `code-interpreter-v1` on top of `base` if its Python layer has been built. Returns
/// whether it did; a missing layer or binary only leaves the template out.
pub fn register(
    templates: &TemplateRegistry,
    data_dir: &Path,
    layer_dir: &Path,
    binary: &Path,
    base: &RootfsSpec,
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
    let server = server_layer(data_dir, binary)?;
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
