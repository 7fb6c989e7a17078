//! The packet path: what to do with one query, as a plain value, without sockets.
//! Everything here reads untrusted bytes; `fuzz/fuzz_targets/dns_query.rs` drives it.

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, ResponseCode},
    rr::{DNSClass, Name, RData, Record, RecordType, rdata},
};
use rand::seq::SliceRandom as _;

use super::names::NameTable;

/// The TTL of every local answer, as Istio's DNS proxy and ztunnel give.
pub const LOCAL_TTL: u32 = 30;
/// A UDP reply's limit when the query has no EDNS (RFC 1035).
const CLASSIC_UDP_LIMIT: usize = 512;
/// The payload size the server offers in its own EDNS answers (the DNS flag day
/// value, which fits every path MTU in practice).
const OFFERED_UDP_PAYLOAD: u16 = 1232;

/// What the server does with one query.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Answer with these bytes (a local answer, or an error).
    Reply { bytes: Vec<u8>, outcome: Outcome },
    /// Not ours: relay the query as it is to the upstream servers.
    Forward,
    /// A name (lowercase, no trailing dot) under a DYNAMIC_DNS wildcard host that has
    /// no VIPs yet: allocate them, then decide again.
    Allocate(String),
    /// Not even a header: nothing to answer.
    Drop,
}

/// How a query ended, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Local,
    Forwarded,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Local => "local",
            Outcome::Forwarded => "forwarded",
            Outcome::Failed => "failed",
        }
    }
}

/// Decides what to do with a query that arrived over UDP (`udp`, so the reply must
/// fit the client's EDNS size) or TCP.
pub fn decide(names: &NameTable, query: &[u8], udp: bool) -> Decision {
    let message = match Message::from_vec(query) {
        Ok(message) => message,
        Err(_) => return malformed(query),
    };
    if message.metadata.message_type != MessageType::Query {
        return Decision::Drop;
    }
    if message.metadata.op_code != OpCode::Query {
        return error(&message, ResponseCode::NotImp);
    }
    let [question] = message.queries.as_slice() else {
        // Istio answers a query without exactly one question with SERVFAIL; a
        // forwarder could not tell its answer apart from another query's either.
        return error(&message, ResponseCode::ServFail);
    };
    if question.query_class() != DNSClass::IN
        || !matches!(question.query_type(), RecordType::A | RecordType::AAAA)
    {
        return Decision::Forward;
    }
    let asked = question.name().to_ascii();
    let Some(found) = names.lookup(&asked) else {
        return Decision::Forward;
    };
    if found.records.dynamic {
        // Under a search domain the name could be either: upstream knows which.
        return match found.canonical {
            None => Decision::Allocate(asked.trim_end_matches('.').to_ascii_lowercase()),
            Some(_) => Decision::Forward,
        };
    }
    let mut response = reply_to(&message, ResponseCode::NoError);
    response.metadata.authoritative = true;
    let owner = question.name().clone();
    let mut answers = Vec::new();
    let target = match &found.canonical {
        Some(host) => match Name::from_ascii(format!("{host}.")) {
            Ok(host) => {
                answers.push(Record::from_rdata(
                    owner,
                    LOCAL_TTL,
                    RData::CNAME(rdata::CNAME(host.clone())),
                ));
                host
            }
            Err(_) => return error(&message, ResponseCode::ServFail),
        },
        None => owner,
    };
    let mut addresses: Vec<RData> = match question.query_type() {
        RecordType::A => found
            .records
            .v4
            .iter()
            .map(|&ip| RData::A(rdata::A(ip)))
            .collect(),
        _ => found
            .records
            .v6
            .iter()
            .map(|&ip| RData::AAAA(rdata::AAAA(ip)))
            .collect(),
    };
    // Spreads clients over several addresses, as Istio's proxy shuffles them.
    addresses.shuffle(&mut rand::rng());
    answers.extend(
        addresses
            .into_iter()
            .map(|data| Record::from_rdata(target.clone(), LOCAL_TTL, data)),
    );
    response.answers = answers;
    encode(response, &message, udp, Outcome::Local)
}

/// The largest reply a UDP client asked for.
pub fn udp_limit(query: &Message) -> usize {
    query.edns.as_ref().map_or(CLASSIC_UDP_LIMIT, |edns| {
        usize::from(edns.max_payload()).max(CLASSIC_UDP_LIMIT)
    })
}

