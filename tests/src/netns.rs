//! Network namespaces and veth pairs for the kernel tests, deleted on drop (even on panic).
use std::process::Command;

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("iproute2 is installed");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A named network namespace (`/var/run/netns/<name>`).
#[derive(Debug)]
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// Creates it, with loopback up.
    pub fn new(name: &str) -> Self {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name]);
        let ns = Self {
            name: name.to_owned(),
        };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// `/var/run/netns/<name>`, for `nsenter --net=`.
    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// A command run inside the namespace. `nsenter`, not `ip netns exec`: the latter remounts
    /// /sys and hides bpffs.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path())).arg(program);
        c
    }

    /// Runs a command inside the namespace and asserts it succeeded; returns stdout.
    pub fn exec(&self, argv: &[&str]) -> String {
        let out = self
            .command(argv[0])
            .args(&argv[1..])
            .output()
            .expect("nsenter runs");
        assert!(
            out.status.success(),
            "{argv:?} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` on a thread that has entered this namespace (aya and sockets then act in it).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            enter_path(&path);
            f()
        })
        .join()
        .expect("netns thread panicked")
    }
}

/// Moves the calling thread into the network namespace at `path` (`/var/run/netns/<name>`).
pub fn enter_path(path: &str) {
    let file = std::fs::File::open(path).expect("open netns");
    enter(&file);
}

#[expect(
    unsafe_code,
    reason = "setns(2) has no safe wrapper in the dependencies"
)]
fn enter(file: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: `file` is an open namespace file; setns only changes this thread's namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace also deletes the veth ends inside it (and so their peers).
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Two namespaces joined by a veth pair: `a` (10.77.0.1/24) and `b` (10.77.0.2/24).
#[derive(Debug)]
pub struct Link {
    pub a: NetNs,
    pub b: NetNs,
    pub a_if: String,
    pub b_if: String,
}

pub const A_ADDR: &str = "10.77.0.1";
pub const B_ADDR: &str = "10.77.0.2";

impl Link {
    /// Creates both namespaces and the veth between them. `tag` keeps names unique (≤ 6 chars).
    pub fn new(tag: &str) -> Self {
        let a = NetNs::new(&format!("enf-{tag}-a"));
        let b = NetNs::new(&format!("enf-{tag}-b"));
        let a_if = format!("ve{tag}a");
        let b_if = format!("ve{tag}b");
        ip(&[
            "link", "add", &a_if, "netns", &a.name, "type", "veth", "peer", "name", &b_if, "netns",
            &b.name,
        ]);
        a.exec(&["ip", "addr", "add", &format!("{A_ADDR}/24"), "dev", &a_if]);
        b.exec(&["ip", "addr", "add", &format!("{B_ADDR}/24"), "dev", &b_if]);
        a.exec(&["ip", "link", "set", &a_if, "up"]);
        b.exec(&["ip", "link", "set", &b_if, "up"]);
        Self { a, b, a_if, b_if }
    }
}
