//! Pieces the end-to-end tests and the demo share: a manifest directory
//! written the way a user (or a ConfigMap update) writes it, pod-echo
//! servers, and clients run inside a pod.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use service_common::{InterfaceCounterKey, map_names, stats::Counter};

use crate::netns::{ChildGuard, Netns, binary, unique_suffix};

/// Packets counted as `counter` for interface `ifindex` in the pinned
/// `interface_stats` map under `root`, all CPUs summed (0 without a row).
///
/// # Panics
/// When the pin is missing or is not a per-CPU hash map.
#[must_use]
pub fn interface_stat(root: &Path, ifindex: u32, counter: Counter) -> u64 {
    let pin = aya::maps::MapData::from_pin(root.join(map_names::INTERFACE_STATS)).expect("pinned interface_stats");
    let map: aya::maps::PerCpuHashMap<_, InterfaceCounterKey, u64> =
        aya::maps::PerCpuHashMap::try_from(aya::maps::Map::PerCpuLruHashMap(pin)).expect("interface_stats");
    map.get(&InterfaceCounterKey { ifindex, counter: counter.id() }, 0).map_or(0, |values| values.iter().sum())
}

/// The verdict counter `name` (`service_common::stats`) of the dataplane
/// pinned under `root`, all CPUs summed, as `service-agent inspect stats`
/// reads it.
///
/// # Errors
/// When inspect fails or has no such counter.
pub fn counter(root: &Path, name: &str) -> Result<u64> {
    let out = std::process::Command::new(binary("service-agent", "SERVICE_AGENT_BIN"))
        .args(["inspect", "stats", "-o", "json", "--bpffs-root"])
        .arg(root)
        .output()
        .context("service-agent inspect")?;
    if !out.status.success() {
        bail!("service-agent inspect stats: {}", String::from_utf8_lossy(&out.stderr));
    }
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    rows.as_array()
        .and_then(|rows| rows.iter().find(|r| r["counter"] == name))
        .and_then(|r| r["packets"].as_u64())
        .with_context(|| format!("no counter {name}"))
}

/// The interface BPF_PROG_TEST_RUN runs a TC program's packets as
/// entering on: the loopback device of the calling thread's network
/// namespace.
pub const TEST_RUN_IFINDEX: u32 = 1;

/// A manifest directory, removed on drop.
pub struct ManifestDir(PathBuf);

impl ManifestDir {
    /// # Panics
    /// When the directory cannot be created.
    #[must_use]
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("e2e-manifests-{}", unique_suffix()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        Self(dir)
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `name` atomically (write + rename), so the agent never reads
    /// a half-written file.
    ///
    /// # Panics
    /// When the file cannot be written.
    pub fn write(&self, name: &str, text: &str) {
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, self.0.join(name)).expect("rename");
    }
}

impl Default for ManifestDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ManifestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts `pod-echo --name NAME ARGS...` in `ns` and waits for its "ready".
///
/// # Errors
/// When it does not start.
pub fn start_echo(ns: &Netns, name: &str, args: &[&str]) -> Result<ChildGuard> {
    let mut all = vec!["--name", name];
    all.extend_from_slice(args);
    let mut server = ns.spawn(&binary("pod-echo", "POD_ECHO_BIN"), &all)?;
    let mut line = String::new();
    BufReader::new(server.0.stdout.as_mut().context("stdout")?).read_line(&mut line)?;
    if line.trim() != "ready" {
        bail!("pod-echo {name} did not start");
    }
    Ok(server)
}

/// `curl -sS --max-time 2 URL` inside `ns`: the body, or curl's error.
///
/// # Errors
/// When curl fails (the error names curl's message).
pub fn curl(ns: &Netns, url: &str) -> Result<String> {
    let out = ns.exec("curl", &["-sS", "--max-time", "2", url])?;
    if !out.status.success() {
        bail!("curl {url}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
