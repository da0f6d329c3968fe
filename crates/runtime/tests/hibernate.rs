//! Real-kernel tests of hibernation: CRIU dumps a sandbox's process tree, frees its memory, and
//! restores it into the same cgroups, root and network namespace. They need root and CRIU 4.1.1
//! (`scripts/install-criu.sh`) and fail loudly without them.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use warren_runtime::{CheckpointOptions, Placement, RuntimeError, SandboxRuntime, SandboxSpec};

mod common;

use common::{require_root, Harness};

impl Harness {
    async fn new(name: &str) -> Harness {
        require_root("hibernation tests");
        let h = Harness::start(
            PathBuf::from(format!("/tmp/warren-criu-test-{name}")),
            |_| {},
        )
        .await;
        if let Err(why) = h.rt.hibernate_support() {
            panic!("CRIU must work on this host for these tests (scripts/install-criu.sh): {why}");
        }
        h
    }
}

/// Starts `cmd` as a daemon of the sandbox: in its namespaces and cgroups, in a session of its
/// own inside the sandbox, with no descriptor of the host (as envd starts processes).
fn spawn_in_sandbox(id: &str, p: &Placement, cmd: &str) {
    // Every hierarchy, as a child of envd would be: CRIU wants one cgroup namespace per tree.
    let procs: Vec<String> = std::fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .flatten()
        .filter_map(|h| {
            std::fs::read_dir(h.path()).ok()?.flatten().find_map(|e| {
                let f = e.path().join(id).join("cgroup.procs");
                f.exists().then(|| f.display().to_string())
            })
        })
        .collect();
    let inner = format!(
        "setsid /bin/sh -c '{}' </dev/null >/dev/null 2>&1 &",
        cmd.replace('\'', "'\\''")
    );
    let script = format!(
        "for f in {}; do echo $$ > $f; done; exec nsenter -t {} -a /bin/sh -c '{}'",
        procs.join(" "),
        p.init_pid,
        inner.replace('\'', "'\\''")
    );
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", &script]).stdin(std::process::Stdio::null());
    // Whatever descriptors the test process inherited (a CI shell's, say) stay out of the sandbox,
    // as they do for processes envd starts.
    // SAFETY: close_range is async-signal-safe and touches only this child's descriptors.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "spawn in sandbox: {out:?}");
}

/// Reads a file of the sandbox's root through its init's /proc root.
fn read_in_sandbox(p: &Placement, path: &str) -> String {
    std::fs::read_to_string(format!("/proc/{}/root{path}", p.init_pid)).unwrap_or_default()
}

fn numbers(text: &str) -> Vec<u64> {
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn contiguous(v: &[u64]) -> bool {
    v.windows(2).all(|w| w[1] == w[0] + 1)
}

fn cgroup_populated(id: &str) -> bool {
    std::fs::read_dir("/sys/fs/cgroup/unified")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join(id).join("cgroup.events")).ok())
        .any(|s| s.contains("populated 1"))
}

const COUNTER: &str = "python3 -c 'import time\nn = 0\nwhile True:\n    n += 1\n    open(\"/tmp/counter\", \"a\").write(f\"{n}\\n\")\n    time.sleep(0.05)'";
const PIPE: &str = "i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done | while read x; do echo $x >> /tmp/piped; done";

