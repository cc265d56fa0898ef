//! Cost calibration end to end: a daemon (real Redis, real PostgreSQL ledger) prices three
//! endpoints alike, while the backend behind them (an exporter this test runs, scraped by a
//! real Prometheus) burns CPU in the ratio 1 : 3 : 8 per request, measured as thread CPU time
//! so that the machine's other load does not change it. `enforcer audit calibrate` must
//! recover the ratio within 5 % from the ledger and Prometheus alone, report the error before
//! and after, and `--write` a diff that `patch` applies to a config that is still valid.
use enforcer::config::Config;
use enforcer_tests::prom::{Exporter, PrivatePrometheus};
use enforcer_tests::{TestDaemon, check, enforcer_cli, redis_url, unique};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// CPU per request of each endpoint, in units of `UNIT`.
const WEIGHTS: [(&str, f64); 3] = [("/v1/a", 1.0), ("/v1/b", 3.0), ("/v1/c", 8.0)];
const UNIT: Duration = Duration::from_millis(2);
const ROUNDS: usize = 30;

const CONFIG: &str = r#"# calibration test config
[tiers.free]
max_tokens = 100000000
refill_per_sec = 0
initial_tokens = 100000000

[pricing.calibration]
# CPU-seconds of an endpoint over the window, from the backend's own counter.
cpu_seconds_query = 'sum(increase(backend_cpu_seconds_total{path="$path"}[$window]))'

[[pricing.endpoints]]
method = "POST"
path = "/v1/a"
base_cost = 5     # tokens per unit

[[pricing.endpoints]]
method = "POST"
path = "/v1/b"
base_cost = 5

[[pricing.endpoints]]
method = "POST"
path = "/v1/c"
base_cost = 5

[[pricing.endpoints]]
method = "GET"
path = "/health"
operational = true
"#;

fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Burns `d` of this thread's CPU time (not wall time: a busy machine only makes it slower).
fn burn(d: Duration) -> Duration {
    let start = thread_cpu();
    let mut x = 0u64;
    while thread_cpu() - start < d {
        for i in 0..1000u64 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
        }
    }
    thread_cpu() - start
}

