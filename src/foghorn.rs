//! Running Foghorn's routing fronts beside the engine, on a runtime of their own so routing
//! never queues behind the read API.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use keel_api::foghorn::{Foghorn, GeoIp};
use tokio::sync::oneshot;

use crate::engine::Handles;

/// The Foghorn HTTP server (and, when asked, its gRPC service).
#[derive(Debug)]
pub struct FoghornServer {
    http: SocketAddr,
    grpc: Option<SocketAddr>,
    service: Arc<Foghorn>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Binds `address` for a server of its own runtime, saying `what` it was for when it cannot.
pub(crate) fn bind(address: &str, what: &str) -> anyhow::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(address)
        .with_context(|| format!("cannot listen on {address} ({what})"))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

impl FoghornServer {
    /// Binds `http` (and `grpc`), failing at once if either cannot be had, and serves routing
    /// from the engine's fleet snapshots. With `client_limit`, one HTTP client address has at
    /// most its rate of decisions recorded.
    pub fn start(
        http: &str,
        grpc: Option<&str>,
        geoip: Option<&std::path::Path>,
        admins: Option<keel_api::auth::Auth>,
        client_limit: Option<keel_api::foghorn_limit::ClientLimit>,
        handles: &Handles,
    ) -> anyhow::Result<Self> {
        let http_listener = bind(http, "Foghorn HTTP")?;
        let grpc_listener = grpc.map(|g| bind(g, "Foghorn gRPC")).transpose()?;
        let http = http_listener.local_addr()?;
        let grpc = grpc_listener
            .as_ref()
            .map(std::net::TcpListener::local_addr)
            .transpose()?;
        let mut service = Foghorn::new(
            handles.fleet.clone(),
            handles.injector.clone(),
            handles.foghorn.clone(),
        );
        if let Some(path) = geoip {
            service = service.with_geoip(GeoIp::open(path).map_err(|e| anyhow::anyhow!(e))?);
        }
        if let Some(admins) = admins {
            service = service.with_admins(admins);
        }
        if let Some(limit) = client_limit {
            service = service.with_client_limit(limit);
        }
        let service = Arc::new(service);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("keel-foghorn")
            .enable_all()
            .build()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let served = service.clone();
        let thread = std::thread::Builder::new()
            .name("keel-foghorn".into())
            .spawn(move || {
                runtime.block_on(async move {
                    if let Some(listener) = grpc_listener {
                        match tokio::net::TcpListener::from_std(listener) {
                            Ok(listener) => {
                                tokio::spawn(keel_api::foghorn_grpc::serve(
                                    listener,
                                    served.clone(),
                                ));
                            }
                            Err(error) => {
                                tracing::error!(%error, "Foghorn gRPC cannot use its socket");
                            }
                        }
                    }
                    let listener = match tokio::net::TcpListener::from_std(http_listener) {
                        Ok(listener) => listener,
                        Err(error) => {
                            tracing::error!(%error, "Foghorn cannot use its socket");
                            return;
                        }
                    };
                    keel_api::foghorn_http::serve(listener, served, async {
                        let _ = stopped.await;
                    })
                    .await;
                });
            })?;
        Ok(FoghornServer {
            http,
            grpc,
            service,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Where the HTTP surface listens.
    pub fn address(&self) -> SocketAddr {
        self.http
    }

    /// Where gRPC listens, if served.
    pub fn grpc_address(&self) -> Option<SocketAddr> {
        self.grpc
    }

    /// The routing service (counters, policy).
    pub fn service(&self) -> &Arc<Foghorn> {
        &self.service
    }

    /// Stops serving.
    pub fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
