//! Property test of the kernel gate: random HTTP-shaped segments, run by the kernel itself
//! (`BPF_PROG_TEST_RUN` on the real verified program), checked against a reference written
//! here. Needs root; run through `cargo xtask test`.
//!
//! **The property: the gate rejects a segment only where the reference allows it.** The
//! reference ([`read`], [`allowed`]) reads the segment as an HTTP server would and allows a
//! rejection only for:
//!
//! - **L7**: a request whose first key header holds exactly a key (the whole value between the
//!   colon and a clean line end, blanks and the value prefix taken off, not folded onto the
//!   next line) that is blocked, or whose snapshot cannot pay what the daemon charges for that
//!   request (`PriceBook` on its normal form; a request the daemon refuses is never served);
//! - **L4**, from an address bound to a key that is blocked or cannot pay: a request whose head
//!   carries no key (no key header up to the empty line, or an empty or prefix-less one),
//!   priced as above; or a bare SYN (no ACK, no RST, no payload), at the cheapest main-budget
//!   price.
//!
//! Nothing else: not ACKs, FINs, RSTs or body segments, not a key that is a prefix or suffix
//! of a drained key, not key-like text elsewhere, not a key header the segment cuts off.
//!
//! Every case is built from its own 64-bit seed (a SplitMix64 generator: no dependency). A run
//! takes [`CASES`] seeds from a base seed (random, or `ENFORCER_GATE_PROPS_SEED`; the count:
//! `ENFORCER_GATE_PROPS_CASES`), after the seeds in [`REGRESSIONS`]. A failure prints each
//! failing seed with its segment: add the seed to [`REGRESSIONS`] so it always runs.
use aya::programs::{TestRun as _, TestRunOptions};
use enforcer::config::Config;
use enforcer::kernel::{Gate, monotonic_ns};
use enforcer::price::PriceBook;
use enforcer_common::{Budget, Milli, key_id};
use enforcer_tests::packet::Frame;
use enforcer_tests::packet::flags::{ACK, FIN, PSH, RST, SYN};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Cases per run (at least 100 000; `ENFORCER_GATE_PROPS_CASES` overrides it).
const CASES: u64 = 250_000;
/// Seeds that failed once: they run first, every time.
const REGRESSIONS: &[u64] = &[];
/// Cases between two refreshes of the maps (snapshots, bindings, heartbeat).
const BATCH: u64 = 2_000;

const PORT: u16 = 8080;
const PASS: u32 = 3; // TC_ACT_PIPE
const DROP: u32 = 2; // TC_ACT_SHOT
const REDIRECT: u32 = 7; // TC_ACT_REDIRECT (action = "reset")

/// A 128-byte key (the longest the kernel hashes).
const LONG: &str = "k-long-0123456789-0123456789-0123456789-0123456789-0123456789-0123456789-0123456789-0123456789-0123456789-0123456789-01234567";

/// Keys with a snapshot, and their balance. Drained keys are prefixes and suffixes of keys
/// that can pay, and the other way round.
const KEYS: &[(&str, f64)] = &[
    ("k-drained", 0.0),
    ("k-rich-drained", 0.0),
    ("tok", 0.0),
    (LONG, 0.0),
    ("k-low", 0.7),
    ("k-mid", 80.0),
    ("k-rich", 1e6),
    ("k-drained-not", 1e6),
    ("pre-k-drained", 1e6),
    ("tok2", 1e6),
    ("k-blocked", 1e6),
];
/// Blocked by an operator (whatever its balance).
const BLOCKED: &str = "k-blocked";
/// Keys without a snapshot that look like the ones with one.
const DECOYS: &[&str] = &[
    "k-drain",
    "K-DRAINED",
    "k-drained2",
    "-drained",
    "k-drainedk-drained",
    "to",
    "k-rich-drain",
    "k-rich-drained-",
    "k-long-0123456789",
];

