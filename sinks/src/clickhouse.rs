//! ClickHouse: tables that mirror the live tables, written as upserts per closed epoch.
//!
//! Each output table becomes a `ReplacingMergeTree` ordered by the row type's key columns, with
//! two extra columns: `_version` (microseconds since the Unix epoch when Keel staged the row,
//! and above the newest version stored when the writer started, so it rises across restarts
//! whatever the clock does) and `_deleted` (1 for a tombstone: the key has no row any more). A
//! replayed epoch therefore replaces what an earlier run wrote instead of adding to it, and the
//! current contents of a table are
//!
//! ```sql
//! SELECT … FROM keel.streams FINAL WHERE _deleted = 0
//! ```
//!
//! Keel asks the server its version and uses what it offers ([`Features`]): on current
//! ClickHouse, times are `DateTime64(3, 'UTC')`, few-valued text is `LowCardinality(String)`,
//! windowed tables get a `TTL`, and tombstones are the engine's own `is_deleted` column; on
//! older servers (Debian's 18.16) times are `Int64` milliseconds and the rest is left out.
//! Partitions follow the platform: by month of the key's time column and by tenant when a row is
//! keyed by a time window, by tenant otherwise, so one key always lands in one partition (a
//! `ReplacingMergeTree` only replaces within a partition).
//!
//! Everything goes over the HTTP interface (`INSERT … FORMAT RowBinary`, one request per table
//! and flush, rows encoded by [`crate::rowbinary`]) with a blocking client; the writer runs on a
//! thread of its own.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use arrow::datatypes::DataType;
use keel_operators::table::{Row, TableRegistry};

use crate::live::fields_of;

/// Why a ClickHouse call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClickHouseError {
    /// The server could not be reached (refused, reset, timed out): worth retrying.
    #[error("cannot reach ClickHouse at {url}: {message}")]
    Unreachable {
        /// The server.
        url: String,
        /// What the client said.
        message: String,
    },
    /// The server answered with an error.
    #[error("ClickHouse refused {what}: {message}")]
    Refused {
        /// The statement, shortened.
        what: String,
        /// The server's message.
        message: String,
    },
    /// A setting is wrong (URL, database name).
    #[error("{0}")]
    Config(String),
}

impl ClickHouseError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            ClickHouseError::Unreachable { .. } => true,
            // Too many parts, memory limits, a table being altered: the server says so with
            // codes that clear on their own; a malformed statement never does.
            ClickHouseError::Refused { message, .. } => [
                "TOO_MANY_PARTS",
                "MEMORY_LIMIT",
                "TIMEOUT",
                "Code: 252",
                "Code: 241",
            ]
            .iter()
            .any(|code| message.contains(code)),
            ClickHouseError::Config(_) => false,
        }
    }
}

/// A server version, `major.minor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32);

impl Version {
    /// Parses `18.16.1` or `24.8.4.13`.
    pub fn parse(text: &str) -> Option<Version> {
        let mut parts = text.trim().split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        Some(Version(major, minor))
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

/// What a server offers, decided from its version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    /// `DateTime64(3, 'UTC')` (20.1).
    pub datetime64: bool,
    /// Table `TTL` expressions (19.6).
    pub ttl: bool,
    /// `LowCardinality(String)` without an experimental setting (19.3).
    pub low_cardinality: bool,
    /// `ReplacingMergeTree(version, is_deleted)` (23.2).
    pub is_deleted: bool,
}

impl Features {
    /// What `version` offers.
    pub fn of(version: Version) -> Features {
        Features {
            datetime64: version >= Version(20, 1),
            ttl: version >= Version(19, 6),
            low_cardinality: version >= Version(19, 3),
            is_deleted: version >= Version(23, 2),
        }
    }
}

/// How a column is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Text,
    UInt,
    Int,
    Float,
    Bool,
    /// Milliseconds since the Unix epoch.
    Time,
    /// Anything else, stored as its JSON text.
    Json,
}

/// One column of a table.
#[derive(Clone, Debug)]
pub(crate) struct Column {
    pub(crate) name: String,
    pub(crate) kind: Kind,
    pub(crate) nullable: bool,
    low_cardinality: bool,
    /// Part of the table's key.
    pub(crate) key: bool,
}