#[tokio::test]
async fn hibernate_and_wake_keep_memory_processes_and_pipes() {
    let h = Harness::new("state").await;
    let p = h.rt.create(&h.spec("hibstate")).await.expect("create");
    spawn_in_sandbox("hibstate", &p, COUNTER);
    spawn_in_sandbox("hibstate", &p, PIPE);
    wait_for("counter and pipe output", || {
        numbers(&read_in_sandbox(&p, "/tmp/counter")).len() >= 5
            && numbers(&read_in_sandbox(&p, "/tmp/piped")).len() >= 5
    });
    // Paused first, as the control plane does: the dump takes a frozen tree.
    h.rt.freeze("hibstate").await.unwrap();
    let stats = h.rt.hibernate("hibstate").await.expect("hibernate");
    assert!(stats.bytes > 0, "images written: {stats:?}");
    assert!(!h.rt.is_alive("hibstate"), "no init after hibernate");
    assert!(
        !cgroup_populated("hibstate"),
        "every process ended, memory freed"
    );
    assert!(
        TcpStream::connect_timeout(&p.envd_addr(), Duration::from_millis(300)).is_err(),
        "nothing serves while hibernated"
    );
    let upper = h.rt.upper_dir("hibstate").unwrap().join("tmp/counter");
    let before = numbers(&std::fs::read_to_string(&upper).unwrap());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        numbers(&std::fs::read_to_string(&upper).unwrap()),
        before,
        "stopped"
    );

    let again = h.rt.hibernate("hibstate").await.unwrap_err();
    assert!(matches!(again, RuntimeError::Checkpoint { .. }), "{again}");

    let woken = h.rt.wake("hibstate").await.expect("wake");
    assert_eq!(woken.ip, p.ip, "same address");
    assert_ne!(woken.init_pid, p.init_pid, "a new host pid");
    assert!(h.rt.is_alive("hibstate"));
    assert!(
        TcpStream::connect_timeout(&woken.envd_addr(), Duration::from_secs(2)).is_ok(),
        "envd's listener is back"
    );
    wait_for("counting on", || {
        numbers(&read_in_sandbox(&woken, "/tmp/counter")).len() >= before.len() + 5
    });
    let counter = numbers(&read_in_sandbox(&woken, "/tmp/counter"));
    assert!(
        contiguous(&counter),
        "the counter went on from memory: {counter:?}"
    );
    wait_for("the pipe flowing", || {
        let piped = numbers(&read_in_sandbox(&woken, "/tmp/piped"));
        piped.len() > 5 && contiguous(&piped) && *piped.last().unwrap() > before.len() as u64
    });
    let pid1 = read_in_sandbox(&woken, "/proc/1/cmdline");
    assert!(
        pid1.contains("init"),
        "PID 1 inside is still the init: {pid1:?}"
    );

    h.rt.destroy("hibstate").await.unwrap();
    assert!(!h.data.join("sandboxes/hibstate").exists());
    h.finish().await;
}

/// Without SO_REUSEADDR on purpose: the connections it closed leave TIME_WAIT sockets in the
/// kept network namespace, which the restore must clear before it binds the listener again.
const SERVER: &str = "python3 -c 'import socket\ns = socket.socket()\ns.bind((\"0.0.0.0\", 8080))\ns.listen()\nn = 0\nwhile True:\n    c, _ = s.accept()\n    n += 1\n    c.sendall(f\"{n}\\n\".encode())\n    c.close()'";

fn ask(addr: SocketAddr) -> Option<u64> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    buf.trim().parse().ok()
}

#[tokio::test]
async fn listener_survives_hibernation_and_a_daemon_restart() {
    let h = Harness::new("listen").await;
    let p = h.rt.create(&h.spec("hiblisten")).await.expect("create");
    spawn_in_sandbox("hiblisten", &p, SERVER);
    let addr = SocketAddr::from((p.ip, 8080));
    wait_for("the server", || ask(addr).is_some());
    let n = ask(addr).unwrap();
    // A connection left open across the dump is closed, not a reason to fail.
    let mut open = TcpStream::connect(p.envd_addr()).unwrap();
    let _ = open.write_all(b"GET /health HTTP/1.1\r\n");

    let t = Instant::now();
    h.rt.hibernate("hiblisten").await.expect("hibernate");
    let dump = t.elapsed();
    // A second runtime over the same data dir stands in for the restarted daemon.
    let rt2 = Harness::restarted(&h.data).await;
    assert!(rt2.adopt_hibernated("hiblisten", &p).await.unwrap());
    rt2.sweep(&HashSet::from(["hiblisten".to_string()]))
        .await
        .unwrap();
    let t = Instant::now();
    let woken = rt2.wake("hiblisten").await.expect("wake after restart");
    let wake = t.elapsed();
    eprintln!("hibernate {dump:?}, wake {wake:?}");
    assert_eq!(
        ask(addr),
        Some(n + 1),
        "the listener accepts and kept its count"
    );

    // And once more, from the restored tree.
    rt2.hibernate("hiblisten").await.expect("second hibernate");
    rt2.wake("hiblisten").await.expect("second wake");
    assert_eq!(ask(addr), Some(n + 2));
    let _ = woken;
    rt2.destroy("hiblisten").await.unwrap();
    drop(rt2);
    h.finish().await;
}

