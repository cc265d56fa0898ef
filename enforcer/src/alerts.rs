//! Low-balance alerts: a tier's `low_balance` thresholds (fractions of its `max_tokens`) fire
//! when a key's balance goes from above one to at or below it, once per crossing.
//!
//! [`Alerts`] subscribes to the decider's event stream ([`crate::decision::event`]). A charged
//! debit tells the balance before (after + cost) and after; that is all a crossing needs, so
//! detection is O(thresholds) on the decision path, plus a non-blocking queue push when one
//! fires. Each debit is settled atomically by the store (one Lua call on Redis), so among all
//! daemons sharing a key exactly one decision takes the balance across a threshold: no
//! coordination is needed for "once". Refill between two decisions is invisible until the next
//! one, so a crossing is seen at the first debit that ends at or below the threshold.
//!
//! Once fired, a threshold stays quiet for that key until a balance above it by `[alerts]
//! rearm_margin` × `max_tokens` is seen (a refund, a grant, a decision after refill): a key
//! hovering at a threshold would otherwise fire at every request. That memory is this
//! daemon's (bounded; forgotten at a restart): another daemon that saw the key go back above may
//! fire it again after a new crossing.
//!
//! Delivery: every alert is an audit row (`kind = 'alert'`), and, with `[alerts] webhook_url`,
//! a JSON POST signed with HMAC-SHA256, retried with exponential backoff by a lifecycle worker
//! ([`deliver`]), never on the decision path. Thresholds follow reloads (they live in the
//! decider's [`Rules`]).
use crate::config::AlertsConfig;
use crate::decision::Rules;
use crate::decision::event::{Event, Subscriber};
use crate::key::KeyHash;
use crate::ledger::{AuditRow, Entry, Ledger, RowKind};
use crate::lifecycle::Shutdown;
use crate::metrics::Metrics;
use crate::store::BucketKind;
use arc_swap::ArcSwap;
use bytes::Bytes;
use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc;

/// Most (key, threshold) pairs remembered as fired; beyond, the memory is cleared (a key may
/// then fire a threshold again at its next crossing).
const MAX_FIRED: usize = 1_000_000;

/// Errors while setting up alert delivery.
#[derive(Debug, thiserror::Error)]
pub enum AlertsError {
    /// The webhook needs a key to sign with.
    #[error(
        "alerts.webhook_url needs an HMAC key: alerts.hmac_secret_file, or \
         ENFORCER_ALERTS_HMAC_SECRET"
    )]
    NoSecret,
    /// The key file could not be read.
    #[error("alerts.hmac_secret_file {path}: {error}")]
    SecretFile {
        /// The file.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// The URL is not usable (validation should have said so).
    #[error("alerts.webhook_url: {0}")]
    Url(String),
    /// The HTTP client could not be built (an unreadable `alerts.ca_file`).
    #[error("alerts.ca_file: {0}")]
    Client(#[from] crate::http_client::HttpClientError),
}

/// One alert.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Alert {
    /// The alert's id (UUIDv7): its audit row's, and the webhook's idempotency key.
    pub id: uuid::Uuid,
    /// The key's SHA-256.
    pub key_hash: String,
    /// Its tier.
    pub tier: String,
    /// The threshold, a fraction of `max_tokens`.
    pub threshold: f64,
    /// The threshold in tokens.
    pub threshold_tokens: f64,
    /// The balance after the change that crossed it.
    pub balance: f64,
    /// When, seconds since the Unix epoch (the store's clock when the balance was settled).
    pub at: f64,
}

/// The event stream's low-balance watcher.
#[derive(Debug)]
pub struct Alerts {
    rules: OnceLock<Arc<ArcSwap<Rules>>>,
    margin: f64,
    fired: parking_lot::Mutex<HashSet<(KeyHash, u8)>>,
    webhook: Option<mpsc::Sender<Alert>>,
    ledger: Option<Ledger>,
    metrics: Metrics,
}

impl Alerts {
    /// A watcher; alerts go to `ledger` and, with a queue, to the webhook worker.
    pub fn new(
        config: &AlertsConfig,
        ledger: Option<Ledger>,
        webhook: Option<mpsc::Sender<Alert>>,
        metrics: Metrics,
    ) -> Self {
        Self {
            rules: OnceLock::new(),
            margin: config.rearm_margin,
            fired: parking_lot::Mutex::new(HashSet::new()),
            webhook,
            ledger,
            metrics,
        }
    }