/// Client addresses and the key each is bound to (`None`: not bound).
const SOURCES: &[(&str, Option<&str>)] = &[
    ("10.0.0.2", Some("k-drained")),
    ("10.0.0.3", Some("k-rich")),
    ("10.0.0.4", Some("k-low")),
    ("10.0.0.5", Some("k-blocked")),
    ("10.0.0.9", None),
    ("fd00::2", Some("k-drained")),
    ("fd00::3", Some("k-blocked")),
    ("fd00::4", Some("k-mid")),
    ("fd00::9", None),
];

/// The two worlds a case runs in: the key header, its value prefix, the prices, the action.
const WORLDS: &[&str] = &[
    r#"
    [pricing]
    default_cost = 1
    trailing_slash = "strip"
    [[pricing.endpoints]]
    method = "POST"
    path = "/generate-report"
    base_cost = 120
    [[pricing.endpoints]]
    path = "/cheap"
    base_cost = 0.5
    [[pricing.endpoints]]
    method = "GET"
    path = "/health"
    operational = true
    [kernel]
    key_header = "x-api-key"
    "#,
    r#"
    [pricing]
    default_cost = 2
    trailing_slash = "keep"
    [[pricing.endpoints]]
    method = "POST"
    path = "/generate-report"
    base_cost = 120
    [[pricing.endpoints]]
    path = "/cheap"
    base_cost = 0.5
    [[pricing.endpoints]]
    path = "/v2/*"
    base_cost = 5
    [[pricing.endpoints]]
    method = "DELETE"
    path = "/items"
    base_cost = 3
    [kernel]
    key_header = "Authorization"
    value_prefix = "Bearer "
    action = "reset"
    "#,
];

// ---- The generator ------------------------------------------------------------------------

/// SplitMix64: a seed in, a stream of well-mixed words out.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// 0..n (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// One generated case.
#[derive(Debug, Clone)]
struct Case {
    world: usize,
    src: IpAddr,
    flags: u8,
    tcp_options: usize,
    payload: Vec<u8>,
}

fn generate(seed: u64) -> Case {
    let mut r = Rng(seed);
    let world = r.below(WORLDS.len());
    let src = r.pick(SOURCES).0.parse().expect("address");
    let flags = match r.below(100) {
        0..=64 => PSH | ACK,
        65..=72 => ACK,
        73..=80 => SYN,
        81..=83 => SYN | ACK,
        84..=88 => FIN | ACK | if r.chance(50) { PSH } else { 0 },
        89..=92 => RST | if r.chance(50) { ACK } else { 0 },
        _ => r.next() as u8,
    };
    let tcp_options = if r.chance(10) { 4 * r.below(11) } else { 0 };
    let payload = match r.below(100) {
        0..=11 => Vec::new(),
        12..=16 => noise(&mut r),
        17..=26 => body(&mut r),
        27..=34 => {
            // A continuation that starts a pipelined request somewhere inside.
            let mut p = body(&mut r);
            p.extend(request(&mut r, world));
            p
        }
        _ => {
            let full = request(&mut r, world);
            segment(&mut r, full)
        }
    };
    Case {
        world,
        src,
        flags,
        tcp_options,
        payload,
    }
}

/// Cuts a request's bytes as TCP may: whole, its first part, a later part (continuation, at a
/// line start or anywhere), or with a few bytes changed.
fn segment(r: &mut Rng, mut full: Vec<u8>) -> Vec<u8> {
    full.truncate(1400);
    match r.below(100) {
        0..=44 => full,
        45..=64 => {
            let end = r.below(full.len() + 1);
            full.truncate(end);
            full
        }
        65..=76 => {
            let start = r.below(full.len() + 1);
            full.split_off(start)
        }
        77..=86 => {
            let starts: Vec<usize> = (0..full.len())
                .filter(|&i| i > 0 && full[i - 1] == b'\n')
                .collect();
            if starts.is_empty() {
                full
            } else {
                let at = *r.pick(&starts);
                full.split_off(at)
            }
        }
        _ => {
            const BYTES: &[u8] = b" \r\n\t:/?#%.\\Aax-\x00\x7f\x80";
            for _ in 0..1 + r.below(3) {
                if !full.is_empty() {
                    let at = r.below(full.len());
                    full[at] = *r.pick(BYTES);
                }
            }
            full
        }
    }
}

