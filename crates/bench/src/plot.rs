//! Plots of a scenario's time series, drawn to PNG next to its JSON.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

/// Named series of (seconds since start, value) points, in one chart panel.
#[derive(Debug, Clone, Default)]
pub struct Panel {
    /// The panel title.
    pub title: String,
    /// What the y axis measures.
    pub y_label: String,
    /// The series, by name.
    pub series: BTreeMap<String, Vec<(f64, f64)>>,
}

impl Panel {
    /// An empty panel.
    pub fn new(title: &str, y_label: &str) -> Self {
        Self {
            title: title.to_owned(),
            y_label: y_label.to_owned(),
            series: BTreeMap::new(),
        }
    }

    /// Appends a point to series `name`.
    pub fn push(&mut self, name: &str, t: f64, value: f64) {
        self.series
            .entry(name.to_owned())
            .or_default()
            .push((t, value));
    }
}

/// Draws the panels stacked vertically into `path`.
pub fn draw(path: &Path, title: &str, panels: &[Panel]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let height = 40 + 300 * u32::try_from(panels.len().max(1))?;
    let root = BitMapBackend::new(path, (1000, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 24))?;
    let areas = root.split_evenly((panels.len().max(1), 1));
    for (panel, area) in panels.iter().zip(areas.iter()) {
        let points = panel.series.values().flatten();
        let x_max = points.clone().map(|p| p.0).fold(1.0_f64, f64::max);
        let y_max = points.map(|p| p.1).fold(1.0_f64, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc(&panel.y_label)
            .draw()?;
        for (index, (name, points)) in panel.series.iter().enumerate() {
            let color = Palette99::pick(index).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
