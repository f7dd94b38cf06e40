//! `keel mesh`: the Privateer mesh's commands. For the control plane: issue and revoke join
//! tokens, list and revoke nodes, and serve its HTTP API (`serve`). For a node: join the mesh
//! crash-safely (`join`), show its identity and peers (`status`) and answer mesh DNS (`dns`).
//!
//! The control plane keeps its state in a data directory (`--data-dir`, default `keel-mesh`):
//! `signing.key` (the Ed25519 key join tokens are signed with), `wireguard.key` (its own
//! WireGuard key: it is the bootstrap peer tokens point at) and, unless `--registry` names
//! another database, the registry `registry.db` (SQLite). Every file is made on first use, keys
//! with mode 0600. A node keeps its own state in `--node-dir` (default `keel-mesh-node`, see
//! `keel_mesh::agent`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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
    #[arg(long, env = "KEEL_MESH_REGISTRY")]
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
    #[arg(long, default_value = "127.0.0.1:51820")]
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
    /// The URL that issued tokens name for redeeming them [default: http://LISTEN].
    #[arg(long)]
    control_url: Option<String>,
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

    fn wireguard_key(&self) -> anyhow::Result<WireguardKey> {
        self.ensure_dir()?;
        let path = self.data_dir.join("wireguard.key");
        WireguardKey::load_or_create(&path).with_context(|| format!("{}", path.display()))
    }
}

/// `keel mesh …`.
pub fn mesh(args: &MeshArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match &args.command {
            MeshCommand::Token(TokenCommand::Create(args)) => create_token(args).await,
            MeshCommand::Token(TokenCommand::Revoke(args)) => {
                let registry = args.control.registry().await?;
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
            MeshCommand::Join(args) => join(args),
            MeshCommand::Status(args) => status(args),
            MeshCommand::Dns(args) => dns(args).await,
            MeshCommand::RevokeNode(args) => {
                let registry = args.control.registry().await?;
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
    check_endpoint(&args.issuing.endpoint)?;
    let key = args.control.signing_key()?;
    let wireguard = args.control.wireguard_key()?;
    let registry = args.control.registry().await?;
    registry
        .ensure_cluster(&args.control.cluster, args.issuing.cidr, now())
        .await?;
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
    let registry = control.registry().await?;
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
        JoinError::UsedUp(_) => StatusCode::CONFLICT,
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
        Ok(identity) => axum::Json(identity).into_response(),
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

/// `keel mesh serve`: the control plane's HTTP API until Ctrl-C.
async fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    check_endpoint(&args.issuing.endpoint)?;
    let auth = crate::config::credentials(args.jwt_secret.as_deref(), args.config.as_deref())?;
    let key = args.control.signing_key()?;
    let wireguard = args.control.wireguard_key()?;
    let registry = args.control.registry().await?;
    registry
        .ensure_cluster(&args.control.cluster, args.issuing.cidr, now())
        .await?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listener.local_addr()?;
    let control = Control {
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
                .unwrap_or_else(|| format!("http://{local}")),
        },
        cluster: args.control.cluster.clone(),
    };
    if control.auth.is_none() {
        eprintln!(
            "keel mesh: no administrator credentials (--jwt-secret or --config): tokens can only \
             be issued with `keel mesh token create` on this machine"
        );
    }
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/api/v1/mesh/join", post(join_handler))
        .route("/api/v1/mesh/tokens", post(create_handler))
        .route("/api/v1/mesh/tokens/{id}", delete(revoke_handler))
        .route("/api/v1/mesh/nodes", get(nodes_handler))
        .with_state(control);
    eprintln!(
        "keel mesh: control plane for cluster {} listening on http://{local}",
        args.control.cluster
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

#[derive(Debug, Args)]
struct JoinArgs {
    /// The join token (from `keel mesh token create` or the control plane's API); not needed
    /// to resume an interrupted join.
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
    /// Directory of this node's mesh state (key, enrollment, last known peers).
    #[arg(long, env = "KEEL_MESH_NODE_DIR", default_value = "keel-mesh-node")]
    node_dir: PathBuf,
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

/// `keel mesh join`: enrolls this node, crash-safely.
fn join(args: &JoinArgs) -> anyhow::Result<()> {
    let state = NodeState::open(&args.node_dir)
        .with_context(|| format!("node state in {}", args.node_dir.display()))?;
    if let Some(done) = state.enrollment()? {
        let node = &done.identity.node;
        eprintln!(
            "already in the mesh: {} is {} in cluster {} ({} peer{} known); `keel mesh status` shows more",
            node.name,
            node.address,
            node.cluster,
            done.identity.peers.len(),
            if done.identity.peers.len() == 1 {
                ""
            } else {
                "s"
            }
        );
        return Ok(());
    }
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
    let pending = state.begin(&name, &token, &control, args.endpoint.as_deref(), now())?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(15)))
        .build()
        .into();
    let url = format!("{}/api/v1/mesh/join", control.trim_end_matches('/'));
    let body = serde_json::to_string(&JoinRequest {
        token: pending.token.clone(),
        name: pending.name.clone(),
        public_key: pending.public_key.clone(),
        endpoint: pending.endpoint.clone(),
    })?;
    let mut response = agent
        .post(&url)
        .header("content-type", "application/json")
        .send(&body)
        .with_context(|| {
            format!("cannot reach the control plane at {url}; the join is kept, run the same command again")
        })?;
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    if status != 200 {
        let reason = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or(text);
        if (400..500).contains(&status) {
            state.abandon()?;
            anyhow::bail!("the control plane refused the join ({status}): {reason}");
        }
        anyhow::bail!(
            "the control plane failed ({status}): {reason}; the join is kept, run the same command again"
        );
    }
    let identity: keel_mesh::registry::Identity =
        serde_json::from_str(&text).context("the control plane's answer")?;
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
        if enrollment.identity.peers.len() == 1 {
            ""
        } else {
            "s"
        },
        if enrollment.identity.replayed {
            " (the control plane already had this join)"
        } else {
            ""
        }
    );
    eprintln!(
        "tunnel: not started — the TUN data plane is not wired into `keel mesh join` yet; the \
         key and peers are in {}",
        args.node_dir.display()
    );
    Ok(())
}

/// `keel mesh status`: this node's identity and last known peers.
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
    let identity = state.last_known()?.unwrap_or(enrollment.identity);
    let node = &identity.node;
    println!(
        "{} {} in cluster {} ({}), revision {}, control plane {}",
        node.name,
        node.address,
        node.cluster,
        identity.mesh_cidr,
        identity.revision,
        enrollment.control
    );
    println!(
        "{:<24} {:<18} {:<22} segment",
        "peer", "allowed", "endpoint"
    );
    for peer in &identity.peers {
        println!(
            "{:<24} {:<18} {:<22} {}",
            peer.name,
            peer.allowed_ips.join(","),
            peer.endpoint.as_deref().unwrap_or("-"),
            peer.tenant.as_deref().unwrap_or("shared")
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
        args.upstream.map_or_else(
            || ", no upstream".to_owned(),
            |u| format!(", others to {u}")
        )
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
