//! Instance names and host paths from API requests: validated before they touch the filesystem.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum NameError {
    #[error(
        "invalid name {0:?}: use 1-63 characters from a-z, 0-9, '-', '_' and '.', starting with a letter or digit"
    )]
    Invalid(String),
    #[error("{what} path {path:?} must be absolute")]
    NotAbsolute { what: &'static str, path: String },
    #[error("{what} {path:?} cannot be opened: {source}")]
    Unreachable {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path:?} is not a regular file")]
    NotAFile { what: &'static str, path: String },
}

/// `[a-z0-9][a-z0-9-_.]{0,62}`: a name is a single path component and a safe tap/cgroup suffix.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|&c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'_' | b'.')
        })
        // "a..b" is harmless as a component, but ".." anywhere reads as traversal in logs; refuse it.
        && !name.contains("..");
    if ok {
        Ok(())
    } else {
        Err(NameError::Invalid(name.to_string()))
    }
}

/// Absolute, symlink-free path of an existing regular file the VMM will open.
pub fn canonical_file(what: &'static str, path: &str) -> Result<PathBuf, NameError> {
    if !Path::new(path).is_absolute() {
        return Err(NameError::NotAbsolute {
            what,
            path: path.to_string(),
        });
    }
    let canon = std::fs::canonicalize(path).map_err(|source| NameError::Unreachable {
        what,
        path: path.to_string(),
        source,
    })?;
    let meta = std::fs::metadata(&canon).map_err(|source| NameError::Unreachable {
        what,
        path: path.to_string(),
        source,
    })?;
    if !meta.is_file() {
        return Err(NameError::NotAFile {
            what,
            path: path.to_string(),
        });
    }
    Ok(canon)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "web-1", "db_2.prod", "0", &"x".repeat(63)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-a",
            ".a",
            "A",
            "a/b",
            "../etc",
            "a..b",
            "a b",
            "é",
            &"x".repeat(64),
            "a\0",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn canonical_paths() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k");
        std::fs::write(&f, b"x").unwrap();
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        let got = canonical_file("kernel", link.to_str().unwrap()).unwrap();
        assert_eq!(got, std::fs::canonicalize(&f).unwrap());
        assert!(matches!(
            canonical_file("kernel", "rel/k"),
            Err(NameError::NotAbsolute { .. })
        ));
        assert!(matches!(
            canonical_file("kernel", dir.path().to_str().unwrap()),
            Err(NameError::NotAFile { .. })
        ));
        assert!(matches!(
            canonical_file("kernel", "/nonexistent/k"),
            Err(NameError::Unreachable { .. })
        ));
    }
}
