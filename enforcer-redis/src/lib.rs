//! `ENFORCER.DEBIT`: `lua/debit.lua` as a native Redis command, for self-hosted Redis where a
//! module may be loaded (`redis-server --loadmodule libenforcer_redis.so`). It is called as
//! the script is, `ENFORCER.DEBIT <sha1 of debit.lua> numkeys key… arg…` for `EVALSHA <sha1>
//! numkeys key… arg…`, or with the arguments after the keys packed into one
//! (`<sha1 of debit.lua>:p`, [`args`]: what the daemon sends, cheaper for Redis), or several
//! debits in one call (`<sha1 of debit.lua>:m`: what the daemon sends for the debits waiting for
//! one pipeline, one answer each), gives the same reply and stores the same values; it refuses a
//! call naming another version of the script. The daemon sends it instead of `EVALSHA` where Redis
//! has it (`store.redis_module`, docs/configuration.md). Why: a script call costs Redis ~30 k instructions before the
//! script's first line (its keys and arguments made Lua strings) and the script ~115 k more;
//! the command does the same work in a fraction of that (docs/benchmarks.md).
//!
//! The rule is in [`debit`] (pure: values in, writes and reply out); this file is the glue:
//! the module API (resolved by name at load, as `redismodule.h`'s `RedisModule_Init` does, so
//! no C header or bindgen is needed), reading the keys, applying the writes and replicating
//! them as plain `SET`/`DEL` commands with absolute expiry (what Redis does for a script's
//! writes: a replica or the AOF never re-runs the decision with its own clock).
//!
//! Refunds, settles, grants and the rest stay Lua scripts: they are not per-request hot paths,
//! and running on the same keys atomically (module commands and scripts both run on Redis's
//! one thread) they mix safely with this command.
pub mod args;
pub mod debit;
pub mod lua;
pub mod sha1;

mod api;

use api::{Ctx, RString};
use std::ffi::{CString, c_int};
use std::sync::OnceLock;

/// The script this module implements; its SHA-1 is what callers must name.
pub const DEBIT_LUA: &str = include_str!("../../lua/debit.lua");

/// SHA-1 of [`DEBIT_LUA`], as `SCRIPT LOAD` would name it.
pub fn debit_sha() -> &'static str {
    static SHA: OnceLock<String> = OnceLock::new();
    SHA.get_or_init(|| sha1::hex(DEBIT_LUA.as_bytes()))
}

/// The command's name.
pub const COMMAND: &str = "enforcer.debit";
/// The module's name in `MODULE LIST`.
pub const MODULE: &str = "enforcer";
/// The module's version in `MODULE LIST`: the daemon refuses to use a module whose version
/// differs from the one it was built with (its reply and stored values are `debit.lua`'s of
/// the same build).
pub const VERSION: c_int = 1;

/// Redis calls this when it loads the module.
///
/// # Safety
/// Called by Redis only, with its module context.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn RedisModule_OnLoad(
    ctx: *mut Ctx,
    _argv: *mut *mut RString,
    _argc: c_int,
) -> c_int {
    // SAFETY: Redis passes its module context, whose first word is its `GetApi`.
    let Some(api) = (unsafe { api::init(ctx, MODULE, VERSION) }) else {
        return api::ERR;
    };
    let (Ok(name), Ok(flags)) = (
        CString::new(COMMAND),
        CString::new("write deny-oom getkeys-api"),
    ) else {
        return api::ERR;
    };
    // Keys are found through getkeys-api (their number is the first argument, as for
    // EVALSHA): Redis Cluster then redirects and checks slots, and ACLs check key patterns.
    // SAFETY: a valid context, NUL-terminated strings, a command function of the right type.
    unsafe { (api.create_command)(ctx, name.as_ptr(), Some(command), flags.as_ptr(), 0, 0, 0) }
}

