import Foundation
import GranaryConfiguration
import GranaryCoordination
import GranaryEngine
import GranaryMemory
import GranaryTransport
import Logging
import Synchronization

/// Tunables of a node's membership service.
public struct MembershipOptions: Sendable {
    /// The lease between the configuration manager (CM) and every node, both ways.
    public var lease: Duration = .milliseconds(10)
    /// Renewals per lease period (FaRM renews every fifth of a lease).
    public var renewalsPerLease: Int = 5
    /// The time between two renewals: a lease over ``renewalsPerLease``, in nanoseconds.
    package var renewalIntervalNanoseconds: UInt64 { lease.wholeNanoseconds / UInt64(max(1, renewalsPerLease)) }
    /// Leases of silence beyond the first before the CM suspects a member. 0 (the default)
    /// suspects at the first expiry, as FaRM does: with renewals every fifth of a lease from a
    /// real-time thread, five in a row must be missed. The probe that follows removes, with the
    /// suspect, every member silent for more than a lease.
    public var probeLeases: Int = 0
    /// The silence after which the CM suspects a member: ``lease`` times (1 + ``probeLeases``), in
    /// nanoseconds.
    package var expiryNanoseconds: UInt64 { lease.wholeNanoseconds * UInt64(1 + probeLeases) }
    /// Data recovery's pacing: after copying each slab (64 KiB by default) of a region to a new
    /// backup, a random wait of up to twice the longer of this and 19 times the slab's own work (a
    /// copy takes at most about 5% of a core), so that foreground throughput holds. Zero: no wait.
    public var copyPace: Duration = .milliseconds(4)
    /// Spare region files each node keeps ready for replicas placed on it while it serves (a new
    /// backup after a failure, a region added on demand): their space reserved and their pages
    /// mapped in beforehand (`SpareRegion`), so that a new replica faults no page in while
    /// recovery and the foreground need the CPU. Each costs a region's size of memory (or disk);
    /// 0 makes new replicas sparse files. A spare taken is made again once the node has taken
    /// none for a second, paced.
    public var spareRegions: Int = 2
    /// Whether a lease thread whose peers share its host (shared memory) excuses
    /// a peer's silence while one of the host's CPUs was paused for more than half an expiry (the
    /// hypervisor ran another guest on it, or the kernel held it): a witness thread pinned to each
    /// CPU notes when it runs, and the CM restarts its members' clocks after such a pause, as
    /// after a pause of its own, instead of removing live nodes. A failed node is then suspected
    /// one expiry after the last pause. Off: only the lease thread's own pauses are excused. No
    /// effect over RDMA verbs.
    public var excusesHostPauses: Bool = true
    /// The defaults: a 10 ms lease renewed 5 times per lease, suspicion at the first expiry, a
    /// copy pace of 4 ms, 2 spare regions per node, host pauses excused.
    public init() {}
}

/// Where things live in the coordination store, under `/granary/<cluster>`.
package struct MembershipPaths: Sendable {
    package let root: String
    package init(cluster: ClusterID) { root = "/granary/\(cluster)" }
    package var configuration: String { root + "/configuration" }
    package var election: String { root + "/election" }
    package var members: String { root + "/members" }
    /// A member whose regions are full asks the CM for one here (an ephemeral child per node).
    package var regionRequests: String { root + "/region-requests" }
    /// Where the members of configuration `id` meet during its transaction-state recovery.
    package func recovery(_ id: ConfigurationID) -> String { root + "/recovery/\(id.rawValue)" }
    /// The node a child of ``members`` or ``regionRequests`` is named after (`n<id>`, as
    /// `NodeID` prints), or nil for a name that is not one.
    package static func node(named name: String) -> NodeID? {
        guard name.hasPrefix("n"), let raw = UInt16(name.dropFirst()), raw < UInt16(NodeID.limit) else { return nil }
        return NodeID(rawValue: raw)
    }
}

