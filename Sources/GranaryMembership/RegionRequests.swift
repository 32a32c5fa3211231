import Foundation
import GranaryConfiguration
import GranaryCoordination
import GranaryEngine
import GranaryMemory
import GranaryTransport
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Regions on demand with a configuration manager (FaRM: "the CM allocates regions on demand").
///
/// A member whose regions are all full (an allocation found no room) creates an ephemeral child
/// `n<node>` under ``MembershipPaths/regionRequests`` holding how many regions it leads; the CM
/// watches the requests, commits a configuration with one more region led by the requester
/// (backups on the members holding the fewest replicas) unless the requester already leads more
/// regions than it counted, and deletes the request. Members apply a configuration that adds
/// regions through the recovery barrier (``MembershipService/recover(into:removed:)`` with nobody
/// removed): every member creates its replica and routes the region before any commit resumes.
extension MembershipService {
    /// The ``RegionSupplier`` of a member: asks the CM for a region (unless a request of this
    /// node is under way) and waits, briefly, for the configuration to move; the allocation's
    /// attempt then runs again, and waits for the recovery barrier as for any recovery.
    ///
    /// The wait is bounded (250 ms) because the caller may hold a thread of the cooperative pool
    /// that this service's own tasks need: past it, the attempt aborts and is retried, and its
    /// next allocation finds the request pending and waits again.
    func requestRegion() throws {
        guard running.load(ordering: .relaxed), !stoppedServing else { throw CoordinationError.sessionExpired }
        let seen = engine.configuration.id
        if !regionRequestPending.exchange(true, ordering: .acquiringAndReleasing) {
            let led = engine.configuration.regions.filter { $0.primary == node }.count
            spawn {
                defer { self.regionRequestPending.store(false, ordering: .releasing) }
                try await ConfigurationRecord.createIfAbsent(self.paths.regionRequests, [], in: self.store)
                do {
                    _ = try await self.store.create(self.paths.regionRequests + "/\(self.node)", data: Array("\(led)".utf8), mode: .ephemeral)
                    self.logger.info("\(self.node) asked the CM for a region (it leads \(led), all full)")
                } catch CoordinationError.nodeExists {
                    return  // asked already; the CM has not answered yet
                }
            }
        }
        let deadline = monotonicNanoseconds() + 250_000_000
        while engine.configuration.id == seen, monotonicNanoseconds() < deadline, running.load(ordering: .relaxed) {
            usleep(500)
        }
    }
}

extension ConfigurationManager {
    /// As CM: answers region requests (see ``MembershipService/requestRegion()``).
    func watchRegionRequests() async throws {
        try await ConfigurationRecord.createIfAbsent(paths.regionRequests, [], in: store)
        while member.running.load(ordering: .relaxed), member.isManager {
            let (names, watch) = try await store.childrenAndWatch(paths.regionRequests)
            for name in names.sorted() {
                let path = paths.regionRequests + "/" + name
                let data = try? await store.get(path).data
                guard let requester = MembershipPaths.node(named: name),
                      let data, let led = Int(String(decoding: data, as: UTF8.self)) else {
                    logger.warning("\(node) ignored a region request it cannot read: \(path)")
                    try? await store.delete(path, expectedVersion: nil)
                    continue
                }
                do {
                    let committed = try await ConfigurationRecord.change(engine.configuration.cluster, in: store) { current in
                        // A request answered already (its node leads more regions than it counted).
                        guard current.contains(requester), current.regions.filter({ $0.primary == requester }).count <= led else { return nil }
                        var next = current
                        next.regions.append(try current.placingNewRegion(primary: requester))
                        next.manager = self.node
                        return next
                    }
                    try? await store.delete(path, expectedVersion: nil)
                    if let committed, let added = committed.regions.last {
                        logger.info("\(node) added region \(added.region) on demand for \(requester) in \(committed.id): backups \(added.backups)")
                        try await apply(committed)
                        announce(committed.id)
                    }
                } catch {
                    // No region id left, or a store failure: the requester's allocations fail
                    // with outOfMemory once their attempts run out; the request is dropped.
                    logger.warning("\(node) could not add a region for \(requester): \(error)")
                    try? await store.delete(path, expectedVersion: nil)
                }
            }
            if await watch.event() == .sessionEnded { return }
        }
    }
}
