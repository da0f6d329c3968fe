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

const NODE: &str = "test-node";

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
        FakePod::tagged(0)
    }

    /// Pod `tag` of this test process (tests of one binary run at once).
    fn tagged(tag: u32) -> FakePod {
        let n = std::process::id() | (tag << 22);
        // 10.(252+tag).<n>/30 pairs: distinct per test process, never a real network.
        let (a, b) = ((n >> 6) & 0xff, (n & 0x3f) << 2);
        let host_ip = Ipv4Addr::new(10, 252 + tag as u8, a as u8, b as u8 + 1);
        let ip = Ipv4Addr::new(10, 252 + tag as u8, a as u8, b as u8 + 2);
        let netns = format!("wopt{n}");
        let host_veth = format!("wopt{n}h");
        let uid = format!("0aa1b2c3-d4e5-4f60-8a7b-{n:012}");
        let cgroup = format!("warren-optest-{n}/kubepods/pod{uid}");
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

    fn remove(mut self) {
        let _ = self.pause.kill();
        let _ = self.pause.wait();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_veth])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        let top = self.cgroup.split('/').next().unwrap().to_string();
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
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the node agent test needs root"
    );
    let data = PathBuf::from(format!("/tmp/warren-agent-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).unwrap();
    let pod = FakePod::new();
    let mut agent: Box<dyn NodeAgent> =
        Box::new(LocalAgent::new(data.clone(), init_binary()).expect("agent starts"));
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
        assert!(matches!(e, AgentError::Failed { code: 501, .. }), "{e}");
        assert!(
            numbers(&read_in_sandbox(pid, "/tmp/count")).len() > 3,
            "running after the commit"
        );
        assert!(envd_answers(pod.ip), "thawed after the commit");

        // An agent restart (a DaemonSet rollout): the new agent adopts the running sandbox.
        agent = Box::new(LocalAgent::new(data.clone(), init_binary()).expect("agent restarts"));
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
    pod.remove();
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
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the node agent test needs root"
    );
    // Before anything is made that a panic would leave behind.
    let init = init_binary();
    let data = PathBuf::from(format!("/tmp/warren-agent-net-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).unwrap();
    let pod = FakePod::tagged(1);
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
    pod.remove();
    let _ = std::fs::remove_dir_all(&data);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}
