//! Who is reachable where: local connections per key (with duplicates), keys reachable
//! through a mesh peer, mesh watchers, and which keys each sender has sent to (so they
//! can be told PeerGone when it leaves). One mutex, held only for map updates — never
//! across an await and never while writing to a socket.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use proto::NodePublic;

use super::client::ClientHandle;
use super::mesh::MeshForwarder;
use super::metrics::Metrics;
use crate::frame::{present_flags, Frame, PeerGoneReason};

/// Destinations remembered per sender for PeerGone notices.
const MAX_SENT_TO_PER_KEY: usize = 4096;

#[derive(Debug)]
struct ClientSet {
    /// Receives traffic: the newest connection, or the one that sent most recently.
    active: Arc<ClientHandle>,
    others: Vec<Arc<ClientHandle>>,
}

impl ClientSet {
    fn all(&self) -> impl Iterator<Item = &Arc<ClientHandle>> {
        std::iter::once(&self.active).chain(self.others.iter())
    }
}

/// Where a packet for a key goes.
#[derive(Debug)]
pub(crate) enum Route {
    Local(Arc<ClientHandle>),
    Mesh(Arc<MeshForwarder>),
    Nowhere,
}

#[derive(Debug, Default)]
pub(crate) struct Routes {
    clients: HashMap<NodePublic, ClientSet>,
    mesh: HashMap<NodePublic, Arc<MeshForwarder>>,
    watchers: BTreeMap<u64, Arc<ClientHandle>>,
    sent_to: HashMap<NodePublic, HashSet<NodePublic>>,
    conns: usize,
}

pub(crate) fn present_frame(h: &ClientHandle) -> Frame {
    let mut flags = 0;
    if h.is_mesh {
        flags |= present_flags::MESH_PEER;
    }
    if h.is_prober {
        flags |= present_flags::PROBER;
    }
    if flags == 0 {
        flags = present_flags::REGULAR;
    }
    Frame::PeerPresent {
        peer: h.key,
        addr: Some(h.remote),
        flags,
    }
}

impl Routes {
    pub fn connection_count(&self) -> usize {
        self.conns
    }

    /// Adds a connection; the newest connection of a key becomes its active one.
    pub fn register(&mut self, h: Arc<ClientHandle>, metrics: &Metrics) {
        self.conns += 1;
        match self.clients.get_mut(&h.key) {
            Some(set) => {
                let old = std::mem::replace(&mut set.active, h.clone());
                set.others.push(old);
                for c in set.all() {
                    c.has_dups.store(true, Ordering::Relaxed);
                }
            }
            None => {
                self.clients.insert(
                    h.key,
                    ClientSet {
                        active: h.clone(),
                        others: Vec::new(),
                    },
                );
            }
        }
        let present = present_frame(&h);
        for w in self.watchers.values() {
            if w.key != h.key {
                w.enqueue_control(present.clone(), metrics);
            }
        }
    }

    /// Removes a connection. When it was its key's last one, the key's recipients and the
    /// mesh watchers are told it is gone.
    pub fn unregister(&mut self, h: &Arc<ClientHandle>, metrics: &Metrics) {
        if self.watchers.remove(&h.id).is_some() {
            metrics.current_watchers.fetch_sub(1, Ordering::Relaxed);
        }
        let Some(set) = self.clients.get_mut(&h.key) else {
            return;
        };
        if Arc::ptr_eq(&set.active, h) {
            match set.others.pop() {
                Some(next) => set.active = next,
                None => {
                    self.clients.remove(&h.key);
                    self.conns -= 1;
                    for w in self.watchers.values() {
                        w.enqueue_control(
                            Frame::PeerGone {
                                peer: h.key,
                                reason: PeerGoneReason::Disconnected,
                            },
                            metrics,
                        );
                    }
                    self.note_gone_from_region(h.key, metrics);
                    return;
                }
            }
        } else {
            let before = set.others.len();
            set.others.retain(|c| !Arc::ptr_eq(c, h));
            if set.others.len() == before {
                return;
            }
        }
        self.conns -= 1;
        if set.others.is_empty() {
            set.active.has_dups.store(false, Ordering::Relaxed);
        }
    }

