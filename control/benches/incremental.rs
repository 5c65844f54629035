//! Control's CPU per change of one manifest file, at 10 000 Services × 10
//! endpoints in 100 files of 100 Services (`clustergate-bench
//! update-latency --source manifest-dir`'s shape).
//!
//! Each iteration moves one endpoint of one Service in one file (alternating
//! between two versions of the file, so that every iteration is a change):
//! - `full_rebuild`: what `run` on a directory did before the incremental
//!   model, from the file's objects to the model: merge every file's
//!   objects, then [`build_model`] over all of them;
//! - `incremental`: [`IncrementalModel::set_source`] with the file's objects,
//!   then [`IncrementalModel::model`];
//! - `parse_file`: parsing the changed file's text whole ([`parse_manifest`]),
//!   as `run` did before;
//! - `parse_file_cached`: parsing it with the file's documents as last read
//!   ([`parse_manifest_cached`]): only the changed document is parsed;
//! - `file_event` and `file_event_before`: all of control's work from the
//!   file's inotify event to the model, the file read from disk included:
//!   [`ManifestDir::refresh`], [`IncrementalModel::sync_dir`] and
//!   [`IncrementalModel::model`]; before: reading and parsing the file whole,
//!   merging every file and [`build_model`];
//! - `table_spec`: [`clustergate_control::Model::table_spec`] of the model,
//!   which the publisher calls next (the same in both), and `service_specs`,
//!   the part of it that converts the frontends.
//!
//! `cargo bench -p clustergate-control --bench incremental`

#![allow(clippy::unwrap_used, clippy::expect_used)] // reason: a benchmark fails loudly on purpose

use std::hint::black_box;
use std::path::Path;

use clustergate_control::incremental::IncrementalModel;
use clustergate_control::manifest::{parse_manifest_cached, DocumentCache};
use clustergate_control::manifest_dir::{merge_files, ManifestDir};
use clustergate_control::model::{build_model, ModelOptions};
use clustergate_control::{parse_manifest, Objects};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use serde_json::{json, Value};

const FILES: u32 = 100;
const PER_FILE: u32 = 100;
const ENDPOINTS: u32 = 10;

fn endpoint_ip(n: u32) -> String {
    format!("198.{}.{}.{}", 18 + (n >> 16), (n >> 8) & 0xff, n & 0xff)
}

fn service(s: u32) -> Value {
    let vip = format!("198.19.{}.{}", s >> 8, s & 0xff);
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{s}"), "namespace": "bench"},
        "spec": {"type": "ClusterIP", "clusterIP": vip, "clusterIPs": [vip],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
    })
}

