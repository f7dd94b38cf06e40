//! `keel mesh`: the Privateer mesh's commands. For the control plane: issue and revoke join
//! tokens, list and revoke nodes, and serve its HTTP API (`serve`, or inside `keel run`). For a
//! node: join the mesh crash-safely and run its agent — tunnel, peer sync, mesh DNS — (`join`),
//! show its identity, peers and tunnels (`status`) and answer mesh DNS alone (`dns`).
//!
//! The control plane keeps its state in a data directory (`--data-dir`, default `keel-mesh`):
//! `signing.key` (the Ed25519 key join tokens are signed with), `wireguard.key` (its own
//! WireGuard key: it is the bootstrap peer tokens point at) and, unless `--registry` names
//! another database, the registry `registry.db` (SQLite). Every file is made on first use, keys
//! with mode 0600. A node keeps its own state in `--node-dir` (default `keel-mesh-node`, see
//! `keel_mesh::agent`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use clap::{Args, Subcommand};
use keel_api::auth::{Auth, Scope};
use keel_mesh::address::MeshCidr;
use keel_mesh::agent::{NodeState, peek_claims};
use keel_mesh::keys::WireguardKey;
use keel_mesh::registry::{JoinError, JoinRequest, Registry, TokenRequest};
use keel_mesh::sync::{ANSWER_MAC_HEADER, SharedKey, SyncRequest};
use keel_mesh::token::{Bootstrap, TokenKey, TokenVerifier};
use keel_operators::time::format_rfc3339;
use serde::Deserialize;
use serde_json::json;

/// Expired tokens are kept this long (so a late join is told "expired", not "unknown"), then
/// swept whenever a token is issued.
const SWEEP_GRACE: Duration = Duration::from_secs(7 * 86_400);

/// `keel mesh …`.
#[derive(Debug, Args)]
pub struct MeshArgs {
    #[command(subcommand)]
    command: MeshCommand,
}

#[derive(Debug, Subcommand)]
enum MeshCommand {
    /// Issue or revoke join tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// List a cluster's nodes.
    Nodes(ControlArgs),
    /// Revoke a node: it leaves every peer list.
    RevokeNode(RevokeNodeArgs),
    /// Serve the control plane's HTTP API: nodes join, administrators issue tokens.
    Serve(ServeArgs),
    /// Join this node to the mesh (crash-safe: an interrupted join resumes with the same key).
    Join(JoinArgs),
    /// Show this node's mesh identity and last known peers.
    Status(StatusArgs),
    /// Answer `<node>.internal` for this node's mesh on loopback; forward other names.
    Dns(DnsArgs),
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Issue a join token; it is printed alone on standard output.
    Create(CreateTokenArgs),
    /// Revoke a token by its id (printed when it was issued).
    Revoke(RevokeTokenArgs),
}

/// Where the control plane keeps its state.
#[derive(Debug, Args)]
struct ControlArgs {
    /// Directory of the control plane's keys and default registry.
    #[arg(long, env = "KEEL_MESH_DIR", default_value = "keel-mesh")]
    data_dir: PathBuf,
    /// The registry: `sqlite:PATH` or `postgres://USER@HOST:PORT/DB` [default:
    /// sqlite:DATA_DIR/registry.db].
    #[arg(long, env = "KEEL_MESH_REGISTRY", hide_env_values = true)]
    registry: Option<String>,
    /// The cluster.
    #[arg(long, default_value = "default")]
    cluster: String,
}

/// What issued tokens are for: the cluster's range and the bootstrap peer's endpoint.
#[derive(Debug, Args)]
struct IssuingArgs {
    /// The cluster's mesh range, used when the cluster is new.
    #[arg(long, default_value = "10.88.0.0/16")]
    cidr: MeshCidr,
    /// The bootstrap peer's WireGuard endpoint (this control plane's) that tokens name,
    /// `host:port`.
    #[arg(long, env = "KEEL_MESH_ENDPOINT", default_value = "127.0.0.1:51820")]
    endpoint: String,
}

/// Issues a token, first sweeping tokens long expired.
async fn issue(
    registry: &Registry,
    key: &TokenKey,
    request: TokenRequest,
) -> Result<keel_mesh::registry::Issued, keel_mesh::registry::RegistryError> {
    let now = now();
    registry.sweep_tokens(now, SWEEP_GRACE).await?;
    registry.issue_token(key, request, now).await
}

#[derive(Debug, Args)]
struct CreateTokenArgs {
    #[command(flatten)]
    control: ControlArgs,
    /// How long the token is valid: a number with s, m, h or d.
    #[arg(long, default_value = "24h", value_parser = crate::cli::parse_duration)]
    ttl: Duration,
    /// How many nodes may join with it.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    uses: u32,
    /// The tenant whose dedicated nodes join with it; without it they are shared platform
    /// nodes.
    #[arg(long)]
    tenant: Option<uuid::Uuid>,
    #[command(flatten)]
    issuing: IssuingArgs,
    /// The URL where nodes redeem the token.
    #[arg(long, default_value = "http://127.0.0.1:18012")]
    control_url: String,
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    control: ControlArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:18012")]
    listen: String,
    /// Shared secret for administrators' bearer JWTs (HS256, role admin).
    #[arg(long, env = "KEEL_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// A TOML file whose `[[api.tokens]]` with role admin may issue and revoke tokens.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    issuing: IssuingArgs,
    /// The URL that issued tokens name for redeeming them [default: http://LISTEN, or
    /// https://LISTEN with --tls-cert].
    #[arg(long, env = "KEEL_MESH_CONTROL_URL")]
    control_url: Option<String>,
    /// Serve HTTPS with this certificate chain (PEM); needs --tls-key. Nodes trust it through
    /// the public roots, or `keel mesh join --control-ca` for a private CA or a self-signed
    /// certificate.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct RevokeTokenArgs {
    #[command(flatten)]
    control: ControlArgs,
    /// The token id.
    id: String,
}

#[derive(Debug, Args)]
struct RevokeNodeArgs {
    #[command(flatten)]
    control: ControlArgs,
    /// The node's name.
    name: String,
}

/// Unix seconds.
fn now() -> i64 {
    keel_operators::time::now_ms() / 1000
}

impl ControlArgs {
    async fn registry(&self) -> anyhow::Result<Registry> {
        let url = match &self.registry {
            Some(url) => url.clone(),
            None => {
                self.ensure_dir()?;
                format!("sqlite:{}", self.data_dir.join("registry.db").display())
            }
        };
        Registry::open(&url)
            .await
            .with_context(|| format!("mesh registry {}", crate::store::redact(&url)))
    }

