/// A map from transaction id to a small non-negative integer (a record's index in the processor's
/// pool), for the record processor's per-record lookups: open addressing with linear probing and
/// backward-shift deletion, a multiplicative hash, no tombstones. `Dictionary` hashes its keys with
/// seeded SipHash, which cost more than the rest of a lookup on this path.
///
/// Owns its storage; single-threaded (a lane's record processor, under the lane's claim).
struct TransactionTable: ~Copyable {
    /// Key and value side by side (one cache line per probe); value -1 marks an empty slot.
    private struct Slot {
        var key: UInt64
        var value: Int
    }
    private var slots: UnsafeMutablePointer<Slot>
    private var mask: Int
    private(set) var count = 0

    init(minimumCapacity: Int) {
        var capacity = 16
        while capacity < minimumCapacity * 2 { capacity <<= 1 }
        mask = capacity - 1
        slots = .allocate(capacity: capacity)
        slots.initialize(repeating: Slot(key: 0, value: -1), count: capacity)
    }

    deinit { slots.deallocate() }

    @inline(__always) private func home(_ key: UInt64) -> Int {
        Int(truncatingIfNeeded: (key &* 0x9E37_79B9_7F4A_7C15) >> 32) & mask
    }

    /// The slot holding `key`, or the empty slot where it would go.
    @inline(__always) private func find(_ key: UInt64) -> Int {
        var slot = home(key)
        while slots[slot].value >= 0 && slots[slot].key != key { slot = (slot + 1) & mask }
        return slot
    }

    subscript(id: TransactionID) -> Int? {
        let slot = find(id.rawValue)
        return slots[slot].value >= 0 ? slots[slot].value : nil
    }

    /// Sets `value` (>= 0) for `id`; returns the value it replaced.
    @discardableResult
    mutating func updateValue(_ value: Int, forKey id: TransactionID) -> Int? {
        precondition(value >= 0)
        if (count + 1) * 2 > mask + 1 { grow() }
        let slot = find(id.rawValue)
        let previous = slots[slot].value
        slots[slot] = Slot(key: id.rawValue, value: value)
        if previous >= 0 { return previous }
        count += 1
        return nil
    }

    /// Removes `id`; returns its value.
    mutating func removeValue(forKey id: TransactionID) -> Int? {
        var slot = find(id.rawValue)
        let removed = slots[slot].value
        guard removed >= 0 else { return nil }
        count -= 1
        // Backward shift: pull later entries of the probe run into the hole, so lookups never
        // stop early at it.
        var next = (slot + 1) & mask
        while slots[next].value >= 0 {
            let wanted = home(slots[next].key)
            // Move `next` into `slot` unless its home lies cyclically in (slot, next].
            let distanceToSlot = (slot - wanted) & mask
            let distanceToNext = (next - wanted) & mask
            if distanceToSlot < distanceToNext {
                slots[slot] = slots[next]
                slot = next
            }
            next = (next + 1) & mask
        }
        slots[slot].value = -1
        return removed
    }

    /// Calls `body` with every value.
    func forEachValue(_ body: (Int) throws -> Void) rethrows {
        for slot in 0...mask where slots[slot].value >= 0 { try body(slots[slot].value) }
    }

    /// Calls `body` with every transaction and its value.
    func forEach(_ body: (TransactionID, Int) throws -> Void) rethrows {
        for slot in 0...mask where slots[slot].value >= 0 { try body(TransactionID(rawValue: slots[slot].key), slots[slot].value) }
    }

    private mutating func grow() {
        let old = slots, oldCapacity = mask + 1
        let capacity = oldCapacity * 2
        mask = capacity - 1
        slots = .allocate(capacity: capacity)
        slots.initialize(repeating: Slot(key: 0, value: -1), count: capacity)
        for index in 0..<oldCapacity where old[index].value >= 0 {
            slots[find(old[index].key)] = old[index]
        }
        old.deallocate()
    }
}
