//! memcached's ASCII protocol for the sharding ambassador (twemproxy's other protocol; the
//! book's `sharded/nutcracker.yaml` shards memcache on 11211): commands framed from the front
//! of a buffer (`Incomplete` until whole), and replies framed without knowing the request.

use std::ops::Range;

use super::resp::Error;

/// Longest command line accepted (memcached's own limit is 2048 plus keys).
pub const MAX_LINE: usize = 8 * 1024;
/// Largest value accepted (memcached's default item size limit).
pub const MAX_VALUE: usize = 1024 * 1024;
/// Largest value accepted in a reply: memcached's item size can be raised (`-I`) to 1 GiB.
pub const MAX_REPLY_VALUE: usize = 1024 * 1024 * 1024;
const MAX_KEY: usize = 250;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// get/gets/gat/gats: many keys, fanned out and merged.
    Retrieve,
    /// set/add/replace/append/prepend/cas: one key and a data block.
    Store,
    /// delete/incr/decr/touch: one key.
    Keyed,
    /// version/quit: answered here.
    Local,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub kind: Kind,
    /// The command's words (in the line), `noreply` excluded.
    pub words: Vec<Range<usize>>,
    /// Index of the first key among `words`.
    pub first_key: usize,
    /// The data block with its CRLF (storage commands).
    pub data: Option<Range<usize>>,
    /// The client asked for no reply: the shard is sent the command without `noreply` and
    /// its reply is dropped, so the shard connection's replies stay in step.
    pub noreply: bool,
}

fn bad(msg: &str) -> Error {
    Error::Protocol(msg.into())
}

/// The command at the front of `buf` and its length. `Ok(None)` is an unknown command, which
/// gets `ERROR` (memcached's answer) and keeps the connection.
pub fn parse(buf: &[u8]) -> Result<(Option<Command>, usize), Error> {
    let end = match buf.windows(2).position(|w| w == b"\r\n") {
        Some(e) => e,
        None if buf.len() > MAX_LINE => return Err(bad("line too long")),
        None => return Err(Error::Incomplete),
    };
    let line = &buf[..end];
    let mut words: Vec<Range<usize>> = Vec::new();
    let mut i = 0;
    while i < line.len() {
        while i < line.len() && line[i] == b' ' {
            i += 1;
        }
        let s = i;
        while i < line.len() && line[i] != b' ' {
            i += 1;
        }
        if i > s {
            words.push(s..i);
        }
    }
    let len = end + 2;
    let Some(first) = words.first() else {
        return Ok((None, len));
    };
    let name = &line[first.clone()];
    let (kind, first_key, nkeys_min) = match name {
        b"get" | b"gets" => (Kind::Retrieve, 1, 1),
        b"gat" | b"gats" => (Kind::Retrieve, 2, 1),
        b"set" | b"add" | b"replace" | b"append" | b"prepend" | b"cas" => (Kind::Store, 1, 1),
        b"delete" | b"incr" | b"decr" | b"touch" => (Kind::Keyed, 1, 1),
        b"version" | b"quit" => (Kind::Local, 1, 0),
        _ => return Ok((None, len)),
    };
    let noreply = words.len() > 1 && &line[words[words.len() - 1].clone()] == b"noreply";
    if noreply && kind != Kind::Retrieve {
        words.pop();
    }
    if words.len() < first_key + nkeys_min {
        return Err(bad("bad command line format"));
    }
    for w in &words[first_key.min(words.len())..] {
        if kind == Kind::Retrieve && w.len() > MAX_KEY {
            return Err(bad("key too long"));
        }
    }
    if kind != Kind::Retrieve && kind != Kind::Local && words[first_key].len() > MAX_KEY {
        return Err(bad("key too long"));
    }
    let mut data = None;
    let mut total = len;
    if kind == Kind::Store {
        let want = if name == b"cas" { 6 } else { 5 };
        if words.len() != want {
            return Err(bad("bad command line format"));
        }
        let bytes: usize = std::str::from_utf8(&line[words[4].clone()])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("bad data chunk"))?;
        if bytes > MAX_VALUE {
            return Err(bad("object too large for cache"));
        }
        if buf.len() < len + bytes + 2 {
            return Err(Error::Incomplete);
        }
        if &buf[len + bytes..len + bytes + 2] != b"\r\n" {
            return Err(bad("bad data chunk"));
        }
        data = Some(len..len + bytes + 2);
        total = len + bytes + 2;
    }
    Ok((
        Some(Command {
            kind,
            words,
            first_key,
            data,
            noreply,
        }),
        total,
    ))
}