    /// The registry a command that only reads or revokes works on: one that does not exist yet
    /// is an error (a mistyped `--data-dir` made a directory and an empty registry there, and
    /// listed no nodes as if the cluster had none).
    async fn existing_registry(&self) -> anyhow::Result<Registry> {
        let default = self.data_dir.join("registry.db");
        if self.registry.is_none() && !default.exists() {
            anyhow::bail!(
                "no mesh registry at {}: `keel mesh token create` makes one there, or name \
                 another with --registry (or KEEL_MESH_REGISTRY)",
                default.display()
            );
        }
        self.registry().await
    }

    /// Makes the data directory, readable by its owner only.
    fn ensure_dir(&self) -> anyhow::Result<()> {
        keel_mesh::files::create_private_dir(&self.data_dir)
            .with_context(|| format!("making {}", self.data_dir.display()))
    }

    fn signing_key(&self) -> anyhow::Result<TokenKey> {
        self.ensure_dir()?;
        let path = self.data_dir.join("signing.key");
        TokenKey::load_or_create(&path).with_context(|| format!("{}", path.display()))
    }

    /// What issuing tokens needs: the signing key, the control plane's WireGuard key and the
    /// registry, with the cluster made (with `issuing`'s range) if it is new.
    async fn open(
        &self,
        issuing: &IssuingArgs,
    ) -> anyhow::Result<(TokenKey, WireguardKey, Registry)> {
        check_endpoint(&issuing.endpoint)?;
        let key = self.signing_key()?;
        let wireguard = self.wireguard_key()?;
        let registry = self.registry().await?;
        registry
            .ensure_cluster(&self.cluster, issuing.cidr, now())
            .await?;
        Ok((key, wireguard, registry))
    }

    fn wireguard_key(&self) -> anyhow::Result<WireguardKey> {
        self.ensure_dir()?;
        let path = self.data_dir.join("wireguard.key");
        WireguardKey::load_or_create(&path).with_context(|| format!("{}", path.display()))
    }
}

/// `keel mesh …`.
pub fn mesh(args: &MeshArgs) -> anyhow::Result<()> {
    if let MeshCommand::Join(args) = &args.command {
        // Blocking HTTP first, then a runtime of its own for the agent.
        return join(args);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match &args.command {
            MeshCommand::Token(TokenCommand::Create(args)) => create_token(args).await,
            MeshCommand::Token(TokenCommand::Revoke(args)) => {
                let registry = args.control.existing_registry().await?;
                if registry.revoke_token(args.id.trim(), now()).await? {
                    eprintln!("token {} revoked", args.id.trim());
                    Ok(())
                } else {
                    anyhow::bail!(
                        "no unrevoked token {} in this registry (already revoked, swept after \
                         expiry, or issued elsewhere)",
                        args.id.trim()
                    )
                }
            }
            MeshCommand::Nodes(control) => list_nodes(control).await,
            MeshCommand::Serve(args) => serve(args).await,
            MeshCommand::Join(_) => unreachable!("handled above"),
            MeshCommand::Status(args) => status(args),
            MeshCommand::Dns(args) => dns(args).await,
            MeshCommand::RevokeNode(args) => {
                let registry = args.control.existing_registry().await?;
                if registry
                    .revoke_node(&args.control.cluster, &args.name, now())
                    .await?
                {
                    eprintln!(
                        "node {} of cluster {} revoked",
                        args.name, args.control.cluster
                    );
                    Ok(())
                } else {
                    anyhow::bail!(
                        "cluster {} has no active node {}",
                        args.control.cluster,
                        args.name
                    )
                }
            }
        }
    })
}

async fn create_token(args: &CreateTokenArgs) -> anyhow::Result<()> {
    let (key, wireguard, registry) = args.control.open(&args.issuing).await?;
    let issued = issue(
        &registry,
        &key,
        TokenRequest {
            cluster: args.control.cluster.clone(),
            tenant: args.tenant.map(|t| t.to_string()),
            ttl: args.ttl,
            uses: args.uses,
            bootstrap: Bootstrap {
                public_key: wireguard.public_base64(),
                endpoint: args.issuing.endpoint.clone(),
                control: args.control_url.clone(),
            },
        },
    )
    .await?;
    let claims = &issued.claims;
    eprintln!(
        "join token {} for cluster {} ({}), {}, {} use{}, valid until {}; revoke with \
         `keel mesh token revoke {}`",
        claims.jti,
        claims.cluster,
        args.issuing.cidr,
        claims.tenant.as_deref().map_or_else(
            || "shared platform node".to_owned(),
            |t| format!("tenant {t}")
        ),
        claims.uses,
        if claims.uses == 1 { "" } else { "s" },
        format_rfc3339(claims.exp * 1000),
        claims.jti,
    );
    println!("{}", issued.token);
    Ok(())
}

async fn list_nodes(control: &ControlArgs) -> anyhow::Result<()> {
    let registry = control.existing_registry().await?;
    let Some(cidr) = registry.cluster_cidr(&control.cluster).await? else {
        anyhow::bail!(
            "no cluster {}: `keel mesh token create` makes it",
            control.cluster
        );
    };
    let nodes = registry.nodes(&control.cluster).await?;
    println!(
        "cluster {} ({cidr}): {} node{}",
        control.cluster,
        nodes.len(),
        if nodes.len() == 1 { "" } else { "s" }
    );
    println!(
        "{:<24} {:<15} {:<36} {:<22} status",
        "name", "address", "tenant", "endpoint"
    );
    for node in nodes {
        println!(
            "{:<24} {:<15} {:<36} {:<22} {}",
            node.name,
            node.address,
            node.tenant.as_deref().unwrap_or("(shared)"),
            node.endpoint.as_deref().unwrap_or("-"),
            match node.revoked_at {
                Some(at) => format!("revoked {}", format_rfc3339(at * 1000)),
                None => format!("joined {}", format_rfc3339(node.joined_at * 1000)),
            }
        );
    }
    Ok(())
}

/// Checks an `--endpoint` option.
fn check_endpoint(endpoint: &str) -> anyhow::Result<()> {
    keel_mesh::registry::check_endpoint(endpoint).map_err(|e| anyhow::anyhow!("--{e}"))
}

/// What the control plane's handlers share.
#[derive(Clone)]
struct Control {
    registry: Registry,
    key: Arc<TokenKey>,
    verifier: TokenVerifier,
    auth: Option<Auth>,
    bootstrap: Bootstrap,
    cluster: String,
    /// The control plane's WireGuard key: nodes prove theirs against it when they sync.
    wireguard: Arc<WireguardKey>,
    /// The served cluster's revision, watched so that waiting syncs answer when it changes:
    /// at once for changes made here, within [`REVISION_POLL`] for changes made elsewhere.
    revision: Arc<tokio::sync::watch::Sender<i64>>,
}

/// A JSON error answer.
fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, axum::Json(json!({ "error": message.to_string() }))).into_response()
}