/// A crash between a wake and the control plane's record of it (the store still says waking):
/// the images stay until `release_wake_images`, so a restarted daemon finds the sandbox
/// hibernated, removes the restored tree nobody was told of, and wakes it again, state kept.
/// Before, the wake dropped its images at once and such a sandbox was lost.
#[tokio::test]
async fn a_wake_the_crash_cut_before_its_record_leaves_the_sandbox_hibernated() {
    let h = Harness::new("wakecut").await;
    let id = "hibwakecut";
    let p = h.rt.create(&h.spec(id)).await.expect("create");
    spawn_in_sandbox(id, &p, SERVER);
    let addr = SocketAddr::from((p.ip, 8080));
    wait_for("the server", || ask(addr).is_some());
    let n = ask(addr).unwrap();
    h.rt.hibernate(id).await.expect("hibernate");
    h.rt.wake(id).await.expect("wake");
    // The daemon dies here, before recording the wake.
    let rt2 = Harness::restarted(&h.data).await;
    assert!(
        rt2.adopt_hibernated(id, &p).await.unwrap(),
        "the images outlive a wake that was never recorded"
    );
    rt2.sweep(&HashSet::from([id.to_string()])).await.unwrap();
    rt2.wake(id).await.expect("wake after the restart");
    rt2.release_wake_images(id).await;
    assert_eq!(ask(addr), Some(n + 1), "the state of the hibernation, once");
    let images = h.data.join(format!("sandboxes/{id}/checkpoint"));
    assert!(!images.exists(), "released after the recorded wake");
    rt2.destroy(id).await.unwrap();
    drop(rt2);
    h.finish().await;
}

#[tokio::test]
async fn hibernate_errors_leave_the_sandbox_as_it_was() {
    let h = Harness::new("errors").await;
    let unknown = h.rt.hibernate("nosuch").await.unwrap_err();
    assert!(
        matches!(unknown, RuntimeError::UnknownSandbox(_)),
        "{unknown}"
    );
    let p = h.rt.create(&h.spec("hiberr")).await.expect("create");
    let not_hib = h.rt.wake("hiberr").await.unwrap_err();
    assert!(not_hib.to_string().contains("not hibernated"), "{not_hib}");

    h.rt.hibernate("hiberr").await.expect("hibernate");
    // A corrupted image: the wake fails with CRIU's reason, and the sandbox stays hibernated.
    let core = std::fs::read_dir(h.data.join("sandboxes/hiberr/checkpoint"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("core-")
        })
        .expect("a core image");
    let good = std::fs::read(&core).unwrap();
    std::fs::write(&core, b"garbage").unwrap();
    let bad = h.rt.wake("hiberr").await.unwrap_err();
    assert!(bad.to_string().contains("restore"), "{bad}");
    assert!(!h.rt.is_alive("hiberr"));
    std::fs::write(&core, good).unwrap();
    let woken =
        h.rt.wake("hiberr")
            .await
            .expect("wake with the image repaired");
    assert!(TcpStream::connect_timeout(&woken.envd_addr(), Duration::from_secs(2)).is_ok());
    let _ = p;
    h.finish().await;
}

/// Not a pass/fail test: hibernate/wake figures for BENCHMARKS.md with 10, 100 and 1000 MiB held
/// by a process (`cargo test -p warren-runtime --test hibernate -- --ignored --nocapture`).
#[tokio::test]
#[ignore]
async fn bench_hibernate_and_wake_by_memory_size() {
    let h = Harness::new("bench").await;
    for mib in [10u64, 100, 1000] {
        let id = format!("bench{mib}");
        let mut spec = h.spec(&id);
        spec.resources.memory_mb = 2048;
        let p = h.rt.create(&spec).await.expect("create");
        // Random bytes, repeated: every page is present and non-zero, so CRIU must copy it.
        let hold = format!(
            "python3 -c 'import os, time\nchunk = os.urandom(1 << 20)\nheld = [bytearray(chunk) for _ in range({mib})]\nopen(\"/tmp/ready\", \"w\").write(\"1\")\nwhile True:\n    time.sleep(1)'"
        );
        spawn_in_sandbox(&id, &p, &hold);
        wait_for("the memory to be held", || {
            read_in_sandbox(&p, "/tmp/ready") == "1"
        });
        let mut rows = Vec::new();
        for _ in 0..3 {
            h.rt.freeze(&id).await.unwrap();
            let t = Instant::now();
            let stats = h.rt.hibernate(&id).await.expect("hibernate");
            let dump = t.elapsed();
            let t = Instant::now();
            let woken = h.rt.wake(&id).await.expect("wake");
            let wake = t.elapsed();
            assert!(TcpStream::connect_timeout(&woken.envd_addr(), Duration::from_secs(2)).is_ok());
            let t2 = t.elapsed();
            rows.push((dump, stats.bytes, wake, t2));
        }
        for (dump, bytes, wake, answered) in rows {
            eprintln!(
                "BENCH held={mib}MiB hibernate={:.0}ms image={:.1}MiB wake={:.0}ms envd_answers={:.0}ms",
                dump.as_secs_f64() * 1e3,
                bytes as f64 / 1048576.0,
                wake.as_secs_f64() * 1e3,
                answered.as_secs_f64() * 1e3
            );
        }
        h.rt.destroy(&id).await.unwrap();
    }
    h.finish().await;
}

