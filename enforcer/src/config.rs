//! The configuration file (TOML): parsing, defaults and validation.
//!
//! Every section has defaults, so an empty file is a working embedded single-node config.
//! [`Config::load`] reports every semantic error at once, each with its field path
//! (`tiers.free.max_tokens: must be > 0`); `enforcer config check FILE` prints them.
//! `docs/configuration.md` documents every field.
use crate::budget::{BucketParams, BudgetPolicy, Tier, UnknownKeys};
use crate::endpoint::{TrailingSlash, is_normal};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// A problem found in a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not fit the schema.
    #[error("{0}")]
    Parse(String),
    /// Values that parse but make no sense; one entry per field.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<FieldError>),
}

/// One invalid field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the field, e.g. `tiers.free.max_tokens`.
    pub path: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// What to do with a decision when the token store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnStoreFailure {
    /// Allow the request (availability over enforcement).
    FailOpen,
    /// Deny the request (enforcement over availability).
    FailClosed,
    /// Decide by local buckets holding this node's share of each key's budget, and debit what
    /// was spent back into the shared buckets once the store answers (`crate::decision::local`).
    Local,
}

/// What keys without a tier assignment get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnknownKeyPolicy {
    /// The `default_tier`.
    DefaultTier,
    /// Refused with 403.
    Reject,
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[server]`
    pub server: ServerConfig,
    /// `[store]`
    pub store: StoreConfig,
    /// `[budget]`
    pub budget: BudgetConfig,
    /// `[tiers.<name>]`
    pub tiers: BTreeMap<String, TierConfig>,
    /// `[shared_budgets.<name>]`: several keys charged against one budget.
    pub shared_budgets: BTreeMap<String, SharedBudgetConfig>,
    /// `[pricing]`
    pub pricing: PricingConfig,
    /// `[kernel]`
    pub kernel: KernelConfig,
    /// `[ledger]`
    pub ledger: LedgerConfig,
    /// `[envoy]`: how Envoy's rate-limit descriptors map onto a check.
    pub envoy: EnvoyConfig,
    /// `[alerts]`: where low-balance alerts go (`tiers.*.low_balance` says when).
    pub alerts: AlertsConfig,
    /// `[shadow]`: a candidate policy evaluated beside the enforced one ([`crate::shadow`]);
    /// absent: none.
    pub shadow: Option<crate::shadow::ShadowConfig>,
    /// `[telemetry]`: OpenTelemetry traces of decisions and pricing rounds.
    pub telemetry: TelemetryConfig,
}

/// `[telemetry]`: where traces go ([`crate::trace`]); read at start only.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/HTTP (protobuf) receiver, `http://` or `https://`: a URL without a path gets
    /// `/v1/traces` (as `OTEL_EXPORTER_OTLP_ENDPOINT`), one with a path is used as it is.
    /// `""`: no traces (the default), and the spans cost nothing.
    pub otlp_endpoint: String,
    /// Share of decisions without a caller's `traceparent` that are traced, 0-1. A caller's
    /// `traceparent` decides for its own requests (parent-based sampling).
    pub sample_ratio: f64,
    /// The resource's `service.name`.
    pub service_name: String,
    /// Ended spans waiting for export at most; beyond, spans are dropped (and counted).
    pub max_queue_size: usize,
    /// Most spans per export request.
    pub max_export_batch_size: usize,
    /// A batch is sent at the latest this long after its first span, milliseconds.
    pub export_interval_ms: u64,
    /// Bound on one export request (retries included), milliseconds.
    pub export_timeout_ms: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            sample_ratio: 1.0,
            service_name: "enforcer".to_owned(),
            max_queue_size: 4096,
            max_export_batch_size: 512,
            export_interval_ms: 1000,
            export_timeout_ms: 5000,
        }
    }
}

/// `[alerts]`: delivery of low-balance alerts ([`crate::alerts`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Webhook that gets each alert as a signed JSON POST (`http://` or `https://`); `""`:
    /// alerts are ledger rows only.
    pub webhook_url: String,
    /// PEM file of the CA that signed an `https://` webhook's certificate (the only root
    /// trusted then); empty: the system's roots.
    pub ca_file: String,
    /// File holding the HMAC-SHA256 key the webhook's body is signed with (or the environment
    /// variable `ENFORCER_ALERTS_HMAC_SECRET`); never the key itself in the config.
    pub hmac_secret_file: String,
    /// Attempts per alert (the first and the retries, with exponential backoff).
    pub max_attempts: u32,
    /// Wait before the first retry, milliseconds (doubled each time, at most 60 s).
    pub retry_ms: u64,
    /// Bound on each POST, milliseconds.
    pub timeout_ms: u64,
    /// Alerts waiting for delivery at most; beyond, new ones are dropped (and counted).
    pub queue: usize,
    /// A threshold fires again for a key only once its balance was seen above the threshold
    /// by this fraction of `max_tokens` (a key hovering at a threshold would fire at every
    /// request otherwise).
    pub rearm_margin: f64,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            webhook_url: String::new(),
            ca_file: String::new(),
            hmac_secret_file: String::new(),
            max_attempts: 8,
            retry_ms: 500,
            timeout_ms: 2_000,
            queue: 10_000,
            rearm_margin: 0.05,
        }
    }
}

/// `[server]`: the HTTP decision API.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the HTTP API.
    pub listen: SocketAddr,
    /// Header that carries the API key on `/v1/auth`.
    pub key_header: String,
    /// Status `/v1/auth` answers for a denied request (nginx `auth_request` only passes 401
    /// and 403 through; Traefik passes anything).
    pub auth_deny_status: u16,
    /// Largest accepted request body, bytes.
    pub max_body_bytes: usize,
    /// A request header must arrive whole within this long of its first byte, milliseconds
    /// (slowloris: a client dripping a header never completes it).
    pub header_read_timeout_ms: u64,
    /// A connection with no request in flight is closed after this long without one,
    /// milliseconds (from its accept, or from the end of its previous response).
    pub idle_timeout_ms: u64,
    /// Open client connections at most; the daemon refuses (503, closed) the ones beyond.
    pub max_connections: usize,
    /// Peers (proxies, gateways) whose word on the client's address is taken: `X-Forwarded-For`
    /// and `X-Real-IP` on `/v1/auth`, `client_ip` on `/v1/check`. Empty (the default): no
    /// request names a client address, so the kernel gate binds none ([`crate::client_addr`]).
    pub trusted_proxies: Vec<crate::client_addr::Cidr>,
    /// Address of Envoy's rate-limit service API (gRPC, RLS v3) and of `grpc.health.v1`;
    /// `""` serves no gRPC.
    pub grpc_listen: String,
    /// The admin API's Unix socket (`enforcer status`, `keys …`, `shadow`, `reload`): created
    /// mode 0600 in a directory made 0700, owned by the daemon's user; `""` serves none.
    /// Nothing administrative is served on the TCP listeners.
    pub admin_socket: String,
}

/// Where the admin API listens by default (`[server] admin_socket`).
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/enforcer/admin.sock";

impl ServerConfig {
    /// The gRPC address; `None` when gRPC is off (or the value is invalid: validation says so).
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc_listen.parse().ok()
    }
}

/// `[envoy]`: which entries of an Envoy rate-limit descriptor carry what (see
/// `docs/gateways.md`). Entries not named here are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnvoyConfig {
    /// Entries that carry the API key, first present wins (e.g. `api_key`, or the
    /// `descriptor_key` of a `header_match` / `generic_key` action).
    pub key_entries: Vec<String>,
    /// Entry with the request path (`:path`), priced in normal form.
    pub path_entry: String,
    /// Entry with the request method (`:method`).
    pub method_entry: String,
    /// Entry with the client address (Envoy's `remote_address` action); taken only from a
    /// peer in `server.trusted_proxies`.
    pub address_entry: String,
    /// Entry with the request id (e.g. `x-request-id` through a `request_headers` action):
    /// the idempotency token.
    pub request_id_entry: String,
    /// A request none of whose descriptors carries a key: `deny` (the default, like a missing
    /// key header on `/v1/auth`) or `allow`.
    pub missing_key: MissingKeyPolicy,
    /// `entry=value`: a descriptor carrying this entry is a settle, not a check (Envoy's
    /// stream-done call, `apply_on_stream_done`, produced by a `generic_key` action); its
    /// `hits_addend` is the true units. Empty: no descriptor is a settle by marker.
    pub settle_marker: String,
}

/// What the Envoy API answers to a request that names no API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MissingKeyPolicy {
    /// `OVER_LIMIT`.
    Deny,
    /// `OK`, nothing charged.
    Allow,
}

impl Default for EnvoyConfig {
    fn default() -> Self {
        Self {
            key_entries: vec!["api_key".to_owned()],
            path_entry: "path".to_owned(),
            method_entry: "method".to_owned(),
            address_entry: "remote_address".to_owned(),
            request_id_entry: "request_id".to_owned(),
            missing_key: MissingKeyPolicy::Deny,
            settle_marker: "enforcer_phase=done".to_owned(),
        }
    }
}

