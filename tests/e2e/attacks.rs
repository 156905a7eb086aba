//! The attack suite: what someone who can write to the store (and has
//! nothing else: no signing key, no age identity) tries, each attack its own
//! test, against the real binary, PostgreSQL and stock tools.
//!
//! Most attacks run twice: against a config without `trusted_keys` (the
//! checks that hold without signatures, and the psql guard) and against a
//! signed one. `BACKSTOP_E2E_BIN=<older backstop>` runs them against
//! another build: the build before issue 27 fails them.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Duration, Utc};
use serde_json::{Value, json};

use crate::harness::{Env, Run, manifest, run_backstop_with, sh};

/// A victim's world: the marketplace database, a job config, and (when
/// `signed`) this host's signing key.
struct Victim {
    env: Env,
    key: Option<PathBuf>,
}

impl Victim {
    async fn new(signed: bool) -> Self {
        let env = Env::new().await;
        let key = signed.then(|| keygen(&env, "signing.key"));
        Victim { env, key }
    }

    /// The config's header with this host's key (and `trusted` more).
    fn header(&self, trusted: &[String]) -> String {
        let mut daemon = String::new();
        if let Some(k) = &self.key {
            daemon.push_str(&format!("signing_key_file = \"{}\"\n", k.display()));
        }
        if !trusted.is_empty() {
            let list: Vec<String> = trusted.iter().map(|k| format!("\"{k}\"")).collect();
            daemon.push_str(&format!("trusted_keys = [{}]\n", list.join(", ")));
        }
        self.env
            .header()
            .replacen("[daemon]\n", &format!("[daemon]\n{daemon}"), 1)
    }

    fn write(&self, jobs: &str) {
        self.write_trusting(&[], jobs);
    }

    fn write_trusting(&self, trusted: &[String], jobs: &str) {
        std::fs::write(
            self.env.path("backstop.toml"),
            format!("{}{jobs}", self.header(trusted)),
        )
        .unwrap();
    }

    async fn backstop(&self, args: &[&str]) -> Run {
        self.env.backstop(args).await
    }

    /// Runs a backup of `job`: its folder's name.
    async fn backup(&self, job: &str) -> String {
        let before = folders(&self.env, job);
        self.backstop(&["backup", "--job", job]).await.assert_ok();
        let mut new: Vec<String> = folders(&self.env, job)
            .into_iter()
            .filter(|f| !before.contains(f))
            .collect();
        assert_eq!(new.len(), 1, "one new backup folder: {new:?}");
        new.pop().unwrap()
    }

    async fn restore(&self, job: &str, db: &str, extra: &[&str]) -> Run {
        let url = self.env.pg.url(db);
        let pw = self.env.password_file.display().to_string();
        let id = self.env.identity.display().to_string();
        let mut args = vec![
            "restore",
            "--job",
            job,
            "--target",
            &url,
            "--target-password-file",
            &pw,
            "--identity",
            &id,
            "--create-db",
        ];
        args.extend_from_slice(extra);
        self.backstop(&args).await
    }

    async fn list_json(&self, job: &str) -> Vec<Value> {
        let r = self.backstop(&["list", "--job", job, "--json"]).await;
        r.assert_ok();
        serde_json::from_str(&r.stdout).unwrap()
    }

    /// The file a psql `\!` of the attacker's would create.
    fn marker(&self) -> PathBuf {
        self.env.path("pwned")
    }
}

