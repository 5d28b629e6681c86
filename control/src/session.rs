//! A control session kept alive in the background: register, stream the map, publish the
//! merged [`NetMap`] on a watch channel, push endpoint changes with lite requests, and on
//! any failure reconnect with capped, jittered backoff. The auth key is only needed until
//! the first successful registration; after that the machine key identifies the node.
//!
//! Every step has a deadline ([`Deadlines`]), so a server that accepts and then says
//! nothing turns into [`SessionState::Retrying`] naming the step, and a redial. Lite
//! updates run beside the map stream (one at a time, latest value wins), so waiting for
//! one never stops the session from reading the map or noticing that it went silent.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use proto::netmap::NetMap;
use proto::tailcfg::{Hostinfo, MapRequest, RegisterAuth, RegisterRequest};
use proto::{DiscoPublic, MachinePrivate, NodePrivate};
use rand::Rng as _;
use tokio::sync::{mpsc, watch};

use crate::client::{ClientError, ControlClient};
use crate::deadline::{Deadlines, Step, TimedOut};
use crate::defaults::{LITE_RETRY_MAX, LITE_RETRY_MIN};
use crate::dial::{fetch_control_key_with, ControlUrl};

/// Settings of a [`ControlSession`]. Its `Debug` form leaves out the pre-auth key.
#[derive(Clone)]
pub struct SessionConfig {
    pub url: ControlUrl,
    pub machine: MachinePrivate,
    pub node: NodePrivate,
    pub disco: DiscoPublic,
    pub hostinfo: Hostinfo,
    pub endpoints: Vec<String>,
    /// Needed for the first registration only.
    pub auth_key: Option<String>,
    pub version: u16,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl std::fmt::Debug for SessionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionConfig")
            .field("url", &self.url)
            .field("node", &self.node.public().short())
            .field("hostinfo", &self.hostinfo)
            .field("endpoints", &self.endpoints)
            .field("auth_key", &self.auth_key.as_ref().map(|_| "<redacted>"))
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// The session's state, as a person would want to see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionState {
    Connecting,
    /// Streaming the map.
    Connected,
    /// The server wants an interactive login: a person must open `url` to approve this node.
    NeedsLogin {
        url: String,
    },
    /// The last attempt failed; retrying.
    Retrying {
        error: String,
    },
    /// The server refused the registration; retrying will not help without a new key.
    Refused {
        reason: String,
    },
}

enum Cmd {
    Endpoints(Vec<String>),
    HomeRegion(proto::RegionId),
    Disco(DiscoPublic),
}

impl Cmd {
    fn apply(self, cfg: &mut SessionConfig) {
        match self {
            Cmd::Endpoints(e) => cfg.endpoints = e,
            Cmd::HomeRegion(r) => {
                cfg.hostinfo
                    .net_info
                    .get_or_insert_with(Default::default)
                    .preferred_derp = r.get();
            }
            Cmd::Disco(d) => cfg.disco = d,
        }
    }
}

/// Handle to a background control session. Dropping it stops the session.
#[derive(Debug)]
pub struct ControlSession {
    cmds: mpsc::Sender<Cmd>,
    pub netmap: watch::Receiver<Option<Arc<NetMap>>>,
    pub state: watch::Receiver<SessionState>,
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

impl ControlSession {
    /// Starts the session with the default deadlines ([`crate::defaults`]).
    pub fn spawn(config: SessionConfig) -> ControlSession {
        Self::spawn_with_deadlines(config, Deadlines::default())
    }

    /// Starts the session with `deadlines` for its steps (tests shorten them).
    pub fn spawn_with_deadlines(config: SessionConfig, deadlines: Deadlines) -> ControlSession {
        let (cmd_tx, cmd_rx) = mpsc::channel(8);
        let (nm_tx, nm_rx) = watch::channel(None);
        let (st_tx, st_rx) = watch::channel(SessionState::Connecting);
        let task = tokio::spawn(run(config, deadlines, cmd_rx, nm_tx, st_tx));
        ControlSession {
            cmds: cmd_tx,
            netmap: nm_rx,
            state: st_rx,
            _task: tokio_util::task::AbortOnDropHandle::new(task),
        }
    }

