//! `warren template build NAME -f FILE`: a template from a Dockerfile subset, with no Docker.
//!
//! Instructions: `FROM` (a template, e.g. `base` or a committed image), `RUN` (shell or JSON exec
//! form), `COPY SRC... DST` (paths relative to the file's directory), `ENV`, `WORKDIR`, `USER`.
//! Each `RUN` and `COPY` runs in a fresh sandbox of the previous step's image and is committed as
//! one layer (a fresh sandbox, so the layer holds exactly that step's changes); `ENV`, `WORKDIR`
//! and `USER` set how later steps run. A step's cache key is the previous image's digest, the
//! instruction, the env/workdir/user it runs with and, for `COPY`, the hash of the copied
//! content; a step whose key has a committed image (`warren-build/cache:<key>`) is not run again.
//! The result is committed under NAME and is a template named NAME.
//!
//! Known limits: the image config does not record ENV/WORKDIR/USER (sandboxes of the template
//! start with the template's defaults), and `FROM` must name an existing template.

use crate::client::ApiClient;
use anyhow::{anyhow, bail, Context};
use http::Method;
use http_body_util::{BodyExt, Full};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub enum Instr {
    From(String),
    Run(String),
    Copy(Vec<String>, String),
    Env(Vec<(String, String)>),
    Workdir(String),
    User(String),
}

/// Parses the Dockerfile subset; errors name the line.
pub fn parse(text: &str) -> anyhow::Result<Vec<(usize, String, Instr)>> {
    let mut out = Vec::new();
    let mut pending = String::new();
    let mut start = 0;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        if pending.is_empty() {
            start = i + 1;
        }
        if let Some(cont) = line.strip_suffix('\\') {
            pending.push_str(cont);
            pending.push(' ');
            continue;
        }
        pending.push_str(line);
        let full = std::mem::take(&mut pending);
        out.push((start, full.clone(), parse_one(start, &full)?));
    }
    if !pending.is_empty() {
        bail!("line {start}: the file ends inside a continued line");
    }
    match out.first() {
        Some((_, _, Instr::From(_))) => {}
        Some((n, _, _)) => bail!("line {n}: the first instruction must be FROM"),
        None => bail!("no instructions"),
    }
    if out
        .iter()
        .skip(1)
        .any(|(_, _, i)| matches!(i, Instr::From(_)))
    {
        bail!("only one FROM is supported (no multi-stage builds)");
    }
    Ok(out)
}

fn parse_one(n: usize, line: &str) -> anyhow::Result<Instr> {
    let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    let rest = rest.trim();
    let need = |what: &str| -> anyhow::Result<()> {
        if rest.is_empty() {
            bail!("line {n}: {} needs {what}", word.to_uppercase());
        }
        Ok(())
    };
    Ok(match word.to_ascii_uppercase().as_str() {
        "FROM" => {
            need("a template name")?;
            if rest.split_whitespace().count() != 1 {
                bail!("line {n}: FROM takes one template name (no AS, no --platform)");
            }
            Instr::From(rest.to_string())
        }
        "RUN" => {
            need("a command")?;
            if rest.starts_with('[') {
                let words: Vec<String> = serde_json::from_str(rest)
                    .map_err(|e| anyhow!("line {n}: RUN's exec form must be a JSON array of strings: {e}"))?;
                Instr::Run(
                    words
                        .iter()
                        .map(|w| format!("'{}'", w.replace('\'', r"'\''")))
                        .collect::<Vec<_>>()
                        .join(" "),
                )
            } else {
                Instr::Run(rest.to_string())
            }
        }
        "COPY" => {
            if rest.starts_with("--") {
                bail!("line {n}: COPY options (--chown, --from...) are not supported");
            }
            let parts: Vec<String> = rest.split_whitespace().map(str::to_string).collect();
            if parts.len() < 2 {
                bail!("line {n}: COPY needs at least one source and a destination");
            }
            let (dst, srcs) = parts.split_last().unwrap_or((&parts[0], &[]));
            Instr::Copy(srcs.to_vec(), dst.clone())
        }
        "ENV" => {
            need("KEY=VALUE")?;
            let pairs: Vec<(String, String)> = if rest.contains('=') {
                rest.split_whitespace()
                    .map(|p| {
                        p.split_once('=')
                            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                            .ok_or_else(|| anyhow!("line {n}: ENV {p:?} must be KEY=VALUE"))
                    })
                    .collect::<anyhow::Result<_>>()?
            } else {
                let (k, v) = rest
                    .split_once(char::is_whitespace)
                    .ok_or_else(|| anyhow!("line {n}: ENV needs KEY=VALUE or KEY VALUE"))?;
                vec![(k.to_string(), v.trim().to_string())]
            };
            Instr::Env(pairs)
        }
        "WORKDIR" => {
            need("a path")?;
            Instr::Workdir(rest.to_string())
        }
        "USER" => {
            need("a user")?;
            Instr::User(rest.to_string())
        }
        other => bail!(
            "line {n}: unsupported instruction {other:?} (supported: FROM, RUN, COPY, ENV, WORKDIR, USER)"
        ),
    })
}

