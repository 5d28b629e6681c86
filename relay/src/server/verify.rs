//! Client admission through a verify URL (Headscale's `POST /verify`): the relay posts
//! `{"NodePublic":"nodekey:…","Source":"<ip>"}` and expects `200 {"Allow":true}`.
//! Anything else refuses; an unreachable URL admits or refuses according to `fail_open`.
//! Connected clients are asked about again every `interval`, so a revoked device is cut
//! off without restarting the relay.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::StreamExt as _;
use proto::NodePublic;
use serde::{Deserialize, Serialize};

use super::metrics::CloseReason;
use super::Shared;

/// How clients are verified.
#[derive(Debug, Clone)]
pub struct VerifyConfig {
    pub url: String,
    /// Admit clients when the URL cannot be reached.
    pub fail_open: bool,
    /// Re-verification interval for connected clients.
    pub interval: Duration,
    /// Timeout of one verify request.
    pub timeout: Duration,
}

#[derive(Serialize)]
struct VerifyRequest<'a> {
    #[serde(rename = "NodePublic")]
    node_public: &'a NodePublic,
    #[serde(rename = "Source")]
    source: String,
}

#[derive(Deserialize)]
struct VerifyResponse {
    #[serde(rename = "Allow", default)]
    allow: bool,
}

/// Concurrent verify requests during re-verification.
const REVERIFY_CONCURRENCY: usize = 16;
/// Largest verify response body read.
const MAX_VERIFY_BODY: usize = 4096;

fn http_client() -> &'static reqwest::Client {
    static C: OnceLock<reqwest::Client> = OnceLock::new();
    C.get_or_init(|| {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default()
    })
}

/// `Ok(allowed)` from a definite answer, `Err` when the URL could not be asked.
async fn ask(v: &VerifyConfig, key: &NodePublic, source: IpAddr) -> Result<bool, String> {
    let req = VerifyRequest {
        node_public: key,
        source: source.to_string(),
    };
    let resp = http_client()
        .post(&v.url)
        .timeout(v.timeout)
        .json(&req)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if resp.status() != reqwest::StatusCode::OK {
        return Ok(false);
    }
    let mut body = Vec::new();
    let mut resp = resp;
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_VERIFY_BODY {
            return Ok(false);
        }
    }
    Ok(serde_json::from_slice::<VerifyResponse>(&body)
        .map(|r| r.allow)
        .unwrap_or(false))
}

/// Whether `key` connecting from `source` may use this relay.
pub(crate) async fn admit(
    shared: &Shared,
    v: &VerifyConfig,
    key: &NodePublic,
    source: IpAddr,
) -> bool {
    let m = &shared.metrics;
    match ask(v, key, source).await {
        Ok(true) => {
            m.verify_allowed.fetch_add(1, Ordering::Relaxed);
            true
        }
        Ok(false) => {
            m.verify_denied.fetch_add(1, Ordering::Relaxed);
            false
        }
        Err(e) => {
            m.verify_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(client = %key.short(), error = %e, fail_open = v.fail_open, "verify URL unreachable");
            v.fail_open
        }
    }
}

pub(crate) async fn reverify_loop(shared: Arc<Shared>, v: VerifyConfig) {
    let mut tick = tokio::time::interval(v.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let clients = shared.routes().regular_clients();
        futures_util::stream::iter(clients)
            .for_each_concurrent(REVERIFY_CONCURRENCY, |h| {
                let shared = shared.clone();
                let v = v.clone();
                async move {
                    if !admit(&shared, &v, &h.key, h.remote.ip()).await {
                        let conns = shared.routes().connections_of(&h.key);
                        tracing::info!(client = %h.key.short(), "verify URL now refuses this client; disconnecting");
                        for c in conns {
                            c.close(CloseReason::Revoked);
                        }
                    }
                }
            })
            .await;
    }
}
