//! The live tables over the PostgreSQL wire protocol, for `psql`, Grafana's PostgreSQL data
//! source and any other Postgres client.
//!
//! The password is a Keel token (a JWT or a static token; the user name is only recorded), sent
//! in clear text as Postgres' `password` method does — put TLS or a tunnel in front of it off
//! loopback. Each statement runs in a fresh tenant-scoped session exactly as `POST /v1/sql`
//! does ([`crate::sql`]), so a tenant sees its own rows whatever it writes. Statements come by
//! the simple query protocol (what `psql` sends) or the extended one (prepare, bind, execute,
//! as drivers send); results are in text format.
//!
//! Errors carry SQLSTATE codes: `28P01` for a bad token, `42601` for a statement that does not
//! parse or plan, `42501` for one that would change something, `57014` for one the client
//! cancelled (psql's Ctrl-C sends a cancel request, which stops the running statement).

use keel_operators::time::now_ms;
use std::fmt::Debug;
use std::sync::Arc;

use arrow::array::{Array, RecordBatch};
use arrow::datatypes::{DataType, Schema, TimeUnit};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use async_trait::async_trait;
use futures_util::Sink;
use pgwire::api::auth::cleartext::CleartextPasswordAuth;
use pgwire::api::auth::driver::AuthOutcome;
use pgwire::api::auth::mechanism::AuthMechanismFactory;
use pgwire::api::auth::{
    AuthDriver, AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler,
    protocol_negotiation, save_startup_parameters_to_metadata,
};
use pgwire::api::cancel::{CancelHandler, DefaultCancelHandler};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{
    DataRowEncoder, DescribePortalResponse, DescribeStatementResponse, FieldFormat, FieldInfo,
    QueryResponse, Response,
};
use pgwire::api::stmt::{NoopQueryParser, StoredStatement};
use pgwire::api::{ClientInfo, ClientPortalStore, ConnectionManager, PgWireServerHandlers, Type};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use tokio::net::TcpListener;

use crate::auth::{Auth, Principal};
use crate::server::ApiState;
use crate::sql::{SqlError, plan_within, query_within};

/// The most PostgreSQL-protocol connections open at once; further ones wait in the kernel's
/// backlog until one closes (connections that never sent a startup message could otherwise
/// take every file descriptor of the process).
pub const MAX_CONNECTIONS: usize = 1_024;

/// Serves the Postgres protocol on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, state: ApiState) {
    let handlers = Arc::new(Handlers::new(state));
    let open = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let place = open
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (socket, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "postgres listener: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let handlers = handlers.clone();
        tokio::spawn(async move {
            let _place = place;
            if let Err(error) = pgwire::tokio::process_socket(socket, None, handlers).await {
                tracing::debug!(%error, %peer, "postgres connection ended with an error");
            }
        });
    }
}

struct Handlers {
    startup: Arc<TokenStartup>,
    queries: Arc<Queries>,
    /// Finds a connection's running statement by the key a cancel request names.
    cancel: Arc<DefaultCancelHandler>,
}

impl Handlers {
    fn new(state: ApiState) -> Self {
        let mut parameters = DefaultServerParameterProvider::default();
        parameters.server_version = format!("16.0 (Keel {})", env!("CARGO_PKG_VERSION"));
        parameters.default_transaction_read_only = true;
        // Each authenticated connection is registered under the key its BackendKeyData
        // message gave the client, which a cancel request quotes; pgwire then drops the
        // connection's running statement when one comes, which stops it at its next yield
        // (`crate::sql`), and answers 57014.
        let connections = Arc::new(ConnectionManager::new());
        Handlers {
            startup: Arc::new(TokenStartup {
                driver: AuthDriver::new(parameters).with_connection_manager(connections.clone()),
                mechanism: CleartextPasswordAuth::new(Arc::new(Tokens {
                    auth: state.auth.clone(),
                })),
            }),
            queries: Arc::new(Queries {
                state,
                parser: Arc::new(NoopQueryParser::new()),
            }),
            cancel: Arc::new(DefaultCancelHandler::new(connections)),
        }
    }
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.queries.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.queries.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.startup.clone()
    }

    fn cancel_handler(&self) -> Arc<impl CancelHandler> {
        self.cancel.clone()
    }
}

