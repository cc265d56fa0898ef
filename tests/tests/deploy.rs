//! `deploy/`: the Kubernetes manifests, the Prometheus alerts and the Grafana dashboard, checked
//! with the real tools and against the real daemon.
//!
//! - every manifest the kustomization lists (and exactly those) validates against the
//!   Kubernetes API schemas with `kubernetes-validate --strict` (installed by `cargo xtask
//!   setup`); the PodMonitor, a CRD the validator has no schema for, is checked field by field;
//! - what the schemas cannot say: the DaemonSet's volumes, probes, secrets and capabilities
//!   fit the daemon, the ConfigMap is a config `enforcer config check` accepts, and the daemon
//!   run on it answers the probes;
//! - the DaemonSet's capability list is exactly what the kernel gate needs on this kernel: the
//!   daemon run with it keeps the gate attached, and with any one of them left out it does not;
//! - `promtool check rules` and `promtool test rules` pass, and a broken rule fails them;
//! - every metric the dashboard and the alerts query is one the daemon exports.
use enforcer_tests::netns::NetNs;
use enforcer_tests::{PinDir, Process, enforcer_bin, free_port, unique};
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Prometheus' own series for every scrape target (the daemon cannot export it).
const PROMETHEUS_METRICS: &[&str] = &["up"];

/// Kubernetes versions the manifests must validate against: the oldest the base supports
/// (sidecar-free, `policy/v1`, CAP_BPF in the runtime's list) and the newest bundled.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn kube_dir() -> PathBuf {
    root().join("deploy/kubernetes")
}

/// A tool of the venv `cargo xtask setup` makes (`xtask/src/setup.rs`, `TOOLS_VENV`).
fn venv_tool(name: &str) -> PathBuf {
    let tool = root().join("target/tools/venv/bin").join(name);
    assert!(
        tool.exists(),
        "{} is missing: run `cargo xtask setup` (it installs the pinned Python tools)",
        tool.display()
    );
    tool
}

/// Runs a command; its exit status, stdout and stderr.
fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every YAML document of a file, as JSON (PyYAML of the tools venv reads it).
fn yaml_docs(path: &Path) -> Vec<Value> {
    let (ok, out, err) = run(Command::new(venv_tool("python")).args([
        "-c",
        "import sys, json, yaml\n\
         json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None], sys.stdout)",
        &path.display().to_string(),
    ]));
    assert!(ok, "reading {}: {err}", path.display());
    serde_json::from_str(&out).expect("PyYAML's JSON")
}

fn yaml_doc(path: &Path) -> Value {
    let mut docs = yaml_docs(path);
    assert_eq!(docs.len(), 1, "{} holds one document", path.display());
    docs.remove(0)
}

/// The files `kustomization.yaml` lists under `resources`.
fn resources() -> Vec<String> {
    let k = yaml_doc(&kube_dir().join("kustomization.yaml"));
    k["resources"]
        .as_array()
        .expect("resources is a list")
        .iter()
        .map(|r| r.as_str().expect("a file name").to_owned())
        .collect()
}

/// The one manifest of `kind` among the resources.
fn manifest(kind: &str) -> Value {
    let found: Vec<Value> = resources()
        .iter()
        .flat_map(|f| yaml_docs(&kube_dir().join(f)))
        .filter(|d| d["kind"] == kind)
        .collect();
    assert_eq!(found.len(), 1, "one {kind} in the kustomization");
    found.into_iter().next().expect("one")
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

#[test]
fn the_kustomization_lists_exactly_the_manifests_of_its_directory() {
    let listed: BTreeSet<String> = resources().into_iter().collect();
    let present: BTreeSet<String> = std::fs::read_dir(kube_dir())
        .expect("deploy/kubernetes")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|f| f.ends_with(".yaml") || f.ends_with(".yml"))
        .filter(|f| f != "kustomization.yaml")
        .collect();
    assert_eq!(
        listed, present,
        "kustomization.yaml's resources and the YAML files beside it differ"
    );
    // Each kind the issue asks for is there once.
    for kind in [
        "Namespace",
        "ConfigMap",
        "DaemonSet",
        "PodDisruptionBudget",
        "PodMonitor",
        "Job",
    ] {
        manifest(kind);
    }
}

