//! Pulls from a real registry: Debian's `docker-registry` started on loopback with htpasswd auth,
//! an image pushed to it by `skopeo copy` from a layout built here. Covers auth, a wrong
//! password, a registry that is down and a corrupt blob: each failure is a clear error and
//! leaves the store as it was.

mod common;

use common::*;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use warren_image::pull::{pull, Credentials};
use warren_image::{no_progress, ImageError, ImageStore};

struct Registry {
    child: Child,
    addr: String,
    storage: PathBuf,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn need(bin: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{bin} is missing: install the Debian package {package} (scripts/install-deps.sh)"
    );
}

fn start_registry(dir: &Path) -> Registry {
    need("docker-registry", "docker-registry");
    need("htpasswd", "apache2-utils");
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let storage = dir.join("storage");
    let htpasswd = dir.join("htpasswd");
    // The registry only accepts bcrypt entries.
    let out = Command::new("htpasswd")
        .args(["-Bbn", "tester", "s3cret"])
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::write(&htpasswd, &out.stdout).unwrap();
    let config = dir.join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\nauth:\n  htpasswd:\n    realm: warren-test\n    path: {}\n",
            storage.display(),
            htpasswd.display()
        ),
    )
    .unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let began = Instant::now();
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "registry did not start on {addr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Registry {
        child,
        addr,
        storage,
    }
}

fn push(layout: &Path, tag: &str, dest: &str) {
    need("skopeo", "skopeo");
    let out = Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--dest-creds",
            "tester:s3cret",
        ])
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{dest}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo copy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn creds(password: &str) -> Credentials {
    Credentials {
        username: "tester".into(),
        password: password.into(),
    }
}

#[tokio::test]
async fn pull_with_auth_and_every_failure_leaves_the_store_as_it_was() {
    #[allow(deprecated)]
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let reg = start_registry(tmp.path());
    let layout = tmp.path().join("layout");
    let base = layer(
        layer_tar(&[E::File("etc/os", b"test\n", 0o644), E::Dir("data", 0o755)]),
        "gzip",
    );
    let top = layer(
        layer_tar(&[
            E::File("data/big", &vec![0x5au8; 3 << 20], 0o644),
            E::File("etc/.wh.os", b"", 0o644),
        ]),
        // gzip: Debian's umoci (0.4.7), which reads the result below, predates zstd layers.
        "gzip",
    );
    write_layout(&layout, "v1", &[base, top]);
    let image = format!("{}/warren/test:v1", reg.addr);
    push(&layout, "v1", &image);

    let store = ImageStore::open(tmp.path().join("images")).unwrap();
    let empty = tree(store.root());

    // Wrong password, and no credentials at all: authentication errors, nothing written.
    let err = pull(&store, &image, Some(&creds("wrong")), "t", no_progress())
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::Unauthorized { .. }), "{err}");
    assert!(err.to_string().contains("authentication failed"), "{err}");
    assert_eq!(tree(store.root()), empty);
    let err = pull(&store, &image, None, "t", no_progress())
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::Unauthorized { .. }), "{err}");
    assert_eq!(tree(store.root()), empty);

    // A tag that does not exist.
    let missing = format!("{}/warren/test:nope", reg.addr);
    let err = pull(&store, &missing, Some(&creds("s3cret")), "t", no_progress())
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");

    // The real thing, with progress reports.
    let events = std::sync::Arc::new(std::sync::Mutex::new(vec![]));
    let sink = events.clone();
    let out = pull(
        &store,
        &image,
        Some(&creds("s3cret")),
        "pulled",
        std::sync::Arc::new(move |e| sink.lock().unwrap().push(e)),
    )
    .await
    .unwrap();
    assert_eq!(out.layer_dirs.len(), 2);
    assert_eq!(
        std::fs::read(out.layer_dirs[0].join("data/big"))
            .unwrap()
            .len(),
        3 << 20
    );
    assert!(std::fs::read(out.layer_dirs[1].join("etc/os")).is_ok());
    assert_eq!(
        store.resolve("pulled").unwrap().manifest_digest,
        out.image.manifest_digest
    );
    let ev = events.lock().unwrap().clone();
    assert!(ev
        .iter()
        .any(|e| e.phase == warren_image::Phase::Pull && e.total > 0 && e.done == e.total));
    assert!(ev.iter().any(|e| e.phase == warren_image::Phase::Unpack));
    let after_pull = tree(store.root());

    // A corrupt blob in the registry: the digest check refuses it and nothing is added.
    let layout2 = tmp.path().join("layout2");
    let l = layer(
        layer_tar(&[E::File("x", &vec![1u8; 100_000], 0o644)]),
        "gzip",
    );
    let bad_digest = sha(&l.blob);
    write_layout(&layout2, "v2", &[l]);
    let image2 = format!("{}/warren/test:v2", reg.addr);
    push(&layout2, "v2", &image2);
    let hex = &bad_digest[7..];
    let data = reg
        .storage
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data");
    let mut bytes = std::fs::read(&data).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(&data, &bytes).unwrap();
    let err = pull(
        &store,
        &image2,
        Some(&creds("s3cret")),
        "bad",
        no_progress(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().to_lowercase().contains("digest"), "{err}");
    assert_eq!(
        tree(store.root()),
        after_pull,
        "a corrupt blob leaves nothing behind"
    );

    // The registry goes away: a clear error, nothing half-written.
    drop(reg);
    let err = pull(
        &store,
        &image,
        Some(&creds("s3cret")),
        "again",
        no_progress(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ImageError::Registry { .. }), "{err}");
    assert!(err.to_string().contains("Connection refused"), "{err}");
    assert_eq!(tree(store.root()), after_pull);

    // umoci and skopeo read what Warren wrote.
    let oci = store.oci_dir();
    let inspect = Command::new("skopeo")
        .arg("inspect")
        .arg(format!("oci:{}:pulled", oci.display()))
        .output()
        .unwrap();
    assert!(
        inspect.status.success(),
        "skopeo inspect: {}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    need("umoci", "umoci");
    let bundle = tmp.path().join("bundle");
    let unpack = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:pulled", oci.display()))
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(
        unpack.status.success(),
        "umoci unpack: {}",
        String::from_utf8_lossy(&unpack.stderr)
    );
    assert!(bundle.join("rootfs/data/big").is_file());
    assert!(
        !bundle.join("rootfs/etc/os").exists(),
        "the whiteout applies"
    );
}
