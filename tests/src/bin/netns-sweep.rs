//! `netns-sweep`: removes what killed test, demo and benchmark runs left
//! behind (their network namespaces, the processes in them, their bpffs
//! mounts), never what a running one owns (see `service_tests::netns`).
//! `cargo xtask test | bench | demo` run it before they start and after
//! they are interrupted.

use anyhow::{Result, bail};
use service_tests::netns::{is_root, sweep_leftovers};

fn main() -> Result<()> {
    if !is_root() {
        bail!("removing network namespaces and bpffs mounts needs root");
    }
    for what in sweep_leftovers() {
        println!("netns-sweep: removed a leftover of a killed run: {what}");
    }
    Ok(())
}
