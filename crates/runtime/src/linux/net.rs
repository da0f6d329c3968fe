//! Host side of sandbox networking: one bridge per daemon with the subnet's first address as the
//! sandboxes' gateway, one veth pair per sandbox (host end on the bridge, the other end moved into
//! the sandbox's network namespace), NAT egress, and an nftables table that drops traffic between
//! sandboxes, from sandboxes to the host, and egress of sandboxes created without internet access.

use super::userns::{IdPool, IdRange};
use crate::egress::EgressRules;
use crate::RuntimeError;
use futures::TryStreamExt;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth};
use rtnetlink::{Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Address management for one subnet: the first host address is the gateway, the rest go to
/// sandboxes, handed out next-fit so a freed address is not reused at once.
#[derive(Debug)]
pub struct Ipam {
    network: u32,
    prefix_len: u8,
    state: Mutex<IpamState>,
}

#[derive(Debug)]
struct IpamState {
    used: HashSet<u32>,
    cursor: u32,
}

impl Ipam {
    pub fn new(network: Ipv4Addr, prefix_len: u8) -> Result<Self, RuntimeError> {
        if !(8..=28).contains(&prefix_len) {
            return Err(RuntimeError::Config(format!(
                "sandbox subnet prefix /{prefix_len} must be between /8 and /28"
            )));
        }
        let mask = u32::MAX << (32 - prefix_len as u32);
        Ok(Ipam {
            network: u32::from(network) & mask,
            prefix_len,
            state: Mutex::new(IpamState {
                used: HashSet::new(),
                cursor: 2,
            }),
        })
    }

    fn size(&self) -> u32 {
        1u32 << (32 - self.prefix_len as u32)
    }

    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.network + 1)
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.network)
    }

    pub fn cidr(&self) -> String {
        format!("{}/{}", self.network(), self.prefix_len)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let offset = u32::from(ip).wrapping_sub(self.network);
        offset < self.size()
    }

    pub fn allocate(&self) -> Result<Ipv4Addr, RuntimeError> {
        let mut st = self.state.lock().unwrap();
        let usable = self.size() - 3; // network, gateway, broadcast
        for _ in 0..usable {
            let offset = st.cursor;
            st.cursor = if st.cursor + 1 >= self.size() - 1 {
                2
            } else {
                st.cursor + 1
            };
            if st.used.insert(offset) {
                return Ok(Ipv4Addr::from(self.network + offset));
            }
        }
        Err(RuntimeError::AddressPoolExhausted(self.cidr()))
    }

    /// Marks an address as used (for a re-adopted sandbox). Returns false if it already was.
    pub fn claim(&self, ip: Ipv4Addr) -> bool {
        if !self.contains(ip) {
            return false;
        }
        let offset = u32::from(ip) - self.network;
        self.state.lock().unwrap().used.insert(offset)
    }

    pub fn release(&self, ip: Ipv4Addr) {
        if self.contains(ip) {
            let offset = u32::from(ip) - self.network;
            self.state.lock().unwrap().used.remove(&offset);
        }
    }

    pub fn in_use(&self) -> Vec<Ipv4Addr> {
        let st = self.state.lock().unwrap();
        st.used
            .iter()
            .map(|o| Ipv4Addr::from(self.network + o))
            .collect()
    }
}

fn nl_err(
    op: &'static str,
    object: impl Into<String>,
) -> impl FnOnce(rtnetlink::Error) -> RuntimeError {
    let object = object.into();
    move |e| RuntimeError::Netlink {
        op,
        object,
        message: e.to_string(),
    }
}

/// For `Result::or_else`: treats the netlink error `errno` (EEXIST on create, ENODEV on delete)
/// as success, which makes the operation idempotent.
fn tolerate(errno: i32) -> impl FnOnce(rtnetlink::Error) -> Result<(), rtnetlink::Error> {
    move |e| if is_errno(&e, errno) { Ok(()) } else { Err(e) }
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -errno)
}

/// nft's answer for deleting what is not there, which cleanup treats as done.
fn absent_ok(r: Result<(), RuntimeError>) -> Result<(), RuntimeError> {
    match r {
        Err(RuntimeError::Nft(msg)) if msg.contains("No such file") => Ok(()),
        other => other,
    }
}

