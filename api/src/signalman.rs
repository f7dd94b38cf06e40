//! The Signalman feed at `/ws`: decoded events pushed to WebSocket clients, in the platform's
//! version-1 JSON protocol.
//!
//! A client authenticates with an `Authorization: Bearer` header on the upgrade request, or —
//! browsers cannot set that header — with a first message `{"action":"auth","token":"…"}`. Then:
//!
//! | client sends | server answers |
//! |---|---|
//! | `{"action":"subscribe","channels":["streams","analytics","system"]}` | `{"type":"subscription_confirmed","channels":[…all held…]}` |
//! | `{"action":"unsubscribe","channels":[…]}` | `{"type":"unsubscription_confirmed","channels":[…still held…]}` |
//! | `{"action":"ping"}` | `{"type":"pong"}` |
//!
//! Events arrive as `{"type","channel","data","timestamp","tenant_id"}`, several per text frame
//! separated by `\n` when they come fast. The tenant is the token's: a `tenant_id` in a client
//! message is at most checked against it (a different one is refused), never obeyed, and an
//! admin token sees every tenant. Client addresses never appear.
//!
//! A client that reads too slowly loses events rather than slowing anyone: its queue is bounded,
//! and when it overflowed the next thing it receives is
//! `{"type":"missed","channel":"system","data":{"count":N},…}`. Bad input — invalid JSON, an
//! unknown action or channel, a binary or oversized frame — gets
//! `{"type":"error","code":…,"message":…}` and the connection stays open; only frames beyond
//! the transport limit ([`MAX_FRAME`]) close it (1009), and only it.

use keel_operators::time::now_ms;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use keel_dataflows::signalman;
use keel_operators::time::format_rfc3339;
use keel_sinks::hub::{FeedFilter, Subscription, TenantSlot, Update, channel};
use serde_json::{Value, json};

use crate::auth::{AuthError, Principal, Scope};
use crate::server::{ApiError, ApiState, principal};

/// Largest client message the protocol reads, bytes; longer ones get an error and are ignored.
pub const MAX_MESSAGE: usize = 4096;
/// Largest frame the transport accepts at all; beyond it the connection is closed.
pub const MAX_FRAME: usize = 64 * 1024;
/// Bytes a WebSocket read asks the socket for at a time. Clients send little (subscriptions,
/// pings), and the transport clears this much before every read attempt — which it makes each
/// time a connection's task wakes, also to send — so the 128 KiB default cost a 128 KiB memset
/// per message pushed.
pub const READ_BUFFER: usize = 4096;
/// How long a connection may stay unauthenticated.
const AUTH_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the server pings.
const PING_EVERY: Duration = Duration::from_secs(30);
/// Most events written in one frame.
const BATCH: usize = 64;

/// `GET /ws`: upgrades to the Signalman feed.
pub async fn upgrade(
    State(state): State<ApiState>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let caller = if headers.contains_key(header::AUTHORIZATION) {
        match principal(&state.auth, &headers) {
            Ok(caller) => Some(caller),
            Err(error) => return ApiError::Unauthorized(error).into_response(),
        }
    } else {
        None
    };
    let slot = match &caller {
        Some(caller) => match admit(&state, caller) {
            Some(slot) => Some(slot),
            None => return too_many(&state).into_response(),
        },
        None => None,
    };
    upgrade
        .read_buffer_size(READ_BUFFER)
        .max_message_size(MAX_FRAME)
        .max_frame_size(MAX_FRAME)
        .on_upgrade(move |socket| async move {
            Connection {
                socket,
                state,
                caller: caller.map(|c| (c, slot)),
                subscription: None,
                filter: FeedFilter::new(None, 0),
            }
            .serve()
            .await;
        })
}

/// Takes one of the caller's tenant's connection slots.
pub fn admit(state: &ApiState, caller: &Principal) -> Option<TenantSlot> {
    let key = match caller.scope {
        Scope::All => "admin".to_owned(),
        Scope::Tenant(tenant) => tenant.to_string(),
    };
    state.hub.admit(&key, state.limits.connections_per_tenant)
}

fn too_many(state: &ApiState) -> (StatusCode, axum::Json<Value>) {
    (
        StatusCode::TOO_MANY_REQUESTS,
        axum::Json(json!({"error": {
            "code": "too_many_connections",
            "message": format!(
                "this tenant already holds {} live connections",
                state.limits.connections_per_tenant
            ),
        }})),
    )
}

