//! The API's listener: a bound on open connections, and a deadline for each request header.
//!
//! Without them, connections that send half a request header and then nothing stayed open for
//! good: twenty thousand of them took every file descriptor the process had (the API, Foghorn
//! and the PostgreSQL port stopped answering, and the engine could not open files). Now at most
//! [`MAX_CONNECTIONS`] are open at once (further ones wait in the kernel's backlog until one
//! closes), and a connection whose first request header has not ended within
//! [`FIRST_REQUEST`] is closed — and so is one that answered a request and has not sent the
//! next header within the same time (4,096 connections that each sent one request and then
//! idled took every place). While a request is served the connection has no deadline, and once
//! it switched protocols (`101`, a WebSocket) none at all: WebSocket clients are quiet for
//! minutes. A request's body has its own deadline, in the router (`server::body_in_time`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::serve::Listener;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The most connections the API holds open at once.
pub const MAX_CONNECTIONS: usize = 4_096;

/// How long a new connection may take to send its first request header, and an answered one
/// its next.
pub const FIRST_REQUEST: Duration = Duration::from_secs(30);

/// A listener that holds at most so many connections open and closes those whose first
/// request header does not arrive in time.
#[derive(Debug)]
pub struct Capped<L> {
    inner: L,
    open: Arc<Semaphore>,
    first_request: Duration,
}

impl<L> Capped<L> {
    /// `inner`, holding at most `connections` open, each given `first_request` for its first
    /// request header.
    pub fn new(inner: L, connections: usize, first_request: Duration) -> Self {
        Capped {
            inner,
            open: Arc::new(Semaphore::new(connections)),
            first_request,
        }
    }
}

