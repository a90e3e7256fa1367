//! The JSON shapes of the Lightbits REST API v2 that ferry reads and sends, with the field names of
//! the reference (`UUID`, `ETag`, `acl.values`, `IPAcl.values`, `nvmeEndpoint`, `subsystemNQN`), and
//! the state sets the polling helpers stop on.
//!
//! No I/O here; unknown fields are ignored and unknown states parse as `Unknown`.

use serde::{Deserialize, Serialize};

/// ACL value meaning "no host may connect" (what an empty ACL is written as).
pub const ACL_ALLOW_NONE: &str = "ALLOW_NONE";

/// ACL value meaning "any host may connect".
pub const ACL_ALLOW_ANY: &str = "ALLOW_ANY";

/// The fixed NVMe/TCP discovery port the discovery-client file names (reference B.5/B.6).
pub const DISCOVERY_PORT: u16 = 8009;

/// State of a volume (reference B.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VolumeState {
    /// Being created.
    Creating,
    /// Ready.
    Available,
    /// Being deleted.
    Deleting,
    /// Deleted.
    Deleted,
    /// Failed.
    Failed,
    /// Being updated (for example an ACL change).
    Updating,
    /// Being migrated (usable).
    Migrating,
    /// Being rolled back to a snapshot.
    Rollback,
    /// Unknown, also any state this code does not know and the driver's pseudo-state `UNKNOWN`.
    #[serde(other)]
    Unknown,
}

impl VolumeState {
    /// True when "wait until available" stops polling (reference B.3: Available, Deleting, Deleted,
    /// Failed, UNKNOWN, Migrating, Rollback).
    pub fn is_settled(self) -> bool {
        !matches!(self, VolumeState::Creating | VolumeState::Updating)
    }

    /// True when a settled volume counts as available (Available or Migrating).
    pub fn is_usable(self) -> bool {
        matches!(self, VolumeState::Available | VolumeState::Migrating)
    }
}

/// State of a snapshot (reference B.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotState {
    /// Being created.
    Creating,
    /// Ready.
    Available,
    /// Being deleted.
    Deleting,
    /// Deleted.
    Deleted,
    /// Failed.
    Failed,
    /// Being updated.
    Updating,
    /// Unknown, also any state this code does not know.
    #[serde(other)]
    Unknown,
}

impl SnapshotState {
    /// True when "wait until available" stops polling (Available, Deleting, Deleted, Failed,
    /// UNKNOWN).
    pub fn is_settled(self) -> bool {
        !matches!(self, SnapshotState::Creating | SnapshotState::Updating)
    }
}

/// An ACL: `{"values": [...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Acl {
    /// Host NQNs (for `acl`) or IP addresses (for `IPAcl`), or `ALLOW_NONE` / `ALLOW_ANY`.
    #[serde(default)]
    pub values: Vec<String>,
}

impl Acl {
    /// An ACL of the given values, `["ALLOW_NONE"]` when empty (the driver's rule, B.5).
    pub fn of(values: Vec<String>) -> Acl {
        if values.is_empty() {
            Acl { values: vec![ACL_ALLOW_NONE.to_owned()] }
        } else {
            Acl { values }
        }
    }

    /// True when `value` is listed.
    pub fn contains(&self, value: &str) -> bool {
        self.values.iter().any(|listed| listed == value)
    }

    /// This ACL with `host_nqn` added and `ALLOW_NONE` removed (what `initialize_connection`
    /// does).
    #[must_use]
    pub fn with_host(&self, host_nqn: &str) -> Acl {
        let mut values: Vec<String> =
            self.values.iter().filter(|value| *value != ACL_ALLOW_NONE).cloned().collect();
        if !values.iter().any(|value| value == host_nqn) {
            values.push(host_nqn.to_owned());
        }
        Acl::of(values)
    }

    /// This ACL without `host_nqn` (`["ALLOW_NONE"]` if that empties it).
    #[must_use]
    pub fn without_host(&self, host_nqn: &str) -> Acl {
        Acl::of(self.values.iter().filter(|value| *value != host_nqn).cloned().collect())
    }

