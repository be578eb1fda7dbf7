//! The blob store: write-once, encrypted objects in a local folder (default) or S3-compatible
//! storage, through `object_store`. Local writes are fsynced before they count as written.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};

/// Errors of the blob store.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("unsupported blob url {0:?}: use file:///path or s3://bucket/prefix")]
    UnsupportedUrl(String),
    #[error("cannot use blob folder {path}: {source}")]
    Folder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("blob {0} does not exist")]
    NotFound(String),
    #[error("blob {0} already exists; blobs are write-once")]
    AlreadyExists(String),
    #[error("blob store error: {0}")]
    Store(String),
}

fn store_error(error: object_store::Error) -> BlobError {
    match error {
        object_store::Error::NotFound { path, .. } => BlobError::NotFound(path),
        object_store::Error::AlreadyExists { path, .. } => BlobError::AlreadyExists(path),
        other => BlobError::Store(other.to_string()),
    }
}

/// Where blobs live.
#[derive(Debug, Clone)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    /// The root folder when the store is local, so writes can be fsynced.
    local_root: Option<PathBuf>,
}

impl BlobStore {
    /// Opens the store named by a `file://` or `s3://` URL (S3 credentials and endpoint from the
    /// usual `AWS_*` environment variables).
    pub fn open(url: &str) -> Result<Self, BlobError> {
        if let Some(path) = url.strip_prefix("file://") {
            return Self::open_local(PathBuf::from(path));
        }
        if url.starts_with("s3://") {
            let store = object_store::aws::AmazonS3Builder::from_env()
                .with_url(url)
                .build()
                .map_err(|error| BlobError::Store(error.to_string()))?;
            return Ok(Self {
                store: Arc::new(store),
                local_root: None,
            });
        }
        Err(BlobError::UnsupportedUrl(url.to_owned()))
    }

    fn open_local(root: PathBuf) -> Result<Self, BlobError> {
        std::fs::create_dir_all(&root).map_err(|source| BlobError::Folder {
            path: root.clone(),
            source,
        })?;
        let probe = root.join(".write-probe");
        std::fs::write(&probe, b"").map_err(|source| BlobError::Folder {
            path: root.clone(),
            source,
        })?;
        let _ = std::fs::remove_file(&probe);
        let root = root.canonicalize().map_err(|source| BlobError::Folder {
            path: root.clone(),
            source,
        })?;
        let store = object_store::local::LocalFileSystem::new_with_prefix(&root)
            .map_err(|error| BlobError::Store(error.to_string()))?;
        Ok(Self {
            store: Arc::new(store),
            local_root: Some(root),
        })
    }

    /// Writes a new blob; fails if the key exists. Returns once the blob is durable.
    pub async fn put_new(&self, key: &str, contents: Bytes) -> Result<(), BlobError> {
        let location = ObjectPath::from(key);
        let options = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        self.store
            .put_opts(&location, PutPayload::from_bytes(contents), options)
            .await
            .map_err(store_error)?;
        self.sync_local(key).await
    }

    pub async fn get(&self, key: &str) -> Result<Bytes, BlobError> {
        let location = ObjectPath::from(key);
        let result = self.store.get(&location).await.map_err(store_error)?;
        result.bytes().await.map_err(store_error)
    }

    /// Removes a blob; a blob that is already gone is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), BlobError> {
        match self.store.delete(&ObjectPath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(other) => Err(store_error(other)),
        }
    }

    /// Answers whether the store can list its root, for `/readyz`.
    pub async fn ping(&self) -> Result<(), BlobError> {
        self.store
            .list_with_delimiter(None)
            .await
            .map_err(store_error)?;
        Ok(())
    }

    /// The local file of a blob, when the store is a local folder.
    pub fn local_path(&self, key: &str) -> Option<PathBuf> {
        self.local_root.as_ref().map(|root| root.join(key))
    }

    /// `object_store` renames local files into place without fsync; make the file and every
    /// folder up to the root durable so an acknowledged write survives power loss.
    async fn sync_local(&self, key: &str) -> Result<(), BlobError> {
        let Some(root) = self.local_root.clone() else {
            return Ok(());
        };
        let key = key.to_owned();
        tokio::task::spawn_blocking(move || sync_file_and_parents(&root, &key))
            .await
            .map_err(|error| BlobError::Store(error.to_string()))?
    }
}

fn sync_file_and_parents(root: &std::path::Path, key: &str) -> Result<(), BlobError> {
    let file_path = root.join(key);
    let io_error = |path: &std::path::Path, source| BlobError::Folder {
        path: path.to_path_buf(),
        source,
    };
    std::fs::File::open(&file_path)
        .and_then(|file| file.sync_all())
        .map_err(|source| io_error(&file_path, source))?;
    let mut directory = file_path.parent();
    while let Some(current) = directory {
        std::fs::File::open(current)
            .and_then(|folder| folder.sync_all())
            .map_err(|source| io_error(current, source))?;
        if current == root {
            break;
        }
        directory = current.parent();
    }
    Ok(())
}
