//! What `run` measures: the Prometheus metrics served at `--metrics` and the
//! health state served at `--health`, both fed by [`Telemetry`].
//!
//! Metric names are kube-proxy's after our prefix `clustergate_` (kube-proxy's
//! is `kubeproxy_`) where the meaning is the same; see `docs/operations.md`.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use clustergate_control::kube_source::WatchEvent;
use clustergate_control::model::{kind_label, KINDS};
use clustergate_control::{Model, Objects};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, linear_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::health::HealthState;

/// The annotation the EndpointSlice controller sets to the time of the
/// change (of a Pod or Service) that made it write the slice.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// Histograms by label set, all with the same buckets.
type HistogramFamily = Family<Vec<(String, String)>, Histogram, fn() -> Histogram>;

/// The metrics; the handles are atomics shared with the registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    sync_duration: Histogram,
    sync_latency: HistogramFamily,
    programming_duration: Histogram,
    service_changes: Counter,
    endpoint_changes: Counter,
    last_sync: Gauge<f64, AtomicU64>,
    watch_restarts: Counter,
    generation: Gauge,
    frontends: Family<Vec<(String, String)>, Gauge>,
    skipped: Family<Vec<(String, String)>, Gauge>,
}

impl Metrics {
    /// The metrics, registered under `clustergate_`.
    #[must_use]
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("clustergate");
        // kube-proxy's buckets for both histograms.
        let sync_duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let programming_duration = Histogram::new(
            linear_buckets(0.25, 0.25, 2)
                .chain(linear_buckets(1.0, 1.0, 59))
                .chain(linear_buckets(60.0, 5.0, 12))
                .chain(linear_buckets(300.0, 10.0, 12)),
        );
        let metrics = Self {
            registry: Registry::default(),
            sync_duration,
            sync_latency: Family::new_with_constructor(sync_latency_histogram),
            programming_duration,
            service_changes: Counter::default(),
            endpoint_changes: Counter::default(),
            last_sync: Gauge::default(),
            watch_restarts: Counter::default(),
            generation: Gauge::default(),
            frontends: Family::default(),
            skipped: Family::default(),
        };
        registry.register(
            "sync_proxy_rules_duration_seconds",
            "Time to build and publish one table snapshot",
            metrics.sync_duration.clone(),
        );
        registry.register(
            "control_sync_latency_seconds",
            "From the source reporting a change (the manifest read changed, or the first API \
             watch event after a build) to the publish that includes it, by source (manifest, api)",
            metrics.sync_latency.clone(),
        );
        registry.register(
            "network_programming_duration_seconds",
            "From an EndpointSlice's last-change-trigger-time to the publish that includes it",
            metrics.programming_duration.clone(),
        );
        registry.register(
            "service_changes",
            "Services added, changed or removed, as seen by the source",
            metrics.service_changes.clone(),
        );
        registry.register(
            "endpoint_changes",
            "EndpointSlices added, changed or removed, as seen by the source",
            metrics.endpoint_changes.clone(),
        );
        registry.register(
            "sync_proxy_rules_last_timestamp_seconds",
            "Unix time of the last successful publish",
            metrics.last_sync.clone(),
        );
        registry.register(
            "watch_restarts",
            "API watches that failed or expired and were restarted",
            metrics.watch_restarts.clone(),
        );
        registry.register(
            "frontends",
            "Frontends of the last model published, by kind (clusterIP, nodePort, externalIP, loadBalancer)",
            metrics.frontends.clone(),
        );
        registry.register(
            "control_objects_skipped",
            "Objects and parts of objects skipped by the last model built, by kind (Service, \
             EndpointSlice, Node, …) and reason (a short label: invalid_address, invalid_value, \
             duplicate, conflict, not_proxied, …)",
            metrics.skipped.clone(),
        );
        registry.register(
            "snapshot_generation",
            "Generation of the last published snapshot",
            metrics.generation.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// The metrics in the text exposition format (OpenMetrics).
    #[must_use]
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            out = format!("# encoding failed: {e}\n");
        }
        out
    }
}

/// The buckets of `clustergate_control_sync_latency_seconds`: 1 ms doubling
/// to about 16 s, as `sync_proxy_rules_duration_seconds`, since a latency
/// includes `--min-sync-period-ms` and the coalescing of bursts.
fn sync_latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The objects of the previous look, to count what changed.
#[derive(Debug, Default)]
pub struct ChangeTracker {
    services: BTreeMap<(String, String), Service>,
    slices: BTreeMap<(String, String), EndpointSlice>,
}

