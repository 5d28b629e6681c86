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
}
