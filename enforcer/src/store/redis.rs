//! The Redis token store: one `EVALSHA` of `lua/debit.lua` per decision.
//!
//! Scripts are loaded with `SCRIPT LOAD` and called by SHA with every argument in
//! `KEYS`/`ARGV` (never spliced into script text); a `NOSCRIPT` answer (Redis restarted,
//! flushed, failed over) reloads the script and retries once. Connections are multiplexed, so
//! concurrent decisions are pipelined on one socket, and reconnect by themselves. They are made
//! lazily: the daemon starts (and applies its failure policy) while Redis is still down.
use super::{
    BucketKind, Debit, DebitOutcome, RefundOutcome, Settled, StoreError, TokenStore, check_cost,
};
use crate::budget::{BudgetPolicy, UnknownKeys};
use crate::key::{KeyHash, RequestId};
use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, Script};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::OnceCell;

/// The debit script, embedded at build time.
pub const DEBIT_LUA: &str = include_str!("../../../lua/debit.lua");
/// The refund script, embedded at build time.
pub const REFUND_LUA: &str = include_str!("../../../lua/refund.lua");

/// Connection settings.
#[derive(Debug, Clone)]
pub struct RedisStoreConfig {
    /// `redis://host:port/db` (or `rediss://`, `redis+unix://`).
    pub url: String,
    /// Multiplexed connections to spread load over (each one pipelines).
    pub connections: usize,
    /// Bound on establishing a connection.
    pub connect_timeout: Duration,
}

/// [`TokenStore`] backed by Redis.
pub struct RedisStore {
    client: redis::Client,
    connect_timeout: Duration,
    connections: Vec<OnceCell<ConnectionManager>>,
    next: AtomicUsize,
    debit: Script,
    refund: Script,
    /// `ARGV[3..]` of the debit script for main buckets: window, default tier, kind, tiers.
    main_args: Vec<String>,
    /// The same for operational buckets: every tier maps to the operational bucket.
    ops_args: Vec<String>,
    record_ttl_ms: String,
}

impl RedisStore {
    /// A store for `policy` on the Redis at `config.url`. Does not connect yet.
    pub fn new(config: &RedisStoreConfig, policy: &BudgetPolicy) -> Result<Self, StoreError> {
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| StoreError::Unavailable(format!("bad redis url: {e}")))?;
        let connections = (0..config.connections.max(1)).map(|_| OnceCell::new()).collect();
        Ok(Self {
            client,
            connect_timeout: config.connect_timeout,
            connections,
            next: AtomicUsize::new(0),
            debit: Script::new(DEBIT_LUA),
            refund: Script::new(REFUND_LUA),
            main_args: script_args(policy, BucketKind::Main),
            ops_args: script_args(policy, BucketKind::Operational),
            record_ttl_ms: policy.idempotency_ttl.as_millis().max(1).to_string(),
        })
    }

    /// Redis key names of one API key. The hash tag keeps them in one cluster slot.
    fn key_names(key: &KeyHash, bucket: BucketKind, request_id: &RequestId) -> [String; 3] {
        let h = key.to_hex();
        let b = match bucket {
            BucketKind::Main => "b",
            BucketKind::Operational => "ops",
        };
        [
            format!("ptb:{{{h}}}:{b}"),
            format!("ptb:{{{h}}}:tier"),
            format!("ptb:{{{h}}}:r:{}", request_id.as_str()),
        ]
    }

    async fn connection(&self) -> Result<ConnectionManager, StoreError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.connections.len();
        let conn = self.connections[i]
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(self.connect_timeout)
                    .set_number_of_retries(1)
                    .set_max_delay(1000);
                let mut conn = ConnectionManager::new_with_config(self.client.clone(), config)
                    .await
                    .map_err(unavailable)?;
                // Load both scripts up front; EVALSHA then never sends a script body.
                for script in [&self.debit, &self.refund] {
                    script.prepare_invoke().load_async(&mut conn).await.map_err(unavailable)?;
                }
                Ok::<_, StoreError>(conn)
            })
            .await?;
        Ok(conn.clone())
    }

    /// `EVALSHA`, reloading the script and retrying once on `NOSCRIPT`.
    async fn eval<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        keys: &[String],
        args: &[&str],
    ) -> Result<T, StoreError> {
        let mut conn = self.connection().await?;
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash()).arg(keys.len()).arg(keys).arg(args);
        match cmd.query_async::<T>(&mut conn).await {
            Err(e) if e.kind() == ErrorKind::NoScriptError => {
                tracing::warn!("redis lost the script (NOSCRIPT): reloading it");
                script.prepare_invoke().load_async(&mut conn).await.map_err(unavailable)?;
                cmd.query_async::<T>(&mut conn).await.map_err(classify)
            }
            other => other.map_err(classify),
        }
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("connections", &self.connections.len())
            .field("debit_sha", &self.debit.get_hash())
            .finish_non_exhaustive()
    }
}

