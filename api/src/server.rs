//! The HTTP API: health, metrics and tenant-scoped SQL.
//!
//! | route | what |
//! |---|---|
//! | `GET /healthz` | 200 while the process serves |
//! | `GET /readyz` | 200 once the first epoch is published, 503 before |
//! | `GET /metrics` | Prometheus text ([`crate::metrics::render`]) |
//! | `POST /v1/sql` | `{"sql": "…"}` → rows as JSON (default), CSV (`Accept: text/csv`) or Arrow IPC (`Accept: application/vnd.apache.arrow.stream`) |
//!
//! Every `/v1` request needs `Authorization: Bearer <token>` ([`crate::auth`]); the caller's
//! token decides whose rows it sees. Errors are one JSON shape, `{"error": {"code", "message"}}`,
//! with the status that fits ([`ApiError`]).

use keel_operators::time::now_ms;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use keel_sinks::hub::Hub;
use keel_sinks::live::LiveTables;

use crate::auth::{Auth, AuthError, Principal};
use crate::format::{Format, render};
use crate::metrics::{EngineStats, Metrics, render as render_metrics};
use crate::sql::SqlError;

/// Largest request body accepted, bytes.
pub const MAX_BODY: usize = 1 << 20;

/// What the handlers share.
#[derive(Clone, Debug)]
pub struct ApiState {
    /// The live tables.
    pub tables: Arc<RwLock<LiveTables>>,
    /// Who may call.
    pub auth: Arc<Auth>,
    /// Engine counters.
    pub stats: Arc<EngineStats>,
    /// Request metrics.
    pub metrics: Arc<Metrics>,
    /// Where live subscriptions come from.
    pub hub: Hub,
    /// Bounds on what clients may hold.
    pub limits: Limits,
    /// Foghorn's fleet snapshots (node scores for the dashboard and GraphQL).
    pub fleet: Arc<keel_dataflows::foghorn::FleetCell>,
    /// Foghorn's routing counters.
    pub foghorn: Arc<crate::foghorn::FoghornStats>,
    /// Metrics of services beside the API (the edge).
    pub extra_metrics: Arc<crate::metrics::ExtraMetrics>,
}

/// Bounds on what clients may hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Live connections (WebSocket feeds and subscriptions) one tenant may hold at once.
    pub connections_per_tenant: usize,
    /// Updates queued per subscription before it counts as lagging.
    pub queue: usize,
    /// A cap on the kernel send buffer of each connection to the HTTP API port, in bytes; `None`
    /// leaves it to the kernel's autotuning (up to several MiB per connection). With a cap, a client that stops
    /// reading holds at most this much in the kernel besides its bounded queue.
    pub send_buffer: Option<usize>,
    /// What one SQL query may take (HTTP and the PostgreSQL protocol).
    pub query: crate::sql::Limits,
    /// How long a request's whole body may take to arrive once its header has (408 past it).
    pub body_wait: std::time::Duration,
    /// How long one write to a live connection (`/ws`, GraphQL's WebSocket) may wait before the
    /// client counts as gone and the connection is closed (10 s; longer for a large message,
    /// [`Limits::write_wait_for`]).
    pub write_wait: std::time::Duration,
}

impl Limits {
    /// How long a write of `message` may wait: [`Limits::write_wait`], plus a
    /// second per 64 KiB, so that a client reading a large snapshot at a modest rate is not
    /// taken for one that stopped.
    pub fn write_wait_for(&self, message: &axum::extract::ws::Message) -> std::time::Duration {
        use axum::extract::ws::Message;
        let bytes = match message {
            Message::Text(text) => text.as_str().len(),
            Message::Binary(bytes) | Message::Ping(bytes) | Message::Pong(bytes) => bytes.len(),
            Message::Close(_) => 0,
        };
        self.write_wait + std::time::Duration::from_secs((bytes / (64 << 10)) as u64)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections_per_tenant: 2000,
            queue: 256,
            send_buffer: None,
            query: crate::sql::Limits::SERVED,
            body_wait: crate::listener::FIRST_REQUEST,
            write_wait: std::time::Duration::from_secs(10),
        }
    }
}

