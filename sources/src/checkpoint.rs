//! Durable positions of sources that the broker does not remember for them (object-store
//! listings, cron's last tick), so a restart neither misses events nor emits them twice.

use std::path::PathBuf;

use futures::future::BoxFuture;

/// Saves and loads small opaque checkpoints by key.
pub trait CheckpointStore: Send + Sync {
    fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, String>>;
    fn save<'a>(&'a self, key: &'a str, value: Vec<u8>) -> BoxFuture<'a, Result<(), String>>;
}

/// Checkpoints as files in a directory, for a single process (`spate run -f`). Writes go to a
/// temporary file renamed over the old one, so a crash never leaves half a checkpoint.
#[derive(Debug, Clone)]
pub struct FileCheckpoints {
    dir: PathBuf,
}

impl FileCheckpoints {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileCheckpoints { dir: dir.into() }
    }

    fn path(&self, key: &str) -> PathBuf {
        let safe: String = key
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.dir.join(format!("{safe}.checkpoint"))
    }
}

impl CheckpointStore for FileCheckpoints {
    fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, String>> {
        Box::pin(async move {
            match tokio::fs::read(self.path(key)).await {
                Ok(bytes) => Ok(Some(bytes)),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(error) => Err(format!("cannot read checkpoint {key}: {error}")),
            }
        })
    }

    fn save<'a>(&'a self, key: &'a str, value: Vec<u8>) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let path = self.path(key);
            let partial = path.with_extension("partial");
            tokio::fs::create_dir_all(&self.dir)
                .await
                .map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
            tokio::fs::write(&partial, value)
                .await
                .map_err(|e| format!("cannot write {}: {e}", partial.display()))?;
            tokio::fs::rename(&partial, &path)
                .await
                .map_err(|e| format!("cannot replace {}: {e}", path.display()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_saved_checkpoint_survives_a_new_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileCheckpoints::new(dir.path());
        assert_eq!(store.load("default/p").await.unwrap(), None);
        store.save("default/p", b"one".to_vec()).await.unwrap();
        store.save("default/p", b"two".to_vec()).await.unwrap();
        let reopened = FileCheckpoints::new(dir.path());
        assert_eq!(
            reopened.load("default/p").await.unwrap(),
            Some(b"two".to_vec())
        );
    }
}
