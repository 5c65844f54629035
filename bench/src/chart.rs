//! The SVG chart of a `compare` report: forwarded kpps and p99 latency per
//! dataplane, one group of bars per scenario, with min–max whiskers.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use crate::compare::{Dataplane, Report, Run, Stat};

fn color(d: Dataplane) -> RGBColor {
    match d {
        Dataplane::ClustergateSnat => RGBColor(0x1f, 0x77, 0xb4),
        Dataplane::ClustergateRouted => RGBColor(0x2c, 0xa0, 0x2c),
        Dataplane::ClustergateDsr => RGBColor(0x94, 0x67, 0xbd),
        Dataplane::Kernel => RGBColor(0xd6, 0x27, 0x28),
        Dataplane::KernelMasq => RGBColor(0xff, 0x7f, 0x0e),
        Dataplane::Bounce => RGBColor(0x7f, 0x7f, 0x7f),
    }
}

fn name(d: Dataplane) -> &'static str {
    match d {
        Dataplane::ClustergateSnat => "clustergate snat",
        Dataplane::ClustergateRouted => "clustergate routed",
        Dataplane::ClustergateDsr => "clustergate dsr",
        Dataplane::Kernel => "kernel (nftables DNAT)",
        Dataplane::KernelMasq => "kernel (DNAT + masquerade)",
        Dataplane::Bounce => "bounce (AF_XDP, no lookup)",
    }
}

/// Writes the chart of `r` to `path`.
///
/// # Errors
/// The file cannot be written.
pub fn svg(r: &Report, path: &Path) -> Result<()> {
    let e = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    let root = SVGBackend::new(path, (1100, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let (left, right) = root.split_horizontally(550);
    type Pick = fn(&Run) -> Stat;
    let panels: [(_, &str, Pick, f64); 2] = [
        (
            left,
            "forwarded kpps (median, min–max)",
            |r| r.forwarded_pps,
            1e-3,
        ),
        (right, "p99 one-way latency µs", |r| r.p99_us, 1.0),
    ];
    let groups = r.scenarios.len().max(1);
    // Every dataplane run in some scenario (one may skip some), in order.
    let mut dps: Vec<Dataplane> = Vec::new();
    for d in r
        .scenarios
        .iter()
        .flat_map(|s| s.runs.iter().map(|x| x.dataplane))
    {
        if !dps.contains(&d) {
            dps.push(d);
        }
    }
    let per = dps.len().max(1) as f64;
    for (area, title, pick, scale) in panels {
        let top = r
            .scenarios
            .iter()
            .flat_map(|s| s.runs.iter().map(|x| pick(x).max * scale))
            .fold(1.0f64, f64::max);
        let mut chart = ChartBuilder::on(&area)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(60)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..groups as f64, 0f64..top * 1.2)
            .map_err(|x| e(&x))?;
        let labels: Vec<String> = r
            .scenarios
            .iter()
            .map(|s| {
                format!(
                    "{} B {}f {}s {}w",
                    s.scenario.frame_size,
                    s.scenario.flows,
                    s.scenario.services,
                    s.scenario.workers
                )
            })
            .collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(groups * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - x.floor() - 0.5).abs() < 0.01 {
                    labels.get(i).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .draw()
            .map_err(|x| e(&x))?;
        for (j, &d) in dps.iter().enumerate() {
            let c = color(d);
            let bars: Vec<(f64, f64, Stat)> = r
                .scenarios
                .iter()
                .enumerate()
                .filter_map(|(g, s)| {
                    let run = s.runs.iter().find(|x| x.dataplane == d)?;
                    let x0 = g as f64 + 0.1 + 0.8 * j as f64 / per;
                    Some((x0, x0 + 0.8 / per * 0.9, pick(run)))
                })
                .collect();
            chart
                .draw_series(bars.iter().map(|&(x0, x1, s)| {
                    Rectangle::new([(x0, 0.0), (x1, s.median * scale)], c.filled())
                }))
                .map_err(|x| e(&x))?
                .label(name(d))
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], c.filled()));
            chart
                .draw_series(bars.iter().map(|&(x0, x1, s)| {
                    let m = (x0 + x1) / 2.0;
                    PathElement::new(vec![(m, s.min * scale), (m, s.max * scale)], BLACK)
                }))
                .map_err(|x| e(&x))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
