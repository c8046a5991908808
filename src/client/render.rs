//! What a command prints: a table or `key: value` lines for people, JSON for programs
//! (`--output json`). Commands build a `Report` holding both; `print` picks one.

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub(crate) enum OutputFormat {
    #[default]
    Table,
    Json,
}

#[derive(Debug, Clone)]
pub(super) enum Human {
    Table {
        columns: Vec<&'static str>,
        rows: Vec<Vec<String>>,
        /// Lines after the table (e.g. the next page's token).
        footer: Vec<String>,
    },
    Fields(Vec<(String, String)>),
    Message(String),
}

#[derive(Debug, Clone)]
pub(super) struct Report {
    pub json: Value,
    pub human: Human,
    /// False when the answer itself means failure (Probe not ready, capabilities not
    /// confirmed): printed as usual, then the command exits non-zero.
    pub ok: bool,
}

impl Report {
    pub(super) fn message(text: impl Into<String>, json: Value) -> Report {
        Report {
            json,
            human: Human::Message(text.into()),
            ok: true,
        }
    }

    pub(super) fn fields(fields: Vec<(&str, String)>, json: Value) -> Report {
        Report {
            json,
            human: Human::Fields(
                fields
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
            ),
            ok: true,
        }
    }

    pub(super) fn table(
        columns: Vec<&'static str>,
        rows: Vec<Vec<String>>,
        footer: Vec<String>,
        json: Value,
    ) -> Report {
        Report {
            json,
            human: Human::Table {
                columns,
                rows,
                footer,
            },
            ok: true,
        }
    }

    /// A one-column table of capability names (identity, controller and node alike).
    pub(super) fn capabilities(names: Vec<String>) -> Report {
        let rows = names.iter().map(|n| vec![n.clone()]).collect();
        Report::table(
            vec!["CAPABILITY"],
            rows,
            vec![],
            serde_json::json!({ "capabilities": names }),
        )
    }

    pub(super) fn failed_if(mut self, failed: bool) -> Report {
        self.ok = !failed;
        self
    }
}

pub(super) fn render(report: &Report, format: OutputFormat) -> String {
    match format {
        OutputFormat::Json => {
            let mut s = serde_json::to_string_pretty(&report.json).expect("JSON values serialize");
            s.push('\n');
            s
        }
        OutputFormat::Table => match &report.human {
            Human::Table {
                columns,
                rows,
                footer,
            } => {
                let mut s = table(columns, rows);
                for line in footer {
                    s.push_str(line);
                    s.push('\n');
                }
                s
            }
            Human::Fields(fields) => {
                let width = fields
                    .iter()
                    .map(|(k, _)| k.chars().count())
                    .max()
                    .unwrap_or(0);
                fields
                    .iter()
                    .map(|(k, v)| {
                        format!("{k:<width$}  {v}\n", width = width + 1, k = format!("{k}:"))
                    })
                    .collect()
            }
            Human::Message(m) => format!("{m}\n"),
        },
    }
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
pub(super) fn table(columns: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = columns.iter().map(|c| c.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                out.push_str(cell);
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
        out
    };
    let mut s = line(columns.to_vec());
    for row in rows {
        s.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    s
}

/// `a=1,b=2` (sorted), or `-` when empty.
pub(super) fn map_text(map: &std::collections::BTreeMap<String, String>) -> String {
    if map.is_empty() {
        return "-".into();
    }
    map.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Seconds since the epoch → `2026-11-22T11:35:10Z`.
pub(super) fn timestamp(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(
            &["ID", "SIZE"],
            &[
                vec!["a".into(), "1 GiB".into()],
                vec!["longer".into(), "2".into()],
            ],
        );
        assert_eq!(t, "ID      SIZE\na       1 GiB\nlonger  2\n");
    }

    #[test]
    fn timestamps() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(timestamp(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(timestamp(1_795_000_000), "2026-11-18T11:06:40Z");
    }
}
