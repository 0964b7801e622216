//! IPv4 address arithmetic for pools: parsing what the user typed, and which addresses of a
//! range may go into a pool. Pure: no I/O.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnet::Ipv4Net;

/// The most addresses one `ip-range`/`host-range` run may add: a /16.
pub const MAX_RANGE_LEN: u64 = 65_536;

/// The longest prefix a pool may have: a /30 still has two usable addresses.
pub const MAX_PREFIX_LEN: u8 = 30;

/// Why an address, network or range that was typed is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddrError {
    /// Not an IPv4 address with a prefix length (`A.B.C.D/N`).
    NotCidr(String),
    /// Not a bare IPv4 address.
    NotAddress(String),
    /// An IPv6 address where only IPv4 is supported.
    Ipv6(String),
    /// The two ends of a range carry different prefix lengths.
    MixedMasks(String, String),
    /// The two ends of a range lie in different networks.
    DifferentNetworks(String, String),
    /// The start of a range comes after its end.
    Reversed(String, String),
    /// The prefix is too long to hold usable addresses.
    TooSmall(String),
    /// The range holds more addresses than one run may add.
    TooLarge { len: u64 },
    /// The address is the network or broadcast address of its network.
    NotHost(Ipv4Addr, Ipv4Net),
}

impl fmt::Display for AddrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddrError::NotCidr(s) => {
                write!(
                    f,
                    "{s:?} is not an IPv4 address with a prefix length (A.B.C.D/N)"
                )
            }
            AddrError::NotAddress(s) => write!(f, "{s:?} is not an IPv4 address (A.B.C.D)"),
            AddrError::Ipv6(s) => write!(f, "{s:?} is IPv6; only IPv4 pools are supported"),
            AddrError::MixedMasks(a, b) => {
                write!(f, "{a:?} and {b:?} have different prefix lengths")
            }
            AddrError::DifferentNetworks(a, b) => {
                write!(f, "{a:?} and {b:?} are in different networks")
            }
            AddrError::Reversed(a, b) => write!(f, "range start {a:?} comes after its end {b:?}"),
            AddrError::TooSmall(s) => write!(
                f,
                "{s:?}: a prefix longer than /{MAX_PREFIX_LEN} leaves no usable addresses"
            ),
            AddrError::TooLarge { len } => write!(
                f,
                "the range holds {len} addresses; at most {MAX_RANGE_LEN} (a /16) per run"
            ),
            AddrError::NotHost(a, net) => {
                write!(f, "{a} is the network or broadcast address of {net}")
            }
        }
    }
}

impl std::error::Error for AddrError {}

/// Parses `A.B.C.D/N`, keeping the host bits (`192.0.2.100/24` stays `.100`).
pub fn parse_cidr(text: &str) -> Result<Ipv4Net, AddrError> {
    let text = text.trim();
    match Ipv4Net::from_str(text) {
        Ok(net) => Ok(net),
        Err(_) if ipnet::Ipv6Net::from_str(text).is_ok() => Err(AddrError::Ipv6(text.into())),
        Err(_) => Err(AddrError::NotCidr(text.into())),
    }
}

/// Parses a bare `A.B.C.D`.
pub fn parse_addr(text: &str) -> Result<Ipv4Addr, AddrError> {
    let text = text.trim();
    match Ipv4Addr::from_str(text) {
        Ok(addr) => Ok(addr),
        Err(_) if std::net::Ipv6Addr::from_str(text).is_ok() => Err(AddrError::Ipv6(text.into())),
        Err(_) => Err(AddrError::NotAddress(text.into())),
    }
}

/// True when `addr` is a usable host address of `net`: inside it, and neither its network
/// nor its broadcast address.
pub fn is_host_of(addr: Ipv4Addr, net: Ipv4Net) -> bool {
    net.contains(&addr) && addr != net.network() && addr != net.broadcast()
}

/// A validated, inclusive range of addresses inside one network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrRange {
    /// The network both ends belong to, host bits cleared.
    pub net: Ipv4Net,
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
}

impl AddrRange {
    /// Checks that `start` and `end` (as typed, `A/N`) describe one IPv4 range.
    pub fn parse(start: &str, end: &str) -> Result<AddrRange, AddrError> {
        let (first, last) = (parse_cidr(start)?, parse_cidr(end)?);
        if first.prefix_len() != last.prefix_len() {
            return Err(AddrError::MixedMasks(start.into(), end.into()));
        }
        if first.prefix_len() > MAX_PREFIX_LEN {
            return Err(AddrError::TooSmall(start.into()));
        }
        if first.trunc() != last.trunc() {
            return Err(AddrError::DifferentNetworks(start.into(), end.into()));
        }
        if first.addr() > last.addr() {
            return Err(AddrError::Reversed(start.into(), end.into()));
        }
        let range = AddrRange {
            net: first.trunc(),
            start: first.addr(),
            end: last.addr(),
        };
        if range.size() > MAX_RANGE_LEN {
            return Err(AddrError::TooLarge { len: range.size() });
        }
        Ok(range)
    }