/// Length of the whole reply at the front of `buf`: `VALUE` blocks up to `END`, or one line.
pub fn reply_len(buf: &[u8]) -> Result<usize, Error> {
    let mut pos = 0;
    loop {
        let Some(e) = buf[pos..].windows(2).position(|w| w == b"\r\n") else {
            if buf.len() - pos > MAX_LINE {
                return Err(bad("reply line too long"));
            }
            return Err(Error::Incomplete);
        };
        let line = &buf[pos..pos + e];
        let next = pos + e + 2;
        if !line.starts_with(b"VALUE ") {
            // END closes a retrieval; any other line is a whole reply by itself.
            return Ok(next);
        }
        let bytes: usize = line
            .split(|&b| b == b' ')
            .nth(3)
            .and_then(|w| std::str::from_utf8(w).ok())
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("bad VALUE line"))?;
        if bytes > MAX_REPLY_VALUE {
            return Err(bad("VALUE larger than 1 GiB"));
        }
        let end = next + bytes + 2;
        if buf.len() < end {
            return Err(Error::Incomplete);
        }
        if &buf[end - 2..end] != b"\r\n" {
            return Err(bad("VALUE data not followed by CRLF"));
        }
        pos = end;
    }
}

/// The `VALUE` blocks of a retrieval reply: (key, whole block).
pub fn values(reply: &[u8]) -> Option<Vec<(&[u8], Range<usize>)>> {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let e = reply[pos..].windows(2).position(|w| w == b"\r\n")?;
        let line = &reply[pos..pos + e];
        if line == b"END" {
            return Some(out);
        }
        if !line.starts_with(b"VALUE ") {
            return None;
        }
        let mut ws = line.split(|&b| b == b' ');
        let key = ws.nth(1)?;
        let bytes: usize = std::str::from_utf8(ws.nth(1)?).ok()?.parse().ok()?;
        let end = (pos + e + 2).checked_add(bytes)?.checked_add(2)?;
        if end > reply.len() {
            return None;
        }
        out.push((key, pos..end));
        pos = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_claiming_a_huge_or_unterminated_value_is_an_error_not_a_crash() {
        // Found by fuzz/fuzz_targets/memcache.rs: the length overflowed and the next slice
        // panicked.
        let huge = b"VALUE k 0 18446744073709551615\r\nabc\r\nEND\r\n";
        assert!(matches!(reply_len(huge), Err(Error::Protocol(_))));
        let unterminated = b"VALUE k 0 3\r\nabcXYEND\r\n";
        assert!(matches!(reply_len(unterminated), Err(Error::Protocol(_))));
        let ok = b"VALUE k 0 3\r\nabc\r\nEND\r\n";
        assert_eq!(reply_len(ok).unwrap(), ok.len());
        assert_eq!(values(ok).unwrap().len(), 1);
    }

    #[test]
    fn commands_frame_with_their_data() {
        let b = b"set k 0 0 5 noreply\r\nhello\r\nget a b c\r\n";
        let (c, n) = parse(b).unwrap();
        let c = c.unwrap();
        assert_eq!(c.kind, Kind::Store);
        assert!(c.noreply);
        assert_eq!(c.words.len(), 5);
        assert_eq!(&b[c.data.clone().unwrap()], b"hello\r\n");
        let (g, m) = parse(&b[n..]).unwrap();
        assert_eq!(g.unwrap().words.len(), 4);
        assert_eq!(n + m, b.len());
        for i in 0..n {
            assert_eq!(parse(&b[..i]).unwrap_err(), Error::Incomplete, "prefix {i}");
        }
    }

    #[test]
    fn malformed_and_unknown() {
        assert!(matches!(parse(b"set k 0 0 x\r\n"), Err(Error::Protocol(_))));
        assert!(matches!(
            parse(b"set k 0 0 2\r\nabcd\r\n"),
            Err(Error::Protocol(_))
        ));
        assert!(matches!(
            parse(b"set k 0 0 99999999999\r\n"),
            Err(Error::Protocol(_))
        ));
        assert!(matches!(parse(b"get\r\n"), Err(Error::Protocol(_))));
        assert_eq!(parse(b"flush_all\r\n").unwrap(), (None, 11));
    }

    #[test]
    fn replies_frame_without_the_request() {
        let r = b"VALUE a 0 3\r\nabc\r\nVALUE b 5 2\r\nxy\r\nEND\r\nSTORED\r\n";
        let n = reply_len(r).unwrap();
        assert_eq!(&r[n..], b"STORED\r\n");
        let v = values(&r[..n]).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].0, b"b");
        assert_eq!(reply_len(&r[..n - 1]).unwrap_err(), Error::Incomplete);
        assert_eq!(reply_len(b"42\r\n").unwrap(), 4);
    }
}
