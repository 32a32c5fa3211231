import Foundation
import Granary
import GranaryTestSupport
import Testing

/// The configuration manager over the embedded coordination store, nodes in this process.
@Suite("Membership: embedded store")
struct MembershipTests {
    /// A renewal that waits for a file system (ext4: the journal, after writeback) looks like a
    /// dead node: the lease words are in each node's lease page, which no file backs.
    @Test("every member renews its lease in its lease page, a memory file linked from its directory, and the CM's grants arrive there")
    func leaseWordsInLeasePage() async throws {
        let cluster = try await self.cluster()
        try await eventually("a CM") { cluster.membership.contains { $0.isManager } }
        for node in cluster.nodes {
            let page = node.engine.leasePage
            #expect(page.id == .leasePage(of: node.id) && page.kind == .leasePage)
            let link = Region.linkTarget(page.path) ?? ""
            #expect(link.hasPrefix("/proc/\(getpid())/fd/"), "\(page.path) links to '\(link)'")
            let words = (page.base + LeaseWords.counterOffset).assumingMemoryBound(to: UInt64.self)
            let (renewal, grant) = (words[0], words[1])
            try await Task.sleep(for: .milliseconds(50))
            #expect(words[0] > renewal, "\(node.id)'s lease counter stayed at \(renewal)")
            if !(cluster.membership.first { $0.node == node.id }?.isManager ?? true) {
                #expect(words[1] != grant, "\(node.id) got no grant in 50 ms (grant word \(grant))")
            }
        }
        try await cluster.shutdown()
    }

    /// `Cluster.abandon()` crashes every membership service, one that was stopped before too (a
    /// node that rejoined leaves its former service stopped): each lease thread is joined once.
    /// (`stop()` joined it and left it to be joined again by `crash()`: a benchmark whose run failed
    /// after a false suspicion crashed in `pthread_join` while abandoning its cluster.)
    @Test("a membership service stopped and then crashed, as Cluster.abandon() crashes every service, joins its lease thread once")
    func stopThenCrash() async throws {
        let cluster = try await self.cluster()
        try await eventually("a CM") { cluster.membership.contains { $0.isManager } }
        for service in cluster.membership {
            #expect(service.holdsLeaseThread, "\(service.node) started no lease thread")
            await service.stop()
            #expect(!service.holdsLeaseThread, "\(service.node) joined its lease thread in stop() and kept its handle: crash() joins it again")
        }
        cluster.abandon()
    }

    func cluster(lease: Duration = .milliseconds(10)) async throws -> Cluster {
        try await testCluster { options in
            var membership = MembershipOptions()
            membership.lease = lease
            options.membership = membership
        }
    }

    @Test("two members fall silent that hold both replicas of a region: the CM never removes the last one, so the region is never dropped from the configuration and its objects stay readable")
    func lastReplicaKept() async throws {
        let cluster = try await testCluster(nodes: 3, replicas: 2) { options in
            var membership = MembershipOptions()
            membership.lease = .milliseconds(10)
            options.membership = membership
        }
        let store = cluster.coordination!.session()
        try await eventually("a CM") { cluster.membership.contains { $0.isManager } }
        let cm = cluster.membership.first(where: \.isManager)!.node
        let others = cluster.nodes.map(\.id).filter { $0 != cm }
        var accounts: [GlobalAddress] = []
        for node in cluster.nodes { accounts += try await node.transaction { tx in try (0..<10).map { _ in try tx.allocate(Int64(7)) } } }
        try await cluster.quiesce()
        let (before, _) = try await ConfigurationRecord.read(cluster.configuration.cluster, from: store)
        let shared = before.regions.filter { Set($0.replicas) == Set(others) }.map(\.region)
        #expect(!shared.isEmpty, "no region has both replicas on \(others): \(before)")
        for node in others {
            try await eventually("the CM saw \(node) renew") { cluster.membership[cm.index].hasSeenRenewing(node) }
        }
        // Both fall silent at once. The one the CM may remove goes; the other holds the last
        // replica of a region until the region has another (on shared memory a silent node's
        // memory stays readable, so data recovery can copy from it; then it goes too).
        for node in others { cluster.membership[node.index].haltLeases() }
        try await eventually("one of \(others) removed") {
            let (now, _) = try await ConfigurationRecord.read(cluster.configuration.cluster, from: store)
            return others.contains { !now.contains($0) }
        }
        var seen: [ConfigurationID] = []
        let deadline = ContinuousClock.now + .seconds(2)
        while ContinuousClock.now < deadline {
            let (now, _) = try await ConfigurationRecord.read(cluster.configuration.cluster, from: store)
            if seen.last != now.id {
                seen.append(now.id)
                for region in before.regions.map(\.region) {
                    #expect(now.placement(of: region) != nil, "\(region) was dropped in \(now) with its last replica")
                }
            }
            try await Task.sleep(for: .milliseconds(2))
        }
        // Every object, those of the shared regions too, is still there.
        let survivor = cluster.nodes[cm.index]
        try await eventually("\(cm) in the newest configuration") {
            let (now, _) = try await ConfigurationRecord.read(cluster.configuration.cluster, from: store)
            return survivor.engine.configuration.id >= now.id
        }
        let values = try await survivor.transaction { tx in try accounts.map { try tx.read($0, as: Int64.self) } }
        #expect(values.allSatisfy { $0 == 7 }, "values after the removals: \(values)")
        #expect(accounts.contains { shared.contains($0.region) })
    }

