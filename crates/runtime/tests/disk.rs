//! Real-kernel tests of the per-sandbox disk cap (`linux::disk`): a sandbox filling its disk gets
//! ENOSPC, its neighbour and the host do not notice, a restarted runtime finds its files, and
//! destroying it gives everything back. They need root, loop devices and mkfs.ext4, and fail
//! loudly without them.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use warren_runtime::linux::{prepare_base_template, LinuxRuntime, LinuxRuntimeConfig};
use warren_runtime::{SandboxRuntime, SandboxSpec};

mod common;

use common::{in_sandbox, init_binary, require_root, sandbox_spec};

fn spec(rootfs: &warren_runtime::RootfsSpec, id: &str, disk_mb: u64) -> SandboxSpec {
    let mut spec = sandbox_spec(rootfs, id);
    spec.resources.disk_mb = disk_mb;
    spec
}

/// Bytes the host spends on a file (allocated blocks, not its apparent size).
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// A runtime over `data`, after sweeping what a failed earlier run may have left there (its
/// sandboxes' processes hold their disks).
async fn runtime(data: &Path) -> (LinuxRuntime, LinuxRuntimeConfig) {
    require_root("the disk tests");
    std::fs::create_dir_all(data).unwrap();
    let config = LinuxRuntimeConfig::derived(data.to_path_buf(), init_binary());
    let rt = LinuxRuntime::new(config.clone())
        .await
        .expect("runtime starts");
    rt.sweep(&HashSet::new()).await.expect("sweep leftovers");
    (rt, config)
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(&prefix)))
        .map(str::to_string)
        .collect()
}

/// Loop devices whose backing file is under `dir`.
fn loops_under(dir: &Path) -> Vec<String> {
    let prefix = dir.display().to_string();
    std::fs::read_dir("/sys/block")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let f = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            // A loop device of an earlier sandbox of the same id reads "... (deleted)".
            (f.starts_with(&prefix) && !f.trim_end().ends_with("(deleted)"))
                .then(|| e.file_name().to_string_lossy().into_owned())
        })
        .collect()
}

