//! Helpers shared by the whole-VM tests that go through qx-node.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use qx_e2e::node::Client;
use qx_node::pb;
use qx_proto::agent::ExecRequest;

/// Longest wait for a freshly booted guest's agent to be connected (TCG boot is ~3 s; two VMs
/// on two shared cores and a cold daemon take longer).
pub const AGENT_UP_TIMEOUT: Duration = Duration::from_secs(90);
/// Per-call deadline passed to the daemon.
pub const CALL_TIMEOUT_MS: u32 = 20_000;
const POLL_MS: u64 = 200;

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// `--vm-socket ID=PATH` arguments for qx-node.
pub fn vm_socket_args(vms: &[(&str, &Path)]) -> Vec<String> {
    vms.iter()
        .flat_map(|(id, path)| {
            [
                "--vm-socket".to_string(),
                format!("{id}={}", path.display()),
            ]
        })
        .collect()
}

/// Polls GetAgentInfo until the agent is connected with a session; returns that info.
pub async fn wait_agent(client: &mut Client, vm_id: &str) -> pb::GuestAgentInfo {
    wait_agent_where(client, vm_id, |_| true).await
}

/// Polls GetAgentInfo until the agent is connected and `pred` holds.
pub async fn wait_agent_where(
    client: &mut Client,
    vm_id: &str,
    pred: impl Fn(&pb::GuestAgentInfo) -> bool,
) -> pb::GuestAgentInfo {
    let deadline = Instant::now() + AGENT_UP_TIMEOUT;
    loop {
        let last = match client
            .get_agent_info(pb::AgentRequest {
                vm_id: vm_id.to_string(),
                timeout_ms: CALL_TIMEOUT_MS,
            })
            .await
        {
            Ok(r) => {
                let info = r.into_inner();
                if info.connected && info.session_id != 0 && pred(&info) {
                    return info;
                }
                format!("{info:?}")
            }
            Err(status) => format!("{status}"),
        };
        assert!(
            Instant::now() < deadline,
            "agent of {vm_id} not ready; last answer: {last}"
        );
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    }
}

/// A shell command run through the daemon, collected.
pub async fn sh(client: &mut Client, vm_id: &str, script: &str) -> qx_proto::agent::ExecExit {
    client
        .execute_in_guest(pb::ExecuteInGuestRequest {
            vm_id: vm_id.to_string(),
            exec: Some(ExecRequest {
                argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
                ..Default::default()
            }),
            timeout_ms: CALL_TIMEOUT_MS,
        })
        .await
        .unwrap_or_else(|s| panic!("exec {script:?} on {vm_id}: {s}"))
        .into_inner()
}

/// Stdout of a shell command that must succeed.
pub async fn sh_ok(client: &mut Client, vm_id: &str, script: &str) -> String {
    let exit = sh(client, vm_id, script).await;
    assert!(
        exit.exited && exit.exit_code == 0,
        "{script:?} failed: {exit:?} stderr={}",
        String::from_utf8_lossy(&exit.stderr)
    );
    String::from_utf8_lossy(&exit.stdout).into_owned()
}

/// A raw ext4 image of `size_mib` holding `files` (name, content), made with mkfs.ext4 -d.
pub fn ext4_image(dir: &Path, size_mib: u64, files: &[(&str, &[u8])]) -> PathBuf {
    let content = dir.join("ext4-content");
    std::fs::create_dir_all(&content).unwrap();
    for (name, data) in files {
        std::fs::write(content.join(name), data).unwrap();
    }
    let img = dir.join("disk.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(size_mib * 1024 * 1024).unwrap();
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&content)
        .arg(&img)
        .output()
        .expect("mkfs.ext4 (run ci/setup.sh)");
    assert!(
        out.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    img
}

/// Deterministic pseudo-random bytes (xorshift), so a failure is reproducible.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub fn sha256(data: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(data).to_vec()
}