    /// Reports new endpoints to the control server (now if connected, else on reconnect).
    pub async fn set_endpoints(&self, endpoints: Vec<String>) {
        let _ = self.cmds.send(Cmd::Endpoints(endpoints)).await;
    }

    /// Reports a new home relay region (`Hostinfo.NetInfo.PreferredDERP`); control
    /// republishes it to every peer as this node's `HomeDERP`.
    pub async fn set_home_region(&self, region: proto::RegionId) {
        let _ = self.cmds.send(Cmd::HomeRegion(region)).await;
    }

    /// Like [`ControlSession::set_endpoints`], without waiting: false (and nothing sent)
    /// when the command queue is full, e.g. while the server is unreachable. The caller
    /// keeps the latest value and tries again later.
    pub fn try_set_endpoints(&self, endpoints: Vec<String>) -> bool {
        !matches!(
            self.cmds.try_send(Cmd::Endpoints(endpoints)),
            Err(mpsc::error::TrySendError::Full(_))
        )
    }

    /// Like [`ControlSession::set_home_region`], without waiting (see
    /// [`ControlSession::try_set_endpoints`]).
    pub fn try_set_home_region(&self, region: proto::RegionId) -> bool {
        !matches!(
            self.cmds.try_send(Cmd::HomeRegion(region)),
            Err(mpsc::error::TrySendError::Full(_))
        )
    }

    /// Reports a new disco key (after a restart of the disco layer).
    pub async fn set_disco_key(&self, disco: DiscoPublic) {
        let _ = self.cmds.send(Cmd::Disco(disco)).await;
    }
}

async fn run(
    mut cfg: SessionConfig,
    deadlines: Deadlines,
    mut cmds: mpsc::Receiver<Cmd>,
    netmap: watch::Sender<Option<Arc<NetMap>>>,
    state: watch::Sender<SessionState>,
) {
    let mut backoff = netbase::Backoff::new(cfg.backoff_min, cfg.backoff_max);
    // `Connecting` only until the first attempt ends: a redial after a failure stays
    // `Retrying` (with the last error) or `Refused` until it gets somewhere, so status
    // shows why, not a bare "connecting" that hides the failure.
    state.send_replace(SessionState::Connecting);
    loop {
        let outcome = session_once(&mut cfg, &deadlines, &mut cmds, &netmap, &state).await;
        let refused = match outcome {
            Outcome::Stopped => return,
            Outcome::Refused(reason) => {
                tracing::warn!(%reason, "control server refused this node");
                state.send_replace(SessionState::Refused { reason });
                true
            }
            Outcome::Failed {
                error,
                was_connected,
            } => {
                if was_connected {
                    backoff.reset();
                }
                tracing::info!(%error, "control session lost; reconnecting");
                state.send_replace(SessionState::Retrying { error });
                false
            }
        };
        let mut delay = backoff.next_delay(rand::thread_rng().gen());
        if refused {
            delay = cfg.backoff_max;
        }
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                cmd = cmds.recv() => match cmd {
                    None => return,
                    Some(c) => c.apply(&mut cfg),
                },
            }
        }
    }
}

/// Pause between Followup requests when the server answers one without a decision.
const FOLLOWUP_RETRY: Duration = Duration::from_secs(1);

enum Outcome {
    Stopped,
    Refused(String),
    Failed { error: String, was_connected: bool },
}

fn map_request(cfg: &SessionConfig) -> MapRequest {
    MapRequest {
        version: u32::from(cfg.version),
        compress: "zstd".into(),
        keep_alive: true,
        node_key: cfg.node.public(),
        disco_key: cfg.disco,
        stream: true,
        hostinfo: Some(cfg.hostinfo.clone()),
        endpoint_types: vec![2; cfg.endpoints.len()],
        endpoints: cfg.endpoints.clone(),
        omit_peers: false,
    }
}