/// The status a refused join gets.
fn join_status(e: &JoinError) -> StatusCode {
    match e {
        JoinError::Token(_) | JoinError::Unknown(_) | JoinError::Expired(_) => {
            StatusCode::UNAUTHORIZED
        }
        JoinError::Revoked(_) => StatusCode::FORBIDDEN,
        JoinError::UsedUp(_) | JoinError::NameTaken(_) => StatusCode::CONFLICT,
        JoinError::Request(_) => StatusCode::BAD_REQUEST,
        JoinError::Full(_) => StatusCode::SERVICE_UNAVAILABLE,
        JoinError::Registry(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl Control {
    /// The answer for anyone but an administrator: 401 or 403 with the reason.
    fn refuse_unless_admin(&self, headers: &HeaderMap) -> Option<Response> {
        let Some(auth) = &self.auth else {
            return Some(error(
                StatusCode::UNAUTHORIZED,
                "this control plane has no administrator credentials (--jwt-secret or --config)",
            ));
        };
        match keel_api::server::principal(auth, headers) {
            Ok(principal) if principal.scope == Scope::All => None,
            Ok(_) => Some(error(
                StatusCode::FORBIDDEN,
                "only administrators may manage join tokens",
            )),
            Err(e) => Some(error(StatusCode::UNAUTHORIZED, e)),
        }
    }
}

async fn join_handler(State(control): State<Control>, body: axum::body::Bytes) -> Response {
    let request: JoinRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "the body must be JSON {{\"token\", \"name\", \"public_key\", \"endpoint\"}}: {e}"
                ),
            );
        }
    };
    match control
        .registry
        .join(&control.verifier, &request, now())
        .await
    {
        Ok(identity) => {
            control.publish(&identity.node.cluster, identity.revision);
            let key = SharedKey::between(&control.wireguard, &request.public_key);
            signed_json(&identity, key.as_ref())
        }
        Err(e) => {
            if matches!(e, JoinError::Registry(_)) {
                tracing::error!("mesh join: {e}");
            }
            error(join_status(&e), e)
        }
    }
}

/// `POST /api/v1/mesh/tokens`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    uses: Option<u32>,
    #[serde(default)]
    tenant: Option<uuid::Uuid>,
}

