//! A `backstop run` daemon as a real process, and polling helpers for tests
//! that drive it through signals and HTTP.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::pg::free_port;
use super::{Env, backstop_bin, write_private};

/// A running daemon; killed when dropped.
pub struct Daemon {
    pub child: tokio::process::Child,
    pub port: u16,
    pub log: PathBuf,
    /// This test's API token (each test writes its own, so a request that
    /// reaches another test's daemon is refused).
    pub token: String,
}

impl Daemon {
    pub fn start(config: &Path, log: PathBuf) -> Self {
        Self::start_with(config, log, &[])
    }

    pub fn start_with(config: &Path, log: PathBuf, envs: &[(&str, String)]) -> Self {
        let mut cmd = tokio::process::Command::new(backstop_bin());
        cmd.args(["run"]);
        Self::spawn(cmd, config, log, envs)
    }

    /// Starts `cmd` (which runs `backstop run`, perhaps under a wrapper such
    /// as `unshare`) with the test environment.
    pub fn spawn(
        mut cmd: tokio::process::Command,
        config: &Path,
        log: PathBuf,
        envs: &[(&str, String)],
    ) -> Self {
        let port = port_of(config);
        let token = token_of(config);
        let child = cmd
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .env("BACKSTOP_CONFIG", config)
            .env("BACKSTOP_LOG", "info")
            .env("NO_COLOR", "1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Daemon {
            child,
            port,
            log,
            token,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn http(&self, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
        http(self.port, method, path, token).await
    }

    /// Waits until /healthz answers from this daemon: the listening socket
    /// must belong to its pid, so a test never talks to another test's
    /// daemon on a port both picked. Fails at once if the daemon exited.
    pub async fn ready(&mut self) {
        let log = self.log.clone();
        let pid = self.child.id().expect("the daemon is running");
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the daemon exited ({status}) before listening on port {}; log:\n{}",
                    self.port,
                    self.log()
                );
            }
            if super::listens_on(pid, self.port)
                && http(self.port, "GET", "/healthz", None).await.0 == 200
            {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the daemon (pid {pid}) is not listening on port {} after 30 s; log:\n{}",
                self.port,
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The value of one sample of /metrics, e.g. `backstop_job_runs_total{job="app",kind="backup",outcome="success"}`.
    pub async fn metric(&self, sample: &str) -> Option<f64> {
        let (_, body) = self.http("GET", "/metrics", None).await;
        body.lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().unwrap().to_string();
        assert!(
            std::process::Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// SIGTERM, then asserts a clean exit (0) within the drain's minute.
    pub async fn stop(&mut self) {
        self.signal("-TERM");
        assert_eq!(
            self.exit_code(Duration::from_secs(60)).await,
            Some(0),
            "{}",
            self.log()
        );
    }

    pub async fn exit_code(&mut self, within: Duration) -> Option<i32> {
        tokio::time::timeout(within, self.child.wait())
            .await
            .expect("the daemon did not exit in time")
            .unwrap()
            .code()
    }
}

pub fn port_of(config: &Path) -> u16 {
    let text = std::fs::read_to_string(config).unwrap();
    let line = text.lines().find(|l| l.starts_with("listen")).unwrap();
    line.rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('"')
        .parse()
        .unwrap()
}

/// The API token in the config's `api_token_file` (empty without one).
fn token_of(config: &Path) -> String {
    let text = std::fs::read_to_string(config).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("api_token_file = "))
        .map(|f| {
            std::fs::read_to_string(f.trim().trim_matches('"'))
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

pub async fn http(port: u16, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| ("Authorization", a))
        .into_iter()
        .collect();
    let (status, _, body) = http_full(port, method, path, &headers).await;
    (status, body)
}

/// A request with `headers`; the status, the response's head (lowercased
/// header names) and its body.
pub async fn http_full(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return (0, String::new(), String::new());
    };
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return (0, String::new(), String::new());
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_lowercase(), body.to_string())
}

/// Polls `cond` every 100 ms until it holds, failing after `limit`.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut cond: F, log: &Path)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}; daemon log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Config with the daemon section (a free port, the API token) and `jobs`.
pub fn daemon_config(env: &Env, daemon_extra: &str, jobs: &str) -> PathBuf {
    let token = env.path("api-token");
    write_private(
        &token,
        &format!("test-token-{:016x}\n", super::pg::rand_u64()),
    );
    let header = env.header().replacen(
        "[daemon]\n",
        &format!(
            "[daemon]\nlisten = \"127.0.0.1:{}\"\napi_token_file = \"{}\"\n{daemon_extra}\n",
            free_port(),
            token.display()
        ),
        1,
    );
    let p = env.path("backstop.toml");
    std::fs::write(&p, format!("{header}{jobs}")).unwrap();
    p
}

impl Daemon {
    /// Starts a backup of `job` through the API and waits until the run
    /// ends; returns its final state (`GET /api/v1/runs/{id}`).
    pub async fn run_to_end(&self, job: &str) -> serde_json::Value {
        let id = self.start_run(job).await;
        self.wait_run(job, id).await
    }

    /// As [`Self::run_to_end`], but asked again while the daemon answers
    /// 409: a fleet node's own scheduled run of the job is "going" while it
    /// tries to claim a tick another node won, and ends without a trace (it
    /// leaves the run map) once the claim is refused.
    pub async fn run_to_end_when_free(&self, job: &str) -> serde_json::Value {
        let start = Instant::now();
        loop {
            match self.ask_run(job).await {
                Ok(id) => return self.wait_run(job, id).await,
                Err((409, body)) => assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "{job} stayed busy for 30 s: {body}\n{}",
                    self.log()
                ),
                Err((code, body)) => panic!("{code}: {body}\n{}", self.log()),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Asks for a backup of `job` through the API; returns the run id.
    pub async fn start_run(&self, job: &str) -> u64 {
        match self.ask_run(job).await {
            Ok(id) => id,
            Err((code, body)) => panic!("{code}, not 202: {body}\n{}", self.log()),
        }
    }

    /// `POST /api/v1/jobs/{job}/run`: the run id of a 202, or the status
    /// and body of any other answer.
    async fn ask_run(&self, job: &str) -> Result<u64, (u16, String)> {
        let (code, body) = self
            .http(
                "POST",
                &format!("/api/v1/jobs/{job}/run"),
                Some(&self.token),
            )
            .await;
        if code != 202 {
            return Err((code, body));
        }
        Ok(
            serde_json::from_str::<serde_json::Value>(body.trim()).unwrap()["run_id"]
                .as_u64()
                .unwrap(),
        )
    }

    /// Waits until run `id` ends; returns its final state.
    pub async fn wait_run(&self, job: &str, id: u64) -> serde_json::Value {
        let path = format!("/api/v1/runs/{id}");
        let mut state = serde_json::Value::Null;
        let start = Instant::now();
        loop {
            let (_, body) = self.http("GET", &path, Some(&self.token)).await;
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(body.trim()) {
                state = v;
            }
            if !matches!(state["state"].as_str(), Some("queued" | "running") | None) {
                return state;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "run {id} of {job} did not end: {state}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
