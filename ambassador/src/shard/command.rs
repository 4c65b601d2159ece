//! Client commands as the sharding proxy needs them: where each argument lies in the read
//! buffer (no copies), and what the proxy does with the command.
//!
//! [`parse`] takes an array of bulk strings or an inline command from the front of a buffer and
//! returns `Incomplete` until the whole command is there; a malformed one is a protocol error
//! naming what is wrong.

use std::ops::Range;

use super::resp::{Error, MAX_ARGS, MAX_BULK, MAX_INLINE};

/// One command: its arguments as ranges into the buffer it was parsed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub args: Vec<Range<usize>>,
    /// Bytes the command took.
    pub len: usize,
    /// Sent as RESP (forwardable as is) rather than inline.
    pub resp: bool,
}

fn find_crlf(buf: &[u8], from: usize, limit: usize) -> Result<usize, Error> {
    let end = buf.len().min(from.saturating_add(limit));
    match buf[from..end].windows(2).position(|w| w == b"\r\n") {
        Some(i) => Ok(from + i),
        None if buf.len() - from > limit => Err(Error::Protocol("line too long".into())),
        None => Err(Error::Incomplete),
    }
}

fn number(buf: &[u8], what: &str) -> Result<i64, Error> {
    std::str::from_utf8(buf)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| {
            Error::Protocol(format!(
                "invalid {what} {:?}",
                String::from_utf8_lossy(&buf[..buf.len().min(32)])
            ))
        })
}

/// The command at the front of `buf`. `Ok(None)` is an empty command (`*0` or a blank inline
/// line) that takes `len` bytes and gets no reply.
pub fn parse(buf: &[u8]) -> Result<(Option<Command>, usize), Error> {
    if buf.is_empty() {
        return Err(Error::Incomplete);
    }
    if buf[0] != b'*' {
        let end = find_crlf(buf, 0, MAX_INLINE)?;
        let mut args = Vec::new();
        let mut i = 0;
        while i < end {
            while i < end && buf[i].is_ascii_whitespace() {
                i += 1;
            }
            let start = i;
            while i < end && !buf[i].is_ascii_whitespace() {
                i += 1;
            }
            if i > start {
                args.push(start..i);
            }
        }
        let len = end + 2;
        if args.is_empty() {
            return Ok((None, len));
        }
        return Ok((
            Some(Command {
                args,
                len,
                resp: false,
            }),
            len,
        ));
    }
    let end = find_crlf(buf, 1, 32)?;
    let n = number(&buf[1..end], "multibulk length")?;
    if n < 0 || n as usize > MAX_ARGS {
        return Err(Error::Protocol(format!("invalid multibulk length {n}")));
    }
    let mut pos = end + 2;
    if n == 0 {
        return Ok((None, pos));
    }
    let mut args = Vec::with_capacity(n as usize);
    for _ in 0..n {
        match buf.get(pos) {
            None => return Err(Error::Incomplete),
            Some(b'$') => {}
            Some(&b) => {
                return Err(Error::Protocol(format!(
                    "expected '$', got '{}'",
                    (b as char).escape_default()
                )))
            }
        }
        let end = find_crlf(buf, pos + 1, 32)?;
        let l = number(&buf[pos + 1..end], "bulk length")?;
        if l < 0 || l as usize > MAX_BULK {
            return Err(Error::Protocol(format!("invalid bulk length {l}")));
        }
        let start = end + 2;
        let stop = start + l as usize;
        if buf.len() < stop + 2 {
            return Err(Error::Incomplete);
        }
        if &buf[stop..stop + 2] != b"\r\n" {
            return Err(Error::Protocol("bulk string not followed by CRLF".into()));
        }
        args.push(start..stop);
        pos = stop + 2;
    }
    Ok((
        Some(Command {
            args,
            len: pos,
            resp: true,
        }),
        pos,
    ))
}

/// What the proxy does with a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Answered by the proxy: PING, ECHO, QUIT, AUTH, SELECT.
    Local,
    /// One key, at this argument index.
    Key(usize),
    /// MGET: keys from argument 1; the reply is an array in key order.
    Mget,
    /// DEL, UNLINK, EXISTS, TOUCH: keys from argument 1; the reply is the sum of the counts.
    Count,
    /// MSET: key/value pairs from argument 1; the reply is +OK when every shard said so.
    Mset,
    /// Refused with an error saying why; the connection stays usable.
    Unsupported(&'static str),
}

const NO_TRANSACTIONS: &str = "transactions cannot span shards";
const NO_PUBSUB: &str = "pub/sub is not sharded: connect to a shard";
const NO_BLOCKING: &str = "blocking commands would hold a shard connection";
const NO_WHOLE_KEYSPACE: &str = "it needs the whole keyspace, which no shard has";

