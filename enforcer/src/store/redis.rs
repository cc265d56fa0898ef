//! The Redis token store: one `EVALSHA` of `lua/debit.lua` per decision.
//!
//! Scripts are loaded with `SCRIPT LOAD` and called by SHA with every argument in
//! `KEYS`/`ARGV` (never spliced into script text); a `NOSCRIPT` answer (Redis restarted,
//! flushed, failed over, a slot moved to a node that never saw the script) reloads the script
//! and retries once.
//!
//! Two backends:
//!
//! - **One Redis** (`store.redis_url`): script calls are **pipelined**: a batching task takes
//!   every call queued since its last turn and writes them to Redis as one pipeline (one `write`
//!   for many decisions, and one `read` on the Redis side), on multiplexed connections that
//!   reconnect by themselves. Nothing waits to fill a batch: under light load a batch is one
//!   call. (Coalescing queued debits into one script call that decides them all was measured
//!   and not kept: the per-call work it saves is smaller than the per-debit work it adds,
//!   docs/benchmarks.md.)
//! - **Redis Cluster** (`store.redis_cluster`): redis-rs's async cluster client routes each
//!   script call by its keys' hash-tag slot (all of one API key's keys share the tag
//!   `{<sha256>}`, so one call never spans slots), follows `MOVED`/`ASK` and refreshes the
//!   topology itself. It keeps one multiplexed connection per node: concurrent calls for one
//!   node share it and are written together, so batching is per node, and one call is one key.
//!
//! Connections are made lazily, so the daemon starts (and applies its failure policy) while
//! Redis is still down. With `store.wait_replicas = n`, every debit is followed by `WAIT n` on
//! the same primary: the answer then waits until `n` replicas have the write (what an
//! asynchronous failover would otherwise lose).
use super::{
    BucketKind, Debit, DebitOutcome, DeniedBy, GrantOutcome, GrantTerms, KeyState, QuotaPeriods,
    QuotaState, QuotaUse, RefundOutcome, SettleOutcome, Settled, StoreError, TokenStore, TrueCost,
    check_cost,
};
use crate::budget::{BudgetPolicy, UnknownKeys};
use crate::clock::Clock as _;
use crate::key::{KeyHash, RequestId};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use redis::aio::{ConnectionLike as _, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, ErrorKind, Pipeline, RedisError, Script, Value};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::{OnceCell, mpsc, oneshot};

/// The debit script, embedded at build time.
pub const DEBIT_LUA: &str = include_str!("../../../lua/debit.lua");
/// The refund script, embedded at build time.
pub const REFUND_LUA: &str = include_str!("../../../lua/refund.lua");
/// The heartbeat script (fail-soft node count), embedded at build time.
pub const HEARTBEAT_LUA: &str = include_str!("../../../lua/heartbeat.lua");
/// The operator's grant script, embedded at build time.
pub const GRANT_LUA: &str = include_str!("../../../lua/grant.lua");
/// The settle script (the true cost of a reserved request), embedded at build time.
pub const SETTLE_LUA: &str = include_str!("../../../lua/settle.lua");
/// The read-only key inspection script (`enforcer keys show`), embedded at build time.
pub const INSPECT_LUA: &str = include_str!("../../../lua/inspect.lua");
/// The sorted set of live daemons (`lua/heartbeat.lua`); its own hash tag, one slot.
const LIVE_NODES: &str = "ptb:{nodes}:live";

/// Most script calls written as one pipeline.
const MAX_BATCH: usize = 256;
/// Most module debits sent as one `ENFORCER.DEBIT` call of many (`<sha1>:m`): each debit of
/// the call saves Redis a command's dispatch, and the call keeps Redis from its other clients
/// for all of them (~5 µs each), as a pipeline of as many calls would.
const MAX_DEBITS_PER_CALL: usize = 32;
/// Calls queued for the batching task before callers wait (bounds memory under overload).
const QUEUE: usize = 8192;

/// Connection settings.
#[derive(Debug, Clone, Default)]
pub struct RedisStoreConfig {
    /// `redis://host:port/db` (or `rediss://`, `redis+unix://`) of a single Redis; ignored when
    /// `cluster` is set.
    pub url: String,
    /// Seed nodes of a Redis Cluster (`redis://host:port`); empty: a single Redis at `url`.
    pub cluster: Vec<String>,
    /// Multiplexed connections (single Redis); pipelines are spread over them in turn.
    pub connections: usize,
    /// Bound on establishing a connection.
    pub connect_timeout: Duration,
    /// Bound on one answer (the decider bounds every call anyway: this stops the cluster
    /// client's own retries from outliving it).
    pub response_timeout: Duration,
    /// Replicas that must acknowledge a debit before it is answered (`WAIT`); 0: none.
    pub wait_replicas: u32,
    /// Debit with the module's `ENFORCER.DEBIT` (`enforcer-redis`) where Redis has it, and
    /// with `debit.lua` where it does not.
    pub module: bool,
}

/// Slot groups of a cluster: each has its own circuit breaker, so a primary that is down opens
/// the breakers of its slots only. 64 groups of 256 slots: a primary owning a contiguous range
/// of slots (as `redis-cli --cluster create` assigns them) owns whole groups, but for the edges.
pub const CLUSTER_SHARDS: usize = 64;

/// Lazily made, self-healing connections with the scripts loaded.
struct Pool {
    client: redis::Client,
    connect_timeout: Duration,
    connections: Vec<OnceCell<ConnectionManager>>,
    next: AtomicUsize,
    scripts: [Script; SCRIPTS],
    /// `WAIT n timeout` at the end of every pipeline, when `wait_replicas > 0` (it waits for
    /// every write the connection made before it).
    wait: Option<Cmd>,
    wait_replicas: u32,
    /// Pipelines answered with fewer replica acknowledgements than asked.
    short_waits: AtomicU64,
}

/// One script call waiting for the batching task.
struct Call {
    request: Request,
    script: usize,
    reply: oneshot::Sender<Result<Value, StoreError>>,
}

/// What a [`Call`] sends.
enum Request {
    /// A command of its own (`EVALSHA`).
    Cmd(Cmd),
    /// A module debit: its keys and packed arguments. Sent as `ENFORCER.DEBIT <sha1>:m` with
    /// the module debits next to it in the pipeline, or alone as `<sha1>:p`.
    Debit { keys: Vec<String>, args: Vec<u8> },
}

/// The connections to one Redis, or to a cluster.
enum Backend {
    Single {
        pool: Arc<Pool>,
        /// The batching task's queue, started on first use (it needs the runtime).
        queue: OnceLock<mpsc::Sender<Call>>,
    },
    Cluster(Arc<ClusterPool>),
}

/// A lazily made cluster connection (it reconnects and refreshes its topology by itself).
struct ClusterPool {
    client: ClusterClient,
    conn: OnceCell<ClusterConnection>,
    scripts: [Script; SCRIPTS],
    /// `WAIT n timeout` after each debit, when `wait_replicas > 0`.
    wait: Option<Cmd>,
    wait_replicas: u32,
    /// Debits answered with fewer replica acknowledgements than asked.
    short_waits: AtomicU64,
}

/// [`TokenStore`] backed by Redis.
pub struct RedisStore {
    backend: Backend,
    /// The policy as script arguments: swapped whole by a config reload, read once per call
    /// (the script gets every tier's parameters in `ARGV`, so nothing in Redis changes).
    args: ArcSwap<PolicyArgs>,
    /// Whether debits go to `ENFORCER.DEBIT` now.
    module: Module,
}

