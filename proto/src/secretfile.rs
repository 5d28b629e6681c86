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
    write_atomic_named(path, data, mode, &mut random_temp_name)
}

/// Tries at most this many temporary names before giving up: each is random, so a
/// clash means someone planted files, not bad luck.
const TEMP_NAME_TRIES: usize = 8;

/// A random name for a temporary file beside `path` (`.<name>.<16 hex digits>.tmp`):
/// another local user cannot guess it ahead of time.
pub fn random_temp_name(path: &Path) -> std::ffi::OsString {
    let mut name = std::ffi::OsString::from(".");
    name.push(
        path.file_name()
            .unwrap_or_else(|| std::ffi::OsStr::new("file")),
    );
    name.push(format!(".{:016x}.tmp", rand::random::<u64>()));
    name
}

/// [`write_atomic`] with the temporary names coming from `next_name` (a test plants a
/// file at the exact name it will hand out). The temporary file is created new
/// (`O_EXCL`, never following a symlink); a name that exists is skipped, never opened.
/// After the rename the directory is synced, so the new file survives a crash.
pub fn write_atomic_named(
    path: &Path,
    data: &[u8],
    mode: u32,
    next_name: &mut dyn FnMut(&Path) -> std::ffi::OsString,
) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut opts = std::fs::OpenOptions::new();
    // create_new: O_CREAT|O_EXCL, which also refuses a symlink at the name.
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(mode).custom_flags(nix::libc::O_NOFOLLOW);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut attempt = 0;
    let (tmp, mut f) = loop {
        let tmp = dir.join(next_name(path));
        match opts.open(&tmp) {
            Ok(f) => break (tmp, f),
            Err(e)
                if e.kind() == std::io::ErrorKind::AlreadyExists
                    && attempt + 1 < TEMP_NAME_TRIES =>
            {
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    };
    let written = (|| {
        // Exactly `mode`, whatever the umask.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    drop(f);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// Makes a rename in `dir` durable (Unix: fsync of the directory; elsewhere the rename
/// is as durable as the OS makes it).
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::fs::File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
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

#[cfg(all(test, unix))]
mod planted {
    use super::*;

    /// A generator that hands out `names` in order.
    fn names(list: &[&str]) -> impl FnMut(&Path) -> std::ffi::OsString {
        let mut list: Vec<std::ffi::OsString> = list.iter().rev().map(Into::into).collect();
        move |_| {
            list.pop()
                .expect("more temporary names asked for than planned")
        }
    }

    #[test]
    fn symlink_at_the_next_temporary_name_is_skipped_and_its_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join("planted.tmp")).unwrap();
        std::fs::write(dir.path().join("also-planted.tmp"), b"someone else's").unwrap();
        let path = dir.path().join("agentd.state");
        let mut next = names(&["planted.tmp", "also-planted.tmp", "fresh.tmp"]);
        write_atomic_named(&path, b"secret", 0o600, &mut next).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");
        assert_eq!(
            std::fs::read(dir.path().join("also-planted.tmp")).unwrap(),
            b"someone else's"
        );
        // The symlink is still a symlink (not replaced by our file), and nothing of ours
        // is left behind under a temporary name.
        assert!(std::fs::symlink_metadata(dir.path().join("planted.tmp"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(!dir.path().join("fresh.tmp").exists());
    }

    #[test]
    fn gives_up_when_every_name_is_taken_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join("same.tmp")).unwrap();
        let path = dir.path().join("key.json");
        let err =
            write_atomic_named(&path, b"secret", 0o600, &mut |_| "same.tmp".into()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(!path.exists());
    }

    #[test]
    fn random_names_differ_and_stay_beside_the_file() {
        let p = Path::new("/var/lib/agentd/agentd.state");
        let (a, b) = (random_temp_name(p), random_temp_name(p));
        assert_ne!(a, b);
        let a = a.to_string_lossy().into_owned();
        assert!(
            a.starts_with(".agentd.state.") && a.ends_with(".tmp") && !a.contains('/'),
            "{a}"
        );
    }
}
