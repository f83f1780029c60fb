//! Compiles `agent.proto` with the pure-Rust `protox` compiler (no system `protoc`).
//! `node.proto` (the gRPC service) is compiled by the host crate only.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=agent.proto");
    let fds = protox::compile(["agent.proto"], ["."])?;
    let mut config = prost_build::Config::new();
    config.type_attribute(
        ".",
        "#[cfg_attr(feature = \"serde\", derive(serde::Serialize))]",
    );
    config.compile_fds(fds)?;
    Ok(())
}