fn key(meta: &ObjectMeta) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Replaces `old` with `new` and counts the keys added, changed or removed.
fn diff<T: PartialEq>(
    old: &mut BTreeMap<(String, String), T>,
    new: BTreeMap<(String, String), T>,
) -> u64 {
    let mut changed = old.keys().filter(|k| !new.contains_key(*k)).count() as u64;
    changed += new.iter().filter(|(k, v)| old.get(*k) != Some(*v)).count() as u64;
    *old = new;
    changed
}

impl ChangeTracker {
    /// Takes the objects of one look and returns (services, slices) changed
    /// since the previous one.
    pub fn observe(&mut self, objects: &Objects) -> (u64, u64) {
        let services = objects
            .services
            .iter()
            .map(|s| (key(&s.metadata), s.clone()))
            .collect();
        let slices = objects
            .slices
            .iter()
            .map(|s| (key(&s.metadata), s.clone()))
            .collect();
        (
            diff(&mut self.services, services),
            diff(&mut self.slices, slices),
        )
    }
}

/// The trigger times of `slices` newer than `after` (all when `None`).
#[must_use]
pub fn trigger_times(slices: &[EndpointSlice], after: Option<Timestamp>) -> Vec<Timestamp> {
    slices
        .iter()
        .filter_map(|s| {
            s.metadata
                .annotations
                .as_ref()?
                .get(TRIGGER_TIME_ANNOTATION)
        })
        .filter_map(|v| v.parse::<Timestamp>().ok())
        .filter(|t| after.is_none_or(|a| *t > a))
        .collect()
}

/// Metrics and health, shared by the main loop and the HTTP servers.
#[derive(Debug)]
pub struct Telemetry {
    pub metrics: Metrics,
    health: Mutex<HealthState>,
    tracker: Mutex<ChangeTracker>,
    /// Trigger times of the slices of the last look newer than the last publish.
    triggers: Mutex<Vec<Timestamp>>,
    /// Every (kind, reason) of `clustergate_control_objects_skipped` set so far.
    skipped_labels: Mutex<std::collections::BTreeSet<(String, String)>>,
    /// The `source` label of `clustergate_control_sync_latency_seconds`.
    source: &'static str,
    /// When the source reported the first change not yet in a build.
    change_pending: Mutex<Option<Instant>>,
    /// When the source reported the first change of the build in progress.
    sync_started: Mutex<Option<Instant>>,
}

