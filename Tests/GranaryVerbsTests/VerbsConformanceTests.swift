import GranaryTestSupport
import Testing

/// The transport conformance suite on the verbs backend: every check of ``TransportConformance``,
/// each skipped (with the reason) where there is no RDMA device.
@Suite("Transport conformance: verbs")
struct VerbsConformanceTests {
    let fixture = VerbsFixture()

    private func run(_ check: (TransportPair) throws -> Void) throws {
        let pair = try fixture.makePair()
        defer { pair.teardown() }
        try check(pair)
    }

    @Test("read and write round-trip at every size and alignment", .requiresRDMADevice)
    func readWrite() throws { try run(TransportConformance.readWriteRoundTrip) }

    @Test("compare-and-swap swaps only on a match and returns the word found", .requiresRDMADevice)
    func cas() throws { try run(TransportConformance.compareAndSwap) }

    @Test("fetch-and-add returns the old word and wraps", .requiresRDMADevice)
    func faa() throws { try run(TransportConformance.fetchAndAdd) }

    @Test("a batch of mixed operations completes with results in place", .requiresRDMADevice)
    func batch() throws { try run(TransportConformance.batch) }

    @Test("out-of-bounds, unknown region, unknown node and misaligned atomics are errors", .requiresRDMADevice)
    func errors() throws { try run(TransportConformance.badAddresses) }

    @Test("a prefetch changes nothing a read returns", .requiresRDMADevice)
    func prefetch() throws { try run(TransportConformance.prefetch) }

    @Test("a channel over the transport delivers messages whole and in order", .requiresRDMADevice)
    func channel() throws { try run(TransportConformance.channel) }
}
