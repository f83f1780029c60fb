//! Side-by-side benchmark of quantix-kvm-agent and qemu-guest-agent in one VM.
fn main() {}
