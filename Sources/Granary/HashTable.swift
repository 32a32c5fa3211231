import GranaryConfiguration
import GranaryEngine
import GranaryMemory

/// Why a hash-table operation failed.
public enum HashTableError: Error, Sendable, Equatable, CustomStringConvertible {
    /// No bucket within the probe limit has a free slot: the table is at its capacity.
    case full(table: String, capacity: Int)
    /// The value type does not fit the table's buckets.
    case valueTooLarge(table: String, bytes: Int, maximum: Int)
    /// A creation parameter is outside what a table can have.
    case invalidParameter(table: String, reason: String)

    /// The failure in a sentence, naming the table.
    public var description: String {
        switch self {
        case .full(let table, let capacity):
            return "hash table '\(table)' is full (created for \(capacity) entries): no free slot within \(TransactionalHashTableLayout.probeLimit) buckets"
        case .valueTooLarge(let table, let bytes, let maximum):
            return "a \(bytes)-byte value does not fit hash table '\(table)' (values up to \(maximum) bytes)"
        case .invalidParameter(let table, let reason):
            return "hash table '\(table)' cannot be created: \(reason)"
        }
    }
}

/// What identifies a hash table in the cluster: enough to reopen it from any node.
public struct HashTableDescriptor: Codable, Sendable, Hashable {
    /// The table's name, as given to `create`; errors about the table name it.
    public var name: String
    /// The entries the table was created for. Not a hard limit: the buckets have slots for about
    /// twice this many, and an insert fails (``HashTableError/full(table:capacity:)``) only when no
    /// bucket within ``TransactionalHashTableLayout/probeLimit`` has a free slot.
    public var capacity: Int
    /// Slots in each bucket (1 to 32).
    public var slotsPerBucket: Int
    /// The bytes reserved for a value in each slot: the size of the value type the table was
    /// created with. A table opens with any value type of at most this size.
    public var valueBytes: Int
    /// Every bucket object, in bucket order.
    public var buckets: [GlobalAddress]
}

/// Bucket layout: a header word (occupancy bitmap in the low 32 bits, flags in the high 32: bit 0
/// "an insert probed past this bucket"), then `slotsPerBucket` slots of a key word and the value
/// padded to 8 bytes.
public enum TransactionalHashTableLayout {
    /// Buckets probed (linearly) before an insert gives up. Linear probing clusters: at the
    /// designed load of one half, runs of 8 full buckets do occur in tables of 10^5 buckets, so
    /// the limit is generous. Lookups stop much earlier, at the first bucket no insert probed past.
    public static let probeLimit = 64
    @usableFromInline static let overflowed: UInt64 = 1 << 32
}

/// A transactional hash table on Granary, after FaRM's: fixed-size 64-bit keys, values of one
/// fixed-size type stored inline in associative buckets, buckets spread over every node's regions.
///
/// Every operation runs inside a `Transaction` and so is strictly serializable with everything
/// else the transaction does. A lookup costs one one-sided read of one bucket in the common case
/// (more when its home bucket overflowed); an insert, update or delete buffers one bucket write.
///
/// ```swift
/// let table = try await TransactionalHashTable<Int64>.create(name: "balances", capacity: 10_000, in: cluster)
/// try await node.transaction { tx in _ = try table.insert(42, 100, in: tx) }
/// let balance = try await node.transaction { tx in try table.get(42, in: tx) }
/// ```
public final class TransactionalHashTable<Value: BitwiseCopyable>: Sendable {
    /// What identifies this table: pass it to ``init(descriptor:)`` on another node or in another
    /// process to open the same table.
    public let descriptor: HashTableDescriptor
    @usableFromInline let bucketCount: Int
    /// When the buckets lie in a regular pattern, as ``create(name:capacity:slotsPerBucket:in:)``
    /// lays them out (bucket `i` is bucket `i / period` of an evenly spaced run that starts at
    /// `addresses[i % period]`), a bucket's address is computed: a table of every bucket's address
    /// missed the cache on most lookups of a large table, and the bucket's own read could only
    /// start after it. `period` is 0 when the buckets follow no such pattern; `addresses` then
    /// holds every bucket's address.
    @usableFromInline let period: Int
    @usableFromInline let periodStride: UInt64
    /// Raw `GlobalAddress` values (the pattern's `period` bases, or all `bucketCount` addresses), in
    /// memory this table allocates, fills in `init` and frees in `deinit`, never written in between;
    /// kept as an address so that the class stays checked-`Sendable`. Not an `Array`: every lookup
    /// would retain and release its buffer, an atomic write to a line that all threads using the
    /// table would pass around.
    @usableFromInline let addresses: UInt
    @usableFromInline let slots: Int
    @usableFromInline let slotStride: Int
    /// Payload bytes of one bucket object.
    public let bucketBytes: Int
    @usableFromInline static var probeLimit: Int { TransactionalHashTableLayout.probeLimit }