impl EnvoyConfig {
    /// The settle marker as (entry, value); `None` when off or malformed (validation says so).
    pub fn settle_marker(&self) -> Option<(&str, &str)> {
        self.settle_marker
            .split_once('=')
            .filter(|(entry, value)| !entry.is_empty() && !value.is_empty())
    }
}

/// `[store]`: where buckets live.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Redis URL; empty means the embedded in-process store (unless `redis_cluster` is set).
    pub redis_url: String,
    /// Seed nodes of a Redis Cluster (`redis://host:port`); exclusive with `redis_url`.
    pub redis_cluster: Vec<String>,
    /// Replicas that must acknowledge each debit before it is answered (`WAIT`); 0: none.
    pub wait_replicas: u32,
    /// Debit with the `enforcer-redis` module's `ENFORCER.DEBIT` where Redis has it loaded
    /// (the same rule as `lua/debit.lua` at a third to a half of Redis's CPU), with the script
    /// where it has not; `false`: always the script.
    pub redis_module: bool,
    /// Multiplexed Redis connections.
    pub connections: usize,
    /// Bound on each store call, milliseconds.
    pub timeout_ms: u64,
    /// Bound on establishing a connection, milliseconds.
    pub connect_timeout_ms: u64,
    /// How often the Redis servers' `busy-reply-threshold` and script times are read
    /// ([`crate::store::redis_watch`]), milliseconds.
    pub watch_interval_ms: u64,
    /// Policy while the store is unreachable.
    pub on_store_failure: OnStoreFailure,
    /// Consecutive failures that open the circuit breaker.
    pub breaker_failures: u32,
    /// How long the breaker stays open before it lets one probe through, milliseconds.
    pub breaker_open_ms: u64,
    /// How long request ids are remembered (idempotent retries, refunds), seconds.
    pub idempotency_ttl_secs: u64,
    /// How long a reservation (`reserve: true`, `settle = "after"`) waits for its settle,
    /// seconds; unset: `idempotency_ttl_secs`. Unsettled, it keeps its estimate.
    pub settle_ttl_secs: Option<u64>,
    /// Remember requests that came without a request id under the id the daemon generated
    /// (returned in the answer), so that they can be refunded or settled; `false`: only
    /// requests with a client's id, and reservations, leave a request record (one write less
    /// per decision in the store).
    pub remember_generated_ids: bool,
    /// With `on_store_failure = "local"`: the number of daemons sharing the store, which
    /// divides each key's budget into local shares; 0 (the default): counted by the
    /// heartbeat set the daemons keep in Redis.
    pub local_nodes: u32,
    /// With `on_store_failure = "local"` and `local_nodes = 0`: how often this daemon says it
    /// is alive (and reads the count), milliseconds; also how often pending local spending is
    /// debited back.
    pub heartbeat_ms: u64,
    /// With `on_store_failure = "local"`: most keys (and bucket kinds) tracked locally; keys
    /// beyond are denied while the store is unreachable.
    pub local_max_keys: usize,
    /// The embedded store (no Redis): most request records (idempotency, refunds, settles)
    /// kept; beyond it the soonest-expiring of a small sample is dropped and counted
    /// (`enforcer_store_records_evicted_total`).
    pub memory_max_records: usize,
}

/// `[budget]`: rules shared by all tiers.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    /// Keys without an assignment: `default-tier` or `reject`.
    pub unknown_keys: UnknownKeyPolicy,
    /// Tier of keys without an assignment.
    pub default_tier: String,
    /// A key is idle once its previous request is older than this, seconds.
    pub active_window_secs: f64,
    /// Global shadow mode: decide and record, always allow.
    pub shadow: bool,
    /// Largest `units` a single check may ask for.
    pub max_units: f64,
    /// Smallest `units` a single check may ask for. The kernel gate prices a request at this
    /// many units when it is below 1 (it cannot know the units), so it never charges more
    /// than the daemon would.
    pub min_units: f64,
    /// `[budget.operational]`: the strict bucket of operational endpoints.
    pub operational: OperationalConfig,
}

/// `[budget.operational]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OperationalConfig {
    /// Burst of operational requests per key.
    pub capacity: f64,
    /// Operational requests per second per key.
    pub refill_per_sec: f64,
}

/// A tier's or shared budget's name: 1-64 of `[a-z0-9_-]` (it goes into Redis keys, metric
/// labels and ledger rows as it is).
fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// `[shared_budgets.<name>]`: one budget (an organisation's, a project's) that several keys
/// spend from ([`crate::budget::SharedBudget`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedBudgetConfig {
    /// The tier whose bucket, quota and grant ceiling the budget has.
    pub tier: String,
    /// The member keys, by SHA-256 (hex, as `enforcer keys hash` prints it): raw keys never go
    /// into a config file. A key is in at most one shared budget.
    pub keys: Vec<String>,
    /// An optional per-key sub-limit: each member's own bucket beside the budget; a debit
    /// needs both (all or nothing).
    pub key_limit: Option<KeyLimitConfig>,
}

/// `[shared_budgets.<name>.key_limit]`
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyLimitConfig {
    /// The member's bucket capacity (and what it starts at).
    pub max_tokens: f64,
    /// Tokens per second it earns back (> 0: a sub-limit is a rate guard, not credit).
    pub refill_per_sec: f64,
}

/// `[tiers.<name>]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    /// Capacity of the bucket.
    pub max_tokens: f64,
    /// Tokens per second earned back (0: prepaid credits).
    pub refill_per_sec: f64,
    /// Fraction of capacity that refill may reach for an idle key.
    #[serde(default = "default_idle_cap")]
    pub idle_cap: f64,
    /// Balance of a new key; default `idle_cap × max_tokens`.
    pub initial_tokens: Option<f64>,
    /// Shadow mode for this tier.
    #[serde(default)]
    pub shadow: bool,
    /// Highest balance an operator's grant (`enforcer keys grant`) may bring a key of this
    /// tier to; default `max_tokens`. A grant that would pass it is refused whole.
    pub grant_ceiling: Option<f64>,
    /// Low-balance alert thresholds, fractions of `max_tokens` (e.g. `[0.2, 0.0]`): an alert
    /// fires when a key's balance goes from above one to at or below it ([`crate::alerts`]).
    #[serde(default)]
    pub low_balance: Vec<f64>,
    /// A calendar quota beside the bucket: `{ amount, period, anchor_day, timezone }`
    /// ([`crate::quota`]); both must allow a request, and a denial charges neither.
    #[serde(default)]
    pub quota: Option<crate::quota::QuotaConfig>,
}

/// `[pricing]`: the cost matrix, and the engine that moves it with telemetry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PricingConfig {
    /// Cost of an endpoint not listed.
    pub default_cost: f64,
    /// Whether a trailing slash is priced like the path without it (`strip`, the default) or
    /// as another endpoint (`keep`); see [`crate::endpoint`].
    pub trailing_slash: TrailingSlash,
    /// `[[pricing.endpoints]]`
    pub endpoints: Vec<EndpointConfig>,
    /// Move prices with telemetry (the pricing engine); off: the static cost matrix.
    pub dynamic: bool,
    /// Recompute interval, milliseconds.
    pub interval_ms: u64,
    /// EMA smoothing factor of the score (0 < alpha ≤ 1).
    pub alpha: f64,
    /// The multiplier never goes below this.
    pub floor: f64,
    /// Each normalised input is capped at this.
    pub cap: f64,
    /// `[pricing.weights]`
    pub weights: WeightsConfig,
    /// `[pricing.surge]`
    pub surge: SurgeConfig,
    /// `[pricing.node]`: references of the node telemetry (from `/proc`).
    pub node: NodeReferences,
    /// Where the node telemetry is read: a directory laid out like `/proc` (`stat`,
    /// `meminfo`, `loadavg`).
    pub proc_root: String,
    /// `[pricing.prometheus]`
    pub prometheus: PrometheusConfig,
    /// `[pricing.calibration]`: how `enforcer audit calibrate` measures each endpoint's cost.
    pub calibration: CalibrationConfig,
    /// `[pricing.domains.NAME]`: per-domain cost tables for the Envoy API (the request's
    /// `domain` picks one; any other domain is priced by the global table).
    pub domains: BTreeMap<String, DomainPricing>,
}

/// `[pricing.calibration]`: what `enforcer audit calibrate` compares the tokens charged with.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CalibrationConfig {
    /// PromQL giving the CPU-seconds one endpoint's backends spent over a window: one series.
    /// `$method`, `$path` and `$window` (e.g. `86400s`) are replaced per endpoint; an
    /// endpoint's own `calibration_query` takes precedence. Empty: only those.
    pub cpu_seconds_query: String,
}