/// `backstop keygen --out NAME` in the test's directory: the public key.
fn keygen(env: &Env, name: &str) -> PathBuf {
    let out = env.path(name);
    let r = std::process::Command::new(crate::harness::backstop_bin())
        .args(["keygen", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(r.status.success(), "keygen: {r:?}");
    out
}

fn public_key(secret: &Path) -> String {
    let p = format!("{}.pub", secret.display());
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .to_string()
}

/// The backup folders of `job` in the local store.
fn folders(env: &Env, job: &str) -> Vec<String> {
    std::fs::read_dir(env.store().join(job))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn id_at(t: DateTime<Utc>, n: u16) -> String {
    format!("{}-{n:04x}", t.format("%Y-%m-%dT%H-%M-%SZ"))
}

fn sha256_of(path: &Path) -> String {
    let r = sh(&format!("sha256sum '{}'", path.display()));
    r.assert_ok();
    r.stdout.split_whitespace().next().unwrap().to_string()
}

/// An artifact the attacker made: its plaintext, zstd-compressed unless
/// `raw`, age-encrypted to `recipient` when given (the recipient is in
/// every manifest), written into the store at `<series>/<id>/<file>`.
fn plant_artifact(
    env: &Env,
    series: &str,
    id: &str,
    kind: &str,
    plain: &[u8],
    recipient: Option<&str>,
    raw: bool,
) -> Value {
    let dir = env.store().join(series).join(id);
    std::fs::create_dir_all(&dir).unwrap();
    let mut file = format!("{kind}.sql");
    let src = env.path(&format!("plain-{kind}-{id}"));
    std::fs::write(&src, plain).unwrap();
    let mut pipeline = format!("cat '{}'", src.display());
    if !raw {
        file.push_str(".zst");
        pipeline.push_str(" | zstd -q -c");
    }
    if let Some(r) = recipient {
        file.push_str(".age");
        pipeline.push_str(&format!(" | age -r {r}"));
    }
    let out = dir.join(&file);
    sh(&format!("{pipeline} > '{}'", out.display())).assert_ok();
    let stored = std::fs::read(&out).unwrap();
    json!({
        "kind": kind,
        "file": file,
        "key": format!("{series}/{id}/{file}"),
        "format": "plain",
        "plain_bytes": plain.len(),
        "plain_sha256": sha256_of(&src),
        "stored_bytes": stored.len(),
        "stored_sha256": sha256_of(&out),
        "compression": if raw { "none" } else { "zstd:3" },
        "encryption": match recipient {
            Some(r) => json!({"type": "age", "recipients": [r]}),
            None => json!({"type": "none"}),
        },
    })
}

/// A manifest for backup `id` of `series` started at `at`, made from a
/// genuine one (`template`) with `artifacts`, written into the store
/// unsigned.
fn plant_manifest(
    env: &Env,
    template: &Value,
    series: &str,
    id: &str,
    at: DateTime<Utc>,
    artifacts: Vec<Value>,
) -> Value {
    let mut m = template.clone();
    m["backup_id"] = json!(id);
    m["started_at"] = json!(at);
    m["finished_at"] = json!(at + Duration::seconds(2));
    m["dump"]["format"] = json!("plain");
    m["artifacts"] = json!(artifacts);
    let dir = env.store().join(series).join(id);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec_pretty(&m).unwrap(),
    )
    .unwrap();
    m
}

/// A forged backup of `app` started at `at`, one statement of plain SQL
/// encrypted to the job's own recipient, its manifest modelled on genuine
/// backup `model`, consistent with itself and unsigned: its id.
fn plant_backup(v: &Victim, model: &str, at: DateTime<Utc>, n: u16) -> String {
    let template = manifest(&v.env.store().join("app").join(model));
    let id = id_at(at, n);
    let a = plant_artifact(
        &v.env,
        "app",
        &id,
        "database",
        b"SELECT 1;\n",
        Some(&v.env.recipient),
        false,
    );
    plant_manifest(&v.env, &template, "app", &id, at, vec![a]);
    id
}

/// A forged verification record of `app`'s backup `id`, unsigned, at
/// `at` (and naming `store` when given).
fn plant_record(v: &Victim, id: &str, ok: bool, at: DateTime<Utc>, store: Option<&str>) {
    let dir = v.env.store().join("app").join(id).join("verify");
    std::fs::create_dir_all(&dir).unwrap();
    let mut r = json!({
        "format_version": 1, "tool": {"name": "backstop", "version": "9"},
        "job": "app", "backup_id": id, "level": "restore", "ok": ok,
        "started_at": at, "finished_at": at,
        "problems": if ok { json!([]) } else { json!(["forged"]) },
    });
    if let Some(s) = store {
        r["store"] = json!(s);
    }
    std::fs::write(
        dir.join(format!(
            "{}-restore-beef.json",
            at.format("%Y%m%dT%H%M%S%.3fZ")
        )),
        serde_json::to_vec(&r).unwrap(),
    )
    .unwrap();
}

const SHELL: &str = "SELECT 1;\n\\! touch {MARKER}\n";

fn shell_sql(v: &Victim) -> Vec<u8> {
    SHELL
        .replace("{MARKER}", &v.marker().display().to_string())
        .into_bytes()
}

async fn database_exists(env: &Env, db: &str) -> bool {
    let mut c = env.pg.connect("postgres").await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(db)
        .fetch_one(&mut c)
        .await
        .unwrap();
    n == 1
}

/// A backup dated tomorrow, plain SQL whose second line is `\! touch …`,
/// unencrypted: before, it won `latest` and restore piped it into psql,
/// which ran the command before any checksum was compared.
#[tokio::test(flavor = "multi_thread")]
async fn forged_future_latest_with_a_shell_escape_runs_nothing() {
    for signed in [false, true] {
        let v = Victim::new(signed).await;
        v.write(&v.env.job("app", "marketplace", "format = \"plain\""));
        let real = v.backup("app").await;
        let template = manifest(&v.env.store().join("app").join(&real));
        let tomorrow = Utc::now() + Duration::days(1);
        let forged = id_at(tomorrow, 0xbad);
        let a = plant_artifact(
            &v.env,
            "app",
            &forged,
            "database",
            &shell_sql(&v),
            None,
            true,
        );
        plant_manifest(&v.env, &template, "app", &forged, tomorrow, vec![a]);

        let r = v.restore("app", "copy", &[]).await;
        assert!(
            !v.marker().exists(),
            "signed {signed}: psql ran the forged \\! ({r:?})"
        );
        r.assert_ok();
        // The real backup was restored (the forged one makes no tables).
        assert_eq!(
            v.env.pg.row_counts("copy").await,
            v.env.pg.row_counts("marketplace").await
        );
        // The scheduled restore check and the drill take the same road.
        let url = v.env.pg.url("postgres");
        let id = v.env.identity.display().to_string();
        let pw = v.env.password_file.display().to_string();
        v.backstop(&[
            "verify",
            "--job",
            "app",
            "--level",
            "restore",
            "--target",
            &url,
            "--target-password-file",
            &pw,
            "--identity",
            &id,
        ])
        .await
        .assert_ok();
        v.backstop(&[
            "drill",
            "--job",
            "app",
            "--target-server",
            &url,
            "--target-password-file",
            &pw,
            "--identity",
            &id,
        ])
        .await
        .assert_ok();
        assert!(!v.marker().exists(), "signed {signed}");
        // Asked for by id: refused by name, exit 1.
        let by_id = v.restore("app", "copy2", &["--backup", &forged]).await;
        assert_eq!(by_id.code, Some(1), "{by_id:?}");
        assert!(by_id.stderr.contains("not trusted"), "{}", by_id.stderr);
        assert!(!v.marker().exists());
        assert!(!database_exists(&v.env, "copy2").await);
        let list = v.backstop(&["list", "--job", "app"]).await;
        assert!(
            list.stdout
                .lines()
                .any(|l| l.starts_with(&forged) && l.contains("UNTRUSTED: ")),
            "{}",
            list.stdout
        );
    }
}

/// A plain backup whose artifact was replaced by SQL with a shell escape
/// (encrypted to the job's own recipient, the manifest's checksums
/// updated where nothing is signed): psql never sees the line.
#[tokio::test(flavor = "multi_thread")]
async fn a_shell_escape_in_an_altered_plain_backup_is_refused_at_its_line() {
    for signed in [false, true] {
        let v = Victim::new(signed).await;
        v.write(&v.env.job("app", "marketplace", "format = \"plain\""));
        let id = v.backup("app").await;
        let dir = v.env.store().join("app").join(&id);
        let mut m = manifest(&dir);
        let recipient = v.env.recipient.clone();
        let a = plant_artifact(
            &v.env,
            "app",
            &id,
            "database",
            &shell_sql(&v),
            Some(&recipient),
            false,
        );
        if !signed {
            // Unsigned: the attacker rewrites the manifest to match.
            m["artifacts"] = json!([a]);
            std::fs::write(
                dir.join("manifest.json"),
                serde_json::to_vec_pretty(&m).unwrap(),
            )
            .unwrap();
        }
        let r = v.restore("app", "copy", &[]).await;
        assert!(
            !v.marker().exists(),
            "signed {signed}: psql ran \\! ({r:?})"
        );
        assert_eq!(r.code, Some(1), "{r:?}");
        assert!(
            r.stderr.contains("line 2") && r.stderr.contains("\\!"),
            "signed {signed}: {}",
            r.stderr
        );
    }
}

/// The same in a globals artifact (roles, applied with psql before the
/// database), and forged globals that would create a superuser.
#[tokio::test(flavor = "multi_thread")]
async fn a_shell_escape_or_a_superuser_in_forged_globals_is_refused() {
    let v = Victim::new(false).await;
    v.write(&v.env.job("app", "marketplace", "globals = true"));
    let id = v.backup("app").await;
    let dir = v.env.store().join("app").join(&id);
    let mut m = manifest(&dir);
    let recipient = v.env.recipient.clone();
    let g = plant_artifact(
        &v.env,
        "app",
        &id,
        "globals",
        &shell_sql(&v),
        Some(&recipient),
        false,
    );
    let arts: Vec<Value> = m["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            if a["kind"] == "globals" {
                g.clone()
            } else {
                a.clone()
            }
        })
        .collect();
    m["artifacts"] = json!(arts);
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec_pretty(&m).unwrap(),
    )
    .unwrap();
    let r = v.restore("app", "copy", &["--globals"]).await;
    assert!(!v.marker().exists(), "psql ran \\! from globals ({r:?})");
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("line 2"), "{}", r.stderr);

    // Signed: a forged newer backup whose globals make a superuser is
    // never chosen.
    let v = Victim::new(true).await;
    v.write(&v.env.job("app", "marketplace", "globals = true"));
    let real = v.backup("app").await;
    let template = manifest(&v.env.store().join("app").join(&real));
    let later = Utc::now() + Duration::seconds(30);
    let forged = id_at(later, 0xbad);
    let evil = b"CREATE ROLE backstop_evil SUPERUSER LOGIN;\n".to_vec();
    let g = plant_artifact(
        &v.env,
        "app",
        &forged,
        "globals",
        &evil,
        Some(&v.env.recipient),
        false,
    );
    let d = plant_artifact(
        &v.env,
        "app",
        &forged,
        "database",
        b"SELECT 1;\n",
        Some(&v.env.recipient),
        false,
    );
    plant_manifest(&v.env, &template, "app", &forged, later, vec![d, g]);
    v.restore("app", "copy", &["--globals"]).await.assert_ok();
    let mut c = v.env.pg.connect("postgres").await;
    let n: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_roles WHERE rolname = 'backstop_evil'")
            .fetch_one(&mut c)
            .await
            .unwrap();
    assert_eq!(n, 0, "the forged globals were applied");
}