fn error(code: &str, message: impl Into<String>) -> Value {
    json!({"type": "error", "code": code, "message": message.into()})
}

struct Connection {
    socket: WebSocket,
    state: ApiState,
    caller: Option<(Principal, Option<TenantSlot>)>,
    subscription: Option<Subscription>,
    filter: FeedFilter,
}

#[derive(serde::Deserialize)]
struct ClientMessage {
    action: String,
    #[serde(default)]
    channels: Vec<String>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    tenant_id: Option<String>,
}

enum Step {
    Continue,
    Close,
}

impl Connection {
    async fn serve(mut self) {
        let opened = tokio::time::Instant::now();
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        loop {
            if self.caller.is_none() && opened.elapsed() > AUTH_TIMEOUT {
                self.close(1008, "authenticate within 30 s").await;
                return;
            }
            if let Some(subscription) = &self.subscription
                && subscription.lagged()
            {
                let missed = subscription.recover();
                let notice = self.missed(missed);
                if let Step::Close = self.send(notice.to_string()).await {
                    return;
                }
            }
            // The connection ends when its token expires.
            let expires_in = self
                .caller
                .as_ref()
                .and_then(|(caller, _)| caller.expires_in(now_ms() / 1000));
            if expires_in == Some(Duration::ZERO) {
                self.close(1008, "the token expired").await;
                return;
            }
            let step = tokio::select! {
                () = tokio::time::sleep(expires_in.unwrap_or_default()), if expires_in.is_some() => {
                    Step::Continue
                }
                incoming = self.socket.recv() => match incoming {
                    Some(Ok(message)) => self.on_message(message).await,
                    Some(Err(error)) => {
                        tracing::debug!(%error, "signalman client read failed");
                        // A frame past the transport limit: say so with the close code for it
                        // (the socket is still writable; other read errors end it as it is).
                        if error.to_string().contains("Message too long") {
                            self.close(1009, "message too big").await;
                        }
                        Step::Close
                    }
                    None => Step::Close,
                },
                update = next_update(&mut self.subscription) => match update {
                    Some(first) => {
                        let frame = self.batch(&first);
                        self.send(frame).await
                    }
                    None => Step::Close,
                },
                _ = ping.tick() => {
                    self.send_message(Message::Ping(Default::default())).await
                },
                () = tokio::time::sleep(AUTH_TIMEOUT), if self.caller.is_none() => Step::Continue,
            };
            if let Step::Close = step {
                return;
            }
        }
    }

    /// Renders `first` and whatever else is already queued (up to [`BATCH`]) as one frame.
    fn batch(&mut self, first: &keel_sinks::hub::FeedItem) -> String {
        let render = |item: &keel_sinks::hub::FeedItem| {
            item.rendered(|event| signalman::message(event).to_string())
        };
        let mut frame = String::from(&*render(first));
        if let Some(subscription) = &mut self.subscription {
            for _ in 1..BATCH {
                match subscription.try_recv() {
                    Ok(Update::Event(item)) => {
                        frame.push('\n');
                        frame.push_str(&render(&item));
                    }
                    Ok(Update::Rows { .. }) => {}
                    Err(_) => break,
                }
            }
        }
        frame
    }

    fn missed(&self, count: u64) -> Value {
        let tenant = match self.caller.as_ref().map(|(c, _)| c.scope) {
            Some(Scope::Tenant(t)) => Value::String(t.to_string()),
            _ => Value::Null,
        };
        json!({
            "type": "missed",
            "channel": "system",
            "data": {"count": count},
            "timestamp": format_rfc3339(now_ms()),
            "tenant_id": tenant,
        })
    }

    async fn on_message(&mut self, message: Message) -> Step {
        match message {
            Message::Text(text) => {
                if text.len() > MAX_MESSAGE {
                    let reply = error(
                        "too_large",
                        format!("messages are at most {MAX_MESSAGE} bytes"),
                    );
                    return self.send(reply.to_string()).await;
                }
                let reply = self.on_text(text.as_str()).await;
                match reply {
                    Some(reply) => self.send(reply.to_string()).await,
                    None => Step::Continue,
                }
            }
            Message::Binary(_) => {
                let reply = error("bad_request", "send JSON text frames");
                self.send(reply.to_string()).await
            }
            Message::Ping(_) | Message::Pong(_) => Step::Continue,
            Message::Close(_) => Step::Close,
        }
    }

