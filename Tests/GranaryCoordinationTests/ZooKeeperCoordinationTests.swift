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

    @Test("a server that is not there is a connection-loss error naming it")
    func noServer() async throws {
        #expect(throws: CoordinationError.connectionLoss("no ZooKeeper session with 127.0.0.1:1 within 1.0 seconds")) {
            _ = try ZooKeeperStore(connectString: "127.0.0.1:1", connectTimeout: .seconds(1))
        }
    }
}
