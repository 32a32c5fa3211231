import Foundation
import Granary
import GranaryEngine
import GranaryMemory
import GranaryTestSupport
import Logging
import Synchronization
import Testing

/// Three data nodes and a fourth member that leads no region (a client), all in this process.
private final class ClientFixture: @unchecked Sendable {
    // Set in init; the engines are stopped in `stop()` before the directory goes.
    let directory: TemporaryDirectory
    let configuration: Configuration
    let engines: [Engine]
    var client: Engine { engines[3] }

    init() throws {
        let directory = TemporaryDirectory("granary-client")
        self.directory = directory
        let nodes = (0..<3).map { NodeID($0) }
        let members = (nodes + [NodeID(3)]).map { Member(node: $0, endpoint: "shm:" + directory.path.appending($0.description).string) }
        let configuration = try Configuration(
            id: ConfigurationID(rawValue: 1), cluster: ClusterID.random(), members: members, manager: nodes[0],
            regions: Configuration.balancedPlacement(nodes: nodes, regionsPerNode: 1, replicas: 3), regionSize: 1 << 20)
        self.configuration = configuration
        let storage = try members.map { try NodeStorage(node: $0.node, configuration: configuration, ringCapacity: 64 << 10) }
        for node in storage {
            for peer in storage where peer.node != node.node {
                for region in peer.replicas + [peer.mailbox.region] { try node.sharedMemory?.adopt(region, of: peer.node) }
            }
        }
        engines = try storage.map { try $0.makeEngine(options: EngineOptions(), logger: Logger(label: "granary.test")) }
        for engine in engines { engine.helpNeighbours(engines) }
    }

    /// Slots reserved and not yet allocated at each region's primary.
    func reservedAtPrimaries() -> [RegionID: Int] {
        var reserved: [RegionID: Int] = [:]
        for placement in configuration.regions {
            reserved[placement.region] = engines[placement.primary.index].allocatorStatistics(of: placement.region)?.reserved
        }
        return reserved
    }

    /// Waits until no primary holds a reservation (ALLOCATE-RELEASE records are processed
    /// asynchronously); returns what is left after `timeout` seconds.
    func waitForNoReservations(timeout: Double = 10) -> [RegionID: Int] {
        let deadline = Date().addingTimeInterval(timeout)
        var reserved = reservedAtPrimaries()
        while reserved.values.contains(where: { $0 != 0 }), Date() < deadline {
            usleep(5_000)
            reserved = reservedAtPrimaries()
        }
        return reserved
    }

    func stop() {
        for engine in engines { engine.stop() }
        directory.remove()
    }
}

private struct Refusal: Error {}

@Suite("Remote allocation", .serialized)
struct RemoteAllocationTests {
    @Test("a member that leads no region allocates at the other nodes' primaries: the objects are in their regions, every node reads and writes them, and no slot stays reserved")
    func clientAllocates() throws {
        let fixture = try ClientFixture()
        defer { fixture.stop() }
        var addresses: [GlobalAddress] = []
        for batch in 0..<30 {
            addresses += try fixture.client.run { tx in try (0..<10).map { try tx.allocate(Int64(batch * 10 + $0)) } }
        }
        #expect(Set(addresses.map(\.untagged)).count == addresses.count, "a slot was handed out twice: \(addresses.count) addresses, \(Set(addresses.map(\.untagged)).count) distinct")
        let regions = Set(addresses.map(\.region))
        #expect(regions.count == 3, "the client allocated in \(regions.sorted()) only, not in every region")
        for address in addresses {
            let primary = try #require(fixture.configuration.placement(of: address.region)?.primary)
            #expect(primary != NodeID(3), "\(address) is in a region the client leads")
        }
        let read = try fixture.engines[0].run { tx in try addresses.map { try tx.read($0, as: Int64.self) } }
        #expect(read == (0..<300).map(Int64.init), "node 0 read \(read.prefix(12))... for the client's objects")
        try fixture.client.run { tx in
            for address in addresses { try tx.write(address, try tx.read(address, as: Int64.self) + 1_000) }
        }
        let after = try fixture.engines[1].run { tx in try addresses.map { try tx.read($0, as: Int64.self) } }
        #expect(after == (0..<300).map { Int64($0 + 1_000) }, "node 1 read \(after.prefix(12))... after the client's writes")
        let reserved = fixture.waitForNoReservations()
        #expect(reserved.values.allSatisfy { $0 == 0 }, "slots still reserved at the primaries after every allocation committed: \(reserved)")
    }

    @Test("an attempt that fails gives the slots it reserved back, and so does an object allocated and freed in one transaction; concurrent clients and local allocations never share a slot")
    func reservationsReturn() throws {
        let fixture = try ClientFixture()
        defer { fixture.stop() }
        // The body refuses after allocating: nothing commits, every reservation goes back.
        do {
            _ = try fixture.client.run { tx -> [GlobalAddress] in
                _ = try (0..<12).map { _ in try tx.allocate(Int64(1)) }
                throw Refusal()
            }
            Issue.record("the refusing transaction committed")
        } catch is Refusal {
        }
        var reserved = fixture.waitForNoReservations()
        #expect(reserved.values.allSatisfy { $0 == 0 }, "slots still reserved after the attempt failed: \(reserved)")
        // Allocated and freed in one transaction: it never existed.
        try fixture.client.run { tx in
            let address = try tx.allocate(Int64(5))
            try tx.free(address)
        }
        reserved = fixture.waitForNoReservations()
        #expect(reserved.values.allSatisfy { $0 == 0 }, "slots still reserved after an allocate-and-free: \(reserved)")

        // Two client threads and a data node allocate at once.
        let results = Mutex<[GlobalAddress]>([])
        let failures = Mutex<[String]>([])
        let threads = (0..<3).map { index in
            Thread {
                do {
                    let engine = index < 2 ? fixture.client : fixture.engines[0]
                    for round in 0..<40 {
                        let made = try engine.run { tx in try (0..<5).map { _ in try tx.allocate(Int64(index * 1_000 + round)) } }
                        results.withLock { $0 += made }
                    }
                } catch {
                    failures.withLock { $0.append("thread \(index): \(error)") }
                }
            }
        }
        for thread in threads { thread.start() }
        let deadline = Date().addingTimeInterval(120)
        while results.withLock({ $0.count }) + failures.withLock({ $0.count }) * 200 < 600, Date() < deadline { usleep(10_000) }
        #expect(failures.withLock { $0 }.isEmpty, "\(failures.withLock { $0 })")
        let all = results.withLock { $0 }
        #expect(all.count == 600)
        #expect(Set(all.map(\.untagged)).count == all.count, "a slot was handed out twice among \(all.count) concurrent allocations")
        reserved = fixture.waitForNoReservations()
        #expect(reserved.values.allSatisfy { $0 == 0 }, "slots still reserved after the concurrent allocations: \(reserved)")
    }
}