async fn create_handler(
    State(control): State<Control>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(refused) = control.refuse_unless_admin(&headers) {
        return refused;
    }
    let request: CreateToken = if body.is_empty() {
        CreateToken::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(request) => request,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("the body must be JSON {{\"ttl\", \"uses\", \"tenant\"}}: {e}"),
                );
            }
        }
    };
    let ttl = match crate::cli::parse_duration(request.ttl.as_deref().unwrap_or("24h")) {
        Ok(ttl) => ttl,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("ttl: {e}")),
    };
    let issued = issue(
        &control.registry,
        &control.key,
        TokenRequest {
            cluster: control.cluster.clone(),
            tenant: request.tenant.map(|t| t.to_string()),
            ttl,
            uses: request.uses.unwrap_or(1),
            bootstrap: control.bootstrap.clone(),
        },
    )
    .await;
    match issued {
        Ok(issued) => (
            StatusCode::CREATED,
            axum::Json(json!({
                "token": issued.token,
                "id": issued.claims.jti,
                "cluster": issued.claims.cluster,
                "tenant": issued.claims.tenant,
                "uses": issued.claims.uses,
                "expires_at": issued.claims.exp,
            })),
        )
            .into_response(),
        Err(keel_mesh::registry::RegistryError::Request(m)) => error(StatusCode::BAD_REQUEST, m),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn revoke_handler(
    State(control): State<Control>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(refused) = control.refuse_unless_admin(&headers) {
        return refused;
    }
    match control.registry.revoke_token(&id, now()).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => error(StatusCode::NOT_FOUND, format!("no unrevoked token {id}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// How often the control plane reads its cluster's revision (other processes, such as
/// `keel mesh revoke-node`, change it too).
const REVISION_POLL: Duration = Duration::from_millis(500);

impl Control {
    /// The node a sync request names, or the answer saying it is unknown.
    async fn node(&self, request: &SyncRequest) -> Result<keel_mesh::registry::Node, Response> {
        match self.registry.node(&request.cluster, &request.name).await {
            Ok(Some(node)) => Ok(node),
            Ok(None) => Err(error(
                StatusCode::NOT_FOUND,
                format!("cluster {} has no node {}", request.cluster, request.name),
            )),
            Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e)),
        }
    }

    /// Publishes `cluster`'s revision `now` to waiting syncs, if it is the served cluster.
    fn publish(&self, cluster: &str, now: i64) {
        if cluster == self.cluster {
            self.revision.send_if_modified(|r| {
                let newer = now > *r;
                if newer {
                    *r = now;
                }
                newer
            });
        }
    }

    /// Waits until `cluster`'s revision passes `after`, for at most `wait`.
    async fn wait_for_change(&self, cluster: &str, after: i64, wait: Duration) {
        if cluster == self.cluster {
            let mut revision = self.revision.subscribe();
            let _ = tokio::time::timeout(wait, revision.wait_for(|r| *r > after)).await;
            return;
        }
        let deadline = tokio::time::Instant::now() + wait;
        while tokio::time::Instant::now() < deadline {
            if matches!(self.registry.revision(cluster).await, Ok(Some(r)) if r > after) {
                return;
            }
            tokio::time::sleep(REVISION_POLL).await;
        }
    }
}

/// `POST /api/v1/mesh/sync`: a node's current peer list, waiting (up to `wait` seconds) for a
/// revision newer than `after`. The node proves its key (see `keel_mesh::sync`).
async fn sync_handler(State(control): State<Control>, body: axum::body::Bytes) -> Response {
    let request: SyncRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "the body must be JSON {{\"cluster\", \"name\", \"ts\", \"mac\", \"after\", \"wait\"}}: {e}"
                ),
            );
        }
    };
    let node = match control.node(&request).await {
        Ok(node) => node,
        Err(refused) => return refused,
    };
    let key = match request.verify(&control.wireguard, &node.public_key, now()) {
        Ok(key) => key,
        Err(e) => return error(StatusCode::UNAUTHORIZED, e),
    };
    if let (Some(after), Some(wait), None) = (request.after, request.wait, node.revoked_at) {
        let wait = Duration::from_secs(u64::from(wait.min(keel_mesh::sync::MAX_WAIT)));
        control.wait_for_change(&request.cluster, after, wait).await;
    }
    // Read again: the node may have been revoked while the request waited.
    let node = match control.node(&request).await {
        Ok(node) => node,
        Err(refused) => return refused,
    };
    match control.registry.identity(node, false).await {
        Ok(identity) => signed_json(&identity, Some(&key)),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// A JSON answer carrying the HMAC of its body under the key shared with the node, so the node
/// knows it comes from its control plane.
fn signed_json<T: serde::Serialize>(value: &T, key: Option<&SharedKey>) -> Response {
    let body = match serde_json::to_vec(value) {
        Ok(body) => body,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let mac = key.map(|key| key.answer_mac(&body));
    let mut response = (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response();
    if let Some(mac) = mac.and_then(|m| axum::http::HeaderValue::from_str(&m).ok()) {
        response.headers_mut().insert(ANSWER_MAC_HEADER, mac);
    }
    response
}

/// `DELETE /api/v1/mesh/nodes/{name}` (administrators): revokes a node of the served cluster.
async fn revoke_node_handler(
    State(control): State<Control>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    if let Some(refused) = control.refuse_unless_admin(&headers) {
        return refused;
    }
    match control
        .registry
        .revoke_node(&control.cluster, &name, now())
        .await
    {
        Ok(true) => {
            if let Ok(Some(now)) = control.registry.revision(&control.cluster).await {
                control.publish(&control.cluster, now);
            }
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            format!("cluster {} has no active node {name}", control.cluster),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

#[derive(Debug, Deserialize)]
struct NodesQuery {
    cluster: Option<String>,
}

async fn nodes_handler(
    State(control): State<Control>,
    headers: HeaderMap,
    Query(query): Query<NodesQuery>,
) -> Response {
    if let Some(refused) = control.refuse_unless_admin(&headers) {
        return refused;
    }
    let cluster = query.cluster.unwrap_or(control.cluster.clone());
    match control.registry.nodes(&cluster).await {
        Ok(nodes) => axum::Json(nodes).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// The control plane's HTTP API bound to `args.listen`: the listener and the routes.
async fn control_plane(
    args: &ServeArgs,
    auth: Option<Auth>,
    scheme: &str,
) -> anyhow::Result<(tokio::net::TcpListener, axum::Router)> {
    let (key, wireguard, registry) = args.control.open(&args.issuing).await?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listener.local_addr()?;
    let first = registry
        .revision(&args.control.cluster)
        .await?
        .unwrap_or_default();
    let revision = Arc::new(tokio::sync::watch::Sender::new(first));
    let wireguard = Arc::new(wireguard);
    let control = Control {
        wireguard: wireguard.clone(),
        revision,
        registry,
        verifier: key.verifier(),
        key: Arc::new(key),
        auth,
        bootstrap: Bootstrap {
            public_key: wireguard.public_base64(),
            endpoint: args.issuing.endpoint.clone(),
            control: args
                .control_url
                .clone()
                .unwrap_or_else(|| format!("{scheme}://{local}")),
        },
        cluster: args.control.cluster.clone(),
    };
    {
        // Changes made by other processes (`keel mesh revoke-node`) reach waiting syncs too.
        let control = control.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(REVISION_POLL);
            loop {
                every.tick().await;
                if let Ok(Some(now)) = control.registry.revision(&control.cluster).await {
                    control.publish(&control.cluster, now);
                }
            }
        });
    }
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/api/v1/mesh/join", post(join_handler))
        .route("/api/v1/mesh/tokens", post(create_handler))
        .route("/api/v1/mesh/tokens/{id}", delete(revoke_handler))
        .route("/api/v1/mesh/nodes", get(nodes_handler))
        .route("/api/v1/mesh/nodes/{name}", delete(revoke_node_handler))
        .route("/api/v1/mesh/sync", post(sync_handler))
        .with_state(control);
    Ok((listener, app))
}

/// `keel mesh serve`: the control plane's HTTP API (HTTPS with `--tls-cert`) until Ctrl-C.
async fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    let auth = crate::config::credentials(args.jwt_secret.as_deref(), args.config.as_deref())?;
    if auth.is_none() {
        eprintln!(
            "keel mesh: no administrator credentials (--jwt-secret or --config): tokens can only \
             be issued with `keel mesh token create` on this machine"
        );
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let (listener, app) = control_plane(args, auth, scheme).await?;
    let local = listener.local_addr()?;
    eprintln!(
        "keel mesh: control plane for cluster {} listening on {scheme}://{local}",
        args.control.cluster,
    );
    if args.control_url.is_none() && local.ip().is_unspecified() {
        eprintln!(
            "keel mesh: warning: tokens will name {scheme}://{local}, which nodes cannot reach; \
             give --control-url with an address they can"
        );
    }
    if tls.is_none() && !local.ip().is_loopback() {
        eprintln!(
            "keel mesh: warning: join tokens and administrators' credentials cross the network \
             in plain text; give --tls-cert and --tls-key"
        );
    }
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match tls {
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await?;
        }
        Some(acceptor) => tokio::select! {
            served = serve_tls(listener, app, acceptor) => served?,
            () = stop => {}
        },
    }
    Ok(())
}

/// A TLS acceptor from PEM files.
fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| anyhow::anyhow!("--tls-cert {}: {e}", cert.display()))?;
    anyhow::ensure!(
        !chain.is_empty(),
        "--tls-cert {}: no certificate in it",
        cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("--tls-key {}: {e}", key.display()))?;
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .context("the TLS certificate and key do not go together")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serves `app` over TLS: each connection's handshake and requests on a task of its own, so a
/// slow or broken client holds up nobody else.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    acceptor: tokio_rustls::TlsAcceptor,
) -> anyhow::Result<()> {
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            // Out of file descriptors and the like: wait a moment, keep serving.
            Err(e) => {
                tracing::warn!("mesh control plane: accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!("mesh control plane: TLS handshake: {e}");
                        return;
                    }
                    Err(_) => return,
                };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
        });
    }
}

/// The control plane inside `keel run` (`--mesh-listen`): served on a thread of its own, with
/// `keel mesh serve`'s defaults and environment (data directory `keel-mesh` or `KEEL_MESH_DIR`,
/// `KEEL_MESH_REGISTRY`, `KEEL_MESH_CONTROL_URL`, `KEEL_MESH_ENDPOINT`, cluster `default`) and
/// the run's API credentials for administrators. Its address once it listens.
pub fn start_control_plane(listen: &str, auth: Auth) -> anyhow::Result<std::net::SocketAddr> {
    #[derive(clap::Parser)]
    struct Embedded {
        #[command(flatten)]
        serve: ServeArgs,
    }
    let args = <Embedded as clap::Parser>::try_parse_from(["keel", "--listen", listen])
        .context("mesh control plane settings")?
        .serve;
    let (ready_tx, ready) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("mesh-control".into())
        .spawn(move || {
            let served = (|| -> anyhow::Result<()> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async {
                    let (listener, app) = match control_plane(&args, Some(auth), "http").await {
                        Ok(bound) => bound,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return Ok(());
                        }
                    };
                    let local = listener.local_addr()?;
                    if args.control_url.is_none() && local.ip().is_unspecified() {
                        eprintln!(
                            "keel: warning: mesh tokens will name http://{local}, which nodes \
                             cannot reach; set KEEL_MESH_CONTROL_URL"
                        );
                    }
                    let _ = ready_tx.send(Ok(local));
                    axum::serve(listener, app).await?;
                    Ok(())
                })
            })();
            if let Err(e) = served {
                tracing::error!("mesh control plane: {e:#}");
            }
        })?;
    ready
        .recv()
        .context("the mesh control plane's thread ended before it listened")?
}

