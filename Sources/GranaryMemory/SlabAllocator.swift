import Synchronization

/// Where things are inside a data region.
///
/// ```
/// 0                      region header (RegionFormat)
/// 4096                   slab table: one UInt16 per slab, the size class (lines per object) it
///                        was carved into, 0 for a slab not yet used
/// firstSlabOffset        slabs of 2^slabShift bytes, each an array of equal-size object slots
/// ```
/// The allocator's whole state follows from these bytes plus the allocated bit of each slot's
/// header, so it can be rebuilt from the region file alone.
package struct SlabLayout: Sendable, Equatable {
    package static let defaultSlabShift = RegionFormat.defaultSlabShift
    package static let minimumSlabShift = 12
    package static let maximumSlabShift = 24
    package static let tableOffset = RegionFormat.headerBytes

    package let regionSize: Int
    package let slabShift: Int
    @inlinable package var slabSize: Int { 1 << slabShift }
    @inlinable package var slabCount: Int { regionSize >> slabShift }
    /// The offset of the first slab that holds objects (the ones before hold metadata).
    package let firstSlabOffset: Int

    package init(regionSize: Int, slabShift: Int) {
        self.regionSize = regionSize
        self.slabShift = slabShift
        let tableEnd = Self.tableOffset + (regionSize >> slabShift) * 2
        let slab = 1 << slabShift
        self.firstSlabOffset = (tableEnd + slab - 1) / slab * slab
    }

    /// The size classes, in cache lines per object, that fit this slab size.
    package var sizeClasses: [Int] {
        let all = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024,
                   1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768, 49152, 65536, 98304, 131072,
                   196608, 262144]
        return all.filter { $0 * ObjectLayout.lineSize <= slabSize }
    }
}

/// Why an allocation or an address lookup failed.
package enum AllocationError: Error, Sendable, Equatable, CustomStringConvertible {
    case regionFull(region: RegionID, lines: Int)
    case objectTooLarge(bytes: Int, maximum: Int)
    case notAnObject(GlobalAddress, reason: String)

    package var description: String {
        switch self {
        case .regionFull(let region, let lines):
            return "region \(region) has no free slot of \(lines) cache lines and no unused slab"
        case .objectTooLarge(let bytes, let maximum):
            return "an object of \(bytes) bytes is larger than the largest size class (\(maximum) bytes)"
        case .notAnObject(let address, let reason):
            return "\(address) is not an object slot: \(reason)"
        }
    }
}

/// An object slot: its offset in the region and its size in cache lines.
package struct ObjectSlot: Hashable, Sendable {
    package var offset: Int
    package var lines: Int
    @inlinable package init(offset: Int, lines: Int) {
        self.offset = offset
        self.lines = lines
    }
}

