//! `--manifest DIR`: every `*.yaml`/`*.yml` file of a directory forms one
//! model. `show` on a directory prints what it prints for the files put
//! together; `run` re-reads only the file that changed, keeps a broken
//! file's last good objects (naming the file), drops the Services of a
//! deleted file, and names both files of an object found twice.

#![allow(clippy::unwrap_used, clippy::expect_used)] // reason: tests fail loudly on purpose

#[allow(dead_code)] // reason: shared with the other tests, which use more of it
mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use clustergate_dataplane::flow::{addr16, Proto};
use clustergate_dataplane::snapshot;
use support::daemon::{wait_generation, write_atomically, Daemon};

/// One Service `name` at `198.19.0.<ip>:80` with one endpoint
/// `198.18.1.<ip>:<port>`, as a List.
fn service(name: &str, ip: u8, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {{name: {name}, namespace: shop}}\n  spec:\n    clusterIP: 198.19.0.{ip}\n    ports: [{{name: http, port: 80, protocol: TCP}}]\n- apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata:\n    name: {name}-1\n    namespace: shop\n    labels: {{kubernetes.io/service-name: {name}}}\n  addressType: IPv4\n  ports: [{{name: http, port: {port}, protocol: TCP}}]\n  endpoints:\n  - addresses: [198.18.1.{ip}]\n"
    )
}

fn scratch(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("clustergate-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn show(manifest: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_clustergate-control"))
        .args(["show", "--output", "json", "--manifest"])
        .arg(manifest)
        .output()
        .unwrap()
}