    /// Follows the decider's rules (tiers and their thresholds, reloads included). Until this
    /// is called nothing fires.
    pub fn follow(&self, rules: Arc<ArcSwap<Rules>>) {
        let _ = self.rules.set(rules);
    }

    /// A balance of `key` moved from `before` to `after` (equal: a balance seen, which can only
    /// re-arm).
    fn observe(&self, key: &KeyHash, tier: &str, before: f64, after: f64, at: f64) {
        let Some(rules) = self.rules.get() else {
            return;
        };
        let rules = rules.load();
        let Some(tier) = rules.policy.tier(tier) else {
            return;
        };
        if tier.low_balance.is_empty() {
            return;
        }
        let max = tier.bucket.max_tokens;
        let mut fired = self.fired.lock();
        for (i, fraction) in tier.low_balance.iter().enumerate() {
            let slot = (*key, u8::try_from(i).unwrap_or(u8::MAX));
            let threshold = fraction * max;
            if after > threshold + self.margin * max {
                fired.remove(&slot);
            }
            if before > threshold && after <= threshold && !fired.contains(&slot) {
                if fired.len() >= MAX_FIRED {
                    fired.clear();
                }
                fired.insert(slot);
                self.fire(Alert {
                    id: uuid::Uuid::now_v7(),
                    key_hash: key.to_hex(),
                    tier: tier.name.clone(),
                    threshold: *fraction,
                    threshold_tokens: threshold,
                    balance: after,
                    at,
                });
            }
        }
    }

    fn fire(&self, alert: Alert) {
        self.metrics.alerts.with_label_values(&["fired"]).inc();
        tracing::info!(
            target: "enforcer::alerts",
            key = &alert.key_hash[..16],
            tier = %alert.tier,
            threshold = alert.threshold,
            balance = alert.balance,
            "low balance"
        );
        if let Some(ledger) = &self.ledger {
            ledger.record(Entry::Decision(AuditRow {
                id: alert.id,
                at_us: crate::ledger::now_us(),
                key_hash: alert.key_hash.clone(),
                tier: Some(alert.tier.clone()),
                endpoint: String::new(),
                method: "*".to_owned(),
                units: 0.0,
                cost: alert.threshold_tokens,
                multiplier: 1.0,
                allowed: true,
                remaining: Some(alert.balance),
                decided_by: "alert".to_owned(),
                denial: None,
                request_id: Some(alert.id.to_string()),
                node: ledger.node().to_owned(),
                kind: RowKind::Alert,
                client_ip: None,
                note: Some(format!(
                    "low balance: at or below {} % of max_tokens",
                    alert.threshold * 100.0
                )),
                operator: None,
                true_cost: None,
                settle_by_us: None,
                candidate_allowed: None,
                candidate_cost: None,
            }));
        }
        if let Some(queue) = &self.webhook
            && queue.try_send(alert).is_err()
        {
            self.metrics.alerts.with_label_values(&["dropped"]).inc();
        }
    }
}

impl Subscriber for Alerts {
    fn publish(&self, event: &Event<'_>) {
        match event {
            Event::Debit(d) if d.bucket == BucketKind::Main => {
                let (Some(after), Some(tier), Some(settled)) = (
                    d.decision.remaining,
                    d.decision.tier.as_deref(),
                    d.settled.as_ref(),
                ) else {
                    return;
                };
                // Charged only when allowed and not a would-be denial of shadow mode.
                let before = if d.decision.allowed && d.decision.denial.is_none() {
                    after + d.decision.cost
                } else {
                    after
                };
                self.observe(d.key_hash, tier, before, after, settled.at);
            }
            Event::DebitBack(b) if b.bucket == BucketKind::Main => {
                if let Some(after) = b.balance {
                    let now = crate::ledger::now_us() as f64 / 1e6;
                    self.observe(b.key_hash, b.tier, after + b.amount, after, now);
                }
            }
            Event::Refund(r) => {
                if let Some(balance) = r.balance {
                    self.observe(r.key_hash, r.tier, balance, balance, r.settled.at);
                }
            }
            Event::Grant(g) => self.observe(g.key_hash, g.tier, g.balance, g.balance, g.settled.at),
            // A settle charges the difference (negative: credited back).
            Event::Settle(s) => self.observe(
                s.key_hash,
                s.tier,
                s.balance + s.charged,
                s.balance,
                s.settled.at,
            ),
            _ => {}
        }
    }
}

