//! The built `spate-thumbnailer` binary, run as a pod runs it: the event in its environment,
//! real JPEG and PNG images made here, thumbnails read back and measured.

use std::io::{BufRead, BufReader, Cursor, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use image::{DynamicImage, ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as StorePath;
use object_store::signer::Signer;
use object_store::{Attribute, ObjectStoreExt};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_spate-thumbnailer");

/// What a run of the binary did.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs the binary with only `env` in its environment.
fn run(env: &[(&str, &str)], args: &[&str]) -> Run {
    let output = Command::new(BIN)
        .env_clear()
        .envs(env.iter().copied())
        .args(args)
        .output()
        .expect("run spate-thumbnailer");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn encode(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    image.write_to(&mut Cursor::new(&mut out), format).unwrap();
    out
}

/// A PNG with transparency, with a gradient so it is not trivially compressible.
fn png(width: u32, height: u32) -> Vec<u8> {
    let image = RgbaImage::from_fn(width, height, |x, y| {
        Rgba([(x % 256) as u8, (y % 256) as u8, 90, 200])
    });
    encode(image.into(), ImageFormat::Png)
}

fn jpeg(width: u32, height: u32) -> Vec<u8> {
    let image = RgbImage::from_fn(width, height, |x, y| {
        Rgb([(x % 256) as u8, 120, (y % 256) as u8])
    });
    encode(image.into(), ImageFormat::Jpeg)
}

/// Writes `bytes` at `dir/key` and returns the event the objectStore source makes for it.
fn put_file(dir: &Path, key: &str, bytes: &[u8]) -> Value {
    let path = dir.join(key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, bytes).unwrap();
    file_event(dir, key)
}

fn file_event(dir: &Path, key: &str) -> Value {
    json!({
        "id": format!("{}/{key}@\"1\"", dir.display()),
        "bucket": dir.display().to_string(),
        "key": key,
        "size": 1,
        "etag": "\"1\"",
        "url": format!("file://{}/{key}", dir.display()),
        "lastModified": "2026-01-01T00:00:00Z",
    })
}

/// The format and size of the image in `bytes`.
fn measure(bytes: &[u8]) -> (ImageFormat, u32, u32) {
    let format = image::guess_format(bytes).expect("a known image format");
    let image = image::load_from_memory(bytes).expect("the thumbnail decodes");
    (format, image.width(), image.height())
}

fn measure_file(path: &Path) -> (ImageFormat, u32, u32) {
    measure(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

fn assert_logged(run: &Run, line_start: &str) {
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.stderr, "", "{run:?}");
    let line = run.stdout.strip_suffix('\n').unwrap_or(&run.stdout);
    assert!(
        line.starts_with(line_start) && line.ends_with("ms") && !line.contains('\n'),
        "{run:?}"
    );
}

fn assert_fails(run: &Run, code: i32, message_parts: &[&str]) {
    assert_eq!(run.code, Some(code), "{run:?}");
    assert_eq!(run.stdout, "", "{run:?}");
    let line = run.stderr.strip_suffix('\n').unwrap_or(&run.stderr);
    assert!(line.starts_with("spate-thumbnailer: "), "{run:?}");
    assert!(!line.contains('\n'), "one line: {run:?}");
    assert!(!line.contains("panicked"), "{run:?}");
    for part in message_parts {
        assert!(line.contains(part), "{part:?} not in {line:?}");
    }
}

#[test]
fn a_png_event_in_env_becomes_a_png_thumbnail_that_fits_the_box() {
    let inbox = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let event = put_file(inbox.path(), "photos/a.png", &png(400, 300));
    let run = run(
        &[("SPATE_EVENT", &event.to_string())],
        &[
            "--width",
            "100",
            "--height",
            "100",
            "--output",
            out.path().to_str().unwrap(),
        ],
    );
    assert_logged(&run, "thumbnail photos/a.png 400x300 -> 100x75 in ");
    let thumbnail = out.path().join("photos/a.png");
    assert_eq!(measure_file(&thumbnail), (ImageFormat::Png, 100, 75));
    let decoded = image::open(&thumbnail).unwrap();
    assert!(decoded.color().has_alpha(), "transparency is kept");
    // Only the thumbnail: no temporary file left beside it.
    assert_eq!(
        std::fs::read_dir(out.path().join("photos"))
            .unwrap()
            .count(),
        1
    );
}

#[test]
fn the_format_comes_from_the_content_not_the_name() {
    let inbox = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    // A JPEG under a .png name, portrait.
    let event = put_file(inbox.path(), "misnamed.png", &jpeg(300, 600));
    let run = run(
        &[("SPATE_EVENT", &event.to_string())],
        &[
            "--width",
            "64",
            "--height",
            "64",
            "--output",
            out.path().to_str().unwrap(),
        ],
    );
    assert_logged(&run, "thumbnail misnamed.png 300x600 -> 32x64 in ");
    assert_eq!(
        measure_file(&out.path().join("misnamed.png")),
        (ImageFormat::Jpeg, 32, 64)
    );
}

#[test]
fn a_small_image_is_never_enlarged() {
    let inbox = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let event = put_file(inbox.path(), "small.jpg", &jpeg(50, 40));
    let run = run(
        &[("SPATE_EVENT", &event.to_string())],
        &["--output", out.path().to_str().unwrap()],
    );
    assert_logged(&run, "thumbnail small.jpg 50x40 -> 50x40 in ");
    assert_eq!(
        measure_file(&out.path().join("small.jpg")),
        (ImageFormat::Jpeg, 50, 40)
    );
}

#[test]
fn an_event_file_and_a_file_url_output() {
    let inbox = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let event = put_file(inbox.path(), "deep/er/b.jpg", &jpeg(1000, 500));
    let event_file = inbox.path().join("event.json");
    std::fs::write(&event_file, event.to_string()).unwrap();
    let output_url = format!("file://{}/thumbs", out.path().display());
    let run = run(
        &[("SPATE_EVENT_FILE", event_file.to_str().unwrap())],
        &["--width", "200", "--height", "300", "--output", &output_url],
    );
    assert_logged(&run, "thumbnail deep/er/b.jpg 1000x500 -> 200x100 in ");
    assert_eq!(
        measure_file(&out.path().join("thumbs/deep/er/b.jpg")),
        (ImageFormat::Jpeg, 200, 100)
    );
}

fn items_file(dir: &Path, inbox: &Path) -> std::path::PathBuf {
    let items: Vec<Value> = [
        ("0.png", png(30, 30)),
        ("1.jpg", jpeg(90, 60)),
        ("2.png", png(20, 40)),
    ]
    .iter()
    .map(|(key, bytes)| put_file(inbox, key, bytes))
    .collect();
    let path = dir.join("items.json");
    std::fs::write(&path, Value::from(items).to_string()).unwrap();
    path
}

#[test]
fn indexed_mode_handles_only_the_item_at_its_completion_index() {
    let inbox = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let items = items_file(inbox.path(), inbox.path());
    let run = run(
        &[
            ("SPATE_ITEMS_FILE", items.to_str().unwrap()),
            ("JOB_COMPLETION_INDEX", "1"),
            ("SPATE_BATCH_SIZE", "3"),
        ],
        &[
            "--width",
            "30",
            "--height",
            "30",
            "--output",
            out.path().to_str().unwrap(),
        ],
    );
    assert_logged(&run, "thumbnail 1.jpg 90x60 -> 30x20 in ");
    let written: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(written, ["1.jpg"]);
    assert_eq!(
        measure_file(&out.path().join("1.jpg")),
        (ImageFormat::Jpeg, 30, 20)
    );
}

#[test]
fn an_index_out_of_range_is_an_input_error() {
    let inbox = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let items = items_file(inbox.path(), inbox.path());
    let run = run(
        &[
            ("SPATE_ITEMS_FILE", items.to_str().unwrap()),
            ("JOB_COMPLETION_INDEX", "3"),
        ],
        &["--output", out.path().to_str().unwrap()],
    );
    assert_fails(
        &run,
        3,
        &["JOB_COMPLETION_INDEX=3 is out of range", "holds 3 items"],
    );
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
}

#[test]
fn the_simulator_volume_root_stands_in_for_the_mount() {
    // The simulator's exec mode cannot bind-mount /var/run/spate: it puts the ConfigMap's
    // files under $SPATE_SIM_VOLUME_ROOT/var/run/spate instead.
    if Path::new("/var/run/spate/items.json").exists() {
        return; // a machine with the real mount: nothing to fall back from
    }
    let inbox = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let mount = root.path().join("var/run/spate");
    std::fs::create_dir_all(&mount).unwrap();
    items_file(&mount, inbox.path());
    let run = run(
        &[
            ("SPATE_ITEMS_FILE", "/var/run/spate/items.json"),
            ("JOB_COMPLETION_INDEX", "2"),
            ("SPATE_SIM_VOLUME_ROOT", root.path().to_str().unwrap()),
        ],
        &[
            "--width",
            "10",
            "--height",
            "10",
            "--output",
            out.path().to_str().unwrap(),
        ],
    );
    assert_logged(&run, "thumbnail 2.png 20x40 -> 5x10 in ");
    assert_eq!(
        measure_file(&out.path().join("2.png")),
        (ImageFormat::Png, 5, 10)
    );

    // Without the root, the missing file is named.
    let run = self::run(
        &[
            ("SPATE_ITEMS_FILE", "/var/run/spate/items.json"),
            ("JOB_COMPLETION_INDEX", "2"),
        ],
        &["--output", out.path().to_str().unwrap()],
    );
    assert_fails(
        &run,
        3,
        &["SPATE_ITEMS_FILE /var/run/spate/items.json does not exist"],
    );
}

#[test]
fn a_text_file_is_not_an_image() {
    let inbox = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let event = put_file(inbox.path(), "notes.jpg", b"just some text\n");
    let run = run(
        &[("SPATE_EVENT", &event.to_string())],
        &["--output", out.path().to_str().unwrap()],
    );
    assert_fails(&run, 5, &["notes.jpg is not an image"]);
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
}

#[test]
fn a_missing_object_is_named_by_its_url() {
    let inbox = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let event = file_event(inbox.path(), "gone.png");
    let url = format!("file://{}/gone.png", inbox.path().display());
    let run = run(
        &[("SPATE_EVENT", &event.to_string())],
        &["--output", out.path().to_str().unwrap()],
    );
    assert_fails(&run, 4, &[&format!("cannot read {url}: no such object")]);
}

#[test]
fn bad_event_json_names_the_variable() {
    let out = tempfile::tempdir().unwrap();
    let run = run(
        &[("SPATE_EVENT", "{\"key\": \"a.jpg\", ")],
        &["--output", out.path().to_str().unwrap()],
    );
    assert_fails(&run, 3, &["SPATE_EVENT is not valid JSON"]);

    let run = self::run(
        &[("SPATE_EVENT", r#"{"id": "1", "key": "a.jpg"}"#)],
        &["--output", out.path().to_str().unwrap()],
    );
    assert_fails(
        &run,
        3,
        &["SPATE_EVENT: the event has neither `url` nor `presignedUrl`"],
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("event.json");
    std::fs::write(&file, "not json").unwrap();
    let run = self::run(
        &[("SPATE_EVENT_FILE", file.to_str().unwrap())],
        &["--output", out.path().to_str().unwrap()],
    );
    assert_fails(
        &run,
        3,
        &[&format!(
            "SPATE_EVENT_FILE {} is not valid JSON",
            file.display()
        )],
    );
}

#[test]
fn no_event_at_all_says_what_to_set() {
    let run = run(&[], &["--output", "/tmp/never-written"]);
    assert_fails(
        &run,
        3,
        &[
            "no event",
            "SPATE_EVENT",
            "SPATE_EVENT_FILE",
            "SPATE_ITEMS_FILE",
        ],
    );
}

#[test]
fn a_key_that_would_leave_the_output_is_refused() {
    let inbox = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut event = put_file(inbox.path(), "a.png", &png(10, 10));
    event["key"] = json!("../a.png");
    let run = run(
        &[("SPATE_EVENT", &event.to_string())],
        &["--output", out.path().join("thumbs").to_str().unwrap()],
    );
    assert_fails(
        &run,
        3,
        &["\"../a.png\"", "would not stay inside the output"],
    );
    assert!(!out.path().join("a.png").exists());
}

/// A one-shot HTTP server on loopback: answers one request with `status` and `body`, and
/// hands back the request line it got.
fn serve_once(status: &'static str, body: Vec<u8>) -> (String, std::thread::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut reader = BufReader::new(stream);
        let mut request_line = String::new();
        reader.read_line(&mut request_line).unwrap();
        let mut header = String::new();
        while reader.read_line(&mut header).unwrap() > 2 {
            header.clear();
        }
        let mut stream = reader.into_inner();
        write!(
            stream,
            "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .unwrap();
        stream.write_all(&body).unwrap();
        request_line.trim_end().to_string()
    });
    (format!("http://{address}"), handle)
}

#[test]
fn a_presigned_url_is_fetched_and_its_query_never_printed() {
    let out = tempfile::tempdir().unwrap();
    let (base, server) = serve_once("200 OK", png(64, 128));
    let event = json!({
        "id": "1",
        "key": "in/p.png",
        // Preferred over `url`, which points nowhere.
        "url": "s3://no-such-bucket/in/p.png",
        "presignedUrl": format!("{base}/in/p.png?X-Amz-Signature=topsecret"),
    });
    let run = run(
        &[("SPATE_EVENT", &event.to_string())],
        &[
            "--width",
            "32",
            "--height",
            "32",
            "--output",
            out.path().to_str().unwrap(),
        ],
    );
    assert_eq!(
        server.join().unwrap(),
        "GET /in/p.png?X-Amz-Signature=topsecret HTTP/1.1"
    );
    assert_logged(&run, "thumbnail in/p.png 64x128 -> 16x32 in ");
    assert_eq!(
        measure_file(&out.path().join("in/p.png")),
        (ImageFormat::Png, 16, 32)
    );

    let (base, server) = serve_once(
        "403 Forbidden",
        b"<Error>SignatureDoesNotMatch</Error>".to_vec(),
    );
    let event = json!({
        "id": "1",
        "key": "in/p.png",
        "presignedUrl": format!("{base}/in/p.png?X-Amz-Signature=topsecret"),
    });
    let run = self::run(
        &[("SPATE_EVENT", &event.to_string())],
        &["--output", out.path().to_str().unwrap()],
    );
    server.join().unwrap();
    assert_fails(
        &run,
        4,
        &[&format!("cannot read {base}/in/p.png: HTTP 403 Forbidden")],
    );
    assert!(!run.stderr.contains("topsecret"), "{run:?}");
}

#[test]
fn help_teaches_inputs_outputs_and_examples() {
    let run = run(&[], &["--help"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    for part in [
        "--width",
        "--height",
        "--output",
        "SPATE_EVENT",
        "SPATE_ITEMS_FILE",
        "JOB_COMPLETION_INDEX",
        "SPATE_SIM_VOLUME_ROOT",
        "presignedUrl",
        "AWS_ENDPOINT_URL",
        "Exit codes",
        "Examples",
    ] {
        assert!(run.stdout.contains(part), "{part:?} not in --help");
    }
}

const S3_ENDPOINT: &str = "http://127.0.0.1:9090";

/// Starts the project's S3 server (moto) if it is not running and makes a new bucket.
async fn new_bucket() -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/s3-server");
    let status = tokio::process::Command::new(script)
        .arg("start")
        .status()
        .await
        .expect("run scripts/s3-server");
    assert!(status.success(), "scripts/s3-server start failed");
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let bucket = format!("spate-thumbnailer-{}-{nanos}", std::process::id());
    let _ = rustls::crypto::ring::default_provider().install_default();
    // object_store cannot create buckets; moto accepts an unsigned PUT.
    let response = reqwest::Client::new()
        .put(format!("{S3_ENDPOINT}/{bucket}"))
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "create bucket: {response:?}"
    );
    bucket
}

#[tokio::test]
async fn reads_from_and_writes_to_an_s3_compatible_store() {
    let bucket = new_bucket().await;
    let s3 = AmazonS3Builder::new()
        .with_endpoint(S3_ENDPOINT)
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_bucket_name(&bucket)
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .build()
        .unwrap();
    // A key with a space: events carry keys as they are, not percent-encoded.
    let key = "uploads/cat photo.jpg";
    s3.put(&StorePath::parse(key).unwrap(), jpeg(640, 480).into())
        .await
        .unwrap();
    let event = json!({
        "id": format!("{bucket}/{key}@\"1\""),
        "bucket": bucket,
        "key": key,
        "size": 1,
        "etag": "\"1\"",
        "url": format!("s3://{bucket}/{key}"),
        "lastModified": "2026-01-01T00:00:00Z",
    });
    let aws = [
        ("AWS_ENDPOINT_URL", S3_ENDPOINT),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
    ];
    let event_text = event.to_string();
    let mut env = aws.to_vec();
    env.push(("SPATE_EVENT", &event_text));
    let output = format!("s3://{bucket}/thumbs");
    // The binary runs to completion while this test waits; nothing else needs the runtime.
    let done = run(
        &env,
        &["--width", "100", "--height", "100", "--output", &output],
    );
    assert_logged(
        &done,
        "thumbnail uploads/cat photo.jpg 640x480 -> 100x75 in ",
    );
    let thumbnail = s3
        .get(&StorePath::parse(format!("thumbs/{key}")).unwrap())
        .await
        .expect("the thumbnail is in the bucket");
    assert_eq!(
        thumbnail
            .attributes
            .get(&Attribute::ContentType)
            .map(|v| v.as_ref()),
        Some("image/jpeg")
    );
    let bytes = thumbnail.bytes().await.unwrap();
    assert_eq!(measure(&bytes), (ImageFormat::Jpeg, 100, 75));

    // A presigned URL needs no credentials at all.
    let presigned = s3
        .signed_url(
            reqwest::Method::GET,
            &StorePath::parse(key).unwrap(),
            Duration::from_secs(300),
        )
        .await
        .unwrap();
    let mut event = event;
    event["presignedUrl"] = json!(presigned.to_string());
    let out = tempfile::tempdir().unwrap();
    let event_text = event.to_string();
    let out_path = out.path().to_str().unwrap();
    let done = run(
        &[("SPATE_EVENT", &event_text)],
        &["--width", "64", "--height", "64", "--output", out_path],
    );
    assert_logged(
        &done,
        "thumbnail uploads/cat photo.jpg 640x480 -> 64x48 in ",
    );
    assert_eq!(
        measure_file(&out.path().join(key)),
        (ImageFormat::Jpeg, 64, 48)
    );

    // A key that is not there: the URL is named, the exit code says "could not read".
    let missing = format!("s3://{bucket}/uploads/none.jpg");
    let event_text = json!({"id": "2", "key": "uploads/none.jpg", "url": missing}).to_string();
    let mut env = aws.to_vec();
    env.push(("SPATE_EVENT", &event_text));
    let done = run(&env, &["--output", out_path]);
    assert_fails(
        &done,
        4,
        &[&format!("cannot read {missing}: no such object")],
    );
}
