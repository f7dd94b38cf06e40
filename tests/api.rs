//! The HTTP API on the golden tables: authentication, tenant isolation, formats, errors.

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use keel::engine::{self, EngineOptions, Handles};
use keel_api::auth::{Auth, Claims, Role, StaticToken};
use keel_api::metrics::Metrics;
use keel_api::server::{ApiState, Limits, MAX_BODY, router};
use keel_sources::file::FileSource;
use proptest::prelude::*;
use tower::ServiceExt;

const TENANT_A: &str = "5eed517e-ba5e-da7a-517e-ba5eda7a0001";
const TENANT_B: &str = "7b1c0d2e-3f40-4a5b-8c6d-7e8f90a1b2c3";
const SECRET: &str = "a-test-secret-of-some-length";
const FAR: i64 = 4_102_444_800;

fn golden() -> Handles {
    let handles = Handles::default();
    let source = FileSource::open("tests/golden/events.ndjson".as_ref()).unwrap();
    engine::run(Arc::new(source), &EngineOptions::default(), &handles).unwrap();
    handles
}

fn state(handles: &Handles) -> ApiState {
    let tokens = vec![StaticToken {
        name: "grafana-b".into(),
        token: "kt_tenant_b_static_token".into(),
        tenant_id: Some(TENANT_B.parse().unwrap()),
        role: Role::Member,
    }];
    ApiState {
        tables: handles.tables.clone(),
        auth: Arc::new(Auth::new(Some(SECRET.into()), tokens).unwrap()),
        stats: handles.stats.clone(),
        metrics: Arc::new(Metrics::default()),
        hub: handles.hub.clone(),
        fleet: handles.fleet.clone(),
        foghorn: handles.foghorn.clone(),
        extra_metrics: handles.extra_metrics.clone(),
        limits: Limits::default(),
    }
}

fn token(claims: &Claims) -> String {
    Auth::new(Some(SECRET.into()), vec![])
        .unwrap()
        .issue(claims)
        .unwrap()
}

fn tenant_token(tenant: &str) -> String {
    token(&Claims::member("t", tenant.parse().unwrap(), FAR))
}

async fn call(state: &ApiState, request: Request<Body>) -> (StatusCode, String, Vec<u8>) {
    let response = router(state.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, content_type, body.to_vec())
}

fn sql_request(token: Option<&str>, sql: &str, accept: Option<&str>) -> Request<Body> {
    let mut request = Request::post("/v1/sql");
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    if let Some(accept) = accept {
        request = request.header(header::ACCEPT, accept);
    }
    request
        .body(Body::from(
            serde_json::to_vec(&serde_json::json!({ "sql": sql })).unwrap(),
        ))
        .unwrap()
}

