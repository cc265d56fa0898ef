//! Several daemons, one Redis Cluster, one budget per key (issue 12): the real `enforcer`
//! binary, three processes started with `--redis-cluster`, driven over HTTP `/v1/check`.
//!
//! - one hot key hammered through three daemons, and keys spread over every primary: no key
//!   is admitted more than its capacity plus its refill over the whole run (shared cluster);
//! - a primary killed with SIGKILL under load: its slots follow the failure policy while the
//!   replica takes over, no request waits for the failover, decisions resume without
//!   `NOSCRIPT`/`MOVED` surfacing; acknowledged debits lost with the dead primary are counted
//!   (and with `wait_replicas = 1`, what it costs); with `wait_replicas = 1` a primary whose
//!   replica is down still decides, counting short acknowledgements — private cluster;
//! - slots moved between primaries under load: no store error, the bound still holds
//!   (private cluster).
//!
//! The numbers the failover tests measure are printed (`--nocapture`) for docs/scaling.md.
use enforcer_tests::cluster::{PrivateCluster, api_key_slot, cluster_nodes, redis_cluster_seeds};
use enforcer_tests::{Process, enforcer_bin, free_port, http, parse_metric, unique};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// One `enforcer run` process on the cluster.
struct Daemon {
    addr: SocketAddr,
    log: PathBuf,
    _process: Process,
    _dir: tempfile::TempDir,
}

/// Starts a daemon on `seeds` (passed as repeated `--redis-cluster`), with `store` appended to
/// its `[store]` section and `tiers` as its tier tables (the default tier is `test`). Every
/// request costs `cost` tokens.
async fn daemon(seeds: &[String], store: &str, tiers: &str, cost: f64) -> Daemon {
    daemon_with(seeds, store, tiers, cost, Seeds::Flags).await
}

/// How a daemon is given the seed nodes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Seeds {
    /// `--redis-cluster URL`, repeated.
    Flags,
    /// `ENFORCER_REDIS_CLUSTER`, comma-separated.
    Env,
}

