//! DNSBL/RBL checks at connect time (RFC 5782): several lists, each with a weight; a client
//! whose summed weight reaches the threshold is closed without a greeting. Lookups run in
//! parallel under one deadline and fail open (a slow or broken resolver must not lock everybody
//! out); results are cached per address.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use serde::Deserialize;

use crate::metrics::{DnsblLabels, Metrics};

/// `[dnsbl]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsblConfig {
    /// The resolver to ask (a local caching resolver: public resolvers are refused by most lists).
    pub resolver: SocketAddr,
    /// One deadline over all lists; on expiry the connection proceeds (fail open).
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Summed weight at which a client is refused.
    #[serde(default = "default_threshold")]
    pub threshold: u32,
    /// How long a result is reused for the same address.
    #[serde(default = "default_cache_ttl", with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// Most addresses cached.
    #[serde(default = "default_cache_max")]
    pub cache_max: usize,
    #[serde(rename = "list")]
    pub lists: Vec<DnsblList>,
}

/// `[[dnsbl.list]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsblList {
    /// The list's zone, e.g. `zen.spamhaus.org`.
    pub zone: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Answers that count as listed; empty: any address in 127.0.0.0/8 except 127.255.255.0/24
    /// (the range lists use to report errors such as "query refused").
    #[serde(default)]
    pub answers: Vec<std::net::Ipv4Addr>,
}

fn default_timeout() -> Duration {
    Duration::from_millis(500)
}
fn default_threshold() -> u32 {
    1
}
fn default_cache_ttl() -> Duration {
    Duration::from_secs(300)
}
fn default_cache_max() -> usize {
    100_000
}
fn default_weight() -> u32 {
    1
}

impl DnsblConfig {
    /// Checks what serde cannot.
    ///
    /// # Errors
    /// A message naming the key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.lists.is_empty() {
            return Err(("dnsbl.list".into(), "at least one list is required".into()));
        }
        if self.threshold == 0 {
            return Err(("dnsbl.threshold".into(), "must be at least 1".into()));
        }
        for (i, l) in self.lists.iter().enumerate() {
            let zone = l.zone.trim_end_matches('.');
            let ok = !zone.is_empty()
                && zone.len() <= 200
                && zone.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                });
            if !ok {
                return Err((format!("dnsbl.list[{i}].zone"), "not a DNS name".into()));
            }
        }
        Ok(())
    }
}

/// The name to look up for `ip` in `zone`: reversed octets for IPv4, reversed nibbles for IPv6.
pub fn query_name(ip: IpAddr, zone: &str) -> String {
    let zone = zone.trim_end_matches('.');
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.{zone}.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut name = String::with_capacity(64 + zone.len());
            for byte in v6.octets().iter().rev() {
                for nibble in [byte & 0x0f, byte >> 4] {
                    name.push(char::from_digit(u32::from(nibble), 16).unwrap_or('0'));
                    name.push('.');
                }
            }
            name.push_str(zone);
            name.push('.');
            name
        }
    }
}

/// Whether an answer means "listed" for `list`.
pub fn counts(list: &DnsblList, answer: std::net::Ipv4Addr) -> bool {
    if list.answers.is_empty() {
        let o = answer.octets();
        o[0] == 127 && !(o[1] == 255 && o[2] == 255)
    } else {
        list.answers.contains(&answer)
    }
}

/// The outcome for one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub score: u32,
    /// Zones that listed the address.
    pub zones: Vec<String>,
}

/// The checker: resolver, lists and cache.
pub struct Dnsbl {
    config: DnsblConfig,
    resolver: TokioResolver,
    cache: Mutex<HashMap<IpAddr, (Instant, Listing)>>,
}

