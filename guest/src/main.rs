fn main() {
    println!("quantix-kvm-agent {}", env!("CARGO_PKG_VERSION"));
}