/// A job that encrypts: its backup swapped for an unencrypted one (the
/// manifest rewritten to say so) is refused, not restored.
#[tokio::test(flavor = "multi_thread")]
async fn an_encryption_downgrade_is_refused() {
    let v = Victim::new(false).await;
    v.write(&v.env.job("app", "marketplace", "format = \"plain\""));
    let id = v.backup("app").await;
    let dir = v.env.store().join("app").join(&id);
    let mut m = manifest(&dir);
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        if e.file_name() != "manifest.json" {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    let a = plant_artifact(
        &v.env,
        "app",
        &id,
        "database",
        b"CREATE TABLE planted (x int);\n",
        None,
        false,
    );
    m["artifacts"] = json!([a]);
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec_pretty(&m).unwrap(),
    )
    .unwrap();
    let r = v.restore("app", "copy", &["--backup", &id]).await;
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("encryption downgrade"), "{}", r.stderr);
    assert!(!database_exists(&v.env, "copy").await);
    let list = v.list_json("app").await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["trusted"], json!(false), "{list:?}");
}

/// A genuine, signed folder of one job copied under another job (or under
/// another id): the copy is not that job's backup.
#[tokio::test(flavor = "multi_thread")]
async fn a_genuine_folder_copied_to_another_job_is_not_trusted() {
    for signed in [false, true] {
        let v = Victim::new(signed).await;
        v.write(&format!(
            "{}{}",
            v.env.job("app", "marketplace", ""),
            v.env.job("other", "marketplace", "")
        ));
        let id = v.backup("app").await;
        sh(&format!(
            "mkdir -p '{o}' && cp -r '{src}' '{o}/'",
            o = v.env.store().join("other").display(),
            src = v.env.store().join("app").join(&id).display()
        ))
        .assert_ok();
        let r = v.restore("other", "copy", &["--backup", &id]).await;
        assert_eq!(r.code, Some(1), "signed {signed}: {r:?}");
        assert!(r.stderr.contains("not trusted"), "{}", r.stderr);
        let list = v.list_json("other").await;
        assert_eq!(list.len(), 1, "{list:?}");
        assert_eq!(list[0]["trusted"], json!(false));
        // The original is untouched and trusted.
        assert_eq!(v.list_json("app").await[0]["trusted"], json!(true));
    }
}