/// An upstream's reply, fitted to a UDP client's size: relayed as it is when it fits,
/// otherwise cut to the header and question with TC set, so the client retries over
/// TCP. `None`: the reply does not parse and cannot be cut.
pub fn fit_udp_reply(query: &[u8], reply: Vec<u8>) -> Option<Vec<u8>> {
    let limit = Message::from_vec(query)
        .map(|query| udp_limit(&query))
        .unwrap_or(CLASSIC_UDP_LIMIT);
    if reply.len() <= limit {
        return Some(reply);
    }
    Message::from_vec(&reply).ok()?.truncate().to_vec().ok()
}

/// SERVFAIL for a query that could be parsed, when every upstream failed.
pub fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    match Message::from_vec(query) {
        Ok(message) => match error(&message, ResponseCode::ServFail) {
            Decision::Reply { bytes, .. } => Some(bytes),
            _ => None,
        },
        Err(_) => None,
    }
}

fn reply_to(query: &Message, code: ResponseCode) -> Message {
    let mut response = Message::response(query.metadata.id, query.metadata.op_code);
    response.metadata.recursion_desired = query.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.metadata.checking_disabled = query.metadata.checking_disabled;
    response.metadata.response_code = code;
    response.queries = query.queries.clone();
    if query.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(OFFERED_UDP_PAYLOAD);
        response.set_edns(edns);
    }
    response
}

fn error(query: &Message, code: ResponseCode) -> Decision {
    let response = reply_to(query, code);
    encode(response, query, false, Outcome::Failed)
}

fn encode(response: Message, query: &Message, udp: bool, outcome: Outcome) -> Decision {
    let Ok(mut bytes) = response.to_vec() else {
        return Decision::Drop;
    };
    if udp && bytes.len() > udp_limit(query) {
        match response.truncate().to_vec() {
            Ok(truncated) => bytes = truncated,
            Err(_) => return Decision::Drop,
        }
    }
    Decision::Reply { bytes, outcome }
}

