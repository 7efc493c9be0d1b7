//! `spate-thumbnailer`: Spate's example worker. It makes the thumbnail of the one image its
//! event names, as the `image-resize` Job template runs it:
//! `spate-thumbnailer --width W --height H --output OUT`.

mod failure;
mod input;
mod output;
mod store;
mod thumb;

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

use crate::failure::Failure;
use crate::input::Environment;
use crate::output::Output;
use crate::thumb::{MAX_SIDE, Settings};

/// Make the thumbnail of the image a Spate event names.
#[derive(Debug, Parser)]
#[command(
    name = "spate-thumbnailer",
    version,
    about = "Make the thumbnail of the image a Spate event names",
    long_about = "Make the thumbnail of the image a Spate event names.\n\n\
        Spate runs one pod per uploaded image (or one per item of an indexed batch); this \
        worker reads that pod's event from the environment, fetches the image, shrinks it to \
        fit inside --width x --height (keeping its aspect ratio, never enlarging it) and \
        writes it below --output under the object's key, in the format it came in (JPEG or \
        PNG, told by content, not by name). It prints one line per image on stdout and, on \
        failure, one line on stderr.",
    after_long_help = AFTER_HELP,
)]
struct Cli {
    /// Largest width of the thumbnail, in pixels.
    #[arg(long, default_value_t = 256, value_name = "PIXELS",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_SIDE)))]
    width: u32,

    /// Largest height of the thumbnail, in pixels.
    #[arg(long, default_value_t = 256, value_name = "PIXELS",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_SIDE)))]
    height: u32,

    /// Where thumbnails go: a folder, a file:// URL, or an object-store URL such as
    /// s3://bucket/prefix. The object's key is kept: photos/a.jpg becomes OUT/photos/a.jpg.
    #[arg(long, value_name = "OUT")]
    output: String,

    /// JPEG quality of JPEG thumbnails, 1 (smallest) to 100 (best).
    #[arg(long, default_value_t = 85, value_name = "1-100",
          value_parser = clap::value_parser!(u8).range(1..=100))]
    jpeg_quality: u8,
}

const AFTER_HELP: &str = "\
Input (set by Spate in each pod):
  SPATE_EVENT            the event as JSON (perEvent mode)
  SPATE_EVENT_FILE       a file holding the event, for events too big for a variable
  SPATE_ITEMS_FILE       a JSON list of events (indexed mode), with
  JOB_COMPLETION_INDEX   the item this pod handles (set by Kubernetes)
  SPATE_SIM_VOLUME_ROOT  the simulator's stand-in for mounts: a file path that does not
                         exist is looked up below it

  The event is an objectStore event: {\"key\": \"photos/a.jpg\", \"url\": \"s3://bucket/photos/a.jpg\",
  \"presignedUrl\": \"https://...\" (optional), ...}. The image is fetched from presignedUrl when
  present (no credentials needed), else from url: file://, s3:// (AWS_ACCESS_KEY_ID,
  AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL for S3-compatible servers; plain http
  is allowed for loopback endpoints, elsewhere with AWS_ALLOW_HTTP=true), gs://, az://.

Output:
  stdout: thumbnail photos/a.jpg 4000x3000 -> 256x192 in 35ms
  Folders are written atomically (a temporary file renamed into place).

Exit codes:
  0  the thumbnail was written
  2  bad command line
  3  no usable event (missing or invalid JSON, index out of range, bad key or --output)
  4  the image could not be read (missing object, network, credentials)
  5  not an image this worker reads (JPEG, PNG), or a damaged one
  6  the thumbnail could not be written
  3 and 5 are permanent: retrying the pod cannot help.

Examples:
  # One image from a local folder into another:
  SPATE_EVENT='{\"key\": \"photos/a.jpg\", \"url\": \"file:///tmp/in/photos/a.jpg\"}' \\
    spate-thumbnailer --width 128 --height 128 --output /tmp/thumbs

  # From and to S3-compatible storage (here the local test server):
  AWS_ENDPOINT_URL=http://127.0.0.1:9090 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test \\
  SPATE_EVENT='{\"key\": \"in/a.png\", \"url\": \"s3://uploads/in/a.png\"}' \\
    spate-thumbnailer --output s3://thumbnails/small

  # Item 2 of an indexed batch:
  SPATE_ITEMS_FILE=items.json JOB_COMPLETION_INDEX=2 spate-thumbnailer --output /tmp/thumbs
";

fn main() -> ExitCode {
    let cli = Cli::parse();
    // reqwest and object_store are built without a rustls crypto provider of their own:
    // `ring`, the workspace's one, is installed before anything builds a client.
    store::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("spate-thumbnailer: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let env = Environment::from_process();
    match runtime.block_on(run(&cli, &env)) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(failure) => {
            eprintln!("spate-thumbnailer: {failure}");
            failure.kind.exit_code()
        }
    }
}

/// Makes the event's thumbnail; returns the line to log.
async fn run(cli: &Cli, env: &Environment) -> Result<String, Failure> {
    let started = Instant::now();
    // The event first: a pod without one is misconfigured, whatever --output says.
    let (event, _origin) = input::load_event(env)?;
    let output = Output::parse(&cli.output, env)?;
    // Refuse a key that would escape the output before fetching anything.
    output::key_segments(&event.key)?;
    let bytes = store::read_object(&event, env).await?;
    let settings = Settings {
        max_width: cli.width,
        max_height: cli.height,
        jpeg_quality: cli.jpeg_quality,
    };
    let thumbnail = thumb::make(&bytes, &event.key, settings)?;
    output.write(&event.key, &thumbnail).await?;
    let (sw, sh) = thumbnail.source;
    let (tw, th) = thumbnail.size;
    Ok(format!(
        "thumbnail {} {sw}x{sh} -> {tw}x{th} in {}ms",
        printable(&event.key),
        started.elapsed().as_millis()
    ))
}

/// `key` as it is, or escaped when it holds control characters: the log stays one line per
/// image.
fn printable(key: &str) -> String {
    if key.chars().any(char::is_control) {
        key.escape_debug().to_string()
    } else {
        key.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_template_command_line_parses() {
        let cli = Cli::try_parse_from([
            "spate-thumbnailer",
            "--width",
            "128",
            "--height",
            "96",
            "--output",
            "s3://thumbs",
        ])
        .unwrap();
        assert_eq!((cli.width, cli.height, cli.jpeg_quality), (128, 96, 85));
        assert_eq!(cli.output, "s3://thumbs");
        for bad in [
            ["--width", "0"],
            ["--height", "70000"],
            ["--jpeg-quality", "0"],
        ] {
            let mut args = vec!["spate-thumbnailer", "--output", "x"];
            args.extend(bad);
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?}");
        }
        assert!(Cli::try_parse_from(["spate-thumbnailer"]).is_err());
    }
}
