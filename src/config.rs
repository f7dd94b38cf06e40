//! The settings file `keel run --config FILE` reads (TOML). Everything has a default; flags on the
//! command line win over the file.
//!
//! ```toml
//! [api]
//! listen = "127.0.0.1:8080"
//! pg_listen = "127.0.0.1:5433"              # PostgreSQL protocol; "off" serves none
//! jwt_secret = "a long random string"      # HS256 secret for the platform's JWTs
//! max_connections_per_tenant = 2000         # live WebSocket connections (/ws, /graphql)
//! subscriber_queue = 256                    # updates buffered per subscriber before it lags
//! socket_send_buffer = 262144               # cap on each HTTP API connection's kernel send buffer
//! query_memory_mb = 2048                    # memory one SQL query's scans, joins, sorts may hold
//! query_result_mb = 256                     # result one SQL query may return
//! query_seconds = 60                        # longest one SQL query may run
//!
//! [[api.tokens]]                            # static tokens, e.g. for Grafana
//! name = "grafana"
//! token = "kt_a-long-random-string"
//! tenant_id = "5eed517e-ba5e-da7a-517e-ba5eda7a0001"
//!
//! [[api.tokens]]
//! name = "ops"
//! token = "kt_another-long-random-string"
//! role = "admin"
//!
//! [foghorn]
//! listen = "127.0.0.1:18008"                # MistServer-compatible balancer HTTP; "off" serves none
//! grpc_listen = "127.0.0.1:18019"           # gRPC Route; "off" serves none
//! weights = { cpu = 500, ram = 500, bw = 1000, geo = 1000, bonus = 50 }
//! cutoff = { cpu_percent = 90.0, bw_percent = 95.0 }   # opt-in; absent = the platform's gradient only
//! # geoip_mmdb = "/var/lib/GeoIP/GeoLite2-City.mmdb"   # places clients that send no coordinates
//! # decisions_per_client = 20.0             # recorded per HTTP client address a second (unset: no limit)
//! ```

use std::path::Path;

use anyhow::Context;
use keel_api::auth::StaticToken;
use keel_api::server::Limits;
use keel_dataflows::foghorn::{Cutoff, Policy, Weights};
use serde::Deserialize;

/// The whole file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The HTTP API.
    #[serde(default)]
    pub api: ApiConfig,
    /// Foghorn routing.
    #[serde(default)]
    pub foghorn: FoghornConfig,
}

/// `[foghorn]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FoghornConfig {
    /// Address of the MistServer-compatible HTTP surface.
    pub listen: Option<String>,
    /// Address of the gRPC service.
    pub grpc_listen: Option<String>,
    /// Score weights (missing ones keep their defaults).
    #[serde(default)]
    pub weights: Option<Weights>,
    /// Opt-in hard utilisation cutoff.
    #[serde(default)]
    pub cutoff: Option<Cutoff>,
    /// A GeoIP database (MaxMind DB format) placing clients that send no coordinates.
    pub geoip_mmdb: Option<std::path::PathBuf>,
    /// Decisions recorded per second for one HTTP client address (bursts of five seconds'
    /// worth; the rest are answered but not recorded); unset or 0, no limit. Off by default:
    /// behind a proxy on another host every viewer has the proxy's address.
    pub decisions_per_client: Option<f64>,
}

impl FoghornConfig {
    /// The routing policy, checked.
    pub fn policy(&self) -> anyhow::Result<Policy> {
        let weights = self.weights.unwrap_or_default();
        for (name, value) in [
            ("cpu", weights.cpu),
            ("ram", weights.ram),
            ("bw", weights.bw),
            ("geo", weights.geo),
            ("bonus", weights.bonus),
        ] {
            anyhow::ensure!(
                value <= keel_api::foghorn::MAX_WEIGHT,
                "foghorn.weights.{name} = {value}: at most {}",
                keel_api::foghorn::MAX_WEIGHT
            );
        }
        let cutoff = self.cutoff.unwrap_or_default();
        for (name, value) in [
            ("cpu_percent", cutoff.cpu_percent),
            ("ram_percent", cutoff.ram_percent),
            ("bw_percent", cutoff.bw_percent),
        ] {
            if let Some(value) = value {
                anyhow::ensure!(
                    value.is_finite() && (0.0..=100.0).contains(&value),
                    "foghorn.cutoff.{name} = {value}: a percentage from 0 to 100"
                );
            }
        }
        Ok(Policy { weights, cutoff })
    }

