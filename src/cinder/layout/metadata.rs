//! The `_metadata` object: the backup's object list and descriptive fields, written last.

use std::collections::HashMap;

use serde::Deserialize;

use super::DRIVER_VERSION;
use super::codec::Algorithm;
use super::error::CinderError;
use super::pyjson::{self, Py};

/// One element of `objects`: `{"<name>": {"compression", "length", "md5", "offset"}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectEntry {
    /// Full object name, `<prefix>-00001`.
    pub name: String,
    /// Volume byte offset where the object's uncompressed data goes.
    pub offset: u64,
    /// Uncompressed length.
    pub length: u64,
    /// The `compression` string exactly as written (`none`, `zlib`, `gzip`, `bz2`, `bzip2`,
    /// `zstd`, any case when read from Cinder).
    pub compression: String,
    /// Lower-case hex MD5 of the uncompressed data (never verified by Cinder).
    pub md5: String,
}

impl ObjectEntry {
    /// The entry for a data object: `raw` is the uncompressed data, `compression` what
    /// [`super::codec::encode`] decided.
    pub fn new(name: String, offset: u64, raw: &[u8], compression: Algorithm) -> ObjectEntry {
        ObjectEntry {
            name,
            offset,
            length: raw.len() as u64,
            compression: compression.name().to_owned(),
            md5: md5_hex(raw),
        }
    }

    /// The algorithm to decompress this object with.
    ///
    /// # Errors
    /// [`CinderError::UnsupportedCompression`] for a name Cinder would refuse too.
    pub fn algorithm(&self) -> Result<Algorithm, CinderError> {
        Algorithm::from_name(&self.compression)
    }
}

/// Lower-case hex MD5, Python's `hashlib.md5(data).hexdigest()`.
pub fn md5_hex(data: &[u8]) -> String {
    use md5::Digest as _;
    let digest = md5::Md5::digest(data);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `_metadata` document.
#[derive(Debug, Clone, PartialEq)]
pub struct Metadata {
    /// `"1.0.0"`, the only version Cinder restores.
    pub version: String,
    /// Backup UUID.
    pub backup_id: String,
    /// Source volume UUID.
    pub volume_id: String,
    /// `display_name`.
    pub backup_name: Option<String>,
    /// `display_description`.
    pub backup_description: Option<String>,
    /// `str(created_at)`, see [`super::UtcTime::python_str`].
    pub created_at: String,
    /// Data objects in write order.
    pub objects: Vec<ObjectEntry>,
    /// Parent backup UUID of an incremental; informational (Cinder follows the database).
    pub parent_id: Option<String>,
    /// The volume's metadata as a JSON **string** (double-encoded), or null.
    pub volume_meta: Option<String>,
    /// Driver-specific extra metadata; the S3 driver has none. Written only when truthy.
    pub extra_metadata: Option<serde_json::Value>,
}

impl Metadata {
    /// A document with Cinder's version and no objects yet.
    pub fn new(backup_id: &str, volume_id: &str, created_at: &str) -> Metadata {
        Metadata {
            version: DRIVER_VERSION.to_owned(),
            backup_id: backup_id.to_owned(),
            volume_id: volume_id.to_owned(),
            backup_name: None,
            backup_description: None,
            created_at: created_at.to_owned(),
            objects: Vec::new(),
            parent_id: None,
            volume_meta: None,
            extra_metadata: None,
        }
    }

    /// The object body, byte for byte what `json.dumps(metadata, sort_keys=True, indent=2)`
    /// writes.
    pub fn to_json(&self) -> Vec<u8> {
        pyjson::dumps_sorted_indent2(&self.to_py())
    }

    fn to_py(&self) -> Py {
        let opt = |s: &Option<String>| s.clone().map_or(Py::Null, Py::Str);
        let objects = self
            .objects
            .iter()
            .map(|o| {
                let inner = Py::Dict(vec![
                    ("offset".into(), Py::UInt(o.offset)),
                    ("length".into(), Py::UInt(o.length)),
                    ("compression".into(), Py::Str(o.compression.clone())),
                    ("md5".into(), Py::Str(o.md5.clone())),
                ]);
                Py::Dict(vec![(o.name.clone(), inner)])
            })
            .collect();
        let mut dict = vec![
            ("version".into(), Py::Str(self.version.clone())),
            ("backup_id".into(), Py::Str(self.backup_id.clone())),
            ("volume_id".into(), Py::Str(self.volume_id.clone())),
            ("backup_name".into(), opt(&self.backup_name)),
            ("backup_description".into(), opt(&self.backup_description)),
            ("created_at".into(), Py::Str(self.created_at.clone())),
            ("objects".into(), Py::List(objects)),
            ("parent_id".into(), opt(&self.parent_id)),
            ("volume_meta".into(), opt(&self.volume_meta)),
        ];
        if let Some(extra) = &self.extra_metadata {
            let extra = Py::from_value(extra);
            if extra.is_truthy() {
                dict.push(("extra_metadata".into(), extra));
            }
        }
        Py::Dict(dict)
    }

    /// Parses a `_metadata` body written by any Cinder release.
    ///
    /// Tolerant where old releases differ: `parent_id` (before incrementals), `volume_meta`
    /// (before volume-metadata backup) and the descriptive fields may be absent; `volume_meta`
    /// may be an object instead of a string (kept as its compact JSON); an object's `md5` may be
    /// absent and its `compression` null (read as `none`). Required, because restore needs them:
    /// `version`, `objects`, and each object's `offset` and `length`.
    ///
    /// # Errors
    /// [`CinderError::Json`] if it is not such a document, [`CinderError::ObjectEntry`] for an
    /// `objects` element that is not a one-key object with the required fields.
    pub fn parse(body: &[u8]) -> Result<Metadata, CinderError> {
        let raw: RawMetadata = serde_json::from_slice(body)
            .map_err(|source| CinderError::Json { document: "_metadata", source })?;
        let mut objects = Vec::with_capacity(raw.objects.len());
        for (index, element) in raw.objects.into_iter().enumerate() {
            if element.len() != 1 {
                let reason = format!("expected one object name, found {}", element.len());
                return Err(CinderError::ObjectEntry { index, reason });
            }
            for (name, o) in element {
                let missing = |field: &str| CinderError::ObjectEntry {
                    index,
                    reason: format!("{name}: no {field}"),
                };
                objects.push(ObjectEntry {
                    offset: o.offset.ok_or_else(|| missing("offset"))?,
                    length: o.length.ok_or_else(|| missing("length"))?,
                    compression: o.compression.unwrap_or_else(|| "none".to_owned()),
                    md5: o.md5.unwrap_or_default(),
                    name,
                });
            }
        }
        let volume_meta = match raw.volume_meta {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s),
            Some(other) => Some(other.to_string()),
        };
        Ok(Metadata {
            version: raw.version,
            backup_id: raw.backup_id.unwrap_or_default(),
            volume_id: raw.volume_id.unwrap_or_default(),
            backup_name: raw.backup_name,
            backup_description: raw.backup_description,
            created_at: raw.created_at.unwrap_or_default(),
            objects,
            parent_id: raw.parent_id,
            volume_meta,
            extra_metadata: raw.extra_metadata,
        })
    }

    /// Sum of the objects' uncompressed lengths.
    pub fn data_bytes(&self) -> u64 {
        self.objects.iter().map(|o| o.length).sum()
    }
}

