//! The ts2021 Noise handshake: `Noise_IK_25519_ChaChaPoly_BLAKE2s` with the prologue
//! `Tailscale Control Protocol v<version>`, where the version is the client's capability
//! version. The initiator is the client's machine key; the responder is the control key from
//! `/key`.
//!
//! Tailscale frames the two messages:
//! - initiation (101 bytes): `version (BE u16) ‖ 0x01 ‖ 96 (BE u16) ‖ ephemeral ‖ sealed static ‖ tag`;
//! - response (51 bytes): `0x02 ‖ 48 (BE u16) ‖ ephemeral ‖ tag`;
//! - error (either size): `0x03 ‖ length (BE u16) ‖ UTF-8 text`.
//!
//! The `snow` library runs the handshake. Its split keys then drive our own [`Transport`]
//! because the record nonces differ from the Noise spec (see `record`).

use proto::{MachinePrivate, MachinePublic};
use snow::{Builder, HandshakeState};

use crate::record::Transport;

pub const PROTOCOL_NAME: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
pub const INITIATION_LEN: usize = 101;
pub const RESPONSE_LEN: usize = 51;
const MSG_INITIATION: u8 = 0x01;
const MSG_RESPONSE: u8 = 0x02;
const MSG_ERROR: u8 = 0x03;
const INITIATION_BODY: usize = 96;
const RESPONSE_BODY: usize = 48;

/// The prologue both sides mix into the handshake hash.
pub fn prologue(version: u16) -> Vec<u8> {
    format!("Tailscale Control Protocol v{version}").into_bytes()
}

/// The handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoiseError {
    #[error("malformed handshake message: {0}")]
    Malformed(&'static str),
    #[error("handshake does not verify (wrong keys, wrong protocol version, or tampered): {0}")]
    Crypto(String),
    #[error("control server refused the handshake: {0}")]
    Refused(String),
}

impl From<snow::Error> for NoiseError {
    fn from(e: snow::Error) -> Self {
        NoiseError::Crypto(e.to_string())
    }
}

fn builder<'a>(prologue: &'a [u8], private: &'a [u8; 32]) -> Result<Builder<'a>, NoiseError> {
    let params = PROTOCOL_NAME
        .parse()
        .map_err(|_| NoiseError::Malformed("unsupported Noise pattern"))?;
    Ok(Builder::new(params)
        .prologue(prologue)?
        .local_private_key(private)?)
}

/// The client side, between sending the initiation and reading the response.
pub struct ClientHandshake {
    hs: HandshakeState,
}

impl std::fmt::Debug for ClientHandshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientHandshake")
    }
}

impl ClientHandshake {
    /// Starts a handshake as `machine` towards the control key `control`; returns the
    /// initiation to send (in the `X-Tailscale-Handshake` header, base64).
    pub fn start(
        machine: &MachinePrivate,
        control: &MachinePublic,
        version: u16,
    ) -> Result<(Self, [u8; INITIATION_LEN]), NoiseError> {
        let prologue = prologue(version);
        let private = machine.to_bytes();
        let mut hs = builder(&prologue, &private)?
            .remote_public_key(control.as_bytes())?
            .build_initiator()?;
        let mut msg = [0u8; INITIATION_LEN];
        msg[0..2].copy_from_slice(&version.to_be_bytes());
        msg[2] = MSG_INITIATION;
        msg[3..5].copy_from_slice(&(INITIATION_BODY as u16).to_be_bytes());
        let n = hs.write_message(&[], &mut msg[5..])?;
        if n != INITIATION_BODY {
            return Err(NoiseError::Malformed("initiation has the wrong size"));
        }
        Ok((ClientHandshake { hs }, msg))
    }

    /// Reads the server's response (or its error message) and returns the transport.
    pub fn finish(mut self, response: &[u8]) -> Result<Transport, NoiseError> {
        if response.len() >= 3 && response[0] == MSG_ERROR {
            let len = u16::from_be_bytes([response[1], response[2]]) as usize;
            let text = response.get(3..3 + len).unwrap_or(&response[3..]);
            return Err(NoiseError::Refused(
                String::from_utf8_lossy(text).into_owned(),
            ));
        }
        if response.len() != RESPONSE_LEN
            || response[0] != MSG_RESPONSE
            || u16::from_be_bytes([response[1], response[2]]) as usize != RESPONSE_BODY
        {
            return Err(NoiseError::Malformed(
                "response is not a 51-byte type-2 message",
            ));
        }
        let mut payload = [0u8; 64];
        self.hs.read_message(&response[3..], &mut payload)?;
        let (c1, c2) = self.hs.dangerously_get_raw_split();
        Ok(Transport::new(&c1, &c2))
    }
}

