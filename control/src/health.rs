//! What `/healthz` and `/livez` answer: a pure state, told what happened and
//! when, and asked with the current time (so tests use a fake clock).
//!
//! - `/healthz` (readiness, kube-proxy's meaning): 200 while the last change
//!   the source reported has been published; 503 when a change has been
//!   pending for longer than the bound, when the API has been unreachable for
//!   longer than the bound, or before the first publish. The body is JSON like
//!   kube-proxy's: `{"lastUpdated": …, "currentTime": …, "nodeEligible": true}`
//!   plus `"healthy"`, `"skipped"` (the entries the last model skips: objects
//!   and parts of objects), `"invalid"` (how many of those are invalid values,
//!   duplicates or clashes) and, when unhealthy, `"reason"`. Skipped objects
//!   never make it unhealthy: the rest is served.
//! - `/livez` (liveness): 200 while the main loop beats; 503 when it has not
//!   beaten for longer than its bound.

use std::time::Duration;

use jiff::Timestamp;
use serde_json::json;

/// See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthState {
    /// How long a change may stay unpublished, or the API unreachable.
    pub bound: Duration,
    /// How long the main loop may go without a beat.
    pub beat_bound: Duration,
    /// When the last publish succeeded.
    pub last_published: Option<Timestamp>,
    /// Since when a change (a model unlike the published one) waits.
    pub pending_since: Option<Timestamp>,
    /// Since when some watch has been failing (API source only).
    pub unreachable_since: Option<Timestamp>,
    /// The watches failing now.
    pub failing: Vec<String>,
    /// The main loop's last beat.
    pub last_beat: Timestamp,
    /// Entries the last model skips.
    pub skipped: usize,
    /// Errors of the last model (what `--strict` would refuse).
    pub invalid: usize,
}

impl HealthState {
    /// A state at `now`: nothing published yet, the loop just beaten.
    #[must_use]
    pub fn new(bound: Duration, beat_bound: Duration, now: Timestamp) -> Self {
        Self {
            bound,
            beat_bound,
            last_published: None,
            pending_since: None,
            unreachable_since: None,
            failing: Vec::new(),
            last_beat: now,
            skipped: 0,
            invalid: 0,
        }
    }

    /// The source reported a model that may differ from the published one.
    pub fn change_seen(&mut self, now: Timestamp) {
        self.pending_since.get_or_insert(now);
    }

    /// A snapshot was published at `now`: nothing pending.
    pub fn published(&mut self, now: Timestamp) {
        self.last_published = Some(now);
        self.pending_since = None;
    }

    /// The change turned out not to change the tables: nothing pending.
    pub fn unchanged(&mut self) {
        self.pending_since = None;
    }

    /// The watch of `kind` started (`true`) or stopped (`false`) failing.
    ///
    /// A watch that resumes without events says nothing, so one kind's
    /// recovery (events flow again) counts as the API's: Services may not
    /// change for hours after an outage that ended long ago.
    pub fn watch_failing(&mut self, kind: &str, failing: bool, now: Timestamp) {
        if failing {
            if !self.failing.iter().any(|k| k == kind) {
                self.failing.push(kind.to_owned());
            }
            self.unreachable_since.get_or_insert(now);
        } else {
            self.failing.clear();
            self.unreachable_since = None;
        }
    }

    /// The last model skips `skipped` entries, `invalid` of them for errors.
    pub fn skipped(&mut self, skipped: usize, invalid: usize) {
        self.skipped = skipped;
        self.invalid = invalid;
    }

    /// The main loop is alive at `now`.
    pub fn beat(&mut self, now: Timestamp) {
        self.last_beat = now;
    }

    /// `/healthz`: the status code and the JSON body.
    #[must_use]
    pub fn healthz(&self, now: Timestamp) -> (u16, String) {
        let over = |since: Timestamp| secs(now.duration_since(since)) > self.bound.as_secs_f64();
        let last = self
            .last_published
            .map_or_else(|| "never".to_owned(), |t| t.to_string());
        let reason = if let Some(since) = self.pending_since.filter(|t| over(*t)) {
            Some(format!(
                "change pending for {:.1} s; last publish at {last}",
                secs(now.duration_since(since))
            ))
        } else if let Some(since) = self.unreachable_since.filter(|t| over(*t)) {
            Some(format!(
                "API unreachable since {since} ({}); last publish at {last}",
                self.failing.join(", ")
            ))
        } else if self.last_published.is_none() {
            Some("nothing published yet".to_owned())
        } else {
            None
        };
        let mut body = json!({
            "lastUpdated": self.last_published.map(|t| t.to_string()),
            "currentTime": now.to_string(),
            "nodeEligible": true,
            "healthy": reason.is_none(),
            "skipped": self.skipped,
            "invalid": self.invalid,
        });
        if let (Some(reason), Some(map)) = (&reason, body.as_object_mut()) {
            map.insert("reason".to_owned(), reason.clone().into());
        }
        (
            if reason.is_none() { 200 } else { 503 },
            format!("{body}\n"),
        )
    }

