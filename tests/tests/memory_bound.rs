//! The embedded store's bound on request records, seen from outside: a daemon on the
//! embedded store with `store.memory_max_records` at its least (one per shard) counts each
//! record it had to drop in `enforcer_store_records_evicted_total`.
use enforcer::config::Config;
use enforcer_tests::{TestDaemon, check, metric, unique};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_request_records_are_counted_in_the_metrics() {
    let mut config = Config::default();
    assert!(config.store.redis_url.is_empty(), "the embedded store");
    config.store.memory_max_records = 64;
    config.server.grpc_listen = String::new();
    let daemon = TestDaemon::start(config).await;
    let name = "enforcer_store_records_evicted_total";
    assert_eq!(metric(daemon.addr, name).await, 0.0);
    // One key: all its records in one shard, which keeps one.
    let key = unique("bound");
    for i in 0..30 {
        let r = check(
            daemon.addr,
            json!({"key": key, "endpoint": "/x", "request_id": format!("r-{i}")}),
        )
        .await;
        assert_eq!(r.status, 200, "{:?}", r.json());
    }
    assert_eq!(metric(daemon.addr, name).await, 29.0);
    daemon.stop().await;

    // The bound is validated.
    let mut bad = Config::default();
    bad.store.memory_max_records = 10;
    assert!(
        bad.validate()
            .iter()
            .any(|e| e.path == "store.memory_max_records"),
        "below one record per shard"
    );
}
