//! Egress rules of one sandbox: which IPv4 destinations it may reach outside its subnet.
//!
//! E2B's semantics: `allow_out` entries are exceptions to `deny_out` (an allowed destination is
//! reachable even when a deny entry covers it), `0.0.0.0/0` in `deny_out` blocks everything not
//! allowed, and `allow_internet: false` behaves like `deny_out: ["0.0.0.0/0"]`. Only addresses
//! and CIDR blocks are accepted: domain names would need a DNS-aware filter, which Warren does
//! not have.
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
    #[error(
        "{0:?} is not an IPv4 address or CIDR block (domain names in network rules are not supported by Warren)"
    )]
    NotAnAddress(String),
    #[error("{0:?}: prefix length must be between 0 and 32")]
    BadPrefix(String),
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

/// The allow and deny lists of a sandbox. Empty lists mean no rule of that kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressRules {
    #[serde(default)]
    pub allow_out: Vec<Cidr>,
    #[serde(default)]
    pub deny_out: Vec<Cidr>,
}

impl EgressRules {
    /// Parses string lists as the E2B API carries them.
    pub fn parse<S: AsRef<str>>(allow: &[S], deny: &[S]) -> Result<EgressRules, CidrError> {
        let p = |v: &[S]| {
            v.iter()
                .map(|s| s.as_ref().parse())
                .collect::<Result<Vec<Cidr>, _>>()
        };
        Ok(EgressRules {
            allow_out: p(allow)?,
            deny_out: p(deny)?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.allow_out.is_empty() && self.deny_out.is_empty()
    }

    /// The rules of the sandbox's own chain: allowed blocks accept (ending the forward hook of
    /// Warren's table for the packet), denied blocks drop, anything else returns to the base
    /// chain (where the no-internet set still applies). Empty when there is nothing to enforce.
    pub fn nft_rules(&self) -> Vec<String> {
        let mut rules = Vec::new();
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
            r.nft_rules(),
            vec![
                "ip daddr { 10.0.0.0/24 } accept".to_string(),
                "ip daddr { 0.0.0.0/0 } drop".to_string()
            ]
        );
        assert!(EgressRules::default().nft_rules().is_empty());
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
}
