//! The netns harness: network namespaces, pods wired the way common CNIs
//! wire them, bpffs mounts and the agent "on a node", each a guard that
//! cleans up on drop, even after a panic. Names carry a unique suffix so
//! parallel or interrupted runs never collide.
//!
//! The suffix says which process owns the object ([`unique_suffix`]:
//! `<owner pid>x<counter>`, in hex), so what a killed run left behind can
//! be told from what a run still going owns: [`sweep_leftovers`] removes
//! the namespaces (with the processes in them) and bpffs mounts whose
//! owner is dead, and never touches a live owner's. Each process sweeps
//! once before it makes its first namespace or mount, and on SIGINT or
//! SIGTERM removes its own before dying ([`clean_up_on_signal`]): the
//! Drop guards do not run when a signal kills a process.
//!
//! Traffic only ever flows between namespaces created here; nothing is
//! connected to the root namespace.

use std::{
    fs::File,
    io::Read as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Once,
        atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// Whether this process runs as root (the demo, the benchmarks and the
/// sweep refuse to start otherwise; the privileged tests are `#[ignore]`d
/// and run by `cargo xtask test` with `--include-ignored`).
#[must_use]
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The prefix of every network namespace the harness makes.
pub const NETNS_PREFIX: &str = "sd-";
/// Where the harness mounts bpffs instances: this followed by a suffix.
pub const BPFFS_PREFIX: &str = "/run/service-dataplane-test-";

/// A unique suffix naming its owner: `<pid>x<n>`, both in hex (this
/// process's id, a per-process counter), e.g. `1f3ax2`. Short enough for
/// interface names built on it (`up<suffix><n>` stays within 15 chars for
/// any pid below 2^24 and 65,536 suffixes per process).
#[must_use]
pub fn unique_suffix() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{:x}x{:x}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// The owner's pid of a [`unique_suffix`]; `None` when `suffix` is not one
/// (such as the 6 random hex digits of older runs, whose owner is unknown).
#[must_use]
pub fn suffix_owner(suffix: &str) -> Option<u32> {
    let (pid, n) = suffix.split_once('x')?;
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
    if !hex(pid) || !hex(n) {
        return None;
    }
    u32::from_str_radix(pid, 16).ok().filter(|p| *p > 0)
}

/// The owner's pid of a harness namespace name (`sd-<what>-<suffix>`).
#[must_use]
pub fn netns_owner(name: &str) -> Option<u32> {
    let (_, suffix) = name.strip_prefix(NETNS_PREFIX)?.rsplit_once('-')?;
    suffix_owner(suffix)
}

/// Whether process `pid` still runs (a zombie, killed but not yet reaped,
/// does not). A pid reused by an unrelated process counts as running: its
/// leftovers then wait for the next sweep, never the other way round.
#[must_use]
pub fn process_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // `pid (comm) S ...`: the state follows the last ')' (comm may hold any).
    stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_some_and(|state| state != "Z")
}

/// Kills every process in namespace `name`, then deletes it (unmounting
/// its file if `ip netns del` cannot).
fn remove_netns(name: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let deleted = Command::new("ip").args(["netns", "del", name]).stderr(Stdio::null()).status();
    if !deleted.is_ok_and(|s| s.success()) {
        let file = Path::new("/run/netns").join(name);
        let _ = Command::new("umount").arg("-l").arg(&file).stderr(Stdio::null()).status();
        let _ = std::fs::remove_file(&file);
    }
}

/// Unmounts a bpffs instance (its pins go with it) and removes the
/// directory, which is then empty.
fn remove_bpffs(path: &Path) {
    let unmounted = Command::new("umount").arg(path).stderr(Stdio::null()).status();
    if !unmounted.is_ok_and(|s| s.success()) {
        let _ = Command::new("umount").arg("-l").arg(path).stderr(Stdio::null()).status();
    }
    let _ = std::fs::remove_dir(path);
}