    /// If `key` has neither a local connection nor a mesh route, tells everyone it sent to.
    fn note_gone_from_region(&mut self, key: NodePublic, metrics: &Metrics) {
        if self.clients.contains_key(&key) || self.mesh.contains_key(&key) {
            return;
        }
        let Some(dsts) = self.sent_to.remove(&key) else {
            return;
        };
        let mut dsts: Vec<_> = dsts.into_iter().collect();
        dsts.sort();
        for dst in dsts {
            if let Some(set) = self.clients.get(&dst) {
                let gone = Frame::PeerGone {
                    peer: key,
                    reason: PeerGoneReason::Disconnected,
                };
                if set.active.enqueue_control(gone, metrics) {
                    metrics
                        .peer_gone_disconnected_sent
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Where a packet for `dst` goes. Also records that `src` sent to `dst` (when
    /// `record` is set) and makes `from` its key's active connection if it has duplicates.
    pub fn route(
        &mut self,
        from: Option<&Arc<ClientHandle>>,
        src: NodePublic,
        dst: NodePublic,
        record: bool,
    ) -> Route {
        if let Some(from) = from {
            if from.has_dups.load(Ordering::Relaxed) {
                if let Some(set) = self.clients.get_mut(&from.key) {
                    if !Arc::ptr_eq(&set.active, from) {
                        if let Some(pos) = set.others.iter().position(|c| Arc::ptr_eq(c, from)) {
                            std::mem::swap(&mut set.active, &mut set.others[pos]);
                        }
                    }
                }
            }
        }
        let route = if let Some(set) = self.clients.get(&dst) {
            Route::Local(set.active.clone())
        } else if let Some(fwd) = self.mesh.get(&dst) {
            Route::Mesh(fwd.clone())
        } else {
            return Route::Nowhere;
        };
        if record {
            let set = self.sent_to.entry(src).or_default();
            if set.len() < MAX_SENT_TO_PER_KEY {
                set.insert(dst);
            }
        }
        route
    }

    /// Local delivery only (packets forwarded by a mesh peer are never re-forwarded).
    pub fn route_local(&mut self, src: NodePublic, dst: NodePublic) -> Option<Arc<ClientHandle>> {
        let h = self.clients.get(&dst)?.active.clone();
        let set = self.sent_to.entry(src).or_default();
        if set.len() < MAX_SENT_TO_PER_KEY {
            set.insert(dst);
        }
        Some(h)
    }

    /// Registers a mesh watcher and queues a PeerPresent for every connected client.
    pub fn add_watcher(&mut self, w: Arc<ClientHandle>, metrics: &Metrics) {
        w.is_watcher.store(true, Ordering::Relaxed);
        let mut keys: Vec<_> = self.clients.keys().copied().collect();
        keys.sort();
        for k in keys {
            if k == w.key {
                continue;
            }
            for c in self.clients[&k].all() {
                w.enqueue_control(present_frame(c), metrics);
            }
        }
        if self.watchers.insert(w.id, w).is_none() {
            metrics.current_watchers.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// All connections of `key` (ClosePeer, revocation).
    pub fn connections_of(&self, key: &NodePublic) -> Vec<Arc<ClientHandle>> {
        self.clients
            .get(key)
            .map(|s| s.all().cloned().collect())
            .unwrap_or_default()
    }

    /// Every connection (shutdown).
    pub fn all_connections(&self) -> Vec<Arc<ClientHandle>> {
        self.clients
            .values()
            .flat_map(|s| s.all().cloned())
            .collect()
    }

    /// Distinct non-mesh keys with one of their connections (re-verification).
    pub fn regular_clients(&self) -> Vec<Arc<ClientHandle>> {
        let mut v: Vec<_> = self
            .clients
            .values()
            .filter(|s| !s.active.is_mesh)
            .map(|s| s.active.clone())
            .collect();
        v.sort_by_key(|h| h.key);
        v
    }

    /// `key` is reachable through `fwd` (first registered mesh peer wins).
    pub fn add_mesh_route(&mut self, key: NodePublic, fwd: &Arc<MeshForwarder>) {
        self.mesh.entry(key).or_insert_with(|| fwd.clone());
    }

    /// `key` left mesh peer `link_id`.
    pub fn remove_mesh_route(&mut self, key: NodePublic, link_id: u64, metrics: &Metrics) {
        if self.mesh.get(&key).is_some_and(|f| f.link_id == link_id) {
            self.mesh.remove(&key);
            self.note_gone_from_region(key, metrics);
        }
    }

    /// Mesh link `link_id` broke: forget every key learned from it.
    pub fn remove_link_routes(&mut self, link_id: u64, metrics: &Metrics) {
        let mut gone: Vec<_> = self
            .mesh
            .iter()
            .filter(|(_, f)| f.link_id == link_id)
            .map(|(k, _)| *k)
            .collect();
        gone.sort();
        for k in gone {
            self.mesh.remove(&k);
            self.note_gone_from_region(k, metrics);
        }
    }

    #[cfg(test)]
    pub fn mesh_route_count(&self) -> usize {
        self.mesh.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::client::Queues;

    fn handle(id: u64, key: u8) -> Arc<ClientHandle> {
        Arc::new(ClientHandle::new(
            id,
            NodePublic::from_bytes([key; 32]),
            "127.0.0.1:1".parse().unwrap(),
            false,
            false,
        ))
    }

    fn control(h: &ClientHandle) -> Vec<Frame> {
        let mut q = Queues::default();
        h.take_queued(&mut q);
        q.control.into_iter().collect()
    }

    #[test]
    fn newest_duplicate_is_active_until_the_other_sends() {
        let m = Metrics::default();
        let mut r = Routes::default();
        let a1 = handle(1, 1);
        let a2 = handle(2, 1);
        let b = handle(3, 2);
        r.register(a1.clone(), &m);
        r.register(a2.clone(), &m);
        r.register(b.clone(), &m);
        let to_a = |r: &mut Routes| match r.route(Some(&b), b.key, a1.key, true) {
            Route::Local(h) => h.id,
            _ => 0,
        };
        assert_eq!(to_a(&mut r), 2);
        // a1 sends: it becomes the active one ("last writer is active").
        r.route(Some(&a1), a1.key, b.key, true);
        assert_eq!(to_a(&mut r), 1);
        // Closing one duplicate tells nobody the key is gone.
        r.unregister(&a1, &m);
        assert_eq!(to_a(&mut r), 2);
        assert!(control(&b).is_empty());
        assert!(!a2.has_dups.load(Ordering::Relaxed));
    }

    #[test]
    fn last_connection_leaving_notifies_those_it_sent_to() {
        let m = Metrics::default();
        let mut r = Routes::default();
        let a = handle(1, 1);
        let b = handle(2, 2);
        let c = handle(3, 3);
        for h in [&a, &b, &c] {
            r.register((*h).clone(), &m);
        }
        r.route(Some(&a), a.key, b.key, true);
        r.unregister(&a, &m);
        assert_eq!(
            control(&b),
            vec![Frame::PeerGone {
                peer: a.key,
                reason: PeerGoneReason::Disconnected
            }]
        );
        assert!(control(&c).is_empty(), "c never received from a");
        assert_eq!(r.connection_count(), 2);
    }

    #[test]
    fn watcher_gets_present_for_existing_and_new_clients_and_gone() {
        let m = Metrics::default();
        let mut r = Routes::default();
        let a = handle(1, 1);
        let w = handle(2, 9);
        r.register(a.clone(), &m);
        r.register(w.clone(), &m);
        r.add_watcher(w.clone(), &m);
        let b = handle(3, 2);
        r.register(b.clone(), &m);
        r.unregister(&a, &m);
        let frames = control(&w);
        assert!(matches!(frames[0], Frame::PeerPresent { peer, .. } if peer == a.key));
        assert!(matches!(frames[1], Frame::PeerPresent { peer, .. } if peer == b.key));
        assert!(
            matches!(frames[2], Frame::PeerGone { peer, reason: PeerGoneReason::Disconnected } if peer == a.key)
        );
        assert_eq!(frames.len(), 3);
    }

    #[test]
    fn mesh_routes_first_wins_and_link_loss_clears_them() {
        let m = Metrics::default();
        let mut r = Routes::default();
        let f1 = Arc::new(MeshForwarder::new(1));
        let f2 = Arc::new(MeshForwarder::new(2));
        let k = NodePublic::from_bytes([7; 32]);
        r.add_mesh_route(k, &f1);
        r.add_mesh_route(k, &f2);
        assert!(matches!(r.route(None, k, k, false), Route::Mesh(f) if f.link_id == 1));
        r.remove_mesh_route(k, 2, &m);
        assert_eq!(r.mesh_route_count(), 1);
        // A local client that received from k over the mesh hears that k is gone.
        let b = handle(5, 5);
        r.register(b.clone(), &m);
        r.route_local(k, b.key);
        r.remove_link_routes(1, &m);
        assert_eq!(r.mesh_route_count(), 0);
        assert_eq!(
            control(&b),
            vec![Frame::PeerGone {
                peer: k,
                reason: PeerGoneReason::Disconnected
            }]
        );
    }
}
