use super::*;

#[test]
fn an_observer_may_only_look() {
    // (role, method path, allowed)
    let table = [
        (Role::Observer, "/proctor.v1.Agent/GetInfo", true),
        (Role::Observer, "/proctor.v1.Agent/Watch", true),
        (Role::Observer, "/proctor.v1.Agent/AcquireLease", false),
        (Role::Observer, "/proctor.v1.Agent/EnsureModels", false),
        (Role::Observer, "/proctor.v1.Agent/RunCases", false),
        (Role::Observer, "/proctor.v1.Agent/StopService", false),
        (Role::Observer, "/proctor.v1.Agent/Ack", false),
        (Role::Observer, "/proctor.v1.Agent/FetchRetained", false),
        (Role::Controller, "/proctor.v1.Agent/AcquireLease", true),
        (Role::Controller, "/proctor.v1.Agent/Watch", true),
    ];
    for (role, path, want) in table {
        assert_eq!(allowed(role, path), want, "{role:?} {path}");
    }
}

/// Ok((TLS, warned)) or Err(part of the message).
type Want = Result<(bool, bool), &'static str>;

#[test]
fn plaintext_only_on_loopback_or_when_told_insecure() {
    let p = |s: &str| Some(PathBuf::from(s));
    let mtls =
        AuthConfig { mode: Mode::Mtls, ca: p("ca.pem"), cert: p("a.pem"), key: p("a.key"), ..Default::default() };
    let tokens = AuthConfig { mode: Mode::Token, tokens: p("tokens"), ..Default::default() };
    let tokens_tls = AuthConfig { cert: p("a.pem"), key: p("a.key"), ..tokens.clone() };
    let open = AuthConfig::default();
    let open_tls = AuthConfig { cert: p("a.pem"), key: p("a.key"), ..open.clone() };
    let insecure = |a: &AuthConfig| AuthConfig { insecure: true, ..a.clone() };
    let lo: SocketAddr = "127.0.0.1:7700".parse().unwrap();
    let lo6: SocketAddr = "[::1]:7700".parse().unwrap();
    let any: SocketAddr = "0.0.0.0:7700".parse().unwrap();
    let lan: SocketAddr = "10.0.0.5:7700".parse().unwrap();
    // (listen, auth, Ok(tls, warned) or Err(part of the message))
    let table: Vec<(SocketAddr, AuthConfig, Want)> = vec![
        (lo, open.clone(), Ok((false, false))),
        (lo6, open.clone(), Ok((false, false))),
        (any, open.clone(), Err("without authentication")),
        (lan, open.clone(), Err("docs/security.md")),
        (lan, open_tls.clone(), Err("without authentication")),
        (lan, insecure(&open), Ok((false, true))),
        (any, mtls.clone(), Ok((true, false))),
        (lo, mtls.clone(), Ok((true, false))),
        (lan, tokens.clone(), Err("tokens over plaintext")),
        (lan, insecure(&tokens), Ok((false, true))),
        (lo, tokens.clone(), Ok((false, false))),
        (lan, tokens_tls.clone(), Ok((true, false))),
        (lan, AuthConfig { ca: None, ..mtls.clone() }, Err("needs `ca`, `cert` and `key`")),
        (lan, AuthConfig { key: None, ..mtls.clone() }, Err("`cert` needs `key`")),
        (lan, AuthConfig { tokens: None, ..tokens.clone() }, Err("needs `tokens`")),
    ];
    for (listen, auth, want) in table {
        let got = transport(listen, &auth);
        match (got, want) {
            (Ok(t), Ok((tls, warned))) => {
                assert_eq!((t.tls, t.warning.is_some()), (tls, warned), "{listen} {auth:?}");
            }
            (Err(e), Err(part)) => assert!(e.contains(part), "{listen} {auth:?}: {e}"),
            (got, want) => panic!("{listen} {auth:?}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn the_token_file_names_who_and_which_role() {
    let tokens = Tokens::parse(
        "# lab tokens\ncontroller ci-runner 0123456789abcdef0123\n\nobserver grafana fedcba9876543210fedc\n",
    )
    .unwrap();
    let ci = Caller { name: "ci-runner".into(), role: Role::Controller };
    assert_eq!(tokens.find(b"0123456789abcdef0123"), Some(ci));
    assert_eq!(tokens.find(b"fedcba9876543210fedc").map(|c| c.role), Some(Role::Observer));
    assert_eq!(tokens.find(b"0123456789abcdef012"), None, "a prefix is not the token");
    assert_eq!(tokens.find(b""), None);
    // (file, part of the error)
    let bad = [
        ("controller ci-runner", "expected `ROLE NAME TOKEN`"),
        ("admin ci-runner 0123456789abcdef0123", "not `controller` or `observer`"),
        ("controller ci-runner short", "shorter than 16"),
    ];
    for (text, part) in bad {
        let e = Tokens::parse(text).unwrap_err();
        assert!(e.contains(part) && e.starts_with("line 1"), "{text}: {e}");
    }
    assert!(!format!("{tokens:?}").contains("0123"), "Debug never shows a token");
}

fn certificate(subject: &[(rcgen::DnType, &str)]) -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    for (kind, value) in subject {
        params.distinguished_name.push(kind.clone(), *value);
    }
    params.self_signed(&key).unwrap().der().to_vec()
}

#[test]
fn a_certificate_says_who_and_which_role() {
    use rcgen::DnType::{CommonName, OrganizationalUnitName};
    let ok = certificate(&[(CommonName, "ci-runner"), (OrganizationalUnitName, "controller")]);
    assert_eq!(caller_from_certificate(&ok), Ok(Caller { name: "ci-runner".into(), role: Role::Controller }));
    let observer = certificate(&[(CommonName, "grafana"), (OrganizationalUnitName, "observer")]);
    assert_eq!(caller_from_certificate(&observer).map(|c| c.role), Ok(Role::Observer));
    // (subject, part of the error)
    let bad: [(&[(rcgen::DnType, &str)], &str); 3] = [
        (&[(CommonName, "x")], "carries no role"),
        (&[(CommonName, "x"), (OrganizationalUnitName, "admin")], "has role \"admin\""),
        (&[(OrganizationalUnitName, "controller")], "no common name"),
    ];
    for (subject, part) in bad {
        let e = caller_from_certificate(&certificate(subject)).unwrap_err();
        assert!(e.contains(part), "{e}");
    }
    assert!(caller_from_certificate(b"not der").is_err());
}

#[test]
fn an_agent_certificate_near_or_past_its_end_is_said_at_start() {
    let day = 86400;
    let now = 1_000 * day;
    // (not before, not after, part of the warning; "" for none)
    let table = [
        (now - day, now + 365 * day, ""),
        (now - day, now + 10 * day, "expires in 10 days"),
        (now - 30 * day, now - 2 * day, "expired 2 days ago"),
        (now + day, now + 365 * day, "not valid yet"),
    ];
    for (from, to, part) in table {
        let got = validity_warning(from, to, now);
        match part {
            "" => assert_eq!(got, None),
            part => assert!(got.as_deref().is_some_and(|w| w.contains(part)), "{got:?}"),
        }
    }
}