    /// Opens a table created before (its descriptor, e.g. from another process).
    public init(descriptor: HashTableDescriptor) throws {
        guard MemoryLayout<Value>.size <= descriptor.valueBytes else {
            throw HashTableError.valueTooLarge(table: descriptor.name, bytes: MemoryLayout<Value>.size, maximum: descriptor.valueBytes)
        }
        self.descriptor = descriptor
        self.bucketCount = descriptor.buckets.count
        let pattern = Self.regularPattern(descriptor.buckets)
        let stored = pattern?.bases ?? descriptor.buckets.map(\.rawValue)
        let table = UnsafeMutablePointer<UInt64>.allocate(capacity: max(1, stored.count))
        table.initialize(from: stored, count: stored.count)
        self.addresses = UInt(bitPattern: table)
        self.period = pattern?.bases.count ?? 0
        self.periodStride = pattern?.stride ?? 0
        self.slots = descriptor.slotsPerBucket
        self.slotStride = 8 + ((descriptor.valueBytes + 7) & ~7)
        self.bucketBytes = 8 + slots * slotStride
    }

    deinit {
        UnsafeMutablePointer<UInt64>(bitPattern: addresses)!.deallocate()
    }

    /// The smallest period `p` (up to 64, and repeating at least 4 times) such that every bucket
    /// `i` lies at `buckets[i % p] + (i / p) * stride`, in the same region, for one stride; nil if
    /// none does. (A table too small for that has its addresses in cache anyway.)
    static func regularPattern(_ buckets: [GlobalAddress]) -> (bases: [UInt64], stride: UInt64)? {
        let count = buckets.count
        guard count >= 4 else { return nil }
        candidates: for period in 1...min(64, count / 4) {
            let first = buckets[0], next = buckets[period]
            guard next.region == first.region, next.offset > first.offset else { continue }
            let stride = Int(next.offset - first.offset)
            for index in period..<count {
                let base = buckets[index % period]
                let expected = Int(base.offset) + (index / period) * stride
                guard buckets[index].region == base.region, expected <= Int(UInt32.max),
                      Int(buckets[index].offset) == expected else { continue candidates }
            }
            return (buckets[0..<period].map(\.rawValue), UInt64(stride))
        }
        return nil
    }

    /// Buckets up to this size are read into a scratch buffer of constant size on the stack.
    @usableFromInline static var stackBucketWords: Int { 64 }

    /// Runs `body` with a scratch buffer of ``bucketBytes`` bytes on the stack. The constant
    /// capacity lets the compiler inline `body`; with a capacity known only at run time, the
    /// closure was called out of line and retained the table and the transaction it captured on
    /// every lookup (reference-count writes that every worker thread passes between the cores).
    @inlinable @inline(__always)
    func withBucketScratch<R>(_ body: (UnsafeMutableRawBufferPointer) throws -> R) throws -> R {
        guard bucketBytes <= Self.stackBucketWords * 8 else {
            return try withUnsafeTemporaryAllocation(byteCount: bucketBytes, alignment: 8, body)
        }
        return try withUnsafeTemporaryAllocation(of: UInt64.self, capacity: Self.stackBucketWords) { words in
            try body(UnsafeMutableRawBufferPointer(start: words.baseAddress, count: bucketBytes))
        }
    }