/// What a failed step becomes in [`SessionState::Retrying`]: a timeout already names its
/// step ("fetching the control key: timed out after 10 s"); any other error is prefixed
/// with the step it ended.
fn step_error(step: Step, e: &dyn std::fmt::Display, timed_out: Option<&TimedOut>) -> String {
    match timed_out {
        Some(t) => t.to_string(),
        None => format!("{step}: {e}"),
    }
}

fn client_error(step: Step, e: &ClientError) -> String {
    step_error(step, e, e.timed_out())
}

/// A lite update in flight: at most one at a time.
type LiteUpdate = Pin<Box<dyn Future<Output = Result<(), ClientError>> + Send>>;

/// Waits for the lite update in flight; never ready when there is none.
async fn lite_done(lite: &mut Option<LiteUpdate>) -> Result<(), ClientError> {
    std::future::poll_fn(|cx| match lite.as_mut() {
        Some(f) => f.as_mut().poll(cx),
        None => Poll::Pending,
    })
    .await
}

/// Sleeps until `at`; forever when `at` is `None`.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The wait before resending a lite update after `failures` failures in a row.
fn lite_retry_delay(failures: u32) -> Duration {
    LITE_RETRY_MIN
        .saturating_mul(1 << failures.min(16))
        .min(LITE_RETRY_MAX)
}