/// Checks the password as a Keel token.
#[derive(Debug)]
struct Tokens {
    auth: Arc<Auth>,
}

// The trait's own signatures elide `LoginInfo`'s lifetime; async_trait needs them to match.
#[allow(elided_lifetimes_in_paths)]
#[async_trait]
impl AuthSource<Principal> for Tokens {
    async fn get_password(&self, _login: &LoginInfo) -> PgWireResult<Password> {
        Err(fatal_error(
            "28000",
            "Keel does not store passwords; the password is a token",
        ))
    }

    async fn verify_password(
        &self,
        _login: &LoginInfo,
        presented: &[u8],
    ) -> PgWireResult<Option<Principal>> {
        let token = std::str::from_utf8(presented).unwrap_or_default();
        self.auth
            .authenticate(token.trim(), now_ms() / 1000)
            .map(Some)
            .map_err(|e| fatal_error("28P01", &format!("the password must be a Keel token: {e}")))
    }
}

struct TokenStartup {
    driver: AuthDriver<DefaultServerParameterProvider, Principal>,
    mechanism: CleartextPasswordAuth<Tokens>,
}

#[async_trait]
impl StartupHandler for TokenStartup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                protocol_negotiation(client, startup).await?;
                save_startup_parameters_to_metadata(client, startup);
                self.driver
                    .begin_authentication(client, self.mechanism.create())
                    .await?;
            }
            PgWireFrontendMessage::PasswordMessageFamily(message) => {
                if let AuthOutcome::Authenticated {
                    identity,
                    final_message,
                } = self.driver.advance_authentication(client, message).await?
                {
                    let Some(caller) = identity else {
                        return Err(fatal_error("28P01", "no token was given"));
                    };
                    client.session_extensions().insert(caller);
                    self.driver
                        .complete_authentication(client, final_message)
                        .await?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

struct Queries {
    state: ApiState,
    parser: Arc<NoopQueryParser>,
}

impl Queries {
    /// Runs `sql` for the connection's caller.
    async fn answer<C: ClientInfo>(
        &self,
        client: &C,
        sql: &str,
        format: &Format,
    ) -> PgWireResult<Response> {
        let batches = self.batches(client, sql).await?;
        let schema = match batches.first() {
            Some(batch) => batch.schema(),
            None => Arc::new(Schema::empty()),
        };
        let fields = Arc::new(fields(&schema, format));
        let rows = encode_rows(&batches, &fields)?;
        let mut response =
            QueryResponse::new(fields, futures_util::stream::iter(rows.into_iter().map(Ok)));
        response.set_command_tag("SELECT");
        Ok(Response::Query(response))
    }

    async fn batches<C: ClientInfo>(
        &self,
        client: &C,
        sql: &str,
    ) -> PgWireResult<Vec<RecordBatch>> {
        let caller = caller(client)?;
        query_within(
            &self.state.tables,
            caller.scope,
            sql,
            self.state.limits.query,
        )
        .await
        .map_err(sql_error)
    }

    /// The result columns of `sql`, planned but not run.
    async fn describe<C: ClientInfo>(
        &self,
        client: &C,
        sql: &str,
        format: &Format,
    ) -> PgWireResult<Vec<FieldInfo>> {
        if is_blank(sql) {
            return Ok(Vec::new());
        }
        // Planned in the same scoped session a run would use, and not run.
        let caller = caller(client)?;
        let schema = plan_within(
            &self.state.tables,
            caller.scope,
            sql,
            self.state.limits.query,
        )
        .await
        .map_err(sql_error)?;
        Ok(fields(&schema, format))
    }
}

/// Who the connection authenticated as. A connection whose token has expired is ended (as
/// the HTTP API's WebSockets are) rather than served on.
fn caller<C: ClientInfo>(client: &C) -> PgWireResult<Arc<Principal>> {
    let caller = client
        .session_extensions()
        .get::<Principal>()
        .ok_or_else(|| fatal_error("28000", "not authenticated"))?;
    if caller
        .expires_in(now_ms() / 1000)
        .is_some_and(|left| left.is_zero())
    {
        return Err(fatal_error(
            "28P01",
            "the token expired; connect again with a fresh one",
        ));
    }
    Ok(caller)
}

fn is_blank(sql: &str) -> bool {
    sql.chars().all(|c| c.is_whitespace() || c == ';')
}

#[async_trait]
impl SimpleQueryHandler for Queries {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: pgwire::api::store::PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        Ok(vec![
            self.answer(client, query, &Format::UnifiedText).await?,
        ])
    }
}

#[async_trait]
impl ExtendedQueryHandler for Queries {
    type Statement = String;
    type QueryParser = NoopQueryParser;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        self.parser.clone()
    }

    async fn do_describe_statement<C>(
        &self,
        client: &mut C,
        statement: &StoredStatement<Self::Statement>,
    ) -> PgWireResult<DescribeStatementResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: pgwire::api::store::PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        no_parameters(&statement.statement)?;
        let fields = self
            .describe(client, &statement.statement, &Format::UnifiedText)
            .await?;
        Ok(DescribeStatementResponse::new(Vec::new(), fields))
    }

    async fn do_describe_portal<C>(
        &self,
        client: &mut C,
        portal: &Portal<Self::Statement>,
    ) -> PgWireResult<DescribePortalResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: pgwire::api::store::PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let fields = self
            .describe(
                client,
                &portal.statement.statement,
                &portal.result_column_format,
            )
            .await?;
        Ok(DescribePortalResponse::new(fields))
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Self::Statement>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: pgwire::api::store::PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        no_parameters(&portal.statement.statement)?;
        if is_blank(&portal.statement.statement) {
            return Ok(Response::EmptyQuery);
        }
        self.answer(
            client,
            &portal.statement.statement,
            &portal.result_column_format,
        )
        .await
    }
}