fn slice(s: u32, moved: bool) -> Value {
    let endpoints: Vec<Value> = (0..ENDPOINTS)
        .map(|e| {
            let n = if e == 0 && moved {
                FILES * PER_FILE * ENDPOINTS + s
            } else {
                s * ENDPOINTS + e
            };
            json!({"addresses": [endpoint_ip(n)], "conditions": {"ready": true}})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{s}-a"), "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": format!("svc-{s}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

/// The text of file `f`, with the endpoint of its Service `moved` (if any)
/// moved.
fn file_text(f: u32, moved: Option<u32>) -> String {
    let mut docs = Vec::new();
    for s in f * PER_FILE..(f + 1) * PER_FILE {
        docs.push(serde_norway::to_string(&service(s)).unwrap());
        docs.push(serde_norway::to_string(&slice(s, moved == Some(s))).unwrap());
    }
    docs.join("---\n")
}

fn name(f: u32) -> String {
    format!("svc-{f:03}.yaml")
}

fn bench(c: &mut Criterion) {
    let dir = Path::new("/etc/clustergate/manifests");
    let options = ModelOptions::default();
    let mut files: Vec<(String, Objects)> = (0..FILES)
        .map(|f| (name(f), parse_manifest(&file_text(f, None)).unwrap()))
        .collect();
    let changed = 37;
    let versions = [
        file_text(changed, None),
        file_text(changed, Some(changed * PER_FILE + 5)),
    ];
    let objects = [
        parse_manifest(&versions[0]).unwrap(),
        parse_manifest(&versions[1]).unwrap(),
    ];
    let mut inc = IncrementalModel::new(options.clone(), dir);
    for (n, o) in &files {
        inc.set_source(n, Some(o), None);
    }
    let full = build_model(
        &merge_files(dir, files.iter().map(|(n, o)| (n.as_str(), o, None))),
        &options,
    );
    assert_eq!(inc.model(), &full);
    assert_eq!(full.frontends.len(), (FILES * PER_FILE) as usize);

    let mut g = c.benchmark_group("manifest_dir_change");
    g.sample_size(20);
    let mut i = 0usize;
    g.bench_function("full_rebuild", |b| {
        b.iter(|| {
            i += 1;
            files[changed as usize].1 = objects[i % 2].clone();
            let merged = merge_files(dir, files.iter().map(|(n, o)| (n.as_str(), o, None)));
            black_box(build_model(&merged, &options));
        });
    });
    let changed_name = name(changed);
    let mut i = 0usize;
    g.bench_function("incremental", |b| {
        b.iter(|| {
            i += 1;
            inc.set_source(&changed_name, Some(&objects[i % 2]), None);
            black_box(inc.model().frontends.len());
        });
    });
    let mut i = 0usize;
    g.bench_function("parse_file", |b| {
        b.iter(|| {
            i += 1;
            black_box(parse_manifest(&versions[i % 2]).unwrap());
        });
    });
    let mut cache = DocumentCache::default();
    parse_manifest_cached(&versions[0], &mut cache).unwrap();
    let mut i = 0usize;
    g.bench_function("parse_file_cached", |b| {
        b.iter(|| {
            i += 1;
            black_box(parse_manifest_cached(&versions[i % 2], &mut cache).unwrap());
        });
    });
    // The directory on disk, read as `run` reads it.
    let disk = std::env::temp_dir().join(format!("clustergate-bench-inc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&disk);
    std::fs::create_dir_all(&disk).unwrap();
    for f in 0..FILES {
        std::fs::write(disk.join(name(f)), file_text(f, None)).unwrap();
    }
    let mut dir_files = ManifestDir::load(&disk).unwrap();
    let mut on_disk = IncrementalModel::new(options.clone(), &disk);
    on_disk.sync_dir(&dir_files, None);
    assert_eq!(on_disk.model().frontends.len(), (FILES * PER_FILE) as usize);
    let path = disk.join(&changed_name);
    let names = [changed_name.clone()];
    let mut i = 0usize;
    g.bench_function("file_event", |b| {
        b.iter_batched(
            || {
                i += 1;
                std::fs::write(&path, &versions[i % 2]).unwrap();
            },
            |()| {
                assert!(dir_files.refresh(&changed_name).unwrap());
                on_disk.sync_dir(&dir_files, Some(&names));
                black_box(on_disk.model().frontends.len());
            },
            BatchSize::PerIteration,
        );
    });
    let mut i = 0usize;
    g.bench_function("file_event_before", |b| {
        b.iter_batched(
            || {
                i += 1;
                std::fs::write(&path, &versions[i % 2]).unwrap();
            },
            |()| {
                let text = std::fs::read_to_string(&path).unwrap();
                files[changed as usize].1 = parse_manifest(&text).unwrap();
                let merged = merge_files(dir, files.iter().map(|(n, o)| (n.as_str(), o, None)));
                black_box(build_model(&merged, &options));
            },
            BatchSize::PerIteration,
        );
    });
    std::fs::remove_dir_all(&disk).unwrap();
    let model = inc.model().clone();
    g.bench_function("table_spec", |b| {
        b.iter(|| black_box(model.table_spec()));
    });
    g.bench_function("service_specs", |b| {
        b.iter(|| black_box(model.service_specs()));
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
