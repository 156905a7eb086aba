//! Where backups live: [`Store`], one configured store opened with the
//! rules for reading it (what a reader trusts), and what it holds: a job's
//! series, their backups, their verification records. Also the catalog a
//! config names, and the catalog as the stores' upload journal.

use std::collections::BTreeSet;
use std::sync::Arc;

use backstop_catalog::Catalog;
use backstop_catalog::CatalogError;
use backstop_config::{Config, JobConfig, StorageConfig};
use backstop_storage::{
    Journal, LocalStorage, S3Options, S3Storage, Storage, StorageError, UploadJournal,
};
use backstop_vocab::series;
use tracing::warn;

use crate::trust::{Listing, Trust, list_backups};
use crate::verification::Records;

/// One store of the config, opened, with the trust its reads apply. Every
/// command that reads a store (list, select, verify, prune, sign, rebuild,
/// status) goes through one.
#[derive(Clone)]
pub struct Store {
    name: String,
    storage: Arc<dyn Storage>,
    trust: Trust,
}

impl Store {
    /// The store called `name` in `config`, read with `config`'s trusted
    /// keys as of now.
    ///
    /// # Errors
    /// A message when no such store is configured.
    pub async fn open(config: &Config, name: &str) -> Result<Store, String> {
        Ok(Store::new(
            name,
            open_storage(config, name, None).await?,
            Trust::from_config(config),
        ))
    }

    /// [`Store::open`] for a backup: its multipart uploads are recorded in
    /// `journal` (the catalog), so a crashed run's are found and aborted.
    ///
    /// # Errors
    /// As [`Store::open`].
    pub async fn open_journaled(
        config: &Config,
        name: &str,
        journal: Journal,
    ) -> Result<Store, String> {
        Ok(Store::new(
            name,
            open_storage(config, name, Some(journal)).await?,
            Trust::from_config(config),
        ))
    }

    /// A store already open (the tests' in-memory one, say).
    pub fn new(name: &str, storage: Arc<dyn Storage>, trust: Trust) -> Store {
        Store {
            name: name.to_string(),
            storage,
            trust,
        }
    }

    /// Its name in the config.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The backend, for what reads or writes objects directly.
    pub fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }

    /// The backend, shared.
    pub fn shared(&self) -> Arc<dyn Storage> {
        self.storage.clone()
    }

    /// What its reads believe.
    pub fn trust(&self) -> &Trust {
        &self.trust
    }

    /// The complete backups of one series, newest first, and what was not
    /// trusted.
    ///
    /// # Errors
    /// As [`list_backups`].
    pub async fn backups(&self, series: &JobConfig) -> Result<Listing, StorageError> {
        list_backups(self.storage(), series, &self.trust).await
    }

    /// The series of `job` it holds backups of, as job configs: the job
    /// itself, or for a cluster job its globals and every database with
    /// backups (including databases the server no longer has), by name.
    ///
    /// # Errors
    /// The store's listing error.
    pub async fn series(&self, job: &JobConfig) -> Result<Vec<JobConfig>, StorageError> {
        if job.cluster.is_none() {
            return Ok(vec![job.clone()]);
        }
        let found = self.members(&job.name).await?;
        let mut out = Vec::new();
        if found.contains(series::GLOBALS_SEGMENT) {
            out.push(job.globals_member(&[]));
        }
        let mut dbs: Vec<String> = found
            .iter()
            .filter_map(|s| series::database_of(s))
            .collect();
        dbs.sort();
        out.extend(dbs.iter().map(|d| job.member(d)));
        Ok(out)
    }

    /// Every complete backup of `job`, newest first: its own, or a cluster
    /// job's databases' and globals' together.
    ///
    /// # Errors
    /// The store's listing error.
    pub async fn job_backups(&self, job: &JobConfig) -> Result<Listing, StorageError> {
        let mut all = Listing::default();
        for s in self.series(job).await? {
            let l = self.backups(&s).await?;
            all.backups.extend(l.backups);
            all.untrusted.extend(l.untrusted);
        }
        all.backups.sort_by_key(|m| std::cmp::Reverse(m.started_at));
        Ok(all)
    }

    /// The database segments (and `@globals`) with any object under
    /// `job/`: what earlier runs of a cluster job backed up.
    ///
    /// # Errors
    /// The store's listing error.
    pub async fn members(&self, job: &str) -> Result<BTreeSet<String>, StorageError> {
        let prefix = format!("{job}/");
        Ok(self
            .storage
            .list(&prefix)
            .await?
            .into_iter()
            .filter_map(|o| {
                let rest = o.key.strip_prefix(&prefix)?;
                let (seg, _) = rest.split_once('/')?;
                Some(seg.to_string())
            })
            .collect())
    }

    /// Every verification record of `series`, trusted ones by backup and
    /// the others apart.
    ///
    /// # Errors
    /// As [`crate::verification::read_all`].
    pub async fn verifications(&self, series: &str) -> Result<Records, StorageError> {
        crate::verification::read_all(self.storage(), series, &self.name, &self.trust).await
    }
}