/// Where debits go: the module's `ENFORCER.DEBIT`, or `EVALSHA` of `debit.lua` while Redis
/// lacks the module (or has one built from another `debit.lua`).
///
/// Both decide alike (the module is the script's rule, checked against it call by call in
/// `tests/tests/redis_module.rs`), so switching between them changes cost, never outcome. A
/// refused module call wrote nothing (an unknown command, or a script version the module
/// refuses before it reads a key), so it is sent again as the script at once; the module is
/// tried again after [`MODULE_RETRY`] (a rolling restart may load it).
#[derive(Debug)]
struct Module {
    configured: bool,
    /// Unix milliseconds before which debits use the script; 0: the module.
    off_until_ms: AtomicU64,
    /// Calls sent to the module and answered by it, and calls it refused (fallbacks).
    calls: AtomicU64,
    fallbacks: AtomicU64,
}

/// `ENFORCER.DEBIT`'s first argument: `debit.lua`'s SHA-1 and the form
/// (`enforcer_redis::args`): packed, or a call of many debits (`many`). A module built from
/// another `debit.lua`, or one that predates the form, refuses it as another version, and the
/// debits fall back to the script.
fn module_form(many: bool) -> &'static str {
    static FORMS: OnceLock<[String; 2]> = OnceLock::new();
    let forms = FORMS.get_or_init(|| {
        let sha = redis::Script::new(DEBIT_LUA).get_hash().to_owned();
        [
            format!("{sha}{}", enforcer_redis::args::PACKED),
            format!("{sha}{}", enforcer_redis::args::MANY),
        ]
    });
    &forms[usize::from(many)]
}

/// `ENFORCER.DEBIT <sha1>:p numkeys key… packed`: one module debit.
fn module_debit(keys: &[String], args: &[u8]) -> Cmd {
    let mut cmd = redis::cmd("ENFORCER.DEBIT");
    cmd.arg(module_form(false))
        .arg(keys.len())
        .arg(keys)
        .arg(args);
    cmd
}

/// How long debits stay on the script after Redis refused the module's command.
const MODULE_RETRY: Duration = Duration::from_secs(60);

impl Module {
    fn new(configured: bool) -> Self {
        Self {
            configured,
            off_until_ms: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
        }
    }

    fn now_ms() -> u64 {
        (crate::clock::SystemClock.now() * 1000.0) as u64
    }

    /// Whether this debit goes to the module.
    fn use_now(&self) -> bool {
        if !self.configured {
            return false;
        }
        let off = self.off_until_ms.load(Ordering::Relaxed);
        off == 0 || Self::now_ms() >= off
    }

    /// Whether `e` (the answer to an `ENFORCER.DEBIT`) says Redis cannot run it: then nothing
    /// was written, and the script is used for a while.
    fn refused(&self, e: &StoreError) -> bool {
        // (redis-rs reads NOPERM as its own kind, which `classify` calls unavailable.)
        let (StoreError::Rejected(msg) | StoreError::Unavailable(msg)) = e else {
            return false;
        };
        // No such command, a module built from another debit.lua, or an ACL that allows the
        // scripts but not the command: in each case Redis refused before running anything.
        let lower = msg.to_ascii_lowercase();
        if !(lower.contains("unknown command")
            || lower.contains("enforcer module: built from")
            || (lower.contains("noperm") && lower.contains("enforcer.debit")))
        {
            return false;
        }
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
        let until = Self::now_ms() + MODULE_RETRY.as_millis() as u64;
        if self.off_until_ms.swap(until, Ordering::Relaxed) == 0 {
            tracing::warn!(
                error = %msg,
                "redis cannot run ENFORCER.DEBIT (the enforcer-redis module is not loaded, was \
                 built from another debit.lua, or the user's ACL does not allow it): debiting \
                 with lua/debit.lua, the same rule at two to three times Redis's CPU; trying the \
                 module again every 60 s"
            );
        }
        true
    }

    /// A module call was answered. Only one sent after the script's window ends clears it: a
    /// call already in flight when another was refused (a cluster whose nodes are loading the
    /// module one by one) must not switch debits back at once, or they would flap between the
    /// two, a refusal and a warning each time.
    fn answered(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let off = self.off_until_ms.load(Ordering::Relaxed);
        if off != 0
            && Self::now_ms() >= off
            && self
                .off_until_ms
                .compare_exchange(off, 0, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::info!("redis runs ENFORCER.DEBIT again: debiting with the module");
        }
    }

    /// `/readyz`'s view: which command debits go to.
    fn describe(&self) -> serde_json::Value {
        let debit = if !self.configured {
            "script"
        } else if self.use_now() {
            "module"
        } else {
            "script (module refused)"
        };
        serde_json::json!({
            "debit": debit,
            "module_calls": self.calls.load(Ordering::Relaxed),
            "module_fallbacks": self.fallbacks.load(Ordering::Relaxed),
        })
    }
}

/// The script arguments of one account: a key's own budget, or a shared budget (whose tier is
/// the default tier of its arguments).
#[derive(Debug)]
struct AccountArgs {
    /// `ARGV[4..=7]` of the debit script for main buckets: window, default tier, kind, and
    /// every tier in one argument ([`debit_args`]).
    debit_main: Vec<String>,
    /// The same for operational buckets: every tier maps to the operational bucket.
    debit_ops: Vec<String>,
    /// `ARGV[3..]` of the settle script: window, default tier, kind, tier count, and five
    /// arguments per tier ([`script_args`]).
    main_args: Vec<String>,
    /// `ARGV[3..]` of the grant script: window, default tier, tiers with their ceilings.
    grant_args: Vec<String>,
    /// `ARGV` of the inspect script: the main debit tail, then the operational bucket.
    inspect_args: Vec<String>,
    /// The debit script's key limit: `max_tokens refill_per_sec`, or `- -`.
    key_limit: [String; 2],
    /// The debit script's CANDIDATE tail after the candidate cost: four numbers per tier, in
    /// the order of the policy's tiers (the index in `debit_main`); `None`: no candidate
    /// configured.
    candidate_args: Option<Vec<String>>,
}

impl AccountArgs {
    fn of(policy: &BudgetPolicy, key_limit: Option<crate::budget::BucketParams>) -> Self {
        Self {
            debit_main: debit_args(policy, BucketKind::Main),
            debit_ops: debit_args(policy, BucketKind::Operational),
            main_args: script_args(policy, BucketKind::Main),
            grant_args: grant_args(policy),
            inspect_args: inspect_args(policy),
            key_limit: key_limit.map_or_else(
                || ["-".to_owned(), "-".to_owned()],
                |l| [l.max_tokens.to_string(), l.refill_per_sec.to_string()],
            ),
            candidate_args: policy.candidate.as_ref().map(|buckets| {
                buckets
                    .iter()
                    .flat_map(|p| {
                        [p.max_tokens, p.refill_per_sec, p.idle_cap, p.initial_tokens]
                            .map(|v| v.to_string())
                    })
                    .collect()
            }),
        }
    }
}

/// Whose state a call about one key touches: the key's own (`ptb:{<sha256>}:…`) or its shared
/// budget's (`ptb:{budget:<name>}:…`, [`crate::budget::SharedBudget`]).
struct Account<'a> {
    /// The hash tag.
    tag: String,
    /// For a shared budget: the member key's hash, which names its request records and its key
    /// limit.
    member: Option<String>,
    args: &'a AccountArgs,
}

