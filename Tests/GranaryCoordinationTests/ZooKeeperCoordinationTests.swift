import Foundation
import GranaryCoordination
import GranaryTestSupport
import GranaryZooKeeper
import Testing

/// The ZooKeeper server the tests use: `GRANARY_ZOOKEEPER=host:port` (Scripts/test zookeeper
/// starts one and sets it).
let zooKeeperAddress = ProcessInfo.processInfo.environment["GRANARY_ZOOKEEPER"]

struct ZooKeeperFixture: CoordinationFixture {
    var description: String { "zookeeper" }
    func session() async throws -> any CoordinationStore {
        try ZooKeeperStore(connectString: zooKeeperAddress!, sessionTimeout: .seconds(6))
    }
    /// Expires a session the way ZooKeeper's own tests do: a second handle attaches to the same
    /// session and closes it.
    func expire(_ session: any CoordinationStore) async throws {
        let store = session as! ZooKeeperStore
        // The original handle may re-attach the session while the twin closes it; repeat the
        // trick until the original sees the expiry (bounded).
        for _ in 0..<5 {
            let twin = try ZooKeeperStore(connectString: zooKeeperAddress!, resuming: store.sessionCredentials)
            await twin.close()
            for _ in 0..<40 {
                do {
                    _ = try await store.get("/")
                } catch .sessionExpired {
                    return
                } catch {}
                try await Task.sleep(for: .milliseconds(50))
            }
        }
    }
}

@Suite("Coordination store conformance: ZooKeeper",
       .enabled(if: zooKeeperAddress != nil, "no ZooKeeper server: set GRANARY_ZOOKEEPER=host:port or run Scripts/test zookeeper"))
struct ZooKeeperCoordinationTests {
    let fixture = ZooKeeperFixture()
    @Test("create, get, compare-and-set, delete, children and their errors") func basics() async throws { try await CoordinationConformance.createGetSetDelete(fixture) }
    @Test("sequential nodes get increasing 10-digit suffixes") func sequential() async throws { try await CoordinationConformance.sequentialNodes(fixture) }
    @Test("ephemeral nodes end with their session, closed or expired; a closed session refuses calls") func ephemerals() async throws { try await CoordinationConformance.ephemeralsEndWithTheirSession(fixture) }
    @Test("one-shot watches fire on change, creation and deletion") func watches() async throws { try await CoordinationConformance.watchesFireOnce(fixture) }
    @Test("a multi-operation applies all or nothing") func multi() async throws { try await CoordinationConformance.multiIsAtomic(fixture) }

    /// The store reads a node larger than its 4 KiB first buffer twice; the second read set the
    /// same watch again, whose retain the one firing never gave back (a watch leaked per read).
    @Test("a watch set by a read of a node larger than 4 KiB fires once and is then freed")
    func largeNodeWatchIsFreed() async throws {
        let store = try ZooKeeperStore(connectString: zooKeeperAddress!, sessionTimeout: .seconds(6))
        let path = "/granary-test-large-\(UInt64.random(in: 0...UInt64.max))"
        _ = try await store.create(path, data: [UInt8](repeating: 7, count: 10_000), mode: .persistent)
        weak var weakWatch: CoordinationWatch?
        do {
            let (data, watch) = try await store.getAndWatch(path)
            #expect(data.data.count == 10_000)
            weakWatch = watch
            _ = try await store.set(path, data: [1], expectedVersion: nil)
            #expect(await watch.event() == .dataChanged(path))
        }
        // The watcher thread drops its reference just after firing.
        let deadline = ContinuousClock.now + .seconds(2)
        while weakWatch != nil, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(10)) }
        #expect(weakWatch == nil, "the watch of \(path) is still referenced after it fired and its holder let it go")
        try await store.delete(path, expectedVersion: nil)
        await store.close()
    }

    @Test("a server that is not there is a connection-loss error naming it")
    func noServer() async throws {
        #expect(throws: CoordinationError.connectionLoss("no ZooKeeper session with 127.0.0.1:1 within 1.0 seconds")) {
            _ = try ZooKeeperStore(connectString: "127.0.0.1:1", connectTimeout: .seconds(1))
        }
    }
}
