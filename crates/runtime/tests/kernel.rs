//! Real-kernel tests of the Linux runtime. They need root (CI runs as root) and fail loudly
//! without it. Each test uses its own data dir, so its own bridge, subnet and cgroup parent.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;
use warren_runtime::SandboxRuntime;

mod common;

use common::{require_root, run_in_sandbox as in_sandbox, Harness};

impl Harness {
    async fn new(name: &str) -> Harness {
        require_root("the runtime's kernel tests (namespaces, cgroups, netlink)");
        Harness::start(
            PathBuf::from(format!("/tmp/warren-kernel-test-{name}")),
            |_| {},
        )
        .await
    }
}

fn health(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
}

#[tokio::test]
async fn create_isolates_and_destroy_leaves_nothing() {
    let h = Harness::new("basic").await;
    let p = h.rt.create(&h.spec("basicone")).await.expect("create");
    assert!(health(p.envd_addr()), "envd port answers");
    assert!(h.rt.is_alive("basicone"));

    let out = in_sandbox(p.init_pid, "hostname; cat /proc/1/cmdline | tr '\\0' ' '; echo; ls /proc | grep -c '^[0-9]'; id -un 1000; ls /root /home; test -e /etc/shadow && echo SHADOW");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "basicone", "hostname is the sandbox id: {text}");
    assert!(
        lines[1].contains("init"),
        "PID 1 is the sandbox init: {text}"
    );
    assert!(!text.contains("SHADOW"), "no /etc/shadow inside: {text}");
    assert!(text.contains("user"), "user exists: {text}");

    h.rt.destroy("basicone").await.expect("destroy");
    assert!(!h.rt.is_alive("basicone"));
    assert!(
        !h.data.join("sandboxes/basicone").exists(),
        "upper dir removed"
    );
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    let (veth, peer) = (p.veth.clone(), p.veth.replacen('h', "p", 1));
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(
        !links.contains(&veth) && !links.contains(&peer),
        "veths removed"
    );
    let cg = std::fs::read_dir("/sys/fs/cgroup/unified")
        .unwrap()
        .flatten()
        .any(|e| e.path().join("basicone").exists());
    assert!(!cg, "cgroups removed");
    h.finish().await;
}

/// Runs a command inside the sandbox's namespaces *and* cgroups, as a process of the sandbox.
fn in_sandbox_cgroup(id: &str, pid: u32, cmd: &str) -> std::process::Output {
    let procs: Vec<String> = ["memory", "pids", "cpu", "unified"]
        .iter()
        .filter_map(|c| {
            let base = PathBuf::from("/sys/fs/cgroup").join(c);
            std::fs::read_dir(&base).ok()?.flatten().find_map(|e| {
                let p = e.path().join(id).join("cgroup.procs");
                p.exists().then(|| p.display().to_string())
            })
        })
        .collect();
    assert!(!procs.is_empty(), "sandbox cgroups exist");
    let script = format!(
        "for f in {}; do echo $$ > $f; done; exec nsenter -t {pid} -a /bin/sh -c '{}'",
        procs.join(" "),
        cmd.replace('\'', "'\\''")
    );
    Command::new("/bin/sh")
        .args(["-c", &script])
        .output()
        .expect("sh runs")
}

#[tokio::test]
async fn memory_limit_kills_only_inside_the_sandbox() {
    let h = Harness::new("memory").await;
    let mut spec = h.spec("memsbx");
    spec.resources.memory_mb = 64;
    let p = h.rt.create(&spec).await.expect("create");
    let out = in_sandbox_cgroup(
        "memsbx",
        p.init_pid,
        "python3 -c 'b = [bytearray(10 << 20) for _ in range(20)]; print(\"survived\")'; echo rc=$?",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("survived"),
        "allocation past the limit must fail: {text}"
    );
    assert!(text.contains("rc=137"), "OOM-killed with SIGKILL: {text}");
    assert!(h.rt.cgroups().oom_kills("memsbx") >= 1);
    // The sandbox itself (its init) is still alive, and so is the host (this test).
    assert!(h.rt.is_alive("memsbx"));
    assert!(health(p.envd_addr()));
    h.finish().await;
}

