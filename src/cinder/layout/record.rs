//! The backup record `cinder backup-import <service> <url>` takes: base64 of the JSON that
//! `Backup.encode_record(driver_info={})` produces on export.

use base64::Engine as _;

use super::error::CinderError;
use super::pyjson::{self, Py};
use super::time::UtcTime;

/// `backup.service` of backups made by the S3 driver; also the `backup_service` argument of
/// `cinder backup-import` (it must be a prefix of the importing host's `backup_driver`).
pub const S3_BACKUP_SERVICE: &str = "cinder.backup.drivers.s3.S3BackupDriver";

/// The volume id the import API puts on a record that has none.
pub const IMPORT_VOLUME_ID: &str = "00000000-0000-0000-0000-000000000000";

/// The fields `cinder backup-manager` requires in an imported record.
pub const REQUIRED_FIELDS: [&str; 7] = [
    "id",
    "size",
    "display_name",
    "display_description",
    "container",
    "service_metadata",
    "object_count",
];

/// The database row Cinder needs to restore a backup written outside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupRecord {
    /// Backup UUID (the import creates the row with this id; parents must be imported first).
    pub id: String,
    /// Source volume UUID; `None` writes the import placeholder id.
    pub volume_id: Option<String>,
    /// Bucket (`container`).
    pub container: String,
    /// Parent backup UUID for an incremental.
    pub parent_id: Option<String>,
    /// Volume size in GiB (`backup.size`; also the quota reserved).
    pub size_gib: u64,
    /// `display_name`.
    pub display_name: Option<String>,
    /// `display_description`.
    pub display_description: Option<String>,
    /// The object prefix.
    pub service_metadata: String,
    /// Number of data objects.
    pub object_count: u64,
    /// Availability zone of the writer (overwritten by the importer).
    pub availability_zone: Option<String>,
    /// Creation time.
    pub created_at: Option<UtcTime>,
    /// Time of the data (Cinder picks the parent of the next incremental by the latest).
    pub data_timestamp: Option<UtcTime>,
}

impl BackupRecord {
    /// The JSON `encode_record` writes: `driver_info` first, then every `Backup` field in its
    /// declaration order (`parent` excluded), `json.dumps` default separators.
    pub fn to_json(&self) -> Vec<u8> {
        let s = |v: &str| Py::Str(v.to_owned());
        let opt = |v: &Option<String>| v.as_deref().map_or(Py::Null, s);
        let time = |t: &Option<UtcTime>| t.map_or(Py::Null, |t| Py::Str(t.iso_z()));
        let record = Py::Dict(vec![
            ("driver_info".into(), Py::Dict(vec![])),
            ("id".into(), s(&self.id)),
            ("user_id".into(), Py::Null),
            ("project_id".into(), Py::Null),
            ("volume_id".into(), s(self.volume_id.as_deref().unwrap_or(IMPORT_VOLUME_ID))),
            ("host".into(), Py::Null),
            ("availability_zone".into(), opt(&self.availability_zone)),
            ("container".into(), s(&self.container)),
            ("parent_id".into(), opt(&self.parent_id)),
            ("status".into(), s("available")),
            ("fail_reason".into(), Py::Null),
            ("size".into(), Py::UInt(self.size_gib)),
            ("display_name".into(), opt(&self.display_name)),
            ("display_description".into(), opt(&self.display_description)),
            ("service_metadata".into(), s(&self.service_metadata)),
            ("service".into(), s(S3_BACKUP_SERVICE)),
            ("object_count".into(), Py::UInt(self.object_count)),
            ("temp_volume_id".into(), Py::Null),
            ("temp_snapshot_id".into(), Py::Null),
            ("num_dependent_backups".into(), Py::UInt(0)),
            ("snapshot_id".into(), Py::Null),
            ("data_timestamp".into(), time(&self.data_timestamp)),
            ("restore_volume_id".into(), Py::Null),
            ("metadata".into(), Py::Dict(vec![])),
            ("encryption_key_id".into(), Py::Null),
            ("created_at".into(), time(&self.created_at)),
            ("updated_at".into(), Py::Null),
            ("deleted_at".into(), Py::Null),
            ("deleted".into(), Py::Bool(false)),
        ]);
        pyjson::dumps_default(&record)
    }

    /// The `backup_url` argument of `cinder backup-import`: standard base64 of [`Self::to_json`].
    pub fn encode(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.to_json())
    }
}

/// Decodes a `backup_url` as Cinder's importer does and checks the fields it requires.
///
/// # Errors
/// [`CinderError::RecordBase64`], [`CinderError::Json`] (document "backup record") or
/// [`CinderError::RecordField`] naming the first missing required field.
pub fn decode_record(url: &str) -> Result<serde_json::Map<String, serde_json::Value>, CinderError> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(url.trim())?;
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes)
        .map_err(|source| CinderError::Json { document: "backup record", source })?;
    if let Some(field) = REQUIRED_FIELDS.iter().find(|f| !map.contains_key(**f)) {
        return Err(CinderError::RecordField(field));
    }
    Ok(map)
}
