//! OpenTelemetry traces, black-box: the `enforcer` binary (on the real Redis store) exports
//! over OTLP/HTTP to a receiver this test runs, which decodes what arrives with
//! opentelemetry-proto's generated types, as a collector would. Checked: the span tree of a
//! decision and its attributes (never the raw key), a gateway's `traceparent` continued over
//! HTTP and gRPC, sampling, the pricing engine's rounds against a real Prometheus, and a
//! receiver that is gone or never answers: decisions go on, spans are dropped and counted, and
//! the daemon stops without waiting for it.
use enforcer_tests::descriptor;
use enforcer_tests::prom::{Exporter, PrivatePrometheus};
use enforcer_tests::{Process, enforcer_bin, enforcer_cli, free_port, http, parse_metric, unique};
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message as _;
use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// The receiver: POST /v1/traces, protobuf, decoded with the generated types.

/// One span as received, with what the assertions need.
#[derive(Debug, Clone)]
struct Got {
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    start: u64,
    /// Attribute values as text (strings as they are, numbers and booleans printed).
    attributes: BTreeMap<String, String>,
    /// The resource's `service.name`.
    service: String,
}

impl Got {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// A receiver serving `POST /v1/traces` on a free port; keeps every span and every raw body.
#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Got>>>,
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
}

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect()
}

