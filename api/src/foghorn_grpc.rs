//! gRPC `keel.foghorn.v1.Foghorn/Route` (contract: `api/proto/foghorn.proto`).
//!
//! The messages are declared here with the proto's field numbers (no code generation, so
//! building Keel needs no `protoc`); a test pins their encoding byte for byte. The service
//! answers from the same [`Foghorn`] as the HTTP surface and records the same decisions.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use keel_dataflows::foghorn::score::known;
use keel_dataflows::foghorn::{Place, Purpose, Request, Routed, TagAdjust};
use keel_sources::codec::internal_name;
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::{Status, transport::Channel};
use tonic_prost::ProstCodec;
use uuid::Uuid;

use crate::foghorn::{Asker, Foghorn, MAX_CANDIDATES, host_of};

/// The service's full name.
pub const SERVICE: &str = "keel.foghorn.v1.Foghorn";
/// The route method's path.
pub const ROUTE_PATH: &str = "/keel.foghorn.v1.Foghorn/Route";

/// `RouteRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RouteRequest {
    /// Stream (prefix optional); empty for none.
    #[prost(string, tag = "1")]
    pub stream: String,
    /// Client latitude.
    #[prost(double, optional, tag = "2")]
    pub latitude: Option<f64>,
    /// Client longitude.
    #[prost(double, optional, tag = "3")]
    pub longitude: Option<f64>,
    /// Candidates wanted (0 means 1).
    #[prost(uint32, tag = "4")]
    pub n: u32,
    /// `view` (default), `source` or `ingest`.
    #[prost(string, tag = "5")]
    pub purpose: String,
    /// Ingest: CPU percentage the new ingest adds.
    #[prost(double, tag = "6")]
    pub ingest_cpu: f64,
    /// Tag adjustments.
    #[prost(map = "string, sint64", tag = "7")]
    pub tag_adjust: HashMap<String, i64>,
    /// Required capability.
    #[prost(string, tag = "8")]
    pub capability: String,
    /// Tenant to attribute a failed decision to.
    #[prost(string, tag = "9")]
    pub tenant_id: String,
    /// Client country code.
    #[prost(string, tag = "10")]
    pub client_country: String,
    /// Client address, to place the client with the GeoIP database when no coordinates are
    /// given (used for the look-up only).
    #[prost(string, tag = "11")]
    pub client_ip: String,
}

/// `ScoreBreakdown`.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct ScoreBreakdown {
    /// CPU term.
    #[prost(uint64, tag = "1")]
    pub cpu: u64,
    /// RAM term.
    #[prost(uint64, tag = "2")]
    pub ram: u64,
    /// Bandwidth term.
    #[prost(uint64, tag = "3")]
    pub bw: u64,
    /// Distance term.
    #[prost(uint64, tag = "4")]
    pub geo: u64,
    /// Stream bonus.
    #[prost(uint64, tag = "5")]
    pub bonus: u64,
    /// Tag adjustments applied.
    #[prost(sint64, tag = "6")]
    pub tags: i64,
}

/// `Candidate`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Candidate {
    /// Node id.
    #[prost(string, tag = "1")]
    pub node_id: String,
    /// Host name.
    #[prost(string, tag = "2")]
    pub host: String,
    /// Base URL.
    #[prost(string, tag = "3")]
    pub base_url: String,
    /// Score.
    #[prost(uint64, tag = "4")]
    pub score: u64,
    /// Its terms.
    #[prost(message, optional, tag = "5")]
    pub breakdown: Option<ScoreBreakdown>,
    /// Distance to the client, km.
    #[prost(double, optional, tag = "6")]
    pub distance_km: Option<f64>,
    /// Pending virtual viewers on the node.
    #[prost(uint64, tag = "7")]
    pub pending_viewers: u64,
    /// Their bandwidth, bytes/s.
    #[prost(uint64, tag = "8")]
    pub add_bandwidth: u64,
}

