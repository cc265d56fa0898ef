//! Which client address a decision may carry: one a trusted proxy told us, never one the client
//! chose.
//!
//! A decision's client address binds that address to the key in the kernel gate (L4 identity):
//! packets from it without a visible key header are then judged by that key's budget. So an
//! address a client can choose is an attack: a drained key that names a victim's address gets
//! the victim's keyless traffic dropped. `X-Forwarded-For`, `X-Real-IP` and `/v1/check`'s
//! `client_ip` are all set by whoever sends the request, and nginx's `auth_request` passes the
//! client's own headers to `/v1/auth` unchanged unless the config overwrites them.
//!
//! The rule ([`TrustedProxies`], from `[server] trusted_proxies`, default none):
//!
//! - The address is taken only when the HTTP peer (the TCP connection's source) is a trusted
//!   proxy. Otherwise it is unknown: the peer itself is not the client either (the peer of
//!   `/v1/auth` is the proxy), so nothing is bound.
//! - `X-Forwarded-For` (all its header lines, in order): walking from the right, skipping hops
//!   that are trusted proxies, the first other hop. Every hop to its left was written by
//!   someone we do not trust. A hop that is not an address, or a list of trusted proxies only,
//!   makes the address unknown.
//! - `X-Real-IP`: its address, unless it is a trusted proxy (then it says nothing about the
//!   client; with a CDN in front it is the CDN's address).
//! - When both name a client they must agree, else the address is unknown: a proxy that sets
//!   only one of them passes the other from the client unchanged.
//! - A trusted proxy's own address is never a client address (binding it would judge all its
//!   keyless traffic by one key).
//!
//! IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`, what a dual-stack socket reports for an IPv4
//! peer) are taken as the IPv4 address they carry, as the kernel sees the packets.
use axum::http::HeaderMap;
use serde::Deserialize;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// A `[server] trusted_proxies` entry that is not a network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// Not `address` or `address/prefix`.
    #[error(
        "{0:?} is not an IP network: write an address (\"10.0.0.1\") or a CIDR (\"10.0.0.0/8\")"
    )]
    Syntax(String),
    /// The prefix length is too long for the address family.
    #[error("{text:?}: the prefix length must be 1-{max}")]
    Prefix {
        /// The entry.
        text: String,
        /// 32 or 128.
        max: u8,
    },
    /// `/0` trusts every peer: any client could then choose the address bound to its key.
    #[error(
        "{0:?} trusts every peer, so any client could choose the address bound to its key: \
         list the networks of your proxies"
    )]
    Everyone(String),
    /// Bits set past the prefix (`10.0.0.1/8`): probably a typo for the address or the network.
    #[error("{text:?} has bits set past the prefix: write {network}")]
    HostBits {
        /// The entry.
        text: String,
        /// The network it probably means.
        network: String,
    },
}

/// An IP network: an address and a prefix length (`10.0.0.0/8`, `2001:db8::/32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in this network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = mask_v4(self.prefix);
                u32::from(ip) & mask == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = mask_v6(self.prefix);
                u128::from(ip) & mask == u128::from(net)
            }
            _ => false,
        }
    }
}

