//! The five capability sets of process.capabilities (caps crate).

use caps::{CapSet, Capability, CapsHashSet};
use oci_spec::runtime::{Capabilities, LinuxCapabilities};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CapabilityError {
    #[error("unknown capability {0}")]
    Unknown(String),
    #[error("setting the {set} capability set: {msg}")]
    Set { set: &'static str, msg: String },
}

fn convert(set: &Capabilities) -> Result<CapsHashSet, CapabilityError> {
    let known = caps::all();
    let mut out = CapsHashSet::new();
    for c in set {
        let name = serde_json::to_value(c)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        let name = if name.starts_with("CAP_") {
            name
        } else {
            format!("CAP_{name}")
        };
        let cap: Capability = name
            .parse()
            .map_err(|_| CapabilityError::Unknown(name.clone()))?;
        // Capabilities newer than this kernel knows are dropped rather than failing the container.
        if known.contains(&cap) {
            out.insert(cap);
        }
    }
    Ok(out)
}

/// The converted sets, checked at create time.
#[derive(Debug, Clone, Default)]
pub struct Sets {
    pub bounding: CapsHashSet,
    pub effective: CapsHashSet,
    pub permitted: CapsHashSet,
    pub inheritable: CapsHashSet,
    pub ambient: CapsHashSet,
}

impl Sets {
    pub fn from_spec(c: &LinuxCapabilities) -> Result<Self, CapabilityError> {
        let g = |s: &Option<Capabilities>| {
            s.as_ref()
                .map(convert)
                .transpose()
                .map(Option::unwrap_or_default)
        };
        Ok(Sets {
            bounding: g(c.bounding())?,
            effective: g(c.effective())?,
            permitted: g(c.permitted())?,
            inheritable: g(c.inheritable())?,
            ambient: g(c.ambient())?,
        })
    }
}

/// Drops from the bounding set everything not listed (needs CAP_SETPCAP, so before the rest).
pub fn drop_bounding(s: &Sets) -> Result<(), CapabilityError> {
    for cap in caps::all() {
        if !s.bounding.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap).map_err(|e| CapabilityError::Set {
                set: "bounding",
                msg: e.to_string(),
            })?;
        }
    }
    Ok(())
}

/// Sets permitted, inheritable, effective, then raises ambient (after the user switch).
pub fn apply(s: &Sets) -> Result<(), CapabilityError> {
    let set = |cs: CapSet, v: &CapsHashSet, name: &'static str| {
        caps::set(None, cs, v).map_err(|e| CapabilityError::Set {
            set: name,
            msg: e.to_string(),
        })
    };
    // Effective must stay a subset of permitted at every step.
    set(
        CapSet::Effective,
        &s.effective.intersection(&s.permitted).copied().collect(),
        "effective",
    )?;
    set(CapSet::Permitted, &s.permitted, "permitted")?;
    set(CapSet::Inheritable, &s.inheritable, "inheritable")?;
    set(CapSet::Effective, &s.effective, "effective")?;
    for cap in &s.ambient {
        caps::raise(None, CapSet::Ambient, *cap).map_err(|e| CapabilityError::Set {
            set: "ambient",
            msg: e.to_string(),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_names() {
        let c: LinuxCapabilities = serde_json::from_str(
            r#"{"bounding":["CAP_CHOWN","CAP_NET_RAW"],"effective":["CAP_CHOWN"]}"#,
        )
        .unwrap();
        let s = Sets::from_spec(&c).unwrap();
        assert!(s.bounding.contains(&Capability::CAP_NET_RAW));
        assert_eq!(s.effective.len(), 1);
        assert!(s.ambient.is_empty());
        assert!(serde_json::from_str::<LinuxCapabilities>(r#"{"bounding":["CAP_NOPE"]}"#).is_err());
    }
}
