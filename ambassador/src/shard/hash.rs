//! twemproxy's key hashes. Where its C reads a `char` (signed on x86) and widens it, bytes
//! ≥ 0x80 are sign-extended here too; `fnv1a_64` is computed in 32 bits as twemproxy does;
//! `crc32` is libmemcached's 15-bit variant and `crc32a` the full CRC-32.

use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

/// twemproxy's names for its hashes (spelled as in its configs, hence the underscores).
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Hash {
    OneAtATime,
    Md5,
    Crc16,
    Crc32,
    Crc32a,
    Fnv1_64,
    Fnv1a_64,
    Fnv1_32,
    Fnv1a_32,
    Hsieh,
    Murmur,
    Jenkins,
}

impl Hash {
    pub const ALL: [Hash; 12] = [
        Hash::OneAtATime,
        Hash::Md5,
        Hash::Crc16,
        Hash::Crc32,
        Hash::Crc32a,
        Hash::Fnv1_64,
        Hash::Fnv1a_64,
        Hash::Fnv1_32,
        Hash::Fnv1a_32,
        Hash::Hsieh,
        Hash::Murmur,
        Hash::Jenkins,
    ];

    /// The name in a twemproxy config.
    pub fn name(self) -> &'static str {
        match self {
            Hash::OneAtATime => "one_at_a_time",
            Hash::Md5 => "md5",
            Hash::Crc16 => "crc16",
            Hash::Crc32 => "crc32",
            Hash::Crc32a => "crc32a",
            Hash::Fnv1_64 => "fnv1_64",
            Hash::Fnv1a_64 => "fnv1a_64",
            Hash::Fnv1_32 => "fnv1_32",
            Hash::Fnv1a_32 => "fnv1a_32",
            Hash::Hsieh => "hsieh",
            Hash::Murmur => "murmur",
            Hash::Jenkins => "jenkins",
        }
    }

    pub fn hash(self, key: &[u8]) -> u32 {
        match self {
            Hash::OneAtATime => one_at_a_time(key),
            Hash::Md5 => {
                let d = md5(key);
                u32::from_le_bytes([d[0], d[1], d[2], d[3]])
            }
            Hash::Crc16 => crc16(key),
            Hash::Crc32 => (!crc32_raw(key) >> 16) & 0x7fff,
            Hash::Crc32a => !crc32_raw(key),
            Hash::Fnv1_64 => {
                let mut h: u64 = 0xcbf2_9ce4_8422_2325;
                for &b in key {
                    h = h.wrapping_mul(0x0100_0000_01b3);
                    h ^= sx(b) as i64 as u64;
                }
                h as u32
            }
            Hash::Fnv1a_64 => {
                let mut h: u32 = 0xcbf2_9ce4_8422_2325u64 as u32;
                for &b in key {
                    h ^= sx(b);
                    h = h.wrapping_mul(0x0100_0000_01b3u64 as u32);
                }
                h
            }
            Hash::Fnv1_32 => {
                let mut h: u32 = 2_166_136_261;
                for &b in key {
                    h = h.wrapping_mul(16_777_619);
                    h ^= sx(b);
                }
                h
            }
            Hash::Fnv1a_32 => {
                let mut h: u32 = 2_166_136_261;
                for &b in key {
                    h ^= sx(b);
                    h = h.wrapping_mul(16_777_619);
                }
                h
            }
            Hash::Hsieh => hsieh(key),
            Hash::Murmur => murmur(key),
            Hash::Jenkins => jenkins(key),
        }
    }
}

/// A C `char` widened to 32 bits: sign-extended.
fn sx(b: u8) -> u32 {
    b as i8 as i32 as u32
}

pub fn md5(data: &[u8]) -> [u8; 16] {
    Md5::digest(data).into()
}

fn one_at_a_time(key: &[u8]) -> u32 {
    let mut v: u32 = 0;
    for &b in key {
        v = v.wrapping_add(sx(b));
        v = v.wrapping_add(v << 10);
        v ^= v >> 6;
    }
    v = v.wrapping_add(v << 3);
    v ^= v >> 11;
    v.wrapping_add(v << 15)
}

fn crc16(key: &[u8]) -> u32 {
    // CRC-16/XMODEM table; the running value is never masked to 16 bits, as in twemproxy.
    let mut crc: u32 = 0;
    for &b in key {
        let idx = ((crc >> 8) ^ sx(b)) & 0xff;
        crc = (crc << 8) ^ crc16_entry(idx);
    }
    crc
}

fn crc16_entry(i: u32) -> u32 {
    let mut c = i << 8;
    for _ in 0..8 {
        c = if c & 0x8000 != 0 {
            (c << 1) ^ 0x1021
        } else {
            c << 1
        };
    }
    c & 0xffff
}

fn crc32_raw(key: &[u8]) -> u32 {
    let mut crc: u32 = !0;
    for &b in key {
        let mut c = (crc ^ b as u32) & 0xff;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xedb8_8320
            } else {
                c >> 1
            };
        }
        crc = (crc >> 8) ^ c;
    }
    crc
}

