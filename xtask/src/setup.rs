//! Installs what the build and the tests need, only when it is missing.
use anyhow::{Context as _, Result, bail};
use std::process::{Command, Stdio};

/// Debian packages: LLVM 22 for bpf-linker, bpftool and iproute2 for the kernel side,
/// Redis, PostgreSQL and Prometheus (its `promtool` checks `deploy/prometheus`) for the tests
/// and benchmarks, nginx (`nginx-light` has `auth_request`) and Caddy (`forward_auth`) for the
/// gateway tests (`tests/tests/gateways.rs`), Python's venv for the Python tools below, valgrind
/// for the benches that count instructions (`bench script`, `bench daemon`), perf for
/// `ENFORCER_BENCH_PERF=1 cargo xtask bench`.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "bpftool",
    "iproute2",
    "iputils-ping",
    "util-linux",
    "redis-server",
    "redis-tools",
    "postgresql",
    "prometheus",
    "nginx-light",
    "caddy",
    "python3-venv",
    "valgrind",
    "linux-perf",
];

/// Where the Python tools live, under the workspace root (`tests/tests/deploy.rs` finds them
/// there): a venv of their own, since Debian's python3 refuses `pip install` outside one.
pub const TOOLS_VENV: &str = "target/tools/venv";

/// The Python tools the tests run, each with its whole dependency tree pinned (installed with
/// `--no-deps`, so a new release of a dependency changes nothing): `kubernetes-validate`
/// validates `deploy/kubernetes` against the Kubernetes API schemas it bundles (offline), and
/// its PyYAML reads the manifests for the test's own checks.
const PIP_PACKAGES: &[&str] = &[
    "kubernetes-validate==1.37.0",
    "PyYAML==6.0.4",
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "referencing==0.37.0",
    "rpds-py==2026.9.1",
    "attrs==26.1.0",
    "importlib_resources==7.1.0",
    "packaging==26.4",
    "typing_extensions==4.16.0",
];

