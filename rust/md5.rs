//! MD5, for ketama placement only (libketama and uhashring place keys by MD5). Not for security.
//!
//! Ketama hashes short keys, so the common case is a message of at most 55 bytes, one block:
//! `digest_words` builds that block in place without a buffer.

const SHIFTS: [u32; 64] = [
    7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 5, 9, 14, 20, 5, 9, 14, 20, 5, 9,
    14, 20, 5, 9, 14, 20, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 6, 10, 15,
    21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21,
];

/// floor(abs(sin(i + 1)) * 2^32), from RFC 1321.
const SINES: [u32; 64] = [
    0xd76a_a478,
    0xe8c7_b756,
    0x2420_70db,
    0xc1bd_ceee,
    0xf57c_0faf,
    0x4787_c62a,
    0xa830_4613,
    0xfd46_9501,
    0x6980_98d8,
    0x8b44_f7af,
    0xffff_5bb1,
    0x895c_d7be,
    0x6b90_1122,
    0xfd98_7193,
    0xa679_438e,
    0x49b4_0821,
    0xf61e_2562,
    0xc040_b340,
    0x265e_5a51,
    0xe9b6_c7aa,
    0xd62f_105d,
    0x0244_1453,
    0xd8a1_e681,
    0xe7d3_fbc8,
    0x21e1_cde6,
    0xc337_07d6,
    0xf4d5_0d87,
    0x455a_14ed,
    0xa9e3_e905,
    0xfcef_a3f8,
    0x676f_02d9,
    0x8d2a_4c8a,
    0xfffa_3942,
    0x8771_f681,
    0x6d9d_6122,
    0xfde5_380c,
    0xa4be_ea44,
    0x4bde_cfa9,
    0xf6bb_4b60,
    0xbebf_bc70,
    0x289b_7ec6,
    0xeaa1_27fa,
    0xd4ef_3085,
    0x0488_1d05,
    0xd9d4_d039,
    0xe6db_99e5,
    0x1fa2_7cf8,
    0xc4ac_5665,
    0xf429_2244,
    0x432a_ff97,
    0xab94_23a7,
    0xfc93_a039,
    0x655b_59c3,
    0x8f0c_cc92,
    0xffef_f47d,
    0x8584_5dd1,
    0x6fa8_7e4f,
    0xfe2c_e6e0,
    0xa301_4314,
    0x4e08_11a1,
    0xf753_7e82,
    0xbd3a_f235,
    0x2ad7_d2bb,
    0xeb86_d391,
];

const INITIAL: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];

/// MD5's 64 steps as 16 groups of four: the round function, the first step's number, and the
/// message words the four steps read. `$four` is a macro that runs one group.
macro_rules! schedule {
    ($four:ident) => {
        $four!(round_f, 0, 0, 1, 2, 3);
        $four!(round_f, 4, 4, 5, 6, 7);
        $four!(round_f, 8, 8, 9, 10, 11);
        $four!(round_f, 12, 12, 13, 14, 15);
        $four!(round_g, 16, 1, 6, 11, 0);
        $four!(round_g, 20, 5, 10, 15, 4);
        $four!(round_g, 24, 9, 14, 3, 8);
        $four!(round_g, 28, 13, 2, 7, 12);
        $four!(round_h, 32, 5, 8, 11, 14);
        $four!(round_h, 36, 1, 4, 7, 10);
        $four!(round_h, 40, 13, 0, 3, 6);
        $four!(round_h, 44, 9, 12, 15, 2);
        $four!(round_i, 48, 0, 7, 14, 5);
        $four!(round_i, 52, 12, 3, 10, 1);
        $four!(round_i, 56, 8, 15, 6, 13);
        $four!(round_i, 60, 4, 11, 2, 9);
    };
}

macro_rules! step {
    ($f:expr, $a:ident, $b:ident, $c:ident, $d:ident, $word:expr, $sine:expr, $shift:expr) => {
        $a = $b.wrapping_add(
            $a.wrapping_add($f($b, $c, $d))
                .wrapping_add($word)
                .wrapping_add($sine)
                .rotate_left($shift),
        );
    };
}

#[inline(always)]
fn round_f(b: u32, c: u32, d: u32) -> u32 {
    d ^ (b & (c ^ d))
}

#[inline(always)]
fn round_g(b: u32, c: u32, d: u32) -> u32 {
    c ^ (d & (b ^ c))
}

