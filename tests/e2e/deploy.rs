//! The shipped Kubernetes manifests (deploy/kubernetes): they parse, carry
//! the fields their README promises (retries belong to the catalog, probes
//! on /healthz and /readyz, migrate before the nodes), and the ConfigMap's
//! backstop.toml passes `backstop check-config`.

use serde_yaml::Value;

use crate::harness::{repo, run_backstop_with};

fn manifest(name: &str) -> Value {
    let path = repo().join("deploy/kubernetes").join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.')
        .fold(v, |v, key| match key.parse::<usize>() {
            Ok(i) => &v[i],
            Err(_) => &v[key],
        })
}

fn s<'a>(v: &'a Value, path: &str) -> &'a str {
    at(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not a string: {:?}", at(v, path)))
}

fn args(container: &Value) -> Vec<&str> {
    container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect()
}

/// Every secret key a container reads exists in secret.yaml.
fn secrets_exist(container: &Value, secret: &Value) {
    for e in container["env"].as_sequence().unwrap() {
        if let Some(key) = e["valueFrom"]["secretKeyRef"]["key"].as_str() {
            assert!(
                !secret["stringData"][key].is_null(),
                "secret key {key} is not in secret.yaml"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn deploy_kubernetes_manifests_parse_and_are_safe() {
    let secret = manifest("secret.yaml");
    assert_eq!(s(&secret, "kind"), "Secret");

    let cron = manifest("cronjob.yaml");
    assert_eq!(s(&cron, "kind"), "CronJob");
    assert!(["Forbid", "Allow"].contains(&s(&cron, "spec.concurrencyPolicy")));
    let job = at(&cron, "spec.jobTemplate.spec");
    assert_eq!(
        job["backoffLimit"].as_i64(),
        Some(0),
        "retries belong to the catalog"
    );
    assert_eq!(s(job, "template.spec.restartPolicy"), "Never");
    let c = at(job, "template.spec.containers.0");
    assert_eq!(&args(c)[..2], ["run-due", "--once"]);
    // Kubernetes' deadline leaves backstop time to stop its runs itself.
    let max = args(c)
        .windows(2)
        .find(|w| w[0] == "--max-runtime")
        .map(|w| humantime::parse_duration(w[1]).unwrap())
        .expect("--max-runtime");
    assert!(job["activeDeadlineSeconds"].as_u64().unwrap() > max.as_secs());
    secrets_exist(c, &secret);

    let deploy = manifest("deployment.yaml");
    assert_eq!(s(&deploy, "kind"), "Deployment");
    let c = at(&deploy, "spec.template.spec.containers.0");
    assert_eq!(args(c), ["run"]);
    assert_eq!(s(c, "livenessProbe.httpGet.path"), "/healthz");
    assert_eq!(s(c, "readinessProbe.httpGet.path"), "/readyz");
    let port = at(c, "ports.0.containerPort").as_u64().unwrap();
    secrets_exist(c, &secret);
    // Long enough for the default shutdown grace (300 s).
    assert!(
        at(&deploy, "spec.template.spec.terminationGracePeriodSeconds")
            .as_u64()
            .unwrap()
            > 300
    );

    let migrate = manifest("migrate-job.yaml");
    assert_eq!(s(&migrate, "kind"), "Job");
    let c = at(&migrate, "spec.template.spec.containers.0");
    assert_eq!(args(c)[0], "migrate");
    secrets_exist(c, &secret);

    // The ConfigMap's config is valid, listens where the probes look, and
    // keeps its catalog password out of the file.
    let cm = manifest("configmap.yaml");
    let toml = cm["data"]["backstop.toml"]
        .as_str()
        .expect("data.backstop.toml");
    assert!(
        toml.contains(&format!("listen = \"0.0.0.0:{port}\"")),
        "{toml}"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backstop.toml");
    std::fs::write(&path, toml).unwrap();
    let check = run_backstop_with(
        &path,
        &["check-config"],
        &[
            ("BACKSTOP_CATALOG_PASSWORD", "x"),
            ("AWS_ACCESS_KEY_ID", "x"),
            ("AWS_SECRET_ACCESS_KEY", "x"),
            ("ORDERS_DB_PASSWORD", "x"),
        ],
    )
    .await;
    check.assert_ok();
}
