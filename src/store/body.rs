//! How the inbox keeps a notification's raw body. Dynamics' JSON is verbose (every attribute
//! wrapped in a `KeyValuePairOfstringanyType` with `__type` names), so it compresses about 4:1
//! with LZ4. Intake compresses on the request's own task, before the group commit: the single
//! SQLite writer then writes a quarter of the bytes, in the WAL and again at checkpoint, which
//! is where durable intake spends its time. Decompression is lossless, so what the worker (and
//! an operator reading the inbox through the store) gets is byte for byte what Dynamics sent.

use super::StoreError;

/// Upper bound on a decompressed body. Far above any body intake accepts (`body_limit_bytes`),
/// it only keeps a corrupt length prefix from asking for an absurd allocation.
const MAX_BODY_BYTES: usize = 256 * 1024 * 1024;

/// The encoding of the `body` column, named in `body_codec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyCodec {
    /// The JSON text as received (rows stored before compression existed).
    Json,
    /// LZ4 block format with the decompressed length as a little-endian u32 prefix.
    Lz4,
}

impl BodyCodec {
    pub fn as_str(self) -> &'static str {
        match self {
            BodyCodec::Json => "json",
            BodyCodec::Lz4 => "lz4",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "json" => Some(BodyCodec::Json),
            "lz4" => Some(BodyCodec::Lz4),
            _ => None,
        }
    }
}

/// A body ready for the `body` column, with its codec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedBody {
    codec: BodyCodec,
    bytes: Vec<u8>,
}

impl PackedBody {
    /// Compresses a body as received.
    pub fn pack(raw: &[u8]) -> PackedBody {
        PackedBody {
            codec: BodyCodec::Lz4,
            bytes: lz4_flex::compress_prepend_size(raw),
        }
    }

    pub fn codec(&self) -> BodyCodec {
        self.codec
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The body as text (it was valid JSON, hence UTF-8, when intake accepted it).
    pub fn unpack(codec: &str, bytes: Vec<u8>) -> Result<String, StoreError> {
        let raw = match BodyCodec::parse(codec) {
            Some(BodyCodec::Json) => bytes,
            Some(BodyCodec::Lz4) => {
                let declared = bytes
                    .get(..4)
                    .map(|p| u32::from_le_bytes([p[0], p[1], p[2], p[3]]) as usize)
                    .ok_or_else(|| StoreError::Corrupt("lz4 body shorter than its length prefix".into()))?;
                if declared > MAX_BODY_BYTES {
                    return Err(StoreError::Corrupt(format!(
                        "lz4 body declares {declared} bytes, over the {MAX_BODY_BYTES} limit"
                    )));
                }
                lz4_flex::decompress_size_prepended(&bytes)
                    .map_err(|e| StoreError::Corrupt(format!("lz4 body does not decompress: {e}")))?
            }
            None => return Err(StoreError::Corrupt(format!("unknown body codec {codec:?}"))),
        };
        String::from_utf8(raw).map_err(|e| StoreError::Corrupt(format!("body is not UTF-8: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_a_dynamics_body_and_compresses_it() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/dynamics/opportunity-update-async.json"
        );
        let raw = std::fs::read_to_string(path).unwrap();
        let raw = raw.as_str();
        let packed = PackedBody::pack(raw.as_bytes());
        assert_eq!(packed.codec(), BodyCodec::Lz4);
        assert!(
            packed.bytes().len() * 2 < raw.len(),
            "{} of {}",
            packed.bytes().len(),
            raw.len()
        );
        let back = PackedBody::unpack("lz4", packed.bytes().to_vec()).unwrap();
        assert_eq!(back, raw);
    }

    #[test]
    fn reads_rows_stored_as_plain_json() {
        assert_eq!(
            PackedBody::unpack("json", b"{\"a\":1}".to_vec()).unwrap(),
            "{\"a\":1}"
        );
    }

    #[test]
    fn corrupt_bodies_are_errors_not_panics() {
        let packed = PackedBody::pack(br#"{"InputParameters":[{"key":"Target"}]}"#);
        let mut cut = packed.bytes().to_vec();
        cut.truncate(cut.len() - 3);
        for (codec, bytes) in [
            ("lz4", cut),
            ("lz4", vec![1, 2]),
            ("lz4", vec![0xff, 0xff, 0xff, 0xff, 0]),
            ("zstd", packed.bytes().to_vec()),
            ("json", vec![0xc3, 0x28]),
        ] {
            assert!(
                matches!(PackedBody::unpack(codec, bytes), Err(StoreError::Corrupt(_))),
                "{codec}"
            );
        }
    }
}
