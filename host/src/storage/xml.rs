//! libvirt storage pool and volume XML: built from validated requests with the escaping
//! writer, and read back into [`PoolFacts`] / [`VolumeFacts`].

use super::StorageError;
use crate::hypervisor::domain::valid_name;
use crate::hypervisor::xml::Element;
use crate::pb;
use crate::storage::policy::MAX_PATH_BYTES;

fn invalid(m: impl Into<String>) -> StorageError {
    StorageError::Invalid(m.into())
}

/// A pool or volume name: 1-64 characters of `[A-Za-z0-9._-]`, not starting with `-` or `.`.
pub fn check_name(what: &str, name: &str) -> Result<(), StorageError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what} {name:?} must be 1-64 characters of [A-Za-z0-9._-], not starting with '-' or '.'"
        )))
    }
}

fn absolute(what: &str, path: &str) -> Result<String, StorageError> {
    if path.is_empty() {
        return Err(invalid(format!("{what} is required for this pool type")));
    }
    if path.len() > MAX_PATH_BYTES || !path.starts_with('/') || path.contains('\0') {
        return Err(invalid(format!(
            "{what} {path:?} must be an absolute path of at most {MAX_PATH_BYTES} bytes"
        )));
    }
    Ok(path.to_string())
}

fn required<'a>(what: &str, v: &'a str) -> Result<&'a str, StorageError> {
    if v.is_empty() {
        return Err(invalid(format!("{what} is required for this pool type")));
    }
    if v.len() > 255 || v.contains(['\0', '\n']) {
        return Err(invalid(format!(
            "{what} must be at most 255 bytes on one line"
        )));
    }
    Ok(v)
}

/// `host` or `host:port` (an IPv6 address in brackets: `[::1]:6789`).
fn host_element(v: &str) -> Result<Element, StorageError> {
    let v = required("source_host", v)?;
    let (name, port) = match v.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() && (!h.contains(':') || h.starts_with('[')) => {
            (h.trim_start_matches('[').trim_end_matches(']'), Some(p))
        }
        _ => (v, None),
    };
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'))
    {
        return Err(invalid(format!(
            "source_host {v:?} is not a host name or address"
        )));
    }
    let mut el = Element::new("host").attr("name", name);
    if let Some(p) = port {
        el = el.attr("port", p);
    }
    Ok(el)
}

pub fn type_name(t: pb::StoragePoolType) -> Option<&'static str> {
    Some(match t {
        pb::StoragePoolType::Dir => "dir",
        pb::StoragePoolType::Fs => "fs",
        pb::StoragePoolType::Netfs => "netfs",
        pb::StoragePoolType::Logical => "logical",
        pb::StoragePoolType::Rbd => "rbd",
        pb::StoragePoolType::Iscsi => "iscsi",
        pb::StoragePoolType::Unspecified => return None,
    })
}

pub fn type_of(name: &str) -> pb::StoragePoolType {
    match name {
        "dir" => pb::StoragePoolType::Dir,
        "fs" => pb::StoragePoolType::Fs,
        "netfs" => pb::StoragePoolType::Netfs,
        "logical" => pb::StoragePoolType::Logical,
        "rbd" => pb::StoragePoolType::Rbd,
        "iscsi" => pb::StoragePoolType::Iscsi,
        _ => pb::StoragePoolType::Unspecified,
    }
}

