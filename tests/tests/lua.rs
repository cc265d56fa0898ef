//! `lua/debit.lua`, `lua/refund.lua` and `lua/settle.lua` against a real Redis: atomicity
//! under concurrency, idempotency, NOSCRIPT recovery, server time, the idle cap, argument
//! validation, key names.
use enforcer::budget::BudgetPolicy;
use enforcer::config::Config;
use enforcer::key::ApiKey;
use enforcer::store::{Debit, DebitOutcome, RedisStore, RedisStoreConfig, Settled, TokenStore};
use enforcer_tests::{redis_conn, redis_url, unique};
use redis::AsyncCommands;
use std::sync::Arc;
use std::time::Duration;

fn policy() -> BudgetPolicy {
    Config::default().budget_policy() // tier free: 1000 tokens, 10/s, idle cap 0.8 → starts at 800
}

fn store(url: &str) -> RedisStore {
    RedisStore::new(
        &RedisStoreConfig {
            url: url.to_owned(),
            connections: 2,
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(2),
            ..RedisStoreConfig::default()
        },
        &policy(),
    )
    .expect("redis store")
}

fn debit(key: &ApiKey, cost: f64) -> Debit {
    enforcer_tests::main_debit(key, cost)
}

async fn settle(store: &RedisStore, d: &Debit) -> Settled {
    match store.debit(d).await.expect("debit") {
        DebitOutcome::Settled(s) => s,
        other => panic!("unexpected outcome {other:?}"),
    }
}

fn bucket_name(key: &ApiKey) -> String {
    format!("ptb:{{{}}}:b", key.hash().to_hex())
}

/// The bucket as stored: `"<balance> <updated_at>"`.
async fn read_bucket(conn: &mut redis::aio::MultiplexedConnection, key: &ApiKey) -> (f64, f64) {
    let raw: String = conn.get(bucket_name(key)).await.expect("bucket exists");
    let (b, t) = raw.split_once(' ').expect("balance and time");
    (b.parse().expect("balance"), t.parse().expect("time"))
}

/// Rewrites the bucket's time stamp, keeping its balance and expiry.
async fn set_stamp(conn: &mut redis::aio::MultiplexedConnection, key: &ApiKey, t: f64) {
    let (b, _) = read_bucket(conn, key).await;
    let _: () = redis::cmd("SET")
        .arg(bucket_name(key))
        .arg(format!("{b} {t}"))
        .arg("KEEPTTL")
        .query_async(conn)
        .await
        .expect("set");
}

async fn redis_now(conn: &mut redis::aio::MultiplexedConnection) -> f64 {
    let (s, us): (f64, f64) = redis::cmd("TIME").query_async(conn).await.expect("TIME");
    s + us / 1e6
}

#[tokio::test]
async fn concurrent_debits_never_admit_more_than_capacity_plus_refill() {
    let url = redis_url();
    let store = Arc::new(store(&url));
    let key = ApiKey::parse(&unique("concurrency")).expect("key");
    let started = std::time::Instant::now();
    // 64 tasks × 10 debits of 10 tokens = 6400 tokens asked of a bucket holding 800.
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let store = store.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let mut admitted = 0u32;
            for _ in 0..10 {
                if settle(&store, &debit(&key, 10.0)).await.allowed {
                    admitted += 1;
                }
            }
            admitted
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.expect("task");
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Capacity 800 plus what refilled (10 tokens/s) while the test ran, in 10-token requests.
    let bound = ((800.0 + elapsed * 10.0) / 10.0).floor() as u32;
    assert!(admitted <= bound, "admitted {admitted} > bound {bound}");
    assert!(
        admitted >= 80,
        "the 80 affordable requests must all pass, got {admitted}"
    );
    let mut conn = redis_conn(&url).await;
    let (balance, _) = read_bucket(&mut conn, &key).await;
    assert!(balance >= 0.0, "balance went negative: {balance}");
}