    @Test("one CM is elected; a silent node is removed within a bounded time, its regions' backups promoted; ids only increase")
    func silentNodeRemoved() async throws {
        let cluster = try await cluster()
        let store = cluster.coordination!.session()
        try await eventually("a CM") { cluster.membership.contains { $0.isManager } }
        #expect(cluster.membership.filter(\.isManager).count == 1)
        let cm = cluster.membership.first(where: \.isManager)!.node
        // Money in every region before the failure.
        var accounts: [GlobalAddress] = []
        for node in cluster.nodes { accounts += try await node.transaction { tx in try (0..<20).map { _ in try tx.allocate(Int64(100)) } } }
        let all = accounts
        try await cluster.quiesce()
        let (before, _) = try await ConfigurationRecord.read(cluster.configuration.cluster, from: store)
        let victim = cluster.nodes.first { $0.id != cm }!.id
        let led = before.regions.filter { $0.primary == victim }.map(\.region)
        // The bound is for a member the CM has seen renewing; before that a starting member has
        // a grace period (2 s), and halting it then measures the grace, not the lease.
        try await eventually("the CM saw \(victim) renew") { cluster.membership[cm.index].hasSeenRenewing(victim) }
        let halted = ContinuousClock.now
        cluster.membership[victim.index].haltLeases()
        var removedAfter: Duration = .zero
        try await eventually("\(victim) removed") {
            let (now, _) = try await ConfigurationRecord.read(cluster.configuration.cluster, from: store)
            if !now.contains(victim) { removedAfter = ContinuousClock.now - halted }
            return !now.contains(victim)
        }
        print("membership: \(victim) removed \(removedAfter) after its lease thread stopped (lease 10 ms)")
        #expect(removedAfter < .seconds(2), "removal took \(removedAfter)")
        let (after, _) = try await ConfigurationRecord.read(cluster.configuration.cluster, from: store)
        #expect(after.id > before.id, "configuration id went from \(before.id) to \(after.id)")
        #expect(after.manager == cm)
        for region in led {
            let placement = after.placement(of: region)
            #expect(placement != nil && placement!.primary != victim && !placement!.replicas.contains(victim), "\(region): \(String(describing: placement))")
        }
        #expect(ConfigurationRecord.underReplicated(after, replicas: 3).sorted() == after.regions.map(\.region).sorted())
        // The survivors move to the new configuration and keep serving every account.
        let survivors = cluster.nodes.filter { $0.id != victim }
        try await eventually("survivors in \(after.id)") { survivors.allSatisfy { $0.engine.configuration.id >= after.id } }
        let total = try await survivors[0].transaction { tx in try all.map { try tx.read($0, as: Int64.self) }.reduce(0, +) }
        #expect(total == 100 * Int64(all.count))
        try await survivors[1].transaction { tx in
            try tx.write(all[0], try tx.read(all[0], as: Int64.self) - 1)
            try tx.write(all[1], try tx.read(all[1], as: Int64.self) + 1)
        }
        // The removed node still believes in the old configuration: everything it tries to commit
        // is refused, and nothing it does changes data.
        // (It is fenced as soon as it reads the new configuration: then it refuses to start.)
        let stale = cluster.nodes[victim.index]
        do {
            let outcome = try stale.engine.attempt(stale.engine.makeTransaction()) { tx in try tx.write(all[2], Int64(1_000_000)) }
            guard case .aborted(let cause) = outcome else {
                Issue.record("the removed node committed a write")
                return
            }
            #expect(cause == .wrongConfiguration || cause == .invalidObject, "refused with \(cause)")
        } catch TransactionError.shutDown(let node) {
            #expect(node == victim)
        }
        let final = try await survivors[0].transaction { tx in try all.map { try tx.read($0, as: Int64.self) }.reduce(0, +) }
        #expect(final == 100 * Int64(all.count), "the removed node changed data: total \(final)")
        // Its configuration watch still runs: it learns that it was removed and must rejoin.
        try await eventually("\(victim) learns it must rejoin") { cluster.membership[victim.index].mustRejoin }
        await store.close()
        try await cluster.shutdown()
    }

