//! Staging and target paths come from the CO: checked before they touch the filesystem.

use crate::error::{Error, Result};
use std::path::{Component, Path, PathBuf};

/// Paths longer than this are refused (PATH_MAX is 4096 including the NUL).
pub(crate) const MAX_PATH_LEN: usize = 4000;

/// An absolute path without `..`, `.` or NUL, bounded in length, not `/` itself.
pub(crate) fn check(what: &str, raw: &str) -> Result<PathBuf> {
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
pub(crate) fn resolve(path: &Path) -> Result<PathBuf> {
    let (Some(parent), Some(leaf)) = (path.parent(), path.file_name()) else {
        return Ok(path.to_path_buf());
    };
    match std::fs::canonicalize(parent) {
        Ok(p) => Ok(p.join(leaf)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(path.to_path_buf()),
        Err(e) => Err(Error::io(format!("resolving {}", parent.display()), e)),
    }
}

/// Where `path` leads now: its longest ancestor that can be resolved, through symlinks, plus
/// the rest as given (a dead mount on the way is not followed). Blocking.
pub(crate) fn real_location(path: &Path) -> PathBuf {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = std::fs::canonicalize(&existing) {
            return rest.iter().rev().fold(real, |p, c| p.join(c));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                existing = parent.to_path_buf();
            }
            _ => return path.to_path_buf(),
        }
    }
}

/// With `roots` configured, `path` must lead strictly below one of them (symlinks on the way,
/// the leaf included, are followed). Blocking.
pub(crate) fn check_within(what: &str, path: &Path, roots: &[PathBuf]) -> Result<()> {
    if roots.is_empty() {
        return Ok(());
    }
    let real = real_location(path);
    let inside = roots.iter().any(|root| {
        let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.clone());
        real.starts_with(&root) && real != root
    });
    if inside {
        return Ok(());
    }
    let leads = if real == path {
        String::new()
    } else {
        format!(" (it leads to {})", real.display())
    };
    Err(Error::invalid(format!(
        "{what} {}{leads} is outside the allowed roots {}; give a path below one of them \
         (node.allowed_path_roots)",
        path.display(),
        roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// The leaf must not be a symlink: mount(8) would follow it somewhere else. Blocking.
pub(crate) fn refuse_symlink(what: &str, path: &Path) -> Result<()> {
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
    fn roots_bound_where_paths_lead() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        let root = base.join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir(base.join("outside")).unwrap();
        std::os::unix::fs::symlink(base.join("outside"), root.join("out")).unwrap();
        let roots = vec![root.clone()];
        assert!(check_within("p", &root.join("sub/new/leaf"), &roots).is_ok());
        assert!(check_within("p", &root.join("new"), &roots).is_ok());
        assert!(check_within("p", &root, &roots).is_err(), "the root itself");
        assert!(check_within("p", &base.join("outside/x"), &roots).is_err());
        let err = check_within("p", &root.join("out/x"), &roots).unwrap_err();
        assert!(err.to_string().contains("leads to"), "{err}");
        assert!(
            check_within("p", &root.join("out"), &roots).is_err(),
            "a leaf symlink"
        );
        assert!(
            check_within("p", Path::new("/etc/x"), &[]).is_ok(),
            "no roots: anything"
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
