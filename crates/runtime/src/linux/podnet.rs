//! Egress policy of a sandbox that runs in a Pod's network namespace (cluster mode).
//!
//! In single-host mode the daemon filters a sandbox's traffic on the host, where it leaves the
//! sandbox's veth ([`super::net`]). A Pod's traffic leaves through the CNI's interface, which
//! Warren does not own, so the node agent installs the policy *inside* the Pod's network
//! namespace instead: one nftables table (`inet warren_egress`) whose `output` chain sees every
//! packet that a process of the Pod sends. The sandbox's processes share that namespace but have
//! no `CAP_NET_ADMIN` (dropped from their bounding set, and seccomp denies the user namespace that
//! could give it back), so they cannot change or flush the table; only the agent (root on the
//! node, entering the namespace with `setns`) can.
//!
//! The chain, in order (the first matching rule decides):
//! 1. loopback, and packets in the reply direction of a connection that was opened *to* the Pod
//!    (the router reaching envd, port forwards): accepted. Outbound connections get no blanket
//!    "established" accept, so that a tightened policy also cuts connections already open, as in
//!    single-host mode;
//! 2. DNS (port 53, UDP and TCP) to the sandbox's resolvers: accepted. Before the metadata drop,
//!    because some clouds serve DNS on a link-local address (GCP on 169.254.169.254, AWS on
//!    169.254.169.253); port 53 only, so their metadata HTTP service stays closed;
//! 3. the link-local range `169.254.0.0/16` (the cloud metadata address 169.254.169.254): dropped,
//!    whatever the rules say;
//! 4. `allow_out` blocks that lie inside the cluster's ranges: accepted (naming a cluster address
//!    is the only way to open one; a broad block such as `0.0.0.0/0` does not);
//! 5. the cluster's ranges (Pod and Service networks, the node's own addresses): dropped;
//! 6. the sandbox's [`EgressRules::nft_rules`], as single host: `allow_out` accepts, `deny_out`
//!    drops, so an allowed block is an exception to a denied one;
//! 7. with `allow_internet: false`, everything else: dropped. IPv6 is always dropped past
//!    neighbour discovery: single-host sandboxes have no IPv6 either, and the cluster's ranges
//!    are IPv4.
//!
//! Domain names in `allow_out` need the daemon's DNS filter, which a Pod does not have: they are
//! refused ([`EgressRules::refuse_domains`]).

use crate::egress::{Cidr, CidrError, EgressRules};
use crate::RuntimeError;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// The table the agent owns in each Pod's network namespace.
pub const POD_EGRESS_TABLE: &str = "warren_egress";

/// Link-local addresses, among them the cloud metadata service (169.254.169.254).
pub const LINK_LOCAL: &str = "169.254.0.0/16";

/// The egress policy of one Pod sandbox, with what the node knows about its cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodEgress {
    /// Anything outside the cluster's ranges that no rule names is reachable.
    pub allow_internet: bool,
    /// The sandbox's allow and deny lists (addresses and blocks only).
    #[serde(default)]
    pub egress: EgressRules,
    /// The resolvers the sandbox's `/etc/resolv.conf` names; DNS to them is always open.
    #[serde(default)]
    pub resolvers: Vec<Ipv4Addr>,
    /// The cluster's Pod and Service networks and the node's addresses: closed unless an
    /// `allow_out` block inside them names them.
    #[serde(default)]
    pub east_west: Vec<Cidr>,
}

impl PodEgress {
    /// Refuses what a Pod cannot enforce.
    pub fn validate(&self) -> Result<(), CidrError> {
        self.egress.refuse_domains()
    }

