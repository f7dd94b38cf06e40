//! Foghorn's routing service: the MistServer-compatible load balancer surface, a JSON route
//! API, and the decision events that feed the penalty back into the engine.
//!
//! Every answer comes from the engine's latest [`Fleet`] snapshot (lock-free). Each routing
//! decision (`/<stream>`, `/?source=`, `/?ingest=`, `/v1/foghorn/route`, gRPC `Route`) is
//! handed to the engine's input as a typed `load_balancing` event (with its version-2 record
//! when the engine keeps raw records), where it becomes a pending viewer on the chosen node and a
//! row of `routing_hourly` — except a `HEAD` probe, a stream name no event carried, and a
//! failure whose `X-Tenant-ID` is no node's tenant, which are answered and not recorded.
//!
//! | request | answer |
//! |---|---|
//! | `GET /<stream>` | best host (text); `?proto=P` → 307 to `P://host/<stream>`; none → `?fallback=` or `localhost` |
//! | `GET /?source=<stream>` | `dtsc://host:4200`; `redirect=1` → 302 (to a `dtsc://` fallback only); none → `?fallback=` or `dtsc://localhost:4200` |
//! | `GET /?ingest=<cpu%>` | host, or `FULL` |
//! | `GET /?lstserver=1` | `{"host": "Monitored (online)" \| "Monitored (draining)" \| "Monitored (maintenance)" \| "Offline"}` |
//! | `GET /?host=<h>` | per host: cpu, ram, up, up_add, down, streams, viewers, bwlimit, geo, tags, score |
//! | `GET /?weights=` / `?weights={...}` | the weights / set some of them (an admin token of the API's) |
//! | `GET /?streamstats=<s>` | `{"s": [viewers, bandwidth, bytes_up, bytes_down]}` |
//! | `GET /?viewers=<s>` | viewers of the stream over all nodes |
//! | `GET /v1/foghorn/route?stream=&lat=&lon=&n=` | ranked candidates with the score breakdown (JSON) |
//!
//! Client location: headers `X-Latitude`/`X-Longitude`, then `CF-IPLatitude`/`CF-IPLongitude`,
//! then `lat`/`lon` parameters. Tag adjustments: header `X-Tag-Adjust` or `tag_adjust`.
//!
//! The Foghorn port is served by [`crate::foghorn_http`], which answers `GET /<stream>` through
//! [`view_answer`] itself and hands every other request to [`router`].

use keel_operators::time::now_ms;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use keel_dataflows::foghorn::score::{is_unknown, known, parse_tag_adjust};
use keel_dataflows::foghorn::{
    Fleet, FleetCell, NoNode, NodeLoad, Place, Policy, Purpose, Request, Routed, Weights,
};
use keel_operators::sym::Sym;
use keel_operators::time::format_rfc3339;
use keel_sources::codec::internal_name;
use keel_sources::event::{Event, EventKind, NodeMode, RoutingDecision, StreamRef};
use keel_sources::memory::{Injector, OwnedRecord};

use crate::foghorn_limit::ClientLimit;
use serde_json::{Value, json};
use uuid::Uuid;

/// Largest weight accepted (keeps every sum far from overflow).
pub const MAX_WEIGHT: u64 = 1_000_000;
/// Most candidates one JSON or gRPC request may ask for.
pub const MAX_CANDIDATES: usize = 64;
/// Mist's DTSC port, used in source answers.
pub const DTSC_PORT: u16 = 4200;

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct FoghornStats {
    /// Requests that chose a node.
    pub routed: AtomicU64,
    /// Requests that found none.
    pub unrouted: AtomicU64,
    /// Decisions where the opt-in cutoff excluded everyone and the gradient decided.
    pub cutoff_fallbacks: AtomicU64,
    /// Decision events written into the engine's input.
    pub events: AtomicU64,
    /// Decision events not written: a probe, a stream no event named, no tenant to attribute
    /// a failure to, or a full queue.
    pub events_skipped: AtomicU64,
    /// Decision events not written because their client was past its rate
    /// ([`crate::foghorn_limit`]).
    pub events_limited: AtomicU64,
}

/// Who asked, for the decision event.
#[derive(Clone, Debug, Default)]
pub struct Asker {
    /// Country code from `CF-IPCountry` or `X-Country-Code`.
    pub country: Option<String>,
    /// Tenant from `X-Tenant-ID` (used for failed decisions, which have no node to take it from).
    pub tenant: Option<Uuid>,
    /// `http` or `grpc`.
    pub source: &'static str,
    /// What the answer pointed the client at.
    pub details: String,
    /// A `HEAD` request: a probe, answered as a `GET` but no viewer is coming, so no decision
    /// is recorded (each one is a pending viewer on its node for 30 s).
    pub probe: bool,
    /// The address the request came from (HTTP), whose recorded decisions a
    /// [`ClientLimit`] bounds; `None` for callers that speak for many viewers (gRPC).
    pub client: Option<std::net::IpAddr>,
}

/// The routing service shared by the HTTP and gRPC fronts.
#[derive(Debug)]
pub struct Foghorn {
    fleet: Arc<FleetCell>,
    injector: Injector,
    geoip: Option<GeoIp>,
    /// Who may change the weights at run time (an admin token of the API's); `None`: nobody.
    admins: Option<crate::auth::Auth>,
    /// How many decisions per second one client may have recorded; `None`: any number.
    limit: Option<ClientLimit>,
    /// Counters.
    pub stats: Arc<FoghornStats>,
}

/// A GeoIP database (MaxMind DB format: GeoLite2/GeoIP2 City, DB-IP City Lite), read into
/// memory, for clients whose requests carry no coordinates.
pub struct GeoIp {
    reader: maxminddb::Reader<Vec<u8>>,
}

impl std::fmt::Debug for GeoIp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeoIp")
            .field("database_type", &self.reader.metadata.database_type)
            .finish()
    }
}

#[derive(serde::Deserialize)]
struct CityRecord {
    location: Option<CityLocation>,
}

#[derive(serde::Deserialize)]
struct CityLocation {
    latitude: Option<f64>,
    longitude: Option<f64>,
}