fn noise(r: &mut Rng) -> Vec<u8> {
    if r.chance(50) {
        // The start of a TLS ClientHello.
        let mut p = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec();
        p.extend((0..r.below(200)).map(|_| r.next() as u8));
        p
    } else {
        (0..1 + r.below(300)).map(|_| r.next() as u8).collect()
    }
}

/// A key: one with a snapshot, a look-alike, or anything.
fn any_key(r: &mut Rng) -> String {
    match r.below(100) {
        0..=64 => r.pick(KEYS).0.to_owned(),
        65..=84 => (*r.pick(DECOYS)).to_owned(),
        85..=89 => format!("{LONG}x"),
        _ => (0..1 + r.below(24))
            .map(|_| *r.pick(b"abcdefghijk-_.~0123456789ABCXYZ") as char)
            .collect(),
    }
}

/// Key-like text where no key header is: bodies, JSON, header lines of a body.
fn body(r: &mut Rng) -> Vec<u8> {
    let mut out = String::new();
    for _ in 0..1 + r.below(4) {
        let k = any_key(r);
        match r.below(7) {
            0 => write!(out, "x-api-key: {k}\r\n"),
            1 => write!(out, "{{\"x-api-key\": \"{k}\", \"n\": 1}}"),
            2 => write!(out, "Authorization: Bearer {k}\r\n"),
            3 => write!(out, "key={k}&x-api-key={k}"),
            4 => write!(out, "\r\n\r\n"),
            5 => write!(out, "GET /items HTTP/1.1"),
            _ => write!(out, "{}", "lorem ipsum ".repeat(r.below(20))),
        }
        .expect("write");
    }
    out.into_bytes()
}

const METHODS: &[&str] = &[
    "GET",
    "POST",
    "GET",
    "POST",
    "PUT",
    "DELETE",
    "PATCH",
    "HEAD",
    "OPTIONS",
    "PROPFIND",
    "MKCALENDAR",
    "MKCALENDARX",
    "GE",
    "get",
    "Post",
    "G3T",
];

const TARGETS: &[&str] = &[
    "/generate-report",
    "/generate-report/",
    "/generate-report?format=pdf",
    "/generate-report#x",
    "/generate-report?a=b#c",
    "/cheap",
    "/cheap/",
    "/health",
    "/health/",
    "/health?x",
    "/items",
    "/items/",
    "/v2",
    "/v2/x",
    "/v2/../generate-report",
    "/",
    "//generate-report",
    "/./generate-report",
    "/x/../generate-report",
    "/generate-report/.",
    "/generate-report/..",
    "/%67enerate-report",
    "/%2e%2e/generate-report",
    "/generate-report/../cheap",
    "/generate-report/../health",
    "//health",
    "/%68ealth",
    "/x\\..\\health",
    "/.well-known/x",
    "/a{b}",
    "/caf\u{e9}",
    "/%zz",
    "/a%00b",
    "*",
    "http://api/generate-report",
    "generate-report",
];

fn target(r: &mut Rng) -> Vec<u8> {
    match r.below(100) {
        0..=84 => r.pick(TARGETS).as_bytes().to_vec(),
        85..=89 => {
            let mut t = format!("/{}", "a".repeat(240 + r.below(40)));
            if r.chance(50) {
                t.push_str("/../generate-report");
            }
            t.into_bytes()
        }
        90..=94 => {
            let mut t = b"/".to_vec();
            t.extend((0..r.below(12)).map(|_| *r.pick(b"ab/.%?#-\\\x01\xff ")));
            t
        }
        _ => format!("/{}", "p/".repeat(r.below(6))).into_bytes(),
    }
}