/// The shape of one output table, taken from its row type.
#[derive(Clone, Debug)]
pub struct TableSpec {
    /// Table name (as the live table's).
    pub name: &'static str,
    pub(crate) columns: Vec<Column>,
    pub(crate) key: Vec<&'static str>,
    tenant: bool,
    retention_days: Option<u32>,
}

impl TableSpec {
    /// The columns [`TableSpec::encode`] writes, in its order, as an `INSERT` names them.
    pub fn column_list(&self) -> String {
        let names: Vec<String> = self
            .columns
            .iter()
            .map(|c| format!("`{}`", c.name))
            .chain(["`_version`".to_owned(), "`_deleted`".to_owned()])
            .collect();
        format!("({})", names.join(", "))
    }

    /// The spec of a table of `R` rows.
    pub fn of<R: Row>(name: &'static str) -> TableSpec {
        let mut columns = fields_of::<R>(name)
            .iter()
            .map(|field| {
                let kind = match field.data_type() {
                    DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Kind::Text,
                    DataType::UInt8 | DataType::UInt16 | DataType::UInt32 | DataType::UInt64 => {
                        Kind::UInt
                    }
                    DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => {
                        Kind::Int
                    }
                    DataType::Float16 | DataType::Float32 | DataType::Float64 => Kind::Float,
                    DataType::Boolean => Kind::Bool,
                    DataType::Timestamp(..) => Kind::Time,
                    _ => Kind::Json,
                };
                Column {
                    name: field.name().clone(),
                    kind,
                    nullable: field.is_nullable(),
                    low_cardinality: kind == Kind::Text
                        && R::LOW_CARDINALITY.contains(&field.name().as_str()),
                    key: false,
                }
            })
            .collect::<Vec<_>>();
        let key = if R::KEY_COLUMNS.is_empty() {
            columns
                .first()
                .map(|c| vec![leak(&c.name)])
                .unwrap_or_default()
        } else {
            R::KEY_COLUMNS.to_vec()
        };
        for column in &mut columns {
            column.key = key.contains(&column.name.as_str());
        }
        TableSpec {
            name,
            tenant: columns.iter().any(|c| c.name == "tenant_id" && !c.nullable),
            columns,
            key,
            retention_days: R::RETENTION_DAYS,
        }
    }

    /// Column names, in order, without Keel's bookkeeping columns.
    pub fn column_names(&self) -> Vec<&str> {
        self.columns.iter().map(|c| c.name.as_str()).collect()
    }

    /// The key columns.
    pub fn key_columns(&self) -> &[&'static str] {
        &self.key
    }

    fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// The first key column that is a time: rows are windows of it.
    fn window_column(&self) -> Option<&Column> {
        self.key
            .iter()
            .filter_map(|k| self.column(k))
            .find(|c| c.kind == Kind::Time && !c.nullable)
    }

    fn column_type(&self, column: &Column, features: Features) -> String {
        let base = match column.kind {
            Kind::Text if column.low_cardinality && features.low_cardinality => {
                "LowCardinality(String)"
            }
            Kind::Text | Kind::Json => "String",
            Kind::UInt => "UInt64",
            Kind::Int => "Int64",
            Kind::Float => "Float64",
            Kind::Bool => "UInt8",
            Kind::Time if features.datetime64 => "DateTime64(3, 'UTC')",
            Kind::Time => "Int64",
        };
        // LowCardinality(Nullable(String)) is the valid spelling, not the other way round.
        if column.nullable && base.starts_with("LowCardinality") {
            "LowCardinality(Nullable(String))".to_owned()
        } else if column.nullable {
            format!("Nullable({base})")
        } else {
            base.to_owned()
        }
    }

    fn date_of(&self, column: &Column, features: Features) -> String {
        if features.datetime64 {
            format!("`{}`", column.name)
        } else {
            format!("toDateTime(intDiv(`{}`, 1000))", column.name)
        }
    }

