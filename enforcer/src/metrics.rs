//! Prometheus metrics of the daemon.
//!
//! Labels are low-cardinality by construction (seed pitfall 4): tiers and endpoint classes come
//! from the config, outcomes and modes are fixed sets. No key, key hash, path or client address
//! is ever a label.
use prometheus::proto::MetricType;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// All metrics, registered in one registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Families,
    /// `enforcer_decisions_total{outcome, tier, mode}`.
    pub decisions: IntCounterVec,
    /// `enforcer_debit_duration_seconds{backend}`: store round trip of a debit.
    pub debit_duration: HistogramVec,
    /// `enforcer_store_errors_total{kind}`: timeout, unavailable, rejected, protocol.
    pub store_errors: IntCounterVec,
    /// `enforcer_store_failure_decisions_total{policy}`: decisions made without the store.
    pub store_failure_decisions: IntCounterVec,
    /// `enforcer_store_breaker_state`: 0 closed, 1 open, 2 half-open (the worst breaker's).
    pub breaker_state: IntGauge,
    /// `enforcer_store_breakers_open`: breakers not closed (a cluster has one per slot group).
    pub breakers_open: IntGauge,
    /// `enforcer_local_decisions_total{outcome}`: fail-soft decisions by local buckets
    /// (allowed, denied, untracked: denied because `store.local_max_keys` keys are tracked).
    pub local_decisions: IntCounterVec,
    /// `enforcer_local_pending_tokens`: tokens spent locally, not yet debited back.
    pub local_pending_tokens: prometheus::Gauge,
    /// `enforcer_local_debited_back_tokens_total`: tokens debited back into shared buckets.
    pub local_debited_back: prometheus::Counter,
    /// `enforcer_local_nodes`: the node count local buckets divide budgets by.
    pub local_nodes: IntGauge,
    /// `enforcer_bad_requests_total{reason}`: requests refused as bad input.
    pub bad_requests: IntCounterVec,
    /// `enforcer_refunds_total{outcome}`.
    pub refunds: IntCounterVec,
    /// `enforcer_settles_total{outcome}`: `POST /v1/settle` by outcome (settled, replayed,
    /// conflict, unknown_request, already_refunded, not_settleable, unknown_key, unavailable).
    pub settles: IntCounterVec,
    /// `enforcer_admin_actions_total{action, result}`: admin API calls (status, show,
    /// set_tier, grant, block, unblock, shadow, reload) by result (ok, refused, error).
    pub admin_actions: IntCounterVec,
    /// `enforcer_alerts_total{result}`: low-balance alerts fired, and their webhook deliveries
    /// (sent, retried, failed after every attempt, dropped: queue full or shutdown).
    pub alerts: IntCounterVec,
    /// `enforcer_client_addresses_total{outcome}`: client addresses requests offered (used,
    /// untrusted_peer, unusable).
    pub client_addresses: IntCounterVec,
    /// `enforcer_idempotent_replays_total`.
    pub replays: IntCounter,
    /// `enforcer_shadow_candidate_decisions_total{outcome}`: the shadow candidate policy's
    /// would-be decisions (`allow`, `deny`; [`crate::shadow`]).
    pub shadow_candidate_decisions: IntCounterVec,
    /// `enforcer_kernel_attached`: 1 when the kernel gate is attached.
    pub kernel_attached: IntGauge,
    /// `enforcer_kernel_passed_total`: packets the kernel gate passed.
    pub kernel_passed: IntCounter,
    /// `enforcer_kernel_rejected_total{reason}`: l7, l4, blocked.
    pub kernel_rejected: IntCounterVec,
    /// `enforcer_kernel_ignored_total{reason}`: passed for parse failures or stale data.
    pub kernel_ignored: IntCounterVec,
    /// `enforcer_kernel_sync_lag_seconds`: from a decision to its snapshot in the kernel map.
    pub kernel_sync_lag: prometheus::Histogram,
    /// `enforcer_kernel_sync_dropped_total`: snapshots not sent because the sync queue was full.
    pub kernel_sync_dropped: IntCounter,
    /// `enforcer_kernel_tracked_keys`: keys with a snapshot in the kernel.
    pub kernel_tracked_keys: IntGauge,
    /// The audit ledger's metrics.
    pub ledger: LedgerMetrics,
    /// `enforcer_price{endpoint, method}`: tokens per unit now, per configured endpoint (the
    /// configured path pattern or `default`: bounded by the config, not by traffic).
    pub price: prometheus::GaugeVec,
    /// `enforcer_price_multiplier{endpoint, method}`: what the pricing engine multiplies the
    /// endpoint's `base_cost` by now (`enforcer_price` is the product).
    pub price_multiplier: prometheus::GaugeVec,
    /// `enforcer_telemetry_errors_total{source, kind}`: failed or nonsensical readings.
    pub telemetry_errors: IntCounterVec,
    /// `enforcer_pricing_seconds`: one engine round (telemetry reads and recompute).
    pub pricing_seconds: prometheus::Histogram,
    /// `enforcer_node_telemetry{signal}`: the node readings the engine uses (cpu and memory
    /// utilisation 0-1, load per CPU).
    pub node_telemetry: prometheus::GaugeVec,
    /// `enforcer_redis_busy_reply_threshold_seconds`: how long a script may block the store's
    /// Redis before others get BUSY (+Inf: unlimited; NaN: CONFIG refused or not read yet).
    pub redis_busy_reply_threshold: prometheus::Gauge,
    /// `enforcer_redis_lua_execution_seconds`: mean server-side time of one script call on the
    /// store's Redis over the last watch interval (`INFO commandstats`, every client).
    pub redis_lua_execution: prometheus::Gauge,
    /// `enforcer_store_records_evicted_total`: request records the embedded store dropped
    /// before their time for `store.memory_max_records` (a retry of one is charged again).
    pub store_records_evicted: IntCounter,
    /// The HTTP listener's metrics.
    pub http: HttpMetrics,
    /// `enforcer_rls_requests_total{code}`: Envoy rate-limit calls by overall answer
    /// (`ok`, `over_limit`).
    pub rls_requests: IntCounterVec,
    /// `enforcer_rls_descriptors_total{kind}`: Envoy descriptors by what was done with them
    /// (`keyed`: charged to a key; `keyless`: no key entry, not ours; `settle`: the settle
    /// marker, a stream-done settle; `negative_hits`: units given back, a settle).
    pub rls_descriptors: IntCounterVec,
    /// Config reloads and their metrics (`enforcer_config_*`).
    pub config: ConfigMetrics,
}