    /// The limit on decisions recorded per client, checked; `None` when it is 0.
    pub fn client_limit(&self) -> anyhow::Result<Option<keel_api::foghorn_limit::ClientLimit>> {
        let rate = self.decisions_per_client.unwrap_or(0.0);
        anyhow::ensure!(
            rate.is_finite() && (0.0..=1e6).contains(&rate),
            "foghorn.decisions_per_client = {rate}: a rate from 0 (no limit) to 1000000"
        );
        Ok((rate > 0.0).then(|| keel_api::foghorn_limit::ClientLimit::new(rate)))
    }
}

/// `[api]`.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Address to listen on.
    pub listen: Option<String>,
    /// Address the PostgreSQL protocol listens on.
    pub pg_listen: Option<String>,
    /// HS256 secret for bearer JWTs.
    pub jwt_secret: Option<String>,
    /// Static tokens.
    #[serde(default)]
    pub tokens: Vec<StaticToken>,
    /// Live WebSocket connections one tenant may hold.
    pub max_connections_per_tenant: Option<usize>,
    /// Updates buffered per subscriber before it counts as lagged.
    pub subscriber_queue: Option<usize>,
    /// Cap on the kernel send buffer of each connection to the HTTP API port, in bytes (the
    /// kernel's autotuning if unset; the PostgreSQL port is not affected).
    pub socket_send_buffer: Option<usize>,
    /// MiB one SQL query's scanned rows, joins, sorts and aggregations may hold.
    pub query_memory_mb: Option<usize>,
    /// MiB of result one SQL query may return.
    pub query_result_mb: Option<usize>,
    /// Seconds one SQL query may run.
    pub query_seconds: Option<u64>,
}

impl ApiConfig {
    /// The subscription limits, defaults filled in.
    pub fn limits(&self) -> anyhow::Result<Limits> {
        let defaults = Limits::default();
        let limits = Limits {
            connections_per_tenant: self
                .max_connections_per_tenant
                .unwrap_or(defaults.connections_per_tenant),
            queue: self.subscriber_queue.unwrap_or(defaults.queue),
            send_buffer: self.socket_send_buffer.or(defaults.send_buffer),
            body_wait: defaults.body_wait,
            write_wait: defaults.write_wait,
            query: keel_api::sql::Limits {
                memory: self
                    .query_memory_mb
                    .map_or(defaults.query.memory, |mb| mb.saturating_mul(1 << 20)),
                result: self
                    .query_result_mb
                    .map_or(defaults.query.result, |mb| mb.saturating_mul(1 << 20)),
                time: self
                    .query_seconds
                    .map_or(defaults.query.time, std::time::Duration::from_secs),
            },
        };
        if self.query_memory_mb == Some(0)
            || self.query_result_mb == Some(0)
            || self.query_seconds == Some(0)
        {
            anyhow::bail!(
                "api.query_memory_mb, api.query_result_mb and api.query_seconds must be above 0"
            );
        }
        if limits.connections_per_tenant == 0 || limits.queue == 0 {
            anyhow::bail!(
                "api.max_connections_per_tenant and api.subscriber_queue must be above 0"
            );
        }
        if limits.send_buffer.is_some_and(|bytes| bytes < 4096) {
            anyhow::bail!("api.socket_send_buffer must be at least 4096 bytes");
        }
        Ok(limits)
    }
}

impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("listen", &self.listen)
            .field("pg_listen", &self.pg_listen)
            .field("jwt_secret", &self.jwt_secret.as_ref().map(|_| "***"))
            .field("tokens", &self.tokens)
            .field(
                "max_connections_per_tenant",
                &self.max_connections_per_tenant,
            )
            .field("subscriber_queue", &self.subscriber_queue)
            .field("socket_send_buffer", &self.socket_send_buffer)
            .field("query_memory_mb", &self.query_memory_mb)
            .field("query_result_mb", &self.query_result_mb)
            .field("query_seconds", &self.query_seconds)
            .finish()
    }
}

impl Config {
    /// Reads and checks a settings file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        toml::from_str(&text)
            .with_context(|| format!("{} is not a valid settings file", path.display()))
    }
}

