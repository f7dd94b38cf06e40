//! The node registry: clusters with their mesh ranges, join tokens (by hash only) and nodes,
//! in SQLite (`sqlite:PATH`, the default) or PostgreSQL (`postgres://…`).
//!
//! Redeeming a token is one atomic statement — `UPDATE … SET uses = uses + 1 … WHERE` the token
//! is known, unrevoked, unexpired and not used up, `RETURNING` its cluster and tenant — inside
//! the transaction that then gives the node its address, so of two nodes racing for a
//! single-use token exactly one gets it. A node that asks again with the same token, name and
//! key (its answer was lost, it crashed before saving it) gets the identity it already has and
//! uses nothing up.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::str::FromStr as _;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use sqlx::Row as _;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

use crate::address::{MeshCidr, allocate};
use crate::token::{Bootstrap, JoinClaims, TokenError, TokenKey, TokenVerifier, token_hash};

/// The tables, in an order that creates them; the same text works on SQLite and PostgreSQL.
const SCHEMA: [&str; 3] = [
    "CREATE TABLE IF NOT EXISTS mesh_clusters (
        cluster_id TEXT PRIMARY KEY,
        cidr TEXT NOT NULL,
        revision BIGINT NOT NULL DEFAULT 0,
        created_at BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS mesh_tokens (
        token_hash TEXT PRIMARY KEY,
        cluster_id TEXT NOT NULL REFERENCES mesh_clusters (cluster_id),
        tenant_id TEXT,
        max_uses BIGINT NOT NULL,
        uses BIGINT NOT NULL DEFAULT 0,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        used_at BIGINT,
        revoked_at BIGINT)",
    "CREATE TABLE IF NOT EXISTS mesh_nodes (
        cluster_id TEXT NOT NULL REFERENCES mesh_clusters (cluster_id),
        node_name TEXT NOT NULL,
        tenant_id TEXT,
        public_key TEXT NOT NULL,
        address TEXT NOT NULL,
        endpoint TEXT,
        token_hash TEXT,
        joined_at BIGINT NOT NULL,
        revoked_at BIGINT,
        PRIMARY KEY (cluster_id, node_name),
        UNIQUE (cluster_id, address))",
];

/// Why a registry call failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The URL is not one the registry knows.
    #[error("{0:?} is not a registry URL: use sqlite:PATH or postgres://USER@HOST:PORT/DB")]
    Url(String),
    /// The database said no or could not be reached.
    #[error("mesh registry: {what}: {source}")]
    Database {
        /// What the registry was doing.
        what: &'static str,
        /// The driver's error.
        source: sqlx::Error,
    },
    /// A cluster is missing, or exists with another range.
    #[error("{0}")]
    Cluster(String),
    /// A token request that cannot be issued (no uses, no time).
    #[error("{0}")]
    Request(String),
}

fn database(what: &'static str) -> impl FnOnce(sqlx::Error) -> RegistryError {
    move |source| RegistryError::Database { what, source }
}

/// Why a node could not join.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The token itself is bad (signature, audience, time window).
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The registry never issued it (or swept it long after it expired).
    #[error("join token {0} is not known to this registry")]
    Unknown(String),
    /// Revoked by an operator.
    #[error("join token {0} was revoked")]
    Revoked(String),
    /// Expired (the registry's own record says so).
    #[error("join token {0} has expired")]
    Expired(String),
    /// Every use has been taken.
    #[error("join token {0} has been used up")]
    UsedUp(String),
    /// The request is unusable (name, key, endpoint).
    #[error("{0}")]
    Request(String),
    /// An active node has this name with another key.
    #[error(
        "the name {0} belongs to an active node with another key; revoke that node first \
         (`keel mesh revoke-node {0}`) to give its name to a new one"
    )]
    NameTaken(String),
    /// The cluster's range has no address left.
    #[error("cluster {0} has no mesh address left")]
    Full(String),
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// A node's mesh identity as the registry keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Its cluster.
    pub cluster: String,
    /// Its name, a DNS label: `<name>.internal` resolves to its address.
    pub name: String,
    /// The tenant it is dedicated to; none for a shared platform node.
    pub tenant: Option<String>,
    /// Its WireGuard public key, standard base64.
    pub public_key: String,
    /// Its mesh address.
    pub address: Ipv4Addr,
    /// Where its WireGuard socket is reachable, `host:port`, when it said.
    pub endpoint: Option<String>,
    /// When it joined, Unix seconds.
    pub joined_at: i64,
    /// When it was revoked, Unix seconds.
    pub revoked_at: Option<i64>,
}

