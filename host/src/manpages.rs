//! Man pages and shell completions, generated from the clap definitions of qx-node and
//! qxctl (the guest agent has no clap; its page is kept by hand beside it and checked by a
//! test against its `--help`).
//!
//! Each binary writes its own when started with [`GENERATE_DIR_ENV`] set to a directory
//! (`ci/build-docs.sh` does that); nothing else is done then. Layout under that directory:
//! `man/man<section>/<name>.<section>` (one page per subcommand too, `qxctl-agent-exec.1`),
//! `completions/<name>.bash`, `completions/_<name>` (zsh), `completions/<name>.fish`.

use clap_complete::Shell;
use std::path::Path;

/// When set, a binary writes its man pages and completions into this directory and exits.
pub const GENERATE_DIR_ENV: &str = "QX_GENERATE_DOCS_DIR";

/// Writes the pages and completions if [`GENERATE_DIR_ENV`] asks for them; `true` if it did
/// (the caller then exits).
pub fn generate_if_asked(cmd: clap::Command, section: &str) -> std::io::Result<bool> {
    let Some(dir) = std::env::var_os(GENERATE_DIR_ENV) else {
        return Ok(false);
    };
    generate(cmd, section, Path::new(&dir))?;
    Ok(true)
}

/// Writes `cmd`'s man pages (in `section`, with a page per visible subcommand) and its
/// bash, zsh and fish completions under `dir`.
pub fn generate(mut cmd: clap::Command, section: &str, dir: &Path) -> std::io::Result<()> {
    let man_dir = dir.join("man").join(format!("man{section}"));
    let comp_dir = dir.join("completions");
    std::fs::create_dir_all(&man_dir)?;
    std::fs::create_dir_all(&comp_dir)?;
    let name = cmd.get_name().to_string();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, &name, &comp_dir)?;
    }
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    pages(&cmd, section, &man_dir)
}

fn pages(cmd: &clap::Command, section: &str, dir: &Path) -> std::io::Result<()> {
    // clap adds a `help` subcommand to every command with subcommands: no page for those.
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        pages(sub, section, dir)?;
    }
    clap_mangen::Man::new(cmd.clone())
        .section(section)
        .manual("Quantix KVM")
        .source(format!("Quantix KVM {}", env!("CARGO_PKG_VERSION")))
        .generate_to(dir)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn qxctl_gets_a_page_per_subcommand_and_three_completions() {
        let dir = tempfile::tempdir().unwrap();
        generate(crate::cli::Cli::command(), "1", dir.path()).unwrap();
        let man = dir.path().join("man/man1");
        let page = std::fs::read_to_string(man.join("qxctl.1")).unwrap();
        assert!(page.starts_with(".ie \\n(.g .ds Aq"), "{page}");
        assert!(page.contains(".TH qxctl 1"), "{page}");
        assert!(page.contains("EXIT CODES"), "{page}");
        assert!(man.join("qxctl-agent.1").exists());
        assert!(man.join("qxctl-vm.1").exists());
        assert!(man.join("qxctl-agent-info.1").exists());
        assert!(!man.join("qxctl-help.1").exists());
        assert!(!man.join("qxctl-agent-help.1").exists());
        for f in ["qxctl.bash", "_qxctl", "qxctl.fish"] {
            assert!(dir.path().join("completions").join(f).exists(), "{f}");
        }
    }
}
