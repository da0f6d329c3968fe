//! The layer store against real tarballs, as root: unpacking (whiteouts, opaque dirs, owners,
//! modes, xattrs, hard links, devices), imports of layouts and archives, hostile input, and gc.

mod common;

use common::*;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use warren_image::import::{import_docker_archive, import_oci_archive, import_oci_dir};
use warren_image::{ImageError, ImageStore};

fn quiet(_: warren_image::ProgressEvent) {}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    let n = rustix::fs::lgetxattr(path, name, &mut buf).ok()?;
    buf.truncate(n);
    Some(buf)
}

fn rich_layer() -> Vec<u8> {
    layer_tar(&[
        E::Dir("etc", 0o755),
        E::File("etc/motd", b"hello\n", 0o644),
        E::Owned("home/u/secret", b"s", 0o600, 1234, 4321),
        E::File("bin/tool", b"#!/bin/sh\n", 0o4755),
        E::Xattr(
            "bin/ping",
            b"elf",
            "security.capability",
            b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
        ),
        E::Xattr("etc/tagged", b"x", "user.warren", b"yes"),
        E::Xattr("etc/sneaky", b"x", "trusted.overlay.redirect", b"/etc"),
        E::Symlink("etc/link", "/etc/motd"),
        E::Hardlink("etc/motd2", "etc/motd"),
        E::Char("dev/null", 1, 3),
        E::Fifo("run/fifo"),
        E::File("old/.wh.gone", b"", 0o644),
        E::Dir("replaced", 0o750),
        E::File("replaced/.wh..wh..opq", b"", 0o644),
        E::File("replaced/new", b"n", 0o644),
    ])
}

