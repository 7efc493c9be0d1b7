//! The CRD shipped in the chart is the one the Rust types generate.

use std::process::Command;

#[test]
fn the_chart_crd_matches_the_generated_one() {
    let output = Command::new(env!("CARGO_BIN_EXE_spate"))
        .arg("crd")
        .output()
        .unwrap();
    assert!(output.status.success());
    let generated = String::from_utf8(output.stdout).unwrap();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../chart/crds/pipelines.spate.dev.yaml"
    );
    let checked_in = std::fs::read_to_string(path).unwrap();
    assert!(
        generated == checked_in,
        "chart/crds/pipelines.spate.dev.yaml is out of date: run `spate crd > chart/crds/pipelines.spate.dev.yaml`"
    );
    let crd: serde_json::Value = serde_saphyr::from_str(&generated).unwrap();
    assert_eq!(crd["metadata"]["name"], "pipelines.spate.dev");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert!(version["subresources"]["status"].is_object());
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        columns,
        [
            "Source",
            "Mode",
            "Running",
            "Succeeded",
            "Failed",
            "Lag",
            "Age"
        ]
    );
    // The lag is a wide column: `kubectl get pipelines -o wide`.
    let lag = &version["additionalPrinterColumns"][5];
    assert_eq!(lag["jsonPath"], ".status.sourceLag");
    assert_eq!(lag["priority"], 1);
}
