//! XXH64, the placement hash of the rendezvous and jump rings: fast, well distributed, and
//! specified, so a key's node never changes with the Rust version (std's hashers may).

const PRIME1: u64 = 0x9E37_79B1_85EB_CA87;
const PRIME2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const PRIME3: u64 = 0x1656_67B1_9E37_79F9;
const PRIME4: u64 = 0x85EB_CA77_C2B2_AE63;
const PRIME5: u64 = 0x27D4_EB2F_1656_67C5;

#[inline(always)]
fn read_u64(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes[..8].try_into().expect("eight bytes"))
}

#[inline(always)]
fn read_u32(bytes: &[u8]) -> u64 {
    u64::from(u32::from_le_bytes(
        bytes[..4].try_into().expect("four bytes"),
    ))
}

#[inline(always)]
fn round(accumulator: u64, input: u64) -> u64 {
    accumulator
        .wrapping_add(input.wrapping_mul(PRIME2))
        .rotate_left(31)
        .wrapping_mul(PRIME1)
}

#[inline(always)]
fn merge(accumulator: u64, lane: u64) -> u64 {
    (accumulator ^ round(0, lane))
        .wrapping_mul(PRIME1)
        .wrapping_add(PRIME4)
}

/// Mixes a 64-bit value into a well-spread one (XXH64's final avalanche).
#[inline(always)]
pub fn avalanche(mut hash: u64) -> u64 {
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(PRIME2);
    hash ^= hash >> 29;
    hash = hash.wrapping_mul(PRIME3);
    hash ^ (hash >> 32)
}

pub fn xxh64(input: &[u8], seed: u64) -> u64 {
    let mut rest = input;
    let mut hash = if input.len() >= 32 {
        let mut lanes = [
            seed.wrapping_add(PRIME1).wrapping_add(PRIME2),
            seed.wrapping_add(PRIME2),
            seed,
            seed.wrapping_sub(PRIME1),
        ];
        while rest.len() >= 32 {
            for (index, lane) in lanes.iter_mut().enumerate() {
                *lane = round(*lane, read_u64(&rest[index * 8..]));
            }
            rest = &rest[32..];
        }
        let mut hash = lanes[0]
            .rotate_left(1)
            .wrapping_add(lanes[1].rotate_left(7))
            .wrapping_add(lanes[2].rotate_left(12))
            .wrapping_add(lanes[3].rotate_left(18));
        for lane in lanes {
            hash = merge(hash, lane);
        }
        hash
    } else {
        seed.wrapping_add(PRIME5)
    };
    hash = hash.wrapping_add(input.len() as u64);
    while rest.len() >= 8 {
        hash = (hash ^ round(0, read_u64(rest)))
            .rotate_left(27)
            .wrapping_mul(PRIME1)
            .wrapping_add(PRIME4);
        rest = &rest[8..];
    }
    if rest.len() >= 4 {
        hash = (hash ^ read_u32(rest).wrapping_mul(PRIME1))
            .rotate_left(23)
            .wrapping_mul(PRIME2)
            .wrapping_add(PRIME3);
        rest = &rest[4..];
    }
    for byte in rest {
        hash = (hash ^ u64::from(*byte).wrapping_mul(PRIME5))
            .rotate_left(11)
            .wrapping_mul(PRIME1);
    }
    avalanche(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_implementation() {
        // From the xxhash package (the reference C library) for seeds 0 and 7.
        let cases: [(&[u8], u64, u64); 8] = [
            (b"", 0xef46_db37_51d8_e999, 0x95f0_626f_6f0a_4409),
            (b"a", 0xd24e_c4f1_a98c_6e5b, 0xdc63_49d4_89e0_f965),
            (b"abc", 0x44bc_2cf5_ad77_0999, 0x9e75_5206_1566_76d7),
            (
                b"message digest",
                0x066e_d728_fcee_b3be,
                0x2852_7f41_fd48_8d76,
            ),
            (&[b'a'; 31], 0xfe47_067c_da80_2916, 0x7684_2456_8693_5331),
            (&[b'a'; 32], 0x856e_8432_98f9_9ad7, 0xfdb8_f8ed_1c94_7329),
            (&[b'a'; 33], 0x18f3_ff0c_21e3_b24b, 0x3682_7aaf_cffb_ea05),
            (&[b'x'; 100], 0x92f0_de5a_88a3_c094, 0xae5a_d321_e4fe_6127),
        ];
        for (input, seed0, seed7) in cases {
            assert_eq!(xxh64(input, 0), seed0, "{} bytes, seed 0", input.len());
            assert_eq!(xxh64(input, 7), seed7, "{} bytes, seed 7", input.len());
        }
    }
}
