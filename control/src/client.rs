//! The control client: HTTP/2 (prior knowledge) over a ts2021 connection, and the
//! requests agentd makes on it. Bodies are JSON; responses are read up to 1 MiB.

use bytes::{Bytes, BytesMut};
use proto::tailcfg::{RegisterRequest, RegisterResponse};
use proto::{MachinePrivate, MachinePublic, NodePublic};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::dial::{dial, ControlUrl, DialError};

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
    #[error("control server's answer to {path} is not valid: {why}")]
    BadBody { path: String, why: String },
}

/// An HTTP/2 session with a control server over ts2021.
#[derive(Debug, Clone)]
pub struct ControlClient {
    h2: h2::client::SendRequest<Bytes>,
    authority: String,
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
        let conn = dial(url, machine, control_key, version).await?;
        let (h2, connection) = h2::client::handshake(conn.stream).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "control HTTP/2 connection ended");
            }
        });
        Ok(ControlClient {
            h2,
            authority: url.authority(),
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
        let bytes = self.post(path, body, node_key).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::BadBody {
            path: path.to_string(),
            why: e.to_string(),
        })
    }

    /// POSTs `body` as JSON to `path`; returns the raw 200 answer.
    pub async fn post<T: Serialize>(
        &self,
        path: &str,
        body: &T,
        node_key: Option<&NodePublic>,
    ) -> Result<Bytes, ClientError> {
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
        let status = response.status().as_u16();
        let mut body = response.into_body();
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

    /// `POST /machine/register`.
    pub async fn register(&self, req: &RegisterRequest) -> Result<RegisterResponse, ClientError> {
        self.post_json("/machine/register", req, Some(&req.node_key))
            .await
    }
}
