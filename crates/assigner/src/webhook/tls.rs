//! The webhook's serving certificate: a self-signed CA and a serving certificate it signs,
//! what to renew when (a pure function of the certificates and the time, so rotation is
//! tested with a fake clock), and generating them.
//!
//! The material lives in one Secret (`tls.crt`, `tls.key`, `ca.crt`, `ca.key`). `ca.crt` is
//! the CA bundle the API server trusts, newest first; its first certificate is the one
//! whose key is `ca.key`, the signer of `tls.crt`. After a CA rotation the previous CA
//! stays in the bundle until it expires, so a replica still serving a certificate of the old
//! CA is trusted while it reloads.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use jiff::Timestamp;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Secret data keys.
pub const TLS_CRT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
pub const CA_CRT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("a certificate in the Secret does not parse: {0}")]
    Parse(String),
    #[error("the Secret lacks {0}")]
    Missing(&'static str),
}

/// How long the certificates the assigner issues are valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetimes {
    pub ca: Duration,
    pub serving: Duration,
}

/// When a certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: Timestamp,
    pub not_after: Timestamp,
}

impl Validity {
    /// Less than a third of its lifetime left at `now` (or not valid at all): renew it.
    fn due(&self, now: Timestamp) -> bool {
        let lifetime = self.not_after.as_second() - self.not_before.as_second();
        let left = self.not_after.as_second() - now.as_second();
        now < self.not_before || left * 3 < lifetime
    }

    fn expired(&self, now: Timestamp) -> bool {
        now >= self.not_after
    }
}

/// The certificates found in the Secret, as far as renewal is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// The signing CA (first of `ca.crt`).
    pub ca: Validity,
    /// The serving certificate (`tls.crt`).
    pub serving: Validity,
    /// Every CA of the bundle, newest first.
    pub bundle: Vec<Validity>,
}

/// What the leader writes into the Secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renewal {
    /// Everything is valid for long enough.
    Keep,
    /// A new serving certificate from the same CA.
    Serving,
    /// A new CA and a serving certificate from it; the old CA stays in the bundle.
    Ca,
    /// No usable material: a new CA and serving certificate, nothing else in the bundle.
    Create,
}

/// What to renew at `now` given the Secret's certificates (`None`: absent or unreadable).
pub fn renewal(observed: Option<&Observed>, now: Timestamp) -> Renewal {
    let Some(observed) = observed else {
        return Renewal::Create;
    };
    if observed.ca.expired(now) {
        Renewal::Create
    } else if observed.ca.due(now) {
        Renewal::Ca
    } else if observed.serving.due(now) || observed.serving.not_after > observed.ca.not_after {
        Renewal::Serving
    } else {
        Renewal::Keep
    }
}

/// The PEM material of one Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Material {
    pub cert_pem: String,
    pub key_pem: String,
    /// The CA bundle, newest (signing) CA first.
    pub ca_pem: String,
    /// The signing CA's key; absent when certificates come from cert-manager.
    pub ca_key_pem: Option<String>,
}

/// The names the serving certificate covers: the webhook Service's DNS names and the
/// loopback address (the local control plane calls the webhook by URL).
pub fn subject_alt_names(service: &str, namespace: &str) -> Vec<SanType> {
    let mut sans: Vec<SanType> = [
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
        "localhost".to_owned(),
    ]
    .into_iter()
    .filter_map(|name| name.try_into().ok().map(SanType::DnsName))
    .collect();
    sans.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    sans
}

fn offset(at: Timestamp) -> Result<time::OffsetDateTime, TlsError> {
    time::OffsetDateTime::from_unix_timestamp(at.as_second())
        .map_err(|e| TlsError::Parse(e.to_string()))
}

fn later(now: Timestamp, by: Duration) -> Timestamp {
    let seconds = i64::try_from(by.as_secs()).unwrap_or(i64::MAX);
    Timestamp::from_second(now.as_second().saturating_add(seconds)).unwrap_or(Timestamp::MAX)
}