/// `kubernetes-validate --strict -k VERSION FILES…`: (exit ok, its report).
fn kubernetes_validate(version: &str, files: &[PathBuf]) -> (bool, String) {
    let (ok, out, err) = run(Command::new(venv_tool("kubernetes-validate"))
        .args(["--strict", "-k", version])
        .args(files));
    (ok, format!("{out}{err}"))
}

#[test]
fn every_manifest_validates_against_the_kubernetes_schemas() {
    let files: Vec<PathBuf> = resources().iter().map(|f| kube_dir().join(f)).collect();
    for version in KUBERNETES_VERSIONS {
        let (ok, report) = kubernetes_validate(version, &files);
        assert!(ok, "kubernetes-validate {version}:\n{report}");
        for file in &files {
            for doc in yaml_docs(file) {
                let kind = doc["kind"].as_str().expect("kind");
                let name = doc["metadata"]["name"].as_str().expect("metadata.name");
                if kind == "PodMonitor" {
                    // A CRD: no schema bundled (checked in its own test below). The validator
                    // must say so rather than pass it silently.
                    assert!(
                        report.contains("Couldn't find schema for kind PodMonitor"),
                        "{report}"
                    );
                    continue;
                }
                let passed = format!("passed for resource {}/{name}", kind.to_lowercase());
                assert!(
                    report.contains(&passed),
                    "{kind}/{name} not validated against {version}:\n{report}"
                );
            }
        }
        // Any other warning (an unknown kind or apiVersion) is a failure.
        for line in report.lines().filter(|l| l.starts_with("WARN")) {
            assert!(
                line.contains("kind PodMonitor"),
                "unexpected warning: {line}"
            );
        }
    }

    // The validator is not a rubber stamp: a misspelt field and a wrong type are refused.
    let dir = tempfile::tempdir().expect("tmp");
    let daemonset = std::fs::read_to_string(kube_dir().join("daemonset.yaml")).expect("read");
    for (from, to) in [
        ("hostNetwork: true", "hostNetwrok: true"),
        ("periodSeconds: 5", "periodSeconds: five"),
    ] {
        assert!(daemonset.contains(from), "daemonset.yaml has {from:?}");
        let broken = dir.path().join("broken.yaml");
        std::fs::write(&broken, daemonset.replacen(from, to, 1)).expect("write");
        let (ok, report) = kubernetes_validate("1.37.0", &[broken]);
        assert!(!ok, "a DaemonSet with {to:?} passed:\n{report}");
    }
}

/// The fields of a PodMonitor's `spec` in prometheus-operator's CRD (monitoring.coreos.com/v1),
/// and of one of its `podMetricsEndpoints`, that this base may use.
const PODMONITOR_SPEC: &[&str] = &[
    "selector",
    "namespaceSelector",
    "podMetricsEndpoints",
    "jobLabel",
    "podTargetLabels",
    "sampleLimit",
    "targetLimit",
    "labelLimit",
    "attachMetadata",
];
const POD_METRICS_ENDPOINT: &[&str] = &[
    "port",
    "portNumber",
    "path",
    "scheme",
    "interval",
    "scrapeTimeout",
    "honorLabels",
    "honorTimestamps",
    "relabelings",
    "metricRelabelings",
    "params",
];