impl GeoIp {
    /// Opens `path`, saying clearly what is wrong when it cannot.
    pub fn open(path: &std::path::Path) -> Result<GeoIp, String> {
        let reader = maxminddb::Reader::open_readfile(path)
            .map_err(|e| format!("cannot use {} as a GeoIP database: {e}", path.display()))?;
        Ok(GeoIp { reader })
    }

    /// The place the database gives for `ip`, if any.
    pub fn place(&self, ip: std::net::IpAddr) -> Option<Place> {
        let found = self.reader.lookup(ip).ok()?;
        let record: CityRecord = found.decode().ok()??;
        let location = record.location?;
        Place::new(location.latitude?, location.longitude?).ok()
    }
}

/// A fresh event id without a system call per decision: random bits drawn once, and a counter
/// in the low 62 bits (which the version-4 layout leaves alone), so ids never repeat.
fn decision_id() -> Uuid {
    static START: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let start = *START.get_or_init(|| Uuid::new_v4().as_u128());
    const LOW: u128 = (1 << 62) - 1;
    let n = u128::from(NEXT.fetch_add(1, Ordering::Relaxed));
    let raw = (start & !LOW) | (start.wrapping_add(n) & LOW);
    uuid::Builder::from_random_bytes(raw.to_be_bytes()).into_uuid()
}

