//! Which host files a request may name. A disk given by host path must lie inside an allowed
//! root (the image directory, a configured disk root, a libvirt storage pool's target path);
//! an ISO, kernel or initrd inside a media directory. Paths are checked after resolving every
//! symlink, and the resolved path is the one handed to libvirt, so a link that is swapped
//! after the check cannot redirect the VM.

use std::path::{Path, PathBuf};

/// Longest path a request may carry (Linux's `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;

/// Why a path was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    /// Malformed: relative, too long, missing, or not a regular file.
    #[error("{0}")]
    Invalid(String),
    /// Exists but lies outside every allowed directory.
    #[error("{0}")]
    Denied(String),
}

/// Resolves `path` (what the request called it `what`) and checks that the result is a
/// regular file inside one of `roots`. Returns the resolved path.
pub fn resolve_inside(what: &str, path: &str, roots: &[PathBuf]) -> Result<PathBuf, PathError> {
    if path.len() > MAX_PATH_BYTES {
        return Err(PathError::Invalid(format!(
            "{what} path is {} bytes; at most {MAX_PATH_BYTES} (path)",
            path.len()
        )));
    }
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(PathError::Invalid(format!(
            "{what} path must be absolute: {path:?}"
        )));
    }
    let real = match p.canonicalize() {
        Ok(real) => real,
        // Whether a file outside the allowed directories exists is none of the caller's
        // business: only inside them is "missing" an answer.
        Err(e) if inside_any(p, roots) => {
            return Err(PathError::Invalid(format!(
                "{what} {path:?} does not exist: {e}"
            )))
        }
        Err(_) => return Err(denied(what, path, p, roots)),
    };
    if !inside_any(&real, roots) {
        return Err(denied(what, path, &real, roots));
    }
    if !real.is_file() {
        return Err(PathError::Invalid(format!(
            "{what} {path:?} is not a regular file"
        )));
    }
    Ok(real)
}

/// Whether the (already resolved) `path` lies inside one of `roots`, each resolved too.
/// Missing roots hold nothing.
pub fn inside_any(path: &Path, roots: &[PathBuf]) -> bool {
    roots
        .iter()
        .filter_map(|r| r.canonicalize().ok())
        .any(|r| path.starts_with(&r) && path != r)
}

fn denied(what: &str, path: &str, real: &Path, roots: &[PathBuf]) -> PathError {
    PathError::Denied(format!(
        "{what} {path:?} (resolved: {}) is outside every directory this node allows for it ({})",
        real.display(),
        list(roots)
    ))
}

fn list(roots: &[PathBuf]) -> String {
    if roots.is_empty() {
        return "none configured".to_string();
    }
    roots
        .iter()
        .map(|r| r.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn symlinks_and_dot_dot_are_resolved_before_the_check() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let inside = root.join("a.img");
        std::fs::write(&inside, b"a").unwrap();
        let outside = dir.path().join("b.img");
        std::fs::write(&outside, b"b").unwrap();
        let link = root.join("l.img");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        let roots = [root.clone()];
        let s = |p: &Path| p.to_string_lossy().into_owned();
        assert_eq!(
            resolve_inside("disk", &s(&inside), &roots).unwrap(),
            inside.canonicalize().unwrap()
        );
        for p in [outside.clone(), link, root.join("../b.img")] {
            assert!(matches!(
                resolve_inside("disk", &s(&p), &roots),
                Err(PathError::Denied(_))
            ));
        }
        // The root itself is no file of it; a missing file is invalid inside the roots,
        // denied outside them (existence outside is not revealed).
        assert!(resolve_inside("disk", &s(&root), &roots).is_err());
        assert!(matches!(
            resolve_inside("disk", &s(&root.join("none")), &roots),
            Err(PathError::Invalid(_))
        ));
        assert!(matches!(
            resolve_inside("disk", "/nonexistent/x", &roots),
            Err(PathError::Denied(_))
        ));
        assert!(matches!(
            resolve_inside("disk", "rel/a.img", &roots),
            Err(PathError::Invalid(_))
        ));
        // No roots: nothing is allowed.
        assert!(matches!(
            resolve_inside("disk", &s(&inside), &[]),
            Err(PathError::Denied(_))
        ));
    }
}
