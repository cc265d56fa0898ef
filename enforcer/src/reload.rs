//! Hot reload: what a reload may change, and how it is applied.
//!
//! A reload (SIGHUP, `enforcer reload` through the admin socket) re-reads the config file,
//! applies the command line's overrides again ([`Overrides`], exactly as `enforcer run` did at
//! start), validates the result and applies what may change while serving:
//!
//! - **live**: prices (the cost matrix, per-domain tables, `trailing_slash`), tiers, shadow
//!   (global and per tier), the shadow candidate policy (`[shadow]`), the rest of `[budget]`, `store.idempotency_ttl_secs`, `store.remember_generated_ids`, every
//!   pricing-engine setting (the engine is rebuilt over the new book; an endpoint that stays
//!   keeps its multiplier and telemetry, a new one starts at 1), the kernel gate's plan
//!   (`[kernel]` but its interfaces and pin dir): a new config generation, as
//!   docs/kernel-gate.md describes, and the ledger writers' `batch_rows`, `flush_ms`,
//!   `write_timeout_ms`, `retry_ms`, `partitions_ahead`, `retention_months`, the
//!   reservation expiry job's `expiry_*` settings and the embedded file's rotation
//!   (`file_max_bytes`, `file_max_age_secs`, `file_keep`);
//! - **restart required**: `[server]` (listener addresses and limits, key header, trusted
//!   proxies), `[store]` but the idempotency TTL (the store URL or cluster, timeouts, breaker,
//!   failure policy), `kernel.interfaces`, `kernel.pin_dir`, the rest of `[ledger]` (the
//!   database URL, the file, journal, fsync, the queue, the pool, the node name), `[envoy]`,
//!   `[alerts]` (the webhook's worker is set up once) and `[telemetry]` (the trace exporter is
//!   set up with the logs, before the daemon starts). A
//!   reload that changes them keeps the running values, lists them in
//!   [`ReloadReport::restart_required`] and logs a warning: never half-applied.
//!
//! Validation comes first: on any error nothing changes, and the error goes back to the
//! caller, to the log and to `enforcer_config_reload_total{result="error"}`. The parts are
//! then switched in an order that never lets the kernel over-price for long and undoes what
//! was switched when a later part refuses: the store's policy, the kernel plan (acknowledged
//! by the sync task), the pricing worker, then the decisions' rules (one atomic swap, read
//! once per decision: decisions in flight finish under the rules they started with).
//! Connections, the token store's buckets and the ledger's queue are never touched.
//!
//! [`Reloader::set_shadow`] is the runtime shadow switch: a reload of the config now serving
//! with that one change. It lasts until the next reload or restart, which read the file.
use crate::config::{Config, ConfigError, FieldError, LedgerConfig};
use crate::decision::Rules;
use crate::decision::local::LocalBudget;
use crate::kernel::{GateLink, PlanError};
use crate::metrics::Metrics;
use crate::price::PriceBook;
use crate::pricing::{CostTable, PricingHandle, RepricingError};
use crate::store::{StoreError, TokenStore};
use arc_swap::ArcSwap;
use serde::Serialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How long a reload waits for the kernel sync task to write a new plan.
const PLAN_WAIT: Duration = Duration::from_secs(5);
/// How long a reload waits for the pricing worker (a round may be running: its telemetry
/// reads are bounded by their own timeouts).
const REPRICE_WAIT: Duration = Duration::from_secs(15);

