//! The `keel` binary, run as a user would.

use std::io::Read;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

fn keel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(args)
        .output()
        .unwrap()
}

/// The status `child` exits with within `limit`; past it the child is killed and the test fails
/// saying `late`.
fn exit_within(child: &mut std::process::Child, limit: Duration, late: &str) -> ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > limit {
            child.kill().unwrap();
            panic!("{late}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `signal` (`-INT`, `-TERM`) to `child`, as a terminal or a service manager would.
fn send_signal(child: &std::process::Child, signal: &str) {
    let sent = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// Everything `pipe` gives until it closes, as text.
fn read_all(mut pipe: impl Read) -> String {
    let mut text = String::new();
    pipe.read_to_string(&mut text).unwrap();
    text
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `keel run` in `dir` with `args`, its API on a free port and its other ports off.
fn spawn_run(dir: &std::path::Path, args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_keel"))
        .current_dir(dir)
        .arg("run")
        .args(args)
        .args(["--listen", "127.0.0.1:0", "--pg-listen", "off"])
        .args(["--foghorn-listen", "off", "--foghorn-grpc-listen", "off"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The streams counted by the last line of `keel run`'s summary.
fn summary_streams(last: &str) -> i64 {
    last.split(" | ")
        .find_map(|f| f.strip_suffix(" live)"))
        .and_then(|f| f.split(' ').next())
        .and_then(|n| n.parse::<i64>().ok())
        .expect("the summary counts streams")
}

/// Rows of `stream_analytics` in the SQLite file `keel run` keeps in `dir`, and their
/// connections.
fn stored_streams(dir: &std::path::Path) -> (i64, i64) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        use sqlx::Connection;
        let url = format!("sqlite:{}", dir.join("keel-state.db").display());
        let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::query_as("SELECT count(*), coalesce(sum(total_connections), 0) FROM stream_analytics")
            .fetch_one(&mut db)
            .await
            .unwrap()
    })
}

#[test]
fn sql_answers_over_a_replayed_file() {
    let out = keel(&[
        "sql",
        "--input",
        "tests/golden/events.ndjson",
        "--format",
        "csv",
        "SELECT internal_name, current_viewers, peak_viewers FROM streams ORDER BY internal_name",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "internal_name,current_viewers,peak_viewers\ndemo,2,3\nnews,1,2\n"
    );
    let out = keel(&[
        "sql",
        "--input",
        "tests/golden/events.ndjson",
        "--format",
        "json",
        "SELECT count(*) AS errors FROM ingest_errors",
    ]);
    assert_eq!(text(&out.stdout), "{\"errors\":5}\n");
    // The statement is checked before the replay by planning it, not by running it over the
    // still-empty tables, where this divided by a count of none.
    let out = keel(&[
        "sql",
        "--input",
        "tests/golden/events.ndjson",
        "EXPLAIN ANALYZE SELECT 1 / count(*) AS r FROM streams",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("output_rows"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn bad_sql_is_a_clear_error() {
    for (sql, expected) in [
        ("SELECT nope FROM streams", "error: "),
        ("SELEC 1", "error: "),
        ("SELECT * FROM no_such_table", "no_such_table"),
        ("DROP TABLE streams", "only queries are allowed"),
        ("INSERT INTO streams VALUES (1)", "only queries are allowed"),
        ("CREATE TABLE t (x INT)", "only queries are allowed"),
    ] {
        let out = keel(&["sql", "--input", "tests/golden/events.ndjson", sql]);
        assert_eq!(out.status.code(), Some(2), "{sql}: {}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains(expected),
            "{sql}: {}",
            text(&out.stderr)
        );
        assert!(!text(&out.stderr).contains("panicked"));
    }
    // Checked before the replay: over an input that never ends, the error comes at once.
    let refused_at_once = |args: &[&str]| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
            .args(["sql", "--input", "/dev/stdin"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let _open = child.stdin.take();
        let status = exit_within(
            &mut child,
            Duration::from_secs(60),
            &format!("keel sql waited for its input before checking {args:?}"),
        );
        let stderr = read_all(child.stderr.take().unwrap());
        assert_eq!(status.code(), Some(2), "{stderr}");
        stderr
    };
    let stderr = refused_at_once(&["SELECT nope FROM streams"]);
    assert!(stderr.contains("nope"), "{stderr}");
    // So is a nested column asked for as CSV, which CSV cannot hold.
    let nested = "SELECT named_struct('a', internal_name) AS s FROM streams";
    let stderr = refused_at_once(&["--format", "csv", nested]);
    assert!(
        stderr.contains("column \"s\" holds nested values"),
        "{stderr}"
    );
}

#[test]
fn missing_inputs_and_bad_options_say_so() {
    let out = keel(&["sql", "--input", "/nonexistent/x.ndjson", "SELECT 1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot read /nonexistent/x.ndjson"),
        "{}",
        text(&out.stderr)
    );
    // A directory is refused before any replay; --events only means something to the
    // simulator.
    let out = keel(&["sql", "--input", "/tmp", "SELECT 1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot read /tmp: a directory, not a file of records"),
        "{}",
        text(&out.stderr)
    );
    let out = keel(&["sql", "--input", "x", "--events", "5", "SELECT 1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--events sets how many records the simulator makes"),
        "{}",
        text(&out.stderr)
    );
    // Options that would do nothing with the rest of the command line are refused by name, so
    // none is ignored silently; the same options where they apply are taken.
    let idle: &[(&[&str], &str)] = &[
        (
            &["run", "--source", "file:x", "--rate", "5"],
            "--rate is an option of the simulator, and does nothing with --source file:x: leave it out",
        ),
        (
            &[
                "run",
                "--source",
                "kafka://h:1/t",
                "--wire",
                "v1",
                "--malformed",
                "0.1",
            ],
            "--wire and --malformed are options of the simulator, and do nothing with --source kafka://h:1/t",
        ),
        (
            &["run", "--group", "g"],
            "--group is an option of a kafka:// source, and does nothing with --source sim",
        ),
        (
            &["run", "--source", "file:x", "--state-horizon", "1h"],
            "--state-horizon is an option of a kafka:// source",
        ),
        (
            &["sql", "--input", "x", "--seed", "3", "SELECT 1"],
            "--seed is an option of the simulator, and does nothing with --input x",
        ),
        (
            &["sql", "--input", "x", "--idle", "3", "SELECT 1"],
            "--idle is an option of a kafka:// source, and does nothing with --input x",
        ),
        (
            &[
                "sql",
                "--url",
                "http://127.0.0.1:1",
                "--token",
                "t",
                "--events",
                "5",
                "SELECT 1",
            ],
            "--events is an option of a replay, and does nothing with --url",
        ),
        (
            &[
                "backfill", "--source", "file:x", "--from", "a", "--to", "b", "--idle", "3",
            ],
            "--idle is an option of a kafka:// source, and does nothing with --source file:x",
        ),
    ];
    for (args, says) in idle {
        let out = keel(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(
            err.contains(&format!("Usage: keel {}", args[0])),
            "{args:?}: {err}"
        );
    }
    let out = keel(&[
        "sql",
        "--source",
        "sim",
        "--events",
        "50",
        "--seed",
        "3",
        "--wire",
        "v1",
        "--format",
        "csv",
        "SELECT count(*) > 0 AS some FROM streams",
    ]);
    assert_eq!(text(&out.stdout), "some\ntrue\n", "{}", text(&out.stderr));
    let out = keel(&[
        "sql",
        "--input",
        "/nonexistent/x.ndjson",
        "--format",
        "json",
        "SELECT 1",
    ]);
    assert!(
        text(&out.stderr).contains("cannot read /nonexistent/x.ndjson"),
        "{}",
        text(&out.stderr)
    );
    // A backfill into `keel run`'s own ClickHouse database is refused before anything is read.
    let out = keel(&[
        "backfill",
        "--source",
        "file:/nonexistent/x.ndjson",
        "--from",
        "2026-11-01T00:00:00Z",
        "--to",
        "2026-11-01T01:00:00Z",
        "--clickhouse",
        "http://127.0.0.1:1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("name a database of its own with --clickhouse-database"),
        "{}",
        text(&out.stderr)
    );
    // A SQL database without the table is named, with what to do.
    let dir = tempfile::tempdir().unwrap();
    let unmigrated = format!("sqlite:{}", dir.path().join("new.db").display());
    let events = dir.path().join("one.ndjson");
    std::fs::write(&events, "{}\n").unwrap();
    let out = keel(&[
        "backfill",
        "--source",
        &format!("file:{}", events.display()),
        "--from",
        "2026-11-01T00:00:00Z",
        "--to",
        "2026-11-01T01:00:00Z",
        "--database",
        &unmigrated,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains(&format!("database {unmigrated}: opening the SQLite file"))
            && text(&out.stderr).contains("run keel migrate --database URL"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        !dir.path().join("new.db").exists(),
        "an empty file was left behind"
    );
    let out = keel(&["sql", "--source", "carrier-pigeon", "SELECT 1"]);
    assert!(
        text(&out.stderr).contains("unknown source \"carrier-pigeon\""),
        "{}",
        text(&out.stderr)
    );
    let out = keel(&["sql", "--source", "kafka://localhost:9092", "SELECT 1"]);
    assert!(
        text(&out.stderr).contains("names no topic"),
        "{}",
        text(&out.stderr)
    );
    let out = keel(&[
        "simulate",
        "--events",
        "10",
        "--out",
        "/nonexistent/dir/x.ndjson",
    ]);
    assert!(text(&out.stderr).contains("cannot create /nonexistent/dir/x.ndjson"));

    // Numbers past what an option can mean are refused by name, not a panic or a silent stall.
    let bad: &[&[&str]] = &[
        &["sql", "--input", "x", "--idle", "inf", "SELECT 1"],
        &["sql", "--input", "x", "--idle", "1e30", "SELECT 1"],
        &["run", "--summary-every", "inf"],
        &["run", "--rate", "0"],
        &["run", "--rate=-5"],
        &["run", "--rate", "nan"],
        &["run", "--flush-every", "1e300"],
        &[
            "backfill", "--source", "file:x", "--from", "a", "--to", "b", "--idle", "inf",
        ],
        &["simulate", "--events", "10", "--mean-session", "inf"],
        &["simulate", "--events", "10", "--arrivals", "0"],
    ];
    for args in bad {
        let out = keel(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("must be more than 0 and at most"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    // A store that cannot be opened says which, and why, at once.
    let out = keel(&["migrate", "--database", "sqlite:/nonexistent/dir/x.db"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("opening the SQLite file /nonexistent/dir/x.db"),
        "{}",
        text(&out.stderr)
    );
    let started = Instant::now();
    let out = keel(&["migrate", "--database", "postgres://keel@127.0.0.1:1/app"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("Connection refused"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    let out = keel(&["simulate", "--events", "10", "--tenants", "0"]);
    assert!(
        text(&out.stderr).contains("must be at least 1"),
        "{}",
        text(&out.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x.ndjson");
    for start in ["1900-01-01T00:00:00Z", "9999-12-31T23:59:59Z"] {
        let file = file.to_str().unwrap();
        let out = keel(&[
            "simulate", "--events", "10", "--start", start, "--out", file,
        ]);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            text(&out.stderr).contains("--start must be from 2000-01-01 and before 2200-01-01"),
            "{}",
            text(&out.stderr)
        );
    }
}

#[test]
fn simulate_then_query() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sim.ndjson");
    let path = path.to_str().unwrap();
    let simulate = |out: &str| {
        keel(&[
            "simulate",
            "--events",
            "5000",
            "--seed",
            "9",
            "--malformed",
            "0.02",
            "--out",
            out,
        ])
    };
    let out = simulate(path);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(path).unwrap().lines().count(), 5000);
    // `--out -` writes the same records to standard output.
    let piped = simulate("-");
    assert!(piped.status.success(), "{}", text(&piped.stderr));
    assert_eq!(text(&piped.stdout), std::fs::read_to_string(path).unwrap());
    assert!(!dir.path().join("-").exists() && !std::path::Path::new("-").exists());
    let out = keel(&[
        "sql",
        "--input",
        path,
        "--workers",
        "2",
        "--format",
        "csv",
        "SELECT (SELECT count(*) FROM ingest_errors) > 50 AS errors_seen, (SELECT count(*) FROM streams) AS streams",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "errors_seen,streams\ntrue,40\n");
    // The same file on standard input, as `--input -`.
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args([
            "sql",
            "--input",
            "-",
            "--format",
            "csv",
            "SELECT count(*) AS streams FROM streams",
        ])
        .stdin(std::fs::File::open(path).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "streams\n40\n");
}

#[test]
fn run_prints_a_live_summary_and_stops_cleanly_on_ctrl_c() {
    let workdir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .current_dir(workdir.path())
        .args([
            "run",
            "--rate",
            "4000",
            "--listen",
            "127.0.0.1:0",
            "--pg-listen",
            "127.0.0.1:0",
            "--foghorn-listen",
            "127.0.0.1:0",
            "--foghorn-grpc-listen",
            "off",
            "--summary-every",
            "0.3",
            "--malformed",
            "0.01",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    // `keel` turns transparent huge pages off for itself (their first-touch zeroing stalled the
    // engine); the kernel reports the process's flag in its status file.
    let status_file = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let thp = status_file
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(str::trim);
    assert_eq!(thp, Some("0"), "THP_enabled of keel run:\n{status_file}");
    send_signal(&child, "-INT");
    let status = exit_within(
        &mut child,
        Duration::from_secs(20),
        "keel run did not stop after Ctrl-C",
    );
    let stdout = read_all(child.stdout.take().unwrap());
    assert!(status.success(), "exit {status}: {stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines.len() >= 4, "{stdout}");
    assert!(
        lines[1].contains("events/s")
            && lines[1].contains("open sessions")
            && lines[1].ends_with(" MiB resident"),
        "{stdout}"
    );
    let last = lines.last().unwrap();
    assert!(
        last.starts_with("stopped: ") && last.ends_with(" MiB resident"),
        "{stdout}"
    );
    let events: u64 = last["stopped: ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .replace(',', "")
        .parse()
        .unwrap();
    assert!(events > 3_000, "{stdout}");

    // The embedded default keeps stream_analytics in a SQLite file beside it, every stream of
    // the live tables, written before it exited.
    let (stored, viewers) = stored_streams(workdir.path());
    assert_eq!(stored, summary_streams(last), "{stdout}");
    assert!(viewers > 100, "{viewers} connections stored");
}

/// `keel run` with results going to a store that writes every 5 s keeps reading between the
/// writes (a bound on the epochs waiting for the store once stalled it for seconds at a time),
/// and SIGTERM (what `docker stop` and service managers send) stops it as Ctrl-C does, with the
/// last write made.
#[test]
fn run_reads_on_between_store_writes_and_stops_cleanly_on_sigterm() {
    let workdir = tempfile::tempdir().unwrap();
    let args = [
        "--rate",
        "3000",
        "--flush-every",
        "5",
        "--summary-every",
        "0.5",
    ];
    let mut child = spawn_run(workdir.path(), &args);
    std::thread::sleep(Duration::from_millis(4500));
    send_signal(&child, "-TERM");
    let status = exit_within(
        &mut child,
        Duration::from_secs(40),
        "keel run did not stop after SIGTERM",
    );
    let stdout = read_all(child.stdout.take().unwrap());
    let stderr = read_all(child.stderr.take().unwrap());
    assert!(status.success(), "exit {status}: {stdout}\n{stderr}");
    assert!(stderr.contains("stopping:"), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    let last = lines.last().unwrap();
    assert!(last.starts_with("stopped: "), "{stdout}");
    // Every half second after the first, events came in.
    let rates: Vec<u64> = lines
        .iter()
        .filter_map(|l| l.split(" events/s").next()?.split("] ").nth(1))
        .map(|n| n.trim().replace(',', "").parse().unwrap())
        .collect();
    assert!(rates.len() >= 6, "{stdout}");
    assert!(
        rates[1..].iter().all(|&r| r > 0),
        "reading stalled while the store waited to write: {stdout}"
    );
    // Stopped by SIGTERM, it still wrote what it had: every stream of the summary is stored.
    assert_eq!(
        stored_streams(workdir.path()).0,
        summary_streams(last),
        "{stdout}"
    );
}

/// `keel run` on a file says that the tenant token it prints is the simulator's, since the
/// file's tenants are not known when it starts.
#[test]
fn run_on_a_file_says_whose_the_printed_tenant_token_is() {
    use std::io::BufRead;
    let workdir = tempfile::tempdir().unwrap();
    let file = workdir.path().join("in.ndjson");
    let file = file.to_str().unwrap();
    let out = keel(&["simulate", "--events", "200", "--out", file]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let source = format!("file:{file}");
    let mut child = spawn_run(workdir.path(), &["--source", &source]);
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut banner = String::new();
    for line in stderr.lines() {
        let line = line.unwrap();
        banner.push_str(&line);
        banner.push('\n');
        if line.trim().starts_with("admin: ") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        banner.contains("the tenant below is the simulator's"),
        "{banner}"
    );
}

/// `keel run | head -2`: when its standard output closes, `keel run` stops as Ctrl-C stops it,
/// not with a panic.
#[test]
fn run_stops_cleanly_when_its_output_closes() {
    use std::io::BufRead;
    let workdir = tempfile::tempdir().unwrap();
    let mut child = spawn_run(workdir.path(), &["--summary-every", "0.2"]);
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(first.contains("events/s"), "{first}");
    drop(stdout);
    let status = exit_within(
        &mut child,
        Duration::from_secs(40),
        "keel run did not stop once its output closed",
    );
    let stderr = read_all(child.stderr.take().unwrap());
    assert!(status.success(), "exit {status}: {stderr}");
    assert!(
        stderr.contains("stopping: standard output is closed"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `keel run` serves the API on a real socket and prints development tokens; `keel sql --url`
/// with the tenant token sees that tenant's rows only, and a bad token is refused.
#[test]
fn run_serves_sql_to_the_printed_tenant_token() {
    use std::io::BufRead;
    let workdir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .current_dir(workdir.path())
        .args([
            "run",
            "--rate",
            "3000",
            "--listen",
            "127.0.0.1:0",
            "--pg-listen",
            "127.0.0.1:0",
            "--foghorn-listen",
            "127.0.0.1:0",
            "--foghorn-grpc-listen",
            "off",
            "--summary-every",
            "10",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let banner = Banner::read(&mut lines);
    let (url, tenant, token, admin) = (
        banner.address("dashboard and API"),
        banner.tenant.clone(),
        banner.token.clone(),
        banner.admin.clone(),
    );
    let (pg, foghorn) = (
        banner.address("PostgreSQL protocol"),
        banner.address("Foghorn routing"),
    );
    std::thread::sleep(Duration::from_millis(1500));
    let query = "SELECT DISTINCT tenant_id FROM streams ORDER BY tenant_id";
    let out = keel(&[
        "sql", "--url", &url, "--token", &token, "--format", "csv", query,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("tenant_id\n{tenant}\n"));
    let out = keel(&[
        "sql", "--url", &url, "--token", &admin, "--format", "csv", query,
    ]);
    assert!(
        text(&out.stdout).lines().count() > 2,
        "the admin sees every tenant: {}",
        text(&out.stdout)
    );
    let out = keel(&["sql", "--url", &url, "--token", "wrong", "SELECT 1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("401 unauthorized: invalid token"),
        "{}",
        text(&out.stderr)
    );
    let out = keel(&["sql", "--url", &url, "--token", &token, "SELEC 1"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));

    // psql on the printed address, with the printed token as password: the same rows.
    let (host, port) = pg
        .rsplit_once(':')
        .map(|(h, p)| (h.to_owned(), p.to_owned()))
        .unwrap();
    let out = Command::new("psql")
        .arg(format!(
            "host={host} port={port} user=me dbname=keel sslmode=disable"
        ))
        .args(["-X", "-A", "-t", "-c", query])
        .env("PGPASSWORD", &token)
        .output()
        .expect("psql is installed (scripts/test-servers.sh installs postgresql-client)");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), tenant);

    // The dashboard is the page at the printed URL.
    let page = ureq::get(&url)
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(page.contains("Keel — live dashboard"), "{page}");

    // Foghorn routes a viewer against the simulated fleet on its printed address.
    let servers = ureq::get(&format!("{foghorn}/?lstserver=1"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let servers: serde_json::Value = serde_json::from_str(&servers).unwrap();
    let online: Vec<&String> = servers
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, state)| *state == "Monitored (online)")
        .map(|(host, _)| host)
        .collect();
    assert!(!online.is_empty(), "{servers}");
    let host = ureq::get(&format!("{foghorn}/some-stream?lat=52.37&lon=4.90"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(online.contains(&&host), "{host} is not among {online:?}");
    send_signal(&child, "-INT");
    assert!(child.wait().unwrap().success());
}

#[test]
fn graphql_schema_prints_the_served_schema_and_matches_the_checked_in_copy() {
    let out = keel(&["graphql-schema"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let sdl = text(&out.stdout);
    for needle in [
        "type Query",
        "type Subscription",
        "platformOverview",
        "streams(",
        "viewerSessions(",
        "geographicDistribution(",
        "liveFirehose",
        "liveTable(",
    ] {
        assert!(sdl.contains(needle), "the schema lacks {needle:?}");
    }
    // api/schema.graphql is what client authors read; it must be the schema the code serves.
    let checked_in = std::fs::read_to_string("api/schema.graphql").unwrap();
    assert!(
        checked_in == sdl,
        "api/schema.graphql is stale: regenerate it with `keel graphql-schema > api/schema.graphql`"
    );
}

/// `keel run` with Decklog and the Helmsman adapter: MistServer trigger webhooks posted to the
/// adapter (as `curl` would) arrive in the live tables, through the write-ahead log, Decklog's
/// gRPC and the engine's input.
#[test]
fn run_takes_mist_webhooks_into_the_tables() {
    use std::io::BufRead;
    let wal = tempfile::tempdir().unwrap();
    let workdir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .current_dir(workdir.path())
        .args([
            "run",
            "--rate",
            "200",
            "--listen",
            "127.0.0.1:0",
            "--pg-listen",
            "off",
            "--foghorn-listen",
            "off",
            "--decklog-listen",
            "127.0.0.1:0",
            "--insecure-plaintext",
            "--helmsman-listen",
            "127.0.0.1:0",
            "--helmsman-wal",
            wal.path().to_str().unwrap(),
            "--summary-every",
            "10",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let banner = Banner::read(&mut lines);
    std::thread::spawn(move || for _ in lines {});
    let (url, webhook, token, tenant) = (
        banner.address("dashboard and API"),
        banner.address("Helmsman adapter"),
        banner.token.clone(),
        banner.tenant.clone(),
    );
    assert!(
        banner.line("Decklog").contains("the embedded engine"),
        "Decklog hands off to the engine"
    );
    let decklog = banner.address("Decklog");
    let post = |trigger: &str, body: &str| {
        ureq::post(&format!("{webhook}/{trigger}"))
            .send(body)
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap()
    };
    let answer = post(
        "USER_NEW",
        "live+webhook-demo\n203.0.113.9\n1\nHLS\nhttp://edge/hls/webhook-demo/index.m3u8\nw-1",
    );
    assert_eq!(answer, "true");
    post("STREAM_BUFFER", "live+webhook-demo\nFULL\n");
    let query = "SELECT internal_name, current_viewers, total_sessions, buffer_state FROM streams WHERE internal_name = 'webhook-demo'";
    let started = Instant::now();
    loop {
        let out = keel(&[
            "sql", "--url", &url, "--token", &token, "--format", "csv", query,
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        if text(&out.stdout)
            == "internal_name,current_viewers,total_sessions,buffer_state\nwebhook-demo,1,1,FULL\n"
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{}",
            text(&out.stdout)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    post(
        "USER_END",
        "w-1\nlive+webhook-demo\nHLS\n203.0.113.9\n61\n1200\n98000\n",
    );
    // Viewer-seconds come from the session's event times (connect to disconnect), egress from
    // the disconnect's byte count.
    let query = "SELECT current_viewers, viewer_seconds > 0 AS watched, egress_bytes FROM streams WHERE internal_name = 'webhook-demo'";
    let started = Instant::now();
    loop {
        let out = keel(&[
            "sql", "--url", &url, "--token", &token, "--format", "csv", query,
        ]);
        if text(&out.stdout) == "current_viewers,watched,egress_bytes\n0,true,98000\n" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{}",
            text(&out.stdout)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let metrics = || {
        ureq::get(&format!("{url}/metrics"))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap()
    };
    // Forwarding runs on the adapter's own task, and it counts a trigger as forwarded only once
    // Decklog has acknowledged it, a moment after the tables may show the event: the metrics
    // are awaited (30 s at most), not read once.
    let metrics_reach = |reached: &dyn Fn(&str) -> bool, what: &str| {
        let started = Instant::now();
        loop {
            let served = metrics();
            if reached(&served) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{what}: {served}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    metrics_reach(
        &|served| {
            served.contains("keel_decklog_events_total{outcome=\"delivered\"} 3")
                && served.contains("keel_helmsman_triggers_total{state=\"forwarded\"} 3")
                && served.contains("keel_helmsman_pending 0")
        },
        "the three triggers are not all delivered and forwarded",
    );
    // The load generator through both doors, as the tenant.
    for args in [
        vec![
            "--decklog",
            decklog.as_str(),
            "--token",
            token.as_str(),
            "--events",
            "200",
            "--batch",
            "50",
        ],
        vec![
            "--webhook",
            webhook.as_str(),
            "--events",
            "20",
            "--connections",
            "1",
        ],
    ] {
        let mut all = vec!["loadgen", "--tenant", tenant.as_str()];
        all.extend(args);
        let out = keel(&all);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let report = text(&out.stdout);
        assert!(
            report.contains("events acknowledged") && report.contains(" 0 refused"),
            "{report}"
        );
    }
    let out = keel(&[
        "loadgen",
        "--decklog",
        &decklog,
        "--token",
        "kt_not-a-real-token-at-all",
        "--events",
        "10",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("invalid token"),
        "{}",
        text(&out.stderr)
    );
    // The webhook answers once a trigger is in the log; forwarding to Decklog follows on its
    // own, so wait for the log to empty before stopping (what stays is for the next start).
    metrics_reach(
        &|served| served.lines().any(|line| line == "keel_helmsman_pending 0"),
        "the trigger log still holds triggers",
    );
    send_signal(&child, "-INT");
    assert!(child.wait().unwrap().success());
    let left: Vec<_> = std::fs::read_dir(wal.path()).unwrap().collect();
    assert!(
        left.is_empty(),
        "every trigger was forwarded, none set aside: {left:?}"
    );
}

/// `keel run`'s start-up lines up to the admin token: each `keel: <what> on <rest>` by what, and
/// the printed development tenant, its token and the admin token.
struct Banner {
    served: std::collections::HashMap<String, String>,
    tenant: String,
    token: String,
    admin: String,
}

impl Banner {
    fn read(lines: &mut impl Iterator<Item = std::io::Result<String>>) -> Banner {
        let mut served = std::collections::HashMap::new();
        let (mut tenant, mut token) = (None, None);
        loop {
            let line = lines.next().expect("keel run printed its banner").unwrap();
            let trimmed = line.trim();
            if let Some((what, rest)) = line
                .strip_prefix("keel: ")
                .and_then(|l| l.split_once(" on "))
            {
                served.insert(what.to_owned(), rest.to_owned());
            } else if let Some(rest) = trimmed.strip_prefix("tenant ") {
                let (id, jwt) = rest.split_once(": ").unwrap();
                tenant = Some(id.to_owned());
                token = Some(jwt.to_owned());
            } else if let Some(admin) = trimmed.strip_prefix("admin: ") {
                return Banner {
                    served,
                    tenant: tenant.expect("the tenant token comes first"),
                    token: token.expect("the tenant token comes first"),
                    admin: admin.to_owned(),
                };
            }
        }
    }

    /// What follows `keel: <what> on `.
    fn line(&self, what: &str) -> &str {
        self.served
            .get(what)
            .unwrap_or_else(|| panic!("keel run did not print where {what} is: {:?}", self.served))
    }

    /// The address `keel: <what> on ` names first.
    fn address(&self, what: &str) -> String {
        let first = self
            .line(what)
            .split_whitespace()
            .next()
            .unwrap_or_default();
        first.trim_end_matches(',').to_owned()
    }
}
