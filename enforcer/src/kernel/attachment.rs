//! Where the gate runs, asked of the kernel, and the operator's switch that turns it off.
//!
//! The pin directory does not say where the gate runs: a TCX link runs the program for as long
//! as anyone holds it (its pin, or a daemon's file descriptor), and a pinned link outlives its
//! interface. So [`status`] lists the live TCX links of this pin directory's program, and
//! [`detach`] ends them with `BPF_LINK_DETACH`, which detaches a link for every holder at once:
//! from that moment no packet is judged, whether a daemon runs, holds the link, or not.
//!
//! The operator's decision outlives processes: [`detach`] leaves a marker in the pin directory
//! (a directory, since bpffs holds nothing but pins and directories: `detached` for every
//! interface, `detached-<iface>` for one). A running daemon honours it at its next heartbeat
//! (it drops its link and reports itself detached), a restarted daemon at start (it does not
//! attach); [`attach`] removes it, and the daemon attaches again.
//!
//! Interface names are resolved in the caller's network namespace: run the CLI where the daemon
//! runs. Pinned links are found by their pin's name, wherever their interface is.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Marker of a detach from every interface.
const DETACHED_ALL: &str = "detached";
/// Prefix of the marker of a detach from one interface.
const DETACHED_PREFIX: &str = "detached-";
/// Prefix of a pinned TCX link (`link-<iface>`).
const LINK_PREFIX: &str = "link-";

/// Errors of the attachment queries and the operator's switch.
#[derive(Debug, thiserror::Error)]
pub enum AttachmentError {
    /// No gate is pinned there (no daemon ran with this pin directory).
    #[error("no kernel gate is pinned at {0} (is a daemon running with [kernel] interfaces?)")]
    NotPinned(String),
    /// A pinned map or the program list could not be read.
    #[error("reading the pinned gate at {path}")]
    Map {
        /// The pin directory.
        path: String,
        /// Why.
        #[source]
        source: aya::maps::MapError,
    },
    /// A `bpf(2)` link command failed.
    #[error("{what}")]
    Link {
        /// What was attempted.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The pin directory (or a marker in it) could not be read or written.
    #[error("{what} {path}")]
    Dir {
        /// What was attempted.
        what: &'static str,
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `attach --iface` while the gate is detached from every interface.
    #[error(
        "the gate is detached from every interface: `enforcer kernel attach` without --iface attaches it again"
    )]
    DetachedEverywhere,
    /// A name that cannot be an interface (empty, too long, or with `/`).
    #[error("{0:?} is not an interface name")]
    BadName(String),
}

/// A live TCX link that runs this pin directory's gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// The kernel's link id (`bpftool link show id N`).
    pub link_id: u32,
    /// The program's id.
    pub prog_id: u32,
    /// The interface index, in the network namespace of the interface.
    pub ifindex: u32,
    /// The interface: the name of the link's pin, else the name of `ifindex` in this
    /// process's network namespace (if it has one).
    pub iface: Option<String>,
    /// Whether the link is pinned (it outlives the daemon).
    pub pinned: bool,
}

impl Attachment {
    /// How `kernel status` names it: `eth0 (tcx link 12, pinned)`.
    pub fn describe(&self) -> String {
        let name = self
            .iface
            .clone()
            .unwrap_or_else(|| format!("ifindex {}", self.ifindex));
        let pinned = if self.pinned {
            "pinned"
        } else {
            "held by a process, not pinned"
        };
        format!("{name} (tcx link {}, {pinned})", self.link_id)
    }
}

/// What an operator asked for: the gate off everywhere, or on some interfaces.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Detached {
    /// Detached from every interface.
    pub all: bool,
    /// Detached from these interfaces.
    pub ifaces: BTreeSet<String>,
}

impl Detached {
    /// Whether `iface` is off.
    pub fn covers(&self, iface: &str) -> bool {
        self.all || self.ifaces.contains(iface)
    }

    /// Nothing is off.
    pub fn is_empty(&self) -> bool {
        !self.all && self.ifaces.is_empty()
    }
}

/// Where the gate of a pin directory runs, and what is left over.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// Live TCX links running the gate.
    pub live: Vec<Attachment>,
    /// Pinned links that run nothing any more (their interface was deleted, or they were
    /// detached): the interface of each pin.
    pub stale_pins: Vec<String>,
    /// The operator's detach markers.
    pub detached: Detached,
}