/// Removes every harness namespace (killing the processes in it: pods'
/// servers, agents) and bpffs mount whose owner `remove` says so; returns
/// what it removed. Veths need nothing of their own: the harness makes
/// them inside its namespaces, and they go with them.
pub fn sweep(remove: impl Fn(u32) -> bool) -> Vec<String> {
    let mut removed = Vec::new();
    let mut namespaces: Vec<String> = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| netns_owner(name).is_some_and(&remove))
        .collect();
    namespaces.sort();
    for name in namespaces {
        remove_netns(&name);
        removed.push(format!("netns {name}"));
    }
    let (dir, prefix) = BPFFS_PREFIX.rsplit_once('/').unwrap_or(("/run", BPFFS_PREFIX));
    let mut mounts: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name().to_str().and_then(|n| n.strip_prefix(prefix)).and_then(suffix_owner).is_some_and(&remove)
        })
        .map(|e| e.path())
        .collect();
    mounts.sort();
    for path in mounts {
        remove_bpffs(&path);
        removed.push(format!("bpffs {}", path.display()));
    }
    let mut cgroups: Vec<PathBuf> = cgroup_parent()
        .and_then(|dir| std::fs::read_dir(dir).ok())
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix(CGROUP_PREFIX))
                .and_then(suffix_owner)
                .is_some_and(&remove)
        })
        .map(|e| e.path())
        .collect();
    cgroups.sort();
    for path in cgroups {
        // Empty once its clients are gone (they die with their namespace).
        if std::fs::remove_dir(&path).is_ok() {
            removed.push(format!("cgroup {}", path.display()));
        }
    }
    removed
}

/// Name prefix of the cgroups the harness creates (`cgroup::TestCgroup`).
pub const CGROUP_PREFIX: &str = "sd-sock-";

/// Where the harness creates its cgroups: this process's own cgroup (v2).
#[must_use]
pub fn cgroup_parent() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = service_agent::attach::socket::cgroup2_mount(&mountinfo)?;
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let own = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(mount.join(own.trim_start_matches('/')))
}

/// Removes what runs killed before they could clean up left behind: the
/// harness namespaces and bpffs mounts whose owner process is dead.
#[must_use = "the names of what was removed, to report"]
pub fn sweep_leftovers() -> Vec<String> {
    let own = std::process::id();
    sweep(|pid| pid != own && !process_alive(pid))
}

/// Set once a SIGINT/SIGTERM is being handled: no new namespace or mount.
static TERMINATING: AtomicBool = AtomicBool::new(false);
/// The write end of the pipe the signal handler writes the signal to.
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(signal: libc::c_int) {
    let byte = u8::try_from(signal).unwrap_or(0);
    // SAFETY: write(2) is async-signal-safe; the fd stays open for the
    // process's lifetime (it is never closed).
    unsafe { libc::write(SIGNAL_PIPE.load(Ordering::Relaxed), (&raw const byte).cast(), 1) };
}

/// Installs (once per process) SIGINT and SIGTERM handlers that remove
/// everything this process made through the harness (its namespaces, the
/// processes in them, its bpffs mounts: what the Drop guards would have
/// removed) and then end the process with that signal. A handler may only
/// do async-signal-safe things, so it wakes a thread that does the work.
///
/// # Panics
/// When the pipe or the handlers cannot be set up.
pub fn clean_up_on_signal() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
        SIGNAL_PIPE.store(fds[1], Ordering::Relaxed);
        // SAFETY: fds[0] is a fresh descriptor that only this File owns.
        let mut read_end = unsafe { File::from_raw_fd(fds[0]) };
        std::thread::Builder::new()
            .name("netns-signal-cleanup".into())
            .spawn(move || {
                let mut byte = [0u8];
                if read_end.read_exact(&mut byte).is_err() {
                    return;
                }
                let signal = libc::c_int::from(byte[0]);
                TERMINATING.store(true, Ordering::SeqCst);
                let own = std::process::id();
                let mut removed = sweep(|pid| pid == own);
                // A namespace another thread was making while the first
                // sweep listed them.
                std::thread::sleep(Duration::from_millis(200));
                removed.extend(sweep(|pid| pid == own));
                eprintln!("signal {signal}: removed {} namespaces and mounts of this run", removed.len());
                // SAFETY: back to the default action, then the signal
                // again: the process ends as the signal says (the exit
                // status tells the parent it was signalled).
                unsafe {
                    libc::signal(signal, libc::SIG_DFL);
                    libc::raise(signal);
                }
            })
            .expect("spawning the signal cleanup thread");
        for signal in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: a zeroed sigaction with a handler that only calls
            // write(2); sa_mask empty, SA_RESTART so interrupted system
            // calls of other threads resume.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
                action.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&raw mut action.sa_mask);
                let rc = libc::sigaction(signal, &raw const action, std::ptr::null_mut());
                assert_eq!(rc, 0, "sigaction: {}", std::io::Error::last_os_error());
            }
        }
    });
}

