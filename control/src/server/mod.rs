//! controld, the coordination server (feature `server`).
//!
//! [`ControlServer::start`] binds the listener and runs: the HTTP front (`/key`,
//! `/ts2021`, `/verify`, `/health`, `/metrics`), one task per ts2021 connection serving
//! HTTP/2 (`/machine/register`, `/machine/map`), and a watcher that reloads the registry
//! snapshot whenever the database changes (the admin commands write to it directly).
//! Map streams follow the snapshot through a watch channel and send deltas.

mod http;
pub mod mapper;
pub mod policy;
mod session;
pub mod store;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::relaymap::RelayMap;
use proto::MachinePrivate;
use tokio::net::TcpListener;
use tokio::sync::watch;

use mapper::{MapSettings, Snapshot};
use store::{Store, StoreError};

/// Everything controld needs to run.
#[derive(Clone)]
pub struct ControlConfig {
    pub listen: SocketAddr,
    /// `None` = plain HTTP (loopback or behind a TLS proxy).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The control key (Noise static key) clients pin via `/key`.
    pub control_key: MachinePrivate,
    pub relay_map: RelayMap,
    /// DNS suffix of node names.
    pub domain: String,
    /// Keep-alive interval on map streams.
    pub keepalive: Duration,
    /// How often the database is checked for changes made by other processes.
    pub poll_interval: Duration,
    /// The access policy file (Tailscale's policy format, HuJSON); `None`: everything is
    /// allowed. Read at start, when it changes, and on [`RunningControl::reload_policy`].
    pub policy: Option<PathBuf>,
}

impl std::fmt::Debug for ControlConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlConfig")
            .field("listen", &self.listen)
            .field("tls", &self.tls.is_some())
            .field("control_key", &self.control_key.public())
            .finish_non_exhaustive()
    }
}

impl ControlConfig {
    pub fn new(listen: SocketAddr, control_key: MachinePrivate, relay_map: RelayMap) -> Self {
        ControlConfig {
            listen,
            tls: None,
            control_key,
            relay_map,
            domain: "agentd.internal".into(),
            keepalive: Duration::from_secs(50),
            poll_interval: Duration::from_millis(200),
            policy: None,
        }
    }
}

/// Counters shown on `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub noise_handshakes: AtomicU64,
    pub noise_failures: AtomicU64,
    pub registrations: AtomicU64,
    pub registrations_refused: AtomicU64,
    pub map_streams: AtomicU64,
    pub map_messages: AtomicU64,
    pub lite_updates: AtomicU64,
    pub verify_allowed: AtomicU64,
    pub verify_denied: AtomicU64,
}

impl Metrics {
    fn render(&self, streaming: usize, nodes: usize) -> String {
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "# TYPE controld_nodes gauge\ncontrold_nodes {nodes}\n\
             # TYPE controld_map_streams_open gauge\ncontrold_map_streams_open {streaming}\n\
             # TYPE controld_noise_handshakes_total counter\ncontrold_noise_handshakes_total {}\n\
             # TYPE controld_noise_failures_total counter\ncontrold_noise_failures_total {}\n\
             # TYPE controld_registrations_total counter\ncontrold_registrations_total {}\n\
             # TYPE controld_registrations_refused_total counter\ncontrold_registrations_refused_total {}\n\
             # TYPE controld_map_streams_total counter\ncontrold_map_streams_total {}\n\
             # TYPE controld_map_messages_total counter\ncontrold_map_messages_total {}\n\
             # TYPE controld_lite_updates_total counter\ncontrold_lite_updates_total {}\n\
             controld_verify_total{{result=\"allowed\"}} {}\ncontrold_verify_total{{result=\"denied\"}} {}\n",
            c(&self.noise_handshakes),
            c(&self.noise_failures),
            c(&self.registrations),
            c(&self.registrations_refused),
            c(&self.map_streams),
            c(&self.map_messages),
            c(&self.lite_updates),
            c(&self.verify_allowed),
            c(&self.verify_denied),
        )
    }
}

pub(crate) struct Shared {
    pub cfg: ControlConfig,
    pub store: Arc<dyn Store>,
    pub settings: MapSettings,
    pub snapshot: watch::Sender<Arc<Snapshot>>,
    /// Open map streams per node ID.
    online: Mutex<BTreeMap<i64, usize>>,
    pub metrics: Metrics,
    refresh_lock: tokio::sync::Mutex<()>,
    /// The policy in force and the file text it came from.
    policy: Mutex<Option<(Arc<policy::Policy>, String)>>,
}

pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Shared {
    /// Reloads the registry and publishes it if anything changed.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let _serial = self.refresh_lock.lock().await;
        let nodes = self.store.nodes()?;
        let online = self
            .online
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        let policy = self
            .policy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(p, _)| p.clone());
        let users: BTreeMap<i64, String> = match &policy {
            Some(_) => self
                .store
                .users()?
                .into_iter()
                .map(|u| (u.id, u.name))
                .collect(),
            None => BTreeMap::new(),
        };
        let prev = self.snapshot.borrow().clone();
        let snap = Snapshot::build(
            nodes.into_iter().map(|n| (n.id, n)).collect(),
            online,
            now_unix(),
            &self.settings.domain,
            policy.as_ref().map(|p| (p, &users)),
            &prev,
        );
        if !snap.same_as(&prev) {
            self.snapshot.send_replace(Arc::new(snap));
        }
        Ok(())
    }

    pub fn set_online(&self, id: i64, up: bool) {
        let mut o = self.online.lock().unwrap_or_else(|p| p.into_inner());
        let n = o.entry(id).or_insert(0);
        if up {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                o.remove(&id);
            }
        }
    }

    pub fn streaming(&self) -> usize {
        self.online.lock().map(|o| o.values().sum()).unwrap_or(0)
    }

    /// Reads the policy file again; a valid policy that differs from the one in force
    /// replaces it and reaches every stream. Ok(true) when it changed; an invalid one is
    /// refused (the one in force stays) with its file, line and reason.
    pub async fn reload_policy(&self) -> Result<bool, String> {
        let Some(path) = &self.cfg.policy else {
            return Ok(false);
        };
        let text = read_policy_file(path)?;
        let same = self
            .policy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|(_, t)| *t == text);
        if same {
            return Ok(false);
        }
        let parsed =
            policy::Policy::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        *self.policy.lock().unwrap_or_else(|p| p.into_inner()) = Some((Arc::new(parsed), text));
        self.refresh().await.map_err(|e| e.to_string())?;
        Ok(true)
    }
}

