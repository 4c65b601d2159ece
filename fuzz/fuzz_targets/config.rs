//! The config loader (ours and twemproxy's YAML): any text gives a config or an error that
//! names the file, never a panic. A config that loads builds a plan, and the YAML it prints
//! (what `/config` serves and `import` writes) loads again to the same config.
#![no_main]

use std::path::Path;

use ambassador::{config::Config, dataplane::Plan};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(Path::new("fuzz.yaml"), text) {
        Ok(cfg) => {
            let _ = Plan::build(&cfg);
            let again = serde_yaml::to_string(&cfg).expect("a loaded config serializes");
            let back = Config::parse(Path::new("printed.yaml"), &again)
                .unwrap_or_else(|e| panic!("printed config does not load: {e}\n{again}"));
            assert_eq!(back, cfg, "printed config loads differently:\n{again}");
        }
        Err(e) => assert!(e.to_string().contains("fuzz.yaml"), "{e}"),
    }
});
