//! The local directory backend: `<root>/<job>/<backup-id>/<file>`.
//!
//! Objects are written under a hidden temporary name, fsynced, renamed into
//! place and the directory fsynced, so a crash never leaves a half-written
//! file under a real name. Files are 0600 and directories 0700: backups are
//! for the backup user only.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWriteExt};

use crate::{ByteStream, ObjectMeta, PendingUpload, Storage, StorageError, StreamItem, check_key};

/// A store in a local directory.
#[derive(Debug, Clone)]
pub struct LocalStorage {
    root: PathBuf,
}

/// Removes the temporary file unless the write was committed, including when
/// the upload future is dropped half-way (cancellation, timeout).
struct TempGuard {
    path: Option<PathBuf>,
    root: PathBuf,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(&p);
            remove_empty_parents(&self.root, &p);
        }
    }
}

/// Removes the now-empty directories above `path` (backup, then job folder),
/// never `root` itself.
fn remove_empty_parents(root: &Path, path: &Path) {
    let mut dir = path.parent();
    while let Some(d) = dir {
        if d == root || !d.starts_with(root) || std::fs::remove_dir(d).is_err() {
            break;
        }
        dir = d.parent();
    }
}

fn io_err(op: &'static str, path: &Path, error: io::Error) -> StorageError {
    StorageError::Io {
        op,
        location: path.display().to_string(),
        error,
    }
}

impl LocalStorage {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, key: &str) -> Result<PathBuf, StorageError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    async fn create_parent(&self, path: &Path) -> Result<PathBuf, StorageError> {
        let parent = path.parent().unwrap_or(&self.root).to_path_buf();
        let p = parent.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&p)
        })
        .await
        .map_err(|e| io_err("create directory", &parent, io::Error::other(e)))?
        .map_err(|e| io_err("create directory", &parent, e))?;
        Ok(parent)
    }

    async fn open_temp(
        &self,
        path: &Path,
    ) -> Result<(tokio::fs::File, TempGuard, PathBuf), StorageError> {
        let parent = self.create_parent(path).await?;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("object");
        let tmp = parent.join(format!(".{name}.partial-{:08x}", rand::random::<u32>()));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .await
            .map_err(|e| io_err("create", &tmp, e))?;
        Ok((
            file,
            TempGuard {
                path: Some(tmp.clone()),
                root: self.root.clone(),
            },
            tmp,
        ))
    }

    async fn commit(
        &self,
        mut file: tokio::fs::File,
        mut guard: TempGuard,
        tmp: &Path,
        path: &Path,
    ) -> Result<(), StorageError> {
        file.flush().await.map_err(|e| io_err("write", tmp, e))?;
        file.sync_all().await.map_err(|e| io_err("fsync", tmp, e))?;
        drop(file);
        tokio::fs::rename(tmp, path)
            .await
            .map_err(|e| io_err("rename", path, e))?;
        guard.path = None;
        // Make the rename itself durable.
        if let Some(parent) = path.parent() {
            let dir = tokio::fs::File::open(parent)
                .await
                .map_err(|e| io_err("open directory", parent, e))?;
            dir.sync_all()
                .await
                .map_err(|e| io_err("fsync directory", parent, e))?;
        }
        Ok(())
    }
}

#[async_trait]
impl Storage for LocalStorage {
    fn describe(&self) -> String {
        format!("local directory {}", self.root.display())
    }

    async fn put_stream(&self, key: &str, mut body: ByteStream) -> Result<u64, StorageError> {
        let path = self.path_of(key)?;
        let (mut file, guard, tmp) = self.open_temp(&path).await?;
        let mut written = 0u64;
        loop {
            match body.recv().await {
                Some(StreamItem::Data(chunk)) => {
                    file.write_all(&chunk)
                        .await
                        .map_err(|e| io_err("write", &tmp, e))?;
                    written += chunk.len() as u64;
                }
                Some(StreamItem::Finish) => break,
                None => {
                    return Err(StorageError::Aborted {
                        key: key.to_string(),
                        reason: "the stream ended without completing".into(),
                    });
                }
            }
        }
        self.commit(file, guard, &tmp, &path).await?;
        Ok(written)
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
        let path = self.path_of(key)?;
        let (mut file, guard, tmp) = self.open_temp(&path).await?;
        file.write_all(&data)
            .await
            .map_err(|e| io_err("write", &tmp, e))?;
        self.commit(file, guard, &tmp, &path).await
    }

    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        let path = self.path_of(key)?;
        match tokio::fs::read(&path).await {
            Ok(b) => Ok(Bytes::from(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(StorageError::NotFound(key.into()))
            }
            Err(e) => Err(io_err("read", &path, e)),
        }
    }