/// Where the TCX link of `iface` is pinned.
pub fn link_pin(pin_dir: &Path, iface: &str) -> PathBuf {
    pin_dir.join(format!("{LINK_PREFIX}{iface}"))
}

/// Interfaces with a pinned link under `pin_dir`, sorted (live or stale).
pub fn pinned_interfaces(pin_dir: &Path) -> std::io::Result<Vec<String>> {
    let mut ifaces: Vec<String> = std::fs::read_dir(pin_dir)?
        .filter_map(|e| {
            let name = e.ok()?.file_name();
            name.to_str()?.strip_prefix(LINK_PREFIX).map(str::to_owned)
        })
        .collect();
    ifaces.sort();
    Ok(ifaces)
}

/// The operator's detach markers under `pin_dir` (none when it does not exist).
pub fn detached(pin_dir: &Path) -> Detached {
    let mut d = Detached::default();
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return d;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if name == DETACHED_ALL {
            d.all = true;
        } else if let Some(iface) = name.strip_prefix(DETACHED_PREFIX) {
            d.ifaces.insert(iface.to_owned());
        }
    }
    d
}

/// Whether an interface of this name exists in this process's network namespace.
pub fn interface_exists(iface: &str) -> bool {
    sys::if_nametoindex(iface).is_some()
}

/// Ids of the loaded `gate` programs that use the maps pinned in `pin_dir`: the program of
/// the daemon (or the last one) that pinned them, and no other daemon's.
pub fn gate_programs(pin_dir: &Path) -> Result<BTreeSet<u32>, AttachmentError> {
    let config = pin_dir.join(enforcer_common::names::CONFIG_MAP);
    if !config.exists() {
        return Err(AttachmentError::NotPinned(pin_dir.display().to_string()));
    }
    let map_err = |source| AttachmentError::Map {
        path: pin_dir.display().to_string(),
        source,
    };
    let config_id = aya::maps::MapData::from_pin(&config)
        .and_then(|m| m.info())
        .map_err(map_err)?
        .id();
    Ok(aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str() == Some(enforcer_common::names::GATE_PROGRAM))
        .filter(|p| {
            p.map_ids()
                .ok()
                .flatten()
                .is_some_and(|ids| ids.contains(&config_id))
        })
        .map(|p| p.id())
        .collect())
}

/// A pinned link and what the kernel says about it.
struct Pinned {
    iface: String,
    fd: std::os::fd::OwnedFd,
    info: sys::LinkInfo,
}

fn pinned_links(pin_dir: &Path) -> Result<Vec<Pinned>, AttachmentError> {
    let ifaces = pinned_interfaces(pin_dir).map_err(|source| AttachmentError::Dir {
        what: "reading",
        path: pin_dir.display().to_string(),
        source,
    })?;
    let mut links = Vec::new();
    for iface in ifaces {
        let path = link_pin(pin_dir, &iface);
        let link_err = |source| AttachmentError::Link {
            what: format!("opening the pinned link {}", path.display()),
            source,
        };
        let fd = match sys::obj_get(&path) {
            Ok(fd) => fd,
            // Unpinned since the listing: a daemon following the operator's marker (or another
            // `kernel detach`) got there first.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(link_err(e)),
        };
        let info = sys::link_info(&fd).map_err(link_err)?;
        links.push(Pinned { iface, fd, info });
    }
    Ok(links)
}

/// Live TCX links of `programs`, except those in `skip`: `(fd, info)`.
fn other_links(
    programs: &BTreeSet<u32>,
    skip: &BTreeSet<u32>,
) -> Result<Vec<(std::os::fd::OwnedFd, sys::LinkInfo)>, AttachmentError> {
    let mut out = Vec::new();
    let mut id = 0;
    loop {
        id = match sys::link_next_id(id) {
            Ok(Some(next)) => next,
            Ok(None) => break,
            Err(source) => {
                return Err(AttachmentError::Link {
                    what: "listing the kernel's bpf links".into(),
                    source,
                });
            }
        };
        if skip.contains(&id) {
            continue;
        }
        // A link may go away between listing and opening it.
        let Ok(fd) = sys::link_fd_by_id(id) else {
            continue;
        };
        let Ok(info) = sys::link_info(&fd) else {
            continue;
        };
        if info.is_live_tcx() && programs.contains(&info.prog_id) {
            out.push((fd, info));
        }
    }
    Ok(out)
}