/// Metrics of config reloads ([`crate::reload`]).
#[derive(Clone, Debug)]
pub struct ConfigMetrics {
    /// `enforcer_config_reload_total{result}`: reloads (SIGHUP, `enforcer reload`, shadow
    /// switches) by result, `ok` or `error` (nothing changed).
    pub reloads: IntCounterVec,
    /// `enforcer_config_generation`: 1 for the config the daemon started with, +1 per applied
    /// change.
    pub generation: IntGauge,
}

impl ConfigMetrics {
    fn new(registry: &Families) -> Self {
        let reloads = counter_vec(
            registry,
            "enforcer_config_reload_total",
            "Config reloads (SIGHUP, enforcer reload, shadow switches) by result: ok, or error (the old config keeps serving)",
            &["result"],
        );
        for result in ["ok", "error"] {
            reloads.with_label_values(&[result]);
        }
        let generation = gauge(
            registry,
            "enforcer_config_generation",
            "The config now serving: 1 at start, +1 per applied reload or shadow switch",
        );
        generation.set(1);
        Self {
            reloads,
            generation,
        }
    }
}

/// Metrics of the HTTP listener (`enforcer_http_*`): connections, and the limits that bit.
#[derive(Clone, Debug)]
pub struct HttpMetrics {
    /// `enforcer_http_connections_open`: client connections being served now.
    pub open: IntGauge,
    /// `enforcer_http_connections_accepted_total`: connections accepted and served.
    pub accepted: IntCounter,
    /// `enforcer_http_connections_rejected_total{reason}`: connections closed at accept;
    /// `limit`: `server.max_connections` were open.
    pub rejected: IntCounterVec,
    /// `enforcer_http_connection_timeouts_total{kind}`: connections the daemon closed;
    /// `header`: a request header did not arrive whole within `server.header_read_timeout_ms`,
    /// `idle`: no request within `server.idle_timeout_ms`.
    pub timeouts: IntCounterVec,
}

