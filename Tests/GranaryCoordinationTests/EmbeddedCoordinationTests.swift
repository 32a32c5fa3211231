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