/// Where the gate pinned at `pin_dir` runs now (asked of the kernel), its stale pins and the
/// operator's markers.
pub fn status(pin_dir: &Path) -> Result<Status, AttachmentError> {
    let programs = gate_programs(pin_dir)?;
    let mut status = Status {
        detached: detached(pin_dir),
        ..Status::default()
    };
    let mut seen = BTreeSet::new();
    for link in pinned_links(pin_dir)? {
        seen.insert(link.info.id);
        if link.info.is_live_tcx() {
            status.live.push(Attachment {
                link_id: link.info.id,
                prog_id: link.info.prog_id,
                ifindex: link.info.ifindex,
                iface: Some(link.iface),
                pinned: true,
            });
        } else {
            status.stale_pins.push(link.iface);
        }
    }
    for (_, info) in other_links(&programs, &seen)? {
        status.live.push(Attachment {
            link_id: info.id,
            prog_id: info.prog_id,
            ifindex: info.ifindex,
            iface: sys::if_indextoname(info.ifindex),
            pinned: false,
        });
    }
    Ok(status)
}

/// What [`detach`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Detachment {
    /// Live links it detached, as they were.
    pub detached: Vec<Attachment>,
    /// Stale pins it removed (their interfaces).
    pub stale_removed: Vec<String>,
}

fn check_name(iface: &str) -> Result<(), AttachmentError> {
    // IFNAMSIZ is 16 with the NUL; `/` and NUL cannot be in a name (nor in our marker).
    if iface.is_empty() || iface.len() > 15 || iface.contains(['/', '\0']) {
        return Err(AttachmentError::BadName(iface.to_owned()));
    }
    Ok(())
}

fn marker(pin_dir: &Path, iface: Option<&str>) -> PathBuf {
    match iface {
        None => pin_dir.join(DETACHED_ALL),
        Some(i) => pin_dir.join(format!("{DETACHED_PREFIX}{i}")),
    }
}

/// Switches the gate pinned at `pin_dir` off, on `iface` or everywhere: first the marker (so no
/// daemon attaches again, now or after a restart), then every live link of the gate there is
/// detached for all its holders (`BPF_LINK_DETACH`) and its pin removed, and so are stale pins.
/// A daemon holding one of the links notices at its next heartbeat and reports itself detached.
pub fn detach(pin_dir: &Path, iface: Option<&str>) -> Result<Detachment, AttachmentError> {
    if let Some(i) = iface {
        check_name(i)?;
    }
    let programs = gate_programs(pin_dir)?;
    let mark = marker(pin_dir, iface);
    match std::fs::create_dir(&mark) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(AttachmentError::Dir {
                what: "creating the detach marker",
                path: mark.display().to_string(),
                source,
            });
        }
    }
    let mut done = Detachment::default();
    let mut seen = BTreeSet::new();
    for link in pinned_links(pin_dir)? {
        seen.insert(link.info.id);
        if iface.is_some_and(|i| i != link.iface) {
            continue;
        }
        let live = link.info.is_live_tcx();
        sys::link_detach(&link.fd).map_err(|source| AttachmentError::Link {
            what: format!("detaching the link pinned for {}", link.iface),
            source,
        })?;
        unpin(&link_pin(pin_dir, &link.iface))?;
        if live {
            done.detached.push(Attachment {
                link_id: link.info.id,
                prog_id: link.info.prog_id,
                ifindex: link.info.ifindex,
                iface: Some(link.iface),
                pinned: true,
            });
        } else {
            done.stale_removed.push(link.iface);
        }
    }
    // Links of the gate without a pin (a daemon holds them): all of them, or those on `iface`
    // in this network namespace.
    let wanted = match iface {
        None => None,
        Some(i) => match sys::if_nametoindex(i) {
            Some(index) => Some(index),
            None => return Ok(done),
        },
    };
    for (fd, info) in other_links(&programs, &seen)? {
        if wanted.is_some_and(|index| index != info.ifindex) {
            continue;
        }
        sys::link_detach(&fd).map_err(|source| AttachmentError::Link {
            what: format!("detaching tcx link {}", info.id),
            source,
        })?;
        done.detached.push(Attachment {
            link_id: info.id,
            prog_id: info.prog_id,
            ifindex: info.ifindex,
            iface: sys::if_indextoname(info.ifindex),
            pinned: false,
        });
    }
    Ok(done)
}