async fn rows(state: &ApiState, token: &str, sql: &str) -> Vec<serde_json::Value> {
    let (status, _, body) = call(state, sql_request(Some(token), sql, None)).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{sql}: {}",
        String::from_utf8_lossy(&body)
    );
    serde_json::from_slice::<Vec<serde_json::Value>>(&body).unwrap()
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let handles = Handles::default();
    let state = state(&handles);
    let (status, _, body) =
        call(&state, Request::get("/readyz").body(Body::empty()).unwrap()).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        String::from_utf8_lossy(&body)
    );
    let handles = golden();
    let state = self::state(&handles);
    let (status, _, _) = call(
        &state,
        Request::get("/healthz").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = call(&state, Request::get("/readyz").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    rows(&state, &tenant_token(TENANT_A), "SELECT 1").await;
    let (status, content_type, body) = call(
        &state,
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    let text = String::from_utf8(body).unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(content_type.starts_with("text/plain"));
    for needle in [
        "keel_events_total{source=\"file\"} 25",
        "keel_decode_errors_total{source=\"file\"} 5",
        "keel_table_rows{table=\"viewer_sessions\"} 6",
        "keel_http_request_duration_seconds_count{route=\"/v1/sql\",status=\"200\"} 1",
        "keel_epoch_lag_seconds ",
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
    let epochs: u64 = text
        .lines()
        .find_map(|line| line.strip_prefix("keel_epochs_total "))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("keel_epochs_total missing from\n{text}"));
    assert!(epochs >= 1, "the replay sent no epoch: {epochs}");
    let resident: u64 = text
        .lines()
        .find_map(|line| line.strip_prefix("process_resident_memory_bytes "))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("process_resident_memory_bytes missing from\n{text}"));
    // A test process with an engine, DataFusion and an API holds well over a mebibyte, and the
    // figure is bytes, not kibibytes or pages.
    assert!(
        (1 << 20..1 << 40).contains(&resident),
        "resident memory {resident} is not a plausible byte count"
    );
}

#[tokio::test]
async fn missing_bad_and_expired_tokens_are_401_with_a_json_error() {
    let handles = golden();
    let state = state(&handles);
    let expired = token(&Claims::member("t", TENANT_A.parse().unwrap(), 1_000));
    let forged = Auth::new(Some("another-secret-entirely".into()), vec![])
        .unwrap()
        .issue(&Claims::admin("x", FAR))
        .unwrap();
    for (token, message) in [
        (None, "missing bearer token"),
        (Some("nonsense"), "invalid token"),
        (Some(forged.as_str()), "invalid token"),
        (Some(expired.as_str()), "token expired"),
    ] {
        let response = router(state.clone())
            .oneshot(sql_request(token, "SELECT 1", None))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(error["error"]["code"], "unauthorized");
        assert_eq!(error["error"]["message"], message);
    }
}

/// Whatever SQL a tenant writes, it sees its own rows and nothing else.
#[tokio::test]
async fn a_tenant_never_sees_another_tenants_rows() {
    let handles = golden();
    let state = state(&handles);
    let admin = token(&Claims::admin("root", FAR));
    let a = tenant_token(TENANT_A);
    let all_tenants = rows(
        &state,
        &admin,
        "SELECT DISTINCT tenant_id FROM streams ORDER BY 1",
    )
    .await;
    assert_eq!(all_tenants.len(), 2, "the golden file has two tenants");
    let probes = [
        "SELECT tenant_id FROM streams",
        "SELECT s.tenant_id FROM streams s JOIN viewer_sessions v ON v.internal_name = s.internal_name",
        "SELECT tenant_id FROM viewer_sessions WHERE tenant_id <> '5eed517e-ba5e-da7a-517e-ba5eda7a0001' OR 1 = 1",
        "WITH x AS (SELECT tenant_id FROM nodes) SELECT tenant_id FROM x",
        "SELECT tenant_id FROM streams UNION ALL SELECT tenant_id FROM viewers_by_country UNION ALL SELECT tenant_id FROM usage_5m",
        "SELECT tenant_id FROM (SELECT * FROM routing_hourly) t",
        "SELECT tenant_id FROM unknown_events",
        "SELECT tenant_id FROM stream_health_5m WHERE tenant_id IN (SELECT tenant_id FROM streams)",
        "SELECT tenant_id FROM ingest_errors",
        "SELECT tenant_id FROM keel.live.streams",
    ];
    for sql in probes {
        for row in rows(&state, &a, sql).await {
            assert_eq!(row["tenant_id"], TENANT_A, "{sql}");
        }
    }
    // The same counts an admin sees for that tenant, table by table.
    for table in [
        "streams",
        "viewer_sessions",
        "viewers_by_country",
        "usage_5m",
        "routing_hourly",
        "nodes",
    ] {
        let mine = rows(&state, &a, &format!("SELECT count(*) AS n FROM {table}")).await;
        let theirs = rows(
            &state,
            &admin,
            &format!("SELECT count(*) AS n FROM {table} WHERE tenant_id = '{TENANT_A}'"),
        )
        .await;
        assert_eq!(mine, theirs, "{table}");
    }
    // Every tenant's sessions counted without reading a column (the held table's length), as
    // when a column is read.
    let counted = rows(&state, &admin, "SELECT count(*) AS n FROM viewer_sessions").await;
    let read = rows(
        &state,
        &admin,
        "SELECT count(tenant_id) AS n FROM viewer_sessions",
    )
    .await;
    assert_eq!(counted, read);
    assert!(counted[0]["n"].as_u64() > Some(1), "{counted:?}");
    // A few rows of a scan are a few rows, whoever asks.
    for token in [&admin, &a] {
        let few = rows(&state, token, "SELECT * FROM viewer_sessions LIMIT 2").await;
        assert_eq!(few.len(), 2, "{few:?}");
    }
    // Tenant B through its static token: only B's stream, and none of A's.
    let b = rows(
        &state,
        "kt_tenant_b_static_token",
        "SELECT internal_name FROM streams",
    )
    .await;
    assert_eq!(b, vec![serde_json::json!({ "internal_name": "news" })]);
    // Errors of records whose tenant could not be established are the admin's alone.
    let errors_a = rows(&state, &a, "SELECT count(*) AS n FROM ingest_errors").await;
    let errors_all = rows(&state, &admin, "SELECT count(*) AS n FROM ingest_errors").await;
    assert_eq!(errors_a[0]["n"], 3);
    assert_eq!(errors_all[0]["n"], 5);
    // information_schema lists the tables, not other tenants' data.
    let tables = rows(
        &state,
        &a,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'live'",
    )
    .await;
    assert_eq!(tables.len(), 9);
}

#[tokio::test]
async fn formats_follow_the_accept_header() {
    let handles = golden();
    let state = state(&handles);
    let a = tenant_token(TENANT_A);
    let sql = "SELECT internal_name, peak_viewers FROM streams";
    let (_, content_type, body) = call(&state, sql_request(Some(&a), sql, Some("text/csv"))).await;
    assert_eq!(content_type, "text/csv");
    assert_eq!(
        String::from_utf8(body).unwrap(),
        "internal_name,peak_viewers\ndemo,3\n"
    );
    let (_, content_type, body) = call(
        &state,
        sql_request(Some(&a), sql, Some("application/vnd.apache.arrow.stream")),
    )
    .await;
    assert_eq!(content_type, "application/vnd.apache.arrow.stream");
    let reader =
        arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(body), None).unwrap();
    let total: usize = reader.map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(total, 1);
    let (status, _, body) = call(&state, sql_request(Some(&a), sql, Some("image/png"))).await;
    assert_eq!(
        status,
        StatusCode::NOT_ACCEPTABLE,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert!(
        String::from_utf8_lossy(&body).contains(r#""code":"not_acceptable""#),
        "{}",
        String::from_utf8_lossy(&body)
    );
    let empty = rows(&state, &a, "SELECT * FROM streams WHERE 1 = 0").await;
    assert!(empty.is_empty());
}

/// Column `name` of `batch` as text.
fn strings(batch: &arrow::array::RecordBatch, name: &str) -> arrow::array::StringArray {
    let array = arrow::compute::cast(
        batch.column_by_name(name).unwrap(),
        &arrow::datatypes::DataType::Utf8,
    )
    .unwrap();
    array
        .as_any()
        .downcast_ref::<arrow::array::StringArray>()
        .unwrap()
        .clone()
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let handles = golden();
    let state = state(&handles);
    let a = tenant_token(TENANT_A);
    let cases: Vec<(Request<Body>, StatusCode, &str)> = vec![
        (
            sql_request(Some(&a), "SELEC 1", None),
            StatusCode::BAD_REQUEST,
            "bad_sql",
        ),
        (
            sql_request(Some(&a), "SELECT nope FROM streams", None),
            StatusCode::BAD_REQUEST,
            "bad_sql",
        ),
        (
            sql_request(Some(&a), "DROP TABLE streams", None),
            StatusCode::BAD_REQUEST,
            "read_only",
        ),
        (
            sql_request(Some(&a), "SET datafusion.execution.batch_size = 1", None),
            StatusCode::BAD_REQUEST,
            "read_only",
        ),
        (
            sql_request(Some(&a), "SELECT 1; SELECT 2", None),
            StatusCode::BAD_REQUEST,
            "bad_sql",
        ),
        // A time with no text form: an error, not the formatting error's text as its value.
        (
            sql_request(
                Some(&a),
                "SELECT arrow_cast(-99999999999999, 'Timestamp(Second, None)') AS far",
                None,
            ),
            StatusCode::BAD_REQUEST,
            "bad_sql",
        ),
        (
            Request::post("/v1/sql")
                .header(header::AUTHORIZATION, format!("Bearer {a}"))
                .body(Body::from("{\"query\": 1}"))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
    ];
    for (request, status, code) in cases {
        let (got, _, body) = call(&state, request).await;
        let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (got, error["error"]["code"].as_str().unwrap()),
            (status, code),
            "{error}"
        );
    }
    let huge = Request::post("/v1/sql")
        .header(header::AUTHORIZATION, format!("Bearer {a}"))
        .body(Body::from(vec![b' '; MAX_BODY + 1]))
        .unwrap();
    let (status, _, _) = call(&state, huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Arbitrary bodies and SQL text never produce a server error: a result or a 4xx with a
    /// JSON error.
    #[test]
    fn arbitrary_input_never_breaks_the_sql_endpoint(body in prop::collection::vec(any::<u8>(), 0..200), sql in ".{0,80}") {
        let handles = Handles::default();
        let state = state(&handles);
        let a = tenant_token(TENANT_A);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        for request in [
            Request::post("/v1/sql").header(header::AUTHORIZATION, format!("Bearer {a}")).body(Body::from(body)).unwrap(),
            sql_request(Some(&a), &sql, None),
        ] {
            let (status, _, body) = runtime.block_on(call(&state, request));
            prop_assert!(status == StatusCode::OK || status.is_client_error(), "{status}: {}", String::from_utf8_lossy(&body));
            if status != StatusCode::OK {
                let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
                prop_assert!(error["error"]["message"].is_string());
            }
        }
    }
}

/// Key lookups answer exactly what a filter the provider cannot push down answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_lookups_agree_with_full_scans_and_stay_within_the_tenant() {
    use keel_api::auth::Scope;
    use keel_api::sql::query;
    let handles = golden();
    let tables = handles.tables.clone();
    let count =
        |batches: &[arrow::array::RecordBatch]| batches.iter().map(|b| b.num_rows()).sum::<usize>();
    let rows = query(
        &tables,
        Scope::All,
        "SELECT tenant_id, internal_name, node_id, session_id FROM viewer_sessions",
    )
    .await
    .unwrap();
    let mut checked = 0;
    for batch in &rows {
        let column = |name: &str| strings(batch, name);
        let (tenants, names, nodes, sessions) = (
            column("tenant_id"),
            column("internal_name"),
            column("node_id"),
            column("session_id"),
        );
        for i in 0..batch.num_rows() {
            let (tenant, name, node, session) = (
                tenants.value(i),
                names.value(i),
                nodes.value(i),
                sessions.value(i),
            );
            let pinned = format!(
                "SELECT * FROM viewer_sessions WHERE internal_name = '{name}' AND node_id = '{node}' AND session_id = '{session}'"
            );
            let scanned = format!(
                "SELECT * FROM viewer_sessions WHERE internal_name || '' = '{name}' AND node_id || '' = '{node}' AND session_id || '' = '{session}'"
            );
            let own = Scope::Tenant(tenant.parse().unwrap());
            let by_key = query(&tables, own, &pinned).await.unwrap();
            let by_scan = query(&tables, own, &scanned).await.unwrap();
            assert_eq!(count(&by_key), 1, "{pinned}");
            assert_eq!(
                arrow::util::pretty::pretty_format_batches(&by_key)
                    .unwrap()
                    .to_string(),
                arrow::util::pretty::pretty_format_batches(&by_scan)
                    .unwrap()
                    .to_string()
            );
            // The same key under another tenant's token, or naming another tenant, finds nothing.
            let other = if tenant == TENANT_A {
                TENANT_B
            } else {
                TENANT_A
            };
            let theirs = query(&tables, Scope::Tenant(other.parse().unwrap()), &pinned)
                .await
                .unwrap();
            assert_eq!(count(&theirs), 0);
            let named = format!("{pinned} AND tenant_id = '{other}'");
            assert_eq!(count(&query(&tables, own, &named).await.unwrap()), 0);
            assert_eq!(count(&query(&tables, Scope::All, &named).await.unwrap()), 0);
            checked += 1;
        }
    }
    assert!(checked >= 4, "the golden file has sessions ({checked})");
    // A table keyed without its tenant (ingest_errors, by position alone) is looked up within
    // the caller's tenant all the same.
    let errors = query(
        &tables,
        Scope::All,
        &format!(
            "SELECT position, tenant_id FROM ingest_errors WHERE tenant_id IN ('{TENANT_A}', '{TENANT_B}')"
        ),
    )
    .await
    .unwrap();
    let mut looked = 0;
    for batch in &errors {
        let text = |name: &str| strings(batch, name);
        let (positions, tenants) = (text("position"), text("tenant_id"));
        for i in 0..batch.num_rows() {
            let pinned = format!(
                "SELECT position FROM ingest_errors WHERE position = '{}'",
                positions.value(i)
            );
            for caller in [TENANT_A, TENANT_B] {
                let seen = query(&tables, Scope::Tenant(caller.parse().unwrap()), &pinned)
                    .await
                    .unwrap();
                let own = usize::from(tenants.value(i) == caller);
                assert_eq!(count(&seen), own, "{pinned} as {caller}");
            }
            looked += 1;
        }
    }
    assert!(
        looked >= 2,
        "the golden file has error rows of both tenants ({looked})"
    );
    // A key no row ever had: nothing, and no error.
    let missing = "SELECT * FROM viewer_sessions WHERE internal_name = 'never-seen-name' AND node_id = 'n' AND session_id = 's'";
    assert_eq!(
        count(&query(&tables, Scope::All, missing).await.unwrap()),
        0
    );
}

/// Statements that nest far deeper than anyone writes are answered or refused with a clear
/// error: they used to overflow the API's stack, which aborts the whole engine.
#[tokio::test]
async fn deeply_nested_statements_are_answered_not_a_crash() {
    use keel_api::auth::Scope;
    use keel_api::sql::query;
    let handles = golden();
    // The session's settings may be read (SHOW ALL), not set.
    let settings = query(&handles.tables, Scope::All, "SHOW ALL")
        .await
        .unwrap();
    assert!(settings.iter().map(|b| b.num_rows()).sum::<usize>() > 10);
    assert!(matches!(
        query(
            &handles.tables,
            Scope::All,
            "SET datafusion.execution.batch_size = 1"
        )
        .await,
        Err(keel_api::sql::SqlError::Refused(_))
    ));

    // SQL: planned on the query's own deep-stacked thread, and refused past its size before
    // planning (a chain of 1,000 terms aborted the engine; longer ones plan for minutes).
    for (sql, answer) in [
        (
            format!("SELECT {} AS n", vec!["1"; 256].join("+")),
            "| 256 |",
        ),
        (
            format!(
                "SELECT sum(n) AS n FROM ({})",
                vec!["SELECT 1 AS n"; 500].join(" UNION ALL ")
            ),
            "| 500 |",
        ),
    ] {
        let batches = query(&handles.tables, Scope::All, &sql).await.unwrap();
        let shown = arrow::util::pretty::pretty_format_batches(&batches)
            .unwrap()
            .to_string();
        assert!(shown.contains(answer), "{shown}");
    }
    for (sql, refusal) in [
        (
            format!("SELECT {} AS n", vec!["1"; 20_000].join("+")),
            "the statement's expressions nest deeper than 256 levels",
        ),
        // Brackets are bounded by the parser itself.
        (
            format!("SELECT {}1{} AS n", "(".repeat(300), ")".repeat(300)),
            "SQL error: RecursionLimitExceeded",
        ),
        (
            vec!["SELECT 1 AS n"; 1_002].join(" UNION ALL "),
            "the statement has more than 1000 UNION, INTERSECT or EXCEPT operations",
        ),
        // Explained, a statement is the statement it explains.
        (
            format!("EXPLAIN SELECT {} AS n", vec!["1"; 20_000].join("+")),
            "the statement's expressions nest deeper than 256 levels",
        ),
        // Wide rather than deep.
        (
            format!(
                "SELECT {} AS n",
                vec![format!("({})", vec!["1"; 100].join("+")); 300].join(", ")
            ),
            "the statement has more than 20000 expressions",
        ),
        (
            format!(
                "SELECT count(*) FROM {}",
                (0..300)
                    .map(|i| format!("streams s{i}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "the statement reads from more than 256 tables",
        ),
    ] {
        match query(&handles.tables, Scope::All, &sql).await {
            Err(keel_api::sql::SqlError::Invalid(message)) => {
                assert!(message.starts_with(refusal), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    // GraphQL: a list literal 1,500 deep is refused before it is parsed.
    let state = state(&handles);
    let deep = format!(
        "{{ streams(after: {}1{}) {{ totalCount }} }}",
        "[".repeat(1500),
        "]".repeat(1500)
    );
    let request = Request::post("/graphql")
        .header(
            header::AUTHORIZATION,
            format!("Bearer {}", token(&Claims::admin("root", FAR))),
        )
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::json!({ "query": deep }).to_string()))
        .unwrap();
    let (status, _, body) = call(&state, request).await;
    assert_eq!(status, StatusCode::OK);
    let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        value["errors"][0]["message"],
        keel_api::graphql::too_deep_message(),
        "{value}"
    );

    // Fields that read a whole table count as such: nineteen in a document (each with its
    // selection), not twenty-one.
    let aliases = |n: usize| {
        (0..n)
            .map(|i| format!("a{i}: viewerSessions(first: 1) {{ totalCount }}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    for (n, refused) in [(19, false), (21, true)] {
        let request = Request::post("/graphql")
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", token(&Claims::admin("root", FAR))),
            )
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(
                serde_json::json!({ "query": format!("{{ {} }}", aliases(n)) }).to_string(),
            ))
            .unwrap();
        let (_, _, body) = call(&state, request).await;
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            value["errors"][0]["message"] == "Query is too complex.",
            refused,
            "{n}: {value}"
        );
        assert_eq!(value["data"]["a0"].is_object(), !refused, "{n}: {value}");
    }

    // A body past the API's limit is refused unread, as on /v1/sql; one that is not a
    // request is a JSON error.
    for (body, expected) in [
        (
            serde_json::json!({ "query": "{ streams { totalCount } }", "pad": "x".repeat(2 << 20) })
                .to_string(),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        ("not json".to_owned(), StatusCode::BAD_REQUEST),
    ] {
        let request = Request::post("/graphql")
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", token(&Claims::admin("root", FAR))),
            )
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .unwrap();
        let (status, _, body) = call(&state, request).await;
        assert_eq!(status, expected);
        let value: serde_json::Value = serde_json::from_slice(&body).expect("a JSON error");
        let code = if expected == StatusCode::PAYLOAD_TOO_LARGE {
            "too_large"
        } else {
            "bad_request"
        };
        assert_eq!(value["error"]["code"], code, "{value}");
    }
}

/// The dashboard's `nodes` field carries each node's live routing score from Foghorn's fleet.
#[tokio::test]
async fn graphql_nodes_carry_the_live_routing_score() {
    let handles = golden();
    let state = state(&handles);
    let query = serde_json::json!({
        "query": "{ nodes { nodeId score { cpu ram bw staticTotal eligible reason pendingViewers } } }"
    });
    let request = Request::post("/graphql")
        .header(
            header::AUTHORIZATION,
            format!("Bearer {}", token(&Claims::admin("root", FAR))),
        )
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(query.to_string()))
        .unwrap();
    let (status, _, body) = call(&state, request).await;
    assert_eq!(status, StatusCode::OK);
    let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let nodes = value["data"]["nodes"].as_array().expect("nodes");
    assert!(nodes.len() >= 2, "{value}");
    let fleet = handles.fleet.snapshot();
    for node in nodes {
        let id = node["nodeId"].as_str().unwrap();
        let score = &node["score"];
        let load = fleet.node(id).expect("routing knows every node");
        let (cpu, ram, bw) = keel_dataflows::foghorn::score::terms(load, &fleet.policy().weights);
        assert_eq!(score["cpu"], cpu, "{node}");
        assert_eq!(score["ram"], ram, "{node}");
        assert_eq!(score["bw"], bw, "{node}");
        assert_eq!(score["staticTotal"], cpu + ram + bw, "{node}");
        let eligible = score["eligible"].as_bool().unwrap();
        assert_eq!(eligible, score["reason"].is_null(), "{node}");
    }
    let (_, _, metrics) = call(
        &state,
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    let metrics = String::from_utf8(metrics).unwrap();
    let fresh = fleet
        .nodes()
        .iter()
        .filter(|n| !n.is_stale(fleet.watermark()))
        .count();
    assert!(
        metrics.contains(&format!("keel_foghorn_nodes{{state=\"fresh\"}} {fresh}")),
        "{metrics}"
    );
}

/// Every refusal the API makes is in its one error shape, also those axum makes before any
/// handler runs: an unknown route, a method a route does not serve (its `Allow` kept), and a
/// WebSocket route asked without an upgrade.
#[tokio::test]
async fn refusals_before_any_handler_are_in_the_api_error_shape() {
    let handles = golden();
    let state = state(&handles);
    for (method, path, status, code) in [
        ("GET", "/nope", StatusCode::NOT_FOUND, "not_found"),
        (
            "GET",
            "/v1/sql",
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            "POST",
            "/metrics",
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        ("GET", "/ws", StatusCode::BAD_REQUEST, "bad_request"),
    ] {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .unwrap();
        let response = router(state.clone()).oneshot(request).await.unwrap();
        assert_eq!(response.status(), status, "{method} {path}");
        if status == StatusCode::METHOD_NOT_ALLOWED {
            assert!(
                response.headers().contains_key(header::ALLOW),
                "{method} {path}"
            );
        }
        let (_, content_type, body) = call(
            &state,
            Request::builder()
                .method(method)
                .uri(path)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(content_type, "application/json", "{method} {path}");
        let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(error["error"]["code"], code, "{method} {path}: {error}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(!message.is_empty(), "{method} {path}: {error}");
        if status == StatusCode::NOT_FOUND {
            assert_eq!(message, "no such route: /nope");
        }
    }
}

/// What one function call (or `||`) builds is bounded in a served query: a statement that would
/// build a value past the bound is refused with a query limit, before the value is built where
/// its arguments say how large it would be, while every statement within the bound answers
/// exactly as it does unbounded, column names included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_a_statement_builds_are_bounded() {
    use keel_api::auth::Scope;
    use keel_api::sql::{Limits, SqlError, query_within};
    use keel_api::values::PAST_BOUND;
    let handles = golden();
    let tables = handles.tables.clone();
    let run = |sql: String, limits: Limits| {
        let tables = tables.clone();
        async move { query_within(&tables, Scope::All, &sql, limits).await }
    };
    // A bound of 16 MiB.
    let small = Limits {
        memory: 64 << 20,
        ..Limits::SERVED
    };
    assert_eq!(small.value_bound(), Some(16 << 20));

    let refused = [
        // Seen ahead: gigabytes are never asked for.
        ("SELECT length(repeat('x', 1500000000))", "repeat"),
        ("SELECT length(lpad('x', 2000000000))", "lpad"),
        (
            "SELECT length(rpad(internal_name, 1000000000)) FROM streams",
            "rpad",
        ),
        (
            "SELECT length(regexp_replace(repeat('x', 1000000), '', repeat('y', 100), 'g'))",
            "regexp_replace",
        ),
        (
            "SELECT length(concat(s, s, s, s, s, s, s, s)) FROM (SELECT repeat('x', 3000000) AS s)",
            "concat",
        ),
        (
            "SELECT length(concat_ws(repeat('-', 3000000), 'a', 'b', 'c', 'd', 'e', 'f', 'g')) AS n",
            "concat_ws",
        ),
        // Doubled step by step, each step measured: stopped at the step past the bound.
        (
            "WITH a AS (SELECT repeat('x', 4000000) AS s), b AS (SELECT s || s AS s FROM a), \
             c AS (SELECT s || s AS s FROM b), d AS (SELECT s || s AS s FROM c), \
             e AS (SELECT s || s AS s FROM d) SELECT length(s) FROM e",
            "||",
        ),
    ];
    // A call whose constant arguments show it past the bound is refused while planned, at once.
    let started = std::time::Instant::now();
    match run(
        "SELECT length(concat(repeat('x', 12000000), repeat('y', 12000000))) AS n".to_owned(),
        small,
    )
    .await
    {
        Err(SqlError::Limit(message)) => assert!(message.contains("concat"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    for (sql, function) in refused {
        let started = std::time::Instant::now();
        match run(sql.to_owned(), small).await {
            Err(SqlError::Limit(message)) => {
                assert!(message.starts_with(PAST_BOUND), "{sql}: {message}");
                assert!(message.contains("16 MiB"), "{sql}: {message}");
                assert!(message.contains(function), "{sql}: {message}");
            }
            other => panic!("{sql}: {other:?}"),
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{sql}"
        );
    }
    // Calls each within the bound add up: past the memory limit in all, the statement is
    // refused too.
    let many = (0..8)
        .map(|i| format!("length(repeat('{i}', 10000000))"))
        .collect::<Vec<_>>()
        .join(" + ");
    match run(format!("SELECT {many} AS n"), small).await {
        Err(SqlError::Limit(message)) => {
            assert!(message.starts_with(PAST_BOUND), "{message}");
            assert!(message.contains("more than 64 MiB in all"), "{message}");
        }
        other => panic!("{other:?}"),
    }

    // Within the bound, the same answers and the same column names as without one.
    let within = [
        "SELECT length(repeat('x', 1000000)) AS n",
        "SELECT internal_name || '/' || status, upper(internal_name), lpad(status, 12, '.') FROM streams ORDER BY 1",
        "SELECT concat(country_code, ':', city) AS place, count(*) FROM viewer_sessions GROUP BY 1 ORDER BY 1",
        "SELECT concat_ws(' / ', internal_name, status, node_id) FROM streams ORDER BY 1",
        "SELECT replace(internal_name, 'a', 'AA'), regexp_replace(internal_name, '[0-9]', '#', 'g') FROM streams ORDER BY 1",
        "SELECT date_trunc('hour', window_start) AS hour, sum(viewer_seconds) FROM usage_5m GROUP BY 1 ORDER BY 1",
        "SELECT * FROM streams WHERE length(upper(status)) > 0 AND length(internal_name) > 3 ORDER BY internal_name",
        "WITH a AS (SELECT repeat('ab', 1000) AS s) SELECT length(s || s || s) FROM a",
        // Functions that run only as what they simplify to.
        "SELECT arrow_cast(total_sessions, 'Int32') AS n, now() IS NOT NULL AS t FROM streams ORDER BY 1",
        "SELECT arrow_typeof(internal_name), date_trunc('day', started_at) FROM streams ORDER BY 2, 1",
        // A large constant beside every row builds no large value when the result is a number.
        "SELECT count(*) FROM viewer_sessions WHERE strpos(repeat('ab', 3000000), session_id) >= 0",
        // Many `||` in a row are measured once each (not once per pass over the plan).
        "SELECT count(*) FROM viewer_sessions WHERE length(nvl(nvl(nvl(session_id || repeat('x', 1000), 'a'), 'b'), 'c')) > 0",
    ];
    for sql in within {
        let bounded = run(sql.to_owned(), small).await;
        let free = run(sql.to_owned(), Limits::NONE).await.unwrap();
        let bounded = bounded.unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert_eq!(bounded, free, "{sql}");
        assert!(
            bounded.iter().map(|b| b.num_rows()).sum::<usize>() > 0,
            "{sql}"
        );
    }
}

/// A query past its limits is stopped with an error that says which limit, and what to change;
/// within them, the same query answers. (The served limits are the same checks with larger
/// numbers.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_past_their_limits_are_stopped_with_a_clear_error() {
    use keel_api::auth::Scope;
    use keel_api::sql::{Limits, SqlError, query_within};
    use std::time::Duration;
    let handles = golden();
    let tables = handles.tables.clone();
    let run = |sql: &'static str, limits: Limits| {
        let tables = tables.clone();
        async move { query_within(&tables, Scope::All, sql, limits).await }
    };
    let limit = |result: Result<Vec<arrow::array::RecordBatch>, SqlError>| match result {
        Err(SqlError::Limit(message)) => message,
        other => panic!("{other:?}"),
    };

    let all = "SELECT * FROM viewer_sessions";
    let answered = run(all, Limits::SERVED).await.unwrap();
    let bytes: usize = answered.iter().map(|b| b.get_array_memory_size()).sum();
    let small = Limits {
        result: bytes / 2,
        ..Limits::SERVED
    };
    let message = limit(run(all, small).await);
    assert!(
        message.starts_with(&format!("the result is larger than {} bytes", bytes / 2)),
        "{message}"
    );
    assert!(
        run("SELECT count(*) FROM viewer_sessions", small)
            .await
            .is_ok()
    );

    // Rows of nothing under a long name are little Arrow but much JSON: counted as such.
    let alias = format!(
        "SELECT NULL AS \"{}\" FROM viewer_sessions",
        "n".repeat(1000)
    );
    let alias: &'static str = alias.leak();
    let few = Limits {
        result: 2000,
        ..Limits::SERVED
    };
    assert!(run(alias, Limits::SERVED).await.is_ok());
    let message = limit(run(alias, few).await);
    assert!(
        message.starts_with("the result is larger than 2000 bytes"),
        "{message}"
    );

    // A join's build side must be held whole: past the pool it fails, it does not spill.
    let join = "SELECT count(*) FROM viewer_sessions a JOIN viewer_sessions b ON a.session_id = b.session_id";
    assert!(run(join, Limits::SERVED).await.is_ok());
    let tight = Limits {
        memory: 1,
        ..Limits::SERVED
    };
    let message = limit(run(join, tight).await);
    assert!(
        message.starts_with("the query needs more memory"),
        "{message}"
    );

    // The rows a scan copies out of the live tables count too: a scan of the whole table is
    // refused by a pool a byte smaller, while a count (no column copied) and a few rows pass.
    let table = tables
        .read()
        .unwrap()
        .snapshot("viewer_sessions")
        .unwrap()
        .get_array_memory_size();
    let narrow = Limits {
        memory: table - 1,
        ..Limits::SERVED
    };
    let message = limit(run(all, narrow).await);
    assert!(
        message.starts_with("the query needs more memory for the rows it scans"),
        "{message}"
    );
    assert!(message.contains("scan of viewer_sessions"), "{message}");
    for fits in [
        "SELECT count(*) FROM viewer_sessions",
        "SELECT * FROM viewer_sessions LIMIT 3",
    ] {
        let answer = run(fits, narrow).await;
        assert!(answer.is_ok(), "{fits}: {answer:?}");
    }

    // A cross join counted without end in sight: stopped at its time, the engine still serving.
    let endless = format!(
        "SELECT count(*) FROM {} WHERE t0.session_id <= t11.session_id",
        (0..12)
            .map(|i| format!("viewer_sessions t{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let endless: &'static str = endless.leak();
    let brief = Limits {
        time: Duration::from_millis(300),
        ..Limits::SERVED
    };
    let started = std::time::Instant::now();
    let message = limit(run(endless, brief).await);
    assert!(
        message.starts_with("the query ran longer than"),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(
        run("SELECT count(*) FROM streams", Limits::SERVED)
            .await
            .is_ok()
    );

    // Served over HTTP within the settings' limits: 422 with the limit named.
    let mut state = state(&handles);
    state.limits.query = small;
    let a = tenant_token(TENANT_A);
    let (status, _, body) = call(&state, sql_request(Some(&a), all, None)).await;
    let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("query_limit")),
        "{error}"
    );
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("the result is larger than"),
        "{error}"
    );
}

/// A request whose body stops short of its `Content-Length` is answered 408 in the error shape
/// once the body's time is up, and its connection is closed (it held its place among the open
/// connections for good); a body sent in pieces within the time is answered as usual, and one
/// larger than the limit is still 413.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_short_is_refused_in_time() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    let handles = golden();
    let mut state = state(&handles);
    state.limits.body_wait = std::time::Duration::from_millis(400);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router(state)).await });
    let token = tenant_token(TENANT_A);
    let body = r#"{"sql": "SELECT count(*) AS n FROM streams"}"#;
    let head = |length: usize| {
        format!(
            "POST /v1/sql HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
        )
    };

    // Ten bytes of a promised hundred, then nothing.
    let mut stalled = TcpStream::connect(address).await.unwrap();
    stalled.write_all(head(100).as_bytes()).await.unwrap();
    stalled.write_all(&body.as_bytes()[..10]).await.unwrap();
    let started = std::time::Instant::now();
    let mut answer = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stalled.read_to_string(&mut answer),
    )
    .await
    .expect("answered and closed, not held")
    .unwrap();
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains(r#""code":"timeout""#) && answer.contains("did not arrive within 0.4 s"),
        "{answer}"
    );

    // The same body in two pieces, the second after a pause within the time: answered.
    let mut paused = TcpStream::connect(address).await.unwrap();
    paused.write_all(head(body.len()).as_bytes()).await.unwrap();
    paused.write_all(&body.as_bytes()[..10]).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    paused.write_all(&body.as_bytes()[10..]).await.unwrap();
    let mut buffer = vec![0; 4096];
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), paused.read(&mut buffer))
        .await
        .expect("answered")
        .unwrap();
    let answer = String::from_utf8_lossy(&buffer[..read]);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#""n":"#), "{answer}");

    // Past the limit by its Content-Length: still 413 in the error shape.
    let mut large = TcpStream::connect(address).await.unwrap();
    large
        .write_all(head(MAX_BODY + 1).as_bytes())
        .await
        .unwrap();
    large.write_all(&vec![b' '; MAX_BODY + 1]).await.ok();
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), large.read(&mut buffer))
        .await
        .expect("answered")
        .unwrap();
    let answer = String::from_utf8_lossy(&buffer[..read]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains(r#""code":"too_large""#), "{answer}");
}
