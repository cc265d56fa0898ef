//! The pricing engine: its Prometheus source against a real Prometheus server (started here,
//! scraping an exporter this test runs), with the server's failure modes; and the daemon's
//! prices under CPU load generated on this machine, through `GET /v1/costs` and `enforcer costs`.
use async_trait::async_trait;
use enforcer::config::Config;
use enforcer::metrics::Metrics;
use enforcer::price::PriceBook;
use enforcer::pricing::telemetry::{Prometheus, Signal, TelemetryError, TelemetrySource};
use enforcer::pricing::{Cost, Engine};
use enforcer_tests::prom::{Exporter, PrivatePrometheus};
use enforcer_tests::{TestDaemon, enforcer_bin, http};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A node whose readings the test fixes.
#[derive(Debug)]
struct FixedNode;

#[async_trait]
impl TelemetrySource for FixedNode {
    fn name(&self) -> &'static str {
        "node"
    }
    async fn read(&self, signal: &Signal) -> Result<f64, TelemetryError> {
        match signal {
            Signal::NodeCpu => Ok(0.2),
            Signal::NodeMemory => Ok(0.3),
            Signal::NodeLoad => Ok(0.35),
            Signal::Query(_) => Err(TelemetryError::Unsupported),
        }
    }
}

const REPORT_CPU: &str = r#"backend_cpu_cores{endpoint="report"}"#;
const REPORT_MEM: &str = r#"backend_memory_bytes{endpoint="report"}"#;

fn series(cpu: f64) -> String {
    format!(
        "backend_cpu_cores{{endpoint=\"report\"}} {cpu}\n\
         backend_memory_bytes{{endpoint=\"report\"}} 536870912\n\
         backend_cpu_cores{{endpoint=\"broken\"}} NaN\n"
    )
}