/// `ENFORCER.DEBIT <sha1 of debit.lua> numkeys key… arg…`, `ENFORCER.DEBIT <sha1 of
/// debit.lua>:p numkeys key… packed` ([`args::pack`]), or `ENFORCER.DEBIT <sha1 of
/// debit.lua>:m numkeys key… packed` ([`args::pack_many`]).
///
/// A panic must not cross into Redis (it would abort the server, and every client with it):
/// one becomes an error reply. The rule is written not to panic; this is the second line.
unsafe extern "C" fn command(ctx: *mut Ctx, argv: *mut *mut RString, argc: c_int) -> c_int {
    // SAFETY: Redis's arguments, passed on unchanged.
    let run = std::panic::AssertUnwindSafe(|| unsafe { debit_command(ctx, argv, argc) });
    match std::panic::catch_unwind(run) {
        Ok(rc) => rc,
        Err(_) => match api::get() {
            // SAFETY: a valid context. (A panic after part of the reply was written would
            // leave it malformed; the rule runs before the reply starts.)
            Some(api) => unsafe { api.error(ctx, "ERR enforcer: internal error (a bug)") },
            None => api::ERR,
        },
    }
}

/// [`command`]'s body.
///
/// # Safety
/// Redis's command context and arguments.
unsafe fn debit_command(ctx: *mut Ctx, argv: *mut *mut RString, argc: c_int) -> c_int {
    let Some(api) = api::get() else {
        return api::ERR;
    };
    let argc = usize::try_from(argc).unwrap_or(0);
    if argc < 3 {
        // SAFETY: a valid context.
        return unsafe { (api.wrong_arity)(ctx) };
    }
    // SAFETY: Redis passes `argc` valid strings.
    let argv = unsafe { std::slice::from_raw_parts(argv, argc) };
    // SAFETY: strings of this call, alive until it returns.
    let bytes = |s: *mut RString| unsafe { api.bytes(s) };
    let nkeys = std::str::from_utf8(bytes(argv[2]))
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&n| n >= 1 && n <= argc - 3);
    // SAFETY: a valid context.
    if unsafe { (api.is_keys_position_request)(ctx) } != 0 {
        // Redis asks where the keys are (cluster redirection, ACLs): none when the count is bad
        // (the call itself is then refused).
        for pos in 3..3 + nkeys.unwrap_or(0) {
            // SAFETY: as above; `pos` is an argument index.
            unsafe { (api.key_at_pos)(ctx, pos as c_int) };
        }
        return api::OK;
    }
    let Some(nkeys) = nkeys else {
        // SAFETY: a valid context.
        return unsafe {
            api.error(
                ctx,
                "ERR enforcer: the key count must be a number from 1 to the arguments given",
            )
        };
    };
    // `<sha1>`: the script's arguments one by one; `<sha1>:p`: packed in one; `<sha1>:m`:
    // several debits (`args.rs`).
    let form = match bytes(argv[1]).strip_prefix(debit_sha().as_bytes()) {
        Some(b"") => Form::Args,
        Some(form) if form == args::PACKED.as_bytes() => Form::Packed,
        Some(form) if form == args::MANY.as_bytes() => Form::Many,
        _ => {
            let msg = format!(
                "ERR enforcer module: built from debit.lua {}, called for {} (load the module \
                 built with the daemon)",
                debit_sha(),
                String::from_utf8_lossy(bytes(argv[1])),
            );
            // SAFETY: a valid context.
            return unsafe { api.error(ctx, &msg) };
        }
    };
    let keys = &argv[3..3 + nkeys];
    let rest = &argv[3 + nkeys..];
    let one = match rest {
        [one] => Some(bytes(*one)),
        _ => None,
    };
    match form {
        // SAFETY: a valid context; the keys of this call.
        Form::Args => unsafe {
            debit_one(
                api,
                ctx,
                keys,
                &rest.iter().map(|&s| bytes(s)).collect::<Vec<_>>(),
            )
        },
        Form::Packed => match one.and_then(args::unpack) {
            // SAFETY: as above.
            Some(args) => unsafe { debit_one(api, ctx, keys, &args) },
            // SAFETY: a valid context.
            None => unsafe {
                api.error(
                    ctx,
                    "ERR enforcer: the packed form (<sha1>:p) takes one argument after the \
                     keys, <length>:<bytes> for each",
                )
            },
        },
        Form::Many => {
            // The whole call is checked before any debit runs: a malformed one writes nothing.
            let Some(debits) = one.and_then(|one| args::unpack_many(one, nkeys)) else {
                // SAFETY: a valid context.
                return unsafe {
                    api.error(
                        ctx,
                        "ERR enforcer: the form of many debits (<sha1>:m) takes one argument \
                         after the keys: each debit's key count and packed arguments, the \
                         counts adding up to the keys",
                    )
                };
            };
            // One answer per debit, in order: its reply, or its own error. Each runs as if
            // called alone, after the ones before it (a key named by two sees the first's write).
            // SAFETY: a valid context.
            unsafe { api.array(ctx, debits.len()) };
            let mut at = 0;
            for (n, args) in &debits {
                // SAFETY: a valid context; `at + n <= nkeys` (unpack_many checked the sum).
                unsafe { debit_one(api, ctx, &keys[at..at + n], args) };
                at += n;
            }
            api::OK
        }
    }
}

