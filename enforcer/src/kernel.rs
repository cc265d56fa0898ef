//! The kernel side, seen from userspace: loads the TC eBPF program `gate` (built from
//! `enforcer-ebpf` by `build.rs` and embedded in this binary), attaches it to the ingress of the
//! configured interfaces (TCX where the kernel has it, clsact otherwise) and reads its counters.
//!
//! Loading needs root (CAP_BPF + CAP_NET_ADMIN). Without it the daemon runs userspace-only and
//! says so (`/readyz`, `enforcer_kernel_attached 0`, a warning in the log).
use aya::Ebpf;
use aya::maps::PerCpuArray;
use aya::programs::tc::{NlOptions, TcAttachOptions};
use aya::programs::{SchedClassifier, TcAttachType, tc};
use enforcer_common::{counter, names};

/// The eBPF object built by `build.rs`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer"));

/// Errors of the kernel gate.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The object could not be loaded into the kernel (privileges, verifier, kernel too old).
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program operation failed.
    #[error("eBPF program error: {0}")]
    Program(#[from] aya::programs::ProgramError),
    /// A map operation failed.
    #[error("eBPF map error: {0}")]
    Map(#[from] aya::maps::MapError),
    /// The object lacks something this daemon expects (a build mismatch).
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    /// Attaching to an interface failed.
    #[error("attaching to {iface} failed: {reason}")]
    Attach {
        /// The interface.
        iface: String,
        /// Why.
        reason: String,
    },
}

/// Summed per-CPU counters of the gate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets passed to the normal path.
    pub passed: u64,
    /// Packets the gate could not parse (passed as well).
    pub parse_failed: u64,
}

/// The loaded gate; dropping it detaches the program.
#[derive(Debug)]
pub struct Gate {
    ebpf: Ebpf,
    interfaces: Vec<String>,
}

impl Gate {
    /// Loads the object and verifies the `gate` program, without attaching it anywhere.
    pub fn load() -> Result<Self, KernelError> {
        let mut ebpf = Ebpf::load(OBJECT)?;
        program(&mut ebpf)?.load()?;
        Ok(Self {
            ebpf,
            interfaces: Vec::new(),
        })
    }

    /// Loads the gate and attaches it to the ingress of every interface in `interfaces`.
    pub fn attach(interfaces: &[String]) -> Result<Self, KernelError> {
        let mut gate = Self::load()?;
        for iface in interfaces {
            let prog = program(&mut gate.ebpf)?;
            // TCX on kernels >= 6.6; the netlink path needs the clsact qdisc first.
            if let Err(tcx) = prog.attach(iface, TcAttachType::Ingress) {
                let _ = tc::qdisc_add_clsact(iface);
                prog.attach_with_options(
                    iface,
                    TcAttachType::Ingress,
                    TcAttachOptions::Netlink(NlOptions::default()),
                )
                .map_err(|clsact| KernelError::Attach {
                    iface: iface.clone(),
                    reason: format!("tcx: {tcx}; clsact: {clsact}"),
                })?;
            }
            gate.interfaces.push(iface.clone());
        }
        Ok(gate)
    }

    /// Interfaces the gate is attached to.
    pub fn interfaces(&self) -> &[String] {
        &self.interfaces
    }

    /// The `gate` program (for `test_run` in tests and benchmarks).
    pub fn program(&mut self) -> Result<&mut SchedClassifier, KernelError> {
        program(&mut self.ebpf)
    }

    /// Reads and sums the per-CPU counters.
    pub fn counters(&self) -> Result<Counters, KernelError> {
        let map = self
            .ebpf
            .map(names::COUNTERS_MAP)
            .ok_or(KernelError::Missing("COUNTERS map"))?;
        let array = PerCpuArray::<_, u64>::try_from(map)?;
        let sum =
            |index: u32| -> Result<u64, KernelError> { Ok(array.get(&index, 0)?.iter().sum()) };
        Ok(Counters {
            passed: sum(counter::PASSED)?,
            parse_failed: sum(counter::PARSE_FAILED)?,
        })
    }
}

fn program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, KernelError> {
    ebpf.program_mut(names::GATE_PROGRAM)
        .ok_or(KernelError::Missing("gate program"))?
        .try_into()
        .map_err(KernelError::Program)
}
