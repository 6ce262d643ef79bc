//! What the guard counts by: the client's address and wider network (masked to configurable
//! prefixes), the normalised account, the (address, account) pair, and keyed hashes standing in
//! for passwords and usernames. Nothing here ever holds a password.
//!
//! Key strings are shared by both stores and by the bans API, so they are a contract:
//! `ip:203.0.113.7`, `ip:2001:db8::/64`, `net:203.0.113.0/24`, `account:alice@example.org`,
//! `ip_account:203.0.113.7 alice@example.org` (a space separates the pair because usernames
//! with spaces are refused before the guard sees them, and the address part never holds one).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hmac::{KeyInit, Mac};
use sha2::Sha256;

use crate::config::{GuardConfig, WindowKey};

/// IPv4-mapped IPv6 addresses (`::ffff:192.0.2.7`) are the IPv4 client they carry, so that
/// a dual-stack listener cannot give one client two sets of counters.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// `ip` with every bit after `len` cleared.
pub fn mask(ip: IpAddr, len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let len = u32::from(len.min(32));
            let bits = u32::from(v4);
            let masked = if len == 0 {
                0
            } else {
                bits & (u32::MAX << (32 - len))
            };
            IpAddr::V4(Ipv4Addr::from(masked))
        }
        IpAddr::V6(v6) => {
            let len = u32::from(len.min(128));
            let bits = u128::from(v6);
            let masked = if len == 0 {
                0
            } else {
                bits & (u128::MAX << (128 - len))
            };
            IpAddr::V6(Ipv6Addr::from(masked))
        }
    }
}

/// `203.0.113.7` for a whole address, `203.0.113.0/24` or `2001:db8::/64` for a network.
fn network_text(ip: IpAddr, len: u8) -> String {
    let full = if ip.is_ipv4() { 32 } else { 128 };
    let masked = mask(ip, len);
    if len >= full {
        masked.to_string()
    } else {
        format!("{masked}/{len}")
    }
}

/// Usernames differ in case and stray spaces between clients; the counters must not.
pub fn normalize_account(username: &str) -> String {
    username.trim().to_lowercase()
}

/// The prefix lengths that turn an address into a client and a network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub ipv4: u8,
    pub ipv6: u8,
    pub net4: u8,
    pub net6: u8,
}

impl Shape {
    pub fn from_config(c: &GuardConfig) -> Self {
        Self {
            ipv4: c.ipv4_prefix,
            ipv6: c.ipv6_prefix,
            net4: c.net4_prefix,
            net6: c.net6_prefix,
        }
    }
}

/// One login attempt's keys, each already in its key-string form (without the kind prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// `203.0.113.7` or `2001:db8::/64`.
    pub ip: String,
    /// `203.0.113.0/24` or `2001:db8::/48`.
    pub net: String,
    /// Normalised username.
    pub account: String,
}

impl Subject {
    pub fn new(ip: IpAddr, username: &str, shape: Shape) -> Self {
        let ip = canonical_ip(ip);
        let (client, net) = match ip {
            IpAddr::V4(_) => (shape.ipv4, shape.net4),
            IpAddr::V6(_) => (shape.ipv6, shape.net6),
        };
        Self {
            ip: network_text(ip, client),
            net: network_text(ip, net),
            account: normalize_account(username),
        }
    }

    /// `203.0.113.7 alice@example.org`.
    pub fn pair(&self) -> String {
        format!("{} {}", self.ip, self.account)
    }

    /// The entity a window of `kind` counts, as `<kind>:<entity>`: also the ban key.
    pub fn key(&self, kind: WindowKey) -> String {
        match kind {
            WindowKey::Ip => format!("ip:{}", self.ip),
            WindowKey::Net => format!("net:{}", self.net),
            WindowKey::Account => format!("account:{}", self.account),
            WindowKey::IpAccount => format!("ip_account:{}", self.pair()),
        }
    }
}

