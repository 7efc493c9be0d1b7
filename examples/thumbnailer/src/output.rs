//! Writing the thumbnail under the object's key, below `--output`: a folder (a path or a
//! `file://` URL) or an object store (`s3://bucket/prefix`, ...).

use std::fs;
use std::io::Write;
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use object_store::path::{Path, PathPart};
use object_store::{Attribute, Attributes, ObjectStore, PutOptions, PutPayload};
use url::Url;

use crate::failure::{Failure, chain};
use crate::input::Env;
use crate::store::{display_url, open_store};
use crate::thumb::Thumbnail;

/// Where thumbnails go.
pub enum Output {
    Folder(PathBuf),
    Store {
        /// The URL as given, for messages.
        shown: String,
        store: Box<dyn ObjectStore>,
        prefix: Path,
    },
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Output::Folder(path) => f.debug_tuple("Folder").field(path).finish(),
            Output::Store { shown, prefix, .. } => f
                .debug_struct("Store")
                .field("url", shown)
                .field("prefix", prefix)
                .finish(),
        }
    }
}

impl Output {
    /// `--output`: a folder, `file:///folder`, or an object-store URL.
    pub fn parse(spec: &str, env: Env<'_>) -> Result<Self, Failure> {
        let bad = |why: String| Failure::input(format!("--output {}: {why}", display_url(spec)));
        if !spec.contains("://") {
            return Ok(Output::Folder(PathBuf::from(spec)));
        }
        let url = Url::parse(spec).map_err(|e| bad(format!("not a URL: {e}")))?;
        if url.scheme() == "file" {
            let path = url
                .to_file_path()
                .map_err(|()| bad("not a local path (file:///absolute/path)".into()))?;
            return Ok(Output::Folder(path));
        }
        let (store, prefix) = open_store(&url, env).map_err(bad)?;
        Ok(Output::Store {
            shown: display_url(spec).trim_end_matches('/').to_string(),
            store,
            prefix,
        })
    }

    /// Writes `thumbnail` under `key`; returns where it went, for messages.
    pub async fn write(&self, key: &str, thumbnail: &Thumbnail) -> Result<String, Failure> {
        let segments = key_segments(key)?;
        match self {
            Output::Folder(folder) => {
                let path = segments.iter().fold(folder.clone(), |path, s| path.join(s));
                write_atomically(&path, &thumbnail.bytes)
                    .map_err(|e| Failure::write(format!("cannot write {}: {e}", path.display())))?;
                Ok(path.display().to_string())
            }
            Output::Store {
                shown,
                store,
                prefix,
            } => {
                let location: Path = prefix
                    .parts()
                    .chain(segments.iter().map(|s| PathPart::from(*s)))
                    .collect();
                let shown = format!("{shown}/{}", segments.join("/"));
                let mut attributes = Attributes::new();
                attributes.insert(Attribute::ContentType, thumbnail.content_type().into());
                let options = PutOptions {
                    attributes,
                    ..PutOptions::default()
                };
                let payload = PutPayload::from(thumbnail.bytes.clone());
                store
                    .put_opts(&location, payload, options)
                    .await
                    .map_err(|e| Failure::write(format!("cannot write {shown}: {}", chain(&e))))?;
                Ok(shown)
            }
        }
    }
}

/// The key's path segments. A key is a name in a bucket, where `..` means nothing special; as
/// a path it would climb out of the output, so such keys are refused. Empty segments (`a//b`,
/// a leading `/`) are dropped.
pub fn key_segments(key: &str) -> Result<Vec<&str>, Failure> {
    let segments: Vec<&str> = key.split('/').filter(|s| !s.is_empty()).collect();
    if segments.iter().any(|s| *s == "." || *s == "..") {
        return Err(Failure::input(format!(
            "the key {key:?} has a `.` or `..` segment: its thumbnail would not stay inside the \
             output"
        )));
    }
    if segments.is_empty() {
        return Err(Failure::input(format!("the key {key:?} names no file")));
    }
    Ok(segments)
}

/// Writes `bytes` to `path` so that it appears whole or not at all: into a hidden temporary
/// file in the same folder (same file system), flushed, then renamed over `path`. A folder
/// watcher (Spate's own objectStore source included) never sees a half-written thumbnail, and
/// the `.tmp` name matches no image glob.
pub fn write_atomically(path: &FsPath, bytes: &[u8]) -> std::io::Result<()> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let folder = path.parent().unwrap_or(FsPath::new("."));
    fs::create_dir_all(folder)?;
    let temp = folder.join(format!(
        ".spate-thumbnailer-{}-{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = fs::File::create_new(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::Environment;

    #[test]
    fn a_key_keeps_its_folders_but_cannot_climb_out() {
        assert_eq!(key_segments("photos/a.jpg").unwrap(), ["photos", "a.jpg"]);
        assert_eq!(key_segments("/photos//a.jpg").unwrap(), ["photos", "a.jpg"]);
        for key in ["../a.jpg", "photos/../../a.jpg", "./a.jpg", "/", ""] {
            let failure = key_segments(key).unwrap_err();
            assert_eq!(failure.kind, crate::failure::Kind::Input, "{key}");
        }
    }

    #[test]
    fn output_may_be_a_folder_a_file_url_or_a_store() {
        let env = Environment::of(&[]);
        assert!(matches!(
            Output::parse("/tmp/thumbs", &env).unwrap(),
            Output::Folder(path) if path == FsPath::new("/tmp/thumbs")
        ));
        assert!(matches!(
            Output::parse("thumbs", &env).unwrap(),
            Output::Folder(path) if path == FsPath::new("thumbs")
        ));
        assert!(matches!(
            Output::parse("file:///tmp/my%20thumbs/", &env).unwrap(),
            Output::Folder(path) if path == FsPath::new("/tmp/my thumbs/")
        ));
        match Output::parse("s3://bucket/thumbs/small", &env).unwrap() {
            Output::Store { shown, prefix, .. } => {
                assert_eq!(shown, "s3://bucket/thumbs/small");
                assert_eq!(prefix.as_ref(), "thumbs/small");
            }
            other => panic!("{other:?}"),
        }
        let failure = Output::parse("ftp://host/x", &env).unwrap_err();
        assert!(failure.message.starts_with("--output ftp://host/x: "));
    }

    #[test]
    fn an_atomic_write_replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("photos/a.jpg");
        write_atomically(&path, b"first").unwrap();
        write_atomically(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = fs::read_dir(dir.path().join("photos"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, ["a.jpg"]);
        // A folder in the way: the error surfaces and no temporary file is left behind.
        fs::create_dir_all(dir.path().join("photos/b.jpg/x")).unwrap();
        assert!(write_atomically(&dir.path().join("photos/b.jpg"), b"x").is_err());
        assert_eq!(fs::read_dir(dir.path().join("photos")).unwrap().count(), 2);
    }
}