#[derive(Debug, Args)]
struct JoinArgs {
    /// The join token (from `keel mesh token create` or the control plane's API); not needed
    /// to resume an interrupted join or to restart a joined node.
    #[arg(long, env = "KEEL_MESH_JOIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// This node's name in the mesh, a DNS label [default: the host name].
    #[arg(long)]
    name: Option<String>,
    /// This node's WireGuard endpoint others reach it at, `host:port`.
    #[arg(long)]
    endpoint: Option<String>,
    /// The control plane's URL [default: the one the token names].
    #[arg(long)]
    control: Option<String>,
    /// A CA certificate (PEM) that an `https://` control plane's certificate chains to — its
    /// own certificate when self-signed [default: the public web roots]. Kept for peer sync.
    #[arg(long)]
    control_ca: Option<PathBuf>,
    /// Directory of this node's mesh state (key, enrollment, last known peers, status).
    #[arg(long, env = "KEEL_MESH_NODE_DIR", default_value = "keel-mesh-node")]
    node_dir: PathBuf,
    /// Record the join and stop, without starting the tunnel (a later `keel mesh join` starts
    /// it).
    #[arg(long)]
    enroll_only: bool,
    /// The TUN interface the mesh address goes on.
    #[arg(long, default_value = "keel0")]
    interface: String,
    /// The TUN interface's MTU: the underlay's MTU less 80 (WireGuard's overhead); the default
    /// suits a 1500-byte underlay.
    #[arg(long, default_value_t = keel_mesh::device::MTU, value_parser = clap::value_parser!(u16).range(576..=9000))]
    mtu: u16,
    /// The UDP address the tunnel listens on [default: 0.0.0.0 and the --endpoint's port,
    /// else 0.0.0.0:51820].
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Where mesh DNS answers (`<node>.internal`), or `off`.
    #[arg(long, default_value = "127.0.0.1:53")]
    dns: String,
    /// The resolver other names go to, `host:port` [default: the first non-loopback
    /// nameserver of /etc/resolv.conf].
    #[arg(long)]
    dns_upstream: Option<std::net::SocketAddr>,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// Directory of this node's mesh state.
    #[arg(long, env = "KEEL_MESH_NODE_DIR", default_value = "keel-mesh-node")]
    node_dir: PathBuf,
}

/// This machine's host name as a mesh name, if it is one.
fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()?;
    let name = name.trim().split('.').next()?.to_ascii_lowercase();
    keel_mesh::registry::check_name(&name).ok().map(|()| name)
}

/// `keel mesh join`: enrolls this node (crash-safely) unless it already is, then runs the
/// agent — tunnel, peer sync, mesh DNS — until Ctrl-C or SIGTERM.
fn join(args: &JoinArgs) -> anyhow::Result<()> {
    let state = NodeState::open(&args.node_dir)
        .with_context(|| format!("node state in {}", args.node_dir.display()))?;
    let enrollment = match state.enrollment()? {
        Some(_)
            if args.token.is_some()
                && state
                    .last_known()?
                    .is_some_and(|known| known.node.revoked_at.is_some()) =>
        {
            eprintln!("this node was revoked; joining again with the new token and a new key");
            state.forget()?;
            enroll(args, &state)?
        }
        Some(done) => {
            let node = &done.identity.node;
            eprintln!(
                "already in the mesh: {} is {} in cluster {}",
                node.name, node.address, node.cluster,
            );
            done
        }
        None => enroll(args, &state)?,
    };
    if args.enroll_only {
        eprintln!(
            "tunnel: not started (--enroll-only); `keel mesh join --node-dir {}` starts it",
            args.node_dir.display()
        );
        return Ok(());
    }
    run_agent(args, &state, &enrollment)
}

