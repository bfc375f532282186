//! Leftovers of killed runs (root): a namespace and a bpffs mount whose
//! owner process is dead are swept, a live owner's are kept; and a process
//! of the harness that gets SIGTERM removes what it made before it dies.

use std::{
    io::{BufRead as _, BufReader},
    os::unix::process::ExitStatusExt as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use service_tests::netns::{
    BPFFS_PREFIX, BpffsMount, ChildGuard, Topology, netns_owner, process_alive, run, suffix_owner, sweep,
    sweep_leftovers, unique_suffix, wait_until,
};

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn mounted(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts").unwrap_or_default().lines().any(|l| l.split(' ').nth(1) == Some(path))
}

#[test]
fn names_say_their_owner() {
    let suffix = unique_suffix();
    assert_eq!(suffix_owner(&suffix), Some(std::process::id()), "{suffix}");
    assert_eq!(netns_owner(&format!("sd-node-{suffix}")), Some(std::process::id()));
    assert_eq!(netns_owner(&format!("sd-pod-with-dashes-{suffix}")), Some(std::process::id()));
    // Older runs' random suffixes and other namespaces: owner unknown,
    // never swept.
    for name in ["sd-node-a1b2c3", "sd-node-", "cni-1234x1", "sd-node-12x", "sd-node-x1", "sd-node-zzx1", "sd-node-0x1"]
    {
        assert_eq!(netns_owner(name), None, "{name}");
    }
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn leftovers_of_a_dead_owner_are_swept_and_a_live_owners_kept() {
    // A process that has exited (and been reaped): the owner of a run
    // that was killed. And one that runs: the owner of a parallel run.
    let mut gone = Command::new("true").spawn().expect("true");
    let dead = gone.id();
    gone.wait().expect("wait");
    assert!(!process_alive(dead));
    let live = ChildGuard(Command::new("sleep").arg("600").spawn().expect("sleep"));
    let live_pid = live.0.id();
    assert!(process_alive(live_pid));

    // What a killed run leaves: a namespace with a veth and a process in
    // it, and a bpffs mount, all named after their dead owner.
    let dead_ns = format!("sd-leftover-{dead:x}x0");
    let live_ns = format!("sd-leftover-{live_pid:x}x0");
    let dead_mount = format!("{BPFFS_PREFIX}{dead:x}x0");
    let live_mount = format!("{BPFFS_PREFIX}{live_pid:x}x0");
    for (ns, mount) in [(&dead_ns, &dead_mount), (&live_ns, &live_mount)] {
        run("ip", &["netns", "add", ns]).expect("netns add");
        run("ip", &["-n", ns, "link", "add", "veth1", "type", "veth", "peer", "name", "eth0"]).expect("veth");
        std::fs::create_dir_all(mount).expect("mkdir");
        run("mount", &["-t", "bpf", "bpf", mount]).expect("mount bpffs");
    }
    let mut inside = Command::new("ip")
        .args(["netns", "exec", &dead_ns, "sleep", "600"])
        .stdin(Stdio::null())
        .spawn()
        .expect("a process in the namespace");
    wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
        let pids = Command::new("ip").args(["netns", "pids", &dead_ns]).output().ok()?;
        (!pids.stdout.is_empty()).then_some(())
    })
    .expect("the process runs in the namespace");

    // (Another run's harness may sweep them first: what is checked is
    // what is left, not who removed it.)
    let removed = sweep_leftovers();

    assert!(!removed.iter().any(|r| r.contains(&format!("{live_pid:x}x0"))), "{removed:?}");
    assert!(!netns_exists(&dead_ns));
    assert!(!mounted(&dead_mount) && !Path::new(&dead_mount).exists());
    let status = wait_until(Duration::from_secs(5), Duration::from_millis(20), || inside.try_wait().ok().flatten())
        .expect("the process in the namespace is killed");
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    // The live owner's are untouched.
    assert!(netns_exists(&live_ns));
    assert!(mounted(&live_mount));
    run("ip", &["-n", &live_ns, "link", "show", "veth1"]).expect("its veth is still there");

    let removed = sweep(|pid| pid == live_pid);
    assert_eq!(removed.len(), 2, "{removed:?}");
    assert!(!netns_exists(&live_ns) && !Path::new(&live_mount).exists());
}

/// Run by `sigterm_removes_what_the_process_made` in a child process: makes
/// namespaces, a pod with its veth and a bpffs mount the way a test does,
/// says so, and waits to be killed.
#[test]
#[ignore = "a helper: run by sigterm_removes_what_the_process_made"]
fn helper_holds_namespaces_until_signalled() {
    if std::env::var_os("NETNS_SWEEP_HELPER").is_none() {
        return;
    }
    let mut topo = Topology::new().expect("topology");
    topo.add_pod("p", std::net::Ipv4Addr::new(10, 244, 1, 2)).expect("pod");
    let bpffs = BpffsMount::new().expect("bpffs");
    println!("ready {} {} {}", topo.node.name(), topo.pod("p").ns.name(), bpffs.path().display());
    std::thread::sleep(Duration::from_mins(10));
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn sigterm_removes_what_the_process_made() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let exe = std::env::current_exe().expect("test binary");
        let mut child = ChildGuard(
            Command::new(exe)
                .args(["helper_holds_namespaces_until_signalled", "--exact", "--ignored", "--nocapture"])
                .env("NETNS_SWEEP_HELPER", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .spawn()
                .expect("helper"),
        );
        let stdout = child.0.stdout.take().expect("stdout");
        let ready = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.starts_with("ready "))
            .expect("the helper's ready line");
        let made: Vec<String> = ready.split_whitespace().skip(1).map(str::to_owned).collect();
        let (node, pod, mount) = (&made[0], &made[1], &made[2]);
        assert!(netns_exists(node) && netns_exists(pod) && mounted(mount), "{made:?}");
        let pid = i32::try_from(child.0.id()).expect("pid");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, signal) };
        let status =
            wait_until(Duration::from_secs(30), Duration::from_millis(20), || child.0.try_wait().ok().flatten())
                .expect("the helper exits");
        assert_eq!(status.signal(), Some(signal), "ended by the signal, after cleaning up");
        assert!(!netns_exists(node) && !netns_exists(pod), "{made:?}");
        assert!(!mounted(mount) && !Path::new(mount).exists(), "{mount}");
    }
}
