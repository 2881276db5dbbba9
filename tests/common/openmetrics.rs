//! A strict parser of the OpenMetrics text format (what Prometheus scrapes), for tests: it
//! refuses anything a scraper could misread instead of guessing.
//!
//! Checked: every sample belongs to a family declared by `# TYPE` before it, with a suffix its
//! type allows; a family is declared once and its samples are contiguous; `# UNIT` matches the
//! name's suffix; label names are valid and unique, values properly quoted and escaped; no
//! series appears twice; values are numbers; histograms have increasing `le` bounds,
//! non-decreasing cumulative counts, a `+Inf` bucket equal to `_count`, and a `_sum`; the
//! exposition ends with `# EOF`.

use std::collections::{BTreeMap, BTreeSet};

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A metric family.
#[derive(Debug, Clone, Default)]
pub struct Family {
    pub name: String,
    pub kind: String,
    pub help: String,
    pub unit: Option<String>,
    pub samples: Vec<Sample>,
}

/// A parsed exposition.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    pub families: BTreeMap<String, Family>,
}

impl Exposition {
    /// Samples named `name` whose labels include every pair of `labels`.
    pub fn find(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.families
            .values()
            .flat_map(|f| f.samples.iter())
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// The value of the one sample named `name` with these labels; `None` if there is none.
    /// Panics if several match.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found = self.find(name, labels);
        assert!(
            found.len() <= 1,
            "{name}{labels:?} matches {} samples",
            found.len()
        );
        found.first().map(|s| s.value)
    }

    pub fn family(&self, name: &str) -> Option<&Family> {
        self.families.get(name)
    }
}

fn suffixes(kind: &str) -> Result<&'static [&'static str], String> {
    Ok(match kind {
        "counter" => &["_total", "_created"],
        "gauge" | "unknown" => &[""],
        "histogram" => &["_bucket", "_count", "_sum", "_created"],
        "gaugehistogram" => &["_bucket", "_gcount", "_gsum"],
        "summary" => &["", "_count", "_sum", "_created"],
        "info" => &["_info"],
        "stateset" => &[""],
        other => return Err(format!("unknown metric type {other:?}")),
    })
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_value(raw: &str) -> Result<f64, String> {
    match raw {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => raw
            .parse::<f64>()
            .map_err(|_| format!("value {raw:?} is not a number")),
    }
}

/// Parses `{a="x",b="y"}` at the start of `rest`; returns the labels and what follows.
fn parse_labels(rest: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut s = rest.strip_prefix('{').ok_or("labels must start with {")?;
    if let Some(after) = s.strip_prefix('}') {
        return Ok((labels, after));
    }
    loop {
        let eq = s.find('=').ok_or("label without =")?;
        let name = &s[..eq];
        if !valid_label_name(name) {
            return Err(format!("invalid label name {name:?}"));
        }
        s = s[eq + 1..]
            .strip_prefix('"')
            .ok_or_else(|| format!("label {name} value is not quoted"))?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err(format!("label {name} value is not terminated")),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape {other:?} in label {name}")),
                },
                Some((_, '\n')) => return Err(format!("raw newline in label {name}")),
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name} repeated"));
        }
        s = &s[end + 1..];
        if let Some(after) = s.strip_prefix('}') {
            return Ok((labels, after));
        }
        s = s
            .strip_prefix(',')
            .ok_or("labels must be separated by commas")?;
    }
}