    /// The `CREATE TABLE` statement for `database`.
    pub fn create_statement(&self, database: &str, features: Features) -> String {
        let mut sql = format!("CREATE TABLE IF NOT EXISTS `{database}`.`{}` (", self.name);
        for column in &self.columns {
            let _ = write!(
                sql,
                "`{}` {}, ",
                column.name,
                self.column_type(column, features)
            );
        }
        sql.push_str("`_version` UInt64, `_deleted` UInt8) ENGINE = ");
        if features.is_deleted {
            sql.push_str("ReplacingMergeTree(`_version`, `_deleted`)");
        } else {
            sql.push_str("ReplacingMergeTree(`_version`)");
        }
        let window = self.window_column();
        let partition = match (window, self.tenant) {
            (Some(w), true) => Some(format!(
                "(toYYYYMM({}), `tenant_id`)",
                self.date_of(w, features)
            )),
            (Some(w), false) => Some(format!("toYYYYMM({})", self.date_of(w, features))),
            (None, true) => Some("`tenant_id`".to_owned()),
            (None, false) => None,
        };
        if let Some(partition) = partition {
            let _ = write!(sql, " PARTITION BY {partition}");
        }
        let order: Vec<String> = self.key.iter().map(|k| format!("`{k}`")).collect();
        let _ = write!(sql, " ORDER BY ({})", order.join(", "));
        if let (Some(w), Some(days), true) = (window, self.retention_days, features.ttl) {
            let _ = write!(
                sql,
                " TTL toDateTime({}) + INTERVAL {days} DAY",
                self.date_of(w, features)
            );
        }
        sql
    }

    /// A query for the table's current rows (no bookkeeping columns), in key order, as
    /// `JSONEachRow`; times as milliseconds whatever the server stores.
    pub fn select_current(&self, database: &str, features: Features) -> String {
        self.select(self.columns.iter(), database, features, "")
    }

    /// A query for the keys of the table's current rows (not tombstoned), in key order, as
    /// `JSONEachRow`; times as milliseconds whatever the server stores. With `since`, a table
    /// of time windows answers only windows starting then or later.
    pub fn select_keys(&self, database: &str, features: Features, since: Option<i64>) -> String {
        let keys = self.key.iter().filter_map(|k| self.column(k));
        let window = since.and_then(|since| Some((self.window_column()?, since)));
        let filter = match window {
            Some((column, since)) if features.datetime64 => {
                format!(" AND toUnixTimestamp64Milli(`{}`) >= {since}", column.name)
            }
            Some((column, since)) => format!(" AND `{}` >= {since}", column.name),
            None => String::new(),
        };
        self.select(keys, database, features, &filter)
    }

    fn select<'a>(
        &self,
        columns: impl Iterator<Item = &'a Column>,
        database: &str,
        features: Features,
        filter: &str,
    ) -> String {
        let columns: Vec<String> = columns
            .map(|c| match c.kind {
                Kind::Time if features.datetime64 && c.nullable => format!(
                    "if(isNull(`{0}`), NULL, toUnixTimestamp64Milli(assumeNotNull(`{0}`))) AS `{0}`",
                    c.name
                ),
                Kind::Time if features.datetime64 => {
                    format!("toUnixTimestamp64Milli(`{0}`) AS `{0}`", c.name)
                }
                _ => format!("`{}`", c.name),
            })
            .collect();
        let order: Vec<String> = self.key.iter().map(|k| format!("`{k}`")).collect();
        format!(
            "SELECT {} FROM `{database}`.`{}` FINAL WHERE `_deleted` = 0{filter} ORDER BY {} FORMAT JSONEachRow",
            columns.join(", "),
            self.name,
            order.join(", ")
        )
    }

    /// Reads one line of [`select_keys`](TableSpec::select_keys)' answer as the row type's key:
    /// the key columns in order (the server may quote 64-bit integers; they are read back as
    /// numbers).
    pub fn parse_key<K: serde::de::DeserializeOwned>(&self, line: &str) -> Result<K, String> {
        let mut object: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(line).map_err(|e| format!("{e} in {line:?}"))?;
        let mut parts = Vec::with_capacity(self.key.len());
        for name in &self.key {
            let value = object
                .remove(*name)
                .ok_or_else(|| format!("no key column {name} in {line:?}"))?;
            let numeric = self
                .column(name)
                .is_some_and(|c| matches!(c.kind, Kind::Int | Kind::UInt | Kind::Time));
            parts.push(match value {
                serde_json::Value::String(text) if numeric => {
                    let number: serde_json::Number = text
                        .parse()
                        .map_err(|_| format!("{name} {text:?} is not a number"))?;
                    serde_json::Value::Number(number)
                }
                other => other,
            });
        }
        let key = if parts.len() == 1 {
            parts.pop().expect("one part")
        } else {
            serde_json::Value::Array(parts)
        };
        serde_json::from_value(key).map_err(|e| format!("{e} in {line:?}"))
    }
}

