//! The one-command demo, small: a few hundred clients, a short fan-out,
//! nothing lost, every client connected, the report written.

use std::path::PathBuf;
use std::process::Command;

/// Runs `loadgen ARGS --json` with its HTML report at a temporary path
/// named after `name`; its JSON report and that path.
fn run_loadgen(name: &str, args: &[&str]) -> (serde_json::Value, PathBuf) {
    let report = std::env::temp_dir().join(format!("{name}-{}.html", std::process::id()));
    let out = Command::new(e2e::bin_dir().join("loadgen"))
        .args(args)
        .args(["--json", "--report"])
        .arg(&report)
        .output()
        .expect("loadgen runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr));
    (serde_json::from_str(stdout.lines().last().unwrap()).unwrap(), report)
}

/// `loadgen demo ARGS`, its report checked clean.
fn run_demo(name: &str, args: &[&str]) -> (serde_json::Value, PathBuf) {
    let (v, report) = run_loadgen(name, &[&["demo"][..], args].concat());
    assert_clean(&v);
    (v, report)
}

#[test]
fn demo_runs_clean_with_a_few_hundred_connections() {
    let (v, report) = run_demo("sy-demo", &["--connections", "300", "--publications", "60", "--rate", "200"]);
    assert_eq!(v["connected"], 300, "{v}");
    assert!(v["deliveries"].as_u64().unwrap() >= 60, "{v}");
    assert!(v["latency_ms"]["count"].as_u64().unwrap() > 0);
    // Every subscription was checked to the end, every payload against what was published.
    assert_eq!(v["verdict"]["ok"], true, "{v}");
    assert_eq!(v["streams"], 600, "{v}");
    assert_eq!((v["unpositioned"].as_u64(), v["gave_up"].as_u64()), (Some(0), Some(0)), "{v}");
    assert_eq!(v["payload_mismatch"], 0, "{v}");
    assert_eq!(v["payload_verified"], v["deliveries"], "{v}");
    let html = std::fs::read_to_string(&report).unwrap();
    assert!(html.contains("Nothing lost"), "report verdict");
    assert!(html.contains("every client checked to the end"), "report verdict");
    // --rate skips the ramp: the steady fan-out is the whole fan-out.
    assert_eq!(v["ramp"].as_array().map(Vec::len), Some(0), "{v}");
    assert_eq!(v["steady_rate"], 200.0, "{v}");
    assert_eq!(v["steady_latency_ms"]["count"], v["latency_ms"]["count"], "{v}");
    let _ = std::fs::remove_file(report);
}

/// Without `--rate` the demo ramps first: every step's publications are
/// checked like the steady fan-out's, the capacity and the steady rate
/// (70 % of it) are reported, and the HTML marks each phase.
#[test]
fn demo_ramps_to_a_capacity_then_runs_steady_at_a_share_of_it() {
    let ramp = ["--ramp-first-rate", "20", "--ramp-steps", "3", "--ramp-step-secs", "0.5"];
    let (v, report) =
        run_demo("sy-demo-ramp", &[&["--connections", "200", "--publications", "40"][..], &ramp].concat());
    let steps = v["ramp"].as_array().unwrap();
    assert!(!steps.is_empty() && steps.len() <= 3, "{v}");
    let ramp_pubs: u64 = steps.iter().map(|s| s["publications"].as_u64().unwrap()).sum();
    // 20/s for 0.5 s is 10 publications, 30/s 15, 45/s 22 (or 23).
    assert_eq!(steps[0]["publications"], 10, "{v}");
    assert_eq!(v["publications"].as_u64().unwrap(), ramp_pubs + 40, "{v}");
    // Every publication, the ramp's too, reached its subscribers and was checked.
    // (A step's own count stops at its drain limit; the verdict and the
    // payload check below cover every delivery to the end.)
    for s in steps {
        assert!(s["asked"].as_u64().unwrap() > 0, "{s}");
        assert!(s["delivered"].as_u64().unwrap() <= s["asked"].as_u64().unwrap(), "{s}");
    }
    assert_eq!(v["payload_verified"], v["deliveries"], "{v}");
    let capacity = v["capacity"]["publications_per_sec"].as_f64().unwrap();
    assert!(capacity > 0.0, "{v}");
    assert!((v["steady_rate"].as_f64().unwrap() - 0.7 * capacity).abs() < 1e-9, "{v}");
    assert!(v["steady_latency_ms"]["count"].as_u64().unwrap() > 0, "{v}");
    let phases: Vec<&str> = v["phases"].as_array().unwrap().iter().map(|p| p[0].as_str().unwrap()).collect();
    assert_eq!(phases[0], "storm", "{phases:?}");
    assert_eq!(phases[1], "ramp 20.0/s", "{phases:?}");
    assert_eq!(phases[phases.len() - 2..], ["steady fan-out", "settle"], "{phases:?}");
    let tagged: Vec<&str> =
        v["phase_latency"].as_array().unwrap().iter().map(|p| p["phase"].as_str().unwrap()).collect();
    assert_eq!(tagged, phases[1..phases.len() - 1], "every ramp step and the steady fan-out: {v}");
    let html = std::fs::read_to_string(&report).unwrap();
    for needle in [
        "Capacity ramp",
        "Capacity: ",
        "steady fan-out rate",
        ">ramp 20.0/s</text>",
        ">steady fan-out</text>",
    ] {
        assert!(html.contains(needle), "{needle} in the report");
    }
    for axis in ["time since start (s)", "latency (ms)", "deliveries/s", "connections"] {
        assert!(html.contains(&format!(">{axis}</text>")), "axis {axis}");
    }
    let _ = std::fs::remove_file(report);
}

/// What every scenario must report, whatever it does: a green verdict,
/// every client connected and checked to the end, nothing lost,
/// duplicated, reordered, stray or with the wrong payload.
fn assert_clean(v: &serde_json::Value) {
    assert_eq!(v["verdict"]["ok"], true, "{v}");
    assert_eq!(v["connected"], v["connections"], "{v}");
    for field in [
        "failed",
        "lost",
        "duplicated",
        "reordered",
        "payload_mismatch",
        "stray",
        "gave_up",
        "unpositioned",
        "failed_subscriptions",
        "api_errors",
        "publish_errors",
    ] {
        assert_eq!(v[field], 0, "{field}: {v}");
    }
}

fn loadgen_json(args: &[&str]) -> serde_json::Value {
    let (v, report) = run_loadgen(&format!("sy-{}", args[0]), args);
    let _ = std::fs::remove_file(report);
    v
}

#[test]
fn reconnect_wave_after_a_gateway_drain_loses_nothing() {
    let v = loadgen_json(&["reconnect-wave", "--connections", "300", "--publications", "90", "--rate", "30"]);
    assert_clean(&v);
    assert_eq!(v["connected"], 300, "{v}");
    assert_eq!(v["streams"], 600, "every subscription checked: {v}");
    // A drain moves clients with their positions: every one recovered,
    // nothing forgiven, every payload checked.
    assert_eq!((v["unrecovered"].as_u64(), v["forgiven"].as_u64()), (Some(0), Some(0)), "{v}");
    assert_eq!(v["payload_verified"], v["deliveries"], "{v}");
    // About half the clients were on the drained gateway; all came back.
    assert!(v["reconnects"].as_u64().unwrap() > 0, "{v}");
    assert!(v["reconnect_secs"].as_f64().is_some(), "every client came back: {v}");
}

#[test]
fn storm_alone_connects_everyone_and_reports_latency() {
    let v = loadgen_json(&["storm", "--connections", "400", "--storm-rate", "400"]);
    assert_clean(&v);
    assert_eq!(v["connected"], 400, "{v}");
    assert_eq!(v["streams"], 800, "every subscription positioned: {v}");
    assert_eq!(v["upgrade_ms"]["count"], 400, "{v}");
    assert_eq!(v["connect_ms"]["count"], 400, "{v}");
}

#[test]
fn chat_day_with_client_messages_presence_and_read_state_loses_nothing() {
    let v = loadgen_json(&[
        "chat",
        "--connections",
        "200",
        "--duration",
        "4",
        "--rate",
        "20",
        "--active-every",
        "2",
        "--msgs-per-min",
        "60",
        "--joins-per-sec",
        "10",
        "--join-secs",
        "1",
    ]);
    assert_clean(&v);
    assert_eq!(v["connected"], 200, "{v}");
    // Channel joins and leaves through the server API: every one reached
    // its user's connection (a subscribe push, an unsubscribe 2000), and
    // each joined stream was checked (assert_clean) until its leave.
    let calls = (v["join_calls"].as_u64().unwrap(), v["leave_calls"].as_u64().unwrap());
    assert!(calls.0 >= 20 && calls.1 >= 10, "{v}");
    assert_eq!((v["joins"].as_u64().unwrap(), v["leaves"].as_u64().unwrap()), calls, "{v}");
    assert!(v["client_publications"].as_u64().unwrap() > 0, "active users talked: {v}");
    assert!(v["publications"].as_u64().unwrap() > 0, "the backend synced read-state: {v}");
    // Every read-state publication reached its user's device(s) and was
    // checked against what the backend sent.
    assert!(v["payload_verified"].as_u64() >= v["publications"].as_u64(), "{v}");
    let phases: Vec<&str> = v["phases"].as_array().unwrap().iter().map(|p| p[0].as_str().unwrap()).collect();
    assert_eq!(phases, ["storm", "chat", "settle"]);
}

#[test]
fn router_crash_wave_is_explicit_resyncs_never_silent_loss() {
    let v = loadgen_json(&[
        "reconnect-wave",
        "--router",
        "--kill",
        "--connections",
        "200",
        "--publications",
        "60",
        "--rate",
        "20",
    ]);
    assert_clean(&v);
    assert_eq!(v["streams"], 400, "every subscription checked: {v}");
    // The new router has new epochs: subscribers are told, not left with a gap.
    assert!(v["unrecovered"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["payload_verified"], v["deliveries"], "{v}");
    assert!(v["reconnect_secs"].as_f64().is_some(), "{v}");
}

#[test]
fn fanout_with_a_client_publisher_through_the_gateway() {
    let v = loadgen_json(&[
        "fanout",
        "--client-publish",
        "--connections",
        "200",
        "--publications",
        "40",
        "--rate",
        "40",
    ]);
    assert_clean(&v);
    assert_eq!(v["streams"], 400, "every subscription checked: {v}");
    assert_eq!(v["publications"], 40, "{v}");
    assert!(v["deliveries"].as_u64().unwrap() >= 40, "{v}");
    // Nothing was forgiven: a plain fan-out has no reason for a resync.
    assert_eq!((v["unrecovered"].as_u64(), v["forgiven"].as_u64()), (Some(0), Some(0)), "{v}");
}