#[inline(always)]
fn round_h(b: u32, c: u32, d: u32) -> u32 {
    b ^ c ^ d
}

#[inline(always)]
fn round_i(b: u32, c: u32, d: u32) -> u32 {
    c ^ (b | !d)
}

/// One 64-byte block, every step written out so the words and constants are immediate.
#[inline(always)]
fn compress(state: &mut [u32; 4], x: &[u32; 16]) {
    let [mut a, mut b, mut c, mut d] = *state;
    macro_rules! four {
        ($f:ident, $i:expr, $g0:expr, $g1:expr, $g2:expr, $g3:expr) => {
            step!($f, a, b, c, d, x[$g0], SINES[$i], SHIFTS[$i]);
            step!($f, d, a, b, c, x[$g1], SINES[$i + 1], SHIFTS[$i + 1]);
            step!($f, c, d, a, b, x[$g2], SINES[$i + 2], SHIFTS[$i + 2]);
            step!($f, b, c, d, a, x[$g3], SINES[$i + 3], SHIFTS[$i + 3]);
        };
    }
    schedule!(four);
    state[0] = state[0].wrapping_add(a);
    state[1] = state[1].wrapping_add(b);
    state[2] = state[2].wrapping_add(c);
    state[3] = state[3].wrapping_add(d);
}

fn load_block(bytes: &[u8; 64]) -> [u32; 16] {
    let mut block = [0u32; 16];
    for (word, chunk) in block.iter_mut().zip(bytes.chunks_exact(4)) {
        *word = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    block
}

/// The digest as four little-endian words: word `i` is bytes `4i..4i + 4` read little-endian,
/// which is exactly ketama's point for replica `i`.
pub fn digest_words(message: &[u8]) -> [u32; 4] {
    let mut state = INITIAL;
    if message.len() < 56 {
        // The common case, a short key: one block, built in place.
        let mut bytes = [0u8; 64];
        bytes[..message.len()].copy_from_slice(message);
        bytes[message.len()] = 0x80;
        bytes[56..].copy_from_slice(&((message.len() as u64) * 8).to_le_bytes());
        compress(&mut state, &load_block(&bytes));
        return state;
    }
    let mut chunks = message.chunks_exact(64);
    for chunk in &mut chunks {
        let bytes: &[u8; 64] = chunk.try_into().expect("chunks_exact yields 64 bytes");
        compress(&mut state, &load_block(bytes));
    }
    let rest = chunks.remainder();
    let mut tail = [0u8; 128];
    tail[..rest.len()].copy_from_slice(rest);
    tail[rest.len()] = 0x80;
    let tail_len = if rest.len() < 56 { 64 } else { 128 };
    let bits = (message.len() as u64).wrapping_mul(8);
    tail[tail_len - 8..tail_len].copy_from_slice(&bits.to_le_bytes());
    for chunk in tail[..tail_len].chunks_exact(64) {
        let bytes: &[u8; 64] = chunk.try_into().expect("chunks_exact yields 64 bytes");
        compress(&mut state, &load_block(bytes));
    }
    state
}

/// How many short messages `first_words` hashes side by side.
pub const LANES: usize = 8;

type Lanes = [u32; LANES];

/// The longest message `first_words` takes: one block with its padding.
pub const MAX_SHORT: usize = 55;

#[inline(always)]
fn lanes_step(
    a: &mut Lanes,
    b: &Lanes,
    c: &Lanes,
    d: &Lanes,
    round: impl Fn(u32, u32, u32) -> u32,
    word: &Lanes,
    (sine, shift): (u32, u32),
) {
    for lane in 0..LANES {
        a[lane] = b[lane].wrapping_add(
            a[lane]
                .wrapping_add(round(b[lane], c[lane], d[lane]))
                .wrapping_add(word[lane])
                .wrapping_add(sine)
                .rotate_left(shift),
        );
    }
}

/// The first digest word of up to `LANES` messages of at most `MAX_SHORT` bytes, computed
/// lane by lane so the compiler can run the lanes in one vector register each.
#[inline(always)]
fn first_words_lanes(messages: &[&[u8]]) -> Lanes {
    debug_assert!(messages.len() <= LANES);
    let mut x = [[0u32; LANES]; 16];
    for (lane, message) in messages.iter().enumerate() {
        debug_assert!(message.len() <= MAX_SHORT);
        let mut bytes = [0u8; 64];
        bytes[..message.len()].copy_from_slice(message);
        bytes[message.len()] = 0x80;
        bytes[56..].copy_from_slice(&((message.len() as u64) * 8).to_le_bytes());
        for (index, word) in load_block(&bytes).into_iter().enumerate() {
            x[index][lane] = word;
        }
    }
    let mut a = [INITIAL[0]; LANES];
    let mut b = [INITIAL[1]; LANES];
    let mut c = [INITIAL[2]; LANES];
    let mut d = [INITIAL[3]; LANES];
    macro_rules! four {
        ($round:ident, $i:expr, $g0:expr, $g1:expr, $g2:expr, $g3:expr) => {
            lanes_step(&mut a, &b, &c, &d, $round, &x[$g0], (SINES[$i], SHIFTS[$i]));
            lanes_step(
                &mut d,
                &a,
                &b,
                &c,
                $round,
                &x[$g1],
                (SINES[$i + 1], SHIFTS[$i + 1]),
            );
            lanes_step(
                &mut c,
                &d,
                &a,
                &b,
                $round,
                &x[$g2],
                (SINES[$i + 2], SHIFTS[$i + 2]),
            );
            lanes_step(
                &mut b,
                &c,
                &d,
                &a,
                $round,
                &x[$g3],
                (SINES[$i + 3], SHIFTS[$i + 3]),
            );
        };
    }
    schedule!(four);
    let mut first = [0u32; LANES];
    for lane in 0..LANES {
        first[lane] = INITIAL[0].wrapping_add(a[lane]);
    }
    first
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn first_words_avx2(messages: &[&[u8]]) -> Lanes {
    first_words_lanes(messages)
}

/// The first digest word (ketama's key point) of up to `LANES` short messages at once: what a
/// batch lookup spends its time on. Uses AVX2 when the processor has it.
pub fn first_words(messages: &[&[u8]]) -> Lanes {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the processor supports AVX2, checked just above, which is the only
            // requirement `first_words_avx2` adds over a plain function.
            return unsafe { first_words_avx2(messages) };
        }
    }
    first_words_lanes(messages)
}

