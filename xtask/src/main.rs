//! `cargo xtask`: everything around the code, in one place, so a fresh machine needs nothing
//! but these commands (see the README).
//!
//! - `setup`: installs what is missing (Debian packages, nightly `rust-src`, `bpf-linker`),
//!   idempotently and quickly when everything is there; mounts bpffs.
//! - `run`: set-up, build, run the daemon on the embedded default with `examples/enforcer.toml`.
//! - `test`: set-up, start a private Redis, a Redis Cluster (six nodes) and PostgreSQL on free
//!   loopback ports, run every test (privileged ones included, one at a time), stop the
//!   services.
//! - `bench`: set-up, start a private Redis, measure the daemon beside `redis-benchmark`.
mod bench;
mod callgrind;
mod loadgen;
mod perf;
mod services;
mod setup;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    about = "Set-up, run, test and benchmark enforcer"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install what is missing (apt packages, nightly rust-src, bpf-linker) and mount bpffs.
    Setup,
    /// Set up, build (release) and run the daemon with examples/enforcer.toml (embedded store).
    Run {
        /// Serve a debug build instead of the release build (faster to compile, slow to serve).
        #[arg(long)]
        debug: bool,
        /// Extra arguments for `enforcer run`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, start private Redis, Redis Cluster and PostgreSQL, run every test, stop them.
    Test {
        /// Extra arguments for cargo test (e.g. a test name filter after --).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Benchmarks; numbers go to docs/benchmarks.md.
    Bench {
        /// Which benchmark.
        #[arg(value_enum, default_value_t = bench::Which::Http)]
        which: bench::Which,
        /// Concurrent connections (the same for redis-benchmark and the daemon).
        #[arg(long, default_value_t = 50)]
        clients: usize,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root).context("entering the workspace root")?;
    match cli.command {
        Cmd::Setup => setup::ensure(),
        Cmd::Run { debug, args } => {
            setup::ensure()?;
            let mut cmd = Command::new("cargo");
            cmd.args(["run", "--package", "enforcer"]);
            if !debug {
                cmd.arg("--release");
            }
            cmd.args(["--", "run", "--config", "examples/enforcer.toml"]);
            cmd.args(args);
            status(&mut cmd)
        }
        Cmd::Test { args } => test(&args),
        Cmd::Bench {
            which,
            clients,
            seconds,
        } => {
            setup::ensure()?;
            bench::run(which, clients, seconds)
        }
    }
}

fn test(extra: &[String]) -> Result<()> {
    setup::ensure()?;
    if !setup::is_root() {
        bail!("cargo xtask test runs privileged tests (eBPF, network namespaces): run it as root");
    }
    warn_if_disk_is_short();
    // Every cargo invocation here selects the same packages. Cargo unifies features over the
    // selected packages, so `--package enforcer-tests` alone would resolve other features than
    // `--workspace` and build every dependency and test binary a second time (twice the time and
    // twice the disk). (--workspace alone would include the eBPF crate, which only builds for the
    // BPF target.)
    const PACKAGES: [&str; 3] = ["--workspace", "--exclude", "enforcer-ebpf"];
    // Build first, so the services do not sit idle through a long compile. The CLI and kernel
    // tests run the `enforcer` binary itself.
    status(Command::new("cargo").arg("build").args(PACKAGES))?;
    status(
        Command::new("cargo")
            .arg("test")
            .args(PACKAGES)
            .arg("--no-run"),
    )?;
    // The Redis module the test Redis servers load (`ENFORCER.DEBIT`, enforcer-redis).
    let module = redis_module()?;
    let services = services::Services::start(&module)?;
    let mut env = services.env();
    // Every daemon a test starts serves gRPC on a port of its own, never the default 8081
    // (taken by a daemon the developer runs, or by the previous test's).
    env.push(("ENFORCER_GRPC_LISTEN".into(), "127.0.0.1:0".into()));
    // And no admin socket unless a test asks for one at a path of its own (the default,
    // /run/enforcer/admin.sock, is one per machine: the node's daemon's).
    env.push(("ENFORCER_ADMIN_SOCKET".into(), String::new()));
    // `harness` goes to the test binaries, before the caller's extra arguments (a filter).
    let run = |targets: &[&str], harness: &[&str]| {
        let mut cmd = Command::new("cargo");
        cmd.arg("test")
            .args(PACKAGES)
            .args(targets)
            .arg("--no-fail-fast");
        cmd.envs(env.iter().cloned());
        cmd.arg("--").args(harness).args(extra);
        status(&mut cmd)
    };
    // Unit tests (every crate's library and binaries) in parallel. The integration tests (only
    // enforcer-tests has any) share kernel state (namespaces, the bpffs) and some restart Redis
    // servers, so they run one at a time. (The workspace has no Rust doc tests.)
    let unit = run(&["--lib", "--bins"], &[]);
    let integration = run(&["--test", "*"], &["--test-threads=1"]);
    drop(services);
    unit.and(integration)
}

/// Space a `cargo xtask test` from a clean checkout takes under `target/` (3.9 GB measured on
/// 2026-12-04), with a margin for the test services' data in /tmp.
const TEST_DISK_GB: u64 = 6;

/// A warning, before the build, when the disk of `target/` has less free space than a clean
/// build takes: a full disk otherwise shows up as the linker killed by SIGBUS, far from its
/// cause. Only a warning: a `target/` already built needs little more.
fn warn_if_disk_is_short() {
    let Ok(out) = Command::new("df").args(["-Pk", "."]).output() else {
        return;
    };
    let free_kb = available_kb(&String::from_utf8_lossy(&out.stdout));
    if let Some(kb) = free_kb.filter(|&kb| kb < TEST_DISK_GB * 1024 * 1024) {
        eprintln!(
            "xtask: warning: {:.1} GB free on the disk of target/; a clean `cargo xtask test` \
             takes ~{TEST_DISK_GB} GB (a full disk shows up as the linker killed by SIGBUS)",
            kb as f64 / 1024.0 / 1024.0
        );
    }
}

/// The available KiB in `df -Pk`'s output: a header, then `filesystem blocks used available
/// capacity mount`.
fn available_kb(df: &str) -> Option<u64> {
    df.lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse().ok())
}

/// Runs a command, failing on a non-zero exit.
pub fn status(cmd: &mut Command) -> Result<()> {
    let s = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !s.success() {
        bail!("{cmd:?} failed: {s}");
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Builds the Redis module (`enforcer-redis`, release) and returns the path of its shared
/// library, for `redis-server --loadmodule`.
pub(crate) fn redis_module() -> Result<PathBuf> {
    status(Command::new("cargo").args(["build", "--release", "--package", "enforcer-redis"]))?;
    Ok(Path::new("target/release/libenforcer_redis.so").canonicalize()?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_free_space_is_read_from_df() {
        let df = "Filesystem     1024-blocks     Used Available Capacity Mounted on\n\
                  /dev/vda         264212084 24767812  70518076      26% /\n";
        assert_eq!(super::available_kb(df), Some(70_518_076));
        assert_eq!(super::available_kb("Filesystem 1024-blocks\n"), None);
        assert_eq!(super::available_kb(""), None);
    }
}
