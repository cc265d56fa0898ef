//! The kernel gate's parser and decision on synthetic packets, run by the kernel itself with
//! BPF_PROG_TEST_RUN: the real verified program, no interface needed. Needs root; run through
//! `cargo xtask test`.
use aya::programs::{TestRun as _, TestRunOptions};
use enforcer::kernel::{Gate, GateSettings, monotonic_ns};
use enforcer_common::{Budget, Milli, key_id};
use enforcer_tests::packet::flags::{ACK, FIN, PSH, RST, SYN};
use enforcer_tests::packet::{CLIENT4, Frame};
use std::net::IpAddr;
use std::time::Duration;

const PASS: u32 = 3; // TC_ACT_PIPE
const DROP: u32 = 2; // TC_ACT_SHOT
const PORT: u16 = 8080;
const CLIENT6: [u16; 8] = [0xfd00, 0, 0, 0, 0, 0, 0, 2];
const PSH_ACK: u8 = PSH | ACK;

fn settings() -> GateSettings {
    GateSettings {
        ports: vec![PORT],
        key_header: "x-api-key".into(),
        value_prefix: String::new(),
        max_staleness: Duration::from_secs(2),
        default_price: 1.0,
        min_price: 1.0,
        ambiguous_price: 1.0,
        strip_trailing_slash: true,
        generation: 1,
        reset: false,
    }
}

fn gate() -> Gate {
    let mut gate = Gate::load(None).expect("the kernel verifies and loads the gate");
    gate.configure(&settings()).expect("configure");
    gate.set_price(Some("POST"), "/generate-report", 120.0)
        .expect("price");
    gate
}

fn budget(tokens: f64, refill_per_sec: f64, age: Duration) -> Budget {
    Budget {
        balance_milli: Milli::floor(tokens).get(),
        refill_milli_per_sec: Milli::rate(refill_per_sec),
        synced_ns: monotonic_ns() - age.as_nanos() as u64,
        ..Budget::default()
    }
}

/// How a synthetic packet is built.
#[derive(Clone)]
struct Pkt {
    v6: bool,
    port: u16,
    tcp_options: usize,
    more_fragments: bool,
    /// TCP flags (PSH|ACK unless a test says otherwise).
    flags: u8,
    payload: Vec<u8>,
    /// Ethernet padding after the IP packet.
    padding: usize,
}

fn pkt(payload: &str) -> Pkt {
    Pkt {
        v6: false,
        port: PORT,
        tcp_options: 0,
        more_fragments: false,
        flags: PSH_ACK,
        payload: payload.as_bytes().to_vec(),
        padding: 0,
    }
}

fn bytes(p: &Pkt) -> Vec<u8> {
    Frame {
        src: if p.v6 {
            IpAddr::from(CLIENT6)
        } else {
            IpAddr::from(CLIENT4)
        },
        dport: p.port,
        tcp_options: p.tcp_options,
        more_fragments: p.more_fragments,
        flags: p.flags,
        payload: p.payload.clone(),
        padding: p.padding,
    }
    .bytes()
}

fn run(gate: &mut Gate, p: &Pkt) -> u32 {
    let data = bytes(p);
    let mut out = vec![0u8; data.len() + 256];
    gate.program()
        .expect("program")
        .test_run(TestRunOptions {
            data_in: Some(&data),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })
        .expect("test_run")
        .return_value
}

fn request(method: &str, path: &str, headers: &str) -> String {
    format!("{method} {path} HTTP/1.1\r\nHost: api.example\r\n{headers}\r\n")
}

#[test]
fn an_unconfigured_or_empty_gate_passes_everything() {
    let mut g = Gate::load(None).expect("load");
    let req = pkt(&request("GET", "/x", "x-api-key: k1\r\n"));
    assert_eq!(run(&mut g, &req), PASS, "generation 0: not configured");
    let mut g = gate();
    assert_eq!(run(&mut g, &req), PASS, "no budgets: everything passes");
}

#[test]
fn an_exhausted_key_is_rejected_in_any_header_case_and_others_pass() {
    let mut g = gate();
    // The kernel hashes the header value it finds; userspace computes key_id("k-exhausted"):
    // a rejection proves both sides agree on the id.
    g.put_budget(key_id(b"k-exhausted"), budget(0.0, 0.0, Duration::ZERO))
        .expect("put");
    for header in [
        "x-api-key: k-exhausted\r\n",
        "X-API-KEY: k-exhausted\r\n",
        "X-Api-Key:k-exhausted\r\n",
        "x-api-key: \t k-exhausted  \r\n",
        "Accept: */*\r\nx-api-key: k-exhausted\r\nUser-Agent: t\r\n",
    ] {
        let req = pkt(&request("GET", "/items", header));
        assert_eq!(run(&mut g, &req), DROP, "{header:?}");
    }
    let other = pkt(&request("GET", "/items", "x-api-key: k-other\r\n"));
    assert_eq!(run(&mut g, &other), PASS);
    let counters = g.counters().expect("counters");
    assert_eq!(counters.rejected_l7, 5);
    let rejects = g.key_rejections().expect("per-key");
    assert_eq!(
        rejects,
        vec![(
            key_id(b"k-exhausted"),
            enforcer_common::KeyRejects {
                l7: 5,
                l4: 0,
                blocked: 0
            }
        )]
    );
}

