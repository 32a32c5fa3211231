import Testing
import GranaryTestSupport
@testable import GranaryMemory

@Suite("Slab allocator")
struct SlabAllocatorTests {
    let cluster = ClusterID(rawValue: 0xA110C)

    @Test("allocator state rebuilt from the region file equals the state before")
    func rebuildFromBytes() throws {
        let tmp = TemporaryDirectory()
        defer { tmp.remove() }
        let dir = try RegionDirectory(tmp.path)
        var committed: [ObjectSlot] = []
        var freed: Set<Int> = []
        do {
            let region = try dir.create(RegionID(1), size: 1 << 20, cluster: cluster, slabShift: 14)
            let allocator = SlabAllocator(region: region)
            for i in 0..<300 {
                let slot = try allocator.reserve(payloadBytes: [8, 100, 500][i % 3])
                let object = region.base + slot.offset
                let header = ObjectLayout.loadHeader(object)
                #expect(!header.isAllocated, "reserved a slot that is allocated: \(slot)")
                _ = ObjectLayout.tryLock(object, expected: header)
                var value = UInt64(i)
                ObjectLayout.install(object, lines: slot.lines, payload: &value, count: 8, header: header.allocating)
                allocator.didAllocate(slot)
                committed.append(slot)
            }
            // Free every fifth object, and leave one reservation uncommitted (a crash forgets it).
            for slot in committed.enumerated().filter({ $0.offset % 5 == 0 }).map(\.element) {
                let object = region.base + slot.offset
                let header = ObjectLayout.loadHeader(object)
                ObjectLayout.stamp(object, lines: slot.lines, header: header.freeing)
                allocator.didFree(slot)
                freed.insert(slot.offset)
            }
            _ = try allocator.reserve(payloadBytes: 8)
            #expect(allocator.statistics.allocated == 300 - freed.count)
            try region.persist(offset: 0, length: region.size)
        }
        let reopened = try dir.open(RegionID(1), cluster: cluster)
        let rebuilt = SlabAllocator(region: reopened)
        #expect(rebuilt.statistics.allocated == 300 - freed.count)
        #expect(rebuilt.statistics.reserved == 0)
        let live = Set(committed.map(\.offset)).subtracting(freed)
        // Every slot the rebuilt allocator hands out is one that was not live.
        var handedOut = 0
        while let slot = try? rebuilt.reserve(payloadBytes: 100) {
            #expect(!live.contains(slot.offset), "rebuilt allocator handed out live object at \(slot.offset)")
            handedOut += 1
        }
        #expect(handedOut > 0)
        for slot in committed where !freed.contains(slot.offset) {
            #expect(try rebuilt.slot(at: slot.offset) == slot)
            #expect(ObjectLayout.loadHeader(reopened.base + slot.offset).isAllocated)
        }
        for slot in committed where freed.contains(slot.offset) {
            #expect(ObjectLayout.loadHeader(reopened.base + slot.offset).incarnation == 1, "a freed slot's incarnation changed")
        }
    }

    @Test("a slot returned twice (a stale release) is not handed out again once its object is allocated")
    func staleReturnOfAllocatedSlot() throws {
        let tmp = TemporaryDirectory()
        defer { tmp.remove() }
        let dir = try RegionDirectory(tmp.path)
        let region = try dir.create(RegionID(1), size: 1 << 20, cluster: cluster, slabShift: 14)
        let allocator = SlabAllocator(region: region)
        let slot = try allocator.reserve(payloadBytes: 8)
        let object = region.base + slot.offset
        let header = ObjectLayout.loadHeader(object)
        _ = ObjectLayout.tryLock(object, expected: header)
        var value: UInt64 = 42
        ObjectLayout.install(object, lines: slot.lines, payload: &value, count: 8, header: header.allocating)
        allocator.didAllocate(slot)
        // The same slot comes back although its object lives (a release that arrived late).
        allocator.unreserve(slot)
        for _ in 0..<50 {
            let next = try allocator.reserve(payloadBytes: 8)
            #expect(next.offset != slot.offset, "the allocated slot \(slot) was handed out again")
            #expect(!ObjectLayout.loadHeader(region.base + next.offset).isAllocated)
        }
        var read: UInt64 = 0
        ObjectLayout.gatherPayload(from: object, into: &read, count: 8)
        #expect(read == 42)
    }

    @Test("addresses that are not object slots, objects too large and a full region are errors")
    func errors() throws {
        let tmp = TemporaryDirectory()
        defer { tmp.remove() }
        let region = try RegionDirectory(tmp.path).create(RegionID(2), size: 1 << 20, cluster: cluster, slabShift: 16)
        let allocator = SlabAllocator(region: region)
        #expect(throws: AllocationError.self) { try allocator.slot(at: 100) }  // metadata
        #expect(throws: AllocationError.self) { try allocator.slot(at: allocator.layout.firstSlabOffset) }  // unused slab
        let slot = try allocator.reserve(payloadBytes: 100)  // 2 lines
        #expect(throws: AllocationError.self) { try allocator.slot(at: slot.offset + 64) }
        #expect(throws: AllocationError.self) { try allocator.reserve(payloadBytes: 1 << 20) }
        var count = 0
        while true {
            do { _ = try allocator.reserve(payloadBytes: 30_000) } catch { #expect(error == .regionFull(region: RegionID(2), lines: 768)); break }
            count += 1
        }
        #expect(count > 0)
    }
}