/// What `enforcer run`'s command line overrides in the config file: applied at start and again
/// at every reload, so a reload never reverts a flag to the file's value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen`: `server.listen`.
    pub listen: Option<SocketAddr>,
    /// `--grpc-listen`: `server.grpc_listen`.
    pub grpc_listen: Option<String>,
    /// `--admin-socket`: `server.admin_socket`.
    pub admin_socket: Option<String>,
    /// `--redis-url`: `store.redis_url`.
    pub redis_url: Option<String>,
    /// `--redis-cluster` (non-empty): replaces `store.redis_cluster`.
    pub redis_cluster: Vec<String>,
    /// `--iface`: added to `kernel.interfaces`.
    pub interfaces: Vec<String>,
    /// `--protect-port`: added to `kernel.protect_ports`.
    pub protect_ports: Vec<u16>,
    /// `--pin-dir`: `kernel.pin_dir`.
    pub pin_dir: Option<String>,
    /// `--database-url`: `ledger.database_url`.
    pub database_url: Option<String>,
    /// `--migrate`: sets `ledger.migrate`.
    pub migrate: bool,
    /// `--ledger-file`: `ledger.file`.
    pub ledger_file: Option<String>,
    /// `--otlp-endpoint` (`ENFORCER_OTLP_ENDPOINT`): `telemetry.otlp_endpoint`.
    pub otlp_endpoint: Option<String>,
}

impl Overrides {
    /// Applies the overrides to `config` (read from the file or the defaults).
    pub fn apply(&self, config: &mut Config) {
        if let Some(listen) = self.listen {
            config.server.listen = listen;
        }
        if let Some(grpc) = &self.grpc_listen {
            config.server.grpc_listen.clone_from(grpc);
        }
        if let Some(socket) = &self.admin_socket {
            config.server.admin_socket.clone_from(socket);
        }
        if let Some(url) = &self.redis_url {
            config.store.redis_url.clone_from(url);
        }
        if !self.redis_cluster.is_empty() {
            config.store.redis_cluster.clone_from(&self.redis_cluster);
        }
        config
            .kernel
            .interfaces
            .extend(self.interfaces.iter().cloned());
        config
            .kernel
            .protect_ports
            .extend(self.protect_ports.iter().copied());
        if let Some(dir) = &self.pin_dir {
            config.kernel.pin_dir.clone_from(dir);
        }
        if let Some(url) = &self.database_url {
            config.ledger.database_url.clone_from(url);
        }
        if self.migrate {
            config.ledger.migrate = true;
        }
        if let Some(file) = &self.ledger_file {
            config.ledger.file.clone_from(file);
        }
        if let Some(endpoint) = &self.otlp_endpoint {
            config.telemetry.otlp_endpoint.clone_from(endpoint);
        }
    }
}

/// Where the daemon's config comes from: a file (or the built-in defaults) and the command
/// line's overrides.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    /// The config file; `None`: the built-in defaults (nothing to reload).
    pub path: Option<PathBuf>,
    /// The command line's overrides.
    pub overrides: Overrides,
}

impl ConfigSource {
    /// Reads the file (or the defaults), applies the overrides and validates the result.
    pub fn load(&self) -> Result<Config, ReloadError> {
        let mut config = match &self.path {
            Some(path) => Config::load(path).map_err(|error| ReloadError::File {
                path: path.clone(),
                error,
            })?,
            None => Config::default(),
        };
        self.overrides.apply(&mut config);
        let errors = config.validate();
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ReloadError::Invalid(errors))
        }
    }
}