/// `http://USER:PASSWORD@HOST:PORT` → (`http://HOST:PORT`, `Basic …`); passwords are
/// percent-decoded.
fn split_credentials(url: &str) -> (String, Option<String>) {
    use base64::Engine as _;
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_owned(), None);
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return (url.to_owned(), None);
    };
    let credentials = &rest[..at];
    let decoded = percent_decode(credentials);
    let token = base64::engine::general_purpose::STANDARD.encode(decoded);
    (
        format!("{scheme}://{}", &rest[at + 1..]),
        Some(format!("Basic {token}")),
    )
}

/// `%XX` escapes decoded (`+` stays `+`, as in a URL's user part).
fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    out
}

fn leak(text: &str) -> &'static str {
    Box::leak(text.to_owned().into_boxed_str())
}

/// Collects the specs of every table a dataflow declares.
#[derive(Debug, Default)]
pub struct Specs(pub Vec<TableSpec>);

impl TableRegistry for Specs {
    fn declare<R: Row>(&mut self, table: &'static str) {
        self.0.push(TableSpec::of::<R>(table));
    }
}

/// A ClickHouse server reached over HTTP, with the database Keel writes to.
#[derive(Clone)]
pub struct ClickHouse {
    agent: ureq::Agent,
    /// The server's address, without credentials.
    url: String,
    /// `Basic …` when the URL carried a user.
    authorization: Option<String>,
    database: String,
    version: Version,
    features: Features,
}

impl std::fmt::Debug for ClickHouse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouse")
            .field("url", &self.url)
            .field("database", &self.database)
            .field("version", &self.version)
            .finish()
    }
}

fn valid_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit()
}

fn shorten(sql: &str) -> String {
    let one_line = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(120) {
        Some((at, _)) => format!("{}…", &one_line[..at]),
        None => one_line,
    }
}

