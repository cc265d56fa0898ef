//! Paths are priced in their normal form, and control characters are refused: black-box through
//! the HTTP API (`POST /v1/check` and `GET /v1/auth`) of an in-process daemon on the real Redis,
//! with its audit ledger file read back.
use enforcer::config::{Config, TierConfig};
use enforcer::endpoint::TrailingSlash;
use enforcer::key::ApiKey;
use enforcer::ledger::{AuditRow, Entry};
use enforcer_tests::{Resp, TestDaemon, check, example_config, http, redis_url, unique};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Every spelling of `/generate-report` that an upstream router (Envoy `normalize_path` +
/// `merge_slashes`) sends to the same handler.
const SPELLINGS: &[&str] = &[
    "/generate-report",
    "/generate-report/",
    "/generate-report//",
    "//generate-report",
    "/%67enerate-report",
    "/generate%2dreport",
    "/./generate-report",
    "/generate-report/.",
    "/cheap/../generate-report",
    "/%2e%2e/generate-report",
    "/x/%2E%2e/generate-report",
    "/x\\..\\generate-report",
    "/generate-report?format=pdf",
    "/generate-report#top",
];

/// A daemon on the example config (free tier: 800 tokens to start, `/generate-report` costs
/// 120) whose ledger file the test reads.
struct Daemon {
    d: TestDaemon,
    ledger: PathBuf,
    _dir: tempfile::TempDir,
}

async fn daemon(trailing: TrailingSlash, tweak: impl FnOnce(&mut Config)) -> Daemon {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = dir.path().join("ledger.jsonl");
    let mut config = example_config(&redis_url());
    config.pricing.trailing_slash = trailing;
    config.ledger.file = ledger.display().to_string();
    tweak(&mut config);
    Daemon {
        d: TestDaemon::start(config).await,
        ledger,
        _dir: dir,
    }
}

/// A tier without refill, so a balance read twice is exact however slow the machine is.
fn fixed_tier(config: &mut Config) {
    config.tiers.insert(
        "fixed".into(),
        TierConfig {
            max_tokens: 1000.0,
            refill_per_sec: 0.0,
            idle_cap: 1.0,
            initial_tokens: Some(1000.0),
            shadow: false,
            grant_ceiling: None,
            low_balance: Vec::new(),
            quota: None,
        },
    );
    config.budget.default_tier = "fixed".into();
}

/// The decision rows of `keys` in the ledger file, once there are `n` of them.
async fn rows(ledger: &Path, keys: &[&str], n: usize) -> Vec<AuditRow> {
    let hashes: Vec<String> = keys
        .iter()
        .map(|k| ApiKey::parse(k).expect("key").hash().to_hex())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(ledger).unwrap_or_default();
        let found: Vec<AuditRow> = text
            .lines()
            .filter_map(|l| match serde_json::from_str::<Entry>(l) {
                Ok(Entry::Decision(row)) => Some(row),
                _ => None,
            })
            .filter(|r| hashes.contains(&r.key_hash))
            .collect();
        if found.len() >= n || Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn auth(addr: std::net::SocketAddr, key: &str, headers: &[(&str, &str)]) -> Resp {
    let mut all = vec![("x-api-key", key)];
    all.extend_from_slice(headers);
    http(addr, "GET", "/v1/auth", &all, "").await
}

#[tokio::test]
async fn every_spelling_of_an_endpoint_is_priced_recorded_and_answered_in_normal_form() {
    let d = daemon(TrailingSlash::Strip, |_| {}).await;
    let mut keys = Vec::new();
    for raw in SPELLINGS {
        let key = unique("spelling");
        let r = check(
            d.d.addr,
            json!({"key": key, "endpoint": raw, "method": "POST"}),
        )
        .await;
        assert_eq!(r.status, 200, "{raw}");
        let j = r.json();
        assert_eq!(j["cost"], 120.0, "{raw} costs what /generate-report costs");
        assert_eq!(j["endpoint"], "/generate-report", "{raw}");
        keys.push(key);

        // The same through /v1/auth (nginx auth_request, Traefik forwardAuth): no body, but
        // the balance in `RateLimit` shows what was charged (800 − 120).
        let key = unique("spelling-auth");
        let r = auth(
            d.d.addr,
            &key,
            &[("x-original-uri", raw), ("x-original-method", "POST")],
        )
        .await;
        assert_eq!(r.status, 200, "{raw}");
        assert!(
            r.header("ratelimit")
                .is_some_and(|v| v.starts_with("\"free\";r=680;")),
            "{raw}: {:?}",
            r.header("ratelimit")
        );
        keys.push(key);
    }
    // Other endpoints keep their own price: an encoded slash is not a separator.
    let key = unique("encoded-slash");
    let r = check(
        d.d.addr,
        json!({"key": key, "endpoint": "/generate-report%2f", "method": "POST"}),
    )
    .await;
    assert_eq!(r.json()["cost"], 1.0);
    assert_eq!(r.json()["endpoint"], "/generate-report%2F");
    let r = check(
        d.d.addr,
        json!({"key": key, "endpoint": "/generate-report/x/..", "method": "GET"}),
    )
    .await;
    assert_eq!(r.json()["cost"], 1.0, "GET is not the priced method");

    let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let recorded = rows(&d.ledger, &key_refs, keys.len()).await;
    assert_eq!(recorded.len(), keys.len(), "one audit row per decision");
    for row in &recorded {
        assert_eq!(row.endpoint, "/generate-report", "recorded in normal form");
        assert_eq!(row.cost, 120.0);
    }
    d.d.stop().await;
}

#[tokio::test]
async fn a_kept_trailing_slash_is_another_endpoint() {
    let d = daemon(TrailingSlash::Keep, |_| {}).await;
    for (raw, endpoint, cost) in [
        ("/generate-report", "/generate-report", 120.0),
        (
            "//generate-report/../generate-report",
            "/generate-report",
            120.0,
        ),
        ("/generate-report/", "/generate-report/", 1.0),
        ("/generate-report//", "/generate-report/", 1.0),
        ("/generate-report/.", "/generate-report/", 1.0),
    ] {
        let key = unique("keep");
        let r = check(
            d.d.addr,
            json!({"key": key, "endpoint": raw, "method": "POST"}),
        )
        .await;
        assert_eq!(r.status, 200, "{raw}");
        assert_eq!(r.json()["cost"], cost, "{raw}");
        assert_eq!(r.json()["endpoint"], endpoint, "{raw}");
    }
    d.d.stop().await;
}

/// One request on a raw connection (for bytes the HTTP client refuses to send); the status.
async fn raw_status(addr: std::net::SocketAddr, request: &[u8]) -> u16 {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    text.split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"))
}

#[tokio::test]
async fn control_characters_are_refused_with_a_clear_error_and_nothing_is_debited() {
    let d = daemon(TrailingSlash::Strip, fixed_tier).await;
    let addr = d.d.addr;
    let key = unique("control");
    let balance = |r: Resp| r.json()["remaining"].as_f64().expect("remaining");
    let good = json!({"key": key, "endpoint": "/x", "method": "GET"});
    let before = balance(check(addr, good.clone()).await);
    assert_eq!(before, 999.0);

    let json_cases = [
        (json!({"endpoint": "/generate-report\u{0}"}), "bad_endpoint"),
        (json!({"endpoint": "/generate-report\u{7}"}), "bad_endpoint"),
        (
            json!({"endpoint": "/x\r\nx-api-key: other"}),
            "bad_endpoint",
        ),
        (json!({"endpoint": "/x?q=\u{0}"}), "bad_endpoint"),
        (json!({"endpoint": "/x\u{85}"}), "bad_endpoint"),
        (json!({"endpoint": "/generate-report%00"}), "bad_endpoint"),
        (json!({"endpoint": "/x%0a"}), "bad_endpoint"),
        (json!({"endpoint": "/x%zz"}), "bad_endpoint"),
        (json!({"endpoint": "/x%4"}), "bad_endpoint"),
        (json!({"endpoint": "x"}), "bad_endpoint"),
        (
            json!({"endpoint": format!("/{}", "%61".repeat(2048))}),
            "bad_endpoint",
        ),
        (
            json!({"endpoint": "/x", "method": "POST\u{0}"}),
            "bad_method",
        ),
        (json!({"endpoint": "/x", "method": "G\u{7}T"}), "bad_method"),
        (json!({"endpoint": "/x", "method": "get"}), "bad_method"),
        (
            json!({"endpoint": "/x", "request_id": "r\u{0}"}),
            "bad_request_id",
        ),
        (
            json!({"endpoint": "/x", "request_id": "r\u{7}"}),
            "bad_request_id",
        ),
    ];
    for (mut body, code) in json_cases {
        body["key"] = json!(key);
        if body.get("method").is_none() {
            body["method"] = json!("POST");
        }
        let r = check(addr, body.clone()).await;
        assert_eq!(r.status, 400, "{body}");
        let j = r.json();
        assert_eq!(j["error"]["code"], code, "{body}: {j}");
        assert!(
            !j["error"]["message"].as_str().unwrap_or("").is_empty(),
            "{body}: a message"
        );
    }

    // /v1/auth: a tab gets through the HTTP parser (so the parsers of the endpoint, the method
    // and the request id refuse it); non-ASCII bytes must be refused, not skipped.
    let header_cases: [(&[(&str, &str)], &str); 7] = [
        (&[("x-original-uri", "/generate\t-report")], "bad_endpoint"),
        (&[("x-original-uri", "/generate-report%00")], "bad_endpoint"),
        (
            &[
                ("x-original-uri", "/caf\u{e9}"),
                ("x-forwarded-uri", "/generate-report"),
            ],
            "bad_endpoint",
        ),
        (
            &[("x-original-uri", "/x"), ("x-original-method", "PO\tST")],
            "bad_method",
        ),
        (
            &[("x-original-uri", "/x"), ("x-original-method", "P\u{d3}ST")],
            "bad_method",
        ),
        (
            &[("x-original-uri", "/x"), ("x-request-id", "r\tx")],
            "bad_request_id",
        ),
        (
            &[("x-original-uri", "/x"), ("x-request-id", "r\u{e9}")],
            "bad_request_id",
        ),
    ];
    for (headers, code) in header_cases {
        let r = auth(addr, &key, headers).await;
        assert_eq!(r.status, 400, "{headers:?}");
        assert_eq!(r.json()["error"]["code"], code, "{headers:?}");
    }
    // Other control characters in a header: the HTTP parser answers 400 itself.
    for header in [
        "x-original-uri: /generate-report\x07",
        "x-original-uri: /x\x00",
        "x-request-id: r\x01",
        "x-original-method: PO\x07ST",
    ] {
        let request = format!(
            "GET /v1/auth HTTP/1.1\r\nhost: t\r\nconnection: close\r\nx-api-key: {key}\r\n\
             x-original-uri: /x\r\n{header}\r\n\r\n"
        );
        assert_eq!(
            raw_status(addr, request.as_bytes()).await,
            400,
            "{header:?}"
        );
    }

    let after = balance(check(addr, good).await);
    assert_eq!(after, before - 1.0, "only the two good checks were charged");
    let recorded = rows(&d.ledger, &[&key], 2).await;
    // No row for a refused request: give a stray one time to show up before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let recorded_later = rows(&d.ledger, &[&key], 2).await;
    assert_eq!(recorded.len(), 2, "{recorded:?}");
    assert_eq!(recorded_later.len(), 2, "{recorded_later:?}");
    for row in &recorded_later {
        assert_eq!(row.endpoint, "/x");
        assert!(!format!("{row:?}").chars().any(char::is_control));
    }
    d.d.stop().await;
}