/// Asks the control plane to enroll this node, recording the join on disk before asking.
fn enroll(args: &JoinArgs, state: &NodeState) -> anyhow::Result<keel_mesh::agent::Enrollment> {
    let earlier = state.pending()?;
    if let Some(earlier) = &earlier {
        eprintln!(
            "resuming the join of {} begun at {} (same key)",
            earlier.name,
            format_rfc3339(earlier.started_at * 1000)
        );
    }
    let token = args
        .token
        .clone()
        .or_else(|| earlier.as_ref().map(|p| p.token.clone()))
        .context("no join token: give --token (or KEEL_MESH_JOIN_TOKEN)")?;
    let claims = peek_claims(&token).context("--token is not a join token")?;
    let name = args
        .name
        .clone()
        .or_else(|| earlier.as_ref().map(|p| p.name.clone()))
        .or_else(host_name)
        .context("this host's name is not a DNS label: give --name")?;
    keel_mesh::registry::check_name(&name).map_err(anyhow::Error::msg)?;
    if let Some(endpoint) = &args.endpoint {
        check_endpoint(endpoint)?;
    }
    let control = args
        .control
        .clone()
        .unwrap_or_else(|| claims.bootstrap.control.clone());
    let control_ca = match &args.control_ca {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("--control-ca {}", path.display()))?,
        ),
        None => earlier.as_ref().and_then(|p| p.control_ca.clone()),
    };
    let pending = state.begin(
        &name,
        &token,
        &control,
        args.endpoint.as_deref(),
        control_ca.as_deref(),
        now(),
    )?;
    let url = format!("{}/api/v1/mesh/join", control.trim_end_matches('/'));
    let body = serde_json::to_string(&JoinRequest {
        token: pending.token.clone(),
        name: pending.name.clone(),
        public_key: pending.public_key.clone(),
        endpoint: pending.endpoint.clone(),
    })?;
    let agent = http_agent(Duration::from_secs(15), pending.control_ca.as_deref())?;
    let answer = post_json(&agent, &url, &body).map_err(|e| {
        let hint = if e.to_string().contains("certificate") {
            " (if the control plane's certificate is self-signed or from a private CA, give it \
             with --control-ca; a self-signed one must not be marked CA:TRUE)"
        } else {
            ""
        };
        anyhow::anyhow!(
            "cannot reach the control plane at {url}: {e}{hint}; the join is kept, run the \
             same command again"
        )
    })?;
    let status = answer.status;
    if status != 200 {
        let reason = error_text(&answer.text);
        if (400..500).contains(&status) {
            state.abandon()?;
            anyhow::bail!("the control plane refused the join ({status}): {reason}");
        }
        anyhow::bail!(
            "the control plane failed ({status}): {reason}; the join is kept, run the same command again"
        );
    }
    let mac_key = WireguardKey::from_base64(&pending.private_key)
        .and_then(|key| SharedKey::between(&key, &claims.bootstrap.public_key))
        .context("the token's control-plane key is not a WireGuard key")?;
    anyhow::ensure!(
        answer.signed_by(&mac_key),
        "the answer from {url} is not signed by the control plane the token names (its key \
         {}); the join is kept, check --control and run the same command again",
        claims.bootstrap.public_key
    );
    let identity: keel_mesh::registry::Identity =
        serde_json::from_str(&answer.text).context("the control plane's answer")?;
    if std::env::var_os("KEEL_MESH_TEST_CRASH_AFTER_JOIN").is_some() {
        // Test hook: die between the control plane's answer and recording it.
        std::process::exit(86);
    }
    let enrollment = state.complete(&pending, identity, now())?;
    let node = &enrollment.identity.node;
    eprintln!(
        "joined: {} is {} in cluster {} ({}), {} peer{}{}",
        node.name,
        node.address,
        node.cluster,
        enrollment.identity.mesh_cidr,
        enrollment.identity.peers.len(),
        plural(enrollment.identity.peers.len()),
        if enrollment.identity.replayed {
            " (the control plane already had this join)"
        } else {
            ""
        }
    );
    Ok(enrollment)
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// An HTTP client for the control plane: `https://` URLs are checked against `ca` (PEM), or
/// the public web roots without one.
fn http_agent(timeout: Duration, ca: Option<&str>) -> anyhow::Result<ureq::Agent> {
    use ureq::tls::{PemItem, RootCerts, TlsConfig};
    let roots = match ca {
        Some(pem) => {
            let certs: Vec<_> = ureq::tls::parse_pem(pem.as_bytes())
                .filter_map(|item| match item {
                    Ok(PemItem::Certificate(cert)) => Some(cert),
                    _ => None,
                })
                .collect();
            anyhow::ensure!(
                !certs.is_empty(),
                "the control plane's CA has no certificate"
            );
            RootCerts::new_with_certs(&certs)
        }
        None => RootCerts::WebPki,
    };
    Ok(ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .tls_config(TlsConfig::builder().root_certs(roots).build())
        .build()
        .into())
}

/// What the control plane answered: status, body and the body's MAC header, if any.
struct Answer {
    status: u16,
    text: String,
    mac: Option<String>,
}

impl Answer {
    /// Whether the body carries a valid MAC under `key`.
    fn signed_by(&self, key: &SharedKey) -> bool {
        self.mac
            .as_deref()
            .is_some_and(|mac| key.check_answer(self.text.as_bytes(), mac))
    }
}

/// POSTs JSON; whatever came back.
fn post_json(agent: &ureq::Agent, url: &str, body: &str) -> Result<Answer, ureq::Error> {
    let mut response = agent
        .post(url)
        .header("content-type", "application/json")
        .send(body)?;
    let status = response.status().as_u16();
    let mac = response
        .headers()
        .get(ANSWER_MAC_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = response.body_mut().read_to_string().unwrap_or_default();
    Ok(Answer { status, text, mac })
}

/// The `error` of a JSON error answer, else the whole text.
fn error_text(text: &str) -> String {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| text.to_owned())
}

/// How long a sync waits for a change before asking again, seconds.
const SYNC_WAIT: u32 = 25;
/// How long the agent waits after a failed sync before polling again.
const SYNC_RETRY: Duration = Duration::from_secs(30);
/// How often the agent rewrites `status.json`.
const STATUS_EVERY: Duration = Duration::from_secs(2);

/// What peer sync knows, shared with the status writer.
#[derive(Debug, Default)]
struct SyncState {
    revision: i64,
    revoked: bool,
    last_sync: Option<i64>,
    error: Option<String>,
    /// A sync is waiting at the control plane for the next change.
    waiting: bool,
}

/// The first non-loopback nameserver of /etc/resolv.conf, port 53.
fn system_resolver() -> Option<std::net::SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<std::net::IpAddr>().ok())
        .find(|ip| !ip.is_loopback())
        .map(|ip| std::net::SocketAddr::new(ip, 53))
}

/// Runs the node's agent: the TUN device and the boringtun loop over the last known peers,
/// peer sync with the control plane, mesh DNS and the status file.
fn run_agent(
    args: &JoinArgs,
    state: &NodeState,
    enrollment: &keel_mesh::agent::Enrollment,
) -> anyhow::Result<()> {
    use keel_mesh::tunnel::{Router, peer_specs};
    let key = state
        .key()?
        .with_context(|| format!("{}: wireguard.key is missing", args.node_dir.display()))?;
    let identity = state.last_known()?.unwrap_or(enrollment.identity.clone());
    let cidr: MeshCidr = identity
        .mesh_cidr
        .parse()
        .map_err(|e| anyhow::anyhow!("the cluster's range {}: {e}", identity.mesh_cidr))?;
    let listen = args.listen.unwrap_or_else(|| {
        let port = identity
            .node
            .endpoint
            .as_deref()
            .and_then(|e| e.rsplit_once(':'))
            .and_then(|(_, port)| port.parse().ok())
            .unwrap_or(51_820);
        std::net::SocketAddr::from(([0, 0, 0, 0], port))
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let device = keel_mesh::device::TunDevice::open(
            &args.interface,
            identity.node.address,
            cidr.prefix(),
            args.mtu,
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "joined as {} ({}), but the tunnel cannot start: {e}. The join is kept: run \
                 `keel mesh join --node-dir {}` again once that is fixed",
                identity.node.name,
                identity.node.address,
                args.node_dir.display()
            )
        })?;
        let socket = tokio::net::UdpSocket::bind(listen)
            .await
            .with_context(|| format!("the tunnel cannot listen on udp {listen}"))?;
        let router = Arc::new(std::sync::Mutex::new(Router::new(
            &key,
            peer_specs(&identity.peers),
        )));
        let names: keel_mesh::dns::Names =
            Arc::new(std::sync::RwLock::new(keel_mesh::dns::names_of(&identity)));
        let dns = if args.dns == "off" {
            "off".to_owned()
        } else {
            match tokio::net::UdpSocket::bind(&args.dns).await {
                Ok(socket) => {
                    let upstream = args.dns_upstream.or_else(system_resolver);
                    tokio::spawn(keel_mesh::dns::serve(socket, names.clone(), upstream));
                    format!("on {}{}", args.dns, upstream_text(upstream))
                }
                Err(e) => format!("off (cannot listen on {}: {e})", args.dns),
            }
        };
        let sync = Arc::new(std::sync::Mutex::new(SyncState {
            revision: identity.revision,
            revoked: identity.node.revoked_at.is_some(),
            ..SyncState::default()
        }));
        eprintln!(
            "mesh up: {} is {}/{} on {}, tunnel on udp {listen}, {} peer{}; DNS {dns}; peers \
             from {}",
            identity.node.name,
            identity.node.address,
            cidr.prefix(),
            device.name(),
            identity.peers.len(),
            plural(identity.peers.len()),
            enrollment.control
        );
        {
            let (router, names, sync, state) =
                (router.clone(), names.clone(), sync.clone(), state.clone());
            let (enrollment, identity) = (enrollment.clone(), identity.clone());
            std::thread::Builder::new()
                .name("mesh-sync".into())
                .spawn(move || {
                    sync_peers(&key, &enrollment, identity, &router, &names, &sync, &state);
                })?;
        }
        let status = {
            let (router, sync, state) = (router.clone(), sync.clone(), state.clone());
            let interface = device.name().to_owned();
            async move {
                let mut every = tokio::time::interval(STATUS_EVERY);
                loop {
                    every.tick().await;
                    let report = {
                        let mut router = router.lock().expect("router");
                        let sync = sync.lock().expect("sync");
                        keel_mesh::agent::AgentStatus {
                            pid: std::process::id(),
                            updated_at: now(),
                            interface: interface.clone(),
                            listen: listen.to_string(),
                            revision: sync.revision,
                            revoked: sync.revoked,
                            last_sync: sync.last_sync,
                            sync_error: sync.error.clone(),
                            sync_waiting: sync.waiting,
                            stats: router.stats(),
                            peers: router.peer_status(),
                        }
                    };
                    if let Err(e) = state.save_status(&report) {
                        tracing::warn!("mesh status: {e}");
                    }
                }
            }
        };
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            ran = keel_mesh::tunnel::run(router, socket, device) => ran.context("the tunnel")?,
            () = status => {}
            _ = tokio::signal::ctrl_c() => eprintln!("mesh down (interrupted)"),
            _ = terminate.recv() => eprintln!("mesh down (terminated)"),
        }
        Ok(())
    })
}

