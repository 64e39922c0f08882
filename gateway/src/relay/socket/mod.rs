//! Responses WebSocket mode (`GET /v1/responses` with an upgrade), relayed socket to socket.
//!
//! The upstream socket is opened before the client's is accepted, on one account of the OpenAI
//! accounts (picked as for a request, whatever model it serves: the model comes with each
//! `response.create`), with the same failover: an upstream that refuses the upgrade with 429 or
//! 5xx, or cannot be reached, rests and the next account is tried once. An upstream refusal
//! that remains reaches the client as the HTTP answer it was. The socket then stays on that
//! account for its life, since continuation state (`previous_response_id`) lives on it.
//!
//! `upstream` opens the account's socket, `session` relays the two, `turn` meters one response.

mod session;
mod turn;
mod upstream;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::ws::WebSocketUpgrade;
use axum::http::HeaderMap;
use axum::response::Response;

use crate::accounts::Want;
use crate::error::GatewayError;
use crate::provider::Provider;
use crate::state::AppState;
use crate::usage::{Call, Usage};
use upstream::Refused;

/// Opens the upstream socket for an authenticated upgrade and answers the client's: 101 and the
/// relay, or the error (each with the upgrade's one event when it is refused).
pub async fn open(
    state: &AppState,
    mut call: Call,
    client_headers: &HeaderMap,
    secret: String,
    upgrade: WebSocketUpgrade,
) -> Response {
    let session = client_headers
        .get("x-session-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty());
    let mut lease = match state
        .accounts
        .pick(&any_model(session, None), super::now_ms())
    {
        Ok(lease) => lease,
        Err(err) => return super::reject(call, err),
    };
    call.account_id = Some(lease.account.record.id.clone());
    let timeout = state.config.upstream_connect_timeout + state.config.upstream_first_byte_timeout;
    let mut failed_over = false;
    let (upstream, upstream_headers) = loop {
        let account = Arc::clone(&lease.account);
        let attempt = upstream::connect(
            &account,
            client_headers,
            timeout,
            state.config.max_body_bytes,
        )
        .await;
        let rest = match &attempt {
            Ok(_) => None,
            Err(Refused::Answered {
                status, headers, ..
            }) => super::rests_account(*status)
                .then(|| super::retry_after(headers).unwrap_or(state.config.default_cooldown)),
            Err(Refused::Failed(e)) => {
                tracing::warn!(error = %e, account = %account.record.id, "upstream socket could not be opened");
                Some(state.config.default_cooldown)
            }
        };
        if let Some(rest) = rest {
            let want = any_model(session, Some(&account.record.id));
            let again = (!failed_over).then_some(&want);
            if let Some(next) =
                super::rest_and_fail_over(state, &mut call, &account, rest, again).await
            {
                failed_over = true;
                lease = next;
                continue;
            }
        }
        match attempt {
            Ok(opened) => break opened,
            Err(Refused::Failed(err)) => return super::reject(call, err),
            Err(Refused::Answered { status, .. }) if status.is_redirection() => {
                tracing::warn!(account = %account.record.id, %status, "upstream answered the upgrade with a redirect; set the account's base_url to the final address");
                return super::reject(call, GatewayError::UpstreamUnreachable("redirected".into()));
            }
            Err(Refused::Answered {
                status,
                headers,
                body,
            }) => {
                call.publish(
                    status.as_u16(),
                    &Usage::default(),
                    super::upstream_error_kind(status),
                );
                let headers = super::client_response_headers(&headers);
                return super::respond(status, headers, Body::from(body));
            }
        }
    };
    call.became_socket();
    let session = session::Session {
        state: state.clone(),
        lease,
        secret,
    };
    let mut response = upgrade.on_upgrade(move |client| session::run(session, client, upstream));
    response
        .headers_mut()
        .extend(super::client_response_headers(&upstream_headers));
    response
}

/// An OpenAI account for a socket, whatever models it serves.
fn any_model<'a>(session: Option<&'a str>, exclude: Option<&'a str>) -> Want<'a> {
    Want {
        provider: Provider::OpenAi,
        model: None,
        session,
        exclude,
    }
}
