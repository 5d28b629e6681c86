//! controld's database: users, pre-auth keys and nodes, behind the [`Store`] trait so a
//! PostgreSQL implementation can be added later. [`SqliteStore`] keeps everything in one
//! file (WAL mode, so the admin commands can run while the server does). Every change
//! that touches more than one row runs in one transaction: a crash never leaves a
//! half-registered node.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::Mutex;

use proto::{DiscoPublic, MachinePublic, NodePublic};
use rand::RngCore as _;
use rusqlite::{params, Connection, OptionalExtension, Row};
use sha2::{Digest, Sha256};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("no such {0}")]
    NotFound(&'static str),
    #[error("{0} already exists")]
    Exists(String),
    #[error("the address space 100.64.0.0/10 is full")]
    AddressesExhausted,
    #[error("database schema version {0} is newer than this controld understands")]
    SchemaTooNew(i64),
}

/// Why a registration was refused. Each says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterRefusal {
    #[error("unknown auth key: create one with `controld keys create`")]
    UnknownKey,
    #[error("auth key has expired: create a new one with `controld keys create`")]
    ExpiredKey,
    #[error("single-use auth key was already used: create a new one")]
    UsedKey,
    #[error("node key is registered to another machine")]
    NodeKeyOwnedElsewhere,
    #[error("this machine is not registered: log in with an auth key")]
    NotRegistered,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub id: i64,
    pub name: String,
    pub created: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreAuthKeyRecord {
    pub id: i64,
    /// The first characters of the key, to recognise it in listings.
    pub prefix: String,
    pub user_id: i64,
    pub reusable: bool,
    pub ephemeral: bool,
    pub used: bool,
    /// Unix seconds.
    pub expires: i64,
    pub created: i64,
    /// ACL tags the nodes it registers get (`tag:server`).
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub id: i64,
    pub user_id: i64,
    pub machine_key: MachinePublic,
    pub node_key: NodePublic,
    pub disco_key: Option<DiscoPublic>,
    pub hostname: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub endpoints: Vec<String>,
    pub home_derp: i32,
    /// Unix seconds; `None` = never expires.
    pub expiry: Option<i64>,
    pub ephemeral: bool,
    pub created: i64,
    pub last_seen: Option<i64>,
    /// The OS the node reported at registration.
    pub os: String,
    /// ACL tags, from the pre-auth key it registered with; a tagged node is owned by its
    /// tags, not its user.
    pub tags: Vec<String>,
}

impl NodeRecord {
    pub fn is_expired(&self, now: i64) -> bool {
        self.expiry.is_some_and(|e| e <= now)
    }
}

/// What a node asks for when it registers.
#[derive(Debug, Clone)]
pub struct Registration<'a> {
    pub machine_key: MachinePublic,
    pub node_key: NodePublic,
    /// The previous node key when rotating (zero otherwise).
    pub old_node_key: NodePublic,
    pub hostname: &'a str,
    /// The OS the node reports (`linux`, `macOS`, …); may be empty.
    pub os: &'a str,
    /// `None`: re-registration of a known machine without a key.
    pub auth_key: Option<&'a str>,
    pub now: i64,
}

/// The database behind controld.
pub trait Store: Send + Sync {
    fn create_user(&self, name: &str, now: i64) -> Result<UserRecord, StoreError>;
    fn users(&self) -> Result<Vec<UserRecord>, StoreError>;
    fn user_by_name(&self, name: &str) -> Result<Option<UserRecord>, StoreError>;
    /// Creates a key and returns it in full (the only time it is shown) with its record.
    fn create_preauth_key(
        &self,
        user_id: i64,
        reusable: bool,
        ephemeral: bool,
        tags: &[String],
        expires: i64,
        now: i64,
    ) -> Result<(String, PreAuthKeyRecord), StoreError>;
    fn preauth_keys(&self) -> Result<Vec<PreAuthKeyRecord>, StoreError>;
    fn expire_preauth_key(&self, id: i64, now: i64) -> Result<(), StoreError>;
    /// Registers (or re-registers, or rotates the key of) a machine, atomically.
    fn register(
        &self,
        reg: &Registration<'_>,
    ) -> Result<Result<NodeRecord, RegisterRefusal>, StoreError>;
    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;
    fn node_by_node_key(&self, key: &NodePublic) -> Result<Option<NodeRecord>, StoreError>;
    fn node_by_machine_key(&self, key: &MachinePublic) -> Result<Option<NodeRecord>, StoreError>;
    /// Updates what a node reports about itself (map requests).
    fn update_node_status(
        &self,
        id: i64,
        disco_key: Option<&DiscoPublic>,
        endpoints: &[String],
        home_derp: i32,
        now: i64,
    ) -> Result<(), StoreError>;
    fn delete_node(&self, id: i64) -> Result<(), StoreError>;
    /// Sets the node's expiry to `at` (a time in the past expires it now).
    fn expire_node(&self, id: i64, at: i64) -> Result<(), StoreError>;
    /// A number that changes whenever any connection (another process too) commits.
    fn change_counter(&self) -> Result<i64, StoreError>;
}