/// What Debian's `invoke-rc.d` (and `deb-systemd-invoke`) ask before a maintainer script
/// starts a service; exit status 101 means "forbidden".
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// bpf-linker built against LLVM 22 (0.13 defaults to LLVM 23, which Debian 12 lacks).
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The pinned eBPF toolchain (named once, in `enforcer-common`; `enforcer/build.rs` builds with
/// it) and the LLVM major that it and bpf-linker must share.
use enforcer_common::{EBPF_LLVM_MAJOR, EBPF_TOOLCHAIN};

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn quiet(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

pub fn ensure() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if !missing.is_empty() {
        if !is_root() {
            bail!("missing Debian packages {missing:?}; run as root (or apt-get install them)");
        }
        eprintln!("xtask: installing {missing:?}");
        crate::status(Command::new("apt-get").arg("update").arg("-q"))?;
        let nginx_before = system_nginx();
        let caddy_before = system_caddy();
        {
            let _no_starts = NoServiceStarts::new()?;
            crate::status(
                Command::new("apt-get")
                    .args(["install", "-y", "-q", "--no-install-recommends"])
                    .args(&missing)
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )?;
        }
        stop_started_services(nginx_before, caddy_before)?;
    }

    ensure_python_tools()?;
    ensure_ebpf_toolchain()?;
    ensure_bpf_linker()?;
    check_llvm_majors()?;

    if is_root() && !quiet(Command::new("mountpoint").args(["-q", "/sys/fs/bpf"])) {
        crate::status(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

/// While alive, no maintainer script starts a service. Installing nginx would otherwise start
/// the system nginx on port 80 (and caddy on 80 and its admin port 2019) through `invoke-rc.d`,
/// with or without systemd; the tests run private instances on free ports instead. A policy
/// that is already there (a container image's) is the machine's: it is left as it is.
struct NoServiceStarts {
    created: bool,
}

impl NoServiceStarts {
    fn new() -> Result<Self> {
        use std::os::unix::fs::PermissionsExt as _;
        let path = std::path::Path::new(POLICY_RC_D);
        if path.exists() {
            return Ok(Self { created: false });
        }
        std::fs::write(
            path,
            "#!/bin/sh\n# Written by `cargo xtask setup` while apt-get runs: no service starts.\nexit 101\n",
        )
        .with_context(|| format!("writing {POLICY_RC_D}"))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
        Ok(Self { created: true })
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if self.created {
            let _ = std::fs::remove_file(POLICY_RC_D);
        }
    }
}

/// The system nginx's PID, when one runs (the package's `/run/nginx.pid`).
fn system_nginx() -> Option<u32> {
    let pid: u32 = std::fs::read_to_string("/run/nginx.pid")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    std::path::Path::new(&format!("/proc/{pid}"))
        .exists()
        .then_some(pid)
}

/// Whether something answers on Caddy's default admin address (the system caddy's).
fn system_caddy() -> bool {
    std::net::TcpStream::connect(("127.0.0.1", 2019)).is_ok()
}

/// A service the install started anyway (a policy that allowed it) is stopped: only one that
/// was not running before, through its own pid file or admin address, never by name.
fn stop_started_services(nginx_before: Option<u32>, caddy_before: bool) -> Result<()> {
    if let Some(pid) = system_nginx().filter(|_| nginx_before.is_none()) {
        eprintln!("xtask: the nginx package started the system nginx (pid {pid}); stopping it");
        crate::status(Command::new("nginx").args(["-s", "quit"]))?;
    }
    if system_caddy() && !caddy_before {
        eprintln!("xtask: the caddy package started the system caddy; stopping it");
        crate::status(Command::new("caddy").args(["stop", "--address", "127.0.0.1:2019"]))?;
    }
    Ok(())
}

/// The venv of [`TOOLS_VENV`] with exactly [`PIP_PACKAGES`]; quick when `pip freeze` already
/// lists them all. Debian's python3 makes it (not whichever `python3` comes first on `PATH`).
fn ensure_python_tools() -> Result<()> {
    let venv = std::path::Path::new(TOOLS_VENV);
    let pip = venv.join("bin/pip");
    let frozen = Command::new(&pip)
        .args(["freeze", "--all"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_lowercase())
        .unwrap_or_default();
    let normal = |p: &str| p.to_lowercase().replace('_', "-");
    let frozen: Vec<String> = frozen.lines().map(normal).collect();
    if PIP_PACKAGES
        .iter()
        .all(|p| frozen.iter().any(|f| *f == normal(p)))
    {
        return Ok(());
    }
    eprintln!("xtask: installing {PIP_PACKAGES:?} into {TOOLS_VENV}");
    if !venv.join("bin/python").exists() {
        crate::status(
            Command::new("/usr/bin/python3")
                .args(["-m", "venv"])
                .arg(venv),
        )
        .context("creating the Python tools' venv (Debian package python3-venv)")?;
    }
    crate::status(
        Command::new(&pip)
            .args([
                "install",
                "--quiet",
                "--no-deps",
                "--disable-pip-version-check",
            ])
            .args(PIP_PACKAGES),
    )
    .context("installing the Python tools")
}

/// Installs exactly the pinned toolchain with `rust-src` (`-Z build-std=core` needs it). Whatever
/// a plain `nightly` is (newer, without rust-src, absent) does not matter: it is never used.
fn ensure_ebpf_toolchain() -> Result<()> {
    let has_rust_src = Command::new("rustup")
        .args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            EBPF_TOOLCHAIN,
        ])
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("rust-src"))
        .unwrap_or(false);
    if !has_rust_src {
        eprintln!("xtask: installing {EBPF_TOOLCHAIN} with rust-src (it builds the eBPF programs)");
        crate::status(Command::new("rustup").args([
            "toolchain",
            "install",
            EBPF_TOOLCHAIN,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    Ok(())
}

/// The LLVM major a `rustc -vV` output names (`LLVM version: 22.1.4`).
fn rustc_llvm_major(verbose_version: &str) -> Option<u32> {
    verbose_version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .and_then(|v| v.trim().split('.').next())
        .and_then(|m| m.parse().ok())
}

/// The LLVM major the installed bpf-linker was built against: the `libLLVM` it links
/// (`ldd`), else the `llvm-NN` feature cargo recorded when it installed it. `None` when
/// bpf-linker is missing or neither tells.
fn bpf_linker_llvm_major() -> Option<u32> {
    let path = Command::new("sh")
        .args(["-c", "command -v bpf-linker"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())?;
    let ldd = Command::new("ldd").arg(&path).output().ok();
    let from_ldd = ldd.and_then(|o| {
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        // e.g. "libLLVM.so.22.1 => /usr/lib/llvm-22/lib/libLLVM.so.22.1" or "libLLVM-22.so".
        text.lines().find_map(|l| {
            let name = l.split_whitespace().next()?;
            let rest = name
                .strip_prefix("libLLVM.so.")
                .or_else(|| name.strip_prefix("libLLVM-"))?;
            rest.split(['.', '-']).next()?.parse().ok()
        })
    });
    from_ldd.or_else(|| {
        let home = std::env::var_os("CARGO_HOME")
            .map(std::path::PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cargo"))
            })?;
        let crates = std::fs::read_to_string(home.join(".crates2.json")).ok()?;
        let at = crates.find("\"bpf-linker ")?;
        let tail = &crates[at..];
        let feature = tail.find("\"llvm-")?;
        tail[feature + 6..].split('"').next()?.parse().ok()
    })
}

/// bpf-linker at the pinned version, built against the pinned LLVM major.
fn ensure_bpf_linker() -> Result<()> {
    let version_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if version_ok && bpf_linker_llvm_major() == Some(EBPF_LLVM_MAJOR) {
        return Ok(());
    }
    eprintln!(
        "xtask: installing bpf-linker {BPF_LINKER_VERSION} against LLVM {EBPF_LLVM_MAJOR} (~1 min)"
    );
    crate::status(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                &format!("llvm-{EBPF_LLVM_MAJOR}"),
                "--force",
            ])
            .env("LLVM_PREFIX", format!("/usr/lib/llvm-{EBPF_LLVM_MAJOR}")),
    )
    .context("installing bpf-linker")
}

/// rustc writes LLVM bitcode that bpf-linker reads: their LLVM majors must be equal, or the
/// link fails much later with an obscure `ERROR llvm: Invalid record`. Says so in one line.
fn check_llvm_majors() -> Result<()> {
    let out = Command::new("rustc")
        .args([&format!("+{EBPF_TOOLCHAIN}"), "-vV"])
        .output()
        .with_context(|| format!("running rustc +{EBPF_TOOLCHAIN} -vV"))?;
    let rustc = rustc_llvm_major(&String::from_utf8_lossy(&out.stdout));
    let linker = bpf_linker_llvm_major();
    match (rustc, linker) {
        (Some(r), Some(l)) if r == l => Ok(()),
        (r, l) => bail!(
            "LLVM mismatch: {EBPF_TOOLCHAIN} has LLVM {} but bpf-linker is built against LLVM {}; \
             they must be equal (pin another toolchain in enforcer-common, or reinstall bpf-linker)",
            r.map_or("?".to_owned(), |v| v.to_string()),
            l.map_or("?".to_owned(), |v| v.to_string()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::rustc_llvm_major;

    #[test]
    fn reads_the_llvm_major_of_rustc() {
        let out =
            "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\nLLVM version: 22.1.4\n";
        assert_eq!(rustc_llvm_major(out), Some(22));
        assert_eq!(rustc_llvm_major("rustc 1.95.0\n"), None);
    }
}
