//! Periscope: the analytics tables, kept live by one dataflow.
//!
//! [`periscope`] takes the decoded events, the decode errors and each worker's watermarks, and
//! returns one stream of [`PeriscopeChange`]s covering every table in [`rows`] (the rows of
//! `viewer_sessions` only for stores that keep them: the live table reads the sessions where
//! [`StreamsState`] holds them, [`held`]):
//!
//! ```text
//! events ─┬─ stream events ─(by tenant+stream)──> StreamsState ──> streams, viewer_sessions,
//!         │                                                        viewers_by_country, usage_5m,
//!         │                                                        stream_health_5m
//!         ├─ node updates ──(by tenant+node)────> latest_by_key ──> nodes
//!         ├─ routing ───────(by tenant+hour)────> RoutingState ──> routing_hourly
//!         └─ unknown types ─(by tenant+type)────> UnknownState ──> unknown_events
//! errors ──────────────────────────────────────────────────────────> ingest_errors
//! ```
//!
//! Every table is a function of the multiset of events: the states merge order-insensitively and
//! count each event id once, so any order and any number of workers give the same tables.

mod counted;
pub mod held;
#[cfg(test)]
mod oracle;
pub mod rows;
mod sessions;
mod streams;

use std::sync::Arc;

use keel_operators::latest::LatestByKey;
use keel_operators::maintain::{GlobalWatermark, Maintain};
use keel_operators::split::Split;
use keel_operators::sym::Sym;
use keel_operators::table::Change;
use keel_sources::error::IngestError;
use keel_sources::event::{Event, EventKind};
use timely::dataflow::StreamVec;
use timely::dataflow::operators::Concatenate;
use timely::dataflow::operators::vec::Map;
use uuid::Uuid;

pub use counted::{RoutingState, UnknownState};
pub use held::{HeldSessions, SessionStore};
pub use rows::*;
pub use streams::{StreamsState, WINDOW};

/// Which state an event feeds.
fn class(event: &Event) -> usize {
    match event.kind {
        EventKind::NodeUpdate(_) => 1,
        EventKind::Routing(_) => 2,
        EventKind::Unknown(_) => 3,
        _ => 0,
    }
}

fn node_row(event: Event) -> ((Uuid, Sym), (i64, Uuid), NodeRow) {
    let EventKind::NodeUpdate(n) = event.kind else {
        unreachable!("only node updates are routed here")
    };
    let row = NodeRow {
        tenant_id: Sym::new(&event.tenant.to_string()),
        node_id: n.node,
        cpu_percent: f64::from(n.cpu_tenths) / 10.0,
        ram_used: n.ram_current,
        ram_max: n.ram_max,
        up_speed: n.up_speed,
        down_speed: n.down_speed,
        bw_limit: n.bw_limit,
        latitude: n.latitude,
        longitude: n.longitude,
        location: n.location.non_empty(),
        active_streams: u64::from(n.active_streams),
        is_healthy: n.is_healthy,
        mode: Sym::new(n.mode.as_str()),
        updated_at: event.time,
    };
    ((event.tenant, n.node), (event.time, event.id), row)
}

fn error_row(error: IngestError) -> PeriscopeChange {
    let (source, record) = error.position.origin();
    PeriscopeChange::IngestErrors(Change::Upsert(IngestErrorRow {
        position: error.position.to_string(),
        source,
        record,
        reason: error.reason,
        event_type: error.event_type,
        tenant_id: error.tenant_id,
        excerpt: crate::privacy::scrub_json(&error.excerpt),
    }))
}

/// Builds the Periscope dataflow. `watermarks` carries each worker's newest event time per epoch;
/// the streams' sessions are held in `sessions`, where `viewer_sessions` is read.
pub fn periscope<'scope>(
    events: StreamVec<'scope, u64, Event>,
    errors: StreamVec<'scope, u64, IngestError>,
    watermarks: StreamVec<'scope, u64, i64>,
    sessions: &Arc<SessionStore>,
) -> StreamVec<'scope, u64, PeriscopeChange> {
    let scope = events.scope();
    let worker = scope.index();
    let watermarks = watermarks.global_watermark();
    let mut parts = events.split(4, "ByClass", class).into_iter();
    let (streams, nodes, routing, unknown) = (
        parts.next().expect("four parts"),
        parts.next().expect("four parts"),
        parts.next().expect("four parts"),
        parts.next().expect("four parts"),
    );
    let streams = streams.maintain(
        watermarks.clone(),
        "Streams",
        streams::route,
        StreamsState::new(sessions.clone(), worker),
    );
    let nodes = nodes
        .map(node_row)
        .latest_by_key(
            watermarks.clone(),
            "Nodes",
            |(tenant, node): &(Uuid, Sym)| (tenant.as_u128() as u64) ^ node.stable_hash(),
        )
        .map(|(_, row)| PeriscopeChange::Nodes(Change::Upsert(row)));
    let routing = routing.maintain(
        watermarks.clone(),
        "RoutingHourly",
        counted::route_routing,
        RoutingState::default(),
    );
    let unknown = unknown.maintain(
        watermarks,
        "UnknownEvents",
        counted::route_unknown,
        UnknownState::default(),
    );
    let errors = errors.map(error_row);
    scope.concatenate([streams, nodes, routing, unknown, errors])
}
