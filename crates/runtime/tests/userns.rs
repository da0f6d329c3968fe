//! Real-kernel tests of the sandboxes' user namespaces: root inside is an unprivileged host uid
//! range, while files keep plain ids on disk. They need root and fail loudly without it.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::process::Command;
use warren_runtime::SandboxRuntime;

mod common;

use common::{in_sandbox, require_root, Harness};

impl Harness {
    async fn new(name: &str) -> Harness {
        Self::with(name, true).await
    }

    async fn with(name: &str, user_namespaces: bool) -> Harness {
        require_root("user namespace tests");
        let data = PathBuf::from(format!("/tmp/warren-userns-test-{name}"));
        Harness::start(data, |config| {
            config.user_namespaces = user_namespaces;
            // Namespaces made on demand, so the test sees which range a create gets.
            config.prepared_networks = 0;
        })
        .await
    }
}

/// Runs a shell command as the sandbox's root (its user namespace only), but in the host's mount
/// namespace: what the sandbox's root could do to host files if it ever reached them.
fn as_sandbox_root_on_host(pid: u32, cmd: &str) -> (bool, String) {
    let out = Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-U", "/bin/sh", "-c", cmd])
        .output()
        .expect("nsenter runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn host_uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

#[tokio::test]
async fn sandbox_root_is_an_unprivileged_host_range_and_files_keep_plain_ids() {
    let h = Harness::new("map").await;
    let a = h.rt.create(&h.spec("usernsa")).await.expect("create a");
    let b = h.rt.create(&h.spec("usernsb")).await.expect("create b");
    let (ra, rb) = (a.userns.expect("a has a range"), b.userns.expect("b too"));
    assert_ne!(ra.host_base, rb.host_base, "one range per sandbox");
    assert!(ra.host_base >= 1 << 16 && ra.count == 65536, "{ra:?}");

    // Inside: the mapping; outside: PID 1 (root inside) runs as the range's first host uid.
    let (ok, text) = in_sandbox(
        a.init_pid,
        "cat /proc/self/uid_map /proc/self/gid_map; id -u",
    );
    assert!(ok, "{text}");
    let fields: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let expect = vec!["0".to_string(), ra.host_base.to_string(), "65536".into()];
    assert_eq!(fields[0], expect, "uid_map: {text}");
    assert_eq!(fields[1], expect, "gid_map: {text}");
    assert_eq!(fields[2], ["0"], "root inside: {text}");
    assert_eq!(host_uid_of(a.init_pid), ra.host_base);
    assert_eq!(host_uid_of(b.init_pid), rb.host_base);

    // Files made by root and by `user` inside: owned by them inside, and stored with the same
    // plain ids in the upper dir on the host (what commits export).
    let (ok, text) = in_sandbox(
        a.init_pid,
        "echo r > /rootfile && echo u > /userfile && chown 1000:1000 /userfile && \
         mkdir -p /home/user/d && chown 1000 /home/user/d && rm -f /etc/hostname.gone && \
         stat -c '%u:%g %n' /rootfile /userfile /usr/bin/env /etc/passwd",
    );
    assert!(ok, "{text}");
    assert!(text.contains("0:0 /rootfile"), "{text}");
    assert!(text.contains("1000:1000 /userfile"), "{text}");
    // Template layers and the idmapped /usr bind show their real owners, not `nobody`.
    assert!(text.contains("0:0 /usr/bin/env"), "{text}");
    assert!(text.contains("0:0 /etc/passwd"), "{text}");
    let upper = h.data.join("sandboxes/usernsa/disk/upper");
    let meta = |p: &str| std::fs::metadata(upper.join(p)).unwrap();
    assert_eq!((meta("rootfile").uid(), meta("rootfile").gid()), (0, 0));
    assert_eq!(
        (meta("userfile").uid(), meta("userfile").gid()),
        (1000, 1000)
    );
    assert_eq!(meta("home/user/d").uid(), 1000);

    // Deleting a template file leaves an overlay whiteout (a 0/0 character device) on disk.
    let (ok, text) = in_sandbox(a.init_pid, "rm /etc/passwd && test ! -e /etc/passwd");
    assert!(ok, "{text}");
    let wh = std::fs::symlink_metadata(upper.join("etc/passwd")).unwrap();
    assert_eq!((wh.rdev(), wh.mode() & libc::S_IFMT), (0, libc::S_IFCHR));

    h.rt.destroy("usernsa").await.unwrap();
    // The range is free again: the next sandbox gets it.
    let c = h.rt.create(&h.spec("usernsc")).await.expect("create c");
    assert_eq!(c.userns, Some(ra));
    h.finish().await;
}

#[tokio::test]
async fn sandbox_root_cannot_do_what_host_root_can() {
    let h = Harness::new("hostile").await;
    let p = h.rt.create(&h.spec("usernsh")).await.expect("create");
    let range = p.userns.unwrap();

    // Host files owned by host root, as a sandbox escape would find them.
    let dir = h.data.join("host-owned");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let public = dir.join("public");
    let secret = dir.join("secret");
    std::fs::write(&public, "host\n").unwrap();
    std::fs::write(&secret, "host secret\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (d, pb, sc) = (dir.display(), public.display(), secret.display());

    // Host root can do all of it; the sandbox's root (all capabilities in its namespace) none.
    for (what, cmd) in [
        ("append to a root-owned file", format!("echo x >> {pb}")),
        ("read a root-only file", format!("cat {sc}")),
        ("chmod a root-owned file", format!("chmod 666 {pb}")),
        ("chown a root-owned file", format!("chown 0:0 {pb}")),
        (
            "create a file in a root-owned dir",
            format!("touch {d}/new"),
        ),
        ("remove a root-owned file", format!("rm -f {pb}")),
    ] {
        let (ok, text) = as_sandbox_root_on_host(p.init_pid, &cmd);
        assert!(!ok, "sandbox root could {what}: {text}");
        let host = Command::new("/bin/sh").args(["-c", &cmd]).output().unwrap();
        assert!(host.status.success(), "host root can {what}");
        std::fs::write(&public, "host\n").unwrap();
    }
    assert!(!dir.join("new").exists() || std::fs::remove_file(dir.join("new")).is_ok());

    // With every capability of its user namespace, sandbox root cannot make device nodes (the
    // kernel allows them only to the initial user namespace), so no raw disk or memory access.
    for node in ["mknod /tmp/sda b 8 0", "mknod /tmp/mem c 1 1"] {
        let (ok, text) = in_sandbox(p.init_pid, node);
        assert!(
            !ok && text.contains("Operation not permitted"),
            "{node}: {text}"
        );
    }
    // Its network namespace belongs to its user namespace (CRIU needs that to hibernate it);
    // what stops root inside from reconfiguring it is the bounding set without CAP_NET_ADMIN.
    let owner = |ns: &str| {
        let f = std::fs::File::open(format!("/proc/{}/ns/{ns}", p.init_pid)).unwrap();
        // SAFETY: NS_GET_USERNS (_IO(0xb7, 0x1)) on a namespace descriptor returns a new one.
        let fd = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&f), 0xb701) };
        assert!(fd >= 0, "NS_GET_USERNS on {ns}");
        let ino = std::fs::metadata(format!("/proc/self/fd/{fd}"))
            .unwrap()
            .ino();
        // SAFETY: closing the descriptor the ioctl gave us.
        unsafe { libc::close(fd) };
        ino
    };
    let userns_ino = std::fs::metadata(format!("/proc/{}/ns/user", p.init_pid))
        .unwrap()
        .ino();
    for ns in ["net", "mnt", "pid", "uts", "ipc"] {
        assert_eq!(
            owner(ns),
            userns_ino,
            "{ns} namespace owned by the sandbox's"
        );
    }

    // Signals to host processes: refused.
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    let (ok, text) = as_sandbox_root_on_host(p.init_pid, &format!("kill -9 {}", sleeper.id()));
    assert!(!ok, "sandbox root killed a host process: {text}");
    assert!(sleeper.try_wait().unwrap().is_none(), "host process alive");
    sleeper.kill().unwrap();
    let _ = sleeper.wait();

    // A file the sandbox's root creates where it can (its own upper dir, through the host's
    // view of its mount namespace) belongs to the range, never to host root.
    let (ok, text) = in_sandbox(p.init_pid, "echo hi > /tmp/made && stat -c %u /tmp/made");
    assert!(ok && text.trim() == "0", "{text}");
    let host_view = PathBuf::from(format!("/proc/{}/root/tmp/made", p.init_pid));
    let owner = std::fs::metadata(&host_view).unwrap().uid();
    assert_eq!(
        owner, range.host_base,
        "seen from the host through its mount"
    );
    h.finish().await;
}

