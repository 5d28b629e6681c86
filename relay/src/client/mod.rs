//! The DERP client: [`connect`] makes one connection; [`RelayClient`] keeps one alive.
//!
//! `RelayClient` is an actor: a task owns the connection, reconnects with capped,
//! jittered backoff, answers the server's pings, re-sends NotePreferred after every
//! reconnect, and watches that the server is still there: after a short silence it sends
//! a Ping, and a connection whose Ping goes unanswered, or whose write does not complete
//! in time, is dead (see [`liveness`]). A dead node is not dialled again at once: the
//! next attempt goes to the region's next node. Callers talk to it through a bounded
//! channel and receive [`RelayEvent`]s on another (a disconnect says why, as a
//! [`DisconnectReason`]); sends that find the queue full, or no connection, are dropped
//! and counted, never buffered without bound.

mod conn;
pub mod liveness;
pub mod tls;

pub use conn::{
    connect, handshake, latency_check, ConnectError, RelayConn, RelayReader, RelayTarget,
    RelayWriter,
};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use proto::{NodePrivate, NodePublic};
use rand::Rng as _;
use tokio::sync::mpsc;

use crate::frame::{Frame, PeerGoneReason};
use crate::handshake::ClientInfo;
use liveness::{Liveness, LivenessAction, LivenessConfig, WRITE_TIMEOUT};
use netbase::Backoff;

/// Settings of a [`RelayClient`].
#[derive(Debug, Clone)]
pub struct RelayClientConfig {
    pub target: RelayTarget,
    /// Other nodes of the same region, tried in turn when a connection attempt fails or
    /// a connection goes silent (see [`DisconnectReason::node_unreachable`]).
    pub alternates: Vec<RelayTarget>,
    pub key: NodePrivate,
    pub info: ClientInfo,
    /// Whether this relay is the home region (sent as NotePreferred after each connect).
    pub preferred: bool,
    /// When to Ping a silent server, and how long to wait for an answer.
    pub liveness: LivenessConfig,
    /// A write that has not completed in this long means the connection is dead.
    pub write_timeout: Duration,
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
            liveness: LivenessConfig::default(),
            write_timeout: WRITE_TIMEOUT,
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
    /// The connection ended, or the attempt to make one failed.
    Disconnected {
        reason: DisconnectReason,
        error: String,
        retry_in: Duration,
    },
}

netbase::reasons! {
    /// Why a connection ended (or was never made): what a [`RelayEvent::Disconnected`]
    /// counts under.
    pub enum DisconnectReason {
        /// Dialling, TLS, the upgrade or the handshake failed.
        ConnectFailed => "connect_failed",
        /// Nothing heard from the server, and no answer to a Ping, within the deadlines:
        /// the node is unreachable (blackholed) though the connection never closed.
        DeadSilent => "dead_silent",
        /// A write did not complete within the write deadline.
        DeadWriteStalled => "dead_write_stalled",
        /// The server said it is restarting.
        ServerRestarting => "server_restarting",
        /// The connection closed or failed (EOF, reset, a malformed frame).
        Closed => "closed",
    }
}

impl DisconnectReason {
    /// A short name for counters and logs.
    pub fn as_str(self) -> &'static str {
        netbase::reasons::Reason::label(self)
    }

    /// Whether the node itself is likely unreachable, so the next attempt should go to
    /// the region's next node rather than this one. A node that closed the connection
    /// (or is restarting) is alive and is tried again first; if it then refuses, that
    /// attempt's failure moves on.
    pub fn node_unreachable(self) -> bool {
        matches!(
            self,
            DisconnectReason::ConnectFailed
                | DisconnectReason::DeadSilent
                | DisconnectReason::DeadWriteStalled
        )
    }
}

/// How a connection ended.
#[derive(Debug)]
struct Lost {
    reason: DisconnectReason,
    error: String,
}

