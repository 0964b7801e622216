//! This machine as the records name it: its host name, its stable identity (from
//! `/etc/machine-id` or `--host-id`), and the clock that dates each record.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::layout::HostIdentity;

/// The application ID this tool derives host identities with, as systemd's
/// `sd_id128_get_machine_app_specific()` does: `systemd-id128 machine-id
/// --app-specific=e0f2b78fa1844779b985ac9ef7ff161a` prints the same identity.
pub const APP_ID: [u8; 16] = [
    0xe0, 0xf2, 0xb7, 0x8f, 0xa1, 0x84, 0x47, 0x79, 0xb9, 0x85, 0xac, 0x9e, 0xf7, 0xff, 0x16, 0x1a,
];

/// Where the machine ID is read from.
pub const MACHINE_ID: &str = "/etc/machine-id";

/// This machine: its host name, and `given` (`--host-id`) or else an identity derived from
/// `/etc/machine-id` (never the machine ID itself, which systemd asks to keep private).
pub fn identity(given: Option<&str>) -> HostIdentity {
    let id = match given {
        Some(id) => id.to_string(),
        None => std::fs::read_to_string(MACHINE_ID)
            .ok()
            .and_then(|text| app_specific_id(&text))
            .unwrap_or_else(|| {
                log::debug!("no usable {MACHINE_ID}: this host is identified by its name alone");
                String::new()
            }),
    };
    HostIdentity::new(&host_name(), &id)
}

/// The app-specific ID of a machine ID (32 hex digits), as `sd_id128_get_machine_app_specific`
/// computes it: HMAC-SHA256 keyed with the machine ID over `APP_ID`, its first 16 bytes made a
/// version 4 UUID, in 32 lowercase hex digits.
pub fn app_specific_id(machine_id: &str) -> Option<String> {
    let text = machine_id.trim();
    if text.len() != 32 || !text.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let key: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16))
        .collect::<Result<_, _>>()
        .ok()?;
    if key.iter().all(|b| *b == 0) {
        return None;
    }
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
        &APP_ID,
    );
    let mut id = [0u8; 16];
    id.copy_from_slice(&tag.as_ref()[..16]);
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    Some(id.iter().map(|b| format!("{b:02x}")).collect())
}

/// This machine's host name (of its UTS namespace), as owners record it.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`.
pub fn now() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(now.as_secs(), now.subsec_nanos())
}

fn rfc3339(secs: u64, nanos: u32) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_times() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339(1_795_305_600, 5), "2026-11-22T00:00:00.000000005Z");
        assert_eq!(rfc3339(951_825_599, 0), "2000-02-29T11:59:59.000000000Z");
    }

    #[test]
    fn host_ids_are_systemds_app_specific_ids() {
        // systemd-id128 machine-id --app-specific=e0f2b78fa1844779b985ac9ef7ff161a on a
        // machine whose /etc/machine-id is 0123456789abcdef0123456789abcdef.
        let id = app_specific_id("0123456789abcdef0123456789abcdef\n").unwrap();
        assert_eq!(id, "0ace8ff641684e1b81cbedcfedebc9c9");
        assert_eq!(
            app_specific_id("0123456789abcdef0123456789abcdef"),
            Some(id)
        );
        assert_eq!(app_specific_id("uninitialized"), None);
        assert_eq!(app_specific_id(&"0".repeat(32)), None);
        assert_eq!(app_specific_id(""), None);
    }
}
