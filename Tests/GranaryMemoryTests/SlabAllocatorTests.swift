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

    /// Allocator recovery: a promoted backup's allocator serves before it has read every slot
    /// header. Reservations and frees go on while the headers are scanned: no slot is handed out
    /// twice or over a live object, and once the scan is done the free lists hold exactly the
    /// free slots of the used slabs (none lost, none listed twice).
    @Test("an allocator rebuilt in the background serves at once; under concurrent reservations and frees during its scan no slot is handed out twice or over a live object, and no free slot is lost")
    func backgroundScan() throws {
        let tmp = TemporaryDirectory()
        defer { tmp.remove() }
        let dir = try RegionDirectory(tmp.path)
        let region = try dir.create(RegionID(1), size: 4 << 20, cluster: cluster, slabShift: 14)
        var live: [ObjectSlot] = []
        do {
            let filler = SlabAllocator(region: region)
            for i in 0..<20_000 {
                let slot = try filler.reserve(payloadBytes: [8, 100][i % 2])
                let object = region.base + slot.offset
                ObjectLayout.stamp(object, lines: slot.lines, header: ObjectLayout.loadHeader(object).allocating)
                filler.didAllocate(slot)
                live.append(slot)
            }
            // Free every third one, so the used slabs have free slots to find.
            for slot in live.enumerated().filter({ $0.offset % 3 == 0 }).map(\.element) {
                let object = region.base + slot.offset
                ObjectLayout.stamp(object, lines: slot.lines, header: ObjectLayout.loadHeader(object).freeing)
                filler.didFree(slot)
            }
            live = live.enumerated().filter { $0.offset % 3 != 0 }.map(\.element)
        }
        let allocator = SlabAllocator(region: region, scan: .background)
        #expect(allocator.isScanning, "nothing left to scan after the slab table")
        // Meanwhile: free half of the live objects (in scanned and unscanned slabs alike) and
        // reserve slots, each checked free when handed out and never handed out twice.
        let toFree = live.enumerated().filter { $0.offset % 2 == 0 }.map(\.element)
        let stillLive = Set(live.enumerated().filter { $0.offset % 2 != 0 }.map(\.element.offset))
        let reservedSlots = Shared<[ObjectSlot]>([])
        runThreads(3) { index in
            switch index {
            case 0:
                while allocator.scanStep() {}
            case 1:
                for slot in toFree {
                    let object = region.base + slot.offset
                    allocator.didFree(slot) {
                        ObjectLayout.stamp(object, lines: slot.lines, header: ObjectLayout.loadHeader(object).freeing)
                    }
                }
            default:
                var taken: [ObjectSlot] = []
                for i in 0..<6_000 {
                    guard let slot = try? allocator.reserve(payloadBytes: [8, 100][i % 2]) else { break }
                    taken.append(slot)
                }
                reservedSlots.withLock { $0 = taken }
            }
        }
        let reserved = reservedSlots.value
        var handed: [Int: Int] = [:]
        for slot in reserved {
            handed[slot.offset, default: 0] += 1
            #expect(!stillLive.contains(slot.offset), "handed out the live object at \(slot.offset)")
        }
        let twice = handed.filter { $0.value > 1 }
        #expect(twice.isEmpty, "slots handed out twice: \(twice.keys.sorted().prefix(10))")
        for slot in reserved { allocator.unreserve(slot) }
        // After the scan: every slot of a used slab is allocated (stillLive) or listed free once.
        let statistics = allocator.statistics
        #expect(statistics.allocated == stillLive.count, "allocated \(statistics.allocated), live \(stillLive.count)")
        var free = 0
        var offsets = Set<Int>()
        while let slot8 = try? allocator.reserve(payloadBytes: 8) {
            if !offsets.insert(slot8.offset).inserted { Issue.record("slot \(slot8.offset) listed twice"); break }
            #expect(!stillLive.contains(slot8.offset))
            free += 1
            if allocator.statistics.unusedSlabs == 0 && free > 200_000 { break }
        }
        #expect(free > 0)
    }
}
