//! The control client: HTTP/2 (prior knowledge) over a ts2021 connection, and the
//! requests agentd makes on it. Bodies are JSON; responses are read up to 1 MiB.
//! Every request has a deadline ([`Deadlines`]); the map stream has its watchdog.

use bytes::{Bytes, BytesMut};
use proto::tailcfg::{RegisterRequest, RegisterResponse};
use proto::{MachinePrivate, MachinePublic, NodePublic};
use serde::de::DeserializeOwned;
use serde::Serialize;

use proto::tailcfg::{MapRequest, MapResponse};
use tokio::sync::mpsc;

use crate::deadline::{Deadlines, Step, TimedOut};
use crate::dial::{dial_with, ControlUrl, DialError};
use crate::mapframe;

pub use crate::defaults::MAP_WATCHDOG;

/// Largest response body read.
const MAX_BODY: usize = 1 << 20;

/// A control request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("HTTP/2 with the control server failed: {0}")]
    Http2(#[from] h2::Error),
    #[error("bad request: {0}")]
    Request(#[from] http::Error),
    #[error("control server answered {status} to {path}: {body}")]
    Status {
        path: String,
        status: u16,
        body: String,
    },
    #[error("no map message from the control server for {0:?}")]
    Silent(std::time::Duration),
    #[error("control server's answer to {path} is not valid: {why}")]
    BadBody { path: String, why: String },
    #[error(transparent)]
    TimedOut(#[from] TimedOut),
}

impl ClientError {
    /// The deadline this error is about, if it is a timeout (of this client or of dialing).
    pub fn timed_out(&self) -> Option<&TimedOut> {
        match self {
            ClientError::TimedOut(t) => Some(t),
            ClientError::Dial(d) => d.timed_out(),
            _ => None,
        }
    }
}

/// An HTTP/2 session with a control server over ts2021.
#[derive(Debug, Clone)]
pub struct ControlClient {
    h2: h2::client::SendRequest<Bytes>,
    authority: String,
    deadlines: Deadlines,
    /// The server's early payload (JSON), if any.
    pub early_payload: Option<Vec<u8>>,
}

impl ControlClient {
    /// Dials, handshakes, and starts HTTP/2. The connection runs in a background task
    /// until every clone of the client is dropped or the server closes it.
    pub async fn connect(
        url: &ControlUrl,
        machine: &MachinePrivate,
        control_key: &MachinePublic,
        version: u16,
    ) -> Result<Self, ClientError> {
        Self::connect_with(url, machine, control_key, version, Deadlines::default()).await
    }

    /// [`ControlClient::connect`] with `deadlines` for dialing and for every request made
    /// on the client.
    pub async fn connect_with(
        url: &ControlUrl,
        machine: &MachinePrivate,
        control_key: &MachinePublic,
        version: u16,
        deadlines: Deadlines,
    ) -> Result<Self, ClientError> {
        let conn = dial_with(url, machine, control_key, version, &deadlines).await?;
        let (h2, connection) = deadlines
            .run(Step::Upgrade, h2::client::handshake(conn.stream))
            .await??;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "control HTTP/2 connection ended");
            }
        });
        Ok(ControlClient {
            h2,
            authority: url.authority(),
            deadlines,
            early_payload: conn.early_payload,
        })
    }

    /// POSTs `body` as JSON to `path` and decodes the JSON answer.
    pub async fn post_json<T: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &T,
        node_key: Option<&NodePublic>,
    ) -> Result<R, ClientError> {
        self.post_json_as(Step::Register, path, body, node_key)
            .await
    }

    /// [`ControlClient::post_json`] under the deadline of `step`.
    async fn post_json_as<T: Serialize, R: DeserializeOwned>(
        &self,
        step: Step,
        path: &str,
        body: &T,
        node_key: Option<&NodePublic>,
    ) -> Result<R, ClientError> {
        let bytes = self.post_as(step, path, body, node_key).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::BadBody {
            path: path.to_string(),
            why: e.to_string(),
        })
    }

    /// POSTs `body` as JSON to `path`; returns the status and the body stream.
    async fn send<T: Serialize>(
        &self,
        path: &str,
        body: &T,
        node_key: Option<&NodePublic>,
    ) -> Result<(u16, h2::RecvStream), ClientError> {
        let json = serde_json::to_vec(body).map_err(|e| ClientError::BadBody {
            path: path.to_string(),
            why: e.to_string(),
        })?;
        let mut req = http::Request::post(format!("https://{}{path}", self.authority))
            .header("content-type", "application/json");
        if let Some(k) = node_key {
            req = req.header("ts-lb", k.to_string());
        }
        let req = req.body(())?;
        let mut send = self.h2.clone().ready().await?;
        let (response, mut stream) = send.send_request(req, false)?;
        stream.send_data(Bytes::from(json), true)?;
        let response = response.await?;
        Ok((response.status().as_u16(), response.into_body()))
    }

    /// POSTs `body` as JSON to `path`; returns the raw 200 answer. The whole exchange has
    /// the deadline of a register request.
    pub async fn post<T: Serialize>(
        &self,
        path: &str,
        body: &T,
        node_key: Option<&NodePublic>,
    ) -> Result<Bytes, ClientError> {
        self.post_as(Step::Register, path, body, node_key).await
    }

    /// [`ControlClient::post`] with the deadline of `step` on the whole exchange.
    async fn post_as<T: Serialize>(
        &self,
        step: Step,
        path: &str,
        body: &T,
        node_key: Option<&NodePublic>,
    ) -> Result<Bytes, ClientError> {
        self.deadlines
            .run(step, self.post_unbounded(path, body, node_key))
            .await?
    }

    async fn post_unbounded<T: Serialize>(
        &self,
        path: &str,
        body: &T,
        node_key: Option<&NodePublic>,
    ) -> Result<Bytes, ClientError> {
        let (status, mut body) = self.send(path, body, node_key).await?;
        let mut out = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            out.extend_from_slice(&chunk);
            if out.len() > MAX_BODY {
                return Err(ClientError::BadBody {
                    path: path.to_string(),
                    why: "answer over 1 MiB".into(),
                });
            }
        }
        if status != 200 {
            return Err(ClientError::Status {
                path: path.to_string(),
                status,
                body: String::from_utf8_lossy(&out).chars().take(300).collect(),
            });
        }
        Ok(out.freeze())
    }

    /// Starts a streaming map poll (`req.stream` should be true). Messages arrive in order
    /// on the returned stream; it ends with an error when the server goes silent for
    /// [`MAP_WATCHDOG`] or the connection breaks. The answer's head (and a refusal's body)
    /// must arrive within [`Deadlines::map_start`]; waiting for the first message under
    /// the same deadline is the caller's part (see the session).
    pub async fn map_stream(&self, req: &MapRequest) -> Result<MapStream, ClientError> {
        const PATH: &str = "/machine/map";
        let start = self.deadlines.run(Step::MapStart, async {
            let (status, mut body) = self.send(PATH, req, Some(&req.node_key)).await?;
            if status == 200 {
                return Ok(body);
            }
            let mut out = Vec::new();
            while let Some(Ok(chunk)) = body.data().await {
                out.extend_from_slice(&chunk);
                if out.len() > 4096 {
                    break;
                }
            }
            Err(ClientError::Status {
                path: PATH.into(),
                status,
                body: String::from_utf8_lossy(&out).chars().take(300).collect(),
            })
        });
        let mut body = start.await??;
        let zstd = req.compress == "zstd";
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(async move {
            let bad = |why: String| ClientError::BadBody {
                path: PATH.into(),
                why,
            };
            let mut buf = BytesMut::new();
            loop {
                let chunk = match tokio::time::timeout(MAP_WATCHDOG, body.data()).await {
                    Err(_) => {
                        let _ = tx.send(Err(ClientError::Silent(MAP_WATCHDOG))).await;
                        return;
                    }
                    Ok(None) => {
                        let _ = tx.send(Err(bad("map stream ended".into()))).await;
                        return;
                    }
                    Ok(Some(Err(e))) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                    Ok(Some(Ok(c))) => c,
                };
                let _ = body.flow_control().release_capacity(chunk.len());
                buf.extend_from_slice(&chunk);
                loop {
                    let msg = match mapframe::decode(&mut buf) {
                        Ok(Some(m)) => m,
                        Ok(None) => break,
                        Err(e) => {
                            let _ = tx.send(Err(bad(e.to_string()))).await;
                            return;
                        }
                    };
                    let json = if zstd {
                        match mapframe::decompress(&msg) {
                            Ok(j) => j,
                            Err(e) => {
                                let _ = tx.send(Err(bad(e.to_string()))).await;
                                return;
                            }
                        }
                    } else {
                        msg.to_vec()
                    };
                    let item = serde_json::from_slice::<MapResponse>(&json)
                        .map_err(|e| bad(format!("map message is not valid JSON: {e}")));
                    let failed = item.is_err();
                    if tx.send(item).await.is_err() || failed {
                        return;
                    }
                }
            }
        });
        Ok(MapStream {
            rx,
            _task: tokio_util::task::AbortOnDropHandle::new(task),
        })
    }

    /// A non-streaming "lite" map request that only updates the server's view of this
    /// node (endpoints, home region, disco key): `Stream: false, OmitPeers: true`. Under
    /// [`Deadlines::lite_update`].
    pub async fn lite_update(&self, req: &MapRequest) -> Result<(), ClientError> {
        let mut req = req.clone();
        req.stream = false;
        req.omit_peers = true;
        self.post_as(Step::LiteUpdate, "/machine/map", &req, Some(&req.node_key))
            .await
            .map(|_| ())
    }

    /// `POST /machine/register`, under [`Deadlines::register`], or for a `Followup` (which
    /// the server holds until a person has logged in) [`Deadlines::login_wait`].
    pub async fn register(&self, req: &RegisterRequest) -> Result<RegisterResponse, ClientError> {
        let step = if req.followup.is_empty() {
            Step::Register
        } else {
            Step::LoginWait
        };
        self.post_json_as(step, "/machine/register", req, Some(&req.node_key))
            .await
    }
}

/// The messages of a streaming map poll. Dropping it ends the poll.
#[derive(Debug)]
pub struct MapStream {
    rx: mpsc::Receiver<Result<MapResponse, ClientError>>,
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

impl MapStream {
    /// The next message; an error ends the stream.
    pub async fn next(&mut self) -> Option<Result<MapResponse, ClientError>> {
        self.rx.recv().await
    }
}
