//! `action = "reset"`: the rejected segment is rewritten, in place, into a TCP RST from the
//! server to the client (addresses and ports swapped, no payload, checksums recomputed) and sent
//! back out of the interface it came in on. Anything unusual (IP options, IPv6 extension
//! headers, a failed resize) falls back to a plain drop.
use crate::headers::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, window};
use aya_ebpf::helpers::{bpf_redirect, bpf_skb_change_tail, bpf_skb_store_bytes};
use aya_ebpf::programs::TcContext;

const TCP_LEN: usize = 20;
const MAX: usize = ETH_HLEN + 40 + TCP_LEN;

/// One's-complement sum of big-endian 16-bit words.
#[inline(always)]
fn sum(bytes: &[u8], mut acc: u32) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        acc += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    acc
}

#[inline(always)]
fn fold(mut acc: u32) -> u16 {
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    !(acc as u16)
}

/// Rewrites the packet into the RST and redirects it; false when it could not.
#[inline(always)]
pub fn answer(ctx: &TcContext) -> bool {
    let mut out = [0u8; MAX];
    let Some(eth) = window(ctx, 0, ETH_HLEN) else {
        return false;
    };
    // SAFETY (all packet reads): within the windows checked by `window`.
    let ether_type = unsafe { u16::from_be_bytes([*eth.add(12), *eth.add(13)]) };
    for i in 0..6 {
        unsafe {
            out[i] = *eth.add(6 + i);
            out[6 + i] = *eth.add(i);
        }
    }
    out[12..14].copy_from_slice(&ether_type.to_be_bytes());
    let (ip_len, l4, payload) = match ether_type {
        ETH_P_IP => {
            let Some(ip) = window(ctx, ETH_HLEN, 20) else {
                return false;
            };
            let (vihl, total) = unsafe { (*ip, u16::from_be_bytes([*ip.add(2), *ip.add(3)])) };
            if vihl != 0x45 {
                return false; // IP options: not rewritten
            }
            let o = ETH_HLEN;
            out[o] = 0x45;
            out[o + 2..o + 4].copy_from_slice(&40u16.to_be_bytes());
            out[o + 6] = 0x40; // don't fragment
            out[o + 8] = 64;
            out[o + 9] = IPPROTO_TCP;
            for i in 0..4 {
                unsafe {
                    out[o + 12 + i] = *ip.add(16 + i);
                    out[o + 16 + i] = *ip.add(12 + i);
                }
            }
            let check = fold(sum(&out[o..o + 20], 0));
            out[o + 10..o + 12].copy_from_slice(&check.to_be_bytes());
            (
                20usize,
                ETH_HLEN + 20,
                usize::from(total).saturating_sub(20),
            )
        }
        ETH_P_IPV6 => {
            let Some(ip) = window(ctx, ETH_HLEN, 40) else {
                return false;
            };
            let (next, plen) =
                unsafe { (*ip.add(6), u16::from_be_bytes([*ip.add(4), *ip.add(5)])) };
            if next != IPPROTO_TCP {
                return false;
            }
            let o = ETH_HLEN;
            out[o] = 0x60;
            out[o + 4..o + 6].copy_from_slice(&(TCP_LEN as u16).to_be_bytes());
            out[o + 6] = IPPROTO_TCP;
            out[o + 7] = 64;
            for i in 0..16 {
                unsafe {
                    out[o + 8 + i] = *ip.add(24 + i);
                    out[o + 24 + i] = *ip.add(8 + i);
                }
            }
            (40usize, ETH_HLEN + 40, usize::from(plen))
        }
        _ => return false,
    };
    let Some(tcp) = window(ctx, l4, TCP_LEN) else {
        return false;
    };
    let (sport, dport, seq, ack, doff, flags) = unsafe {
        (
            [*tcp, *tcp.add(1)],
            [*tcp.add(2), *tcp.add(3)],
            u32::from_be_bytes([*tcp.add(4), *tcp.add(5), *tcp.add(6), *tcp.add(7)]),
            u32::from_be_bytes([*tcp.add(8), *tcp.add(9), *tcp.add(10), *tcp.add(11)]),
            usize::from(*tcp.add(12) >> 4) * 4,
            *tcp.add(13),
        )
    };
    // Sequence space the segment used: its payload, plus one for SYN and for FIN.
    let seg_len = payload.saturating_sub(doff) as u32
        + u32::from(flags & 0x02 != 0)
        + u32::from(flags & 0x01 != 0);
    let t = l4;
    out[t..t + 2].copy_from_slice(&dport);
    out[t + 2..t + 4].copy_from_slice(&sport);
    // RFC 9293: with an ACK in the segment, the RST takes its sequence number from it.
    let our_seq = if flags & 0x10 != 0 { ack } else { 0 };
    out[t + 4..t + 8].copy_from_slice(&our_seq.to_be_bytes());
    out[t + 8..t + 12].copy_from_slice(&seq.wrapping_add(seg_len).to_be_bytes());
    out[t + 12] = 5 << 4;
    out[t + 13] = 0x14; // RST, ACK
    // Checksum over the pseudo-header and the header.
    let mut acc = sum(&out[t..t + TCP_LEN], 0);
    if ip_len == 20 {
        acc = sum(&out[ETH_HLEN + 12..ETH_HLEN + 20], acc);
    } else {
        acc = sum(&out[ETH_HLEN + 8..ETH_HLEN + 40], acc);
    }
    acc += u32::from(IPPROTO_TCP) + TCP_LEN as u32;
    out[t + 16..t + 18].copy_from_slice(&fold(acc).to_be_bytes());

    let len = ETH_HLEN + ip_len + TCP_LEN;
    // SAFETY: helpers on this program's own skb; `out` holds `len` ≤ MAX bytes.
    unsafe {
        if bpf_skb_change_tail(ctx.skb.skb, len as u32, 0) != 0 {
            return false;
        }
        if bpf_skb_store_bytes(ctx.skb.skb, 0, out.as_ptr().cast(), len as u32, 0) != 0 {
            return false;
        }
        bpf_redirect((*ctx.skb.skb).ifindex, 0);
    }
    true
}