    /// Handles one client message; returns the reply.
    async fn on_text(&mut self, text: &str) -> Option<Value> {
        let message: ClientMessage = match serde_json::from_str(text) {
            Ok(message) => message,
            Err(e) => {
                return Some(error(
                    "bad_request",
                    format!("expected {{\"action\": …, \"channels\": […]}}: {e}"),
                ));
            }
        };
        if message.action == "auth" {
            return Some(self.authenticate(message.token.as_deref()));
        }
        let Some((caller, _)) = &self.caller else {
            return Some(error(
                "unauthorized",
                "authenticate first: {\"action\":\"auth\",\"token\":\"…\"}",
            ));
        };
        // Compared as UUIDs: the same tenant in capitals (or braces) is the same tenant.
        if let (Some(asked), Scope::Tenant(tenant)) = (&message.tenant_id, caller.scope)
            && uuid::Uuid::parse_str(asked.trim()).ok() != Some(tenant)
        {
            return Some(error("forbidden", "tenant_id is not the token's tenant"));
        }
        match message.action.as_str() {
            "subscribe" | "unsubscribe" => {}
            "ping" => return Some(json!({"type": "pong"})),
            other => {
                return Some(error(
                    "bad_request",
                    format!("unknown action {other:?}: use auth, subscribe, unsubscribe or ping"),
                ));
            }
        }
        let mut bits = 0u8;
        for name in &message.channels {
            match channel::parse(name) {
                Some(bit) => bits |= bit,
                None => {
                    return Some(error(
                        "bad_request",
                        format!("unknown channel {name:?}: use streams, analytics, system or all"),
                    ));
                }
            }
        }
        let held = &self.filter.channels;
        if message.action == "subscribe" {
            held.fetch_or(bits, Ordering::Relaxed);
            if self.subscription.is_none() {
                self.filter.tenant = match caller.scope {
                    Scope::All => None,
                    Scope::Tenant(t) => Some(t),
                };
                let subscription = self
                    .state
                    .hub
                    .subscribe_events(self.filter.clone(), self.state.limits.queue);
                self.subscription = Some(subscription);
            }
            let now = channel::names(held.load(Ordering::Relaxed));
            Some(json!({"type": "subscription_confirmed", "channels": now}))
        } else {
            held.fetch_and(!bits, Ordering::Relaxed);
            let now = channel::names(held.load(Ordering::Relaxed));
            Some(json!({"type": "unsubscription_confirmed", "channels": now}))
        }
    }

    fn authenticate(&mut self, token: Option<&str>) -> Value {
        if self.caller.is_some() {
            return error("bad_request", "already authenticated");
        }
        let Some(token) = token else {
            return error("unauthorized", AuthError::Missing.to_string());
        };
        match self.state.auth.authenticate(token, now_ms() / 1000) {
            Ok(caller) => {
                let Some(slot) = admit(&self.state, &caller) else {
                    let (_, body) = too_many(&self.state);
                    return error(
                        "too_many_connections",
                        body.0["error"]["message"].as_str().unwrap_or_default(),
                    );
                };
                let tenant = match caller.scope {
                    Scope::All => Value::Null,
                    Scope::Tenant(t) => Value::String(t.to_string()),
                };
                self.caller = Some((caller, Some(slot)));
                json!({"type": "authenticated", "tenant_id": tenant})
            }
            Err(e) => error("unauthorized", e.to_string()),
        }
    }

    async fn send(&mut self, text: String) -> Step {
        self.send_message(Message::Text(Utf8Bytes::from(text)))
            .await
    }

    async fn send_message(&mut self, message: Message) -> Step {
        let wait = self.state.limits.write_wait_for(&message);
        match tokio::time::timeout(wait, self.socket.send(message)).await {
            Ok(Ok(())) => Step::Continue,
            _ => Step::Close,
        }
    }

    async fn close(&mut self, code: u16, reason: &'static str) {
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        };
        let _ = self.send_message(Message::Close(Some(frame))).await;
    }
}

/// The next feed item, or never if there is no subscription yet.
async fn next_update(
    subscription: &mut Option<Subscription>,
) -> Option<Arc<keel_sinks::hub::FeedItem>> {
    let Some(subscription) = subscription else {
        return std::future::pending().await;
    };
    loop {
        match subscription.recv().await? {
            Update::Event(item) => return Some(item),
            Update::Rows { .. } => continue,
        }
    }
}
