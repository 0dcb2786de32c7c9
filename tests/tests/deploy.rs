//! The deployment examples in `deploy/` are real: every Kubernetes
//! manifest parses, its objects reference what exists (ports, config
//! maps, secrets), and every configuration and command line in them — the
//! ConfigMaps' TOML, the containers' arguments, the systemd units'
//! `ExecStart` — is accepted by the real binaries (`--print-config`, which
//! validates before it prints).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sy-deploy-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs a binary with `args` and `--print-config`; its output (fails unless it exits 0).
fn print_config(bin: &str, args: &[String], env: &[(&str, &str)]) -> String {
    let out = Command::new(e2e::bin_dir().join(bin))
        .args(args)
        .arg("--print-config")
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{bin} {args:?} --print-config failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn docs(file: &str) -> Vec<Yaml> {
    let text = std::fs::read_to_string(deploy().join("kubernetes").join(file)).unwrap();
    let docs = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
    for d in &docs {
        for key in ["apiVersion", "kind"] {
            assert!(d[key].as_str().is_some(), "{file}: a document without {key}");
        }
        assert!(d["metadata"]["name"].as_str().is_some(), "{file}: a document without a name");
        assert_eq!(d["metadata"]["namespace"].as_str(), Some("switchyard"), "{file}");
    }
    docs
}

fn of_kind<'a>(docs: &'a [Yaml], kind: &str) -> Vec<&'a Yaml> {
    docs.iter().filter(|d| d["kind"].as_str() == Some(kind)).collect()
}

/// The one container of a workload, with its named ports, env and mounts checked.
fn container<'a>(workload: &'a Yaml, configmaps: &[&Yaml]) -> &'a Yaml {
    let spec = &workload["spec"]["template"]["spec"];
    let c = &spec["containers"][0];
    let ports: Vec<&str> = c["ports"].as_vec().unwrap().iter().filter_map(|p| p["name"].as_str()).collect();
    for probe in ["readinessProbe", "livenessProbe"] {
        let port = c[probe]["httpGet"]["port"].as_str().unwrap_or_else(|| panic!("{probe} port"));
        assert!(ports.contains(&port), "{probe} uses port {port}, not one of {ports:?}");
    }
    assert_eq!(c["readinessProbe"]["httpGet"]["path"].as_str(), Some("/readyz"));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
    let volumes: Vec<&str> =
        spec["volumes"].as_vec().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    for m in c["volumeMounts"].as_vec().unwrap() {
        assert!(volumes.contains(&m["name"].as_str().unwrap()), "a mount of a volume that is not there");
    }
    for v in spec["volumes"].as_vec().unwrap() {
        if let Some(cm) = v["configMap"]["name"].as_str() {
            assert!(configmaps.iter().any(|m| m["metadata"]["name"].as_str() == Some(cm)), "config map {cm}");
        }
    }
    assert!(spec["terminationGracePeriodSeconds"].as_i64().is_some_and(|s| s >= 30), "room to drain");
    c
}

/// A container's arguments with Kubernetes' `$(VAR)` filled in and the
/// mounted paths pointed at local files.
fn args(c: &Yaml, vars: &HashMap<&str, &str>, paths: &[(&str, &Path)]) -> Vec<String> {
    c["args"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|a| {
            let mut a = a.as_str().unwrap().to_owned();
            for (k, v) in vars {
                a = a.replace(&format!("$({k})"), v);
            }
            for (from, to) in paths {
                a = a.replace(from, to.to_str().unwrap());
            }
            assert!(!a.contains("$("), "an unfilled variable in {a}");
            a
        })
        .collect()
}

