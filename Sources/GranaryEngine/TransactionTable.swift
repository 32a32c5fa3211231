/// A map from transaction id to a small non-negative integer (a record's index in the processor's
/// pool), for the record processor's per-record lookups: open addressing with linear probing and
/// backward-shift deletion, a multiplicative hash, no tombstones. `Dictionary` hashes its keys with
/// seeded SipHash, which cost more than the rest of a lookup on this path.
///
/// Owns its storage; single-threaded (the record processor's polling lock).
struct TransactionTable: ~Copyable {
    private var keys: UnsafeMutablePointer<UInt64>
    /// -1 marks an empty slot.
    private var values: UnsafeMutablePointer<Int>
    private var mask: Int
    private(set) var count = 0

    init(minimumCapacity: Int) {
        var capacity = 16
        while capacity < minimumCapacity * 2 { capacity <<= 1 }
        mask = capacity - 1
        keys = .allocate(capacity: capacity)
        keys.initialize(repeating: 0, count: capacity)
        values = .allocate(capacity: capacity)
        values.initialize(repeating: -1, count: capacity)
    }

    deinit {
        keys.deallocate()
        values.deallocate()
    }

    @inline(__always) private func home(_ key: UInt64) -> Int {
        Int(truncatingIfNeeded: (key &* 0x9E37_79B9_7F4A_7C15) >> 32) & mask
    }

    /// The slot holding `key`, or the empty slot where it would go.
    @inline(__always) private func find(_ key: UInt64) -> Int {
        var slot = home(key)
        while values[slot] >= 0 && keys[slot] != key { slot = (slot + 1) & mask }
        return slot
    }

    subscript(id: TransactionID) -> Int? {
        let slot = find(id.rawValue)
        return values[slot] >= 0 ? values[slot] : nil
    }

    /// Sets `value` (>= 0) for `id`; returns the value it replaced.
    @discardableResult
    mutating func updateValue(_ value: Int, forKey id: TransactionID) -> Int? {
        precondition(value >= 0)
        if (count + 1) * 2 > mask + 1 { grow() }
        let slot = find(id.rawValue)
        let previous = values[slot]
        keys[slot] = id.rawValue
        values[slot] = value
        if previous >= 0 { return previous }
        count += 1
        return nil
    }

    /// Removes `id`; returns its value.
    mutating func removeValue(forKey id: TransactionID) -> Int? {
        var slot = find(id.rawValue)
        let removed = values[slot]
        guard removed >= 0 else { return nil }
        count -= 1
        // Backward shift: pull later entries of the probe run into the hole, so lookups never
        // stop early at it.
        var next = (slot + 1) & mask
        while values[next] >= 0 {
            let wanted = home(keys[next])
            // Move `next` into `slot` unless its home lies cyclically in (slot, next].
            let distanceToSlot = (slot - wanted) & mask
            let distanceToNext = (next - wanted) & mask
            if distanceToSlot < distanceToNext {
                keys[slot] = keys[next]
                values[slot] = values[next]
                slot = next
            }
            next = (next + 1) & mask
        }
        values[slot] = -1
        return removed
    }

    /// Calls `body` with every value.
    func forEachValue(_ body: (Int) throws -> Void) rethrows {
        for slot in 0...mask where values[slot] >= 0 { try body(values[slot]) }
    }

    private mutating func grow() {
        let oldKeys = keys, oldValues = values, oldCapacity = mask + 1
        let capacity = oldCapacity * 2
        mask = capacity - 1
        keys = .allocate(capacity: capacity)
        keys.initialize(repeating: 0, count: capacity)
        values = .allocate(capacity: capacity)
        values.initialize(repeating: -1, count: capacity)
        for slot in 0..<oldCapacity where oldValues[slot] >= 0 {
            let target = find(oldKeys[slot])
            keys[target] = oldKeys[slot]
            values[target] = oldValues[slot]
        }
        oldKeys.deallocate()
        oldValues.deallocate()
    }
}
