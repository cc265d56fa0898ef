//! The kernel side, seen from userspace: loads the TC eBPF program `gate` (built from
//! `enforcer-ebpf` by `build.rs` and embedded in this binary), attaches it to the ingress of the
//! configured interfaces (TCX where the kernel has it, clsact otherwise), writes its maps
//! (config, protected ports, prices, budget snapshots, address bindings) and reads its counters.
//!
//! With a pin directory the maps are pinned there (`/sys/fs/bpf/enforcer` in production), and a
//! restarted daemon adopts them: enforcement continues from the first second.
//!
//! Loading needs root (CAP_BPF + CAP_NET_ADMIN). Without it the daemon runs userspace-only and
//! says so (`/readyz`, `enforcer_kernel_attached 0`, a warning in the log).
//!
//! Where the gate runs is the kernel's to say, and an operator's to switch off
//! ([`attachment`]): [`Gate::reconcile`] follows the operator's detach markers and notices a
//! link that ended under it.
/// Interfaces with a pinned gate link (see [`attachment::pinned_interfaces`]).
pub use crate::kernel::attachment::pinned_interfaces;
use crate::kernel::attachment::{self, AttachmentError, link_pin};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions};
use aya::programs::{SchedClassifier, TcAttachType, tc};
use aya::{Ebpf, EbpfLoader};
use enforcer_common::{Binding, Budget, GateConfig, KeyRejects, Milli, PriceKey, counter, names};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The eBPF object built by `build.rs`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer"));

/// The maps that are pinned (everything the daemon writes or reads back).
const PINNED: [&str; 8] = [
    names::BLOCKS_MAP,
    names::COUNTERS_MAP,
    names::CONFIG_MAP,
    names::PORTS_MAP,
    names::BUDGETS_MAP,
    names::PRICES_MAP,
    names::BINDINGS_MAP,
    names::KEY_REJECTS_MAP,
];

/// Key size, value size and capacity of each pinned map, as this build's object declares them.
fn pinned_layout(name: &str) -> Option<(usize, usize, u32)> {
    use std::mem::size_of;
    Some(match name {
        names::BLOCKS_MAP => (8, 8, enforcer_common::capacity::BLOCKS),
        names::COUNTERS_MAP => (4, 8, enforcer_common::counter::SLOTS),
        names::CONFIG_MAP => (4, size_of::<GateConfig>(), 1),
        names::PORTS_MAP => (2, 4, enforcer_common::capacity::PORTS),
        names::BUDGETS_MAP => (8, size_of::<Budget>(), enforcer_common::capacity::BUDGETS),
        names::PRICES_MAP => (size_of::<PriceKey>(), 8, enforcer_common::capacity::PRICES),
        names::BINDINGS_MAP => (
            16,
            size_of::<Binding>(),
            enforcer_common::capacity::BINDINGS,
        ),
        names::KEY_REJECTS_MAP => (
            8,
            size_of::<KeyRejects>(),
            enforcer_common::capacity::KEY_REJECTS,
        ),
        _ => return None,
    })
}

/// Removes pinned maps left by a build with another layout (an upgrade that changed a shared
/// type): adopting them would make the verifier refuse the program, or worse, misread them.
/// Their entries are lost; the daemon re-syncs what it needs.
fn drop_incompatible_pins(dir: &Path) {
    for name in PINNED {
        let path = dir.join(name);
        let Ok(map) = aya::maps::MapData::from_pin(&path) else {
            continue;
        };
        let (Ok(info), Some((key, value, entries))) = (map.info(), pinned_layout(name)) else {
            continue;
        };
        if (
            info.key_size() as usize,
            info.value_size() as usize,
            info.max_entries(),
        ) != (key, value, entries)
        {
            tracing::warn!(
                map = name,
                "a pinned map has another layout (an older build?); replacing it"
            );
            let _ = std::fs::remove_file(&path);
        }
    }
}

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
    /// A setting the kernel side cannot hold.
    #[error("invalid gate setting: {0}")]
    Setting(String),
    /// The pin directory could not be created.
    #[error("cannot create the pin directory {0}: {1}")]
    PinDir(String, std::io::Error),
    /// Reading or switching the attachments failed.
    #[error(transparent)]
    Attachment(#[from] AttachmentError),
}

