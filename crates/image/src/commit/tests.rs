//! Commit round trip on real overlays: changes made through a mount, committed, then mounted again
//! from the image's layer dirs must show the same tree; skopeo and umoci must read the layout.

use super::*;
use std::collections::BTreeMap;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::process::Command;

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-ec").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "command failed: {cmd}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn mount_overlay(lowers: &[PathBuf], upper: &Path, work: &Path, at: &Path) -> Mount {
    std::fs::create_dir_all(upper).unwrap();
    std::fs::create_dir_all(work).unwrap();
    std::fs::create_dir_all(at).unwrap();
    let lower = lowers
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let opts = format!(
        "lowerdir={lower},upperdir={},workdir={},index=off,redirect_dir=off,metacopy=off",
        upper.display(),
        work.display()
    );
    let st = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(at)
        .status()
        .unwrap();
    assert!(st.success(), "overlay mount (tests need root)");
    Mount(at.to_path_buf())
}

/// path → (type, mode, uid, gid, content or link target, link group), for comparing trees.
fn manifest(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, String> = BTreeMap::new();
    fn walk(
        root: &Path,
        dir: &Path,
        out: &mut BTreeMap<String, String>,
        inodes: &mut BTreeMap<u64, String>,
    ) {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            let p = dir.join(&n);
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let what = if ft.is_symlink() {
                format!("l->{}", std::fs::read_link(&p).unwrap().display())
            } else if ft.is_dir() {
                "d".to_string()
            } else if ft.is_file() {
                let link = if m.nlink() > 1 {
                    inodes.entry(m.ino()).or_insert(rel.clone()).clone()
                } else {
                    String::new()
                };
                format!(
                    "f:{}:{link}",
                    String::from_utf8_lossy(&std::fs::read(&p).unwrap())
                )
            } else {
                format!("other:{:o}", m.mode())
            };
            out.insert(
                rel,
                format!("{what} {:o} {}:{}", m.mode() & 0o7777, m.uid(), m.gid()),
            );
            if ft.is_dir() {
                walk(root, &p, out, inodes);
            }
        }
    }
    walk(root, root, &mut out, &mut inodes);
    out
}

