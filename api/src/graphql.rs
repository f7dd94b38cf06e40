//! GraphQL at `/graphql`: queries over the live tables named after the platform's schema, and
//! subscriptions over WebSocket (`graphql-transport-ws`) that push events and incremental table
//! results.
//!
//! Queries go by `POST /graphql` with `Authorization: Bearer …`. Subscriptions upgrade
//! `GET /graphql` and carry the token in the `connection_init` payload
//! (`{"Authorization": "Bearer …"}` or `{"token": "…"}`). Either way the token decides the
//! tenant: every resolver reads only that tenant's rows, an optional `tenantId` argument must
//! name the token's own tenant (another is `FORBIDDEN`), and an admin token may use it to pick
//! one tenant or leave it out to see all.
//!
//! `liveTable` is the incremental query: it first sends the rows of a table that pass the
//! filter (`SNAPSHOT`), then each closed epoch's changes (`CHANGES`, rows out with `diff` −1
//! and in with +1), so a dashboard applies diffs and never re-queries. A subscriber that falls
//! behind gets a fresh `SNAPSHOT` instead of the diffs it missed. Event subscriptions that fall
//! behind get an error item with code `LAGGED` and the number of events missed (`liveFirehose`
//! gets a `missed` event instead). Client addresses are never sent: `host` and
//! `connectionAddr` are always null.

use keel_operators::time::now_ms;
use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError};

use async_graphql::futures_util::Stream;
use async_graphql::{
    Context, Data, EmptyMutation, Enum, Error, ErrorExtensions, ID, Json, Object, Result, Schema,
    SimpleObject,
};
use async_graphql_axum::GraphQLResponse;
use axum::Extension;
use axum::extract::{State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::StreamExt;
use keel_dataflows::periscope::{
    CountryRow, HealthRow, NodeRow, RoutingRow, StreamRow, TABLES, UsageRow, ViewerSessionRow,
};
use keel_dataflows::signalman;
use keel_operators::sym::Sym;
use keel_operators::time::{DAY, HOUR, MINUTE, format_rfc3339, window_start};
use keel_sinks::hub::{
    FeedFilter, FeedItem, RowFilter, Subscription as HubSubscription, TableUpdate, Update, channel,
};
use keel_sinks::live::LiveTables;
use keel_sources::event::{Event, EventKind, NodeMode};
use serde_json::Value;
use uuid::Uuid;

use crate::auth::{Principal, Scope};
use crate::server::{ApiError, ApiState, principal};
use crate::signalman::{MAX_FRAME, READ_BUFFER, admit};

/// The schema type.
pub type KeelSchema = Schema<Query, EmptyMutation, Subscription>;

/// Most items one page or list returns.
pub const MAX_PAGE: usize = 1000;

/// Builds the schema over `state`.
pub fn schema(state: ApiState) -> KeelSchema {
    Schema::build(Query, EmptyMutation, Subscription)
        .data(state)
        .limit_depth(12)
        .limit_complexity(20_000)
        .extension(RootFieldsOnly)
        .finish()
}

/// Refuses a subscription that selects its root fields through a fragment (`subscription {
/// ...F }`): async-graphql serves only the fields written at a subscription's root, so such a
/// subscription ended at once with neither data nor an error.
struct RootFieldsOnly;

impl async_graphql::extensions::ExtensionFactory for RootFieldsOnly {
    fn create(&self) -> Arc<dyn async_graphql::extensions::Extension> {
        Arc::new(RootFieldsOnly)
    }
}

#[async_trait::async_trait]
impl async_graphql::extensions::Extension for RootFieldsOnly {
    async fn parse_query(
        &self,
        ctx: &async_graphql::extensions::ExtensionContext<'_>,
        query: &str,
        variables: &async_graphql::Variables,
        next: async_graphql::extensions::NextParseQuery<'_>,
    ) -> async_graphql::ServerResult<async_graphql::parser::types::ExecutableDocument> {
        use async_graphql::parser::types::{OperationType, Selection};
        let document = next.run(ctx, query, variables).await?;
        let through_fragment = document
            .operations
            .iter()
            .filter(|(_, operation)| operation.node.ty == OperationType::Subscription)
            .flat_map(|(_, operation)| &operation.node.selection_set.node.items)
            .find(|selection| !matches!(selection.node, Selection::Field(_)));
        match through_fragment {
            Some(selection) => Err(async_graphql::ServerError::new(
                "a subscription selects its fields directly: a fragment at its root is not served",
                Some(selection.pos),
            )),
            None => Ok(document),
        }
    }
}

/// The complexity of a field that reads a whole table of the tenant's (sessions, windows,
/// countries, routing): with the schema's limit of 20,000, a document may read twenty at most,
/// fewer with their selections.
/// Counted as one, four thousand aliases of `viewerSessions` each copied every session and held
/// the API's threads for minutes.
const SCAN_COMPLEXITY: usize = 1_000;

/// The deepest a GraphQL document may nest its brackets (`{`, `[`, `(`). async-graphql's parser
/// descends once per level: a list literal 1,500 deep (3 KB) overflowed the API's stack and
/// aborted the engine. A query within [`schema`]'s depth limit of 12 needs a few dozen at most.
pub const MAX_NESTING: usize = 64;

/// The most fragment spreads (`...`) a GraphQL document may have: async-graphql checks
/// fragments for cycles by recursion, one level per fragment of a chain.
pub const MAX_SPREADS: usize = 500;

/// The refusal of a document past [`MAX_NESTING`] or [`MAX_SPREADS`].
pub fn too_deep_message() -> String {
    format!(
        "the document nests its brackets deeper than {MAX_NESTING} levels or has more than \
         {MAX_SPREADS} fragment spreads"
    )
}

/// Whether `document` nests its brackets deeper than [`MAX_NESTING`] or spreads fragments more
/// than [`MAX_SPREADS`] times, outside its strings and comments; read before async-graphql
/// parses it.
pub fn nests_too_deep(document: &str) -> bool {
    let bytes = document.as_bytes();
    let (mut depth, mut spreads, mut at) = (0usize, 0usize, 0);
    while let Some(&byte) = bytes.get(at) {
        match byte {
            // A comment ends at a line break, `\r` alone included (as the grammar has it).
            b'#' => {
                while bytes.get(at).is_some_and(|&b| b != b'\n' && b != b'\r') {
                    at += 1;
                }
            }
            b'"' if bytes[at..].starts_with(b"\"\"\"") => {
                // A block string ends at three quotes not escaped by a backslash.
                at += 3;
                while at < bytes.len() && !bytes[at..].starts_with(b"\"\"\"") {
                    at += if bytes[at..].starts_with(b"\\\"\"\"") {
                        4
                    } else {
                        1
                    };
                }
                at += 2;
            }
            b'"' => {
                at += 1;
                while bytes
                    .get(at)
                    .is_some_and(|&b| b != b'"' && b != b'\n' && b != b'\r')
                {
                    at += if bytes[at] == b'\\' { 2 } else { 1 };
                }
            }
            b'{' | b'[' | b'(' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return true;
                }
            }
            b'}' | b']' | b')' => depth = depth.saturating_sub(1),
            // Fragment spreads: a chain of fragments is validated by recursion too.
            b'.' if bytes[at..].starts_with(b"...") => {
                spreads += 1;
                if spreads > MAX_SPREADS {
                    return true;
                }
                at += 2;
            }
            _ => {}
        }
        at += 1;
    }
    false
}

/// The schema in SDL, as `keel graphql-schema` prints it.
pub fn sdl() -> String {
    Schema::build(Query, EmptyMutation, Subscription)
        .finish()
        .sdl()
}