/// Where and how the webhook worker delivers.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// Verifies an https:// receiver against `alerts.ca_file`, or the system's roots.
    client: reqwest::Client,
    url: String,
    secret: Vec<u8>,
    max_attempts: u32,
    retry: Duration,
}

impl Webhook {
    /// The webhook of `config`, with its key from the file or the environment; `None` without
    /// a URL.
    pub fn from_config(config: &AlertsConfig) -> Result<Option<Self>, AlertsError> {
        if config.webhook_url.is_empty() {
            return Ok(None);
        }
        let secret = if config.hmac_secret_file.is_empty() {
            std::env::var("ENFORCER_ALERTS_HMAC_SECRET")
                .map(String::into_bytes)
                .map_err(|_| AlertsError::NoSecret)?
        } else {
            std::fs::read(&config.hmac_secret_file).map_err(|error| AlertsError::SecretFile {
                path: config.hmac_secret_file.clone(),
                error,
            })?
        };
        let secret = secret.trim_ascii().to_vec();
        if secret.is_empty() {
            return Err(AlertsError::NoSecret);
        }
        let timeout = Duration::from_millis(config.timeout_ms);
        let ca_file = (!config.ca_file.is_empty()).then(|| std::path::Path::new(&config.ca_file));
        Ok(Some(Self {
            client: crate::http_client::remote(ca_file, timeout)?,
            url: config.webhook_url.clone(),
            secret,
            max_attempts: config.max_attempts.max(1),
            retry: Duration::from_millis(config.retry_ms),
        }))
    }
}

/// `sha256=<hex>` of HMAC-SHA256 over `"<timestamp>.<body>"`: what `x-enforcer-signature`
/// carries (the timestamp is signed too, so an old body cannot be replayed with a new time).
pub fn signature(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    use hmac::Mac as _;
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes a key of any size");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The webhook worker: delivers alerts in order, each with up to `max_attempts` tries and
/// exponential backoff, until shutdown (alerts still queued then are counted as dropped; their
/// audit rows are written regardless).
pub async fn deliver(
    webhook: Webhook,
    mut queue: mpsc::Receiver<Alert>,
    metrics: Metrics,
    mut shutdown: Shutdown,
) {
    let client = webhook.client.clone();
    let count = |result: &str| metrics.alerts.with_label_values(&[result]).inc();
    'alerts: loop {
        let alert = tokio::select! {
            () = shutdown.requested() => break,
            alert = queue.recv() => match alert {
                Some(a) => a,
                None => break,
            },
        };
        let body = match serde_json::to_vec(&alert) {
            Ok(b) => Bytes::from(b),
            Err(_) => continue,
        };
        let mut wait = webhook.retry;
        for attempt in 1..=webhook.max_attempts {
            let timestamp = (crate::ledger::now_us() / 1_000_000).to_string();
            let request = client
                .post(&webhook.url)
                .header("content-type", "application/json")
                .header("x-enforcer-alert-id", alert.id.to_string())
                .header("x-enforcer-timestamp", &timestamp)
                .header(
                    "x-enforcer-signature",
                    signature(&webhook.secret, &timestamp, &body),
                )
                .body(body.clone());
            // Shutdown does not wait for a slow receiver.
            let answer = tokio::select! {
                () = shutdown.requested() => {
                    count("dropped");
                    break 'alerts;
                }
                answer = request.send() => answer,
            };
            let ok = matches!(answer, Ok(response) if response.status().is_success());
            if ok {
                count("sent");
                continue 'alerts;
            }
            if attempt == webhook.max_attempts {
                break;
            }
            count("retried");
            tokio::select! {
                () = shutdown.requested() => {
                    count("dropped");
                    break 'alerts;
                }
                () = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(Duration::from_secs(60));
        }
        count("failed");
        tracing::warn!(target: "enforcer::alerts", id = %alert.id, attempts = webhook.max_attempts, "low-balance alert not delivered to the webhook (its audit row is written)");
    }
    while queue.try_recv().is_ok() {
        count("dropped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_covers_the_timestamp_and_the_body() {
        let a = signature(b"k", "1700000000", b"{}");
        assert!(a.starts_with("sha256=") && a.len() == 7 + 64, "{a}");
        assert_ne!(a, signature(b"k", "1700000001", b"{}"));
        assert_ne!(a, signature(b"k", "1700000000", b"{ }"));
        assert_ne!(a, signature(b"other", "1700000000", b"{}"));
    }
}