fn mask_v4(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask_v6(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Self, CidrError> {
        let syntax = || CidrError::Syntax(text.to_owned());
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| syntax())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            // Digits only: `u8::from_str` would take "+8".
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| CidrError::Prefix {
                    text: text.to_owned(),
                    max,
                })?,
            Some(_) => return Err(syntax()),
        };
        if prefix == 0 {
            return Err(CidrError::Everyone(text.to_owned()));
        }
        // An IPv4-mapped network (`::ffff:10.0.0.0/104`) is the IPv4 network it maps: peers
        // and hops are compared in their canonical form.
        let (addr, prefix) = match addr {
            IpAddr::V6(v6) if prefix >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => (IpAddr::V4(v4), prefix - 96),
                None => (addr, prefix),
            },
            _ => (addr, prefix),
        };
        if prefix == 0 {
            return Err(CidrError::Everyone(text.to_owned()));
        }
        let network = match addr {
            IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask_v4(prefix))),
            IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask_v6(prefix))),
        };
        if network != addr {
            return Err(CidrError::HostBits {
                text: text.to_owned(),
                network: format!("{network}/{prefix}"),
            });
        }
        Ok(Self { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What became of the client address a request offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAddr {
    /// The request named no client address.
    NotOffered,
    /// A trusted proxy named this client address.
    Trusted(IpAddr),
    /// Named by a peer that is not a trusted proxy: ignored.
    UntrustedPeer,
    /// From a trusted proxy, but no client can be told: a malformed hop, only proxies, or
    /// headers that disagree. Ignored.
    Unusable,
}

impl ClientAddr {
    /// The address a decision may carry.
    pub fn ip(self) -> Option<IpAddr> {
        match self {
            Self::Trusted(ip) => Some(ip),
            _ => None,
        }
    }

    /// The `outcome` label of `enforcer_client_addresses_total`; `None` when nothing was offered.
    pub fn outcome(self) -> Option<&'static str> {
        match self {
            Self::NotOffered => None,
            Self::Trusted(_) => Some("used"),
            Self::UntrustedPeer => Some("untrusted_peer"),
            Self::Unusable => Some("unusable"),
        }
    }
}

/// `[server] trusted_proxies`: the peers whose word on the client's address is taken.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<Cidr>);

impl TrustedProxies {
    /// These networks.
    pub fn new(networks: Vec<Cidr>) -> Self {
        Self(networks)
    }

    /// Whether `ip` is a trusted proxy.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(ip))
    }

    fn trusts(&self, peer: Option<SocketAddr>) -> bool {
        peer.is_some_and(|p| self.contains(p.ip()))
    }

    /// The client address of a `/v1/auth` request from `peer` (`None`: unknown peer, which is
    /// never trusted), from its `X-Forwarded-For` and `X-Real-IP` headers.
    pub fn from_headers(&self, peer: Option<SocketAddr>, headers: &HeaderMap) -> ClientAddr {
        let forwarded: Vec<_> = headers.get_all("x-forwarded-for").iter().collect();
        let real: Vec<_> = headers.get_all("x-real-ip").iter().collect();
        if forwarded.is_empty() && real.is_empty() {
            return ClientAddr::NotOffered;
        }
        if !self.trusts(peer) {
            return ClientAddr::UntrustedPeer;
        }
        // X-Real-IP is one address, set (replaced) by the proxy: several lines, or one that is
        // not an address, came from the client and say nothing.
        let real = match real.as_slice() {
            [one] => one
                .to_str()
                .ok()
                .and_then(parse_hop)
                .filter(|ip| !self.contains(*ip)),
            _ => None,
        };
        if forwarded.is_empty() {
            return real.map_or(ClientAddr::Unusable, ClientAddr::Trusted);
        }
        let Some(hop) = self.rightmost_untrusted(&forwarded) else {
            return ClientAddr::Unusable;
        };
        match real {
            Some(real) if real != hop => ClientAddr::Unusable,
            _ => ClientAddr::Trusted(hop),
        }
    }

    /// A `/v1/check` body's `client_ip` from `peer`: the gateway's word, taken only from a
    /// trusted proxy, and never a trusted proxy's own address.
    pub fn from_body(&self, peer: Option<SocketAddr>, client_ip: Option<IpAddr>) -> ClientAddr {
        let Some(ip) = client_ip else {
            return ClientAddr::NotOffered;
        };
        let ip = ip.to_canonical();
        if !self.trusts(peer) {
            ClientAddr::UntrustedPeer
        } else if self.contains(ip) {
            ClientAddr::Unusable
        } else {
            ClientAddr::Trusted(ip)
        }
    }

    /// The right-most `X-Forwarded-For` hop that is not a trusted proxy; `None` when a hop up
    /// to it is not an address, or every hop is a trusted proxy.
    fn rightmost_untrusted(&self, lines: &[&axum::http::HeaderValue]) -> Option<IpAddr> {
        // Several lines are one list, in order (RFC 9110 §5.3): walk them from the last.
        for line in lines.iter().rev() {
            let line = line.to_str().ok()?;
            for hop in line.rsplit(',') {
                let ip = parse_hop(hop)?;
                if !self.contains(ip) {
                    return Some(ip);
                }
            }
        }
        None
    }
}

