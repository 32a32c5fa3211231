import Foundation
@testable import Granary
import GranaryEngine
import GranaryTestSupport
import Testing

/// FaRM's regions on demand: a cluster's capacity is not fixed when it is created.
@Suite("Regions on demand", .serialized)
struct RegionsOnDemandTests {
    func options() -> ClusterOptions {
        var options = ClusterOptions()
        options.regionSize = 1 << 20
        options.regionsPerNode = 1
        options.ringCapacity = 64 << 10
        options.engine.maximumAttempts = 10_000
        options.logger.logLevel = .error
        return options
    }

    /// An object of 200 bytes that names itself: its node, its number, and a byte pattern.
    static func payload(node: Int, index: Int) -> [UInt8] {
        var bytes = [UInt8](repeating: UInt8(truncatingIfNeeded: node &* 31 &+ index), count: 200)
        withUnsafeBytes(of: Int64(node << 32 | index).littleEndian) { bytes.replaceSubrange(0..<8, with: $0) }
        return bytes
    }

    /// Every node allocates `perNode` objects (``payload(node:index:)``), `batch` per
    /// transaction, all nodes at once; returns each node's addresses in order.
    static func fill(_ cluster: Cluster, perNode: Int, batch: Int) async throws -> [Int: [GlobalAddress]] {
        try await withThrowingTaskGroup(of: (Int, [GlobalAddress]).self) { group in
            for node in cluster.nodes {
                group.addTask {
                    var addresses: [GlobalAddress] = []
                    for start in stride(from: 0, to: perNode, by: batch) {
                        addresses += try await node.transaction { tx in
                            try (start..<start + batch).map { try tx.allocate(bytes: payload(node: node.id.index, index: $0)) }
                        }
                    }
                    return (node.id.index, addresses)
                }
            }
            var all: [Int: [GlobalAddress]] = [:]
            for try await (node, addresses) in group { all[node] = addresses }
            return all
        }
    }

    @Test("nodes that fill their regions concurrently get new ones: every object reads back on every node, the new regions are replicated, balanced and equal on every replica, and a reopen finds them")
    func regionsGrowAndReopen() async throws {
        let tmp = TemporaryDirectory("granary-regions")
        defer { tmp.remove() }
        let directory = tmp.path.appending("cluster")
        let cluster = try await Cluster.local(nodes: 3, replicas: 2, directory: directory, options: options())
        let startingRegions = cluster.configuration.regions.count
        // About 4 MiB of objects per node against 1 MiB of region each: three or more new
        // regions per node, requested while the other nodes allocate too.
        let perNode = 20_000, batch = 40
        let addresses = try await Self.fill(cluster, perNode: perNode, batch: batch)
        let configuration = cluster.configuration
        print("regions on demand: \(startingRegions) regions at the start, \(configuration.regions.count) after \(3 * perNode) objects (\(configuration.id))")
        #expect(configuration.regions.count >= startingRegions + 9,
                "\(perNode) objects of 200 bytes per node in 1 MiB regions added only \(configuration.regions.count - startingRegions) regions: \(configuration)")
        for placement in configuration.regions {
            #expect(placement.replicas.count == 2 && Set(placement.replicas).count == 2, "\(placement) is not 2 distinct replicas")
        }
        var held: [NodeID: Int] = [:]
        for placement in configuration.regions { for node in placement.replicas { held[node, default: 0] += 1 } }
        #expect((held.values.max() ?? 0) - (held.values.min() ?? 0) <= 2, "replicas per node are not balanced: \(held)")
        for engine in cluster.nodes.map(\.engine) {
            #expect(engine.configuration.id == configuration.id, "\(engine.node) is in \(engine.configuration.id), the cluster in \(configuration.id)")
        }
        // Every object, read on another node than the one that allocated it.
        var wrong: [String] = []
        for (node, list) in addresses {
            let reader = cluster.nodes[(node + 1) % 3]
            for start in stride(from: 0, to: list.count, by: 500) {
                let chunk = Array(list[start..<min(start + 500, list.count)])
                let values = try await reader.transaction { tx in try chunk.map { try tx.read($0) } }
                for (offset, value) in values.enumerated() where value != Self.payload(node: node, index: start + offset) {
                    wrong.append("object \(start + offset) of n\(node) at \(chunk[offset])")
                }
            }
        }
        #expect(wrong.isEmpty, "\(wrong.count) objects read back wrong, first: \(wrong.prefix(5))")
        try await cluster.quiesce()
        let differences = replicaDifferences(cluster)
        #expect(differences.isEmpty, "replicas differ: \(differences.prefix(3))")
        try await cluster.shutdown()

