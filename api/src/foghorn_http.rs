//! The Foghorn port's HTTP/1.1 server.
//!
//! Edges ask the balancer `GET /<stream>` for every viewer, so that one request is answered by a
//! connection loop of its own: requests are parsed in place from the connection's buffer
//! (`httparse`), routed from the parsed headers without building a header map, and every answer
//! to the requests already read (pipelining) goes out in one write. Every other request (`/?…`,
//! `/v1/foghorn/route`, other methods) is handed to the axum router of [`crate::foghorn`], so
//! both paths answer alike.
//!
//! Limits: a request head of at most 16 KiB and 64 headers (else 431), a body of at most 64 KiB
//! with a `Content-Length` (else 413; chunked bodies get 501); a connection has 60 s from its
//! start or its last answer for its next whole request (and for its answers to be taken), and
//! at most [`MAX_CONNECTIONS`] are open at once. HTTP/1.0 connections close after the answer unless they ask to be kept alive. A
//! stopping server accepts nothing more and closes each connection between requests, after
//! answering what it has read (waiting at most [`DRAIN`]).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::http::{StatusCode, Version, header};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

use crate::foghorn::{Foghorn, Headers, ViewAnswer, params_of_query, router, view_answer};

/// Largest request head (request line and headers).
const MAX_HEAD: usize = 16 * 1024;
/// Most headers in one request.
const MAX_HEADERS: usize = 64;
/// Largest request body (the balancer's requests have none; bodies are read and ignored).
const MAX_BODY: usize = 64 * 1024;
/// A connection whose next request has not arrived whole (or whose answers were not taken)
/// this long after its last answer (or its start) is closed — the time counts from there, not from the last byte, so a request sent
/// a byte a minute holds nothing for good.
const IDLE: Duration = Duration::from_secs(60);
/// The most connections the port holds open at once; further ones wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 4_096;
/// How long a stopping server waits for its connections to finish their requests.
pub const DRAIN: Duration = Duration::from_secs(5);
/// The content type of text answers and refusals.
const PLAIN: [(header::HeaderName, &str); 1] =
    [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];

impl Headers for [httparse::Header<'_>] {
    fn text(&self, name: &str) -> Option<&str> {
        self.iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    }
}

/// Serves `foghorn` on `listener` until `stop` completes.
///
/// On `stop` it accepts no more connections; each open one answers the requests it has read
/// (reading the rest of one it has begun) and closes, and `serve` returns once all have, or
/// after [`DRAIN`].
pub async fn serve(listener: TcpListener, foghorn: Arc<Foghorn>, stop: impl Future<Output = ()>) {
    serve_within(listener, foghorn, stop, MAX_CONNECTIONS, IDLE).await;
}

/// [`serve`] with at most `most` connections open, each given `idle` for its next request.
async fn serve_within(
    listener: TcpListener,
    foghorn: Arc<Foghorn>,
    stop: impl Future<Output = ()>,
    most: usize,
    idle: Duration,
) {
    let router = router(foghorn.clone());
    let (stopping, stopped) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            // Finished connections are reaped as they go, so the set holds only open ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            // At the cap, nothing is accepted until a connection ends.
            accepted = listener.accept(), if connections.len() < most => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    connections.spawn(connection(
                        stream,
                        peer,
                        idle,
                        foghorn.clone(),
                        router.clone(),
                        stopped.clone(),
                    ));
                }
                Err(error) => {
                    // Out of descriptors and the like: wait rather than spin.
                    tracing::warn!(%error, "the Foghorn port cannot accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    let _ = stopping.send(true);
    let drained = tokio::time::timeout(DRAIN, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            "Foghorn connections still busy at stop were closed"
        );
        connections.abort_all();
    }
}

/// What the parser made of the front of a connection's buffer.
enum Step<'h, 'b> {
    /// More bytes are needed.
    More,
    /// A complete request: its parsed head, which is `head` bytes, and a body of `body` bytes.
    Request {
        request: httparse::Request<'h, 'b>,
        head: usize,
        body: usize,
    },
    /// A request that cannot be served: answer and close.
    Refuse(StatusCode, String),
}

