import Synchronization
import GranaryCoordination
import GranaryTestSupport
import Testing

struct EmbeddedFixture: CoordinationFixture {
    let service = EmbeddedCoordinationService()
    var description: String { "embedded" }
    func session() async throws -> any CoordinationStore { service.session() }
    func expire(_ session: any CoordinationStore) async throws {
        service.expire(session as! EmbeddedCoordinationSession)
    }
}

@Suite("Coordination store conformance: embedded")
struct EmbeddedCoordinationTests {
    let fixture = EmbeddedFixture()
    @Test("create, get, compare-and-set, delete, children and their errors") func basics() async throws { try await CoordinationConformance.createGetSetDelete(fixture) }
    @Test("sequential nodes get increasing 10-digit suffixes") func sequential() async throws { try await CoordinationConformance.sequentialNodes(fixture) }
    @Test("ephemeral nodes end with their session, closed or expired; a closed session refuses calls") func ephemerals() async throws { try await CoordinationConformance.ephemeralsEndWithTheirSession(fixture) }
    @Test("one-shot watches fire on change, creation and deletion") func watches() async throws { try await CoordinationConformance.watchesFireOnce(fixture) }
    @Test("a multi-operation applies all or nothing") func multi() async throws { try await CoordinationConformance.multiIsAtomic(fixture) }
}

/// The embedded store's persistence hook (what an embedded cluster's configuration goes through
/// on its way to `cluster.json`).
@Suite("Embedded store: persisting writes")
struct EmbeddedPersistingTests {
    final class Log: Sendable {
        let lock = Mutex<(writes: [(String, [UInt8])], refuse: Bool)>(([], false))
    }

    @Test("every write of a persistent node goes through the hook before anyone sees it; a write the hook refuses fails, changes nothing and fires no watch; ephemeral nodes and failed compare-and-sets never reach it")
    func persisting() async throws {
        let log = Log()
        let service = EmbeddedCoordinationService { path, data throws(CoordinationError) in
            let refuse = log.lock.withLock { state in
                if !state.refuse { state.writes.append((path, data)) }
                return state.refuse
            }
            if refuse { throw CoordinationError.backend("refused \(path)") }
        }
        let session = service.session()
        _ = try await session.create("/c", data: [1], mode: .persistent)
        _ = try await session.create("/e", data: [1], mode: .ephemeral)
        let version = try await session.set("/c", data: [2], expectedVersion: 0)
        _ = try await session.set("/e", data: [2], expectedVersion: nil)
        await #expect(throws: CoordinationError.self) { try await session.set("/c", data: [9], expectedVersion: 0) }
        try await session.multi([.set(path: "/c", data: [3], expectedVersion: version)])
        var writes = log.lock.withLock { $0.writes }
        #expect(writes.map(\.0) == ["/c", "/c"] && writes.map(\.1) == [[2], [3]], "the hook saw \(writes)")

        let (before, watch) = try await session.getAndWatch("/c")
        log.lock.withLock { $0.refuse = true }
        await #expect(throws: CoordinationError.self) { try await session.set("/c", data: [4], expectedVersion: nil) }
        await #expect(throws: CoordinationError.self) { try await session.multi([.set(path: "/c", data: [5], expectedVersion: nil)]) }
        let after = try await session.get("/c")
        #expect(after.data == before.data && after.version == before.version, "a refused write changed /c: \(before) -> \(after)")
        log.lock.withLock { $0.refuse = false }
        _ = try await session.set("/c", data: [6], expectedVersion: nil)
        #expect(await watch.event() == .dataChanged("/c"), "the watch set before the refused writes did not fire on the next write")
        writes = log.lock.withLock { $0.writes }
        #expect(writes.map(\.1) == [[2], [3], [6]], "the hook saw \(writes)")
        await session.close()
    }
}