#[tokio::test]
async fn sandboxes_see_only_their_own_processes_and_files() {
    let h = Harness::new("sepns").await;
    let a = h.rt.create(&h.spec("sepa")).await.expect("create a");
    let b = h.rt.create(&h.spec("sepb")).await.expect("create b");
    in_sandbox_cgroup(
        "sepa",
        a.init_pid,
        "echo secret-a > /tmp/mine; (sleep 300 >/dev/null 2>&1 &)",
    );
    let out = in_sandbox_cgroup(
        "sepb",
        b.init_pid,
        "hostname; cat /tmp/mine 2>&1; ps -e -o comm= | sort | uniq | tr '\\n' ' '",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("sepb\n"), "{text}");
    assert!(
        text.contains("No such file"),
        "b cannot see a's file: {text}"
    );
    assert!(
        !text.contains("sleep"),
        "b cannot see a's processes: {text}"
    );
    let procs = in_sandbox_cgroup("sepa", a.init_pid, "ps -e -o pid= | wc -l");
    let count: usize = String::from_utf8_lossy(&procs.stdout)
        .trim()
        .parse()
        .unwrap();
    assert!(count <= 5, "a sees only its own few processes, got {count}");
    h.finish().await;
}

/// A listener in a network namespace made by the test, standing in for "the internet".
struct Outside {
    ns: String,
    host_if: String,
    addr: std::net::Ipv4Addr,
    server: std::process::Child,
}

