//! Which IP addresses kinsight may connect to on a customer's behalf.
//!
//! [`classify`] says why an address is not a public unicast destination (private network,
//! loopback, cloud metadata, ...); [`EgressPolicy`] adds the operator's allow-list on top.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

pub use ipnet::IpNet;

/// Why an address is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockReason {
    /// `0.0.0.0`, `::` (connecting there reaches the local host).
    Unspecified,
    /// `127.0.0.0/8`, `::1`.
    Loopback,
    /// `10/8`, `172.16/12`, `192.168/16`, `fc00::/7`, `fec0::/10`.
    Private,
    /// `169.254/16`, `fe80::/10`.
    LinkLocal,
    /// Instance metadata services (`169.254.169.254`, `fd00:ec2::254`, `100.100.100.200`, ...).
    CloudMetadata,
    /// Carrier-grade NAT, `100.64/10`.
    SharedAddressSpace,
    /// `224/4`, `ff00::/8`.
    Multicast,
    /// `255.255.255.255`.
    Broadcast,
    /// Documentation, benchmarking, future use, deprecated transition forms.
    Reserved,
}

impl BlockReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified address",
            Self::Loopback => "loopback",
            Self::Private => "private network",
            Self::LinkLocal => "link-local",
            Self::CloudMetadata => "cloud metadata endpoint",
            Self::SharedAddressSpace => "carrier-grade NAT range",
            Self::Multicast => "multicast",
            Self::Broadcast => "broadcast",
            Self::Reserved => "reserved range",
        }
    }
}

impl fmt::Display for BlockReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Instance metadata endpoints: AWS/GCP/Azure/OpenStack/Oracle, AWS ECS task metadata,
/// AWS over IPv6, Alibaba Cloud, Oracle's legacy one.
const METADATA_V4: [Ipv4Addr; 4] = [
    Ipv4Addr::new(169, 254, 169, 254),
    Ipv4Addr::new(169, 254, 170, 2),
    Ipv4Addr::new(100, 100, 100, 200),
    Ipv4Addr::new(192, 0, 0, 192),
];
const METADATA_V6: [Ipv6Addr; 1] = [Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254)];

/// Why `ip` is not a public unicast address, or `None` when it is one. IPv6 forms that
/// carry an IPv4 address (mapped `::ffff:a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`)
/// are judged by that IPv4 address.
pub fn classify(ip: IpAddr) -> Option<BlockReason> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    u32::from(ip) & mask == u32::from_be_bytes(net) & mask
}

/// IPv4 ranges in match order (the first match names the reason).
const V4_RANGES: &[([u8; 4], u32, BlockReason)] = {
    use BlockReason::*;
    &[
        ([0, 0, 0, 0], 32, Unspecified),
        ([0, 0, 0, 0], 8, Reserved), // "this network"
        ([10, 0, 0, 0], 8, Private),
        ([100, 64, 0, 0], 10, SharedAddressSpace),
        ([127, 0, 0, 0], 8, Loopback),
        ([169, 254, 0, 0], 16, LinkLocal),
        ([172, 16, 0, 0], 12, Private),
        ([192, 0, 0, 0], 24, Reserved),   // IETF protocol assignments
        ([192, 0, 2, 0], 24, Reserved),   // TEST-NET-1
        ([192, 88, 99, 0], 24, Reserved), // 6to4 relay anycast
        ([192, 168, 0, 0], 16, Private),
        ([198, 18, 0, 0], 15, Reserved),   // benchmarking
        ([198, 51, 100, 0], 24, Reserved), // TEST-NET-2
        ([203, 0, 113, 0], 24, Reserved),  // TEST-NET-3
        ([224, 0, 0, 0], 4, Multicast),
        ([255, 255, 255, 255], 32, Broadcast),
        ([240, 0, 0, 0], 4, Reserved),
    ]
};

fn classify_v4(ip: Ipv4Addr) -> Option<BlockReason> {
    if METADATA_V4.contains(&ip) {
        return Some(BlockReason::CloudMetadata);
    }
    V4_RANGES
        .iter()
        .find(|(net, prefix, _)| in_v4(ip, *net, *prefix))
        .map(|(_, _, reason)| *reason)
}