#[tokio::test]
async fn without_user_namespaces_sandboxes_run_as_host_ids_and_still_hibernate_and_fork() {
    let h = Harness::with("off", false).await;
    if let Err(why) = h.rt.hibernate_support() {
        panic!("CRIU must work on this host for this test: {why}");
    }
    let p = h.rt.create(&h.spec("nousernsa")).await.expect("create");
    assert_eq!(p.userns, None);
    let map = std::fs::read_to_string(format!("/proc/{}/uid_map", p.init_pid)).unwrap();
    let map: Vec<&str> = map.split_whitespace().collect();
    assert_eq!(map, ["0", "0", "4294967295"], "the host's own ids");
    assert_eq!(host_uid_of(p.init_pid), 0);

    // Hibernation keeps its network namespace outside the images, as before user namespaces.
    h.rt.hibernate("nousernsa").await.expect("hibernate");
    let woken = h.rt.wake("nousernsa").await.expect("wake");
    assert_eq!(woken.userns, None);
    assert_eq!(host_uid_of(woken.init_pid), 0);
    let opts = warren_runtime::CheckpointOptions {
        memory: true,
        keep_running: true,
    };
    h.rt.checkpoint("nousernsa", "offck", &opts)
        .await
        .expect("checkpoint");
    let mut spec = h.spec("nousernsb");
    spec.rootfs
        .lower_dirs
        .insert(0, h.rt.checkpoint_layer("offck").expect("layer"));
    let fork = h.rt.restore_checkpoint("offck", &spec).await.expect("fork");
    assert_eq!(
        fork.userns, None,
        "restored as taken: without a user namespace"
    );
    assert_eq!(host_uid_of(fork.init_pid), 0);
    h.finish().await;
}
