//! The Redis token store: one `EVALSHA` of `lua/debit.lua` per decision.
//!
//! Scripts are loaded with `SCRIPT LOAD` and called by SHA with every argument in
//! `KEYS`/`ARGV` (never spliced into script text); a `NOSCRIPT` answer (Redis restarted,
//! flushed, failed over) reloads the script and retries once.
//!
//! Script calls are **pipelined**: a batching task takes every call queued since its last turn
//! and writes them to Redis as one pipeline (one `write` for many decisions, and one `read` on
//! the Redis side), on multiplexed connections that reconnect by themselves. Nothing waits to
//! fill a batch: under light load a batch is one call. Connections are made lazily, so the
//! daemon starts (and applies its failure policy) while Redis is still down.
use super::{
    BucketKind, Debit, DebitOutcome, RefundOutcome, Settled, StoreError, TokenStore, check_cost,
};
use crate::budget::{BudgetPolicy, UnknownKeys};
use crate::key::{KeyHash, RequestId};
use async_trait::async_trait;
use redis::aio::{ConnectionLike as _, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, ErrorKind, Pipeline, RedisError, Script, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::{OnceCell, mpsc, oneshot};

/// The debit script, embedded at build time.
pub const DEBIT_LUA: &str = include_str!("../../../lua/debit.lua");
/// The refund script, embedded at build time.
pub const REFUND_LUA: &str = include_str!("../../../lua/refund.lua");
/// The heartbeat script (fail-soft node count), embedded at build time.
pub const HEARTBEAT_LUA: &str = include_str!("../../../lua/heartbeat.lua");
/// The sorted set of live daemons (`lua/heartbeat.lua`); its own hash tag, one slot.
const LIVE_NODES: &str = "ptb:{nodes}:live";

/// Most script calls written as one pipeline.
const MAX_BATCH: usize = 256;
/// Calls queued for the batching task before callers wait (bounds memory under overload).
const QUEUE: usize = 8192;

/// Connection settings.
#[derive(Debug, Clone)]
pub struct RedisStoreConfig {
    /// `redis://host:port/db` (or `rediss://`, `redis+unix://`).
    pub url: String,
    /// Multiplexed connections; pipelines are spread over them in turn.
    pub connections: usize,
    /// Bound on establishing a connection.
    pub connect_timeout: Duration,
}

/// Lazily made, self-healing connections with the scripts loaded.
struct Pool {
    client: redis::Client,
    connect_timeout: Duration,
    connections: Vec<OnceCell<ConnectionManager>>,
    next: AtomicUsize,
    scripts: [Script; 3],
}

/// One script call waiting for the batching task.
struct Call {
    cmd: Cmd,
    script: usize,
    reply: oneshot::Sender<Result<Value, StoreError>>,
}

/// [`TokenStore`] backed by Redis.
pub struct RedisStore {
    pool: Arc<Pool>,
    /// The batching task's queue, started on first use (it needs the runtime).
    queue: OnceLock<mpsc::Sender<Call>>,
    /// `ARGV[4..]` of the debit script for main buckets: window, default tier, kind, tiers.
    main_args: Vec<String>,
    /// The same for operational buckets: every tier maps to the operational bucket.
    ops_args: Vec<String>,
    record_ttl_ms: String,
}

const DEBIT: usize = 0;
const REFUND: usize = 1;
const HEARTBEAT: usize = 2;

impl RedisStore {
    /// A store for `policy` on the Redis at `config.url`. Does not connect yet.
    pub fn new(config: &RedisStoreConfig, policy: &BudgetPolicy) -> Result<Self, StoreError> {
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| StoreError::Unavailable(format!("bad redis url: {e}")))?;
        let connections = (0..config.connections.max(1))
            .map(|_| OnceCell::new())
            .collect();
        Ok(Self {
            pool: Arc::new(Pool {
                client,
                connect_timeout: config.connect_timeout,
                connections,
                next: AtomicUsize::new(0),
                scripts: [
                    Script::new(DEBIT_LUA),
                    Script::new(REFUND_LUA),
                    Script::new(HEARTBEAT_LUA),
                ],
            }),
            queue: OnceLock::new(),
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

    /// `EVALSHA` through the batching task.
    async fn eval<T: redis::FromRedisValue>(
        &self,
        script: usize,
        keys: &[String],
        args: &[&str],
    ) -> Result<T, StoreError> {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.pool.scripts[script].get_hash())
            .arg(keys.len())
            .arg(keys)
            .arg(args);
        let queue = self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(batches(self.pool.clone(), rx));
            tx
        });
        let (reply, answer) = oneshot::channel();
        queue
            .send(Call { cmd, script, reply })
            .await
            .map_err(|_| StoreError::Unavailable("the batching task stopped".into()))?;
        let value = answer
            .await
            .map_err(|_| StoreError::Unavailable("the batching task dropped a call".into()))??;
        redis::from_owned_redis_value(value).map_err(|e| StoreError::Protocol(e.to_string()))
    }
}

impl Pool {
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
                // Load the scripts up front; EVALSHA then never sends a script body.
                for script in &self.scripts {
                    script
                        .prepare_invoke()
                        .load_async(&mut conn)
                        .await
                        .map_err(unavailable)?;
                }
                Ok::<_, StoreError>(conn)
            })
            .await?;
        Ok(conn.clone())
    }
}

/// The batching task: drains the queue into pipelines until every sender is gone.
async fn batches(pool: Arc<Pool>, mut rx: mpsc::Receiver<Call>) {
    let mut calls = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut calls, MAX_BATCH).await > 0 {
        // The first call woke this task, which then runs before the other ready request
        // handlers (tokio runs a just-woken task next). Yielding once lets them queue their
        // calls too: one scheduler turn of latency for batches many calls wide.
        tokio::task::yield_now().await;
        while calls.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(call) => calls.push(call),
                Err(_) => break,
            }
        }
        let batch = std::mem::replace(&mut calls, Vec::with_capacity(MAX_BATCH));
        // Each pipeline runs on its own, so the next batch is written while this one's answers
        // are on their way; the multiplexed connection keeps them in order.
        tokio::spawn(send(pool.clone(), batch));
    }
}