/// A peer as a node configures it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// The peer's name.
    pub name: String,
    /// Its WireGuard public key.
    pub public_key: String,
    /// Its endpoint, when known.
    pub endpoint: Option<String>,
    /// The addresses it may send from and be sent to: its own `/32`.
    pub allowed_ips: Vec<String>,
    /// Its tenant segment; none for the shared platform segment.
    pub tenant: Option<String>,
}

/// What a node receives when it joins or syncs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The node as registered.
    pub node: Node,
    /// Its cluster's range.
    pub mesh_cidr: String,
    /// The cluster's revision: it changes whenever a node joins or is revoked.
    pub revision: i64,
    /// The peers it may talk to.
    pub peers: Vec<Peer>,
    /// Whether this answer repeats an earlier join (same token, name and key).
    pub replayed: bool,
}

/// A node's request to join.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The join token.
    pub token: String,
    /// The node's name, a DNS label.
    pub name: String,
    /// Its WireGuard public key, made on the node.
    pub public_key: String,
    /// Its WireGuard endpoint, `host:port`, when others can reach it.
    #[serde(default)]
    pub endpoint: Option<String>,
}

/// What an operator asks for when issuing a token.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    /// The cluster to join.
    pub cluster: String,
    /// The tenant for dedicated nodes.
    pub tenant: Option<String>,
    /// How long the token is valid.
    pub ttl: Duration,
    /// How many nodes may join with it.
    pub uses: u32,
    /// The bootstrap peer it points at.
    pub bootstrap: Bootstrap,
}

/// An issued token.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The token to hand to the node.
    pub token: String,
    /// What it says.
    pub claims: JoinClaims,
}

/// Whether a node of tenant `viewer` may peer with a node of tenant `peer`: shared nodes see
/// every segment; a tenant's node sees its own segment and the shared one, never another
/// tenant's.
pub fn may_peer(viewer: Option<&str>, peer: Option<&str>) -> bool {
    match (viewer, peer) {
        (None, _) | (_, None) => true,
        (Some(a), Some(b)) => a == b,
    }
}

/// Checks a node name: a lowercase DNS label.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "node name {name:?} is not a DNS label (1-63 of a-z, 0-9 and '-', not at either end)"
        ))
    }
}

/// Checks a WireGuard endpoint: `host:port`.
pub fn check_endpoint(endpoint: &str) -> Result<(), String> {
    match endpoint.rsplit_once(':') {
        Some((_, port)) if port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(format!("endpoint {endpoint:?} is not host:port")),
    }
}

/// Checks a WireGuard public key: 32 bytes in standard base64.
pub fn check_public_key(key: &str) -> Result<(), String> {
    match STANDARD.decode(key) {
        Ok(bytes) if bytes.len() == 32 => Ok(()),
        _ => Err(format!(
            "{key:?} is not a WireGuard public key (32 bytes, base64)"
        )),
    }
}

