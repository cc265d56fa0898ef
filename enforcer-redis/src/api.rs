//! The part of Redis's module API the command uses, resolved by name at load time exactly as
//! `redismodule.h`'s `RedisModule_Init` does (the context's first word is `RedisModule_GetApi`),
//! so that building the module needs no C header, no bindgen and no clang.
use crate::debit::{Field, Time, Write};
use std::ffi::{CString, c_char, c_int, c_long, c_longlong, c_void};
use std::sync::OnceLock;

/// `RedisModuleCtx`.
#[derive(Debug)]
pub enum Ctx {}
/// `RedisModuleString`.
#[derive(Debug)]
pub enum RString {}
/// `RedisModuleKey`.
#[derive(Debug)]
pub enum RKey {}

pub const OK: c_int = 0;
pub const ERR: c_int = 1;
const READ: c_int = 1;
const WRITE: c_int = 2;
const KEYTYPE_STRING: c_int = 1;
const NOTIFY_GENERIC: c_int = 1 << 2;
const NOTIFY_STRING: c_int = 1 << 3;
const APIVER_1: c_int = 1;

type CmdFunc = unsafe extern "C" fn(*mut Ctx, *mut *mut RString, c_int) -> c_int;

/// The API functions, typed as in `redismodule.h` (Redis 7.0).
pub struct Api {
    pub create_command: unsafe extern "C" fn(
        *mut Ctx,
        *const c_char,
        Option<CmdFunc>,
        *const c_char,
        c_int,
        c_int,
        c_int,
    ) -> c_int,
    pub wrong_arity: unsafe extern "C" fn(*mut Ctx) -> c_int,
    pub is_keys_position_request: unsafe extern "C" fn(*mut Ctx) -> c_int,
    pub key_at_pos: unsafe extern "C" fn(*mut Ctx, c_int),
    string_ptr_len: unsafe extern "C" fn(*const RString, *mut usize) -> *const c_char,
    open_key: unsafe extern "C" fn(*mut Ctx, *mut RString, c_int) -> *mut RKey,
    close_key: unsafe extern "C" fn(*mut RKey),
    key_type: unsafe extern "C" fn(*mut RKey) -> c_int,
    string_dma: unsafe extern "C" fn(*mut RKey, *mut usize, c_int) -> *mut c_char,
    string_set: unsafe extern "C" fn(*mut RKey, *mut RString) -> c_int,
    set_expire: unsafe extern "C" fn(*mut RKey, c_longlong) -> c_int,
    delete_key: unsafe extern "C" fn(*mut RKey) -> c_int,
    create_string: unsafe extern "C" fn(*mut Ctx, *const c_char, usize) -> *mut RString,
    free_string: unsafe extern "C" fn(*mut Ctx, *mut RString),
    reply_with_array: unsafe extern "C" fn(*mut Ctx, c_long) -> c_int,
    reply_with_long_long: unsafe extern "C" fn(*mut Ctx, c_longlong) -> c_int,
    reply_with_string_buffer: unsafe extern "C" fn(*mut Ctx, *const c_char, usize) -> c_int,
    reply_with_error: unsafe extern "C" fn(*mut Ctx, *const c_char) -> c_int,
    replicate: unsafe extern "C" fn(*mut Ctx, *const c_char, *const c_char, ...) -> c_int,
    notify: unsafe extern "C" fn(*mut Ctx, c_int, *const c_char, *mut RString) -> c_int,
}

static API: OnceLock<Api> = OnceLock::new();

/// `PXAT`, made once for every replicated `SET … PXAT`: given as a C string, it would be a new
/// string object, allocated and freed, at every write (Redis counts references, so one
/// object serves them all).
static PXAT: OnceLock<Shared> = OnceLock::new();

/// A Redis string made without a context (so never freed by one), shared by the commands.
struct Shared(*mut RString);
// SAFETY: Redis runs module commands, and so every use of it, on its main thread only.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

/// The API, once [`init`] resolved it.
pub fn get() -> Option<&'static Api> {
    API.get()
}

