//! Real-kernel test of a Pod sandbox's egress policy (`linux::podnet`): the test builds what a
//! CNI would (a Pod network namespace with a veth to a peer namespace that plays the node, the
//! cluster, the cloud metadata service and "the internet"), installs policies inside the Pod's
//! namespace and checks them with real connections. All addresses live in the two namespaces the
//! test made; nothing leaves them. Needs root and nftables, and fails loudly without them.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;
use warren_runtime::linux::podnet::{apply_pod_egress, clear_pod_egress, PodEgress};
use warren_runtime::{Cidr, EgressRules};

mod common;

const POD_IP: &str = "10.213.0.2";
const NODE: &str = "10.213.0.1";
const OTHER_POD: &str = "10.213.7.7";
const KUBE_DNS: &str = "10.96.0.10";
const METADATA: &str = "169.254.169.254";
/// A resolver on a link-local address, as some clouds have (AWS: 169.254.169.253).
const LINK_DNS: &str = "169.254.169.253";
const INTERNET: &str = "198.51.100.7";
const INTERNET_2: &str = "203.0.113.9";
const PORT: u16 = 8080;
const ENVD_PORT: u16 = 49983;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The two namespaces, removed on drop (they are the test's own, named by its pid).
struct Net {
    pod: String,
    peer: String,
}

impl Net {
    fn new(tag: &str) -> Net {
        common::require_root("pod network policy tests");
        let pid = std::process::id();
        let net = Net {
            pod: format!("wpodnet-{tag}-{pid}-pod"),
            peer: format!("wpodnet-{tag}-{pid}-peer"),
        };
        ip(&["netns", "add", &net.pod]);
        ip(&["netns", "add", &net.peer]);
        let (pod, peer) = (net.pod.as_str(), net.peer.as_str());
        ip(&[
            "-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0", "netns",
            peer,
        ]);
        ip(&[
            "-n",
            pod,
            "addr",
            "add",
            &format!("{POD_IP}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", pod, "link", "set", "lo", "up"]);
        ip(&["-n", pod, "link", "set", "eth0", "up"]);
        ip(&["-n", pod, "route", "add", "default", "via", NODE]);
        ip(&[
            "-n",
            peer,
            "addr",
            "add",
            &format!("{NODE}/24"),
            "dev",
            "peer0",
        ]);
        ip(&["-n", peer, "link", "set", "lo", "up"]);
        ip(&["-n", peer, "link", "set", "peer0", "up"]);
        for a in [
            OTHER_POD, KUBE_DNS, METADATA, LINK_DNS, INTERNET, INTERNET_2,
        ] {
            ip(&["-n", peer, "addr", "add", &format!("{a}/32"), "dev", "lo"]);
        }
        // Servers in the peer: TCP that greets and echoes, UDP (DNS port) that echoes.
        in_ns(peer, || {
            let tcp = TcpListener::bind(("0.0.0.0", PORT)).unwrap();
            let udp = UdpSocket::bind(("0.0.0.0", 53)).unwrap();
            std::thread::spawn(move || serve_tcp(tcp));
            std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                while let Ok((n, from)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(&buf[..n], from);
                }
            });
        });
        // "envd" in the Pod, which the router reaches from outside.
        in_ns(pod, || {
            let tcp = TcpListener::bind(("0.0.0.0", ENVD_PORT)).unwrap();
            std::thread::spawn(move || serve_tcp(tcp));
        });
        net
    }

    fn pod_path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.pod))
    }

    fn apply(&self, policy: &PodEgress) {
        apply_pod_egress(&self.pod_path(), policy).expect("policy applies");
    }

    /// Whether the Pod reaches `addr:PORT` (a full round trip: greeting read).
    fn pod_reaches(&self, addr: &str) -> bool {
        let target: SocketAddr = format!("{addr}:{PORT}").parse().unwrap();
        in_ns(&self.pod, move || probe(target))
    }

    fn pod_dns(&self) -> bool {
        self.pod_dns_to(KUBE_DNS)
    }

    /// Whether a UDP query to `server:53` gets its answer.
    fn pod_dns_to(&self, server: &'static str) -> bool {
        in_ns(&self.pod, move || {
            let s = UdpSocket::bind(("0.0.0.0", 0)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(800)))
                .unwrap();
            if s.send_to(b"query", (server, 53)).is_err() {
                return false;
            }
            let mut buf = [0u8; 16];
            matches!(s.recv_from(&mut buf), Ok((5, _)))
        })
    }

    /// Whether the peer (the router) reaches envd in the Pod.
    fn router_reaches_envd(&self) -> bool {
        let target: SocketAddr = format!("{POD_IP}:{ENVD_PORT}").parse().unwrap();
        in_ns(&self.peer, move || probe(target))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.pod])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.peer])
            .status();
    }
}

