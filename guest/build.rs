//! Stamps the build date into the agent (`QX_AGENT_BUILD_UNIX_S`): the earliest time it will
//! set the guest's clock to without `force`. SOURCE_DATE_EPOCH when set (reproducible builds),
//! else the time of the build.

use std::time::{SystemTime, UNIX_EPOCH};

fn main() {
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    println!("cargo:rerun-if-changed=build.rs");
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
    println!("cargo:rustc-env=QX_AGENT_BUILD_UNIX_S={secs}");
}