    /// The address of the bucket `probe` places after `key`'s home bucket.
    @inlinable func bucket(_ home: Int, probe: Int) -> GlobalAddress {
        var index = home &+ probe
        if index >= bucketCount { index -= bucketCount }
        let stored = UnsafePointer<UInt64>(bitPattern: addresses).unsafelyUnwrapped
        guard period > 0 else { return GlobalAddress(rawValue: stored[index]) }
        let (run, member) = index.quotientAndRemainder(dividingBy: period)
        return GlobalAddress(rawValue: stored[member] &+ UInt64(truncatingIfNeeded: run) &* periodStride)
    }

    /// Slots per bucket when the caller does not choose: as many as fill the fewest cache lines
    /// that hold at least two (an `Int64` value: 3 slots in one line; a 40-byte value: 2 in two).
    /// A lookup reads one bucket object, so a bucket that fits in fewer lines costs less to read,
    /// to lock and to install.
    public static var defaultSlotsPerBucket: Int {
        let slot = 8 + ((MemoryLayout<Value>.size + 7) & ~7)
        for lines in 1...64 {
            let slots = (lines * ObjectLayout.payloadPerLine - 8) / slot
            if slots >= 2 { return min(slots, 32) }
        }
        return 2
    }

    /// Creates a table for `capacity` entries: `2 * capacity / slotsPerBucket` zeroed buckets,
    /// allocated round-robin by every node of `cluster` in its own regions.
    ///
    /// - Parameter name: the table's name, in its descriptor and in errors.
    /// - Parameter capacity: the entries it is made for (lookups probe at most
    ///   `TransactionalHashTableLayout.probeLimit` buckets, so fill it to about half).
    /// - Parameter slotsPerBucket: 1 to 32; nil for ``defaultSlotsPerBucket``.
    /// - Parameter cluster: the cluster whose nodes allocate the buckets.
    /// - Throws: ``HashTableError/invalidParameter(table:reason:)`` for a slot count outside
    ///   1...32 or a capacity below 1; `TransactionError` if the regions cannot hold the buckets.
    public static func create(name: String, capacity: Int, slotsPerBucket: Int? = nil,
                              in cluster: Cluster) async throws -> TransactionalHashTable<Value> {
        let slotsPerBucket = slotsPerBucket ?? defaultSlotsPerBucket
        guard slotsPerBucket >= 1, slotsPerBucket <= 32 else {
            throw HashTableError.invalidParameter(table: name, reason: "\(slotsPerBucket) slots per bucket (1 to 32)")
        }
        guard capacity >= 1 else {
            throw HashTableError.invalidParameter(table: name, reason: "a capacity of \(capacity) entries (at least 1)")
        }
        let valueBytes = MemoryLayout<Value>.size
        let bucketCount = max(1, (2 * capacity + slotsPerBucket - 1) / slotsPerBucket)
        let bucketBytes = 8 + slotsPerBucket * (8 + ((valueBytes + 7) & ~7))
        let perTransaction = max(1, cluster.nodes[0].engine.maximumRecordBytes / 2 / (bucketBytes + 32))
        var addresses = [GlobalAddress?](repeating: nil, count: bucketCount)
        let zero = [UInt8](repeating: 0, count: bucketBytes)
        for (index, node) in cluster.nodes.enumerated() {
            let mine = Array(stride(from: index, to: bucketCount, by: cluster.nodes.count))
            for start in stride(from: 0, to: mine.count, by: perTransaction) {
                let chunk = Array(mine[start..<min(start + perTransaction, mine.count)])
                let allocated = try await node.transaction { tx in
                    try zero.withUnsafeBytes { bytes in try chunk.map { _ in try tx.allocate(raw: bytes) } }
                }
                // Slots, not incarnations: bucket addresses are computed from one another.
                for (bucket, address) in zip(chunk, allocated) { addresses[bucket] = address.untagged }
            }
        }
        return try TransactionalHashTable(descriptor: HashTableDescriptor(
            name: name, capacity: capacity, slotsPerBucket: slotsPerBucket, valueBytes: valueBytes,
            buckets: addresses.map { $0! }))
    }