/// A checkpoint taken with the source running on, then three sandboxes restored from it: each
/// has its own address and hostname, carries on from the checkpointed memory, and writes only
/// to its own copy-on-write root.
#[tokio::test]
async fn checkpoint_forks_continue_independently() {
    let h = Harness::new("fork").await;
    let p = h.rt.create(&h.spec("forksrc")).await.expect("create");
    spawn_in_sandbox("forksrc", &p, COUNTER);
    spawn_in_sandbox("forksrc", &p, SERVER);
    let addr = SocketAddr::from((p.ip, 8080));
    wait_for("counter and server", || {
        numbers(&read_in_sandbox(&p, "/tmp/counter")).len() >= 5 && ask(addr).is_some()
    });
    let served = ask(addr).unwrap();
    let opts = CheckpointOptions {
        memory: true,
        keep_running: true,
    };
    let info =
        h.rt.checkpoint("forksrc", "ck1", &opts)
            .await
            .expect("checkpoint");
    eprintln!("checkpoint {info:?}");
    assert!(info.image_bytes > 0 && info.fs_bytes > 0, "{info:?}");
    assert!(h.rt.is_alive("forksrc"), "the source runs on");
    let at_ckpt =
        numbers(&std::fs::read_to_string(h.data.join("checkpoints/ck1/fs/tmp/counter")).unwrap());
    wait_for("source counting on", || {
        numbers(&read_in_sandbox(&p, "/tmp/counter")).len() >= at_ckpt.len() + 3
    });
    let again = h.rt.checkpoint("forksrc", "ck1", &opts).await.unwrap_err();
    assert!(again.to_string().contains("exists"), "{again}");

    let layer = h.rt.checkpoint_layer("ck1").expect("layer");
    let t = Instant::now();
    let mut forks = Vec::new();
    for i in 0..3 {
        let mut spec = h.spec(&format!("fork{i}"));
        spec.rootfs.lower_dirs.insert(0, layer.clone());
        forks.push(
            h.rt.restore_checkpoint("ck1", &spec)
                .await
                .expect("restore"),
        );
    }
    eprintln!("3 restores in {:?}", t.elapsed());
    for (i, f) in forks.iter().enumerate() {
        assert_ne!(f.ip, p.ip, "a fork has its own address");
        // And its own user namespace id range, the one its init's namespace maps.
        let range = f
            .userns
            .expect("sandboxes run in user namespaces by default");
        assert_ne!(Some(range), p.userns, "a fork has its own id range");
        assert!(forks.iter().filter(|g| g.userns == f.userns).count() == 1);
        let map = std::fs::read_to_string(format!("/proc/{}/uid_map", f.init_pid)).unwrap();
        let map: Vec<&str> = map.split_whitespace().collect();
        assert_eq!(map, ["0", &range.host_base.to_string(), "65536"]);
        assert_eq!(
            ask(SocketAddr::from((f.ip, 8080))),
            Some(served + 1),
            "the listener carried over, with the count of the checkpoint"
        );
        let host = Command::new("nsenter")
            .args(["-t", &f.init_pid.to_string(), "-u", "hostname"])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&host.stdout).trim(),
            format!("fork{i}")
        );
        wait_for("fork counting on", || {
            numbers(&read_in_sandbox(f, "/tmp/counter")).len() >= at_ckpt.len() + 3
        });
        let c = numbers(&read_in_sandbox(f, "/tmp/counter"));
        assert!(contiguous(&c), "went on from the checkpointed memory");
        assert_eq!(&c[..at_ckpt.len()], &at_ckpt[..]);
    }
    // Written as the fork's root (through its user namespace: host root is no id in there).
    let wrote = Command::new("nsenter")
        .args(["-t", &forks[0].init_pid.to_string(), "-a", "/bin/sh", "-c"])
        .arg("echo fork0 > /tmp/mine")
        .status()
        .unwrap();
    assert!(wrote.success());
    assert!(
        read_in_sandbox(&forks[1], "/tmp/mine").is_empty(),
        "invisible in others"
    );
    assert!(
        read_in_sandbox(&p, "/tmp/mine").is_empty(),
        "and in the source"
    );

    // Filesystem-only, with the source stopped after.
    let fs_only = CheckpointOptions {
        memory: false,
        keep_running: false,
    };
    let info =
        h.rt.checkpoint("forksrc", "ck2", &fs_only)
            .await
            .expect("fs checkpoint");
    assert_eq!(info.image_bytes, 0);
    assert!(!h.rt.is_alive("forksrc") || !cgroup_populated("forksrc"));
    let err =
        h.rt.restore_checkpoint("ck2", &h.spec("fork9"))
            .await
            .unwrap_err();
    assert!(err.to_string().contains("no process images"), "{err}");

    for i in 0..3 {
        h.rt.destroy(&format!("fork{i}")).await.unwrap();
    }
    h.rt.destroy("forksrc").await.unwrap();
    h.rt.delete_checkpoint("ck1").await.unwrap();
    h.rt.delete_checkpoint("ck2").await.unwrap();
    assert!(!h.data.join("checkpoints/ck1").exists());
    h.finish().await;
}