/// `POST /graphql`.
pub async fn post(
    State(state): State<ApiState>,
    Extension(schema): Extension<KeelSchema>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<GraphQLResponse, ApiError> {
    // The body is read as bytes, within the API's body limit (async-graphql's own extractor
    // reads a body of any size), and only once the caller is known is it parsed.
    let caller = principal(&state.auth, &headers)?;
    let request: async_graphql::Request = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadRequest(format!(
            "the body is not a GraphQL request (a JSON object with \"query\"): {e}"
        ))
    })?;
    if nests_too_deep(&request.query) {
        let refusal = async_graphql::ServerError::new(too_deep_message(), None);
        return Ok(async_graphql::Response::from_errors(vec![refusal]).into());
    }
    Ok(schema.execute(request.data(caller)).await.into())
}

/// `GET /graphql`: the subscription WebSocket.
pub async fn subscribe(
    State(state): State<ApiState>,
    Extension(schema): Extension<KeelSchema>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let Some(protocol) = crate::graphql_ws::protocol(&headers) else {
        return (
            StatusCode::BAD_REQUEST,
            "GraphQL subscriptions need Sec-WebSocket-Protocol: graphql-transport-ws (or graphql-ws)",
        )
            .into_response();
    };
    upgrade
        .protocols(["graphql-transport-ws", "graphql-ws"])
        .read_buffer_size(READ_BUFFER)
        .max_message_size(MAX_FRAME)
        .max_frame_size(MAX_FRAME)
        .on_upgrade(move |socket| crate::graphql_ws::serve(socket, schema, protocol, state))
        .into_response()
}

/// Authenticates a WebSocket's `connection_init` and takes a connection slot of the caller's
/// tenant: the caller, and the data its subscriptions run with (which holds the slot).
pub(crate) async fn connection_init(state: ApiState, payload: Value) -> Result<(Principal, Data)> {
    let token = payload
        .get("Authorization")
        .or_else(|| payload.get("authorization"))
        .and_then(Value::as_str)
        .map(|v| crate::auth::bearer(v).unwrap_or(v))
        .or_else(|| payload.get("token").and_then(Value::as_str))
        .ok_or_else(|| Error::new("unauthorized: missing bearer token in connection_init"))?;
    let caller = state
        .auth
        .authenticate(token, now_ms() / 1000)
        .map_err(|e| Error::new(format!("unauthorized: {e}")))?;
    let slot = admit(&state, &caller).ok_or_else(|| {
        Error::new(format!(
            "too many connections: this tenant already holds {}",
            state.limits.connections_per_tenant
        ))
    })?;
    let mut data = Data::default();
    data.insert(caller.clone());
    data.insert(Arc::new(slot));
    Ok((caller, data))
}

fn forbidden() -> Error {
    Error::new("tenantId is not the token's tenant").extend_with(|_, e| e.set("code", "FORBIDDEN"))
}

fn bad_input(message: impl Into<String>) -> Error {
    let message = message.into();
    Error::new(message).extend_with(|_, e| e.set("code", "BAD_USER_INPUT"))
}

/// Whose rows a resolver reads: the token's tenant, or for an admin the tenant asked for (or
/// every tenant's).
fn tenant_of(ctx: &Context<'_>, asked: Option<&ID>) -> Result<Option<Uuid>> {
    let caller = ctx
        .data::<Principal>()
        .map_err(|_| Error::new("unauthorized"))?;
    tenant_for(caller, asked.map(|id| id.as_str()))
}

/// [`tenant_of`] for a known caller.
fn tenant_for(caller: &Principal, asked: Option<&str>) -> Result<Option<Uuid>> {
    let asked = match asked {
        None => None,
        Some(id) => Some(
            id.parse::<Uuid>()
                .map_err(|_| bad_input("tenantId must be a UUID"))?,
        ),
    };
    match (caller.scope, asked) {
        (Scope::All, asked) => Ok(asked),
        (Scope::Tenant(own), None) => Ok(Some(own)),
        (Scope::Tenant(own), Some(asked)) if asked == own => Ok(Some(own)),
        (Scope::Tenant(_), Some(_)) => Err(forbidden()),
    }
}

fn sees(tenant: Option<Uuid>, row_tenant: Sym) -> bool {
    tenant.is_none_or(|t| row_tenant.as_str() == t.to_string())
}

fn matches_stream(wanted: Option<&str>, stream_id: Sym, internal_name: Sym) -> bool {
    wanted.is_none_or(|w| stream_id.as_str() == w || internal_name.as_str() == w)
}

fn state<'a>(ctx: &Context<'a>) -> Result<&'a ApiState> {
    ctx.data::<ApiState>()
}

fn read<T>(ctx: &Context<'_>, f: impl FnOnce(&LiveTables) -> T) -> Result<T> {
    let tables = state(ctx)?
        .tables
        .read()
        .unwrap_or_else(PoisonError::into_inner);
    Ok(f(&tables))
}

fn page_size(first: i32) -> Result<usize> {
    usize::try_from(first)
        .ok()
        .filter(|n| (1..=MAX_PAGE).contains(n))
        .ok_or_else(|| bad_input(format!("first must be between 1 and {MAX_PAGE}")))
}

fn gb(bytes: u64) -> f64 {
    bytes as f64 / 1_073_741_824.0
}

fn opt_time(ms: Option<i64>) -> Option<String> {
    ms.map(format_rfc3339)
}

// ---------------------------------------------------------------------------------------------
// Pages

/// Where a page is in its list.
#[derive(SimpleObject, Debug)]
pub struct PageInfo {
    /// More items follow.
    pub has_next_page: bool,
    /// Items came before.
    pub has_previous_page: bool,
    /// Cursor of the first item.
    pub start_cursor: Option<String>,
    /// Cursor of the last item; pass it as `after` for the next page.
    pub end_cursor: Option<String>,
}

/// Declares a page type and its edge type for `$node`.
macro_rules! page_of {
    ($page:ident, $edge:ident, $node:ty) => {
        /// One item and its cursor.
        #[derive(SimpleObject, Debug)]
        pub struct $edge {
            /// Opaque position of this item; pass it as `after` to continue behind it.
            pub cursor: String,
            /// The item.
            pub node: $node,
        }

        /// A page of a list, in key order.
        #[derive(SimpleObject, Debug)]
        pub struct $page {
            /// The items.
            pub edges: Vec<$edge>,
            /// Where the page is.
            pub page_info: PageInfo,
            /// Items in the whole list.
            pub total_count: i64,
        }

        impl From<Page<$node>> for $page {
            fn from(page: Page<$node>) -> Self {
                $page {
                    edges: page
                        .edges
                        .into_iter()
                        .map(|(cursor, node)| $edge { cursor, node })
                        .collect(),
                    page_info: page.page_info,
                    total_count: page.total_count,
                }
            }
        }
    };
}

page_of!(StreamConnection, StreamEdge, StreamNode);
page_of!(
    ViewerSessionConnection,
    ViewerSessionEdge,
    ViewerSessionNode
);

/// A page of any item type, before it becomes its GraphQL type.
#[derive(Debug)]
pub struct Page<T> {
    edges: Vec<(String, T)>,
    page_info: PageInfo,
    total_count: i64,
}

/// Pages `items` (sorted by their cursor text) after `after`.
fn paginate<T>(mut items: Vec<(String, T)>, first: i32, after: Option<String>) -> Result<Page<T>> {
    let first = page_size(first)?;
    items.sort_by(|a, b| a.0.cmp(&b.0));
    let total_count = i64::try_from(items.len()).unwrap_or(i64::MAX);
    let start = match after {
        None => 0,
        Some(cursor) => {
            let key = URL_SAFE_NO_PAD
                .decode(cursor.as_bytes())
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .ok_or_else(|| bad_input("after is not a cursor this API returned"))?;
            items.partition_point(|(k, _)| *k <= key)
        }
    };
    let has_next_page = items.len() > start + first;
    let edges: Vec<(String, T)> = items
        .into_iter()
        .skip(start)
        .take(first)
        .map(|(key, node)| (URL_SAFE_NO_PAD.encode(key.as_bytes()), node))
        .collect();
    Ok(Page {
        page_info: PageInfo {
            has_next_page,
            has_previous_page: start > 0,
            start_cursor: edges.first().map(|e| e.0.clone()),
            end_cursor: edges.last().map(|e| e.0.clone()),
        },
        edges,
        total_count,
    })
}

