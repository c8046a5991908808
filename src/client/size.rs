//! Sizes as people and Nomad write them: `10GiB` (binary), `20G` / `20GB` (decimal, as
//! go-humanize reads Nomad's capacity_min), `1.5Ti`, `4096` (bytes).

/// Parses a size into bytes.
pub(crate) fn parse(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let multiplier: u64 = match unit.as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "ki" | "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mi" | "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gi" | "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "ti" | "tib" => 1 << 40,
        "p" | "pb" => 1_000_000_000_000_000,
        "pi" | "pib" => 1 << 50,
        _ => {
            return Err(format!(
                "size {text:?} has an unknown unit {unit:?}: use B, KiB, MiB, GiB, TiB, PiB \
                 (binary) or K, M, G, T, P (decimal)"
            ))
        }
    };
    let bad = || format!("size {text:?} is not a number followed by an optional unit");
    if number.is_empty() || number.matches('.').count() > 1 {
        return Err(bad());
    }
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| bad())?
    };
    let too_big = || format!("size {text:?} is too large");
    let mut bytes = whole.checked_mul(multiplier).ok_or_else(too_big)?;
    if !frac.is_empty() {
        // Exact decimal arithmetic on the fraction; rounds down to a whole byte.
        let digits = &frac[..frac.len().min(18)];
        let scale = 10u128.pow(digits.len() as u32);
        let f: u128 = digits.parse().map_err(|_| bad())?;
        let part = (f * multiplier as u128 / scale) as u64;
        bytes = bytes.checked_add(part).ok_or_else(too_big)?;
    }
    Ok(bytes)
}

/// `10737418240` → `10 GiB`; sizes that are not a whole number of the unit get one decimal.
pub(crate) fn format(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    let mut value = bytes as f64;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_and_decimal_units() {
        assert_eq!(parse("10GiB").unwrap(), 10 << 30);
        assert_eq!(parse("20G").unwrap(), 20_000_000_000);
        assert_eq!(parse("20GB").unwrap(), 20_000_000_000);
        assert_eq!(parse("512Mi").unwrap(), 512 << 20);
        assert_eq!(parse("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse("4096").unwrap(), 4096);
        assert_eq!(parse(" 1 tib ").unwrap(), 1 << 40);
        assert!(parse("ten").is_err());
        assert!(parse("10XB").is_err());
        assert!(parse("1.2.3G").is_err());
        assert!(parse("99999999999PiB").is_err());
    }

    #[test]
    fn formats() {
        assert_eq!(format(10 << 30), "10 GiB");
        assert_eq!(format(1536 << 20), "1.5 GiB");
        assert_eq!(format(100), "100 B");
    }
}
