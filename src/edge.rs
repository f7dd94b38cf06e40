//! Running the edge beside (or without) the engine: the Decklog gRPC ingest and the Helmsman
//! adapter, on a runtime of their own.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use keel_api::auth::{Auth, Scope};
use keel_edge::decklog::{Authenticate, Decklog, Tls};
use keel_edge::envelope::Caller;
use keel_edge::handoff::Handoff;
use keel_edge::helmsman::{Adapter, AdapterConfig};
use tokio::sync::oneshot;

use crate::foghorn::bind;

/// The API's tokens and JWTs, as Decklog's credentials: an admin is a platform service acting
/// for every tenant; anyone else sends for its own tenant only.
#[derive(Clone, Debug)]
pub struct EdgeAuth(pub Auth);

impl Authenticate for EdgeAuth {
    fn caller(&self, token: &str) -> Result<Caller, String> {
        match self
            .0
            .authenticate(token, keel_operators::time::now_ms() / 1000)
        {
            Ok(principal) => Ok(match principal.scope {
                Scope::All => Caller::Platform,
                Scope::Tenant(tenant) => Caller::Tenant(tenant),
            }),
            Err(error) => Err(error.to_string()),
        }
    }
}

/// How Decklog is served.
#[derive(Debug)]
pub struct DecklogSettings {
    /// Address to listen on.
    pub listen: String,
    /// TLS material; `None` serves plaintext (only with the explicit development flag).
    pub tls: Option<Tls>,
    /// Where accepted events go.
    pub handoff: Handoff,
    /// Who may send.
    pub auth: Auth,
    /// Where to serve `/metrics` and `/healthz` for Decklog alone (`keel run` shows the edge's
    /// counters on its API instead).
    pub metrics_listen: Option<String>,
}

/// How the Helmsman adapter is served.
#[derive(Debug)]
pub struct HelmsmanSettings {
    /// Address Mist posts webhooks to.
    pub listen: String,
    /// The adapter's settings (log directory, Decklog address, token); an empty Decklog URL
    /// means the Decklog started alongside.
    pub adapter: AdapterConfig,
}

/// The running edge.
#[derive(Debug)]
pub struct EdgeServer {
    metrics: Option<SocketAddr>,
    decklog: Option<SocketAddr>,
    helmsman: Option<SocketAddr>,
    handoff: Option<Handoff>,
    adapter: Option<Adapter>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Serves `/metrics` (Decklog's counters) and `/healthz` on `listener`.
fn serve_metrics(
    listener: std::net::TcpListener,
    stats: std::sync::Arc<keel_edge::handoff::HandoffStats>,
) {
    let router = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let stats = stats.clone();
                async move {
                    let mut text = String::new();
                    stats.render(&mut text);
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        text,
                    )
                }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok" }));
    match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => {
            tokio::spawn(async move {
                if let Err(error) = axum::serve(listener, router).await {
                    tracing::error!(%error, "Decklog metrics stopped");
                }
            });
        }
        Err(error) => tracing::error!(%error, "Decklog metrics cannot use their socket"),
    }
}

/// The TLS material named by `--tls-cert`/`--tls-key`, or plaintext when `plaintext` says so;
/// anything else is an error saying what to pass.
pub fn tls_choice(
    cert: Option<&PathBuf>,
    key: Option<&PathBuf>,
    plaintext: bool,
) -> anyhow::Result<Option<Tls>> {
    match (cert, key, plaintext) {
        (Some(cert), Some(key), false) => Ok(Some(
            Tls::from_files(cert, key).map_err(anyhow::Error::msg)?,
        )),
        (None, None, true) => Ok(None),
        (Some(_), Some(_), true) => {
            anyhow::bail!("--insecure-plaintext and --tls-cert/--tls-key contradict each other")
        }
        (None, None, false) => anyhow::bail!(
            "Decklog needs --tls-cert FILE --tls-key FILE, or --insecure-plaintext for development"
        ),
        _ => anyhow::bail!("--tls-cert and --tls-key go together"),
    }
}