fn no_parameters(sql: &str) -> PgWireResult<()> {
    // `$1`-style parameters are not bound into DataFusion plans yet; say so rather than
    // failing obscurely inside the planner. Read as SQL tokens, so that a `$1` inside a string
    // literal or a quoted name is text; a statement that does not tokenize is left to the
    // planner to report.
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
    let has_parameter = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize()
        .is_ok_and(|tokens| {
            tokens
                .iter()
                .any(|token| matches!(token, Token::Placeholder(p) if p.starts_with('$')))
        });
    if has_parameter {
        return Err(user_error(
            "0A000",
            "statement parameters ($1, …) are not supported; inline the values",
        ));
    }
    Ok(())
}

fn user_error(code: &str, message: &str) -> PgWireError {
    error_of("ERROR", code, message)
}

/// An error that ends the connection, as PostgreSQL ends one whose authentication failed:
/// after an `ERROR` the connection would stay open, unauthenticated, for as long as its
/// client liked, and a thousand such took every place the port has.
fn fatal_error(code: &str, message: &str) -> PgWireError {
    error_of("FATAL", code, message)
}

fn error_of(severity: &str, code: &str, message: &str) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        severity.to_owned(),
        code.to_owned(),
        message.to_owned(),
    )))
}

/// SQLSTATE program_limit_exceeded: the statement asks more than a query may take.
const LIMIT_CODE: &str = "54000";