/// The `<pool>` XML of an InitStoragePool request.
pub fn pool_xml(req: &pb::InitStoragePoolRequest) -> Result<String, StorageError> {
    check_name("pool_id", &req.pool_id)?;
    let kind = pb::StoragePoolType::try_from(req.r#type)
        .ok()
        .and_then(type_name)
        .ok_or_else(|| {
            invalid("type must be one of dir, fs, netfs, logical, rbd, iscsi".to_string())
        })?;
    let mut source = Element::new("source");
    let mut target = None;
    match kind {
        "dir" => target = Some(absolute("target_path", &req.target_path)?),
        "fs" => {
            source = source
                .child(
                    Element::new("device")
                        .attr("path", absolute("source_device", &req.source_device)?),
                )
                .child(Element::new("format").attr("type", "auto"));
            target = Some(absolute("target_path", &req.target_path)?);
        }
        "netfs" => {
            source = source
                .child(host_element(&req.source_host)?)
                .child(Element::new("dir").attr("path", absolute("source_path", &req.source_path)?))
                .child(Element::new("format").attr("type", "nfs"));
            target = Some(absolute("target_path", &req.target_path)?);
        }
        "logical" => {
            let vg = required("source_name", &req.source_name)?;
            check_name("source_name", vg)?;
            source = source.child(Element::new("name").text(vg));
            if !req.source_device.is_empty() {
                source = source.child(
                    Element::new("device")
                        .attr("path", absolute("source_device", &req.source_device)?),
                );
            }
            source = source.child(Element::new("format").attr("type", "lvm2"));
            target = Some(format!("/dev/{vg}"));
        }
        "rbd" => {
            let pool = required("source_name", &req.source_name)?;
            check_name("source_name", pool)?;
            source = source
                .child(Element::new("name").text(pool))
                .child(host_element(&req.source_host)?);
            if !req.auth_username.is_empty() {
                let user = required("auth_username", &req.auth_username)?;
                let secret = required("auth_secret_uuid", &req.auth_secret_uuid)?;
                if uuid::Uuid::parse_str(secret).is_err() {
                    return Err(invalid(format!(
                        "auth_secret_uuid {secret:?} is not a UUID"
                    )));
                }
                source = source.child(
                    Element::new("auth")
                        .attr("type", "ceph")
                        .attr("username", user)
                        .child(Element::new("secret").attr("uuid", secret)),
                );
            }
        }
        "iscsi" => {
            let iqn = required("source_device", &req.source_device)?;
            if !iqn.starts_with("iqn.") {
                return Err(invalid(format!(
                    "source_device {iqn:?} must be the target's IQN (iqn.YYYY-MM.domain:name)"
                )));
            }
            source = source
                .child(host_element(&req.source_host)?)
                .child(Element::new("device").attr("path", iqn));
            target = Some("/dev/disk/by-path".to_string());
        }
        _ => unreachable!("type_name covers every kind"),
    }
    let mut pool = Element::new("pool")
        .attr("type", kind)
        .child(Element::new("name").text(req.pool_id.as_str()))
        .child(source);
    if let Some(t) = target {
        pool = pool.child(Element::new("target").child(Element::new("path").text(t)));
    }
    pool.to_xml()
        .map_err(|e| StorageError::Failed(e.to_string()))
}

/// What the daemon reads back from a pool's XML.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolFacts {
    pub kind: String,
    pub target_path: String,
}

impl PoolFacts {
    pub fn parse(xml: &str) -> Result<PoolFacts, StorageError> {
        let root =
            Element::parse(xml).map_err(|e| StorageError::Failed(format!("pool XML: {e}")))?;
        Ok(PoolFacts {
            kind: root.get_attr("type").unwrap_or_default().to_string(),
            target_path: root
                .path_text("target/path")
                .unwrap_or_default()
                .to_string(),
        })
    }
}

/// A volume's format: `qcow2` (default) or `raw`.
pub fn volume_format(f: &str) -> Result<&'static str, StorageError> {
    match f {
        "" | "qcow2" => Ok("qcow2"),
        "raw" => Ok("raw"),
        _ => Err(invalid(format!("format {f:?} must be qcow2 or raw"))),
    }
}