/// What every harness object does before it is made: once per process,
/// sweep what killed runs left and install the signal cleanup; refuse
/// once a signal is being handled.
fn before_making() -> Result<()> {
    static START: Once = Once::new();
    START.call_once(|| {
        for what in sweep_leftovers() {
            eprintln!("removed a leftover of a killed run: {what}");
        }
        clean_up_on_signal();
    });
    if TERMINATING.load(Ordering::SeqCst) {
        bail!("terminating on a signal");
    }
    Ok(())
}

/// Runs a command, failing with its stderr when it fails.
///
/// # Errors
/// When the command cannot start or exits non-zero.
pub fn run(program: &str, args: &[&str]) -> Result<Output> {
    let out = Command::new(program).args(args).output().with_context(|| format!("starting {program}"))?;
    if !out.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}

/// Polls `f` every `poll` until it returns `Some`, for at most `timeout`.
///
/// # Errors
/// When the deadline passes first.
pub fn wait_until<T>(timeout: Duration, poll: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("condition not met within {timeout:?}");
        }
        std::thread::sleep(poll);
    }
}

/// A built binary: `$ENV` when set (xtask sets them), else next to the
/// running test executable (`target/<profile>/deps/..`).
#[must_use]
pub fn binary(name: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let dir = if dir.ends_with("deps") { dir.parent().map(Path::to_path_buf).unwrap_or_default() } else { dir };
    dir.join(name)
}

/// A child process killed (and reaped) on drop.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A network namespace, deleted on drop together with every process in it.
pub struct Netns {
    name: String,
}

impl Netns {
    /// # Errors
    /// When `ip netns add` fails.
    pub fn new(name: &str) -> Result<Self> {
        before_making()?;
        run("ip", &["netns", "add", name])?;
        let ns = Self { name: name.to_owned() };
        ns.ip(&["link", "set", "lo", "up"])?;
        ns.no_dad()?;
        Ok(ns)
    }

