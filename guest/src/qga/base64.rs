//! Base64 as qemu-ga uses it: standard alphabet, padded, no line breaks on output; input may
//! carry `\n` (Proxmox's encoder wraps lines), any other byte outside the alphabet is an error.

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Bytes `data` takes once encoded.
pub fn encoded_len(data: &[u8]) -> usize {
    data.len().div_ceil(3) * 4
}

/// Appends the encoding of `data` to `out`: the whole groups in one pass over a slice sized
/// beforehand (a 1 MiB `guest-file-read` is 350,000 of them), then the padded tail.
pub fn encode_into(data: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + encoded_len(data), 0);
    let groups = data.chunks_exact(3);
    let tail = groups.remainder();
    let mut quads = out[start..].chunks_exact_mut(4);
    for (g, q) in groups.zip(&mut quads) {
        let n = (u32::from(g[0]) << 16) | (u32::from(g[1]) << 8) | u32::from(g[2]);
        q[0] = ALPHABET[(n >> 18) as usize & 63];
        q[1] = ALPHABET[(n >> 12) as usize & 63];
        q[2] = ALPHABET[(n >> 6) as usize & 63];
        q[3] = ALPHABET[n as usize & 63];
    }
    if let Some(q) = quads.next() {
        let b1 = tail.get(1).copied().unwrap_or(0);
        let n = (u32::from(tail[0]) << 16) | (u32::from(b1) << 8);
        q[0] = ALPHABET[(n >> 18) as usize & 63];
        q[1] = ALPHABET[(n >> 12) as usize & 63];
        q[2] = if tail.len() > 1 {
            ALPHABET[(n >> 6) as usize & 63]
        } else {
            b'='
        };
        q[3] = b'=';
    }
}

fn sextet(c: u8) -> Option<u32> {
    Some(u32::from(match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => return None,
    }))
}

/// Decodes `text`, skipping `\n`. `None` for a byte outside the alphabet, misplaced padding
/// or a length that is not a whole number of groups.
pub fn decode(text: &str) -> Option<Vec<u8>> {
    let bytes: Vec<u8> = text.bytes().filter(|&b| b != b'\n').collect();
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    let groups = bytes.len() / 4;
    for (g, quad) in bytes.chunks(4).enumerate() {
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && g + 1 != groups) {
            return None;
        }
        let mut n = 0u32;
        for &c in &quad[..4 - pad] {
            n = (n << 6) | sextet(c)?;
        }
        n <<= 6 * pad as u32;
        let got = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&got[..3 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trips_every_length_mod_three() {
        for (raw, enc) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"\xff\x00\xfe", "/wD+"),
            (b"foobar!", "Zm9vYmFyIQ=="),
            (b"foobar!?", "Zm9vYmFyIT8="),
        ] {
            let mut out = b"x".to_vec();
            encode_into(raw, &mut out);
            assert_eq!(&out[1..], enc.as_bytes());
            assert_eq!(decode(enc).as_deref(), Some(raw));
        }
    }

    #[test]
    fn decode_skips_the_newlines_of_wrapped_input() {
        assert_eq!(decode("Zm9v\nYmFy\n").as_deref(), Some(&b"foobar"[..]));
    }

    #[test]
    fn decode_refuses_bytes_outside_the_alphabet_and_bad_padding() {
        for bad in ["Zm9v YmFy", "Zm9", "Z===", "Zg==Zm9v", "Zm9v\r\n", "Zm-v"] {
            assert_eq!(decode(bad), None, "{bad:?}");
        }
    }
}