/// Removes the operator's detach marker (of `iface`, or all of them): a running daemon attaches
/// again at its next heartbeat, a stopped one when it starts. The markers removed.
pub fn attach(pin_dir: &Path, iface: Option<&str>) -> Result<Vec<String>, AttachmentError> {
    if let Some(i) = iface {
        check_name(i)?;
    }
    let state = detached(pin_dir);
    let mut names: Vec<String> = Vec::new();
    match iface {
        None => {
            if state.all {
                names.push(DETACHED_ALL.to_owned());
            }
            names.extend(state.ifaces.iter().map(|i| format!("{DETACHED_PREFIX}{i}")));
        }
        Some(_) if state.all => return Err(AttachmentError::DetachedEverywhere),
        Some(i) => {
            if state.ifaces.contains(i) {
                names.push(format!("{DETACHED_PREFIX}{i}"));
            }
        }
    }
    for name in &names {
        let path = pin_dir.join(name);
        std::fs::remove_dir(&path).map_err(|source| AttachmentError::Dir {
            what: "removing the detach marker",
            path: path.display().to_string(),
            source,
        })?;
    }
    Ok(names)
}

/// Detaches the link pinned for `iface` for all its holders and removes the pin; whether there
/// was one. (The daemon's way out of an interface an operator switched off.)
pub fn detach_pinned(pin_dir: &Path, iface: &str) -> Result<bool, AttachmentError> {
    let path = link_pin(pin_dir, iface);
    let fd = match sys::obj_get(&path) {
        Ok(fd) => fd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(AttachmentError::Link {
                what: format!("opening the pinned link {}", path.display()),
                source,
            });
        }
    };
    sys::link_detach(&fd).map_err(|source| AttachmentError::Link {
        what: format!("detaching the link pinned for {iface}"),
        source,
    })?;
    unpin(&path)?;
    Ok(true)
}

/// Removes a link's pin. Already gone is fine: the daemon (following the operator's marker at
/// its heartbeat) and `kernel detach` race for the same pin, and whichever comes second finds
/// the link detached (`BPF_LINK_DETACH` of a detached TCX link succeeds) and the pin removed.
fn unpin(path: &Path) -> Result<(), AttachmentError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(AttachmentError::Dir {
            what: "removing the pinned link",
            path: path.display().to_string(),
            source,
        }),
    }
}

/// Whether the link pinned for `iface` runs nothing any more (its interface was deleted, or it
/// was detached); `None` without a readable pin.
pub fn pinned_link_is_stale(pin_dir: &Path, iface: &str) -> Option<bool> {
    let fd = sys::obj_get(&link_pin(pin_dir, iface)).ok()?;
    let info = sys::link_info(&fd).ok()?;
    Some(!info.is_live_tcx())
}

/// The few `bpf(2)` and interface calls aya does not expose: a link's interface
/// (`bpf_link_info.tcx`), link ids, and `BPF_LINK_DETACH`, which ends a link for every holder.
/// Layouts follow `include/uapi/linux/bpf.h`; the kernel zero-extends a shorter `bpf_attr` and
/// copies at most the `info_len` bytes asked for.
#[expect(
    unsafe_code,
    reason = "bpf(2) link commands and if_nametoindex(3) have no safe wrapper in the dependencies"
)]
mod sys {
    use std::ffi::{CStr, CString};
    use std::io;
    use std::os::fd::{AsFd, AsRawFd as _, FromRawFd as _, OwnedFd};
    use std::os::unix::ffi::OsStrExt as _;
    use std::path::Path;

    // enum bpf_cmd
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
    const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;
    const BPF_LINK_DETACH: libc::c_long = 34;
    /// `BPF_LINK_TYPE_TCX` of `enum bpf_link_type`.
    const BPF_LINK_TYPE_TCX: u32 = 11;

    /// The `obj_get` member of `union bpf_attr`.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }

    /// The `*_get_fd_by_id` / `*_get_next_id` member of `union bpf_attr`.
    #[repr(C)]
    struct ById {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }

