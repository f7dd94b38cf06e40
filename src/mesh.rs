//! `keel mesh`: the Privateer control plane's operator commands — issue and revoke join tokens,
//! list and revoke nodes.
//!
//! The control plane keeps its state in a data directory (`--data-dir`, default `keel-mesh`):
//! `signing.key` (the Ed25519 key join tokens are signed with), `wireguard.key` (its own
//! WireGuard key: it is the bootstrap peer tokens point at) and, unless `--registry` names
//! another database, the registry `registry.db` (SQLite). Every file is made on first use, keys
//! with mode 0600.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use keel_mesh::address::MeshCidr;
use keel_mesh::keys::WireguardKey;
use keel_mesh::registry::{Registry, TokenRequest};
use keel_mesh::token::{Bootstrap, TokenKey};
use keel_operators::time::format_rfc3339;

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
    /// The cluster's mesh range, used when the cluster is new.
    #[arg(long, default_value = "10.88.0.0/16")]
    cidr: MeshCidr,
    /// The bootstrap peer's WireGuard endpoint (this control plane's), `host:port`.
    #[arg(long, default_value = "127.0.0.1:51820")]
    endpoint: String,
    /// The URL where nodes redeem the token.
    #[arg(long, default_value = "http://127.0.0.1:18012")]
    control_url: String,
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

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
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
        if self.data_dir.is_dir() {
            return Ok(());
        }
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt as _;
            builder.mode(0o700);
        }
        builder
            .create(&self.data_dir)
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
    if args
        .endpoint
        .rsplit_once(':')
        .is_none_or(|(_, port)| port.parse::<u16>().is_err())
    {
        anyhow::bail!("--endpoint {:?} is not host:port", args.endpoint);
    }
    let key = args.control.signing_key()?;
    let wireguard = args.control.wireguard_key()?;
    let registry = args.control.registry().await?;
    let now = now();
    registry
        .ensure_cluster(&args.control.cluster, args.cidr, now)
        .await?;
    registry.sweep_tokens(now, SWEEP_GRACE).await?;
    let issued = registry
        .issue_token(
            &key,
            TokenRequest {
                cluster: args.control.cluster.clone(),
                tenant: args.tenant.map(|t| t.to_string()),
                ttl: args.ttl,
                uses: args.uses,
                bootstrap: Bootstrap {
                    public_key: wireguard.public_base64(),
                    endpoint: args.endpoint.clone(),
                    control: args.control_url.clone(),
                },
            },
            now,
        )
        .await?;
    let claims = &issued.claims;
    eprintln!(
        "join token {} for cluster {} ({}), {}, {} use{}, valid until {}; revoke with \
         `keel mesh token revoke {}`",
        claims.jti,
        claims.cluster,
        registry
            .cluster_cidr(&claims.cluster)
            .await?
            .map_or_else(String::new, |c| c.to_string()),
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