/// Parses the request at the front of `buf` (once: the answer reads the same parse).
fn step<'h, 'b>(buf: &'b [u8], headers: &'h mut [httparse::Header<'b>]) -> Step<'h, 'b> {
    let mut request = httparse::Request::new(headers);
    let head = match request.parse(buf) {
        Ok(httparse::Status::Complete(head)) if head <= MAX_HEAD => head,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return Step::More,
        Ok(_) | Err(httparse::Error::TooManyHeaders) => {
            return Step::Refuse(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                format!("request heads are limited to {MAX_HEAD} bytes and {MAX_HEADERS} headers"),
            );
        }
        Err(error) => {
            return Step::Refuse(
                StatusCode::BAD_REQUEST,
                format!("malformed request: {error}"),
            );
        }
    };
    let headers: &[httparse::Header<'_>] = request.headers;
    if headers.text("transfer-encoding").is_some() {
        return Step::Refuse(
            StatusCode::NOT_IMPLEMENTED,
            "request bodies must come with a Content-Length".to_owned(),
        );
    }
    let body = match headers.text("content-length").map(str::parse::<usize>) {
        None => 0,
        Some(Ok(length)) if length <= MAX_BODY => length,
        Some(Ok(_)) => {
            return Step::Refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request bodies are limited to {MAX_BODY} bytes"),
            );
        }
        Some(Err(_)) => {
            return Step::Refuse(
                StatusCode::BAD_REQUEST,
                "Content-Length is not a number".into(),
            );
        }
    };
    if buf.len() < head + body {
        return Step::More;
    }
    Step::Request {
        request,
        head,
        body,
    }
}

async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    idle: Duration,
    foghorn: Arc<Foghorn>,
    router: Router,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut out: Vec<u8> = Vec::with_capacity(1024);
    let mut due = tokio::time::Instant::now() + idle;
    loop {
        let mut read = 0;
        let mut close = false;
        // Answer every complete request already read, in order.
        loop {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            match step(&buf[read..], &mut headers) {
                Step::More => break,
                Step::Refuse(status, reason) => {
                    respond(&mut out, status, &PLAIN, reason.as_bytes(), false, false);
                    close = true;
                    break;
                }
                Step::Request {
                    request,
                    head,
                    body,
                } => {
                    let keep = answer(
                        &request,
                        &buf[read + head..read + head + body],
                        peer,
                        &foghorn,
                        &router,
                        &mut out,
                    )
                    .await;
                    read += head + body;
                    if !keep {
                        close = true;
                        break;
                    }
                }
            }
        }
        buf.drain(..read);
        if read > 0 {
            due = tokio::time::Instant::now() + idle;
        }
        if !out.is_empty() {
            // A client that stops reading holds its place no longer than it may wait.
            let written = tokio::time::timeout_at(due, stream.write_all(&out)).await;
            if !matches!(written, Ok(Ok(()))) {
                return;
            }
            out.clear();
        }
        // Stopping: close between requests, never in the middle of one.
        if close || (*stopped.borrow() && buf.is_empty()) {
            let _ = stream.shutdown().await;
            return;
        }
        buf.reserve(4096);
        tokio::select! {
            read = tokio::time::timeout_at(due, stream.read_buf(&mut buf)) => match read {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                Ok(Ok(_)) => {}
            },
            _ = stopped.changed() => {}
        }
    }
}