/// The key header's name as a client might spell it (any case), or a near miss.
fn key_name(r: &mut Rng, world: usize) -> String {
    let own = ["x-api-key", "Authorization"][world];
    let name = match r.below(100) {
        0..=84 => own.to_owned(),
        85..=89 => ["Authorization", "x-api-key"][world].to_owned(),
        _ => (*r.pick(&[
            "x-api-keys",
            "x-api_key",
            "api-key",
            "x-api-key ",
            "authorizatio",
            "Authorization ",
            "xx-api-key",
        ]))
        .to_owned(),
    };
    match r.below(3) {
        0 => name.to_ascii_lowercase(),
        1 => name,
        _ => name
            .chars()
            .map(|c| {
                if r.chance(50) {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect(),
    }
}

fn blanks(r: &mut Rng, most: usize) -> String {
    (0..r.below(most + 1))
        .map(|_| if r.chance(80) { ' ' } else { '\t' })
        .collect()
}

/// One key header line (without its line end), sometimes followed by a folded line.
fn key_line(r: &mut Rng, world: usize, eol: &str) -> String {
    let mut line = key_name(r, world);
    line.push(':');
    line.push_str(&match r.below(10) {
        0..=5 => " ".to_owned(),
        6..=7 => String::new(),
        _ => blanks(r, 9),
    });
    let prefix = match (world, r.below(100)) {
        (1, 0..=79) | (0, 0..=2) => {
            let p: String = "Bearer "
                .chars()
                .map(|c| {
                    if r.chance(30) {
                        c.to_ascii_uppercase()
                    } else {
                        c.to_ascii_lowercase()
                    }
                })
                .collect();
            p
        }
        (1, 80..=84) => "Bearer".to_owned(),
        (1, 85..=89) => "Basic ".to_owned(),
        (1, 90..=94) => "Bearer  ".to_owned(),
        _ => String::new(),
    };
    line.push_str(&prefix);
    let mut k = any_key(r);
    if r.chance(3) {
        let at = r.below(k.len() + 1);
        k.insert_str(at, if r.chance(50) { "\r" } else { "\rX" });
    }
    line.push_str(&k);
    if r.chance(20) {
        line.push_str(&blanks(r, 9));
    }
    if r.chance(3) {
        line.push_str(eol);
        line.push_str(if r.chance(50) { " folded" } else { "\tfolded" });
    }
    line
}

/// Other header lines, some with key-like text.
fn other_line(r: &mut Rng) -> String {
    let k = any_key(r);
    match r.below(16) {
        0 => "Host: api.example".to_owned(),
        1 => "User-Agent: curl/8.5.0".to_owned(),
        2 => "Accept: */*".to_owned(),
        3 => "Content-Type: application/json".to_owned(),
        4 => format!("Content-Length: {}", r.below(5000)),
        5 => format!("Cookie: x-api-key={k}; authorization=Bearer {k}"),
        6 => format!("X-Api-Key-Old: {k}"),
        7 => format!("X-X-Api-Key: {k}"),
        8 => format!("Api-Key: {k}"),
        9 => format!("X-Note: x-api-key: {k}"),
        10 => format!("X-Note: Authorization: Bearer {k}"),
        11 => format!("Referer: http://a/?x-api-key={k}"),
        12 => format!("X-Pad: {}", "p".repeat(r.below(600))),
        13 => format!(" folded {k}"),
        14 => format!("{k}: {k}"),
        _ => "X-Empty:".to_owned(),
    }
}

/// A request: request line, headers (none, one or several key headers among others), maybe
/// the empty line and a body.
fn request(r: &mut Rng, world: usize) -> Vec<u8> {
    let eol = match r.below(100) {
        0..=84 => "\r\n",
        85..=94 => "\n",
        _ => "\r",
    };
    let mut out = Vec::new();
    out.extend_from_slice(r.pick(METHODS).as_bytes());
    out.extend_from_slice(match r.below(100) {
        0..=96 => b" ",
        97 => b"  ",
        _ => b"\t",
    });
    out.extend(target(r));
    out.extend_from_slice(
        r.pick(&[
            " HTTP/1.1",
            " HTTP/1.1",
            " HTTP/1.1",
            " HTTP/1.0",
            " HTTP/2.0",
            " http/1.1",
            " HTTP/1.1 x",
            "",
        ])
        .as_bytes(),
    );
    out.extend_from_slice(eol.as_bytes());
    let mut lines: Vec<String> = (0..r.below(7)).map(|_| other_line(r)).collect();
    let keys = match r.below(100) {
        0..=9 => 0,
        10..=79 => 1,
        80..=94 => 2,
        _ => 3,
    };
    for _ in 0..keys {
        let at = r.below(lines.len() + 1);
        let line = key_line(r, world, eol);
        lines.insert(at, line);
    }
    for line in lines {
        out.extend_from_slice(line.as_bytes());
        // Now and then a line ends otherwise than the rest.
        let end = if r.chance(3) {
            *r.pick(&["\r\n", "\n", "\r"])
        } else {
            eol
        };
        out.extend_from_slice(end.as_bytes());
    }
    if r.chance(90) {
        out.extend_from_slice(eol.as_bytes());
        if r.chance(50) {
            out.extend(body(r));
        }
    }
    out
}

// ---- The reference ------------------------------------------------------------------------

/// What the reference reads in a segment that starts with a request line.
#[derive(Debug, PartialEq)]
struct Request<'a> {
    method: &'a [u8],
    target: &'a [u8],
    key: Key<'a>,
}

/// The request's key, as the server would take it: the first key header's value.
#[derive(Debug, PartialEq)]
enum Key<'a> {
    /// Exactly this key.
    Exact(&'a [u8]),
    /// No key: the head ended without a key header, or the first key header's value is empty
    /// or lacks the value prefix (another auth scheme).
    Absent,
    /// Not known from this segment: it ends before the answer, or the value may go on (a bare
    /// CR in it, a folded next line, or the next line not in the segment).
    Unknown,
}

/// Reads a segment as an HTTP/1.x server reads a request head. `None`: the segment does not
/// start with a request line (`METHOD SP /target SP HTTP/1.x`, ended by LF or CR LF).
fn read<'a>(p: &'a [u8], name: &str, prefix: &str) -> Option<Request<'a>> {
    let lf = p.iter().position(|&b| b == b'\n')?;
    let line = p[..lf].strip_suffix(b"\r").unwrap_or(&p[..lf]);
    let mut parts = line.splitn(3, |&b| b == b' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    let ok = !method.is_empty()
        && method.iter().all(u8::is_ascii_uppercase)
        && target.starts_with(b"/")
        && version.starts_with(b"HTTP/1.");
    ok.then(|| Request {
        method,
        target,
        key: key_of(&p[lf + 1..], name, prefix),
    })
}

/// The key of the header lines in `rest` (starting at a line start).
fn key_of<'a>(mut rest: &'a [u8], name: &str, prefix: &str) -> Key<'a> {
    loop {
        let Some(lf) = rest.iter().position(|&b| b == b'\n') else {
            // The segment ends inside this line. Its value may already show that it lacks
            // the prefix; nothing else is known.
            return match value(rest, name) {
                Some(v) if lacks_prefix(v, prefix) => Key::Absent,
                _ => Key::Unknown,
            };
        };
        let (line, next) = (&rest[..lf], &rest[lf + 1..]);
        if line.is_empty() || line == b"\r" {
            return Key::Absent; // the empty line: the head ended
        }
        if let Some(v) = value(line, name) {
            let v = trim(v.strip_suffix(b"\r").unwrap_or(v));
            let Some(key) = strip_prefix_ignore_case(v, prefix) else {
                return Key::Absent;
            };
            if key.is_empty() {
                return Key::Absent;
            }
            if key.contains(&b'\r') {
                return Key::Unknown;
            }
            return match next.first() {
                None | Some(b' ' | b'\t') => Key::Unknown,
                Some(_) => Key::Exact(key),
            };
        }
        rest = next;
    }
}