impl HttpMetrics {
    fn new(registry: &Families) -> Self {
        let rejected = counter_vec(
            registry,
            "enforcer_http_connections_rejected_total",
            "Connections closed at accept, by reason (limit: server.max_connections were open)",
            &["reason"],
        );
        let timeouts = counter_vec(
            registry,
            "enforcer_http_connection_timeouts_total",
            "Connections closed by the daemon, by kind (header: incomplete request header, idle: no request)",
            &["kind"],
        );
        // Every series exists from the start: a dashboard sees 0, not nothing.
        rejected.with_label_values(&["limit"]);
        for kind in ["header", "idle"] {
            timeouts.with_label_values(&[kind]);
        }
        Self {
            open: gauge(
                registry,
                "enforcer_http_connections_open",
                "Client connections being served now",
            ),
            accepted: register(
                registry,
                IntCounter::new(
                    "enforcer_http_connections_accepted_total",
                    "Client connections accepted and served",
                )
                .expect("valid metric definition"),
            ),
            rejected,
            timeouts,
        }
    }
}

/// Metrics of the audit ledger's writer (`enforcer_ledger_*`).
#[derive(Clone, Debug)]
pub struct LedgerMetrics {
    /// `enforcer_ledger_rows_written_total`: rows committed to PostgreSQL (or, without a
    /// database, appended to the ledger file).
    pub written: IntCounter,
    /// `enforcer_ledger_batch_seconds`: time to write one batch.
    pub batch_seconds: prometheus::Histogram,
    /// `enforcer_ledger_queue_depth`: rows waiting in memory for the writer.
    pub queue_depth: IntGauge,
    /// `enforcer_ledger_spilled_total`: rows that reach PostgreSQL by replay of the spill file
    /// instead of straight from memory (PostgreSQL down, slow, or behind a backlog).
    pub spilled: IntCounter,
    /// `enforcer_ledger_replayed_total`: rows replayed from the spill file into PostgreSQL.
    pub replayed: IntCounter,
    /// `enforcer_ledger_dropped_total`: rows lost because the local file could not be written
    /// or (with `journal = false`) the appender's queue was full. Must stay 0.
    pub dropped: IntCounter,
    /// `enforcer_ledger_backlog_bytes`: bytes of the spill file not yet in PostgreSQL.
    pub backlog_bytes: IntGauge,
    /// `enforcer_ledger_quarantined_total`: rows PostgreSQL refused for their data (SQLSTATE
    /// class 22 or 23), moved to the quarantine file so that the rest land.
    pub quarantined: IntCounter,
    /// `enforcer_ledger_errors_total{op}`: failed writes, spills, replays, quarantine writes,
    /// maintenance.
    pub errors: IntCounterVec,
    /// `enforcer_tokens_charged_total{tier}`: tokens debited from main buckets, by the store
    /// (allowed decisions it settled) or by a debit-back of fail-soft spending; counted where
    /// the audit rows are made, so it is what the ledger records.
    pub tokens_charged: prometheus::CounterVec,
    /// `enforcer_tokens_refunded_total{tier}`: tokens credited back by refunds.
    pub tokens_refunded: prometheus::CounterVec,
    /// `enforcer_ledger_reservation_expiries_total`: `reservation_expiry` rows this daemon's
    /// expiry job inserted (rows another daemon inserted first are not counted).
    pub reservation_expiries: IntCounter,
    /// `enforcer_ledger_file_rotations_total`: times the embedded ledger file was rotated.
    pub file_rotations: IntCounter,
    /// `enforcer_ledger_file_bytes`: bytes in the live ledger (or spill) file.
    pub file_bytes: IntGauge,
}