/// Material after `renewal` at `now` (`current` is what the Secret holds, if usable).
pub fn renew(
    renewal: Renewal,
    current: Option<&Material>,
    sans: &[SanType],
    lifetimes: Lifetimes,
    now: Timestamp,
) -> Result<Option<Material>, TlsError> {
    let current = current.filter(|_| renewal != Renewal::Create);
    match (renewal, current) {
        (Renewal::Keep, _) => Ok(None),
        (Renewal::Serving, Some(current)) => {
            let ca_key_pem = current
                .ca_key_pem
                .as_deref()
                .ok_or(TlsError::Missing(CA_KEY))?;
            let ca_pem = first_pem(&current.ca_pem).ok_or(TlsError::Missing(CA_CRT))?;
            let ca_not_after = validity_of(&ca_pem)?.not_after;
            let (cert_pem, key_pem) =
                serving(&ca_pem, ca_key_pem, ca_not_after, sans, lifetimes, now)?;
            Ok(Some(Material {
                cert_pem,
                key_pem,
                ..current.clone()
            }))
        }
        (_, current) => {
            let (ca_cert_pem, ca_key_pem, ca_not_after) = new_ca(lifetimes, now)?;
            let (cert_pem, key_pem) = serving(
                &ca_cert_pem,
                &ca_key_pem,
                ca_not_after,
                sans,
                lifetimes,
                now,
            )?;
            let kept = current
                .map(|c| still_valid_cas(&c.ca_pem, now))
                .unwrap_or_default();
            Ok(Some(Material {
                cert_pem,
                key_pem,
                ca_pem: std::iter::once(ca_cert_pem).chain(kept).collect(),
                ca_key_pem: Some(ca_key_pem),
            }))
        }
    }
}

fn new_ca(lifetimes: Lifetimes, now: Timestamp) -> Result<(String, String, Timestamp), TlsError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.distinguished_name.push(
        DnType::CommonName,
        format!("shardop-assigner webhook CA {}", now.as_second()),
    );
    let not_after = later(now, lifetimes.ca);
    params.not_before = offset(now)?;
    params.not_after = offset(not_after)?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem(), not_after))
}

fn serving(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    ca_not_after: Timestamp,
    sans: &[SanType],
    lifetimes: Lifetimes,
    now: Timestamp,
) -> Result<(String, String), TlsError> {
    let ca_key = KeyPair::from_pem(ca_key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans.to_vec();
    params
        .distinguished_name
        .push(DnType::CommonName, "shardop-assigner webhook");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = offset(now)?;
    params.not_after = offset(later(now, lifetimes.serving).min(ca_not_after))?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

const END_CERTIFICATE: &str = "-----END CERTIFICATE-----";

/// Each certificate of a PEM bundle, as its own PEM text.
fn certificates(pem: &str) -> Vec<String> {
    pem.split_inclusive(END_CERTIFICATE)
        .filter_map(|block| {
            let start = block.find("-----BEGIN CERTIFICATE-----")?;
            block
                .ends_with(END_CERTIFICATE)
                .then(|| format!("{}\n", &block[start..]))
        })
        .collect()
}

fn first_pem(bundle: &str) -> Option<String> {
    certificates(bundle).into_iter().next()
}

/// The CAs of `bundle` not expired at `now`.
fn still_valid_cas(bundle: &str, now: Timestamp) -> Vec<String> {
    certificates(bundle)
        .into_iter()
        .filter(|pem| validity_of(pem).is_ok_and(|v| !v.expired(now)))
        .collect()
}

/// The validity of the (first) certificate in `pem`.
pub fn validity_of(pem: &str) -> Result<Validity, TlsError> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| TlsError::Parse(e.to_string()))?;
    let cert = block
        .parse_x509()
        .map_err(|e| TlsError::Parse(e.to_string()))?;
    let at = |t: x509_parser::time::ASN1Time| {
        Timestamp::from_second(t.timestamp()).map_err(|e| TlsError::Parse(e.to_string()))
    };
    Ok(Validity {
        not_before: at(cert.validity().not_before)?,
        not_after: at(cert.validity().not_after)?,
    })
}

