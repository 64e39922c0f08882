//! A Responses socket once upgraded: client and upstream relayed message by message, each
//! `response.create` admitted (key, model, limits) before it goes upstream, and each response
//! metered by its [`Turn`].
//!
//! One response is in flight at a time, as on OpenAI's socket, whose clients (Codex, the SDKs)
//! wait for a terminal event before the next `response.create`: one sent earlier is refused with
//! an `error` event, since its events could not be told apart from the first one's.
//! Close frames pass through with their code; a side that goes away without one closes the
//! other with 1011. During a graceful shutdown the socket closes (1001) once no response is in
//! flight.

use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, close_code};
use axum::http::StatusCode;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, protocol::CloseFrame as UpstreamCloseFrame};

use super::turn::Turn;
use super::upstream::Upstream;
use crate::accounts::Lease;
use crate::auth::KeyCache;
use crate::error::GatewayError;
use crate::limiter::LeaseGuard;
use crate::provider::{Endpoint, Provider};
use crate::state::AppState;
use crate::usage::{Call, Usage};

/// What the session needs beyond its two sockets.
pub(crate) struct Session {
    pub state: AppState,
    /// The account's in-flight slot, held for the socket's life.
    pub lease: Lease,
    /// The client's secret, to re-check its key at each response: a key disabled or expired
    /// while its socket is open stops at the next `response.create`.
    pub secret: String,
}

/// The parts of a client event the gateway reads; everything passes on as sent.
#[derive(Deserialize)]
struct ClientEvent {
    #[serde(rename = "type")]
    kind: Option<String>,
    model: Option<String>,
}

enum Flow {
    Continue,
    Stop,
}

/// The two sockets and the response in flight between them.
struct Relay {
    session: Session,
    client: WebSocket,
    upstream: Upstream,
    turn: Option<Turn>,
    /// When the response in flight times out, unless an upstream event comes first.
    deadline: Instant,
}

pub(crate) async fn run(session: Session, client: WebSocket, upstream: Upstream) {
    let mut shutdown = session.state.shutdown.clone();
    let mut stopping = *shutdown.borrow();
    let mut relay = Relay {
        session,
        client,
        upstream,
        turn: None,
        deadline: Instant::now(),
    };
    loop {
        if stopping && relay.turn.is_none() {
            relay
                .close_both(close_code::AWAY, "the gateway is shutting down")
                .await;
            return;
        }
        let flow = tokio::select! {
            message = relay.client.recv() => relay.on_client(message).await,
            message = relay.upstream.next() => relay.on_upstream(message).await,
            () = tokio::time::sleep_until(relay.deadline), if relay.turn.is_some() => {
                relay.timed_out().await
            }
            changed = shutdown.changed(), if !stopping => {
                stopping = changed.is_err() || *shutdown.borrow();
                Flow::Continue
            }
        };
        if let Flow::Stop = flow {
            return;
        }
    }
}

impl Relay {
    fn account(&self) -> &str {
        &self.session.lease.account.record.id
    }