async fn session_once(
    cfg: &mut SessionConfig,
    deadlines: &Deadlines,
    cmds: &mut mpsc::Receiver<Cmd>,
    netmap: &watch::Sender<Option<Arc<NetMap>>>,
    state: &watch::Sender<SessionState>,
) -> Outcome {
    let failed = |e: String| Outcome::Failed {
        error: e,
        was_connected: false,
    };
    let control_key = match fetch_control_key_with(&cfg.url, cfg.version, deadlines).await {
        Ok(k) => k,
        Err(e) => return failed(step_error(Step::FetchKey, &e, e.timed_out())),
    };
    let client = match ControlClient::connect_with(
        &cfg.url,
        &cfg.machine,
        &control_key,
        cfg.version,
        *deadlines,
    )
    .await
    {
        Ok(c) => c,
        Err(e) => return failed(client_error(Step::Upgrade, &e)),
    };
    let reg = RegisterRequest {
        version: u32::from(cfg.version),
        node_key: cfg.node.public(),
        auth: cfg
            .auth_key
            .clone()
            .map(|auth_key| RegisterAuth { auth_key }),
        hostinfo: Some(cfg.hostinfo.clone()),
        ..Default::default()
    };
    match client.register(&reg).await {
        Ok(r) if r.machine_authorized => {
            // Registered: from now on the machine key is enough.
            cfg.auth_key = None;
        }
        Ok(r) if !r.auth_url.is_empty() => {
            tracing::info!(url = %r.auth_url, "to finish joining, log in at this URL");
            state.send_replace(SessionState::NeedsLogin {
                url: r.auth_url.clone(),
            });
            // The server holds a Followup request until the login is done (or it times out).
            let follow = RegisterRequest {
                followup: r.auth_url.clone(),
                auth: None,
                ..reg.clone()
            };
            loop {
                match client.register(&follow).await {
                    Ok(r) if r.machine_authorized => break,
                    Ok(r) if !r.error.is_empty() => return Outcome::Refused(r.error),
                    // Not approved yet and the server let go of the request: ask again,
                    // but never in a tight loop.
                    Ok(_) => tokio::time::sleep(FOLLOWUP_RETRY).await,
                    Err(e) => return failed(client_error(Step::LoginWait, &e)),
                }
            }
        }
        Ok(r) => {
            return Outcome::Refused(if r.error.is_empty() {
                "not authorized".into()
            } else {
                r.error
            })
        }
        Err(e) => return failed(client_error(Step::Register, &e)),
    }
    // The map poll has started once its first message is in: the answer's head and that
    // message share one deadline.
    let first_message_by = tokio::time::Instant::now() + deadlines.map_start;
    let mut stream = match client.map_stream(&map_request(cfg)).await {
        Ok(s) => s,
        Err(e) => return failed(client_error(Step::MapStart, &e)),
    };
    let mut nm = NetMap::default();
    let mut connected = false;
    // Lite updates run beside the map stream, never in its way: one in flight at most;
    // commands that arrive meanwhile only change `cfg`, and the next update carries
    // whatever is latest.
    //
    // A lite update that fails or times out is logged and sent again after a backoff, on
    // the same connection; it never ends the session by itself. The map stream is this
    // connection's health check: while its messages (keep-alives included) arrive, the
    // connection and the server are alive, and a redial would only repeat the same values
    // in its streaming request while costing every peer a netmap churn. A connection that
    // really died stops the map stream too, and its watchdog ([`crate::defaults::MAP_WATCHDOG`])
    // or the broken socket ends the session.
    let mut lite: Option<LiteUpdate> = None;
    let mut lite_wanted = false;
    let mut lite_failures = 0u32;
    let mut lite_retry_at: Option<tokio::time::Instant> = None;
    loop {
        if lite.is_none() && lite_wanted && lite_retry_at.is_none() {
            lite_wanted = false;
            let client = client.clone();
            let req = map_request(cfg);
            lite = Some(Box::pin(async move { client.lite_update(&req).await }));
        }
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(m)) => {
                    if nm.apply(m) || !connected {
                        netmap.send_replace(Some(Arc::new(nm.clone())));
                    }
                    if !connected {
                        connected = true;
                        state.send_replace(SessionState::Connected);
                    }
                }
                Some(Err(e)) => return Outcome::Failed {
                    error: if connected { e.to_string() } else { client_error(Step::MapStart, &e) },
                    was_connected: connected,
                },
                None => return Outcome::Failed { error: "map stream ended".into(), was_connected: connected },
            },
            () = tokio::time::sleep_until(first_message_by), if !connected => {
                return failed(
                    TimedOut { step: Step::MapStart, after: deadlines.map_start }.to_string(),
                );
            }
            r = lite_done(&mut lite) => {
                lite = None;
                match r {
                    Ok(()) => lite_failures = 0,
                    Err(e) => {
                        let wait = lite_retry_delay(lite_failures);
                        lite_failures = lite_failures.saturating_add(1);
                        tracing::warn!(
                            error = %client_error(Step::LiteUpdate, &e),
                            retry_in = ?wait,
                            "control server did not take our endpoints/home region; will resend",
                        );
                        lite_wanted = true;
                        lite_retry_at = Some(tokio::time::Instant::now() + wait);
                    }
                }
            }
            () = sleep_until(lite_retry_at) => lite_retry_at = None,
            cmd = cmds.recv() => match cmd {
                None => return Outcome::Stopped,
                Some(c) => {
                    c.apply(cfg);
                    lite_wanted = true;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lite_retries_back_off_by_doubling_up_to_the_cap() {
        let waits: Vec<u64> = (0..9).map(|f| lite_retry_delay(f).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(lite_retry_delay(u32::MAX), LITE_RETRY_MAX);
    }

    #[test]
    fn errors_name_their_step_once() {
        let t = TimedOut {
            step: Step::Register,
            after: Duration::from_secs(30),
        };
        let e = ClientError::TimedOut(t);
        assert_eq!(
            client_error(Step::Register, &e),
            "registering: timed out after 30 s"
        );
        let e = ClientError::Dial(crate::dial::DialError::TimedOut(TimedOut {
            step: Step::TcpConnect,
            after: Duration::from_secs(10),
        }));
        assert_eq!(
            client_error(Step::Upgrade, &e),
            "connecting to the control server (TCP): timed out after 10 s"
        );
        let e = ClientError::Silent(Duration::from_secs(120));
        assert_eq!(
            client_error(Step::MapStart, &e),
            "starting the map poll: no map message from the control server for 120s"
        );
    }
}