    /// The entries that grant access to someone other than `host_nqn` (including `ALLOW_ANY`).
    pub fn others(&self, host_nqn: &str) -> Vec<String> {
        self.values
            .iter()
            .filter(|value| *value != ACL_ALLOW_NONE && *value != host_nqn)
            .cloned()
            .collect()
    }
}

/// A volume as the API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Volume {
    /// Server-assigned UUID; also the NVMe namespace UUID seen on the host.
    #[serde(rename = "UUID")]
    pub uuid: String,
    /// Name, unique per project.
    #[serde(default)]
    pub name: String,
    /// State.
    #[serde(default = "unknown_volume_state")]
    pub state: VolumeState,
    /// Version tag for `If-Match`.
    #[serde(rename = "ETag", default)]
    pub etag: String,
    /// Host NQN ACL.
    #[serde(default)]
    pub acl: Acl,
    /// IP ACL (absent on clusters without it).
    #[serde(rename = "IPAcl", default, skip_serializing_if = "Option::is_none")]
    pub ip_acl: Option<Acl>,
    /// Size: bytes, as a number or a string (pve-lightbits), or `"<N> gib"` (Cinder requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<serde_json::Value>,
    /// Replica count (a string in requests; whatever the server returns here).
    #[serde(rename = "replicaCount", default, skip_serializing_if = "Option::is_none")]
    pub replica_count: Option<serde_json::Value>,
    /// Compression (`"True"`/`"False"` in requests; whatever the server returns here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<serde_json::Value>,
}

fn unknown_volume_state() -> VolumeState {
    VolumeState::Unknown
}

fn unknown_snapshot_state() -> SnapshotState {
    SnapshotState::Unknown
}

impl Volume {
    /// The size in bytes, when the server gave it as a byte count (number or digit string).
    pub fn size_bytes(&self) -> Option<u64> {
        match self.size.as_ref()? {
            serde_json::Value::Number(number) => number.as_u64(),
            serde_json::Value::String(text) => text.trim().parse().ok(),
            _ => None,
        }
    }
}

/// A snapshot as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Server-assigned UUID.
    #[serde(rename = "UUID")]
    pub uuid: String,
    /// Name, unique per project.
    #[serde(default)]
    pub name: String,
    /// State.
    #[serde(default = "unknown_snapshot_state")]
    pub state: SnapshotState,
    /// UUID of the volume it was taken of.
    #[serde(rename = "sourceVolumeUUID", default, skip_serializing_if = "Option::is_none")]
    pub source_volume_uuid: Option<String>,
}

/// `GET /api/v2/clusterinfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// Cluster UUID.
    #[serde(rename = "UUID", default)]
    pub uuid: String,
    /// The cluster's NVMe subsystem NQN (one per cluster).
    #[serde(rename = "subsystemNQN")]
    pub subsystem_nqn: String,
}

/// One entry of `GET /api/v2/nodes` (`{"nodes": [...]}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Node UUID.
    #[serde(rename = "UUID", default)]
    pub uuid: String,
    /// `<ip>:<port>`, IPv6 as `[addr]:port`.
    #[serde(rename = "nvmeEndpoint", default)]
    pub nvme_endpoint: String,
}

/// The `{"nodes": [...]}` wrapper.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct NodeList {
    pub(crate) nodes: Vec<Node>,
}

/// An NVMe/TCP endpoint: address (IPv6 without brackets) and port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// IP address or host name; IPv6 without brackets.
    pub address: String,
    /// TCP port.
    pub port: u16,
}

impl Endpoint {
    /// Parses `ip:port` or `[ipv6]:port` (the `nvmeEndpoint` form); `None` if malformed.
    pub fn parse(text: &str) -> Option<Endpoint> {
        let text = text.trim();
        let (address, port) = if let Some(rest) = text.strip_prefix('[') {
            let (address, rest) = rest.split_once(']')?;
            (address, rest.strip_prefix(':')?)
        } else {
            text.rsplit_once(':')?
        };
        if address.is_empty() {
            return None;
        }
        Some(Endpoint { address: address.to_owned(), port: port.parse().ok()? })
    }
}

