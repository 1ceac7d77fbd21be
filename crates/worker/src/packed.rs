//! Text kept LZ4-compressed against a dictionary, for what the shard's caches hold per
//! object.
//!
//! Every cached object of a kind repeats the same keys, labels and values; compressed
//! against a dictionary that holds a typical object's text, what is left per object is
//! little more than what sets it apart. The block format with the length prepended keeps
//! one allocation per object; a decompression takes a few microseconds.

/// A text compressed against a dictionary the holder names when it reads it back.
#[derive(Clone, Debug)]
pub struct PackedText(Box<[u8]>);

impl PackedText {
    /// `text` compressed against `dictionary`.
    pub fn pack(text: &[u8], dictionary: &[u8]) -> Self {
        Self(lz4_flex::block::compress_prepend_size_with_dict(text, dictionary).into_boxed_slice())
    }

    /// The text back; `None` if it does not decompress against `dictionary` (a different
    /// dictionary or damaged bytes: the checked decoder never reads out of bounds).
    pub fn unpack(&self, dictionary: &[u8]) -> Option<Vec<u8>> {
        lz4_flex::block::decompress_size_prepended_with_dict(&self.0, dictionary).ok()
    }

    /// Bytes held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Bytes that do not decompress against any dictionary.
    #[cfg(test)]
    pub fn damaged() -> Self {
        Self(Box::new([0xff; 8]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_comes_back_from_its_dictionary_only() {
        let dictionary = br#"{"spec":{"replicas":3,"image":"postgres:17"}}"#;
        let text = br#"{"spec":{"replicas":5,"image":"postgres:17"}}"#;
        let packed = PackedText::pack(text, dictionary);
        assert!(packed.len() < text.len() / 2, "{} bytes", packed.len());
        assert_eq!(packed.unpack(dictionary).as_deref(), Some(&text[..]));
        assert_ne!(
            packed.unpack(b"another dictionary").as_deref(),
            Some(&text[..])
        );
        assert_eq!(PackedText::damaged().unpack(dictionary), None);
    }
}
