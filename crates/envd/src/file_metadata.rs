//! User metadata on files (envd ≥ 0.6.2): `X-Metadata-<key>: <value>` headers of an upload
//! become `user.e2b.<key>` extended attributes of the written file, reported back in the upload
//! answer and in `EntryInfo.metadata` (Stat, ListDir).

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;

use axum::http::HeaderMap;

const HEADER_PREFIX: &str = "x-metadata-";
const XATTR_PREFIX: &str = "user.e2b.";

/// The metadata an upload carries. Keys are lowercased (header names are case-insensitive);
/// values must be UTF-8.
pub fn from_headers(headers: &HeaderMap) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (name, value) in headers {
        let Some(key) = name.as_str().strip_prefix(HEADER_PREFIX) else {
            continue;
        };
        if key.is_empty() {
            return Err("empty metadata key in an X-Metadata- header".into());
        }
        let value = value
            .to_str()
            .map_err(|_| format!("metadata value of {key:?} is not valid text"))?;
        out.insert(key.to_ascii_lowercase(), value.to_string());
    }
    Ok(out)
}

/// Stores metadata on an open file.
pub fn write(file: &impl AsFd, metadata: &BTreeMap<String, String>) -> io::Result<()> {
    for (k, v) in metadata {
        rustix::fs::fsetxattr(
            file,
            format!("{XATTR_PREFIX}{k}").as_str(),
            v.as_bytes(),
            rustix::fs::XattrFlags::empty(),
        )?;
    }
    Ok(())
}

/// Reads the metadata of a path (without following a final symlink). File systems without
/// extended attributes simply have none.
pub fn read(path: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut names = vec![0u8; 1024];
    let Ok(len) = rustix::fs::llistxattr(path, &mut names) else {
        return out;
    };
    for name in names[..len].split(|b| *b == 0) {
        let Ok(name) = std::str::from_utf8(name) else {
            continue;
        };
        let Some(key) = name.strip_prefix(XATTR_PREFIX) else {
            continue;
        };
        let mut value = vec![0u8; 4096];
        if let Ok(n) = rustix::fs::lgetxattr(path, name, &mut value) {
            out.insert(
                key.to_string(),
                String::from_utf8_lossy(&value[..n]).into_owned(),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_become_lowercase_keys() {
        let mut h = HeaderMap::new();
        h.insert("X-Metadata-Owner", "Alice".parse().unwrap());
        h.insert("x-metadata-kind", "report".parse().unwrap());
        h.insert("x-other", "no".parse().unwrap());
        let m = from_headers(&h).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m["owner"], "Alice");
        let mut bad = HeaderMap::new();
        bad.insert("x-metadata-", "x".parse().unwrap());
        assert!(from_headers(&bad).is_err());
    }

    #[test]
    fn round_trip_through_xattrs() {
        let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
        let path = dir.path().join("f");
        let f = std::fs::File::create(&path).unwrap();
        let m = BTreeMap::from([("a".to_string(), "1".to_string())]);
        match write(&f, &m) {
            Ok(()) => assert_eq!(read(&path), m),
            // Some build hosts' temp dirs lack user xattrs; nothing to check there.
            Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => {}
            Err(e) => panic!("{e}"),
        }
    }
}