impl Account<'_> {
    fn name(&self, suffix: &str) -> String {
        self.name_of(&[suffix])
    }

    /// `ptb:{<tag>}:` and `parts`, in one allocation of the right size: a debit names up to
    /// six keys, and a `format!` each (nested for a record) was a measurable part of it.
    fn name_of(&self, parts: &[&str]) -> String {
        let len = parts.iter().map(|p| p.len()).sum::<usize>();
        let mut name = String::with_capacity(7 + self.tag.len() + len);
        name.push_str("ptb:{");
        name.push_str(&self.tag);
        name.push_str("}:");
        for part in parts {
            name.push_str(part);
        }
        name
    }

    /// A request record: per key, also in a shared budget.
    fn record(&self, request_id: &RequestId) -> String {
        match &self.member {
            Some(member) => self.name_of(&["r:", member, ":", request_id.as_str()]),
            None => self.name_of(&["r:", request_id.as_str()]),
        }
    }

    /// The shadow candidate's bucket ([`crate::shadow`]): a prefix of its own, the account's
    /// hash tag (the same slot as the account's other keys).
    fn candidate(&self) -> String {
        format!("ptc:{{{}}}:b", self.tag)
    }

    /// The bucket of this kind.
    fn bucket(&self, kind: BucketKind) -> String {
        self.name(match kind {
            BucketKind::Main => "b",
            BucketKind::Operational => "ops",
        })
    }

    /// The key limit: a shared budget member's own bucket beside the budget.
    fn key_limit(&self) -> String {
        match &self.member {
            Some(member) => self.name_of(&["k:", member]),
            None => self.name("k"),
        }
    }
}

/// The budget policy as the scripts' arguments, computed once per policy.
#[derive(Debug)]
struct PolicyArgs {
    /// Keys' own accounts.
    own: AccountArgs,
    /// Members of shared budgets: the budget's tag and arguments.
    shared: HashMap<KeyHash, Arc<(String, AccountArgs)>>,
    record_ttl_ms: String,
    /// The record ttl of a reservation (`settle_ttl`).
    settle_ttl_ms: String,
    /// The policy itself: its tiers' calendar quotas, whose boundaries move with the clock.
    policy: BudgetPolicy,
}

impl PolicyArgs {
    fn of(policy: &BudgetPolicy) -> Self {
        let mut shared = HashMap::new();
        for budget in policy.shared.all() {
            // The budget's tier is its default tier: nobody assigns one to the budget.
            let mut p = policy.clone();
            p.unknown_keys = crate::budget::UnknownKeys::DefaultTier(budget.tier.clone());
            let args = Arc::new((
                format!("budget:{}", budget.name),
                AccountArgs::of(&p, budget.key_limit),
            ));
            for key in &budget.keys {
                shared.insert(*key, args.clone());
            }
        }
        Self {
            own: AccountArgs::of(policy, None),
            shared,
            record_ttl_ms: policy.idempotency_ttl.as_millis().max(1).to_string(),
            settle_ttl_ms: policy.settle_ttl.as_millis().max(1).to_string(),
            policy: policy.clone(),
        }
    }
}

impl PolicyArgs {
    /// The account a main-bucket call about `key` touches.
    fn account(&self, key: &KeyHash) -> Account<'_> {
        match self.shared.get(key) {
            Some(shared) => Account {
                tag: shared.0.clone(),
                member: Some(key.to_hex()),
                args: &shared.1,
            },
            None => self.own_account(key),
        }
    }

    /// The key's own account (its operational bucket, its tier assignment); a member of a
    /// shared budget is charged its operational requests there under the budget's tier.
    fn own_account(&self, key: &KeyHash) -> Account<'_> {
        Account {
            tag: key.to_hex(),
            member: None,
            args: self.shared.get(key).map_or(&self.own, |s| &s.1),
        }
    }
}

const DEBIT: usize = 0;
const REFUND: usize = 1;
const HEARTBEAT: usize = 2;
const GRANT: usize = 3;
const INSPECT: usize = 4;
const SETTLE: usize = 5;
/// The number of scripts (indices above).
const SCRIPTS: usize = 6;

impl RedisStore {
    /// A store for `policy` on the Redis at `config.url`, or on the cluster of
    /// `config.cluster`. Does not connect yet.
    pub fn new(config: &RedisStoreConfig, policy: &BudgetPolicy) -> Result<Self, StoreError> {
        let scripts = [
            Script::new(DEBIT_LUA),
            Script::new(REFUND_LUA),
            Script::new(HEARTBEAT_LUA),
            Script::new(GRANT_LUA),
            Script::new(INSPECT_LUA),
            Script::new(SETTLE_LUA),
        ];
        let wait = (config.wait_replicas > 0).then(|| {
            let mut c = redis::cmd("WAIT");
            // The call's bound less 150 ms: Redis checks WAIT timeouts on its 100 ms server
            // timer, so a short acknowledgement comes up to a tick late, and it must still be
            // answered (and counted) before the decider gives up on the call. The config
            // requires timeout_ms >= 300 with wait_replicas.
            let bound = config.response_timeout.as_millis() as u64;
            c.arg(config.wait_replicas)
                .arg(bound.saturating_sub(150).max(1));
            c
        });
        let backend = if config.cluster.is_empty() {
            let client = redis::Client::open(config.url.as_str())
                .map_err(|e| StoreError::Unavailable(format!("bad redis url: {e}")))?;
            let connections = (0..config.connections.max(1))
                .map(|_| OnceCell::new())
                .collect();
            Backend::Single {
                pool: Arc::new(Pool {
                    client,
                    connect_timeout: config.connect_timeout,
                    connections,
                    next: AtomicUsize::new(0),
                    scripts,
                    wait,
                    wait_replicas: config.wait_replicas,
                    short_waits: AtomicU64::new(0),
                }),
                queue: OnceLock::new(),
            }
        } else {
            let client = redis::cluster::ClusterClientBuilder::new(config.cluster.clone())
                .connection_timeout(config.connect_timeout)
                .response_timeout(config.response_timeout.max(Duration::from_millis(1)))
                // A MOVED or ASK is retried at once. A TRYAGAIN (a script's keys caught half
                // moved while their slot migrates) and a node that is down are retried with a
                // short backoff, up to 6 times (about 400 ms in all): a migration of a busy
                // slot outlasted 2 retries in a test under load. The decider's timeout bounds
                // the whole call anyway (50 ms by default), so this only uses time a longer
                // `store.timeout_ms` grants.
                .retries(6)
                .min_retry_wait(5)
                .max_retry_wait(100)
                .build()
                .map_err(|e| StoreError::Unavailable(format!("bad redis cluster urls: {e}")))?;
            Backend::Cluster(Arc::new(ClusterPool {
                client,
                conn: OnceCell::new(),
                scripts,
                wait,
                wait_replicas: config.wait_replicas,
                short_waits: AtomicU64::new(0),
            }))
        };
        Ok(Self {
            backend,
            args: ArcSwap::from_pointee(PolicyArgs::of(policy)),
            module: Module::new(config.module),
        })
    }

    /// `lua/inspect.lua` on one account: {assigned, tier, balance, stored, ops, ops stored,
    /// now, quota, wallet}.
    async fn inspect_account(&self, account: &Account<'_>) -> Result<[String; 9], StoreError> {
        let keys = [
            account.name("b"),
            account.name("ops"),
            account.name("tier"),
            account.name("q"),
            account.name("w"),
        ];
        let args: Vec<&str> = account
            .args
            .inspect_args
            .iter()
            .map(String::as_str)
            .collect();
        let (a, t, b, s, o, os, at, q, w): (
            String,
            String,
            String,
            String,
            String,
            String,
            String,
            String,
            String,
        ) = self.eval(INSPECT, &keys, &args).await?;
        Ok([a, t, b, s, o, os, at, q, w])
    }