#[test]
fn show_on_a_directory_equals_show_on_the_files_put_together() {
    let root = scratch("mdir-show");
    let dir = root.join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("b.yml"), service("cart", 2, 8082)).unwrap();
    std::fs::write(dir.join("a.yaml"), service("web", 1, 8081)).unwrap();
    // Not manifests: hidden, editor temp and backup files, other extensions.
    for junk in [".c.yaml", ".a.yaml.swp", "a.yaml~", "a.tmp", "notes.txt"] {
        std::fs::write(dir.join(junk), "  - [ not yaml\n").unwrap();
    }
    let single = root.join("all.yaml");
    std::fs::write(
        &single,
        service("web", 1, 8081) + "---\n" + &service("cart", 2, 8082),
    )
    .unwrap();

    let from_dir = show(&dir);
    let from_file = show(&single);
    assert!(
        from_dir.status.success(),
        "{}",
        String::from_utf8_lossy(&from_dir.stderr)
    );
    assert!(from_file.status.success());
    let json: serde_json::Value = serde_json::from_slice(&from_dir.stdout).unwrap();
    assert_eq!(json["frontends"].as_array().unwrap().len(), 2, "{json}");
    assert_eq!(
        String::from_utf8(from_dir.stdout).unwrap(),
        String::from_utf8(from_file.stdout).unwrap()
    );

    // A path that is neither a file nor a directory is refused by name.
    let fifo = root.join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let out = show(&fifo);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("neither a file nor a directory"), "{err}");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn the_same_object_in_two_files_is_reported_by_both_names() {
    let dir = scratch("mdir-dup");
    std::fs::write(dir.join("a.yaml"), service("web", 1, 8081)).unwrap();
    // web again (another address): the one of a.yaml, first in name order, wins.
    std::fs::write(dir.join("b.yaml"), service("web", 9, 9999)).unwrap();
    let out = show(&dir);
    assert_eq!(out.status.code(), Some(3), "skipped objects: exit 3");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let frontends = json["frontends"].as_array().unwrap();
    assert_eq!(frontends.len(), 1, "{json}");
    assert!(json.to_string().contains("198.19.0.1"), "{json}");
    assert!(!json.to_string().contains("198.19.0.9"), "{json}");
    let skipped = json["skipped"].to_string();
    let a = dir.join("a.yaml").display().to_string();
    let b = dir.join("b.yaml").display().to_string();
    assert!(
        skipped.contains("Service shop/web") && skipped.contains(&a) && skipped.contains(&b),
        "{skipped}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The backend port of the Service at `198.19.0.<ip>:80`, or None when the
/// snapshot has no such frontend.
fn backend_port(shm: &Path, ip: u8) -> Option<u16> {
    let t = snapshot::load_current(shm).unwrap().unwrap();
    let f = t.frontend(&addr16([198, 19, 0, ip].into()), 80, Proto::Tcp)?;
    let r = t.frontend_record(f).unwrap();
    assert_eq!(r.backends_len, 1);
    Some(r.backends()[0].port)
}

#[test]
fn run_on_a_directory_follows_each_file() {
    let root = scratch("mdir-run");
    let dir = root.join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    let shm = root.join("shm");
    write_atomically(&dir.join("a.yaml"), &service("web", 1, 8081));
    write_atomically(&dir.join("b.yaml"), &service("cart", 2, 8082));
    write_atomically(&dir.join("c.yaml"), &service("pay", 3, 8083));
    let mut d = Daemon {
        dir: root.clone(),
        child: None,
    };
    // A long poll period: changes must come from the watcher, not polling.
    d.child = Some(
        Command::new(env!("CARGO_BIN_EXE_clustergate-control"))
            .arg("run")
            .arg("--manifest")
            .arg(&dir)
            .arg("--shm-dir")
            .arg(&shm)
            .args(["--poll-ms", "60000"])
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_generation(&shm, 1);
    let ports = |shm: &Path| {
        (
            backend_port(shm, 1),
            backend_port(shm, 2),
            backend_port(shm, 3),
        )
    };
    assert_eq!(ports(&shm), (Some(8081), Some(8082), Some(8083)));

    // One file replaced by a rename: only its Service changes.
    write_atomically(&dir.join("b.yaml"), &service("cart", 2, 9082));
    wait_generation(&shm, 2);
    assert_eq!(ports(&shm), (Some(8081), Some(9082), Some(8083)));

    // One file written in place: read when closed.
    std::fs::write(dir.join("a.yaml"), service("web", 1, 9081)).unwrap();
    wait_generation(&shm, 3);
    assert_eq!(ports(&shm), (Some(9081), Some(9082), Some(8083)));

    // A broken file keeps its last objects; the other files still count.
    write_atomically(&dir.join("c.yaml"), &(service("pay", 3, 7777) + "  - [\n"));
    write_atomically(&dir.join("b.yaml"), &service("cart", 2, 10082));
    wait_generation(&shm, 4);
    assert_eq!(ports(&shm), (Some(9081), Some(10082), Some(8083)));

    // A deleted file's Service disappears.
    std::fs::remove_file(dir.join("a.yaml")).unwrap();
    wait_generation(&shm, 5);
    assert_eq!(ports(&shm), (None, Some(10082), Some(8083)));

    // A new file (moved in) adds its Service.
    let outside = root.join("new.yaml");
    std::fs::write(&outside, service("web", 1, 6081)).unwrap();
    std::fs::rename(&outside, dir.join("d.yaml")).unwrap();
    wait_generation(&shm, 6);
    assert_eq!(ports(&shm), (Some(6081), Some(10082), Some(8083)));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(snapshot::read_current(&shm).unwrap(), Some(6));

    let mut child = d.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    let c = dir.join("c.yaml").display().to_string();
    assert!(
        log.lines().any(|l| l.contains(&c)
            && l.contains("not valid YAML")
            && l.contains("last good objects are kept")),
        "the broken file is named: {log}"
    );
    assert!(log.contains("watching the manifest directory"), "{log}");
}

/// A ConfigMap volume: `web.yaml` links to `..data/web.yaml`, and an update
/// swaps the `..data` link to a new timestamped directory by a rename.
#[test]
fn run_follows_a_configmap_volume_update() {
    use std::os::unix::fs::symlink;
    let root = scratch("mdir-configmap");
    let dir = root.join("volume");
    std::fs::create_dir_all(dir.join("..2026_12_05_1")).unwrap();
    std::fs::write(dir.join("..2026_12_05_1/web.yaml"), service("web", 1, 8081)).unwrap();
    symlink("..2026_12_05_1", dir.join("..data")).unwrap();
    symlink("..data/web.yaml", dir.join("web.yaml")).unwrap();
    let shm = root.join("shm");
    let mut d = Daemon {
        dir: root.clone(),
        child: None,
    };
    d.child = Some(
        Command::new(env!("CARGO_BIN_EXE_clustergate-control"))
            .arg("run")
            .arg("--manifest")
            .arg(&dir)
            .arg("--shm-dir")
            .arg(&shm)
            .args(["--poll-ms", "60000"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_generation(&shm, 1);
    assert_eq!(backend_port(&shm, 1), Some(8081));

    std::fs::create_dir_all(dir.join("..2026_12_05_2")).unwrap();
    std::fs::write(dir.join("..2026_12_05_2/web.yaml"), service("web", 1, 9081)).unwrap();
    symlink("..2026_12_05_2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    wait_generation(&shm, 2);
    assert_eq!(backend_port(&shm, 1), Some(9081));
}