// ---------------------------------------------------------------------------------------------
// Query types

/// The tenant's platform at a glance.
#[derive(SimpleObject, Debug, Default)]
pub struct PlatformOverview {
    /// Streams ever seen.
    pub total_streams: i64,
    /// Streams live now.
    pub active_streams: i64,
    /// Viewers watching now.
    pub total_viewers: i64,
    /// Most viewers on one stream at once.
    pub peak_concurrent_viewers: i64,
    /// Viewer sessions ever seen.
    pub total_views: i64,
    /// Distinct viewers, summed over streams.
    pub unique_viewers: i64,
    /// Hours watched.
    pub viewer_hours: f64,
    /// Gigabytes delivered to viewers.
    pub egress_gb: f64,
    /// Gigabytes received from publishers.
    pub ingress_gb: f64,
    /// Node count.
    pub total_nodes: i64,
    /// When this was computed.
    pub generated_at: String,
}

/// A stream.
#[derive(SimpleObject, Debug)]
pub struct StreamNode {
    /// Tenant.
    pub tenant_id: ID,
    /// Public stream id.
    pub stream_id: ID,
    /// Internal name.
    pub internal_name: String,
    /// `live`, `offline` or `unknown`.
    pub status: String,
    /// Node of the latest lifecycle event.
    pub node_id: Option<String>,
    /// Viewers now.
    pub current_viewers: i64,
    /// Most viewers at once.
    pub peak_viewers: i64,
    /// Sessions ever.
    pub total_sessions: i64,
    /// Distinct viewers.
    pub unique_viewers: i64,
    /// Hours watched.
    pub viewer_hours: f64,
    /// Bytes delivered.
    pub egress_bytes: f64,
    /// Bytes received.
    pub ingress_bytes: f64,
    /// Latest buffer state.
    pub buffer_state: Option<String>,
    /// Latest quality tier.
    pub quality_tier: Option<String>,
    /// Start of the current stream session.
    pub started_at: Option<String>,
    /// Newest event time.
    pub updated_at: String,
}

impl From<&StreamRow> for StreamNode {
    fn from(r: &StreamRow) -> Self {
        StreamNode {
            tenant_id: ID(r.tenant_id.as_str().to_owned()),
            stream_id: ID(r.stream_id.as_str().to_owned()),
            internal_name: r.internal_name.as_str().to_owned(),
            status: r.status.as_str().to_owned(),
            node_id: r.node_id.map(|n| n.as_str().to_owned()),
            current_viewers: r.current_viewers as i64,
            peak_viewers: r.peak_viewers as i64,
            total_sessions: r.total_sessions as i64,
            unique_viewers: r.unique_viewers as i64,
            viewer_hours: r.viewer_seconds / 3600.0,
            egress_bytes: r.egress_bytes as f64,
            ingress_bytes: r.ingress_bytes as f64,
            buffer_state: r.buffer_state.map(|s| s.as_str().to_owned()),
            quality_tier: r.quality_tier.map(|s| s.as_str().to_owned()),
            started_at: opt_time(r.started_at),
            updated_at: format_rfc3339(r.updated_at),
        }
    }
}

/// A viewer session.
#[derive(SimpleObject, Debug)]
pub struct ViewerSessionNode {
    /// Public stream id.
    pub stream_id: ID,
    /// Internal name.
    pub internal_name: String,
    /// Session id.
    pub session_id: String,
    /// Serving node.
    pub node_id: String,
    /// Output protocol.
    pub connector: String,
    /// Country code, `--` when unknown.
    pub country_code: String,
    /// City.
    pub city: Option<String>,
    /// Start.
    pub connected_at: String,
    /// End, null while open.
    pub disconnected_at: Option<String>,
    /// Length in seconds, once closed.
    pub duration_seconds: Option<f64>,
    /// Bytes delivered.
    pub bytes_downloaded: f64,
    /// Bytes sent by the viewer.
    pub bytes_uploaded: f64,
    /// Always null: client addresses never leave the engine.
    pub connection_addr: Option<String>,
}

impl From<&ViewerSessionRow> for ViewerSessionNode {
    fn from(r: &ViewerSessionRow) -> Self {
        ViewerSessionNode {
            stream_id: ID(r.stream_id.as_str().to_owned()),
            internal_name: r.internal_name().as_str().to_owned(),
            session_id: r.session_id.to_string(),
            node_id: r.node_id.as_str().to_owned(),
            connector: r.connector.as_str().to_owned(),
            country_code: r.country_code.as_str().to_owned(),
            city: r.city.non_empty().map(|c| c.as_str().to_owned()),
            connected_at: format_rfc3339(r.connected_at),
            disconnected_at: opt_time(r.disconnected_at.get()),
            duration_seconds: r.duration_s(),
            bytes_downloaded: r.down_bytes as f64,
            bytes_uploaded: r.up_bytes as f64,
            connection_addr: None,
        }
    }
}

/// Viewers of one country.
#[derive(SimpleObject, Debug, Default)]
pub struct CountryMetric {
    /// ISO code, `--` when unknown.
    pub country_code: String,
    /// Sessions from the country.
    pub viewer_count: i64,
    /// Watching now.
    pub current_viewers: i64,
    /// Share of all sessions, percent.
    pub percentage: f64,
    /// Hours watched.
    pub viewer_hours: f64,
    /// Gigabytes delivered.
    pub egress_gb: f64,
}

/// Where viewers are.
#[derive(SimpleObject, Debug, Default)]
pub struct GeographicDistribution {
    /// The stream asked about, if any.
    pub stream_id: Option<String>,
    /// Countries by sessions, most first.
    pub top_countries: Vec<CountryMetric>,
    /// Countries with any session.
    pub unique_countries: i64,
    /// Sessions in all.
    pub total_viewers: i64,
}

/// One bucket of the viewer time series.
#[derive(SimpleObject, Debug)]
pub struct ViewerBucket {
    /// Bucket start.
    pub bucket: String,
    /// Public stream id.
    pub stream_id: ID,
    /// Internal name.
    pub internal_name: String,
    /// Most viewers at once in the bucket.
    pub peak_viewers: i64,
    /// Sessions started in the bucket.
    pub sessions_started: i64,
    /// Hours watched in the bucket.
    pub viewer_hours: f64,
}

/// Health of a stream over five minutes.
#[derive(SimpleObject, Debug)]
pub struct StreamHealthBucket {
    /// Window start.
    pub window_start: String,
    /// Public stream id.
    pub stream_id: ID,
    /// Internal name.
    pub internal_name: String,
    /// Samples in the window.
    pub samples: i64,
    /// Times the buffer ran dry.
    pub buffer_dry_count: i64,
    /// Samples flagging issues.
    pub issue_count: i64,
    /// Mean bitrate, kbit/s.
    pub avg_bitrate_kbps: Option<f64>,
    /// Mean frame rate.
    pub avg_fps: Option<f64>,
    /// Latest quality tier.
    pub quality_tier: Option<String>,
    /// Lost over sent packets.
    pub packet_loss_rate: Option<f64>,
}