fn cost(costs: &[Cost], endpoint: &str) -> Cost {
    costs
        .iter()
        .find(|c| c.endpoint == endpoint)
        .cloned()
        .unwrap_or_else(|| panic!("no {endpoint} in {costs:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prometheus_source_against_a_real_server_and_its_failures() {
    let exporter = Exporter::start(&series(0.9));
    let mut server = PrivatePrometheus::start(&exporter);
    let source = Arc::new(Prometheus::new(&server.url(), Duration::from_millis(500)));
    let cpu = Signal::Query(REPORT_CPU.into());
    let start = Instant::now();
    while source.read(&cpu).await != Ok(0.9) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no scrape reached Prometheus"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nonsense is refused: no series, NaN, several series, a query Prometheus cannot parse.
    for bad in [
        r#"backend_cpu_cores{endpoint="missing"}"#,
        r#"backend_cpu_cores{endpoint="broken"}"#,
        "backend_cpu_cores",
        "sum(",
    ] {
        let r = source.read(&Signal::Query(bad.into())).await;
        assert!(
            matches!(r, Err(TelemetryError::Nonsense(_))),
            "{bad}: {r:?}"
        );
    }

    // The engine over it. α = 1 so the multiplier is the score of this tick.
    let config = Config::parse(&format!(
        r#"
        [pricing]
        dynamic = true
        alpha = 1.0
        prometheus = {{ url = "{}", timeout_ms = 500 }}
        [[pricing.endpoints]]
        method = "POST"
        path = "/generate-report"
        base_cost = 120
        cpu_query = '{REPORT_CPU}'
        cpu_reference = 0.5
        memory_query = '{REPORT_MEM}'
        memory_reference = 1073741824
        "#,
        server.url()
    ))
    .expect("valid");
    let book = PriceBook::new(&config.pricing);
    let metrics = Metrics::new();
    let mut engine = Engine::new(
        &config.pricing,
        &book,
        Arc::new(FixedNode),
        Some(Arc::clone(&source) as Arc<dyn TelemetrySource>),
        metrics.clone(),
        None,
    );
    engine.tick().await;
    let costs = engine.costs().get();
    let report = cost(&costs, "/generate-report");
    // cpu 0.9/0.5 = 1.8, memory 0.5 GiB/1 GiB = 0.5, load 0.35:
    // 0.65·1.8 + 0.25·0.5 + 0.10·0.35 = 1.33.
    assert_eq!(report.source, "prometheus");
    assert!((report.multiplier - 1.33).abs() < 1e-9, "{report:?}");
    assert!((report.price - 159.6).abs() < 1e-6);
    let report_path = book.endpoint("/generate-report").expect("normal form");
    let live = book
        .price(Some("POST"), &report_path)
        .expect("priced")
        .per_unit();
    assert!((live - 159.6).abs() < 1e-6, "decisions see the new price");
    // The default endpoint has no queries: node only, 0.445, held at the floor 0.5.
    let default = cost(&costs, "default");
    assert_eq!((default.source.as_str(), default.multiplier), ("node", 0.5));

    // The backend gets busier: the price follows at the next scrape.
    exporter.set(&series(1.5));
    let start = Instant::now();
    loop {
        engine.tick().await;
        let m = cost(&engine.costs().get(), "/generate-report").multiplier;
        // cpu capped at 3: 0.65·3 + 0.125 + 0.035 = 2.11.
        if (m - 2.11).abs() < 1e-9 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "multiplier {m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Prometheus down: the tick stays short, the last good values hold, the errors are counted.
    server.stop();
    let before = metrics
        .telemetry_errors
        .with_label_values(&["prometheus", "unavailable"])
        .get();
    let started = Instant::now();
    engine.tick().await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let held = cost(&engine.costs().get(), "/generate-report");
    assert!((held.multiplier - 2.11).abs() < 1e-9, "{held:?}");
    let after = metrics
        .telemetry_errors
        .with_label_values(&["prometheus", "unavailable"])
        .get();
    assert_eq!(after - before, 2, "both queries failed and were counted");
}

async fn costs(addr: std::net::SocketAddr) -> Vec<Cost> {
    let r = http(addr, "GET", "/v1/costs", &[], String::new()).await;
    assert_eq!(r.status, 200);
    serde_json::from_slice(&r.body).expect("costs JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prices_rise_under_cpu_load_and_fall_back_after() {
    let mut config = Config::parse(
        r#"
        [pricing]
        dynamic = true
        interval_ms = 100
        alpha = 0.5
        [[pricing.endpoints]]
        method = "POST"
        path = "/generate-report"
        base_cost = 120
        [[pricing.endpoints]]
        method = "GET"
        path = "/health"
        operational = true
        "#,
    )
    .expect("valid");
    config.pricing.node.cpu = 0.5;
    let daemon = TestDaemon::start(config).await;
    let addr = daemon.addr;
    let report = |c: &[Cost]| cost(c, "/generate-report").price;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let first = costs(addr).await;
    let before = report(&first);
    assert_eq!(cost(&first, "/generate-report").source, "node");
    let health = cost(&first, "/health");
    assert_eq!(
        (health.source.as_str(), health.multiplier),
        ("operational", 1.0),
        "operational endpoints stay out of the token economy"
    );

    // Two busy threads (this machine has two cores) for three seconds.
    let busy = Arc::new(AtomicBool::new(true));
    let spinners: Vec<_> = (0..2)
        .map(|_| {
            let busy = Arc::clone(&busy);
            std::thread::spawn(move || {
                let mut x = 0u64;
                while busy.load(Ordering::Relaxed) {
                    x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    std::hint::black_box(x);
                }
            })
        })
        .collect();
    let node_cpu = || async {
        let text = http(addr, "GET", "/metrics", &[], String::new()).await;
        enforcer_tests::parse_metric(
            &String::from_utf8_lossy(&text.body),
            "enforcer_node_telemetry{signal=\"cpu\"}",
        )
    };
    let cpu_before = node_cpu().await;
    let mut peak = before;
    let mut cpu_peak = cpu_before;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        peak = peak.max(report(&costs(addr).await));
        cpu_peak = cpu_peak.max(node_cpu().await);
    }
    assert!(
        cpu_peak > 0.8 && cpu_peak > cpu_before,
        "the node's CPU reading rises under load: {cpu_before} -> {cpu_peak}"
    );
    busy.store(false, Ordering::Relaxed);
    for s in spinners {
        s.join().expect("spinner");
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after = report(&costs(addr).await);
    assert!(
        peak > before * 1.15,
        "under load the price rises: before {before}, peak {peak}"
    );
    assert!(
        after < peak * 0.9,
        "and falls back after: peak {peak}, after {after}"
    );

    // The CLI prints the same table.
    let out = std::process::Command::new(enforcer_bin())
        .args(["costs", "--addr", &addr.to_string()])
        .output()
        .expect("enforcer costs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("/generate-report")
            && table.contains("node")
            && table.contains("operational"),
        "{table}"
    );
    daemon.stop().await;
}
