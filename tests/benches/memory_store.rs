//! `cargo xtask bench memory`: the embedded store's latency tail from a fresh start. 50 tasks
//! on a 2-worker runtime debit keys drawn from 100 000, each call with a fresh request id (so
//! request records pile up, as at 50k decisions/s with a 600 s idempotency TTL), for
//! `--seconds` (default 10). Reports throughput and p50 / p99 / p99.9 / max of one debit, for
//! the first 10 s of the fresh store: the window where hash maps grow and sweeps run.
use enforcer::config::Config;
use enforcer::key::{ApiKey, RequestId};
use enforcer::store::{BucketKind, Debit, Fingerprint, MemoryStore, TokenStore};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TASKS: usize = 50;
const KEYS: usize = 100_000;

fn main() {
    let seconds: u64 = std::env::var("ENFORCER_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut config = Config::default();
    // The bench tier never runs dry: every call is the full allowed path.
    if let Some(t) = config.tiers.get_mut(&config.budget.default_tier) {
        t.max_tokens = 1e12;
        t.initial_tokens = Some(1e12);
        t.refill_per_sec = 1e6;
    }
    let store = Arc::new(MemoryStore::new(
        config.budget_policy(),
        Arc::new(enforcer::clock::SystemClock),
    ));
    let keys: Arc<Vec<_>> = Arc::new(
        (0..KEYS)
            .map(|i| {
                ApiKey::parse(&format!("bench-key-{i:08}"))
                    .expect("key")
                    .hash()
            })
            .collect(),
    );
    let fingerprint = Fingerprint::of(BucketKind::Main, Some("POST"), "/bench", 1.0);
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut latencies: Vec<u64> = runtime.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let store = store.clone();
            let keys = keys.clone();
            let fingerprint = fingerprint.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(1 << 20);
                let mut i = t;
                while Instant::now() < until {
                    i = (i * 7919 + 104_729) % KEYS;
                    let d = Debit {
                        key: keys[i],
                        bucket: BucketKind::Main,
                        cost: 1.0,
                        request_id: RequestId::generate(),
                        fingerprint: fingerprint.clone(),
                        force: false,
                        terms: enforcer::store::SettleTerms::default(),
                        candidate: None,
                    };
                    let start = Instant::now();
                    store.debit(&d).await.expect("debit");
                    lat.push(start.elapsed().as_nanos() as u64);
                    // Other tasks' turn, as requests on a server would interleave.
                    tokio::task::yield_now().await;
                }
                lat
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("task"));
        }
        all
    });
    latencies.sort_unstable();
    let over = |ms: u64| latencies.iter().filter(|&&l| l > ms * 1_000_000).count();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize] as f64 / 1e6;
    println!(
        "embedded store, fresh, {seconds} s, {TASKS} tasks, {KEYS} keys, fresh request ids: {} debits ({:.0}/s); p50 {:.4} ms, p99 {:.4} ms, p99.9 {:.4} ms, max {:.1} ms; {} over 1 ms, {} over 10 ms, {} over 100 ms; {} buckets, {} request records held, {} dropped for the cap",
        latencies.len(),
        latencies.len() as f64 / seconds as f64,
        pct(0.5),
        pct(0.99),
        pct(0.999),
        *latencies.last().expect("debits") as f64 / 1e6,
        over(1),
        over(10),
        over(100),
        store.bucket_count(),
        store.record_count(),
        store.records_evicted()
    );
}