/// The daemon's host network: bridge, nftables table and the netlink handle.
pub struct HostNetwork {
    handle: Handle,
    pub bridge: String,
    bridge_index: u32,
    pub ipam: Ipam,
    table: String,
    veth_prefix: String,
    peer_prefix: String,
    next_slot: AtomicU64,
    /// Network namespaces made ahead of time, ready to be entered by a new sandbox.
    ready: Mutex<Vec<NetSlot>>,
    /// With user namespaces on: the pool each prepared namespace's user namespace takes its id
    /// range from (the network namespace is made inside it, see [`NetSlot::userns`]).
    ids: Option<Arc<IdPool>>,
    /// Egress rules with domain names, by sandbox address: what the DNS filter answers for.
    dns_rules: Mutex<HashMap<Ipv4Addr, (String, EgressRules)>>,
    /// Until when each address the DNS filter opened for a sandbox is open (as nft was told),
    /// so that repeated answers for the same names do not run nft while it has long to live.
    dns_opened: Mutex<HashMap<(String, Ipv4Addr), std::time::Instant>>,
}

/// A network namespace with its veth on the bridge, its address and default route configured,
/// waiting for a sandbox. Creating a namespace and moving or creating a veth into it costs tens
/// of milliseconds on a busy kernel (RCU grace periods under the rtnl lock), so the daemon makes
/// them in the background and a create only enters one.
#[derive(Debug)]
pub struct NetSlot {
    /// Holds the namespace alive until a sandbox process has entered it.
    pub netns: OwnedFd,
    pub ip: Ipv4Addr,
    /// Host end of the veth pair.
    pub veth: String,
    /// With user namespaces on: the sandbox's user namespace, which owns `netns` (CRIU dumps a
    /// tree only when all its namespaces belong to its user namespace), and its id range, which
    /// the sandbox made with this slot keeps (and releases when it is destroyed).
    pub userns: Option<(IdRange, OwnedFd)>,
}

impl HostNetwork {
    /// Creates (or re-uses) the bridge, enables forwarding and installs the nftables rules.
    pub async fn setup(
        bridge: &str,
        name_prefix: &str,
        network: Ipv4Addr,
        prefix_len: u8,
        ids: Option<Arc<IdPool>>,
    ) -> Result<Self, RuntimeError> {
        let ipam = Ipam::new(network, prefix_len)?;
        let (conn, handle, _) = rtnetlink::new_connection()
            .map_err(|e| RuntimeError::io("open", "netlink socket", e))?;
        tokio::spawn(conn);

        check_subnet_free(&handle, bridge, &ipam).await?;
        let bridge_index = match link_index(&handle, bridge).await? {
            Some(i) => i,
            None => {
                handle
                    .link()
                    .add(LinkBridge::new(bridge).build())
                    .execute()
                    .await
                    .or_else(tolerate(libc::EEXIST))
                    .map_err(nl_err("create bridge", bridge))?;
                link_index(&handle, bridge)
                    .await?
                    .ok_or_else(|| RuntimeError::Netlink {
                        op: "find bridge",
                        object: bridge.to_string(),
                        message: "missing after creation".into(),
                    })?
            }
        };
        handle
            .address()
            .add(bridge_index, IpAddr::V4(ipam.gateway()), prefix_len)
            .execute()
            .await
            .or_else(tolerate(libc::EEXIST))
            .map_err(nl_err("add address", bridge))?;
        // A bridge without an address of its own takes the lowest MAC of its ports, so it changed
        // whenever a sandbox came or went, and sandboxes holding the old gateway MAC lost their
        // packets to the host until their ARP entry expired (seconds-long stalls under churn).
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(bridge_index)
                    .address(bridge_mac(bridge).to_vec())
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(nl_err("set address and up", bridge))?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .map_err(|e| RuntimeError::io("enable", "/proc/sys/net/ipv4/ip_forward", e))?;

        let net = HostNetwork {
            handle,
            bridge: bridge.to_string(),
            bridge_index,
            table: format!("warren_{name_prefix}"),
            veth_prefix: format!("{name_prefix}h"),
            peer_prefix: format!("{name_prefix}p"),
            next_slot: AtomicU64::new(0),
            ready: Mutex::new(Vec::new()),
            ids,
            dns_rules: Mutex::new(HashMap::new()),
            dns_opened: Mutex::new(HashMap::new()),
            ipam,
        };
        net.install_rules()?;
        Ok(net)
    }

