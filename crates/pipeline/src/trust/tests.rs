use super::*;
use crate::testkit::{MemStore, app_job, id_at, manifest_for};
use crate::verification::{VerificationRecord, trust_record};
use backstop_crypto::sign::SigningKey;

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn now() -> DateTime<Utc> {
    at("2026-03-01T12:00:00Z")
}

/// A genuine backup of `app` at `t` (database and globals artifacts).
fn genuine(t: DateTime<Utc>, n: u16) -> Manifest {
    manifest_for(&id_at(t, n), t, &[("database", 100), ("globals", 10)])
}

type Case<'a> = (&'a str, fn(&mut Manifest), &'a str);

/// Each case: what it is, how a genuine manifest (`genuine()`) is
/// altered, and what the reason the reader refuses it says ("": trusted).
fn check_cases(
    cases: &[Case<'_>],
    genuine: impl Fn() -> Manifest,
    job: &backstop_config::JobConfig,
    id: &str,
) {
    for (what, alter, says) in cases {
        let mut m = genuine();
        alter(&mut m);
        let p = manifest_problem(&m, job, id, now(), false);
        if says.is_empty() {
            assert_eq!(p, None, "{what}");
        } else {
            let p = p.unwrap_or_else(|| panic!("{what}: trusted"));
            assert!(p.contains(says), "{what}: {p}");
        }
    }
}

/// Each case: how a genuine manifest is altered, and what the reason says.
#[test]
fn what_a_manifest_says_must_match_where_it_lies() {
    let job = app_job("encryption = \"none\"");
    let t = at("2026-02-01T02:00:00Z");
    let id = id_at(t, 1);
    type Alter = fn(&mut Manifest);
    let cases: &[(&str, Alter, &str)] = &[
        ("genuine", |_| {}, ""),
        (
            "other job",
            |m| m.job = "other".into(),
            "names series \"other\"",
        ),
        (
            "member smuggled in",
            |m| m.member = Some("x".into()),
            "names series",
        ),
        (
            "other id",
            |m| m.backup_id = "2026-02-01T02-00-00Z-0002".into(),
            "names backup",
        ),
        (
            "start far from the id",
            |m| m.started_at += chrono::TimeDelta::hours(3),
            "its id says",
        ),
        (
            "finished before started",
            |m| m.finished_at = m.started_at - chrono::TimeDelta::seconds(5),
            "finished before",
        ),
        (
            "future",
            |m| m.finished_at = at("2026-03-02T00:00:00Z"),
            "dated in the future",
        ),
        (
            "no artifacts",
            |m| m.artifacts.clear(),
            "no database artifact",
        ),
        (
            "only globals",
            |m| m.artifacts.retain(|a| a.kind == "globals"),
            "no database artifact",
        ),
        (
            "twice",
            |m| {
                let a = m.artifacts[0].clone();
                m.artifacts.push(a);
            },
            "twice",
        ),
        (
            "unknown kind",
            |m| m.artifacts[0].kind = "script".into(),
            "no known kind",
        ),
        (
            "outside",
            |m| m.artifacts[0].key = "other/2026-02-01T02-00-00Z-0001/database.dump.zst".into(),
            "outside",
        ),
        (
            "dot file",
            |m| {
                m.artifacts[0].file = ".x".into();
                m.artifacts[0].key = format!("app/{}/.x", m.backup_id);
            },
            "outside",
        ),
        (
            "format not the name",
            |m| m.artifacts[0].format = "plain".into(),
            "the name says otherwise",
        ),
        (
            "compression not the name",
            |m| m.artifacts[0].compression = "none".into(),
            "the name says otherwise",
        ),
        (
            "encrypted not the name",
            |m| m.artifacts[0].encryption = ArtifactEncryption::Age { recipients: vec![] },
            "the name says otherwise",
        ),
        (
            "custom globals",
            |m| {
                let a = &mut m.artifacts[1];
                a.file = "globals.dump.zst".into();
                a.key = format!("app/{}/globals.dump.zst", m.backup_id);
                a.format = "custom".into();
            },
            "the name says otherwise",
        ),
        (
            "newer format",
            |m| m.format_version = 99,
            "newer than this backstop",
        ),
    ];
    check_cases(cases, || genuine(t, 1), &job, &id);
    // A folder that is not a backup id.
    let m = genuine(t, 1);
    assert!(manifest_problem(&m, &job, "latest", now(), false).is_some());
}

#[test]
fn a_job_that_encrypts_never_trusts_an_unencrypted_artifact() {
    let job = app_job("");
    assert!(matches!(job.encryption, Encryption::Age { .. }));
    let t = at("2026-02-01T02:00:00Z");
    let m = genuine(t, 1);
    let p = manifest_problem(&m, &job, &m.backup_id, now(), false).unwrap();
    assert!(p.contains("encryption downgrade"), "{p}");
    // Encrypted as its name says: trusted.
    let mut enc = m.clone();
    for a in &mut enc.artifacts {
        a.file.push_str(".age");
        a.key.push_str(".age");
        a.encryption = ArtifactEncryption::Age {
            recipients: vec!["age1x".into()],
        };
    }
    assert_eq!(
        manifest_problem(&enc, &job, &enc.backup_id, now(), false),
        None
    );
    // Signed by a trusted key: this host's own backup from before the job
    // encrypted, kept, restorable and pruned like any other.
    assert_eq!(manifest_problem(&m, &job, &m.backup_id, now(), true), None);
}

#[test]
fn a_cluster_databases_backup_may_start_after_its_runs_id() {
    let cluster = app_job("encryption = \"none\"");
    let mut member = cluster.member("shop");
    member.encryption = Encryption::None;
    let t = at("2026-02-01T02:00:00Z");
    let mut m = genuine(t, 1);
    m.artifacts.retain(|a| a.kind == "database");
    m.member = Some("shop".into());
    let folder = m.folder();
    for a in &mut m.artifacts {
        a.key = format!("{folder}{}", a.file);
    }
    m.started_at += chrono::TimeDelta::hours(2);
    m.finished_at = m.started_at;
    assert_eq!(
        manifest_problem(&m, &member, &m.backup_id, now(), false),
        None
    );
    m.started_at = t - chrono::TimeDelta::hours(1);
    assert!(manifest_problem(&m, &member, &m.backup_id, now(), false).is_some());
}

/// Puts `m` in `store` at its folder, signed by `key` when given.
fn put(store: &MemStore, m: &Manifest, key: Option<&SigningKey>) {
    let body = serde_json::to_vec_pretty(m).unwrap();
    let k = format!("{}{}", m.folder(), manifest::MANIFEST_FILE);
    if let Some(key) = key {
        store.insert(&signature_key(&k), key.sign(&body, &k));
    }
    for a in &m.artifacts {
        store.insert(&a.key, vec![0u8; a.stored_bytes as usize]);
    }
    store.insert(&k, body);
}

fn trust(keys: &[&SigningKey]) -> Trust {
    Trust::new(
        TrustedKeys::new(keys.iter().map(|k| k.public().clone()).collect()),
        now(),
    )
}

#[tokio::test]
async fn with_trusted_keys_only_signed_manifests_are_backups() {
    let job = app_job("encryption = \"none\"");
    let (_, ours) = SigningKey::generate().unwrap();
    let (_, old) = SigningKey::generate().unwrap();
    let (_, stranger) = SigningKey::generate().unwrap();
    let store = MemStore::default();
    let t = at("2026-02-01T02:00:00Z");
    let days = |d: i64| t + chrono::TimeDelta::days(d);
    put(&store, &genuine(days(0), 1), Some(&ours));
    put(&store, &genuine(days(1), 2), Some(&old)); // rotated out? still listed below
    put(&store, &genuine(days(2), 3), None);
    put(&store, &genuine(days(3), 4), Some(&stranger));
    // Signed, then altered.
    let tampered = genuine(days(4), 5);
    put(&store, &tampered, Some(&ours));
    let k = format!("{}{}", tampered.folder(), manifest::MANIFEST_FILE);
    let mut bigger = tampered.clone();
    bigger.artifacts[0].stored_bytes += 1;
    store.insert(&k, serde_json::to_vec_pretty(&bigger).unwrap());
    // A genuine signed folder copied under another id.
    let copied = genuine(days(5), 6);
    put(&store, &copied, Some(&ours));
    let copy_id = id_at(days(5), 7);
    for key in store.keys() {
        if let Some(rest) = key.strip_prefix(&copied.folder()) {
            let body = store.get(&key).await.unwrap();
            store.insert(&format!("app/{copy_id}/{rest}"), body);
        }
    }

    let l = list_backups(&store, &job, &trust(&[&ours, &old]))
        .await
        .unwrap();
    let ids: Vec<&str> = l.backups.iter().map(|m| m.backup_id.as_str()).collect();
    assert_eq!(
        ids,
        [id_at(days(5), 6), id_at(days(1), 2), id_at(days(0), 1)]
    );
    assert_eq!(l.backups[0].signed_by(), Some(ours.public().id().as_str()));
    let why = |id: String| l.why_not(&id).unwrap().reason.clone();
    assert!(why(id_at(days(2), 3)).contains("not signed"));
    assert!(why(id_at(days(3), 4)).contains("not in trusted_keys"));
    assert!(why(id_at(days(4), 5)).contains("altered after signing"));
    assert!(
        why(copy_id.clone()).contains("not for this object"),
        "{}",
        why(copy_id)
    );

    // The old key taken out of trusted_keys: its backups are not trusted.
    let l = list_backups(&store, &job, &trust(&[&ours])).await.unwrap();
    assert!(l.get(&id_at(days(1), 2)).is_none());
    // Without trusted keys, only the folder checks (the altered manifest
    // is consistent with itself): the copy still fails them.
    let l = list_backups(&store, &job, &Trust::new(TrustedKeys::default(), now()))
        .await
        .unwrap();
    assert_eq!(l.backups.len(), 6);
    assert!(
        l.why_not(&id_at(days(5), 7))
            .unwrap()
            .reason
            .contains("names backup")
    );
}

#[tokio::test]
async fn keys_the_store_refuses_and_oversized_objects_do_not_fail_the_listing() {
    let job = app_job("encryption = \"none\"");
    let store = MemStore::default();
    let t = at("2026-02-01T02:00:00Z");
    put(&store, &genuine(t, 1), None);
    store.insert("app/.x/manifest.json", "{}");
    store.insert("app//manifest.json", "{}");
    let big_id = id_at(t, 2);
    let m = genuine(t, 2);
    put(&store, &m, None);
    store.insert(
        &format!("app/{big_id}/manifest.json"),
        vec![b' '; (MAX_MANIFEST_BYTES + 1) as usize],
    );
    // An empty object is not read (S3 answers a ranged read of one with
    // 416, which would fail the listing): it is simply not a manifest.
    let empty_id = id_at(t, 3);
    store.insert(&format!("app/{empty_id}/manifest.json"), Vec::new());
    let l = list_backups(&store, &job, &Trust::new(TrustedKeys::default(), now()))
        .await
        .unwrap();
    assert_eq!(l.backups.len(), 1);
    assert_eq!(l.untrusted.len(), 4, "{:?}", l.untrusted);
    assert!(l.why_not(&big_id).unwrap().reason.contains("over the"));
    assert!(
        l.why_not(&empty_id)
            .unwrap()
            .reason
            .contains("not a manifest")
    );
}

/// The reader's cap holds while reading, not only by the listed size: an
/// object that grew after it was listed is cut off at the cap.
#[tokio::test]
async fn reads_are_capped_while_streaming() {
    let store = MemStore::default();
    store.insert("app/x/manifest.json", vec![b'x'; 5000]);
    // Listed at 10 bytes, 5,000 by the time it is read.
    let r = read_signed(&store, "app/x/manifest.json", 10, 4096, None)
        .await
        .unwrap();
    assert!(matches!(r, Read::Refused(ref why) if why.contains("larger than")));
}

/// A record says which store's copy it checked: copied to another store
/// (where the copy may be damaged), it vouches for nothing there.
#[test]
fn a_verification_record_counts_only_in_its_own_store() {
    let (_, ours) = SigningKey::generate().unwrap();
    let t = at("2026-02-01T02:00:00Z");
    let m = genuine(t, 1);
    let record = |store: Option<&str>| {
        let mut r = VerificationRecord::of(&m, "offsite", "checksum", true, t, t, vec![]);
        r.store = store.map(str::to_string);
        serde_json::to_vec(&r).unwrap()
    };
    let key = format!("app/{}/verify/x.json", m.backup_id);
    let signed = trust(&[&ours]);
    let unsigned = Trust::new(TrustedKeys::default(), now());
    for (body, store, t, ok) in [
        (record(Some("offsite")), "offsite", &unsigned, true),
        (record(Some("offsite")), "local", &unsigned, false),
        (record(None), "local", &unsigned, true),
        (record(Some("offsite")), "local", &signed, false),
        (record(None), "local", &signed, false),
        (record(Some("local")), "local", &signed, true),
    ] {
        let sig = ours.sign(&body, &key);
        let got = trust_record(
            "app",
            store,
            &m.backup_id,
            &key,
            &body,
            Some(sig.as_bytes()),
            t,
        );
        assert_eq!(got.is_ok(), ok, "{store}: {got:?}");
    }
}

/// A genuine backup in streams: pre-data, two data streams holding a
/// table cut in three parts, data-rest, post-data, globals.
fn in_streams(t: chrono::DateTime<chrono::Utc>) -> Manifest {
    let id = id_at(t, 1);
    let mut m = crate::testkit::manifest_for(
        &id,
        t,
        &[
            ("pre-data", 10),
            ("post-data", 10),
            ("data-rest", 10),
            ("globals", 5),
        ],
    );
    m.format_version = crate::manifest::FORMAT_VERSION;
    m.dump.streams = Some(2);
    let template = m.artifacts[0].clone();
    for (n, parts) in [(1u64, vec![1u64, 3]), (2, vec![2])] {
        let mut a = template.clone();
        a.kind = "data".into();
        a.format = "plain".into();
        a.file = format!("data-{n:02}.sql.zst");
        a.key = format!("app/{id}/{}", a.file);
        a.tables = vec![crate::manifest::ArtifactTable {
            schema: "public".into(),
            name: "events".into(),
            parts,
            of: 3,
            rows: Some(10),
        }];
        m.artifacts.push(a);
    }
    m
}

#[test]
fn a_backup_in_streams_is_trusted_only_whole() {
    let job = app_job("encryption = \"none\"");
    let t = at("2026-02-01T02:00:00Z");
    let id = id_at(t, 1);
    type Alter = fn(&mut Manifest);
    let cases: &[(&str, Alter, &str)] = &[
        ("genuine", |_| {}, ""),
        ("format 1", |m| m.format_version = 1, "no known kind"),
        (
            "no data-rest",
            |m| m.artifacts.retain(|a| a.kind != "data-rest"),
            "lacks one of them",
        ),
        (
            "no post-data",
            |m| m.artifacts.retain(|a| a.kind != "post-data"),
            "lacks one of them",
        ),
        (
            "a database artifact too",
            |m| {
                let mut a = m.artifacts[0].clone();
                a.kind = "database".into();
                a.file = "database.dump.zst".into();
                a.key = format!("app/{}/database.dump.zst", m.backup_id);
                m.artifacts.push(a);
            },
            "mixes",
        ),
        (
            "a part missing",
            |m| {
                let i = m
                    .artifacts
                    .iter()
                    .position(|a| a.file.starts_with("data-02"))
                    .unwrap();
                m.artifacts.remove(i);
            },
            "a part is missing",
        ),
        (
            "a part twice",
            |m| {
                let i = m
                    .artifacts
                    .iter()
                    .position(|a| a.file.starts_with("data-02"))
                    .unwrap();
                m.artifacts[i].tables[0].parts = vec![1, 2];
            },
            "listed twice",
        ),
        (
            "the same data artifact twice",
            |m| {
                let i = m.artifacts.iter().position(|a| a.kind == "data").unwrap();
                let a = m.artifacts[i].clone();
                m.artifacts.push(a);
            },
            "twice",
        ),
        (
            "parts disagree",
            |m| {
                let i = m
                    .artifacts
                    .iter()
                    .position(|a| a.file.starts_with("data-02"))
                    .unwrap();
                m.artifacts[i].tables[0].of = 4;
            },
            "disagree",
        ),
        (
            "tables on pre-data",
            |m| {
                let t = m
                    .artifacts
                    .iter()
                    .find(|a| a.kind == "data")
                    .unwrap()
                    .tables
                    .clone();
                m.artifacts[0].tables = t;
            },
            "only data artifacts hold tables",
        ),
        (
            "a data artifact in custom format",
            |m| {
                let i = m.artifacts.iter().position(|a| a.kind == "data").unwrap();
                m.artifacts[i].format = "custom".into();
            },
            "the name says otherwise",
        ),
        (
            "streams out of range",
            |m| m.dump.streams = Some(u32::MAX),
            "1 to 64",
        ),
    ];
    check_cases(cases, || in_streams(t), &job, &id);
}