/// `[pricing.domains.NAME]`: a cost table for one Envoy rate-limit domain. Its prices move
/// with the global table's multipliers (the entry of the same method and path, else the global
/// default), so the pricing engine needs no queries of its own for it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DomainPricing {
    /// Cost of an endpoint this table does not list (default: `pricing.default_cost`).
    pub default_cost: Option<f64>,
    /// `[[pricing.domains.NAME.endpoints]]`, as `[[pricing.endpoints]]`.
    pub endpoints: Vec<EndpointConfig>,
}

/// `[pricing.weights]`: how the score weighs its inputs (normalised to sum 1).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WeightsConfig {
    /// The endpoint's CPU.
    pub cpu: f64,
    /// The endpoint's memory.
    pub memory: f64,
    /// The node's load.
    pub load: f64,
}

impl Default for WeightsConfig {
    fn default() -> Self {
        Self {
            cpu: 0.65,
            memory: 0.25,
            load: 0.10,
        }
    }
}

/// `[pricing.surge]`: `base^((load − threshold) / span)` above `threshold`, at most `max`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SurgeConfig {
    /// Normalised node load above which the surge applies.
    pub threshold: f64,
    /// Growth per `span` of load.
    pub base: f64,
    /// Load span of one `base` step.
    pub span: f64,
    /// Largest surge multiplier.
    pub max: f64,
}

impl Default for SurgeConfig {
    fn default() -> Self {
        Self {
            threshold: 0.7,
            base: 1.5,
            span: 0.3,
            max: 4.0,
        }
    }
}

/// `[pricing.node]`: what counts as a reference (normalised 1.0) node.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeReferences {
    /// Node CPU utilisation (0-1) that is the reference, for endpoints without a CPU query.
    pub cpu: f64,
    /// Node memory utilisation (0-1) that is the reference, for endpoints without a memory
    /// query.
    pub memory: f64,
    /// 1-minute load average per CPU that is the reference.
    pub load: f64,
}

impl Default for NodeReferences {
    fn default() -> Self {
        Self {
            cpu: 0.5,
            memory: 0.5,
            load: 1.0,
        }
    }
}

/// `[pricing.prometheus]`: where per-endpoint CPU and memory come from.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrometheusConfig {
    /// Base URL of the Prometheus HTTP API (`http://…` or `https://…`, e.g.
    /// `https://prometheus:9090`); empty: none.
    pub url: String,
    /// Per-query timeout, milliseconds.
    pub timeout_ms: u64,
    /// PEM file of the CA that signed the server's certificate (the only root trusted then);
    /// empty: the system's roots.
    pub ca_file: String,
    /// `Authorization: Bearer`: the token's file (re-read at each query, so rotation works).
    pub bearer_token_file: String,
    /// `Authorization: Bearer`: the environment variable holding the token.
    pub bearer_token_env: String,
    /// Basic auth: the user name (with `password_file` or `password_env`).
    pub username: String,
    /// Basic auth: the password's file (re-read at each query).
    pub password_file: String,
    /// Basic auth: the environment variable holding the password.
    pub password_env: String,
    /// Refused with an explanation: secrets never go in the config text.
    pub bearer_token: Option<toml::Value>,
    /// Refused with an explanation: secrets never go in the config text.
    pub password: Option<toml::Value>,
}

impl Default for PrometheusConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            timeout_ms: 500,
            ca_file: String::new(),
            bearer_token_file: String::new(),
            bearer_token_env: String::new(),
            username: String::new(),
            password_file: String::new(),
            password_env: String::new(),
            bearer_token: None,
            password: None,
        }
    }
}

impl PrometheusConfig {
    /// How queries authenticate (the config is valid: at most one way).
    pub fn auth(&self) -> crate::http_client::Auth {
        use crate::http_client::{Auth, Secret};
        if let Some(token) = Secret::from_pair(&self.bearer_token_file, &self.bearer_token_env) {
            Auth::Bearer(token)
        } else if let Some(password) = Secret::from_pair(&self.password_file, &self.password_env) {
            Auth::Basic {
                username: self.username.clone(),
                password,
            }
        } else {
            Auth::None
        }
    }

    /// Every problem of these settings, as `(field, message)` under `at` (`pricing.prometheus`).
    pub fn problems(&self, at: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut err = |field: &str, msg: &str| out.push((format!("{at}.{field}"), msg.to_owned()));
        if !(self.url.is_empty()
            || self.url.starts_with("http://")
            || self.url.starts_with("https://"))
        {
            err("url", "must be an http:// or https:// URL");
        }
        if self.timeout_ms == 0 || self.timeout_ms > 60_000 {
            err("timeout_ms", "must be between 1 and 60000");
        }
        if self.bearer_token.is_some() {
            err(
                "bearer_token",
                "secrets never go in the config text: use bearer_token_file or bearer_token_env",
            );
        }
        if self.password.is_some() {
            err(
                "password",
                "secrets never go in the config text: use password_file or password_env",
            );
        }
        let bearer = !self.bearer_token_file.is_empty() || !self.bearer_token_env.is_empty();
        let basic = !self.password_file.is_empty() || !self.password_env.is_empty();
        if !self.bearer_token_file.is_empty() && !self.bearer_token_env.is_empty() {
            err(
                "bearer_token_env",
                "give bearer_token_file or bearer_token_env, not both",
            );
        }
        if !self.password_file.is_empty() && !self.password_env.is_empty() {
            err(
                "password_env",
                "give password_file or password_env, not both",
            );
        }
        if bearer && (basic || !self.username.is_empty()) {
            err("username", "bearer token and basic auth exclude each other");
        }
        // Basic auth is a user name and a password, or neither.
        if basic == self.username.is_empty() {
            err(
                "username",
                "basic auth needs both username and password_file (or password_env)",
            );
        }
        for (field, name) in [
            ("bearer_token_env", &self.bearer_token_env),
            ("password_env", &self.password_env),
        ] {
            if !name.is_empty() && !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                err(field, "is not an environment variable name");
            }
        }
        if (bearer || basic || !self.ca_file.is_empty()) && self.url.is_empty() {
            err("url", "TLS and auth settings need a url");
        }
        out
    }
}

/// `[[pricing.endpoints]]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// HTTP method, or `*` (default) for any.
    #[serde(default = "any_method")]
    pub method: String,
    /// Exact path, or a prefix ending in `/*`.
    pub path: String,
    /// Tokens per unit at the reference profile.
    #[serde(default = "one")]
    pub base_cost: f64,
    /// Operational endpoint: its own strict bucket, never the main budget.
    #[serde(default)]
    pub operational: bool,
    /// PromQL of the CPU (cores) the endpoint's backends use; one series expected.
    #[serde(default)]
    pub cpu_query: String,
    /// `enforcer audit calibrate`: PromQL of the CPU-seconds this endpoint's backends spent
    /// over `$window` (one series); default: `[pricing.calibration] cpu_seconds_query`.
    #[serde(default)]
    pub calibration_query: String,
    /// CPU (cores) that is the reference (normalised 1.0) for `cpu_query`.
    #[serde(default = "one")]
    pub cpu_reference: f64,
    /// PromQL of the memory (bytes) the endpoint's backends use; one series expected.
    #[serde(default)]
    pub memory_query: String,
    /// Memory (bytes) that is the reference for `memory_query`.
    #[serde(default = "one_gib")]
    pub memory_reference: f64,
    /// The most a settle (`POST /v1/settle`) may charge for one request of this endpoint, in
    /// tokens; a settle above it is charged `max_cost`. Unset: no cap.
    #[serde(default)]
    pub max_cost: Option<f64>,
    /// `"after"`: every check of this endpoint is a reservation, to be settled at its true
    /// cost after the response (as `reserve: true` on `/v1/check`); `"check"` (default): the
    /// check's cost is the charge.
    #[serde(default)]
    pub settle: SettleWhen,
}

/// When an endpoint's true cost is known.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SettleWhen {
    /// At the check: its cost is the charge.
    #[default]
    Check,
    /// After the response: the check reserves an estimate, `POST /v1/settle` charges the
    /// true cost.
    After,
}

