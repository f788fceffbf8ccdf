//! Fuzzes configuration loading (TOML and YAML): any input gives a configuration or a list of
//! errors, never a panic.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for format in [config::FileFormat::Toml, config::FileFormat::Yaml] {
        if let Err(errors) = bearer_proxy::config::from_str(text, format, Some(HashMap::new())) {
            assert!(!errors.0.is_empty());
        }
    }
});
