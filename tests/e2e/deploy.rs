//! The shipped Kubernetes manifests (deploy/kubernetes): they parse, carry
//! the fields their README promises (retries belong to the catalog, probes
//! on /healthz and /readyz, migrate before the nodes), every pod meets the
//! Pod Security "restricted" profile and reads its secrets as files from the
//! mounted Secret, the NetworkPolicy fences the pods in, the ConfigMap's
//! backstop.toml passes `backstop check-config`, and `kubernetes-validate
//! --strict` accepts every manifest against the Kubernetes schemas.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_yaml::Value;

use crate::harness::{repo, run_backstop_with, write_private};

/// Where every pod mounts the Secret; the ConfigMap's `*_file` settings
/// point here.
const SECRET_DIR: &str = "/run/secrets/backstop";

fn manifest(name: &str) -> Value {
    let path = repo().join("deploy/kubernetes").join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every manifest in deploy/kubernetes, so a new one is checked too.
fn manifest_files() -> Vec<PathBuf> {
    let dir = repo().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    files
}

/// The pod template of every workload manifest, by file name.
fn pod_templates() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for path in manifest_files() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let m = manifest(&name);
        let template = match s(&m, "kind") {
            "Deployment" | "StatefulSet" | "DaemonSet" | "Job" => at(&m, "spec.template"),
            "CronJob" => at(&m, "spec.jobTemplate.spec.template"),
            "Pod" => &m,
            _ => continue,
        };
        out.push((name, template.clone()));
    }
    assert!(out.len() >= 3, "no workloads in deploy/kubernetes: {out:?}");
    out
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

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map_or(&[][..], Vec::as_slice)
}

fn args(container: &Value) -> Vec<&str> {
    container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect()
}

/// Every container of a pod spec, init and ephemeral ones included.
fn containers(spec: &Value) -> impl Iterator<Item = &Value> {
    ["initContainers", "containers", "ephemeralContainers"]
        .into_iter()
        .flat_map(|k| seq(&spec[k]))
}

/// Volume types the restricted profile allows (hostPath and the network
/// file systems are out).
const RESTRICTED_VOLUMES: [&str; 9] = [
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "image",
    "persistentVolumeClaim",
    "projected",
    "secret",
];

/// What keeps a pod template from the Pod Security Standards "restricted"
/// profile, and from what this project adds to it (a read-only root
/// filesystem, no service account token); empty when it passes. Checked
/// here so the profile holds even though the schema validator does not
/// know it.
fn restricted_violations(template: &Value) -> Vec<String> {
    let spec = &template["spec"];
    let pod = &spec["securityContext"];
    let mut v = Vec::new();
    if spec["automountServiceAccountToken"].as_bool() != Some(false) {
        v.push("automountServiceAccountToken is not false".to_string());
    }
    for host in ["hostNetwork", "hostPID", "hostIPC"] {
        if spec[host].as_bool() == Some(true) {
            v.push(format!("{host} is true"));
        }
    }
    if pod["runAsNonRoot"].as_bool() != Some(true) {
        v.push("pod runAsNonRoot is not true".into());
    }
    for id in ["runAsUser", "runAsGroup", "fsGroup"] {
        if pod[id].as_u64().unwrap_or(0) == 0 {
            v.push(format!("pod {id} is not a non-root id"));
        }
    }
    if pod["seccompProfile"]["type"].as_str() != Some("RuntimeDefault") {
        v.push("pod seccompProfile is not RuntimeDefault".into());
    }
    if !pod["sysctls"].is_null() {
        v.push("pod sets sysctls".into());
    }
    for vol in seq(&spec["volumes"]) {
        let name = vol["name"].as_str().unwrap_or("?");
        for (k, _) in vol.as_mapping().into_iter().flatten() {
            let k = k.as_str().unwrap_or("?");
            if k != "name" && !RESTRICTED_VOLUMES.contains(&k) {
                v.push(format!("volume {name} is a {k}"));
            }
        }
    }
    let mut any = false;
    for c in containers(spec) {
        any = true;
        let name = c["name"].as_str().unwrap_or("?");
        let sc = &c["securityContext"];
        if sc["allowPrivilegeEscalation"].as_bool() != Some(false) {
            v.push(format!("{name}: allowPrivilegeEscalation is not false"));
        }
        if sc["privileged"].as_bool() == Some(true) {
            v.push(format!("{name}: privileged"));
        }
        if !seq(&sc["capabilities"]["drop"])
            .iter()
            .any(|c| c.as_str() == Some("ALL"))
        {
            v.push(format!("{name}: capabilities do not drop ALL"));
        }
        if !seq(&sc["capabilities"]["add"]).is_empty() {
            v.push(format!(
                "{name}: capabilities add {:?}",
                sc["capabilities"]["add"]
            ));
        }
        if sc["readOnlyRootFilesystem"].as_bool() != Some(true) {
            v.push(format!("{name}: readOnlyRootFilesystem is not true"));
        }
        if sc["runAsNonRoot"].as_bool() != Some(true) {
            v.push(format!("{name}: runAsNonRoot is not true"));
        }
        if sc["runAsUser"].as_u64() == Some(0) {
            v.push(format!("{name}: runAsUser is 0"));
        }
        if let Some(t) = sc["seccompProfile"]["type"].as_str()
            && !["RuntimeDefault", "Localhost"].contains(&t)
        {
            v.push(format!("{name}: seccompProfile is {t}"));
        }
        if seq(&c["ports"]).iter().any(|p| !p["hostPort"].is_null()) {
            v.push(format!("{name}: uses a hostPort"));
        }
    }
    if !any {
        v.push("no containers".into());
    }
    v
}

