//! Pipeline tests: events in, every table out.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{Tables, counts, replay_file, replay_with, simulate_file, write_values};
use keel::engine::EngineOptions;
use keel_sources::file::FileSource;
use keel_sources::simulate::{SimConfig, Wire};

fn render(tables: &Tables) -> String {
    let mut out = String::new();
    for (name, rows) in tables {
        out.push_str(&format!("## {name} ({} rows)\n", rows.len()));
        for row in rows {
            out.push_str(row);
            out.push('\n');
        }
        out.push('\n');
    }
    out
}

/// A fixed, hand-written event file (both wire versions, duplicates, out-of-order and
/// disconnect-only sessions, malformed records, a dump envelope, a tombstone, an unknown type)
/// gives exactly the checked-in tables. Run with `KEEL_BLESS=1` to rewrite the expectation after
/// a deliberate change, and review the diff by hand.
#[test]
fn golden_tables() {
    // A relative path (tests run in the package root), so error positions do not depend on
    // where the repository is checked out.
    let dir = Path::new("tests/golden");
    let actual = render(&replay_file(&dir.join("events.ndjson"), 1, 4));
    let expected_path = dir.join("tables.txt");
    if std::env::var_os("KEEL_BLESS").is_some() {
        std::fs::write(&expected_path, &actual).unwrap();
    }
    let expected = std::fs::read_to_string(&expected_path).unwrap();
    if actual != expected {
        let diff: Vec<String> = actual
            .lines()
            .zip(expected.lines())
            .enumerate()
            .filter(|(_, (a, e))| a != e)
            .take(5)
            .map(|(i, (a, e))| format!("line {}:\n  got      {a}\n  expected {e}", i + 1))
            .collect();
        panic!(
            "tables differ from tests/golden/tables.txt ({} vs {} lines):\n{}",
            actual.lines().count(),
            expected.lines().count(),
            diff.join("\n")
        );
    }
}

/// The same events in another order, split over other workers and epochs, give the same tables.
#[test]
fn order_and_workers_do_not_change_the_tables() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.ndjson");
    let values = simulate_file(
        &path,
        SimConfig {
            seed: 21,
            ..SimConfig::default()
        },
        30_000,
    );
    let reference = replay_file(&path, 1, 8192);
    assert!(
        reference["viewer_sessions"].len() > 5_000,
        "{:?}",
        counts(&reference)
    );

    // Reversed, then interleaved: far from the order the fleet produced.
    let mut shuffled = values;
    shuffled.reverse();
    let (a, b) = shuffled.split_at(shuffled.len() / 2);
    let interleaved: Vec<Vec<u8>> = a
        .iter()
        .zip(b)
        .flat_map(|(x, y)| [y.clone(), x.clone()])
        .chain(b.iter().skip(a.len()).cloned())
        .collect();
    let other = dir.path().join("shuffled.ndjson");
    write_values(&other, &interleaved);
    for (workers, batch) in [(1, 97), (3, 1000), (4, 64)] {
        let tables = replay_file(&other, workers, batch);
        assert!(tables["ingest_errors"].is_empty());
        for (name, rows) in &reference {
            assert_eq!(
                &tables[name], rows,
                "table {name} with {workers} workers, batch {batch}"
            );
        }
    }
}

/// With routing off (as `keel sql` and backfills run) the tables are the same, and Foghorn's
/// fleet stays empty: the switch does remove routing's work, and only that.
#[test]
fn routing_off_changes_no_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.ndjson");
    simulate_file(
        &path,
        SimConfig {
            seed: 5,
            ..SimConfig::default()
        },
        12_000,
    );
    let run = |routing| {
        let options = EngineOptions {
            workers: 2,
            batch: 700,
            routing,
            ..EngineOptions::default()
        };
        replay_with(Arc::new(FileSource::open(&path).unwrap()), &options)
    };
    let (with, routed) = run(true);
    let (without, unrouted) = run(false);
    assert!(with["viewer_sessions"].len() > 1_000 && !with["nodes"].is_empty());
    assert_eq!(counts(&with), counts(&without));
    for (name, rows) in &with {
        assert_eq!(&without[name], rows, "table {name}");
    }
    assert!(
        !routed.fleet.snapshot().nodes().is_empty(),
        "with routing on, Foghorn knows the nodes"
    );
    assert!(
        routed.fleet.snapshot().watermark() > i64::MIN,
        "with routing on, Foghorn publishes its watermark"
    );
    // Built, even if fed no node load, Foghorn's dataflow would publish the event-time
    // watermark at the end of the input: off, it is not built at all.
    let fleet = unrouted.fleet.snapshot();
    assert!(
        fleet.nodes().is_empty() && fleet.watermark() == i64::MIN,
        "with routing off, Foghorn's dataflow is not built"
    );
}

/// The same fleet written as version 1 and as version 2 gives the same tables.
#[test]
fn version_1_and_version_2_give_the_same_tables() {
    let dir = tempfile::tempdir().unwrap();
    let mut tables = Vec::new();
    for wire in [Wire::V1, Wire::V2] {
        let path = dir.path().join(format!("{wire:?}.ndjson"));
        simulate_file(
            &path,
            SimConfig {
                seed: 8,
                wire,
                ..SimConfig::default()
            },
            12_000,
        );
        tables.push(replay_file(&path, 2, 500));
    }
    assert!(tables[0]["streams"].len() > 10 && !tables[0]["routing_hourly"].is_empty());
    assert_eq!(counts(&tables[0]), counts(&tables[1]));
    for (name, rows) in &tables[0] {
        assert_eq!(&tables[1][name], rows, "table {name}");
    }
}

/// Malformed records land in `ingest_errors`, and every other table is exactly what the good
/// records alone give.
#[test]
fn malformed_records_leave_the_good_tables_alone() {
    let dir = tempfile::tempdir().unwrap();
    let clean_path = dir.path().join("clean.ndjson");
    let dirty_path = dir.path().join("dirty.ndjson");
    let clean = simulate_file(
        &clean_path,
        SimConfig {
            seed: 4,
            ..SimConfig::default()
        },
        10_000,
    );
    // The dirty stream holds the same good records plus about 5 % extra bad ones: take it until
    // it has produced all of the clean records.
    let dirty_values = {
        let mut sim = keel_sources::simulate::Simulator::new(SimConfig {
            seed: 4,
            malformed: 0.05,
            ..SimConfig::default()
        });
        let mut values = Vec::new();
        let mut good = 0;
        while good < clean.len() {
            let mut v = Vec::new();
            sim.next_record(&mut v);
            if clean.get(good) == Some(&v) {
                good += 1;
            }
            values.push(v);
        }
        values
    };
    write_values(&dirty_path, &dirty_values);
    let bad = dirty_values.len() - clean.len();
    assert!(bad > 300, "about 5 % extra: {bad}");
    let clean_tables = replay_file(&clean_path, 2, 1000);
    let dirty_tables = replay_file(&dirty_path, 2, 1000);
    assert_eq!(clean_tables["ingest_errors"].len(), 0);
    assert_eq!(
        dirty_tables["ingest_errors"].len(),
        bad,
        "every bad record is an error row"
    );
    for (name, rows) in &clean_tables {
        if name != "ingest_errors" {
            assert_eq!(&dirty_tables[name], rows, "table {name}");
        }
    }
}
