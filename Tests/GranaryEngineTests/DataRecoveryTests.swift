import GranaryEngine
import GranaryMemory
import Foundation
import Granary
import GranaryTestSupport
import Synchronization
import Testing

@Suite("Data recovery")
struct DataRecoveryTests {
    final class Count: Sendable {
        let value = Atomic<Int>(0)
    }

    /// A new backup's reads of the primary fail, the first few times: its copy starts again, so
    /// the region does not stay short of a replica (before, a failed copy ended, the region stayed
    /// marked copying, and only a later configuration change started another).
    @Test("a copy whose reads of the primary fail starts again: every region gets its replicas back, equal to the primary")
    func copyStartsAgainAfterFailedReads() async throws {
        let (cluster, cm) = try await managedTestCluster()
        for node in cluster.nodes {
            _ = try await node.transaction { tx in try (0..<50).map { _ in try tx.allocate(Int64(node.id.index)) } }
        }
        try await cluster.quiesce()
        try await waitForRenewals(cluster, manager: cm)
        // Every node's first four copy reads fail.
        let failed = Count()
        for node in cluster.nodes {
            let mine = Count()
            node.engine.injectFaults { point, _ in
                guard point == .copyRead, mine.value.add(1, ordering: .relaxed).newValue <= 4 else { return false }
                failed.value.add(1, ordering: .relaxed)
                return true
            }
        }
        let victim = cluster.nodes.map(\.id).first { $0 != cm }!
        cluster.crash(victim)
        let clock = ContinuousClock()
        let deadline = clock.now + .seconds(30)
        var configuration = cluster.servingNodes[0].engine.configuration
        while configuration.contains(victim)
            || !configuration.regions.allSatisfy({ $0.replicas.count == 3 && $0.copying.isEmpty }) {
            guard clock.now < deadline else {
                Issue.record("after 30 s, \(failed.value.load(ordering: .relaxed)) failed copy reads: \(configuration)")
                return
            }
            try await Task.sleep(for: .milliseconds(5))
            configuration = cluster.servingNodes[0].engine.configuration
        }
        #expect(failed.value.load(ordering: .relaxed) > 0, "no copy read failed: the test did not test the retry")
        for node in cluster.servingNodes { node.engine.injectFaults(nil) }
        try await cluster.quiesce()
        let differences = replicaDifferences(cluster, in: cluster.servingNodes[0].engine.configuration)
        #expect(differences.isEmpty, "\(differences.joined(separator: "\n"))")
        try await cluster.shutdown()
    }

    /// A node killed while its copy installed an object leaves that object locked in the backup's
    /// file (the lock taken, the payload partly written, the header never published); the copy
    /// that starts again in its next life must replace it. Here the new backups' reads of the
    /// primary are held failing while such cut-short installs are written into them (a locked
    /// header at version 0, as in a fresh file, and a locked header at the primary's version over
    /// a zero payload); then the copies must finish, equal to the primaries, nothing locked.
    /// (Before, the copy took such a lock for a live one and read the object again for ever.)
    @Test("a copy into a backup holding installs a crash cut short (locked headers) replaces them: the copy finishes, equal to the primary, nothing locked")
    func copyReplacesStaleLocks() async throws {
        let (cluster, cm) = try await managedTestCluster()
        var addresses: [GlobalAddress] = []
        for node in cluster.nodes {
            addresses += try await node.transaction { tx in try (0..<50).map { _ in try tx.allocate(Int64(node.id.index)) } }
        }
        try await cluster.quiesce()
        try await waitForRenewals(cluster, manager: cm)
        let holding = Atomic<Bool>(true)
        let failed = Count()
        for node in cluster.nodes {
            node.engine.injectFaults { point, _ in
                guard point == .copyRead, holding.load(ordering: .acquiring) else { return false }
                failed.value.add(1, ordering: .relaxed)
                return true
            }
        }
        let victim = cluster.nodes.map(\.id).first { $0 != cm }!
        cluster.crash(victim)
        var copying: [(region: RegionID, backup: NodeID, primary: NodeID)] = []
        try await eventually("\(victim) removed and new backups placed") {
            let configuration = cluster.servingNodes[0].engine.configuration
            copying = configuration.regions.flatMap { placement in placement.copying.map { (placement.region, $0, placement.primary) } }
            return !configuration.contains(victim) && !copying.isEmpty
                && copying.allSatisfy { cluster.nodes[$0.backup.index].engine.replica(of: $0.region) != nil }
        }
        var stamped = 0
        for (region, backup, primary) in copying {
            let target = cluster.nodes[backup.index].engine.replica(of: region)!
            let source = cluster.nodes[primary.index].engine.replica(of: region)!
            for (index, address) in addresses.enumerated() where address.region == region {
                let version = index % 2 == 0 ? ObjectHeader(rawValue: 0) : ObjectLayout.loadHeader(source.base + Int(address.offset))
                (target.base + Int(address.offset)).storeBytes(of: version.locked.rawValue, as: UInt64.self)
                stamped += 1
            }
        }
        #expect(stamped > 0, "no allocated object lies in a region being copied: \(copying)")
        holding.store(false, ordering: .releasing)
        let deadline = ContinuousClock.now + .seconds(30)
        var configuration = cluster.servingNodes[0].engine.configuration
        while !configuration.regions.allSatisfy({ $0.replicas.count == 3 && $0.copying.isEmpty }) {
            guard ContinuousClock.now < deadline else {
                Issue.record("after 30 s, copies with \(stamped) stale locks written into the backups are not done: \(configuration)")
                try await cluster.shutdown()
                return
            }
            try await Task.sleep(for: .milliseconds(5))
            configuration = cluster.servingNodes[0].engine.configuration
        }
        // (Every copy read failed until the locks were written, so no copy had installed anything
        // before: whether a copy had begun reading by then, counted here, is up to the timing.)
        print("copies with \(stamped) stale locks written: \(failed.value.load(ordering: .relaxed)) copy reads held back")
        for node in cluster.servingNodes { node.engine.injectFaults(nil) }
        try await cluster.quiesce()
        var locked: [String] = []
        for (region, backup, _) in copying {
            let replica = cluster.nodes[backup.index].engine.replica(of: region)!
            for address in addresses where address.region == region && ObjectLayout.loadHeader(replica.base + Int(address.offset)).isLocked {
                locked.append("\(address) on \(backup)")
            }
        }
        #expect(locked.isEmpty, "still locked after the copy: \(locked)")
        let differences = replicaDifferences(cluster, in: configuration)
        #expect(differences.isEmpty, "\(differences.joined(separator: "\n"))")
        try await cluster.shutdown()
    }
}