fn sql_error(error: SqlError) -> PgWireError {
    match error {
        SqlError::Invalid(message) => user_error("42601", &message),
        SqlError::Refused(message) => {
            user_error("42501", &format!("only queries are allowed: {message}"))
        }
        SqlError::Table(e) => user_error("XX000", &e.to_string()),
        SqlError::Internal(message) => user_error("XX000", &message),
        SqlError::Limit(message) => user_error(LIMIT_CODE, &message),
    }
}

/// Microseconds from the Unix epoch to Postgres' (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
/// Days from the Unix epoch to Postgres' epoch.
const PG_EPOCH_DAYS: i32 = 10_957;

/// The Postgres type a column is announced as: integers as `int8` (an unsigned 64-bit value
/// past its range is an error, not a wrong number), floats as `float8`, times as
/// `timestamp[tz]` and `date`, everything else as `text`, so every value has a simple binary
/// form too.
fn pg_type(data_type: &DataType) -> Type {
    match data_type {
        DataType::Boolean => Type::BOOL,
        t if t.is_integer() => Type::INT8,
        DataType::Float16 | DataType::Float32 | DataType::Float64 => Type::FLOAT8,
        DataType::Timestamp(_, None) => Type::TIMESTAMP,
        DataType::Timestamp(_, Some(_)) => Type::TIMESTAMPTZ,
        DataType::Date32 | DataType::Date64 => Type::DATE,
        _ => Type::TEXT,
    }
}

fn fields(schema: &Schema, format: &Format) -> Vec<FieldInfo> {
    schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, field)| {
            FieldInfo::new(
                field.name().clone(),
                None,
                None,
                pg_type(field.data_type()),
                format.format_for(i),
            )
        })
        .collect()
}