/// Figures (bench/run.sh): a checkpoint of a sandbox holding 10, 100 and 1,000 MiB (time, freeze,
/// size) and restores from it, ten in parallel (one at 1,000 MiB: ten would hold 10 GiB), until
/// every restored envd listener accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn bench_checkpoint_and_restore_by_memory_size() {
    let h = Harness::new("ckbench").await;
    for mib in [10u64, 100, 1000] {
        let id = format!("ckb{mib}");
        let mut spec = h.spec(&id);
        spec.resources.memory_mb = 2048;
        let p = h.rt.create(&spec).await.expect("create");
        let hold = format!(
            "python3 -c 'import os, time\nchunk = os.urandom(1 << 20)\nheld = [bytearray(chunk) for _ in range({mib})]\nopen(\"/tmp/ready\", \"w\").write(\"1\")\nwhile True:\n    time.sleep(1)'"
        );
        spawn_in_sandbox(&id, &p, &hold);
        wait_for("the memory to be held", || {
            read_in_sandbox(&p, "/tmp/ready") == "1"
        });
        let opts = CheckpointOptions {
            memory: true,
            keep_running: true,
        };
        let name = format!("ck{mib}");
        let t = Instant::now();
        let info =
            h.rt.checkpoint(&id, &name, &opts)
                .await
                .expect("checkpoint");
        let took = t.elapsed();
        let layer = h.rt.checkpoint_layer(&name).unwrap();
        let n = if mib >= 1000 { 1 } else { 10 };
        let specs: Vec<SandboxSpec> = (0..n)
            .map(|i| {
                let mut s = h.spec(&format!("ckb{mib}f{i}"));
                s.resources.memory_mb = 2048;
                s.rootfs.lower_dirs.insert(0, layer.clone());
                s
            })
            .collect();
        let t = Instant::now();
        let restored =
            futures::future::join_all(specs.iter().map(|s| h.rt.restore_checkpoint(&name, s)))
                .await;
        for p in &restored {
            let p = p.as_ref().expect("restore");
            assert!(TcpStream::connect_timeout(&p.envd_addr(), Duration::from_secs(2)).is_ok());
        }
        let all = t.elapsed();
        eprintln!(
            "BENCH checkpoint held={mib}MiB took={:.0}ms frozen={:.0}ms memory={:.1}MiB files={:.2}MiB restores={n} all_listening={:.0}ms",
            took.as_secs_f64() * 1e3,
            info.frozen.as_secs_f64() * 1e3,
            info.image_bytes as f64 / 1048576.0,
            info.fs_bytes as f64 / 1048576.0,
            all.as_secs_f64() * 1e3
        );
        for s in &specs {
            h.rt.destroy(&s.id).await.unwrap();
        }
        h.rt.destroy(&id).await.unwrap();
        h.rt.delete_checkpoint(&name).await.unwrap();
    }
    h.finish().await;
}

