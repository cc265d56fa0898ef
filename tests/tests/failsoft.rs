//! Fail-soft (`on_store_failure = "local"`, issue 12 scenario 4) against a real Redis, and a
//! real Redis Cluster, and two daemons: the store is frozen for 5 s under load (every node of
//! the cluster at once); each daemon admits within its local share; after the store is back the
//! shared bucket holds what it held minus everything admitted, locally and through the store; a
//! replayed debit-back charges nothing.
use enforcer::config::{Config, OnStoreFailure, TierConfig};
use enforcer::key::{ApiKey, RequestId};
use enforcer::store::{
    BucketKind, Debit, DebitOutcome, Fingerprint, RedisStore, RedisStoreConfig, TokenStore,
};
use enforcer_tests::cluster::PrivateCluster;
use enforcer_tests::{PrivateRedis, TestDaemon, check, metric, redis_conn, unique};
use redis::aio::ConnectionLike;
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Tokens per request: `default_cost` (1) × 100 units.
const COST: f64 = 100.0;
/// The tier's capacity and starting balance; no refill, so every number is exact.
const CAPACITY: f64 = 1000.0;

/// The store under test: one Redis, or a cluster.
enum Store {
    One(PrivateRedis),
    Cluster(PrivateCluster),
}

impl Store {
    fn config(&self, local_nodes: u32, node: &str) -> Config {
        match self {
            Store::One(redis) => config(&redis.url(), local_nodes, node),
            Store::Cluster(cluster) => {
                let mut c = config("", local_nodes, node);
                c.store.redis_cluster = cluster.seeds();
                c
            }
        }
    }

    fn pause(&self) {
        match self {
            Store::One(redis) => redis.pause(),
            Store::Cluster(cluster) => cluster.pause_all(),
        }
    }

    fn resume(&self) {
        match self {
            Store::One(redis) => redis.resume(),
            Store::Cluster(cluster) => cluster.resume_all(),
        }
    }

    async fn conn(&self) -> Conn {
        match self {
            Store::One(redis) => Conn::One(redis_conn(&redis.url()).await),
            Store::Cluster(cluster) => Conn::Cluster(
                redis::cluster::ClusterClient::new(cluster.seeds())
                    .expect("cluster client")
                    .get_async_connection()
                    .await
                    .expect("cluster connection"),
            ),
        }
    }
}