/// A media node.
#[derive(SimpleObject, Debug)]
pub struct MediaNode {
    /// Node id.
    pub node_id: String,
    /// CPU use, percent.
    pub cpu_percent: f64,
    /// RAM in use, bytes.
    pub ram_used: f64,
    /// RAM installed, bytes.
    pub ram_max: f64,
    /// Upload, bytes/s.
    pub up_speed: f64,
    /// Download, bytes/s.
    pub down_speed: f64,
    /// Bandwidth limit, bytes/s.
    pub bw_limit: f64,
    /// Latitude.
    pub latitude: Option<f64>,
    /// Longitude.
    pub longitude: Option<f64>,
    /// Location name.
    pub location: Option<String>,
    /// Streams active.
    pub active_streams: i64,
    /// Health flag.
    pub is_healthy: bool,
    /// `normal`, `draining` or `maintenance`.
    pub mode: String,
    /// Newest update.
    pub updated_at: String,
    /// The node's live routing score (Foghorn), when routing knows the node.
    pub score: Option<NodeScore>,
}

/// A node's routing score as Foghorn sees it now: the static terms and the penalty.
#[derive(SimpleObject, Debug)]
pub struct NodeScore {
    /// CPU term.
    pub cpu: i64,
    /// RAM term.
    pub ram: i64,
    /// Bandwidth term (after pending viewers).
    pub bw: i64,
    /// cpu + ram + bw: the part of every request's score that does not depend on the request.
    pub static_total: i64,
    /// Pending virtual viewers (routed here, not yet connected).
    pub pending_viewers: i64,
    /// Their bandwidth, bytes/s.
    pub add_bandwidth: f64,
    /// Whether routing may pick the node for a viewer now.
    pub eligible: bool,
    /// Why not, when it may not (`stale`, `unhealthy`, `mode`, `bandwidth`, `invalid`, ...).
    pub reason: Option<String>,
}

impl NodeScore {
    fn of(
        node: &keel_dataflows::foghorn::NodeLoad,
        fleet: &keel_dataflows::foghorn::Fleet,
    ) -> Self {
        use keel_dataflows::foghorn::score::{Request, check, static_terms, terms};
        let weights = &fleet.policy().weights;
        let statics = static_terms(node, weights);
        let (cpu, ram, bw) = terms(node, weights);
        let verdict = statics.and_then(|_| {
            check(
                node,
                &Request::view(None, None),
                fleet.watermark(),
                &fleet.policy().cutoff,
            )
        });
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        NodeScore {
            cpu: as_i64(cpu),
            ram: as_i64(ram),
            bw: as_i64(bw),
            static_total: as_i64(cpu + ram + bw),
            pending_viewers: as_i64(node.pending_viewers),
            add_bandwidth: node.add_bandwidth as f64,
            eligible: verdict.is_ok(),
            reason: verdict.err().map(|r| {
                serde_json::to_value(r)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            }),
        }
    }
}

impl From<&NodeRow> for MediaNode {
    fn from(r: &NodeRow) -> Self {
        MediaNode {
            node_id: r.node_id.as_str().to_owned(),
            cpu_percent: r.cpu_percent,
            ram_used: r.ram_used as f64,
            ram_max: r.ram_max as f64,
            up_speed: r.up_speed as f64,
            down_speed: r.down_speed as f64,
            bw_limit: r.bw_limit as f64,
            latitude: r.latitude,
            longitude: r.longitude,
            location: r.location.map(|l| l.as_str().to_owned()),
            active_streams: r.active_streams as i64,
            is_healthy: r.is_healthy,
            mode: r.mode.as_str().to_owned(),
            updated_at: format_rfc3339(r.updated_at),
            score: None,
        }
    }
}

/// Routing in one hour.
#[derive(SimpleObject, Debug)]
pub struct RoutingHour {
    /// Hour start.
    pub hour: String,
    /// Decisions.
    pub decisions: i64,
    /// Successful ones.
    pub successes: i64,
    /// Mean client-to-node distance, km.
    pub avg_distance_km: Option<f64>,
    /// Mean balancer score.
    pub avg_score: Option<f64>,
}

/// How well viewers were routed.
#[derive(SimpleObject, Debug, Default)]
pub struct RoutingEfficiency {
    /// Decisions in all.
    pub total_decisions: i64,
    /// Successful ones.
    pub successful_decisions: i64,
    /// Successes over decisions, percent.
    pub success_rate: f64,
    /// Mean client-to-node distance, km, over decisions that had one.
    pub avg_routing_distance: Option<f64>,
    /// Mean score over decisions that had one.
    pub avg_score: Option<f64>,
    /// Per hour, newest first.
    pub hours: Vec<RoutingHour>,
}

/// Bucket widths of the viewer time series.
#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum Interval {
    /// Five minutes.
    #[graphql(name = "FIVE_MINUTES")]
    FiveMinutes,
    /// One hour.
    #[graphql(name = "HOUR")]
    Hour,
    /// One day.
    #[graphql(name = "DAY")]
    Day,
}

/// The query root.
#[derive(Debug)]
pub struct Query;

#[Object]
impl Query {
    /// The tenant's platform at a glance.
    async fn platform_overview(
        &self,
        ctx: &Context<'_>,
        tenant_id: Option<ID>,
    ) -> Result<PlatformOverview> {
        let tenant = tenant_of(ctx, tenant_id.as_ref())?;
        read(ctx, |tables| {
            let mut o = PlatformOverview {
                generated_at: format_rfc3339(now_ms()),
                ..PlatformOverview::default()
            };
            let (mut egress, mut ingress, mut seconds) = (0u64, 0u64, 0f64);
            for s in tables.table::<StreamRow>("streams").rows() {
                if !sees(tenant, s.tenant_id) {
                    continue;
                }
                o.total_streams += 1;
                o.active_streams += i64::from(s.status.as_str() == "live");
                o.total_viewers += s.current_viewers as i64;
                o.peak_concurrent_viewers = o.peak_concurrent_viewers.max(s.peak_viewers as i64);
                o.total_views += s.total_sessions as i64;
                o.unique_viewers += s.unique_viewers as i64;
                seconds += s.viewer_seconds;
                egress += s.egress_bytes;
                ingress += s.ingress_bytes;
            }
            o.viewer_hours = seconds / 3600.0;
            o.egress_gb = gb(egress);
            o.ingress_gb = gb(ingress);
            o.total_nodes = tables
                .table::<NodeRow>("nodes")
                .rows()
                .iter()
                .filter(|n| sees(tenant, n.tenant_id))
                .count() as i64;
            o
        })
    }

    /// Streams, by internal name, a page at a time.
    async fn streams(
        &self,
        ctx: &Context<'_>,
        tenant_id: Option<ID>,
        #[graphql(desc = "Only streams with this status (`live`, `offline`).")] status: Option<
            String,
        >,
        #[graphql(default = 50)] first: i32,
        after: Option<String>,
    ) -> Result<StreamConnection> {
        let tenant = tenant_of(ctx, tenant_id.as_ref())?;
        let items = read(ctx, |tables| {
            tables
                .table::<StreamRow>("streams")
                .rows()
                .iter()
                .filter(|s| sees(tenant, s.tenant_id))
                .filter(|s| status.as_deref().is_none_or(|w| s.status.as_str() == w))
                .map(|s| {
                    let key = format!("{}\u{1f}{}", s.internal_name, s.tenant_id);
                    (key, StreamNode::from(s))
                })
                .collect()
        })?;
        paginate(items, first, after).map(Into::into)
    }