/// Policy files larger than this are refused (a policy is a few KiB; this bounds what a
/// mistaken path could make controld read).
const MAX_POLICY_BYTES: u64 = 4 << 20;

fn read_policy_file(path: &std::path::Path) -> Result<String, String> {
    use std::io::Read as _;
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut text = String::new();
    f.take(MAX_POLICY_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if text.len() as u64 > MAX_POLICY_BYTES {
        return Err(format!(
            "{}: larger than {} MiB",
            path.display(),
            MAX_POLICY_BYTES >> 20
        ));
    }
    Ok(text)
}

/// Checks a policy file without a server (`controld policy check`).
pub fn check_policy_file(path: &std::path::Path) -> Result<policy::Policy, String> {
    let text = read_policy_file(path)?;
    policy::Policy::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// A running controld.
pub struct RunningControl {
    shared: Arc<Shared>,
    addr: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for RunningControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RunningControl({})", self.addr)
    }
}

impl RunningControl {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }
    /// Reads the policy file again (SIGHUP). Ok(true) when the policy in force changed;
    /// Err with file, line and reason when the file is invalid (the old one stays).
    pub async fn reload_policy(&self) -> Result<bool, String> {
        self.shared.reload_policy().await
    }
    /// Stops accepting and ends every stream.
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for RunningControl {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The control server.
#[derive(Debug)]
pub struct ControlServer;

impl ControlServer {
    pub async fn start(
        cfg: ControlConfig,
        store: Arc<dyn Store>,
    ) -> Result<RunningControl, std::io::Error> {
        let listener = TcpListener::bind(cfg.listen).await?;
        let addr = listener.local_addr()?;
        let settings = MapSettings {
            domain: cfg.domain.clone(),
            relay_map: Arc::new(cfg.relay_map.clone()),
        };
        let (snapshot, _) = watch::channel(Arc::new(Snapshot::default()));
        let shared = Arc::new(Shared {
            cfg,
            store,
            settings,
            snapshot,
            online: Mutex::new(BTreeMap::new()),
            metrics: Metrics::default(),
            refresh_lock: tokio::sync::Mutex::new(()),
            policy: Mutex::new(None),
        });
        shared
            .reload_policy()
            .await
            .map_err(|e| std::io::Error::other(format!("the policy is not valid: {e}")))?;
        shared
            .refresh()
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        tracing::info!(%addr, tls = shared.cfg.tls.is_some(), key = %shared.cfg.control_key.public(), "controld listening");
        let mut tasks = vec![
            tokio::spawn(http::accept_loop(shared.clone(), listener)),
            tokio::spawn(watch_database(shared.clone())),
        ];
        if let Some(path) = &shared.cfg.policy {
            tracing::info!(path = %path.display(), "access policy in force");
            tasks.push(tokio::spawn(watch_policy(shared.clone())));
        }
        Ok(RunningControl {
            shared,
            addr,
            tasks,
        })
    }
}

/// How often the policy file's metadata is looked at to notice an edit.
const POLICY_POLL: Duration = Duration::from_millis(500);

/// What tells an edited policy file from the one last read: its modification time, size
/// and inode (an editor that replaces the file changes the inode). None: unreadable.
fn policy_stamp(path: &std::path::Path) -> Option<(std::time::SystemTime, u64, u64)> {
    let m = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let ino = 0;
    Some((m.modified().ok()?, m.len(), ino))
}

/// Reloads the policy when its file changes (only then is it read and parsed); an
/// invalid edit is logged and the policy in force stays.
async fn watch_policy(shared: Arc<Shared>) {
    let Some(path) = shared.cfg.policy.clone() else {
        return;
    };
    let mut stamp = policy_stamp(&path);
    loop {
        tokio::time::sleep(POLICY_POLL).await;
        let now = policy_stamp(&path);
        if now == stamp {
            continue;
        }
        stamp = now;
        match shared.reload_policy().await {
            Ok(true) => tracing::info!("access policy reloaded"),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "the edited policy is refused; the previous one stays in force");
            }
        }
    }
}

/// Reloads the registry when another process commits, and every few seconds for expiry.
async fn watch_database(shared: Arc<Shared>) {
    let mut last = shared.store.change_counter().unwrap_or(0);
    let mut ticks = 0u32;
    loop {
        tokio::time::sleep(shared.cfg.poll_interval).await;
        ticks = ticks.wrapping_add(1);
        let counter = match shared.store.change_counter() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the database change counter");
                continue;
            }
        };
        if counter != last || ticks.is_multiple_of(25) {
            last = counter;
            if let Err(e) = shared.refresh().await {
                tracing::warn!(error = %e, "cannot reload the registry");
            }
        }
    }
}