/// A manifest in a new folder claiming a real backup's id: prune used to
/// plan by the claimed id and delete the real folder.
#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_claiming_a_real_backups_id_cannot_make_prune_delete_it() {
    for signed in [false, true] {
        let v = Victim::new(signed).await;
        v.write(&v.env.job(
            "app",
            "marketplace",
            "retention = { keep_last = 2, min_keep = 1 }",
        ));
        let older = v.backup("app").await;
        let newer = v.backup("app").await;
        assert_ne!(older, newer);
        // The forged folder: a copy of the older backup, dated later,
        // still naming the older id.
        let later = Utc::now() + Duration::seconds(20);
        let forged = id_at(later, 0xbad);
        sh(&format!(
            "cp -r '{src}' '{dst}'",
            src = v.env.store().join("app").join(&older).display(),
            dst = v.env.store().join("app").join(&forged).display()
        ))
        .assert_ok();
        let mpath = v
            .env
            .store()
            .join("app")
            .join(&forged)
            .join("manifest.json");
        let mut m: Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
        m["started_at"] = json!(later);
        m["finished_at"] = json!(later + Duration::seconds(1));
        // Its artifacts are its own copies, in its own folder.
        for a in m["artifacts"].as_array_mut().unwrap() {
            let file = a["file"].as_str().unwrap().to_string();
            a["key"] = json!(format!("app/{forged}/{file}"));
        }
        std::fs::write(&mpath, serde_json::to_vec_pretty(&m).unwrap()).unwrap();

        v.backstop(&["prune", "--job", "app"]).await.assert_ok();
        for id in [&older, &newer, &forged] {
            assert!(
                v.env
                    .store()
                    .join("app")
                    .join(id)
                    .join("manifest.json")
                    .exists(),
                "signed {signed}: prune deleted {id}"
            );
        }
        v.restore("app", "copy", &["--backup", &older])
            .await
            .assert_ok();
    }
}

/// Forged backups dated in the future take every keep slot: the real ones
/// used to be pruned as the oldest.
#[tokio::test(flavor = "multi_thread")]
async fn future_dated_manifests_cannot_push_real_backups_out_of_retention() {
    let v = Victim::new(false).await;
    v.write(&v.env.job(
        "app",
        "marketplace",
        "format = \"plain\"\nretention = { keep_last = 2, min_keep = 1 }",
    ));
    let mut real = Vec::new();
    for _ in 0..3 {
        real.push(v.backup("app").await);
    }
    let forged: Vec<String> = (1..=3)
        .map(|d| {
            plant_backup(
                &v,
                &real[0],
                Utc::now() + Duration::days(d),
                0xf00 + d as u16,
            )
        })
        .collect();
    let r = v.backstop(&["prune", "--job", "app"]).await;
    r.assert_ok();
    let exists = |id: &String| {
        v.env
            .store()
            .join("app")
            .join(id)
            .join("manifest.json")
            .exists()
    };
    assert!(
        !exists(&real[0]),
        "the oldest real backup goes by keep_last = 2: {}",
        r.stdout
    );
    assert!(
        exists(&real[1]) && exists(&real[2]),
        "real backups were pruned: {}",
        r.stdout
    );
    // Prune neither deletes nor counts what it cannot trust.
    assert!(forged.iter().all(exists));
}

/// A manifest naming no artifacts passed `verify --level checksum` (and
/// `decrypt`): nothing to read, nothing wrong.
#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_without_artifacts_is_not_a_backup() {
    let v = Victim::new(false).await;
    v.write(&v.env.job("app", "marketplace", ""));
    let real = v.backup("app").await;
    let template = manifest(&v.env.store().join("app").join(&real));
    let at = Utc::now() + Duration::seconds(10);
    let empty = id_at(at, 0xe);
    plant_manifest(&v.env, &template, "app", &empty, at, vec![]);
    let r = v
        .backstop(&["verify", "--job", "app", "--backup", &empty])
        .await;
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("no database artifact"), "{}", r.stderr);
    // `latest` is the real one.
    let r = v.backstop(&["verify", "--job", "app", "--json"]).await;
    r.assert_ok();
    assert!(r.stdout.contains(&real), "{}", r.stdout);
}

/// Two backups of `app`: `bad`, whose verification really failed (one
/// byte flipped while it was verified), and `good`, verified OK. The
/// attacker plants a record saying `forged_ok` about the one `target`
/// picks, dated in the future (and, signed, dated now: only a signature
/// tells those from real ones). The verdicts `list` shows must not move,
/// and `catalog rebuild` reports the forged records instead of importing
/// them.
async fn forged_record_changes_nothing(signed: bool, forged_ok: bool) {
    let v = Victim::new(signed).await;
    v.write(&v.env.job("app", "marketplace", ""));
    let bad = v.backup("app").await;
    let good = v.backup("app").await;
    let bad_dir = v.env.store().join("app").join(&bad);
    let art = std::fs::read_dir(&bad_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "age"))
        .unwrap();
    let original = std::fs::read(&art).unwrap();
    let mut flipped = original.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0xff;
    std::fs::write(&art, &flipped).unwrap();
    v.backstop(&["verify", "--job", "app", "--backup", &bad])
        .await
        .assert_failed();
    std::fs::write(&art, &original).unwrap();
    v.backstop(&["verify", "--job", "app", "--backup", &good])
        .await
        .assert_ok();

    let target = if forged_ok { &bad } else { &good };
    plant_record(&v, target, forged_ok, Utc::now() + Duration::days(1), None);
    if signed {
        plant_record(&v, target, forged_ok, Utc::now(), None);
    }
    let list = v.list_json("app").await;
    let verdict = |id: &str| {
        list.iter()
            .find(|m| m["backup_id"] == json!(id) && m["trusted"] != json!(false))
            .unwrap()["last_verification"]["ok"]
            .clone()
    };
    assert_eq!(verdict(&bad), json!(false), "signed {signed}: {list:?}");
    assert_eq!(verdict(&good), json!(true), "signed {signed}: {list:?}");
    // Rebuilt from the store, the catalog imports no forged record.
    let r = v.backstop(&["catalog", "rebuild", "--json"]).await;
    r.assert_ok();
    assert!(
        r.stdout.contains("restore-beef"),
        "the forged records are reported: {}",
        r.stdout
    );
}

