//! Staging and target paths come from the CO: checked before they touch the filesystem.

use crate::error::{Error, Result};
use std::path::{Component, Path, PathBuf};

/// Paths longer than this are refused (PATH_MAX is 4096 including the NUL).
pub const MAX_PATH_LEN: usize = 4000;

/// An absolute path without `..`, `.` or NUL, bounded in length, not `/` itself.
pub fn check(what: &str, raw: &str) -> Result<PathBuf> {
    if raw.is_empty() {
        return Err(Error::invalid(format!("{what} is required")));
    }
    if raw.len() > MAX_PATH_LEN {
        return Err(Error::invalid(format!(
            "{what} is {} bytes long; at most {MAX_PATH_LEN} are allowed",
            raw.len()
        )));
    }
    if raw.contains('\0') {
        return Err(Error::invalid(format!("{what} must not contain NUL")));
    }
    let path = Path::new(raw);
    if !path.is_absolute() {
        return Err(Error::invalid(format!(
            "{what} {raw:?} must be an absolute path"
        )));
    }
    // `Path::components` silently drops "." in the middle: look at the raw segments.
    if raw.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(Error::invalid(format!(
            "{what} {raw:?} must not contain '.' or '..' components"
        )));
    }
    let mut normal = 0;
    for c in path.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(_) => normal += 1,
            Component::ParentDir | Component::CurDir | Component::Prefix(_) => {
                return Err(Error::invalid(format!(
                    "{what} {raw:?} must not contain '.' or '..' components"
                )))
            }
        }
    }
    if normal == 0 {
        return Err(Error::invalid(format!(
            "{what} must not be the root directory"
        )));
    }
    // `Path::components` folds "a//b" and a trailing "/": rebuild so comparisons with
    // mountinfo see one spelling.
    Ok(path.components().collect())
}

/// The path as the kernel reports it in mountinfo: the parent resolved through symlinks, the
/// leaf kept as is (it may be a dead mount that cannot be stat'ed). Blocking.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    let (Some(parent), Some(leaf)) = (path.parent(), path.file_name()) else {
        return Ok(path.to_path_buf());
    };
    match std::fs::canonicalize(parent) {
        Ok(p) => Ok(p.join(leaf)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(path.to_path_buf()),
        Err(e) => Err(Error::io(format!("resolving {}", parent.display()), e)),
    }
}

/// The leaf must not be a symlink: mount(8) would follow it somewhere else. Blocking.
pub fn refuse_symlink(what: &str, path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(Error::invalid(format!(
            "{what} {} is a symbolic link; give the real path",
            path.display()
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_unsafe_paths() {
        for bad in [
            "",
            "relative/path",
            "/a/../b",
            "/a/./b",
            "/",
            "//",
            "/a\0b",
            &format!("/{}", "x".repeat(MAX_PATH_LEN)),
        ] {
            assert!(check("target_path", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn normalizes_spelling() {
        assert_eq!(
            check("p", "/var//lib/x/").unwrap(),
            PathBuf::from("/var/lib/x")
        );
    }

    #[test]
    fn resolves_parent_symlinks_but_not_the_leaf() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let resolved = resolve(&link.join("leaf")).unwrap();
        assert_eq!(resolved, real.canonicalize().unwrap().join("leaf"));
        assert!(refuse_symlink("p", &link).is_err());
        assert!(refuse_symlink("p", &real).is_ok());
    }
}