async fn daemon_with(seeds: &[String], store: &str, tiers: &str, cost: f64, how: Seeds) -> Daemon {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let config = dir.path().join("enforcer.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"{addr}\"\n\
             [store]\n{store}\n\
             [budget]\ndefault_tier = \"test\"\n\
             {tiers}\n\
             [pricing]\ndefault_cost = {cost}\n"
        ),
    )
    .expect("write config");
    let log = dir.path().join("daemon.log");
    let mut cmd = Command::new(enforcer_bin());
    cmd.arg("run").arg("--config").arg(&config);
    cmd.env_remove("ENFORCER_REDIS_URL");
    match how {
        Seeds::Flags => {
            for seed in seeds {
                cmd.args(["--redis-cluster", seed]);
            }
            cmd.env_remove("ENFORCER_REDIS_CLUSTER");
        }
        Seeds::Env => {
            cmd.env("ENFORCER_REDIS_CLUSTER", seeds.join(","));
        }
    }
    let child = cmd
        .arg("--ledger-file")
        .arg(dir.path().join("ledger.jsonl"))
        .env("ENFORCER_GRPC_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn enforcer");
    let d = Daemon {
        addr,
        log,
        _process: Process(child),
        _dir: dir,
    };
    let start = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok()
            && http(addr, "GET", "/readyz", &[], "").await.status == 200
        {
            return d;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "daemon on {addr} not ready within 30 s: {}",
            std::fs::read_to_string(&d.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Daemon {
    /// The daemon's log so far.
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Debits answered with fewer replica acknowledgements than `wait_replicas` asked
    /// (`/readyz`: `store.state.short_waits`).
    async fn short_waits(&self) -> f64 {
        let r = http(self.addr, "GET", "/readyz", &[], "").await;
        r.json()["store"]["state"]["short_waits"]
            .as_f64()
            .unwrap_or_else(|| panic!("/readyz has no short_waits: {}", r.json()))
    }

    /// `/readyz`'s `store.state.module`: where debits go (`enforcer-redis` or the script).
    async fn module_state(&self) -> serde_json::Value {
        let r = http(self.addr, "GET", "/readyz", &[], "").await;
        r.json()["store"]["state"]["module"].clone()
    }

    /// The sum over every label set of a counter in `/metrics`.
    async fn counter_sum(&self, name: &str) -> f64 {
        let text = http(self.addr, "GET", "/metrics", &[], "").await;
        let text = String::from_utf8_lossy(&text.body).into_owned();
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
            .max(parse_metric(&text, name))
    }
}

/// What one `/v1/check` answered.
#[derive(Debug, Clone)]
struct Answer {
    daemon: usize,
    key: usize,
    /// When it was sent, since the run began.
    sent: Duration,
    latency: Duration,
    status: u16,
    allowed: bool,
    mode: String,
    cost: f64,
    remaining: Option<f64>,
}

/// A keep-alive HTTP/1.1 connection to one daemon (a new one after an error).
struct Conn {
    addr: SocketAddr,
    sender: Option<hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>>,
}

impl Conn {
    fn new(addr: SocketAddr) -> Self {
        Self { addr, sender: None }
    }

    /// `POST /v1/check` for `key`: status and JSON body.
    async fn check(&mut self, key: &str) -> (u16, serde_json::Value) {
        use http_body_util::BodyExt as _;
        for _ in 0..3 {
            if self.sender.is_none() {
                let Ok(stream) = tokio::net::TcpStream::connect(self.addr).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let (sender, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await
                        .expect("http handshake");
                tokio::spawn(conn);
                self.sender = Some(sender);
            }
            let Some(sender) = self.sender.as_mut() else {
                continue;
            };
            let body = serde_json::json!({"key": key, "endpoint": "/work", "method": "POST"});
            let req = hyper::Request::post("/v1/check")
                .header("host", "enforcer")
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from(
                    body.to_string(),
                )))
                .expect("request");
            let resp = match sender.send_request(req).await {
                Ok(r) => r,
                Err(_) => {
                    self.sender = None;
                    continue;
                }
            };
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            let json = serde_json::from_slice(&body).unwrap_or_else(|e| {
                panic!(
                    "{status}: not JSON ({e}): {}",
                    String::from_utf8_lossy(&body)
                )
            });
            return (status, json);
        }
        panic!("daemon on {} does not answer", self.addr)
    }
}

/// Drives `clients` connections per daemon. Each client sends `requests` checks (or, with
/// `requests == 0`, until `stop` is set), over `keys` in turn starting at its own offset.
async fn hammer(
    addrs: Vec<SocketAddr>,
    keys: Vec<String>,
    clients: usize,
    requests: usize,
    stop: Arc<AtomicBool>,
    t0: Instant,
) -> Vec<Answer> {
    let keys = Arc::new(keys);
    let mut tasks = Vec::new();
    for (d, &addr) in addrs.iter().enumerate() {
        for c in 0..clients {
            let keys = keys.clone();
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut conn = Conn::new(addr);
                let mut answers = Vec::new();
                let mut i = d * clients + c;
                while if requests == 0 {
                    !stop.load(Ordering::Relaxed)
                } else {
                    answers.len() < requests
                } {
                    let key = i % keys.len();
                    i += 1;
                    let sent = t0.elapsed();
                    let (status, body) = conn.check(&keys[key]).await;
                    answers.push(Answer {
                        daemon: d,
                        key,
                        sent,
                        latency: t0.elapsed() - sent,
                        status,
                        allowed: body["allowed"].as_bool().unwrap_or(false),
                        mode: body["mode"].as_str().unwrap_or("").to_owned(),
                        cost: body["cost"].as_f64().unwrap_or(0.0),
                        remaining: body["remaining"].as_f64(),
                    });
                }
                answers
            }));
        }
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("load task"));
    }
    all
}

/// Tokens admitted per key (allowed answers the store decided).
fn admitted_per_key(answers: &[Answer], keys: usize) -> Vec<f64> {
    let mut sums = vec![0.0; keys];
    for a in answers.iter().filter(|a| a.allowed && a.mode == "enforce") {
        sums[a.key] += a.cost;
    }
    sums
}