/// Splits a ban key into its kind and entity (`ip:203.0.113.7` → (`Ip`, `203.0.113.7`)).
pub fn parse_key(key: &str) -> Option<(WindowKey, &str)> {
    let (kind, rest) = key.split_once(':')?;
    let kind = match kind {
        "ip" => WindowKey::Ip,
        "net" => WindowKey::Net,
        "account" => WindowKey::Account,
        "ip_account" => WindowKey::IpAccount,
        _ => return None,
    };
    (!rest.is_empty()).then_some((kind, rest))
}

/// The account a ban key is about, if any (`account:` and `ip_account:` keys).
pub fn key_account(key: &str) -> Option<&str> {
    match parse_key(key)? {
        (WindowKey::Account, a) => Some(a),
        (WindowKey::IpAccount, pair) => pair.split_once(' ').map(|(_, a)| a),
        _ => None,
    }
}

/// A network in CIDR notation (a bare address is a whole-address network).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    /// # Errors
    /// A message saying what is wrong with `text`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (addr, len) = match text.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not an address or CIDR network"))?;
        let addr = canonical_ip(addr);
        let full = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => full,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|&l| l <= full)
                .ok_or_else(|| format!("{text:?}: prefix length must be 0 to {full}"))?,
        };
        Ok(Self {
            addr: mask(addr, len),
            len,
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.len) == self.addr
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// The allow-list: never counted, denied or banned.
#[derive(Debug, Clone, Default)]
pub struct AllowList(Vec<Cidr>);

impl AllowList {
    /// # Errors
    /// The first entry that does not parse, with its index.
    pub fn parse(entries: &[String]) -> Result<Self, (usize, String)> {
        entries
            .iter()
            .enumerate()
            .map(|(i, e)| Cidr::parse(e).map_err(|m| (i, m)))
            .collect::<Result<_, _>>()
            .map(Self)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }
}

/// Truncated HMAC-SHA256 tags: short, fixed-size stand-ins for passwords (per pair) and usernames
/// (per spray set), so that neither store nor a Redis dump ever holds either. Keyed, because an
/// unkeyed hash of a password is a dictionary attack away from the password.
#[derive(Clone)]
pub struct Tagger {
    mac: hmac::Hmac<Sha256>,
}

impl fmt::Debug for Tagger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Tagger(<key redacted>)")
    }
}

/// Bytes of HMAC output kept: 64 bits make an accidental collision between the few passwords
/// remembered per pair negligible, and keep the stores small.
pub const TAG_BYTES: usize = 8;

impl Tagger {
    pub fn new(key: &[u8]) -> Self {
        // HMAC accepts keys of any length (long ones are hashed first), so this cannot fail.
        let mac = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(key)
            .unwrap_or_else(|_| <hmac::Hmac<Sha256> as KeyInit>::new(&Default::default()));
        Self { mac }
    }