#[test]
fn the_kubernetes_manifests_parse_and_the_binaries_accept_them() {
    let all: Vec<Yaml> = ["etcd.yaml", "router.yaml", "gateway.yaml"].iter().flat_map(|f| docs(f)).collect();
    let configmaps = of_kind(&all, "ConfigMap");
    let dir = tmp("k8s");
    // Certificates named as the StatefulSet's pods are.
    let names: Vec<String> =
        (0..3).map(|i| format!("router-{i}.routers.switchyard.svc.cluster.local")).collect();
    let st = Command::new(e2e::bin_dir().join("router"))
        .args(["certs", "--out"])
        .arg(dir.join("certs"))
        .args(["--names", &names.join(",")])
        .output()
        .unwrap();
    assert!(st.status.success());

    // The routers: a headless Service for their names, three replicas.
    let headless =
        of_kind(&all, "Service").into_iter().find(|s| s["metadata"]["name"].as_str() == Some("routers"));
    assert_eq!(headless.unwrap()["spec"]["clusterIP"].as_str(), Some("None"));
    let sts =
        of_kind(&all, "StatefulSet").into_iter().find(|s| s["metadata"]["name"].as_str() == Some("router"));
    let sts = sts.expect("the router StatefulSet");
    assert_eq!(sts["spec"]["serviceName"].as_str(), Some("routers"));
    let router_toml = configmaps.iter().find_map(|m| m["data"]["router.toml"].as_str()).expect("router.toml");
    std::fs::write(dir.join("router.toml"), router_toml).unwrap();
    let c = container(sts, &configmaps);
    let vars = HashMap::from([("POD_NAME", "router-1"), ("POD_IP", "10.1.2.3")]);
    let paths = [
        ("/etc/switchyard/router.toml", dir.join("router.toml")),
        ("/etc/switchyard/certs", dir.join("certs")),
    ];
    let paths: Vec<(&str, &Path)> = paths.iter().map(|(a, b)| (*a, b.as_path())).collect();
    let printed =
        print_config("router", &args(c, &vars, &paths), &[("SWITCHYARD_API_KEY", "a-deploy-test-key")]);
    for want in [
        "name = \"router-1.routers.switchyard.svc.cluster.local\"",
        "advertise_quic = \"10.1.2.3:7100\"",
        "endpoints = [\"etcd.switchyard.svc.cluster.local:2379\"]",
        "api_key = \"<redacted>\"",
    ] {
        assert!(printed.contains(want), "{want} in:\n{printed}");
    }

    // The gateways.
    let gw =
        of_kind(&all, "Deployment").into_iter().find(|d| d["metadata"]["name"].as_str() == Some("gateway"));
    let gw = gw.expect("the gateway Deployment");
    let gateway_toml =
        configmaps.iter().find_map(|m| m["data"]["gateway.toml"].as_str()).expect("gateway.toml");
    std::fs::write(dir.join("gateway.toml"), gateway_toml).unwrap();
    let c = container(gw, &configmaps);
    let paths = [("/etc/switchyard/gateway.toml", dir.join("gateway.toml"))];
    let paths: Vec<(&str, &Path)> = paths.iter().map(|(a, b)| (*a, b.as_path())).collect();
    let env = [("SWITCHYARD_HMAC_SECRET", "a-deploy-test-secret-of-32-bytes-or-more")];
    let printed =
        print_config("gateway", &args(c, &HashMap::from([("POD_NAME", "gateway-abc")]), &paths), &env);
    for want in
        ["id = \"gateway-abc\"", "endpoints = [\"etcd.switchyard.svc.cluster.local:2379\"]", "<redacted>"]
    {
        assert!(printed.contains(want), "{want} in:\n{printed}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// A unit file's sections and keys.
fn unit(path: &Path) -> HashMap<String, HashMap<String, String>> {
    let mut out: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut section = String::new();
    for line in std::fs::read_to_string(path).unwrap().lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_owned();
            continue;
        }
        let (k, v) =
            line.split_once('=').unwrap_or_else(|| panic!("{}: not key=value: {line}", path.display()));
        assert!(!section.is_empty(), "{}: a key before any section", path.display());
        out.entry(section.clone()).or_default().insert(k.to_owned(), v.to_owned());
    }
    out
}

#[test]
fn the_systemd_units_parse_and_the_binaries_accept_their_command_lines() {
    let sys = deploy().join("systemd");
    let secrets: Vec<(String, String)> = std::fs::read_to_string(sys.join("secrets.env"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect();
    let env: Vec<(&str, &str)> = secrets.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    for (bin, file, config) in [
        ("router", "switchyard-router.service", "router.toml"),
        ("gateway", "switchyard-gateway.service", "gateway.toml"),
    ] {
        let u = unit(&sys.join(file));
        assert!(u["Unit"].contains_key("Description"), "{file}");
        assert_eq!(u["Service"]["KillSignal"], "SIGTERM", "{file}: SIGTERM drains");
        assert!(u["Service"]["LimitNOFILE"].parse::<u64>().unwrap() >= 100_000, "{file}");
        assert_eq!(u["Install"]["WantedBy"], "multi-user.target", "{file}");
        assert_eq!(u["Service"]["EnvironmentFile"], "/etc/switchyard/secrets.env");
        let exec: Vec<String> = u["Service"]["ExecStart"]
            .split_whitespace()
            .map(|a| a.replace(&format!("/etc/switchyard/{config}"), sys.join(config).to_str().unwrap()))
            .collect();
        assert_eq!(exec[0], format!("/usr/local/bin/{bin}"), "{file}");
        let printed = print_config(bin, &exec[1..], &env);
        assert!(printed.contains("[etcd]") && printed.contains("10.0.0.2:2379"), "{file}:\n{printed}");
    }
}