/// Stores and reads the configuration in the coordination store: JSON at `paths.configuration`,
/// changed only by compare-and-set, its id increasing by one each time.
package enum ConfigurationRecord {
    package static func encode(_ configuration: Configuration) -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return Array(try! encoder.encode(configuration))
    }

    package static func decode(_ bytes: [UInt8]) throws -> Configuration {
        try JSONDecoder().decode(Configuration.self, from: Data(bytes))
    }

    /// Creates the cluster's nodes in the store with `initial` unless a configuration is there
    /// already (which is kept). Returns the stored configuration.
    @discardableResult
    package static func bootstrap(_ initial: Configuration, in store: any CoordinationStore) async throws -> Configuration {
        let paths = MembershipPaths(cluster: initial.cluster)
        try await store.createParents(paths.root)
        for path in [paths.election, paths.members, paths.regionRequests] { try await createIfAbsent(path, [], in: store) }
        try await createIfAbsent(paths.configuration, encode(initial), in: store)
        return try decode(try await store.get(paths.configuration).data)
    }

    /// The stored configuration of `cluster`.
    package static func read(_ cluster: ClusterID, from store: any CoordinationStore) async throws -> (Configuration, Int32) {
        let stored = try await store.get(MembershipPaths(cluster: cluster).configuration)
        return (try decode(stored.data), stored.version)
    }

    /// Replaces the configuration by `change(current)` with compare-and-set, the id one higher,
    /// retrying when another writer won. Returns the committed configuration, or nil if `change`
    /// declined.
    ///
    /// The committed configuration states its ``Configuration/routingEpoch`` (unless `change`
    /// set one itself): `current`'s when the routing is kept, its own id when it changes. Members
    /// take records stamped with any configuration of that epoch, so a restart's recovery must
    /// read them from the logs too: without it, records sent before a change that kept the
    /// routing (a client joining, a copy completed, a new manager) were refused at a whole-cluster
    /// restart, leaving their locks held and their commits not rolled forward.
    package static func change(_ cluster: ClusterID, in store: any CoordinationStore,
                              _ change: (Configuration) throws -> Configuration?) async throws -> Configuration? {
        let path = MembershipPaths(cluster: cluster).configuration
        while true {
            let stored = try await store.get(path)
            let current = try decode(stored.data)
            guard var next = try change(current) else { return nil }
            next.id = current.id.next
            if next.routingEpoch == current.routingEpoch {
                next.routingEpoch = current.keepsRouting(in: next) ? current.routingEpoch ?? current.id : next.id
            }
            try next.validate()
            if try await set(path, encode(next), expectedVersion: stored.version, in: store) { return next }
        }
    }

    /// The stored configuration of `stored.cluster` once it no longer lists `node`: a process
    /// started again as `node` (a node process, or a client) waits for this before it joins,
    /// since its former self may have had transactions in flight, which the members recover
    /// once the CM removes it (when its lease has run out).
    ///
    /// - Throws: ``RecoveryError`` if no configuration without `node` is committed within
    ///   `timeout` (no configuration manager runs to remove it).
    package static func waitForRemoval(of node: NodeID, from stored: Configuration, in store: any CoordinationStore,
                                       timeout: Duration = .seconds(60)) async throws -> Configuration {
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        var current = stored
        while current.contains(node) {
            guard clock.now < deadline else {
                throw RecoveryError(description: "\(node) started again, but \(current.id) of \(stored.cluster) still lists it and no configuration manager removed it within \(timeout) (a cluster whose every member stopped starts again with `granary cluster up --coordination`, which recovers it first)")
            }
            try await Task.sleep(for: .milliseconds(20))
            current = try await read(stored.cluster, from: store).0
        }
        return current
    }

    /// Creates a persistent node unless it exists.
    static func createIfAbsent(_ path: String, _ data: [UInt8], in store: any CoordinationStore) async throws(CoordinationError) {
        do {
            _ = try await store.create(path, data: data, mode: .persistent)
        } catch .nodeExists {
            return
        }
    }

    /// Compare-and-set; false when another writer got there first.
    static func set(_ path: String, _ data: [UInt8], expectedVersion: Int32, in store: any CoordinationStore) async throws(CoordinationError) -> Bool {
        do {
            try await store.set(path, data: data, expectedVersion: expectedVersion)
            return true
        } catch .badVersion {
            return false
        }
    }

    /// `configuration` without `node`: regions it led get their first backup promoted; it leaves
    /// every backup list. Regions left with fewer replicas are under-replicated (see
    /// ``underReplicated(_:replicas:)``).
    /// `configuration` without the `suspects` that can go: one holding the last replica of a
    /// region stays (`kept`), since removing it would drop the region and its data.
    package static func removingSuspects(_ suspects: some Sequence<NodeID>, from configuration: Configuration) -> (next: Configuration, kept: [NodeID]) {
        var next = configuration
        var kept: [NodeID] = []
        for suspect in suspects.sorted() where next.contains(suspect) {
            let without = removing(suspect, from: next)
            if without.regions.count < next.regions.count { kept.append(suspect) } else { next = without }
        }
        return (next, kept)
    }

    package static func removing(_ node: NodeID, from configuration: Configuration) -> Configuration {
        var next = configuration
        next.members.removeAll { $0.node == node }
        next.regions = configuration.regions.compactMap { placement in
            var placement = placement
            placement.backups.removeAll { $0 == node }
            placement.copying.removeAll { $0 == node }
            if placement.primary == node {
                // The first backup whose copy is complete; none: the region is lost.
                guard let promoted = placement.completeBackups.first else { return nil }
                placement.backups.removeAll { $0 == promoted }
                placement.primary = promoted
            }
            return placement
        }
        if next.manager == node { next.manager = nil }
        return next
    }

    /// `configuration` with a new backup for every region below `replicas` replicas (FaRM's data
    /// recovery): on the members holding the fewest replicas, never two of one region on a node,
    /// each marked as copying until it has copied the region from its primary.
    ///
    /// Records `replicas` as the configuration's ``Configuration/replication``, so that regions
    /// left short by this change are brought back to it when nodes join later.
    package static func replenishing(_ configuration: Configuration, replicas: Int) -> Configuration {
        var next = configuration
        next.replication = replicas
        let nodes = configuration.servers
        for index in next.regions.indices where next.regions[index].replicas.count < replicas {
            let held = Dictionary(grouping: next.regions.flatMap(\.replicas), by: { $0 }).mapValues(\.count)
            let candidates = nodes.filter { !next.regions[index].replicas.contains($0) }
                .sorted { (held[$0] ?? 0, $0) < (held[$1] ?? 0, $1) }
            for node in candidates.prefix(replicas - next.regions[index].replicas.count) {
                next.regions[index].backups.append(node)
                next.regions[index].copying.append(node)
            }
        }
        return next
    }

    /// The replication the cluster keeps: the configuration's ``Configuration/replication``, else
    /// the most replicas any region of `configuration` has.
    package static func replication(of configuration: Configuration) -> Int {
        configuration.replication ?? configuration.regions.map(\.replicas.count).max() ?? 1
    }

    /// Regions with fewer than `replicas` replicas, for re-replication.
    package static func underReplicated(_ configuration: Configuration, replicas: Int) -> [RegionID] {
        configuration.regions.filter { $0.replicas.count < replicas }.map(\.region)
    }

    /// `count` new regions placed on the members: each primary on the node leading the fewest
    /// regions, backups on the nodes holding the fewest replicas (``Configuration/placingNewRegion(primary:replicas:)``),
    /// all replicas on distinct nodes.
    package static func placingNewRegions(_ count: Int, replicas: Int, in configuration: Configuration) throws -> Configuration {
        var next = configuration
        let nodes = configuration.servers
        guard replicas <= nodes.count else {
            throw ConfigurationError.invalid("\(replicas) replicas need \(replicas) members, the configuration has \(nodes.count)")
        }
        for _ in 0..<count {
            let led = Dictionary(grouping: next.regions, by: \.primary).mapValues(\.count)
            let held = Dictionary(grouping: next.regions.flatMap(\.replicas), by: { $0 }).mapValues(\.count)
            let primary = nodes.min { (led[$0] ?? 0, held[$0] ?? 0, $0) < (led[$1] ?? 0, held[$1] ?? 0, $1) }!
            next.regions.append(try next.placingNewRegion(primary: primary, replicas: replicas))
        }
        return next
    }
}