/// Body of `POST /api/v2/projects/{p}/volumes` (reference B.2; `None` is sent as JSON null, as the
/// driver does, except `qosPolicyUUID`, which it only adds when set).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CreateVolume {
    /// Name.
    pub name: String,
    /// Size: `"<N> gib"` or a byte count string.
    pub size: String,
    /// Replica count, as a string.
    #[serde(rename = "replicaCount")]
    pub replica_count: String,
    /// `"True"` or `"False"`.
    pub compression: String,
    /// Host NQN ACL.
    pub acl: Acl,
    /// IP ACL.
    #[serde(rename = "IPAcl")]
    pub ip_acl: Acl,
    /// Source snapshot UUID of a clone.
    #[serde(rename = "sourceSnapshotUUID")]
    pub source_snapshot_uuid: Option<String>,
    /// Source snapshot name of a clone (what the driver sets).
    #[serde(rename = "sourceSnapshotName")]
    pub source_snapshot_name: Option<String>,
    /// QoS policy.
    #[serde(rename = "qosPolicyUUID", skip_serializing_if = "Option::is_none")]
    pub qos_policy_uuid: Option<String>,
}

/// Body of `POST /api/v2/projects/{p}/snapshots`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CreateSnapshot {
    /// Name.
    pub name: String,
    /// Source volume UUID (the pve-lightbits form).
    #[serde(rename = "sourceVolumeUUID")]
    pub source_volume_uuid: Option<String>,
    /// Source volume name (the Cinder form).
    #[serde(rename = "sourceVolumeName")]
    pub source_volume_name: Option<String>,
}

/// Body of the ACL update `PUT /api/v2/projects/{p}/volumes/{uuid}` (sent with `If-Match`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpdateAcl {
    /// Host NQN ACL.
    pub acl: Acl,
    /// IP ACL; omitted when the volume has none.
    #[serde(rename = "IPAcl", skip_serializing_if = "Option::is_none")]
    pub ip_acl: Option<Acl>,
}

/// A 64-bit number as proto3 JSON writes it (a decimal string) or as a plain JSON number: both
/// are accepted (reference B.8).
fn u64_of_json<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    use serde::de::Error as _;
    match serde_json::Value::deserialize(deserializer)? {
        serde_json::Value::Number(number) => {
            number.as_u64().ok_or_else(|| D::Error::custom(format!("{number} is not a u64")))
        }
        serde_json::Value::String(text) => {
            text.trim().parse().map_err(|_| D::Error::custom(format!("{text:?} is not a u64")))
        }
        serde_json::Value::Null => Ok(0),
        other => Err(D::Error::custom(format!("{other} is not a u64"))),
    }
}

/// `bytes` as proto3 JSON writes it: standard base64 (URL-safe accepted too).
fn bytes_of_base64<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
    use base64::Engine as _;
    use serde::de::Error as _;
    let text = Option::<String>::deserialize(deserializer)?.unwrap_or_default();
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(text.trim()))
        .map_err(|error| D::Error::custom(format!("dataBitMap is not base64: {error}")))
}

/// One `LBARange` of `ListChangedBlocksResponse` (reference B.8): LBAs of the target snapshot
/// that differ from the base.
///
/// Whether `lba_end` is inclusive and what one bit of `data_bitmap` covers are not documented;
/// ferry treats `[lba_start, lba_end]` as inclusive and ignores the bitmap, which is always a
/// superset of the change (the bitmap could only narrow it).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct LbaRange {
    /// First LBA of the range.
    #[serde(rename = "lbaStart", default, deserialize_with = "u64_of_json")]
    pub lba_start: u64,
    /// Last LBA of the range (taken as inclusive).
    #[serde(rename = "lbaEnd", default, deserialize_with = "u64_of_json")]
    pub lba_end: u64,
    /// The data bitmap, decoded from base64 (parsed and kept, not used to narrow).
    #[serde(rename = "dataBitMap", default, deserialize_with = "bytes_of_base64")]
    pub data_bitmap: Vec<u8>,
}