    @Test("when the CM's session ends, the next candidate becomes CM and removes it")
    func managerFailover() async throws {
        let cluster = try await cluster()
        let store = cluster.coordination!.session()
        try await eventually("a CM") { cluster.membership.contains { $0.isManager } }
        let old = cluster.membership.first(where: \.isManager)!
        let (before, _) = try await ConfigurationRecord.read(cluster.configuration.cluster, from: store)
        await old.stop()  // its election and registration nodes go with its session
        try await eventually("a new CM") { cluster.membership.contains { $0.isManager && $0.node != old.node } }
        try await eventually("old CM removed") {
            let (now, _) = try await ConfigurationRecord.read(cluster.configuration.cluster, from: store)
            return !now.contains(old.node) && now.manager != nil && now.manager != old.node
        }
        let (after, _) = try await ConfigurationRecord.read(cluster.configuration.cluster, from: store)
        #expect(after.id > before.id)
        await store.close()
        try await cluster.shutdown()
    }

    @Test("new regions are placed on distinct nodes, balanced")
    func placement() throws {
        let nodes = (0..<4).map { NodeID($0) }
        var configuration = try Configuration(id: ConfigurationID(rawValue: 1), cluster: ClusterID(rawValue: 1),
                                              members: nodes.map { Member(node: $0, endpoint: "shm:/x/\($0)") }, regions: [], regionSize: 1 << 20)
        configuration = try ConfigurationRecord.placingNewRegions(8, replicas: 3, in: configuration)
        let led = Dictionary(grouping: configuration.regions, by: \.primary).mapValues(\.count)
        let held = Dictionary(grouping: configuration.regions.flatMap(\.replicas), by: { $0 }).mapValues(\.count)
        #expect(led.values.sorted() == [2, 2, 2, 2], "primaries \(led)")
        #expect(held.values.sorted() == [6, 6, 6, 6], "replicas \(held)")
        for placement in configuration.regions { #expect(Set(placement.replicas).count == 3) }
        #expect(throws: ConfigurationError.self) { try ConfigurationRecord.placingNewRegions(1, replicas: 5, in: configuration) }
    }

    @Test("keepsRouting: a new manager or an added region keeps the routing; a member leaving, a region dropped, or a region's primary or backups changed does not")
    func keepsRouting() throws {
        let nodes = (0..<3).map { NodeID($0) }
        let members = nodes.map { Member(node: $0, endpoint: "shm:/x/\($0)") }
        let regions = try Configuration.balancedPlacement(nodes: nodes, regionsPerNode: 1, replicas: 2)
        func configuration(_ id: UInt64, members: [Member] = members, manager: NodeID? = nil, regions: [RegionPlacement] = regions) throws -> Configuration {
            try Configuration(id: ConfigurationID(rawValue: id), cluster: ClusterID(rawValue: 1), members: members, manager: manager,
                              regions: regions, regionSize: 1 << 20)
        }
        let base = try configuration(1)
        #expect(base.keepsRouting(in: try configuration(2, manager: NodeID(1))))
        let added = RegionPlacement(region: RegionID(rawValue: 99), primary: NodeID(0), backups: [NodeID(2)])
        #expect(base.keepsRouting(in: try configuration(2, regions: regions + [added])))
        // A region dropped (its records in flight would name a region the next configuration lacks).
        #expect(!base.keepsRouting(in: try configuration(2, regions: Array(regions.dropFirst()))), "\(regions.first!) dropped")
        var moved = regions
        moved[0] = RegionPlacement(region: moved[0].region, primary: moved[0].backups[0], backups: [moved[0].primary])
        #expect(!base.keepsRouting(in: try configuration(2, regions: moved)), "primary and backup swapped")
        let survivors = regions.filter { !$0.replicas.contains(NodeID(2)) }
        #expect(!base.keepsRouting(in: try configuration(2, members: Array(members.prefix(2)), regions: survivors)), "n2 left")
    }

    @Test("a member whose coordination session expires stops serving and says it must rejoin; the CM removes it and the others go on")
    func memberLosesItsSession() async throws {
        let cluster = try await cluster()
        try await eventually("a CM", timeout: .seconds(30)) { cluster.membership.contains(where: \.isManager) }
        let cm = cluster.membership.first(where: \.isManager)!.node
        let victim = cluster.membership.first { $0.node != cm }!
        let account = try await cluster.nodes[cm.index].transaction { try $0.allocate(Int64(1)) }
        try await cluster.quiesce()
        cluster.coordination!.expire(victim.coordinationStore as! EmbeddedCoordinationSession)
        try await eventually("\(victim.node) says it must rejoin", timeout: .seconds(30)) { victim.mustRejoin }
        #expect(!cluster.nodes[victim.node.index].engine.isRunning, "\(victim.node) still serves after losing its session")
        try await eventually("a configuration without \(victim.node)", timeout: .seconds(30)) {
            !cluster.nodes[cm.index].engine.configuration.contains(victim.node)
        }
        // The others go on.
        let value = try await cluster.nodes[cm.index].transaction { tx in
            try tx.write(account, try tx.read(account, as: Int64.self) + 1)
            return try tx.read(account, as: Int64.self)
        }
        #expect(value == 2)
        try await cluster.shutdown()
    }
}