impl Outside {
    fn start(tag: &str, third_octet: u8) -> Outside {
        let ns = format!("wkt-{tag}");
        let host_if = format!("wkt{tag}h");
        let peer_if = format!("wkt{tag}p");
        let host_ip = format!("10.254.{third_octet}.1");
        let addr = std::net::Ipv4Addr::new(10, 254, third_octet, 2);
        let sh = |c: &str| {
            let st = Command::new("/bin/sh").args(["-c", c]).status().unwrap();
            assert!(st.success(), "{c}");
        };
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        let _ = Command::new("ip").args(["link", "del", &host_if]).status();
        sh(&format!("ip netns add {ns}"));
        sh(&format!(
            "ip link add {host_if} type veth peer name {peer_if}"
        ));
        sh(&format!("ip link set {peer_if} netns {ns}"));
        sh(&format!(
            "ip addr add {host_ip}/24 dev {host_if} && ip link set {host_if} up"
        ));
        sh(&format!(
            "ip -n {ns} addr add {addr}/24 dev {peer_if} && ip -n {ns} link set {peer_if} up && ip -n {ns} link set lo up"
        ));
        // No route back to the sandbox subnet: replies only arrive if Warren masqueraded.
        let server = Command::new("ip")
            .args(["netns", "exec", &ns, "python3", "-c", "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', 18080)); s.listen()\nwhile True:\n  c,_=s.accept(); c.sendall(b'hello-from-outside\\n'); c.close()"])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        Outside {
            ns,
            host_if,
            addr,
            server,
        }
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

const CONNECT: &str = "python3 -c 'import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2); print(s.recv(100).decode().strip())' ";

#[tokio::test]
async fn network_egress_policy_and_east_west_drop() {
    let h = Harness::new("network").await;
    let outside = Outside::start("net", 77);
    let open = h.rt.create(&h.spec("netopen")).await.expect("create open");
    let mut closed_spec = h.spec("netclosed");
    closed_spec.network.allow_internet = false;
    let closed = h.rt.create(&closed_spec).await.expect("create closed");

    let ok = in_sandbox_cgroup(
        "netopen",
        open.init_pid,
        &format!("{CONNECT} {} 18080 2>&1", outside.addr),
    );
    assert_eq!(
        String::from_utf8_lossy(&ok.stdout).trim(),
        "hello-from-outside"
    );

    let denied = in_sandbox_cgroup(
        "netclosed",
        closed.init_pid,
        &format!("{CONNECT} {} 18080 2>&1; echo rc=$?", outside.addr),
    );
    let text = String::from_utf8_lossy(&denied.stdout);
    assert!(
        !text.contains("hello-from-outside") && text.contains("rc=1"),
        "no egress without internet access: {text}"
    );

    // A listener in one sandbox is unreachable from the other.
    in_sandbox_cgroup("netopen", open.init_pid, "(python3 -c \"import socket\ns=socket.socket(); s.bind(('0.0.0.0', 9000)); s.listen()\nwhile True:\n  c,_=s.accept(); c.sendall(b'neighbour\\n'); c.close()\" >/dev/null 2>&1 &)");
    std::thread::sleep(Duration::from_millis(300));
    let east = in_sandbox_cgroup(
        "netclosed",
        closed.init_pid,
        &format!("{CONNECT} {} 9000 2>&1; echo rc=$?", open.ip),
    );
    let text = String::from_utf8_lossy(&east.stdout);
    assert!(
        !text.contains("neighbour"),
        "sandbox-to-sandbox traffic is dropped: {text}"
    );
    let mut third_spec = h.spec("netthird");
    third_spec.network.allow_internet = true;
    let third = h.rt.create(&third_spec).await.expect("create third");
    let east = in_sandbox_cgroup(
        "netthird",
        third.init_pid,
        &format!("{CONNECT} {} 9000 2>&1; echo rc=$?", open.ip),
    );
    let text = String::from_utf8_lossy(&east.stdout);
    assert!(
        !text.contains("neighbour"),
        "dropped between sandboxes with internet too: {text}"
    );
    // The host itself (the router's position) does reach the sandbox's listener.
    let mut s =
        TcpStream::connect_timeout(&SocketAddr::from((open.ip, 9000)), Duration::from_secs(2))
            .expect("host reaches sandbox");
    let mut buf = String::new();
    std::io::Read::read_to_string(&mut s, &mut buf).unwrap();
    assert_eq!(buf.trim(), "neighbour");

    h.rt.destroy("netclosed").await.unwrap();
    let set = Command::new("nft")
        .args(["list", "ruleset"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&set.stdout).contains(&closed.ip.to_string()),
        "no-internet element removed"
    );
    drop(outside);
    h.finish().await;
}

#[tokio::test]
async fn adopt_after_restart_and_sweep_leftovers() {
    let h = Harness::new("restart").await;
    let keep = h.rt.create(&h.spec("keepme")).await.expect("create keep");
    let _lost = h.rt.create(&h.spec("loseme")).await.expect("create lose");
    // A second runtime over the same data dir stands in for the restarted daemon.
    let rt2 = Harness::restarted(&h.data).await;
    assert!(rt2.adopt("keepme", &keep).await.unwrap());
    let mut stale = keep.clone();
    stale.init_start_ticks += 1;
    assert!(
        !rt2.adopt("keepme", &stale).await.unwrap(),
        "a reused pid is not adopted"
    );
    let cleaned = rt2
        .sweep(&HashSet::from(["keepme".to_string()]))
        .await
        .unwrap();
    assert_eq!(cleaned, vec!["loseme".to_string()]);
    assert!(health(keep.envd_addr()), "adopted sandbox still serves");
    assert!(!h.data.join("sandboxes/loseme").exists());
    rt2.freeze("keepme").await.unwrap();
    rt2.thaw("keepme").await.unwrap();
    rt2.destroy("keepme").await.unwrap();
    h.finish().await;
}

#[tokio::test]
async fn freeze_stops_cpu_and_thaw_resumes() {
    let h = Harness::new("freeze").await;
    let p = h.rt.create(&h.spec("frz")).await.expect("create");
    in_sandbox_cgroup(
        "frz",
        p.init_pid,
        "(sh -c 'while :; do :; done' >/dev/null 2>&1 &)",
    );
    let usage = || -> u64 {
        let base = PathBuf::from("/sys/fs/cgroup/cpuacct");
        std::fs::read_dir(&base)
            .unwrap()
            .flatten()
            .find_map(|e| std::fs::read_to_string(e.path().join("frz/cpuacct.usage")).ok())
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let start = std::time::Instant::now();
    h.rt.freeze("frz").await.unwrap();
    let took = start.elapsed();
    let before = usage();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(usage(), before, "no CPU while frozen");
    h.rt.thaw("frz").await.unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(usage() > before, "CPU again after thaw");
    eprintln!("freeze took {took:?}");
    h.finish().await;
}

/// Not a pass/fail test: prints where create time goes (`cargo test -- --ignored --nocapture`).
#[tokio::test]
#[ignore]
async fn profile_create() {
    let h = Harness::new("profile").await;
    let mut times = vec![];
    for i in 0..30 {
        let id = format!("prof{i}");
        let t = std::time::Instant::now();
        h.rt.create(&h.spec(&id)).await.unwrap();
        times.push(t.elapsed());
        let t = std::time::Instant::now();
        h.rt.destroy(&id).await.unwrap();
        if i == 29 {
            eprintln!("destroy {:?}", t.elapsed());
        }
    }
    times.sort();
    eprintln!(
        "create p50 {:?} min {:?} max {:?}",
        times[15], times[0], times[29]
    );
    let mut times = vec![];
    for i in 0..20 {
        let t = std::time::Instant::now();
        h.rt.create(&h.spec(&format!("batch{i}"))).await.unwrap();
        times.push(t.elapsed());
    }
    times.sort();
    eprintln!(
        "create without destroys in between: p50 {:?} min {:?}",
        times[10], times[0]
    );
    h.finish().await;
}

#[tokio::test]
async fn egress_rules_allow_exceptions_update_live_and_go_with_the_sandbox() {
    use warren_runtime::EgressRules;
    let h = Harness::new("egress").await;
    let a = Outside::start("ega", 78);
    let b = Outside::start("egb", 79);
    let reach = |id: &str, pid: u32, addr: std::net::Ipv4Addr| {
        let out = in_sandbox_cgroup(id, pid, &format!("{CONNECT} {addr} 18080 2>&1"));
        String::from_utf8_lossy(&out.stdout).contains("hello-from-outside")
    };

    // Deny everything but A.
    let mut spec = h.spec("egone");
    spec.network.egress =
        EgressRules::parse(&[format!("{}", a.addr)], &["0.0.0.0/0".to_string()]).unwrap();
    let p = h.rt.create(&spec).await.expect("create");
    assert!(
        reach("egone", p.init_pid, a.addr),
        "allowOut is an exception"
    );
    assert!(
        !reach("egone", p.init_pid, b.addr),
        "denyOut 0.0.0.0/0 blocks"
    );

    // Live update: no rules at all, internet on.
    let mut policy = spec.network.clone();
    policy.egress = EgressRules::default();
    h.rt.set_network("egone", &policy)
        .await
        .expect("clear rules");
    assert!(reach("egone", p.init_pid, a.addr) && reach("egone", p.init_pid, b.addr));

    // Live update: internet off, B allowed as an exception.
    policy.allow_internet = false;
    policy.egress = EgressRules::parse(&[b.addr.to_string()], &[]).unwrap();
    h.rt.set_network("egone", &policy)
        .await
        .expect("deny with exception");
    assert!(!reach("egone", p.init_pid, a.addr), "no internet");
    assert!(
        reach("egone", p.init_pid, b.addr),
        "allowOut beats allow_internet=false"
    );

    // A deny list only.
    policy.allow_internet = true;
    policy.egress = EgressRules::parse(&[], &[format!("{}/24", a.addr)]).unwrap();
    h.rt.set_network("egone", &policy).await.expect("deny A");
    assert!(!reach("egone", p.init_pid, a.addr) && reach("egone", p.init_pid, b.addr));

    let stats = h.rt.stats("egone").await.expect("stats");
    assert!(
        stats.cpu_usage_ns > 0 && stats.memory_bytes > 0,
        "{stats:?}"
    );

    h.rt.destroy("egone").await.unwrap();
    let rules = Command::new("nft")
        .args(["list", "ruleset"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&rules.stdout);
    assert!(!text.contains("eg_egone"), "egress chain removed: {text}");
    assert!(!text.contains(&p.ip.to_string()), "map element removed");
    drop((a, b));
    h.finish().await;
}
