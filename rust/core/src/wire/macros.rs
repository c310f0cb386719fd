//! The boilerplate every view shares, written once.
//!
//! What stays in each protocol module, on purpose: the `mod field` byte ranges, the field
//! accessors, and (except for plain fixed-size headers) `check_len` — those are the protocol.

/// The view struct over a buffer `T`, its constructors, `into_inner`, and the private byte
/// accessors `b()` / `bm()` the field accessors go through.
///
/// `new_checked` runs the module's `check_len`: with `check_len = fixed` the macro writes one that
/// proves only the fixed header (`len >= fixed_len`), otherwise the module writes its own. Either
/// way the panic rules of [`crate::wire`] hold: a view from `new_checked` has no getter that panics.
macro_rules! view {
    (
        $(#[$attr:meta])*
        pub struct $name:ident;
        fixed_len = $fixed:expr;
    ) => {
        $(#[$attr])*
        #[derive(Debug, Clone)]
        pub struct $name<T: AsRef<[u8]>> {
            buffer: T,
        }

        impl<T: AsRef<[u8]>> $name<T> {
            #[doc = concat!(
                "Wrap without checking. Fixed-field accessors panic on a buffer shorter than `",
                stringify!($fixed),
                "` bytes."
            )]
            pub const fn new_unchecked(buffer: T) -> Self {
                $name { buffer }
            }

            /// Wrap after [`Self::check_len`]: no getter of the result panics.
            pub fn new_checked(buffer: T) -> $crate::wire::Result<Self> {
                let p = Self::new_unchecked(buffer);
                p.check_len()?;
                Ok(p)
            }

            pub fn into_inner(self) -> T {
                self.buffer
            }

            fn b(&self) -> &[u8] {
                self.buffer.as_ref()
            }
        }

        impl<T: AsRef<[u8]> + AsMut<[u8]>> $name<T> {
            fn bm(&mut self) -> &mut [u8] {
                self.buffer.as_mut()
            }
        }
    };
    (
        $(#[$attr:meta])*
        pub struct $name:ident;
        fixed_len = $fixed:expr;
        check_len = fixed;
    ) => {
        view! {
            $(#[$attr])*
            pub struct $name;
            fixed_len = $fixed;
        }

        impl<T: AsRef<[u8]>> $name<T> {
            /// The fixed header is inside the buffer; what follows it is reached only through
            /// clamped accessors.
            pub fn check_len(&self) -> $crate::wire::Result<()> {
                if self.b().len() < $fixed {
                    Err($crate::wire::Error::Truncated)
                } else {
                    Ok(())
                }
            }
        }
    };
}

/// ICMPv4 (RFC 792) and ICMPv6 (RFC 4443 §2.1) share the first 8 bytes: type, code, checksum, and
/// for echo the identifier and sequence number, with the message data after them. This writes the
/// view and those accessors; the calling module supplies `mod field` (`TYPE`, `CODE`, `CHECKSUM`,
/// `ECHO_IDENT`, `ECHO_SEQNO`, `DATA`), `mod msg_type` (`ECHO_REQUEST`, `ECHO_REPLY`, `is_error`)
/// and `HEADER_LEN`, and keeps what differs: the checksum (ICMPv6 covers a pseudo-header), the
/// per-type fields, and the quoted packet's IP version.
macro_rules! icmp_view {
    ($(#[$attr:meta])*) => {
        view! {
            $(#[$attr])*
            pub struct Packet;
            fixed_len = HEADER_LEN;
            check_len = fixed;
        }

        impl<T: AsRef<[u8]>> Packet<T> {
            pub fn msg_type(&self) -> u8 {
                self.b()[field::TYPE]
            }

            pub fn code(&self) -> u8 {
                self.b()[field::CODE]
            }

            pub fn checksum(&self) -> u16 {
                $crate::wire::be16(self.b(), field::CHECKSUM.start)
            }

            pub fn is_echo(&self) -> bool {
                matches!(
                    self.msg_type(),
                    msg_type::ECHO_REQUEST | msg_type::ECHO_REPLY
                )
            }

            pub fn is_error(&self) -> bool {
                msg_type::is_error(self.msg_type())
            }

            /// Echo identifier (bytes 4..6; meaningful for echo request / reply).
            pub fn echo_ident(&self) -> u16 {
                $crate::wire::be16(self.b(), field::ECHO_IDENT.start)
            }

            /// Echo sequence number (bytes 6..8; meaningful for echo request / reply).
            pub fn echo_seq_no(&self) -> u16 {
                $crate::wire::be16(self.b(), field::ECHO_SEQNO.start)
            }

            /// Everything after the 8-byte header.
            pub fn data(&self) -> &[u8] {
                let d = self.b();
                $crate::wire::clamp(d, field::DATA, d.len())
            }
        }

        impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
            pub fn set_msg_type(&mut self, t: u8) {
                self.bm()[field::TYPE] = t;
            }

            pub fn set_code(&mut self, c: u8) {
                self.bm()[field::CODE] = c;
            }

            pub fn set_checksum(&mut self, c: u16) {
                self.bm()[field::CHECKSUM].copy_from_slice(&c.to_be_bytes());
            }

            pub fn set_echo_ident(&mut self, v: u16) {
                self.bm()[field::ECHO_IDENT].copy_from_slice(&v.to_be_bytes());
            }

            pub fn set_echo_seq_no(&mut self, v: u16) {
                self.bm()[field::ECHO_SEQNO].copy_from_slice(&v.to_be_bytes());
            }

            pub fn data_mut(&mut self) -> &mut [u8] {
                let d = self.bm();
                let n = d.len();
                $crate::wire::clamp_mut(d, field::DATA, n)
            }
        }
    };
}