    /// How many addresses the range spans, both ends included (never 0).
    pub fn size(&self) -> u64 {
        u64::from(u32::from(self.end)) - u64::from(u32::from(self.start)) + 1
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        self.start <= addr && addr <= self.end
    }

    /// Every address of the range, in numeric order.
    pub fn addrs(&self) -> impl Iterator<Item = Ipv4Addr> {
        (u32::from(self.start)..=u32::from(self.end)).map(Ipv4Addr::from)
    }

    /// The addresses that may be pooled: the range less the network and broadcast addresses
    /// and anything in `excluded`.
    pub fn poolable<'a>(&self, excluded: &'a [Ipv4Addr]) -> impl Iterator<Item = Ipv4Addr> + 'a {
        let net = self.net;
        self.addrs()
            .filter(move |a| is_host_of(*a, net) && !excluded.contains(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_a_range_in_one_network() {
        let r = AddrRange::parse("192.0.2.100/24", "192.0.2.200/24").unwrap();
        assert_eq!(r.net.to_string(), "192.0.2.0/24");
        assert_eq!(r.size(), 101);
        assert_eq!(r.addrs().next(), Some(a("192.0.2.100")));
        assert_eq!(r.addrs().last(), Some(a("192.0.2.200")));
    }

    #[test]
    fn a_single_address_range_is_allowed() {
        let r = AddrRange::parse("192.0.2.7/24", "192.0.2.7/24").unwrap();
        assert_eq!(r.addrs().collect::<Vec<_>>(), vec![a("192.0.2.7")]);
    }

    #[test]
    fn refuses_bad_ranges_naming_the_input() {
        let cases = [
            (
                "192.0.2.1",
                "192.0.2.9/24",
                AddrError::NotCidr("192.0.2.1".into()),
            ),
            (
                "192.0.2.300/24",
                "192.0.2.9/24",
                AddrError::NotCidr("192.0.2.300/24".into()),
            ),
            (
                "2001:db8::1/64",
                "192.0.2.9/24",
                AddrError::Ipv6("2001:db8::1/64".into()),
            ),
            (
                "192.0.2.1/24",
                "192.0.2.9/25",
                AddrError::MixedMasks("192.0.2.1/24".into(), "192.0.2.9/25".into()),
            ),
            (
                "192.0.2.1/24",
                "198.51.100.9/24",
                AddrError::DifferentNetworks("192.0.2.1/24".into(), "198.51.100.9/24".into()),
            ),
            (
                "192.0.2.9/24",
                "192.0.2.1/24",
                AddrError::Reversed("192.0.2.9/24".into(), "192.0.2.1/24".into()),
            ),
            (
                "192.0.2.1/31",
                "192.0.2.1/31",
                AddrError::TooSmall("192.0.2.1/31".into()),
            ),
            (
                "10.0.0.0/8",
                "10.2.0.0/8",
                AddrError::TooLarge { len: 131_073 },
            ),
        ];
        for (start, end, want) in cases {
            assert_eq!(
                AddrRange::parse(start, end),
                Err(want.clone()),
                "{start} {end}"
            );
            // One line, naming the input that was wrong (quoted) or the count.
            let message = want.to_string();
            assert!(!message.contains('\n'), "{message}");
            let quoted = format!("{start:?}");
            assert!(
                message.contains(&quoted) || message.contains("131073"),
                "{message:?} names neither {quoted} nor the count"
            );
        }
    }

    #[test]
    fn a_slash_16_is_the_largest_range() {
        let r = AddrRange::parse("198.18.0.0/16", "198.18.255.255/16").unwrap();
        assert_eq!(r.size(), 65_536);
        assert_eq!(r.poolable(&[]).count(), 65_534);
    }

    #[test]
    fn poolable_skips_network_broadcast_and_exclusions() {
        let r = AddrRange::parse("192.0.2.0/24", "192.0.2.255/24").unwrap();
        let excluded = [a("192.0.2.1")];
        let pooled: Vec<_> = r.poolable(&excluded).collect();
        assert_eq!(pooled.len(), 253);
        assert_eq!(pooled[0], a("192.0.2.2"));
        assert_eq!(pooled[252], a("192.0.2.254"));
    }

    #[test]
    fn bare_addresses_parse_and_refuse() {
        assert_eq!(parse_addr(" 192.0.2.5 "), Ok(a("192.0.2.5")));
        assert_eq!(
            parse_addr("192.0.2.5/24"),
            Err(AddrError::NotAddress("192.0.2.5/24".into()))
        );
        assert_eq!(parse_addr("::1"), Err(AddrError::Ipv6("::1".into())));
    }

    #[test]
    fn host_addresses_exclude_network_and_broadcast() {
        let net: Ipv4Net = "192.0.2.0/24".parse().unwrap();
        assert!(is_host_of(a("192.0.2.1"), net));
        assert!(!is_host_of(a("192.0.2.0"), net));
        assert!(!is_host_of(a("192.0.2.255"), net));
        assert!(!is_host_of(a("198.51.100.1"), net));
    }
}
