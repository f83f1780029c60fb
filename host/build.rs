//! Generates the `NodeDaemonService` server and client from `proto/node.proto` with the
//! pure-Rust `protox` compiler. Agent messages come from `qx-proto`, never regenerated here.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto/node.proto");
    println!("cargo:rerun-if-changed=../proto/agent.proto");
    let fds = protox::compile(["node.proto"], ["../proto"])?;
    tonic_prost_build::configure()
        .extern_path(".quantix.agent.v1", "::qx_proto::agent")
        .type_attribute(".quantix.node.v1", "#[derive(serde::Serialize)]")
        .compile_fds(fds)?;
    Ok(())
}
