//! Mesh DNS: a resolver on loopback that answers `<node>.internal` with the node's mesh
//! address, NXDOMAIN for any other `.internal` name, and forwards every other question to the
//! upstream resolver (SERVFAIL when there is none or it does not answer).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;

/// The zone the mesh answers for.
pub const ZONE: &str = "internal";

/// Seconds a mesh answer may be cached: short, so a re-joined or revoked node is seen soon.
pub const TTL: u32 = 30;

/// How long the upstream resolver has to answer.
const UPSTREAM_WAIT: Duration = Duration::from_secs(2);

/// The names the resolver knows: node name → mesh address, replaced whenever peers change.
pub type Names = Arc<RwLock<HashMap<String, Ipv4Addr>>>;

/// The names of a node and its peers, from its identity.
pub fn names_of(identity: &crate::registry::Identity) -> HashMap<String, Ipv4Addr> {
    let mut names = HashMap::new();
    names.insert(identity.node.name.clone(), identity.node.address);
    for peer in &identity.peers {
        if let Some(address) = peer
            .allowed_ips
            .first()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
        {
            names.insert(peer.name.clone(), address);
        }
    }
    names
}

/// What to do with a question.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Send this reply.
    Reply(Vec<u8>),
    /// Not ours: ask upstream.
    Forward,
    /// Not a DNS message at all: say nothing.
    Ignore,
}

fn reply(query: &Message, code: ResponseCode, answers: Vec<Record>) -> Answer {
    let mut message = Message::new();
    message
        .set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_authoritative(code != ResponseCode::FormErr)
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(code);
    for question in query.queries() {
        message.add_query(question.clone());
    }
    for answer in answers {
        message.add_answer(answer);
    }
    message.to_vec().map_or(Answer::Ignore, Answer::Reply)
}

/// The answer to the datagram `query` from `names`.
pub fn answer(query: &[u8], names: &HashMap<String, Ipv4Addr>) -> Answer {
    let Ok(message) = Message::from_vec(query) else {
        return Answer::Ignore;
    };
    if message.message_type() != MessageType::Query {
        return Answer::Ignore;
    }
    let [question] = message.queries() else {
        return reply(&message, ResponseCode::FormErr, Vec::new());
    };
    let name = question.name().to_lowercase().to_string();
    let name = name.trim_end_matches('.');
    let Some(label) = name
        .strip_suffix(ZONE)
        .and_then(|rest| rest.strip_suffix('.'))
        .or_else(|| (name == ZONE).then_some(""))
    else {
        return Answer::Forward;
    };
    match names.get(label) {
        Some(&address) if question.query_type() == RecordType::A => reply(
            &message,
            ResponseCode::NoError,
            vec![Record::from_rdata(
                question.name().clone(),
                TTL,
                RData::A(A(address)),
            )],
        ),
        // The name exists but has no record of that type.
        Some(_) => reply(&message, ResponseCode::NoError, Vec::new()),
        None => reply(&message, ResponseCode::NXDomain, Vec::new()),
    }
}

/// Asks `upstream` the raw `query`; its raw reply.
async fn forward(query: &[u8], upstream: SocketAddr) -> Option<Vec<u8>> {
    let bind = if upstream.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = UdpSocket::bind(bind).await.ok()?;
    socket.send_to(query, upstream).await.ok()?;
    let mut buffer = vec![0u8; 4096];
    let (len, _) = tokio::time::timeout(UPSTREAM_WAIT, socket.recv_from(&mut buffer))
        .await
        .ok()?
        .ok()?;
    buffer.truncate(len);
    Some(buffer)
}

/// Serves DNS on `socket` until it fails: mesh names from `names`, the rest from `upstream`.
/// Each forwarded question is answered on a task of its own, so a slow upstream holds up
/// nobody else.
pub async fn serve(
    socket: UdpSocket,
    names: Names,
    upstream: Option<SocketAddr>,
) -> std::io::Result<()> {
    let socket = Arc::new(socket);
    let mut buffer = vec![0u8; 4096];
    loop {
        let (len, from) = socket.recv_from(&mut buffer).await?;
        let query = buffer[..len].to_vec();
        let decided = answer(&query, &names.read().expect("names"));
        match decided {
            Answer::Reply(bytes) => {
                let _ = socket.send_to(&bytes, from).await;
            }
            Answer::Ignore => {}
            Answer::Forward => {
                let socket = socket.clone();
                tokio::spawn(async move {
                    let relayed = match upstream {
                        Some(upstream) => forward(&query, upstream).await,
                        None => None,
                    };
                    let bytes = match relayed {
                        Some(bytes) => Some(bytes),
                        None => Message::from_vec(&query).ok().and_then(|m| {
                            match reply(&m, ResponseCode::ServFail, Vec::new()) {
                                Answer::Reply(bytes) => Some(bytes),
                                _ => None,
                            }
                        }),
                    };
                    if let Some(bytes) = bytes {
                        let _ = socket.send_to(&bytes, from).await;
                    }
                });
            }
        }
    }
}