#[tokio::test]
async fn a_retried_request_id_is_charged_once() {
    let store = store(&redis_url());
    let key = ApiKey::parse(&unique("idem")).expect("key");
    let d = debit(&key, 100.0);
    let first = settle(&store, &d).await;
    let again = settle(&store, &d).await;
    assert!(first.allowed && again.allowed);
    assert!(!first.replayed && again.replayed);
    assert_eq!(
        first.remaining, again.remaining,
        "the replay reports the first outcome"
    );
    // A new request id is charged.
    let other = settle(&store, &debit(&key, 100.0)).await;
    assert!(other.remaining < first.remaining - 99.0);
}

#[tokio::test]
async fn noscript_after_script_flush_reloads_and_retries() {
    let url = redis_url();
    let store = store(&url);
    let key = ApiKey::parse(&unique("noscript")).expect("key");
    settle(&store, &debit(&key, 1.0)).await;
    let mut conn = redis_conn(&url).await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .expect("flush");
    let s = settle(&store, &debit(&key, 1.0)).await;
    assert!(s.allowed, "the debit after SCRIPT FLUSH succeeded");
    assert!(
        (s.remaining - 798.0).abs() < 1.0,
        "charged once, not twice: {}",
        s.remaining
    );
    // Refunds have their own script: it is reloaded too.
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .expect("flush");
    let d = debit(&key, 5.0);
    settle(&store, &d).await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .expect("flush");
    store
        .refund(&key.hash(), &d.request_id)
        .await
        .expect("refund after flush");
}

#[tokio::test]
async fn refill_is_computed_from_redis_server_time() {
    let url = redis_url();
    let store = store(&url);
    let key = ApiKey::parse(&unique("time")).expect("key");
    settle(&store, &debit(&key, 800.0)).await; // empty the new bucket
    let mut conn = redis_conn(&url).await;
    let now = redis_now(&mut conn).await;
    let (_, stamp) = read_bucket(&mut conn, &key).await;
    assert!(
        (stamp - now).abs() < 1.0,
        "the bucket is stamped with Redis TIME: {stamp} vs {now}"
    );
    // Move the stamp 10 s into the (server's) past: the next debit must see 10 s × 10/s of refill.
    set_stamp(&mut conn, &key, now - 10.0).await;
    let s = settle(&store, &debit(&key, 50.0)).await;
    assert!(s.allowed);
    assert!(
        (s.remaining - 50.0).abs() < 1.0,
        "refilled 100, spent 50: {}",
        s.remaining
    );
}

#[tokio::test]
async fn an_idle_key_refills_only_to_the_idle_cap() {
    let url = redis_url();
    let store = store(&url);
    let key = ApiKey::parse(&unique("idle")).expect("key");
    settle(&store, &debit(&key, 700.0)).await; // 100 left
    let mut conn = redis_conn(&url).await;
    let now = redis_now(&mut conn).await;
    // Idle for 10 minutes (active window 60 s): refill would give 6000, the idle cap stops at 800.
    set_stamp(&mut conn, &key, now - 600.0).await;
    let s = settle(&store, &debit(&key, 1.0)).await;
    assert!(
        (s.remaining - 799.0).abs() < 0.5,
        "idle cap 0.8 × 1000, minus 1: {}",
        s.remaining
    );
    // Active (the previous request was just now): refill may reach the full 1000.
    let now = redis_now(&mut conn).await;
    set_stamp(&mut conn, &key, now - 30.0).await;
    let s = settle(&store, &debit(&key, 1.0)).await;
    assert!(
        (s.remaining - 999.0).abs() < 0.5,
        "active key refills to capacity: {}",
        s.remaining
    );
}

/// `EVALSHA` of the debit script with `keys` and `args`, which must be refused (`expect`
/// names the case); the error's text.
async fn refused(
    conn: &mut redis::aio::MultiplexedConnection,
    sha: &str,
    keys: &[String],
    args: &[&str],
    expect: &str,
) -> String {
    let result: redis::RedisResult<redis::Value> = redis::cmd("EVALSHA")
        .arg(sha)
        .arg(keys.len())
        .arg(keys)
        .arg(args)
        .query_async(conn)
        .await;
    result.expect_err(expect).to_string()
}

