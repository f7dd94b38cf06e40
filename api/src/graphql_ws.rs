//! The GraphQL WebSocket at `GET /graphql`, with a direct path for plain `liveTable`
//! subscriptions.
//!
//! Every client message goes to async-graphql's protocol implementation except one kind: on
//! `graphql-transport-ws`, a `subscribe` whose document is a single `liveTable` field with
//! literal arguments (or `JSON`/`ID` variables for `where` and `tenantId`) and a plain selection
//! of its fields — no fragments, directives or repeated keys. Those subscriptions are served
//! here: the same checks (`graphql::table_filter`) and the same hub stream, but each
//! update is written straight into the JSON text of its `next` message, rows included, instead
//! of going through async-graphql's value tree and resolvers (most of the API's CPU when 1,000
//! subscribers take 100,000 changed rows a second). The text is what async-graphql would send
//! for the same document; `tests/live.rs` compares the two paths message by message.
//!
//! Anything else, and any subscription whose checks fail, takes async-graphql's path, so errors
//! read as they always did. Ids keep async-graphql's rules across both paths: a `subscribe` with
//! an id in use replaces that subscription, and a client's `complete` is answered with
//! `complete`.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};

use async_graphql::http::{WebSocket as Protocol, WebSocketProtocols as Protocols, WsMessage};
use async_graphql::parser::types::{
    BaseType, DocumentOperations, OperationType, Selection, SelectionSet, Type,
};
use async_graphql::parser::{Positioned, parse_query};
use async_graphql::{Name, Value as GqlValue};
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use axum::http::HeaderMap;
use axum::http::header::SEC_WEBSOCKET_PROTOCOL;
use futures_util::future::{AbortHandle, Abortable};
use futures_util::stream::{self, BoxStream, SelectAll};
use futures_util::{SinkExt, StreamExt, future};
use keel_sinks::hub::{TableUpdate, table_updates};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::auth::Principal;
use crate::graphql::{KeelSchema, connection_init, table_filter};
use crate::server::ApiState;

/// The protocol a client asks for in `Sec-WebSocket-Protocol` (its first one Keel speaks).
pub fn protocol(headers: &HeaderMap) -> Option<Protocols> {
    headers
        .get(SEC_WEBSOCKET_PROTOCOL)?
        .to_str()
        .ok()?
        .split(',')
        .find_map(|p| Protocols::from_str(p.trim()).ok())
}

/// A `liveTable` subscription the direct path can serve: its arguments and its selection.
#[derive(Clone, Debug, PartialEq)]
pub struct TablePlan {
    /// The response key of the `liveTable` field.
    key: String,
    table: String,
    filter: Option<Value>,
    tenant_id: Option<String>,
    fields: Vec<(String, Field)>,
}

/// A selected field of `TableUpdateMessage`.
#[derive(Clone, Debug, PartialEq)]
enum Field {
    Table,
    Epoch,
    Kind,
    Rows,
    Changes(Vec<(String, DiffField)>),
    Typename,
}

/// A selected field of `RowDiff`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum DiffField {
    Diff,
    Row,
    Typename,
}

/// The variable types the direct path accepts, by argument.
const VARIABLE_TYPES: &[(&str, &str)] = &[("where", "JSON"), ("tenantId", "ID")];

