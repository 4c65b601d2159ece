//! memcache text protocol: the command framer and the reply framer. No panic; claimed
//! lengths, words and data blocks stay within the buffer; a whole command stays whole when
//! more bytes follow; values found in a framed reply lie inside it.
#![no_main]

use ambassador::shard::memcache;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((c, n)) = memcache::parse(data) {
        assert!(n <= data.len());
        if let Some(c) = c {
            assert!(c.words.iter().all(|r| r.start <= r.end && r.end <= n));
            assert!(c.data.iter().all(|r| r.start <= r.end && r.end <= n));
            let mut more = data[..n].to_vec();
            more.extend_from_slice(b"get k\r\n");
            let (_, n2) = memcache::parse(&more).expect("a whole command stays whole");
            assert_eq!(n2, n);
        }
    }
    if let Ok(n) = memcache::reply_len(data) {
        assert!(n <= data.len());
        if let Some(values) = memcache::values(&data[..n]) {
            assert!(values.iter().all(|(_, r)| r.start <= r.end && r.end <= n));
        }
    }
});