impl ClickHouse {
    /// Connects to the server at `url` (`http://HOST:PORT`, user and password may be given as
    /// `http://USER:PASSWORD@HOST:PORT`) and reads its version. `database` is where tables go.
    pub fn connect(url: &str, database: &str) -> Result<ClickHouse, ClickHouseError> {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ClickHouseError::Config(format!(
                "{url:?} is not a ClickHouse HTTP address: use http://HOST:8123"
            )));
        }
        if !valid_identifier(database) {
            return Err(ClickHouseError::Config(format!(
                "{database:?} is not a plain database name (letters, digits and _)"
            )));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_global(Some(Duration::from_secs(300)))
            .build()
            .into();
        let (url, authorization) = split_credentials(url.trim_end_matches('/'));
        let mut client = ClickHouse {
            agent,
            url,
            authorization,
            database: database.to_owned(),
            version: Version(0, 0),
            features: Features::of(Version(0, 0)),
        };
        let text = client.query("SELECT version()")?;
        client.version = Version::parse(&text).ok_or_else(|| ClickHouseError::Refused {
            what: "SELECT version()".into(),
            message: format!("an unreadable version {:?}", text.trim()),
        })?;
        client.features = Features::of(client.version);
        Ok(client)
    }

    /// The server's version.
    pub fn version(&self) -> Version {
        self.version
    }

    /// What the server offers.
    pub fn features(&self) -> Features {
        self.features
    }

    /// The database Keel writes to.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// The server's address.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn post(
        &self,
        query: Option<&str>,
        body: &[u8],
        what: &str,
    ) -> Result<String, ClickHouseError> {
        let mut request = self.agent.post(&self.url);
        if let Some(authorization) = &self.authorization {
            request = request.header("Authorization", authorization);
        }
        if let Some(query) = query {
            request = request.query("query", query);
        }
        if self.features.datetime64 {
            request = request.query("date_time_input_format", "best_effort");
        }
        let mut response = request
            .send(body)
            .map_err(|e| ClickHouseError::Unreachable {
                url: self.url.clone(),
                message: e.to_string(),
            })?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_string()
            .map_err(|e| ClickHouseError::Unreachable {
                url: self.url.clone(),
                message: e.to_string(),
            })?;
        if status == 200 {
            Ok(text)
        } else {
            Err(ClickHouseError::Refused {
                what: shorten(what),
                message: text.trim().to_owned(),
            })
        }
    }

    /// Runs one statement and returns the server's answer as text.
    pub fn query(&self, sql: &str) -> Result<String, ClickHouseError> {
        self.post(None, sql.as_bytes(), sql)
    }

    /// Inserts rows encoded by [`TableSpec::encode`] (`RowBinary`) into `table` of Keel's
    /// database, naming their `columns` ([`TableSpec::column_list`]): a column someone added to
    /// the table (with a default) then takes its default, where an insert of every column in
    /// the table's order failed, and was retried, for good.
    pub fn insert(&self, table: &str, columns: &str, rows: &[u8]) -> Result<(), ClickHouseError> {
        let query = format!(
            "INSERT INTO `{}`.`{table}` {columns} FORMAT RowBinary",
            self.database
        );
        // Errors name the table, not its column list (which would crowd out the reason).
        let what = format!("INSERT INTO `{}`.`{table}`", self.database);
        self.post(Some(&query), rows, &what).map(drop)
    }

    /// Creates the database and every table of `specs` that does not exist yet, and adds to
    /// tables an older Keel made the columns they lack, each in its place (inserts send every
    /// column in the spec's order); returns the statements it ran.
    pub fn migrate(&self, specs: &[TableSpec]) -> Result<Vec<String>, ClickHouseError> {
        let mut statements = vec![format!("CREATE DATABASE IF NOT EXISTS `{}`", self.database)];
        statements.extend(
            specs
                .iter()
                .map(|spec| spec.create_statement(&self.database, self.features)),
        );
        for statement in &statements {
            self.query(statement)?;
        }
        let present = self.columns()?;
        for spec in specs {
            for (at, column) in lacking(spec, &present) {
                let place = match at.checked_sub(1) {
                    Some(before) => format!(" AFTER `{}`", spec.columns[before].name),
                    None => " FIRST".to_owned(),
                };
                let statement = format!(
                    "ALTER TABLE `{}`.`{}` ADD COLUMN `{}` {}{place}",
                    self.database,
                    spec.name,
                    column.name,
                    spec.column_type(column, self.features)
                );
                self.query(&statement)?;
                statements.push(statement);
            }
        }
        Ok(statements)
    }

    /// The columns of each table in Keel's database, by table (a table not there has none).
    fn columns(&self) -> Result<HashMap<String, Vec<String>>, ClickHouseError> {
        let listed = self.query(&format!(
            "SELECT table, name FROM system.columns WHERE database = '{}' FORMAT TabSeparated",
            self.database
        ))?;
        let mut columns: HashMap<String, Vec<String>> = HashMap::new();
        for line in listed.lines() {
            if let Some((table, name)) = line.split_once('\t') {
                columns
                    .entry(table.to_owned())
                    .or_default()
                    .push(name.to_owned());
            }
        }
        Ok(columns)
    }

    /// Checks that every table of `specs` exists with all its columns, so a writer never starts
    /// against a database `keel migrate` has not prepared (or not since an older Keel).
    pub fn check_tables(&self, specs: &[TableSpec]) -> Result<(), ClickHouseError> {
        // One look at the columns answers both: a table that is there has columns.
        let columns = self.columns()?;
        let missing: Vec<&str> = specs
            .iter()
            .map(|s| s.name)
            .filter(|name| !columns.contains_key(*name))
            .collect();
        if !missing.is_empty() {
            return Err(ClickHouseError::Config(format!(
                "database {} on {} lacks the tables {}: run `keel migrate --clickhouse {} --clickhouse-database {}` first",
                self.database,
                self.url,
                missing.join(", "),
                self.url,
                self.database
            )));
        }
        // Tables an older Keel made may lack columns.
        let lacking: Vec<String> = specs
            .iter()
            .flat_map(|spec| {
                lacking(spec, &columns).map(move |(_, c)| format!("{}.{}", spec.name, c.name))
            })
            .collect();
        if lacking.is_empty() {
            return Ok(());
        }
        Err(ClickHouseError::Config(format!(
            "database {} on {} has tables made by an older Keel, without the columns {}: \
             run `keel migrate --clickhouse {} --clickhouse-database {}` to add them",
            self.database,
            self.url,
            lacking.join(", "),
            self.url,
            self.database
        )))
    }

    /// The current rows of `spec`'s table as `JSONEachRow` text, in key order.
    pub fn current_rows(&self, spec: &TableSpec) -> Result<String, ClickHouseError> {
        self.query(&spec.select_current(&self.database, self.features))
    }

    /// The keys of the current rows of `spec`'s table (windows from `since` on, if given) as
    /// `JSONEachRow` text, in key order.
    pub fn current_keys(
        &self,
        spec: &TableSpec,
        since: Option<i64>,
    ) -> Result<String, ClickHouseError> {
        self.query(&spec.select_keys(&self.database, self.features, since))
    }

    /// The newest `_version` any table of `specs` holds (0 when they are empty).
    pub fn newest_version(&self, specs: &[TableSpec]) -> Result<u64, ClickHouseError> {
        // Not `events_raw`: a row per event, never rewritten, so its versions rule nothing.
        let tables: Vec<String> = specs
            .iter()
            .filter(|spec| spec.name != "events_raw")
            .map(|spec| {
                format!(
                    "SELECT max(`_version`) AS v FROM `{}`.`{}`",
                    self.database, spec.name
                )
            })
            .collect();
        if tables.is_empty() {
            return Ok(0);
        }
        let sql = format!(
            "SELECT max(v) FROM ({}) FORMAT TabSeparated",
            tables.join(" UNION ALL ")
        );
        let text = self.query(&sql)?;
        text.trim().parse().map_err(|_| {
            ClickHouseError::Config(format!("the newest _version is not a number: {text:?}"))
        })
    }
}