/// The tier part of the debit script's `ARGV`, computed once.
fn script_args(policy: &BudgetPolicy, kind: BucketKind) -> Vec<String> {
    let default = match &policy.unknown_keys {
        UnknownKeys::DefaultTier(name) => name.clone(),
        UnknownKeys::Reject => String::new(),
    };
    let mut args = vec![
        policy.active_window.as_secs_f64().to_string(),
        default,
        match kind {
            BucketKind::Main => "m",
            BucketKind::Operational => "o",
        }
        .to_owned(),
        policy.tiers.len().to_string(),
    ];
    for tier in &policy.tiers {
        let p = match kind {
            BucketKind::Main => tier.bucket,
            BucketKind::Operational => policy.operational,
        };
        args.push(tier.name.clone());
        args.extend(
            [p.max_tokens, p.refill_per_sec, p.idle_cap, p.initial_tokens].map(|v| v.to_string()),
        );
    }
    args
}

fn unavailable(e: RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn classify(e: RedisError) -> StoreError {
    if e.kind() == ErrorKind::ResponseError || e.to_string().contains("enforcer:") {
        StoreError::Rejected(e.to_string())
    } else {
        StoreError::Unavailable(e.to_string())
    }
}

fn number(s: &str) -> Result<f64, StoreError> {
    s.parse::<f64>()
        .map_err(|_| StoreError::Protocol(format!("not a number: {s:?}")))
}

#[async_trait]
impl TokenStore for RedisStore {
    async fn debit(&self, d: &Debit) -> Result<DebitOutcome, StoreError> {
        check_cost(d.cost)?;
        let keys = Self::key_names(&d.key, d.bucket, &d.request_id);
        let cost = d.cost.to_string();
        let tail = match d.bucket {
            BucketKind::Main => &self.main_args,
            BucketKind::Operational => &self.ops_args,
        };
        let mut args: Vec<&str> = Vec::with_capacity(2 + tail.len());
        args.push(&cost);
        args.push(&self.record_ttl_ms);
        args.extend(tail.iter().map(String::as_str));
        let (status, allowed, remaining, retry, tier, cost, replayed): (
            String,
            i64,
            String,
            i64,
            String,
            String,
            i64,
        ) = self.eval(&self.debit, &keys, &args).await?;
        match status.as_str() {
            "ok" => Ok(DebitOutcome::Settled(Settled {
                allowed: allowed == 1,
                remaining: number(&remaining)?,
                retry_after_ms: u64::try_from(retry).ok(),
                tier,
                cost: number(&cost)?,
                replayed: replayed == 1,
            })),
            "unknown_key" => Ok(DebitOutcome::UnknownKey),
            other => Err(StoreError::Protocol(format!("debit status {other:?}"))),
        }
    }

    async fn refund(
        &self,
        key: &KeyHash,
        request_id: &RequestId,
    ) -> Result<RefundOutcome, StoreError> {
        let [bucket, _, record] = Self::key_names(key, BucketKind::Main, request_id);
        let (status, credited, balance): (String, String, String) =
            self.eval(&self.refund, &[bucket, record], &[]).await?;
        match status.as_str() {
            "ok" => Ok(RefundOutcome::Refunded {
                credited: number(&credited)?,
                balance: number(&balance)?,
            }),
            "unknown_request" => Ok(RefundOutcome::UnknownRequest),
            "already_refunded" => Ok(RefundOutcome::AlreadyRefunded),
            "not_refundable" => Ok(RefundOutcome::NotRefundable),
            other => Err(StoreError::Protocol(format!("refund status {other:?}"))),
        }
    }

    async fn assign_tier(&self, key: &KeyHash, tier: Option<&str>) -> Result<(), StoreError> {
        let mut conn = self.connection().await?;
        let name = format!("ptb:{{{}}}:tier", key.to_hex());
        let cmd = match tier {
            Some(tier) => {
                let mut c = redis::cmd("SET");
                c.arg(&name).arg(tier);
                c
            }
            None => {
                let mut c = redis::cmd("DEL");
                c.arg(&name);
                c
            }
        };
        cmd.query_async::<()>(&mut conn).await.map_err(classify)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.connection().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(drop)
            .map_err(unavailable)
    }

    fn backend(&self) -> &'static str {
        "redis"
    }
}