/// A connection to either store, for reading what the daemons wrote.
enum Conn {
    One(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::One(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::One(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        0
    }
}

fn config(redis_url: &str, local_nodes: u32, node: &str) -> Config {
    let mut config = enforcer_tests::example_config(redis_url);
    config.tiers.insert(
        "failsoft".into(),
        TierConfig {
            max_tokens: CAPACITY,
            refill_per_sec: 0.0,
            idle_cap: 1.0,
            initial_tokens: Some(CAPACITY),
            shadow: false,
            grant_ceiling: None,
            low_balance: Vec::new(),
            quota: None,
        },
    );
    config.store.on_store_failure = OnStoreFailure::Local;
    config.store.local_nodes = local_nodes;
    config.store.heartbeat_ms = 200;
    // Generous for a busy machine: a healthy Redis must not look down.
    config.store.timeout_ms = 500;
    config.store.breaker_failures = 3;
    config.store.breaker_open_ms = 300;
    config.store.connect_timeout_ms = 500;
    config.ledger.node = node.to_owned();
    config
}

/// One answer, as the test saw it.
#[derive(Debug, Clone)]
struct Answer {
    daemon: usize,
    request_id: String,
    allowed: bool,
    mode: String,
    header_mode: String,
}

async fn ask(addr: SocketAddr, daemon: usize, key: &str) -> Answer {
    let request_id = unique("req");
    let r = check(
        addr,
        json!({"key": key, "endpoint": "/x", "method": "GET", "units": COST,
               "request_id": request_id}),
    )
    .await;
    assert!(
        r.status == 200 || r.status == 429,
        "status {}: {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    let body = r.json();
    assert_eq!(body["cost"], COST, "{body}");
    Answer {
        daemon,
        request_id,
        allowed: body["allowed"].as_bool().expect("allowed"),
        mode: body["mode"].as_str().expect("mode").to_owned(),
        header_mode: r.header("x-enforcer-mode").unwrap_or_default().to_owned(),
    }
}

/// The ledger rows a daemon wrote (all of them, whatever request).
fn ledger_rows(d: &TestDaemon) -> Vec<serde_json::Value> {
    std::fs::read_to_string(&d.ledger_file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["t"] == "decision")
        .collect()
}

/// Request records of a key in Redis that are charged (not refunded): request id → cost.
async fn records(conn: &mut Conn, hex: &str) -> HashMap<String, f64> {
    let prefix = format!("ptb:{{{hex}}}:r:");
    let names: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(conn)
        .await
        .expect("KEYS");
    let mut out = HashMap::new();
    for name in names {
        let record: String = redis::cmd("GET")
            .arg(&name)
            .query_async(conn)
            .await
            .expect("GET record");
        // kind|allowed|remaining|retry|tier|cost|max_tokens|refunded|fingerprint
        let f: Vec<&str> = record.split('|').collect();
        if f[7] == "1" {
            continue;
        }
        let cost: f64 = f[5].parse().expect("number");
        out.insert(name[prefix.len()..].to_owned(), cost);
    }
    out
}

async fn balance(conn: &mut Conn, hex: &str) -> f64 {
    let bucket: String = redis::cmd("GET")
        .arg(format!("ptb:{{{hex}}}:b"))
        .query_async(conn)
        .await
        .expect("bucket exists");
    bucket
        .split(' ')
        .next()
        .and_then(|b| b.parse().ok())
        .expect("balance")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_store_is_survived_within_shares_and_paid_back_once() {
    frozen_store_under_load(Store::One(PrivateRedis::start()), 2).await;
}

/// The same against a Redis Cluster whose six nodes all freeze for 5 s. Its node timeout is
/// longer than the outage: the scenario is the store going away and coming back, not a
/// failover (the cluster tests cover that).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_cluster_is_survived_within_shares_and_paid_back_once() {
    let cluster = PrivateCluster::start_with_node_timeout(15_000);
    frozen_store_under_load(Store::Cluster(cluster), 2).await;
}

/// The same with the node count from the heartbeat set: the count read before the outage (2)
/// is kept through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_heartbeat_count_is_kept_through_an_outage() {
    frozen_store_under_load(Store::One(PrivateRedis::start()), 0).await;
}

async fn wait_for_nodes(addr: SocketAddr, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let n = metric(addr, "enforcer_local_nodes").await;
        if n == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "enforcer_local_nodes is {n}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn frozen_store_under_load(redis: Store, local_nodes: u32) {
    let daemons = [
        TestDaemon::start(redis.config(local_nodes, "node-a")).await,
        TestDaemon::start(redis.config(local_nodes, "node-b")).await,
    ];
    for d in &daemons {
        wait_for_nodes(d.addr, 2.0).await;
    }
    let key = unique("failsoft-key");
    let hex = ApiKey::parse(&key).expect("key").hash().to_hex();
    let mut conn = redis.conn().await;
    redis::cmd("SET")
        .arg(format!("ptb:{{{hex}}}:tier"))
        .arg("failsoft")
        .query_async::<()>(&mut conn)
        .await
        .expect("assign tier");

    // Through the store: each daemon charges once (and learns the key's tier).
    let mut answers = Vec::new();
    for (i, d) in daemons.iter().enumerate() {
        let a = ask(d.addr, i, &key).await;
        assert!(a.allowed, "{a:?}");
        assert_eq!(a.mode, "enforce");
        answers.push(a);
    }
    assert_eq!(balance(&mut conn, &hex).await, CAPACITY - 2.0 * COST);

    // The store freezes for 5 s under load: 3 clients per daemon.
    redis.pause();
    let frozen = Instant::now();
    let mut load = Vec::new();
    for (i, d) in daemons.iter().enumerate() {
        for _ in 0..3 {
            let (addr, key) = (d.addr, key.clone());
            load.push(tokio::spawn(async move {
                let mut seen = Vec::new();
                while frozen.elapsed() < Duration::from_secs(5) {
                    seen.push(ask(addr, i, &key).await);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                seen
            }));
        }
    }
    let mut during = Vec::new();
    for task in load {
        during.extend(task.await.expect("load task"));
    }
    for d in &daemons {
        assert_eq!(
            metric(d.addr, "enforcer_local_nodes").await,
            2.0,
            "the count is kept while the store is away"
        );
    }
    redis.resume();

    // Each daemon admitted within its share (half the capacity), and did admit locally.
    let share = CAPACITY / 2.0;
    for i in 0..2 {
        let local: Vec<&Answer> = during
            .iter()
            .filter(|a| a.daemon == i && a.mode == "local")
            .collect();
        let admitted = local.iter().filter(|a| a.allowed).count() as f64 * COST;
        assert!(
            admitted <= share,
            "daemon {i} admitted {admitted} locally, share {share}"
        );
        assert_eq!(
            admitted, share,
            "daemon {i}: the load spent its whole share (no refill)"
        );
        assert!(
            local.iter().any(|a| !a.allowed),
            "daemon {i}: the load went past the share and was denied locally"
        );
        assert!(
            local.iter().all(|a| a.header_mode == "local"),
            "local decisions say so in x-enforcer-mode"
        );
    }
    answers.extend(during.iter().cloned());

    // Back: the reconcilers debit the local spending back.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut settled = true;
        for d in &daemons {
            settled &= metric(d.addr, "enforcer_local_pending_tokens").await == 0.0
                && metric(d.addr, "enforcer_local_debited_back_tokens_total").await == share;
        }
        if settled {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "local spending not debited back within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The shared bucket: what it held minus everything admitted, locally and by the store.
    // Its charges are its request records: the decisions the store made, and the debit-backs
    // (a summed one per key under an `lb-…` id for admissions never sent to Redis; one under
    // the request's own id for each whose call timed out, so that a call the frozen Redis ran
    // once it ran again is not charged twice; a local denial it ran and charged is refunded).
    let by_store: f64 = answers
        .iter()
        .filter(|a| a.allowed && a.mode == "enforce")
        .map(|_| COST)
        .sum();
    // Refunds of local denials the frozen Redis charged when it ran again may still be on
    // their way: wait for the books to settle (or fail with what they show).
    let deadline = Instant::now() + Duration::from_secs(30);
    let recs = loop {
        let recs = records(&mut conn, &hex).await;
        let charged: f64 = recs.values().sum();
        let now = balance(&mut conn, &hex).await;
        let want = CAPACITY - by_store - 2.0 * share;
        if (charged == by_store + 2.0 * share && now == want) || Instant::now() > deadline {
            assert_eq!(now, want, "the shared balance");
            assert_eq!(charged, by_store + 2.0 * share, "charges: {recs:?}");
            break recs;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let local_ids: HashSet<&str> = during
        .iter()
        .filter(|a| a.mode == "local")
        .map(|a| a.request_id.as_str())
        .collect();
    let local_admitted: HashSet<&str> = during
        .iter()
        .filter(|a| a.mode == "local" && a.allowed)
        .map(|a| a.request_id.as_str())
        .collect();
    for id in recs.keys() {
        assert!(
            id.starts_with("lb-")
                || !local_ids.contains(id.as_str())
                || local_admitted.contains(id.as_str()),
            "{id}: denied locally, yet charged"
        );
    }
    eprintln!(
        "admitted by the store: {by_store}; locally: {}; debit-backs under request ids: {}, summed: {}",
        2.0 * share,
        recs.keys()
            .filter(|id| local_admitted.contains(id.as_str()))
            .count(),
        recs.keys().filter(|id| id.starts_with("lb-")).count(),
    );

    // Nothing is admitted twice: the key's budget is spent, whichever daemon asks. (The
    // breaker may still be open for `breaker_open_ms` after Redis came back: those answers are
    // local, and denied too, the local shares being spent.)
    let mut after = Vec::new();
    for (i, d) in daemons.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let a = ask(d.addr, i, &key).await;
            assert!(!a.allowed, "{a:?}");
            let enforced = a.mode == "enforce";
            after.push(a);
            if enforced {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "daemon {i} does not go back to the store"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // The ledger: one row per local decision (decided_by local), one per debit-back.
    let inspect = redis.config(2, "test");
    let store = RedisStore::new(
        &RedisStoreConfig {
            url: inspect.store.redis_url.clone(),
            cluster: inspect.store.redis_cluster.clone(),
            connections: 1,
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(2),
            ..RedisStoreConfig::default()
        },
        &inspect.budget_policy(),
    )
    .expect("redis store");
    for (i, d) in daemons.iter().enumerate() {
        let local_ids: HashSet<&str> = during
            .iter()
            .chain(&after)
            .filter(|a| a.daemon == i && a.mode == "local")
            .map(|a| a.request_id.as_str())
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        let rows = loop {
            let rows = ledger_rows(d);
            let backs = rows
                .iter()
                .filter(|r| r["decided_by"] == "debit-back")
                .count();
            let locals = rows.iter().filter(|r| r["decided_by"] == "local").count();
            if (backs >= 1 && locals >= local_ids.len()) || Instant::now() > deadline {
                break rows;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let locals: HashSet<&str> = rows
            .iter()
            .filter(|r| r["decided_by"] == "local")
            .filter_map(|r| r["request_id"].as_str())
            .collect();
        assert_eq!(
            locals, local_ids,
            "daemon {i}: every local decision recorded"
        );
        let backs: Vec<&serde_json::Value> = rows
            .iter()
            .filter(|r| r["decided_by"] == "debit-back")
            .collect();
        let amount: f64 = backs.iter().filter_map(|r| r["cost"].as_f64()).sum();
        assert_eq!(amount, share, "daemon {i}: its debit-backs");

        // A debit-back sent again (its answer lost): a replay, nothing charged.
        let before = balance(&mut conn, &hex).await;
        for row in backs {
            let id = RequestId::parse(row["request_id"].as_str().expect("id")).expect("id");
            let amount = row["cost"].as_f64().expect("cost");
            let hash = ApiKey::parse(&key).expect("key").hash();
            let again = if id.as_str().starts_with("lb-") {
                enforcer::decision::local::debit_back(hash, BucketKind::Main, id, amount)
            } else {
                // Under the request's own id: the request itself, forced.
                Debit {
                    key: hash,
                    bucket: BucketKind::Main,
                    cost: amount,
                    request_id: id,
                    fingerprint: Fingerprint::of(BucketKind::Main, Some("GET"), "/x", COST),
                    force: true,
                    terms: enforcer::store::SettleTerms::default(),
                    candidate: None,
                }
            };
            match store.debit(&again).await.expect("redis answers") {
                DebitOutcome::Settled(s) => assert!(s.replayed, "{s:?}"),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            balance(&mut conn, &hex).await,
            before,
            "replays charge nothing"
        );
    }
    for d in daemons {
        d.stop().await;
    }
}

/// Without `local_nodes`, the daemons count themselves in Redis: two daemons split budgets in
/// two, and one that stops is no longer counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_count_follows_the_heartbeat() {
    let redis = PrivateRedis::start();
    let a = TestDaemon::start(config(&redis.url(), 0, "node-a")).await;
    let b = TestDaemon::start(config(&redis.url(), 0, "node-b")).await;
    wait_for_nodes(a.addr, 2.0).await;
    wait_for_nodes(b.addr, 2.0).await;
    b.stop().await;
    // Its heartbeat lapses after three ticks.
    wait_for_nodes(a.addr, 1.0).await;
    a.stop().await;
}