    /// Viewer sessions, by stream and start, a page at a time.
    #[graphql(complexity = "SCAN_COMPLEXITY + child_complexity")]
    async fn viewer_sessions(
        &self,
        ctx: &Context<'_>,
        tenant_id: Option<ID>,
        #[graphql(desc = "Public stream id or internal name.")] stream_id: Option<String>,
        #[graphql(desc = "Only open (true) or closed (false) sessions.")] open: Option<bool>,
        #[graphql(default = 50)] first: i32,
        after: Option<String>,
    ) -> Result<ViewerSessionConnection> {
        let tenant = tenant_of(ctx, tenant_id.as_ref())?;
        let items = read(ctx, |tables| {
            // The tenant's rows only: the table reads no other.
            let tenant_text = tenant.map(|t| t.to_string());
            tables
                .rows_of::<ViewerSessionRow>("viewer_sessions", tenant_text.as_deref())
                .iter()
                .filter(|s| matches_stream(stream_id.as_deref(), s.stream_id, s.internal_name()))
                .filter(|s| open.is_none_or(|o| o == s.disconnected_at.is_none()))
                .map(|s| {
                    let key = format!(
                        "{}\u{1f}{:020}\u{1f}{}\u{1f}{}\u{1f}{}",
                        s.internal_name(),
                        s.connected_at.max(0),
                        s.node_id,
                        s.session_id,
                        s.tenant_id()
                    );
                    (key, ViewerSessionNode::from(s))
                })
                .collect()
        })?;
        paginate(items, first, after).map(Into::into)
    }

    /// Where viewers are: countries by sessions.
    #[graphql(complexity = "SCAN_COMPLEXITY + child_complexity")]
    async fn geographic_distribution(
        &self,
        ctx: &Context<'_>,
        tenant_id: Option<ID>,
        #[graphql(desc = "Public stream id or internal name.")] stream_id: Option<String>,
        #[graphql(default = 10)] top_n: i32,
    ) -> Result<GeographicDistribution> {
        let tenant = tenant_of(ctx, tenant_id.as_ref())?;
        let top_n = page_size(top_n)?;
        read(ctx, |tables| {
            let mut by_country: BTreeMap<&'static str, CountryMetric> = BTreeMap::new();
            for c in tables.table::<CountryRow>("viewers_by_country").rows() {
                if !sees(tenant, c.tenant_id)
                    || !matches_stream(stream_id.as_deref(), c.stream_id, c.internal_name)
                {
                    continue;
                }
                let m = by_country.entry(c.country_code.as_str()).or_default();
                m.viewer_count += c.sessions as i64;
                m.current_viewers += c.current_viewers as i64;
                m.viewer_hours += c.viewer_seconds / 3600.0;
                m.egress_gb += gb(c.egress_bytes);
            }
            let total: i64 = by_country.values().map(|m| m.viewer_count).sum();
            let unique_countries = by_country.keys().filter(|c| **c != "--").count() as i64;
            let mut countries: Vec<CountryMetric> = by_country
                .into_iter()
                .map(|(code, mut m)| {
                    m.country_code = code.to_owned();
                    m.percentage = if total > 0 {
                        m.viewer_count as f64 * 100.0 / total as f64
                    } else {
                        0.0
                    };
                    m
                })
                .collect();
            countries.sort_by_key(|m| Reverse(m.viewer_count));
            countries.truncate(top_n);
            GeographicDistribution {
                stream_id: stream_id.clone(),
                top_countries: countries,
                unique_countries,
                total_viewers: total,
            }
        })
    }

    /// Concurrent viewers over time, per stream, newest bucket first.
    #[graphql(complexity = "SCAN_COMPLEXITY + child_complexity")]
    async fn viewer_time_series(
        &self,
        ctx: &Context<'_>,
        tenant_id: Option<ID>,
        #[graphql(desc = "Public stream id or internal name.")] stream_id: Option<String>,
        #[graphql(default_with = "Interval::FiveMinutes")] interval: Interval,
        #[graphql(default = 288)] first: i32,
    ) -> Result<Vec<ViewerBucket>> {
        let tenant = tenant_of(ctx, tenant_id.as_ref())?;
        let first = page_size(first)?;
        let width = match interval {
            Interval::FiveMinutes => 5 * MINUTE,
            Interval::Hour => HOUR,
            Interval::Day => DAY,
        };
        read(ctx, |tables| {
            let mut buckets: BTreeMap<(Reverse<i64>, Sym), ViewerBucket> = BTreeMap::new();
            for u in tables.table::<UsageRow>("usage_5m").rows() {
                if !sees(tenant, u.tenant_id)
                    || !matches_stream(stream_id.as_deref(), u.stream_id, u.internal_name)
                {
                    continue;
                }
                let start = window_start(u.window_start, width);
                let b = buckets
                    .entry((Reverse(start), u.internal_name))
                    .or_insert_with(|| ViewerBucket {
                        bucket: format_rfc3339(start),
                        stream_id: ID(u.stream_id.as_str().to_owned()),
                        internal_name: u.internal_name.as_str().to_owned(),
                        peak_viewers: 0,
                        sessions_started: 0,
                        viewer_hours: 0.0,
                    });
                b.peak_viewers = b.peak_viewers.max(u.peak_viewers as i64);
                b.sessions_started += u.sessions_started as i64;
                b.viewer_hours += u.viewer_seconds / 3600.0;
            }
            buckets.into_values().take(first).collect()
        })
    }

    /// Stream health in five-minute windows, newest first.
    #[graphql(complexity = "SCAN_COMPLEXITY + child_complexity")]
    async fn stream_health(
        &self,
        ctx: &Context<'_>,
        tenant_id: Option<ID>,
        #[graphql(desc = "Public stream id or internal name.")] stream_id: Option<String>,
        #[graphql(default = 100)] first: i32,
    ) -> Result<Vec<StreamHealthBucket>> {
        let tenant = tenant_of(ctx, tenant_id.as_ref())?;
        let first = page_size(first)?;
        read(ctx, |tables| {
            let mut rows: Vec<&HealthRow> = tables
                .table::<HealthRow>("stream_health_5m")
                .rows()
                .iter()
                .filter(|h| sees(tenant, h.tenant_id))
                .filter(|h| matches_stream(stream_id.as_deref(), h.stream_id, h.internal_name))
                .collect();
            rows.sort_by_key(|h| (Reverse(h.window_start), h.internal_name));
            rows.into_iter()
                .take(first)
                .map(|h| StreamHealthBucket {
                    window_start: format_rfc3339(h.window_start),
                    stream_id: ID(h.stream_id.as_str().to_owned()),
                    internal_name: h.internal_name.as_str().to_owned(),
                    samples: h.samples as i64,
                    buffer_dry_count: h.buffer_dry_count as i64,
                    issue_count: h.issue_count as i64,
                    avg_bitrate_kbps: h.avg_bitrate_kbps,
                    avg_fps: h.avg_fps,
                    quality_tier: h.quality_tier.map(|q| q.as_str().to_owned()),
                    packet_loss_rate: h.packet_loss_rate,
                })
                .collect()
        })
    }

    /// Media nodes, by id.
    async fn nodes(&self, ctx: &Context<'_>, tenant_id: Option<ID>) -> Result<Vec<MediaNode>> {
        let tenant = tenant_of(ctx, tenant_id.as_ref())?;
        let fleet = state(ctx)?.fleet.clone();
        read(ctx, |tables| {
            let mut rows: Vec<&NodeRow> = tables
                .table::<NodeRow>("nodes")
                .rows()
                .iter()
                .filter(|n| sees(tenant, n.tenant_id))
                .collect();
            rows.sort_by_key(|n| (n.node_id, n.tenant_id));
            let fleet = fleet.snapshot();
            rows.into_iter()
                .map(|row| {
                    let mut node = MediaNode::from(row);
                    node.score = fleet
                        .node(row.node_id.as_str())
                        .filter(|load| load.tenant.to_string() == row.tenant_id.as_str())
                        .map(|load| NodeScore::of(load, &fleet));
                    node
                })
                .collect()
        })
    }