/// One column, converted once into the shape its Postgres type is written from.
enum Column<'a> {
    Bool(&'a arrow::array::BooleanArray),
    Int(arrow::array::Int64Array),
    Float(arrow::array::Float64Array),
    /// Microseconds since the Unix epoch, and the text rendering.
    Micros(arrow::array::Int64Array, ArrayFormatter<'a>),
    /// Days since the Unix epoch, and the text rendering.
    Days(arrow::array::Int32Array, ArrayFormatter<'a>),
    Text(ArrayFormatter<'a>),
}

fn column<'a>(array: &'a dyn Array, options: &'a FormatOptions<'a>) -> Option<Column<'a>> {
    use arrow::array::AsArray;
    use arrow::compute::cast;
    let data_type = array.data_type();
    Some(match pg_type(data_type) {
        Type::BOOL => Column::Bool(array.as_boolean_opt()?),
        Type::INT8 => Column::Int(
            cast(array, &DataType::Int64)
                .ok()?
                .as_primitive::<arrow::datatypes::Int64Type>()
                .clone(),
        ),
        Type::FLOAT8 => Column::Float(
            cast(array, &DataType::Float64)
                .ok()?
                .as_primitive::<arrow::datatypes::Float64Type>()
                .clone(),
        ),
        Type::TIMESTAMP | Type::TIMESTAMPTZ => {
            let DataType::Timestamp(_, zone) = data_type else {
                return None;
            };
            let micros = cast(
                array,
                &DataType::Timestamp(TimeUnit::Microsecond, zone.clone()),
            )
            .ok()?;
            let micros = cast(&micros, &DataType::Int64).ok()?;
            Column::Micros(
                micros.as_primitive::<arrow::datatypes::Int64Type>().clone(),
                ArrayFormatter::try_new(array, options).ok()?,
            )
        }
        Type::DATE => {
            let days = cast(array, &DataType::Date32).ok()?;
            let days = cast(&days, &DataType::Int32).ok()?;
            Column::Days(
                days.as_primitive::<arrow::datatypes::Int32Type>().clone(),
                ArrayFormatter::try_new(array, options).ok()?,
            )
        }
        _ => Column::Text(ArrayFormatter::try_new(array, options).ok()?),
    })
}

/// Every row, each value in the format its field asks for.
fn encode_rows(
    batches: &[RecordBatch],
    fields: &Arc<Vec<FieldInfo>>,
) -> PgWireResult<Vec<pgwire::messages::data::DataRow>> {
    let options = FormatOptions::new()
        .with_display_error(false)
        .with_null("")
        .with_timestamp_format(Some("%Y-%m-%d %H:%M:%S%.f"))
        .with_timestamp_tz_format(Some("%Y-%m-%d %H:%M:%S%.f%:z"));
    let mut encoder = DataRowEncoder::new(fields.clone());
    let mut rows = Vec::new();
    for batch in batches {
        let columns: Vec<Option<Column<'_>>> = batch
            .columns()
            .iter()
            .map(|array| column(array.as_ref(), &options))
            .collect();
        for row in 0..batch.num_rows() {
            for ((array, column), field) in batch.columns().iter().zip(&columns).zip(fields.iter())
            {
                encode_value(&mut encoder, array.as_ref(), column.as_ref(), row, field)?;
            }
            rows.push(encoder.take_row());
        }
    }
    Ok(rows)
}

/// A value that cannot be written (a timestamp past the calendar's range): SQLSTATE
/// datetime_field_overflow, where its formatting error was sent as its text ("ERROR: …").
fn no_text(field: &FieldInfo, why: &str) -> PgWireError {
    user_error(
        "22008",
        &format!(
            "column {} has a value with no text form: {why}",
            field.name()
        ),
    )
}

fn encode_value(
    encoder: &mut DataRowEncoder,
    array: &dyn Array,
    column: Option<&Column<'_>>,
    row: usize,
    field: &FieldInfo,
) -> PgWireResult<()> {
    let binary = field.format() == FieldFormat::Binary;
    // An untyped NULL column has no null mask: every value of it is null all the same.
    if array.is_null(row) || array.data_type() == &DataType::Null {
        return encoder.encode_field(&None::<i64>);
    }
    match column {
        Some(Column::Bool(values)) => {
            let value = values.value(row);
            if binary {
                encoder.encode_field(&value)
            } else {
                encoder.encode_field(&if value { "t" } else { "f" })
            }
        }
        // Null here but not in the column: the value did not fit int8.
        Some(Column::Int(values)) if values.is_null(row) => Err(user_error(
            "22003",
            &format!(
                "column {}: {} is past the range of int8, the type integers are sent as; cast \
                 it to a smaller number or to text",
                field.name(),
                arrow::util::display::array_value_to_string(array, row).unwrap_or_default()
            ),
        )),
        Some(Column::Int(values)) => encoder.encode_field(&values.value(row)),
        Some(Column::Float(values)) => encoder.encode_field(&values.value(row)),
        // Null here but not in the column: the time has no microsecond or day count.
        Some(Column::Micros(values, _)) if binary && values.is_null(row) => {
            Err(no_text(field, "it is past the range of microseconds"))
        }
        Some(Column::Micros(values, _)) if binary => {
            match values.value(row).checked_sub(PG_EPOCH_MICROS) {
                Some(micros) => encoder.encode_field(&micros),
                None => Err(no_text(
                    field,
                    "it is past the range of microseconds since 2000",
                )),
            }
        }
        Some(Column::Days(values, _)) if binary && values.is_null(row) => {
            Err(no_text(field, "it is past the range of days"))
        }
        Some(Column::Days(values, _)) if binary => {
            match values.value(row).checked_sub(PG_EPOCH_DAYS) {
                Some(days) => encoder.encode_field(&days),
                None => Err(no_text(field, "it is past the range of days since 2000")),
            }
        }
        Some(Column::Micros(_, text) | Column::Days(_, text) | Column::Text(text)) => {
            let value = text
                .value(row)
                .try_to_string()
                .map_err(|e| no_text(field, &e.to_string()))?;
            encoder.encode_field(&value)
        }
        None => encoder.encode_field(&None::<i64>),
    }
}
