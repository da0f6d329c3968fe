//! A build's context: the tar a client uploads with `POST /warren/v1/templates/{name}/build`,
//! holding the Dockerfile and the COPY sources. It is untrusted input and is never unpacked on the
//! host: entries are read as a stream, names are checked (no absolute paths, no `..`), and each
//! COPY gets a new tar of just its sources, renamed relative to their destination, owned by root,
//! which is unpacked inside the step's sandbox.

use crate::dockerfile::normalize_source;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Component, Path};

/// Largest Dockerfile read from a context.
const MAX_DOCKERFILE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("build context: reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("build context: entry {0:?} is not a relative path inside the context")]
    Unsafe(String),
    #[error("build context has no {0} (give it in the context tar or as `dockerfile`)")]
    NoDockerfile(String),
    #[error("build context: {0} is larger than 1 MiB or not UTF-8")]
    BadDockerfile(String),
    #[error("COPY {0}: not found in the build context")]
    Missing(String),
    #[error("COPY {src}: hard link {name} points to {target}, outside the copied sources")]
    LinkOut {
        src: String,
        name: String,
        target: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ContextError + '_ {
    move |source| ContextError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// An entry name, normalised (`./a/b/` → `a/b`); refused when absolute or climbing out.
fn entry_name(raw: &Path) -> Result<String, ContextError> {
    let mut parts = Vec::new();
    for c in raw.components() {
        match c {
            Component::Normal(x) => parts.push(x.to_string_lossy().into_owned()),
            Component::CurDir => {}
            _ => return Err(ContextError::Unsafe(raw.display().to_string())),
        }
    }
    Ok(parts.join("/"))
}

fn entries(
    context: &Path,
) -> Result<tar::Archive<std::io::BufReader<std::fs::File>>, ContextError> {
    let f = std::fs::File::open(context).map_err(io(context))?;
    Ok(tar::Archive::new(std::io::BufReader::with_capacity(
        1 << 16,
        f,
    )))
}

/// Checks every entry name of the context and returns them (normalised).
pub fn list(context: &Path) -> Result<Vec<String>, ContextError> {
    let mut ar = entries(context)?;
    let mut out = Vec::new();
    for e in ar.entries().map_err(io(context))? {
        let e = e.map_err(io(context))?;
        let p = e.path().map_err(io(context))?.into_owned();
        out.push(entry_name(&p)?);
    }
    Ok(out)
}

/// Whether `src` (normalised; `""` is the whole context) names something in `names`.
pub fn has_source(names: &[String], src: &str) -> bool {
    let n = normalize_source(src);
    n.is_empty()
        || names
            .iter()
            .any(|e| *e == n || e.starts_with(&format!("{n}/")))
}

/// The Dockerfile at `name` in the context.
pub fn read_dockerfile(context: &Path, name: &str) -> Result<String, ContextError> {
    let want = normalize_source(name);
    let mut ar = entries(context)?;
    for e in ar.entries().map_err(io(context))? {
        let mut e = e.map_err(io(context))?;
        let p = e.path().map_err(io(context))?.into_owned();
        if entry_name(&p)? != want || e.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        if e.size() > MAX_DOCKERFILE {
            return Err(ContextError::BadDockerfile(name.to_string()));
        }
        let mut text = String::new();
        e.read_to_string(&mut text)
            .map_err(|_| ContextError::BadDockerfile(name.to_string()))?;
        return Ok(text);
    }
    Err(ContextError::NoDockerfile(name.to_string()))
}

/// Where an entry of the context lands for a COPY of `src`: a directory's contents go into the
/// destination, a file by its own name. `None` if the entry is not part of `src`.
fn rename(src: &str, name: &str) -> Option<String> {
    if src.is_empty() {
        return Some(name.to_string());
    }
    if name == src {
        return Some(name.rsplit('/').next().unwrap_or(name).to_string());
    }
    name.strip_prefix(src)
        .and_then(|r| r.strip_prefix('/'))
        .map(str::to_string)
}

/// What a COPY uploads.
#[derive(Debug)]
pub struct CopyTar {
    pub bytes: Vec<u8>,
    /// sha256 of `bytes`, part of the step's cache key.
    pub hash: String,
    /// When the COPY has one source and it is a file (not a directory): its name in the tar.
    pub single_file: Option<String>,
}

/// The tar of COPY `srcs` (deterministic: root-owned, entries in context order). A source that
/// is a directory contributes its contents (its own entry, if the context has one, becomes
/// nothing); hard links are renamed with their targets and refused when the target is not copied
/// too.
pub fn copy_tar(context: &Path, srcs: &[String]) -> Result<CopyTar, ContextError> {
    let mut out = tar::Builder::new(Vec::new());
    let mut single_file = None;
    for raw_src in srcs {
        let src = normalize_source(raw_src);
        let mut found = false;
        let mut ar = entries(context)?;
        for e in ar.entries().map_err(io(context))? {
            let mut e = e.map_err(io(context))?;
            let p = e.path().map_err(io(context))?.into_owned();
            let name = entry_name(&p)?;
            let Some(new_name) = rename(&src, &name) else {
                continue;
            };
            found = true;
            let kind = e.header().entry_type();
            if name == src && kind == tar::EntryType::Directory {
                // The copied directory itself: its contents land in the destination.
                continue;
            }
            if srcs.len() == 1
                && name == src
                && !src.is_empty()
                && kind != tar::EntryType::Directory
            {
                single_file = Some(new_name.clone());
            }
            if new_name.is_empty() {
                // The copied directory itself: its contents land in the destination.
                continue;
            }
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(e.header().mode().map_err(io(context))? & 0o7777);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(e.header().mtime().unwrap_or(0));
            match kind {
                tar::EntryType::Symlink => {
                    let target = e
                        .link_name()
                        .map_err(io(context))?
                        .map(|t| t.into_owned())
                        .unwrap_or_default();
                    h.set_size(0);
                    out.append_link(&mut h, &new_name, &target)
                        .map_err(io(context))?;
                }
                tar::EntryType::Link => {
                    let target = e
                        .link_name()
                        .map_err(io(context))?
                        .map(|t| t.into_owned())
                        .unwrap_or_default();
                    let t = entry_name(&target)?;
                    let Some(new_target) = rename(&src, &t).filter(|t| !t.is_empty()) else {
                        return Err(ContextError::LinkOut {
                            src: raw_src.clone(),
                            name,
                            target: t,
                        });
                    };
                    h.set_size(0);
                    out.append_link(&mut h, &new_name, &new_target)
                        .map_err(io(context))?;
                }
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(e.size());
                    out.append_data(&mut h, &new_name, &mut e)
                        .map_err(io(context))?;
                }
                tar::EntryType::Directory => {
                    h.set_size(0);
                    out.append_data(&mut h, &new_name, std::io::empty())
                        .map_err(io(context))?;
                }
                // Devices, fifos and pax/gnu extension records carry nothing a COPY keeps.
                _ => {}
            }
        }
        if !found {
            return Err(ContextError::Missing(raw_src.clone()));
        }
    }
    let bytes = out.into_inner().map_err(io(context))?;
    let hash = format!("{:x}", Sha256::digest(&bytes));
    Ok(CopyTar {
        bytes,
        hash,
        single_file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(entries: &[(&str, tar::EntryType, &[u8], &str)]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut b = tar::Builder::new(std::fs::File::create(f.path()).unwrap());
        for (name, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            // Raw names: the builder's own path checks would refuse the hostile ones.
            let bytes = name.as_bytes();
            h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
            if !link.is_empty() {
                h.set_link_name(link).unwrap();
            }
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.finish().unwrap();
        f
    }

    fn names(tar_bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut ar = tar::Archive::new(tar_bytes);
        ar.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let n = e.path().unwrap().display().to_string();
                let mut d = Vec::new();
                e.read_to_end(&mut d).unwrap();
                assert_eq!(e.header().uid().unwrap(), 0);
                (n, d)
            })
            .collect()
    }

    #[test]
    fn copies_files_dirs_and_the_whole_context() {
        use tar::EntryType::*;
        let ctx = context(&[
            ("Dockerfile", Regular, b"FROM base\n", ""),
            ("src/", Directory, b"", ""),
            ("src/a.txt", Regular, b"a", ""),
            ("src/sub/b.txt", Regular, b"b", ""),
            ("src/link", Link, b"", "src/a.txt"),
            ("top.txt", Regular, b"t", ""),
        ]);
        let t = copy_tar(ctx.path(), &["./src/".into(), "top.txt".into()]).unwrap();
        let got: Vec<String> = names(&t.bytes).into_iter().map(|(n, _)| n).collect();
        assert_eq!(got, ["a.txt", "sub/b.txt", "link", "top.txt"]);
        assert_eq!(t.single_file, None);
        let t2 = copy_tar(ctx.path(), &["src".into(), "top.txt".into()]).unwrap();
        assert_eq!(t.hash, t2.hash, "same sources, same hash");
        let all = copy_tar(ctx.path(), &[".".into()]).unwrap();
        assert_eq!(names(&all.bytes).len(), 6);
        let one = copy_tar(ctx.path(), &["src/sub/b.txt".into()]).unwrap();
        assert_eq!(one.single_file.as_deref(), Some("b.txt"));
        assert_eq!(names(&one.bytes), [("b.txt".to_string(), b"b".to_vec())]);
        assert_eq!(
            copy_tar(ctx.path(), &["src/sub".into()])
                .unwrap()
                .single_file,
            None
        );
        assert_eq!(
            read_dockerfile(ctx.path(), "./Dockerfile").unwrap(),
            "FROM base\n"
        );
        assert!(matches!(
            read_dockerfile(ctx.path(), "Other"),
            Err(ContextError::NoDockerfile(_))
        ));
        assert!(matches!(
            copy_tar(ctx.path(), &["nope".into()]),
            Err(ContextError::Missing(_))
        ));
        let l = list(ctx.path()).unwrap();
        assert!(has_source(&l, "src/sub") && has_source(&l, ".") && !has_source(&l, "sr"));
        // A hard link whose target is not copied.
        let out = copy_tar(ctx.path(), &["src/link".into()]).unwrap_err();
        assert!(
            out.to_string().contains("outside the copied sources"),
            "{out}"
        );
    }

    #[test]
    fn hostile_names_are_refused() {
        use tar::EntryType::*;
        for name in ["../evil", "a/../../evil", "/etc/passwd"] {
            let ctx = context(&[(name, Regular, b"x", "")]);
            let err = copy_tar(ctx.path(), &[".".into()]).unwrap_err();
            assert!(matches!(err, ContextError::Unsafe(_)), "{name}: {err}");
            assert!(list(ctx.path()).is_err());
        }
        let ctx = context(&[("h", Link, b"", "../../etc/shadow")]);
        assert!(copy_tar(ctx.path(), &[".".into()]).is_err());
        // A symlink pointing out is copied as a symlink: it is unpacked inside the sandbox,
        // where it points into the sandbox's own root.
        let ctx = context(&[("abs", Symlink, b"", "/etc")]);
        let t = copy_tar(ctx.path(), &[".".into()]).unwrap();
        let mut ar = tar::Archive::new(&t.bytes[..]);
        let e = ar.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(e.link_name().unwrap().unwrap().to_str(), Some("/etc"));
    }
}
