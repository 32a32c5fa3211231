import Granary
import GranaryEngine
import Testing

/// A bounded wait that ran out.
struct WaitTimedOut: Error, CustomStringConvertible {
    let description: String
}

/// Waits (bounded) until `condition` holds; past `timeout` it records an issue naming `what`
/// and throws, so that a test does not go on from a state it did not reach.
func eventually(_ what: String, timeout: Duration = .seconds(60), _ condition: () async throws -> Bool) async throws {
    let deadline = ContinuousClock.now + timeout
    while try await !condition() {
        guard ContinuousClock.now < deadline else {
            Issue.record("timed out after \(timeout) waiting for: \(what)")
            throw WaitTimedOut(description: "timed out waiting for: \(what)")
        }
        try await Task.sleep(for: .milliseconds(2))
    }
}

/// A small embedded cluster for tests: 4 MiB regions, so each test creates little on disk.
func testCluster(nodes: Int = 3, replicas: Int = 3, configure: (inout ClusterOptions) -> Void = { _ in }) async throws -> Cluster {
    var options = ClusterOptions()
    options.regionSize = 4 << 20
    options.ringCapacity = 64 << 10
    options.engine.maximumAttempts = 10_000
    configure(&options)
    return try await Cluster.local(nodes: nodes, replicas: replicas, options: options)
}

/// An embedded test cluster with a configuration manager (10 ms leases, copies unpaced), once a
/// manager is elected; returns the cluster and the manager.
func managedTestCluster(nodes: Int = 4, replicas: Int = 3) async throws -> (Cluster, NodeID) {
    let cluster = try await testCluster(nodes: nodes, replicas: replicas) { options in
        var membership = MembershipOptions()
        membership.lease = .milliseconds(10)
        membership.copyPace = .zero
        options.membership = membership
    }
    try await eventually("a CM") { cluster.membership.contains(where: \.isManager) }
    return (cluster, cluster.membership.first(where: \.isManager)!.node)
}

/// Waits until `manager` has seen every other member renew its lease: before that a member gets
/// a grace period, not a lease, and its failure is detected only when the grace period ends.
func waitForRenewals(_ cluster: Cluster, manager: NodeID) async throws {
    for member in cluster.membership where member.node != manager {
        while !cluster.membership[manager.index].hasSeenRenewing(member.node) { try await Task.sleep(for: .milliseconds(2)) }
    }
}

/// Compares every backup's bytes with its primary's, region by region, as `configuration` (by
/// default the cluster's first) places them; returns the differences.
func replicaDifferences(_ cluster: Cluster, in configuration: Configuration? = nil) -> [String] {
    var differences: [String] = []
    for placement in (configuration ?? cluster.configuration).regions {
        guard let primary = cluster.nodes[placement.primary.index].engine.replica(of: placement.region) else {
            differences.append("\(placement.region): primary \(placement.primary) has no replica")
            continue
        }
        for backup in placement.backups {
            guard let copy = cluster.nodes[backup.index].engine.replica(of: placement.region) else {
                differences.append("\(placement.region): backup \(backup) has no replica")
                continue
            }
            if memcmp(primary.base, copy.base, primary.size) != 0 {
                var offset = 0
                while primary.base.load(fromByteOffset: offset, as: UInt8.self) == copy.base.load(fromByteOffset: offset, as: UInt8.self) {
                    offset += 1
                }
                var differing = 0
                for index in offset..<primary.size where primary.base.load(fromByteOffset: index, as: UInt8.self) != copy.base.load(fromByteOffset: index, as: UInt8.self) {
                    differing += 1
                }
                let line = offset & ~63
                func hex(_ base: UnsafeMutableRawPointer) -> String {
                    (0..<8).map { String(base.load(fromByteOffset: line + 8 * $0, as: UInt64.self), radix: 16) }.joined(separator: " ")
                }
                differences.append("\(placement.region): backup \(backup) first differs from primary \(placement.primary) at offset \(offset) (\(differing) bytes differ); line \(line) primary [\(hex(primary.base))] backup [\(hex(copy.base))]")
            }
        }
    }
    return differences
}

#if canImport(Glibc)
import Glibc
#endif

extension Engine {
    /// For a fault rule: this node's lease "lapses" now (fenced), and `delay` later the CM's grant
    /// comes (a new value in the grant word) and lifts the fence.
    func lapseLease(grantedAgainAfter delay: Duration) {
        setFenced(true)
        Task.detached {
            try? await Task.sleep(for: delay)
            self.leaseGrantWord.pointee.add(1, ordering: .releasing)
            self.setFenced(false)
        }
    }
}