    /// `EVALSHA` of `script` on `keys` (one API key's: one hash tag) with `args` (for the debit
    /// script, `ENFORCER.DEBIT` where Redis has the module): through the batching task (one
    /// Redis), or routed by the keys' slot (cluster).
    async fn eval<T: redis::FromRedisValue>(
        &self,
        script: usize,
        keys: &[String],
        args: &[&str],
    ) -> Result<T, StoreError> {
        let native = script == DEBIT && self.module.use_now();
        let value = match self.call(script, native, keys, args).await {
            Ok(v) => {
                if native {
                    self.module.answered();
                }
                v
            }
            Err(e) if native && self.module.refused(&e) => {
                self.call(script, false, keys, args).await?
            }
            Err(e) => return Err(e),
        };
        redis::from_owned_redis_value(value).map_err(|e| StoreError::Protocol(e.to_string()))
    }

    /// One call: `EVALSHA <sha> n keys args`, or `ENFORCER.DEBIT <sha> n keys args` (`native`).
    async fn call(
        &self,
        script: usize,
        native: bool,
        keys: &[String],
        args: &[&str],
    ) -> Result<Value, StoreError> {
        // A module debit's arguments after the keys packed into one: Redis makes a string
        // object of each argument, and a dozen of them cost it more than the debit rule does.
        let request = if native {
            Request::Debit {
                keys: keys.to_vec(),
                args: enforcer_redis::args::pack(args),
            }
        } else {
            let sha = match &self.backend {
                Backend::Single { pool, .. } => pool.scripts[script].get_hash(),
                Backend::Cluster(pool) => pool.scripts[script].get_hash(),
            };
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(sha).arg(keys.len()).arg(keys).arg(args);
            Request::Cmd(cmd)
        };
        match &self.backend {
            Backend::Single { pool, queue } => {
                let queue = queue.get_or_init(|| {
                    let (tx, rx) = mpsc::channel(QUEUE);
                    tokio::spawn(batches(pool.clone(), rx));
                    tx
                });
                let (reply, answer) = oneshot::channel();
                queue
                    .send(Call {
                        request,
                        script,
                        reply,
                    })
                    .await
                    .map_err(|_| StoreError::Unavailable("the batching task stopped".into()))?;
                answer.await.map_err(|_| {
                    StoreError::Unavailable("the batching task dropped a call".into())
                })?
            }
            Backend::Cluster(pool) => {
                // One call per debit: the debits next to it in time are of other slots.
                let cmd = match request {
                    Request::Cmd(cmd) => cmd,
                    Request::Debit { keys, args } => module_debit(&keys, &args),
                };
                let slot = keys.first().map_or(0, |k| slot_of(k.as_bytes()));
                pool.eval(script, &cmd, slot, native).await
            }
        }
    }

    /// One command that is not a script call (tier assignment, ping), on either backend.
    async fn query<T: redis::FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        match &self.backend {
            Backend::Single { pool, .. } => {
                let mut conn = pool.connection().await?;
                cmd.query_async(&mut conn).await.map_err(classify)
            }
            Backend::Cluster(pool) => {
                let mut conn = pool.connection().await?;
                cmd.query_async(&mut conn).await.map_err(classify)
            }
        }
    }
}

impl ClusterPool {
    async fn connection(&self) -> Result<ClusterConnection, StoreError> {
        let conn = self
            .conn
            .get_or_try_init(|| async {
                let mut conn = self
                    .client
                    .get_async_connection()
                    .await
                    .map_err(unavailable)?;
                // SCRIPT LOAD goes to every primary; a primary that appears later (failover,
                // a node added) gets the script on its first NOSCRIPT.
                load_scripts(&self.scripts, &mut conn).await?;
                Ok::<_, StoreError>(conn)
            })
            .await?;
        Ok(conn.clone())
    }

    /// A script call on the primary of `slot`; `NOSCRIPT` loads the script and retries once.
    async fn eval(
        &self,
        script: usize,
        cmd: &Cmd,
        slot: u16,
        native: bool,
    ) -> Result<Value, StoreError> {
        let mut conn = self.connection().await?;
        match self.call(&mut conn, cmd, slot, native).await {
            Err(e) if e.kind() == ErrorKind::NoScriptError => {
                tracing::warn!(slot, "a cluster node lacks a script (NOSCRIPT): loading it");
                self.scripts[script]
                    .prepare_invoke()
                    .load_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                self.call(&mut conn, cmd, slot, native)
                    .await
                    .map_err(classify)
            }
            other => other.map_err(classify),
        }
    }

    /// The call, followed by `WAIT` on the same primary when replicas must acknowledge it.
    async fn call(
        &self,
        conn: &mut ClusterConnection,
        cmd: &Cmd,
        slot: u16,
        native: bool,
    ) -> Result<Value, RedisError> {
        let route = SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master));
        let Some(wait) = &self.wait else {
            if native {
                // Routed by the keys' slot: redis-rs knows where EVALSHA's keys are, not
                // ENFORCER.DEBIT's (it would route it by its first argument, the SHA).
                return conn
                    .route_command(cmd, RoutingInfo::SingleNode(route))
                    .await;
            }
            return cmd.query_async(conn).await;
        };
        let mut pipe = Pipeline::with_capacity(2);
        pipe.add_command(cmd.clone()).add_command(wait.clone());
        let mut answers = conn.route_pipeline(&pipe, 0, 2, route).await?.into_iter();
        let (Some(answer), Some(acked)) = (answers.next(), answers.next()) else {
            return Err(RedisError::from((
                ErrorKind::ParseError,
                "a pipeline of 2 got fewer answers",
            )));
        };
        if !matches!(acked, Value::Int(n) if n >= i64::from(self.wait_replicas)) {
            self.short_waits.fetch_add(1, Ordering::Relaxed);
        }
        match answer {
            Value::ServerError(e) => Err(RedisError::from(e)),
            v => Ok(v),
        }
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
                load_scripts(&self.scripts, &mut conn).await?;
                Ok::<_, StoreError>(conn)
            })
            .await?;
        Ok(conn.clone())
    }
}

