//! The DNS filter behind domain names in `allow_out`.
//!
//! A sandbox whose egress rules name domains has its DNS traffic (UDP and TCP port 53, to any
//! server) redirected by nftables to this resolver on the bridge's gateway address. The resolver
//! answers only questions for allowed names: those it forwards to the host's upstream servers,
//! and before handing the answer back it adds every IPv4 address in it to the sandbox's
//! `dns_<id>` set (accepted by the sandbox's egress chain) for the record's TTL, at least
//! [`MIN_OPEN_SECS`]. Questions for any other name get `REFUSED` without leaving the host, so a
//! sandbox that may reach `pypi.org` cannot use DNS as a tunnel to anywhere else.
//!
//! Addresses are opened per sandbox, not globally, and only IPv4 ones (sandboxes have no IPv6
//! route). A name that shares an address with a disallowed one (a CDN) opens that address: the
//! filter works at the IP layer, as any DNS-based filter does.

use super::net::HostNetwork;
use crate::RuntimeError;
use simple_dns::{rdata::RData, Packet, PacketFlag, RCODE};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

/// An address resolved for an allowed name stays open at least this long, so that a client
/// that caches an answer with a short TTL can still connect.
pub const MIN_OPEN_SECS: u32 = 60;
/// And at most this long, whatever the TTL says.
const MAX_OPEN_SECS: u32 = 86_400;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// Questions in flight at once, across all sandboxes: bounds what a flooding sandbox costs.
const MAX_IN_FLIGHT: usize = 256;

/// The host's resolvers from `/etc/resolv.conf` (port 53). The daemon runs on the host, so
/// loopback resolvers (systemd-resolved, dnsmasq) are reachable from here even though sandboxes
/// could not reach them.
pub fn host_upstreams() -> Vec<SocketAddr> {
    let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    conf.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// The running resolver.
pub struct DnsFilter {
    pub port: u16,
}

impl DnsFilter {
    /// Binds UDP and TCP on `<gateway>:<port>` (an ephemeral port, the same for both), starts
    /// serving and installs the redirect rules.
    pub async fn start(
        net: Arc<HostNetwork>,
        upstreams: Vec<SocketAddr>,
    ) -> Result<DnsFilter, RuntimeError> {
        let gateway = net.ipam.gateway();
        let (udp, tcp) = bind_pair(gateway).await?;
        let port = udp
            .local_addr()
            .map_err(|e| RuntimeError::io("getsockname", "dns filter socket", e))?
            .port();
        let shared = Arc::new(Shared {
            net: net.clone(),
            upstreams,
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
        });
        tokio::spawn(serve_udp(Arc::new(udp), shared.clone()));
        tokio::spawn(serve_tcp(tcp, shared));
        net.enable_dns_redirect(port)?;
        tracing::info!(%gateway, port, "dns filter listening");
        Ok(DnsFilter { port })
    }
}

async fn bind_pair(gateway: Ipv4Addr) -> Result<(UdpSocket, TcpListener), RuntimeError> {
    let mut last = None;
    for _ in 0..16 {
        let udp = UdpSocket::bind(SocketAddrV4::new(gateway, 0))
            .await
            .map_err(|e| RuntimeError::io("bind", format!("udp {gateway}:0"), e))?;
        let port = udp
            .local_addr()
            .map_err(|e| RuntimeError::io("getsockname", "dns filter socket", e))?
            .port();
        match TcpListener::bind(SocketAddrV4::new(gateway, port)).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some(e),
        }
    }
    let e = last.expect("at least one attempt");
    Err(RuntimeError::io("bind", format!("tcp {gateway}"), e))
}

struct Shared {
    net: Arc<HostNetwork>,
    upstreams: Vec<SocketAddr>,
    in_flight: Semaphore,
}

async fn serve_udp(socket: Arc<UdpSocket>, shared: Arc<Shared>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "dns filter: udp receive failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let SocketAddr::V4(from) = from else { continue };
        let Ok(permit) = shared.in_flight.try_acquire() else {
            continue; // overloaded: dropped, the client retries
        };
        let query = buf[..n].to_vec();
        let (socket, shared) = (socket.clone(), shared.clone());
        permit.forget();
        tokio::spawn(async move {
            if let Some(reply) = shared.answer(*from.ip(), &query, Transport::Udp).await {
                let _ = socket.send_to(&reply, from).await;
            }
            shared.in_flight.add_permits(1);
        });
    }
}