impl TablePlan {
    /// The plan for a `subscribe` message's payload, or `None` when async-graphql should serve
    /// it (anything beyond a plain `liveTable` selection, and anything invalid).
    pub fn of(payload: &Value) -> Option<TablePlan> {
        let payload = payload.as_object()?;
        let mut variables = &serde_json::Map::new();
        let mut operation_name = None;
        for (key, value) in payload {
            match (key.as_str(), value) {
                ("query", Value::String(_)) | (_, Value::Null) => {}
                ("variables", Value::Object(given)) => variables = given,
                ("operationName", Value::String(name)) => operation_name = Some(name.as_str()),
                ("extensions", Value::Object(given)) if given.is_empty() => {}
                _ => return None,
            }
        }
        let document = parse_query(payload.get("query")?.as_str()?).ok()?;
        if !document.fragments.is_empty() {
            return None;
        }
        let operation = match (document.operations, operation_name) {
            (DocumentOperations::Single(operation), None) => operation.node,
            (DocumentOperations::Multiple(mut operations), name) if operations.len() == 1 => {
                let (own, operation) = operations.drain().next()?;
                if name.is_some_and(|name| name != own.as_str()) {
                    return None;
                }
                operation.node
            }
            _ => return None,
        };
        if operation.ty != OperationType::Subscription || !operation.directives.is_empty() {
            return None;
        }
        // Declared variables: only `where: JSON` and `tenantId: ID`, each used exactly once.
        let mut declared = HashMap::new();
        for definition in &operation.variable_definitions {
            let definition = &definition.node;
            if !definition.directives.is_empty() || definition.default_value.is_some() {
                return None;
            }
            let Type {
                base: BaseType::Named(type_name),
                nullable: true,
            } = &definition.var_type.node
            else {
                return None;
            };
            let name = definition.name.node.to_string();
            if declared.insert(name, type_name.to_string()).is_some() {
                return None;
            }
        }
        let [item] = &operation.selection_set.node.items[..] else {
            return None;
        };
        let Selection::Field(field) = &item.node else {
            return None;
        };
        let field = &field.node;
        if field.name.node != "liveTable" || !field.directives.is_empty() {
            return None;
        }
        let (mut table, mut filter, mut tenant_id) = (None, None, None);
        let mut used = HashSet::new();
        for (name, value) in &field.arguments {
            let name = name.node.as_str();
            // A variable stands for the whole argument, or the argument is a literal.
            let mut variables_seen = Vec::new();
            let literal = value
                .node
                .clone()
                .into_const_with(|variable: Name| {
                    variables_seen.push(variable);
                    Ok::<_, ()>(GqlValue::Null)
                })
                .ok()?;
            let value = match (&variables_seen[..], literal) {
                ([], literal) => literal.into_json().ok()?,
                ([variable], GqlValue::Null) => {
                    let wanted = VARIABLE_TYPES.iter().find(|(arg, _)| *arg == name)?.1;
                    if declared.get(variable.as_str()).map(String::as_str) != Some(wanted)
                        || !used.insert(variable.to_string())
                    {
                        return None;
                    }
                    variables
                        .get(variable.as_str())
                        .cloned()
                        .unwrap_or(Value::Null)
                }
                _ => return None,
            };
            let fresh = match (name, value) {
                ("table", Value::String(text)) => table.replace(text).is_none(),
                ("where", value) => filter.replace(value).is_none(),
                ("tenantId", Value::String(id)) => tenant_id.replace(Some(id)).is_none(),
                ("tenantId", Value::Null) => tenant_id.replace(None).is_none(),
                _ => false,
            };
            if !fresh {
                return None;
            }
        }
        if used.len() != declared.len() {
            return None;
        }
        let fields = selection(&field.selection_set.node, |name, inner| {
            Some(match name {
                "table" => Field::Table,
                "epoch" => Field::Epoch,
                "kind" => Field::Kind,
                "rows" => Field::Rows,
                "__typename" => Field::Typename,
                "changes" => {
                    return selection(inner?, |name, inner| {
                        if inner.is_some() {
                            return None;
                        }
                        match name {
                            "diff" => Some(DiffField::Diff),
                            "row" => Some(DiffField::Row),
                            "__typename" => Some(DiffField::Typename),
                            _ => None,
                        }
                    })
                    .map(Field::Changes);
                }
                _ => return None,
            })
            .filter(|_| inner.is_none())
        })?;
        Some(TablePlan {
            key: field.response_key().node.to_string(),
            table: table?,
            filter: filter.filter(|f| !f.is_null()),
            tenant_id: tenant_id.flatten(),
            fields,
        })
    }

    /// The JSON text of the `next` message that carries `update` to subscription `id`.
    pub fn render(&self, id: &str, table: &str, update: &TableUpdate) -> String {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"{\"type\":\"next\",\"id\":");
        json(&mut out, id);
        out.extend_from_slice(b",\"payload\":{\"data\":{");
        json(&mut out, &self.key);
        out.extend_from_slice(b":{");
        let (epoch, kind, rows, changes) = match update {
            TableUpdate::Snapshot { epoch, rows } => (*epoch, "SNAPSHOT", &rows[..], &[][..]),
            TableUpdate::Changes { epoch, changes } => {
                (Some(*epoch), "CHANGES", &[][..], &changes[..])
            }
        };
        for (i, (key, field)) in self.fields.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json(&mut out, key);
            out.push(b':');
            match field {
                Field::Table => json(&mut out, table),
                Field::Epoch => match epoch {
                    Some(epoch) => json(&mut out, &i64::try_from(epoch).unwrap_or(i64::MAX)),
                    None => out.extend_from_slice(b"null"),
                },
                Field::Kind => json(&mut out, kind),
                Field::Typename => json(&mut out, "TableUpdateMessage"),
                Field::Rows => {
                    out.push(b'[');
                    for (i, row) in rows.iter().enumerate() {
                        if i > 0 {
                            out.push(b',');
                        }
                        json(&mut out, row);
                    }
                    out.push(b']');
                }
                Field::Changes(fields) => {
                    out.push(b'[');
                    for (i, change) in changes.iter().enumerate() {
                        out.extend_from_slice(if i > 0 { b",{" } else { b"{" });
                        for (j, (key, field)) in fields.iter().enumerate() {
                            if j > 0 {
                                out.push(b',');
                            }
                            json(&mut out, key);
                            out.push(b':');
                            match field {
                                DiffField::Diff => json(&mut out, &i32::from(change.diff)),
                                DiffField::Row => {
                                    out.extend_from_slice(change.row.text().as_bytes());
                                }
                                DiffField::Typename => json(&mut out, "RowDiff"),
                            }
                        }
                        out.push(b'}');
                    }
                    out.push(b']');
                }
            }
        }
        out.extend_from_slice(b"}}}}");
        String::from_utf8(out).expect("serde_json writes UTF-8")
    }
}

