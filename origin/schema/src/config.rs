//! Config-file plumbing shared by the daemons: one error shape naming the
//! file, the key and the problem, and TOML loading with unknown keys refused
//! (each daemon's raw struct carries `#[serde(deny_unknown_fields)]`).

use std::path::Path;

use serde::de::DeserializeOwned;

/// A configuration problem naming its source and key.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {key}: {problem}")]
pub struct ConfigError {
    pub source_name: String,
    pub key: &'static str,
    pub problem: String,
}

/// Reads a TOML config file into `T`; no path gives `T::default()`.
pub fn load_toml<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T, ConfigError> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        source_name: name.clone(),
        key: "(file)",
        problem: e.to_string(),
    })?;
    toml::from_str(&text).map_err(|e| ConfigError {
        source_name: name,
        key: "(syntax)",
        problem: e.message().to_owned(),
    })
}

/// A builder of [`ConfigError`]s for one source.
pub fn errors(source_name: &str) -> impl Fn(&'static str, String) -> ConfigError + '_ {
    move |key, problem| ConfigError {
        source_name: source_name.to_owned(),
        key,
        problem,
    }
}

/// The secret `key` from its file in `dir`: `None` when there is none; an
/// error for an unreadable file, one other users may read, or an empty one.
pub fn read_secret(dir: &Path, key: &str) -> Result<Option<String>, String> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(key);
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let mode = meta.permissions().mode();
    if mode & 0o007 != 0 {
        return Err(format!(
            "{} may be read by every user (mode {:o}); make it 0600 or 0640",
            path.display(),
            mode & 0o777
        ));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let value = text.trim_end();
    if value.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(Some(value.to_owned()))
}