async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "dns filter: tcp accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let SocketAddr::V4(from) = from else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                Duration::from_secs(30),
                serve_tcp_client(stream, *from.ip(), shared),
            )
            .await;
        });
    }
}

async fn serve_tcp_client(
    mut stream: TcpStream,
    from: Ipv4Addr,
    shared: Arc<Shared>,
) -> std::io::Result<()> {
    loop {
        let query = match read_framed(&mut stream).await {
            Ok(q) => q,
            Err(_) => return Ok(()), // the client closed, or sent garbage
        };
        let _permit = shared.in_flight.acquire().await;
        match shared.answer(from, &query, Transport::Tcp).await {
            Some(reply) => write_framed(&mut stream, &reply).await?,
            None => return Ok(()),
        }
    }
}

async fn read_framed(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let len = stream.read_u16().await? as usize;
    let mut msg = vec![0u8; len];
    stream.read_exact(&mut msg).await?;
    Ok(msg)
}

async fn write_framed(stream: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(|_| std::io::ErrorKind::InvalidData)?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    stream.write_all(&out).await
}

#[derive(Clone, Copy, Debug)]
enum Transport {
    Udp,
    Tcp,
}

/// What to do with a question, decided from the asking sandbox's rules.
#[derive(Debug, PartialEq)]
pub(crate) enum Verdict {
    /// Forward it; addresses in the answer open for sandbox `id`.
    Forward { id: String },
    /// Answer `REFUSED` (with this id and question).
    Refuse,
    /// Not a DNS query we can answer at all: drop it.
    Drop,
}

/// Decides on a raw query from `from`. Only single-question standard queries are forwarded.
pub(crate) fn judge(net: &HostNetwork, from: Ipv4Addr, query: &[u8]) -> Verdict {
    let Ok(packet) = Packet::parse(query) else {
        return Verdict::Drop;
    };
    if packet.has_flags(PacketFlag::RESPONSE) {
        return Verdict::Drop;
    }
    let [question] = packet.questions.as_slice() else {
        return Verdict::Refuse;
    };
    match net.dns_rules_for(from) {
        Some((id, rules)) if rules.allows_name(&question.qname.to_string()) => {
            Verdict::Forward { id }
        }
        _ => Verdict::Refuse,
    }
}