    async fn open_range(
        &self,
        key: &str,
        start: u64,
        end: Option<u64>,
    ) -> Result<Box<dyn AsyncRead + Send + Unpin>, StorageError> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let path = self.path_of(key)?;
        let mut f = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StorageError::NotFound(key.into()));
            }
            Err(e) => return Err(io_err("open", &path, e)),
        };
        if start > 0 {
            f.seek(std::io::SeekFrom::Start(start))
                .await
                .map_err(|e| io_err("seek", &path, e))?;
        }
        Ok(match end {
            Some(end) => Box::new(f.take(end.saturating_sub(start))),
            None => Box::new(f),
        })
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        tokio::task::spawn_blocking(move || list_blocking(&root, &prefix))
            .await
            .map_err(|e| io_err("list", Path::new("(task)"), io::Error::other(e)))?
    }

    async fn probe(&self, write: bool) -> Result<String, StorageError> {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            match std::fs::metadata(&root) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(io_err(
                        "probe",
                        &root,
                        io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
                    ));
                }
                // Created by the first backup; the write probe tells whether it can be.
                Err(e) if e.kind() == io::ErrorKind::NotFound && !write => {
                    return Ok(
                        "directory does not exist yet; the first backup creates it".to_string()
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("probe", &root, e)),
            }
            if !write {
                return Ok("directory exists".to_string());
            }
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&root)
                .map_err(|e| io_err("create directory", &root, e))?;
            let probe = root.join(format!(".backstop-probe-{:08x}", rand::random::<u32>()));
            std::fs::write(&probe, b"backstop write probe\n")
                .map_err(|e| io_err("write", &probe, e))?;
            std::fs::remove_file(&probe).map_err(|e| io_err("delete", &probe, e))?;
            Ok("directory exists, write and delete allowed".to_string())
        })
        .await
        .map_err(|e| io_err("probe", Path::new("(task)"), io::Error::other(e)))?
    }

    /// Temp files (`.NAME.partial-…`) under `prefix` that no upload will
    /// finish: left by a process that was killed mid-write.
    async fn pending_uploads(&self, prefix: &str) -> Result<Vec<PendingUpload>, StorageError> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let mut stack = vec![root.clone()];
            while let Some(dir) = stack.pop() {
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for e in entries.flatten() {
                    let path = e.path();
                    let Ok(rel) = path.strip_prefix(&root) else {
                        continue;
                    };
                    let rel = rel.to_string_lossy().into_owned();
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(path);
                    } else if rel.starts_with(&prefix)
                        && e.file_name().to_string_lossy().starts_with('.')
                        && rel.contains(".partial-")
                    {
                        out.push(PendingUpload {
                            key: rel.clone(),
                            upload_id: rel,
                            initiated_unix: None,
                        });
                    }
                }
            }
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .await
        .map_err(|e| io_err("list", Path::new("(task)"), io::Error::other(e)))?
    }

    async fn abort_upload(&self, upload: &PendingUpload) -> Result<(), StorageError> {
        let rel = Path::new(&upload.upload_id);
        let ok = rel
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            && !rel
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)));
        if !ok {
            return Err(StorageError::BadKey(upload.upload_id.clone()));
        }
        self.remove(self.root.join(rel)).await
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        self.remove(self.path_of(key)?).await
    }
}