/// Coordinates rounded to 0.1° (about 11 km) before they leave the balancer in an event.
fn coarse(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

impl Foghorn {
    /// A service reading `fleet`, writing decisions into `injector` and counting in `stats`.
    pub fn new(fleet: Arc<FleetCell>, injector: Injector, stats: Arc<FoghornStats>) -> Foghorn {
        Foghorn {
            fleet,
            injector,
            geoip: None,
            admins: None,
            limit: None,
            stats,
        }
    }

    /// Records at most `limit`'s rate of decisions per client address (the rest are answered
    /// but not recorded).
    pub fn with_client_limit(mut self, limit: ClientLimit) -> Foghorn {
        self.limit = Some(limit);
        self
    }

    /// Lets holders of an admin token of `auth` change the weights (`/?weights={…}` with
    /// `Authorization: Bearer …`); without it the weights change only in the settings file.
    pub fn with_admins(mut self, auth: crate::auth::Auth) -> Foghorn {
        self.admins = Some(auth);
        self
    }

    /// Places clients without coordinates by their address in `geoip`.
    pub fn with_geoip(mut self, geoip: GeoIp) -> Foghorn {
        self.geoip = Some(geoip);
        self
    }

    /// Where a client is by its address, when a GeoIP database is configured.
    pub fn place_of(&self, ip: std::net::IpAddr) -> Option<Place> {
        self.geoip.as_ref()?.place(ip)
    }

    /// The current snapshot.
    pub fn fleet(&self) -> Arc<Fleet> {
        self.fleet.snapshot()
    }

    /// Changes weights or cutoff (rescoring at once).
    pub fn set_policy(&self, policy: Policy) {
        self.fleet.set_policy(policy);
    }

    /// Routes `request` and records the decision; `details` says what the answer pointed the
    /// client at (it goes into the event).
    pub fn decide(
        &self,
        request: &Request,
        n: usize,
        asker: &Asker,
        details: impl FnOnce(&Result<Routed, NoNode>) -> String,
    ) -> Result<Routed, NoNode> {
        let fleet = self.fleet.load();
        let result = fleet.route(request, n);
        let asker = Asker {
            details: details(&result),
            ..asker.clone()
        };
        match &result {
            Ok(routed) => {
                self.stats.routed.fetch_add(1, Ordering::Relaxed);
                if routed.cutoff_fallback {
                    self.stats.cutoff_fallbacks.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(_) => {
                self.stats.unrouted.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.record(&fleet, request, &result, &asker);
        result
    }

    /// Hands the decision to the engine as a typed `load_balancing` event, with its version-2
    /// record when the engine keeps raw records. Decoding that record gives the same event.
    fn record(
        &self,
        fleet: &Fleet,
        request: &Request,
        result: &Result<Routed, NoNode>,
        asker: &Asker,
    ) {
        // No decision to record for a probe, or for a stream no event ever named (nothing
        // serves it; a client asking for random names moved every node's pending load).
        if asker.probe || request.stream.is_some_and(is_unknown) {
            self.stats.events_skipped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let chosen = result.as_ref().ok().and_then(|r| r.candidates.first());
        // A failed decision is the asker's tenant's, as its `X-Tenant-ID` says — taken only
        // when some node of the fleet is that tenant's: the header is anyone's to send, and
        // each new id made `routing_hourly` rows without bound.
        let asked = asker
            .tenant
            .filter(|t| fleet.nodes().iter().any(|n| n.tenant == *t));
        let tenant = chosen.map(|c| c.node.tenant).or(asked);
        let Some(tenant) = tenant.filter(|t| !t.is_nil()) else {
            self.stats.events_skipped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        // Only a decision that would be recorded takes from its client's bucket.
        if let (Some(limit), Some(client)) = (&self.limit, asker.client)
            && !limit.admit(client, std::time::Instant::now())
        {
            self.stats.events_limited.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let time = if fleet.watermark() > 0 {
            fleet.watermark()
        } else {
            now_ms()
        };
        // A name no event carries is left out: decisions are events, and their stream
        // names are interned when decoded.
        let stream = request.stream.filter(|s| !is_unknown(*s)).and_then(|s| {
            match internal_name(s.as_str()) {
                "" => None,
                name if name.len() == s.as_str().len() => Some(s),
                name => Some(Sym::new(name)),
            }
        });
        let country = asker
            .country
            .as_deref()
            .filter(|c| !c.is_empty() && *c != "<nil>");
        let client = request.client.map(|c| Place {
            latitude: coarse(c.latitude),
            longitude: coarse(c.longitude),
        });
        let chosen_place = chosen.and_then(|c| c.node.place());
        let node_place = chosen_place.map(|p| Place {
            latitude: coarse(p.latitude),
            longitude: coarse(p.longitude),
        });
        let distance_km = request
            .client
            .zip(chosen_place)
            .map(|(a, b)| a.distance_km(b))
            .filter(|d| *d >= 0.0);
        let event = Event {
            id: decision_id(),
            tenant,
            time,
            kind: EventKind::Routing(RoutingDecision {
                stream: stream.map(|internal_name| StreamRef {
                    internal_name,
                    stream_id: None,
                }),
                selected_node: chosen.map_or_else(Sym::default, |c| selected_node(&c.node)),
                status: if chosen.is_some() {
                    success()
                } else {
                    failed()
                },
                score: chosen.map(|c| c.score.total),
                client_latitude: client.map(|c| c.latitude),
                client_longitude: client.map(|c| c.longitude),
                node_latitude: node_place.map(|p| p.latitude),
                node_longitude: node_place.map(|p| p.longitude),
                distance_km,
                client_country: country.map_or_else(Sym::default, Sym::new),
            }),
        };
        let wire = || {
            let payload = DecisionPayload {
                status: if chosen.is_some() {
                    "success"
                } else {
                    "failed"
                },
                event_type: "load_balancing",
                source: asker.source,
                details: match result {
                    Ok(_) => &asker.details,
                    Err(reason) => reason.message(),
                },
                internal_name: stream.map(|s| s.as_str()),
                latitude: client.map(|c| c.latitude),
                longitude: client.map(|c| c.longitude),
                client_country: country,
                candidates_count: result.as_ref().ok().map(|r| r.candidates.len() as u64),
                selected_node: chosen.map(|c| c.node.host_name()),
                selected_node_id: chosen.map(|c| c.node.node.as_str()),
                score: chosen.map(|c| c.score.total.to_string()),
                node_latitude: node_place.map(|p| p.latitude),
                node_longitude: node_place.map(|p| p.longitude),
                routing_distance_km: distance_km,
            };
            let tenant = event.tenant.to_string();
            let record = DecisionRecord {
                event_id: event.id.to_string(),
                event_type: "load_balancing",
                timestamp: format_rfc3339(time),
                source: "foghorn",
                tenant_id: &tenant,
                schema_version: 2,
                data: DecisionData {
                    trigger_type: "LOAD_BALANCING",
                    node_id: chosen.map_or("", |c| c.node.node.as_str()),
                    timestamp: time.to_string(),
                    tenant_id: &tenant,
                    load_balancing_data: payload,
                },
            };
            OwnedRecord {
                value: serde_json::to_vec(&record).expect("a decision serialises"),
                headers: vec![
                    ("event_type".into(), "load_balancing".into()),
                    ("source".into(), "foghorn".into()),
                ],
            }
        };
        let record = self.injector.keeps_records().then(wire);
        if self.injector.push_event(event, record) {
            self.stats.events.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.events_skipped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The chosen node as a decoded decision names it: its id, else its host name.
fn selected_node(node: &NodeLoad) -> Sym {
    let id = node.node.as_str();
    if !id.is_empty() && id != "<nil>" {
        return node.node;
    }
    match node.host_name() {
        "" | "<nil>" => Sym::default(),
        host => Sym::new(host),
    }
}

fn success() -> Sym {
    static SUCCESS: std::sync::OnceLock<Sym> = std::sync::OnceLock::new();
    *SUCCESS.get_or_init(|| Sym::new("success"))
}

fn failed() -> Sym {
    static FAILED: std::sync::OnceLock<Sym> = std::sync::OnceLock::new();
    *FAILED.get_or_init(|| Sym::new("failed"))
}

/// A decision as a version-2 record (field names as the platform's `load_balancing_data`).
#[derive(serde::Serialize)]
struct DecisionRecord<'a> {
    event_id: String,
    event_type: &'static str,
    timestamp: String,
    source: &'static str,
    tenant_id: &'a str,
    schema_version: u8,
    data: DecisionData<'a>,
}

#[derive(serde::Serialize)]
struct DecisionData<'a> {
    trigger_type: &'static str,
    node_id: &'a str,
    timestamp: String,
    tenant_id: &'a str,
    load_balancing_data: DecisionPayload<'a>,
}

#[derive(serde::Serialize)]
struct DecisionPayload<'a> {
    status: &'static str,
    event_type: &'static str,
    source: &'static str,
    details: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    internal_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    latitude: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    longitude: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_country: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    candidates_count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    selected_node: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    selected_node_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    score: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_latitude: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_longitude: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    routing_distance_km: Option<f64>,
}

/// A 400 with a reason, as plain text.
fn bad_request(reason: impl Into<String>) -> Response {
    refused(StatusCode::BAD_REQUEST, reason)
}

fn refused(status: StatusCode, reason: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        reason.into(),
    )
        .into_response()
}

fn text(body: impl Into<String>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.into(),
    )
        .into_response()
}

fn redirect(status: StatusCode, location: &str) -> Response {
    match HeaderValue::from_str(location) {
        Ok(value) => (status, [(header::LOCATION, value)], location.to_owned()).into_response(),
        Err(_) => bad_request("the redirect target is not a valid header value"),
    }
}

/// Request headers as the routing handlers read them: by lower-case name, the first value if
/// it is text, trimmed; an empty value counts as absent.
pub trait Headers {
    /// The value of header `name` (lower case).
    fn text(&self, name: &str) -> Option<&str>;
}

impl Headers for HeaderMap {
    fn text(&self, name: &str) -> Option<&str> {
        self.get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    }
}

fn parse_coordinate(text: &str, what: &str) -> Result<f64, String> {
    text.trim()
        .parse::<f64>()
        .map_err(|_| format!("{what} {text:?} is not a number"))
}

/// The client's address: `CF-Connecting-IP`, the first `X-Forwarded-For`, `X-Real-IP`, else
/// the connection's peer. Used only to look the place up; never stored or sent on.
pub fn client_ip(
    headers: &(impl Headers + ?Sized),
    peer: Option<std::net::IpAddr>,
) -> Option<std::net::IpAddr> {
    headers
        .text("cf-connecting-ip")
        .and_then(|v| v.parse().ok())
        .or_else(|| {
            headers
                .text("x-forwarded-for")
                .and_then(|v| v.split(',').next())
                .and_then(|v| v.trim().parse().ok())
        })
        .or_else(|| headers.text("x-real-ip").and_then(|v| v.parse().ok()))
        .or(peer)
}

/// The client's place from headers or parameters; a present but invalid pair is an error.
pub fn client_place(
    headers: &(impl Headers + ?Sized),
    params: &BTreeMap<String, String>,
) -> Result<Option<Place>, String> {
    let pairs = [
        (headers.text("x-latitude"), headers.text("x-longitude")),
        (
            headers.text("cf-iplatitude"),
            headers.text("cf-iplongitude"),
        ),
        (
            params.get("lat").map(String::as_str),
            params.get("lon").map(String::as_str),
        ),
    ];
    for pair in pairs {
        match pair {
            (Some(lat), Some(lon)) => {
                let place = Place::new(
                    parse_coordinate(lat, "latitude")?,
                    parse_coordinate(lon, "longitude")?,
                )?;
                return Ok(Some(place));
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err("latitude and longitude must be given together".to_owned());
            }
            (None, None) => {}
        }
    }
    Ok(None)
}

/// A stream name from a query parameter, without its `live+`/`vod+` prefix. Form decoding
/// turns an unescaped `+` into a space, so `live demo` is read as `live+demo`.
pub fn stream_name(param: &str) -> &str {
    let param = param.trim();
    for prefix in ["live ", "vod "] {
        if let Some(rest) = param.strip_prefix(prefix) {
            return rest;
        }
    }
    internal_name(param)
}

/// Builds a request from the query and headers every routing endpoint shares.
fn request_from(
    foghorn: &Foghorn,
    stream: Option<&str>,
    purpose: Purpose,
    request: &axum::extract::Request,
    params: &BTreeMap<String, String>,
) -> Result<Request, String> {
    let peer = peer_of(request);
    request_of(foghorn, stream, purpose, request.headers(), peer, params)
}

/// The connection's peer address, as axum's serving recorded it.
fn peer_of(request: &axum::extract::Request) -> Option<std::net::IpAddr> {
    request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip())
}

/// [`request_from`] for headers and a peer address read by any server.
fn request_of(
    foghorn: &Foghorn,
    stream: Option<&str>,
    purpose: Purpose,
    headers: &(impl Headers + ?Sized),
    peer: Option<std::net::IpAddr>,
    params: &BTreeMap<String, String>,
) -> Result<Request, String> {
    let client = match client_place(headers, params)? {
        Some(place) => Some(place),
        None if foghorn.geoip.is_some() => {
            client_ip(headers, peer).and_then(|ip| foghorn.place_of(ip))
        }
        None => None,
    };
    let tags = match headers.text("x-tag-adjust").or(params
        .get("tag_adjust")
        .map(String::as_str)
        .filter(|t| !t.is_empty()))
    {
        Some(text) => parse_tag_adjust(text)?,
        None => Vec::new(),
    };
    let capability = params
        .get("capability")
        .filter(|c| !c.is_empty())
        .map(|c| known(&c.to_ascii_lowercase()));
    Ok(Request {
        stream: stream.map(stream_name).filter(|s| !s.is_empty()).map(known),
        purpose,
        client,
        tags,
        capability,
    })
}

/// A client's country as its decision records it: two ASCII letters, upper-cased; anything else
/// (`--`, `XX1`, kilobytes of header) is no country. Each distinct value is interned for the
/// life of the process, so a header read as is let any client grow memory without bound.
pub fn country_code(text: &str) -> Option<String> {
    let text = text.trim();
    (text.len() == 2 && text.bytes().all(|b| b.is_ascii_alphabetic()))
        .then(|| text.to_ascii_uppercase())
}

/// The asker of an HTTP request; a `HEAD` is a probe, which makes no decision.
fn http_asker(http: &axum::extract::Request) -> Asker {
    let peer = http
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>();
    Asker {
        probe: http.method() == axum::http::Method::HEAD,
        client: peer.map(|info| info.0.ip()),
        ..asker(http.headers(), "http")
    }
}

fn asker(headers: &(impl Headers + ?Sized), source: &'static str) -> Asker {
    Asker {
        country: headers
            .text("cf-ipcountry")
            .or(headers.text("x-country-code"))
            .and_then(country_code),
        tenant: headers
            .text("x-tenant-id")
            .and_then(|t| Uuid::parse_str(t).ok()),
        source,
        details: String::new(),
        probe: false,
        client: None,
    }
}

/// The query parameters (later ones win), read without extracting a copy of the headers.
fn params_of(uri: &axum::http::Uri) -> BTreeMap<String, String> {
    params_of_query(uri.query().unwrap_or(""))
}

/// The parameters of a query string (later ones win).
pub fn params_of_query(query: &str) -> BTreeMap<String, String> {
    form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The chosen host, as event details.
pub fn host_of(result: &Result<Routed, NoNode>) -> String {
    result
        .as_ref()
        .map(|r| r.candidates[0].node.host_name().to_owned())
        .unwrap_or_default()
}

/// The Foghorn HTTP router.
pub fn router(foghorn: Arc<Foghorn>) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/v1/foghorn/route", get(route_json))
        .route("/{stream}", get(view))
        .fallback(|uri: axum::http::Uri| async move {
            refused(
                StatusCode::NOT_FOUND,
                format!(
                    "no such route: {} (GET /<stream>, /?…, /v1/foghorn/route)",
                    uri.path()
                ),
            )
        })
        .method_not_allowed_fallback(|uri: axum::http::Uri| async move {
            refused(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{} answers GET (and HEAD) only", uri.path()),
            )
        })
        .with_state(foghorn)
}

/// `GET /<stream>`: the best host for a viewer.
async fn view(
    State(foghorn): State<Arc<Foghorn>>,
    Path(stream): Path<String>,
    http: axum::extract::Request,
) -> Response {
    let params = params_of(http.uri());
    let probe = http.method() == axum::http::Method::HEAD;
    match view_answer(
        &foghorn,
        &stream,
        &params,
        http.headers(),
        peer_of(&http),
        probe,
    ) {
        ViewAnswer::Host(host) => text(host),
        ViewAnswer::Redirect(location) => redirect(StatusCode::TEMPORARY_REDIRECT, &location),
        ViewAnswer::BadRequest(reason) => bad_request(reason),
    }
}

/// What `GET /<stream>` answers.
#[derive(Clone, Debug, PartialEq)]
pub enum ViewAnswer {
    /// 200, the host as text (or the fallback when no node can serve).
    Host(String),
    /// 307 to this location (`?proto=`), a valid header value.
    Redirect(String),
    /// 400 with the reason.
    BadRequest(String),
}

/// Routes a viewer of `stream` (the path segment, decoded) and records the decision.
pub fn view_answer(
    foghorn: &Foghorn,
    stream: &str,
    params: &BTreeMap<String, String>,
    headers: &(impl Headers + ?Sized),
    peer: Option<std::net::IpAddr>,
    probe: bool,
) -> ViewAnswer {
    let request = match request_of(foghorn, Some(stream), Purpose::View, headers, peer, params) {
        Ok(request) => request,
        Err(reason) => return ViewAnswer::BadRequest(reason),
    };
    let proto = params.get("proto").filter(|p| !p.is_empty());
    if let Some(proto) = proto
        && !proto
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
    {
        return ViewAnswer::BadRequest(format!("proto {proto:?} is not a URL scheme"));
    }
    let location = |host: &str| {
        let rest: Vec<String> = params
            .iter()
            .filter(|(k, _)| {
                !matches!(
                    k.as_str(),
                    "proto" | "lat" | "lon" | "tag_adjust" | "fallback" | "capability"
                )
            })
            .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
            .collect();
        let query = if rest.is_empty() {
            String::new()
        } else {
            format!("?{}", rest.join("&"))
        };
        let proto = proto.map_or("http", String::as_str);
        format!("{proto}://{host}/{}{query}", encode(stream))
    };
    // What the answer points at is also the decision's details: made once, kept for both.
    let mut target = String::new();
    let asker = Asker {
        probe,
        client: peer,
        ..asker(headers, "http")
    };
    let routed = foghorn.decide(&request, 1, &asker, |result| {
        target = match (result, proto) {
            (Ok(r), Some(_)) => location(r.candidates[0].node.host_name()),
            (Ok(r), None) => r.candidates[0].node.host_name().to_owned(),
            (Err(_), _) => String::new(),
        };
        target.clone()
    });
    match (routed, proto) {
        (Ok(_), Some(_)) if HeaderValue::from_str(&target).is_err() => {
            ViewAnswer::BadRequest("the redirect target is not a valid header value".to_owned())
        }
        (Ok(_), Some(_)) => ViewAnswer::Redirect(target),
        (Ok(_), None) => ViewAnswer::Host(target),
        (Err(_), _) => ViewAnswer::Host(fallback(params, "localhost")),
    }
}

fn fallback(params: &BTreeMap<String, String>, default: &str) -> String {
    params
        .get("fallback")
        .filter(|f| !f.is_empty())
        .cloned()
        .unwrap_or_else(|| default.to_owned())
}

/// Percent-encodes a query component or path segment.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'+') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn root(State(foghorn): State<Arc<Foghorn>>, http: axum::extract::Request) -> Response {
    let params = params_of(http.uri());
    let headers = http.headers();
    if let Some(stream) = params.get("source") {
        return source(&foghorn, stream, &params, &http);
    }
    if let Some(cpu) = params.get("ingest") {
        return ingest(&foghorn, cpu, &params, &http);
    }
    if params.contains_key("lstserver") {
        let fleet = foghorn.fleet();
        let list: serde_json::Map<String, Value> = fleet
            .nodes()
            .iter()
            .map(|n| {
                let online = !n.is_stale(fleet.watermark()) && n.healthy;
                // A node in maintenance or draining takes no new viewers: not "online".
                let state = match (online, n.mode) {
                    (false, _) => "Offline",
                    (true, NodeMode::Normal) => "Monitored (online)",
                    (true, NodeMode::Draining) => "Monitored (draining)",
                    (true, NodeMode::Maintenance) => "Monitored (maintenance)",
                };
                (n.host_name().to_owned(), state.into())
            })
            .collect();
        return axum::Json(Value::Object(list)).into_response();
    }
    if let Some(host) = params.get("host") {
        return hosts(&foghorn, host);
    }
    if let Some(weights) = params.get("weights") {
        return set_weights(&foghorn, weights, headers);
    }
    if let Some(stream) = params.get("streamstats") {
        let name = known(stream_name(stream));
        let mut totals = [0u64; 4];
        for node in foghorn.fleet().nodes() {
            if let Some(s) = node.stream(name) {
                // Node-reported figures: summed without wrapping, whatever a node sends.
                totals[0] = totals[0].saturating_add(s.viewers);
                totals[1] = totals[1].saturating_add(s.bandwidth.saturating_mul(s.viewers));
                totals[2] = totals[2].saturating_add(s.bytes_up);
                totals[3] = totals[3].saturating_add(s.bytes_down);
            }
        }
        return axum::Json(json!({ stream.as_str(): totals })).into_response();
    }
    if let Some(stream) = params.get("viewers") {
        let name = known(stream_name(stream));
        let total: u64 = foghorn
            .fleet()
            .nodes()
            .iter()
            .filter_map(|n| n.stream(name))
            .fold(0u64, |sum, s| sum.saturating_add(s.viewers));
        return text(total.to_string());
    }
    if params.contains_key("addserver") || params.contains_key("delserver") {
        return bad_request(
            "servers are not added by hand here: a node joins by sending node_lifecycle_update \
             events and leaves by going stale (90 s without one)",
        );
    }
    // Plain `GET /`: the best host for a viewer of no particular stream.
    let request = match request_from(&foghorn, None, Purpose::View, &http, &params) {
        Ok(request) => request,
        Err(reason) => return bad_request(reason),
    };
    match foghorn.decide(&request, 1, &http_asker(&http), host_of) {
        Ok(routed) => text(routed.candidates[0].node.host_name()),
        Err(_) => text(fallback(&params, "localhost")),
    }
}

fn source(
    foghorn: &Foghorn,
    stream: &str,
    params: &BTreeMap<String, String>,
    http: &axum::extract::Request,
) -> Response {
    if stream_name(stream).is_empty() {
        return bad_request("source needs a stream name");
    }
    let request = match request_from(foghorn, Some(stream), Purpose::Source, http, params) {
        Ok(request) => request,
        Err(reason) => return bad_request(reason),
    };
    let dtsc = |r: &Routed| format!("dtsc://{}:{DTSC_PORT}", r.candidates[0].node.host_name());
    let target = match foghorn.decide(&request, 1, &http_asker(http), |result| {
        result.as_ref().map(dtsc).unwrap_or_default()
    }) {
        Ok(routed) => dtsc(&routed),
        Err(_) => fallback(params, &format!("dtsc://localhost:{DTSC_PORT}")),
    };
    if params.get("redirect").is_some_and(|r| r == "1") {
        // Not an open redirect: only to a media server's DTSC address.
        if !target.starts_with("dtsc://") {
            return bad_request("a fallback redirected to must be a dtsc:// address");
        }
        return redirect(StatusCode::FOUND, &target);
    }
    text(target)
}

fn ingest(
    foghorn: &Foghorn,
    cpu: &str,
    params: &BTreeMap<String, String>,
    http: &axum::extract::Request,
) -> Response {
    let cpu = if cpu.trim().is_empty() {
        0.0
    } else {
        match cpu.trim().parse::<f64>() {
            Ok(c) if c.is_finite() && (0.0..=100.0).contains(&c) => c,
            _ => {
                return bad_request(format!(
                    "ingest={cpu:?}: expected the CPU percentage the new ingest will use (0-100)"
                ));
            }
        }
    };
    let request = match request_from(foghorn, None, Purpose::Ingest(cpu), http, params) {
        Ok(request) => request,
        Err(reason) => return bad_request(reason),
    };
    match foghorn.decide(&request, 1, &http_asker(http), host_of) {
        Ok(routed) => text(routed.candidates[0].node.host_name()),
        Err(_) => text("FULL"),
    }
}

/// One host as `/?host=` shows it.
pub fn host_json(node: &NodeLoad, weights: &Weights) -> Value {
    let (cpu, ram, bw) = keel_dataflows::foghorn::score::terms(node, weights);
    let ram_percent = if node.ram_max > 0 {
        node.ram_current as f64 * 100.0 / node.ram_max as f64
    } else {
        0.0
    };
    let mut host = json!({
        "cpu": f64::from(node.cpu_tenths) / 10.0,
        "ram": (ram_percent * 10.0).round() / 10.0,
        "up": node.up_speed,
        "up_add": node.add_bandwidth,
        "down": node.down_speed,
        "streams": node.streams.len(),
        "viewers": node.viewers(),
        "bwlimit": node.bw_limit(),
        "score": { "cpu": cpu, "ram": ram, "bw": bw },
    });
    if let Some(place) = node.place() {
        host["geo"] = json!({ "lat": place.latitude, "lon": place.longitude });
    }
    if !node.capabilities.is_empty() {
        host["tags"] = node
            .capabilities
            .iter()
            .map(|c| Value::from(c.as_str()))
            .collect();
    }
    host
}

fn hosts(foghorn: &Foghorn, host: &str) -> Response {
    let fleet = foghorn.fleet();
    let weights = fleet.policy().weights;
    if host.is_empty() {
        let all: serde_json::Map<String, Value> = fleet
            .nodes()
            .iter()
            .map(|n| (n.host_name().to_owned(), host_json(n, &weights)))
            .collect();
        return axum::Json(Value::Object(all)).into_response();
    }
    match fleet.by_host(host) {
        Some(node) => {
            axum::Json(json!({ node.host_name(): host_json(node, &weights) })).into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({ "error": format!("unknown host {host:?}") })),
        )
            .into_response(),
    }
}

/// Merges a partial weights object into `current`, checking every value.
pub fn merge_weights(current: Weights, text: &str) -> Result<Weights, String> {
    let map: serde_json::Map<String, Value> = serde_json::from_str(text)
        .map_err(|e| format!("weights must be a JSON object such as {{\"cpu\":500}}: {e}"))?;
    let mut weights = current;
    for (key, value) in map {
        let number = value.as_u64().filter(|v| *v <= MAX_WEIGHT).ok_or_else(|| {
            format!("weight {key:?}: {value} is not a whole number from 0 to {MAX_WEIGHT}")
        })?;
        let slot = match key.as_str() {
            "cpu" => &mut weights.cpu,
            "ram" => &mut weights.ram,
            "bw" => &mut weights.bw,
            "geo" => &mut weights.geo,
            "bonus" => &mut weights.bonus,
            other => {
                return Err(format!(
                    "unknown weight {other:?} (cpu, ram, bw, geo, bonus)"
                ));
            }
        };
        *slot = number;
    }
    Ok(weights)
}

/// Reads the weights, or changes some of them for a caller holding an admin token: the port is
/// the one viewers and edges reach, and anyone could re-rank the whole fleet with one `GET`.
fn set_weights(foghorn: &Foghorn, text: &str, headers: &HeaderMap) -> Response {
    let mut policy = *foghorn.fleet().policy();
    if !text.trim().is_empty() {
        let Some(admins) = &foghorn.admins else {
            return refused(
                StatusCode::FORBIDDEN,
                "the weights are not changed here: set them in the settings file ([foghorn])",
            );
        };
        let who = match crate::server::principal(admins, headers) {
            Ok(p) if p.scope == crate::auth::Scope::All => p.subject,
            Ok(_) => {
                return refused(
                    StatusCode::FORBIDDEN,
                    "changing the weights needs an admin token; this one is a tenant's",
                );
            }
            Err(_) => {
                return refused(
                    StatusCode::UNAUTHORIZED,
                    "changing the weights needs an admin token (Authorization: Bearer …)",
                );
            }
        };
        match merge_weights(policy.weights, text) {
            Ok(weights) => {
                policy.weights = weights;
                foghorn.set_policy(policy);
                tracing::info!(by = who, weights = text, "Foghorn's weights changed");
            }
            Err(reason) => return bad_request(reason),
        }
    }
    axum::Json(policy.weights).into_response()
}

/// One candidate as the JSON and gRPC APIs show it.
pub fn candidate_json(c: &keel_dataflows::foghorn::Candidate, client: Option<Place>) -> Value {
    let distance = client.zip(c.node.place()).map(|(a, b)| a.distance_km(b));
    json!({
        "node_id": c.node.node.as_str(),
        "host": c.node.host_name(),
        "base_url": c.node.host.as_str(),
        "score": c.score.total,
        "breakdown": c.score,
        "distance_km": distance,
        "pending_viewers": c.node.pending_viewers,
        "add_bandwidth": c.node.add_bandwidth,
    })
}

async fn route_json(State(foghorn): State<Arc<Foghorn>>, http: axum::extract::Request) -> Response {
    let params = params_of(http.uri());
    let fail = |reason: String| {
        (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({ "error": reason })),
        )
            .into_response()
    };
    let n = match params.get("n").map(|n| n.trim().parse::<usize>()) {
        None => 1,
        Some(Ok(n)) if (1..=MAX_CANDIDATES).contains(&n) => n,
        Some(_) => {
            return fail(format!(
                "n must be a whole number from 1 to {MAX_CANDIDATES}"
            ));
        }
    };
    let purpose = match params.get("purpose").map(String::as_str) {
        None | Some("" | "view") => Purpose::View,
        Some("source") => Purpose::Source,
        Some("ingest") => match params.get("cpu").map(|c| c.trim().parse::<f64>()) {
            None => Purpose::Ingest(0.0),
            Some(Ok(c)) if c.is_finite() && (0.0..=100.0).contains(&c) => Purpose::Ingest(c),
            Some(_) => return fail("cpu must be a percentage from 0 to 100".to_owned()),
        },
        Some(other) => {
            return fail(format!("purpose {other:?} is not view, source or ingest"));
        }
    };
    let stream = params.get("stream").map(String::as_str);
    if purpose == Purpose::Source && stream.is_none_or(|s| stream_name(s).is_empty()) {
        return fail("purpose=source needs a stream".to_owned());
    }
    let request = match request_from(&foghorn, stream, purpose, &http, &params) {
        Ok(request) => request,
        Err(reason) => return fail(reason),
    };
    let fleet_nodes = foghorn.fleet.load().nodes().len();
    match foghorn.decide(&request, n, &http_asker(&http), host_of) {
        Ok(routed) => axum::Json(json!({
            "stream": request.stream.map(|s| s.as_str()),
            "client": request.client.map(|c| json!({"lat": c.latitude, "lon": c.longitude})),
            "candidates": routed
                .candidates
                .iter()
                .map(|c| candidate_json(c, request.client))
                .collect::<Vec<_>>(),
            "cutoff_fallback": routed.cutoff_fallback,
            "nodes": fleet_nodes,
        }))
        .into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(
                json!({ "error": reason.message(), "reason": reason, "nodes": fleet_nodes }),
            ),
        )
            .into_response(),
    }
}

/// Appends Foghorn's counters and fleet gauges in Prometheus text.
pub fn render_metrics(stats: &FoghornStats, fleet: &Fleet, out: &mut String) {
    use std::fmt::Write as _;
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let _ = writeln!(
        out,
        "# HELP keel_foghorn_decisions_total Routing requests, by whether a node was chosen.\n# TYPE keel_foghorn_decisions_total counter\nkeel_foghorn_decisions_total{{result=\"routed\"}} {}\nkeel_foghorn_decisions_total{{result=\"unrouted\"}} {}",
        load(&stats.routed),
        load(&stats.unrouted)
    );
    let _ = writeln!(
        out,
        "# HELP keel_foghorn_cutoff_fallbacks_total Decisions where the opt-in cutoff excluded every node.\n# TYPE keel_foghorn_cutoff_fallbacks_total counter\nkeel_foghorn_cutoff_fallbacks_total {}",
        load(&stats.cutoff_fallbacks)
    );
    let _ = writeln!(
        out,
        "# HELP keel_foghorn_events_total Decision events written into the engine's input.\n# TYPE keel_foghorn_events_total counter\nkeel_foghorn_events_total {}\n# HELP keel_foghorn_events_skipped_total Decision events not written (a HEAD probe, a stream no event named, no tenant for a failure, or a full queue).\n# TYPE keel_foghorn_events_skipped_total counter\nkeel_foghorn_events_skipped_total {}\n# HELP keel_foghorn_events_limited_total Decision events not written because their client asked faster than its rate (the requests were answered).\n# TYPE keel_foghorn_events_limited_total counter\nkeel_foghorn_events_limited_total {}",
        load(&stats.events),
        load(&stats.events_skipped),
        load(&stats.events_limited)
    );
    let stale = fleet
        .nodes()
        .iter()
        .filter(|n| n.is_stale(fleet.watermark()))
        .count();
    let _ = writeln!(
        out,
        "# HELP keel_foghorn_nodes Nodes routing knows, by freshness.\n# TYPE keel_foghorn_nodes gauge\nkeel_foghorn_nodes{{state=\"fresh\"}} {}\nkeel_foghorn_nodes{{state=\"stale\"}} {stale}\n# HELP keel_foghorn_snapshot_age_seconds Time since routing's fleet snapshot was built.\n# TYPE keel_foghorn_snapshot_age_seconds gauge\nkeel_foghorn_snapshot_age_seconds {}",
        fleet.nodes().len() - stale,
        fleet.built().elapsed().as_secs_f64()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only two ASCII letters make a country; the rest (which a client may send by the
    /// kilobyte, each value interned for good) is none.
    #[test]
    fn country_codes_are_two_letters() {
        assert_eq!(country_code("de").as_deref(), Some("DE"));
        assert_eq!(country_code(" BR ").as_deref(), Some("BR"));
        for none in ["", "--", "D", "DEU", "D1", "é", &"x".repeat(8000)] {
            assert_eq!(country_code(none), None, "{none:?}");
        }
    }
    use keel_sources::codec::decode;
    use keel_sources::memory::InjectedEvent;
    use proptest::prelude::*;

    const STREAMS: [&str; 7] = [
        "alpha",
        "live+alpha",
        "vod+beta",
        "live+",
        "live+live+gamma",
        "quote\"back\\slash",
        "never-seen-by-anyone",
    ];
    const COUNTRIES: [&str; 6] = ["NL", "us", "", "<nil>", "x\"y", "ÅLAND"];

    fn node(i: usize, id: &str, host: &str, place: Option<(f64, f64)>) -> Arc<NodeLoad> {
        Arc::new(NodeLoad {
            node: Sym::new(id),
            tenant: Uuid::from_u128(0x5eed_0000 + i as u128),
            host: Sym::new(host),
            seen_at: 1_000_000,
            cpu_tenths: (i as u32 * 97) % 1000,
            ram_current: 1 << 30,
            ram_max: 8 << 30,
            up_speed: 1_000_000 * i as u64,
            down_speed: 0,
            reported_bw_limit: 0,
            add_bandwidth: 0,
            pending_viewers: 0,
            latitude: place.map(|p| p.0),
            longitude: place.map(|p| p.1),
            location: Sym::default(),
            mode: NodeMode::Normal,
            healthy: true,
            capabilities: Vec::new(),
            streams: Vec::new(),
            connections: 0,
        })
    }

    fn decoded(injected: &InjectedEvent) -> Event {
        let record = injected.record.as_ref().expect("records are kept");
        decode(&record.at(injected.position.clone()))
            .unwrap_or_else(|e| panic!("the decision's record decodes: {e:?}"))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// The typed event Foghorn hands over is the event its own record decodes to, so the
        /// engine may skip the decode.
        #[test]
        fn a_typed_decision_is_what_its_record_decodes_to(
            places in proptest::collection::vec(
                proptest::option::weighted(0.8, (-89.9f64..89.9, -179.9f64..179.9)), 0..6),
            named in proptest::collection::vec(any::<bool>(), 6),
            watermark in prop_oneof![Just(0i64), 1_000_000i64..2_000_000_000_000],
            stream in proptest::option::of(0usize..STREAMS.len()),
            client in proptest::option::of((-90.0f64..90.0, -180.0f64..180.0)),
            country in proptest::option::of(0usize..COUNTRIES.len()),
            // A tenant of the fleet's (below the node count) or one nobody's node is.
            asking_tenant in proptest::option::of(0u128..8),
            purpose in 0u8..3,
        ) {
            // Names the fleet carries, so that requests for them are known.
            for name in ["alpha", "beta", "gamma", "quote\"back\\slash", "live+gamma"] {
                Sym::new(name);
            }
            let nodes: Vec<Arc<NodeLoad>> = places
                .iter()
                .enumerate()
                .map(|(i, place)| {
                    let id = if named[i] { format!("node-{i}") } else { String::new() };
                    node(i, &id, &format!("https://edge-{i}.example:4433/"), *place)
                })
                .collect();
            let cell = Arc::new(FleetCell::default());
            cell.publish(nodes, watermark);
            let injector = Injector::new("foghorn");
            injector.keep_records(true);
            let foghorn = Foghorn::new(cell, injector.clone(), Arc::new(FoghornStats::default()));
            let mut request = Request::view(
                stream.map(|s| stream_name(STREAMS[s])),
                client.map(|(latitude, longitude)| Place { latitude, longitude }),
            );
            request.purpose = match purpose {
                0 => Purpose::View,
                1 => Purpose::Source,
                _ => Purpose::Ingest(10.0),
            };
            let asker = Asker {
                country: country.map(|c| COUNTRIES[c].to_ascii_uppercase()),
                tenant: asking_tenant.map(|t| Uuid::from_u128(0x5eed_0000 + t)),
                source: "http",
                details: String::new(),
                probe: false,
                client: None,
            };
            let result = foghorn.decide(&request, 3, &asker, host_of);
            let mut out = Vec::new();
            injector.drain_events(&mut out, usize::MAX);
            // A failed decision is attributed only to a tenant the fleet has.
            // Nor to a stream no event named.
            let attributed = (result.is_ok()
                || asking_tenant.is_some_and(|t| (t as usize) < places.len()))
                && !request.stream.is_some_and(is_unknown);
            prop_assert_eq!(out.len(), usize::from(attributed));
            for injected in &out {
                prop_assert_eq!(&decoded(injected), &injected.event);
            }
        }
    }

    /// With a client limit, one address has a burst and then its rate of decisions recorded;
    /// past it the requests are still answered. Requests without an address (gRPC) are not
    /// limited.
    #[test]
    fn a_client_past_its_rate_is_answered_but_not_recorded() {
        let cell = Arc::new(FleetCell::default());
        cell.publish(vec![node(1, "node-1", "", Some((52.0, 4.0)))], 1_000_000);
        let injector = Injector::new("foghorn");
        let stats = Arc::new(FoghornStats::default());
        let foghorn = Foghorn::new(cell, injector.clone(), stats.clone())
            .with_client_limit(ClientLimit::new(2.0));
        let request = Request::view(None, None);
        let from = |client: Option<&str>| Asker {
            client: client.map(|c| c.parse().unwrap()),
            ..Asker::default()
        };
        let mut answered = 0;
        for _ in 0..50 {
            answered += usize::from(
                foghorn
                    .decide(&request, 1, &from(Some("198.51.100.4")), host_of)
                    .is_ok(),
            );
        }
        assert_eq!(answered, 50, "every request is answered");
        let mut out = Vec::new();
        injector.drain_events(&mut out, usize::MAX);
        // Ten at once (five seconds' worth), perhaps one more as the loop took time.
        assert!((10..=11).contains(&out.len()), "{}", out.len());
        assert_eq!(
            stats.events_limited.load(Ordering::Relaxed) as usize,
            50 - out.len()
        );
        for _ in 0..50 {
            foghorn
                .decide(&request, 1, &from(None), host_of)
                .expect("a node");
        }
        out.clear();
        injector.drain_events(&mut out, usize::MAX);
        assert_eq!(out.len(), 50, "no address, no limit");
        let mut metrics = String::new();
        render_metrics(&stats, &foghorn.fleet(), &mut metrics);
        assert!(
            metrics.contains(&format!(
                "keel_foghorn_events_limited_total {}",
                stats.events_limited.load(Ordering::Relaxed)
            )),
            "{metrics}"
        );
    }

    #[test]
    fn records_are_built_only_when_the_engine_keeps_them() {
        let cell = Arc::new(FleetCell::default());
        cell.publish(vec![node(1, "node-1", "", Some((52.0, 4.0)))], 1_000_000);
        let injector = Injector::new("foghorn");
        let foghorn = Foghorn::new(cell, injector.clone(), Arc::new(FoghornStats::default()));
        let request = Request::view(None, None);
        let mut out = Vec::new();
        foghorn
            .decide(&request, 1, &Asker::default(), host_of)
            .expect("a node");
        injector.keep_records(true);
        foghorn
            .decide(&request, 1, &Asker::default(), host_of)
            .expect("a node");
        injector.drain_events(&mut out, usize::MAX);
        assert_eq!(out.len(), 2);
        assert!(out[0].record.is_none());
        assert_eq!(decoded(&out[1]), out[1].event);
        assert_ne!(out[0].event.id, out[1].event.id);
        assert_ne!(out[0].position, out[1].position);
    }
}