#[test]
fn ipv6_and_tcp_options_are_parsed() {
    let mut g = gate();
    g.put_budget(key_id(b"k6"), budget(0.0, 0.0, Duration::ZERO))
        .expect("put");
    let mut req = pkt(&request("GET", "/items", "x-api-key: k6\r\n"));
    req.v6 = true;
    assert_eq!(run(&mut g, &req), DROP, "IPv6");
    req.v6 = false;
    req.tcp_options = 12;
    assert_eq!(run(&mut g, &req), DROP, "TCP options");
    req.v6 = true;
    assert_eq!(run(&mut g, &req), DROP, "IPv6 with TCP options");
}

#[test]
fn the_price_of_the_request_decides_and_refill_counts() {
    let mut g = gate();
    let k = key_id(b"k-80");
    g.put_budget(k, budget(80.0, 0.0, Duration::ZERO))
        .expect("put");
    let report = pkt(&request("POST", "/generate-report", "x-api-key: k-80\r\n"));
    let cheap = pkt(&request("GET", "/items", "x-api-key: k-80\r\n"));
    let report_query = pkt(&request(
        "POST",
        "/generate-report?format=pdf",
        "x-api-key: k-80\r\n",
    ));
    let report_get = pkt(&request("GET", "/generate-report", "x-api-key: k-80\r\n"));
    assert_eq!(run(&mut g, &report), DROP, "80 tokens cannot pay 120");
    assert_eq!(
        run(&mut g, &report_query),
        DROP,
        "the query string does not change the price"
    );
    assert_eq!(
        run(&mut g, &cheap),
        PASS,
        "80 tokens pay the default price 1"
    );
    assert_eq!(
        run(&mut g, &report_get),
        PASS,
        "the price is per method: GET costs 1"
    );
    // 80 tokens a second ago, refilling 50/s: 130 now, enough for 120.
    g.put_budget(k, budget(80.0, 50.0, Duration::from_secs(1)))
        .expect("put");
    assert_eq!(
        run(&mut g, &report),
        PASS,
        "refill since the snapshot counts"
    );
    // Any-method price entry.
    g.set_price(None, "/bulk", 500.0).expect("price");
    let bulk = pkt(&request("PUT", "/bulk", "x-api-key: k-80\r\n"));
    assert_eq!(run(&mut g, &bulk), DROP);
}

/// The scan reads eight bytes at a time: tokens of every length around a word boundary, and
/// a key header that ends exactly at the end of the window, must come out the same as the
/// userspace hash of the same bytes.
#[test]
fn tokens_of_every_length_hash_as_in_userspace() {
    let mut g = gate();
    for len in (1..=20).chain([63, 64, 65, 127, 128]) {
        let key: String = (0..len).map(|i| (b'a' + (i % 26) as u8) as char).collect();
        g.put_budget(key_id(key.as_bytes()), budget(0.0, 0.0, Duration::ZERO))
            .expect("put");
        let req = pkt(&request("GET", "/items", &format!("x-api-key: {key}\r\n")));
        assert_eq!(run(&mut g, &req), DROP, "key of {len} bytes");
    }
    let k = key_id(b"k-80");
    g.put_budget(k, budget(80.0, 0.0, Duration::ZERO))
        .expect("put");
    for len in [1, 7, 8, 9, 15, 16, 17, 255, 256] {
        let path = format!("/{}", "p".repeat(len - 1));
        g.set_price(None, &path, 120.0).expect("price");
        let req = pkt(&request("GET", &path, "x-api-key: k-80\r\n"));
        assert_eq!(run(&mut g, &req), DROP, "path of {len} bytes is priced");
    }
    // Longer than MAX_PATH_LEN: not hashed, so the default price (1), which 80 tokens pay.
    let long = format!("/{}", "p".repeat(300));
    g.set_price(None, &long, 120.0).expect("price");
    let req = pkt(&request("GET", &long, "x-api-key: k-80\r\n"));
    assert_eq!(run(&mut g, &req), PASS, "a path beyond MAX_PATH_LEN");
    for method in ["PUT", "DELETE", "OPTIONS", "PROPFIND", "MKCALENDAR"] {
        g.set_price(Some(method), "/m", 120.0).expect("price");
        let req = pkt(&request(method, "/m", "x-api-key: k-80\r\n"));
        assert_eq!(run(&mut g, &req), DROP, "method {method} is priced");
    }
    let req = pkt(&request("MKCALENDARX", "/m", "x-api-key: k-80\r\n"));
    assert_eq!(run(&mut g, &req), PASS, "an 11-letter method is not HTTP");

    // The key header's line and one byte of the next line (which shows the value is not
    // folded on) end exactly at byte 512 of the payload: read. One byte more of padding pushes
    // that byte out of the window, two bytes its '\n': the value could go on, so it passes.
    g.put_budget(key_id(b"k-edge"), budget(0.0, 0.0, Duration::ZERO))
        .expect("put");
    let at_edge = |pad: usize| {
        format!(
            "GET /items HTTP/1.1\r\nX-Pad: {}\r\nx-api-key: k-edge\r\n\r\n",
            "p".repeat(pad)
        )
    };
    let fixed = at_edge(0).find("x-api-key").expect("header") + "x-api-key: k-edge\r\n".len();
    let pad = enforcer_common::SCAN_WINDOW - fixed - 1;
    let exact = at_edge(pad);
    assert_eq!(
        exact.find("\r\n\r\n").expect("end") + 3,
        enforcer_common::SCAN_WINDOW
    );
    assert_eq!(
        run(&mut g, &pkt(&exact)),
        DROP,
        "line and the next byte end at the window's end"
    );
    assert_eq!(
        run(&mut g, &pkt(&at_edge(pad + 1))),
        PASS,
        "the next line's first byte beyond the window"
    );
    assert_eq!(
        run(&mut g, &pkt(&at_edge(pad + 3))),
        PASS,
        "'\\r\\n' beyond the window"
    );
    // Many trailing blanks are trimmed up to a bound; past it the key is not taken.
    let blanks = pkt(&request("GET", "/items", "x-api-key: k-edge       \r\n"));
    assert_eq!(run(&mut g, &blanks), DROP, "seven trailing blanks");
    let many = format!("x-api-key: k-edge{}\r\n", " ".repeat(20));
    assert_eq!(run(&mut g, &pkt(&request("GET", "/items", &many))), PASS);
}

