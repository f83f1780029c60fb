//! The layers point one way (docs/architecture.md, "Layers"). This test reads the sources
//! and fails when a module names a layer above it: a cheap check that needs no tool.
//!
//! Only code lines count (comment lines are skipped), and a name counts wherever it appears
//! in one, so `crate::service::status::vm(e)` inside a function is caught as well as a `use`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir` (or `dir` itself when it is a file).
fn sources(dir: &Path) -> Vec<PathBuf> {
    if dir.is_file() {
        return vec![dir.to_path_buf()];
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// `(file, line)` of every code line under `paths` (relative to `src/`) naming one of
/// `forbidden`.
fn offenders(paths: &[&str], forbidden: &[&str]) -> Vec<String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = Vec::new();
    for p in paths {
        let files = sources(&src.join(p));
        assert!(!files.is_empty(), "no sources at src/{p}");
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for (n, line) in text.lines().enumerate() {
                if line.trim_start().starts_with("//") {
                    continue;
                }
                if let Some(name) = forbidden.iter().find(|f| line.contains(*f)) {
                    let rel = file.strip_prefix(&src).unwrap().display().to_string();
                    found.push(format!("src/{rel}:{}: {name}: {}", n + 1, line.trim()));
                }
            }
        }
    }
    found
}

/// The agent link and its command table: below everything but qx-proto.
#[test]
fn the_agent_link_knows_nothing_of_grpc_node_proto_or_the_layers_above() {
    let found = offenders(
        &["agent"],
        &[
            "tonic",
            "crate::pb",
            "crate::service",
            "crate::agent_api",
            "crate::vm_api",
            "crate::storage",
            "crate::hypervisor",
        ],
    );
    assert!(found.is_empty(), "{found:#?}");
}

/// Agent and VM operations return their own errors; only the gRPC edge knows `Status`.
#[test]
fn agent_and_vm_operations_know_nothing_of_the_grpc_layer_or_tonic() {
    let found = offenders(
        &["agent_api.rs", "vm_api", "error.rs", "stream.rs"],
        &["tonic", "crate::service", "Status::"],
    );
    assert!(found.is_empty(), "{found:#?}");
    let found = offenders(&["agent_api.rs"], &["crate::vm_api"]);
    assert!(found.is_empty(), "{found:#?}");
}

/// The hypervisor, storage and metrics modules sit below the VM layer and beside the agent.
#[test]
fn the_hypervisor_and_storage_know_nothing_of_the_vm_and_agent_layers() {
    let found = offenders(
        &["hypervisor", "storage", "vm_metrics.rs"],
        &["crate::vm_api", "crate::agent_api", "crate::agent::"],
    );
    assert!(found.is_empty(), "{found:#?}");
}

/// Nothing below the gRPC layer imports it.
#[test]
fn nothing_below_the_grpc_layer_imports_it() {
    let found = offenders(
        &[
            "agent",
            "agent_api.rs",
            "vm_api",
            "error.rs",
            "stream.rs",
            "hypervisor",
            "storage",
            "vm_metrics.rs",
        ],
        &["crate::service", "crate::rpc_layer", "node_daemon_service"],
    );
    assert!(found.is_empty(), "{found:#?}");
}
