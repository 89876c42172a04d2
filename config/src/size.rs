//! Byte sizes: an integer, or a string with a binary unit ("512MiB", "1G", "4 KiB").

/// Parses a size; units are powers of 1024 (K, KiB, M, MiB, G, GiB, T, TiB).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size (e.g. 4096, \"512MiB\", \"1GiB\")"))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        u => {
            return Err(format!("unknown size unit '{u}' in '{s}' (use KiB, MiB, GiB or TiB)"));
        }
    };
    n.checked_mul(1 << shift).ok_or_else(|| format!("size '{s}' does not fit in 64 bits"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("512 MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert!(parse_size("1GB").unwrap_err().contains("unknown size unit 'GB'"));
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("99999999999TiB").unwrap_err().contains("64 bits"));
    }

    proptest! {
        #[test]
        fn never_panics(s in ".{0,24}") {
            let _ = parse_size(&s);
        }

        #[test]
        fn mib_roundtrip(n in 0u64..1_000_000) {
            prop_assert_eq!(parse_size(&format!("{n}MiB")), Ok(n << 20));
        }
    }
}
