//! `service_pod_ingress`, on the ingress of the host side of pod
//! interfaces: every packet a pod sends passes here before the node routes
//! it. New flows match ClusterIP frontends (`SCOPE_INTERNAL`); replies of
//! local backends are reverse-translated; a pod that reaches its own
//! Service and lands on itself is SNATed to the hairpin address so the
//! reply comes back through the node.

use aya_ebpf::{macros::classifier, programs::TcContext};

use crate::{ingress, nat::Side};

#[classifier]
#[expect(clippy::needless_pass_by_value, reason = "the classifier macro fixes the signature")]
pub fn service_pod_ingress(ctx: TcContext) -> i32 {
    ingress::run(&ctx, Side::Pod)
}