/// Validates one cost table's endpoints (`[[pricing.endpoints]]` or a domain's), reporting
/// under `at`.
fn check_endpoints(
    err: &mut impl FnMut(String, &str),
    at: &str,
    endpoints: &[EndpointConfig],
    pricing: &PricingConfig,
    in_domain: bool,
) {
    let positive = |v: f64| v.is_finite() && v > 0.0;
    let mut seen = std::collections::HashSet::new();
    for (i, e) in endpoints.iter().enumerate() {
        let p = |field: &str| format!("{at}[{i}].{field}");
        if !METHODS.contains(&e.method.as_str()) {
            err(p("method"), "must be an upper-case HTTP method or *");
        }
        let wildcard_ok =
            !e.path.contains('*') || (e.path.ends_with("/*") && e.path.matches('*').count() == 1);
        if !e.path.starts_with('/') || !wildcard_ok {
            err(
                p("path"),
                "must start with / and may only end in /* as a wildcard",
            );
        } else if let Some(problem) = not_normal(&e.path, pricing.trailing_slash) {
            // Requests are priced in normal form: another spelling would never match.
            err(p("path"), &problem);
        }
        if !positive(e.base_cost) {
            err(p("base_cost"), "must be > 0");
        }
        if e.max_cost.is_some_and(|m| !(positive(m) && m <= 1e15)) {
            err(p("max_cost"), "must be > 0 and <= 1e15");
        }
        if e.operational && (e.max_cost.is_some() || e.settle == SettleWhen::After) {
            err(
                p("settle"),
                "operational endpoints are outside the token economy: nothing to settle",
            );
        }
        if !seen.insert((e.method.clone(), e.path.clone())) {
            err(p("path"), "duplicate method and path");
        }
        if !positive(e.cpu_reference) {
            err(p("cpu_reference"), "must be > 0");
        }
        if !positive(e.memory_reference) {
            err(p("memory_reference"), "must be > 0");
        }
        let queries = !e.cpu_query.is_empty() || !e.memory_query.is_empty();
        if queries && in_domain {
            err(
                p("cpu_query"),
                "a domain's prices move with the global entry of the same method and path \
                 (or the global default): queries belong in [[pricing.endpoints]]",
            );
        }
        if queries && pricing.prometheus.url.is_empty() {
            err(p("cpu_query"), "queries need pricing.prometheus.url");
        }
        if queries && e.operational {
            err(
                p("operational"),
                "operational endpoints are not priced by telemetry",
            );
        }
    }
}

fn one_gib() -> f64 {
    1024.0 * 1024.0 * 1024.0
}

/// `[kernel]`: the TC eBPF gate.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KernelConfig {
    /// Interfaces to attach the gate to (ingress). Empty: userspace only.
    pub interfaces: Vec<String>,
    /// TCP destination ports the gate protects.
    pub protect_ports: Vec<u16>,
    /// What happens to a rejected packet: `drop`, or `reset` (a TCP RST to the client).
    pub action: String,
    /// Snapshots older than this are ignored by the kernel, milliseconds (1-60000).
    pub max_staleness_ms: u64,
    /// Header the kernel reads the key from; empty: `server.key_header`.
    pub key_header: String,
    /// Value prefix before the key, e.g. `"Bearer "` with `key_header = "authorization"`.
    pub value_prefix: String,
    /// Where the maps are pinned (a restarted daemon adopts them).
    pub pin_dir: String,
    /// Decisions of one key carrying a client address before that address is bound to the key
    /// (L4 identity); never while another key uses it. 0: never bind.
    pub bind_after: u32,
}

impl Default for KernelConfig {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            protect_ports: Vec::new(),
            action: "drop".to_owned(),
            max_staleness_ms: 2000,
            key_header: String::new(),
            value_prefix: String::new(),
            pin_dir: enforcer_common::names::PIN_DIR.to_owned(),
            bind_after: 3,
        }
    }
}

/// The smallest `ledger.file_max_bytes` other than 0: a few rows (a smaller one would rotate
/// at every row, which only tests could want).
const MIN_FILE_MAX_BYTES: u64 = 1024;

/// `[ledger]`: the audit ledger (one row per decision).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerConfig {
    /// PostgreSQL URL; empty: no database, rows go to `file` (the embedded default).
    pub database_url: String,
    /// Apply the migrations in `migrations/` at start.
    pub migrate: bool,
    /// Local append-only file (JSON lines): the ledger itself without a database, the spill
    /// file with one (rows written while PostgreSQL is down or slow, replayed when it is back).
    pub file: String,
    /// fsync the file once per flush interval (what was appended since the last fsync), so a
    /// power loss loses at most that; a killed daemon loses nothing that was appended.
    pub fsync: bool,
    /// Append each row to the file before the decision is answered (one `write` per row, on
    /// the decision path), so a daemon killed after answering loses nothing. `false`: the
    /// writer appends the queued rows once per `flush_ms`, and a kill loses at most the rows
    /// of one flush interval.
    pub journal: bool,
    /// Rows held in memory: for the appender (`journal = false`; beyond it rows are dropped
    /// and counted) and for PostgreSQL (beyond it they are read back from the file).
    pub queue_capacity: usize,
    /// Most rows per batch.
    pub batch_rows: usize,
    /// Concurrent `COPY`s a large batch is split into (1-8; one PostgreSQL backend uses one
    /// core per `COPY`).
    pub connections: usize,
    /// A batch is written at the latest this long after its first row, milliseconds.
    pub flush_ms: u64,
    /// A batch write slower than this goes to the spill file instead, milliseconds.
    pub write_timeout_ms: u64,
    /// Wait before retrying PostgreSQL after a failure, milliseconds.
    pub retry_ms: u64,
    /// Monthly partitions created ahead of the current month.
    pub partitions_ahead: u32,
    /// Keep this many months before the current one; older partitions are dropped. 0: keep all.
    pub retention_months: u32,
    /// This node's name in audit rows; empty: `$NODE_NAME`, else the host name.
    pub node: String,
    /// How often the reservation expiry job runs (with a database), milliseconds; 0: never
    /// (another daemon on the same database runs it).
    pub expiry_interval_ms: u64,
    /// A reservation's expiry row is written once its `settle_by` is this long past,
    /// milliseconds: time for a settle or refund row still on its way (another daemon's spill
    /// file) to reach PostgreSQL.
    pub expiry_grace_ms: u64,
    /// Reservations whose `settle_by` is older than this are no longer looked at, seconds.
    pub expiry_lookback_secs: u64,
    /// Most expiry rows one run writes (the rest: the next runs).
    pub expiry_batch: u32,
    /// Without a database: the file is rotated once it holds this many bytes (checked every
    /// `flush_ms`); 0: never by size. With one it is never rotated (a warning once it passes
    /// this).
    pub file_max_bytes: u64,
    /// Without a database: the file is rotated once its first row is this old, seconds; 0:
    /// never by age.
    pub file_max_age_secs: u64,
    /// Rotated (compressed) files kept next to the file; older ones are deleted.
    pub file_keep: u32,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            database_url: String::new(),
            migrate: false,
            file: "enforcer-ledger.jsonl".to_owned(),
            fsync: true,
            journal: true,
            queue_capacity: 200_000,
            batch_rows: 10_000,
            connections: 2,
            flush_ms: 100,
            write_timeout_ms: 5_000,
            retry_ms: 1_000,
            partitions_ahead: 2,
            retention_months: 0,
            node: String::new(),
            expiry_interval_ms: 60_000,
            expiry_grace_ms: 60_000,
            expiry_lookback_secs: 7 * 86_400,
            expiry_batch: 10_000,
            file_max_bytes: 256 << 20,
            file_max_age_secs: 86_400,
            file_keep: 8,
        }
    }
}

fn default_idle_cap() -> f64 {
    0.8
}
fn any_method() -> String {
    "*".to_owned()
}
fn one() -> f64 {
    1.0
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            key_header: "x-api-key".to_owned(),
            auth_deny_status: 429,
            max_body_bytes: 64 * 1024,
            header_read_timeout_ms: 5_000,
            idle_timeout_ms: 60_000,
            max_connections: 10_000,
            trusted_proxies: Vec::new(),
            grpc_listen: "127.0.0.1:8081".to_owned(),
            admin_socket: DEFAULT_ADMIN_SOCKET.to_owned(),
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            redis_url: String::new(),
            redis_cluster: Vec::new(),
            wait_replicas: 0,
            redis_module: true,
            connections: 2,
            timeout_ms: 50,
            connect_timeout_ms: 1000,
            watch_interval_ms: 10_000,
            on_store_failure: OnStoreFailure::FailOpen,
            breaker_failures: 5,
            breaker_open_ms: 1000,
            idempotency_ttl_secs: 600,
            settle_ttl_secs: None,
            remember_generated_ids: true,
            local_nodes: 0,
            heartbeat_ms: 2000,
            local_max_keys: 100_000,
            memory_max_records: 4_000_000,
        }
    }
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            unknown_keys: UnknownKeyPolicy::DefaultTier,
            default_tier: "free".to_owned(),
            active_window_secs: 60.0,
            shadow: false,
            max_units: 1_000_000.0,
            min_units: 1.0,
            operational: OperationalConfig::default(),
        }
    }
}

impl Default for OperationalConfig {
    fn default() -> Self {
        Self {
            capacity: 10.0,
            refill_per_sec: 10.0,
        }
    }
}