    /// How well viewers were routed to nodes.
    #[graphql(complexity = "SCAN_COMPLEXITY + child_complexity")]
    async fn routing_efficiency(
        &self,
        ctx: &Context<'_>,
        tenant_id: Option<ID>,
    ) -> Result<RoutingEfficiency> {
        let tenant = tenant_of(ctx, tenant_id.as_ref())?;
        read(ctx, |tables| {
            let mut e = RoutingEfficiency::default();
            let (mut distance, mut with_distance, mut score, mut with_score) =
                (0.0, 0u64, 0.0, 0u64);
            let mut rows: Vec<&RoutingRow> = tables
                .table::<RoutingRow>("routing_hourly")
                .rows()
                .iter()
                .filter(|r| sees(tenant, r.tenant_id))
                .collect();
            rows.sort_by_key(|r| Reverse(r.hour));
            for r in rows {
                e.total_decisions += r.decisions as i64;
                e.successful_decisions += r.successes as i64;
                if let Some(d) = r.avg_distance_km {
                    distance += d * r.decisions as f64;
                    with_distance += r.decisions;
                }
                if let Some(s) = r.avg_score {
                    score += s * r.decisions as f64;
                    with_score += r.decisions;
                }
                e.hours.push(RoutingHour {
                    hour: format_rfc3339(r.hour),
                    decisions: r.decisions as i64,
                    successes: r.successes as i64,
                    avg_distance_km: r.avg_distance_km,
                    avg_score: r.avg_score,
                });
            }
            if e.total_decisions > 0 {
                e.success_rate = e.successful_decisions as f64 * 100.0 / e.total_decisions as f64;
            }
            e.avg_routing_distance = (with_distance > 0).then(|| distance / with_distance as f64);
            e.avg_score = (with_score > 0).then(|| score / with_score as f64);
            e
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Subscription types

/// Something that happened to a stream.
#[derive(SimpleObject, Debug)]
pub struct StreamEvent {
    /// Event id.
    pub event_id: ID,
    /// Event type (`stream_lifecycle_update`, `stream_end`, ...).
    #[graphql(name = "type")]
    pub event_type: String,
    /// Public stream id, when known.
    pub stream_id: Option<ID>,
    /// Internal name.
    pub internal_name: String,
    /// Node reporting.
    pub node_id: Option<String>,
    /// Event time.
    pub timestamp: String,
    /// Every field of the event.
    pub payload: Json<Value>,
}

/// A viewer connecting or disconnecting, as viewer metrics.
#[derive(SimpleObject, Debug)]
pub struct ViewerMetrics {
    /// Serving node.
    pub node_id: String,
    /// Public stream id, when known.
    pub stream_id: Option<ID>,
    /// Internal name.
    pub internal_name: String,
    /// `connect` or `disconnect`.
    pub action: String,
    /// Output protocol.
    pub protocol: String,
    /// Always null: client addresses never leave the engine.
    pub host: Option<String>,
    /// Session id.
    pub session_id: String,
    /// Session length so far, seconds (disconnects).
    pub connection_time: Option<f64>,
    /// Bytes delivered (disconnects).
    pub bytes_downloaded: Option<f64>,
    /// Bytes sent by the viewer (disconnects).
    pub bytes_uploaded: Option<f64>,
    /// Event time, milliseconds since the epoch.
    pub timestamp: i64,
    /// Viewer country.
    pub client_country: Option<String>,
    /// Viewer city.
    pub client_city: Option<String>,
    /// Viewer latitude.
    pub client_latitude: Option<f64>,
    /// Viewer longitude.
    pub client_longitude: Option<f64>,
}

/// A viewer connection opened or closed.
#[derive(SimpleObject, Debug)]
pub struct ConnectionEvent {
    /// Event id.
    pub event_id: ID,
    /// Event time.
    pub timestamp: String,
    /// Public stream id, when known.
    pub stream_id: Option<ID>,
    /// Internal name.
    pub internal_name: String,
    /// Session id.
    pub session_id: String,
    /// Always null: client addresses never leave the engine.
    pub connection_addr: Option<String>,
    /// Output protocol.
    pub connector: String,
    /// Serving node.
    pub node_id: String,
    /// Country code.
    pub country_code: Option<String>,
    /// City.
    pub city: Option<String>,
    /// Latitude.
    pub latitude: Option<f64>,
    /// Longitude.
    pub longitude: Option<f64>,
    /// `connect` or `disconnect`.
    pub event_type: String,
    /// Session length, seconds (disconnects).
    pub session_duration_seconds: Option<i64>,
    /// Bytes delivered (disconnects).
    pub bytes_transferred: Option<f64>,
}

/// A node's health report.
#[derive(SimpleObject, Debug)]
pub struct SystemHealthEvent {
    /// Node id.
    pub node_id: String,
    /// Location name.
    pub location: Option<String>,
    /// `HEALTHY`, `UNHEALTHY`, `DRAINING` or `MAINTENANCE`.
    pub status: String,
    /// CPU, tenths of a percent.
    pub cpu_tenths: i64,
    /// Health flag.
    pub is_healthy: bool,
    /// RAM installed, MiB.
    pub ram_max: f64,
    /// RAM in use, MiB.
    pub ram_current: f64,
    /// Event time.
    pub timestamp: String,
}

/// Any event of the tenant.
#[derive(SimpleObject, Debug)]
pub struct TenantEvent {
    /// Event type, or `missed` when events were dropped for this subscriber.
    #[graphql(name = "type")]
    pub event_type: String,
    /// `streams`, `analytics` or `system`.
    pub channel: String,
    /// Event time (or, for `missed`, when the loss was noticed).
    pub timestamp: String,
    /// Tenant.
    pub tenant_id: Option<ID>,
    /// The event's fields.
    pub data: Json<Value>,
    /// For `missed`: how many events this subscriber did not get.
    pub missed: Option<i64>,
}

/// What a table subscription sends.
#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum UpdateKind {
    /// `rows` is every matching row: replace what you hold.
    #[graphql(name = "SNAPSHOT")]
    Snapshot,
    /// `changes` is one epoch's rows out and in: apply them.
    #[graphql(name = "CHANGES")]
    Changes,
}

/// A row that left (`diff` −1) or arrived (+1).
#[derive(SimpleObject, Debug)]
pub struct RowDiff {
    /// −1 or +1.
    pub diff: i32,
    /// The row.
    pub row: Json<Value>,
}

/// One message of an incremental table subscription.
#[derive(SimpleObject, Debug)]
pub struct TableUpdateMessage {
    /// The table.
    pub table: String,
    /// The epoch the rows are as of.
    pub epoch: Option<i64>,
    /// Snapshot or changes.
    pub kind: UpdateKind,
    /// For a snapshot: the rows.
    pub rows: Vec<Json<Value>>,
    /// For changes: rows out, then rows in.
    pub changes: Vec<RowDiff>,
}

fn stream_parts(event: &Event) -> (Option<ID>, String) {
    match event.kind.stream() {
        Some(s) => (
            s.stream_id.map(|id| ID(id.to_string())),
            s.internal_name.as_str().to_owned(),
        ),
        None => (None, String::new()),
    }
}

fn non_empty(sym: Sym) -> Option<String> {
    sym.non_empty().map(|s| s.as_str().to_owned())
}

fn lagged(missed: u64) -> Error {
    Error::new(format!(
        "this subscriber fell behind and missed {missed} events"
    ))
    .extend_with(|_, e| {
        e.set("code", "LAGGED");
        e.set("missed", missed);
    })
}

/// A feed subscription as a stream of `T`: events through `map` (which may skip one by
/// returning `None`), and an error item whenever events were missed.
fn feed_stream<T: Send + 'static>(
    subscription: HubSubscription,
    map: impl Fn(&FeedItem) -> Option<T> + Send + 'static,
    on_missed: impl Fn(u64) -> Result<T> + Send + 'static,
) -> impl Stream<Item = Result<T>> + Send + 'static {
    futures_util::stream::unfold(
        (subscription, map, on_missed),
        |(mut subscription, map, on_missed)| async move {
            loop {
                if subscription.lagged() {
                    let missed = subscription.recover();
                    let item = on_missed(missed);
                    return Some((item, (subscription, map, on_missed)));
                }
                match subscription.recv().await? {
                    Update::Event(item) => {
                        if let Some(value) = map(&item) {
                            return Some((Ok(value), (subscription, map, on_missed)));
                        }
                    }
                    Update::Rows { .. } => {}
                }
            }
        },
    )
}

fn subscribe_feed(
    ctx: &Context<'_>,
    channels: u8,
    stream: Option<String>,
    types: Option<&'static [&'static str]>,
) -> Result<HubSubscription> {
    let state = state(ctx)?;
    let tenant = tenant_of(ctx, None)?;
    let filter = FeedFilter {
        stream,
        types,
        ..FeedFilter::new(tenant, channels)
    };
    Ok(state.hub.subscribe_events(filter, state.limits.queue))
}