/// Classify by the command name (any case) and argument count.
pub fn classify(name: &[u8], argc: usize) -> Kind {
    let mut up = [0u8; 24];
    if name.len() > up.len() {
        return Kind::Unsupported("unknown command");
    }
    for (d, s) in up.iter_mut().zip(name) {
        *d = s.to_ascii_uppercase();
    }
    match &up[..name.len()] {
        b"PING" | b"ECHO" | b"QUIT" | b"AUTH" | b"SELECT" => Kind::Local,
        b"MGET" if argc >= 2 => Kind::Mget,
        b"DEL" | b"UNLINK" | b"EXISTS" | b"TOUCH" if argc >= 2 => Kind::Count,
        b"MSET" if argc >= 3 && argc % 2 == 1 => Kind::Mset,
        b"MULTI" | b"EXEC" | b"DISCARD" | b"WATCH" | b"UNWATCH" => {
            Kind::Unsupported(NO_TRANSACTIONS)
        }
        b"SUBSCRIBE" | b"PSUBSCRIBE" | b"UNSUBSCRIBE" | b"PUNSUBSCRIBE" | b"SSUBSCRIBE"
        | b"PUBLISH" | b"MONITOR" => Kind::Unsupported(NO_PUBSUB),
        b"BLPOP" | b"BRPOP" | b"BRPOPLPUSH" | b"BLMOVE" | b"BLMPOP" | b"BZPOPMIN" | b"BZPOPMAX"
        | b"BZMPOP" | b"WAIT" | b"XREAD" | b"XREADGROUP" => Kind::Unsupported(NO_BLOCKING),
        b"KEYS" | b"SCAN" | b"RANDOMKEY" | b"DBSIZE" | b"FLUSHDB" | b"FLUSHALL" | b"MSETNX"
        | b"RENAME" | b"RENAMENX" | b"SMOVE" | b"SINTER" | b"SUNION" | b"SDIFF" | b"COPY"
        | b"OBJECT" | b"MIGRATE" => Kind::Unsupported(NO_WHOLE_KEYSPACE),
        b"CONFIG" | b"INFO" | b"CLIENT" | b"CLUSTER" | b"SHUTDOWN" | b"DEBUG" | b"SAVE"
        | b"BGSAVE" | b"BGREWRITEAOF" | b"SLAVEOF" | b"REPLICAOF" | b"COMMAND" | b"HELLO"
        | b"SCRIPT" | b"FUNCTION" | b"LASTSAVE" | b"TIME" | b"ROLE" | b"MEMORY" | b"LATENCY"
        | b"SLOWLOG" | b"ACL" | b"SWAPDB" | b"SYNC" | b"PSYNC" | b"FAILOVER" | b"MODULE" => {
            Kind::Unsupported("it is a server command: send it to a shard directly")
        }
        // EVAL script numkeys key...: routed by the first key, as twemproxy does.
        b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" | b"FCALL" | b"FCALL_RO" => {
            if argc >= 4 {
                Kind::Key(3)
            } else {
                Kind::Unsupported("a script needs at least one key to be routed")
            }
        }
        _ if argc >= 2 => Kind::Key(1),
        _ => Kind::Unsupported("it has no key to route by"),
    }
}

/// Append a command (array of bulk strings) to `out`.
pub fn encode<'a>(out: &mut Vec<u8>, args: impl ExactSizeIterator<Item = &'a [u8]>) {
    out.push(b'*');
    push_num(out, args.len() as i64);
    for a in args {
        out.push(b'$');
        push_num(out, a.len() as i64);
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// `n\r\n`.
pub fn push_num(out: &mut Vec<u8>, n: i64) {
    out.extend_from_slice(n.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args<'a>(buf: &'a [u8], c: &Command) -> Vec<&'a [u8]> {
        c.args.iter().map(|r| &buf[r.clone()]).collect()
    }

    #[test]
    fn resp_and_inline_commands() {
        let b = b"*2\r\n$3\r\nGET\r\n$3\r\nfoo\r\nPING\r\n";
        let (c, n) = parse(b).unwrap();
        let c = c.unwrap();
        assert_eq!(args(b, &c), vec![&b"GET"[..], b"foo"]);
        assert!(c.resp);
        let (c2, n2) = parse(&b[n..]).unwrap();
        let c2 = c2.unwrap();
        assert_eq!(args(&b[n..], &c2), vec![&b"PING"[..]]);
        assert!(!c2.resp);
        assert_eq!(n + n2, b.len());
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let b = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n";
        for i in 0..b.len() {
            assert_eq!(parse(&b[..i]).unwrap_err(), Error::Incomplete, "prefix {i}");
        }
        assert!(parse(b).is_ok());
    }

    #[test]
    fn malformed_commands_are_protocol_errors() {
        for bad in [
            &b"*1\r\n$1099511627776\r\n"[..],
            b"*-5\r\n",
            b"*2\r\n:1\r\n",
            b"*1\r\n$3\r\nGETxx",
            b"*x\r\n",
            b"*1\r\n$-2\r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(Error::Protocol(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = vec![b'a'; MAX_INLINE + 10];
        assert!(matches!(parse(&long), Err(Error::Protocol(_))));
    }

    #[test]
    fn classification() {
        assert_eq!(classify(b"get", 2), Kind::Key(1));
        assert_eq!(classify(b"MGET", 3), Kind::Mget);
        assert_eq!(classify(b"del", 2), Kind::Count);
        assert_eq!(classify(b"mset", 5), Kind::Mset);
        assert!(matches!(classify(b"mset", 4), Kind::Key(1)));
        assert!(matches!(classify(b"multi", 1), Kind::Unsupported(_)));
        assert!(matches!(classify(b"blpop", 3), Kind::Unsupported(_)));
        assert_eq!(classify(b"eval", 4), Kind::Key(3));
        assert_eq!(classify(b"Ping", 1), Kind::Local);
    }
}