#[test]
fn stale_or_other_generation_snapshots_are_ignored() {
    let mut g = gate();
    let req = pkt(&request("GET", "/items", "x-api-key: k-stale\r\n"));
    // A snapshot holds while the daemon's heartbeat is fresh, up to SNAPSHOT_MAX_AGE_NS.
    let max_age = Duration::from_nanos(enforcer_common::SNAPSHOT_MAX_AGE_NS);
    g.put_budget(
        key_id(b"k-stale"),
        budget(0.0, 0.0, max_age + Duration::from_secs(1)),
    )
    .expect("put");
    assert_eq!(run(&mut g, &req), PASS, "older than SNAPSHOT_MAX_AGE_NS");
    g.put_budget(
        key_id(b"k-stale"),
        budget(0.0, 0.0, max_age - Duration::from_secs(5)),
    )
    .expect("put");
    assert_eq!(
        run(&mut g, &req),
        DROP,
        "older than max_staleness (2 s), but the heartbeat is fresh"
    );
    g.put_budget(key_id(b"k-stale"), budget(0.0, 0.0, Duration::ZERO))
        .expect("put");
    assert_eq!(run(&mut g, &req), DROP);
    let mut next = settings();
    next.generation = 2;
    g.configure(&next).expect("configure");
    assert_eq!(
        run(&mut g, &req),
        PASS,
        "a config change invalidates old entries"
    );
    assert!(g.counters().expect("counters").stale >= 2);
}

#[test]
fn blocked_keys_are_rejected_until_the_block_ends() {
    let mut g = gate();
    let req = pkt(&request("GET", "/items", "x-api-key: k-blocked\r\n"));
    assert_eq!(run(&mut g, &req), PASS);
    g.block(key_id(b"k-blocked"), Duration::from_secs(10))
        .expect("block");
    assert_eq!(
        run(&mut g, &req),
        DROP,
        "blocked without any budget snapshot"
    );
    g.put_budget(key_id(b"k-blocked"), budget(1000.0, 0.0, Duration::ZERO))
        .expect("put");
    assert_eq!(run(&mut g, &req), DROP, "blocked despite its balance");
    assert!(g.unblock(key_id(b"k-blocked")).expect("unblock"));
    assert_eq!(run(&mut g, &req), PASS);
    g.block(key_id(b"k-blocked"), Duration::ZERO)
        .expect("block");
    assert_eq!(run(&mut g, &req), PASS, "a block that already ended");
    assert_eq!(g.counters().expect("counters").rejected_blocked, 2);
}