/// `<volume>` XML: `capacity` bytes of `format`, optionally a qcow2 overlay on `backing`
/// (path and format).
pub fn volume_xml(
    name: &str,
    capacity: u64,
    format: &str,
    backing: Option<(&str, &str)>,
) -> Result<String, StorageError> {
    let mut vol = Element::new("volume")
        .child(Element::new("name").text(name))
        .child(
            Element::new("capacity")
                .attr("unit", "bytes")
                .text(capacity.to_string()),
        )
        .child(Element::new("allocation").attr("unit", "bytes").text("0"))
        .child(Element::new("target").child(Element::new("format").attr("type", format)));
    if let Some((path, fmt)) = backing {
        vol = vol.child(
            Element::new("backingStore")
                .child(Element::new("path").text(path))
                .child(Element::new("format").attr("type", fmt)),
        );
    }
    vol.to_xml()
        .map_err(|e| StorageError::Failed(e.to_string()))
}

/// What the daemon reads back from a volume's XML.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeFacts {
    pub format: String,
    pub backing_path: String,
}

impl VolumeFacts {
    pub fn parse(xml: &str) -> Result<VolumeFacts, StorageError> {
        let root =
            Element::parse(xml).map_err(|e| StorageError::Failed(format!("volume XML: {e}")))?;
        Ok(VolumeFacts {
            format: root
                .path("target/format")
                .and_then(|f| f.get_attr("type"))
                .unwrap_or("raw")
                .to_string(),
            backing_path: root
                .path_text("backingStore/path")
                .unwrap_or_default()
                .to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn req(kind: pb::StoragePoolType) -> pb::InitStoragePoolRequest {
        pb::InitStoragePoolRequest {
            pool_id: "p1".into(),
            r#type: kind as i32,
            ..Default::default()
        }
    }

    #[test]
    fn each_pool_type_needs_its_source_and_becomes_libvirt_xml() {
        use pb::StoragePoolType::*;
        for kind in [Dir, Fs, Netfs, Logical, Rbd, Iscsi] {
            assert!(pool_xml(&req(kind)).is_err(), "{kind:?} without source");
        }
        let mut r = req(Netfs);
        r.source_host = "nfs.example:2049".into();
        r.source_path = "/export".into();
        r.target_path = "/mnt/p1".into();
        let x = Element::parse(&pool_xml(&r).unwrap()).unwrap();
        assert_eq!(x.get_attr("type"), Some("netfs"));
        assert_eq!(
            x.path("source/host").unwrap().get_attr("port"),
            Some("2049")
        );
        assert_eq!(x.path_text("target/path"), Some("/mnt/p1"));
        let mut r = req(Rbd);
        r.source_host = "[::1]:6789".into();
        r.source_name = "rbd".into();
        r.auth_username = "admin".into();
        r.auth_secret_uuid = "not-a-uuid".into();
        assert!(pool_xml(&r).is_err());
        r.auth_secret_uuid = "8c2a4d8e-0000-4000-8000-000000000016".into();
        let x = Element::parse(&pool_xml(&r).unwrap()).unwrap();
        assert_eq!(x.path("source/host").unwrap().get_attr("name"), Some("::1"));
        let mut r = req(Iscsi);
        r.source_host = "10.0.0.1".into();
        r.source_device = "iqn.2026-12.example:t1".into();
        assert!(pool_xml(&r).unwrap().contains("/dev/disk/by-path"));
        let mut r = req(Dir);
        r.target_path = "relative".into();
        assert!(pool_xml(&r).is_err());
        r.target_path = "/a'\"<b>".into();
        let facts = PoolFacts::parse(&pool_xml(&r).unwrap()).unwrap();
        assert_eq!(facts.target_path, "/a'\"<b>");
        let mut r = req(Logical);
        r.source_name = "vg; rm -rf /".into();
        assert!(pool_xml(&r).is_err());
    }

    #[test]
    fn volume_xml_reads_back_format_and_backing() {
        let x = volume_xml("v", 1 << 30, "qcow2", Some(("/p/base", "raw"))).unwrap();
        let f = VolumeFacts::parse(&x).unwrap();
        assert_eq!(
            (f.format.as_str(), f.backing_path.as_str()),
            ("qcow2", "/p/base")
        );
        assert!(volume_format("vmdk").is_err());
    }
}
