//! Builds the eBPF object (service-ebpf, with nightly + rust-src +
//! bpf-linker) into OUT_DIR, where `src/ebpf_object.rs` embeds it.
//!
//! Without that toolchain a plain `cargo build`/`cargo test` still works (the
//! unit and golden tiers need no eBPF): the object is left empty and
//! `service-agent run` refuses to start with a message saying how to fix it.
//! `SERVICE_DATAPLANE_REQUIRE_EBPF=1` (set by `cargo xtask`) turns a missing
//! toolchain into a build error. `AYA_BUILD_SKIP=1` skips the build.
use std::{path::Path, process::Command};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

const OBJECT: &str = "service-ebpf";

fn toolchain_missing() -> Option<String> {
    if which::which("bpf-linker").is_err() {
        return Some("bpf-linker is not on PATH".into());
    }
    let sysroot = Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]).output();
    match sysroot {
        Ok(out) if out.status.success() => {
            let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let core = Path::new(&sysroot).join("lib/rustlib/src/rust/library/core");
            (!core.exists()).then(|| "rust-src is not installed for the nightly toolchain".into())
        }
        _ => Some("the nightly toolchain is not installed".into()),
    }
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=SERVICE_DATAPLANE_REQUIRE_EBPF");
    let out_dir = std::env::var("OUT_DIR").context("OUT_DIR not set")?;
    let required = std::env::var("SERVICE_DATAPLANE_REQUIRE_EBPF").is_ok_and(|v| v == "1");
    if let Some(why) = toolchain_missing() {
        if required {
            return Err(anyhow!("cannot build the eBPF object: {why} (run `cargo xtask setup`)"));
        }
        println!(
            "cargo:warning=eBPF object not built ({why}); `service-agent run` will refuse to start. Run `cargo xtask setup`."
        );
        std::fs::write(Path::new(&out_dir).join(OBJECT), b"").context("writing empty object")?;
        return Ok(());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("service-agent has no parent directory"))?
        .join("service-ebpf");
    let root = root.to_str().context("non-UTF-8 path to service-ebpf")?;
    aya_build::build_ebpf([Package { name: OBJECT, root_dir: root, ..Default::default() }], Toolchain::default())
        .context("building the eBPF object")?;
    let object = Path::new(&out_dir).join(OBJECT);
    if !object.exists() {
        // AYA_BUILD_SKIP=1: aya-build built nothing.
        std::fs::write(&object, b"").context("writing empty object")?;
    }
    Ok(())
}
