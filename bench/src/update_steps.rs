//! Where an update's time goes: each timed change split at the moments
//! control and the gateway log, on one clock.
//!
//! Owns: reading control's `published generation=… took_ms=…` lines and
//! the gateway's `snapshot applied generation=…` lines (their RFC 3339
//! timestamps, CLOCK_REALTIME), moving them onto CLOCK_MONOTONIC (the
//! clock of the send times and of the sink's first packets) with one
//! offset read at the start, and the four steps of each change:
//!
//! 1. **control, before the build**: the change sent → control starts the
//!    publish that carries it (the watch event or the file read, the
//!    model, the coalescing);
//! 2. **control, publish**: the table built and the snapshot written
//!    (control's own `took_ms`);
//! 3. **gateway, apply**: published → the gateway's watcher swapped the
//!    new table in (wake-up, read, decode, apply);
//! 4. **forward**: applied → the first packet at the new backend port (a
//!    worker taking the table at its next batch, the probe's next packet,
//!    the way to the sink).
//!
//! A change is attributed to the first publish that started after it was
//! sent, and to that generation's apply. In a burst, that publish may have
//! started before this change was read, and a later one carries it: the
//! split then shows the later publish's wait as "forward". Log timestamps
//! are whole microseconds.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

/// One change split in four, ms.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Split {
    /// Sent → control starts the publish.
    pub control_wait_ms: f64,
    /// Control's publish.
    pub control_publish_ms: f64,
    /// Published → applied by the gateway.
    pub gateway_apply_ms: f64,
    /// Applied → first packet at the new backend.
    pub forward_ms: f64,
}

/// p50 and p99 of each step over the timed changes, ms.
#[derive(Debug, Clone, Serialize)]
pub struct Steps {
    /// Changes that could be attributed (a publish and an apply found).
    pub changes: usize,
    /// Per step: name, p50, p99.
    pub steps: Vec<(String, f64, f64)>,
    /// The floor under "forward": every probe's one-way latency, pktgen →
    /// gateway → sink, p50 and p99, ms (the sink's histogram).
    pub transit: Option<(f64, f64)>,
}

/// p50 and p99, ms, of the sink's `latency_ns` histogram (`[[value_ns,
/// count], …]`, values ascending); `None` when empty or not one.
pub fn transit_ms(hist: &serde_json::Value) -> Option<(f64, f64)> {
    let pairs: Vec<(u64, u64)> = hist
        .as_array()?
        .iter()
        .filter_map(|p| Some((p.get(0)?.as_u64()?, p.get(1)?.as_u64()?)))
        .collect();
    let total: u64 = pairs.iter().map(|p| p.1).sum();
    if total == 0 {
        return None;
    }
    let at = |q: f64| {
        let rank = ((q * total as f64).ceil() as u64).max(1);
        let mut acc = 0;
        pairs
            .iter()
            .find(|(_, c)| {
                acc += c;
                acc >= rank
            })
            .map_or(0.0, |(v, _)| *v as f64 / 1e6)
    };
    Some((at(0.5), at(0.99)))
}

/// A published generation in control's log: when it was logged (publish
/// done), ns on CLOCK_REALTIME, and how long the publish took.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Published {
    generation: u64,
    at_ns: i128,
    took_ns: i128,
}

/// Realtime − monotonic, ns, read now: add it to a CLOCK_MONOTONIC time to
/// compare it with a log timestamp.
pub fn realtime_offset_ns() -> i128 {
    let mono = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let real = rustix::time::clock_gettime(rustix::time::ClockId::Realtime);
    let ns =
        |t: rustix::time::Timespec| i128::from(t.tv_sec) * 1_000_000_000 + i128::from(t.tv_nsec);
    ns(real) - ns(mono)
}

/// The value of `key=` in a tracing line's fields.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    line[at..].split_whitespace().next()
}

/// The line's timestamp (its first word), ns since the epoch.
fn stamp_ns(line: &str) -> Option<i128> {
    let t: jiff::Timestamp = line.split_whitespace().next()?.parse().ok()?;
    Some(t.as_nanosecond())
}

fn published(log: &str) -> Vec<Published> {
    log.lines()
        .filter(|l| l.contains("clustergate_control: published "))
        .filter_map(|l| {
            Some(Published {
                generation: field(l, "generation")?.parse().ok()?,
                at_ns: stamp_ns(l)?,
                took_ns: (field(l, "took_ms")?.parse::<f64>().ok()? * 1e6) as i128,
            })
        })
        .collect()
}

/// (generation, ns) of each `snapshot applied` line of the gateway.
fn applied(log: &str) -> Vec<(u64, i128)> {
    log.lines()
        .filter(|l| l.contains("clustergate::gateway: snapshot applied"))
        .filter_map(|l| Some((field(l, "generation")?.parse().ok()?, stamp_ns(l)?)))
        .collect()
}

/// Each change's split: `sent` and `seen` are CLOCK_MONOTONIC ns (`seen`:
/// the first packet at its port or a later one), `offset` from
/// [`realtime_offset_ns`]. `None` for a change no publish or apply was
/// found for.
fn split(
    control: &[Published],
    gateway: &[(u64, i128)],
    offset: i128,
    sent: &[u64],
    seen: &[u64],
) -> Vec<Option<Split>> {
    let ms = |ns: i128| ns as f64 / 1e6;
    sent.iter()
        .zip(seen)
        .map(|(&s, &f)| {
            let s = i128::from(s) + offset;
            let f = i128::from(f) + offset;
            let p = control.iter().find(|p| p.at_ns - p.took_ns >= s)?;
            let (_, a) = gateway.iter().find(|(g, _)| *g >= p.generation)?;
            let start = p.at_ns - p.took_ns;
            Some(Split {
                control_wait_ms: ms(start - s),
                control_publish_ms: ms(p.took_ns),
                gateway_apply_ms: ms(a - p.at_ns),
                forward_ms: ms(f - a),
            })
        })
        .collect()
}