/// The value of a header line named `name` (any case), right after the colon.
fn value<'a>(line: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let n = name.len();
    (line.len() > n && line[n] == b':' && line[..n].eq_ignore_ascii_case(name.as_bytes()))
        .then(|| &line[n + 1..])
}

fn trim(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

fn strip_prefix_ignore_case<'a>(v: &'a [u8], prefix: &str) -> Option<&'a [u8]> {
    let p = prefix.as_bytes();
    (v.len() >= p.len() && v[..p.len()].eq_ignore_ascii_case(p)).then(|| &v[p.len()..])
}

/// Whether the start of a (cut) value, after its leading blanks, already differs from the
/// prefix.
fn lacks_prefix(v: &[u8], prefix: &str) -> bool {
    let mut v = v;
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    v.iter()
        .zip(prefix.as_bytes())
        .any(|(a, b)| !a.eq_ignore_ascii_case(b))
}

/// A world: its config as the daemon reads it, the gate set up from it as the daemon sets it
/// up, and what the reference needs.
struct World {
    gate: Gate,
    book: PriceBook,
    name: String,
    prefix: String,
    /// The cheapest price of any request on the main budget.
    cheapest: f64,
}

impl World {
    fn new(text: &str) -> Self {
        let config = Config::parse(text).expect("valid config");
        let plan = enforcer::kernel::plan(&config);
        let mut settings = plan.settings.clone();
        settings.ports = vec![PORT];
        // The snapshots are refreshed every batch; a long staleness keeps a slow batch fresh.
        settings.max_staleness = Duration::from_secs(60);
        let mut gate = Gate::load(None).expect("the kernel verifies and loads the gate");
        gate.configure(&settings).expect("configure");
        for (method, path, price) in &plan.prices {
            gate.set_price(method.as_deref(), path, *price)
                .expect("price");
        }
        let cheapest = config
            .pricing
            .endpoints
            .iter()
            .filter(|e| !e.operational)
            .map(|e| e.base_cost)
            .fold(config.pricing.default_cost, f64::min);
        let mut world = Self {
            gate,
            book: PriceBook::new(&config.pricing),
            name: config.kernel_key_header().to_owned(),
            prefix: config.kernel.value_prefix.clone(),
            cheapest,
        };
        world.refresh();
        world
    }