/// A handshake the server accepted.
#[derive(Debug)]
pub struct Accepted {
    /// The client's machine key, proven by the handshake.
    pub client: MachinePublic,
    /// The client's capability version (also the Noise protocol version).
    pub version: u16,
    /// The 51-byte response to send back.
    pub response: [u8; RESPONSE_LEN],
    pub transport: Transport,
}

/// The server side: checks an initiation with the control private key.
pub fn accept(control: &MachinePrivate, initiation: &[u8]) -> Result<Accepted, NoiseError> {
    if initiation.len() != INITIATION_LEN
        || initiation[2] != MSG_INITIATION
        || u16::from_be_bytes([initiation[3], initiation[4]]) as usize != INITIATION_BODY
    {
        return Err(NoiseError::Malformed(
            "initiation is not a 101-byte type-1 message",
        ));
    }
    let version = u16::from_be_bytes([initiation[0], initiation[1]]);
    let prologue = prologue(version);
    let private = control.to_bytes();
    let mut hs = builder(&prologue, &private)?.build_responder()?;
    let mut payload = [0u8; 64];
    hs.read_message(&initiation[5..], &mut payload)?;
    let client = hs
        .get_remote_static()
        .and_then(MachinePublic::from_slice)
        .ok_or(NoiseError::Malformed("initiation carries no static key"))?;
    let mut response = [0u8; RESPONSE_LEN];
    response[0] = MSG_RESPONSE;
    response[1..3].copy_from_slice(&(RESPONSE_BODY as u16).to_be_bytes());
    let n = hs.write_message(&[], &mut response[3..])?;
    if n != RESPONSE_BODY {
        return Err(NoiseError::Malformed("response has the wrong size"));
    }
    let (c1, c2) = hs.dangerously_get_raw_split();
    Ok(Accepted {
        client,
        version,
        response,
        transport: Transport::new(&c2, &c1),
    })
}

/// An error message a server sends instead of a response (text truncated to fit).
pub fn error_message(text: &str) -> Vec<u8> {
    let text = &text.as_bytes()[..text.len().min(u16::MAX as usize)];
    let mut out = Vec::with_capacity(3 + text.len());
    out.push(MSG_ERROR);
    out.extend_from_slice(&(text.len() as u16).to_be_bytes());
    out.extend_from_slice(text);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    #[test]
    fn prologue_is_tailscales() {
        assert_eq!(prologue(142), b"Tailscale Control Protocol v142");
    }

    #[test]
    fn handshake_then_records_both_ways() {
        let machine = MachinePrivate::generate();
        let control = MachinePrivate::generate();
        let (hs, init) = ClientHandshake::start(&machine, &control.public(), 142).unwrap();
        assert_eq!(&init[..5], &[0x00, 0x8e, 0x01, 0x00, 0x60]);
        let mut acc = accept(&control, &init).unwrap();
        assert_eq!(acc.client, machine.public());
        assert_eq!(acc.version, 142);
        assert_eq!(&acc.response[..3], &[0x02, 0x00, 0x30]);
        let mut client = hs.finish(&acc.response).unwrap();

        for msg in [&b"client preface"[..], b"second record, nonce 1"] {
            let mut wire = Vec::new();
            client.seal(msg, &mut wire).unwrap();
            let mut buf = BytesMut::from(&wire[..]);
            assert_eq!(acc.transport.open(&mut buf).unwrap().unwrap(), msg);
        }
        let mut wire = Vec::new();
        acc.transport.seal(b"server settings", &mut wire).unwrap();
        let mut buf = BytesMut::from(&wire[..]);
        assert_eq!(client.open(&mut buf).unwrap().unwrap(), b"server settings");
    }

    #[test]
    fn wrong_control_key_or_altered_version_fails() {
        let machine = MachinePrivate::generate();
        let control = MachinePrivate::generate();
        let impostor = MachinePrivate::generate();
        let (_, init) = ClientHandshake::start(&machine, &control.public(), 142).unwrap();
        assert!(matches!(
            accept(&impostor, &init),
            Err(NoiseError::Crypto(_))
        ));
        let mut altered = init;
        altered[1] = 0x8d; // claims version 141: the prologue no longer matches
        assert!(matches!(
            accept(&control, &altered),
            Err(NoiseError::Crypto(_))
        ));
        assert!(matches!(
            accept(&control, &init[..100]),
            Err(NoiseError::Malformed(_))
        ));
    }

    #[test]
    fn client_reports_server_error_messages() {
        let machine = MachinePrivate::generate();
        let control = MachinePrivate::generate();
        let (hs, _) = ClientHandshake::start(&machine, &control.public(), 100).unwrap();
        assert_eq!(
            hs.finish(&error_message("capability version too old"))
                .unwrap_err(),
            NoiseError::Refused("capability version too old".into())
        );
    }
}