/// `(setting, path)` for every `*_file = "path"` in a backstop.toml, inline
/// tables included.
fn file_settings(toml: &str) -> Vec<(&str, &str)> {
    const MARK: &str = "_file = \"";
    let mut out = Vec::new();
    for line in toml.lines().filter(|l| !l.trim_start().starts_with('#')) {
        let mut rest = line;
        while let Some(i) = rest.find(MARK) {
            // The setting's name: the ASCII word before the mark.
            let start = i - rest[..i]
                .chars()
                .rev()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .count();
            let setting = &rest[start..i + "_file".len()];
            let after = &rest[i + MARK.len()..];
            let end = after.find('"').expect("closing quote");
            out.push((setting, &after[..end]));
            rest = &after[end + 1..];
        }
    }
    out
}

/// The ports of every `postgres://` URL in `text`.
fn postgres_ports(text: &str) -> BTreeSet<u16> {
    text.match_indices("postgres://")
        .map(|(i, _)| {
            let url = &text[i..];
            let url = &url[..url.find(['"', ' ', '\n']).unwrap_or(url.len())];
            url::Url::parse(url)
                .unwrap()
                .port()
                .unwrap_or_else(|| panic!("{url} names no port"))
        })
        .collect()
}

/// The pod mounts the Secret as read-only files at [`SECRET_DIR`] that no
/// other user can read, and takes no secret from the environment.
fn secret_mounted_as_files(file: &str, template: &Value, secret_name: &str) {
    let spec = &template["spec"];
    let volume = seq(&spec["volumes"])
        .iter()
        .find(|v| v["secret"]["secretName"].as_str() == Some(secret_name))
        .unwrap_or_else(|| panic!("{file}: no volume of the Secret {secret_name}"));
    let mode = volume["secret"]["defaultMode"]
        .as_u64()
        .unwrap_or_else(|| panic!("{file}: the Secret volume has no defaultMode"));
    // backstop refuses a secret file that every user can read.
    assert_eq!(
        mode & 0o007,
        0,
        "{file}: defaultMode {mode:o} lets others read"
    );
    assert_eq!(mode & 0o222, 0, "{file}: defaultMode {mode:o} is writable");
    assert!(
        volume["secret"]["items"].is_null(),
        "{file}: mount every key, so each *_file finds its key"
    );
    let vol_name = s(volume, "name");
    for c in containers(spec) {
        let name = s(c, "name");
        let mount = seq(&c["volumeMounts"])
            .iter()
            .find(|m| m["name"].as_str() == Some(vol_name))
            .unwrap_or_else(|| panic!("{file}: {name} does not mount the Secret"));
        assert_eq!(s(mount, "mountPath"), SECRET_DIR, "{file}: {name}");
        assert_eq!(mount["readOnly"].as_bool(), Some(true), "{file}: {name}");
        for e in seq(&c["env"]) {
            assert!(
                e["valueFrom"]["secretKeyRef"].is_null(),
                "{file}: {name} takes {:?} from the Secret in its environment; mount it as a file",
                e["name"]
            );
        }
        for e in seq(&c["envFrom"]) {
            assert!(
                e["secretRef"].is_null(),
                "{file}: {name} takes a Secret into its environment"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn deploy_kubernetes_manifests_parse_and_are_safe() {
    let secret = manifest("secret.yaml");
    assert_eq!(s(&secret, "kind"), "Secret");
    let secret_name = s(&secret, "metadata.name");

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

    let deploy = manifest("deployment.yaml");
    assert_eq!(s(&deploy, "kind"), "Deployment");
    let c = at(&deploy, "spec.template.spec.containers.0");
    assert_eq!(args(c), ["run"]);
    assert_eq!(s(c, "livenessProbe.httpGet.path"), "/healthz");
    assert_eq!(s(c, "readinessProbe.httpGet.path"), "/readyz");
    let port = at(c, "ports.0.containerPort").as_u64().unwrap();
    // Long enough for the whole drain: daemon.shutdown_grace (the
    // ConfigMap's, or 300 s), then up to 60 s for cancelled runs to stop
    // and 30 s for the last notifications, before the node leaves.
    let grace = manifest("configmap.yaml")["data"]["backstop.toml"]
        .as_str()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.trim().strip_prefix("shutdown_grace = \""))
                .and_then(|v| humantime::parse_duration(v.trim_end_matches('"')).ok())
        })
        .map_or(300, |d| d.as_secs());
    let kill_after = at(&deploy, "spec.template.spec.terminationGracePeriodSeconds")
        .as_u64()
        .unwrap();
    assert!(
        kill_after > grace + 60 + 30,
        "terminationGracePeriodSeconds {kill_after} is not above the drain's {grace} + 60 + 30 s"
    );
    // The root filesystem is read-only: `restore --jobs` run in a daemon
    // pod needs a writable /tmp.
    let tmp = seq(&c["volumeMounts"])
        .iter()
        .find(|m| m["mountPath"].as_str() == Some("/tmp"))
        .expect("a /tmp mount in the daemon pod");
    assert_ne!(tmp["readOnly"].as_bool(), Some(true));
    assert!(
        seq(at(&deploy, "spec.template.spec.volumes"))
            .iter()
            .any(|v| v["name"] == tmp["name"] && v["emptyDir"].is_mapping()),
        "/tmp is an emptyDir"
    );

    let migrate = manifest("migrate-job.yaml");
    assert_eq!(s(&migrate, "kind"), "Job");
    let c = at(&migrate, "spec.template.spec.containers.0");
    assert_eq!(args(c)[0], "migrate");

    // Every pod reads the Secret as files, none from its environment.
    for (file, template) in pod_templates() {
        secret_mounted_as_files(&file, &template, secret_name);
    }

    // The ConfigMap's config is valid, listens where the probes look, and
    // reads every secret from a file of the mounted Secret.
    let cm = manifest("configmap.yaml");
    let toml = cm["data"]["backstop.toml"]
        .as_str()
        .expect("data.backstop.toml");
    assert!(
        toml.contains(&format!("listen = \"0.0.0.0:{port}\"")),
        "{toml}"
    );
    assert!(
        !toml.contains("_env = \""),
        "a secret comes from the environment; use the *_file form:\n{toml}"
    );
    let keys: BTreeSet<&str> = secret["stringData"]
        .as_mapping()
        .expect("secret.yaml stringData")
        .keys()
        .map(|k| k.as_str().unwrap())
        .collect();
    let files = file_settings(toml);
    let mut used = BTreeSet::new();
    for (setting, path) in &files {
        let key = path
            .strip_prefix(SECRET_DIR)
            .and_then(|k| k.strip_prefix('/'))
            .unwrap_or_else(|| panic!("{setting} = {path:?} is not in {SECRET_DIR}"));
        assert!(
            keys.contains(key),
            "{setting} reads the Secret key {key}, which secret.yaml does not provide"
        );
        used.insert(key);
    }
    for setting in [
        "catalog_password_file",
        "secret_access_key_file",
        "password_file",
    ] {
        assert!(
            files.iter().any(|(name, _)| *name == setting),
            "no {setting} in the ConfigMap:\n{toml}"
        );
    }
    assert_eq!(used, keys, "secret.yaml keys no *_file reads");

    // check-config with the Secret's files where the pods mount them (here a
    // temp dir) and not one variable in the environment.
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    for key in &keys {
        let value = secret["stringData"][*key].as_str().unwrap();
        write_private(&secrets.join(key), value);
    }
    let path = dir.path().join("backstop.toml");
    std::fs::write(&path, toml.replace(SECRET_DIR, secrets.to_str().unwrap())).unwrap();
    let check = run_backstop_with(&path, &["check-config"], &[]).await;
    check.assert_ok();
}

#[test]
fn deploy_kubernetes_pods_meet_the_restricted_profile() {
    let breaches: Vec<String> = pod_templates()
        .into_iter()
        .flat_map(|(file, template)| {
            restricted_violations(&template)
                .into_iter()
                .map(move |v| format!("{file}: {v}"))
        })
        .collect();
    assert!(
        breaches.is_empty(),
        "the restricted profile is broken:\n  {}",
        breaches.join("\n  ")
    );
}

/// The check above finds what it looks for: each breach, put into the
/// shipped daemon pod, is reported; so are the manifests before the fix
/// (only runAsNonRoot and runAsUser, no container securityContext).
#[test]
fn restricted_profile_check_reports_each_breach() {
    let good = at(&manifest("deployment.yaml"), "spec.template").clone();
    assert_eq!(restricted_violations(&good), Vec::<String>::new());
    type Breach = fn(&mut Value);
    let cases: [(&str, Breach, &str); 11] = [
        (
            "token mounted",
            |t| t["spec"]["automountServiceAccountToken"] = true.into(),
            "automountServiceAccountToken",
        ),
        (
            "host network",
            |t| t["spec"]["hostNetwork"] = true.into(),
            "hostNetwork is true",
        ),
        (
            "host PID",
            |t| t["spec"]["hostPID"] = true.into(),
            "hostPID is true",
        ),
        (
            "hostPath",
            |t| {
                let v: Value = serde_yaml::from_str("{name: h, hostPath: {path: /}}").unwrap();
                t["spec"]["volumes"].as_sequence_mut().unwrap().push(v);
            },
            "volume h is a hostPath",
        ),
        (
            "privileged",
            |t| t["spec"]["containers"][0]["securityContext"]["privileged"] = true.into(),
            "privileged",
        ),
        (
            "capability added",
            |t| {
                t["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] =
                    serde_yaml::from_str("[NET_ADMIN]").unwrap();
            },
            "capabilities add",
        ),
        (
            "seccomp unconfined",
            |t| {
                t["spec"]["containers"][0]["securityContext"]["seccompProfile"]["type"] =
                    "Unconfined".into();
            },
            "seccompProfile is Unconfined",
        ),
        (
            "root user",
            |t| t["spec"]["containers"][0]["securityContext"]["runAsUser"] = 0.into(),
            "runAsUser is 0",
        ),
        (
            "escalation",
            |t| {
                t["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] =
                    true.into();
            },
            "allowPrivilegeEscalation",
        ),
        (
            "writable root",
            |t| {
                t["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] =
                    false.into();
            },
            "readOnlyRootFilesystem",
        ),
        (
            "host port",
            |t| t["spec"]["containers"][0]["ports"][0]["hostPort"] = 9871.into(),
            "hostPort",
        ),
    ];
    for (what, breach, expect) in cases {
        let mut t = good.clone();
        breach(&mut t);
        let v = restricted_violations(&t);
        assert!(
            v.iter().any(|m| m.contains(expect)),
            "{what}: {expect:?} not reported in {v:?}"
        );
    }

    // The pods as shipped before the fix.
    let mut old = good.clone();
    let spec = old["spec"].as_mapping_mut().unwrap();
    spec.remove("automountServiceAccountToken");
    spec.insert(
        "securityContext".into(),
        serde_yaml::from_str("{runAsNonRoot: true, runAsUser: 65532}").unwrap(),
    );
    old["spec"]["containers"][0]
        .as_mapping_mut()
        .unwrap()
        .remove("securityContext");
    assert_eq!(
        restricted_violations(&old),
        [
            "automountServiceAccountToken is not false",
            "pod runAsGroup is not a non-root id",
            "pod fsGroup is not a non-root id",
            "pod seccompProfile is not RuntimeDefault",
            "backstop: allowPrivilegeEscalation is not false",
            "backstop: capabilities do not drop ALL",
            "backstop: readOnlyRootFilesystem is not true",
            "backstop: runAsNonRoot is not true",
        ]
    );
}

#[test]
fn deploy_kubernetes_network_policy_fences_the_pods() {
    let np = manifest("networkpolicy.yaml");
    assert_eq!(s(&np, "kind"), "NetworkPolicy");
    let types: Vec<&str> = seq(at(&np, "spec.policyTypes"))
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert!(
        types.contains(&"Ingress") && types.contains(&"Egress"),
        "{types:?}"
    );

    // It selects every backstop pod.
    let selector = at(&np, "spec.podSelector.matchLabels")
        .as_mapping()
        .expect("spec.podSelector.matchLabels");
    assert!(!selector.is_empty());
    for (file, template) in pod_templates() {
        for (k, v) in selector {
            assert_eq!(
                &template["metadata"]["labels"][k], v,
                "{file}: the NetworkPolicy's selector {k:?} misses the pod"
            );
        }
    }

    // (protocol, port) pairs a rule list allows; every rule names its ports.
    let ports = |rules: &Value| -> BTreeSet<(String, u64)> {
        let mut out = BTreeSet::new();
        for r in seq(rules) {
            assert!(
                !seq(&r["ports"]).is_empty(),
                "a rule open on every port: {r:?}"
            );
            for p in seq(&r["ports"]) {
                let proto = p["protocol"].as_str().unwrap_or("TCP").to_string();
                out.insert((proto, p["port"].as_u64().expect("a numeric port")));
            }
        }
        out
    };
    let tcp = |p: u64| ("TCP".to_string(), p);

    // In: only the HTTP port, and only from named peers.
    let http = at(
        &manifest("deployment.yaml"),
        "spec.template.spec.containers.0.ports.0.containerPort",
    )
    .as_u64()
    .unwrap();
    assert_eq!(ports(at(&np, "spec.ingress")), BTreeSet::from([tcp(http)]));
    for r in seq(at(&np, "spec.ingress")) {
        assert!(!seq(&r["from"]).is_empty(), "ingress from anywhere: {r:?}");
    }

    // Out: DNS, PostgreSQL, PgBouncer and HTTPS, nothing else; every port a
    // database URL of the config or the migrate Job names is among them.
    let egress = ports(at(&np, "spec.egress"));
    let allowed = BTreeSet::from([
        ("UDP".to_string(), 53),
        tcp(53),
        tcp(5432),
        tcp(6432),
        tcp(443),
    ]);
    assert_eq!(egress, allowed);
    let cm = manifest("configmap.yaml");
    let migrate = manifest("migrate-job.yaml");
    let urls = format!(
        "{}\n{}",
        cm["data"]["backstop.toml"].as_str().unwrap(),
        args(at(&migrate, "spec.template.spec.containers.0")).join(" ")
    );
    let used = postgres_ports(&urls);
    assert_eq!(used, BTreeSet::from([5432, 6432]));
    for p in used {
        assert!(
            egress.contains(&tcp(p.into())),
            "egress to port {p} is closed"
        );
    }
}

/// A real validator: kubernetes-validate (PyPI, installed by
/// scripts/install-deps.sh) checks every manifest against the Kubernetes
/// JSON schemas it ships, rejecting unknown fields (a typo such as
/// `securityContxt` would otherwise be dropped silently by the API server).
#[test]
fn deploy_kubernetes_manifests_pass_kubernetes_validate() {
    let files = manifest_files();
    let out = std::process::Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict"])
        .args(&files)
        .output()
        .expect("python3 must be installed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "kubernetes-validate --strict failed (scripts/install-deps.sh installs it)\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    // It only warns about a kind it has no schema for: every file must pass.
    for f in &files {
        assert!(
            stdout
                .lines()
                .any(|l| l.contains(&*f.to_string_lossy()) && l.contains(" passed for resource")),
            "{} was not validated\nstdout:\n{stdout}\nstderr:\n{stderr}",
            f.display()
        );
    }
    assert!(!stdout.contains("WARN"), "{stdout}\n{stderr}");
}
