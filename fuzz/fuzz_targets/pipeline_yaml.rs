//! The pipeline loader behind `spate validate`, `render`, `apply` and `run -f`: YAML syntax,
//! the header, the CRD schema, the semantic checks and the trial render of the Job template
//! with a sample event. Any text must give pipelines or diagnostics, never a panic or a hang.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The CLI reads files as UTF-8 and reports anything else before the loader sees it.
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = spate::pipeline::load_str(text, "fuzz.yaml");
    }
});