    @inlinable func home(of key: UInt64) -> Int {
        var z = key &+ 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        z ^= z >> 31
        return Int(z.multipliedFullWidth(by: UInt64(bucketCount)).high)
    }

    /// Finds `key`: calls `body` with the bucket (in a scratch buffer), its address and the slot
    /// holding the key (nil if absent, with the bucket where an insert would go, if any, and the
    /// number of full buckets probed past before it: the probes `0..<passedFull` from `home(of: key)`).
    @inlinable
    func locate<R>(_ key: UInt64, in tx: Transaction,
                   _ body: (_ bucket: UnsafeMutableRawBufferPointer, _ address: GlobalAddress, _ slot: Int?, _ passedFull: Int) throws -> R?) throws -> R? {
        try withBucketScratch { bucket in
            let start = home(of: key)
            // The first bucket with a free slot, by its probe number; every bucket probed before it
            // was full.
            var firstFree: Int?
            // The key can only be in the chain of buckets whose predecessors overflowed; a free slot
            // may lie further on.
            var searching = true
            let probes = min(Self.probeLimit, bucketCount)
            for probe in 0..<probes {
                let address = self.bucket(start, probe: probe)
                try tx.read(address, into: bucket)
                let header = bucket.load(as: UInt64.self)
                let occupancy = UInt32(truncatingIfNeeded: header)
                if searching {
                    for slot in 0..<slots where occupancy & (1 << UInt32(slot)) != 0 {
                        if bucket.load(fromByteOffset: 8 + slot * slotStride, as: UInt64.self) == key {
                            return try body(bucket, address, slot, 0)
                        }
                    }
                    if header & TransactionalHashTableLayout.overflowed == 0 { searching = false }  // the chain ends here
                }
                if firstFree == nil, occupancy.nonzeroBitCount < slots { firstFree = probe }
                if !searching, firstFree != nil { break }
            }
            guard let firstFree else {
                return try body(bucket, GlobalAddress(rawValue: 0), nil, probes)
            }
            // Re-read the bucket where an insert would go (the scratch holds the last one read).
            let address = self.bucket(start, probe: firstFree)
            try tx.read(address, into: bucket)
            return try body(bucket, address, nil, firstFree)
        }
    }

    /// A hint that `tx` will look `key` up soon (``get(_:in:)``, ``update(_:in:_:)``...): starts
    /// fetching its home bucket, so that the lookups of several keys a transaction knows in advance
    /// overlap their memory latency instead of paying it one after another (see
    /// `Transaction.prefetch(_:payloadBytes:)`). Changes no result.
    @inlinable
    public func prefetch(_ key: UInt64, in tx: Transaction) {
        tx.prefetch(bucket(home(of: key), probe: 0), payloadBytes: bucketBytes)
    }

    /// The value stored under `key`, if any. Cost: one bucket read (more if the home bucket overflowed).
    @inlinable
    public func get(_ key: UInt64, in tx: Transaction) throws -> Value? {
        try withBucketScratch { bucket -> Value? in
            let start = home(of: key)
            for probe in 0..<min(Self.probeLimit, bucketCount) {
                try tx.read(self.bucket(start, probe: probe), into: bucket)
                let header = bucket.load(as: UInt64.self)
                let occupancy = UInt32(truncatingIfNeeded: header)
                for slot in 0..<slots where occupancy & (1 << UInt32(slot)) != 0 {
                    if bucket.load(fromByteOffset: 8 + slot * slotStride, as: UInt64.self) == key {
                        return bucket.loadUnaligned(fromByteOffset: 16 + slot * slotStride, as: Value.self)
                    }
                }
                if header & TransactionalHashTableLayout.overflowed == 0 { return nil }  // the chain ends here
            }
            return nil
        }
    }