/// The steps of the timed changes, from the two logs.
///
/// # Errors
/// A log that cannot be read.
pub fn from_logs(
    control_log: &Path,
    gateway_log: &Path,
    offset: i128,
    sent: &[u64],
    seen: &[u64],
) -> Result<Steps> {
    let read =
        |p: &Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    let splits: Vec<Split> = split(
        &published(&read(control_log)?),
        &applied(&read(gateway_log)?),
        offset,
        sent,
        seen,
    )
    .into_iter()
    .flatten()
    .collect();
    let pick = |f: fn(&Split) -> f64| {
        let mut v: Vec<f64> = splits.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        (
            crate::update_latency::quantile(&v, 0.5),
            crate::update_latency::quantile(&v, 0.99),
        )
    };
    let steps = [
        (
            "control: change → publish starts",
            pick(|s| s.control_wait_ms),
        ),
        ("control: publish", pick(|s| s.control_publish_ms)),
        ("gateway: published → applied", pick(|s| s.gateway_apply_ms)),
        ("forward: applied → first packet", pick(|s| s.forward_ms)),
    ]
    .into_iter()
    .map(|(n, (p50, p99))| (n.to_owned(), p50, p99))
    .collect();
    Ok(Steps {
        changes: splits.len(),
        steps,
        transit: None,
    })
}

/// The human table.
pub fn table(s: &Steps) -> String {
    let mut out = format!(
        "where the time goes ({} changes; each step's own p50 and p99, so they do not add up to the total's):\n\n| step | p50 ms | p99 ms |\n|---|---|---|",
        s.changes
    );
    for (n, p50, p99) in &s.steps {
        out.push_str(&format!("\n| {n} | {p50:.2} | {p99:.2} |"));
    }
    if let Some((p50, p99)) = s.transit {
        out.push_str(&format!(
            "\n| (floor of forward: a probe's one-way latency, pktgen → sink) | {p50:.2} | {p99:.2} |"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTROL: &str = "\
2026-12-06T00:38:58.531906Z  INFO clustergate_control: published generation=1 frontends=20000 in_place=false took_ms=2365.41
2026-12-06T00:38:59.473676Z  INFO clustergate_control: published generation=2 frontends=20000 in_place=true took_ms=1.5
2026-12-06T00:38:59.480600Z  INFO clustergate_control: published generation=3 frontends=20000 in_place=true took_ms=1.0
";
    const GATEWAY: &str = "\
2026-12-06T00:38:58.955651Z  INFO clustergate_dataplane::snapshot: snapshot applied generation=1 previous=0 deltas=0 full=true took_ms=434.0
2026-12-06T00:38:58.955698Z  INFO clustergate::gateway: snapshot applied generation=1
2026-12-06T00:38:59.474774Z  INFO clustergate::gateway: snapshot applied generation=2
2026-12-06T00:38:59.482600Z  INFO clustergate::gateway: snapshot applied generation=3
";

    #[test]
    fn a_change_is_split_at_the_publish_after_it_and_that_generations_apply() {
        let c = published(CONTROL);
        assert_eq!(c.len(), 3);
        assert_eq!(c[1].generation, 2);
        assert_eq!(c[1].took_ns, 1_500_000);
        let g = applied(GATEWAY);
        assert_eq!(
            g.len(),
            3,
            "the gateway's own line, not the snapshot module's"
        );
        // A monotonic clock 1000 s behind: the change sent 0.5 ms before
        // generation 3's publish started (00:38:59.479600), seen 3 ms
        // after it was applied.
        let offset = 1_000_000_000_000i128;
        let start3 = stamp_ns("2026-12-06T00:38:59.479600Z").expect("stamp");
        let sent = (start3 - 500_000 - offset) as u64;
        let applied3 = stamp_ns("2026-12-06T00:38:59.482600Z").expect("stamp");
        let seen = (applied3 + 3_000_000 - offset) as u64;
        let s = split(&c, &g, offset, &[sent], &[seen]);
        let s = s[0].expect("attributed");
        assert!((s.control_wait_ms - 0.5).abs() < 1e-6, "{s:?}");
        assert!((s.control_publish_ms - 1.0).abs() < 1e-6, "{s:?}");
        assert!((s.gateway_apply_ms - 2.0).abs() < 1e-6, "{s:?}");
        assert!((s.forward_ms - 3.0).abs() < 1e-6, "{s:?}");
        // Sent after the last publish started: not attributed.
        let late = (start3 + 1 - offset) as u64;
        assert_eq!(split(&c, &g, offset, &[late], &[seen]), vec![None]);
    }

    #[test]
    fn transit_quantiles_come_from_the_sinks_histogram() {
        let h = serde_json::json!([[100_000, 50], [1_000_000, 49], [9_000_000, 1]]);
        assert_eq!(transit_ms(&h), Some((0.1, 1.0)));
        assert_eq!(transit_ms(&serde_json::json!([])), None);
        assert_eq!(transit_ms(&serde_json::json!(null)), None);
    }
}