/// Summed per-CPU counters of the gate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets passed to the normal path.
    pub passed: u64,
    /// Packets to a protected port the gate could not parse (passed as well).
    pub parse_failed: u64,
    /// HTTP requests rejected because their key cannot pay their price.
    pub rejected_l7: u64,
    /// Packets rejected because their bound address's key cannot pay the cheapest price.
    pub rejected_l4: u64,
    /// Packets rejected because their key is blocked.
    pub rejected_blocked: u64,
    /// Packets passed because the data about their key was stale.
    pub stale: u64,
}

/// What the gate enforces (written to its `CONFIG` and `PORTS` maps).
#[derive(Debug, Clone, PartialEq)]
pub struct GateSettings {
    /// Protected TCP destination ports.
    pub ports: Vec<u16>,
    /// Header carrying the key (case-insensitive).
    pub key_header: String,
    /// Value prefix to skip, e.g. `"Bearer "` for `Authorization` (empty: none).
    pub value_prefix: String,
    /// How long the gate keeps enforcing after the daemon's last heartbeat.
    pub max_staleness: Duration,
    /// Price of a request whose endpoint is not in the price map, tokens.
    pub default_price: f64,
    /// Cheapest price of any request, tokens (L4 identities are compared with it).
    pub min_price: f64,
    /// Price of a request whose path may not be in normal form, tokens: the least the daemon
    /// charges for anything (0 with operational endpoints).
    pub ambiguous_price: f64,
    /// Hash `/a/` as `/a`, as the daemon prices it (`pricing.trailing_slash = "strip"`).
    pub strip_trailing_slash: bool,
    /// Config generation: entries written under another generation are ignored.
    pub generation: u32,
    /// Answer rejected packets with a TCP RST instead of dropping them.
    pub reset: bool,
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of the kernel's `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec as u64).saturating_mul(1_000_000_000) + t.tv_nsec as u64
}

/// An address as the gate keys it: IPv6, or IPv4-mapped IPv6.
pub fn address_key(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// How the gate is attached to one interface.
#[derive(Debug)]
enum Attached {
    /// A TCX link held by its pin only (this process closed its descriptor).
    Pinned,
    /// A TCX link this process holds (taken over from a pin, or not pinned).
    Tcx(SchedClassifierLinkId),
    /// A clsact filter (kernels without TCX): it ends with this process.
    Netlink(SchedClassifierLinkId),
}

/// Where one configured interface stands, as [`Gate::reconcile`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterfaceState {
    /// The gate judges this interface's ingress.
    Attached,
    /// An operator detached the gate from it (`enforcer kernel detach`).
    DetachedByOperator,
    /// The gate's link ended without an operator's detach (the interface was deleted, or the
    /// link was detached by other means), or attaching again failed: why. Not attached again
    /// until the daemon restarts.
    Lost(String),
}

/// The loaded gate; dropping it detaches the program (pinned maps stay).
#[derive(Debug)]
pub struct Gate {
    ebpf: Ebpf,
    interfaces: Vec<String>,
    generation: u32,
    pin_dir: Option<PathBuf>,
    /// The kernel's id of this process's `gate` program.
    prog_id: u32,
    attached: BTreeMap<String, Attached>,
    /// Interfaces whose link ended under this process, and why.
    lost: BTreeMap<String, String>,
}

