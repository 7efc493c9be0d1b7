//! The Pipeline CRD and a Pipeline through the real kubectl on the simulator: applied, listed
//! with its printer columns, and its status written through the status subresource.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use spate_sim::{SimCluster, SimConfig};

fn kubectl(kubeconfig: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl on PATH (scripts/test installs it)");
    if let Some(input) = stdin {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_applies_the_crd_and_a_pipeline_and_sees_its_status() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    cluster.write_kubeconfig(&kubeconfig).unwrap();
    let crd = Command::new(env!("CARGO_BIN_EXE_spate"))
        .arg("crd")
        .output()
        .unwrap();
    assert!(crd.status.success());

    tokio::task::spawn_blocking(move || {
        // Server-side: client-side apply's last-applied annotation would hold the whole CRD,
        // over the 256 KiB annotation limit of real API servers and of the simulator.
        kubectl(
            &kubeconfig,
            &["apply", "--server-side", "-f", "-"],
            Some(&crd.stdout),
        );
        let example = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/amqp-work-queue/pipeline.yaml"
        );
        // Discovery learns the new resource type; kubectl may need a moment, as on a real cluster.
        let mut applied = false;
        for _ in 0..50 {
            let output = Command::new("kubectl")
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args(["apply", "-f", example])
                .output()
                .unwrap();
            if output.status.success() {
                applied = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert!(
            applied,
            "kubectl apply of the example Pipeline never succeeded"
        );

        let patch =
            r#"{"status":{"source":"amqp","running":3,"succeeded":7,"failed":0,"sourceLag":1234}}"#;
        kubectl(
            &kubeconfig,
            &[
                "patch",
                "pipeline",
                "render-frames",
                "--subresource=status",
                "--type=merge",
                "-p",
                patch,
            ],
            None,
        );
        let table = kubectl(&kubeconfig, &["get", "pipelines"], None);
        let table = String::from_utf8(table.stdout).unwrap();
        let mut lines = table.lines();
        let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(
            header,
            [
                "NAME",
                "SOURCE",
                "MODE",
                "RUNNING",
                "SUCCEEDED",
                "FAILED",
                "AGE"
            ],
            "{table}"
        );
        let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(
            &row[..5],
            ["render-frames", "amqp", "perEvent", "3", "7"],
            "{table}"
        );

        // The source's lag is a wide column.
        let wide = kubectl(&kubeconfig, &["get", "pipelines", "-o", "wide"], None);
        let wide = String::from_utf8(wide.stdout).unwrap();
        let mut lines = wide.lines();
        let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(header[6], "LAG", "{wide}");
        let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(row[6], "1234", "{wide}");

        let json = kubectl(
            &kubeconfig,
            &["get", "pl", "render-frames", "-o", "json"],
            None,
        );
        let pipeline: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
        assert_eq!(pipeline["status"]["succeeded"], 7);
        assert_eq!(pipeline["spec"]["source"]["amqp"]["queue"], "frames");
    })
    .await
    .unwrap();
    cluster.shutdown().await;
}