impl Dnsbl {
    /// # Errors
    /// If the resolver cannot be built.
    pub fn new(config: DnsblConfig) -> Result<Self, String> {
        let mut server = NameServerConfig::udp_and_tcp(config.resolver.ip());
        for c in &mut server.connections {
            c.port = config.resolver.port();
        }
        let mut builder = TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(vec![server]),
            TokioRuntimeProvider::default(),
        );
        let opts = builder.options_mut();
        opts.timeout = config.timeout;
        opts.attempts = 1;
        opts.cache_size = 0;
        let resolver = builder.build().map_err(|e| e.to_string())?;
        Ok(Self {
            config,
            resolver,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The listing for `ip` (cached), or `None` when it stays under the threshold.
    pub async fn check(&self, ip: IpAddr, metrics: &Metrics) -> Option<Listing> {
        let now = Instant::now();
        let cached = self.cache.lock().ok().and_then(|c| {
            c.get(&ip)
                .filter(|(at, _)| now.duration_since(*at) < self.config.cache_ttl)
                .map(|(_, l)| l.clone())
        });
        let listing = match cached {
            Some(l) => l,
            None => {
                let l = self.lookup(ip, metrics).await;
                if let Ok(mut c) = self.cache.lock() {
                    if c.len() >= self.config.cache_max {
                        c.retain(|_, (at, _)| now.duration_since(*at) < self.config.cache_ttl);
                        if c.len() >= self.config.cache_max {
                            c.clear();
                        }
                    }
                    c.insert(ip, (now, l.clone()));
                }
                l
            }
        };
        (listing.score >= self.config.threshold).then_some(listing)
    }

    async fn lookup(&self, ip: IpAddr, metrics: &Metrics) -> Listing {
        let queries = self.config.lists.iter().map(|list| async move {
            let name = query_name(ip, &list.zone);
            let result =
                tokio::time::timeout(self.config.timeout, self.resolver.ipv4_lookup(name)).await;
            let (listed, label) = match result {
                Ok(Ok(answers)) => {
                    let hit = answers.answers().iter().any(|r| match &r.data {
                        hickory_resolver::proto::rr::RData::A(a) => counts(list, a.0),
                        _ => false,
                    });
                    (hit, if hit { "listed" } else { "clean" })
                }
                Ok(Err(e)) if e.is_nx_domain() || e.is_no_records_found() => (false, "clean"),
                Ok(Err(_)) | Err(_) => (false, "error"),
            };
            metrics
                .dnsbl
                .get_or_create(&DnsblLabels {
                    list: list.zone.clone(),
                    result: label,
                })
                .inc();
            listed.then(|| (list.zone.clone(), list.weight))
        });
        let hits = futures_util::future::join_all(queries).await;
        let mut listing = Listing {
            score: 0,
            zones: Vec::new(),
        };
        for (zone, weight) in hits.into_iter().flatten() {
            listing.score = listing.score.saturating_add(weight);
            listing.zones.push(zone);
        }
        listing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reversed_names() {
        assert_eq!(
            query_name("192.0.2.99".parse().unwrap(), "bl.example."),
            "99.2.0.192.bl.example."
        );
        assert_eq!(
            query_name("2001:db8::1".parse().unwrap(), "bl.example"),
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.example."
        );
    }

    #[test]
    fn answers_that_count() {
        let any = DnsblList {
            zone: "z".into(),
            weight: 1,
            answers: vec![],
        };
        assert!(counts(&any, "127.0.0.2".parse().unwrap()));
        assert!(!counts(&any, "127.255.255.254".parse().unwrap()));
        assert!(!counts(&any, "10.0.0.2".parse().unwrap()));
        let only = DnsblList {
            answers: vec!["127.0.0.4".parse().unwrap()],
            ..any
        };
        assert!(!counts(&only, "127.0.0.2".parse().unwrap()));
        assert!(counts(&only, "127.0.0.4".parse().unwrap()));
    }

    #[test]
    fn validation_names_keys() {
        let mut c = DnsblConfig {
            resolver: "127.0.0.1:53".parse().unwrap(),
            timeout: default_timeout(),
            threshold: 1,
            cache_ttl: default_cache_ttl(),
            cache_max: 10,
            lists: vec![DnsblList {
                zone: "bl.example".into(),
                weight: 1,
                answers: vec![],
            }],
        };
        assert!(c.validate().is_ok());
        c.lists[0].zone = "bad zone".into();
        assert_eq!(c.validate().unwrap_err().0, "dnsbl.list[0].zone");
        c.lists.clear();
        assert_eq!(c.validate().unwrap_err().0, "dnsbl.list");
    }
}
