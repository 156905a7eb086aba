//! `backstop verify --level checksum`: no key needed, detects any change to
//! the stored bytes.

use std::io::{Seek, SeekFrom, Write};

use crate::harness::s3::S3Server;
use crate::harness::{Env, manifest};

pub fn flip_byte(path: &std::path::Path, at: u64) {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(at)).unwrap();
    std::io::Read::read_exact(&mut f, &mut b).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&[b[0] ^ 0x01]).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn checksum_verify_detects_a_flipped_byte_and_truncation_in_a_local_store() {
    let env = Env::new().await;
    env.write_config(&env.job("app", "marketplace", "globals = true"));
    env.backstop(&["backup", "--job", "app"]).await.assert_ok();
    let dir = env.only_backup("app");
    let id = manifest(&dir)["backup_id"].as_str().unwrap().to_string();

    let ok = env
        .backstop(&["verify", "--job", "app", "--level", "checksum"])
        .await;
    ok.assert_ok();
    assert!(
        ok.stdout.contains(&format!(
            "local: {id} checksum OK: 2 artifact(s) match the manifest"
        )),
        "{}",
        ok.stdout
    );

    let art = dir.join("database.dump.zst.age");
    flip_byte(&art, 1000);
    let bad = env
        .backstop(&["verify", "--job", "app", "--backup", &id])
        .await;
    assert_eq!(bad.code, Some(1), "{bad:?}");
    assert!(
        bad.stdout.contains("checksum FAILED") && bad.stdout.contains("sha256 differs"),
        "{}",
        bad.stdout
    );
    assert!(
        bad.stderr.contains("1 backup(s) failed verification"),
        "{}",
        bad.stderr
    );

    let len = std::fs::metadata(&art).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&art)
        .unwrap()
        .set_len(len - 7)
        .unwrap();
    let json = env
        .backstop(&["verify", "--job", "app", "--backup", "all", "--json"])
        .await;
    assert_eq!(json.code, Some(1));
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    let db = &v[0]["result"]["artifacts"][0];
    assert_eq!(db["ok"], false);
    assert!(
        db["problem"].as_str().unwrap().contains("size differs"),
        "{db}"
    );
    assert_eq!(
        v[0]["result"]["artifacts"][1]["ok"], true,
        "globals untouched"
    );

    // Each verification is in the catalog.
    use sqlx::Connection;
    let url = format!("sqlite://{}", env.path("catalog.db").display());
    let mut c = sqlx::sqlite::SqliteConnection::connect(&url).await.unwrap();
    let rows: Vec<(String,)> =
        sqlx::query_as("SELECT outcome FROM runs WHERE kind = 'verify' ORDER BY id")
            .fetch_all(&mut c)
            .await
            .unwrap();
    assert_eq!(
        rows,
        vec![("success".into(),), ("failed".into(),), ("failed".into(),)]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn checksum_verify_reads_from_s3() {
    let env = Env::new().await;
    let s3 = S3Server::start();
    env.write_config_with_s3(&s3, "", &env.job_to("app", "marketplace", &["offsite"], ""));
    env.backstop(&["backup", "--job", "app"]).await.assert_ok();
    env.backstop(&["verify", "--job", "app"]).await.assert_ok();
    let key = s3
        .keys("prod/app/")
        .await
        .into_iter()
        .find(|k| k.ends_with(".age"))
        .unwrap();
    flip_byte(&s3.object_path(&key), 5);
    let bad = env.backstop(&["verify", "--job", "app"]).await;
    assert_eq!(bad.code, Some(1), "{bad:?}");
    assert!(
        bad.stdout.contains("offsite:") && bad.stdout.contains("checksum FAILED"),
        "{}",
        bad.stdout
    );
    // The S3 client checks the object's CRC32C (stored at upload) as it
    // reads, before backstop's own sha256 is compared.
    assert!(
        bad.stdout
            .contains("cannot read: streaming error: body checksum mismatch"),
        "{}",
        bad.stdout
    );
}