    /// The nftables script that replaces the table in one transaction (`nft -f` applies a
    /// script atomically): adding the table first makes the delete valid when it is absent.
    pub fn nft_script(&self) -> Result<String, CidrError> {
        self.validate()?;
        let t = POD_EGRESS_TABLE;
        let mut rules: Vec<String> = vec![
            "oifname \"lo\" accept".into(),
            "ct direction reply accept".into(),
        ];
        if !self.resolvers.is_empty() {
            let set = join(self.resolvers.iter());
            rules.push(format!("ip daddr {{ {set} }} udp dport 53 accept"));
            rules.push(format!("ip daddr {{ {set} }} tcp dport 53 accept"));
        }
        rules.extend([
            format!("ip daddr {LINK_LOCAL} drop"),
            // Neighbour discovery, so that replies over IPv6 find their next hop.
            "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit } accept"
                .into(),
            "meta nfproto ipv6 drop".into(),
        ]);
        let cluster = disjoint(&self.east_west);
        if !cluster.is_empty() {
            let named: Vec<Cidr> = self
                .egress
                .allow_out
                .iter()
                .filter(|a| cluster.iter().any(|c| c.contains(a)))
                .copied()
                .collect();
            let named = disjoint(&named);
            if !named.is_empty() {
                rules.push(format!("ip daddr {{ {} }} accept", join(named.iter())));
            }
            rules.push(format!("ip daddr {{ {} }} drop", join(cluster.iter())));
        }
        // No DNS filter in a Pod, so no set of resolved addresses (validate refused domains).
        rules.extend(self.egress.nft_rules("unused"));
        if !self.allow_internet {
            rules.push("drop".into());
        }
        let mut script = format!(
            "add table inet {t}\ndelete table inet {t}\nadd table inet {t}\n\
             add chain inet {t} output {{ type filter hook output priority 0; policy accept; }}\n"
        );
        for r in rules {
            script.push_str(&format!("add rule inet {t} output {r}\n"));
        }
        Ok(script)
    }
}

fn join<T: std::fmt::Display>(items: impl Iterator<Item = T>) -> String {
    items.map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}

/// Blocks not covered by another (nftables' interval sets refuse overlaps).
fn disjoint(list: &[Cidr]) -> Vec<Cidr> {
    let mut sorted = list.to_vec();
    sorted.sort_by_key(|c| (c.prefix(), c.addr()));
    sorted.dedup();
    let mut kept: Vec<Cidr> = Vec::new();
    for c in sorted {
        if !kept.iter().any(|k| k.contains(&c)) {
            kept.push(c);
        }
    }
    kept.sort();
    kept
}

/// The IPv4 `nameserver`s of a resolv.conf.
pub fn resolvers_in(conf: &str) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    for line in conf.lines() {
        let mut words = line.split_whitespace();
        if words.next() == Some("nameserver") {
            if let Some(Ok(ip)) = words.next().map(str::parse::<Ipv4Addr>) {
                if !out.contains(&ip) {
                    out.push(ip);
                }
            }
        }
    }
    out
}

/// The node's own IPv4 addresses (all interfaces but loopback), which a Pod sandbox must not
/// reach: kubelet, the agent and host services listen there.
pub fn node_addresses() -> Result<Vec<Ipv4Addr>, RuntimeError> {
    let mut addrs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `addrs` with a list that we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut addrs) } != 0 {
        return Err(RuntimeError::io(
            "getifaddrs",
            "/",
            std::io::Error::last_os_error(),
        ));
    }
    let mut out = Vec::new();
    let mut cur = addrs;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr is non-null and points to a sockaddr whose family we check before
            // reading it as a sockaddr_in.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            if family == libc::AF_INET {
                // SAFETY: as above, the family is AF_INET.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if !ip.is_loopback() && !out.contains(&ip) {
                    out.push(ip);
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `addrs` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(addrs) };
    Ok(out)
}

/// Installs or replaces the policy in the network namespace `netns` (a `/proc/<pid>/ns/net` or
/// `/run/netns/<name>` file), atomically: a packet sees the old table or the new one, never
/// none.
pub fn apply_pod_egress(netns: &Path, policy: &PodEgress) -> Result<(), RuntimeError> {
    let script = policy
        .nft_script()
        .map_err(|e| RuntimeError::Config(e.to_string()))?;
    nft_in(netns, &script)
}

/// Removes the table from the namespace (absent is fine).
pub fn clear_pod_egress(netns: &Path) -> Result<(), RuntimeError> {
    let t = POD_EGRESS_TABLE;
    nft_in(
        netns,
        &format!("add table inet {t}\ndelete table inet {t}\n"),
    )
}

