//! A real S3-compatible server for tests: `s3s-fs` on a free loopback port
//! with a fresh root directory, which a test can kill and restart.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};

pub const ACCESS_KEY: &str = "backstop-test-key";
pub const SECRET_KEY: &str = "backstop-test-secret-0123456789";
pub const BUCKET: &str = "backups";

fn binary() -> PathBuf {
    if let Ok(p) = std::env::var("S3S_FS") {
        return PathBuf::from(p);
    }
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo"));
    let p = home.join("bin/s3s-fs");
    if p.exists() {
        p
    } else {
        PathBuf::from("s3s-fs")
    }
}

pub struct S3Server {
    root: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

impl S3Server {
    /// Starts a server with an empty bucket `backups`.
    pub fn start() -> Self {
        let root = tempfile::Builder::new()
            .prefix("backstop-s3-")
            .tempdir()
            .unwrap();
        std::fs::create_dir(root.path().join(BUCKET)).unwrap();
        let mut s = S3Server {
            root,
            port: super::pg::free_port(),
            child: None,
        };
        s.spawn(true);
        s
    }

    /// Starts s3s-fs and waits until the listening socket on its port is
    /// its own (not another test's server that took the port first). If it
    /// exits (most likely: the port was taken), it is started again (on
    /// another port if `may_move`), with its stderr in the panic if that keeps failing.
    fn spawn(&mut self, may_move: bool) {
        let log = self.root.path().with_extension("log");
        for attempt in 0..5 {
            let mut child = Command::new(binary())
                .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
                .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
                .arg(self.root.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("s3s-fs is installed (cargo install s3s-fs --version 0.14.1 --features binary --locked)");
            for _ in 0..400 {
                if let Ok(Some(status)) = child.try_wait() {
                    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
                    if attempt == 4 {
                        panic!("s3s-fs exited ({status}) on port {}: {stderr}", self.port);
                    }
                    break;
                }
                if super::listens_on(child.id(), self.port) {
                    self.child = Some(child);
                    return;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            let _ = child.kill();
            let _ = child.wait();
            if may_move {
                self.port = super::pg::free_port();
            } else {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        panic!(
            "s3s-fs did not start listening; stderr: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// SIGKILLs the server.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and data.
    pub fn restart(&mut self) {
        self.kill();
        // The config names this port: never move to another.
        self.spawn(false);
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Where s3s-fs keeps object `key` of the test bucket.
    pub fn object_path(&self, key: &str) -> PathBuf {
        self.root.path().join(BUCKET).join(key)
    }

    /// Multipart uploads started and never completed or aborted (s3s-fs keeps
    /// one `.upload-<id>.json` per upload in its root).
    pub fn pending_uploads(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.root.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let n = p.file_name().unwrap().to_string_lossy();
                n.starts_with(".upload-") && n.ends_with(".json")
            })
            .collect()
    }

    /// Parts stored for multipart uploads in progress (`.upload_id-<id>.part-N`).
    pub fn uploaded_parts(&self) -> usize {
        std::fs::read_dir(self.root.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".upload_id-"))
            .count()
    }

    /// A plain S3 client outside backstop.
    pub fn client(&self) -> Client {
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(self.endpoint())
            .force_path_style(true)
            .credentials_provider(Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "test"))
            .build();
        Client::from_conf(conf)
    }

    /// Keys in the test bucket under `prefix`.
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        let out = self
            .client()
            .list_objects_v2()
            .bucket(BUCKET)
            .prefix(prefix)
            .send()
            .await
            .unwrap();
        let mut keys: Vec<String> = out
            .contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_string))
            .collect();
        keys.sort();
        keys
    }

    /// Downloads an object with the plain client.
    pub async fn download(&self, key: &str, to: &Path) {
        let out = self
            .client()
            .get_object()
            .bucket(BUCKET)
            .key(key)
            .send()
            .await
            .unwrap();
        let bytes = out.body.collect().await.unwrap().into_bytes();
        std::fs::write(to, &bytes).unwrap();
    }

    /// A `[storage.NAME]` table for this server.
    pub fn storage_toml(&self, name: &str, extra: &str) -> String {
        format!(
            "[storage.{name}]\ntype = \"s3\"\nbucket = \"{BUCKET}\"\nprefix = \"prod/\"\nregion = \"us-east-1\"\nendpoint = \"{}\"\nforce_path_style = true\naccess_key_id = \"{ACCESS_KEY}\"\nsecret_access_key_file = \"{{SECRET_FILE}}\"\n{extra}\n\n",
            self.endpoint()
        )
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}