/// SQLite implementation of [`Store`].
#[derive(Debug)]
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

const SCHEMA_VERSION: i64 = 3;
const MIGRATIONS: &[&str] = &[
    // 1: initial schema
    "CREATE TABLE users (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created INTEGER NOT NULL
     );
     CREATE TABLE preauth_keys (
        id INTEGER PRIMARY KEY,
        key_hash BLOB NOT NULL UNIQUE,
        prefix TEXT NOT NULL,
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        reusable INTEGER NOT NULL,
        ephemeral INTEGER NOT NULL,
        used INTEGER NOT NULL DEFAULT 0,
        expires INTEGER NOT NULL,
        created INTEGER NOT NULL
     );
     CREATE TABLE nodes (
        id INTEGER PRIMARY KEY,
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        machine_key TEXT NOT NULL UNIQUE,
        node_key TEXT NOT NULL UNIQUE,
        disco_key TEXT,
        hostname TEXT NOT NULL,
        ip_offset INTEGER NOT NULL UNIQUE,
        endpoints TEXT NOT NULL DEFAULT '[]',
        home_derp INTEGER NOT NULL DEFAULT 0,
        expiry INTEGER,
        ephemeral INTEGER NOT NULL DEFAULT 0,
        created INTEGER NOT NULL,
        last_seen INTEGER
     );",
    // 2: the OS each node reports (shown to its peers)
    "ALTER TABLE nodes ADD COLUMN os TEXT NOT NULL DEFAULT '';",
    // 3: ACL tags of pre-auth keys and of the nodes they register (JSON lists)
    "ALTER TABLE preauth_keys ADD COLUMN tags TEXT NOT NULL DEFAULT '[]';
     ALTER TABLE nodes ADD COLUMN tags TEXT NOT NULL DEFAULT '[]';",
];

/// Offsets into 100.64.0.0/10 (and the same offset in fd7a:115c:a1e0::/48).
const MAX_OFFSET: u32 = (1 << 22) - 2;
/// 100.100.100.100 is Tailscale's service address: never hand it out.
const RESERVED_OFFSET: u32 = (36 << 16) | (100 << 8) | 100;

pub fn ipv4_for(offset: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + offset)
}

pub fn ipv6_for(offset: u32) -> Ipv6Addr {
    let base = u128::from(
        "fd7a:115c:a1e0::"
            .parse::<Ipv6Addr>()
            .unwrap_or(Ipv6Addr::UNSPECIFIED),
    );
    Ipv6Addr::from(base + u128::from(offset))
}

fn hash_key(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

fn node_from_row(row: &Row<'_>) -> rusqlite::Result<NodeRecord> {
    let parse_err = |i: usize, e: String| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e.into())
    };
    let machine: String = row.get(2)?;
    let node: String = row.get(3)?;
    let disco: Option<String> = row.get(4)?;
    let offset: u32 = row.get(6)?;
    let endpoints: String = row.get(7)?;
    Ok(NodeRecord {
        id: row.get(0)?,
        user_id: row.get(1)?,
        machine_key: machine
            .parse()
            .map_err(|e: proto::KeyParseError| parse_err(2, e.to_string()))?,
        node_key: node
            .parse()
            .map_err(|e: proto::KeyParseError| parse_err(3, e.to_string()))?,
        disco_key: disco
            .map(|d| d.parse())
            .transpose()
            .map_err(|e: proto::KeyParseError| parse_err(4, e.to_string()))?,
        hostname: row.get(5)?,
        ipv4: ipv4_for(offset),
        ipv6: ipv6_for(offset),
        endpoints: serde_json::from_str(&endpoints).unwrap_or_default(),
        home_derp: row.get(8)?,
        expiry: row.get(9)?,
        ephemeral: row.get(10)?,
        created: row.get(11)?,
        last_seen: row.get(12)?,
        os: row.get(13)?,
        tags: tags_from(&row.get::<_, String>(14)?),
    })
}