/// What [`renewal`] needs to know about `material`.
pub fn observe(material: &Material) -> Result<Observed, TlsError> {
    let bundle = certificates(&material.ca_pem)
        .iter()
        .map(|pem| validity_of(pem))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Observed {
        ca: *bundle.first().ok_or(TlsError::Missing(CA_CRT))?,
        serving: validity_of(&material.cert_pem)?,
        bundle,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;

    fn at(day: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + day * DAY).unwrap()
    }

    fn lifetimes() -> Lifetimes {
        Lifetimes {
            ca: Duration::from_secs(365 * DAY as u64),
            serving: Duration::from_secs(90 * DAY as u64),
        }
    }

    fn sans() -> Vec<SanType> {
        subject_alt_names("shardop-assigner-webhook", "shardop-system")
    }

    fn issue(renewal: Renewal, current: Option<&Material>, now: Timestamp) -> Material {
        renew(renewal, current, &sans(), lifetimes(), now)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn nothing_usable_means_a_new_ca_and_certificate() {
        assert_eq!(renewal(None, at(0)), Renewal::Create);
        let material = issue(Renewal::Create, None, at(0));
        let observed = observe(&material).unwrap();
        assert_eq!(observed.bundle.len(), 1);
        assert_eq!(observed.ca.not_after, at(365));
        assert_eq!(observed.serving.not_before, at(0));
        assert_eq!(observed.serving.not_after, at(90));
        assert_eq!(renewal(Some(&observed), at(1)), Renewal::Keep);
    }

    #[test]
    fn a_fake_clock_drives_serving_and_ca_rotation() {
        let mut material = issue(Renewal::Create, None, at(0));
        let first_ca = first_pem(&material.ca_pem).unwrap();
        let mut serving_renewals = 0;
        let mut day = 0;
        // Walk a day at a time through two CA lifetimes, renewing whatever is due.
        while day < 730 {
            day += 1;
            let observed = observe(&material).unwrap();
            assert!(
                !observed.serving.expired(at(day)),
                "serving expired on day {day}"
            );
            assert!(!observed.ca.expired(at(day)), "CA expired on day {day}");
            match renewal(Some(&observed), at(day)) {
                Renewal::Keep => {}
                Renewal::Serving => {
                    // Less than a third of 90 days left: renewed at day 61, 122, ...
                    assert!(
                        observed.serving.not_after.as_second() - at(day).as_second() < 30 * DAY
                    );
                    let before = material.ca_pem.clone();
                    material = issue(Renewal::Serving, Some(&material), at(day));
                    assert_eq!(material.ca_pem, before, "same CA");
                    serving_renewals += 1;
                }
                Renewal::Ca => {
                    assert!(day >= 243, "CA renewed early, day {day}");
                    let old_ca = first_pem(&material.ca_pem).unwrap();
                    material = issue(Renewal::Ca, Some(&material), at(day));
                    let cas = certificates(&material.ca_pem);
                    assert_eq!(cas.len(), 2, "old and new CA trusted during the overlap");
                    assert_eq!(cas[1], old_ca);
                    assert_ne!(cas[0], old_ca);
                }
                Renewal::Create => panic!("material lost on day {day}"),
            }
        }
        assert!(serving_renewals >= 8, "{serving_renewals} serving renewals");
        // The first CA expired long ago and left the bundle.
        assert!(!certificates(&material.ca_pem).contains(&first_ca));
    }

    #[test]
    fn a_serving_certificate_never_outlives_its_ca() {
        let material = issue(Renewal::Create, None, at(0));
        let renewed = issue(Renewal::Serving, Some(&material), at(300));
        let observed = observe(&renewed).unwrap();
        assert_eq!(observed.serving.not_after, observed.ca.not_after);
        // A serving certificate past its CA's end is renewed.
        let mut odd = observed.clone();
        odd.serving.not_after = at(400);
        assert_eq!(renewal(Some(&odd), at(1)), Renewal::Serving);
    }

    #[test]
    fn an_expired_ca_starts_over() {
        let observed = observe(&issue(Renewal::Create, None, at(0))).unwrap();
        assert_eq!(renewal(Some(&observed), at(365)), Renewal::Create);
        assert_eq!(renewal(Some(&observed), at(250)), Renewal::Ca);
        assert_eq!(renewal(Some(&observed), at(70)), Renewal::Serving);
    }

    #[test]
    fn the_serving_certificate_verifies_against_the_bundle_for_every_name() {
        let material = issue(Renewal::Create, None, at(0));
        let renewed = issue(Renewal::Ca, Some(&material), at(250));
        let (_, block) = x509_parser::pem::parse_x509_pem(renewed.cert_pem.as_bytes()).unwrap();
        let cert = block.parse_x509().unwrap();
        let sans = cert.subject_alternative_name().unwrap().unwrap();
        let names: Vec<String> = sans
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        // 7f:00:00:01 is 127.0.0.1.
        for want in ["shardop-assigner-webhook.shardop-system.svc", "7f:00:00:01"] {
            assert!(
                names.iter().any(|n| n.contains(want)),
                "{want} not in {names:?}"
            );
        }
        // Signed by the new (first) CA.
        let (_, ca_block) =
            x509_parser::pem::parse_x509_pem(first_pem(&renewed.ca_pem).unwrap().as_bytes())
                .unwrap();
        let ca = ca_block.parse_x509().unwrap();
        assert!(cert.verify_signature(Some(ca.public_key())).is_ok());
        assert_eq!(cert.issuer(), ca.subject());
    }
}