/// Writes one pipeline and hands each caller its answer; reloads scripts on `NOSCRIPT`.
async fn send(pool: Arc<Pool>, batch: Vec<Call>) {
    let fail_all = |batch: Vec<Call>, e: StoreError| {
        for call in batch {
            let _ = call.reply.send(Err(e.clone()));
        }
    };
    let mut conn = match pool.connection().await {
        Ok(c) => c,
        Err(e) => return fail_all(batch, e),
    };
    let mut pipe = Pipeline::with_capacity(batch.len());
    for call in &batch {
        pipe.add_command(call.cmd.clone());
    }
    let answers = match conn.req_packed_commands(&pipe, 0, batch.len()).await {
        Ok(a) if a.len() == batch.len() => a,
        Ok(a) => {
            let e = format!("pipeline of {} calls got {} answers", batch.len(), a.len());
            return fail_all(batch, StoreError::Protocol(e));
        }
        Err(e) => return fail_all(batch, classify(e)),
    };
    let mut reloaded = [false; 3];
    for (call, answer) in batch.into_iter().zip(answers) {
        let result = match answer {
            Value::ServerError(e) => {
                let e = RedisError::from(e);
                if e.kind() == ErrorKind::NoScriptError {
                    retry_after_reload(&pool, &mut conn, &call, &mut reloaded).await
                } else {
                    Err(classify(e))
                }
            }
            v => Ok(v),
        };
        let _ = call.reply.send(result);
    }
}

/// Redis lost the script (restart, flush, failover): load it again and retry the call once.
async fn retry_after_reload(
    pool: &Pool,
    conn: &mut ConnectionManager,
    call: &Call,
    reloaded: &mut [bool; 3],
) -> Result<Value, StoreError> {
    if !reloaded[call.script] {
        tracing::warn!("redis lost a script (NOSCRIPT): reloading it");
        pool.scripts[call.script]
            .prepare_invoke()
            .load_async(conn)
            .await
            .map_err(unavailable)?;
        reloaded[call.script] = true;
    }
    call.cmd.query_async::<Value>(conn).await.map_err(classify)
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("connections", &self.pool.connections.len())
            .field("debit_sha", &self.pool.scripts[DEBIT].get_hash())
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
        let mut args: Vec<&str> = Vec::with_capacity(3 + tail.len());
        args.push(&cost);
        args.push(&self.record_ttl_ms);
        args.push(d.fingerprint.as_str());
        args.extend(tail.iter().map(String::as_str));
        if d.force {
            // ARGV[6], the bucket kind: upper case charges whatever the balance.
            args[5] = match d.bucket {
                BucketKind::Main => "M",
                BucketKind::Operational => "O",
            };
        }
        let (status, allowed, remaining, retry, tier, cost, replayed, at): (
            String,
            i64,
            String,
            i64,
            String,
            String,
            i64,
            String,
        ) = self.eval(DEBIT, &keys, &args).await?;
        match status.as_str() {
            "ok" => Ok(DebitOutcome::Settled(Settled {
                allowed: allowed == 1,
                remaining: number(&remaining)?,
                retry_after_ms: u64::try_from(retry).ok(),
                tier,
                cost: number(&cost)?,
                replayed: replayed == 1,
                at: if replayed == 1 {
                    None
                } else {
                    Some(number(&at)?)
                },
            })),
            "unknown_key" => Ok(DebitOutcome::UnknownKey),
            "conflict" => Ok(DebitOutcome::Conflict),
            other => Err(StoreError::Protocol(format!("debit status {other:?}"))),
        }
    }

    async fn refund(
        &self,
        key: &KeyHash,
        request_id: &RequestId,
    ) -> Result<RefundOutcome, StoreError> {
        let [bucket, _, record] = Self::key_names(key, BucketKind::Main, request_id);
        let (status, credited, balance, as_of, tier, now): (
            String,
            String,
            String,
            String,
            String,
            String,
        ) = self.eval(REFUND, &[bucket, record], &[]).await?;
        match status.as_str() {
            "ok" => Ok(RefundOutcome::Refunded {
                credited: number(&credited)?,
                balance: number(&balance)?,
                tier,
                as_of: if as_of.is_empty() {
                    None
                } else {
                    Some(number(&as_of)?)
                },
                now: number(&now)?,
            }),
            "unknown_request" => Ok(RefundOutcome::UnknownRequest),
            "already_refunded" => Ok(RefundOutcome::AlreadyRefunded),
            "not_refundable" => Ok(RefundOutcome::NotRefundable),
            other => Err(StoreError::Protocol(format!("refund status {other:?}"))),
        }
    }

    async fn assign_tier(&self, key: &KeyHash, tier: Option<&str>) -> Result<(), StoreError> {
        let mut conn = self.pool.connection().await?;
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
        let mut conn = self.pool.connection().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(drop)
            .map_err(unavailable)
    }

    async fn heartbeat(&self, node: &str, ttl: Duration) -> Result<u32, StoreError> {
        let ttl = ttl.as_millis().max(1).to_string();
        let live: i64 = self
            .eval(HEARTBEAT, &[LIVE_NODES.to_owned()], &[node, &ttl])
            .await?;
        u32::try_from(live.max(1)).map_err(|_| StoreError::Protocol(format!("{live} live nodes")))
    }

    fn backend(&self) -> &'static str {
        "redis"
    }
}