/// A tar of the COPY sources (files or dirs, relative to `context`), deterministic, and its hash.
fn copy_tar(context: &Path, srcs: &[String]) -> anyhow::Result<(Vec<u8>, String)> {
    let mut b = tar::Builder::new(Vec::new());
    b.mode(tar::HeaderMode::Deterministic);
    b.follow_symlinks(false);
    for s in srcs {
        let rel = Path::new(s);
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| c == std::path::Component::ParentDir)
        {
            bail!("COPY {s}: sources must be relative paths inside the build context");
        }
        let path = context.join(rel);
        let meta = std::fs::symlink_metadata(&path)
            .with_context(|| format!("COPY {s}: {}", path.display()))?;
        let name = rel
            .file_name()
            .ok_or_else(|| anyhow!("COPY {s}: no file name"))?;
        if meta.is_dir() {
            // Docker copies a directory's contents, not the directory itself.
            let mut entries: Vec<PathBuf> = walk(&path)?;
            entries.sort();
            for e in entries {
                let inner = e.strip_prefix(&path)?;
                b.append_path_with_name(&e, inner)?;
            }
        } else {
            b.append_path_with_name(&path, name)?;
        }
    }
    let bytes = b.into_inner()?;
    let hash = format!("{:x}", Sha256::digest(&bytes));
    Ok((bytes, hash))
}

fn walk(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        out.push(p.clone());
        if std::fs::symlink_metadata(&p)?.is_dir() {
            out.extend(walk(&p)?);
        }
    }
    Ok(out)
}

struct Builder<'a> {
    api: &'a ApiClient,
    template: String,
    parent: String,
    env: BTreeMap<String, String>,
    workdir: Option<String>,
    user: String,
}