/// Why a reload (or a shadow switch) changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The daemon was started without `--config`: there is no file to read again.
    #[error(
        "the daemon was started without a config file (enforcer run --config FILE): there is nothing to reload"
    )]
    NoFile,
    /// The file cannot be read, is not TOML of the schema, or has invalid values (every one
    /// with its path, one per line).
    // Not a `source`: the message says it all, once (an error chain would repeat it).
    #[error("config {}: {error}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        error: ConfigError,
    },
    /// The settings with the command line's overrides (or with the running values of what
    /// needs a restart) are invalid; one per line, with its path.
    #[error("invalid settings:\n{}", .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<FieldError>),
    /// `set_shadow` named a tier the config does not have.
    #[error("no tier {tier:?} in the config (tiers: {})", known.join(", "))]
    UnknownTier {
        /// The name given.
        tier: String,
        /// The tiers there are.
        known: Vec<String>,
    },
    /// The token store refused the new policy.
    #[error("the token store refused the new budget policy: {0}")]
    Store(#[from] StoreError),
    /// The kernel gate did not take the new plan.
    #[error(transparent)]
    Kernel(#[from] PlanError),
    /// The pricing worker did not take the new prices.
    #[error(transparent)]
    Pricing(#[from] RepricingError),
}

/// What a reload (or a shadow switch) did.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    /// The config generation now serving (unchanged when nothing changed).
    pub generation: u64,
    /// Sections and fields that took effect (`pricing`, `tiers.pro`, `budget.shadow`, …).
    pub changed: Vec<String>,
    /// Fields that differ from the running values but only take effect after a restart.
    pub restart_required: Vec<String>,
    /// The kernel gate's config generation now, if a gate runs.
    pub kernel_generation: Option<u64>,
}

/// The running parts a reload switches.
#[derive(Debug)]
pub struct Parts {
    /// The decisions' rules ([`crate::decision::Decider::rules_switch`]).
    pub rules: Arc<ArcSwap<Rules>>,
    /// The token store (its budget policy).
    pub store: Arc<dyn TokenStore>,
    /// The fail-soft local buckets, with `on_store_failure = "local"`.
    pub local: Option<Arc<LocalBudget>>,
    /// The pricing worker; without it (tests that build an `App` by hand) prices are static.
    pub pricing: Option<PricingHandle>,
    /// The table `/v1/costs` serves.
    pub costs: CostTable,
    /// The kernel gate, when it runs.
    pub gate: Option<GateLink>,
    /// The audit ledger (its writers' batch size, flush and PostgreSQL timings).
    pub ledger: Option<crate::ledger::Ledger>,
    /// The daemon's metrics.
    pub metrics: Metrics,
}

/// Applies reloads and shadow switches, one at a time.
#[derive(Debug)]
pub struct Reloader {
    source: Option<ConfigSource>,
    current: ArcSwap<Config>,
    generation: AtomicU64,
    /// One change at a time: a reload and a shadow switch never interleave.
    lock: tokio::sync::Mutex<()>,
    parts: Parts,
}

/// The fields that take effect only at a restart, as `(name, differs)` of two configs.
fn restart_fields(a: &Config, b: &Config) -> Vec<String> {
    let mut out = Vec::new();
    macro_rules! fields {
        ($($section:ident . $field:ident),* $(,)?) => {
            $(
                if a.$section.$field != b.$section.$field {
                    out.push(concat!(stringify!($section), ".", stringify!($field)).to_owned());
                }
            )*
        };
    }
    fields!(
        server.listen,
        server.grpc_listen,
        server.key_header,
        server.auth_deny_status,
        server.max_body_bytes,
        server.header_read_timeout_ms,
        server.idle_timeout_ms,
        server.max_connections,
        server.trusted_proxies,
        store.redis_url,
        store.redis_cluster,
        store.wait_replicas,
        store.redis_module,
        store.connections,
        store.timeout_ms,
        store.connect_timeout_ms,
        store.on_store_failure,
        store.breaker_failures,
        store.breaker_open_ms,
        store.local_nodes,
        store.heartbeat_ms,
        store.local_max_keys,
        kernel.interfaces,
        kernel.pin_dir,
        ledger.database_url,
        ledger.migrate,
        ledger.file,
        ledger.fsync,
        ledger.journal,
        ledger.queue_capacity,
        ledger.connections,
        ledger.node,
    );
    if a.envoy != b.envoy {
        out.push("envoy".to_owned());
    }
    // The exporter and the tracing subscriber are set up once, before the daemon starts.
    if a.telemetry != b.telemetry {
        out.push("telemetry".to_owned());
    }
    // The webhook's worker, its client and the re-arm margin are set up once, at start.
    if a.alerts != b.alerts {
        out.push("alerts".to_owned());
    }
    out
}

/// `file` with the running values (from `running`) of everything that needs a restart.
fn effective(running: &Config, file: &Config) -> Config {
    let mut next = file.clone();
    next.server = running.server.clone();
    next.store = running.store.clone();
    next.store.idempotency_ttl_secs = file.store.idempotency_ttl_secs;
    next.store.settle_ttl_secs = file.store.settle_ttl_secs;
    next.store.remember_generated_ids = file.store.remember_generated_ids;
    next.kernel.interfaces = running.kernel.interfaces.clone();
    next.kernel.pin_dir = running.kernel.pin_dir.clone();
    next.ledger = LedgerConfig {
        batch_rows: file.ledger.batch_rows,
        flush_ms: file.ledger.flush_ms,
        write_timeout_ms: file.ledger.write_timeout_ms,
        retry_ms: file.ledger.retry_ms,
        partitions_ahead: file.ledger.partitions_ahead,
        retention_months: file.ledger.retention_months,
        expiry_interval_ms: file.ledger.expiry_interval_ms,
        expiry_grace_ms: file.ledger.expiry_grace_ms,
        expiry_lookback_secs: file.ledger.expiry_lookback_secs,
        expiry_batch: file.ledger.expiry_batch,
        file_max_bytes: file.ledger.file_max_bytes,
        file_max_age_secs: file.ledger.file_max_age_secs,
        file_keep: file.ledger.file_keep,
        ..running.ledger.clone()
    };
    next.envoy = running.envoy.clone();
    next.telemetry = running.telemetry.clone();
    next.alerts = running.alerts.clone();
    next
}

/// What differs between two configs that a reload applies: section or field names.
fn live_changes(a: &Config, b: &Config) -> Vec<String> {
    let mut out = Vec::new();
    if a.pricing != b.pricing {
        out.push("pricing".to_owned());
    }
    // The shadow candidate policy: its prices in the rules, its buckets in the store's policy.
    if a.shadow != b.shadow {
        out.push("shadow".to_owned());
    }
    let names: std::collections::BTreeSet<&String> = a.tiers.keys().chain(b.tiers.keys()).collect();
    for name in names {
        match (a.tiers.get(name), b.tiers.get(name)) {
            (Some(x), Some(y)) if x == y => {}
            (Some(x), Some(y)) if x.shadow != y.shadow => {
                let mut same = x.clone();
                same.shadow = y.shadow;
                out.push(format!("tiers.{name}.shadow"));
                if &same != y {
                    out.push(format!("tiers.{name}"));
                }
            }
            _ => out.push(format!("tiers.{name}")),
        }
    }
    macro_rules! fields {
        ($($section:ident . $field:ident),* $(,)?) => {
            $(
                if a.$section.$field != b.$section.$field {
                    out.push(concat!(stringify!($section), ".", stringify!($field)).to_owned());
                }
            )*
        };
    }
    fields!(
        budget.shadow,
        budget.unknown_keys,
        budget.default_tier,
        budget.active_window_secs,
        budget.max_units,
        budget.min_units,
        budget.operational,
        store.idempotency_ttl_secs,
        store.remember_generated_ids,
        kernel.protect_ports,
        kernel.action,
        kernel.max_staleness_ms,
        kernel.key_header,
        kernel.value_prefix,
        kernel.bind_after,
        ledger.batch_rows,
        ledger.flush_ms,
        ledger.write_timeout_ms,
        ledger.retry_ms,
        ledger.partitions_ahead,
        ledger.retention_months,
        ledger.expiry_interval_ms,
        ledger.expiry_grace_ms,
        ledger.expiry_lookback_secs,
        ledger.expiry_batch,
        ledger.file_max_bytes,
        ledger.file_max_age_secs,
        ledger.file_keep,
    );
    out
}

impl Reloader {
    /// A reloader of `source` (`None`: [`Reloader::reload`] fails, shadow switches work) over
    /// the running parts, with `config` now serving as generation 1.
    pub fn new(source: Option<ConfigSource>, config: &Config, parts: Parts) -> Self {
        parts.metrics.config.generation.set(1);
        Self {
            source,
            current: ArcSwap::from_pointee(config.clone()),
            generation: AtomicU64::new(1),
            lock: tokio::sync::Mutex::new(()),
            parts,
        }
    }

    /// Re-reads the config file (re-applying the command line's overrides), validates it and
    /// applies it. On any error nothing changes and the error says why (every validation
    /// error, with its path).
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let _one = self.lock.lock().await;
        let result = match &self.source {
            None => Err(ReloadError::NoFile),
            Some(source) => match source.load() {
                Ok(file) => {
                    let running = self.current();
                    let next = effective(&running, &file);
                    let restart = restart_fields(&file, &next);
                    self.apply(next, restart).await
                }
                Err(e) => Err(e),
            },
        };
        self.count("reload", result)
    }

    /// Runtime shadow switch, global (`tier: None`, = `budget.shadow`) or one tier's, applied
    /// like a reload of the config now serving with that one change (the kernel plan
    /// included). It lasts until the next reload or restart, which read the file. An unknown
    /// tier is an error, and nothing changes.
    pub async fn set_shadow(
        &self,
        tier: Option<&str>,
        on: bool,
    ) -> Result<ReloadReport, ReloadError> {
        let _one = self.lock.lock().await;
        let mut next = (*self.current()).clone();
        let result = match tier {
            None => {
                next.budget.shadow = on;
                self.apply(next, Vec::new()).await
            }
            Some(name) => match next.tiers.get_mut(name) {
                Some(t) => {
                    t.shadow = on;
                    self.apply(next, Vec::new()).await
                }
                None => Err(ReloadError::UnknownTier {
                    tier: name.to_owned(),
                    known: next.tiers.keys().cloned().collect(),
                }),
            },
        };
        self.count("shadow switch", result)
    }

    /// The config now serving.
    pub fn current(&self) -> Arc<Config> {
        self.current.load_full()
    }

    /// 1 for the config the daemon started with, +1 per applied change.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Counts and logs the result.
    fn count(
        &self,
        what: &str,
        result: Result<ReloadReport, ReloadError>,
    ) -> Result<ReloadReport, ReloadError> {
        let metrics = &self.parts.metrics.config;
        match &result {
            Ok(report) => {
                metrics.reloads.with_label_values(&["ok"]).inc();
                tracing::info!(
                    what,
                    generation = report.generation,
                    changed = ?report.changed,
                    kernel_generation = ?report.kernel_generation,
                    "config applied"
                );
                if !report.restart_required.is_empty() {
                    tracing::warn!(
                        what,
                        fields = ?report.restart_required,
                        "these settings changed in the file but take effect only after a restart; the running values stay"
                    );
                }
            }
            Err(e) => {
                metrics.reloads.with_label_values(&["error"]).inc();
                tracing::error!(what, error = %e, "config not applied: the old config keeps serving");
            }
        }
        result
    }

    fn kernel_generation(&self) -> Option<u64> {
        self.parts
            .gate
            .as_ref()
            .map(|g| u64::from(g.plan().settings.generation))
    }

    /// Applies `next` (validated against what needs a restart already merged in).
    async fn apply(
        &self,
        next: Config,
        restart_required: Vec<String>,
    ) -> Result<ReloadReport, ReloadError> {
        let errors = next.validate();
        if !errors.is_empty() {
            return Err(ReloadError::Invalid(errors));
        }
        let running = self.current();
        let changed = live_changes(&running, &next);
        if changed.is_empty() {
            return Ok(ReloadReport {
                generation: self.generation(),
                changed,
                restart_required,
                kernel_generation: self.kernel_generation(),
            });
        }
        let p = &self.parts;
        let old_rules = p.rules.load_full();
        let policy = next.budget_policy();
        // Unchanged prices: the same book (a clone shares the multipliers the engine moves).
        // Else a new book, with the multipliers of the endpoints that stay (static prices have
        // none to keep).
        let book = if running.pricing == next.pricing {
            old_rules.prices.clone()
        } else {
            let book = PriceBook::new(&next.pricing);
            if next.pricing.dynamic && running.pricing.dynamic {
                book.carry_multipliers(&old_rules.prices);
            }
            book
        };

        // 1. The store's policy (a store that cannot take one refuses: nothing changed yet).
        let policy_changed = policy != old_rules.policy;
        if policy_changed {
            p.store.set_policy(&policy)?;
        }
        // 2. The kernel: a new generation (old snapshots stop counting) and price map, before
        //    userspace charges the new prices.
        let old_plan = p.gate.as_ref().map(GateLink::plan);
        let new_plan = crate::kernel::plan(&next);
        if let (Some(gate), Some(old)) = (&p.gate, &old_plan)
            && **old != new_plan
            && let Err(e) = gate.apply_plan(new_plan, PLAN_WAIT).await
        {
            self.undo_policy(policy_changed, &old_rules);
            return Err(e.into());
        }
        // 3. The pricing worker over the new book (its cost table follows).
        if running.pricing != next.pricing {
            match &p.pricing {
                Some(pricing) => {
                    if let Err(e) = pricing
                        .reprice(next.pricing.clone(), book.clone(), REPRICE_WAIT)
                        .await
                    {
                        self.undo_policy(policy_changed, &old_rules);
                        self.undo_plan(old_plan).await;
                        return Err(e.into());
                    }
                }
                None => p.costs.set_static(&book),
            }
        }
        // 4. The decisions: one swap; the ledger's writers from their next turn.
        if let Some(local) = &p.local
            && policy_changed
        {
            local.set_policy(&policy);
        }
        if let Some(ledger) = &p.ledger {
            ledger.retune(&next.ledger);
            // Reservations from now on carry the new deadline.
            ledger.set_settle_ttl(policy.settle_ttl);
        }
        p.rules.store(Arc::new(Rules::with_prices(&next, book)));
        self.current.store(Arc::new(next));
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        p.metrics
            .config
            .generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
        Ok(ReloadReport {
            generation,
            changed,
            restart_required,
            kernel_generation: self.kernel_generation(),
        })
    }

    fn undo_policy(&self, changed: bool, old: &Rules) {
        if changed && let Err(e) = self.parts.store.set_policy(&old.policy) {
            tracing::error!(error = %e, "restoring the token store's budget policy failed");
        }
    }

    async fn undo_plan(&self, old: Option<Arc<crate::kernel::KernelPlan>>) {
        if let (Some(gate), Some(old)) = (&self.parts.gate, old)
            && *gate.plan() != *old
            && let Err(e) = gate.apply_plan((*old).clone(), PLAN_WAIT).await
        {
            tracing::error!(error = %e, "restoring the kernel gate's plan failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_needs_a_restart_keeps_its_running_value_and_is_named() {
        let running = Config::default();
        let mut file = Config::default();
        file.server.listen = "127.0.0.1:9999".parse().expect("addr");
        file.store.redis_url = "redis://elsewhere:6379".into();
        file.store.idempotency_ttl_secs = 60;
        file.kernel.pin_dir = "/elsewhere".into();
        file.kernel.bind_after = 7;
        file.ledger.flush_ms = 5;
        file.ledger.fsync = !running.ledger.fsync;
        file.budget.shadow = true;
        let next = effective(&running, &file);
        assert_eq!(next.server.listen, running.server.listen);
        assert_eq!(next.store.redis_url, running.store.redis_url);
        assert_eq!(next.kernel.pin_dir, running.kernel.pin_dir);
        assert_eq!(next.ledger.fsync, running.ledger.fsync);
        assert_eq!(next.ledger.flush_ms, 5, "live");
        assert_eq!(next.store.idempotency_ttl_secs, 60, "live");
        assert_eq!(next.kernel.bind_after, 7, "live");
        assert!(next.budget.shadow, "live");
        assert_eq!(
            restart_fields(&file, &next),
            [
                "server.listen",
                "store.redis_url",
                "kernel.pin_dir",
                "ledger.fsync"
            ]
        );
        assert_eq!(
            live_changes(&running, &next),
            [
                "budget.shadow",
                "store.idempotency_ttl_secs",
                "kernel.bind_after",
                "ledger.flush_ms"
            ]
        );
    }

    #[test]
    fn telemetry_needs_a_restart() {
        let running = Config::default();
        let mut file = Config::default();
        file.telemetry.otlp_endpoint = "http://collector:4318".into();
        file.telemetry.sample_ratio = 0.5;
        let next = effective(&running, &file);
        assert_eq!(next.telemetry, running.telemetry);
        assert_eq!(restart_fields(&file, &next), ["telemetry"]);
        assert!(live_changes(&running, &next).is_empty());
    }

    #[test]
    fn alerts_need_a_restart() {
        let running = Config::default();
        let mut file = Config::default();
        file.alerts.webhook_url = "https://hooks.example/enforcer".into();
        file.alerts.ca_file = "/etc/enforcer/ca.pem".into();
        file.alerts.rearm_margin = 0.1;
        let next = effective(&running, &file);
        assert_eq!(next.alerts, running.alerts);
        assert_eq!(restart_fields(&file, &next), ["alerts"]);
        assert!(live_changes(&running, &next).is_empty());
    }

    #[test]
    fn tier_changes_are_named_by_tier_and_shadow() {
        let a = Config::parse(
            "[tiers.free]\nmax_tokens = 100\nrefill_per_sec = 1\n\
             [tiers.pro]\nmax_tokens = 1000\nrefill_per_sec = 10\n",
        )
        .expect("valid");
        let mut b = a.clone();
        if let Some(t) = b.tiers.get_mut("pro") {
            t.shadow = true;
        }
        assert_eq!(live_changes(&a, &b), ["tiers.pro.shadow"]);
        if let Some(t) = b.tiers.get_mut("pro") {
            t.max_tokens = 5.0;
        }
        b.tiers.remove("free");
        assert_eq!(
            live_changes(&a, &b),
            ["tiers.free", "tiers.pro.shadow", "tiers.pro"]
        );
    }

    /// A store that cannot change its policy (the trait's default).
    #[derive(Debug)]
    struct Fixed(crate::store::MemoryStore);

    #[async_trait::async_trait]
    impl TokenStore for Fixed {
        async fn debit(
            &self,
            d: &crate::store::Debit,
        ) -> Result<crate::store::DebitOutcome, StoreError> {
            self.0.debit(d).await
        }
        async fn refund(
            &self,
            key: &crate::key::KeyHash,
            id: &crate::key::RequestId,
        ) -> Result<crate::store::RefundOutcome, StoreError> {
            self.0.refund(key, id).await
        }
        async fn settle(
            &self,
            key: &crate::key::KeyHash,
            id: &crate::key::RequestId,
            cost: crate::store::TrueCost,
        ) -> Result<crate::store::SettleOutcome, StoreError> {
            self.0.settle(key, id, cost).await
        }
        async fn assign_tier(
            &self,
            key: &crate::key::KeyHash,
            tier: Option<&str>,
        ) -> Result<(), StoreError> {
            self.0.assign_tier(key, tier).await
        }
        async fn grant_with(
            &self,
            key: &crate::key::KeyHash,
            tokens: f64,
            id: &crate::key::RequestId,
            terms: crate::store::GrantTerms,
        ) -> Result<crate::store::GrantOutcome, StoreError> {
            self.0.grant_with(key, tokens, id, terms).await
        }
        async fn inspect(
            &self,
            key: &crate::key::KeyHash,
        ) -> Result<crate::store::KeyState, StoreError> {
            self.0.inspect(key).await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
        fn backend(&self) -> &'static str {
            "fixed"
        }
    }

    fn reloader(store: Arc<dyn TokenStore>) -> (Reloader, crate::decision::Decider, Metrics) {
        let config = Config::default();
        let metrics = Metrics::new();
        let decider = crate::decision::Decider::new(
            &config,
            store,
            metrics.clone(),
            crate::decision::event::Outbox::new(),
        );
        let costs = crate::pricing::static_costs(&decider.prices());
        let reloader = Reloader::new(
            None,
            &config,
            Parts {
                rules: decider.rules_switch(),
                store: decider.store().clone(),
                local: None,
                pricing: None,
                costs,
                gate: None,
                ledger: None,
                metrics: metrics.clone(),
            },
        );
        (reloader, decider, metrics)
    }

    #[test]
    fn the_reloader_and_its_futures_can_be_shared_across_tasks() {
        fn send_sync<T: Send + Sync>(_: &T) {}
        fn send<T: Send>(_: &T) {}
        let store = Arc::new(crate::store::MemoryStore::new(
            Config::default().budget_policy(),
            Arc::new(crate::clock::SystemClock),
        ));
        let (r, _decider, _) = reloader(store);
        send_sync(&r);
        send(&r.reload());
        send(&r.set_shadow(None, true));
    }

    #[tokio::test]
    async fn a_store_that_refuses_the_policy_changes_nothing() {
        let store = Arc::new(Fixed(crate::store::MemoryStore::new(
            Config::default().budget_policy(),
            Arc::new(crate::clock::SystemClock),
        )));
        let (r, decider, metrics) = reloader(store);
        // A tier's shadow mode is part of the budget policy: the store must take it.
        let e = r
            .set_shadow(Some("free"), true)
            .await
            .expect_err("the store refuses");
        assert!(matches!(e, ReloadError::Store(_)), "{e}");
        assert_eq!(r.generation(), 1);
        assert!(!r.current().tiers["free"].shadow);
        assert!(
            !decider.rules().policy.tiers[0].shadow,
            "the decisions' rules stay"
        );
        assert_eq!(
            metrics.config.reloads.with_label_values(&["error"]).get(),
            1
        );
        // Global shadow mode is the decider's alone.
        let book = decider.prices();
        let report = r.set_shadow(None, true).await.expect("applied");
        assert_eq!(report.changed, ["budget.shadow"]);
        assert!(decider.rules().shadow);
        // Prices did not change: the decisions keep the book whose multipliers the pricing
        // engine moves.
        let path = book.endpoint("/x").expect("normal form");
        book.price(None, &path).expect("priced").set_multiplier(1.5);
        let now = decider.rules();
        assert_eq!(
            now.prices.price(None, &path).expect("priced").multiplier(),
            1.5
        );
        assert_eq!(metrics.config.generation.get(), 2);
        // Switching it to what it is already changes nothing: no new generation.
        let report = r.set_shadow(None, true).await.expect("applied");
        assert!(report.changed.is_empty());
        assert_eq!(report.generation, 2);
    }

    #[test]
    fn the_overrides_are_applied_like_at_start() {
        let o = Overrides {
            listen: Some("127.0.0.1:1".parse().expect("addr")),
            redis_url: Some("redis://r:1".into()),
            interfaces: vec!["lo".into()],
            protect_ports: vec![80],
            migrate: true,
            otlp_endpoint: Some("http://collector:4318".into()),
            ..Overrides::default()
        };
        let mut c = Config::default();
        o.apply(&mut c);
        assert_eq!(c.telemetry.otlp_endpoint, "http://collector:4318");
        assert_eq!(c.server.listen.port(), 1);
        assert_eq!(c.store.redis_url, "redis://r:1");
        assert_eq!(c.kernel.interfaces, ["lo"]);
        assert!(c.kernel.protect_ports.contains(&80));
        assert!(c.ledger.migrate);
    }
}