#[test]
fn unpack_translates_whiteouts_and_keeps_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("layout");
    let l = layer(rich_layer(), "gzip");
    let diff_id = l.diff_id.clone();
    write_layout(&src, "rich", &[l]);
    let store = ImageStore::open(tmp.path().join("images")).unwrap();
    let out = import_oci_dir(&store, &src, None, "rich:1", &quiet).unwrap();
    assert_eq!(out.layer_dirs, vec![store.layer_dir(&diff_id).unwrap()]);
    let d = &out.layer_dirs[0];

    assert_eq!(std::fs::read(d.join("etc/motd")).unwrap(), b"hello\n");
    let secret = std::fs::metadata(d.join("home/u/secret")).unwrap();
    assert_eq!(
        (secret.uid(), secret.gid(), secret.mode() & 0o7777),
        (1234, 4321, 0o600)
    );
    assert_eq!(
        std::fs::metadata(d.join("bin/tool")).unwrap().mode() & 0o7777,
        0o4755,
        "setuid kept"
    );
    assert!(
        xattr(&d.join("bin/ping"), "security.capability").is_some(),
        "file capability kept"
    );
    assert_eq!(
        xattr(&d.join("etc/tagged"), "user.warren").as_deref(),
        Some(&b"yes"[..])
    );
    assert_eq!(
        xattr(&d.join("etc/sneaky"), "trusted.overlay.redirect"),
        None,
        "overlay xattrs from a tar are dropped"
    );
    assert_eq!(
        std::fs::read_link(d.join("etc/link")).unwrap(),
        Path::new("/etc/motd")
    );
    assert_eq!(
        std::fs::metadata(d.join("etc/motd")).unwrap().ino(),
        std::fs::metadata(d.join("etc/motd2")).unwrap().ino(),
        "hard link within the layer"
    );
    let null = std::fs::metadata(d.join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), rustix::fs::makedev(1, 3));
    assert!(std::fs::metadata(d.join("run/fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    let wh = std::fs::symlink_metadata(d.join("old/gone")).unwrap();
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "whiteout is a 0:0 char device"
    );
    assert!(!d.join("old/.wh.gone").exists());
    assert_eq!(
        xattr(&d.join("replaced"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert!(!d.join("replaced/.wh..wh..opq").exists());
    assert_eq!(
        std::fs::metadata(d.join("replaced")).unwrap().mode() & 0o7777,
        0o750
    );

    // The image resolves by its name, with its config.
    let img = store.resolve("rich:1").unwrap();
    let cfg = img.config.config.unwrap();
    assert_eq!(cfg.working_dir.as_deref(), Some("/work"));
    assert_eq!(cfg.user.as_deref(), Some("1000"));
    assert_eq!(store.layer_refs().unwrap().get(&diff_id), Some(&1));
}

#[test]
fn overlay_of_unpacked_layers_hides_whited_out_files() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("layout");
    let base = layer(
        layer_tar(&[
            E::File("keep", b"k", 0o644),
            E::File("gone", b"g", 0o644),
            E::File("replaced/old", b"o", 0o644),
        ]),
        "none",
    );
    let top = layer(
        layer_tar(&[
            E::File(".wh.gone", b"", 0o644),
            E::Dir("replaced", 0o755),
            E::File("replaced/.wh..wh..opq", b"", 0o644),
            E::File("replaced/new", b"n", 0o644),
        ]),
        "zstd",
    );
    write_layout(&src, "two", &[base, top]);
    let store = ImageStore::open(tmp.path().join("images")).unwrap();
    let out = import_oci_dir(&store, &src, Some("two"), "two", &quiet).unwrap();
    assert_eq!(out.layer_dirs.len(), 2);
    let merged = tmp.path().join("merged");
    std::fs::create_dir(&merged).unwrap();
    let lower = out
        .layer_dirs
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let st = std::process::Command::new("mount")
        .args([
            "-t",
            "overlay",
            "overlay",
            "-o",
            &format!("lowerdir={lower}"),
        ])
        .arg(&merged)
        .status()
        .unwrap();
    assert!(st.success(), "overlay mount of the unpacked layers");
    let names = tree(&merged);
    let _ = std::process::Command::new("umount").arg(&merged).status();
    assert_eq!(names, vec!["keep", "replaced", "replaced/new"]);
}

fn assert_unchanged(store: &ImageStore, before: &[String]) {
    assert_eq!(&tree(store.root()), before, "the store is as it was");
}

#[test]
fn hostile_paths_stay_inside_the_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let store = ImageStore::open(tmp.path().join("images")).unwrap();
    let before = tree(store.root());

    // `..` in an entry path: refused, and nothing is written.
    let dotdot = raw_tar(&[("a/../../../outside/evil", tar::EntryType::Regular, b"x", "")]);
    let src = tmp.path().join("l1");
    write_layout(&src, "x", &[layer(dotdot, "none")]);
    let err = import_oci_dir(&store, &src, None, "x", &quiet).unwrap_err();
    assert!(matches!(err, ImageError::UnsafeEntry { .. }), "{err}");
    assert!(err.to_string().contains(".."), "{err}");
    assert_unchanged(&store, &before);
    assert!(tree(&outside).is_empty());

    // A hard link to a path outside: refused.
    let link_out = raw_tar(&[("h", tar::EntryType::Link, b"", "../../outside/target")]);
    let src = tmp.path().join("l2");
    write_layout(&src, "x", &[layer(link_out, "none")]);
    assert!(import_oci_dir(&store, &src, None, "x", &quiet).is_err());
    assert_unchanged(&store, &before);

    // A symlink that points out, then an entry written through it: resolved inside the layer
    // (as in a chroot), where that path does not exist: refused, nothing written on the host.
    let abs = outside.display().to_string();
    let dangling = raw_tar(&[
        ("abs", tar::EntryType::Symlink, b"", &abs),
        ("abs/pwned", tar::EntryType::Regular, b"x", ""),
    ]);
    let src = tmp.path().join("l3");
    write_layout(&src, "sym", &[layer(dangling, "gzip")]);
    let err = import_oci_dir(&store, &src, None, "sym", &quiet).unwrap_err();
    assert!(err.to_string().contains("abs/pwned"), "{err}");
    assert!(
        tree(&outside).is_empty(),
        "nothing written outside: {:?}",
        tree(&outside)
    );
    assert_unchanged(&store, &before);

    // Absolute and relative symlinks to the root, then entries through them: they land in the
    // layer's root, never the host's.
    let through = raw_tar(&[
        ("root", tar::EntryType::Symlink, b"", "/"),
        ("root/pwned", tar::EntryType::Regular, b"x", ""),
        ("rel", tar::EntryType::Symlink, b"", "../../../../../../.."),
        ("rel/pwned2", tar::EntryType::Regular, b"y", ""),
    ]);
    let src = tmp.path().join("l4");
    write_layout(&src, "sym", &[layer(through, "gzip")]);
    let out = import_oci_dir(&store, &src, None, "sym", &quiet).unwrap();
    let d = &out.layer_dirs[0];
    assert_eq!(
        std::fs::read_link(d.join("root")).unwrap(),
        Path::new("/"),
        "the symlink itself is kept"
    );
    assert_eq!(std::fs::read(d.join("pwned")).unwrap(), b"x");
    assert_eq!(std::fs::read(d.join("pwned2")).unwrap(), b"y");
    assert!(!Path::new("/pwned").exists() && !Path::new("/pwned2").exists());
}

#[test]
fn corrupt_blobs_are_refused_and_leave_the_store_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(tmp.path().join("images")).unwrap();
    let before = tree(store.root());
    let make = |name: &str| {
        let src = tmp.path().join(name);
        let l = layer(layer_tar(&[E::File("f", &[7u8; 100_000], 0o644)]), "gzip");
        let digest = l.blob.len();
        write_layout(&src, "img", &[l]);
        (src, digest)
    };
    let layer_blob = |src: &Path| {
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(src.join("index.json")).unwrap()).unwrap();
        let m = index["manifests"][0]["digest"].as_str().unwrap()[7..].to_string();
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(src.join("blobs/sha256").join(m)).unwrap())
                .unwrap();
        src.join("blobs/sha256")
            .join(&manifest["layers"][0]["digest"].as_str().unwrap()[7..])
    };

    // Truncated layer blob.
    let (src, size) = make("trunc");
    let blob = layer_blob(&src);
    let bytes = std::fs::read(&blob).unwrap();
    std::fs::write(&blob, &bytes[..size / 2]).unwrap();
    let err = import_oci_dir(&store, &src, None, "img", &quiet).unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::DigestMismatch { .. } | ImageError::SizeMismatch { .. }
        ),
        "{err}"
    );
    assert_unchanged(&store, &before);

    // Same size, different content.
    let (src, _) = make("flip");
    let blob = layer_blob(&src);
    let mut bytes = std::fs::read(&blob).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0xff;
    std::fs::write(&blob, &bytes).unwrap();
    let err = import_oci_dir(&store, &src, None, "img", &quiet).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains("digest mismatch"), "{err}");
    assert_unchanged(&store, &before);

    // A config whose diff_id does not match the layer's content.
    let src = tmp.path().join("diffid");
    let mut l = layer(layer_tar(&[E::File("f", b"1", 0o644)]), "none");
    l.diff_id = sha(b"something else");
    write_layout(&src, "img", &[l]);
    let err = import_oci_dir(&store, &src, None, "img", &quiet).unwrap_err();
    assert!(err.to_string().contains("uncompressed layer"), "{err}");
    assert_unchanged(&store, &before);

    // Not a layout at all; an unknown name in a layout.
    let err = import_oci_dir(&store, tmp.path(), None, "img", &quiet).unwrap_err();
    assert!(err.to_string().contains("not an OCI image layout"), "{err}");
    let (src, _) = make("ok");
    let err = import_oci_dir(&store, &src, Some("nope"), "img", &quiet).unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert_unchanged(&store, &before);
}