/// Parses and validates an exposition.
pub fn parse(text: &str) -> Result<Exposition, String> {
    let mut out = Exposition::default();
    let Some(body) = text.strip_suffix("# EOF\n") else {
        return Err("the exposition must end with \"# EOF\\n\"".into());
    };
    let mut current: Option<String> = None;
    let mut closed: BTreeSet<String> = BTreeSet::new();
    let mut series: BTreeSet<String> = BTreeSet::new();
    for (n, line) in body.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let keyword = parts.next().unwrap_or("");
            let name = parts
                .next()
                .ok_or_else(|| at("metadata without a name".into()))?;
            let text = parts.next().unwrap_or("");
            if !valid_name(name) {
                return Err(at(format!("invalid metric name {name:?}")));
            }
            if current.as_deref() != Some(name) {
                if let Some(previous) = current.take() {
                    closed.insert(previous);
                }
                if closed.contains(name) || out.families.contains_key(name) {
                    return Err(at(format!("family {name} declared twice or interleaved")));
                }
                out.families.insert(
                    name.to_string(),
                    Family {
                        name: name.to_string(),
                        kind: "unknown".to_string(),
                        ..Default::default()
                    },
                );
                current = Some(name.to_string());
            }
            let family = out.families.get_mut(name).unwrap();
            match keyword {
                "TYPE" => {
                    suffixes(text).map_err(at)?;
                    family.kind = text.to_string();
                }
                "HELP" => family.help = text.to_string(),
                "UNIT" => {
                    if !name.ends_with(&format!("_{text}")) {
                        return Err(at(format!("name does not end with its unit {text}")));
                    }
                    family.unit = Some(text.to_string());
                }
                other => return Err(at(format!("unknown metadata {other:?}"))),
            }
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            return Err(at("stray comment or empty line".into()));
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| at("sample without a value".into()))?;
        let name = &line[..name_end];
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(at)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut fields = rest
            .strip_prefix(' ')
            .ok_or_else(|| at("no space before the value".into()))?
            .split(' ');
        let value = parse_value(fields.next().unwrap_or("")).map_err(at)?;
        if let Some(timestamp) = fields.next() {
            parse_value(timestamp).map_err(at)?;
        }
        if fields.next().is_some() {
            return Err(at("trailing fields".into()));
        }
        let family_name = current
            .clone()
            .ok_or_else(|| at("sample before any # TYPE".into()))?;
        let family = out.families.get_mut(&family_name).unwrap();
        let allowed = suffixes(&family.kind).map_err(at)?;
        let suffix_ok = allowed
            .iter()
            .any(|suffix| name.strip_suffix(suffix) == Some(family_name.as_str()));
        if !suffix_ok {
            return Err(at(format!(
                "sample {name} does not belong to {} family {family_name}",
                family.kind
            )));
        }
        let key = format!("{name}{labels:?}");
        if !series.insert(key) {
            return Err(at("series repeated".into()));
        }
        family.samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    for family in out.families.values() {
        if family.kind == "histogram" {
            check_histogram(family)?;
        }
    }
    Ok(out)
}

fn check_histogram(family: &Family) -> Result<(), String> {
    let name = &family.name;
    // Group by the labels other than `le`.
    /// Buckets (le, cumulative count), _count and _sum of one label set.
    type Group = (Vec<(f64, f64)>, Option<f64>, Option<f64>);
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    for sample in &family.samples {
        let mut labels = sample.labels.clone();
        let le = labels.remove("le");
        let group = groups.entry(format!("{labels:?}")).or_default();
        match sample.name.strip_prefix(name.as_str()) {
            Some("_bucket") => {
                let le = le.ok_or_else(|| format!("{name}: bucket without le"))?;
                group.0.push((parse_value(&le)?, sample.value));
            }
            Some("_count") => group.1 = Some(sample.value),
            Some("_sum") => group.2 = Some(sample.value),
            _ => {}
        }
    }
    for (labels, (buckets, count, sum)) in groups {
        let count = count.ok_or_else(|| format!("{name}{labels}: no _count"))?;
        sum.ok_or_else(|| format!("{name}{labels}: no _sum"))?;
        if buckets.is_empty() {
            return Err(format!("{name}{labels}: no buckets"));
        }
        for pair in buckets.windows(2) {
            if pair[1].0 <= pair[0].0 {
                return Err(format!("{name}{labels}: le bounds not increasing"));
            }
            if pair[1].1 < pair[0].1 {
                return Err(format!("{name}{labels}: cumulative counts decrease"));
            }
        }
        let last = buckets.last().unwrap();
        if last.0 != f64::INFINITY || last.1 != count {
            return Err(format!(
                "{name}{labels}: the +Inf bucket ({last:?}) must exist and equal _count {count}"
            ));
        }
    }
    Ok(())
}

#[test]
fn parser_refuses_what_it_should() {
    let good = "# TYPE a counter\n# HELP a x.\na_total{m=\"q\\\"\"} 1\n# TYPE h histogram\n\
                h_bucket{le=\"1.0\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3.5\nh_count 2\n# EOF\n";
    let parsed = parse(good).unwrap();
    assert_eq!(parsed.value("a_total", &[("m", "q\"")]), Some(1.0));
    for bad in [
        "# TYPE a counter\na_total 1\n",     // no EOF
        "# TYPE a counter\na 1\n# EOF\n",    // counter without _total
        "a 1\n# EOF\n",                      // no TYPE
        "# TYPE a gauge\na 1\na 2\n# EOF\n", // repeated series
        "# TYPE a gauge\na{x=1} 1\n# EOF\n", // unquoted label
        "# TYPE a gauge\na one\n# EOF\n",    // not a number
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n# EOF\n", // +Inf != count
        "# TYPE a_seconds gauge\n# UNIT a_seconds bytes\n# EOF\n", // unit mismatch
    ] {
        assert!(parse(bad).is_err(), "accepted {bad:?}");
    }
}
