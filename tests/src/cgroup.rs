//! A cgroup (v2) a test creates under its own, for the socket-level
//! programs to be attached to and its clients to run in: never the test
//! runner's own cgroup or the machine's root. Removed on drop.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result};

use crate::netns::{CGROUP_PREFIX, ChildGuard, Netns, binary, cgroup_parent, unique_suffix};

pub struct TestCgroup(PathBuf);

impl TestCgroup {
    /// A new cgroup `sd-sock-<suffix>` below this process's own cgroup
    /// (swept like the harness's namespaces when a run is killed).
    ///
    /// # Errors
    /// When no cgroup2 filesystem is mounted or the directory cannot be
    /// created.
    pub fn new() -> Result<Self> {
        let parent = cgroup_parent().context("no cgroup2 filesystem, or no cgroup2 line in /proc/self/cgroup")?;
        let dir = parent.join(format!("{CGROUP_PREFIX}{}", unique_suffix()));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Runs `sock-client MODE ADDR` in `ns`, inside this cgroup; its output
    /// lines (an `error: …` line when the call failed).
    ///
    /// # Errors
    /// When the client cannot be started.
    pub fn sock_client(&self, ns: &Netns, mode: &str, addr: &str) -> Result<Vec<String>> {
        self.sock_client_with(ns, &[mode, addr])
    }

    /// Runs `sock-client ARGS` in `ns`, inside this cgroup; its output
    /// lines.
    ///
    /// # Errors
    /// When the client cannot be started.
    pub fn sock_client_with(&self, ns: &Netns, args: &[&str]) -> Result<Vec<String>> {
        let out = self.sock_client_command(ns, args).output().context("starting sock-client")?;
        Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect())
    }

    /// Starts `sock-client ARGS` in `ns`, inside this cgroup, stdout piped:
    /// a client that runs while the test changes things around it.
    ///
    /// # Errors
    /// When the client cannot be started.
    pub fn spawn_sock_client(&self, ns: &Netns, args: &[&str]) -> Result<ChildGuard> {
        let child = self
            .sock_client_command(ns, args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting sock-client")?;
        Ok(ChildGuard(child))
    }

    /// `sock-client ARGS` run by a shell that first moves itself into this
    /// cgroup, then enters `ns`'s network namespace.
    fn sock_client_command(&self, ns: &Netns, args: &[&str]) -> Command {
        let mut command = Command::new("sh");
        command
            .args([
                "-c",
                r#"cg=$1; ns=$2; shift 2; echo $$ > "$cg/cgroup.procs" && exec nsenter "--net=$ns" "$@""#,
                "sh",
            ])
            .arg(&self.0)
            .arg(ns.path())
            .arg(binary("sock-client", "SOCK_CLIENT_BIN"))
            .args(args);
        command
    }
}

/// Reads lines of a held client ([`TestCgroup::spawn_sock_client`]) until
/// one starting with `prefix`.
///
/// # Panics
/// When the output ends first, or cannot be read.
pub fn line_starting(lines: &mut impl Iterator<Item = std::io::Result<String>>, prefix: &str) -> String {
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.expect("client output");
        if line.starts_with(prefix) {
            return line;
        }
        seen.push(line);
    }
    panic!("no {prefix:?} line in {seen:?}");
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Its processes have exited (each client is waited for); a cgroup
        // with none is removed with rmdir.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