impl LocalStorage {
    /// Removes a file (a missing one is fine) and the backup and job
    /// directories it leaves empty, never the root.
    async fn remove(&self, path: PathBuf) -> Result<(), StorageError> {
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("delete", &path, e)),
        }
        let root = self.root.clone();
        let _ = tokio::task::spawn_blocking(move || remove_empty_parents(&root, &path)).await;
        Ok(())
    }
}

fn list_blocking(root: &Path, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
    list_walk(root, prefix, |_| {})
}

/// The walk behind [`list_blocking`]. `before_examining` is called with
/// each entry's path after its directory was read and before the entry's
/// type and size are looked up: the moment a concurrent prune can delete
/// it. Tests delete entries there; the listing passes a no-op.
fn list_walk(
    root: &Path,
    prefix: &str,
    mut before_examining: impl FnMut(&Path),
) -> Result<Vec<ObjectMeta>, StorageError> {
    let mut out = Vec::new();
    match std::fs::metadata(root) {
        Ok(m) if m.is_dir() => {}
        // An absent root is an empty store (nothing was ever written); a root
        // that is not a directory is a misconfiguration and must not look empty.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Ok(_) => {
            return Err(io_err(
                "list",
                root,
                io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
            ));
        }
        Err(e) => return Err(io_err("list", root, e)),
    }
    // From the prefix's own folder, not the root: listing one job must not
    // walk every other job's backups (a store of N jobs would cost N² on
    // each status read). Keys stay relative to the root.
    let mut stack = vec![walk_start(root, prefix)];
    while let Some(dir) = stack.pop() {
        // Read whole, then examined: a directory gone by now (its backup
        // was pruned, or the job's last one) lists nothing.
        let read = std::fs::read_dir(&dir).and_then(|d| d.collect::<io::Result<Vec<_>>>());
        let Some(entries) = unless_vanished(read, "list", &dir)? else {
            continue;
        };
        for entry in entries {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') {
                continue; // in-progress temporary files
            }
            let path = entry.path();
            before_examining(&path);
            let Some(ft) = unless_vanished(entry.file_type(), "list", &path)? else {
                continue;
            };
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file() {
                let key = path
                    .strip_prefix(root)
                    .expect("walk stays under root")
                    .to_string_lossy()
                    .into_owned();
                if key.starts_with(prefix)
                    && let Some(meta) = unless_vanished(entry.metadata(), "stat", &path)?
                {
                    out.push(ObjectMeta {
                        key,
                        size: meta.len(),
                    });
                }
            }
        }
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

/// The deepest folder every key under `prefix` lies in: `root/a/b` for
/// `a/b/` or `a/b/c`, the root itself for a prefix without a folder or
/// one that names a hidden or unusual path.
fn walk_start(root: &Path, prefix: &str) -> PathBuf {
    let Some((folders, _)) = prefix.rsplit_once('/') else {
        return root.to_path_buf();
    };
    let plain = !folders.is_empty()
        && folders
            .split('/')
            .all(|c| !c.is_empty() && !c.starts_with('.'));
    if plain {
        root.join(folders)
    } else {
        root.to_path_buf()
    }
}

