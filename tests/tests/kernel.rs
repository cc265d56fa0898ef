//! The kernel gate: the real eBPF object, verified by the kernel, run on synthetic packets with
//! BPF_PROG_TEST_RUN, and attached in network namespaces this test creates. Needs root; run
//! through `cargo xtask test` (one test at a time: they share kernel state).
use aya::programs::TestRun as _;
use aya::programs::TestRunOptions;
use enforcer::kernel::Gate;
use enforcer_tests::netns::{A_ADDR, Link};
use enforcer_tests::{PinDir, enforcer_bin};
use std::io::{Read as _, Write as _};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// TC_ACT_PIPE: hand the packet on (the gate's "pass").
const TC_ACT_PIPE: u32 = 3;

/// An Ethernet + IPv4 + TCP SYN to port 8080.
fn tcp_syn() -> Vec<u8> {
    let mut p = vec![0u8; 14 + 20 + 20];
    p[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    p[14] = 0x45;
    p[16..18].copy_from_slice(&40u16.to_be_bytes());
    p[22] = 64;
    p[23] = 6;
    p[26..30].copy_from_slice(&[10, 0, 0, 2]);
    p[30..34].copy_from_slice(&[10, 0, 0, 1]);
    p[34..36].copy_from_slice(&40000u16.to_be_bytes());
    p[36..38].copy_from_slice(&8080u16.to_be_bytes());
    p[46] = 0x50;
    p[47] = 0x02;
    p
}

#[test]
fn the_gate_loads_verifies_and_passes_packets() {
    let mut gate = Gate::load(None).expect("the kernel verifies and loads the gate");
    let before = gate.counters().expect("counters").passed;
    let packet = tcp_syn();
    let mut arp = [0u8; 42];
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let prog = gate.program().expect("program");
    // (The kernel itself refuses to test-run an IPv4 frame truncated inside the IP header.)
    for data in [&packet[..], &arp[..], &[0u8; 14][..]] {
        let mut out = vec![0u8; 256];
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(data),
                data_out: Some(&mut out),
                repeat: 1,
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("test_run on {} bytes: {e:?}", data.len()));
        assert_eq!(result.return_value, TC_ACT_PIPE, "everything passes");
    }
    let after = gate.counters().expect("counters").passed;
    assert_eq!(after - before, 3, "each run was counted");
}

/// A map pinned by a build with another layout (here: a `CONFIG` whose value is 8 bytes) is
/// replaced, not adopted: adopting it would make the verifier refuse the program.
#[test]
fn pins_of_another_layout_are_replaced() {
    let dir = PinDir::new();
    std::fs::create_dir_all(dir.path()).expect("pin dir");
    let config = format!("{}/{}", dir.path(), enforcer_common::names::CONFIG_MAP);
    let made = std::process::Command::new("bpftool")
        .args(["map", "create", &config, "type", "array"])
        .args(["key", "4", "value", "8", "entries", "1", "name", "CONFIG"])
        .status()
        .expect("bpftool");
    assert!(made.success(), "bpftool map create");
    let gate =
        Gate::load(Some(std::path::Path::new(&dir.path()))).expect("loads despite the old pin");
    drop(gate);
    let info = aya::maps::MapData::from_pin(&config)
        .expect("pinned again")
        .info()
        .expect("info");
    assert_eq!(
        info.value_size() as usize,
        std::mem::size_of::<enforcer_common::GateConfig>()
    );
}

#[test]
fn the_gate_attaches_in_a_namespace_and_sees_real_traffic() {
    let link = Link::new("att");
    let iface = link.a_if.clone();
    let ns_b = link.b.path();
    let (passed, pinged) = link.a.run(move || {
        let gate =
            Gate::attach(std::slice::from_ref(&iface), None).expect("attach to veth ingress");
        assert_eq!(gate.interfaces(), std::slice::from_ref(&iface));
        let before = gate.counters().expect("counters").passed;
        let pinged = ping_from(&ns_b);
        let after = gate.counters().expect("counters").passed;
        (after - before, pinged)
    });
    assert!(pinged, "traffic passes through the attached gate");
    assert!(passed >= 3, "the gate saw the echo requests: {passed}");
}

/// Three pings from the namespace at `ns_path` to the gate's side; true when answered.
fn ping_from(ns_path: &str) -> bool {
    std::process::Command::new("nsenter")
        .arg(format!("--net={ns_path}"))
        .args(["ping", "-c", "3", "-i", "0.2", "-W", "1", A_ADDR])
        .output()
        .expect("ping")
        .status
        .success()
}