    fn tag(&self, domain: &[u8], parts: &[&[u8]]) -> String {
        let mut mac = self.mac.clone();
        mac.update(domain);
        for p in parts {
            // Length-prefixed, so that ("ab", "c") and ("a", "bc") differ.
            mac.update(&(p.len() as u64).to_be_bytes());
            mac.update(p);
        }
        let out = mac.finalize().into_bytes();
        out.iter()
            .take(TAG_BYTES)
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The tag of a wrong password for one (address, account) pair. The pair is mixed in so
    /// that the same password for two accounts gives two unrelated tags.
    pub fn password(&self, subject: &Subject, password: &[u8]) -> String {
        self.tag(
            b"portcullis-guard-password\0",
            &[subject.ip.as_bytes(), subject.account.as_bytes(), password],
        )
    }

    /// The tag of a normalised account, for distinct-username sets.
    pub fn account(&self, account: &str) -> String {
        self.tag(b"portcullis-guard-account\0", &[account.as_bytes()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn shape() -> Shape {
        Shape {
            ipv4: 32,
            ipv6: 64,
            net4: 24,
            net6: 48,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn subject_keys() {
        let s = Subject::new(ip("203.0.113.7"), " Alice@Example.ORG ", shape());
        assert_eq!(s.key(WindowKey::Ip), "ip:203.0.113.7");
        assert_eq!(s.key(WindowKey::Net), "net:203.0.113.0/24");
        assert_eq!(s.key(WindowKey::Account), "account:alice@example.org");
        assert_eq!(
            s.key(WindowKey::IpAccount),
            "ip_account:203.0.113.7 alice@example.org"
        );
        let v6 = Subject::new(ip("2001:db8:1:2:aaaa::1"), "bob", shape());
        assert_eq!(v6.ip, "2001:db8:1:2::/64");
        assert_eq!(v6.net, "2001:db8:1::/48");
        let mapped = Subject::new(ip("::ffff:203.0.113.7"), "x", shape());
        assert_eq!(mapped.ip, "203.0.113.7");
    }

    #[test]
    fn key_round_trip() {
        let s = Subject::new(ip("203.0.113.7"), "alice", shape());
        let k = s.key(WindowKey::IpAccount);
        assert_eq!(
            parse_key(&k),
            Some((WindowKey::IpAccount, "203.0.113.7 alice"))
        );
        assert_eq!(key_account(&k), Some("alice"));
        assert_eq!(key_account("account:bob"), Some("bob"));
        assert_eq!(key_account("ip:203.0.113.7"), None);
        assert_eq!(parse_key("bogus:x"), None);
        assert_eq!(parse_key("ip:"), None);
    }

    #[test]
    fn cidr_parsing_and_membership() {
        let c = Cidr::parse("192.0.2.77/24").unwrap();
        assert_eq!(c.to_string(), "192.0.2.0/24");
        assert!(c.contains(ip("192.0.2.1")));
        assert!(c.contains(ip("::ffff:192.0.2.1")));
        assert!(!c.contains(ip("192.0.3.1")));
        assert!(!c.contains(ip("::1")));
        let one = Cidr::parse("2001:db8::1").unwrap();
        assert!(one.contains(ip("2001:db8::1")));
        assert!(!one.contains(ip("2001:db8::2")));
        assert!(Cidr::parse("192.0.2.0/33").is_err());
        assert!(Cidr::parse("example.org").is_err());
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
    }

    #[test]
    fn tags_are_keyed_and_domain_separated() {
        let a = Tagger::new(b"key one");
        let b = Tagger::new(b"key two");
        let s = Subject::new(ip("203.0.113.7"), "alice", shape());
        let t = a.password(&s, b"hunter2");
        assert_eq!(t.len(), TAG_BYTES * 2);
        assert_eq!(t, a.password(&s, b"hunter2"));
        assert_ne!(t, b.password(&s, b"hunter2"));
        assert_ne!(t, a.password(&s, b"hunter3"));
        let other = Subject::new(ip("203.0.113.7"), "bob", shape());
        assert_ne!(t, a.password(&other, b"hunter2"));
        assert!(!t.contains("hunter2"));
        assert_ne!(a.account("alice"), a.account("bob"));
    }

    proptest! {
        #[test]
        fn addresses_in_one_v6_client_prefix_share_keys(hi in any::<u64>(), lo1 in any::<u64>(), lo2 in any::<u64>()) {
            let a = IpAddr::V6(Ipv6Addr::from((u128::from(hi) << 64) | u128::from(lo1)));
            let b = IpAddr::V6(Ipv6Addr::from((u128::from(hi) << 64) | u128::from(lo2)));
            let (sa, sb) = (Subject::new(a, "u", shape()), Subject::new(b, "u", shape()));
            prop_assert_eq!(&sa.ip, &sb.ip);
            prop_assert_eq!(&sa.net, &sb.net);
        }

        #[test]
        fn mask_is_idempotent_and_cidr_holds_its_members(bits in any::<u32>(), len in 0u8..=32) {
            let ip = IpAddr::V4(Ipv4Addr::from(bits));
            let m = mask(ip, len);
            prop_assert_eq!(mask(m, len), m);
            let c = Cidr::parse(&format!("{ip}/{len}")).unwrap();
            prop_assert!(c.contains(ip));
        }
    }
}