/// Keeps the peers current: asks the control plane for changes (each request waits up to
/// [`SYNC_WAIT`] seconds for a new revision, so changes arrive as they happen), polls again
/// [`SYNC_RETRY`] after a failure, and applies each new list to the tunnel, DNS and the last
/// known peers on disk. A revoked node is left with no peers at all.
fn sync_peers(
    key: &WireguardKey,
    enrollment: &keel_mesh::agent::Enrollment,
    mut known: keel_mesh::registry::Identity,
    router: &keel_mesh::tunnel::SharedRouter,
    names: &keel_mesh::dns::Names,
    sync: &std::sync::Mutex<SyncState>,
    state: &NodeState,
) {
    let agent = match http_agent(
        Duration::from_secs(u64::from(SYNC_WAIT) + 15),
        enrollment.control_ca.as_deref(),
    ) {
        Ok(agent) => agent,
        Err(e) => {
            sync.lock().expect("sync").error = Some(format!("{e:#}"));
            return;
        }
    };
    let url = format!(
        "{}/api/v1/mesh/sync",
        enrollment.control.trim_end_matches('/')
    );
    let node = &enrollment.identity.node;
    let Some(mac_key) = SharedKey::between(key, &enrollment.control_public_key) else {
        sync.lock().expect("sync").error = Some(
            "the enrollment has no usable control-plane key: join again with a new token".into(),
        );
        return;
    };
    let mut first = true;
    loop {
        // The first request answers at once, so a restarted node catches up straight away.
        let (after, wait) = if first {
            (None, None)
        } else {
            (Some(known.revision), Some(SYNC_WAIT))
        };
        first = false;
        let request = SyncRequest::new(&mac_key, &node.cluster, &node.name, now(), after, wait);
        sync.lock().expect("sync").waiting = request.wait.is_some();
        let asked = Instant::now();
        let answer = serde_json::to_string(&request)
            .map_err(anyhow::Error::from)
            .and_then(|body| Ok(post_json(&agent, &url, &body)?));
        let failure = match answer {
            Ok(answer) if answer.status == 200 && !answer.signed_by(&mac_key) => {
                Some("the answer is not signed by this node's control plane; ignored".to_owned())
            }
            Ok(answer) if answer.status == 200 => {
                match serde_json::from_str::<keel_mesh::registry::Identity>(&answer.text) {
                    Ok(identity) => {
                        let changed = identity.peers != known.peers
                            || identity.node.revoked_at != known.node.revoked_at;
                        if changed {
                            apply(&identity, router, names, state);
                        }
                        let mut shared = sync.lock().expect("sync");
                        shared.revision = identity.revision;
                        shared.last_sync = Some(now());
                        shared.error = None;
                        if identity.node.revoked_at.is_some() && !shared.revoked {
                            eprintln!(
                                "this node was revoked: all peers removed; `keel mesh join --token …` \
                             with a new token joins again"
                            );
                        }
                        shared.revoked = identity.node.revoked_at.is_some();
                        drop(shared);
                        // A control plane that answers a waiting sync at once without a change
                        // (a revoked node's, or one that cannot wait) is asked again only after
                        // the polling interval.
                        let unchanged = request.after == Some(identity.revision);
                        known = identity;
                        if unchanged && asked.elapsed() < Duration::from_secs(1) {
                            sync.lock().expect("sync").waiting = false;
                            std::thread::sleep(SYNC_RETRY);
                        }
                        None
                    }
                    Err(e) => Some(format!("the control plane's answer: {e}")),
                }
            }
            Ok(answer) => Some(format!(
                "sync refused ({}): {}",
                answer.status,
                error_text(&answer.text)
            )),
            Err(e) => Some(format!("cannot reach {url}: {e:#}")),
        };
        if let Some(failure) = failure {
            tracing::warn!("mesh sync: {failure}; using the last known peers");
            let mut shared = sync.lock().expect("sync");
            shared.error = Some(failure);
            shared.waiting = false;
            drop(shared);
            std::thread::sleep(SYNC_RETRY);
        }
    }
}

/// Puts a new peer list in force: tunnel, DNS names, and the last known list on disk.
fn apply(
    identity: &keel_mesh::registry::Identity,
    router: &keel_mesh::tunnel::SharedRouter,
    names: &keel_mesh::dns::Names,
    state: &NodeState,
) {
    router
        .lock()
        .expect("router")
        .set_peers(keel_mesh::tunnel::peer_specs(&identity.peers));
    *names.write().expect("names") = keel_mesh::dns::names_of(identity);
    if let Err(e) = state.save_peers(identity) {
        tracing::warn!("mesh: cannot keep the peer list: {e}");
    }
    eprintln!(
        "peers: revision {}, {} peer{}",
        identity.revision,
        identity.peers.len(),
        plural(identity.peers.len())
    );
}

