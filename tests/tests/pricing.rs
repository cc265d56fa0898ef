//! The pricing engine: its Prometheus source against a real Prometheus server (started here,
//! scraping an exporter this test runs), with the server's failure modes; the daemon's prices
//! following a node the test controls (a `/proc` it writes, `[pricing] proc_root`), through
//! `GET /v1/costs`, `/metrics` and `enforcer costs`; and the real `/proc`'s readings, checked
//! for form only (the machine's own load must not decide a test).
use async_trait::async_trait;
use enforcer::config::Config;
use enforcer::metrics::Metrics;
use enforcer::price::PriceBook;
use enforcer::pricing::telemetry::{ProcNode, Prometheus, Signal, TelemetryError, TelemetrySource};
use enforcer::pricing::{Cost, Engine};
use enforcer_tests::prom::{Exporter, PrivatePrometheus};
use enforcer_tests::{TestDaemon, enforcer_bin, http};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

async fn metrics_text(addr: std::net::SocketAddr) -> String {
    let r = http(addr, "GET", "/metrics", &[], String::new()).await;
    assert_eq!(r.status, 200);
    String::from_utf8_lossy(&r.body).into_owned()
}

/// A directory laid out like `/proc` whose node the test controls: a thread advances the `cpu`
/// line of `stat` by 100 jiffies every 20 ms, `busy` of them busy, so the daemon reads exactly
/// `busy`% CPU whatever else the machine runs. `meminfo` says 30 % used, `loadavg` 0.
struct FakeProc {
    dir: tempfile::TempDir,
    busy: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl FakeProc {
    fn start(busy_percent: u64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("meminfo"),
            "MemTotal:        1000000 kB\nMemFree:          600000 kB\nMemAvailable:     700000 kB\n",
        )
        .expect("meminfo");
        std::fs::write(dir.path().join("loadavg"), "0.00 0.00 0.00 1/100 1\n").expect("loadavg");
        let busy = Arc::new(AtomicU64::new(busy_percent));
        let stop = Arc::new(AtomicBool::new(false));
        let root = dir.path().to_path_buf();
        let writer = {
            let (busy, stop) = (Arc::clone(&busy), Arc::clone(&stop));
            std::thread::spawn(move || {
                let (mut user, mut idle) = (1_000_000u64, 9_000_000u64);
                while !stop.load(Ordering::Relaxed) {
                    let b = busy.load(Ordering::Relaxed);
                    user += b;
                    idle += 100 - b;
                    // Replaced in one rename: the daemon never reads half a file.
                    let tmp = root.join("stat.tmp");
                    std::fs::write(
                        &tmp,
                        format!("cpu  {user} 0 0 {idle} 0 0 0 0 0 0\ncpu0 {user} 0 0 {idle} 0 0 0 0 0 0\n"),
                    )
                    .expect("write stat");
                    std::fs::rename(&tmp, root.join("stat")).expect("rename stat");
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        let fake = Self {
            dir,
            busy,
            stop,
            writer: Some(writer),
        };
        let start = Instant::now();
        while !fake.dir.path().join("stat").exists() {
            assert!(start.elapsed() < Duration::from_secs(10), "no stat written");
            std::thread::sleep(Duration::from_millis(10));
        }
        fake
    }

    fn set_busy(&self, percent: u64) {
        self.busy.store(percent, Ordering::Relaxed);
    }

    fn root(&self) -> String {
        self.dir.path().display().to_string()
    }
}

impl Drop for FakeProc {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// Polls the daemon until `done` holds for its costs and metrics, at most `within`.
async fn until(
    addr: std::net::SocketAddr,
    within: Duration,
    what: &str,
    done: impl Fn(&[Cost], &str) -> bool,
) {
    let start = Instant::now();
    loop {
        let (c, m) = (costs(addr).await, metrics_text(addr).await);
        if done(&c, &m) {
            return;
        }
        assert!(
            start.elapsed() < within,
            "{what}: not within {within:?}; costs {c:?}\n{}",
            m.lines()
                .filter(|l| l.starts_with("enforcer_node_telemetry"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn node_signal(metrics: &str, signal: &str) -> f64 {
    enforcer_tests::parse_metric(
        metrics,
        &format!("enforcer_node_telemetry{{signal=\"{signal}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prices_rise_with_node_cpu_and_fall_back_after() {
    // The node is a /proc the test writes: the machine's own load (other builds, other tests)
    // does not move these prices.
    let fake = FakeProc::start(5);
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
    config.pricing.proc_root = fake.root();
    let daemon = TestDaemon::start(config).await;
    let addr = daemon.addr;
    let report = |c: &[Cost]| cost(c, "/generate-report").price;
    let within = Duration::from_secs(30);

    // 5 % CPU, 30 % memory, no load: 0.65·(0.05/0.5) + 0.25·(0.3/0.5) + 0 = 0.215, below the
    // floor: 0.5 × 120 = 60.
    until(
        addr,
        within,
        "the idle price settles at the floor",
        |c, m| (node_signal(m, "cpu") - 0.05).abs() < 1e-9 && (report(c) - 60.0).abs() < 1e-9,
    )
    .await;
    let first = costs(addr).await;
    assert_eq!(cost(&first, "/generate-report").source, "node");
    let health = cost(&first, "/health");
    assert_eq!(
        (health.source.as_str(), health.multiplier),
        ("operational", 1.0),
        "operational endpoints stay out of the token economy"
    );
    let m = metrics_text(addr).await;
    assert!((node_signal(&m, "memory") - 0.3).abs() < 1e-9, "{m}");
    assert_eq!(node_signal(&m, "load"), 0.0);

    // 95 % CPU: 0.65·1.9 + 0.15 = 1.385, 166.2 tokens; the EMA (α 0.5) gets there in a few
    // rounds.
    fake.set_busy(95);
    until(addr, within, "under CPU load the price rises", |c, m| {
        (node_signal(m, "cpu") - 0.95).abs() < 1e-9 && (report(c) - 166.2).abs() < 0.1
    })
    .await;
    let live = cost(&costs(addr).await, "/generate-report");
    assert!(live.price > 60.0 * 2.5, "{live:?}");

    // Back to 5 %: back to the floor.
    fake.set_busy(5);
    until(
        addr,
        within,
        "the price falls back after the load",
        |c, m| (node_signal(m, "cpu") - 0.05).abs() < 1e-9 && (report(c) - 60.0).abs() < 1e-9,
    )
    .await;

    // The CLI prints the same table; `--addr` takes a host name as the README writes it.
    let out = std::process::Command::new(enforcer_bin())
        .args(["costs", "--addr", &format!("localhost:{}", addr.port())])
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_proc_gives_well_formed_readings() {
    // Only the form is checked: what this machine is doing decides the values.
    let node = ProcNode::new();
    let memory = node.read(&Signal::NodeMemory).await.expect("memory");
    assert!(
        memory.is_finite() && (0.0..=1.0).contains(&memory),
        "{memory}"
    );
    let load = node.read(&Signal::NodeLoad).await.expect("load");
    assert!(load.is_finite() && load >= 0.0, "{load}");
    assert_eq!(node.read(&Signal::NodeCpu).await, Ok(0.0), "first reading");
    let start = Instant::now();
    let cpu = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Two readings within one jiffy have nothing between them: read again later.
        match node.read(&Signal::NodeCpu).await {
            Ok(cpu) => break cpu,
            Err(e) => assert!(start.elapsed() < Duration::from_secs(10), "{e}"),
        }
    };
    assert!(cpu.is_finite() && (0.0..=1.0).contains(&cpu), "{cpu}");

    // The daemon with the default proc_root (/proc): readings in range, prices between the
    // floor and the largest multiplier, no reading refused.
    let config = Config::parse(
        r#"
        [pricing]
        dynamic = true
        interval_ms = 100
        [[pricing.endpoints]]
        method = "POST"
        path = "/generate-report"
        base_cost = 120
        "#,
    )
    .expect("valid");
    assert_eq!(config.pricing.proc_root, "/proc");
    let daemon = TestDaemon::start(config.clone()).await;
    // A few rounds.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let m = metrics_text(daemon.addr).await;
    for signal in ["cpu", "memory", "load"] {
        assert!(
            m.contains(&format!("enforcer_node_telemetry{{signal=\"{signal}\"}}")),
            "the node's {signal} is exported: {m}"
        );
    }
    for signal in ["cpu", "memory"] {
        let v = node_signal(&m, signal);
        assert!(
            v.is_finite() && (0.0..=1.0).contains(&v),
            "{signal} {v}\n{m}"
        );
    }
    let load = node_signal(&m, "load");
    assert!(load.is_finite() && load >= 0.0, "load {load}");
    let refused: f64 = m
        .lines()
        .filter(|l| l.starts_with("enforcer_telemetry_errors_total{") && l.contains("node"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(refused, 0.0, "{m}");
    let p = &config.pricing;
    let report = cost(&costs(daemon.addr).await, "/generate-report");
    let highest = 120.0 * p.cap * p.surge.max;
    assert!(
        report.price.is_finite()
            && report.price >= 120.0 * p.floor - 1e-9
            && report.price <= highest,
        "{report:?}"
    );
    daemon.stop().await;
}