/// A slab allocator over one data region, run by the region's primary.
///
/// Slots are *reserved* while a transaction executes (in memory only) and become allocated when the
/// transaction's commit installs a header with the allocated bit; an aborted transaction
/// *unreserves* them. Because a reserved slot's bytes still say "free", a crash simply forgets the
/// reservation: ``init(region:scan:)`` rebuilds every free list from the slab table and slot headers.
///
/// Allocator recovery (FaRM's): a backup promoted to primary must not wait for a scan of every
/// slot header before its region serves. With ``Scan/background`` the new allocator reads only
/// the slab table (a size class per slab) and knows the unused slabs at once; the used slabs'
/// headers are scanned later, slab by slab under the allocator's lock (``scanStep()``, from a
/// background thread, or by ``reserve(payloadBytes:)`` when it needs a slot of a class whose
/// free slots are not all known yet). A free committed in a slab not yet scanned is left to the
/// scan, and its header is written under the same lock (``didFree(_:installing:)``), so that no
/// free slot is listed twice or lost.
///
/// `@unchecked Sendable`: the mutable state is behind `state`'s mutex; `slabClasses` is an array
/// of atomics written under that mutex and read without it.
package final class SlabAllocator: @unchecked Sendable {
    package let region: Region
    package let layout: SlabLayout
    private let classes: [Int]
    /// Distinct for every allocator this process makes (an allocator rebuilt from the same region
    /// gets a new one): what a reservation made in one allocator is checked against.
    package let generation: UInt64 = SlabAllocator.generations.wrappingAdd(1, ordering: .relaxed).newValue
    private static let generations = Atomic<UInt64>(0)

    private struct State {
        var freeSlots: [[Int]]  // per size class, offsets of free slots
        var unusedSlabs: [Int]  // slab indexes, in descending order (popLast takes the lowest)
        /// Per size class, used slabs whose slot headers are not scanned yet (descending).
        var unscanned: [[Int]]
        /// Per slab: whether its free slots are in `freeSlots` (scanned, or carved here).
        var scanned: [Bool]
        /// Whether used slabs remain to be scanned.
        var isScanning: Bool { unscanned.contains { !$0.isEmpty } }
        var allocated: Int
        var reserved: Int
    }
    private let state: Mutex<State>

    /// When the slot headers of the used slabs are read.
    package enum Scan: Sendable {
        /// In the initializer.
        case now
        /// Later (``scanStep()``, or on demand): the allocator serves at once.
        case background
    }

    /// Rebuilds the allocator's state from the region's own bytes: the slab table now, the slot
    /// headers now or in the background (`scan`).
    package init(region: Region, scan: Scan = .now) {
        precondition(region.kind == .data, "\(region.path) is a \(region.kind) region, not a data region")
        self.region = region
        self.layout = SlabLayout(regionSize: region.size, slabShift: region.slabShift)
        self.classes = layout.sizeClasses
        var unused: [Int] = []
        var unscanned = Array(repeating: [Int](), count: classes.count)
        var slabLines = Array(repeating: 0, count: layout.slabCount)
        let firstSlab = layout.firstSlabOffset >> layout.slabShift
        for slab in stride(from: layout.slabCount - 1, through: firstSlab, by: -1) {
            let lines = Int(region.base.load(fromByteOffset: SlabLayout.tableOffset + slab * 2, as: UInt16.self))
            guard lines > 0, let classIndex = classes.firstIndex(of: lines) else {
                unused.append(slab)
                continue
            }
            slabLines[slab] = lines
            unscanned[classIndex].append(slab)
        }
        var initial = State(freeSlots: Array(repeating: [Int](), count: classes.count), unusedSlabs: unused,
                            unscanned: unscanned, scanned: Array(repeating: false, count: layout.slabCount),
                            allocated: 0, reserved: 0)
        slabClasses = .allocate(capacity: layout.slabCount)
        for slab in 0..<layout.slabCount { (slabClasses + slab).initialize(to: Atomic<Int>(slabLines[slab])) }
        if scan == .now {
            // Highest slab first, so that the lowest free offset ends last in each list (taken first).
            for classIndex in 0..<classes.count {
                for slab in initial.unscanned[classIndex] {
                    Self.scan(slab, classIndex: classIndex, region: region, layout: layout, lines: classes[classIndex], in: &initial)
                }
                initial.unscanned[classIndex].removeAll()
            }
        }
        state = Mutex(initial)
    }

    /// Reads the slot headers of used slab `slab` (size class `classIndex`): free slots go to the
    /// free list (the lowest offset last, so taken first), allocated ones are counted.
    private static func scan(_ slab: Int, classIndex: Int, region: Region, layout: SlabLayout, lines: Int, in state: inout State) {
        let slotBytes = lines * ObjectLayout.lineSize
        let slabStart = slab << layout.slabShift
        let count = layout.slabSize / slotBytes
        for slot in stride(from: count - 1, through: 0, by: -1) {
            let offset = slabStart + slot * slotBytes
            if ObjectLayout.loadHeader(region.base + offset).isAllocated {
                state.allocated += 1
            } else {
                state.freeSlots[classIndex].append(offset)
            }
        }
        state.scanned[slab] = true
    }

    /// Scans one used slab not scanned yet (the background half of allocator recovery); returns
    /// whether slabs remain to be scanned.
    @discardableResult
    package func scanStep() -> Bool {
        let (region, layout, classes) = (self.region, self.layout, self.classes)
        return state.withLock { state in
            for classIndex in 0..<classes.count {
                if let slab = state.unscanned[classIndex].popLast() {
                    Self.scan(slab, classIndex: classIndex, region: region, layout: layout, lines: classes[classIndex], in: &state)
                    break
                }
            }
            return state.isScanning
        }
    }

    /// Whether used slabs remain whose slot headers are not scanned yet.
    package var isScanning: Bool { state.withLock { $0.isScanning } }

    deinit {
        slabClasses.deinitialize(count: layout.slabCount)
        slabClasses.deallocate()
    }

    /// Each slab's size class in lines (0: unused), including slabs carved in memory whose first
    /// allocation has not committed yet; one atomic per slab, so that ``slot(at:)`` (the
    /// primary's CPU, on every LOCK entry) reads it without taking the mutex. A slab's class is set
    /// once, under the mutex and before any slot of it is handed out, and never changes.
    private let slabClasses: UnsafeMutablePointer<Atomic<Int>>

    /// The largest payload one object can carry in this region.
    package var maximumPayload: Int { ObjectLayout.payloadCapacity(lines: classes.last ?? 1) }

    /// The size class (cache lines) used for `payloadBytes`.
    package func lines(forPayload payloadBytes: Int) throws(AllocationError) -> Int {
        let needed = ObjectLayout.lines(forPayload: payloadBytes)
        guard let lines = classes.first(where: { $0 >= needed }) else {
            throw .objectTooLarge(bytes: payloadBytes, maximum: maximumPayload)
        }
        return lines
    }

    /// Reserves a free slot for `payloadBytes` bytes. Only memory changes: a new slab is carved in
    /// memory (an unused slab is all zeros, which is every slot free at version 0), and its size
    /// class reaches the slab table when its first allocation commits (``didAllocate(_:)``), so
    /// an aborted reservation leaves no trace in the region.
    package func reserve(payloadBytes: Int) throws(AllocationError) -> ObjectSlot {
        let lines = try self.lines(forPayload: payloadBytes)
        let classIndex = classes.firstIndex(of: lines)!
        let layout = self.layout
        let region = self.region
        let base = UInt(bitPattern: region.base)
        let result: ObjectSlot? = state.withLock { state in
            while true {
                while let offset = state.freeSlots[classIndex].popLast() {
                    // A slot whose header says allocated is in use: its entry here is stale (a slot
                    // returned twice), and is dropped rather than handed out over a live object.
                    if ObjectLayout.loadHeader(UnsafeMutableRawPointer(bitPattern: base + UInt(offset))!).isAllocated { continue }
                    state.reserved += 1
                    return ObjectSlot(offset: offset, lines: lines)
                }
                // Slabs of this class not scanned yet (allocator recovery) come before new slabs.
                guard let slab = state.unscanned[classIndex].popLast() else { break }
                Self.scan(slab, classIndex: classIndex, region: region, layout: layout, lines: lines, in: &state)
            }
            guard let slab = state.unusedSlabs.popLast() else { return nil }
            let slotBytes = lines * ObjectLayout.lineSize
            let slabStart = slab << layout.slabShift
            let count = layout.slabSize / slotBytes
            state.scanned[slab] = true
            slabClasses[slab].store(lines, ordering: .releasing)
            for slot in stride(from: count - 1, through: 1, by: -1) {
                state.freeSlots[classIndex].append(slabStart + slot * slotBytes)
            }
            state.reserved += 1
            return ObjectSlot(offset: slabStart, lines: lines)
        }
        guard let result else { throw .regionFull(region: region.id, lines: lines) }
        return result
    }

    /// Returns a reserved slot that was never allocated (its transaction aborted).
    package func unreserve(_ slot: ObjectSlot) {
        let classIndex = classes.firstIndex(of: slot.lines)!
        state.withLock { state in
            state.reserved -= 1
            state.freeSlots[classIndex].append(slot.offset)
        }
    }

    /// Records that a reserved slot's allocation committed, entering its slab's size class in the
    /// slab table if this is the slab's first allocation. Call it before installing the object:
    /// a restart rebuilds the allocator from the table, then the headers, so the table entry must
    /// be there before the first object of its slab is.
    ///
    /// - Parameter persist: also persist the slab table entry (`pmem_persist`, or `msync`, a disk
    ///   write where the region file is not persistent memory), as installs are persisted only
    ///   when the engine is told to persist every install.
    package func didAllocate(_ slot: ObjectSlot, persist: Bool = false) {
        state.withLock { state in
            state.reserved -= 1
            state.allocated += 1
        }
        Self.recordSlabClass(in: region, layout: layout, slot: slot, persist: persist)
    }

    /// Enters `slot`'s size class in the slab table of `region` (any replica) if its slab has none.
    /// Backups call this when they apply an allocation, so their bytes match the primary's.
    ///
    /// - Parameter persist: also persist the entry (see ``didAllocate(_:persist:)``). The record
    ///   processor calls this while it holds a lane of its mailbox: an `msync` there once kept a
    ///   node from serving its mailbox for more than 10 s while other tests wrote back their
    ///   region files on the same disk.
    package static func recordSlabClass(in region: Region, layout: SlabLayout, slot: ObjectSlot, persist: Bool = false) {
        if recordSlabClass(at: region.base, layout: layout, slot: slot), persist {
            try? region.persist(offset: SlabLayout.tableOffset + (slot.offset >> layout.slabShift) * 2, length: 2)
        }
    }

    /// Returns a slot whose free committed (its header already says free) to the free list.
    package func didFree(_ slot: ObjectSlot) {
        didFree(slot) {}
    }

    /// Commits the free of `slot`: runs `install` (which writes its free header) and returns the
    /// slot to the free list, both under the allocator's lock, so that a scan of its slab sees
    /// the slot either allocated (before) or free and listed by this call (after), never free
    /// and then listed twice. A slot in a slab not scanned yet is left to the scan.
    package func didFree(_ slot: ObjectSlot, installing install: () -> Void) {
        let classIndex = classes.firstIndex(of: slot.lines)!
        let slab = slot.offset >> layout.slabShift
        state.withLock { state in
            install()
            guard state.scanned[slab] else { return }
            state.allocated -= 1
            state.freeSlots[classIndex].append(slot.offset)
        }
    }

    /// The slot that starts at `offset`, read from the slab table.
    ///
    /// - Throws: ``AllocationError/notAnObject(_:reason:)`` if `offset` is in the metadata, in an
    ///   unused slab, or not at the start of a slot.
    package func slot(at offset: Int) throws(AllocationError) -> ObjectSlot {
        let address = GlobalAddress(region: region.id, offset: UInt32(truncatingIfNeeded: offset))
        guard offset >= layout.firstSlabOffset, offset < layout.regionSize else {
            throw .notAnObject(address, reason: "outside the region's slabs")
        }
        let slab = offset >> layout.slabShift
        let lines = slabClasses[slab].load(ordering: .acquiring)
        return try Self.slot(layout: layout, address: address, offset: offset, slab: slab, lines: lines)
    }

    static func slot(layout: SlabLayout, address: GlobalAddress, offset: Int, slab: Int, lines: Int) throws(AllocationError) -> ObjectSlot {
        guard lines > 0 else { throw .notAnObject(address, reason: "slab \(slab) holds no objects") }
        let slotBytes = lines * ObjectLayout.lineSize
        let within = offset - (slab << layout.slabShift)
        guard within % slotBytes == 0, within / slotBytes < layout.slabSize / slotBytes else {
            throw .notAnObject(address, reason: "not at the start of a \(lines)-line slot")
        }
        return ObjectSlot(offset: offset, lines: lines)
    }

    /// ``slot(in:layout:at:)`` for the mapping at `base` of data region `region`, without a
    /// reference to the region (callers on hot paths hold its base, not the object).
    package static func slot(inRegion region: RegionID, at base: UnsafeRawPointer, layout: SlabLayout,
                            offset: Int) throws(AllocationError) -> ObjectSlot {
        let address = GlobalAddress(region: region, offset: UInt32(truncatingIfNeeded: offset))
        guard offset >= layout.firstSlabOffset, offset < layout.regionSize else {
            throw .notAnObject(address, reason: "outside the region's slabs")
        }
        let slab = offset >> layout.slabShift
        let lines = Int(base.load(fromByteOffset: SlabLayout.tableOffset + slab * 2, as: UInt16.self))
        return try slot(layout: layout, address: address, offset: offset, slab: slab, lines: lines)
    }

    /// ``recordSlabClass(in:layout:slot:persist:)`` for the mapping at `base`, not persisted.
    /// Returns whether it wrote the entry.
    @discardableResult
    package static func recordSlabClass(at base: UnsafeMutableRawPointer, layout: SlabLayout, slot: ObjectSlot) -> Bool {
        let entry = SlabLayout.tableOffset + (slot.offset >> layout.slabShift) * 2
        guard base.load(fromByteOffset: entry, as: UInt16.self) == 0 else { return false }
        base.storeBytes(of: UInt16(slot.lines), toByteOffset: entry, as: UInt16.self)
        return true
    }

    /// Like ``slot(at:)`` for any mapping of a data region (a replica), from its slab table.
    package static func slot(in region: Region, layout: SlabLayout, at offset: Int) throws(AllocationError) -> ObjectSlot {
        try slot(inRegion: region.id, at: region.base, layout: layout, offset: offset)
    }

    /// Counts for monitoring and tests (the scan of allocator recovery is finished first).
    package var statistics: (allocated: Int, reserved: Int, free: Int, unusedSlabs: Int) {
        while scanStep() {}
        return state.withLock { state in
            (state.allocated, state.reserved, state.freeSlots.reduce(0) { $0 + $1.count }, state.unusedSlabs.count)
        }
    }
}
