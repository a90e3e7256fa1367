//! Object names: the prefix `S3BackupDriver._generate_object_name_prefix` builds and the names
//! hung off it.

use super::time::UtcTime;

/// Cinder's default `storage_availability_zone`.
pub const DEFAULT_AVAILABILITY_ZONE: &str = "nova";

/// `volume_<volume_id>/<%Y%m%d%H%M%S>/az_<az>_backup_<backup_id>`, the `service_metadata` of a
/// backup; `started` is the UTC time the backup starts (Cinder reads `utcnow()` when it makes the
/// prefix, not `created_at`).
pub fn object_prefix(
    volume_id: &str,
    backup_id: &str,
    availability_zone: &str,
    started: &UtcTime,
) -> String {
    format!(
        "volume_{volume_id}/{}/az_{availability_zone}_backup_{backup_id}",
        started.prefix_stamp()
    )
}

/// `'%s-%05d' % (prefix, number)`: data object `number`, counted from 1 in every backup.
/// Five digits are a minimum, not a maximum: object 100000 is `-100000`.
pub fn data_object_name(prefix: &str, number: u64) -> String {
    format!("{prefix}-{number:05}")
}

/// `<prefix>_metadata`, written last.
pub fn metadata_name(prefix: &str) -> String {
    format!("{prefix}_metadata")
}

/// `<prefix>_sha256file`, written just before the metadata.
pub fn sha256file_name(prefix: &str) -> String {
    format!("{prefix}_sha256file")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names match the reference's example and Python's `%05d`.
    #[test]
    fn names() {
        let t = UtcTime::from_unix(1_740_830_407, 123);
        let p = object_prefix(
            "6f1c2a4e-0000-4000-8000-000000000001",
            "9b0d7c1e-0000-4000-8000-0000000000aa",
            DEFAULT_AVAILABILITY_ZONE,
            &t,
        );
        assert_eq!(
            p,
            "volume_6f1c2a4e-0000-4000-8000-000000000001/20250301120007/\
             az_nova_backup_9b0d7c1e-0000-4000-8000-0000000000aa"
        );
        assert_eq!(data_object_name("p", 1), "p-00001");
        assert_eq!(data_object_name("p", 99_999), "p-99999");
        assert_eq!(data_object_name("p", 100_000), "p-100000");
        assert_eq!(metadata_name("p"), "p_metadata");
        assert_eq!(sha256file_name("p"), "p_sha256file");
    }
}
