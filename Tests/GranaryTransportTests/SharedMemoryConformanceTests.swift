import GranaryTestSupport
import Testing

/// The transport conformance suite on the shared-memory backend.
@Suite("Transport conformance: shared memory")
struct SharedMemoryConformanceTests {
    let fixture = SharedMemoryFixture()

    private func run(_ check: (TransportPair) throws -> Void) throws {
        let pair = try fixture.makePair()
        defer { pair.teardown() }
        try check(pair)
    }

    @Test("read and write round-trip at every size and alignment") func readWrite() throws { try run(TransportConformance.readWriteRoundTrip) }
    @Test("compare-and-swap swaps only on a match and returns the word found") func cas() throws { try run(TransportConformance.compareAndSwap) }
    @Test("fetch-and-add returns the old word and wraps") func faa() throws { try run(TransportConformance.fetchAndAdd) }
    @Test("a batch of mixed operations completes with results in place") func batch() throws { try run(TransportConformance.batch) }
    @Test("out-of-bounds, unknown region, unknown node and misaligned atomics are errors") func errors() throws { try run(TransportConformance.badAddresses) }
    @Test("a prefetch changes nothing a read returns") func prefetch() throws { try run(TransportConformance.prefetch) }
    @Test("a channel over the transport delivers messages whole and in order") func channel() throws { try run(TransportConformance.channel) }
}
