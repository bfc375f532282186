//! The service dataplane's packet path (aya-ebpf, TC).
//!
//! Two classifiers run one pipeline ([`ingress`]) over shared maps
//! ([`maps`]): `service_pod_ingress` on the host side of pod interfaces
//! (ClusterIP), `service_external_ingress` on the node's external
//! interfaces (NodePort, LoadBalancer IPs, externalIPs). Packets to a
//! Service frontend are DNATed to a backend (conntrack pins the flow, SNAT
//! where the reply must return through this node); replies get the frontend
//! back as their source; ICMP errors about translated flows are translated
//! too. Everything else passes untouched.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod backend_table;
#[cfg(target_arch = "bpf")]
mod bench_floor;
#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod external_ingress;
#[cfg(target_arch = "bpf")]
mod fib;
#[cfg(target_arch = "bpf")]
mod flow;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod ingress;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod pod_ingress;
#[cfg(target_arch = "bpf")]
mod reject;
#[cfg(target_arch = "bpf")]
mod scratch;
#[cfg(target_arch = "bpf")]
mod socket;
#[cfg(target_arch = "bpf")]
mod verdict;

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