/// `RouteResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RouteResponse {
    /// Best first.
    #[prost(message, repeated, tag = "1")]
    pub candidates: Vec<Candidate>,
    /// The opt-in cutoff excluded everyone and the gradient decided.
    #[prost(bool, tag = "2")]
    pub cutoff_fallback: bool,
}

fn to_request(message: &RouteRequest) -> Result<Request, Status> {
    let purpose = match message.purpose.as_str() {
        "" | "view" => Purpose::View,
        "source" => Purpose::Source,
        "ingest"
            if message.ingest_cpu.is_finite() && (0.0..=100.0).contains(&message.ingest_cpu) =>
        {
            Purpose::Ingest(message.ingest_cpu)
        }
        "ingest" => {
            return Err(Status::invalid_argument(
                "ingest_cpu must be a percentage from 0 to 100",
            ));
        }
        other => {
            return Err(Status::invalid_argument(format!(
                "purpose {other:?} is not view, source or ingest"
            )));
        }
    };
    let stream = internal_name(&message.stream);
    if purpose == Purpose::Source && stream.is_empty() {
        return Err(Status::invalid_argument("purpose source needs a stream"));
    }
    let client = match (message.latitude, message.longitude) {
        (Some(lat), Some(lon)) => Some(Place::new(lat, lon).map_err(Status::invalid_argument)?),
        (None, None) => None,
        _ => {
            return Err(Status::invalid_argument(
                "latitude and longitude must be given together",
            ));
        }
    };
    keel_dataflows::foghorn::score::check_tag_count(message.tag_adjust.len())
        .map_err(Status::invalid_argument)?;
    let tags = message
        .tag_adjust
        .iter()
        .map(|(key, &adjust)| TagAdjust::new(key, adjust))
        .collect::<Result<Vec<_>, _>>()
        .map_err(Status::invalid_argument)?;
    Ok(Request {
        stream: (!stream.is_empty()).then(|| known(stream)),
        purpose,
        client,
        tags,
        capability: (!message.capability.is_empty())
            .then(|| known(&message.capability.to_ascii_lowercase())),
    })
}

fn to_response(routed: &Routed, client: Option<Place>) -> RouteResponse {
    RouteResponse {
        candidates: routed
            .candidates
            .iter()
            .map(|c| Candidate {
                node_id: c.node.node.as_str().to_owned(),
                host: c.node.host_name().to_owned(),
                base_url: c.node.host.as_str().to_owned(),
                score: c.score.total,
                breakdown: Some(ScoreBreakdown {
                    cpu: c.score.cpu,
                    ram: c.score.ram,
                    bw: c.score.bw,
                    geo: c.score.geo,
                    bonus: c.score.bonus,
                    tags: c.score.tags,
                }),
                distance_km: client.zip(c.node.place()).map(|(a, b)| a.distance_km(b)),
                pending_viewers: c.node.pending_viewers,
                add_bandwidth: c.node.add_bandwidth,
            })
            .collect(),
        cutoff_fallback: routed.cutoff_fallback,
    }
}

/// Answers one `Route` call.
pub fn route(foghorn: &Foghorn, message: &RouteRequest) -> Result<RouteResponse, Status> {
    let mut request = to_request(message)?;
    if request.client.is_none()
        && let Ok(ip) = message.client_ip.trim().parse()
    {
        request.client = foghorn.place_of(ip);
    }
    let n = match message.n {
        0 => 1,
        n if n as usize <= MAX_CANDIDATES => n as usize,
        n => {
            return Err(Status::invalid_argument(format!(
                "n = {n}: at most {MAX_CANDIDATES} candidates"
            )));
        }
    };
    let asker = Asker {
        country: crate::foghorn::country_code(&message.client_country),
        tenant: Uuid::parse_str(&message.tenant_id).ok(),
        source: "grpc",
        details: String::new(),
        probe: false,
        client: None,
    };
    foghorn
        .decide(&request, n, &asker, host_of)
        .map(|routed| to_response(&routed, request.client))
        .map_err(|reason| Status::unavailable(reason.message()))
}