/// A forged "ok" record over a real failure (which would let the failed
/// backup count toward min_keep), unsigned and signed.
#[tokio::test(flavor = "multi_thread")]
async fn a_forged_ok_record_does_not_hide_a_failed_verification() {
    for signed in [false, true] {
        forged_record_changes_nothing(signed, true).await;
    }
}

/// A forged "failed" record over a good backup (which would make retention
/// and the alert treat it as bad), unsigned and signed.
#[tokio::test(flavor = "multi_thread")]
async fn a_forged_failed_record_does_not_condemn_a_good_backup() {
    for signed in [false, true] {
        forged_record_changes_nothing(signed, false).await;
    }
}

/// Objects under keys the store itself refuses (`.x`, an empty segment),
/// written by another client: one of them used to fail every listing of
/// the job, so nothing could be restored.
#[tokio::test(flavor = "multi_thread")]
async fn objects_under_keys_the_store_refuses_do_not_block_restore() {
    let env = Env::new().await;
    let s3 = crate::harness::s3::S3Server::start();
    env.write_config_with_s3(&s3, "", &env.job_to("app", "marketplace", &["offsite"], ""));
    env.backstop(&["backup", "--job", "app"]).await.assert_ok();
    let client = s3.client();
    let mut planted = 0;
    for key in [
        "prod/app/.x/manifest.json",
        "prod/app//manifest.json",
        "prod/app/./manifest.json",
    ] {
        let put = client
            .put_object()
            .bucket(crate::harness::s3::BUCKET)
            .key(key)
            .body(aws_sdk_s3::primitives::ByteStream::from_static(b"{}"))
            .send()
            .await;
        if put.is_ok() {
            planted += 1;
        }
    }
    assert!(planted > 0, "the S3 server took none of the odd keys");
    let pw = env.password_file.display().to_string();
    let url = env.pg.url("copy");
    let id = env.identity.display().to_string();
    let r = env
        .backstop(&[
            "restore",
            "--job",
            "app",
            "--target",
            &url,
            "--target-password-file",
            &pw,
            "--identity",
            &id,
            "--create-db",
        ])
        .await;
    r.assert_ok();
    let list = env.backstop(&["list", "--job", "app"]).await;
    list.assert_ok();
    assert!(list.stdout.contains("UNTRUSTED"), "{}", list.stdout);
}

/// A manifest larger than any backstop writes is not read.
#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_manifest_is_not_read() {
    let v = Victim::new(false).await;
    v.write(&v.env.job("app", "marketplace", ""));
    let real = v.backup("app").await;
    let id = id_at(Utc::now() + Duration::seconds(5), 0xb19);
    let dir = v.env.store().join("app").join(&id);
    std::fs::create_dir_all(&dir).unwrap();
    let f = std::fs::File::create(dir.join("manifest.json")).unwrap();
    f.set_len(65 * 1024 * 1024).unwrap();
    let list = v.list_json("app").await;
    let bad = list.iter().find(|m| m["backup_id"] == json!(id)).unwrap();
    assert!(
        bad["reason"].as_str().unwrap().contains("over the"),
        "{bad}"
    );
    v.restore("app", "copy", &[]).await.assert_ok();
    assert!(
        list.iter()
            .any(|m| m["backup_id"] == json!(real) && m["trusted"] == json!(true))
    );
}

/// One signed backup, and what is left trusted after `tamper` changes it:
/// it must be refused by name (exit 1, "not trusted"), its reason must
/// say `why`, and with nothing else in the store `latest` restores nothing.
async fn refused_after(tamper: impl FnOnce(&Victim, &Path, &str), why: &str) {
    let v = Victim::new(true).await;
    v.write(&v.env.job("app", "marketplace", ""));
    let id = v.backup("app").await;
    let store = v.env.store().join("app");
    tamper(&v, &store, &id);
    let list = v.list_json("app").await;
    let reason = list.iter().find(|m| m["backup_id"] == json!(id)).unwrap()["reason"]
        .as_str()
        .unwrap_or("TRUSTED")
        .to_string();
    assert!(reason.contains(why), "{reason}");
    let r = v.restore("app", "copy", &["--backup", &id]).await;
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("not trusted"), "{}", r.stderr);
    // Nothing trusted is left: latest finds none.
    let r = v.restore("app", "copy", &[]).await;
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(!database_exists(&v.env, "copy").await);
}

/// Stock minisign verifies what backstop signed, with the .pub file.
#[tokio::test(flavor = "multi_thread")]
async fn stock_minisign_verifies_a_backstop_signature() {
    let v = Victim::new(true).await;
    v.write(&v.env.job("app", "marketplace", ""));
    let a = v.backup("app").await;
    let key = v.key.clone().unwrap();
    sh(&format!(
        "minisign -Vm '{}' -p '{}.pub'",
        v.env
            .store()
            .join("app")
            .join(&a)
            .join("manifest.json")
            .display(),
        key.display()
    ))
    .assert_ok();
}

/// One byte of the signature changed: the backup is no longer trusted.
#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_signature_is_not_trusted() {
    refused_after(
        |_, store, id| {
            let sig = store.join(id).join("manifest.json.minisig");
            let text = std::fs::read_to_string(&sig).unwrap();
            let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
            let mut l: Vec<char> = lines[1].chars().collect();
            l[30] = if l[30] == 'A' { 'B' } else { 'A' };
            lines[1] = l.into_iter().collect();
            std::fs::write(&sig, lines.join("\n") + "\n").unwrap();
        },
        "signature",
    )
    .await;
}

/// The manifest edited after signing, its signature kept.
#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_edited_after_signing_is_not_trusted() {
    refused_after(
        |_, store, id| {
            let mpath = store.join(id).join("manifest.json");
            let mut m: Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
            m["suspect"] = json!("edited");
            std::fs::write(&mpath, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
        },
        "altered after signing",
    )
    .await;
}