#[tokio::test]
async fn filling_the_disk_gets_enospc_inside_only_and_kill_frees_it() {
    let data = PathBuf::from("/tmp/warren-kernel-test-disk");
    let (rt, config) = runtime(&data).await;
    let rootfs = prepare_base_template(&data).expect("base template");

    let full = rt
        .create(&spec(&rootfs, "diskfull", 64))
        .await
        .expect("create capped");
    let calm = rt
        .create(&spec(&rootfs, "diskcalm", 64))
        .await
        .expect("create neighbour");

    // df inside shows the cap, not the host's disk.
    let (_, df) = in_sandbox(full.init_pid, "df -k / | tail -1");
    let total_kb: u64 = df.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!((50_000..=65_536).contains(&total_kb), "df / inside: {df}");

    let (ok, out) = in_sandbox(
        full.init_pid,
        "dd if=/dev/zero of=/fill bs=1M count=200 conv=fsync",
    );
    assert!(!ok, "writing 200 MiB into a 64 MiB disk fails: {out}");
    assert!(out.contains("No space left on device"), "ENOSPC: {out}");
    let (ok, out) = in_sandbox(full.init_pid, "head -c 2000000 /dev/zero > /more");
    assert!(
        !ok && out.contains("No space left on device"),
        "still full: {out}"
    );

    // The neighbour writes as before, and the host spent at most the cap.
    let (ok, out) = in_sandbox(
        calm.init_pid,
        "dd if=/dev/zero of=/ten bs=1M count=10 conv=fsync && echo hi > /hi && cat /hi",
    );
    assert!(ok && out.contains("hi"), "neighbour unaffected: {out}");
    let image = data.join("sandboxes/diskfull/disk.img");
    // All the host spent on the full sandbox is its image, at most the cap (other engineers'
    // and CI's writes make the host's free space too noisy to assert on).
    let spent = allocated(&image);
    assert!(
        (50 << 20..=64 << 20).contains(&spent),
        "image holds {spent} bytes"
    );

    let stats = rt.stats("diskfull").await.unwrap();
    assert!(stats.disk_bytes > 50 << 20, "used: {stats:?}");
    assert!(
        (50 << 20..=64 << 20).contains(&stats.disk_total_bytes),
        "total: {stats:?}"
    );
    let upper = rt.upper_dir("diskfull").unwrap();
    assert!(
        upper.join("fill").is_file(),
        "upper dir on the sandbox's disk"
    );

    // A restarted daemon (a second runtime over the same data dir) finds the sandbox and its
    // files; the disk stays mounted in between.
    drop(rt);
    let rt = LinuxRuntime::new(config).await.expect("second runtime");
    assert!(rt.adopt("diskfull", &full).await.unwrap());
    assert!(rt.adopt("diskcalm", &calm).await.unwrap());
    let (ok, out) = in_sandbox(full.init_pid, "ls -l /fill && rm /fill && echo ok > /after");
    assert!(
        ok,
        "files kept and the space is usable again after rm: {out}"
    );
    let dir = data.join("sandboxes/diskfull");
    assert_eq!(
        loops_under(&dir).len(),
        1,
        "one loop device per capped sandbox"
    );

    rt.destroy("diskfull").await.unwrap();
    assert!(!dir.exists(), "sandbox dir and image removed");
    assert!(mounts_under(&dir).is_empty(), "disk unmounted");
    // The loop device lets go once the sandbox's last mount namespace is gone (asynchronously).
    for _ in 0..50 {
        if loops_under(&dir).is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(loops_under(&dir).is_empty(), "loop device detached");
    let (ok, out) = in_sandbox(calm.init_pid, "cat /hi");
    assert!(ok && out.contains("hi"), "neighbour still fine: {out}");

    // Without a cap the upper dir stays on the host's file system, as before caps.
    let open = rt
        .create(&spec(&rootfs, "diskopen", 0))
        .await
        .expect("create uncapped");
    let (ok, out) = in_sandbox(open.init_pid, "echo x > /x && cat /x");
    assert!(ok, "{out}");
    assert!(data.join("sandboxes/diskopen/upper/x").is_file());
    assert!(!data.join("sandboxes/diskopen/disk.img").exists());

    // The sweep of a restart removes leftovers' disks too.
    assert_eq!(
        rt.sweep(&HashSet::new()).await.unwrap(),
        vec!["diskcalm".to_string(), "diskopen".to_string()]
    );
    assert!(mounts_under(&data.join("sandboxes")).is_empty());
    rt.teardown_host().await.unwrap();
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn a_disk_below_the_minimum_is_refused_and_leaves_nothing() {
    let data = PathBuf::from("/tmp/warren-kernel-test-disksmall");
    let (rt, _) = runtime(&data).await;
    let rootfs = prepare_base_template(&data).expect("base template");
    let err = rt.create(&spec(&rootfs, "tiny", 4)).await.unwrap_err();
    assert!(err.to_string().contains("too small"), "{err}");
    assert!(!data.join("sandboxes/tiny").exists());
    rt.teardown_host().await.unwrap();
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn a_hibernated_sandbox_wakes_on_its_disk_even_after_it_was_unmounted() {
    let data = PathBuf::from("/tmp/warren-kernel-test-diskhib");
    let (rt, config) = runtime(&data).await;
    if let Err(why) = rt.hibernate_support() {
        panic!("CRIU must work on this host for this test (scripts/install-criu.sh): {why}");
    }
    let rootfs = prepare_base_template(&data).expect("base template");
    let p = rt
        .create(&spec(&rootfs, "diskhib", 64))
        .await
        .expect("create");
    let (ok, out) = in_sandbox(p.init_pid, "echo kept > /kept && df -k / | tail -1");
    assert!(ok, "{out}");
    rt.freeze("diskhib").await.unwrap();
    rt.hibernate("diskhib").await.expect("hibernate");
    let dir = data.join("sandboxes/diskhib");
    // The restarted daemon finds it hibernated; meanwhile someone unmounted its disk (no process
    // held it: the dump ended them all).
    drop(rt);
    let rt = LinuxRuntime::new(config).await.expect("second runtime");
    assert!(rt.adopt_hibernated("diskhib", &p).await.unwrap());
    let target = dir.join("disk");
    assert!(Command::new("umount")
        .arg(&target)
        .status()
        .unwrap()
        .success());
    let target = target.to_str().unwrap();
    assert!(
        !mounts_under(&dir)
            .iter()
            .any(|m| m.split(' ').nth(4) == Some(target)),
        "unmounted"
    );
    let woken = rt.wake("diskhib").await.expect("wake");
    let (ok, out) = in_sandbox(woken.init_pid, "cat /kept && df -k / | tail -1");
    assert!(ok && out.starts_with("kept\n"), "{out}");
    let total_kb: u64 = out
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(total_kb <= 65_536, "still on its capped disk: {out}");
    rt.destroy("diskhib").await.unwrap();
    assert!(mounts_under(&dir).is_empty());
    rt.teardown_host().await.unwrap();
    let _ = std::fs::remove_dir_all(&data);
}

/// A fork (the restore of a checkpoint as a new sandbox) gets a capped disk of its own, as a
/// create does: filling it gets ENOSPC at the cap, and the source's disk is not touched.
#[tokio::test]
async fn a_fork_of_a_checkpoint_gets_its_own_capped_disk() {
    let data = PathBuf::from("/tmp/warren-kernel-test-diskfork");
    let (rt, _) = runtime(&data).await;
    // What an aborted earlier run left: its sandboxes went with the sweep, its checkpoint here.
    let _ = rt.delete_checkpoint("diskck").await;
    if let Err(why) = rt.hibernate_support() {
        panic!("CRIU must work on this host for this test (scripts/install-criu.sh): {why}");
    }
    let rootfs = prepare_base_template(&data).expect("base template");
    let src = rt
        .create(&spec(&rootfs, "disksrc", 64))
        .await
        .expect("create capped");
    let (ok, out) = in_sandbox(src.init_pid, "echo kept > /tmp/marker");
    assert!(ok, "{out}");
    let opts = warren_runtime::CheckpointOptions {
        memory: true,
        keep_running: true,
    };
    rt.checkpoint("disksrc", "diskck", &opts)
        .await
        .expect("checkpoint");
    let mut fork_spec = spec(&rootfs, "diskfork", 64);
    fork_spec
        .rootfs
        .lower_dirs
        .insert(0, rt.checkpoint_layer("diskck").expect("layer"));
    let fork = rt
        .restore_checkpoint("diskck", &fork_spec)
        .await
        .expect("fork");

    let (_, df) = in_sandbox(fork.init_pid, "cat /tmp/marker; df -k / | tail -1");
    assert!(df.starts_with("kept\n"), "the checkpoint's files: {df}");
    let total_kb: u64 = df
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (50_000..=65_536).contains(&total_kb),
        "df / in the fork: {df}"
    );
    let (ok, out) = in_sandbox(
        fork.init_pid,
        "dd if=/dev/zero of=/fill bs=1M count=200 conv=fsync",
    );
    assert!(
        !ok && out.contains("No space left on device"),
        "ENOSPC in the fork: {out}"
    );
    let dir = data.join("sandboxes/diskfork");
    assert!(
        (50 << 20..=64 << 20).contains(&allocated(&dir.join("disk.img"))),
        "the fork's image holds at most the cap"
    );
    let (ok, out) = in_sandbox(
        src.init_pid,
        "dd if=/dev/zero of=/ten bs=1M count=10 conv=fsync",
    );
    assert!(ok, "the source's disk is its own: {out}");

    rt.destroy("diskfork").await.unwrap();
    assert!(
        !dir.exists() && mounts_under(&dir).is_empty(),
        "fork's disk released"
    );
    rt.destroy("disksrc").await.unwrap();
    rt.delete_checkpoint("diskck").await.unwrap();
    rt.teardown_host().await.unwrap();
    let _ = std::fs::remove_dir_all(&data);
}
