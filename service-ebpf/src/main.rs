//! The service dataplane's packet path (aya-ebpf, TC).
//!
//! `service_pod_ingress` runs on the ingress of the host side of pod
//! interfaces: every packet a pod sends passes here before the node routes
//! it. Packets to a Service frontend are DNATed to a backend (conntrack pins
//! the flow); replies from a backend get the frontend back as their source.
//! Everything else passes untouched.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod pod_ingress;
#[cfg(target_arch = "bpf")]
mod reject;

/// On the host the crate builds as an empty binary, so `cargo check
/// --workspace` works without the BPF target.
#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach a real panic; this
    // only satisfies the compiler.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