    /// The `info` member of `union bpf_attr`.
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }

    /// The `link_detach` member of `union bpf_attr`.
    #[repr(C)]
    struct LinkDetach {
        link_fd: u32,
    }

    /// The head of `struct bpf_link_info` with its `tcx` member (the union starts at 16: it
    /// holds `__aligned_u64` fields).
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct LinkInfo {
        pub link_type: u32,
        pub id: u32,
        pub prog_id: u32,
        _pad: u32,
        /// `tcx.ifindex`: 0 once the link is defunct (detached, or its device deleted).
        pub ifindex: u32,
        pub attach_type: u32,
    }

    impl LinkInfo {
        /// A TCX link that still runs its program on a device.
        pub fn is_live_tcx(&self) -> bool {
            self.link_type == BPF_LINK_TYPE_TCX && self.ifindex != 0
        }
    }

    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
        // SAFETY: `attr` is a live, initialised `#[repr(C)]` prefix of `union bpf_attr` for
        // `cmd`, and its size is passed along; the kernel reads (and for some commands writes)
        // only that many bytes. Pointers inside it (paths, info buffers) outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                std::ptr::from_mut(attr).cast::<libc::c_void>(),
                std::mem::size_of::<T>() as libc::c_long,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    fn owned(fd: libc::c_long) -> io::Result<OwnedFd> {
        let fd = i32::try_from(fd).map_err(|_| io::Error::other("fd out of range"))?;
        // SAFETY: the kernel just returned this new descriptor to us; nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Opens a pinned object (`BPF_OBJ_GET`).
    pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
        let mut attr = ObjGet {
            pathname: c.as_ptr() as u64,
            bpf_fd: 0,
            file_flags: 0,
        };
        owned(bpf(BPF_OBJ_GET, &mut attr)?)
    }

    /// The next link id after `start` (`None`: no more).
    pub fn link_next_id(start: u32) -> io::Result<Option<u32>> {
        let mut attr = ById {
            id: start,
            next_id: 0,
            open_flags: 0,
        };
        match bpf(BPF_LINK_GET_NEXT_ID, &mut attr) {
            Ok(_) => Ok(Some(attr.next_id)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A descriptor of the link with this id.
    pub fn link_fd_by_id(id: u32) -> io::Result<OwnedFd> {
        let mut attr = ById {
            id,
            next_id: 0,
            open_flags: 0,
        };
        owned(bpf(BPF_LINK_GET_FD_BY_ID, &mut attr)?)
    }

    /// What the kernel says about a link.
    pub fn link_info(fd: &impl AsFd) -> io::Result<LinkInfo> {
        let mut info = LinkInfo::default();
        let mut attr = InfoByFd {
            bpf_fd: fd.as_fd().as_raw_fd() as u32,
            info_len: std::mem::size_of::<LinkInfo>() as u32,
            info: std::ptr::from_mut(&mut info) as u64,
        };
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
        Ok(info)
    }

    /// Detaches a link for every holder (it stays open, defunct, until the last one closes).
    pub fn link_detach(fd: &impl AsFd) -> io::Result<()> {
        let mut attr = LinkDetach {
            link_fd: fd.as_fd().as_raw_fd() as u32,
        };
        bpf(BPF_LINK_DETACH, &mut attr).map(drop)
    }

    /// The index of interface `name` in this thread's network namespace.
    pub fn if_nametoindex(name: &str) -> Option<u32> {
        let c = CString::new(name).ok()?;
        // SAFETY: `c` is a NUL-terminated string that outlives the call.
        let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
        (index != 0).then_some(index)
    }

    /// The name of interface `index` in this thread's network namespace.
    pub fn if_indextoname(index: u32) -> Option<String> {
        if index == 0 {
            return None;
        }
        let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
        // SAFETY: `buf` has the IF_NAMESIZE bytes the call may write (NUL included).
        let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
        if p.is_null() {
            return None;
        }
        // SAFETY: on success the buffer holds a NUL-terminated name.
        let name = unsafe { CStr::from_ptr(buf.as_ptr()) };
        name.to_str().ok().map(str::to_owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(detached(dir.path()).is_empty());
        std::fs::create_dir(marker(dir.path(), Some("eth1"))).expect("marker");
        let d = detached(dir.path());
        assert!(d.covers("eth1") && !d.covers("eth0") && !d.all);
        std::fs::create_dir(marker(dir.path(), None)).expect("marker");
        assert!(detached(dir.path()).covers("eth0"));
        assert!(
            matches!(
                attach(dir.path(), Some("eth0")),
                Err(AttachmentError::DetachedEverywhere)
            ),
            "one interface cannot be switched on while all are off"
        );
        let removed = attach(dir.path(), None).expect("attach");
        assert_eq!(removed, ["detached", "detached-eth1"]);
        assert!(detached(dir.path()).is_empty());
        assert!(
            detached(&dir.path().join("none")).is_empty(),
            "no directory"
        );
    }

    #[test]
    fn interface_names_are_checked() {
        for bad in ["", "a/b", "0123456789abcdef"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_name("eth0").is_ok());
        assert!(interface_exists("lo"));
        assert!(!interface_exists("enf-nothing0"));
    }
}
