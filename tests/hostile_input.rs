//! Property tests: hostile names, paths and answers never produce broken or injected XML, URIs
//! or shell lines, and never panic a parser.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use kvm_operator::api::ByteQuantity;
use kvm_operator::api::KvmNodeSpec;
use kvm_operator::hypervisor::cloud_init::Seed;
use kvm_operator::hypervisor::domain_xml::{DomainXml, Metadata, Owner};
use kvm_operator::hypervisor::host_facts;
use kvm_operator::hypervisor::storage::{PoolXml, VolumeXml};
use kvm_operator::hypervisor::uri::NodeTarget;
use kvm_operator::manifest;
use proptest::prelude::*;

/// Strings full of the characters that break XML, URIs, shells and paths.
fn hostile() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        "<", ">", "&", "\"", "'", "../", "/", " ", "é", "日本", ";", "|", "$(", "`", "\\", "%",
        "?", "#", "=", "&amp;", "]]>", "<!--", "\t", "a", "Z", "0", "-", "_", ".",
    ]);
    prop::collection::vec(pieces, 1..24).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn domain_xml_round_trips_any_name_and_stamp(name in hostile(), ns in hostile(), path in hostile()) {
        let mut d = DomainXml::minimal(&name, "kvm", 65536, 1);
        d.metadata = Some(Metadata { owner: Some(Owner::new("u", &ns, &name)) });
        d.devices.emulator = Some(path.clone());
        let xml = d.render().unwrap();
        prop_assert_eq!(xml.matches("<name>").count(), 1);
        prop_assert_eq!(xml.matches("<devices>").count(), 1);
        let mut back = DomainXml::parse(&xml).unwrap();
        // element text round-trips exactly; attribute values (the stamp's namespace and name)
        // come back with tabs and line breaks as spaces, as the XML spec's attribute-value
        // normalisation (quick-xml >= 0.39, libvirt's libxml2) requires; Kubernetes names hold
        // neither, and nothing else leaks either way
        let normalised = |s: &str| s.replace(['\t', '\n', '\r'], " ");
        let want = Owner::new("u", &normalised(&ns), &normalised(&name));
        prop_assert_eq!(back.metadata.take().and_then(|m| m.owner), Some(want));
        d.metadata = None;
        prop_assert_eq!(back, d);
    }

    #[test]
    fn pool_and_volume_xml_keep_values_inside_their_elements(name in hostile(), path in hostile()) {
        let spec: kvm_operator::api::StoragePoolSpec = serde_json::from_value(serde_json::json!({
            "nodeName": "a", "type": "dir", "targetPath": format!("/{path}")
        })).unwrap();
        let xml = PoolXml::from_spec(&name, &spec).render().unwrap();
        prop_assert_eq!(xml.matches("<target>").count(), 1);
        let back = PoolXml::parse(&xml).unwrap();
        prop_assert_eq!(back.name, name.clone());
        let v = VolumeXml::new(&name, 1, kvm_operator::api::virtual_machine::VolumeFormat::Raw, true).render().unwrap();
        prop_assert_eq!(v.matches("<capacity").count(), 1);
    }

    #[test]
    fn uris_carry_hostile_paths_as_single_query_values(key in hostile(), kh in hostile()) {
        let spec: KvmNodeSpec = serde_json::from_value(serde_json::json!({
            "address": "10.0.0.1", "hostKeyFingerprint": format!("SHA256:{}", "A".repeat(43)),
            "sshKeySecretRef": {"name": "s"},
        })).unwrap();
        let mut t = NodeTarget::from_spec(&spec).unwrap();
        // the transport that carries key and known_hosts paths in its URI
        t.transport = kvm_operator::hypervisor::uri::Transport::LibSsh;
        t.keyfile = Some(key.clone().into());
        t.known_hosts = Some(kh.clone().into());
        let uri = t.uri();
        let (_, query) = uri.split_once('?').unwrap();
        let keys: Vec<&str> = query.split('&').map(|kv| kv.split('=').next().unwrap_or("")).collect();
        prop_assert_eq!(keys, vec!["keyfile", "sshauth", "known_hosts", "known_hosts_verify"]);
        prop_assert!(!uri.contains(' ') && !uri.contains('#'), "{}", uri);
        prop_assert!(query.ends_with("known_hosts_verify=normal"));
    }

    #[test]
    fn hostile_libvirt_uri_overrides_never_panic(uri in hostile()) {
        let spec: Result<KvmNodeSpec, _> = serde_json::from_value(serde_json::json!({
            "address": "h", "hostKeyFingerprint": format!("SHA256:{}", "A".repeat(43)),
            "libvirtUri": format!("qemu+ssh://{uri}"),
        }));
        if let Ok(spec) = spec {
            if let Ok(t) = NodeTarget::from_spec(&spec) {
                // whatever was accepted names a plain host: no option or command smuggled in
                prop_assert!(!t.address.starts_with('-'));
                prop_assert!(t.address.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b)));
            }
        }
    }

    #[test]
    fn parsers_never_panic(text in ".{0,400}", raw in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = host_facts::parse(&text);
        let _ = ByteQuantity::parse(&text);
        let _ = DomainXml::parse(&text);
        let _ = PoolXml::parse(&text);
        let _ = manifest::parse_str(&text, "fuzz");
        let _ = manifest::parse_and_validate(&String::from_utf8_lossy(&raw), "fuzz");
    }

    #[test]
    fn seeds_hold_any_user_data_exactly(user in ".{0,3000}", host in hostile()) {
        let iso = Seed::new("id", &host, &user, None).to_iso();
        prop_assert_eq!(iso.len() % 2048, 0);
        prop_assert!(user.is_empty() || iso.windows(user.len()).any(|w| w == user.as_bytes()));
    }
}