fn exposition(spent: &[f64; 3]) -> String {
    let mut out = String::from("# TYPE backend_cpu_seconds_total counter\n");
    for ((path, _), s) in WEIGHTS.iter().zip(spent) {
        out.push_str(&format!(
            "backend_cpu_seconds_total{{path=\"{path}\"}} {s}\n"
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calibration_recovers_measured_cpu_ratios_and_writes_a_reviewable_diff() {
    let database_url = enforcer_tests::pg::fresh_database().await;
    let mut spent = [0.0f64; 3];
    let exporter = Exporter::start(&exposition(&spent));
    let prometheus = PrivatePrometheus::start(&exporter);
    let client =
        enforcer::pricing::telemetry::Prometheus::new(&prometheus.url(), Duration::from_secs(5));
    // A few scrapes of the zeros first (Prometheus starts scraping seconds after it is
    // ready): the counters' start is inside the window.
    let start = Instant::now();
    while !client
        .instant(
            r#"count_over_time(backend_cpu_seconds_total{path="/v1/c"}[1m])"#,
            None,
        )
        .await
        .is_ok_and(|n| n >= 3.0)
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "Prometheus never scraped the backend"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut config = Config::parse(CONFIG).expect("valid");
    config.store.redis_url = redis_url();
    config.ledger.database_url = database_url.clone();
    config.ledger.migrate = true;
    config.server.grpc_listen = String::new();
    let daemon = TestDaemon::start(config).await;
    let key = unique("calibrate");
    for _ in 0..ROUNDS {
        for (i, (path, weight)) in WEIGHTS.iter().enumerate() {
            let r = check(
                daemon.addr,
                json!({"key": key, "endpoint": path, "method": "POST"}),
            )
            .await;
            assert_eq!(r.status, 200, "{path}: {:?}", r.json());
            // The backend serves the request: its CPU, measured, goes to its counter.
            let used = tokio::task::spawn_blocking(move || burn(UNIT.mul_f64(*weight)))
                .await
                .expect("burn");
            spent[i] += used.as_secs_f64();
        }
        exporter.set(&exposition(&spent));
    }
    // The ledger rows reach PostgreSQL at the latest when the daemon stops.
    daemon.stop().await;
    // Prometheus has the final values once a scrape after the last update is in.
    let want = spent[2];
    let start = Instant::now();
    loop {
        let v = client
            .instant(r#"backend_cpu_seconds_total{path="/v1/c"}"#, None)
            .await;
        if v.is_ok_and(|v| (v - want).abs() < 1e-9) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "Prometheus never scraped the last values"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let dir = tempfile::tempdir().expect("tmp");
    let config_file = dir.path().join("enforcer.toml");
    std::fs::write(&config_file, CONFIG).expect("config file");
    let config_arg = config_file.display().to_string();
    let url = prometheus.url();
    let args = |extra: &[&'static str]| {
        let mut a = vec![
            "audit".to_owned(),
            "calibrate".to_owned(),
            "--config".to_owned(),
            config_arg.clone(),
            "--since".to_owned(),
            "10m".to_owned(),
            "--prometheus".to_owned(),
            url.clone(),
            "--database-url".to_owned(),
            database_url.clone(),
        ];
        a.extend(extra.iter().map(|s| (*s).to_owned()));
        a
    };
    let run = |a: Vec<String>| {
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        enforcer_cli(&refs, None)
    };

    let (code, out, err) = run(args(&["--format", "json"]));
    assert_eq!(code, 0, "{out}{err}");
    let report: Value = serde_json::from_str(&out).expect("JSON report");
    println!("{}", serde_json::to_string_pretty(&report).expect("json"));
    let endpoints = report["endpoints"].as_array().expect("endpoints");
    assert_eq!(endpoints.len(), 3, "{report}");
    let proposed = |path: &str| {
        endpoints
            .iter()
            .find(|e| e["path"] == path)
            .and_then(|e| e["proposed_base_cost"].as_f64())
            .unwrap_or_else(|| panic!("{path} in {report}"))
    };
    for e in endpoints {
        // Every request of an endpoint was charged 5 tokens.
        assert_eq!(e["requests"], ROUNDS as i64, "{e}");
        assert_eq!(e["tokens"].as_f64(), Some(5.0 * ROUNDS as f64), "{e}");
    }
    let a = proposed("/v1/a");
    for (path, weight) in WEIGHTS {
        let ratio = proposed(path) / a;
        assert!(
            (ratio / weight - 1.0).abs() < 0.05,
            "{path}: proposed ratio {ratio:.3} to /v1/a, burned {weight}: {report}"
        );
    }
    // Equal prices for 1 : 3 : 8 CPU: /v1/a is overpriced by 12/3 − 1 = 300 %, roughly.
    let before = report["error_before"]["max_abs"].as_f64().expect("error");
    assert!(before > 2.5, "{report}");
    let after = report["error_after"]["max_abs"].as_f64().expect("error");
    assert!(after < 0.01, "only rounding is left: {report}");
    assert!((report["spread"].as_f64().expect("spread") / 8.0 - 1.0).abs() < 0.05);
    // The operational endpoint is not in the cost matrix.
    assert!(!report.to_string().contains("/health"));

    // The table says the same, for people.
    let (code, table, err) = run(args(&[]));
    assert_eq!(code, 0, "{err}");
    println!("{table}");
    assert!(table.contains("calibration error now: max ±"), "{table}");
    assert!(table.contains("/v1/c"), "{table}");

    // --write: a diff beside the config, which stays as it was; `patch` applies it, and the
    // patched config is valid, keeps its comments and has the proposed prices.
    let (code, _, err) = run(args(&["--write"]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read_to_string(&config_file).expect("config"),
        CONFIG,
        "the config is never changed by calibrate"
    );
    let diff = dir.path().join("enforcer.toml.calibration.diff");
    assert!(err.contains("enforcer.toml.calibration.diff"), "{err}");
    let status = std::process::Command::new("patch")
        .arg(&config_file)
        .arg(&diff)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("patch runs");
    assert!(status.success(), "the diff applies with patch");
    let patched = std::fs::read_to_string(&config_file).expect("patched");
    assert!(
        patched.contains("# tokens per unit"),
        "comments kept: {patched}"
    );
    let patched = Config::parse(&patched).expect("the patched config is valid");
    for (path, _) in WEIGHTS {
        let e = patched
            .pricing
            .endpoints
            .iter()
            .find(|e| e.path == path)
            .expect("endpoint");
        assert_eq!(e.base_cost, proposed(path), "{path}");
    }

    // Without a way to measure an endpoint it is skipped with a reason, not guessed.
    let (code, out, err) = run(args(&["--format", "json", "--query", ""]));
    assert_ne!(code, 0, "nothing can be calibrated: {out}");
    assert!(err.contains("calibration_query"), "{err}");
}