fn classify_v6(ip: Ipv6Addr) -> Option<BlockReason> {
    use BlockReason::*;
    if METADATA_V6.contains(&ip) {
        return Some(CloudMetadata);
    }
    let s = ip.segments();
    let embedded = |hi: u16, lo: u16| {
        let [a, b] = hi.to_be_bytes();
        let [c, d] = lo.to_be_bytes();
        Ipv4Addr::new(a, b, c, d)
    };
    if ip.is_unspecified() {
        return Some(Unspecified);
    }
    if ip.is_loopback() {
        return Some(Loopback);
    }
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    match s {
        // IPv4-compatible (deprecated, ::a.b.c.d) and IPv4-translated (::ffff:0:a.b.c.d).
        [0, 0, 0, 0, 0, 0, _, _] | [0, 0, 0, 0, 0xffff, 0, _, _] => return Some(Reserved),
        // NAT64: the gateway connects to the embedded IPv4 address.
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => return classify_v4(embedded(hi, lo)),
        // Local-use NAT64 prefix.
        [0x64, 0xff9b, 1, ..] => return Some(Private),
        // Discard-only.
        [0x100, 0, 0, 0, ..] => return Some(Reserved),
        // Teredo and documentation.
        [0x2001, 0, ..] | [0x2001, 0xdb8, ..] => return Some(Reserved),
        // 6to4: the relay connects to the embedded IPv4 address.
        [0x2002, hi, lo, ..] => return classify_v4(embedded(hi, lo)),
        _ => {}
    }
    let first = s[0];
    if first & 0xfff0 == 0x3ff0 {
        return Some(Reserved); // 3fff::/20, documentation
    }
    if first & 0xfe00 == 0xfc00 {
        return Some(Private); // fc00::/7, unique local
    }
    if first & 0xffc0 == 0xfe80 {
        return Some(LinkLocal);
    }
    if first & 0xffc0 == 0xfec0 {
        return Some(Private); // site-local (deprecated)
    }
    if first & 0xff00 == 0xff00 {
        return Some(Multicast);
    }
    None
}

/// Which otherwise refused destinations may be reached. The default allows none: only
/// public unicast addresses are reachable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    /// Ranges reachable although [`classify`] refuses them. A cloud metadata endpoint is
    /// reachable only through an entry naming exactly that address (`/32` or `/128`): a
    /// broad range such as `100.64.0.0/10` or `0.0.0.0/0` never opens it.
    pub allow: Vec<IpNet>,
}

impl EgressPolicy {
    /// Public addresses plus loopback (`127.0.0.0/8`, `::1`): the local testbed and `kinsight dev`.
    pub fn allow_loopback() -> Self {
        Self {
            allow: vec![
                IpNet::new_assert(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8),
                IpNet::new_assert(IpAddr::V6(Ipv6Addr::LOCALHOST), 128),
            ],
        }
    }

    /// Parses an allow-list such as `10.1.0.0/16, 192.168.5.7, fd12::/64` (see [`parse_cidrs`]).
    pub fn parse(text: &str) -> Result<Self, String> {
        parse_cidrs(text).map(|allow| Self { allow })
    }

    /// `Ok` when `ip` may be connected to, else why not.
    pub fn check(&self, ip: IpAddr) -> Result<(), BlockReason> {
        let Some(reason) = classify(ip) else {
            return Ok(());
        };
        // `::ffff:127.0.0.1` is allowed by `127.0.0.0/8`: the socket reaches the IPv4 address.
        let canonical = ip.to_canonical();
        let allowed = self.allow.iter().any(|net| {
            let exact = net.prefix_len() == net.max_prefix_len();
            (reason != BlockReason::CloudMetadata || exact)
                && (net.contains(&ip) || net.contains(&canonical))
        });
        if allowed { Ok(()) } else { Err(reason) }
    }
}

impl fmt::Display for EgressPolicy {
    /// The comma list [`EgressPolicy::parse`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, net) in self.allow.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{net}")?;
        }
        Ok(())
    }
}

