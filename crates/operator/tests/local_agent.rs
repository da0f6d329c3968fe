//! Real-kernel test of the node agent's interface: [`LocalAgent`], driven only through the
//! [`NodeAgent`] trait the operator uses, runs a sandbox inside a "Pod" that this test makes the
//! way kubelet and a CNI would (a network namespace with a veth and an address, a Pod cgroup
//! holding a placeholder process), and the agent finds that Pod from its uid alone.
//!
//! Needs root (and CRIU 4.1.1 for the hibernate/checkpoint part: scripts/install-criu.sh); fails
//! loudly without them. Only addresses inside the namespace this test creates are used.

#![cfg(target_os = "linux")]

use futures::FutureExt;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use warren_operator::agent::local::LocalAgent;
use warren_operator::agent::{
    AgentError, CheckpointRequest, CommitRequest, CreateRequest, NodeAgent, PodRef, SandboxState,
};
use warren_operator::crd::CheckpointContent;
use warren_operator::registry_auth::RegistryCredentials;

const NODE: &str = "test-node";

/// Fails the test, saying why, unless it runs as root (CI does).
fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the node agent test needs root"
    );
}

/// An empty data dir of this test process, named after the test.
fn fresh_data_dir(name: &str) -> PathBuf {
    let data = PathBuf::from(format!("/tmp/warren-agent-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).unwrap();
    data
}

fn init_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target = exe.parent().unwrap().parent().unwrap();
    let bin = target.join("examples").join("agent_init");
    assert!(
        bin.is_file(),
        "{} missing: cargo test builds examples",
        bin.display()
    );
    bin
}

fn sh(cmd: &str) {
    let out = Command::new("/bin/sh").args(["-c", cmd]).output().unwrap();
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What kubelet and the CNI would have made for a Pod: its network namespace (veth to the
/// "node", a /30 of its own) and its cgroup with the pause container in it.
struct FakePod {
    netns: String,
    host_veth: String,
    cgroup: String,
    uid: String,
    ip: Ipv4Addr,
    /// The node's end of the veth: one of the node's own addresses.
    host_ip: Ipv4Addr,
    pause: Child,
}

impl FakePod {
    fn new() -> FakePod {
        FakePod::numbered(0)
    }

    /// Pod `k` of this test process: tests of one binary run at once, each with its own Pod.
    fn numbered(k: u8) -> FakePod {
        let n = std::process::id();
        // 10.<252-k>.<n>/30 pairs: distinct per test process, never a real network.
        let (a, b) = ((n >> 6) & 0xff, (n & 0x3f) << 2);
        let host_ip = Ipv4Addr::new(10, 252 - k, a as u8, b as u8 + 1);
        let ip = Ipv4Addr::new(10, 252 - k, a as u8, b as u8 + 2);
        let tag = if k == 0 {
            n.to_string()
        } else {
            format!("{n}x{k}")
        };
        let netns = format!("wopt{tag}");
        let host_veth = format!("wopt{tag}h");
        let uid = format!("0aa1b2c3-d4e5-4f60-8a{k:02x}-{n:012}");
        let cgroup = format!("warren-optest-{tag}/kubepods/pod{uid}");
        sh(&format!(
            "ip netns add {netns} && ip link add {host_veth} type veth peer name eth0 netns {netns} \
             && ip addr add {host_ip}/30 dev {host_veth} && ip link set {host_veth} up \
             && ip -n {netns} addr add {ip}/30 dev eth0 && ip -n {netns} link set eth0 up \
             && ip -n {netns} link set lo up"
        ));
        // The pause container: a process in the Pod's netns and a child cgroup of the Pod's.
        let pause_cg = Path::new("/sys/fs/cgroup/unified")
            .join(&cgroup)
            .join("pause");
        let pause_cg = if Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists() {
            pause_cg
        } else {
            Path::new("/sys/fs/cgroup").join(&cgroup).join("pause")
        };
        std::fs::create_dir_all(&pause_cg).unwrap();
        let pause = Command::new("ip")
            .args(["netns", "exec", &netns, "sleep", "3600"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::fs::write(pause_cg.join("cgroup.procs"), pause.id().to_string()).unwrap();
        FakePod {
            netns,
            host_veth,
            cgroup,
            uid,
            ip,
            host_ip,
            pause,
        }
    }
}

/// Removal on drop: a test that panics before its cleanup (or outside its `catch_unwind`) must
/// not leave the netns, the veth, the cgroups, or a `sleep` that holds the test's output pipe.
impl Drop for FakePod {
    fn drop(&mut self) {
        let _ = self.pause.kill();
        let _ = self.pause.wait();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_veth])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        let top = self.cgroup.split('/').next().unwrap().to_string();
        // `ip netns exec` may leave its `sleep` behind (a fork, not an exec): end everything
        // still in the Pod's cgroups, or they hold the test's output pipe and the cgroup.
        for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
            let kill = Path::new(root).join(&top).join("cgroup.kill");
            if kill.exists() {
                let _ = std::fs::write(kill, "1");
            }
        }
        // Deepest first: rmdir only removes empty cgroups.
        for root in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
            let mut dirs: Vec<PathBuf> = walk(&root.path().join(&top));
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for d in dirs {
                let _ = std::fs::remove_dir(d);
            }
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.extend(walk(&e.path()));
            }
        }
        out.push(dir.to_path_buf());
    }
    out
}

fn envd_answers(ip: Ipv4Addr) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&SocketAddr::from((ip, 49983)), Duration::from_millis(500))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.1 204")
}

/// Runs a command inside the sandbox (all of its init's namespaces and its cgroups, as envd's
/// children are), detached in a session of its own, with no host descriptor.
fn exec_in_sandbox(id: &str, init_pid: u32, cmd: &str) {
    let procs: Vec<String> = std::fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .flatten()
        .filter_map(|h| {
            walk(&h.path())
                .into_iter()
                .find(|d| d.file_name().is_some_and(|n| n == id))
                .map(|d| d.join("cgroup.procs").display().to_string())
        })
        .collect();
    let inner = format!(
        "setsid /bin/sh -c '{}' </dev/null >/dev/null 2>&1 &",
        cmd.replace('\'', "'\\''")
    );
    let script = format!(
        "for f in {}; do echo $$ > $f; done; exec nsenter -t {init_pid} -a /bin/sh -c '{}'",
        procs.join(" "),
        inner.replace('\'', "'\\''")
    );
    let mut c = Command::new("/bin/sh");
    c.args(["-c", &script]).stdin(Stdio::null());
    // SAFETY: close_range is async-signal-safe and touches only this child's descriptors.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut c, || {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    let out = c.output().unwrap();
    assert!(out.status.success(), "exec in sandbox: {out:?}");
}