impl<L> Listener for Capped<L>
where
    L: Listener,
    L::Io: Unpin,
{
    type Io = Counted<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let permit = self
            .open
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (io, address) = self.inner.accept().await;
        let connection = Counted {
            io,
            _permit: permit,
            waiting: Some(Box::pin(tokio::time::sleep(self.first_request))),
            tail: [0; 3],
            wait: self.first_request,
            upgraded: false,
        };
        (connection, address)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// An accepted connection: it holds its place among the open ones until it is dropped.
#[derive(Debug)]
pub struct Counted<T> {
    io: T,
    _permit: OwnedSemaphorePermit,
    /// The deadline for the end of the next request header, until it is seen.
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The last bytes read, for a header end split across reads.
    tail: [u8; 3],
    /// How long a request header may take.
    wait: Duration,
    /// Switched to another protocol: no more request headers to wait for.
    upgraded: bool,
}

impl<T> Counted<T> {
    /// After the server wrote `written`: an answer (or part of one) starts the wait for the
    /// next request header, unless it switches protocols. The deadline is polled at once, with
    /// the writer's context: the server may already wait for the connection to become readable
    /// and not read again before it does, so the deadline must wake it itself.
    fn wrote(&mut self, written: &[u8], cx: &mut Context<'_>) {
        if self.upgraded || written.is_empty() {
            return;
        }
        if written.starts_with(b"HTTP/1.1 101") || written.starts_with(b"HTTP/1.0 101") {
            self.upgraded = true;
            self.waiting = None;
            return;
        }
        // Another interim answer (`100 Continue`): the request's body comes next, not a header.
        if written.starts_with(b"HTTP/1.1 1") {
            return;
        }
        let deadline = tokio::time::Instant::now() + self.wait;
        let waiting = self
            .waiting
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        waiting.as_mut().reset(deadline);
        let _ = waiting.as_mut().poll(cx);
        self.tail = [0; 3];
    }
}

/// Whether `read`, following the bytes whose last three are `tail`, ends a request header
/// (`tail` moves on to the last three bytes read).
fn header_ends(tail: &mut [u8; 3], read: &[u8]) -> bool {
    let mut seen = Vec::with_capacity(tail.len() + read.len());
    seen.extend_from_slice(tail);
    seen.extend_from_slice(read);
    let n = seen.len();
    *tail = [seen[n - 3], seen[n - 2], seen[n - 1]];
    seen.windows(4).any(|w| w == b"\r\n\r\n")
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Some(deadline) = &mut this.waiting {
            if matches!(polled, Poll::Ready(Ok(())))
                && header_ends(&mut this.tail, &buf.filled()[before..])
            {
                this.waiting = None;
                return polled;
            }
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request header within the time a connection has for one",
                )));
            }
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            this.wrote(&buf[..n], cx);
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            // The start of what was written is all `wrote` looks at.
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &b[..]);
            this.wrote(&first[..first.len().min(n)], cx);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// Serves `hello` at `/` on a loopback port behind a [`Capped`] listener.
    async fn hello(connections: usize, first_request: Duration) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let capped = Capped::new(listener, connections, first_request);
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
        tokio::spawn(async move { axum::serve(capped, router).await });
        address
    }

    /// Two places and 300 ms for a first request: two connections that never finish their
    /// header hold both places until they are closed, and a third client's request is
    /// answered once they are.
    #[tokio::test]
    async fn half_sent_requests_are_closed_and_their_places_freed() {
        let address = hello(2, Duration::from_millis(300)).await;

        let mut slow = Vec::new();
        for _ in 0..2 {
            let mut stream = TcpStream::connect(address).await.unwrap();
            stream
                .write_all(b"GET / HTTP/1.1\r\nHost: x")
                .await
                .unwrap();
            slow.push(stream);
        }
        let started = tokio::time::Instant::now();
        let mut third = TcpStream::connect(address).await.unwrap();
        third
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(10), third.read_to_string(&mut answer))
            .await
            .expect("answered once a place was free")
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("hello"), "{answer}");
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "the third waited for a place: {:?}",
            started.elapsed()
        );
        // The slow ones were closed.
        for mut stream in slow {
            let mut rest = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
                .await
                .expect("closed");
            assert!(read.is_err() || rest.is_empty() || rest.starts_with(b"HTTP/1.1 4"));
        }
    }

    /// A header end split across reads counts; an answered connection has the same time for
    /// its next request header, and past it is closed.
    #[tokio::test]
    async fn an_answered_connection_has_the_same_time_for_its_next_request() {
        let address = hello(4, Duration::from_millis(300)).await;
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        stream.write_all(b"\n").await.unwrap();
        let mut buffer = [0; 512];
        let read = stream.read(&mut buffer).await.unwrap();
        assert!(buffer[..read].starts_with(b"HTTP/1.1 200"));
        // The next request within the time: served.
        tokio::time::sleep(Duration::from_millis(100)).await;
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let read = stream.read(&mut buffer).await.unwrap();
        assert!(buffer[..read].starts_with(b"HTTP/1.1 200"));
        // Then quiet past it: closed.
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "an idle answered connection stays open: {closed:?}"
        );
    }

    /// A connection that switched protocols (a WebSocket) has no deadline any more.
    #[tokio::test]
    async fn an_upgraded_connection_may_stay_quiet() {
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let permit = Arc::new(Semaphore::new(1)).acquire_owned().await.unwrap();
        let mut connection = Counted {
            io: ours,
            _permit: permit,
            waiting: Some(Box::pin(tokio::time::sleep(Duration::from_millis(100)))),
            tail: [0; 3],
            wait: Duration::from_millis(100),
            upgraded: false,
        };
        theirs
            .write_all(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n")
            .await
            .unwrap();
        let mut buffer = [0; 256];
        let _ = connection.read(&mut buffer).await.unwrap();
        connection
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
            .await
            .unwrap();
        assert!(connection.upgraded && connection.waiting.is_none());
        // Quiet for several times the wait, then a frame: read, not refused.
        tokio::time::sleep(Duration::from_millis(400)).await;
        theirs.write_all(b"frame").await.unwrap();
        let read = connection.read(&mut buffer).await.unwrap();
        assert_eq!(&buffer[..read], b"frame");
        // An ordinary answer, by contrast, starts the wait for the next header.
        let (ours, _theirs) = tokio::io::duplex(1024);
        let permit = Arc::new(Semaphore::new(1)).acquire_owned().await.unwrap();
        let mut plain = Counted {
            io: ours,
            _permit: permit,
            waiting: None,
            tail: [0; 3],
            wait: Duration::from_millis(100),
            upgraded: false,
        };
        plain.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        assert!(plain.waiting.is_some());
        let refused = tokio::time::timeout(Duration::from_secs(5), plain.read(&mut buffer)).await;
        assert!(matches!(refused, Ok(Err(_))), "{refused:?}");
    }
}