/// Re-signed by the attacker's own key (stock minisign): a key not in
/// trusted_keys vouches for nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_signature_by_an_unknown_key_is_not_trusted() {
    refused_after(
        |v, store, id| {
            let theirs = keygen(&v.env, "attacker.key");
            sh(&format!(
                "rm '{m}.minisig' && minisign -S -s '{k}' -m '{m}' -x '{m}.minisig' -t 'backstop object:app/{id}/manifest.json' < /dev/null",
                m = store.join(id).join("manifest.json").display(),
                k = theirs.display()
            ))
            .assert_ok();
        },
        "not in trusted_keys",
    )
    .await;
}

/// Rotation: a new key signs new backups; the old key's stay trusted while
/// it is listed, and stop being trusted when it is taken out.
#[tokio::test(flavor = "multi_thread")]
async fn keys_rotate_and_an_old_key_counts_while_it_is_listed() {
    let v = Victim::new(true).await;
    let job = v.env.job("app", "marketplace", "");
    v.write(&job);
    let old_key = v.key.clone().unwrap();
    let old = v.backup("app").await;
    // The new key signs; the old one is still trusted.
    std::fs::rename(&old_key, v.env.path("old.key")).unwrap();
    std::fs::rename(
        format!("{}.pub", old_key.display()),
        v.env.path("old.key.pub"),
    )
    .unwrap();
    keygen(&v.env, "signing.key");
    let old_pub = public_key(&v.env.path("old.key"));
    v.write_trusting(std::slice::from_ref(&old_pub), &job);
    let new = v.backup("app").await;
    let list = v.list_json("app").await;
    assert!(list.iter().all(|m| m["trusted"] == json!(true)), "{list:?}");
    let signer =
        |id: &str| list.iter().find(|m| m["backup_id"] == json!(id)).unwrap()["signed_by"].clone();
    assert_ne!(signer(&old), signer(&new));
    v.restore("app", "copy", &["--backup", &old])
        .await
        .assert_ok();
    // The old key retired.
    v.write(&job);
    let r = v.restore("app", "copy2", &["--backup", &old]).await;
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("not in trusted_keys"), "{}", r.stderr);
    v.restore("app", "copy3", &[]).await.assert_ok();
}

/// Upgrading a store of unsigned backups: once the host has a key they
/// are not trusted until `backstop sign` re-checks and signs them; one
/// altered since it was made is not signed.
#[tokio::test(flavor = "multi_thread")]
async fn sign_upgrades_existing_backups_after_checking_them() {
    let v = Victim::new(false).await;
    let job = v.env.job("app", "marketplace", "");
    v.write(&job);
    let first = v.backup("app").await;
    let second = v.backup("app").await;
    // One byte of the second's artifact changed since it was made.
    let dir = v.env.store().join("app").join(&second);
    let art = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "age"))
        .unwrap();
    let mut bytes = std::fs::read(&art).unwrap();
    let n = bytes.len() - 10;
    bytes[n] ^= 1;
    std::fs::write(&art, bytes).unwrap();
    // The first is verified (its record is the catalog's too); a forged
    // record and a forged backup, consistent with themselves, are planted
    // before the upgrade: no catalog made them.
    v.backstop(&["verify", "--job", "app", "--backup", &first])
        .await
        .assert_ok();
    let at = Utc::now() + Duration::seconds(30);
    let planted = plant_backup(&v, &first, at, 0xbad);
    plant_record(&v, &first, true, at - Duration::days(3), Some("local"));

    let key = keygen(&v.env, "signing.key");
    let v = Victim {
        key: Some(key),
        ..v
    };
    v.write(&job);
    let list = v.list_json("app").await;
    assert!(
        list.iter().all(|m| m["trusted"] == json!(false)),
        "{list:?}"
    );
    let r = v.restore("app", "copy", &[]).await;
    assert_eq!(r.code, Some(1), "nothing is trusted before sign: {r:?}");

    let r = v
        .backstop(&["sign", "--job", "app", "--backup", "all"])
        .await;
    assert_eq!(r.code, Some(1), "{r:?}");
    let line = |id: &str| {
        r.stdout
            .lines()
            .find(|l| l.contains(id))
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        line(&first).contains("signed (key")
            && line(&first).contains("1 verification record(s) signed, 1 left unsigned"),
        "{}",
        r.stdout
    );
    assert!(
        line(&second).contains("NOT SIGNED") && line(&second).contains("sha256 differs"),
        "{}",
        r.stdout
    );
    assert!(
        line(&planted).contains("NOT SIGNED") && line(&planted).contains("no record of making"),
        "the planted backup is not vouched for: {}",
        r.stdout
    );
    let list = v.list_json("app").await;
    let trusted =
        |id: &str| list.iter().find(|m| m["backup_id"] == json!(id)).unwrap()["trusted"].clone();
    assert_eq!(trusted(&first), json!(true));
    assert_eq!(trusted(&second), json!(false));
    assert_eq!(trusted(&planted), json!(false));
    v.restore("app", "copy", &[]).await.assert_ok();
    // With --force, a person vouches for one backup by id.
    let forced = v
        .backstop(&["sign", "--job", "app", "--backup", &planted, "--force"])
        .await;
    forced.assert_ok();
    assert!(forced.stdout.contains("signed (key"), "{}", forced.stdout);
    // Again: nothing more to do for the first.
    let again = v
        .backstop(&["sign", "--job", "app", "--backup", &first])
        .await;
    again.assert_ok();
    assert!(again.stdout.contains("already signed"), "{}", again.stdout);
}

/// A key file others can read is refused at config load.
#[tokio::test(flavor = "multi_thread")]
async fn a_signing_key_others_can_read_is_refused() {
    let v = Victim::new(true).await;
    v.write(&v.env.job("app", "marketplace", ""));
    let key = v.key.clone().unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let r = v.backstop(&["check-config"]).await;
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("chmod 600"), "{}", r.stderr);
    let secret = std::fs::read_to_string(&key).unwrap();
    assert!(
        !r.all().contains(secret.lines().nth(1).unwrap()),
        "the key leaked into the error"
    );
}

