//! Installs what the build and the tests need, only when it is missing.
use anyhow::{Context as _, Result, bail};
use std::process::{Command, Stdio};

/// Debian packages: LLVM 22 for bpf-linker, bpftool and iproute2 for the kernel side,
/// Redis, PostgreSQL and Prometheus for the tests and benchmarks.
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
];

/// bpf-linker built against LLVM 22 (0.13 defaults to LLVM 23, which Debian 12 lacks).
const BPF_LINKER_VERSION: &str = "0.13.0";

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
        crate::status(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }

    let has_rust_src = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("rust-src"))
        .unwrap_or(false);
    if !has_rust_src {
        eprintln!("xtask: installing the nightly toolchain's rust-src (eBPF builds core with it)");
        crate::status(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }

    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if !linker_ok {
        eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (~1 min)");
        crate::status(
            Command::new("cargo")
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                    "--force",
                ])
                .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
        )
        .context("installing bpf-linker")?;
    }

    if is_root() && !quiet(Command::new("mountpoint").args(["-q", "/sys/fs/bpf"])) {
        crate::status(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}