    /// Turns IPv6 duplicate address detection off for every interface made
    /// here from now on (`default`) and those already here (`all`): an
    /// address is usable the moment it is added, link-local ones included,
    /// instead of "tentative" for a second or more (the harness's names and
    /// addresses are unique by construction; there is nothing to detect).
    /// Written through /proc/sys from a thread inside the namespace (each
    /// namespace has its own `net` sysctls), without a process per key.
    fn no_dad(&self) -> Result<()> {
        self.run_in(|| {
            for conf in ["all", "default"] {
                for (key, value) in [("accept_dad", "0"), ("dad_transmits", "0")] {
                    let path = format!("/proc/sys/net/ipv6/conf/{conf}/{key}");
                    std::fs::write(&path, value).with_context(|| format!("writing {path}"))?;
                }
            }
            Ok(())
        })
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    #[must_use]
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip -n NAME ARGS...`
    ///
    /// # Errors
    /// When the command fails.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs `program args...` inside the namespace and waits for it.
    ///
    /// # Errors
    /// When it cannot start.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output> {
        Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output()
            .with_context(|| format!("running {program} in {}", self.name))
    }

    /// Sets a sysctl inside the namespace.
    ///
    /// # Errors
    /// When it fails.
    pub fn sysctl(&self, key_value: &str) -> Result<()> {
        let out = self.exec("sysctl", &["-qw", key_value])?;
        if !out.status.success() {
            bail!("sysctl {key_value} in {}: {}", self.name, String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Starts `program args...` inside the namespace, stdout piped.
    ///
    /// # Errors
    /// When it cannot start.
    pub fn spawn(&self, program: &Path, args: &[&str]) -> Result<ChildGuard> {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {} in {}", program.display(), self.name))?;
        Ok(ChildGuard(child))
    }

    /// Runs `f` on a fresh thread that has joined this namespace, so real
    /// sockets opened there live in it (a socket keeps its namespace).
    ///
    /// # Panics
    /// When the namespace cannot be entered or `f` panics.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(move || {
                let file = File::open(&path).expect("open netns");
                // SAFETY: setns on a valid namespace fd affects only this
                // thread (CLONE_NEWNET on a single thread is allowed).
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("thread in netns panicked")
        })
    }
}

impl Netns {
    /// Like [`Self::run_in`], on a background thread the caller joins.
    ///
    /// # Panics
    /// The thread panics when the namespace cannot be entered.
    #[must_use]
    pub fn spawn_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        let path = self.path();
        std::thread::spawn(move || {
            let file = File::open(&path).expect("open netns");
            // SAFETY: as in run_in: this thread only.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        remove_netns(&self.name);
    }
}

/// A fresh BPF filesystem mounted at a unique directory under /run, so a
/// test's pins never meet another's; unmounted and removed on drop.
pub struct BpffsMount {
    path: PathBuf,
}

impl BpffsMount {
    /// # Errors
    /// When the directory or the mount cannot be made.
    pub fn new() -> Result<Self> {
        before_making()?;
        let path = PathBuf::from(format!("{BPFFS_PREFIX}{}", unique_suffix()));
        std::fs::create_dir_all(&path)?;
        if let Err(e) = run("mount", &["-t", "bpf", "bpf", &path.to_string_lossy()]) {
            let _ = std::fs::remove_dir(&path);
            return Err(e);
        }
        Ok(Self { path })
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BpffsMount {
    fn drop(&mut self) {
        remove_bpffs(&self.path);
    }
}

/// The gateway address pods route through (as Calico does); the node
/// answers for it through a static neighbour entry in each pod.
pub const POD_GATEWAY: &str = "169.254.1.1";
/// The IPv6 gateway of pods: a link-local address on `eth0` (an IPv6
/// gateway must be on-link), answered the same way (Calico's IPv6 pods
/// route through a link-local gateway too).
pub const POD_GATEWAY6: &str = "fe80::1";

/// The IPv6 twin of an IPv4 address of the test topology:
/// `a.b.c.d` → `fd00:a:b:c::d`, each decimal octet written as the hex
/// group that reads the same (10.244.1.11 → fd00:10:244:1::11,
/// 192.168.100.12 → fd00:192:168:100::12, 10.96.0.10 → fd00:10:96::10), in
/// the ULA range. Every pod, node and client gets the twin of its IPv4
/// address, so a test names one plan and gets both families, and an
/// address read in either family says which host it is.
#[must_use]
pub fn ipv6_twin(v4: Ipv4Addr) -> Ipv6Addr {
    // A decimal octet (0..=255) read as hex is at most 0x255: fits a group.
    let group = |octet: u8| u16::from_str_radix(&octet.to_string(), 16).unwrap_or(0);
    let [a, b, c, d] = v4.octets();
    Ipv6Addr::new(0xfd00, group(a), group(b), group(c), 0, 0, 0, group(d))
}

/// An address family of the dual-stack topology, to run one test body in
/// both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

impl Family {
    /// Both families, IPv4 first.
    pub const BOTH: [Self; 2] = [Self::V4, Self::V6];

    /// The address of the host whose IPv4 address is `v4`, in this family
    /// (its [`ipv6_twin`] in IPv6).
    #[must_use]
    pub fn addr(self, v4: Ipv4Addr) -> IpAddr {
        match self {
            Self::V4 => IpAddr::V4(v4),
            Self::V6 => IpAddr::V6(ipv6_twin(v4)),
        }
    }

    /// The unspecified address of this family (to bind a client socket).
    #[must_use]
    pub fn unspecified(self) -> IpAddr {
        match self {
            Self::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Self::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        }
    }

    /// The prefix length of a single host: /32 or /128.
    #[must_use]
    pub fn host_prefix(self) -> u8 {
        match self {
            Self::V4 => 32,
            Self::V6 => 128,
        }
    }
}

/// `http://ADDR:PORT/`, the IPv6 address in brackets.
#[must_use]
pub fn http_url(addr: IpAddr, port: u16) -> String {
    format!("http://{}/", std::net::SocketAddr::new(addr, port))
}

/// A pod: its namespace, addresses (IPv4 and its [`ipv6_twin`]) and the
/// host-side interface in the node.
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub host_if: String,
    pub ns: Netns,
}

impl Pod {
    /// The pod's address in `family`.
    #[must_use]
    pub fn addr(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => IpAddr::V4(self.ip),
            Family::V6 => IpAddr::V6(self.ip6),
        }
    }
}