#[test]
fn blocks_snapshots_and_bindings_lapse_when_the_daemon_heartbeat_is_stale() {
    let mut g = Gate::load(None).expect("load");
    let mut s = settings();
    s.max_staleness = Duration::from_millis(300);
    g.configure(&s).expect("configure");
    let req = pkt(&request("GET", "/items", "x-api-key: k-hb\r\n"));
    g.block(key_id(b"k-hb"), Duration::from_secs(60))
        .expect("block");
    let drained = pkt(&request("GET", "/items", "x-api-key: k-hb-low\r\n"));
    g.put_budget(key_id(b"k-hb-low"), budget(0.0, 0.0, Duration::ZERO))
        .expect("put");
    let client = IpAddr::from(CLIENT4);
    g.bind(client, key_id(b"k-hb-low")).expect("bind");
    let syn = seg(SYN, "");
    let all = [&req, &drained, &syn];
    for p in all {
        assert_eq!(run(&mut g, p), DROP);
    }
    std::thread::sleep(Duration::from_millis(400));
    for p in all {
        assert_eq!(
            run(&mut g, p),
            PASS,
            "no heartbeat for longer than max_staleness"
        );
    }
    g.heartbeat().expect("heartbeat");
    for p in all {
        assert_eq!(run(&mut g, p), DROP, "the daemon is back");
    }
}

#[test]
fn a_starting_daemon_clears_the_bindings_it_does_not_remember() {
    let mut g = gate();
    let k = key_id(b"k-cleared");
    g.put_budget(k, budget(0.0, 0.0, Duration::ZERO))
        .expect("put");
    g.bind(IpAddr::from(CLIENT4), k).expect("bind");
    g.bind(IpAddr::from(CLIENT6), k).expect("bind");
    let syn = seg(SYN, "");
    assert_eq!(run(&mut g, &syn), DROP, "bound to a drained key");
    assert_eq!(g.clear_bindings().expect("clear"), 2);
    assert_eq!(
        run(&mut g, &syn),
        PASS,
        "nothing stands for the key any more"
    );
    assert_eq!(g.clear_bindings().expect("clear"), 0);
}

#[test]
fn what_cannot_be_read_for_sure_passes() {
    let mut g = gate();
    g.put_budget(key_id(b"k-cut"), budget(0.0, 0.0, Duration::ZERO))
        .expect("put");
    g.put_budget(key_id(b"k"), budget(0.0, 0.0, Duration::ZERO))
        .expect("put");
    let full = request("GET", "/items", "x-api-key: k-cut\r\n");
    assert_eq!(
        run(&mut g, &pkt(&full)),
        DROP,
        "the whole request is rejected"
    );
    let cut_in_name = &full[..full.find("api-key").expect("header") + 3];
    assert_eq!(
        run(&mut g, &pkt(cut_in_name)),
        PASS,
        "header name split across segments"
    );
    let cut_in_value = &full[..full.find("k-cut").expect("value") + 1];
    assert_eq!(
        run(&mut g, &pkt(cut_in_value)),
        PASS,
        "a value cut after 'k' must not be taken for the key 'k'"
    );
    let far = request(
        "GET",
        "/items",
        &format!("X-Pad: {}\r\nx-api-key: k-cut\r\n", "p".repeat(600)),
    );
    assert_eq!(
        run(&mut g, &pkt(&far)),
        PASS,
        "key header beyond the scan window"
    );
    let long_key = request(
        "GET",
        "/items",
        &format!("x-api-key: {}\r\n", "k".repeat(200)),
    );
    assert_eq!(
        run(&mut g, &pkt(&long_key)),
        PASS,
        "a key longer than MAX_KEY_LEN"
    );
    for bad in [
        "GET /items HTTX/1.1\r\nx-api-key: k-cut\r\n\r\n",
        "get /items HTTP/1.1\r\nx-api-key: k-cut\r\n\r\n",
        "GET items HTTP/1.1\r\nx-api-key: k-cut\r\n\r\n",
        "\x16\x03\x01\x02\x00\x01\x00\x01\x7c\x03\x03",
        "SSH-2.0-OpenSSH_9.2\r\n",
        "",
    ] {
        assert_eq!(run(&mut g, &pkt(bad)), PASS, "{bad:?}");
    }
    let no_key = request("GET", "/items", "Accept: */*\r\n");
    assert_eq!(run(&mut g, &pkt(&no_key)), PASS, "no key header");
    // The value is exactly the key only when its line ends cleanly and is not folded on.
    let lf_only = "GET /items HTTP/1.1\nx-api-key: k-cut\n\n";
    assert_eq!(
        run(&mut g, &pkt(lf_only)),
        DROP,
        "LF line ends are line ends"
    );
    for (what, headers) in [
        ("a bare CR in the value", "x-api-key: k-cut\rX\r\n"),
        ("a bare CR ends the value", "x-api-key: k-cut\r"),
        ("a folded value", "x-api-key: k-cut\r\n more\r\n"),
        ("a folded value (tab, LF)", "x-api-key: k-cut\n\tmore\n"),
    ] {
        let req = format!("GET /items HTTP/1.1\r\nHost: a\r\n{headers}\r\n");
        assert_eq!(run(&mut g, &pkt(&req)), PASS, "{what}");
    }
    let last = "GET /items HTTP/1.1\r\nHost: a\r\nx-api-key: k-cut\r\n";
    assert_eq!(
        run(&mut g, &pkt(last)),
        PASS,
        "the key line ends the segment: the next one may fold it on"
    );
    let mut frag = pkt(&full);
    frag.more_fragments = true;
    assert_eq!(run(&mut g, &frag), PASS, "IPv4 fragment");
    let mut other_port = pkt(&full);
    other_port.port = 9090;
    assert_eq!(run(&mut g, &other_port), PASS, "unprotected port");
}