    /// `/livez`: the status code and a short text body.
    #[must_use]
    pub fn livez(&self, now: Timestamp) -> (u16, String) {
        let quiet = secs(now.duration_since(self.last_beat));
        if quiet > self.beat_bound.as_secs_f64() {
            (
                503,
                format!(
                    "main loop stuck: no beat for {quiet:.1} s (since {})\n",
                    self.last_beat
                ),
            )
        } else {
            (200, "ok\n".to_owned())
        }
    }
}

fn secs(d: jiff::SignedDuration) -> f64 {
    d.as_secs_f64()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose

    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn state() -> HealthState {
        HealthState::new(Duration::from_secs(10), Duration::from_secs(20), at(0))
    }

    #[test]
    fn nothing_published_is_not_ready() {
        let (code, body) = state().healthz(at(1));
        assert_eq!(code, 503);
        assert!(body.contains("nothing published yet"), "{body}");
        assert!(body.contains("\"lastUpdated\":null"), "{body}");
    }

    #[test]
    fn published_is_ready() {
        let mut s = state();
        s.change_seen(at(1));
        s.published(at(2));
        let (code, body) = s.healthz(at(100));
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["lastUpdated"], at(2).to_string());
        assert_eq!(v["currentTime"], at(100).to_string());
        assert_eq!(v["nodeEligible"], true);
        assert_eq!(v["healthy"], true);
        assert_eq!(v["skipped"], 0);
    }

    #[test]
    fn skipped_objects_are_counted_but_stay_healthy() {
        let mut s = state();
        s.published(at(1));
        s.skipped(3, 1);
        let (code, body) = s.healthz(at(2));
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["skipped"], 3, "{body}");
        assert_eq!(v["invalid"], 1, "{body}");
        s.skipped(0, 0);
        let v: serde_json::Value = serde_json::from_str(&s.healthz(at(3)).1).unwrap();
        assert_eq!(v["skipped"], 0);
    }

    #[test]
    fn pending_change_past_the_bound_is_503_until_published() {
        let mut s = state();
        s.published(at(1));
        s.change_seen(at(5));
        s.change_seen(at(8)); // still pending since 5
        assert_eq!(s.healthz(at(15)).0, 200, "within the bound");
        let (code, body) = s.healthz(at(16));
        assert_eq!(code, 503);
        assert!(body.contains("change pending for 11.0 s"), "{body}");
        assert!(body.contains(&at(1).to_string()), "{body}");
        s.published(at(17));
        assert_eq!(s.healthz(at(18)).0, 200);
        s.change_seen(at(20));
        s.unchanged();
        assert_eq!(s.healthz(at(100)).0, 200, "a change that changed nothing");
    }

    #[test]
    fn unreachable_api_past_the_bound_is_503() {
        let mut s = state();
        s.published(at(1));
        s.watch_failing("services", true, at(2));
        s.watch_failing("endpointslices", true, at(3));
        assert_eq!(s.healthz(at(12)).0, 200, "within the bound");
        let (code, body) = s.healthz(at(13));
        assert_eq!(code, 503);
        assert!(body.contains("API unreachable since"), "{body}");
        assert!(body.contains("(services, endpointslices)"), "{body}");
        s.watch_failing("endpointslices", false, at(14));
        assert_eq!(
            s.healthz(at(14)).0,
            200,
            "one kind's events show the API is back"
        );
    }

    #[test]
    fn livez_follows_the_beat() {
        let mut s = state();
        assert_eq!(s.livez(at(20)).0, 200);
        assert_eq!(s.livez(at(21)).0, 503);
        s.beat(at(21));
        assert_eq!(s.livez(at(22)).0, 200);
    }
}
