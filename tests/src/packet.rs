//! Synthetic Ethernet frames (IPv4 or IPv6, TCP) for the kernel gate's `BPF_PROG_TEST_RUN`
//! tests: the bytes a NIC would hand to the TC ingress hook.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// TCP flag bits.
pub mod flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

/// One TCP segment in an Ethernet frame.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Client address; its family picks IPv4 or IPv6 (the server's address follows it).
    pub src: IpAddr,
    pub dport: u16,
    /// Bytes of TCP options (NOPs), a multiple of 4.
    pub tcp_options: usize,
    /// IPv4 more-fragments flag.
    pub more_fragments: bool,
    pub flags: u8,
    pub payload: Vec<u8>,
    /// Bytes after the IP packet (Ethernet padding of a short frame), not counted in the IP
    /// length.
    pub padding: usize,
}

/// The client address the tests use unless they say otherwise.
pub const CLIENT4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// The server address of IPv4 frames.
pub const SERVER4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// The server address of IPv6 frames.
pub const SERVER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);

impl Frame {
    /// A PSH|ACK segment from [`CLIENT4`] to `dport` carrying `payload`.
    pub fn new(dport: u16, payload: &[u8]) -> Self {
        Self {
            src: IpAddr::V4(CLIENT4),
            dport,
            tcp_options: 0,
            more_fragments: false,
            flags: flags::PSH | flags::ACK,
            payload: payload.to_vec(),
            padding: 0,
        }
    }

    /// The frame's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        let tcp_len = 20 + self.tcp_options;
        let mut out = vec![0u8; 12];
        match self.src {
            IpAddr::V6(src) => {
                out.extend_from_slice(&0x86ddu16.to_be_bytes());
                let mut ip = [0u8; 40];
                ip[0] = 0x60;
                ip[4..6].copy_from_slice(&((tcp_len + self.payload.len()) as u16).to_be_bytes());
                ip[6] = 6;
                ip[7] = 64;
                ip[8..24].copy_from_slice(&src.octets());
                ip[24..40].copy_from_slice(&SERVER6.octets());
                out.extend_from_slice(&ip);
            }
            IpAddr::V4(src) => {
                out.extend_from_slice(&0x0800u16.to_be_bytes());
                let mut ip = [0u8; 20];
                ip[0] = 0x45;
                ip[2..4]
                    .copy_from_slice(&((20 + tcp_len + self.payload.len()) as u16).to_be_bytes());
                if self.more_fragments {
                    ip[6] = 0x20;
                }
                ip[8] = 64;
                ip[9] = 6;
                ip[12..16].copy_from_slice(&src.octets());
                ip[16..20].copy_from_slice(&SERVER4.octets());
                out.extend_from_slice(&ip);
            }
        }
        let mut tcp = vec![0u8; tcp_len];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&self.dport.to_be_bytes());
        tcp[4..8].copy_from_slice(&1_000_000u32.to_be_bytes()); // seq
        tcp[8..12].copy_from_slice(&5_000_000u32.to_be_bytes()); // ack
        tcp[12] = ((tcp_len / 4) as u8) << 4;
        tcp[13] = self.flags;
        for b in &mut tcp[20..] {
            *b = 1; // NOP options
        }
        out.extend_from_slice(&tcp);
        out.extend_from_slice(&self.payload);
        out.resize(out.len() + self.padding, 0);
        out
    }
}