/// The fields of a selection set, by response key, each parsed by `field(name, sub-selection)`;
/// `None` when any field does not parse, carries arguments or directives, or a key repeats.
fn selection<T>(
    set: &SelectionSet,
    mut field: impl FnMut(&str, Option<&SelectionSet>) -> Option<T>,
) -> Option<Vec<(String, T)>> {
    let mut fields: Vec<(String, T)> = Vec::with_capacity(set.items.len());
    for item in &set.items {
        let Selection::Field(Positioned { node, .. }) = &item.node else {
            return None;
        };
        if !node.arguments.is_empty() || !node.directives.is_empty() {
            return None;
        }
        let key = node.response_key().node.to_string();
        if fields.iter().any(|(k, _)| *k == key) {
            return None;
        }
        let inner = &node.selection_set.node;
        let parsed = field(
            node.name.node.as_str(),
            (!inner.items.is_empty()).then_some(inner),
        )?;
        fields.push((key, parsed));
    }
    (!fields.is_empty()).then_some(fields)
}

fn json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    serde_json::to_writer(out, value).expect("a JSON value serializes");
}

/// What the direct path knows of one connection.
#[derive(Default)]
struct Routes {
    /// The authenticated caller, once `connection_init` passed.
    caller: Option<Principal>,
    /// Whether `connection_init` was refused (its token missing or bad).
    refused: bool,
    /// Direct subscriptions by id, with a number that tells a replaced one from its successor.
    direct: HashMap<String, (u64, AbortHandle)>,
    /// Ids handed to async-graphql and not known to be over.
    delegated: HashSet<String>,
    started: u64,
}

type Shared = Arc<Mutex<Routes>>;

fn lock(routes: &Shared) -> std::sync::MutexGuard<'_, Routes> {
    routes.lock().unwrap_or_else(PoisonError::into_inner)
}