/// Answers `request` (with its `body`) into `out`; false when the connection is to close
/// after it.
async fn answer(
    request: &httparse::Request<'_, '_>,
    body: &[u8],
    peer: SocketAddr,
    foghorn: &Foghorn,
    router: &Router,
    out: &mut Vec<u8>,
) -> bool {
    let method = request.method.unwrap_or("GET");
    let target = request.path.unwrap_or("/");
    let http10 = request.version == Some(0);
    let headers: &[httparse::Header<'_>] = request.headers;
    let connection = headers.text("connection").unwrap_or("");
    let has = |token: &str| {
        connection
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    let keep = if http10 {
        has("keep-alive")
    } else {
        !has("close")
    };
    let head_only = method == "HEAD";
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let segment = path
        .strip_prefix('/')
        .filter(|s| !s.is_empty() && !s.contains('/'));
    if let (Some(segment), "GET" | "HEAD") = (segment, method) {
        let answer = match decode_segment(segment) {
            Some(stream) => view_answer(
                foghorn,
                &stream,
                &params_of_query(query),
                headers,
                Some(peer.ip()),
                head_only,
            ),
            None => ViewAnswer::BadRequest("the stream name is not valid UTF-8".to_owned()),
        };
        let (status, location, body) = match &answer {
            ViewAnswer::Host(host) => (StatusCode::OK, None, host),
            ViewAnswer::Redirect(location) => {
                (StatusCode::TEMPORARY_REDIRECT, Some(location), location)
            }
            ViewAnswer::BadRequest(reason) => (StatusCode::BAD_REQUEST, None, reason),
        };
        match location {
            Some(location) => {
                let headers = [PLAIN[0].clone(), (header::LOCATION, location.as_str())];
                respond(out, status, &headers, body.as_bytes(), keep, head_only);
            }
            None => respond(out, status, &PLAIN, body.as_bytes(), keep, head_only),
        }
        return keep;
    }
    // Everything else goes through the router, as a request of its own.
    let mut builder = axum::http::Request::builder()
        .method(method)
        .uri(target)
        .version(if http10 {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        });
    for h in headers {
        builder = builder.header(h.name, h.value);
    }
    let mut request = match builder.body(Body::from(body.to_vec())) {
        Ok(request) => request,
        Err(error) => {
            let reason = format!("malformed request: {error}");
            respond(
                out,
                StatusCode::BAD_REQUEST,
                &PLAIN,
                reason.as_bytes(),
                false,
                false,
            );
            return false;
        }
    };
    request
        .extensions_mut()
        .insert(axum::extract::ConnectInfo(peer));
    let response = match router.clone().oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let headers: Vec<(header::HeaderName, &str)> = parts
        .headers
        .iter()
        .filter(|(name, _)| {
            !matches!(
                *name,
                &header::CONTENT_LENGTH
                    | &header::TRANSFER_ENCODING
                    | &header::CONNECTION
                    | &header::DATE
            )
        })
        .filter_map(|(name, value)| Some((name.clone(), value.to_str().ok()?)))
        .collect();
    respond(out, parts.status, &headers, &body, keep, head_only);
    keep
}

/// Decodes a percent-encoded path segment (an invalid escape stays as written); `None` when the
/// result is not UTF-8.
fn decode_segment(segment: &str) -> Option<String> {
    if !segment.contains('%') {
        return Some(segment.to_owned());
    }
    let bytes = segment.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(&hi), Some(&lo)) = (bytes.get(i + 1), bytes.get(i + 2))
            && let (Some(hi), Some(lo)) = (hex(hi), hex(lo))
        {
            decoded.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(decoded).ok()
}

/// Appends a response to `out`.
fn respond(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &[(header::HeaderName, &str)],
    body: &[u8],
    keep: bool,
    head_only: bool,
) {
    use std::io::Write as _;
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let _ = write!(out, "content-length: {}\r\ndate: ", body.len());
    date_into(out);
    out.extend_from_slice(if keep {
        b"\r\n\r\n"
    } else {
        b"\r\nconnection: close\r\n\r\n"
    });
    if !head_only {
        out.extend_from_slice(body);
    }
}

/// Appends the `Date` header's value, formatted once a second per thread.
fn date_into(out: &mut Vec<u8>) {
    thread_local! {
        static DATE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.0 != second || cell.1.is_empty() {
            *cell = (second, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(cell.1.as_bytes());
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_dataflows::foghorn::FleetCell;
    use keel_sources::memory::Injector;
    use std::io::{Read, Write};

    use crate::foghorn::FoghornStats;

    /// A server on a loopback port with an empty fleet (every viewer gets the fallback).
    struct Server {
        address: SocketAddr,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Server {
        /// Tells the server to stop, without waiting.
        fn signal(&mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
        }

        /// Stops the server and waits until `serve` has returned.
        fn stop(mut self) {
            self.signal();
            if let Some(thread) = self.thread.take() {
                thread.join().expect("the server thread");
            }
        }
    }

    fn server() -> Server {
        server_within(MAX_CONNECTIONS, IDLE)
    }

    fn server_within(most: usize, idle: Duration) -> Server {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        listener.set_nonblocking(true).expect("non-blocking");
        let address = listener.local_addr().expect("an address");
        let foghorn = Arc::new(Foghorn::new(
            Arc::new(FleetCell::default()),
            Injector::new("test"),
            Arc::new(FoghornStats::default()),
        ));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).expect("a tokio listener");
                serve_within(
                    listener,
                    foghorn,
                    async {
                        let _ = stopped.await;
                    },
                    most,
                    idle,
                )
                .await;
            });
        });
        Server {
            address,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Sends `chunks` (pausing between them) and reads until the server closes or `timeout`.
    fn exchange(address: SocketAddr, chunks: &[&[u8]]) -> String {
        let mut client = std::net::TcpStream::connect(address).expect("connects");
        client
            .set_read_timeout(Some(Duration::from_millis(800)))
            .expect("a timeout");
        for chunk in chunks {
            client.write_all(chunk).expect("writes");
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut received = Vec::new();
        let mut piece = [0u8; 4096];
        loop {
            match client.read(&mut piece) {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&piece[..n]),
            }
        }
        String::from_utf8(received).expect("text")
    }

    /// A request sent a byte at a time is closed once its time from the connection's start is
    /// up (the wait counted from the last byte let it hold on for good), and at the cap a new
    /// connection is served once an open one ends.
    #[test]
    fn a_trickled_request_is_closed_in_time_and_connections_are_capped() {
        let server = server_within(1, Duration::from_millis(600));
        let started = std::time::Instant::now();
        let mut slow = std::net::TcpStream::connect(server.address).expect("connects");
        slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // The second connection waits for the first's place.
        let waiting = std::thread::spawn(move || {
            let address = server.address;
            let answer = exchange(
                address,
                &[b"GET /demo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"],
            );
            (answer, started.elapsed(), server)
        });
        let mut closed = false;
        for byte in b"GET /demo HTTP/1.1\r\nHost: x".iter().cycle().take(40) {
            if slow.write_all(&[*byte]).is_err() {
                closed = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut rest = Vec::new();
        let ended = closed || matches!(slow.read_to_end(&mut rest), Ok(_) | Err(_));
        assert!(ended);
        assert!(
            started.elapsed() < Duration::from_millis(3500),
            "the trickle was cut off in time: {:?}",
            started.elapsed()
        );
        let (answer, elapsed, server) = waiting.join().unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            elapsed >= Duration::from_millis(500),
            "it waited for a place: {elapsed:?}"
        );
        server.stop();
    }

    fn statuses(text: &str) -> Vec<&str> {
        text.split("HTTP/1.1 ")
            .skip(1)
            .map(|r| r.split("\r\n").next().unwrap_or(""))
            .collect()
    }

    #[test]
    fn pipelined_requests_are_answered_in_order_by_both_paths() {
        let server = server();
        let address = server.address;
        let text = exchange(
            address,
            &[b"GET /demo?fallback=edge.example HTTP/1.1\r\nHost: x\r\n\r\nGET /?lstserver=1 HTTP/1.1\r\nHost: x\r\n\r\nGET /other HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"],
        );
        assert_eq!(statuses(&text), ["200 OK", "200 OK", "200 OK"], "{text}");
        let bodies: Vec<&str> = text
            .split("\r\n\r\n")
            .skip(1)
            .map(|b| b.split("HTTP/1.1").next().unwrap_or(""))
            .collect();
        assert_eq!(bodies, ["edge.example", "{}", "localhost"], "{text}");
        assert!(text.contains("content-type: application/json"), "{text}");
        assert!(
            text.ends_with("localhost"),
            "closed after the last answer: {text}"
        );
        server.stop();
    }

    #[test]
    fn a_request_split_over_many_writes_is_answered_once_whole() {
        let server = server();
        let address = server.address;
        let request = b"GET /caf%C3%A9?proto=hls HTTP/1.1\r\nX-Latitude: 1\r\nX-Longitude: 2\r\nConnection: close\r\n\r\n";
        let chunks: Vec<&[u8]> = request.chunks(7).collect();
        let text = exchange(address, &chunks);
        assert_eq!(statuses(&text), ["200 OK"], "{text}");
        assert!(text.ends_with("\r\n\r\nlocalhost"), "{text}");
        server.stop();
    }

    #[test]
    fn http_1_0_closes_unless_kept_alive_and_head_has_no_body() {
        let server = server();
        let address = server.address;
        let text = exchange(
            address,
            &[b"GET /demo HTTP/1.0\r\n\r\nGET /demo HTTP/1.0\r\n\r\n"],
        );
        assert_eq!(
            statuses(&text),
            ["200 OK"],
            "one answer, then closed: {text}"
        );
        assert!(text.contains("connection: close"), "{text}");
        let text = exchange(
            address,
            &[b"HEAD /demo HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /demo HTTP/1.1\r\nConnection: close\r\n\r\n"],
        );
        assert_eq!(statuses(&text), ["200 OK", "200 OK"], "{text}");
        assert!(text.contains("content-length: 9\r\n"), "{text}");
        assert_eq!(
            text.matches("localhost").count(),
            1,
            "HEAD sends no body: {text}"
        );
        server.stop();
    }

    #[test]
    fn bad_requests_get_their_reason_and_the_server_keeps_serving() {
        let server = server();
        let address = server.address;
        let malformed = exchange(address, &[b"GET /demo HTTP/1.1\r\nBad Header\r\n\r\n"]);
        assert_eq!(statuses(&malformed), ["400 Bad Request"], "{malformed}");
        assert!(malformed.contains("malformed request"), "{malformed}");
        let huge = format!(
            "GET /demo HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(MAX_HEAD)
        );
        let too_big = exchange(address, &[huge.as_bytes()]);
        assert_eq!(
            statuses(&too_big),
            ["431 Request Header Fields Too Large"],
            "{too_big}"
        );
        let chunked = exchange(
            address,
            &[b"POST /demo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"],
        );
        assert_eq!(statuses(&chunked), ["501 Not Implemented"], "{chunked}");
        let bad_coordinates = exchange(
            address,
            &[b"GET /demo?lat=north&lon=2 HTTP/1.1\r\nConnection: close\r\n\r\n"],
        );
        assert_eq!(
            statuses(&bad_coordinates),
            ["400 Bad Request"],
            "{bad_coordinates}"
        );
        assert!(
            bad_coordinates.contains("latitude \"north\" is not a number"),
            "{bad_coordinates}"
        );
        // A body with a length is read past, and the next request on the connection answered.
        let with_body = exchange(
            address,
            &[b"POST /demo HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /demo HTTP/1.1\r\nConnection: close\r\n\r\n"],
        );
        assert_eq!(
            statuses(&with_body),
            ["405 Method Not Allowed", "200 OK"],
            "{with_body}"
        );
        let fine = exchange(
            address,
            &[b"GET /demo HTTP/1.1\r\nConnection: close\r\n\r\n"],
        );
        assert_eq!(statuses(&fine), ["200 OK"], "{fine}");
        server.stop();
    }

    #[test]
    fn a_stop_lets_a_begun_request_finish_and_closes_idle_connections() {
        let mut server = server();
        let address = server.address;
        let mut idle = std::net::TcpStream::connect(address).expect("connects");
        let mut begun = std::net::TcpStream::connect(address).expect("connects");
        begun
            .write_all(b"GET /demo HTTP/1.1\r\nX-Lat")
            .expect("writes");
        std::thread::sleep(Duration::from_millis(100));
        server.signal();
        std::thread::sleep(Duration::from_millis(100));
        begun
            .write_all(b"itude: 1\r\nX-Longitude: 2\r\n\r\n")
            .expect("still open");
        let mut answer = String::new();
        begun
            .read_to_string(&mut answer)
            .expect("answered, then closed");
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.ends_with("localhost"), "{answer}");
        let mut rest = Vec::new();
        idle.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("a timeout");
        assert_eq!(
            idle.read_to_end(&mut rest).expect("closed"),
            0,
            "nothing sent"
        );
        // Returns once serve has: both connections were done.
        server.stop();
        assert!(
            std::net::TcpStream::connect(address).is_err(),
            "no longer listening"
        );
    }

    #[test]
    fn segments_decode_like_the_router_does() {
        assert_eq!(decode_segment("plain").as_deref(), Some("plain"));
        assert_eq!(decode_segment("caf%C3%A9").as_deref(), Some("café"));
        assert_eq!(decode_segment("a%2Fb").as_deref(), Some("a/b"));
        assert_eq!(decode_segment("100%").as_deref(), Some("100%"));
        assert_eq!(decode_segment("%zz").as_deref(), Some("%zz"));
        assert_eq!(decode_segment("%FF"), None);
    }
}