/// The tonic service.
#[derive(Clone, Debug)]
pub struct FoghornGrpc {
    foghorn: Arc<Foghorn>,
}

impl FoghornGrpc {
    /// A service answering from `foghorn`.
    pub fn new(foghorn: Arc<Foghorn>) -> Self {
        FoghornGrpc { foghorn }
    }
}

impl NamedService for FoghornGrpc {
    const NAME: &'static str = SERVICE;
}

struct RouteCall(Arc<Foghorn>);

impl UnaryService<RouteRequest> for RouteCall {
    type Response = RouteResponse;
    type Future = std::future::Ready<Result<tonic::Response<RouteResponse>, Status>>;

    fn call(&mut self, request: tonic::Request<RouteRequest>) -> Self::Future {
        std::future::ready(route(&self.0, request.get_ref()).map(tonic::Response::new))
    }
}

impl<B> Service<http::Request<B>> for FoghornGrpc
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
        if request.uri().path() == ROUTE_PATH {
            let call = RouteCall(self.foghorn.clone());
            Box::pin(async move {
                let mut grpc = Grpc::new(ProstCodec::<RouteResponse, RouteRequest>::default());
                Ok(grpc.unary(call, request).await)
            })
        } else {
            let path = request.uri().path().to_owned();
            Box::pin(async move {
                Ok(
                    Status::unimplemented(format!("no method {path} (only {ROUTE_PATH})"))
                        .into_http(),
                )
            })
        }
    }
}

/// The most connections the gRPC port holds open at once; further ones wait in the kernel's
/// backlog until one closes.
pub const MAX_CONNECTIONS: usize = 4_096;

/// An accepted connection, holding its place among the open ones until it is dropped.
struct Held {
    stream: tokio::net::TcpStream,
    _place: tokio::sync::OwnedSemaphorePermit,
}