#[derive(Deserialize)]
struct RawMetadata {
    version: String,
    backup_id: Option<String>,
    volume_id: Option<String>,
    backup_name: Option<String>,
    backup_description: Option<String>,
    created_at: Option<String>,
    objects: Vec<HashMap<String, RawObject>>,
    parent_id: Option<String>,
    volume_meta: Option<serde_json::Value>,
    extra_metadata: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawObject {
    offset: Option<u64>,
    length: Option<u64>,
    compression: Option<String>,
    md5: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writing then parsing gives the same document; null and string volume_meta survive;
    /// falsy extra_metadata is not written, truthy is.
    #[test]
    fn round_trip() {
        let mut m = Metadata::new("b", "v", "2025-03-01 12:00:05+00:00");
        let text = m.to_json();
        assert!(String::from_utf8(text.clone()).unwrap().contains("\"objects\": [],"));
        assert_eq!(Metadata::parse(&text).unwrap(), m);
        m.objects.push(ObjectEntry::new("p-00001".into(), 0, b"hello", Algorithm::Zlib));
        m.objects.push(ObjectEntry::new("p-00002".into(), 5, b"", Algorithm::None));
        m.volume_meta = Some(r#"{"version": 2, "volume-metadata": {"k": "v"}}"#.into());
        m.parent_id = Some("parent".into());
        assert_eq!(m.objects[0].md5, "5d41402abc4b2a76b9719d911017c592");
        assert_eq!(Metadata::parse(&m.to_json()).unwrap(), m);
        m.extra_metadata = Some(serde_json::json!({}));
        assert!(!String::from_utf8(m.to_json()).unwrap().contains("extra_metadata"));
        m.extra_metadata = Some(serde_json::json!({"a": [1, 2.5]}));
        assert!(String::from_utf8(m.to_json()).unwrap().contains("\"extra_metadata\": {"));
        assert_eq!(Metadata::parse(&m.to_json()).unwrap(), m);
    }

    /// An old-style document (no parent_id, no volume_meta, no md5, null compression, extra
    /// keys, object volume_meta) parses; malformed object elements are refused.
    #[test]
    fn tolerant_parse() {
        let old = br#"{"version": "1.0.0", "backup_id": "b", "volume_id": "v",
            "backup_name": null, "backup_description": null, "created_at": "x",
            "objects": [{"p-00001": {"offset": 0, "length": 3, "compression": null,
                                     "something": 1}}],
            "volume_meta": {"version": 1}, "future": true}"#;
        let m = Metadata::parse(old).unwrap();
        assert_eq!(m.objects[0].compression, "none");
        assert_eq!(m.objects[0].algorithm().unwrap(), Algorithm::None);
        assert_eq!(m.objects[0].md5, "");
        assert_eq!(m.parent_id, None);
        assert_eq!(m.volume_meta.as_deref(), Some(r#"{"version":1}"#));
        let two = br#"{"version": "1.0.0", "objects": [{"a": {"offset": 0, "length": 1},
            "b": {"offset": 1, "length": 1}}]}"#;
        assert!(matches!(Metadata::parse(two), Err(CinderError::ObjectEntry { index: 0, .. })));
        let no_len = br#"{"version": "1.0.0", "objects": [{"a": {"offset": 0}}]}"#;
        assert!(matches!(Metadata::parse(no_len), Err(CinderError::ObjectEntry { .. })));
        assert!(matches!(Metadata::parse(b"[]"), Err(CinderError::Json { .. })));
    }
}