/// Runs an nft script with the child in `netns`.
fn nft_in(netns: &Path, script: &str) -> Result<(), RuntimeError> {
    let ns = std::fs::File::open(netns)
        .map_err(|e| RuntimeError::io("open network namespace", netns, e))?;
    let fd = ns.as_raw_fd();
    let mut cmd = Command::new("nft");
    cmd.args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: setns is async-signal-safe and only changes the forked child's namespace; `ns`
    // outlives the spawn, so the descriptor is valid in the child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        RuntimeError::Nft(format!(
            "cannot run `nft` in {} ({e}); install the nftables package",
            netns.display()
        ))
    })?;
    drop(ns);
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| RuntimeError::Nft(format!("writing to nft: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| RuntimeError::Nft(format!("waiting for nft: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(RuntimeError::Nft(format!(
            "in {}: {}",
            netns.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn rules_of(script: &str) -> Vec<&str> {
        script
            .lines()
            .filter_map(|l| l.strip_prefix("add rule inet warren_egress output "))
            .collect()
    }

    #[test]
    fn script_orders_metadata_dns_cluster_rules_and_default() {
        let p = PodEgress {
            allow_internet: false,
            egress: EgressRules::parse(
                &["10.244.3.4", "0.0.0.0/0", "198.51.100.0/24"],
                &["198.51.100.9"],
            )
            .unwrap(),
            resolvers: vec!["10.96.0.10".parse().unwrap()],
            east_west: cidrs(&[
                "10.244.0.0/16",
                "10.96.0.0/12",
                "192.168.1.5",
                "10.244.0.0/24",
            ]),
        };
        let script = p.nft_script().unwrap();
        assert!(script.starts_with(
            "add table inet warren_egress\ndelete table inet warren_egress\nadd table"
        ));
        assert_eq!(
            rules_of(&script),
            [
                "oifname \"lo\" accept",
                "ct direction reply accept",
                "ip daddr { 10.96.0.10 } udp dport 53 accept",
                "ip daddr { 10.96.0.10 } tcp dport 53 accept",
                "ip daddr 169.254.0.0/16 drop",
                "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit } accept",
                "meta nfproto ipv6 drop",
                // Only the allow block inside the cluster opens it; 0.0.0.0/0 does not.
                "ip daddr { 10.244.3.4/32 } accept",
                "ip daddr { 10.96.0.0/12, 10.244.0.0/16, 192.168.1.5/32 } drop",
                "ip daddr { 0.0.0.0/0 } accept",
                "ip daddr { 198.51.100.9/32 } drop",
                "drop",
            ]
        );
    }

    #[test]
    fn open_policy_still_closes_metadata_and_cluster() {
        let p = PodEgress {
            allow_internet: true,
            east_west: cidrs(&["10.0.0.0/8"]),
            ..Default::default()
        };
        let rules = rules_of(&p.nft_script().unwrap())
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        assert!(rules.contains(&"ip daddr 169.254.0.0/16 drop".to_string()));
        assert_eq!(rules.last().unwrap(), "ip daddr { 10.0.0.0/8 } drop");
    }

    #[test]
    fn domain_names_are_refused() {
        let p = PodEgress {
            egress: EgressRules::parse(&["api.example.com", "1.1.1.1"], &[] as &[&str]).unwrap(),
            ..Default::default()
        };
        let e = p.nft_script().unwrap_err();
        assert!(e.to_string().contains("api.example.com"), "{e}");
        assert!(e.to_string().contains("Pods"), "{e}");
    }

    #[test]
    fn resolvers_from_resolv_conf() {
        let conf = "search default.svc.cluster.local\nnameserver 10.96.0.10\n\
                    nameserver fd00::a\nnameserver 10.96.0.10\n# nameserver 1.1.1.1\noptions ndots:5\n";
        assert_eq!(
            resolvers_in(conf),
            ["10.96.0.10".parse::<Ipv4Addr>().unwrap()]
        );
    }

    #[test]
    fn node_addresses_skip_loopback() {
        let addrs = node_addresses().unwrap();
        assert!(addrs.iter().all(|a| !a.is_loopback()));
    }
}
