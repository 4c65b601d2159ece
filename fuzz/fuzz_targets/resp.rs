//! RESP: the command framer (client side) and the reply framer (server side). No panic; a
//! claimed length stays within the buffer; a whole command stays whole (same length, same
//! arguments) when more bytes follow it; a reply that frames re-encodes to bytes that frame
//! to the same reply.
#![no_main]

use std::io::Cursor;

use ambassador::shard::{command, resp};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((c, n)) = command::parse(data) {
        assert!(n <= data.len());
        if let Some(c) = c {
            assert!(c.args.iter().all(|r| r.start <= r.end && r.end <= n));
            let mut more = data[..n].to_vec();
            more.extend_from_slice(b"*1\r\n$4\r\nPING\r\n");
            let (c2, n2) = command::parse(&more).expect("a whole command stays whole");
            assert_eq!(n2, n);
            assert_eq!(c2.expect("still a command").args, c.args);
        }
    }
    let mut cur = Cursor::new(data);
    if resp::check(&mut cur).is_ok() {
        let end = cur.position() as usize;
        assert!(end <= data.len());
        let (frame, n) = resp::frame(data).expect("check passed, so it frames");
        assert_eq!(n, end);
        let mut out = Vec::new();
        frame.encode(&mut out);
        let (again, m) = resp::frame(&out).expect("an encoded frame frames");
        assert_eq!(m, out.len());
        assert_eq!(again, frame);
    }
});
