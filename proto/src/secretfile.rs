//! Private-key files: `{"PrivateKey":"privkey:…"}`, created with mode 0600 and written
//! atomically (temporary file + rename), so a crash never leaves a half-written key and
//! no other user can read it. The one piece of file I/O shared by the daemons.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct KeyFile<K> {
    #[serde(rename = "PrivateKey")]
    private_key: K,
}

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("key file {path} is not valid (expected {{\"PrivateKey\":\"privkey:…\"}})")]
    Invalid { path: String },
    #[error("cannot write key file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// Reads the key in `path`, or creates it with `generate` if the file does not exist.
pub fn load_or_create<K: Serialize + DeserializeOwned>(
    path: &Path,
    generate: impl FnOnce() -> K,
) -> Result<(K, bool), SecretFileError> {
    let p = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let kf: KeyFile<K> =
                serde_json::from_str(&text).map_err(|_| SecretFileError::Invalid { path: p })?;
            Ok((kf.private_key, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = generate();
            let json = serde_json::to_vec_pretty(&KeyFile { private_key: &key })
                .map_err(|_| SecretFileError::Invalid { path: p.clone() })?;
            write_private(path, &json)
                .map_err(|source| SecretFileError::Write { path: p, source })?;
            Ok((key, true))
        }
        Err(source) => Err(SecretFileError::Read { path: p, source }),
    }
}

/// Writes `data` to `path` with mode 0600 via a temporary file and a rename.
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    write_atomic(path, data, 0o600)
}

/// Writes `data` to `path` via a temporary file and a rename, with Unix mode `mode`
/// (ignored elsewhere); creates the directory if needed.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write as _;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = opts.open(&tmp)?;
    // Exactly `mode`, whatever the umask, or a temporary file a crash left behind, had.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MachinePrivate, NodePrivate};

    #[test]
    fn created_private_then_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/key.json");
        let (k1, created) = load_or_create(&path, MachinePrivate::generate).unwrap();
        assert!(created);
        let (k2, created) = load_or_create(&path, MachinePrivate::generate).unwrap();
        assert!(!created);
        assert_eq!(k1, k2);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        std::fs::write(&path, "{}").unwrap();
        let err = load_or_create(&path, NodePrivate::generate).unwrap_err();
        assert!(!err.to_string().contains("privkey:0"), "{err}");
    }
}
