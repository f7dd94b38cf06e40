//! The Decklog gRPC service: version 2 (`helmsmancontrol.DecklogService`: `SendEvent`, and
//! Keel's client-streaming `SendEvents` for throughput) and version 1 (`decklog.DecklogService`:
//! `StreamEvents`, `SendBalancingEvent`, `CheckHealth`). Every call but `CheckHealth` needs a
//! bearer token; each event is checked on its own, so a bad one is refused with its reason
//! while the good ones of the same batch are kept; an event is acknowledged only when the
//! hand-off has it (Kafka's acknowledgement, or the embedded engine's input).

use keel_operators::time::now_ms;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use tonic::server::{Grpc, NamedService};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;

use crate::envelope::{
    Caller, Outgoing, balancing_record, trigger_into_record, trigger_record, v1_record,
};
use crate::handoff::{Delivered, Handoff};
use crate::proto::{
    BalancingEvent, Empty, Event, EventResponse, HealthRequest, HealthResponse, MistTrigger,
    Rejection, SendEventsResponse, Timestamp,
};

/// Version-2 service name.
pub const V2_SERVICE: &str = "helmsmancontrol.DecklogService";
/// Version-1 service name.
pub const V1_SERVICE: &str = "decklog.DecklogService";
/// `SendEvent` path.
pub const SEND_EVENT: &str = "/helmsmancontrol.DecklogService/SendEvent";
/// `SendEvents` path (Keel's batch method).
pub const SEND_EVENTS: &str = "/helmsmancontrol.DecklogService/SendEvents";
/// `StreamEvents` path (version 1).
pub const STREAM_EVENTS: &str = "/decklog.DecklogService/StreamEvents";
/// `SendBalancingEvent` path (version 1).
pub const SEND_BALANCING_EVENT: &str = "/decklog.DecklogService/SendBalancingEvent";
/// `CheckHealth` path (version 1).
pub const CHECK_HEALTH: &str = "/decklog.DecklogService/CheckHealth";

/// Events of a `SendEvents` stream handed off together.
const CHUNK: usize = 4096;
/// Most events one `SendEvents` call may carry (its answer lists every refusal).
pub const MAX_STREAM_EVENTS: u32 = 1 << 20;

/// Who may send: maps a bearer token to a [`Caller`].
pub trait Authenticate: Send + Sync + 'static {
    /// The caller behind `token`, or why it is refused (said to the caller).
    fn caller(&self, token: &str) -> Result<Caller, String>;
}

/// The service state shared by every connection.
#[derive(Clone)]
pub struct Decklog {
    handoff: Handoff,
    auth: Arc<dyn Authenticate>,
}

impl std::fmt::Debug for Decklog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decklog")
            .field("handoff", &self.handoff)
            .finish_non_exhaustive()
    }
}

impl Decklog {
    /// A service handing accepted events to `handoff`, callers checked by `auth`.
    pub fn new(handoff: Handoff, auth: Arc<dyn Authenticate>) -> Self {
        Decklog { handoff, auth }
    }

    /// Its hand-off (for counters).
    pub fn handoff(&self) -> &Handoff {
        &self.handoff
    }

    fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("missing bearer token"))?;
        // The scheme in any case, as the API reads it (RFC 7235).
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim_start())
            .ok_or_else(|| Status::unauthenticated("authorization is not `Bearer <token>`"))?;
        self.auth.caller(token).map_err(Status::unauthenticated)
    }

    /// Checks and hands off one trigger.
    pub async fn send_event(
        &self,
        caller: Caller,
        trigger: &MistTrigger,
    ) -> Result<Delivered, Status> {
        let record = trigger_record(trigger, caller, now_ms()).map_err(Status::invalid_argument)?;
        self.handoff
            .deliver(vec![record])
            .await
            .pop()
            .unwrap_or_else(|| Err(crate::handoff::HandoffError("not delivered".to_owned())))
            .map_err(|e| Status::unavailable(e.0))
    }

    /// Checks and hands off a stream of triggers, answering once for all of them.
    pub async fn send_events(
        &self,
        caller: Caller,
        mut stream: Streaming<MistTrigger>,
    ) -> Result<SendEventsResponse, Status> {
        let mut answer = SendEventsResponse::default();
        let mut chunk: Vec<(u32, Outgoing)> = Vec::with_capacity(CHUNK);
        let mut index = 0u32;
        while let Some(trigger) = stream.message().await? {
            if index >= MAX_STREAM_EVENTS {
                self.deliver_chunk(&mut chunk, &mut answer).await;
                return Err(Status::invalid_argument(format!(
                    "at most {MAX_STREAM_EVENTS} events per SendEvents call ({} stored; send the rest in another call)",
                    answer.accepted
                )));
            }
            match trigger_into_record(trigger, caller, now_ms()) {
                Ok(record) => chunk.push((index, record)),
                Err(reason) => answer.rejected.push(Rejection {
                    index,
                    reason,
                    retryable: false,
                }),
            }
            index += 1;
            if chunk.len() >= CHUNK {
                self.deliver_chunk(&mut chunk, &mut answer).await;
            }
        }
        self.deliver_chunk(&mut chunk, &mut answer).await;
        answer.rejected.sort_by_key(|r| r.index);
        Ok(answer)
    }

    async fn deliver_chunk(
        &self,
        chunk: &mut Vec<(u32, Outgoing)>,
        answer: &mut SendEventsResponse,
    ) {
        if chunk.is_empty() {
            return;
        }
        let (indices, records): (Vec<u32>, Vec<Outgoing>) = chunk.drain(..).unzip();
        let results = self.handoff.deliver(records).await;
        for (index, result) in indices.into_iter().zip(results) {
            match result {
                Ok(Delivered::New) => answer.accepted += 1,
                Ok(Delivered::Duplicate) => {
                    answer.accepted += 1;
                    answer.duplicates += 1;
                }
                Err(error) => answer.rejected.push(Rejection {
                    index,
                    reason: error.0,
                    retryable: true,
                }),
            }
        }
    }

    /// Checks and hands off one version-1 batch; the answer counts what was kept and names what
    /// was refused.
    pub async fn stream_batch(&self, caller: Caller, batch: &Event) -> EventResponse {
        let now = now_ms();
        let mut problems = Vec::new();
        let mut records = Vec::with_capacity(batch.events.len());
        for index in 0..batch.events.len() {
            match v1_record(batch, index, caller, now) {
                Ok(record) => records.push(record),
                Err(reason) => problems.push(format!("event {index}: {reason}")),
            }
        }
        let mut processed = 0u32;
        for result in self.handoff.deliver(records).await {
            match result {
                Ok(_) => processed += 1,
                Err(error) => problems.push(format!("not stored, send again: {error}")),
            }
        }
        EventResponse {
            status: if problems.is_empty() {
                "success"
            } else {
                "error"
            }
            .to_owned(),
            message: if problems.is_empty() {
                format!("{processed} events stored")
            } else {
                format!("{processed} events stored; {}", problems.join("; "))
            },
            processed_count: processed,
        }
    }

    /// Checks and hands off one version-1 routing decision.
    pub async fn send_balancing(
        &self,
        caller: Caller,
        event: &BalancingEvent,
    ) -> Result<EventResponse, Status> {
        let record = balancing_record(event, caller, now_ms()).map_err(Status::invalid_argument)?;
        match self.handoff.deliver(vec![record]).await.pop() {
            Some(Ok(_)) => Ok(EventResponse {
                status: "success".to_owned(),
                message: String::new(),
                processed_count: 1,
            }),
            Some(Err(error)) => Err(Status::unavailable(error.0)),
            None => Err(Status::internal("not delivered")),
        }
    }
}

fn health() -> HealthResponse {
    let now = now_ms();
    HealthResponse {
        status: "healthy".to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        timestamp: Some(Timestamp {
            seconds: now.div_euclid(1000),
            nanos: i32::try_from(now.rem_euclid(1000) * 1_000_000).unwrap_or(0),
        }),
    }
}

/// The version-2 service, for tonic's router.
#[derive(Clone, Debug)]
pub struct DecklogV2(pub Decklog);

/// The version-1 service, for tonic's router.
#[derive(Clone, Debug)]
pub struct DecklogV1(pub Decklog);

impl NamedService for DecklogV2 {
    const NAME: &'static str = V2_SERVICE;
}

impl NamedService for DecklogV1 {
    const NAME: &'static str = V1_SERVICE;
}

fn no_method(path: &str) -> BoxFuture<http::Response<tonic::body::Body>, Infallible> {
    let status = Status::unimplemented(format!("no method {path}"));
    Box::pin(async move { Ok(status.into_http()) })
}