/// `RedisModule_Init`: resolves every function and names the module.
///
/// # Safety
/// `ctx` is the context Redis passed to `RedisModule_OnLoad`.
#[expect(
    clippy::missing_transmute_annotations,
    reason = "each function's type is its field's in `Api`, written there once"
)]
pub unsafe fn init(ctx: *mut Ctx, name: &str, version: c_int) -> Option<&'static Api> {
    type GetApi = unsafe extern "C" fn(*const c_char, *mut c_void) -> c_int;
    // SAFETY: the first word of a module context is the address of `RedisModule_GetApi`.
    let get_api: GetApi = unsafe { std::mem::transmute(*ctx.cast::<*mut c_void>()) };
    let resolve = |f: &str| -> Option<*mut c_void> {
        let name = CString::new(format!("RedisModule_{f}")).ok()?;
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: a NUL-terminated name and a place for one pointer.
        let rc = unsafe { get_api(name.as_ptr(), (&raw mut ptr).cast()) };
        (rc == OK && !ptr.is_null()).then_some(ptr)
    };
    macro_rules! f {
        ($name:literal) => {
            // SAFETY: Redis resolved the function of this name; its type is the header's.
            unsafe { std::mem::transmute::<*mut c_void, _>(resolve($name)?) }
        };
    }
    let set_attribs: unsafe extern "C" fn(*mut Ctx, *const c_char, c_int, c_int) =
        f!("SetModuleAttribs");
    let api = Api {
        create_command: f!("CreateCommand"),
        wrong_arity: f!("WrongArity"),
        is_keys_position_request: f!("IsKeysPositionRequest"),
        key_at_pos: f!("KeyAtPos"),
        string_ptr_len: f!("StringPtrLen"),
        open_key: f!("OpenKey"),
        close_key: f!("CloseKey"),
        key_type: f!("KeyType"),
        string_dma: f!("StringDMA"),
        string_set: f!("StringSet"),
        set_expire: f!("SetExpire"),
        delete_key: f!("DeleteKey"),
        create_string: f!("CreateString"),
        free_string: f!("FreeString"),
        reply_with_array: f!("ReplyWithArray"),
        reply_with_long_long: f!("ReplyWithLongLong"),
        reply_with_string_buffer: f!("ReplyWithStringBuffer"),
        reply_with_error: f!("ReplyWithError"),
        replicate: f!("Replicate"),
        notify: f!("NotifyKeyspaceEvent"),
    };
    if let Some(busy) = resolve("IsModuleNameBusy") {
        // SAFETY: as in `f!`.
        let busy: unsafe extern "C" fn(*const c_char) -> c_int =
            unsafe { std::mem::transmute(busy) };
        let name = CString::new(name).ok()?;
        // SAFETY: a NUL-terminated name.
        if unsafe { busy(name.as_ptr()) } != 0 {
            return None;
        }
    }
    let cname = CString::new(name).ok()?;
    // SAFETY: a valid context and name.
    unsafe { set_attribs(ctx, cname.as_ptr(), version, APIVER_1) };
    let _ = API.set(api);
    API.get()
}

/// Server time (the clock Redis `TIME` reads).
pub fn now() -> Time {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    Time {
        secs: ts.tv_sec,
        micros: ts.tv_nsec / 1000,
    }
}

/// An open key, closed when dropped.
struct Key<'a> {
    api: &'a Api,
    key: *mut RKey,
}

impl Drop for Key<'_> {
    fn drop(&mut self) {
        if !self.key.is_null() {
            // SAFETY: a key this handle opened.
            unsafe { (self.api.close_key)(self.key) };
        }
    }
}

