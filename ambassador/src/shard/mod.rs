//! Key placement for the sharding ambassador, identical to twemproxy's (nutcracker): its hash
//! functions, its ketama and modula distributions, and its hash tags, quirks included, so a
//! twemproxy user switches without moving a key. The golden tests in `tests/tests/shard.rs`
//! check every hash and distribution against the real nutcracker and redis-server.

pub mod command;
pub mod dist;
pub mod hash;
pub mod memcache;
pub mod nutcracker;
pub mod proxy;
pub mod resp;

pub use dist::{Distribution, Server};
pub use hash::Hash;

/// The part of a key that is hashed: with a two-character `tag` such as `{}`, the text between
/// the first opening character and the next closing one, when that is not empty.
pub fn hashed_part(key: &[u8], tag: Option<[u8; 2]>) -> &[u8] {
    let Some([open, close]) = tag else { return key };
    let Some(start) = key.iter().position(|&b| b == open) else {
        return key;
    };
    match key[start + 1..].iter().position(|&b| b == close) {
        Some(len) if len > 0 => &key[start + 1..start + 1 + len],
        _ => key,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_tags_as_twemproxy_reads_them() {
        let t = Some(*b"{}");
        assert_eq!(hashed_part(b"user:{1000}:name", t), b"1000");
        assert_eq!(hashed_part(b"{}empty", t), b"{}empty");
        assert_eq!(hashed_part(b"no-close{abc", t), b"no-close{abc");
        assert_eq!(hashed_part(b"a{b}c{d}", t), b"b");
        assert_eq!(hashed_part(b"a{b}c", None), b"a{b}c");
    }
}