impl Lost {
    fn new(reason: DisconnectReason, error: impl Into<String>) -> Self {
        Lost {
            reason,
            error: error.into(),
        }
    }
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
    /// Liveness Pings sent to a silent server, and Pongs that answered one.
    pub pings_sent: AtomicU64,
    pub pongs_received: AtomicU64,
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
        let lost = match connect(target, &config.key, &config.info).await {
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
                    Err(lost) => lost,
                }
            }
            Err(e) => Lost::new(DisconnectReason::ConnectFailed, e.to_string()),
        };
        if lost.reason.node_unreachable() {
            // This node does not answer: the next attempt goes to the region's next.
            current = (current + 1) % targets.len();
        }
        let delay = backoff.next_delay(rand::thread_rng().gen());
        tracing::info!(relay = %target.host, reason = %lost.reason, error = %lost.error, retry_in = ?delay, "relay connection lost");
        if events
            .send(RelayEvent::Disconnected {
                reason: lost.reason,
                error: lost.error,
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

/// Now, as the liveness state machine takes it (tokio's clock, so tests can pause it).
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// Writes everything queued, within the write deadline.
async fn flush_within(writer: &mut RelayWriter, deadline: Duration) -> Result<(), Lost> {
    match tokio::time::timeout(deadline, writer.flush()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Lost::new(DisconnectReason::Closed, e.to_string())),
        Err(_) => Err(Lost::new(
            DisconnectReason::DeadWriteStalled,
            format!("a write to the relay did not complete within {deadline:?}"),
        )),
    }
}

/// Runs one connection until it fails (`Err`) or every handle is dropped (`Ok`).
async fn serve(
    conn: RelayConn,
    config: &mut RelayClientConfig,
    cmds: &mut mpsc::Receiver<Command>,
    events: &mpsc::Sender<RelayEvent>,
    stats: &RelayClientStats,
) -> Result<(), Lost> {
    let RelayConn {
        mut reader,
        mut writer,
        ..
    } = conn;
    // A single pending pong is enough: excess pings are ignored, as the server does.
    let (pong_tx, mut pong_rx) = mpsc::channel::<[u8; 8]>(1);
    // Our own liveness pings, from the watchdog to the writer (one at a time).
    let (ping_tx, mut ping_rx) = mpsc::channel::<[u8; 8]>(1);
    // Shared by the reader (which notes frames) and the watchdog (which acts on
    // silence); never locked across an await.
    let liveness = Mutex::new(Liveness::new(config.liveness, now()));
    let lock = || liveness.lock().unwrap_or_else(|p| p.into_inner());
    let write_timeout = config.write_timeout;
    // Set while the reader waits for room in the event queue: frames may be waiting
    // unread then, and that silence is ours, not the server's.
    let delivering = std::sync::atomic::AtomicBool::new(false);
    let read_side = async {
        loop {
            let frame = reader
                .recv()
                .await
                .map_err(|e| Lost::new(DisconnectReason::Closed, e.to_string()))?;
            if let Frame::Pong { data } = frame {
                if let Some(rtt) = lock().on_pong(data, now()) {
                    stats.pongs_received.fetch_add(1, Ordering::Relaxed);
                    tracing::trace!(?rtt, "relay answered our ping");
                }
                continue;
            }
            lock().on_frame(now());
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
                    return Err(Lost::new(
                        DisconnectReason::ServerRestarting,
                        format!("relay is restarting (asked to reconnect in {reconnect_in_ms} ms)"),
                    ))
                }
                _ => continue,
            };
            delivering.store(true, Ordering::Relaxed);
            let sent = events.send(event).await;
            delivering.store(false, Ordering::Relaxed);
            if sent.is_err() {
                return Ok(());
            }
        }
    };
    let watchdog = async {
        loop {
            let Some(at) = lock().poll_timeout() else {
                return std::future::pending().await;
            };
            tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
            if delivering.load(Ordering::Relaxed) {
                lock().on_frame(now());
            }
            let action = lock().handle_timeout(now());
            match action {
                Some(LivenessAction::SendPing(data)) => {
                    stats.pings_sent.fetch_add(1, Ordering::Relaxed);
                    // A full slot means the writer is stuck on an earlier one; the
                    // deadline runs from now all the same.
                    let _ = ping_tx.try_send(data);
                }
                Some(LivenessAction::Dead { silent_for }) => {
                    return Err::<(), _>(Lost::new(
                        DisconnectReason::DeadSilent,
                        format!(
                            "nothing from the relay for {silent_for:?}, not even an answer to a ping"
                        ),
                    ));
                }
                None => {}
            }
        }
    };
    let write_side = async {
        if config.preferred {
            writer.queue(&Frame::NotePreferred { preferred: true });
            flush_within(&mut writer, write_timeout).await?;
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
                Some(data) = ping_rx.recv() => {
                    writer.queue(&Frame::Ping { data });
                }
            }
            flush_within(&mut writer, write_timeout).await?;
        }
    };
    tokio::select! {
        r = read_side => r,
        r = watchdog => r,
        r = write_side => r,
    }
}
