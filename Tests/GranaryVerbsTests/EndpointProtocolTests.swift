import GranaryMemory
@testable import GranaryVerbs
import Testing

/// The private data of the RDMA CM exchange, without a device: what a listener accepts, what it
/// refuses, and that another program's private data is never taken for a request.
@Suite("Verbs endpoint protocol")
struct EndpointProtocolTests {
    @Test("a connect request fits the RDMA CM's 56 bytes and round-trips; foreign or short data is not a request")
    func request() {
        #expect(EndpointProtocol.requestBytes <= 56)
        let request = EndpointProtocol.Request(cluster: ClusterID(rawValue: 0xDEAD_BEEF_0123), from: NodeID(3), to: NodeID(7), connection: 16,
                                               incarnation: 0x0123_4567_89AB_CDEF)
        var bytes = [UInt8](repeating: 0, count: EndpointProtocol.requestBytes)
        bytes.withUnsafeMutableBytes { request.encode(into: $0) }
        #expect(bytes.withUnsafeBytes { EndpointProtocol.Request.decode($0) } == request)
        var foreign = bytes
        foreign[0] ^= 0xFF
        #expect(foreign.withUnsafeBytes { EndpointProtocol.Request.decode($0) } == nil)
        var otherVersion = bytes
        otherVersion[4] &+= 1
        #expect(otherVersion.withUnsafeBytes { EndpointProtocol.Request.decode($0) } == nil)
        #expect(Array(bytes.prefix(10)).withUnsafeBytes { EndpointProtocol.Request.decode($0) } == nil)
    }

    @Test("an acceptance fits 196 bytes and round-trips; a refusal carries its reason, cut to 148 bytes")
    func acceptanceAndRefusal() {
        #expect(EndpointProtocol.acceptanceBytes <= 196 && EndpointProtocol.refusalBytes <= 148)
        let acceptance = EndpointProtocol.Acceptance(tableAddress: 0x7F00_1234_5000, tableRKey: 0xABCD, tableEntries: 4224,
                                                     incarnation: 0xFEDC_BA98_7654_3210)
        var bytes = [UInt8](repeating: 0, count: EndpointProtocol.acceptanceBytes)
        bytes.withUnsafeMutableBytes { acceptance.encode(into: $0) }
        #expect(bytes.withUnsafeBytes { EndpointProtocol.Acceptance.decode($0) } == acceptance)
        // A refusal is not an acceptance, and the reverse.
        var refusal = [UInt8](repeating: 0, count: EndpointProtocol.refusalBytes)
        let long = "node n1 belongs to cluster 1, not to cluster 2; " + String(repeating: "x", count: 300)
        refusal.withUnsafeMutableBytes { EndpointProtocol.encodeRefusal(long, into: $0) }
        #expect(refusal.withUnsafeBytes { EndpointProtocol.Acceptance.decode($0) } == nil)
        #expect(bytes.withUnsafeBytes { EndpointProtocol.decodeRefusal($0) } == nil)
        let reason = refusal.withUnsafeBytes { EndpointProtocol.decodeRefusal($0) }
        #expect(reason == String(long.prefix(EndpointProtocol.refusalBytes - 10)))
        // The RDMA CM's own reject (no one listening) carries no Granary refusal.
        #expect([UInt8](repeating: 0, count: 148).withUnsafeBytes { EndpointProtocol.decodeRefusal($0) } == nil)
    }

    @Test("addresses: ip:port parses, anything else is an error saying why")
    func addresses() throws {
        let parsed = try EndpointProtocol.socketAddress("10.0.2.15:7471").get()
        #expect(EndpointProtocol.text(parsed) == "10.0.2.15:7471")
        for bad in ["10.0.2.15", "10.0.2.15:", ":7471", "10.0.2.15:70000", "10.0.2.15:port"] {
            guard case .failure(let error) = EndpointProtocol.socketAddress(bad) else {
                Issue.record("'\(bad)' was taken for an address")
                continue
            }
            #expect(error.text == bad && error.reason.contains("ip:port"), "\(error)")
        }
    }

    @Test("a published region table entry is taken only whole: a torn or empty entry is no region")
    func tableEntries() {
        var entry = [UInt8](repeating: 0, count: LocalRegions.entryBytes)
        #expect(entry.withUnsafeBytes { LocalRegions.decodeEntry($0.baseAddress!) } == nil)
        let (address, size, rkey): (UInt64, UInt64, UInt32) = (0x7F55_0000_1000, 1 << 20, 0x1234)
        entry.withUnsafeMutableBytes { raw in
            raw.storeBytes(of: address.littleEndian, toByteOffset: 0, as: UInt64.self)
            raw.storeBytes(of: size.littleEndian, toByteOffset: 8, as: UInt64.self)
            raw.storeBytes(of: rkey.littleEndian, toByteOffset: 16, as: UInt32.self)
        }
        // Fields written, check word not yet: not a region.
        #expect(entry.withUnsafeBytes { LocalRegions.decodeEntry($0.baseAddress!) } == nil)
        entry.withUnsafeMutableBytes { raw in
            raw.storeBytes(of: LocalRegions.check(address: address, size: size, rkey: rkey).littleEndian, toByteOffset: 24, as: UInt64.self)
        }
        let decoded = entry.withUnsafeBytes { LocalRegions.decodeEntry($0.baseAddress!) }
        #expect(decoded?.address == address && decoded?.size == Int(size) && decoded?.rkey == rkey)
        // Any one field changed (a read that mixes two writes) fails the check.
        for offset in [0, 8, 16] {
            var torn = entry
            torn[offset] ^= 0x40
            #expect(torn.withUnsafeBytes { LocalRegions.decodeEntry($0.baseAddress!) } == nil, "byte \(offset) changed")
        }
    }
}
