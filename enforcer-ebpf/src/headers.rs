//! Packet headers: Ethernet → IPv4 or IPv6 (no extension headers) → TCP, read with direct
//! packet access (one bounds check per header, then plain loads, no helper calls).
//!
//! Anything that is not TCP over IPv4/IPv6 passes; so do IPv4 fragments (no reliable TCP
//! header) and IPv6 packets with extension headers (not followed).
use aya_ebpf::programs::TcContext;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_TCP: u8 = 6;

/// A TCP segment's headers, as far as the gate needs them.
pub struct Segment {
    /// The source address as two words in memory order (IPv4-mapped for IPv4): the
    /// `BINDINGS` key without a zero-fill of a byte array, which BPF code generation turns
    /// into a call to a byte-wise memset.
    pub src: [u64; 2],
    /// Destination port (host byte order).
    pub dport: u16,
    /// Offset of the TCP header.
    pub l4: usize,
    /// TCP header length from the data offset field (not checked: may be below 20).
    pub tcp_len: usize,
    /// TCP flags (`tcp::*`).
    pub flags: u8,
    /// Length of the IP packet (header included) from its header; 0 for BIG TCP aggregates.
    pub ip_len: usize,
}

impl Segment {
    /// End of the IP packet in the frame: what follows (Ethernet padding of a short frame) is
    /// no payload. The frame's end when the IP length is 0 (BIG TCP aggregates).
    #[inline(always)]
    pub fn end(&self, ctx: &TcContext) -> usize {
        let frame = ctx.len() as usize;
        if self.ip_len == 0 {
            frame
        } else {
            (ETH_HLEN + self.ip_len).min(frame)
        }
    }
}

/// TCP flag bits.
pub mod tcp {
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// What the headers say about a packet.
pub enum Headers {
    /// A TCP segment the gate looks at.
    Tcp(Segment),
    /// Not TCP over IPv4/IPv6, an IPv4 fragment, IPv6 extension headers: not the gate's.
    Other,
    /// Too short or malformed where an IPv4/IPv6/TCP header should be.
    Malformed,
}

/// Reads the Ethernet, IP and TCP headers.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Headers {
    let Some(eth) = window(ctx, 0, ETH_HLEN) else {
        return Headers::Other;
    };
    let src: [u64; 2];
    let l4: usize;
    let ip_len: usize;
    // SAFETY (all reads below): each pointer comes from `window`, which checked that the bytes
    // read through it are inside the packet.
    match unsafe { u16::from_be_bytes([*eth.add(12), *eth.add(13)]) } {
        ETH_P_IP => {
            let Some(ip) = window(ctx, ETH_HLEN, 20) else {
                return Headers::Malformed;
            };
            let (vihl, total, frag, proto) = unsafe {
                (
                    *ip,
                    u16::from_be_bytes([*ip.add(2), *ip.add(3)]),
                    u16::from_be_bytes([*ip.add(6), *ip.add(7)]),
                    *ip.add(9),
                )
            };
            let ihl = ((vihl & 0x0f) as usize) * 4;
            if vihl >> 4 != 4 || ihl < 20 {
                return Headers::Malformed;
            }
            // Fragments (more-fragments flag or an offset) carry no reliable TCP header: pass.
            if proto != IPPROTO_TCP || frag & 0x3fff != 0 {
                return Headers::Other;
            }
            src = [0, unsafe {
                u64::from_le_bytes([
                    0,
                    0,
                    0xff,
                    0xff,
                    *ip.add(12),
                    *ip.add(13),
                    *ip.add(14),
                    *ip.add(15),
                ])
            }];
            l4 = ETH_HLEN + ihl;
            ip_len = total as usize;
        }
        ETH_P_IPV6 => {
            let Some(ip) = window(ctx, ETH_HLEN, 40) else {
                return Headers::Malformed;
            };
            // Extension headers are not followed: such packets pass.
            let (next, plen) =
                unsafe { (*ip.add(6), u16::from_be_bytes([*ip.add(4), *ip.add(5)])) };
            if next != IPPROTO_TCP {
                return Headers::Other;
            }
            // Memory order, as the IPv4 case builds it (the loads are bounded by `window`).
            src = unsafe {
                [
                    core::ptr::read_unaligned(ip.add(8).cast::<u64>()),
                    core::ptr::read_unaligned(ip.add(16).cast::<u64>()),
                ]
            };
            l4 = ETH_HLEN + 40;
            ip_len = if plen == 0 { 0 } else { 40 + plen as usize };
        }
        _ => return Headers::Other,
    }
    let Some(tcp) = window(ctx, l4, 20) else {
        return Headers::Malformed;
    };
    // SAFETY: inside the 20 bytes `window` checked.
    let (dport, doff, flags) = unsafe {
        (
            u16::from_be_bytes([*tcp.add(2), *tcp.add(3)]),
            *tcp.add(12),
            *tcp.add(13),
        )
    };
    Headers::Tcp(Segment {
        src,
        dport,
        l4,
        tcp_len: ((doff >> 4) as usize) * 4,
        flags,
        ip_len,
    })
}

/// A pointer to `len` bytes at `offset` of the packet (direct packet access), or `None` when
/// the packet's linear part is shorter (the gate then passes the packet).
#[inline(always)]
pub fn window(ctx: &TcContext, offset: usize, len: usize) -> Option<*const u8> {
    let start = ctx.data();
    if start + offset + len > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *const u8)
}
