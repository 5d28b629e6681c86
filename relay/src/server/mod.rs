//! relayd, the DERP relay server (feature `server`).
//!
//! [`Server::start`] binds the listeners and spawns the accept loop, the STUN server,
//! one task per mesh peer and the re-verification loop; [`RunningServer`] reports the
//! bound addresses and shuts everything down, draining queued packets first.
//!
//! Module map: `http` (listener, HTTP endpoints, upgrades), `conn` (one DERP client),
//! `routes` (who is where), `client` (per-client queues), `mesh`, `verify`, `stun`,
//! `metrics`, `ratelimit`, `config` (flags and TOML).

mod client;
pub mod config;
mod conn;
mod http;
mod mesh;
pub mod metrics;
pub mod ratelimit;
mod routes;
pub mod stun;
mod verify;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use proto::{MeshKey, NodePrivate, NodePublic};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{watch, Notify};

use crate::client::RelayTarget;
use metrics::Metrics;
use routes::Routes;

pub use verify::VerifyConfig;

/// A rate and a burst (bytes or connections per second).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: f64,
}

/// Everything a relay server needs to run. Built from flags by `config`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub private_key: NodePrivate,
    /// HTTP(S) listener for `/derp` and the other endpoints.
    pub listen: SocketAddr,
    /// TLS for the listener; `None` = plain HTTP (development).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// STUN listener; `None` = no STUN.
    pub stun_listen: Option<SocketAddr>,
    pub mesh_key: Option<MeshKey>,
    /// The other relays of this region.
    pub mesh_with: Vec<RelayTarget>,
    /// Wait between attempts to re-dial a broken mesh link.
    pub mesh_retry: Duration,
    pub verify: Option<VerifyConfig>,
    /// Per-client receive limit in bytes (mesh peers exempt).
    pub client_rate: Option<RateLimit>,
    /// New connections per second.
    pub accept_rate: Option<RateLimit>,
    /// Interval of server KeepAlive frames (a random 0–5 s is added per connection).
    pub keepalive: Duration,
    pub write_timeout: Duration,
    pub mesh_write_timeout: Duration,
    pub handshake_timeout: Duration,
    pub max_clients: usize,
    /// How long shutdown waits for connections to flush.
    pub drain_timeout: Duration,
    /// Shown on the home page.
    pub hostname: String,
}

impl ServerConfig {
    /// Defaults matching derper's behaviour, plain HTTP on `listen`, no STUN.
    pub fn new(private_key: NodePrivate, listen: SocketAddr) -> Self {
        ServerConfig {
            private_key,
            listen,
            tls: None,
            stun_listen: None,
            mesh_key: None,
            mesh_with: Vec::new(),
            mesh_retry: Duration::from_secs(5),
            verify: None,
            client_rate: None,
            accept_rate: None,
            keepalive: Duration::from_secs(60),
            write_timeout: Duration::from_secs(2),
            mesh_write_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            max_clients: 200_000,
            drain_timeout: Duration::from_secs(5),
            hostname: String::new(),
        }
    }
}

/// State shared by every task of one server.
#[derive(Debug)]
pub(crate) struct Shared {
    pub cfg: ServerConfig,
    pub public: NodePublic,
    pub metrics: Metrics,
    routes: Mutex<Routes>,
    next_id: AtomicU64,
    /// Live connection tasks (accepted sockets, any state).
    live: AtomicUsize,
    all_done: Notify,
    pub shutdown: watch::Receiver<bool>,
}

impl Shared {
    pub fn routes(&self) -> MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }
}

/// Counts a live connection task for shutdown; decrements on drop.
pub(crate) struct LiveGuard(Arc<Shared>);

impl LiveGuard {
    pub fn new(shared: &Arc<Shared>) -> Self {
        shared.live.fetch_add(1, Ordering::SeqCst);
        shared
            .metrics
            .current_connections
            .fetch_add(1, Ordering::Relaxed);
        LiveGuard(shared.clone())
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0
            .metrics
            .current_connections
            .fetch_sub(1, Ordering::Relaxed);
        if self.0.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.all_done.notify_waiters();
        }
    }
}