/// pg_dump, pg_restore and psql run without the daemon's environment:
/// AWS keys and tokens there never reach them.
#[tokio::test(flavor = "multi_thread")]
async fn pg_tools_run_without_the_callers_secrets_in_their_environment() {
    let env = Env::new().await;
    let bin = env.path("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let real = crate::harness::pg::pg_bin();
    for tool in ["pg_dump", "pg_restore", "psql", "pg_dumpall"] {
        let w = bin.join(tool);
        std::fs::write(
            &w,
            format!(
                "#!/bin/sh\nenv >> '{log}'\nexec '{real}' \"$@\"\n",
                log = env.path("child-env").display(),
                real = real.join(tool).display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&w, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    env.write_config(&env.job(
        "app",
        "marketplace",
        &format!("globals = true\npg_bin_dir = \"{}\"", bin.display()),
    ));
    let secrets = [
        ("AWS_SECRET_ACCESS_KEY", "aws-secret-in-env-1234"),
        ("AWS_SESSION_TOKEN", "aws-token-in-env-5678"),
        ("BACKSTOP_TEST_WEBHOOK_TOKEN", "hook-token-9012"),
    ];
    run_backstop_with(
        &env.path("backstop.toml"),
        &["backup", "--job", "app"],
        &secrets,
    )
    .await
    .assert_ok();
    let pw = env.password_file.display().to_string();
    let url = env.pg.url("copy");
    let id = env.identity.display().to_string();
    run_backstop_with(
        &env.path("backstop.toml"),
        &[
            "restore",
            "--job",
            "app",
            "--target",
            &url,
            "--target-password-file",
            &pw,
            "--identity",
            &id,
            "--create-db",
            "--globals",
        ],
        &secrets,
    )
    .await
    .assert_ok();
    let seen = std::fs::read_to_string(env.path("child-env")).unwrap();
    assert!(seen.contains("PATH="), "the wrappers ran: {seen}");
    for (k, v) in secrets {
        assert!(
            !seen.contains(k) && !seen.contains(v),
            "{k} reached a child: {seen}"
        );
    }
    assert!(!seen.contains("BACKSTOP_CONFIG"), "{seen}");
}

/// The daemon exports what a store holds that nobody here wrote, so the
/// alert can page: a forged manifest and a forged verification record.
#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_counts_untrusted_objects_for_the_alert() {
    use crate::harness::daemon::{Daemon, daemon_config, wait_for};
    let v = Victim::new(true).await;
    let key = v.key.clone().unwrap();
    let job = v.env.job("app", "marketplace", "");
    v.write(&job);
    let real = v.backup("app").await;
    let at = Utc::now() - Duration::minutes(1);
    let forged = plant_backup(&v, &real, at, 0xbad);
    plant_record(&v, &real, true, at, None);
    let cfg = daemon_config(
        &v.env,
        &format!("signing_key_file = \"{}\"", key.display()),
        &job,
    );
    let mut d = Daemon::start(&cfg, v.env.path("daemon.log"));
    d.ready().await;
    let sample = r#"backstop_store_untrusted_objects{job="app",storage="local"}"#;
    wait_for(
        "the untrusted objects counted",
        std::time::Duration::from_secs(30),
        || async { d.metric(sample).await == Some(2.0) },
        &d.log,
    )
    .await;
    assert_eq!(
        d.metric(r#"backstop_backups_stored{job="app",storage="local"}"#)
            .await,
        Some(1.0)
    );
    assert!(
        d.log().contains(&forged),
        "the forged manifest is logged: {}",
        d.log()
    );
    d.stop().await;
}

/// Slowloris against the real daemon: connections that send half a
/// request fill the listener, and a scrape still gets through once the
/// header timeout has cut them off; the daemon keeps running backups.
#[tokio::test(flavor = "multi_thread")]
async fn slow_clients_cannot_starve_the_listener() {
    use crate::harness::daemon::{Daemon, daemon_config, http, wait_for};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = Env::new().await;
    let cfg = daemon_config(&env, "", &env.job("app", "marketplace", ""));
    let mut d = Daemon::start(&cfg, env.path("daemon.log"));
    d.ready().await;
    let addr = format!("127.0.0.1:{}", d.port);
    let mut slow = Vec::new();
    for _ in 0..200 {
        match tokio::net::TcpStream::connect(&addr).await {
            Ok(mut s) => {
                let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x").await;
                slow.push(s);
            }
            Err(_) => break,
        }
    }
    // The daemon closed all but its per-client share at once.
    let mut open = 0;
    for s in &mut slow {
        let mut b = [0u8; 1];
        if let Ok(Ok(0)) | Ok(Err(_)) =
            tokio::time::timeout(std::time::Duration::from_millis(50), s.read(&mut b)).await
        {
            continue;
        }
        open += 1;
    }
    assert!(open <= 32, "{open} slow connections held open");
    // Within the header timeout (10 s) the held ones are cut off and a
    // scrape is answered, while the slow clients are still connected.
    wait_for(
        "a scrape past the slow clients",
        std::time::Duration::from_secs(25),
        || async { http(d.port, "GET", "/metrics", None).await.0 == 200 },
        &d.log,
    )
    .await;
    let run = d.run_to_end("app").await;
    assert_eq!(run["state"], "success", "{run}");
    drop(slow);
    d.stop().await;
}

/// A reload that moves the listener is refused: the socket stays, the old
/// config stays in force, and the status page's token rule follows the
/// socket actually bound.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_that_moves_the_listener_is_refused() {
    use crate::harness::daemon::{Daemon, daemon_config, wait_for};
    let env = Env::new().await;
    let cfg = daemon_config(
        &env,
        "status_page = true",
        &env.job("app", "marketplace", ""),
    );
    let mut d = Daemon::start(&cfg, env.path("daemon.log"));
    d.ready().await;
    assert_eq!(d.http("GET", "/", None).await.0, 200, "open on loopback");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let moved = text.replace(
        &format!("listen = \"127.0.0.1:{}\"", d.port),
        &format!(
            "listen = \"0.0.0.0:{}\"\nstatus_token_file = \"{}\"",
            d.port,
            env.path("api-token").display()
        ),
    );
    assert_ne!(moved, text);
    std::fs::write(&cfg, moved).unwrap();
    d.signal("-HUP");
    wait_for(
        "the reload refused",
        std::time::Duration::from_secs(20),
        || async { d.metric("backstop_config_reload_success").await == Some(0.0) },
        &d.log,
    )
    .await;
    assert!(d.log().contains("daemon.listen changed"), "{}", d.log());
    // Still the old config: no token asked on the loopback socket.
    assert_eq!(d.http("GET", "/", None).await.0, 200);
    d.stop().await;
}

/// An artifact swapped under a genuine signed manifest: its SQL would run
/// on the scratch server before the checksum mismatch shows at the end
/// (here `COPY … TO PROGRAM`, which no transaction takes back). The
/// scheduled restore check and the drill read the stored bytes first.
#[tokio::test(flavor = "multi_thread")]
async fn a_swapped_artifact_never_reaches_the_scratch_server() {
    let v = Victim::new(true).await;
    v.write(&v.env.job("app", "marketplace", "format = \"plain\""));
    let id = v.backup("app").await;
    let marker = std::env::temp_dir().join(format!(
        "backstop-swapped-{:016x}",
        crate::harness::pg::rand_u64()
    ));
    // Inside a DO block: the guard passes SQL, and COPY TO PROGRAM runs
    // on the server whatever transaction it is in.
    // Then megabytes of comments: psql runs the statement while the rest
    // is still streaming, long before the end where the checksum fails.
    let sql = format!(
        "DO $$ BEGIN EXECUTE 'COPY (SELECT 1) TO PROGRAM ''touch {}'''; END $$;\n{}",
        marker.display(),
        "-- padding padding padding padding padding padding padding padding\n".repeat(60_000)
    );
    let recipient = v.env.recipient.clone();
    plant_artifact(
        &v.env,
        "app",
        &id,
        "database",
        sql.as_bytes(),
        Some(&recipient),
        false,
    );
    let url = v.env.pg.url("postgres");
    let ident = v.env.identity.display().to_string();
    let pw = v.env.password_file.display().to_string();
    let r = v
        .backstop(&[
            "verify",
            "--job",
            "app",
            "--level",
            "restore",
            "--target",
            &url,
            "--target-password-file",
            &pw,
            "--identity",
            &ident,
        ])
        .await;
    assert!(
        !marker.exists(),
        "the swapped artifact's SQL ran on the scratch server: {r:?}"
    );
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.all().contains("not restored"), "{r:?}");
    let d = v
        .backstop(&[
            "drill",
            "--job",
            "app",
            "--target-server",
            &url,
            "--target-password-file",
            &pw,
            "--identity",
            &ident,
        ])
        .await;
    assert_eq!(d.code, Some(1), "{d:?}");
    assert!(
        !marker.exists(),
        "the swapped artifact's SQL ran on the server"
    );
}

/// A server restore whose run holds a database backup that is not trusted
/// (its signed manifest edited) restores nothing of that database, names
/// it, and exits 1: not even with --allow-older does an older backup stand
/// in for it, so the forgery cannot hide behind a fallback.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_restore_refuses_an_untrusted_database_by_name() {
    let v = Victim::new(true).await;
    let id = v.env.identity.display().to_string();
    v.write(&format!(
        "[[job]]\nname = \"srv\"\ndatabase = {{ url = \"{}\", password_file = \"{}\", all = true }}\nstorage = [\"local\"]\nidentity_file = \"{id}\"\n",
        v.env.pg.url("postgres"),
        v.env.password_file.display()
    ));
    v.backstop(&["backup", "--job", "srv"]).await.assert_ok();
    v.backstop(&["backup", "--job", "srv"]).await.assert_ok();
    let member = v.env.store().join("srv").join("marketplace");
    // The newer run by its manifest's start: two backups within one second
    // have ids that differ only in their random suffix, which does not sort
    // by time (the test edited the older run's manifest when they did).
    let started = |run: &String| -> String {
        let m: Value =
            serde_json::from_slice(&std::fs::read(member.join(run).join("manifest.json")).unwrap())
                .unwrap();
        m["started_at"].as_str().unwrap_or_default().to_string()
    };
    let mut runs: Vec<String> = std::fs::read_dir(&member)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    runs.sort_by_key(|r| (started(r), r.clone()));
    assert_eq!(runs.len(), 2, "{runs:?}");
    let mpath = member.join(&runs[1]).join("manifest.json");
    let mut m: Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    m["suspect"] = json!("edited");
    std::fs::write(&mpath, serde_json::to_vec_pretty(&m).unwrap()).unwrap();

    for extra in [&[][..], &["--allow-older"][..]] {
        // A new, empty server each time.
        let target = crate::harness::pg::PgCluster::start();
        let pw = v.env.path("target-password");
        crate::harness::write_private(&pw, &format!("{}\n", target.password));
        let url = target.url("postgres");
        let pw = pw.display().to_string();
        let mut args = vec![
            "restore",
            "--job",
            "srv",
            "--all-databases",
            "--target-server",
            &url,
            "--target-password-file",
            &pw,
            "--create-db",
        ];
        args.extend_from_slice(extra);
        let r = v.backstop(&args).await;
        assert_eq!(r.code, Some(1), "{extra:?}: {r:?}");
        let line = r
            .stdout
            .lines()
            .skip_while(|l| !l.contains(" marketplace "))
            .take(2)
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            line.trim_start().starts_with("FAILED") && line.contains("not trusted"),
            "{extra:?}: {}",
            r.stdout
        );
        let mut c = target.connect("postgres").await;
        let (n,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM pg_database WHERE datname = 'marketplace'")
                .fetch_one(&mut c)
                .await
                .unwrap();
        assert_eq!(n, 0, "{extra:?}: nothing older stands in for it");
    }
}