impl Receiver {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("addr");
        let receiver = Self {
            addr,
            spans: Arc::default(),
            bodies: Arc::default(),
        };
        let state = receiver.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let state = state.clone();
                async move {
                    let request = ExportTraceServiceRequest::decode(body.as_ref())
                        .expect("the body is an ExportTraceServiceRequest");
                    state.bodies.lock().expect("lock").push(body.to_vec());
                    let mut spans = state.spans.lock().expect("lock");
                    for rs in &request.resource_spans {
                        let resource = rs
                            .resource
                            .as_ref()
                            .map(|r| attributes(&r.attributes))
                            .unwrap_or_default();
                        for ss in &rs.scope_spans {
                            for s in &ss.spans {
                                spans.push(Got {
                                    name: s.name.clone(),
                                    trace_id: hex(&s.trace_id),
                                    span_id: hex(&s.span_id),
                                    parent_span_id: hex(&s.parent_span_id),
                                    start: s.start_time_unix_nano,
                                    attributes: attributes(&s.attributes),
                                    service: resource
                                        .get("service.name")
                                        .cloned()
                                        .unwrap_or_default(),
                                });
                            }
                        }
                    }
                    (
                        [("content-type", "application/x-protobuf")],
                        ExportTraceServiceResponse::default().encode_to_vec(),
                    )
                }
            }),
        );
        tokio::spawn(async move {
            axum::serve(listener, app).await.expect("receiver serves");
        });
        receiver
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn spans(&self) -> Vec<Got> {
        self.spans.lock().expect("lock").clone()
    }

    /// The spans once `done` says they are all there (polled; a generous deadline).
    async fn wait_for(&self, what: &str, done: impl Fn(&[Got]) -> bool) -> Vec<Got> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} arrived; got {:#?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// The daemon: the real binary, so the tracing subscriber is set up as in production.

/// A tier that never refills (balances move only by debits); `/v1/x` costs 3.
fn config(telemetry: &str, extra: &str) -> String {
    format!(
        r#"
[budget]
default_tier = "metered"
[tiers.metered]
max_tokens = 100000
refill_per_sec = 0
initial_tokens = 100000
[pricing]
default_cost = 1
[[pricing.endpoints]]
path = "/v1/x"
base_cost = 3
{extra}
[telemetry]
{telemetry}
"#
    )
}

/// `enforcer run` on the test Redis, logging JSON lines (read on a thread).
struct Daemon {
    process: Process,
    addr: SocketAddr,
    grpc: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(config: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("enforcer.toml");
        std::fs::write(&file, config).expect("write config");
        let mut command = Command::new(enforcer_bin());
        command
            .args(["--log-format", "json", "run", "--config"])
            .arg(&file)
            .args(["--listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0"])
            .args(["--admin-socket", ""])
            .arg("--ledger-file")
            .arg(dir.path().join("ledger.jsonl"))
            .args(["--redis-url", &enforcer_tests::redis_url()])
            .env_remove("ENFORCER_REDIS_CLUSTER")
            .env_remove("ENFORCER_DATABASE_URL")
            .env_remove("ENFORCER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut process = Process(command.spawn().expect("spawn enforcer"));
        let stderr = process.0.stderr.take().expect("stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let kept = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                kept.lock().expect("lock").push(line.clone());
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let listening = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "no \"enforcer listening\" line: {:#?}",
                    lines.lock().expect("lock")
                )
            });
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if v["fields"]["message"] == "enforcer listening" {
                break v;
            }
        };
        let field = |name: &str| -> SocketAddr {
            listening["fields"][name]
                .as_str()
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("{name} in {listening}"))
        };
        Self {
            addr: field("addr"),
            grpc: field("grpc"),
            process,
            lines,
            _dir: dir,
        }
    }

    async fn metrics(&self) -> String {
        let r = http(self.addr, "GET", "/metrics", &[], String::new()).await;
        String::from_utf8_lossy(&r.body).into_owned()
    }

    /// SIGTERM, and the exit status once it stopped (a generous deadline: the point is that
    /// it does stop, not how fast).
    fn stop(mut self) -> std::process::ExitStatus {
        let killed = Command::new("kill")
            .args(["-TERM", &self.process.0.id().to_string()])
            .status()
            .expect("kill");
        assert!(killed.success(), "SIGTERM sent");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.process.0.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not stop within 30 s: {:#?}",
                self.lines.lock().expect("lock")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

async fn check(addr: SocketAddr, key: &str, headers: &[(&str, &str)]) -> enforcer_tests::Resp {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    http(
        addr,
        "POST",
        "/v1/check",
        &all,
        serde_json::json!({"key": key, "endpoint": "/v1/x", "method": "POST"}).to_string(),
    )
    .await
}

/// The 8 hex digits of the key's SHA-256 that spans carry.
fn hash_prefix(key: &str) -> String {
    enforcer::key::ApiKey::parse(key)
        .expect("valid key")
        .hash()
        .to_hex()[..8]
        .to_owned()
}

/// The spans as a tree of names and attributes, for people (`--nocapture`) and the docs.
fn tree(spans: &[Got], root: &Got) -> String {
    fn walk(spans: &[Got], s: &Got, depth: usize, out: &mut String) {
        let indent = "  ".repeat(depth);
        let parent = if s.parent_span_id.is_empty() {
            "root".to_owned()
        } else {
            format!("parent {}", s.parent_span_id)
        };
        out.push_str(&format!(
            "{indent}{}  (trace {}, span {}, {parent})\n",
            s.name, s.trace_id, s.span_id
        ));
        for (k, v) in s
            .attributes
            .iter()
            .filter(|(k, _)| k.starts_with("enforcer.") || k.starts_with("db."))
        {
            out.push_str(&format!("{indent}    {k} = {v}\n"));
        }
        let mut kids: Vec<&Got> = spans
            .iter()
            .filter(|c| c.parent_span_id == s.span_id)
            .collect();
        kids.sort_by_key(|c| c.start);
        for child in kids {
            walk(spans, child, depth + 1, out);
        }
    }
    let mut out = String::new();
    walk(spans, root, 0, &mut out);
    out
}

fn children<'a>(spans: &'a [Got], parent: &Got) -> Vec<&'a Got> {
    spans
        .iter()
        .filter(|s| s.parent_span_id == parent.span_id && s.trace_id == parent.trace_id)
        .collect()
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_is_a_span_with_price_store_and_ledger_children_and_no_raw_key() {
    let receiver = Receiver::start().await;
    let daemon = Daemon::start(
        &config(
            &format!(
                "otlp_endpoint = \"{}\"\nsample_ratio = 1.0\nservice_name = \"enforcer-test\"\n\
                 export_interval_ms = 100",
                receiver.url()
            ),
            "",
        ),
        &[],
    );
    let key = unique("trace-secret-key");
    for _ in 0..3 {
        let r = check(daemon.addr, &key, &[]).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    // The same decision for nginx / Traefik: /v1/auth.
    let r = http(
        daemon.addr,
        "GET",
        "/v1/auth",
        &[
            ("x-api-key", &key),
            ("x-original-uri", "/v1/x"),
            ("x-original-method", "POST"),
        ],
        String::new(),
    )
    .await;
    assert_eq!(r.status, 200);

    let prefix = hash_prefix(&key);
    let spans = receiver
        .wait_for("4 decision spans with their children", |spans| {
            let decisions: Vec<&Got> = spans
                .iter()
                .filter(|s| s.name == "decision" && s.attr("enforcer.key_hash") == Some(&prefix))
                .collect();
            decisions.len() >= 4 && decisions.iter().all(|d| children(spans, d).len() >= 3)
        })
        .await;
    let decisions: Vec<&Got> = spans
        .iter()
        .filter(|s| s.name == "decision" && s.attr("enforcer.key_hash") == Some(&prefix))
        .collect();
    assert_eq!(decisions.len(), 4, "three checks and one auth");
    for d in &decisions {
        assert_eq!(d.service, "enforcer-test", "service_name is the resource's");
        assert_eq!(d.parent_span_id, "", "no traceparent: a root span");
        assert_eq!(d.attr("enforcer.tier"), Some("metered"));
        assert_eq!(d.attr("enforcer.key_hash").map(str::len), Some(8));
        assert_eq!(d.attr("enforcer.allowed"), Some("true"));
        assert_eq!(d.attr("enforcer.mode"), Some("enforce"));
        assert_eq!(d.attr("enforcer.endpoint"), Some("/v1/x"));
        assert_eq!(d.attr("enforcer.cost"), Some("3"));
        let kids = children(&spans, d);
        let names: Vec<&str> = kids.iter().map(|c| c.name.as_str()).collect();
        for want in ["price", "store", "ledger.enqueue"] {
            assert_eq!(
                names.iter().filter(|n| **n == want).count(),
                1,
                "one {want} child: {names:?}"
            );
        }
        let store = kids.iter().find(|c| c.name == "store").expect("store");
        assert_eq!(store.attr("enforcer.script"), Some("debit"));
        assert_eq!(store.attr("db.system.name"), Some("redis"));
        // Redis TIME of the debit, seconds since the epoch: within a day of ours.
        let at: f64 = store
            .attr("enforcer.store_time")
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("store_time in {store:?}"));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        assert!((at - now).abs() < 86_400.0, "store_time {at} vs now {now}");
        let price = kids.iter().find(|c| c.name == "price").expect("price");
        assert_eq!(price.attr("enforcer.endpoint"), Some("/v1/x"));
        assert_eq!(price.attr("enforcer.multiplier"), Some("1"));
    }
    println!(
        "one decision's trace, as the receiver got it:\n{}",
        tree(&spans, decisions[0])
    );
    // The raw key is in no span name, no attribute, nowhere in what was sent.
    for s in &spans {
        assert!(!s.name.contains(&key), "{s:?}");
        for (k, v) in &s.attributes {
            assert!(!k.contains(&key) && !v.contains(&key), "{k}={v} in {s:?}");
        }
    }
    for body in receiver.bodies.lock().expect("lock").iter() {
        assert!(
            !body.windows(key.len()).any(|w| w == key.as_bytes()),
            "the raw key is in an export request"
        );
    }
    // Counted once the daemon has the receiver's answer (a moment after the receiver has them).
    wait_metric(&daemon, "enforcer_trace_spans_exported_total", 16.0).await;
    wait_metric(&daemon, "enforcer_trace_exports_total{result=\"ok\"}", 1.0).await;
    let metrics = daemon.metrics().await;
    assert_eq!(
        parse_metric(&metrics, "enforcer_trace_spans_dropped_total"),
        0.0
    );
    assert!(daemon.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_continues_the_gateways_trace_over_http_and_grpc() {
    let receiver = Receiver::start().await;
    // Nothing is sampled at the root: only the gateway's sampled flag exports a decision. The
    // endpoint comes from the environment (ENFORCER_OTLP_ENDPOINT), not the file.
    let daemon = Daemon::start(
        &config("sample_ratio = 0.0\nexport_interval_ms = 100", ""),
        &[("ENFORCER_OTLP_ENDPOINT", &receiver.url())],
    );
    let key = unique("traceparent-key");
    // Unsampled: no traceparent at ratio 0, and a traceparent whose flag says "not sampled".
    assert_eq!(check(daemon.addr, &key, &[]).await.status, 200);
    let unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    assert_eq!(
        check(daemon.addr, &key, &[("traceparent", unsampled)])
            .await
            .status,
        200
    );

    let http_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let http_parent = "00f067aa0ba902b7";
    let r = check(
        daemon.addr,
        &key,
        &[("traceparent", &format!("00-{http_trace}-{http_parent}-01"))],
    )
    .await;
    assert_eq!(r.status, 200);

    let grpc_trace = "5c0a1e7d2f3b4a6987c6d5e4f3a2b1c0";
    let grpc_parent = "1122334455667788";
    let mut client = RateLimitServiceClient::connect(format!("http://{}", daemon.grpc))
        .await
        .expect("gRPC connects");
    let mut request = tonic::Request::new(RateLimitRequest {
        domain: "edge".to_owned(),
        descriptors: vec![descriptor(&[
            ("api_key", &key),
            ("path", "/v1/x"),
            ("method", "POST"),
        ])],
        hits_addend: 0,
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{grpc_trace}-{grpc_parent}-01")
            .parse()
            .expect("metadata value"),
    );
    let answer = client
        .should_rate_limit(request)
        .await
        .expect("ShouldRateLimit answers")
        .into_inner();
    assert_eq!(answer.overall_code, Code::Ok as i32);

    let spans = receiver
        .wait_for("the HTTP and gRPC decision spans", |spans| {
            [http_trace, grpc_trace].iter().all(|t| {
                spans
                    .iter()
                    .any(|s| s.name == "decision" && s.trace_id == *t)
            })
        })
        .await;
    for (trace, parent) in [(http_trace, http_parent), (grpc_trace, grpc_parent)] {
        let d = spans
            .iter()
            .find(|s| s.name == "decision" && s.trace_id == trace)
            .expect("decision");
        assert_eq!(d.parent_span_id, parent, "the gateway's span is the parent");
        assert_eq!(
            d.attr("enforcer.key_hash"),
            Some(hash_prefix(&key).as_str())
        );
        println!("continued trace {trace}:\n{}", tree(&spans, d));
    }
    // What was not sampled was never exported: every span belongs to one of the two traces.
    let daemon_metrics = daemon.metrics().await;
    let spans = receiver.spans();
    for s in &spans {
        assert!(
            s.trace_id == http_trace || s.trace_id == grpc_trace,
            "an unsampled span was exported: {s:?}"
        );
    }
    assert_eq!(
        parse_metric(&daemon_metrics, "enforcer_trace_spans_dropped_total"),
        0.0
    );
    assert!(daemon.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_ratio_zero_exports_nothing_without_a_traceparent() {
    let receiver = Receiver::start().await;
    let daemon = Daemon::start(
        &config(
            &format!(
                "otlp_endpoint = \"{}\"\nsample_ratio = 0.0\nexport_interval_ms = 100",
                receiver.url()
            ),
            "",
        ),
        &[],
    );
    let key = unique("unsampled-key");
    for _ in 0..20 {
        assert_eq!(check(daemon.addr, &key, &[]).await.status, 200);
    }
    // A sampled decision after them: once it is there, anything before it would be too (one
    // queue, exported in order).
    let marker = "0123456789abcdef0123456789abcdef";
    let r = check(
        daemon.addr,
        &key,
        &[("traceparent", &format!("00-{marker}-0123456789abcdef-01"))],
    )
    .await;
    assert_eq!(r.status, 200);
    let spans = receiver
        .wait_for("the sampled marker decision", |spans| {
            spans
                .iter()
                .any(|s| s.name == "decision" && s.trace_id == marker)
        })
        .await;
    assert!(
        spans.iter().all(|s| s.trace_id == marker),
        "only the marker's trace: {spans:#?}"
    );
    assert!(daemon.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pricing_round_is_a_span_with_a_child_per_prometheus_query() {
    const CPU: &str = r#"backend_cpu_cores{endpoint="report"}"#;
    const MEM: &str = r#"backend_memory_bytes{endpoint="report"}"#;
    let exporter = Exporter::start(
        "backend_cpu_cores{endpoint=\"report\"} 0.4\n\
         backend_memory_bytes{endpoint=\"report\"} 536870912\n",
    );
    let prometheus = PrivatePrometheus::start(&exporter);
    let receiver = Receiver::start().await;
    let daemon = Daemon::start(
        &config(
            &format!(
                "otlp_endpoint = \"{}\"\nsample_ratio = 1.0\nexport_interval_ms = 100",
                receiver.url()
            ),
            &format!(
                r#"
[[pricing.endpoints]]
method = "POST"
path = "/generate-report"
base_cost = 120
cpu_query = '{CPU}'
cpu_reference = 0.5
memory_query = '{MEM}'
memory_reference = 1073741824
"#
            ),
        )
        // The engine's settings belong to [pricing], before its endpoints.
        .replace(
            "[pricing]\n",
            &format!(
                "[pricing]\ndynamic = true\ninterval_ms = 200\nprometheus = {{ url = \"{}\", \
                 timeout_ms = 2000 }}\n",
                prometheus.url()
            ),
        ),
        &[],
    );
    let spans = receiver
        .wait_for("a pricing round with two answered queries", |spans| {
            spans.iter().filter(|s| s.name == "pricing.round").any(|r| {
                children(spans, r)
                    .iter()
                    .filter(|q| {
                        q.name == "prometheus.query" && q.attr("enforcer.outcome") == Some("ok")
                    })
                    .count()
                    == 2
            })
        })
        .await;
    let round = spans
        .iter()
        .filter(|s| s.name == "pricing.round")
        .find(|r| {
            children(&spans, r)
                .iter()
                .filter(|q| q.attr("enforcer.outcome") == Some("ok"))
                .count()
                == 2
        })
        .expect("round");
    assert_eq!(round.parent_span_id, "", "a round is a root span");
    let queries = children(&spans, round);
    assert_eq!(queries.len(), 2, "one child per query: {queries:#?}");
    let mut by_signal: Vec<(&str, &str)> = queries
        .iter()
        .map(|q| {
            assert_eq!(q.name, "prometheus.query");
            assert_eq!(q.attr("enforcer.endpoint"), Some("/generate-report"));
            (
                q.attr("enforcer.signal").expect("signal"),
                q.attr("db.query.text").expect("query"),
            )
        })
        .collect();
    by_signal.sort();
    assert_eq!(by_signal, [("cpu", CPU), ("memory", MEM)]);
    let cpu = queries
        .iter()
        .find(|q| q.attr("enforcer.signal") == Some("cpu"))
        .expect("cpu");
    assert_eq!(cpu.attr("enforcer.value"), Some("0.4"));
    println!("a pricing round:\n{}", tree(&spans, round));
    assert!(daemon.stop().success());
}

/// N checks, each answered (a generous bound on the whole: it must complete, not be fast).
async fn checks_all_answered(addr: SocketAddr, key: &str, n: usize) {
    let all = async {
        for _ in 0..n {
            assert_eq!(check(addr, key, &[]).await.status, 200);
        }
    };
    tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("every check answered while the receiver is away");
}

/// A metric of the daemon once it is at least `min` (polled; a generous deadline).
async fn wait_metric(daemon: &Daemon, name: &str, min: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = parse_metric(&daemon.metrics().await, name);
        if v >= min {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{name} stayed at {v}, below {min}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_is_gone_holds_up_nothing_and_failures_are_counted() {
    // Nothing listens on this port.
    let gone = format!("http://127.0.0.1:{}", free_port());
    let daemon = Daemon::start(
        &config(
            &format!(
                "otlp_endpoint = \"{gone}\"\nsample_ratio = 1.0\nmax_queue_size = 8\n\
                 max_export_batch_size = 4\nexport_interval_ms = 50\nexport_timeout_ms = 500"
            ),
            "",
        ),
        &[],
    );
    let key = unique("gone-key");
    checks_all_answered(daemon.addr, &key, 50).await;
    wait_metric(
        &daemon,
        "enforcer_trace_exports_total{result=\"failed\"}",
        1.0,
    )
    .await;
    wait_metric(&daemon, "enforcer_trace_spans_dropped_total", 1.0).await;
    let metrics = daemon.metrics().await;
    assert_eq!(
        parse_metric(&metrics, "enforcer_trace_spans_exported_total"),
        0.0
    );
    assert!(daemon.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_never_answers_holds_up_neither_decisions_nor_the_shutdown() {
    // It accepts connections (the kernel's backlog does) and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", silent.local_addr().expect("addr"));
    let daemon = Daemon::start(
        &config(
            // An export would wait a minute for its answer: longer than the stop may take.
            &format!(
                "otlp_endpoint = \"{url}\"\nsample_ratio = 1.0\nmax_queue_size = 8\n\
                 max_export_batch_size = 4\nexport_interval_ms = 50\nexport_timeout_ms = 60000"
            ),
            "",
        ),
        &[],
    );
    let key = unique("silent-key");
    checks_all_answered(daemon.addr, &key, 50).await;
    wait_metric(&daemon, "enforcer_trace_spans_dropped_total", 1.0).await;
    // The stop does not wait out the export (Daemon::stop allows 30 s; the export, 60).
    let status = daemon.stop();
    assert!(status.success(), "{status:?}");
    drop(silent);
}

#[test]
fn config_check_refuses_a_bad_endpoint_and_ratio() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[telemetry]\notlp_endpoint = \"ftp://collector:4318\"\nsample_ratio = 1.5\n\
         max_queue_size = 0\n",
    )
    .expect("write");
    let (code, _, stderr) = enforcer_cli(&["config", "check", &file.display().to_string()], None);
    assert_eq!(code, 2, "{stderr}");
    for want in [
        "telemetry.otlp_endpoint",
        "http://",
        "telemetry.sample_ratio",
        "between 0 and 1",
        "telemetry.max_queue_size",
    ] {
        assert!(stderr.contains(want), "{want} in {stderr}");
    }
    std::fs::write(
        &file,
        "[telemetry]\notlp_endpoint = \"https://collector.example:4318\"\nsample_ratio = 0.25\n",
    )
    .expect("write");
    let (code, stdout, stderr) =
        enforcer_cli(&["config", "check", &file.display().to_string()], None);
    assert_eq!(code, 0, "{stdout}{stderr}");
}