    /// Writes the snapshots, bindings and blocks again, freshly stamped.
    fn refresh(&mut self) {
        let now = monotonic_ns();
        for (k, balance) in KEYS {
            let budget = Budget {
                balance_milli: Milli::ceil(*balance).get(),
                synced_ns: now,
                ..Budget::default()
            };
            self.gate
                .put_budget(key_id(k.as_bytes()), budget)
                .expect("put");
        }
        for (addr, bound) in SOURCES {
            if let Some(k) = bound {
                self.gate
                    .bind(addr.parse().expect("address"), key_id(k.as_bytes()))
                    .expect("bind");
            }
        }
        self.gate
            .block(key_id(BLOCKED.as_bytes()), Duration::from_secs(3600))
            .expect("block");
        self.gate.heartbeat().expect("heartbeat");
    }

    /// What the daemon charges the main budget for this request (operational: 0); `None`
    /// when it refuses the request (it is never served).
    fn price(&self, method: &[u8], target: &[u8]) -> Option<f64> {
        let endpoint = self.book.endpoint(&String::from_utf8_lossy(target)).ok()?;
        let price = self
            .book
            .price(Some(std::str::from_utf8(method).ok()?), &endpoint)
            .ok()?;
        Some(if price.operational {
            0.0
        } else {
            price.per_unit()
        })
    }
}

/// Whether `key` is blocked or cannot pay `price` (`None`: a request the daemon refuses).
fn cannot_pay(key: &[u8], price: Option<f64>) -> bool {
    if key == BLOCKED.as_bytes() {
        return true;
    }
    let Some((_, balance)) = KEYS.iter().find(|(k, _)| k.as_bytes() == key) else {
        return false; // no snapshot: the gate knows nothing of it
    };
    price.is_none_or(|p| *balance < p)
}