#[test]
fn the_podmonitor_names_the_daemons_pods_and_metrics_port() {
    // kubernetes-validate has no schema for a CRD and none can be fetched here, so this checks
    // what prometheus-operator requires and what must agree with the DaemonSet, by hand.
    let pm = manifest("PodMonitor");
    assert_eq!(pm["apiVersion"], "monitoring.coreos.com/v1");
    assert!(pm["metadata"]["name"].is_string());
    let spec = pm["spec"].as_object().expect("spec");
    for key in spec.keys() {
        assert!(
            PODMONITOR_SPEC.contains(&key.as_str()),
            "unknown spec.{key}"
        );
    }
    let ds = manifest("DaemonSet");
    let pod_labels = ds["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .expect("pod labels");
    let selector = spec["selector"]["matchLabels"]
        .as_object()
        .expect("spec.selector.matchLabels (required)");
    assert!(!selector.is_empty());
    for (k, v) in selector {
        assert_eq!(pod_labels.get(k), Some(v), "the PodMonitor selects {k}={v}");
    }
    let ports: Vec<String> = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect();
    let endpoints = spec["podMetricsEndpoints"]
        .as_array()
        .expect("spec.podMetricsEndpoints (required)");
    assert!(!endpoints.is_empty());
    for e in endpoints {
        for key in e.as_object().expect("endpoint").keys() {
            assert!(
                POD_METRICS_ENDPOINT.contains(&key.as_str()),
                "unknown podMetricsEndpoints[].{key}"
            );
        }
        let port = e["port"].as_str().expect("port");
        assert!(
            ports.iter().any(|p| p == port),
            "port {port} is a DaemonSet port"
        );
        assert_eq!(e["path"], "/metrics");
        for r in e["relabelings"].as_array().into_iter().flatten() {
            assert!(
                r["sourceLabels"].is_array() && r["targetLabel"].is_string(),
                "{r}"
            );
        }
    }
}

/// The daemon container of the DaemonSet, and its pod spec.
fn daemon() -> (Value, Value) {
    let ds = manifest("DaemonSet");
    let pod = ds["spec"]["template"]["spec"].clone();
    let container = pod["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| strs(&c["args"]).first() == Some(&"run"))
        .expect("a container running `enforcer run`")
        .clone();
    (pod, container)
}

/// The capabilities the daemon container adds.
fn daemon_capabilities() -> Vec<String> {
    let (_, c) = daemon();
    assert_eq!(
        strs(&c["securityContext"]["capabilities"]["drop"]),
        ["ALL"],
        "every other capability is dropped"
    );
    strs(&c["securityContext"]["capabilities"]["add"])
        .into_iter()
        .map(str::to_owned)
        .collect()
}

fn env_secret(container: &Value, name: &str) -> Option<(String, String)> {
    container["env"].as_array()?.iter().find_map(|e| {
        (e["name"] == name).then(|| {
            let r = &e["valueFrom"]["secretKeyRef"];
            (
                r["name"].as_str().unwrap_or_default().to_owned(),
                r["key"].as_str().unwrap_or_default().to_owned(),
            )
        })
    })
}

#[test]
fn the_daemonset_gives_the_daemon_what_it_needs() {
    let (pod, c) = daemon();
    assert_eq!(
        pod["hostNetwork"], true,
        "the gate judges the node's interfaces"
    );
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(
        c["image"], "enforcer",
        "the image kustomize's `images` names"
    );
    assert!(
        !c["securityContext"]["privileged"]
            .as_bool()
            .unwrap_or(false)
    );
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    for cap in ["BPF", "NET_ADMIN", "PERFMON"] {
        assert!(daemon_capabilities().iter().any(|c| c == cap), "{cap}");
    }

    // Volumes: bpffs from the host, the admin socket's directory, the ledger on the node.
    let volumes = pod["volumes"].as_array().expect("volumes");
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("volume {name}"))
            .clone()
    };
    let mount = |container: &Value, path: &str| {
        container["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["mountPath"] == path)
            .cloned()
    };
    let bpffs = mount(&c, "/sys/fs/bpf").expect("/sys/fs/bpf mounted");
    assert_eq!(
        volume(bpffs["name"].as_str().expect("name"))["hostPath"]["path"],
        "/sys/fs/bpf"
    );
    let admin = mount(&c, "/run/enforcer").expect("/run/enforcer mounted (admin socket)");
    assert!(volume(admin["name"].as_str().expect("name")).is_object());
    let config = mount(&c, "/etc/enforcer").expect("/etc/enforcer mounted");
    let config_map = volume(config["name"].as_str().expect("name"))["configMap"]["name"].clone();
    assert_eq!(manifest("ConfigMap")["metadata"]["name"], config_map);
    assert_eq!(
        strs(&c["args"]),
        ["run", "--config", "/etc/enforcer/enforcer.toml"]
    );

    // The API server allows Bidirectional propagation only to privileged containers (a rule
    // no schema carries); a bpffs mount must reach the node from one of them.
    let all: Vec<Value> = ["initContainers", "containers"]
        .iter()
        .flat_map(|k| pod[*k].as_array().cloned().unwrap_or_default())
        .collect();
    let mut bidirectional = 0;
    for container in &all {
        for m in container["volumeMounts"].as_array().into_iter().flatten() {
            match m["mountPropagation"].as_str() {
                Some("Bidirectional") => {
                    bidirectional += 1;
                    assert_eq!(
                        container["securityContext"]["privileged"], true,
                        "{} mounts {} Bidirectional unprivileged",
                        container["name"], m["mountPath"]
                    );
                }
                None | Some("None" | "HostToContainer") => {}
                Some(other) => panic!("mountPropagation {other} does not exist"),
            }
        }
    }
    assert_eq!(bidirectional, 1, "one container mounts bpffs on the node");

    // Secrets, not config: the URLs come from the Secret.
    for var in ["ENFORCER_REDIS_URL", "ENFORCER_DATABASE_URL"] {
        let (name, key) = env_secret(&c, var).unwrap_or_else(|| panic!("{var} from a Secret"));
        assert_eq!(name, "enforcer-store", "{var}");
        assert!(!key.is_empty());
    }

    // Probes on the daemon's own paths and a port the container declares.
    let ports: Vec<&str> = c["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for (probe, path) in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert!(
            ports.contains(&get["port"].as_str().expect("named port")),
            "{probe}"
        );
    }
    assert!(c["resources"]["requests"]["cpu"].is_string());
    assert!(c["resources"]["limits"]["memory"].is_string());

    // The PDB covers the DaemonSet's pods; the Job runs `enforcer migrate` on the Secret's URL.
    let pdb = manifest("PodDisruptionBudget");
    let labels = manifest("DaemonSet")["spec"]["template"]["metadata"]["labels"].clone();
    for (k, v) in pdb["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("selector")
    {
        assert_eq!(&labels[k], v);
    }
    let job = manifest("Job");
    let migrate = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(strs(&migrate["args"]), ["migrate"]);
    assert_eq!(
        env_secret(migrate, "ENFORCER_DATABASE_URL").map(|s| s.0),
        Some("enforcer-store".to_owned())
    );
}

/// The config the ConfigMap carries, in a file.
fn deployed_config(dir: &Path) -> PathBuf {
    let cm = manifest("ConfigMap");
    let toml = cm["data"]["enforcer.toml"]
        .as_str()
        .expect("data.enforcer.toml");
    let path = dir.join("enforcer.toml");
    std::fs::write(&path, toml).expect("write config");
    path
}

#[test]
fn the_configmap_holds_a_valid_config_that_fits_the_daemonset() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = deployed_config(dir.path());
    let (ok, out, err) = run(Command::new(enforcer_bin())
        .args(["config", "check"])
        .arg(&path));
    assert!(ok, "enforcer config check: {out}{err}");
    let config = enforcer::config::Config::load(&path).expect("loads");
    let (_, c) = daemon();
    let port = c["ports"][0]["containerPort"].as_u64().expect("port");
    assert_eq!(u64::from(config.server.listen.port()), port);
    assert!(
        config.server.listen.ip().is_unspecified(),
        "reachable from the kubelet's probes and Prometheus"
    );
    assert!(config.store.redis_url.is_empty(), "the URL is a secret");
    assert!(config.ledger.database_url.is_empty(), "the URL is a secret");
    assert!(config.ledger.file.starts_with("/var/lib/enforcer/"));
    assert!(!config.kernel.interfaces.is_empty());
}