/// Asserts that every answer came from the store (no failure-policy decision) and every key
/// was admitted at most `capacity + refill × elapsed`, and ran dry at least once.
fn assert_bound(answers: &[Answer], keys: &[String], capacity: f64, refill: f64, elapsed: f64) {
    for a in answers {
        assert_eq!(a.status, if a.allowed { 200 } else { 429 }, "{a:?}");
    }
    let not_store: Vec<_> = answers.iter().filter(|a| a.mode != "enforce").collect();
    assert!(
        not_store.is_empty(),
        "{} of {} decisions were not made by the store, e.g. {:?}",
        not_store.len(),
        answers.len(),
        not_store.first()
    );
    let bound = capacity + refill * elapsed;
    for (k, admitted) in admitted_per_key(answers, keys.len()).iter().enumerate() {
        assert!(
            *admitted <= bound + 1e-6,
            "key {k} admitted {admitted} tokens, more than {capacity} + {refill}/s × {elapsed:.1} s = {bound:.1}"
        );
        assert!(
            *admitted >= capacity,
            "key {k}: only {admitted} of its {capacity} tokens admitted (lost debits?)"
        );
        assert!(
            answers.iter().any(|a| a.key == k && !a.allowed),
            "key {k} never ran dry: the run proves nothing about its bound"
        );
    }
}