/// A segment with these flags and payload.
fn seg(flags: u8, payload: &str) -> Pkt {
    Pkt {
        flags,
        ..pkt(payload)
    }
}

#[test]
fn a_bound_address_is_rejected_without_l7_identity_where_a_connection_or_request_starts() {
    let mut g = gate();
    let k = key_id(b"k-bound");
    g.put_budget(k, budget(0.5, 0.0, Duration::ZERO))
        .expect("put");
    let client = IpAddr::from(CLIENT4);
    let syn = seg(SYN, "");
    assert_eq!(run(&mut g, &syn), PASS, "not bound yet");
    g.bind(client, k).expect("bind");
    assert_eq!(
        run(&mut g, &syn),
        DROP,
        "a connection start: 0.5 tokens cannot pay the cheapest price 1"
    );
    let mut syn6 = syn.clone();
    syn6.v6 = true;
    assert_eq!(run(&mut g, &syn6), PASS, "another address (IPv6)");
    g.bind(IpAddr::from(CLIENT6), k).expect("bind");
    assert_eq!(run(&mut g, &syn6), DROP, "bound IPv6 address");
    // A request line without the key header starts a request: priced as that request.
    let report = pkt("POST /generate-report HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(run(&mut g, &report), DROP, "a request start");
    let no_key = pkt("GET /items HTTP/1.1\r\nHost: a\r\nAccept: */*\n\n");
    assert_eq!(
        run(&mut g, &no_key),
        DROP,
        "a whole head without the key header"
    );
    let empty_key = pkt("GET /items HTTP/1.1\r\nx-api-key: \r\nHost: a\r\n");
    assert_eq!(
        run(&mut g, &empty_key),
        DROP,
        "an empty key header is no key"
    );
    // The key header may still come, and may be another key's: the binding does not decide.
    let cut = pkt("GET /items HTTP/1.1\r\nHost: a\r\nUser-Ag");
    assert_eq!(run(&mut g, &cut), PASS, "request line read, headers cut");
    let bare_cr = pkt("GET /items HTTP/1.1\r\nHost: a\r\n\rx-api-key: k-rich\r\n\r\n");
    assert_eq!(
        run(&mut g, &bare_cr),
        PASS,
        "a bare CR is not the end of the head"
    );
    let mut syn_request = seg(SYN, "GET /items HTTP/1.1\r\nHost: a\r\nUser-Ag");
    assert_eq!(
        run(&mut g, &syn_request),
        PASS,
        "a SYN carrying a request whose key may still come (TCP Fast Open)"
    );
    // A TLS ClientHello's start (record header, handshake type, length, version, random).
    syn_request.payload = [
        &b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"[..],
        &[0x5a; 32],
    ]
    .concat();
    assert_eq!(
        run(&mut g, &syn_request),
        PASS,
        "a SYN carrying data is judged by its data: TLS starts no HTTP request"
    );
    // Ethernet padding of a short frame is no payload: a padded SYN is still a bare SYN, and
    // a padded ACK still a pure ACK.
    let padded_syn = Pkt {
        padding: 6,
        ..seg(SYN, "")
    };
    assert_eq!(run(&mut g, &padded_syn), DROP, "a SYN in a padded frame");
    let padded_ack = Pkt {
        padding: 6,
        ..seg(ACK, "")
    };
    assert_eq!(run(&mut g, &padded_ack), PASS, "an ACK in a padded frame");
    // An L7 identity wins over the binding.
    g.put_budget(key_id(b"k-rich"), budget(500.0, 0.0, Duration::ZERO))
        .expect("put");
    let rich = pkt(&request("GET", "/items", "x-api-key: k-rich\r\n"));
    assert_eq!(run(&mut g, &rich), PASS);
    // An operational endpoint (price 0) passes.
    g.set_price(Some("GET"), "/health", 0.0).expect("price");
    let health = pkt("GET /health HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(run(&mut g, &health), PASS, "operational: price 0");
    // An expensive request is compared with its own price.
    g.put_budget(k, budget(80.0, 0.0, Duration::ZERO))
        .expect("put");
    assert_eq!(run(&mut g, &report), DROP, "80 tokens cannot pay 120");
    assert_eq!(run(&mut g, &syn), PASS, "80 tokens pay the cheapest price");
    g.unbind(client).expect("unbind");
    assert_eq!(run(&mut g, &report), PASS);
    assert_eq!(g.counters().expect("counters").rejected_l4, 7);
}

/// The ACKs of a response the key just paid for, its FIN and RST, and the segments of a
/// request already under way carry no request start: a bound address whose key cannot pay
/// the cheapest price still gets them through (with a drop, the paid response would stall).
#[test]
fn a_bound_address_never_loses_acks_fins_resets_or_continuations() {
    let mut g = gate();
    let k = key_id(b"k-drained");
    g.put_budget(k, budget(0.0, 0.0, Duration::ZERO))
        .expect("put");
    g.bind(IpAddr::from(CLIENT4), k).expect("bind");
    g.block(k, Duration::from_secs(60)).expect("block");
    for v6 in [false, true] {
        if v6 {
            g.bind(IpAddr::from(CLIENT6), k).expect("bind");
        }
        for (what, mut p) in [
            ("pure ACK", seg(ACK, "")),
            ("FIN|ACK", seg(FIN | ACK, "")),
            ("RST", seg(RST, "")),
            ("RST|ACK", seg(RST | ACK, "")),
            ("SYN|ACK", seg(SYN | ACK, "")),
            (
                "body bytes",
                seg(PSH_ACK, "more body bytes of an earlier request"),
            ),
            ("body with a FIN", seg(FIN | PSH_ACK, "{\"last\": true}")),
            (
                "a header line continued",
                seg(PSH_ACK, "Accept: */*\r\n\r\n"),
            ),
            ("a request line cut", seg(PSH_ACK, "GET /items HTT")),
            ("a method only", seg(PSH_ACK, "POST")),
            ("TLS record", seg(PSH_ACK, "\x17\x03\x03\x00\x20")),
            (
                "RST carrying a request line",
                seg(RST | ACK, "GET /items HTTP/1.1\r\n\r\n"),
            ),
        ] {
            p.v6 = v6;
            assert_eq!(run(&mut g, &p), PASS, "{what} (v6: {v6})");
        }
    }
    // The same address's connection and request starts are rejected (blocked key).
    assert_eq!(run(&mut g, &seg(SYN, "")), DROP);
    assert_eq!(run(&mut g, &pkt("GET /x HTTP/1.1\r\n\r\n")), DROP);
    let c = g.counters().expect("counters");
    assert_eq!((c.rejected_l4, c.rejected_blocked), (0, 2));
}

#[test]
fn bearer_tokens_in_authorization() {
    let mut g = Gate::load(None).expect("load");
    let mut s = settings();
    s.key_header = "Authorization".into();
    s.value_prefix = "Bearer ".into();
    g.configure(&s).expect("configure");
    g.put_budget(key_id(b"tok-1"), budget(0.0, 0.0, Duration::ZERO))
        .expect("put");
    let bearer = pkt(&request("GET", "/x", "Authorization: Bearer tok-1\r\n"));
    assert_eq!(run(&mut g, &bearer), DROP);
    let lower = pkt(&request("GET", "/x", "authorization: bearer tok-1\r\n"));
    assert_eq!(run(&mut g, &lower), DROP);
    let basic = pkt(&request("GET", "/x", "Authorization: Basic dG9rLTE=\r\n"));
    assert_eq!(run(&mut g, &basic), PASS);
}

#[test]
fn reset_answers_the_client_with_a_tcp_rst() {
    let mut g = Gate::load(None).expect("load");
    let mut s = settings();
    s.reset = true;
    g.configure(&s).expect("configure");
    g.put_budget(key_id(b"k-rst"), budget(0.0, 0.0, Duration::ZERO))
        .expect("put");
    for v6 in [false, true] {
        let mut p = pkt(&request("GET", "/items", "x-api-key: k-rst\r\n"));
        p.v6 = v6;
        let input = bytes(&p);
        let mut out = vec![0u8; input.len() + 256];
        let r = g
            .program()
            .expect("program")
            .test_run(TestRunOptions {
                data_in: Some(&input),
                data_out: Some(&mut out),
                repeat: 1,
                ..Default::default()
            })
            .expect("test_run");
        assert_eq!(r.return_value, 7, "TC_ACT_REDIRECT (v6: {v6})");
        let ip_len = if v6 { 40 } else { 20 };
        let len = 14 + ip_len + 20;
        assert_eq!(r.data_size_out as usize, len, "headers only, no payload");
        let o = &out[..len];
        let t = &o[14 + ip_len..];
        let it = &input[14 + ip_len..];
        assert_eq!(&t[0..2], &it[2..4], "ports swapped");
        assert_eq!(&t[2..4], &it[0..2]);
        assert_eq!(t[13], 0x14, "RST|ACK");
        let payload = (input.len() - 14 - ip_len - 20) as u32;
        let seq = u32::from_be_bytes([it[4], it[5], it[6], it[7]]);
        assert_eq!(
            u32::from_be_bytes([t[8], t[9], t[10], t[11]]),
            seq + payload,
            "acknowledges the rejected payload"
        );
        assert_eq!(&t[4..8], &it[8..12], "seq = the client's ack");
        // Checksums verify: a one's-complement sum including the checksum folds to 0xffff.
        let sum = |b: &[u8], mut acc: u32| {
            for w in b.chunks(2) {
                acc += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
            }
            while acc > 0xffff {
                acc = (acc & 0xffff) + (acc >> 16);
            }
            acc
        };
        let pseudo = if v6 {
            assert_eq!(&o[22..38], &input[38..54], "addresses swapped");
            sum(&o[22..54], 6 + 20)
        } else {
            assert_eq!(&o[26..30], &input[30..34], "addresses swapped");
            assert_eq!(sum(&o[14..34], 0), 0xffff, "IPv4 header checksum");
            sum(&o[26..34], 6 + 20)
        };
        assert_eq!(sum(t, pseudo), 0xffff, "TCP checksum (v6: {v6})");
    }
    // A connection start from a bound address: the RST answers the SYN (RFC 9293: sequence
    // number 0, acknowledging the SYN), so the client's connect fails at once.
    g.bind(IpAddr::from(CLIENT4), key_id(b"k-rst"))
        .expect("bind");
    let input = bytes(&seg(SYN, ""));
    let mut out = vec![0u8; input.len() + 256];
    let r = g
        .program()
        .expect("program")
        .test_run(TestRunOptions {
            data_in: Some(&input),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })
        .expect("test_run");
    assert_eq!(r.return_value, 7, "TC_ACT_REDIRECT");
    let (t, it) = (&out[34..54], &input[34..54]);
    assert_eq!(t[13], 0x14, "RST|ACK");
    assert_eq!(&t[4..8], &[0, 0, 0, 0], "seq 0: the SYN carried no ACK");
    let seq = u32::from_be_bytes([it[4], it[5], it[6], it[7]]);
    assert_eq!(
        u32::from_be_bytes([t[8], t[9], t[10], t[11]]),
        seq + 1,
        "acknowledges the SYN"
    );
}

// ---- Paths: the gate never prices a request above what the daemon charges for its normal
// form (`enforcer::endpoint`). A path the daemon could spell differently is ambiguous to the
// gate: priced at the cheapest price of all (0 when an operational endpoint exists).

/// A config like the example's: `POST /generate-report` 120, `/cheap` 0.5, default 1, with
/// `extra` endpoints.
fn paths_config(trailing: &str, extra: &str) -> enforcer::config::Config {
    enforcer::config::Config::parse(&format!(
        r#"
        [pricing]
        default_cost = 1
        trailing_slash = "{trailing}"
        [[pricing.endpoints]]
        method = "POST"
        path = "/generate-report"
        base_cost = 120
        [[pricing.endpoints]]
        path = "/cheap"
        base_cost = 0.5
        {extra}
        "#
    ))
    .expect("valid config")
}

const HEALTH: &str =
    "[[pricing.endpoints]]\nmethod = \"GET\"\npath = \"/health\"\noperational = true";

/// A gate set up from `config` as the daemon sets it up (`kernel::plan`), on the test's port.
fn planned(config: &enforcer::config::Config) -> Gate {
    let plan = enforcer::kernel::plan(config);
    let mut settings = plan.settings.clone();
    settings.ports = vec![PORT];
    let mut gate = Gate::load(None).expect("load");
    gate.configure(&settings).expect("configure");
    for (method, path, price) in &plan.prices {
        gate.set_price(method.as_deref(), path, *price)
            .expect("price");
    }
    gate
}

/// Spellings of the configured endpoints, in and out of normal form.
const SPELLINGS: &[&str] = &[
    "/generate-report",
    "/generate-report/",
    "/generate-report?format=pdf",
    "/cheap",
    "/cheap/",
    "/health",
    "/other",
    "/",
    "//generate-report",
    "/generate-report//",
    "/./generate-report",
    "/x/../generate-report",
    "/cheap/../generate-report",
    "/generate-report/.",
    "/generate-report/..",
    "/%67enerate-report",
    "/%2e%2e/generate-report",
    "/generate-report/../cheap",
    "/generate-report/./../cheap/",
    "//cheap?x=1",
    "/%63heap",
    "/generate-report/../health",
    "//health",
    "/health/",
    "/health//",
    "/health/.",
    "/%68ealth",
    "/x\\..\\health",
    "/x\\..\\cheap",
    "/.well-known/x",
    "/a{b}",
    "/caf\u{e9}",
];

/// What the daemon charges the main budget for `method raw` (operational: nothing), or `None`
/// when it refuses the request.
fn daemon_price(config: &enforcer::config::Config, method: &str, raw: &str) -> Option<f64> {
    let book = enforcer::price::PriceBook::new(&config.pricing);
    let endpoint = book.endpoint(raw).ok()?;
    let price = book.price(Some(method), &endpoint).ok()?;
    Some(if price.operational {
        0.0
    } else {
        price.per_unit()
    })
}

#[test]
fn the_gate_never_prices_a_path_above_the_daemon() {
    let long = format!("/{}/../health", "a".repeat(300));
    let mut spellings: Vec<&str> = SPELLINGS.to_vec();
    spellings.push(&long);
    let client = IpAddr::from(CLIENT4);
    let mut checked = 0;
    for config in [
        paths_config("strip", HEALTH),
        paths_config("strip", ""),
        paths_config("keep", HEALTH),
        paths_config("keep", ""),
    ] {
        let mut g = planned(&config);
        let k = key_id(b"k-paths");
        for method in ["POST", "GET"] {
            for raw in &spellings {
                let Some(charged) = daemon_price(&config, method, raw) else {
                    continue;
                };
                for balance in [0.0, 0.4, 0.7, 1.5, 80.0, 119.0, 500.0] {
                    g.put_budget(k, budget(balance, 0.0, Duration::ZERO))
                        .expect("put");
                    // L7: the key header identifies the key.
                    let l7 = pkt(&request(method, raw, "x-api-key: k-paths\r\n"));
                    // L4: no key header, the address is bound to the key.
                    let l4 = pkt(&request(method, raw, ""));
                    g.bind(client, k).expect("bind");
                    for (how, p) in [("L7", &l7), ("L4", &l4)] {
                        if run(&mut g, p) == DROP {
                            assert!(
                                balance < charged,
                                "{how} {method} {raw:?} with {balance} tokens: the gate rejects, \
                                 the daemon charges {charged} (pricing {:?})",
                                config.pricing.trailing_slash
                            );
                        }
                        checked += 1;
                    }
                    g.unbind(client).expect("unbind");
                }
            }
        }
    }
    assert!(checked > 1000, "{checked} requests checked");
}

#[test]
fn paths_in_normal_form_are_rejected_as_before_and_the_others_at_the_cheapest_price() {
    let k = key_id(b"k-norm");
    let verdict = |g: &mut Gate, balance: f64, method: &str, path: &str| {
        g.put_budget(k, budget(balance, 0.0, Duration::ZERO))
            .expect("put");
        run(g, &pkt(&request(method, path, "x-api-key: k-norm\r\n")))
    };

    // No operational endpoint: the cheapest price of all is /cheap's 0.5.
    let mut g = planned(&paths_config("strip", ""));
    for path in [
        "/generate-report",
        "/generate-report/",
        "/generate-report?format=pdf",
    ] {
        assert_eq!(verdict(&mut g, 80.0, "POST", path), DROP, "{path}: 120");
        assert_eq!(verdict(&mut g, 0.0, "POST", path), DROP, "{path}: drained");
    }
    assert_eq!(verdict(&mut g, 80.0, "GET", "/generate-report"), PASS);
    assert_eq!(verdict(&mut g, 0.7, "GET", "/cheap"), PASS);
    assert_eq!(verdict(&mut g, 0.4, "GET", "/cheap/"), DROP, "0.4 < 0.5");
    for path in [
        "//generate-report",
        "/x/../generate-report",
        "/generate-report/../cheap",
        "/%67enerate-report",
        "/generate-report/.",
    ] {
        assert_eq!(
            verdict(&mut g, 0.7, "POST", path),
            PASS,
            "{path}: ambiguous, 0.7 pays the cheapest price"
        );
        assert_eq!(
            verdict(&mut g, 0.4, "POST", path),
            DROP,
            "{path}: 0.4 pays for nothing the daemon sells"
        );
    }

    // An operational endpoint: an ambiguous path may be one, so it passes even drained.
    let mut g = planned(&paths_config("strip", HEALTH));
    for path in [
        "/health",
        "//health",
        "/health/",
        "/x/../health",
        "/%68ealth",
    ] {
        assert_eq!(verdict(&mut g, 0.0, "GET", path), PASS, "{path}");
    }
    assert_eq!(verdict(&mut g, 0.0, "POST", "//generate-report"), PASS);
    assert_eq!(verdict(&mut g, 0.0, "POST", "/generate-report"), DROP);
    assert_eq!(verdict(&mut g, 80.0, "POST", "/generate-report/"), DROP);

    // `trailing_slash = "keep"` reaches the gate: `/generate-report/` is another endpoint.
    let mut g = planned(&paths_config("keep", ""));
    assert_eq!(verdict(&mut g, 80.0, "POST", "/generate-report"), DROP);
    assert_eq!(
        verdict(&mut g, 80.0, "POST", "/generate-report/"),
        PASS,
        "priced at the default (1) by the daemon"
    );
    assert_eq!(
        verdict(&mut g, 0.7, "POST", "/generate-report/"),
        DROP,
        "0.7 < 1"
    );
}