impl LedgerMetrics {
    fn new(registry: &Families) -> Self {
        let counter = |name: &str, help: &str| {
            register(
                registry,
                IntCounter::new(name, help).expect("valid metric definition"),
            )
        };
        Self {
            written: counter(
                "enforcer_ledger_rows_written_total",
                "Audit rows committed to PostgreSQL (or to the ledger file without a database)",
            ),
            batch_seconds: register(
                registry,
                prometheus::Histogram::with_opts(
                    HistogramOpts::new(
                        "enforcer_ledger_batch_seconds",
                        "Time to write one batch of audit rows",
                    )
                    .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0]),
                )
                .expect("valid metric definition"),
            ),
            queue_depth: gauge(
                registry,
                "enforcer_ledger_queue_depth",
                "Audit rows waiting in memory for the writer",
            ),
            spilled: counter(
                "enforcer_ledger_spilled_total",
                "Audit rows that reach PostgreSQL by replay of the spill file (PostgreSQL down, slow or behind)",
            ),
            replayed: counter(
                "enforcer_ledger_replayed_total",
                "Audit rows replayed from the spill file into PostgreSQL",
            ),
            dropped: counter(
                "enforcer_ledger_dropped_total",
                "Audit rows lost: the local file failed or the append queue was full (must stay 0)",
            ),
            backlog_bytes: gauge(
                registry,
                "enforcer_ledger_backlog_bytes",
                "Bytes of the spill file not yet in PostgreSQL",
            ),
            quarantined: counter(
                "enforcer_ledger_quarantined_total",
                "Audit rows PostgreSQL refused for their data, moved to the quarantine file",
            ),
            errors: counter_vec(
                registry,
                "enforcer_ledger_errors_total",
                "Ledger failures by operation (write, spill, replay, quarantine, maintain, expire, rotate)",
                &["op"],
            ),
            tokens_charged: float_counter_vec(
                registry,
                "enforcer_tokens_charged_total",
                "Tokens debited from main buckets (allowed decisions the store settled, and \
                 debit-backs of fail-soft spending), by tier",
                &["tier"],
            ),
            tokens_refunded: float_counter_vec(
                registry,
                "enforcer_tokens_refunded_total",
                "Tokens credited back to main buckets by refunds, by tier",
                &["tier"],
            ),
            reservation_expiries: counter(
                "enforcer_ledger_reservation_expiries_total",
                "reservation_expiry rows the expiry job inserted (unsettled reservations)",
            ),
            file_rotations: counter(
                "enforcer_ledger_file_rotations_total",
                "Times the embedded ledger file was rotated (renamed away, then compressed)",
            ),
            file_bytes: gauge(
                registry,
                "enforcer_ledger_file_bytes",
                "Bytes in the live ledger file (the spill file with a database)",
            ),
        }
    }
}

/// The registry, and the name and type of every family registered in it. `Registry::gather`
/// leaves out a vector with no children yet (a label set never used), so what the daemon
/// exports is recorded here at registration: `Metrics::exported_names` lists it for the
/// dashboard and alert checks (`tests/tests/deploy.rs`).
#[derive(Debug, Clone, Default)]
struct Families {
    registry: Registry,
    registered: Arc<parking_lot::Mutex<BTreeMap<String, MetricType>>>,
}

/// Registers a metric and hands it back. The definitions are static, so a failure here is a
/// programming error that every test building the daemon would catch.
fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Families, metric: M) -> M {
    // A vector's `collect` names its family (and its type) even without children.
    let mut registered = registry.registered.lock();
    for family in metric.collect() {
        registered.insert(family.name().to_owned(), family.get_field_type());
    }
    registry
        .registry
        .register(Box::new(metric.clone()))
        .expect("valid and unique metric definition");
    metric
}

fn counter_vec(registry: &Families, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition"),
    )
}

