//! The TOML configuration: any text gives a configuration or an error naming a line, never a
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(src) = std::str::from_utf8(data)
        && let Err(e) = p2pnvmf_config::Config::parse(src, "fuzz.toml")
    {
        assert!(e.line >= 1, "{e}");
    }
});
