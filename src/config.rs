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
//! ```

use std::path::Path;

use anyhow::Context;
use keel_api::auth::StaticToken;
use keel_api::server::Limits;
use serde::Deserialize;

/// The whole file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The HTTP API.
    #[serde(default)]
    pub api: ApiConfig,
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
        };
        if limits.connections_per_tenant == 0 || limits.queue == 0 {
            anyhow::bail!(
                "api.max_connections_per_tenant and api.subscriber_queue must be above 0"
            );
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
        let zero: Config = toml::from_str("[api]\nsubscriber_queue = 0").unwrap();
        assert!(zero.api.limits().is_err());
        assert!(!format!("{config:?}").contains("a long random string"));
        let bad: Result<Config, _> = toml::from_str("[api]\nlisten = 1\nunknown = true");
        assert!(bad.is_err());
    }
}