    async fn on_client(&mut self, message: Option<Result<Message, axum::Error>>) -> Flow {
        let message = match message {
            Some(Ok(message)) => message,
            // Gone without a close frame: the response in flight (if any) is billed as seen.
            None | Some(Err(_)) => {
                self.turn.take();
                let _ = self.upstream.close(None).await;
                return Flow::Stop;
            }
        };
        let forward = match message {
            Message::Text(text) => {
                let event: Option<ClientEvent> = serde_json::from_str(&text).ok();
                if event.as_ref().and_then(|e| e.kind.as_deref()) == Some("response.create") {
                    let model = event.and_then(|e| e.model);
                    match admit(&self.session, model, self.turn.is_some()).await {
                        Ok(admitted) => {
                            self.turn = Some(admitted.into_turn(&self.session));
                            self.deadline = Instant::now()
                                + self.session.state.config.upstream_first_byte_timeout;
                        }
                        Err(err) => {
                            if send_event(&mut self.client, &err).await.is_ok() {
                                return Flow::Continue;
                            }
                            let _ = self.upstream.close(None).await;
                            return Flow::Stop;
                        }
                    }
                }
                match tungstenite::Utf8Bytes::try_from(Bytes::from(text)) {
                    Ok(text) => tungstenite::Message::Text(text),
                    Err(_) => return Flow::Continue,
                }
            }
            Message::Binary(bytes) => tungstenite::Message::Binary(bytes),
            Message::Close(frame) => {
                self.turn.take();
                let frame = frame.map(|f| UpstreamCloseFrame {
                    code: f.code.into(),
                    reason: tungstenite::Utf8Bytes::from(f.reason.as_str()),
                });
                let _ = self.upstream.close(frame).await;
                return Flow::Stop;
            }
            // Each side answers its own pings.
            Message::Ping(_) | Message::Pong(_) => return Flow::Continue,
        };
        if let Err(e) = self.upstream.send(forward).await {
            tracing::warn!(error = %e, account = %self.account(), "sending to the upstream socket failed");
            self.upstream_lost().await;
            return Flow::Stop;
        }
        Flow::Continue
    }

    async fn on_upstream(
        &mut self,
        message: Option<Result<tungstenite::Message, tungstenite::Error>>,
    ) -> Flow {
        let message = match message {
            Some(Ok(message)) => message,
            None | Some(Err(_)) => {
                if let Some(Err(e)) = &message {
                    tracing::warn!(error = %e, account = %self.account(), "upstream socket failed");
                }
                self.upstream_lost().await;
                return Flow::Stop;
            }
        };
        let forward = match message {
            tungstenite::Message::Text(text) => {
                if let Some(turn) = self.turn.as_mut() {
                    self.deadline =
                        Instant::now() + self.session.state.config.upstream_idle_timeout;
                    if let Some(status) = turn.observe(&text) {
                        self.turn.take();
                        rest_after(&self.session, status).await;
                    }
                }
                match Utf8Bytes::try_from(Bytes::from(text)) {
                    Ok(text) => Message::Text(text),
                    Err(_) => return Flow::Continue,
                }
            }
            tungstenite::Message::Binary(bytes) => Message::Binary(bytes),
            tungstenite::Message::Close(frame) => {
                if let Some(mut turn) = self.turn.take() {
                    turn.cut(StatusCode::BAD_GATEWAY, "upstream_unreachable");
                }
                let frame = frame.map(|f| CloseFrame {
                    code: f.code.into(),
                    reason: Utf8Bytes::from(f.reason.as_str()),
                });
                let _ = self.client.send(Message::Close(frame)).await;
                return Flow::Stop;
            }
            tungstenite::Message::Ping(_)
            | tungstenite::Message::Pong(_)
            | tungstenite::Message::Frame(_) => return Flow::Continue,
        };
        if self.client.send(forward).await.is_err() {
            // The client is gone: a response still in flight is billed as seen when dropped.
            self.turn.take();
            return Flow::Stop;
        }
        Flow::Continue
    }

    /// The upstream went away without a close frame (or could not be written to).
    async fn upstream_lost(&mut self) {
        if let Some(mut turn) = self.turn.take() {
            turn.cut(StatusCode::BAD_GATEWAY, "upstream_unreachable");
        }
        close_client(
            &mut self.client,
            close_code::ERROR,
            "upstream connection lost",
        )
        .await;
    }

    /// No upstream event in time: the upstream socket's state is unknown, so both close.
    async fn timed_out(&mut self) -> Flow {
        tracing::warn!(account = %self.account(), "upstream socket went quiet during a response");
        if let Some(mut turn) = self.turn.take() {
            turn.cut(StatusCode::GATEWAY_TIMEOUT, "upstream_timeout");
        }
        let _ = send_event(&mut self.client, &GatewayError::UpstreamTimeout).await;
        self.close_both(close_code::ERROR, "upstream timed out")
            .await;
        Flow::Stop
    }