/// Why the reference allows a rejection, or `None`.
fn allowed(world: &World, case: &Case) -> Option<&'static str> {
    let request = read(&case.payload, &world.name, &world.prefix);
    if let Some(Request {
        method,
        target,
        key: Key::Exact(k),
    }) = &request
        && cannot_pay(k, world.price(method, target))
    {
        return Some("L7: the key header holds a key that cannot pay");
    }
    let bound = SOURCES
        .iter()
        .find(|(a, _)| a.parse::<IpAddr>().ok() == Some(case.src))
        .and_then(|(_, k)| *k)?;
    if case.flags & RST == 0
        && let Some(Request {
            method,
            target,
            key: Key::Absent,
        }) = &request
        && cannot_pay(bound.as_bytes(), world.price(method, target))
    {
        return Some("L4: a request without a key from an address bound to a key that cannot pay");
    }
    if case.flags & (SYN | ACK | RST) == SYN
        && case.payload.is_empty()
        && cannot_pay(bound.as_bytes(), Some(world.cheapest))
    {
        return Some("L4: a SYN from an address bound to a key that cannot pay");
    }
    None
}

// ---- The run ------------------------------------------------------------------------------

fn run(world: &mut World, case: &Case) -> u32 {
    let frame = Frame {
        src: case.src,
        tcp_options: case.tcp_options,
        flags: case.flags,
        ..Frame::new(PORT, &case.payload)
    };
    let data = frame.bytes();
    let mut out = vec![0u8; data.len() + 256];
    world
        .gate
        .program()
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

fn describe(seed: u64, case: &Case, verdict: u32, world: &World) -> String {
    let payload: String = case
        .payload
        .iter()
        .flat_map(|b| std::ascii::escape_default(*b))
        .map(char::from)
        .collect();
    format!(
        "seed {seed:#018x}: world {} ({}{}), from {}, flags {:#04x}, verdict {verdict}\n  \
         payload ({} bytes): \"{payload}\"\n  reference: {:?}",
        case.world,
        world.name,
        if world.prefix.is_empty() {
            String::new()
        } else {
            format!(" {:?}", world.prefix)
        },
        case.src,
        case.flags,
        case.payload.len(),
        read(&case.payload, &world.name, &world.prefix),
    )
}

#[derive(Debug, Default)]
struct Tally {
    cases: u64,
    allowed: u64,
    rejected: u64,
    by_reason: std::collections::BTreeMap<&'static str, u64>,
}

#[test]
fn the_gate_rejects_only_what_the_reference_allows() {
    let cases = std::env::var("ENFORCER_GATE_PROPS_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CASES);
    let base = std::env::var("ENFORCER_GATE_PROPS_SEED")
        .ok()
        .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("gate properties: {cases} cases from base seed {base:#x} (ENFORCER_GATE_PROPS_SEED)");
    let mut worlds: Vec<World> = WORLDS.iter().map(|t| World::new(t)).collect();
    let seeds = REGRESSIONS
        .iter()
        .copied()
        .chain((0..cases).map(|i| Rng(base ^ i.wrapping_mul(0xd134_2543_de82_ef95)).next()));
    let started = Instant::now();
    let mut tally = Tally::default();
    let mut failures = Vec::new();
    for (i, seed) in seeds.enumerate() {
        if (i as u64).is_multiple_of(BATCH) {
            worlds.iter_mut().for_each(World::refresh);
        }
        let case = generate(seed);
        let world = &mut worlds[case.world];
        let verdict = run(world, &case);
        assert!(
            [PASS, DROP, REDIRECT].contains(&verdict),
            "unexpected verdict {verdict}: {}",
            describe(seed, &case, verdict, world)
        );
        let reason = allowed(world, &case);
        tally.cases += 1;
        tally.allowed += u64::from(reason.is_some());
        if verdict != PASS {
            tally.rejected += 1;
            match reason {
                Some(r) => *tally.by_reason.entry(r).or_default() += 1,
                None => failures.push(describe(seed, &case, verdict, world)),
            }
        }
    }
    let elapsed = started.elapsed();
    eprintln!("gate properties: {tally:#?} in {elapsed:.1?}");
    assert!(
        failures.is_empty(),
        "the gate rejected {} segment(s) the reference does not allow (base seed {base:#x}); \
         add the seeds to REGRESSIONS:\n{}",
        failures.len(),
        failures
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The kernel's own counters saw every rejection.
    let counted: u64 = worlds
        .iter()
        .map(|w| {
            let c = w.gate.counters().expect("counters");
            c.rejected_l7 + c.rejected_l4 + c.rejected_blocked
        })
        .sum();
    assert_eq!(counted, tally.rejected, "kernel counters");
    // Not a vacuous pass: the gate does reject, for every reason, a good part of what the
    // reference allows (it passes what it cannot read for sure: cut, beyond its window).
    assert!(tally.cases >= cases, "{tally:?}");
    assert_eq!(tally.by_reason.len(), 3, "every reason is seen: {tally:#?}");
    assert!(
        tally.rejected * 4 >= tally.allowed,
        "the gate rejects at least a quarter of what it may: {tally:#?}"
    );
}

/// The reference itself, on hand-written segments: it must be obviously right.
#[test]
fn the_reference_reads_keys_as_a_server_does() {
    fn r(p: &'static str) -> Option<Key<'static>> {
        read(p.as_bytes(), "x-api-key", "").map(|r| r.key)
    }
    fn b(p: &'static str) -> Option<Key<'static>> {
        read(p.as_bytes(), "authorization", "bearer ").map(|r| r.key)
    }
    let exact = |k: &'static str| Some(Key::Exact(k.as_bytes()));
    assert_eq!(r("GET / HTTP/1.1\r\nX-Api-Key: k\r\n\r\n"), exact("k"));
    assert_eq!(r("GET / HTTP/1.1\nx-api-key:\t k \t\n\n"), exact("k"));
    assert_eq!(
        r("GET / HTTP/1.1\r\nx-api-key: a\r\nx-api-key: b\r\n\r\n"),
        exact("a"),
        "the first key header"
    );
    assert_eq!(
        r("GET / HTTP/1.1\r\nx-api-key-old: a\r\n\r\n"),
        Some(Key::Absent)
    );
    assert_eq!(
        r("GET / HTTP/1.1\r\nx-api-key : a\r\n\r\n"),
        Some(Key::Absent)
    );
    assert_eq!(
        r("GET / HTTP/1.1\r\n\r\nx-api-key: a\r\n"),
        Some(Key::Absent)
    );
    assert_eq!(
        r("GET / HTTP/1.1\r\nx-api-key: \r\nA: b\r\n"),
        Some(Key::Absent)
    );
    assert_eq!(r("GET / HTTP/1.1\r\nx-api-key: a\r\n"), Some(Key::Unknown));
    assert_eq!(
        r("GET / HTTP/1.1\r\nx-api-key: a\r\n b\r\n"),
        Some(Key::Unknown)
    );
    assert_eq!(
        r("GET / HTTP/1.1\r\nx-api-key: a\rb\r\n\r\n"),
        Some(Key::Unknown)
    );
    assert_eq!(r("GET / HTTP/1.1\r\nx-api-ke"), Some(Key::Unknown));
    assert_eq!(
        r("GET / HTTP/1.1\r\n\rx-api-key: a\r\n\r\n"),
        Some(Key::Absent),
        "a line starting with a bare CR is no key header"
    );
    assert_eq!(r("get / HTTP/1.1\r\nx-api-key: a\r\n\r\n"), None);
    assert_eq!(r("GET  / HTTP/1.1\r\nx-api-key: a\r\n\r\n"), None);
    assert_eq!(r("x-api-key: a\r\n\r\n"), None, "a continuation");
    assert_eq!(
        b("GET / HTTP/1.1\r\nAuthorization: Bearer t\r\n\r\n"),
        exact("t")
    );
    assert_eq!(
        b("GET / HTTP/1.1\r\nauthorization: bEARER t\r\n\r\n"),
        exact("t")
    );
    assert_eq!(
        b("GET / HTTP/1.1\r\nAuthorization: Basic dA==\r\n"),
        Some(Key::Absent)
    );
    assert_eq!(b("GET / HTTP/1.1\r\nAuthorization: Bas"), Some(Key::Absent));
    assert_eq!(
        b("GET / HTTP/1.1\r\nAuthorization: Bear"),
        Some(Key::Unknown)
    );
    assert_eq!(
        b("GET / HTTP/1.1\r\nAuthorization: Bearer \r\n\r\n"),
        Some(Key::Absent)
    );
}