#[test]
fn archives_import_and_truncated_archives_do_not() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(tmp.path().join("images")).unwrap();
    let before = tree(store.root());

    // oci-archive: the layout in a tar.
    let src = tmp.path().join("layout");
    let l = layer(
        layer_tar(&[E::File("from-oci-archive", b"1", 0o644)]),
        "gzip",
    );
    write_layout(&src, "latest", &[l]);
    let archive = tmp.path().join("img.oci.tar");
    std::fs::write(&archive, tar_dir(&src)).unwrap();
    let out = import_oci_archive(&store, &archive, None, "a", &quiet).unwrap();
    assert!(out.layer_dirs[0].join("from-oci-archive").is_file());

    // Truncated archive: a clear error and nothing new in the store.
    let bytes = std::fs::read(&archive).unwrap();
    let cut = tmp.path().join("cut.tar");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let after_first = tree(store.root());
    let err = import_oci_archive(&store, &cut, None, "b", &quiet).unwrap_err();
    assert!(
        err.to_string().contains(&cut.display().to_string()),
        "{err}"
    );
    assert_unchanged(&store, &after_first);

    // docker-archive: manifest.json, config, uncompressed layer tars.
    let d = tmp.path().join("docker");
    std::fs::create_dir_all(d.join("abc")).unwrap();
    let tar1 = layer_tar(&[E::File("from-docker", b"d", 0o644)]);
    std::fs::write(d.join("abc/layer.tar"), &tar1).unwrap();
    let config = config_json(&[sha(&tar1)]);
    std::fs::write(d.join("cfg.json"), &config).unwrap();
    std::fs::write(
        d.join("manifest.json"),
        serde_json::to_vec(&serde_json::json!([{"Config": "cfg.json", "RepoTags": ["busy:1"], "Layers": ["abc/layer.tar"]}])).unwrap(),
    )
    .unwrap();
    let darchive = tmp.path().join("docker.tar");
    std::fs::write(&darchive, tar_dir(&d)).unwrap();
    let out = import_docker_archive(&store, &darchive, Some("busy:1"), "d", &quiet).unwrap();
    assert!(out.layer_dirs[0].join("from-docker").is_file());
    assert_eq!(
        out.image.config.config.unwrap().working_dir.as_deref(),
        Some("/work")
    );
    // Only image blobs stay: manifest.json and friends were spooled and removed.
    let refs: Vec<String> = store.refs().unwrap().into_iter().map(|(r, _)| r).collect();
    assert_eq!(refs, vec!["a", "d"]);
    assert_eq!(
        store.gc().unwrap().unwrap().blobs,
        0,
        "no garbage left behind by imports"
    );

    let err = import_docker_archive(&store, &darchive, Some("other:2"), "e", &quiet).unwrap_err();
    assert!(err.is_not_found(), "{err}");
    let _ = before;
}