impl EdgeServer {
    /// Binds what is asked for, failing at once if an address cannot be had, and serves it.
    pub fn start(
        decklog: Option<DecklogSettings>,
        helmsman: Option<HelmsmanSettings>,
    ) -> anyhow::Result<Self> {
        let decklog_listener = decklog
            .as_ref()
            .map(|d| bind(&d.listen, "Decklog gRPC"))
            .transpose()?;
        let metrics_listener = decklog
            .as_ref()
            .and_then(|d| d.metrics_listen.as_deref())
            .map(|address| bind(address, "Decklog metrics"))
            .transpose()?;
        let metrics_address = metrics_listener
            .as_ref()
            .map(std::net::TcpListener::local_addr)
            .transpose()?;
        let metrics_stats = decklog.as_ref().map(|d| d.handoff.stats.clone());
        let helmsman_listener = helmsman
            .as_ref()
            .map(|h| bind(&h.listen, "Helmsman webhooks"))
            .transpose()?;
        // The adapter beside its Decklog calls the address Decklog is bound to (loopback when
        // bound to every interface); with TLS, a loopback address goes by `localhost`, the name
        // a development certificate carries.
        let decklog_url = decklog
            .as_ref()
            .zip(decklog_listener.as_ref())
            .map(|(d, l)| {
                let bound = l
                    .local_addr()
                    .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
                let ip = if bound.ip().is_unspecified() {
                    std::net::IpAddr::from([127, 0, 0, 1])
                } else {
                    bound.ip()
                };
                match (&d.tls, ip.is_loopback()) {
                    (Some(_), true) => format!("https://localhost:{}", bound.port()),
                    (Some(_), false) => format!("https://{}", SocketAddr::new(ip, bound.port())),
                    (None, _) => format!("http://{}", SocketAddr::new(ip, bound.port())),
                }
            });
        let adapter = helmsman
            .map(|mut h| {
                if h.adapter.decklog_url.is_empty() {
                    h.adapter.decklog_url = decklog_url.clone().unwrap_or_default();
                }
                let dir = h.adapter.wal_dir.clone();
                Adapter::open(h.adapter)
                    .with_context(|| format!("cannot open the trigger log in {}", dir.display()))
            })
            .transpose()?;
        let decklog_address = decklog_listener
            .as_ref()
            .map(std::net::TcpListener::local_addr)
            .transpose()?;
        let helmsman_address = helmsman_listener
            .as_ref()
            .map(std::net::TcpListener::local_addr)
            .transpose()?;
        let handoff = decklog.as_ref().map(|d| d.handoff.clone());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("keel-edge")
            .enable_all()
            .build()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let served_adapter = adapter.clone();
        let thread = std::thread::Builder::new()
            .name("keel-edge".into())
            .spawn(move || {
                runtime.block_on(async move {
                    if let (Some(listener), Some(stats)) = (metrics_listener, metrics_stats) {
                        serve_metrics(listener, stats);
                    }
                    if let (Some(settings), Some(listener)) = (decklog, decklog_listener) {
                        let service = Decklog::new(
                            settings.handoff,
                            std::sync::Arc::new(EdgeAuth(settings.auth)),
                        );
                        match tokio::net::TcpListener::from_std(listener) {
                            Ok(listener) => {
                                tokio::spawn(async move {
                                    if let Err(error) =
                                        keel_edge::decklog::serve(listener, service, settings.tls)
                                            .await
                                    {
                                        tracing::error!(%error, "Decklog stopped");
                                    }
                                });
                            }
                            Err(error) => tracing::error!(%error, "Decklog cannot use its socket"),
                        }
                    }
                    if let (Some(adapter), Some(listener)) = (served_adapter, helmsman_listener) {
                        tokio::spawn(adapter.clone().forward());
                        match tokio::net::TcpListener::from_std(listener) {
                            Ok(listener) => {
                                // A body promised and not sent is refused in time too.
                                let router = adapter.router().layer(
                                    axum::middleware::from_fn_with_state(
                                        (keel_api::listener::FIRST_REQUEST, 2 << 20),
                                        keel_api::server::body_in_time,
                                    ),
                                );
                                // Bounded and with a deadline per request header, as the API's
                                // port: idle connections took every descriptor the process had.
                                let listener = keel_api::listener::Capped::new(
                                    listener,
                                    keel_api::listener::MAX_CONNECTIONS,
                                    keel_api::listener::FIRST_REQUEST,
                                );
                                tokio::spawn(async move {
                                    if let Err(error) = axum::serve(listener, router).await {
                                        tracing::error!(%error, "Helmsman adapter stopped");
                                    }
                                });
                            }
                            Err(error) => {
                                tracing::error!(%error, "the Helmsman adapter cannot use its socket");
                            }
                        }
                    }
                    let _ = stopped.await;
                });
            })?;
        Ok(EdgeServer {
            metrics: metrics_address,
            decklog: decklog_address,
            helmsman: helmsman_address,
            handoff,
            adapter,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Where Decklog listens.
    pub fn decklog_address(&self) -> Option<SocketAddr> {
        self.decklog
    }

    /// Where Decklog's own `/metrics` listens.
    pub fn metrics_address(&self) -> Option<SocketAddr> {
        self.metrics
    }

    /// Where the adapter listens.
    pub fn helmsman_address(&self) -> Option<SocketAddr> {
        self.helmsman
    }

    /// Decklog's hand-off (for its counters).
    pub fn handoff(&self) -> Option<&Handoff> {
        self.handoff.as_ref()
    }

    /// The adapter (for its counters).
    pub fn adapter(&self) -> Option<&Adapter> {
        self.adapter.as_ref()
    }

    /// A renderer of the edge's counters in Prometheus text, for `/metrics`.
    pub fn metrics(&self) -> impl Fn(&mut String) + Send + Sync + 'static {
        let handoff = self.handoff.as_ref().map(|h| h.stats.clone());
        let adapter = self.adapter.clone();
        move |out: &mut String| {
            if let Some(stats) = &handoff {
                stats.render(out);
            }
            if let Some(adapter) = &adapter {
                adapter.render_metrics(out);
            }
        }
    }

    /// Blocks until the process is stopped.
    pub fn wait(mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for EdgeServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