/// One node namespace and its pods.
pub struct Topology {
    pub suffix: String,
    pub pods: Vec<Pod>,
    pub node: Netns,
    next_if: u32,
}

impl Topology {
    /// A node namespace that forwards between its pods, in both families.
    ///
    /// # Errors
    /// When a namespace or sysctl fails.
    pub fn new() -> Result<Self> {
        let suffix = unique_suffix();
        let node = Netns::new(&format!("sd-node-{suffix}"))?;
        for kv in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv6.conf.all.forwarding=1",
        ] {
            node.sysctl(kv)?;
        }
        Ok(Self { suffix, pods: Vec::new(), node, next_if: 0 })
    }

    /// Adds a pod with `ip` and its [`ipv6_twin`]: a namespace with `eth0`
    /// (/32 and /128 addresses, default routes via [`POD_GATEWAY`] and
    /// [`POD_GATEWAY6`], both answered by the host side's MAC through static
    /// neighbour entries), its peer `veth<n>` in the node with a /32 and a
    /// /128 route to the pod (made in the node's namespace, so unique there
    /// is unique enough, and short whatever the suffix). The node finds the
    /// pod's MAC by ARP and neighbour discovery, as with a CNI.
    ///
    /// # Errors
    /// When an `ip` command fails.
    ///
    /// # Panics
    /// Never: the pod was just pushed.
    pub fn add_pod(&mut self, name: &str, ip: Ipv4Addr) -> Result<&Pod> {
        self.next_if += 1;
        let ns = Netns::new(&format!("sd-{name}-{}", self.suffix))?;
        let host_if = format!("veth{}", self.next_if);
        run(
            "ip",
            &[
                "link",
                "add",
                &host_if,
                "netns",
                self.node.name(),
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns.name(),
            ],
        )?;
        self.node.ip(&["link", "set", &host_if, "up"])?;
        let addr = format!("{ip}/32");
        ns.ip(&["addr", "add", &addr, "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", POD_GATEWAY, "dev", "eth0"])?;
        ns.ip(&["route", "add", "default", "via", POD_GATEWAY])?;
        let mac = self.node.ip(&["-br", "link", "show", &host_if])?;
        let mac = String::from_utf8_lossy(&mac.stdout)
            .split_whitespace()
            .nth(2)
            .map(str::to_owned)
            .context("host interface MAC")?;
        ns.ip(&["neigh", "add", POD_GATEWAY, "lladdr", &mac, "dev", "eth0", "nud", "permanent"])?;
        self.node.ip(&["route", "add", &addr, "dev", &host_if])?;
        let ip6 = ipv6_twin(ip);
        let addr6 = format!("{ip6}/128");
        ns.ip(&["-6", "addr", "add", &addr6, "dev", "eth0", "nodad"])?;
        ns.ip(&["-6", "neigh", "add", POD_GATEWAY6, "lladdr", &mac, "dev", "eth0", "nud", "permanent"])?;
        ns.ip(&["-6", "route", "add", "default", "via", POD_GATEWAY6, "dev", "eth0"])?;
        self.node.ip(&["-6", "route", "add", &addr6, "dev", &host_if])?;
        self.pods.push(Pod { name: name.to_owned(), ip, ip6, host_if, ns });
        Ok(self.pods.last().expect("just pushed"))
    }

    /// The pod called `name`.
    ///
    /// # Panics
    /// When there is none.
    #[must_use]
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name}"))
    }
}

/// The agent running on a node (`nsenter --net`, not `ip netns exec`, which
/// would give it a private /sys and lose its pins). SIGTERM on drop, then
/// SIGKILL if it does not exit within 10 s.
pub struct Agent {
    child: Option<Child>,
    log: PathBuf,
    bpffs_root: PathBuf,
}

impl Agent {
    /// Starts `service-agent run --manifests DIR` on `node` with `extra`
    /// appended.
    ///
    /// # Errors
    /// When it cannot start.
    pub fn start(node: &Netns, manifests: &Path, node_name: &str, bpffs_root: &Path, extra: &[&str]) -> Result<Self> {
        let manifests = manifests.to_string_lossy();
        let mut args = vec!["--manifests", manifests.as_ref()];
        args.extend_from_slice(extra);
        Self::start_with(node, &args, node_name, bpffs_root)
    }