        let manifest = try JSONDecoder().decode(Configuration.self, from: Data(contentsOf: URL(fileURLWithPath: directory.appending("cluster.json").string)))
        #expect(manifest.regions == configuration.regions, "cluster.json does not hold the regions added")
        let reopened = try await Cluster.local(nodes: 3, replicas: 2, directory: directory, options: options())
        #expect(reopened.configuration.regions == configuration.regions)
        var missing = 0
        for (node, list) in addresses {
            let sample = stride(from: 0, to: list.count, by: 97).map { ($0, list[$0]) }
            let values = try await reopened.nodes[node].transaction { tx in try sample.map { try tx.read($0.1) } }
            for (offset, value) in values.enumerated() where value != Self.payload(node: node, index: sample[offset].0) { missing += 1 }
        }
        #expect(missing == 0, "\(missing) objects read back wrong after the reopen")
        // The reopened cluster goes on adding regions where it left off.
        for _ in 0..<150 {
            _ = try await reopened.nodes[2].transaction { tx in
                try (0..<40).map { try tx.allocate(bytes: Self.payload(node: 9, index: $0)) }.count
            }
        }
        #expect(reopened.configuration.regions.count > configuration.regions.count, "no region added after the reopen")
        try await reopened.shutdown()
    }

    @Test("a new region's backups go to the members holding the fewest replicas; past the last region id the request is refused naming why")
    func placement() throws {
        let nodes = (0..<4).map { NodeID($0) }
        var configuration = try Configuration(
            id: ConfigurationID(rawValue: 1), cluster: ClusterID.random(),
            members: nodes.map { Member(node: $0, endpoint: "shm:\($0)") },
            regions: [RegionPlacement(region: RegionID(rawValue: 1), primary: nodes[0], backups: [nodes[1], nodes[2]]),
                      RegionPlacement(region: RegionID(rawValue: 2), primary: nodes[1], backups: [nodes[2], nodes[0]])],
            regionSize: 1 << 20)
        let next = try configuration.placingNewRegion(primary: nodes[0])
        #expect(next.region == RegionID(rawValue: 3))
        #expect(next.primary == nodes[0])
        // n3 holds nothing, n1 one replica fewer than n2 (which holds two).
        #expect(next.backups == [nodes[3], nodes[1]], "backups \(next.backups)")
        configuration.regions[1].region = RegionID(rawValue: UInt32(RegionID.limit - 1))
        do {
            _ = try configuration.placingNewRegion(primary: nodes[2])
            Issue.record("a region id of \(RegionID.limit) was handed out")
        } catch {
            #expect("\(error)".contains("every region id in use"), "\(error)")
        }
    }

    @Test("with a configuration manager the CM adds the regions: nodes filling theirs at once get new ones through the recovery barrier, every object reads back, every member is in the same configuration, replicas equal")
    func addedThroughConfigurationManager() async throws {
        var options = options()
        // 50 ms leases: this test is about regions added through the CM, not failure detection.
        // With 10 ms, a lease lapsed once under the fill on the 2-core CI host (fenced, a commit
        // reported `outcomeUnknown`, which the fill cannot take; CI of 366c1e3).
        var membership = MembershipOptions()
        membership.lease = .milliseconds(50)
        options.membership = membership
        let cluster = try await Cluster.local(nodes: 3, replicas: 3, options: options)
        let starting = cluster.nodes[0].engine.configuration
        let perNode = 8_000, batch = 40
        let addresses = try await Self.fill(cluster, perNode: perNode, batch: batch)
        let configuration = cluster.nodes[0].engine.configuration
        print("regions on demand through the CM: \(starting.regions.count) regions at the start, \(configuration.regions.count) after \(3 * perNode) objects (\(configuration.id))")
        #expect(configuration.regions.count >= starting.regions.count + 3, "no region added through the CM: \(configuration)")
        #expect(configuration.members.map(\.node) == starting.members.map(\.node), "members changed: \(configuration)")
        try await eventually("every member in \(configuration.id)", timeout: .seconds(10)) {
            cluster.nodes.allSatisfy { $0.engine.configuration.id == configuration.id }
        }
        for placement in configuration.regions {
            #expect(Set(placement.replicas).count == 3, "\(placement) is not 3 distinct replicas")
        }
        var wrong = 0
        for (node, list) in addresses {
            for start in stride(from: 0, to: list.count, by: 400) {
                let chunk = Array(list[start..<min(start + 400, list.count)])
                let values = try await cluster.nodes[(node + 2) % 3].transaction { tx in try chunk.map { try tx.read($0) } }
                for (offset, value) in values.enumerated() where value != Self.payload(node: node, index: start + offset) { wrong += 1 }
            }
        }
        #expect(wrong == 0, "\(wrong) objects read back wrong")
        try await cluster.quiesce()
        let differences = replicaDifferences(cluster, in: configuration)
        #expect(differences.isEmpty, "replicas differ: \(differences.prefix(3))")
        try await cluster.shutdown()
    }

    @Test("a node whose cluster supplies no regions (node processes on a static configuration) fails a full allocation with outOfMemory saying why")
    func noSupplier() async throws {
        let cluster = try await Cluster.local(nodes: 3, replicas: 3, options: options())
        for node in cluster.nodes { node.engine.supplyRegions(with: nil) }
        var failure: (any Error)?
        var allocated = 0
        while allocated < 40_000, failure == nil {
            do {
                allocated += try await cluster.nodes[0].transaction { tx in
                    try (0..<40).map { try tx.allocate(bytes: Self.payload(node: 0, index: $0)) }.count
                }
            } catch {
                failure = error
            }
        }
        guard case .outOfMemory(_, let reason)? = failure as? TransactionError else {
            Issue.record("after \(allocated) objects: \(String(describing: failure))")
            try await cluster.shutdown()
            return
        }
        #expect(reason.contains("adds no regions on demand") && reason.contains("no free slot"), "\(reason)")
        #expect(cluster.configuration.regions.count == 3)
        try await cluster.shutdown()
    }
}
