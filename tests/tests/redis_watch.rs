//! The store's Redis watched for the seed's outage (a slow script blocks everyone for as long
//! as `busy-reply-threshold` lets it): the daemon exports the threshold it reads from a real
//! Redis (a private one, so the test may change its config), follows changes, and the mean
//! server-side time of a script call from `INFO commandstats`.
use enforcer::config::Config;
use enforcer_tests::{PrivateRedis, TestDaemon, check, metric, unique};
use serde_json::json;
use std::time::{Duration, Instant};

async fn until_metric(addr: std::net::SocketAddr, name: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let start = Instant::now();
    loop {
        let v = metric(addr, name).await;
        if ok(v) {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{name} stayed at {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_busy_reply_threshold_and_script_time_of_the_stores_redis_are_exported() {
    let redis = PrivateRedis::start();
    let mut conn = enforcer_tests::redis_conn(&redis.url()).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("busy-reply-threshold")
        .arg("5000")
        .query_async(&mut conn)
        .await
        .expect("config set");
    let mut config = Config::default();
    config.store.redis_url = redis.url();
    config.store.watch_interval_ms = 200;
    config.server.grpc_listen = String::new();
    let daemon = TestDaemon::start(config).await;
    let threshold = "enforcer_redis_busy_reply_threshold_seconds";
    until_metric(daemon.addr, threshold, |v| v == 5.0).await;

    // Script calls: their mean server time appears (a debit takes microseconds, not 0).
    let key = unique("watch");
    for _ in 0..20 {
        let r = check(daemon.addr, json!({"key": key, "endpoint": "/x"})).await;
        assert_eq!(r.status, 200);
    }
    let lua = until_metric(daemon.addr, "enforcer_redis_lua_execution_seconds", |v| {
        v > 0.0
    })
    .await;
    assert!(lua < 1.0, "a debit does not take a second: {lua}");

    // Unlimited (0) is the worst case: +Inf.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("busy-reply-threshold")
        .arg("0")
        .query_async(&mut conn)
        .await
        .expect("config set");
    until_metric(daemon.addr, threshold, f64::is_infinite).await;
    // A sane value is followed too.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("busy-reply-threshold")
        .arg("200")
        .query_async(&mut conn)
        .await
        .expect("config set");
    until_metric(daemon.addr, threshold, |v| (v - 0.2).abs() < 1e-9).await;
    daemon.stop().await;
}
