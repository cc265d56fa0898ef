//! Per-packet cost of the kernel gate, measured by the kernel (BPF_PROG_TEST_RUN with a large
//! `repeat`: the average time of one run), beside a program that only passes (the floor), and
//! the cost of one rejected request in the kernel versus one 429 through the HTTP API.
//! Run with `cargo xtask bench kernel` (root).
use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
use enforcer::kernel::{Gate, GateSettings, monotonic_ns};
use enforcer_common::{Budget, key_id};
use std::net::IpAddr;
use std::time::{Duration, Instant};

const REPEAT: u32 = 1_000_000;

fn packet(payload: &[u8]) -> Vec<u8> {
    segment(0x18, payload)
}

/// A TCP segment with these flags (PSH|ACK: 0x18, ACK: 0x10, SYN: 0x02).
fn segment(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 12];
    p.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((40 + payload.len()) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&[10, 0, 0, 2]);
    ip[16..20].copy_from_slice(&[10, 0, 0, 1]);
    p.extend_from_slice(&ip);
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&8080u16.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    p.extend_from_slice(&tcp);
    p.extend_from_slice(payload);
    p
}

fn ns_per_run(prog: &SchedClassifier, data: &[u8], expect: u32) -> f64 {
    let mut out = vec![0u8; data.len() + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(data),
            data_out: Some(&mut out),
            repeat: REPEAT,
            ..Default::default()
        })
        .expect("test_run");
    assert_eq!(r.return_value, expect, "unexpected verdict");
    r.duration.as_nanos() as f64
}

fn main() {
    let mut gate = Gate::load(None).expect("load the gate (root needed)");
    gate.configure(&GateSettings {
        ports: vec![8080],
        key_header: "x-api-key".into(),
        value_prefix: String::new(),
        max_staleness: Duration::from_secs(60),
        default_price: 1.0,
        min_price: 1.0,
        ambiguous_price: 1.0,
        strip_trailing_slash: true,
        generation: 1,
        reset: false,
    })
    .expect("configure");
    gate.set_price(Some("POST"), "/generate-report", 120.0)
        .expect("price");
    let empty = Budget {
        balance_milli: 0,
        synced_ns: monotonic_ns(),
        ..Budget::default()
    };
    gate.put_budget(key_id(b"bench-exhausted"), empty)
        .expect("budget");
    gate.put_budget(key_id(b"bench-bound"), empty)
        .expect("budget");
    gate.bind(IpAddr::from([10, 0, 0, 2]), key_id(b"bench-bound"))
        .expect("bind");

    let request = |key: &str| {
        packet(
            format!(
                "POST /generate-report HTTP/1.1\r\nHost: api.example.com\r\nUser-Agent: bench/1.0\r\nAccept: */*\r\nx-api-key: {key}\r\nContent-Length: 0\r\n\r\n"
            )
            .as_bytes(),
        )
    };
    let l7_reject = request("bench-exhausted");
    let mut other_port = request("bench-unknown");
    other_port[36..38].copy_from_slice(&9090u16.to_be_bytes());
    let syn = segment(0x02, b"");
    let ack = segment(0x10, b"");

    let floor = ns_per_run(gate.floor_program().expect("floor"), &l7_reject, 3);
    let prog = gate.program().expect("gate");
    let unprotected = ns_per_run(prog, &other_port, 3);
    let l7 = ns_per_run(prog, &l7_reject, 2);
    let l4 = ns_per_run(prog, &syn, 2);
    let bound_ack = ns_per_run(prog, &ack, 3);
    let mut unbound_ack = ack.clone();
    unbound_ack[26..30].copy_from_slice(&[10, 0, 0, 9]);
    let unbound_ack = ns_per_run(prog, &unbound_ack, 3);
    // Pass with a full parse: an unbound address and an unknown key.
    gate.remove_budget(key_id(b"bench-bound")).expect("remove");
    let prog = gate.program().expect("gate");
    let parse_pass = ns_per_run(prog, &request("bench-unknown"), 3);

    // The daemon's refresh: one snapshot write per tracked key per tick (max_staleness / 3).
    let keys = 100_000u64;
    let start = Instant::now();
    for k in 0..keys {
        gate.put_budget(k + 1, empty).expect("put");
    }
    let refresh = start.elapsed();
    let tick = Duration::from_secs(2) / 3;
    // The sync task as it is: snapshots hold while the heartbeat is fresh; a tick writes the
    // heartbeat and lifts the snapshots that reached half of SNAPSHOT_MAX_AGE_NS, whose keys'
    // next decisions write them again.
    // Two simulated minutes of ticks at max_staleness 2 s.
    let span = Duration::from_secs(120);
    let (sync_busy, sync_writes) =
        enforcer::kernel::sync::bench_refresh(&mut gate, keys, Duration::from_secs(2), span);

    // One 429 through the HTTP API (embedded store, loopback, one connection, sequential).
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let http_429 = rt.block_on(async {
        let mut config = enforcer_tests::example_config("");
        config.server.listen = "127.0.0.1:0".parse().expect("addr");
        let d = enforcer_tests::TestDaemon::start(config).await;
        let body = serde_json::json!({"key": "bench-429", "endpoint": "/generate-report", "method": "POST"});
        for _ in 0..8 {
            enforcer_tests::check(d.addr, body.clone()).await;
        }
        let n = 2000;
        let start = Instant::now();
        for _ in 0..n {
            let r = enforcer_tests::check(d.addr, body.clone()).await;
            assert_eq!(r.status, 429);
        }
        let per = start.elapsed().as_nanos() as f64 / n as f64;
        d.stop().await;
        per
    });

    println!("kernel gate, BPF_PROG_TEST_RUN, repeat {REPEAT} (mean ns per packet)");
    println!(
        "{:<58} {:>10.1}",
        "floor: a program that only returns TC_ACT_PIPE", floor
    );
    println!(
        "{:<58} {:>10.1}",
        "pass: TCP to an unprotected port", unprotected
    );
    println!(
        "{:<58} {:>10.1}",
        "pass: HTTP request parsed, unknown key", parse_pass
    );
    println!(
        "{:<58} {:>10.1}",
        "reject L7: key header found, snapshot cannot pay", l7
    );
    println!("{:<58} {:>10.1}", "reject L4: bound address, SYN", l4);
    println!(
        "{:<58} {:>10.1}",
        "pass: pure ACK from a bound address (drained key)", bound_ack
    );
    println!(
        "{:<58} {:>10.1}",
        "pass: pure ACK from an unbound address", unbound_ack
    );
    println!(
        "{:<58} {:>10.1}",
        "one 429 through POST /v1/check (sequential, embedded)", http_429
    );
    println!(
        "a 429 costs {:.0}x an L7 rejection in the kernel",
        http_429 / l7
    );
    println!(
        "refreshing {keys} tracked keys: {:.1} ms per tick ({:.2} us per key), {:.0}% of one core at max_staleness 2 s",
        refresh.as_secs_f64() * 1e3,
        refresh.as_secs_f64() * 1e6 / keys as f64,
        refresh.as_secs_f64() / tick.as_secs_f64() * 100.0
    );
    println!(
        "sync task, {keys} tracked keys, heartbeat freshness: {:.1} ms of work per {:.0} s simulated ({} map writes, {:.1} ms per tick), {:.2}% of one core at max_staleness 2 s",
        sync_busy.as_secs_f64() * 1e3,
        span.as_secs_f64(),
        sync_writes,
        sync_busy.as_secs_f64() * 1e3 / (span.as_secs_f64() / tick.as_secs_f64()),
        sync_busy.as_secs_f64() / span.as_secs_f64() * 100.0
    );
}
