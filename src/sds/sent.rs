//! The version last sent of each resource a stream serves. A stream serves
//! a handful of names (at most `SDS_MAX_RESOURCE_NAMES`), so they are kept
//! in a vector sorted by name: a hash map would hold room for several
//! entries and its hasher's state in every open stream.

use std::borrow::Borrow;

/// Versions by resource name, sorted by name (so two are equal whatever
/// order their names came in).
#[derive(Debug, PartialEq, Eq)]
pub struct Sent<K>(Vec<(K, String)>);

impl<K> Default for Sent<K> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<K: Ord> Sent<K> {
    /// The versions of `pairs`; of a name given twice, the last.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (K, String)>) -> Self {
        let mut v: Vec<(K, String)> = pairs.into_iter().collect();
        // Stable, so that of equal names the last comes last.
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.reverse();
        v.dedup_by(|later, earlier| later.0 == earlier.0);
        v.reverse();
        Self(v)
    }

    fn find<Q: Ord + ?Sized>(&self, name: &Q) -> Result<usize, usize>
    where
        K: Borrow<Q>,
    {
        self.0.binary_search_by(|(k, _)| k.borrow().cmp(name))
    }

    /// The version last sent of `name`.
    pub fn get<Q: Ord + ?Sized>(&self, name: &Q) -> Option<&String>
    where
        K: Borrow<Q>,
    {
        self.find(name).ok().map(|i| &self.0[i].1)
    }

    /// `name` was sent at `version`.
    pub fn insert(&mut self, name: K, version: String) {
        match self.find(&name) {
            Ok(i) => self.0[i].1 = version,
            Err(i) => self.0.insert(i, (name, version)),
        }
    }

    /// `name` is sent again with the next response.
    pub fn remove<Q: Ord + ?Sized>(&mut self, name: &Q)
    where
        K: Borrow<Q>,
    {
        if let Ok(i) = self.find(name) {
            self.0.remove(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_by_name_in_any_order() {
        let s = |pairs: &[(&'static str, &str)]| {
            Sent::from_pairs(pairs.iter().map(|(k, v)| (*k, v.to_string())))
        };
        assert_eq!(s(&[("a", "1"), ("b", "2")]), s(&[("b", "2"), ("a", "1")]));
        assert_ne!(s(&[("a", "1"), ("b", "2")]), s(&[("a", "1"), ("b", "3")]));
        assert_ne!(s(&[("a", "1")]), s(&[("a", "1"), ("b", "2")]));
        assert_eq!(s(&[("a", "1"), ("a", "2")]), s(&[("a", "2")]), "the last");

        let mut sent = s(&[("b", "2")]);
        assert_eq!(sent.get("b").map(String::as_str), Some("2"));
        assert_eq!(sent.get("a"), None);
        sent.insert("a", "1".into());
        sent.insert("c", "3".into());
        sent.insert("b", "4".into());
        assert_eq!(sent, s(&[("c", "3"), ("a", "1"), ("b", "4")]));
        sent.remove("a");
        sent.remove("x");
        assert_eq!(sent, s(&[("b", "4"), ("c", "3")]));
        assert_eq!(sent.get("a"), None);
    }
}
