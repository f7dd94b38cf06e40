//! The dashboard in a real browser: headless Chromium driven over the DevTools protocol,
//! against a running engine and API on loopback.

mod live_support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use keel_api::server::Limits;
use live_support::{Live, Ws, fleet};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// A headless Chromium with one page, driven over the DevTools protocol.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    page: Ws,
    next_id: u64,
}

impl Browser {
    async fn launch() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let child = Command::new("chromium")
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start chromium ({e}); install it: `apt-get install chromium` (scripts/test-servers.sh does)"
                )
            });
        // Chromium writes the port it chose into the profile directory.
        let port_file = profile.path().join("DevToolsActivePort");
        let started = Instant::now();
        let port: u16 = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file)
                && let Some(port) = text.lines().next().and_then(|l| l.parse().ok())
            {
                break port;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "chromium did not start within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let targets: Value = tokio::task::spawn_blocking(move || {
            let mut response = ureq::get(&format!("http://127.0.0.1:{port}/json/list"))
                .call()
                .unwrap();
            serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap()
        })
        .await
        .unwrap();
        let url = targets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .expect("chromium has a page")
            .to_owned();
        let (page, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Browser {
            child,
            _profile: profile,
            page,
            next_id: 0,
        }
    }

    /// Calls a DevTools method and returns its result, skipping the events in between.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let request = json!({"id": id, "method": method, "params": params});
        self.page
            .send(Message::text(request.to_string()))
            .await
            .unwrap();
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), self.page.next())
                .await
                .expect("chromium answers within 30 s")
                .expect("chromium keeps the connection")
                .unwrap();
            let Message::Text(text) = message else {
                continue;
            };
            let answer: Value = serde_json::from_str(&text).unwrap();
            if answer["id"] == id {
                assert!(answer["error"].is_null(), "{method}: {answer}");
                return answer["result"].clone();
            }
        }
    }

    /// Evaluates `expression` in the page and returns its value.
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        assert!(
            result["exceptionDetails"].is_null(),
            "{expression}: {result}"
        );
        result["result"]["value"].clone()
    }

    /// Waits until `expression` is true in the page; returns what `describe` shows then, or
    /// fails with it.
    async fn wait_for(&mut self, expression: &str, describe: &str, limit: Duration) -> Value {
        let started = Instant::now();
        loop {
            if self.eval(expression).await == Value::Bool(true) {
                return self.eval(describe).await;
            }
            if started.elapsed() > limit {
                let shown = self.eval(describe).await;
                panic!("waited {limit:?} for {expression}; the page shows {shown}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn text_of(id: &str) -> String {
    format!("document.getElementById('{id}').textContent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_signs_in_draws_live_numbers_and_runs_sql_in_a_real_browser() {
    let fleet = fleet(21, 4000);
    let a = fleet.tenants[0].clone();
    let mut live = Live::start(
        Limits {
            queue: 1 << 16,
            ..Limits::default()
        },
        &fleet.tenants[1],
    );
    let url = format!("http://{}/", live.host());
    let mut browser = Browser::launch().await;
    browser.call("Page.enable", json!({})).await;
    browser.call("Page.navigate", json!({"url": url})).await;
    browser
        .wait_for(
            "document.readyState === 'complete' && !!document.getElementById('signin')",
            "document.title",
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(
        browser.eval("document.title").await,
        "Keel — live dashboard"
    );

    // A forged token is refused with a message, and the board stays hidden.
    browser
        .eval("document.getElementById('token').value = 'forged'; document.getElementById('signin').click(); true")
        .await;
    let shown = browser
        .wait_for(
            "document.getElementById('signin-error').textContent.includes('refused')",
            &text_of("signin-error"),
            Duration::from_secs(20),
        )
        .await;
    assert!(shown.as_str().unwrap().contains("refused"));
    assert_eq!(
        browser
            .eval("document.getElementById('board').hidden")
            .await,
        true
    );

    // The tenant's token opens the board.
    let token = live.member(&a);
    browser
        .eval(&format!(
            "document.getElementById('token').value = '{token}'; document.getElementById('signin').click(); true"
        ))
        .await;
    browser
        .wait_for(
            "!document.getElementById('board').hidden",
            &text_of("status"),
            Duration::from_secs(20),
        )
        .await;

    let before = browser
        .eval("document.getElementById('chart-viewers').toDataURL()")
        .await;
    live.feed(&fleet.records).await;
    live.finish().await;

    // The numbers converge on the tables' own, from pushed changes alone.
    let (viewers, live_streams, nodes) = {
        let streams = live.rows("streams", &a);
        let viewers: i64 = streams
            .iter()
            .map(|s| s["current_viewers"].as_i64().unwrap())
            .sum();
        let live_streams = streams.iter().filter(|s| s["status"] == "live").count();
        let nodes = live.rows("nodes", &a).len();
        (viewers, live_streams, nodes)
    };
    assert!(nodes > 0);
    let expect = format!(
        "{} === '{viewers}' && {} === '{live_streams}' && {} === '{nodes}'",
        text_of("viewers-now"),
        text_of("streams-live"),
        text_of("node-count")
    );
    let describe = format!(
        "[{}, {}, {}, {}].join(' / ')",
        text_of("viewers-now"),
        text_of("streams-live"),
        text_of("node-count"),
        text_of("status")
    );
    browser
        .wait_for(&expect, &describe, Duration::from_secs(30))
        .await;

    // The charts moved as the events flowed: the viewer chart changed, the rate was above zero.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let after = browser
        .eval("document.getElementById('chart-viewers').toDataURL()")
        .await;
    assert_ne!(before, after, "the viewer chart moved");
    let peak_rate = browser.eval("Math.max(...state.rate)").await;
    assert!(
        peak_rate.as_f64().unwrap() > 0.0,
        "events/s rose: {peak_rate}"
    );

    // Every chart has drawn something.
    let drawn = browser
        .eval(
            "['chart-viewers', 'chart-rate', 'chart-nodes', 'chart-countries'].map((id) => {
                const c = document.getElementById(id);
                const pixels = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let painted = 0;
                for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) painted++;
                return painted;
            })",
        )
        .await;
    for (i, painted) in drawn.as_array().unwrap().iter().enumerate() {
        assert!(
            painted.as_u64().unwrap() > 200,
            "chart {i} is blank: {drawn}"
        );
    }
    // Routing scores: a row per node of the tenant that routing knows, from GraphQL `nodes`.
    let known = live
        .handles
        .fleet
        .snapshot()
        .nodes()
        .iter()
        .filter(|n| n.tenant.to_string() == a)
        .count();
    assert!(known > 0, "routing knows the tenant's nodes");
    let shown = browser
        .wait_for(
            &format!(
                "!!document.querySelector('#scores table') && document.querySelector('#scores table').dataset.rows === '{known}'"
            ),
            "document.getElementById('scores').innerText",
            Duration::from_secs(20),
        )
        .await;
    assert!(shown.as_str().unwrap().contains("routable"), "{shown}");
    let page_text = browser.eval("document.body.innerText").await;
    for host in &fleet.hosts {
        assert!(
            !page_text.as_str().unwrap().contains(host.as_str()),
            "{host} shown"
        );
    }

    // The SQL console answers within the tenant, and shows errors.
    browser
        .eval("document.getElementById('sql').value = 'SELECT internal_name FROM streams'; document.getElementById('run-sql').click(); true")
        .await;
    let rows = browser
        .wait_for(
            "!!document.querySelector('#sql-result table')",
            "document.querySelector('#sql-result table').dataset.rows",
            Duration::from_secs(20),
        )
        .await;
    let expected_rows = live.rows("streams", &a).len();
    assert_eq!(rows, expected_rows.to_string());
    browser
        .eval("document.getElementById('sql').value = 'DROP TABLE streams'; document.getElementById('run-sql').click(); true")
        .await;
    let error = browser
        .wait_for(
            &format!("{} !== ''", text_of("sql-error")),
            &text_of("sql-error"),
            Duration::from_secs(20),
        )
        .await;
    assert!(error.as_str().unwrap().contains("only queries"), "{error}");
}
