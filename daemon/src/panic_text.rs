//! The message of a caught panic, for logs and recorded reasons (the decoders, the tag reader
//! and the fuzz entries catch panics of their dependencies).

/// The text of a caught panic's payload (`panic!` with a literal or a formatted message).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> Option<String> {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_payloads_of_both_kinds_are_read() {
        let literal = std::panic::catch_unwind(|| panic!("boom")).unwrap_err();
        assert_eq!(panic_message(literal.as_ref()).as_deref(), Some("boom"));
        let n = 3;
        let formatted = std::panic::catch_unwind(|| panic!("boom {n}")).unwrap_err();
        assert_eq!(panic_message(formatted.as_ref()).as_deref(), Some("boom 3"));
        let other = std::panic::catch_unwind(|| std::panic::panic_any(7u8)).unwrap_err();
        assert_eq!(panic_message(other.as_ref()), None);
    }
}