/// Polls `/readyz` until the daemon answers; returns the raw response.
fn wait_ready(addr: &str) -> String {
    let start = Instant::now();
    loop {
        if let Some(r) = get(addr, "/readyz") {
            return r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "daemon did not come up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// The daemon's process, killed on drop.
use enforcer_tests::Process as Daemon;

/// A blocking HTTP GET, from the current thread's namespace.
fn get(addr: &str, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[test]
fn the_daemon_attaches_the_gate_and_reports_it() {
    let link = Link::new("dmn");
    let pin = PinDir::new();
    let pin_dir = pin.path();
    let daemon = Daemon(
        link.a
            .command(enforcer_bin().to_str().expect("path"))
            .args(["run", "--listen", "127.0.0.1:18080", "--iface", &link.a_if])
            .args(["--protect-port", "8080", "--pin-dir", &pin_dir])
            .env("ENFORCER_REDIS_URL", "")
            .stderr(Stdio::null())
            .spawn()
            .expect("start the daemon in the namespace"),
    );
    let b_path = link.b.path();
    let (ready, metrics) = link.a.run(move || {
        let ready = wait_ready("127.0.0.1:18080");
        assert!(ping_from(&b_path), "traffic passes");
        // The daemon exports the kernel counters once a second.
        std::thread::sleep(Duration::from_millis(1500));
        (
            ready,
            get("127.0.0.1:18080", "/metrics").unwrap_or_default(),
        )
    });
    assert!(ready.contains("\"attached\":true"), "{ready}");
    assert!(metrics.contains("enforcer_kernel_attached 1"), "{metrics}");
    let passed: f64 = metrics
        .lines()
        .find(|l| l.starts_with("enforcer_kernel_passed_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    assert!(passed >= 3.0, "kernel counters reach /metrics: {passed}");
    drop(daemon);
}

#[test]
fn without_kernel_support_the_daemon_runs_userspace_only() {
    // An interface that does not exist: the gate cannot attach, the daemon still serves.
    let link = Link::new("nok");
    let pin = PinDir::new();
    let pin_dir = pin.path();
    let daemon = Daemon(
        link.a
            .command(enforcer_bin().to_str().expect("path"))
            .args([
                "run",
                "--listen",
                "127.0.0.1:18081",
                "--iface",
                "enf-missing0",
            ])
            .args(["--protect-port", "8080", "--pin-dir", &pin_dir])
            .env("ENFORCER_REDIS_URL", "")
            .stderr(Stdio::null())
            .spawn()
            .expect("start the daemon"),
    );
    let (ready, metrics) = link.a.run(|| {
        let ready = wait_ready("127.0.0.1:18081");
        (
            ready,
            get("127.0.0.1:18081", "/metrics").unwrap_or_default(),
        )
    });
    assert!(
        ready.contains("\"attached\":false") && ready.contains("userspace-only"),
        "{ready}"
    );
    assert!(
        ready.starts_with("HTTP/1.1 200"),
        "still ready: decisions work without the kernel"
    );
    assert!(metrics.contains("enforcer_kernel_attached 0"), "{metrics}");
    assert!(
        ready.contains("enf-missing0"),
        "the missing interface is named: {ready}"
    );
    drop(daemon);
    let left: Vec<String> = std::fs::read_dir(&pin_dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "an interface that does not exist creates no pins: {left:?}"
    );
}

/// `enforcer …` run in the current thread's network namespace; (exit code, stdout, stderr).
fn enforcer(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(enforcer_bin())
        .args(args)
        .output()
        .expect("run enforcer");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn unblocking_a_key_that_is_not_blocked_says_so() {
    let pin = PinDir::new();
    let dir = pin.path();
    let _gate = Gate::load(Some(std::path::Path::new(&dir))).expect("pinned gate");
    // No daemon answers on the socket: the CLI works on the pinned maps directly.
    let (code, out, err) = enforcer_tests::enforcer_cli(
        &[
            "keys",
            "unblock",
            "--pin-dir",
            &dir,
            "--socket",
            "/nonexistent/enforcer/admin.sock",
        ],
        Some("never-blocked\n"),
    );
    assert!(
        err.contains("no daemon"),
        "it says why it works on the maps: {err}"
    );
    assert_eq!(code, 0, "not an error: {out}{err}");
    assert!(out.contains("was not blocked"), "said in words: {out}");
    assert!(!err.contains("bpf_map_delete_elem"), "{err}");
}

#[test]
fn kernel_status_ends_quietly_on_a_closed_pipe() {
    let pin = PinDir::new();
    let dir = pin.path();
    let _gate = Gate::load(Some(std::path::Path::new(&dir))).expect("pinned gate");
    // `enforcer kernel status | head -0`: the reader is gone before the first line.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = std::process::Command::new(enforcer_bin())
        .args(["kernel", "status", "--pin-dir", &dir])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run enforcer");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "no panic: {err}");
    assert_eq!(out.status.code(), Some(0), "ends quietly: {err}");
    assert!(err.is_empty(), "nothing to say: {err}");
}

/// `kernel status` asks the kernel where the gate runs: a link a process holds after its pin
/// was removed is live and listed; a pinned link whose interface was deleted is stale, not
/// attached; `kernel detach` ends both.
#[test]
fn kernel_status_lists_live_links_and_stale_pins() {
    let link = Link::new("lst");
    let pin = PinDir::new();
    let dir = pin.path();
    let iface = link.a_if.clone();
    let b_path = link.b.path();
    let ns = link.a.name.clone();
    link.a.run(move || {
        let pin_dir = std::path::Path::new(&dir);
        // A first gate pins its link; a second one takes the pinned link over and holds it,
        // as a restarted daemon does.
        drop(Gate::attach(std::slice::from_ref(&iface), Some(pin_dir)).expect("attach"));
        let held = Gate::attach(std::slice::from_ref(&iface), Some(pin_dir)).expect("take over");
        std::fs::remove_file(pin_dir.join(format!("link-{iface}"))).expect("remove the pin");
        let before = held.counters().expect("counters").passed;
        assert!(ping_from(&b_path), "traffic passes");
        assert!(
            held.counters().expect("counters").passed > before,
            "the gate still runs without its pin"
        );

        // A second interface with a pinned link, then deleted (with its veth peer).
        let gone = format!("{iface}x");
        let ip = |args: &[&str]| {
            let ok = std::process::Command::new("ip")
                .args(args)
                .status()
                .expect("ip")
                .success();
            assert!(ok, "ip {args:?} in {ns}");
        };
        let peer = format!("{iface}y");
        ip(&["link", "add", &gone, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &gone, "up"]);
        drop(Gate::attach(std::slice::from_ref(&gone), Some(pin_dir)).expect("attach"));
        ip(&["link", "del", &gone]);

        let (code, status, err) = enforcer(&["kernel", "status", "--pin-dir", &dir]);
        assert_eq!(code, 0, "{err}");
        let attached: String = status
            .lines()
            .skip_while(|l| !l.starts_with("attached:"))
            .take_while(|l| l.starts_with("attached:") || l.starts_with(' '))
            .collect();
        assert!(
            attached.contains(&iface) && attached.contains("not pinned"),
            "the held link is live and listed: {status}"
        );
        assert!(
            !attached.contains(&gone),
            "a link whose interface is gone is not attached: {status}"
        );
        assert!(
            status
                .lines()
                .any(|l| l.starts_with("stale pins:") && l.contains(&gone)),
            "its pin is reported as stale: {status}"
        );

        let (code, out, err) = enforcer(&["kernel", "detach", "--pin-dir", &dir]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains(&format!("detached from {iface}")), "{out}");
        assert!(out.contains(&gone), "the stale pin is removed: {out}");
        let before = held.counters().expect("counters").passed;
        assert!(ping_from(&b_path), "traffic passes");
        assert_eq!(
            held.counters().expect("counters").passed,
            before,
            "the held link is detached: the gate sees nothing"
        );
        let (_, status, _) = enforcer(&["kernel", "status", "--pin-dir", &dir]);
        assert!(status.contains("attached:    nowhere"), "{status}");
        assert!(!status.contains("stale pins"), "{status}");
        drop(held);
    });
}

/// `kernel detach` and a daemon following the operator's marker race for the same pinned link
/// (the daemon's heartbeat sees the marker the CLI has just made): whichever unpins second finds
/// the link detached and the pin gone, and neither fails. A CI run caught the CLI failing here.
#[test]
fn kernel_detach_racing_the_daemons_own_detach_succeeds_for_both() {
    use enforcer::kernel::attachment;
    let link = Link::new("drc");
    let pin = PinDir::new();
    let dir = pin.path();
    let iface = link.a_if.clone();
    link.a.run(move || {
        let pin_dir = std::path::Path::new(&dir);
        let mut gate = Gate::attach(std::slice::from_ref(&iface), Some(pin_dir)).expect("attach");
        for round in 0..40 {
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
            let (cli_barrier, cli_dir) = (barrier.clone(), pin_dir.to_path_buf());
            // Threads start in the creating thread's network namespace.
            let cli = std::thread::spawn(move || {
                cli_barrier.wait();
                attachment::detach(&cli_dir, None)
            });
            barrier.wait();
            let daemon = gate.detach_from(&iface);
            let cli = cli.join().expect("cli thread");
            assert!(
                daemon.is_ok(),
                "round {round}: the daemon's detach: {daemon:?}"
            );
            assert!(cli.is_ok(), "round {round}: kernel detach: {cli:?}");
            assert!(
                attachment::pinned_interfaces(pin_dir)
                    .expect("list")
                    .is_empty(),
                "round {round}: the pin is removed"
            );
            let status = attachment::status(pin_dir).expect("status");
            assert!(status.live.is_empty(), "round {round}: {status:?}");
            attachment::attach(pin_dir, None).expect("remove the marker");
            gate.attach_to(&iface, Some(pin_dir)).expect("attach again");
        }
    });
}
