//! PgBouncer on loopback in front of a test cluster: the fleet's catalog
//! through a transaction pooler, and the managed-PostgreSQL pre-flight.

use std::path::Path;
use std::time::{Duration, Instant};

use super::Env;
use super::pg::{chown_to_server, free_port, pg_command, server_dir};

/// PgBouncer in front of the cluster (one database, `pool_mode` as
/// given), run as the server's user; stopped when dropped.
pub struct Bouncer {
    child: std::process::Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Bouncer {
    pub fn start(env: &Env, db: &str, pool_mode: &str) -> Self {
        let dir = server_dir("backstop-pgb-");
        let port = free_port();
        let users = dir.path().join("userlist.txt");
        std::fs::write(&users, format!("\"postgres\" \"{}\"\n", env.pg.password)).unwrap();
        let ini = dir.path().join("pgbouncer.ini");
        std::fs::write(
            &ini,
            format!(
                "[databases]\n{db} = host=127.0.0.1 port={pg} dbname={db}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\nauth_type = scram-sha-256\nauth_file = {users}\npool_mode = {pool_mode}\ndefault_pool_size = 2\nmax_client_conn = 200\nignore_startup_parameters = extra_float_digits,options\npidfile = {pidfile}\n",
                pg = env.pg.port,
                users = users.display(),
                pidfile = dir.path().join("pgbouncer.pid").display()
            ),
        )
        .unwrap();
        for p in [&users, &ini] {
            chown_to_server(p);
        }
        let bin = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.exists())
            .expect("pgbouncer is installed (scripts/install-deps.sh)");
        let child = pg_command(bin)
            .arg(&ini)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(env.path(&format!("pgbouncer-{port}.log"))).unwrap())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "pgbouncer did not listen: {}",
                std::fs::read_to_string(env.path(&format!("pgbouncer-{port}.log")))
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Bouncer {
            child,
            port,
            _dir: dir,
        }
    }
}

impl Drop for Bouncer {
    /// Stops pgbouncer itself (its pidfile), not only the `runuser` that
    /// started it: killing the wrapper would leave the pooler running.
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self._dir.path().join("pgbouncer.pid")) {
            let pid = pid.trim().to_string();
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status();
            let start = Instant::now();
            while Path::new(&format!("/proc/{pid}")).exists()
                && start.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