const CONNECTIONS: &[&str] = &["viewer_connect", "viewer_disconnect"];

fn viewer_metrics(item: &FeedItem) -> Option<ViewerMetrics> {
    let (stream_id, internal_name) = stream_parts(&item.event);
    let (node, session, place, action, done) = match &item.event.kind {
        EventKind::ViewerConnect(c) => (c.node, &c.session_id, &c.place, "connect", None),
        EventKind::ViewerDisconnect(d) => (
            d.node,
            &d.session_id,
            &d.place,
            "disconnect",
            Some((d.duration_s, d.down_bytes, d.up_bytes)),
        ),
        _ => return None,
    };
    Some(ViewerMetrics {
        node_id: node.as_str().to_owned(),
        stream_id,
        internal_name,
        action: action.to_owned(),
        protocol: place.connector.as_str().to_owned(),
        host: None,
        session_id: session.to_string(),
        connection_time: done.map(|d| d.0 as f64),
        bytes_downloaded: done.map(|d| d.1 as f64),
        bytes_uploaded: done.map(|d| d.2 as f64),
        timestamp: item.event.time,
        client_country: non_empty(place.country),
        client_city: non_empty(place.city),
        client_latitude: place.latitude,
        client_longitude: place.longitude,
    })
}

fn connection_event(item: &FeedItem) -> Option<ConnectionEvent> {
    let m = viewer_metrics(item)?;
    Some(ConnectionEvent {
        event_id: ID(item.event.id.to_string()),
        timestamp: format_rfc3339(item.event.time),
        stream_id: m.stream_id,
        internal_name: m.internal_name,
        session_id: m.session_id,
        connection_addr: None,
        connector: m.protocol,
        node_id: m.node_id,
        country_code: m.client_country,
        city: m.client_city,
        latitude: m.client_latitude,
        longitude: m.client_longitude,
        event_type: m.action,
        session_duration_seconds: m.connection_time.map(|t| t as i64),
        bytes_transferred: m.bytes_downloaded,
    })
}

fn tenant_event(item: &FeedItem) -> TenantEvent {
    let message = signalman::message(&item.event);
    TenantEvent {
        event_type: message["type"].as_str().unwrap_or_default().to_owned(),
        channel: channel::name(item.channel).to_owned(),
        timestamp: format_rfc3339(item.event.time),
        tenant_id: Some(ID(item.event.tenant.to_string())),
        data: Json(message["data"].clone()),
        missed: None,
    }
}

/// Reads `where` as column = value pairs.
/// The table and row filter of a `liveTable` subscription by `caller`: the checks both the
/// resolver and the direct WebSocket path ([`crate::graphql_ws`]) make.
pub(crate) fn table_filter(
    caller: &Principal,
    tables: &std::sync::RwLock<LiveTables>,
    table: &str,
    filter: Option<Value>,
    tenant_id: Option<&str>,
) -> Result<(&'static str, RowFilter)> {
    let tenant = tenant_for(caller, tenant_id)?;
    let Some(&table) = TABLES.iter().find(|t| **t == table) else {
        return Err(bad_input(format!(
            "no table named {table:?}; tables: {}",
            TABLES.join(", ")
        )));
    };
    let equals = equalities(filter)?;
    // A column the table lacks, or a value no column holds, would match nothing, silently
    // and for good: refused instead.
    let schema = tables
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .schema(table)
        .map_err(|e| Error::new(e.to_string()))?;
    for (column, value) in &equals {
        if schema.index_of(column).is_err() {
            let columns: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            return Err(bad_input(format!(
                "{table} has no column {column:?}; its columns: {}",
                columns.join(", ")
            )));
        }
        if value.is_object() || value.is_array() {
            return Err(bad_input(format!(
                "where {column:?}: compare with a string, number, boolean or null"
            )));
        }
    }
    let filter = RowFilter {
        tenant: tenant.map(|t| t.to_string()),
        equals,
    };
    Ok((table, filter))
}

fn equalities(filter: Option<Value>) -> Result<Vec<(String, Value)>> {
    match filter {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Object(fields)) => Ok(fields.into_iter().collect()),
        Some(_) => Err(bad_input(
            "where must be an object of column: value pairs, e.g. {\"internal_name\": \"demo\"}",
        )),
    }
}

fn table_message(table: &str, update: TableUpdate) -> TableUpdateMessage {
    let as_i64 = |e: u64| i64::try_from(e).unwrap_or(i64::MAX);
    match update {
        TableUpdate::Snapshot { epoch, rows } => TableUpdateMessage {
            table: table.to_owned(),
            epoch: epoch.map(as_i64),
            kind: UpdateKind::Snapshot,
            rows: rows.into_iter().map(Json).collect(),
            changes: Vec::new(),
        },
        TableUpdate::Changes { epoch, changes } => TableUpdateMessage {
            table: table.to_owned(),
            epoch: Some(as_i64(epoch)),
            kind: UpdateKind::Changes,
            rows: Vec::new(),
            changes: changes
                .into_iter()
                .map(|c| RowDiff {
                    diff: i32::from(c.diff),
                    row: Json(Arc::unwrap_or_clone(c.row).into_value()),
                })
                .collect(),
        },
    }
}

/// The subscription root.
#[derive(Debug)]
pub struct Subscription;