/// The 16-byte digest, for tests against published vectors.
pub fn digest(message: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (chunk, word) in out.chunks_exact_mut(4).zip(digest_words(message)) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: [u8; 16]) -> String {
        bytes.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    #[test]
    fn matches_the_rfc_1321_test_suite() {
        let cases = [
            ("", "d41d8cd98f00b204e9800998ecf8427e"),
            ("a", "0cc175b9c0f1b6a831c399e269772661"),
            ("abc", "900150983cd24fb0d6963f7d28e17f72"),
            ("message digest", "f96b697d7cb7938d525a2f31aaf161d0"),
            (
                "abcdefghijklmnopqrstuvwxyz",
                "c3fcd3d76192e4007dfb496cca67e13b",
            ),
            (
                "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
                "d174ab98d277d9f5a5611c2c9f419d9f",
            ),
            (
                "12345678901234567890123456789012345678901234567890123456789012345678901234567890",
                "57edf4a22be3c955ac49da2e2107b67a",
            ),
        ];
        for (message, expected) in cases {
            assert_eq!(hex(digest(message.as_bytes())), expected, "{message:?}");
        }
    }

    #[test]
    fn side_by_side_hashing_agrees_with_one_at_a_time() {
        let messages: Vec<Vec<u8>> = (0..=MAX_SHORT)
            .map(|length| (0..length).map(|byte| (byte * 7 + length) as u8).collect())
            .collect();
        for group in messages.chunks(LANES) {
            let slices: Vec<&[u8]> = group.iter().map(Vec::as_slice).collect();
            let words = first_words(&slices);
            for (lane, message) in group.iter().enumerate() {
                assert_eq!(
                    words[lane],
                    digest_words(message)[0],
                    "{} bytes",
                    message.len()
                );
            }
        }
    }

    #[test]
    fn every_length_around_the_block_boundaries_is_padded_right() {
        // 55, 56 and 64 bytes are where the padding spills into a second block.
        let known = [
            (55, "ef1772b6dff9a122358552954ad0df65"),
            (56, "3b0c8ac703f828b04c6c197006d17218"),
            (64, "014842d480b571495a4a0363793f7367"),
        ];
        for (length, expected) in known {
            assert_eq!(hex(digest(&vec![b'a'; length])), expected, "{length} bytes");
        }
    }
}