impl<B> Service<http::Request<B>> for DecklogV2
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let decklog = self.0.clone();
        match request.uri().path() {
            SEND_EVENT => Box::pin(async move {
                let method = tower::service_fn(move |request: Request<MistTrigger>| {
                    let decklog = decklog.clone();
                    async move {
                        let caller = decklog.caller(&request)?;
                        decklog.send_event(caller, request.get_ref()).await?;
                        Ok::<_, Status>(Response::new(Empty {}))
                    }
                });
                let mut grpc = Grpc::new(ProstCodec::<Empty, MistTrigger>::default());
                Ok(grpc.unary(method, request).await)
            }),
            SEND_EVENTS => Box::pin(async move {
                let method = tower::service_fn(move |request: Request<Streaming<MistTrigger>>| {
                    let decklog = decklog.clone();
                    async move {
                        let caller = decklog.caller(&request)?;
                        let answer = decklog.send_events(caller, request.into_inner()).await?;
                        Ok::<_, Status>(Response::new(answer))
                    }
                });
                let mut grpc = Grpc::new(ProstCodec::<SendEventsResponse, MistTrigger>::default());
                Ok(grpc.client_streaming(method, request).await)
            }),
            other => no_method(other),
        }
    }
}

type EventResponses = BoxStream<'static, Result<EventResponse, Status>>;

impl<B> Service<http::Request<B>> for DecklogV1
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let decklog = self.0.clone();
        match request.uri().path() {
            STREAM_EVENTS => Box::pin(async move {
                let method = tower::service_fn(move |request: Request<Streaming<Event>>| {
                    let decklog = decklog.clone();
                    async move {
                        let caller = decklog.caller(&request)?;
                        let batches = request.into_inner();
                        let answers: EventResponses = futures_util::stream::unfold(
                            (decklog, batches),
                            move |(decklog, mut batches)| async move {
                                match batches.message().await {
                                    Ok(Some(batch)) => {
                                        let answer = decklog.stream_batch(caller, &batch).await;
                                        Some((Ok(answer), (decklog, batches)))
                                    }
                                    Ok(None) => None,
                                    Err(status) => Some((Err(status), (decklog, batches))),
                                }
                            },
                        )
                        .boxed();
                        Ok::<_, Status>(Response::new(answers))
                    }
                });
                let mut grpc = Grpc::new(ProstCodec::<EventResponse, Event>::default());
                Ok(grpc.streaming(method, request).await)
            }),
            SEND_BALANCING_EVENT => Box::pin(async move {
                let method = tower::service_fn(move |request: Request<BalancingEvent>| {
                    let decklog = decklog.clone();
                    async move {
                        let caller = decklog.caller(&request)?;
                        let answer = decklog.send_balancing(caller, request.get_ref()).await?;
                        Ok::<_, Status>(Response::new(answer))
                    }
                });
                let mut grpc = Grpc::new(ProstCodec::<EventResponse, BalancingEvent>::default());
                Ok(grpc.unary(method, request).await)
            }),
            CHECK_HEALTH => Box::pin(async move {
                let method = tower::service_fn(|_: Request<HealthRequest>| async {
                    Ok::<_, Status>(Response::new(health()))
                });
                let mut grpc = Grpc::new(ProstCodec::<HealthResponse, HealthRequest>::default());
                Ok(grpc.unary(method, request).await)
            }),
            other => no_method(other),
        }
    }
}

/// TLS material for serving.
#[derive(Clone)]
pub struct Tls {
    /// PEM certificate chain.
    pub cert: Vec<u8>,
    /// PEM private key.
    pub key: Vec<u8>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls { cert, key: *** }")
    }
}

impl Tls {
    /// Reads a certificate chain and key from PEM files.
    pub fn from_files(cert: &std::path::Path, key: &std::path::Path) -> Result<Self, String> {
        let read = |path: &std::path::Path, what: &str| {
            std::fs::read(path)
                .map_err(|e| format!("cannot read the TLS {what} {}: {e}", path.display()))
        };
        Ok(Tls {
            cert: read(cert, "certificate")?,
            key: read(key, "key")?,
        })
    }
}

/// Serves both versions on `listener` (TLS when `tls` is given) until the runtime stops.
pub async fn serve(
    listener: tokio::net::TcpListener,
    decklog: Decklog,
    tls: Option<Tls>,
) -> Result<(), String> {
    let mut builder = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)));
    if let Some(tls) = tls {
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(tls.cert, tls.key)))
            .map_err(|e| format!("bad TLS certificate or key: {e}"))?;
    }
    builder
        .add_service(DecklogV2(decklog.clone()))
        .add_service(DecklogV1(decklog))
        .serve_with_incoming(TcpIncoming::from(listener))
        .await
        .map_err(|e| format!("Decklog stopped: {e}"))
}