impl Gate {
    /// Loads the object and verifies the `gate` program, without attaching it anywhere. With
    /// `pin_dir` its maps are pinned there, or adopted if a previous daemon pinned them.
    pub fn load(pin_dir: Option<&Path>) -> Result<Self, KernelError> {
        let mut loader = EbpfLoader::new();
        if let Some(dir) = pin_dir {
            std::fs::create_dir_all(dir)
                .map_err(|e| KernelError::PinDir(dir.display().to_string(), e))?;
            drop_incompatible_pins(dir);
            for name in PINNED {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader.load(OBJECT)?;
        let prog = program(&mut ebpf)?;
        prog.load()?;
        let prog_id = prog.info()?.id();
        let mut gate = Self {
            ebpf,
            interfaces: Vec::new(),
            generation: 0,
            pin_dir: pin_dir.map(Path::to_path_buf),
            prog_id,
            attached: BTreeMap::new(),
            lost: BTreeMap::new(),
        };
        gate.generation = gate.config()?.map(|c| c.generation).unwrap_or(0);
        Ok(gate)
    }

    /// Loads the gate and attaches it to the ingress of every interface in `interfaces`. With
    /// `pin_dir`, maps and TCX links are pinned there: the program stays attached after this
    /// process exits, and the next daemon swaps its own program into the pinned link.
    ///
    /// An interface that does not exist is an error before anything is pinned. Interfaces an
    /// operator detached the gate from (markers in `pin_dir`) are left alone; pinned links of
    /// interfaces that are gone are removed.
    pub fn attach(interfaces: &[String], pin_dir: Option<&Path>) -> Result<Self, KernelError> {
        if let Some(missing) = interfaces.iter().find(|i| !attachment::interface_exists(i)) {
            return Err(KernelError::Attach {
                iface: missing.clone(),
                reason: "no such interface in this network namespace".to_owned(),
            });
        }
        let mut gate = Self::load(pin_dir)?;
        let detached = pin_dir.map(attachment::detached).unwrap_or_default();
        if let Some(dir) = pin_dir {
            remove_stale_pins(dir);
        }
        for iface in interfaces {
            if detached.covers(iface) {
                tracing::warn!(
                    iface,
                    "not attaching: an operator detached the gate (`enforcer kernel attach` attaches it again)"
                );
                continue;
            }
            gate.attach_to(iface, pin_dir)?;
        }
        Ok(gate)
    }

    /// Attaches to one more interface's ingress (see [`Gate::attach`] for `pin_dir`).
    pub fn attach_to(&mut self, iface: &str, pin_dir: Option<&Path>) -> Result<(), KernelError> {
        let link_pin = pin_dir.map(|dir| link_pin(dir, iface));
        let prog = program(&mut self.ebpf)?;
        let attach_err = |reason: String| KernelError::Attach {
            iface: iface.to_owned(),
            reason,
        };
        // A link pinned by an earlier daemon: replace its program atomically (no gap). (A pin
        // whose link ended, with its interface, was removed by `attach`.)
        if let Some(path) = &link_pin
            && let Ok(pinned) = PinnedLink::from_pin(path)
        {
            let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                .map_err(|e| attach_err(format!("pinned link {}: {e}", path.display())))?;
            let id = prog.attach_to_link(link)?;
            self.attached.insert(iface.to_owned(), Attached::Tcx(id));
            self.interfaces.push(iface.to_owned());
            return Ok(());
        }
        // TCX on kernels >= 6.6; the netlink path needs the clsact qdisc first (and its
        // attachment cannot be pinned: it ends with this process).
        let attached = match prog.attach(iface, TcAttachType::Ingress) {
            Ok(id) => match &link_pin {
                Some(path) => {
                    let link = prog.take_link(id)?;
                    let fd = FdLink::try_from(link)
                        .map_err(|e| attach_err(format!("not a TCX link: {e}")))?;
                    fd.pin(path)
                        .map_err(|e| attach_err(format!("pinning the link: {e}")))?;
                    Attached::Pinned
                }
                None => Attached::Tcx(id),
            },
            Err(tcx) => {
                let _ = tc::qdisc_add_clsact(iface);
                let id = prog
                    .attach_with_options(
                        iface,
                        TcAttachType::Ingress,
                        TcAttachOptions::Netlink(NlOptions::default()),
                    )
                    .map_err(|clsact| attach_err(format!("tcx: {tcx}; clsact: {clsact}")))?;
                Attached::Netlink(id)
            }
        };
        self.attached.insert(iface.to_owned(), attached);
        self.lost.remove(iface);
        self.interfaces.push(iface.to_owned());
        Ok(())
    }

    /// Detaches the gate from `iface`: this process lets go of its link, and a pinned link is
    /// detached for every holder and unpinned.
    pub fn detach_from(&mut self, iface: &str) -> Result<(), KernelError> {
        if let Some(dir) = &self.pin_dir {
            attachment::detach_pinned(dir, iface)?;
        }
        if let Some(Attached::Tcx(id) | Attached::Netlink(id)) = self.attached.remove(iface) {
            // A TCX link detached above is defunct: this only closes its descriptor.
            program(&mut self.ebpf)?.detach(id)?;
        }
        self.interfaces.retain(|i| i != iface);
        Ok(())
    }

    /// Whether the gate still judges `iface`'s ingress, as the kernel says (a TCX link ends
    /// with its interface, or with an operator's `BPF_LINK_DETACH`).
    pub fn is_live(&self, iface: &str) -> bool {
        match self.attached.get(iface) {
            None => false,
            // The filter goes with the interface; nothing else removes it but `tc`.
            Some(Attached::Netlink(_)) => attachment::interface_exists(iface),
            Some(Attached::Pinned | Attached::Tcx(_)) => {
                // The pinned link's own info says whether it still runs (its ifindex is 0 once
                // it is detached or its device deleted), with no privilege beyond the pin's.
                // Asking the interface instead (`query_tcx`) opens every program attached
                // there by id, which the kernel allows only with CAP_SYS_ADMIN: a daemon with
                // just CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (deploy/kubernetes) would take
                // the refusal for an ended link and let go of a working gate.
                if let Some(stale) = self
                    .pin_dir
                    .as_deref()
                    .and_then(|dir| attachment::pinned_link_is_stale(dir, iface))
                {
                    return !stale;
                }
                match SchedClassifier::query_tcx(iface, TcAttachType::Ingress) {
                    Ok((_, progs)) => progs.iter().any(|p| p.id() == self.prog_id),
                    // Unknown is not ended: an operator's detach is seen through its marker.
                    Err(e) => {
                        tracing::debug!(iface, error = %e, "querying the interface's TCX programs failed");
                        true
                    }
                }
            }
        }
    }

    /// Follows the operator's switch and notices links that ended: detaches from the
    /// `configured` interfaces an operator detached the gate from, attaches again to those whose
    /// marker was removed (`enforcer kernel attach`), and lets go of links that ended under it
    /// (their interface was deleted, or they were detached by other means; such an interface is
    /// not attached again until the daemon restarts). Called at every heartbeat; the state of
    /// each configured interface.
    pub fn reconcile(&mut self, configured: &[String]) -> Vec<(String, InterfaceState)> {
        let detached = self
            .pin_dir
            .as_deref()
            .map(attachment::detached)
            .unwrap_or_default();
        let pin_dir = self.pin_dir.clone();
        let mut states = Vec::with_capacity(configured.len());
        for iface in configured {
            let attached = self.attached.contains_key(iface);
            let state = if detached.covers(iface) {
                if attached {
                    match self.detach_from(iface) {
                        Ok(()) => tracing::warn!(iface, "kernel gate detached by an operator"),
                        Err(e) => {
                            tracing::warn!(iface, error = %e, "detaching the kernel gate failed")
                        }
                    }
                }
                InterfaceState::DetachedByOperator
            } else if attached {
                if self.is_live(iface) {
                    InterfaceState::Attached
                } else {
                    let why = if attachment::interface_exists(iface) {
                        "its link was detached outside enforcer"
                    } else {
                        "the interface is gone"
                    };
                    tracing::warn!(iface, why, "kernel gate no longer attached");
                    if let Err(e) = self.detach_from(iface) {
                        tracing::warn!(iface, error = %e, "removing the ended link failed");
                    }
                    self.lost.insert(iface.clone(), why.to_owned());
                    InterfaceState::Lost(why.to_owned())
                }
            } else if let Some(why) = self.lost.get(iface) {
                InterfaceState::Lost(why.clone())
            } else {
                match self.attach_to(iface, pin_dir.as_deref()) {
                    Ok(()) => {
                        tracing::info!(iface, "kernel gate attached again");
                        InterfaceState::Attached
                    }
                    Err(e) => {
                        tracing::warn!(iface, error = %e, "attaching the kernel gate again failed");
                        let why = format!("attaching again failed: {e}");
                        self.lost.insert(iface.clone(), why.clone());
                        InterfaceState::Lost(why)
                    }
                }
            };
            states.push((iface.clone(), state));
        }
        states
    }

    /// Interfaces the gate is attached to.
    pub fn interfaces(&self) -> &[String] {
        &self.interfaces
    }

    /// The config generation in force (0: not configured; everything passes).
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The `gate` program (for `test_run` in tests and benchmarks).
    pub fn program(&mut self) -> Result<&mut SchedClassifier, KernelError> {
        program(&mut self.ebpf)
    }

    /// The `floor` program (passes everything, nothing else), loaded on first use: the
    /// baseline of the per-packet benchmark.
    pub fn floor_program(&mut self) -> Result<&mut SchedClassifier, KernelError> {
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut("floor")
            .ok_or(KernelError::Missing("floor program"))?
            .try_into()?;
        if prog.fd().is_err() {
            prog.load()?;
        }
        Ok(prog)
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, KernelError> {
        self.ebpf.map_mut(name).ok_or(KernelError::Missing(name))
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map, KernelError> {
        self.ebpf.map(name).ok_or(KernelError::Missing(name))
    }

    /// The config in the kernel (`None` before the first `configure`).
    pub fn config(&self) -> Result<Option<GateConfig>, KernelError> {
        let array = Array::<&MapData, GateConfig>::try_from(self.map(names::CONFIG_MAP)?)?;
        let c = array.get(&0, 0)?;
        Ok((c.generation != 0).then_some(c))
    }

    /// Writes the settings. Protected ports are replaced; entries of older generations stop
    /// counting once `settings.generation` differs from theirs.
    pub fn configure(&mut self, settings: &GateSettings) -> Result<(), KernelError> {
        if settings.generation == 0 {
            return Err(KernelError::Setting(
                "generation 0 means unconfigured".into(),
            ));
        }
        let mut config = GateConfig::new(&settings.key_header, &settings.value_prefix)
            .ok_or_else(|| KernelError::Setting("key header or value prefix too long".into()))?;
        config.generation = settings.generation;
        config.action = if settings.reset {
            enforcer_common::action::RESET
        } else {
            enforcer_common::action::DROP
        };
        config.heartbeat_ns = monotonic_ns();
        config.max_staleness_ns = u64::try_from(settings.max_staleness.as_nanos())
            .map_err(|_| KernelError::Setting("max_staleness too large".into()))?;
        // Rounded down, never up: 0 is a price that never rejects (operational endpoints).
        config.default_price_milli = Milli::price(settings.default_price);
        config.min_price_milli = Milli::price(settings.min_price);
        config.ambiguous_price_milli = Milli::price(settings.ambiguous_price);
        config.strip_trailing_slash = u32::from(settings.strip_trailing_slash);
        {
            let mut ports =
                HashMap::<&mut MapData, u16, u32>::try_from(self.map_mut(names::PORTS_MAP)?)?;
            let old: Vec<u16> = ports.keys().filter_map(Result::ok).collect();
            for port in old {
                if !settings.ports.contains(&port) {
                    ports.remove(&port)?;
                }
            }
            for port in &settings.ports {
                ports.insert(port, 1, 0)?;
            }
        }
        let mut array =
            Array::<&mut MapData, GateConfig>::try_from(self.map_mut(names::CONFIG_MAP)?)?;
        array.set(0, config, 0)?;
        self.generation = settings.generation;
        Ok(())
    }

    /// Tells the kernel the daemon is alive (operator blocks hold only while this is fresh).
    pub fn heartbeat(&mut self) -> Result<(), KernelError> {
        let mut array =
            Array::<&mut MapData, GateConfig>::try_from(self.map_mut(names::CONFIG_MAP)?)?;
        let mut config = array.get(&0, 0)?;
        if config.generation == 0 {
            return Ok(());
        }
        config.heartbeat_ns = monotonic_ns();
        array.set(0, config, 0)?;
        Ok(())
    }

    /// Blocks a key (by kernel id) for `duration` from now.
    pub fn block(&mut self, key_id: u64, duration: Duration) -> Result<(), KernelError> {
        let until = monotonic_ns().saturating_add(duration.as_nanos().min(u64::MAX as u128) as u64);
        let mut map =
            HashMap::<&mut MapData, u64, u64>::try_from(self.map_mut(names::BLOCKS_MAP)?)?;
        map.insert(key_id, until, 0)?;
        Ok(())
    }

    /// When a key's block ends (`CLOCK_MONOTONIC` ns), if the map holds one (it may have
    /// ended already: the kernel compares it with the clock).
    pub fn blocked_until(&self, key_id: u64) -> Result<Option<u64>, KernelError> {
        let map = HashMap::<&MapData, u64, u64>::try_from(self.map(names::BLOCKS_MAP)?)?;
        match map.get(&key_id, 0) {
            Ok(until) => Ok(Some(until)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Lifts a key's block; true if there was one.
    pub fn unblock(&mut self, key_id: u64) -> Result<bool, KernelError> {
        let mut map =
            HashMap::<&mut MapData, u64, u64>::try_from(self.map_mut(names::BLOCKS_MAP)?)?;
        removed(map.remove(&key_id))
    }

    /// Entries in each bounded map: `(name, entries, capacity)`.
    pub fn fill(&self) -> Result<Vec<(&'static str, usize, u32)>, KernelError> {
        use enforcer_common::capacity;
        Ok(vec![
            (
                names::BUDGETS_MAP,
                self.key_count::<u64, Budget>(names::BUDGETS_MAP)?,
                capacity::BUDGETS,
            ),
            (
                names::BINDINGS_MAP,
                self.key_count::<[u8; 16], Binding>(names::BINDINGS_MAP)?,
                capacity::BINDINGS,
            ),
            (
                names::BLOCKS_MAP,
                self.key_count::<u64, u64>(names::BLOCKS_MAP)?,
                capacity::BLOCKS,
            ),
            (
                names::PRICES_MAP,
                self.key_count::<PriceKey, u64>(names::PRICES_MAP)?,
                capacity::PRICES,
            ),
        ])
    }

    fn key_count<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &'static str,
    ) -> Result<usize, KernelError> {
        let map = HashMap::<&MapData, K, V>::try_from(self.map(name)?)?;
        Ok(map.keys().filter(Result::is_ok).count())
    }

    /// Sets the price of `method path` (method `None`: any method), in tokens (0: never rejected
    /// by budget), rounded down to milli-tokens.
    pub fn set_price(
        &mut self,
        method: Option<&str>,
        path: &str,
        tokens: f64,
    ) -> Result<(), KernelError> {
        let mut prices =
            HashMap::<&mut MapData, PriceKey, u64>::try_from(self.map_mut(names::PRICES_MAP)?)?;
        // 0 is allowed: operational endpoints never touch the main budget.
        prices.insert(price_key(method, path), Milli::price(tokens), 0)?;
        Ok(())
    }

    /// Makes the price map hold exactly `prices` (`(method, path, tokens)`): entries of an
    /// older config that `prices` lacks are removed, since the map is pinned and its keys carry
    /// no generation. Call it after [`Gate::configure`] with a new generation (no snapshot of
    /// the new generation exists yet, so nothing is judged by a half-written table).
    pub fn replace_prices(
        &mut self,
        prices: &[(Option<String>, String, f64)],
    ) -> Result<(), KernelError> {
        let wanted: std::collections::HashSet<PriceKey> = prices
            .iter()
            .map(|(m, p, _)| price_key(m.as_deref(), p))
            .collect();
        {
            let mut map =
                HashMap::<&mut MapData, PriceKey, u64>::try_from(self.map_mut(names::PRICES_MAP)?)?;
            let stale: Vec<PriceKey> = map
                .keys()
                .filter_map(Result::ok)
                .filter(|k| !wanted.contains(k))
                .collect();
            for k in stale {
                removed(map.remove(&k))?;
            }
        }
        for (method, path, tokens) in prices {
            self.set_price(method.as_deref(), path, *tokens)?;
        }
        Ok(())
    }

    /// The price map's entries in milli-tokens (by hashed key).
    pub fn prices(&self) -> Result<Vec<(PriceKey, u64)>, KernelError> {
        let map = HashMap::<&MapData, PriceKey, u64>::try_from(self.map(names::PRICES_MAP)?)?;
        Ok(map.iter().filter_map(Result::ok).collect())
    }

    /// Writes a key's budget snapshot (stamped with the current generation).
    pub fn put_budget(&mut self, key_id: u64, mut budget: Budget) -> Result<(), KernelError> {
        budget.generation = self.generation;
        let mut map =
            HashMap::<&mut MapData, u64, Budget>::try_from(self.map_mut(names::BUDGETS_MAP)?)?;
        map.insert(key_id, budget, 0)?;
        Ok(())
    }

    /// A key's snapshot, if the map holds one.
    pub fn budget(&self, key_id: u64) -> Result<Option<Budget>, KernelError> {
        let map = HashMap::<&MapData, u64, Budget>::try_from(self.map(names::BUDGETS_MAP)?)?;
        match map.get(&key_id, 0) {
            Ok(b) => Ok(Some(b)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Every snapshot in the map (a restarted daemon adopts them).
    pub fn budgets(&self) -> Result<Vec<(u64, Budget)>, KernelError> {
        let map = HashMap::<&MapData, u64, Budget>::try_from(self.map(names::BUDGETS_MAP)?)?;
        Ok(map.iter().filter_map(Result::ok).collect())
    }

    /// Removes a key's snapshot (the key then passes).
    pub fn remove_budget(&mut self, key_id: u64) -> Result<(), KernelError> {
        let mut map =
            HashMap::<&mut MapData, u64, Budget>::try_from(self.map_mut(names::BUDGETS_MAP)?)?;
        removed(map.remove(&key_id)).map(drop)
    }

    /// Binds a client address to one key, as of now.
    pub fn bind(&mut self, addr: IpAddr, key_id: u64) -> Result<(), KernelError> {
        let binding = Binding {
            key_id,
            synced_ns: monotonic_ns(),
            generation: self.generation,
            _pad: 0,
        };
        let mut map = HashMap::<&mut MapData, [u8; 16], Binding>::try_from(
            self.map_mut(names::BINDINGS_MAP)?,
        )?;
        map.insert(address_key(addr), binding, 0)?;
        Ok(())
    }

    /// Removes an address binding.
    pub fn unbind(&mut self, addr: IpAddr) -> Result<(), KernelError> {
        let mut map = HashMap::<&mut MapData, [u8; 16], Binding>::try_from(
            self.map_mut(names::BINDINGS_MAP)?,
        )?;
        removed(map.remove(&address_key(addr))).map(drop)
    }

    /// Removes every address binding (a starting daemon: it cannot unbind what it does not
    /// remember, and a binding holds as long as its heartbeat is fresh).
    pub fn clear_bindings(&mut self) -> Result<usize, KernelError> {
        let mut map = HashMap::<&mut MapData, [u8; 16], Binding>::try_from(
            self.map_mut(names::BINDINGS_MAP)?,
        )?;
        let addresses: Vec<[u8; 16]> = map.keys().filter_map(Result::ok).collect();
        for addr in &addresses {
            removed(map.remove(addr))?;
        }
        Ok(addresses.len())
    }

    /// Reads and sums the per-CPU counters.
    pub fn counters(&self) -> Result<Counters, KernelError> {
        let array = PerCpuArray::<_, u64>::try_from(self.map(names::COUNTERS_MAP)?)?;
        let sum =
            |index: u32| -> Result<u64, KernelError> { Ok(array.get(&index, 0)?.iter().sum()) };
        Ok(Counters {
            passed: sum(counter::PASSED)?,
            parse_failed: sum(counter::PARSE_FAILED)?,
            rejected_l7: sum(counter::REJECTED_L7)?,
            rejected_l4: sum(counter::REJECTED_L4)?,
            rejected_blocked: sum(counter::REJECTED_BLOCKED)?,
            stale: sum(counter::STALE)?,
        })
    }

    /// Rejections so far per key id and reason (running totals, summed over CPUs).
    pub fn key_rejections(&self) -> Result<Vec<(u64, KeyRejects)>, KernelError> {
        let map = PerCpuHashMap::<_, u64, KeyRejects>::try_from(self.map(names::KEY_REJECTS_MAP)?)?;
        let mut out = Vec::new();
        for entry in map.iter() {
            let (key, values) = entry?;
            let mut total = KeyRejects::default();
            for v in values.iter() {
                total.l7 += v.l7;
                total.l4 += v.l4;
                total.blocked += v.blocked;
            }
            out.push((key, total));
        }
        Ok(out)
    }
}

/// A map removal where a missing key is not an error: whether there was one. (The kernel
/// answers a missing key with ENOENT, which aya passes on as a failed `bpf_map_delete_elem`.)
fn removed(result: Result<(), aya::maps::MapError>) -> Result<bool, KernelError> {
    match result {
        Ok(()) => Ok(true),
        Err(aya::maps::MapError::KeyNotFound) => Ok(false),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// The price map's key of `method path` (method `None`: any method).
pub fn price_key(method: Option<&str>, path: &str) -> PriceKey {
    PriceKey {
        method: method.map_or(0, |m| enforcer_common::method_hash(m.as_bytes())),
        path: enforcer_common::path_hash(path.as_bytes()),
    }
}

/// Removes pinned links whose interface is gone (they run nothing and would make attaching to a
/// new interface of that name fail).
fn remove_stale_pins(pin_dir: &Path) {
    for iface in pinned_interfaces(pin_dir).unwrap_or_default() {
        if attachment::pinned_link_is_stale(pin_dir, &iface) == Some(true) {
            match std::fs::remove_file(link_pin(pin_dir, &iface)) {
                Ok(()) => tracing::info!(iface, "removed the pinned link of a vanished interface"),
                Err(e) => tracing::warn!(iface, error = %e, "removing a stale pinned link failed"),
            }
        }
    }
}

fn program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, KernelError> {
    ebpf.program_mut(names::GATE_PROGRAM)
        .ok_or(KernelError::Missing("gate program"))?
        .try_into()
        .map_err(KernelError::Program)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_ipv6_or_mapped() {
        let v4: IpAddr = "10.0.0.2".parse().expect("ip");
        assert_eq!(address_key(v4)[10..], [0xff, 0xff, 10, 0, 0, 2]);
    }
}