    /// Starts `service-agent run ARGS --node-name NAME --bpffs-root ROOT`
    /// on `node` (ARGS choose the source: `--manifests DIR` or
    /// `--kubeconfig FILE`).
    ///
    /// # Errors
    /// When it cannot start.
    pub fn start_with(node: &Netns, args: &[&str], node_name: &str, bpffs_root: &Path) -> Result<Self> {
        let log = std::env::temp_dir().join(format!("service-agent-{}-{}.log", node.name(), unique_suffix()));
        let file = File::create(&log)?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", node.path().display()))
            .arg(binary("service-agent", "SERVICE_AGENT_BIN"))
            .args(["--log-format", "text", "run"])
            .args(args)
            // Never the machine's cgroups: a test that wants socket-level
            // load balancing gives its own cgroup (`--cgroup-root`).
            .args(if args.iter().any(|a| a.starts_with("--socket-lb")) { &[][..] } else { &["--socket-lb", "off"][..] })
            .args(["--node-name", node_name, "--bpffs-root"])
            .arg(bpffs_root)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("starting service-agent")?;
        Ok(Self { child: Some(child), log, bpffs_root: bpffs_root.to_owned() })
    }

    /// The agent's process id while it runs.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the agent logged so far.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle` `times` times.
    ///
    /// # Errors
    /// When the agent exits or the deadline passes; the log is included.
    pub fn wait_for_log(&mut self, needle: &str, times: usize, timeout: Duration) -> Result<()> {
        let res = wait_until(timeout, Duration::from_millis(20), || {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Some(Err(anyhow::anyhow!("agent exited with {status}")));
            }
            (self.log().matches(needle).count() >= times).then_some(Ok(()))
        });
        match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) | Err(e) => bail!("waiting for {needle:?} x{times}: {e}\nagent log:\n{}", self.log()),
        }
    }

    /// Kills the agent with SIGKILL (no cleanup of its own) and reaps it.
    ///
    /// # Errors
    /// When it was already stopped.
    pub fn kill(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else { bail!("agent already stopped") };
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Sends SIGTERM and waits (10 s at most) for a clean exit.
    ///
    /// # Errors
    /// When it had to be killed or exited unsuccessfully.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        let Some(mut child) = self.child.take() else { bail!("agent already stopped") };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(i32::try_from(child.id()).unwrap_or(0), libc::SIGTERM) };
        let exited = wait_until(Duration::from_secs(10), Duration::from_millis(20), || child.try_wait().ok().flatten());
        if let Ok(status) = exited {
            return Ok(status);
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("agent did not exit within 10 s of SIGTERM")
    }
}

/// `service-agent cleanup --bpffs-root ROOT`: removes every link and pin
/// an agent left there.
///
/// # Errors
/// When it cannot run or fails.
pub fn cleanup(bpffs_root: &Path) -> Result<()> {
    let out = Command::new(binary("service-agent", "SERVICE_AGENT_BIN"))
        .args(["cleanup", "--bpffs-root"])
        .arg(bpffs_root)
        .output()
        .context("running service-agent cleanup")?;
    if !out.status.success() {
        bail!("service-agent cleanup: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
        // Whatever the test did to the agent (SIGKILL, --keep-on-exit), no
        // link or pin outlives it.
        if self.bpffs_root.exists() {
            let _ = cleanup(&self.bpffs_root);
        }
        if std::thread::panicking() {
            eprintln!("agent log kept at {}", self.log.display());
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// Two privileged tests running the test body `$body(family: Family)`, one
/// per family of the dual-stack topology: `$body::ipv4` and `$body::ipv6`
/// (a module of the body's name beside it: modules and functions do not
/// share a namespace), so one body states what a test checks in both.
#[macro_export]
macro_rules! in_both_families {
    ($($body:ident),+ $(,)?) => {$(
        mod $body {
            #[test]
            #[ignore = "needs root: run by `cargo xtask test`"]
            fn ipv4() {
                super::$body($crate::netns::Family::V4);
            }

            #[test]
            #[ignore = "needs root: run by `cargo xtask test`"]
            fn ipv6() {
                super::$body($crate::netns::Family::V6);
            }
        }
    )+};
}