fn read_in_sandbox(init_pid: u32, path: &str) -> String {
    std::fs::read_to_string(format!("/proc/{init_pid}/root{path}")).unwrap_or_default()
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

fn numbers(text: &str) -> Vec<u64> {
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// Every host pid whose cgroup2 path is the sandbox's (a child of the Pod's).
fn v2_cgroup_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_in_a_pod_through_the_agent_interface() {
    require_root();
    let data = fresh_data_dir("test");
    let pod = FakePod::new();
    let mut agent: Box<dyn NodeAgent> = Box::new(
        LocalAgent::new(data.clone(), init_binary())
            .await
            .expect("agent starts"),
    );
    let id = warren_operator::agent::node_id(&pod.uid);
    let req = CreateRequest {
        id: id.clone(),
        template: Some("base".into()),
        pod: PodRef {
            namespace: "default".into(),
            name: "sbx-1".into(),
            uid: pod.uid.clone(),
            ip: Some(pod.ip.to_string()),
        },
        // Neither netns nor cgroup given: the agent finds the Pod from its uid.
        ..Default::default()
    };

    let result = std::panic::AssertUnwindSafe(async {
        // Create: in the Pod's cgroup (a child of it) and network namespace (its address).
        let info = agent.create(NODE, &req).await.expect("create");
        assert_eq!(info.state, SandboxState::Running);
        let pid = info.init_pid.unwrap();
        let cg = v2_cgroup_of(pid);
        assert!(
            cg.trim_start_matches('/')
                .starts_with(&format!("{}/{id}", pod.cgroup)),
            "sandbox init in cgroup {cg}, not under the Pod's {}",
            pod.cgroup
        );
        assert!(envd_answers(pod.ip), "envd answers on the Pod's IP");
        // Idempotent create returns the running sandbox.
        let again = agent.create(NODE, &req).await.expect("repeated create");
        assert_eq!(again.init_pid, Some(pid));

        // Exec: a counter process in the sandbox.
        exec_in_sandbox(
            &id,
            pid,
            "i=0; while true; do i=$((i+1)); echo $i >> /tmp/count; sleep 0.05; done",
        );
        wait_for("the counter to count", || {
            numbers(&read_in_sandbox(pid, "/tmp/count")).len() > 3
        });

        // Metrics: the sandbox's own cgroup and upper dir, read with the single-host code.
        std::thread::sleep(Duration::from_millis(200));
        let m = agent.metrics(NODE, &id).await.expect("metrics");
        assert!(m.cpu_usage_ns > 0, "{m:?}");
        assert!(m.memory_bytes > 0, "{m:?}");
        assert!(
            m.disk_bytes > 0,
            "the counter's file is in the upper dir: {m:?}"
        );
        let later = agent.metrics(NODE, &id).await.unwrap();
        assert!(
            later.cpu_usage_ns >= m.cpu_usage_ns,
            "cumulative: {later:?}"
        );
        assert!(agent
            .metrics(NODE, "nosuchsandbox")
            .await
            .unwrap_err()
            .is_not_found());

        // Pause: nothing counts, envd does not answer; resume: it counts again.
        agent.pause(NODE, &id).await.expect("pause");
        let frozen = numbers(&read_in_sandbox(pid, "/tmp/count")).len();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(numbers(&read_in_sandbox(pid, "/tmp/count")).len(), frozen);
        agent.resume(NODE, &id).await.expect("resume");
        wait_for("counting after resume", || {
            numbers(&read_in_sandbox(pid, "/tmp/count")).len() > frozen + 2
        });
        assert!(envd_answers(pod.ip));

        // Commit: the sandbox's files become an OCI image in the node's store; a repeat of the
        // same commit id returns the first result; bad input is refused clearly.
        let commit = CommitRequest {
            commit_id: "c-1".into(),
            image: "localhost:5999/agent-test:v1".into(),
            push: false,
            ..Default::default()
        };
        let done = agent.commit(NODE, &id, &commit).await.expect("commit");
        assert!(done.digest.starts_with("sha256:"), "{done:?}");
        assert!(done.size_bytes > 0);
        assert_eq!(
            agent.commit(NODE, &id, &commit).await.unwrap().digest,
            done.digest
        );
        let index = std::fs::read_to_string(data.join("images/oci/index.json")).unwrap();
        assert!(index.contains(&done.digest), "{index}");
        let e = agent
            .commit(
                NODE,
                &id,
                &CommitRequest {
                    commit_id: "c-2".into(),
                    image: "Bad Name".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::Failed { code: 400, .. }), "{e}");
        let e = agent
            .commit(
                NODE,
                &id,
                &CommitRequest {
                    commit_id: "c-3".into(),
                    image: "localhost:5999/x:1".into(),
                    push: true,
                    registry_secrets: vec!["regcred".into()],
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        // The agent reads no Secrets: names without the credentials the operator reads are
        // refused.
        assert!(matches!(e, AgentError::Failed { code: 400, .. }), "{e}");
        assert!(e.to_string().contains("reads none"), "{e}");
        assert!(
            numbers(&read_in_sandbox(pid, "/tmp/count")).len() > 3,
            "running after the commit"
        );
        assert!(envd_answers(pod.ip), "thawed after the commit");

        // An agent restart (a DaemonSet rollout): the new agent adopts the running sandbox.
        agent = Box::new(
            LocalAgent::new(data.clone(), init_binary())
                .await
                .expect("agent restarts"),
        );
        let adopted = agent
            .create(NODE, &req)
            .await
            .expect("create after restart");
        assert_eq!(
            adopted.init_pid,
            Some(pid),
            "the same sandbox, not a new one"
        );
        agent.pause(NODE, &id).await.expect("pause after restart");
        agent.resume(NODE, &id).await.expect("resume after restart");

        // Hibernate: the tree is on disk, no process runs, envd is silent; the Pod's netns and
        // cgroup stay. Wake: the same counter carries on in the same cgroup, envd answers.
        let before = numbers(&read_in_sandbox(pid, "/tmp/count"));
        let hib = agent.hibernate(NODE, &id).await.expect("hibernate");
        assert!(hib.size_bytes > 0, "{hib:?}");
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "init ended");
        assert!(!envd_answers(pod.ip));
        let e = agent.hibernate(NODE, &id).await.unwrap_err();
        assert!(e.to_string().contains("hibernated"), "{e}");
        let again = agent
            .create(NODE, &req)
            .await
            .expect("create of a hibernated one");
        assert_eq!(again.state, SandboxState::Hibernated);
        agent.wake(NODE, &id).await.expect("wake");
        let woken = agent.create(NODE, &req).await.unwrap();
        let pid = woken.init_pid.unwrap();
        assert!(
            v2_cgroup_of(pid).contains(&pod.cgroup),
            "woken in the Pod's cgroup"
        );
        wait_for("envd after wake", || envd_answers(pod.ip));
        wait_for("counting after wake", || {
            numbers(&read_in_sandbox(pid, "/tmp/count")).len() > before.len() + 2
        });
        let after = numbers(&read_in_sandbox(pid, "/tmp/count"));
        assert!(
            after.windows(2).all(|w| w[1] == w[0] + 1),
            "the counter went on from its memory, not from 1 again: {after:?}"
        );

        // An agent restart that cut a wake short, after the restore but before its record: the
        // node holds the images and the record of the hibernation, and the restored tree runs.
        // The new agent ends that unrecorded tree and finds the sandbox hibernated on its
        // complete images; a wake brings the hibernation's state back, once.
        let sandbox_dir = data.join("sandboxes").join(&id);
        let saved = data.join("crash-saved");
        let last_before = *numbers(&read_in_sandbox(pid, "/tmp/count")).last().unwrap();
        agent.hibernate(NODE, &id).await.expect("hibernate again");
        sh(&format!(
            "mkdir -p {s} && cp -a {d}/checkpoint {s}/ && cp -a {d}/pod.json {s}/",
            s = saved.display(),
            d = sandbox_dir.display()
        ));
        agent.wake(NODE, &id).await.expect("the wake the crash cuts");
        let unrecorded = agent.create(NODE, &req).await.unwrap().init_pid.unwrap();
        // The cut tree counts on for a while (so that the hibernation's counter, resumed below,
        // visibly steps back to where the images froze it).
        let cut_at = numbers(&read_in_sandbox(unrecorded, "/tmp/count")).len();
        wait_for("the unrecorded tree to count", || {
            numbers(&read_in_sandbox(unrecorded, "/tmp/count")).len() > cut_at + 2
        });
        // The agent dies here (it is replaced below).
        sh(&format!(
            "cp -a {s}/checkpoint {d}/ && cp -a {s}/pod.json {d}/ && touch {d}/netns \
             && mount --bind /run/netns/{ns} {d}/netns",
            s = saved.display(),
            d = sandbox_dir.display(),
            ns = pod.netns
        ));
        agent = Box::new(
            LocalAgent::new(data.clone(), init_binary())
                .await
                .expect("agent restarts after the cut wake"),
        );
        assert!(
            !Path::new(&format!("/proc/{unrecorded}")).exists(),
            "the unrecorded tree was ended"
        );
        let found = agent.create(NODE, &req).await.unwrap();
        assert_eq!(found.state, SandboxState::Hibernated, "{found:?}");
        agent.wake(NODE, &id).await.expect("wake after the restart");
        let pid = agent.create(NODE, &req).await.unwrap().init_pid.unwrap();
        wait_for("envd after the second wake", || envd_answers(pod.ip));
        let counted = |pid| numbers(&read_in_sandbox(pid, "/tmp/count"));
        let upto = counted(pid).len();
        wait_for("counting after the second wake", || counted(pid).len() > upto + 2);
        let after = counted(pid);
        let steps: Vec<(u64, u64)> = after
            .windows(2)
            .filter(|w| w[1] != w[0] + 1)
            .map(|w| (w[0], w[1]))
            .collect();
        // One step back: where the unrecorded tree stopped and the hibernation's counter went on
        // (two trees counting at once would interleave; a fresh start would go back to 1).
        assert_eq!(steps.len(), 1, "one restart of the counter: {steps:?}");
        let (stopped, resumed) = steps[0];
        assert!(
            resumed > last_before && resumed <= stopped,
            "resumed at {resumed} (hibernated after {last_before}, the cut tree stopped at {stopped})"
        );
        assert!(
            !sandbox_dir.join("checkpoint").exists(),
            "the spent images are dropped once the wake is recorded"
        );
        let _ = std::fs::remove_dir_all(&saved);

        // Checkpoint, keeping it running: images and files on the node, the sandbox carries on;
        // a second one of the same name is refused; deleting it is idempotent.
        let cp = CheckpointRequest {
            checkpoint_id: "cp-1".into(),
            keep_running: true,
            contents: vec![],
        };
        let info = agent.checkpoint(NODE, &id, &cp).await.expect("checkpoint");
        assert!(info.size_bytes > 0);
        let cp_dir = data.join("checkpoints/cp-1");
        assert!(cp_dir.join("images/inventory.img").is_file());
        assert!(cp_dir.join("fs/tmp/count").is_file());
        let n = numbers(&read_in_sandbox(pid, "/tmp/count")).len();
        wait_for("running after checkpoint", || {
            numbers(&read_in_sandbox(pid, "/tmp/count")).len() > n + 2
        });
        assert!(agent.checkpoint(NODE, &id, &cp).await.is_err());
        agent.delete_checkpoint(NODE, "cp-1").await.unwrap();
        assert!(!cp_dir.exists());
        agent.delete_checkpoint(NODE, "cp-1").await.unwrap();
        // Filesystem only, and stopping the sandbox: its processes end.
        let fs_only = CheckpointRequest {
            checkpoint_id: "cp-2".into(),
            keep_running: false,
            contents: vec![CheckpointContent::Filesystem],
        };
        agent
            .checkpoint(NODE, &id, &fs_only)
            .await
            .expect("fs checkpoint");
        assert!(data.join("checkpoints/cp-2/fs/tmp/count").is_file());
        assert!(!data.join("checkpoints/cp-2/images").exists());
        wait_for("processes to end", || {
            !Path::new(&format!("/proc/{pid}")).exists()
        });
        agent.delete_checkpoint(NODE, "cp-2").await.unwrap();

        // Errors are typed: an unknown sandbox is NotFound.
        let e = agent.pause(NODE, "nosuchsandbox").await.unwrap_err();
        assert!(e.is_not_found(), "{e}");

        // Delete: processes, cgroup and dir gone; the Pod's cgroup and netns stay; repeat is ok.
        agent.delete(NODE, &id).await.expect("delete");
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "init is gone");
        assert!(
            !data.join("sandboxes").join(&id).exists(),
            "sandbox dir gone"
        );
        assert!(!envd_answers(pod.ip));
        assert!(Path::new(&format!("/var/run/netns/{}", pod.netns)).exists());
        agent.delete(NODE, &id).await.expect("repeated delete");
    })
    .catch_unwind()
    .await;
    let _ = agent.delete(NODE, &id).await;
    drop(agent);
    drop(pod);
    let _ = std::fs::remove_dir_all(&data);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

/// A fork on a node: a checkpoint of a sandbox with state (a file in /tmp, a counter process
/// whose count is in its memory), restored by the agent as a new sandbox into a second Pod. The
/// fork has the state, runs in the new Pod's cgroup and network namespace (its address), its envd
/// is re-keyed with `POST /init`, and source and fork go on independently. A checkpoint the node
/// does not hold is NotFound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_of_a_checkpoint_into_another_pod() {
    require_root();
    let data = fresh_data_dir("fork");
    let (pod1, pod2) = (FakePod::numbered(6), FakePod::numbered(7));
    let agent: Box<dyn NodeAgent> = Box::new(
        LocalAgent::new(data.clone(), init_binary())
            .await
            .expect("agent starts"),
    );
    let pod_ref = |pod: &FakePod, name: &str| PodRef {
        namespace: "default".into(),
        name: name.into(),
        uid: pod.uid.clone(),
        ip: Some(pod.ip.to_string()),
    };
    let src = warren_operator::agent::node_id(&pod1.uid);
    let fork = warren_operator::agent::node_id(&pod2.uid);
    let result = std::panic::AssertUnwindSafe(async {
        let made = agent
            .create(
                NODE,
                &CreateRequest {
                    id: src.clone(),
                    template: Some("base".into()),
                    pod: pod_ref(&pod1, "src"),
                    access_token: Some("token-of-the-source".into()),
                    admin_token: Some("admin-of-the-source".into()),
                    ..Default::default()
                },
            )
            .await
            .expect("create the source");
        let spid = made.init_pid.unwrap();
        exec_in_sandbox(&src, spid, "echo kept > /tmp/marker");
        exec_in_sandbox(
            &src,
            spid,
            "i=0; while true; do i=$((i+1)); echo $i >> /tmp/count; sleep 0.05; done",
        );
        wait_for("the source to count", || {
            numbers(&read_in_sandbox(spid, "/tmp/count")).len() > 3
                && read_in_sandbox(spid, "/tmp/marker") == "kept\n"
        });
        agent
            .checkpoint(
                NODE,
                &src,
                &CheckpointRequest {
                    checkpoint_id: "cp-fork".into(),
                    keep_running: true,
                    contents: vec![],
                },
            )
            .await
            .expect("checkpoint");
        let at_checkpoint = numbers(
            &std::fs::read_to_string(data.join("checkpoints/cp-fork/fs/tmp/count")).unwrap(),
        );

        // A checkpoint this node does not hold: NotFound, saying so; nothing is left behind.
        let e = agent
            .create(
                NODE,
                &CreateRequest {
                    id: "nosuchfork".into(),
                    pod: pod_ref(&pod2, "fork"),
                    restore_from: Some("cp-elsewhere".into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert!(e.is_not_found(), "{e}");
        assert!(e.to_string().contains("cp-elsewhere"), "{e}");
        assert!(!data.join("sandboxes/nosuchfork").exists());

        // The fork, into the second Pod, found from its uid as any create.
        let req = CreateRequest {
            id: fork.clone(),
            pod: pod_ref(&pod2, "fork"),
            restore_from: Some("cp-fork".into()),
            access_token: Some("token-of-the-fork".into()),
            admin_token: Some("admin-of-the-fork".into()),
            env_vars: [("FORKED".to_string(), "1".to_string())].into(),
            ..Default::default()
        };
        let t0 = Instant::now();
        let info = agent.create(NODE, &req).await.expect("fork");
        eprintln!("fork restored and re-keyed in {:?}", t0.elapsed());
        assert_eq!(info.state, SandboxState::Running);
        let fpid = info.init_pid.unwrap();
        assert_ne!(fpid, spid);
        // In the second Pod's cgroup (a child of it) and network namespace.
        let cg = v2_cgroup_of(fpid);
        assert!(
            cg.trim_start_matches('/')
                .starts_with(&format!("{}/{fork}", pod2.cgroup)),
            "fork in cgroup {cg}, not under the second Pod's {}",
            pod2.cgroup
        );
        let netns_of = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
        assert_eq!(
            netns_of(fpid),
            netns_of(pod2.pause.id()),
            "the new Pod's netns"
        );
        assert_ne!(netns_of(fpid), netns_of(spid));
        assert!(
            envd_answers(pod2.ip),
            "the fork's envd answers on the new Pod's IP"
        );
        assert!(envd_answers(pod1.ip), "the source's too, on its own");
        // Its own hostname.
        let host = Command::new("nsenter")
            .args(["-t", &fpid.to_string(), "-u", "hostname"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&host.stdout).trim(), fork);
        // Re-keyed: the agent's `POST /init` reached the restored envd, authenticated with the
        // source's admin token, carrying the fork's access token and env vars.
        let asked = read_in_sandbox(fpid, "/tmp/envd-requests");
        let init = asked
            .split("POST /init")
            .nth(1)
            .unwrap_or_else(|| panic!("no POST /init reached the fork's envd: {asked:?}"));
        assert!(
            init.to_lowercase()
                .contains("x-admin-token: admin-of-the-source"),
            "{init}"
        );
        assert!(
            init.contains("token-of-the-fork") && init.contains("FORKED"),
            "{init}"
        );
        assert!(!read_in_sandbox(spid, "/tmp/envd-requests").contains("POST /init"));

        // The state is there: the file, and the counter goes on from its memory.
        assert_eq!(read_in_sandbox(fpid, "/tmp/marker"), "kept\n");
        wait_for("the fork to count on", || {
            numbers(&read_in_sandbox(fpid, "/tmp/count")).len() > at_checkpoint.len() + 3
        });
        let counted = numbers(&read_in_sandbox(fpid, "/tmp/count"));
        assert_eq!(counted[..at_checkpoint.len()], at_checkpoint[..]);
        assert!(
            counted.windows(2).all(|w| w[1] == w[0] + 1),
            "the fork's counter went on from the checkpoint's count: {counted:?}"
        );

        // Independent: each writes only its own root, and each runs while the other is paused.
        exec_in_sandbox(&src, spid, "echo source > /tmp/only");
        exec_in_sandbox(&fork, fpid, "echo fork > /tmp/only");
        wait_for("both files", || {
            read_in_sandbox(spid, "/tmp/only") == "source\n"
                && read_in_sandbox(fpid, "/tmp/only") == "fork\n"
        });
        agent.pause(NODE, &src).await.expect("pause the source");
        let n = numbers(&read_in_sandbox(fpid, "/tmp/count")).len();
        wait_for("the fork counting while the source is paused", || {
            numbers(&read_in_sandbox(fpid, "/tmp/count")).len() > n + 2
        });
        agent.resume(NODE, &src).await.expect("resume the source");
        agent.delete(NODE, &src).await.expect("delete the source");
        let n = numbers(&read_in_sandbox(fpid, "/tmp/count")).len();
        wait_for("the fork counting after the source is gone", || {
            numbers(&read_in_sandbox(fpid, "/tmp/count")).len() > n + 2
        });
        // The fork's root stacks the checkpoint's files: they cannot go while it runs.
        let e = agent.delete_checkpoint(NODE, "cp-fork").await.unwrap_err();
        assert!(
            matches!(&e, AgentError::Failed { code: 409, message, .. }
                if message.contains(&format!("sandbox {fork}"))),
            "{e}"
        );
        assert!(data.join("checkpoints/cp-fork/fs/tmp/marker").is_file());
        // A repeated create returns the running fork.
        let again = agent.create(NODE, &req).await.expect("repeated create");
        assert_eq!(again.init_pid, Some(fpid));
        assert!(envd_answers(pod2.ip));

        // A fork of the fork (its checkpoint keeps the admin token its envd holds).
        agent
            .checkpoint(
                NODE,
                &fork,
                &CheckpointRequest {
                    checkpoint_id: "cp-fork2".into(),
                    keep_running: false,
                    contents: vec![],
                },
            )
            .await
            .expect("checkpoint of the fork");
        agent.delete(NODE, &fork).await.expect("delete the fork");
        let again = agent
            .create(
                NODE,
                &CreateRequest {
                    restore_from: Some("cp-fork2".into()),
                    ..req.clone()
                },
            )
            .await
            .expect("fork of the fork, into the same Pod again");
        let gpid = again.init_pid.unwrap();
        assert_eq!(read_in_sandbox(gpid, "/tmp/only"), "fork\n");
        assert!(read_in_sandbox(gpid, "/tmp/envd-requests").contains("admin-of-the-source"));
        agent.delete(NODE, &fork).await.expect("delete");
        // The fork's checkpoint stacks the first one's files too: it goes first.
        let e = agent.delete_checkpoint(NODE, "cp-fork").await.unwrap_err();
        assert!(e.to_string().contains("checkpoint cp-fork2"), "{e}");
        agent.delete_checkpoint(NODE, "cp-fork2").await.unwrap();
        agent.delete_checkpoint(NODE, "cp-fork").await.unwrap();
        assert!(!data.join("checkpoints/cp-fork").exists());
        let e = agent.create(NODE, &req).await.unwrap_err();
        assert!(e.is_not_found(), "a deleted checkpoint: {e}");
    })
    .catch_unwind()
    .await;
    let _ = agent.delete(NODE, &src).await;
    let _ = agent.delete(NODE, &fork).await;
    drop(agent);
    drop(pod1);
    drop(pod2);
    let _ = std::fs::remove_dir_all(&data);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

/// The loop device (`loopN`) whose backing file is `image`, if one is.
fn loop_of(image: &Path) -> Option<String> {
    std::fs::read_dir("/sys/block")
        .ok()?
        .flatten()
        .find_map(|d| {
            let name = d.file_name().to_string_lossy().into_owned();
            let backing = std::fs::read_to_string(d.path().join("loop/backing_file")).ok()?;
            (Path::new(backing.trim()) == image).then_some(name)
        })
}

fn free_bytes(path: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C string and a zeroed out-struct that statvfs fills.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; both pointers outlive the call.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    st.f_bavail * st.f_frsize
}

/// Disk caps in Pods: the sandbox's files are on a file system of the cap's size (the
/// single-host disk), so filling it gets ENOSPC at the cap, the node spends at most the cap, and
/// delete frees the image, the mount and the loop device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_sandboxes_get_the_single_host_disk_cap() {
    require_root();
    warren_runtime::linux::disk::check_support().expect("this node must support disk caps");
    let data = fresh_data_dir("disk");
    let pod = FakePod::numbered(1);
    let agent: Box<dyn NodeAgent> = Box::new(
        LocalAgent::new(data.clone(), init_binary())
            .await
            .expect("agent starts")
            .with_sandbox_disk_mb(1024),
    );
    let id = warren_operator::agent::node_id(&pod.uid);
    const CAP_MB: u64 = 64;
    let req = CreateRequest {
        id: id.clone(),
        template: Some("base".into()),
        // What the operator sends for `ephemeral-storage: 64Mi`.
        disk_mb: CAP_MB,
        pod: PodRef {
            namespace: "default".into(),
            name: "sbx-disk".into(),
            uid: pod.uid.clone(),
            ip: Some(pod.ip.to_string()),
        },
        ..Default::default()
    };
    let result = std::panic::AssertUnwindSafe(async {
        let free_before = free_bytes(&data);
        let info = agent.create(NODE, &req).await.expect("create with a cap");
        let pid = info.init_pid.unwrap();
        let dir = data.join("sandboxes").join(&id);
        let image = dir.join("disk.img");
        assert!(image.is_file(), "the sandbox has a disk image");
        let dev = loop_of(&image).expect("the image is on a loop device");
        assert!(
            std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap()
                .contains(&format!(" {} ", dir.join("disk").display())),
            "the disk is mounted at the sandbox dir"
        );

        exec_in_sandbox(
            &id,
            pid,
            "df -k / > /run/df.txt; dd if=/dev/zero of=/fill bs=1M 2>/run/dd.err; \
             echo $? > /run/dd.rc",
        );
        let start = Instant::now();
        while read_in_sandbox(pid, "/run/dd.rc").is_empty() {
            assert!(start.elapsed() < Duration::from_secs(60), "dd never ended");
            std::thread::sleep(Duration::from_millis(100));
        }
        let err = read_in_sandbox(pid, "/run/dd.err");
        assert_ne!(read_in_sandbox(pid, "/run/dd.rc").trim(), "0", "{err}");
        assert!(err.contains("No space left on device"), "dd: {err}");
        let filled = std::fs::metadata(format!("/proc/{pid}/root/fill"))
            .unwrap()
            .len();
        let df = read_in_sandbox(pid, "/run/df.txt");
        let total_kb: u64 = df
            .lines()
            .nth(1)
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("df inside: {df}"));
        eprintln!(
            "cap {CAP_MB} MiB: df / inside shows {total_kb} KiB, dd wrote {} MiB before ENOSPC",
            filled >> 20
        );
        assert!(
            (CAP_MB * 1024 * 8 / 10..=CAP_MB * 1024).contains(&total_kb),
            "df / inside shows the cap: {df}"
        );
        assert!(
            ((CAP_MB << 20) * 7 / 10..=CAP_MB << 20).contains(&filled),
            "ENOSPC at the cap, not before or after: wrote {filled} bytes"
        );
        // What the node spends: the sparse image's blocks, at most the cap.
        use std::os::unix::fs::MetadataExt;
        let spent = std::fs::metadata(&image).unwrap().blocks() * 512;
        let dropped = free_before.saturating_sub(free_bytes(&data));
        eprintln!(
            "node spent {} MiB on the image; free space of the data dir's fs dropped {} MiB \
             (other writers on this host included)",
            spent >> 20,
            dropped >> 20
        );
        assert!(spent <= CAP_MB << 20, "image spends {spent} bytes");

        // Delete: image, mount and loop device go.
        agent.delete(NODE, &id).await.expect("delete");
        assert!(
            !image.exists() && !dir.exists(),
            "sandbox dir and image gone"
        );
        assert!(
            !std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap()
                .contains(&dir.display().to_string()),
            "no mount left under the sandbox dir"
        );
        wait_for("the loop device to be freed", || {
            std::fs::read_to_string(format!("/sys/block/{dev}/loop/backing_file"))
                .map(|b| !b.contains(&id))
                .unwrap_or(true)
        });
    })
    .catch_unwind()
    .await;
    let _ = agent.delete(NODE, &id).await;
    drop(agent);
    drop(pod);
    let _ = std::fs::remove_dir_all(&data);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
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

/// Debian's `docker-registry` on a free loopback port, storing under `dir`; with `auth`, it
/// requires HTTP basic auth as `tester:s3cret` (htpasswd).
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

fn start_registry(dir: &Path, auth: bool) -> Registry {
    need("docker-registry", "docker-registry");
    std::fs::create_dir_all(dir).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut config = format!(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
        dir.join("storage").display()
    );
    if auth {
        need("htpasswd", "apache2-utils");
        // The registry only accepts bcrypt entries.
        let out = Command::new("htpasswd")
            .args(["-Bbn", "tester", "s3cret"])
            .output()
            .unwrap();
        assert!(out.status.success());
        let htpasswd = dir.join("htpasswd");
        std::fs::write(&htpasswd, &out.stdout).unwrap();
        config.push_str(&format!(
            "auth:\n  htpasswd:\n    realm: warren-test\n    path: {}\n",
            htpasswd.display()
        ));
    }
    let file = dir.join("config.yml");
    std::fs::write(&file, config).unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let began = Instant::now();
    while TcpStream::connect(&addr).is_err() {
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "registry did not start on {addr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Registry { child, addr }
}

/// `tests/images/make-busybox-image.sh`'s image (busybox, `/data/hello.txt`, a whiteout, a
/// config with env, workdir and user 1000), pushed to `dest` by skopeo.
fn push_busybox_image(dir: &Path, dest: &[String]) {
    push_busybox_image_with(dir, dest, None)
}

/// [`push_busybox_image`] to a registry that wants `user:password`.
fn push_busybox_image_with(dir: &Path, dest: &[String], creds: Option<&str>) {
    need("skopeo", "skopeo");
    let layout = dir.join("layout");
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/images/make-busybox-image.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(&layout)
        .arg("v1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "make-busybox-image.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for d in dest {
        let mut copy = Command::new("skopeo");
        copy.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        if let Some(c) = creds {
            copy.arg(format!("--dest-creds={c}"));
        }
        let out = copy
            .arg(format!("oci:{}:v1", layout.display()))
            .arg(format!("docker://{d}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo copy to {d}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Images on a node: a sandbox of `image: <ref>` runs on the image pulled into the node's store
/// (once, also for concurrent creates), and a pull that fails says why with the status the
/// operator turns into `ImagePullFailed` (retried with backoff).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_sandboxes_run_images_pulled_once() {
    require_root();
    let data = fresh_data_dir("img");
    let mut reg = Some(start_registry(&data.join("registry"), false));
    let addr = reg.as_ref().unwrap().addr.clone();
    let (v1, v2) = (
        format!("{addr}/warren/tools:v1"),
        format!("{addr}/warren/tools:v2"),
    );
    push_busybox_image(&data, &[v1.clone(), v2.clone()]);
    let pod = FakePod::numbered(2);
    let local = std::sync::Arc::new(
        LocalAgent::new(data.join("node"), init_binary())
            .await
            .expect("agent starts")
            .with_sandbox_disk_mb(64),
    );
    let agent: std::sync::Arc<dyn NodeAgent> = local.clone();
    let id = warren_operator::agent::node_id(&pod.uid);
    let req = CreateRequest {
        id: id.clone(),
        image: Some(v1.clone()),
        pod: PodRef {
            namespace: "default".into(),
            name: "sbx-img".into(),
            uid: pod.uid.clone(),
            ip: Some(pod.ip.to_string()),
        },
        ..Default::default()
    };
    let result = std::panic::AssertUnwindSafe(async {
        // Create: pulled once, run on the image's files.
        let info = agent
            .create(NODE, &req)
            .await
            .expect("create from an image");
        assert_eq!(local.images().pulls(), 1);
        let pid = info.init_pid.unwrap();
        assert!(envd_answers(pod.ip), "envd answers in the image sandbox");
        // The image's busybox shell runs and sees the image's files (the second layer's file,
        // not the one it whited out).
        exec_in_sandbox(
            &id,
            pid,
            "cat /data/hello.txt > /run/out; ls /data > /run/ls; /bin/busybox | head -1 > /run/bb",
        );
        wait_for("the command in the image", || {
            !read_in_sandbox(pid, "/run/bb").is_empty()
        });
        assert_eq!(read_in_sandbox(pid, "/run/out"), "hello from the image\n");
        assert_eq!(read_in_sandbox(pid, "/run/ls").trim(), "hello.txt");
        assert!(read_in_sandbox(pid, "/run/bb").contains("BusyBox"));
        // Warren's /etc layer is on top, as for single-host image templates.
        assert!(read_in_sandbox(pid, "/etc/hosts").contains("localhost"));
        assert!(read_in_sandbox(pid, "/etc/passwd").contains("user:x:1000"));

        // A sandbox of an image (here one without glibc) hibernates and wakes in its Pod too,
        // its files still the image's.
        let hib = agent
            .hibernate(NODE, &id)
            .await
            .expect("hibernate a sandbox of an image without glibc");
        assert!(hib.size_bytes > 0, "{hib:?}");
        agent.wake(NODE, &id).await.expect("wake it");
        let pid = agent.create(NODE, &req).await.unwrap().init_pid.unwrap();
        wait_for("envd after the wake", || envd_answers(pod.ip));
        assert_eq!(
            read_in_sandbox(pid, "/data/hello.txt"),
            "hello from the image\n"
        );

        // A second create (after a delete) needs no registry: the registry is gone.
        agent.delete(NODE, &id).await.expect("delete");
        drop(reg.take());
        let again = agent
            .create(NODE, &req)
            .await
            .expect("create from the store");
        assert_eq!(local.images().pulls(), 1, "the second create did not pull");
        assert!(again.init_pid.is_some());
        agent.delete(NODE, &id).await.expect("delete");

        // Concurrent creates of one image pull once: with the registry back, three gets of
        // v2 at once (v2 has v1's layers: stored and unpacked once, by digest).
        let reg2 = start_registry(&data.join("registry"), false);
        let v2 = v2.replace(&addr, &reg2.addr);
        push_busybox_image(&data, std::slice::from_ref(&v2));
        let imgs = local.images();
        let (a, b, c) = tokio::join!(
            imgs.get(&v2, None, Default::default()),
            imgs.get(&v2, None, Default::default()),
            imgs.get(&v2, None, Default::default())
        );
        let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
        assert_eq!(
            local.images().pulls(),
            2,
            "one pull for three concurrent gets"
        );
        assert_eq!(a, b);
        assert_eq!(b, c);
        assert_eq!(
            a.user, "user",
            "uid 1000 named from the image's /etc/passwd"
        );
        assert_eq!(a.workdir.as_deref(), Some("/data"));
        assert_eq!(a.env["IMAGE_GREETING"], "hi from config");

        // Pull failures: unreachable registry, unknown tag, bad reference. Each is the
        // image-pull status, with the reference and the cause in the message.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        for (image, says) in [
            (format!("127.0.0.1:{closed}/warren/tools:v1"), "127.0.0.1"),
            (format!("{}/warren/tools:nope", reg2.addr), "no such image"),
            ("Not A Reference".to_string(), "invalid image reference"),
        ] {
            let e = agent
                .create(
                    NODE,
                    &CreateRequest {
                        image: Some(image.clone()),
                        ..req.clone()
                    },
                )
                .await
                .unwrap_err();
            assert!(e.is_image_pull_failure(), "{image}: {e}");
            let msg = e.to_string();
            assert!(
                msg.contains("pulling image") && msg.contains(says),
                "{image}: {msg}"
            );
            eprintln!("{image}: {msg}");
        }
        assert!(
            !data.join("node/sandboxes").join(&id).exists(),
            "a failed pull leaves no sandbox behind"
        );

        // Two creates of a new image at once, in two Pods: one pull, both run it.
        let v3 = format!("{}/warren/tools:v3", reg2.addr);
        push_busybox_image(&data, std::slice::from_ref(&v3));
        let (p4, p5) = (FakePod::numbered(4), FakePod::numbered(5));
        let in_pod = |p: &FakePod, name: &str| CreateRequest {
            id: warren_operator::agent::node_id(&p.uid),
            image: Some(v3.clone()),
            pod: PodRef {
                namespace: "default".into(),
                name: name.into(),
                uid: p.uid.clone(),
                ip: Some(p.ip.to_string()),
            },
            ..Default::default()
        };
        let (r4, r5) = (in_pod(&p4, "sbx-4"), in_pod(&p5, "sbx-5"));
        // Attempts count, the failed ones above too.
        let before = local.images().pulls();
        let (a, b) = tokio::join!(agent.create(NODE, &r4), agent.create(NODE, &r5));
        let both = (a.is_ok(), b.is_ok());
        let pulls = local.images().pulls();
        let answered = (envd_answers(p4.ip), envd_answers(p5.ip));
        for r in [&r4, &r5] {
            let _ = agent.delete(NODE, &r.id).await;
        }
        drop(p4);
        drop(p5);
        assert_eq!(both, (true, true), "{a:?} {b:?}");
        assert_eq!(pulls, before + 1, "one pull for two concurrent creates");
        assert_eq!(answered, (true, true), "both sandboxes serve");
    })
    .catch_unwind()
    .await;
    let _ = agent.delete(NODE, &id).await;
    drop(agent);
    drop(local);
    drop(pod);
    let _ = std::fs::remove_dir_all(&data);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

/// `imagePullPolicy`: `Never` serves only what the node has, `IfNotPresent` keeps what it has,
/// `Always` asks the registry each time and pulls only when the tag's digest moved (here: the same
/// layers re-pushed as a Docker schema 2 manifest, so no layer is fetched again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_policies_decide_when_the_registry_is_asked() {
    use warren_operator::crd::ImagePullPolicy::{Always, IfNotPresent, Never};
    require_root();
    let data = fresh_data_dir("policy");
    let mut reg = Some(start_registry(&data.join("registry"), false));
    let image = format!("{}/warren/moving:v1", reg.as_ref().unwrap().addr);
    push_busybox_image(&data, std::slice::from_ref(&image));
    let local = LocalAgent::new(data.join("node"), init_binary())
        .await
        .expect("agent starts");
    let imgs = local.images();
    let result = std::panic::AssertUnwindSafe(async {
        let e = imgs.get(&image, None, Never).await.unwrap_err();
        assert!(
            e.to_string().contains("not on this node") && e.to_string().contains("Never"),
            "{e}"
        );
        assert_eq!(imgs.pulls(), 0, "Never asks no registry");
        let first = imgs.get(&image, None, IfNotPresent).await.unwrap();
        assert_eq!(imgs.pulls(), 1);
        let same = imgs.get(&image, None, Always).await.unwrap();
        assert_eq!(
            (imgs.pulls(), &same.digest),
            (1, &first.digest),
            "unchanged: no pull"
        );

        // The tag moves: the same layers, pushed again as a Docker schema 2 manifest.
        let out = Command::new("skopeo")
            .args([
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                "--format=v2s2",
            ])
            .arg(format!("oci:{}:v1", data.join("layout").display()))
            .arg(format!("docker://{image}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let kept = imgs.get(&image, None, IfNotPresent).await.unwrap();
        assert_eq!(
            (imgs.pulls(), &kept.digest),
            (1, &first.digest),
            "IfNotPresent keeps"
        );
        let kept = imgs.get(&image, None, Never).await.unwrap();
        assert_eq!(kept.digest, first.digest);
        let moved = imgs.get(&image, None, Always).await.unwrap();
        assert_eq!(imgs.pulls(), 2, "Always pulled the moved tag");
        assert_ne!(moved.digest, first.digest);
        assert_eq!(
            moved.rootfs.lower_dirs, first.rootfs.lower_dirs,
            "the same layers"
        );
        let again = imgs.get(&image, None, IfNotPresent).await.unwrap();
        assert_eq!(
            again.digest, moved.digest,
            "the store names the new one now"
        );

        // Always needs the registry; the others do not.
        drop(reg.take());
        let e = imgs.get(&image, None, Always).await.unwrap_err();
        assert!(e.to_string().contains("pulling image"), "{e}");
        assert_eq!(
            imgs.get(&image, None, Never).await.unwrap().digest,
            moved.digest
        );
    })
    .catch_unwind()
    .await;
    drop(local);
    drop(reg);
    let _ = std::fs::remove_dir_all(&data);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

/// A private image (a registry with htpasswd auth): the create's credentials pull it, none or
/// wrong ones are refused by the registry, and once it is on the node it is served from the
/// store only to a create whose credentials the registry accepts, so a Sandbox without them
/// cannot run what another's pull brought to the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_images_are_pulled_and_served_only_with_credentials() {
    require_root();
    let data = fresh_data_dir("private");
    let reg = start_registry(&data.join("registry"), true);
    let image = format!("{}/team/private:v1", reg.addr);
    push_busybox_image_with(&data, std::slice::from_ref(&image), Some("tester:s3cret"));
    let pod = FakePod::numbered(9);
    let local = std::sync::Arc::new(
        LocalAgent::new(data.join("node"), init_binary())
            .await
            .expect("agent starts")
            .with_sandbox_disk_mb(64),
    );
    let agent: std::sync::Arc<dyn NodeAgent> = local.clone();
    let id = warren_operator::agent::node_id(&pod.uid);
    let good = RegistryCredentials {
        username: "tester".into(),
        password: "s3cret".into(),
    };
    let wrong = RegistryCredentials {
        username: "tester".into(),
        password: "guess".into(),
    };
    let req = |registry_credentials: Option<RegistryCredentials>| CreateRequest {
        id: id.clone(),
        image: Some(image.clone()),
        pod: PodRef {
            namespace: "default".into(),
            name: "sbx-private".into(),
            uid: pod.uid.clone(),
            ip: Some(pod.ip.to_string()),
        },
        registry_credentials,
        ..Default::default()
    };
    let result = std::panic::AssertUnwindSafe(async {
        // Not on the node yet: without credentials, or with wrong ones, the registry refuses.
        for creds in [None, Some(wrong.clone())] {
            let e = agent.create(NODE, &req(creds)).await.unwrap_err();
            let msg = e.to_string();
            eprintln!("pull refused: {msg}");
            assert!(e.is_image_pull_failure(), "{msg}");
            assert!(msg.contains("authentication failed"), "{msg}");
            assert!(!msg.contains("s3cret") && !msg.contains("guess"), "{msg}");
        }
        assert!(
            !data.join("node/sandboxes").join(&id).exists(),
            "a refused pull leaves no sandbox"
        );
        assert!(
            !local.images().is_private(&image),
            "nor a private mark on the node"
        );

        // The right ones: pulled, and the sandbox runs the image.
        let info = agent
            .create(NODE, &req(Some(good.clone())))
            .await
            .expect("create with the credentials");
        let pid = info.init_pid.unwrap();
        assert!(envd_answers(pod.ip), "envd answers in the private image");
        exec_in_sandbox(&id, pid, "cat /data/hello.txt > /run/out");
        wait_for("the command in the image", || {
            !read_in_sandbox(pid, "/run/out").is_empty()
        });
        assert_eq!(read_in_sandbox(pid, "/run/out"), "hello from the image\n");
        assert!(local.images().is_private(&image));
        let pulls = local.images().pulls();
        agent.delete(NODE, &id).await.expect("delete");

        // On the node now: still refused without the registry's consent, and served from the
        // store (no pull) with it.
        for creds in [None, Some(wrong.clone())] {
            let e = agent.create(NODE, &req(creds)).await.unwrap_err();
            let msg = e.to_string();
            eprintln!("served from the store refused: {msg}");
            assert!(e.is_image_pull_failure(), "{msg}");
            assert!(msg.contains("private image"), "{msg}");
        }
        let again = agent
            .create(NODE, &req(Some(good.clone())))
            .await
            .expect("create from the store with the credentials");
        assert!(again.init_pid.is_some());
        assert_eq!(local.images().pulls(), pulls, "no second pull");
        agent.delete(NODE, &id).await.expect("delete");
    })
    .catch_unwind()
    .await;
    let _ = agent.delete(NODE, &id).await;
    drop(agent);
    drop(local);
    drop(pod);
    drop(reg);
    let _ = std::fs::remove_dir_all(&data);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

/// A Commit's push with the credentials the operator read from its Secrets: to a loopback
/// registry that requires htpasswd basic auth, refused without them, done with them, and the
/// pushed manifest is what skopeo fetches with the same credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_push_with_the_credentials_the_operator_passes() {
    require_root();
    need("skopeo", "skopeo");
    let data = fresh_data_dir("push");
    let reg = start_registry(&data.join("registry"), true);
    let pod = FakePod::numbered(3);
    let agent: Box<dyn NodeAgent> = Box::new(
        LocalAgent::new(data.join("node"), init_binary())
            .await
            .expect("agent starts")
            .with_sandbox_disk_mb(64),
    );
    let id = warren_operator::agent::node_id(&pod.uid);
    let req = CreateRequest {
        id: id.clone(),
        template: Some("base".into()),
        pod: PodRef {
            namespace: "default".into(),
            name: "sbx-push".into(),
            uid: pod.uid.clone(),
            ip: Some(pod.ip.to_string()),
        },
        ..Default::default()
    };
    let image = format!("{}/warren/pushed:v1", reg.addr);
    let result = std::panic::AssertUnwindSafe(async {
        let info = agent.create(NODE, &req).await.expect("create");
        let pid = info.init_pid.unwrap();
        exec_in_sandbox(&id, pid, "echo committed > /home/user/marker");
        wait_for("the marker", || {
            !read_in_sandbox(pid, "/home/user/marker").is_empty()
        });
        let commit = |n: &str, creds: Option<(&str, &str)>| CommitRequest {
            commit_id: format!("push-{n}"),
            image: image.clone(),
            push: true,
            registry_secrets: vec!["regcred".into()],
            registry_credentials: creds.map(|(u, p)| RegistryCredentials {
                username: u.into(),
                password: p.into(),
            }),
            ..Default::default()
        };
        // No credentials, and wrong ones: the registry refuses the push.
        let e = agent
            .commit(
                NODE,
                &id,
                &CommitRequest {
                    registry_secrets: vec![],
                    ..commit("anon", None)
                },
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("push failed"), "{e}");
        let e = agent
            .commit(NODE, &id, &commit("wrong", Some(("tester", "wrong"))))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("push failed"), "{e}");
        assert!(
            !e.to_string().contains("wrong\""),
            "no password in errors: {e}"
        );
        // With the credentials: pushed.
        let done = agent
            .commit(NODE, &id, &commit("ok", Some(("tester", "s3cret"))))
            .await
            .expect("push with credentials");
        let inspect = |creds: Option<&str>| {
            let mut c = Command::new("skopeo");
            c.args(["inspect", "--raw", "--tls-verify=false"]);
            if let Some(creds) = creds {
                c.args(["--creds", creds]);
            }
            c.arg(format!("docker://{image}")).output().unwrap()
        };
        let out = inspect(Some("tester:s3cret"));
        assert!(
            out.status.success(),
            "skopeo inspect: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        use sha2::Digest;
        let digest = format!("sha256:{:x}", sha2::Sha256::digest(&out.stdout));
        assert_eq!(
            digest, done.digest,
            "the registry serves the committed manifest"
        );
        assert!(
            !inspect(None).status.success(),
            "the registry requires credentials"
        );
    })
    .catch_unwind()
    .await;
    let _ = agent.delete(NODE, &id).await;
    drop(agent);
    drop(pod);
    drop(reg);
    let _ = std::fs::remove_dir_all(&data);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

/// Whether a process in the Pod's network namespace (where the sandbox's processes live)
/// reaches `addr`: a full round trip with the test's server.
fn pod_reaches(netns: &str, addr: SocketAddr) -> bool {
    let ns = std::fs::File::open(format!("/run/netns/{netns}")).unwrap();
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: setns changes only this thread's network namespace; `ns` is open.
        assert_eq!(
            unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        match TcpStream::connect_timeout(&addr, Duration::from_millis(800)) {
            Ok(mut s) => {
                let _ = s.set_read_timeout(Some(Duration::from_millis(800)));
                let mut buf = [0u8; 2];
                s.read_exact(&mut buf).is_ok() && &buf == b"ok"
            }
            Err(e) => {
                assert!(
                    matches!(
                        e.kind(),
                        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::TimedOut
                    ),
                    "{addr}: dropped, not {e:?}"
                );
                false
            }
        }
    })
    .join()
    .unwrap()
}

fn egress_table(netns: &str) -> Option<String> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "nft",
            "list",
            "table",
            "inet",
            "warren_egress",
        ])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The egress policy through the agent's interface: in force when the create returns (it was
/// installed before the sandbox's first process), replaced live (running, frozen and
/// hibernated), the node's own address closed unless named, domain names refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_policy_through_the_agent_interface() {
    use warren_operator::agent::{EgressSpec, NetworkUpdateRequest};
    require_root();
    // Before anything is made that a panic would leave behind.
    let init = init_binary();
    let data = fresh_data_dir("net-test");
    let pod = FakePod::numbered(8);
    // A service on the node's address (the veth end the test made, nothing else).
    let listener = std::net::TcpListener::bind((pod.host_ip, 0)).unwrap();
    let node_service = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in listener.incoming().flatten() {
            let mut c = c;
            let _ = c.write_all(b"ok");
        }
    });
    let agent: Box<dyn NodeAgent> = Box::new(
        LocalAgent::new(data.clone(), init)
            .await
            .expect("agent starts")
            .with_cluster_ranges(vec!["10.99.0.0/16".parse().unwrap()]),
    );
    let id = warren_operator::agent::node_id(&pod.uid);
    let pod_ref = PodRef {
        namespace: "default".into(),
        name: "sbx-net".into(),
        uid: pod.uid.clone(),
        ip: Some(pod.ip.to_string()),
    };
    let closed = EgressSpec {
        allow_internet: false,
        ..Default::default()
    };
    let update = |network: EgressSpec| NetworkUpdateRequest {
        network,
        pod: pod_ref.clone(),
        netns: None,
    };
    assert!(
        pod_reaches(&pod.netns, node_service),
        "open before any policy"
    );

    let result = std::panic::AssertUnwindSafe(async {
        let req = CreateRequest {
            id: id.clone(),
            template: Some("base".into()),
            pod: pod_ref.clone(),
            network: closed.clone(),
            ..Default::default()
        };
        // A policy the agent cannot enforce fails the create: no sandbox runs without it.
        let mut names = req.clone();
        names.network.allow_out = vec!["pypi.org".into()];
        let e = agent.create(NODE, &names).await.unwrap_err();
        assert!(matches!(e, AgentError::Failed { code: 400, .. }), "{e}");
        assert!(egress_table(&pod.netns).is_none(), "nothing was installed");
        assert!(!envd_answers(pod.ip), "and nothing started");

        let info = agent.create(NODE, &req).await.expect("create");
        let table = egress_table(&pod.netns).expect("the table is in the Pod's namespace");
        assert!(table.contains("169.254.0.0/16") && table.contains("10.99.0.0/16"), "{table}");
        assert!(table.contains(&pod.host_ip.to_string()), "the node's address: {table}");
        assert!(!pod_reaches(&pod.netns, node_service), "the node is closed");
        assert!(envd_answers(pod.ip), "the router still reaches envd");

        // Live: naming the node's address opens it; the default closes it again.
        let open_node = EgressSpec {
            allow_internet: false,
            allow_out: vec![pod.host_ip.to_string()],
            deny_out: vec![],
        };
        agent
            .update_network(NODE, &id, &update(open_node.clone()))
            .await
            .expect("update");
        assert!(pod_reaches(&pod.netns, node_service), "allowOut names the node");
        let e = agent
            .update_network(
                NODE,
                &id,
                &update(EgressSpec {
                    allow_out: vec!["pypi.org".into()],
                    ..Default::default()
                }),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(e, AgentError::Failed { code: 400, ref message, .. } if message.contains("pypi.org")),
            "{e}"
        );
        assert!(pod_reaches(&pod.netns, node_service), "a refused update changes nothing");
        agent
            .update_network(NODE, &id, &update(EgressSpec::default()))
            .await
            .unwrap();
        assert!(!pod_reaches(&pod.netns, node_service), "the node is closed by default");

        // Frozen: the update still applies (the namespace is the init's).
        agent.pause(NODE, &id).await.unwrap();
        agent
            .update_network(NODE, &id, &update(open_node.clone()))
            .await
            .unwrap();
        assert!(pod_reaches(&pod.netns, node_service));
        agent.resume(NODE, &id).await.unwrap();

        // Hibernated: no process of the sandbox; the namespace is found from the Pod's uid.
        agent.hibernate(NODE, &id).await.expect("hibernate");
        assert!(!Path::new(&format!("/proc/{}", info.init_pid.unwrap())).exists());
        agent
            .update_network(NODE, &id, &update(closed.clone()))
            .await
            .expect("update while hibernated");
        assert!(!pod_reaches(&pod.netns, node_service));
        agent.wake(NODE, &id).await.expect("wake");
        wait_for("envd after wake", || envd_answers(pod.ip));
        assert!(!pod_reaches(&pod.netns, node_service), "still closed after wake");

        let e = agent
            .update_network(NODE, "nosuchsandbox", &update(closed.clone()))
            .await
            .unwrap_err();
        assert!(e.is_not_found(), "{e}");
        agent.delete(NODE, &id).await.expect("delete");
        assert!(!data.join("egress").join(format!("{id}.json")).exists());
    })
    .catch_unwind()
    .await;
    let _ = agent.delete(NODE, &id).await;
    drop(agent);
    drop(pod);
    let _ = std::fs::remove_dir_all(&data);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}