fn hsieh(key: &[u8]) -> u32 {
    if key.is_empty() {
        return 0;
    }
    let g16 = |d: &[u8]| u16::from_le_bytes([d[0], d[1]]) as u32;
    let mut h: u32 = 0;
    let mut d = key;
    while d.len() >= 4 {
        h = h.wrapping_add(g16(d));
        let tmp = (g16(&d[2..]) << 11) ^ h;
        h = (h << 16) ^ tmp;
        d = &d[4..];
        h = h.wrapping_add(h >> 11);
    }
    match d.len() {
        3 => {
            h = h.wrapping_add(g16(d));
            h ^= h << 16;
            h ^= sx(d[2]) << 18;
            h = h.wrapping_add(h >> 11);
        }
        2 => {
            h = h.wrapping_add(g16(d));
            h ^= h << 11;
            h = h.wrapping_add(h >> 17);
        }
        1 => {
            h = h.wrapping_add(sx(d[0]));
            h ^= h << 10;
            h = h.wrapping_add(h >> 1);
        }
        _ => {}
    }
    h ^= h << 3;
    h = h.wrapping_add(h >> 5);
    h ^= h << 4;
    h = h.wrapping_add(h >> 17);
    h ^= h << 25;
    h.wrapping_add(h >> 6)
}

fn murmur(key: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    let len = key.len() as u32;
    let mut h = 0xdead_beefu32.wrapping_mul(len) ^ len;
    let mut d = key;
    while d.len() >= 4 {
        let mut k = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
        d = &d[4..];
    }
    if d.len() >= 3 {
        h ^= (d[2] as u32) << 16;
    }
    if d.len() >= 2 {
        h ^= (d[1] as u32) << 8;
    }
    if !d.is_empty() {
        h ^= d[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^ (h >> 15)
}

/// Bob Jenkins' lookup3 `hashlittle` with twemproxy's initial value.
fn jenkins(key: &[u8]) -> u32 {
    const INITVAL: u32 = 13;
    let mut a = 0xdead_beefu32
        .wrapping_add(key.len() as u32)
        .wrapping_add(INITVAL);
    let (mut b, mut c) = (a, a);
    let rot = |x: u32, k: u32| x.rotate_left(k);
    let mut d = key;
    while d.len() > 12 {
        a = a.wrapping_add(u32::from_le_bytes([d[0], d[1], d[2], d[3]]));
        b = b.wrapping_add(u32::from_le_bytes([d[4], d[5], d[6], d[7]]));
        c = c.wrapping_add(u32::from_le_bytes([d[8], d[9], d[10], d[11]]));
        // mix
        a = a.wrapping_sub(c);
        a ^= rot(c, 4);
        c = c.wrapping_add(b);
        b = b.wrapping_sub(a);
        b ^= rot(a, 6);
        a = a.wrapping_add(c);
        c = c.wrapping_sub(b);
        c ^= rot(b, 8);
        b = b.wrapping_add(a);
        a = a.wrapping_sub(c);
        a ^= rot(c, 16);
        c = c.wrapping_add(b);
        b = b.wrapping_sub(a);
        b ^= rot(a, 19);
        a = a.wrapping_add(c);
        c = c.wrapping_sub(b);
        c ^= rot(b, 4);
        b = b.wrapping_add(a);
        d = &d[12..];
    }
    if d.is_empty() {
        return c;
    }
    let mut tail = [0u8; 12];
    tail[..d.len()].copy_from_slice(d);
    a = a.wrapping_add(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
    b = b.wrapping_add(u32::from_le_bytes([tail[4], tail[5], tail[6], tail[7]]));
    c = c.wrapping_add(u32::from_le_bytes([tail[8], tail[9], tail[10], tail[11]]));
    // final
    c ^= b;
    c = c.wrapping_sub(rot(b, 14));
    a ^= c;
    a = a.wrapping_sub(rot(c, 11));
    b ^= a;
    b = b.wrapping_sub(rot(a, 25));
    c ^= b;
    c = c.wrapping_sub(rot(b, 16));
    a ^= c;
    a = a.wrapping_sub(rot(c, 4));
    b ^= a;
    b = b.wrapping_sub(rot(a, 14));
    c ^= b;
    c.wrapping_sub(rot(b, 24))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        // Published values of the underlying algorithms.
        assert_eq!(Hash::Crc32a.hash(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc16(b"123456789") & 0xffff, 0x31c3);
        assert_eq!(Hash::Fnv1a_32.hash(b"a"), 0xe40c_292c);
        assert_eq!(Hash::Fnv1_32.hash(b"a"), 0x050c_5d7e);
        assert_eq!(Hash::Fnv1_64.hash(b"a"), 0xaf63_bd4c_8601_b7beu64 as u32);
        // lookup3 hashlittle("", 0) is 0xdeadbeef; ours adds twemproxy's initval 13.
        assert_eq!(jenkins(b""), 0xdead_beef_u32.wrapping_add(13));
    }

    #[test]
    fn high_bytes_are_sign_extended_where_twemproxy_reads_a_char() {
        // With sign extension the result differs from the unsigned reading.
        let unsigned = {
            let mut h: u32 = 2_166_136_261;
            h ^= 0xe9;
            h.wrapping_mul(16_777_619)
        };
        assert_ne!(Hash::Fnv1a_32.hash(&[0xe9]), unsigned);
    }
}