fn source_label(source: &str) -> Vec<(String, String)> {
    vec![("source".to_owned(), source.to_owned())]
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Telemetry {
    /// See [`HealthState::new`]; `source` (`manifest` or `api`) labels the
    /// sync latency, whose series exists from the start.
    #[must_use]
    pub fn new(bound: Duration, beat_bound: Duration, source: &'static str) -> Self {
        let metrics = Metrics::new();
        drop(metrics.sync_latency.get_or_create(&source_label(source)));
        Self {
            metrics,
            source,
            change_pending: Mutex::new(None),
            sync_started: Mutex::new(None),
            health: Mutex::new(HealthState::new(bound, beat_bound, Timestamp::now())),
            tracker: Mutex::new(ChangeTracker::default()),
            triggers: Mutex::new(Vec::new()),
            skipped_labels: Mutex::new(std::collections::BTreeSet::new()),
        }
    }

    /// The source reported a change: the sync latency of the publish that
    /// includes it starts now, unless an earlier change is still pending.
    pub fn source_changed(&self) {
        lock(&self.change_pending).get_or_insert_with(Instant::now);
    }

    /// The source looked at `objects` (a build starts): counts the changes and, with
    /// `triggers`, notes the slices' trigger times newer than the last publish.
    pub fn objects_seen(&self, objects: &Objects, triggers: bool) {
        let pending = lock(&self.change_pending).take();
        *lock(&self.sync_started) = Some(pending.unwrap_or_else(Instant::now));
        let (services, slices) = lock(&self.tracker).observe(objects);
        self.metrics.service_changes.inc_by(services);
        self.metrics.endpoint_changes.inc_by(slices);
        if triggers {
            let last = lock(&self.health).last_published;
            *lock(&self.triggers) = trigger_times(&objects.slices, last);
        }
    }

    /// A build starts from a source that counted its changed Services and
    /// EndpointSlices itself (the incremental model's sources):
    /// [`Telemetry::objects_seen`] without comparing every object.
    /// `applied`: the EndpointSlices applied since the last build, whose
    /// trigger times newer than the last publish are noted.
    pub fn changes_seen(&self, services: u64, slices: u64, applied: Option<&[EndpointSlice]>) {
        let pending = lock(&self.change_pending).take();
        *lock(&self.sync_started) = Some(pending.unwrap_or_else(Instant::now));
        self.metrics.service_changes.inc_by(services);
        self.metrics.endpoint_changes.inc_by(slices);
        if let Some(applied) = applied {
            let last = lock(&self.health).last_published;
            *lock(&self.triggers) = trigger_times(applied, last);
        }
    }

    /// A model that may differ from the published one is about to be published.
    pub fn change_seen(&self) {
        lock(&self.health).change_seen(Timestamp::now());
    }

    /// `generation` was published; building and publishing it took `took`.
    pub fn published(&self, generation: u64, took: Duration) {
        let now = Timestamp::now();
        self.metrics.sync_duration.observe(took.as_secs_f64());
        if let Some(t) = lock(&self.sync_started).take() {
            self.metrics
                .sync_latency
                .get_or_create(&source_label(self.source))
                .observe(t.elapsed().as_secs_f64());
        }
        self.metrics
            .last_sync
            .set(now.as_millisecond() as f64 / 1e3);
        for t in lock(&self.triggers).drain(..) {
            let latency = now.duration_since(t).as_secs_f64();
            if latency >= 0.0 {
                self.metrics.programming_duration.observe(latency);
            }
        }
        lock(&self.health).published(now);
        // Last, so that a scraper that sees this generation sees all of it.
        self.metrics
            .generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
    }

    /// The frontends of `model`, just published (or unchanged), by kind.
    pub fn frontends(&self, model: &Model) {
        let mut counts = [0usize; KINDS.len()];
        for f in &model.frontends {
            if let Some(i) = KINDS.iter().position(|&k| k == f.kind) {
                counts[i] += 1;
            }
        }
        for (kind, n) in KINDS.into_iter().zip(counts) {
            self.metrics
                .frontends
                .get_or_create(&vec![("kind".to_owned(), kind_label(kind).to_owned())])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// What the last model built skips, by (kind, reason label); a pair no
    /// longer skipped falls to 0. Also tells `/healthz`.
    pub fn skipped(&self, model: &Model) {
        let mut counts: BTreeMap<(String, String), i64> = BTreeMap::new();
        for s in &model.skipped {
            *counts
                .entry((s.kind().to_owned(), s.label.to_owned()))
                .or_default() += 1;
        }
        let mut known = lock(&self.skipped_labels);
        for key in known.iter() {
            counts.entry(key.clone()).or_default();
        }
        for ((kind, reason), n) in &counts {
            self.metrics
                .skipped
                .get_or_create(&vec![
                    ("kind".to_owned(), kind.clone()),
                    ("reason".to_owned(), reason.clone()),
                ])
                .set(*n);
        }
        known.extend(counts.into_keys());
        lock(&self.health).skipped(model.skipped.len(), model.errors.len());
    }

    /// The change did not change the tables.
    pub fn unchanged(&self) {
        lock(&self.health).unchanged();
    }

    /// A watch of the API source failed, recovered or expired.
    pub fn watch(&self, event: WatchEvent) {
        let now = Timestamp::now();
        match event {
            WatchEvent::Failed(kind) => {
                self.metrics.watch_restarts.inc();
                lock(&self.health).watch_failing(kind, true, now);
            }
            WatchEvent::Recovered(kind) => lock(&self.health).watch_failing(kind, false, now),
            WatchEvent::Expired(_) => {
                self.metrics.watch_restarts.inc();
            }
        }
    }

    /// The main loop is alive.
    pub fn beat(&self) {
        lock(&self.health).beat(Timestamp::now());
    }

    /// `/healthz` now.
    pub fn healthz(&self) -> (u16, String) {
        lock(&self.health).healthz(Timestamp::now())
    }

    /// `/livez` now.
    pub fn livez(&self) -> (u16, String) {
        lock(&self.health).livez(Timestamp::now())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose

    use super::*;

    fn slice(name: &str, trigger: Option<&str>) -> EndpointSlice {
        let mut s = EndpointSlice::default();
        s.metadata.namespace = Some("ns".into());
        s.metadata.name = Some(name.into());
        if let Some(t) = trigger {
            s.metadata.annotations =
                Some([(TRIGGER_TIME_ANNOTATION.to_owned(), t.to_owned())].into());
        }
        s
    }

    #[test]
    fn changes_are_counted_per_object() {
        let mut tracker = ChangeTracker::default();
        let mut objects = Objects {
            services: vec![Service::default()],
            slices: vec![slice("a", None), slice("b", None)],
            ..Objects::default()
        };
        assert_eq!(tracker.observe(&objects), (1, 2));
        assert_eq!(tracker.observe(&objects), (0, 0));
        objects.slices[1] = slice("b", Some("2026-01-01T00:00:00Z"));
        objects.slices.remove(0);
        assert_eq!(tracker.observe(&objects), (0, 2));
    }

    #[test]
    fn only_newer_trigger_times() {
        let slices = [
            slice("a", Some("2026-01-01T00:00:00Z")),
            slice("b", Some("2026-01-01T00:00:10Z")),
            slice("c", Some("not a time")),
            slice("d", None),
        ];
        assert_eq!(trigger_times(&slices, None).len(), 2);
        let after: Timestamp = "2026-01-01T00:00:05Z".parse().unwrap();
        assert_eq!(
            trigger_times(&slices, Some(after)),
            vec!["2026-01-01T00:00:10Z".parse::<Timestamp>().unwrap()]
        );
    }

    #[test]
    fn names_carry_the_prefix() {
        let m = Metrics::new();
        m.generation.set(3);
        let text = m.encode();
        for name in [
            "clustergate_sync_proxy_rules_duration_seconds_count",
            "clustergate_network_programming_duration_seconds_count",
            "clustergate_service_changes_total",
            "clustergate_endpoint_changes_total",
            "clustergate_sync_proxy_rules_last_timestamp_seconds",
            "clustergate_watch_restarts_total",
            "clustergate_snapshot_generation 3",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }

    #[test]
    fn sync_latency_runs_from_the_first_change_to_the_publish() {
        let t = Telemetry::new(Duration::from_secs(10), Duration::from_secs(10), "api");
        let text = t.metrics.encode();
        assert!(
            text.contains("clustergate_control_sync_latency_seconds_count{source=\"api\"} 0"),
            "the series exists before the first publish:\n{text}"
        );
        t.source_changed();
        std::thread::sleep(Duration::from_millis(30));
        t.source_changed(); // a later change of the same build: not a new start
        t.objects_seen(&Objects::default(), false);
        t.published(1, Duration::from_millis(1));
        // A publish without a new build observes nothing more.
        t.published(2, Duration::from_millis(1));
        let text = t.metrics.encode();
        assert!(
            text.contains("clustergate_control_sync_latency_seconds_count{source=\"api\"} 1"),
            "{text}"
        );
        let sum = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("clustergate_control_sync_latency_seconds_sum{source=\"api\"} ")
            })
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap();
        assert!((0.03..5.0).contains(&sum), "{sum}");
    }

    #[test]
    fn skipped_objects_are_a_gauge_that_falls_back() {
        use clustergate_control::{label, Skipped};
        let t = Telemetry::new(Duration::from_secs(10), Duration::from_secs(10), "manifest");
        let mut model = Model {
            skipped: vec![
                Skipped::new("Service a/b", label::INVALID_ADDRESS, "spec.clusterIP: x"),
                Skipped::new("Service a/c", label::INVALID_ADDRESS, "spec.clusterIP: y"),
                Skipped::new(
                    "EndpointSlice a/d",
                    label::DUPLICATE,
                    "appears more than once",
                ),
            ],
            ..Model::default()
        };
        t.skipped(&model);
        let text = t.metrics.encode();
        for line in [
            "# TYPE clustergate_control_objects_skipped gauge",
            "clustergate_control_objects_skipped{kind=\"Service\",reason=\"invalid_address\"} 2",
            "clustergate_control_objects_skipped{kind=\"EndpointSlice\",reason=\"duplicate\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        model.skipped.truncate(1);
        t.skipped(&model);
        let text = t.metrics.encode();
        for line in [
            "clustergate_control_objects_skipped{kind=\"Service\",reason=\"invalid_address\"} 1",
            "clustergate_control_objects_skipped{kind=\"EndpointSlice\",reason=\"duplicate\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        let body = t.healthz().1;
        assert!(body.contains("\"skipped\":1"), "{body}");
    }
}