impl Api {
    /// The bytes of a Redis string.
    ///
    /// # Safety
    /// `s` is a live Redis string; the slice lives as long as it does.
    pub unsafe fn bytes<'a>(&self, s: *mut RString) -> &'a [u8] {
        let mut len = 0usize;
        // SAFETY: a live string.
        let ptr = unsafe { (self.string_ptr_len)(s, &mut len) };
        if ptr.is_null() {
            return &[];
        }
        // SAFETY: Redis's buffer of `len` bytes.
        unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) }
    }

    /// The value of `name` when it holds a string (`MGET`'s view: `None` for a missing key or
    /// another type), copied, the key closed again.
    ///
    /// Copied, not borrowed: `StringDMA` replaces a short (embedded) string with a copy of its
    /// own, freeing the old one, so a second handle of the same key opened before that (a call
    /// naming one key twice) would read freed memory. Opening, reading and closing one key at a
    /// time, each lookup sees the value as it is now.
    ///
    /// # Safety
    /// A valid context and key name.
    pub unsafe fn read(&self, ctx: *mut Ctx, name: *mut RString) -> Option<Vec<u8>> {
        // SAFETY: as documented.
        let key = unsafe { self.open(ctx, name, READ) };
        // SAFETY: an open key (or none: a missing key opened for reading).
        if key.key.is_null() || unsafe { (self.key_type)(key.key) } != KEYTYPE_STRING {
            return None;
        }
        let mut len = 0usize;
        // SAFETY: an open string key.
        let ptr = unsafe { (self.string_dma)(key.key, &mut len, READ) };
        if ptr.is_null() {
            return None;
        }
        // SAFETY: Redis's buffer of `len` bytes, alive while the key is open (until `key`
        // drops, after the copy).
        Some(unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) }.to_vec())
    }

    /// Opens `name` with `mode`.
    ///
    /// # Safety
    /// A valid context and key name.
    unsafe fn open(&self, ctx: *mut Ctx, name: *mut RString, mode: c_int) -> Key<'_> {
        Key {
            api: self,
            // SAFETY: as documented.
            key: unsafe { (self.open_key)(ctx, name, mode) },
        }
    }

    /// Applies one write and replicates it as the command a script's write would be
    /// (`SET k v [PXAT t]` or `DEL k`), with the expiry absolute from `now_ms`; keyspace
    /// events as those commands fire them (`set`, then `expire`; `del`), for whoever listens.
    ///
    /// # Safety
    /// A valid context and key name, no other handle of the key open.
    pub unsafe fn apply(&self, ctx: *mut Ctx, name: *mut RString, w: &Write, now_ms: i64) {
        // SAFETY: as documented.
        let key = unsafe { self.open(ctx, name, READ | WRITE) };
        if key.key.is_null() {
            return;
        }
        match &w.value {
            Some(v) => {
                // One string for the key's value and the replicated command (Redis counts
                // references; `SET` itself shares its argument with the keyspace alike).
                // SAFETY: a valid context; Redis copies the buffer.
                let s = unsafe { (self.create_string)(ctx, v.as_ptr().cast(), v.len()) };
                // SAFETY: a key open for writing, a string of this context.
                unsafe {
                    (self.string_set)(key.key, s);
                    (self.notify)(ctx, NOTIFY_STRING, c"set".as_ptr(), name);
                }
                match w.px {
                    Some(px) => {
                        let pxat = PXAT.get_or_init(|| {
                            // SAFETY: no context (the string outlives every command); Redis
                            // copies the buffer.
                            Shared(unsafe {
                                (self.create_string)(
                                    std::ptr::null_mut(),
                                    b"PXAT".as_ptr().cast(),
                                    4,
                                )
                            })
                        });
                        // SAFETY: as above; literals are NUL-terminated; the format's
                        // arguments are three Redis strings and a long long.
                        unsafe {
                            (self.set_expire)(key.key, px);
                            (self.notify)(ctx, NOTIFY_GENERIC, c"expire".as_ptr(), name);
                            (self.replicate)(
                                ctx,
                                c"SET".as_ptr(),
                                c"sssl".as_ptr(),
                                name,
                                s,
                                pxat.0,
                                c_longlong::from(now_ms + px),
                            );
                        }
                    }
                    // SAFETY: as above.
                    None => unsafe {
                        (self.replicate)(ctx, c"SET".as_ptr(), c"ss".as_ptr(), name, s);
                    },
                }
                // SAFETY: this call's reference; the keyspace and the replication stream hold
                // their own.
                unsafe { (self.free_string)(ctx, s) };
            }
            // SAFETY: as above.
            None => unsafe {
                (self.delete_key)(key.key);
                (self.notify)(ctx, NOTIFY_GENERIC, c"del".as_ptr(), name);
                (self.replicate)(ctx, c"DEL".as_ptr(), c"s".as_ptr(), name);
            },
        }
    }

    /// The reply: an array of bulk strings and integers, as Redis makes of the script's table.
    ///
    /// # Safety
    /// A valid context.
    pub unsafe fn reply(&self, ctx: *mut Ctx, fields: &[Field]) -> c_int {
        // SAFETY: as documented.
        unsafe { (self.reply_with_array)(ctx, fields.len() as c_long) };
        for f in fields {
            match f {
                // SAFETY: as documented.
                Field::Int(i) => unsafe { (self.reply_with_long_long)(ctx, *i) },
                // SAFETY: as documented; Redis copies the buffer.
                Field::Bulk(b) => unsafe {
                    (self.reply_with_string_buffer)(ctx, b.as_ptr().cast(), b.len())
                },
            };
        }
        OK
    }

    /// The head of an array reply of `len` elements (the replies that follow are its elements).
    ///
    /// # Safety
    /// A valid context.
    pub unsafe fn array(&self, ctx: *mut Ctx, len: usize) -> c_int {
        // SAFETY: as documented.
        unsafe { (self.reply_with_array)(ctx, len as c_long) }
    }

    /// An error reply (`msg` without its leading `-`).
    ///
    /// # Safety
    /// A valid context.
    pub unsafe fn error(&self, ctx: *mut Ctx, msg: &str) -> c_int {
        let msg = CString::new(msg.replace('\0', " ")).unwrap_or_default();
        // SAFETY: as documented; Redis copies the text.
        unsafe { (self.reply_with_error)(ctx, msg.as_ptr()) }
    }
}