/// A `REFUSED` reply to `query` (same id and question).
pub(crate) fn refusal(query: &[u8]) -> Option<Vec<u8>> {
    let q = Packet::parse(query).ok()?;
    let mut reply = Packet::new_reply(q.id());
    reply.set_flags(PacketFlag::RECURSION_AVAILABLE);
    if q.has_flags(PacketFlag::RECURSION_DESIRED) {
        reply.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    reply.questions = q.questions.clone();
    *reply.rcode_mut() = RCODE::Refused;
    reply.build_bytes_vec().ok()
}

/// IPv4 addresses in the answer section of a reply to query `id`, with their TTLs.
pub(crate) fn answer_addresses(reply: &[u8], id: u16) -> Option<Vec<(Ipv4Addr, u32)>> {
    let p = Packet::parse(reply).ok()?;
    if p.id() != id || !p.has_flags(PacketFlag::RESPONSE) {
        return None;
    }
    Some(
        p.answers
            .iter()
            .filter_map(|rr| match &rr.rdata {
                RData::A(a) => Some((Ipv4Addr::from(a.address), rr.ttl)),
                _ => None,
            })
            .collect(),
    )
}

impl Shared {
    async fn answer(&self, from: Ipv4Addr, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        match judge(&self.net, from, query) {
            Verdict::Drop => None,
            Verdict::Refuse => refusal(query),
            Verdict::Forward { id } => {
                let qid = u16::from_be_bytes([query[0], query[1]]);
                let reply = self.forward(query, qid, transport).await?;
                if let Some(addrs) = answer_addresses(&reply, qid) {
                    let open: Vec<(Ipv4Addr, u32)> = addrs
                        .into_iter()
                        .map(|(ip, ttl)| (ip, ttl.clamp(MIN_OPEN_SECS, MAX_OPEN_SECS)))
                        .collect();
                    // Opened before the answer leaves: the sandbox connects right after reading it.
                    if !open.is_empty() {
                        // nft is a process to run: not on the async workers.
                        let net = self.net.clone();
                        let opened = tokio::task::spawn_blocking({
                            let id = id.clone();
                            move || net.open_resolved(&id, &open)
                        })
                        .await
                        .unwrap_or_else(|e| Err(RuntimeError::Nft(format!("nft task: {e}"))));
                        if let Err(e) = opened {
                            tracing::warn!(sandbox = %id, error = %e, "dns filter: cannot open resolved addresses");
                            return refusal(query).map(servfail);
                        }
                    }
                }
                Some(reply)
            }
        }
    }

    async fn forward(&self, query: &[u8], qid: u16, transport: Transport) -> Option<Vec<u8>> {
        for upstream in &self.upstreams {
            let got = tokio::time::timeout(UPSTREAM_TIMEOUT, async {
                match transport {
                    Transport::Udp => ask_udp(*upstream, query, qid).await,
                    Transport::Tcp => ask_tcp(*upstream, query).await,
                }
            })
            .await;
            match got {
                Ok(Ok(reply)) => return Some(reply),
                Ok(Err(e)) => tracing::debug!(%upstream, error = %e, "dns filter: upstream failed"),
                Err(_) => tracing::debug!(%upstream, "dns filter: upstream timed out"),
            }
        }
        // Every upstream failed: SERVFAIL, so the client stops waiting.
        refusal(query).map(servfail)
    }
}

/// Turns a reply built by [`refusal`] into a SERVFAIL.
fn servfail(mut reply: Vec<u8>) -> Vec<u8> {
    if reply.len() > 3 {
        reply[3] = (reply[3] & 0xf0) | RCODE::ServerFailure as u8;
    }
    reply
}

async fn ask_udp(upstream: SocketAddr, query: &[u8], qid: u16) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = if upstream.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = socket.recv(&mut buf).await?;
        // A connected socket only hears from the upstream; still, check it answers this query.
        if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == qid {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn ask_tcp(upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(upstream).await?;
    write_framed(&mut stream, query).await?;
    read_framed(&mut stream).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use simple_dns::{Name, Question, ResourceRecord, CLASS, QCLASS, QTYPE, TYPE};

    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut p = Packet::new_query(id);
        p.set_flags(PacketFlag::RECURSION_DESIRED);
        p.questions.push(Question::new(
            Name::new_unchecked(name),
            QTYPE::TYPE(TYPE::A),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        p.build_bytes_vec().unwrap()
    }

    #[test]
    fn refusal_keeps_id_and_question() {
        let q = query(0x1234, "evil.test");
        let bytes = refusal(&q).unwrap();
        let r = Packet::parse(&bytes).unwrap();
        assert_eq!(r.id(), 0x1234);
        assert!(r.has_flags(PacketFlag::RESPONSE));
        assert_eq!(r.rcode(), RCODE::Refused);
        assert_eq!(r.questions[0].qname.to_string(), "evil.test");
        let failed = servfail(refusal(&q).unwrap());
        assert_eq!(
            Packet::parse(&failed).unwrap().rcode(),
            RCODE::ServerFailure
        );
    }

    #[test]
    fn addresses_come_from_a_records_of_the_matching_reply() {
        let mut reply = Packet::new_reply(7);
        let name = Name::new_unchecked("api.example.com");
        reply.answers.push(ResourceRecord::new(
            name.clone(),
            CLASS::IN,
            30,
            RData::CNAME(simple_dns::rdata::CNAME(Name::new_unchecked(
                "cdn.example.net",
            ))),
        ));
        reply.answers.push(ResourceRecord::new(
            Name::new_unchecked("cdn.example.net"),
            CLASS::IN,
            300,
            RData::A(simple_dns::rdata::A {
                address: u32::from(Ipv4Addr::new(10, 254, 1, 2)),
            }),
        ));
        let bytes = reply.build_bytes_vec().unwrap();
        assert_eq!(
            answer_addresses(&bytes, 7).unwrap(),
            [(Ipv4Addr::new(10, 254, 1, 2), 300)]
        );
        assert_eq!(answer_addresses(&bytes, 8), None, "another query's reply");
        assert_eq!(answer_addresses(b"garbage", 7), None);
    }
}