    fn install_rules(&self) -> Result<(), RuntimeError> {
        let (t, br, subnet) = (&self.table, &self.bridge, self.ipam.cidr());
        let vp = &self.veth_prefix;
        // `add` is idempotent for tables, sets and chains; flushing the chains (not the set, map
        // and per-sandbox chains) keeps the egress policy of sandboxes that survive a daemon
        // restart. The egress map comes after the east-west drop (rules never open traffic
        // between sandboxes) and before the no-internet drop (allowed blocks are exceptions).
        let script = format!(
            r#"add table inet {t}
add set inet {t} no_internet {{ type ipv4_addr; }}
add map inet {t} egress {{ type ipv4_addr : verdict; }}
add set inet {t} dns_redirect {{ type ipv4_addr; }}
add chain inet {t} prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}
add chain inet {t} forward {{ type filter hook forward priority -10; policy accept; }}
add chain inet {t} input {{ type filter hook input priority -10; policy accept; }}
add chain inet {t} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}
flush chain inet {t} forward
flush chain inet {t} input
flush chain inet {t} postrouting
flush chain inet {t} prerouting
add rule inet {t} forward iifname "{br}" oifname "{br}" drop
add rule inet {t} forward iifname "{br}" ip saddr vmap @egress
add rule inet {t} forward iifname "{br}" ip saddr @no_internet drop
add rule inet {t} forward oifname "{br}" ip daddr @no_internet ct state new drop
add rule inet {t} input iifname "{br}" ct state established,related accept
add rule inet {t} input iifname "{br}" drop
add rule inet {t} postrouting ip saddr {subnet} oifname != "{br}" masquerade
add table bridge {t}
add chain bridge {t} forward {{ type filter hook forward priority -10; policy accept; }}
flush chain bridge {t} forward
add rule bridge {t} forward iifname "{vp}*" oifname "{vp}*" drop
"#
        );
        nft(&script)
    }

    /// Removes the nftables tables and the bridge (when the daemon is told to clean up the host).
    pub async fn teardown(&self) -> Result<(), RuntimeError> {
        for slot in self.ready.lock().unwrap().drain(..) {
            self.release_ids(&slot);
        }
        let t = &self.table;
        let _ = nft(&format!("delete table inet {t}\ndelete table bridge {t}\n"));
        self.handle
            .link()
            .del(self.bridge_index)
            .execute()
            .await
            .or_else(tolerate(libc::ENODEV))
            .map_err(nl_err("delete bridge", &self.bridge))
    }

    fn names_for_short(&self, short: &str) -> (String, String) {
        (
            format!("{}{short}", self.veth_prefix),
            format!("{}{short}", self.peer_prefix),
        )
    }

    /// Deletes a veth pair given its host end name; the sandbox end goes with it, or, if a create
    /// failed before moving it, is deleted by name too. Idempotent.
    pub async fn delete_veth(&self, host_name: &str) -> Result<(), RuntimeError> {
        let short = host_name
            .strip_prefix(&self.veth_prefix)
            .unwrap_or(host_name);
        let (host, peer) = self.names_for_short(short);
        for name in [host, peer] {
            if let Some(idx) = link_index(&self.handle, &name).await? {
                self.handle
                    .link()
                    .del(idx)
                    .execute()
                    .await
                    .or_else(tolerate(libc::ENODEV))
                    .map_err(nl_err("delete veth", &name))?;
            }
        }
        Ok(())
    }

    /// Host-side veth names of this daemon currently present.
    pub async fn list_veths(&self) -> Result<Vec<String>, RuntimeError> {
        let mut links = self.handle.link().get().execute();
        let mut names = Vec::new();
        while let Some(msg) = links
            .try_next()
            .await
            .map_err(nl_err("list links", "host"))?
        {
            for attr in msg.attributes {
                if let rtnetlink::packet_route::link::LinkAttribute::IfName(name) = attr {
                    if name.starts_with(&self.veth_prefix) {
                        names.push(name);
                    }
                }
            }
        }
        Ok(names)
    }

    pub fn veth_prefix(&self) -> &str {
        &self.veth_prefix
    }

    /// Takes a prepared network namespace, or makes one now when none is ready.
    pub async fn take_slot(&self) -> Result<NetSlot, RuntimeError> {
        let ready = self.ready.lock().unwrap().pop();
        match ready {
            Some(slot) => Ok(slot),
            None => self.prepare_slot().await,
        }
    }

    /// Number of prepared namespaces waiting.
    pub fn ready_slots(&self) -> usize {
        self.ready.lock().unwrap().len()
    }

    /// Prepares namespaces until `target` are ready.
    pub async fn refill(&self, target: usize) -> Result<(), RuntimeError> {
        while self.ready_slots() < target {
            let slot = self.prepare_slot().await?;
            self.ready.lock().unwrap().push(slot);
        }
        Ok(())
    }

    /// The first four characters of the short names of veths this daemon process makes, so that a
    /// sweep never removes one that is being prepared right now.
    pub fn own_tag(&self) -> String {
        format!("{:04x}", std::process::id() & 0xffff)
    }

    /// Whether a host veth name was made by this daemon process.
    pub fn is_own_veth(&self, name: &str) -> bool {
        name.strip_prefix(&self.veth_prefix)
            .is_some_and(|short| short.starts_with(&self.own_tag()))
    }

    /// Host veth names of the prepared namespaces (not leftovers).
    pub fn ready_veths(&self) -> Vec<String> {
        self.ready
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.veth.clone())
            .collect()
    }

    /// A network namespace owned by the host's user namespace. A thread of its own unshares it
    /// and ends right after: the daemon's threads never change namespace, and the descriptor
    /// keeps the namespace alive.
    async fn new_netns(&self) -> Result<OwnedFd, RuntimeError> {
        on_fresh_thread(|| {
            // SAFETY: unshare affects only this short-lived thread (network namespaces are per
            // task); open returns a descriptor we own.
            unsafe {
                if libc::unshare(libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let fd = libc::open(
                    c"/proc/thread-self/ns/net".as_ptr(),
                    libc::O_RDONLY | libc::O_CLOEXEC,
                );
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(OwnedFd::from_raw_fd(fd))
            }
        })
        .await
        .map_err(|e| RuntimeError::io("create network namespace", "/proc/thread-self/ns/net", e))
    }

    /// Gives a slot's id range back to the pool (a slot no sandbox will use).
    pub fn release_ids(&self, slot: &NetSlot) {
        if let (Some(pool), Some((range, _))) = (&self.ids, &slot.userns) {
            pool.release(range);
        }
    }

    /// Makes a network namespace with `lo` and `eth0` up, an address and a default route (with
    /// user namespaces on, inside a new user namespace of its own id range).
    pub async fn prepare_slot(&self) -> Result<NetSlot, RuntimeError> {
        let ip = self.ipam.allocate()?;
        let range = match &self.ids {
            Some(pool) => match pool.allocate() {
                Ok(r) => Some(r),
                Err(e) => {
                    self.ipam.release(ip);
                    return Err(e);
                }
            },
            None => None,
        };
        match self.prepare_slot_with(ip, range).await {
            Ok(slot) => Ok(slot),
            Err(e) => {
                self.ipam.release(ip);
                if let (Some(pool), Some(range)) = (&self.ids, &range) {
                    pool.release(range);
                }
                Err(e)
            }
        }
    }

    async fn prepare_slot_with(
        &self,
        ip: Ipv4Addr,
        range: Option<IdRange>,
    ) -> Result<NetSlot, RuntimeError> {
        let n = self.next_slot.fetch_add(1, Ordering::Relaxed);
        let short = format!("{}{:04x}", self.own_tag(), n & 0xffff);
        let (host, _) = self.names_for_short(&short);
        let (userns, netns) = match range {
            Some(range) => {
                let made =
                    tokio::task::spawn_blocking(move || super::userns::new_userns(&range, true))
                        .await
                        .expect("user namespace creation does not panic")?;
                let netns = made.netns.expect("asked for a network namespace");
                (Some((range, made.userns)), netns)
            }
            None => (None, self.new_netns().await?),
        };

        self.plug(&netns, ip, &host).await?;
        Ok(NetSlot {
            netns,
            ip,
            veth: host,
            userns,
        })
    }

    /// Gives the network namespace `netns` its `eth0`: a veth pair whose host end `host` is on
    /// the bridge, configured with `ip`, a default route and `lo` up.
    async fn plug(&self, netns: &OwnedFd, ip: Ipv4Addr, host: &str) -> Result<(), RuntimeError> {
        let host = host.to_string();
        // One request: the pair, its sandbox end created inside the namespace as eth0, its host
        // end on the bridge and up.
        // The sandbox's MAC is derived from its address (as Docker does): an address handed out
        // again, after a kill or a daemon restart, comes with the same MAC, so a neighbour entry
        // the host still holds for it is right instead of silently black-holing the first packets.
        let peer = LinkUnspec::new_with_name("eth0")
            .address(sandbox_mac(ip).to_vec())
            .setns_by_fd(netns.as_raw_fd())
            .build();
        let msg = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(host.clone())
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .controller(self.bridge_index)
            .up()
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(nl_err("create veth", &host))?;

        let net = crate::init::InitNet {
            address: ip,
            prefix_len: self.ipam.prefix_len(),
            gateway: self.ipam.gateway(),
        };
        let ns_fd = netns.as_raw_fd();
        let configured = on_fresh_thread(move || {
            // SAFETY: setns on this short-lived thread only, with a valid namespace descriptor.
            if unsafe { libc::setns(ns_fd, libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            crate::init::configure_network(Some(&net)).map_err(std::io::Error::other)
        })
        .await;
        if let Err(e) = configured {
            let _ = self.delete_veth(&host).await;
            return Err(RuntimeError::io("configure sandbox network", &host, e));
        }
        Ok(())
    }

    /// Gives a hibernated sandbox's kept network namespace its `eth0` again if it lost it (a wake
    /// of a sandbox in a user namespace moves it into the restored tree's new namespace, and it
    /// dies with that namespace if the restore fails), so that the next wake finds it.
    pub async fn replug(
        &self,
        netns: &OwnedFd,
        ip: Ipv4Addr,
        host: &str,
    ) -> Result<(), RuntimeError> {
        let ns_fd = netns.as_raw_fd();
        let has_eth0 = on_fresh_thread(move || {
            // SAFETY: setns on this short-lived thread only; if_nametoindex reads a C string.
            unsafe {
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(libc::if_nametoindex(c"eth0".as_ptr()) != 0)
            }
        })
        .await
        .map_err(|e| RuntimeError::io("look for eth0 in", host, e))?;
        if has_eth0 {
            return Ok(());
        }
        // The host end may outlive its peer for a moment (a namespace is torn down
        // asynchronously, after the tree in it was killed): it goes first, and the names must be
        // free before the new pair takes them.
        self.delete_veth(host).await?;
        let short = host.strip_prefix(&self.veth_prefix).unwrap_or(host);
        let (host_name, peer_name) = self.names_for_short(short);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while link_index(&self.handle, &host_name).await?.is_some()
            || link_index(&self.handle, &peer_name).await?.is_some()
        {
            if std::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            self.delete_veth(host).await?;
        }
        self.plug(netns, ip, host).await
    }

    /// Cuts a sandbox off from everything outside the sandbox subnet.
    pub fn deny_internet(&self, ip: Ipv4Addr) -> Result<(), RuntimeError> {
        nft(&format!(
            "add element inet {} no_internet {{ {ip} }}\n",
            self.table
        ))
    }

    /// Removes a sandbox address from the no-internet set. Idempotent.
    pub fn allow_internet(&self, ip: Ipv4Addr) -> Result<(), RuntimeError> {
        match nft(&format!(
            "delete element inet {} no_internet {{ {ip} }}\n",
            self.table
        )) {
            Ok(()) => Ok(()),
            Err(RuntimeError::Nft(msg)) if msg.contains("No such file") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Installs or replaces the egress rules of the sandbox at `ip`, atomically (one nft
    /// transaction): its chain `eg_<id>`, jumped to through the `egress` map. With domain names,
    /// also its set `dns_<id>` of resolved addresses and the redirect of its DNS traffic to the
    /// DNS filter.
    pub fn set_egress(
        &self,
        id: &str,
        ip: Ipv4Addr,
        rules: &EgressRules,
    ) -> Result<(), RuntimeError> {
        let t = &self.table;
        let resolved = format!("dns_{id}");
        let domains = !rules.allow_domains.is_empty();
        let mut script = String::new();
        if domains {
            script.push_str(&format!(
                "add set inet {t} {resolved} {{ type ipv4_addr; flags timeout; }}\n"
            ));
        }
        script.push_str(&format!(
            "add chain inet {t} eg_{id}\nflush chain inet {t} eg_{id}\n"
        ));
        for rule in rules.nft_rules(&resolved) {
            script.push_str(&format!("add rule inet {t} eg_{id} {rule}\n"));
        }
        script.push_str(&format!(
            "add element inet {t} egress {{ {ip} : jump eg_{id} }}\n"
        ));
        if domains {
            script.push_str(&format!("add element inet {t} dns_redirect {{ {ip} }}\n"));
        }
        nft(&script)?;
        let mut registry = self.dns_rules.lock().unwrap_or_else(|e| e.into_inner());
        if domains {
            registry.insert(ip, (id.to_string(), rules.clone()));
        } else {
            registry.remove(&ip);
            drop(registry);
            self.drop_dns_state(id, Some(ip))?;
        }
        Ok(())
    }

    /// Removes the DNS redirect of `ip` and the resolved-address set of sandbox `id` (after its
    /// chain stopped referring to it). Idempotent.
    fn drop_dns_state(&self, id: &str, ip: Option<Ipv4Addr>) -> Result<(), RuntimeError> {
        let t = &self.table;
        if let Some(ip) = ip {
            self.dns_rules
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&ip);
            absent_ok(nft(&format!(
                "delete element inet {t} dns_redirect {{ {ip} }}\n"
            )))?;
        }
        self.dns_opened
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(owner, _), _| owner != id);
        absent_ok(nft(&format!("delete set inet {t} dns_{id}\n")))
    }

    /// Removes the egress rules of a sandbox (map element, then chain, then its DNS state).
    /// Idempotent.
    pub fn clear_egress(&self, id: &str, ip: Option<Ipv4Addr>) -> Result<(), RuntimeError> {
        let t = &self.table;
        if let Some(ip) = ip {
            absent_ok(nft(&format!("delete element inet {t} egress {{ {ip} }}\n")))?;
        }
        absent_ok(nft(&format!("delete chain inet {t} eg_{id}\n")))?;
        self.drop_dns_state(id, ip)
    }

    /// The egress rules the DNS filter applies to questions from `ip`, with the sandbox's id.
    pub fn dns_rules_for(&self, ip: Ipv4Addr) -> Option<(String, EgressRules)> {
        self.dns_rules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ip)
            .cloned()
    }

    /// Redirects DNS (UDP and TCP port 53, any destination) of the sandboxes in `dns_redirect`
    /// to the DNS filter on `<gateway>:<port>`, and lets exactly that redirected traffic in.
    pub fn enable_dns_redirect(&self, port: u16) -> Result<(), RuntimeError> {
        let (t, br, gw) = (&self.table, &self.bridge, self.ipam.gateway());
        nft(&format!(
            r#"flush chain inet {t} prerouting
add rule inet {t} prerouting iifname "{br}" ip saddr @dns_redirect udp dport 53 dnat ip to {gw}:{port}
add rule inet {t} prerouting iifname "{br}" ip saddr @dns_redirect tcp dport 53 dnat ip to {gw}:{port}
insert rule inet {t} input iifname "{br}" ip daddr {gw} meta l4proto {{ udp, tcp }} th dport {port} ct status dnat accept
"#
        ))
    }

    /// Opens addresses the DNS filter resolved for sandbox `id` (address, seconds). Re-adding
    /// an address restarts its timeout: add (so that it exists), delete, add, in one transaction.
    /// Addresses still open for more than half the time asked are left alone.
    pub fn open_resolved(&self, id: &str, addrs: &[(Ipv4Addr, u32)]) -> Result<(), RuntimeError> {
        let now = std::time::Instant::now();
        let stale: Vec<(Ipv4Addr, u32)> = {
            let opened = self.dns_opened.lock().unwrap_or_else(|e| e.into_inner());
            addrs
                .iter()
                .filter(|(ip, secs)| {
                    let half = std::time::Duration::from_secs(u64::from(*secs) / 2);
                    opened
                        .get(&(id.to_string(), *ip))
                        .is_none_or(|until| until.saturating_duration_since(now) <= half)
                })
                .copied()
                .collect()
        };
        if stale.is_empty() {
            return Ok(());
        }
        let t = &self.table;
        let mut script = String::new();
        for (ip, secs) in &stale {
            let set = format!("inet {t} dns_{id}");
            script.push_str(&format!("add element {set} {{ {ip} timeout {secs}s }}\n"));
            script.push_str(&format!("delete element {set} {{ {ip} }}\n"));
            script.push_str(&format!("add element {set} {{ {ip} timeout {secs}s }}\n"));
        }
        nft(&script)?;
        let mut opened = self.dns_opened.lock().unwrap_or_else(|e| e.into_inner());
        opened.retain(|_, until| *until > now);
        for (ip, secs) in stale {
            let until = now + std::time::Duration::from_secs(secs.into());
            opened.insert((id.to_string(), ip), until);
        }
        Ok(())
    }

    /// Entries of the egress map: sandbox address and the id its chain is named after.
    pub fn egress_entries(&self) -> Result<Vec<(Ipv4Addr, String)>, RuntimeError> {
        let v = nft_json(&["list", "map", "inet", &self.table, "egress"])?;
        let mut out = Vec::new();
        for item in v["nftables"].as_array().into_iter().flatten() {
            for elem in item["map"]["elem"].as_array().into_iter().flatten() {
                let ip = elem[0].as_str().and_then(|s| s.parse().ok());
                let chain = elem[1]["jump"]["target"].as_str();
                if let (Some(ip), Some(chain)) = (ip, chain) {
                    if let Some(id) = chain.strip_prefix("eg_") {
                        out.push((ip, id.to_string()));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Ids of the sandboxes that have an egress chain.
    pub fn egress_chains(&self) -> Result<Vec<String>, RuntimeError> {
        let v = nft_json(&["list", "chains", "inet"])?;
        let mut out = Vec::new();
        for item in v["nftables"].as_array().into_iter().flatten() {
            let chain = &item["chain"];
            if chain["table"].as_str() != Some(self.table.as_str()) {
                continue;
            }
            if let Some(id) = chain["name"].as_str().and_then(|n| n.strip_prefix("eg_")) {
                out.push(id.to_string());
            }
        }
        Ok(out)
    }

    /// Addresses currently in the no-internet set.
    pub fn denied_addresses(&self) -> Result<Vec<Ipv4Addr>, RuntimeError> {
        let out = Command::new("nft")
            .args(["-j", "list", "set", "inet", &self.table, "no_internet"])
            .output()
            .map_err(|e| RuntimeError::Nft(format!("running nft: {e}")))?;
        if !out.status.success() {
            return Err(RuntimeError::Nft(
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| RuntimeError::Nft(format!("parsing nft -j output: {e}")))?;
        let mut ips = Vec::new();
        for item in v["nftables"].as_array().into_iter().flatten() {
            for elem in item["set"]["elem"].as_array().into_iter().flatten() {
                if let Some(ip) = elem.as_str().and_then(|s| s.parse().ok()) {
                    ips.push(ip);
                }
            }
        }
        Ok(ips)
    }
}

async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>, RuntimeError> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(Some(msg.header.index)),
        Ok(None) => Ok(None),
        Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
        Err(e) => Err(nl_err("get link", name)(e)),
    }
}

/// Picks the sandbox subnet. A `fixed` one (chosen by the operator) is used as given, after
/// checking that no other host interface uses it. Otherwise: the one recorded in `record` (a
/// data dir file) if any, else the first /N from `preferred` on (stepping through 10.200.0.0/13)
/// that no host interface but our own bridge uses. The choice is recorded so that a restart keeps
/// the addresses of running sandboxes.
pub async fn choose_subnet(
    record: &std::path::Path,
    bridge: &str,
    preferred: (Ipv4Addr, u8),
    fixed: bool,
) -> Result<(Ipv4Addr, u8), RuntimeError> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|e| RuntimeError::io("open", "netlink socket", e))?;
    tokio::spawn(conn);
    let remember = |net: Ipv4Addr, len: u8| {
        std::fs::write(record, format!("{net}/{len}\n"))
            .map_err(|e| RuntimeError::io("write", record, e))
    };
    if fixed {
        let ipam = Ipam::new(preferred.0, preferred.1)?;
        check_subnet_free(&handle, bridge, &ipam).await?;
        remember(ipam.network(), preferred.1)?;
        return Ok((ipam.network(), preferred.1));
    }
    if let Ok(text) = std::fs::read_to_string(record) {
        if let Some((net, len)) = text.trim().split_once('/') {
            if let (Ok(net), Ok(len)) = (net.parse(), len.parse()) {
                return Ok((net, len));
            }
        }
    }
    let prefix_len = preferred.1;
    let size = 1u32 << (32 - prefix_len as u32);
    let base = u32::from(Ipv4Addr::new(10, 200, 0, 0));
    let slots = ((8u32 << 16) / size).max(1); // 10.200.0.0/13
    let first = (u32::from(preferred.0).saturating_sub(base) / size) % slots;
    for i in 0..slots {
        let net = Ipv4Addr::from(base + ((first + i) % slots) * size);
        let ipam = Ipam::new(net, prefix_len)?;
        if check_subnet_free(&handle, bridge, &ipam).await.is_ok() {
            remember(net, prefix_len)?;
            return Ok((net, prefix_len));
        }
    }
    Err(RuntimeError::Config(
        "no free sandbox subnet left in 10.200.0.0/13; choose one with --subnet".into(),
    ))
}

/// Refuses a subnet that another interface of the host already uses (another daemon, a VPN...).
async fn check_subnet_free(handle: &Handle, bridge: &str, ipam: &Ipam) -> Result<(), RuntimeError> {
    let own = link_index(handle, bridge).await?;
    let mut addrs = handle.address().get().execute();
    while let Some(msg) = addrs
        .try_next()
        .await
        .map_err(nl_err("list addresses", "host"))?
    {
        if Some(msg.header.index) == own {
            continue;
        }
        for attr in &msg.attributes {
            if let rtnetlink::packet_route::address::AddressAttribute::Address(IpAddr::V4(ip)) =
                attr
            {
                if ipam.contains(*ip) {
                    return Err(RuntimeError::Config(format!(
                        "sandbox subnet {} overlaps address {ip} of another host interface; \
                         choose another subnet",
                        ipam.cidr()
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Runs `nft -j <args>` and parses its JSON output.
fn nft_json(args: &[&str]) -> Result<serde_json::Value, RuntimeError> {
    let out = Command::new("nft")
        .arg("-j")
        .args(args)
        .output()
        .map_err(|e| RuntimeError::Nft(format!("running nft: {e}")))?;
    if !out.status.success() {
        return Err(RuntimeError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| RuntimeError::Nft(format!("parsing nft -j output: {e}")))
}

/// Runs an nftables script.
pub fn nft(script: &str) -> Result<(), RuntimeError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            RuntimeError::Nft(format!(
                "cannot run `nft` ({e}); install the nftables package"
            ))
        })?;
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
        Err(RuntimeError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// The MAC of a sandbox's eth0: locally administered unicast `02:42` followed by its IPv4 address.
fn sandbox_mac(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x42, o[0], o[1], o[2], o[3]]
}

/// A stable, locally administered unicast MAC for the bridge, derived from its name.
fn bridge_mac(bridge: &str) -> [u8; 6] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bridge.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    // 0x02: locally administered, unicast.
    [0x02, b[1], b[2], b[3], b[4], b[5]]
}

/// Moves `eth0` from the network namespace `from` into `to` and configures it there as at create
/// ([`crate::init::configure_network`]: address, default route, `lo` up). For the wake or fork of
/// a sandbox in a user namespace, whose tree CRIU restores into a network namespace made anew
/// (moving a link drops its address and routes). Each error names its step.
pub(crate) async fn move_eth0(
    from: RawFd,
    to: OwnedFd,
    net: crate::init::InitNet,
) -> Result<(), RuntimeError> {
    // A netlink socket speaks for the namespace it was made in: one made on a thread that
    // entered `from` (the daemon's threads never change namespace), driven by this runtime.
    let rt = tokio::runtime::Handle::current();
    let (conn, handle, _) = on_fresh_thread(move || {
        // SAFETY: setns on this short-lived thread only, with a descriptor the caller keeps open.
        if unsafe { libc::setns(from, libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let _in_runtime = rt.enter();
        rtnetlink::new_connection()
    })
    .await
    .map_err(|e| RuntimeError::io("open netlink in", "the sandbox's kept network namespace", e))?;
    let conn = tokio::spawn(conn);
    let moved = async {
        let index = link_index(&handle, "eth0")
            .await?
            .ok_or_else(|| RuntimeError::Netlink {
                op: "find eth0 to move",
                object: "the sandbox's kept network namespace".into(),
                message: "no eth0 there".into(),
            })?;
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .setns_by_fd(to.as_raw_fd())
                    .build(),
            )
            .execute()
            .await
            .map_err(nl_err("move eth0 into", "the restored network namespace"))
    }
    .await;
    conn.abort();
    moved?;
    on_fresh_thread(move || {
        // SAFETY: setns on this short-lived thread only, with a descriptor it owns.
        if unsafe { libc::setns(to.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        crate::init::configure_network(Some(&net)).map_err(std::io::Error::other)
    })
    .await
    .map_err(|e| RuntimeError::io("configure eth0 in", "the restored network namespace", e))
}

/// Runs `f` on a new OS thread that ends afterwards, for work that changes the thread's
/// namespaces.
async fn on_fresh_thread<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.await
        .unwrap_or_else(|_| Err(std::io::Error::other("namespace thread panicked")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipam_hands_out_each_address_once() {
        let ipam = Ipam::new(Ipv4Addr::new(10, 9, 0, 0), 28).unwrap();
        assert_eq!(ipam.gateway(), Ipv4Addr::new(10, 9, 0, 1));
        let mut seen = HashSet::new();
        for _ in 0..13 {
            let ip = ipam.allocate().unwrap();
            assert!(ip != ipam.gateway() && ip != Ipv4Addr::new(10, 9, 0, 15));
            assert!(seen.insert(ip));
        }
        assert!(matches!(
            ipam.allocate(),
            Err(RuntimeError::AddressPoolExhausted(_))
        ));
        ipam.release(Ipv4Addr::new(10, 9, 0, 5));
        assert_eq!(ipam.allocate().unwrap(), Ipv4Addr::new(10, 9, 0, 5));
    }

    #[test]
    fn sandbox_mac_follows_the_address() {
        assert_eq!(
            sandbox_mac(Ipv4Addr::new(10, 200, 1, 2)),
            [0x02, 0x42, 10, 200, 1, 2]
        );
    }

    #[test]
    fn bridge_mac_is_stable_local_unicast() {
        let a = bridge_mac("wabcbr");
        assert_eq!(a, bridge_mac("wabcbr"));
        assert_ne!(a, bridge_mac("wabdbr"));
        assert_eq!(a[0] & 0x03, 0x02);
    }

    #[test]
    fn ipam_claim_marks_used() {
        let ipam = Ipam::new(Ipv4Addr::new(10, 9, 0, 0), 24).unwrap();
        assert!(ipam.claim(Ipv4Addr::new(10, 9, 0, 2)));
        assert!(!ipam.claim(Ipv4Addr::new(10, 9, 0, 2)));
        assert!(!ipam.claim(Ipv4Addr::new(10, 8, 0, 2)));
        assert_ne!(ipam.allocate().unwrap(), Ipv4Addr::new(10, 9, 0, 2));
    }
}