/// One hop: an address, optionally with a port (`10.0.0.1:5000`, `[2001:db8::1]:443`) or in
/// brackets, as some proxies write them; canonical (IPv4-mapped IPv6 as IPv4).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim_matches([' ', '\t']);
    let ip = hop
        .parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            hop.strip_prefix('[')?
                .strip_suffix(']')?
                .parse::<Ipv6Addr>()
                .ok()
                .map(IpAddr::V6)
        })?;
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn trusted(list: &[&str]) -> TrustedProxies {
        TrustedProxies::new(list.iter().map(|s| cidr(s)).collect())
    }

    fn peer(ip: &str) -> Option<SocketAddr> {
        Some(SocketAddr::new(ip.parse().expect("ip"), 40000))
    }

    fn headers(list: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in list {
            h.append(
                axum::http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_bytes(value).expect("value"),
            );
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn networks_parse_with_clear_errors() {
        assert_eq!(cidr("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(cidr("127.0.0.1").to_string(), "127.0.0.1/32");
        assert_eq!(cidr("2001:db8::/32").to_string(), "2001:db8::/32");
        assert_eq!(cidr("::1").to_string(), "::1/128");
        assert_eq!(cidr("::ffff:10.1.0.0/112").to_string(), "10.1.0.0/16");
        for bad in [
            "",
            "10.0.0",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/8/8",
            "eth0",
            " 10.0.0.1",
        ] {
            assert!(
                matches!(bad.parse::<Cidr>(), Err(CidrError::Syntax(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            "10.0.0.0/33".parse::<Cidr>(),
            Err(CidrError::Prefix { max: 32, .. })
        ));
        assert!(matches!(
            "::/129".parse::<Cidr>(),
            Err(CidrError::Prefix { max: 128, .. })
        ));
        assert!(matches!(
            "10.0.0.0/999".parse::<Cidr>(),
            Err(CidrError::Prefix { .. })
        ));
        for everyone in ["0.0.0.0/0", "::/0", "::ffff:0.0.0.0/96"] {
            assert!(
                matches!(everyone.parse::<Cidr>(), Err(CidrError::Everyone(_))),
                "{everyone}"
            );
        }
        let e = "10.1.2.3/8".parse::<Cidr>().expect_err("host bits");
        assert_eq!(
            e.to_string(),
            "\"10.1.2.3/8\" has bits set past the prefix: write 10.0.0.0/8"
        );
    }

    #[test]
    fn networks_contain_their_addresses_in_either_spelling() {
        let n = cidr("10.1.0.0/16");
        assert!(n.contains(ip("10.1.255.7")));
        assert!(n.contains(ip("::ffff:10.1.0.1")), "IPv4-mapped");
        assert!(!n.contains(ip("10.2.0.1")));
        assert!(!n.contains(ip("::1")));
        let v6 = cidr("2001:db8::/32");
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(cidr("127.0.0.1").contains(ip("127.0.0.1")));
        assert!(!cidr("127.0.0.1").contains(ip("127.0.0.2")));
    }

    #[test]
    fn an_untrusted_peer_never_names_the_client() {
        let none = TrustedProxies::default();
        let forged = headers(&[
            ("x-forwarded-for", b"10.77.0.2"),
            ("x-real-ip", b"10.77.0.2"),
        ]);
        assert_eq!(
            none.from_headers(peer("127.0.0.1"), &forged),
            ClientAddr::UntrustedPeer
        );
        let some = trusted(&["10.0.0.0/8"]);
        assert_eq!(
            some.from_headers(peer("192.168.1.1"), &forged),
            ClientAddr::UntrustedPeer
        );
        assert_eq!(some.from_headers(None, &forged), ClientAddr::UntrustedPeer);
        assert_eq!(
            some.from_body(peer("192.168.1.1"), Some(ip("10.77.0.2"))),
            ClientAddr::UntrustedPeer
        );
        assert_eq!(
            some.from_headers(peer("192.168.1.1"), &HeaderMap::new()),
            ClientAddr::NotOffered
        );
        assert_eq!(
            some.from_body(peer("10.0.0.1"), None),
            ClientAddr::NotOffered
        );
    }

    #[test]
    fn a_trusted_peer_names_the_rightmost_untrusted_hop() {
        let t = trusted(&["127.0.0.1/32", "10.0.0.0/8"]);
        let p = peer("127.0.0.1");
        let xff = |v: &[u8]| t.from_headers(p, &headers(&[("x-forwarded-for", v)]));
        assert_eq!(xff(b"203.0.113.9"), ClientAddr::Trusted(ip("203.0.113.9")));
        // A forged left part is skipped: the proxy appended the real peer.
        assert_eq!(
            xff(b"198.51.100.1, 203.0.113.9"),
            ClientAddr::Trusted(ip("203.0.113.9"))
        );
        // Trusted hops (a CDN, a load balancer) are skipped from the right.
        assert_eq!(
            xff(b"198.51.100.1, 203.0.113.9, 10.1.1.1,10.2.2.2"),
            ClientAddr::Trusted(ip("203.0.113.9"))
        );
        // Ports and brackets as some proxies write them; IPv4-mapped as IPv4.
        assert_eq!(
            xff(b"203.0.113.9:5555"),
            ClientAddr::Trusted(ip("203.0.113.9"))
        );
        assert_eq!(
            xff(b"[2001:db8::7]:443"),
            ClientAddr::Trusted(ip("2001:db8::7"))
        );
        assert_eq!(
            xff(b"[2001:db8::7]"),
            ClientAddr::Trusted(ip("2001:db8::7"))
        );
        assert_eq!(
            xff(b"::ffff:203.0.113.9"),
            ClientAddr::Trusted(ip("203.0.113.9"))
        );
        // Several header lines are one list: the last line's last hop is the nearest.
        assert_eq!(
            t.from_headers(
                p,
                &headers(&[
                    ("x-forwarded-for", b"203.0.113.9"),
                    ("x-forwarded-for", b"198.51.100.1, 10.0.0.3"),
                ])
            ),
            ClientAddr::Trusted(ip("198.51.100.1"))
        );
        // The peer may be IPv4-mapped (a dual-stack listener).
        assert_eq!(
            t.from_headers(
                peer("::ffff:127.0.0.1"),
                &headers(&[("x-forwarded-for", b"203.0.113.9")])
            ),
            ClientAddr::Trusted(ip("203.0.113.9"))
        );
    }

    #[test]
    fn malformed_or_proxy_only_headers_name_no_client() {
        let t = trusted(&["127.0.0.1/32", "10.0.0.0/8"]);
        let p = peer("127.0.0.1");
        let xff = |v: &[u8]| t.from_headers(p, &headers(&[("x-forwarded-for", v)]));
        // A malformed hop before the first untrusted one: who wrote what is unknown.
        for bad in [
            &b"nope"[..],
            b"203.0.113.9, nope",
            b"203.0.113.9,,",
            b"",
            b"unknown",
            b"300.1.1.1",
            b"203.0.113.9 10.0.0.1",
            b"\xff\xfe",
        ] {
            assert_eq!(
                xff(bad),
                ClientAddr::Unusable,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // A malformed hop left of the client does not matter: it is never read.
        assert_eq!(
            xff(b"nope, 203.0.113.9"),
            ClientAddr::Trusted(ip("203.0.113.9"))
        );
        // Only proxies: the client is not named.
        assert_eq!(xff(b"10.0.0.1, 127.0.0.1"), ClientAddr::Unusable);
        let real = |v: &[u8]| t.from_headers(p, &headers(&[("x-real-ip", v)]));
        assert_eq!(real(b"203.0.113.9"), ClientAddr::Trusted(ip("203.0.113.9")));
        assert_eq!(real(b"10.0.0.1"), ClientAddr::Unusable, "a proxy's address");
        assert_eq!(real(b"nope"), ClientAddr::Unusable);
        assert_eq!(
            t.from_headers(
                p,
                &headers(&[("x-real-ip", b"203.0.113.9"), ("x-real-ip", b"203.0.113.9")])
            ),
            ClientAddr::Unusable,
            "several X-Real-IP lines"
        );
        // /v1/check: a proxy's own address is never a client.
        assert_eq!(t.from_body(p, Some(ip("10.9.9.9"))), ClientAddr::Unusable);
        assert_eq!(
            t.from_body(p, Some(ip("::ffff:203.0.113.9"))),
            ClientAddr::Trusted(ip("203.0.113.9"))
        );
    }

    #[test]
    fn both_headers_must_agree_when_both_name_a_client() {
        let t = trusted(&["127.0.0.1/32", "10.0.0.0/8"]);
        let p = peer("127.0.0.1");
        let both = |xff: &[u8], real: &[u8]| {
            t.from_headers(
                p,
                &headers(&[("x-forwarded-for", xff), ("x-real-ip", real)]),
            )
        };
        // The nginx recipe: both set from $remote_addr.
        assert_eq!(
            both(b"203.0.113.9", b"203.0.113.9"),
            ClientAddr::Trusted(ip("203.0.113.9"))
        );
        // A proxy that sets only X-Real-IP passes the client's X-Forwarded-For, and the other
        // way round: they disagree, nothing is bound.
        assert_eq!(both(b"192.0.2.66", b"203.0.113.9"), ClientAddr::Unusable);
        assert_eq!(both(b"203.0.113.9", b"192.0.2.66"), ClientAddr::Unusable);
        // An X-Forwarded-For that names no client is not rescued by X-Real-IP.
        assert_eq!(both(b"10.0.0.1", b"203.0.113.9"), ClientAddr::Unusable);
        assert_eq!(both(b"nope", b"203.0.113.9"), ClientAddr::Unusable);
        // X-Real-IP with a proxy's address (a CDN's) or garbage says nothing about the client.
        assert_eq!(
            both(b"203.0.113.9, 10.0.0.1", b"10.0.0.1"),
            ClientAddr::Trusted(ip("203.0.113.9"))
        );
        assert_eq!(
            both(b"203.0.113.9", b"nope"),
            ClientAddr::Trusted(ip("203.0.113.9"))
        );
    }
}