#[test]
fn commit_round_trip_through_layer_dirs_skopeo_and_umoci() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    let base = p.join("base");
    std::fs::create_dir_all(base.join("etc/conf.d")).unwrap();
    std::fs::create_dir_all(base.join("srv/old")).unwrap();
    std::fs::write(base.join("etc/motd"), "base motd\n").unwrap();
    std::fs::write(base.join("etc/keep"), "kept\n").unwrap();
    std::fs::write(base.join("etc/conf.d/a"), "a\n").unwrap();
    std::fs::write(base.join("srv/old/x"), "x\n").unwrap();

    let merged = p.join("merged");
    {
        let _m = mount_overlay(
            std::slice::from_ref(&base),
            &p.join("upper"),
            &p.join("work"),
            &merged,
        );
        std::fs::remove_file(merged.join("etc/motd")).unwrap();
        std::fs::remove_dir_all(merged.join("srv/old")).unwrap();
        std::fs::create_dir(merged.join("srv/old")).unwrap();
        std::fs::write(merged.join("srv/old/new"), "replaced\n").unwrap();
        std::fs::create_dir_all(merged.join("home/user")).unwrap();
        std::fs::write(merged.join("home/user/notes"), "hi\n").unwrap();
        std::os::unix::fs::chown(merged.join("home/user/notes"), Some(1000), Some(1000)).unwrap();
        std::fs::set_permissions(
            merged.join("home/user/notes"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::fs::hard_link(merged.join("home/user/notes"), merged.join("home/user/hl")).unwrap();
        symlink("/etc/keep", merged.join("home/user/sym")).unwrap();
        sh(&format!(
            "mkfifo {}",
            merged.join("home/user/fifo").display()
        ));
    }
    let want = {
        let _m = mount_overlay(
            std::slice::from_ref(&base),
            &p.join("upper"),
            &p.join("work"),
            &merged,
        );
        manifest(&merged)
    };

    let store = Committer::open(&p.join("images")).unwrap();
    // The orchestrator's path: pre-copy, frozen pass, staging; the same tar as a direct export.
    let mut pre = store.pre_copy(&p.join("upper")).unwrap();
    store.frozen_pass(&p.join("upper"), &mut pre).unwrap();
    let staged = store.finish_staging(pre).unwrap();
    assert_eq!(
        staged.summary,
        store.stage_upper(&p.join("upper")).unwrap().summary
    );
    assert_eq!(
        std::fs::read_dir(p.join("images/tmp")).unwrap().count(),
        1,
        "only the staged tar is left"
    );
    let tar_path = staged.tar.clone();
    assert!(tar_path.exists());
    let base_spec = Base::Dirs {
        lower_dirs: vec![base.clone()],
        host_binds: vec![("/usr".into(), "/usr".into())],
        user: None,
        start_command: None,
    };
    let c = store
        .finish_commit(staged, &base_spec, "local/test:v1", "warren commit test")
        .unwrap();
    assert!(!tar_path.exists(), "the staging tar is removed");
    assert!(c.digest.starts_with("sha256:"));
    assert!(store.store().has_blob(&c.layer.digest));

    // The image as a template: its layer dirs, stacked, show exactly the committed tree.
    let img = store.store().resolve("local/test:v1").unwrap();
    let lower_dirs = store
        .store()
        .layer_dirs(&img, &*crate::no_progress())
        .unwrap();
    assert_eq!(lower_dirs.len(), 2);
    assert_eq!(
        host_binds(&img.config_raw),
        vec![("/usr".into(), "/usr".into())]
    );
    let again = p.join("again");
    let got = {
        let _m = mount_overlay(&lower_dirs, &p.join("upper2"), &p.join("work2"), &again);
        manifest(&again)
    };
    assert_eq!(got, want);

    // A second commit of the same template reuses the exported base layer.
    let staged = store.stage_upper(&p.join("upper")).unwrap();
    let c2 = store
        .finish_commit(staged, &base_spec, "local/test:v2", "again")
        .unwrap();
    let l1 = store
        .store()
        .resolve("local/test:v1")
        .unwrap()
        .manifest
        .layers;
    let l2 = store
        .store()
        .resolve("local/test:v2")
        .unwrap()
        .manifest
        .layers;
    assert_eq!(l1[0], l2[0], "base dir exported once");
    assert_eq!(c.diff_id, c2.diff_id, "same upper dir, same diffID");

    // A sandbox whose lower dirs are layer dirs of the store (an image template) reuses their
    // blobs instead of exporting them again.
    let staged = store.stage_upper(&p.join("upper")).unwrap();
    let mut lowest_first = lower_dirs.clone();
    lowest_first.reverse();
    store
        .finish_commit(
            staged,
            &Base::Dirs {
                lower_dirs: lowest_first,
                host_binds: vec![],
                user: None,
                start_command: None,
            },
            "local/test:dirs",
            "from layer dirs",
        )
        .unwrap();
    assert_eq!(
        store
            .store()
            .resolve("local/test:dirs")
            .unwrap()
            .manifest
            .layers[..2],
        l1[..],
        "layer dirs map back to their blobs"
    );
    assert!(store.store().remove_ref("local/test:dirs").unwrap());

    // A commit on top of a committed image keeps its layers and config.
    std::fs::create_dir_all(p.join("upper3/top")).unwrap();
    std::fs::write(p.join("upper3/top/f"), "top").unwrap();
    let staged = store.stage_upper(&p.join("upper3")).unwrap();
    let parent = store.store().resolve("local/test:v1").unwrap();
    store
        .finish_commit(
            staged,
            &Base::Image(Box::new(parent)),
            "local/test:v3",
            "third",
        )
        .unwrap();
    let v3 = store.store().resolve("local/test:v3").unwrap();
    assert_eq!(v3.manifest.layers.len(), 3);
    assert_eq!(&v3.manifest.layers[..2], &l1[..]);
    let cfg: serde_json::Value = serde_json::from_slice(&v3.config_raw).unwrap();
    assert_eq!(cfg["history"].as_array().unwrap().len(), 3);
    assert_eq!(host_binds(&v3.config_raw).len(), 1, "labels carried over");

    // Interoperability: skopeo reads the layout, umoci unpacks it.
    let oci = store.store().oci_dir().display().to_string();
    let out = sh(&format!("skopeo inspect oci:{oci}:local/test:v1"));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["Layers"].as_array().unwrap().len(), 2, "{out}");
    assert_eq!(v["Digest"], c.digest);
    let bundle = p.join("bundle");
    sh(&format!(
        "umoci unpack --image {oci}:local/test:v3 {}",
        bundle.display()
    ));
    let r = bundle.join("rootfs");
    assert_eq!(std::fs::read_to_string(r.join("top/f")).unwrap(), "top");
    assert_eq!(
        std::fs::read_to_string(r.join("srv/old/new")).unwrap(),
        "replaced\n"
    );
    assert!(!r.join("etc/motd").exists(), "whiteout applied by umoci");
    assert!(!r.join("srv/old/x").exists(), "opaque dir applied by umoci");
    assert_eq!(
        std::fs::read_to_string(r.join("etc/keep")).unwrap(),
        "kept\n"
    );
    let m = std::fs::symlink_metadata(r.join("home/user/notes")).unwrap();
    let h = std::fs::symlink_metadata(r.join("home/user/hl")).unwrap();
    assert_eq!((m.ino(), m.uid(), m.mode() & 0o777), (h.ino(), 1000, 0o600));

    // GC: dropping v1..v3 leaves no blob and no layer dir behind.
    for n in ["local/test:v1", "local/test:v2", "local/test:v3"] {
        assert!(store.store().remove_ref(n).unwrap());
    }
    let removed = store.store().gc().unwrap().expect("no operation running");
    assert!(removed.blobs >= 6, "{removed:?}");
    assert_eq!(
        std::fs::read_dir(p.join("images/layers")).unwrap().count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(p.join("images/oci/blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn bad_names_are_refused() {
    for bad in ["", "UPPER/x", "a b", "/x", "x:", "repo@sha256:00", "a//b"] {
        assert!(validate_image_name(bad).is_err(), "{bad}");
    }
    for good in ["x", "localhost:5000/a/b:v1", "reg.example/a-b_c.d:1.0"] {
        validate_image_name(good).unwrap();
    }
    let t = tempfile::tempdir().unwrap();
    let store = Committer::open(t.path()).unwrap();
    let err = store.store().resolve("nope:v1").unwrap_err();
    assert!(err.to_string().contains("nope:v1"), "{err}");
}

#[test]
fn config_patch_merges_env_and_sets_the_rest() {
    let mut cfg = serde_json::json!({
        "config": {"Env": ["PATH=/bin", "A=old"], "Cmd": ["sh"], "User": "1000"},
        "rootfs": {"type": "layers", "diff_ids": []},
    });
    ConfigPatch::default().apply(&mut cfg);
    assert_eq!(
        cfg["config"]["User"], "1000",
        "an empty patch changes nothing"
    );
    let patch = ConfigPatch {
        env: vec![("A".into(), "new".into()), ("B".into(), "two words".into())],
        working_dir: Some("/srv".into()),
        user: Some("root".into()),
        cmd: None,
        entrypoint: Some(vec!["tini".into()]),
    };
    patch.apply(&mut cfg);
    let c = &cfg["config"];
    assert_eq!(
        c["Env"],
        serde_json::json!(["PATH=/bin", "A=new", "B=two words"])
    );
    assert_eq!(c["WorkingDir"], "/srv");
    assert_eq!(c["User"], "root");
    assert_eq!(c["Entrypoint"], serde_json::json!(["tini"]));
    assert!(c.get("Cmd").is_none(), "ENTRYPOINT resets the base's CMD");
    let mut bare = serde_json::json!({});
    ConfigPatch {
        cmd: Some(vec!["run".into()]),
        ..Default::default()
    }
    .apply(&mut bare);
    assert_eq!(bare["config"]["Cmd"], serde_json::json!(["run"]));
}