#[async_graphql::Subscription]
impl Subscription {
    /// Stream lifecycle, buffer, track-list, end and push events (channel `streams`).
    async fn live_stream_events(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "Public stream id or internal name.")] stream_id: Option<String>,
    ) -> Result<impl Stream<Item = Result<StreamEvent>>> {
        let subscription = subscribe_feed(ctx, channel::STREAMS, stream_id, None)?;
        Ok(feed_stream(
            subscription,
            |item| {
                let (stream_id, internal_name) = stream_parts(&item.event);
                let message = signalman::message(&item.event);
                Some(StreamEvent {
                    event_id: ID(item.event.id.to_string()),
                    event_type: item.event.kind.type_name().to_owned(),
                    stream_id,
                    internal_name,
                    node_id: message["data"]["node"].as_str().map(str::to_owned),
                    timestamp: format_rfc3339(item.event.time),
                    payload: Json(message["data"].clone()),
                })
            },
            |missed| Err(lagged(missed)),
        ))
    }

    /// Viewers connecting and disconnecting on one stream, as viewer metrics.
    async fn live_viewer_metrics(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "Public stream id or internal name.")] stream_id: String,
    ) -> Result<impl Stream<Item = Result<ViewerMetrics>>> {
        let subscription =
            subscribe_feed(ctx, channel::ANALYTICS, Some(stream_id), Some(CONNECTIONS))?;
        Ok(feed_stream(subscription, viewer_metrics, |missed| {
            Err(lagged(missed))
        }))
    }

    /// Viewer connections opening and closing.
    async fn live_connection_events(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "Public stream id or internal name.")] stream_id: Option<String>,
    ) -> Result<impl Stream<Item = Result<ConnectionEvent>>> {
        let subscription = subscribe_feed(ctx, channel::ANALYTICS, stream_id, Some(CONNECTIONS))?;
        Ok(feed_stream(subscription, connection_event, |missed| {
            Err(lagged(missed))
        }))
    }

    /// Node health reports.
    async fn live_system_health(
        &self,
        ctx: &Context<'_>,
    ) -> Result<impl Stream<Item = Result<SystemHealthEvent>>> {
        let subscription =
            subscribe_feed(ctx, channel::SYSTEM, None, Some(&["node_lifecycle_update"]))?;
        Ok(feed_stream(
            subscription,
            |item| {
                let EventKind::NodeUpdate(n) = &item.event.kind else {
                    return None;
                };
                let status = match (n.mode, n.is_healthy) {
                    (NodeMode::Draining, _) => "DRAINING",
                    (NodeMode::Maintenance, _) => "MAINTENANCE",
                    (NodeMode::Normal, true) => "HEALTHY",
                    (NodeMode::Normal, false) => "UNHEALTHY",
                };
                Some(SystemHealthEvent {
                    node_id: n.node.as_str().to_owned(),
                    location: non_empty(n.location),
                    status: status.to_owned(),
                    cpu_tenths: i64::from(n.cpu_tenths),
                    is_healthy: n.is_healthy,
                    ram_max: n.ram_max as f64 / 1_048_576.0,
                    ram_current: n.ram_current as f64 / 1_048_576.0,
                    timestamp: format_rfc3339(item.event.time),
                })
            },
            |missed| Err(lagged(missed)),
        ))
    }

    /// Every event of the tenant, on every channel.
    async fn live_firehose(
        &self,
        ctx: &Context<'_>,
    ) -> Result<impl Stream<Item = Result<TenantEvent>>> {
        let subscription = subscribe_feed(ctx, channel::ALL, None, None)?;
        Ok(feed_stream(
            subscription,
            |item| Some(tenant_event(item)),
            |missed| {
                Ok(TenantEvent {
                    event_type: "missed".to_owned(),
                    channel: "system".to_owned(),
                    timestamp: format_rfc3339(now_ms()),
                    tenant_id: None,
                    data: Json(serde_json::json!({ "count": missed })),
                    missed: Some(i64::try_from(missed).unwrap_or(i64::MAX)),
                })
            },
        ))
    }

    /// An incremental query: the rows of `table` passing `where`, then each epoch's changes.
    async fn live_table(
        &self,
        ctx: &Context<'_>,
        #[graphql(
            desc = "A live table: streams, viewer_sessions, nodes, viewers_by_country, usage_5m, stream_health_5m, routing_hourly, ingest_errors, unknown_events."
        )]
        table: String,
        #[graphql(
            name = "where",
            desc = "Column: value pairs every row must match, e.g. {\"internal_name\": \"demo\"}."
        )]
        filter: Option<Json<Value>>,
        tenant_id: Option<ID>,
    ) -> Result<impl Stream<Item = TableUpdateMessage>> {
        let caller = ctx
            .data::<Principal>()
            .map_err(|_| Error::new("unauthorized"))?;
        let state = state(ctx)?;
        let (table, filter) = table_filter(
            caller,
            &state.tables,
            &table,
            filter.map(|j| j.0),
            tenant_id.as_ref().map(|id| id.as_str()),
        )?;
        let updates = keel_sinks::hub::table_updates(
            state.tables.clone(),
            &state.hub,
            table,
            filter,
            state.limits.queue,
        )
        .map_err(|e| Error::new(e.to_string()))?;
        Ok(updates.map(move |update| table_message(table, update)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_table_filter_names_columns_the_table_has() {
        use keel_operators::table::TableSet as _;
        let mut tables = LiveTables::default();
        keel_dataflows::periscope::PeriscopeChange::declare_all(&mut tables);
        let tables = std::sync::RwLock::new(tables);
        let admin = Principal {
            subject: "root".to_owned(),
            scope: Scope::All,
            expires: None,
        };
        let filter = |value: Value| table_filter(&admin, &tables, "streams", Some(value), None);
        assert!(filter(serde_json::json!({ "internal_name": "demo" })).is_ok());
        let unknown = filter(serde_json::json!({ "internal_nmae": "demo" })).unwrap_err();
        assert!(
            unknown
                .message
                .starts_with("streams has no column \"internal_nmae\"; its columns: "),
            "{}",
            unknown.message
        );
        let nested = filter(serde_json::json!({ "internal_name": { "eq": "demo" } })).unwrap_err();
        assert_eq!(
            nested.message,
            "where \"internal_name\": compare with a string, number, boolean or null"
        );
    }

    #[test]
    fn deep_documents_are_found_before_they_are_parsed() {
        assert!(!nests_too_deep(
            "{ streams(first: 5) { edges { node { internalName } } } }"
        ));
        let deep = format!(
            "{{ streams(after: {}1{}) {{ totalCount }} }}",
            "[".repeat(1500),
            "]".repeat(1500)
        );
        assert!(nests_too_deep(&deep));
        let edge = "[".repeat(MAX_NESTING) + &"]".repeat(MAX_NESTING);
        assert!(!nests_too_deep(&edge));
        assert!(nests_too_deep(&format!("({edge})")));
        // Brackets inside strings, block strings and comments do not count.
        let opened = "[".repeat(100);
        for quiet in [
            format!("{{ a(b: \"{opened} \\\" {opened}\") }}"),
            format!("{{ a(b: \"\"\"{opened} \\\"\"\" {opened}\"\"\") }}"),
            format!("{{ a # {opened}\n }}"),
        ] {
            assert!(!nests_too_deep(&quiet), "{quiet}");
        }
        // A comment ends at a lone `\r` as well: what follows it counts.
        assert!(nests_too_deep(&format!(
            "{{ a # x\r(b: {}1{}) }}",
            "[".repeat(100),
            "]".repeat(100)
        )));
        // A chain of fragments is bounded by its spreads.
        let chain = |n: usize| {
            (0..n)
                .map(|i| format!("fragment f{i} on Query {{ ...f{} }}", i + 1))
                .collect::<String>()
        };
        assert!(!nests_too_deep(&chain(MAX_SPREADS)));
        assert!(nests_too_deep(&chain(MAX_SPREADS + 1)));
    }

    #[test]
    fn cursors_page_through_everything_once() {
        let items: Vec<(String, i32)> = (0..25).map(|i| (format!("k{i:02}"), i)).collect();
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = paginate(items.clone(), 10, after).unwrap();
            assert_eq!(page.total_count, 25);
            seen.extend(page.edges.iter().map(|e| e.1));
            if !page.page_info.has_next_page {
                break;
            }
            after = page.page_info.end_cursor;
        }
        assert_eq!(seen, (0..25).collect::<Vec<_>>());
        assert!(paginate(items.clone(), 0, None).is_err());
        assert!(paginate(items, 10, Some("!!".into())).is_err());
    }

    #[test]
    fn the_schema_names_the_platform_fields() {
        let sdl = sdl();
        for field in [
            "platformOverview",
            "streams(",
            "viewerSessions(",
            "geographicDistribution(",
            "viewerTimeSeries(",
            "streamHealth(",
            "nodes(",
            "routingEfficiency(",
            "liveStreamEvents(",
            "liveViewerMetrics(",
            "liveConnectionEvents(",
            "liveSystemHealth",
            "liveFirehose",
            "liveTable(",
        ] {
            assert!(sdl.contains(field), "{field} missing from\n{sdl}");
        }
    }
}
