//! Egress rules of one sandbox: which IPv4 destinations it may reach outside its subnet.
//!
//! E2B's semantics: `allow_out` entries are exceptions to `deny_out` (an allowed destination is
//! reachable even when a deny entry covers it), `0.0.0.0/0` in `deny_out` blocks everything not
//! allowed, and `allow_internet: false` behaves like `deny_out: ["0.0.0.0/0"]`. `allow_out` also
//! takes domain names (`example.com`, or `*.example.com` for its subdomains): the Linux runtime
//! then steers the sandbox's DNS through its own resolver (`linux/dns.rs`), which answers only
//! for allowed names and opens the addresses it resolved for them, for their TTL. `deny_out`
//! takes addresses and blocks only.
//!
//! The Linux runtime enforces the rules with one nftables chain per sandbox, jumped to from the
//! forward hook through a verdict map keyed by the sandbox's address ([`EgressRules::nft_rules`]).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 block `addr/prefix`, normalised so that host bits are zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not an IPv4 address, CIDR block or domain name")]
    NotAnAddress(String),
    #[error(
        "{0:?}: deny_out takes IPv4 addresses and CIDR blocks; domain names belong in allow_out"
    )]
    DomainInDenyList(String),
    #[error("{0:?}: prefix length must be between 0 and 32")]
    BadPrefix(String),
    #[error(
        "allow_out domain names ({0}) need the single-host DNS filter: sandboxes in Pods take \
         IPv4 addresses and CIDR blocks only"
    )]
    DomainsInPod(String),
}

impl Cidr {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Cidr> {
        (prefix <= 32).then(|| Cidr {
            addr: Ipv4Addr::from(u32::from(addr) & Self::mask(prefix)),
            prefix,
        })
    }

