//! Builds the kernel programs (`enforcer-ebpf`) for bpfel-unknown-none with aya-build, so that
//! `cargo build` of the daemon embeds a fresh eBPF object (see `kernel.rs`), with the pinned
//! toolchain [`enforcer_common::EBPF_TOOLCHAIN`] (never a drifting `nightly`).
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf_package = packages
        .into_iter()
        .find(|cargo_metadata::Package { name, .. }| name.as_str() == "enforcer-ebpf")
        .ok_or_else(|| anyhow!("enforcer-ebpf package not found"))?;
    let cargo_metadata::Package {
        name,
        manifest_path,
        ..
    } = ebpf_package;
    let ebpf_package = aya_build::Package {
        name: name.as_str(),
        root_dir: manifest_path
            .parent()
            .ok_or_else(|| anyhow!("no parent for {manifest_path}"))?
            .as_str(),
        ..Default::default()
    };
    aya_build::build_ebpf(
        [ebpf_package],
        Toolchain::Custom(enforcer_common::EBPF_TOOLCHAIN),
    )
}
