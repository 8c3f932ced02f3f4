//! The chained CNI plugin that lets this node's agent program a pod before it runs (see
//! `static_egress::cni`).

fn main() {
    std::process::exit(static_egress::cni::plugin::main());
}
