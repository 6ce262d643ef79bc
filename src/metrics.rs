//! Prometheus metrics: what an operator watches to see the proxy and the guard at work. One
//! registry per process, no global state; `/metrics` on the admin listener encodes it.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtoLabels {
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub protocol: &'static str,
    /// `global_cap`, `per_ip_concurrent`, `per_ip_rate`, `dnsbl`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthLabels {
    pub protocol: &'static str,
    pub mechanism: &'static str,
    /// `accept`, `reject`, `refused` (before asking), `denied` (guard), `tempfail`,
    /// `backend_failed`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `allow`, `deny`.
    pub decision: &'static str,
    /// Why (`ban`, `allowlisted`, `ok`, ...).
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub protocol: &'static str,
    /// `to_backend`, `to_client`.
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsblLabels {
    pub list: String,
    /// `listed`, `clean`, `error`.
    pub result: &'static str,
}

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    pub connections: Family<ProtoLabels, Counter>,
    pub connections_active: Family<ProtoLabels, Gauge>,
    pub connections_refused: Family<RefusedLabels, Counter>,
    pub tls_failures: Family<ProtoLabels, Counter>,
    pub auth: Family<AuthLabels, Counter>,
    pub auth_latency: Family<ProtoLabels, Histogram>,
    pub guard_decisions: Family<DecisionLabels, Counter>,
    pub guard_bans_started: Counter,
    pub guard_bans_active: Gauge,
    pub guard_store_up: Gauge,
    pub guard_latency: Histogram,
    pub sessions_spliced: Family<ProtoLabels, Gauge>,
    pub bytes: Family<BytesLabels, Counter>,
    pub dnsbl: Family<DnsblLabels, Counter>,
    pub reloads: Family<ReloadLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `ok`, `error`.
    pub result: &'static str,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~16 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 15,
    ))
}

fn fast_histogram() -> Histogram {
    // 10 µs .. ~160 ms: guard decisions.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.000_01, 2.0, 15,
    ))
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("portcullis");
        let connections = Family::<ProtoLabels, Counter>::default();
        registry.register(
            "connections",
            "Connections accepted, by protocol",
            connections.clone(),
        );
        let connections_active = Family::<ProtoLabels, Gauge>::default();
        registry.register(
            "connections_active",
            "Connections open now, by protocol",
            connections_active.clone(),
        );
        let connections_refused = Family::<RefusedLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections closed without a greeting, by reason",
            connections_refused.clone(),
        );
        let tls_failures = Family::<ProtoLabels, Counter>::default();
        registry.register(
            "tls_failures",
            "TLS handshakes that failed or timed out",
            tls_failures.clone(),
        );
        let auth = Family::<AuthLabels, Counter>::default();
        registry.register(
            "auth_attempts",
            "Login attempts by protocol, mechanism and result",
            auth.clone(),
        );
        let auth_latency =
            Family::<ProtoLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> _);
        registry.register(
            "auth_latency_seconds",
            "Time from a complete login command to the decision (before the failure delay)",
            auth_latency.clone(),
        );
        let guard_decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "guard_decisions",
            "Guard decisions before the authenticator",
            guard_decisions.clone(),
        );
        let guard_bans_started = Counter::default();
        registry.register(
            "guard_bans_started",
            "Bans started by this instance",
            guard_bans_started.clone(),
        );
        let guard_bans_active = Gauge::default();
        registry.register(
            "guard_bans_active",
            "Bans in force (as of the last scrape)",
            guard_bans_active.clone(),
        );
        let guard_store_up = Gauge::default();
        registry.register(
            "guard_store_up",
            "1 if the guard's store answers (Redis reachable), 0 if local limits are in use",
            guard_store_up.clone(),
        );
        let guard_latency = fast_histogram();
        registry.register(
            "guard_decision_seconds",
            "Time the guard takes to decide before a login",
            guard_latency.clone(),
        );
        let sessions_spliced = Family::<ProtoLabels, Gauge>::default();
        registry.register(
            "sessions_spliced",
            "Logged-in sessions being relayed now",
            sessions_spliced.clone(),
        );
        let bytes = Family::<BytesLabels, Counter>::default();
        registry.register("relayed_bytes", "Bytes relayed after login", bytes.clone());
        let dnsbl = Family::<DnsblLabels, Counter>::default();
        registry.register(
            "dnsbl_lookups",
            "DNSBL lookups by list and result",
            dnsbl.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register("reloads", "SIGHUP reloads by result", reloads.clone());
        Self {
            registry,
            connections,
            connections_active,
            connections_refused,
            tls_failures,
            auth,
            auth_latency,
            guard_decisions,
            guard_bans_started,
            guard_bans_active,
            guard_store_up,
            guard_latency,
            sessions_spliced,
            bytes,
            dnsbl,
            reloads,
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// Counts one login outcome.
    pub fn auth(&self, protocol: &'static str, mechanism: &'static str, result: &'static str) {
        self.auth
            .get_or_create(&AuthLabels {
                protocol,
                mechanism,
                result,
            })
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Holds a gauge up for as long as it lives (active connections, spliced sessions).
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_labelled_counters() {
        let m = Metrics::new();
        m.auth("imap", "plain", "accept");
        m.auth("imap", "plain", "accept");
        m.connections
            .get_or_create(&ProtoLabels { protocol: "pop3" })
            .inc();
        {
            let _g = GaugeGuard::new(
                &m.connections_active
                    .get_or_create(&ProtoLabels { protocol: "pop3" }),
            );
            assert!(m
                .encode()
                .contains("portcullis_connections_active{protocol=\"pop3\"} 1"));
        }
        let text = m.encode();
        assert!(text.contains(
            "portcullis_auth_attempts_total{protocol=\"imap\",mechanism=\"plain\",result=\"accept\"} 2"
        ));
        assert!(text.contains("portcullis_connections_total{protocol=\"pop3\"} 1"));
        assert!(text.contains("portcullis_connections_active{protocol=\"pop3\"} 0"));
        assert!(text.ends_with("# EOF\n"));
    }
}