    async fn close_both(&mut self, code: u16, reason: &'static str) {
        close_client(&mut self.client, code, reason).await;
        let _ = self.upstream.close(None).await;
    }
}

/// An upstream error status that rests an account over HTTP rests it here too, for the
/// requests that pick an account next; this socket stays where it is.
async fn rest_after(session: &Session, status: StatusCode) {
    if super::super::rests_account(status) {
        let state = &session.state;
        let now = super::super::now_ms();
        state.metrics.cooldown(&session.lease.account.record.id);
        state
            .accounts
            .cool_down(&session.lease.account, state.config.default_cooldown, now)
            .await;
    }
}

/// A `response.create` admitted: its call and its concurrency slot.
struct Admitted {
    call: Call,
    concurrency: Option<LeaseGuard>,
}

impl Admitted {
    fn into_turn(self, session: &Session) -> Turn {
        Turn::start(
            self.call,
            self.concurrency,
            Arc::clone(&session.state.metrics),
        )
    }
}

/// The checks of a `POST /v1/responses`, per response: the key (still valid), the model (named,
/// allowed for the key, served by the socket's account), then the limits. A refusal is
/// published here, as the refused request's one event.
async fn admit(
    session: &Session,
    model: Option<String>,
    busy: bool,
) -> Result<Admitted, GatewayError> {
    let state = &session.state;
    let mut call = Call::start(Endpoint::Responses, state.events.clone());
    // Its access-log line names the socket's request: GET /v1/responses.
    call.method = "GET";
    call.stream = true;
    call.account_id = Some(session.lease.account.record.id.clone());
    call.requested_model = model.clone();
    match check(state.keys.as_ref(), session, &mut call, model, busy).await {
        Ok(concurrency) => Ok(Admitted { call, concurrency }),
        Err(err) => {
            if let GatewayError::Store(e) = &err {
                tracing::error!(error = %e, "store unavailable while admitting a socket response");
            }
            let status = err.status().as_u16();
            call.publish(status, &Usage::default(), Some(err.kind()));
            state
                .metrics
                .request_done(Endpoint::Responses.as_str(), status);
            Err(err)
        }
    }
}

async fn check(
    keys: &KeyCache,
    session: &Session,
    call: &mut Call,
    model: Option<String>,
    busy: bool,
) -> Result<Option<LeaseGuard>, GatewayError> {
    let now_ms = chrono::Utc::now().timestamp_millis();
    let key = keys.authenticate(Some(&session.secret), now_ms).await?;
    call.key = Some(std::sync::Arc::clone(&key));
    if busy {
        return Err(GatewayError::InvalidRequest(
            "a response is already in progress on this socket; send the next response.create after its terminal event".into(),
        ));
    }
    let model = model
        .filter(|m| !m.is_empty())
        .ok_or_else(|| GatewayError::InvalidRequest("model: field required".into()))?;
    if let Some(allowed) = &key.models
        && !allowed.contains(&model)
    {
        return Err(GatewayError::ModelNotAllowed(model));
    }
    let account = &session.lease.account;
    if !account.serves(Provider::OpenAi, Some(&model)) {
        return Err(GatewayError::NoAccount {
            provider: Provider::OpenAi,
            model,
        });
    }
    let admission = session.state.limiter.admit(&key, &call.id()).await?;
    Ok(admission.lease)
}

async fn send_event(client: &mut WebSocket, err: &GatewayError) -> Result<(), ()> {
    let text = err.socket_event().to_string();
    client
        .send(Message::Text(Utf8Bytes::from(text)))
        .await
        .map_err(|_| ())
}

async fn close_client(client: &mut WebSocket, code: u16, reason: &'static str) {
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    };
    let _ = client.send(Message::Close(Some(frame))).await;
}