fn complete(id: &str) -> String {
    let mut out = b"{\"type\":\"complete\",\"id\":".to_vec();
    json(&mut out, id);
    out.push(b'}');
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

/// How long a connection may take to send `connection_init`; past it the connection is closed
/// with 4408, as graphql-transport-ws asks (it held one of the port's places for good before).
pub const INIT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves one upgraded connection until either side closes it.
pub async fn serve(socket: WebSocket, schema: KeelSchema, protocol: Protocols, state: ApiState) {
    let routes = Shared::default();
    let limits = state.limits;
    let (sends, mut started) = mpsc::unbounded_channel::<BoxStream<'static, String>>();
    let (violations, mut violated) = mpsc::unbounded_channel::<String>();
    let (mut sink, incoming) = socket.split();
    let direct = protocol == Protocols::GraphQLWS;
    let router = {
        let (routes, state) = (routes.clone(), state.clone());
        move |text: axum::body::Bytes| {
            // Read once, for both checks; a message that is not one goes on to async-graphql.
            let head: Option<Head> = serde_json::from_slice(&text).ok();
            // graphql-transport-ws closes a connection with 4400 at a message it does not
            // define; async-graphql would close with 1002, or, for some, drop the connection.
            if direct && let Some(what) = undefined(head.as_ref(), &text) {
                let _ = violations.send(what);
                return future::ready(None);
            }
            // Refused before either path parses it (see `graphql::MAX_NESTING`). Before
            // `connection_init` async-graphql refuses every subscription without reading its
            // document, so that refusal (4401 below) comes first.
            let initialized = lock(&routes).caller.is_some();
            let refusal = head
                .as_ref()
                .filter(|_| initialized)
                .and_then(|head| too_deep(head).or_else(|| too_many(&routes, head)));
            if let Some(refusal) = refusal {
                let _ = sends.send(stream::once(future::ready(refusal)).boxed());
                return future::ready(None);
            }
            if !direct
                && let Some(Head {
                    kind, id: Some(id), ..
                }) = &head
            {
                // The older protocol's subscriptions all go to async-graphql: counted here.
                match kind.as_str() {
                    "start" => {
                        lock(&routes).delegated.insert(id.clone());
                    }
                    "stop" => {
                        lock(&routes).delegated.remove(id);
                    }
                    _ => {}
                }
            }
            let taken = direct && head.is_some_and(|head| take(&routes, &state, &sends, head));
            future::ready((!taken).then_some(text))
        }
    };
    let input = incoming
        .take_while(|message| future::ready(message.is_ok()))
        .filter_map(|message| {
            future::ready(match message {
                Ok(message @ (Message::Text(_) | Message::Binary(_))) => Some(message.into_data()),
                _ => None,
            })
        })
        .filter_map(router);
    let init = {
        let routes = routes.clone();
        move |payload| async move {
            let (caller, data) = connection_init(state, payload)
                .await
                .inspect_err(|_| lock(&routes).refused = true)?;
            lock(&routes).caller = Some(caller);
            Ok(data)
        }
    };
    let delegated = Protocol::new(schema, input, protocol).on_connection_init(init);
    futures_util::pin_mut!(delegated);
    let mut streams: SelectAll<BoxStream<'static, String>> = SelectAll::new();
    let init_by = tokio::time::Instant::now() + INIT_WAIT;
    loop {
        let waiting_for_init = {
            let book = lock(&routes);
            book.caller.is_none() && !book.refused
        };
        // The connection ends when its token expires (4403, as the protocol forbids).
        let expires_in = lock(&routes)
            .caller
            .as_ref()
            .and_then(|caller| caller.expires_in(keel_operators::time::now_ms() / 1000));
        let message = tokio::select! {
            () = tokio::time::sleep_until(init_by), if waiting_for_init => {
                Message::Close(Some(CloseFrame {
                    code: 4408,
                    reason: "connection_init did not come in time".into(),
                }))
            }
            () = tokio::time::sleep(expires_in.unwrap_or_default()), if expires_in.is_some() => {
                Message::Close(Some(CloseFrame {
                    code: 4403,
                    reason: "the token expired".into(),
                }))
            }
            message = delegated.next() => match message {
                None => break,
                Some(WsMessage::Text(text)) => {
                    // A delegated subscription that ended (completed, or refused with an
                    // error, which ends it too) frees its id.
                    if (text.starts_with("{\"type\":\"complete\"")
                        || text.starts_with("{\"type\":\"error\""))
                        && let Ok(Head { id: Some(id), .. }) = serde_json::from_str(&text)
                    {
                        lock(&routes).delegated.remove(&id);
                    }
                    Message::Text(text.into())
                }
                Some(WsMessage::Close(code, reason)) => Message::Close(Some(CloseFrame {
                    // async-graphql closes a refused graphql-transport-ws connection with 1002
                    // (protocol error), and one subscribing before `connection_init` with 1011;
                    // the protocol asks for 4403 (forbidden) and 4401 (unauthorized).
                    code: match lock(&routes) {
                        routes if direct && routes.refused => 4403,
                        routes if direct && code == 1011 && routes.caller.is_none() => 4401,
                        // A message of a defined type that async-graphql could not read.
                        _ if direct && code == 1002 => 4400,
                        _ => code,
                    },
                    reason: close_reason(reason).into(),
                })),
            },
            Some(reason) = violated.recv() => Message::Close(Some(CloseFrame {
                code: 4400,
                reason: close_reason(reason).into(),
            })),
            Some(stream) = started.recv() => {
                streams.push(stream);
                continue;
            }
            Some(text) = streams.next(), if !streams.is_empty() => Message::Text(text.into()),
        };
        let closing = matches!(message, Message::Close(_));
        // A client that stops reading is let go once a write has waited this long (longer for
        // a large message), as on `/ws`: its subscriptions end and their queues are given back.
        let wait = limits.write_wait_for(&message);
        let sent = tokio::time::timeout(wait, sink.send(message)).await;
        if !matches!(sent, Ok(Ok(()))) || closing {
            break;
        }
    }
}

/// `reason` cut to what a close frame carries (123 bytes), at a character boundary.
fn close_reason(mut reason: String) -> String {
    const MOST: usize = 123;
    if reason.len() > MOST {
        let mut end = MOST - 3;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
        reason.push_str("...");
    }
    reason
}

/// Why a graphql-transport-ws client message is not one the protocol defines (`None` when it
/// is, or at least has a defined type whose fields async-graphql checks).
fn undefined(head: Option<&Head>, text: &[u8]) -> Option<String> {
    let Some(head) = head else {
        // Say which part is wrong when it is a JSON object.
        let reason = match serde_json::from_slice::<Value>(text) {
            Ok(Value::Object(object)) if object.get("type").is_some_and(Value::is_string) => {
                "\"id\" must be a string"
            }
            _ => "not a message: expected a JSON object with a string \"type\"",
        };
        return Some(reason.to_owned());
    };
    match head.kind.as_str() {
        "connection_init" | "ping" | "pong" | "subscribe" | "complete" => None,
        other => Some(format!("unknown message type {:?}", other)),
    }
}

/// What the routing reads of a client message.
#[derive(serde::Deserialize)]
struct Head {
    #[serde(rename = "type")]
    kind: String,
    id: Option<String>,
    payload: Option<Value>,
}

/// The error that answers a `subscribe` (or, in the older protocol, `start`) whose document
/// nests too deep to be parsed safely; `None` for any other message.
fn too_deep(head: &Head) -> Option<String> {
    if !matches!(head.kind.as_str(), "subscribe" | "start") {
        return None;
    }
    let document = head.payload.as_ref()?.get("query")?.as_str()?;
    if !crate::graphql::nests_too_deep(document) {
        return None;
    }
    let payload = serde_json::json!([{ "message": crate::graphql::too_deep_message() }]);
    Some(serde_json::json!({ "type": "error", "id": head.id, "payload": payload }).to_string())
}

/// Subscriptions one connection may hold at once. Each holds a queue of updates for its client
/// (`subscriber_queue`); without a bound, one socket could open thousands and have the engine
/// keep a queue for each.
pub const MAX_SUBSCRIPTIONS: usize = 100;

/// The error that answers a new subscription on a connection that holds
/// [`MAX_SUBSCRIPTIONS`] already; `None` for any other message.
fn too_many(routes: &Shared, head: &Head) -> Option<String> {
    if !matches!(head.kind.as_str(), "subscribe" | "start") {
        return None;
    }
    let id = head.id.as_ref()?;
    let book = lock(routes);
    let held = book.direct.len() + book.delegated.len();
    if held < MAX_SUBSCRIPTIONS || book.direct.contains_key(id) || book.delegated.contains(id) {
        return None;
    }
    let message = format!(
        "this connection holds {MAX_SUBSCRIPTIONS} subscriptions, the most one may: complete \
         one first, or open another connection"
    );
    let payload = serde_json::json!([{ "message": message }]);
    Some(serde_json::json!({ "type": "error", "id": id, "payload": payload }).to_string())
}

/// Routes one client message: true when the direct path took it, false to hand it on.
fn take(
    routes: &Shared,
    state: &ApiState,
    sends: &mpsc::UnboundedSender<BoxStream<'static, String>>,
    head: Head,
) -> bool {
    let Head {
        kind,
        id: Some(id),
        payload,
    } = head
    else {
        return false;
    };
    let mut book = lock(routes);
    match kind.as_str() {
        "subscribe" => {
            // A new subscription under a direct one's id replaces it (as async-graphql does).
            if let Some((_, old)) = book.direct.remove(&id) {
                old.abort();
            }
            let Some(caller) = book.caller.clone() else {
                return false;
            };
            if book.delegated.contains(&id) {
                return false;
            }
            let stream = payload
                .as_ref()
                .and_then(TablePlan::of)
                .and_then(|plan| start(plan, &caller, state, id.clone()));
            let Some(stream) = stream else {
                book.delegated.insert(id);
                return false;
            };
            book.started += 1;
            let generation = book.started;
            let (handle, registration) = AbortHandle::new_pair();
            book.direct.insert(id.clone(), (generation, handle));
            // When the hub ends the stream: `complete`, and the id is free again.
            let routes = routes.clone();
            let ending = stream::once(async move {
                let mut book = lock(&routes);
                if book.direct.get(&id).is_some_and(|(g, _)| *g == generation) {
                    book.direct.remove(&id);
                }
                complete(&id)
            });
            let _ = sends.send(Abortable::new(stream.chain(ending), registration).boxed());
            true
        }
        "complete" => match book.direct.remove(&id) {
            Some((_, handle)) => {
                handle.abort();
                let _ = sends.send(stream::once(future::ready(complete(&id))).boxed());
                true
            }
            None => {
                book.delegated.remove(&id);
                false
            }
        },
        _ => false,
    }
}

/// Starts a planned subscription for `caller`: `None` when its checks fail, so that
/// async-graphql serves it and reports why.
fn start(
    plan: TablePlan,
    caller: &Principal,
    state: &ApiState,
    id: String,
) -> Option<BoxStream<'static, String>> {
    let (table, filter) = table_filter(
        caller,
        &state.tables,
        &plan.table,
        plan.filter.clone(),
        plan.tenant_id.as_deref(),
    )
    .ok()?;
    let updates = table_updates(
        state.tables.clone(),
        &state.hub,
        table,
        filter,
        state.limits.queue,
    )
    .ok()?;
    Some(
        updates
            .map(move |update| plan.render(&id, table, &update))
            .boxed(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Auth, Scope};
    use crate::server::Limits;
    use keel_dataflows::periscope::PeriscopeChange;
    use keel_operators::table::TableSet;
    use keel_sinks::hub::{Hub, RowChange};
    use keel_sinks::live::LiveTables;
    use proptest::prelude::*;
    use serde_json::json;
    use std::sync::RwLock;

    const TENANT: &str = "6f1e4f5a-2b9c-4d1e-8a7b-3c2d1e0f9a8b";
    const OTHER: &str = "0a0b0c0d-1111-4222-8333-444455556666";

    /// Documents the direct path serves; `{D}` is where a directive sends one to async-graphql.
    const DOCUMENTS: &[(&str, &str)] = &[
        (
            "subscription { liveTable(table: \"streams\"){D} { table epoch kind rows changes { diff row } } }",
            "{}",
        ),
        (
            "subscription Named($w: JSON) { s: liveTable(table: \"streams\", where: $w){D} { __typename k: kind changes { r: row __typename d: diff } e: epoch } }",
            r#"{"w": {"status": "live"}}"#,
        ),
        (
            "subscription($t: ID, $w: JSON) { liveTable(tenantId: $t, table: \"streams\", where: $w){D} { rows changes { row } kind } }",
            r#"{"t": "6f1e4f5a-2b9c-4d1e-8a7b-3c2d1e0f9a8b"}"#,
        ),
        (
            "subscription { liveTable(table: \"streams\", where: {status: \"live\", current_viewers: 3}, tenantId: null){D} { changes { diff } epoch } }",
            "null",
        ),
    ];

    fn payload(document: &str, variables: &str, directive: &str) -> Value {
        json!({
            "query": document.replace("{D}", directive),
            "variables": serde_json::from_str::<Value>(variables).unwrap(),
            "operationName": null,
        })
    }

    fn state() -> ApiState {
        let mut tables = LiveTables::default();
        PeriscopeChange::declare_all(&mut tables);
        let hub = Hub::default();
        tables.attach(hub.clone());
        ApiState {
            tables: Arc::new(RwLock::new(tables)),
            auth: Arc::new(Auth::new(Some("a-secret-for-the-direct-path".into()), vec![]).unwrap()),
            stats: Arc::default(),
            metrics: Arc::default(),
            hub,
            limits: Limits::default(),
            fleet: Arc::new(keel_dataflows::foghorn::FleetCell::default()),
            foghorn: Arc::default(),
            extra_metrics: Arc::default(),
        }
    }

    fn caller() -> Principal {
        Principal {
            subject: "viewer".into(),
            scope: Scope::Tenant(TENANT.parse().unwrap()),
            expires: None,
        }
    }

    /// async-graphql's `next` message for the same response.
    fn envelope(id: &str, response: &async_graphql::Response) -> String {
        format!(
            "{{\"type\":\"next\",\"id\":{},\"payload\":{}}}",
            serde_json::to_string(id).unwrap(),
            serde_json::to_string(response).unwrap()
        )
    }

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "\\PC{0,12}".prop_map(Value::from),
            Just(Value::from("quote \" backslash \\ tab \t nul \u{0} é 😀")),
        ]
    }

    fn row() -> impl Strategy<Value = Value> {
        let value = leaf().prop_recursive(2, 8, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
                prop::collection::btree_map("[a-z]{1,3}", inner, 0..3)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        });
        (
            prop::bool::weighted(0.8),
            prop::bool::weighted(0.7),
            prop::collection::btree_map("[a-z_]{1,8}", value, 0..6),
        )
            .prop_map(|(own, live, fields)| {
                let mut row: serde_json::Map<String, Value> = fields.into_iter().collect();
                row.insert("tenant_id".into(), json!(if own { TENANT } else { OTHER }));
                row.insert("status".into(), json!(if live { "live" } else { "ended" }));
                row.insert("current_viewers".into(), json!(3));
                Value::Object(row)
            })
    }

    fn epochs() -> impl Strategy<Value = Vec<Vec<(bool, Value)>>> {
        prop::collection::vec(prop::collection::vec((any::<bool>(), row()), 0..5), 1..5)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Oracle: for every document, each message the direct path writes is, byte for byte, the
        /// message async-graphql sends for the same document and the same hub updates.
        #[test]
        fn the_direct_path_writes_what_async_graphql_sends(epochs in epochs()) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            runtime.block_on(async {
                let state = state();
                let schema = crate::graphql::schema(state.clone());
                for (document, variables) in DOCUMENTS {
                    let fast = payload(document, variables, "");
                    let plan = TablePlan::of(&fast).expect("a plain liveTable document is planned");
                    let mut direct = start(plan, &caller(), &state, "q".into()).unwrap();
                    let request = async_graphql::Request::new(document.replace("{D}", ""))
                        .variables(async_graphql::Variables::from_json(fast["variables"].clone()))
                        .data(caller());
                    let mut delegated = Box::pin(schema.execute_stream(request));
                    let mut messages = 0;
                    for (epoch, changes) in std::iter::once(&Vec::new()).chain(&epochs).enumerate() {
                        if epoch > 0 {
                            let changes: Vec<RowChange> = changes
                                .iter()
                                .map(|(out, row)| RowChange {
                                    diff: if *out { -1 } else { 1 },
                                    row: Arc::new(keel_sinks::hub::JsonRow::from_value(row)),
                                })
                                .collect();
                            state.hub.publish_rows("streams", epoch as u64, &changes);
                        }
                        // Both take the update at once; an epoch nobody's filter passes sends nothing.
                        let wait = std::time::Duration::from_millis(if epoch == 0 { 5000 } else { 20 });
                        let (ours, theirs) = tokio::join!(
                            tokio::time::timeout(wait, direct.next()),
                            tokio::time::timeout(wait, delegated.next()),
                        );
                        let (ours, theirs) = (ours.ok().flatten(), theirs.ok().flatten());
                        let theirs = theirs.map(|response| {
                            assert!(response.errors.is_empty(), "{:?}", response.errors);
                            envelope("q", &response)
                        });
                        prop_assert_eq!(&ours, &theirs, "{}", document);
                        messages += usize::from(ours.is_some());
                    }
                    prop_assert!(messages >= 1, "the snapshot came");
                }
                Ok(())
            })?;
        }
    }

    #[test]
    fn only_plain_live_table_documents_are_planned() {
        for (document, variables) in DOCUMENTS {
            assert!(
                TablePlan::of(&payload(document, variables, "")).is_some(),
                "{document}"
            );
            for directive in [" @include(if: true)", " @skip(if: false)"] {
                assert!(TablePlan::of(&payload(document, variables, directive)).is_none());
            }
        }
        let refused = [
            // Other fields, several fields, fragments, other operations.
            "subscription { liveFirehose { eventType } }",
            "subscription { liveTable(table: \"streams\") { kind } liveFirehose { eventType } }",
            "subscription { liveTable(table: \"streams\") { ...F } } fragment F on TableUpdateMessage { kind }",
            "subscription { liveTable(table: \"streams\") { ... on TableUpdateMessage { kind } } }",
            "query { liveTable(table: \"streams\") { kind } }",
            "subscription A { liveTable(table: \"streams\") { kind } } subscription B { liveTable(table: \"nodes\") { kind } }",
            // Selections async-graphql would refuse or merge.
            "subscription { liveTable(table: \"streams\") { kind kind } }",
            "subscription { liveTable(table: \"streams\") { a: kind a: epoch } }",
            "subscription { liveTable(table: \"streams\") { changes } }",
            "subscription { liveTable(table: \"streams\") { rows { x } } }",
            "subscription { liveTable(table: \"streams\") { changes { diff row { x } } } }",
            "subscription { liveTable(table: \"streams\") { nope } }",
            "subscription { liveTable(table: \"streams\") { } }",
            "subscription { liveTable(table: \"streams\") }",
            // Arguments: missing, repeated, unknown, mistyped, or through other variables.
            "subscription { liveTable { kind } }",
            "subscription { liveTable(table: \"streams\", table: \"nodes\") { kind } }",
            "subscription { liveTable(table: \"streams\", limit: 3) { kind } }",
            "subscription { liveTable(table: 3) { kind } }",
            "subscription { liveTable(table: \"streams\", tenantId: 3) { kind } }",
            "subscription($t: String!) { liveTable(table: $t) { kind } }",
            "subscription($w: JSON) { liveTable(table: \"streams\") { kind } }",
            "subscription($w: JSON!) { liveTable(table: \"streams\", where: $w) { kind } }",
            "subscription($w: String) { liveTable(table: \"streams\", where: $w) { kind } }",
            "subscription($w: JSON = {}) { liveTable(table: \"streams\", where: $w) { kind } }",
            "subscription($w: JSON) { liveTable(table: \"streams\", where: {a: $w}) { kind } }",
            "subscription($w: JSON, $w: JSON) { liveTable(table: \"streams\", where: $w) { kind } }",
            "subscription @deprecated { liveTable(table: \"streams\") { kind } }",
            "not graphql",
        ];
        for document in refused {
            assert_eq!(
                TablePlan::of(&payload(document, "{}", "")),
                None,
                "{document}"
            );
        }
        // The payload's other members.
        let plain = "subscription { liveTable(table: \"streams\") { kind } }";
        let named = "subscription S { liveTable(table: \"streams\") { kind } }";
        for (payload, planned) in [
            (json!({"query": plain}), true),
            (json!({"query": plain, "extensions": {}}), true),
            (json!({"query": named, "operationName": "S"}), true),
            (json!({"query": named}), true),
            (json!({"query": named, "operationName": "T"}), false),
            (json!({"query": plain, "operationName": "S"}), false),
            (
                json!({"query": plain, "extensions": {"persistedQuery": 1}}),
                false,
            ),
            (json!({"query": plain, "variables": [1]}), false),
            (json!({"query": plain, "other": 1}), false),
            (json!({"query": 3}), false),
            (json!("query"), false),
        ] {
            assert_eq!(TablePlan::of(&payload).is_some(), planned, "{payload}");
        }
    }

    #[tokio::test]
    async fn checks_that_fail_leave_the_subscription_to_async_graphql() {
        let state = state();
        let plan = |document: &str| TablePlan::of(&payload(document, "{}", "")).unwrap();
        let forbidden = format!(
            "subscription {{ liveTable(table: \"streams\", tenantId: \"{OTHER}\") {{ kind }} }}"
        );
        for document in [
            "subscription { liveTable(table: \"passwords\") { kind } }",
            "subscription { liveTable(table: \"streams\", where: [1]) { kind } }",
            "subscription { liveTable(table: \"streams\", tenantId: \"not-a-uuid\") { kind } }",
            forbidden.as_str(),
        ] {
            assert!(
                start(plan(document), &caller(), &state, "q".into()).is_none(),
                "{document}"
            );
        }
        let own = format!(
            "subscription {{ liveTable(table: \"streams\", tenantId: \"{TENANT}\") {{ kind }} }}"
        );
        assert!(start(plan(&own), &caller(), &state, "q".into()).is_some());
    }

    /// A subscription whose root field comes through a fragment is refused with an error (it
    /// ended at once with nothing); the same field written directly is served, and a query may
    /// still select through fragments.
    #[tokio::test]
    async fn a_subscription_through_a_root_fragment_is_refused_not_ended_silently() {
        let schema = crate::graphql::schema(state());
        let first = |document: &'static str| {
            let request = async_graphql::Request::new(document).data(caller());
            let mut responses = Box::pin(schema.execute_stream(request));
            async move {
                tokio::time::timeout(std::time::Duration::from_secs(5), responses.next())
                    .await
                    .expect("a first response")
            }
        };
        for document in [
            "subscription { ...F } fragment F on Subscription { liveTable(table: \"streams\") { kind } }",
            "subscription { ... on Subscription { liveTable(table: \"streams\") { kind } } }",
        ] {
            let response = first(document).await.expect("an answer, not an end");
            assert_eq!(response.errors.len(), 1, "{document}");
            assert!(
                response.errors[0]
                    .message
                    .contains("a fragment at its root is not served"),
                "{document}: {:?}",
                response.errors
            );
        }
        let direct = first("subscription { liveTable(table: \"streams\") { kind } }")
            .await
            .expect("a snapshot");
        assert!(direct.errors.is_empty(), "{:?}", direct.errors);
        let query = schema
            .execute(
                async_graphql::Request::new("query { ...Q } fragment Q on Query { __typename }")
                    .data(caller()),
            )
            .await;
        assert!(query.errors.is_empty(), "{:?}", query.errors);
    }
}
