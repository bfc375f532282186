//! `service_bench_floor`: returns the pass verdict and nothing else. The
//! agent never loads or attaches it; `cargo xtask bench` runs it with
//! BPF_PROG_TEST_RUN as the floor the real programs' per-packet cost is
//! compared against (the same test-run overhead, no work).

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};

#[classifier]
pub fn service_bench_floor(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}