#[tokio::test]
async fn bad_arguments_are_errors_and_write_nothing() {
    let url = redis_url();
    let mut conn = redis_conn(&url).await;
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(enforcer::store::DEBIT_LUA)
        .query_async(&mut conn)
        .await
        .expect("load");
    let tag = unique("badargs");
    let name = |suffix: &str| format!("ptb:{{{tag}}}:{suffix}");
    // The keys a main-bucket debit with a record uses (lua/debit.lua's KEYS): bucket, tier,
    // wallet, record; then the quota usage or the key limit when the arguments have one.
    let keys = [name("b"), name("tier"), name("w"), name("r:1")];
    let with_quota = [name("b"), name("tier"), name("w"), name("r:1"), name("q")];
    let with_limit = [name("b"), name("tier"), name("w"), name("r:1"), name("k")];
    // ARGV[2..=6]: record ttl, fingerprint, window, default tier, kind.
    let head = ["60000", "ab12", "60", "free", "m"];
    // Every tier in one argument (lua/debit.lua, ARGV[7]).
    const TIER: &str = "\nfree 0 1000 10 0.8 800";
    // ARGV[8..]: units, max_cost, quota tier count, key limit.
    let tail = ["1", "-", "0", "-", "-"];
    fn args<'a>(parts: &[&[&'a str]]) -> Vec<&'a str> {
        parts.concat()
    }
    for cost in ["nan", "inf", "-inf", "-1", "0", "abc", "", "1e300"] {
        let err = refused(
            &mut conn,
            &sha,
            &keys,
            &args(&[&[cost], &head, &[TIER]]),
            &format!("cost {cost:?} must be refused"),
        )
        .await;
        assert!(err.contains("enforcer:"), "clear error for {cost:?}: {err}");
    }
    // A bad tier parameter is refused too, and so is a wrong key count.
    let err = refused(
        &mut conn,
        &sha,
        &keys,
        &args(&[&["1"], &head, &["\nfree 0 nan 10 0.8 800"], &tail]),
        "NaN max_tokens refused",
    )
    .await;
    assert!(err.contains("max_tokens"), "{err}");
    // The tiers argument is a line per tier, each after a newline.
    for tiers in ["free 0 1000 10 0.8 800", "", "\nfree 0 1000"] {
        let err = refused(
            &mut conn,
            &sha,
            &keys,
            &args(&[&["1"], &head, &[tiers], &tail]),
            &format!("tiers {tiers:?} refused"),
        )
        .await;
        assert!(err.contains("tier"), "{tiers:?}: {err}");
    }
    refused(
        &mut conn,
        &sha,
        &keys[..1],
        &args(&[&["1"], &head, &[TIER]]),
        "wrong key count refused",
    )
    .await;
    // The six keys of the layout before: one per kind of state, used or not.
    let six = [
        name("b"),
        name("tier"),
        name("r:1"),
        name("w"),
        name("q"),
        name("k"),
    ];
    let err = refused(
        &mut conn,
        &sha,
        &six,
        &args(&[&["1"], &head, &[TIER], &tail]),
        "six keys where four are used",
    )
    .await;
    assert!(err.contains("expected 4 keys"), "{err}");
    // A fingerprint that is not hex (it would corrupt the `|`-separated request record).
    for fingerprint in ["", "a|b", "xyz"] {
        let err = refused(
            &mut conn,
            &sha,
            &keys,
            &["1", "60000", fingerprint, "60", "free", "m", TIER],
            &format!("fingerprint {fingerprint:?} must be refused"),
        )
        .await;
        assert!(err.contains("fingerprint"), "{err}");
    }
    // Units and max_cost (kept in the request record for a settle) are checked too.
    for (units, max_cost) in [
        ("0", "-"),
        ("nan", "-"),
        ("-1", "-"),
        ("1", "0"),
        ("1", "x"),
    ] {
        let err = refused(
            &mut conn,
            &sha,
            &keys,
            &args(&[&["1"], &head, &[TIER, units, max_cost]]),
            &format!("units {units:?}, max_cost {max_cost:?}"),
        )
        .await;
        let what = if units == "1" { "max_cost" } else { "units" };
        assert!(err.contains(what), "{what}: {err}");
    }
    // The calendar-quota block: a bad count, amount or boundary, a missing tier entry, and
    // Redis TIME outside every period passed (the daemon's clock far off) are refused.
    let now = redis_now(&mut conn).await;
    let (past, far) = ((now - 86_400.0).to_string(), (now - 3600.0).to_string());
    let (start, end) = ((now - 60.0).to_string(), (now + 3600.0).to_string());
    let later = (now + 7200.0).to_string();
    for (quota, what) in [
        (vec!["x"], "quota tier count"),
        (vec!["1"], "missing quota"),
        (
            vec!["1", "free", "nan", &past, &start, &end, &later],
            "quota amount",
        ),
        (
            vec!["1", "free", "100", &past, "abc", &end, &later],
            "quota boundary",
        ),
        (
            vec!["1", "free", "100", &past, &past, &far, &far],
            "outside the quota periods",
        ),
    ] {
        // No key limit after the quota block.
        let err = refused(
            &mut conn,
            &sha,
            &with_quota,
            &args(&[&["1"], &head, &[TIER, "1", "-"], &quota, &["-", "-"]]),
            &format!("quota arguments {quota:?}"),
        )
        .await;
        assert!(err.contains(what), "{what}: {err}");
    }
    // A shared budget member's key limit (after the quota block): positive numbers or "-".
    for (limit, what) in [
        (["x", "1"], "key limit max_tokens"),
        (["0", "1"], "key limit must be > 0"),
        (["10", "0"], "key limit must be > 0"),
        (["10", "nan"], "key limit refill_per_sec"),
    ] {
        let err = refused(
            &mut conn,
            &sha,
            &with_limit,
            &args(&[&["1"], &head, &[TIER, "1", "-", "0"], &limit]),
            &format!("key limit {limit:?}"),
        )
        .await;
        assert!(err.contains(what), "{what}: {err}");
    }
    let every = [
        name("b"),
        name("tier"),
        name("w"),
        name("r:1"),
        name("q"),
        name("k"),
    ];
    let exists: u32 = conn.exists(&every[..]).await.expect("exists");
    assert_eq!(exists, 0, "nothing was written for bad arguments");
}