/// FORMERR for a query whose header can be read; nothing for one that has none, or
/// for a response (answering a response could make two servers bounce packets).
fn malformed(query: &[u8]) -> Decision {
    const HEADER: usize = 12;
    if query.len() < HEADER || query[2] & 0x80 != 0 {
        return Decision::Drop;
    }
    let mut bytes = query[..HEADER].to_vec();
    // QR set, opcode and RD kept; AA, TC, RA, Z, AD, CD cleared; RCODE FORMERR.
    bytes[2] = 0x80 | (query[2] & 0x79);
    bytes[3] = ResponseCode::FormErr.low();
    bytes[4..HEADER].fill(0);
    Decision::Reply {
        bytes,
        outcome: Outcome::Failed,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use hickory_proto::op::Query;

    use super::*;
    use crate::registry::{
        Registry,
        test_support::{config, entry},
    };

    fn names() -> NameTable {
        let (registry, _) = Registry::build(&config(&[&entry(
            "db",
            "  addresses: [240.240.4.1, 240.240.4.2]\n  ports: [{number: 5432, name: tcp}]\n",
        )]))
        .unwrap();
        NameTable::build(&registry, &["corp.internal".to_owned()])
    }

    fn query(name: &str, kind: RecordType) -> Vec<u8> {
        let mut message = Message::query();
        message.metadata.recursion_desired = true;
        message.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
        message.to_vec().unwrap()
    }

    fn reply(decision: Decision) -> Message {
        match decision {
            Decision::Reply { bytes, .. } => Message::from_vec(&bytes).unwrap(),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn a_known_host_is_answered_with_every_address_and_a_30_s_ttl() {
        let answer = reply(decide(&names(), &query("DB.example.", RecordType::A), true));
        assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
        assert!(answer.metadata.authoritative);
        let mut ips: Vec<Ipv4Addr> = answer
            .answers
            .iter()
            .map(|record| match record.data {
                RData::A(rdata::A(ip)) => ip,
                ref other => panic!("{other:?}"),
            })
            .collect();
        ips.sort();
        assert_eq!(
            ips,
            vec![Ipv4Addr::new(240, 240, 4, 1), Ipv4Addr::new(240, 240, 4, 2)]
        );
        assert!(answer.answers.iter().all(|record| record.ttl == LOCAL_TTL));
    }

    #[test]
    fn aaaa_for_a_v4_only_host_is_an_empty_noerror() {
        let answer = reply(decide(
            &names(),
            &query("db.example.", RecordType::AAAA),
            true,
        ));
        assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
        assert!(answer.answers.is_empty());
    }

    #[test]
    fn a_name_under_a_dynamic_dns_wildcard_is_allocated_first_then_answered() {
        let wild = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: wild}\nspec:\n  hosts: [\"*.wild.example\"]\n  resolution: DYNAMIC_DNS\n  ports: [{number: 443, name: tls, protocol: TLS}]\n";
        let config = config(&[wild]);
        let search = ["corp.internal".to_owned()];
        let (registry, _) = Registry::build(&config).unwrap();
        let names = NameTable::build(&registry, &search);
        assert_eq!(
            decide(&names, &query("X.Wild.example.", RecordType::A), true),
            Decision::Allocate("x.wild.example".to_owned())
        );
        assert_eq!(
            decide(
                &names,
                &query("x.wild.example.corp.internal.", RecordType::A),
                true
            ),
            Decision::Forward,
            "under a search domain it may be another name"
        );
        assert_eq!(
            decide(&names, &query("x.wild.example.", RecordType::MX), true),
            Decision::Forward
        );

        let mut asked = registry.allocations().clone();
        asked.request("x.wild.example");
        let (registry, _) = Registry::build_allocating(&config, &asked).unwrap();
        let names = NameTable::build(&registry, &search);
        let answer = reply(decide(
            &names,
            &query("x.wild.example.", RecordType::A),
            true,
        ));
        let vip = registry.allocated("x.wild.example").next().unwrap();
        assert_eq!(answer.answers.len(), 1);
        assert_eq!(answer.answers[0].data.ip_addr(), Some(vip));
        assert_eq!(answer.answers[0].name.to_ascii(), "x.wild.example.");
        // Its sibling still waits for its own.
        assert_eq!(
            decide(&names, &query("y.wild.example.", RecordType::AAAA), true),
            Decision::Allocate("y.wild.example".to_owned())
        );
    }

    #[test]
    fn a_search_domain_form_gets_a_cname_and_the_records() {
        let answer = reply(decide(
            &names(),
            &query("db.example.corp.internal.", RecordType::A),
            false,
        ));
        assert_eq!(answer.answers.len(), 3);
        assert_eq!(answer.answers[0].record_type(), RecordType::CNAME);
        assert_eq!(answer.answers[1].name.to_ascii(), "db.example.");
    }

    #[test]
    fn other_names_and_types_are_forwarded() {
        let names = names();
        assert_eq!(
            decide(&names, &query("else.example.", RecordType::A), true),
            Decision::Forward
        );
        assert_eq!(
            decide(&names, &query("db.example.", RecordType::MX), true),
            Decision::Forward
        );
    }

    #[test]
    fn garbage_gets_formerr_or_nothing() {
        assert_eq!(decide(&names(), &[1, 2, 3], true), Decision::Drop);
        let mut bad = query("db.example.", RecordType::A);
        bad.truncate(bad.len() - 3);
        let Decision::Reply { bytes, outcome } = decide(&names(), &bad, true) else {
            panic!("a readable header gets an answer");
        };
        assert_eq!(outcome, Outcome::Failed);
        assert_eq!(&bytes[..2], &bad[..2], "the id is kept");
        assert_eq!(bytes[3] & 0x0f, 1, "FORMERR");
        assert_eq!(bytes[2] & 0x80, 0x80, "a response");
    }

    #[test]
    fn an_oversized_udp_reply_is_cut_with_tc() {
        let query = query("big.example.", RecordType::TXT);
        let mut big = Message::response(7, OpCode::Query);
        big.add_query(Query::query(
            Name::from_ascii("big.example.").unwrap(),
            RecordType::TXT,
        ));
        for _ in 0..10 {
            big.add_answer(Record::from_rdata(
                Name::from_ascii("big.example.").unwrap(),
                60,
                RData::TXT(rdata::TXT::new(vec!["x".repeat(100)])),
            ));
        }
        let cut = fit_udp_reply(&query, big.to_vec().unwrap()).unwrap();
        let cut = Message::from_vec(&cut).unwrap();
        assert!(cut.metadata.truncation);
        assert!(cut.answers.is_empty());
    }

    proptest::proptest! {
        /// The fuzz target's property, over arbitrary bytes and over valid queries with
        /// bytes flipped: a decision without a panic, and no reply is answered again.
        #[test]
        fn any_bytes_get_a_decision_and_replies_are_never_answered(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600),
            flips in proptest::collection::vec((0usize..64, proptest::num::u8::ANY), 0..6),
        ) {
            let names = names();
            let mut mutated = query("db.example.corp.internal.", RecordType::A);
            for (index, value) in flips {
                let index = index % mutated.len();
                mutated[index] ^= value;
            }
            for input in [bytes, mutated] {
                for udp in [true, false] {
                    if let Decision::Reply { bytes, .. } = decide(&names, &input, udp) {
                        proptest::prop_assert_eq!(decide(&names, &bytes, udp), Decision::Drop);
                    }
                }
            }
        }
    }
}
