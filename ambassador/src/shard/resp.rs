//! RESP (Redis serialization protocol) framing for the sharding ambassador.
//!
//! mini-redis's idiom: [`check`] first decides whether a whole frame is in the buffer
//! (`Incomplete` otherwise, with nothing consumed or copied), then [`parse`] reads it. Commands
//! are arrays of bulk strings, or inline commands (`PING\r\n`), which twemproxy rejects and we
//! accept. Malformed input is an [`Error::Protocol`] the caller answers with `-ERR` and closes.

use std::io::Cursor;

/// Limits that keep a hostile client from making us buffer without bound.
pub const MAX_BULK: usize = 512 * 1024 * 1024;
pub const MAX_ARGS: usize = 1024 * 1024;
pub const MAX_INLINE: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Vec<u8>),
    Null,
    Array(Vec<Frame>),
    NullArray,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Error {
    /// Not a whole frame yet: read more.
    Incomplete,
    /// Not RESP: say so and close.
    Protocol(String),
}

fn protocol<T>(msg: impl Into<String>) -> Result<T, Error> {
    Err(Error::Protocol(msg.into()))
}

fn get_u8(c: &mut Cursor<&[u8]>) -> Result<u8, Error> {
    let pos = c.position() as usize;
    let b = *c.get_ref().get(pos).ok_or(Error::Incomplete)?;
    c.set_position(pos as u64 + 1);
    Ok(b)
}

fn line<'a>(c: &mut Cursor<&'a [u8]>) -> Result<&'a [u8], Error> {
    let start = c.position() as usize;
    let buf: &'a [u8] = c.get_ref();
    let Some(rel) = buf[start..].windows(2).position(|w| w == b"\r\n") else {
        if buf.len() - start > MAX_INLINE {
            return protocol("line too long");
        }
        return Err(Error::Incomplete);
    };
    c.set_position((start + rel + 2) as u64);
    Ok(&buf[start..start + rel])
}

fn number(c: &mut Cursor<&[u8]>) -> Result<i64, Error> {
    let l = line(c)?;
    std::str::from_utf8(l)
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or_else(
            || {
                protocol(format!(
                    "invalid length or integer {:?}",
                    String::from_utf8_lossy(l)
                ))
            },
            Ok,
        )
}

fn skip(c: &mut Cursor<&[u8]>, n: usize) -> Result<(), Error> {
    let pos = c.position() as usize;
    if c.get_ref().len() < pos + n {
        return Err(Error::Incomplete);
    }
    c.set_position((pos + n) as u64);
    Ok(())
}

/// Whether a whole frame starts at the cursor; on success the cursor is just past it.
pub fn check(c: &mut Cursor<&[u8]>) -> Result<(), Error> {
    match get_u8(c)? {
        b'+' | b'-' => line(c).map(|_| ()),
        b':' => number(c).map(|_| ()),
        b'$' => {
            let n = number(c)?;
            if n == -1 {
                return Ok(());
            }
            if n < 0 || n as usize > MAX_BULK {
                return protocol(format!("invalid bulk length {n}"));
            }
            skip(c, n as usize + 2)?;
            let end = c.position() as usize;
            if &c.get_ref()[end - 2..end] != b"\r\n" {
                return protocol("bulk string not followed by CRLF");
            }
            Ok(())
        }
        b'*' => {
            let n = number(c)?;
            if n == -1 {
                return Ok(());
            }
            if n < 0 || n as usize > MAX_ARGS {
                return protocol(format!("invalid multibulk length {n}"));
            }
            for _ in 0..n {
                check(c)?;
            }
            Ok(())
        }
        // An inline command: a line of words.
        _ => {
            c.set_position(c.position() - 1);
            line(c).map(|_| ())
        }
    }
}

/// Parse the frame [`check`] vouched for.
pub fn parse(c: &mut Cursor<&[u8]>) -> Result<Frame, Error> {
    match get_u8(c)? {
        b'+' => Ok(Frame::Simple(
            String::from_utf8_lossy(line(c)?).into_owned(),
        )),
        b'-' => Ok(Frame::Error(String::from_utf8_lossy(line(c)?).into_owned())),
        b':' => Ok(Frame::Integer(number(c)?)),
        b'$' => {
            let n = number(c)?;
            if n == -1 {
                return Ok(Frame::Null);
            }
            let start = c.position() as usize;
            let data = c.get_ref()[start..start + n as usize].to_vec();
            if &c.get_ref()[start + n as usize..start + n as usize + 2] != b"\r\n" {
                return protocol("bulk string not followed by CRLF");
            }
            c.set_position((start + n as usize + 2) as u64);
            Ok(Frame::Bulk(data))
        }
        b'*' => {
            let n = number(c)?;
            if n == -1 {
                return Ok(Frame::NullArray);
            }
            (0..n)
                .map(|_| parse(c))
                .collect::<Result<_, _>>()
                .map(Frame::Array)
        }
        _ => {
            c.set_position(c.position() - 1);
            let words = line(c)?
                .split(|b| b.is_ascii_whitespace())
                .filter(|w| !w.is_empty())
                .map(|w| Frame::Bulk(w.to_vec()))
                .collect();
            Ok(Frame::Array(words))
        }
    }
}

