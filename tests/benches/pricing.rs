//! `cargo xtask bench pricing`: how long one round of the pricing engine takes for 10 000
//! endpoints, and the latency `POST /v1/check` has with the engine on versus off.
use async_trait::async_trait;
use bytes::Bytes;
use enforcer::config::{Config, EndpointConfig};
use enforcer::metrics::Metrics;
use enforcer::price::PriceBook;
use enforcer::pricing::Engine;
use enforcer::pricing::telemetry::{Signal, TelemetryError, TelemetrySource};
use enforcer_tests::TestDaemon;
use http_body_util::{BodyExt as _, Full};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Answers at once: the engine's own cost, without a network in the way.
#[derive(Debug)]
struct Instant_;

#[async_trait]
impl TelemetrySource for Instant_ {
    fn name(&self) -> &'static str {
        "fake"
    }
    async fn read(&self, signal: &Signal) -> Result<f64, TelemetryError> {
        Ok(match signal {
            Signal::NodeCpu => 0.4,
            Signal::NodeMemory => 0.5,
            Signal::NodeLoad => 0.8,
            Signal::Query(q) => q.len() as f64 / 100.0,
        })
    }
}

fn config(endpoints: usize, queries: bool) -> Config {
    let mut c = Config::default();
    c.pricing.dynamic = true;
    if queries {
        c.pricing.prometheus.url = "http://127.0.0.1:1".into();
    }
    c.pricing.endpoints = (0..endpoints)
        .map(|i| EndpointConfig {
            method: "GET".into(),
            path: format!("/endpoint/{i}"),
            base_cost: 1.0 + (i % 50) as f64,
            operational: false,
            calibration_query: String::new(),
            cpu_query: if queries {
                format!("cpu{{e=\"{i}\"}}")
            } else {
                String::new()
            },
            cpu_reference: 1.0,
            memory_query: if queries {
                format!("mem{{e=\"{i}\"}}")
            } else {
                String::new()
            },
            memory_reference: 1e9,
            max_cost: None,
            settle: Default::default(),
        })
        .collect();
    c
}

async fn round(endpoints: usize, queries: bool) -> (f64, f64) {
    let c = config(endpoints, queries);
    let book = PriceBook::new(&c.pricing);
    let source: Arc<dyn TelemetrySource> = Arc::new(Instant_);
    let mut engine = Engine::new(
        &c.pricing,
        &book,
        Arc::clone(&source),
        queries.then(|| Arc::clone(&source)),
        Metrics::new(),
        None,
    );
    let mut times = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        engine.tick().await;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let recompute = {
        let t = Instant::now();
        for _ in 0..20 {
            engine.recompute();
        }
        t.elapsed().as_secs_f64() * 1e3 / 20.0
    };
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], recompute)
}

/// Sequential checks over one keep-alive connection; latencies in µs, sorted.
async fn latencies(addr: std::net::SocketAddr, n: usize) -> Vec<f64> {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let body = format!(
            r#"{{"key":"bench-{}","endpoint":"/endpoint/{}","method":"GET"}}"#,
            i % 1000,
            i % 100
        );
        let req = hyper::Request::post("/v1/check")
            .header("content-type", "application/json")
            .header("host", "bench")
            .body(Full::new(Bytes::from(body)))
            .expect("request");
        send.ready().await.expect("connection ready");
        let t = Instant::now();
        let resp = match send.send_request(req).await {
            Ok(r) => r,
            Err(e) => panic!("request {i}: {e:?}"),
        };
        let _ = resp.into_body().collect().await.expect("body");
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    out.sort_by(f64::total_cmp);
    out
}

fn pct(v: &[f64], p: f64) -> f64 {
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        println!("pricing engine, one round (median of 20) and the recompute alone (no I/O)");
        for (n, q) in [(10_000, false), (10_000, true), (100, true)] {
            let (tick, recompute) = round(n, q).await;
            println!(
                "{n:>6} endpoints, {:<28} round {tick:>8.3} ms   recompute {recompute:>7.3} ms",
                if q {
                    "2 queries each (instant)"
                } else {
                    "node telemetry only"
                }
            );
        }
        println!();
        println!(
            "POST /v1/check latency, embedded store, one keep-alive connection, 20 000 sequential"
        );
        println!("checks per run, runs alternating; 1 000 configured endpoints");
        for (label, interval_ms) in [("default interval (1 s)", 1000), ("every 10 ms (100x)", 10)] {
            let mut rows: Vec<(bool, Vec<f64>)> = Vec::new();
            for round in 0..6 {
                let on = round % 2 == 1;
                let mut c = config(1000, false);
                c.pricing.dynamic = on;
                c.pricing.interval_ms = interval_ms;
                let daemon = TestDaemon::start(c).await;
                let _ = latencies(daemon.addr, 2000).await; // warm-up
                rows.push((on, latencies(daemon.addr, 20_000).await));
                daemon.stop().await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            for on in [false, true] {
                let p99: Vec<String> = rows
                    .iter()
                    .filter(|(o, _)| *o == on)
                    .map(|(_, l)| format!("{:.0}", pct(l, 0.99)))
                    .collect();
                let p50: Vec<String> = rows
                    .iter()
                    .filter(|(o, _)| *o == on)
                    .map(|(_, l)| format!("{:.0}", pct(l, 0.5)))
                    .collect();
                println!(
                    "{label:<24} engine {}: p50 {} us   p99 {} us",
                    if on { "on " } else { "off" },
                    p50.join(" / "),
                    p99.join(" / ")
                );
            }
        }
    });
}
