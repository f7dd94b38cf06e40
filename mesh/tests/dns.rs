//! Mesh DNS on a real UDP socket: mesh names answered from the registry's identity, unknown
//! `.internal` names NXDOMAIN, other names relayed to an upstream resolver (a real socket
//! standing in for one), SERVFAIL without upstream, and junk ignored without harm.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use keel_mesh::dns::{Names, serve};
use tokio::net::UdpSocket;

async fn start(
    names: HashMap<String, Ipv4Addr>,
    upstream: Option<SocketAddr>,
) -> (SocketAddr, Names) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let address = socket.local_addr().unwrap();
    let names: Names = Arc::new(RwLock::new(names));
    tokio::spawn(serve(socket, names.clone(), upstream));
    (address, names)
}

async fn ask(server: SocketAddr, name: &str, kind: RecordType, id: u16) -> Message {
    let mut query = Message::new();
    query
        .set_id(id)
        .set_message_type(MessageType::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket
        .send_to(&query.to_vec().unwrap(), server)
        .await
        .unwrap();
    let mut buffer = vec![0u8; 4096];
    let (len, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buffer))
        .await
        .expect("an answer")
        .unwrap();
    let answer = Message::from_vec(&buffer[..len]).unwrap();
    assert_eq!(answer.id(), id);
    answer
}

fn addresses(message: &Message) -> Vec<Ipv4Addr> {
    message
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn mesh_names_resolve_others_are_forwarded_and_junk_is_ignored() {
    // An upstream resolver: answers every question with 192.0.2.53.
    let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let upstream_address = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buffer = vec![0u8; 4096];
        loop {
            let (len, from) = upstream.recv_from(&mut buffer).await.unwrap();
            let query = Message::from_vec(&buffer[..len]).unwrap();
            let mut answer = Message::new();
            answer
                .set_id(query.id())
                .set_message_type(MessageType::Response)
                .add_query(query.queries()[0].clone())
                .add_answer(hickory_proto::rr::Record::from_rdata(
                    query.queries()[0].name().clone(),
                    60,
                    RData::A(hickory_proto::rr::rdata::A(Ipv4Addr::new(192, 0, 2, 53))),
                ));
            upstream
                .send_to(&answer.to_vec().unwrap(), from)
                .await
                .unwrap();
        }
    });
    let names = HashMap::from([
        ("edge-1".to_owned(), Ipv4Addr::new(10, 88, 3, 4)),
        ("core".to_owned(), Ipv4Addr::new(10, 88, 0, 9)),
    ]);
    let (server, shared) = start(names, Some(upstream_address)).await;

    let answer = ask(server, "edge-1.internal.", RecordType::A, 1).await;
    assert_eq!(answer.response_code(), ResponseCode::NoError);
    assert!(answer.authoritative());
    assert_eq!(addresses(&answer), [Ipv4Addr::new(10, 88, 3, 4)]);
    assert_eq!(answer.answers()[0].ttl(), keel_mesh::dns::TTL);
    // Case does not matter.
    let answer = ask(server, "CORE.Internal.", RecordType::A, 2).await;
    assert_eq!(addresses(&answer), [Ipv4Addr::new(10, 88, 0, 9)]);
    // A known name has no AAAA: an empty answer, not NXDOMAIN.
    let answer = ask(server, "core.internal.", RecordType::AAAA, 3).await;
    assert_eq!(answer.response_code(), ResponseCode::NoError);
    assert!(answer.answers().is_empty());
    // Unknown mesh names do not exist.
    let answer = ask(server, "nobody.internal.", RecordType::A, 4).await;
    assert_eq!(answer.response_code(), ResponseCode::NXDomain);
    // Everything else goes upstream.
    let answer = ask(server, "example.com.", RecordType::A, 5).await;
    assert_eq!(addresses(&answer), [Ipv4Addr::new(192, 0, 2, 53)]);

    // Junk is ignored and the server keeps answering.
    let junk = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    junk.send_to(b"\x00\x01not dns", server).await.unwrap();
    let answer = ask(server, "edge-1.internal.", RecordType::A, 6).await;
    assert_eq!(addresses(&answer), [Ipv4Addr::new(10, 88, 3, 4)]);

    // A peer list change is seen at once: edge-1 revoked, edge-2 joined.
    {
        let mut names = shared.write().unwrap();
        names.remove("edge-1");
        names.insert("edge-2".into(), Ipv4Addr::new(10, 88, 7, 7));
    }
    let answer = ask(server, "edge-1.internal.", RecordType::A, 7).await;
    assert_eq!(answer.response_code(), ResponseCode::NXDomain);
    let answer = ask(server, "edge-2.internal.", RecordType::A, 8).await;
    assert_eq!(addresses(&answer), [Ipv4Addr::new(10, 88, 7, 7)]);

    // Without an upstream, other names get SERVFAIL.
    let (alone, _) = start(HashMap::new(), None).await;
    let answer = ask(alone, "example.com.", RecordType::A, 9).await;
    assert_eq!(answer.response_code(), ResponseCode::ServFail);
}