/// Opens the catalog `config` names (a SQLite file, or a fleet's
/// PostgreSQL database with its password from the config's secret).
///
/// # Errors
/// As [`Catalog::open`].
pub async fn open_catalog(config: &Config) -> Result<Catalog, CatalogError> {
    Catalog::open(catalog_location(config)).await
}

/// Where the catalog of `config` is.
pub fn catalog_location(config: &Config) -> backstop_catalog::Location<'_> {
    backstop_catalog::Location::new(
        &config.catalog,
        config
            .daemon
            .catalog_password
            .as_ref()
            .map(backstop_config::Secret::expose),
    )
    .with_pool_size(config.daemon.catalog_connections)
}

/// The backend for the store called `name` (what [`Store`] holds).
///
/// # Errors
/// A message when no such store is configured.
async fn open_storage(
    config: &Config,
    name: &str,
    journal: Option<Journal>,
) -> Result<Arc<dyn Storage>, String> {
    match config.storages.get(name) {
        Some(StorageConfig::Local { path }) => Ok(Arc::new(LocalStorage::new(path.clone()))),
        Some(StorageConfig::S3(s)) => Ok(Arc::new(
            S3Storage::new(S3Options {
                name: name.to_string(),
                bucket: s.bucket.clone(),
                prefix: s.prefix.clone(),
                region: s.region.clone(),
                endpoint: s.endpoint.clone(),
                force_path_style: s.force_path_style,
                storage_class: s.storage_class.clone(),
                sse: s.sse.clone(),
                kms_key_id: s.kms_key_id.clone(),
                credentials: s.credentials.as_ref().map(|c| {
                    (
                        c.access_key_id.clone(),
                        c.secret_access_key.expose().to_string(),
                    )
                }),
                part_size: s.part_size,
                max_in_flight_parts: s.max_in_flight_parts,
                max_parts: s.max_parts,
                equal_parts: s.equal_parts,
            })
            .await
            .with_journal(journal),
        )),
        None => Err(format!(
            "no storage named \"{name}\" in {}",
            config.source.display()
        )),
    }
}

/// The catalog as the stores' upload journal. A journal write that fails is
/// logged: losing it only means a crash could leave an upload for the store's
/// own listing (or lifecycle rule) to find.
pub struct CatalogJournal(pub Catalog);

#[async_trait::async_trait]
impl UploadJournal for CatalogJournal {
    async fn started(&self, store: &str, key: &str, upload_id: &str) {
        if let Err(e) = self.0.record_upload(store, key, upload_id).await {
            warn!(store, key, error = %e, "Could not record a multipart upload in the catalog.");
        }
    }

    async fn ended(&self, store: &str, upload_id: &str) {
        if let Err(e) = self.0.forget_upload(store, upload_id).await {
            warn!(store, error = %e, "Could not clear a multipart upload from the catalog.");
        }
    }
}