/// One HTTP/1.1 GET on loopback: (status, body).
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: enforcer\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, text.split_once("\r\n\r\n")?.1.to_owned()))
}

fn post(port: u16, path: &str, body: &str) -> Option<u16> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nhost: enforcer\r\nconnection: close\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}

/// The daemon binary run as the DaemonSet runs it, on a local port (`--listen`), with the
/// embedded store (no Secret here) and a private ledger file.
fn spawn_daemon(cmd: &mut Command, config: &Path, port: u16, ledger: &Path) -> Process {
    let child = cmd
        .arg(enforcer_bin())
        .arg("run")
        .arg("--config")
        .arg(config)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--grpc-listen",
            "",
        ])
        .arg("--ledger-file")
        .arg(ledger)
        .env_remove("ENFORCER_REDIS_URL")
        .env_remove("ENFORCER_REDIS_CLUSTER")
        .env_remove("ENFORCER_DATABASE_URL")
        .env_remove("ENFORCER_GRPC_LISTEN")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the daemon");
    Process(child)
}

fn wait_healthy(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(port, "/healthz").is_none_or(|(s, _)| s != 200) {
        assert!(
            Instant::now() < deadline,
            "the daemon never answered /healthz"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_daemon_on_the_deployed_config_answers_the_probes_and_counts_tokens() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = deployed_config(dir.path());
    // The kernel gate off: this test is about the HTTP side (the next one is about the gate).
    let text = std::fs::read_to_string(&path).expect("read");
    let off = text.replacen("interfaces = [\"eth0\"]", "interfaces = []", 1);
    assert_ne!(
        off, text,
        "the deployed config names its interfaces as expected"
    );
    std::fs::write(&path, off).expect("write");
    let port = free_port();
    let _daemon = spawn_daemon(
        &mut Command::new("env"),
        &path,
        port,
        &dir.path().join("ledger.jsonl"),
    );
    wait_healthy(port);
    let (_, c) = daemon();
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        let path = c[probe]["httpGet"]["path"].as_str().expect("path");
        let (status, body) = get(port, path).expect("answer");
        assert_eq!(status, 200, "{probe} {path}: {body}");
    }
    // A charged decision shows in enforcer_tokens_charged_total (the "tokens spent" panel);
    // a denied one does not.
    let key = unique("deploy");
    let check = |endpoint: &str| {
        post(
            port,
            "/v1/check",
            &format!(r#"{{"key":"{key}","endpoint":"{endpoint}","method":"POST"}}"#),
        )
        .expect("answer")
    };
    assert_eq!(check("/generate-report"), 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, metrics) = get(port, "/metrics").expect("metrics");
        let charged =
            enforcer_tests::parse_metric(&metrics, "enforcer_tokens_charged_total{tier=\"free\"}");
        if charged == 120.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tokens charged: {charged}\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `enforcer_kernel_attached` of a daemon serving on `port` inside `ns`.
fn attached_in(ns: &NetNs, port: u16) -> Option<f64> {
    ns.run(move || {
        let (_, text) = get(port, "/metrics")?;
        text.lines()
            .find_map(|l| l.strip_prefix("enforcer_kernel_attached "))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// Runs the daemon inside `ns` with only `caps` (as uid 0, like the DaemonSet: the bounding
/// set is what a container with `drop: [ALL]` and `add: caps` gets), the gate on `iface`, and
/// returns whether the gate is still attached after many heartbeats.
fn gate_stays_attached(ns: &NetNs, iface: &str, caps: &[String]) -> bool {
    let dir = tempfile::tempdir().expect("tmp");
    let pins = PinDir::new();
    let config = dir.path().join("enforcer.toml");
    // max_staleness 300 ms: a heartbeat (which checks the link) every 100 ms.
    std::fs::write(
        &config,
        format!(
            "[kernel]\ninterfaces = [\"{iface}\"]\nprotect_ports = [80]\n\
             max_staleness_ms = 300\npin_dir = \"{}\"\n",
            pins.path()
        ),
    )
    .expect("config");
    let set = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{}", c.to_lowercase())))
        .collect::<Vec<_>>()
        .join(",");
    let port = free_port();
    let mut cmd = ns.command("setpriv");
    cmd.args([
        &format!("--bounding-set={set}"),
        &format!("--inh-caps={set}"),
        "--",
    ]);
    let _daemon = spawn_daemon(&mut cmd, &config, port, &dir.path().join("ledger.jsonl"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while ns.run(move || get(port, "/healthz")).is_none() {
        assert!(
            Instant::now() < deadline,
            "the daemon with {set} never answered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Twenty heartbeats' worth: a daemon that loses its gate does so at its first one.
    let mut last = None;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        last = attached_in(ns, port);
        if last != Some(1.0) {
            return false;
        }
    }
    last == Some(1.0)
}

#[test]
fn the_daemonsets_capabilities_are_exactly_what_the_kernel_gate_needs() {
    assert!(
        Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0\n")),
        "loading the gate needs root: run the integration tests as `cargo xtask test` does"
    );
    let ns = NetNs::new(&format!("enf-caps-{}", std::process::id() % 10_000));
    let iface = "vecaps0";
    let out = ns
        .command("ip")
        .args([
            "link", "add", iface, "type", "veth", "peer", "name", "vecaps1",
        ])
        .output()
        .expect("ip");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ns.exec(&["ip", "link", "set", iface, "up"]);
    ns.exec(&["ip", "link", "set", "vecaps1", "up"]);

    let caps = daemon_capabilities();
    assert!(
        gate_stays_attached(&ns, iface, &caps),
        "with {caps:?} the daemon does not keep its gate"
    );
    for left_out in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != left_out).cloned().collect();
        assert!(
            !gate_stays_attached(&ns, iface, &fewer),
            "{left_out} is not needed: the gate stays attached with {fewer:?}"
        );
    }
}

#[test]
fn promtool_checks_and_unit_tests_the_alert_rules() {
    let dir = root().join("deploy/prometheus");
    // The alerts, and the seed's named series (recording rules), each unit-tested against
    // hand-made answers.
    for (verb, file) in [
        ("check", "alerts.yml"),
        ("test", "alerts_test.yml"),
        ("check", "recording.yml"),
        ("test", "recording_test.yml"),
    ] {
        let (ok, out, err) = run(Command::new("promtool")
            .args([verb, "rules", file])
            .current_dir(&dir));
        assert!(ok, "promtool {verb} rules {file}: {out}{err}");
    }

    // Every alert has a test case where it fires and one where it is expected silent.
    let rules = yaml_doc(&dir.join("alerts.yml"));
    let tests = yaml_doc(&dir.join("alerts_test.yml"));
    let cases: Vec<&Value> = tests["tests"]
        .as_array()
        .expect("tests")
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().into_iter().flatten())
        .collect();
    for alert in alert_names(&rules) {
        let of = |empty: bool| {
            cases.iter().any(|c| {
                c["alertname"] == alert.as_str()
                    && c["exp_alerts"]
                        .as_array()
                        .is_some_and(|a| a.is_empty() == empty)
            })
        };
        assert!(of(false), "{alert} has no case where it fires");
        assert!(
            of(true) || fires_only_for_some_series(&tests, &alert),
            "{alert} has no case where it stays silent"
        );
    }

    // A broken threshold fails the unit tests: they test something.
    let broken = tempfile::tempdir().expect("tmp");
    let text = std::fs::read_to_string(dir.join("alerts.yml")).expect("read");
    let loose = text.replacen(
        "enforcer_store_breakers_open > 0",
        "enforcer_store_breakers_open >= 0",
        1,
    );
    assert_ne!(loose, text);
    std::fs::write(broken.path().join("alerts.yml"), loose).expect("write");
    std::fs::copy(
        dir.join("alerts_test.yml"),
        broken.path().join("alerts_test.yml"),
    )
    .expect("copy");
    let (ok, _, _) = run(Command::new("promtool")
        .args(["test", "rules", "alerts_test.yml"])
        .current_dir(broken.path()));
    assert!(
        !ok,
        "the unit tests pass a breaker alert that fires on a closed breaker"
    );
}

/// A firing case whose input also holds series the alert must not fire for (the expected
/// alerts list fewer instances than the input has) is a silent case too.
fn fires_only_for_some_series(tests: &Value, alert: &str) -> bool {
    tests["tests"].as_array().into_iter().flatten().any(|t| {
        let instances: BTreeSet<String> = t["input_series"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| {
                let s = s["series"].as_str()?;
                let at = s.find("instance=\"")? + 10;
                Some(s[at..].split('"').next()?.to_owned())
            })
            .collect();
        t["alert_rule_test"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| {
                c["alertname"] == alert
                    && c["exp_alerts"].as_array().is_some_and(|a| {
                        !a.is_empty()
                            && a.iter()
                                .filter_map(|e| e["exp_labels"]["instance"].as_str())
                                .collect::<BTreeSet<_>>()
                                .len()
                                < instances.len()
                    })
            })
    })
}

/// The PromQL of every rule of a rule file.
fn rule_exprs(rules: &Value) -> Vec<String> {
    rules["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| r["expr"].as_str().map(str::to_owned))
        .collect()
}

fn alert_names(rules: &Value) -> Vec<String> {
    rules["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| r["alert"].as_str().map(str::to_owned))
        .collect()
}

/// PromQL words that are not metric names: operators, modifiers, and the aggregations (which
/// may stand before `by (…)` rather than before their parenthesis).
const PROMQL_KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "inf",
    "nan",
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
];
/// Clauses whose parenthesised list holds label names.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric names a PromQL expression selects (Grafana's `$variables` are taken out first).
fn metric_names(expr: &str) -> Vec<String> {
    let mut text = String::new();
    // Strings and label matchers hold no metric names.
    let (mut quote, mut braces) = (None, 0u32);
    for ch in expr.chars() {
        match (quote, ch) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'' | '`') => quote = Some(ch),
            (None, '{') => braces += 1,
            (None, '}') => braces = braces.saturating_sub(1),
            (None, '[') if braces == 0 => braces += 1000,
            (None, ']') if braces >= 1000 => braces -= 1000,
            (None, c) if braces == 0 => text.push(c),
            _ => {}
        }
    }
    let tokens: Vec<(String, char)> = {
        let mut out = Vec::new();
        let chars: Vec<char> = text.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '$' || c == '.' {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric()
                        || matches!(chars[i], '_' | ':' | '$' | '.'))
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let next = chars[i..]
                    .iter()
                    .copied()
                    .find(|c| !c.is_whitespace())
                    .unwrap_or(' ');
                out.push((word, next));
            } else {
                out.push((c.to_string(), ' '));
                i += 1;
            }
        }
        out
    };
    let mut names = Vec::new();
    let mut skip_list = false;
    let mut depth_in_list = 0;
    for (word, next) in &tokens {
        if skip_list {
            match word.as_str() {
                "(" => depth_in_list += 1,
                ")" => {
                    depth_in_list -= 1;
                    if depth_in_list == 0 {
                        skip_list = false;
                    }
                }
                _ => {}
            }
            continue;
        }
        let first = word.chars().next().unwrap_or(' ');
        if !(first.is_ascii_alphabetic() || first == '_' || first == ':') {
            continue; // numbers, durations, operators, `$variables`
        }
        let lower = word.to_lowercase();
        if LABEL_LISTS.contains(&lower.as_str()) && *next == '(' {
            skip_list = true;
            continue;
        }
        if PROMQL_KEYWORDS.contains(&lower.as_str()) || *next == '(' {
            continue; // a keyword or a function
        }
        names.push(word.clone());
    }
    names
}

/// Every PromQL string of the dashboard: panel targets and template variable queries.
fn dashboard_queries(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, x) in map {
                match (k.as_str(), x) {
                    ("expr", Value::String(s)) => out.push(s.clone()),
                    // label_values(METRIC_SELECTOR, label): the selector is PromQL.
                    ("query" | "definition", Value::String(s))
                        if s.starts_with("label_values(") =>
                    {
                        let inner = &s["label_values(".len()..s.rfind(',').unwrap_or(s.len())];
                        out.push(inner.to_owned());
                    }
                    _ => dashboard_queries(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| dashboard_queries(x, out)),
        _ => {}
    }
}

#[test]
fn the_metric_name_check_finds_names_and_only_names() {
    assert_eq!(
        metric_names(
            r#"sum by (tier, le) (rate(enforcer_x_total{outcome="denied",node=~"$node"}[$__rate_interval])) / on (instance) group_left (node) max without (a) (up offset 5m) > 0.5 and bool enforcer_y"#
        ),
        ["enforcer_x_total", "up", "enforcer_y"]
    );
    assert_eq!(
        metric_names("histogram_quantile(0.99, sum by (le) (rate(a_bucket[5m])))"),
        ["a_bucket"]
    );
}

#[test]
fn the_dashboard_and_the_alerts_query_only_metrics_the_daemon_exports() {
    let exported = enforcer::metrics::Metrics::new().exported_names();
    let known = |name: &str| exported.contains(name) || PROMETHEUS_METRICS.contains(&name);
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana/enforcer.json")).expect("read"),
    )
    .expect("the dashboard is JSON");
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    let rules = yaml_doc(&root().join("deploy/prometheus/alerts.yml"));
    let alert_exprs = rule_exprs(&rules);
    assert!(queries.len() >= 20, "{} dashboard queries", queries.len());
    assert_eq!(alert_exprs.len(), alert_names(&rules).len());
    let recording_exprs = rule_exprs(&yaml_doc(&root().join("deploy/prometheus/recording.yml")));
    assert_eq!(recording_exprs.len(), 4, "the seed's four named series");
    for (source, exprs) in [
        ("dashboard", &queries),
        ("alerts.yml", &alert_exprs),
        ("recording.yml", &recording_exprs),
    ] {
        for expr in exprs.iter() {
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{source}: no metric in {expr}");
            for name in names {
                assert!(
                    known(&name),
                    "{source}: {name} is not exported by the daemon ({expr})"
                );
            }
        }
    }
    // A name the daemon does not export is caught.
    assert!(
        !known("enforcer_decisions"),
        "the bare name of a counter is not a series"
    );

    // The panels the issue asks for, each with a query; ids unique; one datasource variable.
    let panels = dashboard["panels"].as_array().expect("panels");
    for title in [
        "Decisions by outcome, tier and mode",
        "Tokens spent per second",
        "429 ratio",
        "Store latency p50 / p99",
        "Breaker state",
        "Kernel rejections",
        "Kernel staleness",
        "Ledger rows/s",
        "Ledger backlog",
        "Spilled and quarantined",
        "Price multipliers",
    ] {
        let panel = panels
            .iter()
            .find(|p| p["title"] == title)
            .unwrap_or_else(|| panic!("no panel {title:?}"));
        assert!(
            !panel["targets"].as_array().expect("targets").is_empty(),
            "{title}"
        );
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
    }
    let ids: BTreeSet<u64> = panels.iter().filter_map(|p| p["id"].as_u64()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    // Denials and shadow mode's would-be denials are apart in the 429 panel.
    let ratio = panels
        .iter()
        .find(|p| p["title"] == "429 ratio")
        .expect("429 ratio");
    let exprs: Vec<&str> = ratio["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .filter_map(|t| t["expr"].as_str())
        .collect();
    assert!(exprs.iter().any(|e| e.contains("outcome=\"denied\"")));
    assert!(exprs.iter().any(|e| e.contains("outcome=\"would_deny\"")));

    // Every dashboard query parses: promtool checks them as recording rules (with Grafana's
    // variables replaced by what Grafana sends).
    let dir = tempfile::tempdir().expect("tmp");
    let rules: Vec<Value> = queries
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let q = q
                .replace("$__rate_interval", "1m")
                .replace("$__range", "1h")
                .replace("$node", ".*");
            serde_json::json!({"record": format!("dashboard:query_{i}"), "expr": q})
        })
        .collect();
    let file = dir.path().join("dashboard-rules.yml");
    std::fs::write(
        &file,
        serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]}).to_string(),
    )
    .expect("write");
    let (ok, out, err) = run(Command::new("promtool").args(["check", "rules"]).arg(&file));
    assert!(ok, "a dashboard query does not parse: {out}{err}");
}