/// Every way a request can fail, mapped to a status and a JSON body in one place. Internal
/// details stay in the log; the response says what the caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No or a bad token (401).
    #[error(transparent)]
    Unauthorized(#[from] AuthError),
    /// The request itself is malformed (400).
    #[error("{0}")]
    BadRequest(String),
    /// The SQL does not parse, plan or run, or would write (400); needs more than a query may
    /// take (422); or the engine could not run it (500).
    #[error(transparent)]
    Sql(#[from] SqlError),
    /// The request's body did not arrive in time (408; the connection is closed).
    #[error("{0}")]
    Timeout(String),
    /// Nothing to answer with yet, or the engine went away (503).
    #[error("{0}")]
    Unavailable(String),
    /// No format the request's `Accept` allows (406).
    #[error("{0}")]
    NotAcceptable(String),
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Sql(SqlError::Refused(_)) => (StatusCode::BAD_REQUEST, "read_only"),
            ApiError::Sql(SqlError::Invalid(_)) => (StatusCode::BAD_REQUEST, "bad_sql"),
            ApiError::Sql(SqlError::Table(_) | SqlError::Internal(_)) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
            ApiError::Sql(SqlError::Limit(_)) => (StatusCode::UNPROCESSABLE_ENTITY, "query_limit"),
            ApiError::Timeout(_) => (StatusCode::REQUEST_TIMEOUT, "timeout"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::NotAcceptable(_) => (StatusCode::NOT_ACCEPTABLE, "not_acceptable"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %self, "internal error");
            "internal error".to_owned()
        } else {
            self.to_string()
        };
        let body = serde_json::json!({ "error": { "code": code, "message": message } });
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if status == StatusCode::REQUEST_TIMEOUT {
            // What the client still sends would be read as the next request.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// The router of the API.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/", get(crate::dashboard::page))
        .route("/dashboard.js", get(crate::dashboard::script))
        .route("/dashboard.css", get(crate::dashboard::style))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/sql", post(sql))
        .route("/ws", get(crate::signalman::upgrade))
        .route(
            "/graphql",
            post(crate::graphql::post).get(crate::graphql::subscribe),
        )
        .layer(axum::Extension(crate::graphql::schema(state.clone())))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(
            (state.limits.body_wait, MAX_BODY),
            body_in_time,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

async fn observe(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let route = request.uri().path().to_owned();
    let method = request.method().clone();
    let started = Instant::now();
    let mut response = next.run(request).await;
    if (response.status().is_client_error() || response.status().is_server_error())
        && !is_json(&response)
    {
        response = in_error_shape(response, &method, &route).await;
    }
    let route = match route.as_str() {
        "/healthz" | "/readyz" | "/metrics" | "/v1/sql" | "/ws" | "/graphql" => route,
        _ => "other".to_owned(),
    };
    state
        .metrics
        .observe(&route, response.status().as_u16(), started.elapsed());
    response
}

/// Reads a request's body whole, within `wait` and `most` bytes, before any handler sees it:
/// the listener's deadline covers request headers only, and a body promised by its
/// `Content-Length` but never sent held its connection (and its place among the open ones) for
/// good. Bodies here are small JSON documents, so holding one whole costs nothing a handler
/// would not spend anyway. A body known to be empty (a `GET`, a WebSocket upgrade) passes as is.
pub async fn body_in_time(
    State((wait, most)): State<(std::time::Duration, usize)>,
    request: Request,
    next: Next,
) -> Response {
    use axum::body::HttpBody;
    if request.body().size_hint().exact() == Some(0) {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let read = tokio::time::timeout(wait, axum::body::to_bytes(body, most)).await;
    let bytes = match read {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(error)) => {
            let too_large = std::error::Error::source(&error)
                .is_some_and(|e| e.is::<http_body_util::LengthLimitError>());
            return if too_large {
                let body = serde_json::json!({ "error": {
                    "code": "too_large",
                    "message": format!("the request body is larger than {} MiB", most >> 20),
                } });
                (StatusCode::PAYLOAD_TOO_LARGE, axum::Json(body)).into_response()
            } else {
                ApiError::BadRequest(format!("the request body could not be read: {error}"))
                    .into_response()
            };
        }
        Err(_) => {
            return ApiError::Timeout(format!(
                "the request body did not arrive within {} s",
                wait.as_secs_f64()
            ))
            .into_response();
        }
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

fn is_json(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"application/json"))
}

/// A refusal made before any handler of the API ran (an unknown route, a method a route does
/// not serve, a body too large or unreadable, a WebSocket route asked without an upgrade),
/// which axum answers with plain text or nothing, in the API's one error shape instead; its
/// status and headers (such as `Allow`) stay.
async fn in_error_shape(response: Response, method: &axum::http::Method, path: &str) -> Response {
    let (mut parts, body) = response.into_parts();
    let said = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let said = String::from_utf8_lossy(&said).trim().to_owned();
    let (code, message) = match parts.status {
        StatusCode::NOT_FOUND => ("not_found", format!("no such route: {path}")),
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            format!("{path} does not serve {method}"),
        ),
        StatusCode::PAYLOAD_TOO_LARGE => (
            "too_large",
            format!("the request body is larger than {} MiB", MAX_BODY >> 20),
        ),
        status if status.is_server_error() => ("internal", "internal error".to_owned()),
        _ => (
            "bad_request",
            if said.is_empty() {
                parts
                    .status
                    .canonical_reason()
                    .unwrap_or("bad request")
                    .to_owned()
            } else {
                said
            },
        ),
    };
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, axum::body::Body::from(body.to_string()))
}

async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(State(state): State<ApiState>) -> Response {
    let epoch = state.tables.read().map(|t| t.epoch()).unwrap_or(None);
    match epoch {
        Some(epoch) => {
            axum::Json(serde_json::json!({ "status": "ready", "epoch": epoch })).into_response()
        }
        None => ApiError::Unavailable("no epoch published yet".to_owned()).into_response(),
    }
}

async fn metrics(State(state): State<ApiState>) -> Response {
    let text = {
        let tables = state
            .tables
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut text = render_metrics(&state.stats, &state.metrics, &tables);
        crate::foghorn::render_metrics(&state.foghorn, &state.fleet.load(), &mut text);
        state.extra_metrics.render(&mut text);
        text
    };
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// The caller of a request, from its `Authorization` header.
pub fn principal(auth: &Auth, headers: &HeaderMap) -> Result<Principal, AuthError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(AuthError::Missing)?
        .to_str()
        .map_err(|_| AuthError::Invalid)?;
    let token = crate::auth::bearer(value).ok_or(AuthError::Invalid)?;
    auth.authenticate(token, now_ms() / 1000)
}

const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

/// The format `Accept` prefers: the served type of highest weight (`q`, 1 unless given;
/// `q=0` refuses a type), the first listed among equals; media types in any case.
fn wanted_format(headers: &HeaderMap) -> Option<Format> {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let mut best: Option<(f32, Format)> = None;
    for choice in accept.split(',') {
        let mut parts = choice.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let weight = parts
            .find_map(|p| {
                let (name, value) = p.split_once('=')?;
                name.trim()
                    .eq_ignore_ascii_case("q")
                    .then(|| value.trim().parse::<f32>().unwrap_or(0.0))
            })
            .unwrap_or(1.0);
        let format = match media.as_str() {
            "application/json" | "*/*" | "application/*" | "" => Format::JsonArray,
            "text/csv" | "text/*" => Format::Csv,
            ARROW_STREAM => Format::Arrow,
            _ => continue,
        };
        if weight > 0.0 && best.is_none_or(|(b, _)| weight > b) {
            best = Some((weight, format));
        }
    }
    best.map(|(_, format)| format)
}

async fn sql(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let caller = principal(&state.auth, &headers)?;
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Query {
        sql: String,
    }
    let query: Query = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("body must be {{\"sql\": \"...\"}}: {e}")))?;
    let format = wanted_format(&headers).ok_or_else(|| {
        ApiError::NotAcceptable(format!(
            "Accept must allow application/json, text/csv or {ARROW_STREAM}"
        ))
    })?;
    let batches =
        crate::sql::query_within(&state.tables, caller.scope, &query.sql, state.limits.query)
            .await?;
    let (content_type, body) = match format {
        Format::Csv => ("text/csv", render(&batches, Format::Csv)),
        Format::Arrow => (ARROW_STREAM, render(&batches, Format::Arrow)),
        _ => ("application/json", render(&batches, Format::JsonArray)),
    };
    let body = body.map_err(|e| ApiError::Sql(SqlError::Invalid(e.to_string())))?;
    Ok(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A large message may wait a second longer per 64 KiB than the limit's base.
    #[test]
    fn large_messages_may_wait_longer() {
        use axum::extract::ws::Message;
        let limits = Limits::default();
        let wait = |message: &Message| limits.write_wait_for(message).as_secs();
        assert_eq!(wait(&Message::Text("x".into())), 10);
        assert_eq!(wait(&Message::Text("x".repeat(200 << 10).into())), 13);
        assert_eq!(wait(&Message::Close(None)), 10);
    }

    /// `Accept` is read by weight and in any case.
    #[test]
    fn accept_weights_and_case_choose_the_format() {
        let wanted = |accept: Option<&str>| {
            let mut headers = HeaderMap::new();
            if let Some(accept) = accept {
                headers.insert(header::ACCEPT, HeaderValue::from_str(accept).unwrap());
            }
            wanted_format(&headers)
        };
        let is = |accept, format: Option<Format>| assert_eq!(wanted(accept), format, "{accept:?}");
        is(None, Some(Format::JsonArray));
        is(Some("*/*"), Some(Format::JsonArray));
        is(Some("application/json;q=0, text/csv"), Some(Format::Csv));
        is(Some("TEXT/CSV"), Some(Format::Csv));
        is(
            Some("text/csv;q=0.5, application/json"),
            Some(Format::JsonArray),
        );
        is(
            Some("text/csv; Q=0.2, application/vnd.apache.arrow.stream;q=0.9"),
            Some(Format::Arrow),
        );
        is(Some("text/csv, application/json"), Some(Format::Csv));
        is(Some("application/xml"), None);
        is(Some("text/csv;q=0"), None);
    }

    /// What the README promises for `/v1/sql`: the caller's faults are 4xx, the engine's 500.
    #[test]
    fn sql_errors_get_the_documented_status() {
        let x = || "x".to_owned();
        for (error, expected) in [
            (SqlError::Invalid(x()), (StatusCode::BAD_REQUEST, "bad_sql")),
            (
                SqlError::Refused(x()),
                (StatusCode::BAD_REQUEST, "read_only"),
            ),
            (
                SqlError::Limit(x()),
                (StatusCode::UNPROCESSABLE_ENTITY, "query_limit"),
            ),
            (
                SqlError::Internal(x()),
                (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            ),
        ] {
            let shown = error.to_string();
            assert_eq!(ApiError::Sql(error).status_and_code(), expected, "{shown}");
        }
    }
}