/// The registry.
#[derive(Clone, Debug)]
pub enum Registry {
    /// A SQLite file.
    Sqlite(SqlitePool),
    /// A PostgreSQL database.
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to whichever pool the registry has; the body is written once
/// and compiled for both databases.
macro_rules! on_pool {
    ($registry:expr, $pool:ident => $body:expr) => {
        match $registry {
            Registry::Sqlite($pool) => $body,
            Registry::Postgres($pool) => $body,
        }
    };
    // `$begin` starts a writing transaction: SQLite takes the write lock at once, so two
    // writers queue instead of one failing on a stale snapshot.
    ($registry:expr, $pool:ident, $begin:ident => $body:expr) => {
        match $registry {
            Registry::Sqlite($pool) => {
                let $begin = "BEGIN IMMEDIATE";
                $body
            }
            Registry::Postgres($pool) => {
                let $begin = "BEGIN";
                $body
            }
        }
    };
}

/// Reads a `mesh_nodes` row.
macro_rules! node_of {
    ($row:expr) => {{
        let row = $row;
        let address: String = row.try_get("address")?;
        Node {
            cluster: row.try_get("cluster_id")?,
            name: row.try_get("node_name")?,
            tenant: row.try_get("tenant_id")?,
            public_key: row.try_get("public_key")?,
            address: address.parse().map_err(|_| {
                sqlx::Error::Decode(
                    format!("mesh_nodes.address {address:?} is not an IPv4 address").into(),
                )
            })?,
            endpoint: row.try_get("endpoint")?,
            joined_at: row.try_get("joined_at")?,
            revoked_at: row.try_get("revoked_at")?,
        }
    }};
}

/// The columns [`node_of!`] reads.
macro_rules! node_columns {
    () => {
        "cluster_id, node_name, tenant_id, public_key, address, endpoint, joined_at, revoked_at"
    };
}

/// How a redemption attempt inside one transaction ended.
enum Attempt {
    Joined(Node),
    Refused,
    Full,
    Taken,
}

impl Registry {
    /// Opens the registry at `url` (a SQLite file is created if missing) and creates its tables.
    pub async fn open(url: &str) -> Result<Self, RegistryError> {
        let registry = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = PgPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(10))
                .connect(url)
                .await
                .map_err(database("connecting"))?;
            Registry::Postgres(pool)
        } else if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(|_| RegistryError::Url(url.to_owned()))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_secs(30));
            let pool = SqlitePoolOptions::new()
                .max_connections(4)
                .connect_with(options)
                .await
                .map_err(database("opening"))?;
            Registry::Sqlite(pool)
        } else {
            return Err(RegistryError::Url(url.to_owned()));
        };
        registry.migrate().await?;
        Ok(registry)
    }

    /// Creates the tables, in one transaction; on PostgreSQL under an advisory lock, since two
    /// processes creating the same table at once would otherwise clash.
    async fn migrate(&self) -> Result<(), RegistryError> {
        on_pool!(self, pool, begin => async {
            let mut tx = pool.begin_with(begin).await?;
            if matches!(self, Registry::Postgres(_)) {
                sqlx::query("SELECT pg_advisory_xact_lock(7365633779)")
                    .execute(&mut *tx)
                    .await?;
            }
            for statement in SCHEMA {
                sqlx::query(statement).execute(&mut *tx).await?;
            }
            tx.commit().await
        }.await)
        .map_err(database("creating tables"))
    }

    /// Makes sure `cluster` exists with range `cidr`; an existing cluster with another range is
    /// an error (its nodes' addresses would no longer fit).
    pub async fn ensure_cluster(
        &self,
        cluster: &str,
        cidr: MeshCidr,
        now: i64,
    ) -> Result<(), RegistryError> {
        check_name(cluster).map_err(RegistryError::Cluster)?;
        let existing = self.cluster_cidr(cluster).await?;
        match existing {
            Some(existing) if existing == cidr => Ok(()),
            Some(existing) => Err(RegistryError::Cluster(format!(
                "cluster {cluster} already has mesh range {existing}, not {cidr}"
            ))),
            None => {
                on_pool!(self, pool => sqlx::query(
                    "INSERT INTO mesh_clusters (cluster_id, cidr, created_at) VALUES ($1, $2, $3)
                     ON CONFLICT (cluster_id) DO NOTHING",
                )
                .bind(cluster)
                .bind(cidr.to_string())
                .bind(now)
                .execute(pool)
                .await
                .map(|_| ()))
                .map_err(database("creating a cluster"))?;
                Ok(())
            }
        }
    }

    /// The range of `cluster`, if it exists.
    pub async fn cluster_cidr(&self, cluster: &str) -> Result<Option<MeshCidr>, RegistryError> {
        let cidr: Option<String> = on_pool!(self, pool => sqlx::query_scalar(
            "SELECT cidr FROM mesh_clusters WHERE cluster_id = $1",
        )
        .bind(cluster)
        .fetch_optional(pool)
        .await)
        .map_err(database("reading a cluster"))?;
        cidr.map(|c| {
            c.parse()
                .map_err(|e| RegistryError::Cluster(format!("cluster {cluster}: {e}")))
        })
        .transpose()
    }

    /// Issues a token for `request`, signed by `key`, and records its hash.
    pub async fn issue_token(
        &self,
        key: &TokenKey,
        request: TokenRequest,
        now: i64,
    ) -> Result<Issued, RegistryError> {
        if request.uses == 0 {
            return Err(RegistryError::Request(
                "a token needs at least one use".into(),
            ));
        }
        let ttl = i64::try_from(request.ttl.as_secs()).unwrap_or(i64::MAX / 2);
        if ttl == 0 {
            return Err(RegistryError::Request(
                "a token needs a positive lifetime".into(),
            ));
        }
        if self.cluster_cidr(&request.cluster).await?.is_none() {
            return Err(RegistryError::Cluster(format!(
                "no cluster {}: create it first",
                request.cluster
            )));
        }
        let claims = JoinClaims {
            aud: crate::token::AUDIENCE.to_owned(),
            jti: uuid::Uuid::new_v4().to_string(),
            iat: now,
            nbf: now,
            exp: now + ttl,
            cluster: request.cluster,
            tenant: request.tenant,
            uses: request.uses,
            bootstrap: request.bootstrap,
        };
        on_pool!(self, pool => sqlx::query(
            "INSERT INTO mesh_tokens (token_hash, cluster_id, tenant_id, max_uses, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(token_hash(&claims.jti))
        .bind(&claims.cluster)
        .bind(claims.tenant.as_deref())
        .bind(i64::from(claims.uses))
        .bind(now)
        .bind(claims.exp)
        .execute(pool)
        .await
        .map(|_| ()))
        .map_err(database("recording a token"))?;
        Ok(Issued {
            token: key.sign(&claims),
            claims,
        })
    }

    /// Revokes the token with id `jti`: it can no longer be redeemed. Whether it was known.
    pub async fn revoke_token(&self, jti: &str, now: i64) -> Result<bool, RegistryError> {
        let done = on_pool!(self, pool => sqlx::query(
            "UPDATE mesh_tokens SET revoked_at = $1 WHERE token_hash = $2 AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(token_hash(jti))
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))
        .map_err(database("revoking a token"))?;
        Ok(done > 0)
    }

    /// Deletes tokens that expired more than `grace` before `now`; how many went.
    pub async fn sweep_tokens(&self, now: i64, grace: Duration) -> Result<u64, RegistryError> {
        let before = now - i64::try_from(grace.as_secs()).unwrap_or(0);
        on_pool!(self, pool => sqlx::query("DELETE FROM mesh_tokens WHERE expires_at < $1")
            .bind(before)
            .execute(pool)
            .await
            .map(|r| r.rows_affected()))
        .map_err(database("sweeping tokens"))
    }

    /// Redeems `request`'s token for its node: the node's identity and peers.
    pub async fn join(
        &self,
        verifier: &TokenVerifier,
        request: &JoinRequest,
        now: i64,
    ) -> Result<Identity, JoinError> {
        let claims = verifier.verify(&request.token, now)?;
        check_name(&request.name).map_err(JoinError::Request)?;
        check_public_key(&request.public_key).map_err(JoinError::Request)?;
        if let Some(endpoint) = &request.endpoint {
            check_endpoint(endpoint).map_err(JoinError::Request)?;
        }
        let hash = token_hash(&claims.jti);
        if let Some(node) = self.replay(&claims, &hash, request).await? {
            return self.identity(node, true).await;
        }
        let cidr = self
            .cluster_cidr(&claims.cluster)
            .await?
            .ok_or_else(|| RegistryError::Cluster(format!("no cluster {}", claims.cluster)))?;
        // A unique-key clash means another node took the address (or name) between our read
        // and our insert: start again with what is taken now.
        let mut attempts = 0;
        let outcome = loop {
            attempts += 1;
            match self.try_join(&hash, request, cidr, now).await {
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() && attempts < 8 => {}
                other => break other.map_err(database("joining"))?,
            }
        };
        match outcome {
            Attempt::Joined(node) => self.identity(node, false).await,
            Attempt::Full => Err(JoinError::Full(claims.cluster)),
            Attempt::Taken => Err(JoinError::NameTaken(request.name.clone())),
            Attempt::Refused => {
                // Lost a race with our own earlier attempt? Then that identity is ours.
                if let Some(node) = self.replay(&claims, &hash, request).await? {
                    return self.identity(node, true).await;
                }
                Err(self.why_refused(&claims, &hash, now).await?)
            }
        }
    }

    /// The node this same token, name and key already enrolled, if any.
    async fn replay(
        &self,
        claims: &JoinClaims,
        hash: &str,
        request: &JoinRequest,
    ) -> Result<Option<Node>, RegistryError> {
        on_pool!(self, pool => async {
            let row = sqlx::query(concat!(
                "SELECT ",
                node_columns!(),
                " FROM mesh_nodes WHERE cluster_id = $1 AND node_name = $2 AND public_key = $3
                   AND token_hash = $4 AND revoked_at IS NULL"
            ))
            .bind(&claims.cluster)
            .bind(&request.name)
            .bind(&request.public_key)
            .bind(hash)
            .fetch_optional(pool)
            .await?;
            row.map(|row| Ok(node_of!(row))).transpose()
        }.await)
        .map_err(database("looking for an earlier join"))
    }

    /// One transaction: take a use of the token, then register the node (keeping the address
    /// of a node of the same name that joins again with a new key).
    async fn try_join(
        &self,
        hash: &str,
        request: &JoinRequest,
        cidr: MeshCidr,
        now: i64,
    ) -> Result<Attempt, sqlx::Error> {
        on_pool!(self, pool, begin => async {
            let mut tx = pool.begin_with(begin).await?;
            let taken_use = sqlx::query(
                "UPDATE mesh_tokens SET uses = uses + 1, used_at = $1
                 WHERE token_hash = $2 AND revoked_at IS NULL AND expires_at > $3 AND uses < max_uses
                 RETURNING cluster_id, tenant_id",
            )
            .bind(now)
            .bind(hash)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = taken_use else {
                tx.rollback().await?;
                return Ok(Attempt::Refused);
            };
            let cluster: String = row.try_get("cluster_id")?;
            let tenant: Option<String> = row.try_get("tenant_id")?;
            let same_name: Option<(String, String, Option<i64>)> = sqlx::query_as(
                "SELECT address, public_key, revoked_at FROM mesh_nodes
                 WHERE cluster_id = $1 AND node_name = $2",
            )
            .bind(&cluster)
            .bind(&request.name)
            .fetch_optional(&mut *tx)
            .await?;
            // An active node keeps its name: another key must wait until it is revoked.
            if let Some((_, key, None)) = &same_name
                && *key != request.public_key
            {
                tx.rollback().await?;
                return Ok(Attempt::Taken);
            }
            let address = match same_name.and_then(|(a, _, _)| a.parse::<Ipv4Addr>().ok()) {
                Some(address) => address,
                None => {
                    let taken: Vec<String> =
                        sqlx::query_scalar("SELECT address FROM mesh_nodes WHERE cluster_id = $1")
                            .bind(&cluster)
                            .fetch_all(&mut *tx)
                            .await?;
                    let taken: HashSet<Ipv4Addr> =
                        taken.iter().filter_map(|a| a.parse().ok()).collect();
                    match allocate(&cluster, &request.name, cidr, &taken) {
                        Some(address) => address,
                        None => {
                            tx.rollback().await?;
                            return Ok(Attempt::Full);
                        }
                    }
                }
            };
            sqlx::query(
                "INSERT INTO mesh_nodes (cluster_id, node_name, tenant_id, public_key, address,
                                         endpoint, token_hash, joined_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (cluster_id, node_name) DO UPDATE SET
                    tenant_id = excluded.tenant_id, public_key = excluded.public_key,
                    endpoint = excluded.endpoint, token_hash = excluded.token_hash,
                    joined_at = excluded.joined_at, revoked_at = NULL",
            )
            .bind(&cluster)
            .bind(&request.name)
            .bind(tenant.as_deref())
            .bind(&request.public_key)
            .bind(address.to_string())
            .bind(request.endpoint.as_deref())
            .bind(hash)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE mesh_clusters SET revision = revision + 1 WHERE cluster_id = $1")
                .bind(&cluster)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(Attempt::Joined(Node {
                cluster,
                name: request.name.clone(),
                tenant,
                public_key: request.public_key.clone(),
                address,
                endpoint: request.endpoint.clone(),
                joined_at: now,
                revoked_at: None,
            }))
        }.await)
    }

    /// Why the registry refused a token that verified: its record tells.
    async fn why_refused(
        &self,
        claims: &JoinClaims,
        hash: &str,
        now: i64,
    ) -> Result<JoinError, RegistryError> {
        let id = claims.jti.clone();
        let row = on_pool!(self, pool => async {
            let row = sqlx::query(
                "SELECT uses, max_uses, expires_at, revoked_at FROM mesh_tokens WHERE token_hash = $1",
            )
            .bind(hash)
            .fetch_optional(pool)
            .await?;
            row.map(|row| -> Result<(i64, i64, i64, Option<i64>), sqlx::Error> {
                Ok((
                    row.try_get("uses")?,
                    row.try_get("max_uses")?,
                    row.try_get("expires_at")?,
                    row.try_get("revoked_at")?,
                ))
            })
            .transpose()
        }.await)
        .map_err(database("reading a token"))?;
        Ok(match row {
            None => JoinError::Unknown(id),
            Some((_, _, _, Some(_))) => JoinError::Revoked(id),
            Some((_, _, expires_at, None)) if expires_at <= now => JoinError::Expired(id),
            Some(_) => JoinError::UsedUp(id),
        })
    }

    /// Revokes node `name` of `cluster`: it disappears from every peer list. Whether it existed.
    pub async fn revoke_node(
        &self,
        cluster: &str,
        name: &str,
        now: i64,
    ) -> Result<bool, RegistryError> {
        on_pool!(self, pool, begin => async {
            let mut tx = pool.begin_with(begin).await?;
            let done = sqlx::query(
                "UPDATE mesh_nodes SET revoked_at = $1
                 WHERE cluster_id = $2 AND node_name = $3 AND revoked_at IS NULL",
            )
            .bind(now)
            .bind(cluster)
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if done > 0 {
                sqlx::query("UPDATE mesh_clusters SET revision = revision + 1 WHERE cluster_id = $1")
                    .bind(cluster)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(done > 0)
        }.await)
        .map_err(database("revoking a node"))
    }

    /// Every node of `cluster`, revoked ones included, by name.
    pub async fn nodes(&self, cluster: &str) -> Result<Vec<Node>, RegistryError> {
        on_pool!(self, pool => async {
            let rows = sqlx::query(concat!(
                "SELECT ",
                node_columns!(),
                " FROM mesh_nodes WHERE cluster_id = $1 ORDER BY node_name"
            ))
            .bind(cluster)
            .fetch_all(pool)
            .await?;
            rows.into_iter().map(|row| Ok(node_of!(row))).collect::<Result<Vec<_>, sqlx::Error>>()
        }.await)
        .map_err(database("listing nodes"))
    }

    /// The node `name` of `cluster`, if registered (revoked or not).
    pub async fn node(&self, cluster: &str, name: &str) -> Result<Option<Node>, RegistryError> {
        on_pool!(self, pool => async {
            let row = sqlx::query(concat!(
                "SELECT ",
                node_columns!(),
                " FROM mesh_nodes WHERE cluster_id = $1 AND node_name = $2"
            ))
            .bind(cluster)
            .bind(name)
            .fetch_optional(pool)
            .await?;
            row.map(|row| Ok(node_of!(row))).transpose()
        }.await)
        .map_err(database("reading a node"))
    }

    /// The revision of `cluster`: it changes whenever a node joins or is revoked.
    pub async fn revision(&self, cluster: &str) -> Result<Option<i64>, RegistryError> {
        on_pool!(self, pool => sqlx::query_scalar(
            "SELECT revision FROM mesh_clusters WHERE cluster_id = $1",
        )
        .bind(cluster)
        .fetch_optional(pool)
        .await)
        .map_err(database("reading a cluster's revision"))
    }

    /// What `node` should know now: its cluster's revision and the peers it may talk to. A
    /// revoked node gets no peers.
    pub async fn identity(&self, node: Node, replayed: bool) -> Result<Identity, JoinError> {
        let (cidr, revision): (String, i64) = on_pool!(self, pool => sqlx::query_as(
            "SELECT cidr, revision FROM mesh_clusters WHERE cluster_id = $1",
        )
        .bind(&node.cluster)
        .fetch_one(pool)
        .await)
        .map_err(database("reading a cluster"))?;
        let peers = if node.revoked_at.is_some() {
            Vec::new()
        } else {
            self.nodes(&node.cluster)
                .await?
                .into_iter()
                .filter(|peer| {
                    peer.name != node.name
                        && peer.revoked_at.is_none()
                        && may_peer(node.tenant.as_deref(), peer.tenant.as_deref())
                })
                .map(|peer| Peer {
                    allowed_ips: vec![format!("{}/32", peer.address)],
                    name: peer.name,
                    public_key: peer.public_key,
                    endpoint: peer.endpoint,
                    tenant: peer.tenant,
                })
                .collect()
        };
        Ok(Identity {
            node,
            mesh_cidr: cidr,
            revision,
            peers,
            replayed,
        })
    }
}