impl Default for PricingConfig {
    fn default() -> Self {
        Self {
            default_cost: 1.0,
            trailing_slash: TrailingSlash::Strip,
            endpoints: Vec::new(),
            dynamic: false,
            interval_ms: 1000,
            alpha: 0.1,
            floor: 0.5,
            cap: 3.0,
            weights: WeightsConfig::default(),
            surge: SurgeConfig::default(),
            node: NodeReferences::default(),
            proc_root: "/proc".to_owned(),
            prometheus: PrometheusConfig::default(),
            calibration: CalibrationConfig::default(),
            domains: BTreeMap::new(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        let mut tiers = BTreeMap::new();
        tiers.insert(
            "free".to_owned(),
            TierConfig {
                max_tokens: 1000.0,
                refill_per_sec: 10.0,
                idle_cap: default_idle_cap(),
                initial_tokens: None,
                shadow: false,
                grant_ceiling: None,
                low_balance: Vec::new(),
                quota: None,
            },
        );
        Self {
            server: ServerConfig::default(),
            store: StoreConfig::default(),
            budget: BudgetConfig::default(),
            tiers,
            shared_budgets: BTreeMap::new(),
            pricing: PricingConfig::default(),
            kernel: KernelConfig::default(),
            ledger: LedgerConfig::default(),
            envoy: EnvoyConfig::default(),
            alerts: AlertsConfig::default(),
            shadow: None,
            telemetry: TelemetryConfig::default(),
        }
    }
}

impl TelemetryConfig {
    /// The errors of `[telemetry]`, reported through `err`.
    fn check(&self, err: &mut impl FnMut(String, &str)) {
        let t = self;
        if !t.otlp_endpoint.is_empty()
            && !t.otlp_endpoint.parse::<axum::http::Uri>().is_ok_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
            })
        {
            err(
                "telemetry.otlp_endpoint".into(),
                "must be an http:// or https:// URL with a host (an OTLP/HTTP receiver, e.g. \
                 http://otel-collector:4318), or \"\" for no traces",
            );
        }
        if !(t.sample_ratio.is_finite() && (0.0..=1.0).contains(&t.sample_ratio)) {
            err("telemetry.sample_ratio".into(), "must be between 0 and 1");
        }
        if t.service_name.is_empty() {
            err("telemetry.service_name".into(), "must not be empty");
        }
        if !(1..=1_000_000).contains(&t.max_queue_size) {
            err(
                "telemetry.max_queue_size".into(),
                "must be between 1 and 1000000",
            );
        }
        if t.max_export_batch_size == 0 || t.max_export_batch_size > t.max_queue_size {
            err(
                "telemetry.max_export_batch_size".into(),
                "must be > 0 and <= telemetry.max_queue_size",
            );
        }
        if !(1..=600_000).contains(&t.export_interval_ms) {
            err(
                "telemetry.export_interval_ms".into(),
                "must be between 1 and 600000",
            );
        }
        if !(1..=600_000).contains(&t.export_timeout_ms) {
            err(
                "telemetry.export_timeout_ms".into(),
                "must be between 1 and 600000",
            );
        }
    }
}

/// Why a configured path is not in normal form (`None` when it is). A `/p/*` wildcard's prefix
/// keeps its trailing slash whatever `pricing.trailing_slash` says.
fn not_normal(path: &str, trailing: TrailingSlash) -> Option<String> {
    let (checked, trailing, suffix) = match path.strip_suffix('*') {
        Some(prefix) => (prefix, TrailingSlash::Keep, "*"),
        None => (path, trailing, ""),
    };
    if is_normal(checked, trailing) {
        return None;
    }
    Some(match crate::endpoint::Endpoint::parse(checked, trailing) {
        Ok(normal) => format!(
            "must be in normal form (requests are priced in it; see pricing.trailing_slash): \
             write {normal}{suffix}"
        ),
        Err(e) => e.to_string(),
    })
}

const METHODS: &[&str] = &[
    "*", "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
];