@Suite("Spare regions in data recovery")
struct SpareRegionRecoveryTests {
    /// FaRM's machines hold their memory before recovery asks for it: a new backup made from a
    /// spare region file (space reserved, pages mapped in) faults no page in while it takes
    /// records and copies. The copies into such backups must still end byte-equal to their
    /// primaries.
    @Test("new backups after a failure are made from the nodes' spare region files (tmpfs), copied, and equal their primaries")
    func newBackupsFromSpares() async throws {
        var template = Array("/dev/shm/granary-spares-XXXXXX".utf8CString)
        try #require(template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) } != nil)
        let directory = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        var options = ClusterOptions()
        options.regionSize = 4 << 20
        options.ringCapacity = 64 << 10
        options.engine.maximumAttempts = 10_000
        var membership = MembershipOptions()
        membership.lease = .milliseconds(10)
        membership.copyPace = .zero
        membership.spareRegions = 2
        options.membership = membership
        let cluster = try await Cluster.local(nodes: 4, replicas: 3, directory: FilePath(directory), options: options)
        try await eventually("a CM") { cluster.membership.contains(where: \.isManager) }
        try await eventually("2 spares ready on each of 4 nodes") { cluster.spareRegionCounts.ready == 8 }
        let cm = cluster.membership.first(where: \.isManager)!.node
        for node in cluster.nodes {
            _ = try await node.transaction { tx in try (0..<200).map { _ in try tx.allocate(Int64(node.id.index) * 1_000_003) } }
        }
        try await cluster.quiesce()
        try await waitForRenewals(cluster, manager: cm)
        let before = cluster.servingNodes[0].engine.configuration
        let victim = cluster.nodes.map(\.id).first { $0 != cm }!
        cluster.crash(victim)
        try await eventually("\(victim) removed and every region back to 3 complete replicas") {
            let configuration = cluster.servingNodes[0].engine.configuration
            return !configuration.contains(victim)
                && configuration.regions.allSatisfy { $0.replicas.count == 3 && $0.copying.isEmpty }
        }
        let after = cluster.servingNodes[0].engine.configuration
        var newReplicas = 0
        for placement in after.regions {
            let earlier = Set(before.regions.first { $0.region == placement.region }?.replicas ?? [])
            newReplicas += placement.replicas.filter { !earlier.contains($0) }.count
        }
        #expect(newReplicas > 0, "the crash of \(victim) left no region short of a replica: the test tested nothing")
        #expect(cluster.spareRegionCounts.taken == newReplicas, "\(newReplicas) new replicas, \(cluster.spareRegionCounts.taken) spares taken")
        try await cluster.quiesce()
        let differences = replicaDifferences(cluster, in: after)
        #expect(differences.isEmpty, "\(differences.joined(separator: "\n"))")
        try await cluster.shutdown()
        let left = (FileManager.default.enumerator(atPath: directory)?.allObjects as? [String] ?? []).filter { $0.contains("spare.") }
        #expect(left.filter { !$0.hasPrefix("n\(victim.index)/") }.isEmpty, "spares left after shutdown: \(left)")
    }
}