/// Not a pass/fail test: what a user namespace adds to a wake and to restores of a checkpoint,
/// for BENCHMARKS.md (`cargo test -p warren-runtime --test hibernate -- --ignored --nocapture
/// bench_userns`). An idle sandbox, with and without user namespaces, alternating:
/// `WARREN_BENCH_ROUNDS` rounds (default 2) of 12 hibernate/wake cycles (wake until envd
/// accepts a connection) and 5 restores of one checkpoint.
#[tokio::test]
#[ignore]
async fn bench_userns_wake_and_restore() {
    let rounds: usize = std::env::var("WARREN_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let p50 = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1e3
    };
    for round in 0..rounds {
        for userns in [true, false] {
            require_root("hibernation tests");
            let h = Harness::start(
                PathBuf::from(format!("/tmp/warren-criu-test-benchns{}", userns as u8)),
                |c| c.user_namespaces = userns,
            )
            .await;
            let id = "benchns";
            h.rt.create(&h.spec(id)).await.expect("create");
            let mut wakes = Vec::new();
            for _ in 0..12 {
                h.rt.freeze(id).await.unwrap();
                h.rt.hibernate(id).await.expect("hibernate");
                let t = Instant::now();
                let woken = h.rt.wake(id).await.expect("wake");
                while TcpStream::connect_timeout(&woken.envd_addr(), Duration::from_secs(2))
                    .is_err()
                {
                    assert!(t.elapsed() < Duration::from_secs(5), "envd answers");
                }
                wakes.push(t.elapsed());
            }
            let opts = CheckpointOptions {
                memory: true,
                keep_running: true,
            };
            h.rt.checkpoint(id, "benchck", &opts)
                .await
                .expect("checkpoint");
            let layer = h.rt.checkpoint_layer("benchck").expect("layer");
            let mut restores = Vec::new();
            let t = Instant::now();
            for i in 0..5 {
                let mut spec = h.spec(&format!("benchfork{i}"));
                spec.rootfs.lower_dirs.insert(0, layer.clone());
                let t = Instant::now();
                h.rt.restore_checkpoint("benchck", &spec)
                    .await
                    .expect("restore");
                restores.push(t.elapsed());
            }
            let all = t.elapsed();
            eprintln!(
                "BENCH round={round} userns={userns} wake_p50={:.1}ms restore_p50={:.1}ms \
                 5_restores={:.0}ms",
                p50(wakes),
                p50(restores),
                all.as_secs_f64() * 1e3
            );
            for i in 0..5 {
                h.rt.destroy(&format!("benchfork{i}")).await.unwrap();
            }
            h.rt.destroy(id).await.unwrap();
            h.finish().await;
        }
    }
}

/// A restore whose network setup fails (here: no `eth0` left in the kept namespace, which the
/// daemon must move into the restored tree's) fails at once with an error naming the step,
/// leaves no criu and no restored process behind, and a wake afterwards (which gives the kept
/// namespace its `eth0` back) works.
#[tokio::test]
async fn failed_network_setup_fails_the_restore_cleanly() {
    use warren_runtime::linux::checkpoint::{self, CriuSupport, RestoreTarget};
    let h = Harness::new("netsetupfail").await;
    let id = "nsfail";
    let p = h.rt.create(&h.spec(id)).await.expect("create");
    let range = p.userns.expect("user namespaces are on by default");
    h.rt.freeze(id).await.unwrap();
    h.rt.hibernate(id).await.expect("hibernate");
    let dir = h.data.join("sandboxes").join(id);
    let out = Command::new("nsenter")
        .arg(format!("--net={}", dir.join("netns").display()))
        .args(["ip", "link", "del", "eth0"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let CriuSupport::Available(criu) = CriuSupport::detect() else {
        panic!("criu must work on this host");
    };
    let t = Instant::now();
    let err = checkpoint::restore(RestoreTarget {
        criu: &criu,
        id,
        dir: &dir,
        cgroup_procs: &[],
        userns: Some((
            range,
            warren_runtime::init::InitNet {
                address: p.ip,
                prefix_len: 20,
                gateway: p.ip,
            },
        )),
    })
    .await
    .expect_err("no eth0 to move");
    let msg = err.to_string();
    eprintln!("restore error: {msg} ({:?})", t.elapsed());
    assert!(msg.contains("eth0"), "{msg}");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    // Nothing runs from these images any more: no criu, no restored tree.
    let images = dir.join("checkpoint");
    let images = images.to_string_lossy();
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&*images))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    if let Ok(pid) = std::fs::read_to_string(dir.join("restore.pid")) {
        let pid = pid.trim();
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "restored init {pid} left"
        );
    }
    let woken = h.rt.wake(id).await.expect("wake after the failed restore");
    wait_for("envd after wake", || {
        TcpStream::connect_timeout(&woken.envd_addr(), Duration::from_secs(1)).is_ok()
    });
    h.rt.destroy(id).await.unwrap();
    h.finish().await;
}
