//! Exports of upper dirs made by a real overlay mount (the tests run as root, as CI does).

use super::*;
use std::collections::BTreeMap;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::process::Command;

fn sh(cmd: &str) {
    let st = Command::new("sh").arg("-ec").arg(cmd).status().unwrap();
    assert!(st.success(), "command failed: {cmd}");
}

/// lower, upper, work and merged dirs with the overlay mounted as Warren mounts sandboxes.
struct Overlay {
    dir: tempfile::TempDir,
    mounted: bool,
}

impl Overlay {
    fn new(fill_lower: &str) -> Overlay {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        for d in ["lower", "upper", "work", "merged"] {
            std::fs::create_dir(p.join(d)).unwrap();
        }
        sh(&format!("cd {}/lower && {fill_lower}", p.display()));
        let opts = format!(
            "lowerdir={0}/lower,upperdir={0}/upper,workdir={0}/work,redirect_dir=off,metacopy=off,index=off",
            p.display()
        );
        let st = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(p.join("merged"))
            .status()
            .unwrap();
        assert!(
            st.success(),
            "overlay mount failed (tests need root and overlayfs)"
        );
        Overlay { dir, mounted: true }
    }

    fn merged(&self) -> PathBuf {
        self.dir.path().join("merged")
    }

    fn upper(&self) -> PathBuf {
        self.dir.path().join("upper")
    }

