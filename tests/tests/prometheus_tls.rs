//! Prometheus as operators run it: behind TLS and basic auth (Prometheus's own
//! `--web.config.file`, a CA this test makes). The pricing engine's source and the daemon
//! read it with `[pricing.prometheus] ca_file`, `username` and `password_file`; wrong
//! credentials, an untrusted certificate and plain HTTP are refused and counted, never a price.
use enforcer::config::Config;
use enforcer::http_client::{Auth, Secret};
use enforcer::pricing::Cost;
use enforcer::pricing::telemetry::{Prometheus, Signal, TelemetryError, TelemetrySource as _};
use enforcer_tests::prom::{Exporter, PASSWORD, PrivatePrometheus};
use enforcer_tests::{TestDaemon, http, parse_metric};
use std::time::{Duration, Instant};

const CPU: &str = r#"backend_cpu_cores{endpoint="report"}"#;

fn basic(dir: &std::path::Path, password: &str) -> Auth {
    let file = dir.join(format!("password-{}", password.len()));
    std::fs::write(&file, format!("{password}\n")).expect("password file");
    Auth::Basic {
        username: "enforcer".into(),
        password: Secret::File(file),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_reads_a_tls_prometheus_with_basic_auth_and_refuses_the_rest() {
    let exporter = Exporter::start(&format!("{CPU} 0.9\n"));
    let server = PrivatePrometheus::start_secure(&exporter);
    let ca = server.secure.as_ref().expect("secure").ca_file.clone();
    let dir = tempfile::tempdir().expect("tmp");
    let timeout = Duration::from_secs(5);
    let cpu = Signal::Query(CPU.into());

    let good = Prometheus::with(
        &server.url(),
        Some(&ca),
        basic(dir.path(), PASSWORD),
        timeout,
    );
    let start = Instant::now();
    loop {
        match good.read(&cpu).await {
            Ok(v) => {
                assert_eq!(v, 0.9);
                break;
            }
            Err(e) => assert!(
                start.elapsed() < Duration::from_secs(30),
                "no answer over TLS with basic auth: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let refused = |what: &str, r: Result<f64, TelemetryError>, needle: &str| match r {
        Err(TelemetryError::Unavailable(msg)) => {
            assert!(msg.contains(needle), "{what}: {msg}");
            assert!(
                !msg.contains(PASSWORD),
                "{what}: a message shows the password"
            );
        }
        other => panic!("{what}: {other:?}"),
    };
    let wrong = Prometheus::with(&server.url(), Some(&ca), basic(dir.path(), "nope"), timeout);
    refused("wrong password", wrong.read(&cpu).await, "401");
    let anonymous = Prometheus::with(&server.url(), Some(&ca), Auth::None, timeout);
    refused("no credentials", anonymous.read(&cpu).await, "401");
    // The system's roots do not know the test CA.
    let untrusted = Prometheus::with(&server.url(), None, basic(dir.path(), PASSWORD), timeout);
    refused(
        "untrusted certificate",
        untrusted.read(&cpu).await,
        "certificate",
    );
    let plain = Prometheus::with(
        &server.url().replace("https://", "http://"),
        None,
        basic(dir.path(), PASSWORD),
        timeout,
    );
    assert!(plain.read(&cpu).await.is_err(), "plain HTTP to a TLS port");
    // A password file that disappeared: an error naming the file, no request.
    let gone = Prometheus::with(
        &server.url(),
        Some(&ca),
        Auth::Basic {
            username: "enforcer".into(),
            password: Secret::File(dir.path().join("missing")),
        },
        timeout,
    );
    refused("missing password file", gone.read(&cpu).await, "missing");
}

async fn costs(addr: std::net::SocketAddr) -> Vec<Cost> {
    let r = http(addr, "GET", "/v1/costs", &[], String::new()).await;
    assert_eq!(r.status, 200);
    serde_json::from_slice(&r.body).expect("costs JSON")
}

async fn prometheus_errors(addr: std::net::SocketAddr) -> f64 {
    let r = http(addr, "GET", "/metrics", &[], String::new()).await;
    let text = String::from_utf8_lossy(&r.body).into_owned();
    parse_metric(
        &text,
        "enforcer_telemetry_errors_total{kind=\"unavailable\",source=\"prometheus\"}",
    )
}

fn config(url: &str, ca: &std::path::Path, password_file: &std::path::Path) -> Config {
    let mut config = Config::parse(&format!(
        r#"
        [pricing]
        dynamic = true
        interval_ms = 100
        [pricing.prometheus]
        url = "{url}"
        timeout_ms = 5000
        ca_file = "{}"
        username = "enforcer"
        password_file = "{}"
        [[pricing.endpoints]]
        method = "POST"
        path = "/generate-report"
        base_cost = 120
        cpu_query = '{CPU}'
        cpu_reference = 0.3
        "#,
        ca.display(),
        password_file.display()
    ))
    .expect("valid config");
    config.server.grpc_listen = String::new();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_prices_from_a_tls_prometheus_and_counts_refusals() {
    let exporter = Exporter::start(&format!("{CPU} 0.9\n"));
    let server = PrivatePrometheus::start_secure(&exporter);
    let ca = server.secure.as_ref().expect("secure").ca_file.clone();
    let dir = tempfile::tempdir().expect("tmp");
    let good_pw = dir.path().join("good");
    std::fs::write(&good_pw, PASSWORD).expect("write");
    let bad_pw = dir.path().join("bad");
    std::fs::write(&bad_pw, "wrong").expect("write");

    let good = TestDaemon::start(config(&server.url(), &ca, &good_pw)).await;
    let bad = TestDaemon::start(config(&server.url(), &ca, &bad_pw)).await;
    let report = |c: &[Cost]| {
        c.iter()
            .find(|c| c.endpoint == "/generate-report")
            .cloned()
            .expect("report in /v1/costs")
    };
    let start = Instant::now();
    // CPU 0.9 of a 0.3 reference: the endpoint's price follows Prometheus.
    loop {
        let c = report(&costs(good.addr).await);
        if c.source == "prometheus" && c.multiplier > 1.0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the price never followed the TLS Prometheus: {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(prometheus_errors(good.addr).await, 0.0);
    // Wrong password: every query refused and counted; the price follows the node instead.
    let start = Instant::now();
    while prometheus_errors(bad.addr).await < 3.0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "refusals are not counted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_ne!(report(&costs(bad.addr).await).source, "prometheus");
    good.stop().await;
    bad.stop().await;
}

#[test]
fn secrets_in_the_config_text_and_half_configured_auth_are_refused() {
    for (text, field) in [
        (
            "[pricing.prometheus]\nurl = \"https://p:9090\"\npassword = \"x\"\n",
            "password",
        ),
        (
            "[pricing.prometheus]\nurl = \"https://p:9090\"\nbearer_token = \"x\"\n",
            "bearer_token",
        ),
        (
            "[pricing.prometheus]\nurl = \"https://p:9090\"\nusername = \"u\"\n",
            "username",
        ),
        (
            "[pricing.prometheus]\nurl = \"https://p:9090\"\nbearer_token_env = \"T\"\nusername = \"u\"\npassword_env = \"P\"\n",
            "username",
        ),
        ("[pricing.prometheus]\nurl = \"ftp://p\"\n", "url"),
        ("[pricing.prometheus]\nca_file = \"/ca.pem\"\n", "url"),
        (
            "[pricing.prometheus]\nurl = \"https://p:9090\"\nbearer_token_env = \"NOT A NAME\"\n",
            "bearer_token_env",
        ),
    ] {
        let err = Config::parse(text).expect_err(text).to_string();
        assert!(
            err.contains(&format!("pricing.prometheus.{field}")),
            "{text}: {err}"
        );
        assert!(!err.contains("\"x\""), "the error repeats a secret: {err}");
    }
    Config::parse(
        "[pricing.prometheus]\nurl = \"https://p:9090\"\nca_file = \"/ca.pem\"\nusername = \"u\"\npassword_env = \"PROM_PASSWORD\"\n",
    )
    .expect("a CA file and basic auth from the environment are fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_or_slow_answer_is_refused_not_held() {
    use std::io::{Read as _, Write as _};
    // A "Prometheus" that answers 2 MiB of JSON, and one that never answers.
    let big = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let big_port = big.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in big.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let body = format!(
                r#"{{"status":"success","data":{{"resultType":"vector","result":[],"pad":"{}"}}}}"#,
                "x".repeat(2 << 20)
            );
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_port = silent.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming() {
            held.push(stream);
        }
    });
    let cpu = Signal::Query(CPU.into());
    let source = Prometheus::new(
        &format!("http://127.0.0.1:{big_port}"),
        Duration::from_secs(10),
    );
    match source.read(&cpu).await {
        Err(TelemetryError::Nonsense(msg)) => assert!(msg.contains("bytes"), "{msg}"),
        other => panic!("a 2 MiB answer: {other:?}"),
    }
    let source = Prometheus::new(
        &format!("http://127.0.0.1:{silent_port}"),
        Duration::from_millis(300),
    );
    let start = Instant::now();
    match source.read(&cpu).await {
        Err(TelemetryError::Unavailable(msg)) => assert!(msg.contains("timed out"), "{msg}"),
        other => panic!("a silent server: {other:?}"),
    }
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "the query timeout bounds a silent server"
    );
}
