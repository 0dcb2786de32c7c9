//! Client-to-server payload masking (RFC 6455 §5.3).
//!
//! Every byte a client sends is XORed with a 4-byte key. Unmasking sits on the
//! inbound hot path, so it works a machine word at a time: the key is widened
//! to a `u64` (rotated for the stream position the chunk starts at) and the
//! body is processed in 32-byte blocks of four words, which LLVM turns into
//! vector instructions on x86_64 and aarch64 without any `unsafe`. The head
//! and tail that do not fill a word go byte by byte.

/// XORs `buf` with `key`, as if `buf` started at byte `offset` of the masked
/// payload. Returns the offset for the byte after `buf`, so a payload that
/// arrives in pieces can be unmasked piece by piece.
///
/// On x86_64 with AVX2 (detected at run time) the same loop runs compiled for
/// 256-bit vectors; elsewhere it runs as portable word-at-a-time code.
#[inline]
pub fn apply_mask(buf: &mut [u8], key: [u8; 4], offset: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    if buf.len() >= 128 && std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above), which is all
        // `apply_mask_avx2` requires; the function itself is safe code.
        return unsafe { apply_mask_avx2(buf, key, offset) };
    }
    apply_mask_words(buf, key, offset)
}

/// [`apply_mask_words`] compiled with AVX2 enabled.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn apply_mask_avx2(buf: &mut [u8], key: [u8; 4], offset: usize) -> usize {
    apply_mask_words(buf, key, offset)
}

/// The portable word-at-a-time unmask.
#[inline(always)]
fn apply_mask_words(buf: &mut [u8], key: [u8; 4], offset: usize) -> usize {
    let phase = offset & 3;
    // Rotate the key so that index 0 of the rotated key applies to buf[0].
    let rotated = [key[phase], key[(phase + 1) & 3], key[(phase + 2) & 3], key[(phase + 3) & 3]];
    let word = u64::from_ne_bytes([
        rotated[0], rotated[1], rotated[2], rotated[3], rotated[0], rotated[1], rotated[2], rotated[3],
    ]);
    let mut blocks = buf.chunks_exact_mut(32);
    for block in &mut blocks {
        for lane in block.chunks_exact_mut(8) {
            let v = u64::from_ne_bytes(lane.try_into().expect("8-byte lane")) ^ word;
            lane.copy_from_slice(&v.to_ne_bytes());
        }
    }
    let rest = blocks.into_remainder();
    let mut words = rest.chunks_exact_mut(8);
    for lane in &mut words {
        let v = u64::from_ne_bytes(lane.try_into().expect("8-byte lane")) ^ word;
        lane.copy_from_slice(&v.to_ne_bytes());
    }
    // Every block and word above is a multiple of 4 bytes, so the tail starts
    // at key phase 0 of the rotated key.
    for (i, b) in words.into_remainder().iter_mut().enumerate() {
        *b ^= rotated[i & 3];
    }
    offset.wrapping_add(buf.len())
}

/// The obvious byte-at-a-time unmask; the reference the fast path is tested
/// against, and the baseline in the codec benchmarks.
pub fn apply_mask_bytewise(buf: &mut [u8], key: [u8; 4], offset: usize) -> usize {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= key[(offset + i) & 3];
    }
    offset.wrapping_add(buf.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_vector() {
        // RFC 6455 §5.7: "Hello" masked with 37 fa 21 3d.
        let mut data = [0x7f, 0x9f, 0x4d, 0x51, 0x58];
        apply_mask(&mut data, [0x37, 0xfa, 0x21, 0x3d], 0);
        assert_eq!(&data, b"Hello");
    }

    proptest! {
        #[test]
        fn fast_matches_bytewise(data in proptest::collection::vec(any::<u8>(), 0..1000),
                                 key in any::<[u8; 4]>(), offset in 0usize..16, split in 0usize..300) {
            let mut a = data.clone();
            let mut b = data.clone();
            let split = split.min(a.len());
            let (a1, a2) = a.split_at_mut(split);
            let next = apply_mask(a1, key, offset);
            apply_mask(a2, key, next);
            apply_mask_bytewise(&mut b, key, offset);
            prop_assert_eq!(&a, &b);
            // The portable path agrees too (the dispatcher may pick AVX2).
            let mut c = data.clone();
            apply_mask_words(&mut c, key, offset);
            apply_mask_bytewise(&mut c, key, offset);
            prop_assert_eq!(c, data.clone());
        }
    }
}
