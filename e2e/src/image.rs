//! The test VM image: `target/vm/{vmlinux,initramfs.cpio.gz,kernel-release}`, made by
//! `ci/vm/build-image.sh`.

use std::path::{Path, PathBuf};

use thiserror::Error;

/// Failures to locate the image.
#[derive(Debug, Error)]
pub enum ImageError {
    #[error("{0} is missing: run `bash ci/vm/build-image.sh` first")]
    Missing(PathBuf),
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Paths of a built image.
#[derive(Debug, Clone)]
pub struct Image {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// `uname -r` of the guest kernel.
    pub kernel_release: String,
}

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// The shared cargo target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

impl Image {
    /// The standard test image (`bench = false`) or the one that also carries qemu-ga.
    pub fn locate(bench: bool) -> Result<Self, ImageError> {
        let dir = target_dir().join("vm");
        let initrd_name = if bench {
            "initramfs-bench.cpio.gz"
        } else {
            "initramfs.cpio.gz"
        };
        let kernel = dir.join("vmlinux");
        let initrd = dir.join(initrd_name);
        for p in [&kernel, &initrd] {
            if !p.exists() {
                return Err(ImageError::Missing(p.clone()));
            }
        }
        let release_path = dir.join("kernel-release");
        let kernel_release = std::fs::read_to_string(&release_path)
            .map_err(|source| ImageError::Read {
                path: release_path,
                source,
            })?
            .trim()
            .to_string();
        Ok(Self {
            kernel,
            initrd,
            kernel_release,
        })
    }
}