/// The columns of `spec` (with their places in it) that its table, of `present`'s columns by
/// table, lacks.
fn lacking<'a>(
    spec: &'a TableSpec,
    present: &'a HashMap<String, Vec<String>>,
) -> impl Iterator<Item = (usize, &'a Column)> {
    let have = present.get(spec.name).map_or(&[][..], Vec::as_slice);
    spec.columns
        .iter()
        .enumerate()
        .filter(move |(_, column)| !have.contains(&column.name))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    /// A row with one column of each kind the sinks handle; the encoder's tests use it too.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    pub(crate) struct Window {
        pub tenant_id: String,
        pub name: String,
        pub start: i64,
        pub ended: Option<i64>,
        pub live: bool,
        pub tags: Vec<String>,
        pub state: Option<String>,
        pub share: f64,
    }

    impl Row for Window {
        type Key = (String, String, i64);
        const KEY_COLUMNS: &'static [&'static str] = &["tenant_id", "name", "start"];
        const TIMESTAMPS: &'static [&'static str] = &["start", "ended"];
        const LOW_CARDINALITY: &'static [&'static str] = &["state"];
        const RETENTION_DAYS: Option<u32> = Some(30);
        fn key(&self) -> Self::Key {
            (self.tenant_id.clone(), self.name.clone(), self.start)
        }
    }

    #[test]
    fn versions_decide_features() {
        assert_eq!(Version::parse("18.16.1"), Some(Version(18, 16)));
        assert_eq!(Version::parse("24.8.4.13\n"), Some(Version(24, 8)));
        assert_eq!(Version::parse("nonsense"), None);
        let old = Features::of(Version(18, 16));
        assert!(!old.datetime64 && !old.ttl && !old.low_cardinality && !old.is_deleted);
        let new = Features::of(Version(26, 9));
        assert!(new.datetime64 && new.ttl && new.low_cardinality && new.is_deleted);
    }

    #[test]
    fn old_servers_get_the_old_subset() {
        let spec = TableSpec::of::<Window>("windows");
        let sql = spec.create_statement("keel", Features::of(Version(18, 16)));
        assert_eq!(
            sql,
            "CREATE TABLE IF NOT EXISTS `keel`.`windows` (`tenant_id` String, `name` String, \
             `start` Int64, `ended` Nullable(Int64), `live` UInt8, `tags` String, \
             `state` Nullable(String), `share` Float64, `_version` UInt64, `_deleted` UInt8) \
             ENGINE = ReplacingMergeTree(`_version`) \
             PARTITION BY (toYYYYMM(toDateTime(intDiv(`start`, 1000))), `tenant_id`) \
             ORDER BY (`tenant_id`, `name`, `start`)"
        );
    }

    #[test]
    fn current_servers_get_types_ttl_and_tombstones() {
        let spec = TableSpec::of::<Window>("windows");
        let sql = spec.create_statement("keel", Features::of(Version(26, 9)));
        assert!(sql.contains("`start` DateTime64(3, 'UTC')"), "{sql}");
        assert!(
            sql.contains("`state` LowCardinality(Nullable(String))"),
            "{sql}"
        );
        assert!(
            sql.contains("ReplacingMergeTree(`_version`, `_deleted`)"),
            "{sql}"
        );
        assert!(
            sql.contains("PARTITION BY (toYYYYMM(`start`), `tenant_id`)"),
            "{sql}"
        );
        assert!(
            sql.ends_with("TTL toDateTime(`start`) + INTERVAL 30 DAY"),
            "{sql}"
        );
    }

    #[test]
    fn key_queries_select_the_key_and_filter_windows() {
        let spec = TableSpec::of::<Window>("windows");
        let old = spec.select_keys("keel", Features::of(Version(18, 16)), Some(42));
        assert_eq!(
            old,
            "SELECT `tenant_id`, `name`, `start` FROM `keel`.`windows` FINAL WHERE `_deleted` = 0 \
             AND `start` >= 42 ORDER BY `tenant_id`, `name`, `start` FORMAT JSONEachRow"
        );
        let current = spec.select_keys("keel", Features::of(Version(26, 9)), None);
        assert!(
            current.starts_with(
                "SELECT `tenant_id`, `name`, toUnixTimestamp64Milli(`start`) AS `start` FROM"
            ),
            "{current}"
        );
        assert!(!current.contains(">="), "{current}");
        let since = spec.select_keys("keel", Features::of(Version(26, 9)), Some(7));
        assert!(
            since.contains("AND toUnixTimestamp64Milli(`start`) >= 7 ORDER BY"),
            "{since}"
        );
    }

    #[test]
    fn stored_keys_read_back_as_the_row_type_keys() {
        let spec = TableSpec::of::<Window>("windows");
        // Servers may quote 64-bit integers.
        let key: (String, String, i64) = spec
            .parse_key(r#"{"tenant_id":"t","name":"n","start":"1730455200000"}"#)
            .unwrap();
        assert_eq!(key, ("t".into(), "n".into(), 1_730_455_200_000));
        let key: (String, String, i64) = spec
            .parse_key(r#"{"start":-5,"name":"n","tenant_id":"t"}"#)
            .unwrap();
        assert_eq!(key, ("t".into(), "n".into(), -5));
        for bad in [
            r#"{"tenant_id":"t","name":"n"}"#,
            r#"{"tenant_id":"t","name":"n","start":"soon"}"#,
            "not json",
        ] {
            assert!(
                spec.parse_key::<(String, String, i64)>(bad).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn credentials_leave_the_url_for_a_header() {
        assert_eq!(
            split_credentials("http://127.0.0.1:8123"),
            ("http://127.0.0.1:8123".to_owned(), None)
        );
        let (url, auth) = split_credentials("https://keel:s%40cret@ch.example:8443");
        assert_eq!(url, "https://ch.example:8443");
        // base64("keel:s@cret")
        assert_eq!(auth.as_deref(), Some("Basic a2VlbDpzQGNyZXQ="));
        // base64("u:a+b")
        let (_, auth) = split_credentials("http://u:a+b@h:1/");
        assert_eq!(auth.as_deref(), Some("Basic dTphK2I="));
    }

    #[test]
    fn bad_settings_are_refused_before_any_request() {
        let error = ClickHouse::connect("127.0.0.1:8123", "keel").unwrap_err();
        assert!(error.to_string().contains("http://HOST:8123"), "{error}");
        let error = ClickHouse::connect("http://127.0.0.1:1", "keel; DROP").unwrap_err();
        assert!(error.to_string().contains("plain database name"), "{error}");
        let error = ClickHouse::connect("http://127.0.0.1:1", "keel").unwrap_err();
        assert!(error.is_transient(), "{error}");
    }
}