/// The result of a look at one entry of a listing's walk (a directory read,
/// a file's type or size), `None` when the entry no longer exists: a
/// concurrent prune or delete removed it after its parent directory was
/// read, and it is simply not listed. Any other error fails the listing.
fn unless_vanished<T>(
    result: io::Result<T>,
    op: &'static str,
    path: &Path,
) -> Result<Option<T>, StorageError> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(op, path, e)),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use tokio::sync::mpsc;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "backstop-local-{tag}-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test]
    async fn stream_commits_with_private_modes() {
        let root = tmpdir("ok");
        let s = LocalStorage::new(root.join("store"));
        let (tx, rx) = mpsc::channel(3);
        tx.send(StreamItem::Data(Bytes::from_static(b"abc")))
            .await
            .unwrap();
        tx.send(StreamItem::Data(Bytes::from_static(b"def")))
            .await
            .unwrap();
        tx.send(StreamItem::Finish).await.unwrap();
        drop(tx);
        let n = s.put_stream("job/id1/database.dump", rx).await.unwrap();
        assert_eq!(n, 6);
        let p = root.join("store/job/id1/database.dump");
        assert_eq!(std::fs::read(&p).unwrap(), b"abcdef");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let d = root.join("store/job/id1");
        assert_eq!(
            std::fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let listed = s.list("job/").await.unwrap();
        assert_eq!(
            listed,
            vec![ObjectMeta {
                key: "job/id1/database.dump".into(),
                size: 6
            }]
        );
        std::fs::remove_dir_all(root).unwrap();
    }

    #[tokio::test]
    async fn stream_without_finish_leaves_nothing() {
        let root = tmpdir("abort");
        let s = LocalStorage::new(&root);
        let (tx, rx) = mpsc::channel(2);
        tx.send(StreamItem::Data(Bytes::from_static(b"abc")))
            .await
            .unwrap();
        drop(tx);
        let err = s.put_stream("job/id1/database.dump", rx).await.unwrap_err();
        assert!(err.to_string().contains("without completing"), "{err}");
        assert!(
            !root.join("job").exists(),
            "temp file or folder left behind"
        );
        assert!(s.list("").await.unwrap().is_empty());
        std::fs::remove_dir_all(root).unwrap();
    }

    #[tokio::test]
    async fn dropped_upload_leaves_nothing() {
        let root = tmpdir("drop");
        let s = LocalStorage::new(&root);
        let (tx, rx) = mpsc::channel(2);
        tx.send(StreamItem::Data(Bytes::from_static(b"abc")))
            .await
            .unwrap();
        // The sender stays open: the upload is in progress when it is cancelled.
        let fut = s.put_stream("job/id1/database.dump", rx);
        let r = tokio::time::timeout(std::time::Duration::from_millis(50), fut).await;
        assert!(r.is_err());
        drop(tx);
        assert!(
            !root.join("job").exists(),
            "temp file or folder left behind"
        );
        std::fs::remove_dir_all(root).unwrap();
    }

    #[tokio::test]
    async fn root_that_is_a_file_fails_listing_and_writing() {
        let root = tmpdir("file");
        let f = root.join("not-a-dir");
        std::fs::write(&f, b"x").unwrap();
        let s = LocalStorage::new(&f);
        assert!(s.list("").await.is_err());
        let (tx, rx) = mpsc::channel(1);
        tx.send(StreamItem::Finish).await.unwrap();
        let err = s.put_stream("job/id/x", rx).await.unwrap_err();
        assert!(err.to_string().contains("create directory"), "{err}");
        std::fs::remove_dir_all(root).unwrap();
    }

    #[tokio::test]
    async fn partial_files_of_a_killed_writer_are_pending_and_abortable() {
        let root = tmpdir("pending");
        let s = LocalStorage::new(&root);
        s.put("job/b1/manifest.json", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        let dir = root.join("job/b2");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(".database.dump.zst.age.partial-0badf00d"), b"half").unwrap();
        std::fs::create_dir_all(root.join("other")).unwrap();
        std::fs::write(root.join("other/.x.partial-1"), b"x").unwrap();
        let p = s.pending_uploads("job/").await.unwrap();
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "job/b2/.database.dump.zst.age.partial-0badf00d");
        s.abort_upload(&p[0]).await.unwrap();
        assert!(!dir.exists(), "the emptied backup folder goes too");
        assert!(root.join("job/b1/manifest.json").exists());
        let escape = PendingUpload {
            key: "../x".into(),
            upload_id: "../.x".into(),
            initiated_unix: None,
        };
        assert!(s.abort_upload(&escape).await.is_err());
        std::fs::remove_dir_all(root).unwrap();
    }

    /// A store of one job with three backups: b1 (one file), b2 and b3
    /// (two files each).
    fn three_backups(tag: &str) -> PathBuf {
        let root = tmpdir(tag);
        for f in ["job/b1/a", "job/b2/a", "job/b2/b", "job/b3/a", "job/b3/b"] {
            let p = root.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, b"x").unwrap();
        }
        root
    }

    /// Lists `root` under "job/" while a prune deletes `gone` (a folder or
    /// a file) after its directory was read and before it is examined,
    /// where a concurrent prune can delete it.
    fn list_while_deleting(root: &Path, gone: &str) -> Result<Vec<String>, StorageError> {
        let gone = root.join(gone);
        let listed = list_walk(root, "job/", |p| {
            if p == gone {
                if p.is_dir() {
                    std::fs::remove_dir_all(p).unwrap();
                } else {
                    std::fs::remove_file(p).unwrap();
                }
            }
        })?;
        Ok(listed.into_iter().map(|m| m.key).collect())
    }

    // Regression (issue 28, item 11): listing a store while another job's
    // prune deleted a backup failed with "No such file or directory".

    #[test]
    fn a_backup_folder_deleted_during_the_listing_is_not_listed() {
        let root = three_backups("vanish-dir");
        let keys = list_while_deleting(&root, "job/b2").unwrap();
        assert_eq!(keys, ["job/b1/a", "job/b3/a", "job/b3/b"]);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_file_deleted_before_its_size_is_read_is_not_listed() {
        let root = three_backups("vanish-file");
        let keys = list_while_deleting(&root, "job/b3/a").unwrap();
        assert_eq!(keys, ["job/b1/a", "job/b2/a", "job/b2/b", "job/b3/b"]);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_job_folder_deleted_during_the_listing_lists_nothing() {
        let root = three_backups("vanish-job");
        // A listing of the whole store, which reads the job's folder from
        // the root's entries.
        let gone = root.join("job");
        let listed = list_walk(&root, "", |p| {
            if p == gone {
                std::fs::remove_dir_all(p).unwrap();
            }
        })
        .unwrap();
        assert!(listed.is_empty(), "{listed:?}");
        // A job's own listing whose folder is gone before it is read.
        assert!(list_blocking(&root, "job/").unwrap().is_empty());
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_jobs_listing_reads_only_its_own_folder() {
        let root = three_backups("own-folder");
        for f in ["other/b1/a", "other/b2/a", "job2/b1/a"] {
            let p = root.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, b"x").unwrap();
        }
        let mut seen = Vec::new();
        let listed = list_walk(&root, "job/", |p| {
            seen.push(
                p.strip_prefix(&root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
            );
        })
        .unwrap();
        let keys: Vec<String> = listed.into_iter().map(|m| m.key).collect();
        assert_eq!(keys.len(), 5, "{keys:?}");
        assert!(seen.iter().all(|p| p.starts_with("job/")), "{seen:?}");
        assert_eq!(walk_start(&root, "job/b2/"), root.join("job/b2"));
        assert_eq!(walk_start(&root, "job/b2/manifest"), root.join("job/b2"));
        assert_eq!(walk_start(&root, "job"), root);
        assert_eq!(walk_start(&root, "../x/"), root);
        assert_eq!(walk_start(&root, ".hidden/x/"), root);
        assert_eq!(walk_start(&root, "a//b/"), root);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn only_a_vanished_entry_is_skipped_other_errors_fail_the_listing() {
        let p = Path::new("/store/job/b1");
        let gone = io::Error::from(io::ErrorKind::NotFound);
        assert!(matches!(
            unless_vanished::<()>(Err(gone), "list", p),
            Ok(None)
        ));
        assert!(matches!(unless_vanished(Ok(7), "list", p), Ok(Some(7))));
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        let err = unless_vanished::<()>(Err(denied), "list", p).unwrap_err();
        assert!(
            matches!(&err, StorageError::Io { op: "list", location, error }
                if location == "/store/job/b1" && error.kind() == io::ErrorKind::PermissionDenied),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn delete_removes_empty_dirs_but_not_root() {
        let root = tmpdir("del");
        let s = LocalStorage::new(&root);
        s.put("job/id/a", Bytes::from_static(b"1")).await.unwrap();
        s.delete("job/id/a").await.unwrap();
        s.delete("job/id/a").await.unwrap();
        assert!(root.exists());
        assert!(!root.join("job").exists());
        std::fs::remove_dir_all(root).unwrap();
    }
}
