//! Arbitrary datagrams through netcheck's STUN response parser and a running STUN phase:
//! neither may panic, and anything the parser accepts must carry an address.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use netcheck::plan::{self, HostFamilies};
use netcheck::report::StunPhase;
use proto::relaymap::{RelayMap, RelayNode, RelayRegion};

fuzz_target!(|data: &[u8]| {
    if let Ok((_tx, addr)) = netcheck::stun::parse_response(data) {
        let _ = addr.port();
    }
    let mut map = RelayMap::default();
    map.regions.insert(
        1,
        RelayRegion {
            region_id: 1,
            nodes: vec![RelayNode {
                name: "1a".into(),
                region_id: 1,
                ipv4: "192.0.2.1".into(),
                ..Default::default()
            }],
            ..Default::default()
        },
    );
    let plan = plan::full(&map, HostFamilies { v4: true, v6: false });
    let t0 = Instant::now();
    let mut phase = StunPhase::new(&plan, |_| Some("192.0.2.1:3478".parse().unwrap()), false, t0, 1);
    let _ = phase.poll_transmit(t0);
    phase.handle_packet(t0 + Duration::from_millis(5), data);
    let _ = phase.is_done(t0 + Duration::from_millis(10));
});