impl Builder<'_> {
    async fn cached(&self, image: &str) -> anyhow::Result<Option<String>> {
        let (_, _, list) = self
            .api
            .call(Method::GET, "/warren/v1/commits", None)
            .await?;
        Ok(list.as_array().into_iter().flatten().find_map(|c| {
            (c["spec"]["image"] == image && c["status"]["phase"] == "Succeeded")
                .then(|| c["status"]["digest"].as_str().map(str::to_string))
                .flatten()
        }))
    }

    async fn sandbox(&self) -> anyhow::Result<String> {
        let (_, _, v) = self
            .api
            .call(
                Method::POST,
                "/sandboxes",
                Some(json!({"templateID": self.template, "timeout": 3600})),
            )
            .await
            .with_context(|| format!("starting a sandbox of {}", self.template))?;
        v["sandboxID"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("the daemon answered no sandboxID"))
    }

    async fn run(&self, id: &str, cmd: &str) -> anyhow::Result<u8> {
        let args = crate::exec::ExecArgs {
            id: id.to_string(),
            user: Some(self.user.clone()),
            cwd: self.workdir.clone(),
            env: self.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            command: vec![cmd.to_string()],
        };
        crate::exec::run(self.api, args).await
    }

    async fn upload(&self, id: &str, path: &str, bytes: Vec<u8>) -> anyhow::Result<()> {
        let (_, _, info) = self
            .api
            .call(Method::GET, &format!("/sandboxes/{id}"), None)
            .await?;
        let mut req = http::Request::builder()
            .method(Method::POST)
            .uri(format!("{}/files?path={path}&username=root", self.api.base))
            .header("e2b-sandbox-id", id)
            .header("e2b-sandbox-port", warren_runtime::ENVD_PORT.to_string())
            .header("content-type", "application/octet-stream");
        if let Some(t) = info["envdAccessToken"].as_str() {
            req = req.header("x-access-token", t);
        }
        let resp = self
            .api
            .http
            .request(req.body(Full::new(bytes.into()))?)
            .await
            .context("uploading COPY sources")?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.into_body().collect().await?.to_bytes();
            bail!(
                "uploading COPY sources: HTTP {}: {}",
                status.as_u16(),
                String::from_utf8_lossy(&body)
            );
        }
        Ok(())
    }

    async fn commit(&self, id: &str, image: &str) -> anyhow::Result<String> {
        let body = json!({"kind": "Commit", "metadata": {"name": ""},
                          "spec": {"sandbox": id, "image": image}});
        let (_, _, mut c) = self
            .api
            .call(Method::POST, "/warren/v1/commits", Some(body))
            .await?;
        let name = c["metadata"]["name"].as_str().unwrap_or("").to_string();
        loop {
            match c["status"]["phase"].as_str().unwrap_or("") {
                "Succeeded" => break,
                "Failed" => bail!(
                    "commit of step failed: {}",
                    c["status"]["message"].as_str().unwrap_or("")
                ),
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
            c = self
                .api
                .call(Method::GET, &format!("/warren/v1/commits/{name}"), None)
                .await?
                .2;
        }
        Ok(c["status"]["digest"].as_str().unwrap_or("").to_string())
    }

    async fn kill(&self, id: &str) {
        let _ = self
            .api
            .call(Method::DELETE, &format!("/sandboxes/{id}"), None)
            .await;
    }

    /// Runs one layer step (unless cached) and moves the build onto its image.
    async fn step(
        &mut self,
        label: &str,
        key_extra: &str,
        work: impl AsyncFnOnce(&Self, &str) -> anyhow::Result<()>,
    ) -> anyhow::Result<bool> {
        let key = format!(
            "{:x}",
            Sha256::digest(
                json!([
                    self.parent,
                    label,
                    key_extra,
                    self.env,
                    self.workdir,
                    self.user
                ])
                .to_string()
            )
        );
        let image = format!("warren-build/cache:{}", &key[..40]);
        if let Some(digest) = self.cached(&image).await? {
            println!(" ---> CACHED {}", &digest[..19.min(digest.len())]);
            self.template = image;
            self.parent = digest;
            return Ok(true);
        }
        let id = self.sandbox().await?;
        let res = async {
            work(self, &id).await?;
            self.commit(&id, &image).await
        }
        .await;
        self.kill(&id).await;
        let digest = res?;
        println!(" ---> {}", &digest[..19.min(digest.len())]);
        self.template = image;
        self.parent = digest;
        Ok(false)
    }
}