fn float_counter_vec(
    registry: &Families,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::CounterVec {
    register(
        registry,
        prometheus::CounterVec::new(Opts::new(name, help), labels)
            .expect("valid metric definition"),
    )
}

fn gauge(registry: &Families, name: &str, help: &str) -> IntGauge {
    register(
        registry,
        IntGauge::new(name, help).expect("valid metric definition"),
    )
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let registry = Families::default();
        let decisions = counter_vec(
            &registry,
            "enforcer_decisions_total",
            "Decisions by outcome (allowed, denied, rejected_unknown_key, request_id_conflict, \
             would_deny: allowed by shadow mode, would have been denied), tier and mode",
            &["outcome", "tier", "mode"],
        );
        let debit_duration = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "enforcer_debit_duration_seconds",
                    "Token store round trip of one debit",
                )
                .buckets(vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
                ]),
                &["backend"],
            )
            .expect("valid metric definition"),
        );
        let store_errors = counter_vec(
            &registry,
            "enforcer_store_errors_total",
            "Token store failures by kind (timeout, unavailable, rejected, protocol, breaker_open)",
            &["kind"],
        );
        let store_failure_decisions = counter_vec(
            &registry,
            "enforcer_store_failure_decisions_total",
            "Decisions made by on_store_failure because the store was unreachable",
            &["policy"],
        );
        let breaker_state = gauge(
            &registry,
            "enforcer_store_breaker_state",
            "Token store circuit breaker: 0 closed, 1 open, 2 half-open (the worst, with one per cluster slot group)",
        );
        let breakers_open = gauge(
            &registry,
            "enforcer_store_breakers_open",
            "Token store circuit breakers not closed (one per Redis Cluster slot group; one in all otherwise)",
        );
        let local_decisions = counter_vec(
            &registry,
            "enforcer_local_decisions_total",
            "Fail-soft decisions by local buckets while the store was unreachable, by outcome \
             (allowed, denied, untracked: denied because store.local_max_keys keys are tracked)",
            &["outcome"],
        );
        let local_pending_tokens = register(
            &registry,
            prometheus::Gauge::new(
                "enforcer_local_pending_tokens",
                "Tokens spent by local (fail-soft) decisions and not yet debited back into the \
                 shared buckets",
            )
            .expect("valid metric definition"),
        );
        let local_debited_back = register(
            &registry,
            prometheus::Counter::new(
                "enforcer_local_debited_back_tokens_total",
                "Tokens spent by local (fail-soft) decisions and debited back into the shared \
                 buckets",
            )
            .expect("valid metric definition"),
        );
        let local_nodes = gauge(
            &registry,
            "enforcer_local_nodes",
            "The node count local (fail-soft) buckets divide each key's budget by",
        );
        let rls_requests = counter_vec(
            &registry,
            "enforcer_rls_requests_total",
            "Envoy rate-limit (RLS v3) calls by overall answer (ok, over_limit)",
            &["code"],
        );
        let rls_descriptors = counter_vec(
            &registry,
            "enforcer_rls_descriptors_total",
            "Envoy rate-limit descriptors by what was done with them (keyed, keyless, settle, negative_hits)",
            &["kind"],
        );
        let bad_requests = counter_vec(
            &registry,
            "enforcer_bad_requests_total",
            "Requests refused as bad input, by reason",
            &["reason"],
        );
        let refunds = counter_vec(
            &registry,
            "enforcer_refunds_total",
            "Refund requests by outcome",
            &["outcome"],
        );
        let alerts = counter_vec(
            &registry,
            "enforcer_alerts_total",
            "Low-balance alerts: fired, and webhook deliveries sent, retried, failed or dropped",
            &["result"],
        );
        let settles = counter_vec(
            &registry,
            "enforcer_settles_total",
            "Settle requests (true cost after the response) by outcome",
            &["outcome"],
        );
        let admin_actions = counter_vec(
            &registry,
            "enforcer_admin_actions_total",
            "Admin API calls (the Unix socket) by action and result (ok, refused, error)",
            &["action", "result"],
        );
        let client_addresses = counter_vec(
            &registry,
            "enforcer_client_addresses_total",
            "Client addresses offered with decisions (X-Forwarded-For, X-Real-IP, client_ip), by \
             outcome: used (from a trusted proxy), untrusted_peer (ignored: the peer is not in \
             server.trusted_proxies), unusable (ignored: malformed, only proxies, or headers \
             that disagree)",
            &["outcome"],
        );
        let shadow_candidate_decisions = counter_vec(
            &registry,
            "enforcer_shadow_candidate_decisions_total",
            "The shadow candidate policy's would-be decisions ([shadow]) by outcome (allow, deny)",
            &["outcome"],
        );
        let replays = register(
            &registry,
            IntCounter::new(
                "enforcer_idempotent_replays_total",
                "Checks answered from an earlier decision with the same request_id",
            )
            .expect("valid metric definition"),
        );
        let kernel_attached = gauge(
            &registry,
            "enforcer_kernel_attached",
            "1 when the kernel gate is attached, 0 when running userspace-only",
        );
        let kernel_passed = register(
            &registry,
            IntCounter::new(
                "enforcer_kernel_passed_total",
                "Packets to protected ports the kernel gate passed",
            )
            .expect("valid metric definition"),
        );
        let kernel_rejected = counter_vec(
            &registry,
            "enforcer_kernel_rejected_total",
            "Packets the kernel gate rejected, by reason (l7, l4, blocked)",
            &["reason"],
        );
        let kernel_ignored = counter_vec(
            &registry,
            "enforcer_kernel_ignored_total",
            "Packets passed without a decision, by reason (parse_failed, stale)",
            &["reason"],
        );
        let kernel_sync_lag = register(
            &registry,
            prometheus::Histogram::with_opts(
                HistogramOpts::new(
                    "enforcer_kernel_sync_lag_seconds",
                    "Time from a decision to its budget snapshot in the kernel map",
                )
                .buckets(vec![
                    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.005, 0.01, 0.1,
                ]),
            )
            .expect("valid metric definition"),
        );
        let kernel_sync_dropped = register(
            &registry,
            IntCounter::new(
                "enforcer_kernel_sync_dropped_total",
                "Snapshots not sent to the kernel because the sync queue was full",
            )
            .expect("valid metric definition"),
        );
        let kernel_tracked_keys = gauge(
            &registry,
            "enforcer_kernel_tracked_keys",
            "Keys with a budget snapshot in the kernel gate",
        );
        let ledger = LedgerMetrics::new(&registry);
        let price = register(
            &registry,
            prometheus::GaugeVec::new(
                Opts::new(
                    "enforcer_price",
                    "Tokens per unit now, per configured endpoint (path pattern) and method",
                ),
                &["endpoint", "method"],
            )
            .expect("valid metric definition"),
        );
        let price_multiplier = register(
            &registry,
            prometheus::GaugeVec::new(
                Opts::new(
                    "enforcer_price_multiplier",
                    "The pricing engine's multiplier of each configured endpoint's base cost now",
                ),
                &["endpoint", "method"],
            )
            .expect("valid metric definition"),
        );
        let telemetry_errors = counter_vec(
            &registry,
            "enforcer_telemetry_errors_total",
            "Telemetry readings that failed or made no sense (the last good value was kept)",
            &["source", "kind"],
        );
        let pricing_seconds = register(
            &registry,
            prometheus::Histogram::with_opts(
                HistogramOpts::new(
                    "enforcer_pricing_seconds",
                    "One round of the pricing engine: telemetry reads and recompute",
                )
                .buckets(vec![0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0]),
            )
            .expect("valid metric definition"),
        );
        let node_telemetry = register(
            &registry,
            prometheus::GaugeVec::new(
                Opts::new(
                    "enforcer_node_telemetry",
                    "Node readings of the pricing engine: cpu and memory utilisation (0-1), load per CPU",
                ),
                &["signal"],
            )
            .expect("valid metric definition"),
        );
        let redis_busy_reply_threshold = register(
            &registry,
            prometheus::Gauge::new(
                "enforcer_redis_busy_reply_threshold_seconds",
                "The store's Redis busy-reply-threshold (lua-time-limit): how long a script may \
                 block it; +Inf unlimited, NaN unknown",
            )
            .expect("valid metric definition"),
        );
        redis_busy_reply_threshold.set(f64::NAN);
        let redis_lua_execution = register(
            &registry,
            prometheus::Gauge::new(
                "enforcer_redis_lua_execution_seconds",
                "Mean server-side time of one script call on the store's Redis over the last \
                 watch interval (INFO commandstats, all clients)",
            )
            .expect("valid metric definition"),
        );
        let store_records_evicted = register(
            &registry,
            IntCounter::new(
                "enforcer_store_records_evicted_total",
                "Request records the embedded store dropped before their time for \
                 store.memory_max_records (a retry of such a request is charged again)",
            )
            .expect("valid metric definition"),
        );
        let http = HttpMetrics::new(&registry);
        let config = ConfigMetrics::new(&registry);
        // The trace exporter's counters are process-wide (it is set up before any registry).
        let traces = crate::trace::metrics();
        register(&registry, traces.spans_dropped.clone());
        register(&registry, traces.spans_exported.clone());
        register(&registry, traces.exports.clone());
        Self {
            registry,
            decisions,
            debit_duration,
            store_errors,
            store_failure_decisions,
            breaker_state,
            breakers_open,
            local_decisions,
            local_pending_tokens,
            local_debited_back,
            local_nodes,
            bad_requests,
            refunds,
            settles,
            admin_actions,
            alerts,
            client_addresses,
            replays,
            shadow_candidate_decisions,
            kernel_attached,
            kernel_passed,
            kernel_rejected,
            kernel_ignored,
            kernel_sync_lag,
            kernel_sync_dropped,
            kernel_tracked_keys,
            ledger,
            price,
            price_multiplier,
            telemetry_errors,
            pricing_seconds,
            node_telemetry,
            redis_busy_reply_threshold,
            redis_lua_execution,
            store_records_evicted,
            http,
            rls_requests,
            rls_descriptors,
            config,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Metrics {
    /// Every sample name the daemon can export, whether or not a series exists yet: counters
    /// and gauges by their name, histograms as `_bucket`, `_sum` and `_count`, summaries as the
    /// name, `_sum` and `_count`. What a dashboard or an alert may query.
    pub fn exported_names(&self) -> BTreeSet<String> {
        let registered = self.registry.registered.lock();
        let mut names = BTreeSet::new();
        for (name, kind) in registered.iter() {
            let suffixes: &[&str] = match kind {
                MetricType::HISTOGRAM => &["_bucket", "_sum", "_count"],
                MetricType::SUMMARY => &["", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        }
        names
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::Metrics;

    #[test]
    fn exported_names_list_families_gather_leaves_out() {
        let metrics = Metrics::new();
        let names = metrics.exported_names();
        // A vector nobody used yet is not in the exposition, but it is exported.
        assert!(!metrics.render().contains("enforcer_decisions_total"));
        assert!(names.contains("enforcer_decisions_total"));
        assert!(names.contains("enforcer_tokens_charged_total"));
        // Histograms are queried through their three sample names, never the bare one.
        for suffix in ["_bucket", "_sum", "_count"] {
            assert!(names.contains(&format!("enforcer_debit_duration_seconds{suffix}")));
        }
        assert!(!names.contains("enforcer_debit_duration_seconds"));
        // Every sample the daemon renders, once each vector has a series, is in the list.
        metrics
            .decisions
            .with_label_values(&["allowed", "free", "enforce"])
            .inc();
        metrics
            .debit_duration
            .with_label_values(&["redis"])
            .observe(0.001);
        for line in metrics.render().lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            assert!(names.contains(name), "{name} is rendered but not listed");
        }
    }
}