impl Config {
    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let message = inner.message().to_owned();
            ConfigError::Parse(match inner.span() {
                Some(span) => {
                    let line = text[..span.start].lines().count().max(1);
                    format!("{path}: {message} (line {line})")
                }
                None => format!("{path}: {message}"),
            })
        })?;
        let errors = config.validate();
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }

    /// Every semantic error, with its field path.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let mut err = |path: String, message: &str| {
            errors.push(FieldError {
                path,
                message: message.to_owned(),
            });
        };
        let positive = |v: f64| v.is_finite() && v > 0.0;
        let non_negative = |v: f64| v.is_finite() && v >= 0.0;

        if self.server.key_header.is_empty()
            || axum::http::HeaderName::try_from(self.server.key_header.as_str()).is_err()
        {
            err(
                "server.key_header".into(),
                "must be a valid HTTP header name",
            );
        }
        if !(400..=499).contains(&self.server.auth_deny_status) {
            err("server.auth_deny_status".into(), "must be a 4xx status");
        }
        if self.server.max_body_bytes == 0 {
            err("server.max_body_bytes".into(), "must be > 0");
        }
        if !(1..=600_000).contains(&self.server.header_read_timeout_ms) {
            err(
                "server.header_read_timeout_ms".into(),
                "must be between 1 and 600000",
            );
        }
        if !(1..=86_400_000).contains(&self.server.idle_timeout_ms) {
            err(
                "server.idle_timeout_ms".into(),
                "must be between 1 and 86400000",
            );
        }
        if !(1..=1_000_000).contains(&self.server.max_connections) {
            err(
                "server.max_connections".into(),
                "must be between 1 and 1000000",
            );
        }
        if self.store.connections == 0 || self.store.connections > 64 {
            err("store.connections".into(), "must be between 1 and 64");
        }
        if self.store.timeout_ms == 0 {
            err("store.timeout_ms".into(), "must be > 0");
        }
        if self.store.watch_interval_ms < 100 {
            err("store.watch_interval_ms".into(), "must be at least 100");
        }
        if self.store.connect_timeout_ms == 0 {
            err("store.connect_timeout_ms".into(), "must be > 0");
        }
        if !self.store.redis_url.is_empty() && !self.store.redis_cluster.is_empty() {
            err(
                "store.redis_cluster".into(),
                "set either store.redis_url (one Redis) or store.redis_cluster (seed nodes), not both",
            );
        }
        for (i, url) in self.store.redis_cluster.iter().enumerate() {
            if !(url.starts_with("redis://") || url.starts_with("rediss://"))
                || redis::Client::open(url.as_str()).is_err()
            {
                err(
                    format!("store.redis_cluster[{i}]"),
                    "must be a redis:// or rediss:// URL of a cluster node",
                );
            }
        }
        if self.store.wait_replicas > 16 {
            err("store.wait_replicas".into(), "must be between 0 and 16");
        }
        if self.store.wait_replicas > 0 && self.store.timeout_ms < 300 {
            err(
                "store.timeout_ms".into(),
                "must be >= 300 with store.wait_replicas: WAIT gets timeout_ms - 150 ms, and Redis \
                 times it out on its 100 ms timer",
            );
        }
        if self.store.breaker_failures == 0 {
            err("store.breaker_failures".into(), "must be > 0");
        }
        if self.store.breaker_open_ms == 0 {
            err("store.breaker_open_ms".into(), "must be > 0");
        }
        if self.store.settle_ttl_secs == Some(0) {
            err("store.settle_ttl_secs".into(), "must be > 0");
        }
        if self.store.idempotency_ttl_secs == 0 {
            err("store.idempotency_ttl_secs".into(), "must be > 0");
        }
        if self.store.local_nodes > 10_000 {
            err("store.local_nodes".into(), "must be between 0 and 10000");
        }
        if !(100..=600_000).contains(&self.store.heartbeat_ms) {
            err(
                "store.heartbeat_ms".into(),
                "must be between 100 and 600000",
            );
        }
        // At least one record per shard of the embedded store (`store::memory::SHARDS`).
        if !(64..=1_000_000_000).contains(&self.store.memory_max_records) {
            err(
                "store.memory_max_records".into(),
                "must be between 64 and 1000000000",
            );
        }
        if !(1..=10_000_000).contains(&self.store.local_max_keys) {
            err(
                "store.local_max_keys".into(),
                "must be between 1 and 10000000",
            );
        }
        if !self.store.redis_url.is_empty()
            && redis::Client::open(self.store.redis_url.as_str()).is_err()
        {
            err("store.redis_url".into(), "is not a valid redis:// URL");
        }
        if self.budget.unknown_keys == UnknownKeyPolicy::DefaultTier
            && !self.tiers.contains_key(&self.budget.default_tier)
        {
            err("budget.default_tier".into(), "names no tier in [tiers]");
        }
        if !non_negative(self.budget.active_window_secs) {
            err("budget.active_window_secs".into(), "must be a number >= 0");
        }
        if !positive(self.budget.max_units) {
            err("budget.max_units".into(), "must be > 0");
        }
        if !positive(self.budget.min_units) || self.budget.min_units > self.budget.max_units {
            err(
                "budget.min_units".into(),
                "must be > 0 and <= budget.max_units",
            );
        }
        if !positive(self.budget.operational.capacity) {
            err("budget.operational.capacity".into(), "must be > 0");
        }
        if !positive(self.budget.operational.refill_per_sec) {
            err("budget.operational.refill_per_sec".into(), "must be > 0");
        }
        if self.tiers.is_empty() {
            err("tiers".into(), "at least one tier is required");
        }
        let mut members: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
        for (name, shared) in &self.shared_budgets {
            let p = |field: &str| format!("shared_budgets.{name}.{field}");
            if !is_name(name) {
                err(
                    format!("shared_budgets.{name}"),
                    "shared budget names are 1-64 of [a-z0-9_-]",
                );
            }
            if !self.tiers.contains_key(&shared.tier) {
                err(p("tier"), &format!("no tier {:?} in [tiers]", shared.tier));
            }
            if shared.keys.is_empty() || shared.keys.len() > 100_000 {
                err(p("keys"), "1 to 100000 key hashes");
            }
            for k in &shared.keys {
                if k.len() != 64 || !k.bytes().all(|b| b.is_ascii_hexdigit()) {
                    err(
                        p("keys"),
                        &format!(
                            "{k:?} is not a SHA-256 in hex (64 digits; `enforcer keys hash` \
                             prints it): raw keys never go into the config"
                        ),
                    );
                } else if let Some(other) = members.insert(k.as_str(), name.as_str()) {
                    err(
                        p("keys"),
                        &format!("key {k} is in shared budget {other:?} already"),
                    );
                }
            }
            if let Some(l) = shared.key_limit
                && !(positive(l.max_tokens)
                    && l.max_tokens <= 1e15
                    && positive(l.refill_per_sec)
                    && l.refill_per_sec <= 1e15)
            {
                err(
                    p("key_limit"),
                    "max_tokens and refill_per_sec must be > 0 and <= 1e15",
                );
            }
        }
        for (name, tier) in &self.tiers {
            let p = |field: &str| format!("tiers.{name}.{field}");
            if !is_name(name) {
                err(format!("tiers.{name}"), "tier names are 1-64 of [a-z0-9_-]");
            }
            if !positive(tier.max_tokens) || tier.max_tokens > 1e15 {
                err(p("max_tokens"), "must be > 0 and <= 1e15");
            }
            if !non_negative(tier.refill_per_sec) {
                err(p("refill_per_sec"), "must be a number >= 0");
            }
            if !(tier.idle_cap.is_finite() && (0.0..=1.0).contains(&tier.idle_cap)) {
                err(p("idle_cap"), "must be between 0 and 1");
            }
            if let Some(initial) = tier.initial_tokens
                && !(non_negative(initial) && initial <= tier.max_tokens)
            {
                err(p("initial_tokens"), "must be between 0 and max_tokens");
            }
            if let Some(ceiling) = tier.grant_ceiling
                && !(ceiling.is_finite() && ceiling >= tier.max_tokens && ceiling <= 1e15)
            {
                err(p("grant_ceiling"), "must be between max_tokens and 1e15");
            }
            if tier.low_balance.len() > 8
                || tier
                    .low_balance
                    .iter()
                    .any(|f| !(f.is_finite() && (0.0..=1.0).contains(f)))
            {
                err(
                    p("low_balance"),
                    "at most 8 thresholds, each a fraction of max_tokens between 0 and 1",
                );
            }
            if let Some(Err(errors)) = tier.quota.as_ref().map(|q| q.build()) {
                for e in errors {
                    err(p(&format!("quota.{}", e.field)), &e.message);
                }
            }
        }
        if !positive(self.pricing.default_cost) {
            err("pricing.default_cost".into(), "must be > 0");
        }
        check_endpoints(
            &mut err,
            "pricing.endpoints",
            &self.pricing.endpoints,
            &self.pricing,
            false,
        );
        for (name, domain) in &self.pricing.domains {
            let at = format!("pricing.domains.{name}");
            if name.is_empty() || name.len() > 128 || name.bytes().any(|b| b.is_ascii_control()) {
                err(
                    at.clone(),
                    "a domain name must be 1-128 printable characters",
                );
            }
            if let Some(cost) = domain.default_cost
                && !positive(cost)
            {
                err(format!("{at}.default_cost"), "must be > 0");
            }
            check_endpoints(
                &mut err,
                &format!("{at}.endpoints"),
                &domain.endpoints,
                &self.pricing,
                true,
            );
        }
        let e = &self.envoy;
        for (field, value) in [
            ("path_entry", &e.path_entry),
            ("method_entry", &e.method_entry),
            ("address_entry", &e.address_entry),
            ("request_id_entry", &e.request_id_entry),
        ] {
            if value.is_empty() {
                err(format!("envoy.{field}"), "must not be empty");
            }
        }
        if e.key_entries.is_empty() || e.key_entries.iter().any(String::is_empty) {
            err(
                "envoy.key_entries".into(),
                "must name at least one descriptor entry, none empty",
            );
        }
        if !e.settle_marker.is_empty() {
            match e.settle_marker() {
                None => err(
                    "envoy.settle_marker".into(),
                    "must be \"entry=value\" (both not empty), or \"\" for none",
                ),
                // The marker's entry carrying a key, a path or an id would make ordinary checks
                // settles (or settles unreadable).
                Some((entry, _))
                    if e.key_entries.iter().any(|k| k == entry)
                        || [
                            &e.path_entry,
                            &e.method_entry,
                            &e.address_entry,
                            &e.request_id_entry,
                        ]
                        .iter()
                        .any(|n| n.as_str() == entry) =>
                {
                    err(
                        "envoy.settle_marker".into(),
                        "its entry must not be one of the key, path, method, address or \
                         request id entries",
                    );
                }
                Some(_) => {}
            }
        }
        if !self.alerts.webhook_url.is_empty()
            && !self
                .alerts
                .webhook_url
                .parse::<axum::http::Uri>()
                .is_ok_and(|u| {
                    matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
                })
        {
            err(
                "alerts.webhook_url".into(),
                "must be an http:// or https:// URL with a host",
            );
        }
        if !self.alerts.ca_file.is_empty() && !self.alerts.webhook_url.starts_with("https://") {
            err(
                "alerts.ca_file".into(),
                "is for an https:// alerts.webhook_url only",
            );
        }
        if self.alerts.max_attempts == 0 || self.alerts.max_attempts > 100 {
            err("alerts.max_attempts".into(), "must be between 1 and 100");
        }
        if self.alerts.timeout_ms == 0 || self.alerts.retry_ms == 0 || self.alerts.queue == 0 {
            err(
                "alerts".into(),
                "timeout_ms, retry_ms and queue must be > 0",
            );
        }
        if !(self.alerts.rearm_margin.is_finite()
            && (0.0..=1.0).contains(&self.alerts.rearm_margin))
        {
            err("alerts.rearm_margin".into(), "must be between 0 and 1");
        }
        if !self.server.admin_socket.is_empty()
            && !std::path::Path::new(&self.server.admin_socket).is_absolute()
        {
            err(
                "server.admin_socket".into(),
                "must be an absolute path (or \"\" for no admin socket)",
            );
        }
        if !self.server.grpc_listen.is_empty() && self.server.grpc_addr().is_none() {
            err(
                "server.grpc_listen".into(),
                "must be an address such as 127.0.0.1:8081, or \"\" to serve no gRPC",
            );
        }
        let pr = &self.pricing;
        if !(pr.alpha > 0.0 && pr.alpha <= 1.0) {
            err("pricing.alpha".into(), "must be > 0 and <= 1");
        }
        if !(10..=3_600_000).contains(&pr.interval_ms) {
            err(
                "pricing.interval_ms".into(),
                "must be between 10 and 3600000",
            );
        }
        if !(positive(pr.floor) && pr.floor <= 1.0) {
            err("pricing.floor".into(), "must be > 0 and <= 1");
        }
        if !(pr.cap >= 1.0 && pr.cap.is_finite()) {
            err("pricing.cap".into(), "must be >= 1");
        }
        let w = &pr.weights;
        if ![w.cpu, w.memory, w.load].into_iter().all(non_negative)
            || w.cpu + w.memory + w.load <= 0.0
        {
            err("pricing.weights".into(), "must be >= 0 with a positive sum");
        }
        let sg = &pr.surge;
        let surge_ok = positive(sg.threshold)
            && positive(sg.span)
            && sg.base >= 1.0
            && sg.max >= 1.0
            && sg.base.is_finite()
            && sg.max.is_finite();
        if !surge_ok {
            err(
                "pricing.surge".into(),
                "threshold and span must be > 0, base and max >= 1",
            );
        }
        if ![pr.node.cpu, pr.node.memory, pr.node.load]
            .into_iter()
            .all(positive)
        {
            err("pricing.node".into(), "references must be > 0");
        }
        if pr.proc_root.is_empty() {
            err(
                "pricing.proc_root".into(),
                "must be a directory laid out like /proc",
            );
        }
        for (field, msg) in pr.prometheus.problems("pricing.prometheus") {
            err(field, &msg);
        }
        for (i, iface) in self.kernel.interfaces.iter().enumerate() {
            if iface.is_empty() || iface.len() > 15 || iface.contains('/') {
                err(
                    format!("kernel.interfaces[{i}]"),
                    "is not a valid interface name",
                );
            }
        }
        if !self.kernel.interfaces.is_empty() && self.kernel.protect_ports.is_empty() {
            err(
                "kernel.protect_ports".into(),
                "at least one port is required with interfaces",
            );
        }
        for (i, port) in self.kernel.protect_ports.iter().enumerate() {
            if *port == 0 {
                err(format!("kernel.protect_ports[{i}]"), "must be 1-65535");
            }
        }
        if self.kernel.action != "drop" && self.kernel.action != "reset" {
            err("kernel.action".into(), "must be \"drop\" or \"reset\"");
        }
        if self.kernel.bind_after > 1000 {
            err("kernel.bind_after".into(), "must be 0-1000");
        }
        if !(1..=60_000).contains(&self.kernel.max_staleness_ms) {
            err(
                "kernel.max_staleness_ms".into(),
                "must be between 1 and 60000",
            );
        }
        let header = self.kernel_key_header();
        if header.len() + 2 > enforcer_common::MAX_PATTERN
            || axum::http::HeaderName::try_from(header).is_err()
        {
            err(
                "kernel.key_header".into(),
                "must be a header name of at most 46 bytes",
            );
        }
        if self.kernel.value_prefix.len() > enforcer_common::MAX_PREFIX {
            err("kernel.value_prefix".into(), "must be at most 16 bytes");
        }
        if self.kernel.pin_dir.is_empty() {
            err(
                "kernel.pin_dir".into(),
                "must be a directory on a bpf filesystem",
            );
        }
        let l = &self.ledger;
        let postgres_url = l.database_url.starts_with("postgres://")
            || l.database_url.starts_with("postgresql://");
        if !l.database_url.is_empty() && !postgres_url {
            err(
                "ledger.database_url".into(),
                "must be a postgres:// or postgresql:// URL",
            );
        }
        if l.file.is_empty() {
            err("ledger.file".into(), "must be a file path");
        }
        if l.queue_capacity < l.batch_rows || l.batch_rows == 0 {
            err(
                "ledger.queue_capacity".into(),
                "must be at least ledger.batch_rows, which must be > 0",
            );
        }
        if l.flush_ms == 0 || l.write_timeout_ms == 0 || l.retry_ms == 0 {
            err(
                "ledger.flush_ms".into(),
                "flush_ms, write_timeout_ms and retry_ms must be > 0",
            );
        }
        if !(1..=crate::ledger::postgres::MAX_PARALLEL).contains(&l.connections) {
            err("ledger.connections".into(), "must be between 1 and 8");
        }
        if l.partitions_ahead > 24 {
            err("ledger.partitions_ahead".into(), "must be at most 24");
        }
        if l.expiry_lookback_secs == 0 || l.expiry_lookback_secs > 366 * 86_400 {
            err(
                "ledger.expiry_lookback_secs".into(),
                "must be between 1 and 31622400 (366 days)",
            );
        }
        if !(1..=1_000_000).contains(&l.expiry_batch) {
            err(
                "ledger.expiry_batch".into(),
                "must be between 1 and 1000000",
            );
        }
        if l.file_max_bytes != 0 && l.file_max_bytes < MIN_FILE_MAX_BYTES {
            err(
                "ledger.file_max_bytes".into(),
                "must be 0 (never rotate by size) or at least 1024",
            );
        }
        if l.file_max_age_secs > 366 * 86_400 {
            err(
                "ledger.file_max_age_secs".into(),
                "must be at most 31622400 (366 days); 0: never rotate by age",
            );
        }
        if !(1..=10_000).contains(&l.file_keep) {
            err("ledger.file_keep".into(), "must be between 1 and 10000");
        }
        self.telemetry.check(&mut err);
        errors.extend(crate::shadow::validate(self));
        errors
    }

    /// The header the kernel gate reads keys from.
    pub fn kernel_key_header(&self) -> &str {
        if self.kernel.key_header.is_empty() {
            &self.server.key_header
        } else {
            &self.kernel.key_header
        }
    }

    /// The budget policy the token stores apply.
    pub fn budget_policy(&self) -> BudgetPolicy {
        let tiers = self
            .tiers
            .iter()
            .map(|(name, t)| Tier {
                name: name.clone(),
                bucket: BucketParams {
                    max_tokens: t.max_tokens,
                    refill_per_sec: t.refill_per_sec,
                    idle_cap: t.idle_cap,
                    initial_tokens: t.initial_tokens.unwrap_or(t.idle_cap * t.max_tokens),
                },
                shadow: t.shadow,
                grant_ceiling: t.grant_ceiling.unwrap_or(t.max_tokens),
                low_balance: t.low_balance.clone(),
                // validate() refused a quota that does not build.
                quota: t.quota.as_ref().and_then(|q| q.build().ok()),
            })
            .collect();
        let ops = &self.budget.operational;
        BudgetPolicy {
            tiers,
            unknown_keys: match self.budget.unknown_keys {
                UnknownKeyPolicy::DefaultTier => {
                    UnknownKeys::DefaultTier(self.budget.default_tier.clone())
                }
                UnknownKeyPolicy::Reject => UnknownKeys::Reject,
            },
            active_window: Duration::from_secs_f64(self.budget.active_window_secs),
            idempotency_ttl: Duration::from_secs(self.store.idempotency_ttl_secs),
            settle_ttl: Duration::from_secs(
                self.store
                    .settle_ttl_secs
                    .unwrap_or(self.store.idempotency_ttl_secs),
            ),
            remember_generated_ids: self.store.remember_generated_ids,
            operational: BucketParams {
                max_tokens: ops.capacity,
                refill_per_sec: ops.refill_per_sec,
                idle_cap: 1.0,
                initial_tokens: ops.capacity,
            },
            shared: crate::budget::SharedBudgets::new(
                self.shared_budgets
                    .iter()
                    .map(|(name, b)| crate::budget::SharedBudget {
                        name: name.clone(),
                        tier: b.tier.clone(),
                        key_limit: b.key_limit.map(|l| BucketParams {
                            max_tokens: l.max_tokens,
                            refill_per_sec: l.refill_per_sec,
                            idle_cap: 1.0,
                            initial_tokens: l.max_tokens,
                        }),
                        // validate() refused keys that are not hex SHA-256s.
                        keys: b
                            .keys
                            .iter()
                            .filter_map(|k| crate::key::KeyHash::from_hex(k))
                            .collect(),
                    })
                    .collect(),
            ),
            candidate: crate::shadow::candidate_buckets(self),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_budgets_name_a_tier_hashed_keys_each_once_and_a_sane_key_limit() {
        let h = "ab".repeat(32);
        let ok = Config::parse(&format!(
            "[shared_budgets.acme]\ntier = \"free\"\nkeys = [\"{h}\"]\n\
             key_limit = {{ max_tokens = 100, refill_per_sec = 2 }}\n"
        ))
        .expect("valid");
        let policy = ok.budget_policy();
        let member = crate::key::KeyHash::from_hex(&h).expect("hash");
        assert_eq!(
            policy.shared.of(&member).map(|b| b.name.as_str()),
            Some("acme")
        );
        let bad = Config::parse(&format!(
            "[shared_budgets.acme]\ntier = \"gold\"\nkeys = [\"raw-api-key\", \"{h}\"]\n\
             key_limit = {{ max_tokens = 0, refill_per_sec = 2 }}\n\
             [shared_budgets.other]\ntier = \"free\"\nkeys = [\"{h}\"]\n"
        ))
        .expect_err("invalid");
        let text = bad.to_string();
        for what in [
            "shared_budgets.acme.tier",
            "raw keys never go into the config",
            "shared_budgets.acme.key_limit",
            "is in shared budget \"acme\" already",
        ] {
            assert!(text.contains(what), "{what}: {text}");
        }
    }

    #[test]
    fn empty_file_is_a_working_config() {
        let c = Config::parse("").expect("empty config is valid");
        assert_eq!(c.server.listen.port(), 8080);
        assert_eq!(
            c.budget_policy()
                .tier("free")
                .map(|t| t.bucket.initial_tokens),
            Some(800.0)
        );
    }

    #[test]
    fn envoy_domains_and_grpc_listen_are_checked() {
        let text = r#"
            [server]
            grpc_listen = "localhost"
            [envoy]
            key_entries = []
            path_entry = ""
            settle_marker = "done"
            [[pricing.domains.premium.endpoints]]
            path = "/v1/x"
            base_cost = 0
            [[pricing.domains.premium.endpoints]]
            path = "/v1/y"
            cpu_query = "up"
        "#;
        let Err(ConfigError::Invalid(errors)) = Config::parse(text) else {
            panic!("config should be invalid");
        };
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        for expected in [
            "server.grpc_listen",
            "envoy.key_entries",
            "envoy.path_entry",
            "envoy.settle_marker",
            "pricing.domains.premium.endpoints[0].base_cost",
            "pricing.domains.premium.endpoints[1].cpu_query",
        ] {
            assert!(
                paths.contains(&expected),
                "{expected} missing from {paths:?}"
            );
        }
        // "" turns gRPC off; the default serves it on 8081.
        let off = Config::parse("[server]\ngrpc_listen = \"\"\n").expect("valid");
        assert_eq!(off.server.grpc_addr(), None);
        assert_eq!(
            Config::default().server.grpc_addr(),
            Some(SocketAddr::from(([127, 0, 0, 1], 8081)))
        );
    }

    #[test]
    fn the_envoy_settle_marker_is_an_entry_and_a_value_apart_from_the_other_entries() {
        assert_eq!(
            Config::default().envoy.settle_marker(),
            Some(("enforcer_phase", "done"))
        );
        let off = Config::parse("[envoy]\nsettle_marker = \"\"\n").expect("valid");
        assert_eq!(off.envoy.settle_marker(), None);
        for bad in ["=done", "phase=", "phase", "api_key=done", "request_id=x"] {
            let text = format!("[envoy]\nsettle_marker = \"{bad}\"\n");
            let Err(ConfigError::Invalid(errors)) = Config::parse(&text) else {
                panic!("settle_marker {bad:?} should be invalid");
            };
            assert!(
                errors.iter().any(|e| e.path == "envoy.settle_marker"),
                "{bad:?}: {errors:?}"
            );
        }
    }

    #[test]
    fn settle_terms_are_read_and_checked() {
        let ok = Config::parse(
            r#"
            [store]
            settle_ttl_secs = 30
            [[pricing.endpoints]]
            path = "/v1/generate"
            settle = "after"
            max_cost = 2000
            "#,
        )
        .expect("valid");
        assert_eq!(ok.pricing.endpoints[0].settle, SettleWhen::After);
        assert_eq!(ok.pricing.endpoints[0].max_cost, Some(2000.0));
        let policy = ok.budget_policy();
        assert_eq!(policy.settle_ttl, Duration::from_secs(30));
        assert_eq!(
            Config::parse("").expect("valid").budget_policy().settle_ttl,
            Duration::from_secs(600),
            "the idempotency ttl by default"
        );
        let Err(ConfigError::Invalid(errors)) = Config::parse(
            r#"
            [store]
            settle_ttl_secs = 0
            [[pricing.endpoints]]
            path = "/a"
            max_cost = 0
            [[pricing.endpoints]]
            path = "/health"
            operational = true
            settle = "after"
            "#,
        ) else {
            panic!("config should be invalid");
        };
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "store.settle_ttl_secs",
                "pricing.endpoints[0].max_cost",
                "pricing.endpoints[1].settle"
            ]
        );
        assert!(
            Config::parse("[[pricing.endpoints]]\npath = \"/a\"\nsettle = \"later\"\n").is_err()
        );
    }

    #[test]
    fn every_error_is_reported_with_its_path() {
        let text = r#"
            [budget]
            default_tier = "gold"
            [kernel]
            interfaces = ["eth0"]
            action = "refuse"
            bind_after = 1001
            [tiers.free]
            max_tokens = -1
            refill_per_sec = 10
            idle_cap = 2
            [pricing]
            alpha = 0
            floor = 2
            [pricing.surge]
            span = 0
            [[pricing.endpoints]]
            method = "get"
            path = "nope"
            base_cost = 0
            cpu_query = "up"
            [ledger]
            database_url = "mysql://x"
            connections = 0
        "#;
        let Err(ConfigError::Invalid(errors)) = Config::parse(text) else {
            panic!("config should be invalid");
        };
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        for expected in [
            "budget.default_tier",
            "tiers.free.max_tokens",
            "tiers.free.idle_cap",
            "kernel.protect_ports",
            "kernel.action",
            "kernel.bind_after",
            "pricing.endpoints[0].method",
            "pricing.endpoints[0].path",
            "pricing.endpoints[0].base_cost",
            "pricing.endpoints[0].cpu_query",
            "pricing.alpha",
            "pricing.floor",
            "pricing.surge",
            "ledger.database_url",
            "ledger.connections",
        ] {
            assert!(paths.contains(&expected), "missing {expected} in {paths:?}");
        }
    }

    #[test]
    fn configured_paths_must_be_in_normal_form() {
        let paths = |trailing: &str, paths: &[&str]| -> Vec<String> {
            let mut text = format!("[pricing]\ntrailing_slash = \"{trailing}\"\n");
            for p in paths {
                text.push_str(&format!("[[pricing.endpoints]]\npath = '{p}'\n"));
            }
            match Config::parse(&text) {
                Ok(_) => Vec::new(),
                Err(ConfigError::Invalid(errors)) => {
                    errors.into_iter().map(|e| e.to_string()).collect()
                }
                Err(e) => panic!("{e}"),
            }
        };
        let good = ["/a", "/a/b", "/a%2Fb", "/.well-known/x", "/v2/*", "/*", "/"];
        assert_eq!(paths("strip", &good), Vec::<String>::new());
        let errors = paths(
            "strip",
            &["/a/", "//a", "/a/./b", "/%61", "/a%2fb", "/x//*"],
        );
        assert_eq!(errors.len(), 6, "{errors:?}");
        assert!(errors[0].contains("write /a"), "{}", errors[0]);
        assert!(errors[4].contains("write /a%2Fb"), "{}", errors[4]);
        assert!(errors[5].contains("write /x/*"), "{}", errors[5]);
        assert_eq!(paths("keep", &["/a/", "/v2/*"]), Vec::<String>::new());
        let bad = paths("keep", &["/a%00", "/a%zz"]);
        assert!(bad[0].contains("control character"), "{bad:?}");
        assert!(bad[1].contains("two hex digits"), "{bad:?}");
        let err = Config::parse("[pricing]\ntrailing_slash = \"drop\"\n").expect_err("bad value");
        assert!(err.to_string().contains("pricing.trailing_slash"), "{err}");
    }

    #[test]
    fn fail_soft_settings_have_defaults_and_are_validated() {
        let c = Config::parse("[store]\non_store_failure = \"local\"\n").expect("valid");
        assert_eq!(c.store.on_store_failure, OnStoreFailure::Local);
        assert_eq!(
            (
                c.store.local_nodes,
                c.store.heartbeat_ms,
                c.store.local_max_keys
            ),
            (0, 2000, 100_000)
        );
        let text = "[store]\non_store_failure = \"local\"\nlocal_nodes = 10001\n\
                    heartbeat_ms = 99\nlocal_max_keys = 0\n";
        let Err(ConfigError::Invalid(errors)) = Config::parse(text) else {
            panic!("config should be invalid");
        };
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "store.local_nodes",
                "store.heartbeat_ms",
                "store.local_max_keys"
            ]
        );
        assert!(Config::parse("[store]\non_store_failure = \"locally\"\n").is_err());
    }

    #[test]
    fn connection_limits_and_proc_root_have_defaults_and_are_validated() {
        let c = Config::parse("").expect("defaults");
        let s = &c.server;
        assert_eq!(
            (
                s.header_read_timeout_ms,
                s.idle_timeout_ms,
                s.max_connections
            ),
            (5_000, 60_000, 10_000)
        );
        assert_eq!(c.pricing.proc_root, "/proc");
        let text = "[server]\nheader_read_timeout_ms = 0\nidle_timeout_ms = 0\n\
                    max_connections = 0\n[pricing]\nproc_root = \"\"\n";
        let Err(ConfigError::Invalid(errors)) = Config::parse(text) else {
            panic!("config should be invalid");
        };
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "server.header_read_timeout_ms",
                "server.idle_timeout_ms",
                "server.max_connections",
                "pricing.proc_root"
            ]
        );
    }

    #[test]
    fn trusted_proxies_default_to_none_and_bad_entries_name_their_path() {
        let c = Config::parse("").expect("defaults");
        assert!(c.server.trusted_proxies.is_empty());
        let c = Config::parse(
            "[server]\ntrusted_proxies = [\"127.0.0.1\", \"10.0.0.0/8\", \"fd00::/8\"]\n",
        )
        .expect("valid networks");
        let shown: Vec<_> = c
            .server
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(shown, ["127.0.0.1/32", "10.0.0.0/8", "fd00::/8"]);
        for (entry, says) in [
            ("10.0.0.1/8", "write 10.0.0.0/8"),
            ("0.0.0.0/0", "trusts every peer"),
            ("10.0.0.0/33", "prefix length must be 1-32"),
            ("localhost", "is not an IP network"),
        ] {
            let text = format!("[server]\ntrusted_proxies = [\"127.0.0.1\",\n  \"{entry}\"]\n");
            let err = Config::parse(&text).expect_err(entry).to_string();
            assert!(
                err.contains("server.trusted_proxies[1]") && err.contains(says),
                "{entry}: {err}"
            );
        }
    }

    #[test]
    fn unknown_fields_and_types_name_their_path() {
        let err = Config::parse("[store]\ntimeout_ms = \"fast\"\n").expect_err("bad type");
        assert!(err.to_string().contains("store.timeout_ms"), "{err}");
        let err = Config::parse("[server]\nlisten_on = 1\n").expect_err("unknown field");
        assert!(err.to_string().contains("listen_on"), "{err}");
    }
}
