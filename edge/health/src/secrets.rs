//! The hook's tokens: from flags or the environment, or from the files of
//! a secrets directory (`admin_token`, `status_token`, the edge's rules:
//! never readable by every user, never empty, never given twice). A SIGHUP
//! (`systemctl reload edgefront-health`) reads the files again and the
//! hook takes the new tokens at once: rotating a token is a reload, no
//! restart, so no withdraw. A reload that finds a bad file keeps the
//! tokens in use and says why.

use std::path::PathBuf;

/// The tokens in use (`Debug` shows which are set, never a value).
#[derive(Clone)]
pub struct Tokens {
    /// This region's admin token: this hook's API and the edge's drain
    /// calls. No other region's token is accepted.
    pub admin: String,
    /// A read-only token every region shares: `GET /status` only (the
    /// hooks read each other's status with it; it cannot drain anything).
    pub status: Option<String>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("admin", &"<set>")
            .field("status", &self.status.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl Tokens {
    /// The token this hook reads its peers with.
    pub fn for_peers(&self) -> &str {
        self.status.as_deref().unwrap_or(&self.admin)
    }
}

/// Where the tokens come from: flags and the environment (read once) and
/// the secrets directory (read at start and at each reload). `Debug` shows
/// no value.
#[derive(Clone, Default)]
pub struct Sources {
    pub admin: Option<String>,
    pub status: Option<String>,
    pub dir: Option<PathBuf>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources")
            .field("admin", &self.admin.as_ref().map(|_| "<set>"))
            .field("status", &self.status.as_ref().map(|_| "<set>"))
            .field("dir", &self.dir)
            .finish()
    }
}

impl Sources {
    /// Reads the tokens again for a reload: as [`Sources::load`], and a
    /// status token in use may be replaced but never dropped (the hook
    /// would read its peers with its admin token).
    pub fn reload(&self, in_use: &Tokens) -> Result<Tokens, String> {
        let tokens = self.load()?;
        if in_use.status.is_some() && tokens.status.is_none() {
            return Err(
                "no status token any more (status_token is gone): the hook would read its peers with its admin token"
                    .into(),
            );
        }
        Ok(tokens)
    }

    /// Reads and checks the tokens.
    pub fn load(&self) -> Result<Tokens, String> {
        let (mut admin, mut status) = (self.admin.clone(), self.status.clone());
        if let Some(dir) = &self.dir {
            for (key, slot, flag) in [
                ("admin_token", &mut admin, "--token"),
                ("status_token", &mut status, "--status-token"),
            ] {
                let Some(value) = edgefront_schema::config::read_secret(dir, key)? else {
                    continue;
                };
                if slot.is_some() {
                    return Err(format!(
                        "{key} is given twice: in {} and by {flag} or the environment; give it once",
                        dir.join(key).display()
                    ));
                }
                *slot = Some(value);
            }
        }
        let admin = admin.ok_or_else(|| {
            "no admin token: give --token (EDGEFRONT_ADMIN_TOKEN) or the file admin_token in --secrets-dir"
                .to_owned()
        })?;
        if admin.len() < 16 {
            return Err(format!(
                "the admin token (--token) is {} characters; use at least 16",
                admin.len()
            ));
        }
        if status.as_ref().is_some_and(|t| t.len() < 16) {
            return Err("the status token (--status-token): use at least 16 characters".into());
        }
        if status.as_ref() == Some(&admin) {
            return Err("the status token must differ from the admin token".into());
        }
        Ok(Tokens { admin, status })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &std::path::Path, key: &str, value: &str, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(key);
        std::fs::write(&path, value).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn tokens_come_from_flags_or_files_never_both_and_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let from_dir = Sources {
            dir: Some(dir.path().to_owned()),
            ..Default::default()
        };
        assert!(
            from_dir
                .load()
                .expect_err("refused")
                .contains("no admin token")
        );
        write(dir.path(), "admin_token", "admin-0123456789abcdef\n", 0o640);
        write(
            dir.path(),
            "status_token",
            "status-0123456789abcdef\n",
            0o600,
        );
        let t = from_dir.load().expect("from files");
        assert_eq!(t.admin, "admin-0123456789abcdef");
        assert_eq!(t.for_peers(), "status-0123456789abcdef");
        // A rotation is a new file content, read again.
        write(
            dir.path(),
            "admin_token",
            "admin-rotated-0123456789\n",
            0o640,
        );
        assert_eq!(
            from_dir.load().expect("again").admin,
            "admin-rotated-0123456789"
        );
        let twice = Sources {
            admin: Some("admin-flag-0123456789abcdef".into()),
            ..from_dir.clone()
        };
        assert!(twice.load().expect_err("refused").contains("given twice"));
        write(
            dir.path(),
            "status_token",
            "status-0123456789abcdef\n",
            0o644,
        );
        assert!(from_dir.load().expect_err("refused").contains("every user"));
        write(
            dir.path(),
            "status_token",
            "admin-rotated-0123456789\n",
            0o600,
        );
        assert!(
            from_dir
                .load()
                .expect_err("refused")
                .contains("must differ")
        );
        let short = Sources {
            admin: Some("short".into()),
            ..Default::default()
        };
        assert!(short.load().expect_err("refused").contains("at least 16"));
        // A reload never drops the status token in use.
        write(
            dir.path(),
            "status_token",
            "status-0123456789abcdef\n",
            0o600,
        );
        let in_use = from_dir.load().expect("both");
        std::fs::remove_file(dir.path().join("status_token")).expect("rm");
        assert!(
            from_dir.load().is_ok(),
            "at start, the status token is optional"
        );
        assert!(
            from_dir
                .reload(&in_use)
                .expect_err("refused")
                .contains("no status token")
        );
        assert!(!format!("{in_use:?} {from_dir:?}").contains("0123456789"));
    }
}
