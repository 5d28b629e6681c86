//! The DERP client: [`connect`] makes one connection; [`RelayClient`] keeps one alive.
//!
//! `RelayClient` is an actor: a task owns the connection, reconnects with capped,
//! jittered backoff, answers the server's pings, re-sends NotePreferred after every
//! reconnect, and declares the connection dead after `silence_timeout` without a frame
//! (the server sends a keepalive every ~60 s). Callers talk to it through a bounded
//! channel and receive [`RelayEvent`]s on another; sends that find the queue full, or
//! no connection, are dropped and counted, never buffered without bound.

mod conn;
pub mod tls;

pub use conn::{
    connect, handshake, latency_check, ConnectError, RelayConn, RelayReader, RelayTarget,
    RelayWriter,
};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use proto::{NodePrivate, NodePublic};
use rand::Rng as _;
use tokio::sync::mpsc;

use crate::backoff::Backoff;
use crate::frame::{Frame, PeerGoneReason};
use crate::handshake::ClientInfo;

/// Settings of a [`RelayClient`].
#[derive(Debug, Clone)]
pub struct RelayClientConfig {
    pub target: RelayTarget,
    /// Other nodes of the same region, tried in turn when a connection attempt fails.
    pub alternates: Vec<RelayTarget>,
    pub key: NodePrivate,
    pub info: ClientInfo,
    /// Whether this relay is the home region (sent as NotePreferred after each connect).
    pub preferred: bool,
    /// No frame for this long means the connection is dead.
    pub silence_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Depth of the outgoing packet queue.
    pub send_queue: usize,
    /// Depth of the event queue towards the caller.
    pub event_queue: usize,
}

impl RelayClientConfig {
    pub fn new(target: RelayTarget, key: NodePrivate) -> Self {
        RelayClientConfig {
            target,
            alternates: Vec::new(),
            key,
            info: ClientInfo::regular(),
            preferred: false,
            silence_timeout: Duration::from_secs(120),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            send_queue: 32,
            event_queue: 64,
        }
    }
}

/// What a [`RelayClient`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEvent {
    Connected {
        server_key: NodePublic,
        /// The node's address that answered: which of the region's nodes this is.
        remote: SocketAddr,
    },
    Packet {
        src: NodePublic,
        payload: Bytes,
    },
    PeerGone {
        peer: NodePublic,
        reason: PeerGoneReason,
    },
    PeerPresent {
        peer: NodePublic,
        addr: Option<SocketAddr>,
        flags: u8,
    },
    /// The server reports a problem (empty = healthy again).
    Health {
        problem: String,
    },
    Disconnected {
        error: String,
        retry_in: Duration,
    },
}

/// Counters of a [`RelayClient`].
#[derive(Debug, Default)]
pub struct RelayClientStats {
    pub connects: AtomicU64,
    pub packets_sent: AtomicU64,
    pub packets_received: AtomicU64,
    /// Sends dropped because the outgoing queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Sends dropped because there was no connection when they were dequeued.
    pub dropped_not_connected: AtomicU64,
    pub pings_answered: AtomicU64,
}

enum Command {
    Send { dst: NodePublic, payload: Bytes },
    Preferred(bool),
}

/// Why a send was refused at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("relay send queue is full")]
    QueueFull,
    #[error("relay client has stopped")]
    Stopped,
}

/// A handle to a connection kept alive in the background. Dropping every handle stops it.
#[derive(Debug, Clone)]
pub struct RelayClient {
    cmds: mpsc::Sender<Command>,
    stats: Arc<RelayClientStats>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Send { dst, payload } => {
                write!(f, "Send({}, {}B)", dst.short(), payload.len())
            }
            Command::Preferred(p) => write!(f, "Preferred({p})"),
        }
    }
}

impl RelayClient {
    /// Starts the client task; events arrive on the returned receiver.
    pub fn spawn(config: RelayClientConfig) -> (RelayClient, mpsc::Receiver<RelayEvent>) {
        let (cmd_tx, cmd_rx) = mpsc::channel(config.send_queue.max(1));
        let (ev_tx, ev_rx) = mpsc::channel(config.event_queue.max(1));
        let stats = Arc::new(RelayClientStats::default());
        tokio::spawn(run(config, cmd_rx, ev_tx, stats.clone()));
        (
            RelayClient {
                cmds: cmd_tx,
                stats,
            },
            ev_rx,
        )
    }

    /// Queues a packet for `dst`; fails at once if the queue is full.
    pub fn try_send(&self, dst: NodePublic, payload: Bytes) -> Result<(), SendError> {
        self.cmds
            .try_send(Command::Send { dst, payload })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => {
                    self.stats
                        .dropped_queue_full
                        .fetch_add(1, Ordering::Relaxed);
                    SendError::QueueFull
                }
                mpsc::error::TrySendError::Closed(_) => SendError::Stopped,
            })
    }

    /// Queues a packet for `dst`, waiting for room in the queue.
    pub async fn send(&self, dst: NodePublic, payload: Bytes) -> Result<(), SendError> {
        self.cmds
            .send(Command::Send { dst, payload })
            .await
            .map_err(|_| SendError::Stopped)
    }

    /// Marks this relay as (not) the home region; sent now and after every reconnect.
    pub async fn set_preferred(&self, preferred: bool) -> Result<(), SendError> {
        self.cmds
            .send(Command::Preferred(preferred))
            .await
            .map_err(|_| SendError::Stopped)
    }

    pub fn stats(&self) -> &RelayClientStats {
        &self.stats
    }
}