    /// Inserts `key` with `value`; false (and no change) if the key is present.
    /// - Throws: ``HashTableError/full(table:capacity:)`` when no bucket within the probe limit has room.
    @inlinable @discardableResult
    public func insert(_ key: UInt64, _ value: Value, in tx: Transaction) throws -> Bool {
        let inserted: Bool? = try locate(key, in: tx) { bucket, address, slot, passedFull in
            if slot != nil { return false }
            guard address.rawValue != 0 else {
                throw HashTableError.full(table: descriptor.name, capacity: descriptor.capacity)
            }
            let header = bucket.load(as: UInt64.self)
            let occupancy = UInt32(truncatingIfNeeded: header)
            let free = (~occupancy).trailingZeroBitCount
            bucket.storeBytes(of: key, toByteOffset: 8 + free * slotStride, as: UInt64.self)
            withUnsafeBytes(of: value) { bytes in
                UnsafeMutableRawBufferPointer(rebasing: bucket[(16 + free * slotStride)...]).copyMemory(from: bytes)
            }
            bucket.storeBytes(of: header | (1 << UInt64(free)), as: UInt64.self)
            try tx.write(address, raw: UnsafeRawBufferPointer(bucket))
            // Buckets probed past must say so, or lookups would stop before reaching the key.
            let start = home(of: key)
            for probe in 0..<passedFull { try markOverflowed(self.bucket(start, probe: probe), in: tx) }
            return true
        }
        return inserted ?? false
    }

    @usableFromInline
    func markOverflowed(_ address: GlobalAddress, in tx: Transaction) throws {
        try withUnsafeTemporaryAllocation(byteCount: bucketBytes, alignment: 8) { bucket in
            try tx.read(address, into: bucket)
            let header = bucket.load(as: UInt64.self)
            guard header & TransactionalHashTableLayout.overflowed == 0 else { return }
            bucket.storeBytes(of: header | TransactionalHashTableLayout.overflowed, as: UInt64.self)
            try tx.write(address, raw: UnsafeRawBufferPointer(bucket))
        }
    }

    /// Changes the value under `key` in place; false if the key is absent.
    @inlinable @discardableResult
    public func update(_ key: UInt64, in tx: Transaction, _ change: (inout Value) throws -> Void) throws -> Bool {
        let updated: Bool? = try locate(key, in: tx) { bucket, address, slot, _ in
            guard let slot else { return false }
            var value = bucket.loadUnaligned(fromByteOffset: 16 + slot * slotStride, as: Value.self)
            try change(&value)
            withUnsafeBytes(of: value) { bytes in
                UnsafeMutableRawBufferPointer(rebasing: bucket[(16 + slot * slotStride)...]).copyMemory(from: bytes)
            }
            try tx.write(address, raw: UnsafeRawBufferPointer(bucket))
            return true
        }
        return updated ?? false
    }

    /// Removes `key`; false if it was absent.
    @inlinable @discardableResult
    public func remove(_ key: UInt64, in tx: Transaction) throws -> Bool {
        let removed: Bool? = try locate(key, in: tx) { bucket, address, slot, _ in
            guard let slot else { return false }
            let header = bucket.load(as: UInt64.self)
            bucket.storeBytes(of: header & ~(1 << UInt64(slot)), as: UInt64.self)
            try tx.write(address, raw: UnsafeRawBufferPointer(bucket))
            return true
        }
        return removed ?? false
    }
}
