//! Backend parameters: a string map checked against each plugin's table of
//! [`ParamSpec`]s, which is the single source of names, defaults and docs.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::error::{Error, Result};

/// One parameter a backend accepts, with its default and what it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    /// Lower-case name, as passed to `create_backend`.
    pub name: &'static str,
    /// The default, as a string.
    pub default: &'static str,
    /// What it does and why the default is what it is.
    pub doc: &'static str,
}

/// Parameters for one backend: names to string values, NIXL's `nixl_b_params_t`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Params {
    map: BTreeMap<String, String>,
}

impl Params {
    /// No parameters: every default applies.
    pub fn new() -> Self {
        Params::default()
    }

    /// The defaults of a parameter table.
    pub fn defaults(specs: &[ParamSpec]) -> Self {
        Params { map: specs.iter().map(|s| (s.name.to_string(), s.default.to_string())).collect() }
    }

    /// Sets `name` (lower-cased) to `value`, builder style.
    pub fn with(mut self, name: &str, value: impl fmt::Display) -> Self {
        self.set(name, value);
        self
    }

    /// Sets `name` (lower-cased) to `value`.
    pub fn set(&mut self, name: &str, value: impl fmt::Display) {
        self.map.insert(name.to_ascii_lowercase(), value.to_string());
    }

    /// The raw value of `name`, if set.
    pub fn raw(&self, name: &str) -> Option<&str> {
        self.map.get(name).map(String::as_str)
    }

    /// Iterates over `(name, value)` pairs in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.map.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Whether no parameter is set.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Fails if a name is not in `specs`, listing the valid ones.
    pub fn check_names(&self, backend: &str, specs: &[ParamSpec]) -> Result<()> {
        for k in self.map.keys() {
            if !specs.iter().any(|s| s.name == k) {
                let valid: Vec<&str> = specs.iter().map(|s| s.name).collect();
                return Err(Error::invalid(format!(
                    "backend {backend} has no parameter '{k}'; valid parameters: {}",
                    if valid.is_empty() { "(none)".to_string() } else { valid.join(", ") }
                )));
            }
        }
        Ok(())
    }

    /// Overlays `self` on the defaults of `specs`: the full effective set.
    pub fn resolved(&self, specs: &[ParamSpec]) -> Params {
        let mut p = Params::defaults(specs);
        for (k, v) in &self.map {
            p.map.insert(k.clone(), v.clone());
        }
        p
    }

    /// Parses `name` as `T`, with an error that names the parameter and the bad value.
    pub fn parse<T: FromStr>(&self, backend: &str, name: &str) -> Result<T> {
        let raw = self.raw(name).ok_or_else(|| {
            Error::internal(format!("backend {backend}: parameter '{name}' has no value and no default"))
        })?;
        raw.trim().parse().map_err(|_| {
            Error::invalid(format!(
                "backend {backend}: parameter '{name}' = '{raw}' is not a valid {}",
                std::any::type_name::<T>().rsplit("::").next().unwrap_or("value")
            ))
        })
    }

    /// Parses a boolean (`1/0`, `true/false`, `yes/no`, `on/off`).
    pub fn parse_bool(&self, backend: &str, name: &str) -> Result<bool> {
        match self.raw(name).map(|s| s.trim().to_ascii_lowercase()) {
            Some(s) if matches!(s.as_str(), "1" | "true" | "yes" | "on") => Ok(true),
            Some(s) if matches!(s.as_str(), "0" | "false" | "no" | "off") => Ok(false),
            other => Err(Error::invalid(format!(
                "backend {backend}: parameter '{name}' = '{}' is not a boolean (use true or false)",
                other.unwrap_or_default()
            ))),
        }
    }

    /// Parses a duration in milliseconds.
    pub fn parse_ms(&self, backend: &str, name: &str) -> Result<Duration> {
        Ok(Duration::from_millis(self.parse::<u64>(backend, name)?))
    }

    /// Parses a byte size with an optional `K`, `M` or `G` suffix (powers of 1024).
    pub fn parse_size(&self, backend: &str, name: &str) -> Result<u64> {
        let raw = self.raw(name).unwrap_or_default();
        parse_size(raw).ok_or_else(|| {
            Error::invalid(format!(
                "backend {backend}: parameter '{name}' = '{raw}' is not a size like 4096, 64K or 1M"
            ))
        })
    }
}

impl<K: AsRef<str>, V: fmt::Display> FromIterator<(K, V)> for Params {
    fn from_iter<T: IntoIterator<Item = (K, V)>>(iter: T) -> Self {
        let mut p = Params::new();
        for (k, v) in iter {
            p.set(k.as_ref(), v);
        }
        p
    }
}

/// Parses `4096`, `64K`, `1M`, `2G` (case-insensitive, optional `iB`/`B`).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let up = s.to_ascii_uppercase();
    let t = up.trim_end_matches("IB").trim_end_matches('B');
    let (num, mul) = match t.chars().last()? {
        'K' => (&t[..t.len() - 1], 1u64 << 10),
        'M' => (&t[..t.len() - 1], 1 << 20),
        'G' => (&t[..t.len() - 1], 1 << 30),
        'T' => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mul)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPECS: &[ParamSpec] =
        &[ParamSpec { name: "lanes", default: "4", doc: "" }, ParamSpec { name: "nodelay", default: "true", doc: "" }];

    #[test]
    fn unknown_names_list_valid_ones() {
        let p = Params::new().with("LANES", 2).with("bogus", 1);
        let e = p.check_names("TCP", SPECS).unwrap_err();
        assert!(e.message().contains("'bogus'") && e.message().contains("lanes, nodelay"), "{e}");
    }

    #[test]
    fn typed_parsing() {
        let p = Params::new().with("lanes", "x").resolved(SPECS);
        assert!(p.parse::<u32>("TCP", "lanes").unwrap_err().message().contains("'x'"));
        assert!(p.parse_bool("TCP", "nodelay").unwrap());
        assert_eq!(parse_size("64K"), Some(65536));
        assert_eq!(parse_size("1MiB"), Some(1 << 20));
        assert_eq!(parse_size("x"), None);
    }
}