impl FromStr for EgressPolicy {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

/// Parses a comma-separated list of CIDRs (`10.0.0.0/8`) or single addresses (`10.0.0.5`,
/// meaning `/32` or `/128`). Blank entries are ignored, so `""` is the empty list. Host bits
/// are cleared: `10.1.2.3/8` is `10.0.0.0/8`.
pub fn parse_cidrs(text: &str) -> Result<Vec<IpNet>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(|part| {
            let parsed = if part.contains('/') {
                part.parse::<IpNet>().ok().map(|net| net.trunc())
            } else {
                part.parse::<IpAddr>().ok().map(IpNet::from)
            };
            parsed.ok_or_else(|| {
                format!("invalid CIDR {part:?} (expected e.g. 10.0.0.0/8 or fd00::/8)")
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn reason(text: &str) -> Option<BlockReason> {
        classify(ip(text))
    }

    #[test]
    fn public_addresses_pass() {
        for a in [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.216.34",
            "9.255.255.255",
            "11.0.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "126.255.255.255",
            "128.0.0.0",
            "169.253.255.255",
            "169.255.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.167.255.255",
            "192.169.0.0",
            "223.255.255.255",
            "2606:4700:4700::1111",
            "2001:4860:4860::8888",
            "2a00:1450:4001::1",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert_eq!(reason(a), None, "{a}");
            assert_eq!(EgressPolicy::default().check(ip(a)), Ok(()), "{a}");
        }
    }

    #[test]
    fn private_loopback_link_local_and_friends_are_refused() {
        use BlockReason::*;
        let cases = [
            ("10.0.0.0", Private),
            ("10.0.0.5", Private),
            ("10.255.255.255", Private),
            ("172.16.0.1", Private),
            ("172.31.255.254", Private),
            ("192.168.0.1", Private),
            ("192.168.255.255", Private),
            ("fc00::1", Private),
            ("fd12:3456::1", Private),
            ("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Private),
            ("fec0::1", Private),
            ("127.0.0.1", Loopback),
            ("127.1.2.3", Loopback),
            ("127.255.255.255", Loopback),
            ("::1", Loopback),
            ("169.254.0.1", LinkLocal),
            ("169.254.255.255", LinkLocal),
            ("fe80::1", LinkLocal),
            ("febf::1", LinkLocal),
            ("169.254.169.254", CloudMetadata),
            ("169.254.170.2", CloudMetadata),
            ("100.100.100.200", CloudMetadata),
            ("fd00:ec2::254", CloudMetadata),
            ("0.0.0.0", Unspecified),
            ("::", Unspecified),
            ("0.1.2.3", Reserved),
            ("224.0.0.1", Multicast),
            ("239.255.255.250", Multicast),
            ("ff02::1", Multicast),
            ("ff05::1:3", Multicast),
            ("255.255.255.255", Broadcast),
            ("240.0.0.1", Reserved),
            ("100.64.0.1", SharedAddressSpace),
            ("100.127.255.255", SharedAddressSpace),
            ("192.0.2.1", Reserved),
            ("198.18.0.1", Reserved),
            ("198.51.100.7", Reserved),
            ("203.0.113.9", Reserved),
            ("2001:db8::1", Reserved),
            ("100::1", Reserved),
            ("3fff::1", Reserved),
        ];
        for (a, expected) in cases {
            assert_eq!(reason(a), Some(expected), "{a}");
            assert_eq!(EgressPolicy::default().check(ip(a)), Err(expected), "{a}");
        }
    }

    #[test]
    fn ipv4_inside_ipv6_is_judged_by_the_ipv4_address() {
        use BlockReason::*;
        for (a, expected) in [
            ("::ffff:10.0.0.5", Private),
            ("::ffff:127.0.0.1", Loopback),
            ("::ffff:169.254.169.254", CloudMetadata),
            ("::ffff:100.100.100.200", CloudMetadata),
            ("::ffff:192.168.1.1", Private),
            ("::ffff:0.0.0.0", Unspecified),
            ("::ffff:100.64.0.1", SharedAddressSpace),
            ("64:ff9b::a00:1", Private),
            ("64:ff9b::7f00:1", Loopback),
            ("64:ff9b::a9fe:a9fe", CloudMetadata),
            ("2002:a00:1::", Private),
            ("2002:7f00:1::1", Loopback),
            ("64:ff9b:1::1", Private),
            ("::127.0.0.1", Reserved),
            ("::10.0.0.1", Reserved),
            ("::ffff:0:10.0.0.1", Reserved),
        ] {
            assert_eq!(reason(a), Some(expected), "{a}");
        }
    }

    #[test]
    fn allow_list_opens_ranges() {
        let policy = EgressPolicy::parse("10.1.0.0/16, 192.168.5.7,fd12::/64").unwrap();
        assert_eq!(policy.check(ip("10.1.2.3")), Ok(()));
        assert_eq!(policy.check(ip("::ffff:10.1.2.3")), Ok(()));
        assert_eq!(policy.check(ip("10.2.0.1")), Err(BlockReason::Private));
        assert_eq!(policy.check(ip("192.168.5.7")), Ok(()));
        assert_eq!(policy.check(ip("192.168.5.8")), Err(BlockReason::Private));
        assert_eq!(policy.check(ip("fd12::9")), Ok(()));
        assert_eq!(policy.check(ip("fd13::9")), Err(BlockReason::Private));
        assert_eq!(policy.check(ip("127.0.0.1")), Err(BlockReason::Loopback));
        // Public addresses need no entry.
        assert_eq!(policy.check(ip("8.8.8.8")), Ok(()));
    }

    #[test]
    fn loopback_policy() {
        let policy = EgressPolicy::allow_loopback();
        for a in ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"] {
            assert_eq!(policy.check(ip(a)), Ok(()), "{a}");
        }
        for a in [
            "10.0.0.1",
            "0.0.0.0",
            "::",
            "169.254.169.254",
            "192.168.1.1",
            "fe80::1",
        ] {
            assert!(policy.check(ip(a)).is_err(), "{a}");
        }
        assert_eq!(policy.to_string(), "127.0.0.0/8,::1/128");
        assert_eq!(EgressPolicy::parse(&policy.to_string()).unwrap(), policy);
    }

    #[test]
    fn metadata_needs_an_exact_entry() {
        for wide in [
            "0.0.0.0/0",
            "169.254.0.0/16",
            "100.64.0.0/10",
            "::/0",
            "fd00::/8",
        ] {
            let policy = EgressPolicy::parse(wide).unwrap();
            for a in [
                "169.254.169.254",
                "100.100.100.200",
                "fd00:ec2::254",
                "::ffff:169.254.169.254",
            ] {
                assert_eq!(
                    policy.check(ip(a)),
                    Err(BlockReason::CloudMetadata),
                    "{wide} {a}"
                );
            }
        }
        // The wide range still opens the rest of itself.
        assert_eq!(
            EgressPolicy::parse("169.254.0.0/16")
                .unwrap()
                .check(ip("169.254.1.1")),
            Ok(())
        );
        let exact = EgressPolicy::parse("169.254.169.254/32,fd00:ec2::254").unwrap();
        assert_eq!(exact.check(ip("169.254.169.254")), Ok(()));
        assert_eq!(exact.check(ip("fd00:ec2::254")), Ok(()));
        assert_eq!(
            exact.check(ip("100.100.100.200")),
            Err(BlockReason::CloudMetadata)
        );
    }

    #[test]
    fn parse_cidrs_accepts_lists_and_rejects_garbage() {
        assert_eq!(parse_cidrs("").unwrap(), vec![]);
        assert_eq!(parse_cidrs(" , ").unwrap(), vec![]);
        let nets = parse_cidrs("10.1.2.3/8,::1, 192.168.0.0/16 ").unwrap();
        let shown: Vec<String> = nets.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["10.0.0.0/8", "::1/128", "192.168.0.0/16"]);
        for bad in [
            "10.0.0.0/33",
            "10.0.0/8",
            "example.com",
            "10.0.0.1/",
            "/8",
            "::1/129",
            "1.2.3.4/-1",
        ] {
            let err = parse_cidrs(bad).unwrap_err();
            assert!(err.contains("invalid CIDR"), "{bad}: {err}");
        }
        assert!("127.0.0.0/8".parse::<EgressPolicy>().is_ok());
    }
}
