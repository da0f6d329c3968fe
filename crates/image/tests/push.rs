//! Push to a real registry: Debian's `docker-registry` on loopback with htpasswd auth, started by
//! the test. Checks a push with the right password (then `skopeo` pulls the image back), a wrong
//! password and a registry that is down, each with a clear error.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use warren_image::commit::{Base, Committer};
use warren_image::push::{push_image, PushError};

struct Registry {
    child: Child,
    addr: String,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_registry(dir: &Path) -> Registry {
    let out = Command::new("htpasswd")
        .args(["-Bbn", "alice", "s3cret"])
        .output()
        .expect("htpasswd (apache2-utils) is installed");
    assert!(out.status.success());
    std::fs::write(dir.join("htpasswd"), &out.stdout).unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let config = format!(
        "version: 0.1\nlog: {{level: error}}\nstorage: {{filesystem: {{rootdirectory: {}}}}}\n\
         http: {{addr: \"{addr}\"}}\nauth: {{htpasswd: {{realm: warren-test, path: {}}}}}\n",
        dir.join("data").display(),
        dir.join("htpasswd").display()
    );
    std::fs::write(dir.join("config.yml"), config).unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(dir.join("config.yml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("docker-registry is installed");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "registry did not start on {addr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Registry { child, addr }
}

fn sh(args: &[&str]) -> (bool, String) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test]
async fn push_with_auth_wrong_password_and_registry_down() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    let reg = start_registry(p);
    let name = format!("{}/team/app:v1", reg.addr);

    let base = p.join("base");
    std::fs::create_dir_all(base.join("etc")).unwrap();
    std::fs::write(base.join("etc/os"), "test\n").unwrap();
    let upper = p.join("upper");
    std::fs::create_dir_all(upper.join("app")).unwrap();
    std::fs::write(upper.join("app/data"), vec![7u8; 3 << 20]).unwrap();
    let store = Committer::open(&p.join("images")).unwrap();
    let staged = store.stage_upper(&upper).unwrap();
    let c = store
        .finish_commit(
            staged,
            &Base::Dirs {
                lower_dirs: vec![base],
                host_binds: vec![],
                user: None,
                start_command: None,
            },
            &name,
            "test",
        )
        .unwrap();

    // Wrong password: a clear error, nothing under the name in the registry.
    let err = push_image(store.store(), &name, Some(("alice".into(), "wrong".into())))
        .await
        .unwrap_err();
    assert!(matches!(err, PushError::Unauthorized { .. }), "{err:?}");
    assert!(err.to_string().contains("refused the credentials"), "{err}");
    let docker = format!("docker://{name}");
    let (ok, _) = sh(&[
        "skopeo",
        "inspect",
        "--tls-verify=false",
        "--creds",
        "alice:s3cret",
        &docker,
    ]);
    assert!(!ok, "no manifest after a refused push");

    push_image(
        store.store(),
        &name,
        Some(("alice".into(), "s3cret".into())),
    )
    .await
    .unwrap();
    let (ok, out) = sh(&[
        "skopeo",
        "inspect",
        "--tls-verify=false",
        "--creds",
        "alice:s3cret",
        &docker,
    ]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["Digest"], c.digest,
        "the registry has our manifest, byte for byte"
    );
    let back = p.join("back");
    let (ok, out) = sh(&[
        "skopeo",
        "copy",
        "--src-tls-verify=false",
        "--src-creds",
        "alice:s3cret",
        &docker,
        &format!("oci:{}:pulled", back.display()),
    ]);
    assert!(ok, "{out}");
    let (ok, out) = sh(&[
        "umoci",
        "unpack",
        "--image",
        &format!("{}:pulled", back.display()),
        &p.join("bundle").display().to_string(),
    ]);
    assert!(ok, "{out}");
    assert_eq!(
        std::fs::read(p.join("bundle/rootfs/app/data")).unwrap(),
        vec![7u8; 3 << 20]
    );
    // A second push finds every blob there already.
    push_image(
        store.store(),
        &name,
        Some(("alice".into(), "s3cret".into())),
    )
    .await
    .unwrap();

    // Registry down: a clear error naming the registry.
    let addr = reg.addr.clone();
    drop(reg);
    let err = push_image(
        store.store(),
        &name,
        Some(("alice".into(), "s3cret".into())),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, PushError::Unreachable { .. }), "{err:?}");
    assert!(err.to_string().contains(&addr), "{err}");
}
