//! DNSBL at connect time against a real DNS server (dnsmasq on loopback serving a test zone):
//! a listed client is closed without a greeting, weights add up to the threshold, error answers
//! do not count, and a resolver that does not answer fails open.

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::dnsmasq::Dnsmasq;
use common::dovecot::Dovecot;
use common::proxy::{Proxy, ProxyOptions, Raw};

fn proxy_with(dovecot: &Dovecot, dnsbl: &str) -> Proxy {
    let mut opts = ProxyOptions::file_users(dovecot.imap_port(), dovecot.master_secret());
    opts.extra = dnsbl.to_owned();
    Proxy::start(opts)
}

#[test]
fn listed_clients_are_closed_without_greeting_and_weights_add_up() {
    // 127.0.0.2 is on both lists (weight 1 + 1 = threshold 2); 127.0.0.3 only on one;
    // 127.0.0.4 gets the "query refused" error answer, which must not count.
    let dns = Dnsmasq::start(
        &["bl.test", "weak.test"],
        &[
            ("2.0.0.127.bl.test", "127.0.0.2"),
            ("2.0.0.127.weak.test", "127.0.0.2"),
            ("3.0.0.127.bl.test", "127.0.0.2"),
            ("4.0.0.127.bl.test", "127.255.255.254"),
            ("4.0.0.127.weak.test", "127.255.255.254"),
        ],
    );
    let dovecot = Dovecot::start();
    let proxy = proxy_with(
        &dovecot,
        &format!(
            "[dnsbl]\nresolver = \"{}\"\nthreshold = 2\ntimeout = \"1s\"\n\n[[dnsbl.list]]\nzone = \"bl.test\"\n\n[[dnsbl.list]]\nzone = \"weak.test\"\n",
            dns.addr()
        ),
    );
    let mut listed = Raw::plain_from(proxy.imap_plain, Ipv4Addr::new(127, 0, 0, 2));
    assert!(listed.closed(), "a listed client got a greeting");
    for clean in [[127, 0, 0, 1], [127, 0, 0, 3], [127, 0, 0, 4]] {
        let mut c = Raw::plain_from(proxy.imap_plain, Ipv4Addr::from(clean));
        let greeting = c.line().unwrap_or_default();
        assert!(greeting.starts_with("* OK"), "{clean:?}: {greeting:?}");
    }
    // Cached: the second refusal needs no lookup and is still refused.
    let mut again = Raw::plain_from(proxy.imap_plain, Ipv4Addr::new(127, 0, 0, 2));
    assert!(again.closed());
    let log = proxy.log();
    assert!(log.contains("client listed"), "{log}");
}

#[test]
fn a_silent_resolver_fails_open() {
    // A UDP socket that never answers.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dovecot = Dovecot::start();
    let proxy = proxy_with(
        &dovecot,
        &format!(
            "[dnsbl]\nresolver = \"{}\"\ntimeout = \"300ms\"\n\n[[dnsbl.list]]\nzone = \"bl.test\"\n",
            silent.local_addr().unwrap()
        ),
    );
    let started = Instant::now();
    let mut c = Raw::plain_from(proxy.imap_plain, Ipv4Addr::new(127, 0, 0, 2));
    assert!(c.line().unwrap_or_default().starts_with("* OK"));
    assert!(started.elapsed() < Duration::from_secs(3));
}