/// What the first argument says about the arguments after the keys.
enum Form {
    /// One by one, as `EVALSHA` takes them.
    Args,
    /// Packed into one ([`args::pack`]).
    Packed,
    /// Several debits ([`args::pack_many`]).
    Many,
}

/// One debit on `keys` with `args`: reads the keys, runs the rule, applies its writes and
/// writes one reply (the rule's, or an error when it refuses the call, which then writes
/// nothing).
///
/// # Safety
/// Redis's command context; keys of this call.
unsafe fn debit_one(api: &api::Api, ctx: *mut Ctx, keys: &[*mut RString], args: &[&[u8]]) -> c_int {
    // Read every key first (the script's one MGET), before any write; each is copied and
    // closed before the next is opened (see `Api::read`: a call may name one key twice).
    // SAFETY: a valid context and key names.
    let values: Vec<Option<Vec<u8>>> = keys.iter().map(|&k| unsafe { api.read(ctx, k) }).collect();
    let views: Vec<Option<&[u8]>> = values.iter().map(Option::as_deref).collect();
    let now = api::now();
    // A panic in the rule (a bug) is this debit's error, not the server's abort, and leaves the
    // other debits of a call of many their answers; nothing is written before the rule returns.
    let rule = std::panic::AssertUnwindSafe(|| debit::debit(keys.len(), &views, args, now));
    let effects = match std::panic::catch_unwind(rule) {
        Ok(Ok(e)) => e,
        // SAFETY: a valid context.
        Ok(Err(refusal)) => return unsafe { api.error(ctx, &format!("ERR enforcer: {refusal}")) },
        // SAFETY: a valid context.
        Err(_) => return unsafe { api.error(ctx, "ERR enforcer: internal error (a bug)") },
    };
    // A write to a key the call does not have would be a bug in the rule: checked before any
    // write, as an error (an index panic here, in a call of many, would come after the reply's
    // head and leave the reply malformed).
    if effects.writes.iter().any(|w| w.key >= keys.len()) {
        // SAFETY: a valid context.
        return unsafe { api.error(ctx, "ERR enforcer: internal error (a bug)") };
    }
    let now_ms = now.secs * 1000 + now.micros / 1000;
    for w in &effects.writes {
        // SAFETY: a valid context and key name (checked above); no other handle of the key
        // is open.
        unsafe { api.apply(ctx, keys[w.key], w, now_ms) };
    }
    // SAFETY: a valid context.
    unsafe { api.reply(ctx, &effects.reply) }
}