const NODE_COLUMNS: &str = "id, user_id, machine_key, node_key, disco_key, hostname, ip_offset, \
     endpoints, home_derp, expiry, ephemeral, created, last_seen, os, tags";

/// A stored tag list (JSON); unreadable = no tags (a tag grants access, so never guess).
fn tags_from(json: &str) -> Vec<String> {
    serde_json::from_str(json).unwrap_or_default()
}

const KEY_COLUMNS: &str = "id, prefix, user_id, reusable, ephemeral, used, expires, created, tags";

fn key_from_row(row: &Row<'_>) -> rusqlite::Result<PreAuthKeyRecord> {
    Ok(PreAuthKeyRecord {
        id: row.get(0)?,
        prefix: row.get(1)?,
        user_id: row.get(2)?,
        reusable: row.get(3)?,
        ephemeral: row.get(4)?,
        used: row.get(5)?,
        expires: row.get(6)?,
        created: row.get(7)?,
        tags: tags_from(&row.get::<_, String>(8)?),
    })
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        Self::migrate(conn)
    }

    /// An in-memory database (tests).
    pub fn in_memory() -> Result<Self, StoreError> {
        let conn = Connection::open_in_memory()?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        Self::migrate(conn)
    }

    fn migrate(mut conn: Connection) -> Result<Self, StoreError> {
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew(version));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", i as i64 + 1)?;
            tx.commit()?;
        }
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store for SqliteStore {
    fn create_user(&self, name: &str, now: i64) -> Result<UserRecord, StoreError> {
        let conn = self.conn();
        match conn.execute(
            "INSERT INTO users (name, created) VALUES (?1, ?2)",
            params![name, now],
        ) {
            Ok(_) => Ok(UserRecord {
                id: conn.last_insert_rowid(),
                name: name.to_string(),
                created: now,
            }),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::Exists(format!("user {name:?}")))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn users(&self) -> Result<Vec<UserRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id, name, created FROM users ORDER BY id")?;
        let rows = stmt.query_map([], |r| {
            Ok(UserRecord {
                id: r.get(0)?,
                name: r.get(1)?,
                created: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn user_by_name(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT id, name, created FROM users WHERE name = ?1",
                params![name],
                |r| {
                    Ok(UserRecord {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        created: r.get(2)?,
                    })
                },
            )
            .optional()?)
    }

    fn create_preauth_key(
        &self,
        user_id: i64,
        reusable: bool,
        ephemeral: bool,
        tags: &[String],
        expires: i64,
        now: i64,
    ) -> Result<(String, PreAuthKeyRecord), StoreError> {
        let mut raw = [0u8; 24];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        let key = format!("agentd-auth-{}", hex::encode(raw));
        let prefix = key[..16].to_string();
        let conn = self.conn();
        let exists: bool = conn
            .query_row(
                "SELECT 1 FROM users WHERE id = ?1",
                params![user_id],
                |_| Ok(true),
            )
            .optional()?
            .unwrap_or(false);
        if !exists {
            return Err(StoreError::NotFound("user"));
        }
        conn.execute(
            "INSERT INTO preauth_keys (key_hash, prefix, user_id, reusable, ephemeral, expires, created, tags)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                hash_key(&key),
                prefix,
                user_id,
                reusable,
                ephemeral,
                expires,
                now,
                serde_json::to_string(tags).unwrap_or_else(|_| "[]".into())
            ],
        )?;
        let record = PreAuthKeyRecord {
            id: conn.last_insert_rowid(),
            prefix,
            user_id,
            reusable,
            ephemeral,
            used: false,
            expires,
            created: now,
            tags: tags.to_vec(),
        };
        Ok((key, record))
    }

    fn preauth_keys(&self) -> Result<Vec<PreAuthKeyRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {KEY_COLUMNS} FROM preauth_keys ORDER BY id"
        ))?;
        let rows = stmt.query_map([], key_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn expire_preauth_key(&self, id: i64, now: i64) -> Result<(), StoreError> {
        let n = self.conn().execute(
            "UPDATE preauth_keys SET expires = MIN(expires, ?2) WHERE id = ?1",
            params![id, now],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound("auth key"));
        }
        Ok(())
    }

    fn register(
        &self,
        reg: &Registration<'_>,
    ) -> Result<Result<NodeRecord, RegisterRefusal>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let machine = reg.machine_key.to_string();
        let node_key = reg.node_key.to_string();
        // A node key may belong to one machine only.
        let owner: Option<String> = tx
            .query_row(
                "SELECT machine_key FROM nodes WHERE node_key = ?1",
                params![node_key],
                |r| r.get(0),
            )
            .optional()?;
        if owner.as_ref().is_some_and(|m| *m != machine) {
            return Ok(Err(RegisterRefusal::NodeKeyOwnedElsewhere));
        }
        let existing: Option<NodeRecord> = tx
            .query_row(
                &format!("SELECT {NODE_COLUMNS} FROM nodes WHERE machine_key = ?1"),
                params![machine],
                node_from_row,
            )
            .optional()?;
        let mut user_id = existing.as_ref().map(|n| n.user_id);
        let mut ephemeral = existing.as_ref().is_some_and(|n| n.ephemeral);
        let mut tags = existing
            .as_ref()
            .map(|n| n.tags.clone())
            .unwrap_or_default();
        // A device that is registered and current, coming back with the key it first
        // joined with (a restarted daemon still has it in its settings), is a plain
        // re-registration: a single-use key it already spent must not lock it out.
        let current = existing
            .as_ref()
            .is_some_and(|n| n.node_key == reg.node_key && !n.is_expired(reg.now));
        let auth_key = if current { None } else { reg.auth_key };
        if let Some(key) = auth_key {
            let found: Option<PreAuthKeyRecord> = tx
                .query_row(
                    &format!("SELECT {KEY_COLUMNS} FROM preauth_keys WHERE key_hash = ?1"),
                    params![hash_key(key)],
                    key_from_row,
                )
                .optional()?;
            let Some(k) = found else {
                return Ok(Err(RegisterRefusal::UnknownKey));
            };
            if k.expires <= reg.now {
                return Ok(Err(RegisterRefusal::ExpiredKey));
            }
            if k.used && !k.reusable {
                return Ok(Err(RegisterRefusal::UsedKey));
            }
            tx.execute(
                "UPDATE preauth_keys SET used = 1 WHERE id = ?1",
                params![k.id],
            )?;
            user_id = Some(k.user_id);
            ephemeral = k.ephemeral;
            tags = k.tags;
        } else if existing.is_none() {
            return Ok(Err(RegisterRefusal::NotRegistered));
        }
        let Some(user_id) = user_id else {
            return Ok(Err(RegisterRefusal::NotRegistered));
        };
        let tags_json = serde_json::to_string(&tags).unwrap_or_else(|_| "[]".into());
        let id = match &existing {
            Some(n) => {
                // Re-registration or key rotation: same node, same addresses, key refreshed;
                // an auth key also renews an expired node.
                let expiry = if reg.auth_key.is_some() {
                    None
                } else {
                    n.expiry
                };
                tx.execute(
                    "UPDATE nodes SET node_key = ?2, hostname = ?3, user_id = ?4, expiry = ?5,
                     ephemeral = ?6, os = ?7, tags = ?8 WHERE id = ?1",
                    params![
                        n.id,
                        node_key,
                        reg.hostname,
                        user_id,
                        expiry,
                        ephemeral,
                        reg.os,
                        tags_json
                    ],
                )?;
                n.id
            }
            None => {
                let used: BTreeSet<u32> = {
                    let mut stmt = tx.prepare("SELECT ip_offset FROM nodes")?;
                    let rows = stmt.query_map([], |r| r.get::<_, u32>(0))?;
                    rows.collect::<Result<_, _>>()?
                };
                let offset = (1..=MAX_OFFSET)
                    .find(|o| *o != RESERVED_OFFSET && !used.contains(o))
                    .ok_or(StoreError::AddressesExhausted)?;
                tx.execute(
                    "INSERT INTO nodes (user_id, machine_key, node_key, hostname, ip_offset,
                     ephemeral, created, os, tags) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    params![
                        user_id,
                        machine,
                        node_key,
                        reg.hostname,
                        offset,
                        ephemeral,
                        reg.now,
                        reg.os,
                        tags_json
                    ],
                )?;
                tx.last_insert_rowid()
            }
        };
        let node = tx.query_row(
            &format!("SELECT {NODE_COLUMNS} FROM nodes WHERE id = ?1"),
            params![id],
            node_from_row,
        )?;
        tx.commit()?;
        Ok(Ok(node))
    }

    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("SELECT {NODE_COLUMNS} FROM nodes ORDER BY id"))?;
        let rows = stmt.query_map([], node_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn node_by_node_key(&self, key: &NodePublic) -> Result<Option<NodeRecord>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {NODE_COLUMNS} FROM nodes WHERE node_key = ?1"),
                params![key.to_string()],
                node_from_row,
            )
            .optional()?)
    }

    fn node_by_machine_key(&self, key: &MachinePublic) -> Result<Option<NodeRecord>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {NODE_COLUMNS} FROM nodes WHERE machine_key = ?1"),
                params![key.to_string()],
                node_from_row,
            )
            .optional()?)
    }

    fn update_node_status(
        &self,
        id: i64,
        disco_key: Option<&DiscoPublic>,
        endpoints: &[String],
        home_derp: i32,
        now: i64,
    ) -> Result<(), StoreError> {
        let endpoints = serde_json::to_string(endpoints).unwrap_or_else(|_| "[]".into());
        self.conn().execute(
            "UPDATE nodes SET disco_key = ?2, endpoints = ?3, home_derp = ?4, last_seen = ?5
             WHERE id = ?1",
            params![
                id,
                disco_key.map(|d| d.to_string()),
                endpoints,
                home_derp,
                now
            ],
        )?;
        Ok(())
    }

    fn delete_node(&self, id: i64) -> Result<(), StoreError> {
        if self
            .conn()
            .execute("DELETE FROM nodes WHERE id = ?1", params![id])?
            == 0
        {
            return Err(StoreError::NotFound("node"));
        }
        Ok(())
    }

    fn expire_node(&self, id: i64, at: i64) -> Result<(), StoreError> {
        let n = self.conn().execute(
            "UPDATE nodes SET expiry = ?2 WHERE id = ?1",
            params![id, at],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound("node"));
        }
        Ok(())
    }

    fn change_counter(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn()
            .pragma_query_value(None, "data_version", |r| r.get(0))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{MachinePrivate, NodePrivate};

    fn reg<'a>(
        m: &MachinePublic,
        n: &NodePublic,
        key: Option<&'a str>,
        now: i64,
    ) -> Registration<'a> {
        Registration {
            machine_key: *m,
            node_key: *n,
            old_node_key: NodePublic::default(),
            hostname: "host",
            os: "linux",
            auth_key: key,
            now,
        }
    }

    #[test]
    fn register_allocates_stable_unique_addresses() {
        let s = SqliteStore::in_memory().unwrap();
        let u = s.create_user("alice", 0).unwrap();
        let (key, _) = s
            .create_preauth_key(u.id, true, false, &[], 1000, 0)
            .unwrap();
        let (m1, n1) = (
            MachinePrivate::generate().public(),
            NodePrivate::generate().public(),
        );
        let (m2, n2) = (
            MachinePrivate::generate().public(),
            NodePrivate::generate().public(),
        );
        let a = s.register(&reg(&m1, &n1, Some(&key), 1)).unwrap().unwrap();
        let b = s.register(&reg(&m2, &n2, Some(&key), 1)).unwrap().unwrap();
        assert_eq!(a.ipv4, Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(b.ipv4, Ipv4Addr::new(100, 64, 0, 2));
        assert_eq!(a.ipv6, "fd7a:115c:a1e0::1".parse::<Ipv6Addr>().unwrap());
        // Key rotation keeps the node and its addresses.
        let n1b = NodePrivate::generate().public();
        let again = s.register(&reg(&m1, &n1b, None, 2)).unwrap().unwrap();
        assert_eq!((again.id, again.ipv4, again.node_key), (a.id, a.ipv4, n1b));
        // Deleting a frees its address for the next node; b keeps its own.
        s.delete_node(a.id).unwrap();
        let (m3, n3) = (
            MachinePrivate::generate().public(),
            NodePrivate::generate().public(),
        );
        let c = s.register(&reg(&m3, &n3, Some(&key), 3)).unwrap().unwrap();
        assert_eq!(c.ipv4, Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(s.node_by_node_key(&n2).unwrap().unwrap().ipv4, b.ipv4);
    }

    #[test]
    fn bad_keys_and_stolen_node_keys_are_refused_without_changes() {
        let s = SqliteStore::in_memory().unwrap();
        let u = s.create_user("alice", 0).unwrap();
        let (once, _) = s
            .create_preauth_key(u.id, false, false, &[], 1000, 0)
            .unwrap();
        let (old, old_rec) = s.create_preauth_key(u.id, true, false, &[], 10, 0).unwrap();
        let (m1, n1) = (
            MachinePrivate::generate().public(),
            NodePrivate::generate().public(),
        );
        let (m2, n2) = (
            MachinePrivate::generate().public(),
            NodePrivate::generate().public(),
        );
        assert_eq!(
            s.register(&reg(&m1, &n1, Some("agentd-auth-nope"), 1))
                .unwrap(),
            Err(RegisterRefusal::UnknownKey)
        );
        assert_eq!(
            s.register(&reg(&m1, &n1, Some(&old), 10)).unwrap(),
            Err(RegisterRefusal::ExpiredKey)
        );
        assert_eq!(
            s.register(&reg(&m1, &n1, None, 1)).unwrap(),
            Err(RegisterRefusal::NotRegistered)
        );
        assert!(s.nodes().unwrap().is_empty());
        s.register(&reg(&m1, &n1, Some(&once), 1)).unwrap().unwrap();
        assert_eq!(
            s.register(&reg(&m2, &n2, Some(&once), 1)).unwrap(),
            Err(RegisterRefusal::UsedKey)
        );
        assert_eq!(
            s.register(&reg(&m2, &n1, Some(&once), 1)).unwrap(),
            Err(RegisterRefusal::NodeKeyOwnedElsewhere)
        );
        assert_eq!(s.nodes().unwrap().len(), 1);
        // The same device restarting with the single-use key it joined with: the same
        // node, not a refusal.
        let again = s.register(&reg(&m1, &n1, Some(&once), 5)).unwrap().unwrap();
        assert_eq!(s.nodes().unwrap().len(), 1);
        assert_eq!(again.node_key, n1);
        s.expire_preauth_key(old_rec.id, 0).unwrap();
        assert!(s
            .preauth_keys()
            .unwrap()
            .iter()
            .all(|k| !k.prefix.is_empty() && k.prefix.len() < 20));
    }

    #[test]
    fn file_database_survives_reopen_and_reports_other_writers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("controld.db");
        let s = SqliteStore::open(&path).unwrap();
        let u = s.create_user("alice", 0).unwrap();
        let (key, _) = s
            .create_preauth_key(u.id, true, false, &[], 1000, 0)
            .unwrap();
        let (m, n) = (
            MachinePrivate::generate().public(),
            NodePrivate::generate().public(),
        );
        let node = s.register(&reg(&m, &n, Some(&key), 1)).unwrap().unwrap();
        let before = s.change_counter().unwrap();
        // Another process (here: another connection) deletes the node.
        let other = SqliteStore::open(&path).unwrap();
        other.delete_node(node.id).unwrap();
        assert_ne!(s.change_counter().unwrap(), before);
        assert!(s.nodes().unwrap().is_empty());
        drop(s);
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.users().unwrap().len(), 1);
        assert!(s.create_user("alice", 0).is_err());
    }
}