    fn mask(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix as u32)
        }
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `other` lies entirely inside `self`.
    pub fn contains(&self, other: &Cidr) -> bool {
        other.prefix >= self.prefix
            && (u32::from(other.addr) & Self::mask(self.prefix)) == u32::from(self.addr)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, CidrError> {
        let t = s.trim();
        let (addr, prefix) = match t.split_once('/') {
            Some((a, p)) => (
                a,
                p.parse::<u8>()
                    .map_err(|_| CidrError::BadPrefix(s.to_string()))?,
            ),
            None => (t, 32),
        };
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| CidrError::NotAnAddress(s.to_string()))?;
        Cidr::new(addr, prefix).ok_or_else(|| CidrError::BadPrefix(s.to_string()))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A domain name in `allow_out`: `example.com` matches that name only, `*.example.com` any name
/// below it (not `example.com` itself). Stored lower-case, without a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DomainPattern(String);

impl DomainPattern {
    pub fn parse(s: &str) -> Option<DomainPattern> {
        let t = s.trim().trim_end_matches('.').to_ascii_lowercase();
        let name = t.strip_prefix("*.").unwrap_or(&t);
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        let labels: Vec<&str> = name.split('.').collect();
        // The last label not all digits: that would be a malformed address, not a name.
        let ok = t.len() <= 253
            && labels.iter().all(|l| label_ok(l))
            && !labels
                .last()
                .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
        ok.then_some(DomainPattern(t))
    }

    /// Whether the DNS name `name` (any case, with or without the trailing dot) matches.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        match self.0.strip_prefix("*.") {
            Some(parent) => name
                .strip_suffix(parent)
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            None => name == self.0,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for DomainPattern {
    type Error = CidrError;
    fn try_from(s: String) -> Result<Self, CidrError> {
        DomainPattern::parse(&s).ok_or(CidrError::NotAnAddress(s))
    }
}

impl From<DomainPattern> for String {
    fn from(d: DomainPattern) -> String {
        d.0
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The allow and deny lists of a sandbox. Empty lists mean no rule of that kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressRules {
    #[serde(default)]
    pub allow_out: Vec<Cidr>,
    #[serde(default)]
    pub deny_out: Vec<Cidr>,
    /// Domain names of `allow_out`, enforced through the runtime's DNS filter.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_domains: Vec<DomainPattern>,
}

impl EgressRules {
    /// Parses string lists as the E2B API carries them.
    pub fn parse<S: AsRef<str>>(allow: &[S], deny: &[S]) -> Result<EgressRules, CidrError> {
        let mut rules = EgressRules::default();
        for entry in allow {
            let entry = entry.as_ref();
            match entry.parse::<Cidr>() {
                Ok(c) => rules.allow_out.push(c),
                Err(CidrError::NotAnAddress(_)) => {
                    let d = DomainPattern::parse(entry)
                        .ok_or_else(|| CidrError::NotAnAddress(entry.to_string()))?;
                    if !rules.allow_domains.contains(&d) {
                        rules.allow_domains.push(d);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        for entry in deny {
            let entry = entry.as_ref();
            match entry.parse::<Cidr>() {
                Ok(c) => rules.deny_out.push(c),
                Err(CidrError::NotAnAddress(_)) if DomainPattern::parse(entry).is_some() => {
                    return Err(CidrError::DomainInDenyList(entry.to_string()))
                }
                Err(e) => return Err(e),
            }
        }
        Ok(rules)
    }

    pub fn is_empty(&self) -> bool {
        self.allow_out.is_empty() && self.deny_out.is_empty() && self.allow_domains.is_empty()
    }

    /// Refuses domain names where no DNS filter enforces them (a sandbox in a Pod: cluster mode).
    pub fn refuse_domains(&self) -> Result<(), CidrError> {
        if self.allow_domains.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = self.allow_domains.iter().map(|d| d.as_str()).collect();
        Err(CidrError::DomainsInPod(names.join(", ")))
    }

    /// Whether a DNS name is one the sandbox may resolve and reach.
    pub fn allows_name(&self, name: &str) -> bool {
        self.allow_domains.iter().any(|d| d.matches(name))
    }

    /// `allow_out` as the API shows it: blocks, then domain names.
    pub fn allow_out_strings(&self) -> Vec<String> {
        let blocks = self.allow_out.iter().map(Cidr::to_string);
        blocks
            .chain(self.allow_domains.iter().map(DomainPattern::to_string))
            .collect()
    }

    /// The rules of the sandbox's own chain: allowed blocks accept (ending the forward hook of
    /// Warren's table for the packet), denied blocks drop, anything else returns to the base
    /// chain (where the no-internet set still applies). Empty when there is nothing to enforce.
    /// With domain names, addresses in `resolved_set` (the ones the DNS filter resolved for
    /// allowed names) are accepted first.
    pub fn nft_rules(&self, resolved_set: &str) -> Vec<String> {
        let mut rules = Vec::new();
        if !self.allow_domains.is_empty() {
            rules.push(format!("ip daddr @{resolved_set} accept"));
        }
        for (list, verdict) in [(&self.allow_out, "accept"), (&self.deny_out, "drop")] {
            let blocks = disjoint(list);
            if blocks.is_empty() {
                continue;
            }
            let set: Vec<String> = blocks.iter().map(Cidr::to_string).collect();
            rules.push(format!("ip daddr {{ {} }} {verdict}", set.join(", ")));
        }
        rules
    }
}

/// Removes blocks covered by another block of the list (and duplicates): CIDR blocks either nest
/// or are disjoint, so what remains is disjoint, which nftables requires of an interval set.
fn disjoint(list: &[Cidr]) -> Vec<Cidr> {
    let mut sorted: Vec<Cidr> = list.to_vec();
    // Widest first, so that a block is kept before anything it contains is considered.
    sorted.sort_by_key(|c| (c.prefix, c.addr));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses_and_blocks() {
        assert_eq!("1.2.3.4".parse::<Cidr>().unwrap().to_string(), "1.2.3.4/32");
        assert_eq!(
            "10.1.2.3/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            "0.0.0.0/0".parse::<Cidr>().unwrap().to_string(),
            "0.0.0.0/0"
        );
        assert!(matches!(
            "example.com".parse::<Cidr>(),
            Err(CidrError::NotAnAddress(_))
        ));
        assert!(matches!(
            "1.2.3.4/33".parse::<Cidr>(),
            Err(CidrError::BadPrefix(_))
        ));
        assert!("1.2.3.4/x".parse::<Cidr>().is_err());
        assert!("::1".parse::<Cidr>().is_err());
        assert!("".parse::<Cidr>().is_err());
    }

    #[test]
    fn containment() {
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        let ten: Cidr = "10.0.0.0/8".parse().unwrap();
        let host: Cidr = "10.9.9.9".parse().unwrap();
        assert!(all.contains(&ten) && ten.contains(&host) && !host.contains(&ten));
        assert!(!ten.contains(&"11.0.0.1".parse().unwrap()));
    }

    #[test]
    fn nft_rules_merge_overlaps_and_order_allow_first() {
        let r = EgressRules::parse(
            &["10.0.0.5", "10.0.0.0/24", "10.0.0.5/32"],
            &["0.0.0.0/0", "8.8.8.8"],
        )
        .unwrap();
        assert_eq!(
            r.nft_rules("dns"),
            vec![
                "ip daddr { 10.0.0.0/24 } accept".to_string(),
                "ip daddr { 0.0.0.0/0 } drop".to_string()
            ]
        );
        assert!(EgressRules::default().nft_rules("dns").is_empty());
        assert!(EgressRules::default().is_empty());
    }

    #[test]
    fn serde_round_trip_as_strings() {
        let r = EgressRules::parse(&["1.1.1.1"], &["10.0.0.0/8"]).unwrap();
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"allow_out":["1.1.1.1/32"],"deny_out":["10.0.0.0/8"]}"#
        );
        assert_eq!(serde_json::from_str::<EgressRules>(&json).unwrap(), r);
        // Records written before egress rules existed have no field at all.
        assert_eq!(
            serde_json::from_str::<EgressRules>("{}").unwrap(),
            EgressRules::default()
        );
    }

    #[test]
    fn domain_patterns() {
        let exact = DomainPattern::parse("Example.COM.").unwrap();
        assert_eq!(exact.as_str(), "example.com");
        assert!(exact.matches("example.com") && exact.matches("EXAMPLE.com."));
        assert!(!exact.matches("api.example.com") && !exact.matches("badexample.com"));
        let wild = DomainPattern::parse("*.example.com").unwrap();
        assert!(wild.matches("api.example.com") && wild.matches("a.b.example.com."));
        assert!(!wild.matches("example.com") && !wild.matches("badexample.com"));
        assert!(!wild.matches(".example.com"));
        // Broad wildcards are the user's call, as on E2B.
        assert!(DomainPattern::parse("*.com.")
            .unwrap()
            .matches("example.com"));
        for bad in [
            "", "a..b", "-a.com", "a-.com", "1.2.3", "a b.com", "*", "*.", "x.*.com",
        ] {
            assert!(DomainPattern::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn domains_go_to_the_dns_filter_and_only_in_allow_out() {
        let r = EgressRules::parse(
            &["api.example.com", "1.1.1.1", "*.pypi.org"],
            &["0.0.0.0/0"],
        )
        .unwrap();
        assert_eq!(
            r.allow_out_strings(),
            ["1.1.1.1/32", "api.example.com", "*.pypi.org"]
        );
        assert!(r.allows_name("api.example.com") && r.allows_name("files.pypi.org"));
        assert!(!r.allows_name("example.com") && !r.allows_name("evil.test"));
        assert_eq!(
            r.nft_rules("dns_x"),
            [
                "ip daddr @dns_x accept",
                "ip daddr { 1.1.1.1/32 } accept",
                "ip daddr { 0.0.0.0/0 } drop"
            ]
        );
        assert!(matches!(
            EgressRules::parse(&[] as &[&str], &["evil.test"]),
            Err(CidrError::DomainInDenyList(_))
        ));
        assert!(matches!(
            EgressRules::parse(&["not a name"], &[] as &[&str]),
            Err(CidrError::NotAnAddress(_))
        ));
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<EgressRules>(&json).unwrap(), r);
        assert!(serde_json::from_str::<EgressRules>(r#"{"allow_domains":["a b"]}"#).is_err());
    }
}