#[test]
fn layers_are_shared_counted_and_collected() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(tmp.path().join("images")).unwrap();
    let shared = || layer(layer_tar(&[E::File("shared", b"s", 0o644)]), "gzip");
    let own = |n: &str| layer(layer_tar(&[E::File(n, b"o", 0o644)]), "gzip");
    let shared_id = shared().diff_id;
    for name in ["one", "two"] {
        let src = tmp.path().join(name);
        write_layout(&src, name, &[shared(), own(name)]);
        import_oci_dir(&store, &src, None, name, &quiet).unwrap();
    }
    let one = store.resolve("one").unwrap();
    let two = store.resolve("two").unwrap();
    let d1 = store.layer_dirs(&one, &quiet).unwrap();
    let d2 = store.layer_dirs(&two, &quiet).unwrap();
    assert_eq!(d1.last(), d2.last(), "the shared bottom layer is one dir");
    assert_eq!(store.layer_refs().unwrap()[&shared_id], 2);

    assert!(store.remove_ref("one").unwrap());
    let report = store.gc().unwrap().unwrap();
    assert_eq!(report.layers, 1, "only one's own layer goes");
    assert!(d2.iter().all(|d| d.is_dir()));
    assert!(!d1[0].exists());
    assert_eq!(store.layer_refs().unwrap()[&shared_id], 1);

    // gc waits for running operations.
    let op = store.begin_operation();
    store.remove_ref("two").unwrap();
    assert_eq!(store.gc().unwrap(), None);
    drop(op);
    // Layers a sandbox stacks stay while it does, though no image names them any more.
    let report = store.gc_keeping(&d2[..1]).unwrap().unwrap();
    assert_eq!(report.layers, 1, "only the layer no sandbox uses goes");
    assert!(d2[0].is_dir() && !d2[1].exists());
    let report = store.gc().unwrap().unwrap();
    assert_eq!(report.layers, 1);
    assert!(tree(&store.layers_dir()).is_empty());
    assert_eq!(
        tree(&store.oci_dir().join("blobs/sha256")),
        Vec::<String>::new()
    );
    assert!(matches!(store.resolve("two"), Err(ImageError::NotFound(_))));
}

#[test]
fn blob_writer_verifies_and_names() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(tmp.path().join("images")).unwrap();
    let info = store.add_blob_bytes(b"abc", None).unwrap();
    assert_eq!(info.digest, sha(b"abc"));
    assert!(info.added);
    assert!(
        !store
            .add_blob_bytes(b"abc", Some(&sha(b"abc")))
            .unwrap()
            .added
    );
    let err = store
        .add_blob_bytes(b"abd", Some(&sha(b"abc")))
        .unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }));
    assert!(matches!(
        store.add_blob_bytes(b"x", Some("md5:00")),
        Err(ImageError::BadDigest(_))
    ));
    assert!(tree(&store.tmp_dir()).is_empty(), "no partial blob left");
    assert!(matches!(
        warren_image::pull::parse_reference("UPPER/Case::bad"),
        Err(ImageError::BadReference { .. })
    ));
    assert!(warren_image::pull::is_loopback_registry("127.0.0.1:5000"));
    assert!(warren_image::pull::is_loopback_registry("localhost:5000"));
    assert!(warren_image::pull::is_loopback_registry("[::1]:5000"));
    assert!(!warren_image::pull::is_loopback_registry(
        "registry.example.com"
    ));
}

#[test]
fn an_interrupted_operation_leaves_nothing_after_reopen_and_gc() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("images");
    let store = ImageStore::open(&root).unwrap();
    let src = tmp.path().join("layout");
    write_layout(
        &src,
        "img",
        &[layer(layer_tar(&[E::File("f", b"1", 0o644)]), "gzip")],
    );
    import_oci_dir(&store, &src, None, "kept", &quiet).unwrap();
    let before = tree(&root);
    // What a crash mid-pull leaves: a partial blob and a half-unpacked layer in tmp/, a
    // complete blob and an unpacked layer nothing references yet.
    std::fs::write(store.tmp_dir().join("blob-1-0"), b"partial").unwrap();
    std::fs::create_dir_all(store.tmp_dir().join("layer-1-1/usr/lib")).unwrap();
    store.add_blob_bytes(b"orphan blob", None).unwrap();
    std::fs::create_dir_all(store.layer_dir(&sha(b"orphan layer")).unwrap().join("etc")).unwrap();
    drop(store);
    let store = ImageStore::open(&root).unwrap();
    let report = store.gc().unwrap().unwrap();
    assert_eq!((report.blobs, report.layers), (1, 1));
    assert_eq!(tree(&root), before);
    assert!(store.resolve("kept").is_ok());
}