async fn run(
    mut config: RelayClientConfig,
    mut cmds: mpsc::Receiver<Command>,
    events: mpsc::Sender<RelayEvent>,
    stats: Arc<RelayClientStats>,
) {
    let mut backoff = Backoff::new(config.backoff_min, config.backoff_max);
    let targets: Vec<RelayTarget> = std::iter::once(config.target.clone())
        .chain(config.alternates.iter().cloned())
        .collect();
    let mut current = 0usize;
    loop {
        let target = &targets[current % targets.len()];
        let error = match connect(target, &config.key, &config.info).await {
            Ok(conn) => {
                backoff.reset();
                stats.connects.fetch_add(1, Ordering::Relaxed);
                tracing::info!(relay = %target.host, addr = %conn.remote, server = %conn.server_key.short(), "connected to relay");
                if events
                    .send(RelayEvent::Connected {
                        server_key: conn.server_key,
                        remote: conn.remote,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
                match serve(conn, &mut config, &mut cmds, &events, &stats).await {
                    Ok(()) => return,
                    Err(e) => e,
                }
            }
            Err(e) => {
                // This node does not answer: the next attempt goes to the region's next.
                current = (current + 1) % targets.len();
                e.to_string()
            }
        };
        let delay = backoff.next_delay(rand::thread_rng().gen());
        tracing::info!(relay = %target.host, error = %error, retry_in = ?delay, "relay connection lost");
        if events
            .send(RelayEvent::Disconnected {
                error,
                retry_in: delay,
            })
            .await
            .is_err()
        {
            return;
        }
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                cmd = cmds.recv() => match cmd {
                    None => return,
                    Some(Command::Send { .. }) => {
                        stats.dropped_not_connected.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Command::Preferred(p)) => config.preferred = p,
                },
            }
        }
    }
}

/// Runs one connection until it fails (`Err`) or every handle is dropped (`Ok`).
async fn serve(
    conn: RelayConn,
    config: &mut RelayClientConfig,
    cmds: &mut mpsc::Receiver<Command>,
    events: &mpsc::Sender<RelayEvent>,
    stats: &RelayClientStats,
) -> Result<(), String> {
    let RelayConn {
        mut reader,
        mut writer,
        ..
    } = conn;
    // A single pending pong is enough: excess pings are ignored, as the server does.
    let (pong_tx, mut pong_rx) = mpsc::channel::<[u8; 8]>(1);
    let silence = config.silence_timeout;
    let read_side = async {
        loop {
            let frame = match tokio::time::timeout(silence, reader.recv()).await {
                Err(_) => return Err(format!("no frame from the relay for {silence:?}")),
                Ok(Err(e)) => return Err(e.to_string()),
                Ok(Ok(f)) => f,
            };
            let event = match frame {
                Frame::RecvPacket { src, payload } => {
                    stats.packets_received.fetch_add(1, Ordering::Relaxed);
                    RelayEvent::Packet { src, payload }
                }
                Frame::Ping { data } => {
                    let _ = pong_tx.try_send(data);
                    continue;
                }
                Frame::PeerGone { peer, reason } => RelayEvent::PeerGone { peer, reason },
                Frame::PeerPresent { peer, addr, flags } => {
                    RelayEvent::PeerPresent { peer, addr, flags }
                }
                Frame::Health { problem } => RelayEvent::Health { problem },
                Frame::Restarting {
                    reconnect_in_ms, ..
                } => {
                    return Err(format!(
                        "relay is restarting (asked to reconnect in {reconnect_in_ms} ms)"
                    ))
                }
                _ => continue,
            };
            if events.send(event).await.is_err() {
                return Ok(());
            }
        }
    };
    let write_side = async {
        if config.preferred {
            writer
                .send(&Frame::NotePreferred { preferred: true })
                .await
                .map_err(|e| e.to_string())?;
        }
        loop {
            tokio::select! {
                cmd = cmds.recv() => {
                    let Some(mut cmd) = cmd else { return Ok(()) };
                    // Coalesce whatever else is already queued into one write.
                    loop {
                        match cmd {
                            Command::Send { dst, payload } => {
                                if writer.queue_packet(&dst, &payload).is_ok() {
                                    stats.packets_sent.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Command::Preferred(p) => {
                                config.preferred = p;
                                writer.queue(&Frame::NotePreferred { preferred: p });
                            }
                        }
                        if writer.queued_len() > 64 << 10 {
                            break;
                        }
                        match cmds.try_recv() {
                            Ok(c) => cmd = c,
                            Err(_) => break,
                        }
                    }
                }
                Some(data) = pong_rx.recv() => {
                    stats.pings_answered.fetch_add(1, Ordering::Relaxed);
                    writer.queue(&Frame::Pong { data });
                }
            }
            writer.flush().await.map_err(|e| e.to_string())?;
        }
    };
    tokio::select! {
        r = read_side => r,
        r = write_side => r,
    }
}