    fn unmount(&mut self) {
        if self.mounted {
            let st = Command::new("umount").arg(self.merged()).status().unwrap();
            assert!(st.success());
            self.mounted = false;
        }
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(self.merged()).status();
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Ent {
    kind: tar::EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    link: Option<String>,
    data: Vec<u8>,
    xattrs: BTreeMap<String, Vec<u8>>,
}

fn read_tar(bytes: &[u8]) -> Vec<(String, Ent)> {
    let mut ar = tar::Archive::new(bytes);
    let mut out = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let mut xattrs = BTreeMap::new();
        if let Some(pax) = e.pax_extensions().unwrap() {
            for x in pax {
                let x = x.unwrap();
                if let Some(name) = x.key().unwrap().strip_prefix("SCHILY.xattr.") {
                    xattrs.insert(name.to_string(), x.value_bytes().to_vec());
                }
            }
        }
        let path = e.path().unwrap().to_string_lossy().into_owned();
        let h = e.header().clone();
        let link = e
            .link_name()
            .unwrap()
            .map(|l| l.to_string_lossy().into_owned());
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        out.push((
            path,
            Ent {
                kind: h.entry_type(),
                mode: h.mode().unwrap(),
                uid: h.uid().unwrap(),
                gid: h.gid().unwrap(),
                link,
                data,
                xattrs,
            },
        ));
    }
    out
}

fn export(upper: &Path) -> (Vec<u8>, TarSummary) {
    let mut buf = Vec::new();
    let sum = export_upper_dir(upper, &mut buf).unwrap();
    (buf, sum)
}

#[test]
fn overlay_changes_become_oci_entries() {
    let mut ov = Overlay::new(
        "mkdir -p etc/keep etc/gone/sub data; echo a > etc/a; echo b > etc/b; echo c > etc/c; \
         echo old > etc/gone/sub/f; echo x > data/x",
    );
    let m = ov.merged();
    // Three deletions: the kernel makes three hard links to one whiteout inode.
    std::fs::remove_file(m.join("etc/a")).unwrap();
    std::fs::remove_file(m.join("etc/b")).unwrap();
    std::fs::remove_file(m.join("data/x")).unwrap();
    // A replaced directory becomes opaque.
    std::fs::remove_dir_all(m.join("etc/gone")).unwrap();
    std::fs::create_dir(m.join("etc/gone")).unwrap();
    std::fs::write(m.join("etc/gone/new"), "new\n").unwrap();
    // New file, hard link, symlink, owner, mode, xattr, a long name.
    std::fs::write(m.join("etc/hello"), "hello\n").unwrap();
    std::fs::hard_link(m.join("etc/hello"), m.join("data/hello-link")).unwrap();
    symlink("../etc/hello", m.join("data/sym")).unwrap();
    std::os::unix::fs::chown(m.join("etc/hello"), Some(1000), Some(1001)).unwrap();
    std::fs::set_permissions(m.join("etc/hello"), std::fs::Permissions::from_mode(0o4751)).unwrap();
    rustix::fs::lsetxattr(
        m.join("etc/hello"),
        "user.note",
        b"v\0binary",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let long = "d".repeat(120) + "/" + &"f".repeat(120);
    std::fs::create_dir(m.join("d".repeat(120))).unwrap();
    std::fs::write(m.join(&long), "long").unwrap();
    sh(&format!("mkfifo {}", m.join("data/fifo").display()));
    ov.unmount();

    // Precondition of the test: the whiteouts really share an inode.
    let wa = std::fs::symlink_metadata(ov.upper().join("etc/a")).unwrap();
    let wb = std::fs::symlink_metadata(ov.upper().join("etc/b")).unwrap();
    assert!(wa.file_type().is_char_device());
    assert_eq!(
        (wa.dev(), wa.ino()),
        (wb.dev(), wb.ino()),
        "kernel shares whiteout inodes"
    );

    let (bytes, sum) = export(&ov.upper());
    let entries = read_tar(&bytes);
    let names: Vec<&str> = entries.iter().map(|(p, _)| p.as_str()).collect();
    let map: BTreeMap<&str, &Ent> = entries.iter().map(|(p, e)| (p.as_str(), e)).collect();
    assert_eq!(sum.entries as usize, entries.len());
    assert_eq!(sum.size as usize, bytes.len());
    assert_eq!(
        sum.diff_id,
        format!("sha256:{:x}", Sha256::digest(&bytes)),
        "diffID is the sha256 of the uncompressed tar"
    );

    for wh in ["etc/.wh.a", "etc/.wh.b", "data/.wh.x"] {
        let e = map
            .get(wh)
            .unwrap_or_else(|| panic!("{wh} missing in {names:?}"));
        assert_eq!(
            e.kind,
            tar::EntryType::Regular,
            "{wh} must not be a hard link"
        );
        assert!(e.data.is_empty());
    }
    assert!(!names.contains(&"etc/a") && !names.contains(&"etc/b"));
    assert!(
        !names.contains(&"etc/c"),
        "unchanged lower files are not in the layer"
    );

    let opq = names
        .iter()
        .position(|n| *n == "etc/gone/.wh..wh..opq")
        .unwrap();
    let gone = names.iter().position(|n| *n == "etc/gone").unwrap();
    let new = names.iter().position(|n| *n == "etc/gone/new").unwrap();
    assert!(
        gone < opq && opq < new,
        "dir, then opaque marker, then children: {names:?}"
    );
    assert!(!map["etc/gone"]
        .xattrs
        .keys()
        .any(|k| k.starts_with("trusted.overlay")));

    // data/hello-link sorts before etc/hello: it is the first path and holds the content;
    // etc/hello links to it.
    let hello = map["data/hello-link"];
    assert_eq!(hello.kind, tar::EntryType::Regular);
    assert_eq!(hello.data, b"hello\n");
    assert_eq!((hello.uid, hello.gid, hello.mode), (1000, 1001, 0o4751));
    assert_eq!(hello.xattrs["user.note"], b"v\0binary");
    let link_entries: Vec<_> = entries
        .iter()
        .filter(|(_, e)| e.kind == tar::EntryType::Link)
        .collect();
    assert_eq!(
        link_entries.len(),
        1,
        "exactly one real hard link: {link_entries:?}"
    );
    assert_eq!(link_entries[0].1.link.as_deref(), Some("data/hello-link"));
    assert_eq!(link_entries[0].0, "etc/hello");

    let sym = map["data/sym"];
    assert_eq!(sym.kind, tar::EntryType::Symlink);
    assert_eq!(sym.link.as_deref(), Some("../etc/hello"));
    assert_eq!(map[long.as_str()].data, b"long");
    assert_eq!(map["data/fifo"].kind, tar::EntryType::Fifo);

    // Deterministic: the same tree gives the same bytes.
    let (again, sum2) = export(&ov.upper());
    assert_eq!(sum, sum2);
    assert_eq!(bytes, again);
}

#[test]
fn xattr_whiteouts_and_refused_redirects() {
    let dir = tempfile::tempdir().unwrap();
    let upper = dir.path();
    std::fs::create_dir(upper.join("d")).unwrap();
    std::fs::write(upper.join("d/gone"), "").unwrap();
    rustix::fs::lsetxattr(
        upper.join("d/gone"),
        WHITEOUT_XATTR,
        b"",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let (bytes, _) = export(upper);
    let names: Vec<String> = read_tar(&bytes).into_iter().map(|(p, _)| p).collect();
    assert_eq!(names, vec!["d".to_string(), "d/.wh.gone".to_string()]);

    rustix::fs::lsetxattr(
        upper.join("d"),
        "trusted.overlay.redirect",
        b"/x",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let err = export_upper_dir(upper, Vec::new()).unwrap_err();
    assert!(matches!(err, ExportError::NotPlainDiff { .. }), "{err}");
    assert!(err.to_string().contains("redirect_dir=off"), "{err}");

    let err = export_upper_dir(&upper.join("missing"), Vec::new()).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn gzip_digest_matches_bytes() {
    let tar = b"some tar bytes".repeat(1000);
    let (out, digest, size) = gzip_layer(&tar[..], Vec::new()).unwrap();
    assert_eq!(size as usize, out.len());
    assert_eq!(digest, format!("sha256:{:x}", Sha256::digest(&out)));
    let mut back = Vec::new();
    flate2::read::GzDecoder::new(&out[..])
        .read_to_end(&mut back)
        .unwrap();
    assert_eq!(back, tar);
}

#[test]
fn pre_copy_then_frozen_pass_equals_a_direct_export() {
    let dir = tempfile::tempdir().unwrap();
    let upper = dir.path().join("upper");
    std::fs::create_dir_all(upper.join("d")).unwrap();
    std::fs::write(upper.join("d/same"), vec![1u8; 100_000]).unwrap();
    std::fs::write(upper.join("d/grows"), b"short").unwrap();
    std::fs::write(upper.join("d/rewritten"), b"aaaa").unwrap();
    std::fs::write(upper.join("d/gone"), b"bye").unwrap();
    // Older than the guard, so unchanged files come from the pre-copy.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let pre = pre_copy(&upper, &dir.path().join("pre.tar")).unwrap();

    std::fs::write(upper.join("d/grows"), b"much longer now").unwrap();
    std::fs::write(upper.join("d/rewritten"), b"bbbb").unwrap();
    std::fs::remove_file(upper.join("d/gone")).unwrap();
    std::fs::write(upper.join("d/new"), b"new").unwrap();

    let frozen = frozen_pass(&upper, &pre, &dir.path().join("delta")).unwrap();
    assert_eq!(
        frozen.copied_bytes,
        (b"much longer now".len() + 4 + 3) as u64,
        "only new and changed content is copied while frozen"
    );
    let mut staged = Vec::new();
    let sum = finish_staging(&frozen, &pre, &mut staged).unwrap();
    let (direct, direct_sum) = export(&upper);
    assert_eq!(sum, direct_sum);
    assert!(staged == direct, "staged tar differs from a direct export");
}