/// `lua/settle.lua` refuses bad arguments with a clear error and writes nothing: the bucket
/// and the request record stay as the debit left them.
#[tokio::test]
async fn settle_refuses_bad_arguments_and_writes_nothing() {
    let url = redis_url();
    let mut conn = redis_conn(&url).await;
    let key = ApiKey::parse(&unique("settle-args")).expect("key");
    let d = debit(&key, 100.0);
    assert!(settle(&store(&url), &d).await.allowed);
    let h = key.hash().to_hex();
    let keys = [
        format!("ptb:{{{h}}}:b"),
        format!("ptb:{{{h}}}:tier"),
        format!("ptb:{{{h}}}:r:{}", d.request_id.as_str()),
        format!("ptb:{{{h}}}:q"),
    ];
    let before: (String, String) = redis::cmd("MGET")
        .arg(&keys[0])
        .arg(&keys[2])
        .query_async(&mut conn)
        .await
        .expect("mget");
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(enforcer::store::SETTLE_LUA)
        .query_async(&mut conn)
        .await
        .expect("load");
    let tier = ["free", "1000", "10", "0.8", "800"];
    for (mode, amount) in [
        ("c", "-1"),
        ("c", "nan"),
        ("c", "inf"),
        ("c", "1e16"),
        ("u", "abc"),
        ("x", "1"),
        ("", "1"),
    ] {
        let result: redis::RedisResult<redis::Value> = redis::cmd("EVALSHA")
            .arg(&sha)
            .arg(4)
            .arg(&keys)
            .arg(&[mode, amount, "60", "free", "m", "1"][..])
            .arg(&tier)
            .query_async(&mut conn)
            .await;
        let err = result.expect_err(&format!("{mode:?} {amount:?} must be refused"));
        assert!(err.to_string().contains("enforcer:"), "{err}");
    }
    // A bad tier parameter, a bucket kind other than the main bucket, a wrong key count.
    for args in [
        [
            "c", "1", "60", "free", "m", "1", "free", "nan", "10", "0.8", "800",
        ],
        [
            "c", "1", "60", "free", "o", "1", "free", "1000", "10", "0.8", "800",
        ],
    ] {
        let result: redis::RedisResult<redis::Value> = redis::cmd("EVALSHA")
            .arg(&sha)
            .arg(4)
            .arg(&keys)
            .arg(&args[..])
            .query_async(&mut conn)
            .await;
        assert!(result.is_err(), "{args:?} refused");
    }
    let result: redis::RedisResult<redis::Value> = redis::cmd("EVALSHA")
        .arg(&sha)
        .arg(2)
        .arg(&keys[..2])
        .arg(&["c", "1", "60", "free", "m", "1"][..])
        .arg(&tier)
        .query_async(&mut conn)
        .await;
    assert!(result.is_err(), "wrong key count refused");
    let after: (String, String) = redis::cmd("MGET")
        .arg(&keys[0])
        .arg(&keys[2])
        .query_async(&mut conn)
        .await
        .expect("mget");
    assert_eq!(after, before, "nothing was written for bad arguments");
}