impl tokio::io::AsyncRead for Held {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Held {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Held {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

/// Serves the service on `listener` until the runtime stops.
pub async fn serve(listener: tokio::net::TcpListener, foghorn: Arc<Foghorn>) {
    serve_within(listener, foghorn, MAX_CONNECTIONS).await;
}

/// [`serve`] holding at most `most` connections open.
async fn serve_within(listener: tokio::net::TcpListener, foghorn: Arc<Foghorn>, most: usize) {
    let places = Arc::new(tokio::sync::Semaphore::new(most));
    let incoming =
        futures_util::stream::unfold((listener, places), |(listener, places)| async move {
            let place = places.clone().acquire_owned().await.ok()?;
            let accepted = listener.accept().await.map(|(stream, _)| Held {
                stream,
                _place: place,
            });
            Some((accepted, (listener, places)))
        });
    // Bounds per connection, and pings that end a connection whose peer went away.
    let served = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(64)
        .max_concurrent_streams(Some(64))
        .timeout(std::time::Duration::from_secs(30))
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .add_service(FoghornGrpc::new(foghorn))
        .serve_with_incoming(incoming)
        .await;
    if let Err(error) = served {
        tracing::error!(%error, "Foghorn gRPC stopped");
    }
}

/// A client call, for tools and tests: `Route` at `url` (`http://host:port`).
pub async fn call_route(url: &str, request: RouteRequest) -> Result<RouteResponse, Status> {
    let channel = Channel::from_shared(url.to_owned())
        .map_err(|e| Status::invalid_argument(format!("bad URL {url:?}: {e}")))?
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("cannot connect to {url}: {e}")))?;
    let mut client = tonic::client::Grpc::new(channel);
    client
        .ready()
        .await
        .map_err(|e| Status::unavailable(format!("{url} is not ready: {e}")))?;
    let path = http::uri::PathAndQuery::from_static(ROUTE_PATH);
    client
        .unary(
            tonic::Request::new(request),
            path,
            ProstCodec::<RouteRequest, RouteResponse>::default(),
        )
        .await
        .map(tonic::Response::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// At the cap, a new connection is served only once an open one closes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_are_capped() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let foghorn = Arc::new(Foghorn::new(
            Arc::new(keel_dataflows::foghorn::FleetCell::default()),
            keel_sources::memory::Injector::new("test"),
            Arc::default(),
        ));
        tokio::spawn(serve_within(listener, foghorn, 1));
        let url = format!("http://{address}");
        let call = || {
            tokio::time::timeout(
                std::time::Duration::from_secs(2),
                call_route(&url, RouteRequest::default()),
            )
        };
        // Served: an answer of the service's own (no node), not a transport failure.
        let answered = |result: Result<RouteResponse, Status>| match result {
            Ok(_) => true,
            Err(status) => {
                !status.message().contains("cannot connect")
                    && !status.message().contains("is not ready")
            }
        };
        assert!(answered(
            call().await.expect("served while a place is free")
        ));
        let holder = tokio::net::TcpStream::connect(address).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(
            call().await.is_err(),
            "a second connection was served at the cap"
        );
        drop(holder);
        assert!(answered(
            call().await.expect("served once the place is free")
        ));
    }

    /// Field numbers and wire types as the proto declares them, checked against bytes written
    /// by hand from the protobuf encoding rules.
    #[test]
    fn wire_encoding_is_pinned() {
        let request = RouteRequest {
            stream: "ab".into(),
            latitude: Some(1.0),
            n: 3,
            tag_adjust: HashMap::from([("x".to_owned(), -1)]),
            ..RouteRequest::default()
        };
        let mut want = vec![0x0a, 2, b'a', b'b']; // 1: string "ab"
        want.push(0x11); // 2: fixed64 double
        want.extend_from_slice(&1.0f64.to_le_bytes());
        want.extend_from_slice(&[0x20, 3]); // 4: varint 3
        // 7: map entry {1: "x", 2: sint64 -1 (zigzag 1)}
        want.extend_from_slice(&[0x3a, 5, 0x0a, 1, b'x', 0x10, 1]);
        assert_eq!(request.encode_to_vec(), want);
        let response = RouteResponse {
            candidates: vec![Candidate {
                node_id: "n".into(),
                score: 300,
                breakdown: Some(ScoreBreakdown {
                    tags: -2,
                    ..ScoreBreakdown::default()
                }),
                ..Candidate::default()
            }],
            cutoff_fallback: true,
        };
        // candidate: {1: "n", 4: varint 300, 5: {6: zigzag(-2) = 3}}
        let candidate = [0x0a, 1, b'n', 0x20, 0xac, 0x02, 0x2a, 2, 0x30, 3];
        let mut want = vec![0x0a, candidate.len() as u8];
        want.extend_from_slice(&candidate);
        want.extend_from_slice(&[0x10, 1]);
        assert_eq!(response.encode_to_vec(), want);
        assert_eq!(RouteResponse::decode(&want[..]).unwrap(), response);
    }

    #[test]
    fn bad_requests_are_invalid_arguments() {
        for bad in [
            RouteRequest {
                purpose: "teleport".into(),
                ..RouteRequest::default()
            },
            RouteRequest {
                purpose: "source".into(),
                ..RouteRequest::default()
            },
            RouteRequest {
                latitude: Some(95.0),
                longitude: Some(0.0),
                ..RouteRequest::default()
            },
            RouteRequest {
                latitude: Some(5.0),
                ..RouteRequest::default()
            },
            RouteRequest {
                tag_adjust: HashMap::from([(",".to_owned(), 1)]),
                ..RouteRequest::default()
            },
        ] {
            let status = to_request(&bad).expect_err("refused");
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
    }
}