/// Builds template `name` from `file`. Returns the number of cache hits.
pub async fn build(api: &ApiClient, name: &str, file: &Path) -> anyhow::Result<u8> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let steps = parse(&text).with_context(|| file.display().to_string())?;
    let context = file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let Some((_, _, Instr::From(from))) = steps.first().cloned() else {
        bail!("the first instruction must be FROM");
    };
    let mut b = Builder {
        api,
        parent: format!("template:{from}"),
        template: from,
        env: BTreeMap::new(),
        workdir: None,
        user: "root".into(),
    };
    let (mut hits, total) = (0, steps.len());
    for (i, (line, text, instr)) in steps.into_iter().enumerate() {
        println!("step {}/{total} (line {line}): {text}", i + 1);
        let hit = match instr {
            Instr::From(_) => continue,
            Instr::Env(pairs) => {
                b.env.extend(pairs);
                continue;
            }
            Instr::User(u) => {
                b.user = u;
                continue;
            }
            Instr::Workdir(w) => {
                let w = match (&b.workdir, w.starts_with('/')) {
                    (Some(cur), false) => format!("{cur}/{w}"),
                    _ => w,
                };
                let cmd = format!("mkdir -p '{}'", w.replace('\'', r"'\''"));
                b.workdir = None;
                let hit = b
                    .step(&text, "", async |b: &Builder<'_>, id: &str| {
                        let code = b.run(id, &cmd).await?;
                        if code != 0 {
                            bail!("WORKDIR: mkdir exited with {code}");
                        }
                        Ok(())
                    })
                    .await?;
                b.workdir = Some(w);
                hit
            }
            Instr::Run(cmd) => {
                b.step(&text, "", async |b: &Builder<'_>, id: &str| {
                    let code = b.run(id, &cmd).await?;
                    if code != 0 {
                        bail!("line {line}: RUN exited with code {code}");
                    }
                    Ok(())
                })
                .await?
            }
            Instr::Copy(srcs, dst) => {
                let (tar, hash) = copy_tar(&context, &srcs)?;
                let dst = match (&b.workdir, dst.starts_with('/')) {
                    (Some(cur), false) => format!("{cur}/{dst}"),
                    _ => dst,
                };
                b.step(&text, &hash, async |b: &Builder<'_>, id: &str| {
                    let staging = "/tmp/.warren-copy.tar";
                    b.upload(id, staging, tar).await?;
                    let q = dst.replace('\'', r"'\''");
                    let code = b
                        .run(
                            id,
                            &format!(
                                "mkdir -p '{q}' && tar -xf {staging} -C '{q}' --no-same-owner; \
                                 rc=$?; rm -f {staging}; exit $rc"
                            ),
                        )
                        .await?;
                    if code != 0 {
                        bail!("line {line}: COPY: unpacking into {dst} exited with code {code}");
                    }
                    Ok(())
                })
                .await?
            }
        };
        if hit {
            hits += 1;
        }
    }
    // The result under its own name: one more (empty) commit of the last step's image.
    let id = b.sandbox().await?;
    let res = b.commit(&id, name).await;
    b.kill(&id).await;
    let digest = res?;
    println!("built {name} ({digest}), {hits} cached steps");
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_subset() {
        let f =
            "# comment\nFROM base\nRUN apt-get update && \\\n  echo hi\nRUN [\"echo\", \"a b\"]\n\
                 COPY a b /dst/\nENV A=1 B=\"two\"\nENV C three\nWORKDIR /w\nUSER user\n";
        let s = parse(f).unwrap();
        let instrs: Vec<Instr> = s.into_iter().map(|(_, _, i)| i).collect();
        assert_eq!(
            instrs,
            vec![
                Instr::From("base".into()),
                Instr::Run("apt-get update &&  echo hi".into()),
                Instr::Run("'echo' 'a b'".into()),
                Instr::Copy(vec!["a".into(), "b".into()], "/dst/".into()),
                Instr::Env(vec![("A".into(), "1".into()), ("B".into(), "two".into())]),
                Instr::Env(vec![("C".into(), "three".into())]),
                Instr::Workdir("/w".into()),
                Instr::User("user".into()),
            ]
        );
    }

    #[test]
    fn bad_files_name_the_line() {
        for (f, want) in [
            ("RUN x\n", "first instruction must be FROM"),
            (
                "FROM base\nEXPOSE 80\n",
                "line 2: unsupported instruction \"EXPOSE\"",
            ),
            ("FROM base\nCOPY --chown=1 a b\n", "line 2: COPY options"),
            ("FROM base\nRUN\n", "line 2: RUN needs"),
            ("FROM a\nFROM b\n", "only one FROM"),
            ("FROM base\nRUN a \\\n", "ends inside"),
            ("", "no instructions"),
        ] {
            let err = parse(f).unwrap_err().to_string();
            assert!(err.contains(want), "{f:?}: {err}");
        }
        let t = tempfile::tempdir().unwrap();
        assert!(copy_tar(t.path(), &["../x".into()]).is_err());
        assert!(copy_tar(t.path(), &["/etc".into()]).is_err());
        assert!(copy_tar(t.path(), &["missing".into()]).is_err());
    }

    #[test]
    fn copy_hash_follows_content() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("d")).unwrap();
        std::fs::write(t.path().join("d/f"), "one").unwrap();
        let (_, h1) = copy_tar(t.path(), &["d".into()]).unwrap();
        let (_, h2) = copy_tar(t.path(), &["d".into()]).unwrap();
        assert_eq!(h1, h2);
        std::fs::write(t.path().join("d/f"), "two").unwrap();
        let (_, h3) = copy_tar(t.path(), &["d".into()]).unwrap();
        assert_ne!(h1, h3);
    }
}