/// Human-readable bytes.
fn bytes(n: u64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let value = n as f64;
    match n {
        0..1_024 => format!("{n} B"),
        1_024..1_048_576 => format!("{:.1} KiB", value / 1_024.0),
        1_048_576..1_073_741_824 => format!("{:.1} MiB", value / 1_048_576.0),
        _ => format!("{:.2} GiB", value / 1_073_741_824.0),
    }
}

/// `keel mesh status`: this node's identity, its peers and — when the agent runs — each
/// tunnel's last handshake and traffic.
fn status(args: &StatusArgs) -> anyhow::Result<()> {
    let state = NodeState::open(&args.node_dir)?;
    let Some(enrollment) = state.enrollment()? else {
        if let Some(pending) = state.pending()? {
            anyhow::bail!(
                "not joined yet: the join of {} begun at {} did not finish; run `keel mesh join` again",
                pending.name,
                format_rfc3339(pending.started_at * 1000)
            );
        }
        anyhow::bail!("not joined: run `keel mesh join --token …`");
    };
    let identity = state.last_known()?.unwrap_or(enrollment.identity.clone());
    let node = &identity.node;
    println!(
        "{} {} in cluster {} ({}), revision {}, control plane {}{}",
        node.name,
        node.address,
        node.cluster,
        identity.mesh_cidr,
        identity.revision,
        enrollment.control,
        if node.revoked_at.is_some() {
            " — REVOKED"
        } else {
            ""
        }
    );
    let report = state.status()?;
    let alive = report.as_ref().filter(|r| {
        now() - r.updated_at <= 10 && std::path::Path::new(&format!("/proc/{}", r.pid)).exists()
    });
    match (alive, &report) {
        (Some(r), _) => println!(
            "agent: running (pid {}) on {}, udp {}; peer sync {}",
            r.pid,
            r.interface,
            r.listen,
            match (&r.sync_error, r.sync_waiting, r.last_sync) {
                (Some(e), _, last) => format!(
                    "failing ({e}), last answer {}",
                    last.map_or_else(|| "never".to_owned(), |t| format!("{} s ago", now() - t))
                ),
                (None, true, _) => "live (waiting for changes)".to_owned(),
                (None, false, Some(t)) => format!("answered {} s ago", now() - t),
                (None, false, None) => "starting".to_owned(),
            }
        ),
        (None, Some(r)) => println!(
            "agent: not running (last report {})",
            format_rfc3339(r.updated_at * 1000)
        ),
        (None, None) => println!("agent: not running (`keel mesh join` starts it)"),
    }
    println!(
        "{:<24} {:<18} {:<22} {:>10} {:>10}  {:<10} segment",
        "peer", "allowed", "endpoint", "sent", "received", "handshake"
    );
    for peer in &identity.peers {
        let live = alive.and_then(|r| r.peers.iter().find(|p| p.name == peer.name));
        println!(
            "{:<24} {:<18} {:<22} {:>10} {:>10}  {:<10} {}",
            peer.name,
            peer.allowed_ips.join(","),
            live.and_then(|p| p.endpoint.clone())
                .or_else(|| peer.endpoint.clone())
                .unwrap_or_else(|| "-".into()),
            live.map_or_else(|| "-".into(), |p| bytes(p.sent_bytes)),
            live.map_or_else(|| "-".into(), |p| bytes(p.received_bytes)),
            live.map_or_else(
                || "-".into(),
                |p| p
                    .handshake_secs_ago
                    .map_or_else(|| "none yet".into(), |s| format!("{s} s ago"))
            ),
            peer.tenant.as_deref().unwrap_or("shared"),
        );
    }
    if let Some(r) = alive {
        println!(
            "tunnel: {} packets sent, {} delivered, {} not routable (no peer, or not IPv4), {} \
             from a source their peer may not use, {} from unknown peers, {} invalid, {} refused \
             by the kernel{}",
            r.stats.sent,
            r.stats.delivered,
            r.stats.no_route,
            r.stats.bad_source,
            r.stats.unknown_peer,
            r.stats.invalid,
            r.stats.refused,
            if r.stats.refused > 0 {
                " (too big for the underlay? give `keel mesh join --mtu` its MTU less 80)"
            } else {
                ""
            }
        );
    }
    Ok(())
}

#[derive(Debug, Args)]
struct DnsArgs {
    /// Directory of this node's mesh state (its names come from the last known peers).
    #[arg(long, env = "KEEL_MESH_NODE_DIR", default_value = "keel-mesh-node")]
    node_dir: PathBuf,
    /// Address to answer on.
    #[arg(long, default_value = "127.0.0.1:53")]
    listen: String,
    /// The resolver other names go to, `host:port`; without it they get SERVFAIL.
    #[arg(long)]
    upstream: Option<std::net::SocketAddr>,
}

/// Where mesh DNS sends other names, for start-up messages.
fn upstream_text(upstream: Option<std::net::SocketAddr>) -> String {
    upstream.map_or_else(
        || ", no upstream".to_owned(),
        |u| format!(", others to {u}"),
    )
}

/// `keel mesh dns`: mesh DNS from the node's last known peers, re-read every 5 seconds.
async fn dns(args: &DnsArgs) -> anyhow::Result<()> {
    let state = NodeState::open(&args.node_dir)?;
    let load = |state: &NodeState| -> anyhow::Result<std::collections::HashMap<_, _>> {
        let identity = state
            .last_known()?
            .context("not joined: run `keel mesh join --token …` first")?;
        Ok(keel_mesh::dns::names_of(&identity))
    };
    let names: keel_mesh::dns::Names = Arc::new(std::sync::RwLock::new(load(&state)?));
    let socket = tokio::net::UdpSocket::bind(&args.listen)
        .await
        .with_context(|| format!("cannot answer DNS on {}", args.listen))?;
    let local = socket.local_addr()?;
    eprintln!(
        "keel mesh: DNS for {} names of .{} listening on {local}{}",
        names.read().expect("names").len(),
        keel_mesh::dns::ZONE,
        upstream_text(args.upstream)
    );
    let reload = {
        let names = names.clone();
        async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                every.tick().await;
                match load(&state) {
                    Ok(fresh) => *names.write().expect("names") = fresh,
                    // Keep answering from what was last read.
                    Err(e) => tracing::warn!("mesh DNS: {e:#}"),
                }
            }
        }
    };
    tokio::select! {
        served = keel_mesh::dns::serve(socket, names, args.upstream) => Ok(served?),
        () = reload => Ok(()),
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}