/// A started server.
#[derive(Debug)]
pub struct RunningServer {
    shared: Arc<Shared>,
    shutdown_tx: watch::Sender<bool>,
    http_addr: SocketAddr,
    stun_addr: Option<SocketAddr>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {error}")]
    Listen {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("cannot listen for STUN on udp {addr}: {error} (another relayd or STUN server running? use --stun-listen or --stun=false)")]
    Stun {
        addr: SocketAddr,
        error: std::io::Error,
    },
}

/// The relay server.
#[derive(Debug)]
pub struct Server;

impl Server {
    /// Binds the listeners and starts serving.
    pub async fn start(cfg: ServerConfig) -> Result<RunningServer, StartError> {
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|error| StartError::Listen {
                addr: cfg.listen,
                error,
            })?;
        let http_addr = listener.local_addr().map_err(|error| StartError::Listen {
            addr: cfg.listen,
            error,
        })?;
        let stun = match cfg.stun_listen {
            Some(addr) => Some(
                UdpSocket::bind(addr)
                    .await
                    .map_err(|error| StartError::Stun { addr, error })?,
            ),
            None => None,
        };
        let stun_addr = stun.as_ref().and_then(|s| s.local_addr().ok());
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            public: cfg.private_key.public(),
            cfg,
            metrics: Metrics::default(),
            routes: Mutex::new(Routes::default()),
            next_id: AtomicU64::new(1),
            live: AtomicUsize::new(0),
            all_done: Notify::new(),
            shutdown: shutdown_rx,
        });
        tracing::info!(
            addr = %http_addr,
            tls = shared.cfg.tls.is_some(),
            key = %shared.public,
            "relay listening"
        );
        let mut tasks = vec![tokio::spawn(http::accept_loop(shared.clone(), listener))];
        if let Some(sock) = stun {
            tracing::info!(addr = ?stun_addr, "STUN listening");
            tasks.push(tokio::spawn(stun::serve(shared.clone(), sock)));
        }
        for (i, target) in shared.cfg.mesh_with.iter().enumerate() {
            tasks.push(tokio::spawn(mesh::run_link(
                shared.clone(),
                i as u64 + 1,
                target.clone(),
            )));
        }
        if let Some(v) = &shared.cfg.verify {
            tasks.push(tokio::spawn(verify::reverify_loop(
                shared.clone(),
                v.clone(),
            )));
        }
        Ok(RunningServer {
            shared,
            shutdown_tx,
            http_addr,
            stun_addr,
            tasks,
        })
    }
}

impl RunningServer {
    /// The bound HTTP(S) address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }
    /// The bound STUN address, if STUN is on.
    pub fn stun_addr(&self) -> Option<SocketAddr> {
        self.stun_addr
    }
    /// The server's public key.
    pub fn public_key(&self) -> NodePublic {
        self.shared.public
    }
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }
    /// Handshaken connections (all keys, duplicates included).
    pub fn connection_count(&self) -> usize {
        self.shared.routes().connection_count()
    }

    /// Stops accepting, asks every connection to flush and close, and waits (up to the
    /// drain timeout) for them to finish.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown_tx.send(true);
        for t in self.tasks.drain(..) {
            t.abort();
        }
        let conns = self.shared.routes().all_connections();
        for c in conns {
            c.close(metrics::CloseReason::Shutdown);
        }
        let deadline = tokio::time::Instant::now() + self.shared.cfg.drain_timeout;
        loop {
            let notified = self.shared.all_done.notified();
            if self.shared.live.load(Ordering::SeqCst) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                tracing::warn!(
                    remaining = self.shared.live.load(Ordering::SeqCst),
                    "drain timeout: closing remaining connections"
                );
                break;
            }
        }
        tracing::info!("relay stopped");
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.shutdown_tx.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}