/// The bearer credentials `--jwt-secret` and the `[[api.tokens]]` of a settings file give (the
/// flag wins over the file's `jwt_secret`); none when neither gives any.
pub fn credentials(
    jwt_secret: Option<&str>,
    config: Option<&Path>,
) -> anyhow::Result<Option<keel_api::auth::Auth>> {
    let settings = match config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let secret = jwt_secret.map(str::to_owned).or(settings.api.jwt_secret);
    if secret.is_none() && settings.api.tokens.is_empty() {
        return Ok(None);
    }
    keel_api::auth::Auth::new(secret, settings.api.tokens)
        .map(Some)
        .map_err(|problems| anyhow::anyhow!("settings: {problems}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses() {
        let doc = include_str!("config.rs");
        let example: String = doc
            .lines()
            .skip_while(|l| !l.starts_with("//! ```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| l.trim_start_matches("//!").trim_start_matches(' '))
            .collect::<Vec<_>>()
            .join("\n");
        let config: Config = toml::from_str(&example).unwrap();
        assert_eq!(config.api.tokens.len(), 2);
        assert_eq!(config.api.limits().unwrap().connections_per_tenant, 2000);
        assert_eq!(config.api.limits().unwrap().send_buffer, Some(262_144));
        let zero: Config = toml::from_str("[api]\nsubscriber_queue = 0").unwrap();
        assert!(zero.api.limits().is_err());
        let tiny: Config = toml::from_str("[api]\nsocket_send_buffer = 100").unwrap();
        assert!(tiny.api.limits().is_err());
        let unset: Config = toml::from_str("[api]").unwrap();
        assert_eq!(unset.api.limits().unwrap().send_buffer, None);
        assert_eq!(
            unset.api.limits().unwrap().query,
            keel_api::sql::Limits::SERVED
        );
        let query = config.api.limits().unwrap().query;
        assert_eq!((query.memory, query.result), (2 << 30, 256 << 20));
        assert_eq!(query.time, std::time::Duration::from_secs(60));
        let tight: Config =
            toml::from_str("[api]\nquery_result_mb = 1\nquery_seconds = 5").unwrap();
        let query = tight.api.limits().unwrap().query;
        assert_eq!((query.result, query.time.as_secs()), (1 << 20, 5));
        let none: Config = toml::from_str("[api]\nquery_seconds = 0").unwrap();
        assert!(none.api.limits().is_err());
        assert!(!format!("{config:?}").contains("a long random string"));
        let bad: Result<Config, _> = toml::from_str("[api]\nlisten = 1\nunknown = true");
        assert!(bad.is_err());
        let policy = config.foghorn.policy().unwrap();
        assert_eq!(policy.cutoff.cpu_percent, Some(90.0));
        assert_eq!(policy.weights, Weights::default());
        let partial: Config = toml::from_str("[foghorn]\nweights = { geo = 2000 }").unwrap();
        assert_eq!(partial.foghorn.policy().unwrap().weights.geo, 2000);
        assert_eq!(partial.foghorn.policy().unwrap().weights.cpu, 500);
        for bad in [
            "[foghorn]\nweights = { cpu = 99999999 }",
            "[foghorn]\ncutoff = { cpu_percent = 120.0 }",
        ] {
            let config: Config = toml::from_str(bad).unwrap();
            assert!(config.foghorn.policy().is_err(), "{bad}");
        }
        // Decisions recorded per client: no limit unless set; 0 is no limit too.
        let rate = |text: &str| {
            let config: Config = toml::from_str(text).unwrap();
            config
                .foghorn
                .client_limit()
                .map(|limit| limit.map(|l| l.per_second()))
        };
        assert_eq!(rate("").unwrap(), None);
        assert_eq!(
            rate("[foghorn]\ndecisions_per_client = 5.5").unwrap(),
            Some(5.5)
        );
        assert_eq!(rate("[foghorn]\ndecisions_per_client = 0").unwrap(), None);
        for bad in ["-1", "nan", "inf", "2e6"] {
            let error = rate(&format!("[foghorn]\ndecisions_per_client = {bad}")).unwrap_err();
            assert!(
                error.to_string().contains("foghorn.decisions_per_client"),
                "{bad}: {error}"
            );
        }
    }
}