/// One page of `GET /api/v2/projects/{p}/snapshots/diff/{uuid}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ChangedBlocksPage {
    /// Where the next call starts; 0 on the last page.
    #[serde(rename = "nextOffsetLBA", default, deserialize_with = "u64_of_json")]
    pub next_offset_lba: u64,
    /// The ranges of this page.
    #[serde(rename = "lbaRanges", default)]
    pub lba_ranges: Vec<LbaRange>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Field names and shapes of the reference parse; unknown states do not fail parsing.
    #[test]
    fn parses_reference_shapes() {
        let volume: Volume = serde_json::from_str(
            r#"{"UUID":"u1","name":"v","state":"Available","ETag":"7",
                "acl":{"values":["nqn.a"]},"IPAcl":{"values":["ALLOW_ANY"]},"size":"4096"}"#,
        )
        .unwrap();
        assert_eq!(volume.etag, "7");
        assert_eq!(volume.size_bytes(), Some(4096));
        assert!(volume.acl.contains("nqn.a"));
        let odd: Volume = serde_json::from_str(r#"{"UUID":"u","state":"Frobbing"}"#).unwrap();
        assert_eq!(odd.state, VolumeState::Unknown);
        let nodes: NodeList =
            serde_json::from_str(r#"{"nodes":[{"UUID":"n","nvmeEndpoint":"[fe80::1]:4420"}]}"#)
                .unwrap();
        let endpoint = Endpoint::parse(&nodes.nodes[0].nvme_endpoint).unwrap();
        assert_eq!(endpoint, Endpoint { address: "fe80::1".into(), port: 4420 });
        assert_eq!(Endpoint::parse("10.0.0.1:4420").unwrap().address, "10.0.0.1");
        assert!(Endpoint::parse("10.0.0.1").is_none());
    }

    /// ACL edits follow the driver: ALLOW_NONE is dropped on add and written back when empty.
    #[test]
    fn acl_edits() {
        let none = Acl::of(vec![]);
        assert_eq!(none.values, vec![ACL_ALLOW_NONE]);
        let ours = none.with_host("nqn.me");
        assert_eq!(ours.values, vec!["nqn.me"]);
        assert_eq!(ours.with_host("nqn.me"), ours);
        assert_eq!(ours.without_host("nqn.me"), none);
        let shared = Acl::of(vec!["nqn.other".into(), "nqn.me".into()]);
        assert_eq!(shared.others("nqn.me"), vec!["nqn.other"]);
        assert_eq!(Acl::of(vec![ACL_ALLOW_ANY.into()]).others("nqn.me"), vec![ACL_ALLOW_ANY]);
    }

    /// Both JSON encodings of 64-bit numbers parse, base64 bitmaps decode, and a bad bitmap or
    /// a negative number is refused.
    #[test]
    fn changed_blocks_encodings() {
        let page: ChangedBlocksPage = serde_json::from_str(
            r#"{"nextOffsetLBA":"18446744073709551615","lbaRanges":[
                {"lbaStart":"64","lbaEnd":127,"dataBitMap":"/w=="},
                {"lbaStart":200,"lbaEnd":"200"}]}"#,
        )
        .unwrap();
        assert_eq!(page.next_offset_lba, u64::MAX);
        assert_eq!(page.lba_ranges[0].lba_start, 64);
        assert_eq!(page.lba_ranges[0].lba_end, 127);
        assert_eq!(page.lba_ranges[0].data_bitmap, vec![0xff]);
        assert!(page.lba_ranges[1].data_bitmap.is_empty());
        let last: ChangedBlocksPage = serde_json::from_str("{}").unwrap();
        assert_eq!(last.next_offset_lba, 0);
        assert!(last.lba_ranges.is_empty());
        assert!(
            serde_json::from_str::<ChangedBlocksPage>(
                r#"{"lbaRanges":[{"lbaStart":1,"lbaEnd":2,"dataBitMap":"***"}]}"#
            )
            .is_err()
        );
        assert!(serde_json::from_str::<ChangedBlocksPage>(r#"{"nextOffsetLBA":-1}"#).is_err());
    }
}