/// One whole frame from the front of `buf`: the frame and how many bytes it took.
pub fn frame(buf: &[u8]) -> Result<(Frame, usize), Error> {
    let mut c = Cursor::new(buf);
    check(&mut c)?;
    let len = c.position() as usize;
    c.set_position(0);
    let f = parse(&mut c)?;
    Ok((f, len))
}

impl Frame {
    /// A command's arguments, when the frame is an array of bulk strings.
    pub fn args(&self) -> Option<Vec<&[u8]>> {
        match self {
            Frame::Array(items) => items
                .iter()
                .map(|i| match i {
                    Frame::Bulk(b) => Some(&b[..]),
                    _ => None,
                })
                .collect(),
            _ => None,
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Simple(s) => out.extend_from_slice(format!("+{s}\r\n").as_bytes()),
            Frame::Error(s) => out.extend_from_slice(format!("-{s}\r\n").as_bytes()),
            Frame::Integer(i) => out.extend_from_slice(format!(":{i}\r\n").as_bytes()),
            Frame::Bulk(b) => {
                out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
            }
            Frame::Null => out.extend_from_slice(b"$-1\r\n"),
            Frame::Array(items) => {
                out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
                for i in items {
                    i.encode(out);
                }
            }
            Frame::NullArray => out.extend_from_slice(b"*-1\r\n"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_and_parse_agree_on_a_bulk_string_without_its_crlf() {
        // Found by fuzz/fuzz_targets/resp.rs: check vouched for a frame parse then refused.
        let b = b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\r\nvalue\r\n";
        assert!(matches!(
            check(&mut Cursor::new(&b[..])),
            Err(Error::Protocol(_))
        ));
        assert!(matches!(frame(b), Err(Error::Protocol(_))));
    }

    fn bulk(s: &str) -> Frame {
        Frame::Bulk(s.as_bytes().to_vec())
    }

    #[test]
    fn commands_parse_and_report_their_length() {
        let buf = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n*1\r\n$4\r\nPING\r\n";
        let (f, n) = frame(buf).unwrap();
        assert_eq!(f, Frame::Array(vec![bulk("SET"), bulk("k"), bulk("hello")]));
        assert_eq!(f.args().unwrap(), vec![&b"SET"[..], b"k", b"hello"]);
        let (g, m) = frame(&buf[n..]).unwrap();
        assert_eq!(g, Frame::Array(vec![bulk("PING")]));
        assert_eq!(n + m, buf.len());
    }

    #[test]
    fn every_prefix_of_a_frame_is_incomplete() {
        let buf = b"*2\r\n$3\r\nGET\r\n$10\r\n0123456789\r\n";
        for cut in 0..buf.len() {
            assert_eq!(
                frame(&buf[..cut]).unwrap_err(),
                Error::Incomplete,
                "cut {cut}"
            );
        }
        assert!(frame(buf).is_ok());
    }

    #[test]
    fn inline_commands_are_accepted() {
        let (f, n) = frame(b"SET  key value\r\nrest").unwrap();
        assert_eq!(
            f,
            Frame::Array(vec![bulk("SET"), bulk("key"), bulk("value")])
        );
        assert_eq!(n, 16);
    }

    #[test]
    fn replies_round_trip() {
        let f = Frame::Array(vec![
            Frame::Simple("OK".into()),
            Frame::Error("ERR no".into()),
            Frame::Integer(-3),
            bulk("x\r\ny"),
            Frame::Null,
            Frame::NullArray,
        ]);
        let mut out = Vec::new();
        f.encode(&mut out);
        assert_eq!(frame(&out).unwrap(), (f, out.len()));
    }

    #[test]
    fn malformed_input_is_a_protocol_error_not_a_panic() {
        for bad in [
            &b"*x\r\n"[..],
            b"$-5\r\n",
            b"*-2\r\n",
            b"$3\r\nabcXY",
            b"*1\r\n$99999999999\r\n",
            b":12a\r\n",
        ] {
            assert!(
                matches!(frame(bad), Err(Error::Protocol(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = vec![b'a'; MAX_INLINE + 10];
        assert!(matches!(frame(&long), Err(Error::Protocol(_))));
    }
}
