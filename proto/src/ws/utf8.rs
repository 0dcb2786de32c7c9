//! Incremental UTF-8 validation for text messages that arrive in pieces.
//!
//! A text message may be split across frames and each frame across reads, and
//! a code point may straddle any of those splits. [`Utf8Validator`] carries at
//! most three bytes of an unfinished code point between pieces and rejects a
//! sequence as soon as the bytes seen so far cannot start a valid code point
//! (the standard library's validator already reports "invalid" rather than
//! "incomplete" as early as the bytes allow), which is what RFC 6455 §8.1 and
//! Autobahn's fail-fast cases ask for. Validation is SIMD (`simdutf8`), which
//! reports the same `valid_up_to`/`error_len` as the standard library.

/// State carried between pieces of one text message.
#[derive(Debug, Default, Clone)]
pub struct Utf8Validator {
    carry: [u8; 4],
    carry_len: u8,
}

/// The bytes seen so far are not UTF-8 and no continuation can fix them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidUtf8;

fn sequence_len(lead: u8) -> usize {
    match lead {
        0x00..=0x7f => 1,
        0xc2..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf4 => 4,
        _ => 0,
    }
}

impl Utf8Validator {
    /// A validator at the start of a message.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next piece of the message.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Result<(), InvalidUtf8> {
        if self.carry_len > 0 {
            let have = self.carry_len as usize;
            let need = sequence_len(self.carry[0]);
            let take = (need - have).min(chunk.len());
            self.carry[have..have + take].copy_from_slice(&chunk[..take]);
            let total = have + take;
            chunk = &chunk[take..];
            match simdutf8::compat::from_utf8(&self.carry[..total]) {
                Ok(_) => self.carry_len = 0,
                Err(e) if e.error_len().is_none() && total < need => {
                    self.carry_len = total as u8;
                    return Ok(());
                }
                Err(_) => return Err(InvalidUtf8),
            }
        }
        // SIMD validation (AVX2/SSE4.2/NEON, detected at run time): the
        // validator runs over every text byte a client sends.
        match simdutf8::compat::from_utf8(chunk) {
            Ok(_) => Ok(()),
            Err(e) => match e.error_len() {
                Some(_) => Err(InvalidUtf8),
                None => {
                    let tail = &chunk[e.valid_up_to()..];
                    self.carry[..tail.len()].copy_from_slice(tail);
                    self.carry_len = tail.len() as u8;
                    Ok(())
                }
            },
        }
    }

    /// Ends the message: an unfinished code point is an error.
    pub fn finish(&mut self) -> Result<(), InvalidUtf8> {
        let ok = self.carry_len == 0;
        self.carry_len = 0;
        if ok { Ok(()) } else { Err(InvalidUtf8) }
    }

    /// Whether a code point is left unfinished.
    pub fn is_mid_sequence(&self) -> bool {
        self.carry_len > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn validate_split(bytes: &[u8], splits: &[usize]) -> Result<(), InvalidUtf8> {
        let mut v = Utf8Validator::new();
        let mut start = 0;
        for &s in splits {
            let s = s.clamp(start, bytes.len());
            v.feed(&bytes[start..s])?;
            start = s;
        }
        v.feed(&bytes[start..])?;
        v.finish()
    }

    #[test]
    fn fails_fast_on_impossible_prefix() {
        let mut v = Utf8Validator::new();
        // U+110000 and beyond can never be valid: 0xF4 0x90 fails at once.
        assert_eq!(v.feed(&[0xf4]), Ok(()));
        assert_eq!(v.feed(&[0x90]), Err(InvalidUtf8));
        let mut v = Utf8Validator::new();
        // A surrogate half (ED A0 ..) fails on its second byte.
        assert_eq!(v.feed(&[0xce, 0xba, 0xed]), Ok(()));
        assert_eq!(v.feed(&[0xa0]), Err(InvalidUtf8));
    }

    #[test]
    fn unfinished_sequence_fails_at_end() {
        let mut v = Utf8Validator::new();
        v.feed(&[0xe2, 0x82]).unwrap();
        assert!(v.is_mid_sequence());
        assert_eq!(v.finish(), Err(InvalidUtf8));
    }

    proptest! {
        #[test]
        fn agrees_with_std_at_any_split(s in ".{0,40}", garbage in proptest::collection::vec(any::<u8>(), 0..8),
                                        at in 0usize..200, splits in proptest::collection::vec(0usize..200, 0..6)) {
            let mut bytes = s.into_bytes();
            let at = at.min(bytes.len());
            for (i, g) in garbage.into_iter().enumerate() { bytes.insert(at + i, g); }
            let mut splits = splits;
            splits.sort_unstable();
            let expected = std::str::from_utf8(&bytes).is_ok();
            prop_assert_eq!(validate_split(&bytes, &splits).is_ok(), expected);
        }
    }
}
