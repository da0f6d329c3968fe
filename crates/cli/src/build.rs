//! `warren template build NAME -f FILE`: uploads the Dockerfile and the files its COPYs name (the
//! build context: the file's directory, or `--context DIR`) to the daemon, which runs the build
//! (`POST /warren/v1/templates/{name}/build`, see `warren_core::orchestrator::builds`), and
//! follows it: step lines, cache hits and the RUN output as they come.
//!
//! The file is parsed here too, only to pack just the COPY sources (not a whole repository) and
//! to report a bad file before uploading anything; the daemon parses and checks it again.

use crate::client::ApiClient;
use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt, Full};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use warren_core::dockerfile::{self, Instr};

/// The relative paths (files, dirs, symlinks) of `rel` under `context`, recursively, sorted.
fn collect(context: &Path, rel: &Path, out: &mut BTreeSet<PathBuf>) -> anyhow::Result<()> {
    let path = context.join(rel);
    let meta = std::fs::symlink_metadata(&path)
        .with_context(|| format!("COPY source {}", path.display()))?;
    if !rel.as_os_str().is_empty() {
        out.insert(rel.to_path_buf());
    }
    if meta.is_dir() {
        for e in std::fs::read_dir(&path).with_context(|| format!("reading {}", path.display()))? {
            collect(context, &rel.join(e?.file_name()), out)?;
        }
    }
    Ok(())
}

/// A deterministic tar (root-owned, mtime 0, sorted) of the Dockerfile and the COPY sources.
fn context_tar(context: &Path, file: &Path, text: &str) -> anyhow::Result<(Vec<u8>, String)> {
    let steps = dockerfile::parse(text).with_context(|| file.display().to_string())?;
    let mut paths = BTreeSet::new();
    for s in &steps {
        if let Instr::Copy(srcs, _) = &s.instr {
            for src in srcs {
                collect(
                    context,
                    Path::new(&dockerfile::normalize_source(src)),
                    &mut paths,
                )
                .with_context(|| format!("line {}", s.line))?;
            }
        }
    }
    // The Dockerfile goes in under its name relative to the context, or a name of its own when
    // it lives elsewhere.
    let name = std::path::absolute(file)
        .ok()
        .zip(std::path::absolute(context).ok())
        .and_then(|(f, c)| f.strip_prefix(&c).ok().map(Path::to_path_buf))
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from(".warren-dockerfile"));
    let mut b = tar::Builder::new(Vec::new());
    b.mode(tar::HeaderMode::Deterministic);
    b.follow_symlinks(false);
    for p in &paths {
        if *p == name {
            continue;
        }
        b.append_path_with_name(context.join(p), p)
            .with_context(|| format!("packing {}", context.join(p).display()))?;
    }
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(text.len() as u64);
    b.append_data(&mut h, &name, text.as_bytes())?;
    let name = name
        .to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", name.display()))?
        .to_string();
    Ok((b.into_inner()?, name))
}

fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Builds template `name` from `file`; prints the daemon's step lines and output.
pub async fn build(
    api: &ApiClient,
    name: &str,
    file: &Path,
    context: Option<&Path>,
) -> anyhow::Result<u8> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let context = match context {
        Some(c) => c.to_path_buf(),
        None => file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(".")),
    };
    let (tar, dockerfile) = context_tar(&context, file, &text)?;
    let path = format!("/warren/v1/templates/{}/build", encode(name));
    let req = http::Request::builder()
        .method(Method::POST)
        .uri(format!(
            "{}{path}?dockerfile={}",
            api.base,
            encode(&dockerfile)
        ))
        .header("x-api-key", &api.key)
        .header("content-type", "application/x-tar")
        .body(Full::new(Bytes::from(tar)))?;
    let resp = api
        .http
        .request(req)
        .await
        .with_context(|| format!("cannot reach the daemon at {}", api.base))?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if !status.is_success() {
        let msg = v["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        bail!("{msg} (HTTP {})", status.as_u16());
    }

    let mut seen = 0u64;
    loop {
        let (_, _, job) = api
            .call(Method::GET, &format!("{path}?logFrom={seen}"), None)
            .await?;
        if let Some(log) = job["log"].as_str() {
            print!("{log}");
        }
        seen = job["logEnd"].as_u64().unwrap_or(seen);
        match job["status"].as_str() {
            Some("ready") => {
                println!(
                    "built {name} ({}), {} cached steps",
                    job["digest"].as_str().unwrap_or(""),
                    job["cacheHits"]
                );
                return Ok(0);
            }
            Some("failed") => bail!(
                "build of {name} failed: {}",
                job["error"].as_str().unwrap_or("unknown error")
            ),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_context_holds_the_file_and_only_the_copy_sources() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("src/sub")).unwrap();
        std::fs::write(t.path().join("src/sub/a"), "a").unwrap();
        std::fs::write(t.path().join("big-unused"), "x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", t.path().join("src/link")).unwrap();
        let f = t.path().join("Dockerfile");
        let text = "FROM base\nCOPY src /dst/\n";
        std::fs::write(&f, text).unwrap();
        let (tar, name) = context_tar(t.path(), &f, text).unwrap();
        assert_eq!(name, "Dockerfile");
        let mut ar = tar::Archive::new(&tar[..]);
        let names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(
            names,
            ["src", "src/link", "src/sub", "src/sub/a", "Dockerfile"]
        );
        let err = context_tar(t.path(), &f, "FROM base\nCOPY missing /x\n").unwrap_err();
        assert!(format!("{err:#}").contains("line 2"), "{err:#}");
        let err = context_tar(t.path(), &f, "FROM base\nEXPOSE 1\n").unwrap_err();
        assert!(
            format!("{err:#}").contains("unsupported instruction"),
            "{err:#}"
        );
    }
}