#[test]
fn the_containerfile_builds_with_the_pinned_toolchains() {
    // No container engine runs here, so the image is not built (docs/operations.md says so);
    // what can drift is checked: the builder pins what `cargo xtask setup` pins.
    let text = std::fs::read_to_string(root().join("deploy/Containerfile")).expect("read");
    let arg = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("ARG {name}=")))
            .unwrap_or_else(|| panic!("ARG {name} in deploy/Containerfile"))
            .trim()
            .to_owned()
    };
    assert_eq!(arg("EBPF_TOOLCHAIN"), enforcer_common::EBPF_TOOLCHAIN);
    assert_eq!(
        arg("EBPF_LLVM_MAJOR"),
        enforcer_common::EBPF_LLVM_MAJOR.to_string()
    );
    let setup = std::fs::read_to_string(root().join("xtask/src/setup.rs")).expect("read");
    assert!(
        setup.contains(&format!(
            "BPF_LINKER_VERSION: &str = \"{}\"",
            arg("BPF_LINKER_VERSION")
        )),
        "bpf-linker's version differs from xtask/src/setup.rs"
    );
    assert_eq!(
        text.lines().filter(|l| l.starts_with("FROM ")).count(),
        2,
        "multi-stage"
    );
    assert!(
        text.contains("USER 10001"),
        "the runtime's default user is unprivileged"
    );
    // The Job runs as the image's user.
    let job = manifest("Job");
    assert_eq!(
        job["spec"]["template"]["spec"]["securityContext"]["runAsUser"],
        10001
    );
}
