//! The netns harness: network namespaces, pods wired the way common CNIs
//! wire them, bpffs mounts and the agent "on a node", each a guard that
//! cleans up on drop, even after a panic. Names carry a unique suffix so
//! parallel or interrupted runs never collide.
//!
//! Traffic only ever flows between namespaces created here; nothing is
//! connected to the root namespace.

use std::{
    fs::File,
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// Whether this process runs as root (privileged tests skip otherwise).
#[must_use]
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// True (after saying why) when not root: privileged tests then skip
/// instead of failing under a plain `cargo test`. `cargo xtask test` runs
/// them as root.
#[must_use]
pub fn skip_unless_root() -> bool {
    if is_root() {
        return false;
    }
    eprintln!("skipped: needs root (run through `cargo xtask test`)");
    true
}

/// A short unique suffix (6 hex digits): fits interface names (15 chars).
#[must_use]
pub fn unique_suffix() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let mix =
        std::process::id().wrapping_mul(2_654_435_761) ^ nanos ^ N.fetch_add(1, Ordering::Relaxed).wrapping_mul(40_503);
    format!("{:06x}", mix & 0x00ff_ffff)
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
        run("ip", &["netns", "add", name])?;
        let ns = Self { name: name.to_owned() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
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
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
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
        let path = PathBuf::from(format!("/run/service-dataplane-test-{}", unique_suffix()));
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
        let _ = Command::new("umount").arg(&self.path).status();
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// The gateway address pods route through (as Calico does); the node
/// answers for it through a static neighbour entry in each pod.
pub const POD_GATEWAY: &str = "169.254.1.1";

/// A pod: its namespace, address and the host-side interface in the node.
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    pub host_if: String,
    pub ns: Netns,
}

/// One node namespace and its pods.
pub struct Topology {
    pub suffix: String,
    pub pods: Vec<Pod>,
    pub node: Netns,
    next_if: u32,
}

impl Topology {
    /// A node namespace that forwards between its pods.
    ///
    /// # Errors
    /// When a namespace or sysctl fails.
    pub fn new() -> Result<Self> {
        let suffix = unique_suffix();
        let node = Netns::new(&format!("sd-node-{suffix}"))?;
        for kv in ["net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"] {
            node.sysctl(kv)?;
        }
        Ok(Self { suffix, pods: Vec::new(), node, next_if: 0 })
    }

    /// Adds a pod with `ip`: a namespace with `eth0` (/32 address, default
    /// route via [`POD_GATEWAY`]), its peer `veth<suffix><n>` in the node
    /// with a /32 route to the pod.
    ///
    /// # Errors
    /// When an `ip` command fails.
    ///
    /// # Panics
    /// Never: the pod was just pushed.
    pub fn add_pod(&mut self, name: &str, ip: Ipv4Addr) -> Result<&Pod> {
        self.next_if += 1;
        let ns = Netns::new(&format!("sd-{name}-{}", self.suffix))?;
        let host_if = format!("veth{}{}", self.suffix, self.next_if);
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
        self.pods.push(Pod { name: name.to_owned(), ip, host_if, ns });
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