#[tokio::test]
async fn the_store_rejects_bad_costs_before_redis() {
    let store = store(&redis_url());
    let key = ApiKey::parse(&unique("badcost")).expect("key");
    for cost in [f64::NAN, f64::INFINITY, -1.0, 0.0] {
        assert!(
            store.debit(&debit(&key, cost)).await.is_err(),
            "cost {cost} refused"
        );
    }
}

#[tokio::test]
async fn raw_keys_never_reach_redis() {
    let url = redis_url();
    let store = store(&url);
    let raw = unique("raw-secret-key");
    let key = ApiKey::parse(&raw).expect("key");
    let d = debit(&key, 1.0);
    settle(&store, &d).await;
    store
        .assign_tier(&key.hash(), Some("free"))
        .await
        .expect("assign");
    let mut conn = redis_conn(&url).await;
    let pattern = format!("ptb:{{{}}}:*", key.hash().to_hex());
    let names: Vec<String> = conn.keys(&pattern).await.expect("keys");
    assert_eq!(names.len(), 3, "bucket, tier and request record: {names:?}");
    let all: Vec<String> = conn.keys("*").await.expect("keys");
    assert!(
        all.iter().all(|n| !n.contains(&raw)),
        "a key name contains the raw key"
    );
    for name in names {
        let dump: Vec<u8> = redis::cmd("DUMP")
            .arg(&name)
            .query_async(&mut conn)
            .await
            .expect("dump");
        assert!(
            !String::from_utf8_lossy(&dump).contains(&raw),
            "the value of {name} contains the raw key"
        );
    }
}

#[tokio::test]
async fn buckets_expire_once_refill_would_have_filled_them() {
    let url = redis_url();
    let store = store(&url);
    let key = ApiKey::parse(&unique("ttl")).expect("key");
    settle(&store, &debit(&key, 1.0)).await;
    let mut conn = redis_conn(&url).await;
    let ttl: i64 = conn.pttl(bucket_name(&key)).await.expect("pttl");
    // active window 60 s + 1000 tokens / 10 per s = 160 s.
    assert!((159_000..=160_000).contains(&ttl), "bucket ttl {ttl} ms");
}
