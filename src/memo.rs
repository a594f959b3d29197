//! [`Memo`]: a value computed once from the immutable value that holds it,
//! and shared by every reader of that value.
//!
//! A certificate and a trust bundle are never changed once made (a renewal
//! or a change of roots makes a new one), yet every stream and request that
//! serves them encoded them, and hashed the bundle for its version, again.
//! A memo keeps what is derived from them beside them.

use std::sync::OnceLock;

/// A value derived from the value holding it, computed at its first use.
///
/// It takes no part in what the holder is: a copy of the holder starts
/// without it (the copy may then be changed, which the memo would not
/// follow), and two holders compare equal or not whatever their memos.
pub struct Memo<T>(OnceLock<T>);

impl<T> Memo<T> {
    /// The value, computed by `f` if this is its first use.
    pub fn get_or_init(&self, f: impl FnOnce() -> T) -> &T {
        self.0.get_or_init(f)
    }
}

impl<T> Default for Memo<T> {
    fn default() -> Self {
        Self(OnceLock::new())
    }
}

impl<T> Clone for Memo<T> {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl<T> PartialEq for Memo<T> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl<T> Eq for Memo<T> {}

impl<T> std::fmt::Debug for Memo<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "Memo(set)"
        } else {
            "Memo(unset)"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn computed_once_and_not_copied() {
        let m = Memo::default();
        assert_eq!(*m.get_or_init(|| 1), 1);
        assert_eq!(*m.get_or_init(|| 2), 1);
        let copy = m.clone();
        assert_eq!(*copy.get_or_init(|| 3), 3);
        assert_eq!(m, copy);
    }
}
