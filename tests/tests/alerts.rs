//! Low-balance alerts against a real Redis and a real HTTP receiver: one alert per crossing,
//! signed; again only after the balance went back up; retried while the receiver fails; and a
//! receiver that never answers does not slow decisions.
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use enforcer::config::{Config, TierConfig};
use enforcer_tests::{TestDaemon, check, example_config, redis_url, unique};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const SECRET: &str = "alert-signing-key";

/// What the receiver got: (headers, body) per request.
type Seen = Arc<parking_lot::Mutex<Vec<(HeaderMap, Bytes)>>>;

/// An HTTP receiver on 127.0.0.1:`port` (0: any) that answers its first `fail_first` requests
/// with 503, the rest with 200.
async fn receiver(port: u16, fail_first: usize) -> (SocketAddr, Seen) {
    let seen: Seen = Arc::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let s = s.clone();
            let calls = calls.clone();
            async move {
                if calls.fetch_add(1, Ordering::SeqCst) < fail_first {
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                s.lock().push((headers, body));
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind receiver");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, seen)
}

/// The example config with a default tier of 1000 tokens that does not refill and alerts at
/// 50 % and 20 %, posting to `hook`.
fn config(hook: SocketAddr, secret_file: &std::path::Path) -> Config {
    let mut config = example_config(&redis_url());
    config.tiers.insert(
        "alerted".into(),
        TierConfig {
            max_tokens: 1000.0,
            refill_per_sec: 0.0,
            idle_cap: 1.0,
            initial_tokens: Some(1000.0),
            shadow: false,
            grant_ceiling: Some(5000.0),
            low_balance: vec![0.5, 0.2],
            quota: None,
        },
    );
    config.budget.default_tier = "alerted".into();
    config.alerts.webhook_url = format!("http://{hook}/hook");
    config.alerts.hmac_secret_file = secret_file.display().to_string();
    config.alerts.retry_ms = 50;
    config
}

/// Spends 300 tokens (a report of 120 × 2.5 units); the status.
async fn spend(d: &TestDaemon, key: &str) -> u16 {
    check(
        d.addr,
        json!({"key": key, "endpoint": "/generate-report", "method": "POST", "units": 2.5}),
    )
    .await
    .status
}

/// The alerts received, once there are `want` (or what is there after 10 s), each checked
/// against its signature.
async fn alerts(seen: &Seen, want: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.lock().len() < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seen.lock()
        .iter()
        .map(|(headers, body)| {
            let timestamp = headers["x-enforcer-timestamp"].to_str().expect("ascii");
            let expected = enforcer::alerts::signature(SECRET.as_bytes(), timestamp, body);
            assert_eq!(
                headers["x-enforcer-signature"].to_str().expect("ascii"),
                expected,
                "signed with the configured key over the timestamp and the body"
            );
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_secs();
            let ts: u64 = timestamp.parse().expect("unix seconds");
            assert!(now.abs_diff(ts) < 60, "a current timestamp");
            let alert: Value = serde_json::from_slice(body).expect("JSON body");
            assert_eq!(
                headers["x-enforcer-alert-id"].to_str().ok(),
                alert["id"].as_str()
            );
            alert
        })
        .collect()
}

fn secret_file(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let path = dir.path().join("hmac.key");
    std::fs::write(&path, format!("{SECRET}\n")).expect("write key");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_alert_per_crossing_and_again_only_after_the_balance_went_back_up() {
    let dir = tempfile::tempdir().expect("tmp");
    let (hook, seen) = receiver(0, 0).await;
    let d = TestDaemon::start(config(hook, &secret_file(&dir))).await;
    let key = unique("low");
    let hash = enforcer::key::ApiKey::parse(&key)
        .expect("key")
        .hash()
        .to_hex();
    // 1000 → 700 → 400 (crosses 50 %) → 100 (crosses 20 %) → denied (nothing crossed).
    let statuses = [
        spend(&d, &key).await,
        spend(&d, &key).await,
        spend(&d, &key).await,
        spend(&d, &key).await,
    ];
    assert_eq!(statuses, [200, 200, 200, 429]);
    // Another key that stays above every threshold.
    assert_eq!(spend(&d, &unique("rich")).await, 200);
    let got = alerts(&seen, 2).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(
        got.iter()
            .map(|a| (a["threshold"].as_f64(), a["balance"].as_f64()))
            .collect::<Vec<_>>(),
        [(Some(0.5), Some(400.0)), (Some(0.2), Some(100.0))]
    );
    assert!(got.iter().all(|a| a["key_hash"] == hash.as_str()));
    assert!(got.iter().all(|a| a["tier"] == "alerted"));
    assert_eq!(got[0]["threshold_tokens"], 500.0);

    // A grant lifts it above both (and their margins): they are armed again; the next
    // crossing of 50 % fires once more, 20 % is not crossed.
    let socket = d
        .admin_socket
        .as_ref()
        .expect("admin socket")
        .display()
        .to_string();
    let (code, out, err) = tokio::task::block_in_place(|| {
        enforcer_tests::enforcer_cli(
            &[
                "keys", "grant", "800", "--note", "top-up", "--socket", &socket,
            ],
            Some(&format!("{key}\n")),
        )
    });
    assert_eq!(code, 0, "{out}{err}");
    // 900 → 600 → 300 (crosses 50 %).
    assert_eq!(spend(&d, &key).await, 200);
    assert_eq!(spend(&d, &key).await, 200);
    let got = alerts(&seen, 3).await;
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(got[2]["threshold"], 0.5);
    assert_eq!(got[2]["balance"], 300.0);
    // Nothing more arrives (the rich key, the denial, the hovering key).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(seen.lock().len(), 3);

    // Audit rows, one per alert.
    let deadline = Instant::now() + Duration::from_secs(10);
    let rows = loop {
        let rows: Vec<Value> = std::fs::read_to_string(&d.ledger_file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|r| r["kind"] == "alert")
            .collect();
        if rows.len() >= 3 || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["remaining"], 400.0);
    assert_eq!(rows[0]["cost"], 500.0);
    let text = String::from_utf8_lossy(
        &enforcer_tests::http(d.addr, "GET", "/metrics", &[], String::new())
            .await
            .body,
    )
    .into_owned();
    assert_eq!(
        enforcer_tests::parse_metric(&text, r#"enforcer_alerts_total{result="fired"}"#),
        3.0
    );
    assert_eq!(
        enforcer_tests::parse_metric(&text, r#"enforcer_alerts_total{result="sent"}"#),
        3.0
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_gets_the_alert_once_it_answers() {
    let dir = tempfile::tempdir().expect("tmp");
    // Nothing listens yet on the hook's port.
    let port = enforcer_tests::free_port();
    let hook: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let d = TestDaemon::start(config(hook, &secret_file(&dir))).await;
    let key = unique("retry");
    assert_eq!(spend(&d, &key).await, 200);
    assert_eq!(
        spend(&d, &key).await,
        200,
        "crosses 50 %: the webhook is down"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Up, but failing twice more before it accepts.
    let (_, seen) = receiver(port, 2).await;
    let got = alerts(&seen, 1).await;
    assert_eq!(got.len(), 1, "delivered after the retries");
    assert_eq!(got[0]["threshold"], 0.5);
    let text = String::from_utf8_lossy(
        &enforcer_tests::http(d.addr, "GET", "/metrics", &[], String::new())
            .await
            .body,
    )
    .into_owned();
    assert!(
        enforcer_tests::parse_metric(&text, r#"enforcer_alerts_total{result="retried"}"#) >= 3.0,
        "{text}"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_never_answers_does_not_hold_decisions() {
    let dir = tempfile::tempdir().expect("tmp");
    // Accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let hook = silent.local_addr().expect("addr");
    let mut cfg = config(hook, &secret_file(&dir));
    cfg.alerts.timeout_ms = 60_000;
    let d = TestDaemon::start(cfg).await;
    // Many keys cross thresholds; the webhook worker is stuck on the first alert.
    let started = Instant::now();
    for _ in 0..20 {
        let key = unique("silent");
        for _ in 0..3 {
            assert_eq!(spend(&d, &key).await, 200);
        }
    }
    // 60 decisions, 40 alerts queued behind a request that will wait a minute.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "decisions waited for the webhook: {:?}",
        started.elapsed()
    );
    let text = String::from_utf8_lossy(
        &enforcer_tests::http(d.addr, "GET", "/metrics", &[], String::new())
            .await
            .body,
    )
    .into_owned();
    assert_eq!(
        enforcer_tests::parse_metric(&text, r#"enforcer_alerts_total{result="fired"}"#),
        40.0
    );
    assert_eq!(
        enforcer_tests::parse_metric(&text, r#"enforcer_alerts_total{result="sent"}"#),
        0.0
    );
    // Shutdown does not wait for the silent receiver's minute.
    let stopping = Instant::now();
    d.stop().await;
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "shutdown waited for the webhook: {:?}",
        stopping.elapsed()
    );
    drop(silent);
}

#[test]
fn a_webhook_without_a_signing_key_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut config = example_config("");
    config.ledger.file = dir.path().join("ledger.jsonl").display().to_string();
    config.server.admin_socket = String::new();
    config.server.listen = "127.0.0.1:0".parse().expect("addr");
    config.server.grpc_listen = String::new();
    config.alerts.webhook_url = "http://127.0.0.1:9/hook".into();
    assert!(config.validate().is_empty(), "the file is valid");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let err = rt
        .block_on(enforcer::server::Server::bind(&config))
        .expect_err("no key");
    assert!(err.to_string().contains("HMAC key"), "{err}");
    // Garbage, another scheme or no host is a config error; https is fine.
    config.alerts.webhook_url = "https://example.com/hook".into();
    assert!(config.validate().is_empty(), "https webhooks are allowed");
    for url in ["ftp://example.com/hook", "not a url", "http:///x"] {
        config.alerts.webhook_url = url.into();
        assert!(
            config
                .validate()
                .iter()
                .any(|e| e.path == "alerts.webhook_url"),
            "{url}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_rows_land_in_postgresql() {
    let dir = tempfile::tempdir().expect("tmp");
    let (hook, seen) = receiver(0, 0).await;
    let url = enforcer_tests::pg::fresh_database().await;
    let mut cfg = config(hook, &secret_file(&dir));
    cfg.ledger.database_url = url.clone();
    cfg.ledger.migrate = true;
    let d = TestDaemon::start(cfg).await;
    let key = unique("pg-alert");
    for _ in 0..2 {
        assert_eq!(spend(&d, &key).await, 200);
    }
    assert_eq!(alerts(&seen, 1).await.len(), 1);
    d.stop().await;
    let pool = sqlx::PgPool::connect(&url).await.expect("pg");
    let (cost, remaining, note): (f64, f64, String) =
        sqlx::query_as("SELECT cost, remaining, note FROM token_transactions WHERE kind = 'alert'")
            .fetch_one(&pool)
            .await
            .expect("one alert row");
    assert_eq!((cost, remaining), (500.0, 400.0));
    assert!(note.contains("50 %"), "{note}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settle_that_crosses_a_threshold_fires() {
    let dir = tempfile::tempdir().expect("tmp");
    let (hook, seen) = receiver(0, 0).await;
    let d = TestDaemon::start(config(hook, &secret_file(&dir))).await;
    let key = unique("settle-alert");
    // Reserve 300 (1000 → 700: nothing crossed), then settle at 700 (→ 300: crosses 50 %).
    let r = check(
        d.addr,
        json!({"key": key, "endpoint": "/generate-report", "method": "POST", "units": 2.5,
               "request_id": "job-1", "reserve": true}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(seen.lock().is_empty(), "no crossing yet");
    let s = enforcer_tests::http(
        d.addr,
        "POST",
        "/v1/settle",
        &[("content-type", "application/json")],
        json!({"key": key, "request_id": "job-1", "cost": 700.0}).to_string(),
    )
    .await;
    assert_eq!(s.status, 200, "{:?}", s.body);
    let got = alerts(&seen, 1).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (got[0]["threshold"].as_f64(), got[0]["balance"].as_f64()),
        (Some(0.5), Some(300.0))
    );
    d.stop().await;
}

/// An https receiver on 127.0.0.1 with a certificate of a fresh test CA: every request is
/// answered 200 and kept (as [`receiver`]'s); TLS handshakes that fail (a client that does not
/// trust the CA) are counted.
async fn tls_receiver(ca: &enforcer_tests::prom::TestCa) -> (SocketAddr, Seen, Arc<AtomicUsize>) {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&ca.cert_file)
        .expect("cert file")
        .collect::<Result<_, _>>()
        .expect("certs");
    let key = PrivateKeyDer::from_pem_file(&ca.key_file).expect("key file");
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocols")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen: Seen = Arc::default();
    let refused = Arc::new(AtomicUsize::new(0));
    let (s, r) = (seen.clone(), refused.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, s, r) = (acceptor.clone(), s.clone(), r.clone());
            tokio::spawn(async move {
                let Ok(mut stream) = acceptor.accept(tcp).await else {
                    r.fetch_add(1, Ordering::SeqCst);
                    return;
                };
                // One request: the head, then content-length bytes of body.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let head_end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                let mut headers = HeaderMap::new();
                for line in head.split("\r\n").skip(1) {
                    if let Some((name, value)) = line.split_once(':')
                        && let (Ok(n), Ok(v)) = (
                            axum::http::HeaderName::from_bytes(name.trim().as_bytes()),
                            axum::http::HeaderValue::from_str(value.trim()),
                        )
                    {
                        headers.insert(n, v);
                    }
                }
                let length: usize = headers
                    .get("content-length")
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(0);
                while buf.len() < head_end + length {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let body = Bytes::copy_from_slice(&buf[head_end..head_end + length]);
                s.lock().push((headers, body));
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (addr, seen, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_webhook_is_verified_against_the_configured_ca() {
    let dir = tempfile::tempdir().expect("tmp");
    let ca = enforcer_tests::prom::TestCa::new(dir.path());
    let (hook, seen, refused) = tls_receiver(&ca).await;
    let https = |config: &mut Config| {
        config.alerts.webhook_url = format!("https://{hook}/hook");
        config.alerts.max_attempts = 2;
    };

    // Without alerts.ca_file the receiver's certificate is checked against the system's
    // roots, which do not hold the test CA: the handshake fails, nothing is delivered.
    let mut untrusting = config(hook, &secret_file(&dir));
    https(&mut untrusting);
    let d = TestDaemon::start(untrusting).await;
    let key = unique("tls-untrusted");
    for _ in 0..3 {
        assert_eq!(spend(&d, &key).await, 200);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while refused.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        refused.load(Ordering::SeqCst) >= 2,
        "the daemon tried (twice: max_attempts) and refused the unknown CA"
    );
    assert!(
        seen.lock().is_empty(),
        "nothing delivered to an unverified receiver"
    );
    d.stop().await;

    // With the CA: delivered, signed, over TLS.
    let mut trusting = config(hook, &secret_file(&dir));
    https(&mut trusting);
    trusting.alerts.ca_file = ca.ca_file.display().to_string();
    let d = TestDaemon::start(trusting).await;
    let key = unique("tls-trusted");
    for _ in 0..3 {
        assert_eq!(spend(&d, &key).await, 200);
    }
    // 1000 → 700 → 400 (50 % crossed) → 100 (20 % crossed).
    let got = alerts(&seen, 2).await;
    assert_eq!(
        got.iter()
            .map(|a| a["threshold"].as_f64())
            .collect::<Vec<_>>(),
        [Some(0.5), Some(0.2)],
        "{got:?}"
    );
    d.stop().await;
}

#[test]
fn a_ca_file_is_for_an_https_webhook_and_must_be_readable() {
    let mut config = example_config(&redis_url());
    config.alerts.webhook_url = "http://127.0.0.1:9/hook".into();
    config.alerts.ca_file = "/ca.pem".into();
    assert!(
        config.validate().iter().any(|e| e.path == "alerts.ca_file"),
        "a CA file for an http:// webhook is refused by name"
    );
    config.alerts.webhook_url = "https://127.0.0.1:9/hook".into();
    assert!(config.validate().is_empty());
    config.alerts.hmac_secret_file = String::new();
    let dir = tempfile::tempdir().expect("tmp");
    config.alerts.hmac_secret_file = secret_file(&dir).display().to_string();
    config.alerts.ca_file = dir.path().join("missing.pem").display().to_string();
    let err = enforcer::alerts::Webhook::from_config(&config.alerts)
        .expect_err("an unreadable CA file is an error at start");
    assert!(err.to_string().contains("alerts.ca_file"), "{err}");
}