const HOT_TIERS: &str =
    "[tiers.test]\nmax_tokens = 1000\nrefill_per_sec = 20\nidle_cap = 1.0\ninitial_tokens = 1000\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_daemons_keep_one_budget_for_a_hot_key() {
    let seeds = redis_cluster_seeds();
    let store = "timeout_ms = 1000\non_store_failure = \"fail-closed\"";
    // Two given the seeds by flags, one by the environment.
    let mut daemons = Vec::new();
    for how in [Seeds::Flags, Seeds::Flags, Seeds::Env] {
        daemons.push(daemon_with(&seeds, store, HOT_TIERS, 10.0, how).await);
    }
    for d in &daemons {
        let ready = http(d.addr, "GET", "/readyz", &[], "").await.json();
        assert_eq!(ready["store"]["backend"], "redis-cluster", "{ready}");
        assert_eq!(ready["store"]["state"]["cluster"]["state"], "ok", "{ready}");
    }
    let addrs: Vec<SocketAddr> = daemons.iter().map(|d| d.addr).collect();
    let keys = vec![unique("hot")];
    // 3 daemons × 8 clients × 40 checks of 10 tokens: 9600 tokens asked of a 1000-token
    // bucket refilling 20/s, so it runs dry unless the run takes minutes.
    let t0 = Instant::now();
    let answers = hammer(
        addrs.clone(),
        keys.clone(),
        8,
        40,
        Arc::new(AtomicBool::new(false)),
        t0,
    )
    .await;
    let elapsed = t0.elapsed().as_secs_f64();
    assert_bound(&answers, &keys, 1000.0, 20.0, elapsed);
    for d in 0..3 {
        assert!(
            answers.iter().any(|a| a.daemon == d && a.allowed),
            "daemon {d} admitted nothing: the budget was not shared by three deciders"
        );
    }
    let admitted = admitted_per_key(&answers, 1)[0];
    eprintln!(
        "hot key: {} checks in {elapsed:.1} s through 3 daemons, {admitted} tokens admitted (bound {:.0})",
        answers.len(),
        1000.0 + 20.0 * elapsed
    );
    for d in &daemons {
        assert_eq!(d.counter_sum("enforcer_store_errors_total").await, 0.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_spread_over_every_primary_each_keep_their_bound() {
    let seeds = redis_cluster_seeds();
    let store = "timeout_ms = 1000\non_store_failure = \"fail-closed\"";
    let tiers = "[tiers.test]\nmax_tokens = 100\nrefill_per_sec = 5\nidle_cap = 1.0\ninitial_tokens = 100\n";
    let mut daemons = Vec::new();
    for _ in 0..3 {
        daemons.push(daemon(&seeds, store, tiers, 10.0).await);
    }
    let addrs: Vec<SocketAddr> = daemons.iter().map(|d| d.addr).collect();
    let keys: Vec<String> = (0..48).map(|_| unique("spread")).collect();
    // The keys live on every primary of the cluster.
    let seed_port: u16 = seeds[0]
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .expect("seed port");
    let nodes = cluster_nodes(seed_port);
    let primaries: BTreeSet<String> = keys
        .iter()
        .map(|k| {
            let slot = api_key_slot(k);
            nodes
                .iter()
                .find(|n| n.primary && n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))
                .map(|n| n.id.clone())
                .unwrap_or_else(|| panic!("no primary for slot {slot}"))
        })
        .collect();
    assert_eq!(primaries.len(), 3, "48 random keys cover the 3 primaries");
    // Each key is asked 3 × 8 × 40 / 48 = 20 checks of 10 tokens: twice its capacity.
    let t0 = Instant::now();
    let answers = hammer(
        addrs.clone(),
        keys.clone(),
        8,
        40,
        Arc::new(AtomicBool::new(false)),
        t0,
    )
    .await;
    let elapsed = t0.elapsed().as_secs_f64();
    assert_bound(&answers, &keys, 100.0, 5.0, elapsed);
    for d in &daemons {
        assert_eq!(d.counter_sum("enforcer_store_errors_total").await, 0.0);
    }
}

/// What a failover run measured.
#[derive(Debug)]
struct Failover {
    /// Checks of the killed primary's key that the store acknowledged as allowed.
    acknowledged: f64,
    /// Of those, the debits the promoted replica holds (see the net-loss note below).
    persisted: f64,
    /// p50 / p99 of check latency before the kill, milliseconds.
    p50_ms: f64,
    p99_ms: f64,
    /// From the kill to the first decision of the store again for the key, seconds.
    outage_s: f64,
    /// Debits answered although fewer replicas than asked acknowledged them, all daemons.
    short_waits: f64,
}

/// A primary killed under load, on a private cluster, with `[store] wait_replicas`.
async fn failover_under_load(wait_replicas: u32) -> Failover {
    let mut cluster = PrivateCluster::start();
    let seeds = cluster.seeds();
    // The least store.timeout_ms allows with wait_replicas (WAIT gets 150 ms less).
    let timeout_ms = 300;
    let store = format!(
        "timeout_ms = {timeout_ms}\non_store_failure = \"fail-closed\"\nwait_replicas = {wait_replicas}"
    );
    // No refill: a key's balance moves only by debits, so the tokens spent are exact.
    let capacity = 1e9;
    let tiers = format!(
        "[tiers.test]\nmax_tokens = {capacity}\nrefill_per_sec = 0\nidle_cap = 1.0\ninitial_tokens = {capacity}\n"
    );
    let mut daemons = Vec::new();
    for _ in 0..3 {
        daemons.push(daemon(&seeds, &store, &tiers, 1.0).await);
    }
    let addrs: Vec<SocketAddr> = daemons.iter().map(|d| d.addr).collect();
    // Key 0 on the primary that will die, key 1 on another one.
    let doomed = unique("doomed");
    let victim = cluster.primary_of(api_key_slot(&doomed));
    let healthy = std::iter::repeat_with(|| unique("healthy"))
        .find(|k| cluster.primary_of(api_key_slot(k)).id != victim.id)
        .expect("a key on another primary");
    let replica = cluster.replica_of(&victim.id);
    let healthy_primary = cluster.primary_of(api_key_slot(&healthy)).id;
    let keys = vec![doomed, healthy];

    // Warm-up on other keys of the same two primaries, not counted. A cluster just made may
    // still settle its view of the slots in its first second, and redis-rs's cluster client
    // holds every request while it refreshes its slot map: CI once saw a check 0.5 s into
    // the load time out that way, before any kill. What is measured starts after that.
    let warm: Vec<String> = [victim.id.as_str(), healthy_primary.as_str()]
        .into_iter()
        .map(|id| {
            std::iter::repeat_with(|| unique("warm"))
                .find(|k| cluster.primary_of(api_key_slot(k)).id == id)
                .expect("a warm-up key on each primary")
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let warm_answers = hammer(addrs.clone(), warm, 4, 50, stop.clone(), Instant::now()).await;
    assert!(
        warm_answers.iter().any(|a| a.mode == "enforce"),
        "no warm-up check was decided by the store"
    );

    let t0 = Instant::now();
    let load = tokio::spawn(hammer(addrs.clone(), keys.clone(), 4, 0, stop.clone(), t0));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = t0.elapsed();
    cluster.kill(victim.port);
    // The replica takes over after cluster-node-timeout (2 s) and an election.
    let start = Instant::now();
    while !cluster
        .nodes()
        .iter()
        .any(|n| n.port == replica.port && n.primary && !n.slots.is_empty())
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "replica {} did not take over: {:?}",
            replica.port,
            cluster.nodes()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster
        .wait_healthy(Duration::from_secs(30))
        .expect("cluster ok after the failover");
    let promoted_at = t0.elapsed();
    // The operator's part: the dead node comes back, as the new primary's replica (with
    // `wait_replicas = 1` its slots need one; see the test of a primary without replica).
    cluster.restart(victim.port);
    cluster
        .wait_healthy(Duration::from_secs(30))
        .expect("the old primary rejoins as a replica");
    // Decisions resume; then more load on the new topology.
    let resume_deadline = Instant::now() + Duration::from_secs(20);
    let mut errors_after = Vec::new();
    // Probes of the doomed key the store charged (they are not in the load's answers).
    let mut probes_charged = 0.0;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Every daemon decides the doomed key again.
        let mut all = true;
        for d in &daemons {
            let (_, body) = Conn::new(d.addr).check(&keys[0]).await;
            if body["mode"] == "enforce" && body["allowed"] == true {
                probes_charged += 1.0;
            }
            all &= body["mode"] == "enforce";
        }
        if all {
            break;
        }
        assert!(
            Instant::now() < resume_deadline,
            "decisions for the failed primary's slots did not resume within 20 s of the takeover"
        );
    }
    let resumed_at = t0.elapsed();
    for d in &daemons {
        errors_after.push(d.counter_sum("enforcer_store_errors_total").await);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let answers = load.await.expect("load");
    // The probes of the resume loop were charged too: read them off the final balance.
    let mut probe = Conn::new(addrs[0]);
    let (_, last) = probe.check(&keys[0]).await;
    assert_eq!(last["mode"], "enforce", "{last}");

    // No store errors once the replica serves the slots.
    for (d, before) in daemons.iter().zip(&errors_after) {
        let now = d.counter_sum("enforcer_store_errors_total").await;
        assert_eq!(
            now,
            *before,
            "store errors after the takeover: {}",
            d.log_text()
        );
        let log = d.log_text();
        for word in ["NOSCRIPT", "MOVED", "ASK "] {
            assert!(
                !log.lines()
                    .any(|l| l.contains(word) && l.contains("token store call failed")),
                "{word} surfaced as a store failure: {log}"
            );
        }
        // Every node loads the enforcer-redis module (tests/src/cluster.rs): the debits
        // through the failover were the module's, never refused (the promoted replica has it).
        if std::env::var("ENFORCER_TEST_REDIS_MODULE").is_ok_and(|m| !m.is_empty()) {
            let state = d.module_state().await;
            assert_eq!(state["debit"], "module", "{state}");
            assert_eq!(state["module_fallbacks"], 0, "{state}");
            assert!(state["module_calls"].as_u64() > Some(100), "{state}");
        }
    }
    // Before the kill the store decided everything; on the healthy primary, everything but
    // what redis-rs's cluster client held back while it rebuilt its slot map. That client
    // flushes no request at all, for any node, while it recovers (`poll_flush` returns
    // Pending in `ConnectionState::Recover`, redis 0.32 cluster_handling/async_connection),
    // so a check of the healthy key sent during a refresh (after the takeover, or when the
    // old primary rejoins) may outlive `timeout_ms` and fail closed. CI saw one such, 3.7 s
    // after the kill. It is bounded to the topology changes, and fail-closed still admits
    // nothing (below); per-node connections would remove it (issue 16).
    let mut healthy_held: u32 = 0;
    for a in &answers {
        // Answered before the kill.
        if a.sent + a.latency < killed_at {
            assert_eq!(a.mode, "enforce", "{a:?} (killed at {killed_at:?})");
        }
        if a.key == 1 && a.mode != "enforce" {
            healthy_held += 1;
            assert!(
                a.sent + a.latency >= killed_at && a.sent <= resumed_at,
                "the healthy key failed outside the topology changes: {a:?} (killed at \
                 {killed_at:?}, resumed at {resumed_at:?})"
            );
        }
        // The failure policy: fail-closed never admits without the store.
        if a.mode != "enforce" {
            assert_eq!(a.mode, "fail-closed", "{a:?}");
            assert!(!a.allowed && a.status == 429, "{a:?}");
            // Only while the slot had no primary (plus the breaker's open time).
            assert!(
                a.sent <= resumed_at,
                "failure decision after decisions resumed: {a:?}"
            );
        }
    }
    // Nobody waited for the failover: each check ended within its store timeout and one
    // retry, with a second for a busy machine.
    let bound = Duration::from_millis(2 * timeout_ms + 1000);
    let slowest = answers.iter().map(|a| a.latency).max().expect("answers");
    assert!(
        slowest <= bound,
        "a check waited {slowest:?} (timeout_ms {timeout_ms}); the failover took {:?}",
        promoted_at - killed_at
    );
    // The healthy key was held up at moments, not for the failover's length.
    let healthy_in_window = answers
        .iter()
        .filter(|a| a.key == 1 && a.sent + a.latency >= killed_at && a.sent <= resumed_at)
        .count();
    assert!(
        healthy_held as usize * 2 <= healthy_in_window,
        "{healthy_held} of the healthy key's {healthy_in_window} checks during the failover failed"
    );
    let failed = answers
        .iter()
        .filter(|a| a.key == 0 && a.mode != "enforce")
        .count();
    assert!(
        failed > 0,
        "no decision for the dead primary's slots failed: the failover was not under load"
    );
    // The healthy key: every acknowledged debit is in its balance, no more, no less.
    let acked = |k: usize| {
        answers
            .iter()
            .filter(|a| a.key == k && a.allowed && a.mode == "enforce")
            .count() as f64
    };
    let healthy_last = answers
        .iter()
        .filter(|a| a.key == 1 && a.mode == "enforce")
        .filter_map(|a| a.remaining)
        .fold(f64::INFINITY, f64::min);
    // A check held back by the client's refresh may still reach Redis once the client
    // resumes (the daemon had answered it fail-closed): at most that many more.
    let spent = capacity - healthy_last;
    assert!(
        spent >= acked(1) && spent <= acked(1) + f64::from(healthy_held),
        "healthy key: spent {spent} tokens, acknowledged {} debits, {healthy_held} held",
        acked(1)
    );
    // The doomed key: the balance after one last probe tells how many debits survived
    // (the resume probes and the last one were charged too). A debit that timed out in the
    // daemon but reached Redis counts as persisted without being acknowledged, so
    // acknowledged − persisted is the net loss: a lower bound of what the failover lost.
    let remaining = last["remaining"].as_f64().expect("remaining");
    let persisted = capacity - remaining - 1.0 - probes_charged;
    let latencies: Vec<f64> = {
        let mut l: Vec<f64> = answers
            .iter()
            .filter(|a| a.sent < killed_at)
            .map(|a| a.latency.as_secs_f64() * 1000.0)
            .collect();
        l.sort_by(f64::total_cmp);
        l
    };
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    let first_resumed = answers
        .iter()
        .filter(|a| a.key == 0 && a.sent > killed_at && a.mode == "enforce")
        .map(|a| a.sent)
        .min()
        .unwrap_or(resumed_at);
    let mut short_waits = 0.0;
    for d in &daemons {
        short_waits += d.short_waits().await;
    }
    Failover {
        short_waits,
        acknowledged: acked(0),
        persisted,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        outage_s: (first_resumed - killed_at).as_secs_f64(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_under_load_fails_its_slots_per_policy_then_resumes() {
    let f = failover_under_load(0).await;
    let lost = f.acknowledged - f.persisted;
    eprintln!(
        "failover, wait_replicas = 0: acknowledged {} debits of the dead primary's key, {} persisted, {lost} lost; outage {:.2} s; p50 {:.2} ms p99 {:.2} ms before the kill",
        f.acknowledged, f.persisted, f.outage_s, f.p50_ms, f.p99_ms
    );
    assert!(f.acknowledged > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wait_replicas_an_acknowledged_debit_survives_the_failover() {
    let f = failover_under_load(1).await;
    let lost = f.acknowledged - f.persisted;
    eprintln!(
        "failover, wait_replicas = 1: acknowledged {} debits of the dead primary's key, {} persisted, {lost} lost, {} short waits; outage {:.2} s; p50 {:.2} ms p99 {:.2} ms before the kill",
        f.acknowledged, f.persisted, f.short_waits, f.outage_s, f.p50_ms, f.p99_ms
    );
    // A debit is only at risk when its WAIT came back short (the replica did not confirm it
    // within timeout_ms): the daemon counts those.
    assert!(
        lost <= f.short_waits,
        "{lost} acknowledged debits lost, but only {} answered without their replica's acknowledgement",
        f.short_waits
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_moved_under_load_keep_every_bound_without_errors() {
    let cluster = PrivateCluster::start();
    let seeds = cluster.seeds();
    let store = "timeout_ms = 1000\non_store_failure = \"fail-closed\"";
    let tiers = "[tiers.test]\nmax_tokens = 200\nrefill_per_sec = 10\nidle_cap = 1.0\ninitial_tokens = 200\n";
    let mut daemons = Vec::new();
    for _ in 0..3 {
        daemons.push(daemon(&seeds, store, tiers, 10.0).await);
    }
    let addrs: Vec<SocketAddr> = daemons.iter().map(|d| d.addr).collect();
    // `--cluster reshard` moves the lowest slots of the source first: keys in the first 600
    // slots of the source's range move, and keys elsewhere stay as a control.
    let nodes = cluster.nodes();
    let source = nodes
        .iter()
        .filter(|n| n.primary)
        .min_by_key(|n| n.slots[0].0)
        .expect("a primary")
        .clone();
    let target = nodes
        .iter()
        .find(|n| n.primary && n.id != source.id)
        .expect("another primary")
        .clone();
    let first = source.slots[0].0;
    let moving = first..first + 600;
    let mut keys: Vec<String> = std::iter::repeat_with(|| unique("moving"))
        .filter(|k| moving.contains(&api_key_slot(k)))
        .take(12)
        .collect();
    keys.extend(std::iter::repeat_with(|| unique("staying")).take(12));

    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let load = tokio::spawn(hammer(addrs.clone(), keys.clone(), 4, 0, stop.clone(), t0));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let out = tokio::task::spawn_blocking({
        let port = cluster.ports[0];
        let (from, to) = (source.id.clone(), target.id.clone());
        move || {
            Command::new("redis-cli")
                .arg("--cluster")
                .arg("reshard")
                .arg(format!("127.0.0.1:{port}"))
                .args(["--cluster-from", &from, "--cluster-to", &to])
                .args(["--cluster-slots", "600", "--cluster-yes"])
                .output()
                .expect("redis-cli --cluster reshard")
        }
    })
    .await
    .expect("reshard");
    assert!(
        out.status.success(),
        "reshard failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let resharded_at = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let answers = load.await.expect("load");
    let elapsed = t0.elapsed().as_secs_f64();

    // The slots did move, with the keys in them.
    for k in keys.iter().take(12) {
        assert_eq!(
            cluster.primary_of(api_key_slot(k)).id,
            target.id,
            "key {k} moved to the target"
        );
    }
    let moved_during = answers
        .iter()
        .filter(|a| a.key < 12 && a.sent > Duration::from_secs(2) && a.sent < resharded_at)
        .count();
    assert!(
        moved_during > 0,
        "no check of a moving key ran during the reshard"
    );
    assert_bound(&answers, &keys, 200.0, 10.0, elapsed);
    for d in &daemons {
        assert_eq!(
            d.counter_sum("enforcer_store_errors_total").await,
            0.0,
            "{}",
            d.log_text()
        );
    }
    let per_key: BTreeMap<usize, usize> = answers.iter().fold(BTreeMap::new(), |mut m, a| {
        *m.entry(a.key).or_default() += 1;
        m
    });
    eprintln!(
        "reshard of 600 slots took {:.1} s under load; {} checks, {:?} per key",
        (resharded_at - Duration::from_secs(2)).as_secs_f64(),
        answers.len(),
        per_key.values().collect::<Vec<_>>()
    );
}

/// `wait_replicas = 1` on a primary whose replica is down: docs/configuration.md says the
/// debit is answered and counted as a short acknowledgement (`/readyz` `short_waits`), so the
/// slots keep deciding (as after a failover, until the dead node is back as a replica).
///
/// `timeout_ms = 300`, the least the config allows with `wait_replicas`: Redis ends a blocked
/// `WAIT` on its event loop's timer (`hz` 10: up to 100 ms late; `WAIT 1 150` returns after
/// ~200 ms here), so `WAIT` gets 150 ms less than the call's bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wait_replicas_a_primary_without_replica_still_decides() {
    let mut cluster = PrivateCluster::start();
    let seeds = cluster.seeds();
    let tiers = "[tiers.test]\nmax_tokens = 1e9\nrefill_per_sec = 0\nidle_cap = 1.0\ninitial_tokens = 1e9\n";
    let store = "timeout_ms = 300\non_store_failure = \"fail-closed\"\nwait_replicas = 1";
    let d = daemon(&seeds, store, tiers, 1.0).await;
    let key = unique("lonely");
    let primary = cluster.primary_of(api_key_slot(&key));
    let replica = cluster.replica_of(&primary.id);
    let mut conn = Conn::new(d.addr);
    let (_, body) = conn.check(&key).await;
    assert_eq!(body["mode"], "enforce", "with its replica: {body}");
    cluster.kill(replica.port);
    // The primary notices that its replica is gone (the link drops at once).
    let start = Instant::now();
    while enforcer_tests::cluster::cli(primary.port, &["INFO", "replication"])
        .contains("connected_slaves:1")
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "replica still connected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut modes = BTreeMap::<String, usize>::new();
    for _ in 0..10 {
        let (_, body) = conn.check(&key).await;
        *modes
            .entry(body["mode"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    let short = d.short_waits().await;
    assert_eq!(
        modes.get("enforce").copied().unwrap_or(0),
        10,
        "without a replica, decisions of its slots were {modes:?} (short_waits {short}); {}; log: {}",
        String::from_utf8_lossy(&http(d.addr, "GET", "/metrics", &[], "").await.body)
            .lines()
            .filter(|l| l.starts_with("enforcer_store_errors_total"))
            .collect::<Vec<_>>()
            .join("; "),
        d.log_text()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(short >= 10.0, "short acknowledgements counted: {short}");
}

/// One Redis or a cluster, not both: the daemon refuses to start, naming the field.
#[test]
fn redis_url_and_redis_cluster_together_are_refused() {
    let out = Command::new(enforcer_bin())
        .args(["run", "--listen", "127.0.0.1:0"])
        .args(["--redis-url", "redis://127.0.0.1:1/"])
        .args(["--redis-cluster", "redis://127.0.0.1:2"])
        .env_remove("ENFORCER_REDIS_CLUSTER")
        .env_remove("ENFORCER_REDIS_URL")
        .output()
        .expect("run enforcer");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("store.redis_cluster"), "{err}");
    // A seed that is not a Redis URL is named too.
    let out = Command::new(enforcer_bin())
        .args(["run", "--listen", "127.0.0.1:0"])
        .env("ENFORCER_REDIS_CLUSTER", "redis://127.0.0.1:2,http://nope")
        .env_remove("ENFORCER_REDIS_URL")
        .output()
        .expect("run enforcer");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("store.redis_cluster[1]"), "{err}");
}

/// `wait_replicas` with a store bound too short for Redis's `WAIT` timer is refused at start.
#[test]
fn wait_replicas_with_a_short_timeout_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("enforcer.toml");
    std::fs::write(&config, "[store]\ntimeout_ms = 200\nwait_replicas = 1\n").expect("write");
    let out = Command::new(enforcer_bin())
        .args(["config", "check"])
        .arg(&config)
        .output()
        .expect("run enforcer");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("store.timeout_ms"), "{err}");
}