fn serve_tcp(listener: TcpListener) {
    for conn in listener.incoming() {
        let Ok(mut c) = conn else { continue };
        std::thread::spawn(move || {
            let _ = c.write_all(b"hi\n");
            let mut buf = [0u8; 64];
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 || c.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
}

/// Runs `f` on a thread that entered the named namespace.
fn in_ns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
    std::thread::spawn(move || {
        // SAFETY: setns changes only this thread's network namespace; `ns` is open.
        assert_eq!(
            unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        f()
    })
    .join()
    .unwrap()
}

/// Connects and reads the greeting. A dropped connection must fail as a drop does (refused by
/// the local filter, or timed out), never as "refused" by the far end, which would mean the
/// packets got through.
fn probe(target: SocketAddr) -> bool {
    match TcpStream::connect_timeout(&target, Duration::from_millis(800)) {
        Ok(mut s) => {
            s.set_read_timeout(Some(Duration::from_millis(800)))
                .unwrap();
            let mut buf = [0u8; 3];
            s.read_exact(&mut buf).is_ok() && &buf == b"hi\n"
        }
        Err(e) => {
            assert!(
                matches!(
                    e.kind(),
                    ErrorKind::PermissionDenied | ErrorKind::TimedOut | ErrorKind::WouldBlock
                ),
                "{target}: a drop, not {e:?}"
            );
            false
        }
    }
}

fn cidrs(list: &[&str]) -> Vec<Cidr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

/// What the node agent would pass: the cluster's Pod and Service networks and the node itself.
fn base(allow_internet: bool, allow: &[&str], deny: &[&str]) -> PodEgress {
    PodEgress {
        allow_internet,
        egress: EgressRules::parse(allow, deny).unwrap(),
        resolvers: vec![
            KUBE_DNS.parse().unwrap(),
            LINK_DNS.parse::<Ipv4Addr>().unwrap(),
        ],
        east_west: cidrs(&["10.213.0.0/16", "10.96.0.0/12", NODE]),
    }
}

#[test]
fn pod_egress_policy_holds_with_real_connections() {
    let net = Net::new("a");
    // Without a policy the Pod reaches everything, which is what the table must change.
    for a in [NODE, OTHER_POD, KUBE_DNS, METADATA, INTERNET, INTERNET_2] {
        assert!(net.pod_reaches(a), "{a} reachable before any policy");
    }

    // Internet allowed, one address denied: denyOut wins over the open default; metadata and
    // the cluster (other Pods, Services, the node) are closed; DNS and inbound work.
    net.apply(&base(true, &[], &[INTERNET_2]));
    assert!(net.pod_reaches(INTERNET), "internet open");
    assert!(!net.pod_reaches(INTERNET_2), "deny_out drops");
    assert!(!net.pod_reaches(METADATA), "metadata dropped");
    for a in [NODE, OTHER_POD, KUBE_DNS] {
        assert!(!net.pod_reaches(a), "east-west {a} dropped");
    }
    assert!(net.pod_dns(), "DNS to the Pod's resolver");
    assert!(net.pod_dns_to(LINK_DNS), "DNS to a link-local resolver");
    assert!(!net.pod_reaches(LINK_DNS), "only its port 53");
    assert!(
        !net.pod_dns_to(METADATA),
        "link-local addresses that are no resolver stay closed"
    );
    assert!(
        !net.pod_dns_to(INTERNET_2),
        "DNS to other servers follows the rules"
    );
    assert!(net.router_reaches_envd(), "replies to inbound connections");

    // A connection opened now is cut by the next, tighter policy (no blanket "established").
    let mut held = in_ns(&net.pod, || {
        let mut s = TcpStream::connect((INTERNET, PORT)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(800)))
            .unwrap();
        let mut buf = [0u8; 3];
        s.read_exact(&mut buf).unwrap();
        s
    });

    // Live update: no internet, with exceptions. allowOut opens an internet address and a
    // cluster address it names, never the metadata range; the node stays closed.
    net.apply(&base(false, &[INTERNET_2, OTHER_POD, METADATA], &[]));
    assert!(!net.pod_reaches(INTERNET), "internet denied");
    assert!(net.pod_reaches(INTERNET_2), "allow_out exception");
    assert!(
        net.pod_reaches(OTHER_POD),
        "allow_out names a cluster address"
    );
    assert!(
        !net.pod_reaches(METADATA),
        "metadata dropped even when allowed"
    );
    assert!(!net.pod_reaches(NODE), "the node stays closed");
    assert!(net.pod_dns(), "DNS still open");
    assert!(net.router_reaches_envd(), "inbound still answered");
    held.write_all(b"x").unwrap_or(());
    let mut buf = [0u8; 1];
    assert!(
        held.read_exact(&mut buf).is_err(),
        "an open connection to a now-denied address is cut"
    );

    // A broad allow opens the internet but not the cluster.
    net.apply(&base(false, &["0.0.0.0/0"], &[]));
    assert!(net.pod_reaches(INTERNET) && net.pod_reaches(INTERNET_2));
    assert!(!net.pod_reaches(OTHER_POD) && !net.pod_reaches(NODE) && !net.pod_reaches(METADATA));

    // Domain names cannot be enforced in a Pod: refused, and the table in force is unchanged.
    let err = apply_pod_egress(&net.pod_path(), &base(false, &["example.com"], &[])).unwrap_err();
    assert!(err.to_string().contains("example.com"), "{err}");
    assert!(net.pod_reaches(INTERNET) && !net.pod_reaches(OTHER_POD));

    clear_pod_egress(&net.pod_path()).unwrap();
    assert!(net.pod_reaches(OTHER_POD) && net.pod_reaches(METADATA));
    clear_pod_egress(&net.pod_path()).expect("clearing twice is fine");
}

#[test]
fn processes_without_cap_net_admin_cannot_change_the_table() {
    let net = Net::new("b");
    net.apply(&base(false, &[], &[]));
    let ns = net.pod_path();
    let ns_arg = format!("--net={}", ns.display());
    // As root of the node but without CAP_NET_ADMIN (what the sandbox's processes lack), and
    // as root of a new user namespace (which owns no right over the Pod's namespace).
    let attempts: [&[&str]; 3] = [
        &[
            &ns_arg,
            "capsh",
            "--drop=cap_net_admin",
            "--",
            "-c",
            "nft flush ruleset",
        ],
        &[
            &ns_arg,
            "capsh",
            "--drop=cap_net_admin",
            "--",
            "-c",
            "nft delete table inet warren_egress",
        ],
        &[&ns_arg, "unshare", "-Ur", "nft", "flush", "ruleset"],
    ];
    for args in attempts {
        let out = Command::new("nsenter")
            .args(args)
            .output()
            .expect("nsenter runs");
        assert!(
            !out.status.success(),
            "{args:?} must fail: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let listed = Command::new("nsenter")
        .args([&ns_arg, "nft", "list", "table", "inet", "warren_egress"])
        .output()
        .unwrap();
    assert!(listed.status.success(), "the table is still there");
    assert!(!net.pod_reaches(INTERNET), "and still drops");
    assert!(net.router_reaches_envd());
}
