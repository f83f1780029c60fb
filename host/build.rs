//! Generates the `NodeDaemonService` server and client from `proto/node.proto` with the
//! pure-Rust `protox` compiler. Agent messages come from `qx-proto`, never regenerated here.
//! Also writes the compiled descriptors (`node_descriptor.bin`: node.proto and agent.proto)
//! for the server reflection service and the RPC layer's method table.

use protox::prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto/node.proto");
    println!("cargo:rerun-if-changed=../proto/agent.proto");
    let fds = protox::compile(["node.proto"], ["../proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("node_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .extern_path(".quantix.agent.v1", "::qx_proto::agent")
        .type_attribute(".quantix.node.v1", "#[derive(serde::Serialize)]")
        .compile_fds(fds)?;
    Ok(())
}
