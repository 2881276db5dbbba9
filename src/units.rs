//! Human-readable byte sizes for the command line (`1Gi`, `500M`, `4096`).

/// Parses a size: a number with an optional suffix (`Ki`, `Mi`, `Gi`, `Ti` for powers of 1024;
/// `K`, `M`, `G`, `T` for powers of 1000), as Kubernetes quantities write them.
pub fn parse_size(raw: &str) -> Result<u64, String> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (digits, suffix) = raw.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("{raw:?} is not a size (examples: 1Gi, 500Mi, 4096)"))?;
    let factor: u64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "K" | "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        other => return Err(format!("unknown size suffix {other:?} in {raw:?}")),
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("{raw:?} is too large"))
}

/// Formats bytes with a binary suffix, e.g. `1.5Gi`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["", "Ki", "Mi", "Gi", "Ti"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

/// Parses a duration: a number with a unit (`ms`, `s`, `m`, `h`), or `0`.
pub fn parse_duration(raw: &str) -> Result<std::time::Duration, String> {
    let raw = raw.trim();
    if raw == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (digits, unit) = raw.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("{raw:?} is not a duration (examples: 500ms, 60s, 5m, 1h)"))?;
    let millis: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "" => return Err(format!("{raw:?} needs a unit: ms, s, m or h")),
        other => return Err(format!("unknown duration unit {other:?} in {raw:?}")),
    };
    number
        .checked_mul(millis)
        .map(std::time::Duration::from_millis)
        .ok_or_else(|| format!("{raw:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats() {
        assert_eq!(parse_size("1Gi").unwrap(), 1 << 30);
        assert_eq!(parse_size("500M").unwrap(), 500_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("1Gb").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999Ti").is_err());
        assert_eq!(format_size(1 << 30), "1.0Gi");
        assert_eq!(format_size(512), "512");
    }

    #[test]
    fn parses_durations() {
        use std::time::Duration;
        assert_eq!(parse_duration("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("60").is_err());
        assert!(parse_duration("1d").is_err());
        assert!(parse_duration("s").is_err());
    }
}
