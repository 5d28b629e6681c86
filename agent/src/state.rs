//! The daemon's persistent state: its machine key (identity toward the control server)
//! and node key (WireGuard static key and relay identity), kept in one file in the state
//! directory, mode 0600, written atomically. The disco key is not stored: a fresh one is
//! made at every start, as tailscaled does.

use std::path::{Path, PathBuf};

use proto::{MachinePrivate, NodePrivate};
use serde::{Deserialize, Serialize};

/// File name of the state inside the state directory.
pub const STATE_FILE: &str = "agentd.state";

#[derive(Serialize, Deserialize)]
struct StateFile {
    #[serde(rename = "MachineKey")]
    machine: MachinePrivate,
    #[serde(rename = "NodeKey")]
    node: NodePrivate,
}

/// The keys a device keeps across restarts.
#[derive(Debug, Clone)]
pub struct Keys {
    pub machine: MachinePrivate,
    pub node: NodePrivate,
}

/// Why the state could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read state file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path} is damaged; move it away to start as a new device")]
    Invalid { path: PathBuf },
    #[error("cannot write state file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot use state directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("refusing state directory {path}: {why}; fix it (e.g. `chown root: {path} && chmod 700 {path}`) or choose another with --state-dir")]
    Unsafe { path: PathBuf, why: String },
}

/// Creates the state directory (mode 0700) if it is missing, and refuses one that
/// another user could write to or that belongs to another user: whoever can write there
/// can replace our keys or plant files where we write them.
pub fn check_dir(dir: &Path) -> Result<(), StateError> {
    let io = |source| StateError::Dir {
        path: dir.to_path_buf(),
        source,
    };
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut b = std::fs::DirBuilder::new();
            b.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
            b.create(dir).map_err(io)?;
            Ok(())
        }
        Err(e) => Err(io(e)),
        Ok(m) => dir_is_safe(dir, &m),
    }
}

#[cfg(unix)]
fn dir_is_safe(dir: &Path, m: &std::fs::Metadata) -> Result<(), StateError> {
    use std::os::unix::fs::MetadataExt as _;
    let unsafe_dir = |why: String| StateError::Unsafe {
        path: dir.to_path_buf(),
        why,
    };
    if !m.is_dir() {
        return Err(unsafe_dir("it is not a directory".into()));
    }
    let me = nix::unistd::geteuid().as_raw();
    if m.uid() != me {
        return Err(unsafe_dir(format!(
            "it belongs to user {}, not to the user agentd runs as ({me})",
            m.uid()
        )));
    }
    if m.mode() & 0o022 != 0 {
        return Err(unsafe_dir(format!(
            "other users may write to it (mode {:o})",
            m.mode() & 0o777
        )));
    }
    Ok(())
}

#[cfg(windows)]
fn dir_is_safe(dir: &Path, m: &std::fs::Metadata) -> Result<(), StateError> {
    use std::os::windows::fs::MetadataExt as _;
    const FILE_ATTRIBUTE_REPARSE_POINT: u32 = 0x400;
    let unsafe_dir = |why: String| StateError::Unsafe {
        path: dir.to_path_buf(),
        why,
    };
    if !m.is_dir() {
        return Err(unsafe_dir("it is not a directory".into()));
    }
    if std::fs::symlink_metadata(dir)
        .is_ok_and(|l| l.file_attributes() & FILE_ATTRIBUTE_REPARSE_POINT != 0)
    {
        return Err(unsafe_dir("it is a link".into()));
    }
    let (owner, dacl) = crate::acl_windows::read(dir).map_err(|source| StateError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    crate::acl::judge(owner, dacl.as_deref()).map_err(unsafe_dir)
}

#[cfg(not(any(unix, windows)))]
fn dir_is_safe(dir: &Path, m: &std::fs::Metadata) -> Result<(), StateError> {
    if m.is_dir() {
        Ok(())
    } else {
        Err(StateError::Unsafe {
            path: dir.to_path_buf(),
            why: "it is not a directory".into(),
        })
    }
}

/// The default state directory of this OS (e.g. `/var/lib/agentd` for root on Linux).
pub fn default_state_dir() -> PathBuf {
    #[cfg(target_os = "linux")]
    {
        if nix::unistd::geteuid().is_root() {
            return PathBuf::from("/var/lib/agentd");
        }
    }
    directories::ProjectDirs::from("", "", "agentd")
        .map(|d| d.data_local_dir().to_path_buf())
        .unwrap_or_else(|| PathBuf::from("agentd-state"))
}

/// Loads the keys from `dir`, or creates them (and the directory) on first start.
/// Returns whether they were just created.
pub fn load_or_create(dir: &Path) -> Result<(Keys, bool), StateError> {
    check_dir(dir)?;
    let path = dir.join(STATE_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let f: StateFile = serde_json::from_str(&text)
                .map_err(|_| StateError::Invalid { path: path.clone() })?;
            Ok((
                Keys {
                    machine: f.machine,
                    node: f.node,
                },
                false,
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let keys = Keys {
                machine: MachinePrivate::generate(),
                node: NodePrivate::generate(),
            };
            let json = serde_json::to_vec_pretty(&StateFile {
                machine: keys.machine.clone(),
                node: keys.node.clone(),
            })
            .map_err(|_| StateError::Invalid { path: path.clone() })?;
            proto::secretfile::write_private(&path, &json)
                .map_err(|source| StateError::Write { path, source })?;
            Ok((keys, true))
        }
        Err(source) => Err(StateError::Read { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_created_once_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let (k1, created) = load_or_create(dir.path()).unwrap();
        assert!(created);
        let (k2, created) = load_or_create(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(k1.node.public(), k2.node.public());
        assert_eq!(k1.machine.public(), k2.machine.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join(STATE_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Debug output never shows the private keys.
        let text = std::fs::read_to_string(dir.path().join(STATE_FILE)).unwrap();
        let secret = text.split('"').find(|s| s.starts_with("privkey:")).unwrap();
        assert!(!format!("{k1:?}").contains(&secret[8..]));
        std::fs::write(dir.path().join(STATE_FILE), "garbage").unwrap();
        assert!(matches!(
            load_or_create(dir.path()),
            Err(StateError::Invalid { .. })
        ));
    }

    #[cfg(unix)]
    #[test]
    fn a_directory_others_can_write_to_is_refused_and_a_missing_one_made_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let fresh = dir.path().join("a/b");
        load_or_create(&fresh).unwrap();
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);

        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        for bad in [0o777, 0o770, 0o1777, 0o702] {
            std::fs::set_permissions(&open, std::fs::Permissions::from_mode(bad)).unwrap();
            let err = load_or_create(&open).unwrap_err();
            assert!(matches!(err, StateError::Unsafe { .. }), "{bad:o}: {err}");
            assert!(err.to_string().contains("other users may write"), "{err}");
            assert!(!open.join(STATE_FILE).exists());
        }
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        load_or_create(&open).unwrap();

        // A file where the directory should be.
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            load_or_create(&file),
            Err(StateError::Unsafe { .. })
        ));
    }

    #[cfg(unix)]
    #[test]
    fn a_directory_of_another_user_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            return; // only root can make a directory owned by someone else
        }
        let dir = tempfile::tempdir().unwrap();
        let theirs = dir.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        let err = load_or_create(&theirs).unwrap_err();
        assert!(err.to_string().contains("belongs to user 65534"), "{err}");
    }
}