/// `SCRIPT LOAD`s every script on a new connection (on a cluster: on every primary).
async fn load_scripts(
    scripts: &[Script],
    conn: &mut impl redis::aio::ConnectionLike,
) -> Result<(), StoreError> {
    for script in scripts {
        script
            .prepare_invoke()
            .load_async(conn)
            .await
            .map_err(unavailable)?;
    }
    Ok(())
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
    // Module debits next to one another become one call of many; `sizes[i]`: the calls the
    // pipeline's command `i` answers.
    let (mut pipe, sizes) = pipeline(&batch);
    let commands = sizes.len();
    // WAIT last: it waits for every write this connection made before it, the whole batch.
    let waits = usize::from(pool.wait.is_some());
    if let Some(wait) = &pool.wait {
        pipe.add_command(wait.clone());
    }
    let answers = match conn.req_packed_commands(&pipe, 0, commands + waits).await {
        Ok(mut a) if a.len() == commands + waits => {
            if waits == 1
                && !matches!(a.pop(), Some(Value::Int(n)) if n >= i64::from(pool.wait_replicas))
            {
                pool.short_waits.fetch_add(1, Ordering::Relaxed);
            }
            a
        }
        Ok(a) => {
            let e = format!("pipeline of {commands} commands got {} answers", a.len());
            return fail_all(batch, StoreError::Protocol(e));
        }
        Err(e) => return fail_all(batch, classify(e)),
    };
    let mut reloaded = [false; SCRIPTS];
    let mut calls = batch.into_iter();
    for (size, answer) in sizes.into_iter().zip(answers) {
        if size > 1 {
            // A call of many: one answer per debit, or one error (refused as a whole, nothing
            // written) that is each debit's.
            let many: Vec<Call> = calls.by_ref().take(size).collect();
            match split_many(answer, size) {
                Ok(each) => {
                    for (call, answer) in many.into_iter().zip(each) {
                        let _ = call.reply.send(answer);
                    }
                }
                Err(e) => fail_all(many, e),
            }
            continue;
        }
        let Some(call) = calls.next() else { break };
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

/// Redis lost the script (restart, flush, failover): load it again (once per pipeline) and
/// send `cmd` again.
async fn reload_and_retry(
    pool: &Pool,
    conn: &mut ConnectionManager,
    script: usize,
    cmd: &Cmd,
    reloaded: &mut [bool; SCRIPTS],
) -> Result<Value, StoreError> {
    // A flush between the reload and the retry (another flush, a second failover) loses the
    // script again: reload it once more, a bounded number of times.
    for attempt in 0..3 {
        if !reloaded[script] || attempt > 0 {
            tracing::warn!("redis lost a script (NOSCRIPT): reloading it");
            pool.scripts[script]
                .prepare_invoke()
                .load_async(&mut *conn)
                .await
                .map_err(unavailable)?;
            reloaded[script] = true;
        }
        match conn.req_packed_command(cmd).await.map_err(classify)? {
            Value::ServerError(e) => {
                let e = RedisError::from(e);
                if e.kind() != ErrorKind::NoScriptError {
                    return Err(classify(e));
                }
            }
            v => return Ok(v),
        }
    }
    Err(StoreError::Unavailable(
        "redis lost the script again after three reloads (NOSCRIPT)".into(),
    ))
}

/// Redis lost the script of `call`: load it again and retry the call.
async fn retry_after_reload(
    pool: &Pool,
    conn: &mut ConnectionManager,
    call: &Call,
    reloaded: &mut [bool; SCRIPTS],
) -> Result<Value, StoreError> {
    match &call.request {
        Request::Cmd(cmd) => reload_and_retry(pool, conn, call.script, cmd, reloaded).await,
        // (The module runs no script: it never answers NOSCRIPT.)
        Request::Debit { .. } => Err(StoreError::Protocol(
            "ENFORCER.DEBIT answered NOSCRIPT".into(),
        )),
    }
}

/// The pipeline of `batch`, in its order, and how many calls each of its commands answers:
/// runs of module debits (at most [`MAX_DEBITS_PER_CALL`]) become one call of many; every
/// other call is a command of its own.
fn pipeline(batch: &[Call]) -> (Pipeline, Vec<usize>) {
    let mut pipe = Pipeline::with_capacity(batch.len() + 1);
    let mut sizes = Vec::with_capacity(batch.len());
    let mut at = 0;
    while at < batch.len() {
        let run = batch[at..]
            .iter()
            .take(MAX_DEBITS_PER_CALL)
            .take_while(|c| matches!(c.request, Request::Debit { .. }))
            .count();
        match (&batch[at].request, run) {
            (Request::Cmd(cmd), _) => pipe.add_command(cmd.clone()),
            (Request::Debit { keys, args }, 1) => pipe.add_command(module_debit(keys, args)),
            (Request::Debit { .. }, _) => pipe.add_command(many_debits(&batch[at..at + run])),
        };
        let size = run.max(1);
        sizes.push(size);
        at += size;
    }
    (pipe, sizes)
}

/// `ENFORCER.DEBIT <sha1>:m numkeys key… packed`: the module debits of `calls` in one call.
fn many_debits(calls: &[Call]) -> Cmd {
    let mut cmd = redis::cmd("ENFORCER.DEBIT");
    let mut nkeys = 0;
    let mut debits = Vec::with_capacity(calls.len());
    for call in calls {
        if let Request::Debit { keys, args } = &call.request {
            nkeys += keys.len();
            debits.push((keys.len(), args.as_slice()));
        }
    }
    cmd.arg(module_form(true)).arg(nkeys);
    for call in calls {
        if let Request::Debit { keys, .. } = &call.request {
            cmd.arg(keys);
        }
    }
    cmd.arg(enforcer_redis::args::pack_many(&debits));
    cmd
}

/// The answers of a call of `size` debits: each debit's own (its reply, or its error), or the
/// call's error when Redis refused it as a whole.
fn split_many(answer: Value, size: usize) -> Result<Vec<Result<Value, StoreError>>, StoreError> {
    match answer {
        Value::Array(each) if each.len() == size => Ok(each
            .into_iter()
            .map(|a| match a {
                Value::ServerError(e) => Err(classify(RedisError::from(e))),
                v => Ok(v),
            })
            .collect()),
        Value::ServerError(e) => Err(classify(RedisError::from(e))),
        other => Err(StoreError::Protocol(format!(
            "a call of {size} debits got {other:?}"
        ))),
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("RedisStore");
        match &self.backend {
            Backend::Single { pool, .. } => d
                .field("connections", &pool.connections.len())
                .field("debit_sha", &pool.scripts[DEBIT].get_hash()),
            Backend::Cluster(pool) => d
                .field("cluster", &true)
                .field("debit_sha", &pool.scripts[DEBIT].get_hash()),
        };
        d.finish_non_exhaustive()
    }
}

/// The cluster slot of a key (or of its `{hash tag}`): CRC16-XMODEM mod 16384, as Redis
/// Cluster computes it.
pub fn slot_of(key: &[u8]) -> u16 {
    let tag = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &byte in tag {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// Nodes that `CLUSTER NODES` flags as failing or suspected (`fail`, `fail?`) or whose link is
/// down (`disconnected`), as the node asked sees them.
fn cluster_nodes_failing(text: &str) -> usize {
    text.lines()
        .filter(|l| {
            let mut fields = l.split(' ');
            let flags = fields.nth(2).unwrap_or("");
            let link = l.split(' ').nth(7).unwrap_or("");
            flags.split(',').any(|f| f == "fail" || f == "fail?") || link == "disconnected"
        })
        .count()
}

/// What `CLUSTER INFO` says (`/readyz`).
fn cluster_info(text: &str) -> serde_json::Value {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    let number = |name: &str| field(name).and_then(|v| v.parse::<u64>().ok());
    serde_json::json!({
        "state": field("cluster_state"),
        "slots_ok": number("cluster_slots_ok"),
        "slots_pfail": number("cluster_slots_pfail"),
        "slots_fail": number("cluster_slots_fail"),
        "known_nodes": number("cluster_known_nodes"),
        "primaries_with_slots": number("cluster_size"),
    })
}

/// The tier part of the settle script's `ARGV` (and the base of the grant and inspect
/// scripts'), computed once: window, default tier, kind, tier count, five arguments per tier.
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

/// The tier part of the debit script's `ARGV` (4 to 7), computed once: window, default tier,
/// kind, then every tier in one argument, a line each after a `\n`: name, index, and the four
/// numbers of [`script_args`]. (Redis spends about as much on each argument as the script
/// spends on finding the key's tier in one string: one argument instead of five per tier.)
fn debit_args(policy: &BudgetPolicy, kind: BucketKind) -> Vec<String> {
    let mut args = script_args(policy, kind);
    let tiers: String = args[4..]
        .chunks(5)
        .enumerate()
        .map(|(i, t)| format!("\n{} {i} {}", t[0], t[1..].join(" ")))
        .collect();
    args.truncate(3);
    args.push(tiers);
    args
}

/// The tier part of the grant script's `ARGV`: like the debit's, with each tier's ceiling.
fn grant_args(policy: &BudgetPolicy) -> Vec<String> {
    let mut args = script_args(policy, BucketKind::Main);
    // window, default tier, (no kind), n, then six values per tier.
    args.remove(2);
    let mut out = args[..3].to_vec();
    for (tier, chunk) in policy.tiers.iter().zip(args[3..].chunks(5)) {
        out.extend_from_slice(chunk);
        out.push(tier.grant_ceiling.to_string());
    }
    out
}

/// The inspect script's `ARGV`: the debit tail of main buckets, then the operational bucket.
fn inspect_args(policy: &BudgetPolicy) -> Vec<String> {
    let mut args = script_args(policy, BucketKind::Main);
    args.push(policy.operational.max_tokens.to_string());
    args.push(policy.operational.refill_per_sec.to_string());
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

/// `"s <tokens> <grant id>"` (spent) and `"x <tokens> <grant id>"` (expired) lines, as
/// debit.lua and grant.lua report what they did to a wallet.
fn grant_moves(lines: &str) -> Result<crate::wallet::GrantMoves, StoreError> {
    let mut moves = crate::wallet::GrantMoves::default();
    for line in lines.split('\n').filter(|l| !l.is_empty()) {
        let bad = || StoreError::Protocol(format!("grant move {line:?}"));
        let mut f = line.splitn(3, ' ');
        let (Some(tag), Some(tokens), Some(id)) = (f.next(), f.next(), f.next()) else {
            return Err(bad());
        };
        let m = crate::wallet::GrantMove {
            grant_id: id.to_owned(),
            tokens: number(tokens)?,
        };
        match tag {
            "s" => moves.spent.push(m),
            "x" => moves.expired.push(m),
            _ => return Err(bad()),
        }
    }
    Ok(moves)
}

fn number(s: &str) -> Result<f64, StoreError> {
    s.parse::<f64>()
        .map_err(|_| StoreError::Protocol(format!("not a number: {s:?}")))
}

#[async_trait]
impl TokenStore for RedisStore {
    async fn debit(&self, d: &Debit) -> Result<DebitOutcome, StoreError> {
        // Quota boundaries around this daemon's clock; the script picks by Redis TIME. Only
        // main-bucket debits are charged to a quota.
        let periods = match d.bucket {
            BucketKind::Main => {
                QuotaPeriods::around(&self.args.load().policy, crate::clock::SystemClock.now())
            }
            BucketKind::Operational => QuotaPeriods::default(),
        };
        self.debit_in_periods(d, &periods).await
    }

    async fn debit_in_periods(
        &self,
        d: &Debit,
        periods: &QuotaPeriods,
    ) -> Result<DebitOutcome, StoreError> {
        check_cost(d.cost)?;
        let cost = d.cost.to_string();
        // Held for the whole call (its arguments borrow from it): an `Arc`, not a short-lived
        // guard.
        let policy = self.args.load_full();
        // A shared budget pays for its members' main buckets; operational buckets are always
        // the key's own.
        let account = match d.bucket {
            BucketKind::Main => policy.account(&d.key),
            BucketKind::Operational => policy.own_account(&d.key),
        };
        let remembered = d.remembered(&policy.policy);
        let main = d.bucket == BucketKind::Main;
        // Only the keys this debit uses (lua/debit.lua's KEYS), in its order: bucket, tier,
        // wallet, record, quota, key limit. Each key costs Redis about as much as an argument.
        let mut keys = Vec::with_capacity(7);
        keys.extend([account.bucket(d.bucket), account.name("tier")]);
        if main {
            keys.push(account.name("w"));
        }
        if remembered {
            keys.push(account.record(&d.request_id));
        }
        if main && !periods.tiers.is_empty() {
            keys.push(account.name("q"));
        }
        if main && account.args.key_limit[0] != "-" {
            keys.push(account.key_limit());
        }
        let tail = match d.bucket {
            BucketKind::Main => &account.args.debit_main,
            BucketKind::Operational => &account.args.debit_ops,
        };
        let units = d.terms.units.to_string();
        let max_cost = d
            .terms
            .max_cost
            .map_or_else(|| "-".to_owned(), |m| m.to_string());
        let mut args: Vec<&str> = Vec::with_capacity(5 + tail.len());
        args.push(&cost);
        // A record ttl of 0: no request record is read or written (a generated id that is not
        // remembered, `Debit::remembered`).
        args.push(if !remembered {
            "0"
        } else if d.terms.reserve {
            &policy.settle_ttl_ms
        } else {
            &policy.record_ttl_ms
        });
        args.push(d.fingerprint.as_str());
        args.extend(tail.iter().map(String::as_str));
        args.push(&units);
        args.push(&max_cost);
        // QUOTA: the count, then name, amount and four period starts per quota tier.
        let quota_args: Vec<String> = std::iter::once(periods.tiers.len().to_string())
            .chain(periods.tiers.iter().flat_map(|(name, amount, b)| {
                [name.clone(), amount.to_string()]
                    .into_iter()
                    .chain(b.iter().map(|v| v.to_string()))
            }))
            .collect();
        args.extend(quota_args.iter().map(String::as_str));
        args.extend(account.args.key_limit.iter().map(String::as_str));
        // CANDIDATE: a last key and the candidate's arguments, only when one is evaluated
        // (nothing extra otherwise).
        let candidate = match (&account.args.candidate_args, d.candidate) {
            (Some(tail), Some(c)) if d.bucket == BucketKind::Main && !d.force => {
                check_cost(c)?;
                Some((c.to_string(), tail))
            }
            _ => None,
        };
        if let Some((c, tail)) = &candidate {
            args.push(c);
            args.extend(tail.iter().map(String::as_str));
            keys.push(account.candidate());
        }
        if d.force {
            // ARGV[6], the bucket kind: upper case charges whatever the balance.
            args[5] = match d.bucket {
                BucketKind::Main => "M",
                BucketKind::Operational => "O",
            };
        }
        // Up to 13 fields (15 with a candidate): more than redis-rs reads into a tuple. The
        // script leaves trailing empty fields out (each costs Redis about as much as an
        // argument): the first 7 are always there, a missing one after them is "".
        let reply: Vec<redis::Value> = self.eval(DEBIT, &keys, &args).await?;
        // Fields are read in place (text borrowed from the reply, integers as Redis sent
        // them): an owned `String` per field was a measurable part of a debit.
        let value = |i: usize| -> Result<Option<&redis::Value>, StoreError> {
            match reply.get(i) {
                Some(v) => Ok(Some(v)),
                None if i >= 7 && reply.len() >= 7 => Ok(None),
                None => Err(StoreError::Protocol(format!(
                    "debit answered {} fields",
                    reply.len()
                ))),
            }
        };
        let field = |i: usize| -> Result<Cow<'_, str>, StoreError> {
            let bad = || StoreError::Protocol(format!("debit field {i} is not text"));
            Ok(match value(i)? {
                None => Cow::Borrowed(""),
                Some(redis::Value::BulkString(b)) => {
                    Cow::Borrowed(std::str::from_utf8(b).map_err(|_| bad())?)
                }
                Some(redis::Value::SimpleString(s)) => Cow::Borrowed(s.as_str()),
                Some(redis::Value::Int(n)) => Cow::Owned(n.to_string()),
                Some(_) => return Err(bad()),
            })
        };
        let int = |i: usize| -> Result<i64, StoreError> {
            let bad = || StoreError::Protocol(format!("debit field {i} is not an integer"));
            match value(i)? {
                Some(redis::Value::Int(n)) => Ok(*n),
                _ => field(i)?.parse::<i64>().map_err(|_| bad()),
            }
        };
        let (status, allowed, remaining, retry, tier, cost, replayed, at) = (
            field(0)?,
            int(1)?,
            field(2)?,
            int(3)?,
            field(4)?,
            field(5)?,
            int(6)?,
            field(7)?,
        );
        let (denied_by, q_used, q_amount, q_resets, moves) =
            (field(8)?, field(9)?, field(10)?, field(11)?, field(12)?);
        let quota = if q_used.is_empty() {
            None
        } else {
            let resets_at = number(&q_resets)?;
            Some(QuotaUse {
                used: number(&q_used)?,
                amount: number(&q_amount)?,
                resets_at,
                resets_in_ms: ((resets_at - number(&at)?) * 1000.0).ceil().max(0.0) as u64,
            })
        };
        match status.as_ref() {
            "ok" => Ok(DebitOutcome::Settled(Settled {
                allowed: allowed == 1,
                remaining: number(&remaining)?,
                retry_after_ms: u64::try_from(retry).ok(),
                tier: tier.into_owned(),
                cost: number(&cost)?,
                replayed: replayed == 1,
                at: if replayed == 1 {
                    None
                } else {
                    Some(number(&at)?)
                },
                grants: grant_moves(&moves)?,
                quota,
                denied_by: DeniedBy::parse(&denied_by),
                candidate: if reply.len() >= 15 {
                    Some(super::CandidateOutcome {
                        allowed: field(13)? == "1",
                        remaining: number(&field(14)?)?,
                    })
                } else {
                    None
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
        let policy = self.args.load_full();
        let account = policy.account(key);
        let (bucket, record, quota) = (
            account.bucket(BucketKind::Main),
            account.record(request_id),
            account.name("q"),
        );
        let (status, credited, balance, as_of, tier, now): (
            String,
            String,
            String,
            String,
            String,
            String,
        ) = self.eval(REFUND, &[bucket, record, quota], &[]).await?;
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

    async fn settle(
        &self,
        key: &KeyHash,
        request_id: &RequestId,
        cost: TrueCost,
    ) -> Result<SettleOutcome, StoreError> {
        cost.check()?;
        let policy = self.args.load_full();
        let account = policy.account(key);
        let (bucket, tier, record, quota) = (
            account.bucket(BucketKind::Main),
            account.name("tier"),
            account.record(request_id),
            account.name("q"),
        );
        let (mode, amount) = match cost {
            TrueCost::Tokens(c) => ("c", c),
            TrueCost::Units(u) => ("u", u),
            TrueCost::UnitsReturned(u) => ("r", u),
        };
        let amount = amount.to_string();
        let mut args: Vec<&str> = Vec::with_capacity(2 + account.args.main_args.len());
        args.push(mode);
        args.push(&amount);
        args.extend(account.args.main_args.iter().map(String::as_str));
        let (status, cost, estimate, moved, balance, tier, at, capped): (
            String,
            String,
            String,
            String,
            String,
            String,
            String,
            String,
        ) = self
            .eval(SETTLE, &[bucket, tier, record, quota], &args)
            .await?;
        match status.as_str() {
            "ok" | "replay" => Ok(SettleOutcome::Settled {
                cost: number(&cost)?,
                estimate: number(&estimate)?,
                charged: number(&moved)?,
                capped: capped == "1",
                balance: number(&balance)?,
                tier,
                at: if status == "ok" {
                    Some(number(&at)?)
                } else {
                    None
                },
                replayed: status == "replay",
            }),
            "conflict" => Ok(SettleOutcome::Conflict {
                cost: number(&cost)?,
            }),
            "unknown_request" => Ok(SettleOutcome::UnknownRequest),
            "already_refunded" => Ok(SettleOutcome::AlreadyRefunded),
            "not_settleable" => Ok(SettleOutcome::NotSettleable),
            "units_unknown" => Ok(SettleOutcome::UnitsUnknown),
            "unknown_key" => Ok(SettleOutcome::UnknownKey),
            other => Err(StoreError::Protocol(format!("settle status {other:?}"))),
        }
    }

    async fn assign_tier(&self, key: &KeyHash, tier: Option<&str>) -> Result<(), StoreError> {
        let name = self.args.load().own_account(key).name("tier");
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
        self.query::<()>(&cmd).await
    }

    async fn grant_with(
        &self,
        key: &KeyHash,
        tokens: f64,
        grant_id: &RequestId,
        terms: GrantTerms,
    ) -> Result<GrantOutcome, StoreError> {
        check_cost(tokens)?;
        terms.check()?;
        let policy = self.args.load_full();
        // A grant to a member of a shared budget tops up the budget.
        let account = policy.account(key);
        let keys = [
            account.name("b"),
            account.name("tier"),
            account.name(&format!("g:{}", grant_id.as_str())),
            account.name("w"),
        ];
        let tokens = tokens.to_string();
        let expires_in = terms
            .expires_in
            .map_or_else(|| "-".to_owned(), |s| s.to_string());
        let priority = terms
            .priority
            .map_or_else(|| "-".to_owned(), |p| p.to_string());
        let max_grants = crate::wallet::MAX_GRANTS.to_string();
        let mut args: Vec<&str> = Vec::with_capacity(6 + account.args.grant_args.len());
        args.push(&tokens);
        args.push(&policy.record_ttl_ms);
        args.extend(account.args.grant_args.iter().map(String::as_str));
        args.extend([
            expires_in.as_str(),
            &priority,
            &max_grants,
            grant_id.as_str(),
        ]);
        let (status, balance, tier, at, ceiling, expires_at, expired): (
            String,
            String,
            String,
            String,
            String,
            String,
            String,
        ) = self.eval(GRANT, &keys, &args).await?;
        match status.as_str() {
            "ok" | "replay" => Ok(GrantOutcome::Granted {
                balance: number(&balance)?,
                tier,
                at: number(&at)?,
                replayed: status == "replay",
                expires_at: if expires_at == "-" {
                    None
                } else {
                    Some(number(&expires_at)?)
                },
                expired: grant_moves(&expired)?.expired,
            }),
            "unknown_key" => Ok(GrantOutcome::UnknownKey),
            "too_many_grants" => Ok(GrantOutcome::TooManyGrants),
            "over_ceiling" => Ok(GrantOutcome::OverCeiling {
                balance: number(&balance)?,
                ceiling: number(&ceiling)?,
                tier,
            }),
            other => Err(StoreError::Protocol(format!("grant status {other:?}"))),
        }
    }

    async fn inspect(&self, key: &KeyHash) -> Result<KeyState, StoreError> {
        let policy = self.args.load_full();
        let account = policy.account(key);
        let [
            assigned,
            tier,
            balance,
            stored,
            mut ops,
            _ops_stored,
            at,
            quota,
            wallet,
        ] = self.inspect_account(&account).await?;
        if account.member.is_some() {
            // A member's balance is its shared budget's; its operational bucket its own, in
            // its own slot: a second read.
            ops = self.inspect_account(&policy.own_account(key)).await?[4].clone();
        }
        let known = !tier.is_empty();
        let at = number(&at)?;
        let mut wallet = crate::wallet::Wallet::decode(&wallet)
            .map_err(|e| StoreError::Protocol(e.to_string()))?;
        wallet.expire(at);
        Ok(KeyState {
            grants: wallet.grants().to_vec(),
            // Boundaries at Redis TIME: the period the next debit would be charged in.
            quota: QuotaState::of(&policy.policy, &tier, QuotaState::parse_stored(&quota), at),
            assigned: (!assigned.is_empty()).then_some(assigned),
            tier: known.then_some(tier),
            balance: if known { Some(number(&balance)?) } else { None },
            stored: stored == "1",
            operational: number(&ops)?,
            shared_budget: policy.policy.shared.of(key).map(|b| b.name.clone()),
            at,
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.query::<String>(&redis::cmd("PING")).await.map(drop)
    }

    async fn heartbeat(&self, node: &str, ttl: Duration) -> Result<u32, StoreError> {
        let ttl = ttl.as_millis().max(1).to_string();
        let live: i64 = self
            .eval(HEARTBEAT, &[LIVE_NODES.to_owned()], &[node, &ttl])
            .await?;
        u32::try_from(live.max(1)).map_err(|_| StoreError::Protocol(format!("{live} live nodes")))
    }

    fn backend(&self) -> &'static str {
        match self.backend {
            Backend::Single { .. } => "redis",
            Backend::Cluster(_) => "redis-cluster",
        }
    }

    fn set_policy(&self, policy: &BudgetPolicy) -> Result<(), StoreError> {
        self.args.store(Arc::new(PolicyArgs::of(policy)));
        Ok(())
    }

    fn shards(&self) -> usize {
        match self.backend {
            Backend::Single { .. } => 1,
            Backend::Cluster(_) => CLUSTER_SHARDS,
        }
    }

    fn shard(&self, key: &KeyHash) -> usize {
        match self.backend {
            Backend::Single { .. } => 0,
            Backend::Cluster(_) => {
                usize::from(slot_of(key.to_hex().as_bytes())) * CLUSTER_SHARDS / 16384
            }
        }
    }

    async fn describe(&self) -> Option<serde_json::Value> {
        let (short_waits, cluster) = match &self.backend {
            Backend::Single { pool, .. } => (pool.short_waits.load(Ordering::Relaxed), None),
            Backend::Cluster(pool) => {
                let ask = |what: &'static str| async move {
                    let mut conn = pool.connection().await.ok()?;
                    let v = conn
                        .route_command(
                            redis::cmd("CLUSTER").arg(what),
                            RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary),
                        )
                        .await
                        .ok()?;
                    redis::from_owned_redis_value::<String>(v).ok()
                };
                let state = match (ask("INFO").await, ask("NODES").await) {
                    (Some(info), nodes) => {
                        let mut state = cluster_info(&info);
                        if let Some(nodes) = nodes {
                            state["nodes_failing"] = cluster_nodes_failing(&nodes).into();
                        }
                        state
                    }
                    (None, _) => serde_json::json!({"state": "unreachable"}),
                };
                (pool.short_waits.load(Ordering::Relaxed), Some(state))
            }
        };
        Some(serde_json::json!({
            "cluster": cluster,
            "short_waits": short_waits,
            "module": self.module.describe(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_refusal_to_run_the_command_falls_back_to_the_script() {
        let module = || Module::new(true);
        for refusal in [
            "An error was signalled by the server - ResponseError: unknown command \
             'ENFORCER.DEBIT', with args beginning with: 'abc' '4'",
            "ERR enforcer module: built from debit.lua 1234, called for 5678 (load the module \
             built with the daemon)",
            "NOPERM: this user has no permissions to run the 'enforcer.debit' command",
        ] {
            let m = module();
            assert!(m.use_now());
            assert!(
                m.refused(&StoreError::Rejected(refusal.into())),
                "{refusal}"
            );
            assert!(!m.use_now(), "the script for a while after {refusal}");
            assert_eq!(m.describe()["debit"], "script (module refused)");
            // A module call that was in flight is answered: still the script (no flapping).
            m.answered();
            assert!(!m.use_now(), "a call in flight does not end the window");
            // The window over: debits try the module, and its answer clears the state.
            m.off_until_ms
                .store(Module::now_ms() - 1, Ordering::Relaxed);
            assert!(m.use_now(), "the module is tried again after the window");
            m.answered();
            assert_eq!(m.off_until_ms.load(Ordering::Relaxed), 0);
            assert_eq!(m.describe()["debit"], "module");
        }
        // A debit the rule refused, an unreachable Redis or another ACL refusal is an answer
        // (or a failure) of its own: sending it again as the script would not change it.
        for other in [
            StoreError::Rejected("ERR enforcer: cost must be a finite number".into()),
            StoreError::Unavailable("connection refused".into()),
            StoreError::Unavailable("NOPERM: no permissions to access the 'ptb:{x}:b' key".into()),
            StoreError::Protocol("unknown command".into()),
        ] {
            let m = module();
            assert!(!m.refused(&other), "{other}");
            assert!(m.use_now());
        }
        let off = Module::new(false);
        assert!(!off.use_now());
        assert_eq!(off.describe()["debit"], "script");
    }

    #[test]
    fn slots_are_computed_as_redis_cluster_does() {
        // `CLUSTER KEYSLOT` of a Redis 7 cluster.
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"123456789"), 12739);
        // Only the hash tag counts; an empty tag does not make one.
        assert_eq!(slot_of(b"ptb:{foo}:b"), slot_of(b"foo"));
        assert_eq!(slot_of(b"ptb:{foo}:r:anything"), 12182);
        assert_eq!(slot_of(b"a{}b"), 13694);
    }

    #[test]
    fn the_debit_gets_every_tier_in_one_argument_with_its_index() {
        let policy = crate::config::Config::parse(include_str!("../../../examples/enforcer.toml"))
            .expect("the example config")
            .budget_policy();
        let main = debit_args(&policy, BucketKind::Main);
        let settle = script_args(&policy, BucketKind::Main);
        assert_eq!(main.len(), 4, "{main:?}");
        assert_eq!(main[..3], settle[..3], "window, default tier, kind");
        assert_eq!(main[2], "m");
        let lines: Vec<&str> = main[3].split('\n').collect();
        assert_eq!(lines[0], "", "every line follows a newline: {:?}", main[3]);
        assert_eq!(lines.len() - 1, policy.tiers.len());
        assert!(
            policy.tiers.len() > 1,
            "the example config has several tiers"
        );
        for (i, (line, tier)) in lines[1..].iter().zip(&policy.tiers).enumerate() {
            let b = tier.bucket;
            let want = format!(
                "{} {i} {} {} {} {}",
                tier.name, b.max_tokens, b.refill_per_sec, b.idle_cap, b.initial_tokens
            );
            assert_eq!(*line, want);
        }
        let ops = debit_args(&policy, BucketKind::Operational);
        assert_eq!(ops[2], "o");
        let first = ops[3].split('\n').nth(1).expect("a tier");
        assert!(
            first.ends_with(&format!(
                " {} {}",
                policy.operational.idle_cap, policy.operational.initial_tokens
            )),
            "{first}"
        );
    }

    #[test]
    fn failing_nodes_are_counted_from_cluster_nodes() {
        let nodes = "a 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460\n\
                     b 127.0.0.1:30002@40002 master,fail - 1 1 2 disconnected 5461-10922\n\
                     c 127.0.0.1:30003@40003 master - 0 1 3 connected 10923-16383\n\
                     d 127.0.0.1:30004@40004 slave,fail? a 0 1 1 connected\n";
        assert_eq!(cluster_nodes_failing(nodes), 2);
    }

    #[test]
    fn cluster_info_is_read_into_readyz_fields() {
        let info = "cluster_state:ok\r\ncluster_slots_assigned:16384\r\ncluster_slots_ok:16380\r\n\
                    cluster_slots_pfail:4\r\ncluster_slots_fail:0\r\ncluster_known_nodes:6\r\n\
                    cluster_size:3\r\n";
        let v = cluster_info(info);
        assert_eq!(v["state"], "ok");
        assert_eq!(v["slots_ok"], 16380);
        assert_eq!(v["slots_pfail"], 4);
        assert_eq!(v["known_nodes"], 6);
        assert_eq!(v["primaries_with_slots"], 3);
    }
}
